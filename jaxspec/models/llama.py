"""Decoder-only LLaMA-family transformer (RMSNorm, RoPE, grouped-query attention, SwiGLU) in Flax linen, with the
variants other families of the same shape use: bias terms (Qwen2's on q/k/v, LLaMA's attention_bias and mlp_bias)
and scaled RoPE (Llama 3.1+'s per-band scaling, linear interpolation, per-frequency factors).

One forward takes T new tokens with their positions and a `[B, T, T]` mask among them, attends to the committed
part of an explicit `KVCache`, and returns logits, final hidden states and the cache with the new keys and values
written. The same call serves prefill (causal mask), one-token steps, chains of k tokens and trees of N tokens
(ancestor mask, depth-based positions).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.models.cache import KVCache

Array = jax.Array
_NEG_INF = -1e30

# How the model's float32 matrix products are computed on accelerators (`jax.default_matmul_precision`). JAX's own
# default favours speed: bfloat16 passes on TPU, TensorFloat-32 on recent NVIDIA GPUs. A verify forward over k tokens
# and k one-token steps are products of other shapes, so at that precision near-ties of the argmax go other ways
# between them, as with bfloat16 activations, and methods stop matching greedy decoding token for token. "highest"
# (the default) is float32 arithmetic; "high" and "default" trade that for speed. XLA:CPU computes float32 in full
# either way.
MATMUL_PRECISIONS = ("highest", "high", "default")


def check_matmul_precision(cfg: Any) -> None:
  """Raises ValueError unless `cfg.matmul_precision` is one of `MATMUL_PRECISIONS`."""
  if cfg.matmul_precision not in MATMUL_PRECISIONS:
    raise ValueError(f"matmul_precision={cfg.matmul_precision!r} must be one of {', '.join(MATMUL_PRECISIONS)}")


def with_matmul_precision(model: Any, matmul_precision: str) -> Any:
  """The model (a LlamaLM or T5LM, or a draft built like one) with its config's `matmul_precision` set."""
  return dataclasses.replace(model, cfg=dataclasses.replace(model.cfg, matmul_precision=matmul_precision))


# An output head's product with float32 results (nn.Dense's `dot_general`), as `f32_logits` for tied heads.
f32_dot_general = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)


def precision_key(cfg: Any) -> dict:
  """What a cache key of a model's outputs adds to the config's repr: `{"precision": ...}` when they are not
  computed at the default precision, `rotary_dim` for partial rotary embeddings, `sliding_window` for windowed
  attention, `qk_norm` for normed queries and keys; empty at the defaults, so keys of files written before these
  settings existed still match."""
  value = getattr(cfg, "matmul_precision", "highest")
  extra = {k: getattr(cfg, k, 0) for k in ("rotary_dim", "sliding_window", "qk_norm") if getattr(cfg, k, 0)}
  return {**({} if value == "highest" else {"precision": value}), **extra}


