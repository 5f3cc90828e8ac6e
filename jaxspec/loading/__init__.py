"""Models and tokenizers from the formats users have: GGUF files, Hugging Face folders, the embedded default."""

from __future__ import annotations

import logging
import os

from jaxspec.loading.default import default_model_path
from jaxspec.loading.errors import ModelLoadError


DTYPES = ("float32", "bfloat16")
"""What `load_model(dtype=...)`, `jaxspec generate --dtype` and `jaxspec bench --dtype` take.

float32 is the default on every platform. On XLA:CPU it is also the fastest: bfloat16 matrix-vector products run
several times slower there. On any platform bfloat16 activations break the methods' token identity with greedy
decoding: a block of k tokens verified in one forward and k one-token steps accumulate in different orders, and
bfloat16 rounding turns those last-bit differences into other argmax choices at near-ties (measured on the default
model: benchmarks/README.md, "bfloat16"). Take bfloat16 for speed or memory on GPU and TPU knowing that. The same
holds for float32 products computed at reduced precision, which is JAX's default on TPU and recent GPUs: jaxspec's
models compute them in float32 unless told otherwise (`load_model(matmul_precision=...)`).
"""


def check_dtype(dtype: str) -> str:
  """`dtype` if jaxspec loads models in it.

  Raises:
    ModelLoadError: another name, with the choices.
  """
  if dtype not in DTYPES:
    raise ModelLoadError(f"Unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
  return dtype


def load_model(path: str | None = None, *, dtype: str = "float32", scan_layers: bool = False,
               param_dtype: str | None = None, matmul_precision: str = "highest", mesh=None,
               context: int | None = None):
  """Loads a model and its tokenizer.

  Args:
    path: a .gguf file, a Hugging Face folder (config.json + *.safetensors + tokenizer.json), or None for the
      embedded default (SmolLM2-135M-Instruct).
    dtype: activation dtype, and parameter dtype unless `param_dtype` is given: "float32" (default) or
      "bfloat16" (see `DTYPES`).
    scan_layers: stack layers under `lax.scan`: one compiled layer instead of one per layer, so programs compile
      faster (worth it on TPU and for deep models); on XLA:CPU separate layers step faster.
    param_dtype: the weights' dtype when it differs from `dtype` (as Flax's `param_dtype`). bfloat16 weights
      computed in float32 kept every method token-identical to greedy decoding where bfloat16 activations did not;
      on XLA:CPU they were no faster and the compiled programs larger (benchmarks/README.md, "bfloat16").
    matmul_precision: how float32 matrix products run on GPU and TPU: "highest" (float32 arithmetic), "high" or
      "default" (JAX's default: faster, and near-ties of the argmax can then differ between a verify forward and
      one-token steps); see `jaxspec.models.llama.MATMUL_PRECISIONS`. XLA:CPU computes float32 in full either way.
    mesh: a `jax.sharding.Mesh` or mesh spec ("data=1,model=8"): the weights are read into host memory (the CPU
      device) and each is placed on the mesh as the partitioner splits it (`jaxspec.sharding`), so no accelerator
      ever holds the whole model: one that fits only split over the chips loads. None: the default device.
    context: the model's context in tokens (prompt and output; `model.cfg.max_seq_len`), at most what its file
      declares. None: what it declares, bounded where jaxspec computes the model exactly only within less, each bound
      logged (LongRoPE's original context: Phi-3 128k, Phi-3.5, Phi-4-mini). A context past a LongRoPE model's
      original one turns its long factors on at every position, as llama.cpp does for such a context (transformers
      chooses per forward, by the sequence's length). Decoder-only models only.

  Returns:
    `(model, params, tokenizer)`.

  Raises:
    ModelLoadError: with a message that says what to do.
    InputError: a `mesh` that is not a valid shape for the devices.
  """
  if mesh is None:
    return _load(path, dtype, scan_layers, param_dtype, matmul_precision, context)
  import jax

  from jaxspec import sharding

  mesh = mesh if isinstance(mesh, jax.sharding.Mesh) else sharding.make_mesh(mesh)  # a bad mesh fails before loading
  try:
    host = jax.local_devices(backend="cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS without cpu: read onto the default device, as without a mesh
    host = None
  with jax.default_device(host):
    model, params, tokenizer = _load(path, dtype, scan_layers, param_dtype, matmul_precision, context)
  return model, sharding.partitioner(mesh, model).shard_params(params), tokenizer


def check_model_folder(path: str) -> str:
  """Checks everything of a model folder that needs no weights (the config, the weight files' headers, that a
  tokenizer.json is there), as loading it does first (a model's weights can take minutes to load); returns the
  tokenizer.json path.

  Raises:
    ModelLoadError: what is wrong, and what to do.
  """
  from jaxspec.loading.hf import check_hf_folder

  check_hf_folder(path)
  tok_json = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(tok_json):
    raise ModelLoadError(f"{path!r} has no tokenizer.json; copy it from the model's original folder (for a model "
                         "`jaxspec train` exported, from the base model's folder, or rerun the training command), "
                         "or write one with transformers from its tokenizer.model "
                         "(`AutoTokenizer.from_pretrained(folder).save_pretrained(folder)`).")
  return tok_json


def _load(path, dtype, scan_layers, param_dtype, matmul_precision, context):
  from jaxspec.loading.tokenizer import Tokenizer

  from jaxspec.models.llama import MATMUL_PRECISIONS, with_matmul_precision

  check_dtype(dtype)
  if param_dtype is not None:
    check_dtype(param_dtype)
  if matmul_precision not in MATMUL_PRECISIONS:
    raise ModelLoadError(f"Unknown matmul precision {matmul_precision!r}: use one of {', '.join(MATMUL_PRECISIONS)}.")
  if path is None:
    try:
      path = default_model_path()
    except FileNotFoundError as e:
      raise ModelLoadError(str(e)) from e
  if os.path.isdir(path):
    from jaxspec.loading.hf import load_hf

    tok_json = check_model_folder(path)
    tokenizer = Tokenizer.from_tokenizer_json(tok_json)
    model, params = load_hf(path, dtype=dtype, scan_layers=scan_layers, param_dtype=param_dtype, context=context)
    if tokenizer.vocab_size > model.cfg.vocab_size:  # (fewer is common: embeddings padded to a round size)
      logging.getLogger("jaxspec.loading").warning(
          "%s: tokenizer.json has %d tokens but config.json's vocab_size is %d: text that encodes to an id from %d up "
          "cannot be fed to the model (such a prompt is refused). The tokenizer may be another model's.",
          path, tokenizer.vocab_size, model.cfg.vocab_size, model.cfg.vocab_size)
    return with_matmul_precision(model, matmul_precision), params, tokenizer
  if not os.path.exists(path):
    raise ModelLoadError(f"No model at {path!r}: pass a .gguf file or a Hugging Face model folder.")
  from jaxspec.loading.gguf_loader import load_gguf, open_gguf

  reader = open_gguf(path)
  try:
    tokenizer = Tokenizer.from_gguf(reader)
  except ModelLoadError:
    raise
  except Exception as e:
    raise ModelLoadError(f"Could not build a tokenizer from {path!r}: {e}") from e
  model, params = load_gguf(reader, dtype=dtype, scan_layers=scan_layers, param_dtype=param_dtype, context=context)
  return with_matmul_precision(model, matmul_precision), params, tokenizer


__all__ = ["DTYPES", "ModelLoadError", "check_dtype", "check_model_folder", "default_model_path", "load_model"]
