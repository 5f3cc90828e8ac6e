"""LLaMA-family weights from a Hugging Face folder: `config.json` plus `*.safetensors`."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxspec import files
from jaxspec.errors import InputError
from jaxspec.loading.errors import (ContextError, ModelLoadError, bounded_context, check_finite, flag, model_config,
                                     more_layers, positive_number, unread_tensors, whole_number)
from jaxspec.loading.gguf_loader import check_complete, split_fused
from jaxspec.models.llama import LlamaConfig, LlamaLM, rope_context, rope_scaling, stack_layers, unstack_layers

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM")
# their `model_type`, all that a config without `architectures` says
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
# Qwen2 is LLaMA with biases on the q, k and v projections (and no `attention_bias` key to say so).
_QKV_BIAS_ONLY = ("Qwen2ForCausalLM", "qwen2")
_ACTIVATIONS = ("silu", "swish")  # transformers maps both names to SiLU, the only MLP activation jaxspec's LLaMA has


def config_from_hf(cfg: dict, *, log: bool = False, context: int | None = None) -> LlamaConfig:
  """A `LlamaConfig` from a transformers `config.json` dict; `log`: say where the context is bounded; `context`: the
  context asked for instead of the default (`jaxspec.loading.errors.bounded_context`).

  Raises:
    ModelLoadError: a missing key, or a model jaxspec's LLaMA would compute differently from the original: another
      architecture, another activation, partial rotary embeddings outside Phi-3, RoPE scaling other than linear,
      llama3, longrope and yarn.
  """
  refuse_quantized(cfg)
  archs = cfg.get("architectures") or []
  if archs and not set(archs) & set(SUPPORTED):
    from jaxspec.loading.t5_hf import ARCHITECTURES as T5_ARCHITECTURES

    raise ModelLoadError(f"config.json describes {archs}; jaxspec loads {', '.join(SUPPORTED)} and the encoder-"
                         f"decoders {', '.join(T5_ARCHITECTURES)}.")
  model_type = cfg.get("model_type")
  if not archs and model_type is not None and model_type not in MODEL_TYPES:
    # Without `architectures` the model type is the only name of the family: a Qwen2 or Phi folder would otherwise
    # load into the LLaMA layout with whatever it does differently silently dropped.
    raise ModelLoadError(f"config.json describes model_type {model_type!r}; jaxspec loads {', '.join(MODEL_TYPES)} "
                         f"({', '.join(SUPPORTED)}).")
  _check_features(cfg)
  theta, scaling = _rope(cfg)
  context, window = _context(cfg, scaling, log, context)
  qwen2 = bool(set(archs) & set(_QKV_BIAS_ONLY)) or (not archs and model_type in _QKV_BIAS_ONLY)
  phi3 = "Phi3ForCausalLM" in archs or (not archs and model_type == "phi3")
  qwen3 = "Qwen3ForCausalLM" in archs or (not archs and model_type == "qwen3")  # LLaMA with q_norm and k_norm
  where = "config.json"
  try:
    n_heads = whole_number(cfg["num_attention_heads"], "num_attention_heads", where)
    d_model = whole_number(cfg["hidden_size"], "hidden_size", where)
    optional = lambda key, default: whole_number(_or_default(cfg, key, default), key, where)
    n_kv_heads = optional("num_key_value_heads", n_heads)
    head_dim = optional("head_dim", max(d_model // n_heads, 1))
    return model_config(LlamaConfig, where, rotary_dim=_rotary_dim(cfg, head_dim, phi3), sliding_window=window,
        vocab_size=whole_number(cfg["vocab_size"], "vocab_size", where), d_model=d_model,
        n_layers=whole_number(cfg["num_hidden_layers"], "num_hidden_layers", where),
        n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
        d_ff=whole_number(cfg["intermediate_size"], "intermediate_size", where),
        rope_theta=theta, rope_scaling=scaling, qkv_bias=qwen2 or flag(cfg, "attention_bias", where, False),
        o_bias=not qwen2 and flag(cfg, "attention_bias", where, False),
        mlp_bias=not qwen2 and flag(cfg, "mlp_bias", where, False),
        norm_eps=positive_number(_or_default(cfg, "rms_norm_eps", 1e-6), "rms_norm_eps", where),
        tie_embeddings=flag(cfg, "tie_word_embeddings", where, False),
        max_seq_len=context, qk_norm=qwen3)
  except KeyError as e:
    raise ModelLoadError(f"config.json lacks {e.args[0]!r}, which a LLaMA-family model needs.") from e


def refuse_quantized(cfg: dict) -> None:
  """`ModelLoadError` for a config.json with a `quantization_config`: integer or float8 weights with scales, which
  read as floats would give wrong logits without an error."""
  quant = cfg.get("quantization_config")
  if quant:
    method = quant.get("quant_method", "an unnamed method") if isinstance(quant, dict) else "an unnamed method"
    raise ModelLoadError(f"config.json says the weights are quantized ({method}); jaxspec reads float weights "
                         "(float32, float16, bfloat16) from Hugging Face folders: use the model's unquantized "
                         "checkpoint, or a GGUF file (its quantizations load).")


def refuse_non_float(kind: str, name: str, path: str) -> None:
  """`ModelLoadError` for a safetensors tensor of another dtype than float (`kind` as its header names it)."""
  if kind not in _FLOAT_KINDS:
    raise ModelLoadError(f"{name} in {path!r} holds {kind} values; jaxspec reads float weights (float32, float16, "
                         "bfloat16): a quantized checkpoint gives wrong logits read as floats. Use the model's "
                         "unquantized checkpoint, or a GGUF file (its quantizations load).")


def _or_default(cfg: dict, key: str, default):
  """`cfg[key]`, or `default` where the key is absent or null (as transformers reads a null setting)."""
  return default if cfg.get(key) is None else cfg[key]


def _family(cfg: dict, *model_types: str) -> bool:
  """Whether transformers reads `cfg` with the config class of one of `model_types` (its `model_type`, or for a
  config without one, its architecture)."""
  kind = cfg.get("model_type")
  if kind is None:
    return any(a.lower() == f"{t}forcausallm" for a in cfg.get("architectures") or [] for t in model_types)
  return kind in model_types


def _max_positions(cfg: dict):
  """max_position_embeddings, or transformers' default where it is absent (Phi3Config's 4096, LlamaConfig's 2048)."""
  return _or_default(cfg, "max_position_embeddings", 4096 if _family(cfg, "phi3") else 2048)


