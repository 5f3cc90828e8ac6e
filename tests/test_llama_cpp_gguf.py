"""GGUF files written by llama.cpp's own converter (`convert_hf_to_gguf.py`) against Hugging Face transformers.

tests/fixtures/llama_cpp_gguf/ holds the tiny random checkpoints of tests/fixtures/llama_variants/ as llama.cpp's
converter writes them in f32 (made by `scripts/llama_cpp_convert_check.py`, which also checks f16 and q8_0 files and
the variant jaxspec refuses, LLaMA with biases): Llama 3.1's RoPE scaling as a `rope_freqs.weight` tensor, linear
scaling in the metadata, Qwen2 with q/k/v biases and a tied head (and with YaRN in the metadata), Qwen3 (a norm over
each head's queries and keys, attn_q_norm and attn_k_norm, and heads wider than width / heads), and Phi-3 (fused
q/k/v and gate/up matrices; a sliding window, which a second file's 48 tokens make matter; LongRoPE's factors as two
tensors and its attention factor in the metadata; rotary embeddings on part of each head, as Phi-4-mini has them).
jaxspec must give transformers' logits from them (llama_variants_reference.npz) and its greedy tokens. The same files
read without undoing llama.cpp's Q/K row permutation, or without the scaling, biases or window they hold, give other
logits, so the comparisons can fail.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jaxspec.decoding.generate import generate
from jaxspec.loading import gguf_loader
from jaxspec.loading.gguf_loader import load_gguf
from tests.test_llama_variants import batch_logits, llama_cpp_factors, without_variant

FIXTURES = Path(__file__).parent / "fixtures"
VARIANTS = ("llama3", "linear", "qwen2", "phi3", "phi3_longrope", "phi4_mini", "qwen2_yarn", "phi3_window", "qwen3")


@pytest.fixture(scope="module")
def ref():
  with np.load(FIXTURES / "llama_variants_reference.npz") as z:
    return {k: z[k] for k in z.files}


def converted(name: str) -> str:
  return str(FIXTURES / "llama_cpp_gguf" / f"{name}-f32.gguf")


@pytest.mark.parametrize("name", VARIANTS)
def test_llama_cpp_files_match_transformers(ref, name, caplog):
  """Logits at positions up to 299 in a batch of two and a greedy continuation equal transformers', and nothing in
  the file is reported as skipped (rope_freqs.weight and LongRoPE's factors are read, into the config); Phi-3's
  sliding window applies, and LongRoPE's original context bounds the context (and the load says so)."""
  with caplog.at_level("WARNING", logger="jaxspec.loading"):
    model, params = load_gguf(converted(name))
  cfg = model.cfg
  bounded = [r.getMessage() for r in caplog.records if "bounded to 320 tokens" in r.getMessage()]
  longrope = name in ("phi3_longrope", "phi4_mini")
  assert (len(bounded), len(caplog.records)) == ((1, 1) if longrope else (0, 0)), caplog.text
  assert cfg.sliding_window == {"phi3": 320, "phi3_window": 48}.get(name, 0)
  assert (dict(cfg.rope_scaling).get("rope_type"), cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias, cfg.tie_embeddings) == {
      "llama3": ("factors", False, False, False, False), "linear": ("linear", False, False, False, False),
      "qwen2": (None, True, False, False, True), "phi3": (None, False, False, False, False),
      "phi3_longrope": ("longrope", False, False, False, False), "phi4_mini": ("longrope", False, False, False, True),
      "qwen2_yarn": ("yarn", True, False, False, True), "phi3_window": (None, False, False, False, False),
      "qwen3": (None, False, False, False, True)}[name]
  assert (cfg.qk_norm, cfg.head_dim) == ((True, 24) if name == "qwen3" else (False, 16))
  assert cfg.rotary_dim == (12 if name == "phi4_mini" else 0)
  if name == "llama3":  # the converter's factors are Llama 3.1's bands
    s = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
    np.testing.assert_allclose(dict(cfg.rope_scaling)["factors"], llama_cpp_factors(10000.0, 16, s), rtol=1e-6)
  np.testing.assert_allclose(batch_logits(model, params, ref[f"{name}_ids"]), ref[f"{name}_logits"], atol=1e-4,
                             rtol=0)
  want = ref[f"{name}_greedy"].tolist()
  prompt = ref[f"{name}_ids"][0, :40].tolist()
  assert generate(model, params, [prompt], max_new_tokens=len(want)).tokens[0] == want


@pytest.mark.parametrize("name", VARIANTS)
def test_llama_cpp_files_read_otherwise_differ(ref, name, monkeypatch):
  """Q/K rows left as llama.cpp permutes them (for LLaMA), unpermuted though the converter keeps them (for Qwen2),
  Phi-3's fused q/k/v split as q/v/k, or the scaling, biases or query/key norms dropped (Phi-3: gate and up split the
  other way round): each gives logits far from transformers'."""
  ids, want = ref[f"{name}_ids"], ref[f"{name}_logits"]
  model, params = load_gguf(converted(name))
  plain, plain_params = without_variant(model, params, name)
  assert np.abs(batch_logits(plain, plain_params, ids) - want).max() > 0.05
  if name.startswith("qwen"):
    monkeypatch.setattr(gguf_loader, "_PERMUTED", gguf_loader._PERMUTED + (name.split("_")[0],))
  elif name.startswith("phi"):
    monkeypatch.setattr(gguf_loader, "_FUSED", {**gguf_loader._FUSED, "attn_qkv.weight": ("attn", ("q", "v", "k"))})
  else:
    monkeypatch.setattr(gguf_loader, "_unpermute_rows", lambda w, n_heads: w)
  rows, rows_params = load_gguf(converted(name))
  assert rows.cfg == model.cfg
  assert np.abs(batch_logits(rows, rows_params, ids) - want).max() > 0.05


@pytest.mark.parametrize("name", ["phi3_longrope", "phi4_mini"])
def test_a_longer_context_reads_llama_cpp_s_long_factors(ref, name):
  """llama.cpp computes with LongRoPE's long factors when its context passes the original one; so does jaxspec with
  a longer context: over 400 tokens, transformers' logits for a sequence that long (its long factors too)."""
  model, params = load_gguf(converted(name), context=1280)
  assert model.cfg.max_seq_len == 1280
  np.testing.assert_allclose(batch_logits(model, params, ref[f"{name}_long_ids"]), ref[f"{name}_long_logits"],
                             atol=1e-4, rtol=0)
