"""LLaMA-family variants against Hugging Face transformers: scaled RoPE (Llama 3.1+'s per-band scaling, linear
position interpolation, Phi-3's LongRoPE, YaRN), sliding windows (Phi-3's, Mistral's), bias terms (Qwen2's on q/k/v,
LLaMA's attention_bias and mlp_bias) and Phi-3's fused projections.

The checkpoints and reference numbers are tiny random models written by `scripts/llama_variants_reference.py` with
transformers (tests/fixtures/llama_variants/ and llama_variants_reference.npz): jaxspec must give transformers'
logits on two 300-token rows (past the scaled models' original context of 128) and its greedy tokens, from the
Hugging Face folder, from a transformers-4 style config, from a GGUF file as llama.cpp's converter writes one
(per-frequency factors in `rope_freqs.weight`, or a linear scaling type in the header), and after jaxspec writes the
model out again. Plain RoPE, or no biases, on the same weights gives other logits, so the comparisons can fail.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.decoding.generate import generate
from jaxspec.errors import ModelLoadError
from jaxspec.loading.gguf_loader import load_gguf
from jaxspec.loading.hf import load_hf, save_hf
from jaxspec.models.llama import LlamaLM, rope_divisors, rope_scaling
from tests.test_loading import Q, gguf_writer, write_gguf

FIXTURES = Path(__file__).parent / "fixtures"
VARIANTS = ("llama3", "linear", "qwen2", "llama_bias", "phi3", "phi3_longrope", "phi4_mini", "qwen2_yarn",
            "phi3_window", "mistral_window", "qwen3")


@pytest.fixture(scope="module")
def ref():
  with np.load(FIXTURES / "llama_variants_reference.npz") as z:
    return {k: z[k] for k in z.files}


def folder(name: str) -> str:
  return str(FIXTURES / "llama_variants" / name)


def batch_logits(model, params, ids):
  """Teacher-forced logits of every row of `ids` [B, T], at every 4th position (as the fixture keeps them)."""
  b, t = ids.shape
  out = model.forward(params, jnp.asarray(ids), jnp.broadcast_to(jnp.arange(t), (b, t)), model.init_cache(b, t),
                      jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t)))[0]
  return np.asarray(out)[:, ::4]


def without_variant(model, params, name):
  """The same weights as plain LLaMA computes them: RoPE unscaled, or biases dropped; for Phi-3, its fused gate/up
  matrix split the other way round."""
  if name in ("llama3", "linear", "phi3_longrope", "qwen2_yarn"):
    return LlamaLM(dataclasses.replace(model.cfg, rope_scaling=())), params
  if name == "phi4_mini":  # rotary embeddings over whole heads (its factors stretched over them)
    s = dict(model.cfg.rope_scaling)
    s.update({k: s[k] + s[k][-2:] for k in ("short_factor", "long_factor")})
    return LlamaLM(dataclasses.replace(model.cfg, rotary_dim=0, rope_scaling=rope_scaling(s))), params
  if name in ("phi3_window", "mistral_window"):
    return LlamaLM(dataclasses.replace(model.cfg, sliding_window=0)), params
  if name == "qwen3":  # queries and keys not normed
    plain = {k: ({**v, "attn": {m: w for m, w in v["attn"].items() if m not in ("q_norm", "k_norm")}}
                 if k.startswith("layers_") else v) for k, v in params.items()}
    return LlamaLM(dataclasses.replace(model.cfg, qk_norm=False)), plain
  if name == "phi3":
    swapped = {k: ({**v, "mlp": {**v["mlp"], "gate": v["mlp"]["up"], "up": v["mlp"]["gate"]}}
                   if k.startswith("layers_") else v) for k, v in params.items()}
    return model, swapped
  plain = {k: ({part: {m: {"kernel": w["kernel"]} for m, w in mods.items()} for part, mods in v.items()
                if part in ("attn", "mlp")} | {part: v[part] for part in v if part not in ("attn", "mlp")}
               if k.startswith("layers_") else v) for k, v in params.items()}
  return LlamaLM(dataclasses.replace(model.cfg, qkv_bias=False, o_bias=False, mlp_bias=False)), plain


@pytest.mark.parametrize("name", VARIANTS)
def test_variants_match_transformers(ref, name):
  """Logits at positions up to 299 in a batch of two and a greedy continuation equal transformers'; the same weights
  without the variant's scaling or biases give other logits."""
  model, params = load_hf(folder(name))
  cfg = model.cfg
  assert (dict(cfg.rope_scaling).get("rope_type"), cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias) == {
      "llama3": ("llama3", False, False, False), "linear": ("linear", False, False, False),
      "qwen2": (None, True, False, False), "llama_bias": (None, True, True, True), "phi3": (None, False, False, False),
      "phi3_longrope": ("longrope", False, False, False), "phi4_mini": ("longrope", False, False, False),
      "qwen2_yarn": ("yarn", True, False, False), "phi3_window": (None, False, False, False),
      "mistral_window": (None, False, False, False), "qwen3": (None, False, False, False)}[name]
  assert (cfg.qk_norm, cfg.head_dim) == ((True, 24) if name == "qwen3" else (False, 16))
  assert cfg.sliding_window == (48 if name.endswith("_window") else 320 if name == "phi3" else 0)
  assert cfg.rotary_dim == (12 if name == "phi4_mini" else 0)
  got = batch_logits(model, params, ref[f"{name}_ids"])
  np.testing.assert_allclose(got, ref[f"{name}_logits"], atol=2e-4, rtol=0)
  plain, plain_params = without_variant(model, params, name)
  assert np.abs(batch_logits(plain, plain_params, ref[f"{name}_ids"]) - ref[f"{name}_logits"]).max() > 0.05
  want = ref[f"{name}_greedy"].tolist()
  prompt = ref[f"{name}_ids"][0, :40].tolist()
  assert generate(model, params, [prompt], max_new_tokens=len(want)).tokens[0] == want


