"""Draft trees: masks and paths on hand-built trees (tree masks and depth positions in the model's forward are
tested in test_model.py), tree acceptance on fake logits, OPT-Tree's selection against a brute-force search, greedy
equivalence (dynamic, static and chain trees; draft LM and BPD heads), budget choice from cost, and statistical
exactness of tree sampling with a broken rule as a control."""

import dataclasses
import heapq
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.decoding import generate as gen
from jaxspec.decoding.accept import GreedyAcceptance, SampleAcceptance, tree_rejection
from jaxspec.decoding.bpd import bpd_draft_params
from jaxspec.decoding.loop import _block_mask
from jaxspec.decoding.opt_tree import (HeadsTreeSource, LMTreeSource, OptTreeDrafter, ancestor_mask,
                                       calibrated_prior, choose_budget, geometric_prior, static_draft_params)
from jaxspec.decoding.protocol import Draft, PrefillInfo
from jaxspec.decoding.sampling import SamplingParams, Warp
from jaxspec.errors import InputError
from jaxspec.models.bpd import BPDConfig, BPDModel
from jaxspec.models.subset import subset_head
from tests.conftest import assert_gates_mix, make_tiny
from tests.fakes import tree_arrays
from tests.test_bpd import random_heads
from tests.test_speculative import V, chi2_pvalue, continuation_logits, drafter_sample_counts  # noqa: F401
from tests.test_speculative import (assert_gate_skips_some_drafts, exact_distribution,  # noqa: F401
                                    per_row_sample_counts, stat_models)

# A hand-built tree: two root children (0, 1); 2 and 3 under 0; 4 under 2; 5 under 1.
PARENT = [-1, -1, 0, 0, 2, 1]
DEPTH = [1, 1, 2, 2, 3, 2]
TOKENS = [10, 11, 12, 13, 14, 15]
ANCESTORS = [{0}, {1}, {0, 2}, {0, 3}, {0, 2, 4}, {1, 5}]


def hand_tree(rows: int) -> Draft:
  n = len(PARENT)
  mask = np.zeros((n, n), bool)
  for i, anc in enumerate(ANCESTORS):
    mask[i, list(anc)] = True
  bc = lambda x, dt: jnp.broadcast_to(jnp.asarray(x, dt), (rows,) + np.shape(x))
  return Draft(bc(TOKENS, jnp.int32), bc(DEPTH, jnp.int32), bc(mask, bool), bc(PARENT, jnp.int32))


def test_ancestor_mask_of_a_hand_built_tree():
  mask = np.asarray(ancestor_mask(jnp.asarray([PARENT]), max_depth=3))[0]
  assert [set(np.flatnonzero(row)) for row in mask] == ANCESTORS
  # The verified block [pending, nodes]: every node sees the pending token, itself and its ancestors only.
  block = np.asarray(_block_mask(hand_tree(1)))[0]
  assert block[:, 0].all() and block[0].sum() == 1
  assert [set(np.flatnonzero(row[1:])) for row in block[1:]] == ANCESTORS


def one_hot_logits(argmax_per_block, vocab=100):
  """Logits `[B, T, V]` whose argmax at block index t of row b is `argmax_per_block[b][t]`."""
  return jax.nn.one_hot(jnp.asarray(argmax_per_block), vocab) * 20.0


# Row 0: the target picks node 1 (11), then node 5 (15), then 7. Row 1: 10, 12, 14 (the deepest path), then 9.
# Row 2: 99 after the pending token, which no child has. Block index = node index + 1.
TARGET = [[11, 0, 15, 0, 0, 0, 7], [10, 12, 0, 14, 0, 9, 0], [99, 0, 0, 0, 0, 0, 0]]
WANT_PATHS = [[0, 2, 6], [0, 1, 3, 5], [0]]
WANT_EMITTED = [[11, 15, 7], [10, 12, 14, 9], [99]]


def check_acceptance(acc):
  for b in range(3):
    n = int(acc.n_commit_B[b])
    assert np.asarray(acc.path_BxT[b, :n]).tolist() == WANT_PATHS[b]
    assert np.asarray(acc.emitted_BxT[b, :n]).tolist() == WANT_EMITTED[b]


def test_greedy_tree_acceptance_on_fake_logits():
  acc = GreedyAcceptance().accept(None, hand_tree(3), one_hot_logits(TARGET), SamplingParams.make(), is_chain=False)
  check_acceptance(acc)


def test_tree_rejection_sampling_on_point_mass_targets():
  """With target distributions that are point masses, sampling must walk exactly the greedy path (rows apart)."""
  p = jax.nn.one_hot(jnp.asarray(TARGET), 100)
  for seed in range(3):
    check_acceptance(tree_rejection(jax.random.key(seed), hand_tree(3), p))


def test_a_row_of_tree_rejection_draws_the_same_whatever_the_batch_size():
  """A row's samples depend on the seed and its row index only (`generate`'s promise): the same rows sampled in a
  batch of 1 and as the first rows of a batch of 5 accept and correct alike, seed for seed. Near-uniform targets over
  4 tokens and a 3-token point-mass chain make acceptance a coin flip at each node, so coins taken from another place
  of the draw (as when they were drawn [N, B]) change the outcome for about a tenth of the seeds."""
  depth, mask = tree_arrays([-1, 0, 1])
  tree = Draft(jnp.asarray([[0, 1, 2]], jnp.int32), jnp.asarray(depth[None]), jnp.asarray(mask[None]),
               jnp.asarray([[-1, 0, 1]], jnp.int32))
  p_TxV = jax.nn.softmax(jax.random.normal(jax.random.key(0), (4, 4)) * 0.3, axis=-1)

  def outcome(key, rows):
    wide = jax.tree.map(lambda x: jnp.repeat(x, rows, axis=0), tree)
    acc = tree_rejection(key, wide, jnp.broadcast_to(p_TxV, (rows, 4, 4)))
    return acc.n_commit_B[0], acc.emitted_BxT[0]

  keys = jax.random.split(jax.random.key(1), 200)
  alone = jax.jit(jax.vmap(lambda k: outcome(k, 1)))(keys)
  in_batch = jax.jit(jax.vmap(lambda k: outcome(k, 5)))(keys)
  assert 0 < int(jnp.sum(alone[0] < 4)) < 200  # rejections and full acceptances both occur
  np.testing.assert_array_equal(alone[0], in_batch[0])
  np.testing.assert_array_equal(alone[1], in_batch[1])


