"""Speculative sampling with a draft model: greedy equivalence, the draft cache under ragged acceptance, vocabulary
checks, layer-skip drafts, and statistical exactness of the sampled output (with a broken acceptor as a control)."""

import dataclasses
import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

from jaxspec.decoding import generate as gen
from jaxspec.decoding.accept import SampleAcceptance
from jaxspec.decoding.loop import NoDraft, decode
from jaxspec.decoding.protocol import Acceptance, Draft, PrefillInfo, Verified
from jaxspec.decoding.sampling import SamplingParams, Warp
from jaxspec.decoding.speculative import DraftModelDrafter, draw, gate_score, layerskip_draft, vocab_check
from jaxspec.errors import InputError
from jaxspec.models.llama import LlamaLM, tiny_config
from tests.conftest import SAMPLING_COMPILE_OPTIONS, make_tiny

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9] * 11]  # different lengths, one bucket
NEW = 20


@pytest.fixture(scope="module")
def other_tiny():
  """A second tiny model with the same vocabulary: a draft that often disagrees with the target."""
  return make_tiny(seed=1)


@pytest.fixture(scope="module")
def greedy_ref(tiny):
  model, params = tiny
  return gen.generate(model, params, PROMPTS, max_new_tokens=NEW).tokens


@pytest.mark.parametrize("gamma", [1, 4])
def test_greedy_speculation_equals_greedy(tiny, other_tiny, greedy_ref, gamma):
  model, params = tiny
  draft_model, draft_params = other_tiny
  res = gen.generate(model, params, PROMPTS, max_new_tokens=NEW, drafter=DraftModelDrafter(draft_model, gamma),
                     draft_params=draft_params)
  assert res.tokens == greedy_ref
  assert res.drafter_calls == gamma * res.target_calls

  # The target as its own draft: every step accepts all γ drafts (the all-accepted case every time), so τ = γ + 1
  # but for the truncation of the last step. Same config, same compiled program as above.
  res = gen.generate(model, params, PROMPTS, max_new_tokens=NEW, drafter=DraftModelDrafter(model, gamma),
                     draft_params=params)
  assert res.tokens == greedy_ref
  calls = -(-(NEW - 1) // (gamma + 1))
  assert res.active_calls == [calls] * len(PROMPTS)
  assert res.accept_hist[:, gamma + 1].tolist() == [calls] * len(PROMPTS)
  assert res.tau == (NEW - 1) / calls


def test_adaptive_and_gated_drafts_equal_greedy(tiny, other_tiny, greedy_ref):
  model, params = tiny
  draft_model, draft_params = other_tiny
  # A flatter draft (final norm scaled down): its confidences spread, so stops and gates take both ways.
  draft_params = dict(draft_params, final_norm=jax.tree.map(lambda x: 0.3 * x, draft_params["final_norm"]))
  runs = {}
  for stop, gate in [(0.1, 0.0), (0.0, 0.2), (0.0, 4.0)]:  # without either, γ forwards a step: see above
    res = gen.generate(model, params, PROMPTS, max_new_tokens=NEW, draft_params=draft_params,
                       drafter=DraftModelDrafter(draft_model, 4, stop=stop, gate=gate))
    assert res.tokens == greedy_ref, (stop, gate)
    runs[stop, gate] = res
  print("draft forwards, target calls, accept histogram by (stop, gate):",
        {k: (int(r.drafter_stats["draft_forwards"]), r.target_calls, r.accept_hist.sum(0).tolist())
         for k, r in runs.items()})
  stopped = runs[0.1, 0.0]
  assert stopped.target_calls < int(stopped.drafter_stats["draft_forwards"]) < 4 * stopped.target_calls
  # γ = 1 with a stop (`spec:gamma=1:stop=0.6`) raised an IndexError while tracing (found by fuzzing)
  res = gen.generate(model, params, PROMPTS, max_new_tokens=NEW, draft_params=draft_params,
                     drafter=DraftModelDrafter(draft_model, 1, stop=0.5))
  assert res.tokens == greedy_ref
  # Gate 0.2 verifies some steps (all 4 drafts accepted in some) and not others; gate 4 = γ verifies none (a score
  # reaches γ only if all four confidences are 1): every step commits one token, as greedy decoding does.
  hist = runs[0.0, 0.2].accept_hist.sum(0)
  assert hist[1] > 0 and hist[5] > 0
  assert runs[0.0, 4.0].accept_hist.sum(0)[2:].sum() == 0 and runs[0.0, 4.0].target_calls == NEW - 1

  # The target as its own draft, one row: every proposed token is accepted and none past a stop, so each step
  # commits its m proposed tokens + 1, and the draft ran m forwards for them.
  for prompt, ref in zip(PROMPTS, greedy_ref):
    res = gen.generate(model, params, [prompt], max_new_tokens=NEW, drafter=DraftModelDrafter(model, 4, stop=0.999),
                       draft_params=params)
    assert res.tokens == [ref]
    hist = res.accept_hist[0]
    assert hist[1] == 0 and hist[2] > 0
    assert int(res.drafter_stats["draft_forwards"]) == int(hist @ np.arange(len(hist))) - res.target_calls


def test_draft_confidences_and_gate_scores_follow_their_definitions():
  """The numbers `stop` and `gate` decide on: a greedy draft's confidence is its top probability over the whole
  vocabulary (1 when no confidence is asked for), a sampling draft's is q of the token it drew; a greedy chain scores
  its expected accepted tokens Σ_i Π_{j<=i} c_j, a sampling chain Σ_{i<=γ} m^i from the top probability m of its
  first q. The output is exact whatever they are (greedy stays greedy, the χ² tests pass), so only the speed shows a
  wrong formula: this checks them on hand-made numbers."""
  probs = np.asarray([[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.1, 0.7]], np.float32)
  logits = jnp.asarray(np.log(np.maximum(probs, 1e-30)) + 7.0)  # unnormalised: the offset must not matter
  sp = SamplingParams.make(1.0)
  tok, q, conf = draw(Warp(), True, None, logits, sp, confidence=True)
  assert tok.tolist() == [0, 3]
  np.testing.assert_array_equal(q, np.eye(4)[[0, 3]])
  np.testing.assert_allclose(conf, [0.5, 0.7], rtol=1e-5)
  np.testing.assert_array_equal(draw(Warp(), True, None, logits, sp)[2], [1.0, 1.0])
  for seed in range(4):
    tok, q, conf = draw(Warp(), False, jax.random.key(seed), logits, sp)
    np.testing.assert_allclose(q, probs, atol=1e-6)
    np.testing.assert_allclose(conf, probs[[0, 1], np.asarray(tok)], rtol=1e-5)
  gamma = 3
  conf_BxN = jnp.asarray([[0.5, 0.4, 0.0], [0.9, 1.0, 0.5]])  # row 0 stopped after two tokens
  q_BxNxV = jnp.asarray(np.stack([np.broadcast_to(probs[0], (gamma, 4)), np.broadcast_to(probs[1], (gamma, 4))]))
  draft = Draft(jnp.zeros((2, gamma), jnp.int32), jnp.broadcast_to(jnp.arange(1, gamma + 1), (2, gamma)),
                jnp.broadcast_to(jnp.tril(jnp.ones((gamma, gamma), bool)), (2, gamma, gamma)),
                jnp.broadcast_to(jnp.arange(-1, gamma - 1), (2, gamma)), q_BxNxV)
  np.testing.assert_allclose(gate_score(True, draft, conf_BxN), [0.5 + 0.2, 0.9 + 0.9 + 0.45], rtol=1e-6)
  np.testing.assert_allclose(gate_score(False, draft, conf_BxN), [0.5 + 0.25 + 0.125, 0.7 + 0.49 + 0.343],
                             rtol=1e-6)


def test_layerskip_draft_equals_greedy(tiny, greedy_ref):
  model, params = tiny
  draft_model, draft_params = layerskip_draft(model, params, 1)
  assert draft_model.cfg.n_layers == 1 and set(draft_params) == {"embed", "layers_0", "final_norm"}
  assert draft_params["layers_0"] is params["layers_0"]  # shared, not copied
  res = gen.generate(model, params, PROMPTS, max_new_tokens=NEW, drafter=DraftModelDrafter(draft_model, 2),
                     draft_params=draft_params)
  assert res.tokens == greedy_ref
  assert res.accept_hist[:, 2:].sum() > 0  # some drafts were accepted: not only the target's own tokens compared


def test_layerskip_draft_checks_its_depth(tiny):
  model, params = tiny
  for bad in (0, model.cfg.n_layers):
    with pytest.raises(InputError, match="layer-skip"):
      layerskip_draft(model, params, bad)


def test_vocabulary_mismatch_is_a_clear_error():
  vocab_check(LlamaLM(tiny_config()), LlamaLM(tiny_config(n_layers=1)))
  with pytest.raises(InputError, match="draft and target vocabularies differ.*256.*128.*tokenizer"):
    vocab_check(LlamaLM(tiny_config()), LlamaLM(tiny_config(vocab_size=128)))
  with pytest.raises(InputError, match="gamma"):
    DraftModelDrafter(LlamaLM(tiny_config()), 0)


def test_draft_cache_follows_ragged_acceptance():
  """Drives init / propose / update by hand with chosen per-row commits (none, some, all γ drafts accepted; an idle
  row) and checks every drafted distribution q against the draft model run from scratch on the committed text."""
  drive_draft_cache([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]], lookup=0)


