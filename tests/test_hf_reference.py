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


def write_hf_folder_from_gguf(gguf_path: str, folder: str, cfg) -> None:
  """A Hugging Face LLaMA folder holding the GGUF file's weights, written without jaxspec's loaders: tensor names
  from the `gguf` package's own HF <-> GGUF name map, the layout HF uses ([out, in]), and Q/K rows put back from
  llama.cpp's interleaved rotary order to HF's half-split order, as transformers does when it reads a GGUF."""
  import json

  import gguf
  from safetensors.numpy import save_file

  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layers)
  hf_of = {}
  for i in range(cfg.n_layers):
    for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
      hf = f"model.layers.{i}.{part}.weight"
      hf_of[names.get_name(hf, try_suffixes=(".weight",))] = hf
  for hf in ("model.embed_tokens.weight", "model.norm.weight"):
    hf_of[names.get_name(hf, try_suffixes=(".weight",))] = hf

  def unpermute(w, heads):  # llama.cpp stores each head's rotary pairs interleaved
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

  tensors = {}
  for t in gguf.GGUFReader(gguf_path).tensors:
    hf = hf_of.get(t.name)
    if hf is None:
      continue
    w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(
        tuple(int(d) for d in reversed(t.shape)))
    if hf.endswith("q_proj.weight"):
      w = unpermute(w, cfg.n_heads)
    elif hf.endswith("k_proj.weight"):
      w = unpermute(w, cfg.n_kv_heads)
    tensors[hf] = np.ascontiguousarray(w)
  assert len(tensors) == 9 * cfg.n_layers + 2
  save_file(tensors, os.path.join(folder, "model.safetensors"))
  hf_cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "tie_word_embeddings": True,
            "max_position_embeddings": cfg.max_seq_len}
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf_cfg, f)


def test_hf_folder_logits_match_transformers(default_model, ref, tmp_path):
  """`load_hf` on a Hugging Face folder of the same weights (written above, independently of `save_hf`) gives the
  transformers reference logits too, so a wrong name, transpose or gate/up swap in the HF loader fails here."""
  from jaxspec.loading.default import default_model_path
  from jaxspec.loading.hf import load_hf

  write_hf_folder_from_gguf(default_model_path(), str(tmp_path), default_model[0].cfg)
  model, params = load_hf(str(tmp_path))
  ids = jnp.asarray(ref["prompt_ids"])[None]
  t = ids.shape[1]
  logits = model.forward(params, ids, jnp.arange(t)[None], model.init_cache(1, t), jnp.tril(jnp.ones((t, t), bool)))[0]
  got = np.asarray(logits[0])[ref["logits_positions"]][:, ref["logits_vocab_ids"]]
  np.testing.assert_allclose(got, ref["logits"], atol=1e-3, rtol=0)
