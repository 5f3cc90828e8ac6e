"""Better BPD drafts: the n-gram LM, lattice rescoring (n-gram, neural, oracle), exactness, the tuning task."""

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.decoding.bpd import BPDDrafter, bpd_draft_params
from jaxspec.decoding.generate import generate
from jaxspec.decoding.lattice import LatticeDrafter, forest_draft, lattice_draft_params
from jaxspec.decoding.speculative import DraftModelDrafter, layerskip_draft
from jaxspec.errors import InputError, ModelLoadError
from jaxspec.models.bpd import save_bpd
from jaxspec.models.ngram import build_ngram, exact_prob, load_ngram, save_ngram, sorted_lookup
from tests.test_bpd import ByteTokenizer, random_heads, tiny_train_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

PROMPTS = [[1, 2, 3], [7] * 9, [100, 5]]
NEW = 40


def ngram_logp(lm, tables, context, token):
  t = {k: jnp.asarray(v) for k, v in tables.items()}
  return float(lm.log_prob(t, jnp.asarray([context], jnp.int32), jnp.asarray([token], jnp.int32))[0])


def test_ngram_probabilities_follow_the_smoothing_formula():
  lm, tables, info = build_ngram([[1, 2, 1, 2, 1, 3]], order=2, vocab_size=5)
  # Unigrams 1:3, 2:2, 3:1 of 6 tokens; bigrams (1,2):2, (2,1):2, (1,3):1. Ney's discounts n1 / (n1 + 2 n2).
  d1, d2 = 1 / (1 + 2 * 1), 1 / (1 + 2 * 2)
  assert info["discounts"] == {1: round(d1, 4), 2: round(d2, 4)}
  p1 = lambda w, c: max(c - d1, 0) / 6 + d1 * 3 / 6 / 5
  p_2_after_1 = (2 - d2) / 3 + d2 * 2 / 3 * p1(2, 2)
  assert math.isclose(math.exp(ngram_logp(lm, tables, [1], 2)), p_2_after_1, rel_tol=1e-5)
  assert math.isclose(math.exp(ngram_logp(lm, tables, [1], 4)), d2 * 2 / 3 * p1(4, 0), rel_tol=1e-5)
  # An unseen context and an unknown one fall back to the unigram.
  assert math.isclose(math.exp(ngram_logp(lm, tables, [4], 1)), p1(1, 3), rel_tol=1e-5)
  assert math.isclose(math.exp(ngram_logp(lm, tables, [-1], 1)), p1(1, 3), rel_tol=1e-5)


@pytest.mark.parametrize("order", [2, 3, 4])
def test_ngram_distributions_sum_to_one_and_match_the_host_reference(order):
  rng = np.random.default_rng(order)
  seqs = [rng.integers(0, 12, size=rng.integers(5, 40)).tolist() for _ in range(30)]
  lm, tables, _ = build_ngram(seqs, order, vocab_size=16)
  t = {k: jnp.asarray(v) for k, v in tables.items()}
  contexts = [seqs[0][:order - 1], seqs[3][2:order + 1], [-1] * (order - 1), [15] * (order - 1)]
  for ctx in contexts:
    ctx = ctx[-(order - 1):]
    lp = lm.log_prob(t, jnp.broadcast_to(jnp.asarray(ctx, jnp.int32), (16, order - 1)), jnp.arange(16))
    assert abs(float(jnp.sum(jnp.exp(lp))) - 1.0) < 1e-5
    for w in (0, 5, 11, 15):
      assert math.isclose(float(jnp.exp(lp[w])), exact_prob(tables, lm, list(ctx), w), rel_tol=1e-5)


def test_sorted_lookup_finds_exactly_the_stored_keys():
  rng = np.random.default_rng(0)
  hi = rng.integers(0, 50, 300).astype(np.uint32)
  lo = rng.integers(0, 2**32 - 1, 300, dtype=np.uint64).astype(np.uint32)
  keys = sorted(set(zip(hi.tolist(), lo.tolist())))
  k_hi = jnp.asarray([a for a, _ in keys], jnp.uint32)
  k_lo = jnp.asarray([b for _, b in keys], jnp.uint32)
  vals = jnp.arange(len(keys), dtype=jnp.float32)
  q = keys[::7] + [(7, 123), (51, 0), (0, 0)]
  got = sorted_lookup(k_hi, k_lo, vals, jnp.asarray([a for a, _ in q], jnp.uint32),
                      jnp.asarray([b for _, b in q], jnp.uint32), -1.0)
  want = [keys.index(x) if x in keys else -1 for x in q]
  assert got.tolist() == want


