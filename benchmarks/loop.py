"""Items 1 and 3 of the harness (benchmarks/run.py): the loop's overhead and its
host blocking.

``train.train``, the real loop, against a loop that dispatches the same
compiled steps on the same batches from the schedule the real loop took and
reads no metric (``schedule_loop``), at each decision lag in ``LAGS``; beside
them a bare loop that only reads each loss at the lag (``reading_loop``), the
time the real loop's metric reads wait for the device, and the real loop's own
host work with steps that return at once (``host_work``).
benchmarks/loop_reads.py reuses these loops.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import time
from typing import Any, Callable

import jax
import numpy as np

from benchmarks.common import Mode, fresh_state, median, rotated
from motivation_jax import data, train
from motivation_jax.controller import Controller

LAGS = (0, 1, 2)


@contextlib.contextmanager
def loop_only(wait_log: list | None = None):
  """``train.train`` with the evaluation and checkpoint at its end replaced by
  what the loop itself owes there: every pending loss read, the last step done.
  With ``wait_log``, the time of each metric read (the host waiting on the
  device) is appended to it."""
  saved = train.evaluate_and_log, train.save, train.PendingMetrics

  def save(run, state, pending, step):
    pending.flush()
    jax.block_until_ready(state)

  class TimedPendingMetrics(train.PendingMetrics):
    def _read(self, metrics):
      start = time.perf_counter()
      values = super()._read(metrics)
      wait_log.append(time.perf_counter() - start)
      return values

  train.evaluate_and_log = lambda run, state, step, bar: {}
  train.save = save
  if wait_log is not None:
    train.PendingMetrics = TimedPendingMetrics
  try:
    yield
  finally:
    train.evaluate_and_log, train.save, train.PendingMetrics = saved


class ResidentBatches:
  """Stands in for ``run.train_data`` in the loop trials: the first batches of
  the run, put on the devices once and served in turn, so that both loops time
  the loop and the steps, not the input pipeline (on 2 cores its threads would
  take the cores the steps need; benchmarks/data_throughput.py measures it)."""

  def __init__(self, train_data: data.TrainBatches, put, max_batches: int = 32):
    self.steps_per_epoch = train_data.steps_per_epoch
    self.global_batch_size = train_data.global_batch_size
    self._batches = [put(train_data[t])
                     for t in range(min(train_data.steps_per_epoch, max_batches))]

  def __getitem__(self, t: int):
    return self._batches[t % len(self._batches)]

  def iterator(self, start: int, stop: int, *, threads: int = 0, workers: int = 0):
    return (self[t] for t in range(start, stop))


def resident(run: train.Run) -> train.Run:
  """``run`` reading ``ResidentBatches``."""
  return dataclasses.replace(run, train_data=ResidentBatches(run.train_data, run.put),
                             put=lambda batch: batch)


def with_lag(run: train.Run, lag: int) -> train.Run:
  """``run`` with a new controller at decision lag ``lag`` (a trial starts at batch 0)."""
  config = copy.deepcopy(run.config)
  config.motivation.decision_lag = lag
  return dataclasses.replace(run, config=config,
                             controller=Controller.from_config(config.motivation))


def real_loop(run: train.Run, state, lag: int, wait_log: list | None = None
              ) -> tuple[float, list[str]]:
  """Seconds of ``train.train`` from batch 0 to the end, and the kinds it ran."""
  trial = with_lag(run, lag)
  with loop_only(wait_log):
    start = time.perf_counter()
    train.train(trial, state)
    seconds = time.perf_counter() - start
  return seconds, [d.kind for d in trial.controller.drain_decisions()]


def schedule_loop(run: train.Run, state, schedule: list[str]) -> float:
  """Seconds of dispatching ``run``'s compiled steps on the same batches from a
  fixed schedule: no controller, no metric read."""
  start = time.perf_counter()
  for t, kind in enumerate(schedule):
    state, _ = run.train_steps[kind](state, run.train_data[t])
  jax.block_until_ready(state)
  return time.perf_counter() - start


def read_loss(loss: jax.Array) -> float:
  """One loss to the host, as the real loop reads it (blocks until its step is done)."""
  return float(np.asarray(loss))


def reading_loop(run: train.Run, state, schedule: list[str], lag: int,
                 take: Callable[[jax.Array], Any] = read_loss) -> float:
  """``schedule_loop`` that also reads each batch's loss ``lag`` batches late,
  as the real loop must: the least any loop that reads losses can cost.
  ``take``: done with each loss instead of reading it (benchmarks/loop_reads.py
  only waits for it)."""
  start = time.perf_counter()
  pending = collections.deque()
  for t, kind in enumerate(schedule):
    state, metrics = run.train_steps[kind](state, run.train_data[t])
    pending.append(metrics["loss"])
    while len(pending) > lag:
      take(pending.popleft())
  jax.block_until_ready(state)
  return time.perf_counter() - start


def host_work(run: train.Run, state, lag: int, batches: int) -> float:
  """Seconds per batch of the real loop's own host work: ``train.train`` with
  steps that return at once (the state as it is, a batch's metrics already on
  the host), so nothing is dispatched and no read waits."""
  _, metrics = run.train_steps["base"](fresh_state(state), run.train_data[0])
  metrics = jax.block_until_ready(metrics)
  instant = lambda state, batch: (state, metrics)  # noqa: E731
  config = copy.deepcopy(run.config)
  config.num_epochs = max(1, batches // run.train_data.steps_per_epoch)
  trial = dataclasses.replace(run, config=config,
                              train_steps={"base": instant, "motivated": instant})
  seconds, kinds = real_loop(trial, state, lag)
  return seconds / len(kinds)


def measure_loop(run: train.Run, state0, mode: Mode) -> dict[str, Any]:
  """Loop overhead at each lag, interleaved with its schedule loop, and the host's
  wait per batch in the metric reads."""
  schedules = {}
  for lag in LAGS:  # warm-up, and the schedule each lag takes
    _, schedules[lag] = real_loop(run, fresh_state(state0), lag)
    schedule_loop(run, fresh_state(state0), schedules[lag])
  n = len(schedules[LAGS[0]])
  variants = ["real", "sched", "read"]
  times: dict[str, list[float]] = {f"{v}{lag}": [] for lag in LAGS for v in variants}
  same_schedule = True
  for trial in range(mode.trials):
    for lag in rotated(list(LAGS), trial):
      for variant in rotated(variants, trial + lag):
        state = fresh_state(state0)
        if variant == "real":
          seconds, kinds = real_loop(run, state, lag)
          same_schedule &= kinds == schedules[lag]
        elif variant == "read":
          seconds = reading_loop(run, state, schedules[lag], lag)
        else:
          seconds = schedule_loop(run, state, schedules[lag])
        times[f"{variant}{lag}"].append(seconds)
  out: dict[str, Any] = {"batches": n, "trials": mode.trials,
                         "decisions_identical_across_trials": same_schedule, "lags": {}}
  for lag in LAGS:
    real, sched = times[f"real{lag}"], times[f"sched{lag}"]
    waits: list[float] = []
    real_loop(run, fresh_state(state0), lag, wait_log=waits)
    kinds = schedules[lag]
    out["lags"][str(lag)] = {
        "overhead_ratio": median(s / r for s, r in zip(sched, real)),
        # The same for a bare loop that only reads each loss at this lag.
        "reading_loop_ratio": median(s / r for s, r in zip(sched, times[f"read{lag}"])),
        "real_us_per_batch": median(real) / n * 1e6,
        "schedule_us_per_batch": median(sched) / n * 1e6,
        "extra_us_per_batch": median(r - s for s, r in zip(sched, real)) / n * 1e6,
        "host_wait_us_per_batch": sum(waits) / n * 1e6,
        "host_work_us_per_batch": host_work(run, fresh_state(state0), lag, 2000) * 1e6,
        "motivated_fraction": kinds.count("motivated") / n,
        "switches": sum(a != b for a, b in zip(kinds, kinds[1:])),
    }
  return out
