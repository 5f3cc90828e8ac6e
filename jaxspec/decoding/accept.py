"""Acceptance rules: which drafted tokens a verify forward keeps, and the token the target adds after them.

With no draft (N = 0) every rule reduces to plain decoding: one token per target call.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxspec.decoding.protocol import Acceptance, Draft
from jaxspec.decoding.sampling import SamplingParams, Warp, argmax, categorical

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
  return path_to(draft, *deepest_ok_path(draft, ok_BxN))


def deepest_ok_path(draft: Draft, ok_BxN: Array) -> tuple[Array, Array]:
  """`(node_B, depth_B)`: the deepest node whose root path is all ok (the first such in node order), and its depth
  (0 where even the root's children fail; node_B is then 0)."""
  # A node's path is ok when it and all its ancestors are; mask_BxNxN is the ancestor-or-self relation.
  path_ok_BxN = jnp.all(jnp.where(draft.mask_BxNxN, ok_BxN[:, None, :], True), axis=-1)
  depth_BxN = jnp.where(path_ok_BxN, draft.depth_BxN, 0)
  return jnp.argmax(depth_BxN, axis=-1), jnp.max(depth_BxN, axis=-1)


def path_to(draft: Draft, node_B: Array, n_acc_B: Array) -> tuple[Array, Array]:
  """`(path_BxT, n_commit_B)` of the root path ending at node `node_B` (`n_acc_B` nodes deep; 0: the root alone)."""
  b, n = draft.tokens_BxN.shape
  on_path_BxN = jnp.take_along_axis(draft.mask_BxNxN, node_B[:, None, None], axis=1)[:, 0] & (n_acc_B[:, None] > 0)
  order_BxN = jnp.sort(jnp.where(on_path_BxN, jnp.arange(n)[None], n), axis=-1) + 1  # ancestors precede descendants
  path_BxT = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.minimum(order_BxN, n).astype(jnp.int32)], axis=-1)
  return path_BxT, n_acc_B + 1


def tree_rejection(rng: Array, draft: Draft, p_BxTxV: Array, remove_rejected: bool = True) -> Acceptance:
  """Multi-draft recursive rejection sampling over a tree (SpecInfer; Sequoia): the emitted tokens are distributed
  exactly as ancestral sampling from the target's (warped) distributions `p_BxTxV`.

  Starting at the root, the children of the current node are tried in node order. Child i with token x, drawn from
  the drafter's q_i (`draft.probs_BxNxV[:, i]`; None means point masses: deterministic drafts such as top-k trees),
  is accepted with probability min(1, r(x) / q_i(x)), where r is the target's distribution at the current node;
  acceptance moves to the child (r becomes the target's distribution there), rejection replaces r by
  norm(max(0, r - q_i)) (for a point mass: r without x). When no child is accepted, the correction token is sampled
  from r. Exact when each child's token is drawn from its q_i given its earlier siblings (i.i.d. children from one
  q, without-replacement draws with q renormalised, or deterministic point masses). Nodes must be in topological
  order; one pass over them visits every tried child, since a node's children all come after it. A node whose
  token is -1 was not proposed (a gated step, or a draft that stopped early) and is skipped.

  Args:
    rng: random key.
    draft: the tree.
    p_BxTxV: the target's warped probabilities for the verified block `[pending, nodes]`.
    remove_rejected: False breaks the rule on purpose (r is left unchanged after a rejection), for tests that the
      statistical check has power.
  """
  b, t, _ = p_BxTxV.shape
  n = t - 1
  r_u, r_fix = jax.random.split(rng)
  # Drawn [B, N] and transposed: a row's coins are then the same whatever the batch size (JAX numbers the bits of
  # a draw by each element's place in it), as in the chain rule and the [B, V] draws.
  u_NxB = jax.random.uniform(r_u, (b, n)).T
  q_NxBxV = None if draft.probs_BxNxV is None else jnp.moveaxis(draft.probs_BxNxV, 1, 0)

  def visit(carry, xs):
    cur_B, r_BxV = carry
    i, u_B = xs[0], xs[1]
    x_B = jax.lax.dynamic_index_in_dim(draft.tokens_BxN, i, axis=1, keepdims=False)
    parent_B = jax.lax.dynamic_index_in_dim(draft.parent_BxN, i, axis=1, keepdims=False)
    child_B = (parent_B + 1 == cur_B) & (x_B >= 0)  # token -1: not proposed, never tried
    x_B = jnp.maximum(x_B, 0)
    r_x = jnp.take_along_axis(r_BxV, x_B[:, None], axis=1)[:, 0]
    if q_NxBxV is None:
      q_x = 1.0
      left_BxV = jnp.where(jnp.arange(r_BxV.shape[1])[None] == x_B[:, None], 0.0, r_BxV)
    else:
      q_BxV = xs[2]
      q_x = jnp.take_along_axis(q_BxV, x_B[:, None], axis=1)[:, 0]
      left_BxV = jnp.maximum(r_BxV - q_BxV, 0.0)
    ok_B = child_B & (u_B * q_x < r_x)
    mass_B = jnp.sum(left_BxV, axis=-1, keepdims=True)
    # An empty remainder means the child could not be rejected (r(x) >= q(x) everywhere q lives); keep r then.
    left_BxV = jnp.where(mass_B > 0, left_BxV / jnp.where(mass_B > 0, mass_B, 1.0), r_BxV)
    if not remove_rejected:
      left_BxV = r_BxV
    p_child_BxV = jax.lax.dynamic_index_in_dim(p_BxTxV, i + 1, axis=1, keepdims=False)
    r_BxV = jnp.where(ok_B[:, None], p_child_BxV, jnp.where(child_B[:, None], left_BxV, r_BxV))
    return (jnp.where(ok_B, i + 1, cur_B), r_BxV), None

  xs = (jnp.arange(n), u_NxB) if q_NxBxV is None else (jnp.arange(n), u_NxB, q_NxBxV)
  (cur_B, r_BxV), _ = jax.lax.scan(visit, (jnp.zeros((b,), jnp.int32), p_BxTxV[:, 0]), xs)
  fix_B = categorical(r_fix, jnp.log(r_BxV))
  node_B = jnp.maximum(cur_B - 1, 0)
  n_acc_B = jnp.where(cur_B > 0, jnp.take_along_axis(draft.depth_BxN, node_B[:, None], axis=1)[:, 0], 0)
  path_BxT, n_commit_B = path_to(draft, node_B, n_acc_B)
  path_tok_BxN = jnp.take_along_axis(draft.tokens_BxN, path_BxT[:, 1:] - 1, axis=1)
  path_tok_BxT = jnp.concatenate([path_tok_BxN, jnp.zeros((b, 1), jnp.int32)], axis=1)
  emitted_BxT = jnp.where(jnp.arange(t)[None] < n_acc_B[:, None], path_tok_BxT, fix_B[:, None])
  return Acceptance(emitted_BxT, path_BxT, n_commit_B, is_prefix=False)


