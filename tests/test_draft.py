"""Draft-model distillation: the top-K KL objective, a tiny training run, the exported draft in speculative
decoding, resumption, the file format and config errors."""

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from jaxspec.decoding.generate import generate
from jaxspec.decoding.speculative import DraftModelDrafter, layerskip_draft
from jaxspec.errors import InputError, ModelLoadError
from jaxspec.loading.hf import load_hf
from jaxspec.models.draft import load_draft, load_draft_vocab, save_draft, save_draft_vocab
from jaxspec.models.subset import subset_head
from tests.conftest import make_tiny
from tests.test_bpd import ByteTokenizer
from training.config import ConfigError
from training.draft import (DraftTrainConfig, init_draft, load_draft_config, outside_logsumexp, topk_kl,
                            train_draft)
from training.tasks import TASKS, load_task_config

CONFIGS = Path(__file__).parent.parent / "configs"
GAMMA = 4
STEPS = 40  # the run stops at 20 and resumes to 40


# ---- the objective -------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=2)
def coarse_kl(logp, logq, k):
  """(KL coarsened to the top k of p, log of p's mass outside them, d KL / d draft logits)."""
  top_logp, top_ids = jax.lax.top_k(logp, k)
  other = outside_logsumexp(logp, top_ids)
  kl_of = lambda logits: topk_kl(jax.nn.log_softmax(logits), top_ids, top_logp, other)
  return kl_of(logq), other, jax.grad(lambda x: kl_of(x).sum())(logq)


def test_topk_kl_is_the_kl_of_the_coarsened_distributions():
  rng = np.random.default_rng(0)
  v, k = 50, 7
  logp = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(2, 3, v)) * 2, jnp.float32))
  logq = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(2, 3, v)) * 2, jnp.float32))
  p, q = np.exp(np.asarray(logp, np.float64)), np.exp(np.asarray(logq, np.float64))
  full = np.sum(p * np.log(p / q), -1)
  np.testing.assert_allclose(coarse_kl(logp, logq, v)[0], full, rtol=1e-5)  # K = V: the exact KL
  kl, other, _ = coarse_kl(logp, logq, k)
  ids = np.asarray(jax.lax.top_k(logp, k)[1])
  pk, qk = np.take_along_axis(p, ids, -1), np.take_along_axis(q, ids, -1)
  po, qo = 1 - pk.sum(-1), 1 - qk.sum(-1)
  np.testing.assert_allclose(np.exp(other), po, rtol=1e-5)
  np.testing.assert_allclose(kl, np.sum(pk * np.log(pk / qk), -1) + po * np.log(po / qo), rtol=1e-5)
  assert np.all(np.asarray(kl) <= full + 1e-6)  # coarsening never adds divergence
  # A target with nearly all its mass in the top K: the tiny outside masses keep their precision (no 1 - Σ in f32).
  sharp = jax.nn.log_softmax(jnp.zeros((1, 1, v)).at[0, 0, :k].set(30.0))
  kl, other, grad = coarse_kl(sharp, sharp, k)
  np.testing.assert_allclose(np.exp(other), (v - k) * np.exp(-30.0) / k, rtol=1e-4)
  np.testing.assert_allclose(kl, 0.0, atol=1e-7)
  np.testing.assert_allclose(grad, 0.0, atol=1e-6)


# ---- a tiny run ------------------------------------------------------------------------------------------------

