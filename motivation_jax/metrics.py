"""Metrics to JSON lines (metrics.jsonl) and TensorBoard event files."""

from __future__ import annotations

import io
import json
import math
from typing import Any, Mapping

import logging

from tensorboardX import SummaryWriter

from motivation_jax import files

# tensorboardX warns, without saying which, for every non-finite scalar; the
# metrics.jsonl line names them (``non_finite``) and the run says what it means.
logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)


def finite_json(values: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
  """``values`` with every non-finite float replaced by None (JSON's null), and
  the names of those values, sorted.

  ``json.dumps`` writes a NaN as a bare ``NaN``, which is not JSON: strict
  parsers (``jq``, JavaScript, pandas with ``orient``) refuse the whole line.
  """
  bad = sorted(k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v))
  return {k: (None if k in bad else v) for k, v in values.items()}, bad


def cut_jsonl(path: str, keep_below: int) -> int:
  """Cuts the JSON-lines file ``path`` back to its lines whose ``step`` is below
  ``keep_below``; returns how many lines were removed.

  A run resumed from the checkpoint of batch N writes again every line a killed
  process wrote after that checkpoint; cutting them first leaves each line once.
  The lines are in step order, so the cut is at the first line past N, or at a
  line a kill left half written. Replaced in one step (``files.write_text``), so
  a kill during the cut leaves one or the other.
  """
  if not files.exists(path):
    return 0
  lines = io.StringIO(files.read_text(path)).readlines()  # split at "\n" alone
  kept = 0
  for line in lines:
    try:
      if not line.endswith("\n") or json.loads(line)["step"] >= keep_below:
        break
    except (ValueError, KeyError, TypeError):
      break
    kept += 1
  if kept < len(lines):
    files.write_text(path, "".join(lines[:kept]))
  return len(lines) - kept


class MetricWriter:
  """Writes scalars; only one process of a multi-host run should enable it.

  ``first_step``: the batch a resumed run starts at. TensorBoard then hides
  the events a killed process wrote after that batch's checkpoint (its
  ``purge_step``); ``cut_jsonl`` does the same for metrics.jsonl.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, first_step: int = 0):
    self.enabled = enabled
    if enabled:
      self._jsonl = files.LineFile(files.join(workdir, "metrics.jsonl"))
      # tensorboardX writes gs:// itself (with google-cloud-storage installed).
      self._tb = SummaryWriter(files.join(workdir, "tensorboard"), purge_step=first_step + 1)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    line, bad = finite_json({"step": step, **scalars})
    if bad:  # null in the line, and said so: a reader need not guess why
      line["non_finite"] = bad
    self._jsonl.write(json.dumps(line, allow_nan=False) + "\n")
    for name, value in scalars.items():  # TensorBoard shows NaN and inf as such
      self._tb.add_scalar(name, value, step)

  def flush(self) -> None:
    """Puts everything written so far on disk (before a checkpoint: what it
    covers must survive a kill of this process, or of its machine)."""
    if self.enabled:
      self._jsonl.sync()
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
