"""The lattice rescorers of `bpd-ngram` and `bpd-neural` (Kim et al. 2024): build the n-gram LM, tune the weights.

`jaxspec train configs/bpd_rescore_smollm2.yaml`:
1. the self-distilled dataset of the BPD heads (the target's greedy continuations of the training prompts; built and
   resumable as for `bpd`, shared when `data.dataset_dir` is the same folder);
2. the same train / held-out split the heads were trained with (`data.eval_fraction`, `split_seed`): the n-gram LM
   is counted on the training part only;
3. the interpolation weights tuned on the held-out prompts, which neither the heads nor the n-gram LM have seen: each
   candidate weight decodes them with the rescored drafts and the weight with the best block efficiency (tokens per
   target call) wins; every tuning run is also checked against greedy decoding;
4. `out/ngram.safetensors` and `out/config.json` (order, counts, the tuned weights and the tuning table).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Literal, Optional

from tqdm.auto import tqdm

from jaxspec import files
from jaxspec.loading.tokenizer import end_ids
from jaxspec.models.ngram import MAX_ORDER
from training import datasets
from training.bpd import BPDTrainConfig, DataSection, ModelSection, build_sequences
from training.config import ConfigError, load_config, to_dict


@dataclasses.dataclass(frozen=True)
class NgramSection:
  order: int = 4

  def __post_init__(self):
    if not 2 <= self.order <= MAX_ORDER:  # (the n-gram model refused it after the target's data was built)
      raise ValueError(f"order must be in 2..{MAX_ORDER} (the n-gram orders the rescorer decodes with), got "
                       f"{self.order}")


@dataclasses.dataclass(frozen=True)
class TuneSection:
  k: int = 4  # heads used
  top_t: int = 16  # lattice width
  beams: int = 4  # n-gram drafts verified per step (as a tree)
  width: int = 0  # partial paths the n-gram beam search keeps per column (0: beams; top_t^(k-1): exhaustive)
  weights: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7)  # n-gram weights tried
  neural: bool = True  # also tune the neural rescorer
  # The neural LM: a distilled-draft folder (None: the shipped jaxspec/assets/draft_smollm2) or "layerskip" (the
  # target's first `neural_layers` layers, untrained).
  neural_draft: Optional[str] = None
  neural_layers: int = 4
  neural_weights: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8)
  max_new_tokens: int = 64
  batch_size: int = 16

  def __post_init__(self):
    for name in ("k", "neural_layers"):  # (a run refused them only once its target had loaded)
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if not 1 <= self.beams <= self.top_t:
      raise ValueError(f"beams must be in 1..top_t ({self.top_t}), got {self.beams}")
    if self.width and self.width < self.beams:
      raise ValueError(f"width (partial paths the search keeps) must be 0 or at least beams ({self.beams}), got "
                       f"{self.width}")
    for name in ("weights", "neural_weights"):  # (else refused by the first decode with it, after the data was built)
      bad = [w for w in getattr(self, name) if not 0.0 <= w <= 1.0]
      if bad or not (getattr(self, name) or (name == "neural_weights" and not self.neural)):
        raise ValueError(f"{name} are the LM's shares of each draft's score, each in 0..1 (and at least one), got "
                         f"{list(getattr(self, name))}")


@dataclasses.dataclass(frozen=True)
class RescoreConfig:
  task: Literal["rescore"] = "rescore"
  out: str = "runs/rescore"  # ngram.safetensors + config.json
  heads: Optional[str] = None  # BPD heads folder; None: jaxspec/assets/bpd_smollm2
  split_seed: int = 0  # with data.eval_fraction: the heads' train / held-out split (their `train.seed`)
  model: ModelSection = ModelSection()
  data: DataSection = DataSection()
  ngram: NgramSection = NgramSection()
  tune: TuneSection = TuneSection()


class TuneLog:
  """What a tuning run has finished, appended line by line to a JSONL file, so a killed run resumes where it was.

  Every record carries `key`, a hash of everything that decides the figures (the config less the weight lists, the
  held-out prompts, the heads' files): records of another key are ignored, and a file cut short by a kill loses at
  most its last line.
  """

  def __init__(self, path: Path | None, key: str):
    self.path, self.key, self.done = path, key, {}
    if path is None or not path.is_file():
      return
    with open(path, "rb+") as f:  # a line a kill cut short: end it, so the next record starts a line
      if f.seek(0, os.SEEK_END):
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
          f.write(b"\n")
    records, _ = files.read_jsonl(path)  # a line cut short or damaged is skipped: its figure is measured again
    for rec in records:
      if (isinstance(rec, dict) and rec.get("key") == key and isinstance(rec.get("what"), str) and "value" in rec
          and isinstance(rec.get("weight"), (int, float, type(None)))):
        self.done[(rec["what"], rec.get("weight"))] = rec["value"]

  def get(self, what: str, weight: float | None = None):
    return self.done.get((what, weight))

  def put(self, what: str, value, weight: float | None = None) -> None:
    self.done[(what, weight)] = value
    if self.path is None:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps({"key": self.key, "what": what, "weight": weight, "value": value}) + "\n")
      f.flush()
      os.fsync(f.fileno())


def tune_weight(model, params, prompts, eos_ids, pad_id, make, weights, greedy_tokens, max_new_tokens: int,
                batch_size: int, desc: str, progress: bool, log: TuneLog | None = None) -> list[dict]:
  """Block efficiency of the rescored drafts per weight on `prompts` (the weight is runtime data: one compile).

  `make(weight) -> (drafter, draft_params)`. Raises AssertionError if any output differs from greedy decoding.
  Weights `log` already holds are not run again.
  """
  from jaxspec.decoding.generate import generate

  log = log or TuneLog(None, "")
  rows = []
  bar = tqdm(total=len(weights) * len(prompts), desc=desc, unit="prompt", disable=not progress, leave=False)
  for w in weights:
    if (row := log.get(desc, float(w))) is not None:
      rows.append(row)
      bar.update(len(prompts))
      continue
    drafter, dp = make(w)
    steps = calls = 0
    t0 = time.perf_counter()
    for s in range(0, len(prompts), batch_size):
      batch = prompts[s:s + batch_size]
      res = generate(model, params, batch, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                     drafter=drafter, draft_params=dp)
      if res.tokens != greedy_tokens[s:s + batch_size]:
        raise AssertionError(f"{desc}: rescored BPD differs from greedy decoding at weight {w}")
      steps += sum(res.step_tokens)
      calls += sum(res.active_calls)
      bar.update(len(batch))
    if not calls:
      raise ConfigError("tuning ran no verify step (every answer ended after its first token): raise "
                        "data.max_new_tokens.")
    rows.append({"weight": float(w), "tau": steps / calls, "seconds": round(time.perf_counter() - t0, 1)})
    log.put(desc, rows[-1], float(w))
  bar.close()
  return rows


def _check_split(cfg, heads: Path) -> None:
  """`ConfigError` where the heads' recorded training split (their config.json's `train.seed` and
  `data.eval_fraction`) is not this run's: the weights would be tuned on prompts the heads were trained on."""
  try:
    recorded = json.loads((heads / "config.json").read_text(encoding="utf-8"))["training"]["config"]
    seed, fraction = recorded["train"]["seed"], recorded["data"]["eval_fraction"]
  except (OSError, ValueError, KeyError, TypeError):
    return  # heads without a recorded run (saved by hand): nothing to compare
  if (seed, fraction) != (cfg.split_seed, cfg.data.eval_fraction):
    raise ConfigError(f"the heads in {heads} were trained with train.seed={seed} and data.eval_fraction={fraction}, "
                      f"this run splits with split_seed={cfg.split_seed} and data.eval_fraction="
                      f"{cfg.data.eval_fraction}: its held-out prompts would include prompts the heads were trained "
                      f"on. Set split_seed={seed} data.eval_fraction={fraction}.")