def test_drafters_on_qwen3_equal_greedy(ref):
  """Chains and trees verified in one forward through Qwen3's query/key norms (applied per token, before RoPE): a
  draft model that is the target itself and a tree grown from it give transformers' greedy tokens. (Jacobi's window
  is verified as the same kind of one-forward chain: it was cut here as a repeat of that path.)"""
  from jaxspec.decoding.opt_tree import LMTreeSource, OptTreeDrafter
  from jaxspec.decoding.speculative import DraftModelDrafter

  model, params = load_hf(folder("qwen3"))
  want = ref["qwen3_greedy"].tolist()
  prompt = ref["qwen3_ids"][0, :40].tolist()
  for drafter in (DraftModelDrafter(model, 3),
                  OptTreeDrafter(LMTreeSource(model), nodes=6, depth=3, width=2, branch=2)):
    res = generate(model, params, [prompt], max_new_tokens=len(want), drafter=drafter, draft_params=params)
    assert res.tokens[0] == want, drafter
    assert res.tau > 2, drafter  # the target drafting for itself: every draft is accepted


@pytest.mark.parametrize("name", ["phi3_longrope", "phi4_mini"])
def test_a_longer_context_turns_longrope_s_long_factors_on(ref, caplog, name):
  """Loaded with a context past the original 320 tokens, a LongRoPE model computes with its long factors at every
  position: over 400 tokens its logits equal transformers' (which switches to them for a sequence that long); with
  the short factors, the default context's, they differ. The default stays bounded to the original context."""
  model, params = load_hf(folder(name), context=1280)
  assert model.cfg.max_seq_len == 1280
  assert "LongRoPE's long factors apply at every position" in caplog.text
  got = batch_logits(model, params, ref[f"{name}_long_ids"])
  np.testing.assert_allclose(got, ref[f"{name}_long_logits"], atol=2e-4, rtol=0)
  short = LlamaLM(dataclasses.replace(model.cfg, max_seq_len=320))
  assert np.abs(batch_logits(short, params, ref[f"{name}_long_ids"]) - ref[f"{name}_long_logits"]).max() > 0.05
  assert load_hf(folder(name))[0].cfg.max_seq_len == 320
  # a context within the original one keeps the short factors (what the references within 320 tokens need)
  within, _ = load_hf(folder(name), context=300)
  np.testing.assert_allclose(batch_logits(within, params, ref[f"{name}_ids"]), ref[f"{name}_logits"], atol=2e-4,
                             rtol=0)


def test_an_eagle_draft_takes_its_target_s_context(ref, tmp_path):
  """A feature-level draft's layer computes with its target's RoPE: saved beside a LongRoPE target at the default
  context and loaded beside the same target loaded with context=1280, it turns positions past the original 320 with
  the long factors (not the short ones it was saved with), and decoding there gives the greedy tokens."""
  from jaxspec.decoding.eagle import EagleDrafter
  from jaxspec.models.eagle import load_eagle, save_eagle
  from jaxspec.models.llama import rope_tables
  from tests.test_eagle import random_draft

  short, short_params = load_hf(folder("phi3_longrope"))
  draft, dp = random_draft(short, short_params)
  save_eagle(tmp_path / "eagle", draft, dp, dtype="float32")
  model, params = load_hf(folder("phi3_longrope"), context=1280)
  draft, dp = load_eagle(tmp_path / "eagle", model, params)
  assert (draft.cfg.max_seq_len, draft.cfg.rope_scaling) == (1280, model.cfg.rope_scaling)
  positions = jnp.arange(330, 340)[None]
  tables = lambda cfg: rope_tables(positions, cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len)
  assert np.abs(np.asarray(tables(draft.cfg)[0]) - np.asarray(tables(short.cfg)[0])).max() > 0.05
  np.testing.assert_array_equal(np.asarray(tables(draft.cfg)[0]), np.asarray(tables(model.cfg)[0]))
  prompt = ref["phi3_longrope_long_ids"][0, :330].tolist()
  greedy = generate(model, params, [prompt], max_new_tokens=12)
  res = generate(model, params, [prompt], max_new_tokens=12, drafter=EagleDrafter(draft, 3), draft_params=dp)
  assert res.tokens == greedy.tokens