def test_draft_cache_stays_in_step_after_copies():
  """As above with copies (`lookup=1`): the prompts hold the corrections the steps commit, so rows copy in some steps
  and draft in later ones, and those drafts must read a cache that holds the copied tokens."""
  prompts = [[0, 50, 51, 52, 9], [3, 30, 31], [13, 40, 41, 12]]
  copied_then_drafted = lambda row: any(c and not later for i, (_, c) in enumerate(row) for _, later in row[i + 1:])
  steps = drive_draft_cache(prompts, lookup=1)  # rows copy and draft in the same step: drafts, then rewrites
  assert sum(map(copied_then_drafted, steps)) >= 1, steps  # the case this test is for happens
  # One row a time, a copying step copies in every row: one forward over the copied block, no drafts.
  alone = [drive_draft_cache([q], lookup=1, row=r)[0] for r, q in enumerate(prompts)]
  assert alone == steps


def test_a_copy_step_follows_the_match_length_and_the_active_rows():
  """One propose / update with `lookup=2` by hand: a row whose last 2 tokens (exactly `lookup`) occurred before
  copies, a row with no match drafts. With both rows active the step drafts, then rewrites the copying row's block:
  the drafting row's cache must still hold its own drafts' entries (a rewrite of every row with the copy leaves
  filler there, which the ragged walks above miss when no drafting row of a mixed step accepts a draft). When the
  drafting row is inactive (finished), the step is a copy-only step: one draft forward over the copied block
  instead of γ; `copied_steps` counts active rows only (not an idle row that copies). Output never shows these
  (greedy stays greedy either way); speed and the counters do."""
  model = LlamaLM(tiny_config(vocab_size=64, n_layers=1))
  params = model.init_params(jax.random.key(7))
  gamma = 3
  drafter = DraftModelDrafter(model, gamma, lookup=2)
  prompts, first = [[5, 6, 9, 5], [1, 2, 3, 0]], [6, 4]  # contexts [5 6 9 5 6] ([5 6] at 0) and [1 2 3 4] (none)
  prefill = PrefillInfo(jnp.asarray(prompts), jnp.asarray([4, 3]), jnp.zeros((2, 1)), jnp.zeros((2, 64)),
                        jnp.asarray(first), capacity=32, rng=jax.random.key(0))
  for active in ([True, True], [True, False], [False, True]):  # a mixed step, a copy-only step, an idle copying row
    loop = types.SimpleNamespace(pending_B=jnp.asarray(first), sp=SamplingParams.make(0.0),
                                 active_B=jnp.asarray(active))
    dstate = drafter.init(params, prefill)
    draft, dstate = drafter.propose(params, dstate, loop)
    assert dstate.copy_B.tolist() == [True, False]
    assert draft.tokens_BxN[0].tolist() == [9, 5, 6]  # what followed [5 6], then the span repeats
    assert int(dstate.forwards) == (1 if active == [True, False] else gamma + 1)  # γ drafts, then the rewrite
    if active == [True, True]:  # the drafting row's entries are those of the same drafter without copies
      plain = DraftModelDrafter(model, gamma)
      plain_draft, plain_state = plain.propose(params, plain.init(params, prefill), loop)
      assert draft.tokens_BxN[1].tolist() == plain_draft.tokens_BxN[1].tolist()
      end = int(plain_state.cache.lengths[1])
      for got, want in zip(dstate.cache.k, plain_state.cache.k):  # keys [B, K, H, S]
        np.testing.assert_allclose(got[1, :, :, :end], want[1, :, :, :end], atol=1e-5)
      for got, want in zip(dstate.cache.v, plain_state.cache.v):  # values [B, K, S, H]
        np.testing.assert_allclose(got[1, :, :end], want[1, :, :end], atol=1e-5)
    acc = Acceptance(jnp.zeros((2, gamma + 1), jnp.int32), jnp.broadcast_to(jnp.arange(gamma + 1), (2, gamma + 1)),
                     jnp.asarray([2, 1], jnp.int32))
    dstate = drafter.update(params, dstate, Verified(draft, None, None, acc, jnp.asarray(active)))
    assert int(drafter.stats(dstate)["copied_steps"]) == int(active[0])


