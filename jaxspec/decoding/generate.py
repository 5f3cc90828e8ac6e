"""The host-side entry point: pad prompts to buckets, pick the rule, run the jitted loop, unpad."""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Iterator, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import memory, sharding
from jaxspec.decoding.accept import GreedyAcceptance, SampleAcceptance
from jaxspec.decoding.loop import DecodeOutput, NoDraft, cache_buckets, decode_jit
from jaxspec.decoding.protocol import check_draft_params, decoder_prompt_len as cache_prompt_slots
from jaxspec.decoding.sampling import SamplingParams, Warp, seed_key
from jaxspec.errors import InputError, OutOfMemory

MIN_PROMPT_BUCKET = 16
CAPACITY_ROUND = 128  # keep the cache close to what the request needs
BUCKET_SMALLEST = 512  # the smallest cache bucket: below it one more compiled forward costs more than it saves


def bucket(n: int, minimum: int = MIN_PROMPT_BUCKET) -> int:
  """The padded length for n: the next power of two (at least `minimum`), so few shapes are ever compiled."""
  return max(minimum, 1 << max(0, (n - 1).bit_length()))


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@dataclasses.dataclass
class GenerationResult:
  """Generated token ids per prompt (EOS included when reached) and the loop's counters.

  `tau` = sum(step_tokens) / sum(active_calls): new tokens per target call after prefill (Spec-Bench's τ; 1.0 for
  greedy decoding). In a batch, `target_calls` counts each verify forward once, while `active_calls` counts it for
  every row it served.
  """

  tokens: list[list[int]]  # per prompt, the new tokens only (the prompt is not repeated)
  target_calls: int  # the target's verify forwards after prefill, shared by the batch
  drafter_calls: int  # the drafter's own forwards (0 where it reads the target's forward: BPD heads, lookup)
  active_calls: list[int]  # per row: the verify forwards while the row was still generating
  step_tokens: list[int]  # per row: tokens from verify steps (all new tokens but the first, which prefill gives)
  # [B, T + 1]: [b, a] counts row b's steps whose acceptance rule committed a tokens (a verify step commits 1+); a
  # last block that EOS or max_new_tokens cut short counts whole, so its mean can exceed `tau`
  accept_hist: np.ndarray
  compile_s: float = 0.0  # lowering + compilation, 0 when the program was already compiled
  run_s: float = 0.0  # the generation itself, device to host included
  program_bytes: int = 0  # device memory of the compiled program: arguments + outputs + temporaries (XLA's count)
  drafter_stats: dict = dataclasses.field(default_factory=dict)  # the drafter's own counters, if it has any

  @property
  def tau(self) -> float:
    """New tokens per target call after prefill, over the batch (Spec-Bench's τ)."""
    calls = sum(self.active_calls)
    return sum(self.step_tokens) / calls if calls else float("nan")


def make_acceptor(temperature: float, top_k: int = 0, top_p: float = 1.0):
  """Greedy for temperature 0 (T5X's convention), else sampling with the static top-k / top-p parts."""
  if temperature == 0:
    return GreedyAcceptance()
  return SampleAcceptance(Warp(top_k=int(top_k), use_top_p=top_p < 1.0))