def _check_features(cfg: dict) -> None:
  """Raises `ModelLoadError` for settings that make the model compute something jaxspec's LLaMA does not."""
  act = cfg.get("hidden_act")
  if act is not None and act not in _ACTIVATIONS:
    raise ModelLoadError(f"config.json sets hidden_act={act!r}; jaxspec's LLaMA MLP computes SiLU (hidden_act "
                         "'silu') only, so this model cannot run correctly.")


def _rotary_dim(cfg: dict, head_dim: int, phi3: bool) -> int:
  """`LlamaConfig.rotary_dim` from `partial_rotary_factor` (at the top level or in the RoPE block), which
  transformers' Phi-3 applies to the first features of each head; 0 for whole heads."""
  parts = [block.get("partial_rotary_factor") for block in (cfg, cfg.get("rope_parameters"), cfg.get("rope_scaling"))
           if isinstance(block, dict)]
  part = next((p for p in parts if p is not None and p != 1), None)
  if part is None:
    return 0
  part = positive_number(part, "partial_rotary_factor", "config.json")
  dim = int(head_dim * part)
  if not phi3:
    raise ModelLoadError(f"config.json sets partial_rotary_factor={part}; jaxspec turns part of each head for Phi-3 "
                         "models only (whose transformers code does), so this model's positions would be encoded "
                         "wrongly.")
  if not 2 <= dim <= head_dim or dim % 2:
    raise ModelLoadError(f"config.json sets partial_rotary_factor={part}, which turns {dim} of head_dim={head_dim} "
                         "features; rotary embeddings need an even number from 2 to head_dim.")
  return 0 if dim == head_dim else dim


def _context(cfg: dict, scaling: tuple, log: bool, requested: int | None) -> tuple[int, int]:
  """`(LlamaConfig.max_seq_len, sliding_window)`: max_position_embeddings, or the `requested` context, bounded where
  jaxspec computes the model exactly only within a shorter context (`bounded_context`), and the window jaxspec
  applies (0: none).

  Phi-3's and Mistral's sliding window is jaxspec's too (every layer's, as transformers applies it). Another family's
  (Qwen2's windows apply to some layers only) bounds the context to one window, within which attention sees every
  earlier token. LongRoPE's original context bounds the default context (the short factors, as transformers
  computes them there); a longer requested one turns its long factors on.
  """
  where = "config.json"
  context = whole_number(_max_positions(cfg), "max_position_embeddings", where)
  bounds, window = [], 0
  # (transformers' MistralConfig has a window of 4096 where config.json has no sliding_window key)
  value = cfg.get("sliding_window", 4096 if _family(cfg, "mistral") else None)
  if value is not None and _family(cfg, "phi3", "mistral"):  # no switch: the window applies whatever config says
    window = whole_number(value, "sliding_window", where)  # (one as long as the context hides nothing: 0 below)
  elif value is not None and flag(cfg, "use_sliding_window", where, True):  # (Qwen2's and Qwen3's switch)
    bounds.append((whole_number(value, "sliding_window", where), f"its sliding window (sliding_window={value}), "
                   "which jaxspec applies to Phi-3 and Mistral models only: within one window attention is the same"))
  context = bounded_context(context, "max_position_embeddings", bounds, log, requested, rope_context(scaling))
  return context, (window if window < context else 0)