def drive_draft_cache(prompts, lookup: int, row: int = 0) -> list[list[tuple[int, bool]]]:
  """The ragged-acceptance walk of the two tests above, for rows `row, row + 1, ...` of its schedule; returns per
  row the (step, copied) of each step."""
  model = LlamaLM(tiny_config(vocab_size=64, n_layers=1))  # unscaled init: q depends on all the context
  params = model.init_params(jax.random.key(7))
  gamma, v, width = 3, 64, 32
  drafter = DraftModelDrafter(model, gamma, greedy=False, lookup=lookup)
  sp = SamplingParams.make(1.0)
  b = len(prompts)
  first = [20, 21, 22][row:row + b]
  p = max(map(len, prompts))
  prefill = PrefillInfo(jnp.asarray([q + [0] * (p - len(q)) for q in prompts]), jnp.asarray([len(q) for q in prompts]),
                        jnp.zeros((b, 1)), jnp.zeros((b, v)), jnp.asarray(first), capacity=64, rng=jax.random.key(0))
  init = jax.jit(drafter.init)
  loop = lambda pending_B: types.SimpleNamespace(pending_B=pending_B, sp=sp, active_B=jnp.ones((b,), bool))
  propose = jax.jit(lambda dstate, pending_B: drafter.propose(params, dstate, loop(pending_B)))
  update = jax.jit(lambda dstate, draft, acc, active_B: drafter.update(params, dstate,
                                                                       Verified(draft, None, None, acc, active_B)))

  @jax.jit
  def uncached_log_probs(seq_1xW):  # right padding is invisible to earlier positions under the causal mask
    logits = model.forward(params, seq_1xW, jnp.arange(width)[None], model.init_cache(1, width),
                           jnp.tril(jnp.ones((1, width, width), bool)))[0]
    return jax.nn.log_softmax(logits[0], axis=-1)

  dstate = init(params, prefill)
  seqs = [q + [f] for q, f in zip(prompts, first)]  # committed tokens + the pending one
  steps = [[] for _ in range(b)]
  # n_commit per row and step (1: no draft accepted; γ + 1: all accepted); 0 marks an idle row.
  for step, commits in enumerate([[1, 4, 2], [4, 4, 0], [2, 1, 4], [4, 3, 4]]):
    commits = commits[row:row + b]
    draft, dstate = propose(dstate, jnp.asarray([s[-1] for s in seqs]))
    toks = np.asarray(draft.tokens_BxN)
    q = np.asarray(draft.probs_BxNxV)
    copy_B = np.asarray(dstate.copy_B) if lookup else np.zeros(b, bool)
    for r in range(b):
      steps[r].append((step, bool(copy_B[r])))
      if copy_B[r]:  # a point mass on each copied token
        np.testing.assert_array_equal(q[r], np.eye(v)[toks[r]])
        continue
      seq = seqs[r] + toks[r, :gamma - 1].tolist()
      ref = np.asarray(uncached_log_probs(jnp.asarray([seq + [0] * (width - len(seq))])))
      np.testing.assert_allclose(np.log(q[r]), ref[len(seqs[r]) - 1:len(seq)], atol=2e-4,
                                 err_msg=f"step {step}, row {r}")
    active = np.asarray(commits) > 0
    n_commit = np.maximum(commits, 1)
    new_pending = [(step * 7 + (row + r) * 3) % v for r in range(b)]  # a correction / bonus token: the new pending
    emitted = np.asarray([toks[r, :n_commit[r] - 1].tolist() + [new_pending[r]] + [0] * (gamma + 1 - n_commit[r])
                          for r in range(b)], np.int32)
    acc = Acceptance(jnp.asarray(emitted), jnp.broadcast_to(jnp.arange(gamma + 1), (b, gamma + 1)),
                     jnp.asarray(n_commit, jnp.int32))
    dstate = update(dstate, draft, acc, jnp.asarray(active))
    for r in range(b):
      if active[r]:
        seqs[r] = seqs[r] + toks[r, :n_commit[r] - 1].tolist() + [new_pending[r]]
    np.testing.assert_array_equal(dstate.cache.lengths, [len(s) - 2 for s in seqs])
  return steps