def f32_logits(hidden: Array, table_VxD: Array, dtype: Any) -> Array:
  """hidden @ table.T in `dtype` with float32 results: a bfloat16 model's logits are not rounded to bfloat16 (8
  bits of mantissa would make ties of the argmax common)."""
  return jnp.einsum("...d,vd->...v", hidden.astype(dtype), table_VxD.astype(dtype),
                    preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture of a LLaMA-family model. Frozen and hashable, so it can be a static jit argument."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_ff: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  max_seq_len: int = 8192
  # RoPE frequency scaling as sorted (key, value) pairs (hashable), () for plain RoPE: see `rope_divisors`.
  rope_scaling: tuple = ()
  # Bias terms: on the q, k and v projections (Qwen2; LLaMA's attention_bias), on the attention output (LLaMA's
  # attention_bias), on the three MLP projections (LLaMA's mlp_bias).
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  dtype: str = "float32"  # activations; XLA:CPU runs bf16 far slower than f32, so f32 is the CPU default
  param_dtype: str = "float32"
  scan_layers: bool = False  # stack layers under lax.scan: faster compiles (TPU), slower steps on CPU
  # See MATMUL_PRECISIONS: float32 products in full on every platform. Left out of the repr, which names the weights'
  # model in cache keys and adapters (`precision_key` adds it where it is not the default).
  matmul_precision: str = dataclasses.field(default="highest", repr=False)
  # Rotary embeddings on the first `rotary_dim` features of each head only (Phi-4-mini's partial_rotary_factor); 0:
  # the whole head. Left out of the repr as `matmul_precision` is (`precision_key`).
  rotary_dim: int = dataclasses.field(default=0, repr=False)
  # Sliding-window attention (Mistral 7B v0.1, Phi-3): a token at position p sees the keys at positions above
  # p - sliding_window; 0: every earlier token. Left out of the repr as `matmul_precision` is (`precision_key`).
  sliding_window: int = dataclasses.field(default=0, repr=False)
  # An RMSNorm over each head's query and key features before the rotary embedding, with its own weights per layer
  # (Qwen3's q_norm and k_norm). Left out of the repr as `matmul_precision` is (`precision_key`).
  qk_norm: bool = dataclasses.field(default=False, repr=False)

  def __post_init__(self):
    check_sizes(self, ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len"),
                ("rope_theta", "norm_eps"))
    check_matmul_precision(self)
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
    if (isinstance(self.rotary_dim, bool) or not isinstance(self.rotary_dim, numbers.Integral)
        or not 0 <= self.rotary_dim <= self.head_dim or self.rotary_dim % 2):
      raise ValueError(f"rotary_dim={self.rotary_dim!r} must be an even number of features from 0 (the whole head) "
                       f"to head_dim={self.head_dim}")
    if (isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, numbers.Integral)
        or self.sliding_window < 0):
      raise ValueError(f"sliding_window={self.sliding_window!r} must be a whole number of tokens (0: no window)")
    rope_divisors(self.rope_dim, self.rope_theta, self.rope_scaling, self.max_seq_len)

  @property
  def rope_dim(self) -> int:
    """How many features of each head the rotary embedding turns."""
    return self.rotary_dim or self.head_dim

  @property
  def n_params(self) -> int:
    d, f, h = self.d_model, self.d_ff, self.head_dim
    per_layer = d * h * (self.n_heads * 2 + self.n_kv_heads * 2) + 3 * d * f + 2 * d
    per_layer += (self.n_heads + 2 * self.n_kv_heads) * h * self.qkv_bias + d * self.o_bias
    per_layer += (2 * f + d) * self.mlp_bias + 2 * h * self.qk_norm
    head = 0 if self.tie_embeddings else self.vocab_size * d
    return self.vocab_size * d + self.n_layers * per_layer + d + head


def check_sizes(cfg: Any, whole: tuple[str, ...], real: tuple[str, ...] = ()) -> None:
  """Raises ValueError naming the first field of `cfg` in `whole` that is not an integer >= 1, or in `real` that is
  not a finite number > 0 (a model config's own check, whoever builds it: a loader, a training config, a test)."""
  for name in whole:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
      raise ValueError(f"{name}={value!r} must be a whole number of at least 1")
  for name in real:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
      raise ValueError(f"{name}={value!r} must be a finite number above 0")


def tiny_config(**overrides) -> LlamaConfig:
  """A few-thousand-parameter config for unit tests."""
  base = dict(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
              rope_theta=10000.0, max_seq_len=512)
  base.update(overrides)
  return LlamaConfig(**base)


class RMSNorm(nn.Module):
  eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.reshape((1,) * (y.ndim - 1) + (-1,))).astype(self.dtype)


ROPE_TYPES = ("linear", "llama3", "factors", "longrope", "yarn")


