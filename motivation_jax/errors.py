"""Errors that mean "the input is wrong", reported to the user as one line.

``motivation_jax.cli`` prints them as ``error: <message>`` and exits with status 2
(``--verbosity=1`` or ``MOTIVATION_JAX_TRACEBACK=1`` adds the traceback). Standard
library only: every module of the package may import it.
"""


class MotivationError(Exception):
  """Base class: the command line prints these as one line, without a traceback."""


class ConfigError(MotivationError, ValueError):
  """A config value that does not exist or does not make sense."""


class WorkdirInUse(ConfigError):
  """Another run holds the workdir's lease (``motivation_jax.lease``)."""


class NestingError(MotivationError, ValueError):
  """The base network is not nested in the motivated network."""


class DataError(MotivationError, FileNotFoundError):
  """A data set that is not available here."""


class CheckpointError(MotivationError, RuntimeError):
  """A checkpoint that cannot be restored."""


class TrainingError(MotivationError, RuntimeError):
  """Training cannot go on (e.g. the loss became NaN)."""


class Preempted(Exception):
  """The run stopped early on request (SIGTERM, SIGINT, or JAX's preemption
  notice in a multi-process run) after checkpointing the last batch it trained.

  Not an input error: the command line prints the message as it is and exits
  with ``status``, 128 + the signal's number as shells report a process killed
  by it (143 for SIGTERM, 130 for SIGINT), so a scheduler that requeues on
  those statuses still does.
  """

  def __init__(self, message: str, status: int):
    super().__init__(message)
    self.status = status
