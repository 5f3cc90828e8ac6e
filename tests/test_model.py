"""The model boundary: cached decoding, chains and trees against teacher-forced forwards."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fakes import tree_arrays
from jaxspec.models.llama import LlamaLM, stack_layers, tiny_config


def causal(t):
  return jnp.tril(jnp.ones((t, t), bool))


def full_forward(model, params, tokens_BxT):
  b, t = tokens_BxT.shape
  cache = model.init_cache(b, max(t, 8))
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  return model.forward(params, tokens_BxT, pos, cache, causal(t))[0]


@pytest.mark.parametrize("use_jit", [False, True])
def test_cached_one_token_steps_equal_teacher_forced(tiny, use_jit):
  model, params = tiny
  fwd = jax.jit(model.forward) if use_jit else model.forward
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, model.vocab_size)
  full = full_forward(model, params, tokens)
  cache = model.init_cache(2, 16)
  steps = []
  for i in range(12):
    pos = jnp.full((2, 1), i)
    logits, _, cache = fwd(params, tokens[:, i:i + 1], pos, cache, jnp.ones((1, 1), bool))
    cache = cache.advance(jnp.ones((2,), jnp.int32))
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_attention_bounded_to_the_filled_slots_is_unchanged(tiny, scan):
  model, params = tiny
  if scan:
    model, params = LlamaLM(tiny_config(scan_layers=True)), stack_layers(params, model.cfg.n_layers)
  tokens = jax.random.randint(jax.random.key(4), (2, 10), 0, model.vocab_size)
  cache = _prefilled(model, params, tokens[:, :6], capacity=64)
  chain, pos = tokens[:, 6:], 6 + jnp.broadcast_to(jnp.arange(4), (2, 4))
  want_logits, _, want_cache = model.forward(params, chain, pos, cache, causal(4))
  for slots in (6, 16):
    logits, _, got_cache = model.forward(params, chain, pos, cache, causal(4), attn_slots=slots)
    np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
      # The new entries still go to the full buffer (deeper layers' keys differ in rounding: shorter reductions).
      np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # Fewer slots than the committed ones drop context: the bound is real.
  short = model.forward(params, chain, pos, cache, causal(4), attn_slots=3)[0]
  assert np.abs(np.asarray(short) - np.asarray(want_logits)).max() > 1e-2
  # A prefill into an empty cache reads none of it.
  empty = model.init_cache(2, 64)
  prefill = model.forward(params, tokens, jnp.broadcast_to(jnp.arange(10), (2, 10)), empty, causal(10))
  skipped = model.forward(params, tokens, jnp.broadcast_to(jnp.arange(10), (2, 10)), empty, causal(10), attn_slots=0)
  np.testing.assert_allclose(skipped[0], prefill[0], atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="attn_slots=65"):
    model.forward(params, chain, pos, cache, causal(4), attn_slots=65)


def test_scan_layers_match_unrolled(tiny):
  model, params = tiny
  scanned = LlamaLM(tiny_config(scan_layers=True))
  tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, model.vocab_size)
  np.testing.assert_allclose(full_forward(scanned, stack_layers(params, model.cfg.n_layers), tokens),
                             full_forward(model, params, tokens), atol=1e-5, rtol=1e-5)


def _prefilled(model, params, prefix_BxP, capacity=32):
  b, p = prefix_BxP.shape
  cache = model.init_cache(b, capacity)
  _, _, cache = model.forward(params, prefix_BxP, jnp.broadcast_to(jnp.arange(p), (b, p)), cache, causal(p))
  return cache.advance(jnp.full((b,), p, jnp.int32))


def test_chain_in_one_forward_equals_one_token_forwards(tiny):
  model, params = tiny
  tokens = jax.random.randint(jax.random.key(3), (2, 11), 0, model.vocab_size)
  prefix, chain = tokens[:, :5], tokens[:, 5:]
  cache = _prefilled(model, params, prefix)
  k = chain.shape[1]
  chain_logits, _, _ = model.forward(params, chain, 5 + jnp.broadcast_to(jnp.arange(k), (2, k)), cache, causal(k))
  c, singles = cache, []
  for i in range(k):
    logits, _, c = model.forward(params, chain[:, i:i + 1], jnp.full((2, 1), 5 + i), c, jnp.ones((1, 1), bool))
    c = c.advance(jnp.ones((2,), jnp.int32))
    singles.append(logits)
  np.testing.assert_allclose(chain_logits, np.concatenate(singles, axis=1), atol=1e-5, rtol=1e-5)


def test_tree_mask_gives_each_node_its_root_path_logits(tiny):
  model, params = tiny
  #        root(0)
  #       /   |   \
  #      1    2    3
  #     / \        |
  #    4   5       6
  #    |
  #    7
  parents = [-1, 0, 0, 0, 1, 1, 3, 4]
  n = len(parents)
  depth_N, anc_NxN = tree_arrays(parents)  # node 0 is the root, the first token after the prefix
  assert depth_N.tolist() == [1, 2, 2, 2, 3, 3, 3, 4]  # the tree drawn above
  assert [np.flatnonzero(row).tolist() for row in anc_NxN] == [[0], [0, 1], [0, 2], [0, 3], [0, 1, 4], [0, 1, 5],
                                                              [0, 3, 6], [0, 1, 4, 7]]
  tokens_N = jnp.asarray([7, 11, 13, 17, 19, 23, 29, 31])
  prefix = jax.random.randint(jax.random.key(4), (1, 6), 0, model.vocab_size)
  cache = _prefilled(model, params, prefix)
  positions = 6 + jnp.asarray(depth_N)[None] - 1
  tree_logits, _, _ = model.forward(params, tokens_N[None], positions, cache, jnp.asarray(anc_NxN)[None])
  width = prefix.shape[1] + n  # root paths padded to one length (causal: what follows changes nothing), one jit
  path_logits = jax.jit(lambda seq_1xW, last: full_forward(model, params, seq_1xW)[0, last])
  for i in range(n):
    path = [j for j in range(n) if anc_NxN[i, j]]  # ancestors are earlier in topological order
    seq = jnp.concatenate([prefix, tokens_N[jnp.asarray(path)][None]], axis=1)
    seq = jnp.pad(seq, ((0, 0), (0, width - seq.shape[1])))
    np.testing.assert_allclose(tree_logits[0, i], path_logits(seq, prefix.shape[1] + len(path) - 1),
                               atol=1e-4, rtol=1e-4)


def test_compact_keeps_the_accepted_path(tiny):
  model, params = tiny
  prefix = jax.random.randint(jax.random.key(5), (2, 4), 0, model.vocab_size)
  cache = _prefilled(model, params, prefix)
  # Block [a, b, c, d] where b and c are siblings under a and d is c's child; keep a, c, d.
  block = jnp.asarray([[3, 5, 7, 9], [4, 6, 8, 10]])
  depth = jnp.asarray([[0, 1, 1, 2]] * 2)
  mask = jnp.asarray([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], bool)
  _, _, c = model.forward(params, block, 4 + depth, cache, mask)
  c = c.compact(jnp.asarray([[0, 2, 3, 0]] * 2), jnp.asarray([3, 3]), window=4)
  probe = jnp.asarray([[42], [43]])
  got = model.forward(params, probe, jnp.full((2, 1), 7), c, jnp.ones((1, 1), bool))[0][:, 0]
  want = full_forward(model, params, jnp.concatenate([prefix, block[:, jnp.asarray([0, 2, 3])], probe], 1))[:, -1]
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_default_model_cached_steps_equal_teacher_forced(default_model):
  model, params, tok = default_model
  ids = jnp.asarray([tok.encode("The quick brown fox jumps over the lazy dog, and then")])
  t = ids.shape[1]
  full = full_forward(model, params, ids)
  cache = _prefilled(model, params, ids[:, :4], capacity=64)
  step = jax.jit(model.forward)
  for i in range(4, t):
    logits, _, cache = step(params, ids[:, i:i + 1], jnp.full((1, 1), i), cache, jnp.ones((1, 1), bool))
    cache = cache.advance(jnp.ones((1,), jnp.int32))
    np.testing.assert_allclose(logits[0, 0], full[0, i], atol=2e-3, rtol=1e-3)


def test_untied_model_initialises_its_output_head():
  model = LlamaLM(tiny_config(tie_embeddings=False))
  params = model.init_params(jax.random.key(0))
  assert params["lm_head"]["kernel"].shape == (model.cfg.d_model, model.cfg.vocab_size)
  hidden = jnp.ones((1, 1, model.cfg.d_model))
  np.testing.assert_allclose(model.logits(params, hidden)[0, 0], hidden[0, 0] @ params["lm_head"]["kernel"], rtol=1e-5)


def cache_copies(hlo: str, shape_re: str) -> list[tuple[str, str]]:
  """`(computation, line)` of every copy whose result shape matches `shape_re` (e.g. `f32\\[1,3,64,256\\]`) in a
  compiled program's text, outside fusions (where a "copy" is a fused transpose, not a buffer copy)."""
  comp, out = None, []
  for line in hlo.splitlines():
    m = re.match(r"^(ENTRY )?%(\S+) ", line)
    if m and line.rstrip().endswith("{"):
      comp = m.group(2)
    if comp and not comp.startswith("fused") and re.search(rf"= {shape_re}\{{[^}}]*\}} copy\(", line):
      out.append((comp, line.strip()[:200]))
  return out


