"""jaxspec: fast, lossless decoding of autoregressive models in JAX."""

from jaxspec.decoding.generate import generate
from jaxspec.errors import InputError, JaxspecError, ModelLoadError
from jaxspec.loading import load_model

__version__ = "0.1.0"
__all__ = ["InputError", "JaxspecError", "ModelLoadError", "generate", "load_model"]
