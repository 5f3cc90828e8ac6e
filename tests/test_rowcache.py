"""Arrays computed once from the frozen target (hidden states, teacher top-k) survive a kill part by part."""

import numpy as np
import pytest

from training import datasets, rowcache
from training.bpd import cached_features, final_hidden_states
from training.draft import cached_teacher_topk, teacher_topk


class Killed(Exception):
  pass


def squares(calls, kill_after=None):
  def compute(idx, advance):
    if kill_after is not None and len(calls) == kill_after:
      raise Killed
    calls.append(list(idx))
    return {"sq": np.asarray(idx, np.int64)[:, None] ** 2 * np.ones((1, 3), np.int64), "id": np.asarray(idx)}
  return compute


def test_a_killed_computation_keeps_its_finished_parts(tmp_path):
  path, order = tmp_path / "c.npz", np.array([4, 0, 3, 1, 2, 6, 5])
  calls = []
  with pytest.raises(Killed):
    rowcache.cached_rows(path, "k1", order, squares(calls, kill_after=2), part_rows=2, progress=False)
  assert calls == [[4, 0], [3, 1]] and not path.exists()
  parts = sorted(p.name for p in (tmp_path / "c.npz.parts").iterdir())
  assert parts == ["meta.json", "part_00000.npz", "part_00001.npz"]
  (tmp_path / "c.npz.parts" / "part_00001.npz").write_bytes(b"cut short")  # a part the kill left broken

  calls.clear()
  z = rowcache.cached_rows(path, "k1", order, squares(calls), part_rows=2, progress=False)
  assert calls == [[3, 1], [2, 6], [5]]  # the broken part and the missing ones only
  np.testing.assert_array_equal(z["id"], np.arange(7))  # row i is sequence i, whatever the order
  np.testing.assert_array_equal(z["sq"], np.arange(7)[:, None] ** 2 * np.ones((1, 3), np.int64))
  assert path.exists() and not (tmp_path / "c.npz.parts").exists()

  calls.clear()
  assert rowcache.cached_rows(path, "k1", order, squares(calls), part_rows=2, progress=False)["sq"].shape == (7, 3)
  assert calls == []  # the finished file is reused as it is
  with pytest.raises(Killed):  # another key: nothing of the old data is reused
    rowcache.cached_rows(path, "k2", order, squares(calls, kill_after=1), part_rows=2, progress=False)
  calls.clear()
  rowcache.cached_rows(tmp_path / "c.npz", "k3", order, squares(calls), part_rows=2, progress=False)
  assert len(calls) == 4  # parts of the k2 run are not taken for k3


def test_compute_seconds_sum_every_process_of_a_killed_run(tmp_path, monkeypatch):
  """Each part records the seconds its computation took (10 on a fake clock), and the joined file their sum: the
  parts a killed process finished count, the part it was computing does not."""
  class Clock:
    now = 0.0

    def perf_counter(self):
      Clock.now += 10.0
      return Clock.now

  monkeypatch.setattr(rowcache, "time", Clock())
  path, order = tmp_path / "c.npz", np.arange(7)
  with pytest.raises(Killed):
    rowcache.cached_rows(path, "k", order, squares([], kill_after=2), part_rows=2, progress=False)
  assert rowcache.compute_seconds(path) == 0.0  # no file yet
  rowcache.cached_rows(path, "k", order, squares([]), part_rows=2, progress=False)
  assert rowcache.compute_seconds(path) == 40.0  # 2 parts from the killed process, 2 from this one
  z = rowcache.cached_rows(path, "k", order, squares([]), part_rows=2, progress=False)
  assert set(z) == {"sq", "id"}  # the record stays in the file

  # Rows named by content carry their own seconds: a run that uses fewer rows of a file counts only those, and one
  # that adds rows counts the added ones once (parts of 1 row: 10 s each).
  keys = lambda ids: [rowcache.sequence_key(np.array([i])) for i in ids]
  named = tmp_path / "named.npz"
  rowcache.cached_rows(named, "k", np.arange(7), squares([]), row_keys=keys(range(7)), part_rows=1, progress=False)
  assert rowcache.compute_seconds(named) == 70.0
  calls = []
  rowcache.cached_rows(named, "k", np.arange(3), squares(calls), row_keys=keys(range(3)), part_rows=1, progress=False)
  assert calls == [] and rowcache.compute_seconds(named) == 30.0  # the file now holds this run's 3 rows
  rowcache.cached_rows(named, "k", np.arange(5), squares(calls), row_keys=keys(range(5)), part_rows=1, progress=False)
  assert calls == [[3], [4]] and rowcache.compute_seconds(named) == 50.0


