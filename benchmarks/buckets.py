"""Cache buckets: what bounding attention by the filled length saves on long generations.

The decode loop's cache holds every slot a request may need (prompt + max_new_tokens + the draft), and attention
over the whole buffer costs more as it grows (on this CPU a one-token step against 128 filled slots takes 21 ms in a
256-slot cache and 38 ms in an 8192-slot one). With cache buckets the loop picks, every step, the smallest bucket
(512, 1024, ... slots, then the whole buffer) that holds the committed context, and attention reads only that much;
prefill skips the empty cache altogether. The output is the same token for token; each bucket adds one compiled
forward to the program.

    python benchmarks/buckets.py [--new-tokens 1024,3072] [--methods greedy,bpd:k=4:gate=0.8]

Every method runs with buckets and without, one after the other, on one prompt with EOS ignored so that every run
generates exactly the number of tokens asked for. Compilation is timed apart from the run (ahead of time).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from script_args import int_list, method_list, run

PROMPT = "Write a long story about a lighthouse keeper who finds a map in a bottle, chapter by chapter."


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--methods", type=method_list, default="greedy,bpd:k=4:gate=0.8",
                  help="comma-separated methods as in `jaxspec bench --list-methods`")
  ap.add_argument("--new-tokens", type=int_list(1), default="1024,3072", help="comma-separated generation lengths")
  args = ap.parse_args(argv)

  from jaxspec.bench.methods import METHODS, BenchContext, parse_method
  from jaxspec.bench.runner import chat_prompt_ids
  from jaxspec.decoding.generate import BUCKET_SMALLEST
  from jaxspec.decoding.loop import cache_buckets
  from jaxspec.loading import load_model

  @dataclasses.dataclass
  class NoEos(BenchContext):  # every run generates all the tokens asked for
    @property
    def eos_ids(self) -> list[int]:
      return []

  model, params, tok = load_model(None)
  prompt = chat_prompt_ids(tok, [PROMPT])[0]
  print(f"load average {os.getloadavg()[0]:.2f}; prompt {len(prompt)} tokens")
  print(f"{'method':24s} {'new':>5s} {'buckets':>8s} {'compile s':>9s} {'tok/s':>7s} {'speedup':>8s} same")
  for n in args.new_tokens:
    for label in args.methods:
      _, name, opts = parse_method(label)
      out = {}
      for on in (False, True):
        run = METHODS[name].build(NoEos(model, params, tok, buckets=on), opts)
        out[on] = run([prompt], n, 0)
      base = out[False]
      for on, r in out.items():
        toks = sum(len(t) for t in r.tokens)
        speed = f"{base.run_s / r.run_s:.2f}x" if on else ""
        same = ("yes" if r.tokens == base.tokens else "NO") if on else ""
        print(f"{label:24s} {n:5d} {'on' if on else 'off':>8s} {r.compile_s:9.1f} {toks / r.run_s:7.1f} "
              f"{speed:>8s} {same}", flush=True)
  example = cache_buckets(4096 + 128, BUCKET_SMALLEST)
  print(f"buckets start at {BUCKET_SMALLEST} slots and double up to the cache, e.g. {example}")
  return 0


if __name__ == "__main__":
  sys.exit(run(main, __file__))