def test_ngram_files_round_trip_and_corrupt_files_are_clear_errors(tmp_path):
  lm, tables, _ = build_ngram([[1, 2, 3, 1, 2, 4]], 3, 8)
  save_ngram(tmp_path, lm, tables, meta={"tuned": {"ngram_weight": 0.3}})
  lm2, t2, cfg = load_ngram(tmp_path)
  assert lm2 == lm and cfg["tuned"]["ngram_weight"] == 0.3
  assert all(np.array_equal(np.asarray(t2[k]), v) for k, v in tables.items())
  # A config whose vocabulary is not the unigram table's (edited, or copied from another model) is refused.
  config = json.loads((tmp_path / "config.json").read_text())
  config["ngram"]["vocab_size"] = 9
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ModelLoadError, match="inconsistent with its config.json"):
    load_ngram(tmp_path)
  raw = (tmp_path / "ngram.safetensors").read_bytes()
  (tmp_path / "ngram.safetensors").write_bytes(raw[:len(raw) // 3])
  with pytest.raises(ModelLoadError, match="unreadable"):
    load_ngram(tmp_path)
  with pytest.raises(ModelLoadError, match="missing"):
    load_ngram(tmp_path / "nothing")
  for seqs, bad in (([[1, 9]], 9), ([[1, 2], [8]], 8)):  # 8: the first id past a vocabulary of 8
    with pytest.raises(InputError, match=f"token id {bad} is outside the vocabulary of 8"):
      build_ngram(seqs, 2, 8)


def test_sorted_lookup_finds_every_key_in_tables_of_any_size():
  """Tables of 1 to 17 keys and of 256: a power-of-two size needs every one of the ceil(log2(S + 1)) search steps
  (one step fewer missed the last keys of a 2-, 4- or 256-key table). Each stored key is found with its value; keys
  before, between and after them are not."""
  for s in list(range(1, 18)) + [256]:
    i = np.arange(s)
    k_hi, k_lo = (i // 4).astype(np.uint32), (2 * (i % 4) + 1).astype(np.uint32)  # sorted by (hi, lo)
    vals = jnp.arange(s, dtype=jnp.float32)
    q_hi = np.concatenate([k_hi, k_hi, k_hi, [k_hi[-1] + 1]]).astype(np.uint32)
    q_lo = np.concatenate([k_lo, k_lo - 1, k_lo + 1, [0]]).astype(np.uint32)
    got = sorted_lookup(jnp.asarray(k_hi), jnp.asarray(k_lo), vals, jnp.asarray(q_hi), jnp.asarray(q_lo), -1.0)
    assert got.tolist() == i.tolist() + [-1] * (2 * s + 1), s


def test_a_context_from_before_the_text_scores_with_the_lower_orders():
  """A -1 (a context token before the start of the text, e.g. in a short prompt) is a token no n-gram holds: with an
  order-3 model the context [-1, x] scores every token as the order-2 model of the same text does after [x]. (Read
  as left padding instead, (-1, x, w) was looked up as the bigram key (x, w): the distribution still summed to one
  and the tests of all-known or all-unknown contexts passed.)"""
  text = [[1, 2, 1, 2, 1, 3, 2, 2, 4, 1]]
  lm3, t3, _ = build_ngram(text, 3, vocab_size=5)
  lm2, t2, _ = build_ngram(text, 2, vocab_size=5)
  for x in range(5):
    for w in range(5):
      p3 = ngram_logp(lm3, t3, [-1, x], w)
      assert math.isclose(p3, ngram_logp(lm2, t2, [x], w), rel_tol=1e-5), (x, w)
      assert math.isclose(math.exp(p3), exact_prob(t3, lm3, [-1, x], w), rel_tol=1e-5), (x, w)


def test_forest_draft_is_independent_chains():
  d = forest_draft(jnp.asarray([[[5, 6, 7], [5, 8, 9]]], jnp.int32))
  assert d.tokens_BxN.tolist() == [[5, 6, 7, 5, 8, 9]]
  assert d.parent_BxN.tolist() == [[-1, 0, 1, -1, 3, 4]]
  assert d.depth_BxN.tolist() == [[1, 2, 3, 1, 2, 3]]
  want = np.zeros((6, 6), bool)
  for j in (0, 3):
    for a in range(3):
      want[j + a, j:j + a + 1] = True
  assert np.array_equal(np.asarray(d.mask_BxNxN[0]), want)


@pytest.fixture(scope="module")
def setup(tiny):
  model, params = tiny
  bpd, p = random_heads(tiny, 3)
  greedy = generate(model, params, PROMPTS, max_new_tokens=NEW)
  # An n-gram LM of the model's own greedy text: it knows what the target will say.
  lm, tables, _ = build_ngram(greedy.tokens, 3, model.vocab_size)
  ng = {k: jnp.asarray(v) for k, v in tables.items()}
  return model, params, bpd, bpd_draft_params(model, params, bpd, p), greedy, lm, ng


def _reference(greedy, extra=8):
  return np.array([t + [-1] * (NEW + extra - len(t)) for t in greedy.tokens], np.int32)


def _run(setup, drafter, **dp):
  model, params, _, bdp, *_ = setup
  return generate(model, params, PROMPTS, max_new_tokens=NEW, drafter=drafter,
                  draft_params=lattice_draft_params(bdp, **dp))


# ngram with one beam is slow: the n-gram scores are checked with beams of 3 and 2, the one-beam chain with the others
@pytest.mark.parametrize("rescorer,beams,keep_raw", [("none", 1, False), ("none", 3, False),
                                                     pytest.param("ngram", 1, False, marks=pytest.mark.slow),
                                                     ("ngram", 3, False), ("ngram", 2, True), ("neural", 1, False),
                                                     ("oracle", 1, False)])
def test_rescored_bpd_equals_greedy(setup, rescorer, beams, keep_raw):
  model, params, bpd, _, greedy, lm, ng = setup
  kw = {}
  lm_drafter = None
  if rescorer == "ngram":
    kw = dict(weight=0.5, ngram=ng)
  elif rescorer == "neural":
    draft, draft_params = layerskip_draft(model, params, 1)
    lm_drafter = DraftModelDrafter(draft, bpd.num_heads)
    kw = dict(weight=0.5, lm=draft_params)
  elif rescorer == "oracle":
    kw = dict(reference_BxR=_reference(greedy))
  drafter = LatticeDrafter(bpd, rescorer, top_t=4, beams=beams, keep_raw=keep_raw,
                           ngram=lm if rescorer == "ngram" else None, lm=lm_drafter)
  res = _run(setup, drafter, **kw)
  assert res.tokens == greedy.tokens
  assert res.accept_hist[:, 2:].sum() > 0  # some drafts were accepted
  st = res.drafter_stats
  assert int(st["proposals"]) == sum(res.active_calls)
  assert np.all(st["head_entropy_K"] > 0) and np.all(st["head_top1_K"] > 0)  # recorded for every head
  if rescorer == "neural":
    assert res.drafter_calls == bpd.num_heads * res.target_calls


def test_unrescored_lattice_is_plain_bpd(setup):
  _, _, bpd, bdp, greedy, *_ = setup
  model, params = setup[:2]
  plain = generate(model, params, PROMPTS, max_new_tokens=NEW, drafter=BPDDrafter(bpd), draft_params=bdp)
  for drafter, kw in [(LatticeDrafter(bpd, "none", top_t=4), {}),
                      (LatticeDrafter(bpd, "ngram", top_t=4, ngram=setup[5]), dict(weight=0.0, ngram=setup[6])),
                      (LatticeDrafter(bpd, "oracle", top_t=1), dict(reference_BxR=_reference(greedy)))]:
    res = _run(setup, drafter, **kw)
    assert np.array_equal(res.accept_hist, plain.accept_hist), drafter.rescorer


def test_oracle_over_the_whole_vocabulary_accepts_every_draft(setup):
  model, _, bpd, _, greedy, *_ = setup
  k = bpd.num_heads
  res = _run(setup, LatticeDrafter(bpd, "oracle", top_t=model.vocab_size), reference_BxR=_reference(greedy))
  # Every step but a row's last commits k + 1 tokens: the greedy token is always somewhere in a full lattice.
  assert np.all(res.accept_hist[:, k + 1] >= np.asarray(res.active_calls) - 1)
  assert res.tau > k


def test_a_knowing_ngram_lm_lengthens_accepted_blocks(setup):
  _, _, bpd, _, greedy, lm, ng = setup
  plain = _run(setup, LatticeDrafter(bpd, "none", top_t=8))
  rescored = _run(setup, LatticeDrafter(bpd, "ngram", top_t=8, ngram=lm), weight=0.7, ngram=ng)
  oracle = _run(setup, LatticeDrafter(bpd, "oracle", top_t=8), reference_BxR=_reference(greedy))
  assert rescored.tau > plain.tau * 1.2, (rescored.tau, plain.tau)
  assert oracle.tau >= plain.tau


def test_bad_lattice_settings_are_clear_errors(setup):
  bpd = setup[2]
  with pytest.raises(InputError, match="rescorer"):
    LatticeDrafter(bpd, "magic")
  with pytest.raises(InputError, match="beams"):
    LatticeDrafter(bpd, "none", top_t=2, beams=3)
  with pytest.raises(InputError, match="beams=1"):
    LatticeDrafter(bpd, "oracle", beams=2)
  with pytest.raises(InputError, match="keep_raw"):
    LatticeDrafter(bpd, "none", keep_raw=True)
  with pytest.raises(InputError, match="n-gram"):
    LatticeDrafter(bpd, "ngram")
  with pytest.raises(InputError, match="gamma equal to the number of heads"):
    LatticeDrafter(bpd, "neural", lm=DraftModelDrafter(setup[0], bpd.num_heads + 1))
  assert LatticeDrafter(bpd, "none", top_t=2, beams=2).beams == 2  # as many beams as candidates is fine
  with pytest.raises(InputError, match="search width"):
    LatticeDrafter(bpd, "none", top_t=4, beams=3, width=2)
  model = setup[0]  # a lattice wider than the heads' vocabulary: before, a top_k shape error while compiling
  v = model.vocab_size
  with pytest.raises(InputError, match=f"t={v + 1} candidates per column are more than the {v} tokens"):
    _run(setup, LatticeDrafter(bpd, "none", top_t=model.vocab_size + 1))


@pytest.mark.slow  # about a minute of tiny-model compiles per case; run before resolving
@pytest.mark.parametrize("neural_lm", ["layerskip", "draft folder"])
def test_rescore_task_builds_the_ngram_and_tunes_the_weights(tiny, tmp_path, neural_lm):
  from jaxspec.decoding.speculative import layerskip_draft
  from jaxspec.models.draft import save_draft
  from training.rescore import RescoreConfig, TuneSection, train_rescore

  model, params = tiny
  bpd, p = random_heads(tiny, 3)
  save_bpd(tmp_path / "heads", bpd, p)
  neural_draft = "layerskip"
  if neural_lm == "draft folder":  # a distilled-draft folder sharing the target's embedding, as the shipped one
    neural_draft = str(tmp_path / "draft")
    save_draft(neural_draft, *layerskip_draft(model, params, 1), dtype="float32")
  data = tiny_train_config(tmp_path).data
  cfg = RescoreConfig(out=str(tmp_path / "rescore"), heads=str(tmp_path / "heads"),
                      data=dataclasses.replace(data, eval_fraction=0.1),
                      tune=TuneSection(k=3, top_t=4, beams=2, weights=(0.0, 0.5), neural_draft=neural_draft,
                                       neural_layers=1, neural_weights=(0.0, 0.5), max_new_tokens=24, batch_size=8))
  summary = train_rescore(cfg, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)
  lm, tables, saved = load_ngram(tmp_path / "rescore")
  tuned = saved["tuned"]
  assert lm.order == 4 and summary["held_out_prompts"] == 4 and summary["sequences"] == 36
  assert [r["weight"] for r in tuned["ngram_tuning"]] == [0.0, 0.5]
  assert tuned["ngram_weight"] == max(tuned["ngram_tuning"], key=lambda r: r["tau"])["weight"]
  assert tuned["neural_weight"] == max(tuned["neural_tuning"], key=lambda r: r["tau"])["weight"]
  # a folder is recorded whole, so bpd-neural finds it from any working directory; so are the heads
  assert tuned["neural_lm"] == ("layerskip:1" if neural_lm == "layerskip" else str(Path(neural_draft).resolve()))
  assert tuned.get("neural_layers") == (1 if neural_lm == "layerskip" else None)  # only where they chose the LM
  assert tuned["heads"] == str((tmp_path / "heads").resolve())
  # A rerun (after a kill, or with a weight added) reuses what the log holds: the same rows, timings included.
  log = tmp_path / "data" / "rescore_tuning.jsonl"
  assert cfg.data.dataset_dir == str(tmp_path / "data") and log.is_file()
  more = dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, weights=(0.0, 0.5, 0.3)))
  again = train_rescore(more, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)["tuned"]
  assert again["ngram_tuning"][:2] == tuned["ngram_tuning"] and again["neural_tuning"] == tuned["neural_tuning"]
  assert [r["weight"] for r in again["ngram_tuning"]] == [0.0, 0.5, 0.3]


def test_the_rescore_tuning_log_is_keyed_by_the_neural_draft_and_the_target(tmp_path):
  """The tuning log is reused by a rerun with the same key: a neural draft retrained in place, or another target's
  weights under one path, kept the old figures (found by an audit)."""
  from training.rescore import RescoreConfig, _tune_key

  cfg = RescoreConfig(out=str(tmp_path / "r"), heads=str(tmp_path / "heads"))
  (tmp_path / "heads").mkdir()
  (tmp_path / "heads" / "heads.safetensors").write_bytes(b"heads")
  (tmp_path / "draft").mkdir()
  (tmp_path / "draft" / "model.safetensors").write_bytes(b"draft 1")
  key = lambda target="bf16-crc32:1": _tune_key(cfg, [[1, 2]], tmp_path / "heads", target, tmp_path / "draft")
  first = key()
  assert key() == first and key("bf16-crc32:2") != first
  (tmp_path / "draft" / "model.safetensors").write_bytes(b"draft 2")  # retrained in place
  assert key() != first


def test_the_rescore_task_checks_its_heads_and_neural_lm_before_building_data(tiny, tmp_path, monkeypatch):
  """Heads or a neural LM that do not fit the target fail with the config key to change before the data and the
  n-gram LM are built (minutes to an hour), not as a traceback after the n-gram tuning."""
  import training.rescore as rescore
  from jaxspec.models.bpd import BPDConfig, BPDModel
  from training.config import ConfigError
  from training.rescore import RescoreConfig, TuneSection, train_rescore

  model, params = tiny
  monkeypatch.setattr(rescore, "build_sequences", lambda *a, **k: pytest.fail("built the data first"))
  wide = BPDModel(BPDConfig(num_heads=3, d_model=64, d_hidden=8))
  save_bpd(tmp_path / "wide", wide, wide.init_params(jax.random.key(0)))
  bpd, p = random_heads(tiny, 3)
  save_bpd(tmp_path / "heads", bpd, p)
  data = tiny_train_config(tmp_path).data
  cases = [(dict(heads=str(tmp_path / "wide")), "heads: these BPD heads read hidden states of width 64.* Set heads= "),
           (dict(heads=None), r"heads \(null: the shipped jaxspec/assets/bpd_smollm2, for the default model\): "),
           (dict(heads=str(tmp_path / "heads"), tune=TuneSection(k=3, neural_draft=str(tmp_path / "no_draft"))),
            "tune.neural_draft: .*no_draft.* Set tune.neural_draft to a draft trained for this model"),
           (dict(heads=str(tmp_path / "heads"), tune=TuneSection(k=3)),
            r"tune.neural_draft \(null: the shipped jaxspec/assets/draft_smollm2, for the default model\): "),
           (dict(heads=str(tmp_path / "heads"), tune=TuneSection(k=5)), "tune.k=5 asks for 5 heads; the heads in .* "
            "have 3: lower tune.k"),
           (dict(heads=str(tmp_path / "heads"), tune=TuneSection(k=3, neural_draft="layerskip", neural_layers=9)),
            "tune.neural_layers: A layer-skip draft keeps 1 to 1 of the target's 2 layers")]
  for fields, message in cases:
    cfg = RescoreConfig(out=str(tmp_path / "rescore"), data=data, **{"tune": TuneSection(k=3), **fields})
    with pytest.raises(ConfigError, match=message):
      train_rescore(cfg, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)


def test_rescore_configs_with_impossible_search_settings_fail_when_loaded():
  """beams outside 1..top_t, or a search narrower than the drafts it keeps, are refused with the key to change."""
  from training.config import ConfigError
  from training.rescore import load_rescore_config
  assert load_rescore_config(CONFIGS / "bpd_rescore_smollm2.yaml", ["tune.width=4096"]).tune.width == 4096
  for overrides, message in ((["tune.width=4"], r"'tune': width .* at least beams \(8\), got 4"),
                             (["tune.beams=32"], r"'tune': beams must be in 1..top_t \(16\), got 32")):
    with pytest.raises(ConfigError, match=message):
      load_rescore_config(CONFIGS / "bpd_rescore_smollm2.yaml", overrides)


def test_the_tuning_log_keeps_finished_weights_of_its_own_key(tmp_path):
  from training.rescore import TuneLog
  path = tmp_path / "tuning.jsonl"
  log = TuneLog(path, "a")
  log.put("greedy", [[1, 2]])
  log.put("tune", {"weight": 0.5, "tau": 1.5}, 0.5)
  TuneLog(path, "b").put("tune", {"weight": 0.5, "tau": 9.0}, 0.5)  # another run's settings
  with open(path, "a") as f:
    f.write('{"key": "a", "what": "tune", "wei')  # a line a kill cut short
  back = TuneLog(path, "a")
  assert back.get("greedy") == [[1, 2]] and back.get("tune", 0.5) == {"weight": 0.5, "tau": 1.5}
  assert back.get("tune", 0.3) is None and TuneLog(path, "b").get("tune", 0.5)["tau"] == 9.0
  back.put("tune", {"weight": 0.3, "tau": 1.2}, 0.3)  # after the cut line, not glued to it
  assert TuneLog(path, "a").get("tune", 0.3) == {"weight": 0.3, "tau": 1.2}


@pytest.mark.slow  # 75 s; the default run keeps the default-model checks of bpd, jacobi and lookup
def test_shipped_rescorers_equal_greedy_on_default_model(default_model):
  from jaxspec.bench.methods import METHODS, BenchContext

  model, params, tok = default_model
  ctx = BenchContext(model, params, tok)
  prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]))
             for q in ("Name three rivers in Europe.", "Explain what a prime number is.")]
  greedy = METHODS["greedy"].build(ctx, {})(prompts, 32, 0)
  for name in ("bpd-ngram", "bpd-neural"):
    res = METHODS[name].build(ctx, {})(prompts, 32, 0)
    assert res.tokens == greedy.tokens, name
    assert res.target_calls < greedy.target_calls, name