# ---- Statistical exactness --------------------------------------------------------------------------------------

V = 8
PROMPT = [3, 1, 4, 1, 5]
N_NEW = 3
ROWS, SEEDS = 25_000, 4  # 10^5 samples of N_NEW tokens per setting


def small_lm(seed: int, scale: float = 8.0, vocab: int = V):
  """A random 8-token model whose conditionals are spread out (largest probability about 0.2 to 0.6)."""
  model = LlamaLM(tiny_config(vocab_size=vocab, n_layers=1))
  params = dict(model.init_params(jax.random.key(seed)))
  params["embed"] = {"embedding": params["embed"]["embedding"] * scale}
  return model, params


@pytest.fixture(scope="module")
def stat_models():
  return small_lm(0), small_lm(1)  # target, draft (different)


@pytest.fixture(scope="module")
def continuation_logits(stat_models):
  """All V^N_NEW continuations of PROMPT (row i is i read as a base-V number) and the target's logits `[n, N_NEW, V]`
  before each of their tokens, from one forward over the whole sequences."""
  return stat_continuation_logits(stat_models[0])


def stat_continuation_logits(target, n_new: int = N_NEW, prompt=PROMPT):
  """`continuation_logits` for any small target `(model, params)`, of `n_new` tokens after `prompt`."""
  model, params = target
  conts = np.asarray(list(itertools.product(range(model.vocab_size), repeat=n_new)), np.int32)
  n, p = len(conts), len(prompt)
  t = p + n_new
  seqs = np.concatenate([np.broadcast_to(np.asarray(prompt, np.int32), (n, p)), conts], axis=1)
  fwd = jax.jit(lambda seqs: model.forward(params, seqs, jnp.broadcast_to(jnp.arange(t), (n, t)),
                                           model.init_cache(n, t),
                                           jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (n, t, t)))[0])
  return conts, fwd(jnp.asarray(seqs))[:, p - 1:t - 1]


def exact_distribution(continuation_logits, warp: Warp, sp: SamplingParams) -> np.ndarray:
  """P(continuation) under the target: the product of its warped conditionals along the continuation."""
  conts, logits = continuation_logits
  probs_NxKxV = np.asarray(warp.probs(logits, sp), np.float64)
  probs = np.prod(np.take_along_axis(probs_NxKxV, conts[:, :, None], axis=-1)[..., 0], axis=-1)
  return probs / probs.sum()


def sample_counts(stat_models, gamma, temperature, top_k, top_p, greedy=False, acceptor=None) -> np.ndarray:
  """Counts of each continuation over ROWS * SEEDS speculative generations with the draft model of `stat_models`."""
  _, (draft_model, draft_params) = stat_models
  warp = Warp(top_k, top_p < 1)
  return drafter_sample_counts(stat_models[0], DraftModelDrafter(draft_model, gamma, warp, greedy=greedy),
                               draft_params, temperature, top_p, acceptor or SampleAcceptance(warp))