def cache_buffer_copies(model, params, cache, t: int = 4) -> list[tuple[str, str]]:
  """Copies of a whole self-attention cache buffer in the compiled program of one donated forward (t new tokens).
  Each is a full read + write of one layer's keys or values on every decode step."""
  b = cache.lengths.shape[0]
  fwd = jax.jit(lambda p, tok, pos, c, m: model.forward(p, tok, pos, c, m)[::2], donate_argnums=(3,))
  pos = cache.lengths[:, None] + jnp.arange(t)[None]
  hlo = fwd.lower(params, jnp.zeros((b, t), jnp.int32), pos, cache, causal(t)).compile().as_text()
  shapes = {"f32[" + ",".join(map(str, x.shape)) + "]" for x in (*cache.k, *cache.v)}
  assert any(sh in hlo for sh in shapes), "the program no longer shows the cache buffers"
  return cache_copies(hlo, "(" + "|".join(re.escape(sh) for sh in shapes) + ")")


@pytest.mark.parametrize("batch", [1, 3])
def test_cache_is_updated_in_place(tiny, batch):
  """A forward with the cache donated copies no cache buffer (before the writes were ordered after the reads
  there were two copies per buffer)."""
  model, params = tiny
  cache = model.init_cache(batch, 64).advance(jnp.full((batch,), 5, jnp.int32))
  assert cache_buffer_copies(model, params, cache) == []