def tiny_draft_config(root, name, steps):
  prompts = root / "prompts.jsonl"
  if not prompts.exists():
    words = ["alpha", "bravo", "charlie", "delta", "echo", "fox", "golf", "hotel", "india", "juliet"]
    prompts.write_text("\n".join(json.dumps({"question_id": i, "category": "c", "turns": [f"{w} {i} {w[::-1]}"]})
                                 for i, w in enumerate(words * 4)) + "\n")
  base = DraftTrainConfig()
  return dataclasses.replace(
      base, out=str(root / name / "draft"),
      draft=dataclasses.replace(base.draft, n_layers=1),
      data=dataclasses.replace(base.data, prompts=str(prompts), max_new_tokens=48, gen_batch_size=40,
                               dataset_dir=str(root / "data"), eval_fraction=0.1),
      objective=dataclasses.replace(base.objective, top_k=16, gamma=GAMMA),
      optim=dataclasses.replace(base.optim, lr=3e-3, warmup_steps=10, total_steps=STEPS),
      train=dataclasses.replace(base.train, steps=steps, batch_size=8, seq_len=96,
                                checkpoint_dir=str(root / name / "ckpt"), checkpoint_every=100, eval_every=50,
                                log_every=10))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("draft")  # the self-distilled dataset is built once and shared by the runs


@pytest.fixture(scope="module")
def trained(learnable, root):
  """A 40-step run, stopped at step 20 and resumed: `(config, summary of the first part, summary)`."""
  model, params = learnable
  first = train_draft(tiny_draft_config(root, "main", STEPS // 2), model=model, params=params,
                      tokenizer=ByteTokenizer(), progress=False)
  cfg = tiny_draft_config(root, "main", STEPS)
  summary = train_draft(cfg, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)
  return cfg, first, summary


def test_held_out_figures_do_not_depend_on_the_batch_size(learnable, root):
  """Eval means are over the held-out tokens, not means of batch means weighted by rows: with answers of different
  lengths (the prompts trained on too) a batch of 1 and a batch of 3 gave other figures (found by a review)."""
  model, params = learnable
  got = []
  for bs in (1, 3):
    cfg = tiny_draft_config(root, f"bs{bs}", 1)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, loss_on_prompt=True),
                              train=dataclasses.replace(cfg.train, batch_size=bs))
    got.append(train_draft(cfg, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)["init_eval"])
  assert got[0].keys() == got[1].keys() and "eval/tau_proxy" in got[0] and not any("count" in k for k in got[0])
  for k in got[0]:
    assert got[0][k] == pytest.approx(got[1][k], rel=1e-4), k  # (float32 sums in another order)


def read_metrics(cfg):
  path = f"{cfg.train.checkpoint_dir}/metrics.jsonl"
  return [json.loads(line) for line in open(path).read().splitlines()]


def test_distillation_lowers_the_kl(learnable, trained):
  cfg, _, summary = trained
  train = [m for m in read_metrics(cfg) if "kl" in m]
  assert train[-1]["kl"] < 0.5 * train[0]["kl"], (train[0], train[-1])
  before, after = summary["init_eval"], summary["final_eval"]
  assert after["eval/kl"] < 0.5 * before["eval/kl"], (before, after)
  assert after["eval/agree"] > before["eval/agree"] and after["eval/tau_proxy"] > before["eval/tau_proxy"]
  _, dp = init_draft(*learnable, 1)  # the embedding stays frozen: only the layer and the final norm train
  assert summary["trainable_params"] == sum(x.size for k, v in dp.items() if k != "embed" for x in jax.tree.leaves(v))


