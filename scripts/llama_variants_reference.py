"""Writes tiny random LLaMA-family checkpoints of the variants jaxspec's LLaMA computes beside plain LLaMA (scaled
RoPE, bias terms) and what Hugging Face transformers computes with them (tests/test_llama_variants.py).

Run it with the separate reference venv, never the project's (torch and transformers are not jaxspec dependencies):

  python3 -m venv /work/hfenv
  /work/hfenv/bin/pip install -q torch==2.13.0 transformers safetensors numpy   # torch: the CPU wheel
  /work/hfenv/bin/python scripts/llama_variants_reference.py [--out-dir tests/fixtures]

This script imports only torch, transformers and numpy (not jaxspec). It writes, under --out-dir:

  * `llama_variants/<v>/`: `config.json` + `model.safetensors` from `save_pretrained(folder,
    safe_serialization=True)` of a 2-layer model (vocab 128, width 32, 2 heads of 16, 1 KV head), for `<v>` in
    - `llama3`: LLaMA whose `rope_scaling` is Llama 3.1's (factor 8, low/high frequency factors 1 and 4, original
      context 128: with head_dim 16 and theta 10000 the 8 frequencies fall in all three of its bands);
    - `linear`: LLaMA with linear RoPE scaling (factor 4);
    - `qwen2`: Qwen2 (biases on the q, k and v projections), tied head, rope theta 1e6;
    - `llama_bias`: LLaMA with `attention_bias` and `mlp_bias` (biases on all seven projections);
    - `phi3`: Phi-3 (q/k/v fused in one matrix, gate/up in another) with a sliding window of 320, longer than the
      references' 300 tokens;
    - `phi3_longrope`: Phi-3 with LongRoPE (original context 320, max_position_embeddings 1280: the references lie
      within the original context, where the short factors and the attention factor apply);
    - `qwen2_yarn`: Qwen2 with YaRN (factor 4, original context 128);
    - `phi3_window`, `mistral_window`: Phi-3 and Mistral with sliding windows of 48 tokens (the references pass
      them);
    - `phi4_mini`: Phi-3 as Phi-4-mini uses it: rotary embeddings on 3/4 of each head (partial_rotary_factor),
      LongRoPE, a tied head;
    - `qwen3`: Qwen3 (an RMSNorm over each head's queries and keys, q_norm and k_norm, whose weights are drawn around
      1), heads of 24 features (head_dim apart from hidden_size / heads, as Qwen3 sets it), a tied head;
    biases drawn at a scale that changes the outputs clearly (transformers initialises them to zero);
  * `llama_variants_reference.npz` with, per variant: `<v>_ids` int32 [2, T] (random tokens, T = 300, past the original
    context), `<v>_logits` float32 [2, T / 4, V] (teacher forcing, positions 0, 4, 8, ...), `<v>_greedy` int32 [N]
    (pure-argmax `generate` of N new tokens after the first row's first 40 tokens, no EOS stop) and
    `<v>_greedy_margin` float32 [N] (each step's top-1 minus top-2 logit, at least 0.02: the weights come from the
    first seed that gives that), and `meta_*` strings (library versions, the variants and their weight seeds); for
    the LongRoPE variants (`phi3_longrope`, `phi4_mini`) also `<v>_long_ids` [2, 400] and `<v>_long_logits` (every
    4th position): 400 tokens pass the original context of 320, so transformers computes them with the long factors.

The reference numbers come from the model as transformers reloads it from the saved folder. Everything runs on CPU in
one thread with deterministic algorithms and fixed seeds, so a rerun writes byte-identical files.
"""

from __future__ import annotations

import argparse
import copy
import json
import os

