"""What one forward costs on this machine: the verify-cost curve t(n) that draft-tree budgets are chosen from.

The time of a forward over n new tokens against a cache of a given context is flat in n while the hardware has
spare parallelism and grows once it does not: far flatter on a GPU or TPU than on a few CPU cores. So the best node
budget of a draft tree is measured, not assumed (`jaxspec.decoding.opt_tree.choose_budget`).
"""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp

from jaxspec.decoding.sampling import argmax


def forward_cost(model, params, sizes: Sequence[int], *, context: int = 256, batch: int = 1,
                 repeats: int = 5, in_loop: int = 0) -> dict[int, float]:
  """Seconds of one forward over `n` new tokens (a chain, attending to `context` cached slots), by n.

  The cache is donated, as inside the decode loop, so its update is in place. Sizes are interleaved in every round,
  so drift of a noisy machine hits each alike, and the best of `repeats` rounds is kept.

  With `in_loop` > 0 each probe runs that many forwards inside one `lax.fori_loop`, as decoding runs them: the cache
  carried from one to the next, and each forward's argmax fed back as the next tokens (so no work can be hoisted
  out of the loop). It reports the time per forward. The two differ: on the 2-core test machine one token cost
  1 ms less in a loop (13.7 against 14.7 ms, likely the host's dispatch and wait per call), 16 tokens the same or
  more. Budget and gate choices should price what the decode loop pays, so they measure in a loop.
  """
  def step(p, toks, pos, c, m):
    logits, _, c = model.forward(p, toks, pos, c, m)
    return argmax(logits), c

  return _cost(step, model.init_cache, params, sizes, context=context, batch=batch, repeats=repeats, in_loop=in_loop)


def eagle_cost(draft, params, sizes: Sequence[int], *, context: int = 256, batch: int = 1, repeats: int = 5,
               in_loop: int = 0) -> dict[int, float]:
  """`forward_cost` of an EAGLE draft (`jaxspec.models.eagle.EagleDraft`): one forward over n entries and its
  logits, as a tree's expansion (n = its width) or its update (n = the path) runs them."""
  def step(p, toks, pos, c, m):
    b, n = toks.shape
    out, c = draft.forward(p, jnp.zeros((b, n, draft.d_model), jnp.float32), toks, pos, c, m)
    return argmax(draft.logits(p, out)), c

  return _cost(step, draft.init_cache, params, sizes, context=context, batch=batch, repeats=repeats, in_loop=in_loop)


def _cost(step, init_cache, params, sizes, *, context, batch, repeats, in_loop) -> dict[int, float]:
  """Seconds per `step(params, tokens, positions, cache, mask) -> (next tokens, cache)` over n tokens, by n."""
  sizes = sorted(set(int(n) for n in sizes))
  capacity = context + max(sizes) + 8
  if in_loop:
    def looped(p, t, pos, c, m):
      def body(_, carry):
        c, toks = carry
        toks, c = step(p, toks, pos, c, m)
        return c, toks
      c, toks = jax.lax.fori_loop(0, in_loop, body, (c, t))
      return toks, c
    fwd = jax.jit(looped, donate_argnums=(3,))
  else:
    fwd = jax.jit(step, donate_argnums=(3,))
  cache = init_cache(batch, capacity).advance(jnp.full((batch,), context, jnp.int32))
  calls = {n: (jnp.zeros((batch, n), jnp.int32), jnp.broadcast_to(context + jnp.arange(n), (batch, n)),
               jnp.broadcast_to(jnp.tril(jnp.ones((n, n), bool)), (batch, n, n))) for n in sizes}
  for n in sizes:  # compile and warm
    _, cache = jax.block_until_ready(fwd(params, *calls[n][:2], cache, calls[n][2]))
  best = {n: float("inf") for n in sizes}
  for _ in range(repeats):
    for n in sizes:
      t0 = time.perf_counter()
      _, cache = jax.block_until_ready(fwd(params, *calls[n][:2], cache, calls[n][2]))
      best[n] = min(best[n], (time.perf_counter() - t0) / max(in_loop, 1))
  return best