# What each RoPE scaling's settings hold beside the base (`rope_parameters` carries the base too): transformers'
# linear and llama3, and jaxspec's own "factors" (per-frequency divisors, as read from a GGUF file's rope_freqs).
_ROPE_KEYS = {"linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
              "factors": ("factors",)}


def _rope(cfg: dict) -> tuple[float, tuple]:
  """The RoPE base and scaling (`LlamaConfig.rope_theta`, `rope_scaling`); scalings other than linear, llama3,
  longrope and yarn (dynamic NTK, which depends on the sequence length) are refused."""
  # transformers 5 writes the base and the scaling together under `rope_parameters`; older configs write
  # `rope_theta` and `rope_scaling` at the top level.
  theta, scaling = cfg.get("rope_theta"), ()
  for key in ("rope_scaling", "rope_parameters"):
    block = cfg.get(key)
    if block is None:
      continue
    if not isinstance(block, dict):
      raise ModelLoadError(f"config.json has {key}={block!r}, not the object transformers writes there; fix the "
                           "config or download it again.")
    kind = block.get("rope_type", block.get("type"))
    if kind in ("longrope", "su") or (kind == "yarn" and _family(cfg, "phi3")):
      # Phi-3's LongRoPE ("su" its first name; transformers' Phi-3 reads "yarn" as LongRoPE too)
      scaling = _longrope(cfg, block, key)
    elif kind == "yarn":
      scaling = _yarn(cfg, block, key)
    elif kind in _ROPE_KEYS:
      missing = [k for k in _ROPE_KEYS[kind] if k not in block]
      if missing:
        raise ModelLoadError(f"config.json asks for RoPE scaling {kind!r} ({key}={block}) without "
                             f"{', '.join(missing)}; fix the config or download it again.")
      scaling = rope_scaling({"rope_type": kind, **{k: block[k] for k in _ROPE_KEYS[kind]}})
    elif kind not in (None, "default"):
      raise ModelLoadError(f"config.json asks for RoPE scaling {kind!r} ({key}={block}); jaxspec implements plain "
                           "RoPE and the scalings linear, llama3, longrope and yarn, so this model's positions would "
                           "be encoded wrongly.")
    if theta is None and key == "rope_parameters":
      theta = block.get("rope_theta")
  return positive_number(10000.0 if theta is None else theta, "rope_theta", "config.json"), scaling


def _longrope(cfg: dict, block: dict, key: str) -> tuple:
  """`LlamaConfig.rope_scaling` for LongRoPE: the factors, the original context and the attention factor, which
  transformers derives from the context's growth when the config does not give it."""
  where = "config.json"
  missing = [k for k in ("short_factor", "long_factor") if not isinstance(block.get(k), (list, tuple))]
  # transformers takes the top-level original_max_position_embeddings over the block's (its rope code reads the
  # config's attribute), and Phi3Config always has one (4096 by default): a Phi-3 block's own value is never read.
  original = cfg.get("original_max_position_embeddings")
  if original is None:
    original = 4096 if _family(cfg, "phi3") else block.get("original_max_position_embeddings")
  if original is None:
    missing.append("original_max_position_embeddings")
  if missing:
    raise ModelLoadError(f"config.json asks for RoPE scaling 'longrope' ({key}) without {', '.join(missing)}; fix "
                         "the config or download it again.")
  original = whole_number(original, "original_max_position_embeddings", where)
  factor = block.get("attention_factor")
  if factor is None:
    growth = block.get("factor")
    if growth is None:
      growth = whole_number(_max_positions(cfg), "max_position_embeddings", where) / original
    growth = positive_number(growth, "factor", where)
    factor = math.sqrt(1 + math.log(growth) / math.log(original)) if growth > 1 else 1.0
  return rope_scaling({"rope_type": "longrope", "short_factor": block["short_factor"],
                       "long_factor": block["long_factor"], "original_max_position_embeddings": original,
                       "attention_factor": positive_number(factor, "attention_factor", where)})


