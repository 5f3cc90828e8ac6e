"""Blockwise parallel decoding heads (Stern, Shazeer, Uszkoreit 2018).

Head i (i = 1..k) reads the target's final hidden state h_t at position t and predicts token t + 1 + i, i.e. the
i-th token after the one the base model itself predicts. Each head is one feed-forward layer with a residual
connection, `h + W_out,i · silu(W_in,i · [h; e(x_{t+1})])`, followed by the target's own output projection (shared,
frozen). `W_out` starts at zero, so every head starts as the base next-token prediction.

`e(x_{t+1})` is the embedding of the token the target has just chosen at t+1; the decode loop always knows it when
it drafts (it is the pending token), so the heads may read it (`use_next_token`, on by default; Stern's heads read
h_t only, and `use_next_token=False` gives exactly that).

The output projection may be restricted to a subset of the vocabulary (`vocab_ids`, e.g. the tokens seen in the
training data): the heads only ever propose those tokens, and each draft costs k·M instead of k·V multiply-adds.
Drafts are only proposals: the target verifies every token, so the subset changes speed, never the output.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import files
from jaxspec.errors import ModelLoadError

Array = jax.Array


MAX_HEADS = 16  # the most heads a BPDConfig takes (drafts of k + 1 tokens per step)


@dataclasses.dataclass(frozen=True)
class BPDConfig:
  num_heads: int = 4  # k
  d_model: int = 576
  d_hidden: int = 576  # width of each head's feed-forward layer
  use_next_token: bool = True
  vocab_subset: int = 0  # M > 0: the heads project onto M token ids (stored with the params); 0 = whole vocabulary

  def __post_init__(self):
    if not 1 <= self.num_heads <= MAX_HEADS:
      raise ValueError(f"num_heads must be in 1..{MAX_HEADS}, got {self.num_heads}")
    if self.d_model < 1 or self.d_hidden < 1:
      raise ValueError(f"d_model and d_hidden must be >= 1, got {self.d_model} and {self.d_hidden}")


class BPDHeads(nn.Module):
  """k residual feed-forward heads: `[..., D]` (+ next-token embeddings `[..., D]`) -> `[..., k, D]`."""

  cfg: BPDConfig

  @nn.compact
  def __call__(self, hidden_NxD: Array, next_emb_NxD: Array | None = None) -> Array:
    cfg = self.cfg
    x = hidden_NxD
    if cfg.use_next_token:
      x = jnp.concatenate([hidden_NxD, next_emb_NxD], axis=-1)
    w_in = self.param("w_in", nn.initializers.lecun_normal(batch_axis=(0,)),
                      (cfg.num_heads, x.shape[-1], cfg.d_hidden), jnp.float32)
    b_in = self.param("b_in", nn.initializers.zeros, (cfg.num_heads, cfg.d_hidden), jnp.float32)
    w_out = self.param("w_out", nn.initializers.zeros, (cfg.num_heads, cfg.d_hidden, cfg.d_model), jnp.float32)
    pre_NxKxF = jnp.einsum("...d,kdf->...kf", x.astype(jnp.float32), w_in)
    u_NxKxF = nn.silu(pre_NxKxF + b_in.reshape((1,) * (pre_NxKxF.ndim - 2) + b_in.shape))
    return hidden_NxD[..., None, :].astype(jnp.float32) + jnp.einsum("...kf,kfd->...kd", u_NxKxF, w_out)


@dataclasses.dataclass(frozen=True)
class BPDModel:
  """The heads behind a static, hashable wrapper (like `LlamaLM`). Params: `{"heads": ..., "vocab_ids": [M]}`."""

  cfg: BPDConfig

  @property
  def module(self) -> BPDHeads:
    return BPDHeads(self.cfg)

  @property
  def num_heads(self) -> int:
    return self.cfg.num_heads

  def init_params(self, rng: Array, vocab_ids: np.ndarray | None = None) -> dict:
    d = self.cfg.d_model
    heads = self.module.init(rng, jnp.zeros((1, d)), jnp.zeros((1, d)) if self.cfg.use_next_token else None)
    params = {"heads": heads["params"]}
    if self.cfg.vocab_subset:
      if vocab_ids is None or len(vocab_ids) != self.cfg.vocab_subset:
        raise ValueError(f"vocab_subset={self.cfg.vocab_subset} needs that many vocab_ids")
      params["vocab_ids"] = jnp.asarray(vocab_ids, jnp.int32)
    return params

  def head_states(self, params, hidden_NxD: Array, next_emb_NxD: Array | None) -> Array:
    """`[..., k, D]` head outputs, ready for the output projection."""
    return self.module.apply({"params": params["heads"]}, hidden_NxD, next_emb_NxD)


def output_projection(model, target_params, bpd_params: dict) -> Array:
  """`[D, M]` f32 matrix the heads' states are projected with: the target's output embedding, restricted to the
  heads' vocabulary subset if they have one. Computed once per generation, outside the decode loop."""
  table_VxD = model.output_table(target_params)
  if "vocab_ids" in bpd_params:
    table_VxD = table_VxD[bpd_params["vocab_ids"]]
  return table_VxD.astype(jnp.float32).T