@pytest.mark.parametrize("remove_rejected", [True, False])
def test_tree_rejection_with_drafted_distributions_samples_the_target(remove_rejected):
  """`tree_rejection` with children drawn from a q (`probs_BxNxV`, SpecInfer's setting) rather than point masses,
  called directly on 200,000 rows of a 5-token bigram target: the first two tokens of the ancestral sample (a row
  that commits one token draws its second from the target by hand) fit p_0(a) p(b | a) (χ²). The default tests'
  trees are point masses (OPT-Tree); this is the only default check of the r <- norm(max(0, r - q_i)) update, of
  acceptance with probability min(1, r(x) / q(x)) and of the walk to a child's distribution. The broken rule (r kept
  after a rejection) must fail it."""
  rng = np.random.default_rng(0)
  v, rows, parents = 5, 200_000, [-1, -1, 0, 0, 1, 2]  # two root children, two under node 0, one under 1, one under 2
  p0, bigram = rng.dirichlet(np.ones(v)), rng.dirichlet(np.ones(v), size=v)  # p before the block; p(. | token)
  q_root, q_child = rng.dirichlet(np.ones(v)), rng.dirichlet(np.ones(v))
  q_NxV = np.stack([q_root if p < 0 else q_child for p in parents])  # children i.i.d. from their level's q
  tokens_BxN = np.stack([rng.choice(v, size=rows, p=q) for q in q_NxV], axis=1)
  depth, mask = tree_arrays(parents)
  bc = lambda a, dt: jnp.broadcast_to(jnp.asarray(a, dt), (rows, *np.shape(a)))
  draft = Draft(jnp.asarray(tokens_BxN, jnp.int32), bc(depth, jnp.int32), bc(mask, bool), bc(parents, jnp.int32),
                bc(q_NxV, jnp.float32))
  # The target's distribution at block index 0 (the pending token) and after each node (its token's bigram row).
  p_BxTxV = np.concatenate([np.broadcast_to(p0, (rows, 1, v)), bigram[tokens_BxN]], axis=1)
  acc = jax.jit(tree_rejection, static_argnums=3)(jax.random.key(1), draft, jnp.asarray(p_BxTxV, jnp.float32),
                                                  remove_rejected)
  emitted, n_commit = np.asarray(acc.emitted_BxT), np.asarray(acc.n_commit_B)
  assert (n_commit == 1).mean() > 0.1 and (n_commit >= 3).mean() > 0.1  # rejections and deep accepts both common
  first = emitted[:, 0]
  drawn = (rng.random(rows)[:, None] > np.cumsum(bigram[first], axis=-1)).sum(-1).clip(0, v - 1)
  second = np.where(n_commit >= 2, emitted[:, 1], drawn)
  pvalue = chi2_pvalue(np.bincount(first * v + second, minlength=v * v), (p0[:, None] * bigram).ravel())
  print(f"remove_rejected={remove_rejected}: p = {pvalue:.3g}")
  assert (pvalue > 1e-3) if remove_rejected else (pvalue < 1e-6)


def fake_loop(pending, active=None):
  b = len(pending)
  return types.SimpleNamespace(pending_B=jnp.asarray(pending, jnp.int32),
                               active_B=jnp.ones((b,), bool) if active is None else jnp.asarray(active),
                               sp=SamplingParams.make(0.0))


def best_first_paths(model, params, prefix, n, max_depth=None):
  """The n root paths of highest draft probability (of at most `max_depth` tokens), by best-first search with uncached
  forwards (the reference)."""

  width = len(prefix) + n  # every path is padded to one length (causal: padding after it changes nothing), one jit

  @jax.jit
  def last_logp(seq_1xW, last):
    logits, _, _ = model.forward(params, seq_1xW, jnp.arange(width)[None], model.init_cache(1, width),
                                 jnp.tril(jnp.ones((width, width), bool)))
    return jax.nn.log_softmax(logits[0, last])

  def logp(path):
    seq = prefix + list(path)
    return np.asarray(last_logp(jnp.asarray([seq + [0] * (width - len(seq))]), len(seq) - 1), np.float64)

  heap = [(-v, (int(x),)) for x, v in enumerate(logp(()))]
  heapq.heapify(heap)
  out = {}
  while len(out) < n:
    neg, path = heapq.heappop(heap)
    out[path] = -neg
    if max_depth is not None and len(path) >= max_depth:
      continue
    for x, v in enumerate(logp(path)):
      heapq.heappush(heap, (neg - v, path + (x,)))
  return out


def draft_paths(draft: Draft, row: int = 0) -> list[tuple]:
  tok, par = np.asarray(draft.tokens_BxN[row]), np.asarray(draft.parent_BxN[row])
  paths = []
  for i in range(len(tok)):
    path, j = [], i
    while j >= 0:
      path.append(int(tok[j]))
      assert len(path) <= len(tok), f"the parents of node {i} form a cycle"  # (a wrong parent table hung this loop)
      j = par[j]
    paths.append(tuple(reversed(path)))
  return paths


def test_more_children_than_tokens_is_a_clear_error_and_a_wide_level_is_not():
  """A node's children are its drafter's top tokens: more than there are is an error. A level of width x branch
  candidates past the vocabulary is fine (the root takes no more than the N nodes a tree can hold): it was refused,
  which kept exact trees (width = branch = nodes) from small vocabularies."""
  draft_model, draft_params = make_tiny(seed=3)
  v = draft_model.vocab_size
  prefill = PrefillInfo(jnp.asarray([[3, 14, 15]], jnp.int32), jnp.asarray([3]), jnp.zeros((1, 8)), jnp.zeros((1, 8)),
                        jnp.asarray([92]), capacity=2 * v + 32)
  drafter = OptTreeDrafter(LMTreeSource(draft_model), nodes=4, depth=2, width=2, branch=v + 1)
  dstate = jax.jit(drafter.init)(draft_params, prefill)
  with pytest.raises(InputError, match=f"branch={v + 1} children per node, more than the {v} tokens"):
    jax.jit(lambda p, s: drafter.propose(p, s, fake_loop([92])))(draft_params, dstate)
  wide = OptTreeDrafter(LMTreeSource(draft_model), nodes=4, depth=2, width=v, branch=2)
  draft, _ = jax.jit(lambda p, s: wide.propose(p, s, fake_loop([92])))(draft_params, jax.jit(wide.init)(draft_params,
                                                                                                         prefill))
  assert draft.tokens_BxN.shape == (1, 4) and (np.asarray(draft.parent_BxN) < np.arange(4)).all()