def test_updates_read_the_hidden_state_and_the_tokens_of_the_accepted_path(tiny):
  """After a verify step, heads read the hidden state of the last committed block position (for a tree, the node at
  the end of the accepted path, not its depth), and the n-gram rescorer's history is the last h committed tokens.
  Wrong indices here keep the output exact and only lose drafts, which no end-to-end test saw (an audit's mutants)."""
  from jaxspec.decoding.opt_tree import HeadsTreeSource
  from jaxspec.decoding.lattice import LatticeState
  from jaxspec.decoding.protocol import Acceptance, Verified

  bpd, _ = random_heads(tiny, 3)
  B, T, D = 2, 6, 2
  hidden = jnp.asarray(np.arange(B * T)[:, None].repeat(D, 1).reshape(B, T, D), jnp.float32)  # [b, t] = b * T + t
  emitted = jnp.asarray([[50, 51, 52, 0, 0, 0], [60, 61, 0, 0, 0, 0]], jnp.int32)

  def verified(path, n_commit, active=(True, True)):
    acc = Acceptance(emitted_BxT=emitted, path_BxT=jnp.asarray(path, jnp.int32),
                     n_commit_B=jnp.asarray(n_commit, jnp.int32), is_prefix=False)
    return Verified(draft=None, logits_BxTxV=jnp.zeros((B, T, 1)), hidden_BxTxD=hidden, acceptance=acc,
                    active_B=jnp.asarray(active))

  old = jnp.full((B, D), -1.0)
  chain = verified([[0, 1, 2, 3, 4, 5]] * 2, [3, 2])
  assert BPDDrafter(bpd).update(None, old, chain)[:, 0].tolist() == [2, T + 1]
  tree = verified([[0, 3, 5, 0, 0, 0], [0, 4, 0, 0, 0, 0]], [3, 2], active=(True, False))
  assert HeadsTreeSource(bpd).update(None, old, None, tree)[:, 0].tolist() == [5, -1]  # an ended row keeps its own
  lm, _, _ = build_ngram([[1, 2, 3, 1, 2, 4]], 4, 64)
  drafter = LatticeDrafter(bpd, "ngram", top_t=4, ngram=lm)
  zeros = jnp.zeros((B,), jnp.float32)
  state = LatticeState(hidden_BxD=old, hist_BxH=jnp.asarray([[7, 8, 9], [17, 18, 19]], jnp.int32),
                       pending_B=jnp.asarray([10, 20], jnp.int32), lm=(), entropy_K=zeros, top1_K=zeros,
                       proposals=zeros, raw_repeats=zeros, draft_repeats=zeros)
  new = drafter.update(None, state, verified([[0, 3, 5, 0, 0, 0], [0, 4, 0, 0, 0, 0]], [3, 2]))
  assert new.hidden_BxD[:, 0].tolist() == [5, T + 4]
  # committed: pending 10, then 50, 51 (52 is the new pending); pending 20, then 60 (61 pending)
  assert new.hist_BxH.tolist() == [[10, 50, 51], [19, 20, 60]]
  # A row that has ended keeps its state.
  new = drafter.update(None, state, verified([[0, 3, 5, 0, 0, 0], [0, 4, 0, 0, 0, 0]], [3, 2], active=(True, False)))
  assert new.hidden_BxD[:, 0].tolist() == [5, -1] and new.hist_BxH.tolist() == [[10, 50, 51], [17, 18, 19]]


