"""A generic Optax training loop with checkpoint resumption, periodic evaluation and metric logs.

The model is given as a loss function `loss_fn(params, frozen, batch, rng) -> (loss, metrics)`: `params` are
trained, `frozen` (e.g. a base model's weights) is passed to every step but never updated or donated, `metrics`
is a dict of scalars to log. A metric that is a mean over some of the batch's units (valid tokens, say) names
their number in `count/<name>` (`count`: for every metric without its own, the loss included), so that means over
several batches (an evaluation, a log window) weight each batch by it: the mean over the units, whatever the batch
size. Without counts, batches are weighted by their rows. Counts are not logged. A step's random key is
`fold_in(state.rng, state.step)`, so a run that resumes from a checkpoint draws the same keys as one that never
stopped.

The data position is the step: `Trainer.fit` asks `batches_from(step)` for the batches from that step on, so
a resumed run continues the data where the checkpoint left it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from tqdm.auto import tqdm

from jaxspec import files, sharding
from jaxspec.decoding.sampling import seed_key
from jaxspec.errors import JaxspecError
from jaxspec.signals import SignalGuard
from training import curves
from training.checkpoint import Checkpointer, CheckpointError
from training.config import ConfigError, has_step_folders

logger = logging.getLogger(__name__)

Batch = Any
Params = Any
Metrics = dict[str, jax.Array]
LossFn = Callable[[Params, Any, Batch, jax.Array], tuple[jax.Array, Metrics]]
BatchSource = Callable[[int], Iterable[Batch]] | Iterable[Batch]

METRICS_FILE = "metrics.jsonl"
INIT_EVAL_FILE = "init_eval.json"  # the starting point's held-out figures, kept for resumes (initial_evaluation)
STOP_CHECK_EVERY = 10  # steps between a multi-host run's agreements on whether a signal asks it to stop
_EVAL_STREAM = 2**31 - 1  # folded into the key for evaluation; training steps (int32) never reach it


@struct.dataclass
class TrainState:
  """What a training run checkpoints.

  Attributes:
    step: int32 scalar, the number of batches consumed (micro-batches when accumulating gradients).
    params: the trained pytree.
    opt_state: the optimizer's state.
    rng: the run's base key; step `s` uses `jax.random.fold_in(rng, s)`.
  """

  step: jax.Array
  params: Params
  opt_state: optax.OptState
  rng: jax.Array


def init_state(params: Params, optimizer: optax.GradientTransformation, rng: jax.Array | int) -> TrainState:
  """A step-0 state for `params` (a key or an integer seed for `rng`)."""
  if isinstance(rng, int):
    rng = seed_key(rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=rng)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with warmup, a decay schedule, global-norm clipping and optional gradient accumulation.

  Attributes:
    lr: the peak learning rate.
    warmup_steps: optimizer updates over which the rate rises linearly to `lr` (update i uses lr*(i+1)/warmup).
    schedule: after warmup, keep `lr` ("constant") or decay it to 0 at `total_steps` ("cosine", "linear").
    total_steps: optimizer updates the schedule spans; with `grad_accum` > 1 a run of n batches makes
      n / grad_accum updates. None (the default) follows the run: its `train.steps` / `grad_accum`, so
      `train.steps=6000` alone lengthens the schedule too. Set it only to decay over another span (a warning
      says when it differs from the run's updates).
    weight_decay: AdamW's decoupled weight decay, on the weight matrices (parameters of 2+ dimensions: kernels,
      embeddings).
    decay_vectors: decay the 1-D parameters too (norm scales, biases), which most LLM recipes leave undecayed.
      Before this option every parameter was decayed; the shipped T5 BPD heads were trained so, and their config
      (configs/bpd_t5_numbers.yaml) sets it.
    clip_norm: the global gradient norm is clipped to this; 0 turns clipping off.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    grad_accum: batches whose mean gradient makes one update (`optax.MultiSteps`); params change every
      `grad_accum` steps.
    cycles: warm restarts: the run is `cycles` equal cycles of warmup + decay (`total_steps` / `cycles` updates
      each). Training a finished run's checkpoint further with `cycles=2` and twice the steps gives what one fresh
      run with those settings gives.
  """

  lr: float = 1e-3
  warmup_steps: int = 0
  schedule: Literal["constant", "cosine", "linear"] = "cosine"
  total_steps: int | None = None
  weight_decay: float = 0.0
  decay_vectors: bool = False
  clip_norm: float = 1.0
  b1: float = 0.9
  b2: float = 0.999
  grad_accum: int = 1
  cycles: int = 1

  def __post_init__(self):
    checks = [
        (self.lr > 0, "lr must be > 0 (at 0 the run would export the parameters it started from)", ("lr",)),
        (self.warmup_steps >= 0, "warmup_steps must be >= 0", ("warmup_steps",)),
        (self.grad_accum >= 1, "grad_accum must be >= 1", ("grad_accum",)),
        (self.cycles >= 1, "cycles must be >= 1", ("cycles",)),
        (self.weight_decay >= 0, "weight_decay must be >= 0", ("weight_decay",)),
        (self.clip_norm >= 0, "clip_norm must be >= 0 (0 turns clipping off)", ("clip_norm",)),
        (0 <= self.b1 < 1 and 0 <= self.b2 < 1, "b1 and b2 must be in [0, 1)", ("b1", "b2")),
    ]
    if self.total_steps is not None and self.cycles >= 1:  # None is resolved from the run's steps by `for_steps`
      checks += self._span_checks()
    for ok, message, keys in checks:
      if not ok:
        got = ", ".join(f"optim.{k}={getattr(self, k)!r}" for k in keys)
        raise ConfigError(f"optimizer config: {message}; got {got}")

  def _span_checks(self):
    return [
        (self.total_steps >= 1, "total_steps must be >= 1", ("total_steps",)),
        (self.total_steps % self.cycles == 0, "cycles must divide total_steps (train.steps / grad_accum when "
                                              "total_steps is not set)", ("cycles", "total_steps")),
        (self.warmup_steps <= self.total_steps // self.cycles,
         "warmup_steps must be <= total_steps / cycles (the steps of one cycle)",
         ("warmup_steps", "total_steps", "cycles")),
    ]

  def for_steps(self, steps: int, warn: bool = True) -> "OptimConfig":
    """This config for a run of `steps` batches: `total_steps` None becomes the run's updates
    (steps / grad_accum), and a warmup longer than a cycle of them is shortened to it (with a warning); an explicit
    `total_steps` that differs is kept, with a warning. `warn=False`: the same checks without the warnings (a config
    checked before its run, which warns when it builds its optimizer)."""
    if steps < self.grad_accum:  # MultiSteps would never apply an update: the run would export what it started from
      raise ConfigError(f"train.steps={steps} is fewer than optim.grad_accum={self.grad_accum}, the batches of one "
                        "update: the run would make no update. Raise train.steps or lower optim.grad_accum.")
    if steps % self.grad_accum and warn:
      logger.warning("train.steps=%d is not a multiple of optim.grad_accum=%d: the last %d batches make no update.",
                     steps, self.grad_accum, steps % self.grad_accum)
    updates = steps // self.grad_accum
    if self.total_steps is None:
      warmup = min(self.warmup_steps, updates // self.cycles)
      if warmup < self.warmup_steps and warn:  # a short run (a smoke test) of a config written for a long one
        logger.warning("optim.warmup_steps=%d is longer than this run's %d updates per cycle: warming up over %d.",
                       self.warmup_steps, updates // self.cycles, warmup)
      return dataclasses.replace(self, total_steps=updates, warmup_steps=warmup)
    if self.total_steps != updates and warn:
      logger.warning("optim.total_steps=%d but the run makes %d optimizer updates (train.steps=%d / grad_accum=%d): "
                     "the schedule %s. Leave optim.total_steps unset to follow the run.", self.total_steps,
                     updates, steps, self.grad_accum,
                     "ends before the run does" if self.total_steps < updates else "does not finish its decay")
    return self


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
  """The learning rate as a function of the optimizer update count (`cfg.total_steps` set: see
  `OptimConfig.for_steps`)."""
  if cfg.total_steps is None:
    if cfg.schedule != "constant" or cfg.cycles > 1:
      raise ConfigError(f"optim.total_steps is not set, and a {cfg.schedule} schedule with {cfg.cycles} cycle(s) "
                        "needs its span: pass the run's steps (make_optimizer(cfg, steps)) or set it.")
    cfg = dataclasses.replace(cfg, total_steps=max(cfg.warmup_steps, 1))  # a constant rate after warmup
  lr, warmup, total = cfg.lr, cfg.warmup_steps, cfg.total_steps // cfg.cycles
  decay_steps = max(total - warmup, 1)

  def schedule(count: jax.Array) -> jax.Array:
    count = jnp.asarray(count, jnp.float32)
    if cfg.cycles > 1:  # the count within its cycle; the last cycle runs on past total_steps like a single one
      count = count - total * jnp.minimum(jnp.floor(count / total), cfg.cycles - 1)
    ramp = jnp.minimum(1.0, (count + 1.0) / warmup) if warmup > 0 else jnp.float32(1.0)
    progress = jnp.clip((count - warmup) / decay_steps, 0.0, 1.0)
    if cfg.schedule == "cosine":
      decay = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif cfg.schedule == "linear":
      decay = 1.0 - progress
    else:
      decay = jnp.float32(1.0)
    return lr * ramp * decay

  return schedule


def make_optimizer(cfg: OptimConfig, steps: int | None = None) -> optax.GradientTransformation:
  """Clipping, then AdamW on `make_schedule(cfg)`, wrapped in `optax.MultiSteps` when `grad_accum` > 1. `steps`:
  the run's batches, which set the schedule's span when `cfg.total_steps` is None."""
  if steps is not None:
    cfg = cfg.for_steps(steps)
  parts = []
  if cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.chain(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2), _decay(cfg.weight_decay, cfg.decay_vectors),
                           optax.scale_by_learning_rate(make_schedule(cfg))))  # optax.adamw, decay as configured
  tx = optax.chain(*parts)
  if cfg.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum).gradient_transformation()
  return tx