def test_a_context_past_the_file_s_or_a_bound_is_refused(tmp_path):
  with pytest.raises(ModelLoadError, match=r"context=1281 is longer than the model's \(max_position_embeddings=1280\): "
                                           r"ask for 1280 tokens or fewer\."):
    load_hf(folder("phi3_longrope"), context=1281)
  with pytest.raises(ModelLoadError, match=r"context=0: give the model's context as a whole number"):
    load_hf(folder("phi3_longrope"), context=0)
  # Qwen2's window covers some layers only: jaxspec runs such a model within one window
  out = tmp_path / "windowed"
  shutil.copytree(folder("qwen2"), out)
  cfg = json.loads((out / "config.json").read_text())
  (out / "config.json").write_text(json.dumps({**cfg, "use_sliding_window": True, "sliding_window": 100}))
  assert load_hf(str(out))[0].cfg.max_seq_len == 100
  assert load_hf(str(out), context=64)[0].cfg.max_seq_len == 64
  with pytest.raises(ModelLoadError, match=r"context=101 passes its sliding window \(sliding_window=100\), which "
                                           r"jaxspec applies to Phi-3 and Mistral models only.*ask for 100 tokens"):
    load_hf(str(out), context=101)


def test_older_config_layout_loads_the_same(ref, tmp_path):
  """transformers 4 writes `rope_scaling` (with `type` in older files) and `rope_theta` at the top level."""
  out = tmp_path / "old"
  shutil.copytree(folder("llama3"), out)
  cfg = json.loads((out / "config.json").read_text())
  block = cfg.pop("rope_parameters")
  cfg["rope_theta"] = block.pop("rope_theta")
  block["type"] = block.pop("rope_type")
  cfg["rope_scaling"] = block
  (out / "config.json").write_text(json.dumps(cfg))
  model, params = load_hf(str(out))
  assert model.cfg == load_hf(folder("llama3"))[0].cfg
  np.testing.assert_allclose(batch_logits(model, params, ref["llama3_ids"]), ref["llama3_logits"], atol=2e-4, rtol=0)


def llama_cpp_factors(theta: float, head_dim: int, s: dict) -> np.ndarray:
  """The rope_freqs tensor llama.cpp's converter writes for a Llama 3.1 config, one frequency at a time (written
  here from its description, apart from jaxspec's vectorised `rope_divisors`)."""
  old = s["original_max_position_embeddings"]
  out = []
  for i in range(0, head_dim, 2):
    wavelength = 2 * math.pi * theta ** (i / head_dim)
    if wavelength < old / s["high_freq_factor"]:
      out.append(1.0)
    elif wavelength > old / s["low_freq_factor"]:
      out.append(s["factor"])
    else:
      smooth = (old / wavelength - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
      out.append(1 / ((1 - smooth) / s["factor"] + smooth))
  return np.asarray(out, np.float32)


def test_the_three_llama3_bands():
  """Short waves keep their frequency, long ones are divided by the factor, and the band between blends the two."""
  s = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
       "original_max_position_embeddings": 128}
  d = rope_divisors(16, 10000.0, rope_scaling(s))  # wavelengths 6, 20, 63, 199, 628, ... against bands at 32 and 128
  assert d[0] == d[1] == 1.0 and np.all(d[3:] == 8.0) and 1.0 < d[2] < 8.0
  np.testing.assert_allclose(d, llama_cpp_factors(10000.0, 16, s), rtol=1e-6)
  assert rope_divisors(16, 10000.0, ()) is None


def write_rope_gguf(path, model, params, add):
  def extra(w):
    add(w)
    w.add_tensor("output.weight", np.ascontiguousarray(np.asarray(params["lm_head"]["kernel"], np.float32).T))
  write_gguf(path, model, params, Q.F32, extra=extra)


