"""What every measurement of the harness (benchmarks/run.py) shares: the modes,
the machine and its load, the configs, and the trial scheme.

The trial scheme is why the figures are ratios: each trial runs every variant
once, back to back, in an order that changes from trial to trial
(``rotated``), and a figure is the median over trials of the per-trial ratio,
so that a machine slowed for a while slows both sides of a trial alike.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import os
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from motivation_jax import config_lib, data
from motivation_jax.common import cpu_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


@dataclasses.dataclass(frozen=True)
class Mode:
  """How long each measurement runs; ``full`` fits in 5 minutes on 2 cores."""
  name: str
  trials: int              # interleaved trials per ratio
  loop_seconds: float      # about how long one timed loop runs
  step_seconds: float      # about how long one timed block of steps runs
  whole_run_epochs: int
  whole_run_repeats: int
  switch_batches: int      # batches of the compile-count run
  models: tuple[str, ...]  # "tiny", "realistic"
  overhead_epochs: int = 0  # epochs of the whole-run overhead runs (0: the config's)


MODES = {
    "full": Mode("full", trials=7, loop_seconds=0.8, step_seconds=0.15, whole_run_epochs=3,
                 whole_run_repeats=2, switch_batches=300, models=("tiny", "realistic")),
    "quick": Mode("quick", trials=3, loop_seconds=0.25, step_seconds=0.05, whole_run_epochs=1,
                  whole_run_repeats=1, switch_batches=300, models=("tiny", "realistic"),
                  overhead_epochs=5),
    "tiny": Mode("tiny", trials=1, loop_seconds=0.0, step_seconds=0.0, whole_run_epochs=1,
                 whole_run_repeats=1, switch_batches=200, models=("tiny",),
                 overhead_epochs=1),
}


# --- what the machine is ------------------------------------------------------------------

def describe_machine() -> dict[str, Any]:
  devices = jax.devices()
  return {
      "cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
      "python": platform.python_version(), "jax": jax.__version__,
      "jaxlib": getattr(jax.lib, "__version__", None) or _version("jaxlib"),
      "backend": jax.default_backend(),
      "devices": [f"{d.platform}:{d.id} {d.device_kind}" for d in devices],
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
  }


def _version(package: str) -> str | None:
  from importlib import metadata
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return None


def load_average() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def cpu_seconds() -> tuple[float, float] | None:
  """(busy CPU seconds of the whole machine, of this process) so far; None
  where /proc/stat is missing. Their growth over the run gives how many cores
  other processes kept busy meanwhile: what load the figures were taken under
  (the load average counts this harness too)."""
  try:
    with open("/proc/stat") as f:
      fields = [int(v) for v in f.readline().split()[1:]]
  except OSError:
    return None
  busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle, iowait
  own = os.times()
  return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


# --- configs ------------------------------------------------------------------------------

def load_config(spec: str):
  path, _, variant = spec.partition(":")
  if not os.path.isabs(path):
    path = os.path.join(ROOT, path)
  return config_lib.load_config_file(path, variant or None)


def tiny_config(config):
  """The config's data with a small MLP: a step of about 150 µs on a CPU."""
  config = copy.deepcopy(config)
  config.model.name = "mlp"
  config.model.base = {"widths": (32,)}
  config.model.motivated = {"widths": (64, 64)}
  config.optimizer = "adamw"
  config.learning_rate = 3e-3
  return config


def steps_per_epoch(config) -> int:
  dataset = data.get_dataset(config.dataset, config.data_dir,
                             mock_examples=config.mock_data_examples,
                             image_size=config.image_size)
  return len(dataset.train) // config.batch_size


def loop_config(config, batches: int):
  """``config`` for timing the loop: about ``batches`` batches, a condition that
  reads every loss and fires on about half of them, evaluation and checkpoints
  only at the end, no progress bar."""
  config = copy.deepcopy(config)
  config.progress_bar = False
  config.num_epochs = max(1, math.ceil(batches / steps_per_epoch(config)))
  config.eval_every_epochs = config.checkpoint_every_epochs = 10**6
  config.motivation.condition = "loss_streak"
  config.motivation.loss_streak = {"k": 1, "margin": 0.0, "ema": 0.0}
  config.motivation.phase_steps = 1
  config.motivation.warmup_steps = config.motivation.cooldown_steps = 0
  config.motivation.max_fraction = None
  return config


# --- timing helpers -----------------------------------------------------------------------

def fresh_state(state):
  """A copy of ``state`` (the steps donate theirs), made before a timed trial."""
  return jax.block_until_ready(jax.tree.map(jnp.copy, state))


def rotated(items: list, trial: int) -> list:
  """``items`` in an order that changes from trial to trial (no variant always first)."""
  k = trial % len(items)
  order = items[k:] + items[:k]
  return order if trial % 2 == 0 else order[::-1]


def median(values) -> float:
  return float(statistics.median(values))


def interleaved_times(runners: dict[str, Callable[[int], None]], trials: int,
                      step_seconds: float, *, warmup: int = 2, probe: int = 5,
                      least: int = 3) -> tuple[dict[str, list[float]], dict[str, int]]:
  """Seconds per step of each ``runners[name](k)`` (which runs k steps and waits
  for them), one figure per trial; each trial runs every variant once, in an
  order that changes from trial to trial (``rotated``). Before the trials, each
  runs ``warmup`` steps, then ``probe`` timed ones that set how many steps a
  timed block takes: about ``step_seconds``, at least ``least`` (1 when
  ``step_seconds`` is 0). Returns the times and the steps per block."""
  repeats = {}
  for name, go in runners.items():
    go(warmup)
    start = time.perf_counter()
    go(probe)
    per_step = (time.perf_counter() - start) / probe
    repeats[name] = max(least, int(step_seconds / per_step)) if step_seconds else 1
  times: dict[str, list[float]] = {name: [] for name in runners}
  for trial in range(trials):
    for name in rotated(list(runners), trial):
      start = time.perf_counter()
      runners[name](repeats[name])
      times[name].append((time.perf_counter() - start) / repeats[name])
  return times, repeats
