"""Checkpoints of a training state: a thin wrapper over Orbax's `CheckpointManager`.

Each checkpoint is a step directory `<directory>/<step>/` holding three items: `state` (the pytree, written by
Orbax's StandardCheckpointHandler), `meta` (a JSON dict from the caller, e.g. the data position) and `integrity`
(a checksum of every array, since Orbax stores no checksums: bytes overwritten inside an array file restore
silently as wrong numbers).

Saves are atomic: Orbax writes `<step>.orbax-checkpoint-tmp/` and renames it to `<step>/` once everything is on
disk. A process killed mid-save leaves only the temporary directory, which `latest_step` never reports and which
is deleted when the next `Checkpointer` opens the directory.

In a multi-host run every process saves and restores together (Orbax writes each process's shards). The checksums
are computed where the shards are, in one jitted program whose partial sums XLA combines, so no array is gathered
onto a host (integrity format 2; checkpoints of format 1, CRC-32 of each array gathered onto every host, are still
read).
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxspec import sharding
from jaxspec.errors import JaxspecError, filter_unraisable

State = TypeVar("State")

_STATE, _META, _INTEGRITY = "state", "meta", "integrity"
# 2: each leaf's checksum is computed where the leaf lives (`_checksums`), so a sharded state is never gathered;
# 1 (still read): CRC-32 of each leaf's bytes, gathered onto every host first.
_INTEGRITY_FORMAT = 2
_READABLE_FORMATS = (1, 2)


class CheckpointError(JaxspecError):
  """A checkpoint directory that cannot be used: missing, corrupt, or made for another model or optimizer."""


_CLOSED_LOOP = "Event loop is closed"


def _is_closed_loop_report(report) -> bool:
  """Whether an unraisable report is a TensorStore callback into a closed asyncio loop.

  When one read of a damaged checkpoint fails, Orbax raises at once and closes the asyncio loop it ran the reads in;
  TensorStore then completes the other reads on its own threads, and handing each result to the closed loop raises
  `RuntimeError("Event loop is closed")`, which Python prints as a traceback with no owner (dozens of them, after
  the one clear error). They carry nothing the raised error does not, so they are dropped; every other report is not.
  """
  return (report.object is None and isinstance(report.exc_value, RuntimeError)
          and str(report.exc_value) == _CLOSED_LOOP)


def _quiet_closed_loop_reports() -> None:
  filter_unraisable("closed-loop-reports", _is_closed_loop_report)


class Checkpointer:
  """Saves and restores `(state, meta)` pairs under one directory, keeping the newest `max_to_keep`.

  Usage::

    ckpt = Checkpointer("runs/x/checkpoints", max_to_keep=3, every=500)
    if ckpt.latest_step() is not None:
      state, meta = ckpt.restore(state)
    ...
    ckpt.save(step, state, {"step": step})   # writes only when step % every == 0
    ckpt.close()
  """

  def __init__(
      self,
      directory: str | os.PathLike[str],
      max_to_keep: int | None = 3,
      every: int = 1,
      *,
      asynchronous: bool = False,
      verify: bool = True,
  ):
    """Opens (creating it if needed) a checkpoint directory.

    Args:
      directory: where the step directories go; other files there (metrics.jsonl, config.yaml) are left alone.
      max_to_keep: how many of the newest checkpoints to keep; None keeps all.
      every: `save` writes at steps that are multiples of this (unless forced).
      asynchronous: write in a background thread after copying the arrays to the host; `close` waits for it.
      verify: store a CRC32 of every array at save time and check it at restore time.
    """
    _quiet_closed_loop_reports()
    if every < 1:
      raise CheckpointError(f"checkpoint interval must be >= 1 step, got {every}")
    if max_to_keep is not None and max_to_keep < 1:
      raise CheckpointError(f"max_to_keep must be >= 1 or None (keep all), got {max_to_keep}")
    self._directory = Path(directory).expanduser().absolute()
    if self._directory.exists() and not self._directory.is_dir():
      raise CheckpointError(f"checkpoint directory {str(self._directory)!r} exists and is not a directory")
    self._every = every
    self._verify = verify
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every,  # unused: `save` decides itself and always passes force=True to Orbax
        preservation_policy=ocp.checkpoint_managers.LatestN(n=max_to_keep),
        enable_async_checkpointing=asynchronous,
        cleanup_tmp_directories=True,
        create=True,
    )
    handlers = {
        _STATE: ocp.StandardCheckpointHandler(),
        _META: ocp.JsonCheckpointHandler(),
        _INTEGRITY: ocp.JsonCheckpointHandler(),
    }
    self._manager = ocp.CheckpointManager(self._directory, item_handlers=handlers, options=options)
    self._closed = False

  @property
  def directory(self) -> Path:
    return self._directory

  @property
  def every(self) -> int:
    return self._every

  def all_steps(self) -> list[int]:
    """The steps of the finished checkpoints, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The step of the newest finished checkpoint, or None when there is none."""
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether `save(step, ...)` without `force` would write: a multiple of `every` newer than the latest."""
    latest = self.latest_step()
    return step % self._every == 0 and (latest is None or step > latest)

  def save(self, step: int, state: Any, meta: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Writes a checkpoint of `state` and `meta` at `step` if it is due (or `force`), atomically.

    Args:
      step: the training step the state is at (the checkpoint's name).
      state: a pytree of arrays (jax or numpy) and scalars.
      meta: JSON-serialisable data saved alongside (numpy scalars are converted).
      force: write even when `step` is not a multiple of `every`.

    Returns:
      Whether a checkpoint was written (False when it is not due or this step already has one).
    """
    self._check_open()
    step = int(step)
    if step in self._manager.all_steps():
      return False
    if not force and not self.should_save(step):
      return False
    items = {
        _STATE: ocp.args.StandardSave(state),
        _META: ocp.args.JsonSave(_jsonable(dict(meta or {}))),
    }
    if self._verify:
      items[_INTEGRITY] = ocp.args.JsonSave({"format": _INTEGRITY_FORMAT, "leaves": _digests(state, _INTEGRITY_FORMAT)})
    return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))

  def restore(self, state_template: State, step: int | None = None) -> tuple[State, dict[str, Any]]:
    """Reads a checkpoint into the structure, shapes and dtypes of `state_template`.

    Args:
      state_template: a pytree like the saved state (arrays or `jax.ShapeDtypeStruct`s); only its structure,
        shapes, dtypes and shardings are used. Arrays of another dtype are cast to the template's.
      step: which checkpoint; the latest when None.

    Returns:
      `(state, meta)`.

    Raises:
      CheckpointError: there is no such checkpoint, it does not fit the template, or it is corrupt.
    """
    self._check_open()
    self._manager.wait_until_finished()
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise CheckpointError(f"no checkpoint in {str(self._directory)!r} to restore")
      step = steps[-1]
    elif step not in steps:
      have = ", ".join(map(str, steps)) or "none"
      raise CheckpointError(f"no checkpoint for step {step} in {str(self._directory)!r} (steps there: {have})")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)
    self._check_compatible(step, abstract)
    items = {_STATE: ocp.args.StandardRestore(abstract), _META: ocp.args.JsonRestore()}
    has_integrity = (self._step_dir(step) / _INTEGRITY).is_dir()
    if has_integrity and self._verify:
      items[_INTEGRITY] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax and TensorStore raise ValueError, OSError, JSONDecodeError or bare Exception
      if "structures do not match" in str(e):  # same leaves, other containers (e.g. an optimizer's state wrappers)
        raise self._misfit(step, ["the same arrays, in another tree structure"]) from e
      raise self._corrupt(step, _first_line(e)) from e
    state = restored[_STATE]
    meta = restored[_META]
    if not isinstance(meta, dict):
      raise self._corrupt(step, f"its meta item is {type(meta).__name__}, not a JSON object")
    if has_integrity and self._verify:
      self._check_digests(step, state, restored[_INTEGRITY])
    return state, meta

  def wait_until_finished(self) -> None:
    """Blocks until an asynchronous save has been committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager; safe to call twice."""
    if self._closed:
      return
    self._closed = True
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()

  # --- helpers -------------------------------------------------------------------------------------------

  def _check_open(self) -> None:
    if self._closed:
      raise CheckpointError(f"the checkpointer of {str(self._directory)!r} is closed")

  def _step_dir(self, step: int) -> Path:
    return self._directory / str(step)

  def _corrupt(self, step: int, reason: str) -> CheckpointError:
    older = [s for s in self.all_steps() if s < step]
    fallback = (
        f"delete {str(self._step_dir(step))!r} to resume from step {older[-1]}"
        if older
        else f"delete {str(self._step_dir(step))!r} to start over"
    )
    return CheckpointError(
        f"checkpoint at step {step} in {str(self._directory)!r} is corrupt or incomplete ({reason}); "
        f"{fallback}, or use another checkpoint directory"
    )

  def _check_compatible(self, step: int, abstract: Any) -> None:
    """Compares the stored tree's paths and shapes with the template's, naming the leaves that differ."""
    try:
      metadata = self._manager.item_metadata(step)[_STATE]
    except Exception as e:
      raise self._corrupt(step, f"its metadata cannot be read: {_first_line(e)}") from e
    tree = getattr(metadata, "tree", metadata)
    if tree is None:
      raise self._corrupt(step, "it has no state metadata")
    stored = _shapes(ocp.tree.to_flat_dict(tree))
    as_stored = jax.tree.map(_key_data_shape, abstract)
    wanted = _shapes(ocp.tree.to_flat_dict(ocp.tree.serialize_tree(as_stored, keep_empty_nodes=True)))
    missing = sorted(set(wanted) - set(stored))
    extra = sorted(set(stored) - set(wanted))
    reshaped = sorted(k for k in set(wanted) & set(stored) if wanted[k] != stored[k])
    if not (missing or extra or reshaped):
      return
    problems = []
    if missing:
      problems.append("not in the checkpoint: " + _list(missing))
    if extra:
      problems.append("in the checkpoint but not in the template: " + _list(extra))
    if reshaped:
      problems.append(
          "different shapes: " + _list([f"{k} (checkpoint {stored[k]}, template {wanted[k]})" for k in reshaped])
      )
    raise self._misfit(step, problems)

  def _misfit(self, step: int, problems: list[str]) -> CheckpointError:
    return CheckpointError(
        f"checkpoint at step {step} in {str(self._directory)!r} does not fit the state it is restored into "
        f"({'; '.join(problems)}). It was written for another model or optimizer setup: restore with the same "
        "setup, or use another checkpoint directory"
    )

  def _check_digests(self, step: int, state: Any, integrity: Any) -> None:
    if not isinstance(integrity, dict) or integrity.get("format") not in _READABLE_FORMATS:
      raise self._corrupt(step, "its integrity record is unreadable")
    saved = integrity.get("leaves", {})
    bad = []
    for key, digest in _digests(state, integrity["format"]).items():
      want = saved.get(key)
      # A leaf restored as another dtype (cast to the template) cannot be compared byte for byte.
      if want is not None and want.split(":")[:2] == digest.split(":")[:2] and want != digest:
        bad.append(key)
    if bad:
      raise self._corrupt(step, f"checksum mismatch in {_list(bad)}")


def _digests(state: Any, fmt: int) -> dict[str, str]:
  """`{leaf path: "dtype:shape:checksum"}` of every leaf of a pytree, in integrity format `fmt`."""
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  leaves = [jax.random.key_data(x) if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
            else x for _, x in flat]
  if fmt == 1:
    # sharding.fetch gathers an array split across the processes of a multi-host run (every process saves).
    arrays = [np.ascontiguousarray(sharding.fetch(x)).reshape(-1) for x in leaves]
    sums = [zlib.crc32(a.view(np.uint8)) if a.size else 0 for a in arrays]
    names = [a.dtype.name for a in arrays]
  else:
    sums = _checksums(leaves)
    names = [np.dtype(getattr(x, "dtype", None) or np.asarray(x).dtype).name for x in leaves]
  return {jax.tree_util.keystr(path): f"{name}:{'x'.join(map(str, np.shape(x)))}:{int(c):08x}"
          for (path, _), x, name, c in zip(flat, leaves, names, sums)}


# Wrapping uint32 arithmetic: a checksum of 32-bit words, each mixed with its position, summed modulo 2**32. The sum
# does not depend on the order of the reduction, so a leaf split over devices and hosts gets the checksum of the
# whole array from partial sums XLA combines (no shard leaves its device), and numpy on the host computes the same.
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35


def _words(x, xp):
  """`x`'s bits as uint32 words: wider types split into 32-bit words (a trailing axis), narrower ones zero-extended."""
  size = np.dtype(x.dtype).itemsize
  if x.dtype == bool:
    return x.astype(xp.uint32)
  narrow = {1: xp.uint8, 2: xp.uint16, 4: xp.uint32, 8: xp.uint32}[size]
  if xp is np:
    return np.ascontiguousarray(x).view(narrow).reshape(x.shape + ((2,) if size == 8 else ())).astype(np.uint32)
  return jax.lax.bitcast_convert_type(x, narrow).astype(xp.uint32)


def _mix(words, index, xp):
  h = (words ^ (index * xp.uint32(_GOLDEN))) * xp.uint32(_MIX1)
  h = h ^ (h >> xp.uint32(15))
  h = h * xp.uint32(_MIX2)
  return h ^ (h >> xp.uint32(13))


@jax.jit
def _device_checksums(leaves: list) -> list:
  out = []
  for x in leaves:
    w = _words(x, jax.numpy)
    index = jax.numpy.zeros(w.shape, jax.numpy.uint32)
    stride = 1
    for d in reversed(range(w.ndim)):  # the C-order position, built from iotas: no reshape of a sharded array
      index = index + jax.lax.broadcasted_iota(jax.numpy.uint32, w.shape, d) * jax.numpy.uint32(stride % 2 ** 32)
      stride *= w.shape[d]
    out.append(jax.numpy.sum(_mix(w, index, jax.numpy), dtype=jax.numpy.uint32))
  return out


def _host_checksum(x) -> int:
  w = _words(np.asarray(x), np).reshape(-1)
  index = (np.arange(w.size, dtype=np.uint64) & 0xFFFFFFFF).astype(np.uint32)
  with np.errstate(over="ignore"):
    return int(np.sum(_mix(w, index, np), dtype=np.uint32))


def _checksums(leaves: list) -> list[int]:
  """The format-2 checksum of each leaf: device arrays on their devices (one jitted call per set of devices; only
  the scalars come back), anything else on the host."""
  groups: dict[frozenset, list[int]] = {}  # one program per set of devices: jit takes no mix of committed placements
  for i, x in enumerate(leaves):
    if isinstance(x, jax.Array):
      groups.setdefault(frozenset(d.id for d in x.sharding.device_set), []).append(i)
  out: list[int] = [0] * len(leaves)
  for idx in groups.values():
    sums = sharding.fetch(_device_checksums([leaves[i] for i in idx]))
    for i, c in zip(idx, sums):
      out[i] = int(c)
  for i, x in enumerate(leaves):
    if not isinstance(x, jax.Array):
      out[i] = _host_checksum(x)
  return out


def _key_data_shape(leaf: Any) -> Any:
  """A typed PRNG key's template as the uint32 array it is stored as; other leaves unchanged."""
  dtype = getattr(leaf, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return jax.eval_shape(jax.random.key_data, leaf)
  return leaf


def _shapes(flat: Mapping[tuple, Any]) -> dict[str, tuple[int, ...]]:
  """`{"a/b/c": shape}` for the array-like leaves of an Orbax flat dict."""
  return {"/".join(map(str, k)): tuple(v.shape) for k, v in flat.items() if hasattr(v, "shape")}


def _list(items: list[str], limit: int = 6) -> str:
  shown = ", ".join(items[:limit])
  return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _first_line(e: BaseException) -> str:
  """The first line of the innermost exception in `e`'s chain (TensorStore's own message, under Orbax's)."""
  seen = {id(e)}
  while (inner := e.__cause__ or e.__context__) is not None and id(inner) not in seen and len(seen) < 8:
    seen.add(id(inner))
    e = inner
  text = str(e).strip().splitlines()
  line = text[0].split(" See full TensorStore details")[0] if text else ""
  return f"{type(e).__name__}: " + (line if len(line) <= 300 else line[:297] + "...")


def _jsonable(value: Any) -> Any:
  """Meta values as plain JSON types (numpy and jax scalars become Python numbers)."""
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    return _jsonable(np.asarray(value).tolist())
  if isinstance(value, Path):
    return str(value)
  json.dumps(value)  # raises TypeError for anything JSON cannot hold
  return value
