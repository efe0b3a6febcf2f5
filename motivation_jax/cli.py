"""The one error path of the command lines (``main``, ``export``).

An error in the user's input (``errors.MotivationError``: a config value, a data
set, a checkpoint, a base that does not nest, a workdir that cannot be written,
training that cannot go on) is printed as one line,
``error: <message>``, and the process exits with status 2. With absl's
``--verbosity=1`` or ``MOTIVATION_JAX_TRACEBACK=1`` in the environment, its
traceback is printed first. Any other exception is a bug, and Python reports it
with its traceback as usual.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys
import traceback
from typing import Callable, NoReturn

from absl import app, flags, logging

from motivation_jax.errors import MotivationError, Preempted

TRACEBACK_ENV = "MOTIVATION_JAX_TRACEBACK"


def one_line(error: BaseException | str) -> str:
  """The message of ``error`` on one line.

  ml_collections wraps its errors (``AttributeError(KeyError(message))`` for a
  key that does not exist) and flattens a config file's traceback into its
  message; the message that says what is wrong is then the wrapped one, or the
  root cause's. A ``KeyError``'s ``str`` is the repr of its message.
  """
  while (isinstance(error, BaseException) and len(error.args) == 1
         and isinstance(error.args[0], BaseException)):
    error = error.args[0]
  if isinstance(error, BaseException) and "Traceback (most recent call last)" in str(error):
    while error.__cause__ or error.__context__:
      error = error.__cause__ or error.__context__
  if isinstance(error, KeyError) and error.args and isinstance(error.args[0], str):
    error = error.args[0]
  return " ".join(str(error).replace("\\n", " ").split())


def wants_traceback() -> bool:
  if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
    return True
  return flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].value >= 1


def report(message: str, error: BaseException | None = None) -> None:
  """Prints ``error: <message>`` on one line, after ``error``'s traceback when asked for."""
  if error is not None and wants_traceback():
    traceback.print_exception(error)
  print(f"error: {one_line(message)}", file=sys.stderr)


def fail(message: str, error: BaseException | None = None) -> NoReturn:
  """Prints ``error: <message>`` (after ``error``'s traceback, when asked for) and
  exits with status 2, at once, skipping the interpreter's clean-up, for an
  error whose ``exit_at_once`` is true."""
  report(message, error)
  if getattr(error, "exit_at_once", False):
    # Device work that will never finish is in flight (a step the other
    # processes did not run): the interpreter's clean-up would wait on it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)
  sys.exit(2)


def _not_from_orbax(record: std_logging.LogRecord) -> bool:
  return f"{os.sep}orbax{os.sep}" not in record.pathname


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a bad flag or ``--config.*`` override reported in one line."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
    # ml_collections raises the latter for a key that does not exist, a value of
    # the wrong type, an override of a config file that failed to load.
    if "get_config() takes 0 positional arguments" in str(e):  # --config=FILE:VARIANT
      given = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
      path, _, variant = (given[-1] if given else ":").rpartition(":")
      fail(f"bad command line: {path} has no variants (its get_config() takes no "
           f"argument); drop ':{variant}' from --config", e)
    fail(f"bad command line: {one_line(e)}", e)
  except Exception as e:  # pylint: disable=broad-except
    # Anything else comes from running the config file itself, which absl's
    # parser does when it reads --config: a syntax error, or its own raise.
    fail(f"cannot load --config: {type(e).__name__}: {one_line(e)}", e)


def run(main: Callable[[], None], *, end: Callable[[], bool] | None = None) -> None:
  """``app.run`` of ``main()``: refuses positional arguments, keeps libraries' absl
  logs below ERROR quiet unless ``--verbosity`` is given, reports a ``MotivationError`` in one line,
  and a run stopped by a signal (``Preempted``) in one line with its status.

  ``end`` (``main``'s: ``distributed.end``) runs once ``main`` is done, on every
  exit path but an abort (an error whose ``exit_at_once`` is true): after
  success (0), an input error (2), a stop by a signal (143, 130), a bug (1, its
  traceback printed first). Where it returns False (a peer of a multi-process
  run never arrived) the process leaves at once with that same status,
  skipping the interpreter's clean-up (JAX's would wait for the peer again).
  """
  def leave(status: int) -> NoReturn:
    if end is not None and not end():
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(status)
    sys.exit(status)

  def absl_main(argv):
    if len(argv) > 1:
      fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
      # Libraries' absl warnings (TFDS's about a data set it cannot find, Orbax's)
      # would come before the one line that says what is wrong and what to do;
      # --verbosity=0 brings them back.
      logging.set_verbosity(logging.ERROR)
      # Orbax logs each failure of its background threads with a traceback, at
      # ERROR, before the failure reaches the caller, which reports it in one
      # line (checkpoint.Checkpointer).
      std_logging.getLogger("absl").addFilter(_not_from_orbax)
    try:
      main()
    except MotivationError as e:
      if getattr(e, "exit_at_once", False):
        fail(str(e), e)  # leaves at once: no process would meet this one at the end
      report(str(e), e)
      leave(2)
    except Preempted as e:  # checkpointed and closed: one line, the signal's status
      print(str(e), file=sys.stderr)
      leave(e.status)
    except Exception:  # a bug: its traceback, as Python would print it
      traceback.print_exc()
      leave(1)
    leave(0)
  app.run(absl_main, flags_parser=parse_flags)
