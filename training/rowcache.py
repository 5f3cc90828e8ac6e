"""Per-sequence arrays computed once from the frozen target (hidden states, top-k teacher distributions) and kept
on disk in parts, so that a run killed while computing them loses at most one part.

`cached_rows(path, key, ...)` returns the arrays stored in `path` when its key matches. Otherwise it computes them
part by part: each part of `part_rows` sequences is written whole to `<path>.parts/part_NNNNN.npz` (a temporary
name, then a rename) next to `meta.json`, which holds the key (`<path>.parts.<i>/` for process i > 0 of a multi-host
run: each process computes every row, into parts of its own). A rerun with the same key reuses the finished parts;
a part that does not load, or a folder whose key differs, is recomputed. When every part is there, the arrays are
joined into `path` and the parts are removed.

With `row_keys` (one content key per sequence, `sequence_key`), `key` names only what the arrays are computed with
(the target, the settings) and the data is named row by row: a file in `path` with the same `key` but other data
gives every row whose sequence it already holds, and only the new sequences are computed. So adding data to a run
(more samples, another folder) computes the target's arrays for the added sequences only.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxspec import files

Compute = Callable[[np.ndarray, Callable[[int], None]], dict[str, np.ndarray]]  # (indices, advance) -> arrays
ROW_KEYS = "row_keys"  # stored next to the arrays when the rows are named by content
# Stored as one more row array: each row's share of the seconds its part's `compute` took, so rows taken from an
# older file bring their own time along and `compute_seconds` counts the rows a file holds, whoever computed them.
ROW_SECONDS = "row_seconds"


def sequence_key(tokens: np.ndarray) -> bytes:
  """A 16-byte content key of one sequence's token ids (their values and count)."""
  return hashlib.blake2b(np.ascontiguousarray(np.asarray(tokens, np.int32)).view(np.uint8), digest_size=16).digest()


def _load(path: Path, key: str) -> dict[str, np.ndarray] | None:
  try:
    with np.load(path) as z:
      if str(z["key"]) == key:
        return {k: z[k] for k in z.files if k != "key"}
  except Exception:  # noqa: BLE001 - a partial or foreign file: recompute
    pass
  return None


def _take_rows(path: Path, key: str, rk: np.ndarray, out: dict[str, np.ndarray]) -> tuple[np.ndarray, bool]:
  """Puts into `out` (arrays of len(rk) rows) the rows of the sequences in `rk` that the file in `path` holds, when
  its key is `key` and its rows are named; returns their indices in `rk` (none for another or a broken file) and
  whether the file holds exactly these rows."""
  try:
    with np.load(path) as z:
      if str(z["key"]) != key or ROW_KEYS not in z.files:
        return np.zeros(0, np.int64), False
      held = z[ROW_KEYS]
      names = [name for name in z.files if name not in ("key", ROW_KEYS)]
      if np.array_equal(held, rk):  # the same data
        out.update((name, z[name]) for name in names)
        return np.arange(len(rk)), True
      where = {bytes(h): i for i, h in enumerate(held)}
      found = np.array([where.get(bytes(r), -1) for r in rk], np.int64)
      rows = np.nonzero(found >= 0)[0]
      for name in names if len(rows) else ():
        a = z[name]  # one array at a time
        out[name] = np.zeros((len(rk),) + a.shape[1:], a.dtype)
        out[name][rows] = a[found[rows]]
        del a
      return rows, False
  except Exception:  # noqa: BLE001 - a partial or foreign file: recompute
    out.clear()
    return np.zeros(0, np.int64), False


