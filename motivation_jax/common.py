"""Names and checks shared across the package, at the bottom of its imports.

The controller, the models, ``nesting`` and ``steps`` all import from here, and
this module imports only the standard library and ``errors``, so none of them
needs another to learn what a sub-network or a policy is called.
"""

from __future__ import annotations

import os
import platform
import uuid
from typing import Iterable

from motivation_jax.errors import ConfigError

# The two sub-networks: every batch trains one of them.
SUBNETS = ("base", "motivated")
# What a motivated batch trains (docs/choices.md): the motivated model only, or a
# base step and then a motivated step.
POLICIES = ("switch", "both")


def check_subnet(subnet: str) -> None:
  if subnet not in SUBNETS:
    raise ValueError(f"subnet must be 'base' or 'motivated', got {subnet!r}")


def check_keys(given: Iterable[str], known: Iterable[str], what: str) -> None:
  """Refuses, in one line, a key of ``given`` that is not in ``known``:
  ``'<key>' is not <what>; known: <known keys>``."""
  known = tuple(known)
  for key in given:
    if key not in known:
      raise ConfigError(f"{key!r} is not {what}; known: {', '.join(known) or 'none'}")


def writable_directory(path: str, label: str) -> str:
  """Makes directory ``path`` (and its parents) if need be and checks that this
  process can write in it; else a one-line ``ConfigError`` naming ``label``
  (e.g. ``--workdir``). Writing a file is the test: permission bits say
  nothing to root, and a read-only mount only answers a write."""
  if not path:
    raise ConfigError(f"{label} is empty; give a directory")
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write-test-{uuid.uuid4().hex}")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    why = e.strerror or type(e).__name__
    if isinstance(e, FileExistsError) or (os.path.exists(path) and not os.path.isdir(path)):
      why = "it is a file, not a directory"
    elif isinstance(e, NotADirectoryError):
      why = "a part of its path is a file, not a directory"
    raise ConfigError(f"cannot write in {label}={path}: {why}") from e
  return path


def cpu_model() -> str:
  """The CPU's model name (Linux's /proc/cpuinfo), for the machine line of
  reports and benchmark results; elsewhere what ``platform`` knows."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()
