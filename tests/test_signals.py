"""`jaxspec.signals.SignalGuard` in one process, with the gather of the processes' flags stood in for: what a second
signal does, what agreeing says, and how the caught signal is acted on. (Real multi-process runs:
tests/test_multihost.py, marked slow.)"""

import logging
import signal

import numpy as np
import pytest

from jaxspec import sharding, signals
from jaxspec.errors import Terminated


@pytest.fixture
def handlers():
  """SIGINT and SIGTERM handlers that record the signals they get (what "the handler before the guard" does), put
  back as they were afterwards."""
  got = []
  previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  mine = {s: (lambda signum, frame: got.append(signum)) for s in previous}
  for s, h in mine.items():
    signal.signal(s, h)
  try:
    yield got, mine
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def _peers(monkeypatch, *others: bool):
  """Stands in for a run of 1 + len(others) processes: this one first, then the others' flags."""
  monkeypatch.setattr(sharding, "each_process", lambda flag: np.array([flag, *others], np.int32))


@pytest.mark.parametrize("signum,error", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_a_second_signal_stops_at_once_as_that_signal(handlers, signum, error):
  """The first signal only sets the flag; a second one raises at once, SIGTERM as `Terminated` (exit code 143 from
  the CLI, not Ctrl-C's 130), and puts back the handlers from before the guard: a third signal, while the program
  unwinds inside the guard, is theirs (a SIGTERM with the default handler ends the process)."""
  got, mine = handlers
  with signals.SignalGuard() as guard:
    signal.raise_signal(signum)
    assert guard.signum == signum and got == []
    with pytest.raises(KeyboardInterrupt) as e:
      signal.raise_signal(signum)
    assert type(e.value) is error
    assert {s: signal.getsignal(s) for s in mine} == mine
    signal.raise_signal(signum)
    assert got == [signum]
  assert {s: signal.getsignal(s) for s in mine} == mine


def test_agreeing_says_whether_any_process_got_a_signal_and_who(monkeypatch, caplog):
  guard = signals.SignalGuard(stopping="a peer stopped us (test)")
  _peers(monkeypatch, False, False)
  assert guard.agree() is False and guard.agreed is False and not guard.peer_stopped
  _peers(monkeypatch, False, True)  # another process got one: every process stops, this one as a peer
  with caplog.at_level(logging.WARNING, logger="jaxspec.signals"):
    assert guard.agree() is True and guard.peer_stopped
  assert "a peer stopped us (test)" in caplog.text
  caplog.clear()
  guard.signum = signal.SIGTERM  # this process got one itself: not stopped by a peer, and it does not say so
  with caplog.at_level(logging.WARNING, logger="jaxspec.signals"):
    assert guard.agree() is True and not guard.peer_stopped
  assert "a peer stopped us" not in caplog.text


def test_redelivering_acts_as_the_signal_would_have(handlers, monkeypatch):
  """After the work is saved: SIGINT is Ctrl-C's KeyboardInterrupt; SIGTERM goes to the handler from before the guard
  (which may end the process); a process that only a peer's signal stopped ends as after Ctrl-C; one that got its own
  signal after agreeing that a peer's stops the run acts on its own."""
  got, _ = handlers
  with signals.SignalGuard() as guard:
    signal.raise_signal(signal.SIGINT)
  with pytest.raises(KeyboardInterrupt):
    guard.redeliver()
  assert got == []
  with signals.SignalGuard() as guard:
    signal.raise_signal(signal.SIGTERM)
  guard.redeliver()
  assert got == [signal.SIGTERM]
  _peers(monkeypatch, True)
  with signals.SignalGuard() as guard:
    assert guard.agree() and guard.peer_stopped
  with pytest.raises(KeyboardInterrupt):
    guard.redeliver()
  with signals.SignalGuard() as guard:
    assert guard.agree() and guard.peer_stopped
    signal.raise_signal(signal.SIGTERM)
  guard.redeliver()
  assert got == [signal.SIGTERM, signal.SIGTERM]
  # Nothing caught, no peer: nothing to act on.
  _peers(monkeypatch)
  with signals.SignalGuard() as guard:
    assert not guard.agree()
  guard.redeliver()
  assert got == [signal.SIGTERM, signal.SIGTERM]
