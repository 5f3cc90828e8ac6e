"""Feature-level drafts (EAGLE): greedy equivalence, the draft state after ragged acceptance, the training passes
against the decode loop's drafts, statistical exactness under sampling, a tiny training run, the folder format."""

import dataclasses
import json
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.decoding import generate as gen
from jaxspec.decoding.accept import SampleAcceptance
from jaxspec.decoding.eagle import EagleDrafter
from jaxspec.decoding.protocol import Acceptance, PrefillInfo, Verified
from jaxspec.decoding.sampling import SamplingParams, Warp
from jaxspec.errors import InputError, ModelLoadError
from jaxspec.models.eagle import EagleDraft, load_eagle, save_eagle
from tests.conftest import assert_gates_mix, make_tiny
from tests.test_bpd import ByteTokenizer
from tests.test_speculative import (assert_gate_skips_some_drafts, chi2_pvalue, continuation_logits,  # noqa: F401
                                    drafter_sample_counts, exact_distribution, per_row_sample_counts, stat_models)
from training.config import ConfigError
from training.eagle import EagleTrainConfig, pass_masks, train_eagle, unrolled_outputs
from training.tasks import load_task_config

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9] * 11]
NEW = 20
CONFIGS = Path(__file__).parent.parent / "configs"


def random_draft(model, params, seed=3, vocab_ids=None, scale=1.0):
  draft = EagleDraft(model.cfg, 1)
  dp = draft.init_params(jax.random.key(seed), params, vocab_ids, init="random")
  dp["fc"] = jax.tree.map(lambda x: x * scale, dp["fc"])
  return draft, dp


def small_tree(draft, **kw):
  """The 8-node, depth-4 tree (frontier width 2, 2 children each) over a feature-level draft."""
  from jaxspec.decoding.eagle import EagleTreeSource
  from jaxspec.decoding.opt_tree import OptTreeDrafter

  return OptTreeDrafter(EagleTreeSource(draft, 2), nodes=8, depth=4, width=2, branch=2, **kw)


def features(model, params, tokens):
  """The target's final hidden states `[1, L, D]` over one sequence (teacher-forced)."""
  t = len(tokens)
  _, hidden, _ = model.forward(params, jnp.asarray([tokens], jnp.int32), jnp.arange(t)[None], model.init_cache(1, t),
                               jnp.tril(jnp.ones((1, t, t), bool)), logits=False)
  return hidden


def prefill_info(model, params, prompt, first, rng=None):
  hidden = features(model, params, prompt)
  return PrefillInfo(jnp.asarray([prompt], jnp.int32), jnp.asarray([len(prompt)], jnp.int32), hidden[:, -1],
                     jnp.zeros((1, model.vocab_size)), jnp.asarray([first], jnp.int32), capacity=64,
                     rng=rng if rng is not None else jax.random.key(0), hidden_BxQxD=hidden)


@pytest.mark.parametrize("gamma", [pytest.param(1, marks=pytest.mark.slow), 3])
def test_eagle_equals_greedy(tiny, gamma):
  model, params = tiny
  draft, dp = random_draft(model, params)
  ref = gen.generate(model, params, PROMPTS, max_new_tokens=NEW).tokens
  res = gen.generate(model, params, PROMPTS, max_new_tokens=NEW, drafter=EagleDrafter(draft, gamma), draft_params=dp)
  assert res.tokens == ref
  assert res.accept_hist[:, 2:].sum() > 0  # some drafts were accepted
  assert res.drafter_calls == gamma * res.target_calls
  assert int(res.drafter_stats["draft_forwards"]) == gamma * res.target_calls
  # A gate no draft reaches: every step is a one-token step, still greedy.
  res = gen.generate(model, params, PROMPTS, max_new_tokens=NEW, drafter=EagleDrafter(draft, gamma, gate=gamma),
                     draft_params=dp)
  assert res.tokens == ref and res.tau == 1.0


