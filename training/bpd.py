"""Training BPD heads: self-distillation data, the objectives, and the run a config file describes.

Default objective ("heads"): the base model is frozen, so its final hidden states are computed once over the data
(for a decoder-only target cached in the checkpoint folder as `features.npz`, so a resumed run reuses them) and the
heads train on (h_t, x_{t+1}) -> x_{t+1+i} examples, one per position. Head i's loss is cross-entropy over the
heads' vocabulary (the tokens in the data). Metrics per head: loss and top-1 accuracy, and `tau_proxy`, the
expected tokens per step of a chain of the heads' top-1 guesses (1 + Σ_i P[heads 1..i all right]).

Option ("joint", Stern's setting): base and heads train together on token sequences, the base's own next-token
loss kept in the sum, so the base stays a good model while it learns to serve the heads.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxspec import sharding
from jaxspec.decoding.sampling import seed_key
from jaxspec.models.bpd import MAX_HEADS, BPDConfig, BPDModel, save_bpd, target_fingerprint
from jaxspec.models.draft import weights_fingerprint
from jaxspec.models.llama import precision_key
from training import datasets, rowcache
from training.config import ConfigError, record_run_config, load_config, starting_point_key, to_dict
from training.trainer import OptimConfig, Trainer, init_state, make_optimizer

FEATURES_FILE = "features.npz"  # the frozen target's hidden states, cached in the checkpoint folder

@dataclasses.dataclass(frozen=True)
class ModelSection:
  path: Optional[str] = None  # None: the embedded SmolLM2-135M-Instruct
  dtype: Literal["float32", "bfloat16"] = "float32"
  # float32 products of the target's forwards on GPU and TPU (jaxspec.models.llama.MATMUL_PRECISIONS): "highest"
  # keeps its greedy answers and Jacobi fixed points those that decoding finds; "default" is faster there.
  matmul_precision: Literal["highest", "high", "default"] = "highest"


@dataclasses.dataclass(frozen=True)
class HeadsSection:
  num_heads: int = 8
  d_hidden: int = 576
  use_next_token: bool = True
  vocab_subset: bool = True  # project onto the tokens of the training sequences only (not the held-out ones)
  # Start from trained heads (a folder a BPD run exported, e.g. jaxspec/assets/bpd_smollm2; its first num_heads
  # heads) instead of fresh ones: their vocabulary subset is kept, and targets outside it are left out of the loss.
  # The joint objective wants this: fresh heads' losses are ~100x the base's own and would wreck the base early.
  init: Optional[str] = None

  def __post_init__(self):
    if not 1 <= self.num_heads <= MAX_HEADS:
      raise ValueError(f"num_heads must be in 1..{MAX_HEADS}, got {self.num_heads}")
    if self.d_hidden < 1:
      raise ValueError(f"d_hidden must be >= 1, got {self.d_hidden}")


@dataclasses.dataclass(frozen=True)
class DataSection:
  prompts: Optional[str] = None  # Spec-Bench-format JSONL; None: training/data/prompts.jsonl
  limit: Optional[int] = None  # use the first N prompts (of each set, with more_prompts: a smoke test stays small)
  max_new_tokens: int = 192
  gen_batch_size: int = 16
  text_files: tuple[str, ...] = ()  # plain text, used instead of self-distillation when given
  dataset_dir: str = "runs/bpd/data"
  samples: int = 1  # continuations per prompt (more than 1 needs temperature > 0)
  temperature: float = 0.0  # 0: the target's greedy continuations; above 0: sampled ones
  seed: int = 0  # with temperature > 0: another seed draws other samples (use a new dataset_dir for them)
  # Finished self-distillation folders of the same prompts added to the data, e.g. more samples drawn earlier with
  # data.seed=1 into their own dataset_dir.
  extra_dataset_dirs: tuple[str, ...] = ()
  # With temperature > 0: also the greedy continuations of the same prompts, from (or built into) this folder, e.g.
  # the BPD run's dataset_dir; None: the sampled continuations only.
  greedy_dataset_dir: Optional[str] = None
  # Another prompt file (e.g. training/data/prompts_more.jsonl) whose greedy continuations, of more_max_new_tokens
  # tokens (None: max_new_tokens), are built into more_dataset_dir and added to the data: new prompts bring new
  # contexts, where more answers to the same prompts repeat them.
  more_prompts: Optional[str] = None
  more_dataset_dir: Optional[str] = None
  more_max_new_tokens: Optional[int] = None
  eval_fraction: float = 0.05
  # With more_prompts: split each prompt set into train / held-out on its own, so adding a set leaves the first
  # set's held-out prompts held out. False shuffles both together, as runs checkpointed before 2026-12-03 did (to
  # resume one).
  split_by_set: bool = True
  loss_on_prompt: bool = False  # also train on positions inside the prompt

  def __post_init__(self):
    if not 0 < self.eval_fraction < 1:
      raise ValueError(f"eval_fraction must be in (0, 1): the held-out share of the prompts; got {self.eval_fraction}")
    if self.more_prompts and not self.more_dataset_dir:
      raise ValueError("more_prompts needs more_dataset_dir, the folder its continuations are built into "
                       "(e.g. data.more_dataset_dir=runs/more/data)")
    if self.samples < 1 or self.temperature < 0 or (self.samples > 1 and self.temperature == 0):
      raise ValueError(f"samples must be >= 1 and temperature >= 0, and several samples of a prompt need "
                       f"temperature > 0 (greedy continuations are all the same); got samples={self.samples}, "
                       f"temperature={self.temperature}")


@dataclasses.dataclass(frozen=True)
class TrainSection:
  objective: Literal["heads", "joint"] = "heads"
  steps: int = 1000
  batch_size: int = 256  # positions per step ("heads"), sequences per step ("joint")
  seq_len: int = 256  # sequences are cut to this ("joint": and padded; "heads": the hidden states cached at it)
  base_loss_weight: float = 1.0  # "joint": weight of the base's own next-token loss
  base_lr_scale: float = 1.0  # "joint": the base's learning rate as a fraction of optim.lr (the heads get optim.lr)
  # "heads": what head i learns at position t. "tokens": the data's token x_{t+1+i} (cross-entropy). "teacher": the
  # target's distribution for that token, softmax of its logits at t+i over the heads' vocabulary (distillation).
  # On sampled data the token is often not the target's top-1, which is what greedy decoding accepts.
  targets: Literal["tokens", "teacher"] = "tokens"
  seed: int = 0
  checkpoint_dir: str = "runs/bpd/ckpt"
  checkpoint_every: int = 200
  eval_every: int = 200
  log_every: int = 25

  def __post_init__(self):
    if self.base_loss_weight < 0 or self.base_lr_scale < 0:
      raise ValueError(f"base_loss_weight and base_lr_scale must be >= 0, got {self.base_loss_weight} and "
                       f"{self.base_lr_scale}")
    if self.seq_len < 3:  # head i at position t learns token t+2+i: no head has a target in 2 tokens
      raise ValueError(f"seq_len must be >= 3 (the first head's target is 2 tokens ahead), got {self.seq_len}")


@dataclasses.dataclass(frozen=True)
class BPDTrainConfig:
  task: Literal["bpd"] = "bpd"
  out: str = "runs/bpd/heads"  # where the trained heads are exported (config.json + heads.safetensors)
  model: ModelSection = ModelSection()
  heads: HeadsSection = HeadsSection()
  data: DataSection = DataSection()
  optim: OptimConfig = OptimConfig()
  train: TrainSection = TrainSection()
  mesh: Optional[str] = None  # train sharded, e.g. "data=2,model=4" (jaxspec.sharding); None: one device


# ---- data --------------------------------------------------------------------------------------------------

def build_sequences(cfg: BPDTrainConfig, model, params, tokenizer, progress: bool = True) -> datasets.Sequences:
  if cfg.data.text_files:
    return datasets.text_sequences(tokenizer, cfg.data.text_files, cfg.data.dataset_dir, seq_len=cfg.train.seq_len)
  texts = datasets.read_prompt_texts(cfg.data.prompts, cfg.data.limit)
  more = datasets.read_prompt_texts(cfg.data.more_prompts, cfg.data.limit) if cfg.data.more_prompts else None
  more_tokens = ("data.more_max_new_tokens", cfg.data.more_max_new_tokens) if cfg.data.more_max_new_tokens else (
      "data.max_new_tokens", cfg.data.max_new_tokens)
  if more:  # before any answer is written (each set is checked as its answers start: this one's would come last)
    from jaxspec.bench.runner import chat_prompt_ids
    datasets.check_prompts_fit(model, chat_prompt_ids(tokenizer, more), more, more_tokens[1], more_tokens[0],
                               "data.more_prompts")
  seqs = datasets.self_distill(model, params, tokenizer, texts, cfg.data.dataset_dir,
                               max_new_tokens=cfg.data.max_new_tokens, batch_size=cfg.data.gen_batch_size,
                               samples=cfg.data.samples, temperature=cfg.data.temperature, seed=cfg.data.seed,
                               progress=progress, where="data.prompts")
  parts = [seqs]
  if cfg.data.greedy_dataset_dir and cfg.data.temperature > 0:
    parts.insert(0, datasets.self_distill(model, params, tokenizer, texts, cfg.data.greedy_dataset_dir,
                                          max_new_tokens=cfg.data.max_new_tokens,
                                          batch_size=cfg.data.gen_batch_size, progress=progress,
                                          key="data.greedy_dataset_dir", where="data.prompts"))
  parts += [datasets.load_finished(folder) for folder in cfg.data.extra_dataset_dirs]
  if cfg.data.more_prompts:
    parts.append(datasets.self_distill(model, params, tokenizer, more, cfg.data.more_dataset_dir,
                                       max_new_tokens=more_tokens[1], batch_size=cfg.data.gen_batch_size,
                                       progress=progress, key="data.more_dataset_dir", tokens_key=more_tokens[0],
                                       where="data.more_prompts"))
  part_ids = np.repeat([int(cfg.data.more_prompts is not None and i == len(parts) - 1) for i in range(len(parts))],
                       [len(p) for p in parts])
  return datasets.Sequences([t for p in parts for t in p.tokens], np.concatenate([p.prompt_lens for p in parts]),
                            part_ids if cfg.data.more_prompts and cfg.data.split_by_set else None,
                            build_s=sum(p.build_s for p in parts))


def final_hidden_states(model, params, seqs: datasets.Sequences, *, batch_size: int = 8, progress: bool = True,
                        advance: Callable[[int], None] | None = None) -> list[np.ndarray]:
  """The frozen target's final hidden states `[len, D]` for each sequence (one causal forward each).

  Row t is the state that predicts token t + 1. For an encoder-decoder a sequence is source + target (the prompt
  part is the encoder input): row `prompt_len - 1 + j` is the decoder's state at its input j (the start token,
  then the target's tokens), and the rows before it, inside the source, are zeros.
  """
  from jaxspec.decoding.generate import bucket

  if getattr(model, "is_encoder_decoder", False):
    return _encdec_hidden_states(model, params, seqs, batch_size=batch_size, progress=progress, advance=advance)

  @jax.jit
  def run(params, tokens_BxL):
    b, l = tokens_BxL.shape
    cache = jax.lax.optimization_barrier(model.init_cache(b, l))
    pos = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    _, hidden, _ = model.forward(params, tokens_BxL, pos, cache, jnp.tril(jnp.ones((l, l), bool)), logits=False)
    return hidden.astype(jnp.float32)

  order = sorted(range(len(seqs)), key=lambda i: len(seqs.tokens[i]))
  out: list[np.ndarray | None] = [None] * len(seqs)
  bar = tqdm(total=len(seqs), desc="hidden states", unit="seq", disable=not progress)
  for s in range(0, len(order), batch_size):
    idx = order[s:s + batch_size]
    l = bucket(max(len(seqs.tokens[i]) for i in idx), 32)
    arr = np.zeros((len(idx), l), np.int32)
    for r, i in enumerate(idx):
      arr[r, :len(seqs.tokens[i])] = seqs.tokens[i]
    h = np.asarray(run(params, jnp.asarray(arr)))
    for r, i in enumerate(idx):
      out[i] = h[r, :len(seqs.tokens[i])]
    bar.update(len(idx))
    if advance is not None:
      advance(len(idx))
  bar.close()
  return out


def cached_features(path: Path, model, params, seqs: datasets.Sequences, seq_len: int, *,
                    progress: bool = True) -> np.ndarray:
  """The target's final hidden states `[N, seq_len, D]` (float16, zeros past each end), cached in `path` and reused
  while the target is the same: each sequence the file already holds is taken from it, so added data computes only
  the added sequences; computed in parts that a killed run keeps (`training.rowcache`)."""

  cut = [np.asarray(t[:seq_len]) for t in seqs.tokens]
  key = json.dumps({"seq_len": seq_len, "target": repr(dataclasses.replace(model.cfg, scan_layers=False)),
                    "embed": target_fingerprint(params), "weights": weights_fingerprint(params),
                    **precision_key(model.cfg)}, sort_keys=True)

  def compute(idx: np.ndarray, advance) -> dict[str, np.ndarray]:
    part = datasets.Sequences([cut[i] for i in idx], np.asarray(seqs.prompt_lens)[idx])
    feats = np.zeros((len(idx), seq_len, model.cfg.d_model), np.float16)
    for r, h in enumerate(final_hidden_states(model, params, part, progress=False, advance=advance)):
      feats[r, :len(h)] = h
    return {"feats": feats}

  order = np.argsort([len(t) for t in cut], kind="stable")  # parts of similar lengths share compiled shapes
  return rowcache.cached_rows(path, key, order, compute, row_keys=[rowcache.sequence_key(t) for t in cut],
                              desc="hidden states", progress=progress)["feats"]


def _encdec_hidden_states(model, params, seqs: datasets.Sequences, *, batch_size: int, progress: bool,
                          advance: Callable[[int], None] | None) -> list[np.ndarray]:
  from jaxspec.decoding.generate import bucket

  run = jax.jit(lambda params, src, src_len, dec: model.teacher_forced(params, src, src_len, dec)[1])
  start = model.cfg.decoder_start_id
  out: list[np.ndarray] = []
  bar = tqdm(total=len(seqs), desc="hidden states", unit="seq", disable=not progress)
  for s in range(0, len(seqs), batch_size):
    rows = [(np.asarray(t), int(p)) for t, p in zip(seqs.tokens[s:s + batch_size], seqs.prompt_lens[s:s + batch_size])]
    sl, tl = bucket(max(p for _, p in rows)), bucket(max(len(t) - p + 1 for t, p in rows), 32)
    src, dec = np.zeros((len(rows), sl), np.int32), np.zeros((len(rows), tl), np.int32)
    for r, (t, p) in enumerate(rows):
      src[r, :p] = t[:p]
      dec[r, :len(t) - p + 1] = np.concatenate([[start], t[p:]])
    h = np.asarray(run(params, jnp.asarray(src), jnp.asarray([p for _, p in rows], jnp.int32), jnp.asarray(dec)),
                   np.float32)
    for r, (t, p) in enumerate(rows):
      out.append(np.concatenate([np.zeros((p - 1, h.shape[-1]), np.float32), h[r, :len(t) - p + 1]]))
    bar.update(len(rows))
    if advance is not None:
      advance(len(rows))
  bar.close()
  return out


@dataclasses.dataclass
class HeadExamples:
  """One example per position t: where h_t sits in `hidden_PxD` (the target's final hidden states of every position,
  one sequence after another), the next token x_{t+1} and the targets x_{t+1+i} (`-1` past the sequence end), the
  targets as indices into the heads' vocabulary. Row `index + i` is the state from which the target predicted
  x_{t+1+i}: with `teacher`, batches carry those rows so the loss can use the target's distribution there."""

  hidden_PxD: np.ndarray
  index_N: np.ndarray
  next_N: np.ndarray
  targets_NxK: np.ndarray
  teacher: bool = False

  def __len__(self):
    return len(self.next_N)

  def batch(self, idx) -> dict:
    pos = self.index_N[idx]
    out = {"hidden": self.hidden_PxD[pos].astype(np.float32), "next": self.next_N[idx],
           "targets": self.targets_NxK[idx]}
    if self.teacher:  # rows past a sequence's end belong to the next sequence; their targets are -1 (masked)
      rows = np.minimum(pos[:, None] + np.arange(1, self.targets_NxK.shape[1] + 1), len(self.hidden_PxD) - 1)
      out["teacher_hidden"] = self.hidden_PxD[rows].astype(np.float32)
    return out


