"""Training a feature-level draft (EAGLE, Li et al. 2024) for the target: `jaxspec train configs/eagle_smollm2.yaml`.

Data: the self-distillation sequences of the BPD run (`training.bpd.build_sequences`, the same dataset folder by
default) and the frozen target's final hidden states over them, computed once and cached next to the checkpoints.

The draft (`jaxspec.models.eagle.EagleDraft`) reads at entry t the target's feature f_t and the token x_{t+1} and
predicts f_{t+1}; the target's output rows turn a feature into the distribution of x_{t+2}. Losses at every entry
whose x_{t+2} is a generated token:

  kl       KL(p || q) between the target's distribution p = softmax(f_{t+1} Wᵀ) and the draft's q, both over the
           draft's vocabulary (the tokens of the training data)
  feature  smooth-L1 distance between the predicted and the true f_{t+1}, per dimension

Where this differs from EAGLE's reference code: it weights the feature regression 1.0 and the token loss 0.1 (a
cross-entropy over the whole vocabulary) and adds uniform noise to the input features; here the token term leads
(`kl_weight` 1.0, `feature_weight` 0.1, over the draft's vocabulary, which is all it can propose) and there is no
noise by default (`objective.feature_noise`). The draft block also keeps its input norm and ends in a final norm
(`jaxspec.models.eagle`), where the reference's first layer has neither: its prediction lives in the target's
post-norm feature space, which is what the target's output rows read. The weights are options; the shipped draft
was trained with the ones above.

Unrolled training ("training-time test"). At decode time only the first draft token comes from an entry built on a
true feature; token i comes from an entry whose feature the draft predicted i - 1 entries earlier, attending to the
true entries before the step and to its own earlier predictions. `objective.unroll` = U trains exactly that: pass 1
runs every entry on true features (causal attention); pass s runs every entry t on the feature pass s - 1 predicted
at t - 1 and attends to pass-1 entries up to t - s + 1, to the pass-r entry at t - s + r (1 < r < s) and to itself.
So pass s at entry t sees what draft token s sees when the step starts at entry t - s + 1, and the metric
`tau_proxy` (expected tokens per target call of greedy speculation with γ = U, from the per-pass agreement on the
target's own greedy text) is an estimate of τ. `tests/test_eagle.py` checks pass s against the decode loop's draft.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import sharding
from jaxspec.decoding.sampling import seed_key
from jaxspec.models.draft import embed_fingerprint, weights_fingerprint
from jaxspec.models.eagle import EagleDraft, own_params, save_eagle
from training import datasets, rowcache
from training.bpd import FEATURES_FILE, DataSection, ModelSection, build_sequences, cached_features
from training.config import ConfigError, record_run_config, load_config, starting_point_key, to_dict
from training.draft import TrainSection, padded, train_vocab
from training.trainer import OptimConfig, Trainer, init_state, make_optimizer

@dataclasses.dataclass(frozen=True)
class EagleSection:
  n_layers: int = 1
  init: Literal["target_last", "random"] = "target_last"  # blocks from the target's last layers, norm from its final
  export_dtype: Literal["float32", "bfloat16"] = "bfloat16"

  def __post_init__(self):
    if self.n_layers < 1:
      raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")


@dataclasses.dataclass(frozen=True)
class ObjectiveSection:
  unroll: int = 3  # U passes (draft tokens 1..U trained as decoding sees them)
  kl_weight: float = 1.0
  feature_weight: float = 0.1
  feature_noise: float = 0.0  # uniform noise of this half-width added to the true input features (EAGLE's)

  def __post_init__(self):
    if self.unroll < 1:
      raise ValueError(f"unroll must be >= 1, got {self.unroll}")
    if self.kl_weight < 0 or self.feature_weight < 0 or self.kl_weight + self.feature_weight == 0:
      raise ValueError(f"kl_weight and feature_weight must be >= 0 and not both 0, got {self.kl_weight} and "
                       f"{self.feature_weight}")
    if self.feature_noise < 0:
      raise ValueError(f"feature_noise must be >= 0, got {self.feature_noise}")


@dataclasses.dataclass(frozen=True)
class EagleTrainConfig:
  task: Literal["eagle"] = "eagle"
  out: str = "jaxspec/assets/eagle_smollm2"
  model: ModelSection = ModelSection()  # the target
  eagle: EagleSection = EagleSection()
  data: DataSection = DataSection(dataset_dir="runs/bpd_smollm2/data")  # shared with the BPD and draft runs
  objective: ObjectiveSection = ObjectiveSection()
  optim: OptimConfig = OptimConfig(lr=1e-3, warmup_steps=50)
  train: TrainSection = TrainSection(steps=600, checkpoint_dir="runs/eagle_smollm2/ckpt", checkpoint_every=100,
                                     eval_every=100)  # checkpoint_dir also holds the cached target features
  mesh: Optional[str] = None  # train sharded, e.g. "data=2,model=1" (jaxspec.sharding); None: one device


def load_eagle_config(path, overrides=()) -> EagleTrainConfig:
  return load_config(path, EagleTrainConfig, overrides)


# ---- data ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class EagleData:
  """Sequences cut/padded to L, the train mask of `training.draft.padded` and the target's features `[N, L, D]`."""

  tokens_NxL: np.ndarray
  mask_NxL: np.ndarray
  feats_NxLxD: np.ndarray

  def __len__(self) -> int:
    return len(self.tokens_NxL)

  def batch(self, idx) -> dict:
    return {"tokens": self.tokens_NxL[idx], "mask": self.mask_NxL[idx],
            "feats": self.feats_NxLxD[idx].astype(np.float32)}


