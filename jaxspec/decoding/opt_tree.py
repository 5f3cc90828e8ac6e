"""Adaptive draft trees (OPT-Tree, Wang et al. 2024) as a drafter on the shared loop.

A draft tree's expected acceptance length is E[A] = sum over its nodes of the probability of the node's path, the
product of the drafter's probabilities along it (a node is accepted when its whole path is). Under a budget of N
nodes E[A] is largest for the N nodes of highest path probability, and since a child's path probability never
exceeds its parent's, those N nodes always form a tree. The drafter grows it depth by depth inside the jitted loop:

1. depth 1: the root's (the pending token's) top C = W * K children, each valued by its draft log-probability;
2. depth d + 1: the W most valuable depth-d nodes (the frontier) each get their top K children from the drafter,
   valued by the parent's value plus the child's log-probability;
3. growth stops at the maximum depth D, or earlier when one more depth raises the best tree's E[A] by less than a
   threshold for every row;
4. the N most valuable nodes of all depths are the draft, sorted by depth (a parent always comes first).

A source may rank children by scores of its own (<= 0, summed along the path like log-probabilities) beside its
probabilities: the nodes are then chosen by their paths' scores, and E[A] is still the sum of the chosen nodes' path
probabilities (what the budget, the gate and the growth threshold read).

Every shape is static: the pool of candidates is `[B, D, C]`, the draft always has N nodes. These drafters plug in:

- `LMTreeSource`: a draft language model with its own KV cache (e.g. a distilled draft or the target's first
  layers). Each depth is one draft forward over the W frontier nodes; the nodes are written into the draft cache past
  its committed length, and each reads its own ancestors there through a per-token cache mask, so a depth costs a
  W-token forward whatever the tree's shape. After verification the committed tokens are fed to the draft at the
  start of the next step (one forward of at most D + 1 tokens, which also yields the root's distribution).
- `HeadsTreeSource`: BPD heads. Head d's distribution is the same for every depth-d node (the heads read the
  target's hidden state, not the draft), so the tree is the top-N paths of the heads' lattice. No draft forwards.
- `jaxspec.decoding.lattice.NgramHeadsTreeSource`: BPD heads whose top-t candidates are scored, node by node, with an
  n-gram LM along the node's own path (Kim et al.'s lattice rescoring inside the tree; greedy only). No draft forwards.

Fixed trees for comparison run on the same code: `shape="chain"` is one path of N nodes (W = K = 1), and
`shape="static"` grows a Medusa-style static tree, chosen by a fixed prior of log-probability by depth and rank
instead of the step's own probabilities (`draft_params["tree_prior_DxC"]`, calibrated with `calibrated_prior` from
the drafter's average confidence on training prompts), so its topology is the same at every step.

The target verifies the N nodes in one tree-masked forward (depth-based positions), and the acceptance rule walks
the tree: `GreedyAcceptance` keeps the longest path of target argmaxes (token-identical to greedy decoding);
`SampleAcceptance` runs multi-draft recursive rejection sampling over the tree (exactly the target's distribution).
The tree's tokens are chosen deterministically (top-K), so each node is a point-mass proposal.

`stats()` sums E[A] of the best tree for every budget n <= N and depth limit d <= D (`expected_accept_DxN`), which
`choose_budget` combines with the measured verify cost t(n) of the machine to pick N and D.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.decoding.bpd import BPDDrafter, check_bpd_draft_params
from jaxspec.decoding.protocol import (Draft, LanguageModel, PrefillInfo, Verified, check_draft_params, check_target,
                                       draft_cache_slots, draft_model_params_hint, empty_prefill_kwargs,
                                       require_entries, start, vocab_check)
from jaxspec.decoding.sampling import Warp
from jaxspec.errors import InputError
from jaxspec.models.bpd import BPDModel

Array = jax.Array

SHAPES = ("dynamic", "static", "chain")
_DEPTH_PENALTY = 1e-3  # breaks ties between a node and its child (a child probability of exactly 1) for the parent


# --------------------------------------------------------------------------------------------------------------------
# Sources: where the tree's distributions come from.


@flax.struct.dataclass
class LMSourceState:
  """A draft LM's cache and the committed tokens it has not read yet (the last of them is the pending token)."""

  cache: Any
  todo_BxU: Array  # tokens to feed at the next step, left-aligned
  n_todo_B: Array
  base_B: Array  # the cache's committed length before the last propose (idle rows return to it)


