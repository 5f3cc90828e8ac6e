"""A token n-gram language model (orders 2 to 4) that can be queried inside `jax.jit`.

Smoothing is interpolated absolute discounting: for a context h (its last m-1 tokens) and a token w,

    p_m(w | h) = max(c(h, w) - D_m, 0) / c(h)  +  gamma(h) * p_{m-1}(w | h'),   gamma(h) = D_m * N1+(h .) / c(h)

where h' drops the oldest token of h, N1+(h .) is the number of distinct tokens seen after h, D_m is Ney's
estimate n1 / (n1 + 2 n2) from the counts of order m, and a context never seen gives gamma = 1 (the lower order
alone). The recursion ends at a discounted unigram interpolated with the uniform distribution, so every token has a
non-zero probability.

Fixed-size tables. Token ids must be < 65534 (2 x 16 bits); an m-gram is packed left-padded to four 16-bit slots,
two uint32 words `(hi, lo)`, and the tables are those keys sorted lexicographically with their values:
`alpha = max(c(h, w) - D, 0) / c(h)` for every seen (h, w) and `gamma` for every seen context. A lookup is a
vectorised binary search (log2 of the table size steps of compare-and-select), so scoring is a few gathers per
query and the tables are plain arrays, stored as safetensors.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import files
from jaxspec.errors import InputError, ModelLoadError

Array = jax.Array

PAD = 0xFFFF  # left padding of keys shorter than four tokens
UNKNOWN = 0xFFFE  # a context token that is not known (before the start of the text): such keys are never found
MAX_ORDER = 4


def _pack(grams_NxM: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`[N, M]` token ids (M <= 4) -> the `(hi, lo)` uint32 keys of the left-padded 4-slot form."""
  n, m = grams_NxM.shape
  full = np.full((n, MAX_ORDER), PAD, np.uint32)
  full[:, MAX_ORDER - m:] = grams_NxM
  return (full[:, 0] << 16) | full[:, 1], (full[:, 2] << 16) | full[:, 3]


def _pack_jnp(grams: Array) -> tuple[Array, Array]:
  """As `_pack` for `[..., M]` int32 token ids, inside jit."""
  m = grams.shape[-1]
  pad = jnp.full(grams.shape[:-1] + (MAX_ORDER - m,), PAD, jnp.uint32)
  full = jnp.concatenate([pad, grams.astype(jnp.uint32)], axis=-1)
  return (full[..., 0] << 16) | full[..., 1], (full[..., 2] << 16) | full[..., 3]


def sorted_lookup(keys_hi: Array, keys_lo: Array, values: Array, q_hi: Array, q_lo: Array, default: float) -> Array:
  """`values[i]` where `(keys_hi[i], keys_lo[i]) == (q_hi, q_lo)`, else `default`, for any query shape.

  The keys must be sorted lexicographically by (hi, lo). A binary search of ceil(log2(S + 1)) static steps.
  """
  s = keys_hi.shape[0]
  if s == 0:
    return jnp.full(q_hi.shape, default, values.dtype)
  lo = jnp.zeros(q_hi.shape, jnp.int32)
  hi = jnp.full(q_hi.shape, s, jnp.int32)
  for _ in range(int(np.ceil(np.log2(s + 1)))):
    mid = (lo + hi) // 2
    at = jnp.minimum(mid, s - 1)
    k_hi, k_lo = keys_hi[at], keys_lo[at]
    less = (k_hi < q_hi) | ((k_hi == q_hi) & (k_lo < q_lo))
    lo = jnp.where(less, mid + 1, lo)
    hi = jnp.where(less, hi, mid)
  at = jnp.minimum(lo, s - 1)
  found = (lo < s) & (keys_hi[at] == q_hi) & (keys_lo[at] == q_lo)
  return jnp.where(found, values[at], default)