def test_training_passes_are_the_drafts_decoding_makes(tiny):
  """Pass s of the unrolled training forward, at entry t0 + s - 1, gives exactly the distribution the decode loop's
  drafter samples draft token s from when its step starts after entry t0 (same cache, same masks)."""
  model, params = tiny
  draft, dp = random_draft(model, params, scale=3.0)
  prefix = [5, 17, 33, 2, 90, 41, 7, 64]  # x_0 .. x_{t0 + 1}: prompt x_0..x_t0, then the pending token
  t0 = len(prefix) - 2
  drafter = EagleDrafter(draft, 3, greedy=False)
  state = drafter.init(dp, prefill_info(model, params, prefix[:-1], prefix[-1], rng=jax.random.key(5)))
  proposed, _ = drafter.propose(dp, state, types.SimpleNamespace(sp=SamplingParams.make(1.0)))
  drafted = [int(x) for x in proposed.tokens_BxN[0]]
  seq = prefix + drafted
  next_ = jnp.asarray([seq[1:] + [0]], jnp.int32)
  outs = unrolled_outputs(draft, dp, features(model, params, seq), next_, 3)
  for s in range(1, 4):
    q_train = jax.nn.softmax(draft.logits(dp, outs[s - 1][:, t0 + s - 1][:, None])[:, 0])
    np.testing.assert_allclose(q_train[0], proposed.probs_BxNxV[0, s - 1], atol=2e-5)
  # The distributions are not trivially equal: they differ from pass to pass.
  assert float(jnp.abs(proposed.probs_BxNxV[0, 0] - proposed.probs_BxNxV[0, 1]).max()) > 1e-3


def test_pass_masks_on_a_small_case():
  own, seen = pass_masks(4, 3)
  assert own.tolist() == np.eye(4, dtype=bool).tolist()
  # Pass 3 at t: pass-1 entries j <= t - 2, the pass-2 entry at t - 1.
  assert seen[:, :4].astype(int).tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]]
  assert seen[:, 4:].astype(int).tolist() == [[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]
  own, seen = pass_masks(3, 1)
  assert seen is None and own.astype(int).tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]


@pytest.mark.parametrize("n_commit", [pytest.param(1, marks=pytest.mark.slow), 2,
                                      pytest.param(4, marks=pytest.mark.slow)])
def test_update_leaves_the_state_a_fresh_prefill_would(tiny, n_commit):
  """After a verified step that commits n tokens, the draft's next-token feature is the one a prefill over the
  committed sequence gives: the cache keeps no entry built on the draft's own guesses."""
  model, params = tiny
  draft, dp = random_draft(model, params, scale=3.0)
  drafter = EagleDrafter(draft, 3)
  prompt, pending = [5, 17, 33, 2, 90], 41
  state = drafter.init(dp, prefill_info(model, params, prompt, pending))
  proposal, state = drafter.propose(dp, state, types.SimpleNamespace(sp=SamplingParams.make(0.0)))
  block = [pending] + [int(x) for x in proposal.tokens_BxN[0]]
  correction = 77
  emitted = block[1:n_commit] + [correction] + [0] * (4 - n_commit)
  hidden = features(model, params, prompt + block)[:, len(prompt):]
  acc = Acceptance(jnp.asarray([emitted], jnp.int32), jnp.arange(4)[None], jnp.asarray([n_commit], jnp.int32))
  verified = Verified(proposal, jnp.zeros((1, 4, model.vocab_size)), hidden, acc, jnp.asarray([True]))
  state = drafter.update(dp, state, verified)
  fresh = drafter.init(dp, prefill_info(model, params, prompt + block[:n_commit], correction))
  assert int(state.cache.lengths[0]) == int(fresh.cache.lengths[0]) == len(prompt) + n_commit
  np.testing.assert_allclose(state.feat_BxD, fresh.feat_BxD, atol=1e-5)


def test_a_skipped_propose_leaves_update_what_it_needs(tiny):
  """`skip_propose` (a step where `WithLookup` copies in every row) moves the state as `propose` would for
  `update`: after a copied block is verified the state equals a fresh prefill over the committed sequence."""
  from jaxspec.decoding.bpd import chain_draft

  model, params = tiny
  draft, dp = random_draft(model, params, scale=3.0)
  drafter = EagleDrafter(draft, 3)
  prompt, pending, copy, n_commit = [5, 17, 33, 2, 90], 41, [5, 17, 33], 3
  state = drafter.init(dp, prefill_info(model, params, prompt, pending))
  state = drafter.skip_propose(dp, state, types.SimpleNamespace(sp=SamplingParams.make(0.0)))
  block = [pending] + copy
  correction = 77
  emitted = block[1:n_commit] + [correction] + [0] * (4 - n_commit)
  hidden = features(model, params, prompt + block)[:, len(prompt):]
  acc = Acceptance(jnp.asarray([emitted], jnp.int32), jnp.arange(4)[None], jnp.asarray([n_commit], jnp.int32))
  verified = Verified(chain_draft(jnp.asarray([copy], jnp.int32)), jnp.zeros((1, 4, model.vocab_size)), hidden, acc,
                      jnp.asarray([True]))
  state = drafter.update(dp, state, verified)
  fresh = drafter.init(dp, prefill_info(model, params, prompt + block[:n_commit], correction))
  assert int(state.cache.lengths[0]) == int(fresh.cache.lengths[0]) == len(prompt) + n_commit
  np.testing.assert_allclose(state.feat_BxD, fresh.feat_BxD, atol=1e-5)
  assert int(state.forwards) == 1  # the update's forward only