# ---- the objective -------------------------------------------------------------------------------------------

def pass_masks(l: int, s: int) -> tuple[np.ndarray, np.ndarray | None]:
  """`(mask_LxL among pass s's own entries, cache_mask_LxS over passes 1..s-1 laid out pass by pass, S = (s-1) L)`.

  Pass 1: causal, no cache. Pass s > 1: each entry sees itself; in the cache, pass-1 entries j <= t - s + 1 and the
  pass-r entry at t - s + r for 1 < r < s.
  """
  t = np.arange(l)[:, None]
  j = np.arange(l)[None, :]
  if s == 1:
    return j <= t, None
  blocks = [j <= t - s + 1] + [j == t - s + r for r in range(2, s)]
  return np.eye(l, dtype=bool), np.concatenate(blocks, axis=1)


def smooth_l1(x: jax.Array) -> jax.Array:
  a = jnp.abs(x)
  return jnp.where(a < 1.0, 0.5 * x * x, a - 0.5)


def unrolled_outputs(draft: EagleDraft, params, feats_BxLxD, next_BxL, unroll: int):
  """The predicted features `[U, B, L, D]` of passes 1..U (see the module docstring); gradients do not flow from a
  pass into the next one's input features."""
  b, l, _ = feats_BxLxD.shape
  cache = jax.lax.optimization_barrier(draft.init_cache(b, unroll * l))
  pos_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  feats_in, outs = feats_BxLxD, []
  for s in range(1, unroll + 1):
    own, seen = pass_masks(l, s)
    cache_mask = None
    if seen is not None:
      cap = np.zeros((l, unroll * l), bool)
      cap[:, :seen.shape[1]] = seen
      cache_mask = jnp.broadcast_to(jnp.asarray(cap), (b, l, unroll * l))
    out, cache = draft.forward(params, feats_in, next_BxL, pos_BxL, cache, jnp.broadcast_to(jnp.asarray(own),
                                                                                         (b, l, l)), cache_mask)
    cache = cache.advance(jnp.full((b,), l, jnp.int32))
    outs.append(out)
    feats_in = jax.lax.stop_gradient(jnp.concatenate([jnp.zeros_like(out[:, :1]), out[:, :-1]], axis=1))
  return jnp.stack(outs)


