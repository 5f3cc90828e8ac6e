"""Prompt lookup decoding: n-gram matching, context bookkeeping, exactness on the loop, τ on repetitive output."""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.bench.runner import chat_prompt_ids
from jaxspec.decoding.accept import GreedyAcceptance
from jaxspec.decoding.generate import generate
from jaxspec.decoding.bpd import chain_draft
from jaxspec.decoding.lookup import LookupDrafter, LookupState, WithLookup, WithLookupState
from jaxspec.decoding.protocol import Acceptance, Draft, PrefillInfo, Verified
from jaxspec.errors import InputError
from tests.fakes import BigramLM
from tests.test_speculative import continuation_logits, stat_models  # noqa: F401 (fixtures)


@flax.struct.dataclass
class FakeLoop:
  pending_B: jax.Array


def propose_on(drafter, rows, capacity=16, verify=False):
  """Proposes from hand-made contexts (one list per row; slots past each row's end hold junk that must be ignored).
  Returns the draft tokens, or with `verify` the rows' `verify_B` (None for an ungated drafter)."""
  context = np.full((len(rows), capacity), 5, np.int32)
  for b, row in enumerate(rows):
    context[b, :len(row)] = row
  lengths = jnp.asarray([len(r) for r in rows], jnp.int32)
  loop = FakeLoop(jnp.asarray([r[-1] for r in rows], jnp.int32))
  draft, state = jax.jit(lambda ds, lp: drafter.propose(None, ds, lp))(LookupState(jnp.asarray(context), lengths),
                                                                        loop)
  assert draft.tokens_BxN.shape == (len(rows), drafter.num_nodes)
  assert draft.depth_BxN[0].tolist() == list(range(1, drafter.num_nodes + 1))
  if verify:
    return None if draft.verify_B is None else draft.verify_B.tolist()
  return draft.tokens_BxN.tolist()


ROWS = [
    [1, 2, 3, 4, 5, 9, 2, 3, 6, 7, 1, 2, 3],  # [1 2 3] at 0 beats the more recent [2 3] at 6
    [7, 8, 9, 1, 7, 8, 9, 2, 0, 7, 8, 9],  # [7 8 9] at 0 and 4: the most recent wins; the span then repeats
    [1, 2, 3, 4, 5],  # 5 never occurred before (the junk 5s past the end do not count): filler
    [8, 1, 2, 1, 2],  # only [1 2] matches, with one token between it and the end: the period 2 continues
]


def test_longest_then_most_recent_match():
  assert propose_on(LookupDrafter(num_nodes=4), ROWS) == [
      [4, 5, 9, 2], [2, 0, 7, 8], [5, 5, 5, 5], [1, 2, 1, 2]]
  # Past the end of the context the copied span [2 0 7 8 9] repeats.
  assert propose_on(LookupDrafter(num_nodes=7), ROWS[1:2]) == [[2, 0, 7, 8, 9, 2, 0]]
  # With unigrams only, row 0 follows the most recent 3 (at 7); without unigrams, row 3 still matches [1 2].
  assert propose_on(LookupDrafter(num_nodes=4, max_ngram=1), ROWS[:1]) == [[6, 7, 1, 2]]
  assert propose_on(LookupDrafter(num_nodes=3, min_ngram=2), ROWS[2:]) == [[5, 5, 5], [1, 2, 1]]


def test_gate_asks_to_verify_rows_whose_match_is_long_enough():
  # The rows' longest matches: 3, 3, none, 2 tokens.
  assert propose_on(LookupDrafter(num_nodes=4), ROWS, verify=True) is None
  assert propose_on(LookupDrafter(num_nodes=4, gate=1), ROWS, verify=True) == [True, True, False, True]
  assert propose_on(LookupDrafter(num_nodes=4, gate=3), ROWS, verify=True) == [True, True, False, False]
  # The gate changes whether a draft is verified, never the draft itself.
  assert propose_on(LookupDrafter(num_nodes=4, gate=3), ROWS) == propose_on(LookupDrafter(num_nodes=4), ROWS)


def test_bad_settings_are_input_errors():
  for kw in (dict(num_nodes=0), dict(min_ngram=0), dict(max_ngram=2, min_ngram=3), dict(gate=-1),
             dict(max_ngram=3, gate=4)):
    with pytest.raises(InputError):
      LookupDrafter(**kw)