def rope_scaling(entries: dict) -> tuple:
  """A `LlamaConfig.rope_scaling` from a dict of settings (lists become tuples, so the config stays hashable)."""
  return tuple(sorted((str(k), tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in entries.items()))


def rope_divisors(head_dim: int, theta: float, scaling: tuple, context: int | None = None) -> np.ndarray | None:
  """What each of the `head_dim // 2` RoPE frequencies `theta ** (-2i / head_dim)` is divided by, or None for plain
  RoPE. `scaling` (sorted (key, value) pairs) names a `rope_type`:

  - "linear" (position interpolation): every frequency divided by `factor`.
  - "llama3" (Llama 3.1+): frequencies whose wavelength is over `original_max_position_embeddings /
    low_freq_factor` divided by `factor`, those under `original_max_position_embeddings / high_freq_factor` kept,
    and those between blended linearly in `original_max_position_embeddings / wavelength`, as transformers computes.
  - "factors": the divisors themselves (`factors`), as llama.cpp stores them in a GGUF file's rope_freqs tensor.
  - "longrope" (Phi-3's LongRoPE): `short_factor`, the divisors for a `context` (the model's `max_seq_len`) up to
    `original_max_position_embeddings`, `long_factor` for a longer one, with cos and sin multiplied by
    `attention_factor` (`rope_attention_factor`) either way. The choice is the context's, for every position, as
    llama.cpp makes it from its context size: a model loaded with its original context (the loaders' default)
    computes what transformers computes at every length it can run, and one loaded with a longer context what
    transformers computes for a sequence longer than the original context (transformers chooses per forward, by
    the sequence's length so far).
  - "yarn" (YaRN, as Qwen2.5 uses it for long contexts): frequencies that turn fewer than `beta_slow` times over
    `original_max_position_embeddings` divided by `factor`, those that turn more than `beta_fast` times kept, those
    between blended along a linear ramp over their index (its ends floored and ceiled where `truncate`), with cos and
    sin multiplied by `attention_factor`, as transformers computes at every length.

  Raises:
    ValueError: another rope_type, a missing or non-positive setting, or factors of the wrong count.
  """
  if not scaling:
    return None
  s = dict(scaling)
  kind = s.get("rope_type")

  def number(key: str) -> float:
    value = s.get(key)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
      raise ValueError(f"RoPE scaling {kind!r} needs {key} a finite number above 0, not {value!r}")
    return float(value)

  half = head_dim // 2
  if kind == "linear":
    return np.full(half, number("factor"))
  if kind == "factors":
    factors = s.get("factors")
    if (not isinstance(factors, tuple) or len(factors) != half
        or not all(isinstance(f, numbers.Real) and not isinstance(f, bool) and 0 < f < math.inf for f in factors)):
      raise ValueError(f"RoPE frequency factors must be {half} finite numbers above 0 (one per frequency pair of "
                       f"head_dim={head_dim})")
    return np.asarray(factors, np.float64)
  if kind == "longrope":
    number("attention_factor")
    number("original_max_position_embeddings")
    for key in ("short_factor", "long_factor"):
      factors = s.get(key)
      if (not isinstance(factors, tuple) or len(factors) != half
          or not all(isinstance(f, numbers.Real) and not isinstance(f, bool) and 0 < f < math.inf for f in factors)):
        raise ValueError(f"RoPE scaling 'longrope' needs {key} of {half} finite numbers above 0 (one per frequency "
                         f"pair of head_dim={head_dim})")
    original = number("original_max_position_embeddings")
    return np.asarray(s["long_factor" if context is not None and context > original else "short_factor"], np.float64)
  if kind == "yarn":
    factor, context = number("factor"), number("original_max_position_embeddings")
    fast, slow = number("beta_fast"), number("beta_slow")
    number("attention_factor")
    # The pair index at which a frequency turns `turns` times over the original context.
    at = lambda turns: head_dim * math.log(context / (turns * 2 * math.pi)) / (2 * math.log(theta))  # noqa: E731
    low, high = at(fast), at(slow)
    if s.get("truncate", True):
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
      high += 0.001  # as transformers: no division by zero
    ramp = np.clip((np.arange(half, dtype=np.float64) - low) / (high - low), 0.0, 1.0)  # 0: kept, 1: divided
    return 1.0 / (ramp / factor + (1.0 - ramp))
  if kind == "llama3":
    factor, low, high = number("factor"), number("low_freq_factor"), number("high_freq_factor")
    context = number("original_max_position_embeddings")
    if high <= low:
      raise ValueError(f"RoPE scaling 'llama3' needs high_freq_factor ({high}) above low_freq_factor ({low})")
    wavelength = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    smooth = np.clip((context / wavelength - low) / (high - low), 0.0, 1.0)  # 0: long waves, 1: short ones
    return 1.0 / ((1.0 - smooth) / factor + smooth)
  raise ValueError(f"RoPE scaling {kind!r} is not implemented (jaxspec implements {', '.join(ROPE_TYPES)})")


def rope_attention_factor(scaling: tuple) -> float:
  """What a scaling multiplies cos and sin by (LongRoPE's and YaRN's `attention_factor`; 1 for the others)."""
  s = dict(scaling)
  return float(s["attention_factor"]) if s.get("rope_type") in ("longrope", "yarn") else 1.0


def rope_context(scaling: tuple) -> int | None:
  """LongRoPE's original context, past which a model's context turns its long factors on; None for others."""
  s = dict(scaling)
  return int(s["original_max_position_embeddings"]) if s.get("rope_type") == "longrope" else None


def rope_tables(positions_BxT: Array, head_dim: int, theta: float, scaling: tuple = (),
                context: int | None = None) -> tuple[Array, Array]:
  """cos and sin `[B, T, H/2]` for rotary embeddings in the half-split (Hugging Face) layout, with the frequencies
  scaled as `scaling` says for a model of `context` tokens (`rope_divisors`, `rope_attention_factor`). `head_dim`: the
  features turned (`LlamaConfig.rope_dim`, fewer than the head's for partial rotary embeddings)."""
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  divisors = rope_divisors(head_dim, theta, scaling, context)
  if divisors is not None:
    inv_freq = inv_freq / jnp.asarray(divisors, jnp.float32)
  angles = positions_BxT.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
  factor = rope_attention_factor(scaling)
  if factor == 1.0:
    return jnp.cos(angles), jnp.sin(angles)
  return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x_BxTxNxH: Array, cos_BxTxR2: Array, sin_BxTxR2: Array) -> Array:
  """Turns the first R features of each head (R = twice the tables' width: all H of them, or fewer for partial
  rotary embeddings) and keeps the rest."""
  r = 2 * cos_BxTxR2.shape[-1]
  x = x_BxTxNxH.astype(jnp.float32)
  x1, x2 = jnp.split(x[..., :r], 2, axis=-1)
  cos, sin = cos_BxTxR2[:, :, None, :], sin_BxTxR2[:, :, None, :]
  turned = [x1 * cos - x2 * sin, x2 * cos + x1 * sin] + ([x[..., r:]] if r < x.shape[-1] else [])
  return jnp.concatenate(turned, axis=-1).astype(x_BxTxNxH.dtype)