def _decay(rate: float, vectors: bool) -> optax.GradientTransformation:
  """`optax.add_decayed_weights`, over the weight matrices only unless `vectors`. Not through its `mask`, which
  wraps the state in `optax.MaskedState`: this keeps `optax.adamw`'s state, so checkpoints of either kind resume."""
  decay = optax.add_decayed_weights(rate)
  if vectors:
    return decay

  def update(updates, state, params=None):
    matrices = None if params is None else jax.tree.map(lambda p: p if p.ndim >= 2 else jnp.zeros_like(p), params)
    return decay.update(updates, state, matrices)

  return optax.GradientTransformation(decay.init, update)


class Trainer:
  """Runs a jitted Optax train step over batches, with checkpoints, evaluation and logs."""

  def __init__(
      self,
      loss_fn: LossFn,
      optimizer: optax.GradientTransformation,
      *,
      frozen: Any = None,
      checkpoint_dir: str | os.PathLike[str] | None = None,
      checkpoint_every: int = 1000,
      max_to_keep: int | None = 3,
      eval_fn: LossFn | None = None,
      log_every: int = 50,
      progress: bool | None = None,
      mesh: Any = None,
      curves: bool = True,
  ):
    """Sets up a trainer.

    Args:
      loss_fn: `(params, frozen, batch, rng) -> (loss scalar, {name: scalar})`, traced by `jax.jit`.
      optimizer: e.g. `make_optimizer(cfg)`.
      frozen: a pytree passed to every step as-is (not trained, not donated); None when unused.
      checkpoint_dir: where checkpoints and `metrics.jsonl` go; None trains without either.
      checkpoint_every: save every this many steps (and always at the end or on SIGTERM/Ctrl-C).
      max_to_keep: how many of the newest checkpoints to keep.
      eval_fn: like `loss_fn`, for evaluation; defaults to `loss_fn`.
      log_every: average the train metrics over this many steps per logged record.
      progress: show a tqdm bar; None shows it only on a terminal.
      mesh: train sharded on a device mesh (a `jax.sharding.Mesh` with `data` / `model` axes, a spec such as
        `"data=2,model=4"`, or a `jaxspec.sharding.Partitioner`): params, optimizer state and `frozen` are placed
        by the logical axis rules of `jaxspec.sharding`, batches are split over `data` (dimension 0), and each
        step keeps the state's shardings. None: one device, as before.
      curves: draw `curves.png` (`training.curves`) beside `metrics.jsonl` after evaluations and at the end.
    """
    if checkpoint_every < 1 or log_every < 1:
      raise ConfigError(f"checkpoint_every and log_every must be >= 1, got {checkpoint_every} and {log_every}")
    self.loss_fn = loss_fn
    self.optimizer = optimizer
    self.frozen = frozen
    self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    self.checkpoint_every = checkpoint_every
    self.max_to_keep = max_to_keep
    self.eval_fn = eval_fn or loss_fn
    self.log_every = log_every
    self.progress = progress
    self.fit_s = 0.0  # set by `fit`: the seconds of training behind its state, resumed runs' earlier processes included
    self.curves = curves and self.checkpoint_dir is not None and files.primary()  # one host draws
    self._curves_at = -float("inf")  # time.monotonic() of the last drawing
    self.partitioner = sharding.partitioner(mesh)
    if self.partitioner is not None and frozen is not None:
      self.frozen = self.partitioner.shard_params(frozen)
    self._train_step = jax.jit(self._step, donate_argnums=(0,))
    self._eval_step = jax.jit(self._eval)

  # --- steps ---------------------------------------------------------------------------------------------

  def _step(self, state: TrainState, frozen: Any, batch: Batch) -> tuple[TrainState, Metrics]:
    rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(self.loss_fn, has_aux=True)
    (loss, metrics), grads = grad_fn(state.params, frozen, batch, rng)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads), f"{COUNT}/grad_norm": 1.0}  # per step
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    if self.partitioner is not None:  # the next step then gets (and donates) arrays laid out like this one's
      new = self.partitioner.constrain(new, self.state_shardings(new))
    return new, metrics

  def _eval(self, params: Params, frozen: Any, batch: Batch, rng: jax.Array) -> Metrics:
    loss, metrics = self.eval_fn(params, frozen, batch, rng)
    return {**metrics, "loss": loss}

  def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    """One jitted update. `state` is donated: use only the returned state afterwards. With a mesh, `state` and
    `batch` are placed on it first (`shard_state`)."""
    return self._train_step(self.shard_state(state), self.frozen, self._place_batch(batch))

  # --- sharding ------------------------------------------------------------------------------------------

  def state_shardings(self, state: TrainState) -> Any:
    """Shardings of a train state on the mesh: params and optimizer state by the parameter rules (an optimizer
    state's paths end in its param's path), step and key replicated. Needs a mesh."""
    part = self.partitioner
    return state.replace(step=part.replicated, params=part.param_shardings(state.params),
                         opt_state=part.param_shardings(state.opt_state), rng=part.replicated)

  def shard_state(self, state: TrainState) -> TrainState:
    """`state` placed on the mesh by `state_shardings` (arrays already there are not copied); unchanged
    without a mesh."""
    if self.partitioner is None:
      return state
    return sharding.place(state, self.state_shardings(state))

  def _place_batch(self, batch: Batch) -> Batch:
    return batch if self.partitioner is None else self.partitioner.shard_batch(batch)

  def evaluate(self, state: TrainState, batches: Iterable[Batch]) -> dict[str, float]:
    """The mean over `batches` of each eval metric, named `eval/<name>` (empty when there are no batches). Batches
    are weighted by the metric's count (see the module's doc), or else by their rows, so that a short last batch
    counts for its rows only."""
    base = jax.random.fold_in(state.rng, _EVAL_STREAM)
    results, sizes = [], []
    # A bar that follows the computation (each batch waited for), not the asynchronous dispatch; it goes when done.
    bar = tqdm(desc="eval", unit="batch", leave=False, dynamic_ncols=True,
               disable=None if self.progress is None else not self.progress)
    for i, batch in enumerate(batches):
      results.append(self._eval_step(state.params, self.frozen, self._place_batch(batch), jax.random.fold_in(base, i)))
      sizes.append(_batch_size(batch))
      if not bar.disable:
        jax.block_until_ready(results[-1])
        bar.update(1)
    bar.close()
    if not results:
      return {}
    records = jax.device_get(results)
    means = _mean(records, sizes)
    unmeasured = [k for k in _metric_names(records) if k not in means]
    if unmeasured:
      logger.warning("the held-out evaluation counted no unit for %s (none occurred in the held-out batches: for "
                     "BPD heads on a vocabulary subset, heads.vocab_subset, every held-out target outside it, say), "
                     "so these figures are left out, not reported as 0; more held-out prompts (data.eval_fraction) "
                     "may give them", ", ".join(f"eval/{k}" for k in unmeasured))
    return {f"eval/{k}": v for k, v in means.items()}

  # --- the loop ------------------------------------------------------------------------------------------

  def fit(
      self,
      state: TrainState,
      batches_from: BatchSource,
      num_steps: int,
      eval_batches: Callable[[], Iterable[Batch]] | None = None,
      eval_every: int | None = None,
  ) -> tuple[TrainState, list[dict[str, float]]]:
    """Trains until `state.step == num_steps`, resuming from the latest checkpoint in `checkpoint_dir`.

    Args:
      state: the initial state (e.g. `init_state(...)`); with a checkpoint present only its structure is used.
        Its arrays are donated to the first step: use the returned state afterwards.
      batches_from: `step -> iterable of the batches from that step on` (so a resumed run continues the data
        where it stopped); a plain iterable is taken to start at step 0, and the steps already done are
        skipped.
      num_steps: the step to train up to (an absolute count, not a number of further steps).
      eval_batches: `() -> iterable of eval batches`, evaluated every `eval_every` steps and at the end.
      eval_every: steps between evaluations; None evaluates only at the end.

    Returns:
      `(state, history)`: the final state and the records logged by this call (dicts with "step", the train
      metrics averaged over the last `log_every` steps plus "steps_per_sec", or the `eval/` metrics).

    Raises:
      CheckpointError: the checkpoint directory holds a corrupt checkpoint or one for another state.
      KeyboardInterrupt: after Ctrl-C, once a checkpoint of the last finished step is saved. SIGTERM saves the
        same way and then ends the process with the signal's previous handler. In a multi-host run a signal to
        any process stops all of them at the same step (within `STOP_CHECK_EVERY` steps, or after the last step),
        where they save together; a process that got no signal itself then raises KeyboardInterrupt. A signal
        that comes after the last agreement (the run done and saved) is only logged.
    """
    if eval_every is not None and eval_every < 1:
      raise ConfigError(f"eval_every must be >= 1 or None, got {eval_every}")
    ckpt = None
    if self.checkpoint_dir is not None:
      ckpt = Checkpointer(self.checkpoint_dir, max_to_keep=self.max_to_keep, every=self.checkpoint_every)
    history: list[dict[str, float]] = []
    self.fit_s = 0.0  # seconds of training behind the returned state, over every process that trained it
    try:
      state = self.shard_state(state)  # before a restore, which reads into the template's shardings
      if ckpt is not None and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
        self.fit_s = float(meta.get("fit_s", 0.0))  # checkpoints from before this was recorded: 0
        if int(meta.get("step", int(state.step))) != int(state.step):
          raise CheckpointError(
              f"checkpoint in {str(ckpt.directory)!r} says step {meta['step']} but its state is at step "
              f"{int(state.step)}; delete that step directory or use another checkpoint directory"
          )
        # A warning, so the command line shows it: a rerun after a kill should say where it goes on from.
        logger.warning("resuming from step %d of the checkpoints in %s", int(state.step), ckpt.directory)
      start = int(state.step)
      if self.checkpoint_dir is not None and files.primary():  # metrics.jsonl has one writer: process 0
        _truncate_metrics(self.checkpoint_dir / METRICS_FILE, start)
      if start > num_steps:  # else the model of step `start` would be exported as a run of num_steps steps
        raise CheckpointError(f"the checkpoints in {str(self.checkpoint_dir)!r} are at step {start}, past this run's "
                              f"{num_steps} steps: set train.steps to {start} or more to go on from them, or use "
                              "another checkpoint directory to train a shorter run.")
      if start == num_steps:
        return state, history
      with _SignalGuard() as guard:
        state = self._loop(state, start, num_steps, _batches(batches_from, start), eval_batches, eval_every,
                           ckpt, history, guard)
      if guard.must_stop():
        if ckpt is not None:
          ckpt.close()
          logger.warning("checkpoint of step %d saved in %s; the same command resumes from there", int(state.step),
                         ckpt.directory)
        guard.redeliver()
      return state, history
    finally:
      if ckpt is not None:
        ckpt.close()

  def _loop(
      self,
      state: TrainState,
      start: int,
      num_steps: int,
      batches: Iterator[Batch],
      eval_batches: Callable[[], Iterable[Batch]] | None,
      eval_every: int | None,
      ckpt: Checkpointer | None,
      history: list[dict[str, float]],
      guard: _SignalGuard,
  ) -> TrainState:
    step = start
    window: list[Metrics] = []
    window_start = loop_start = time.perf_counter()
    before = self.fit_s
    bar = tqdm(total=num_steps, initial=start, desc="train", dynamic_ncols=True,
               disable=None if self.progress is None else not self.progress)

    metas: dict[int, dict[str, Any]] = {}

    def meta(s: int) -> dict[str, Any]:
      # fit_s: the seconds the steps up to s took, summed over the processes of a run that was killed and resumed
      # (steps a kill lost after the last checkpoint are not counted twice: only the run that redid them counts).
      # Taken once per step: the last step's checkpoint is saved in the loop and again at the end (a no-op), and
      # this run's figure must be the one a resumed run reads back from it.
      if s not in metas:
        self.fit_s = before + time.perf_counter() - loop_start
        metas[s] = {"step": s, "num_steps": num_steps, "time": time.time(), "fit_s": self.fit_s}
      self.fit_s = metas[s]["fit_s"]
      return metas[s]

    def log_window():
      """One record of the train metrics averaged over the steps since the last one."""
      means = _mean(jax.device_get(window))  # waits for the window's steps: dispatch alone returns at once
      _check_losses(means, step, ckpt)
      elapsed = time.perf_counter() - window_start
      self._record({"step": step, **means, "steps_per_sec": len(window) / max(elapsed, 1e-9)}, history, bar)
      window.clear()

    try:
      while step < num_steps and not guard.stop_requested(step):
        batch = next(batches, _END)
        if batch is _END:
          logger.warning("the batches ran out at step %d of %d; stopping there", step, num_steps)
          break
        state, metrics = self._train_step(state, self.frozen, self._place_batch(batch))
        step += 1
        window.append(metrics)
        bar.update(1)
        if step % self.log_every == 0 or step == num_steps:
          log_window()
        if eval_batches is not None and ((eval_every and step % eval_every == 0) or step == num_steps):
          self._record({"step": step, **self.evaluate(state, eval_batches())}, history, bar)
        if ckpt is not None:
          if ckpt.should_save(step):
            _check_state(state, step, ckpt)  # a checkpoint of NaN weights would be resumed from, or exported
          ckpt.save(step, state, meta(step))
        if not window:  # the next window's clock starts after this step's evaluation and checkpoint
          window_start = time.perf_counter()
      guard.settle(step)  # multi-host: a signal after the last agreement is agreed on now, before the last save
      if window:  # a signal or the batches' end came between two records: the steps since the last one are logged
        log_window()
      if ckpt is not None:  # the end, the batches running out, or a signal: keep what was done
        _check_state(state, step, ckpt)
        ckpt.save(step, state, meta(step), force=True)
      else:
        jax.block_until_ready(state)  # the last steps may still be running on an accelerator
        self.fit_s = before + time.perf_counter() - loop_start
    finally:
      bar.close()
      self._draw_curves(force=True)  # also after Ctrl-C or an error: the curves up to the last record
    return state

  def _record(self, record: dict[str, float], history: list[dict[str, float]], bar: tqdm) -> None:
    history.append(record)
    bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k != "step"}, refresh=False)
    logger.info("step %d: %s", record["step"], ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step"))
    if self.checkpoint_dir is not None and files.primary():  # every process has the same (global) figures
      self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
      with (self.checkpoint_dir / METRICS_FILE).open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    if any(k.startswith("eval/") for k in record):
      self._draw_curves()

  def initial_evaluation(self, state, eval_batches, key: Any) -> dict[str, float]:
    """The held-out figures of the starting `state`, evaluated once per run: kept in the checkpoint folder
    (`INIT_EVAL_FILE`) with `key` (a JSON value of what they depend on: the run's resolved config), so a resumed run,
    or a finished run run again, reads them instead of evaluating again. Process 0's file decides for every process
    of a multi-host run (an evaluation is a step they must all run or all skip)."""
    path = self.checkpoint_dir / INIT_EVAL_FILE if self.checkpoint_dir is not None else None
    # As it reads back; with how means are taken, so figures saved before they were weighted by counts are redone.
    key = json.loads(json.dumps({"run": key, "means": "weighted by count"}))
    saved = None
    # Only beside checkpoints of this run: `record_run_config` has then checked the target and the settings, and the
    # run goes on from them. Without one the run starts afresh, perhaps on other weights at the same model.path or
    # other heads.init files, which the key does not see.
    if path is not None and path.is_file() and has_step_folders(self.checkpoint_dir):
      try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("key") == key:
          saved = {k: float(v) for k, v in record["eval"].items()}
      except (ValueError, KeyError, TypeError, AttributeError):  # damaged: evaluated again and rewritten
        saved = None
    saved = sharding.from_first_process(saved)
    if saved is not None:
      return saved
    figures = {k: float(v) for k, v in self.evaluate(state, eval_batches()).items()}
    if path is not None and files.primary():
      files.write_json(path, {"key": key, "eval": figures})
    return figures

  def final_evaluation(self, state, history: list[dict[str, float]], eval_batches) -> dict[str, float]:
    """The held-out figures of the trained `state`, with its step: those `fit` logged at that step, or a new
    evaluation where there are none. A rerun of a finished run (or one killed after its last step, during the export)
    takes its evaluation from metrics.jsonl rather than run it again. Multi-host runs take `fit`'s own history, which
    every process holds alike (an evaluation is a step they must all run or all skip)."""
    step = int(jax.device_get(state.step))
    records = self.logged(history) if jax.process_count() == 1 else history
    evals = [h for h in records if h.get("step") == step and any(k.startswith("eval/") for k in h)]
    return evals[-1] if evals else {"step": step, **self.evaluate(state, eval_batches())}

  def logged(self, history: list[dict[str, float]]) -> list[dict[str, float]]:
    """Every record of this run in metrics.jsonl: those of the processes a killed run was resumed from too, which
    `fit`'s own history (`history`) lacks. `history` where there is no file to read (no checkpoint folder, or a
    process of a multi-host run that does not see process 0's)."""
    path = self.checkpoint_dir / METRICS_FILE if self.checkpoint_dir is not None else None
    if path is None or not path.is_file():
      return history
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
      try:
        record = json.loads(line)
      except ValueError:
        continue  # a line a kill cut short
      if isinstance(record, dict) and "step" in record:
        records.append(record)
    return records or history

  def _draw_curves(self, force: bool = False) -> None:
    """Redraws curves.png from metrics.jsonl: after an evaluation at most once per `curves.MIN_INTERVAL_S`, and
    always when `force`d. A plot that fails is a warning, never the end of a training run."""
    if not self.curves or not (force or time.monotonic() - self._curves_at >= curves.MIN_INTERVAL_S):
      return
    path = self.checkpoint_dir / METRICS_FILE
    if not path.is_file():
      return
    try:
      curves.plot_metrics(path)
    except Exception as e:  # noqa: BLE001 - e.g. a matplotlib problem
      logger.warning("could not draw %s: %s", path.with_name(curves.CURVES_FILE), e)
    self._curves_at = time.monotonic()


_END = object()


class TrainingDiverged(JaxspecError):
  """The loss or the weights became inf or NaN: nothing after the last finite checkpoint is saved."""


def _diverged(what: str, step: int, ckpt: Checkpointer | None) -> TrainingDiverged:
  last = ckpt.latest_step() if ckpt is not None else None
  where = (f"the last checkpoint, at step {last}, holds finite weights, and a rerun resumes from it" if last else
           "no checkpoint was saved, so a rerun starts from the beginning")
  return TrainingDiverged(f"training diverged: {what} by step {step}, so nothing later is saved. Lower optim.lr "
                          f"(or set optim.clip_norm, or lengthen optim.warmup_steps) and run again: {where} (the "
                          "optimizer settings may change on resume).")


def _check_losses(means: Mapping[str, float], step: int, ckpt: Checkpointer | None) -> None:
  bad = [k for k, v in means.items() if "loss" in k and not np.isfinite(v)]
  if bad:
    raise _diverged(f"{bad[0]} became {means[bad[0]]}", step, ckpt)


def _check_state(state: Any, step: int, ckpt: Checkpointer | None) -> None:
  """Raises `TrainingDiverged` where a floating-point array of `state` holds inf or NaN (one reduction on the
  devices, then one number fetched: a checkpoint waits for the state anyway)."""
  leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
  if leaves and not bool(jax.device_get(_all_finite(leaves))):
    raise _diverged("the weights or the optimizer state hold inf or NaN", step, ckpt)


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _batches(source: BatchSource, start: int) -> Iterator[Batch]:
  if callable(source) and not isinstance(source, Iterable):
    return iter(source(start))
  return itertools.islice(iter(source), start, None)


COUNT = "count"  # a metric's units in its batch: `count/<name>`, or `count` for all (see the module's doc)


def _metric_names(records: list[Mapping[str, Any]]) -> list[str]:
  """The metrics `records` hold, in order of appearance, less their counts."""
  return [k for k in dict.fromkeys(k for r in records for k in r) if k != COUNT and not k.startswith(COUNT + "/")]


def _mean(records: list[Mapping[str, Any]], weights: list[float] | None = None) -> dict[str, float]:
  """Each metric's mean over `records`, weighted by its count where the records give one, else by `weights`
  (rows; 1 each when None). A metric whose counts are all 0 (no unit of its kind anywhere: every target masked, say)
  was not measured and is left out, rather than reported as the 0 its batches hold."""
  weights = [1.0] * len(records) if weights is None else weights
  out = {}
  for k in _metric_names(records):
    rows = [(np.asarray(r[k], np.float64), np.asarray(r.get(f"{COUNT}/{k}", r.get(COUNT, wt)), np.float64))
            for r, wt in zip(records, weights) if k in r]
    vals, w = zip(*rows)
    if sum(w) > 0:
      out[k] = float(np.average(vals, weights=w))
  return out


def _batch_size(batch: Batch) -> int:
  """Rows of a batch: the leading dimension of its arrays (1 for a batch without arrays)."""
  leaves = [x for x in jax.tree.leaves(batch) if np.ndim(x) > 0]
  return int(np.shape(leaves[0])[0]) if leaves else 1


def _truncate_metrics(path: Path, step: int) -> None:
  """Drops the records a killed run logged after its last checkpoint (they are about to be redone)."""
  if not path.is_file():
    return
  records, bad = files.read_jsonl(path)  # a line cut short by a kill, or damaged, is dropped
  if bad:
    logger.warning("%s: dropped line(s) %s, which could not be read", path, ", ".join(map(str, bad)))
  kept = [r for r in records if isinstance(r, dict) and isinstance(r.get("step"), (int, float)) and r["step"] <= step]
  files.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


class _SignalGuard(SignalGuard):
  """Turns SIGINT/SIGTERM into a flag checked between steps, so a step's donated state is never lost
  (`jaxspec.signals`); a second signal while the first is pending raises KeyboardInterrupt at once."""

  def __init__(self):
    super().__init__(pending="saving a checkpoint after this step")

  def stop_requested(self, step: int) -> bool:
    """Whether to stop before `step`: a signal reached this process, or in a multi-process run any process.

    A checkpoint is a collective save, so the processes of a multi-host run must stop at the same step, though a
    signal reaches each at its own moment (or only one of them). They agree on it every `STOP_CHECK_EVERY` steps
    (a gather of one flag per process), so such a run stops up to that many steps after the signal."""
    if jax.process_count() == 1:
      return self.signum is not None
    return step % STOP_CHECK_EVERY == 0 and self._agree_at(step)

  def settle(self, step: int) -> None:
    """Once the loop has ended, at the same step everywhere: a last agreement in a multi-host run, unless the loop
    ended on one, so that a signal in the last steps is acted on by every process or by none."""
    if jax.process_count() > 1 and not self.agreed:
      self._agree_at(step)

  def must_stop(self) -> bool:
    """Whether `fit` ends as interrupted (after its last save): the same answer in every process of a run. A signal
    that reaches a multi-host run after its last agreement is only logged: the run has finished and saved."""
    if jax.process_count() == 1:
      return self.signum is not None
    if self.signum is not None and not self.agreed:
      logger.warning("got %s after the training's last step; finishing the run", signal.Signals(self.signum).name)
    return bool(self.agreed)

  def _agree_at(self, step: int) -> bool:
    self.stopping = f"another process got a signal: saving a checkpoint at step {step} and stopping"
    return self.agree()