# --- The drafter's parts on hand-made lattices ----------------------------------------------------------------------
# Rescoring, the oracle, keep_raw and the statistics only change which drafts are verified (the output stays greedy
# decoding's), so the end-to-end tests above cannot see most of their mistakes; these check them against values
# worked out by hand or by brute force.


def _fake_loop(pending, active, n_out=None):
  import types
  b = len(pending)
  return types.SimpleNamespace(pending_B=jnp.asarray(pending, jnp.int32), active_B=jnp.asarray(active),
                               n_out_B=jnp.asarray(n_out if n_out is not None else [1] * b, jnp.int32))


def _state(hist, pending, k):
  from jaxspec.decoding.lattice import LatticeState
  b = len(pending)
  z_K, zero = jnp.zeros((k,), jnp.float32), jnp.int32(0)
  return LatticeState(hidden_BxD=jnp.zeros((b, 4), jnp.float32), hist_BxH=jnp.asarray(hist, jnp.int32),
                      pending_B=jnp.asarray(pending, jnp.int32), lm=(), entropy_K=z_K, top1_K=z_K, proposals=zero,
                      raw_repeats=zero, draft_repeats=zero)


# Row 0's heads over 8 tokens: column 0 prefers 5 (0.5) to 7 (0.4), column 1 is sure of 5 (0.7), column 2 of 6 (0.8),
# so the raw draft is [5, 5, 6] and the second-best path swaps column 0's token (0.4 / 0.5 beats 0.1 / 0.7 and
# 0.1 / 0.8): [7, 5, 6]. Row 1 is uniform. Unlisted tokens share what is left of each column.
HAND_PROBS = [[{5: 0.5, 7: 0.4, 3: 0.06}, {5: 0.7, 2: 0.1, 4: 0.09}, {6: 0.8, 1: 0.1, 0: 0.05}],
              [{}, {}, {}]]


