"""What this CPU's matrix products can do, for the verify-cost roofline of the default model.

    python benchmarks/dots.py [--repeats 20]

Times, as XLA:CPU compiles them here, the products one SmolLM2-135M forward is made of: a row of T new tokens
(T = 1 and 16) against a layer's projections (576 → 1536, 1536 → 576) and against the 49,152-row output table, in
float32 and bfloat16 (bf16 × bf16 with f32 accumulation), and a large square product that shows the machine's peak.
It prints milliseconds, GFLOP/s and the weight bytes streamed per second (what bounds T = 1), then the roofline floor
of t(16)/t(1) for f32: t(1) cannot beat the weights' bytes over the best streaming rate, nor t(16) the FLOPs over the
best f32 rate (benchmarks/README.md, "Why t(16)/t(1) ≤ 1.6 is out of reach on this CPU").

Best of the repeats: on a shared machine other processes only ever add time.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp

D, F, V = 576, 1536, 49152  # SmolLM2-135M: width, MLP width, vocabulary
WEIGHTS_MB = 538  # its f32 weights, the tied table counted once


def best_ms(fn, *args, repeats: int) -> float:
  fn = jax.jit(fn)
  fn(*args).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn(*args).block_until_ready()
    times.append(time.perf_counter() - t0)
  return min(times) * 1e3


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--repeats", type=int, default=20)
  args = ap.parse_args()
  print(f"{cpu_name()}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
        f"load average {os.getloadavg()[0]:.2f}")
  shapes = [(1, D, F), (16, D, F), (1, F, D), (16, F, D), (1, D, V), (16, D, V), (2048, 2048, 2048)]
  best = {}
  print(f"{'M x K x N':>18} {'dtype':>8} {'ms':>8} {'GFLOP/s':>8} {'weights GB/s':>12}")
  for dtype in (jnp.float32, jnp.bfloat16):
    for m, k, n in shapes:
      x = jnp.ones((m, k), dtype)
      w = jnp.full((k, n), 0.01, dtype)
      ms = best_ms(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32), x, w, repeats=args.repeats)
      gflops = 2 * m * k * n / ms / 1e6
      gbs = k * n * jnp.dtype(dtype).itemsize / ms / 1e6
      name = jnp.dtype(dtype).name
      best[name, "flops"] = max(best.get((name, "flops"), 0.0), gflops)
      if m == 1:
        best[name, "bw"] = max(best.get((name, "bw"), 0.0), gbs)
      print(f"{f'{m} x {k} x {n}':>18} {name:>8} {ms:8.3f} {gflops:8.1f} {gbs:12.1f}")
  flops_16 = 2 * 16 * (WEIGHTS_MB * 1e6 / 4) / 1e9  # GFLOP of 16 tokens through every weight
  t1, t16 = WEIGHTS_MB / best["float32", "bw"], flops_16 / best["float32", "flops"] * 1e3
  print(f"f32 floor: t(1) >= {t1:.1f} ms ({WEIGHTS_MB} MB at {best['float32', 'bw']:.0f} GB/s), t(16) >= {t16:.1f} ms "
        f"({flops_16:.1f} GFLOP at {best['float32', 'flops']:.0f} GFLOP/s): t(16)/t(1) >= {max(t16 / t1, 1.0):.2f}")


if __name__ == "__main__":
  main()