@dataclasses.dataclass(frozen=True)
class GreedyAcceptance:
  """Keeps drafted tokens that equal the target's argmax: output identical to greedy decoding (T5X temperature 0).
  A token -1 (not proposed) equals no argmax, so it ends the accepted prefix."""

  handles_unproposed = True  # drafts may mark nodes -1 (`Draft.verify_B` gating, adaptive draft length)

  def first_token(self, rng: Array, logits_BxV: Array, sp: SamplingParams) -> Array:
    del rng, sp
    return argmax(logits_BxV)

  def accept(self, rng: Array, draft: Draft, logits_BxTxV: Array, sp: SamplingParams, is_chain: bool) -> Acceptance:
    del rng, sp
    target_BxT = argmax(logits_BxTxV)
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
  al. 2023, Chen et al. 2023), with a tree, multi-draft recursive rejection sampling (`tree_rejection`): the output
  distribution is exactly the target's. Draft tokens -1 are not proposed: a chain stops before its first -1 and the
  next token is drawn from p there, as after a full accept."""

  handles_unproposed = True
  warp: Warp = Warp()
  remove_rejected: bool = True  # False: a deliberately broken tree rule, for tests of the statistical check
  skip_unproposed: bool = True  # False: a deliberately broken chain rule (q kept at -1 tokens), for the same tests

  def first_token(self, rng: Array, logits_BxV: Array, sp: SamplingParams) -> Array:
    return self.warp.sample(rng, logits_BxV, sp)

  def accept(self, rng: Array, draft: Draft, logits_BxTxV: Array, sp: SamplingParams, is_chain: bool) -> Acceptance:
    b, t, _ = logits_BxTxV.shape
    path_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if t == 1:
      return Acceptance(self.warp.sample(rng, logits_BxTxV, sp), path_BxT, jnp.ones((b,), jnp.int32))
    if not is_chain or draft.probs_BxNxV is None:  # trees, and chains of point-mass (deterministic) drafts
      return tree_rejection(rng, draft, self.warp.probs(logits_BxTxV, sp), self.remove_rejected)
    n = t - 1
    p_BxTxV = self.warp.probs(logits_BxTxV, sp)
    q_BxNxV = draft.probs_BxNxV
    proposed_BxN = draft.tokens_BxN >= 0
    if self.skip_unproposed:  # the draw after the last proposed token is from p
      q_BxNxV = jnp.where(proposed_BxN[..., None], q_BxNxV, 0.0)
    tok_BxNx1 = jnp.maximum(draft.tokens_BxN, 0)[..., None]
    p_tok = jnp.take_along_axis(p_BxTxV[:, :n], tok_BxNx1, axis=-1)[..., 0]
    q_tok = jnp.take_along_axis(q_BxNxV, tok_BxNx1, axis=-1)[..., 0]
    r_accept, r_fix = jax.random.split(rng)
    u_BxN = jax.random.uniform(r_accept, (b, n))
    ok_BxN = proposed_BxN & (u_BxN * q_tok < p_tok)  # accept with probability min(1, p/q)
    n_acc_B = prefix_length(ok_BxN)
    # The correction at the first rejection samples from norm(max(0, p - q)); after a full accept, p itself.
    q_pad_BxTxV = jnp.concatenate([q_BxNxV, jnp.zeros_like(p_BxTxV[:, :1])], axis=1)
    p_at = jnp.take_along_axis(p_BxTxV, n_acc_B[:, None, None], axis=1)[:, 0]
    q_at = jnp.take_along_axis(q_pad_BxTxV, n_acc_B[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_at - q_at, 0.0)
    # If p == q exactly the residual is empty (and that position is never rejected); fall back to p.
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_at)
    fix_B = categorical(r_fix, jnp.log(residual))
    pos_T = jnp.arange(t)[None]
    drafted_BxT = jnp.concatenate([draft.tokens_BxN, jnp.zeros((b, 1), jnp.int32)], axis=1)
    emitted_BxT = jnp.where(pos_T < n_acc_B[:, None], drafted_BxT, fix_B[:, None])
    return Acceptance(emitted_BxT, path_BxT, n_acc_B + 1)