# ---- files: the trained heads are small enough to ship as safetensors + a JSON config ----

def save_bpd(folder: str | os.PathLike, bpd: BPDModel, params: dict, meta: dict | None = None,
             dtype: str = "float16") -> None:
  """Writes `config.json` and `heads.safetensors` (weights in `dtype`, float16 by default: half the size of f32 and
  well within its range for these small weights; they are read back as f32)."""
  flat = {f"heads.{k}": np.asarray(v, np.float32).astype(dtype) for k, v in params["heads"].items()}
  if "vocab_ids" in params:
    flat["vocab_ids"] = np.asarray(params["vocab_ids"], np.int32)
  # Neither file is ever left half-written: the shipped folder is the default output of
  # `jaxspec train configs/bpd_smollm2.yaml`, so a killed export must not break it.
  tag = {files.EXPORT_TAG: files.export_tag(flat)}  # the pair's link (files.check_export_tag)
  files.write_files(folder, {"heads.safetensors": lambda tmp: files.save_safetensors(flat, tmp, tag),
                             "config.json": files.json_writer({"bpd": dataclasses.asdict(bpd.cfg), **(meta or {}),
                                                               **tag})})


# The target's vocabulary matrices a heads fingerprint covers: a LLaMA's embedding and untied head, a T5's shared
# embedding and untied head (the heads read the input table with `use_next_token` and project through the output one).
HEADS_TARGET_PARAMS = ("embed", "shared", "lm_head")


def target_fingerprint(target_params: dict) -> str:
  """The fingerprint BPD heads record of the target they were trained for (`embed_fingerprint` over
  `HEADS_TARGET_PARAMS`; for a LLaMA the same as a distilled draft's). Gathers arrays split over hosts: every process
  of a multi-host run must call it at the same point."""
  from jaxspec.models.draft import embed_fingerprint
  return embed_fingerprint(target_params, HEADS_TARGET_PARAMS)


def check_heads_target(folder: str | os.PathLike, target_params: dict, config: dict | None = None,
                       fingerprint: str | None = None, todo: str | None = None) -> None:
  """Raises `ModelLoadError` where the heads in `folder` record the embedding fingerprint of the target they were
  trained for (`target_fingerprint`) and `target_params` have another: heads of the right shapes
  trained for another model run without an error and keep the output exact, but their drafts are rarely accepted.
  Heads written without a fingerprint are not checked. `config`: the folder's config.json, where already read;
  `fingerprint`: the target's `target_fingerprint`, where already computed; `todo`: what to do about heads of
  another model (not jointly trained ones), where not to use heads trained for this one."""
  if config is None:
    try:
      config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
      return  # load_bpd says what is wrong with the folder
  from jaxspec.models.draft import check_fingerprint

  if not isinstance(config, dict):
    return  # load_bpd says what is wrong with the config
  want = (config.get("target") or {}).get("embed_fingerprint")
  got = lambda: fingerprint or target_fingerprint(target_params)
  what = f"The BPD heads in {folder} were"
  if (config.get("training") or {}).get("config", {}).get("train", {}).get("objective") == "joint":
    todo = (f"They were trained jointly with a fine-tuned base: they go with the base their run exported, "
            f"{Path(folder) / 'base'} (load it as the model, e.g. --model FOLDER/base).")
  else:
    todo = ("They were trained for another model (their drafts would be accepted less often, or hardly at all). "
            + (todo or "Use heads trained for this one."))
  check_fingerprint(want, got, what, todo)


