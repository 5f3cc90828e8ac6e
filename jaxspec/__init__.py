"""jaxspec: fast, lossless decoding of autoregressive models in JAX."""

from jaxspec.errors import InputError, JaxspecError, ModelLoadError

__version__ = "0.1.0"
__all__ = ["InputError", "JaxspecError", "ModelLoadError", "generate", "load_model"]


def __getattr__(name: str):
  """`jaxspec.generate` and `jaxspec.load_model`, imported on first use: importing the package (as the `jaxspec`
  command does before it parses its arguments) does not start JAX, so XLA options can still be set and a Ctrl-C
  during start-up is the command's own."""
  if name == "generate":
    from jaxspec.decoding.generate import generate
    return generate
  if name == "load_model":
    from jaxspec.loading import load_model
    return load_model
  raise AttributeError(f"module 'jaxspec' has no attribute {name!r}")
