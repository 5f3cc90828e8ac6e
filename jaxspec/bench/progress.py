"""A bench run's progress on disk, so that a run that is killed goes on where it stopped.

After every prompt batch the runner appends that batch's records (every method's, tokens included), mismatches and
compile time to `OUT/progress.jsonl`. The first line is a fingerprint of what is being measured: the config (less
`out` and `fresh`), the prompts, the methods that can run, and the backend. The same command run again finds the
file, checks the fingerprint and decodes only the batches that are missing; each batch's seed is `seed + batch
index`, so the resumed run gives the tokens an uninterrupted one gives. A line cut short by the kill is dropped
(its batch runs again). When the run completes the file is removed: results.json and outputs.jsonl hold it all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax

FILE = "progress.jsonl"


def fingerprint(cfg, prompts, prompt_ids, labels) -> dict:
  """What a restored batch must share with this run for its figures to belong to it."""
  conf = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()
          if k not in ("out", "fresh")}
  # Settings added later count only when set, so progress files written before them still resume.
  for key, default in (("dtype", "float32"), ("param_dtype", None), ("scan_layers", False)):
    if conf.get(key, default) == default:
      conf.pop(key, None)
  h = hashlib.sha256(json.dumps([[str(p.question_id), p.category, ids] for p, ids in zip(prompts, prompt_ids)])
                     .encode()).hexdigest()
  return {"config": conf, "prompts_sha256": h, "methods": list(labels), "backend": jax.default_backend(),
          "device_count": jax.device_count()}


def restore(path: Path, want: dict) -> tuple[list[dict], str | None]:
  """The batches saved in `path` by a run with fingerprint `want`, in order, and why none were taken (or None)."""
  if not path.exists():
    return [], None
  try:
    lines = path.read_text(encoding="utf-8").split("\n")
    head = json.loads(lines[0])["fingerprint"]
  except (OSError, ValueError, KeyError, IndexError, UnicodeDecodeError):
    return [], f"{path} is not a bench progress file; starting over"
  if head != want:
    diff = sorted(k for k in set(head) | set(want) if head.get(k) != want.get(k))
    if "config" in diff:
      diff.remove("config")
      diff += sorted(f"config.{k}" for k in set(head["config"]) | set(want["config"])
                     if head["config"].get(k) != want["config"].get(k))
    return [], f"{path} is from a run with other settings ({', '.join(diff)}); starting over"
  batches = []
  for line in lines[1:]:
    try:
      entry = json.loads(line)
    except ValueError:
      break  # the last line was cut short by the kill: that batch runs again
    if entry.get("batch") != len(batches):
      break
    batches.append(entry)
  return batches, None


def start(path: Path, head: dict, batches: list[dict] = ()) -> None:
  """(Re)writes the progress file: the fingerprint and the batches kept (dropping a line cut short)."""
  tmp = path.with_suffix(".tmp")
  tmp.write_text("".join(json.dumps(x) + "\n" for x in [{"fingerprint": head}, *batches]), encoding="utf-8")
  os.replace(tmp, path)


def append(path: Path, entry: dict[str, Any]) -> None:
  """Adds one finished batch; flushed to disk before the next batch starts."""
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(entry) + "\n")
    f.flush()
    os.fsync(f.fileno())
