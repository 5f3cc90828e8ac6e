"""Speculative decoding with a feature-level draft (EAGLE, Li et al. 2024) on the shared loop.

The draft (`jaxspec.models.eagle.EagleDraft`) keeps one entry per committed target position t: the target's final
hidden state f_t and the token x_{t+1} after it. Its output at the last entry is a predicted feature f̂ for the
position of the pending token, which the target's output rows turn into the first draft token d_1. Token d_{i+1}
comes from one more entry, (f̂ of d_i's position, d_i): the draft runs on its own predictions past the pending token.

Per step, with the target's cache holding L committed tokens and the draft's cache the same L entries:

  propose  d_1 from the stored f̂; then γ - 1 one-entry forwards (f̂, d_i) -> d_{i+1}, written at L, L+1, ...
  verify   the target runs [pending, d_1..d_γ] (the loop); its hidden states give f_L .. f_{L+γ}
  update   the draft's cache goes back to L and one forward of γ + 1 entries (f_{L+j}, emitted_j) rewrites them
           with the target's true features; n_commit are kept, and the output at the last kept one is the next f̂

So the draft never keeps an entry built on its own guesses, rolling back is setting a length, and a step costs γ
draft forwards (the γ + 1 entries of the update are one forward). Greedy drafts propose the draft's argmax and
`GreedyAcceptance` keeps the output identical to greedy decoding; sampling drafts report q for `SampleAcceptance`
(modified rejection sampling), so the output is distributed exactly as the target's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from jaxspec.decoding.protocol import Draft, PrefillInfo, Verified, require_entries, vocab_check, width_check
from jaxspec.decoding.sampling import Warp
from jaxspec.decoding.speculative import draw, gate_score
from jaxspec.errors import InputError
from jaxspec.models.eagle import EagleDraft

Array = jax.Array


@flax.struct.dataclass
class EagleState:
  """Between steps the draft cache holds the target's L committed positions; `feat_BxD` is the draft's predicted
  feature at the pending token's position (it scores d_1)."""

  cache: Any
  feat_BxD: Array
  rng: Array
  forwards: Array  # draft forwards so far


def _causal(b: int, t: int) -> Array:
  return jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))


VOCAB_ENTRIES = ("embed_VxD", "vocab_ids", "table_MxD")  # what load_eagle adds to the draft's own params


