"""Distilling a small draft model for speculative sampling from the target, on the target's own greedy text.

The draft is a LLaMA with the target's width, heads and vocabulary (so it shares the tokenizer) and `n_layers`
layers, by default initialised from the target's embedding, first `n_layers` layers and final norm (the
layer-skip draft, then trained). The vocabulary-sized matrices stay frozen by default: they are most of the
parameters of a small draft, and a draft that keeps the target's ships without them (`jaxspec/models/draft.py`).

Data: the self-distillation sequences the BPD run builds (`training.bpd.build_sequences`, the same dataset folder
by default, so one set of target generations serves both runs). Sequences are cut/padded to `train.seq_len`.

Objective: per position, KL(p || q) at temperature 1 between the target's next-token distribution p and the
draft's q. p is stored as its top-K ids and log-probabilities, computed once over the dataset (and cached next to
the checkpoints); the mass outside the top K is one "other" bucket on both sides (p's remainder against the
draft's mass outside those K ids), so the loss is the exact KL between the two distributions coarsened to K + 1
outcomes: a lower bound of the full KL that is tight when the top K hold nearly all of p. An optional weight adds
the cross-entropy of the data's next token (the target's greedy choice on generated positions).

Metrics: `loss`, `kl`, `ce`, `agree` (the draft's argmax equals the target's: the per-token acceptance of greedy
speculative decoding), `other_mass` (p outside its top K) and `tau_proxy`, the expected tokens per target call of
greedy speculation with γ = `objective.gamma` drafts, estimated from the per-position agreement: on the target's own
greedy text, a step starting at position s accepts draft i iff the draft agrees at s .. s+i-1, so
`tau_proxy = 1 + Σ_{i=1..γ} mean_s Π_{j<i} agree[s+j]` (chains that run past a sequence's end stop there).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Callable, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.models.bpd import target_fingerprint
from jaxspec.models.draft import VOCAB_PARAMS, embed_fingerprint, load_draft, save_draft  # noqa: F401 (re-export)
from jaxspec.models.draft import weights_fingerprint
from jaxspec import sharding
from jaxspec.decoding.sampling import seed_key
from jaxspec.models.llama import LlamaLM, precision_key
from training import datasets, rowcache
from training.bpd import DataSection, ModelSection, build_sequences
from training.config import ConfigError, record_run_config, load_config, starting_point_key, to_dict
from training.trainer import OptimConfig, Trainer, init_state, make_optimizer

TEACHER_FILE = "teacher_top{k}.npz"


@dataclasses.dataclass(frozen=True)
class DraftSection:
  n_layers: int = 4
  init: Literal["target_layers", "random"] = "target_layers"  # layers + final norm; the embedding is the target's
  train_embeddings: bool = False  # also train the embedding (and untied head); they are then shipped too
  export_dtype: Literal["float32", "bfloat16"] = "bfloat16"  # dtype of the shipped tensors

  def __post_init__(self):
    if self.n_layers < 1:
      raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")


@dataclasses.dataclass(frozen=True)
class ObjectiveSection:
  top_k: int = 64  # K: the target's distribution is kept as its top-K probabilities plus one "other" bucket
  kl_weight: float = 1.0
  ce_weight: float = 0.0  # weight of the data's next-token cross-entropy
  gamma: int = 4  # γ of the tau_proxy metric

  def __post_init__(self):
    if self.top_k < 1:
      raise ValueError(f"top_k must be >= 1, got {self.top_k}")
    if self.kl_weight < 0 or self.ce_weight < 0 or self.kl_weight + self.ce_weight == 0:
      raise ValueError(f"kl_weight and ce_weight must be >= 0 and not both 0, got {self.kl_weight} and "
                       f"{self.ce_weight}")
    if self.gamma < 1:
      raise ValueError(f"gamma must be >= 1, got {self.gamma}")


@dataclasses.dataclass(frozen=True)
class TrainSection:
  steps: int = 2000
  batch_size: int = 8  # sequences per step
  seq_len: int = 272  # sequences are cut/padded to this (80 prompt tokens + 192 generated; the shipped prompts run
  # up to 222 tokens with the chat template)
  seed: int = 0
  checkpoint_dir: str = "runs/draft_smollm2/ckpt"  # also holds the cached teacher top-K arrays
  checkpoint_every: int = 250
  eval_every: int = 250
  log_every: int = 25

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
    if self.seq_len < 2:
      raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")


@dataclasses.dataclass(frozen=True)
class DraftTrainConfig:
  task: Literal["draft"] = "draft"
  out: str = "jaxspec/assets/draft_smollm2"  # the exported draft (see jaxspec/models/draft.py)
  model: ModelSection = ModelSection()  # the target
  draft: DraftSection = DraftSection()
  data: DataSection = DataSection(dataset_dir="runs/bpd_smollm2/data")  # shared with the BPD run
  objective: ObjectiveSection = ObjectiveSection()
  optim: OptimConfig = OptimConfig(lr=5e-4, warmup_steps=100)
  train: TrainSection = TrainSection()
  mesh: Optional[str] = None  # train sharded, e.g. "data=2,model=4" (jaxspec.sharding); None: one device


def load_draft_config(path, overrides=()) -> DraftTrainConfig:
  return load_config(path, DraftTrainConfig, overrides)


# ---- the draft's initial params ------------------------------------------------------------------------------

def init_draft(target: LlamaLM, target_params: dict, n_layers: int, init: str = "target_layers",
               rng: jax.Array | int = 0) -> tuple[LlamaLM, dict]:
  """A float32 draft with the target's width and vocabulary and `n_layers` layers.

  Args:
    target: the target model.
    target_params: its params (per-layer or stacked).
    n_layers: the draft's depth; with `init="target_layers"` at most the target's.
    init: "target_layers": the target's first `n_layers` layers and final norm; "random": fresh layers and norm.
      Either way the embedding (and untied head) are the target's.
    rng: key or seed for "random".

  Returns:
    `(draft, params)`; float32 arrays of the target are shared, not copied (copy them before donating).
  """
  cfg = target.cfg
  if init == "target_layers" and not 1 <= n_layers <= cfg.n_layers:
    raise ConfigError(f"draft.n_layers={n_layers}: a draft initialised from the target's layers keeps 1 to "
                      f"{cfg.n_layers} of them")
  draft = LlamaLM(dataclasses.replace(cfg, n_layers=n_layers, scan_layers=False, dtype="float32",
                                      param_dtype="float32"))
  f32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
  if init == "random":
    params = dict(draft.init_params(seed_key(rng) if isinstance(rng, int) else rng))
  else:
    params = {"final_norm": f32(target_params["final_norm"])}
    for i in range(n_layers):
      if "layers" in target_params:  # stacked (scan_layers)
        params[f"layers_{i}"] = f32(jax.tree.map(lambda x: x[i], target_params["layers"]["block"]))
      else:
        params[f"layers_{i}"] = f32(target_params[f"layers_{i}"])
  for name in VOCAB_PARAMS:
    if name in target_params:
      params[name] = f32(target_params[name])
  return draft, params


def split_trainable(params: dict, train_embeddings: bool) -> tuple[dict, dict]:
  """`(trainable, frozen)`: the vocabulary-sized matrices go to `frozen` unless they are trained."""
  frozen = {} if train_embeddings else {k: v for k, v in params.items() if k in VOCAB_PARAMS}
  return {k: v for k, v in params.items() if k not in frozen}, frozen


# ---- data: padded sequences and the target's top-K -------------------------------------------------------------

@dataclasses.dataclass
class DistillData:
  """Sequences cut/padded to L with the target's top-K next-token distribution at every position.

  Attributes:
    tokens_NxL: token ids (0 past each sequence's end).
    mask_NxL: 1 where position t's next token is trained on.
    top_ids_NxLxK: the target's K most likely next tokens at each position, most likely first.
    top_logp_NxLxK: their log-probabilities (temperature 1).
    other_logp_NxL: the log of the target's probability mass outside those K (-inf when K is the vocabulary).
  """

  tokens_NxL: np.ndarray
  mask_NxL: np.ndarray
  top_ids_NxLxK: np.ndarray
  top_logp_NxLxK: np.ndarray
  other_logp_NxL: np.ndarray

  def __len__(self) -> int:
    return len(self.tokens_NxL)

  def batch(self, idx) -> dict:
    return {"tokens": self.tokens_NxL[idx], "mask": self.mask_NxL[idx], "top_ids": self.top_ids_NxLxK[idx],
            "top_logp": self.top_logp_NxLxK[idx], "other_logp": self.other_logp_NxL[idx]}


def padded(seqs: datasets.Sequences, seq_len: int, loss_on_prompt: bool) -> tuple[np.ndarray, np.ndarray, int]:
  """`(tokens_NxL, mask_NxL, truncated)`: mask[i, t] = 1 where token t+1 of sequence i is a training target."""
  tok = np.zeros((len(seqs), seq_len), np.int32)
  mask = np.zeros((len(seqs), seq_len), np.float32)
  truncated = 0
  for i, (t, p) in enumerate(zip(seqs.tokens, seqs.prompt_lens)):
    truncated += len(t) > seq_len
    t = t[:seq_len]
    tok[i, :len(t)] = t
    mask[i, (0 if loss_on_prompt else max(int(p) - 1, 0)):len(t) - 1] = 1.0
  return tok, mask, truncated


def teacher_topk(model, params, tokens_NxL: np.ndarray, lengths_N: np.ndarray, k: int, *, batch_size: int = 8,
                 rows: np.ndarray | None = None,
                 advance: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The target's top-k next-token ids `[N, L, k]` (int32) and log-probabilities (f32) at every position, and the
  log of its mass outside them `[N, L]`, for the sequences `rows` (default: all; the result has one row each).
  `advance(n)`, if given, is told of each batch of n rows done (a progress bar).

  Rows are run in order of length, each batch cut to a power-of-two bucket of its longest row; positions past that
  bucket hold id 0 and log-probabilities 0, and positions past a row's end are masked out of the loss.
  """
  from jaxspec.decoding.generate import bucket

  rows = np.arange(len(tokens_NxL)) if rows is None else np.asarray(rows)
  n, length = len(rows), tokens_NxL.shape[1]
  k = min(k, model.vocab_size)
  ids = np.zeros((n, length, k), np.int32)
  logp = np.zeros((n, length, k), np.float32)
  other = np.zeros((n, length), np.float32)
  order = np.argsort(lengths_N[rows], kind="stable")
  for s in range(0, n, batch_size):
    idx = order[s:s + batch_size]
    # A short last batch is padded with its own last row instead of compiling a new shape.
    run = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])]) if len(idx) < batch_size else idx
    l = min(bucket(max(int(lengths_N[rows[run]].max()), 1), 32), length)
    # (fetch: a target split over hosts gives a vocabulary split over them, gathered here)
    out = sharding.fetch(_teacher_batch(model, k, params, jnp.asarray(tokens_NxL[rows[run], :l])))
    ids[idx, :l], logp[idx, :l], other[idx, :l] = (a[:len(idx)] for a in out)
    if advance is not None:
      advance(len(idx))
  return ids, logp, other