# `eagle` is a shipped method: its plain chain is sampled in the default run (top-p with -m slow)
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0),
                                               pytest.param(0.7, 0.9, marks=pytest.mark.slow)])
def test_eagle_sampling_is_exact(stat_models, continuation_logits, temperature, top_p):
  """10^5 generations with a sampling feature-level draft follow the target's warped distribution (χ²)."""
  target = stat_models[0]
  draft, dp = random_draft(*target, seed=4, scale=2.0)
  warp = Warp(0, top_p < 1)
  probs = exact_distribution(continuation_logits, warp, SamplingParams.make(temperature, top_p))
  counts = drafter_sample_counts(target, EagleDrafter(draft, 2, warp, greedy=False), dp, temperature, top_p,
                                 SampleAcceptance(warp))
  pvalue = chi2_pvalue(counts, probs)
  print(f"eagle T={temperature} top_p={top_p}: p = {pvalue:.3g}")
  assert pvalue > 1e-3


def test_gated_eagle_sampling_with_a_subset_head_is_exact(stat_models, continuation_logits):
  """A draft that proposes 4 of the 8 tokens, gated per row (some rows verify, some take one-token steps). EAGLE
  wires the gate score itself: a gate that read the draft's own draws instead of its probabilities fails this."""
  target = stat_models[0]
  draft, dp = random_draft(*target, seed=4, vocab_ids=[0, 2, 3, 6], scale=2.0)
  probs = exact_distribution(continuation_logits, Warp(), SamplingParams.make(1.0))
  counts, calls = per_row_sample_counts(target, EagleDrafter(draft, 3, greedy=False, gate=0.6), dp,
                                        SampleAcceptance())
  pvalue = chi2_pvalue(counts, probs)
  print(f"gated eagle, subset head: p = {pvalue:.3g}")
  assert pvalue > 1e-3
  assert_gate_skips_some_drafts(target, EagleDrafter(draft, 3, greedy=False), dp, SampleAcceptance(), calls)


# ---- a tiny training run, the folder, config errors ------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(learnable, tmp_path_factory):
  cfg = tiny_eagle_config(tmp_path_factory.mktemp("eagle"), 60)
  model, params = learnable
  return cfg, train_eagle(cfg, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)


def tiny_eagle_config(root: Path, steps: int) -> EagleTrainConfig:
  """A run of `steps` steps on the `learnable` target, everything under `root` (its prompt file written there)."""
  root.mkdir(parents=True, exist_ok=True)
  prompts = root / "prompts.jsonl"
  if not prompts.exists():  # processes of a multi-host test share the folder: written once, before they start
    words = ["alpha", "bravo", "charlie", "delta", "echo", "fox", "golf", "hotel", "india", "juliet"]
    prompts.write_text("\n".join(json.dumps({"question_id": i, "category": "c", "turns": [f"{w} {i} {w[::-1]}"]})
                                 for i, w in enumerate(words * 4)) + "\n")
  base = EagleTrainConfig()
  return dataclasses.replace(
      base, out=str(root / "out"),
      data=dataclasses.replace(base.data, prompts=str(prompts), max_new_tokens=48, gen_batch_size=40,
                               dataset_dir=str(root / "data"), eval_fraction=0.1),
      optim=dataclasses.replace(base.optim, lr=3e-3, warmup_steps=10, total_steps=steps),
      train=dataclasses.replace(base.train, steps=steps, batch_size=8, seq_len=96, checkpoint_dir=str(root / "ckpt"),
                                checkpoint_every=100, eval_every=steps, log_every=20))


def test_training_raises_agreement_and_the_result_decodes_exactly(learnable, trained):
  cfg, summary = trained
  before, after = summary["init_eval"], summary["final_eval"]
  assert after["eval/kl_1"] < 0.7 * before["eval/kl_1"]
  assert after["eval/agree_1"] > before["eval/agree_1"] + 0.2
  assert after["eval/tau_proxy"] > before["eval/tau_proxy"] + 0.5
  model, params = learnable
  draft, dp = load_eagle(cfg.out, model, params)
  prompts = [ByteTokenizer().encode(t) for t in ("alpha 0 ahpla", "golf 6 flog")]
  ref = gen.generate(model, params, prompts, max_new_tokens=40)
  res = gen.generate(model, params, prompts, max_new_tokens=40, drafter=EagleDrafter(draft, 3), draft_params=dp)
  assert res.tokens == ref.tokens
  untrained, udp = random_draft(model, params)
  base = gen.generate(model, params, prompts, max_new_tokens=40, drafter=EagleDrafter(untrained, 3),
                      draft_params=udp)
  assert res.tau > base.tau + 0.5