def test_tree_is_the_n_most_probable_paths(tiny):
  """With a frontier and branching as wide as the budget, the grown tree (its depths >= 2 read from the draft cache
  through ancestor masks) is exactly the N most probable root paths of the draft LM, and E[A] is their sum."""
  draft_model, draft_params = make_tiny(seed=3)  # a random model with flat-ish distributions: many branches
  draft_params = dict(draft_params, embed={"embedding": draft_params["embed"]["embedding"] / 10.0})
  n = 10
  prompt = [3, 14, 15, 92]
  drafter = OptTreeDrafter(LMTreeSource(draft_model), nodes=n, depth=4, width=n, branch=n)
  tokens = jnp.asarray([prompt[:-1]], jnp.int32)
  prefill = PrefillInfo(tokens, jnp.asarray([len(prompt) - 1]), jnp.zeros((1, 8)), jnp.zeros((1, 8)),
                        jnp.asarray([prompt[-1]]), capacity=32)
  dstate = jax.jit(drafter.init)(draft_params, prefill)
  loop = fake_loop([prompt[-1]])
  draft, dstate = jax.jit(lambda p, s: drafter.propose(p, s, loop))(draft_params, dstate)
  want = best_first_paths(draft_model, draft_params, prompt, n)
  got = draft_paths(draft)
  assert sorted(got) == sorted(want)
  assert np.asarray(draft.depth_BxN[0]).tolist() == [len(p) for p in got]
  assert sorted(np.asarray(draft.depth_BxN[0]).tolist()) == np.asarray(draft.depth_BxN[0]).tolist()  # parents first
  ea = float(dstate.expected_accept_DxN[-1, -1])
  assert abs(ea - sum(np.exp(v) for v in want.values())) < 1e-4
  # The statistics: E[A] of the best m-node tree of depth <= d, for every m and d (choose_budget's input), is the sum
  # of the m most probable paths of at most d tokens; with threshold 0 growth reaches the maximum depth, one draft
  # forward per depth; the rank-r child probabilities are the root's (depth 1) and the best depth-1 node's (depth 2).
  for d in range(1, drafter.depth + 1):
    best = sorted(np.exp(list(best_first_paths(draft_model, draft_params, prompt, n, max_depth=d).values())))[::-1]
    np.testing.assert_allclose(dstate.expected_accept_DxN[d - 1], np.cumsum(best), atol=1e-4, err_msg=f"depth {d}")
  assert dstate.reached_D.tolist() == [0, 0, 0, 1] and int(dstate.forwards) == drafter.depth
  root = np.exp(_logp_after(draft_model, draft_params, prompt))
  # (the root keeps no more children than the tree can hold: ranks past N, never in an N-node tree, count 0)
  np.testing.assert_allclose(dstate.rank_prob_DxC[0][:n], np.sort(root)[::-1][:n], atol=1e-5)
  assert not np.asarray(dstate.rank_prob_DxC[0][n:]).any()
  child = np.exp(_logp_after(draft_model, draft_params, prompt + [int(np.argmax(root))]))
  np.testing.assert_allclose(dstate.rank_prob_DxC[1, :n], np.sort(child)[::-1][:n], atol=1e-5)


def _logp_after(model, params, seq):
  """The model's next-token log-probabilities after `seq`, by an uncached forward."""
  w = len(seq)
  logits, _, _ = model.forward(params, jnp.asarray([seq]), jnp.arange(w)[None], model.init_cache(1, w),
                               jnp.tril(jnp.ones((w, w), bool)))
  return np.asarray(jax.nn.log_softmax(logits[0, -1].astype(jnp.float32)), np.float64)


PROMPTS = [[1, 2, 3], [7] * 9, [100, 5, 17, 4]]
NEW = 30


@pytest.fixture(scope="module")
def greedy_ref(tiny):
  model, params = tiny
  return gen.generate(model, params, PROMPTS, max_new_tokens=NEW).tokens


def tree_drafters(tiny):
  model, params = tiny
  other, other_params = make_tiny(seed=1)
  bpd, hp = random_heads(tiny, 4)
  heads = bpd_draft_params(model, params, bpd, hp)
  sub, sub_params = subset_head(other, other_params, np.arange(0, 256, 2)[:100])
  return {
      "lm-dynamic": (OptTreeDrafter(LMTreeSource(other), nodes=8, depth=4, width=2, branch=3), other_params),
      "lm-self-early-stop": (OptTreeDrafter(LMTreeSource(model), nodes=8, depth=4, width=2, branch=3, threshold=1.5),
                             params),
      "lm-chain": (OptTreeDrafter.chain(LMTreeSource(other), 5), other_params),
      # A draft head over 100 of the 256 tokens, grown in the draft's own cache like any draft LM.
      "lm-subset-head": (OptTreeDrafter(LMTreeSource(sub), nodes=8, depth=4, width=2, branch=3), sub_params),
      "lm-static": (OptTreeDrafter(LMTreeSource(other), nodes=8, depth=4, width=2, branch=3, shape="static"),
                    static_draft_params(other_params, geometric_prior(4, 6))),
      "heads-dynamic": (OptTreeDrafter(HeadsTreeSource(bpd), nodes=10, depth=4, width=3, branch=3), heads),
      "heads-static": (OptTreeDrafter(HeadsTreeSource(bpd), nodes=10, depth=4, width=3, branch=3, shape="static"),
                       static_draft_params(heads, geometric_prior(4, 9))),
  }


# heads-static is slow: lm-static checks the static shape, heads-dynamic the heads' source
@pytest.mark.parametrize("name", ["lm-dynamic", "lm-self-early-stop", "lm-chain", "lm-subset-head", "lm-static",
                                  "heads-dynamic", pytest.param("heads-static", marks=pytest.mark.slow)])
def test_trees_equal_greedy_and_rows_are_independent(tiny, greedy_ref, name):
  model, params = tiny
  drafter, dp = tree_drafters(tiny)[name]
  res = gen.generate(model, params, PROMPTS, max_new_tokens=NEW, drafter=drafter, draft_params=dp)
  assert res.tokens == greedy_ref
  assert res.accept_hist[:, 2:].sum() > 0  # tree nodes were accepted (τ 1.18-2.9 across the cases here)
  stats = res.drafter_stats
  if name == "lm-self-early-stop":
    # The target as its own draft: each depth adds about 1 to E[A], below the threshold of 1.5, so growth stops
    # after depth 2 in every step, and nearly every step accepts both drafted depths.
    assert stats["reached_D"][1] == stats["proposals"] > 0
    assert res.tau > 2.5


@pytest.mark.parametrize("name", ["lm-dynamic", "heads-dynamic"])
def test_a_row_alone_takes_the_steps_it_takes_in_a_batch(tiny, greedy_ref, name):
  """Rows of a batch do not affect each other's trees: one drafter of each kind (a draft LM, BPD heads) covers the
  tree growth the other cases share."""
  model, params = tiny
  drafter, dp = tree_drafters(tiny)[name]
  res = gen.generate(model, params, PROMPTS, max_new_tokens=NEW, drafter=drafter, draft_params=dp)
  alone = gen.generate(model, params, PROMPTS[2:], max_new_tokens=NEW, drafter=drafter, draft_params=dp)
  assert alone.tokens == greedy_ref[2:] and alone.active_calls == res.active_calls[2:]


# lm-dynamic is slow: lm-self-early-stop samples the same draft-LM tree source (and accepts more of its nodes)
@pytest.mark.parametrize("name", [pytest.param("lm-dynamic", marks=pytest.mark.slow), "lm-self-early-stop"])
def test_a_sampled_row_alone_draws_what_it_draws_first_in_a_batch(tiny, name):
  """`generate`'s promise under sampling: a row's samples depend on the seed and its row index, not on the rows after
  it. Trees from another draft LM and from the target itself at temperature 1, seed by seed (random heads accept
  nothing at temperature 1; the function-level test above covers point-mass drafts)."""
  model, params = tiny
  drafter, dp = tree_drafters(tiny)[name]
  accepted = 0
  for seed in range(4):
    run = lambda prompts: gen.generate(model, params, prompts, max_new_tokens=NEW, temperature=1.0, seed=seed,
                                       drafter=drafter, draft_params=dp)
    batch, alone = run(PROMPTS), run(PROMPTS[:1])
    assert alone.tokens[0] == batch.tokens[0], f"seed {seed}"
    accepted += alone.accept_hist[0, 2:].sum()
  assert accepted > 0  # some steps accepted tree nodes, not only corrections


