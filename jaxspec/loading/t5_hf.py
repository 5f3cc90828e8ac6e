"""T5-family weights from a Hugging Face folder (`config.json` + `*.safetensors`), and the way back.

Reads `T5ForConditionalGeneration` checkpoints: T5 v1.1 (gated-GELU, untied head) and the original T5 (ReLU, tied
head). Tensor names follow transformers: `encoder.block.{i}.layer.{j}...`, `decoder.block.{i}.layer.{j}...`,
`shared.weight`, `lm_head.weight`; the relative position tables sit in block 0 of each stack.

The head follows transformers 5, which reads both its own folders and older ones: the hidden state is scaled by
d_model^-1/2 before the head when `scale_decoder_outputs` is true, or, where a config lacks that key (transformers
4), unless `tie_word_embeddings` is false (MT5, `model_type: mt5`, is never scaled); the head is `shared` unless the
checkpoint holds an `lm_head.weight` that differs from it. transformers 5 writes `tie_word_embeddings: true` for
every T5, untied v1.1 included, so neither can be read from that key alone. jaxspec's `T5Config.tie_embeddings`
means tied and scaled; the two other combinations load as an untied head: a copy of `shared` (tied, unscaled: what
transformers 5 makes of a new `T5Config(tie_word_embeddings=False)`) or `lm_head` with the scale folded in (untied,
scaled).
"""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import numpy as np

from jaxspec import files
from jaxspec.loading.errors import (ModelLoadError, _damaged, check_finite, flag, model_config, more_layers,
                                     positive_number, unread_tensors, whole_number)
from jaxspec.loading.hf import _flatten, check_weights, refuse_non_float, refuse_quantized
from jaxspec.models.t5 import T5Config, T5LM

ARCHITECTURES = ("T5ForConditionalGeneration", "T5Model", "MT5ForConditionalGeneration")

_ATTN = {"q": "q", "k": "k", "v": "v", "o": "o"}
_FF = {"wi_0": "wi_0", "wi_1": "wi_1", "wi": "wi", "wo": "wo"}
_ENC = re.compile(r"encoder\.block\.(\d+)\.layer\.(\d)\.(.+)\.weight")
_DEC = re.compile(r"decoder\.block\.(\d+)\.layer\.(\d)\.(.+)\.weight")


def is_t5_config(raw: dict) -> bool:
  return raw.get("model_type") in ("t5", "mt5") or bool(set(raw.get("architectures") or []) & set(ARCHITECTURES))