def drafter_sample_counts(target, drafter, draft_params, temperature, top_p, acceptor, seeds=SEEDS,
                          n_new: int = N_NEW, prompt=PROMPT) -> np.ndarray:
  """Counts of each continuation of `n_new` tokens after `prompt` over ROWS * seeds generations of `target` with any
  drafter and acceptor (the jitted loop called directly, with a cache just long enough, so 10^5 samples take
  seconds)."""
  model, params = target
  p, v = len(prompt), model.vocab_size
  args = lambda seed: (params, jnp.asarray(np.tile(prompt, (ROWS, 1)), jnp.int32), jnp.full((ROWS,), p, jnp.int32),
                       jnp.full((ROWS,), n_new, jnp.int32), jnp.asarray([-1], jnp.int32), jax.random.key(seed),
                       SamplingParams.make(temperature, top_p), draft_params)
  static = dict(model=model, drafter=drafter, acceptor=acceptor, out_len=n_new,
                capacity=p + n_new + drafter.num_nodes + 1, pad_id=0)
  rest = {k: v for k, v in static.items() if k != "model"}
  program = gen.decode_jit.lower(model, *args(0), **rest).compile(SAMPLING_COMPILE_OPTIONS)
  counts = np.zeros(v ** n_new, np.int64)
  for seed in range(seeds):
    out = program(*args(seed))
    assert np.all(np.asarray(out.lengths_B) == n_new)
    counts += np.bincount(np.asarray(out.tokens_BxO) @ (v ** np.arange(n_new - 1, -1, -1)), minlength=v ** n_new)
  return counts


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
  """χ² goodness of fit; cells with expected count < 5 are pooled. A sample outside the support gives 0."""
  if counts[probs == 0].sum():
    return 0.0
  expected = probs * counts.sum()
  big = expected >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  if exp[-1] < 5:  # a pool too small to stand alone joins the smallest big cell
    i = np.argmin(exp[:-1])
    obs[i] += obs[-1]
    exp[i] += exp[-1]
    obs, exp = obs[:-1], exp[:-1]
  return float(sps.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


# Each setting compiles its own loop (~10 s on a busy 2-core CPU); one runs only with `-m slow`.
@pytest.mark.parametrize("gamma,temperature,top_k,top_p,greedy", [
    (2, 1.0, 0, 1.0, False),
    (3, 0.7, 0, 0.9, False),  # top-p warps draft and target alike
    (1, 1.3, 3, 1.0, False),
    pytest.param(2, 1.0, 0, 1.0, True, marks=pytest.mark.slow),  # argmax drafts: q is a point mass, still exact
])
def test_speculative_sampling_is_exact(stat_models, continuation_logits, gamma, temperature, top_k, top_p, greedy):
  """The continuations of 10^5 speculative generations follow the target's own warped distribution (χ² test)."""
  probs = exact_distribution(continuation_logits, Warp(top_k, top_p < 1), SamplingParams.make(temperature, top_p))
  counts = sample_counts(stat_models, gamma, temperature, top_k, top_p, greedy)
  pvalue = chi2_pvalue(counts, probs)
  print(f"γ={gamma} T={temperature} top_k={top_k} top_p={top_p} greedy={greedy}: p = {pvalue:.3g}")
  assert pvalue > 1e-3


@dataclasses.dataclass(frozen=True)
class ReusedKey(SampleAcceptance):
  """BROKEN on purpose: every one-token step draws with one fixed key, in every step and every seed (a crude form of
  a loop key that is not advanced). Each token is still drawn from its own conditional, but the steps' Gumbel
  noises are equal, so the tokens of a continuation are dependent."""

  def accept(self, rng, draft, logits_BxTxV, sp, is_chain):
    return super().accept(jax.random.key(7), draft, logits_BxTxV, sp, is_chain)


@pytest.mark.parametrize("broken", [False, pytest.param(True, marks=pytest.mark.slow)])  # power: a broken rule below
def test_speculative_sampling_is_exact_over_several_verify_steps(broken):
  """With 3 new tokens and γ = 2 most generations end after one verify forward, so what a step hands to the next
  (keys, the draft's cache after a rejection) is tested little: 5 tokens of a 4-token vocabulary (1024
  continuations) take 2-3 verify steps, and the same test rejects a loop whose acceptance reuses one key in every
  step."""
  target, (draft_model, draft_params) = small_lm(0, vocab=4), small_lm(1, vocab=4)
  warp, prompt = Warp(0, False), [3, 1, 2, 1, 0]
  probs = exact_distribution(stat_continuation_logits(target, 5, prompt), warp, SamplingParams.make(1.0, 1.0))
  acceptor = (ReusedKey if broken else SampleAcceptance)(warp)
  counts = drafter_sample_counts(target, DraftModelDrafter(draft_model, 2, warp), draft_params, 1.0, 1.0, acceptor,
                                 n_new=5, prompt=prompt)
  pvalue = chi2_pvalue(counts, probs)
  print(f"γ=2, 5 new tokens, broken={broken}: p = {pvalue:.3g}")
  assert (pvalue < 1e-6) if broken else (pvalue > 1e-3)


# The loop's own sampling (no draft): the prefill's token and the one-token steps after it, jointly.
@pytest.mark.parametrize("temperature,top_k,top_p,broken", [
    (1.0, 0, 1.0, False),
    (0.6, 0, 0.8, False),
    pytest.param(1.4, 3, 1.0, False, marks=pytest.mark.slow),
    (1.0, 0, 1.0, True),
])
def test_plain_sampling_is_exact(stat_models, continuation_logits, temperature, top_k, top_p, broken):
  """10^5 plain sampled continuations of N_NEW tokens follow the target's warped distribution (χ²), and the same
  test rejects a loop that reuses one key for every step."""
  warp = Warp(top_k, top_p < 1)
  probs = exact_distribution(continuation_logits, warp, SamplingParams.make(temperature, top_p))
  acceptor = (ReusedKey if broken else SampleAcceptance)(warp)
  counts = drafter_sample_counts(stat_models[0], NoDraft(), None, temperature, top_p, acceptor)
  pvalue = chi2_pvalue(counts, probs)
  print(f"plain T={temperature} top_k={top_k} top_p={top_p} broken={broken}: p = {pvalue:.3g}")
  assert (pvalue < 1e-6) if broken else (pvalue > 1e-3)


def per_row_sample_counts(target, drafter, draft_params, acceptor, seeds: int = SEEDS, draft_forwards: bool = False):
  """As `drafter_sample_counts` at temperature 1, but every generation is its own batch of one (the loop vmapped
  over rows), so a gate decides per generation. In one batch of 25,000 rows some row always asks for
  verification and the one-token branch would never run; under vmap the loop's `lax.cond` runs both branches and
  selects per row, which is what batch-1 decoding computes. Returns the counts and each generation's target calls
  (and, with `draft_forwards`, its draft-model forwards)."""
  model, params = target
  p = len(PROMPT)
  prompt_1xP = jnp.asarray([PROMPT], jnp.int32)

  def one(key):
    out = decode(model, params, prompt_1xP, jnp.asarray([p], jnp.int32), jnp.asarray([N_NEW], jnp.int32),
                     jnp.asarray([-1], jnp.int32), key, SamplingParams.make(1.0), draft_params, drafter=drafter,
                     acceptor=acceptor, out_len=N_NEW, capacity=p + N_NEW + drafter.num_nodes + 1, pad_id=0)
    return out.tokens_BxO[0], out.lengths_B[0], out.stats.target_calls, out.drafter_stats.get("draft_forwards", 0)

  run = jax.jit(jax.vmap(one)).lower(jax.random.split(jax.random.key(0), ROWS)).compile(SAMPLING_COMPILE_OPTIONS)
  counts = np.zeros(V ** N_NEW, np.int64)
  calls, forwards = [], []
  for seed in range(seeds):
    tokens, lengths, calls_R, forwards_R = run(jax.random.split(jax.random.key(seed), ROWS))
    assert np.all(np.asarray(lengths) == N_NEW)
    counts += np.bincount(np.asarray(tokens) @ (V ** np.arange(N_NEW - 1, -1, -1)), minlength=V ** N_NEW)
    calls.append(np.asarray(calls_R))
    forwards.append(np.broadcast_to(np.asarray(forwards_R), (ROWS,)))
  if draft_forwards:
    return counts, np.concatenate(calls), np.concatenate(forwards)
  return counts, np.concatenate(calls)


def assert_gate_skips_some_drafts(target, ungated, draft_params, acceptor, calls_gated: np.ndarray,
                                  at_most: float = 0.8) -> None:
  """A gated χ² test only tests the gate if both branches ran: generations that take all their new tokens in one
  call (a verified draft) must be rarer than without the gate (`at_most` times as common), and not absent."""
  _, calls_ungated = per_row_sample_counts(target, ungated, draft_params, acceptor, seeds=1)
  one, one_ungated = np.mean(calls_gated == 1), np.mean(calls_ungated == 1)
  print(f"one-call generations {one:.3f} (ungated {one_ungated:.3f})")
  assert 0 < one < at_most * one_ungated


# Adaptive γ and gating at temperature 1: drafts that stop early, and steps that verify only the pending token
# (drafted tokens set to -1). Both acceptance paths: q from a sampling draft (chain rule), point masses from an
# argmax draft (tree rule). On these 8-token models the thresholds make stopped, full and gated steps all common.
@pytest.mark.parametrize("greedy,stop,gate", [
    (False, 0.3, 0.45),
    pytest.param(False, 0.3, 0.0, marks=pytest.mark.slow),
    pytest.param(True, 0.45, 1.0, marks=pytest.mark.slow),
])
def test_adaptive_and_gated_speculative_sampling_is_exact(stat_models, continuation_logits, greedy, stop, gate):
  _, (draft_model, draft_params) = stat_models
  probs = exact_distribution(continuation_logits, Warp(), SamplingParams.make(1.0))
  drafter = DraftModelDrafter(draft_model, 3, greedy=greedy, stop=stop, gate=gate)
  counts, calls, forwards = per_row_sample_counts(stat_models[0], drafter, draft_params, SampleAcceptance(),
                                                  draft_forwards=True)
  pvalue = chi2_pvalue(counts, probs)
  print(f"stop={stop} gate={gate} greedy draft={greedy}: p = {pvalue:.3g}")
  assert pvalue > 1e-3
  # The stop rule did stop drafts: fewer draft forwards per target call than the same drafter without it.
  _, calls_full, forwards_full = per_row_sample_counts(stat_models[0], dataclasses.replace(drafter, stop=0.0),
                                                       draft_params, SampleAcceptance(), seeds=1, draft_forwards=True)
  per_call, per_call_full = forwards.sum() / calls.sum(), forwards_full.sum() / calls_full.sum()
  print(f"draft forwards per target call {per_call:.2f} (without stop {per_call_full:.2f})")
  assert per_call < 0.95 * per_call_full
  if gate:
    assert_gate_skips_some_drafts(stat_models[0], dataclasses.replace(drafter, gate=0.0), draft_params,
                                  SampleAcceptance(), calls)


def test_adaptive_speculative_sampling_is_exact_in_a_batch(stat_models, continuation_logits):
  """The vmapped tests above run each generation as its own batch, where a row that stopped drafting stops the draft
  loop; in one batch of many rows a stopped row waits while the others draft on, and its later draft tokens must be
  marked as not proposed. Keeping them (q zeroed, so a p > 0 accepts them) fails this test (p = 0 in an audit)."""
  _, (draft_model, draft_params) = stat_models
  probs = exact_distribution(continuation_logits, Warp(), SamplingParams.make(1.0))
  counts = drafter_sample_counts(stat_models[0], DraftModelDrafter(draft_model, 3, greedy=False, stop=0.3),
                                 draft_params, 1.0, 1.0, SampleAcceptance())
  pvalue = chi2_pvalue(counts, probs)
  print(f"batched stop=0.3: p = {pvalue:.3g}")
  assert pvalue > 1e-3


def test_speculative_sampling_with_a_subset_head_is_exact(stat_models, continuation_logits):
  """A draft that can propose only 4 of the 8 tokens (q = 0 on the rest): the output is still the target's."""
  from jaxspec.models.subset import subset_head

  _, (draft_model, draft_params) = stat_models
  sub, sub_params = subset_head(draft_model, draft_params, [0, 2, 3, 6])
  probs = exact_distribution(continuation_logits, Warp(), SamplingParams.make(1.0))
  counts = drafter_sample_counts(stat_models[0], DraftModelDrafter(sub, 2, greedy=False), sub_params, 1.0, 1.0,
                                 SampleAcceptance())
  pvalue = chi2_pvalue(counts, probs)
  print(f"subset head: p = {pvalue:.3g}")
  assert pvalue > 1e-3


@dataclasses.dataclass(frozen=True)
class SampleDependentGate(DraftModelDrafter):
  """BROKEN on purpose: gates a sampling draft on the probabilities of its own draws, Σ_i Π_{j<=i} q_j(d_j)."""

  def gate_score(self, draft, conf_BxN):
    return jnp.sum(jnp.cumprod(conf_BxN, axis=-1), axis=-1)


@pytest.mark.parametrize("case", [pytest.param("q_kept_at_unproposed_tokens", marks=pytest.mark.slow),
                                  pytest.param("sample_dependent_gate", marks=pytest.mark.slow)])
def test_the_exactness_test_catches_a_broken_gate(stat_models, continuation_logits, case):
  """Power: the same χ² test on as many samples rejects (1) a gated step that keeps the draft's q at its unproposed
  (-1) tokens, whose one token is then drawn from norm(max(0, p - q)) instead of p, and (2) a gate that reads the
  draft's draws, which conditions them."""
  _, (draft_model, draft_params) = stat_models
  probs = exact_distribution(continuation_logits, Warp(), SamplingParams.make(1.0))
  if case == "q_kept_at_unproposed_tokens":
    drafter, acceptor = DraftModelDrafter(draft_model, 3, greedy=False, gate=0.45), SampleAcceptance(
        skip_unproposed=False)
  else:
    drafter, acceptor = SampleDependentGate(draft_model, 3, greedy=False, gate=0.3), SampleAcceptance()
  pvalue = chi2_pvalue(per_row_sample_counts(stat_models[0], drafter, draft_params, acceptor)[0], probs)
  print(f"{case}: p = {pvalue:.3g}")
  assert pvalue < 1e-6


@dataclasses.dataclass(frozen=True)
class CorrectFromP(SampleAcceptance):
  """BROKEN on purpose: after a rejection the correction is sampled from p instead of norm(max(0, p - q))."""

  def accept(self, rng, draft, logits_BxTxV, sp, is_chain):
    acc = super().accept(rng, draft, logits_BxTxV, sp, is_chain)
    n_acc_B = acc.n_commit_B - 1
    p_BxV = jnp.take_along_axis(self.warp.probs(logits_BxTxV, sp), n_acc_B[:, None, None], axis=1)[:, 0]
    fix_B = jax.random.categorical(jax.random.fold_in(rng, 1), jnp.log(p_BxV), axis=-1).astype(jnp.int32)
    t = logits_BxTxV.shape[1]
    emitted_BxT = jnp.where(jnp.arange(t)[None] < n_acc_B[:, None], acc.emitted_BxT, fix_B[:, None])
    return Acceptance(emitted_BxT, acc.path_BxT, acc.n_commit_B)


@dataclasses.dataclass(frozen=True)
class AcceptEverything(SampleAcceptance):
  """BROKEN on purpose: keeps every drafted token, then samples a bonus token from p."""

  def accept(self, rng, draft, logits_BxTxV, sp, is_chain):
    b, t, _ = logits_BxTxV.shape
    bonus_B = self.warp.sample(rng, logits_BxTxV[:, -1], sp)
    return Acceptance(jnp.concatenate([draft.tokens_BxN, bonus_B[:, None]], axis=1),
                      jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), jnp.full((b,), t, jnp.int32))