# The draft LM's trees differ from the heads' only in how E[A] is scored, and each gate compiles its own loop: that
# setting runs with -m slow. Heads' calls by gate: 55 at 0 and at 0.05, 84 at 0.1, 87 at 0.2 and never verifying: 0.1
# alone mixes, so it alone runs between the ends.
@pytest.mark.parametrize("name,gates", [("heads-dynamic", (0.1,)),
                                        pytest.param("lm-dynamic", (1.5, 1.8, 2.2, 3.0), marks=pytest.mark.slow)])
def test_gated_trees_equal_greedy(tiny, greedy_ref, name, gates):
  """Gates among the steps' E[A] values: at some gate, some steps verify the tree and the others take one-token
  steps (more calls than ungated, fewer than never verifying); the output is greedy decoding's in every setting.
  Rows run alone, since a batch verifies by its rows' mean E[A] (the test below)."""
  model, params = tiny
  drafter, dp = tree_drafters(tiny)[name]
  calls = {}
  for g in (0.0, *gates, float(drafter.nodes) + 1):  # past the node budget: no tree's E[A] reaches it
    runs = [gen.generate(model, params, [prompt], max_new_tokens=NEW, drafter=dataclasses.replace(drafter, gate=g),
                         draft_params=dp) for prompt in PROMPTS]
    assert [r.tokens[0] for r in runs] == greedy_ref, g
    calls[g] = sum(r.target_calls for r in runs)
  print(name, "target calls by gate:", calls)
  assert calls[float(drafter.nodes) + 1] == len(PROMPTS) * (NEW - 1)
  assert_gates_mix(calls)


def test_a_batch_verifies_its_trees_when_the_rows_mean_expected_acceptance_pays():
  """The batch shares the verify forward, so verifying pays when the rows' mean E[A] passes the break-even, not one
  row's: a row at 1.9 beside a row at 0.1 verified both at gate 1.5 (found by a review). Finished rows do not count."""
  from jaxspec.decoding.opt_tree import gate_verifies

  ea = jnp.asarray([1.9, 0.1, 5.0])
  for active, gate, want in [([1, 1, 0], 1.5, False), ([1, 1, 0], 0.95, True), ([1, 0, 0], 1.5, True),
                             ([0, 0, 0], 0.5, False), ([1, 1, 1], 2.0, True)]:
    got = gate_verifies(ea, jnp.asarray(active, bool), gate)
    assert got.tolist() == [want] * 3, (active, gate)


def test_budget_follows_the_verify_cost():
  """The same acceptance curve gives a small tree on a steep cost curve (CPU-like) and a big one when it is flat."""
  n_grid = [1, 2, 4, 8, 16, 32]
  ea = np.asarray([[1.0 - 0.8 ** n for n in range(1, 33)]]) * 3.0  # E[A] saturating at 3 (depth 1 only, for brevity)
  steep = {n: 1.0 + 0.2 * n for n in n_grid}
  flat = {n: 1.0 + 0.001 * n for n in n_grid}
  n_steep, _, table = choose_budget(ea, steep)
  n_flat, _, _ = choose_budget(ea, flat)
  assert n_steep < n_flat == 32
  assert table[(n_steep, 1)] == max(table.values())
  with pytest.raises(InputError):
    choose_budget(ea, {64: 1.0})


def test_calibrated_prior_is_the_mean_log_probability():
  stats = {"proposals": np.int32(4), "rank_prob_DxC": np.asarray([[2.0, 1.0, 0.0], [3.0, 0.4, 0.0]])}
  prior = calibrated_prior(stats)
  np.testing.assert_allclose(prior[:, :2], np.log([[0.5, 0.25], [0.75, 0.1]]), rtol=1e-6)
  assert prior[0, 2] == pytest.approx(np.log(1e-6))


def test_bad_tree_settings_are_clear_errors(tiny):
  model, _ = tiny
  src = LMTreeSource(model)
  with pytest.raises(InputError, match="shape"):
    OptTreeDrafter(src, shape="bushy")
  with pytest.raises(InputError, match="deep"):
    OptTreeDrafter(src, nodes=4, depth=6)
  with pytest.raises(InputError, match="cannot fill"):
    OptTreeDrafter(src, nodes=40, depth=2, width=2, branch=2)
  with pytest.raises(InputError, match="gate"):
    OptTreeDrafter(src, gate=-1.0)
  bpd, _ = random_heads(tiny, 3)
  prefill = PrefillInfo(jnp.zeros((1, 2), jnp.int32), jnp.asarray([2]), jnp.zeros((1, 4)), jnp.zeros((1, 4)),
                        jnp.zeros((1,), jnp.int32), capacity=8)
  with pytest.raises(InputError, match="BPD heads"):
    OptTreeDrafter(HeadsTreeSource(bpd), nodes=8, depth=5).init({}, prefill)


# --- Exact sampling over trees -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IidTree:
  """SpecInfer-style sampled tree of fixed shape: every node's token is drawn i.i.d. from one context-free q."""

  logits_V: tuple
  parent: tuple = (-1, -1, 0, 0, 1, 2)
  is_chain = False
  calls_per_step = 0

  @property
  def num_nodes(self):
    return len(self.parent)

  def init(self, draft_params, prefill):
    return prefill.rng

  def propose(self, draft_params, dstate, loop):
    rng, r = jax.random.split(dstate)
    b, n = loop.pending_B.shape[0], self.num_nodes
    q_V = jax.nn.softmax(jnp.asarray(self.logits_V, jnp.float32))
    tokens = jax.random.categorical(r, jnp.log(q_V), shape=(b, n)).astype(jnp.int32)
    parent = jnp.asarray(self.parent, jnp.int32)
    depth = [1] * n
    for i, p in enumerate(self.parent):
      depth[i] = 1 if p < 0 else depth[p] + 1
    bc = lambda x: jnp.broadcast_to(x, (b,) + x.shape)
    return Draft(tokens, bc(jnp.asarray(depth, jnp.int32)), bc(ancestor_mask(parent[None], 4)[0]), bc(parent),
                 jnp.broadcast_to(q_V, (b, n, q_V.shape[0]))), rng

  def update(self, draft_params, dstate, verified):
    return dstate


def opt_tree_stat_drafter(stat_models, temperature, top_p):
  _, (draft_model, draft_params) = stat_models
  warp = Warp(0, top_p < 1)
  return OptTreeDrafter(LMTreeSource(draft_model), nodes=5, depth=3, width=2, branch=2, warp=warp), draft_params, warp


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), pytest.param(0.7, 0.9, marks=pytest.mark.slow)])
def test_opt_tree_sampling_is_exact(stat_models, continuation_logits, temperature, top_p):
  """10^5 generations with OPT-Tree drafts (top-k children: point-mass proposals) follow the target's distribution."""
  drafter, dp, warp = opt_tree_stat_drafter(stat_models, temperature, top_p)
  probs = exact_distribution(continuation_logits, warp, SamplingParams.make(temperature, top_p))
  counts = drafter_sample_counts(stat_models[0], drafter, dp, temperature, top_p, SampleAcceptance(warp))
  pvalue = chi2_pvalue(counts, probs)
  print(f"opt-tree T={temperature} top_p={top_p}: p = {pvalue:.3g}")
  assert pvalue > 1e-3


