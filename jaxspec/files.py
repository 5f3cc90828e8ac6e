"""Files written whole or not at all.

Every file jaxspec writes that a later run reads (exported weights and their configs, dataset shards and meta files,
bench results, logs trimmed on resume) goes through here: it is written in full under a temporary name beside its
place and then renamed over it. A rename within a folder is atomic, so a process killed at any moment leaves either
the old file or the new one, never a half-written one. (Nothing is fsynced: a power cut may still lose recent
writes, as for any file the OS has not flushed.)

Temporary names are the file's name, the host and process id, and `.tmp` (`.tmp.npz` for `.npz` files: numpy adds
`.npz` to a name without it), so readers that list a folder skip them by that ending, and the processes of a
multi-host run that write the same file into a shared folder (an NFS or gcsfuse mount) never write into each other's
temporary: each renames a whole file, and the last rename wins. A process killed outright (SIGKILL, a power cut)
leaves its temporary behind; nothing reads it, and a later write of the same file on that host removes it once its
process is gone and it is `STALE_AFTER_S` (an hour) old (a rerun straight after a kill leaves it for then: containers
that share a host name may share process ids, so a younger one may be another live process's).

Files that are appended to (training metrics, bench progress) must have one writer: `primary()` says whether this
process is it (process 0 of a multi-host run; the only process otherwise).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable, Mapping

Writer = Callable[[Path], None]  # writes the whole content to the path it is given


def file_mode() -> int:
  """The permissions open() gives a new file under this process's umask now. Some writers (safetensors' save_file)
  create their files readable by their owner only; every file written here gets these instead, so an export in a
  shared folder is readable by whom the umask allows, like the config.json beside it."""
  try:
    with open("/proc/self/status") as f:  # Linux: the umask read without changing it
      umask = next(int(l.split()[1], 8) for l in f if l.startswith("Umask:"))
  except (OSError, StopIteration, ValueError, IndexError):
    umask = os.umask(0o022)  # elsewhere: set and put back at once
    os.umask(umask)
  return 0o666 & ~umask


def temporary(path: str | os.PathLike) -> Path:
  """Where this process writes `path` before it renames it into place."""
  path = Path(path)
  tag = f"{socket.gethostname()}-{os.getpid()}"  # read at each call: a forked child writes its own
  return path.with_name(f"{path.name}.{tag}" + (".tmp.npz" if path.suffix == ".npz" else ".tmp"))


def is_temporary(path: str | os.PathLike) -> bool:
  """Whether `path` is a temporary of `temporary()`'s form, which readers listing a folder must skip."""
  return Path(path).name.endswith((".tmp", ".tmp.npz"))


def remove_stale(path: str | os.PathLike) -> None:
  """Removes temporaries of `path` that processes of this host left when killed while writing: those whose process
  no longer runs and that nothing has written for `STALE_AFTER_S` (hosts in separate PID namespaces may share a
  name, so a dead-looking process id alone is not enough)."""
  path = Path(path)
  prefix = f"{path.name}.{socket.gethostname()}-"
  for tmp in path.parent.glob(glob.escape(prefix) + "*"):
    match = _STALE_NAME.fullmatch(tmp.name[len(prefix):])
    try:
      if not match or _alive(int(match.group(1))) or time.time() - tmp.stat().st_mtime < STALE_AFTER_S:
        continue
      shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    except OSError:  # removed meanwhile, or not ours to remove
      pass


STALE_AFTER_S = 3600.0
_STALE_NAME = re.compile(r"([0-9]{1,9})\.tmp(\.npz)?")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except (PermissionError, OverflowError, ValueError):  # another user's process; an id this system cannot hold
    return True
  return True


def primary() -> bool:
  """Whether this process writes the files of a run that have one writer: process 0 of a multi-host run."""
  import jax
  return jax.process_index() == 0