def test_update_appends_committed_tokens_of_active_rows():
  drafter = LookupDrafter(num_nodes=3)
  context = jnp.zeros((3, 8), jnp.int32).at[:, :2].set(jnp.asarray([[1, 2], [3, 4], [5, 6]]))
  state = LookupState(context.at[2, 2:6].set(7), jnp.asarray([2, 2, 6], jnp.int32))
  emitted = jnp.asarray([[10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]], jnp.int32)
  acc = Acceptance(emitted, jnp.broadcast_to(jnp.arange(4), (3, 4)), jnp.asarray([3, 4, 4], jnp.int32))
  verified = Verified(None, None, None, acc, jnp.asarray([True, False, True]))
  new = drafter.update(None, state, verified)
  assert new.lengths_B.tolist() == [5, 2, 8]
  assert new.context_BxC[0, :5].tolist() == [1, 2, 10, 11, 12]
  assert new.context_BxC[1].tolist() == context[1].tolist()  # inactive: unchanged
  assert new.context_BxC[2].tolist() == [5, 6, 7, 7, 7, 7, 30, 31]  # what does not fit is dropped


def drive(lm: BigramLM, drafter: LookupDrafter, prompts, steps_per_row, capacity=64):
  """The decode loop by hand on a bigram model: init, then propose -> greedy accept -> update while a row lasts."""
  b, p = len(prompts), max(map(len, prompts))
  arr = np.zeros((b, p), np.int32)
  for i, pr in enumerate(prompts):
    arr[i, :len(pr)] = pr
  table = jnp.asarray(lm.table, jnp.float32)
  logits_BxV = table[jnp.asarray([pr[-1] for pr in prompts])]
  first_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  state = drafter.init(None, PrefillInfo(jnp.asarray(arr), jnp.asarray([len(pr) for pr in prompts], jnp.int32),
                                         logits_BxV, logits_BxV, first_B, capacity=capacity))

  @jax.jit
  def step(state, pending_B, active_B):
    draft, state = drafter.propose(None, state, FakeLoop(pending_B))
    logits_BxTxV, hidden, _ = lm.forward(None, jnp.concatenate([pending_B[:, None], draft.tokens_BxN], 1), None,
                                         None, None)
    acc = GreedyAcceptance().accept(None, draft, logits_BxTxV, None, True)
    state = drafter.update(None, state, Verified(draft, logits_BxTxV, hidden, acc, active_B))
    last_B = jnp.take_along_axis(acc.emitted_BxT, (acc.n_commit_B - 1)[:, None], axis=1)[:, 0]
    return state, jnp.where(active_B, last_B, pending_B), acc

  out, pending_B = [[int(f)] for f in first_B], first_B
  for t in range(max(steps_per_row)):
    active = [t < s for s in steps_per_row]
    state, pending_B, acc = step(state, pending_B, jnp.asarray(active))
    emitted, n_commit = jax.device_get((acc.emitted_BxT, acc.n_commit_B))
    for i in range(b):
      if active[i]:
        out[i] += emitted[i, :n_commit[i]].tolist()
  return state, out


def test_context_is_prompt_then_output():
  lm = BigramLM.random(32, seed=3)
  prompts = [[9, 4, 4], [2], [7, 1, 7, 1, 7]]
  state, out = drive(lm, LookupDrafter(num_nodes=3), prompts, steps_per_row=[6, 3, 5])
  for i, pr in enumerate(prompts):
    assert out[i] == lm.greedy(pr[-1], len(out[i]))
    n = len(pr) + len(out[i])
    assert int(state.lengths_B[i]) == n
    assert state.context_BxC[i, :n].tolist() == pr + out[i]


