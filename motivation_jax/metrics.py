"""Metrics to JSON lines (metrics.jsonl) and TensorBoard event files."""

from __future__ import annotations

import json
import os
from typing import Mapping

from tensorboardX import SummaryWriter


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
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
