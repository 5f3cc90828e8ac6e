"""Writes tiny random LLaMA checkpoints with scaled RoPE and what Hugging Face transformers computes with them
(tests/test_loading.py, the RoPE scaling tests).

Run it with the separate reference venv, never the project's (torch and transformers are not jaxspec dependencies):

  python3 -m venv /work/hfenv
  /work/hfenv/bin/pip install -q torch==2.13.0 transformers safetensors numpy   # torch: the CPU wheel
  /work/hfenv/bin/python scripts/llama_rope_reference.py [--out-dir tests/fixtures]

This script imports only torch, transformers and numpy (not jaxspec). It writes, under --out-dir:

  * `llama_rope/<v>/` for `<v>` in (`llama3`, `linear`): `config.json` + `model.safetensors` from
    `save_pretrained(folder, safe_serialization=True)` of a 2-layer LLaMA (vocab 128, width 32, 2 heads of 16, 1 KV
    head) whose `rope_scaling` is Llama 3.1's (factor 8, low/high frequency factors 1 and 4, original context 128:
    with head_dim 16 and theta 10000 the 8 frequencies fall in all three of its bands) or linear (factor 4);
  * `llama_rope_reference.npz` with, per variant: `<v>_ids` int32 [2, T] (random tokens, T = 300, past the original
    context), `<v>_logits` float32 [2, T / 4, V] (teacher forcing, positions 0, 4, 8, ...), `<v>_greedy` int32 [N]
    (pure-argmax `generate` of N new tokens after the first row's first 40 tokens, no EOS stop) and `<v>_greedy_margin` float32 [N] (each
    step's top-1 minus top-2 logit), and `meta_*` strings (library versions).

The reference numbers come from the model as transformers reloads it from the saved folder. Everything runs on CPU in
one thread with deterministic algorithms and fixed seeds, so a rerun writes byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
import transformers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT_DIR = os.path.join(REPO_ROOT, "tests", "fixtures")
LENGTH = 300  # past original_max_position_embeddings (128), where scaled and plain RoPE part ways most
STRIDE = 4  # logits kept at every 4th position (the file stays small)
PROMPT = 40
NEW_TOKENS = 24
VARIANTS = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 128},
    "linear": {"rope_type": "linear", "factor": 4.0},
}


def _make(scaling: dict, seed: int) -> transformers.LlamaForCausalLM:
  cfg = transformers.LlamaConfig(
      vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
      num_key_value_heads=1, head_dim=16, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5,
      tie_word_embeddings=False, rope_scaling=dict(scaling), bos_token_id=1, eos_token_id=2, pad_token_id=0)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(cfg).float().eval()
  with torch.no_grad():  # weights larger than the initializer's 0.02, so positions change the logits clearly
    for p in model.parameters():
      if p.dim() == 2:
        p.normal_(0.0, 0.15)
  return model


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR)
  args = parser.parse_args()
  torch.set_num_threads(1)
  torch.use_deterministic_algorithms(True)
  out = {}
  for i, (name, scaling) in enumerate(VARIANTS.items()):
    folder = os.path.join(args.out_dir, "llama_rope", name)
    _make(scaling, seed=i).save_pretrained(folder, safe_serialization=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    ids = np.random.default_rng(i).integers(3, 128, size=(2, LENGTH)).astype(np.int32)
    with torch.no_grad():
      logits = model(torch.from_numpy(ids).long(), use_cache=False).logits.numpy()
      gen = model.generate(torch.from_numpy(ids[:1, :PROMPT]).long(), max_new_tokens=NEW_TOKENS,
                           min_new_tokens=NEW_TOKENS,
                           do_sample=False, num_beams=1, output_scores=True, return_dict_in_generate=True,
                           eos_token_id=None, pad_token_id=0)
    scores = torch.stack(gen.scores, 1)[0].numpy()
    top2 = np.sort(scores, axis=-1)[:, -2:]
    out[f"{name}_ids"] = ids
    out[f"{name}_logits"] = logits[:, ::STRIDE].astype(np.float32)
    out[f"{name}_greedy"] = gen.sequences[0, PROMPT:].numpy().astype(np.int32)
    out[f"{name}_greedy_margin"] = (top2[:, 1] - top2[:, 0]).astype(np.float32)
  out["meta_transformers_version"] = np.array(transformers.__version__)
  out["meta_torch_version"] = np.array(torch.__version__)
  out["meta_numpy_version"] = np.array(np.__version__)
  out["meta_variants_json"] = np.array(json.dumps(VARIANTS, sort_keys=True))
  path = os.path.join(args.out_dir, "llama_rope_reference.npz")
  np.savez_compressed(path, **out)
  print(f"wrote {path}: " + ", ".join(f"{k} {v.shape}" for k, v in out.items() if not k.startswith("meta")))
  for name in VARIANTS:
    print(f"{name}: smallest greedy margin {out[f'{name}_greedy_margin'].min():.3f}")


if __name__ == "__main__":
  main()