def test_periodic_bigram_output_is_copied_whole(k=4):
  # Greedy output of a bigram model is periodic: once a period is in the context, every draft is right.
  lm = BigramLM.random(97, seed=5)
  starts = [1, 0]
  new = 60
  res = generate(lm, None, [[s] for s in starts], max_new_tokens=new, drafter=LookupDrafter(num_nodes=k))
  assert res.tokens == [lm.greedy(s, new) for s in starts]
  for i, s in enumerate(starts):
    seq = [s] + lm.greedy(s, new)
    # The first step whose pending token already occurred: from then on k + 1 tokens per call.
    warm = next(j for j in range(1, len(seq)) if seq[j] in seq[:j])
    assert res.active_calls[i] <= warm - 1 + -(-(new - warm) // (k + 1)), (res.active_calls, warm)
  print(f"bigram k={k} tau:", res.tau)


@pytest.mark.parametrize("target", ["tiny", "tiny_repeating"])
def test_lookup_equals_greedy_on_tiny_model(request, target):
  """Different lengths (one bucket of 16), one prompt repetitive. On the varied target some copies are right; on the
  repeating one the output soon repeats one token, so more nodes copy more of it per call (k = 1 reaches at most 2)."""
  model, params = request.getfixturevalue(target)
  prompts = [[1, 2, 3], [7] * 9, [100, 5, 17] * 3, list(range(40, 51))]
  greedy = generate(model, params, prompts, max_new_tokens=40)
  taus = {}
  for k in (1, 4, 10):
    res = generate(model, params, prompts, max_new_tokens=40, drafter=LookupDrafter(num_nodes=k))
    assert res.tokens == greedy.tokens, k
    assert res.drafter_calls == 0
    taus[k] = res.tau
  print(target, "tau by num_nodes:", taus)
  assert greedy.tau == 1.0 and all(tau > 1.0 for tau in taus.values())
  if target == "tiny_repeating":
    assert 1.5 < taus[1] < taus[4] < taus[10]
  for gate in (1, 3):
    res = generate(model, params, prompts, max_new_tokens=40, drafter=LookupDrafter(num_nodes=4, gate=gate))
    assert res.tokens == greedy.tokens, gate


DEFAULT_MODEL_QUESTIONS = ["Copy this list exactly: apple, banana, cherry, apple, banana, cherry.",
                           "Write a Python function that returns the sum of a list, then call it on [1, 2, 3]."]


@pytest.fixture(scope="module")
def repeating_greedy(default_model):
  """`(prompts, kw, greedy result)` for DEFAULT_MODEL_QUESTIONS on the default model, shared by this file's slow
  tests."""
  model, params, tok = default_model
  prompts = chat_prompt_ids(tok, DEFAULT_MODEL_QUESTIONS)
  kw = dict(max_new_tokens=48, eos_ids=[tok.eos_id])
  return prompts, kw, generate(model, params, prompts, **kw)


def test_lookup_equals_greedy_on_default_model(default_model, default_greedy):
  """On the reference the shipped drafters' tests share (its second answer repeats a line: copies pay there)."""
  model, params, tok = default_model
  prompts, greedy = default_greedy
  res = generate(model, params, prompts, drafter=LookupDrafter(), max_new_tokens=40, eos_ids=[tok.eos_id])
  print("default model lookup tau:", res.tau, "target calls", res.target_calls, "vs", greedy.target_calls)
  assert res.tokens == greedy.tokens
  assert res.tau > 1.0 and res.target_calls < greedy.target_calls


@pytest.mark.slow  # one more compile of the default model; the gate's logic is covered on the tiny model above
def test_gated_lookup_equals_greedy_on_default_model(default_model, repeating_greedy):
  model, params, tok = default_model
  prompts, kw, greedy = repeating_greedy
  gated = generate(model, params, prompts, drafter=LookupDrafter(gate=2), **kw)
  print("default model gated lookup tau:", gated.tau, "target calls", gated.target_calls, "vs", greedy.target_calls)
  assert gated.tokens == greedy.tokens and gated.target_calls < greedy.target_calls


# ---- copies in place of another drafter's draft (`WithLookup`, methods `bpd:lookup=M`, `eagle:lookup=M`) ----------

@dataclasses.dataclass(frozen=True)
class FixedDraft:
  """A replaceable chain drafter that always proposes tokens 11, 12, ... with point-mass probabilities over V."""

  num_nodes: int = 3
  vocab: int = 16
  gate: bool = False
  is_chain = True
  calls_per_step = 0
  draft_replaceable = True

  def propose(self, draft_params, dstate, loop):
    b = loop.pending_B.shape[0]
    tokens_BxN = jnp.broadcast_to(jnp.arange(11, 11 + self.num_nodes, dtype=jnp.int32), (b, self.num_nodes))
    draft = chain_draft(tokens_BxN).replace(probs_BxNxV=jax.nn.one_hot(tokens_BxN, self.vocab))
    return (draft.replace(verify_B=jnp.zeros((b,), bool)) if self.gate else draft), dstate


def test_copies_replace_the_draft_only_where_the_match_is_long_enough():
  rows = [[1, 2, 3, 4, 5, 9, 2, 3, 6, 7, 1, 2, 3],  # matches [1 2 3]: copy 4 5 9
          [8, 1, 2, 1, 2],  # only a 2-token match [1 2]: copy with min_match=2, not with 3
          [1, 2, 3, 4, 5]]  # no match: the drafter's own tokens
  context = np.full((3, 16), 5, np.int32)
  for b, row in enumerate(rows):
    context[b, :len(row)] = row
  lookup = LookupState(jnp.asarray(context), jnp.asarray([len(r) for r in rows], jnp.int32))
  loop = FakeLoop(jnp.asarray([r[-1] for r in rows], jnp.int32))
  for min_match, copied in ((2, [True, True, False]), (3, [True, False, False])):
    for gate in (False, True):
      wl = WithLookup(FixedDraft(gate=gate), min_match=min_match)
      state = WithLookupState(None, lookup, jnp.zeros((3,), bool), jnp.int32(0))
      draft, state = wl.propose(None, state, loop)
      want = [[4, 5, 9], [1, 2, 1], [11, 12, 13]]
      assert draft.tokens_BxN.tolist() == [w if c else [11, 12, 13] for w, c in zip(want, copied)]
      assert state.copy_B.tolist() == copied
      # q follows the verified tokens: one-hot on the copy where a row copies.
      assert jnp.argmax(draft.probs_BxNxV, -1).tolist() == draft.tokens_BxN.tolist()
      assert (draft.verify_B is None) == (not gate)
      if gate:  # the drafter asked for no verification; copied rows ask for it
        assert draft.verify_B.tolist() == copied


def test_drafters_that_read_their_own_draft_cannot_be_wrapped(tiny):
  from jaxspec.decoding.speculative import DraftModelDrafter

  model, _ = tiny
  with pytest.raises(InputError, match="cannot have its drafts replaced"):
    WithLookup(DraftModelDrafter(model, 2))
  with pytest.raises(InputError, match="match length"):
    WithLookup(FixedDraft(), min_match=4, max_ngram=3)


def test_bpd_eagle_and_jacobi_with_copies_equal_greedy_on_tiny_model(tiny):
  from jaxspec.decoding.bpd import BPDDrafter, bpd_draft_params
  from jaxspec.decoding.eagle import EagleDrafter
  from jaxspec.decoding.jacobi import JacobiDrafter
  from tests.test_bpd import random_heads
  from tests.test_eagle import random_draft

  model, params = tiny
  prompts = [[1, 2, 3], [7] * 9, [100, 5, 17] * 3, list(range(40, 51))]
  greedy = generate(model, params, prompts, max_new_tokens=40)
  bpd, p = random_heads(tiny, 4)
  eagle, ep = random_draft(model, params)
  for inner, dp in ((BPDDrafter(bpd), bpd_draft_params(model, params, bpd, p)),
                    (BPDDrafter(bpd, gate=3.5), bpd_draft_params(model, params, bpd, p)),
                    (EagleDrafter(eagle, 3), ep), (JacobiDrafter(window=4), None)):
    plain = generate(model, params, prompts, max_new_tokens=40, drafter=inner, draft_params=dp)
    res = generate(model, params, prompts, max_new_tokens=40, drafter=WithLookup(inner), draft_params=dp)
    assert res.tokens == greedy.tokens == plain.tokens, inner
    copied = int(res.drafter_stats["copied_steps"])
    print(f"{type(inner).__name__}: tau {plain.tau:.2f} -> {res.tau:.2f} with copies ({copied} copied row-steps)")
    # The tiny model's greedy output repeats itself, so copies are taken and raise tau over the random drafts.
    assert 0 < copied <= sum(res.active_calls)
    assert res.tau > plain.tau
    # One row at a time every copying step copies in all rows: the wrapped drafter does not run (its work saved).
    # Jacobi has no skip_propose: alone it runs the batch's path, checked above (one program fewer).
    for prompt, want in zip(prompts if hasattr(inner, "skip_propose") else [], greedy.tokens):
      alone = generate(model, params, [prompt], max_new_tokens=40, drafter=WithLookup(inner), draft_params=dp)
      assert alone.tokens == [want], (inner, prompt)
      if isinstance(inner, EagleDrafter):  # γ - 1 draft forwards in a drafting propose, 1 in every update
        drafted = alone.target_calls - int(alone.drafter_stats["copied_steps"])
        assert int(alone.drafter_stats["draft_forwards"]) == alone.target_calls + 2 * drafted


def test_copied_steps_count_only_the_steps_of_active_rows():
  """`copied_steps` counts the row-steps that verified a copy: in a batch whose rows end at different steps it is
  the sum of what each row counts alone (a row that has ended still proposes from its frozen context, and may copy,
  in the steps the others go on with, but those steps are not its own)."""
  from jaxspec.decoding.jacobi import JacobiDrafter

  lm = BigramLM.random(97, seed=5)
  prompts, new = [[1], [0], [1, 2]], [12, 40, 25]
  drafter = WithLookup(JacobiDrafter(window=3), min_match=1)
  res = generate(lm, None, prompts, max_new_tokens=new, drafter=drafter)
  alone = [generate(lm, None, [p], max_new_tokens=n, drafter=drafter) for p, n in zip(prompts, new)]
  assert res.tokens == [a.tokens[0] for a in alone]
  counts = [int(a.drafter_stats["copied_steps"]) for a in alone]
  print("copied steps alone:", counts, "batched:", res.drafter_stats["copied_steps"])
  assert min(counts) > 0 and int(res.drafter_stats["copied_steps"]) == sum(counts)


def test_rows_that_ended_do_not_make_a_skipped_propose_run(tiny):
  """A chain drafter with `skip_propose` (EAGLE) does not run in a step where every active row copies: a row that
  has ended (here after its first token, with no match in its context) does not count. The batch's draft forwards
  are the lone row's."""
  from jaxspec.decoding.eagle import EagleDrafter
  from tests.test_eagle import random_draft

  model, params = tiny
  eagle, ep = random_draft(model, params)
  drafter, prompt = WithLookup(EagleDrafter(eagle, 3)), [100, 5, 17] * 3
  alone = generate(model, params, [prompt], max_new_tokens=40, drafter=drafter, draft_params=ep)
  both = generate(model, params, [prompt, list(range(40, 51))], max_new_tokens=[40, 1], drafter=drafter,
                  draft_params=ep)
  assert both.tokens[0] == alone.tokens[0] and both.active_calls == [alone.active_calls[0], 0]
  assert 0 < int(alone.drafter_stats["copied_steps"]) < alone.target_calls  # some steps copy, some draft
  assert int(both.drafter_stats["draft_forwards"]) == int(alone.drafter_stats["draft_forwards"])


@dataclasses.dataclass(frozen=True)
class CopiesKeepDraftersQ(WithLookup):
  """Deliberately wrong: a copied token is verified against the q of the token the drafter had drawn there."""

  def copy_probs(self, probs_BxNxV, copy_BxN, copy_B):
    return probs_BxNxV


@pytest.mark.parametrize("inner,broken,per_row", [
    ("eagle", False, False),  # (the positive case of the broken control beside it: both run by default)
    pytest.param("eagle", False, True, marks=pytest.mark.slow), ("eagle", True, False),
    ("bpd", False, False), pytest.param("bpd-gated", False, True, marks=pytest.mark.slow)])
def test_sampling_with_copies_is_exact(stat_models, continuation_logits, inner, broken, per_row):
  """10^5 generations at temperature 1, with copies in place of the drafts after a 1-token match, follow the target's
  distribution (χ²): with a sampling feature-level draft, and with BPD heads (point-mass drafts; gated, so that a
  step can verify a copy while the heads alone would not have verified). Labelling the copies with the drafter's q
  fails the test (EAGLE's q: the heads' drafts and copies are both point masses, so that breaks nothing for BPD).
  Per row (vmapped batches of one), steps that copy skip the drafter's propose."""
  from jaxspec.decoding.accept import SampleAcceptance
  from jaxspec.decoding.bpd import BPDDrafter, bpd_draft_params
  from jaxspec.decoding.eagle import EagleDrafter
  from jaxspec.decoding.sampling import SamplingParams, Warp
  from tests.test_bpd import random_heads
  from tests.test_eagle import random_draft
  from tests.test_speculative import chi2_pvalue, drafter_sample_counts, exact_distribution, per_row_sample_counts

  target = stat_models[0]
  if inner == "eagle":
    draft, dp = random_draft(*target, seed=4, scale=2.0)
    chain = EagleDrafter(draft, 2, greedy=False)
  else:  # the heads of test_bpd's sampling test; its gate of 1.04 verifies the first step for about 6 % of the mass
    bpd, p = random_heads(target, 2, seed=3)
    dp = bpd_draft_params(*target, bpd, p)
    chain = BPDDrafter(bpd, gate=1.04 if inner == "bpd-gated" else 0.0)
  wrap = CopiesKeepDraftersQ if broken else WithLookup
  drafter = wrap(chain, min_match=1)
  probs = exact_distribution(continuation_logits, Warp(), SamplingParams.make(1.0))
  if per_row:
    counts, _ = per_row_sample_counts(target, drafter, dp, SampleAcceptance())
  else:
    counts = drafter_sample_counts(target, drafter, dp, 1.0, 1.0, SampleAcceptance())
  pvalue = chi2_pvalue(counts, probs)
  print(f"{inner} with copies, broken={broken}, per_row={per_row}: p = {pvalue:.3g}")
  assert (pvalue < 1e-6) if broken else (pvalue > 1e-3)


@pytest.mark.slow  # one more default-model compile; copies with heads are checked on the tiny model by default
def test_shipped_heads_with_copies_equal_greedy_on_default_model(default_model, repeating_greedy):
  from jaxspec.bench.methods import DEFAULT_BPD_HEADS
  from jaxspec.decoding.bpd import BPDDrafter, bpd_draft_params
  from jaxspec.models.bpd import load_bpd

  model, params, tok = default_model
  prompts, kw, greedy = repeating_greedy
  bpd, p = load_bpd(DEFAULT_BPD_HEADS, num_heads=4)
  res = generate(model, params, prompts, drafter=WithLookup(BPDDrafter(bpd)),
                 draft_params=bpd_draft_params(model, params, bpd, p), **kw)
  print("default model bpd + copies: tau", res.tau, "copied row-steps", res.drafter_stats["copied_steps"])
  assert res.tokens == greedy.tokens
  assert int(res.drafter_stats["copied_steps"]) > 0 and res.target_calls < greedy.target_calls


@dataclasses.dataclass(frozen=True)
class FixedTree:
  """A replaceable tree drafter: two depth-2 paths (11 -> 13, 12 -> 14), so its deepest path is 2 nodes."""

  num_nodes = 4
  max_path = 2
  is_chain = False
  calls_per_step = 0
  draft_replaceable = True

  def propose(self, draft_params, dstate, loop):
    from jaxspec.decoding.opt_tree import ancestor_mask

    b = loop.pending_B.shape[0]
    bc = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.int32), (b, 4))
    parent = bc([-1, -1, 0, 1])
    return Draft(bc([11, 12, 13, 14]), bc([1, 1, 2, 2]), ancestor_mask(parent, 2), parent), dstate