def eagle_loss(draft: EagleDraft, objective: ObjectiveSection):
  """`loss_fn(trainable, frozen, batch, rng)` for the Trainer; batch = `EagleData.batch(...)`."""
  u = objective.unroll

  def loss_fn(trainable, frozen, batch, rng):
    params = {**frozen, **trainable}
    tokens, feats, mask = batch["tokens"], batch["feats"], batch["mask"]
    b, l = tokens.shape
    shift = lambda x: jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)
    next_BxL = shift(tokens)  # x_{t+1}
    target_BxLxD = shift(feats)  # f_{t+1}
    w_BxL = shift(mask)  # entry t is trained when x_{t+2} is
    logp_BxLxM = jax.nn.log_softmax(draft.subset_logits(params, target_BxLxD), axis=-1)
    p_BxLxM = jnp.exp(logp_BxLxM)
    best_BxL = jnp.argmax(logp_BxLxM, axis=-1)
    inputs = feats
    if objective.feature_noise > 0:
      inputs = feats + jax.random.uniform(rng, feats.shape, minval=-objective.feature_noise,
                                          maxval=objective.feature_noise)
    outs = unrolled_outputs(draft, params, inputs, next_BxL, u)
    metrics, loss, agree = {}, 0.0, []
    t_L = jnp.arange(l)
    for s in range(1, u + 1):
      out = outs[s - 1]
      valid = w_BxL * (t_L >= s - 1)[None]
      count = jnp.maximum(valid.sum(), 1.0)
      mean = lambda x, valid=valid, count=count: jnp.sum(x * valid) / count
      logq = jax.nn.log_softmax(draft.subset_logits(params, out), axis=-1)
      kl = mean(jnp.sum(p_BxLxM * (logp_BxLxM - logq), axis=-1))
      feat = mean(jnp.mean(smooth_l1(out - target_BxLxD), axis=-1))
      a = (jnp.argmax(logq, axis=-1) == best_BxL).astype(jnp.float32) * valid
      agree.append(a)
      loss = loss + objective.kl_weight * kl + objective.feature_weight * feat
      metrics.update({f"kl_{s}": kl, f"feature_{s}": feat, f"agree_{s}": mean(a)})
      metrics.update({f"count/{name}_{s}": valid.sum() for name in ("kl", "feature", "agree")})
    # Draft token i of a step whose first draft comes from entry t0 is pass i at entry t0 + i - 1.
    run, accepted = jnp.ones_like(w_BxL), 0.0
    count0 = jnp.maximum(w_BxL.sum(), 1.0)
    for i, a in enumerate(agree):
      run = run * jnp.concatenate([a[:, i:], jnp.zeros((b, i), a.dtype)], axis=1)
      accepted = accepted + jnp.sum(run * w_BxL) / count0
    metrics["tau_proxy"] = 1.0 + accepted
    metrics["count"] = w_BxL.sum()  # the trained entries (the loss and the τ proxy)
    return loss / u, metrics

  return loss_fn


# ---- the run ---------------------------------------------------------------------------------------------------