def test_folder_round_trip_and_clear_errors(tiny, tmp_path):
  model, params = tiny
  draft, dp = random_draft(model, params, vocab_ids=[1, 5, 9, 200])
  save_eagle(tmp_path / "d", draft, dp, dtype="float32")
  d2, dp2 = load_eagle(tmp_path / "d", model, params)
  assert d2 == draft
  for a, b in zip(jax.tree.leaves(dp), jax.tree.leaves(dp2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ModelLoadError, match="does not hold a feature-level draft"):
    load_eagle(tmp_path / "nothing", model, params)
  other_model, other_params = make_tiny(seed=1)
  with pytest.raises(ModelLoadError, match="fingerprint"):
    load_eagle(tmp_path / "d", other_model, other_params)
  wide_model, wide_params = make_tiny(seed=0, d_model=48)
  with pytest.raises(ModelLoadError, match=r"another target \(d_model 32 there, 48 here\); train one"):  # (it printed
    load_eagle(tmp_path / "d", wide_model, wide_params)                                   # a Python dict of pairs)
  wider_model, wider_params = make_tiny(seed=0, d_model=48, d_ff=96)  # each setting named
  with pytest.raises(ModelLoadError, match=r"another target \(d_model 32 there, 48 here; d_ff 64 there, 96 here\)"):
    load_eagle(tmp_path / "d", wider_model, wider_params)
  w = tmp_path / "d" / "model.safetensors"
  w.write_bytes(w.read_bytes()[:200])
  with pytest.raises(ModelLoadError, match="unreadable"):
    load_eagle(tmp_path / "d", model, params)
  with pytest.raises(InputError, match="gamma"):
    EagleDrafter(draft, 0)


def test_config_file_loads_and_rejects_bad_keys():
  cfg, fn = load_task_config(str(CONFIGS / "eagle_smollm2.yaml"))
  assert fn is train_eagle and cfg.eagle.n_layers == 1 and cfg.objective.unroll == 3
  with pytest.raises(ConfigError, match="unrol"):
    load_task_config(str(CONFIGS / "eagle_smollm2.yaml"), ["objective.unrol=2"])
  with pytest.raises((ConfigError, ValueError), match="unroll"):
    load_task_config(str(CONFIGS / "eagle_smollm2.yaml"), ["objective.unroll=0"])


# ---- draft trees ---------------------------------------------------------------------------------------------

@pytest.mark.slow  # run before resolving; by default test_eagle_trees_equal_greedy checks the tree source
def test_a_chain_tree_drafts_what_the_chain_drafter_drafts(learnable, trained):
  """OPT-Tree's chain shape on the feature-level source proposes, step for step, the chain drafter's tokens: the
  same accepted counts at every step (the tree's expansion and update feed the draft as the chain drafter does).
  A wider tree from the same draft accepts more per step."""
  from jaxspec.decoding.eagle import EagleTreeSource
  from jaxspec.decoding.opt_tree import OptTreeDrafter

  model, params = learnable
  draft, dp = load_eagle(trained[0].out, model, params)
  prompts = [ByteTokenizer().encode(t) for t in ("alpha 0 ahpla", "golf 6 flog", "india 8")]
  run = lambda drafter: gen.generate(model, params, prompts, max_new_tokens=40, drafter=drafter, draft_params=dp)
  ref = gen.generate(model, params, prompts, max_new_tokens=40)
  chain, tree = run(EagleDrafter(draft, 3)), run(OptTreeDrafter.chain(EagleTreeSource(draft, 1), 3))
  assert tree.tokens == chain.tokens == ref.tokens
  np.testing.assert_array_equal(tree.accept_hist, chain.accept_hist)
  assert 1.5 < chain.tau < 4.0  # drafts were accepted and rejected: both cases were compared
  wide = run(OptTreeDrafter(EagleTreeSource(draft, 3), nodes=12, depth=4, width=3, branch=3))
  assert wide.tokens == ref.tokens
  assert wide.tau > chain.tau


def test_eagle_trees_equal_greedy(tiny):
  from jaxspec.decoding.eagle import EagleTreeSource
  from jaxspec.decoding.opt_tree import OptTreeDrafter

  model, params = tiny
  draft, dp = random_draft(model, params, scale=3.0)
  ref = gen.generate(model, params, PROMPTS, max_new_tokens=NEW)
  res = gen.generate(model, params, PROMPTS, max_new_tokens=NEW, draft_params=dp,
                     drafter=small_tree(draft))
  assert res.tokens == ref.tokens
  assert res.accept_hist[:, 2:].sum() > 0  # some tree nodes were accepted
  with pytest.raises(ValueError, match="width"):
    gen.generate(model, params, PROMPTS, max_new_tokens=4, draft_params=dp,
                 drafter=OptTreeDrafter(EagleTreeSource(draft, 3), nodes=8, depth=4, width=2, branch=2))


def test_trained_eagle_trees_equal_greedy_in_a_ragged_batch(learnable, trained):
  """The random draft above is rarely right on the varied target; the trained one is, so here rows of different
  lengths accept paths of different depths in the same steps."""
  model, params = learnable
  draft, dp = load_eagle(trained[0].out, model, params)
  prompts = [ByteTokenizer().encode(t) for t in ("alpha 0 ahpla", "golf 6", "india 8 aidni india")]
  ref = gen.generate(model, params, prompts, max_new_tokens=NEW)
  res = gen.generate(model, params, prompts, max_new_tokens=NEW, draft_params=dp,
                     drafter=small_tree(draft))
  assert res.tokens == ref.tokens
  print("trained eagle tree: tau", res.tau, "accept lengths", res.accept_hist.sum(0).tolist())
  assert res.tau > 1.5 and (res.accept_hist[:, 3:].sum(1) > 0).all()  # every row accepted paths of depth >= 2


@pytest.mark.slow  # each gate compiles its own loop; tree gates are checked on BPD heads' trees in the default run
def test_gated_eagle_trees_equal_greedy(learnable, trained):
  """Gates among the steps' E[A] values, with the trained draft (a random one is rarely right, so its trees would
  never be worth verifying): at some gate some steps verify the tree and the others are one-token steps. Rows run
  alone, since in a batch one row asking to verify verifies every row's tree."""
  model, params = learnable
  draft, dp = load_eagle(trained[0].out, model, params)
  prompts = [ByteTokenizer().encode(t) for t in ("alpha 0 ahpla", "golf 6 flog", "india 8")]
  ref = gen.generate(model, params, prompts, max_new_tokens=NEW).tokens
  calls = {}
  # This target's distributions are flat, so the draft's trees score E[A] of only 0.085 to 0.1 though their first
  # tokens are mostly right (τ about 2); 9 > the 8 nodes: no tree's E[A] reaches it.
  for g in (0.0, 0.08, 0.0825, 0.085, 0.0875, 0.09, 0.0925, 0.095, 0.0975, 9.0):
    runs = [gen.generate(model, params, [p], max_new_tokens=NEW, draft_params=dp,
                         drafter=small_tree(draft, gate=g)) for p in prompts]
    assert [r.tokens[0] for r in runs] == ref, g
    calls[g] = sum(r.target_calls for r in runs)
  print("target calls by gate:", calls)
  assert calls[9.0] == len(prompts) * (NEW - 1)
  assert_gates_mix(calls)


@pytest.mark.slow  # tree sampling itself is checked in tests/test_opt_tree.py; this adds the feature-level source
def test_eagle_trees_sample_exactly(stat_models, continuation_logits):
  from jaxspec.decoding.eagle import EagleTreeSource
  from jaxspec.decoding.opt_tree import OptTreeDrafter

  target = stat_models[0]
  sdraft, sdp = random_draft(*target, seed=4, scale=2.0)
  probs = exact_distribution(continuation_logits, Warp(), SamplingParams.make(1.0))
  drafter = OptTreeDrafter(EagleTreeSource(sdraft, 2), nodes=5, depth=3, width=2, branch=2, warp=Warp())
  counts = drafter_sample_counts(target, drafter, sdp, 1.0, 1.0, SampleAcceptance())
  pvalue = chi2_pvalue(counts, probs)
  print(f"eagle tree: p = {pvalue:.3g}")
  assert pvalue > 1e-3


def test_shipped_eagle_equals_greedy_on_default_model(default_model, default_greedy):
  """The feature-level draft shipped for SmolLM2 (configs/eagle_smollm2.yaml): same tokens as greedy, fewer target
  calls."""
  from jaxspec.bench.methods import DEFAULT_EAGLE

  model, params, tok = default_model
  prompts, greedy = default_greedy
  draft, dp = load_eagle(DEFAULT_EAGLE, model, params)
  res = gen.generate(model, params, prompts, max_new_tokens=40, eos_ids=[tok.eos_id], drafter=EagleDrafter(draft, 4),
                     draft_params=dp)
  print(f"target calls: greedy {greedy.target_calls}, eagle {res.target_calls}")
  assert res.tokens == greedy.tokens
  assert res.target_calls < 0.85 * greedy.target_calls


def test_the_loss_counts_each_pass_at_the_entries_a_step_drafts_from(tiny):
  """Entry t is trained when x_{t+2} is a training target (mask[t + 1]), and pass s from entry s - 1 on (an earlier
  entry has no pass s - 1 feature before it). Each pass's kl, feature and agree are means over those entries, and
  tau_proxy is 1 + the mean, over the trained entries t0, of how many passes agree in a row along a step (pass i at
  entry t0 + i - 1): worked out in numpy from the draft's unrolled outputs."""
  from training.eagle import ObjectiveSection, eagle_loss

  model, params = tiny
  # A draft scoring two tokens: its top-1 agrees with the target's at some entries and not at others.
  draft, dp = random_draft(model, params, scale=3.0, vocab_ids=np.array([3, 7], np.int32))
  u, l = 3, 10
  tokens = np.zeros((2, l), np.int32)
  tokens[0, :9] = [5, 17, 33, 2, 90, 41, 7, 64, 12]
  tokens[1, :7] = [9, 8, 7, 6, 5, 4, 3]
  mask = np.zeros((2, l), np.float32)
  mask[0, 0:8] = 1  # every next token of a 9-token row (data.loss_on_prompt)
  mask[1, 2:6] = 1  # the answer of a 7-token row after a 3-token prompt
  pos = jnp.broadcast_to(jnp.arange(l), (2, l))
  _, feats, _ = model.forward(params, jnp.asarray(tokens), pos, model.init_cache(2, l),
                              jnp.tril(jnp.ones((2, l, l), bool)), logits=False)
  feats = np.asarray(feats, np.float32)
  batch = {"tokens": tokens, "mask": mask, "feats": feats}
  loss, m = jax.jit(eagle_loss(draft, ObjectiveSection(unroll=u)))(dp, {}, batch, jax.random.key(0))

  nxt = np.concatenate([tokens[:, 1:], np.zeros((2, 1), np.int32)], axis=1)
  outs = np.asarray(unrolled_outputs(draft, dp, jnp.asarray(feats), jnp.asarray(nxt), u), np.float64)
  target = np.concatenate([feats[:, 1:], np.zeros_like(feats[:, :1])], axis=1).astype(np.float64)
  log_softmax = lambda x: x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1,
                                                                                                     keepdims=True))
  table = np.asarray(dp["table_MxD"], np.float64)
  logp = log_softmax(target @ table.T)
  trained = [(b, t) for b in range(2) for t in range(l - 1) if mask[b, t + 1]]
  agree = np.zeros((u, 2, l), bool)
  want_loss = 0.0
  for s in range(1, u + 1):
    entries = [(b, t) for b, t in trained if t >= s - 1]
    logq = log_softmax(outs[s - 1] @ table.T)
    kl = np.mean([np.sum(np.exp(logp[b, t]) * (logp[b, t] - logq[b, t])) for b, t in entries])
    d = np.abs(outs[s - 1] - target)
    smooth = np.where(d < 1, 0.5 * d * d, d - 0.5).mean(-1)
    feature = np.mean([smooth[b, t] for b, t in entries])
    for b, t in entries:
      agree[s - 1, b, t] = logq[b, t].argmax() == logp[b, t].argmax()
    np.testing.assert_allclose([m[f"kl_{s}"], m[f"feature_{s}"]], [kl, feature], rtol=2e-4, err_msg=f"pass {s}")
    np.testing.assert_allclose(m[f"agree_{s}"], np.mean([agree[s - 1, b, t] for b, t in entries]), rtol=1e-6)
    want_loss += kl + 0.1 * feature
  np.testing.assert_allclose(loss, want_loss / u, rtol=2e-4)
  runs = []
  for b, t0 in trained:
    i = 0
    while i < u and t0 + i < l and agree[i, b, t0 + i]:
      i += 1
    runs.append(i)
  assert 0 < np.mean(runs) < u
  np.testing.assert_allclose(m["tau_proxy"], 1 + np.mean(runs), rtol=1e-6)