_UNROLLED_WRITE_MAX_BATCH = 32


def _write(buf: Array, new: Array, start_B: Array, axis: int, after: Array | None) -> Array:
  """Writes each row's new entries at its own offset along the slot axis (`axis` of the full buffer).

  `after` is a value computed from every read of `buf` (the attention output): the new entries get a data
  dependence on it (`+ 0 * after[0, ..., 0]`; XLA keeps `0 * x` for floats), so the write is ordered after the
  reads. Without it XLA:CPU copied each cache buffer twice per step to keep the reads safe (an optimization barrier
  did not help), and at 1024 slots a one-token step took 51 ms instead of 27 (benchmarks/README.md).

  Up to 32 rows: one plain dynamic-update-slice per row. A vmapped update becomes a scatter whose out-of-bounds
  handling reads the old slots, which made XLA:CPU copy the cache of every layer on every step; per-row updates
  stay in place. Beyond that the scatter keeps the program small.
  """
  if after is not None:  # None: `new` itself was computed after the reads
    new = new + 0 * after[(0,) * after.ndim].astype(new.dtype)
  if buf.shape[0] > _UNROLLED_WRITE_MAX_BATCH:
    row_axis = axis - 1
    return jax.vmap(lambda b, n, s: jax.lax.dynamic_update_slice_in_dim(b, n, s, axis=row_axis))(buf, new, start_B)
  for b in range(buf.shape[0]):
    starts = [0] * buf.ndim
    starts[0], starts[axis] = b, start_B[b]
    buf = jax.lax.dynamic_update_slice(buf, jax.lax.slice_in_dim(new, b, b + 1, axis=0), starts)
  return buf


def _dense(cfg: LlamaConfig, features: int, name: str, bias: bool = False) -> nn.Dense:
  return nn.Dense(features, use_bias=bias, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                  bias_init=nn.initializers.zeros, name=name)