@pytest.mark.parametrize("broken", [CorrectFromP(), pytest.param(AcceptEverything(), marks=pytest.mark.slow)],
                         ids=["correction_from_p", "accept_everything"])
def test_the_exactness_test_catches_a_broken_rule(stat_models, continuation_logits, broken):
  """Power: the same χ² test on the same number of samples rejects a rule that is not exact."""
  probs = exact_distribution(continuation_logits, Warp(), SamplingParams.make(1.0))
  counts = sample_counts(stat_models, 2, 1.0, 0, 1.0, acceptor=broken)
  pvalue = chi2_pvalue(counts, probs)
  print(f"{type(broken).__name__}: p = {pvalue:.3g}")
  assert pvalue < 1e-6


# ---- Copies in place of drafts (`lookup`) -------------------------------------------------------------------------

REPEATING = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [1, 2, 3, 4, 5], [9, 10, 9, 10, 9, 10, 9]]  # two of three repeat


@pytest.mark.parametrize("stop,gate", [(0.0, 0.0), pytest.param(0.1, 0.3, marks=pytest.mark.slow)])
def test_copies_in_place_of_drafts_equal_greedy(tiny, other_tiny, stop, gate):
  """Rows whose context repeats verify a copy, in a batch where rows copy and draft in the same step and in each row
  alone (steps where the only row copies run one draft forward instead of γ). That the draft cache stays in step
  is checked entry by entry in `test_draft_cache_stays_in_step_after_copies`."""
  model, params = tiny
  draft_model, draft_params = other_tiny
  ref = gen.generate(model, params, REPEATING, max_new_tokens=NEW).tokens
  plain = DraftModelDrafter(draft_model, 4, stop=stop, gate=gate)
  copying = dataclasses.replace(plain, lookup=1)
  res = gen.generate(model, params, REPEATING, max_new_tokens=NEW, drafter=copying, draft_params=draft_params)
  assert res.tokens == ref
  assert 0 < int(res.drafter_stats["copied_steps"]) < sum(res.active_calls)
  for prompt, want in zip(REPEATING, ref):
    alone = gen.generate(model, params, [prompt], max_new_tokens=NEW, drafter=copying, draft_params=draft_params)
    base = gen.generate(model, params, [prompt], max_new_tokens=NEW, drafter=plain, draft_params=draft_params)
    assert alone.tokens == [want] and base.tokens == [want]
    copied = int(alone.drafter_stats["copied_steps"])
    print(f"prompt {prompt[:4]}...: copied steps {copied} of {alone.target_calls}, draft forwards "
          f"{int(alone.drafter_stats['draft_forwards'])} (without copies {int(base.drafter_stats['draft_forwards'])})")
    if copied and not stop:  # a copied step costs one draft forward, a drafted one γ
      assert int(alone.drafter_stats["draft_forwards"]) == copied + 4 * (alone.target_calls - copied)


