"""Loading errors (re-exported from `jaxspec.errors`)."""

from jaxspec.errors import ModelLoadError

__all__ = ["ModelLoadError"]
