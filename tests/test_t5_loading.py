"""T5 folders against Hugging Face transformers, and the T5 loader's round trip and errors.

The fixtures (tests/fixtures/t5_tiny_*/ and t5_tiny_reference.npz) are written by scripts/t5_hf_reference.py in a
separate venv with torch and transformers; this file needs neither. Variants:

  * `v11`: T5 v1.1 (gated-GELU, its own `lm_head`, no output scaling);
  * `orig`: the original T5 (ReLU, head tied to `shared`, hidden state scaled by d_model^-1/2);
  * `v11_tied`: what transformers 5 makes of a fresh `T5Config(tie_word_embeddings=False)`: a tied head without the
    scaling (`scale_decoder_outputs: false`).

All have 2 encoder and 3 decoder layers, 8 relative buckets up to distance 20, and sources of 30 and 17 tokens.
"""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxspec.decoding.generate import generate
from jaxspec.loading.errors import ModelLoadError
from jaxspec.loading.hf import load_hf
from jaxspec.loading.t5_hf import save_t5
from jaxspec.models.t5 import T5LM, tiny_t5_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
VARIANTS = ("v11", "orig", "v11_tied")


@pytest.fixture(scope="module")
def ref():
  return dict(np.load(os.path.join(FIXTURES, "t5_tiny_reference.npz")))


def folder(variant: str) -> str:
  return os.path.join(FIXTURES, f"t5_tiny_{variant}")


@functools.lru_cache(maxsize=None)
def loaded(variant: str):
  return load_hf(folder(variant))


_teacher_forced = jax.jit(T5LM.teacher_forced, static_argnums=0)  # one compile per config, not per test


def teacher_forced(model, params, ref, variant):
  logits, _ = _teacher_forced(model, params, jnp.asarray(ref[f"{variant}_src_ids"]),
                              jnp.asarray(ref[f"{variant}_src_len"]), jnp.asarray(ref[f"{variant}_dec_in"]))
  return np.asarray(logits)


def sources(ref, variant):
  """The unpadded source rows."""
  return [row[:n].tolist() for row, n in zip(ref[f"{variant}_src_ids"], ref[f"{variant}_src_len"])]


def copy_fixture(variant, tmp_path):
  dst = tmp_path / variant
  shutil.copytree(folder(variant), dst)
  return dst


def edit_config(path, **changes):
  """Rewrites config.json: a key set to None is removed."""
  with open(path / "config.json") as f:
    raw = json.load(f)
  for k, v in changes.items():
    if v is None:
      raw.pop(k, None)
    else:
      raw[k] = v
  with open(path / "config.json", "w") as f:
    json.dump(raw, f)


def test_fixture_is_what_the_tests_assume(ref):
  for variant in VARIANTS:
    assert list(ref[f"{variant}_src_len"]) == [30, 17]  # longer than relative_attention_max_distance = 20
    assert (ref[f"{variant}_src_mask"].sum(1) == ref[f"{variant}_src_len"]).all()
    assert (ref[f"{variant}_dec_in"][:, 0] == 0).all()
    assert ref[f"{variant}_greedy_margin"].min() > 1e-2  # no near ties: a mismatch is a bug
  model, _ = loaded("v11")
  assert (model.cfg.n_enc_layers, model.cfg.n_dec_layers, model.cfg.rel_buckets, model.cfg.rel_max_distance) == (
      2, 3, 8, 20)


@pytest.mark.parametrize("variant,ff,tied", [("v11", "gated-gelu", False), ("orig", "relu", True),
                                             ("v11_tied", "gated-gelu", False)])
def test_config_and_head(variant, ff, tied):
  model, params = loaded(variant)
  assert model.cfg.ff == ff and model.cfg.tie_embeddings == tied
  assert ("lm_head" in params) != tied
  if variant == "v11_tied":  # a tied head without the scaling loads as an untied copy of the embedding
    np.testing.assert_array_equal(params["lm_head"]["kernel"], params["shared"]["embedding"].T)


