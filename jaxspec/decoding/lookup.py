"""Prompt lookup decoding: a model-free drafter that copies from the context.

Predict: find the most recent earlier occurrence of the context's last n tokens (n from `max_ngram` down to
`min_ngram`; the longest n that matches wins) and propose the N tokens that followed it. Verify and accept as for any
chain; with greedy acceptance the output is exactly greedy decoding, whatever the draft. No drafter forward runs:
proposing is a few vectorised comparisons over the context buffer.

The context is a fixed `[B, C]` buffer (C = `PrefillInfo.context`: the loop's cache capacity, with an encoder-decoder's
source in place of its decoder's start token) holding the prompt and then every committed token; its last token is
always the pending token.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from jaxspec.decoding.accept import deepest_ok_path
from jaxspec.decoding.bpd import chain_draft
from jaxspec.decoding.opt_tree import ancestor_mask
from jaxspec.decoding.protocol import Draft, PrefillInfo, Verified, check_draft_params, check_target
from jaxspec.errors import InputError

Array = jax.Array


@flax.struct.dataclass
class LookupState:
  """The drafter's memory: the context `context_BxC[b, :lengths_B[b]]` (prompt, then committed tokens; the last one
  is the pending token). Slots past a row's length hold no meaning."""

  context_BxC: Array
  lengths_B: Array


def append_tokens(context_BxC: Array, lengths_B: Array, new_BxT: Array, n_new_B: Array) -> tuple[Array, Array]:
  """Writes `new_BxT[b, :n_new_B[b]]` after each row's context; writes past the buffer's end are dropped."""
  b, t = new_BxT.shape
  c = context_BxC.shape[1]
  idx_T = jnp.arange(t, dtype=jnp.int32)[None]
  cols_BxT = jnp.where(idx_T < n_new_B[:, None], lengths_B[:, None] + idx_T, c)  # column c is out of range: dropped
  rows_BxT = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, t))
  context_BxC = context_BxC.at[rows_BxT, cols_BxT].set(new_BxT.astype(context_BxC.dtype), mode="drop")
  return context_BxC, jnp.minimum(lengths_B + n_new_B, c)


def last_match(context_BxC: Array, lengths_B: Array, n: int) -> Array:
  """Start of the most recent earlier occurrence of each row's last n tokens, or -1 where there is none.

  An occurrence at j counts when it is followed by at least one token and is not the suffix itself: j + n < length.
  """
  b, c = context_BxC.shape
  if n > c - 1:
    return jnp.full((b,), -1, jnp.int32)
  width = c - n + 1  # candidate starts j = 0..c-n
  suffix_start_B = jnp.maximum(lengths_B - n, 0)
  match_BxW = jnp.ones((b, width), bool)
  for k in range(n):  # n is small and static: n shifted compares of the whole buffer
    want_B = jnp.take_along_axis(context_BxC, (suffix_start_B + k)[:, None], axis=1)
    match_BxW = match_BxW & (context_BxC[:, k:k + width] == want_B)
  j_W = jnp.arange(width, dtype=jnp.int32)
  valid_BxW = (j_W[None] + n) < lengths_B[:, None]
  return jnp.max(jnp.where(match_BxW & valid_BxW, j_W[None], -1), axis=-1)


def lookup_tokens(context_BxC: Array, lengths_B: Array, num_nodes: int, max_ngram: int,
                  min_ngram: int) -> tuple[Array, Array]:
  """The `[B, N]` tokens that followed the most recent occurrence of the longest matching suffix n-gram, and that
  n-gram's length `[B]` (0 where nothing matched).

  The copied span is `context[s:length]` (s = match start + n). Where N runs past the end of the context the span
  repeats, which continues a periodic context exactly (the span's length is the period the match implies). A row
  with no match proposes its last token repeated.
  """
  best_j_B = jnp.full(lengths_B.shape, -1, jnp.int32)
  best_n_B = jnp.zeros(lengths_B.shape, jnp.int32)
  for n in range(max_ngram, min_ngram - 1, -1):
    j_B = last_match(context_BxC, lengths_B, n)
    take_B = (best_j_B < 0) & (j_B >= 0)
    best_j_B = jnp.where(take_B, j_B, best_j_B)
    best_n_B = jnp.where(take_B, n, best_n_B)
  start_B = jnp.where(best_j_B >= 0, best_j_B + best_n_B, jnp.maximum(lengths_B - 1, 0))
  span_B = jnp.maximum(lengths_B - start_B, 1)
  offsets_BxN = jnp.arange(num_nodes, dtype=jnp.int32)[None] % span_B[:, None]
  tokens_BxN = jnp.take_along_axis(context_BxC, start_B[:, None] + offsets_BxN, axis=1).astype(jnp.int32)
  return tokens_BxN, best_n_B