def train_rescore(cfg: RescoreConfig, *, model=None, params=None, tokenizer=None, progress: bool = True) -> dict:
  """Builds the n-gram LM and tunes both rescorers' weights; writes `cfg.out`. Returns a summary."""
  import jax.numpy as jnp

  from jaxspec.bench.methods import (DEFAULT_BPD_HEADS, DEFAULT_DRAFT, BenchContext, Unavailable, saved_num_heads,
                                     rescore_lm)
  from jaxspec.decoding.bpd import bpd_draft_params
  from jaxspec.decoding.generate import generate
  from jaxspec.decoding.lattice import LatticeDrafter, lattice_draft_params
  from jaxspec.decoding.speculative import DraftModelDrafter
  from jaxspec.errors import InputError, ModelLoadError
  from jaxspec.loading import load_model
  from jaxspec.models.bpd import load_bpd
  from jaxspec.models.ngram import build_ngram, save_ngram

  t_start = time.time()
  if model is None:
    model, params, tokenizer = load_model(cfg.model.path, dtype=cfg.model.dtype,
                                                  matmul_precision=cfg.model.matmul_precision)
  tc = cfg.tune
  # The heads and the neural LM are checked against the target before the data and the n-gram LM are built.
  heads = Path(cfg.heads) if cfg.heads else DEFAULT_BPD_HEADS
  shipped_heads = heads.resolve() == DEFAULT_BPD_HEADS.resolve()
  what = "heads" if cfg.heads else "heads (null: the shipped jaxspec/assets/bpd_smollm2, for the default model)"
  have = saved_num_heads(heads)
  if have is not None and tc.k > have:
    raise ConfigError(f"tune.k={tc.k} asks for {tc.k} heads; the heads in {heads} have {have}: lower tune.k.")
  try:
    bpd, bpd_params = load_bpd(heads, tc.k, target_params=params)
    bdp = bpd_draft_params(model, params, bpd, bpd_params)
  except (ModelLoadError, InputError) as e:
    raise ConfigError(f"{what}: {str(e).rstrip('.')}. Set heads= to a folder of BPD heads trained for this model.") \
        from None
  _check_split(cfg, heads)  # (heads of this target: of another, that is what to say first)
  if tc.neural:
    # Recorded as `neural_lm`; bpd-neural loads the same LM from it through the same function, from any folder
    # (a path in the recorded config is whole; the shipped draft is named "default", wherever jaxspec is installed).
    layerskip = tc.neural_draft == "layerskip"
    neural_lm = ("default" if tc.neural_draft is None or Path(tc.neural_draft).resolve() == DEFAULT_DRAFT.resolve()
                 else f"layerskip:{tc.neural_layers}" if layerskip else str(Path(tc.neural_draft).resolve()))
    try:
      draft, draft_params = rescore_lm(BenchContext(model, params, tokenizer),
                                       {"neural_lm": neural_lm, "neural_layers": tc.neural_layers})
    except (Unavailable, ModelLoadError, InputError) as e:
      key = ("tune.neural_layers" if layerskip else
             "tune.neural_draft (null: the shipped jaxspec/assets/draft_smollm2, for the default model)"
             if neural_lm == "default" else "tune.neural_draft")
      from jaxspec.decoding.speculative import decoder_layers
      deep = decoder_layers(model) > 1  # a 1-layer model has no first layers to skip to
      trained = ("a smaller T5 trained on the same task (task: seq2seq)" if getattr(model, "is_encoder_decoder", False)
                 else "a draft trained for this model (task: draft)")
      fix = (("Set tune.neural_layers below the model's layers, or " if deep else "Set ")
             + f"tune.neural_draft to {trained}, or tune.neural=false."
             if layerskip else
             f"Set tune.neural_draft to {trained}, or to layerskip, or tune.neural=false.")
      raise ConfigError(f"{key}: {str(e).rstrip('.')}. {fix}") from None
  seqs = build_sequences(BPDTrainConfig(data=cfg.data), model, params, tokenizer, progress)
  train_seqs, held = seqs.split(cfg.data.eval_fraction, seed=cfg.split_seed)
  t0 = time.time()
  lm, tables, info = build_ngram(train_seqs.tokens, cfg.ngram.order, model.vocab_size)
  build_s = time.time() - t0

  # Held-out prompts; text data has no prompt part, so its first half (at most 32 tokens) stands for one.
  prompts = [list(map(int, t[:p if p > 0 else max(1, min(32, len(t) // 2))]))
             for t, p in zip(held.tokens, held.prompt_lens)]
  # (the data's check bounded data.max_new_tokens; tuning decodes tune.max_new_tokens: named before any decoding)
  datasets.check_prompts_fit(model, prompts, [tokenizer.decode(p) for p in prompts], tc.max_new_tokens,
                             "tune.max_new_tokens", where="the held-out prompts")
  eos = end_ids(tokenizer)  # every id that ends a row, as decoding stops at them
  pad = tokenizer.pad_id or 0
  from jaxspec.models.bpd import target_fingerprint
  neural_files = None
  if tc.neural and tc.neural_draft != "layerskip":
    neural_files = DEFAULT_DRAFT if tc.neural_draft is None else Path(tc.neural_draft)
  log = TuneLog(_tune_log_path(cfg), _tune_key(cfg, prompts, heads, target_fingerprint(params), neural_files))
  greedy = log.get("greedy")
  if greedy is None:
    greedy = []
    for s in tqdm(range(0, len(prompts), tc.batch_size), desc="greedy reference", unit="batch", disable=not progress,
                  leave=False):
      greedy += generate(model, params, prompts[s:s + tc.batch_size], max_new_tokens=tc.max_new_tokens, eos_ids=eos,
                         pad_id=pad).tokens
    log.put("greedy", greedy)
  ng = {k: jnp.asarray(v) for k, v in tables.items()}
  t0 = time.time()
  ngram_drafter = LatticeDrafter(bpd, "ngram", top_t=tc.top_t, beams=tc.beams, width=tc.width, ngram=lm)
  ngram_rows = tune_weight(model, params, prompts, eos, pad,
                           lambda w: (ngram_drafter, lattice_draft_params(bdp, weight=w, ngram=ng)), tc.weights,
                           greedy, tc.max_new_tokens, tc.batch_size, "tune n-gram weight", progress, log)
  best_ngram = max(ngram_rows, key=lambda r: r["tau"])
  tuned = {"k": tc.k, "top_t": tc.top_t, "beams": tc.beams, "width": tc.width, "ngram_weight": best_ngram["weight"],
           "ngram_tuning": ngram_rows}
  if not shipped_heads:  # the rescorers' default heads from then on (none recorded: the shipped ones)
    tuned["heads"] = str(heads.resolve())
  if tc.neural:
    neural = LatticeDrafter(bpd, "neural", top_t=tc.top_t, lm=DraftModelDrafter(draft, tc.k))
    neural_rows = tune_weight(model, params, prompts, eos, pad,
                              lambda w: (neural, lattice_draft_params(bdp, weight=w, lm=draft_params)),
                              tc.neural_weights, greedy, tc.max_new_tokens, tc.batch_size, "tune neural weight",
                              progress, log)
    # (neural_layers only where they chose the LM: beside a trained draft they would read as that draft's layers)
    tuned.update(neural_lm=neural_lm, **({"neural_layers": tc.neural_layers} if layerskip else {}),
                 neural_weight=max(neural_rows, key=lambda r: r["tau"])["weight"], neural_tuning=neural_rows)
  tune_s = time.time() - t0
  summary = {"sequences": len(train_seqs), "held_out_prompts": len(prompts), **info, "tuned": tuned,
             "build_s": round(build_s, 1), "tune_s": round(tune_s, 1), "total_s": round(time.time() - t_start, 1),
             "config": to_dict(cfg)}
  save_ngram(cfg.out, lm, tables, meta={"tuned": tuned, "training": summary})
  return summary


def _tune_log_path(cfg: RescoreConfig) -> Path | None:
  """Where tuning records its progress: beside the dataset it tunes on (a working folder, not the exported one)."""
  return Path(cfg.data.dataset_dir) / "rescore_tuning.jsonl" if cfg.data.dataset_dir else None


def _tune_key(cfg: RescoreConfig, prompts, heads: Path, target: str | None = None,
              neural_draft: Path | None = None) -> str:
  """A hash of what decides the tuning figures: the config less the weight lists (a rerun may add weights) and the
  output folder, the held-out prompts, the target's embedding fingerprint (its weights may change under one path),
  and the files of the heads and of the neural rescorer's draft (retrained in place, they tune otherwise)."""
  settings = {k: v for k, v in to_dict(cfg).items() if k != "out"}
  settings["tune"] = {k: v for k, v in settings["tune"].items() if k not in ("weights", "neural_weights")}
  h = hashlib.sha256(json.dumps([settings, prompts], sort_keys=True).encode())
  if target is not None:
    h.update(b"target:" + target.encode())
  for folder in (heads, neural_draft):
    if folder is None:
      continue
    for f in sorted(folder.rglob("*")) if folder.is_dir() else [folder]:
      if f.is_file() and not files.is_temporary(f):  # a killed writer's leftover is not part of them
        h.update(f.name.encode() + f.read_bytes())
  return h.hexdigest()


def load_rescore_config(path, overrides=()) -> RescoreConfig:
  return load_config(path, RescoreConfig, overrides)

