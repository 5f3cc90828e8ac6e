"""Ctrl-C and preemption notices (SIGINT, SIGTERM) acted on at points every process of a run agrees on.

A multi-host run's processes meet in collectives: a training step, a checkpoint save, a sharded decode. A signal
may reach one host only (a preemption notice, Ctrl-C in one ssh session), or each host at its own moment. A process
that stopped where the signal found it would leave the others waiting in their next collective until JAX's
heartbeat timeout. So a `SignalGuard` turns the signal into a flag, and at points the program reaches in the same
order on every process (between training steps, between the bench's method runs) the processes gather their flags:
if any process got one, all of them stop there, together. A second signal to a process while the first is pending
stops that process at once, as without the guard.

In a one-process run the guard only records the signal (callers decide whether to wait for a safe point).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import jax

from jaxspec import sharding
from jaxspec.errors import Terminated

logger = logging.getLogger(__name__)


class SignalGuard:
  """Turns SIGINT/SIGTERM into a flag, from `__enter__` to `__exit__`.

  Args:
    pending: logged at the first signal, after the signal's name ("got SIGTERM; {pending}").
    stopping: logged by a process that stops because another process got a signal.

  Signals are caught on the main thread only (elsewhere they cannot be) and only where they are not ignored.
  """

  def __init__(self, pending: str = "stopping at the next safe point",
               stopping: str = "another process got a signal: stopping"):
    self.pending, self.stopping = pending, stopping
    self.signum: int | None = None
    self.peer_stopped = False  # another process of a multi-host run got the signal, this one did not
    self.agreed: bool | None = None  # multi-host: whether the last agreement saw a signal (None: none yet)
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> SignalGuard:
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
          self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info: object) -> None:
    self._restore()

  def agree(self) -> bool:
    """Whether any process of the run got a signal: the same answer on every process (a gather of one flag each),
    so every process must call it at the same point. In a one-process run, whether this one did."""
    self.agreed = bool(sharding.each_process(self.signum is not None).any())
    self.peer_stopped = self.agreed and self.signum is None
    if self.peer_stopped:
      logger.warning(self.stopping)
    return self.agreed

  def _handle(self, signum: int, frame: Any) -> None:
    if self.signum is not None:
      self._restore()
      raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    self.signum = signum
    logger.warning("got %s; %s", signal.Signals(signum).name, self.pending)

  def _restore(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    self._previous = {}

  def redeliver(self) -> None:
    """Acts on the caught signal as it would have been without the guard (once the work is saved); a process
    stopped by another's signal ends as after Ctrl-C."""
    self._restore()
    if self.signum == signal.SIGINT or (self.signum is None and self.peer_stopped):
      raise KeyboardInterrupt
    if self.signum is not None:
      if jax.process_count() > 1 and signal.getsignal(self.signum) in (signal.SIG_DFL, None):
        # The signal ends this process: leave the run first, or the others' exit waits for it and then aborts.
        jax.distributed.shutdown()
      signal.raise_signal(self.signum)
