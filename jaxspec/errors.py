"""Errors a user can meet. Each message says what was wrong and what to do; the CLI prints it without a traceback.
Anything else that escapes is a bug and keeps its traceback."""


class JaxspecError(ValueError):
  """Base of the errors caused by what the user passed."""


class ModelLoadError(JaxspecError):
  """A model path that is missing, corrupt or unsupported."""


class InputError(JaxspecError):
  """A request that cannot run as given: an empty prompt, a prompt longer than the cache, a bad setting."""
