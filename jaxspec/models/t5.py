"""Encoder-decoder Transformer of the T5 / T5 v1.1 family in Flax linen, behind the same decoding boundary.

T5's parts: RMS layer norm without bias or mean (eps 1e-6), attention without the 1/sqrt(d) scale, relative
position biases from log-spaced buckets (one table per stack, made in its first layer and shared by all layers;
bidirectional in the encoder, causal in the decoder; none in cross-attention), and a feed-forward block that is
gated-GELU in v1.1 (`wo(gelu(wi_0 x) * wi_1 x)`) or ReLU in the original T5. T5 v1.1 has an untied output head; the
original ties it to the embedding and scales the hidden state by d_model^-1/2 first.

How it meets the decode loop (`jaxspec.decoding.LanguageModel`): `start` encodes the prompt once, computes every
decoder layer's cross-attention keys and values into the cache (`EncDecCache`) and hands back the decoder's own
prompt, the start token. From then on `forward` is the decoder: T new tokens with positions and a mask, against
the decoder's self-attention cache (the same `KVCache` slots, `advance` and `compact` as the decoder-only models)
and the fixed cross cache. So chains, trees, Jacobi windows and draft models run on it unchanged.

Relative positions: a cache slot's position is its index, which holds for every committed entry (the loop keeps
committed entries contiguous, from position 0 = the start token); new tokens use the positions they are given, so a
tree's nodes see each other at their depth-based distances. A draft tree grown depth by depth keeps its uncommitted
nodes in slots past the committed ones, several per depth, where slot and position differ: its source passes the
keys' positions (`cache_positions_BxS`, see `keys_need_positions`), since the bias is computed from them at every
read (RoPE models rotate a key once, when it is written, and need no such thing).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxspec.models.cache import KVCache
from jaxspec.models.llama import (RMSNorm, _write, check_matmul_precision, check_sizes, f32_dot_general,
                                  f32_logits)

Array = jax.Array
_NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Architecture of a T5-family encoder-decoder. Frozen and hashable (a static jit argument).

  `max_seq_len` bounds the decoder's tokens (the start token + output) in the loop's checks; the decoder's cache is
  sized from the request, and the encoder input is bounded by nothing but memory (relative positions have no
  limit; `jaxspec.memory` checks that a decode fits before it runs).
  """

  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  n_heads: int
  n_enc_layers: int
  n_dec_layers: int
  rel_buckets: int = 32
  rel_max_distance: int = 128
  norm_eps: float = 1e-6
  ff: Literal["gated-gelu", "relu"] = "gated-gelu"
  tie_embeddings: bool = False
  decoder_start_id: int = 0
  max_seq_len: int = 2048
  dtype: str = "float32"
  param_dtype: str = "float32"
  matmul_precision: str = dataclasses.field(default="highest", repr=False)  # as LlamaConfig's

  def __post_init__(self):
    check_sizes(self, ("vocab_size", "d_model", "d_kv", "d_ff", "n_heads", "n_enc_layers", "n_dec_layers",
                       "rel_buckets", "rel_max_distance", "max_seq_len"), ("norm_eps",))
    check_matmul_precision(self)
    if self.ff not in ("gated-gelu", "relu"):
      raise ValueError(f"ff must be 'gated-gelu' or 'relu', got {self.ff!r}")

  @property
  def n_params(self) -> int:
    d, f, inner = self.d_model, self.d_ff, self.n_heads * self.d_kv
    attn = 4 * d * inner
    mlp = (3 if self.ff == "gated-gelu" else 2) * d * f
    enc = self.n_enc_layers * (attn + mlp + 2 * d)
    dec = self.n_dec_layers * (2 * attn + mlp + 3 * d)
    head = 0 if self.tie_embeddings else self.vocab_size * d
    return self.vocab_size * d + enc + dec + 2 * d + 2 * self.rel_buckets * self.n_heads + head


def tiny_t5_config(**overrides) -> T5Config:
  """A small config for unit tests."""
  base = dict(vocab_size=256, d_model=32, d_kv=8, d_ff=64, n_heads=4, n_enc_layers=2, n_dec_layers=2,
              rel_buckets=8, rel_max_distance=32, max_seq_len=512)
  base.update(overrides)
  return T5Config(**base)


@flax.struct.dataclass
class EncDecCache(KVCache):
  """The decoder's self-attention `KVCache` plus the fixed cross-attention keys `[B, N, H, P]` and values
  `[B, N, P, H]` of every decoder layer and the encoder's valid positions `[B, P]`. `advance` / `compact` move only
  the self-attention entries, which is what the loop wants."""

  cross_k: Any
  cross_v: Any
  enc_valid_BxP: Array