@dataclasses.dataclass(frozen=True)
class LookupDrafter:
  """Prompt lookup decoding (method `lookup`): proposes a chain of N tokens copied from the context.

  Attributes:
    num_nodes: N, tokens proposed per step.
    max_ngram: the longest suffix n-gram searched for.
    min_ngram: the shortest; below it the drafter gives up and proposes filler (which verification rejects).
    gate: 0 verifies every draft. g >= 1 verifies the block only when some active row's draft comes from a match
      of at least g tokens; otherwise the step is a one-token forward (`Draft.verify_B`). Copies after a short
      match are mostly wrong, and on hardware where t(N+1) > t(1) a one-token step is cheaper than verifying them.
      The output is unchanged: greedy decoding's, or when sampling the target's distribution (the gate reads the
      committed context only).
  """

  num_nodes: int = 8
  max_ngram: int = 3
  min_ngram: int = 1
  gate: int = 0
  is_chain: bool = True
  calls_per_step: int = 0  # no drafter model runs

  def __post_init__(self):
    if self.num_nodes < 1:
      raise InputError(f"lookup: num_nodes must be >= 1, got {self.num_nodes}.")
    if not 1 <= self.min_ngram <= self.max_ngram:
      raise InputError(f"lookup: need 1 <= min_ngram <= max_ngram, got min_ngram={self.min_ngram}, "
                       f"max_ngram={self.max_ngram}.")
    if not 0 <= self.gate <= self.max_ngram:
      raise InputError(f"lookup: gate must be between 0 (verify every draft) and max_ngram={self.max_ngram}, "
                       f"got {self.gate}.")

  def init(self, draft_params, prefill: PrefillInfo) -> LookupState:
    b, p = prefill.tokens_BxP.shape
    c = prefill.context or prefill.capacity  # the prompt and every committed token (an encoder-decoder's source too)
    if c <= p:
      raise InputError(f"lookup: the context buffer ({c}) must be longer than the prompt ({p}).")
    keep_BxP = jnp.arange(p)[None] < prefill.lengths_B[:, None]
    prompt_BxP = jnp.where(keep_BxP, prefill.tokens_BxP, 0).astype(jnp.int32)
    context_BxC = jnp.zeros((b, c), jnp.int32).at[:, :p].set(prompt_BxP)
    context_BxC, lengths_B = append_tokens(context_BxC, prefill.lengths_B.astype(jnp.int32), prefill.first_B[:, None],
                                           jnp.ones((b,), jnp.int32))
    return LookupState(context_BxC, lengths_B)

  def propose(self, draft_params, dstate: LookupState, loop):
    tokens_BxN, ngram_B = lookup_tokens(dstate.context_BxC, dstate.lengths_B, self.num_nodes, self.max_ngram,
                                        self.min_ngram)
    draft = chain_draft(tokens_BxN)
    if self.gate:
      draft = draft.replace(verify_B=ngram_B >= self.gate)
    return draft, dstate

  def update(self, draft_params, dstate: LookupState, verified: Verified) -> LookupState:
    acc = verified.acceptance
    n_new_B = jnp.where(verified.active_B, acc.n_commit_B, 0)
    return LookupState(*append_tokens(dstate.context_BxC, dstate.lengths_B, acc.emitted_BxT, n_new_B))