def test_gguf_files_scale_rope_as_llama_cpp_writes_it(ref, tmp_path, caplog):
  """A GGUF file with llama.cpp's per-frequency factors (Llama 3.1+) or its linear scaling type gives transformers'
  logits (the factors are read, not reported as skipped); a header with linear scaling and factors both, too few
  factors, YaRN without its original context or with settings jaxspec does not implement, or LongRoPE without its
  factors is refused."""
  model, params = load_hf(folder("llama3"))
  s = dict(model.cfg.rope_scaling)
  factors = llama_cpp_factors(model.cfg.rope_theta, model.cfg.head_dim, s)
  write_rope_gguf(tmp_path / "llama3.gguf", model, params, lambda w: w.add_tensor("rope_freqs.weight", factors))
  with caplog.at_level("WARNING", logger="jaxspec.loading"):
    loaded, p = load_gguf(str(tmp_path / "llama3.gguf"))
  assert not caplog.records, [r.getMessage() for r in caplog.records]
  assert dict(loaded.cfg.rope_scaling)["rope_type"] == "factors"
  np.testing.assert_allclose(batch_logits(loaded, p, ref["llama3_ids"]), ref["llama3_logits"], atol=2e-4, rtol=0)
  # Written as a folder (a whole-model export), the factors load back as they were.
  save_hf(str(tmp_path / "hf"), loaded, p)
  again, p2 = load_hf(str(tmp_path / "hf"))
  assert again.cfg.rope_scaling == loaded.cfg.rope_scaling
  np.testing.assert_allclose(batch_logits(again, p2, ref["llama3_ids"]), ref["llama3_logits"], atol=2e-4, rtol=0)

  model, params = load_hf(folder("linear"))

  def linear(w):
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(4.0)
  write_rope_gguf(tmp_path / "linear.gguf", model, params, linear)
  loaded, p = load_gguf(str(tmp_path / "linear.gguf"))
  np.testing.assert_allclose(batch_logits(loaded, p, ref["linear_ids"]), ref["linear_logits"], atol=2e-4, rtol=0)

  for name, add, message in (
      ("both", lambda w: (linear(w), w.add_tensor("rope_freqs.weight", factors)), "linear RoPE scaling and holds "
       "per-frequency factors"),
      ("short", lambda w: w.add_tensor("rope_freqs.weight", factors[:3]), "holds 3 factors where head_dim 16 needs 8"),
      ("yarn", lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.YARN), w.add_rope_scaling_factor(4.0)),
       "no 'llama.rope.scaling.original_context_length'"),
      ("longrope", lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE), "LongRoPE scaling without its "
       "factors"),
      ("yarn-ext", lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.YARN), w.add_rope_scaling_factor(4.0),
                              w.add_rope_scaling_orig_ctx_len(128), w.add_rope_scaling_yarn_ext_factor(0.5)),
       "sets yarn_ext_factor or yarn_log_multiplier")):
    write_rope_gguf(tmp_path / f"{name}.gguf", model, params, add)
    with pytest.raises(ModelLoadError, match=message):
      load_gguf(str(tmp_path / f"{name}.gguf"))


@pytest.mark.parametrize("name", ["llama3", "llama_bias"])
def test_variants_with_stacked_layers_and_bfloat16_weights(ref, name):
  """`scan_layers` stacks the biases with the other layer weights, and bfloat16 weights computed in float32 stay
  near transformers' logits (within the weights' rounding)."""
  model, params = load_hf(folder(name), scan_layers=True)
  np.testing.assert_allclose(batch_logits(model, params, ref[f"{name}_ids"]), ref[f"{name}_logits"], atol=2e-4,
                             rtol=0)
  model, params = load_hf(folder(name), dtype="float32", param_dtype="bfloat16")
  np.testing.assert_allclose(batch_logits(model, params, ref[f"{name}_ids"]), ref[f"{name}_logits"], atol=0.1,
                             rtol=0)


@pytest.mark.parametrize("name", VARIANTS)
def test_a_variant_written_as_a_folder_loads_back(ref, tmp_path, name):
  """`save_hf` (whole-model exports) writes the architecture, biases and scaling into config.json, so the folder
  computes the same (and names the same family: Qwen2 stays Qwen2; Phi-3 is written as the LLaMA it loads as, its
  projections split, with its LongRoPE settings and the bounded context, which transformers' LLaMA computes as its
  Phi-3 does, or as Mistral where it has a window, but with partial rotary embeddings, which only transformers' Phi-3
  has, as Phi-3 with its projections fused again: checked by hand, 0 difference in transformers' logits)."""
  model, params = load_hf(folder(name))
  save_hf(str(tmp_path / "out"), model, params)
  written = json.loads((tmp_path / "out" / "config.json").read_text())
  original = json.loads((Path(folder(name)) / "config.json").read_text())
  phi3 = original["architectures"] == ["Phi3ForCausalLM"] and not model.cfg.rotary_dim  # partial rotary: Phi-3
  as_llama = ["MistralForCausalLM"] if model.cfg.sliding_window else ["LlamaForCausalLM"]  # Mistral: with a window
  assert written["architectures"] == (as_llama if phi3 else original["architectures"])
  again, p = load_hf(str(tmp_path / "out"))
  assert again.cfg == model.cfg
  np.testing.assert_allclose(batch_logits(again, p, ref[f"{name}_ids"]), ref[f"{name}_logits"], atol=2e-4, rtol=0)


