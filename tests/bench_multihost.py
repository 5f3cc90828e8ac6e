"""One process of a multi-process bench on this machine's CPU, for tests/test_multihost.py.

`python tests/bench_multihost.py PROMPTS OUT METHODS [DELAY]`, run in a working folder of its own (relative `heads=`
paths in METHODS are read there, so one host can lack files the others have), with `JAX_COORDINATOR_ADDRESS`,
`JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` set and two CPU devices per process (`XLA_FLAGS`). It runs the bench of
the tiny target on a `data=2,model=2` mesh of all processes' devices into OUT; each method run first sleeps DELAY
seconds (a slower machine, so that a test can signal a run midway). It prints `RESULT {...}` with what it saw.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxspec import sharding  # noqa: E402

if os.environ.get("JAX_NUM_PROCESSES"):
  sharding.initialize_distributed()  # before any device is touched

import jax  # noqa: E402

from jaxspec.bench import runner as bench_runner  # noqa: E402
from jaxspec.models.bpd import save_bpd  # noqa: E402
from tests.conftest import make_tiny  # noqa: E402
from tests.test_bpd import ByteTokenizer, random_heads  # noqa: E402


def main(prompts: str, out: str, methods: str, delay: float) -> None:
  model, params = make_tiny(embed_scale=3.0)
  if os.environ.get("WRITE_HEADS"):  # this host has the heads a relative heads= path names, the others do not
    save_bpd(Path("heads"), *random_heads((model, params), 3))
  build = bench_runner.build

  def slow_build(ctx, name, opts):
    run = build(ctx, name, opts)

    def slow(*args):
      time.sleep(delay)
      return run(*args)

    slow.__dict__.update(run.__dict__)  # lossless, note
    return slow

  bench_runner.build = slow_build
  results = bench_runner.run_bench(
      bench_runner.BenchConfig(prompts=prompts, methods=tuple(methods.split(",")), max_new_tokens=12, batch_size=2,
                               out=out, mesh="data=2,model=2"),
      model, params, ByteTokenizer(), progress=False)
  print("RESULT " + json.dumps({
      "process": jax.process_index(), "complete": results["complete"],
      "methods": {m: {k: r.get(k) for k in ("available", "reason", "mismatches", "tau", "n_prompts")}
                  for m, r in results["methods"].items()},
      "resumed_runs": results["environment"].get("resumed_runs", 0)}), flush=True)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]) if len(sys.argv) > 4 else 0.0)
