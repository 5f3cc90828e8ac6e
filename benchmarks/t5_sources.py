"""Encoder-decoders: what a long source costs per generated token.

The decoder's self-attention cache holds its own tokens (the start token and the output), not the source: the source
is encoded once and read through the cross-attention cache. So a longer source costs its encoding and a longer
cross-attention per step, and nothing in the self-attention. (Before, the decoder cache was sized as if the source
were in it, and a source plus output past `max_seq_len` was refused.)

    python benchmarks/t5_sources.py [--model jaxspec/assets/t5_numbers] [--lengths 4,500,1500,3000] [--new-tokens 480]

Each source (a short prompt repeated to the length) is decoded greedily with EOS ignored, so every run generates the
number of tokens asked for; the figure is the median of 7 runs after a compiling one.
"""

from __future__ import annotations

import argparse
import sys

from script_args import int_list, positive_int, run


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default=None, help="an encoder-decoder folder (default: the shipped "
                                                "jaxspec/assets/t5_numbers, wherever the command runs from)")
  ap.add_argument("--lengths", type=int_list(1), default="4,500,1500,3000",
                  help="comma-separated source lengths in tokens")
  ap.add_argument("--new-tokens", type=positive_int, default=480)
  args = ap.parse_args(argv)

  from jaxspec.bench.methods import ASSETS
  from jaxspec.decoding.generate import generate
  from jaxspec.loading import load_model

  model, params, tok = load_model(args.model or str(ASSETS / "t5_numbers"))
  base = tok.encode("spell: 4821, 17")
  print(f"{'source tokens':>13} {'new tokens':>10} {'run ms (median of 7)':>21} {'ms per new token':>17}")
  for n in args.lengths:
    src = (base * (n // len(base) + 1))[:n]
    generate(model, params, [src], max_new_tokens=args.new_tokens)  # compiles
    res = sorted((generate(model, params, [src], max_new_tokens=args.new_tokens) for _ in range(7)),
                 key=lambda r: r.run_s)[3]  # eos_ids unset: every run generates all the tokens asked for
    new = len(res.tokens[0])
    print(f"{n:>13} {new:>10} {res.run_s * 1e3:>21.1f} {res.run_s * 1e3 / new:>17.3f}")
  return 0


if __name__ == "__main__":
  sys.exit(run(main, __file__))
