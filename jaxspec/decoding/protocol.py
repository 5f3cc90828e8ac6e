"""The boundaries of the decode loop: the model it calls, the drafter that proposes, the rule that accepts.

`jaxspec.decoding` sees a model only through `LanguageModel`, as T5X's decoding sees only `tokens_to_logits`.
Drafters and acceptance rules are small frozen dataclasses (static jit arguments); what they carry across steps is
an array pytree in the loop state.
"""

from __future__ import annotations

from typing import Any, Protocol

import flax.struct
import jax

from jaxspec.errors import InputError

Array = jax.Array


class LanguageModel(Protocol):
  """What the decode loop needs from a model. `jaxspec.models.LlamaLM` is one."""

  vocab_size: int

  def init_cache(self, batch_size: int, capacity: int) -> Any:
    """An empty cache with `capacity` slots per row; it has `lengths` `[B]` and `advance` / `compact` methods."""

  def forward(self, params, tokens_BxT: Array, positions_BxT: Array, cache, mask_BxTxT: Array, *,
              logits: bool = True) -> tuple[Array | None, Array, Any]:
    """T new tokens against the cache -> (logits `[B,T,V]`, hidden `[B,T,D]`, cache with the new entries written).

    Draft models that grow trees in their own cache (`jaxspec.decoding.opt_tree.LMTreeSource`) also pass
    `cache_mask_BxTxS`, the cache slots each new token reads; the target never needs it.
    """

  def logits(self, params, hidden_BxTxD: Array) -> Array:
    """f32 logits from final hidden states."""

  # Optional: `start(params, prompts_BxP, lengths_B, cache) -> (tokens_BxQ, lengths_B, cache)`, the model's own
  # prompt after it has read the loop's prompts. Encoder-decoders (`jaxspec.models.t5.T5LM`) encode the prompts into
  # a cross-attention cache there and return the decoder's start token; decoder-only models have no `start`.


def start(model: LanguageModel, params, prompts_BxP: Array, lengths_B: Array, cache) -> tuple[Array, Array, Any]:
  """What `forward` prefills on: `model.start(...)` where the model has one (encoder-decoders), else the prompts
  themselves. Every prefill (the loop's, draft models', draft trees') goes through here. Jittable."""
  fn = getattr(model, "start", None)
  return (prompts_BxP, lengths_B, cache) if fn is None else fn(params, prompts_BxP, lengths_B, cache)


def empty_prefill_kwargs(model: LanguageModel) -> dict:
  """Keyword arguments for a prefill into an empty cache: models that bound attention (`bounds_attention`) skip the
  empty buffer, which at thousands of slots costs more than the prompt's own forward. Encoder-decoders prefill after
  `start` has filled their cache, so they read it as usual."""
  if getattr(model, "bounds_attention", False) and not hasattr(model, "start"):
    return {"attn_slots": 0}
  return {}


def vocab_check(target: LanguageModel, draft: LanguageModel) -> None:
  """Checks that a draft model can propose tokens for a target: both must share one vocabulary.

  Raises:
    InputError: the vocabulary sizes differ.
  """
  if target.vocab_size != draft.vocab_size:
    raise InputError(f"draft and target vocabularies differ: the target has {target.vocab_size} tokens, the draft "
                     f"{draft.vocab_size}; use a draft model trained with the target's tokenizer, and where only the "
                     "number of ids differs (an embedding padded to another size), resize it to the target's with "
                     "jaxspec.models.subset.resize_vocab (the bench and CLI do that for a draft= model).")


def check_target(drafter, model: LanguageModel) -> None:
  """Raises `InputError` where `drafter` cannot serve `model`, e.g. a draft model with another vocabulary: its ids
  past the target's would embed as NaN and silently turn greedy output into token 0. Drafters (and tree sources) that
  run a model of their own define `check_target(target)`; it reads static attributes only, so it runs before
  anything is traced or compiled. Drafters without it are not checked."""
  fn = getattr(drafter, "check_target", None)
  if fn is not None:
    fn(model)


