"""Distilled draft models for speculative sampling: small LLaMAs that share the target's tokenizer.

A draft keeps the target's width, heads and vocabulary and has fewer layers (`training/draft.py` distills one
from the target). Its folder is a Hugging Face LLaMA folder, `config.json` + `model.safetensors` with the HF
tensor names, plus a `jaxspec_draft` entry in config.json (transformers ignores unknown keys)::

  "jaxspec_draft": {"format": 1, "embeddings": "target" | "included", "dtype": "bfloat16",
                    "target": {"vocab_size": V, "d_model": D, "embed_fingerprint": "bf16-crc32:..."}, ...}

`"embeddings": "target"`: the vocabulary-sized matrices (the token embedding, and the output head when it is not
tied) are not in the file. They are the target's own, kept frozen in training, and `load_draft(folder,
target_params)` takes them from the target's params (the same arrays, not copies). The fingerprint (a CRC32 of
the embedding rounded to bfloat16, so a float32 and a bfloat16 load of one target agree) catches a wrong target.

`"embeddings": "included"`: every tensor is in the file; the folder is a complete HF LLaMA folder that `load_hf`
reads too, and `load_draft` needs no target. `load_draft` also reads any plain HF LLaMA folder as a draft.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import files, sharding
from jaxspec.errors import ModelLoadError
from jaxspec.loading.hf import model_entries
from jaxspec.models.llama import LlamaLM

FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
VOCAB_FILE = "vocab_ids.safetensors"  # optional: the tokens of the draft's training data (`SubsetHeadLM`)
VOCAB_PARAMS = ("embed", "lm_head")  # the vocabulary-sized matrices a draft may share with its target


def embed_fingerprint(params: dict, names: Sequence[str] = VOCAB_PARAMS) -> str:
  """A fingerprint of a model's vocabulary matrices: CRC32 of the embedding (and untied head) rounded to bf16.
  `names`: the params read, in order (`VOCAB_PARAMS`: a LLaMA's embedding and untied head)."""
  crc = 0
  for name in names:
    if name in params:
      leaf = next(iter(params[name].values()))
      data = np.asarray(sharding.fetch(jnp.asarray(leaf).astype(jnp.bfloat16)))  # gathered if split over hosts
      crc = zlib.crc32(np.ascontiguousarray(data).view(np.uint16).reshape(-1).view(np.uint8), crc)
  return f"bf16-crc32:{crc:08x}"


def weights_fingerprint(params: dict, samples: int = 1024) -> str:
  """A fingerprint of all of a model's weights: CRC32 of about `samples` evenly spaced values of every parameter
  array (rounded to bf16, as `embed_fingerprint` reads them) and its shape, in the per-layer layout, leaves in sorted
  order. It tells apart models that share their embedding but not their layers (a merged fine-tune, a model with
  layers removed), which `embed_fingerprint` cannot, at the cost of a few thousand values per array. Gathers arrays
  split over hosts: every process of a multi-host run must call it at the same point."""
  from jaxspec.models.llama import unstack_layers

  tree = unstack_layers(params) if isinstance(params.get("layers"), dict) and "block" in params["layers"] else params
  crc = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    flat = jnp.ravel(jnp.asarray(leaf))
    picked = flat[::max(1, flat.size // samples)].astype(jnp.bfloat16)
    data = np.asarray(sharding.fetch(picked))
    crc = zlib.crc32(f"{jax.tree_util.keystr(path)}{tuple(np.shape(leaf))}".encode(), crc)
    crc = zlib.crc32(np.ascontiguousarray(data).view(np.uint16).reshape(-1).view(np.uint8), crc)
  return f"bf16-crc32:{crc:08x}"


def check_fingerprint(want: str | None, got: str | Callable[[], str], what: str, todo: str,
                      target: str = "a target") -> None:
  """Raises `ModelLoadError` where `what` (e.g. "The draft in FOLDER was", with its verb) recorded the embedding
  fingerprint `want` of the model it was trained for and this model's, `got` (a function: computed only where `want`
  is recorded), is another. Parts saved without a fingerprint (`want` None) are not checked. `todo` says what to do
  instead."""
  if want is None:
    return
  got = got() if callable(got) else got
  if got != want:
    this = "this target's" if target == "a target" else f"this {target.split()[-1]}'s"
    raise ModelLoadError(f"{what} trained for {target} whose embedding has fingerprint {want}; {this} is {got}. "
                         f"{todo}")


def save_draft(folder: str | os.PathLike, draft: LlamaLM, params: dict, *, include_embeddings: bool = False,
               dtype: Literal["float32", "bfloat16"] = "bfloat16", meta: dict | None = None,
               vocab_ids=None) -> None:
  """Writes a draft folder (config.json, model.safetensors, README.md) that `load_draft` reads back.

  Args:
    folder: created if missing; the three files are replaced.
    draft: the draft model (per-layer params, not `scan_layers`).
    params: its full params; with `include_embeddings=False` their embedding (and untied head) must be the
      target's, which the fingerprint records.
    include_embeddings: also write the vocabulary-sized matrices (needed when they were trained).
    dtype: the dtype of the stored tensors.
    meta: more JSON entries for `jaxspec_draft` (e.g. a training summary).
    vocab_ids: the tokens of the draft's training data (`save_draft_vocab`), written with the weights in one
      `files.write_files` (a kill never pairs new weights with an older run's ids); None: a file there is removed.
  """
  from jaxspec.loading.hf import hf_tensor_name

  if "layers" in params:
    raise ValueError("save_draft takes per-layer params (layers_0, ...), not the stacked scan_layers layout")
  cfg = draft.cfg
  folder = Path(folder)
  np_dtype = {"float32": np.float32, "bfloat16": jnp.bfloat16}[dtype]
  tensors = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    key = tuple(p.key for p in path)
    if key[0] in VOCAB_PARAMS and not include_embeddings:
      continue
    arr = np.asarray(jax.device_get(jnp.asarray(leaf).astype(np_dtype)))
    tensors[hf_tensor_name(key)] = np.ascontiguousarray(arr.T if key[-1] == "kernel" else arr)
  info = {"format": FORMAT, "embeddings": "included" if include_embeddings else "target", "dtype": dtype,
          "target": {"vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "tie_embeddings": cfg.tie_embeddings,
                     "embed_fingerprint": embed_fingerprint(params)},
          **(meta or {})}
  hf_cfg = {
      **model_entries(cfg), "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.d_ff,
      "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
      "max_position_embeddings": cfg.max_seq_len, "hidden_act": "silu", "torch_dtype": dtype,
      "jaxspec_draft": info}
  ids = None if vocab_ids is None else _vocab_ids(vocab_ids)
  tag = {files.EXPORT_TAG: files.export_tag(tensors, {} if ids is None else {"vocab_ids": ids})}  # the files' link
  hf_cfg.update(tag)
  pt = {"format": "pt", **tag}  # transformers 4.x refuses metadata without a format
  parts = {WEIGHTS_FILE: lambda tmp: files.save_safetensors(tensors, tmp, pt),
           "config.json": files.json_writer(hf_cfg)}
  if ids is not None:
    parts = {VOCAB_FILE: lambda tmp: files.save_safetensors({"vocab_ids": ids}, tmp, tag), **parts}
  else:
    (folder / VOCAB_FILE).unlink(missing_ok=True)  # an earlier export's ids would not be this draft's
  files.write_files(folder, parts)
  shared = ("The token embedding" + ("" if cfg.tie_embeddings else " and the output head")
            + " are NOT in model.safetensors: they are the target's own (frozen in training). Load with\n"
            "`jaxspec.models.draft.load_draft(folder, target_params)`, which takes them from the target.\n")
  files.write_text(
      folder / "README.md",
      f"# Draft model ({cfg.n_layers} layers, d_model {cfg.d_model}, vocabulary {cfg.vocab_size})\n\n"
      "A LLaMA-family draft for speculative sampling that shares its target's tokenizer. Hugging Face layout\n"
      f"(config.json + {WEIGHTS_FILE}, {dtype}); `jaxspec_draft` in config.json says how it was made.\n\n"
      + (shared if not include_embeddings else "Every tensor is included: this is a complete HF LLaMA folder.\n"))


def save_draft_vocab(folder: str | os.PathLike, vocab_ids) -> None:
  """Writes the token ids a subset head of the draft scores (`jaxspec.models.subset`) next to its weights."""
  tag = files.recorded_tag(folder)  # the list joins the export beside it: it carries that export's tag
  ids = _vocab_ids(vocab_ids)
  files.write_file(Path(folder) / VOCAB_FILE, lambda tmp: files.save_safetensors(
      {"vocab_ids": ids}, tmp, None if tag is None else {files.EXPORT_TAG: tag}))


def _vocab_ids(vocab_ids) -> np.ndarray:
  return np.unique(np.asarray(vocab_ids)).astype(np.int32)


def load_draft_vocab(folder: str | os.PathLike) -> np.ndarray | None:
  """The ids `save_draft_vocab` wrote, or None when the folder has none.

  Raises:
    ModelLoadError: the file is unreadable.
  """
  from safetensors.numpy import load_file

  path = Path(folder) / VOCAB_FILE
  if not path.is_file():
    return None
  try:
    return load_file(str(path))["vocab_ids"]
  except Exception as e:  # noqa: BLE001 - truncated file, missing tensor
    raise ModelLoadError(f"The draft vocabulary {path} is unreadable ({type(e).__name__}: {e}); delete it to use "
                         "the full head, or retrain the draft.") from None


def load_draft(folder: str | os.PathLike, target_params: dict | None = None, *, dtype: str = "float32",
               param_dtype: str | None = None, check_target: bool = True,
               ready: Callable[[], None] | None = None) -> tuple[LlamaLM, dict]:
  """Reads a draft folder written by `save_draft` (or any HF LLaMA folder) into `(draft_model, draft_params)`.

  Args:
    folder: the draft folder.
    target_params: the target's params; needed when the draft takes its embedding from the target.
    dtype: the draft's activation dtype, and its parameters' unless `param_dtype` is given (as `load_model`'s:
      give a draft the target's dtypes, so it shares the target's embedding array instead of a converted copy).
    param_dtype: the draft's parameter dtype when it differs from `dtype`.
    check_target: compare the target's embedding fingerprint with the one the draft was trained against.
    ready: called once the files are read, before any work on the target's arrays (which, split over the hosts of
      a multi-host run, every host must do together: `jaxspec.bench.methods.BenchContext.ready`).

  Returns:
    `(LlamaLM, params)`; shared matrices are the target's own arrays (cast only if `dtype` differs).

  Raises:
    ModelLoadError: a missing or corrupt folder, a missing target, or a target the draft was not trained for.
  """
  from safetensors import safe_open

  from jaxspec.loading.gguf_loader import check_complete, split_fused
  from jaxspec.loading.hf import _target, check_part, config_from_hf

  folder = Path(folder)
  pdt = param_dtype or dtype
  check_part(folder, "jaxspec_draft", models_ok=True)  # any LLaMA folder is a draft too
  cfg_path, w_path = folder / "config.json", folder / WEIGHTS_FILE
  if not cfg_path.is_file() or not w_path.is_file():
    raise ModelLoadError(f"{folder} does not hold a draft model (config.json + {WEIGHTS_FILE}): train one with "
                         "`jaxspec train configs/draft_smollm2.yaml` or pass the right folder.")
  files.check_export_tag(folder, [WEIGHTS_FILE, VOCAB_FILE])
  try:
    raw = json.loads(cfg_path.read_text())
    info = raw.get("jaxspec_draft", {"embeddings": "included"})
    cfg = dataclasses.replace(config_from_hf(raw), dtype=dtype, param_dtype=pdt, scan_layers=False)
    params: dict = {}
    with safe_open(str(w_path), framework="flax") as f:
      for name in f.keys():
        target = _target(name, cfg)
        if target is None or (target[0] == "lm_head" and cfg.tie_embeddings):
          continue
        for path, w in split_fused(target, f.get_tensor(name).astype(pdt), cfg, name):  # Phi-3's fused matrices
          node = params
          for k in path[:-1]:
            node = node.setdefault(k, {})
          node[path[-1]] = w.T if path[-1] == "kernel" else w
  except ModelLoadError:
    raise
  except Exception as e:  # noqa: BLE001 - truncated safetensors, bad JSON
    raise ModelLoadError(f"The draft model in {folder} is unreadable ({type(e).__name__}: {e}); retrain or re-copy "
                         "it.") from None
  if ready is not None:
    ready()
  if info.get("embeddings") == "target":
    if target_params is None:
      raise ModelLoadError(f"The draft in {folder} uses its target's embedding, which is not in the folder: pass "
                           "the target's params (load_draft(folder, target_params)).")
    emb = target_params.get("embed", {}).get("embedding")
    if emb is None or tuple(emb.shape) != (cfg.vocab_size, cfg.d_model):
      if emb is None and "shared" in target_params:
        got = "is an encoder-decoder (T5: its table is params['shared']), not a decoder-only model"
      elif emb is None:
        got = "has no token embedding (params['embed'])"
      else:
        got = f"has {tuple(emb.shape)}"
      raise ModelLoadError(f"The draft in {folder} takes its target's token embedding, of shape "
                           f"{(cfg.vocab_size, cfg.d_model)}, and this target {got}: the draft was trained for another "
                           "target model. Give a draft trained for this one.")
    for name in VOCAB_PARAMS:
      if name in target_params and (name != "lm_head" or not cfg.tie_embeddings):
        params[name] = jax.tree.map(lambda x: x if x.dtype == jnp.dtype(pdt) else x.astype(pdt),
                                    target_params[name])
    if check_target:
      check_fingerprint(info.get("target", {}).get("embed_fingerprint"), lambda: embed_fingerprint(params),
                        f"The draft in {folder} was", "Pass the draft's own target (or, in Python, load_draft(..., "
                        "check_target=False) to use it anyway: output stays exact, acceptance may drop).")
  check_complete(params, cfg, str(folder))
  return LlamaLM(cfg), params