def test_exported_draft_decodes_exactly_and_beats_a_random_draft(learnable, trained):
  model, params = learnable
  cfg, _, summary = trained
  folder = cfg.out
  info = json.load(open(f"{folder}/config.json"))["jaxspec_draft"]
  assert info["embeddings"] == "target" and info["dtype"] == "bfloat16"
  assert info["training"]["final_eval"] == summary["final_eval"]
  with pytest.raises(ModelLoadError, match="target's params"):
    load_draft(folder)
  draft, dparams = load_draft(folder, params)
  assert draft.cfg.n_layers == 1 and draft.vocab_size == model.vocab_size
  assert dparams["embed"]["embedding"] is params["embed"]["embedding"]  # the target's own array

  tok = ByteTokenizer()
  prompts = [tok.encode("kilo 99 olik"), tok.encode("alpha 3 ahpla"), tok.encode("lima 7")]
  greedy = generate(model, params, prompts, max_new_tokens=48)

  def tau(d, p):
    res = generate(model, params, prompts, max_new_tokens=48, drafter=DraftModelDrafter(d, GAMMA, greedy=True),
                   draft_params=p)
    assert res.tokens == greedy.tokens
    return res.tau

  tau_trained = tau(draft, dparams)
  tau_random = tau(draft, draft.init_params(jax.random.key(3)))  # an untrained draft of the same shape
  tau_layerskip = tau(*layerskip_draft(model, params, 1))  # the starting point, for the record
  # The export lists the training data's tokens; a head restricted to them still decodes exactly.
  ids = load_draft_vocab(folder)
  assert 0 < len(ids) < model.vocab_size and np.all(np.diff(ids) > 0)
  tau_subset = tau(*subset_head(draft, dparams, ids))
  print(f"tau: distilled {tau_trained:.3f} (subset head {tau_subset:.3f}), layer-skip {tau_layerskip:.3f}, "
        f"random {tau_random:.3f}")
  assert tau_trained > tau_random, (tau_trained, tau_random)


def test_training_resumed_from_its_checkpoint(trained):
  cfg, first, summary = trained
  metrics = read_metrics(cfg)
  assert [m["step"] for m in metrics if "kl" in m] == [10, 20, 30, 40]  # went on from 20, not from 0
  assert [m["step"] for m in metrics if "eval/kl" in m] == [20, 40]
  assert first["final_eval"]["eval/kl"] == next(m for m in metrics if "eval/kl" in m)["eval/kl"]
  assert first["init_eval"] == summary["init_eval"] and first["sequences"] == summary["sequences"]


# ---- the file format -------------------------------------------------------------------------------------------

