"""Training data: the target's own greedy continuations of a prompt set (self-distillation), and plain text files.

A dataset is a folder of shards, `shard_NNNNN.npz`, each holding token sequences as `tokens` (concatenated int32),
`offsets` (`[n + 1]`) and `prompt_lens` (`[n]`: how many leading tokens of each sequence are prompt). Shards are
written whole (to a temporary name, then renamed), so a run that is killed loses at most the shard it was on, and a
rerun of the same command skips the shards that exist.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from jaxspec import files, sharding
from jaxspec.errors import InputError
from jaxspec.loading.tokenizer import end_ids

logger = logging.getLogger(__name__)

SHIPPED_PROMPTS = Path(__file__).parent / "data" / "prompts.jsonl"
"""Training prompts written for this project (none from Spec-Bench); see training/data/README.md."""


@dataclasses.dataclass
class Sequences:
  """Token sequences with the length of their prompt part."""

  tokens: list[np.ndarray]
  prompt_lens: np.ndarray
  # Which prompt set each sequence answers (0: the run's own prompts; 1: `data.more_prompts`), or None for one set.
  # `split` splits each set on its own, so adding a set leaves the first set's held-out prompts where they were.
  parts: np.ndarray | None = None
  # Seconds the target spent generating these sequences, as each shard recorded when it was written: summed over
  # every process that wrote a shard, so a run killed and resumed counts all of them (shards from before the
  # record count 0). A summary's `data_s` is only this process's time, which is ~0 for data that was there.
  build_s: float = 0.0

  def __len__(self) -> int:
    return len(self.tokens)

  @property
  def num_tokens(self) -> int:
    return int(sum(len(t) for t in self.tokens))

  def split(self, eval_fraction: float, seed: int = 0) -> tuple["Sequences", "Sequences"]:
    """A deterministic split into (train, eval) by prompt: sequences that share their prompt part (several samples
    of one prompt) land on the same side. Without repeated prompts this is a split by sequence. With `parts`, each
    prompt set is split on its own (the same fraction of each) and the sides are joined."""
    if self.parts is not None and len(np.unique(self.parts)) > 1:
      sides = [self._subset(np.flatnonzero(self.parts == p)).split(eval_fraction, seed) for p in np.unique(self.parts)]
      return tuple(Sequences([t for side in pair for t in side.tokens],
                             np.concatenate([side.prompt_lens for side in pair])) for pair in zip(*sides))
    groups: dict[bytes, list[int]] = {}
    for i, (t, p) in enumerate(zip(self.tokens, self.prompt_lens)):
      key = np.asarray(t[:p], np.int32).tobytes() if p > 0 else i.to_bytes(8, "little") + b"#"
      groups.setdefault(key, []).append(i)
    members = list(groups.values())
    order = np.random.default_rng(seed).permutation(len(members))
    n_eval = max(1, int(round(eval_fraction * len(members)))) if eval_fraction > 0 else 0
    pick = lambda gs: Sequences([self.tokens[i] for i in sorted(j for g in gs for j in members[g])],
                                self.prompt_lens[sorted(j for g in gs for j in members[g])])
    return pick(order[n_eval:]), pick(order[:n_eval])


  def _subset(self, rows: np.ndarray) -> "Sequences":
    return Sequences([self.tokens[i] for i in rows], self.prompt_lens[rows])


def write_meta(path: Path, meta: dict) -> None:
  """Writes a data folder's meta.json through a temporary file and a rename, so a kill never leaves it half-written."""
  files.write_json(path, meta)


