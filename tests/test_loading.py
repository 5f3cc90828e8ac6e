"""Loading: GGUF written by the gguf package (quantized, Q/K permuted as llama.cpp does), Hugging Face folders,
and clear errors on files that are missing or damaged."""

import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_tiny
from jaxspec.errors import ModelLoadError
from jaxspec.loading import load_model
from jaxspec.loading.gguf_loader import load_gguf
from jaxspec.loading.hf import load_hf, save_hf


def llama_cpp_permute(w_OxI, n_heads):
  """What llama.cpp's converter does to Q and K rows (the loader must undo it)."""
  o, i = w_OxI.shape
  return w_OxI.reshape(n_heads, 2, o // n_heads // 2, i).swapaxes(1, 2).reshape(o, i)


def gguf_writer(path, cfg, arch: str = "llama") -> "gguf.GGUFWriter":
  """A GGUF writer with a LLaMA model's hyperparameters in its header, as llama.cpp's converter writes them."""
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.n_layers)
  w.add_context_length(cfg.max_seq_len)
  w.add_embedding_length(cfg.d_model)
  w.add_feed_forward_length(cfg.d_ff)
  w.add_head_count(cfg.n_heads)
  w.add_head_count_kv(cfg.n_kv_heads)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  return w


def write_gguf(path, model, params, qtype, byte_tokenizer=False, extra=None):
  """Writes params as llama.cpp would; returns the params as the file holds them (after quantization).
  `byte_tokenizer`: with a byte-level tokenizer of the 256 bytes (no merges), so `load_model` reads the file.
  `extra(writer)`: adds more metadata or tensors (RoPE scaling, say)."""
  cfg = model.cfg
  held = jax.tree.map(np.asarray, params)
  w = gguf_writer(path, cfg)
  if extra is not None:
    extra(w)
  if byte_tokenizer:
    from jaxspec.loading.tokenizer import _bytes_to_unicode

    alphabet = _bytes_to_unicode()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([alphabet[b] for b in range(256)])
    w.add_token_types([1] * 256)
    w.add_token_merges([])

  def add(name, arr, quantize=True):
    arr = np.ascontiguousarray(np.asarray(arr, np.float32))
    if quantize and qtype != gguf.GGMLQuantizationType.F32:
      q = gguf.quants.quantize(arr, qtype)
      w.add_tensor(name, q, raw_dtype=qtype)
      return gguf.quants.dequantize(q, qtype).reshape(arr.shape)
    w.add_tensor(name, arr)
    return arr

  held["embed"]["embedding"] = add("token_embd.weight", params["embed"]["embedding"])
  add("output_norm.weight", params["final_norm"]["scale"], quantize=False)
  for i in range(cfg.n_layers):
    p, h = params[f"layers_{i}"], held[f"layers_{i}"]
    add(f"blk.{i}.attn_norm.weight", p["attn_norm"]["scale"], quantize=False)
    add(f"blk.{i}.ffn_norm.weight", p["mlp_norm"]["scale"], quantize=False)
    for key, heads in (("q", cfg.n_heads), ("k", cfg.n_kv_heads)):
      stored = add(f"blk.{i}.attn_{key}.weight", llama_cpp_permute(np.asarray(p["attn"][key]["kernel"]).T, heads))
      h["attn"][key]["kernel"] = unpermute_reference(stored, heads).T
    for gname, (mod, key) in (("attn_v", ("attn", "v")), ("attn_output", ("attn", "o")), ("ffn_gate", ("mlp", "gate")),
                              ("ffn_up", ("mlp", "up")), ("ffn_down", ("mlp", "down"))):
      h[mod][key]["kernel"] = add(f"blk.{i}.{gname}.weight", np.asarray(p[mod][key]["kernel"]).T).T
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return held


def unpermute_reference(w_OxI, n_heads):
  """Inverse of `llama_cpp_permute`, written independently of the loader: invert the row index map."""
  o = w_OxI.shape[0]
  idx = llama_cpp_permute(np.arange(o, dtype=np.float64)[:, None], n_heads)[:, 0].astype(int)
  out = np.empty_like(w_OxI)
  out[idx] = w_OxI
  return out