import numpy as np
import torch
import transformers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT_DIR = os.path.join(REPO_ROOT, "tests", "fixtures")
LENGTH = 300  # past original_max_position_embeddings (128), where scaled and plain RoPE part ways most
STRIDE = 4  # logits kept at every 4th position (the file stays small)
LONG_LENGTH = 400  # the LongRoPE variants' long references: past their original context of 320
PROMPT = 40
NEW_TOKENS = 24
MIN_MARGIN = 0.02  # the smallest top-1 minus top-2 logit a greedy step may have
MAX_WEIGHT_SEEDS = 20
SIZES = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
VARIANTS = {
    "llama3": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 128}}),
    "linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "qwen2": ("qwen2", {"rope_theta": 1e6, "tie_word_embeddings": True, "use_sliding_window": False}),
    "llama_bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    # Phi-3's fused q/k/v and gate/up matrices, with a sliding window longer than the tokens the references use, and
    # Phi-3's LongRoPE within its original context (short factors and the
    # attention factor transformers derives from the context's growth, 1280 / 320).
    "phi3": ("phi3", {"sliding_window": 320, "original_max_position_embeddings": 512}),
    "phi3_longrope": ("phi3", {"max_position_embeddings": 1280, "original_max_position_embeddings": 320,
                               "rope_scaling": {"rope_type": "longrope",
                                                "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.6, 3.3, 4.0],
                                                "long_factor": [1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0]}}),
    # Phi-4-mini's layout: rotary embeddings on the first 3/4 of each head (12 of 16 features), LongRoPE, tied head.
    "phi4_mini": ("phi3", {"max_position_embeddings": 1280, "original_max_position_embeddings": 320,
                           "partial_rotary_factor": 0.75, "tie_word_embeddings": True,
                           "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0, 2.6, 3.4],
                                            "long_factor": [1.0, 3.0, 6.0, 9.0, 12.0, 16.0]}}),
    # YaRN as Qwen2.5's model cards have users switch it on (factor 4 over the original context; here 128 tokens of
    # the references' 300, with head_dim 16 and theta 1e4 its 8 frequencies fall on both sides of the ramp and on it).
    "qwen2_yarn": ("qwen2", {"tie_word_embeddings": True, "use_sliding_window": False,
                             "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 128}}),
    # Sliding windows of 48 tokens, which the references' 300 tokens and the greedy run (40 + 24) pass: Phi-3's
    # window (fused matrices) and Mistral's (LLaMA's layout).
    "phi3_window": ("phi3", {"sliding_window": 48, "original_max_position_embeddings": 512}),
    "mistral_window": ("mistral", {"sliding_window": 48}),
    # Qwen3: q_norm and k_norm before RoPE, an explicit head_dim (24, where hidden_size / heads is 16), a tied head.
    "qwen3": ("qwen3", {"head_dim": 24, "rope_theta": 1e6, "tie_word_embeddings": True, "use_sliding_window": False}),
}


def _make(family: str, settings: dict, seed: int) -> transformers.PreTrainedModel:
  settings = copy.deepcopy(settings)  # transformers writes into the rope_scaling dict it is given
  if family == "qwen2":
    cfg = transformers.Qwen2Config(**SIZES, rms_norm_eps=1e-6, **settings)
    cls = transformers.Qwen2ForCausalLM
  elif family == "qwen3":
    cfg = transformers.Qwen3Config(**SIZES, rms_norm_eps=1e-6, **settings)
    cls = transformers.Qwen3ForCausalLM
  elif family == "mistral":
    cfg = transformers.MistralConfig(**SIZES, head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=False, **settings)
    cls = transformers.MistralForCausalLM
  elif family == "phi3":
    cfg = transformers.Phi3Config(**{**SIZES, "tie_word_embeddings": False, **settings}, rms_norm_eps=1e-5)
    cls = transformers.Phi3ForCausalLM
  else:
    cfg = transformers.LlamaConfig(**SIZES, head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                   **{"rope_theta": 10000.0, **settings})
    cls = transformers.LlamaForCausalLM
  torch.manual_seed(seed)
  model = cls(cfg).float().eval()
  with torch.no_grad():  # weights larger than the initializer's 0.02, so positions and biases change the logits
    for name, p in model.named_parameters():
      if p.dim() == 2:
        p.normal_(0.0, 0.15)
      elif name.endswith(".bias"):
        p.normal_(0.0, 0.5)
    for name, p in model.named_parameters():  # (after the others: the other variants' weights stay as they were)
      if name.endswith(("q_norm.weight", "k_norm.weight")):
        p.normal_(1.0, 0.3)
  return model


def _reference(folder: str, seed: int) -> dict:
  """What transformers computes with the model saved in `folder` (reloaded from it)."""
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
  ids = np.random.default_rng(seed).integers(3, 128, size=(2, LENGTH)).astype(np.int32)
  with torch.no_grad():
    logits = model(torch.from_numpy(ids).long(), use_cache=False).logits.numpy()
    gen = model.generate(torch.from_numpy(ids[:1, :PROMPT]).long(), max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1, output_scores=True,
                         return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
  top2 = np.sort(torch.stack(gen.scores, 1)[0].numpy(), axis=-1)[:, -2:]
  return {"ids": ids, "logits": logits[:, ::STRIDE].astype(np.float32),
          "greedy": gen.sequences[0, PROMPT:].numpy().astype(np.int32),
          "greedy_margin": (top2[:, 1] - top2[:, 0]).astype(np.float32)}


def _long_reference(folder: str, seed: int) -> dict:
  """For a LongRoPE variant: teacher-forced logits over LONG_LENGTH tokens, past the original context, where
  transformers computes with the long factors."""
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
  ids = np.random.default_rng(seed).integers(3, 128, size=(2, LONG_LENGTH)).astype(np.int32)
  with torch.no_grad():
    logits = model(torch.from_numpy(ids).long(), use_cache=False).logits.numpy()
  return {"long_ids": ids, "long_logits": logits[:, ::STRIDE].astype(np.float32)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR)
  args = parser.parse_args()
  torch.set_num_threads(1)
  torch.use_deterministic_algorithms(True)
  out, seeds = {}, {}
  for i, (name, (family, settings)) in enumerate(VARIANTS.items()):
    folder = os.path.join(args.out_dir, "llama_variants", name)
    # The first weight seed whose greedy continuation has no near tie, so float32 rounding cannot flip a token.
    for seed in range(100 * i, 100 * i + MAX_WEIGHT_SEEDS):
      _make(family, settings, seed=seed).save_pretrained(folder, safe_serialization=True)
      ref = _reference(folder, seed=i)
      if ref["greedy_margin"].min() >= MIN_MARGIN:
        break
    else:
      raise SystemExit(f"{name}: no seed in {MAX_WEIGHT_SEEDS} gives greedy margins of {MIN_MARGIN}")
    seeds[name] = seed
    if settings.get("rope_scaling", {}).get("rope_type") == "longrope":
      ref.update(_long_reference(folder, seed=1000 + i))
    out.update({f"{name}_{k}": v for k, v in ref.items()})
  out["meta_transformers_version"] = np.array(transformers.__version__)
  out["meta_torch_version"] = np.array(torch.__version__)
  out["meta_numpy_version"] = np.array(np.__version__)
  out["meta_variants_json"] = np.array(json.dumps({"variants": VARIANTS, "weight_seeds": seeds}, sort_keys=True))
  path = os.path.join(args.out_dir, "llama_variants_reference.npz")
  np.savez_compressed(path, **out)
  print(f"wrote {path}: " + ", ".join(f"{k} {v.shape}" for k, v in out.items() if not k.startswith("meta")))
  for name in VARIANTS:
    print(f"{name}: smallest greedy margin {out[f'{name}_greedy_margin'].min():.3f}")


if __name__ == "__main__":
  main()
