"""Writes tiny random T5 checkpoints and what Hugging Face transformers computes with them (tests/test_t5_loading.py).

Run it with the separate reference venv, never the project's (torch and transformers are not jaxspec dependencies):

  python3 -m venv /work/hfenv
  /work/hfenv/bin/pip install -q torch==2.13.0 transformers safetensors numpy   # torch: the CPU wheel
  /work/hfenv/bin/python scripts/t5_hf_reference.py [--out-dir tests/fixtures]

This script imports only torch, transformers, safetensors and numpy (not jaxspec). It writes, under --out-dir:

  * `t5_tiny_v11/`: T5 v1.1 style (`feed_forward_proj="gated-gelu"`, an untied `lm_head`, no output scaling);
  * `t5_tiny_orig/`: the original T5 (`feed_forward_proj="relu"`, head tied to `shared`, hidden state scaled by
    d_model^-1/2 before the head);
  * `t5_tiny_v11_tied/`: what `T5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False)` gives in
    transformers 5: its T5 always ties `lm_head` to `shared` unless the checkpoint holds a different `lm_head.weight`,
    and `tie_word_embeddings=False` only turns the output scaling off (`scale_decoder_outputs: false`). So: a tied
    head without the scaling, a combination the two above do not cover;

each holding only `config.json` + `model.safetensors` from `save_pretrained(folder, safe_serialization=True)`, and
`t5_tiny_reference.npz` with, for each variant `<v>` in (`v11`, `orig`, `v11_tied`):

  * `<v>_src_ids` int32 [2, P], `<v>_src_mask` int32 [2, P], `<v>_src_len` int32 [2]: two right-padded sources (pad 0)
    of 30 and 17 tokens, longer than `relative_attention_max_distance` = 20, so the far (log-spaced and last) buckets
    are used;
  * `<v>_dec_in` int32 [2, T]: decoder inputs, the start token 0 then random tokens;
  * `<v>_logits` float32 [2, T, V]: `model(input_ids, attention_mask, decoder_input_ids).logits` (teacher forcing,
    the padded batch of both sources);
  * `<v>_greedy` int32 [2, N]: per source, run alone (batch 1, no padding), the N new tokens of pure-argmax
    `generate` (num_beams=1, do_sample=False, no eos stop, no min_length), start token excluded;
  * `<v>_greedy_margin` float32 [2, N]: each step's top-1 minus top-2 logit, to tell a near tie from a bug;
  * `meta_*` strings: library versions and the generation settings.

Weights are random (see `_make`), drawn from the first seed that gives varied greedy outputs with clear margins and
little f32 rounding noise (see MAX_WEIGHT_SEEDS below); the chosen seeds are in `meta_generation_json`. The
reference numbers come from the model as transformers reloads it from the saved folder, so the folder and the
numbers agree by construction. Everything runs on CPU in one thread with deterministic algorithms and fixed seeds,
so a rerun writes byte-identical files.

Two transformers 5.23 behaviours matter here: its `T5Config` always sets `tie_word_embeddings=True` and keeps the
caller's value only as `scale_decoder_outputs` (so an untied head exists only as a separate `lm_head.weight` in the
checkpoint), and `generate()` sizes its default decoder cache by `num_layers` (the encoder's depth), which fails
when `num_decoder_layers` is larger; the script passes its own growing cache.
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

SEED = 0  # the sources and decoder inputs
SRC_LENGTHS = (30, 17)
DEC_LEN = 10
NUM_NEW_TOKENS = 25
# Random tiny T5s often decode greedily into one repeated token (a tied head especially: the residual stream holds
# the input token's own embedding). The weight seed of each variant is the first in range(MAX_WEIGHT_SEEDS) whose
# greedy outputs have at least MIN_DISTINCT distinct tokens per row and a top-1 minus top-2 margin of at least
# MIN_MARGIN at every step, so the decode test is not a near tie and exercises more than one fixed point, and whose
# f32 teacher-forced logits are within MAX_F32_NOISE of the same model's in f64: f32 rounding (on either side) then
# stays well inside the test's 1e-4 tolerance (some random draws amplify it to 5e-5 or more).
MAX_WEIGHT_SEEDS = 256
MIN_DISTINCT = 6
MIN_MARGIN = 0.02
MAX_F32_NOISE = 2e-5

BASE = dict(vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2, num_decoder_layers=3,
            relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
# name -> (config overrides, give the model its own lm_head, final decoder norm scale). The norm scale puts the
# logits' spread at a few units whichever head and scaling the variant has.
VARIANTS = {
    "v11": (dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False), True, 3.0),
    "orig": (dict(feed_forward_proj="relu", tie_word_embeddings=True), False, 3.0),
    "v11_tied": (dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False), False, 0.5),
}


def _make(name: str, weight_seed: int) -> transformers.T5ForConditionalGeneration:
  """A random model of the variant. Weights: unit-variance activations, norm scales away from 1, relative biases with
  std 2 (so the buckets move the attention), sublayer outputs 6x larger than the token embedding (fewer
  repeat-the-input fixed points), and the variant's final decoder norm scale."""
  overrides, own_head, final_norm = VARIANTS[name]
  config = transformers.T5Config(**BASE, **overrides)
  model = transformers.T5ForConditionalGeneration(config)
  if own_head:  # a real untied head, as T5 v1.1 / Flan-T5 checkpoints have
    model.lm_head.weight = torch.nn.Parameter(torch.empty(config.vocab_size, config.d_model))
  gen = torch.Generator().manual_seed(weight_seed)
  with torch.no_grad():
    for pname, p in model.named_parameters():  # a tied head shows up once, as `shared.weight`
      if pname == "decoder.final_layer_norm.weight":
        new = final_norm * (1.0 + 0.1 * torch.randn(p.shape, generator=gen))
      elif pname.endswith("layer_norm.weight"):
        new = 1.0 + 0.3 * torch.randn(p.shape, generator=gen)
      elif pname.endswith("relative_attention_bias.weight"):
        new = 2.0 * torch.randn(p.shape, generator=gen)
      elif pname == "shared.weight":
        new = torch.randn(p.shape, generator=gen)
      else:  # Linear [out, in]; lm_head included
        new = torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5
        if pname.endswith((".o.weight", ".wo.weight")):
          new = 6.0 * new
      p.copy_(new)
  model.eval()
  return model


