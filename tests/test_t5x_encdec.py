"""T5X's `temperature_sample` in its encoder-decoder layout against jaxspec's greedy loop on a tiny random T5."""

import os

import jax
import pytest

from jaxspec.bench.baselines import t5x_runner
from jaxspec.bench.methods import BenchContext
from jaxspec.decoding.generate import generate
from jaxspec.errors import InputError
from jaxspec.models.t5 import T5LM, tiny_t5_config

T5X_SRC = os.environ.get("JAXSPEC_T5X_SRC")
pytestmark = pytest.mark.skipif(not T5X_SRC, reason="T5X is not on PyPI: set JAXSPEC_T5X_SRC to a T5X source "
                                "checkout (the folder holding t5x/decoding.py) to run the T5X encoder-decoder check")

MAX_NEW = 12
# Ragged encoder inputs; token 0 is an ordinary encoder token (T5X's decoder prompt is all zeros anyway).
PROMPTS = [[5, 17, 0, 42], [9], [3, 3, 200, 7, 81, 0, 11, 250, 64, 2, 19]]


class _Tok:
  """What the runner reads of a tokenizer: the EOS and pad ids."""

  pad_id = 0

  def __init__(self, eos_id):
    self.eos_id = eos_id


@pytest.fixture(scope="module")
def t5():
  model = T5LM(tiny_t5_config())
  return model, model.init_params(jax.random.key(0))


def _t5x(model, params, eos_id):
  return t5x_runner(BenchContext(model, params, _Tok(eos_id), t5x_src=T5X_SRC))(PROMPTS, MAX_NEW, 0)


def _hit_eos(tokens):
  """An EOS id greedy produces mid-row in one row: its first occurrence there, past index 1, not token 0."""
  for row in tokens:
    for j, t in enumerate(row[2:-1], start=2):
      if t != 0 and t not in row[:j]:
        return t
  raise AssertionError(f"no usable EOS in {tokens}")


def test_t5x_greedy_equals_jaxspec_greedy_without_eos(t5):
  model, params = t5
  ref = generate(model, params, PROMPTS, max_new_tokens=MAX_NEW)
  got = _t5x(model, params, None)
  assert all(len(t) == MAX_NEW for t in ref.tokens)
  assert got.tokens == ref.tokens
  # counted as jaxspec counts: the first token comes from the call that ends prefill, not from a step
  assert got.target_calls == ref.target_calls == MAX_NEW - 1 and got.active_calls == ref.active_calls
  assert got.tau == 1.0


def test_t5x_greedy_equals_jaxspec_greedy_with_eos(t5):
  model, params = t5
  eos = _hit_eos(generate(model, params, PROMPTS, max_new_tokens=MAX_NEW).tokens)
  ref = generate(model, params, PROMPTS, max_new_tokens=MAX_NEW, eos_ids=[eos])
  assert any(len(t) < MAX_NEW and t[-1] == eos for t in ref.tokens)  # early stopping is exercised
  got = _t5x(model, params, eos)
  assert got.tokens == ref.tokens
  assert got.active_calls == ref.active_calls and got.target_calls == ref.target_calls


def test_eos_zero_is_rejected(t5):
  model, params = t5
  with pytest.raises(InputError, match="EOS id 0"):
    _t5x(model, params, 0)
