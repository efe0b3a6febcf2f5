"""Names and checks shared across the package, at the bottom of its imports.

The controller, the models, ``nesting`` and ``steps`` all import from here, and
this module imports only the standard library and ``errors``, so none of them
needs another to learn what a sub-network or a policy is called.
"""

from __future__ import annotations

import platform
from typing import Iterable

from motivation_jax.errors import ConfigError, NestingError

# The two sub-networks: every batch trains one of them.
SUBNETS = ("base", "motivated")
# What a motivated batch trains (docs/choices.md): the motivated model only, or a
# base step and then a motivated step.
POLICIES = ("switch", "both", "joint")


def format_flops(flops: float | None) -> str:
  """A step's FLOPs for the end-of-run tables; "not compiled" for a step kind the
  run's condition never picks (``Controller.kinds``)."""
  return "not compiled" if flops is None else f"{flops:.3e}"


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


def check_nested_shapes(full: dict, base: dict) -> None:
  """Refuses (``NestingError``, naming the leaf) a base variable that the motivated
  model lacks or that is larger than it along some dimension. ``full`` and
  ``base``: ``{collection: {path tuple: leaf with .shape}}`` (flattened variables)."""
  for col, leaves in base.items():
    for path, leaf in leaves.items():
      name = "/".join(map(str, (col, *path)))
      if path not in full.get(col, {}):
        raise NestingError(f"{name} exists in the base but not in the motivated model; "
                           "the base is not nested")
      big = full[col][path].shape
      if len(big) != len(leaf.shape) or any(b > m for b, m in zip(leaf.shape, big)):
        raise NestingError(f"{name} has shape {leaf.shape} in the base but {big} in the "
                           "motivated model; the base is not nested")