def logits_of(model, params, tokens):
  t = tokens.shape[1]
  return model.forward(params, tokens, jnp.arange(t)[None], model.init_cache(1, t),
                       jnp.tril(jnp.ones((t, t), bool)))[0]


Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_gguf_round_trip_undoes_the_qk_permutation(tmp_path, qtype):
  model, params = make_tiny(seed=1, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=64)  # blocks of 32
  path = tmp_path / "tiny.gguf"
  held = write_gguf(path, model, params, qtype)
  loaded_model, loaded = load_gguf(str(path))
  assert loaded_model.cfg.tie_embeddings and loaded_model.cfg.n_kv_heads == 2
  # The loader must give back exactly what the file holds, in the model's layout.
  for a, b in zip(jax.tree.leaves(held), jax.tree.leaves(loaded)):
    np.testing.assert_allclose(np.asarray(b), a, atol=1e-6)
  tokens = jnp.asarray([[1, 5, 9, 200, 17, 3]])
  want, got = logits_of(model, held, tokens), logits_of(loaded_model, loaded, tokens)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  if qtype == Q.F32:
    # Without the un-permutation RoPE would rotate the wrong pairs: prove the test would notice.
    bad = jax.tree.map(lambda x: x, loaded)
    bad["layers_0"]["attn"]["q"]["kernel"] = jnp.asarray(
        llama_cpp_permute(np.asarray(loaded["layers_0"]["attn"]["q"]["kernel"]).T, 4).T)
    assert float(jnp.max(jnp.abs(logits_of(loaded_model, bad, tokens) - want))) > 1e-3


def test_hf_folder_round_trip(tmp_path, tiny):
  model, params = tiny
  save_hf(str(tmp_path), model, params)
  loaded_model, loaded = load_hf(str(tmp_path))
  tokens = jnp.asarray([[4, 8, 15, 16, 23, 42]])
  np.testing.assert_allclose(logits_of(loaded_model, loaded, tokens), logits_of(model, params, tokens), atol=1e-5)


def test_dtype_and_stacked_layers_reach_the_loaded_model(tmp_path, tiny):
  """`--dtype` and `--scan-layers` of the CLI: a bfloat16 model holds bfloat16 weights and computes in bfloat16, with
  float32 logits (products of bfloat16 inputs, not rounded to bfloat16, where ties of the argmax would be common);
  stacked layers give the per-layer model's logits; an unknown dtype is named before anything is read."""
  model, params = tiny
  save_hf(str(tmp_path), model, params)
  tokens = jnp.asarray([[4, 8, 15, 16, 23, 42]])
  want = logits_of(model, params, tokens)
  bf_model, bf = load_hf(str(tmp_path), dtype="bfloat16")
  assert bf_model.cfg.dtype == "bfloat16"
  assert bf["layers_0"]["attn"]["q"]["kernel"].dtype == jnp.bfloat16 and bf["embed"]["embedding"].dtype == jnp.bfloat16
  got, hidden, _ = bf_model.forward(bf, tokens, jnp.arange(6)[None], bf_model.init_cache(1, 6),
                                    jnp.tril(jnp.ones((6, 6), bool)))
  assert hidden.dtype == jnp.bfloat16 and got.dtype == jnp.float32  # computed in bfloat16, logits in float32
  table = bf["embed"]["embedding"].astype(jnp.float32)
  np.testing.assert_allclose(got, hidden.astype(jnp.float32) @ table.T, rtol=1e-5, atol=1e-5)
  assert not np.array_equal(got, got.astype(jnp.bfloat16).astype(got.dtype))
  assert 0 < float(jnp.max(jnp.abs(got - want))) < 0.05 * float(jnp.max(jnp.abs(want)))
  # bfloat16 weights computed in float32: the float32 model's function on the rounded weights.
  half_model, half = load_hf(str(tmp_path), param_dtype="bfloat16")
  assert half_model.cfg.dtype == "float32" and half["layers_0"]["mlp"]["up"]["kernel"].dtype == jnp.bfloat16
  rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
  np.testing.assert_allclose(logits_of(half_model, half, tokens), logits_of(model, rounded, tokens), atol=1e-5)
  scan_model, stacked = load_hf(str(tmp_path), scan_layers=True)
  assert scan_model.cfg.scan_layers and "layers" in stacked and "layers_0" not in stacked
  np.testing.assert_allclose(logits_of(scan_model, stacked, tokens), want, atol=1e-5)
  save_hf(str(tmp_path / "again"), scan_model, stacked)  # stacked layers are written per layer (the HF baselines)
  np.testing.assert_allclose(logits_of(*load_hf(str(tmp_path / "again")), tokens), want, atol=1e-5)
  for kw in ({"dtype": "float16"}, {"param_dtype": "float16"}):
    with pytest.raises(ModelLoadError, match="Unknown dtype 'float16': use one of float32, bfloat16"):
      load_model(str(tmp_path / "not-read"), **kw)


