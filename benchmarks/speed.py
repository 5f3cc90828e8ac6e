"""Speed of the foundation on the default model: greedy and sampled tokens/s, compile time, peak RSS, verify-cost
curve.

Peak RSS is reported twice: for the main job alone (`jaxspec generate` at batch 1, in a process of its own) and for
this whole script, which also holds the batch-8 programs and the long-context verify probes.

    python benchmarks/speed.py [--model PATH] [--new-tokens 128] [--repeats 3] [--dtype float32]
                               [--param-dtype bfloat16] [--scan-layers]

`--dtype`, `--param-dtype` and `--scan-layers` are the options of `jaxspec generate`: run the script once per
setting to see what each costs on a machine.

Figures are the best of the repeats, not medians: on a small shared machine other processes only ever add time.
The verify-cost curve is t(k)/t(1): the time of one target forward over k new tokens against a cache already
filled to the given context, relative to one token. It is what a draft of k tokens costs to check. It is measured
twice: each forward called on its own, and forwards run 8 at a time inside a loop, as decoding runs them (one
token measured about 1 ms less in a loop here, likely the host's dispatch per call).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import jax
import psutil

from script_args import int_list, positive_int, run


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cli_job_peak_rss_mb(model, new_tokens: int, extra: list[str]) -> tuple[float, str]:
  """Peak RSS of the main job as a user runs it, in a process of its own: `jaxspec generate` (load, compile, decode
  `new_tokens` at batch 1, print). Returns `(MiB, the CLI's tokens/s line)`."""
  cmd = [sys.executable, "-c", "import sys; from jaxspec.cli import main; sys.exit(main())", "generate", "--prompt",
         "Write a story about a lighthouse.", "--chat", "--max-new-tokens", str(new_tokens), *extra]
  if model:
    cmd += ["--model", model]
  before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  out = subprocess.run(cmd, capture_output=True, text=True)
  if out.returncode:  # its own one-line message (a model path that is none, say), not a CalledProcessError
    from jaxspec.errors import InputError
    said = [line for line in out.stderr.splitlines() if line.strip()]
    raise InputError(f"the generate job (`jaxspec generate`, own process) failed with exit code {out.returncode}: "
                     + (said[-1] if said else "it printed nothing"))
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  if peak <= before:
    raise RuntimeError("the generate job's peak RSS is hidden by an earlier, larger child process")
  last = [line for line in (out.stdout + out.stderr).splitlines() if "tok/s" in line]
  return peak / 1024, (last[-1] if last else "")


def main(argv=None) -> int:
  from jaxspec import xla_defaults
  from jaxspec.loading import DTYPES

  xla_defaults.apply_cpu_defaults()  # as `jaxspec generate` runs: before JAX's CPU backend starts

  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default=None)
  ap.add_argument("--new-tokens", type=positive_int, default=128)
  ap.add_argument("--repeats", type=positive_int, default=3)
  ap.add_argument("--ks", type=int_list(1), default="1,2,4,8,16,32",
                  help="new tokens k of the verify-cost curve, comma-separated (1 is always measured)")
  ap.add_argument("--contexts", type=int_list(1), default="128,1024",
                  help="filled cache lengths of the verify-cost curve, comma-separated")
  ap.add_argument("--json", default=None, help="also write the figures here")
  ap.add_argument("--dtype", default="float32", choices=DTYPES, help="activations and weights (default float32)")
  ap.add_argument("--scan-layers", action="store_true", help="stack the layers under lax.scan")
  ap.add_argument("--param-dtype", default=None, choices=DTYPES, help="the weights' dtype when it differs from --dtype")
  ap.add_argument("--matmul-precision", default="highest", choices=("highest", "high", "default"),
                  help="float32 products on GPU and TPU (as `jaxspec generate --matmul-precision`)")
  args = ap.parse_args(argv)

  from jaxspec.bench.cost import forward_cost
  from jaxspec.decoding.generate import generate
  from jaxspec.loading import load_model

  # First, before this process grows: the whole generate job in a child process.
  dtype = args.dtype
  job_rss, job_line = cli_job_peak_rss_mb(args.model, args.new_tokens,
                                          ["--dtype", dtype] + (["--scan-layers"] if args.scan_layers else [])
                                          + (["--param-dtype", args.param_dtype] if args.param_dtype else [])
                                          + ["--matmul-precision", args.matmul_precision])
  print(f"jaxspec generate (batch 1, {args.new_tokens} new tokens, own process): peak RSS {job_rss:.0f} MiB  "
        f"{job_line}")

  base_rss = psutil.Process().memory_info().rss / 2**20
  t0 = time.perf_counter()
  model, params, tok = load_model(args.model, dtype=dtype, scan_layers=args.scan_layers,
                                  param_dtype=args.param_dtype, matmul_precision=args.matmul_precision)
  load_s = time.perf_counter() - t0
  load_peak = peak_rss_mb()
  weights_mb = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)) / 2**20
  print(f"devices: {jax.devices()}  jax {jax.__version__}  {platform.processor() or platform.machine()}  "
        f"load average {os.getloadavg()[0]:.2f}  XLA_FLAGS {os.environ.get('XLA_FLAGS', '')!r}")
  layout = " (stacked layers)" if args.scan_layers else ""
  print(f"load: {load_s:.1f} s, {args.param_dtype or dtype} weights{layout} {weights_mb:.0f} MiB, "
        f"peak RSS {load_peak:.0f} MiB "
        f"(+{load_peak - base_rss:.0f} MiB over the {base_rss:.0f} MiB before loading)")

  prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Write a story about a lighthouse."}]))
  results = {"dtype": dtype, "param_dtype": args.param_dtype or dtype, "scan_layers": args.scan_layers,
             "matmul_precision": args.matmul_precision,
             "xla_flags": os.environ.get("XLA_FLAGS", ""),
             "load_s": load_s, "load_peak_rss_mb": load_peak, "rss_before_load_mb": base_rss, "weights_mb": weights_mb,
             "generate_job_peak_rss_mb": job_rss, "greedy": {}, "sampled": {},
             "verify_cost": {}}
  # Sampling runs the same loop and forward; the difference is the cost of drawing a token from the vocabulary.
  for mode, temperature in (("greedy", 0.0), ("sampled", 1.0)):
    for b in (1, 8):
      run = lambda seed: generate(model, params, [prompt] * b, max_new_tokens=args.new_tokens,
                                  temperature=temperature, seed=seed)
      first = run(0)
      runs = [run(seed) for seed in range(1, args.repeats + 1)]
      tps = max(sum(len(t) for t in r.tokens) / r.run_s for r in runs)
      results[mode][b] = {"tokens_per_s": tps, "compile_s": first.compile_s}
      what = "greedy" if mode == "greedy" else f"sampled (temperature {temperature:g})"
      print(f"{what} batch {b}: {tps:.1f} tok/s (best of {args.repeats}, {args.new_tokens} new tokens, prompt "
            f"{len(prompt)}), compile {first.compile_s:.1f} s")

  ks = sorted({1, *args.ks})  # ratios are to t(1): it is always measured
  for ctx in args.contexts:
    med = forward_cost(model, params, ks, context=ctx, repeats=max(5, args.repeats * 3))
    results["verify_cost"][ctx] = {k: {"ms": med[k] * 1e3, "ratio": med[k] / med[1]} for k in ks}
    print(f"verify cost at context {ctx}: " +
          "  ".join(f"t({k})={med[k] * 1e3:.1f}ms [{med[k] / med[1]:.2f}x]" for k in ks))
    # The same forwards 8 at a time inside a loop, as decoding runs them.
    loop = forward_cost(model, params, ks, context=ctx, repeats=max(3, args.repeats), in_loop=8)
    results.setdefault("verify_cost_in_loop", {})[ctx] = {k: {"ms": loop[k] * 1e3, "ratio": loop[k] / loop[1]}
                                                          for k in ks}
    print(f"  in a loop at context {ctx}: " +
          "  ".join(f"t({k})={loop[k] * 1e3:.1f}ms [{loop[k] / loop[1]:.2f}x]" for k in ks))
  results["peak_rss_mb"] = peak_rss_mb()
  print(f"peak RSS over the whole run (batch 1 and 8 programs, verify probes at every context): "
        f"{results['peak_rss_mb']:.0f} MiB")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(run(main, __file__))