def prepare(prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], max_len: int, extra: int,
            pad_id: int, *, vocab_size: int | None = None, max_len_is_context: bool = False,
            decoder_prompt_len: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
  """Checks and pads a batch: returns (prompts_BxP, lengths_B, max_new_B, out_len, capacity).

  `decoder_prompt_len`: an encoder-decoder's (`model.decoder_prompt_len`): its cache holds that many prompt slots
  (the decoder's start token), whatever the encoder input's length, and `max_len` bounds the decoder's tokens.

  Token ids must lie in [0, vocab_size) (negative ones are refused even without `vocab_size`): inside the program an
  id past the vocabulary embeds as NaN and a negative one wraps around, and neither raises.
  """
  prompts = _as_rows(prompts)
  if not prompts:
    raise InputError("No prompts given.")
  for i, row in enumerate(prompts):
    if _ndim(row) != 1:
      raise InputError(f"Prompt {i} is not a flat sequence of token ids ({_ndim(row)} dimensions): give each prompt "
                       "as a list or 1-D array of ids.")
  lengths = [len(p) for p in prompts]
  if min(lengths) == 0:
    raise InputError(f"Prompt {lengths.index(0)} is empty: give at least one token.")
  max_new = _ints(max_new_tokens, "max_new_tokens").tolist()
  max_new = max_new * len(prompts) if np.ndim(max_new_tokens) == 0 else max_new
  if len(max_new) != len(prompts):
    raise InputError(f"max_new_tokens has {len(max_new)} values for {len(prompts)} prompts: give one value or one "
                     "per prompt.")
  if min(max_new) < 1:
    raise InputError(f"max_new_tokens must be >= 1, got {min(max_new)}.")
  if vocab_size is not None and not 0 <= pad_id < vocab_size:
    # Padding slots are embedded like any token: an id past the vocabulary embeds as NaN, which reaches every row
    # through the (masked, but 0 * NaN) attention and turns the whole output into token 0.
    raise InputError(f"pad_id={pad_id} is outside the model's vocabulary [0, {vocab_size}): use an id the model "
                     "can embed, e.g. 0 or the tokenizer's EOS id.")
  rows = [_ints(pr, f"Prompt {i}") for i, pr in enumerate(prompts)]
  for i, ids in enumerate(rows):
    bad = (ids < 0) | (ids >= vocab_size if vocab_size is not None else False)
    if bad.any():
      j = int(np.argmax(bad))
      where = f"[0, {vocab_size})" if vocab_size is not None else "[0, vocab_size)"
      raise InputError(f"Prompt {i} has token id {int(ids[j])} at position {j}, outside the model's vocabulary "
                       f"{where}: encode prompts with the model's own tokenizer.")
  # The row that needs the most cache slots, named with its own numbers (the longest prompt and the largest
  # max_new_tokens may be different rows).
  slots = [decoder_prompt_len or n for n in lengths]
  row = max(range(len(prompts)), key=lambda i: slots[i] + max_new[i])
  worst = slots[row] + max_new[row]
  if worst > max_len:
    which = ("The decoder's start token" if decoder_prompt_len else
             f"Prompt {row} ({lengths[row]} tokens)" if len(prompts) > 1 else f"A prompt of {lengths[row]} tokens")
    limit, more = ((f"the model's context length ({max_len} tokens)", "") if max_len_is_context else
                   (f"the cache length {max_len}", ", or raise max_len" + (
                       "" if decoder_prompt_len else " (up to the model's context length)")))
    fix = "lower max_new_tokens" if decoder_prompt_len else "shorten the prompt or lower max_new_tokens"
    raise InputError(f"{which} plus {max_new[row]} new tokens needs {worst} cache slots, more than {limit}: "
                     f"{fix}{more}.")
  p = bucket(max(lengths))
  out_len = round_up(max(max_new), 32)
  capacity = round_up((decoder_prompt_len or p) + out_len + extra + 1, CAPACITY_ROUND)
  arr = np.full((len(prompts), p), pad_id, np.int32)
  for i, ids in enumerate(rows):
    arr[i, :len(ids)] = ids
  return arr, np.asarray(lengths, np.int32), np.asarray(max_new, np.int32), out_len, capacity