@dataclasses.dataclass(frozen=True)
class EagleDrafter:
  """γ draft tokens per step from a feature-level draft.

  Attributes:
    draft: the draft (static); its params, with the target's vocabulary matrices, are the loop's `draft_params`.
    gamma: γ, drafted tokens per step (>= 1).
    warp: the static part of the sampling rule; use the acceptor's, so q is warped as the target's p is.
    greedy: draft the argmax (q a point mass); False samples each token from the draft's warped distribution.
    gate: with `gate > 0` a step verifies the block only when some active row's draft expects at least `gate`
      accepted tokens, else it is a one-token target step (as `DraftModelDrafter.gate`, and exact the same way).
  """

  draft: EagleDraft
  gamma: int
  warp: Warp = Warp()
  greedy: bool = True
  gate: float = 0.0
  is_chain = True
  draft_replaceable = True  # update rewrites the step from the emitted tokens (`WithLookup` may swap the draft)
  needs_params = "jaxspec.models.eagle.load_eagle(folder, target, target_params)"

  def __post_init__(self):
    if self.gamma < 1:
      raise InputError(f"gamma (draft tokens per step) must be >= 1, got {self.gamma}")
    if not 0.0 <= self.gate <= self.gamma:
      raise InputError(f"gate (the expected accepted tokens a draft needs to be verified) must be in [0, gamma="
                       f"{self.gamma}], got {self.gate}")

  @property
  def num_nodes(self) -> int:
    return self.gamma

  @property
  def calls_per_step(self) -> int:
    """Draft forwards per step: γ - 1 in propose, one (γ + 1 entries) in update."""
    return self.gamma

  def check_target(self, target) -> None:
    """The loop's check before tracing (`protocol.check_target`): the draft's output rows are the target's."""
    vocab_check(target, self.draft)
    width_check(target, self.draft.cfg.d_model, "this EAGLE draft")

  def check_draft_params(self, target, draft_params) -> None:
    require_entries("An EAGLE drafter", draft_params, VOCAB_ENTRIES, self.needs_params)

  def init(self, draft_params, prefill: PrefillInfo) -> EagleState:
    """The draft's prefill: entries (f_t, x_{t+1}) for every prompt position, the last one's x being the first
    generated token."""
    tokens_BxP = prefill.tokens_BxP
    b, p = tokens_BxP.shape
    hidden = prefill.hidden_BxQxD
    if hidden is None or hidden.shape[:2] != (b, p):
      raise ValueError("EagleDrafter reads the target's hidden states at every prompt position (PrefillInfo."
                       "hidden_BxQxD); it needs a decoder-only target.")
    if prefill.rng is None and not self.greedy:
      raise ValueError("A sampling EagleDrafter needs a random key (PrefillInfo.rng).")
    lengths_B = prefill.lengths_B
    nxt_BxP = jnp.concatenate([tokens_BxP[:, 1:], jnp.zeros((b, 1), tokens_BxP.dtype)], axis=1)
    nxt_BxP = jnp.where(jnp.arange(p)[None] == (lengths_B - 1)[:, None], prefill.first_B[:, None], nxt_BxP)
    cache = jax.lax.optimization_barrier(self.draft.init_cache(b, prefill.capacity))
    pos_BxP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    out_BxPxD, cache = self.draft.forward(draft_params, hidden, nxt_BxP.astype(jnp.int32), pos_BxP, cache,
                                          _causal(b, p))
    feat_BxD = jnp.take_along_axis(out_BxPxD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    rng = prefill.rng if prefill.rng is not None else jax.random.key(0)
    return EagleState(cache=cache.advance(lengths_B), feat_BxD=feat_BxD, rng=rng, forwards=jnp.int32(0))

  def stats(self, dstate: EagleState) -> dict:
    return {"draft_forwards": dstate.forwards}

  def propose(self, draft_params, dstate: EagleState, loop) -> tuple[Draft, EagleState]:
    rng, r = jax.random.split(dstate.rng)
    keys = jax.random.split(r, self.gamma)
    b = dstate.feat_BxD.shape[0]
    choose = lambda key, feat_BxD: draw(self.warp, self.greedy, key,
                                        self.draft.logits(draft_params, feat_BxD[:, None])[:, 0], loop.sp,
                                        confidence=self.gate > 0)
    tok_B, q_BxV, conf_B = choose(keys[0], dstate.feat_BxD)

    def one(carry, key):
      cache, feat_BxD, tok_B = carry
      out_Bx1xD, cache = self.draft.forward(draft_params, feat_BxD[:, None], tok_B[:, None], cache.lengths[:, None],
                                            cache, jnp.ones((b, 1, 1), bool))
      nxt_B, q_BxV, conf_B = choose(key, out_Bx1xD[:, 0])
      return (cache.advance(jnp.ones((b,), jnp.int32)), out_Bx1xD[:, 0], nxt_B), (nxt_B, q_BxV, conf_B)

    (cache, _, _), (rest_MxB, rest_q_MxBxV, rest_conf_MxB) = jax.lax.scan(
        one, (dstate.cache, dstate.feat_BxD, tok_B), keys[1:])
    tokens_BxN = jnp.concatenate([tok_B[:, None], rest_MxB.T], axis=1)
    q_BxNxV = jnp.concatenate([q_BxV[:, None], jnp.moveaxis(rest_q_MxBxV, 0, 1)], axis=1)
    conf_BxN = jnp.concatenate([conf_B[:, None], rest_conf_MxB.T], axis=1)
    n = self.gamma
    draft = Draft(tokens_BxN=tokens_BxN,
                  depth_BxN=jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.int32), (b, n)),
                  mask_BxNxN=_causal(b, n),
                  parent_BxN=jnp.broadcast_to(jnp.arange(-1, n - 1, dtype=jnp.int32), (b, n)),
                  probs_BxNxV=q_BxNxV)
    if self.gate > 0:
      draft = draft.replace(verify_B=gate_score(self.greedy, draft, conf_BxN) >= self.gate)
    return draft, dstate.replace(cache=cache, rng=rng, forwards=dstate.forwards + (n - 1))

  def skip_propose(self, draft_params, dstate: EagleState, loop) -> EagleState:
    """The state `propose` would leave, without its γ - 1 draft forwards (`WithLookup`: every active row copies):
    `update` rewrites the step's entries anyway, so only the cache length and the random key move on."""
    rng, _ = jax.random.split(dstate.rng)
    b = dstate.feat_BxD.shape[0]
    return dstate.replace(cache=dstate.cache.advance(jnp.full((b,), self.gamma - 1, jnp.int32)), rng=rng)

  def update(self, draft_params, dstate: EagleState, verified: Verified) -> EagleState:
    """Rewrites the step's entries with the target's features and keeps the committed ones."""
    acc = verified.acceptance
    if not acc.is_prefix:
      raise ValueError("EagleDrafter drafts chains: its acceptance must keep a prefix of the block.")
    active_B = verified.active_B
    base_B = dstate.cache.lengths - (self.gamma - 1)  # the target's committed length before the step
    hidden_BxTxD = verified.hidden_BxTxD
    b, t = acc.emitted_BxT.shape
    cache = dstate.cache.replace(lengths=base_B)
    pos_BxT = base_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    out_BxTxD, cache = self.draft.forward(draft_params, hidden_BxTxD, acc.emitted_BxT, pos_BxT, cache, _causal(b, t))
    n_B = jnp.where(active_B, acc.n_commit_B, 0)
    feat_BxD = jnp.take_along_axis(out_BxTxD, jnp.maximum(n_B - 1, 0)[:, None, None], axis=1)[:, 0]
    return dstate.replace(cache=cache.advance(n_B), feat_BxD=jnp.where(active_B[:, None], feat_BxD, dstate.feat_BxD),
                          forwards=dstate.forwards + 1)