@pytest.mark.parametrize("precision", ["highest", "default"])
def test_every_product_of_a_forward_runs_at_the_configured_precision(tiny, precision):
  """JAX's default float32 product is bfloat16 passes on TPU and TensorFloat-32 on recent GPUs, where a verify forward
  and one-token steps would then break ties differently: every product of the target's forward and of its logits
  carries the config's precision (highest by default) into the program."""
  import dataclasses

  from jaxspec.models.t5 import T5Config, T5LM

  model, params = tiny
  assert model.cfg.matmul_precision == "highest"
  model = dataclasses.replace(model, cfg=dataclasses.replace(model.cfg, matmul_precision=precision))
  cache = model.init_cache(1, 8)
  text = jax.jit(lambda p, c: model.forward(p, jnp.ones((1, 3), jnp.int32), jnp.arange(3)[None], c, causal(3))[0]
                 ).lower(params, cache).as_text()
  t5 = T5LM(T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, n_heads=2, n_enc_layers=1, n_dec_layers=1,
                     matmul_precision=precision))
  t5_params = t5.init_params(jax.random.key(0))
  src = jnp.ones((1, 4), jnp.int32)
  text += jax.jit(lambda p: t5.teacher_forced(p, src, jnp.asarray([4]), src)[0]).lower(t5_params).as_text()
  # A draft's head over a vocabulary subset (the default for spec and draft trees) too (found by an audit).
  from jaxspec.models.subset import subset_head
  sub, sub_params = subset_head(model, params, [1, 5, 9])
  text += jax.jit(lambda p, c: sub.forward(p, jnp.ones((1, 3), jnp.int32), jnp.arange(3)[None], c, causal(3))[0]
                  ).lower(sub_params, cache).as_text()
  dots = [line for line in text.splitlines() if "dot_general" in line]
  assert len(dots) > 10
  want = "HIGHEST" if precision == "highest" else "DEFAULT"
  assert all(f"precision = [{want}, {want}]" in line for line in dots), [d for d in dots if want not in d][:2]
  with pytest.raises(ValueError, match="matmul_precision='fast' must be one of highest, high, default"):
    dataclasses.replace(model.cfg, matmul_precision="fast")
  # Cache keys of the target's outputs (hidden states, teacher distributions) and adapters name the model by its repr,
  # which leaves the setting out; the keys add it where it is not the default, so older files still match.
  from jaxspec.models.llama import precision_key

  assert "matmul_precision" not in repr(model.cfg)
  assert model.cfg != dataclasses.replace(model.cfg, matmul_precision="high")
  assert precision_key(model.cfg) == ({} if precision == "highest" else {"precision": precision})