def load_bpd(folder: str | os.PathLike, num_heads: int | None = None,
             target_params: dict | None = None) -> tuple[BPDModel, dict]:
  """Reads heads written by `save_bpd`; `num_heads` keeps only the first heads (head i never depends on others).

  With `target_params`, the target's embedding fingerprint (`target_fingerprint`) is compared
  with the one the heads were trained against, where their config records it: heads of the right shapes trained for
  another model would run without an error and keep the output exact, but draft tokens that are rarely accepted.

  Raises:
    ModelLoadError: a missing folder or file, a corrupt file, parameters that do not match the config, or (with
      `target_params`) heads trained for a target with another embedding.
  """
  from safetensors.numpy import load_file

  folder = Path(folder)
  cfg_path, w_path = folder / "config.json", folder / "heads.safetensors"
  from jaxspec.loading.hf import check_part
  check_part(folder, "bpd")
  if not cfg_path.is_file() or not w_path.is_file():
    raise ModelLoadError(f"{folder} does not hold BPD heads (config.json + heads.safetensors): train them with "
                         "`jaxspec train configs/bpd_smollm2.yaml` or pass the right folder.")
  files.check_export_tag(folder, ["heads.safetensors"])
  try:
    raw = json.loads(cfg_path.read_text())
    # Every field: save_bpd writes them all, and a default taken for a missing one would misread the weights (a
    # missing vocab_subset ignored the stored vocabulary ids and drafted over the whole vocabulary).
    absent = [f.name for f in dataclasses.fields(BPDConfig) if f.name not in raw["bpd"]]
    if absent:
      raise ValueError(f"the config's 'bpd' section lacks {', '.join(absent)}")
    cfg = BPDConfig(**raw["bpd"])
    flat = load_file(str(w_path))
  except Exception as e:  # noqa: BLE001 - truncated file, bad JSON, unknown or missing keys
    raise ModelLoadError(f"BPD heads in {folder} are unreadable ({type(e).__name__}: {e}); retrain or re-copy "
                         "them.") from None
  heads = {k[len("heads."):]: jnp.asarray(v, jnp.float32) for k, v in flat.items() if k.startswith("heads.")}
  expect = {"w_in": (cfg.num_heads, cfg.d_model * (2 if cfg.use_next_token else 1), cfg.d_hidden),
            "b_in": (cfg.num_heads, cfg.d_hidden), "w_out": (cfg.num_heads, cfg.d_hidden, cfg.d_model)}
  got = {k: tuple(v.shape) for k, v in heads.items()}
  if got != expect:
    raise ModelLoadError(f"BPD heads in {folder} have shapes {got}, but their config says {expect}.")
  params = {"heads": heads}
  if cfg.vocab_subset:
    params["vocab_ids"] = jnp.asarray(flat["vocab_ids"], jnp.int32)
  if target_params is not None:
    check_heads_target(folder, target_params, raw)
  if num_heads is not None:
    # (a string failed with a TypeError, 2.5 deep in the slicing, and True loaded one head). Any integer a caller
    # holds (numpy or JAX, 0-d arrays too) is taken, as a Python int: the config is a jit static argument.
    try:
      if isinstance(num_heads, (bool, np.bool_)) or np.dtype(getattr(num_heads, "dtype", int)) == bool:
        raise TypeError
      num_heads = operator.index(num_heads)
    except TypeError:
      raise ModelLoadError(f"num_heads must be a whole number (1 to {cfg.num_heads} for {folder}) or None for all, "
                           f"got {num_heads!r}.") from None
    if not 1 <= num_heads <= cfg.num_heads:
      raise ModelLoadError(f"Asked for {num_heads} heads; {folder} has {cfg.num_heads}: ask for 1 to {cfg.num_heads}, "
                           "or train more (heads.num_heads in the training config, e.g. configs/bpd_smollm2.yaml).")
    cfg = dataclasses.replace(cfg, num_heads=num_heads)
    params["heads"] = {k: v[:num_heads] for k, v in heads.items()}
  return BPDModel(cfg), params