def _yarn(cfg: dict, block: dict, key: str) -> tuple:
  """`LlamaConfig.rope_scaling` for YaRN, with what transformers derives where the config is silent: the factor
  from the context's growth, beta_fast 32 and beta_slow 1, truncation, and the attention factor from the factor (and
  DeepSeek's mscale / mscale_all_dim)."""
  where = "config.json"
  original = _or_default(cfg, "original_max_position_embeddings", block.get("original_max_position_embeddings"))
  if original is None:  # (the top-level value first, as for LongRoPE)
    raise ModelLoadError(f"config.json asks for RoPE scaling 'yarn' ({key}) without original_max_position_embeddings; "
                         "fix the config or download it again.")
  original = whole_number(original, "original_max_position_embeddings", where)
  factor = block.get("factor")
  if factor is None:
    factor = whole_number(_or_default(cfg, "max_position_embeddings", 2048), "max_position_embeddings",
                          where) / original
  factor = positive_number(factor, "factor", where)
  mscale = lambda scale, m=1.0: 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0  # noqa: E731
  attention = block.get("attention_factor")
  if attention is None:
    m, m_all = block.get("mscale"), block.get("mscale_all_dim")
    attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
  return rope_scaling({"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original,
                       "beta_fast": positive_number(block.get("beta_fast") or 32, "beta_fast", where),
                       "beta_slow": positive_number(block.get("beta_slow") or 1, "beta_slow", where),
                       "truncate": bool(block.get("truncate", True)),
                       "attention_factor": positive_number(attention, "attention_factor", where)})


def model_entries(cfg) -> dict:
  """config.json's entries that name the architecture and what sets it apart from plain LLaMA (biases, RoPE scaling),
  the inverse of `config_from_hf`: Qwen3 for normed queries and keys, Phi-3 for partial rotary embeddings, Mistral for
  a sliding window, Qwen2 for q/k/v biases alone, LLaMA with attention_bias / mlp_bias otherwise. A model whose RoPE
  scaling came from a GGUF file's rope_freqs gets jaxspec's own rope_type "factors", which transformers refuses as
  unknown rather than computing another model.

  Raises:
    InputError: biases no transformers architecture has together (q/k/v without the output's, plus MLP biases; any
      with partial rotary embeddings or a sliding window).
  """
  if cfg.qk_norm:  # Qwen3: LLaMA with q_norm and k_norm; attention_bias puts biases on q, k, v and o
    if cfg.rotary_dim or cfg.sliding_window or cfg.mlp_bias or cfg.qkv_bias != cfg.o_bias:
      raise InputError("A model with normed queries and keys and partial rotary embeddings, a sliding window, MLP "
                       "biases or attention biases on some projections only has no Hugging Face architecture; it "
                       "cannot be written as a folder.")
    out = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": cfg.qkv_bias,
           "use_sliding_window": False}
  elif (cfg.rotary_dim or cfg.sliding_window) and (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias):
    raise InputError(f"A model with {'partial rotary embeddings' if cfg.rotary_dim else 'a sliding window'} and "
                     "biases has no Hugging Face architecture; it cannot be written as a folder.")
  elif cfg.rotary_dim:  # only transformers' Phi-3 turns part of each head
    # (Phi-3's config defaults its padding id to 32000, which transformers refuses for a smaller vocabulary)
    out = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
           "partial_rotary_factor": cfg.rotary_dim / cfg.head_dim, "pad_token_id": None,
           "sliding_window": cfg.sliding_window or None}
  elif cfg.sliding_window:  # Mistral: LLaMA with a window
    out = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": cfg.sliding_window}
  elif cfg.qkv_bias and not cfg.o_bias and not cfg.mlp_bias:
    out = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False}
  elif cfg.qkv_bias != cfg.o_bias:
    raise InputError(f"A model with biases on {'q/k/v' if cfg.qkv_bias else 'the attention output'} only and MLP "
                     "biases has no Hugging Face architecture; it cannot be written as a folder.")
  else:
    out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    if cfg.qkv_bias or cfg.mlp_bias:
      out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
  if cfg.rope_scaling:
    out["rope_scaling"] = dict(cfg.rope_scaling)
    if out["rope_scaling"].get("rope_type") == "longrope":  # transformers reads the top-level one (Phi-3: 4096 if none)
      out["original_max_position_embeddings"] = out["rope_scaling"]["original_max_position_embeddings"]
  return out


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_NAMES = {
    "input_layernorm.weight": ("attn_norm", "scale"),
    "post_attention_layernorm.weight": ("mlp_norm", "scale"),
    "self_attn.q_proj.weight": ("attn", "q", "kernel"),
    "self_attn.k_proj.weight": ("attn", "k", "kernel"),
    "self_attn.v_proj.weight": ("attn", "v", "kernel"),
    "self_attn.o_proj.weight": ("attn", "o", "kernel"),
    "mlp.gate_proj.weight": ("mlp", "gate", "kernel"),
    "mlp.up_proj.weight": ("mlp", "up", "kernel"),
    "mlp.down_proj.weight": ("mlp", "down", "kernel"),
    **{f"self_attn.{p}_proj.bias": ("attn", p, "bias") for p in "qkvo"},
    **{f"mlp.{p}_proj.bias": ("mlp", p, "bias") for p in ("gate", "up", "down")},
    "self_attn.q_norm.weight": ("attn", "q_norm", "scale"),  # Qwen3
    "self_attn.k_norm.weight": ("attn", "k_norm", "scale"),
}