def test_rows_named_by_content_are_reused_when_data_is_added(tmp_path):
  path = tmp_path / "c.npz"
  keys = lambda ids: [rowcache.sequence_key(np.array([i, i + 1])) for i in ids]

  def by_id(ids, calls, kill_after=None):
    def compute(idx, advance):
      if kill_after is not None and len(calls) == kill_after:
        raise Killed
      calls.append(sorted(ids[j] for j in idx))
      return {"sq": np.asarray([ids[j] for j in idx], np.int64)[:, None] ** 2 * np.ones((1, 3), np.int64)}
    return compute

  first = [10, 11, 12, 13, 14]
  calls = []
  rowcache.cached_rows(path, "t", np.arange(5), by_id(first, calls), row_keys=keys(first), part_rows=2,
                       progress=False)
  assert sorted(i for c in calls for i in c) == first
  # The same sequences in another order and three new ones: only the new ones are computed.
  more = [13, 20, 10, 12, 21, 11, 14, 22]
  calls = []
  with pytest.raises(Killed):  # killed after one part of the new rows
    rowcache.cached_rows(path, "t", np.arange(8), by_id(more, calls, kill_after=1), row_keys=keys(more),
                         part_rows=2, progress=False)
  calls.clear()
  z = rowcache.cached_rows(path, "t", np.arange(8), by_id(more, calls), row_keys=keys(more), part_rows=2,
                           progress=False)
  assert calls == [[22]]  # the finished part of the new rows survived the kill too
  np.testing.assert_array_equal(z["sq"], np.asarray(more)[:, None] ** 2 * np.ones((1, 3), np.int64))
  assert rowcache.ROW_KEYS not in z
  calls.clear()  # the same data again: the file as it is
  z2 = rowcache.cached_rows(path, "t", np.arange(8), by_id(more, calls), row_keys=keys(more), progress=False)
  assert calls == [] and np.array_equal(z2["sq"], z["sq"])
  # A run killed before a cache of other data was put in its folder: its parts name other rows, so they are not
  # taken for the rows that remain.
  other = tmp_path / "d.npz"
  with pytest.raises(Killed):
    rowcache.cached_rows(other, "t", np.arange(8), by_id(more, calls, kill_after=1), row_keys=keys(more),
                         part_rows=2, progress=False)
  rowcache.cached_rows(tmp_path / "e.npz", "t", np.arange(5), by_id(first, calls), row_keys=keys(first),
                       progress=False)
  (tmp_path / "e.npz").replace(other)
  calls.clear()
  z3 = rowcache.cached_rows(other, "t", np.arange(8), by_id(more, calls), row_keys=keys(more), part_rows=2,
                            progress=False)
  assert sorted(i for c in calls for i in c) == [20, 21, 22] and np.array_equal(z3["sq"], z["sq"])
  calls.clear()
  # Another target (key): nothing is taken from the file.
  rowcache.cached_rows(path, "u", np.arange(3), by_id(first[:3], calls), row_keys=keys(first[:3]), progress=False)
  assert calls == [[10, 11, 12]]
  with pytest.raises(ValueError, match="row keys"):
    rowcache.cached_rows(path, "u", np.arange(3), by_id(first, calls), row_keys=keys(first[:2]), progress=False)


def test_teacher_topk_and_features_through_the_cache_equal_a_direct_computation(tiny, tmp_path, monkeypatch):
  model, params = tiny
  rng = np.random.default_rng(0)
  lengths = np.array([5, 17, 9, 33, 12, 3, 20])
  tokens = np.zeros((len(lengths), 40), np.int32)
  for i, l in enumerate(lengths):
    tokens[i, :l] = rng.integers(1, model.vocab_size, l)
  real = rowcache.cached_rows
  monkeypatch.setattr(rowcache, "cached_rows", _small_parts(real))
  cached_teacher_topk(tmp_path / "t.npz", model, params, tokens[:4], lengths[:4], 4, progress=False)
  computed = []
  monkeypatch.setattr(rowcache, "cached_rows", _counting(real, computed))
  ids, logp, other = cached_teacher_topk(tmp_path / "t.npz", model, params, tokens, lengths, 4, progress=False)
  assert sorted(computed) == [4, 5, 6]  # the added sequences only
  ref = teacher_topk(model, params, tokens, lengths, 4, batch_size=len(lengths))  # one batch, no parts
  for a, b in zip((ids, logp, other), ref):  # within each row (past its end: whatever its batch's bucket held)
    for i, l in enumerate(lengths):
      np.testing.assert_allclose(a[i, :l], b[i, :l], rtol=1e-5, atol=1e-5)

  seqs = datasets.Sequences([tokens[i, :l] for i, l in enumerate(lengths)], np.ones(len(lengths), np.int32))
  head = datasets.Sequences(seqs.tokens[:4], seqs.prompt_lens[:4])
  cached_features(tmp_path / "f.npz", model, params, head, 24, progress=False)
  computed.clear()
  feats = cached_features(tmp_path / "f.npz", model, params, seqs, 24, progress=False)  # 3 sequences added
  assert sorted(computed) == [4, 5, 6]
  cut = datasets.Sequences([t[:24] for t in seqs.tokens], seqs.prompt_lens)
  for f, h in zip(feats, final_hidden_states(model, params, cut, progress=False)):
    np.testing.assert_allclose(f[:len(h)], h, atol=2e-3, rtol=2e-3)
    assert not f[len(h):].any()


