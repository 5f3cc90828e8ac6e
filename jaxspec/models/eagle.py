"""Feature-level draft heads (EAGLE, Li et al. 2024): a draft that reads the target's own final hidden states.

A draft model that starts from tokens has to recompute what the target already knows. This draft instead takes, at
position t, the target's final hidden state f_t and the embedding of the token x_{t+1} that followed it, mixes them
with one linear layer, runs `n_layers` LLaMA decoder layers (with their own small KV cache) and predicts the next
feature f̂_{t+1}; the target's own output rows turn f̂_{t+1} into a distribution over x_{t+2}. Drafting further,
the draft feeds its predicted feature back in place of the target's (`jaxspec.decoding.eagle.EagleDrafter`).

Parameters (`EagleDraft.init_params`, `load_eagle`):

  fc        {"kernel": [2D, D], "bias": [D]}     input: concat(embedding of x_{t+1}, f_t)
  layers_i  one LLaMA block each (the target's block layout)
  norm      {"scale": [D]}                       the prediction lives in the target's post-final-norm space
  embed_VxD                                      the target's token embedding (frozen, not shipped)
  vocab_ids [M], table_MxD                       the output rows the draft scores (a subset of the vocabulary, or
                                                 all of it); the others get logit -1e30, as in `SubsetHeadLM`

A folder (`save_eagle`) holds config.json (`jaxspec_eagle`), model.safetensors (fc, layers, norm) and
vocab_ids.safetensors; the vocabulary-sized matrices come from the target at load time.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import files
from jaxspec.errors import ModelLoadError
from jaxspec.models.cache import KVCache
from jaxspec.models.llama import Block, LlamaConfig, LlamaLM, RMSNorm, rope_tables

Array = jax.Array
_NEG_INF = -1e30
FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
VOCAB_FILE = "vocab_ids.safetensors"


class _Core(nn.Module):
  """fc -> blocks -> norm, over T entries against a KV cache."""

  cfg: LlamaConfig
  n_layers: int

  @nn.compact
  def __call__(self, emb_BxTxD, feat_BxTxD, positions_BxT, cache: KVCache, mask_BxTxT, cache_mask_BxTxS):
    cfg = self.cfg
    x = nn.Dense(cfg.d_model, use_bias=True, name="fc")(jnp.concatenate([emb_BxTxD, feat_BxTxD], axis=-1))
    rope = rope_tables(positions_BxT, cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len)
    committed = jnp.arange(cache.capacity)[None, :] < cache.lengths[:, None]
    visible = (committed if cache_mask_BxTxS is None else cache_mask_BxTxS, mask_BxTxT)
    ks, vs = [], []
    for i in range(self.n_layers):
      x, (k, v) = Block(cfg, name=f"layers_{i}")(x, (cache.k[i], cache.v[i]), rope, cache.lengths, visible)
      ks.append(k)
      vs.append(v)
    return RMSNorm(cfg.norm_eps, jnp.float32, name="norm")(x), cache.replace(k=tuple(ks), v=tuple(vs))


@dataclasses.dataclass(frozen=True)
class EagleDraft:
  """A feature-level draft for a decoder-only LLaMA-family target. Static and hashable (a jit argument).

  Attributes:
    cfg: the target's config (the draft's blocks have the target's width and heads; `load_eagle` and the training
      set its dtypes to float32, so a bfloat16 target's draft still computes and holds its params in float32).
    n_layers: the draft's decoder layers (EAGLE uses 1).
  """

  cfg: LlamaConfig
  n_layers: int = 1

  def __post_init__(self):
    if self.n_layers < 1:
      raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")

  @property
  def vocab_size(self) -> int:
    return self.cfg.vocab_size

  @property
  def d_model(self) -> int:
    return self.cfg.d_model

  def _cache_model(self) -> LlamaLM:
    return LlamaLM(dataclasses.replace(self.cfg, n_layers=self.n_layers, scan_layers=False))

  def init_cache(self, batch_size: int, capacity: int) -> KVCache:
    return self._cache_model().init_cache(batch_size, capacity)

  def init_params(self, rng: Array, target_params: dict, vocab_ids=None, init: str = "target_last") -> dict:
    """Fresh draft params for a target.

    Args:
      rng: key for the fresh weights (fc, and the blocks with `init="random"`).
      target_params: the target's params (per-layer layout): the embedding and output rows are taken from them.
      vocab_ids: the token ids the draft scores (None: all).
      init: "target_last": the blocks start as the target's last `n_layers` layers and the norm as its final norm;
        "random": fresh blocks, unit norm.
    """
    d = self.cfg.d_model
    b, f = 1, 2
    cache = self.init_cache(b, f)
    z = jnp.zeros((b, f, d), jnp.float32)
    pos = jnp.zeros((b, f), jnp.int32)
    params = dict(_Core(self.cfg, self.n_layers).init(rng, z, z, pos, cache, jnp.ones((b, f, f), bool),
                                                      None)["params"])
    if init == "target_last":
      n_target = sum(1 for k in target_params if k.startswith("layers_"))
      if n_target < self.n_layers:
        stacked = (" (these hold stacked layers: load the target without scan_layers)" if "layers" in target_params
                   else "")
        raise ValueError(f"init=target_last copies the target's last {self.n_layers} layers from per-layer params "
                         f"(layers_0, ...); the target params hold {n_target}{stacked}")
      for i in range(self.n_layers):
        src = target_params[f"layers_{n_target - self.n_layers + i}"]
        params[f"layers_{i}"] = jax.tree.map(lambda x: jnp.array(x, jnp.float32), src)
      params["norm"] = jax.tree.map(lambda x: jnp.array(x, jnp.float32), target_params["final_norm"])
    elif init != "random":
      raise ValueError(f"init must be target_last or random, got {init!r}")
    return {**params, **self.vocab_params(target_params, vocab_ids)}

  def vocab_params(self, target_params: dict, vocab_ids=None) -> dict:
    """The frozen, vocabulary-sized part: the target's embedding and the output rows of `vocab_ids` (None: all)."""
    target = LlamaLM(self.cfg)
    ids = np.arange(self.vocab_size) if vocab_ids is None else np.unique(np.asarray(vocab_ids, np.int64))
    if ids.size == 0 or ids[0] < 0 or ids[-1] >= self.vocab_size:
      raise ValueError(f"vocab_ids must be token ids in [0, {self.vocab_size})")
    ids = jnp.asarray(ids, jnp.int32)
    return {"embed_VxD": target.input_table(target_params), "vocab_ids": ids,
            "table_MxD": target.output_table(target_params)[ids]}

  def forward(self, params, feat_BxTxD: Array, tokens_BxT: Array, positions_BxT: Array, cache: KVCache,
              mask_BxTxT: Array, cache_mask_BxTxS: Array | None = None) -> tuple[Array, KVCache]:
    """T entries `(f_t, x_{t+1})` at positions t -> predicted features f̂_{t+1} `[B, T, D]` (f32) and the cache with
    their keys and values written at `[lengths, lengths + T)` (lengths unchanged). Jittable.

    `cache_mask_BxTxS` (optional) says which cache slots each entry reads; None reads `[0, lengths)`.
    """
    own = {k: v for k, v in params.items() if k not in ("embed_VxD", "vocab_ids", "table_MxD")}
    emb_BxTxD = params["embed_VxD"][jnp.maximum(tokens_BxT, 0)].astype(jnp.float32)
    return _Core(self.cfg, self.n_layers).apply({"params": own}, emb_BxTxD, feat_BxTxD.astype(jnp.float32),
                                                positions_BxT, cache, mask_BxTxT, cache_mask_BxTxS)

  def subset_logits(self, params, feat_BxTxD: Array) -> Array:
    """Scores `[B, T, M]` of the draft's M tokens (`params["vocab_ids"]`)."""
    return jnp.einsum("btd,md->btm", feat_BxTxD, params["table_MxD"].astype(feat_BxTxD.dtype),
                      preferred_element_type=jnp.float32)

  def logits(self, params, feat_BxTxD: Array) -> Array:
    """f32 logits `[B, T, V]` over the target's vocabulary: the draft's tokens scored, -1e30 elsewhere."""
    sub = self.subset_logits(params, feat_BxTxD)
    full = jnp.full(sub.shape[:-1] + (self.vocab_size,), _NEG_INF, jnp.float32)
    return full.at[..., params["vocab_ids"]].set(sub)