def write_files(folder: str | os.PathLike, writers: Mapping[str, Writer]) -> None:
  """Writes files of one folder: each in full under its temporary name first, then renamed in the given order.

  The renames come last, so a kill while writing leaves every old file in place; give the file that readers check
  first (e.g. a config that names the weights) last.
  """
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  for name in writers:
    if (folder / name).is_dir():  # checked before anything is written: the rename over it would fail at the end
      from jaxspec.errors import InputError

      raise InputError(f"{str(folder / name)!r} is a folder where jaxspec writes a file: move it away, or choose "
                       "another output folder.")
    remove_stale(folder / name)
  tmps = {}
  try:
    for name, write in writers.items():
      tmps[name] = temporary(folder / name)
      write(tmps[name])
      _set_mode(tmps[name])
  except BaseException:  # an error or Ctrl-C while writing: the old files stay, and no temporary file is left
    for tmp in tmps.values():
      tmp.unlink(missing_ok=True)
    raise
  for name, tmp in tmps.items():
    os.replace(tmp, folder / name)


# ---- pairs of files: a config and the weights it describes ----
#
# `write_files` renames its files one after another, so a kill between two renames leaves a folder with the new
# weights and the old config. Exports therefore carry a digest of their arrays in both: in each safetensors file's
# metadata and in the config, under `EXPORT_TAG`. Loaders compare the two (`check_export_tag`) and refuse a folder
# whose files come from different exports, naming the fix, instead of running weights under another config. The
# digest depends on the arrays only, so exporting the same weights twice writes the same bytes.

EXPORT_TAG = "jaxspec_export"


def export_tag(*arrays: Mapping[str, Any]) -> str:
  """A digest of named arrays (names, dtypes, shapes and bytes), for `EXPORT_TAG`."""
  import hashlib

  import numpy as np

  digest = hashlib.blake2b(digest_size=12)
  for group in arrays:
    for name in sorted(group):
      a = np.ascontiguousarray(group[name])
      digest.update(f"{name}|{a.dtype}|{a.shape}|".encode())
      digest.update(a.reshape(-1).view(np.uint8).data)
  return digest.hexdigest()


def save_safetensors(tensors: Mapping[str, Any], path: str | os.PathLike, metadata: dict | None = None) -> None:
  """`safetensors.numpy.save_file`, with the metadata's keys in sorted order: the library writes them in a random
  order per process, and an export of the same arrays must give the same bytes."""
  from safetensors.numpy import save_file

  save_file(dict(tensors), str(path), metadata=metadata)
  if metadata and len(metadata) > 1:
    with open(path, "r+b") as f:
      header = _header_bytes(f, path)
      found = json.loads(header).get("__metadata__") or {}
      # (unescaped non-ASCII, as the library writes it: else a key or value with one is never found, nor sorted)
      written = json.dumps(found, separators=(",", ":"), ensure_ascii=False).encode()
      wanted = json.dumps(dict(sorted(found.items())), separators=(",", ":"), ensure_ascii=False).encode()
      if written != wanted and header.count(written) == 1:  # the same bytes in another order: the length holds
        f.seek(8)
        f.write(header.replace(written, wanted))


def _header_bytes(f, path) -> bytes:
  """The JSON header of the safetensors file open as `f` (its first 8 bytes give the header's length)."""
  size = int.from_bytes(f.read(8), "little")
  if not 2 <= size <= 100_000_000:
    raise ValueError(f"{path} has no safetensors header")
  return f.read(size)


def safetensors_metadata(path: str | os.PathLike) -> dict:
  """The `__metadata__` of a safetensors file's header ({} without one), read without its tensors."""
  with open(path, "rb") as f:
    header = json.loads(_header_bytes(f, path))
  metadata = header.get("__metadata__") if isinstance(header, dict) else None
  if not isinstance(header, dict) or not isinstance(metadata, (dict, type(None))):
    raise ValueError(f"{path} has a damaged safetensors header")
  return metadata or {}