# --------------------------------------------------------------------------------------------------------------------
# Draft trees (OPT-Tree / EAGLE-2): the same draft as a source for `jaxspec.decoding.opt_tree.OptTreeDrafter`.


@flax.struct.dataclass
class EagleSourceState:
  """The draft cache (the target's L committed positions), the predicted feature at the pending token's position and
  the committed length before the last propose (idle rows return to it)."""

  cache: Any
  feat_BxD: Array
  base_B: Array
  path_len: int = flax.struct.field(pytree_node=False, default=1)  # entries `update` rewrites: depth + 1


@dataclasses.dataclass(frozen=True)
class EagleTreeSource:
  """Tree distributions from a feature-level draft.

  A tree node's entry is (its parent's predicted feature, its token): depth-1 nodes read the feature the last update
  predicted for the pending token's position, deeper nodes their parent's output. Each depth is one W-entry forward
  whose entries are written past the committed length and read their ancestors' entries through a per-entry cache
  mask, as `LMTreeSource` does. After verification `update` rewrites the accepted path's entries with the target's
  features (one forward of depth + 1 entries), which also predicts the next root's feature.

  Attributes:
    draft: the draft.
    width: W of the `OptTreeDrafter` it serves (the frontier's size, static: the growth loop carries W features).
  """

  draft: EagleDraft
  width: int
  needs_params = EagleDrafter.needs_params

  def calls(self, depth):
    """Draft forwards of a step whose tree grew to `depth` (an int or a traced count): depth - 1 expansions and the
    update."""
    return depth

  def check_target(self, target) -> None:
    vocab_check(target, self.draft)
    width_check(target, self.draft.cfg.d_model, "this EAGLE draft")

  def check_draft_params(self, target, draft_params) -> None:
    require_entries("An EAGLE drafter", draft_params, VOCAB_ENTRIES, self.needs_params)

  def to_tokens(self, draft_params, idx):
    return idx.astype(jnp.int32)

  def init(self, draft_params, prefill: PrefillInfo, extra_slots: int, depth: int) -> EagleSourceState:
    chain = EagleDrafter(self.draft, 1)
    state = chain.init(draft_params, prefill.replace(capacity=prefill.capacity + extra_slots))
    return EagleSourceState(state.cache, state.feat_BxD, state.cache.lengths, path_len=depth + 1)

  def begin(self, draft_params, sstate: EagleSourceState, loop, logp_fn):
    logp_BxV = logp_fn(self.draft.logits(draft_params, sstate.feat_BxD[:, None])[:, 0])
    b, d = sstate.feat_BxD.shape
    prev_BxWxD = jnp.broadcast_to(sstate.feat_BxD[:, None], (b, self.width, d))
    return logp_BxV, (sstate.cache, prev_BxWxD), sstate.replace(base_B=sstate.cache.lengths)

  def expand(self, draft_params, ctx, d: Array, front_BxW: Array, anc_BxWxR: Array, logp_fn):
    """Log-probabilities `[B, W, V]` of the children of the depth-(d-1) frontier; writes the frontier's entries."""
    cache, prev_BxPxD = ctx
    b, w = front_BxW.shape
    if w != self.width:
      raise ValueError(f"EagleTreeSource(width={self.width}) serves a tree of width {self.width}, not {w}.")
    r = anc_BxWxR.shape[-1]
    # The parent of each frontier node: the root's feature at depth 1, else its frontier slot one depth up.
    slots_R = jnp.arange(r)
    in_prev = (slots_R >= (d - 3) * w) & (slots_R < (d - 2) * w)
    parent_BxW = jnp.argmax(anc_BxWxR & in_prev[None, None], axis=-1) - (d - 3) * w
    parent_BxW = jnp.where(d > 2, jnp.clip(parent_BxW, 0, prev_BxPxD.shape[1] - 1), 0)
    feat_BxWxD = jnp.take_along_axis(prev_BxPxD, parent_BxW[:, :, None], axis=1)
    committed_B = cache.lengths
    rel_BxS = jnp.arange(cache.capacity, dtype=jnp.int32)[None] - committed_B[:, None]
    in_tree_BxS = (rel_BxS >= 0) & (rel_BxS < r)
    anc_BxWxS = jnp.take_along_axis(anc_BxWxR, jnp.clip(rel_BxS, 0, r - 1)[:, None, :].repeat(w, axis=1), axis=2)
    visible_BxWxS = (rel_BxS < 0)[:, None] | (in_tree_BxS[:, None] & anc_BxWxS)
    positions_BxW = jnp.broadcast_to((committed_B + d - 2)[:, None], (b, w))
    eye = jnp.broadcast_to(jnp.eye(w, dtype=bool), (b, w, w))
    out_BxWxD, cache = self.draft.forward(draft_params, feat_BxWxD, front_BxW, positions_BxW,
                                          cache.replace(lengths=committed_B + (d - 2) * w), eye, visible_BxWxS)
    logp_BxWxV = logp_fn(self.draft.logits(draft_params, out_BxWxD))
    return logp_BxWxV, (cache.replace(lengths=committed_B), jnp.broadcast_to(out_BxWxD, (b, w, out_BxWxD.shape[-1])))

  def update(self, draft_params, sstate: EagleSourceState, ctx, verified: Verified) -> EagleSourceState:
    """Rewrites the accepted path's entries with the target's features; idle rows keep their state."""
    cache, _ = ctx
    acc = verified.acceptance
    active_B = verified.active_B
    u = min(sstate.path_len, acc.path_BxT.shape[1])
    path_BxU = acc.path_BxT[:, :u]
    hidden_BxUxD = jnp.take_along_axis(verified.hidden_BxTxD, path_BxU[:, :, None], axis=1)
    b = path_BxU.shape[0]
    base_B = sstate.base_B
    pos_BxU = base_B[:, None] + jnp.arange(u, dtype=jnp.int32)[None]
    out_BxUxD, cache = self.draft.forward(draft_params, hidden_BxUxD, acc.emitted_BxT[:, :u], pos_BxU,
                                          cache.replace(lengths=base_B), _causal(b, u))
    n_B = jnp.where(active_B, acc.n_commit_B, 0)
    feat_BxD = jnp.take_along_axis(out_BxUxD, jnp.maximum(n_B - 1, 0)[:, None, None], axis=1)[:, 0]
    return sstate.replace(cache=cache.advance(n_B),
                          feat_BxD=jnp.where(active_B[:, None], feat_BxD, sstate.feat_BxD))