# Phi-3 holds the q, k and v projections in one matrix, and the MLP's gate and up projections in another (their rows
# in that order); the loaders split them into LLaMA's.
_FUSED = {"self_attn.qkv_proj.weight": ("attn", ("q", "k", "v")), "mlp.gate_up_proj.weight": ("mlp", ("gate", "up"))}


# Biases of the tensors outside the layers that jaxspec reads; biases elsewhere outside the layers (a vision tower's,
# say) belong to parts jaxspec does not run, and are skipped with the rest of those parts.
_READ_BIASES = ("model.embed_tokens.bias", "model.norm.bias", "lm_head.bias")


def _target(name: str, cfg: LlamaConfig):
  """The param path of a tensor name; None for a tensor jaxspec does not use.

  Raises:
    ModelLoadError: a bias the config does not give the model (in the layers, or on the embedding, final norm or
      output head), or a layer parameter jaxspec's LLaMA lacks (e.g. q_norm where config.json does not describe
      Qwen3): skipping it would run a different function from the model's.
  """
  if name in _READ_BIASES:
    raise ModelLoadError(f"The weights hold {name!r}; jaxspec's LLaMA has no bias there, so this model cannot run "
                         "correctly.")
  m = _LAYER.fullmatch(name)
  if m and name.endswith(".bias") and m.group(2) in _NAMES:
    part = _NAMES[m.group(2)][1]
    if not {"q": cfg.qkv_bias, "k": cfg.qkv_bias, "v": cfg.qkv_bias, "o": cfg.o_bias}.get(part, cfg.mlp_bias):
      raise ModelLoadError(f"The weights hold {name!r}, a bias config.json does not give this model (attention_bias, "
                           "mlp_bias, or model_type qwen2 for q/k/v biases); the config and the weights describe "
                           "different models, so it cannot run correctly.")
  if name == "model.embed_tokens.weight":
    return ("embed", "embedding")
  if name == "model.norm.weight":
    return ("final_norm", "scale")
  if name == "lm_head.weight":
    return ("lm_head", "kernel")
  if m and m.group(2) in _NAMES:
    if _NAMES[m.group(2)][1] in ("q_norm", "k_norm") and not cfg.qk_norm:
      raise ModelLoadError(f"The weights hold {name!r}, a norm of queries or keys that config.json does not give "
                           "this model (Qwen3ForCausalLM has them); the config and the weights describe different "
                           "models, so it cannot run correctly.")
    return (f"layers_{int(m.group(1))}", *_NAMES[m.group(2)])
  if m and m.group(2) in _FUSED:
    return (f"layers_{int(m.group(1))}", *_FUSED[m.group(2)])
  if m and m.group(2).endswith((".weight", ".bias")):
    raise ModelLoadError(f"The weights hold {name!r}, a layer parameter jaxspec's LLaMA does not have; this is "
                         f"another architecture than {', '.join(SUPPORTED)}.")
  return None  # buffers such as an old rotary_emb.inv_freq, which jaxspec computes itself


# Folders jaxspec's training writes that are parts to add to a target, not models: their config.json key, a field
# jaxspec always writes under it, what they are, how to use them.
_JAXSPEC_PARTS = (
    ("jaxspec_draft", "format", "a distilled draft that shares its target's embedding",
     "pass it to a draft method, e.g. --method spec:draft=FOLDER"),
    ("jaxspec_eagle", "format", "a feature-level (EAGLE) draft", "pass it as --method eagle:draft=FOLDER"),
    ("bpd", "num_heads", "BPD heads", "pass them as --method bpd:heads=FOLDER"),
    ("ngram", "order", "the n-gram tables of BPD lattice rescoring", "pass them as --method bpd-ngram:rescore=FOLDER"),
    ("lora", "rank", "a LoRA adapter", "pass it as --method cllm:lora=FOLDER"),
)