def test_heads_tree_sampling_is_exact(stat_models, continuation_logits):
  """`opt-tree:drafter=heads` at temperature 1: trees grown from BPD heads' distributions (point-mass children)
  follow the target's distribution over 10^5 generations (χ²), and some take all their tokens in one call (so
  tree nodes were accepted, not only corrections drawn)."""
  target = stat_models[0]
  model, params = target
  bpd, p = random_heads(target, 2, seed=3)
  drafter = OptTreeDrafter(HeadsTreeSource(bpd), nodes=5, depth=2, width=2, branch=3)
  probs = exact_distribution(continuation_logits, Warp(), SamplingParams.make(1.0))
  counts, calls = per_row_sample_counts(target, drafter, bpd_draft_params(model, params, bpd, p), SampleAcceptance())
  pvalue = chi2_pvalue(counts, probs)
  print(f"heads tree: p = {pvalue:.3g}, one-call generations {np.mean(calls == 1):.3f}")
  assert pvalue > 1e-3
  assert np.mean(calls == 1) > 0.1


# Three programs over 10^5 generations: the default run checks ungated tree sampling and gated greedy trees.
@pytest.mark.slow
def test_gated_opt_tree_sampling_is_exact(stat_models, continuation_logits):
  """A gate of 0.9 on these 8-token models: about a fifth of the generations verify one tree for both new tokens,
  the others take one-token steps (each generation is its own batch of one, so the gate decides per generation).
  Both branches must run."""
  drafter, dp, warp = opt_tree_stat_drafter(stat_models, 1.0, 1.0)
  probs = exact_distribution(continuation_logits, warp, SamplingParams.make(1.0))
  counts, calls = per_row_sample_counts(stat_models[0], dataclasses.replace(drafter, gate=0.9), dp,
                                        SampleAcceptance(warp))
  pvalue = chi2_pvalue(counts, probs)
  print(f"gated opt-tree: p = {pvalue:.3g}")
  assert pvalue > 1e-3
  assert_gate_skips_some_drafts(stat_models[0], drafter, dp, SampleAcceptance(warp), calls)


@pytest.mark.slow
def test_iid_sampled_tree_is_exact(stat_models, continuation_logits):
  """SpecInfer's setting: children drawn i.i.d. from a draft q, rejection with r <- norm(max(0, r - q))."""
  logits = tuple(np.random.default_rng(5).normal(size=V).round(3).tolist())
  probs = exact_distribution(continuation_logits, Warp(), SamplingParams.make(1.0))
  counts = drafter_sample_counts(stat_models[0], IidTree(logits), None, 1.0, 1.0, SampleAcceptance())
  pvalue = chi2_pvalue(counts, probs)
  print(f"i.i.d. tree: p = {pvalue:.3g}")
  assert pvalue > 1e-3


def test_the_tree_exactness_test_catches_a_broken_rule(stat_models, continuation_logits):
  """Power: leaving the target's distribution unchanged after a rejected child (instead of removing that child)
  over-samples drafted tokens, and the same χ² test on the same number of samples rejects it."""
  drafter, dp, warp = opt_tree_stat_drafter(stat_models, 1.0, 1.0)
  probs = exact_distribution(continuation_logits, warp, SamplingParams.make(1.0))
  broken = SampleAcceptance(warp, remove_rejected=False)
  counts = drafter_sample_counts(stat_models[0], drafter, dp, 1.0, 1.0, broken)
  pvalue = chi2_pvalue(counts, probs)
  print(f"broken tree rule: p = {pvalue:.3g}")
  assert pvalue < 1e-6


@pytest.mark.slow
def test_trees_equal_greedy_on_default_model(default_model):
  """The shipped BPD heads and a layer-skip draft, as dynamic and static trees, on the real model."""
  from jaxspec.bench.methods import DEFAULT_BPD_HEADS
  from jaxspec.decoding.speculative import layerskip_draft
  from jaxspec.models.bpd import load_bpd

  model, params, tok = default_model
  prompts = [tok.encode(t) for t in ["The capital of France is", "def fibonacci(n):\n  ", "Once upon a time"]]
  ref = gen.generate(model, params, prompts, max_new_tokens=32).tokens
  bpd, hp = load_bpd(DEFAULT_BPD_HEADS)
  heads = bpd_draft_params(model, params, bpd, hp)
  lm, lm_params = layerskip_draft(model, params, 8)
  for drafter, dp in [(OptTreeDrafter(HeadsTreeSource(bpd), nodes=16, depth=5), heads),
                      (OptTreeDrafter(HeadsTreeSource(bpd), nodes=16, depth=5, shape="static"),
                       static_draft_params(heads, geometric_prior(5, 16))),
                      (OptTreeDrafter(LMTreeSource(lm), nodes=12, depth=4, width=3, branch=4), lm_params)]:
    res = gen.generate(model, params, prompts, max_new_tokens=32, drafter=drafter, draft_params=dp)
    assert res.tokens == ref, drafter


# (2, 3, 2): a depth-2 node of a bushy tree and a correction; (1, 2, 3): a 6-node pool taken whole, so it has depth-3
# nodes, and a depth-3 path plus the correction commits depth + 1 tokens, the most a step commits.
@pytest.mark.parametrize("width,branch,node_depth", [(2, 3, 2), (1, 2, 3)])
def test_a_draft_lm_tree_after_a_step_is_the_tree_a_fresh_prefill_grows(tiny, width, branch, node_depth):
  """After a verified step the draft LM's cache holds exactly the committed tokens: the next tree (tokens and E[A])
  equals the tree of a drafter prefilled on the committed sequence. A token fed twice, or one left out, would change
  both."""
  from jaxspec.decoding.protocol import Acceptance, Verified

  model, params = tiny
  other, other_params = make_tiny(seed=1)
  drafter = OptTreeDrafter(LMTreeSource(other), nodes=6, depth=3, width=width, branch=branch)
  v = model.vocab_size

  def prefill(tokens, first):
    return PrefillInfo(jnp.asarray([tokens], jnp.int32), jnp.asarray([len(tokens)], jnp.int32),
                       jnp.zeros((1, model.cfg.d_model)), jnp.zeros((1, v)), jnp.asarray([first], jnp.int32),
                       capacity=48)

  def propose(state, pending):
    loop = types.SimpleNamespace(pending_B=jnp.asarray([pending], jnp.int32), sp=SamplingParams.make(0.0),
                                 active_B=jnp.asarray([True]))
    before = state.expected_accept_DxN
    draft, state = drafter.propose(other_params, state, loop)
    return draft, state, state.expected_accept_DxN - before

  prompt, first, correction = [5, 17, 33, 2, 90], 41, 77
  draft, state, _ = propose(drafter.init(other_params, prefill(prompt, first)), first)
  node = int(jnp.argmax(draft.depth_BxN[0] == node_depth))  # commit its ancestors, itself and a correction
  assert int(draft.depth_BxN[0, node]) == node_depth
  path = [node]
  while int(draft.parent_BxN[0, path[0]]) >= 0:
    path.insert(0, int(draft.parent_BxN[0, path[0]]))
  emitted = [int(draft.tokens_BxN[0, i]) for i in path] + [correction]
  t, c = drafter.nodes + 1, len(emitted)
  acc = Acceptance(jnp.asarray([emitted + [0] * (t - c)], jnp.int32),
                   jnp.asarray([[0] + [i + 1 for i in path] + [0] * (t - c)], jnp.int32), jnp.asarray([c], jnp.int32),
                   is_prefix=False)
  state = drafter.update(other_params, state, Verified(draft, jnp.zeros((1, t, v)), jnp.zeros((1, t, 8)), acc,
                                                       jnp.asarray([True])))
  draft2, _, ea2 = propose(state, correction)
  fresh, _, ea_fresh = propose(drafter.init(other_params, prefill(prompt + [first] + emitted[:-1], correction)),
                               correction)
  assert draft2.tokens_BxN.tolist() == fresh.tokens_BxN.tolist()
  np.testing.assert_allclose(ea2, ea_fresh, rtol=1e-5, atol=1e-6)