def _hand_probs():
  p = np.zeros((2, 3, 8))
  for b, row in enumerate(HAND_PROBS):
    for i, col in enumerate(row):
      rest = [t for t in range(8) if t not in col]
      p[b, i, rest] = (1.0 - sum(col.values())) / len(rest)
      for t, q in col.items():
        p[b, i, t] = q
  return p


@dataclasses.dataclass(frozen=True)
class HandLattice(LatticeDrafter):
  """The lattice of `HAND_PROBS` in place of the heads'."""

  def lattice(self, draft_params, dstate, pending_B):
    logp = jnp.asarray(np.log(_hand_probs()), jnp.float32)
    val, idx = jax.lax.top_k(logp, self.top_t)
    return idx.astype(jnp.int32), val, logp


def test_drafts_and_statistics_of_a_hand_made_lattice(setup):
  bpd = setup[2]
  p = _hand_probs()
  pending, active = [5, 3], [True, False]
  loop = _fake_loop(pending, active)

  def propose(drafter, dp=None):
    draft, state = drafter.propose(dp or {}, _state([[1], [1]], [0, 0], 3), loop)
    return np.asarray(draft.tokens_BxN[0]).reshape(drafter.beams, 3).tolist(), state

  # The p best paths by head probability; keep_raw puts the raw draft last.
  chains, state = propose(HandLattice(bpd, "none", top_t=3, beams=2))
  assert chains == [[5, 5, 6], [7, 5, 6]]
  assert propose(HandLattice(bpd, "none", top_t=3, beams=3, keep_raw=True))[0] == [[5, 5, 6], [7, 5, 6], [5, 5, 6]]
  # Statistics of the active row only: its heads' entropies and top-1 probabilities, and adjacent equal tokens in
  # [pending, raw draft] and [pending, first draft]: 5 5 5 6 has two.
  np.testing.assert_allclose(state.entropy_K, -np.sum(p[0] * np.log(p[0]), axis=-1), rtol=1e-5)
  np.testing.assert_allclose(state.top1_K, [0.5, 0.7, 0.8], rtol=1e-5)
  assert (int(state.proposals), int(state.raw_repeats), int(state.draft_repeats)) == (1, 2, 2)
  assert state.pending_B.tolist() == pending  # what update() reads as the last committed token
  # A first draft other than the raw one: the oracle drafts the reference's tokens where the lattice holds them
  # (the top 3 of each column) and the raw token elsewhere. The row has 1 output token: the draft is refs 1..3.
  ref = np.full((2, 8), -1, np.int32)
  ref[0, :4] = [5, 7, 9, 1]  # 7 is column 0's rank 2, 9 is not in column 1, 1 is column 2's rank 2
  chains, state = propose(HandLattice(bpd, "oracle", top_t=3), {"reference_BxR": jnp.asarray(ref)})
  assert chains == [[7, 5, 1]]
  assert (int(state.raw_repeats), int(state.draft_repeats)) == (2, 0)
  assert propose(HandLattice(bpd, "oracle", top_t=3), {"reference_BxR": jnp.asarray(-ref - 2)})[0] == [[5, 5, 6]]


