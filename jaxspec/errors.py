"""Errors a user can meet. Each message says what was wrong and what to do; the CLI prints it without a traceback.
Anything else that escapes is a bug and keeps its traceback. Also: filters of the reports Python prints for
exceptions it cannot raise (`filter_unraisable`)."""

from __future__ import annotations

import sys
from typing import Any, Callable


class JaxspecError(ValueError):
  """Base of the errors caused by what the user passed."""


class ModelLoadError(JaxspecError):
  """A model path that is missing, corrupt or unsupported."""


class InputError(JaxspecError):
  """A request that cannot run as given: an empty prompt, a prompt longer than the cache, a bad setting."""


class OutOfMemory(InputError):
  """A request whose program needs more memory than its devices have free (`jaxspec.memory`). `what` says how much
  was needed and found; `advice` what to make smaller, in the words of the caller (the CLI names its flags)."""

  def __init__(self, what: str, advice: str):
    super().__init__(f"{what}: {advice}")
    self.what, self.advice = what, advice

  def with_advice(self, advice: str) -> "OutOfMemory":
    return OutOfMemory(self.what, advice)


def filter_unraisable(name: str, consume: Callable[[Any], bool]) -> None:
  """Puts `consume` in front of `sys.unraisablehook`, once per `name` however often it is called: each report goes to
  `consume` first, and those it does not take (it returns False) to the hooks that were there before."""
  previous = sys.unraisablehook
  names = getattr(previous, "jaxspec_filters", frozenset())
  if name in names:
    return

  def hook(report):
    try:
      if not consume(report):
        previous(report)
    except KeyboardInterrupt:
      # A Ctrl-C that lands while a hook runs (printing another report, say) would be ignored by Python, which
      # swallows what an unraisable hook raises; it is sent to the main thread again, from another thread a moment
      # later (raised here, it would be swallowed the same way).
      interrupt_again(sys.exc_info()[1])

  hook.jaxspec_filters = names | {name}
  sys.unraisablehook = hook


class Terminated(KeyboardInterrupt):
  """SIGTERM (a job scheduler's stop, `kill`), raised where it lands as Ctrl-C's KeyboardInterrupt is, once the
  `jaxspec` program has set its handler (`jaxspec.cli.run`): the program then ends with a message and exit code 143
  instead of dying silently. The training loop and the bench still catch the signal first where they save their work
  (`jaxspec.signals`)."""


def interrupt_again(error: BaseException, after_s: float = 0.01) -> None:
  """Sends the main thread the signal behind `error` (SIGTERM for `Terminated`, else SIGINT) again, from another
  thread `after_s` later: for an interrupt that landed where Python swallows it or where raising it would break."""
  import _thread
  import signal
  import threading
  signum = signal.SIGTERM if isinstance(error, Terminated) else signal.SIGINT
  threading.Timer(after_s, _thread.interrupt_main, (signum,)).start()