class Attention(nn.Module):
  cfg: LlamaConfig
  write: bool = True  # False: leave the cache alone and return the new keys and values instead
  attn_slots: int | None = None  # read only the first slots of the cache (None: all of them)

  @nn.compact
  def __call__(self, x_BxTxD, rope, kv, lengths_B, visible):
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    dense = lambda n, name: _dense(cfg, n, name, cfg.o_bias if name == "o" else cfg.qkv_bias)
    b, t, _ = x_BxTxD.shape
    q_BxTxNxH = dense(cfg.n_heads * cfg.head_dim, "q")(x_BxTxD).reshape(b, t, cfg.n_heads, cfg.head_dim)
    k_BxTxKxH = dense(cfg.n_kv_heads * cfg.head_dim, "k")(x_BxTxD).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    v_BxTxKxH = dense(cfg.n_kv_heads * cfg.head_dim, "v")(x_BxTxD).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
      q_BxTxNxH = RMSNorm(cfg.norm_eps, dt, name="q_norm")(q_BxTxNxH)
      k_BxTxKxH = RMSNorm(cfg.norm_eps, dt, name="k_norm")(k_BxTxKxH)
    q_BxTxNxH = apply_rope(q_BxTxNxH, *rope)
    k_BxTxKxH = apply_rope(k_BxTxKxH, *rope)

    # Attention reads the committed cache and the new keys/values as two blocks, and the cache is written after:
    # when attention read the freshly written cache, XLA:CPU fused the write into both consumers and copied every
    # layer's cache four times per step (now twice; see benchmarks/README.md). It also needs no gathered slot mask.
    committed_BxS, mask_BxTxT = visible
    cache_k_BxKxHxS, cache_v_BxKxSxH = kv
    read_k, read_v = cache_k_BxKxHxS, cache_v_BxKxSxH
    if self.attn_slots is not None:  # every committed slot lies below attn_slots (the caller's promise)
      read_k, read_v = read_k[..., :self.attn_slots], read_v[:, :, :self.attn_slots]
    g = cfg.n_heads // cfg.n_kv_heads
    # Queries of one kv head's G heads and T tokens form the M = G*T rows of one matmul per (b, k).
    q_BxKxMxH = (q_BxTxNxH.reshape(b, t, cfg.n_kv_heads, g, cfg.head_dim).transpose(0, 2, 3, 1, 4)
                 .reshape(b, cfg.n_kv_heads, g * t, cfg.head_dim)) * (cfg.head_dim ** -0.5)
    k_BxKxHxT = k_BxTxKxH.transpose(0, 2, 3, 1)
    v_BxKxTxH = v_BxTxKxH.transpose(0, 2, 1, 3)
    old_BxKxMxS = jnp.einsum("bkmh,bkhs->bkms", q_BxKxMxH, read_k.astype(dt),
                             preferred_element_type=jnp.float32)
    new_BxKxMxT = jnp.einsum("bkmh,bkht->bkmt", q_BxKxMxH, k_BxKxHxT, preferred_element_type=jnp.float32)
    if committed_BxS.ndim == 2:
      old_BxKxMxS = jnp.where(committed_BxS[:, None, None, :], old_BxKxMxS, _NEG_INF)
    else:  # a per-token cache mask `[B, T, S]` (draft trees grown in the cache)
      old_BxKxMxS = jnp.where(jnp.tile(committed_BxS, (1, g, 1))[:, None], old_BxKxMxS, _NEG_INF)
    new_BxKxMxT = jnp.where(jnp.tile(mask_BxTxT, (1, g, 1))[:, None], new_BxKxMxT, _NEG_INF)  # row m = g_i*T + t
    probs = jax.nn.softmax(jnp.concatenate([old_BxKxMxS, new_BxKxMxT], axis=-1), axis=-1).astype(dt)
    s = old_BxKxMxS.shape[-1]
    out_BxKxMxH = (jnp.einsum("bkms,bksh->bkmh", probs[..., :s], read_v.astype(dt))
                   + jnp.einsum("bkmt,bkth->bkmh", probs[..., s:], v_BxKxTxH))
    out_BxTxD = (out_BxKxMxH.reshape(b, cfg.n_kv_heads, g, t, cfg.head_dim).transpose(0, 3, 1, 2, 4)
                 .reshape(b, t, cfg.n_heads * cfg.head_dim))
    if not self.write:
      return dense(cfg.d_model, "o")(out_BxTxD), (k_BxKxHxT, v_BxKxTxH)
    # Written after both reads above (`after`), so XLA updates the caches in place.
    cache_k_BxKxHxS = _write(cache_k_BxKxHxS, k_BxKxHxT.astype(cache_k_BxKxHxS.dtype), lengths_B, axis=3,
                             after=out_BxKxMxH)
    cache_v_BxKxSxH = _write(cache_v_BxKxSxH, v_BxKxTxH.astype(cache_v_BxKxSxH.dtype), lengths_B, axis=2,
                             after=out_BxKxMxH)
    return dense(cfg.d_model, "o")(out_BxTxD), (cache_k_BxKxHxS, cache_v_BxKxSxH)