def test_biases_the_config_does_not_name_are_refused(tmp_path):
  """A Qwen2 folder whose config says LLaMA, or a LLaMA folder with biases its config does not set, is refused before
  any weight is read, naming the tensor (skipping the biases would run another model)."""
  out = tmp_path / "m"
  shutil.copytree(folder("qwen2"), out)
  cfg = json.loads((out / "config.json").read_text())
  cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
  (out / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ModelLoadError, match=r"hold 'model.layers.0.self_attn.[qkv]_proj.bias', a bias config.json "
                                           "does not give this model"):
    load_hf(str(out))
  shutil.rmtree(out)
  shutil.copytree(folder("llama_bias"), out)
  cfg = json.loads((out / "config.json").read_text())
  cfg["mlp_bias"] = False
  (out / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ModelLoadError, match="'model.layers.0.mlp.down_proj.bias', a bias config.json does not give"):
    load_hf(str(out))


@pytest.mark.parametrize("block, message", [
    ({"rope_type": "llama3", "factor": 8.0}, "RoPE scaling 'llama3' .* without low_freq_factor, high_freq_factor, "
     "original_max_position_embeddings"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
      "original_max_position_embeddings": 128}, "needs high_freq_factor \\(1.0\\) above low_freq_factor \\(4.0\\)"),
    ({"rope_type": "linear", "factor": 0}, "RoPE scaling 'linear' needs factor a finite number above 0, not 0"),
    ({"rope_type": "linear", "factor": "4"}, "needs factor a finite number above 0, not '4'"),
    ({"rope_type": "dynamic", "factor": 2.0},
     "RoPE scaling 'dynamic'.*implements plain RoPE and the scalings linear, llama3, longrope and yarn"),
], ids=["llama3-missing", "llama3-bands", "linear-zero", "linear-string", "dynamic"])
def test_bad_scaling_settings_are_refused(tmp_path, block, message):
  out = tmp_path / "m"
  shutil.copytree(folder("linear"), out)
  cfg = json.loads((out / "config.json").read_text())
  cfg["rope_parameters"] = {**block, "rope_theta": 10000.0}
  (out / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ModelLoadError, match=message):
    load_hf(str(out))


@pytest.mark.parametrize("name", ["llama3", "phi4_mini"])
def test_a_draft_of_a_scaled_target_keeps_its_scaling(tmp_path, name):
  """A draft made from a scaled target's first layers (`spec`'s distilled draft, `layerskip`) encodes positions as the
  target does (its scaling; its partial rotary embeddings), also after a round trip through the draft's folder."""
  from jaxspec.models.draft import load_draft, save_draft

  model, params = load_hf(folder(name))
  draft = LlamaLM(dataclasses.replace(model.cfg, n_layers=1))
  dparams = {k: v for k, v in params.items() if k != "layers_1"}
  save_draft(tmp_path / "d", draft, dparams, dtype="float32")
  again, p = load_draft(tmp_path / "d", params)
  assert (again.cfg.rope_scaling, again.cfg.rotary_dim) == (model.cfg.rope_scaling, model.cfg.rotary_dim)
  ids = np.arange(3, 103, dtype=np.int32)[None]
  np.testing.assert_allclose(batch_logits(again, p, ids), batch_logits(draft, dparams, ids), atol=1e-5, rtol=0)