def head_examples(seqs: datasets.Sequences, hidden: list[np.ndarray], k: int, vocab_ids: np.ndarray | None,
                  loss_on_prompt: bool = False, teacher: bool = False) -> HeadExamples:
  idx, nx, tg = [], [], []
  start = 0
  for toks, h, plen in zip(seqs.tokens, hidden, seqs.prompt_lens):
    n = len(toks)
    first = 0 if loss_on_prompt else max(int(plen) - 1, 0)
    ts = np.arange(first, n - 2)  # t + 2 <= n - 1: head 1 has a target
    if len(ts):
      off = ts[:, None] + 1 + np.arange(1, k + 1)[None]
      tg.append(np.where(off < n, toks[np.minimum(off, n - 1)], -1))
      idx.append(start + ts)
      nx.append(toks[ts + 1])
    start += n
  targets = np.concatenate(tg).astype(np.int64)
  if vocab_ids is not None:
    targets = subset_targets(np, vocab_ids, targets)
  return HeadExamples(np.concatenate([np.asarray(h)[:len(t)] for t, h in zip(seqs.tokens, hidden)]),
                      np.concatenate(idx).astype(np.int64), np.concatenate(nx).astype(np.int32),
                      targets.astype(np.int32), teacher)


def subset_targets(xp, vocab_ids, targets):
  """Token ids -> their rows in the sorted `vocab_ids` (the heads' output subset); -1 for padding; -2 for a token
  outside the subset (held-out text has some; so has new data for heads started from trained ones, `heads.init`),
  which gets no loss but counts as a miss in the accuracies and τ proxies (`head_metrics`). `xp` is numpy or
  jax.numpy."""
  pos = xp.minimum(xp.searchsorted(vocab_ids, xp.maximum(targets, 0)), len(vocab_ids) - 1)
  return xp.where(targets < 0, -1, xp.where(vocab_ids[pos] == targets, pos, -2))


