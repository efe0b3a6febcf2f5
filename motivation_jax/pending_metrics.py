"""``PendingMetrics``: the training metrics of the loop's batches, read a few
batches late so that the host never waits on the device for them (the
decision lag, docs/choices.md), and the stop after too many non-finite ones.
"""

from __future__ import annotations

import collections
import math

import jax
import numpy as np

from motivation_jax import checkpoint
from motivation_jax.controller import Controller
from motivation_jax.errors import TrainingError


class PendingMetrics:
  """The metrics of dispatched batches, read ``lag`` batches late.

  Batch t's metrics are read once batch t + lag is dispatched, when batch t has
  long finished: reading them costs no device stall. Each loss is checked,
  given to the controller, and kept for the next log line.

  A batch whose step says ``nonfinite`` (its loss or a gradient was not
  finite, so the step did not apply it; ``steps``) is told
  to the controller as missing (``observe(t, None)``), counted in the next log
  line's ``nonfinite_steps``, and written to decisions.jsonl with ``"loss":
  null, "nonfinite": true``; none of its metrics enter the means. After
  ``config.max_nonfinite_steps`` such batches in a row the run stops
  (``TrainingError``), and the newest checkpoint holds only applied updates.

  Reading costs no device round trip either: on an accelerator each metric's
  copy to the host starts when its batch is dispatched (``copy_to_host_async``
  runs once the step is done), so the read finds it there; on a CPU the
  device's memory is the host's and ``np.asarray`` is a view. (On the 2-core
  CPU ``jax.device_get`` costs about 9 µs per scalar, ``float`` of a
  ``jax.Array`` 5 µs, ``np.asarray`` 0.6 µs: the loop's own host work per batch
  fell by about two thirds; benchmarks/results/README.md.) When a loss is
  read, and so which decisions are taken, is unchanged: it depends on the lag only.
  """

  def __init__(self, controller: Controller, ckpt: checkpoint.Checkpointer, *,
               max_nonfinite_steps: int = 10):
    self._controller, self._ckpt = controller, ckpt
    self._max_nonfinite = max_nonfinite_steps
    self._lag = controller.config["decision_lag"]
    self._prefetch = jax.default_backend() != "cpu"  # a CPU's arrays are host memory
    self._queue: collections.deque = collections.deque()
    self._interval: dict[str, list[float]] = collections.defaultdict(list)
    # batch -> training loss (None: not applied), until decisions.jsonl has it
    self.losses: dict[int, float | None] = {}

  def push(self, t: int, kind: str, metrics: dict[str, jax.Array]) -> None:
    if self._prefetch:
      for value in metrics.values():
        value.copy_to_host_async()
    self._queue.append((t, kind, metrics))
    while len(self._queue) > self._lag:
      self._observe_oldest()

  def flush(self) -> None:
    """Observes every pending batch (before a checkpoint: its controller state
    must hold every loss)."""
    while self._queue:
      self._observe_oldest()

  def interval_means(self) -> dict[str, float]:
    """Mean of each metric since the last call, per step kind; ``nonfinite_steps``
    is a count."""
    means = {k: float(np.sum(v) if k == "nonfinite_steps" else np.mean(v))
             for k, v in self._interval.items()}
    self._interval.clear()
    return means

  def interval(self) -> dict[str, list[float]]:
    """The values ``interval_means`` will average (checkpointed, so that a
    resumed run's next log line averages the same batches)."""
    return {k: list(v) for k, v in self._interval.items()}

  def resume_interval(self, interval: dict[str, list[float]]) -> None:
    for k, v in interval.items():
      self._interval[k].extend(v)

  def _read(self, metrics: dict[str, jax.Array]) -> dict[str, float]:
    """The host values of one batch's metrics; waits for its step if still running."""
    return {name: float(np.asarray(value)) for name, value in metrics.items()}

  def _observe_oldest(self) -> None:
    t, kind, metrics = self._queue.popleft()
    metrics = self._read(metrics)
    loss = metrics["loss"]
    # A step of one's own without the flag: a non-finite loss is still not used.
    if metrics.pop("nonfinite", 0.0) or not math.isfinite(loss):
      self._controller.observe(t, None)
      self.losses[t] = None
      self._interval["nonfinite_steps"].append(1.0)
      in_a_row = self._controller.missing_in_a_row
      if in_a_row >= self._max_nonfinite:
        last = self._ckpt.committed_step()  # a save in flight is finished first
        kept = (f"the checkpoint of batch {last} in {self._ckpt.directory} is intact"
                if last is not None else "no checkpoint had been written yet")
        raise TrainingError(
            f"the training loss or a gradient was not finite on {in_a_row} batches in a row "
            f"(batches {t - in_a_row + 1} to {t}, the last a {kind} step; the training loss "
            f"was {loss}); their updates were not applied; {kept}; lower "
            f"config.learning_rate (config.max_nonfinite_steps={self._max_nonfinite} "
            "stops a run here)")
      return
    self._controller.observe(t, loss)
    self.losses[t] = loss
    for name, value in metrics.items():
      self._interval[f"{kind}/{name}"].append(value)