def own_params(params: dict) -> dict:
  """The trained part of the draft's params (what a folder stores)."""
  return {k: v for k, v in params.items() if k not in ("embed_VxD", "vocab_ids", "table_MxD")}


def save_eagle(folder: str | os.PathLike, draft: EagleDraft, params: dict, *,
               dtype: Literal["float32", "bfloat16"] = "bfloat16", meta: dict | None = None) -> None:
  """Writes config.json, model.safetensors and vocab_ids.safetensors (each whole: `jaxspec.files`)."""
  from flax.traverse_util import flatten_dict
  from jaxspec.models.draft import embed_fingerprint

  np_dtype = {"float32": np.float32, "bfloat16": jnp.bfloat16}[dtype]
  flat = flatten_dict(jax.device_get(own_params(params)), sep=".")
  tensors = {k: np.ascontiguousarray(np.asarray(jnp.asarray(v).astype(np_dtype))) for k, v in flat.items()}
  vocab = {"vocab_ids": np.asarray(jax.device_get(params["vocab_ids"]), np.int32)}
  cfg = draft.cfg
  info = {"format": FORMAT, "n_layers": draft.n_layers, "dtype": dtype,
          "target": {"vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "n_heads": cfg.n_heads,
                     "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "d_ff": cfg.d_ff,
                     "embed_fingerprint": embed_fingerprint({"embed": {"embedding": params["embed_VxD"]}})},
          **(meta or {})}
  tag = {files.EXPORT_TAG: files.export_tag(tensors, vocab)}  # the three files' link (files.check_export_tag)
  files.write_files(folder, {WEIGHTS_FILE: lambda tmp: files.save_safetensors(tensors, tmp, tag),
                             VOCAB_FILE: lambda tmp: files.save_safetensors(vocab, tmp, tag),
                             "config.json": files.json_writer({"jaxspec_eagle": info, **tag})})


