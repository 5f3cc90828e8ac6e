"""Sliding-window attention (Phi-3, Mistral): a token sees the keys less than `sliding_window` positions before it.

transformers' numbers for real windowed layouts are in test_llama_variants.py (`phi3_window`, `mistral_window`). Here
a tiny model with a window of 6 tokens, far shorter than its outputs, checks jaxspec's own paths: the cached loop
against one teacher-forced forward, chains and trees in one forward, and every kind of drafter (draft model chains,
Jacobi windows, prompt lookup, BPD heads' trees, and draft trees grown in the draft's own cache, whose slots hold
other positions than their index) against plain greedy decoding.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.decoding import generate as gen
from jaxspec.decoding.jacobi import JacobiDrafter
from jaxspec.decoding.lookup import LookupDrafter
from jaxspec.decoding.speculative import DraftModelDrafter
from jaxspec.models.llama import LlamaLM
from tests.conftest import make_tiny
from tests.test_opt_tree import tree_drafters

WINDOW = 6
PROMPTS = [[1, 2, 3], [7] * 9, [100, 5, 17, 4]]
NEW = 30


@pytest.fixture(scope="module")
def windowed():
  return make_tiny(embed_scale=3.0, sliding_window=WINDOW)


@pytest.fixture(scope="module")
def windowed_ref(windowed):
  model, params = windowed
  return gen.generate(model, params, PROMPTS, max_new_tokens=NEW).tokens


def full_logits(model, params, ids):
  t = len(ids)
  tokens = jnp.asarray([ids])
  return np.asarray(model.forward(params, tokens, jnp.arange(t)[None], model.init_cache(1, t),
                                  jnp.tril(jnp.ones((1, t, t), bool)))[0][0])


def test_the_window_changes_the_model_and_the_cached_loop_follows_it(windowed, windowed_ref):
  """Greedy decoding with the cache gives the argmax of one teacher-forced forward over its own output at every
  step, and that forward differs from the same weights without the window (so the window is in effect)."""
  model, params = windowed
  for prompt, out in zip(PROMPTS, windowed_ref):
    seq = prompt + out
    logits = full_logits(model, params, seq)
    assert np.argmax(logits[len(prompt) - 1:-1], axis=-1).tolist() == out
  seq = PROMPTS[0] + windowed_ref[0]
  plain = LlamaLM(dataclasses.replace(model.cfg, sliding_window=0))
  assert np.abs(full_logits(plain, params, seq) - full_logits(model, params, seq))[WINDOW:].max() > 0.1
  assert gen.generate(plain, params, PROMPTS, max_new_tokens=NEW).tokens != windowed_ref


def test_chains_jacobi_and_lookup_equal_greedy(windowed, windowed_ref):
  model, params = windowed
  other, other_params = make_tiny(seed=1, sliding_window=WINDOW)
  # (A layer-skip draft, also a windowed draft model's chain, was cut as a repeat of the other two.)
  for drafter, dp in ((DraftModelDrafter(other, 4), other_params), (DraftModelDrafter(model, 3), params),
                      (JacobiDrafter(window=5), None), (LookupDrafter(4), None)):
    res = gen.generate(model, params, PROMPTS, max_new_tokens=NEW, drafter=drafter, draft_params=dp)
    assert res.tokens == windowed_ref, type(drafter).__name__
    assert res.tau > 1, type(drafter).__name__  # drafts were accepted past the window, not only rejected


# lm-static is slow: lm-dynamic grows the same draft LM's trees in its windowed cache and verifies them alike
@pytest.mark.parametrize("name", ["lm-self-early-stop", "lm-dynamic", "heads-dynamic",
                                  pytest.param("lm-static", marks=pytest.mark.slow)])
def test_trees_equal_greedy(windowed, windowed_ref, name):
  """Trees verified in one forward (depth-based positions), and draft trees grown in the draft's cache (with the
  target as its own draft, "lm-self-early-stop", the draft has the window too: the next test checks its slots)."""
  model, params = windowed
  drafter, dp = tree_drafters(windowed)[name]
  res = gen.generate(model, params, PROMPTS, max_new_tokens=NEW, drafter=drafter, draft_params=dp)
  assert res.tokens == windowed_ref
  assert res.tau > (2.5 if name == "lm-self-early-stop" else 1)


def test_keys_in_slots_past_their_positions_are_windowed_by_position():
  """A draft tree grown in the draft's own cache keeps its nodes in slots further on than their positions; the window
  must compare positions (`cache_positions_BxS`, which `keys_need_positions` asks the tree grower for). Keys written
  at slots 0, 1, 5, 6 for positions 0-3, read with their positions, give the logits of the same tokens in slots 0-3;
  read as if each slot were its position, the key at position 2 (slot 5) would be inside a window of 2 from position
  4, and the logits differ."""
  model, params = make_tiny(embed_scale=3.0, sliding_window=2)
  assert model.keys_need_positions
  toks = [11, 42, 7, 99, 23]
  one = lambda t: jnp.asarray([[t]])  # noqa: E731
  eye = jnp.ones((1, 1, 1), bool)
  want = full_logits(model, params, toks)[-1]
  slots_of, positions = [0, 1, 5, 6], jnp.asarray([[0, 1, 0, 0, 0, 2, 3, 0]])

  def run(with_positions: bool):
    cache = model.init_cache(1, 8)
    _, _, cache = model.forward(params, jnp.asarray([toks[:2]]), jnp.arange(2)[None], cache,
                                jnp.tril(jnp.ones((1, 2, 2), bool)))
    cache = cache.advance(jnp.asarray([2]))
    kw = {"cache_positions_BxS": positions} if with_positions else {}
    for i, t in enumerate(toks[2:]):
      seen = jnp.isin(jnp.arange(8), jnp.asarray(slots_of[:2 + i]))[None, None]
      slot = slots_of[2 + i] if i < 2 else 7
      logits, _, cache = model.forward(params, one(t), one(2 + i), cache.replace(lengths=jnp.asarray([slot])), eye,
                                       cache_mask_BxTxS=seen, **kw)
    return np.asarray(logits[0, -1])

  np.testing.assert_allclose(run(True), want, atol=1e-5)
  assert np.abs(run(False) - want).max() > 0.05




def test_a_subset_head_draft_of_a_windowed_model_keeps_its_window(windowed, windowed_ref):
  """A draft with its own output head (`SubsetHeadLM`) over a windowed base asks for its tree slots' positions as the
  base does, and its draft trees, grown in its cache, give greedy's tokens."""
  from jaxspec.decoding.opt_tree import LMTreeSource, OptTreeDrafter
  from jaxspec.models.subset import subset_head

  model, params = windowed
  sub, sub_params = subset_head(model, params, np.arange(0, 256, 2)[:100])
  assert sub.keys_need_positions and not subset_head(*make_tiny(), np.arange(10))[0].keys_need_positions
  drafter = OptTreeDrafter(LMTreeSource(sub), nodes=8, depth=4, width=2, branch=3)
  res = gen.generate(model, params, PROMPTS, max_new_tokens=NEW, drafter=drafter, draft_params=sub_params)
  assert res.tokens == windowed_ref and res.tau > 1
