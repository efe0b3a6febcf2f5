"""Metrics to JSON lines (metrics.jsonl) and TensorBoard event files."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

from tensorboardX import SummaryWriter


def finite_json(values: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
  """``values`` with every non-finite float replaced by None (JSON's null), and
  the names of those values, sorted.

  ``json.dumps`` writes a NaN as a bare ``NaN``, which is not JSON: strict
  parsers (``jq``, JavaScript, pandas with ``orient``) refuse the whole line.
  """
  bad = sorted(k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v))
  return {k: (None if k in bad else v) for k, v in values.items()}, bad


class MetricWriter:
  """Writes scalars; only one process of a multi-host run should enable it."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    if enabled:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    line, bad = finite_json({"step": step, **scalars})
    if bad:  # null in the line, and said so: a reader need not guess why
      line["non_finite"] = bad
    self._jsonl.write(json.dumps(line, allow_nan=False) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():  # TensorBoard shows NaN and inf as such
      self._tb.add_scalar(name, value, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
