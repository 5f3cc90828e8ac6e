"""Per-sequence arrays computed once from the frozen target (hidden states, top-k teacher distributions) and kept
on disk in parts, so that a run killed while computing them loses at most one part.

`cached_rows(path, key, ...)` returns the arrays stored in `path` when its key matches. Otherwise it computes them
part by part: each part of `part_rows` sequences is written whole to `<path>.parts/part_NNNNN.npz` (a temporary
name, then a rename) next to `meta.json`, which holds the key. A rerun with the same key reuses the finished parts;
a part that does not load, or a folder whose key differs, is recomputed. When every part is there, the arrays are
joined into `path` and the parts are removed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

Compute = Callable[[np.ndarray], dict[str, np.ndarray]]


def _load(path: Path, key: str) -> dict[str, np.ndarray] | None:
  try:
    with np.load(path) as z:
      if str(z["key"]) == key:
        return {k: z[k] for k in z.files if k != "key"}
  except Exception:  # noqa: BLE001 - a partial or foreign file: recompute
    pass
  return None


def _save(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp.npz")
  np.savez(tmp, key=np.array(key), **arrays)
  os.replace(tmp, path)


def cached_rows(path: Path, key: str, order: np.ndarray, compute: Compute, *, part_rows: int = 256,
                desc: str = "rows", progress: bool = True) -> dict[str, np.ndarray]:
  """Arrays with one row per sequence, computed in parts that survive a kill.

  Args:
    path: the final `.npz` file.
    key: what the arrays are a function of (data, model, settings); stored with them and checked on reuse.
    order: the sequence indices in the order to compute them (e.g. by length, so batches share a length); its
      length is the number of rows N.
    compute: `indices -> {name: array [len(indices), ...]}`, the same names, dtypes and trailing shapes each call.
    part_rows: sequences per part.
    desc: the progress bar's label.
    progress: show a progress bar over sequences.

  Returns:
    `{name: array [N, ...]}`, row i for sequence i.
  """
  whole = _load(path, key) if path.is_file() else None
  if whole is not None:
    return whole
  order = np.asarray(order)
  parts_dir = path.with_name(path.name + ".parts")
  meta = parts_dir / "meta.json"
  try:
    same = json.loads(meta.read_text())["key"] == key
  except (OSError, ValueError, KeyError):
    same = False
  if not same:  # parts of other data or another target: start over
    shutil.rmtree(parts_dir, ignore_errors=True)
    parts_dir.mkdir(parents=True)
    meta.write_text(json.dumps({"key": key}))
  n = len(order)
  out: dict[str, np.ndarray] = {}
  bar = tqdm(total=n, desc=desc, unit="seq", disable=not progress)
  for pi, s in enumerate(range(0, n, part_rows)):
    idx = order[s:s + part_rows]
    part = parts_dir / f"part_{pi:05d}.npz"
    arrays = _load(part, key) if part.is_file() else None
    if arrays is None or any(len(a) != len(idx) for a in arrays.values()):
      arrays = compute(idx)
      _save(part, key, arrays)
    for name, a in arrays.items():
      if name not in out:
        out[name] = np.zeros((n,) + a.shape[1:], a.dtype)
      out[name][idx] = a
    bar.update(len(idx))
  bar.close()
  _save(path, key, out)
  shutil.rmtree(parts_dir, ignore_errors=True)
  return out