def _as_rows(prompts) -> list:
  """A batch of prompts as a list of rows: a list/tuple of sequences, or a 2-D array (one row per prompt)."""
  if isinstance(prompts, (np.ndarray, jax.Array)):
    if prompts.ndim != 2:
      raise InputError(f"prompts as an array must be 2-D (one row per prompt), got shape {tuple(prompts.shape)}: "
                       "pass a list of prompts, e.g. [ids] for one.")
    return list(np.asarray(prompts))
  if isinstance(prompts, (str, bytes)):
    raise InputError("prompts must be token ids, not text: encode them with the model's tokenizer first.")
  try:
    rows = list(prompts)
  except TypeError:
    raise InputError(f"prompts must be a list of prompts, each a sequence of token ids, got {prompts!r}.") from None
  if any(isinstance(r, (str, bytes)) for r in rows):  # a list of texts: 0-d rows, but the fix is the tokenizer
    raise InputError("prompts must be token ids, not text: encode each prompt with the model's tokenizer first "
                     "([tok.encode(text) for text in texts]).")
  if rows and any(_ndim(r) == 0 for r in rows):
    raise InputError("prompts is a batch: give a list of prompts, each a sequence of token ids (e.g. [ids] for one "
                     "prompt).")
  return rows


def _ndim(value) -> int | str:
  """`np.ndim`, or "nested" for lists of different lengths inside a list."""
  try:
    return np.ndim(value)
  except ValueError:
    return "nested"


def _ints(values, what: str) -> np.ndarray:
  """`values` (one number or a sequence) as a flat int64 array of whole numbers in the int32 range; anything else is
  refused."""
  try:
    arr = np.asarray(values)
    if arr.dtype.kind in "fO":  # floats, or Python ints too large for int64
      arr = np.asarray(arr, np.float64)
  except (TypeError, ValueError, OverflowError):
    raise InputError(f"{what} must be whole numbers, got {values!r}.") from None
  if arr.dtype.kind == "f" and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
    raise InputError(f"{what} must be whole numbers (token ids or counts), got {values!r}.")
  if arr.dtype.kind not in "iuf":  # bools too: True is no token id or count
    raise InputError(f"{what} must be whole numbers, got {values!r}.")
  if arr.size and (arr.max() >= 2 ** 31 or arr.min() < -(2 ** 31)):
    raise InputError(f"{what} has a value outside the int32 range.")
  return np.ravel(arr).astype(np.int64)


def _eos_list(eos_ids, vocab_size: int | None = None) -> list[int]:
  """`eos_ids` as a list of ids in the vocabulary: an id outside it could never end a row, so a wrong tokenizer's
  EOS id would run every row to `max_new_tokens` without a word."""
  if eos_ids is None:
    return []
  if isinstance(eos_ids, (set, frozenset, dict)) or (np.ndim(eos_ids) == 0 and not isinstance(eos_ids, Iterator)):
    # one id (or an unordered collection): name the form that works with the caller's own number
    one = next(iter(eos_ids), "ID") if isinstance(eos_ids, (set, frozenset, dict)) else eos_ids
    one = int(one) if isinstance(one, (int, np.integer)) else one
    raise InputError(f"eos_ids must be a list or tuple of token ids, e.g. [{one!r}], got {eos_ids!r}.")
  eos_ids = list(eos_ids)
  if any(e is None for e in eos_ids):
    raise InputError("eos_ids contains None (a tokenizer without an EOS token?): leave it out, or pass the ids that "
                     "should end a row.")
  if any(np.ndim(e) != 0 for e in eos_ids):
    raise InputError(f"eos_ids must be a flat list of token ids, got {eos_ids!r}.")
  ids = _ints(eos_ids, "eos_ids").tolist() if eos_ids else []
  bad = [e for e in ids if e < 0 or (vocab_size is not None and e >= vocab_size)]
  if bad:
    where = f"[0, {vocab_size})" if vocab_size is not None else "[0, vocab_size)"
    raise InputError(f"eos_ids has {bad[0]}, outside the model's vocabulary {where}: it could never end a row; pass "
                     "the EOS id of the model's own tokenizer (tok.eos_id).")
  return ids


