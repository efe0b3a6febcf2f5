"""Checks every family's config and constructor share: sub-network options and widths.

A value a config can get wrong raises ``ConfigError``; a base that does not fit
inside the motivated model raises ``NestingError``. Both are one line.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from motivation_jax.common import check_keys
from motivation_jax.errors import ConfigError, NestingError


def check_widths(family: str, base: Sequence[int], motivated: Sequence[int]) -> None:
  """Refuses a base that is deeper, or wider at some layer, than the motivated model."""
  if not base or any(w < 1 for w in (*base, *motivated)):
    raise ConfigError(f"{family}: widths must be positive and the base needs at least one "
                      f"layer, got base={tuple(base)} motivated={tuple(motivated)}")
  if len(base) > len(motivated):
    raise NestingError(f"{family}: the base has {len(base)} layers but the motivated "
                       f"model only {len(motivated)}; the base is not nested")
  for i, (b, m) in enumerate(zip(base, motivated)):
    if b > m:
      raise NestingError(f"{family}: layer {i} is {b} wide in the base but {m} in the "
                         "motivated model; the base is not nested")


def subnet_options(family: str, options: Mapping[str, Any], required: Sequence[str] = (),
                   optional: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """One sub-network's config dict, checked: unknown keys and missing ones are refused."""
  optional = dict(optional or {})
  check_keys(options, (*required, *optional), f"a sub-network option of the {family} family")
  missing = [k for k in required if k not in options]
  if missing:
    raise ConfigError(f"the {family} family needs {', '.join(missing)} for each sub-network")
  return {**optional, **options}