# --- Accepted tree paths on a model whose output depends on its context -------------------------------------------
# A tree step that kept the wrong cache entries goes unnoticed on a model whose output barely depends on the context.
# These trees run on `tiny`, whose mildly scaled embedding makes its next token depend on what is in the cache, and
# get deep nodes accepted.


@pytest.fixture(scope="module")
def varied(tiny):
  return tiny


VARIED_PROMPTS = [[1, 2, 3], [9, 30, 200, 41, 77], [100, 5, 17, 4]]


@pytest.fixture(scope="module")
def varied_ref(varied):
  model, params = varied
  ref = gen.generate(model, params, VARIED_PROMPTS, max_new_tokens=NEW).tokens
  assert all(len(set(r)) > 5 for r in ref)  # the output varies with its context
  return ref


@dataclasses.dataclass(frozen=True)
class ReferenceTree:
  """A fixed tree that knows the greedy output (`draft_params["ref_BxR"]`): the first root child is wrong, the second
  right, and the right branch goes two deeper, so the accepted path, block [0, 2, 4, 5], is never a prefix of the
  block and its cache entries must be gathered."""

  parents: tuple = (-1, -1, 0, 1, 3)  # 0: wrong, 1: right, 2: wrong under 0, 3: right under 1, 4: right under 3
  is_chain = False
  calls_per_step = 0

  @property
  def num_nodes(self):
    return len(self.parents)

  def init(self, draft_params, prefill):
    return ()

  def propose(self, draft_params, dstate, loop):
    ref_BxR = draft_params["ref_BxR"]
    b = loop.pending_B.shape[0]
    at = lambda i: jnp.take_along_axis(ref_BxR, jnp.minimum(loop.n_out_B + i, ref_BxR.shape[1] - 1)[:, None], 1)[:, 0]
    wrong = lambda x: (x + 1) % 256
    tokens = jnp.stack([wrong(at(0)), at(0), wrong(at(1)), at(1), at(2)], axis=1).astype(jnp.int32)
    depth, mask = tree_arrays(list(self.parents))
    bc = lambda a: jnp.broadcast_to(jnp.asarray(a), (b, *np.shape(a)))
    return Draft(tokens, bc(depth), bc(mask), bc(np.asarray(self.parents, np.int32))), dstate

  def update(self, draft_params, dstate, verified):
    return dstate


def test_accepted_tree_paths_keep_their_own_cache_entries(varied, varied_ref):
  """Every step accepts the right branch (3 nodes and the bonus token) behind a wrong sibling: the output is greedy
  decoding's only if the cache keeps the accepted nodes' keys and values, not the block's first entries."""
  model, params = varied
  ref = np.zeros((len(VARIED_PROMPTS), NEW + 8), np.int32)
  ref[:, :NEW] = varied_ref
  res = gen.generate(model, params, VARIED_PROMPTS, max_new_tokens=NEW, drafter=ReferenceTree(),
                     draft_params={"ref_BxR": jnp.asarray(ref)})
  assert res.tokens == varied_ref
  # 29 tokens after the first: 7 steps of 4 and a last one (cut to 1 by max_new_tokens).
  assert res.accept_hist[:, 4].tolist() == [7, 7, 7] and res.active_calls == [8, 8, 8]


def test_self_drafted_tree_equals_greedy_with_deep_accepted_paths(varied, varied_ref):
  """OPT-Tree with the target as its own draft LM: the draft's tree holds the target's greedy path, behind siblings
  at depth 1 (this model's next-token distributions are flat, so the tree is bushy), so steps accept 2 nodes along
  paths that are not a prefix of the block; the output is greedy decoding's, token for token."""
  model, params = varied
  drafter = OptTreeDrafter(LMTreeSource(model), nodes=8, depth=4, width=2, branch=2)
  res = gen.generate(model, params, VARIED_PROMPTS, max_new_tokens=NEW, drafter=drafter, draft_params=params)
  assert res.tokens == varied_ref
  assert res.tau > 2.5 and res.accept_hist[:, 3:].sum() >= 0.9 * res.accept_hist.sum()


# --- Trees from BPD heads, checked against the heads' lattice ------------------------------------------------------
# A wrong head, a wrong token mapping, a wrong selection key or wrong statistics leave the output greedy decoding's
# (only fewer drafts are accepted), so these compare the grown tree with values worked out from the heads directly.


def heads_propose(tiny, drafter, dp, bpd, rows=2, active=None, seed=0):
  """One propose of `drafter` on random hidden states; also returns the heads' log-probabilities `[B, K, M]`."""
  from jaxspec.decoding.bpd import BPDDrafter
  model, _ = tiny
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(rows, model.cfg.d_model)), jnp.float32)
  pending = rng.integers(0, model.vocab_size, rows).tolist()
  prefill = PrefillInfo(jnp.zeros((rows, 2), jnp.int32), jnp.full((rows,), 2), hidden,
                        jnp.zeros((rows, model.vocab_size)), jnp.asarray(pending, jnp.int32), capacity=8)
  loop = fake_loop(pending, active)
  draft, state = jax.jit(lambda p, s: drafter.propose(p, s, loop))(dp, drafter.init(dp, prefill))
  src_params = dp["source"] if drafter.shape == "static" else dp
  logits = np.asarray(BPDDrafter(bpd).head_logits(src_params, hidden, jnp.asarray(pending, jnp.int32)), np.float64)
  z = logits - logits.max(-1, keepdims=True)
  return draft, state, z - np.log(np.exp(z).sum(-1, keepdims=True))