def _number_kind(value) -> str:
  """"i" (an integer), "f" (a float) or "" (anything else, bools included) for a Python, numpy or JAX scalar or
  0-d array."""
  if isinstance(value, (bool, np.bool_)) or isinstance(value, (str, bytes)):
    return ""
  if isinstance(value, int):
    return "i"
  if isinstance(value, float):
    return "f"
  dtype = getattr(value, "dtype", None)
  if dtype is None or np.ndim(value) != 0 or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return ""
  kind = np.dtype(dtype).kind
  return "i" if kind in "iu" else "f" if kind == "f" else ""


def _real(value, what: str) -> float:
  if not _number_kind(value):
    raise InputError(f"{what} must be a number, got {value!r}.")
  return float(value)


def _whole(value, what: str, minimum: int, maximum: int | None = None) -> int:
  kind = _number_kind(value)
  if not (kind == "i" or (kind == "f" and float(value).is_integer())):
    raise InputError(f"{what} must be a whole number, got {value!r}.")
  value = int(value)
  if value < minimum or (maximum is not None and value > maximum):
    span = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
    raise InputError(f"{what} must be {span}, got {value!r}.")
  return value


def is_key(value) -> bool:
  """Whether `value` is one typed JAX PRNG key (`jax.random.key(n)`)."""
  dtype = getattr(value, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and np.ndim(value) == 0


def check_settings(temperature, top_k, top_p, seed, max_len) -> tuple[float, int, float, Any, int | None]:
  """The sampling settings, seed and `max_len` as plain numbers, each checked whether or not it is used (top-k and
  top-p only filter sampling; greedy ignores them), so a wrong value fails on the call that has it.

  Raises:
    InputError: a value of the wrong type or out of range.
  """
  temperature, top_p = _real(temperature, "temperature"), _real(top_p, "top_p")
  SamplingParams.make(temperature, top_p)  # their ranges
  top_k = _whole(top_k, "top_k (0: no top-k filter)", 0)
  if not is_key(seed):
    kind = _number_kind(seed)
    if not (kind == "i" or (kind == "f" and float(seed).is_integer())):
      raise InputError(f"seed must be a whole number or a typed JAX key (jax.random.key(n)), got {seed!r}.")
    seed = _whole(seed, "seed", -(2 ** 63), 2 ** 63 - 1)
  if max_len is not None:
    max_len = _whole(max_len, "max_len (None: the model's context length)", 1)
  return temperature, top_k, top_p, seed, max_len


# What each part of a request must have (the protocols' methods), what it is called and what to pass.
_PARTS = {"model": ("init_cache", "forward"), "drafter": ("num_nodes", "init", "propose", "update"),
          "acceptor": ("first_token", "accept")}
_KINDS = {"model": "a LanguageModel", "drafter": "a drafter object", "acceptor": "an acceptance rule"}
_EXAMPLES = {"model": "the model load_model returns first: model, params, tok = load_model(...)",
             "drafter": "e.g. BPDDrafter(bpd), DraftModelDrafter(draft, 4), LookupDrafter(); None for plain decoding",
             "acceptor": "e.g. GreedyAcceptance() or SampleAcceptance(Warp()); None to choose from the temperature"}


def check_parts(model, drafter, acceptor) -> None:
  """Raises `InputError` where `model`, `drafter` or `acceptor` is not such an object (a method's name as the CLI
  takes it, a class instead of an instance, model and params swapped): each failed later, inside tracing, with an
  AttributeError or a TypeError."""
  for what, value in (("model", model), ("drafter", drafter), ("acceptor", acceptor)):
    if value is None and what != "model":
      continue
    if isinstance(value, type):
      raise InputError(f"{what}={value.__name__} is a class: pass an instance, {value.__name__}(...) "
                       f"({_EXAMPLES[what]}).")
    missing = [a for a in _PARTS[what] if not hasattr(value, a)]
    if missing:
      shown = repr(value) if isinstance(value, (str, int, float)) else f"a {type(value).__name__}"
      cli = " (method names such as 'bpd' are for the jaxspec command)" if isinstance(value, str) else ""
      raise InputError(f"{what} must be {_KINDS[what]} ({_EXAMPLES[what]}), got {shown}, which has no "
                       f"{missing[0]}{cli}.")


def generate(model, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int] = 128,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, eos_ids: Sequence[int] = (),
             pad_id: int = 0, seed: int = 0, drafter=None, draft_params: Any = None, acceptor=None,
             max_len: int | None = None, mesh: Any = None, buckets: bool = False) -> GenerationResult:
  """Generates continuations of a batch of token-id prompts with one jitted program.

  Args:
    model: a `LanguageModel` (e.g. `LlamaLM`).
    params: its parameters.
    prompts: token ids per prompt: a list of sequences (lists, tuples or 1-D arrays), whose lengths may differ, or
      a 2-D array with one whole row per prompt. They are padded to a power-of-two bucket, so a new length in the
      same bucket reuses the compiled program.
    max_new_tokens: new tokens per prompt (one value or one per prompt).
    temperature: 0 for greedy, else sampling; top_k (0: off) / top_p (1: off) filter the sampling distribution and
      are ignored by greedy decoding (but still checked).
    eos_ids: a list of token ids that end a row (e.g. `[tok.eos_id]`); the EOS is kept in the output.
    pad_id: filler past each row's end in the jitted buffers (a token id of the model; static: another value
      compiles another program, as does another number of `eos_ids`).
    seed: sampling seed: a whole number (64 bits; `jaxspec.decoding.sampling.seed_key`) or a typed JAX key
      (`jax.random.key(n)`). Each row draws from its own stream of that key, chosen by its place in the batch: a
      row's samples depend on the seed and its row index, so a prompt sampled in row 2 differs from the same prompt
      sampled alone with the same seed. With a gated drafter (`gate=`) they also depend on the other rows: a step
      verifies the whole batch's drafts when any row asks for it, which draws differently from a one-token step (the
      distribution is the target's either way). So with an OPT-Tree drafter whose growth stops at a `threshold`:
      its trees grow one more depth while any row gains enough from it.
    drafter: proposes tokens to verify (`NoDraft()` = plain decoding).
    draft_params: the drafter's parameters.
    acceptor: acceptance rule; by default chosen from temperature / top_k / top_p. With temperature > 0 it must
      sample (have a `warp`, as `SampleAcceptance`): an argmax rule (`GreedyAcceptance`, BPD's `TopKAcceptance`)
      is refused there.
    max_len: cache length limit; defaults to the model's context length.
    mesh: run sharded on a device mesh: a `jax.sharding.Mesh` with `data` / `model` axes, a spec such as
      `"data=2,model=4"`, or a `jaxspec.sharding.Partitioner`. Params and draft params are placed by the logical
      axis rules (already placed arrays are not copied again), prompts split over `data`, and the caches and loop
      state are constrained inside the program. None: one device, as before.
    buckets: bound the target's attention in the loop by cache buckets (`jaxspec.decoding.loop.cache_buckets`)
      where the model supports it; the output is the same either way. Off by default: on XLA:CPU the per-step
      switch between bucket forwards costs about what it saves (benchmarks/README.md, "Cache buckets"), and each
      bucket adds a compiled forward. Prefill skips the empty cache whether or not this is set.

  Returns:
    A `GenerationResult`.

  Raises:
    InputError: empty prompts, token ids outside the model's vocabulary (prompts, `eos_ids`, `pad_id`), a request
      that does not fit the cache, `max_new_tokens` or sampling settings of the wrong type or out of range, a
      drafter that cannot serve this target (a draft model with another vocabulary, heads or draft params built for
      another target, a greedy-only drafter or acceptor with sampling), a model, drafter or acceptor that is not
      one (a method's name, a class), params that do not fit the model, or a mesh that does not fit the devices.
  """
  temperature, top_k, top_p, seed, max_len = check_settings(temperature, top_k, top_p, seed, max_len)
  check_parts(model, drafter, acceptor)
  drafter = drafter or NoDraft()
  vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)
  if temperature > 0 and vocab is not None and top_k > vocab:
    raise InputError(f"top_k={top_k} is more than the model's vocabulary ({vocab} tokens): use 0 (no filter) or "
                     "fewer.")
  if acceptor is not None and temperature > 0 and not hasattr(acceptor, "warp"):
    raise InputError(f"{type(acceptor).__name__} keeps tokens by the target's argmax, so it does not sample: with "
                     f"temperature={temperature} leave acceptor unset (exact sampling), or decode with temperature 0.")
  acceptor = acceptor or make_acceptor(temperature, top_k, top_p)
  context = getattr(getattr(model, "cfg", None), "max_seq_len", None)
  if max_len and context and max_len > context and getattr(model, "context_is_limit", False):
    raise InputError(f"max_len={max_len} is more than the model's context length ({context} tokens): use at most "
                     f"{context}, or leave it unset.")
  max_len_is_context = bool(context) and max_len in (None, context) and getattr(model, "context_is_limit", False)
  max_len = max_len or context or 1 << 30
  vocab = getattr(model, "vocab_size", vocab)
  pad_id = _whole(pad_id, "pad_id", -(2 ** 31), 2 ** 31 - 1)  # its range: prepare, against the vocabulary
  arr, lengths, max_new, out_len, capacity = prepare(prompts, max_new_tokens, max_len, drafter.num_nodes, pad_id,
                                                     vocab_size=vocab, max_len_is_context=max_len_is_context,
                                                     decoder_prompt_len=cache_prompt_slots(model))
  args = (params, jnp.asarray(arr), jnp.asarray(lengths), jnp.asarray(max_new),
          jnp.asarray(_eos_list(eos_ids, vocab) or [-1], jnp.int32), seed if is_key(seed) else seed_key(seed),
          SamplingParams.make(temperature, top_p), draft_params)
  check_draft_params(drafter, model, draft_params)  # here the arrays are concrete: values are checked too
  static = dict(model=model, drafter=drafter, acceptor=acceptor, out_len=out_len, capacity=capacity, pad_id=pad_id)
  if buckets and getattr(model, "bounds_attention", False):
    static["attn_buckets"] = cache_buckets(capacity, BUCKET_SMALLEST)
  part = sharding.partitioner(mesh, model)
  if part is not None:
    args = sharding.place(args, decode_arg_shardings(part, args))
    static["partitioner"] = part
  try:
    program, compile_s, program_bytes, need = compiled_program(args, static)
  except _PARAM_ERRORS as e:  # params of another model, or not params at all: flax finds out while tracing
    wrapped = (" (a dict holding only 'params': pass params['params'], the tree load_model returns)"
               if isinstance(params, dict) and set(params) == {"params"} else "")
    raise InputError(f"The params do not fit the model they were passed with{wrapped}: {str(e).splitlines()[0]} Pass "
                     "the params loaded with this model (load_model), and draft params built for this drafter's "
                     "model.") from e
  memory.check_fits(need, {d for x in jax.tree.leaves(args) if isinstance(x, jax.Array) for d in x.devices()},
                    MEMORY_ADVICE)
  t0 = time.perf_counter()
  try:
    out: DecodeOutput = program(*args)
    # (the fetch too: a dispatched program may report its allocation failing only when its results are read)
    toks, lens, st, dst = sharding.fetch((out.tokens_BxO, out.lengths_B, out.stats, out.drafter_stats))
  except jax.errors.JaxRuntimeError as e:
    if not memory.is_out_of_memory(e):
      raise
    raise OutOfMemory(f"The devices ran out of memory while decoding ({str(e).splitlines()[0][:200]})",
                      MEMORY_ADVICE) from e
  run_s = time.perf_counter() - t0
  return GenerationResult(
      tokens=[row[:n].tolist() for row, n in zip(toks, lens)], target_calls=int(st.target_calls),
      # The loop reports the drafter's own count of its forwards where it keeps one (`draft_forwards`).
      drafter_calls=int(st.drafter_calls), active_calls=st.active_calls_B.tolist(),
      step_tokens=st.step_tokens_B.tolist(), accept_hist=np.asarray(st.accept_hist_BxA), compile_s=compile_s,
      run_s=run_s, program_bytes=program_bytes, drafter_stats={k: np.asarray(v) for k, v in dst.items()})


