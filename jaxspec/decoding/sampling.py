"""Turning logits into tokens: greedy and temperature / top-k / top-p sampling.

Temperature and top-p are arrays (part of the loop state), so changing them does not recompile; top-k changes the
program's shapes and is static.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import flax.struct
import jax
import jax.numpy as jnp

from jaxspec.errors import InputError

Array = jax.Array


SEED_RANGE = (-2 ** 63, 2 ** 63)  # a 64-bit signed integer: [low, high)


def seed_key(seed: int) -> Array:
  """The PRNG key for a 64-bit integer seed (-2**63 to 2**63 - 1), a different key for each.

  `jax.random.key(seed)` keeps only the low 32 bits of a seed when 64-bit mode is off (JAX's default), so seeds
  0 and 2**32, or -1 and 2**32 - 1, would draw the same samples. Here every seed gets the key 64-bit mode gives it:
  for the default threefry keys the words [high, low] of its 64-bit two's complement form, one key per seed, and for
  a seed in [0, 2**32) exactly `jax.random.key(seed)` (the samples of earlier runs stay as they were). Other key
  implementations fold the high word into the key of the low one.

  Raises:
    InputError: a seed outside that range, or not a whole number.
  """
  try:
    value = operator.index(seed)
  except TypeError:
    raise InputError(f"a seed must be a whole number, got {seed!r}") from None
  if not SEED_RANGE[0] <= value < SEED_RANGE[1]:
    raise InputError(f"seed {value} is out of range: use a whole number from -2**63 to 2**63 - 1")
  value %= 2 ** 64
  low, high = value & 0xFFFFFFFF, value >> 32
  key = jax.random.key(low)
  if not high:
    return key
  impl = jax.random.key_impl(key)
  if str(impl) == "threefry2x32":
    return jax.random.wrap_key_data(jnp.asarray([high, low], jnp.uint32), impl=impl)
  return jax.random.fold_in(key, high)


def argmax(x_xV: Array) -> Array:
  """`jnp.argmax(x, axis=-1)` as int32: the first index of the maximum (of the first NaN, if any).

  Written as a max and a min reduction because XLA:CPU runs `argmax` as a variadic reduce, which is several times
  slower over a vocabulary: 1.8 ms against 0.34 ms for the 17 x 49152 logits of a 16-node verify on the 2-core test
  machine, and every greedy step takes the target's argmax over its whole block.
  """
  m = jnp.max(x_xV, axis=-1, keepdims=True)
  hit = (x_xV == m) | (jnp.isnan(x_xV) & jnp.isnan(m))
  idx = jax.lax.broadcasted_iota(jnp.int32, x_xV.shape, x_xV.ndim - 1)
  # If XLA ever computed x differently for the max and for the comparison, no index would match. The clamp then
  # returns V - 1 (in range, but not the argmax). No test has seen this: `test_argmax_is_jnp_argmax` and
  # `test_categorical_is_jax_random_categorical` compare jitted results with jnp.argmax / jax.random.categorical.
  return jnp.minimum(jnp.min(jnp.where(hit, idx, x_xV.shape[-1]), axis=-1), x_xV.shape[-1] - 1)


def categorical(rng: Array, logits_xV: Array) -> Array:
  """`jax.random.categorical(rng, logits, axis=-1)` as int32, token for token: the same Gumbel noise, taken with
  `argmax` above instead of `jnp.argmax` (1.7 ms against 0.44 ms for one row of a 49152-token vocabulary here)."""
  return argmax(jax.random.gumbel(rng, logits_xV.shape, logits_xV.dtype) + logits_xV)


@flax.struct.dataclass
class SamplingParams:
  """Runtime sampling settings, broadcast over rows. temperature 0 means greedy (as in T5X)."""

  temperature: Array
  top_p: Array

  @classmethod
  def make(cls, temperature: float = 0.0, top_p: float = 1.0) -> "SamplingParams":
    if not (math.isfinite(temperature) and temperature >= 0):
      raise InputError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
      raise InputError(f"top_p must be in (0, 1], got {top_p}")
    return cls(temperature=jnp.float32(temperature), top_p=jnp.float32(top_p))


@dataclasses.dataclass(frozen=True)
class Warp:
  """The static part of a sampling rule: top-k (0 = off) and whether top-p filtering is compiled in."""

  top_k: int = 0
  use_top_p: bool = False

  def __post_init__(self):
    if self.top_k < 0:
      raise InputError(f"top_k must be >= 0 (0: no top-k filter), got {self.top_k}")

  def log_probs(self, logits_xV: Array, sp: SamplingParams) -> Array:
    """Log-probabilities of the warped distribution (temperature, then top-k, then top-p). Jittable."""
    # The largest logit is taken off before dividing by the temperature, so a small temperature neither overflows
    # float32 nor loses the gaps between logits to rounding (at T = 1e-6 the scaled logits were ~1e7, where float32
    # steps by 1, and the top token's probability came out above 1). Temperature 0 (a sampling drafter's warp run
    # greedily) is taken as the smallest positive float32: all the mass on the largest logit, shared by ties.
    t = jnp.maximum(sp.temperature, jnp.finfo(jnp.float32).tiny)
    logits = logits_xV.astype(jnp.float32)
    top = jnp.max(logits, axis=-1, keepdims=True)
    logits = (logits - jnp.where(jnp.isfinite(top), top, 0.0)) / t
    neg = jnp.finfo(jnp.float32).min
    if self.top_k:
      kth = jax.lax.top_k(logits, self.top_k)[0][..., -1:]
      logits = jnp.where(logits < kth, neg, logits)
    if self.use_top_p:
      sorted_desc = -jnp.sort(-logits, axis=-1)
      probs = jax.nn.softmax(sorted_desc, axis=-1)
      cum_before = jnp.cumsum(probs, axis=-1) - probs
      # Keep the smallest prefix whose mass reaches top_p: tokens whose preceding mass is already >= top_p go.
      # The most likely token always stays (a top_p below float32's smallest normal number reads as 0 on CPU). The
      # cut is a logit value, so tokens tied with the last one kept stay too (as T5X's top-p mask keeps them;
      # transformers keeps an arbitrary part of such a tie, by its sort order).
      keep = (cum_before < sp.top_p) | (jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == 0)
      cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
      logits = jnp.where(logits < cutoff, neg, logits)
    return jax.nn.log_softmax(logits, axis=-1)

  def probs(self, logits_xV: Array, sp: SamplingParams) -> Array:
    return jnp.exp(self.log_probs(logits_xV, sp))

  def sample(self, rng: Array, logits_xV: Array, sp: SamplingParams) -> Array:
    """One token per row from the warped distribution. Jittable."""
    return categorical(rng, self.log_probs(logits_xV, sp))