def graft_chain(draft: Draft, copy_BxL: Array, use_B: Array, max_depth: int) -> Draft:
  """The tree `draft` with the chain `copy_BxL` grafted in, in the rows `use_B`; still N nodes.

  The copy's longest prefix that is already a root path of the tree (j tokens) costs nothing: the rest of the copy,
  L - j tokens, hangs below that path's last node. To keep N nodes, the last L - j nodes in node order that are not
  on that path are dropped; nodes are in topological order, so every dropped node's descendants are dropped with it,
  and in a tree sorted by depth (OPT-Tree's) they are its deepest nodes, about the least likely ones (within a depth
  OPT-Tree orders nodes by frontier slot, then rank, not strictly by probability). The kept nodes keep their order
  and the copied nodes come after them, so the draft stays topologically ordered. Needs L <= N; `max_depth` bounds
  the depth of the tree and of the copy (static). Jittable.

  Every node is a point mass (`probs_BxNxV` None): a grafted node is one more deterministic child, tried after its
  tree siblings by `tree_rejection`, which stays exact.
  """
  b, n = draft.tokens_BxN.shape
  l = copy_BxL.shape[1]
  # The tree's share of the copy: the deepest node whose root path holds the copy's tokens for its depths.
  copy_at_BxN = jnp.take_along_axis(copy_BxL, jnp.clip(draft.depth_BxN - 1, 0, l - 1), axis=1)
  ok_BxN = (draft.depth_BxN <= l) & (draft.tokens_BxN >= 0) & (draft.tokens_BxN == copy_at_BxN)
  attach_B, j_B = deepest_ok_path(draft, ok_BxN)
  keep_path_BxN = jnp.take_along_axis(draft.mask_BxNxN, attach_B[:, None, None], axis=1)[:, 0] & (j_B[:, None] > 0)
  need_B = jnp.where(use_B, l - j_B, 0)
  # Drop the last `need` nodes off the attach path (counting from the end of the node order).
  free_BxN = ~keep_path_BxN
  from_end_BxN = jnp.cumsum(free_BxN[:, ::-1].astype(jnp.int32), axis=1)[:, ::-1]
  keep_BxN = ~(free_BxN & (from_end_BxN <= need_B[:, None]))
  idx_N = jnp.arange(n, dtype=jnp.int32)
  old_of_new_BxN = jnp.argsort(jnp.where(keep_BxN, idx_N[None], n + idx_N[None]), axis=1).astype(jnp.int32)
  new_of_old_BxN = jnp.argsort(old_of_new_BxN, axis=1).astype(jnp.int32)
  n_keep_B = n - need_B
  grafted_BxN = idx_N[None] >= n_keep_B[:, None]
  t_BxN = idx_N[None] - n_keep_B[:, None]  # the grafted node's place in the rest of the copy
  take = lambda x_BxN: jnp.take_along_axis(x_BxN, old_of_new_BxN, axis=1)
  old_parent_BxN = take(draft.parent_BxN)
  kept_parent_BxN = jnp.where(old_parent_BxN >= 0,
                              jnp.take_along_axis(new_of_old_BxN, jnp.maximum(old_parent_BxN, 0), axis=1), -1)
  attach_new_B = jnp.where(j_B > 0, jnp.take_along_axis(new_of_old_BxN, attach_B[:, None], axis=1)[:, 0], -1)
  graft_parent_BxN = jnp.where(t_BxN == 0, attach_new_B[:, None], idx_N[None] - 1)
  parent_BxN = jnp.where(grafted_BxN, graft_parent_BxN, kept_parent_BxN).astype(jnp.int32)
  copy_tok_BxN = jnp.take_along_axis(copy_BxL, jnp.clip(j_B[:, None] + t_BxN, 0, l - 1), axis=1)
  tokens_BxN = jnp.where(grafted_BxN, copy_tok_BxN, take(draft.tokens_BxN))
  depth_BxN = jnp.where(grafted_BxN, j_B[:, None] + t_BxN + 1, take(draft.depth_BxN)).astype(jnp.int32)
  return draft.replace(tokens_BxN=tokens_BxN, depth_BxN=depth_BxN, parent_BxN=parent_BxN,
                       mask_BxNxN=ancestor_mask(parent_BxN, max_depth))


@flax.struct.dataclass
class WithLookupState:
  """The wrapped drafter's state, the context for lookups, which rows verified a copy in the current step, and the
  copies verified so far (active rows, summed over the batch)."""

  inner: Any
  lookup: LookupState
  copy_B: Array
  copies: Array


