"""The default model against Hugging Face transformers on the same GGUF file (fixture: scripts/hf_reference.py)."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.decoding.generate import generate

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "smollm2_hf_reference.npz")


@pytest.fixture(scope="module")
def ref():
  return np.load(FIXTURE)


def test_logits_match_transformers(default_model, ref):
  model, params, _ = default_model
  ids = jnp.asarray(ref["prompt_ids"])[None]
  t = ids.shape[1]
  logits = model.forward(params, ids, jnp.arange(t)[None], model.init_cache(1, t), jnp.tril(jnp.ones((t, t), bool)))[0]
  got = np.asarray(logits[0])[ref["logits_positions"]][:, ref["logits_vocab_ids"]]
  np.testing.assert_allclose(got, ref["logits"], atol=1e-3, rtol=0)


def test_greedy_continuation_matches_transformers(default_model, ref):
  model, params, _ = default_model
  want = ref["greedy_ids"].tolist()
  assert len(want) >= 64
  got = generate(model, params, [ref["prompt_ids"].tolist()], max_new_tokens=len(want)).tokens[0]
  assert got == want