# ---- objectives ----------------------------------------------------------------------------------------------

def head_metrics(logits_NxKxM: jax.Array, targets_NxK: jax.Array, teacher_NxKxM: jax.Array | None = None,
                 examples_N: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Mean loss over valid targets (summed over heads) and per-head loss / top-1 accuracy / τ proxy.

  The loss is cross-entropy against the data's tokens, or with `teacher_NxKxM` (the target's logits at the
  positions that predicted those tokens) against the target's distribution there. With a teacher, `agree_h{i}` is
  head i's top-1 agreement with the target's own top-1, the token greedy decoding accepts, and `tau_teacher` the τ
  proxy from it; on greedy data it equals the token accuracy, on sampled data it does not.

  The τ proxies are means over the examples: every row, or the rows `examples_N` marks (the joint objective's rows
  are every position of its batch, padding and prompt included, which are no examples).
  """
  valid = targets_NxK >= 0  # -1: padding; -2: a token the heads cannot name (`subset_targets`), a miss with no loss
  valid_K, scored_K = valid.sum(0), (targets_NxK != -1).sum(0)  # the targets of the losses, of the accuracies
  count_K = jnp.maximum(valid_K, 1)
  num_examples = targets_NxK.shape[0] if examples_N is None else jnp.maximum(examples_N.sum(), 1)
  per_example = lambda chains_NxK: chains_NxK.sum() / num_examples  # rows that are no example have no valid target
  guess = jnp.argmax(logits_NxKxM, -1)
  metrics = {}
  if teacher_NxKxM is None:
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_NxKxM, jnp.maximum(targets_NxK, 0))
  else:
    ce = optax.softmax_cross_entropy(logits_NxKxM, jax.nn.softmax(teacher_NxKxM, -1))
    agree = (guess == jnp.argmax(teacher_NxKxM, -1)) & valid
    agree_K = agree.sum(0) / count_K
    metrics.update({f"agree_h{i + 1}": agree_K[i] for i in range(agree_K.shape[0])})
    metrics["tau_teacher"] = 1.0 + per_example(jnp.cumprod(agree.astype(jnp.float32), axis=1))
  loss_K = jnp.where(valid, ce, 0).sum(0) / count_K
  right = (guess == targets_NxK) & valid
  acc_K = right.sum(0) / jnp.maximum(scored_K, 1)
  # Chains stop at the first wrong head; positions whose later targets run past the end count as stopping there.
  chain = jnp.cumprod(right.astype(jnp.float32), axis=1)
  metrics.update({f"loss_h{i + 1}": loss_K[i] for i in range(loss_K.shape[0])})
  metrics.update({f"acc_h{i + 1}": acc_K[i] for i in range(acc_K.shape[0])})
  metrics["tau_proxy"] = 1.0 + per_example(chain)
  # The units of each mean (`training.trainer`): examples, and per head its valid and its scored targets.
  metrics["count"] = targets_NxK.shape[0] if examples_N is None else examples_N.sum()
  # The loss sums the heads' means over their valid targets: a batch with none measures nothing (its loss is 0).
  metrics["count/loss"] = jnp.where(valid_K.sum() > 0, metrics["count"], 0)
  for i in range(loss_K.shape[0]):
    metrics.update({f"count/loss_h{i + 1}": valid_K[i], f"count/acc_h{i + 1}": scored_K[i]})
    if teacher_NxKxM is not None:
      metrics[f"count/agree_h{i + 1}"] = valid_K[i]
  return loss_K.sum(), metrics


def heads_loss(bpd: BPDModel):
  """Frozen-base objective on precomputed hidden states. `frozen` = {"proj_DxM", "embed_VxD"}; a batch with
  `teacher_hidden` (`[N, k, D]`, see `HeadExamples`) trains on the target's distributions instead of the tokens."""

  def loss_fn(params, frozen, batch, rng):
    emb = frozen["embed_VxD"][batch["next"]].astype(jnp.float32) if bpd.cfg.use_next_token else None
    states = bpd.head_states(params, batch["hidden"], emb)
    logits = jnp.einsum("nkd,dm->nkm", states, frozen["proj_DxM"])
    teacher = None
    if "teacher_hidden" in batch:
      teacher = jnp.einsum("nkd,dm->nkm", batch["teacher_hidden"], frozen["proj_DxM"])
    return head_metrics(logits, batch["targets"], teacher)

  return loss_fn