@dataclasses.dataclass(frozen=True)
class NgramLM:
  """The static part of an n-gram LM (hashable, a jit static argument); its tables are `params` (`build_ngram`)."""

  order: int
  vocab_size: int

  def __post_init__(self):
    if not 2 <= self.order <= MAX_ORDER:
      raise InputError(f"n-gram order must be 2..{MAX_ORDER}, got {self.order}")
    if self.vocab_size >= UNKNOWN:
      raise InputError(f"n-gram tables pack token ids into 16 bits: the vocabulary ({self.vocab_size}) must be "
                       f"< {UNKNOWN}")

  def log_prob(self, params: dict, context_XxH: Array, tokens_X: Array) -> Array:
    """log p(token | context) for any batch shape X.

    Args:
      params: the tables.
      context_XxH: the tokens before each query, oldest first, H >= order - 1 (only the last order - 1 are read);
        -1 marks a token that is not known (e.g. before the start of a short prompt).
      tokens_X: the tokens scored.

    Returns:
      f32 log-probabilities, shape X.
    """
    ctx = jnp.where(context_XxH < 0, UNKNOWN, context_XxH)[..., context_XxH.shape[-1] - (self.order - 1):]
    p = params["unigram"][tokens_X]
    for m in range(2, self.order + 1):
      h = ctx[..., ctx.shape[-1] - (m - 1):]
      g_hi, g_lo = _pack_jnp(jnp.concatenate([h, tokens_X[..., None]], axis=-1))
      c_hi, c_lo = _pack_jnp(h)
      alpha = sorted_lookup(params["gram_hi"], params["gram_lo"], params["alpha"], g_hi, g_lo, 0.0)
      gamma = sorted_lookup(params["ctx_hi"], params["ctx_lo"], params["gamma"], c_hi, c_lo, 1.0)
      p = alpha + gamma * p
    return jnp.log(p)


def build_ngram(sequences: Iterable[Sequence[int]], order: int, vocab_size: int) -> tuple[NgramLM, dict, dict]:
  """Counts the n-grams of token sequences and builds the smoothed tables.

  Args:
    sequences: token-id sequences (each is counted on its own: no n-gram crosses two sequences).
    order: n, 2..4.
    vocab_size: size of the token vocabulary.

  Returns:
    `(lm, params, info)`: the static model, its tables (numpy arrays) and counts / discounts for the record.
  """
  lm = NgramLM(order, vocab_size)
  counts = [collections.Counter() for _ in range(order + 1)]  # counts[m][m-gram tuple]
  total = 0
  for seq in sequences:
    s = [int(t) for t in seq]
    if s and max(s) >= vocab_size:
      raise InputError(f"token id {max(s)} is outside the vocabulary of {vocab_size}")
    total += len(s)
    for m in range(1, order + 1):
      counts[m].update(zip(*(s[i:] for i in range(m))))
  if total == 0:
    raise InputError("No tokens to build an n-gram model from.")

  discounts = {}
  for m in range(1, order + 1):
    n1 = sum(1 for c in counts[m].values() if c == 1)
    n2 = sum(1 for c in counts[m].values() if c == 2)
    discounts[m] = n1 / (n1 + 2 * n2) if n1 + n2 else 0.5

  uni = np.zeros(vocab_size, np.float64)
  for (w,), c in counts[1].items():
    uni[w] = max(c - discounts[1], 0.0)
  uni = uni / total + discounts[1] * len(counts[1]) / total / vocab_size

  gram_keys, alphas, ctx_keys, gammas = [], [], [], []
  for m in range(2, order + 1):
    ctx_count = collections.Counter()
    ctx_types = collections.Counter()
    for g, c in counts[m].items():
      ctx_count[g[:-1]] += c
      ctx_types[g[:-1]] += 1
    grams = np.array(list(counts[m].keys()), np.uint32).reshape(-1, m)
    cnt = np.array(list(counts[m].values()), np.float64)
    hc = np.array([ctx_count[g[:-1]] for g in counts[m]], np.float64)
    gram_keys.append(_pack(grams))
    alphas.append(np.maximum(cnt - discounts[m], 0.0) / hc)
    ctxs = np.array(list(ctx_count.keys()), np.uint32).reshape(-1, m - 1)
    ctx_keys.append(_pack(ctxs))
    gammas.append(np.array([discounts[m] * ctx_types[h] / ctx_count[h] for h in ctx_count], np.float64))

  def table(keys, values):
    hi = np.concatenate([k[0] for k in keys])
    lo = np.concatenate([k[1] for k in keys])
    v = np.concatenate(values)
    order_ = np.lexsort((lo, hi))
    return hi[order_], lo[order_], v[order_].astype(np.float32)

  g_hi, g_lo, alpha = table(gram_keys, alphas)
  c_hi, c_lo, gamma = table(ctx_keys, gammas)
  params = {"unigram": uni.astype(np.float32), "gram_hi": g_hi, "gram_lo": g_lo, "alpha": alpha,
            "ctx_hi": c_hi, "ctx_lo": c_lo, "gamma": gamma}
  info = {"tokens": total, "ngrams": {m: len(counts[m]) for m in range(1, order + 1)},
          "discounts": {m: round(d, 4) for m, d in discounts.items()}}
  return lm, params, info