def test_without_grafting_a_copy_replaces_a_tree_with_a_chain_as_deep_as_the_tree():
  from jaxspec.decoding.opt_tree import ancestor_mask

  rows = [[1, 2, 3, 4, 5, 9, 2, 3, 6, 7, 1, 2, 3], [1, 2, 3, 4, 5]]  # a 3-token match; none
  context = np.full((2, 16), 5, np.int32)
  for b, row in enumerate(rows):
    context[b, :len(row)] = row
  lookup = LookupState(jnp.asarray(context), jnp.asarray([len(r) for r in rows], jnp.int32))
  wl = WithLookup(FixedTree(), graft=False)
  assert not wl.is_chain and wl.copy_len == 2
  draft, _ = wl.propose(None, WithLookupState(None, lookup, jnp.zeros((2,), bool), jnp.int32(0)),
                        FakeLoop(jnp.asarray([3, 5], jnp.int32)))
  assert draft.tokens_BxN.tolist() == [[4, 5, -1, -1], [11, 12, 13, 14]]  # nodes past the tree's depth unproposed
  assert draft.depth_BxN.tolist() == [[1, 2, 3, 4], [1, 1, 2, 2]]
  assert draft.parent_BxN.tolist() == [[-1, 0, 1, 2], [-1, -1, 0, 1]]
  assert draft.mask_BxNxN[0].tolist() == np.tril(np.ones((4, 4), bool)).tolist()
  assert draft.mask_BxNxN[1].tolist() == ancestor_mask(jnp.asarray([[-1, -1, 0, 1]]), 2)[0].tolist()
  assert draft.probs_BxNxV is None