def joint_loss(model, bpd: BPDModel, base_weight: float):
  """Stern's setting: base + heads trained together; params = {"base": ..., "bpd": ...}; batch = {"tokens": [B, L],
  "mask": [B, L] (positions whose next token is trained on, as `training.draft.padded` makes it), "lengths": [B]
  (real tokens per row; the heads get no target past them)}. `frozen` = {"vocab_ids": [M]} or {}."""

  def loss_fn(params, frozen, batch, rng):
    from jaxspec.models.bpd import output_projection
    tokens = batch["tokens"]
    b, l = tokens.shape
    k = bpd.num_heads
    cache = jax.lax.optimization_barrier(model.init_cache(b, l))
    pos = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    logits_BxLxV, hidden, _ = model.forward(params["base"], tokens, pos, cache, jnp.tril(jnp.ones((l, l), bool)))
    mask = batch["mask"][:, :-1]
    base_ce = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV[:, :-1], tokens[:, 1:])
    base_loss = jnp.sum(base_ce * mask) / jnp.maximum(mask.sum(), 1)
    # Head i at t predicts t + 1 + i; the heads read h_t and x_{t+1}.
    h = hidden[:, :l - 1]
    emb = (model.input_table(params["base"])[tokens[:, 1:]].astype(jnp.float32) if bpd.cfg.use_next_token
           else None)
    states = bpd.head_states(params["bpd"], h, emb)  # [B, L-1, k, D]
    logits = jnp.einsum("blkd,dm->blkm", states, output_projection(model, params["base"], {**params["bpd"], **frozen}))
    idx = jnp.arange(l - 1)[:, None] + 1 + jnp.arange(1, k + 1)[None]  # [L-1, k]
    tgt = jnp.where(idx[None] < batch["lengths"][:, None, None], tokens[:, jnp.minimum(idx, l - 1)], -1)
    tgt = jnp.where(mask[:, :, None] > 0, tgt, -1)
    examples = tgt[:, :, 0] >= 0  # head 1 has a target: the positions the heads objective makes examples of
    if "vocab_ids" in frozen:
      tgt = subset_targets(jnp, frozen["vocab_ids"], tgt)
    head_loss, metrics = head_metrics(logits.reshape(b * (l - 1), k, -1), tgt.reshape(b * (l - 1), k),
                                      examples_N=examples.reshape(-1))
    metrics["base_loss"], metrics["count/base_loss"] = base_loss, mask.sum()
    metrics["count/loss"] = mask.sum()  # the base loss's positions: every example of the heads is one of them
    return base_weight * base_loss + head_loss, metrics

  return loss_fn