def test_a_qwen2_gguf_file_matches_transformers(ref, tmp_path):
  """A Qwen2 GGUF file as llama.cpp's converter writes it (architecture "qwen2": Q/K rows as Hugging Face stores them,
  q/k/v biases, tied head) gives transformers' logits; the same file read as a "llama" one (rows unpermuted as
  llama.cpp's LLaMA converter permutes them) does not load its biases."""
  model, params = load_hf(folder("qwen2"))
  cfg = model.cfg

  def write(arch):
    w = gguf_writer(tmp_path / f"{arch}.gguf", cfg, arch)
    f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))  # noqa: E731
    w.add_tensor("token_embd.weight", f32(params["embed"]["embedding"]))
    w.add_tensor("output_norm.weight", f32(params["final_norm"]["scale"]))
    names = {("attn", "q"): "attn_q", ("attn", "k"): "attn_k", ("attn", "v"): "attn_v", ("attn", "o"): "attn_output",
             ("mlp", "gate"): "ffn_gate", ("mlp", "up"): "ffn_up", ("mlp", "down"): "ffn_down"}
    for i in range(cfg.n_layers):
      p = params[f"layers_{i}"]
      w.add_tensor(f"blk.{i}.attn_norm.weight", f32(p["attn_norm"]["scale"]))
      w.add_tensor(f"blk.{i}.ffn_norm.weight", f32(p["mlp_norm"]["scale"]))
      for (mod, key), name in names.items():
        w.add_tensor(f"blk.{i}.{name}.weight", f32(np.asarray(p[mod][key]["kernel"]).T))
        if "bias" in p[mod][key]:
          w.add_tensor(f"blk.{i}.{name}.bias", f32(p[mod][key]["bias"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(tmp_path / f"{arch}.gguf")

  loaded, p = load_gguf(write("qwen2"))
  assert (loaded.cfg.qkv_bias, loaded.cfg.o_bias, loaded.cfg.tie_embeddings) == (True, False, True)
  np.testing.assert_allclose(batch_logits(loaded, p, ref["qwen2_ids"]), ref["qwen2_logits"], atol=2e-4, rtol=0)
  with pytest.raises(ModelLoadError, match="holds 'blk.0.attn_q.bias'; jaxspec reads a GGUF file's biases for "
                                           "Qwen2's q/k/v only"):
    load_gguf(write("llama"))


def write_phi3_gguf(path, name: str, drop: tuple = (), window: int | None = None):
  """The Phi-3 fixture `name` as llama.cpp's converter writes a Phi-3 GGUF file: the safetensors' matrices as they
  are (q/k/v fused in `attn_qkv`, gate and up in `ffn_up`, no row permutation), the original context, the sliding
  window (0: none), and for LongRoPE the two factor tensors and the attention factor. `drop`: tensors left out."""
  from safetensors.numpy import load_file

  hf = json.loads((Path(folder(name)) / "config.json").read_text())
  tensors = load_file(str(Path(folder(name)) / "model.safetensors"))
  model, _ = load_hf(folder(name))
  w = gguf.GGUFWriter(str(path), "phi3")
  cfg = model.cfg
  w.add_context_length(hf["max_position_embeddings"])
  w.add_rope_scaling_orig_ctx_len(hf["original_max_position_embeddings"])
  w.add_embedding_length(cfg.d_model)
  w.add_feed_forward_length(cfg.d_ff)
  w.add_block_count(cfg.n_layers)
  w.add_head_count(cfg.n_heads)
  w.add_head_count_kv(cfg.n_kv_heads)
  w.add_layer_norm_rms_eps(cfg.norm_eps)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_sliding_window(hf["sliding_window"] or 0 if window is None else window)
  w.add_vocab_size(cfg.vocab_size)
  rope = hf["rope_parameters"]
  out = {"token_embd.weight": tensors["model.embed_tokens.weight"], "output_norm.weight": tensors["model.norm.weight"],
         "output.weight": tensors["lm_head.weight"]}
  if rope.get("rope_type") == "longrope":
    growth = hf["max_position_embeddings"] / hf["original_max_position_embeddings"]
    w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(growth) / math.log(hf["original_max_position_embeddings"])))
    out["rope_factors_long.weight"] = np.asarray(rope["long_factor"], np.float32)
    out["rope_factors_short.weight"] = np.asarray(rope["short_factor"], np.float32)
  names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.qkv_proj": "attn_qkv",
           "self_attn.o_proj": "attn_output", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
  for i in range(cfg.n_layers):
    out.update({f"blk.{i}.{g}.weight": tensors[f"model.layers.{i}.{h}.weight"] for h, g in names.items()})
  for k, v in out.items():
    if k not in drop:
      w.add_tensor(k, np.ascontiguousarray(v, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


@pytest.mark.parametrize("name", ["phi3", "phi3_longrope"])
def test_a_phi3_gguf_file_matches_transformers(ref, tmp_path, name, caplog):
  """A Phi-3 GGUF file (fused matrices, LongRoPE factors as tensors) gives transformers' logits and greedy tokens;
  its sliding window applies, and LongRoPE's original context bounds the context, as from the folder."""
  with caplog.at_level("WARNING", logger="jaxspec.loading"):
    model, params = load_gguf(write_phi3_gguf(tmp_path / "m.gguf", name))
  from_folder = load_hf(folder(name))[0].cfg
  assert (model.cfg.max_seq_len, model.cfg.sliding_window) == (from_folder.max_seq_len, from_folder.sliding_window)
  assert dict(model.cfg.rope_scaling).keys() == dict(from_folder.rope_scaling).keys()  # values: float32 in the file
  said = [r.getMessage() for r in caplog.records]
  assert not any("skipped" in m for m in said), said
  if name == "phi3":  # the window applies; the context stays whole
    assert (model.cfg.max_seq_len, model.cfg.sliding_window, said) == (512, 320, [])
  else:  # LongRoPE: the context is bounded to the original one
    assert model.cfg.max_seq_len == 320 and any("bounded to 320 tokens" in m for m in said)
  np.testing.assert_allclose(batch_logits(model, params, ref[f"{name}_ids"]), ref[f"{name}_logits"], atol=2e-4,
                             rtol=0)
  want = ref[f"{name}_greedy"].tolist()
  assert generate(model, params, [ref[f"{name}_ids"][0, :40].tolist()], max_new_tokens=len(want)).tokens[0] == want


def test_phi3_files_jaxspec_cannot_run_exactly_are_refused(tmp_path):
  """Half of LongRoPE's factors, or a fused matrix whose rows are not the config's q/k/v, is refused naming what is
  wrong; a file whose window is 0 (Phi-4: none) keeps its whole context."""
  with pytest.raises(ModelLoadError, match="LongRoPE needs both rope_factors_short and rope_factors_long"):
    load_gguf(write_phi3_gguf(tmp_path / "a.gguf", "phi3_longrope", drop=("rope_factors_long.weight",)))
  model, _ = load_gguf(write_phi3_gguf(tmp_path / "b.gguf", "phi3", window=0))
  assert model.cfg.max_seq_len == 512
  out = tmp_path / "m"
  shutil.copytree(folder("phi3"), out)
  cfg = json.loads((out / "config.json").read_text())
  cfg["num_key_value_heads"] = 2
  (out / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ModelLoadError, match=r"'model.layers.0.self_attn.qkv_proj.weight' has 64 rows where the "
                                           r"config's q \+ k \+ v need 32 \+ 32 \+ 32"):
    load_hf(str(out))


@pytest.mark.parametrize("change, message", [
    ({"long_factor": None}, "RoPE scaling 'longrope' .* without long_factor"),
    ({"short_factor": [1.0] * 3}, "needs short_factor of 8 finite numbers above 0"),
    ({"original_max_position_embeddings": None}, "without original_max_position_embeddings"),
], ids=["no-long-factors", "short-factors-short", "no-original-context"])
def test_bad_longrope_settings_are_refused(tmp_path, change, message):
  out = tmp_path / "m"
  shutil.copytree(folder("phi3_longrope"), out)
  cfg = json.loads((out / "config.json").read_text())
  cfg["rope_parameters"].update(change)
  cfg["rope_parameters"] = {k: v for k, v in cfg["rope_parameters"].items() if v is not None}
  cfg.pop("original_max_position_embeddings")
  if "original_max_position_embeddings" not in change:
    cfg["original_max_position_embeddings"] = 320
  else:  # (a Phi-3 config always has one for transformers: Phi3Config's default, 4096)
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
  (out / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ModelLoadError, match=message):
    load_hf(str(out))


@pytest.mark.parametrize("change, context, original, factor", [
    ({"original_max_position_embeddings": None}, 1280, 4096, 1.0),  # the block's 320 unread: Phi3Config's 4096
    ({"original_max_position_embeddings": 256}, 256, 256, 1.13588776376054),  # over the block's 320
    ({"max_position_embeddings": None}, 320, 320, 1.200822021045554),  # Phi3Config's 4096, not 2048
    ({"original_max_position_embeddings": 256, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}, 256,
     256, 1.13588776376054),  # LLaMA's too: its rope code reads the config's attribute
], ids=["block-only", "top-level-wins", "default-max-positions", "llama-top-level-wins"])
def test_phi3_longrope_settings_are_read_as_transformers_reads_them(tmp_path, change, context, original, factor):
  """transformers' Phi-3 takes the top-level original_max_position_embeddings over the rope block's, 4096 where it
  is absent, and 4096 max_position_embeddings where that is absent (the attention factors are transformers' own
  `rotary_emb.attention_scaling` for these configs; with them the logits agree within 2e-5 up to the context)."""
  from jaxspec.models.llama import rope_attention_factor, rope_context
  out = tmp_path / "m"
  shutil.copytree(folder("phi3_longrope"), out)
  cfg = json.loads((out / "config.json").read_text())
  cfg = {k: v for k, v in {**cfg, **change}.items() if v is not None}
  (out / "config.json").write_text(json.dumps(cfg))
  model, _ = load_hf(str(out))
  s = model.cfg.rope_scaling
  assert (model.cfg.max_seq_len, rope_context(s)) == (context, original)
  assert rope_attention_factor(s) == pytest.approx(factor, rel=1e-12)


def test_yarn_takes_the_top_level_original_context(tmp_path):
  """As for LongRoPE, transformers' YaRN reads a top-level original_max_position_embeddings over the block's (with 8
  instead of 128 its ramp, and so its logits, differ)."""
  out = tmp_path / "m"
  shutil.copytree(folder("qwen2_yarn"), out)
  cfg = json.loads((out / "config.json").read_text())
  (out / "config.json").write_text(json.dumps({**cfg, "original_max_position_embeddings": 8}))
  assert dict(load_hf(str(out))[0].cfg.rope_scaling)["original_max_position_embeddings"] == 8


def test_phi3_applies_its_sliding_window_whatever_use_sliding_window_says(tmp_path):
  """transformers' Phi-3 (and Mistral) has no `use_sliding_window` switch: the window applies anyway."""
  out = tmp_path / "m"
  shutil.copytree(folder("phi3"), out)
  cfg = json.loads((out / "config.json").read_text())
  (out / "config.json").write_text(json.dumps({**cfg, "use_sliding_window": False}))
  assert (load_hf(str(out))[0].cfg.sliding_window, load_hf(str(out))[0].cfg.max_seq_len) == (320, 512)


def test_a_phi3_folder_loads_as_a_draft(ref):
  """`load_draft` reads any LLaMA-family folder, Phi-3's fused matrices split as `load_hf` splits them."""
  from jaxspec.models.draft import load_draft
  draft, params = load_draft(folder("phi3"))
  np.testing.assert_allclose(batch_logits(draft, params, ref["phi3_ids"]), ref["phi3_logits"], atol=2e-4, rtol=0)


@pytest.mark.parametrize("change, message", [
    ({"original_max_position_embeddings": None}, "RoPE scaling 'yarn' .* without original_max_position_embeddings"),
    ({"factor": 0}, "sets factor to 0"),
    ({"beta_fast": -1}, "sets beta_fast to -1"),
], ids=["no-original-context", "zero-factor", "negative-beta"])
def test_bad_yarn_settings_are_refused(tmp_path, change, message):
  out = tmp_path / "m"
  shutil.copytree(folder("qwen2_yarn"), out)
  cfg = json.loads((out / "config.json").read_text())
  cfg["rope_parameters"] = {k: v for k, v in {**cfg["rope_parameters"], **change}.items() if v is not None}
  (out / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ModelLoadError, match=message):
    load_hf(str(out))


def test_yarn_settings_transformers_derives_are_derived_the_same(tmp_path, ref):
  """A YaRN block without its factor takes max_position_embeddings / the original context; explicit beta_fast,
  beta_slow, truncate and attention_factor are used as given (transformers' reading), DeepSeek's mscale pair sets the
  attention factor."""
  def load(change, top=None):
    out = tmp_path / str(len(list(tmp_path.iterdir())))
    shutil.copytree(folder("qwen2_yarn"), out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["rope_parameters"] = {k: v for k, v in {**cfg["rope_parameters"], **change}.items() if v is not None}
    cfg.update(top or {})
    (out / "config.json").write_text(json.dumps(cfg))
    return dict(load_hf(str(out))[0].cfg.rope_scaling)
  assert load({"factor": None}, {"max_position_embeddings": 512})["factor"] == 4.0
  given = load({"beta_fast": 16, "beta_slow": 2, "truncate": False, "attention_factor": 1.5})
  assert (given["beta_fast"], given["beta_slow"], given["truncate"], given["attention_factor"]) == (16, 2, False, 1.5)
  deepseek = load({"mscale": 0.707, "mscale_all_dim": 0.707})
  assert deepseek["attention_factor"] == 1.0


def test_longrope_s_factors_follow_the_model_s_context():
  """The short factors up to the original context, the long ones past it, whoever builds the config; the attention
  factor either way."""
  from jaxspec.models.llama import rope_tables, tiny_config
  s = rope_scaling({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                    "original_max_position_embeddings": 64, "attention_factor": 1.1})
  assert rope_divisors(16, 1e4, s, 64).tolist() == [1.0] * 8 == rope_divisors(16, 1e4, s).tolist()
  assert rope_divisors(16, 1e4, s, 65).tolist() == [2.0] * 8
  positions = jnp.arange(4)[None]
  for context, factor in ((64, 1.0), (65, 2.0)):
    cfg = tiny_config(head_dim=16, rope_scaling=s, max_seq_len=context)
    cos, _ = rope_tables(positions, cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len)
    want = np.cos(np.arange(4)[:, None] * 1e4 ** (-np.arange(0, 16, 2) / 16) / factor) * 1.1
    np.testing.assert_allclose(np.asarray(cos[0]), want, rtol=1e-5, atol=1e-6)


def test_context_defaults_follow_transformers_config_classes(tmp_path):
  """Where config.json is silent, transformers' config classes fill in: Mistral's window of 4096 (within a longer
  context), and a Phi-3 config asking for YaRN is read as LongRoPE (so without its factors it is refused, as
  transformers fails on it, rather than run as YaRN)."""
  out = tmp_path / "mistral"
  shutil.copytree(folder("linear"), out)
  cfg = json.loads((out / "config.json").read_text())
  cfg.pop("rope_parameters", None)
  cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", max_position_embeddings=8192)
  cfg.pop("sliding_window", None)
  (out / "config.json").write_text(json.dumps(cfg))
  assert (load_hf(str(out))[0].cfg.sliding_window, load_hf(str(out))[0].cfg.max_seq_len) == (4096, 8192)
  out = tmp_path / "phi3"
  shutil.copytree(folder("phi3"), out)
  cfg = json.loads((out / "config.json").read_text())
  cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
  (out / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ModelLoadError, match="RoPE scaling 'longrope' .* without short_factor, long_factor"):
    load_hf(str(out))