def train_eagle(cfg: EagleTrainConfig, *, model=None, params=None, tokenizer=None, progress: bool = True) -> dict:
  """Builds (or reuses) the data and the target's features, trains the draft (resumable from Orbax checkpoints) and
  exports it to `cfg.out`. Returns a summary: data size, eval before and after, times."""
  from jaxspec.loading import load_model
  from jaxspec.models.llama import LlamaLM

  t_start = time.time()
  mesh = sharding.make_mesh(cfg.mesh) if cfg.mesh is not None else None  # a bad mesh fails before any work
  if model is None:
    # On the mesh as each weight is read: a target that fits the mesh but not one device trains too.
    model, params, tokenizer = load_model(cfg.model.path, dtype=cfg.model.dtype,
                                          matmul_precision=cfg.model.matmul_precision, mesh=mesh)
  if not isinstance(model, LlamaLM):
    raise ConfigError(f"task eagle trains a feature-level draft for a decoder-only LLaMA-family target; "
                      f"{cfg.model.path!r} is a {type(model).__name__}. For an encoder-decoder (T5) target, train BPD "
                      "heads (task bpd, as configs/bpd_t5_numbers.yaml does) or a smaller T5 as its draft (task "
                      "seq2seq, configs/t5_numbers_draft.yaml).")
  if model.cfg.scan_layers:
    raise ConfigError("task eagle reads the target's per-layer params: load it without stacked layers "
                      "(scan_layers=False).")
  if cfg.eagle.init == "target_last" and cfg.eagle.n_layers > model.cfg.n_layers:
    raise ConfigError(f"eagle.n_layers={cfg.eagle.n_layers} is more than the target's {model.cfg.n_layers} layers, "
                      f"whose last ones eagle.init=target_last starts the draft from: set "
                      f"eagle.n_layers={model.cfg.n_layers} or fewer, or eagle.init=random")
  ckpt_dir = Path(cfg.train.checkpoint_dir)
  # checkpoints of another target are refused, and an export for another one in `out` (which records the
  # embedding alone, `save_eagle`)
  record_run_config(cfg, ckpt_dir, target=embed_fingerprint(params),
                    export_target=embed_fingerprint({"embed": params["embed"]}), weights=weights_fingerprint(params))
  t0 = time.time()
  seqs = build_sequences(cfg, model, params, tokenizer, progress)
  data_s = time.time() - t0
  train_seqs, eval_seqs = seqs.split(cfg.data.eval_fraction, seed=cfg.train.seed)
  datasets.check_targets({"training": train_seqs, "held-out": eval_seqs}, cfg.train.seq_len,
                         cfg.data.loss_on_prompt)
  l = cfg.train.seq_len
  tr_tok, tr_mask, tr_cut = padded(train_seqs, l, cfg.data.loss_on_prompt)
  ev_tok, ev_mask, ev_cut = padded(eval_seqs, l, cfg.data.loss_on_prompt)
  t0 = time.time()
  feats = cached_features(ckpt_dir / FEATURES_FILE, model, params,
                          datasets.Sequences(train_seqs.tokens + eval_seqs.tokens,
                                             np.concatenate([train_seqs.prompt_lens, eval_seqs.prompt_lens])),
                          l, progress=progress)
  features_s = time.time() - t0
  n_tr = len(tr_tok)
  tr = EagleData(tr_tok, tr_mask, feats[:n_tr])
  ev = EagleData(ev_tok, ev_mask, feats[n_tr:])

  f32 = dataclasses.replace(model.cfg, dtype="float32", param_dtype="float32")
  draft = EagleDraft(f32, cfg.eagle.n_layers)
  all_params = draft.init_params(seed_key(cfg.train.seed), params, train_vocab(train_seqs), cfg.eagle.init)
  trainable = own_params(all_params)
  frozen = {k: v for k, v in all_params.items() if k not in trainable}
  optimizer = make_optimizer(cfg.optim, cfg.train.steps)
  batches_from, eval_batches = datasets.batch_sources(tr, ev, cfg.train.batch_size, cfg.train.seed)
  # Held-out figures on the features as decoding gives them: the training noise (objective.feature_noise) left out,
  # else they moved with train.seed.
  trainer = Trainer(eagle_loss(draft, cfg.objective), optimizer, frozen=frozen, checkpoint_dir=ckpt_dir,
                    checkpoint_every=cfg.train.checkpoint_every, log_every=cfg.train.log_every, progress=progress,
                    mesh=sharding.partitioner(mesh, model),
                    eval_fn=eagle_loss(draft, dataclasses.replace(cfg.objective, feature_noise=0.0)))
  state = init_state(trainable, optimizer, cfg.train.seed)
  init_eval = trainer.initial_evaluation(state, eval_batches, starting_point_key(cfg))
  state, history = trainer.fit(state, batches_from, cfg.train.steps, eval_batches=eval_batches,
                               eval_every=cfg.train.eval_every)
  train_s = trainer.fit_s  # summed over a killed run's processes, as resumed
  final_eval = trainer.final_evaluation(state, history, eval_batches)
  summary = {"sequences": len(seqs), "tokens": seqs.num_tokens, "train_sequences": len(tr),
             "eval_sequences": len(ev), "truncated_sequences": int(tr_cut + ev_cut),
             "trainable_params": int(sum(x.size for x in jax.tree.leaves(trainable))),
             "vocab": int(frozen["vocab_ids"].shape[0]),
             "data_s": round(data_s, 1), "data_build_s": round(seqs.build_s, 1),
             "features_s": round(features_s, 1),
             "features_build_s": round(rowcache.compute_seconds(ckpt_dir / FEATURES_FILE), 1),
             "train_s": round(train_s, 1),
             "total_s": round(time.time() - t_start, 1),
             "init_eval": {k: float(v) for k, v in init_eval.items()},
             "final_eval": {k: float(v) for k, v in final_eval.items() if k != "step"}, "config": to_dict(cfg)}
  save_eagle(cfg.out, draft, {**frozen, **sharding.fetch(state.params)}, dtype=cfg.eagle.export_dtype,
             meta={"training": summary})
  return summary