@functools.partial(jax.jit, static_argnums=(0, 1))
def _teacher_batch(model, k: int, params, tokens_BxL):
  b, l = tokens_BxL.shape
  cache = jax.lax.optimization_barrier(model.init_cache(b, l))
  pos = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  logits, _, _ = model.forward(params, tokens_BxL, pos, cache, jnp.tril(jnp.ones((l, l), bool)))
  logp_BxLxV = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  logp_BxLxK, ids_BxLxK = jax.lax.top_k(logp_BxLxV, k)
  return ids_BxLxK.astype(jnp.int32), logp_BxLxK, outside_logsumexp(logp_BxLxV, ids_BxLxK)


def cached_teacher_topk(path: Path, model, params, tokens_NxL, lengths_N, k: int, *,
                        progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`teacher_topk`, stored in `path` and reused while k, the width and the target are the same: each sequence the
  file already holds is taken from it, so added data computes only the added sequences; computed in parts that a
  killed run keeps (`training.rowcache`)."""
  key = json.dumps({"k": min(k, model.vocab_size), "width": int(tokens_NxL.shape[1]),
                    "target": repr(dataclasses.replace(model.cfg, scan_layers=False)),
                    "embed": target_fingerprint(params), "weights": weights_fingerprint(params),
                    **precision_key(model.cfg)}, sort_keys=True)

  def compute(idx: np.ndarray, advance) -> dict[str, np.ndarray]:
    ids, logp, other = teacher_topk(model, params, tokens_NxL, lengths_N, k, rows=idx, advance=advance)
    return {"ids": ids, "logp": logp, "other": other}

  row_keys = [rowcache.sequence_key(t[:n]) for t, n in zip(tokens_NxL, lengths_N)]
  z = rowcache.cached_rows(path, key, np.argsort(lengths_N, kind="stable"), compute, row_keys=row_keys,
                           desc="teacher top-k", progress=progress)
  return z["ids"], z["logp"], z["other"]


# ---- the objective ---------------------------------------------------------------------------------------------

def outside_logsumexp(x_BxLxV: jax.Array, ids_BxLxK: jax.Array) -> jax.Array:
  """`[B, L]` logsumexp of x over the vocabulary minus the K ids (-inf when they are the whole vocabulary).

  Masked rather than subtracted: `log(1 - Σ_top q)` loses the small masses in float32 rounding."""
  b, l, v = x_BxLxV.shape
  if ids_BxLxK.shape[-1] >= v:
    return jnp.full((b, l), -jnp.inf, x_BxLxV.dtype)
  is_top = jnp.zeros((b, l, v), bool).at[jnp.arange(b)[:, None, None], jnp.arange(l)[None, :, None],
                                          ids_BxLxK].set(True)
  return jax.nn.logsumexp(jnp.where(is_top, -jnp.inf, x_BxLxV), axis=-1)


def topk_kl(logq_BxLxV: jax.Array, top_ids_BxLxK: jax.Array, top_logp_BxLxK: jax.Array,
            other_logp_BxL: jax.Array) -> jax.Array:
  """KL(p || q) `[B, L]` between p and q coarsened to K + 1 outcomes: the K ids and one "other" bucket.

  Args:
    logq_BxLxV: the draft's log-probabilities.
    top_ids_BxLxK: the target's top-K ids.
    top_logp_BxLxK: their log-probabilities under the target.
    other_logp_BxL: the log of the target's mass outside them (-inf: none).
  """
  logq_k = jnp.take_along_axis(logq_BxLxV, top_ids_BxLxK, axis=-1)
  p_k = jnp.exp(top_logp_BxLxK)
  kl = jnp.where(p_k > 0, p_k * (top_logp_BxLxK - logq_k), 0.0).sum(-1)
  if top_ids_BxLxK.shape[-1] < logq_BxLxV.shape[-1]:
    p_other = jnp.exp(other_logp_BxL)
    logp_other = jnp.where(p_other > 0, other_logp_BxL, 0.0)
    kl = kl + jnp.where(p_other > 0, p_other * (logp_other - outside_logsumexp(logq_BxLxV, top_ids_BxLxK)), 0.0)
  return kl


def distill_loss(draft: LlamaLM, objective: ObjectiveSection):
  """`loss_fn(trainable, frozen, batch, rng)` for the Trainer; batch = `DistillData.batch(...)`."""
  gamma = objective.gamma

  def loss_fn(trainable, frozen, batch, rng):
    params = {**frozen, **trainable}
    tokens = batch["tokens"]
    b, l = tokens.shape
    cache = jax.lax.optimization_barrier(draft.init_cache(b, l))
    pos = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    logits_BxLxV, _, _ = draft.forward(params, tokens, pos, cache, jnp.tril(jnp.ones((l, l), bool)))
    logq_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    mask = batch["mask"]
    count = jnp.maximum(mask.sum(), 1.0)
    mean = lambda x_BxL: jnp.sum(x_BxL * mask) / count
    kl_BxL = topk_kl(logq_BxLxV, batch["top_ids"], batch["top_logp"], batch["other_logp"])
    nxt_BxL = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=1)
    ce_BxL = -jnp.take_along_axis(logq_BxLxV, nxt_BxL[:, :, None], axis=-1)[:, :, 0]
    agree_BxL = (jnp.argmax(logq_BxLxV, axis=-1) == batch["top_ids"][:, :, 0]).astype(jnp.float32) * mask
    run_BxL, accepted = jnp.ones_like(agree_BxL), 0.0
    for i in range(gamma):  # run[s] = Π_{j<=i} agree[s + j]: draft i + 1 of a step starting at s is accepted
      shifted = jnp.concatenate([agree_BxL[:, i:], jnp.zeros((b, i), agree_BxL.dtype)], axis=1)
      run_BxL = run_BxL * shifted
      accepted = accepted + mean(run_BxL)
    kl, ce = mean(kl_BxL), mean(ce_BxL)
    loss = objective.kl_weight * kl + objective.ce_weight * ce
    return loss, {"kl": kl, "ce": ce, "agree": mean(agree_BxL), "other_mass": mean(jnp.exp(batch["other_logp"])),
                  "tau_proxy": 1.0 + accepted, "count": mask.sum()}  # every mean is over the trained tokens

  return loss_fn


# ---- the run ---------------------------------------------------------------------------------------------------

def train_draft(cfg: DraftTrainConfig, *, model=None, params=None, tokenizer=None, progress: bool = True) -> dict:
  """Builds (or reuses) the data and the target's top-K, distills the draft (resumable from Orbax checkpoints)
  and exports it to `cfg.out`. Returns a summary: data size, the draft's eval before and after, times."""
  from jaxspec.loading import load_model

  t_start = time.time()
  mesh = sharding.make_mesh(cfg.mesh) if cfg.mesh is not None else None  # a bad mesh fails before any work
  if model is None:
    # On the mesh as each weight is read: a target that fits the mesh but not one device trains too.
    model, params, tokenizer = load_model(cfg.model.path, dtype=cfg.model.dtype,
                                          matmul_precision=cfg.model.matmul_precision, mesh=mesh)
  if not isinstance(model, LlamaLM):  # before the data, which takes the longest
    raise ConfigError(f"task draft distills a LLaMA-family draft from a decoder-only LLaMA-family target; "
                      f"{cfg.model.path!r} is a {type(model).__name__}. For an encoder-decoder (T5) target a smaller "
                      "T5 trained on the same task serves as the draft (configs/t5_numbers_draft.yaml trains one for "
                      "the shipped numbers T5 with task seq2seq).")
  if cfg.draft.init == "target_layers" and cfg.draft.n_layers > model.cfg.n_layers:
    raise ConfigError(f"draft.n_layers={cfg.draft.n_layers} is more than the target's {model.cfg.n_layers} layers, "
                      f"which draft.init=target_layers starts the draft from: set draft.n_layers={model.cfg.n_layers} "
                      "or fewer, or draft.init=random")
  ckpt_dir = Path(cfg.train.checkpoint_dir)
  # checkpoints of another target are refused
  record_run_config(cfg, ckpt_dir, target=embed_fingerprint(params), weights=weights_fingerprint(params))
  t0 = time.time()
  seqs = build_sequences(cfg, model, params, tokenizer, progress)
  data_s = time.time() - t0
  train_seqs, eval_seqs = seqs.split(cfg.data.eval_fraction, seed=cfg.train.seed)
  datasets.check_targets({"training": train_seqs, "held-out": eval_seqs}, cfg.train.seq_len,
                         cfg.data.loss_on_prompt)
  tr_tok, tr_mask, tr_cut = padded(train_seqs, cfg.train.seq_len, cfg.data.loss_on_prompt)
  ev_tok, ev_mask, ev_cut = padded(eval_seqs, cfg.train.seq_len, cfg.data.loss_on_prompt)
  t0 = time.time()
  all_tok = np.concatenate([tr_tok, ev_tok])
  lengths = np.array([min(len(t), cfg.train.seq_len) for t in train_seqs.tokens + eval_seqs.tokens], np.int32)
  teacher_path = ckpt_dir / TEACHER_FILE.format(k=cfg.objective.top_k)
  ids, logp, other = cached_teacher_topk(teacher_path, model, params, all_tok, lengths, cfg.objective.top_k,
                                         progress=progress)
  teacher_s = time.time() - t0
  n_tr = len(tr_tok)
  tr = DistillData(tr_tok, tr_mask, ids[:n_tr], logp[:n_tr], other[:n_tr])
  ev = DistillData(ev_tok, ev_mask, ids[n_tr:], logp[n_tr:], other[n_tr:])

  draft, draft_params = init_draft(model, params, cfg.draft.n_layers, cfg.draft.init, cfg.train.seed)
  trainable, frozen = split_trainable(draft_params, cfg.draft.train_embeddings)
  trainable = jax.tree.map(jnp.array, trainable)  # copies: the train step donates them, the target keeps its own
  optimizer = make_optimizer(cfg.optim, cfg.train.steps)
  bs = cfg.train.batch_size

  batches_from, eval_batches = datasets.batch_sources(tr, ev, bs, cfg.train.seed)

  trainer = Trainer(distill_loss(draft, cfg.objective), optimizer, frozen=frozen, checkpoint_dir=ckpt_dir,
                    checkpoint_every=cfg.train.checkpoint_every, log_every=cfg.train.log_every, progress=progress,
                    mesh=sharding.partitioner(mesh, draft))
  state = init_state(trainable, optimizer, cfg.train.seed)
  init_eval = trainer.initial_evaluation(state, eval_batches, starting_point_key(cfg))  # the undistilled draft
  state, history = trainer.fit(state, batches_from, cfg.train.steps, eval_batches=eval_batches,
                               eval_every=cfg.train.eval_every)
  train_s = trainer.fit_s  # summed over a killed run's processes, as resumed
  final_eval = trainer.final_evaluation(state, history, eval_batches)
  out_params = {**frozen, **sharding.fetch(state.params)}
  summary = {"sequences": len(seqs), "tokens": seqs.num_tokens, "train_sequences": len(tr),
             "eval_sequences": len(ev), "truncated_sequences": int(tr_cut + ev_cut),
             "trainable_params": int(sum(x.size for x in jax.tree.leaves(trainable))),
             "data_s": round(data_s, 1), "data_build_s": round(seqs.build_s, 1), "teacher_s": round(teacher_s, 1),
             "teacher_build_s": round(rowcache.compute_seconds(teacher_path), 1), "train_s": round(train_s, 1),
             "total_s": round(time.time() - t_start, 1),
             "init_eval": {k: float(v) for k, v in init_eval.items()},
             "final_eval": {k: float(v) for k, v in final_eval.items() if k != "step"}, "config": to_dict(cfg)}
  save_draft(cfg.out, draft, out_params, include_embeddings=cfg.draft.train_embeddings, dtype=cfg.draft.export_dtype,
             meta={"training": summary}, vocab_ids=train_vocab(train_seqs))  # a subset head scores only these
  return summary


def train_vocab(train_seqs: datasets.Sequences) -> np.ndarray:
  """The distinct token ids of the training sequences (prompts and continuations)."""
  return np.unique(np.concatenate([np.asarray(t) for t in train_seqs.tokens])).astype(np.int32)
