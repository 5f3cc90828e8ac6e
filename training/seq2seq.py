"""Training a small T5-family encoder-decoder from scratch on the synthetic numbers task (`training/synthetic.py`).

`jaxspec train configs/t5_numbers.yaml` builds the tokenizer (or reuses one, so a draft model shares the target's
vocabulary), trains with teacher forcing (cross-entropy on the target tokens, EOS included), checkpoints with Orbax
(a killed run resumes), and exports a Hugging Face T5 folder: `config.json`, `model.safetensors`, `tokenizer.json`,
plus `training.json` with the run's figures. The export loads with `jaxspec.loading.load_model(folder)` and
decodes with every method of the library (the prompt is the encoder input).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxspec import files
from jaxspec.decoding.sampling import seed_key
from jaxspec.models.t5 import T5Config, T5LM
from training import synthetic
from training.config import ConfigError, record_run_config, to_dict
from training.trainer import OptimConfig, Trainer, init_state, make_optimizer


@dataclasses.dataclass(frozen=True)
class ModelSection:
  d_model: int = 128
  d_kv: int = 32
  n_heads: int = 4
  d_ff: int = 256
  n_enc_layers: int = 2
  n_dec_layers: int = 2
  rel_buckets: int = 16
  rel_max_distance: int = 64
  ff: Literal["gated-gelu", "relu"] = "gated-gelu"
  tie_embeddings: bool = False

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, int) and not isinstance(value, bool) and value < 1:
        raise ValueError(f"{f.name} must be >= 1, got {value}")


@dataclasses.dataclass(frozen=True)
class DataSection:
  task: Literal["numbers"] = "numbers"
  train_examples: int = 20000
  eval_examples: int = 512
  seed: int = 0  # train examples use `seed`, eval examples `seed + 1` minus any source trained on (bench prompts: 1234)
  tokenizer: Optional[str] = None  # a folder with tokenizer.json to reuse (e.g. the target's, for a draft model)
  vocab_size: int = 256  # of a new tokenizer
  src_len: int = 64  # longer examples are left out (and counted)
  tgt_len: int = 64


@dataclasses.dataclass(frozen=True)
class TrainSection:
  steps: int = 3000
  batch_size: int = 64
  seed: int = 0
  checkpoint_dir: str = "runs/t5_numbers/ckpt"
  checkpoint_every: int = 500
  eval_every: int = 500
  log_every: int = 50
  exact_match_examples: int = 256  # greedy decodes of eval sources after training, scored as exact matches


@dataclasses.dataclass(frozen=True)
class Seq2SeqTrainConfig:
  task: Literal["seq2seq"] = "seq2seq"
  out: str = "runs/t5_numbers/model"
  model: ModelSection = ModelSection()
  data: DataSection = DataSection()
  optim: OptimConfig = OptimConfig()
  train: TrainSection = TrainSection()


def _tokenizer_file(cfg: DataSection) -> Path:
  """The tokenizer.json `data.tokenizer` names (a folder holding one, or the file)."""
  path = Path(cfg.tokenizer)
  path = path / "tokenizer.json" if path.is_dir() else path
  if not path.is_file():
    raise ConfigError(f"data.tokenizer: no tokenizer.json at {cfg.tokenizer!r}; train the target first or set "
                      "data.tokenizer=null to build a new one.")
  return path


def check_tokenizer(cfg: Seq2SeqTrainConfig) -> None:
  """Fails before any work when the run would read `data.tokenizer` and finds no tokenizer.json there. A resume that
  takes the tokenizer its checkpoint folder saved reads none (the target's folder may be gone since)."""
  if cfg.data.tokenizer and _resumed_tokenizer(Path(cfg.train.checkpoint_dir) / "tokenizer", built_with(cfg)) is None:
    _tokenizer_file(cfg.data)


def _tokenizer(cfg: DataSection, train_rows):
  if cfg.tokenizer:
    from jaxspec.loading.tokenizer import Tokenizer
    return Tokenizer.from_tokenizer_json(_tokenizer_file(cfg))
  return synthetic.train_tokenizer([t for _, s, tg in train_rows for t in (s, tg)], cfg.vocab_size)


_BUILT_WITH = "built_with.json"


def built_with(cfg: Seq2SeqTrainConfig) -> dict:
  """The data settings a tokenizer saved in the checkpoint folder was built with (`_resumed_tokenizer` compares)."""
  return {"tokenizer": cfg.data.tokenizer, "vocab_size": cfg.data.vocab_size,
          "train_examples": cfg.data.train_examples, "seed": cfg.data.seed}


def _resumed_tokenizer(tok_dir: Path, built_with: dict):
  """The tokenizer a killed run saved in its checkpoint folder, if the data settings that built it are this run's.

  A run killed before its first step checkpoint has no recorded config to compare against, so the tokenizer carries
  its own settings: another vocab_size (or other data) builds a new one instead of silently reusing the old one.
  Folders from before that record are reused as they are when they load.
  """
  from jaxspec.loading.tokenizer import Tokenizer
  if not (tok_dir / "tokenizer.json").is_file():
    return None
  stamp = tok_dir / _BUILT_WITH
  try:
    if stamp.is_file() and json.loads(stamp.read_text()) != built_with:
      return None
    tokenizer = Tokenizer.from_tokenizer_json(tok_dir / "tokenizer.json")
  except Exception:  # noqa: BLE001 - unreadable: build it again
    return None
  return tokenizer if tokenizer.eos_id is not None else None  # tokenizer_config.json lost: build it again


def _save_tokenizer(tokenizer, tok_dir: Path, built_with: dict) -> None:
  """Writes the tokenizer and its settings into a temporary folder renamed into place: a kill leaves either the old
  folder or the whole new one, never tokenizer.json without tokenizer_config.json."""
  import shutil
  files.remove_stale(tok_dir)
  tmp = files.temporary(tok_dir)
  shutil.rmtree(tmp, ignore_errors=True)
  tokenizer.save(tmp)
  (tmp / _BUILT_WITH).write_text(json.dumps(built_with))
  shutil.rmtree(tok_dir, ignore_errors=True)
  tmp.rename(tok_dir)


def check_shipped_vocabulary(cfg: Seq2SeqTrainConfig, tokenizer) -> None:
  """Fails before training when a run rebuilding the shipped T5 (out=jaxspec/assets/t5_numbers, a new tokenizer)
  built another vocabulary than the shipped one: the shipped draft and BPD heads read the T5's token ids, so other
  data settings (`data.train_examples`, `data.seed`, `data.vocab_size`: the texts and size the tokenizer is trained
  on) would leave them serving a model of other ids. `check_assets` refuses a reused tokenizer of another model
  before any work; a new one is known only once built (seconds)."""
  from jaxspec.bench.methods import ASSETS
  from jaxspec.loading.tokenizer import Tokenizer

  shipped = ASSETS / "t5_numbers"
  if cfg.data.tokenizer or Path(cfg.out).resolve() != shipped.resolve():
    return
  if not (shipped / "tokenizer.json").is_file():  # (deleted to rebuild all three parts: nothing to keep in step)
    return
  if Tokenizer.from_tokenizer_json(shipped / "tokenizer.json").backend.get_vocab() == tokenizer.backend.get_vocab():
    return
  raise ConfigError(f"out={cfg.out} is the shipped T5, whose tokenizer its draft and BPD heads "
                    "(jaxspec/assets/t5_numbers_draft, jaxspec/assets/bpd_t5_numbers) read; this run's data "
                    f"settings (data.train_examples={cfg.data.train_examples}, data.seed={cfg.data.seed}, "
                    f"data.vocab_size={cfg.data.vocab_size}) built a tokenizer of another vocabulary "
                    f"({tokenizer.vocab_size} tokens, not the same ids). Keep configs/t5_numbers.yaml's data settings "
                    "to rebuild the shipped T5, or write the result to a folder of your own, e.g. "
                    "out=runs/t5_numbers_mine (and give train.checkpoint_dir a path of your own too).")


def encode_pairs(tokenizer, rows, src_len: int, tgt_len: int, start_id: int) -> tuple[dict, int]:
  """Padded arrays `src`, `src_len`, `dec_in` (start token + target), `labels` (target + EOS), `mask`; and how many
  examples were too long."""
  eos = tokenizer.eos_id
  src, dec, lab, lens = [], [], [], []
  dropped = 0
  for _, s, t in rows:
    s_ids, t_ids = tokenizer.encode(s), tokenizer.encode(t) + [eos]
    if len(s_ids) > src_len or len(t_ids) > tgt_len:
      dropped += 1
      continue
    src.append(s_ids)
    lens.append(len(s_ids))
    lab.append(t_ids)
    dec.append([start_id] + t_ids[:-1])
  n = len(src)
  out = {"src": np.zeros((n, src_len), np.int32), "src_len": np.asarray(lens, np.int32),
         "dec_in": np.zeros((n, tgt_len), np.int32), "labels": np.zeros((n, tgt_len), np.int32),
         "mask": np.zeros((n, tgt_len), np.float32)}
  for i in range(n):
    out["src"][i, :len(src[i])] = src[i]
    out["dec_in"][i, :len(dec[i])] = dec[i]
    out["labels"][i, :len(lab[i])] = lab[i]
    out["mask"][i, :len(lab[i])] = 1.0
  return out, dropped


def trim(batch: dict, multiple: int = 16) -> dict:
  """Cuts a batch's padding to its longest source and target, rounded up to `multiple` (few distinct shapes, so
  few compilations; most examples are far shorter than the limits)."""
  s = -(-int(batch["src_len"].max()) // multiple) * multiple
  t = -(-int(batch["mask"].sum(axis=1).max()) // multiple) * multiple
  return {**batch, "src": batch["src"][:, :s], "dec_in": batch["dec_in"][:, :t], "labels": batch["labels"][:, :t],
          "mask": batch["mask"][:, :t]}


def seq2seq_loss(model: T5LM):
  def loss_fn(params, frozen, batch, rng):
    logits, _ = model.teacher_forced(params, batch["src"], batch["src_len"], batch["dec_in"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    mask = batch["mask"]
    denom = jnp.maximum(mask.sum(), 1.0)
    loss = jnp.sum(ce * mask) / denom
    acc = jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * mask) / denom
    return loss, {"token_acc": acc, "count": mask.sum()}
  return loss_fn


def exact_match(model, params, tokenizer, rows, batch_size: int = 64, progress: bool = False) -> float:
  """Share of sources whose greedy decode (`jaxspec.decoding.generate`) is exactly the target text."""
  from jaxspec.decoding.generate import generate
  hits = 0
  with tqdm(total=len(rows), desc="exact match (greedy decode)", unit="example", disable=not progress) as bar:
    for s in range(0, len(rows), batch_size):
      chunk = rows[s:s + batch_size]
      res = generate(model, params, [tokenizer.encode(src) for _, src, _ in chunk], max_new_tokens=96,
                     eos_ids=[tokenizer.eos_id])
      for (_, _, tgt), toks in zip(chunk, res.tokens):
        hits += tokenizer.decode(toks, skip_special_tokens=True) == tgt
      bar.update(len(chunk))
  return hits / max(len(rows), 1)


def train_seq2seq(cfg: Seq2SeqTrainConfig, *, progress: bool = True) -> dict:
  """Builds data and tokenizer, trains (resumable), exports the model folder to `cfg.out`; returns a summary."""
  from jaxspec.loading.t5_hf import save_t5

  t_start = time.time()
  ckpt_dir = Path(cfg.train.checkpoint_dir)
  record_run_config(cfg, ckpt_dir)
  train_rows = synthetic.examples(cfg.data.train_examples, cfg.data.seed)
  # Independent draws repeat some short sources: held-out means unseen, so eval keeps only sources not trained on.
  seen = {src for _, src, _ in train_rows}
  eval_rows = [r for r in synthetic.examples(cfg.data.eval_examples, cfg.data.seed + 1) if r[1] not in seen]
  if not eval_rows:
    raise ConfigError("data: every eval example's source is also a training source; raise data.eval_examples.")
  tok_dir = ckpt_dir / "tokenizer"
  settings = built_with(cfg)
  tokenizer = _resumed_tokenizer(tok_dir, settings)
  if tokenizer is None:
    tokenizer = _tokenizer(cfg.data, train_rows)
    _save_tokenizer(tokenizer, tok_dir, settings)
  check_shipped_vocabulary(cfg, tokenizer)
  m = cfg.model
  model = T5LM(T5Config(vocab_size=tokenizer.vocab_size, d_model=m.d_model, d_kv=m.d_kv, d_ff=m.d_ff,
                        n_heads=m.n_heads, n_enc_layers=m.n_enc_layers, n_dec_layers=m.n_dec_layers,
                        rel_buckets=m.rel_buckets, rel_max_distance=m.rel_max_distance, ff=m.ff,
                        tie_embeddings=m.tie_embeddings, decoder_start_id=tokenizer.pad_id or 0))
  start = model.cfg.decoder_start_id
  tr, dropped = encode_pairs(tokenizer, train_rows, cfg.data.src_len, cfg.data.tgt_len, start)
  ev, _ = encode_pairs(tokenizer, eval_rows, cfg.data.src_len, cfg.data.tgt_len, start)
  if len(tr["src"]) == 0:
    raise ConfigError("data: every training example is longer than data.src_len / data.tgt_len; raise them.")
  optimizer = make_optimizer(cfg.optim, cfg.train.steps)
  params = model.init_params(seed_key(cfg.train.seed))
  bs = cfg.train.batch_size

  def batches_from(step):
    from training.datasets import iterate_positions
    for idx in iterate_positions(len(tr["src"]), bs, cfg.train.seed, step):
      yield trim({k: v[idx] for k, v in tr.items()})

  def eval_batches():
    for s in range(0, len(ev["src"]), bs):
      yield trim({k: v[s:s + bs] for k, v in ev.items()})

  trainer = Trainer(seq2seq_loss(model), optimizer, checkpoint_dir=ckpt_dir,
                    checkpoint_every=cfg.train.checkpoint_every, log_every=cfg.train.log_every, progress=progress)
  state, history = trainer.fit(init_state(params, optimizer, cfg.train.seed), batches_from, cfg.train.steps,
                               eval_batches=eval_batches, eval_every=cfg.train.eval_every)
  train_s = trainer.fit_s  # summed over a killed run's processes, as resumed
  params = jax.device_get(state.params)
  final_eval = trainer.final_evaluation(state, history, eval_batches)
  fits = [r for r in eval_rows if len(tokenizer.encode(r[1])) <= cfg.data.src_len
          and len(tokenizer.encode(r[2])) + 1 <= cfg.data.tgt_len]  # the rows `ev` holds
  em = exact_match(model, params, tokenizer, fits[:cfg.train.exact_match_examples], progress=progress)
  summary = {"params": int(sum(x.size for x in jax.tree.leaves(params))), "vocab_size": tokenizer.vocab_size,
             "train_examples": int(len(tr["src"])), "dropped_long": int(dropped), "train_s": round(train_s, 1),
             "total_s": round(time.time() - t_start, 1),
             "final_eval": {k: float(v) for k, v in final_eval.items() if k != "step"},
             "eval_exact_match": round(em, 4), "config": to_dict(cfg)}
  out = Path(cfg.out)
  # training.json first: it marks the folder as this task's export (`training.tasks.earlier_export`), so a run killed
  # while writing the model can be run again into it.
  out.mkdir(parents=True, exist_ok=True)
  files.write_json(out / "training.json", summary)
  save_t5(str(out), model, params)
  tokenizer.save(out)
  return summary