@dataclasses.dataclass(frozen=True)
class FixedSampledTree(FixedTree):
  """`FixedTree` with a drafter's q at each node (a sampled tree), peaked on the node's token."""

  def propose(self, draft_params, dstate, loop):
    draft, dstate = super().propose(draft_params, dstate, loop)
    return draft.replace(probs_BxNxV=0.5 * jax.nn.one_hot(draft.tokens_BxN, 16) + 0.5 / 16), dstate


def test_a_tree_with_drafted_probabilities_is_replaced_by_the_copy_even_when_grafting():
  """Grafting keeps the tree's nodes with their q, which holds only for trees of point masses: a tree whose nodes
  carry a drafter's q is replaced by the copy as with `graft=False`, each copied token with a one-hot q."""
  rows = [[1, 2, 3, 4, 5, 9, 2, 3, 6, 7, 1, 2, 3], [1, 2, 3, 4, 5]]  # a 3-token match; none
  context = np.full((2, 16), 5, np.int32)
  for b, row in enumerate(rows):
    context[b, :len(row)] = row
  lookup = LookupState(jnp.asarray(context), jnp.asarray([len(r) for r in rows], jnp.int32))
  loop = FakeLoop(jnp.asarray([3, 5], jnp.int32))
  tree, _ = FixedSampledTree().propose(None, None, loop)
  for graft in (True, False):
    draft, _ = WithLookup(FixedSampledTree(), graft=graft).propose(
        None, WithLookupState(None, lookup, jnp.zeros((2,), bool), jnp.int32(0)), loop)
    assert draft.tokens_BxN.tolist() == [[4, 5, -1, -1], [11, 12, 13, 14]], graft
    assert draft.parent_BxN.tolist() == [[-1, 0, 1, 2], [-1, -1, 0, 1]], graft
    np.testing.assert_array_equal(draft.probs_BxNxV[0, :2], jax.nn.one_hot(jnp.asarray([4, 5]), 16))
    np.testing.assert_array_equal(draft.probs_BxNxV[1], tree.probs_BxNxV[1])