def relative_bucket(rel: Array, bidirectional: bool, num_buckets: int, max_distance: int) -> Array:
  """T5's bucket of a relative position `rel = key_pos - query_pos` (int array of any shape).

  Half the buckets (or all, causal) hold exact distances 0..max_exact-1; the rest are log-spaced up to
  `max_distance`, and farther distances share the last bucket. Bidirectional tables give keys after the query the
  upper half of the buckets. Causal tables see only keys at or before the query (later keys map to bucket 0).
  """
  n = -rel
  ret = jnp.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    ret = ret + (n < 0).astype(rel.dtype) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  nf = jnp.maximum(n, 1).astype(jnp.float32)
  large = max_exact + (jnp.log(nf / max_exact) / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(rel.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return ret + jnp.where(n < max_exact, n, large)


def _dense(cfg: T5Config, features: int, name: str, scale: float = 1.0) -> nn.Dense:
  return nn.Dense(features, use_bias=False, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                  kernel_init=nn.initializers.variance_scaling(scale, "fan_in", "normal"), name=name)


class RelativeBias(nn.Module):
  """The `[buckets, heads]` table of one stack; called with key and query positions, gives `[B, N, T, S]`."""

  cfg: T5Config
  bidirectional: bool

  @nn.compact
  def __call__(self, query_pos_BxT: Array, key_pos_BxS: Array) -> Array:
    cfg = self.cfg
    table = self.param("embedding", nn.initializers.normal(0.1), (cfg.rel_buckets, cfg.n_heads),
                       jnp.dtype(cfg.param_dtype))
    rel_BxTxS = key_pos_BxS[:, None, :] - query_pos_BxT[:, :, None]
    buckets = relative_bucket(rel_BxTxS, self.bidirectional, cfg.rel_buckets, cfg.rel_max_distance)
    return jnp.take(table, buckets, axis=0).astype(jnp.float32).transpose(0, 3, 1, 2)


class Attention(nn.Module):
  """Multi-head attention of T5 (no score scaling). `q_proj` only: keys and values come from the caller, so the
  same module serves the encoder, the cached decoder self-attention and cross-attention."""

  cfg: T5Config

  def setup(self):
    inner = self.cfg.n_heads * self.cfg.d_kv
    self.q = _dense(self.cfg, inner, "q", scale=1.0 / self.cfg.d_kv)  # T5 folds 1/sqrt(d_kv) into q's init
    self.k = _dense(self.cfg, inner, "k")
    self.v = _dense(self.cfg, inner, "v")
    self.o = _dense(self.cfg, self.cfg.d_model, "o")

  def heads(self, x_BxTxD: Array, which: str) -> Array:
    """`[B, N, T, H]` projections of x (`which` is "q", "k" or "v")."""
    b, t, _ = x_BxTxD.shape
    y = getattr(self, which)(x_BxTxD).reshape(b, t, self.cfg.n_heads, self.cfg.d_kv)
    return y.transpose(0, 2, 1, 3)

  def __call__(self, q_BxNxTxH: Array, blocks) -> Array:
    """Attention of the queries over one or more key/value blocks `(k [B,N,H,S], v [B,N,S,H], bias-or-None,
    mask [B,T,S] or [B,1,S])`, softmax taken over all blocks together."""
    dt = jnp.dtype(self.cfg.dtype)
    scores = []
    for k_BxNxHxS, _, bias, mask in blocks:
      s = jnp.einsum("bnth,bnhs->bnts", q_BxNxTxH, k_BxNxHxS.astype(dt), preferred_element_type=jnp.float32)
      if bias is not None:
        s = s + bias
      scores.append(jnp.where(mask[:, None], s, _NEG_INF))
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1).astype(dt)
    out, at = 0.0, 0
    for (_, v_BxNxSxH, _, _), s in zip(blocks, scores):
      n = s.shape[-1]
      out = out + jnp.einsum("bnts,bnsh->bnth", probs[..., at:at + n], v_BxNxSxH.astype(dt))
      at += n
    b, _, t, _ = q_BxNxTxH.shape
    return self.o(out.transpose(0, 2, 1, 3).reshape(b, t, self.cfg.n_heads * self.cfg.d_kv))


class FeedForward(nn.Module):
  cfg: T5Config

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg = self.cfg
    if cfg.ff == "gated-gelu":
      h = nn.gelu(_dense(cfg, cfg.d_ff, "wi_0")(x_BxTxD), approximate=True) * _dense(cfg, cfg.d_ff, "wi_1")(x_BxTxD)
    else:
      h = nn.relu(_dense(cfg, cfg.d_ff, "wi")(x_BxTxD))
    return _dense(cfg, cfg.d_model, "wo")(h)


class EncoderLayer(nn.Module):
  cfg: T5Config

  @nn.compact
  def __call__(self, x_BxPxD, bias_BxNxPxP, valid_BxP):
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    attn = Attention(cfg, name="attn")
    h = RMSNorm(cfg.norm_eps, dt, name="attn_norm")(x_BxPxD)
    x_BxPxD = x_BxPxD + attn(attn.heads(h, "q"), [(attn.heads(h, "k").transpose(0, 1, 3, 2), attn.heads(h, "v"),
                                                    bias_BxNxPxP, valid_BxP[:, None, :])])
    return x_BxPxD + FeedForward(cfg, name="mlp")(RMSNorm(cfg.norm_eps, dt, name="mlp_norm")(x_BxPxD))


class DecoderLayer(nn.Module):
  cfg: T5Config

  def setup(self):
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    self.self_attn = Attention(cfg)
    self.self_norm = RMSNorm(cfg.norm_eps, dt)
    self.cross_attn = Attention(cfg)
    self.cross_norm = RMSNorm(cfg.norm_eps, dt)
    self.mlp = FeedForward(cfg)
    self.mlp_norm = RMSNorm(cfg.norm_eps, dt)

  def cross_kv(self, enc_BxPxD: Array) -> tuple[Array, Array]:
    """This layer's cross-attention keys `[B, N, H, P]` and values `[B, N, P, H]` of the encoder output."""
    return self.cross_attn.heads(enc_BxPxD, "k").transpose(0, 1, 3, 2), self.cross_attn.heads(enc_BxPxD, "v")

  def __call__(self, x_BxTxD, kv, cross, lengths_B, visible, bias):
    """`kv` None: no self-attention cache (teacher-forced training), nothing read or written."""
    committed, mask_BxTxT = visible
    bias_old, bias_new = bias
    h = self.self_norm(x_BxTxD)
    q = self.self_attn.heads(h, "q")
    k_new = self.self_attn.heads(h, "k").transpose(0, 1, 3, 2)  # [B, N, H, T]
    v_new = self.self_attn.heads(h, "v")
    blocks = [(k_new, v_new, bias_new, mask_BxTxT)]
    if kv is not None:
      blocks.insert(0, (*kv, bias_old, committed))
    x_BxTxD = x_BxTxD + self.self_attn(q, blocks)
    cross_k, cross_v, enc_valid_BxP = cross
    h = self.cross_norm(x_BxTxD)
    x_BxTxD = x_BxTxD + self.cross_attn(self.cross_attn.heads(h, "q"),
                                        [(cross_k, cross_v, None, enc_valid_BxP[:, None, :])])
    x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))
    if kv is None:
      return x_BxTxD, None
    cache_k, cache_v = kv
    cache_k = _write(cache_k, k_new.astype(cache_k.dtype), lengths_B, axis=3, after=x_BxTxD)  # after the reads
    cache_v = _write(cache_v, v_new.astype(cache_v.dtype), lengths_B, axis=2, after=x_BxTxD)
    return x_BxTxD, (cache_k, cache_v)


