"""Whether a compiled program fits the memory left on its devices, checked before it runs.

XLA says what a compiled program needs (`memory_analysis`: its outputs and temporaries; its arguments are already
held). A request that cannot fit — a T5 encoder input of 30k tokens, whose attention scores grow with its square, or a
batch whose cache outgrows the device — is refused with the sizes and what to change, instead of an XLA
`RESOURCE_EXHAUSTED` traceback on a GPU or TPU, or the kernel killing the process on a CPU host.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Iterable

import jax
import numpy as np

from jaxspec.errors import OutOfMemory

_CGROUP = Path("/sys/fs/cgroup")


def program_bytes(program) -> tuple[int, int]:
  """`(total, new)` bytes of a compiled program on each of its devices, as XLA counts them: total = arguments +
  outputs + temporaries, new = what running it adds (outputs and temporaries not aliased to its arguments, which are
  already held). (0, 0) where the backend does not say. (Asking takes about 10 ms: callers keep the answer.)"""
  try:
    m = program.memory_analysis()
    new = int(m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
    return new + int(m.argument_size_in_bytes), max(new, 0)
  except Exception:  # noqa: BLE001 - not every backend reports memory
    return 0, 0


def _own_cgroups() -> dict[str, str]:
  """This process's cgroup paths from /proc/self/cgroup: "" for the v2 hierarchy ("0::/path"), and each v1
  controller's name ("4:memory:/path", or one line for several, "5:cpu,cpuacct:/path")."""
  try:
    lines = Path("/proc/self/cgroup").read_text().splitlines()
  except OSError:
    return {}
  paths = {}
  for line in lines:
    parts = line.split(":", 2)
    if len(parts) == 3:
      for name in parts[1].split(","):
        paths.setdefault(name, parts[2].strip())
  return paths


def _up_to(root: Path, rel: str) -> tuple[Path, ...]:
  """`root`/`rel` and its ancestors up to `root`, innermost first."""
  here = root / rel.lstrip("/")
  return tuple(d for d in (here, *here.parents) if d == root or root in d.parents) or (root,)


@functools.lru_cache(maxsize=None)
def _cgroup_dirs(root: Path) -> tuple[Path, ...]:
  """This process's cgroup v2 folder and its ancestors up to `_CGROUP`, innermost first: a limit set on any of them
  binds (a container sees its own cgroup as the root; a SLURM job or systemd unit on a host sits deeper). On a host
  with cgroup v1 (older distributions, some container runtimes), the v1 memory controller's folders under
  `_CGROUP`/memory instead. Read once: a process stays in its cgroup."""
  own = _own_cgroups()
  v1 = root / "memory"
  if "memory" in own and (v1 / "memory.limit_in_bytes").exists():
    return _up_to(v1, own["memory"])
  return _up_to(root, own.get("", "/"))


def _cgroup_room(folder: Path) -> int | None:
  """Room left under `folder`'s memory limit (v2 memory.max, v1 memory.limit_in_bytes), counting its reclaimable
  page cache as free (the usage holds the file cache, e.g. the model's weights as read, which the kernel drops
  before it kills anything); None: no limit."""
  v1 = not (folder / "memory.max").exists() and (folder / "memory.limit_in_bytes").exists()
  try:
    if v1:
      limit = int((folder / "memory.limit_in_bytes").read_text())
      if limit >= 1 << 62:  # v1 writes "no limit" as the largest page-aligned 64-bit count
        return None
      used = int((folder / "memory.usage_in_bytes").read_text())
    else:
      text = (folder / "memory.max").read_text().strip()
      if text == "max":
        return None
      limit, used = int(text), int((folder / "memory.current").read_text())
  except (OSError, ValueError):
    return None
  try:
    stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines() if line.strip())
    # v1 counts the folder's own pages in inactive_file, its whole subtree's in total_inactive_file, as its usage does
    prefix = "total_" if v1 and "total_inactive_file" in stat else ""
    used -= int(stat.get(prefix + "inactive_file", 0)) + int(stat.get(prefix + "active_file", 0))
  except (OSError, ValueError):
    pass
  return limit - max(used, 0)


def host_available_bytes() -> int:
  """Memory this process can still take on the host: the kernel's estimate of available memory, within the room left
  under the cgroup's limit where one is set (a container's limit is not in /proc/meminfo)."""
  import psutil

  room = int(psutil.virtual_memory().available)
  for folder in _cgroup_dirs(_CGROUP):
    left = _cgroup_room(folder)
    if left is not None:
      room = min(room, left)
  return max(room, 0)


def free_bytes(devices: Iterable[Any]) -> int | None:
  """The least memory free on any of this process's `devices` for a program that takes the same amount on each: a
  GPU's or TPU's limit less what is in use; CPU devices share the host's memory, so it is split among them. None
  where a device does not say."""
  devices = [d for d in devices if d.process_index == jax.process_index()]
  if not devices:
    return None
  if all(d.platform == "cpu" for d in devices):
    return host_available_bytes() // len(devices)
  room = []
  for d in devices:
    stats = d.memory_stats() if hasattr(d, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
      return None
    room.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
  return min(room)


def check_fits(need: int, devices: Iterable[Any], advice: str) -> None:
  """Raises OutOfMemory (an InputError) when a program that adds `need` bytes on each of `devices` (`program_bytes`)
  does not fit what they have free; `advice` says what to make smaller. In a multi-host run every process must call
  it: the shortest process decides for all (one of them refusing alone would leave the others waiting in the
  program)."""
  devices = list(devices)
  room = free_bytes(devices)
  mib = np.array([need >> 20, -1 if room is None else room >> 20], np.int64)
  # Only a program over other processes' devices runs in step with them: a program on this process's devices alone
  # (no mesh, or a mesh of local devices) decides alone, and may be run by this process only.
  if jax.process_count() > 1 and any(d.process_index != jax.process_index() for d in devices):
    from jaxspec import sharding

    each = sharding.each_process(np.minimum(mib, np.iinfo(np.int32).max).astype(np.int32))
    known = each[each[:, 1] >= 0]
    if not len(known):
      return
    mib = known[np.argmin(known[:, 1] - known[:, 0])]
  need_mib, room_mib = int(mib[0]), int(mib[1])
  if room_mib < 0 or need_mib <= room_mib:
    return
  where = "the host" if all(d.platform == "cpu" for d in devices) else "a device"
  raise OutOfMemory(f"This request needs about {need_mib / 1024:.1f} GiB more memory per device to decode, and "
                    f"{where} has {room_mib / 1024:.1f} GiB free", advice)


def is_out_of_memory(error: BaseException) -> bool:
  """Whether an error from running a program is XLA running out of memory (the check above could not see it
  coming: other programs took the memory meanwhile, or the allocator's pieces were too small)."""
  return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)
