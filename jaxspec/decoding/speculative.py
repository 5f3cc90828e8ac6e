"""Speculative sampling with a draft model (Leviathan et al. 2023; Chen et al. 2023) as a drafter on the shared loop.

Draft: a small model with the target's vocabulary runs γ autoregressive steps after the pending token, each one
forward of one token against its own KV cache. Verify: the target runs `[pending, d_1..d_γ]` in one forward.
Accept: `GreedyAcceptance` keeps the prefix equal to the target's argmax (output identical to greedy decoding);
`SampleAcceptance` runs modified rejection sampling with the draft's probabilities q (output distributed exactly as
the target's warped distribution).

The draft cache and acceptance. A step whose target cache holds L committed tokens commits `n_commit` more
(pending + accepted drafts); the draft ran `[pending, d_1..d_{γ-1}]` but never d_γ, so after a step that accepts
all γ drafts it lacks the entry of d_γ. The drafter keeps its cache ONE TOKEN BEHIND the target's: it holds every
committed token but the last one (`DraftState.last_B`), and each propose begins with a two-token causal forward
`[last, pending]` at positions `[L - 1, L]`, which writes (or rewrites) the last committed token's entry and reads
the first draft off the pending token. Rolling back is then only setting the draft cache's length to the target's
committed length minus one: every entry it keeps was computed against the accepted prefix. The scheme has no
branch and one static shape for both cases; its price is one extra token in the first of the γ draft forwards
(a forward is memory-bound, so a second token is nearly free; in the all-accepted case that token is needed anyway).

Everything is jittable with static shapes; rows of a batch accept different numbers of tokens and each row's draft
cache keeps its own length. `layerskip_draft` makes a self-speculative draft from the target's first layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from jaxspec.decoding.lookup import LookupDrafter, LookupState, lookup_tokens
# vocab_check lives beside the model protocol (tree sources need it too); it is imported from here as well.
from jaxspec.decoding.protocol import (Draft, LanguageModel, PrefillInfo, Verified, draft_cache_slots,
                                       draft_model_params_hint, empty_prefill_kwargs, start, vocab_check)
from jaxspec.decoding.sampling import SamplingParams, Warp, argmax, categorical
from jaxspec.errors import InputError
from jaxspec.models.llama import LlamaLM

Array = jax.Array


def decoder_layers(model) -> int:
  """The layers a layer-skip draft can keep from: a decoder-only model's, or an encoder-decoder's decoder layers."""
  return model.cfg.n_dec_layers if getattr(model, "is_encoder_decoder", False) else model.cfg.n_layers


def check_layerskip_target(model) -> None:
  """Raises `InputError` for a target too shallow to skip layers of (one decoder layer)."""
  if (total := decoder_layers(model)) < 2:
    raise InputError(f"A layer-skip draft keeps some of the target's layers and skips the rest: this target has "
                     f"{total} layer, so there is nothing to skip (it needs 2 or more).")


def layerskip_draft(model: LlamaLM, params, n_layers: int) -> tuple[LlamaLM, dict]:
  """A self-speculative draft: the target's first `n_layers` layers, then its final norm and head (no training).

  Args:
    model: the target.
    params: its parameters.
    n_layers: layers the draft keeps, 1 <= n_layers < the target's layers.

  Returns:
    `(draft_model, draft_params)`. The draft's params are the target's own arrays (embedding, `layers_0` ..
    `layers_{n-1}`, final norm, output head if untied), not copies; with `scan_layers=True` the stacked layer arrays
    are sliced, which copies the first n layers.

  An encoder-decoder's draft keeps the whole encoder and the first `n_layers` decoder layers.

  Raises:
    InputError: `n_layers` out of range.
  """
  check_layerskip_target(model)
  total = decoder_layers(model)
  if not 1 <= n_layers < total:
    raise InputError(f"A layer-skip draft keeps 1 to {total - 1} of the target's {total} layers, not {n_layers}.")
  if getattr(model, "is_encoder_decoder", False):
    cut = {f"dec_{i}" for i in range(n_layers, total)}
    return (type(model)(dataclasses.replace(model.cfg, n_dec_layers=n_layers)),
            {k: v for k, v in params.items() if k not in cut})
  draft = LlamaLM(dataclasses.replace(model.cfg, n_layers=n_layers))
  out = {}
  for name, value in params.items():
    if name == "layers":  # stacked layers: [L, ...] leaves
      out[name] = jax.tree.map(lambda x: x[:n_layers], value)
    elif name.startswith("layers_"):
      if int(name.removeprefix("layers_")) < n_layers:
        out[name] = value
    else:
      out[name] = value
  return draft, out


def draw(warp: Warp, greedy: bool, rng: Array, logits_BxV: Array, sp: SamplingParams,
         confidence: bool = False) -> tuple[Array, Array, Array]:
  """A draft token per row, the distribution q `[B, V]` it was drawn from and its confidence `[B]`.

  Greedy drafts take the argmax (q a point mass); their confidence is the top probability over the whole
  vocabulary when `confidence` asks for it, else 1. Sampling drafts draw from the warped distribution (`warp` and
  the loop's runtime `sp`); their confidence is q of the drawn token.
  """
  if greedy:
    tok_B = argmax(logits_BxV)
    if confidence:
      conf_B = 1.0 / jnp.sum(jnp.exp(logits_BxV - jnp.max(logits_BxV, axis=-1, keepdims=True)), axis=-1)
    else:
      conf_B = jnp.ones(tok_B.shape, jnp.float32)
    return tok_B, jax.nn.one_hot(tok_B, logits_BxV.shape[-1], dtype=jnp.float32), conf_B
  logq_BxV = warp.log_probs(logits_BxV, sp)
  tok_B = categorical(rng, logq_BxV)
  return tok_B, jnp.exp(logq_BxV), jnp.exp(jnp.take_along_axis(logq_BxV, tok_B[:, None], axis=-1)[:, 0])


def gate_score(greedy: bool, draft: Draft, conf_BxN: Array) -> Array:
  """`[B]` score a chain draft must reach to be verified: expected accepted tokens Σ_i Π_{j<=i} c_j for greedy drafts
  (confidences after a stop are 0); for sampling drafts Σ_{i<=γ} m^i from m = max q_1 alone, the top probability of
  the first draft distribution, which no draw has touched (a score that read the draws would bias the output)."""
  if greedy:
    return jnp.sum(jnp.cumprod(conf_BxN, axis=-1), axis=-1)
  m_B = jnp.max(draft.probs_BxNxV[:, 0], axis=-1)
  gamma = draft.tokens_BxN.shape[1]
  return jnp.sum(m_B[:, None] ** jnp.arange(1, gamma + 1, dtype=jnp.float32)[None], axis=-1)


@flax.struct.dataclass
class DraftState:
  """What the drafter carries across steps.

  Between steps `cache.lengths[b]` is the target's committed length minus one: the draft cache holds every committed
  token but the last, `last_B`, whose entry the next propose writes. `pending_B` is the token the last propose
  started from (the head of the verified block), kept for `update`.
  """

  cache: Any
  last_B: Array
  pending_B: Array
  rng: Array
  forwards: Array  # draft forwards run so far (the two-token one counts once); fewer than γ a step with `stop`
  # With `lookup`: the committed context, the rows that verify a copy this step, and the row-steps that did so far.
  context: LookupState | None = None
  copy_B: Array | None = None
  copies: Array | None = None


def _causal_BxTxT(b: int, t: int) -> Array:
  return jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))


@dataclasses.dataclass(frozen=True)
class DraftModelDrafter:
  """γ tokens per step from a draft model with its own KV cache.

  Attributes:
    draft_model: the draft, a `LanguageModel` with the target's vocabulary (static; its params are `draft_params`).
    gamma: γ, drafted tokens per step (>= 1).
    warp: the static part of the sampling rule; use the acceptor's, so q is warped as the target's p is.
    greedy: draft the argmax (q is then a point mass, so `SampleAcceptance` stays exact); False samples each draft
      token from the draft's warped distribution q (temperature, top-k, top-p from `warp` and the loop's runtime
      `SamplingParams`) and reports q for modified rejection sampling.
    stop: adaptive γ. A row stops drafting after a token whose confidence is below `stop`, and the draft forwards
      end as soon as every active row has stopped (a while loop, so stopped steps cost fewer forwards). The
      confidence is the draft's top probability (greedy drafts) or q of the sampled token; tokens after a stop
      are -1, which acceptance treats as not proposed. 0 drafts all γ tokens.
    gate: with `gate > 0` a step verifies the block only when some active row's draft scores at least `gate`;
      otherwise it is a one-token step of the target (`Draft.verify_B`). Greedy drafts score their expected
      accepted tokens, Σ_i Π_{j<=i} c_j over the drafted tokens' confidences. Sampling drafts score Σ_{i<=γ} m^i,
      the same sum as if every token were as sure as the first, from m = max q_1, the top probability of the first
      draft distribution, which no draw has touched yet: a score that read the draws would condition them and bias
      the output (`test_the_exactness_test_catches_a_broken_gate`).
    lookup: M >= 1 verifies a prompt-lookup copy instead of a draft in rows whose context's last M or more tokens
      (up to `lookup_ngram`) occurred before: the γ tokens that followed that occurrence. When every active row
      copies, the step runs no draft steps at all, only one draft forward over the copied block to keep the draft
      cache in step (the draft needs its entries for later drafts); rows that copy in a step where others draft
      have their block rewritten by one such forward after drafting. A copy is a point mass q that reads only the
      committed context, so greedy stays greedy and sampling stays exact; a copied row is always verified.
    Both options keep the output exact: greedy stays greedy, and sampling stays distributed as the target (a draft
    that stops after token i still drew token i from q; tests in tests/test_speculative.py).
  """

  draft_model: LanguageModel
  gamma: int
  warp: Warp = Warp()
  greedy: bool = True
  stop: float = 0.0
  gate: float = 0.0
  lookup: int = 0
  lookup_ngram: int = 3
  is_chain = True

  def __post_init__(self):
    if self.gamma < 1:
      raise InputError(f"gamma (draft tokens per step) must be >= 1, got {self.gamma}")
    if not 0.0 <= self.stop < 1.0:
      raise InputError(f"stop (the confidence below which drafting stops) must be in [0, 1), got {self.stop}")
    if not 0.0 <= self.gate <= self.gamma:
      raise InputError(f"gate (the expected accepted tokens a draft needs to be verified) must be in [0, gamma="
                       f"{self.gamma}], got {self.gate}")
    if self.lookup and not 1 <= self.lookup <= self.lookup_ngram:
      raise InputError(f"lookup (the match length that makes a row verify a copy) must be between 1 and "
                       f"lookup_ngram={self.lookup_ngram}, or 0 for no copies; got {self.lookup}")

  @property
  def num_nodes(self) -> int:
    return self.gamma

  @property
  def calls_per_step(self) -> int:
    """Draft forwards per step: γ (the first takes two tokens)."""
    return self.gamma

  @property
  def needs_params(self) -> str:
    return draft_model_params_hint(self.draft_model)

  def check_target(self, target: LanguageModel) -> None:
    """The loop's check before tracing (`protocol.check_target`): the draft must share the target's vocabulary."""
    vocab_check(target, self.draft_model)

  def init(self, draft_params, prefill: PrefillInfo) -> DraftState:
    """The draft's prefill over the prompt; it commits all prompt tokens but the last."""
    b = prefill.tokens_BxP.shape[0]
    if prefill.rng is None and not self.greedy:
      raise ValueError("A sampling DraftModelDrafter needs a random key (PrefillInfo.rng).")
    rng = prefill.rng if prefill.rng is not None else jax.random.key(0)
    # As in the loop's prefill: keep XLA from constant-folding attention over the all-zero empty cache.
    slots = draft_cache_slots(self.draft_model, prefill)
    cache = jax.lax.optimization_barrier(self.draft_model.init_cache(b, slots))
    # An encoder-decoder draft encodes the prompts itself; its decoder's prompt is the start token.
    tokens_BxP, lengths_B, cache = start(self.draft_model, draft_params, prefill.tokens_BxP, prefill.lengths_B, cache)
    p = tokens_BxP.shape[1]
    positions_BxP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    _, _, cache = self.draft_model.forward(draft_params, tokens_BxP, positions_BxP, cache, _causal_BxTxT(b, p),
                                           logits=False, **empty_prefill_kwargs(self.draft_model))
    cache = cache.advance(lengths_B - 1)
    last_B = jnp.take_along_axis(tokens_BxP, (lengths_B - 1)[:, None], axis=1)[:, 0].astype(jnp.int32)
    state = DraftState(cache=cache, last_B=last_B, pending_B=prefill.first_B.astype(jnp.int32), rng=rng,
                       forwards=jnp.int32(0))
    if self.lookup:
      state = state.replace(context=self._lookup_drafter.init(None, prefill), copy_B=jnp.zeros((b,), bool),
                            copies=jnp.int32(0))
    return state

  @property
  def _lookup_drafter(self) -> LookupDrafter:
    return LookupDrafter(num_nodes=self.gamma, max_ngram=self.lookup_ngram, min_ngram=self.lookup)

  def stats(self, dstate: DraftState) -> dict:
    """Host-readable counters; the loop returns them as `DecodeOutput.drafter_stats` (with `lookup`, also
    `copied_steps`: row-steps that verified a copy)."""
    return {"draft_forwards": dstate.forwards, **({"copied_steps": dstate.copies} if self.lookup else {})}

  def _draw(self, rng: Array, logits_BxV: Array, sp: SamplingParams) -> tuple[Array, Array, Array]:
    return draw(self.warp, self.greedy, rng, logits_BxV, sp, confidence=self.stop > 0 or self.gate > 0)

  def propose(self, draft_params, dstate: DraftState, loop) -> tuple[Draft, DraftState]:
    """γ draft forwards: `[last, pending]` -> d_1, then d_1 -> d_2, ..., d_{γ-1} -> d_γ (fewer with `stop`)."""
    rng, r = jax.random.split(dstate.rng)

    def choose(hidden_BxD, key):
      tok_B, q_BxV, conf_B = self._draw(key, self.draft_model.logits(draft_params, hidden_BxD[:, None])[:, 0],
                                        loop.sp)
      return tok_B, (q_BxV, conf_B)

    until, live_B = ((lambda aux: aux[1] < self.stop), loop.active_B) if self.stop > 0 else (None, None)

    def drafted(dstate):
      tokens_BxN, (q_BxNxV, conf_BxN), dstate = self.roll(draft_params, dstate, loop.pending_B, choose,
                                                          jax.random.split(r, self.gamma), until=until, live_B=live_B)
      return tokens_BxN, q_BxNxV, conf_BxN, dstate

    if not self.lookup:
      tokens_BxN, q_BxNxV, conf_BxN, dstate = drafted(dstate)
    else:
      tokens_BxN, q_BxNxV, conf_BxN, dstate = self._with_copies(draft_params, dstate, loop, drafted)
    b, n = tokens_BxN.shape
    draft = Draft(tokens_BxN=tokens_BxN,
                  depth_BxN=jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.int32), (b, n)),
                  mask_BxNxN=_causal_BxTxT(b, n),
                  parent_BxN=jnp.broadcast_to(jnp.arange(-1, n - 1, dtype=jnp.int32), (b, n)),
                  probs_BxNxV=q_BxNxV)
    if self.gate > 0:
      verify_B = self.gate_score(draft, conf_BxN) >= self.gate
      draft = draft.replace(verify_B=verify_B if not self.lookup else verify_B | dstate.copy_B)
    return draft, dstate.replace(rng=rng)

  def _with_copies(self, draft_params, dstate: DraftState, loop, drafted):
    """`drafted(dstate)`'s tokens, q and confidences with copies in the rows whose context repeats itself."""
    ctx = dstate.context
    copy_BxN, match_B = lookup_tokens(ctx.context_BxC, ctx.lengths_B, self.gamma, self.lookup_ngram, self.lookup)
    copy_B = match_B >= self.lookup
    b, n = copy_BxN.shape
    onehot_BxNxV = jax.nn.one_hot(copy_BxN, self.draft_model.vocab_size, dtype=jnp.float32)  # q of a copy
    write = lambda st, tokens_BxN: st.replace(cache=self._write_block(draft_params, st, loop.pending_B, tokens_BxN),
                                              forwards=st.forwards + 1)

    def copied(dstate):  # every active row copies: one draft forward instead of γ
      st = write(dstate, copy_BxN).replace(pending_B=loop.pending_B)
      return copy_BxN, onehot_BxNxV, jnp.ones((b, n), jnp.float32), st

    def mixed(dstate):  # some rows draft: draft all, then rewrite the copying rows' block
      tokens_BxN, q_BxNxV, conf_BxN, st = drafted(dstate)
      rewind = lambda st: write(st.replace(cache=st.cache.replace(lengths=st.cache.lengths - (self.gamma + 1))),
                                jnp.where(copy_B[:, None], copy_BxN, jnp.maximum(tokens_BxN, 0)))
      st = jax.lax.cond(jnp.any(copy_B), rewind, lambda st: st, st)
      return tokens_BxN, q_BxNxV, conf_BxN, st

    tokens_BxN, q_BxNxV, conf_BxN, dstate = jax.lax.cond(jnp.all(copy_B | ~loop.active_B), copied, mixed, dstate)
    return (jnp.where(copy_B[:, None], copy_BxN, tokens_BxN), jnp.where(copy_B[:, None, None], onehot_BxNxV, q_BxNxV),
            jnp.where(copy_B[:, None], 1.0, conf_BxN), dstate.replace(copy_B=copy_B))

  def _write_block(self, draft_params, dstate: DraftState, pending_B: Array, tokens_BxN: Array):
    """The draft cache after one forward over `[last, pending, t_1..t_{γ-1}]`: the entries `roll` writes."""
    cache = dstate.cache
    b = pending_B.shape[0]
    t = self.gamma + 1
    block_BxT = jnp.concatenate([dstate.last_B[:, None], pending_B[:, None], tokens_BxN[:, :self.gamma - 1]], axis=1)
    positions_BxT = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    _, _, cache = self.draft_model.forward(draft_params, block_BxT.astype(jnp.int32), positions_BxT, cache,
                                           _causal_BxTxT(b, t), logits=False)
    return cache.advance(jnp.full((b,), t, jnp.int32))

  def gate_score(self, draft: Draft, conf_BxN: Array) -> Array:
    return gate_score(self.greedy, draft, conf_BxN)

  def roll(self, draft_params, dstate: DraftState, pending_B: Array, choose, xs, until=None,
           live_B: Array | None = None) -> tuple[Array, Any, DraftState]:
    """Runs the draft γ steps from the pending token, picking each next token with `choose`.

    Args:
      draft_params: the draft's params.
      dstate: the state after the last update.
      pending_B: the loop's pending token.
      choose: `(hidden_BxD, x) -> (token_B, aux)`: the next token from the draft's final hidden state at the last
        token and this step's slice of `xs`.
      xs: a pytree with leading axis γ (one slice per drafted token, e.g. random keys).
      until: None runs all γ steps. Otherwise `aux -> stop_B`: a row stops after a token whose aux says so, its
        later tokens are -1 and their aux zeros, and the forwards end once no live row drafts (a while loop).
      live_B: rows that draft at all (the loop's active rows); with `until`, the others count as stopped.

    Returns:
      `(tokens_BxN, aux stacked as [B, N, ...], state)`: the cache lengths advance by γ + 1 (the pair and γ - 1
      tokens); entries after a row's stop are stale.
    """
    b = pending_B.shape[0]
    fwd = self.draft_model.forward
    ones_B = jnp.ones((b,), jnp.int32)
    first_x = jax.tree.map(lambda x: x[0], xs)
    rest_xs = jax.tree.map(lambda x: x[1:], xs)

    cache = dstate.cache
    pair_Bx2 = jnp.stack([dstate.last_B, pending_B], axis=1)
    positions_Bx2 = cache.lengths[:, None] + jnp.arange(2, dtype=jnp.int32)[None]
    _, hidden_Bx2xD, cache = fwd(draft_params, pair_Bx2, positions_Bx2, cache, _causal_BxTxT(b, 2), logits=False)
    cache = cache.advance(2 * ones_B)
    tok_B, aux = choose(hidden_Bx2xD[:, 1], first_x)

    def one(carry, x):
      cache, tok_B = carry
      _, hidden_Bx1xD, cache = fwd(draft_params, jnp.maximum(tok_B, 0)[:, None], cache.lengths[:, None], cache,
                                   jnp.ones((b, 1, 1), bool), logits=False)
      nxt_B, aux = choose(hidden_Bx1xD[:, 0], x)
      return (cache.advance(ones_B), nxt_B), (nxt_B, aux)

    n_fwd = jnp.int32(self.gamma)
    if until is None or self.gamma == 1:  # one token: nothing to stop early (the loop below would index no slices)
      (cache, _), (rest_MxB, rest_aux) = jax.lax.scan(one, (cache, tok_B), rest_xs)
      tokens_BxN = jnp.concatenate([tok_B[:, None], rest_MxB.T], axis=1)
      aux_all = jax.tree.map(lambda a, r: jnp.concatenate([a[:, None], jnp.moveaxis(r, 0, 1)], axis=1), aux,
                             rest_aux)
      return tokens_BxN, aux_all, dstate.replace(cache=cache, pending_B=pending_B, forwards=dstate.forwards + n_fwd)

    # Adaptive γ: token i + 1 is drafted only for rows still live after token i; the loop ends when none is.
    n = self.gamma
    live_B = (jnp.ones((b,), bool) if live_B is None else live_B) & ~until(aux)
    tokens_BxN = jnp.full((b, n), -1, jnp.int32).at[:, 0].set(tok_B)
    aux_all = jax.tree.map(lambda a: jnp.zeros((b, n) + a.shape[1:], a.dtype).at[:, 0].set(a), aux)
    start_B = cache.lengths - 2

    def cond(c):
      i, live_B = c[0], c[3]
      return (i < n) & jnp.any(live_B)

    def body(c):
      i, cache, tok_B, live_B, tokens_BxN, aux_all = c
      (cache, nxt_B), (_, aux) = one((cache, tok_B), jax.tree.map(lambda x: x[i - 1], rest_xs))
      tokens_BxN = tokens_BxN.at[:, i].set(jnp.where(live_B, nxt_B, -1))
      aux_all = jax.tree.map(lambda buf, a: buf.at[:, i].set(jnp.where(live_B.reshape((b,) + (1,) * (a.ndim - 1)),
                                                                       a, 0)), aux_all, aux)
      return i + 1, cache, jnp.where(live_B, nxt_B, -1), live_B & ~until(aux), tokens_BxN, aux_all

    n_fwd, cache, _, _, tokens_BxN, aux_all = jax.lax.while_loop(
        cond, body, (jnp.int32(1), cache, jnp.where(live_B, tok_B, -1), live_B, tokens_BxN, aux_all))
    cache = cache.replace(lengths=start_B + n + 1)  # as if all γ forwards ran: `update` rolls back from here
    return tokens_BxN, aux_all, dstate.replace(cache=cache, pending_B=pending_B, forwards=dstate.forwards + n_fwd)

  def update(self, draft_params, dstate: DraftState, verified: Verified) -> DraftState:
    """Rolls the draft cache back to the target's committed length minus one (idle rows: to before the step)."""
    acc = verified.acceptance
    if not acc.is_prefix:
      raise ValueError("DraftModelDrafter drafts chains: its acceptance must keep a prefix of the block.")
    n_commit_B = acc.n_commit_B
    active_B = verified.active_B
    base_B = dstate.cache.lengths - (self.gamma + 1)  # before the propose: the target's length L - 1
    block_BxT = jnp.concatenate([dstate.pending_B[:, None], verified.draft.tokens_BxN], axis=1)
    last_B = jnp.take_along_axis(block_BxT, jnp.maximum(n_commit_B - 1, 0)[:, None], axis=1)[:, 0]
    cache = dstate.cache.replace(lengths=jnp.where(active_B, base_B + n_commit_B, base_B))
    dstate = dstate.replace(cache=cache, last_B=jnp.where(active_B, last_B, dstate.last_B))
    if self.lookup:
      dstate = dstate.replace(context=self._lookup_drafter.update(None, dstate.context, verified),
                              copies=dstate.copies + jnp.sum(dstate.copy_B & active_B).astype(jnp.int32))
    return dstate
