"""One process of a multi-process bench on this machine's CPU, for tests/test_multihost.py.

`python tests/bench_multihost.py PROMPTS OUT METHODS [DELAY]`, run in a working folder of its own (relative `heads=`
paths in METHODS are read there, so one host can lack files the others have), with `JAX_COORDINATOR_ADDRESS`,
`JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` set and two CPU devices per process (`XLA_FLAGS`). It runs the bench of
the tiny target on a mesh of all processes' devices (`MESH`, default `data=2,model=2`) into OUT; each method run
first sleeps DELAY seconds (a slower machine, so that a test can signal a run midway). It prints `RESULT {...}` with
what it saw.
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
import numpy as np  # noqa: E402

from jaxspec.bench import runner as bench_runner  # noqa: E402
from jaxspec.models.bpd import BPDConfig, BPDModel, save_bpd  # noqa: E402
from tests.conftest import make_tiny  # noqa: E402
from tests.test_bpd import ByteTokenizer  # noqa: E402


def main(prompts: str, out: str, methods: str, delay: float) -> None:
  model, params = make_tiny(embed_scale=3.0)
  if os.environ.get("WRITE_HEADS"):  # this host has the heads a relative heads= path names, the others do not
    # Over a vocabulary subset: their output table is gathered from the target's, which `model=4` splits over hosts.
    ids = np.arange(0, model.cfg.vocab_size, 3)
    bpd = BPDModel(BPDConfig(num_heads=3, d_model=model.cfg.d_model, d_hidden=16, vocab_subset=len(ids)))
    save_bpd(Path("heads"), bpd, bpd.init_params(jax.random.key(1), ids))
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
                               out=out, mesh=os.environ.get("MESH", "data=2,model=2")),
      model, params, ByteTokenizer(), progress=False)
  print("RESULT " + json.dumps({
      "process": jax.process_index(), "complete": results["complete"],
      "methods": {m: {k: r.get(k) for k in ("available", "reason", "mismatches", "tau", "n_prompts")}
                  for m, r in results["methods"].items()},
      "resumed_runs": results["environment"].get("resumed_runs", 0)}), flush=True)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]) if len(sys.argv) > 4 else 0.0)
