"""Drafts whose vocabulary is another size than the target's (`jaxspec.models.subset.resize_vocab`): the same tokenizer
with an embedding padded to another multiple, as between Qwen2.5's small and large models. Greedy output stays the
target's, sampled output follows the target's distribution (χ² test), and drafts are still accepted."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.decoding.generate import generate
from jaxspec.decoding.accept import SampleAcceptance
from jaxspec.decoding.sampling import SamplingParams, Warp
from jaxspec.decoding.speculative import DraftModelDrafter
from jaxspec.errors import InputError
from jaxspec.models.llama import LlamaLM
from jaxspec.models.subset import ResizedVocabLM, resize_vocab
from tests.test_sharding import PROMPTS, varied_tiny
from tests.test_speculative import (chi2_pvalue, drafter_sample_counts, exact_distribution, small_lm,
                                    stat_continuation_logits)


def with_vocab(model, params, vocab: int, seed: int = 0):
  """`(model, params)` with the embedding (tied head) cut to `vocab` rows or padded with random ones."""
  table = np.asarray(params["embed"]["embedding"])
  if vocab <= len(table):
    table = table[:vocab]
  else:
    extra = np.random.default_rng(seed).normal(0, table.std(), (vocab - len(table), table.shape[1]))
    table = np.concatenate([table, extra.astype(table.dtype)])
  return LlamaLM(dataclasses.replace(model.cfg, vocab_size=vocab)), {**params,
                                                                     "embed": {"embedding": jnp.asarray(table)}}


@pytest.fixture(scope="module")
def target():
  return varied_tiny(3, n_heads=8, n_kv_heads=4, head_dim=4)


@pytest.mark.parametrize("vocab", [200, 300], ids=["smaller", "larger"])
def test_a_resized_draft_gives_greedy_output_and_is_accepted(target, vocab):
  """The target's own first layer as a draft, over 200 of its 256 ids (padded) or 300 (cut): the output equals greedy
  decoding, drafts are accepted (τ > 1), and the draft never proposes an id the target lacks."""
  model, params = target
  one = {k: v for k, v in params.items() if not k.startswith("layers_") or k == "layers_0"}
  draft, dparams = with_vocab(LlamaLM(dataclasses.replace(model.cfg, n_layers=1)), one, vocab)
  with pytest.raises(InputError, match="resize it to the target's with jaxspec.models.subset.resize_vocab"):
    generate(model, params, PROMPTS, max_new_tokens=16, drafter=DraftModelDrafter(draft, 3), draft_params=dparams)
  resized, rparams = resize_vocab(draft, dparams, model.vocab_size)
  assert isinstance(resized, ResizedVocabLM) and resized.vocab_size == model.vocab_size
  ref = generate(model, params, PROMPTS, max_new_tokens=16)
  res = generate(model, params, PROMPTS, max_new_tokens=16, drafter=DraftModelDrafter(resized, 3),
                 draft_params=rparams)
  assert res.tokens == ref.tokens and res.tau > 1.0
  logits = resized.logits(rparams, jnp.ones((1, 2, model.cfg.d_model)))
  assert logits.shape == (1, 2, model.vocab_size)
  if vocab < model.vocab_size:
    assert np.all(np.asarray(logits[..., vocab:]) <= -1e29)  # probability 0 past the draft's ids
  assert resize_vocab(model, params, model.vocab_size) == (model, params)  # the same size: unchanged
  # A target token the draft has no row for is read as its last id: finite logits, where the base's own embedding
  # lookup gives NaN (and its cache would carry them into every later draft).
  t = jnp.asarray([[1, model.vocab_size - 1]], jnp.int32)
  out = resized.forward(rparams, t, jnp.arange(2)[None], resized.init_cache(1, 4), jnp.tril(jnp.ones((1, 2, 2), bool)))
  assert np.all(np.isfinite(np.asarray(out[0]) if vocab > model.vocab_size else np.asarray(out[0])[..., :vocab]))


@pytest.mark.parametrize("draft_vocab", [6, pytest.param(10, marks=pytest.mark.slow)], ids=["smaller", "larger"])
def test_sampling_with_a_resized_draft_is_exact(draft_vocab):
  """10^5 speculative generations of 3 tokens from an 8-token target with a 6- or 10-token draft follow the target's
  distribution: ids the draft lacks come from the correction step, and target tokens it has no row for are read as
  its last id."""
  target = small_lm(0)
  draft, dparams = resize_vocab(*small_lm(1, vocab=draft_vocab), target[0].vocab_size)
  warp = Warp(0, False)
  probs = exact_distribution(stat_continuation_logits(target), warp, SamplingParams.make(1.0, 1.0))
  counts = drafter_sample_counts(target, DraftModelDrafter(draft, 2, warp), dparams, 1.0, 1.0,
                                 SampleAcceptance(warp))
  pvalue = chi2_pvalue(counts, probs)
  print(f"draft of {draft_vocab} ids: p = {pvalue:.3g}")
  assert pvalue > 1e-3


def test_an_encoder_decoder_draft_is_not_resized():
  class EncDec:
    vocab_size = 10

    def start(self):
      pass

  with pytest.raises(InputError, match="decoder-only models only"):
    resize_vocab(EncDec(), {}, 12)


def test_a_draft_model_of_another_size_given_to_spec_is_resized(target, tmp_path, monkeypatch, caplog):
  """`spec:draft=PATH` (bench and CLI) with a model of another vocabulary size runs it resized and says so once;
  its output is the target's greedy output."""
  import jaxspec.loading
  from jaxspec.bench.methods import METHODS, BenchContext, parse_method
  from tests.test_bpd import ByteTokenizer

  model, params = target
  one = {k: v for k, v in params.items() if not k.startswith("layers_") or k == "layers_0"}
  draft = with_vocab(LlamaLM(dataclasses.replace(model.cfg, n_layers=1)), one, 200)
  (tmp_path / "config.json").write_text("{}")  # the folder exists; the model comes from the patched loader
  monkeypatch.setattr(jaxspec.loading, "load_model", lambda *a, **k: (*draft, None))
  _, name, opts = parse_method(f"spec:draft={tmp_path}")
  with caplog.at_level("INFO", logger="jaxspec.bench.methods"):
    run = METHODS[name].build(BenchContext(model, params, ByteTokenizer()), opts)
  assert f"draft={tmp_path} has 200 ids and the target 256: its logits are padded to the target's ids" in caplog.text
  res = run(PROMPTS, 16, 0)
  assert res.tokens == generate(model, params, PROMPTS, max_new_tokens=16).tokens and res.tau > 1.0


def test_a_resized_drafts_output_table_holds_its_rows_for_the_targets_ids(target):
  """`output_table` of a resized draft (what a subset head or a rescorer over it scores with) is the base's rows for
  the ids it shares with the target and zero rows past the base's: hidden @ table.T is the resized draft's logits
  wherever the base has a row. (A mutation audit found the last rows of a larger base's table taken instead passed
  every test.)"""
  model, params = target
  one = {k: v for k, v in params.items() if not k.startswith("layers_") or k == "layers_0"}
  hidden = jax.random.normal(jax.random.key(0), (1, 3, model.cfg.d_model))
  for vocab in (200, 300):
    draft, dparams = with_vocab(LlamaLM(dataclasses.replace(model.cfg, n_layers=1)), one, vocab)
    resized, rparams = resize_vocab(draft, dparams, model.vocab_size)
    table = np.asarray(resized.output_table(rparams))
    shared = min(vocab, model.vocab_size)
    assert table.shape == (model.vocab_size, model.cfg.d_model) and not table[shared:].any()
    want = np.asarray(resized.logits(rparams, hidden))[..., :shared]
    np.testing.assert_allclose((np.asarray(hidden) @ table.T)[..., :shared], want, rtol=1e-4, atol=1e-4)