def test_the_draft_forward_cost_is_measured_for_tree_budgets(tiny):
  """nodes=auto priced an EAGLE tree's draft forwards at 0 (found by a review), so it always chose the deepest tree;
  its cost is measured now as an LM draft's is: a forward over n entries with its logits, alone and in a loop."""
  from jaxspec.bench.cost import eagle_cost

  model, params = tiny
  draft, dp = random_draft(model, params)
  for in_loop in (0, 3):
    cost = eagle_cost(draft, dp, [4, 1, 4], context=8, batch=2, repeats=2, in_loop=in_loop)
    assert sorted(cost) == [1, 4] and all(0 < s < 10 for s in cost.values())


def test_target_last_init_copies_the_targets_last_layers_and_final_norm():
  """`init="target_last"` (the training default) starts the draft's blocks as the target's last `n_layers` layers, in
  order, and its norm as the target's final norm; `init="random"` does neither. (A mutation audit found that copying
  another layer, or leaving the norm at its unit init, passed every other test.)"""
  model, params = make_tiny(seed=0, n_layers=3)
  # A final norm that is not the unit init, so a norm left at 1 shows.
  params = {**params, "final_norm": {"scale": params["final_norm"]["scale"] * 1.5 + 0.25}}
  for n in (1, 2):
    dp = EagleDraft(model.cfg, n).init_params(jax.random.key(0), params)
    for i in range(n):
      src = params[f"layers_{3 - n + i}"]
      assert jax.tree.structure(dp[f"layers_{i}"]) == jax.tree.structure(src)
      for a, b in zip(jax.tree.leaves(dp[f"layers_{i}"]), jax.tree.leaves(src)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b, np.float32))
    np.testing.assert_array_equal(dp["norm"]["scale"], params["final_norm"]["scale"])
  fresh = EagleDraft(model.cfg, 1).init_params(jax.random.key(0), params, init="random")
  assert not np.array_equal(fresh["norm"]["scale"], params["final_norm"]["scale"])
  with pytest.raises(ValueError, match="copies the target's last 4 layers"):
    EagleDraft(model.cfg, 4).init_params(jax.random.key(0), params)