def config_from_hf(raw: dict) -> T5Config:
  """A `T5Config` from a transformers T5 `config.json` dict."""
  refuse_quantized(raw)
  try:
    proj = raw.get("feed_forward_proj", "relu")
    if proj in ("gated-gelu", "gated-gelu_new"):
      ff = "gated-gelu"
    elif proj == "relu":
      ff = "relu"
    else:
      raise ModelLoadError(f"feed_forward_proj={proj!r} is not supported; jaxspec reads 'gated-gelu' and 'relu'.")
    where = "config.json"
    num = lambda key, minimum=1: whole_number(raw[key], key, where, minimum)
    opt = lambda key, default, minimum=1: whole_number(default if raw.get(key) is None else raw[key], key, where,
                                                       minimum)
    n_layers = num("num_layers")
    buckets = opt("relative_attention_num_buckets", 32, minimum=4)
    vocab, start = num("vocab_size"), opt("decoder_start_token_id", 0, minimum=0)
    if start >= vocab:  # embedded as NaN inside the program: every answer came out as token 0, without a word
      raise _damaged(where, "decoder_start_token_id", start, f"an id in the model's vocabulary (vocab_size {vocab}: "
                     f"ids 0 to {vocab - 1})")
    return model_config(
        T5Config, where,
        vocab_size=vocab, d_model=num("d_model"), d_kv=num("d_kv"),
        d_ff=num("d_ff"), n_heads=num("num_heads"), n_enc_layers=n_layers,
        n_dec_layers=opt("num_decoder_layers", n_layers),
        # T5's buckets: half per direction in the encoder, and half of those exact; the rest are log-spaced from
        # there to the max distance. Fewer than 4 leaves no exact bucket (a division by zero); a max distance equal
        # to the decoder's exact ones gives a log(1) = 0 denominator, and one below them buckets that run backwards.
        rel_buckets=buckets, rel_max_distance=opt("relative_attention_max_distance", 128, minimum=buckets // 2 + 1),
        norm_eps=positive_number(raw.get("layer_norm_epsilon", 1e-6), "layer_norm_epsilon", where), ff=ff,
        tie_embeddings=_scales_output(raw),  # `load_t5` settles it with the checkpoint's lm_head.weight
        decoder_start_id=start,
        max_seq_len=opt("n_positions", 2048))
  except KeyError as e:
    raise ModelLoadError(f"config.json lacks {e.args[0]!r}, which a T5 model needs.") from e


def _scales_output(raw: dict) -> bool:
  """Whether transformers scales the decoder output by d_model^-1/2 before the head for this config."""
  if raw.get("scale_decoder_outputs") is not None:  # transformers >= 5 writes it for T5
    return flag(raw, "scale_decoder_outputs", "config.json", True)
  if raw.get("model_type") == "mt5":  # transformers 5's MT5 never scales (and writes tie_word_embeddings: true)
    return False
  return flag(raw, "tie_word_embeddings", "config.json", True)


def _target(name: str) -> tuple[str, ...] | None:
  """The jaxspec param path of a transformers T5 tensor name (None: a tensor jaxspec does not use)."""
  if name == "shared.weight":
    return ("shared", "embedding")
  if name == "lm_head.weight":
    return ("lm_head", "kernel")
  if name in ("encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"):
    return (name[:3] + "_norm", "scale")
  for rx, stack in ((_ENC, "enc"), (_DEC, "dec")):
    m = rx.fullmatch(name)
    if not m:
      continue
    i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
    if rest == "SelfAttention.relative_attention_bias":
      return (f"{stack}_bias", "embedding") if i == 0 else None
    parts = rest.split(".")
    if stack == "enc":
      sub = {0: ("attn", "attn_norm"), 1: ("mlp", "mlp_norm")}.get(j)
    else:
      sub = {0: ("self_attn", "self_norm"), 1: ("cross_attn", "cross_norm"), 2: ("mlp", "mlp_norm")}.get(j)
    if sub is None:
      return None
    if parts == ["layer_norm"]:
      return (f"{stack}_{i}", sub[1], "scale")
    if len(parts) == 2 and parts[0] in ("SelfAttention", "EncDecAttention") and parts[1] in _ATTN:
      return (f"{stack}_{i}", sub[0], _ATTN[parts[1]], "kernel")
    if len(parts) == 2 and parts[0] == "DenseReluDense" and parts[1] in _FF:
      return (f"{stack}_{i}", sub[0], _FF[parts[1]], "kernel")
  return None


# Tensors T5 checkpoints may hold that neither jaxspec nor transformers reads: the stacks' copies of the shared
# embedding, and a cross-attention position table older checkpoints still carry (transformers' ignore list).
_UNREAD = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
           "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")


def warn_unread(folder: str, names) -> None:
  """Warns of tensors jaxspec's T5 does not read (other than `_UNREAD`): transformers' T5 skips them too (with a
  warning), so the output is still transformers', but a model that needs them (biases, per-layer position tables)
  is another architecture."""
  unread_tensors(folder, [n for n in names if n not in _UNREAD and _target(n) is None], "jaxspec's T5 does not read",
                 "skipped, as transformers' T5 skips them: if the model needs them (biases, a position table per "
                 "layer), it is another architecture and its outputs will differ.")


