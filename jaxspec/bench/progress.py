"""A bench run's progress on disk, so that a run that is killed goes on where it stopped.

The unit kept is one method's run on one prompt batch: as soon as it ends, the runner appends its records (tokens
included) and compile time to `OUT/progress.jsonl`, so a kill loses at most the run in flight, also when every prompt
is in one batch (`--quick`). The first line is a fingerprint of the work: the settings that change what is decoded or
how it is timed, a hash of the prompts themselves (ids, categories, tokens: not the file's name, nor the --limit or
--categories that picked them), the methods that can run, and the backend. The same command run again finds the
file, checks the fingerprint and runs only the (batch, method) pairs that are missing; each batch's seed is `seed +
batch index` for every method, so the resumed run gives the tokens an uninterrupted one gives. Mismatches are not
saved: they follow from the tokens. A line cut short by the kill is dropped (its run goes again). When the run
completes the file is removed: results.json and outputs.jsonl hold it all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import jax

from jaxspec import files

FILE = "progress.jsonl"
# Config fields that name the work rather than define it: the prompts' hash and the method list say what they chose,
# so the same prompts named another way (an explicit default file, a --limit above every category's count) resume.
NAMING = ("prompts", "limit", "categories", "methods", "out", "fresh")


def fingerprint(cfg, prompts, prompt_ids, labels) -> dict:
  """What a restored run must share with this run for its figures to belong to it."""
  conf = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
  for key in ("model", "t5x_src"):  # a path given relative or absolute, or through a link, names the same files
    if conf.get(key) and Path(conf[key]).exists():
      conf[key] = str(Path(conf[key]).resolve())
  h = hashlib.sha256(json.dumps([[str(p.question_id), p.category, ids] for p, ids in zip(prompts, prompt_ids)])
                     .encode()).hexdigest()
  return {"config": _work(conf), "prompts_sha256": h, "methods": list(labels), "backend": jax.default_backend(),
          "device_count": jax.device_count()}


def _work(conf: dict) -> dict:
  """A fingerprint's config less the fields that only name the work (also those of files written before NAMING)."""
  conf = {k: v for k, v in conf.items() if k not in NAMING}
  # Settings added later count only when set, so progress files written before them still resume.
  for key, default in (("dtype", "float32"), ("param_dtype", None), ("scan_layers", False),
                       ("matmul_precision", "highest")):
    if conf.get(key, default) == default:
      conf.pop(key, None)
  return conf


def differences(have: dict, want: dict, skip: Iterable[str] = ()) -> list[str]:
  """What differs between a saved fingerprint and this run's, each as "what: saved value there, this run's here"."""
  have = dict(have, config=_work(have.get("config", {})))
  diff = []
  for key in sorted((set(have) | set(want)) - set(skip)):
    a, b = have.get(key), want.get(key)
    if a == b:
      continue
    if key == "config":
      diff += [f"{k}: {a.get(k)!r} there, {b.get(k)!r} here" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    elif key == "prompts_sha256":
      diff.append("the prompts (their ids, categories or text)")
    elif key == "methods":
      diff.append(f"methods that can run: {', '.join(a or [])} there, {', '.join(b)} here")
    else:
      diff.append(f"{key}: {a!r} there, {b!r} here")
  return diff


def read(path: Path) -> tuple[dict | None, dict[tuple[int, str], dict], str | None]:
  """The fingerprint and the runs saved in `path` ((batch, method) -> entry), and why the file cannot be read (or
  None). No file: (None, {}, None)."""
  if not path.exists():
    return None, {}, None
  try:
    lines = path.read_text(encoding="utf-8").split("\n")
    head = json.loads(lines[0])["fingerprint"]
  except (OSError, ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError):
    return None, {}, f"{path} is not a bench progress file; starting over"
  runs = {}
  for line in lines[1:]:
    try:
      entry = json.loads(line)
      entries = _split(entry) if isinstance(entry["records"], dict) else [entry]
      runs.update({(int(e["batch"]), str(e["method"])): e for e in entries})
    except (ValueError, KeyError, TypeError):
      break  # the last line was cut short by the kill: that run goes again
  return head, runs, None


def _split(entry: dict) -> list[dict]:
  """A whole batch as files written before runs were kept one by one held it, as one entry per method."""
  return [{"batch": entry["batch"], "method": label, "records": recs, "compile_s": entry["compile_s"][label],
           "program_bytes": entry["program_bytes"][label]} for label, recs in entry["records"].items()]


def start(path: Path, head: dict, runs: Iterable[dict] = ()) -> None:
  """(Re)writes the progress file: the fingerprint and the runs kept (dropping a line cut short)."""
  files.write_text(path, "".join(json.dumps(x) + "\n" for x in [{"fingerprint": head}, *runs]))


def append(path: Path, entry: dict[str, Any]) -> None:
  """Adds one finished run (a method on a batch); flushed to disk before the next run starts."""
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(entry) + "\n")
    f.flush()
    os.fsync(f.fileno())