def test_a_copy_joins_a_tree_as_a_branch_sharing_the_path_the_tree_already_has():
  from jaxspec.decoding.opt_tree import ancestor_mask

  rows = [[1, 2, 3, 4, 5, 9, 2, 3, 6, 7, 1, 2, 3],  # copy 4 5: no node shared, the two depth-2 nodes make room
          [1, 2, 11, 9, 7, 1, 2],  # copy 11 9: node 11 shared, 9 hangs below it in place of the last node (14)
          [1, 2, 12, 14, 7, 1, 2],  # copy 12 14: already a path of the tree, nothing changes
          [1, 2, 3, 4, 5]]  # no match
  context = np.full((4, 16), 5, np.int32)
  for b, row in enumerate(rows):
    context[b, :len(row)] = row
  lookup = LookupState(jnp.asarray(context), jnp.asarray([len(r) for r in rows], jnp.int32))
  wl = WithLookup(FixedTree())
  draft, state = wl.propose(None, WithLookupState(None, lookup, jnp.zeros((4,), bool), jnp.int32(0)),
                            FakeLoop(jnp.asarray([r[-1] for r in rows], jnp.int32)))
  assert state.copy_B.tolist() == [True, True, True, False]
  assert draft.tokens_BxN.tolist() == [[11, 12, 4, 5], [11, 12, 13, 9], [11, 12, 13, 14], [11, 12, 13, 14]]
  assert draft.parent_BxN.tolist() == [[-1, -1, -1, 2], [-1, -1, 0, 0], [-1, -1, 0, 1], [-1, -1, 0, 1]]
  assert draft.depth_BxN.tolist() == [[1, 1, 1, 2], [1, 1, 2, 2], [1, 1, 2, 2], [1, 1, 2, 2]]
  assert draft.mask_BxNxN.tolist() == ancestor_mask(draft.parent_BxN, 2).tolist()
  assert draft.probs_BxNxV is None