def test_bad_lookup_settings_are_clear_errors(other_tiny):
  draft_model, _ = other_tiny
  with pytest.raises(InputError, match="between 1 and lookup_ngram=3"):
    DraftModelDrafter(draft_model, 4, lookup=4)


@dataclasses.dataclass(frozen=True)
class CopiesWithTheDraftsQ(DraftModelDrafter):
  """BROKEN on purpose: copied rows report a uniform q instead of the point mass they are."""

  def _with_copies(self, draft_params, dstate, loop, drafted):
    tokens_BxN, q_BxNxV, conf_BxN, dstate = super()._with_copies(draft_params, dstate, loop, drafted)
    uniform = jnp.full_like(q_BxNxV, 1.0 / q_BxNxV.shape[-1])
    return tokens_BxN, jnp.where(dstate.copy_B[:, None, None], uniform, q_BxNxV), conf_BxN, dstate


@pytest.mark.parametrize("drafter_cls,per_row", [(DraftModelDrafter, False),
                                                 pytest.param(DraftModelDrafter, True, marks=pytest.mark.slow),
                                                 pytest.param(CopiesWithTheDraftsQ, False, marks=pytest.mark.slow)])
def test_speculative_sampling_with_copies_is_exact(stat_models, continuation_logits, drafter_cls, per_row):
  """Copies under rejection sampling: a point mass q where the context repeats (the prompt does: a first token of 1,
  3, 4 or 5 occurred before). In one batch rows copy and draft in the same step; per row (vmapped) a step copies or
  drafts alone. A copy that reports the wrong q is caught."""
  _, (draft_model, draft_params) = stat_models
  probs = exact_distribution(continuation_logits, Warp(), SamplingParams.make(1.0))
  drafter = drafter_cls(draft_model, 2, greedy=False, lookup=1)
  if per_row:
    counts, _ = per_row_sample_counts(stat_models[0], drafter, draft_params, SampleAcceptance())
  else:
    counts = drafter_sample_counts(stat_models[0], drafter, draft_params, 1.0, 1.0, SampleAcceptance())
  pvalue = chi2_pvalue(counts, probs)
  print(f"{drafter_cls.__name__} per_row={per_row}: p = {pvalue:.3g}")
  if drafter_cls is DraftModelDrafter:
    assert pvalue > 1e-3
  else:
    assert pvalue < 1e-6