def _source(key: tuple[str, ...]) -> str:
  """The transformers tensor name of a jaxspec param path (the inverse of `_target`)."""
  if key == ("shared", "embedding"):
    return "shared.weight"
  if key == ("lm_head", "kernel"):
    return "lm_head.weight"
  if key[0] in ("enc_norm", "dec_norm"):
    return f"{'encoder' if key[0] == 'enc_norm' else 'decoder'}.final_layer_norm.weight"
  if key[0] in ("enc_bias", "dec_bias"):
    stack = "encoder" if key[0] == "enc_bias" else "decoder"
    return f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
  stack, i = key[0].split("_")
  full = "encoder" if stack == "enc" else "decoder"
  index = ({"attn": 0, "attn_norm": 0, "mlp": 1, "mlp_norm": 1} if stack == "enc" else
           {"self_attn": 0, "self_norm": 0, "cross_attn": 1, "cross_norm": 1, "mlp": 2, "mlp_norm": 2})[key[1]]
  prefix = f"{full}.block.{i}.layer.{index}"
  if key[1].endswith("norm"):
    return f"{prefix}.layer_norm.weight"
  module = {"attn": "SelfAttention", "self_attn": "SelfAttention", "cross_attn": "EncDecAttention",
            "mlp": "DenseReluDense"}[key[1]]
  return f"{prefix}.{module}.{key[2]}.weight"


def _expected(model: T5LM) -> dict[tuple[str, ...], tuple[int, ...]]:
  """The parameter paths the model's config implies, with their shapes."""
  import jax
  shapes = jax.eval_shape(model.init_params, jax.random.key(0))
  return {tuple(k.key for k in path): tuple(x.shape)
          for path, x in jax.tree_util.tree_flatten_with_path(shapes)[0]}


def load_t5(folder: str, raw: dict, *, dtype: str = "float32", param_dtype: str | None = None) -> tuple[T5LM, dict]:
  """Loads a transformers T5 checkpoint folder whose `config.json` is `raw`.

  Raises:
    ModelLoadError: missing or unreadable weights, a missing tensor, or an unsupported variant.
  """
  from safetensors import safe_open

  param_dtype = param_dtype or dtype
  cfg = dataclasses.replace(config_from_hf(raw), dtype=dtype, param_dtype=param_dtype)
  weights = check_weights(folder, raw)  # before any weight is read
  params: dict = {}
  skipped = []
  for path in weights:
    try:
      with safe_open(path, framework="flax") as f:
        for name in f.keys():
          key = _target(name)
          if key is None:
            skipped.append(name)
            continue
          refuse_non_float(f.get_slice(name).get_dtype(), name, path)
          w = f.get_tensor(name)
          check_finite(w, name, repr(path))
          w = w.astype(param_dtype)
          if key[-1] == "kernel":
            w = w.T  # torch Linear [out, in] -> kernel [in, out]
          node = params
          for k in key[:-1]:
            node = node.setdefault(k, {})
          node[key[-1]] = jnp.asarray(w)
    except ModelLoadError:
      raise
    except Exception as e:  # safetensors raises its own error types on damaged headers
      raise ModelLoadError(f"Could not read {path!r} ({type(e).__name__}: {e}); the file may be truncated or "
                           "corrupt: download or export it again.") from e
  warn_unread(folder, skipped)
  params, cfg = _settle_head(params, cfg)
  model = T5LM(cfg)
  got = dict(_flatten(params))
  expected = _expected(model)
  missing = sorted(set(expected) - set(got))
  if missing:
    raise ModelLoadError(f"{folder!r} lacks {len(missing)} tensors of a {cfg.n_enc_layers}+{cfg.n_dec_layers}-layer "
                         f"T5, e.g. {_source(missing[0])!r}; the checkpoint is incomplete or of another model.")
  extra = sorted(set(got) - set(expected))
  for stack, layers, key in (("enc", cfg.n_enc_layers, "num_layers"), ("dec", cfg.n_dec_layers, "num_decoder_layers")):
    found = [int(k[0][len(stack) + 1:]) for k in extra if re.fullmatch(rf"{stack}_\d+", k[0])]
    if found and max(found) >= layers:
      raise more_layers(repr(folder), layers, max(found) + 1, f"{key} in config.json, for the {stack}oder")
  if extra:  # inside the layers: a tensor of the other feed-forward variant (wi beside wi_0 / wi_1)
    raise ModelLoadError(f"{folder!r} holds {_source(extra[0])!r}, which a T5 with feed_forward_proj "
                         f"{raw.get('feed_forward_proj', 'relu')!r} (as config.json says) does not have; the config "
                         "and the weights are of different variants.")
  for key, shape in expected.items():
    if tuple(got[key].shape) != shape:
      w = got[key].shape[::-1] if key[-1] == "kernel" else got[key].shape  # as the file stores it
      want = shape[::-1] if key[-1] == "kernel" else shape
      raise ModelLoadError(f"{folder!r}: {_source(key)} is {tuple(w)}, but config.json implies {tuple(want)}; the "
                           "config and the weights are of different models.")
  return model, params