def _random_tree(rng, n: int, depth: int, vocab: int):
  """A random tree of n nodes in topological order, depths <= depth, siblings with distinct tokens."""
  parent, dep, tok = [], [], []
  for i in range(n):
    full = lambda j: sum(q == j for q in parent) >= vocab
    choices = [j for j in [-1] + [j for j in range(i) if dep[j] < depth] if not full(j)]
    par = int(rng.choice(choices))
    taken = {tok[j] for j in range(i) if parent[j] == par}
    parent.append(par)
    dep.append(1 if par < 0 else dep[par] + 1)
    tok.append(int(rng.choice([t for t in range(vocab) if t not in taken])))
  return np.asarray(tok), np.asarray(parent), np.asarray(dep)


def _root_paths(tok, parent):
  paths = []
  for i in range(len(tok)):
    path, j = [], i
    while j >= 0:
      path.append(int(tok[j]))
      j = int(parent[j])
    paths.append(tuple(path[::-1]))
  return paths


def test_grafted_trees_keep_n_nodes_the_copy_and_the_shallow_part_of_the_tree():
  """Random trees and copies: the result is a tree in topological order whose root paths include the copy and
  every path of the tree but those through the dropped (last, off-copy) nodes; nothing changes where no row copies."""
  from jaxspec.decoding.lookup import graft_chain
  from jaxspec.decoding.opt_tree import ancestor_mask

  rng = np.random.default_rng(0)
  n, depth, vocab, b = 8, 4, 3, 64
  trees = [_random_tree(rng, n, depth, vocab) for _ in range(b)]
  tok, parent, dep = (jnp.asarray(np.stack(x)) for x in zip(*trees))
  draft = Draft(tok.astype(jnp.int32), dep.astype(jnp.int32), ancestor_mask(parent.astype(jnp.int32), depth),
                parent.astype(jnp.int32))
  for l in (1, 3, 4):
    copy = rng.integers(0, vocab, (b, l)).astype(np.int32)
    use = rng.random(b) < 0.8
    out = graft_chain(draft, jnp.asarray(copy), jnp.asarray(use), depth)
    for r in range(b):
      t, p, d = (np.asarray(x[r]) for x in (out.tokens_BxN, out.parent_BxN, out.depth_BxN))
      assert all(p[i] < i for i in range(n))  # topological
      assert all(d[i] == (1 if p[i] < 0 else d[p[i]] + 1) for i in range(n))
      assert np.asarray(out.mask_BxNxN[r]).tolist() == ancestor_mask(jnp.asarray(p[None]), depth)[0].tolist()
      new_paths, old_paths = _root_paths(t, p), _root_paths(*trees[r][:2])
      if not use[r]:
        assert t.tolist() == trees[r][0].tolist() and p.tolist() == trees[r][1].tolist()
        assert np.asarray(out.mask_BxNxN[r]).tolist() == np.asarray(draft.mask_BxNxN[r]).tolist()
        continue
      # The copy's prefixes already in the tree stay; the last nodes off them make room for the rest of the copy.
      shared = max(k for k in range(l + 1) if k == 0 or tuple(copy[r, :k]) in old_paths)
      on_copy = {i for i, path in enumerate(old_paths) if path == tuple(copy[r, :len(path)])}
      dropped = [i for i in range(n) if i not in on_copy][::-1][:l - shared]
      want = {old_paths[i] for i in range(n) if i not in dropped} | {tuple(copy[r, :k]) for k in range(1, l + 1)}
      assert len(set(new_paths)) == len(new_paths) == n  # siblings stay distinct: no path twice
      assert set(new_paths) == want
      assert new_paths[:n - (l - shared)] == [old_paths[i] for i in range(n) if i not in dropped]  # order kept


