"""Errors a user can meet while loading models; the CLI prints their message without a traceback."""


class ModelLoadError(ValueError):
  """A model path that is missing, corrupt or unsupported. The message says what to do."""