def _inputs(vocab: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
  """Right-padded sources [2, P] (pad 0), their mask, and decoder inputs [2, T] (start token 0, then random ids).
  The ids avoid 0 (pad) and 1 (eos) only to keep them plain; the mask, not the ids, marks the padding."""
  p = max(SRC_LENGTHS)
  src = torch.zeros((len(SRC_LENGTHS), p), dtype=torch.long)
  mask = torch.zeros_like(src)
  for i, n in enumerate(SRC_LENGTHS):
    src[i, :n] = torch.randint(2, vocab, (n,), generator=gen)
    mask[i, :n] = 1
  dec_in = torch.randint(2, vocab, (len(SRC_LENGTHS), DEC_LEN), generator=gen)
  dec_in[:, 0] = BASE["decoder_start_token_id"]
  return src, mask, dec_in


def _greedy(model, src: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
  """Per source row, run alone (batch 1, no padding): the new tokens of pure-argmax `generate` and each step's
  top-1 minus top-2 logit margin."""
  # Pure argmax for every step: no eos stop (None here and in the model's own generation config, which generate()
  # would otherwise fill in) and no min_length / min_new_tokens (their processor masks eos).
  model.generation_config.eos_token_id = None
  gen_config = transformers.GenerationConfig(
      do_sample=False, num_beams=1, max_new_tokens=NUM_NEW_TOKENS, min_length=0, eos_token_id=None, pad_token_id=0,
      decoder_start_token_id=model.config.decoder_start_token_id, temperature=None, top_p=None, top_k=None,
      repetition_penalty=None, no_repeat_ngram_size=None, use_cache=True, output_scores=True,
      return_dict_in_generate=True)
  greedy, margins = [], []
  for i, n in enumerate(SRC_LENGTHS):
    ids = src[i:i + 1, :n]
    # transformers 5.23's generate() sizes its default cache from num_layers (the encoder's depth) and fails with an
    # IndexError when the decoder is deeper; a cache without a config grows to the decoder's depth by itself.
    cache = transformers.EncoderDecoderCache(transformers.DynamicCache(), transformers.DynamicCache())
    with torch.no_grad():
      out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen_config,
                           past_key_values=cache)
    seq = out.sequences[0]
    assert int(seq[0]) == model.config.decoder_start_token_id
    new = seq[1:]
    assert len(new) == NUM_NEW_TOKENS, len(new)
    scores = torch.stack(out.scores, dim=0)[:, 0].float()  # [steps, vocab], raw logits: no processor is active
    assert torch.equal(scores.argmax(-1), new)
    # The cached decode must agree with one uncached teacher-forced pass over start + continuation.
    with torch.no_grad():
      check = model(input_ids=ids, decoder_input_ids=seq[None, :-1], use_cache=False).logits[0]
    torch.testing.assert_close(check, scores, atol=1e-4, rtol=0)
    top2 = scores.topk(2, dim=-1).values
    greedy.append(new.numpy().astype(np.int32))
    margins.append((top2[:, 0] - top2[:, 1]).numpy().astype(np.float32))
  return np.stack(greedy), np.stack(margins)


def _teacher_forced(model, src: torch.Tensor, mask: torch.Tensor, dec_in: torch.Tensor) -> torch.Tensor:
  with torch.no_grad():
    return model(input_ids=src, attention_mask=mask, decoder_input_ids=dec_in,
                 decoder_attention_mask=torch.ones_like(dec_in), use_cache=False).logits


def _f32_noise(model, src: torch.Tensor, mask: torch.Tensor, dec_in: torch.Tensor) -> float:
  """Largest |f32 - f64| of the teacher-forced logits of the same weights."""
  f64 = copy.deepcopy(model).double()
  diff = _teacher_forced(model, src, mask, dec_in).double() - _teacher_forced(f64, src, mask, dec_in)
  return float(diff.abs().max())


def _save(model, folder: str) -> None:
  os.makedirs(folder, exist_ok=True)
  for f in os.listdir(folder):  # only what this run writes
    os.remove(os.path.join(folder, f))
  model.save_pretrained(folder, safe_serialization=True)
  for f in os.listdir(folder):  # keep config.json + model.safetensors (no generation_config.json)
    if f not in ("config.json", "model.safetensors"):
      os.remove(os.path.join(folder, f))


def _variant(name: str, index: int, out_dir: str) -> tuple[dict, int]:
  """Picks the weight seed, saves the folder, and computes the references from the model transformers reloads."""
  src, mask, dec_in = _inputs(BASE["vocab_size"], torch.Generator().manual_seed(SEED + index))
  for weight_seed in range(MAX_WEIGHT_SEEDS):
    model = _make(name, weight_seed)
    greedy, margins = _greedy(model, src)
    if (min(len(set(row.tolist())) for row in greedy) >= MIN_DISTINCT and margins.min() >= MIN_MARGIN
        and _f32_noise(model, src, mask, dec_in) <= MAX_F32_NOISE):
      break
  else:
    raise SystemExit(f"{name}: no weight seed below {MAX_WEIGHT_SEEDS} gives varied, clear greedy outputs")
  folder = os.path.join(out_dir, f"t5_tiny_{name}")
  _save(model, folder)

  model = transformers.T5ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                                  attn_implementation="eager")
  model.eval()
  tied = model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()
  assert tied != VARIANTS[name][1], (name, tied)
  logits = _teacher_forced(model, src, mask, dec_in).float().numpy()
  greedy_reloaded, margins = _greedy(model, src)
  assert np.array_equal(greedy_reloaded, greedy), name
  return {
      f"{name}_src_ids": src.numpy().astype(np.int32),
      f"{name}_src_mask": mask.numpy().astype(np.int32),
      f"{name}_src_len": np.asarray(SRC_LENGTHS, np.int32),
      f"{name}_dec_in": dec_in.numpy().astype(np.int32),
      f"{name}_logits": logits.astype(np.float32),
      f"{name}_greedy": greedy,
      f"{name}_greedy_margin": margins,
  }, weight_seed


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR)
  args = parser.parse_args()

  transformers.utils.logging.disable_progress_bar()
  transformers.utils.logging.set_verbosity_error()
  torch.set_num_threads(1)
  torch.use_deterministic_algorithms(True)
  torch.manual_seed(SEED)

  fixture, weight_seeds = {}, {}
  for index, name in enumerate(VARIANTS):
    refs, weight_seeds[name] = _variant(name, index, args.out_dir)
    fixture.update(refs)
    folder = os.path.join(args.out_dir, f"t5_tiny_{name}")
    with open(os.path.join(folder, "config.json")) as f:
      raw = json.load(f)
    m = fixture[f"{name}_greedy_margin"]
    print(f"{name}: weight seed {weight_seeds[name]}; {folder} "
          f"({sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))} bytes); "
          f"tie_word_embeddings={raw.get('tie_word_embeddings')} scale_decoder_outputs="
          f"{raw.get('scale_decoder_outputs')} lm_head.weight saved={VARIANTS[name][1]}; "
          f"|logits| max {np.abs(fixture[f'{name}_logits']).max():.2f}; smallest greedy margin {m.min():.4f}; "
          f"greedy {fixture[f'{name}_greedy'].tolist()}")

  generation = {
      "api": "model.generate(input_ids[1, n], attention_mask=ones, generation_config=cfg, past_key_values="
             "EncoderDecoderCache(DynamicCache(), DynamicCache())), one source at a time",
      "do_sample": False, "num_beams": 1, "max_new_tokens": NUM_NEW_TOKENS, "min_length": 0, "eos_token_id": None,
      "model.generation_config.eos_token_id": None, "pad_token_id": 0, "decoder_start_token_id": 0,
      "use_cache": True, "dtype": "float32", "attn_implementation": "eager", "torch_threads": 1,
      "weight_seeds": weight_seeds,
  }
  fixture.update({
      "meta_transformers_version": np.array(transformers.__version__),
      "meta_torch_version": np.array(torch.__version__),
      "meta_numpy_version": np.array(np.__version__),
      "meta_generation_json": np.array(json.dumps(generation, sort_keys=True)),
  })
  out = os.path.join(args.out_dir, "t5_tiny_reference.npz")
  np.savez_compressed(out, **fixture)
  print(f"wrote {out} ({os.path.getsize(out)} bytes)")


if __name__ == "__main__":
  main()
