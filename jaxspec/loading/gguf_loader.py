"""LLaMA-family weights from GGUF files (llama.cpp's format), read with the `gguf` package.

Tensors are dequantized one at a time and handed to JAX before the next is read, so peak memory stays near the
size of the f32 weights. llama.cpp's converter permutes the rows of the Q and K projections so that rotary
embeddings act on interleaved pairs; we undo that permutation, as Hugging Face transformers does, and use the
half-split rotary layout everywhere.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.loading.errors import (ModelLoadError, bounded_context, check_finite, model_config, more_layers,
                                     positive_number, unread_tensors, whole_number)
from jaxspec.loading.tokenizer import GGUF_MAGIC, NOT_GGUF
from jaxspec.models.llama import LlamaConfig, LlamaLM, rope_context, rope_scaling, stack_layers

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", "phi3")  # architectures jaxspec's LLaMA computes
# Architectures whose Q/K rows llama.cpp's converter permutes (its rotary pairs interleaved); Qwen2's and Phi-3's are
# stored as Hugging Face holds them (NeoX-style rotary, the half-split layout jaxspec uses).
_PERMUTED = ("llama", "mistral")
# Phi-3's fused matrices (rows in the order of their parts), split as the Hugging Face loader splits them.
_FUSED = {"attn_qkv.weight": ("attn", ("q", "k", "v")), "ffn_up.weight": ("mlp", ("gate", "up"))}
_QKV_BIAS = ("qwen2",)  # architectures with biases on the q, k and v projections
_WINDOWED = ("phi3", "mistral")  # architectures whose sliding window covers every layer (as in transformers)
SUPPORTED_QTYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                    "Q6_K")


# Files of a Hugging Face model folder that users pass instead of the folder. (Other files count when a config.json
# sits next to them; a lone .bin may be an old GGML model, which a "pass the folder" would mislead about.)
_HF_FOLDER_FILES = (".safetensors", ".json")


def check_not_folder_file(path: str) -> None:
  """Raises `ModelLoadError` when `path` is a file of a Hugging Face model folder rather than a GGUF file: its
  contents would otherwise be reported as a damaged GGUF file, and downloading it again would not help."""
  try:
    with open(path, "rb") as f:
      magic = f.read(4)
  except OSError:
    return  # reported by the caller's own read
  if magic == b"GGUF" or path.lower().endswith(".gguf"):  # a damaged .gguf is reported as such by the reader
    return
  folder = os.path.dirname(os.path.abspath(path))
  if path.endswith(_HF_FOLDER_FILES) or os.path.isfile(os.path.join(folder, "config.json")):
    raise ModelLoadError(f"{path!r} is a file of a Hugging Face model folder, not a GGUF file: pass the folder that "
                         f"holds it ({folder!r}) or a .gguf file.")


def open_gguf(path: str):
  import gguf  # imported lazily: only GGUF users pay for it

  if not os.path.isfile(path):
    raise ModelLoadError(f"No model file at {path!r}. Pass the path of a .gguf file or a Hugging Face model folder.")
  check_not_folder_file(path)
  with open(path, "rb") as f:
    if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
      raise ModelLoadError(f"{path!r} is {NOT_GGUF}. Pass a .gguf model file or a Hugging Face model folder (a .gguf "
                           "file without them is damaged: download or convert it again).")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # gguf raises ValueError, struct.error, IndexError... on damaged files
    raise ModelLoadError(f"{path!r} is not a readable GGUF file ({type(e).__name__}: {e}). The file is truncated "
                         "or corrupt: download or convert it again.") from e


def _field(reader, key: str, default: Any = None):
  f = reader.fields.get(key)
  if f is None:
    if default is None:
      raise ModelLoadError(f"GGUF metadata has no {key!r}; this file is not a complete LLaMA-family model.")
    return default
  return f.contents()


def config_from_gguf(reader, requested: int | None = None) -> LlamaConfig:
  """The architecture described by a GGUF file's metadata; `requested`: the context asked for instead of the default
  (`jaxspec.loading.errors.bounded_context`)."""
  arch = _field(reader, "general.architecture")
  if arch not in LLAMA_FAMILY:
    raise ModelLoadError(f"GGUF architecture {arch!r} is not supported; jaxspec loads {', '.join(LLAMA_FAMILY)}.")
  a = arch
  where = "the GGUF metadata"
  num = lambda key, default=None, minimum=1: whole_number(_field(reader, key, default), key, where, minimum)
  n_heads = num(f"{a}.attention.head_count")
  d_model = num(f"{a}.embedding_length")
  head_dim = num(f"{a}.attention.key_length", max(d_model // n_heads, 1))
  rope_dim = num(f"{a}.rope.dimension_count", head_dim)
  if rope_dim != head_dim and (a in _PERMUTED or not 2 <= rope_dim < head_dim or rope_dim % 2):
    # (llama.cpp's LLaMA converter permutes whole heads' rows, which a part of a head would not undo)
    raise ModelLoadError(f"Partial rotary embeddings (rope dim {rope_dim} of head dim {head_dim}) in a {a!r} file are "
                         "not supported; jaxspec turns part of each head in NeoX-style files only (phi3, qwen2, "
                         "qwen3).")
  names = {t.name for t in reader.tensors}
  scaling = _rope_scaling(reader, a, rope_dim)
  context = num(f"{a}.context_length", 2048)
  bounds, window = [], 0
  if f"{a}.attention.sliding_window" in reader.fields:
    window = num(f"{a}.attention.sliding_window", minimum=0)  # 0: none (Phi-4)
    if a not in _WINDOWED and window:  # (another family's window may cover some layers only)
      bounds.append((window, "its sliding window, which jaxspec applies to Phi-3 and Mistral models only: within one "
                     "window attention is the same"))
      window = 0
  context = bounded_context(context, f"{a}.context_length", bounds, requested=requested,
                            rope_original=rope_context(scaling))
  vocab = reader.fields.get(f"{a}.vocab_size")
  vocab_size = num(f"{a}.vocab_size") if vocab is not None else len(reader.fields["tokenizer.ggml.tokens"].data)
  return model_config(
      LlamaConfig, where,
      vocab_size=vocab_size,
      d_model=d_model,
      n_layers=num(f"{a}.block_count"),
      n_heads=n_heads,
      n_kv_heads=num(f"{a}.attention.head_count_kv", n_heads),
      head_dim=head_dim,
      d_ff=num(f"{a}.feed_forward_length"),
      rope_theta=positive_number(_field(reader, f"{a}.rope.freq_base", 10000.0), f"{a}.rope.freq_base", where),
      norm_eps=positive_number(_field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-5),
                               f"{a}.attention.layer_norm_rms_epsilon", where),
      tie_embeddings="output.weight" not in names,
      max_seq_len=context,
      rope_scaling=scaling,
      rotary_dim=0 if rope_dim == head_dim else rope_dim,
      sliding_window=window if window < context else 0,  # as transformers runs the model (llama.cpp leaves Phi-3's off)
      qkv_bias=a in _QKV_BIAS,
      qk_norm=a == "qwen3",
  )


def _rope_scaling(reader, arch: str, head_dim: int) -> tuple:
  """`LlamaConfig.rope_scaling` from the metadata's scaling type (linear, with its factor) and the rope_freqs tensor
  (per-frequency divisors, as llama.cpp's converter stores Llama 3.1+'s scaling); other scalings are refused."""
  kind = reader.fields.get(f"{arch}.rope.scaling.type")
  kind = "none" if kind is None else kind.contents()
  freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
  long = {t.name: t for t in reader.tensors if t.name in _LONGROPE}
  if long:
    return _longrope(reader, arch, head_dim, kind, freqs, long)
  if kind == "yarn" and freqs is None:
    return _yarn(reader, arch)
  if kind == "longrope":
    raise ModelLoadError("The file asks for LongRoPE scaling without its factors (rope_factors_short.weight and "
                         "rope_factors_long.weight): the file is damaged; download or convert it again.")
  if kind not in ("none", "linear"):
    raise ModelLoadError(f"The file asks for RoPE scaling {kind!r}{' with rope_freqs' if freqs is not None else ''}; "
                         "jaxspec implements plain RoPE, linear scaling, YaRN, LongRoPE and per-frequency factors "
                         "(rope_freqs, as Llama 3.1+ uses), so this model's positions would be encoded wrongly.")
  if kind == "linear" and freqs is not None:
    raise ModelLoadError("The file asks for linear RoPE scaling and holds per-frequency factors (rope_freqs) too; "
                         "jaxspec applies one or the other: convert the model again.")
  if kind == "linear":
    return rope_scaling({"rope_type": "linear", "factor": _field(reader, f"{arch}.rope.scaling.factor")})
  if freqs is None:
    return ()
  factors = _dequantize(freqs).reshape(-1)
  if factors.size != head_dim // 2:
    raise ModelLoadError(f"rope_freqs.weight holds {factors.size} factors where head_dim {head_dim} needs "
                         f"{head_dim // 2}: the file is damaged; download or convert it again.")
  return rope_scaling({"rope_type": "factors", "factors": tuple(float(f) for f in factors)})


def _yarn(reader, arch: str) -> tuple:
  """`LlamaConfig.rope_scaling` for YaRN as llama.cpp computes it from a file: its attention factor is YaRN's
  `0.1 ln(factor) + 1` times the file's rope.scaling.attn_factor (llama.cpp sets aside the file's yarn_attn_factor),
  beta_fast and beta_slow from the file or 32 and 1. Settings it computes otherwise (an extrapolation factor other
  than 1, DeepSeek's log multiplier) are refused."""
  where = "the GGUF metadata"
  def key(name: str) -> str:
    return f"{arch}.rope.scaling.{name}"

  def number(name: str, default=None) -> float:
    return positive_number(_field(reader, key(name), default), key(name), where)

  if number("yarn_ext_factor", 1.0) != 1.0 or _field(reader, key("yarn_log_multiplier"), 0.0) != 0.0:
    raise ModelLoadError("The file's YaRN scaling sets yarn_ext_factor or yarn_log_multiplier, which jaxspec does not "
                         "implement, so this model's positions would be encoded wrongly.")
  factor = number("factor")
  return rope_scaling({
      "rope_type": "yarn", "factor": factor,
      "original_max_position_embeddings": whole_number(_field(reader, key("original_context_length")),
                                                       key("original_context_length"), where),
      "beta_fast": number("yarn_beta_fast", 32.0), "beta_slow": number("yarn_beta_slow", 1.0), "truncate": True,
      "attention_factor": (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0) * number("attn_factor", 1.0)})


# LongRoPE's factors as llama.cpp's converter writes Phi-3's: for contexts up to the original one, and beyond.
_LONGROPE = ("rope_factors_short.weight", "rope_factors_long.weight")
_CONFIG_TENSORS = ("rope_freqs.weight", *_LONGROPE)  # tensors read into the config, not the params


def _longrope(reader, arch: str, head_dim: int, kind: str, freqs, tensors: dict) -> tuple:
  """`LlamaConfig.rope_scaling` of a file with LongRoPE factors (its original context and attention factor from the
  metadata, as llama.cpp reads them)."""
  if kind not in ("none", "longrope") or freqs is not None or len(tensors) != len(_LONGROPE):
    raise ModelLoadError(f"The file holds {', '.join(sorted(tensors))} with "
                         f"{'rope_freqs.weight' if freqs is not None else f'RoPE scaling {kind!r}'}; LongRoPE needs "
                         "both rope_factors_short and rope_factors_long and no other scaling: convert the model again.")
  factors = {}
  for name, t in tensors.items():
    factors[name] = _dequantize(t).reshape(-1)
    if factors[name].size != head_dim // 2:
      raise ModelLoadError(f"{name} holds {factors[name].size} factors where head_dim {head_dim} needs "
                           f"{head_dim // 2}: the file is damaged; download or convert it again.")
  where = "the GGUF metadata"
  original = f"{arch}.rope.scaling.original_context_length"
  attn = f"{arch}.rope.scaling.attn_factor"
  return rope_scaling({
      "rope_type": "longrope", "short_factor": tuple(float(f) for f in factors["rope_factors_short.weight"]),
      "long_factor": tuple(float(f) for f in factors["rope_factors_long.weight"]),
      "original_max_position_embeddings": whole_number(_field(reader, original), original, where),
      "attention_factor": positive_number(_field(reader, attn, 1.0), attn, where)})


def _unpermute_rows(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's Q/K permutation (interleaved rotary pairs back to the half-split layout)."""
  o, i = w_OxI.shape
  return w_OxI.reshape(n_heads, o // n_heads // 2, 2, i).swapaxes(1, 2).reshape(o, i)


def _unsupported_qtype(name: str, qname: str) -> ModelLoadError:
  return ModelLoadError(f"Tensor {name!r} uses quantization {qname}, which jaxspec cannot dequantize. Re-quantize "
                        f"the model (llama.cpp's llama-quantize, from an F16/F32 GGUF) to one of "
                        f"{', '.join(SUPPORTED_QTYPES)}, or pass its Hugging Face folder instead.")


def _dequantize(t) -> np.ndarray:
  import gguf

  qname = t.tensor_type.name
  if qname not in SUPPORTED_QTYPES:
    raise _unsupported_qtype(t.name, qname)
  try:
    w = gguf.quants.dequantize(t.data, t.tensor_type)
  except Exception as e:
    raise ModelLoadError(f"Could not dequantize tensor {t.name!r} ({qname}): {e}. The file may be corrupt: "
                         "download or convert it again.") from e
  shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest-first
  if int(np.prod(shape)) != w.size:
    raise ModelLoadError(f"Tensor {t.name!r} holds {w.size} values, its header says {shape}: the file is "
                         "corrupt; download or convert it again.")
  return w.reshape(shape).astype(np.float32, copy=False)


def _target(name: str, cfg: LlamaConfig, arch: str = "llama"):
  """Maps a GGUF tensor name to (param path, transform); (None, None) for a tensor jaxspec does not use. `arch`:
  the file's `general.architecture`, which says whether Q/K rows are permuted and which biases it has.

  Raises:
    ModelLoadError: a tensor that changes what the model computes and that jaxspec does not implement: skipping it
      would run another function than the model's.
  """
  if name in _CONFIG_TENSORS:  # read into the config (`_rope_scaling`)
    return None, None
  own_bias = arch in _QKV_BIAS and name.startswith("blk.") and name.endswith(("attn_q.bias", "attn_k.bias",
                                                                                 "attn_v.bias"))
  if not own_bias and name.endswith(".bias") and (name.startswith("blk.") or name in (
      "token_embd.bias", "output_norm.bias", "output.bias")):
    # (a bias outside the blocks on a tensor jaxspec does not read, a vision projector's say, is skipped with it)
    raise ModelLoadError(f"The file holds {name!r}; jaxspec reads a GGUF file's biases for Qwen2's q/k/v only "
                         "(other biases from Hugging Face folders: LLaMA with attention_bias or mlp_bias), so this "
                         "model cannot run correctly from this file: load its Hugging Face folder instead.")
  if name == "token_embd.weight":
    return ("embed", "embedding"), None
  if name == "output_norm.weight":
    return ("final_norm", "scale"), None
  if name == "output.weight":
    return ("lm_head", "kernel"), "T"
  if not name.startswith("blk."):
    return None, None
  _, idx, *rest = name.split(".")
  key = ".".join(rest)
  if not idx.isdigit():
    raise ModelLoadError(f"The file holds {name!r}, whose layer number is not a number; the file is damaged or was "
                         "not written by a GGUF converter of a LLaMA-family model.")
  if int(idx) >= cfg.n_layers:
    raise more_layers("the GGUF file", cfg.n_layers, int(idx) + 1, "block_count in its metadata")
  layer = f"layers_{int(idx)}"
  table = {
      "attn_norm.weight": (("attn_norm", "scale"), None),
      "ffn_norm.weight": (("mlp_norm", "scale"), None),
      "attn_q.weight": (("attn", "q", "kernel"), ("perm", cfg.n_heads) if arch in _PERMUTED else "T"),
      "attn_k.weight": (("attn", "k", "kernel"), ("perm", cfg.n_kv_heads) if arch in _PERMUTED else "T"),
      **{f"attn_{p}.bias": (("attn", p, "bias"), None) for p in "qkv"},
      "attn_v.weight": (("attn", "v", "kernel"), "T"),
      "attn_output.weight": (("attn", "o", "kernel"), "T"),
      "ffn_gate.weight": (("mlp", "gate", "kernel"), "T"),
      "ffn_up.weight": (("mlp", "up", "kernel"), "T"),
      "ffn_down.weight": (("mlp", "down", "kernel"), "T"),
  }
  if arch == "qwen3":
    table.update({"attn_q_norm.weight": (("attn", "q_norm", "scale"), None),
                  "attn_k_norm.weight": (("attn", "k_norm", "scale"), None)})
  if arch == "phi3":
    table.update({k: ((group, parts), "T") for k, (group, parts) in _FUSED.items()})
  if key not in table:
    if key == "attn_rot_embd.weight":  # a rotary table old conversions stored; jaxspec computes its own
      return None, None
    raise ModelLoadError(f"The file holds {name!r}, a layer tensor jaxspec's LLaMA does not have (e.g. a mixture of "
                         f"experts, or QK norms outside qwen3); jaxspec loads plain {', '.join(LLAMA_FAMILY)} models.")
  path, fn = table[key]
  return (layer, *path), fn


def load_gguf(path_or_reader, *, dtype: str = "float32", scan_layers: bool = False, param_dtype: str | None = None,
              context: int | None = None) -> tuple[LlamaLM, dict]:
  """Loads a LLaMA-family GGUF file.

  Args:
    path_or_reader: the .gguf file, or a `gguf.GGUFReader` of it (whose metadata fields are released here: read the
      tokenizer from it first).
    dtype: activation dtype, and parameter dtype unless `param_dtype` is given ("float32" is fastest on CPU).
    scan_layers: stack layers for `lax.scan` (faster compiles) instead of unrolling them.
    param_dtype: the weights' dtype when it differs from `dtype` (bfloat16 weights computed in float32).
    context: the model's context instead of the default (`jaxspec.loading.errors.bounded_context`).

  Returns:
    `(model, params)`.

  Raises:
    ModelLoadError: a missing, corrupt or unsupported file, with what to do.
  """
  reader = open_gguf(path_or_reader) if isinstance(path_or_reader, (str, os.PathLike)) else path_or_reader
  path = getattr(getattr(reader, "data", None), "filename", None) or str(path_or_reader)
  cfg = config_from_gguf(reader, context)
  arch = _field(reader, "general.architecture")
  # The parsed metadata (tokenizer vocabularies: ~10^5 small numpy views) costs ~180 MB; release it before the
  # weights arrive so peak memory stays near the f32 weights alone.
  reader.fields.clear()
  gc.collect()
  param_dtype = param_dtype or dtype
  cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers)
  # Every tensor is checked before the first is dequantized, so an unusable file fails at once, not minutes in.
  for t in reader.tensors:
    if _target(t.name, cfg, arch)[0] is not None and t.tensor_type.name not in SUPPORTED_QTYPES:
      raise _unsupported_qtype(t.name, t.tensor_type.name)
  params: dict = {}
  unread_tensors(repr(path), [t.name for t in reader.tensors if not t.name.startswith("blk.")
                              and t.name not in _CONFIG_TENSORS and _target(t.name, cfg, arch)[0] is None])
  for t in reader.tensors:
    target, fn = _target(t.name, cfg, arch)
    if target is None:
      continue
    w = _dequantize(t)
    check_finite(w, t.name, repr(path))
    if isinstance(fn, tuple):  # Q/K: undo the permutation, then [out, in] -> kernel [in, out]
      w = _unpermute_rows(w, fn[1]).T
    parts = split_fused(target, w, cfg, t.name)  # Phi-3's fused matrices, [out, in]
    for key, part in parts:
      if fn == "T":
        part = part.T
      node = params
      for k in key[:-1]:
        node = node.setdefault(k, {})
      node[key[-1]] = jnp.asarray(part, dtype=param_dtype)  # copies into a JAX buffer; the numpy copy is freed next
    del w, parts
  check_complete(params, cfg, path, name_of=lambda key: gguf_tensor_name(key, cfg, arch),
                 hint=lambda missing: " The file is incomplete or damaged, or was converted for another architecture: "
                                      "download or convert it again.")
  model = LlamaLM(cfg)
  if scan_layers:
    params = stack_layers(params, cfg.n_layers)
  return model, params


# The tensor names of a block (`blk.N.` + these) that `_target` reads, to name a missing one as the file would.
_LAYER_TENSORS = ("attn_norm.weight", "ffn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                  "attn_output.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", "attn_q.bias",
                  "attn_k.bias", "attn_v.bias", "attn_q_norm.weight", "attn_k_norm.weight")


def gguf_tensor_name(key: tuple, cfg: LlamaConfig, arch: str) -> str:
  """The GGUF tensor name of a jaxspec param path (`KeyError` where none maps to it, e.g. a part of a fused one)."""
  fixed = {("embed", "embedding"): "token_embd.weight", ("final_norm", "scale"): "output_norm.weight",
           ("lm_head", "kernel"): "output.weight"}
  if key in fixed:
    return fixed[key]
  layer = int(key[0].split("_")[1])
  for tensor in _LAYER_TENSORS:
    try:
      if _target(f"blk.{layer}.{tensor}", cfg, arch)[0] == key:
        return f"blk.{layer}.{tensor}"
    except ModelLoadError:  # a tensor this architecture has no place for
      continue
  raise KeyError(key)


def split_fused(target: tuple, w_OxI, cfg: LlamaConfig, name: str) -> list:
  """[(param path, rows of `w_OxI`)]: the one entry `(target, w_OxI)`, or the parts of a fused matrix, whose
  `target` ends with the names of its parts (`_FUSED`).

  Raises:
    ModelLoadError: a fused matrix whose rows are not its parts' (the config and the weights disagree).
  """
  if not isinstance(target[-1], tuple):
    return [(target, w_OxI)]
  *head, parts = target
  rows = {"q": cfg.n_heads * cfg.head_dim, "k": cfg.n_kv_heads * cfg.head_dim, "v": cfg.n_kv_heads * cfg.head_dim,
          "gate": cfg.d_ff, "up": cfg.d_ff}
  if w_OxI.shape[0] != sum(rows[p] for p in parts):
    raise ModelLoadError(f"{name!r} has {w_OxI.shape[0]} rows where the config's {' + '.join(parts)} need "
                         f"{' + '.join(str(rows[p]) for p in parts)}; the config and the weights describe different "
                         "models.")
  out, start = [], 0
  for p in parts:
    out.append(((*head, p, "kernel"), w_OxI[start:start + rows[p]]))
    start += rows[p]
  return out


def check_complete(params: dict, cfg: LlamaConfig, path: str, name_of=None, hint=None) -> None:
  """Raises `ModelLoadError` naming missing tensors or tensors of the wrong shape. `name_of`: a param path (a tuple
  of keys) as the file names it (default: jaxspec's path); `hint(missing paths)`: what to add to the message."""
  # Shapes of a one-layer model stand for every layer: tracing the full init would take seconds.
  one = jax.eval_shape(LlamaLM(dataclasses.replace(cfg, scan_layers=False, n_layers=1)).init_params, jax.random.key(0))
  one = dict(one)
  layer = one.pop("layers_0")
  expected = {**one, **{f"layers_{i}": layer for i in range(cfg.n_layers)}}
  keys = lambda tree: {tuple(getattr(p, "key", p) for p in k): v.shape
                       for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  want, have = keys(expected), keys(params)

  def named(k):
    try:
      return name_of(k) if name_of else "".join(f"[{p!r}]" for p in k)
    except (KeyError, IndexError, ValueError):
      return "".join(f"[{p!r}]" for p in k)

  extra = sorted(set(have) - set(want))
  if extra:
    raise ModelLoadError(f"{path!r} holds tensors its config has no place for: {[named(k) for k in extra[:5]]}"
                         f"{' ...' if len(extra) > 5 else ''}; the config and the weights describe different models.")
  missing = sorted(set(want) - set(have))
  if missing:
    raise ModelLoadError(f"{path!r} lacks tensors for {[named(k) for k in missing[:5]]}"
                         f"{' ...' if len(missing) > 5 else ''}.{hint(missing) if hint else ''}")
  bad = [(named(k), have[k], want[k]) for k in want if have[k] != want[k]]
  if bad:
    raise ModelLoadError(f"{path!r} has tensors of unexpected shapes (name, shape read, shape expected; matrices in "
                         f"jaxspec's [in, out] layout): {bad[:3]}. The config and the weights describe different "
                         "models: download or convert the model again.")