def check_part(folder, key: str, *, models_ok: bool = False) -> None:
  """Raises `ModelLoadError` when `folder` holds another kind of thing than the jaxspec part `key` names (a key of
  `_JAXSPEC_PARTS`): another part, or (unless `models_ok`) a whole model, saying where that one goes. Does nothing
  without a readable config.json: the caller's own checks say what is missing or damaged. A file in place of the
  folder (DIR/heads.safetensors for DIR) is named, with the folder that holds it, as --model does for a model's."""
  want = next(what for k, _, what, _ in _JAXSPEC_PARTS if k == key)
  if Path(folder).is_file():  # (said "no BPD heads in DIR/heads.safetensors: train them", or "unreadable")
    parent = Path(folder).parent
    raise ModelLoadError(f"{folder} is a file, not a folder of {want}" + (
        f": pass the folder that holds it ({parent})." if (parent / "config.json").is_file() else "."))
  try:
    raw = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, ValueError, RecursionError):
    return
  if not isinstance(raw, dict) or isinstance(raw.get(key), dict):
    return
  for k, field, what, use in _JAXSPEC_PARTS:
    entry = raw.get(k)
    if isinstance(entry, dict) and field in entry:
      if k == "jaxspec_draft" and entry.get("embeddings") == "included":  # a whole model
        what, use = "a distilled draft model", "pass it to a draft method (--method spec:draft=FOLDER) or as --model"
      raise ModelLoadError(f"{folder} holds {what}, not {want}: {use}.")
  if not models_ok and ("architectures" in raw or "model_type" in raw):
    raise ModelLoadError(f"{folder} holds a model (a Hugging Face config.json), not {want}: load it as a model "
                         "(--model FOLDER, or load_model(FOLDER) in Python).")


def read_hf_config(folder: str) -> dict:
  """A model folder's `config.json`, checked for everything that needs no weights: that it is readable, a model
  rather than a part jaxspec's training wrote, and of a family and variant jaxspec runs.

  Raises:
    ModelLoadError: what is wrong, and what to do.
  """
  cfg_path = os.path.join(folder, "config.json")
  if not os.path.isfile(cfg_path):
    raise ModelLoadError(f"{folder!r} has no config.json: pass a Hugging Face model folder or a .gguf file.")
  try:
    with open(cfg_path) as f:
      raw = json.load(f)
  except OSError as e:
    raise ModelLoadError(f"Could not read {cfg_path!r}: {e.strerror or e}.") from e
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise ModelLoadError(f"Could not read {cfg_path!r} ({type(e).__name__}: {e}); the file is damaged: restore "
                         "it from the model's original folder.") from e
  if not isinstance(raw, dict):
    raise ModelLoadError(f"{cfg_path!r} holds a JSON {type(raw).__name__}, not the object of a Hugging Face model "
                         "config.")
  archs = raw.get("architectures")
  if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
    # (a string was read as its letters, and refused as "describes LlamaForCausalLM; jaxspec loads LlamaForCausalLM")
    raise ModelLoadError(f"{cfg_path!r} has architectures={archs!r}, not the list of class names transformers writes "
                         'there (e.g. ["LlamaForCausalLM"]): fix the config or download it again.')
  for key, field, what, use in _JAXSPEC_PARTS:
    entry = raw.get(key)
    # Only jaxspec's own entries (other configs may use the same key, e.g. ProphetNet's integer "ngram"). A draft
    # saved with its own embeddings is a complete model; one that shares the target's is a part.
    if isinstance(entry, dict) and field in entry and entry.get("embeddings") != "included":
      raise ModelLoadError(f"{folder!r} holds {what}, not a model of its own: {use}.")
  from jaxspec.loading import t5_hf
  if t5_hf.is_t5_config(raw):
    t5_hf.config_from_hf(raw)
  else:
    config_from_hf(raw)
  return raw