def recorded_tag(folder: str | os.PathLike, config: str = "config.json") -> str | None:
  """The `EXPORT_TAG` the folder's config records (None: none, or no readable JSON object)."""
  try:
    return json.loads(Path(folder, config).read_text(encoding="utf-8")).get(EXPORT_TAG)
  except (OSError, ValueError, AttributeError):
    return None


def check_export_tag(folder: str | os.PathLike, weights: list[str], config: str = "config.json") -> None:
  """Raises `ModelLoadError` when the folder's `config` records an `EXPORT_TAG` that one of the safetensors files
  named in `weights` does not carry: the folder was being replaced when its writer stopped. A config without the tag
  (written before it existed, or by another program) is not checked, nor are files that cannot be read (the loader's
  own reading says what is wrong with them), nor weights that carry no tag at all: another program wrote them (e.g.
  transformers' `save_pretrained` of a model loaded from an export, which keeps the config's unknown keys, the tag
  among them, and writes `{"format": "pt"}` alone), and a kill never leaves such weights beside a tagged config, as
  exports rename their config last."""
  want = recorded_tag(folder, config)
  if want is None:
    return
  for name in weights:
    try:
      got = safetensors_metadata(Path(folder) / name).get(EXPORT_TAG)
    except (OSError, ValueError):  # missing or unreadable: the loader's own reading says so
      continue
    if got is not None and got != want:
      from jaxspec.errors import ModelLoadError

      raise ModelLoadError(f"{folder}: its config and {name} come from different exports (a run was stopped while "
                           "it replaced them, or files were copied from two folders): rerun the command that wrote it "
                           "(a finished training run writes its export again), or copy the whole folder again.")


def _set_mode(path: Path) -> None:
  try:
    if path.is_file():
      os.chmod(path, file_mode())
  except OSError:  # a file system without modes (vfat, some network mounts): the file stays as its writer made it
    pass


def write_file(path: str | os.PathLike, write: Writer) -> None:
  """Writes one file whole: `write(tmp)` and then a rename over `path`."""
  path = Path(path)
  write_files(path.parent, {path.name: write})


def write_text(path: str | os.PathLike, text: str) -> None:
  write_file(path, text_writer(text))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
  write_file(path, json_writer(obj, indent))


def text_writer(text: str) -> Writer:
  """A writer of `text`, for `write_files`. Text taken from the command line or from file names holds the bytes that
  were not UTF-8 as lone surrogates (Python's surrogateescape): they are written back as those bytes (a report that
  names a folder `h\xe9ads` names it as it is on disk), not refused with a traceback after the work is done."""
  return lambda tmp: tmp.write_text(text, encoding="utf-8", errors="surrogateescape")


def json_writer(obj: Any, indent: int | None = 1) -> Writer:
  """A writer of `obj` as JSON, for `write_files`."""
  return text_writer(json.dumps(obj, indent=indent))


def read_jsonl(path: str | os.PathLike) -> tuple[list[Any], list[int]]:
  """The JSON values of a JSON-lines file, each line read on its own, and the numbers (from 1) of the lines that are
  not JSON or not UTF-8 (cut short by a kill, or damaged): a bad line costs only itself. Blank lines are skipped."""
  values, bad = [], []
  for number, line in enumerate(Path(path).read_bytes().split(b"\n"), 1):
    if not line.strip():
      continue
    try:
      values.append(json.loads(line.decode("utf-8")))
    except (UnicodeDecodeError, ValueError, RecursionError):
      bad.append(number)
  return values, bad


def write_figure(path: str | os.PathLike, fig: Any, dpi: int = 110) -> None:
  """Saves a matplotlib figure whole (as PNG unless `path` ends otherwise); closes it if pyplot made it."""
  path = Path(path)
  try:
    write_file(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png"))
  finally:
    if getattr(fig.canvas, "manager", None) is not None:
      import matplotlib.pyplot as plt
      plt.close(fig)