class MLP(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg = self.cfg
    dense = lambda n, name: _dense(cfg, n, name, cfg.mlp_bias)
    return dense(cfg.d_model, "down")(nn.silu(dense(cfg.d_ff, "gate")(x_BxTxD)) * dense(cfg.d_ff, "up")(x_BxTxD))


class Block(nn.Module):
  cfg: LlamaConfig
  write: bool = True
  attn_slots: int | None = None

  @nn.compact
  def __call__(self, x_BxTxD, kv, rope, lengths_B, visible):
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    attn = Attention(cfg, self.write, self.attn_slots, name="attn")
    h, kv = attn(RMSNorm(cfg.norm_eps, dt, name="attn_norm")(x_BxTxD), rope, kv, lengths_B, visible)
    x_BxTxD = x_BxTxD + h
    x_BxTxD = x_BxTxD + MLP(cfg, name="mlp")(RMSNorm(cfg.norm_eps, dt, name="mlp_norm")(x_BxTxD))
    return x_BxTxD, kv


class _ScanBlock(nn.Module):
  """`Block` with the (carry, xs) signature `nn.scan` expects."""
  cfg: LlamaConfig
  write: bool = True
  attn_slots: int | None = None

  @nn.compact
  def __call__(self, x_BxTxD, kv, rope, lengths_B, visible):
    return Block(self.cfg, self.write, self.attn_slots, name="block")(x_BxTxD, kv, rope, lengths_B, visible)


def _within_window(window: int, positions_BxT: Array, slots: int, cache_positions_BxS: Array | None,
                   cache_visible: Array, mask_BxTxT: Array) -> tuple[Array, Array]:
  """The visibility masks `(cache [B, T, S], new tokens [B, T, T])` narrowed to keys less than `window` positions
  before each query. A cache slot holds the position of its index unless `cache_positions_BxS` says otherwise (a
  draft tree grown in the cache)."""
  pos_BxTx1 = positions_BxT[:, :, None]
  near_BxTxT = pos_BxTx1 - positions_BxT[:, None, :] < window
  keys_BxS = (jnp.arange(slots)[None] if cache_positions_BxS is None else cache_positions_BxS[:, :slots])
  near_BxTxS = pos_BxTx1 - keys_BxS[:, None, :] < window
  if cache_visible.ndim == 2:
    cache_visible = cache_visible[:, None, :]
  return cache_visible & near_BxTxS, mask_BxTxT & near_BxTxT


class Llama(nn.Module):
  """The Flax module. Use it through `LlamaLM`, which holds the static parts and the cache layout."""

  cfg: LlamaConfig
  write: bool = True  # False: `__call__` returns the new keys and values per layer instead of the updated cache
  attn_slots: int | None = None  # attention reads only cache slots [0, attn_slots) (None: the whole buffer)

  def setup(self):
    cfg = self.cfg
    self.embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.dtype(cfg.dtype),
                          param_dtype=jnp.dtype(cfg.param_dtype),
                          embedding_init=nn.initializers.normal(0.02), name="embed")
    if cfg.scan_layers:
      self.layers = nn.scan(_ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.n_layers)(
                                cfg, self.write, self.attn_slots, name="layers")
    else:
      self.layers = [Block(cfg, self.write, self.attn_slots, name=f"layers_{i}") for i in range(cfg.n_layers)]
    self.final_norm = RMSNorm(cfg.norm_eps, jnp.dtype(cfg.dtype), name="final_norm")
    if not cfg.tie_embeddings:
      self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=jnp.dtype(cfg.dtype),
                              param_dtype=jnp.dtype(cfg.param_dtype), name="lm_head",
                              dot_general=f32_dot_general)

  def __call__(self, tokens_BxT, positions_BxT, cache: KVCache, mask_BxTxT, cache_mask_BxTxS=None,
               cache_positions_BxS=None):
    cfg = self.cfg
    if mask_BxTxT.ndim == 2:
      mask_BxTxT = jnp.broadcast_to(mask_BxTxT, (tokens_BxT.shape[0], *mask_BxTxT.shape))
    x_BxTxD = self.embed(tokens_BxT)
    rope = rope_tables(positions_BxT, cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len)
    slots = cache.capacity if self.attn_slots is None else self.attn_slots
    committed = jnp.arange(slots)[None, :] < cache.lengths[:, None]
    if cache_mask_BxTxS is not None:
      cache_mask_BxTxS = cache_mask_BxTxS[..., :slots]
    visible = (committed if cache_mask_BxTxS is None else cache_mask_BxTxS, mask_BxTxT)
    if cfg.sliding_window:
      visible = _within_window(cfg.sliding_window, positions_BxT, slots, cache_positions_BxS, *visible)
    if cfg.scan_layers:
      x_BxTxD, (ks, vs) = self.layers(x_BxTxD, (cache.k, cache.v), rope, cache.lengths, visible)
    else:
      ks, vs = [], []
      for layer, k, v in zip(self.layers, cache.k, cache.v):
        x_BxTxD, (k, v) = layer(x_BxTxD, (k, v), rope, cache.lengths, visible)
        ks.append(k)
        vs.append(v)
      ks, vs = tuple(ks), tuple(vs)
    if not self.write:
      return self.final_norm(x_BxTxD), (ks, vs)
    return self.final_norm(x_BxTxD), cache.replace(k=ks, v=vs)

  def logits(self, hidden_BxTxD):
    if self.cfg.tie_embeddings:
      return f32_logits(hidden_BxTxD, self.embed.embedding, jnp.dtype(self.cfg.dtype))
    return self.lm_head(hidden_BxTxD).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class LlamaLM:
  """A LLaMA-family model behind the decoding boundary (`jaxspec.decoding.LanguageModel`).

  Static and hashable: pass it to `jax.jit` as a static argument; params and caches are the arrays.
  """

  cfg: LlamaConfig

  @property
  def module(self) -> Llama:
    return Llama(self.cfg)

  @property
  def vocab_size(self) -> int:
    return self.cfg.vocab_size

  def init_params(self, rng: Array) -> dict:
    cache = self.init_cache(1, 8)
    tokens = jnp.zeros((1, 1), jnp.int32)
    params = dict(self.module.init(rng, tokens, tokens, cache, jnp.ones((1, 1, 1), bool))["params"])
    if not self.cfg.tie_embeddings:  # `__call__` stops at the final norm: the untied head is made by `logits`
      hidden = jnp.zeros((1, 1, self.cfg.d_model), jnp.dtype(self.cfg.dtype))
      params["lm_head"] = self.module.init(jax.random.fold_in(rng, 1), hidden, method=Llama.logits)["params"]["lm_head"]
    return params

  def init_cache(self, batch_size: int, capacity: int, dtype: Any = None) -> KVCache:
    """An empty cache of `capacity` slots per row."""
    cfg = self.cfg
    dtype = jnp.dtype(dtype or cfg.dtype)
    k_shape = (batch_size, cfg.n_kv_heads, cfg.head_dim, capacity)
    v_shape = (batch_size, cfg.n_kv_heads, capacity, cfg.head_dim)
    if cfg.scan_layers:
      k, v = jnp.zeros((cfg.n_layers, *k_shape), dtype), jnp.zeros((cfg.n_layers, *v_shape), dtype)
    else:
      k = tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.n_layers))
      v = tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.n_layers))
    return KVCache(k=k, v=v, lengths=jnp.zeros((batch_size,), jnp.int32))

  @property
  def keys_need_positions(self) -> bool:
    """Whether a forward over a cache whose slots hold other positions than their index (a draft tree grown in the
    cache) needs them as `cache_positions_BxS`: a sliding window compares positions."""
    return bool(self.cfg.sliding_window)

  def forward(self, params, tokens_BxT: Array, positions_BxT: Array, cache: KVCache, mask_BxTxT: Array, *,
              logits: bool = True, cache_mask_BxTxS: Array | None = None, write: bool = True,
              attn_slots: int | None = None, cache_positions_BxS: Array | None = None):
    """Runs T new tokens against the cache. Jittable.

    Args:
      params: the model's parameters.
      tokens_BxT: new token ids.
      positions_BxT: their absolute positions (RoPE); for a tree, the committed length plus the node depth.
      cache: committed context; the new keys and values are written at `[lengths, lengths + T)`.
      mask_BxTxT: `mask[b, i, j]` says whether new token i attends to new token j (causal for chains, ancestor
        mask for trees).
      logits: whether to compute logits for every new token (prefill only needs the hidden states).
      cache_mask_BxTxS: which cache slots each new token reads; None (the default) reads slots `[0, lengths)`. A
        draft tree grown depth by depth keeps its nodes past `lengths` and lets each node read its ancestors.
      write: False leaves the cache unwritten and returns the new keys and values in its place, for `write_kv`
        to write later. The decode loop does this when the forward runs inside a `lax.cond`: XLA:CPU copies a
        cache that a conditional's branches update in place.
      attn_slots: static; attention reads only cache slots `[0, attn_slots)`, so its cost follows the filled
        length instead of the buffer's (the decode loop's cache buckets). Every slot a token may read must lie
        below it; 0 skips the cache (a prefill into an empty cache). None reads the whole buffer.
      cache_positions_BxS: the positions of the keys in the cache's slots (default: the slot index), for a sliding
        window (`keys_need_positions`).

    Returns:
      `(logits_BxTxV or None, hidden_BxTxD, cache)`, `lengths` unchanged; with `write=False`, the new keys and
      values `(ks, vs)` instead of the cache.
    """
    if attn_slots is not None and not 0 <= attn_slots <= cache.capacity:
      raise ValueError(f"attn_slots={attn_slots} is outside [0, {cache.capacity}], the cache's slots.")
    with jax.default_matmul_precision(self.cfg.matmul_precision):
      hidden, cache = Llama(self.cfg, write, attn_slots).apply({"params": params}, tokens_BxT, positions_BxT, cache,
                                                               mask_BxTxT, cache_mask_BxTxS, cache_positions_BxS)
    return (self.logits(params, hidden) if logits else None), hidden, cache

  @property
  def can_defer_write(self) -> bool:
    """Whether `forward(write=False)` and `write_kv` are available (not with stacked, scanned layers)."""
    return not self.cfg.scan_layers

  @property
  def bounds_attention(self) -> bool:
    """Whether `forward` takes `attn_slots` (the decode loop's cache buckets use it)."""
    return True

  @property
  def context_is_limit(self) -> bool:
    """Whether `cfg.max_seq_len` is the context the model was trained for (rotary positions), so no request may ask
    for a longer cache. T5's relative positions have no such limit."""
    return True

  def write_kv(self, cache: KVCache, new_kv) -> KVCache:
    """Writes the new keys and values a `forward(write=False)` returned at each row's `[lengths, lengths + T)`."""
    if self.cfg.scan_layers:
      raise ValueError("write_kv needs per-layer caches (scan_layers=False).")
    ks, vs = new_kv
    return cache.replace(
        k=tuple(_write(c, n.astype(c.dtype), cache.lengths, axis=3, after=None) for c, n in zip(cache.k, ks)),
        v=tuple(_write(c, n.astype(c.dtype), cache.lengths, axis=2, after=None) for c, n in zip(cache.v, vs)))

  def logits(self, params, hidden_BxTxD: Array) -> Array:
    """f32 logits from final hidden states. Jittable."""
    with jax.default_matmul_precision(self.cfg.matmul_precision):
      return self.module.apply({"params": params}, hidden_BxTxD, method=Llama.logits)

  def input_table(self, params) -> Array:
    """The token embedding `[V, D]`."""
    return params["embed"]["embedding"]

  def output_table(self, params) -> Array:
    """`[V, D]`, so that logits = hidden @ table.T (the tied embedding or the untied head)."""
    return params["embed"]["embedding"] if self.cfg.tie_embeddings else params["lm_head"]["kernel"].T


def stack_layers(params: dict, n_layers: int) -> dict:
  """Converts per-layer params (`layers_0`, ...) to the stacked layout `scan_layers=True` uses."""
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  out["layers"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"] for i in range(n_layers)])}
  return out


def unstack_layers(params: dict) -> dict:
  """The per-layer layout (`layers_0`, ...) of params in either layout; the inverse of `stack_layers`."""
  if "layers" not in params:
    return params
  out = {k: v for k, v in params.items() if k != "layers"}
  block = params["layers"]["block"]
  for i in range(len(jax.tree.leaves(block)[0])):
    out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], block)
  return out