@dataclasses.dataclass(frozen=True)
class WithLookup:
  """A drafter whose draft takes in a prompt-lookup copy, row by row, when the context repeats itself.

  Each step the wrapped drafter proposes its N nodes as usual; where the context's last `min_match` or more tokens
  occurred earlier (the longest suffix n-gram up to `max_ngram`, most recent occurrence), the tokens that followed
  that occurrence are verified instead, as a chain. Copies win where the output repeats its context (summaries,
  extraction, answers quoting a document, code that restates names), and the drafter keeps the other steps. A step
  costs at most what the wrapped drafter's step costs: the lookup is a few comparisons over the context, and the
  block stays N nodes; a chain drafter with `skip_propose` (BPD heads, `eagle`) does not even run in a step where
  every active row copies. A chain drafter's N tokens are replaced by N copied ones. A tree drafter's tree keeps
  most of its nodes and takes a chain of as many copied tokens as its deepest path (`max_path`: its draft state
  expects no longer accepted path) as one more branch (`graft_chain`: the part of the copy the tree already holds
  costs nothing, and the tree's deepest nodes make room for the rest). With `graft=False` the copy replaces the whole
  tree instead, and the nodes past it are left unproposed (-1), never accepted.

  The choice reads only committed tokens, so the output is unchanged: greedy decoding's with greedy acceptance, and
  under sampling the target's distribution (a copy is a point mass q, reported as one-hot `probs_BxNxV` when the
  wrapped drafter reports probabilities, and rejection sampling is exact for whichever q a row's context picked).
  With a gated drafter (`Draft.verify_B`) a copied row always asks to be verified. The wrapped drafter's own
  counters see the copies as its drafts (Jacobi's fast-forward and stationary counts include copied tokens).

  Attributes:
    inner: a drafter whose `update` reads only the verify outcome, never its own proposal (`draft_replaceable`):
      BPD heads, feature-level drafts, Jacobi, OPT-Tree.
    min_match: the shortest suffix match (tokens) whose copy replaces the drafter's draft.
    max_ngram: the longest suffix n-gram searched for.
    graft: trees (of point masses) take the copy as a branch (True) or are replaced by it (False).
  """

  inner: Any
  min_match: int = 2
  max_ngram: int = 3
  graft: bool = True

  def __post_init__(self):
    if not getattr(self.inner, "draft_replaceable", False):
      raise InputError(f"lookup=: {type(self.inner).__name__} cannot have its drafts replaced by copies (it needs a "
                       "drafter whose update reads only the verify outcome: BPD heads, eagle, jacobi, opt-tree).")
    if not 1 <= self.min_match <= self.max_ngram:
      raise InputError(f"lookup=: the match length must be between 1 and max_ngram={self.max_ngram}, got "
                       f"{self.min_match}.")

  @property
  def num_nodes(self) -> int:
    return self.inner.num_nodes

  @property
  def is_chain(self) -> bool:
    return self.inner.is_chain

  @property
  def copy_len(self) -> int:
    """Copied tokens per step: N for a chain drafter, a tree's deepest path."""
    return min(self.num_nodes, getattr(self.inner, "max_path", self.num_nodes))

  @property
  def calls_per_step(self) -> int:
    return self.inner.calls_per_step

  @property
  def needs_params(self) -> str:
    return getattr(self.inner, "needs_params", "")

  def check_target(self, target) -> None:
    check_target(self.inner, target)

  def check_draft_params(self, target, draft_params) -> None:
    check_draft_params(self.inner, target, draft_params)

  @property
  def greedy_only(self) -> bool:
    return getattr(self.inner, "greedy_only", False)

  @property
  def lookup(self) -> LookupDrafter:
    """The lookup drafter whose context this one keeps (and whose matches shorter than `min_match` it ignores)."""
    return LookupDrafter(num_nodes=self.num_nodes, max_ngram=self.max_ngram, min_ngram=self.min_match)

  def init(self, draft_params, prefill: PrefillInfo) -> WithLookupState:
    b = prefill.first_B.shape[0]
    return WithLookupState(self.inner.init(draft_params, prefill), self.lookup.init(None, prefill),
                           jnp.zeros((b,), bool), jnp.int32(0))

  def propose(self, draft_params, dstate: WithLookupState, loop):
    copy_BxN, match_B = lookup_tokens(dstate.lookup.context_BxC, dstate.lookup.lengths_B, self.num_nodes,
                                      self.max_ngram, self.min_match)
    copy_B = match_B >= self.min_match
    draft, inner = self._inner_propose(draft_params, dstate.inner, loop, copy_BxN, copy_B)
    verify = None if draft.verify_B is None else draft.verify_B | copy_B
    if self.grafts(draft):
      # copy_len bounds the tree's depth too (a tree's max_path, at most N).
      draft = graft_chain(draft, copy_BxN[:, :self.copy_len], copy_B, self.copy_len).replace(verify_B=verify)
      return draft, dstate.replace(inner=inner, copy_B=copy_B)
    n = self.num_nodes
    copy_BxN = jnp.where(jnp.arange(n)[None] < self.copy_len, copy_BxN, -1)  # past a tree's depth: unproposed
    chain = chain_draft(copy_BxN)
    pick = lambda c, d: jnp.where(copy_B.reshape(copy_B.shape + (1,) * (d.ndim - 1)), c, d)
    draft = draft.replace(tokens_BxN=pick(chain.tokens_BxN, draft.tokens_BxN),
                          depth_BxN=pick(chain.depth_BxN, draft.depth_BxN),
                          mask_BxNxN=pick(chain.mask_BxNxN, draft.mask_BxNxN),
                          parent_BxN=pick(chain.parent_BxN, draft.parent_BxN),
                          probs_BxNxV=self.copy_probs(draft.probs_BxNxV, copy_BxN, copy_B), verify_B=verify)
    return draft, dstate.replace(inner=inner, copy_B=copy_B)

  def _inner_propose(self, draft_params, inner_state, loop, copy_BxN: Array, copy_B: Array):
    """The wrapped drafter's draft and state. A chain drafter with `skip_propose` (BPD heads, `eagle`) does not run
    in steps where every active row copies: its draft would be replaced anyway, and its work (the heads' or the
    draft's forwards) is saved. The draft in those steps is the copy, as `propose` below would make it."""
    full = lambda st: self.inner.propose(draft_params, st, loop)
    skip = getattr(self.inner, "skip_propose", None)
    if skip is None or not self.inner.is_chain:
      return full(inner_state)
    shapes, _ = jax.eval_shape(full, inner_state)
    chain = chain_draft(copy_BxN)

    def skipped(st):
      draft = shapes.replace(  # the same pytree as the full branch's draft
          tokens_BxN=chain.tokens_BxN.astype(shapes.tokens_BxN.dtype),
          depth_BxN=chain.depth_BxN.astype(shapes.depth_BxN.dtype), mask_BxNxN=chain.mask_BxNxN,
          parent_BxN=chain.parent_BxN.astype(shapes.parent_BxN.dtype),
          probs_BxNxV=None if shapes.probs_BxNxV is None else jax.nn.one_hot(
              copy_BxN, shapes.probs_BxNxV.shape[-1], dtype=shapes.probs_BxNxV.dtype),
          verify_B=None if shapes.verify_B is None else copy_B)
      return draft, skip(draft_params, st, loop)

    return jax.lax.cond(jnp.all(copy_B | ~loop.active_B), skipped, full, inner_state)

  def grafts(self, draft: Draft) -> bool:
    """Whether the copy joins the draft (`graft_chain`) rather than replacing it: trees of point masses, `graft`."""
    return self.graft and not self.inner.is_chain and draft.probs_BxNxV is None

  def copy_probs(self, probs_BxNxV: Array | None, copy_BxN: Array, copy_B: Array) -> Array | None:
    """The draft's q where rows copy: a point mass on each copied token (None stays None: point masses already)."""
    if probs_BxNxV is None:
      return None
    onehot_BxNxV = jax.nn.one_hot(copy_BxN, probs_BxNxV.shape[-1], dtype=probs_BxNxV.dtype)
    return jnp.where(copy_B[:, None, None], onehot_BxNxV, probs_BxNxV)

  def update(self, draft_params, dstate: WithLookupState, verified: Verified) -> WithLookupState:
    copies = dstate.copies + jnp.sum(dstate.copy_B & verified.active_B).astype(jnp.int32)
    return WithLookupState(self.inner.update(draft_params, dstate.inner, verified),
                           self.lookup.update(None, dstate.lookup, verified), dstate.copy_B, copies)

  def stats(self, dstate: WithLookupState) -> dict:
    """The wrapped drafter's counters and `copied_steps`: row-steps that verified a copy."""
    inner = self.inner.stats(dstate.inner) if hasattr(self.inner, "stats") else {}
    return {**inner, "copied_steps": dstate.copies}
