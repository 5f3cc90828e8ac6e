"""Jacobi fixed-point decoding (Santilli et al. 2023; Kou et al. 2024, "CLLMs") as a drafter on the shared loop.

Greedy decoding of n tokens is the fixed point y_i = argmax p(. | prefix, y_<i), i = 1..n. Jacobi decoding starts
from a guess and iterates y^{k+1}_i = argmax p(. | prefix, y^k_<i) for all i in one forward pass. The loop's
verify forward of the block `[pending, g_1..g_n]` is exactly one such iteration: block position j's argmax is the
next value of token j + 1. Greedy acceptance keeps the prefix of the guess that already equals its next value (it
has reached the fixed point) plus the first corrected token, so the output is token-identical to greedy decoding
and every iteration commits at least one token. The rest of the iteration's argmax (computed from a guess that was
wrong somewhere before it) becomes the next guess for the window after the new pending token; window positions the
block did not reach are filled per `guess_init`. No drafter model runs: one target call per Jacobi iteration.

Rather than iterating on a fixed block until all of it converges (Santilli et al.), the window slides: it always
covers the n tokens after the pending token, so each committed token frees a slot at the far end. An iteration
commits more than one token only where a guess computed from a wrong prefix is already right (fast-forwarding);
plain Jacobi rarely manages it on a real model, and on a context-free (bigram) model a wrong guess on a greedy
cycle of period >= 2 never becomes right, so there it commits one token per iteration; a fixed point (period 1)
is reached and then whole windows are accepted.

Counters (per row, int32, in `JacobiState`; `jacobi_stats` / `JacobiDrafter.stats` read them) count iterations
while the row is active and what the acceptance committed in them: the last iteration of a row may commit tokens
past its EOS or `max_new`, which the loop then drops, so `committed_tokens` can exceed the output by at most n.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp

from jaxspec.decoding.bpd import chain_draft
from jaxspec.decoding.protocol import PrefillInfo, Verified
from jaxspec.decoding.sampling import argmax
from jaxspec.errors import InputError

Array = jax.Array


@flax.struct.dataclass
class JacobiState:
  """The drafter's memory and counters, all per row.

  Attributes:
    guess_BxN: the current guess for the n tokens after the pending token.
    prev_guess_BxN: the guess verified in the row's previous iteration.
    shift_B: how far the window moved since that iteration (its `n_commit`); n + 1 before the first iteration, when
      there is no previous guess (no overlap).
    iterations_B: Jacobi iterations (verify forwards) while the row was active.
    ff_steps_B: CLLM's fast-forwarding: iterations that committed more than one token (at least one draft token
      accepted besides the corrected or bonus token that every iteration gives).
    ff_tokens_B: the extra tokens those iterations committed: the sum of `n_commit - 1` over all iterations, i.e.
      the accepted draft tokens.
    stationary_B: CLLM's stationary tokens, counted when accepted: an accepted draft token at absolute position m
      counts when the previous iteration's guess also covered m with the same token. That previous iteration
      rejected its guess at the position it corrected (this iteration's pending position, before m), so the token
      at m already had its final value one iteration early while a token before it was still wrong. Each output
      token counts at most once (in the iteration that accepts it); a token that was right, changed and became right
      again is not counted; the first iteration, with no previous guess, counts none.
  """

  guess_BxN: Array
  prev_guess_BxN: Array
  shift_B: Array
  iterations_B: Array
  ff_steps_B: Array
  ff_tokens_B: Array
  stationary_B: Array


def jacobi_stats(dstate: JacobiState) -> dict[str, Array]:
  """The counters of a `JacobiState` as `[B]` int32 arrays (see `JacobiState` for the definitions).

  `committed_tokens` = iterations + fast_forward_tokens: every iteration commits one token more than the draft tokens
  it accepts.
  """
  return {
      "iterations": dstate.iterations_B,
      "committed_tokens": dstate.iterations_B + dstate.ff_tokens_B,
      "fast_forward_steps": dstate.ff_steps_B,
      "fast_forward_tokens": dstate.ff_tokens_B,
      "stationary_tokens": dstate.stationary_B,
  }


@dataclasses.dataclass(frozen=True)
class JacobiDrafter:
  """Jacobi decoding (method `jacobi`): the draft is the previous iteration's argmax, shifted past what was committed.

  Greedy only (`greedy_only`: the loop refuses a sampling rule): its guesses are the target's argmax, which only
  greedy decoding keeps.

  Attributes:
    window: n, the tokens after the pending token that are iterated together (the chain's length).
    guess_init: how window positions with no value yet are guessed: "repeat" copies the last token before them (the
      first generated token at the start; the block's last argmax, which after a full accept is the new pending
      token, when the window slides past the block), "pad" writes `pad_id`.
    pad_id: the filler token for `guess_init="pad"` (must be a token id of the target's vocabulary).
  """

  greedy_only = True

  window: int = 8
  guess_init: Literal["pad", "repeat"] = "repeat"
  pad_id: int = 0
  is_chain: bool = True
  calls_per_step: int = 0  # the guesses come from the target's own verify forward
  draft_replaceable = True  # the next guess is the verify forward's argmax, whatever was verified

  def __post_init__(self):
    if self.window < 1:
      raise InputError(f"jacobi: window must be >= 1, got {self.window}.")
    if self.guess_init not in ("pad", "repeat"):
      raise InputError(f"jacobi: guess_init must be 'pad' or 'repeat', got {self.guess_init!r}.")
    if self.pad_id < 0:
      raise InputError(f"jacobi: pad_id must be a token id (>= 0), got {self.pad_id}.")

  @property
  def num_nodes(self) -> int:
    return self.window

  def init(self, draft_params, prefill: PrefillInfo) -> JacobiState:
    b, n = prefill.first_B.shape[0], self.window
    vocab = prefill.logits_BxV.shape[-1]
    if self.guess_init == "pad" and self.pad_id >= vocab:
      raise InputError(f"jacobi: pad_id {self.pad_id} is not a token of the target's vocabulary ({vocab}).")
    fill_B = prefill.first_B if self.guess_init == "repeat" else jnp.full((b,), self.pad_id)
    guess_BxN = jnp.broadcast_to(fill_B.astype(jnp.int32)[:, None], (b, n))
    zeros_B = jnp.zeros((b,), jnp.int32)
    return JacobiState(guess_BxN=guess_BxN, prev_guess_BxN=guess_BxN, shift_B=jnp.full((b,), n + 1, jnp.int32),
                       iterations_B=zeros_B, ff_steps_B=zeros_B, ff_tokens_B=zeros_B, stationary_B=zeros_B)

  def propose(self, draft_params, dstate: JacobiState, loop):
    return chain_draft(dstate.guess_BxN), dstate

  def next_guess(self, target_BxT: Array, n_commit_B: Array) -> Array:
    """The guess for the n tokens after the new pending token: the block's argmax at positions n_commit ..
    n_commit + n - 1 (position j predicts block token j + 1), positions past the block's end filled per `guess_init`."""
    n = self.window
    idx_BxN = n_commit_B[:, None] + jnp.arange(n, dtype=jnp.int32)[None]
    shifted_BxN = jnp.take_along_axis(target_BxT, jnp.minimum(idx_BxN, n), axis=1)  # "repeat": the last argmax
    if self.guess_init == "pad":
      shifted_BxN = jnp.where(idx_BxN > n, self.pad_id, shifted_BxN)
    return shifted_BxN.astype(jnp.int32)

  def update(self, draft_params, dstate: JacobiState, verified: Verified) -> JacobiState:
    n = self.window
    active_B = verified.active_B
    n_commit_B = verified.acceptance.n_commit_B
    target_BxT = argmax(verified.logits_BxTxV)
    guess_BxN = self.next_guess(target_BxT, n_commit_B)

    # Stationary: accepted draft token i (absolute position pending + 1 + i) sat at index i + shift of the previous
    # guess.
    n_acc_B = n_commit_B - 1
    i_N = jnp.arange(n, dtype=jnp.int32)
    prev_idx_BxN = i_N[None] + dstate.shift_B[:, None]
    prev_BxN = jnp.take_along_axis(dstate.prev_guess_BxN, jnp.minimum(prev_idx_BxN, n - 1), axis=1)
    same_BxN = (i_N[None] < n_acc_B[:, None]) & (prev_idx_BxN < n) & (prev_BxN == verified.draft.tokens_BxN)
    stationary_B = jnp.sum(same_BxN.astype(jnp.int32), axis=-1)

    act_B = active_B.astype(jnp.int32)
    keep = lambda new, old: jnp.where(active_B.reshape(active_B.shape + (1,) * (old.ndim - 1)), new, old)
    return JacobiState(
        guess_BxN=keep(guess_BxN, dstate.guess_BxN),
        prev_guess_BxN=keep(verified.draft.tokens_BxN.astype(jnp.int32), dstate.prev_guess_BxN),
        shift_B=keep(n_commit_B.astype(jnp.int32), dstate.shift_B),
        iterations_B=dstate.iterations_B + act_B,
        ff_steps_B=dstate.ff_steps_B + act_B * (n_commit_B > 1).astype(jnp.int32),
        ff_tokens_B=dstate.ff_tokens_B + act_B * n_acc_B,
        stationary_B=dstate.stationary_B + act_B * stationary_B)

  def stats(self, dstate: JacobiState) -> dict[str, Array]:
    """Host-readable counters; the loop returns them as `DecodeOutput.drafter_stats`."""
    return jacobi_stats(dstate)
