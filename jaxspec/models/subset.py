"""A draft whose output head scores only a subset of the vocabulary.

A small draft spends much of each step on its output head: the default 4-layer draft has about 15M weights in its
layers and 28M in the 49,152-token head it shares with the target. `SubsetHeadLM` projects onto M chosen tokens
(e.g. the ~8k seen in the draft's training data) and gives the others logit -1e30, probability 0, so every caller
still sees `[.., V]` logits over the target's vocabulary.

Exactness is untouched: a greedy draft proposes the best subset token and verification keeps only what equals the
target's argmax; a sampling draft's q is a distribution that is 0 outside the subset, which modified rejection
sampling allows (the correction draws from norm(max(0, p - q)), which covers the tokens q never proposes).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.errors import InputError

Array = jax.Array
_NEG_INF = -1e30


class _OtherHead:
  """What a model with another output head than its `base`'s keeps of the base: config, cache and its writes."""

  base: Any

  @property
  def cfg(self):
    return self.base.cfg

  @property
  def can_defer_write(self) -> bool:
    return getattr(self.base, "can_defer_write", False)

  @property
  def keys_need_positions(self) -> bool:
    return getattr(self.base, "keys_need_positions", False)

  @property
  def bounds_attention(self) -> bool:
    return getattr(self.base, "bounds_attention", False)

  def init_cache(self, batch_size: int, capacity: int, *args, **kwargs):
    return self.base.init_cache(batch_size, capacity, *args, **kwargs)

  def write_kv(self, cache, new_kv):
    return self.base.write_kv(cache, new_kv)


@dataclasses.dataclass(frozen=True)
class SubsetHeadLM(_OtherHead):
  """`base` with its output head restricted to `params["vocab_ids"]` (decoder-only models).

  Params: `{"base": the base model's params, "vocab_ids": [M] int32, "table_MxD": the base's output rows for those
  ids}`. Build them with `subset_head`.
  """

  base: Any

  @property
  def vocab_size(self) -> int:
    return self.base.vocab_size

  def forward(self, params, tokens_BxT: Array, positions_BxT: Array, cache, mask_BxTxT: Array, *, logits: bool = True,
              **kwargs):
    _, hidden_BxTxD, cache = self.base.forward(params["base"], tokens_BxT, positions_BxT, cache, mask_BxTxT,
                                               logits=False, **kwargs)
    return (self.logits(params, hidden_BxTxD) if logits else None), hidden_BxTxD, cache

  def logits(self, params, hidden_BxTxD: Array) -> Array:
    """f32 logits `[B, T, V]`: the subset's scores, -1e30 elsewhere (at the base's matmul precision, as its own
    head's)."""
    with jax.default_matmul_precision(getattr(self.cfg, "matmul_precision", None) or "highest"):
      sub_BxTxM = jnp.einsum("btd,md->btm", hidden_BxTxD, params["table_MxD"].astype(hidden_BxTxD.dtype),
                             preferred_element_type=jnp.float32)
    full = jnp.full(sub_BxTxM.shape[:-1] + (self.vocab_size,), _NEG_INF, jnp.float32)
    return full.at[..., params["vocab_ids"]].set(sub_BxTxM)


def subset_head(model, params, vocab_ids) -> tuple[SubsetHeadLM, dict]:
  """`(SubsetHeadLM, params)` scoring only `vocab_ids` of `model` (a `LlamaLM` with `output_table`).

  Raises:
    InputError: empty or out-of-range ids, or a model with its own `start` (encoder-decoders are not supported).
  """
  ids = np.unique(np.asarray(vocab_ids, np.int64))
  if ids.size == 0 or ids[0] < 0 or ids[-1] >= model.vocab_size:
    raise InputError(f"A subset head needs token ids in [0, {model.vocab_size}); got {ids.size} ids"
                     + (f" from {ids[0]} to {ids[-1]}." if ids.size else "."))
  if hasattr(model, "start"):
    raise InputError("A subset head wraps decoder-only models; this one encodes its prompts itself (`start`).")
  ids = jnp.asarray(ids, jnp.int32)
  return SubsetHeadLM(model), {"base": params, "vocab_ids": ids, "table_MxD": model.output_table(params)[ids]}


@dataclasses.dataclass(frozen=True)
class ResizedVocabLM(_OtherHead):
  """`base` (a draft) made to speak a target's vocabulary of `vocab_size` ids when its own is another size: most
  often the same tokenizer with its embedding padded to another multiple (Qwen2.5's 0.5B-3B models have 151,936 ids,
  its 7B and larger 152,064). Its logits are the base's for the ids they share, -1e30 (probability 0) for target ids
  past the base's, and the base's ids past the target's are dropped; target tokens the base has no row for are read
  as its last id (they only make its next drafts worse).

  Exactness is untouched, as for `SubsetHeadLM`: a greedy draft proposes only ids the target has, and a sampling
  draft's q is a distribution over the target's ids (0 where the base has none), which rejection sampling allows.
  Params: the base's own.
  """

  base: Any
  vocab_size: int

  def forward(self, params, tokens_BxT: Array, positions_BxT: Array, cache, mask_BxTxT: Array, *, logits: bool = True,
              **kwargs):
    tokens_BxT = jnp.minimum(tokens_BxT, self.base.vocab_size - 1)
    _, hidden_BxTxD, cache = self.base.forward(params, tokens_BxT, positions_BxT, cache, mask_BxTxT, logits=False,
                                               **kwargs)
    return (self.logits(params, hidden_BxTxD) if logits else None), hidden_BxTxD, cache

  def logits(self, params, hidden_BxTxD: Array) -> Array:
    """f32 logits `[B, T, vocab_size]`: the base's, cut or padded with -1e30."""
    own = self.base.logits(params, hidden_BxTxD).astype(jnp.float32)[..., :self.vocab_size]
    pad = self.vocab_size - own.shape[-1]
    return jnp.pad(own, [(0, 0)] * (own.ndim - 1) + [(0, pad)], constant_values=_NEG_INF) if pad else own

  def output_table(self, params) -> Array:
    """The base's output rows for the target's ids (zero rows where the base has none)."""
    table = self.base.output_table(params)[:self.vocab_size]
    return jnp.pad(table, [(0, self.vocab_size - table.shape[0]), (0, 0)])


def resize_vocab(model, params, vocab_size: int) -> tuple[Any, Any]:
  """`(model, params)` of a draft whose logits cover a target's `vocab_size` ids (`ResizedVocabLM`); the draft as it
  is when the sizes already agree.

  Raises:
    InputError: a model with its own `start` (encoder-decoders are not supported).
  """
  if model.vocab_size == vocab_size:
    return model, params
  if hasattr(model, "start"):
    raise InputError("A draft of another vocabulary size can be resized for decoder-only models only; this one "
                     "encodes its prompts itself (`start`).")
  return ResizedVocabLM(model, int(vocab_size)), params
