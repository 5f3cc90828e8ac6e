"""A tiny linear-regression run for the training-infrastructure tests, in process or as a subprocess.

As a script: `python train_tiny.py CKPT_DIR NUM_STEPS EVERY SLEEP OUT.npz` trains (resuming from CKPT_DIR when
it holds a checkpoint), sleeping SLEEP seconds before each batch, prints `first_step=<n>` for the first step it
ran, and saves the final params to OUT.npz. With `JAX_NUM_PROCESSES` set it is one process of a multi-process run
(`jaxspec.sharding.initialize_distributed`) training on a mesh over every process's devices.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from training.trainer import OptimConfig, Trainer, init_state, make_optimizer

# One process of a multi-process run (tests/test_multihost.py): joined before anything below touches a device.
MULTI_PROCESS = __name__ == "__main__" and bool(os.environ.get("JAX_NUM_PROCESSES"))
if MULTI_PROCESS:
  from jaxspec import sharding
  sharding.initialize_distributed()

DIM = 4
BATCH = 16
W_TRUE_D = np.array([1.5, -2.0, 0.5, 3.0], np.float32)
B_TRUE = 0.7


def batch_at(step: int, size: int = BATCH) -> dict[str, np.ndarray]:
  """The batch of a step: the same for every run, so a resumed run sees the data an unbroken one does."""
  rng = np.random.default_rng(1000 + step)
  x_BxD = rng.normal(size=(size, DIM)).astype(np.float32)
  y_B = (x_BxD @ W_TRUE_D + B_TRUE + 0.01 * rng.normal(size=size)).astype(np.float32)
  return {"x": x_BxD, "y": y_B}


def batches_from(step: int, sleep: float = 0.0) -> Iterator[dict[str, np.ndarray]]:
  while True:
    if sleep:
      time.sleep(sleep)
    yield batch_at(step)
    step += 1


def loss_fn(params, frozen, batch, rng):
  """Mean squared error of `x @ w + b + offset`; a little key-dependent noise checks the per-step keys."""
  pred_B = batch["x"] @ params["w_D"] + params["b"] + frozen["offset"]
  err_B = pred_B - batch["y"] + 1e-3 * jax.random.normal(rng, pred_B.shape)
  return jnp.mean(err_B**2), {"mae": jnp.mean(jnp.abs(err_B))}


def init_params() -> dict[str, jax.Array]:
  return {"w_D": jnp.zeros((DIM,), jnp.float32), "b": jnp.zeros((), jnp.float32)}


FROZEN = {"offset": jnp.float32(0.0)}
OPTIM = OptimConfig(lr=0.3, warmup_steps=2, schedule="cosine", total_steps=40, clip_norm=10.0, b1=0.7)


def make_trainer(checkpoint_dir: str | Path | None, every: int, **kwargs) -> Trainer:
  return Trainer(loss_fn, make_optimizer(OPTIM), frozen=FROZEN, checkpoint_dir=checkpoint_dir,
                 checkpoint_every=every, log_every=1, progress=False, **kwargs)


def fresh_state():
  return init_state(init_params(), make_optimizer(OPTIM), 0)


def main(argv: list[str]) -> None:
  ckpt_dir, num_steps, every, sleep, out = argv
  mesh = "data=-1,model=1" if MULTI_PROCESS else None
  trainer = make_trainer(ckpt_dir, int(every), mesh=mesh)
  try:
    state, history = trainer.fit(fresh_state(), lambda s: batches_from(s, float(sleep)), int(num_steps))
  except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
  first = history[0]["step"] if history else int(state.step) + 1
  print(f"first_step={first}", flush=True)
  np.savez(out, **{k: np.asarray(v) for k, v in state.params.items()})


if __name__ == "__main__":
  main(sys.argv[1:])