def exact_prob(params: dict, lm: NgramLM, context: Sequence[int], token: int) -> float:
  """The same probability computed on the host from the tables with a plain dictionary (a reference for tests)."""
  def find(hi, lo, vals, key_hi, key_lo, default):
    d = {(int(a), int(b)): float(v) for a, b, v in zip(hi, lo, vals)}
    return d.get((int(key_hi), int(key_lo)), default)

  ctx = [UNKNOWN if t < 0 else t for t in context][-(lm.order - 1):]
  p = float(params["unigram"][token])
  for m in range(2, lm.order + 1):
    h = ctx[len(ctx) - (m - 1):]
    (gh,), (gl,) = _pack(np.array([h + [token]], np.uint32))
    (ch,), (cl,) = _pack(np.array([h], np.uint32))
    alpha = find(params["gram_hi"], params["gram_lo"], params["alpha"], gh, gl, 0.0)
    gamma = find(params["ctx_hi"], params["ctx_lo"], params["gamma"], ch, cl, 1.0)
    p = alpha + gamma * p
  return p


# ---- files ----

def save_ngram(folder: str | os.PathLike, lm: NgramLM, params: dict, meta: dict | None = None) -> None:
  """Writes `ngram.safetensors` (the tables) and `config.json` (order, vocabulary and `meta`), atomically."""
  tables = {k: np.ascontiguousarray(v) for k, v in params.items()}
  tag = {files.EXPORT_TAG: files.export_tag(tables)}  # the pair's link (files.check_export_tag)
  cfg = {"ngram": {"order": lm.order, "vocab_size": lm.vocab_size}, **(meta or {}), **tag}
  files.write_files(folder, {"ngram.safetensors": lambda tmp: files.save_safetensors(tables, tmp, tag),
                             "config.json": files.json_writer(cfg)})


def load_ngram(folder: str | os.PathLike) -> tuple[NgramLM, dict, dict]:
  """Reads a folder written by `save_ngram`: `(lm, params as jnp arrays, config dict)`.

  Raises:
    ModelLoadError: a missing, unreadable or inconsistent file.
  """
  from safetensors.numpy import load_file

  folder = Path(folder)
  from jaxspec.loading.hf import check_part
  check_part(folder, "ngram")
  files.check_export_tag(folder, ["ngram.safetensors"])
  try:
    cfg = json.loads((folder / "config.json").read_text())
    lm = NgramLM(int(cfg["ngram"]["order"]), int(cfg["ngram"]["vocab_size"]))
    arrays = load_file(str(folder / "ngram.safetensors"))
  except FileNotFoundError as e:
    raise ModelLoadError(f"No n-gram model in {folder} ({Path(e.filename).name} is missing): build one with "
                         "`jaxspec train configs/bpd_rescore_smollm2.yaml`.") from None
  except Exception as e:  # noqa: BLE001 - corrupt JSON or safetensors
    raise ModelLoadError(f"The n-gram model in {folder} is unreadable ({type(e).__name__}: {e}): rebuild it with "
                         "`jaxspec train configs/bpd_rescore_smollm2.yaml`.") from None
  want = {"unigram", "gram_hi", "gram_lo", "alpha", "ctx_hi", "ctx_lo", "gamma"}
  if set(arrays) != want or arrays["unigram"].shape != (lm.vocab_size,) or not (
      len(arrays["gram_hi"]) == len(arrays["gram_lo"]) == len(arrays["alpha"])) or not (
      len(arrays["ctx_hi"]) == len(arrays["ctx_lo"]) == len(arrays["gamma"])):
    raise ModelLoadError(f"The n-gram tables in {folder} are inconsistent with its config.json: rebuild them with "
                         "`jaxspec train configs/bpd_rescore_smollm2.yaml`.")
  return lm, {k: jnp.asarray(v) for k, v in arrays.items()}, cfg