class T5(nn.Module):
  """The Flax module. Use it through `T5LM`."""

  cfg: T5Config

  def setup(self):
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    self.shared = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dt, param_dtype=jnp.dtype(cfg.param_dtype),
                           embedding_init=nn.initializers.normal(1.0))
    self.enc_layers = [EncoderLayer(cfg, name=f"enc_{i}") for i in range(cfg.n_enc_layers)]
    self.enc_bias = RelativeBias(cfg, bidirectional=True)
    self.enc_norm = RMSNorm(cfg.norm_eps, dt)
    self.dec_layers = [DecoderLayer(cfg, name=f"dec_{i}") for i in range(cfg.n_dec_layers)]
    self.dec_bias = RelativeBias(cfg, bidirectional=False)
    self.dec_norm = RMSNorm(cfg.norm_eps, dt)
    if not cfg.tie_embeddings:
      self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dt, param_dtype=jnp.dtype(cfg.param_dtype),
                              kernel_init=nn.initializers.variance_scaling(1.0, "fan_in", "normal"), name="lm_head",
                              dot_general=f32_dot_general)

  def encode(self, tokens_BxP: Array, valid_BxP: Array) -> Array:
    """Final encoder states `[B, P, D]` (padding positions are masked as keys; their own rows are unused)."""
    b, p = tokens_BxP.shape
    pos_BxP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    bias = self.enc_bias(pos_BxP, pos_BxP)
    x = self.shared(tokens_BxP)
    for layer in self.enc_layers:
      x = layer(x, bias, valid_BxP)
    return self.enc_norm(x)

  def cross_cache(self, enc_BxPxD: Array) -> tuple[tuple, tuple]:
    kvs = [layer.cross_kv(enc_BxPxD) for layer in self.dec_layers]
    return tuple(k for k, _ in kvs), tuple(v for _, v in kvs)

  def decode(self, tokens_BxT, positions_BxT, cache: EncDecCache, mask_BxTxT, cache_mask_BxTxS=None,
             cache_positions_BxS=None):
    b = tokens_BxT.shape[0]
    if mask_BxTxT.ndim == 2:
      mask_BxTxT = jnp.broadcast_to(mask_BxTxT, (b, *mask_BxTxT.shape))
    slots_BxS = jnp.broadcast_to(jnp.arange(cache.capacity, dtype=jnp.int32), (b, cache.capacity))
    committed = slots_BxS < cache.lengths[:, None]
    committed = committed[:, None, :] if cache_mask_BxTxS is None else cache_mask_BxTxS
    key_pos_BxS = slots_BxS if cache_positions_BxS is None else cache_positions_BxS
    bias = (self.dec_bias(positions_BxT, key_pos_BxS), self.dec_bias(positions_BxT, positions_BxT))
    x = self.shared(tokens_BxT)
    ks, vs = [], []
    for layer, k, v, ck, cv in zip(self.dec_layers, cache.k, cache.v, cache.cross_k, cache.cross_v):
      x, (k, v) = layer(x, (k, v), (ck, cv, cache.enc_valid_BxP), cache.lengths, (committed, mask_BxTxT), bias)
      ks.append(k)
      vs.append(v)
    return self.dec_norm(x), cache.replace(k=tuple(ks), v=tuple(vs))

  def logits(self, hidden_BxTxD):
    if self.cfg.tie_embeddings:
      dt = jnp.dtype(self.cfg.dtype)
      return f32_logits(hidden_BxTxD.astype(dt) * (self.cfg.d_model ** -0.5), self.shared.embedding, dt)
    return self.lm_head(hidden_BxTxD).astype(jnp.float32)

  def teacher_forced(self, src_BxP, valid_BxP, tokens_BxT):
    """Decoder states `[B, T, D]` for whole target sequences at positions 0..T-1, causal, without a cache."""
    b, t = tokens_BxT.shape
    enc = self.encode(src_BxP, valid_BxP)
    pos_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    bias = (None, self.dec_bias(pos_BxT, pos_BxT))
    visible = (None, jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t)))
    x = self.shared(tokens_BxT)
    for layer in self.dec_layers:
      x, _ = layer(x, None, (*layer.cross_kv(enc), valid_BxP), None, visible, bias)
    return self.dec_norm(x)

  def __call__(self, src_BxP, valid_BxP, tokens_BxT, positions_BxT, cache, mask_BxTxT):
    """Every submodule once (for `init`)."""
    enc = self.encode(src_BxP, valid_BxP)
    ck, cv = self.cross_cache(enc)
    hidden, _ = self.decode(tokens_BxT, positions_BxT, cache.replace(cross_k=ck, cross_v=cv, enc_valid_BxP=valid_BxP),
                            mask_BxTxT)
    return self.logits(hidden)