# ---- the run -------------------------------------------------------------------------------------------------

def check_bpd_settings(cfg: BPDTrainConfig) -> None:
  """The settings that do not go together, refused before any work (and by `jaxspec train CONFIG --check`)."""
  if cfg.train.objective == "joint" and cfg.train.targets == "teacher":
    raise ConfigError("train.targets=teacher distils the frozen target's distributions into the heads; with "
                      "train.objective=joint the base itself changes, so use train.targets=tokens there.")
  if cfg.train.objective == "heads" and (cfg.train.base_loss_weight != 1.0 or cfg.train.base_lr_scale != 1.0):
    raise ConfigError("train.base_loss_weight and train.base_lr_scale apply to train.objective=joint only; the "
                      "heads objective keeps the base frozen.")


def train_bpd(cfg: BPDTrainConfig, *, model=None, params=None, tokenizer=None, progress: bool = True) -> dict:
  """Builds the data (resumable), trains the heads (resumable from Orbax checkpoints) and exports them to
  `cfg.out`. Returns a summary: data size, final metrics, times."""
  from jaxspec.loading import load_model

  t_start = time.time()
  check_bpd_settings(cfg)
  mesh = sharding.make_mesh(cfg.mesh) if cfg.mesh is not None else None  # a bad mesh fails before any work
  if model is None:
    # On the mesh as each weight is read: a target that fits the mesh but not one device trains too.
    model, params, tokenizer = load_model(cfg.model.path, dtype=cfg.model.dtype,
                                          matmul_precision=cfg.model.matmul_precision, mesh=mesh)
  if cfg.train.objective == "joint" and getattr(model, "is_encoder_decoder", False):  # before the data
    raise ConfigError("train.objective=joint trains decoder-only models; use train.objective=heads for an "
                      "encoder-decoder.")
  # Heads to start from are read and checked against the run before the data is built (which can take an hour).
  initial = _initial_heads(cfg, model) if cfg.heads.init else None
  ckpt_dir = Path(cfg.train.checkpoint_dir)
  # checkpoints of another target are refused
  record_run_config(cfg, ckpt_dir, target=target_fingerprint(params), weights=weights_fingerprint(params))
  t0 = time.time()
  seqs = build_sequences(cfg, model, params, tokenizer, progress)
  data_s = time.time() - t0
  train_seqs, eval_seqs = seqs.split(cfg.data.eval_fraction, seed=cfg.train.seed)
  if not getattr(model, "is_encoder_decoder", False):  # (a T5 target's sequences are not cut to train.seq_len)
    datasets.check_targets({"training": train_seqs, "held-out": eval_seqs}, cfg.train.seq_len,
                           cfg.data.loss_on_prompt, need=2)  # head 1 learns token t + 2
  k = cfg.heads.num_heads
  # The tokens of the training sequences only: held-out text must not choose what the heads can name.
  vocab_ids = np.unique(np.concatenate(train_seqs.tokens)).astype(np.int32) if cfg.heads.vocab_subset else None
  bpd = BPDModel(BPDConfig(num_heads=k, d_model=model.cfg.d_model, d_hidden=cfg.heads.d_hidden,
                           use_next_token=cfg.heads.use_next_token,
                           vocab_subset=len(vocab_ids) if vocab_ids is not None else 0))
  rng = seed_key(cfg.train.seed)
  if initial is not None:
    bpd, bpd_params = initial
    vocab_ids = np.asarray(bpd_params["vocab_ids"]) if "vocab_ids" in bpd_params else None  # the heads' own rows
  else:
    bpd_params = bpd.init_params(rng, vocab_ids)
  optimizer = make_optimizer(cfg.optim, cfg.train.steps)
  t0 = time.time()
  features_build_s = None  # the cached hidden states' compute time, whichever process computed them
  if cfg.train.objective == "heads":
    from jaxspec.models.bpd import output_projection
    if getattr(model, "is_encoder_decoder", False):
      tr_hidden = final_hidden_states(model, params, train_seqs, progress=progress)
      ev_hidden = final_hidden_states(model, params, eval_seqs, progress=progress)
    else:  # cached in the checkpoint folder: a killed or repeated run does not recompute them
      l = cfg.train.seq_len
      train_seqs, eval_seqs = (datasets.Sequences([np.asarray(t[:l]) for t in s.tokens], s.prompt_lens)
                               for s in (train_seqs, eval_seqs))
      feats = cached_features(ckpt_dir / FEATURES_FILE, model, params,
                              datasets.Sequences(train_seqs.tokens + eval_seqs.tokens,
                                                 np.concatenate([train_seqs.prompt_lens, eval_seqs.prompt_lens])),
                              l, progress=progress)
      features_build_s = round(rowcache.compute_seconds(ckpt_dir / FEATURES_FILE), 1)
      hidden = [feats[i, :len(t)] for i, t in enumerate(train_seqs.tokens + eval_seqs.tokens)]
      tr_hidden, ev_hidden = hidden[:len(train_seqs)], hidden[len(train_seqs):]
    teach = cfg.train.targets == "teacher"
    tr = head_examples(train_seqs, tr_hidden, k, vocab_ids, cfg.data.loss_on_prompt, teach)
    ev = head_examples(eval_seqs, ev_hidden, k, vocab_ids, cfg.data.loss_on_prompt, teach)
    frozen = {"proj_DxM": output_projection(model, params, bpd_params), "embed_VxD": model.input_table(params)}
    loss = heads_loss(bpd)
    bs = cfg.train.batch_size

    batches_from, eval_batches = datasets.batch_sources(tr, ev, bs, cfg.train.seed)

    trainable = {"heads": bpd_params["heads"]}
  else:
    frozen = {"vocab_ids": bpd_params["vocab_ids"]} if "vocab_ids" in bpd_params else {}
    loss = joint_loss(model, bpd, cfg.train.base_loss_weight)
    from training.draft import padded
    tr_tok, tr_mask, _ = padded(train_seqs, cfg.train.seq_len, cfg.data.loss_on_prompt)
    ev_tok, ev_mask, _ = padded(eval_seqs, cfg.train.seq_len, cfg.data.loss_on_prompt)
    tr_len, ev_len = (np.asarray([min(len(t), cfg.train.seq_len) for t in s.tokens], np.int32)
                      for s in (train_seqs, eval_seqs))
    bs = cfg.train.batch_size

    def batches_from(step):
      for idx in datasets.iterate_positions(len(tr_tok), bs, cfg.train.seed, step):
        yield {"tokens": tr_tok[idx], "mask": tr_mask[idx], "lengths": tr_len[idx]}

    def eval_batches():
      for s in range(0, len(ev_tok), bs):
        yield {"tokens": ev_tok[s:s + bs], "mask": ev_mask[s:s + bs], "lengths": ev_len[s:s + bs]}

    # Copies: the train step donates its state, and the caller keeps using the model's own params.
    trainable = {"base": jax.tree.map(jnp.array, params), "bpd": {"heads": bpd_params["heads"]}}
    if cfg.train.base_lr_scale != 1.0:  # the base's updates scaled after AdamW: its learning rate times the scale
      optimizer = optax.chain(optimizer, optax.masked(optax.scale(cfg.train.base_lr_scale),
                                                      {"base": True, "bpd": False}))
  prep_s = time.time() - t0
  trainer = Trainer(loss, optimizer, frozen=frozen, checkpoint_dir=ckpt_dir,
                    checkpoint_every=cfg.train.checkpoint_every, log_every=cfg.train.log_every, progress=progress,
                    mesh=sharding.partitioner(mesh, model))
  state = init_state(trainable, optimizer, cfg.train.seed)
  # "before": the heads as they start (fresh, or heads.init's) on the untouched base, on the same held-out set
  init_eval = {"step": 0, **trainer.initial_evaluation(state, eval_batches, starting_point_key(cfg))}
  state, history = trainer.fit(state, batches_from, cfg.train.steps, eval_batches=eval_batches,
                               eval_every=cfg.train.eval_every)
  train_s = trainer.fit_s  # summed over a killed run's processes, as resumed
  final_eval = trainer.final_evaluation(state, history, eval_batches)
  out_params = dict(bpd_params)
  base_params = params  # the target the heads go with: the frozen one, or the base tuned with them
  if cfg.train.objective == "heads":
    out_params["heads"] = sharding.fetch(state.params["heads"])  # also gathers across hosts
  else:
    out_params["heads"] = sharding.fetch(state.params["bpd"]["heads"])
    from jaxspec.loading.hf import save_hf
    base_params = sharding.fetch(state.params["base"])
    save_hf(str(Path(cfg.out) / "base"), model, base_params)
    if hasattr(tokenizer, "save"):  # a model folder `jaxspec ... --model OUT/base` loads
      tokenizer.save(Path(cfg.out) / "base")
  summary = {"sequences": len(seqs), "tokens": seqs.num_tokens, "train_examples": len(tr) if cfg.train.objective ==
             "heads" else len(tr_tok), "vocab_subset": int(bpd.cfg.vocab_subset), "data_s": round(data_s, 1),
             "data_build_s": round(seqs.build_s, 1), "features_build_s": features_build_s,
             "prep_s": round(prep_s, 1), "train_s": round(train_s, 1), "total_s": round(time.time() - t_start, 1),
             "init_eval": {k: float(v) for k, v in init_eval.items()},
             "final_eval": {k: float(v) for k, v in final_eval.items()}, "config": to_dict(cfg)}
  save_bpd(cfg.out, bpd, out_params,
           meta={"target": {"embed_fingerprint": target_fingerprint(base_params)}, "training": summary})
  return summary


