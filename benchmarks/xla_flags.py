"""One line of figures for the XLA flags this process was started with: verify cost t(n) of the default model at
context 128 (n = 1, 2, 4, 16) and greedy tokens/s at batch 1 (64 tokens, best of 3). Compare flag sets by running it
once per set, on an idle machine:

  for f in "" --xla_cpu_use_xnnpack=true --xla_cpu_use_onednn=true; do
    XLA_FLAGS="$f" python benchmarks/xla_flags.py
  done
"""

from __future__ import annotations

import argparse
import json
import os


def main(argv=None) -> None:
  argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)

  from jaxspec.bench.cost import forward_cost
  from jaxspec.decoding.generate import generate
  from jaxspec.loading import load_model

  model, params, tok = load_model(None)
  cost = forward_cost(model, params, [1, 2, 4, 16], context=128, repeats=7)
  prompt = tok.encode("Write a short story about a lighthouse keeper who finds a message in a bottle.")
  generate(model, params, [prompt], max_new_tokens=64)  # compile
  runs = [generate(model, params, [prompt], max_new_tokens=64) for _ in range(3)]
  print(json.dumps({"flags": os.environ.get("XLA_FLAGS", ""),
                    "ms": {n: round(v * 1e3, 1) for n, v in cost.items()},
                    "r16": round(cost[16] / cost[1], 2), "r2": round(cost[2] / cost[1], 2),
                    "tok_s": round(max(len(r.tokens[0]) / r.run_s for r in runs), 1)}))


if __name__ == "__main__":
  main()