def test_vocab_ids_must_lie_in_the_targets_vocabulary(tiny):
  model, params = tiny
  draft = EagleDraft(model.cfg, 1)
  v = model.vocab_size
  assert draft.vocab_params(params, [v - 1, 0])["vocab_ids"].tolist() == [0, v - 1]
  for bad in ([], [-1, 3], [v], [0, v]):
    with pytest.raises(ValueError, match="vocab_ids must be token ids"):
      draft.vocab_params(params, bad)


def test_a_two_layer_draft_round_trips_and_tensors_that_do_not_fit_are_refused(tiny, tmp_path):
  """The folder keeps the draft's depth (a 2-layer draft loads as one), and a folder whose tensors do not fit the
  draft its config describes is refused even where its config names this target."""
  model, params = tiny
  draft = EagleDraft(model.cfg, 2)
  dp = draft.init_params(jax.random.key(1), params, init="random")
  save_eagle(tmp_path / "two", draft, dp, dtype="float32")
  d2, dp2 = load_eagle(tmp_path / "two", model, params)
  assert d2 == draft and d2.n_layers == 2
  assert jax.tree.structure(dp2) == jax.tree.structure(dp)
  for a, b in zip(jax.tree.leaves(dp), jax.tree.leaves(dp2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Tensors of a draft for a target with a narrower MLP, under a config edited to name this target.
  narrow_model, narrow_params = make_tiny(seed=0, embed_scale=3.0, d_ff=48)
  narrow = EagleDraft(narrow_model.cfg, 1)
  save_eagle(tmp_path / "narrow", narrow, narrow.init_params(jax.random.key(1), narrow_params, init="random"),
             dtype="float32")
  config = tmp_path / "narrow" / "config.json"
  raw = json.loads(config.read_text())
  raw["jaxspec_eagle"]["target"]["d_ff"] = model.cfg.d_ff
  config.write_text(json.dumps(raw))
  with pytest.raises(ModelLoadError, match="does not have the tensors of a 1-layer draft"):
    load_eagle(tmp_path / "narrow", model, params)


def test_an_eagle_tree_holds_the_drafts_most_probable_paths(tiny):
  """With a frontier and branching as wide as the budget, the feature-level tree (its depths >= 2 fed from the draft
  cache through ancestor masks) is exactly the N most probable root paths of the draft, with their probabilities,
  each path scored as the chain drafter feeds it: (f̂, d_1), then (its output, d_2), ..., from the position after the
  committed ones. (A mutation audit found tree entries at the next position or written one frontier late, or a
  sibling's entry read as an ancestor's, still gave greedy output: only the drafts' quality changed.)"""
  import heapq

  from jaxspec.decoding.eagle import EagleTreeSource
  from jaxspec.decoding.opt_tree import OptTreeDrafter
  from tests.test_opt_tree import draft_paths, fake_loop

  model, params = tiny
  draft, dp = random_draft(model, params, scale=3.0)
  dp = dict(dp, table_MxD=dp["table_MxD"] * 20.0)  # top probabilities about 0.46, 0.24, 0.13: the best paths branch
  prompt, pending, n, depth = [5, 17, 33, 2, 90], 41, 8, 4
  info = prefill_info(model, params, prompt, pending)
  state = EagleDrafter(draft, 1).init(dp, info)
  step = jax.jit(lambda cache, feat, tok: draft.forward(dp, feat[:, None], tok[:, None], cache.lengths[:, None], cache,
                                                        jnp.ones((1, 1, 1), bool)))

  def logp(path):  # log q of the token after `path`, one cached forward per token as `EagleDrafter.propose` feeds
    cache, feat = state.cache, state.feat_BxD
    for tok in path:
      out, cache = step(cache, feat, jnp.asarray([tok], jnp.int32))
      cache, feat = cache.advance(jnp.ones((1,), jnp.int32)), out[:, 0]
    return np.asarray(jax.nn.log_softmax(draft.logits(dp, feat[:, None])[0, 0]), np.float64)

  heap = [(-v, (x,)) for x, v in enumerate(logp(()))]
  heapq.heapify(heap)
  want = {}
  while len(want) < n:
    neg, path = heapq.heappop(heap)
    want[path] = -neg
    if len(path) < depth:
      for x, v in enumerate(logp(path)):
        heapq.heappush(heap, (neg - v, path + (x,)))
  assert max(map(len, want)) >= 3 and len({p[0] for p in want}) >= 2, want  # deep and branching: both compared
  drafter = OptTreeDrafter(EagleTreeSource(draft, n), nodes=n, depth=depth, width=n, branch=n)
  tree, dstate = jax.jit(lambda p, s: drafter.propose(p, s, fake_loop([pending])))(dp, drafter.init(dp, info))
  assert sorted(draft_paths(tree)) == sorted(want)
  # E[A] of the best m-node tree for every m: the tree's own path probabilities, not just their order.
  best = sorted(np.exp(list(want.values())))[::-1]
  np.testing.assert_allclose(dstate.expected_accept_DxN[-1], np.cumsum(best), rtol=1e-5, atol=1e-6)


def test_a_tree_update_leaves_the_state_a_fresh_prefill_would(tiny):
  """As for the chain drafter: after a tree step that commits n tokens, the feature-level source's next-token feature
  and cache length are those of a fresh prefill over the committed sequence, also where the whole deepest path and the
  bonus token are committed (depth + 1 entries rewritten; a mutation audit found one entry fewer passed the suite,
  since random drafts are never accepted to full depth)."""
  from jaxspec.decoding.eagle import EagleTreeSource
  from jaxspec.decoding.opt_tree import OptTreeDrafter
  from tests.test_opt_tree import fake_loop

  model, params = tiny
  draft, dp = random_draft(model, params, scale=3.0)
  drafter = OptTreeDrafter.chain(EagleTreeSource(draft, 1), 3)
  prompt, pending, correction = [5, 17, 33, 2, 90], 41, 77
  for n_commit in (2, 4):
    dstate = drafter.init(dp, prefill_info(model, params, prompt, pending))
    tree, dstate = drafter.propose(dp, dstate, fake_loop([pending]))
    block = [pending] + [int(x) for x in tree.tokens_BxN[0]]
    emitted = block[1:n_commit] + [correction] + [0] * (4 - n_commit)
    hidden = features(model, params, prompt + block)[:, len(prompt):]
    acc = Acceptance(jnp.asarray([emitted], jnp.int32), jnp.arange(4)[None], jnp.asarray([n_commit], jnp.int32))
    dstate = drafter.update(dp, dstate, Verified(tree, jnp.zeros((1, 4, model.vocab_size)), hidden, acc,
                                                 jnp.asarray([True])))
    fresh = EagleDrafter(draft, 1).init(dp, prefill_info(model, params, prompt + block[:n_commit], correction))
    assert int(dstate.source.cache.lengths[0]) == len(prompt) + n_commit, n_commit
    np.testing.assert_allclose(dstate.source.feat_BxD, fresh.feat_BxD, atol=1e-5, err_msg=f"n_commit={n_commit}")


def test_a_subset_drafts_other_tokens_have_probability_zero(tiny):
  """A draft over a vocabulary subset scores its tokens with the target's output rows and gives every other token
  logit -1e30: probability exactly 0, so a sampling draft never proposes them. (Exact sampling holds for any q, so
  the χ² tests cannot see a finite logit there; a mutation audit found -30 passed them.)"""
  model, params = tiny
  ids = [1, 5, 9, 200]
  draft, dp = random_draft(model, params, vocab_ids=ids)
  feat = jax.random.normal(jax.random.key(0), (2, 3, model.cfg.d_model))
  logits = np.asarray(draft.logits(dp, feat))
  table = np.asarray(model.output_table(params))[ids]
  np.testing.assert_allclose(logits[..., ids], np.asarray(feat) @ table.T, rtol=1e-4, atol=1e-4)
  q = np.asarray(jax.nn.softmax(draft.logits(dp, feat), axis=-1))
  assert np.all(np.delete(q, ids, axis=-1) == 0.0)
  np.testing.assert_allclose(q[..., ids].sum(-1), 1.0, rtol=1e-5)