def test_the_caches_are_not_reused_for_a_target_of_other_layers(tiny, tmp_path, monkeypatch):
  """A target with the same embedding but other layers (a fine-tune of it) computes its teacher top-k and hidden
  states again: their keys name all the weights, not only the embedding."""
  import jax

  model, params = tiny
  tuned = {**params, "layers_1": jax.tree.map(lambda x: x * 1.01, params["layers_1"])}
  lengths = np.array([5, 17, 9])
  tokens = np.zeros((len(lengths), 40), np.int32)
  for i, l in enumerate(lengths):
    tokens[i, :l] = np.arange(1, l + 1)
  seqs = datasets.Sequences([tokens[i, :l] for i, l in enumerate(lengths)], np.ones(len(lengths), np.int32))
  computed = []
  monkeypatch.setattr(rowcache, "cached_rows", _counting(rowcache.cached_rows, computed))
  for target in (params, tuned):
    computed.clear()
    cached_teacher_topk(tmp_path / "t.npz", model, target, tokens, lengths, 4, progress=False)
    assert sorted(computed) == [0, 1, 2]
    computed.clear()
    cached_features(tmp_path / "f.npz", model, target, seqs, 24, progress=False)
    assert sorted(computed) == [0, 1, 2]


def _counting(cached_rows, computed):
  """The real cache with parts of 3 sequences, recording which rows it computes."""
  def run(path, key, order, compute, **kw):
    def counted(idx, advance):
      computed.extend(int(i) for i in idx)
      return compute(idx, advance)
    return cached_rows(path, key, order, counted, **{**kw, "part_rows": 3})
  return run


def _small_parts(cached_rows):
  """The real cache with parts of 3 sequences, so that a few sequences already span several parts."""
  return lambda *a, **kw: cached_rows(*a, **{**kw, "part_rows": 3})


def test_the_bar_moves_with_each_batch_of_a_part(tmp_path, monkeypatch):
  """A part reports its batches as they finish (`advance`), not only when the whole part ends; what it leaves
  unreported is counted at its end, and it cannot report more rows than it has."""
  moves = []

  class Bar:
    def __init__(self, total, initial=0, **kw):
      moves.append(("start", initial))

    def update(self, n):
      moves.append(n)

    def close(self):
      pass

  def compute(idx, advance):
    advance(2)
    advance(1)
    return {"x": np.asarray(idx)}

  monkeypatch.setattr(rowcache, "tqdm", Bar)
  rowcache.cached_rows(tmp_path / "c.npz", "k", np.arange(7), compute, part_rows=5)
  assert moves == [("start", 0), 2, 1, 2, 2, 0, 0]  # part of 5: 2, 1, then the 2 unreported; part of 2: 2, capped


def test_as_many_rows_of_other_sequences_are_computed_not_taken_from_the_file(tmp_path):
  """A file holding the same number of rows for other sequences (the data replaced, not added to) gives none of its
  rows: they are computed for the new sequences."""
  path = tmp_path / "c.npz"
  keys = lambda ids: [rowcache.sequence_key(np.array([i, i + 1])) for i in ids]

  def by_id(ids, calls):
    def compute(idx, advance):
      calls.append(sorted(ids[j] for j in idx))
      return {"sq": np.asarray([ids[j] for j in idx], np.int64) ** 2}
    return compute

  calls = []
  rowcache.cached_rows(path, "t", np.arange(3), by_id([1, 2, 3], calls), row_keys=keys([1, 2, 3]), progress=False)
  calls.clear()
  z = rowcache.cached_rows(path, "t", np.arange(3), by_id([7, 8, 9], calls), row_keys=keys([7, 8, 9]),
                           progress=False)
  assert calls == [[7, 8, 9]]
  np.testing.assert_array_equal(z["sq"], [49, 64, 81])
  calls.clear()  # two of them again, with one of the first data: only that one is computed
  z = rowcache.cached_rows(path, "t", np.arange(3), by_id([9, 1, 7], calls), row_keys=keys([9, 1, 7]),
                           progress=False)
  assert calls == [[1]]
  np.testing.assert_array_equal(z["sq"], [81, 1, 49])
