"""Baselines outside jaxspec's loop, on the same weights: T5X's `temperature_sample` and Hugging Face `generate`.

T5X drives decoder-only models in the layout of its `DecoderOnlyModel` (prompt in the decoder's inputs, prefilled
cache) and encoder-decoders (`model.is_encoder_decoder`) in that of its `EncoderDecoderModel` (encoder run once, an
all-zero decoder prompt, decoding from the start token).

Both are optional. T5X is not on PyPI: pass a source checkout (`--t5x-src DIR`); only `t5x/decoding.py` and
`t5x/binary_search.py` are imported, which need nothing beyond jax, flax and numpy (T5X's package `__init__`
imports the whole framework, so the two modules are loaded on their own). Hugging Face needs torch and
transformers installed in the same environment.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.bench.methods import BenchContext, Runner, Unavailable
from jaxspec.decoding.generate import GenerationResult, bucket, compiled_program, round_up
from jaxspec.decoding.protocol import start
from jaxspec.decoding.sampling import seed_key
from jaxspec.errors import InputError


def load_t5x_decoding(src: str | os.PathLike | None):
  """`t5x.decoding` from an installed T5X or from a source checkout (the folder holding `t5x/`, or `t5x/` itself).

  Raises:
    Unavailable: no checkout given and T5X not installed, or the checkout lacks `t5x/decoding.py`.
  """
  if src is None:
    try:
      return importlib.import_module("t5x.decoding")
    except Exception as e:  # noqa: BLE001 - T5X's own imports may fail in many ways
      raise Unavailable(f"T5X is not importable ({type(e).__name__}); pass a T5X source checkout with "
                        "--t5x-src") from None
  root = Path(src)
  pkg = root / "t5x" if (root / "t5x" / "decoding.py").is_file() else root
  if not (pkg / "decoding.py").is_file() or not (pkg / "binary_search.py").is_file():
    raise Unavailable(f"{src} is not a T5X checkout: no t5x/decoding.py and t5x/binary_search.py in it")
  name = "_jaxspec_t5x"  # a private package name, so an installed `t5x` is never shadowed
  if f"{name}.decoding" in sys.modules:
    return sys.modules[f"{name}.decoding"]
  package = types.ModuleType(name)
  package.__path__ = [str(pkg)]
  sys.modules[name] = package
  sys.modules.setdefault("t5x", package)  # decoding.py does `from t5x import binary_search`
  for sub in ("binary_search", "decoding"):
    spec = importlib.util.spec_from_file_location(f"{name}.{sub}", pkg / f"{sub}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"{name}.{sub}"] = module
    if sub == "binary_search" and sys.modules["t5x"] is package:
      package.binary_search = module
    try:
      spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the checkout's own code and imports may fail in many ways
      for key in (f"{name}.binary_search", f"{name}.decoding", name):  # a fixed checkout can be tried again
        sys.modules.pop(key, None)
      if sys.modules.get("t5x") is package:
        del sys.modules["t5x"]
      raise Unavailable(f"{pkg / (sub + '.py')} cannot be imported ({type(e).__name__}: {e}); T5X's decoding needs "
                        "only JAX, Flax and NumPy, so the checkout may be damaged or of another version: check it "
                        "out again") from None
  return sys.modules[f"{name}.decoding"]


@functools.partial(jax.jit, static_argnames=("model", "decoding", "capacity", "max_new", "eos_id", "topk", "topp"))
def _t5x_program(model, params, prompts_BxP, lengths_B, rng, temperature, *, decoding, capacity: int, max_new: int,
                 eos_id: int, topk: int, topp: float):
  """Prefill all but the last prompt token (as T5X's decoder-only models do), then T5X's loop feeds the last prompt
  token and decodes one token per `tokens_to_logits` call."""
  b, p = prompts_BxP.shape
  cache = jax.lax.optimization_barrier(model.init_cache(b, capacity))
  positions_BxP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  _, _, cache = model.forward(params, prompts_BxP, positions_BxP, cache, jnp.tril(jnp.ones((p, p), bool)),
                              logits=False)
  cache = cache.advance(lengths_B - 1)
  # T5X's layout: position 0 is a BOS slot, the prompt follows, 0 marks positions to decode.
  width = 1 + p + max_new
  inputs_BxW = jnp.zeros((b, width), jnp.int32).at[:, 1:p + 1].set(
      jnp.where(jnp.arange(p)[None] < lengths_B[:, None], prompts_BxP, 0))

  def tokens_to_logits(state):
    c = state.cache
    logits_Bx1xV, _, c = model.forward(params, state.cur_token, c.lengths[:, None], c, jnp.ones((1, 1), bool))
    return logits_Bx1xV[:, 0], c.advance(jnp.ones((b,), jnp.int32))

  decodes, _ = decoding.temperature_sample(
      inputs_BxW, cache, tokens_to_logits, eos_id, rng, num_decodes=1, temperature=temperature, topk=topk,
      topp=topp, initial_index=lengths_B, max_decode_steps=max_new)
  return decodes[:, 0]  # [B, W]: the prompt from index 0, then the decoded tokens from index L, then 0s


@functools.partial(jax.jit, static_argnames=("model", "decoding", "capacity", "max_new", "eos_id", "topk", "topp"))
def _t5x_encdec_program(model, params, prompts_BxP, lengths_B, rng, temperature, *, decoding, capacity: int,
                        max_new: int, eos_id: int, topk: int, topp: float):
  """Encoder-decoders as T5X's `EncoderDecoderModel.predict_batch_with_aux` runs them: encode once (`model.start`
  fills the cross-attention cache), then `temperature_sample` on an all-zero decoder prompt of `max_new` slots. Its
  loop starts from index 0 with token 0 (its BOS slot) as the first `cur_token`; `tokens_to_logits` feeds the model's
  own start token there (T5's is 0 too) and then each sampled token, one per call, at position `cache.lengths`."""
  b = prompts_BxP.shape[0]
  cache = jax.lax.optimization_barrier(model.init_cache(b, capacity))
  start_BxQ, _, cache = start(model, params, prompts_BxP, lengths_B, cache)  # the decoder cache stays empty
  if start_BxQ.shape[1] != 1:
    raise ValueError(f"T5X's encoder-decoder layout starts the decoder from one token; {type(model).__name__}.start "
                     f"gave {start_BxQ.shape[1]}")
  inputs_BxW = jnp.zeros((b, max_new), jnp.int32)  # no decoder prompt: every slot is decoded

  def tokens_to_logits(state):
    c = state.cache
    token_Bx1 = jnp.where(state.cur_index[:, None] == 0, start_BxQ, state.cur_token)
    logits_Bx1xV, _, c = model.forward(params, token_Bx1, c.lengths[:, None], c, jnp.ones((1, 1), bool))
    return logits_Bx1xV[:, 0], c.advance(jnp.ones((b,), jnp.int32))

  decodes, _ = decoding.temperature_sample(
      inputs_BxW, cache, tokens_to_logits, eos_id, rng, num_decodes=1, temperature=temperature, topk=topk,
      topp=topp)
  return decodes[:, 0]  # [B, max_new]: output[i] came from loop index i, 0s after a row's EOS


def t5x_runner(ctx: BenchContext) -> Runner:
  """T5X's `temperature_sample` driving the jaxspec model through a `tokens_to_logits` callable."""
  if ctx.temperature > 0 and ctx.top_k and ctx.top_p < 1.0:
    raise Unavailable(f"T5X's temperature_sample takes top-k or top-p, not both (--top-k {ctx.top_k} --top-p "
                      f"{ctx.top_p:g})")
  if len(ctx.eos_ids) > 1:  # it would decode past the others, and every such output would count as a mismatch
    raise Unavailable(f"T5X's temperature_sample takes one EOS id, and this model has {len(ctx.eos_ids)} "
                      f"({', '.join(map(str, ctx.eos_ids))})")
  decoding = load_t5x_decoding(ctx.t5x_src)
  eos = ctx.eos_ids[0] if ctx.eos_ids else -1
  if getattr(ctx.model, "is_encoder_decoder", False):
    return _t5x_encdec_runner(ctx, decoding, eos)

  def run(prompts, max_new_tokens, seed):
    if any(0 in p for p in prompts):
      raise InputError("A prompt contains token id 0, which T5X's temperature_sample reads as padding.")
    lengths = [len(p) for p in prompts]
    p = bucket(max(lengths))
    arr = np.zeros((len(prompts), p), np.int32)
    for i, pr in enumerate(prompts):
      arr[i, :len(pr)] = pr
    # T5X returns sequences[:, 1:]: output[i] came from loop index i, so row b's new tokens start at its length.
    return _run_t5x(ctx, decoding, _t5x_program, arr, lengths, round_up(p + max_new_tokens + 1, 128), max_new_tokens,
                    seed, eos, starts=lengths)

  return run


def _t5x_encdec_runner(ctx: BenchContext, decoding, eos: int) -> Runner:
  """`t5x_runner` for encoder-decoders: the prompt is the encoder input, so any token id may appear in it."""
  if eos == 0:
    # T5X counts EOS tokens in its zero-filled decoder buffer and ends a row when the count grows; with EOS = 0
    # writing a 0 into a 0 slot never grows it, so rows would never stop.
    raise InputError("EOS id 0 is T5X's padding id: its temperature_sample cannot stop on it.")

  def run(prompts, max_new_tokens, seed):
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
      raise InputError("A prompt is empty: give at least one token.")
    arr = np.full((len(prompts), bucket(max(lengths))), ctx.pad_id, np.int32)
    for i, pr in enumerate(prompts):
      arr[i, :len(pr)] = pr
    # The decoder's own tokens only (the encoder has the cross cache); the output starts at loop index 0.
    return _run_t5x(ctx, decoding, _t5x_encdec_program, arr, lengths, round_up(max_new_tokens + 1, 128),
                    max_new_tokens, seed, eos, starts=[0] * len(prompts))

  return run


def _run_t5x(ctx: BenchContext, decoding, fn, arr: np.ndarray, lengths: list[int], capacity: int,
             max_new_tokens: int, seed: int, eos: int, starts: list[int]) -> GenerationResult:
  """Runs a T5X program (`_t5x_program` or `_t5x_encdec_program`) on padded prompts; row b's new tokens are its
  output from `starts[b]` on, cut after the first EOS. One token per call while the row is live."""
  topp = ctx.top_p if ctx.top_p < 1.0 else 0.0
  args = (ctx.params, jnp.asarray(arr), jnp.asarray(lengths, jnp.int32), jax.random.key_data(seed_key(seed)),
          jnp.float32(ctx.temperature))
  static = dict(model=ctx.model, decoding=decoding, capacity=capacity, max_new=int(max_new_tokens), eos_id=eos,
                topk=int(ctx.top_k), topp=float(topp))
  program, compile_s, nbytes, _ = compiled_program(args, static, fn=fn)
  t0 = time.perf_counter()
  out = np.asarray(jax.device_get(program(*args)))
  run_s = time.perf_counter() - t0
  tokens = []
  for row, n in zip(out, starts):
    new = row[n:n + max_new_tokens].tolist()
    if eos in new:
      new = new[:new.index(eos) + 1]
    tokens.append(new)
  # Counted as jaxspec's loop and `hf_runner` count: T5X's first call (the last prompt token, or the decoder's start
  # token) finishes what jaxspec's prefill does and yields the first token, so neither enters the step counts.
  steps = [max(len(t) - 1, 0) for t in tokens]
  return GenerationResult(tokens=tokens, target_calls=max(steps), drafter_calls=0, active_calls=steps,
                          step_tokens=steps, accept_hist=_ones_hist(steps), compile_s=compile_s, run_s=run_s,
                          program_bytes=nbytes)


def _ones_hist(steps) -> np.ndarray:
  """Accepted-length histogram of one-token-per-call decoding: every step commits 1 token."""
  h = np.zeros((len(steps), 2), np.int64)
  h[:, 1] = steps
  return h


# The versions the Hugging Face baselines were last run and tested with (tests/test_hf_baselines.py); jaxspec does not
# depend on either.
TESTED_TORCH = "2.13.0"
TESTED_TRANSFORMERS = "5.25.0"


def hf_runner(ctx: BenchContext, *, lookup: bool, num_tokens: int = 10) -> Runner:
  """Hugging Face `generate` (greedy, or prompt lookup with `num_tokens` candidates) on the same weights, written
  out as a Hugging Face folder first and run in the target's compute dtype. One prompt at a time: prompt lookup in
  transformers takes batch 1. When JAX runs on a GPU and torch has CUDA, the model runs on the GPU too (timed after
  `torch.cuda.synchronize`), so the two are compared on the same hardware. JAX takes 75 % of GPU memory when it
  starts: for a model that torch cannot fit in the rest, run the bench with XLA_PYTHON_CLIENT_PREALLOCATE=false."""
  from jaxspec.models.llama import LlamaLM

  if not isinstance(ctx.model, LlamaLM):  # save_hf writes LLaMA folders: a T5 would fail half-way, with a traceback
    raise Unavailable(f"the Hugging Face baseline runs decoder-only LLaMA-family models; this target is "
                      f"{type(ctx.model).__name__}")
  try:
    import torch
    import transformers
  except Exception as e:  # noqa: BLE001 - a broken install may fail in other ways than ImportError
    raise Unavailable(f"the Hugging Face baselines need torch and transformers, which jaxspec does not install, and "
                      f"they are not importable here ({type(e).__name__}: {e}): install both into this environment, "
                      f"e.g. `pip install torch transformers` (checked with torch {TESTED_TORCH}, transformers "
                      f"{TESTED_TRANSFORMERS})") from None
  key = ("hf", id(ctx.params))
  if key not in ctx.cache:
    from jaxspec.loading.hf import save_hf
    # In the target's compute dtype (--dtype): save_hf writes float32 copies of the weights (bfloat16 ones exactly),
    # and a bfloat16 target timed against a float32 transformers would compare two precisions.
    dtype = getattr(torch, jnp.dtype(getattr(getattr(ctx.model, "cfg", None), "dtype", None) or "float32").name)
    with tempfile.TemporaryDirectory() as tmp:
      save_hf(tmp, ctx.model, jax.device_get(ctx.params))
      hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype)
    hf.eval()
    if jax.default_backend() == "gpu" and torch.cuda.is_available():
      hf.to("cuda")
    calls = [0]
    hf.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    ctx.cache[key] = (hf, calls)
  hf, calls = ctx.cache[key]
  eos = ctx.eos_ids
  sample = ctx.temperature > 0

  class StepLengths(transformers.StoppingCriteria):
    """Never stops; records the output's length after each step (`generate` asks its stopping criteria once per
    step, a prompt-lookup step included), from which each verify call's committed tokens follow."""

    def __init__(self):
      self.lengths = []

    def __call__(self, input_ids, scores, **kwargs):
      self.lengths.append(int(input_ids.shape[-1]))
      return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

  def run(prompts, max_new_tokens, seed):
    tokens, active, commits, run_s = [], [], [], 0.0
    for ids in prompts:
      torch.manual_seed(seed)
      config = transformers.GenerationConfig(
          do_sample=sample, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos or None,
          pad_token_id=ctx.pad_id, temperature=ctx.temperature if sample else None,
          # top_k=0 turns transformers' filter off; None would take its default of 50
          top_k=ctx.top_k if sample else None, top_p=ctx.top_p if sample else None,
          prompt_lookup_num_tokens=num_tokens if lookup else None, use_cache=True)
      x = torch.tensor([list(ids)], device=hf.device)
      calls[0] = 0
      steps_seen = StepLengths()
      on_gpu = hf.device.type == "cuda"
      if on_gpu:
        torch.cuda.synchronize()
      t0 = time.perf_counter()
      with torch.no_grad():
        out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=config,
                          stopping_criteria=transformers.StoppingCriteriaList([steps_seen]))
      if on_gpu:
        torch.cuda.synchronize()
      run_s += time.perf_counter() - t0
      new = out[0, len(ids):].tolist()
      ends = [i for i, t in enumerate(new) if t in eos]
      if ends:  # the first of any EOS id ends the output, as jaxspec's loop ends a row (a pad run after it is cut)
        new = new[:ends[0] + 1]
      tokens.append(new)
      active.append(max(calls[0] - 1, 0))  # the first call is the prefill, which also yields the first token (as in
      # jaxspec's loop, a one-token output took no call after it)
      # the tokens each step after the prefill's committed (its EOS and what it cut included, as jaxspec counts)
      commits.append(np.diff([len(ids), *steps_seen.lengths])[1:])
    steps = [max(len(t) - 1, 0) for t in tokens]
    h = np.zeros((len(tokens), max((int(c.max()) for c in commits if len(c)), default=1) + 1), np.int64)
    for row, c in zip(h, commits):
      np.add.at(row, c, 1)
    # One prompt at a time: each forward served one row, so the batch's forwards are the rows' sum (not their max)
    return GenerationResult(tokens=tokens, target_calls=sum(active), drafter_calls=0, active_calls=active,
                            step_tokens=steps, accept_hist=h, compile_s=0.0, run_s=run_s, program_bytes=0)

  return run
