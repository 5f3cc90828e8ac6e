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
  """Keys and values of every layer, `[B, S, K, H]` each, plus the committed length of every row.

  With stacked layers (`scan_layers=True`) `k` and `v` are single arrays `[L, B, S, K, H]`; otherwise tuples of L
  arrays, which XLA updates in place more readily on CPU.
  """

  k: Any
  v: Any
  lengths: Array  # [B] int32

  @property
  def capacity(self) -> int:
    """S, the number of slots per row (static)."""
    leaf = self.k if not isinstance(self.k, tuple) else self.k[0]
    return leaf.shape[-3]

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

    def row(buf_SxKxH, start, src_A):
      window_WxKxH = jax.lax.dynamic_slice_in_dim(buf_SxKxH, start, window, axis=0)
      return jax.lax.dynamic_update_slice_in_dim(buf_SxKxH, window_WxKxH[src_A], start, axis=0)

    move = jax.vmap(row)
    if isinstance(self.k, tuple):
      k, v = tuple(move(x, self.lengths, src_BxA) for x in self.k), tuple(move(x, self.lengths, src_BxA) for x in self.v)
    else:  # stacked layers
      move_l = jax.vmap(move, in_axes=(0, None, None))
      k, v = move_l(self.k, self.lengths, src_BxA), move_l(self.v, self.lengths, src_BxA)
    return self.replace(k=k, v=v).advance(n_B)
