"""Flax models behind the decoding boundary."""

from jaxspec.models.cache import KVCache
from jaxspec.models.llama import LlamaConfig, LlamaLM, tiny_config

__all__ = ["KVCache", "LlamaConfig", "LlamaLM", "tiny_config"]