def test_trees_with_copies_equal_greedy_on_tiny_model(tiny):
  from tests.test_opt_tree import tree_drafters

  model, params = tiny
  prompts = [[1, 2, 3], [7] * 9, [100, 5, 17] * 3, list(range(40, 51))]
  greedy = generate(model, params, prompts, max_new_tokens=40)
  drafters = tree_drafters(tiny)
  for name in ("lm-dynamic", "heads-dynamic"):
    inner, dp = drafters[name]
    plain = generate(model, params, prompts, max_new_tokens=40, drafter=inner, draft_params=dp)
    # The heads' tree with graft=False: tests/test_methods_options.py (opt-tree:...:lookup=1:graft=0) decodes it.
    for graft in (True, False) if name == "lm-dynamic" else (True,):
      res = generate(model, params, prompts, max_new_tokens=40, drafter=WithLookup(inner, graft=graft),
                     draft_params=dp)
      assert res.tokens == greedy.tokens == plain.tokens, name
      copied = int(res.drafter_stats["copied_steps"])
      print(f"{name}, graft={graft}: tau {plain.tau:.2f} -> {res.tau:.2f} with copies ({copied} copied row-steps)")
      assert copied > 0 and res.tau > plain.tau
      # Never more than the tree's depth accepted per step (+1: the target's own token).
      assert not res.accept_hist[:, inner.depth + 2:].any()


@pytest.mark.slow  # 10^6 samples (about 2 minutes); the chain case above, with its broken control, runs by default
def test_tree_sampling_with_copies_is_exact(stat_models, continuation_logits):
  """OPT-Tree drafts from a draft LM, replaced by copies after a 1-token match: the target's distribution (χ²).

  At 10^5 samples this χ² helper's p-value is below 10^-3 about 3 times in 1000 for exact multinomial draws (small
  expected counts), and this case's first 10^5 draws gave 5e-4; with 10^6 draws the approximation is sound (other
  seed ranges: p = 0.73 at 10^6 and 0.18 at 4 x 10^6, where a bias that made 5e-4 likely at 10^5 would give ~0)."""
  from jaxspec.decoding.accept import SampleAcceptance
  from jaxspec.decoding.sampling import SamplingParams
  from tests.test_opt_tree import opt_tree_stat_drafter
  from tests.test_speculative import chi2_pvalue, drafter_sample_counts, exact_distribution

  inner, dp, warp = opt_tree_stat_drafter(stat_models, 1.0, 1.0)
  probs = exact_distribution(continuation_logits, warp, SamplingParams.make(1.0))
  counts = drafter_sample_counts(stat_models[0], WithLookup(inner, min_match=1), dp, 1.0, 1.0,
                                 SampleAcceptance(warp), seeds=40)
  pvalue = chi2_pvalue(counts, probs)
  print(f"opt-tree with copies: p = {pvalue:.3g}")
  assert pvalue > 1e-3


# Gate 0 is slow: gate 1 verifies the same copies by the same point-mass rule, and the copies of
# test_sampling_with_copies_is_exact are found by the same lookup, in batches
@pytest.mark.parametrize("gate", [pytest.param(0, marks=pytest.mark.slow), 1])
def test_lookup_sampling_is_exact(stat_models, continuation_logits, gate):
  """`lookup` at temperature 1: copies are point-mass drafts, verified by recursive rejection; 10^5 generations
  follow the target's distribution (χ²). The prompt [3, 1, 4, 1, 5] and the sampled tokens give matches of one and
  two tokens. With `gate=1` a generation verifies a copy only after a match, and otherwise takes a one-token step
  (each generation runs alone, vmapped): 27 % take their tokens in one call, against 35 % ungated."""
  from jaxspec.decoding.accept import SampleAcceptance
  from jaxspec.decoding.sampling import SamplingParams, Warp
  from tests.test_speculative import chi2_pvalue, drafter_sample_counts, exact_distribution, per_row_sample_counts

  target = stat_models[0]
  drafter = LookupDrafter(num_nodes=2, max_ngram=2, gate=gate)
  probs = exact_distribution(continuation_logits, Warp(), SamplingParams.make(1.0))
  if gate:
    counts, calls = per_row_sample_counts(target, drafter, None, SampleAcceptance())
  else:
    counts = drafter_sample_counts(target, drafter, None, 1.0, 1.0, SampleAcceptance())
  pvalue = chi2_pvalue(counts, probs)
  print(f"lookup gate={gate}: p = {pvalue:.3g}")
  assert pvalue > 1e-3
  if gate:
    # Both branches ran: fewer generations take their tokens in one call than ungated (27 % of 10^5 against 35 % of
    # 25,000: the gap is about 24 standard errors, 15 beyond the 0.03 margin), and some still do.
    _, calls_ungated = per_row_sample_counts(target, dataclasses.replace(drafter, gate=0), None, SampleAcceptance(),
                                             seeds=1)
    one, one_ungated = np.mean(calls == 1), np.mean(calls_ungated == 1)
    print(f"one-call generations {one:.3f} (ungated {one_ungated:.3f})")
    assert 0 < one < one_ungated - 0.03
