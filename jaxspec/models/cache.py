"""The KV cache: an explicit pytree with per-row lengths.

Slots `[0, lengths[b])` of row b hold committed context. A forward over T new tokens writes their keys and values at
slots `[lengths[b], lengths[b] + T)` without moving `lengths`; the decode loop then keeps what it accepted with
`advance` (a prefix of the new tokens) or `compact` (an arbitrary path, e.g. through a draft tree). Entries past
`lengths` are stale and never attended to, so rejecting tokens costs nothing.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class KVCache:
  """Keys `[B, K, H, S]` and values `[B, K, S, H]` of every layer, plus the committed length of every row.

  The layouts are the operand layouts of attention's two batched matmuls (q·kᵀ and p·v over batch dims B, K), so XLA
  never transposes the cache: with `[B, S, K, H]` it copied every layer's cache each step, which made a step at 1152
  slots 2.3x slower on XLA:CPU (benchmarks/README.md). With stacked layers (`scan_layers=True`) each of `k` and `v`
  is one array with a leading L axis; otherwise tuples of L arrays, which XLA updates in place more readily on CPU.
  """

  k: Any
  v: Any
  lengths: Array  # [B] int32

  @property
  def capacity(self) -> int:
    """S, the number of slots per row (static)."""
    leaf = self.v if not isinstance(self.v, tuple) else self.v[0]
    return leaf.shape[-2]

  @property
  def batch_size(self) -> int:
    return self.lengths.shape[0]

  def advance(self, n_B: Array) -> "KVCache":
    """Commits the first `n_B[b]` new entries of each row (those written by the last forward)."""
    return self.replace(lengths=self.lengths + n_B.astype(self.lengths.dtype))

  def compact(self, src_BxA: Array, n_B: Array, window: int) -> "KVCache":
    """Moves new entries `src_BxA[b, i]` (offsets from `lengths[b]`) to offset i, then commits `n_B[b]` of them.

    Used after tree verification: the accepted root-to-leaf path is gathered into contiguous slots. `window` is the
    number of tokens the last forward wrote (static); every offset must be below it. Offsets at `i >= n_B[b]` are
    moved too but stay uncommitted. Jittable.
    """

    def mover(axis):  # axis: the slot axis of one row's buffer
      def row(buf, start, src_A):
        win = jax.lax.dynamic_slice_in_dim(buf, start, window, axis=axis)
        return jax.lax.dynamic_update_slice_in_dim(buf, jnp.take(win, src_A, axis=axis), start, axis=axis)
      return jax.vmap(row)

    move_k, move_v = mover(2), mover(1)  # row buffers: k [K, H, S], v [K, S, H]
    if isinstance(self.k, tuple):
      k = tuple(move_k(x, self.lengths, src_BxA) for x in self.k)
      v = tuple(move_v(x, self.lengths, src_BxA) for x in self.v)
    else:  # stacked layers
      k = jax.vmap(move_k, in_axes=(0, None, None))(self.k, self.lengths, src_BxA)
      v = jax.vmap(move_v, in_axes=(0, None, None))(self.v, self.lengths, src_BxA)
    return self.replace(k=k, v=v).advance(n_B)
