"""What the benchmark scripts share on the command line: argument types that refuse a nonsense count, list or method
name as the arguments are read (before a model loads), and `run`, which ends a script on a user's error (a missing
prompt file, a model path that is none, a method that cannot run here) with one line, as the `jaxspec` command does,
instead of a traceback.

The scripts run as `python benchmarks/NAME.py`, which puts this folder first on `sys.path`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable


def whole_number(minimum: int = 1) -> Callable[[str], int]:
  """An argparse type: a whole number >= `minimum`."""
  def parse(text: str) -> int:
    try:
      v = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if v < minimum:
      raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
    return v
  return parse


positive_int = whole_number(1)


def int_list(minimum: int = 1) -> Callable[[str], list[int]]:
  """An argparse type: comma-separated whole numbers, each >= `minimum`, at least one."""
  one = whole_number(minimum)

  def parse(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
      raise argparse.ArgumentTypeError(f"must be comma-separated whole numbers, got {text!r}")
    try:
      return [one(p) for p in parts]
    except argparse.ArgumentTypeError as e:
      raise argparse.ArgumentTypeError(f"{e} (in {text!r})" if len(parts) > 1 else str(e)) from None
  return parse


def method_list(text: str) -> list[str]:
  """An argparse type: comma-separated bench methods (`jaxspec bench --list-methods`), each name and option checked."""
  from jaxspec.bench.methods import parse_method
  from jaxspec.errors import InputError

  labels = [m.strip() for m in text.split(",") if m.strip()]
  if not labels:
    raise argparse.ArgumentTypeError("names no method: give comma-separated names (jaxspec bench --list-methods)")
  try:
    for label in labels:
      parse_method(label)
  except InputError as e:
    raise argparse.ArgumentTypeError(str(e)) from None
  return labels


def run(main: Callable[[list[str] | None], int | None], prog: str, argv: list[str] | None = None) -> int:
  """`main(argv)`'s exit code; jaxspec's errors for the user (`JaxspecError`) end it with one line, `PROG: error:
  ...`, and code 2 (argparse's own for a wrong argument)."""
  from jaxspec.errors import JaxspecError

  try:
    return main(argv) or 0
  except JaxspecError as e:
    print(f"{os.path.basename(prog)}: error: {e}", file=sys.stderr)
    return 2
