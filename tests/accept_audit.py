"""An opt-in pytest plugin that records, for every `generate()` call, how many of its steps accepted drafted tokens.

A "method X equals greedy" test whose drafts are never accepted only checks the rejection path: its output would
be greedy even if accepted tokens were mishandled. This plugin finds such tests.

    python -m pytest -q -n 2 -p tests.accept_audit --accept-report=/tmp/acc   # one JSONL file per process: /tmp/acc.*
    python tests/accept_audit.py /tmp/acc.*                                    # tests with drafts and no accepted draft

Calls made while a fixture is built count for the first test that uses it.
"""

from __future__ import annotations

import collections
import json
import os
import sys

import numpy as np
import pytest

_records: list[dict] = []
_current: dict = {"test": None}


def pytest_addoption(parser):
  parser.addoption("--accept-report", metavar="PATH", default=None,
                   help="write each generate() call's accepted-draft counts to PATH.<process> (JSONL)")


def pytest_configure(config):
  if not config.getoption("--accept-report"):
    return
  from jaxspec.decoding import generate as gen

  init = gen.GenerationResult.__init__

  def recording_init(self, *args, **kwargs):
    init(self, *args, **kwargs)
    hist = np.asarray(self.accept_hist)  # [B, T + 1]: steps that committed a tokens, a = 0..T
    _records.append(dict(test=_current["test"], nodes=int(hist.shape[1]) - 2, steps=int(hist.sum()),
                         multi_token_steps=int(hist[:, 2:].sum())))

  gen.GenerationResult.__init__ = recording_init


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  _current["test"] = item.nodeid
  yield
  _current["test"] = None


def pytest_sessionfinish(session):
  path = session.config.getoption("--accept-report")
  if path and _records:
    with open(f"{path}.{os.environ.get('PYTEST_XDIST_WORKER', 'main')}", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in _records)


def never_accepted(paths: list[str]) -> list[tuple[str, int, int]]:
  """(test, calls with drafts, their steps) of the tests that drafted and never committed more than one token."""
  by_test = collections.defaultdict(list)
  for p in paths:
    with open(p) as f:
      for line in f:
        r = json.loads(line)
        if r["nodes"] > 0:
          by_test[r["test"]].append(r)
  return sorted((t, len(rs), sum(r["steps"] for r in rs)) for t, rs in by_test.items()
                if sum(r["multi_token_steps"] for r in rs) == 0)


if __name__ == "__main__":
  rows = never_accepted(sys.argv[1:])
  for test, calls, steps in rows:
    print(f"{calls:3d} calls {steps:5d} steps  {test}")
  print(f"{len(rows)} tests drafted and never accepted a draft")
