"""XLA options jaxspec's commands choose per CPU, by measurement (benchmarks/README.md, "512-bit vectors on AVX-512
CPUs").

XLA:CPU compiles a one-token step's matrix-vector products and its fused element-wise work to LLVM code that uses
256-bit vectors unless told otherwise. On Intel CPUs with AVX-512, 512-bit vectors made a greedy step of the default
model about 9 % shorter on the 2-core Intel Xeon VM this project ran on (the same tokens); on a 2-core AMD EPYC with
AVX-512 they did not (greedy at batch 1 15 % and 5 % slower in two runs each), so they are chosen for Intel only. XLA
reads its options once, when the CPU backend starts, so they must be in `XLA_FLAGS` before anything touches a device:
`jaxspec`'s command line calls `apply_cpu_defaults()` first thing; library users can call it the same way, before
their first JAX operation.

An option the user already gave in `XLA_FLAGS` (with any value) is left as it is, and `JAXSPEC_XLA_DEFAULTS=0` turns
the defaults off. Options are added only under the jaxlib releases they were seen to work with (`KNOWN_JAXLIB`): XLA
ends the process at an option it does not know, and releases drop options. Nothing is added once JAX's backends have
started (it would not take effect, and would only make `XLA_FLAGS` say something untrue to the processes this one
starts), nor to an `XLA_FLAGS` that names a flags file.
"""

from __future__ import annotations

import os
from pathlib import Path

# (what /proc/cpuinfo must list: feature flags and the vendor_id, the XLA option they enable)
CPU_DEFAULTS = ((("avx512f", "GenuineIntel"), "--xla_cpu_prefer_vector_width=512"),)
OFF = "JAXSPEC_XLA_DEFAULTS"
# jaxlib releases whose XLA takes the options above: 0.10.2 (pinned, tested) and 0.11.2 (ran them on a GPU machine)
KNOWN_JAXLIB = ("0.10.", "0.11.")


def jaxlib_version() -> str | None:
  """The installed jaxlib's version, read without importing it (None where it is not installed)."""
  from importlib import metadata
  try:
    return metadata.version("jaxlib")
  except metadata.PackageNotFoundError:
    return None


def cpu_features(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> set[str]:
  """The feature flags of the first CPU in `cpuinfo` and its vendor_id, e.g. {"avx512f", ..., "GenuineIntel"}
  (empty where there is no such file, as on macOS)."""
  try:
    text = Path(cpuinfo).read_text()
  except OSError:
    return set()
  found: set[str] = set()
  for line in text.split("\n\n", 1)[0].splitlines():  # the first CPU's block
    key, _, value = line.partition(":")
    if key.strip() == "flags":
      found |= set(value.split())
    elif key.strip() == "vendor_id":
      found.add(value.strip())
  return found


def cpu_defaults(environ: dict | None = None, features: set[str] | None = None,
                 jaxlib: str | None = "installed") -> list[str]:
  """The options `apply_cpu_defaults` would add to `XLA_FLAGS` here (`jaxlib`: a version to decide for instead of the
  installed one)."""
  environ = os.environ if environ is None else environ
  if environ.get(OFF, "1").strip().lower() in ("0", "false", "no", "off"):
    return []
  jaxlib = jaxlib_version() if jaxlib == "installed" else jaxlib
  if not (jaxlib or "").startswith(KNOWN_JAXLIB):
    return []  # an XLA these options were not tried with may not know them, and would end the process
  given = environ.get("XLA_FLAGS", "").strip()
  if given and not given.startswith("-"):
    return []  # XLA reads a value that is not options as the name of a file of options
  features = cpu_features() if features is None else features
  return [flag for needs, flag in CPU_DEFAULTS
          if set(needs) <= features and flag.split("=", 1)[0] not in given]


def apply_cpu_defaults(environ: dict | None = None, features: set[str] | None = None) -> list[str]:
  """Adds this CPU's options to `XLA_FLAGS` (see the module's text) and returns the ones it added. It has no effect
  on a process whose JAX backends have already started."""
  environ = os.environ if environ is None else environ
  if backends_started():
    return []
  added = cpu_defaults(environ, features)
  if added:
    environ["XLA_FLAGS"] = " ".join([environ.get("XLA_FLAGS", "").strip(), *added]).strip()
  return added


def backends_started() -> bool:
  """Whether this process's JAX backends have started (XLA has read its options)."""
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # another JAX: assume not, as the command calls this first thing
    return False