def check_tree(draft):
  """A draft's depths, parents and masks agree: roots have depth 1, a child is one deeper than its parent and comes
  after it, and each node sees exactly itself and its ancestors."""
  for b in range(draft.tokens_BxN.shape[0]):
    depth, parent = np.asarray(draft.depth_BxN[b]).tolist(), np.asarray(draft.parent_BxN[b]).tolist()
    mask = np.asarray(draft.mask_BxNxN[b])
    for i, (d, p) in enumerate(zip(depth, parent)):
      assert (p == -1) == (d == 1) and p < i, (b, i, depth, parent)
      assert p == -1 or depth[p] == d - 1, (b, i, depth, parent)
      want = {i} | (set(np.flatnonzero(mask[p])) if p >= 0 else set())
      assert set(np.flatnonzero(mask[i])) == want, (b, i)


def test_a_heads_tree_is_the_n_best_paths_of_the_heads_lattice(tiny):
  """Heads over a subset of the vocabulary, a frontier and branching wide enough to hold the 8 best paths: the tree
  is the 8 most probable paths of at most 3 tokens (head d scoring depth d, indices mapped to token ids), whatever
  the rows; E[A] and the rank probabilities count the active row only."""
  model, params = tiny
  m, k, n = 64, 3, 8
  ids = np.random.default_rng(3).permutation(model.vocab_size)[:m]
  bpd = BPDModel(BPDConfig(num_heads=k, d_model=model.cfg.d_model, d_hidden=16, vocab_subset=m))
  hp = bpd.init_params(jax.random.key(1), vocab_ids=ids)
  hp["heads"]["w_out"] = jax.random.normal(jax.random.key(2), hp["heads"]["w_out"].shape) * 0.5
  dp = bpd_draft_params(model, params, bpd, hp)
  dp = dict(dp, proj_DxM=dp["proj_DxM"] * 20.0)  # sharper heads: the best paths reach depth 3
  # Each of the 8 best paths has its ancestors among them, so at most 7 nodes of one depth expand and at most 7
  # children of one node are kept: width 7 and branch 8 hold them all.
  drafter = OptTreeDrafter(HeadsTreeSource(bpd), nodes=n, depth=k, width=7, branch=8)
  draft, state, logp = heads_propose(tiny, drafter, dp, bpd, active=[True, False])
  check_tree(draft)
  assert all(row == sorted(row) for row in draft.depth_BxN.tolist())  # sorted by depth, as the module promises
  assert draft.depth_BxN[:, -1].tolist() == [3, 3]  # the precondition: depth-3 nodes, whose parents are not roots
  for b in range(2):
    value = {(i,): logp[b, 0, i] for i in range(m)}
    for d in (1, 2):
      value.update({p + (i,): v + logp[b, d, i] for p, v in value.items() if len(p) == d for i in range(m)})
    by_depth = [sorted((v for p, v in value.items() if len(p) <= d), reverse=True)[:n] for d in (1, 2, 3)]
    want = sorted(value, key=value.get, reverse=True)[:n]
    assert sorted(draft_paths(draft, b)) == sorted(tuple(int(ids[i]) for i in p) for p in want), b
    if b == 0:
      for d in range(3):
        np.testing.assert_allclose(state.expected_accept_DxN[d], np.cumsum(np.exp(by_depth[d])), rtol=1e-4)
  # (the root keeps no more children than the tree can hold: ranks past N count 0)
  np.testing.assert_allclose(state.rank_prob_DxC[0][:n], np.sort(np.exp(logp[0, 0]))[::-1][:n], atol=1e-6)
  assert not np.asarray(state.rank_prob_DxC[0][n:]).any()
  c = drafter.width * drafter.branch
  for d in (1, 2):
    np.testing.assert_allclose(state.rank_prob_DxC[d], np.pad(np.sort(np.exp(logp[0, d]))[::-1][:8], (0, c - 8)),
                               atol=1e-6)
  assert int(state.proposals) == 1


def test_a_static_tree_follows_its_prior_not_the_step(tiny):
  """A static tree's topology comes from its prior by depth and rank. With prior [[0, -3], [-1, -2]], 3 nodes, width
  1 and branch 2: depth 1 ranks score 0 and -3, the rank-0 node expands, its children score 0 - 1 and 0 - 2, and
  both beat the rank-1 root (-3): a root with two children in every row, whatever the heads' probabilities."""
  model, params = tiny
  bpd, hp = random_heads(tiny, 2)
  dp = static_draft_params(bpd_draft_params(model, params, bpd, hp), [[0.0, -3.0], [-1.0, -2.0]])
  drafter = OptTreeDrafter(HeadsTreeSource(bpd), nodes=3, depth=2, width=1, branch=2, shape="static")
  draft, _, logp = heads_propose(tiny, drafter, dp, bpd)
  check_tree(draft)
  assert draft.depth_BxN.tolist() == [[1, 2, 2]] * 2 and draft.parent_BxN.tolist() == [[-1, 0, 0]] * 2
  for b in range(2):
    assert draft.tokens_BxN[b].tolist() == [int(np.argmax(logp[b, 0])), *np.argsort(-logp[b, 1])[:2].tolist()]


def test_growth_stops_and_ties_still_give_well_formed_trees(tiny):
  """Trees stay well formed (depths, parents and masks agree) where the pool holds fewer grown nodes than the
  budget (growth stopped early: the rest are harmless depth-1 padding) and where a child ties its parent (a child
  probability of exactly 1, where the depth penalty must keep the parent first). A threshold of 0 grows to the
  maximum depth even when a depth adds nothing."""
  model, params = tiny
  bpd, hp = random_heads(tiny, 4)
  dp = bpd_draft_params(model, params, bpd, hp)
  # Early stop: 8 nodes, 4 grown (2 roots, 2 children of the better one).
  drafter = OptTreeDrafter(HeadsTreeSource(bpd), nodes=8, depth=4, width=1, branch=2, threshold=10.0)
  draft, state, logp = heads_propose(tiny, drafter, dp, bpd)
  check_tree(draft)
  assert state.reached_D.tolist() == [0, 2, 0, 0]
  for b in range(2):
    r0, r1 = np.argsort(-logp[b, 0])[:2].tolist()
    c0, c1 = np.argsort(-logp[b, 1])[:2].tolist()
    assert {(r0,), (r1,), (r0, c0), (r0, c1)} <= set(draft_paths(draft, b))
    assert sorted(draft.depth_BxN[b].tolist()) == [1] * 6 + [2] * 2  # the 4 others: roots that nothing follows
  # A chain ignores the threshold: its mask is a chain's whatever grew, so it always grows its whole length.
  chain = OptTreeDrafter(HeadsTreeSource(bpd), nodes=4, depth=4, width=1, branch=1, shape="chain", threshold=10.0)
  draft, state, _ = heads_propose(tiny, chain, dp, bpd)
  check_tree(draft)
  assert draft.depth_BxN.tolist() == [[1, 2, 3, 4]] * 2 and state.reached_D.tolist() == [0, 0, 0, 2]
  # Point masses: every head's top token is 40 nats or more ahead (log-probability exactly 0 in float32), so each node
  # ties its chain of top children. 4 nodes of width 2, branch 1: the roots x and a, and x's chain x' x'' (tied with
  # x) beats a's (40 nats below); the depth penalty must keep x, x', x'' and a, not a'' (tied with a) in place of a.
  _, _, logp = heads_propose(tiny, drafter, dp, bpd)
  top2 = -np.sort(-logp, axis=-1)[..., :2]
  sharp = dict(dp, proj_DxM=dp["proj_DxM"] * 40.0 / np.min(top2[..., 0] - top2[..., 1]))
  drafter = OptTreeDrafter(HeadsTreeSource(bpd), nodes=4, depth=3, width=2, branch=1)
  draft, _, logp = heads_propose(tiny, drafter, sharp, bpd)
  top2 = -np.sort(-logp, axis=-1)[..., :2]
  assert np.all(top2[..., 0] - top2[..., 1] >= 40.0 - 1e-3)  # the precondition
  check_tree(draft)
  for b in range(2):
    x, a = np.argsort(-logp[b, 0])[:2].tolist()
    x1, x2 = int(np.argmax(logp[b, 1])), int(np.argmax(logp[b, 2]))
    assert sorted(draft_paths(draft, b)) == sorted([(x,), (a,), (x, x1), (x, x1, x2)])
  # Nearly uniform heads: the 3 roots beat any child, so depths 2 and 3 add nothing to E[A]; threshold 0 still grows
  # them.
  flat = dict(dp, proj_DxM=dp["proj_DxM"] * 1e-3)
  drafter = OptTreeDrafter(HeadsTreeSource(bpd), nodes=3, depth=3, width=3, branch=1)
  draft, state, _ = heads_propose(tiny, drafter, flat, bpd)
  assert draft.depth_BxN.tolist() == [[1, 1, 1]] * 2 and state.reached_D.tolist() == [0, 0, 2]


