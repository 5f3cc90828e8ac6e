"""Acceptance rules: which drafted tokens a verify forward keeps, and the token the target adds after them.

With no draft (N = 0) every rule reduces to plain decoding: one token per target call.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxspec.decoding.protocol import Acceptance, Draft
from jaxspec.decoding.sampling import SamplingParams, Warp

Array = jax.Array


def prefix_length(ok_BxN: Array) -> Array:
  return jnp.sum(jnp.cumprod(ok_BxN.astype(jnp.int32), axis=-1), axis=-1)


def tree_paths(draft: Draft, ok_BxN: Array) -> tuple[Array, Array]:
  """The longest root path whose nodes are all acceptable.

  Args:
    draft: nodes in topological order (every parent before its children).
    ok_BxN: whether each node's token is acceptable given its parent.

  Returns:
    `(path_BxT, n_commit_B)`: block indices 0 (pending), then the accepted nodes (+1), shallowest first.
  """
  b, n = ok_BxN.shape
  # A node is accepted when it and all its ancestors are ok; mask_BxNxN is the ancestor-or-self relation.
  accepted_BxN = jnp.all(jnp.where(draft.mask_BxNxN, ok_BxN[:, None, :], True), axis=-1)
  depth_BxN = jnp.where(accepted_BxN, draft.depth_BxN, 0)
  best_B = jnp.argmax(depth_BxN, axis=-1)
  n_acc_B = jnp.max(depth_BxN, axis=-1)
  on_path_BxN = jnp.take_along_axis(draft.mask_BxNxN, best_B[:, None, None], axis=1)[:, 0] & (n_acc_B[:, None] > 0)
  order_BxN = jnp.sort(jnp.where(on_path_BxN, jnp.arange(n)[None], n), axis=-1) + 1  # ancestors precede descendants
  path_BxT = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.minimum(order_BxN, n).astype(jnp.int32)], axis=-1)
  return path_BxT, n_acc_B + 1


@dataclasses.dataclass(frozen=True)
class GreedyAcceptance:
  """Keeps drafted tokens that equal the target's argmax: output identical to greedy decoding (T5X temperature 0)."""

  def first_token(self, rng: Array, logits_BxV: Array, sp: SamplingParams) -> Array:
    del rng, sp
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

  def accept(self, rng: Array, draft: Draft, logits_BxTxV: Array, sp: SamplingParams, is_chain: bool) -> Acceptance:
    del rng, sp
    target_BxT = jnp.argmax(logits_BxTxV, axis=-1).astype(jnp.int32)
    b, t = target_BxT.shape
    if t == 1:
      return Acceptance(target_BxT, jnp.zeros((b, 1), jnp.int32), jnp.ones((b,), jnp.int32))
    # A node is right when it equals the target's argmax after its parent (block index parent + 1).
    expected_BxN = jnp.take_along_axis(target_BxT, draft.parent_BxN + 1, axis=1)
    ok_BxN = draft.tokens_BxN == expected_BxN
    if is_chain:
      n_commit_B = prefix_length(ok_BxN) + 1
      path_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      return Acceptance(target_BxT, path_BxT, n_commit_B)
    path_BxT, n_commit_B = tree_paths(draft, ok_BxN)
    # Along an accepted path each node equals the target's argmax at its parent, so the emitted tokens are the
    # target's argmax read along the path: the accepted nodes and then the bonus token.
    return Acceptance(jnp.take_along_axis(target_BxT, path_BxT, axis=1), path_BxT, n_commit_B, is_prefix=False)


@dataclasses.dataclass(frozen=True)
class SampleAcceptance:
  """Sampling from the target's warped distribution; with a chain draft, modified rejection sampling (Leviathan et
  al. 2023, Chen et al. 2023): the output distribution is exactly the target's."""

  warp: Warp = Warp()

  def first_token(self, rng: Array, logits_BxV: Array, sp: SamplingParams) -> Array:
    return self.warp.sample(rng, logits_BxV, sp)

  def accept(self, rng: Array, draft: Draft, logits_BxTxV: Array, sp: SamplingParams, is_chain: bool) -> Acceptance:
    b, t, _ = logits_BxTxV.shape
    path_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if t == 1:
      return Acceptance(self.warp.sample(rng, logits_BxTxV, sp), path_BxT, jnp.ones((b,), jnp.int32))
    if not is_chain:
      raise ValueError("SampleAcceptance verifies chains; trees need multi-draft rejection sampling.")
    if draft.probs_BxNxV is None:
      raise ValueError("Sampling acceptance needs the drafter's probabilities (Draft.probs_BxNxV).")
    n = t - 1
    p_BxTxV = self.warp.probs(logits_BxTxV, sp)
    q_BxNxV = draft.probs_BxNxV
    tok_BxNx1 = draft.tokens_BxN[..., None]
    p_tok = jnp.take_along_axis(p_BxTxV[:, :n], tok_BxNx1, axis=-1)[..., 0]
    q_tok = jnp.take_along_axis(q_BxNxV, tok_BxNx1, axis=-1)[..., 0]
    r_accept, r_fix = jax.random.split(rng)
    u_BxN = jax.random.uniform(r_accept, (b, n))
    ok_BxN = u_BxN * q_tok < p_tok  # accept with probability min(1, p/q)
    n_acc_B = prefix_length(ok_BxN)
    # The correction at the first rejection samples from norm(max(0, p - q)); after a full accept, p itself.
    q_pad_BxTxV = jnp.concatenate([q_BxNxV, jnp.zeros_like(p_BxTxV[:, :1])], axis=1)
    p_at = jnp.take_along_axis(p_BxTxV, n_acc_B[:, None, None], axis=1)[:, 0]
    q_at = jnp.take_along_axis(q_pad_BxTxV, n_acc_B[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_at - q_at, 0.0)
    # If p == q exactly the residual is empty (and that position is never rejected); fall back to p.
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_at)
    fix_B = jax.random.categorical(r_fix, jnp.log(residual), axis=-1).astype(jnp.int32)
    pos_T = jnp.arange(t)[None]
    drafted_BxT = jnp.concatenate([draft.tokens_BxN, jnp.zeros((b, 1), jnp.int32)], axis=1)
    emitted_BxT = jnp.where(pos_T < n_acc_B[:, None], drafted_BxT, fix_B[:, None])
    return Acceptance(emitted_BxT, path_BxT, n_acc_B + 1)