def test_rms_norm_uses_its_epsilon():
  """RMSNorm is x / sqrt(mean(x^2) + eps) * scale with the config's eps (the default model's 1e-5 is too small for
  its logits to tell whether eps is read at all)."""
  from jaxspec.models.llama import RMSNorm

  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 3, 8)), np.float32) * 0.3
  scale = np.linspace(0.5, 2.0, 8, dtype=np.float32)
  for eps in (0.5, 1e-5):
    got = RMSNorm(eps, jnp.float32).apply({"params": {"scale": jnp.asarray(scale)}}, jnp.asarray(x))
    want = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + eps) * scale
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_untied_output_table_is_the_head():
  """`output_table` of an untied model is its head (rows of lm_head), which BPD heads, EAGLE drafts and subset heads
  score with: logits = hidden @ table.T, and a subset head of the model scores its tokens as the model does."""
  from jaxspec.models.subset import subset_head

  model = LlamaLM(tiny_config(tie_embeddings=False))
  params = model.init_params(jax.random.key(0))
  table = model.output_table(params)
  assert table.shape == (model.vocab_size, model.cfg.d_model)
  np.testing.assert_array_equal(table, np.asarray(params["lm_head"]["kernel"]).T)
  tokens = jnp.asarray([[1, 2, 3]])
  args = (tokens, jnp.arange(3)[None], model.init_cache(1, 8), causal(3))
  full, hidden, _ = model.forward(params, *args)
  np.testing.assert_allclose(full, hidden @ table.T, rtol=1e-5, atol=1e-5)
  ids = [0, 5, 17, 200]
  sub, sub_params = subset_head(model, params, ids)
  np.testing.assert_allclose(sub.forward(sub_params, *args)[0][..., ids], full[..., ids], rtol=1e-5, atol=1e-5)


def test_per_row_cache_lengths_in_a_batch_past_the_unrolled_writes(tiny):
  """Rows with different committed lengths each write their new keys at their own length and read only their own
  slots, both with per-row writes (up to 32 rows) and with the batched write beyond: each row's chain logits, and a
  probe token's after the chain is committed, equal its own sequence's full forward."""
  model, params = tiny
  fwd = jax.jit(model.forward)
  for b in (3, 34):
    tokens = jax.random.randint(jax.random.key(b), (b, 9), 0, model.vocab_size)
    lengths = jnp.asarray([2 + i % 4 for i in range(b)], jnp.int32)
    cache = model.init_cache(b, 16)
    _, _, cache = fwd(params, tokens[:, :5], jnp.broadcast_to(jnp.arange(5), (b, 5)), cache, causal(5))
    cache = cache.advance(lengths)  # row i keeps its first lengths[i] tokens
    rows = np.arange(b)[:, None]
    chain = tokens[rows, lengths[:, None] + jnp.arange(3)[None]]  # the next 3 tokens of each row
    logits, _, cache = fwd(params, chain, lengths[:, None] + jnp.arange(3)[None], cache, causal(3))
    cache = cache.advance(jnp.full((b,), 3, jnp.int32))
    probe = jnp.full((b, 1), 7)
    last = fwd(params, probe, lengths[:, None] + 3, cache, jnp.ones((1, 1), bool))[0]
    # Each row's own sequence, tokens[:n + 3] then the probe, padded at the end (causal: the padding changes nothing).
    seq = jnp.where(jnp.arange(9)[None] < lengths[:, None] + 3, tokens, 0)
    seq = jnp.concatenate([seq, jnp.zeros((b, 1), seq.dtype)], axis=1).at[rows[:, 0], lengths + 3].set(7)
    full = full_forward(model, params, seq)
    idx = lengths[:, None] + jnp.arange(4)[None]
    np.testing.assert_allclose(logits, full[rows, idx[:, :3]], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(last[:, 0], full[rows[:, 0], idx[:, 3]], atol=1e-4, rtol=1e-4)


def test_per_token_cache_masks_read_each_token_s_own_slots(tiny):
  """With `cache_mask_BxTxS` (draft trees grown in the cache) each new token reads the cache slots of its own row
  of the mask, for every query head of a key/value head group (tiny has 2 query heads per kv head): in one forward
  each token's logits are those of a forward of that token alone with its row."""
  model, params = tiny
  assert model.cfg.n_heads > model.cfg.n_kv_heads
  prefix = jax.random.randint(jax.random.key(6), (1, 6), 0, model.vocab_size)
  cache = _prefilled(model, params, prefix, capacity=16)
  tokens, pos = jnp.asarray([[7, 11, 13]]), jnp.full((1, 3), 6)
  rows = [[1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0], [0, 0, 0, 1, 1, 1]]
  cache_mask = jnp.asarray([[r + [0] * 10 for r in rows]], bool)
  got = model.forward(params, tokens, pos, cache, jnp.eye(3, dtype=bool), cache_mask_BxTxS=cache_mask)[0]
  for t in range(3):
    want = model.forward(params, tokens[:, t:t + 1], pos[:, t:t + 1], cache, jnp.ones((1, 1), bool),
                         cache_mask_BxTxS=cache_mask[:, t:t + 1])[0]
    np.testing.assert_allclose(got[0, t], want[0, 0], atol=1e-5, rtol=1e-5)
