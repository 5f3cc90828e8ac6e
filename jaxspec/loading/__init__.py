"""Models and tokenizers from the formats users have: GGUF files, Hugging Face folders, the embedded default."""

from __future__ import annotations

import os

from jaxspec.loading.default import default_model_path
from jaxspec.loading.errors import ModelLoadError


def load_model(path: str | None = None, *, dtype: str = "float32", scan_layers: bool = False):
  """Loads a model and its tokenizer.

  Args:
    path: a .gguf file, a Hugging Face folder (config.json + *.safetensors + tokenizer.json), or None for the
      embedded default (SmolLM2-135M-Instruct).
    dtype: parameter and activation dtype.
    scan_layers: stack layers under `lax.scan`.

  Returns:
    `(model, params, tokenizer)`.

  Raises:
    ModelLoadError: with a message that says what to do.
  """
  from jaxspec.loading.tokenizer import Tokenizer

  if path is None:
    try:
      path = default_model_path()
    except FileNotFoundError as e:
      raise ModelLoadError(str(e)) from e
  if os.path.isdir(path):
    from jaxspec.loading.hf import load_hf

    model, params = load_hf(path, dtype=dtype, scan_layers=scan_layers)
    tok_json = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tok_json):
      raise ModelLoadError(f"{path!r} has no tokenizer.json; copy it from the model's original folder.")
    return model, params, Tokenizer.from_tokenizer_json(tok_json)
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
  model, params = load_gguf(reader, dtype=dtype, scan_layers=scan_layers)
  return model, params, tokenizer


__all__ = ["ModelLoadError", "default_model_path", "load_model"]