def weight_files(folder: str) -> list[str]:
  """The safetensors files that hold a folder's model: those `model.safetensors.index.json` lists, else
  `model*.safetensors`, else the folder's only `*.safetensors` file.

  Other files (a consolidated copy, a draft's vocab_ids.safetensors, a stray export) are not read: their tensors
  would override the model's own.

  Raises:
    ModelLoadError: no weights, shards the index lists but the folder lacks, or several files none of which is named
      as a model's.
  """
  index = os.path.join(folder, "model.safetensors.index.json")
  if os.path.isfile(index):
    try:
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
      names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
      raise ModelLoadError(f"Could not read {index!r} ({type(e).__name__}: {e}); it should map tensor names to "
                           "shard files under \"weight_map\": download it again.") from e
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
      raise ModelLoadError(f"{index!r} lists shards that are not in {folder!r}: {missing[:3]}; download them.")
    return [os.path.join(folder, n) for n in names]
  every = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
  model = [n for n in every if n.startswith("model")]
  if model:
    return [os.path.join(folder, n) for n in model]
  if len(every) == 1:
    return [os.path.join(folder, every[0])]
  if not every:
    raise ModelLoadError(f"{folder!r} has no *.safetensors weights (PyTorch .bin files are not read): convert them "
                         "with transformers (`AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out)` "
                         "writes safetensors) and load that folder.")
  raise ModelLoadError(f"{folder!r} holds {every} but no model.safetensors, model-*.safetensors or "
                       "model.safetensors.index.json, so which files hold the model is unclear: name its file "
                       "model.safetensors, or move the others out.")


def tensor_names(path: str) -> list[str]:
  """The tensor names in a safetensors file's header.

  Raises:
    ModelLoadError: an unreadable header.
  """
  from safetensors import safe_open

  try:
    with safe_open(path, framework="numpy") as f:
      return list(f.keys())
  except Exception as e:  # safetensors raises its own error types on damaged headers
    raise ModelLoadError(f"Could not read {path!r} ({type(e).__name__}: {e}); the file may be truncated or corrupt: "
                         "download or export it again.") from e


def check_weights(folder: str, raw: dict) -> list[str]:
  """The folder's weight files (`weight_files`), after reading their headers only: each is readable, no tensor
  name is in two of them (which file won would be up to file order), and, for a LLaMA-family `raw` config, no tensor
  is one jaxspec would have to skip (a bias, a layer parameter it lacks).

  Raises:
    ModelLoadError: what is wrong, and what to do.
  """
  from jaxspec.loading.t5_hf import is_t5_config

  llama = not is_t5_config(raw)
  cfg = config_from_hf(raw) if llama else None
  weights = weight_files(folder)
  seen: dict[str, str] = {}
  for path in weights:
    for name in tensor_names(path):
      if name in seen:
        raise ModelLoadError(f"Tensor {name!r} is in both {seen[name]!r} and {path!r}; one of them is not part of "
                             "the model (e.g. a leftover export): move it out of the folder.")
      seen[name] = path
      if llama:
        _target(name, cfg)
  if llama:
    layers = cfg.n_layers
    beyond = sorted({int(m.group(1)) for m in map(_LAYER.fullmatch, seen) if m and int(m.group(1)) >= layers})
    if beyond:
      raise more_layers(repr(folder), layers, beyond[-1] + 1, "num_hidden_layers in config.json")
  return weights


def check_hf_folder(folder: str) -> dict:
  """Checks all of a model folder that can be checked without reading its weights (`read_hf_config`,
  `check_weights`: the config and the weight files' headers); returns the config.

  Raises:
    ModelLoadError: what is wrong, and what to do.
  """
  raw = read_hf_config(folder)
  check_weights(folder, raw)
  return raw


