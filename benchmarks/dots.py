"""What this CPU's matrix products can do, for the verify-cost roofline of the default model.

    python benchmarks/dots.py [--repeats 20]

Times, as XLA:CPU compiles them here, the products one SmolLM2-135M forward is made of: a row of T new tokens
(T = 1 and 16) against a layer's projections (576 → 1536, 1536 → 576) and against the 49,152-row output table, in
float32 and bfloat16 (bf16 × bf16 with f32 accumulation), and a large square product that shows the machine's peak.
It prints milliseconds, GFLOP/s and the weight bytes streamed per second (what bounds T = 1), then the roofline floor
of t(16)/t(1) for f32: t(1) cannot beat the weights' bytes over the best streaming rate, nor t(16) the FLOPs over the
best f32 rate (benchmarks/README.md, "Why t(16)/t(1) ≤ 1.6 is out of reach on the AMD EPYC VM").

One product's weights (3.5 MB for a layer, 113 MB for the output table) can stay in a large last-level cache between
repeats, while a forward reads all 538 MB once per step. So it last times every product of one step chained as a
forward runs them (30 layers' q, k, v, o, gate, up and down, then the output table; random weights of the model's
shapes, in a loop of 8 steps) for T = 1, 2, 4 and 16 rows: the bandwidth a decode step really gets, and the ratio of
the products alone, which the model's t(16)/t(1) adds only attention and element-wise work to.

Best of the repeats: on a shared machine other processes only ever add time.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp

from script_args import positive_int

D, F, V = 576, 1536, 49152  # SmolLM2-135M: width, MLP width, vocabulary
LAYERS, KV = 30, 192  # its layers, and the width of its keys and values (3 kv heads of 64)
WEIGHTS_MB = 538  # its f32 weights, the tied table counted once
STEPS = 8  # whole steps per timed call


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


def last_level_cache() -> str:
  """The size of CPU 0's last-level cache as Linux reports it ("480M"), or "unknown"."""
  folder = "/sys/devices/system/cpu/cpu0/cache"
  try:
    levels = sorted((d for d in os.listdir(folder) if d.startswith("index")), key=lambda d: int(d[5:]))
    with open(os.path.join(folder, levels[-1], "size"), encoding="utf-8") as f:
      return f.read().strip()
  except (OSError, IndexError):
    return "unknown"


def whole_step_ms(rows: int, repeats: int) -> float:
  """Milliseconds of every product of one forward over `rows` tokens, chained layer by layer as the model runs them."""
  keys = iter(jax.random.split(jax.random.PRNGKey(0), 7 * LAYERS + 1))
  shapes = {"q": (D, D), "k": (D, KV), "v": (D, KV), "o": (D, D), "gate": (D, F), "up": (D, F), "down": (F, D)}
  layers = [{n: 0.02 * jax.random.normal(next(keys), s) for n, s in shapes.items()} for _ in range(LAYERS)]
  table = 0.02 * jax.random.normal(next(keys), (V, D))

  def step(x, layers, table):
    for p in layers:  # each product reads the previous one's result, so none can run ahead or be hoisted
      q, k, v = x @ p["q"], x @ p["k"], x @ p["v"]
      x = x + 0.1 * ((q + 1e-3 * jnp.concatenate([k, v, k], axis=-1)) @ p["o"])
      x = x + 0.1 * ((jax.nn.silu(x @ p["gate"]) * (x @ p["up"])) @ p["down"])
      x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    return x + jax.nn.one_hot(jnp.argmax(x @ table.T, axis=-1), D)

  loop = lambda x, layers, table: jax.lax.fori_loop(0, STEPS, lambda _, x: step(x, layers, table), x)
  return best_ms(loop, jnp.ones((rows, D)), layers, table, repeats=repeats) / STEPS


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--repeats", type=positive_int, default=20, help="timed calls of each product (best kept)")
  args = ap.parse_args(argv)
  print(f"{cpu_name()}, {os.cpu_count()} CPUs, last-level cache {last_level_cache()}, jax {jax.__version__}, "
        f"load average {os.getloadavg()[0]:.2f}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
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
  print("every product of one f32 step, chained, 538 MB of weights read once per step:")
  steps = {rows: whole_step_ms(rows, max(args.repeats // 4, 3)) for rows in (1, 2, 4, 16)}
  for rows, ms in steps.items():
    print(f"  {rows:2d} rows: {ms:6.2f} ms, weights at {WEIGHTS_MB / ms:5.1f} GB/s, {ms / steps[1]:.2f}x one row")
  # Sixteen rows read the same weights as one and do 16x the FLOPs: at one step's bandwidth and the peak FLOP rate
  # they would take max(t(1), FLOPs / peak).
  print(f"the products alone: t(16)/t(1) = {steps[16] / steps[1]:.2f}; at one step's bandwidth "
        f"({WEIGHTS_MB / steps[1]:.0f} GB/s) and the peak FLOP rate the floor is {max(t16, steps[1]) / steps[1]:.2f}")


if __name__ == "__main__":
  main()