def read_meta(path: Path) -> dict | None:
  """A data folder's meta.json, or None where there is none.

  Raises:
    InputError: a meta.json that cannot be read (e.g. emptied by a disk that filled up): the message names it and
      says how to recover without losing the finished shards.
  """
  if not path.exists():
    return None
  try:
    meta = json.loads(path.read_text())
    if not isinstance(meta, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as e:
    raise InputError(f"{path} cannot be read ({e}). It records which settings wrote the shards next to it: restore "
                     "it, or delete the whole folder to rebuild the data.") from None
  return meta


def _write_shard(path: Path, seqs: Sequence[Sequence[int]], prompt_lens: Sequence[int],
                 seconds: float | None = None) -> None:
  """One shard: the sequences, their prompt lengths and the seconds it took to make them (None: not recorded)."""
  offsets = np.cumsum([0] + [len(s) for s in seqs]).astype(np.int64)
  flat = np.concatenate([np.asarray(s, np.int32) for s in seqs]) if seqs else np.zeros(0, np.int32)
  timed = {} if seconds is None else {"seconds": np.float64(seconds)}
  files.write_file(path, lambda tmp: np.savez(tmp, tokens=flat, offsets=offsets,
                                             prompt_lens=np.asarray(prompt_lens, np.int32), **timed))


def shard_files(folder: Path) -> list[Path]:
  """The finished shards of a folder, in order (not the temporary file of one a kill cut short)."""
  return [s for s in sorted(folder.glob("shard_*.npz")) if not files.is_temporary(s)]


def check_targets(sides: dict[str, "Sequences"], seq_len: int, loss_on_prompt: bool, need: int = 1) -> None:
  """Raises `InputError` when the "training" side of the split is empty, or a side (name -> sequences) has no
  sequence with `need` tokens to learn within its first `seq_len` (prompts that fill `train.seq_len` leave none):
  training would fail deep in the batching, or run on nothing and export an untrained part."""
  for side, seqs in sides.items():
    if not len(seqs.tokens):
      if side == "training":  # every prompt held out (one prompt, say): the run would fail deep in the batching
        held = sum(len(s.tokens) for s in sides.values())
        raise InputError(f"No sequence is left to train on: the held-out split (data.eval_fraction) took all "
                         f"{held}. Give more prompts (data.limit, data.prompts), or set data.eval_fraction=0.")
      continue
    # (a target at position t + 1 >= 1: with data.loss_on_prompt from the second token on, else from the answer's)
    left = [min(len(t), seq_len) - (1 if loss_on_prompt else max(int(p), 1))
            for t, p in zip(seqs.tokens, seqs.prompt_lens)]
    if max(left) < need:
      longest = int(max(seqs.prompt_lens))
      raise InputError(f"No {side} sequence has {'a generated token' if need == 1 else f'{need} generated tokens'} "
                       f"within train.seq_len={seq_len} (the longest prompt there is {longest} tokens): raise "
                       "train.seq_len above the prompts' length, or use shorter prompts.")


def load_sequences(folder: str | os.PathLike) -> Sequences:
  """All shards of a dataset folder, in shard order.

  Raises:
    InputError: no shards in the folder, or a shard that cannot be read (delete it and rerun the command that
      made it).
  """
  folder = Path(folder)
  shards = shard_files(folder)
  if not shards:
    raise InputError(f"No dataset shards (shard_*.npz) in {folder}: build the dataset first.")
  tokens, plens, seconds = [], [], 0.0
  for s in shards:
    try:
      with np.load(s) as z:
        flat, off, pl = z["tokens"], z["offsets"], z["prompt_lens"]
        seconds += float(z["seconds"]) if "seconds" in z.files else 0.0
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
      raise InputError(f"Dataset shard {s} is unreadable ({type(e).__name__}): delete it and rerun the command "
                       "that built the dataset; the other shards are kept.") from None
    tokens += [flat[off[i]:off[i + 1]] for i in range(len(off) - 1)]
    plens.append(pl)
  return Sequences(tokens, np.concatenate(plens) if plens else np.zeros(0, np.int32), build_s=seconds)


def load_finished(folder: str | os.PathLike) -> Sequences:
  """A self-distillation folder that `self_distill` has finished: every prompt's answers are there.

  Raises:
    InputError: no such dataset, or one that a killed run left unfinished (rerun the command that built it).
  """
  meta_path = Path(folder) / "meta.json"
  try:
    meta = json.loads(meta_path.read_text())
    expect = int(meta["num_prompts"]) * int(meta.get("samples", 1))
  except (OSError, ValueError, KeyError, TypeError):
    raise InputError(f"{folder} is not a self-distillation dataset ({meta_path} is missing or unreadable): build it "
                     f"first, e.g. with `jaxspec train CONFIG data.seed=1 data.dataset_dir={folder}`.") from None
  seqs = load_sequences(folder)
  if len(seqs) != expect:
    raise InputError(f"{folder} holds {len(seqs)} of its {expect} sequences: a run that built it stopped early; rerun "
                     "that command (it continues where it stopped) before adding the folder to the data.")
  return seqs


def check_prompts_fit(model, ids: Sequence[Sequence[int]], texts: Sequence[str], new_tokens: int, key: str,
                      where: str | None = None) -> None:
  """Raises `InputError` naming the first prompt that cannot take `new_tokens` more tokens in the model's context,
  before any is decoded (prompts are decoded shortest first, so the error would otherwise come at the end of the
  work). Encoder-decoders bound their decoder's tokens only."""
  from jaxspec.decoding.protocol import decoder_prompt_len

  context = getattr(getattr(model, "cfg", None), "max_seq_len", None)
  if not context:
    return
  dec = decoder_prompt_len(model)
  for i, row in enumerate(ids):
    need = (dec if dec else len(row)) + new_tokens
    if need > context:
      text = " ".join(str(texts[i]).split())
      shown = text[:60] + ("..." if len(text) > 60 else "")
      what = f"The decoder's start token plus {key}={new_tokens}" if dec else (
          f"Prompt {i + 1} of {len(ids)}{f' in {where}' if where else ''} ({shown!r}, {len(row)} tokens) plus "
          f"{key}={new_tokens} new tokens")
      raise InputError(f"{what} needs {need} positions, more than the model's context ({context}): lower {key}"
                       + ("." if dec else ", or leave the prompt out of the file."))


def self_distill(model, params, tokenizer, prompt_texts: Sequence[str], out: str | os.PathLike, *,
                 max_new_tokens: int = 192, batch_size: int = 16, shard_size: int = 64, samples: int = 1,
                 temperature: float = 0.0, seed: int = 0, progress: bool = True, key: str = "data.dataset_dir",
                 tokens_key: str = "data.max_new_tokens", where: str | None = None) -> Sequences:
  """Writes the target's continuations of the prompts (prompt + continuation per sequence) to `out`.

  `key` and `tokens_key` are the config keys that set `out` and `max_new_tokens`, and `where` the prompts' (a config
  key or a file), for the errors to name.

  `temperature` 0 writes the greedy continuation of each prompt; above 0, `samples` sampled continuations of each
  (seeded by shard and batch, so a rerun writes the same data; `seed` > 0 draws other samples, for more answers to
  the same prompts in another folder). Prompts are sorted by length so each batch pads
  little; shards hold `shard_size` sequences and are skipped when they already exist, so a killed run continues
  where it stopped.
  """
  from jaxspec.decoding.generate import generate

  if seed and temperature == 0:
    raise InputError(f"A sampling seed ({seed}) draws other sampled answers; greedy answers (temperature 0) are the "
                     "same for every seed: leave the seed at 0 or set a temperature above 0.")
  if samples < 1 or temperature < 0 or (samples > 1 and temperature == 0):
    raise InputError(f"self-distillation takes samples >= 1 and temperature >= 0, and several samples of a prompt "
                     f"need temperature > 0 (got samples={samples}, temperature={temperature}).")
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  from jaxspec.bench.runner import chat_prompt_ids

  ids = chat_prompt_ids(tokenizer, prompt_texts)
  check_prompts_fit(model, ids, prompt_texts, max_new_tokens, tokens_key, where)
  order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
  order = [i for i in order for _ in range(samples)]
  meta = {"kind": "self-distillation", "num_prompts": len(ids), "max_new_tokens": max_new_tokens,
          "shard_size": shard_size}
  if temperature > 0:  # greedy datasets keep the meta they were written with
    meta.update(temperature=temperature, samples=samples)
    if seed:  # seed 0 keeps the meta of the folders written before seeds existed
      meta["seed"] = seed
  # Which target wrote the answers, to which prompts (hashed after the chat template, so the tokenizer counts too):
  # a folder another model or an edited prompt file wrote must not be reused, or mixed with new shards after a kill.
  # (`target_fingerprint` reads a T5's shared embedding too: `embed_fingerprint` alone saw nothing of a tied T5, so
  # every tied T5 looked the same; folders written with that older fingerprint are taken where it saw something)
  from jaxspec.models.bpd import target_fingerprint
  from jaxspec.models.draft import embed_fingerprint, weights_fingerprint
  # (`weights`: every array sampled, for a model that shares another's embedding, a merged fine-tune say; folders
  # written before it was recorded take it on first use)
  source = {"target": target_fingerprint(params) if params is not None else None,
            "weights": weights_fingerprint(params) if params is not None else None,
            "prompt_ids_sha256": hashlib.sha256(json.dumps([list(map(int, p)) for p in ids]).encode()).hexdigest()}
  meta_path = out / "meta.json"
  shards = [order[i:i + shard_size] for i in range(0, len(order), shard_size)]
  # What the folder holds, as process 0 reads it: in a multi-host run every process writes the folder's files too, so
  # another process may read them before or after one wrote them, and the branches below run collectives (the
  # fingerprints of a split target, the decoding).
  try:
    found = [read_meta(meta_path), None]
  except InputError as e:
    found = [None, str(e)]
  old, unreadable, has_shards, present = sharding.from_first_process(
      found + [bool(shard_files(out)), [(out / f"shard_{si:05d}.npz").exists() for si in range(len(shards))]])
  if unreadable:
    raise InputError(unreadable)
  if old is not None:
    if {k: v for k, v in old.items() if k not in (*source, "batch_size")} != meta:
      raise InputError(f"{out} holds a dataset built with other settings ({meta_path}: {old}); use another folder.")
    # Folders written before the source was recorded take it on first use.
    older = embed_fingerprint(params) if params is not None else None
    older = None if older == embed_fingerprint({}) else older  # (it read no array: it tells no model apart)
    for field, value in source.items():
      if field == "target" and old.get(field) is not None and old[field] == older:
        continue
      if old.get(field) is not None and value is not None and old[field] != value:
        what = {"target": "another target model", "weights": "another target model (one of other weights with "
                "this one's embedding: a fine-tune of it, say)"}.get(field, "other prompts (or another tokenizer)")
        raise InputError(f"{out} holds answers written by {what} than this run's ({field} {old[field]} there, {value} "
                         f"here): use another {key} for this run, or delete that folder to rebuild it.")
  elif has_shards:
    raise InputError(f"{out} holds dataset shards but no meta.json: it was not written by self-distillation (or by "
                     "a run from before meta files); use another folder, or delete it to rebuild.")
  done = sum(len(shard) for si, shard in enumerate(shards) if present[si])
  if temperature > 0:  # the batch size seeds the sampling: answers continued at another would be another draw
    was = (old or {}).get("batch_size")
    if was is not None and was != batch_size and 0 < done < len(order):
      raise InputError(f"{out} holds sampled answers drawn {was} prompts per batch (data.gen_batch_size), which seeds "
                       f"the sampling: continue them with data.gen_batch_size={was}, or use another {key}.")
    source["batch_size"] = was if was is not None and done == len(order) else batch_size
  write_meta(meta_path, {**meta, **source})
  eos = end_ids(tokenizer)  # every id that ends a row, as decoding stops at them
  if 0 < done < len(order):  # a killed run's answers are kept: say so, as the trainer does for its checkpoints
    logger.warning("continuing the answers in %s: %d of %d are there from an earlier run", out, done, len(order))
  bar = tqdm(total=len(order), desc="self-distill", unit="answer", disable=not progress)
  for si, shard in enumerate(shards):
    path = out / f"shard_{si:05d}.npz"
    if present[si]:
      bar.update(len(shard))
      continue
    seqs, plens, t0 = [], [], time.perf_counter()
    for bi in range(0, len(shard), batch_size):
      rows = [ids[i] for i in shard[bi:bi + batch_size]]
      res = generate(model, params, rows, max_new_tokens=max_new_tokens, eos_ids=eos, pad_id=tokenizer.pad_id or 0,
                     temperature=temperature, seed=(si * 100_003 + bi + seed * 2_654_435_761) % 2**31)
      for p, t in zip(rows, res.tokens):
        seqs.append(list(p) + list(t))
        plens.append(len(p))
      bar.update(len(rows))
    _write_shard(path, seqs, plens, time.perf_counter() - t0)
  bar.close()
  return load_sequences(out)


def text_sequences(tokenizer, paths: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                   seq_len: int = 256) -> Sequences:
  """Plain text files cut into `seq_len`-token sequences (no prompt part), written as one shard."""
  chunks, t0 = [], time.perf_counter()
  for p in paths:
    p = Path(p)
    if not p.is_file():
      raise InputError(f"Text file {p} not found.")
    ids = tokenizer.encode(p.read_text(encoding="utf-8"))
    chunks += [ids[i:i + seq_len] for i in range(0, len(ids), seq_len) if len(ids[i:i + seq_len]) > 1]
  if not chunks:
    raise InputError("The text files hold no usable text.")
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  meta_path = out / "meta.json"
  meta = {"kind": "text", "files": [str(p) for p in paths], "seq_len": seq_len}
  old = read_meta(meta_path)
  shards = shard_files(out)
  # Text folders written before meta files: one shard, no prompt parts (self-distilled shards always have them).
  legacy_text = (old is None and [s.name for s in shards] == ["shard_00000.npz"]
                 and not load_sequences(out).prompt_lens.any())
  if (old is not None and old.get("kind") != "text") or (old is None and shards and not legacy_text):
    raise InputError(f"{out} holds another dataset ({old['kind'] if old else 'shards without a meta.json'}); the "
                     "text files' sequences would overwrite it: set data.dataset_dir to a folder of their own.")
  # The text is cut again from the files each run. shard_00000 is replaced whole; only others are removed, so another
  # process of a multi-host run reading this folder never finds it without its shard.
  for stale in shards:
    if stale.name != "shard_00000.npz":
      stale.unlink(missing_ok=True)
  _write_shard(out / "shard_00000.npz", chunks, [0] * len(chunks), time.perf_counter() - t0)
  write_meta(meta_path, meta)
  return load_sequences(out)


def read_prompt_texts(path: str | os.PathLike | None = None, limit: int | None = None) -> list[str]:
  """First turns of a Spec-Bench-format JSONL file (default: the shipped training prompts)."""
  from jaxspec.bench.prompts import load_prompts
  prompts = [p.text for p in load_prompts(path or SHIPPED_PROMPTS,
                                          given="as the config's prompts file (data.prompts= or collect.prompts=)")]
  return prompts[:limit] if limit is not None else prompts


def iterate_positions(n: int, batch: int, seed: int, start_step: int = 0) -> Iterator[np.ndarray]:
  """Index batches over n examples, reshuffled each epoch, deterministic by step (so a resumed run sees the same
  data as one that was never stopped)."""
  per_epoch = max(1, n // batch)
  step = start_step
  while True:
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    yield perm[i * batch:(i + 1) * batch]
    step += 1


def batch_sources(train, evals, batch: int, seed: int):
  """`(batches_from, eval_batches)` for `Trainer.fit` over two example sets with a `.batch(indices)` method and a
  length: shuffled training batches that resume by step, and the eval set in order."""

  def batches_from(step):
    for idx in iterate_positions(len(train), batch, seed, step):
      yield train.batch(np.sort(idx))

  def eval_batches():
    for s in range(0, len(evals), batch):
      yield evals.batch(np.arange(s, min(s + batch, len(evals))))

  return batches_from, eval_batches


def spread_eval_batches(evals, batch: int, limit: int):
  """At most `limit` batches of `evals` (a set with `.batch(indices)` and a length), their examples spread evenly
  over it in order: where examples come grouped (a prompt's windows and states one after another), the first
  `limit` batches would hold the first prompts only."""
  n = min(len(evals), limit * batch)
  picked = np.linspace(0, len(evals) - 1, n).round().astype(np.int64) if n else np.zeros(0, np.int64)
  return lambda: (evals.batch(picked[s:s + batch]) for s in range(0, n, batch))