def width_check(target: LanguageModel, d_model: int, what: str) -> None:
  """Raises `InputError` where `what` (heads or a feature-level draft, which read the target's hidden states) was
  built for a target of another width: flax would otherwise fail deep inside tracing with a parameter-shape error."""
  width = getattr(getattr(target, "cfg", None), "d_model", None)
  if width is not None and width != d_model:
    raise InputError(f"{what} read hidden states of width {d_model}, but this target's are {width} wide: they were "
                     "trained for another target; use ones trained for this one.")


def draft_model_params_hint(draft_model) -> str:
  """What builds a draft model's params, for `check_params`; "" for models without params (e.g. fakes)."""
  if not hasattr(draft_model, "init_params"):
    return ""
  return "the draft model's params (jaxspec.models.draft.load_draft, or layerskip_draft for layer skipping)"


def check_draft_params(drafter, model: LanguageModel, draft_params) -> None:
  """Raises `InputError` where `draft_params` were built for another target than `model` (BPD heads' output table
  over another vocabulary): drafters that can tell from the arrays' shapes define `check_draft_params(target,
  draft_params)`. They read shapes, and the values of small id arrays where those are concrete (not traced)."""
  fn = getattr(drafter, "check_draft_params", None)
  if fn is not None and draft_params is not None:
    fn(model, draft_params)


def decoder_prompt_len(model) -> int | None:
  """The prompt slots an encoder-decoder's cache holds (its decoder's start token: `model.decoder_prompt_len`), or
  None for a decoder-only model, whose cache holds the whole prompt."""
  return getattr(model, "decoder_prompt_len", None) or None


def draft_cache_slots(draft_model, prefill: "PrefillInfo") -> int:
  """Cache slots for a draft model's own cache: the target's (`prefill.capacity`), or, for a decoder-only draft of an
  encoder-decoder target (whose cache holds only its decoder's start token), `prefill.context`: such a draft
  prefills on the whole prompt. An encoder-decoder draft's decoder starts from its start token too, so the target's
  capacity holds it."""
  if decoder_prompt_len(draft_model):
    return prefill.capacity  # the draft's decoder prompt, like an encoder-decoder target's, is its start token
  return max(prefill.capacity, prefill.context)


def require_entries(who: str, draft_params, names, how: str) -> None:
  """Raises `InputError` where `draft_params` is not a dict holding `names` (what `how` builds) for the drafter `who`
  names: another drafter's params, or the raw parts they are built from, would otherwise fail deep inside tracing
  with a KeyError."""
  missing = [n for n in names if n not in draft_params] if isinstance(draft_params, dict) else list(names)
  if missing:
    got = f"a dict with {sorted(draft_params)}" if isinstance(draft_params, dict) else type(draft_params).__name__
    raise InputError(f"{who} takes draft_params holding {', '.join(names)}, built by {how}; got "
                     f"{got} (missing {', '.join(missing)}).")


def check_acceptor(drafter, acceptor) -> None:
  """Raises `InputError` where a drafter that is greedy only (`greedy_only = True`) gets a sampling rule."""
  if getattr(drafter, "greedy_only", False) and hasattr(acceptor, "warp"):
    raise InputError(f"{type(drafter).__name__} is greedy only: decode with temperature 0 (GreedyAcceptance).")


def check_params(drafter, draft_params) -> None:
  """Raises `InputError` where `drafter` runs on arrays of its own (heads, a draft model) and `draft_params` is None.
  Such drafters name the function that builds them in `needs_params`."""
  how = getattr(drafter, "needs_params", "")
  if draft_params is None and how:
    raise InputError(f"{type(drafter).__name__} needs draft_params and none were given: build them with {how} and "
                     "pass them to generate(..., draft_params=...).")