def test_the_beam_search_keeps_the_best_lattice_paths():
  """The rescorer's beam search, column by column, keeps the p best partial paths by (1 - w) * head + w * n-gram
  log-probability, the n-gram reading the history, the pending token and the path before each column (a plain
  beam search is the reference); scored by the heads alone its beams are exactly the p best of all t^k paths."""
  rng = np.random.default_rng(7)
  v, k, t, p, w = 16, 3, 4, 3, 0.6
  lm, tables, _ = build_ngram([rng.integers(0, 12, 60).tolist() for _ in range(20)], 3, v)
  ng = {key: jnp.asarray(x) for key, x in tables.items()}
  drafter = LatticeDrafter(None, "ngram", top_t=t, beams=p, ngram=lm)
  hist, pending = [[3, 4], [-1, 9]], [5, 2]  # h = order - 1 = 2 tokens of history; row 1's text starts at 9
  cand = np.stack([np.stack([rng.permutation(12)[:t] for _ in range(k)]) for _ in range(2)])
  logp = np.log(rng.dirichlet(np.ones(t), size=(2, k)))

  def beams(use_ngram):
    got = drafter._beam({"weight": jnp.float32(w), "ngram": ng}, _state(hist, pending, k), jnp.asarray(pending),
                        jnp.asarray(cand, jnp.int32), jnp.asarray(logp, jnp.float32), use_ngram=use_ngram)
    return [[tuple(x) for x in row] for row in np.asarray(got).tolist()]

  got = beams(True)
  for b in range(2):
    kept = [((), 0.0)]
    for i in range(k):
      kept = sorted(((path + (int(x),), s + (1 - w) * logp[b, i, c]
                      + w * math.log(exact_prob(tables, lm, hist[b] + [pending[b]] + list(path), int(x))))
                     for path, s in kept for c, x in enumerate(cand[b, i])), key=lambda e: e[1], reverse=True)[:p]
    assert got[b] == [path for path, _ in kept], b
  got = beams(False)
  for b in range(2):
    score = {tuple(int(cand[b, i, c]) for i, c in enumerate(ch)): sum(logp[b, i, c] for i, c in enumerate(ch))
             for ch in np.ndindex(*(t,) * k)}
    assert got[b] == sorted(score, key=score.get, reverse=True)[:p], b
  # a search as wide as a column's t^(k-1) prefixes is exhaustive: the exact p best of all t^k paths (Kim et al.)
  exact = []
  for b in range(2):
    score = {}
    for ch in np.ndindex(*(t,) * k):
      path = tuple(int(cand[b, i, c]) for i, c in enumerate(ch))
      score[path] = sum((1 - w) * logp[b, i, c] + w * math.log(exact_prob(
          tables, lm, hist[b] + [pending[b]] + list(path[:i]), path[i])) for i, c in enumerate(ch))
    exact.append(sorted(score, key=score.get, reverse=True)[:p])
  for width in (t ** (k - 1), 10 * t ** k):
    drafter = LatticeDrafter(None, "ngram", top_t=t, beams=p, width=width, ngram=lm)
    assert beams(True) == exact
  assert got != exact  # a beam of p loses some of them here, so the wide search is what finds them


def test_init_history_is_the_prompts_last_tokens(setup):
  """The n-gram rescorer's history starts as the prompt's last order - 1 tokens (-1 before the text)."""
  from jaxspec.decoding.protocol import PrefillInfo
  bpd, lm = setup[2], build_ngram([[1, 2, 3]], 3, 8)[0]
  prefill = PrefillInfo(jnp.asarray([[5, 6, 7, 0], [9, 0, 0, 0], [4, 8, 0, 0]], jnp.int32), jnp.asarray([3, 1, 2]),
                        jnp.zeros((3, 4)), jnp.zeros((3, 8)), jnp.asarray([11, 12, 13]), capacity=16)
  state = LatticeDrafter(bpd, "ngram", top_t=2, ngram=lm).init({}, prefill)
  assert state.hist_BxH.tolist() == [[6, 7], [-1, 9], [4, 8]] and state.pending_B.tolist() == [11, 12, 13]


def test_a_neural_lm_that_is_the_target_drafts_its_greedy_continuation(setup):
  """With weight 1 the neural rescorer picks, column by column, the LM's favourite among the lattice's candidates;
  with every token a candidate and the target as the LM, that is the greedy continuation: every draft is accepted,
  as with the oracle."""
  model, params, bpd, _, greedy, *_ = setup
  k = bpd.num_heads
  drafter = LatticeDrafter(bpd, "neural", top_t=model.vocab_size, lm=DraftModelDrafter(model, k))
  res = _run(setup, drafter, weight=1.0, lm=params)
  assert res.tokens == greedy.tokens
  assert np.all(res.accept_hist[:, k + 1] >= np.asarray(res.active_calls) - 1) and res.tau > k


def test_heads_over_a_vocabulary_subset_draft_token_ids(setup):
  """Heads trained on a subset of the vocabulary score indices into it: the lattice maps them to token ids, so the
  unrescored lattice drafts what plain BPD drafts (an unmapped index would be another token, rarely accepted)."""
  from jaxspec.models.bpd import BPDConfig, BPDModel
  model, params, _, _, greedy, *_ = setup
  # The subset holds the greedy output's tokens (so drafts can be accepted) and others, shuffled: index != id.
  rng = np.random.default_rng(0)
  used = sorted({t for row in greedy.tokens for t in row})
  ids = rng.permutation(used + [t for t in rng.permutation(model.vocab_size).tolist() if t not in used][:64])
  bpd = BPDModel(BPDConfig(num_heads=3, d_model=model.cfg.d_model, d_hidden=16, vocab_subset=len(ids)))
  hp = bpd.init_params(jax.random.key(1), vocab_ids=ids)
  hp["heads"]["w_out"] = jax.random.normal(jax.random.key(2), hp["heads"]["w_out"].shape) * 0.5
  dp = bpd_draft_params(model, params, bpd, hp)
  plain = generate(model, params, PROMPTS, max_new_tokens=NEW, drafter=BPDDrafter(bpd), draft_params=dp)
  res = generate(model, params, PROMPTS, max_new_tokens=NEW, drafter=LatticeDrafter(bpd, "none", top_t=4),
                 draft_params=lattice_draft_params(dp))
  assert res.tokens == greedy.tokens and plain.accept_hist[:, 2:].sum() > 0
  np.testing.assert_array_equal(res.accept_hist, plain.accept_hist)


def test_the_rescorer_splits_its_prompts_as_the_heads_were_split(tmp_path):
  """Its weights are tuned on held-out prompts: another split seed or fraction than the heads' would tune on prompts
  the heads were trained on, silently (found by a review). The shipped heads and config agree."""
  import json

  from jaxspec.bench.methods import DEFAULT_BPD_HEADS
  from training.config import ConfigError
  from training.rescore import _check_split, load_rescore_config

  root = Path(__file__).resolve().parents[1]
  cfg = load_rescore_config(str(root / "configs/bpd_rescore_smollm2.yaml"))
  _check_split(cfg, DEFAULT_BPD_HEADS)
  with pytest.raises(ConfigError, match=r"trained with train.seed=0 and data.eval_fraction=0.05, this run splits "
                                        r"with split_seed=1 .*Set split_seed=0 data.eval_fraction=0.05"):
    _check_split(dataclasses.replace(cfg, split_seed=1), DEFAULT_BPD_HEADS)
  (tmp_path / "config.json").write_text(json.dumps({"bpd": {}}))  # heads saved by hand: nothing recorded
  _check_split(dataclasses.replace(cfg, split_seed=1), tmp_path)