# A ragged batch: prompts of four lengths (padded to the longest), each its own number of new tokens, EOS ending
# rows at different steps. Each row must still sample the target's distribution of its own continuation.
RAGGED_PROMPTS = ([3, 1, 4, 1, 5], [2, 6], [7, 0, 3, 3, 1, 2, 6, 5, 4], [5])
RAGGED_NEW = (3, 1, 2, 3)
RAGGED_EOS = 4  # a likely token after these prompts
RAGGED_COPIES = 5000  # rows of each kind in the one batch


def truncated_distribution(target, prompt, n_new, warp: Warp, sp: SamplingParams) -> np.ndarray:
  """P(output) of a row over outputs read as base-(V+1) numbers of N_NEW digits, V standing for "no token": the
  target's continuations cut after `n_new` tokens or at EOS, whichever comes first."""
  conts, logits = stat_continuation_logits(target, N_NEW, prompt)
  probs = exact_distribution((conts, logits), warp, sp)
  dist = np.zeros((V + 1) ** N_NEW)
  for cont, p in zip(conts, probs):
    out = []
    for t in cont[:n_new]:
      out.append(int(t))
      if t == RAGGED_EOS:
        break
    dist[ragged_code(out)] += p
  return dist


def ragged_code(tokens) -> int:
  digits = list(tokens) + [V] * (N_NEW - len(tokens))
  return sum(t * (V + 1) ** (N_NEW - 1 - i) for i, t in enumerate(digits))


@pytest.mark.parametrize("drafter_kind", ["chain", pytest.param("tree", marks=pytest.mark.slow)])
def test_each_row_of_a_ragged_batch_samples_the_target(stat_models, drafter_kind):
  """Rows that finish early (by EOS or their own max_new_tokens) next to rows still drafting, with padding between
  prompt lengths: each kind of row's outputs fit its own exact distribution (χ², top-k and top-p on); the rows of
  the longest prompt, read against the first prompt's distribution, do not (the check can fail)."""
  from jaxspec.decoding.opt_tree import LMTreeSource, OptTreeDrafter

  target, (draft_model, draft_params) = stat_models
  model, params = target
  temperature, top_k, top_p = 0.8, 4, 0.85
  warp, sp = Warp(top_k, True), SamplingParams.make(temperature, top_p)
  drafter = (DraftModelDrafter(draft_model, 2, warp, greedy=False) if drafter_kind == "chain" else
             OptTreeDrafter(LMTreeSource(draft_model), nodes=5, depth=3, width=2, branch=2, warp=warp))
  width = max(map(len, RAGGED_PROMPTS))
  prompts = np.zeros((len(RAGGED_PROMPTS), width), np.int32)
  for i, p in enumerate(RAGGED_PROMPTS):
    prompts[i, :len(p)] = p
  rows = lambda a: jnp.asarray(np.tile(np.asarray(a, np.int32), (RAGGED_COPIES,) + (1,) * (np.ndim(a) - 1)))
  out = decode(model, params, rows(prompts), rows([len(p) for p in RAGGED_PROMPTS]), rows(RAGGED_NEW),
               jnp.asarray([RAGGED_EOS], jnp.int32), jax.random.key(7), sp, draft_params, drafter=drafter,
               acceptor=SampleAcceptance(warp), out_len=max(RAGGED_NEW),
               capacity=width + max(RAGGED_NEW) + drafter.num_nodes + 1, pad_id=0)
  tokens, lengths = np.asarray(out.tokens_BxO), np.asarray(out.lengths_B)
  kinds = len(RAGGED_PROMPTS)
  counts = [np.bincount([ragged_code(tokens[r, :lengths[r]]) for r in range(k, len(tokens), kinds)],
                        minlength=(V + 1) ** N_NEW) for k in range(kinds)]
  exact = [truncated_distribution(target, p, n, warp, sp) for p, n in zip(RAGGED_PROMPTS, RAGGED_NEW)]
  first = lengths[::kinds]  # rows end at different steps: by EOS, or after their own number of new tokens
  assert lengths[1::kinds].max() == 1 and (first < 3).mean() > 0.2 and (first == 3).mean() > 0.2
  for k in range(kinds):
    assert chi2_pvalue(counts[k], exact[k]) > 1e-3, k
  assert chi2_pvalue(counts[2], exact[0]) < 1e-6
