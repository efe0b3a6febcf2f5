"""Errors that mean "the input is wrong", reported to the user as one line."""


class MotivationError(Exception):
  """Base class: ``main`` prints these as one line, without a traceback."""


class ConfigError(MotivationError, ValueError):
  """A config value that does not exist or does not make sense."""


class DataError(MotivationError, FileNotFoundError):
  """A data set that is not available here."""


class CheckpointError(MotivationError, RuntimeError):
  """A checkpoint that cannot be restored."""


class TrainingError(MotivationError, RuntimeError):
  """Training cannot go on (e.g. the loss became NaN)."""