# ---- OPT-Tree over the rescored lattice --------------------------------------------------------------------------

def _rescored_tree(bpd, lm, n, depth, t, **kw):
  from jaxspec.decoding.lattice import NgramHeadsTreeSource
  from jaxspec.decoding.opt_tree import OptTreeDrafter
  return OptTreeDrafter(NgramHeadsTreeSource(bpd, lm, top_t=t, width=n), nodes=n, depth=depth, width=n, branch=n,
                        **kw)


# The second holds depth-3 nodes, whose context is read through the ancestors kept in the frontiers' paths (an audit's
# mutants survived the first alone); the first is slow: the second checks the same paths, E[A] and gate on a larger
# tree.
@pytest.mark.parametrize("t,n,depth", [pytest.param(4, 7, 3, marks=pytest.mark.slow), (3, 16, 3)])
def test_a_tree_of_rescored_heads_holds_the_best_paths_by_interpolated_score(setup, t, n, depth):
  """One propose of the tree over n-gram-rescored heads (frontier as wide as the budget) holds exactly the N best
  paths of the top-t lattice, each path scored by sum over its tokens of (1 - w) * head log-prob + w * n-gram log-prob
  given the history, the pending token and the path before it (brute force over every path up to the depth): so
  each node reads its own path's context, not its depth's or a sibling's."""
  from jaxspec.decoding.bpd import BPDDrafter
  from jaxspec.decoding.protocol import PrefillInfo
  from tests.test_opt_tree import fake_loop

  model, params, bpd, dp, _, _, _ = setup
  rng = np.random.default_rng(5)
  w = 0.6
  prompts, pending = [[3, 17, 25], [9, 9, 30]], [12, 30]
  hidden = jnp.asarray(rng.normal(size=(2, model.cfg.d_model)), jnp.float32)
  logits = np.asarray(BPDDrafter(bpd).head_logits(dp, hidden, jnp.asarray(pending, jnp.int32)), np.float64)
  # The n-gram LM is counted on text over the lattice's own tokens and the contexts': over other tokens its scores
  # are one unseen-token estimate whatever the context, blind to a node reading the wrong one (an audit's mutants).
  alphabet = sorted({int(x) for x in np.argsort(-logits, axis=-1)[:, :depth, :t].ravel()} | {3, 9, 12, 17, 25, 30})
  lm, tables, _ = build_ngram([rng.choice(alphabet, 80).tolist() for _ in range(30)], 3, model.vocab_size)
  drafter = _rescored_tree(bpd, lm, n, depth, t)
  tdp = lattice_draft_params(dp, weight=w, ngram={k: jnp.asarray(v) for k, v in tables.items()})
  prefill = PrefillInfo(jnp.asarray(prompts, jnp.int32), jnp.asarray([3, 3]), hidden, jnp.zeros((2, model.vocab_size)),
                        jnp.asarray(pending, jnp.int32), capacity=16)
  draft, dstate = jax.jit(lambda p, s: drafter.propose(p, s, fake_loop(pending)))(tdp, drafter.init(tdp, prefill))
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  value = 0.0
  for b in range(2):
    cands = [np.argsort(-logp[b, i])[:t] for i in range(depth)]
    score = {}
    for d in range(1, depth + 1):
      for ch in np.ndindex(*(t,) * d):
        path = tuple(int(cands[i][c]) for i, c in enumerate(ch))
        score[path] = sum((1 - w) * logp[b, i, path[i]] + w * math.log(exact_prob(
            tables, lm, prompts[b] + [pending[b]] + list(path[:i]), path[i])) for i in range(d))
    want = set(sorted(score, key=lambda p: score[p] - 1e-3 * len(p), reverse=True)[:n])
    toks, parents = np.asarray(draft.tokens_BxN[b]).tolist(), np.asarray(draft.parent_BxN[b]).tolist()
    got = set()
    for i in range(n):
      path, j = [], i
      while j >= 0:
        path.insert(0, toks[j])
        j = parents[j]
      got.add(tuple(path))
    assert got == want, b
    assert n < 16 or max(map(len, got)) == 3, got  # the larger tree holds nodes whose context is an ancestor's
    value += sum(math.exp(sum(logp[b, i, tok] for i, tok in enumerate(path))) for path in got)
  # The tree's E[A] (what nodes=auto and a gate read) is the chosen paths' probability under the heads, not their
  # scores (it was: the n-gram term pulled it far below what trees accept, so both had to be refused).
  np.testing.assert_allclose(float(drafter.stats(dstate)["expected_accept_DxN"][depth - 1, n - 1]), value, rtol=1e-4)
  # A gate reads the same E[A]: the rows' mean (a little under it verifies the trees, a little over it does not).
  for gate, verifies in ((0.99 * value / 2, True), (1.01 * value / 2, False)):
    gated = _rescored_tree(bpd, lm, n, depth, t, gate=gate)
    draft = jax.jit(lambda p, s: gated.propose(p, s, fake_loop(pending))[0])(tdp, gated.init(tdp, prefill))
    assert np.asarray(draft.verify_B).tolist() == [verifies] * 2, gate


def test_rescored_trees_equal_greedy_and_accept_more(setup):
  """Trees over heads rescored by an n-gram LM of the target's own text give greedy decoding's tokens and accept
  more than the heads' own trees of the same budget; at weight 0 with the whole vocabulary as candidates they are
  the heads' own trees (the same steps). Greedy only: a sampling rule is refused."""
  from jaxspec.decoding.opt_tree import HeadsTreeSource, OptTreeDrafter

  model, params, bpd, dp, greedy, lm, ng = setup
  plain = generate(model, params, PROMPTS, max_new_tokens=NEW, drafter=OptTreeDrafter(
      HeadsTreeSource(bpd), nodes=8, depth=3, width=8, branch=8), draft_params=dp)
  rescored = generate(model, params, PROMPTS, max_new_tokens=NEW, drafter=_rescored_tree(bpd, lm, 8, 3, 8),
                      draft_params=lattice_draft_params(dp, weight=0.7, ngram=ng))
  assert plain.tokens == rescored.tokens == greedy.tokens
  assert rescored.tau > plain.tau * 1.2, (rescored.tau, plain.tau)
  same = generate(model, params, PROMPTS, max_new_tokens=NEW, drafter=_rescored_tree(bpd, lm, 8, 3, model.vocab_size),
                  draft_params=lattice_draft_params(dp, weight=0.0, ngram=ng))
  assert same.tokens == greedy.tokens and same.target_calls == plain.target_calls
  np.testing.assert_array_equal(same.accept_hist, plain.accept_hist)
  with pytest.raises(InputError, match="greedy"):
    generate(model, params, PROMPTS, max_new_tokens=4, drafter=_rescored_tree(bpd, lm, 8, 3, 8),
             draft_params=lattice_draft_params(dp, weight=0.7, ngram=ng), temperature=1.0)
  with pytest.raises(InputError, match="share in 0..1"):  # past 1 a child could outscore its parent
    lattice_draft_params(dp, weight=1.5, ngram=ng)