@dataclasses.dataclass(frozen=True)
class T5LM:
  """A T5-family encoder-decoder behind the decoding boundary (`jaxspec.decoding.LanguageModel`).

  The prompt given to the decode loop is the encoder input; `start` encodes it and returns the decoder's prompt
  (the start token). Static and hashable: pass it to `jax.jit` as a static argument.
  """

  cfg: T5Config
  is_encoder_decoder = True
  # The decoder's own prompt, in its self-attention cache: the start token alone (the prompt is the encoder's).
  decoder_prompt_len = 1

  @property
  def module(self) -> T5:
    return T5(self.cfg)

  def _apply(self, *args, **kwargs):
    """`module.apply` at the config's matmul precision."""
    with jax.default_matmul_precision(self.cfg.matmul_precision):
      return self.module.apply(*args, **kwargs)

  @property
  def vocab_size(self) -> int:
    return self.cfg.vocab_size

  def init_params(self, rng: Array) -> dict:
    one = jnp.zeros((1, 1), jnp.int32)
    cache = self.init_cache(1, 8, source_len=1)
    return dict(self.module.init(rng, one, jnp.ones((1, 1), bool), one, one, cache, jnp.ones((1, 1, 1), bool))
                ["params"])

  def init_cache(self, batch_size: int, capacity: int, dtype: Any = None, source_len: int = 1) -> EncDecCache:
    """An empty decoder cache of `capacity` slots per row; the cross part is a placeholder until `start`."""
    cfg = self.cfg
    dt = jnp.dtype(dtype or cfg.dtype)
    n, h = cfg.n_heads, cfg.d_kv
    layers = range(cfg.n_dec_layers)
    return EncDecCache(
        k=tuple(jnp.zeros((batch_size, n, h, capacity), dt) for _ in layers),
        v=tuple(jnp.zeros((batch_size, n, capacity, h), dt) for _ in layers),
        lengths=jnp.zeros((batch_size,), jnp.int32),
        cross_k=tuple(jnp.zeros((batch_size, n, h, source_len), dt) for _ in layers),
        cross_v=tuple(jnp.zeros((batch_size, n, source_len, h), dt) for _ in layers),
        enc_valid_BxP=jnp.zeros((batch_size, source_len), bool))

  def encode(self, params, src_BxP: Array, src_len_B: Array) -> Array:
    """Encoder states `[B, P, D]` of left-aligned sources with true lengths `src_len_B`. Jittable."""
    valid = jnp.arange(src_BxP.shape[1])[None] < src_len_B[:, None]
    return self._apply({"params": params}, src_BxP, valid, method=T5.encode)

  def start(self, params, prompts_BxP: Array, lengths_B: Array, cache: EncDecCache):
    """Encodes the prompts into the cross cache; returns `(decoder tokens [B, 1], their lengths [B], cache)`:
    the decoder's prompt is the start token alone, and the self-attention cache stays empty. Jittable."""
    valid = jnp.arange(prompts_BxP.shape[1])[None] < lengths_B[:, None]
    enc = self._apply({"params": params}, prompts_BxP, valid, method=T5.encode)
    ck, cv = self._apply({"params": params}, enc, method=T5.cross_cache)
    dt = cache.k[0].dtype
    cache = cache.replace(cross_k=tuple(x.astype(dt) for x in ck), cross_v=tuple(x.astype(dt) for x in cv),
                          enc_valid_BxP=valid)
    b = prompts_BxP.shape[0]
    return (jnp.full((b, 1), self.cfg.decoder_start_id, jnp.int32), jnp.ones((b,), jnp.int32), cache)

  # The relative bias reads each cached key's position at every forward: callers that keep uncommitted entries in
  # slots other than their positions (a draft tree grown depth by depth) pass them as `cache_positions_BxS`.
  keys_need_positions = True

  def forward(self, params, tokens_BxT: Array, positions_BxT: Array, cache: EncDecCache, mask_BxTxT: Array, *,
              logits: bool = True, cache_mask_BxTxS: Array | None = None, cache_positions_BxS: Array | None = None):
    """The decoder over T new tokens against the cache (see `LlamaLM.forward`; the encoder ran in `start`).
    `cache_positions_BxS`: the positions of the keys in the cache's slots (default: the slot index)."""
    hidden, cache = self._apply({"params": params}, tokens_BxT, positions_BxT, cache, mask_BxTxT,
                                      cache_mask_BxTxS, cache_positions_BxS, method=T5.decode)
    return (self.logits(params, hidden) if logits else None), hidden, cache

  def logits(self, params, hidden_BxTxD: Array) -> Array:
    return self._apply({"params": params}, hidden_BxTxD, method=T5.logits)

  def input_table(self, params) -> Array:
    """The shared token embedding `[V, D]`."""
    return params["shared"]["embedding"]

  def output_table(self, params) -> Array:
    """`[V, D]`, so that logits = hidden @ table.T (a tied head includes T5's d_model^-1/2 scale)."""
    if self.cfg.tie_embeddings:
      return params["shared"]["embedding"] * (self.cfg.d_model ** -0.5)
    return params["lm_head"]["kernel"].T

  def teacher_forced(self, params, src_BxP: Array, src_len_B: Array, dec_in_BxT: Array) -> tuple[Array, Array]:
    """Training forward: logits `[B, T, V]` and decoder hidden states for decoder inputs `[start, y_1..]`."""
    valid = jnp.arange(src_BxP.shape[1])[None] < src_len_B[:, None]
    hidden = self._apply({"params": params}, src_BxP, valid, dec_in_BxT, method=T5.teacher_forced)
    return self.logits(params, hidden), hidden