def load_hf(folder: str, *, dtype: str = "float32", scan_layers: bool = False, param_dtype: str | None = None,
            context: int | None = None) -> tuple[LlamaLM, dict]:
  """Loads a Hugging Face LLaMA-family checkpoint folder, one tensor at a time (T5 folders go to
  `jaxspec.loading.t5_hf.load_t5`). Weights are held in `param_dtype` (default: `dtype`) and computed in `dtype`.
  `context`: the model's context instead of the default (`jaxspec.loading.errors.bounded_context`).

  Raises:
    ModelLoadError: a missing or unreadable config or weights file, or an unsupported architecture.
  """
  from safetensors import safe_open

  from jaxspec.loading.t5_hf import is_t5_config, load_t5

  raw = read_hf_config(folder)
  files.check_export_tag(folder, ["model.safetensors"])  # a folder jaxspec exported: weights of its config
  if is_t5_config(raw):  # an encoder-decoder
    if scan_layers:
      raise ModelLoadError(f"{folder!r} is an encoder-decoder (T5), whose layers load one by one only: leave out "
                           "--scan-layers.")
    if context is not None:
      raise ContextError(f"{folder!r} is an encoder-decoder (T5), whose context is not set when it loads: leave out "
                         "--context (context=); --max-len bounds the decoder's tokens.")
    return load_t5(folder, raw, dtype=dtype, param_dtype=param_dtype)
  param_dtype = param_dtype or dtype
  cfg = dataclasses.replace(config_from_hf(raw, log=True, context=context), dtype=dtype, param_dtype=param_dtype,
                            scan_layers=scan_layers)
  weights = check_weights(folder, raw)  # before any weight is read: a large model takes minutes to load
  params: dict = {}
  unread = []
  for path in weights:
    try:
      # "flax" hands back jax arrays, which also covers bfloat16 checkpoints that numpy cannot represent.
      with safe_open(path, framework="flax") as f:
        for name in f.keys():
          target = _target(name, cfg)
          if target is None and not (_LAYER.fullmatch(name) or name.endswith("inv_freq")):
            unread.append(name)  # not a layer's buffer (a rotary table jaxspec computes itself)
          if target is None or (target[0] == "lm_head" and cfg.tie_embeddings):
            continue
          refuse_non_float(f.get_slice(name).get_dtype(), name, path)  # the header's "F32", "BF16", "I8", ...
          tensor = f.get_tensor(name)
          check_finite(tensor, name, repr(path))
          for key, w in split_fused(target, tensor.astype(param_dtype), cfg, name):
            if key[-1] == "kernel":
              w = w.T  # torch Linear [out, in] -> kernel [in, out]
            node = params
            for k in key[:-1]:
              node = node.setdefault(k, {})
            node[key[-1]] = jnp.asarray(w)
    except ModelLoadError:
      raise
    except Exception as e:  # safetensors raises its own error types on damaged headers
      raise ModelLoadError(f"Could not read {path!r} ({type(e).__name__}: {e}); the file may be truncated or corrupt: "
                           "download or export it again.") from e
  check_complete(params, cfg, folder, name_of=hf_tensor_name, hint=lambda missing: _missing_hint(folder, missing))
  unread_tensors(repr(folder), unread)
  return LlamaLM(cfg), (stack_layers(params, cfg.n_layers) if scan_layers else params)


def _missing_hint(folder: str, missing: list[tuple]) -> str:
  """What a folder that lacks tensors may need, for `check_complete`'s message."""
  if ("lm_head", "kernel") in missing:
    return (" config.json's tie_word_embeddings is false or absent, and no lm_head.weight is there: if the model "
            "shares its embedding as its output head, set tie_word_embeddings to true.")
  if os.path.isfile(os.path.join(folder, "model.safetensors.index.json")):
    return " model.safetensors.index.json may leave them out: download the model's index and shards again."
  return " The weights may be another model's than config.json's: download the folder again."


_FLOAT_KINDS = ("F64", "F32", "F16", "BF16")  # safetensors dtype names jaxspec reads as weights


def hf_tensor_name(key: tuple[str, ...]) -> str:
  """The Hugging Face tensor name of a jaxspec param path, e.g. ("layers_3", "attn", "q", "kernel")."""
  fixed = {("embed", "embedding"): "model.embed_tokens.weight", ("final_norm", "scale"): "model.norm.weight",
           ("lm_head", "kernel"): "lm_head.weight"}
  if key in fixed:
    return fixed[key]
  inverse = {v: k for k, v in _NAMES.items()}
  return f"model.layers.{int(key[0].split('_')[1])}.{inverse[key[1:]]}"


def save_hf(folder: str, model: LlamaLM, params: dict) -> None:
  """Writes params as a Hugging Face LLaMA folder (config.json + model.safetensors); the inverse of `load_hf`."""
  cfg = model.cfg
  tensors = {}
  for key, leaf in _flatten(unstack_layers(params)):
    arr = np.asarray(leaf, np.float32)
    tensors[hf_tensor_name(key)] = np.ascontiguousarray(arr.T if key[-1] == "kernel" else arr)
  if cfg.rotary_dim:  # written as Phi-3, whose projections are fused
    for i in range(cfg.n_layers):
      for fused, (group, parts) in _FUSED.items():
        names = [f"model.layers.{i}.{'self_attn' if group == 'attn' else 'mlp'}.{p}_proj.weight" for p in parts]
        tensors[f"model.layers.{i}.{fused}"] = np.concatenate([tensors.pop(n) for n in names])
  hf_cfg = {
      **model_entries(cfg), "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.d_ff,
      "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
      "max_position_embeddings": cfg.max_seq_len, "hidden_act": "silu", "torch_dtype": "float32"}
  tag = {files.EXPORT_TAG: files.export_tag(tensors)}  # the pair's link (files.check_export_tag)
  hf_cfg.update(tag)
  pt = {"format": "pt", **tag}  # transformers 4.x refuses metadata without a format
  files.write_files(folder, {"model.safetensors": lambda tmp: files.save_safetensors(tensors, tmp, pt),
                             "config.json": files.json_writer(hf_cfg, indent=2)})


def _flatten(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v
