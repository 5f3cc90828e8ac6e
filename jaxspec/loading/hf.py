"""LLaMA-family weights from a Hugging Face folder: `config.json` plus `*.safetensors`."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re

import jax.numpy as jnp
import numpy as np

from jaxspec.loading.errors import ModelLoadError
from jaxspec.loading.gguf_loader import check_complete
from jaxspec.models.llama import LlamaConfig, LlamaLM, stack_layers, unstack_layers

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM")


def config_from_hf(cfg: dict) -> LlamaConfig:
  """A `LlamaConfig` from a transformers `config.json` dict."""
  archs = cfg.get("architectures") or []
  if archs and not set(archs) & set(SUPPORTED):
    raise ModelLoadError(f"config.json describes {archs}; jaxspec loads {', '.join(SUPPORTED)}.")
  scaling = cfg.get("rope_scaling")
  if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
    raise ModelLoadError(f"rope_scaling {scaling} is not supported yet.")
  try:
    n_heads = int(cfg["num_attention_heads"])
    d_model = int(cfg["hidden_size"])
    return LlamaConfig(
        vocab_size=int(cfg["vocab_size"]), d_model=d_model, n_layers=int(cfg["num_hidden_layers"]),
        n_heads=n_heads, n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        head_dim=int(cfg.get("head_dim") or d_model // n_heads), d_ff=int(cfg["intermediate_size"]),
        rope_theta=float(cfg.get("rope_theta", 10000.0)), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_seq_len=int(cfg.get("max_position_embeddings", 2048)))
  except KeyError as e:
    raise ModelLoadError(f"config.json lacks {e.args[0]!r}, which a LLaMA-family model needs.") from e


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
}


def _target(name: str):
  if name == "model.embed_tokens.weight":
    return ("embed", "embedding")
  if name == "model.norm.weight":
    return ("final_norm", "scale")
  if name == "lm_head.weight":
    return ("lm_head", "kernel")
  m = _LAYER.fullmatch(name)
  if m and m.group(2) in _NAMES:
    return (f"layers_{int(m.group(1))}", *_NAMES[m.group(2)])
  return None


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


def load_hf(folder: str, *, dtype: str = "float32", scan_layers: bool = False,
            param_dtype: str | None = None) -> tuple[LlamaLM, dict]:
  """Loads a Hugging Face LLaMA-family checkpoint folder, one tensor at a time (T5 folders go to
  `jaxspec.loading.t5_hf.load_t5`). Weights are held in `param_dtype` (default: `dtype`) and computed in `dtype`.

  Raises:
    ModelLoadError: a missing or unreadable config or weights file, or an unsupported architecture.
  """
  from safetensors import safe_open

  cfg_path = os.path.join(folder, "config.json")
  if not os.path.isfile(cfg_path):
    raise ModelLoadError(f"{folder!r} has no config.json: pass a Hugging Face model folder or a .gguf file.")
  try:
    with open(cfg_path) as f:
      raw = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ModelLoadError(f"Could not read {cfg_path!r}: {e}") from e
  if not isinstance(raw, dict):
    raise ModelLoadError(f"{cfg_path!r} holds a JSON {type(raw).__name__}, not the object of a Hugging Face model "
                         "config.")
  for key, field, what, use in _JAXSPEC_PARTS:
    entry = raw.get(key)
    # Only jaxspec's own entries (other configs may use the same key, e.g. ProphetNet's integer "ngram"). A draft
    # saved with its own embeddings is a complete model; one that shares the target's is a part.
    if isinstance(entry, dict) and field in entry and entry.get("embeddings") != "included":
      raise ModelLoadError(f"{folder!r} holds {what}, not a model of its own: {use}.")
  from jaxspec.loading.t5_hf import is_t5_config, load_t5
  if is_t5_config(raw):  # an encoder-decoder
    if scan_layers:
      raise ModelLoadError(f"{folder!r} is an encoder-decoder (T5), whose layers load one by one only: leave out "
                           "--scan-layers.")
    return load_t5(folder, raw, dtype=dtype, param_dtype=param_dtype)
  param_dtype = param_dtype or dtype
  cfg = dataclasses.replace(config_from_hf(raw), dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers)
  files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
  if not files:
    raise ModelLoadError(f"{folder!r} has no *.safetensors weights (PyTorch .bin files are not read).")
  params: dict = {}
  for path in files:
    try:
      # "flax" hands back jax arrays, which also covers bfloat16 checkpoints that numpy cannot represent.
      with safe_open(path, framework="flax") as f:
        for name in f.keys():
          target = _target(name)
          if target is None or (target[0] == "lm_head" and cfg.tie_embeddings):
            continue
          w = f.get_tensor(name).astype(param_dtype)
          if target[-1] == "kernel":
            w = w.T  # torch Linear [out, in] -> kernel [in, out]
          node = params
          for k in target[:-1]:
            node = node.setdefault(k, {})
          node[target[-1]] = jnp.asarray(w)
    except ModelLoadError:
      raise
    except Exception as e:  # safetensors raises its own error types on damaged headers
      raise ModelLoadError(f"Could not read {path!r} ({type(e).__name__}: {e}); the file may be truncated or corrupt: "
                           "download or export it again.") from e
  check_complete(params, cfg, folder)
  return LlamaLM(cfg), (stack_layers(params, cfg.n_layers) if scan_layers else params)


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
  from safetensors.numpy import save_file

  cfg = model.cfg
  os.makedirs(folder, exist_ok=True)
  tensors = {}
  for key, leaf in _flatten(unstack_layers(params)):
    arr = np.asarray(leaf, np.float32)
    tensors[hf_tensor_name(key)] = np.ascontiguousarray(arr.T if key[-1] == "kernel" else arr)
  save_file(tensors, os.path.join(folder, "model.safetensors"))
  hf_cfg = {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.d_ff,
      "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
      "max_position_embeddings": cfg.max_seq_len, "hidden_act": "silu", "torch_dtype": "float32"}
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=2)


def _flatten(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v