MEMORY_ADVICE = ("decode shorter prompts (an encoder-decoder's encoder input grows its memory with its square), fewer "
                 "prompts at once, fewer new tokens (max_new_tokens, max_len) or draft tokens, in bfloat16 (dtype), "
                 "or sharded over more devices (mesh).")


def decode_arg_shardings(part: sharding.Partitioner, args: tuple) -> tuple:
  """Shardings of `decode`'s array arguments `(params, prompts, lengths, max_new, eos, rng, sp, draft_params)`:
  params by the rules, the per-row arrays split over `data`, the rest replicated."""
  params, prompts_BxP, lengths_B, max_new_B, eos_E, rng, sp, draft_params = args
  rows = lambda x: part.sharding(("batch",) + (None,) * (x.ndim - 1), x.shape, "prompts")
  repl = lambda tree: jax.tree.map(lambda _: part.replicated, tree)
  return (part.param_shardings(params), rows(prompts_BxP), rows(lengths_B), rows(max_new_B), part.replicated,
          part.replicated, repl(sp), part.param_shardings(draft_params))


# flax's errors for params that are not the model's: other shapes, a missing entry, a tree of another form or type.
_PARAM_ERRORS = (flax.errors.ScopeParamShapeError, flax.errors.ScopeParamNotFoundError,
                 flax.errors.ApplyScopeInvalidVariablesStructureError, flax.errors.ApplyScopeInvalidVariablesTypeError)