def _settle_head(params: dict, cfg: T5Config) -> tuple[dict, T5Config]:
  """The head as transformers uses it (see the module docstring). `cfg.tie_embeddings` says whether the output is
  scaled; the head is tied when the checkpoint has no lm_head.weight or one equal to shared.weight."""
  head = params.pop("lm_head", None)
  shared = params.get("shared", {}).get("embedding")
  if shared is None:  # reported as a missing tensor by the caller
    return params, cfg
  scale = cfg.tie_embeddings
  tied = head is None or bool(jnp.array_equal(head["kernel"].T, shared))
  if tied and scale:
    return params, cfg
  if not tied and not scale:
    kernel = head["kernel"]
  elif tied:  # tied without the scale: an untied head holding a copy of shared
    kernel = jnp.array(shared.T)
  else:  # untied with the scale: the scale goes into the head
    kernel = (head["kernel"].astype(jnp.float32) * cfg.d_model ** -0.5).astype(head["kernel"].dtype)
  return {**params, "lm_head": {"kernel": kernel}}, dataclasses.replace(cfg, tie_embeddings=False)


def save_t5(folder: str, model: T5LM, params: dict, extra_config: dict | None = None) -> None:
  """Writes params as a transformers T5 folder (config.json + model.safetensors); the inverse of `load_t5`."""
  cfg = model.cfg
  tensors = {}
  for key, leaf in _flatten(params):
    arr = np.asarray(leaf, np.float32)
    tensors[_source(key)] = np.ascontiguousarray(arr.T if key[-1] == "kernel" else arr)
  hf = {
      "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": cfg.vocab_size,
      "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff, "num_heads": cfg.n_heads,
      "num_layers": cfg.n_enc_layers, "num_decoder_layers": cfg.n_dec_layers,
      "relative_attention_num_buckets": cfg.rel_buckets, "relative_attention_max_distance": cfg.rel_max_distance,
      "layer_norm_epsilon": cfg.norm_eps, "feed_forward_proj": "gated-gelu" if cfg.ff == "gated-gelu" else "relu",
      "is_gated_act": cfg.ff == "gated-gelu", "dense_act_fn": "gelu_new" if cfg.ff == "gated-gelu" else "relu",
      "tie_word_embeddings": cfg.tie_embeddings, "scale_decoder_outputs": cfg.tie_embeddings,
      "decoder_start_token_id": cfg.decoder_start_id,
      "pad_token_id": 0, "eos_token_id": 1, "n_positions": cfg.max_seq_len, "is_encoder_decoder": True,
      "dropout_rate": 0.0, "torch_dtype": "float32", **(extra_config or {})}
  tag = {files.EXPORT_TAG: files.export_tag(tensors)}  # the pair's link (files.check_export_tag)
  hf.update(tag)
  pt = {"format": "pt", **tag}  # transformers 4.x refuses metadata without a format
  files.write_files(folder, {"model.safetensors": lambda tmp: files.save_safetensors(tensors, tmp, pt),
                             "config.json": files.json_writer(hf, indent=2)})