def test_missing_and_corrupt_files_are_clear_errors(tmp_path):
  with pytest.raises(ModelLoadError, match="No model"):
    load_model(str(tmp_path / "nope.gguf"))
  junk = tmp_path / "junk.gguf"
  junk.write_bytes(os.urandom(4096))
  with pytest.raises(ModelLoadError, match="is not a GGUF file: it does not begin with the GGUF magic"):
    load_model(str(junk))
  with pytest.raises(ModelLoadError, match="config.json"):
    load_model(str(tmp_path))  # a folder that is not a Hugging Face model


def test_truncated_gguf_is_a_clear_error(tmp_path, tiny):
  model, params = tiny
  path = tmp_path / "t.gguf"
  write_gguf(path, model, params, Q.F32)
  data = path.read_bytes()
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(data[: len(data) * 2 // 3])
  with pytest.raises(ModelLoadError):
    load_gguf(str(cut))


def test_corrupt_safetensors_is_a_clear_error(tmp_path, tiny):
  model, params = tiny
  save_hf(str(tmp_path), model, params)
  (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
  with pytest.raises(ModelLoadError, match="corrupt"):
    load_hf(str(tmp_path))


def test_config_json_that_is_not_an_object_is_a_clear_error(tmp_path):
  (tmp_path / "config.json").write_text("[1, 2]")
  with pytest.raises(ModelLoadError, match="holds a JSON list, not the object"):
    load_model(str(tmp_path))


@pytest.mark.parametrize("folder,message", [("draft_smollm2", "spec:draft=FOLDER"), ("bpd_smollm2", "bpd:heads=FOLDER"),
                                            ("eagle_smollm2", "eagle:draft=FOLDER")])
def test_a_trained_part_is_not_loaded_as_a_model(folder, message):
  """The folders jaxspec's training writes are parts of a method, not models: the error says where they go."""
  from jaxspec.bench.methods import ASSETS
  with pytest.raises(ModelLoadError, match=message):
    load_model(str(ASSETS / folder))


def test_gguf_metadata_and_untied_head_reach_the_loaded_model(tmp_path):
  """The GGUF header's RMSNorm epsilon, RoPE base, context length and head width (`key_length`, here not
  d_model / n_heads) are the loaded config's, and an `output.weight` is an untied head: the tiny round trip above
  writes the default epsilon and base and ties its head, so none of these was checked."""
  model, params = make_tiny(seed=2, embed_scale=3.0, d_model=32, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=64,
                            norm_eps=0.25, rope_theta=300.0, max_seq_len=96, tie_embeddings=False)
  cfg = model.cfg
  path = tmp_path / "untied.gguf"
  w = gguf_writer(path, cfg)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  w.add_rope_dimension_count(cfg.head_dim)
  f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
  w.add_tensor("token_embd.weight", f32(params["embed"]["embedding"]))
  w.add_tensor("output_norm.weight", f32(params["final_norm"]["scale"]))
  w.add_tensor("output.weight", f32(np.asarray(params["lm_head"]["kernel"]).T))  # [V, D], as llama.cpp stores it
  for i in range(cfg.n_layers):
    p = params[f"layers_{i}"]
    w.add_tensor(f"blk.{i}.attn_norm.weight", f32(p["attn_norm"]["scale"]))
    w.add_tensor(f"blk.{i}.ffn_norm.weight", f32(p["mlp_norm"]["scale"]))
    for key, heads in (("q", cfg.n_heads), ("k", cfg.n_kv_heads)):
      w.add_tensor(f"blk.{i}.attn_{key}.weight", f32(llama_cpp_permute(np.asarray(p["attn"][key]["kernel"]).T, heads)))
    for gname, (mod, key) in (("attn_v", ("attn", "v")), ("attn_output", ("attn", "o")), ("ffn_gate", ("mlp", "gate")),
                              ("ffn_up", ("mlp", "up")), ("ffn_down", ("mlp", "down"))):
      w.add_tensor(f"blk.{i}.{gname}.weight", f32(np.asarray(p[mod][key]["kernel"]).T))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  loaded_model, loaded = load_gguf(str(path))
  got = loaded_model.cfg
  assert (got.norm_eps, got.rope_theta, got.max_seq_len, got.head_dim) == (0.25, 300.0, 96, 16)
  assert not got.tie_embeddings
  np.testing.assert_array_equal(loaded["lm_head"]["kernel"], params["lm_head"]["kernel"])
  tokens = jnp.asarray([[1, 5, 9, 200, 17, 3]])
  np.testing.assert_allclose(logits_of(loaded_model, loaded, tokens), logits_of(model, params, tokens), atol=1e-5)


@pytest.mark.parametrize("scaling", ["longrope"])
def test_gguf_rope_scaling_is_refused(tmp_path, scaling):
  """A GGUF header asking for a RoPE scaling without what it needs (LongRoPE without its factor tensors; linear and
  YaRN are in test_llama_variants.py) is refused: positions would be encoded wrongly. A header that says "none"
  loads."""
  model, params = make_tiny(seed=1, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=64)
  for kind in (scaling, "none"):
    path = tmp_path / f"{kind}.gguf"
    w = gguf_writer(path, model.cfg)
    w.add_rope_scaling_type(gguf.RopeScalingType(kind))
    w.add_rope_scaling_factor(4.0)
    w.add_tensor("token_embd.weight", np.ascontiguousarray(np.asarray(params["embed"]["embedding"], np.float32)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if kind == "none":
      with pytest.raises(ModelLoadError, match="lacks tensors"):  # the scaling passes; the missing layers do not
        load_gguf(str(path))
    else:
      with pytest.raises(ModelLoadError, match="LongRoPE scaling without its factors"):
        load_gguf(str(path))


def test_dtype_options_reach_a_loaded_gguf_file(tmp_path):
  """`load_model(dtype=, param_dtype=, scan_layers=)` on a GGUF file (the test above covers `load_hf` only): bfloat16
  weights and activations, bfloat16 weights computed in float32 (the float32 model on the rounded weights), and
  stacked layers (the per-layer model's logits)."""
  model, params = make_tiny(seed=1, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=64, embed_scale=3.0)
  path = tmp_path / "m.gguf"
  held = write_gguf(path, model, params, Q.F32, byte_tokenizer=True)
  tokens = jnp.asarray([[4, 8, 15, 16, 23, 42]])
  want = logits_of(model, held, tokens)
  bf_model, bf, tok = load_model(str(path), dtype="bfloat16")
  assert tok.vocab_size == 256 and (bf_model.cfg.dtype, bf_model.cfg.param_dtype) == ("bfloat16", "bfloat16")
  assert {x.dtype for x in jax.tree.leaves(bf)} == {jnp.dtype(jnp.bfloat16)}
  got, hidden, _ = bf_model.forward(bf, tokens, jnp.arange(6)[None], bf_model.init_cache(1, 6),
                                    jnp.tril(jnp.ones((6, 6), bool)))
  assert hidden.dtype == jnp.bfloat16 and got.dtype == jnp.float32
  assert 0 < float(jnp.max(jnp.abs(got - want))) < 0.05 * float(jnp.max(jnp.abs(want)))
  half_model, half, _ = load_model(str(path), param_dtype="bfloat16")
  assert (half_model.cfg.dtype, half_model.cfg.param_dtype) == ("float32", "bfloat16")
  assert {x.dtype for x in jax.tree.leaves(half)} == {jnp.dtype(jnp.bfloat16)}
  rounded = jax.tree.map(lambda x: jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), held)
  np.testing.assert_allclose(logits_of(half_model, half, tokens), logits_of(model, rounded, tokens), atol=1e-5)
  scan_model, stacked, _ = load_model(str(path), scan_layers=True)
  assert scan_model.cfg.scan_layers and "layers" in stacked and "layers_0" not in stacked
  np.testing.assert_allclose(logits_of(scan_model, stacked, tokens), want, atol=1e-5)
