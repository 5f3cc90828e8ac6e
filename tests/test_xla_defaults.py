"""The XLA options jaxspec's commands add per CPU (jaxspec/xla_defaults.py)."""

from __future__ import annotations

import subprocess
import sys

from jaxspec import xla_defaults


def test_avx512_cpus_get_512_bit_vectors_unless_the_user_chose(tmp_path, monkeypatch):
  monkeypatch.setattr(xla_defaults, "backends_started", lambda: False)  # as in a command before its first operation
  monkeypatch.setattr(xla_defaults, "jaxlib_version", lambda: "0.10.2")  # a release known to take the option
  info = tmp_path / "cpuinfo"
  info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n\n"
                  "processor\t: 1\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse4a\n")
  features = xla_defaults.cpu_features(info)
  assert {"avx2", "avx512f", "GenuineIntel", "fpu"} <= features and not {"AuthenticAMD", "sse4a"} & features
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  assert xla_defaults.apply_cpu_defaults(env, features) == ["--xla_cpu_prefer_vector_width=512"]
  assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2 --xla_cpu_prefer_vector_width=512"
  assert xla_defaults.apply_cpu_defaults(env, features) == []  # once only
  assert env["XLA_FLAGS"].count("prefer_vector_width") == 1
  mine = {"XLA_FLAGS": "--xla_cpu_prefer_vector_width=256"}  # the user's own value stays
  assert xla_defaults.apply_cpu_defaults(mine, features) == [] and mine["XLA_FLAGS"].endswith("=256")
  empty = {}
  assert xla_defaults.apply_cpu_defaults(empty, features) == ["--xla_cpu_prefer_vector_width=512"]
  assert empty["XLA_FLAGS"] == "--xla_cpu_prefer_vector_width=512"
  for value in ("0", "false", "Off", "no"):
    off = {xla_defaults.OFF: value}
    assert xla_defaults.apply_cpu_defaults(off, features) == [] and "XLA_FLAGS" not in off, value
  assert xla_defaults.cpu_defaults({xla_defaults.OFF: ""}, features) == ["--xla_cpu_prefer_vector_width=512"]
  assert xla_defaults.cpu_defaults({"XLA_FLAGS": ""}, features) == ["--xla_cpu_prefer_vector_width=512"]
  assert xla_defaults.cpu_defaults({"XLA_FLAGS": "/etc/xla_flags.txt"}, features) == []  # a flags file: left alone
  assert xla_defaults.apply_cpu_defaults({}, {"avx2", "GenuineIntel"}) == []  # no AVX-512: nothing
  # An AMD EPYC with AVX-512 was no faster with 512-bit vectors (benchmarks/README.md): Intel only.
  assert xla_defaults.apply_cpu_defaults({}, {"avx512f", "AuthenticAMD"}) == []
  assert xla_defaults.cpu_features(tmp_path / "missing") == set()
  monkeypatch.setattr(xla_defaults, "backends_started", lambda: True)  # too late: XLA has read its options
  late = {}
  assert xla_defaults.apply_cpu_defaults(late, features) == [] and late == {}


def test_only_jaxlib_releases_known_to_take_the_options_get_them():
  """XLA ends the process at an option it does not know: a jaxlib the options were not tried with gets none."""
  flag = ["--xla_cpu_prefer_vector_width=512"]
  known = (xla_defaults.jaxlib_version() or "").startswith(xla_defaults.KNOWN_JAXLIB)  # the pinned jaxlib is one
  assert xla_defaults.cpu_defaults({}, {"avx512f", "GenuineIntel"}) == (flag if known else [])
  for known in ("0.10.2", "0.11.2"):
    assert xla_defaults.cpu_defaults({}, {"avx512f", "GenuineIntel"}, jaxlib=known) == flag
  for unknown in ("0.12.0", "1.0.0", "0.1.0", None):
    assert xla_defaults.cpu_defaults({}, {"avx512f", "GenuineIntel"}, jaxlib=unknown) == [], unknown


def test_the_command_line_applies_them_first(monkeypatch):
  from jaxspec import cli

  calls = []
  monkeypatch.setattr(xla_defaults, "apply_cpu_defaults", lambda: calls.append("applied") or [])
  assert cli.main(["generate", "--prompt", " "]) == 2  # an empty prompt: an error before any model loads
  assert calls == ["applied"]


def test_xla_accepts_the_option():
  """Importing the command line starts no JAX backend, so the option set next reaches XLA, which accepts it (an
  unknown option would abort the process); once a backend has started nothing is added."""
  code = ("import os, jax; from jaxspec import cli, xla_defaults; assert not xla_defaults.backends_started(); "
          "intel = {'avx512f', 'GenuineIntel'}; added = xla_defaults.apply_cpu_defaults(features=intel); "
          "jax.numpy.ones(2).block_until_ready(); "
          "assert xla_defaults.backends_started() and xla_defaults.apply_cpu_defaults(features=intel) == []; "
          "print(added, os.environ['XLA_FLAGS'])")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "XLA_FLAGS": "--xla_cpu_enable_fast_math=false"})
  assert out.returncode == 0, out.stderr[-2000:]
  if (xla_defaults.jaxlib_version() or "").startswith(xla_defaults.KNOWN_JAXLIB):  # the pinned jaxlib is one
    assert out.stdout.split() == ["['--xla_cpu_prefer_vector_width=512']", "--xla_cpu_enable_fast_math=false",
                                  "--xla_cpu_prefer_vector_width=512"]
  else:  # another jaxlib (a GPU machine's, say) gets nothing its XLA might not know
    assert out.stdout.split() == ["[]", "--xla_cpu_enable_fast_math=false"]