@flax.struct.dataclass
class Draft:
  """What a drafter proposes for one step: N nodes after the pending token.

  The target runs `[pending, tokens_BxN]` in one forward. Node i sits at depth `depth_BxN[b, i]` (1 for children of
  the pending token) and attends to the nodes `mask_BxNxN[b, i]` allows (itself and its ancestors); a chain has
  depths 1..N and a lower-triangular mask. `parent_BxN` (-1 = the pending token) lets acceptance rules walk trees.
  `probs_BxNxV` are the drafter's probabilities for each node's token (sampling acceptance needs them), or None.
  `verify_B`, if given, says which rows think their draft worth checking: when no active row does, the loop runs a
  one-token forward instead of the whole block (a greedy step), which is cheaper where t(N+1) > t(1).
  """

  tokens_BxN: Array
  depth_BxN: Array
  mask_BxNxN: Array
  parent_BxN: Array
  probs_BxNxV: Array | None = None
  verify_B: Array | None = None


@flax.struct.dataclass
class Acceptance:
  """What an acceptance rule keeps of a verified block `[pending, nodes...]` of T = N + 1 tokens.

  `path_BxT[b, :n_commit_B[b]]` are the block indices whose cache entries are kept, in order (0, the pending token,
  always first); `emitted_BxT[b, :n_commit_B[b]]` are the new output tokens: the accepted draft tokens and then the
  target's correction or bonus token, which becomes the next pending token. A chain's path is 0, 1, 2, ...
  """

  emitted_BxT: Array
  path_BxT: Array
  n_commit_B: Array
  is_prefix: bool = flax.struct.field(pytree_node=False, default=True)  # path is 0..n-1: no cache compaction


class Drafter(Protocol):
  """Proposes tokens for the target to verify. Frozen, hashable; its per-step memory is the `dstate` pytree."""

  num_nodes: int  # N, static

  def init(self, draft_params, prefill: "PrefillInfo") -> Any:
    """Drafter state after the prompt (may run the drafter's own prefill)."""

  def propose(self, draft_params, dstate, loop) -> tuple[Draft, Any]:
    """Draft for the next step, given the loop state (pending tokens, positions, output so far)."""

  def update(self, draft_params, dstate, verified: "Verified") -> Any:
    """Learns from the verify forward and what was accepted (e.g. BPD heads read the accepted hidden state)."""

  # Optional: `check_target(target)` raises `InputError` where the drafter cannot serve the target (`check_target`
  # below); `needs_params`, a non-empty string, names what builds the drafter's `draft_params` (`check_params`);
  # `stats(dstate)` returns host-readable counters, and its `draft_forwards`, where present, is the loop's count of
  # drafter forwards (drafters whose forwards vary per step count them in their state).


@flax.struct.dataclass
class PrefillInfo:
  """What drafters see of the prompt: tokens, lengths, the target's final hidden state and logits at the last prompt
  token, the first generated token and the loop's random key; also the final hidden states of every position the
  target prefilled (feature-level drafts read them; an encoder-decoder's are its decoder's, not the prompt's)."""

  tokens_BxP: Array
  lengths_B: Array
  hidden_BxD: Array
  logits_BxV: Array
  first_B: Array
  capacity: int = flax.struct.field(pytree_node=False)
  rng: Array | None = None  # the drafter's own key, split from the loop's (drafters that sample need it)
  # Slots for the prompt and every committed token (0: `capacity`). An encoder-decoder's cache holds only its
  # decoder's tokens, so a buffer of the prompt's tokens and the output (prompt lookup's) needs more than it.
  context: int = flax.struct.field(pytree_node=False, default=0)
  hidden_BxQxD: Array | None = None


@flax.struct.dataclass
class Verified:
  """The verify forward and its outcome, for `Drafter.update`."""

  draft: Draft
  logits_BxTxV: Array
  hidden_BxTxD: Array
  acceptance: Acceptance
  active_B: Array  # rows still generating before this step
