"""Choose the BPD gate (`bpd:gate=G`) on prompts written for this script, apart from Spec-Bench.

A gated BPD step verifies the heads' draft only when their expected accepted length, sum_i prod_{j<=i} p_j over the
heads' top probabilities, is at least G; otherwise it runs a one-token forward, which costs less than a forward over
the whole block on hardware where t(k+1) > t(1). The output is greedy decoding's either way; only speed changes.

    python benchmarks/bpd_gate.py [--methods greedy,bpd:k=4,bpd:k=4:gate=1.2] [--new-tokens 64]

Methods run interleaved prompt by prompt after a warm-up per prompt, and speedup is greedy's time over the method's.
"""

from __future__ import annotations

import argparse
import collections

# Prompts written for this script: none from Spec-Bench, none from training/data/prompts.jsonl.
PROMPTS = [
    "Explain how the gears of a bicycle make climbing hills easier.",
    "Write a short poem about a train crossing a snowy valley.",
    "What are three tips for keeping a small vegetable garden healthy?",
    "Write a Python function that returns the longest word in a sentence.",
    "Summarize the main causes of the French Revolution in a paragraph.",
    "If a recipe for 4 people needs 300 g of rice, how much rice do 10 people need? Explain.",
    "Describe a busy morning at a fish market from the point of view of a seagull.",
    "Translate into French: The library opens at nine and closes at six.",
]


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--methods", default="greedy,bpd:k=4,bpd:k=4:gate=0.8,bpd:k=4:gate=1.2,bpd:k=4:gate=1.6")
  ap.add_argument("--new-tokens", type=int, default=64)
  args = ap.parse_args()

  from jaxspec.bench.methods import METHODS, BenchContext, parse_method
  from jaxspec.loading import load_model

  model, params, tok = load_model(None)
  ctx = BenchContext(model, params, tok)
  labels = args.methods.split(",")
  runs = {}
  for label in labels:
    _, name, opts = parse_method(label)
    runs[label] = METHODS[name].build(ctx, opts)
  prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in PROMPTS]
  secs, toks, calls = collections.Counter(), collections.Counter(), collections.Counter()
  for p in prompts:
    for run in runs.values():  # compile for this prompt's length bucket
      run([p], args.new_tokens, 0)
    for label, run in runs.items():
      r = run([p], args.new_tokens, 0)
      secs[label] += r.run_s
      toks[label] += sum(len(t) for t in r.tokens)
      calls[label] += r.target_calls
  base = labels[0]
  for label in labels:
    tau = (toks[label] - len(prompts)) / max(calls[label], 1)  # the first token of each row comes from prefill
    print(f"{label:28s} speedup over {base} {secs[base] / secs[label]:.2f}x  tau {tau:.2f}  "
          f"tok/s {toks[label] / secs[label]:.1f}")


if __name__ == "__main__":
  main()