# The compiled programs of the latest settings and shapes, least recently used first. Each holds its executable
# (and the host memory mappings XLA:CPU makes for it) until it leaves: a bound keeps a long-running process from
# collecting one per shape it ever decoded. `clear_programs()` empties it.
_PROGRAMS: collections.OrderedDict = collections.OrderedDict()
MAX_PROGRAMS = 64


def clear_programs() -> None:
  """Forgets every compiled decode program (`jax.clear_caches()` does not reach them); the next call compiles.

  JAX's own caches are cleared too: they keep each executable that `.lower(...).compile()` built, so without that the
  programs stayed in memory and the next call took them back from JAX in milliseconds instead of compiling."""
  _PROGRAMS.clear()
  jax.clear_caches()


def compiled_program(args: tuple, static: dict, fn=None):
  """The compiled program for these static settings and argument shapes, the seconds spent compiling it now (0 on a
  cache hit), and its memory in bytes in all and what running it adds (`jaxspec.memory.program_bytes`). Explicit
  ahead-of-time compilation lets callers report compile time apart from run time. `fn` is a jitted function taking
  `model` first (default: the decode loop)."""
  fn = fn or decode_jit
  leaves, treedef = jax.tree.flatten(args)
  # Shardings are part of the key: a program compiled for arrays on one device rejects arrays on a mesh.
  key = (fn, tuple(sorted(static.items())), treedef,
         tuple((x.shape, str(x.dtype), getattr(x, "sharding", None)) for x in leaves))
  if key in _PROGRAMS:
    _PROGRAMS.move_to_end(key)
    return (_PROGRAMS[key][0], 0.0, *_PROGRAMS[key][1:])
  t0 = time.perf_counter()
  rest = {k: v for k, v in static.items() if k != "model"}
  program = fn.lower(static["model"], *args, **rest).compile()
  compile_s = time.perf_counter() - t0
  sizes = memory.program_bytes(program)
  _PROGRAMS[key] = (program, *sizes)
  while len(_PROGRAMS) > MAX_PROGRAMS:
    _PROGRAMS.popitem(last=False)
  return (program, compile_s, *sizes)
