"""The one decode loop: draft -> verify -> accept -> commit, as a single jitted program.

Prefill and every step run inside one `jax.jit`: a `lax.while_loop` over `LoopState` with fixed buffers, no host
round trip per token. Rows of a batch accept different numbers of tokens; per-row lengths and masks handle it, and
a finished row idles (its cache stops growing, its output is frozen). Plain decoding is the case of a drafter with
no nodes: one token per target call.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.decoding.protocol import (Draft, Drafter, LanguageModel, PrefillInfo, Verified, check_acceptor,
                                       check_draft_params, check_params, check_target, decoder_prompt_len,
                                       empty_prefill_kwargs, start)
from jaxspec.decoding.sampling import SamplingParams
from jaxspec.errors import InputError

Array = jax.Array


@flax.struct.dataclass
class Stats:
  """Counters of one generation. τ = step_tokens / active_calls (Spec-Bench's convention: tokens per target call
  after prefill, the bonus token included)."""

  target_calls: Array  # verify forwards after prefill (shared by the batch)
  drafter_calls: Array  # drafter forwards (0 for drafters that read the target's own forward)
  active_calls_B: Array  # verify forwards while the row was still generating
  step_tokens_B: Array  # tokens the row received from steps (the first token comes from prefill)
  # accept_hist[b, a]: steps of row b, while active, whose acceptance rule committed a tokens (a = 1..T): a measure of
  # the drafter, so a last block that EOS or max_new_tokens cuts short is binned whole, and sum_a a * accept_hist[b, a]
  # can exceed step_tokens_B[b] (the output's count, τ's numerator) by what those cuts dropped.
  accept_hist_BxA: Array


@flax.struct.dataclass
class LoopState:
  """What the loop carries. The first token after the prompt comes from prefill; `pending_B` is the last emitted
  token, whose keys and values enter the cache with the next forward (at the head of the next verified block)."""

  step: Array
  tokens_BxO: Array  # output buffer, with T slots of slack past the longest output
  n_out_B: Array
  done_B: Array
  pending_B: Array
  max_new_B: Array
  cache: Any
  dstate: Any
  rng: Array
  sp: SamplingParams
  stats: Stats

  @property
  def active_B(self) -> Array:
    return ~self.done_B


@flax.struct.dataclass
class DecodeOutput:
  tokens_BxO: Array  # generated tokens, `pad_id` past each row's length
  lengths_B: Array
  stats: Stats
  drafter_stats: dict = flax.struct.field(default_factory=dict)  # `drafter.stats(dstate)` if the drafter has it


@dataclasses.dataclass(frozen=True)
class NoDraft:
  """The empty drafter: plain autoregressive decoding, one token per target call."""

  num_nodes: int = 0
  is_chain: bool = True
  calls_per_step: int = 0

  def init(self, draft_params, prefill: PrefillInfo):
    return ()

  def propose(self, draft_params, dstate, loop: LoopState):
    b = loop.pending_B.shape[0]
    z = jnp.zeros((b, 0), jnp.int32)
    return Draft(z, z, jnp.zeros((b, 0, 0), bool), z), dstate

  def update(self, draft_params, dstate, verified: Verified):
    return dstate


def _is_eos(tokens: Array, eos_ids_E: Array) -> Array:
  return jnp.any(tokens[..., None] == eos_ids_E.reshape((1,) * tokens.ndim + (-1,)), axis=-1)


def _block_mask(draft: Draft) -> Array:
  """`[B, T, T]` mask of the verified block `[pending, nodes]`: everything sees the pending token."""
  b, n = draft.tokens_BxN.shape
  top = jnp.zeros((b, 1, n), bool)
  left = jnp.ones((b, n + 1, 1), bool)
  return jnp.concatenate([left, jnp.concatenate([top, draft.mask_BxNxN], axis=1)], axis=2)


def _verify_forward(model, params, buckets: tuple[int, ...] | None, defer: bool):
  """`forward(tokens_BxT, positions_BxT, cache, mask_BxTxT)` for the verify step: with `defer` it returns the new
  keys and values (`forward(write=False)`) for `model.write_kv` to write after any conditional around it.

  With cache buckets (static slot counts, ascending, the last the whole buffer) attention reads only the smallest
  bucket that holds every row's committed slots, chosen at run time by a `lax.switch` whose branches are the same
  forward compiled for each bucket. The new block is read apart from the cache, so committed slots are all a step
  needs; the output is the same in every branch, only the cost differs.
  """
  kw = {"write": False} if defer else {}

  def fwd(tokens_BxT, positions_BxT, cache, mask_BxTxT):
    if not buckets:
      return model.forward(params, tokens_BxT, positions_BxT, cache, mask_BxTxT, **kw)
    def bounded(slots):
      return lambda c: model.forward(params, tokens_BxT, positions_BxT, c, mask_BxTxT, attn_slots=slots, **kw)

    branches = [bounded(w) for w in buckets]
    idx = jnp.searchsorted(jnp.asarray(buckets, jnp.int32), jnp.max(cache.lengths), side="left")
    return jax.lax.switch(jnp.minimum(idx, len(buckets) - 1), branches, cache)

  return fwd


def _gated_verify(fwd, block_BxT, positions_BxT, mask_BxTxT, cache, draft: Draft, active_B, acceptor, defer: bool):
  """Verifies the whole block if any active row asks for it (`draft.verify_B`), else only the pending token.

  The one-token branch returns its logits and hidden state broadcast to the block's shape and a draft whose tokens
  are -1 (not proposed): greedy acceptance then commits exactly the target's next token, and rejection sampling
  draws it from the target's distribution, as a plain step would, so the output is unchanged. The acceptance rule
  must declare that it handles such tokens (`handles_unproposed`: greedy acceptance, rejection sampling and Stern's
  top-k acceptance do). `fwd` is `_verify_forward`'s function; with `defer` it returns new keys and values, padded
  here to the block's T entries (only the first is committed after a one-token step).
  """
  if not getattr(acceptor, "handles_unproposed", False):
    raise ValueError(f"Gated drafts (Draft.verify_B) need an acceptance rule that skips unproposed (-1) tokens; "
                     f"{type(acceptor).__name__} does not.")
  b, t = block_BxT.shape

  def whole(c):
    return fwd(block_BxT, positions_BxT, c, mask_BxTxT)

  def pending_only(c):
    logits_Bx1xV, hidden_Bx1xD, c = fwd(block_BxT[:, :1], positions_BxT[:, :1], c, jnp.ones((b, 1, 1), bool))
    if defer:  # pad the one new entry to the block's T slots; only the first is committed
      ks, vs = c
      c = (tuple(jnp.pad(k, [(0, 0)] * 3 + [(0, t - 1)]) for k in ks),
           tuple(jnp.pad(v, [(0, 0)] * 2 + [(0, t - 1), (0, 0)]) for v in vs))
    return (jnp.broadcast_to(logits_Bx1xV, (b, t, logits_Bx1xV.shape[-1])),
            jnp.broadcast_to(hidden_Bx1xD, (b, t, hidden_Bx1xD.shape[-1])), c)

  go = jnp.any(active_B & draft.verify_B)
  logits_BxTxV, hidden_BxTxD, out = jax.lax.cond(go, whole, pending_only, cache)
  return logits_BxTxV, hidden_BxTxD, out, draft.replace(tokens_BxN=jnp.where(go, draft.tokens_BxN, -1))


def cache_buckets(capacity: int, smallest: int) -> tuple[int, ...] | None:
  """Slot counts attention may be bounded to in a loop over a `capacity`-slot cache: `smallest`, doubling, then the
  whole buffer; None when one bucket would be all of it. Each bucket adds one compiled forward to the program."""
  sizes = []
  w = smallest
  while w < capacity:
    sizes.append(w)
    w *= 2
  return tuple(sizes) + (capacity,) if sizes else None


def decode(model: LanguageModel, params, prompts_BxP: Array, prompt_len_B: Array, max_new_B: Array,
           eos_ids_E: Array, rng: Array, sp: SamplingParams, draft_params=None, *, drafter: Drafter, acceptor,
           out_len: int, capacity: int, pad_id: int = 0, partitioner=None,
           attn_buckets: tuple[int, ...] | None = None) -> DecodeOutput:
  """Prefill + the draft/verify/accept loop. Jittable; `drafter`, `acceptor`, `out_len`, `capacity`, `pad_id`,
  `partitioner`, `attn_buckets` and `model` are static.

  Args:
    model: the target, through the `LanguageModel` boundary.
    params: its parameters.
    prompts_BxP: prompts, left-aligned and padded to a bucket length P.
    prompt_len_B: true prompt lengths (>= 1).
    max_new_B: new tokens wanted per row (<= out_len; checked where the values are concrete, and cut to out_len
      inside the program, where a traced value cannot be checked).
    eos_ids_E: tokens that end a row (the EOS is kept in the output, as in T5X).
    rng: random key (unused by greedy rules).
    sp: runtime sampling settings.
    draft_params: the drafter's parameters (heads, draft model), if any.
    drafter: proposes N nodes per step (static).
    acceptor: acceptance rule (static), e.g. `GreedyAcceptance()`.
    out_len: size of the output buffer (static).
    capacity: KV cache slots per row; must hold P + out_len + N + 1 (checked), where an encoder-decoder's P is its
      decoder's prompt (`model.decoder_prompt_len`: the start token), not the encoder input.
    pad_id: written past each row's end.
    partitioner: a `jaxspec.sharding.Partitioner` (static) to run on a device mesh: the KV caches (the target's
      and any in the drafter state) and the loop's batch arrays are constrained to its shardings where they are
      made and at every step. None (unsharded) leaves the program as it was.
    attn_buckets: cache buckets (`cache_buckets`): the target's attention reads only the smallest bucket holding
      the committed context, so a step's cost follows the filled length, not `capacity`. Needs a model with
      `bounds_attention`; None reads the whole buffer every step.

  Returns:
    tokens, lengths and counters. `stats.drafter_calls` is the drafter's own count of its forwards
    (`drafter.stats(dstate)["draft_forwards"]`) where it keeps one, else `calls_per_step` per step.

  Raises:
    InputError: a drafter that cannot serve the model (`protocol.check_target`: e.g. another vocabulary), a cache
      too small for the request, or per-row arrays that do not match the prompts. Only static shapes and settings
      (and `max_new_B` where it is concrete) are checked: nothing here can read a traced value.
  """
  b, p = prompts_BxP.shape
  t = drafter.num_nodes + 1
  check_target(drafter, model)
  check_params(drafter, draft_params)
  check_draft_params(drafter, model, draft_params)
  check_acceptor(drafter, acceptor)
  q_cache = decoder_prompt_len(model) or p  # the prompt's slots in the target's cache
  _check_request(b, q_cache, t, prompt_len_B, max_new_B, out_len, capacity)
  bounded = getattr(model, "bounds_attention", False)
  if attn_buckets and (not bounded or attn_buckets[-1] != capacity or list(attn_buckets) != sorted(attn_buckets)):
    raise ValueError(f"Cache buckets {attn_buckets} need a model with `bounds_attention` and ascending slot counts "
                     f"ending at the capacity {capacity}.")
  shard = partitioner.constrain_state if partitioner is not None else (lambda tree: tree)
  # The barrier keeps XLA from constant-folding attention over the all-zero empty cache (minutes of compile time).
  cache = shard(jax.lax.optimization_barrier(shard(model.init_cache(b, capacity))))
  # Encoder-decoders encode the prompts here and prefill their decoder on the start token.
  own_BxQ, own_len_B, cache = start(model, params, prompts_BxP, prompt_len_B, cache)
  q = own_BxQ.shape[1]
  positions_BxQ = jnp.broadcast_to(jnp.arange(q, dtype=jnp.int32), (b, q))
  _, hidden_BxQxD, cache = model.forward(params, own_BxQ, positions_BxQ, cache, jnp.tril(jnp.ones((q, q), bool)),
                                         logits=False, **empty_prefill_kwargs(model))
  cache = shard(cache)
  last_BxD = jnp.take_along_axis(hidden_BxQxD, (own_len_B - 1)[:, None, None], axis=1)[:, 0]
  logits_BxV = model.logits(params, last_BxD[:, None])[:, 0]
  cache = cache.advance(own_len_B)
  rng, r0, r_draft = jax.random.split(rng, 3)  # rng, r0 equal split(rng)'s (partitionable threefry, the default)
  first_B = acceptor.first_token(r0, logits_BxV, sp)
  tokens_BxO = jnp.full((b, out_len + t), pad_id, jnp.int32).at[:, 0].set(first_B)
  dstate = drafter.init(draft_params, PrefillInfo(prompts_BxP, prompt_len_B, last_BxD, logits_BxV, first_B,
                                                  capacity=capacity, rng=r_draft, hidden_BxQxD=hidden_BxQxD,
                                                  context=capacity - q_cache + p))
  zeros_B = jnp.zeros((b,), jnp.int32)
  # A row past out_len would overrun the output buffer and a cache sized for out_len; cut where it cannot be checked.
  max_new_B = jnp.minimum(jnp.asarray(max_new_B, jnp.int32), out_len)
  state = shard(LoopState(
      step=jnp.int32(0), tokens_BxO=tokens_BxO, n_out_B=jnp.ones((b,), jnp.int32),
      done_B=_is_eos(first_B, eos_ids_E) | (max_new_B <= 1), pending_B=first_B, max_new_B=max_new_B, cache=cache,
      dstate=dstate, rng=rng, sp=sp,
      stats=Stats(jnp.int32(0), jnp.int32(0), zeros_B, zeros_B, jnp.zeros((b, t + 1), jnp.int32))))

  def step(s: LoopState) -> LoopState:
    active_B = s.active_B
    draft, dstate = drafter.propose(draft_params, s.dstate, s)
    block_BxT = jnp.concatenate([s.pending_B[:, None], draft.tokens_BxN], axis=1)
    depth_BxT = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), draft.depth_BxN], axis=1)
    positions_BxT = s.cache.lengths[:, None] + depth_BxT
    mask_BxTxT = _block_mask(draft)
    gated = draft.verify_B is not None and t > 1
    # A conditional whose branches update the cache in place makes XLA:CPU copy it in and out (180 copies per step
    # on the default model). Models that can return their new keys and values instead are written after it.
    defer = (gated or bool(attn_buckets)) and getattr(model, "can_defer_write", False)
    fwd = _verify_forward(model, params, attn_buckets, defer)
    if gated:
      logits_BxTxV, hidden_BxTxD, out, draft = _gated_verify(fwd, block_BxT, positions_BxT, mask_BxTxT, s.cache,
                                                             draft, active_B, acceptor, defer)
    else:
      logits_BxTxV, hidden_BxTxD, out = fwd(block_BxT, positions_BxT, s.cache, mask_BxTxT)
    cache = model.write_kv(s.cache, out) if defer else out
    rng, r = jax.random.split(s.rng)
    acc = acceptor.accept(r, draft, logits_BxTxV, s.sp, drafter.is_chain)
    n_commit_B = jnp.where(active_B, acc.n_commit_B, 0)
    cache = cache.advance(n_commit_B) if acc.is_prefix else cache.compact(acc.path_BxT, n_commit_B, t)

    # New tokens end at the first EOS and at max_new.
    idx_T = jnp.arange(t)[None]
    eos_BxT = _is_eos(acc.emitted_BxT, eos_ids_E) & (idx_T < n_commit_B[:, None])
    first_eos_B = jnp.argmax(eos_BxT, axis=-1)
    hit_eos_B = jnp.any(eos_BxT, axis=-1)
    n_new_B = jnp.where(hit_eos_B, first_eos_B + 1, n_commit_B)
    n_new_B = jnp.minimum(n_new_B, s.max_new_B - s.n_out_B)
    n_new_B = jnp.where(active_B, n_new_B, 0)
    written = jnp.where(idx_T < n_new_B[:, None], acc.emitted_BxT, pad_id)
    tokens_BxO = jax.vmap(lambda buf, new, at: jax.lax.dynamic_update_slice_in_dim(buf, new, at, axis=0))(
        s.tokens_BxO, written, s.n_out_B)
    n_out_B = s.n_out_B + n_new_B
    pending_B = jnp.take_along_axis(acc.emitted_BxT, jnp.maximum(acc.n_commit_B - 1, 0)[:, None], axis=1)[:, 0]
    done_B = s.done_B | hit_eos_B | (n_out_B >= s.max_new_B)

    st = s.stats
    stats = Stats(
        target_calls=st.target_calls + 1,
        drafter_calls=st.drafter_calls + drafter.calls_per_step,
        active_calls_B=st.active_calls_B + active_B.astype(jnp.int32),
        step_tokens_B=st.step_tokens_B + n_new_B,
        # Finished rows commit 0 tokens: counting them would add idle steps to bin 0 (rows sum to active_calls_B).
        accept_hist_BxA=st.accept_hist_BxA + (jax.nn.one_hot(n_commit_B, t + 1, dtype=jnp.int32)
                                              * active_B[:, None].astype(jnp.int32)))
    dstate = drafter.update(draft_params, dstate, Verified(draft, logits_BxTxV, hidden_BxTxD, acc, active_B))
    return shard(LoopState(step=s.step + 1, tokens_BxO=tokens_BxO, n_out_B=n_out_B, done_B=done_B,
                           pending_B=jnp.where(active_B, pending_B, s.pending_B), max_new_B=s.max_new_B, cache=cache,
                           dstate=dstate, rng=rng, sp=s.sp, stats=stats))

  state = jax.lax.while_loop(lambda s: jnp.any(s.active_B) & (s.step < out_len), step, state)
  keep_BxO = jnp.arange(out_len)[None] < state.n_out_B[:, None]
  drafter_stats = drafter.stats(state.dstate) if hasattr(drafter, "stats") else {}
  stats = state.stats
  if "draft_forwards" in drafter_stats:
    # The drafter's own count is the real one: the fixed `calls_per_step` over-counts steps whose drafting stops
    # early (a draft model's `stop`, a tree's `threshold`, lookup copies).
    stats = stats.replace(drafter_calls=jnp.asarray(drafter_stats["draft_forwards"], jnp.int32))
  return DecodeOutput(tokens_BxO=jnp.where(keep_BxO, state.tokens_BxO[:, :out_len], pad_id),
                      lengths_B=state.n_out_B, stats=stats, drafter_stats=drafter_stats)


def _check_request(b: int, p: int, t: int, prompt_len_B, max_new_B, out_len: int, capacity: int) -> None:
  """`decode`'s checks of what is known before tracing: the static shapes and settings, and `max_new_B` where it is
  concrete (a call outside jit). Writes past the cache's end would not fail: `dynamic_update_slice` clamps them onto
  committed slots, so an undersized cache would silently change the output."""
  for name, x in (("prompt_len_B", prompt_len_B), ("max_new_B", max_new_B)):
    if jnp.shape(x) != (b,):
      raise InputError(f"decode: {name} must have one entry per prompt, shape ({b},); got shape {jnp.shape(x)}.")
  if out_len < 1:
    raise InputError(f"decode: out_len (the output buffer's size) must be >= 1, got {out_len}.")
  need = p + out_len + t
  if capacity < need:
    raise InputError(f"decode: a KV cache of {capacity} slots per row cannot hold prompts of {p} slots, "
                     f"{out_len} output slots and the {t}-token verified block ({p} + {out_len} + {t} = {need}): "
                     f"pass capacity >= {need} (`jaxspec.decoding.generate.prepare` computes it).")
  if not isinstance(max_new_B, jax.core.Tracer):
    max_new = np.asarray(max_new_B)
    worst = int(np.argmax(max_new))
    if max_new[worst] > out_len:
      raise InputError(f"decode: row {worst} asks for {int(max_new[worst])} new tokens, more than the output buffer "
                       f"of out_len={out_len}: raise out_len or lower max_new_B.")


decode_jit = jax.jit(decode, static_argnames=("model", "drafter", "acceptor", "out_len", "capacity", "pad_id",
                                             "partitioner", "attn_buckets"))
