"""Baseline: Hugging Face transformers greedy decoding speed on the default GGUF weights, on CPU.

Run it with a Python that has torch and transformers (they are not jaxspec dependencies; tests/fixtures/README.md
shows how the developers make such a venv, e.g. /work/hfenv):

  python benchmarks/hf_greedy.py [--model PATH] [--new-tokens 128] [--batches 1 8]
                                 [--dtypes float32 bfloat16] [--threads N]

Prints two tables:
  1. greedy tokens/s of `model.generate` (do_sample=False, eos ignored so every run makes exactly --new-tokens),
     per dtype and batch size, after a warm-up run; the fastest of --gen-repeats runs. Time covers the whole call
     (prefill of the 38-token chat prompt included); tokens/s counts new tokens of all sequences.
  2. the verify-cost curve: the time of one forward of k new tokens on a KV cache already holding `context` tokens,
     as t(k)/t(1). Speculative methods verify k drafted tokens in one forward; this ratio says how close to free
     that is on this hardware.

Minimums, not medians: on a small shared machine other processes only ever add time. The load average is printed
first; numbers taken while it is high are not worth keeping.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

try:  # not jaxspec dependencies: a venv of their own (tests/fixtures/README.md)
  import torch
  import transformers
except ImportError as e:
  torch = transformers = None
  MISSING = e

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))

DTYPES = ("bfloat16", "float32")  # torch dtypes of these names


def _load(path: str, dtype):
  folder, name = os.path.split(path)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
  model.eval()
  model.generation_config.eos_token_id = None  # else generate() refills eos from here and may stop early
  return model


def _generate_time(model, input_ids, new_tokens: int) -> float:
  config = transformers.GenerationConfig(
      do_sample=False, num_beams=1, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0,
      temperature=None, top_p=None, top_k=None, use_cache=True)
  start = time.perf_counter()
  with torch.no_grad():
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
  elapsed = time.perf_counter() - start
  assert out.shape[1] == input_ids.shape[1] + new_tokens, out.shape
  return elapsed


def _verify_curve(model, vocab: int, contexts, ks, repeats: int) -> dict[tuple[int, int], float]:
  """Fastest seconds of one forward of k tokens on a cache filled to each context."""
  generator = torch.Generator().manual_seed(0)
  times = {}
  for context in contexts:
    prefix = torch.randint(3, vocab, (1, context), generator=generator)
    with torch.no_grad():
      cache = model(input_ids=prefix, use_cache=True).past_key_values
    blocks = {k: torch.randint(3, vocab, (1, k), generator=generator) for k in ks}
    samples = {k: [] for k in ks}
    # Round-robin over k, so a burst of load elsewhere slows one sample of every k rather than all samples of one.
    for r in range(repeats + 1):
      for k in ks:
        start = time.perf_counter()
        with torch.no_grad():
          model(input_ids=blocks[k], past_key_values=cache, use_cache=True)
        elapsed = time.perf_counter() - start
        cache.crop(-k)  # drop the k verified tokens so every run sees the same cache
        assert cache.get_seq_length() == context, cache.get_seq_length()
        if r:  # the first round is a warm-up
          samples[k].append(elapsed)
    for k in ks:
      times[(context, k)] = min(samples[k])
  return times


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=DTYPES)
  parser.add_argument("--curve-dtypes", nargs="+", default=["float32"], choices=DTYPES)
  parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024])
  parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
  parser.add_argument("--repeats", type=int, default=7, help="timed forwards per (context, k)")
  parser.add_argument("--gen-repeats", type=int, default=3, help="timed generate calls per (dtype, batch)")
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  args = parser.parse_args(argv)
  if torch is None:
    parser.exit(2, f"{parser.prog}: error: this baseline needs torch and transformers, which jaxspec does not install "
                   f"({MISSING}): run it with the Python of a venv that has them (tests/fixtures/README.md).\n")
  from hf_reference import CHAT_MESSAGES, _default_gguf  # the same model and prompt as the fixture

  path = os.path.abspath(args.model or _default_gguf())

  transformers.utils.logging.disable_progress_bar()  # the GGUF dequantization bar would bury the output
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  folder, name = os.path.split(path)
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  prompt = tokenizer.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
  prompt_ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])

  print(f"model {name}; transformers {transformers.__version__}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads on {os.cpu_count()} cores; prompt {prompt_ids.shape[1]} tokens, "
        f"{args.new_tokens} new tokens, greedy, eos ignored; load average {os.getloadavg()[0]:.2f} at start")
  rows = []
  curves = {}
  for dtype_name in dict.fromkeys(args.dtypes + args.curve_dtypes):
    model = _load(path, getattr(torch, dtype_name))
    if dtype_name in args.dtypes:
      _generate_time(model, prompt_ids, 8)  # warm-up: first-call allocations and kernel selection
      for batch in args.batches:
        input_ids = prompt_ids.repeat(batch, 1)
        _generate_time(model, input_ids, 4)
        seconds = min(_generate_time(model, input_ids, args.new_tokens) for _ in range(args.gen_repeats))
        rows.append((dtype_name, batch, seconds, batch * args.new_tokens / seconds, args.new_tokens / seconds))
    if dtype_name in args.curve_dtypes:
      curves[dtype_name] = _verify_curve(model, model.config.vocab_size, args.contexts, args.ks, args.repeats)
    del model

  print()
  print(f"{'dtype':<9} {'batch':>5} {'seconds':>8} {'tok/s (all)':>12} {'tok/s (per seq)':>16}")
  for dtype_name, batch, seconds, total, per_seq in rows:
    print(f"{dtype_name:<9} {batch:>5} {seconds:>8.2f} {total:>12.1f} {per_seq:>16.1f}")

  for dtype_name, times in curves.items():
    print()
    print(f"verify cost, {dtype_name}, batch 1: one forward of k new tokens on a filled KV cache, "
          f"fastest of {args.repeats}; t(k)/t(1), with t(1) in ms")
    header = f"{'context':>7} {'t(1) ms':>8} " + " ".join(f"{'k=' + str(k):>6}" for k in args.ks)
    print(header)
    for context in args.contexts:
      t1 = times[(context, min(args.ks))]  # k=1 unless --ks leaves it out
      ratios = " ".join(f"{times[(context, k)] / t1:>6.2f}" for k in args.ks)
      print(f"{context:>7} {t1 * 1e3:>8.2f} {ratios}")
  print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
  main()