def _initial_heads(cfg: BPDTrainConfig, model) -> tuple[BPDModel, dict]:
  """The first num_heads of the trained heads in `heads.init`, checked against the config and the target."""
  from jaxspec.models.bpd import load_bpd
  bpd, params = load_bpd(cfg.heads.init, num_heads=cfg.heads.num_heads)
  want = {"d_model": model.cfg.d_model, "d_hidden": cfg.heads.d_hidden, "use_next_token": cfg.heads.use_next_token,
          "vocab_subset": cfg.heads.vocab_subset}
  got = {"d_model": bpd.cfg.d_model, "d_hidden": bpd.cfg.d_hidden, "use_next_token": bpd.cfg.use_next_token,
         "vocab_subset": bool(bpd.cfg.vocab_subset)}
  diff = [f"{k}={got[k]} (config/target: {want[k]})" for k in want if got[k] != want[k]]
  if diff:
    raise ConfigError(f"heads.init={cfg.heads.init!r} does not fit this run: {', '.join(diff)}. Set the heads "
                      "section to match those heads, or drop heads.init.")
  return bpd, {k: (jax.tree.map(jnp.array, v) if k == "heads" else v) for k, v in params.items()}


def load_bpd_config(path, overrides=()) -> BPDTrainConfig:
  return load_config(path, BPDTrainConfig, overrides)


TASKS = {"bpd": (BPDTrainConfig, train_bpd)}


def main_train(path: str, overrides=(), progress: bool = True) -> dict:
  """`jaxspec train CONFIG [key=value ...]`: the `task` key of the file picks the run."""
  from training.config import read_config_file
  raw = read_config_file(path)
  task = raw.get("task", "bpd")
  if task not in TASKS:
    raise ConfigError(f"unknown task {task!r} in {path}; tasks: {', '.join(TASKS)}")
  cls, fn = TASKS[task]
  cfg = load_config(path, cls, overrides)
  summary = fn(cfg, progress=progress)
  print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))
  return summary
