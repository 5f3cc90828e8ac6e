"""A bench run's progress on disk, so that a run that is killed goes on where it stopped.

The unit kept is one method's run on one prompt batch: as soon as it ends, the runner appends its records (tokens
included) and compile time to `OUT/progress.jsonl`, so a kill loses at most the run in flight, also when every prompt
is in one batch (`--quick`). The first line is a fingerprint of the work: the settings that change what is decoded or
how it is timed, a hash of the prompts themselves (ids, categories, tokens: not the file's name, nor the --limit or
--categories that picked them), the methods that can run, and the backend. The same command run again finds the
file, checks the fingerprint and runs only the (batch, method) pairs that are missing; each batch's seed is `seed +
batch index` for every method, so the resumed run gives the tokens an uninterrupted one gives. Mismatches are not
saved: they follow from the tokens. A line cut short by the kill, or damaged otherwise, is dropped (its run goes
again); a damaged fingerprint with runs after it is refused, not taken as a reason to start over. When the run
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
from jaxspec.errors import InputError

FILE = "progress.jsonl"
# Config fields that name the work rather than define it: the prompts' hash and the method list say what they chose,
# so the same prompts named another way (an explicit default file, a --limit above every category's count) resume.
NAMING = ("prompts", "limit", "categories", "methods", "out", "fresh")


def fingerprint(cfg, prompts, prompt_ids, labels) -> dict:
  """What a restored run must share with this run for its figures to belong to it."""
  conf = resolve_paths({k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()})
  h = hashlib.sha256(json.dumps([[str(p.question_id), p.category, ids] for p, ids in zip(prompts, prompt_ids)])
                     .encode()).hexdigest()
  return {"config": _work(conf), "prompts_sha256": h, "methods": list(labels), "method_paths": method_paths(labels),
          "backend": jax.default_backend(), "device_count": jax.device_count()}


def method_paths(labels) -> dict:
  """The folders and files the methods' path options name (`spec:draft=d`), as resolved from here: a label names
  the same work only where its relative paths lead to the same place (the same command run from another folder may
  name another draft). Read by `parse_method`, as the methods' builds read them (`named_paths`); a label it refuses
  names none (no build runs it)."""
  from jaxspec.bench.methods import named_paths, parse_method

  paths = {}
  for label in labels:
    try:
      opts = parse_method(str(label))[2]
    except InputError:
      continue
    named = {k: os.path.realpath(v) for k, v in named_paths(opts).items()}
    if named:
      paths[str(label)] = named
  return paths


def method_key(label: str, paths: dict | None = None) -> tuple | None:
  """`same_method_key` of a label: what it runs, however it is written (`spec` is `spec:gamma=4`). `paths`: where its
  path options led where the label was written (a progress file's `method_paths` entry), else from here. None for a
  label this jaxspec cannot read (a method or option it does not know)."""
  from jaxspec.bench.methods import named_paths, parse_method, same_method_key

  try:
    _, name, opts = parse_method(str(label))
  except InputError:
    return None
  if paths is None:
    paths = method_paths([label]).get(str(label), {})
  paths = paths if isinstance(paths, dict) else {}  # (of a damaged file: only the label's own path options count)
  return same_method_key(name, {**opts, **{k: paths[k] for k in named_paths(opts) if isinstance(paths.get(k), str)}})


def relabel(head: dict, runs: dict, labels) -> tuple[dict, dict]:
  """A saved fingerprint and its runs ((batch, method) -> entry) with each method the file names as this run writes
  it, where the two spellings name the same method (`method_key`): a run started with `spec` goes on under
  `spec:gamma=4` (the default), `lookup:n=08` under `lookup:n=8`. Labels that match as written, or match no label of
  this run, stay as they are (`differences` then compares them)."""
  labels = [str(label) for label in labels]
  # (a file written before paths were recorded: its labels' paths are read from here, as its runs' were compared)
  saved_paths = head.get("method_paths") if isinstance(head.get("method_paths"), dict) else None
  listed = head.get("methods") if isinstance(head.get("methods"), list) else []
  names = list(dict.fromkeys([*map(str, listed), *(method for _, method in runs)]))
  free = [label for label in labels if label not in names]  # this run's labels the file does not name as written
  here = {}
  for label in free:
    here.setdefault(method_key(label), []).append(label)
  rename = {}
  for name in names:
    if name in labels:
      continue
    key = method_key(name, None if saved_paths is None else saved_paths.get(name, {}))
    if key is not None and len(here.get(key, [])) == 1:
      rename[name] = here[key][0]
  if not rename or len(set(rename.values())) < len(rename):  # (two saved labels of one method: no file of ours)
    return head, runs
  new = lambda label: rename.get(label, label)
  head = dict(head, methods=[new(str(label)) for label in listed])
  if saved_paths is not None:  # where a renamed label's paths led was compared in its key: not again by label
    head["method_paths"] = {label: v for label, v in saved_paths.items() if label not in rename}
  if isinstance(head.get("measured"), dict):
    head["measured"] = {new(label): v for label, v in head["measured"].items()}
  runs = {(batch, new(method)): dict(entry, method=new(method)) for (batch, method), entry in runs.items()}
  return head, runs


def resolve_paths(conf: dict) -> dict:
  """`conf` with its `model` and `t5x_src` paths resolved: a path given relative or absolute, or through a link,
  names the same files."""
  conf = dict(conf)
  for key in ("model", "t5x_src"):
    if conf.get(key) and Path(conf[key]).exists():
      conf[key] = str(Path(conf[key]).resolve())
  return conf


def _work(conf: dict) -> dict:
  """A fingerprint's config less the fields that only name the work (also those of files written before NAMING)."""
  conf = {k: v for k, v in conf.items() if k not in NAMING}
  # Settings added later count only when set, so progress files written before them still resume.
  for key, default in (("dtype", "float32"), ("param_dtype", None), ("scan_layers", False),
                       ("matmul_precision", "highest"), ("context", None)):
    if conf.get(key, default) == default:
      conf.pop(key, None)
  return conf


def differences(have: dict, want: dict, skip: Iterable[str] = ()) -> list[str]:
  """What differs between a saved fingerprint and this run's, each as "what: saved value there, this run's here"."""
  have = dict(have, config=_work(have.get("config", {})))
  diff = []
  # (`measured`: what the methods measured, such as opt-tree's nodes=auto budget; a resumed run takes it over)
  for key in sorted((set(have) | set(want)) - set(skip) - {"measured"}):
    a, b = have.get(key), want.get(key)
    if a == b:
      continue
    if key == "config":
      diff += [f"{k}: {a.get(k)!r} there, {b.get(k)!r} here" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    elif key == "prompts_sha256":
      diff.append("the prompts (their ids, categories or text)")
    elif key == "methods":
      diff.append(f"methods that can run: {', '.join(a or [])} there, {', '.join(b)} here")
    elif key == "method_paths":  # of the methods both name (which methods is the key above); none kept: not compared
      if isinstance(a, dict) and isinstance(b, dict):
        diff += [f"{label}: {k}= leads to {a[label].get(k)} there, {b[label].get(k)} here"
                 for label in sorted(a.keys() & b.keys()) if isinstance(a[label], dict)
                 for k in sorted(set(a[label]) | set(b[label])) if a[label].get(k) != b[label].get(k)]
    else:
      diff.append(f"{key}: {a!r} there, {b!r} here")
  return diff


def read(path: Path) -> tuple[dict | None, dict[tuple[int, str], dict], str | None]:
  """The fingerprint and the runs saved in `path` ((batch, method) -> entry), and a note on lines that could not be
  read (or None). No file: (None, {}, None). Each line is read on its own: a damaged line (cut short by a kill,
  garbled, not UTF-8) loses only its own run, which goes again.

  Raises:
    InputError: the first line, the fingerprint, is damaged while runs were saved: they cannot be matched to this
      run's settings, and they are not thrown away unasked.
  """
  if not path.exists():
    return None, {}, None
  try:
    lines = path.read_bytes().split(b"\n")
  except OSError as e:
    raise InputError(f"{path} cannot be read ({e.strerror or e}): fix it, or pass --fresh or another --out.") from None
  from jaxspec.bench.runner import Record
  fields = {f.name for f in dataclasses.fields(Record)}  # what a kept record must hold to be read back
  runs, damaged = {}, []
  for number, line in enumerate(lines[1:], 2):
    if not line.strip():
      continue
    try:
      entry = json.loads(line.decode("utf-8"))
      entries = _split(entry) if isinstance(entry["records"], dict) else [entry]
      for e in entries:
        if not (isinstance(e["records"], list) and all(isinstance(r, dict) and set(r) == fields
                                                       for r in e["records"])):
          raise TypeError
        float(e["compile_s"]), int(e["program_bytes"])  # noqa: B018 (present and numbers)
      runs.update({(int(e["batch"]), str(e["method"])): e for e in entries})
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
      damaged.append(number)
  try:
    head = json.loads(lines[0].decode("utf-8"))["fingerprint"]
    if not isinstance(head, dict):
      raise TypeError
  except (ValueError, KeyError, TypeError, IndexError, RecursionError):
    if runs:
      raise InputError(f"{path} holds {len(runs)} finished method run(s), but its first line (the settings they were "
                       "run with) is damaged, so they cannot be matched to this run. Pass --fresh to discard them "
                       "and start over, or another --out to keep them.") from None
    return None, {}, f"{path} holds no run that can be read; starting over"
  last = max((i for i, line in enumerate(lines, 1) if line.strip()), default=0)
  damaged = [n for n in damaged if n != last]  # the last line cut short by a kill is expected
  note = (f"{path}: line(s) {', '.join(map(str, damaged))} could not be read; their runs go again" if damaged
          else None)
  return head, runs, note


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