def load_eagle(folder: str | os.PathLike, target: LlamaLM, target_params: dict, *,
               check_target: bool = True, ready: Callable[[], None] | None = None) -> tuple[EagleDraft, dict]:
  """Reads a folder written by `save_eagle` into `(EagleDraft, params)` for `target`. `ready` is called once the
  files are read, before any work on the target's arrays (as in `jaxspec.models.draft.load_draft`).

  Raises:
    ModelLoadError: a missing or corrupt folder, or a target other than the one the draft was trained for.
  """
  from flax.traverse_util import unflatten_dict
  from safetensors.numpy import load_file

  from jaxspec.models.draft import check_fingerprint, embed_fingerprint

  folder = Path(folder)
  parts = [folder / "config.json", folder / WEIGHTS_FILE, folder / VOCAB_FILE]
  from jaxspec.loading.hf import check_part
  check_part(folder, "jaxspec_eagle")
  if not all(f.is_file() for f in parts):
    raise ModelLoadError(f"{folder} does not hold a feature-level draft (config.json, {WEIGHTS_FILE}, {VOCAB_FILE}): "
                         "train one with `jaxspec train configs/eagle_smollm2.yaml` or pass the right folder.")
  if getattr(target, "is_encoder_decoder", False) or not isinstance(target, LlamaLM):
    raise ModelLoadError("Feature-level drafts read a decoder-only LLaMA-family target's hidden states; this target "
                         f"is a {type(target).__name__}.")
  files.check_export_tag(folder, [WEIGHTS_FILE, VOCAB_FILE])
  try:
    info = json.loads(parts[0].read_text())["jaxspec_eagle"]
    flat = load_file(str(parts[1]))
    ids = load_file(str(parts[2]))["vocab_ids"]
    n_layers = int(info["n_layers"])
  except Exception as e:  # noqa: BLE001 - truncated safetensors, bad JSON, missing keys
    raise ModelLoadError(f"The feature-level draft in {folder} is unreadable ({type(e).__name__}: {e}); retrain or "
                         "re-copy it.") from None
  cfg = dataclasses.replace(target.cfg, dtype="float32", param_dtype="float32", scan_layers=False)
  want = info.get("target", {})
  got = {"vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
         "head_dim": cfg.head_dim, "d_ff": cfg.d_ff}
  wrong = [f"{k} {want.get(k)} there, {v} here" for k, v in got.items() if want.get(k) != v]
  if wrong:
    raise ModelLoadError(f"The feature-level draft in {folder} was trained for another target ({'; '.join(wrong)}); "
                         "train one for this target.")
  if ready is not None:
    ready()
  draft = EagleDraft(cfg, n_layers)
  params = {**unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()}, sep="."),
            **draft.vocab_params(target_params, ids)}
  ref = jax.eval_shape(lambda: own_params(draft.init_params(jax.random.key(0), target_params, ids, init="random")))
  if jax.tree.structure(ref) != jax.tree.structure(own_params(params)) or any(
      a.shape != b.shape for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(own_params(params)))):
    raise ModelLoadError(f"The feature-level draft in {folder} does not have the tensors of a {n_layers}-layer draft "
                         "for this target; retrain or re-copy it.")
  if check_target:
    embed = {"embed": {"embedding": params["embed_VxD"]}}
    check_fingerprint(want.get("embed_fingerprint"), lambda: embed_fingerprint(embed),
                      f"The feature-level draft in {folder} was", "Pass its own target.")
  return draft, params