@pytest.mark.parametrize("variant", VARIANTS)
def test_teacher_forced_logits_match_transformers(ref, variant):
  model, params = loaded(variant)
  got = teacher_forced(model, params, ref, variant)
  want = ref[f"{variant}_logits"]
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_bfloat16_weights_computed_in_float32(ref):
  """`--param-dtype bfloat16` on an encoder-decoder: the weights are held in bfloat16, and the logits are the float32
  model's on the rounded weights."""
  model, params = load_hf(folder("v11"), param_dtype="bfloat16")
  assert model.cfg.dtype == "float32" and model.cfg.param_dtype == "bfloat16"
  assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"bfloat16"}
  base_model, base = loaded("v11")
  rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), base)
  np.testing.assert_allclose(teacher_forced(model, params, ref, "v11"),
                             teacher_forced(base_model, rounded, ref, "v11"), atol=1e-5, rtol=0)
  with pytest.raises(ModelLoadError, match="encoder-decoder .* leave out --scan-layers"):
    load_hf(folder("v11"), scan_layers=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_matches_transformers(ref, variant):
  """Each source alone (as transformers ran it), then both together: ragged rows padded to one bucket."""
  model, params = loaded(variant)
  want = ref[f"{variant}_greedy"].tolist()
  n = len(want[0])
  srcs = sources(ref, variant)
  for src, row in zip(srcs, want):
    assert generate(model, params, [src], max_new_tokens=n).tokens[0] == row
  assert generate(model, params, srcs, max_new_tokens=n).tokens == want


@pytest.mark.parametrize("variant,changes", [
    # How transformers 4.x wrote T5 v1.1 / Flan-T5 configs: an untied head is said with tie_word_embeddings=false.
    ("v11", dict(tie_word_embeddings=False, scale_decoder_outputs=None)),
    # The original T5's configs often say nothing of tying: the default ties and scales.
    ("orig", dict(tie_word_embeddings=None, scale_decoder_outputs=None)),
])
def test_older_config_spellings_mean_the_same(ref, tmp_path, variant, changes):
  path = copy_fixture(variant, tmp_path)
  edit_config(path, **changes)
  model, params = load_hf(str(path))
  np.testing.assert_allclose(teacher_forced(model, params, ref, variant), ref[f"{variant}_logits"], atol=1e-4, rtol=0)


def test_an_mt5_config_of_transformers_5_is_not_scaled(ref, tmp_path):
  """transformers 5 writes MT5 configs with tie_word_embeddings: true and no scale_decoder_outputs, and its MT5 never
  scales the decoder output: read as a T5 config, the logits were d_model^-1/2 of transformers'."""
  path = copy_fixture("v11_tied", tmp_path)
  edit_config(path, scale_decoder_outputs=None, tie_word_embeddings=True, model_type="mt5",
              architectures=["MT5ForConditionalGeneration"])
  model, params = load_hf(str(path))
  np.testing.assert_allclose(teacher_forced(model, params, ref, "v11_tied"), ref["v11_tied_logits"], atol=1e-4,
                             rtol=0)



def test_the_decoder_start_token_is_read_from_the_config(tmp_path):
  """decoder_start_token_id is the decoder's first input (0, the pad id, in every fixture here, so a loader that
  left it at 0 would pass the tests above): another value reaches the config, which `start` hands the
  decode loop as the decoder's prompt."""
  path = copy_fixture("v11", tmp_path)
  edit_config(path, decoder_start_token_id=5)
  model, _ = load_hf(str(path))
  assert model.cfg.decoder_start_id == 5

@pytest.mark.parametrize("changes,match", [
    (dict(relative_attention_num_buckets=1), "relative_attention_num_buckets.*at least 4"),
    (dict(relative_attention_num_buckets=8, relative_attention_max_distance=4),
     "relative_attention_max_distance.*at least 5"),
])
def test_relative_buckets_that_cannot_work_are_refused(tmp_path, changes, match):
  path = copy_fixture("v11", tmp_path)
  edit_config(path, **changes)
  with pytest.raises(ModelLoadError, match=match):
    load_hf(str(path))


@pytest.mark.parametrize("name", ["decoder.block.0.layer.0.SelfAttention.q.bias", "lm_head.bias",
                                  "decoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight",
                                  "encoder.block.0.layer.2.DenseReluDense.wo.weight", "foo.weight"])
def test_tensors_the_t5_does_not_read_are_named(tmp_path, caplog, name):
  """Skipped as transformers' T5 skips them, with a warning naming them (they were skipped without a word); the
  stacks' embedding copies and the cross-attention position table older checkpoints carry (transformers' ignore
  list) are skipped quietly."""
  path = copy_fixture("v11", tmp_path)
  weights = str(path / "model.safetensors")
  tensors = load_file(weights)
  save_file({**tensors, name: np.zeros((8, 4), np.float32)}, weights)
  with caplog.at_level("WARNING", logger="jaxspec.loading.t5_hf"):
    load_hf(str(path))
  assert f"holds 1 tensor jaxspec's T5 does not read, e.g. {name!r}" in caplog.text
  caplog.clear()
  quiet = {"encoder.embed_tokens.weight": tensors["shared.weight"],
           "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight": np.zeros((8, 4), np.float32)}
  save_file({**tensors, **quiet}, weights)
  with caplog.at_level("WARNING", logger="jaxspec.loading.t5_hf"):
    load_hf(str(path))
  assert "does not read" not in caplog.text


def test_a_tensor_of_the_other_feed_forward_variant_is_named(tmp_path):
  """A ReLU T5's wi inside a gated-GELU T5's layers was reported as more layers than the config has."""
  path = copy_fixture("v11", tmp_path)
  weights = str(path / "model.safetensors")
  tensors = load_file(weights)
  wi = tensors["decoder.block.0.layer.2.DenseReluDense.wi_0.weight"]
  save_file({**tensors, "decoder.block.0.layer.2.DenseReluDense.wi.weight": wi}, weights)
  with pytest.raises(ModelLoadError, match=r"holds 'decoder\.block\.0\.layer\.2\.DenseReluDense\.wi\.weight', "
                                           r"which a T5 with feed_forward_proj 'gated-gelu'"):
    load_hf(str(path))


def test_untied_head_with_scaling_folds_the_scale_in(ref, tmp_path):
  """An lm_head.weight that differs from shared.weight in a scaling config (transformers 5 unties it and keeps the
  d_model^-1/2 scale): logits = (hidden * d_model^-1/2) @ lm_head.T."""
  path = copy_fixture("orig", tmp_path)
  weights = str(path / "model.safetensors")
  tensors = load_file(weights)
  head = np.random.default_rng(0).standard_normal(tensors["shared.weight"].shape).astype(np.float32)
  save_file({**tensors, "lm_head.weight": head}, weights)
  model, params = load_hf(str(path))
  assert not model.cfg.tie_embeddings
  got = teacher_forced(model, params, ref, "orig")
  _, hidden = _teacher_forced(model, params, *(jnp.asarray(ref[f"orig_{k}"]) for k in ("src_ids", "src_len", "dec_in")))
  want = np.asarray(hidden, np.float64) * model.cfg.d_model ** -0.5 @ head.T.astype(np.float64)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides", [dict(ff="gated-gelu", tie_embeddings=False),
                                       dict(ff="relu", tie_embeddings=True)])