def test_only_active_rows_decide_whether_a_tree_grows(tiny):
  """Growth stops when one more depth adds less than the threshold to E[A] in every active row: a row that has ended
  does not keep it growing. Each row alone measures its gain from depth 2; a threshold between the two gains stops
  growth after depth 2 when only the row of the smaller gain is active, and not when only the other is."""
  model, params = tiny
  bpd, hp = random_heads(tiny, 3)
  dp = bpd_draft_params(model, params, bpd, hp)
  drafter = OptTreeDrafter(HeadsTreeSource(bpd), nodes=8, depth=3, width=2, branch=2)
  alone = [[True, False], [False, True]]
  gains = []
  for active in alone:
    ea = heads_propose(tiny, drafter, dp, bpd, active=active)[1].expected_accept_DxN
    gains.append(float(ea[1, -1] - ea[0, -1]))
  small = int(np.argmin(gains))
  assert gains[1 - small] > gains[small] * 1.1, gains  # apart by far more than float error
  stopping = dataclasses.replace(drafter, threshold=float(np.mean(gains)))
  assert heads_propose(tiny, stopping, dp, bpd, active=alone[small])[1].reached_D.tolist() == [0, 1, 0]
  assert heads_propose(tiny, stopping, dp, bpd, active=alone[1 - small])[1].reached_D.tolist() == [0, 0, 1]


def test_budget_counts_the_draft_forwards_of_each_depth():
  """Predicted speed (1 + E[A]) / (verify + base + (d - 1) draft forwards): the catch-up forward is the base, each
  depth after the first one more forward. Here depth 2 gains 0.5 tokens for 0.5 s more, which does not pay."""
  ea = np.asarray([[1.0], [1.5]])
  n, d, table = choose_budget(ea, {1: 1.0}, draft_step_s=0.5, draft_base_s=0.25)
  assert (n, d) == (1, 1)
  assert table[(1, 1)] == pytest.approx(2.0 / 1.25) and table[(1, 2)] == pytest.approx(2.5 / 1.75)


def test_a_budget_chosen_for_a_given_depth_is_the_best_at_that_depth():
  """With depth= given, nodes=auto took the budget of the best (n, d) over every depth and ran it at the user's
  depth, where another budget was best (found by a review)."""
  ea = np.asarray([[0.5, 0.9, 0.95, 0.97], [0.6, 1.1, 1.6, 2.0], [0.6, 1.2, 1.9, 2.9]])  # by depth 1..3, n = 1..4
  verify = {1: 1.0, 2: 1.1, 4: 1.8}
  assert choose_budget(ea, verify)[:2] == (4, 3)
  n, d, table = choose_budget(ea, verify, depth=2)
  assert (n, d) == (2, 2) and set(table) == {(1, 2), (2, 2), (4, 2)}
  assert choose_budget(ea, verify, depth=9)[:2] == (4, 3)  # deeper than the calibration tree: its deepest


@dataclasses.dataclass(frozen=True)
class _ScoredSource:
  """A source that ranks children by scores of its own beside its probabilities (as `NgramHeadsTreeSource` does):
  the same per depth whatever the parent; the root's rows first, then every deeper depth's."""

  keys: tuple  # ([V] root scores, [V] deeper scores)
  probs: tuple  # ([V] root probabilities, [V] deeper ones)

  def calls(self, depth):
    return 0

  def init(self, draft_params, prefill, extra_slots, depth):
    return ()

  def to_tokens(self, draft_params, idx):
    return idx.astype(jnp.int32)

  def _out(self, i, shape):
    key, lp = jnp.asarray(self.keys[i], jnp.float32), jnp.log(jnp.asarray(self.probs[i], jnp.float32))
    return jnp.broadcast_to(key, (*shape, key.shape[0])), jnp.broadcast_to(lp, (*shape, lp.shape[0]))

  def begin(self, draft_params, sstate, loop, logp_fn):
    return self._out(0, loop.pending_B.shape), (), sstate

  def expand(self, draft_params, ctx, d, front_BxW, anc_BxWxR, logp_fn):
    return self._out(1, front_BxW.shape), ctx


def test_a_tree_chosen_by_scores_grows_to_its_depth_at_threshold_0():
  """A source's scores choose the nodes and its probabilities value them, so one more depth may lower E[A] (a
  deeper node of better score displaces a more probable one): at threshold 0 (always grow to D) growth still goes
  on, and the tree is the N best paths by score. Roots t0, t1, t2 score -0.1, -3, -4 (probabilities .5, .3, .15);
  below any node, t0 scores -0.1 with probability .02. The 3 best paths by score of depth <= 3 are t0, t0 t0 and
  t0 t0 t0; depth 2 alone lowers E[A] from .95 to .81 (t0 t0 in place of t1), which stopped the growth there."""
  source = _ScoredSource(keys=((-0.1, -3.0, -4.0, -5.0), (-0.1, -6.0, -7.0, -8.0)),
                         probs=((0.5, 0.3, 0.15, 0.05), (0.02, 0.9, 0.05, 0.03)))
  drafter = OptTreeDrafter(source, nodes=3, depth=3, width=2, branch=2)
  state = drafter.init(None, None)
  draft, state = jax.jit(lambda s: drafter.propose(None, s, fake_loop([0])))(state)
  check_tree(draft)
  assert state.reached_D.tolist() == [0, 0, 1]
  assert draft_paths(draft) == [(0,), (0, 0), (0, 0, 0)]
  np.testing.assert_allclose(state.expected_accept_DxN[:, -1], [0.95, 0.81, 0.5 + 0.01 + 0.0002], rtol=1e-5)