def test_a_rescored_tree_reads_the_pending_token_and_advances_its_history(setup):
  """The tree source's n-gram history: `begin` keeps the step's pending token and `update` moves the last h committed
  tokens on (the old history, that pending token, then the accepted drafts; an ended row keeps its own). Wrong here,
  the output stays exact and only the drafts get worse, which the end-to-end tests did not see (an audit's mutants)."""
  from jaxspec.decoding.lattice import NgramHeadsTreeSource, RescoredTreeState
  from jaxspec.decoding.protocol import Acceptance, Verified
  from tests.test_opt_tree import fake_loop

  model, _, bpd, dp, _, lm, ng = setup  # a 3-gram LM: h = 2
  source = NgramHeadsTreeSource(bpd, lm, top_t=4, width=2)
  tdp = lattice_draft_params(dp, weight=0.5, ngram=ng)
  b, T = 2, 4
  state = RescoredTreeState(hidden_BxD=jnp.zeros((b, model.cfg.d_model), jnp.float32),
                            hist_BxH=jnp.asarray([[7, 8], [17, 18]], jnp.int32), pending_B=jnp.asarray([0, 0]))
  _, _, state = source.begin(tdp, state, fake_loop([10, 20]), lambda x: jax.nn.log_softmax(x, axis=-1))
  assert state.pending_B.tolist() == [10, 20]
  acc = Acceptance(emitted_BxT=jnp.asarray([[50, 51, 52, 0], [60, 61, 0, 0]], jnp.int32),
                   path_BxT=jnp.asarray([[0, 1, 2, 0], [0, 1, 0, 0]], jnp.int32), n_commit_B=jnp.asarray([3, 2]),
                   is_prefix=True)

  def update(active):
    return source.update(tdp, state, None, Verified(draft=None, logits_BxTxV=jnp.zeros((b, T, 1)),
                                                    hidden_BxTxD=jnp.zeros((b, T, model.cfg.d_model)),
                                                    acceptance=acc, active_B=jnp.asarray(active))).hist_BxH.tolist()

  # committed: 10, then 50, 51 (52 is the new pending); 20, then 60 (61 pending)
  assert update((True, True)) == [[50, 51], [20, 60]]
  assert update((True, False)) == [[50, 51], [17, 18]]


def test_rescored_tree_settings_are_clear_errors(setup):
  """The tree source refuses what would otherwise run silently wrong: no candidates or frontier, more candidates
  than the heads draft from (they were clamped to the heads' vocabulary), an n-gram LM of another vocabulary (its
  scores would read other tokens' counts)."""
  from jaxspec.decoding.lattice import NgramHeadsTreeSource

  model, _, bpd, dp, _, lm, ng = setup
  for kw in ({"top_t": 0}, {"width": 0}):
    with pytest.raises(InputError, match="Need top_t >= 1 and width >= 1"):
      NgramHeadsTreeSource(bpd, lm, **kw)
  v = model.vocab_size
  with pytest.raises(InputError, match=f"t={v + 1} candidates per column are more than the {v} tokens"):
    NgramHeadsTreeSource(bpd, lm, top_t=v + 1).check_draft_params(model, lattice_draft_params(dp, weight=0.5, ngram=ng))
  other, _, _ = build_ngram([[1, 2, 3, 1, 2]], 3, vocab_size=v + 4)
  with pytest.raises(InputError, match=f"counted over {v + 4} token ids and the target has {v}"):
    NgramHeadsTreeSource(bpd, other).check_target(model)


def test_a_static_rescored_tree_takes_no_child_past_the_top_t(setup):
  """A static tree ranks children by its prior, not by their scores; a rescored source scores only each node's top-t
  children (the rest -inf, their slots holding arbitrary tokens), and the prior ranked those slots too, so a tree
  with more children per node than t drafted such tokens (found by a review). Every node is now one of its depth's
  top-t head tokens, and the tree holds only the nodes there are: t^2 at depth 2 and t^3 at depth 3 here."""
  from jaxspec.decoding.bpd import BPDDrafter
  from jaxspec.decoding.lattice import NgramHeadsTreeSource
  from jaxspec.decoding.opt_tree import OptTreeDrafter, geometric_prior, static_draft_params
  from jaxspec.decoding.protocol import PrefillInfo
  from tests.test_opt_tree import fake_loop

  model, params, bpd, dp, _, lm, ng = setup
  t, n, depth = 2, 16, 3
  pending = [12, 30]
  hidden = jnp.asarray(np.random.default_rng(7).normal(size=(2, model.cfg.d_model)), jnp.float32)
  drafter = OptTreeDrafter(NgramHeadsTreeSource(bpd, lm, top_t=t, width=4), nodes=n, depth=depth, width=4, branch=4,
                           shape="static")
  tdp = static_draft_params(lattice_draft_params(dp, weight=0.5, ngram=ng), geometric_prior(depth, 16))
  prefill = PrefillInfo(jnp.asarray([[3, 17, 25], [9, 9, 30]], jnp.int32), jnp.asarray([3, 3]), hidden,
                        jnp.zeros((2, model.vocab_size)), jnp.asarray(pending, jnp.int32), capacity=16)
  draft, _ = jax.jit(lambda p, s: drafter.propose(p, s, fake_loop(pending)))(tdp, drafter.init(tdp, prefill))
  logits = np.asarray(BPDDrafter(bpd).head_logits(dp, hidden, jnp.asarray(pending, jnp.int32)))
  for b in range(2):
    top = [set(np.argsort(-logits[b, i])[:t].tolist()) for i in range(depth)]
    depths, toks = np.asarray(draft.depth_BxN[b]).tolist(), np.asarray(draft.tokens_BxN[b]).tolist()
    # (slots the tree leaves empty are drafted as depth-1 nodes without parents: only deeper nodes tell them apart)
    deeper = [(dd, tok) for dd, tok in zip(depths, toks) if dd > 1]
    assert all(tok in top[dd - 1] for dd, tok in deeper), (deeper, top)
    assert [sum(dd == x for dd, _ in deeper) for x in (2, 3)] == [4, 8], deeper
    assert top[0] <= {tok for dd, tok in zip(depths, toks) if dd == 1}