def test_save_then_load_is_exact(tmp_path, overrides):
  model = T5LM(tiny_t5_config(vocab_size=64, n_dec_layers=3, rel_max_distance=20, decoder_start_id=0, **overrides))
  # Random values in init_params' structure (running the init itself takes seconds on CPU).
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype),
                        jax.eval_shape(model.init_params, jax.random.key(1)))
  save_t5(str(tmp_path), model, params)
  got_model, got_params = load_hf(str(tmp_path))
  assert got_model.cfg == model.cfg
  assert jax.tree.structure(got_params) == jax.tree.structure(params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(got_params)):
    assert a.dtype == b.dtype and a.shape == b.shape, path
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_is_a_clear_error(tmp_path, damage):
  path = copy_fixture("v11", tmp_path)
  weights = path / "model.safetensors"
  data = weights.read_bytes()
  weights.write_bytes(data[:len(data) // 2] if damage == "truncate" else b"\x13\x00 not a safetensors file" * 8)
  with pytest.raises(ModelLoadError, match="model.safetensors.*corrupt"):
    load_hf(str(path))


def test_missing_tensor_is_named(tmp_path):
  path = copy_fixture("v11", tmp_path)
  weights = str(path / "model.safetensors")
  tensors = load_file(weights)
  del tensors["decoder.block.2.layer.1.EncDecAttention.k.weight"]
  save_file(tensors, weights)
  with pytest.raises(ModelLoadError, match=r"decoder\.block\.2\.layer\.1\.EncDecAttention\.k\.weight"):
    load_hf(str(path))


def test_quantized_t5_folders_are_refused_as_llama_ones_are(tmp_path):
  """A quantization_config, or integer weights read as floats, loaded and decoded garbage with no error (found by a
  review): the LLaMA loader's refusals cover T5 folders too."""
  path = copy_fixture("v11", tmp_path / "q")
  edit_config(path, quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True})
  with pytest.raises(ModelLoadError, match=r"weights are quantized \(bitsandbytes\); jaxspec reads float weights"):
    load_hf(str(path))
  path = copy_fixture("v11", tmp_path / "int8")
  weights = str(path / "model.safetensors")
  tensors = load_file(weights)
  name = "decoder.block.0.layer.2.DenseReluDense.wo.weight"
  tensors[name] = np.round(tensors[name] * 100).astype(np.int8)
  save_file(tensors, weights)
  with pytest.raises(ModelLoadError, match=rf"{name} in .* holds I8 values; jaxspec reads float weights"):
    load_hf(str(path))


def test_no_weights_is_a_clear_error(tmp_path):
  path = copy_fixture("orig", tmp_path)
  os.remove(path / "model.safetensors")
  with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
    load_hf(str(path))


@pytest.mark.parametrize("proj", ["gated-silu", "gelu", "swiglu"])
def test_unsupported_feed_forward_is_a_clear_error(tmp_path, proj):
  path = copy_fixture("orig", tmp_path)
  edit_config(path, feed_forward_proj=proj)
  with pytest.raises(ModelLoadError, match=f"feed_forward_proj='{proj}' is not supported"):
    load_hf(str(path))


@pytest.mark.parametrize("changes,message", [
    ({"d_model": "abc"}, "sets d_model to 'abc', which is not a whole number of at least 1"),
    ({"num_heads": 0}, "sets num_heads to 0"),
    ({"layer_norm_epsilon": -1}, "sets layer_norm_epsilon to -1, which is not a finite number above 0"),
    ({"num_layers": 1, "num_decoder_layers": 1}, "holds weights for 2 layers and its config says 1 \\(num_layers"),
    # (a start id past the vocabulary embedded as NaN: every answer was token 0, without a word)
    ({"decoder_start_token_id": 10 ** 6},
     "sets decoder_start_token_id to 1000000, which is not an id in the model's vocabulary"),
], ids=["text", "zero", "negative-eps", "fewer-layers-than-weights", "start-id-past-the-vocabulary"])
def test_bad_numbers_in_the_config_are_clear_errors(tmp_path, changes, message):
  path = copy_fixture("orig", tmp_path)
  edit_config(path, **changes)
  with pytest.raises(ModelLoadError, match=message):
    load_hf(str(path))


def test_a_start_id_of_the_vocabulary_size_is_past_it(tmp_path):
  """The first id past the vocabulary (vocab_size itself) is refused, and the message gives the ids there are."""
  path = copy_fixture("orig", tmp_path)
  vocab = json.loads((path / "config.json").read_text())["vocab_size"]
  edit_config(path, decoder_start_token_id=vocab)
  with pytest.raises(ModelLoadError, match=rf"sets decoder_start_token_id to {vocab}, which is not an id in the "
                                           rf"model's vocabulary \(vocab_size {vocab}: ids 0 to {vocab - 1}\)"):
    load_hf(str(path))
  edit_config(path, decoder_start_token_id=vocab - 1)
  assert load_hf(str(path))[0].cfg.decoder_start_id == vocab - 1


def test_loaded_params_are_float32_by_default():
  model, params = loaded("orig")
  assert model.cfg.dtype == model.cfg.param_dtype == "float32"
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