def _save(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
  files.write_file(path, lambda tmp: np.savez(tmp, key=np.array(key), **arrays))


def compute_seconds(path: Path) -> float:
  """The seconds the target spent computing the rows a file of `cached_rows` holds, whichever process computed
  each (a killed run's finished parts count once). 0 for a missing file; rows written before this was recorded
  count 0."""
  try:
    with np.load(path) as z:
      return float(z[ROW_SECONDS].sum()) if ROW_SECONDS in z.files else 0.0
  except Exception:  # noqa: BLE001 - missing or unreadable: nothing recorded
    return 0.0


def cached_rows(path: Path, key: str, order: np.ndarray, compute: Compute, *, row_keys=None, part_rows: int = 256,
                desc: str = "rows", progress: bool = True) -> dict[str, np.ndarray]:
  """Arrays with one row per sequence, computed in parts that survive a kill.

  Args:
    path: the final `.npz` file.
    key: what the arrays are a function of (data, model, settings); stored with them and checked on reuse. With
      `row_keys`, the model and settings only.
    order: the sequence indices in the order to compute them (e.g. by length, so batches share a length); its
      length is the number of rows N.
    compute: `(indices, advance) -> {name: array [len(indices), ...]}`, the same names, dtypes and trailing shapes
      each call; `advance(n)` moves the progress bar by n sequences as batches of a part finish (whatever a part
      does not report is counted when it ends).
    row_keys: optional, N content keys (`sequence_key`): rows of sequences that a file in `path` with the same `key`
      already holds are taken from it, and only the others are computed.
    part_rows: sequences per part.
    desc: the progress bar's label.
    progress: show a progress bar over sequences.

  Returns:
    `{name: array [N, ...]}`, row i for sequence i. The file also keeps each row's compute time
    (`compute_seconds`).
  """
  order = np.asarray(order)
  n = len(order)
  rk = None if row_keys is None else np.asarray(list(row_keys), dtype="S16")
  if rk is not None and len(rk) != n:
    raise ValueError(f"{len(rk)} row keys for {n} rows")
  out: dict[str, np.ndarray] = {}
  if rk is None:
    whole = _load(path, key) if path.is_file() else None
    if whole is not None:
      whole.pop(ROW_KEYS, None)
      whole.pop(ROW_SECONDS, None)
      return whole
  elif path.is_file():
    held_rows, exact = _take_rows(path, key, rk, out)
    if len(held_rows) == n:
      if not exact:  # a larger file: keep this run's rows only, as when some are computed
        _save(path, key, {**out, ROW_KEYS: rk})
      out.pop(ROW_SECONDS, None)
      return out
    order = order[~np.isin(order, held_rows)]
  # Parts are named by the rows still to compute, so a rerun that finds other rows held computes its parts anew.
  parts_key = key if rk is None else key + ":" + hashlib.blake2b(rk[order].tobytes(), digest_size=16).hexdigest()
  # Each process of a multi-host run computes every row itself: its parts are its own (the file they make is written
  # whole by whichever process ends first, and again by the others).
  index = jax.process_index()
  parts_dir = path.with_name(path.name + ".parts" + (f".{index}" if index else ""))
  meta = parts_dir / "meta.json"
  try:
    same = json.loads(meta.read_text())["key"] == parts_key
  except (OSError, ValueError, KeyError):
    same = False
  if not same:  # parts of other data or another target: start over
    shutil.rmtree(parts_dir, ignore_errors=True)
    parts_dir.mkdir(parents=True, exist_ok=True)
    files.write_json(meta, {"key": parts_key}, indent=None)
  bar = tqdm(total=n, initial=n - len(order), desc=desc, unit="seq", disable=not progress)
  for pi, s in enumerate(range(0, len(order), part_rows)):
    idx = order[s:s + part_rows]
    part = parts_dir / f"part_{pi:05d}.npz"
    arrays = _load(part, parts_key) if part.is_file() else None
    reported = [0]
    if arrays is None or any(len(a) != len(idx) for a in arrays.values()):
      def advance(k: int) -> None:
        k = min(k, len(idx) - reported[0])
        reported[0] += k
        bar.update(k)
      t0 = time.perf_counter()
      arrays = compute(idx, advance)
      arrays[ROW_SECONDS] = np.full(len(idx), (time.perf_counter() - t0) / len(idx))
      _save(part, parts_key, arrays)
    for name, a in arrays.items():
      if name not in out:
        out[name] = np.zeros((n,) + a.shape[1:], a.dtype)
      out[name][idx] = a
    bar.update(len(idx) - reported[0])
  bar.close()
  _save(path, key, out if rk is None else {**out, ROW_KEYS: rk})
  shutil.rmtree(parts_dir, ignore_errors=True)
  out.pop(ROW_SECONDS, None)
  return out