def test_draft_files_round_trip(tiny, tmp_path):
  model, params = tiny
  draft, dp = init_draft(model, params, 1)
  dp["layers_0"] = jax.tree.map(lambda x: x + 0.01, dp["layers_0"])
  # Embeddings included, float32: a complete HF folder, read back exactly, no target needed.
  save_draft(tmp_path / "full", draft, dp, include_embeddings=True, dtype="float32")
  d2, p2 = load_draft(tmp_path / "full")
  _, p3 = load_hf(str(tmp_path / "full"))
  for other in (p2, p3):
    jax.tree.map(np.testing.assert_array_equal, other, dp)
  assert d2.cfg == draft.cfg
  # The target's embedding, bfloat16: only the layers and norm are stored.
  save_draft(tmp_path / "small", draft, dp)
  with safe_open(str(tmp_path / "small" / "model.safetensors"), framework="numpy") as f:
    assert not any("embed" in name or "lm_head" in name for name in f.keys())
  assert "target's own" in (tmp_path / "small" / "README.md").read_text()
  _, p4 = load_draft(tmp_path / "small", params)
  rounded = jax.tree.map(lambda x: np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32)), dp["layers_0"])
  jax.tree.map(np.testing.assert_array_equal, p4["layers_0"], rounded)
  # Another target (same shapes): the fingerprint catches it unless told otherwise.
  _, other_params = make_tiny(seed=1)
  with pytest.raises(ModelLoadError, match="fingerprint"):
    load_draft(tmp_path / "small", other_params)
  assert load_draft(tmp_path / "small", other_params, check_target=False)[0].cfg.n_layers == 1
  raw = (tmp_path / "small" / "model.safetensors").read_bytes()
  (tmp_path / "small" / "model.safetensors").write_bytes(raw[:len(raw) // 2])
  with pytest.raises(ModelLoadError, match="unreadable"):
    load_draft(tmp_path / "small", params)
  with pytest.raises(ModelLoadError, match="does not hold a draft"):
    load_draft(tmp_path / "nothing", params)
  # The optional token list of a subset head.
  assert load_draft_vocab(tmp_path / "small") is None
  save_draft_vocab(tmp_path / "small", [7, 3, 3, 200])
  np.testing.assert_array_equal(load_draft_vocab(tmp_path / "small"), [3, 7, 200])
  (tmp_path / "small" / "vocab_ids.safetensors").write_bytes(b"\x00" * 9)
  with pytest.raises(ModelLoadError, match="vocab_ids.safetensors is unreadable"):
    load_draft_vocab(tmp_path / "small")
  # Written with the weights in one go; a new export without ids removes an older export's.
  save_draft(tmp_path / "small", draft, dp, vocab_ids=[9, 4])
  np.testing.assert_array_equal(load_draft_vocab(tmp_path / "small"), [4, 9])
  save_draft(tmp_path / "small", draft, dp)
  assert load_draft_vocab(tmp_path / "small") is None



def test_the_weights_fingerprint_reads_every_array_in_either_layout(tiny):
  """`weights_fingerprint` tells apart models of one embedding: a value changed in any array changes it (every value
  of an array of at most `samples` values, the later rows of a larger one), while the layout of a scan_layers load
  and bf16 weights of the same values keep it."""
  from jaxspec.models.draft import weights_fingerprint
  from jaxspec.models.llama import stack_layers

  _, params = tiny
  fp = weights_fingerprint(params)
  assert weights_fingerprint(stack_layers(params, 2)) == fp
  assert weights_fingerprint(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)) == fp
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]

  def changed(path, where):
    return jax.tree_util.tree_map_with_path(lambda p, x: x.at[where].add(1.0) if p == path else x, params)

  for path in paths:  # the last quarter of each array's rows (of its values, for a vector)
    leaf = functools.reduce(lambda t, k: t[k.key], path, params)
    assert weights_fingerprint(changed(path, slice(leaf.shape[0] * 3 // 4, None))) != fp, jax.tree_util.keystr(path)
  o = next(path for path in paths if jax.tree_util.keystr(path) == "['layers_0']['attn']['o']['kernel']")  # 32x32
  assert weights_fingerprint(changed(o, (31, 31))) != fp


def test_a_draft_of_an_untied_target_takes_the_target_s_head(tmp_path):
  """An untied target's output head is one of the vocabulary-sized matrices a draft shares: not in the folder, taken
  from the target's params on load (the same values), so the draft scores with the target's head."""
  model, params = make_tiny(seed=2, tie_embeddings=False)
  draft, dp = init_draft(model, params, 1)
  save_draft(tmp_path / "d", draft, dp, dtype="float32")
  with safe_open(str(tmp_path / "d" / "model.safetensors"), framework="numpy") as f:
    assert not any("embed" in name or "lm_head" in name for name in f.keys())
  loaded, lp = load_draft(tmp_path / "d", params)
  assert not loaded.cfg.tie_embeddings
  np.testing.assert_array_equal(lp["lm_head"]["kernel"], params["lm_head"]["kernel"])
  tokens = jnp.asarray([[1, 2, 3]])
  args = (tokens, jnp.arange(3)[None], loaded.init_cache(1, 8), jnp.tril(jnp.ones((1, 3, 3), bool)))
  np.testing.assert_allclose(loaded.forward(lp, *args)[0], draft.forward(dp, *args)[0], rtol=1e-5, atol=1e-5)

def test_subset_head_scores_only_its_tokens(tiny):
  model, params = tiny
  ids = [0, 5, 17, 200, 255]
  sub, sp = subset_head(model, params, [17, 5, 0, 255, 200, 5])
  assert sub.vocab_size == model.vocab_size and sp["vocab_ids"].tolist() == ids
  tokens = jnp.asarray([[1, 2, 3]])
  args = (tokens, jnp.arange(3)[None], model.init_cache(1, 8), jnp.tril(jnp.ones((1, 3, 3), bool)))
  full = np.asarray(model.forward(params, *args)[0])
  got = np.asarray(sub.forward(sp, *args)[0])
  np.testing.assert_allclose(got[..., ids], full[..., ids], rtol=1e-5, atol=1e-5)
  assert np.all(np.delete(got, ids, axis=-1) <= -1e29)
  for bad in ([], [-1, 3], [256]):
    with pytest.raises(InputError):
      subset_head(model, params, bad)


# ---- configs ---------------------------------------------------------------------------------------------------

def test_config_errors_name_the_key(tmp_path, tiny):
  path = tmp_path / "c.yaml"
  path.write_text("task: draft\ndraft:\n  n_layer: 2\n")
  with pytest.raises(ConfigError, match="draft.n_layer"):
    load_draft_config(path)
  path.write_text("task: draft\ndraft:\n  init: copy\n")
  with pytest.raises(ConfigError, match="draft.init"):
    load_draft_config(path)
  path.write_text("task: draft\nobjective:\n  top_k: 0\n")
  with pytest.raises(ConfigError, match="objective.*top_k"):
    load_draft_config(path)
  path.write_text("task: draft\n")
  with pytest.raises(ConfigError, match="train.seq_len"):
    load_draft_config(path, ["train.seq_len=long"])
  cfg, fn = load_task_config(path, ["draft.n_layers=2", "objective.ce_weight=0.5"])
  assert isinstance(cfg, DraftTrainConfig) and fn is TASKS["draft"][1]
  assert cfg.draft.n_layers == 2 and cfg.objective.ce_weight == 0.5
  assert cfg.data.dataset_dir == "runs/bpd_smollm2/data"  # shares the BPD run's self-distilled data
  path.write_text("task: drafts\n")
  with pytest.raises(ConfigError, match="unknown task 'drafts'.*bpd, draft"):
    load_task_config(path)
  assert type(load_task_config(CONFIGS / "draft_smollm2.yaml")[0]) is DraftTrainConfig
  assert type(load_task_config(CONFIGS / "bpd_smollm2.yaml")[0]).__name__ == "BPDTrainConfig"
  model, params = tiny
  with pytest.raises(ConfigError, match="draft.n_layers"):
    init_draft(model, params, 3)


def _run_shipped(default_model, default_greedy, use_layerskip_start=False):
  from jaxspec.bench.methods import DEFAULT_DRAFT

  model, params, tok = default_model
  prompts, greedy = default_greedy
  draft, dparams = load_draft(DEFAULT_DRAFT, params)
  if use_layerskip_start:
    d, p = layerskip_draft(model, params, draft.cfg.n_layers)
  else:  # the shipped draft as `spec` loads it, with its subset head (the full head is checked on the tiny model)
    d, p = subset_head(draft, dparams, load_draft_vocab(DEFAULT_DRAFT))
  res = generate(model, params, prompts, max_new_tokens=40, eos_ids=[tok.eos_id],
                 drafter=DraftModelDrafter(d, GAMMA, greedy=True), draft_params=p)
  assert res.tokens == greedy.tokens
  return res


def test_shipped_draft_equals_greedy_on_default_model(default_model, default_greedy):
  """The distilled draft shipped for SmolLM2 (configs/draft_smollm2.yaml): same tokens as greedy, fewer target
  calls."""
  greedy = default_greedy[1]
  distilled = _run_shipped(default_model, default_greedy)
  print(f"target calls: greedy {greedy.target_calls}, distilled draft (subset head) {distilled.target_calls}")
  assert distilled.target_calls < 0.85 * greedy.target_calls


@pytest.mark.slow  # one more compile of the default model
def test_shipped_draft_beats_the_layerskip_draft_it_started_from(default_model, default_greedy):
  distilled = _run_shipped(default_model, default_greedy)
  start = _run_shipped(default_model, default_greedy, use_layerskip_start=True)
  print(f"target calls: distilled draft {distilled.target_calls}, layer-skip start {start.target_calls}")
  assert distilled.target_calls < start.target_calls


def test_distill_loss_terms_are_means_over_the_trained_positions(tiny):
  """Each term is a mean over the positions of the mask: the top-K KL (p's top K and the rest as one bucket), the
  cross-entropy of the next token in the data, agreement of the draft's top-1 with the target's, and tau_proxy = 1 +
  the mean, over trained positions s, of the drafts 1..γ accepted in a row from s (agreement at s .. s + i - 1, all
  trained). Worked out in numpy from the draft's logits."""
  from training.draft import DistillData, ObjectiveSection, distill_loss, padded, split_trainable, teacher_topk
  from training.datasets import Sequences

  model, params = tiny
  draft, dp = init_draft(model, params, 1)
  prompts = [[5, 17], [9, 8, 7]]  # and the target's greedy answers, as in the data; the draft agrees here and there
  answers = generate(model, params, prompts, max_new_tokens=9).tokens
  seqs = Sequences([np.asarray(p + a, np.int32) for p, a in zip(prompts, answers)], np.array([2, 3], np.int32))
  tokens, mask, _ = padded(seqs, 14, False)
  k, gamma = 8, 3
  ids, logp, other = teacher_topk(model, params, tokens, np.array([len(t) for t in seqs.tokens]), k)
  batch = DistillData(tokens, mask, ids, logp, other).batch(np.arange(2))
  objective = ObjectiveSection(top_k=k, kl_weight=1.0, ce_weight=0.5, gamma=gamma)
  trainable, frozen = split_trainable(dp, False)
  loss, m = jax.jit(distill_loss(draft, objective))(trainable, frozen, batch, None)

  l = tokens.shape[1]
  pos = jnp.broadcast_to(jnp.arange(l), (2, l))
  logits, _, _ = draft.forward(dp, jnp.asarray(tokens), pos, draft.init_cache(2, l), jnp.tril(jnp.ones((l, l), bool)))
  logits = np.asarray(logits, np.float64)
  logq = logits - logits.max(-1, keepdims=True)
  logq -= np.log(np.exp(logq).sum(-1, keepdims=True))
  trained = [(b, t) for b in range(2) for t in range(l) if mask[b, t]]
  kl, ce, agree = {}, {}, np.zeros((2, l), bool)
  for b, t in trained:
    p_k, q_k = np.exp(logp[b, t].astype(np.float64)), np.exp(logq[b, t, ids[b, t]])
    p_o, q_o = 1 - p_k.sum(), 1 - q_k.sum()
    kl[b, t] = np.sum(p_k * np.log(p_k / q_k)) + p_o * np.log(p_o / q_o)
    ce[b, t] = -logq[b, t, tokens[b, t + 1]]
    agree[b, t] = logq[b, t].argmax() == ids[b, t, 0]
  runs = []
  for b, s in trained:
    i = 0
    while i < gamma and s + i < l and agree[b, s + i] and mask[b, s + i]:
      i += 1
    runs.append(i)
  assert 0 < np.mean([agree[bt] for bt in trained]) < 1 and max(runs) > 1
  want = {"kl": np.mean(list(kl.values())), "ce": np.mean(list(ce.values())),
          "agree": np.mean([agree[bt] for bt in trained]), "tau_proxy": 1 + np.mean(runs)}
  for name, value in want.items():
    np.testing.assert_allclose(m[name], value, rtol=2e-4, err_msg=name)
  np.testing.assert_allclose(loss, want["kl"] + 0.5 * want["ce"], rtol=2e-4)


def test_vocabulary_matrices_train_only_with_train_embeddings(tiny):
  """`draft.train_embeddings`: the embedding (and an untied head) are trained, and so shipped; by default they are
  frozen, and everything else trains."""
  from training.draft import VOCAB_PARAMS, split_trainable

  model, params = tiny
  _, dp = init_draft(model, params, 1)
  trainable, frozen = split_trainable(dp, False)
  assert "embed" in frozen and set(frozen) == {k for k in dp if k in VOCAB_PARAMS}
  assert set(trainable) == set(dp) - set(frozen) and "layers_0" in trainable
  trainable, frozen = split_trainable(dp, True)
  assert frozen == {} and set(trainable) == set(dp)