@dataclasses.dataclass(frozen=True)
class LMTreeSource:
  """Tree distributions from a draft language model that shares the target's vocabulary.

  The model must accept `forward(..., cache_mask_BxTxS=...)` (as `LlamaLM` does): tree nodes read their ancestors
  from the draft cache, past its committed length.
  """

  model: LanguageModel

  @property
  def needs_params(self) -> str:
    return draft_model_params_hint(self.model)

  def calls(self, depth):
    """Draft forwards of a step whose tree grew to `depth` (an int or a traced count): the catch-up forward (the
    root's distribution), then one per depth after the first."""
    return depth

  def check_target(self, target: LanguageModel) -> None:
    vocab_check(target, self.model)

  def to_tokens(self, draft_params, idx):
    return idx.astype(jnp.int32)

  def init(self, draft_params, prefill: PrefillInfo, extra_slots: int, depth: int) -> LMSourceState:
    b = prefill.tokens_BxP.shape[0]
    slots = draft_cache_slots(self.model, prefill) + extra_slots
    cache = jax.lax.optimization_barrier(self.model.init_cache(b, slots))
    tokens_BxP, lengths_B, cache = start(self.model, draft_params, prefill.tokens_BxP, prefill.lengths_B, cache)
    p = tokens_BxP.shape[1]
    positions_BxP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((p, p), bool)), (b, p, p))
    _, _, cache = self.model.forward(draft_params, tokens_BxP, positions_BxP, cache, causal, logits=False,
                                     **empty_prefill_kwargs(self.model))
    cache = cache.advance(lengths_B)
    u = depth + 1  # a step commits at most depth + 1 tokens
    todo_BxU = jnp.zeros((b, u), jnp.int32).at[:, 0].set(prefill.first_B.astype(jnp.int32))
    return LMSourceState(cache, todo_BxU, jnp.ones((b,), jnp.int32), cache.lengths)

  def begin(self, draft_params, sstate: LMSourceState, loop, logp_fn) -> tuple[Array, Any, LMSourceState]:
    """Feeds the committed tokens; returns the root's log-probabilities `[B, V]` and the growth context."""
    cache = sstate.cache
    b, u = sstate.todo_BxU.shape
    positions_BxU = cache.lengths[:, None] + jnp.arange(u, dtype=jnp.int32)[None]
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((u, u), bool)), (b, u, u))
    _, hidden_BxUxD, cache = self.model.forward(draft_params, sstate.todo_BxU, positions_BxU, cache, causal,
                                                logits=False)
    last_BxD = jnp.take_along_axis(hidden_BxUxD, (sstate.n_todo_B - 1)[:, None, None], axis=1)[:, 0]
    logp_BxV = logp_fn(self.model.logits(draft_params, last_BxD[:, None])[:, 0])
    base_B = cache.lengths
    cache = cache.advance(sstate.n_todo_B)
    return logp_BxV, cache, sstate.replace(base_B=base_B)

  def expand(self, draft_params, ctx, d: Array, front_BxW: Array, anc_BxWxR: Array, logp_fn) -> tuple[Array, Any]:
    """Log-probabilities `[B, W, V]` of the children of the depth-(d-1) frontier; writes the frontier's entries."""
    cache = ctx
    b, w = front_BxW.shape
    r = anc_BxWxR.shape[-1]
    committed_B = cache.lengths
    s_S = jnp.arange(cache.capacity, dtype=jnp.int32)
    rel_BxS = s_S[None] - committed_B[:, None]
    in_tree_BxS = (rel_BxS >= 0) & (rel_BxS < r)
    anc_BxWxS = jnp.take_along_axis(anc_BxWxR, jnp.clip(rel_BxS, 0, r - 1)[:, None, :].repeat(w, axis=1), axis=2)
    visible_BxWxS = (rel_BxS < 0)[:, None] | (in_tree_BxS[:, None] & anc_BxWxS)
    offset = (d - 2) * w
    positions_BxW = jnp.broadcast_to((committed_B + d - 2)[:, None], (b, w))
    eye = jnp.broadcast_to(jnp.eye(w, dtype=bool), (b, w, w))
    kw = {}
    if getattr(self.model, "keys_need_positions", False):  # T5's relative bias: depth-(k+1) nodes sit k*w slots in
      kw["cache_positions_BxS"] = jnp.where(rel_BxS < 0, s_S[None], committed_B[:, None] + jnp.maximum(rel_BxS, 0) // w)
    logits_BxWxV, _, cache = self.model.forward(draft_params, front_BxW, positions_BxW,
                                                cache.replace(lengths=committed_B + offset), eye,
                                                cache_mask_BxTxS=visible_BxWxS, **kw)
    return logp_fn(logits_BxWxV), cache.replace(lengths=committed_B)

  def update(self, draft_params, sstate: LMSourceState, ctx, verified: Verified) -> LMSourceState:
    """The next step feeds the accepted nodes and the new pending token (the old pending token was fed by `begin`,
    so the draft cache then holds exactly the target's committed tokens)."""
    cache = ctx
    acc = verified.acceptance
    active_B = verified.active_B
    u = sstate.todo_BxU.shape[1]
    todo_BxU = acc.emitted_BxT[:, :u].astype(jnp.int32)
    lengths_B = jnp.where(active_B, cache.lengths, sstate.base_B)
    return sstate.replace(cache=cache.replace(lengths=lengths_B),
                          todo_BxU=jnp.where(active_B[:, None], todo_BxU, sstate.todo_BxU),
                          n_todo_B=jnp.where(active_B, acc.n_commit_B, sstate.n_todo_B))


@dataclasses.dataclass(frozen=True)
class HeadsTreeSource:
  """Tree distributions from BPD heads: depth d's distribution is head d's, whatever the path (no draft forwards).

  `draft_params` are the BPD drafter's (`jaxspec.decoding.bpd.bpd_draft_params`).
  """

  bpd: BPDModel
  needs_params = BPDDrafter.needs_params

  def calls(self, depth):
    return 0

  def check_target(self, target: LanguageModel) -> None:
    BPDDrafter(self.bpd).check_target(target)

  def check_draft_params(self, target: LanguageModel, draft_params) -> None:
    check_bpd_draft_params(target, draft_params)

  def init(self, draft_params, prefill: PrefillInfo, extra_slots: int, depth: int) -> Array:
    if depth > self.bpd.num_heads:
      raise InputError(f"A tree of depth {depth} needs {depth} BPD heads; these have {self.bpd.num_heads}.")
    return prefill.hidden_BxD.astype(jnp.float32)

  def to_tokens(self, draft_params, idx):
    """Token ids of candidate indices (heads restricted to a vocabulary subset index into it)."""
    ids = draft_params["bpd"]["vocab_ids"][idx] if "vocab_ids" in draft_params["bpd"] else idx
    return ids.astype(jnp.int32)

  def begin(self, draft_params, sstate: Array, loop, logp_fn) -> tuple[Array, Any, Array]:
    logits_BxKxM = BPDDrafter(self.bpd).head_logits(draft_params, sstate, loop.pending_B)
    logp_BxKxM = logp_fn(logits_BxKxM)
    return logp_BxKxM[:, 0], logp_BxKxM, sstate

  def expand(self, draft_params, ctx, d: Array, front_BxW: Array, anc_BxWxR: Array, logp_fn) -> tuple[Array, Any]:
    logp_BxM = jax.lax.dynamic_index_in_dim(ctx, d - 1, axis=1, keepdims=False)
    return jnp.broadcast_to(logp_BxM[:, None], (front_BxW.shape[0], front_BxW.shape[1], logp_BxM.shape[-1])), ctx

  def update(self, draft_params, sstate: Array, ctx, verified: Verified) -> Array:
    acc = verified.acceptance
    last_B = jnp.take_along_axis(acc.path_BxT, (acc.n_commit_B - 1)[:, None], axis=1)[:, 0]
    h_BxD = jnp.take_along_axis(verified.hidden_BxTxD, last_B[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    return jnp.where(verified.active_B[:, None], h_BxD, sstate)


# --------------------------------------------------------------------------------------------------------------------
# The drafter.


@flax.struct.dataclass
class TreeState:
  source: Any
  ctx: Any  # the source's context of the last propose (e.g. the draft cache with the tree's entries)
  expected_accept_DxN: Array  # sums over proposals of E[A] of the best n-node tree of depth <= d
  reached_D: Array  # proposals whose growth stopped at depth d (index d - 1)
  rank_prob_DxC: Array  # sums of the rank-r child probability of the best frontier node at depth d
  proposals: Array
  forwards: Array  # drafter forwards so far: growth that stops early (`threshold`) runs fewer than `depth` a step


def ancestor_mask(parent_BxN: Array, max_depth: int) -> Array:
  """`mask[b, i, j]`: node j is node i or one of its ancestors (parents precede children; -1 = the root)."""
  b, n = parent_BxN.shape
  eye = jnp.broadcast_to(jnp.eye(n, dtype=bool), (b, n, n))
  mask = eye
  for _ in range(max_depth - 1):
    up_BxNxN = jnp.take_along_axis(mask, jnp.maximum(parent_BxN, 0)[:, :, None], axis=1)
    mask = eye | (up_BxNxN & (parent_BxN >= 0)[:, :, None])
  return mask


@dataclasses.dataclass(frozen=True)
class OptTreeDrafter:
  """Draft trees of N nodes grown to maximise the expected acceptance length (see the module docstring).

  Attributes:
    source: `LMTreeSource` (a draft LM) or `HeadsTreeSource` (BPD heads).
    nodes: N, the node budget (static).
    depth: D, the maximum depth.
    width: W, frontier nodes expanded per depth.
    branch: K, children considered per frontier node (the root gets W * K).
    threshold: stop growing when one more depth adds less than this to E[A] in every row (0: always grow to D).
    shape: "dynamic" (OPT-Tree), "static" (a fixed tree from `draft_params["tree_prior_DxC"]`) or "chain".
    warp: None for greedy decoding (trees from the drafter's plain distributions); the acceptor's `Warp` when
      sampling, so the tree follows the drafter's warped distribution.
    gate: verify the trees only in steps where the active rows' mean E[A] >= gate; other steps run a one-token
      forward (`Draft.verify_B`), which is cheaper where t(N + 1) > t(1). The batch shares the forward, so with the
      drafter's probabilities calibrated verifying pays when the rows' mean E[A] > t(N + 1) / t(1) - 1 (one row's
      trees would not pay for the others' one-token steps). 0 verifies every tree. Greedy output stays greedy
      decoding's and sampling stays exact: the decision reads only the draft.
  """

  source: Any
  nodes: int = 16
  depth: int = 6
  width: int = 4
  branch: int = 4
  threshold: float = 0.0
  shape: str = "dynamic"
  warp: Warp | None = None
  gate: float = 0.0

  def __post_init__(self):
    if self.shape not in SHAPES:
      raise InputError(f"Unknown tree shape {self.shape!r}; choose from {', '.join(SHAPES)}.")
    if self.shape == "chain" and (self.width, self.branch, self.depth) != (1, 1, self.nodes):
      raise InputError("A chain has width 1, branch 1 and depth equal to its nodes: use OptTreeDrafter.chain(...).")
    if min(self.nodes, self.depth, self.width, self.branch) < 1:
      raise InputError(f"nodes, depth, width and branch must be >= 1, got {self.nodes}, {self.depth}, {self.width}, "
                       f"{self.branch}.")
    if self.depth > self.nodes:
      raise InputError(f"A tree of {self.nodes} nodes is at most {self.nodes} deep, got depth={self.depth}.")
    if not self.gate >= 0:
      raise InputError(f"A tree's gate is an expected acceptance length >= 0, got {self.gate}.")
    if self.depth * self.width * self.branch < self.nodes:
      raise InputError(f"A pool of depth x width x branch = {self.depth * self.width * self.branch} candidates "
                       f"cannot fill {self.nodes} nodes.")

  @classmethod
  def chain(cls, source, nodes: int, warp: Warp | None = None) -> "OptTreeDrafter":
    return cls(source, nodes=nodes, depth=nodes, width=1, branch=1, shape="chain", warp=warp)

  @property
  def num_nodes(self) -> int:
    return self.nodes

  @property
  def greedy_only(self) -> bool:
    """As its source (the n-gram-rescored heads are greedy only): the loop then refuses a sampling rule."""
    return getattr(self.source, "greedy_only", False)

  @property
  def is_chain(self) -> bool:
    return self.shape == "chain"

  # The sources' updates read only the verify outcome, so `jaxspec.decoding.lookup.WithLookup` may verify a copy
  # in place of a tree, as long as the copy is no deeper than a tree (the sources keep room for `max_path` tokens).
  draft_replaceable = True

  @property
  def max_path(self) -> int:
    return self.depth

  @property
  def calls_per_step(self) -> int:
    """Drafter forwards of a step grown to the full depth; `stats()["draft_forwards"]` counts the real ones."""
    return self.source.calls(self.depth)

  @property
  def needs_params(self) -> str:
    return getattr(self.source, "needs_params", "")

  def check_target(self, target: LanguageModel) -> None:
    check_target(self.source, target)
    if getattr(self.source, "width", self.width) != self.width:
      raise InputError(f"{type(self.source).__name__}(width={self.source.width}) serves trees of width "
                       f"{self.source.width}, and this tree has width={self.width}: give both the same width.")
    vocab = getattr(target, "vocab_size", None)
    if vocab is not None and self.branch > vocab:
      raise InputError(f"branch={self.branch} candidates per node is more than the target's vocabulary ({vocab}).")

  def check_draft_params(self, target: LanguageModel, draft_params) -> None:
    if self.shape == "static":  # the source's params beside the calibrated prior (`static_tree_params`)
      require_entries("A static tree", draft_params, ("source", "tree_prior_DxC"),
                      "jaxspec.decoding.opt_tree.static_draft_params")
      draft_params = draft_params["source"]
    check_draft_params(self.source, target, draft_params)

  @property
  def _cands(self) -> int:
    return self.width * self.branch

  def init(self, draft_params, prefill: PrefillInfo) -> TreeState:
    extra = self.depth * self.width + self.depth + 2
    sstate = self.source.init(self._source_params(draft_params), prefill, extra, self.depth)
    d, n, c = self.depth, self.nodes, self._cands
    return TreeState(source=sstate, ctx=None, expected_accept_DxN=jnp.zeros((d, n), jnp.float32),
                     reached_D=jnp.zeros((d,), jnp.int32), rank_prob_DxC=jnp.zeros((d, c), jnp.float32),
                     proposals=jnp.int32(0), forwards=jnp.int32(0))

  def _logp_fn(self, loop):
    if self.warp is None:
      return lambda logits: jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return lambda logits: self.warp.log_probs(logits, loop.sp)

  def _prior(self, draft_params, depth_index, ranks):
    return jnp.take(draft_params["tree_prior_DxC"][depth_index], ranks, axis=-1)

  def propose(self, draft_params, dstate: TreeState, loop) -> tuple[Draft, TreeState]:
    b = loop.pending_B.shape[0]
    dmax, n, w, k, c = self.depth, self.nodes, self.width, self.branch, self._cands
    r = max(dmax - 1, 1) * w  # draft-cache slots of the fed frontiers (depths 1 .. D-1)
    logp_fn = self._logp_fn(loop)
    static = self.shape == "static"
    src_params = self._source_params(draft_params)
    root, ctx, sstate = self.source.begin(src_params, dstate.source, loop, logp_fn)
    root_key_BxV, root_BxV = _key_and_logp(root)
    if k > root_BxV.shape[-1]:  # a trace-time check: top_k would fail with a shape error
      raise InputError(f"opt-tree: branch={k} children per node, more than the {root_BxV.shape[-1]} tokens its "
                       "drafter predicts over; use a smaller branch.")
    # The root's best children, no more than the tree can hold (N), in a level of C slots (the rest empty).
    c1 = min(c, n, root_BxV.shape[-1])
    sc1_BxC, tok1_BxC = jax.lax.top_k(root_key_BxV, c1)
    lp1_BxC = jnp.take_along_axis(root_BxV, tok1_BxC, axis=-1)
    tok1_BxC = jnp.pad(self.source.to_tokens(src_params, tok1_BxC), ((0, 0), (0, c - c1)))
    lp1_BxC = jnp.pad(lp1_BxC, ((0, 0), (0, c - c1)), constant_values=-jnp.inf)
    sc1_BxC = jnp.pad(sc1_BxC, ((0, 0), (0, c - c1)), constant_values=-jnp.inf)
    # A static tree ranks by its prior, but never takes a child its source scored -inf (a rescored source's children
    # past its top t): those slots hold arbitrary tokens
    key1_BxC = (jnp.where(sc1_BxC > -jnp.inf, self._prior(draft_params, 0, jnp.arange(c))[None], -jnp.inf)
                if static else sc1_BxC)

    pool_tok = jnp.zeros((b, dmax, c), jnp.int32).at[:, 0].set(tok1_BxC)
    pool_lv = jnp.full((b, dmax, c), -jnp.inf, jnp.float32).at[:, 0].set(lp1_BxC)
    pool_key = jnp.full((b, dmax, c), -jnp.inf, jnp.float32).at[:, 0].set(key1_BxC)
    pool_pf = jnp.full((b, dmax, c), -1, jnp.int32)  # the parent's frontier index at the previous depth
    front_BxDxW = jnp.zeros((b, dmax, w), jnp.int32)  # pool slots of each depth's frontier
    rank_DxC = jnp.zeros((dmax, c), jnp.float32).at[0].set(jnp.sum(jnp.exp(lp1_BxC) * loop.active_B[:, None], 0))
    depth_idx_DxC = jnp.broadcast_to(jnp.arange(dmax)[:, None], (dmax, c))

    def best_values(lv, key, d):  # path probabilities `[B, N]` of the N best nodes of depth <= d, best first
      sel_key = jnp.where(depth_idx_DxC[None] < d, key - _DEPTH_PENALTY * depth_idx_DxC[None], -jnp.inf)
      top_key, top_i = jax.lax.top_k(sel_key.reshape(b, -1), n)
      return jnp.where(top_key > -jnp.inf, jnp.exp(jnp.take_along_axis(lv.reshape(b, -1), top_i, 1)), 0.0)

    best_tree_value = lambda lv, key, d: jnp.sum(best_values(lv, key, d), axis=-1)  # E[A] of that tree

    def cond(carry):
      d, go = carry[0], carry[1]
      return (d <= dmax) & go

    def body(carry):
      d, _, pool_tok, pool_lv, pool_key, pool_pf, front, anc_BxWxR, ctx, ea_prev, rank_DxC = carry
      row = lambda x: jax.lax.dynamic_index_in_dim(x, d - 2, axis=1, keepdims=False)
      fkey_BxW, fslot_BxW = jax.lax.top_k(row(pool_key), w)
      ftok_BxW = jnp.take_along_axis(row(pool_tok), fslot_BxW, 1)
      flv_BxW = jnp.take_along_axis(row(pool_lv), fslot_BxW, 1)
      pf_BxW = jnp.take_along_axis(row(pool_pf), fslot_BxW, 1)
      # Ancestors in the draft cache: the parent's, plus the parent itself (slot (d-3) * W + its frontier index).
      parent_anc = jnp.take_along_axis(anc_BxWxR, jnp.maximum(pf_BxW, 0)[:, :, None], axis=1)
      parent_slot = jax.nn.one_hot((d - 3) * w + pf_BxW, r, dtype=bool)
      anc_BxWxR = jnp.where(d > 2, parent_anc | parent_slot, False)
      front = jax.lax.dynamic_update_index_in_dim(front, fslot_BxW, d - 2, axis=1)
      out, ctx = self.source.expand(src_params, ctx, d, ftok_BxW, anc_BxWxR, logp_fn)
      skey_BxWxV, logp_BxWxV = _key_and_logp(out)
      sc_BxWxK, tok_BxWxK = jax.lax.top_k(skey_BxWxV, k)
      lp_BxWxK = jnp.take_along_axis(logp_BxWxV, tok_BxWxK, axis=-1)
      tok_BxWxK = self.source.to_tokens(src_params, tok_BxWxK)
      lv_BxWxK = flv_BxW[:, :, None] + lp_BxWxK
      if static:
        key_BxWxK = fkey_BxW[:, :, None] + self._prior(draft_params, d - 1, jnp.arange(k))[None, None]
      else:  # for a source without scores of its own, the same sum as lv (the keys were the values at depth 1)
        key_BxWxK = fkey_BxW[:, :, None] + sc_BxWxK
      key_BxWxK = jnp.where((fkey_BxW[:, :, None] > -jnp.inf) & (sc_BxWxK > -jnp.inf), key_BxWxK, -jnp.inf)
      put = lambda pool, x: jax.lax.dynamic_update_index_in_dim(pool, x.reshape(b, c), d - 1, axis=1)
      pool_tok, pool_lv, pool_key = put(pool_tok, tok_BxWxK), put(pool_lv, lv_BxWxK), put(pool_key, key_BxWxK)
      pool_pf = put(pool_pf, jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32)[None, :, None], (b, w, k)))
      best_B = jnp.argmax(fkey_BxW, axis=1)  # the most valuable frontier node: its children's probabilities by rank
      best_lp_BxK = jnp.take_along_axis(lp_BxWxK, best_B[:, None, None], axis=1)[:, 0]
      rank_DxC = jax.lax.dynamic_update_index_in_dim(
          rank_DxC, jnp.zeros((c,), jnp.float32).at[:k].set(jnp.sum(jnp.exp(best_lp_BxK) * loop.active_B[:, None], 0)),
          d - 1, axis=0)
      ea_B = best_tree_value(pool_lv, pool_key, d)
      # Threshold 0 always grows: where scores of a source's own choose the nodes, one more depth may lower E[A] (a
      # deeper node of better score displaces a more probable one), and `>= 0` then stopped the growth short of D
      grows_B = (ea_B - ea_prev >= self.threshold) if self.threshold > 0 else jnp.ones_like(loop.active_B)
      go = jnp.any(loop.active_B & grows_B) | (self.shape == "chain")
      return (d + 1, go, pool_tok, pool_lv, pool_key, pool_pf, front, anc_BxWxR, ctx, ea_B, rank_DxC)

    carry = (jnp.int32(2), jnp.bool_(dmax >= 2), pool_tok, pool_lv, pool_key, pool_pf, front_BxDxW,
             jnp.zeros((b, w, r), bool), ctx, best_tree_value(pool_lv, pool_key, 1), rank_DxC)
    carry = jax.lax.while_loop(cond, body, carry)
    d_end, _, pool_tok, pool_lv, pool_key, pool_pf, front_BxDxW, _, ctx, _, rank_DxC = carry
    draft = self._select(pool_tok, pool_key, pool_pf, front_BxDxW)
    if self.gate > 0:  # the draft is the N best nodes by the selection key, so its E[A] is the best tree's value
      draft = draft.replace(verify_B=gate_verifies(best_tree_value(pool_lv, pool_key, dmax), loop.active_B,
                                                   self.gate))

    # Statistics: E[A] for every budget n <= N and depth limit d <= D (the best tree by the selection key).
    act_f = loop.active_B.astype(jnp.float32)

    def curve(dl):
      return jnp.einsum("b,bn->n", act_f, jnp.cumsum(best_values(pool_lv, pool_key, dl), axis=-1))

    ea_DxN = jnp.stack([curve(dl) for dl in range(1, dmax + 1)])
    reached = jax.nn.one_hot(d_end - 2, dmax, dtype=jnp.int32) * jnp.sum(loop.active_B.astype(jnp.int32))
    dstate = dstate.replace(source=sstate, ctx=ctx, expected_accept_DxN=dstate.expected_accept_DxN + ea_DxN,
                            reached_D=dstate.reached_D + reached, rank_prob_DxC=dstate.rank_prob_DxC + rank_DxC,
                            proposals=dstate.proposals + jnp.sum(loop.active_B.astype(jnp.int32)),
                            # the loop stopped at d_end after growing depths 1 .. d_end - 1
                            forwards=dstate.forwards + jnp.asarray(self.source.calls(d_end - 1), jnp.int32))
    return draft, dstate

  def _select(self, pool_tok, pool_key, pool_pf, front_BxDxW) -> Draft:
    """The N best pool nodes as a `Draft`, sorted by depth (parents first)."""
    b, dmax, c = pool_tok.shape
    n = self.nodes
    depth_idx = jnp.arange(dmax)[:, None]
    sel_key = (pool_key - _DEPTH_PENALTY * depth_idx[None]).reshape(b, dmax * c)
    top_key, top_i = jax.lax.top_k(sel_key, n)
    order = jnp.argsort(top_i, axis=-1)
    idx_BxN = jnp.take_along_axis(top_i, order, axis=-1)
    valid_BxN = jnp.take_along_axis(top_key, order, axis=-1) > -jnp.inf
    depth_BxN = idx_BxN // c + 1
    tok_BxN = jnp.take_along_axis(pool_tok.reshape(b, -1), idx_BxN, axis=-1)
    pf_BxN = jnp.take_along_axis(pool_pf.reshape(b, -1), idx_BxN, axis=-1)
    # The parent's pool index: its depth's frontier slot pf, one depth up.
    up_BxN = jnp.maximum(depth_BxN - 2, 0)
    par_slot_BxN = front_BxDxW[jnp.arange(b)[:, None], up_BxN, jnp.maximum(pf_BxN, 0)]
    par_flat_BxN = up_BxN * c + par_slot_BxN
    match_BxNxN = idx_BxN[:, None, :] == par_flat_BxN[:, :, None]
    parent_BxN = jnp.where((depth_BxN > 1) & valid_BxN, jnp.argmax(match_BxNxN, axis=-1), -1).astype(jnp.int32)
    depth_BxN = jnp.where(valid_BxN, depth_BxN, 1).astype(jnp.int32)
    if self.shape == "chain":
      return Draft(tok_BxN, depth_BxN, jnp.broadcast_to(jnp.tril(jnp.ones((n, n), bool)), (b, n, n)), parent_BxN)
    return Draft(tok_BxN, depth_BxN, ancestor_mask(parent_BxN, dmax), parent_BxN)

  def update(self, draft_params, dstate: TreeState, verified: Verified) -> TreeState:
    src_params = self._source_params(draft_params)
    return dstate.replace(source=self.source.update(src_params, dstate.source, dstate.ctx, verified), ctx=None)

  def _source_params(self, draft_params):
    """The source's params: a static tree keeps them beside its prior (`static_draft_params`)."""
    return draft_params["source"] if self.shape == "static" else draft_params

  def stats(self, dstate: TreeState) -> dict[str, Array]:
    """Sums over proposals (divide by `proposals`): E[A] by depth limit and budget, where growth stopped, and the
    draft's probability by depth and rank (what `calibrated_prior` turns into a static tree's prior); and the drafter
    forwards run (`draft_forwards`, what the loop reports as drafter calls)."""
    return {"expected_accept_DxN": dstate.expected_accept_DxN, "reached_D": dstate.reached_D,
            "rank_prob_DxC": dstate.rank_prob_DxC, "proposals": dstate.proposals, "draft_forwards": dstate.forwards}


def _key_and_logp(out) -> tuple[Array, Array]:
  """A source's `begin` / `expand` output as (selection scores, log-probabilities): a source that ranks children
  by scores of its own (`NgramHeadsTreeSource`) returns both; others return log-probabilities, which are both."""
  return out if isinstance(out, tuple) else (out, out)


# --------------------------------------------------------------------------------------------------------------------
# Static trees and budgets.


def calibrated_prior(stats: dict, floor: float = 1e-6) -> np.ndarray:
  """A static tree's prior `[D, C]` (log-probability by depth and rank) from a dynamic drafter's `stats()`.

  Medusa calibrates its static tree with each head's accuracy at each rank; here the measure is the drafter's own
  average probability of its rank-r child at depth d (for the most valuable parent), on prompts the caller picks
  (training prompts, never the evaluation set).
  """
  count = max(int(np.asarray(stats["proposals"])), 1)
  mean = np.asarray(stats["rank_prob_DxC"], np.float64) / count
  return np.log(np.maximum(mean, floor)).astype(np.float32)


def geometric_prior(depth: int, cands: int, ratio: float = 0.5) -> np.ndarray:
  """An uncalibrated static prior: rank r has log-probability r * log(ratio) at every depth."""
  return np.broadcast_to(np.arange(cands) * np.log(ratio), (depth, cands)).astype(np.float32)


def static_draft_params(source_params, prior_DxC) -> dict:
  """`draft_params` of a static-shape `OptTreeDrafter`: the source's and the prior."""
  return {"source": source_params, "tree_prior_DxC": jnp.asarray(prior_DxC, jnp.float32)}


def expected_accept(stats: dict) -> np.ndarray:
  """Mean E[A] `[D, N]` of the best tree with depth <= d + 1 and n + 1 nodes, from `OptTreeDrafter.stats`."""
  count = max(int(np.asarray(stats["proposals"])), 1)
  return np.asarray(stats["expected_accept_DxN"], np.float64) / count


def gate_verifies(ea_B: jax.Array, active_B: jax.Array, gate: float) -> jax.Array:
  """`[B]` bool, the same in every row: whether a step verifies the batch's trees, when the active rows' mean E[A]
  reaches `gate`. The rows share the forward: one row's tree cannot pay for the others' (`OptTreeDrafter.gate`)."""
  active = active_B.astype(jnp.float32)
  mean = jnp.sum(ea_B * active) / jnp.maximum(jnp.sum(active), 1.0)
  return jnp.broadcast_to(mean >= gate, active_B.shape)


def choose_budget(ea_DxN: np.ndarray, verify_s: dict[int, float], draft_step_s: float = 0.0,
                  draft_base_s: float = 0.0, depth: int | None = None) -> tuple[int, int, dict]:
  """The node budget and depth that maximise predicted tokens per second, (1 + E[A]) / (cost of a step).

  Args:
    ea_DxN: mean E[A] by depth limit and budget (`expected_accept`).
    verify_s: measured seconds of one target forward over `[pending, n nodes]`, by n (a grid of budgets).
    draft_step_s: seconds of one draft forward over a frontier (LM drafters; 0 for heads).
    draft_base_s: seconds of the drafter's fixed work per step (the LM's catch-up forward).
    depth: the depth the tree will have (the user's), where it is not for choosing: the best budget at it.

  Returns:
    `(nodes, depth, table)`, table mapping (n, d) to the predicted tokens per second.
  """
  table = {}
  d_max, n_max = ea_DxN.shape
  for n, t in sorted(verify_s.items()):
    if n > n_max or n < 1:
      continue
    for d in ([min(depth, d_max)] if depth is not None else range(1, d_max + 1)):
      cost = t + draft_base_s + (d - 1) * draft_step_s
      table[(n, d)] = (1.0 + float(ea_DxN[d - 1, n - 1])) / cost
  if not table:
    raise InputError("choose_budget needs verify costs for budgets within the calibration tree's size.")
  n, d = max(table, key=table.get)
  return n, d, table
