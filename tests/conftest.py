"""Shared fixtures: the real default model is loaded once per test session."""

import jax
import jax.numpy as jnp
import pytest

from jaxspec.models.llama import LlamaLM, tiny_config

jax.config.update("jax_numpy_rank_promotion", "raise")


def make_tiny(seed: int = 0, **overrides):
  """A tiny random LLaMA with peaked next-token distributions, so greedy choices are not near-ties."""
  model = LlamaLM(tiny_config(**overrides))
  params = model.init_params(jax.random.key(seed))
  params = dict(params)
  params["embed"] = {"embedding": params["embed"]["embedding"] * 40.0}
  return model, params


@pytest.fixture(scope="session")
def tiny():
  return make_tiny()


@pytest.fixture(scope="session")
def default_model():
  """(model, params, tokenizer) of the embedded SmolLM2-135M-Instruct."""
  from jaxspec.loading import load_model

  return load_model()
