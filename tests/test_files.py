"""`jaxspec.files`: whole-file writes (the order of their renames, stale temporaries), JSON-lines reading, figures."""

import os
import socket
import time

import pytest

from jaxspec import files


def test_renames_come_in_the_given_order(tmp_path, monkeypatch):
  """A kill between two renames leaves the files renamed first new and the rest old: exports give their config last,
  so a folder a kill left half replaced has new weights beside the old config (which the export tags catch), never a
  new config naming weights that are not there yet."""
  files.write_files(tmp_path, {"w.bin": files.text_writer("old weights"), "config.json": files.text_writer("old")})
  replace, renamed = os.replace, []

  def killed_at_the_second(src, dst):
    if renamed:
      raise KeyboardInterrupt
    renamed.append(os.path.basename(dst))
    replace(src, dst)

  monkeypatch.setattr(os, "replace", killed_at_the_second)
  with pytest.raises(KeyboardInterrupt):
    files.write_files(tmp_path, {"w.bin": files.text_writer("new weights"), "config.json": files.text_writer("new")})
  assert renamed == ["w.bin"]
  assert (tmp_path / "w.bin").read_text() == "new weights" and (tmp_path / "config.json").read_text() == "old"


def _stale(path, pid, folder=False):
  """A temporary of `path` that process `pid` of this host left, last written over an hour ago."""
  tmp = path.with_name(f"{path.name}.{socket.gethostname()}-{pid}.tmp")
  if folder:
    tmp.mkdir()
    (tmp / "part").write_text("half")
  else:
    tmp.write_text("half")
  old = time.time() - files.STALE_AFTER_S - 60
  os.utime(tmp, (old, old))
  return tmp


def _gone_pid():
  """The id of a process that has ended."""
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  return int(proc.stdout)


def test_stale_temporaries_are_removed_folders_too_but_not_another_user_s(tmp_path, monkeypatch):
  """A temporary that is a folder goes as a file does; one whose process this user may not signal (another user's,
  on a shared host) is taken as running and stays."""
  target = tmp_path / "results.json"
  gone = _gone_pid()
  folder = _stale(target, gone, folder=True)
  files.write_json(target, {})
  assert not folder.exists()

  others = _stale(target, gone)
  kill = os.kill

  def not_ours(pid, sig):
    if pid == gone:
      raise PermissionError(1, "Operation not permitted")
    return kill(pid, sig)

  monkeypatch.setattr(os, "kill", not_ours)
  files.write_json(target, {})
  assert others.exists()
  monkeypatch.setattr(os, "kill", kill)
  files.write_json(target, {})
  assert not others.exists()


def test_json_lines_skip_blank_lines_and_count_every_line(tmp_path):
  """Blank lines are no records and not bad ones; a bad line (here nested past Python's recursion limit, which
  `json` raises as RecursionError) is named by its number, counted from 1 over all lines, blank ones included."""
  path = tmp_path / "log.jsonl"
  deep = "[" * 100_000 + "]" * 100_000
  path.write_text('{"a": 1}\n\n  \n' + deep + '\n{"b": 2}\n\n')
  assert files.read_jsonl(path) == ([{"a": 1}, {"b": 2}], [4])


def test_a_figure_is_closed_once_written(tmp_path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig = plt.figure()
  files.write_figure(tmp_path / "f.png", fig)
  assert (tmp_path / "f.png").read_bytes().startswith(b"\x89PNG") and not plt.fignum_exists(fig.number)
