r"""The performance harness: what the two-model loop costs against its parts.

  python -m benchmarks.run [--config=configs/default.py[:variant]] [--quick] \
      [--accelerator | --accelerator-only | --skip-accelerator] \
      [--out=benchmarks/results/harness_BACKEND]   # harness_cpu, harness_gpu, ...

Every figure is a ratio of two variants timed in this one process, trial
against trial: each trial runs both variants back to back (in alternating
order), and the figure is the median over trials of the per-trial ratio. A
machine that slows down for a while slows both sides of a trial, so load
shifts the absolute times far more than the ratios (the load average before
and after is recorded, and how many cores other processes kept busy during
the run). The harness measures, for the config's model (the
"realistic" step) and for a tiny MLP on the same data (a step of about 100 µs
on a CPU):

1. *Loop overhead*: batches/s of ``train.train``, the real loop (controller,
   agreement check, metrics read ``decision_lag`` batches late, logging),
   against a loop that dispatches the same compiled steps on the same batches
   from the schedule the real loop took, reading no metric. The condition is
   ``loss_streak(k=1)``, which reads every loss and fires on about half the
   batches. Both loops take the same batches, put on the device beforehand
   (``ResidentBatches``: the input pipeline is data_throughput.py's subject).
   Evaluation and the checkpoint at the end of ``train`` are replaced by what
   the loop itself owes there (reading every pending loss, waiting for the
   last step): they are not per-batch costs. Also timed: a bare loop that only
   reads each loss at the lag (the least any loop that reads losses costs),
   and the loop's own host work with steps that return at once. Target: >= 0.98
   for steps of 1 ms or more, >= 0.95 for the tiny step.
2. *Step cost*: the compiled base step (``run.train_steps``) against an
   ordinary train step of the standalone base model (``model.standalone``,
   written here as any Flax user would, with the same optimizer, loss, batch
   and dtype), and the motivated step against the standalone large model's.
   Target <= 1.05.
3. *Host blocking*: the time per batch the loop's metric read waits for the
   device, at decision lag 0, 1 and 2, and each lag's loop-overhead ratio.
4. *Compilations*: XLA compilations by program over a whole
   ``train_and_evaluate`` run with hundreds of switches between the kinds
   (exactly one per step kind is the target), and the start-up compile time of
   each kind (tracing, lowering and XLA).
5. *Whole-run cost*: wall time and training FLOPs of ``train_and_evaluate``
   with the config's condition against the same run with ``always`` (the large
   model on every batch), for the same batches.
   *Whole-run overhead* (``measure_overhead``; ``benchmarks/whole_run_overhead.py``
   runs it alone): ``train_and_evaluate`` of the base alone (condition ``never``)
   against ``benchmarks/plain_loop.py``, the plain flax/optax loop of the
   standalone base on the same batches, evaluating as often, each with a cold
   and then a warm compilation cache. Target (warm): <= 1.3.
   *Paired step* (``benchmarks/paired_step.py``): the base step of a user's own
   Linen module paired by ``nesting.paired`` against the ordinary optax step
   of the small module alone. Target: <= 1.05.
   *LM steps* (``benchmarks/lm_steps.py``, ``--lm-config``, default
   configs/lm_shakespeare.py; its ``:smoke`` in ``--tiny``): the nested
   transformer's base and motivated steps against the standalone base and
   large transformers' ordinary steps, tokens/s, XLA's FLOPs against the
   formula, and MFU where the device's peak is known. Target: <= 1.05.
6. On an accelerator (or with ``--accelerator``; ``--accelerator-only`` skips
   1-5 and writes ``OUT`` = ``harness_BACKEND_steps`` by default): absolute step
   times, MFU and memory of ResNet-20 in ResNet-56 and ViT-Ti in ViT-S on 32x32
   images, in float32 and, where ``config.dtype`` exists, bfloat16.
   benchmarks/device/ runs it on a lent GPU.

``--quick`` is for development (fewer and shorter trials; the figures are
noisier); ``--tiny`` only checks that everything runs (tests/
test_benchmark_harness.py). Results go to ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from motivation_jax import compilation, config_lib, data, models, nesting, steps, train
from motivation_jax.common import cpu_model
from motivation_jax.controller import Controller

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
LAGS = (0, 1, 2)


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


# --- compile counting ---------------------------------------------------------------------

_COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
                   "/jax/core/compile/backend_compile_duration": "compile"}


class CompileLog:
  """Records JAX's compile events (``jax.monitoring``) while active: how many
  XLA compilations each program had, and the seconds spent tracing, lowering
  and compiling it. A persistent-cache hit counts as a compilation too (JAX
  reports it through the same event), which is what a count of programs wants."""

  def __init__(self):
    self.events: list[tuple[str, str, float]] = []  # (phase, program, seconds)

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    if event in _COMPILE_EVENTS:
      self.events.append((_COMPILE_EVENTS[event], str(kwargs.get("fun_name", "?")), duration))

  def __enter__(self) -> CompileLog:
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_duration_listener(self._listen)

  def compiles(self) -> dict[str, int]:
    counts: dict[str, int] = {}
    for phase, name, _ in self.events:
      if phase == "compile":
        counts[name] = counts.get(name, 0) + 1
    return counts

  def seconds(self, program: str) -> float:
    return sum(s for _, name, s in self.events if program in name)


def step_kind_of(program: str) -> str | None:
  """The step kind a compiled program is, from its name (``jit(base_train_step)``)."""
  if "base_train_step" in program:
    return "base"
  if "motivated_train_step" in program or "both_train_step" in program:
    return "motivated"
  return None


def compiles_per_kind(counts: dict[str, int]) -> dict[str, int]:
  per_kind = {"base": 0, "motivated": 0}
  for program, n in counts.items():
    kind = step_kind_of(program)
    if kind:
      per_kind[kind] += n
  return per_kind


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


# --- 1 and 3: loop overhead and host blocking ---------------------------------------------

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


# --- 2: step cost against the standalone models -------------------------------------------

def standalone_train_step(module, optimizer, *, check: bool = True) -> Callable:
  """An ordinary Flax train step of a plain model, as a user who trained that
  model alone would write it (independent of ``steps.py``): the reference.
  ``check=False``: without the package's non-finite rule, to price that rule."""
  return jax.jit(_standalone_step(module, optimizer, check), donate_argnums=(0, 1))


def carrying_train_step(module, optimizer) -> Callable:
  """The standalone step that also takes and returns ``carried`` (a list whose
  first entry is the batch counter, which it increments): what a base step
  costs beyond the standalone one for carrying the state it leaves alone."""
  step = _standalone_step(module, optimizer)

  def carry(variables, opt_state, carried, batch):
    variables, opt_state, metrics = step(variables, opt_state, batch)
    return variables, opt_state, [carried[0] + 1, *carried[1:]], metrics
  return jax.jit(carry, donate_argnums=(0, 1, 2))


def carried_leaves(state: steps.TrainState, wmap: nesting.WeightsMap, optimizer) -> list:
  """The leaves of ``state`` a standalone base step has no counterpart of: the
  batch counter, the leaves outside the base (params, parameter-shaped
  optimizer state, the base's statistics) and the motivated statistics."""
  outside = lambda tree, regions: [x for r, x in zip(jax.tree.leaves(regions),
                                                     jax.tree.leaves(tree)) if not r.in_base]
  leaves = [state.step, *outside(state.params, wmap.params),
            *outside(state.opt_state, nesting.opt_state_regions(optimizer, wmap.params)),
            *outside(state.subnet_stats("base"), wmap["batch_stats"])]
  if state.batch_norm_stats == "per_subnet":
    leaves += jax.tree.leaves(state.batch_stats["motivated"])
  return leaves


def kernels(compiled) -> int:
  """Operations the CPU runtime runs one by one in a compiled program: the
  entry computation's instructions that are not parameters, constants,
  tuples or bitcasts."""
  entry = compiled.as_text().split("\nENTRY", 1)[1]
  ops = re.findall(r"= \S+ ([\w-]+)\(", entry)
  return sum(op not in ("parameter", "constant", "tuple", "get-tuple-element", "bitcast")
             for op in ops)


def _standalone_step(module, optimizer, check: bool = True) -> Callable:
  def step(variables, opt_state, batch):
    def objective(params):
      logits, mutated = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                     batch["image"], train=True, mutable=["batch_stats"])
      return steps.cross_entropy_loss(logits, batch["label"]), (logits,
                                                                 mutated.get("batch_stats", {}))
    (loss, (logits, stats)), grads = jax.value_and_grad(objective, has_aux=True)(
        variables["params"])
    updates, new_opt_state = optimizer.update(grads, opt_state, variables["params"])
    params = optax.apply_updates(variables["params"], updates)
    if check:
      # The package's rule for a non-finite batch, as the motivated step applies
      # it: like for like, so the ratios measure the nesting alone.
      params, stats, opt_state = steps.keep_finite_update(
          steps.all_finite(loss, grads), (params, stats, new_opt_state),
          (variables["params"], variables["batch_stats"], opt_state))
    else:
      opt_state = new_opt_state
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return {"params": params, "batch_stats": stats}, opt_state, {"loss": loss,
                                                                 "accuracy": accuracy}
  return step


def measure_steps(run: train.Run, state0, mode: Mode) -> dict[str, Any]:
  """Each compiled step kind against its standalone model's step: the same batch
  (already on the device), optimizer and dtype; interleaved timed blocks."""
  config = run.config
  model = models.build_model(config.model, run.dataset.num_classes, dtype=config.dtype)
  optimizer = steps.make_optimizer(config, run.total_steps, run.train_data.steps_per_epoch)
  batch = run.put(run.train_data[0])
  runners: dict[str, Callable[[int], None]] = {}
  flops: dict[str, float] = {}
  holder = {"nested": fresh_state(state0)}

  def nested_runner(kind):
    fn = run.train_steps[kind]

    def go(k):
      state = holder["nested"]
      for _ in range(k):
        state, metrics = fn(state, batch)
      holder["nested"] = jax.block_until_ready(state)
    return go

  ops: dict[str, int] = {}
  for kind in ("base", "motivated"):
    runners[f"nested {kind}"] = nested_runner(kind)
    flops[f"nested {kind}"] = run.flops[kind]
    ops[f"nested {kind}"] = kernels(run.train_steps[kind])
    variables = nesting.export(state0.variables(kind), kind, run.wmap)
    variables.setdefault("batch_stats", {})
    variables = jax.tree.map(jnp.copy, variables)
    opt_state = optimizer.init(variables["params"])
    compiled = standalone_train_step(model.standalone(kind), optimizer).lower(
        variables, opt_state, batch).compile()
    flops[f"standalone {kind}"] = steps.compiled_flops(compiled)
    ops[f"standalone {kind}"] = kernels(compiled)
    holder[kind] = (variables, opt_state)

    def standalone_runner(kind=kind, compiled=compiled):
      def go(k):
        variables, opt_state = holder[kind]
        for _ in range(k):
          variables, opt_state, metrics = compiled(variables, opt_state, batch)
        holder[kind] = jax.block_until_ready((variables, opt_state))
      return go
    runners[f"standalone {kind}"] = standalone_runner()
    # The same without the non-finite rule: what the rule itself costs.
    unchecked = standalone_train_step(model.standalone(kind), optimizer, check=False).lower(
        variables, opt_state, batch).compile()
    ops[f"unchecked {kind}"] = kernels(unchecked)
    holder[f"unchecked {kind}"] = jax.tree.map(jnp.copy, (variables, opt_state))

    def unchecked_runner(kind=kind, compiled=unchecked):
      def go(k):
        variables, opt_state = holder[f"unchecked {kind}"]
        for _ in range(k):
          variables, opt_state, metrics = compiled(variables, opt_state, batch)
        holder[f"unchecked {kind}"] = jax.block_until_ready((variables, opt_state))
      return go
    runners[f"unchecked {kind}"] = unchecked_runner()

  # The base step's cost beyond the standalone one, in two parts: carrying the
  # state it leaves alone through the call, and writing the base region back.
  carried = [jnp.copy(x) for x in carried_leaves(state0, run.wmap, optimizer)]
  variables, opt_state = holder["base"]
  carrying = carrying_train_step(model.standalone("base"), optimizer).lower(
      *jax.tree.map(jnp.copy, (variables, opt_state)), carried, batch).compile()
  ops["carrying base"] = kernels(carrying)
  holder["carrying"] = (*jax.tree.map(jnp.copy, (variables, opt_state)), carried)

  def carrying_runner(k):
    variables, opt_state, carried = holder["carrying"]
    for _ in range(k):
      variables, opt_state, carried, metrics = carrying(variables, opt_state, carried, batch)
    holder["carrying"] = jax.block_until_ready((variables, opt_state, carried))
  runners["carrying base"] = carrying_runner

  # The same base step and standalone step with the schedule's peak as a
  # constant learning rate: on the CPU backend the schedule's scalar arithmetic
  # (a cosine) is fused into each in-place write-back of the base region, and
  # this pair shows what that costs.
  constant = constant_lr_optimizer(config)
  sample = jnp.zeros((1, *run.dataset.image_shape), jnp.float32)
  nested_constant = steps.make_train_steps(
      model, constant, wmap=run.wmap, normalisation=(run.dataset.mean, run.dataset.std))["base"]
  state_c = steps.create_train_state(model, constant, jax.random.key(0), sample,
                                     batch_norm_stats=config.model.batch_norm_stats)
  holder["nested constant"] = state_c
  compiled_c = nested_constant.lower(state_c, batch).compile()
  variables_c = nesting.export(state_c.variables("base"), "base", run.wmap)
  variables_c.setdefault("batch_stats", {})
  variables_c = jax.tree.map(jnp.copy, variables_c)
  holder["standalone constant"] = (variables_c, constant.init(variables_c["params"]))
  alone_c = standalone_train_step(model.standalone("base"), constant).lower(
      *holder["standalone constant"], batch).compile()

  def nested_constant_runner(k):
    state = holder["nested constant"]
    for _ in range(k):
      state, metrics = compiled_c(state, batch)
    holder["nested constant"] = jax.block_until_ready(state)

  def standalone_constant_runner(k):
    variables, opt_state = holder["standalone constant"]
    for _ in range(k):
      variables, opt_state, metrics = alone_c(variables, opt_state, batch)
    holder["standalone constant"] = jax.block_until_ready((variables, opt_state))
  runners["nested base, constant lr"] = nested_constant_runner
  runners["standalone base, constant lr"] = standalone_constant_runner

  times, _ = interleaved_times(runners, mode.trials, mode.step_seconds)
  out = {"trials": mode.trials}
  for kind in ("base", "motivated"):
    nested, alone = times[f"nested {kind}"], times[f"standalone {kind}"]
    out[kind] = {"ratio": median(a / b for a, b in zip(nested, alone)),
                 "nested_us": median(nested) * 1e6, "standalone_us": median(alone) * 1e6,
                 "nested_flops": flops[f"nested {kind}"],
                 "standalone_flops": flops[f"standalone {kind}"],
                 "nested_kernels": ops[f"nested {kind}"],
                 "standalone_kernels": ops[f"standalone {kind}"],
                 # The non-finite rule's own price: the standalone step with it
                 # against the same step without it.
                 "finite_check": {
                     "ratio": median(a / u for a, u in zip(alone, times[f"unchecked {kind}"])),
                     "unchecked_us": median(times[f"unchecked {kind}"]) * 1e6,
                     "unchecked_kernels": ops[f"unchecked {kind}"]}}
  nested, alone, carrying = (times[k] for k in ("nested base", "standalone base",
                                                "carrying base"))
  out["base"]["carrying"] = {
      "leaves": len(carried), "kernels": ops["carrying base"],
      # Every leaf of the state is either carried or has a standalone counterpart.
      "all_leaves_accounted": len(carried) + len(jax.tree.leaves(holder["base"])) == len(
          jax.tree.leaves(state0)),
      "us": median(carrying) * 1e6,
      "ratio_to_standalone": median(c / a for c, a in zip(carrying, alone)),
      "nested_ratio_to_carrying": median(n / c for n, c in zip(nested, carrying))}
  nested, alone = times["nested base, constant lr"], times["standalone base, constant lr"]
  out["base"]["constant_lr"] = {
      "ratio": median(n / a for n, a in zip(nested, alone)),
      "nested_us": median(nested) * 1e6, "standalone_us": median(alone) * 1e6}
  return out


def constant_lr_optimizer(config) -> optax.GradientTransformation:
  """``steps.make_optimizer``'s optimizer with its peak learning rate held
  constant (no schedule)."""
  if config.optimizer == "sgd":
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(config.learning_rate, momentum=config.momentum))
  return optax.adamw(config.learning_rate, weight_decay=config.weight_decay)


# --- 4 and 5: compiles over a whole run, and the whole run's cost -------------------------

def measure_compiles(config, mode: Mode, workdir: str) -> dict[str, Any]:
  """Compilations over one whole ``train_and_evaluate`` with hundreds of switches."""
  config = loop_config(config, mode.switch_batches)
  config.log_every_steps = max(1, min(config.log_every_steps, 50))
  with CompileLog() as log:
    summary = train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "decisions.jsonl")) as f:
    kinds = [json.loads(line)["kind"] for line in f]
  counts = log.compiles()
  return {
      "batches": len(kinds),
      "switches": sum(a != b for a, b in zip(kinds, kinds[1:])),
      "motivated_batches": summary["motivated_steps"],
      "compiles_per_kind": compiles_per_kind(counts),
      "compiles_by_program": counts,
      "startup_compile_s": {kind: sum(s for _, name, s in log.events
                                      if step_kind_of(name) == kind)
                            for kind in ("base", "motivated")},
  }


def measure_whole_run(config, mode: Mode, workdir: str) -> dict[str, Any]:
  """``train_and_evaluate`` with the config's condition against ``always`` (the
  large model on every batch), same batches; interleaved repeats."""
  config = copy.deepcopy(config)
  config.progress_bar = False
  config.num_epochs = mode.whole_run_epochs
  alone = copy.deepcopy(config)
  alone.motivation.condition = "always"
  variants = {"motivated run": config, "large alone": alone}
  results: dict[str, list[dict]] = {name: [] for name in variants}
  for trial in range(mode.whole_run_repeats):
    for name in rotated(list(variants), trial):
      directory = os.path.join(workdir, f"{name.replace(' ', '_')}_{trial}")
      results[name].append(train.train_and_evaluate(variants[name], directory))
  out: dict[str, Any] = {"epochs": mode.whole_run_epochs, "repeats": mode.whole_run_repeats}
  for name, summaries in results.items():
    last = summaries[-1]
    out[name] = {"wall_time_s": median(s["wall_time_s"] for s in summaries),
                 "training_flops": last["training_flops"],
                 "base_steps": last["base_steps"], "motivated_steps": last["motivated_steps"],
                 "base_test_accuracy": last["base/test_accuracy"],
                 "motivated_test_accuracy": last["motivated/test_accuracy"]}
  out["wall_time_ratio"] = median(
      a["wall_time_s"] / b["wall_time_s"]
      for a, b in zip(results["motivated run"], results["large alone"]))
  out["flops_ratio"] = (out["motivated run"]["training_flops"]
                        / out["large alone"]["training_flops"])
  return out


def measure_overhead(config, mode: Mode, workdir: str) -> dict[str, Any]:
  """Whole-run overhead: ``train_and_evaluate`` of the base alone (condition
  ``never``) against ``plain_loop.plain_run``, the plain flax/optax loop of the
  standalone base on the same batches, evaluating as often; each with a cold
  compilation cache (an empty directory) and then warm (the same directory,
  refilled by the cold run). In-memory caches are cleared before every run
  (``jax.clear_caches``), so a warm run reads its programs from disk as a new
  process would. Interleaved trials; the ratios are medians of per-trial ratios."""
  from benchmarks.plain_loop import plain_run
  config = copy.deepcopy(config)
  config.progress_bar = False
  config.num_epochs = mode.overhead_epochs or config.num_epochs
  config.motivation.condition = "never"
  config.motivation.max_fraction = None
  cache_before = jax.config.jax_compilation_cache_dir
  times: dict[str, list[float]] = collections.defaultdict(list)
  compiles: dict[str, dict] = {}
  accuracy: dict[str, float] = {}
  for trial in range(mode.whole_run_repeats):
    for variant in rotated(["package", "plain"], trial):
      cache = os.path.join(workdir, f"cache_{variant}_{trial}")
      for temperature in ("cold", "warm"):
        jax.clear_caches()
        if variant == "package":
          run_config = copy.deepcopy(config)
          run_config.compilation_cache_dir = cache
          summary = train.train_and_evaluate(
              run_config, os.path.join(workdir, f"run_{trial}_{temperature}"))
          seconds, log = summary["wall_time_s"], summary["compilation"]
          accuracy[variant] = summary["base/test_accuracy"]
        else:
          used = compilation.use_cache(cache)
          with compilation.CompileLog() as compile_log:
            result = plain_run(config)
          seconds, log = result["wall_time_s"], compile_log.summary(used)
          accuracy[variant] = result["test_accuracy"]
        times[f"{variant} {temperature}"].append(seconds)
        compiles[f"{variant} {temperature}"] = {
            k: v for k, v in log.items() if k != "programs"} | {  # no machine path in results
            "cache_dir": f"DIR/cache_{variant}_{trial}"}
  # Give the process back the cache it had (the directories above are temporary).
  jax.config.update("jax_compilation_cache_dir", cache_before)
  jax_cache.reset_cache()
  trials = range(mode.whole_run_repeats)
  out: dict[str, Any] = {
      "epochs": config.num_epochs, "repeats": mode.whole_run_repeats,
      "batches": config.num_epochs * steps_per_epoch(config),
      "eval_every_epochs": config.eval_every_epochs,
      "bn_recalibration_batches": config.bn_recalibration_batches,
      "checkpoint_every_epochs": config.checkpoint_every_epochs,
      "wall_time_s": {k: median(v) for k, v in times.items()},
      "compilation": compiles, "test_accuracy": accuracy,
      # A cache that JAX_COMPILATION_CACHE_DIR set wins over the harness's empty ones.
      "cold_is_cold": not os.environ.get(compilation.ENV),
  }
  for temperature in ("cold", "warm"):
    out[f"{temperature}_ratio"] = median(
        times[f"package {temperature}"][i] / times[f"plain {temperature}"][i] for i in trials)
  return out


# --- 6: absolute step times on an accelerator ---------------------------------------------

# Dense peak FLOP/s per chip for (float32, bfloat16) operands, from the vendors' data
# sheets (SXM parts, no sparsity). JAX's default precision computes float32 matrix
# products and convolutions in TensorFloat-32 on these GPUs (docs.jax.dev, "Matmul
# precision"), so float32's peak is the TF32 tensor-core one, not plain FP32's.
PEAK_FLOPS = {"H100": (494.7e12, 989.4e12), "H200": (494.7e12, 989.4e12),
              "A100": (156e12, 312e12), "L4": (60e12, 121e12)}
# (label, config file): ResNet-20 in ResNet-56, ViT-Ti in ViT-S, 32x32, batch 128.
ACCELERATOR_CONFIGS = (("resnet20 in resnet56", "configs/cifar10_resnet.py"),
                       ("vit-ti in vit-s", "configs/cifar10_vit.py"))


def peak_flops(device, dtype: str) -> float | None:
  for key, (fp32, bf16) in PEAK_FLOPS.items():
    if key.lower() in device.device_kind.lower():
      return bf16 if dtype == "bfloat16" else fp32
  return None


def step_memory_bytes(compiled) -> int | None:
  """What XLA's buffer assignment gives one call of a compiled step at most:
  its arguments, outputs and temporaries, less the outputs written into
  donated arguments. Per program, unlike the device's ``peak_bytes_in_use``,
  which holds since the process started."""
  try:
    m = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):  # a backend that does not report it
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def measure_accelerator(mode: Mode, workdir: str, *, batch_size: int | None = None,
                        variant: str | None = None,
                        rows: list[dict[str, Any]] | None = None,
                        on_rows: Callable[[], None] = lambda: None) -> list[dict[str, Any]]:
  """Absolute step times, MFU and memory per step kind (item 6), through
  ``train.setup`` (TFDS mock data stands in for CIFAR-10); bfloat16 too where
  the config has ``dtype``. Appends to ``rows`` and calls ``on_rows`` after each
  (model, dtype), so that a run cut short keeps what it measured."""
  device = jax.devices()[0]
  rows = [] if rows is None else rows
  for label, path in ACCELERATOR_CONFIGS:
    base_config = load_config(path + (f":{variant}" if variant else ""))
    dtypes = ["float32"] + (["bfloat16"] if "dtype" in base_config else [])
    for dtype in dtypes:
      config = copy.deepcopy(base_config)
      if "dtype" in config:
        config.dtype = dtype
      config.mock_data_examples = max(config.mock_data_examples, 256)
      config.batch_size = batch_size or config.batch_size
      config.progress_bar = False
      config.bn_recalibration_batches = 0
      start = time.perf_counter()
      run, state = train.setup(config, os.path.join(workdir, f"{label}_{dtype}"))
      setup_s = time.perf_counter() - start
      batch = run.put(run.train_data[0])
      for kind in ("base", "motivated"):
        compiled = run.train_steps[kind]
        for _ in range(3):
          state, metrics = compiled(state, batch)
        jax.block_until_ready(state)
        repeats = 2 if mode.name == "tiny" else 20
        times = []
        for _ in range(max(mode.trials, 1)):
          start = time.perf_counter()
          for _ in range(repeats):
            state, metrics = compiled(state, batch)
          jax.block_until_ready(state)
          times.append((time.perf_counter() - start) / repeats)
        step_s = median(times)
        peak = peak_flops(device, dtype)
        stats = device.memory_stats() or {}
        step_bytes = step_memory_bytes(compiled)
        rows.append({"model": label, "dtype": dtype, "kind": kind, "batch": config.batch_size,
                     "step_ms": step_s * 1e3, "flops": run.flops[kind],
                     "peak_flops": peak, "mfu": run.flops[kind] / step_s / peak if peak else None,
                     "step_memory_gib": None if step_bytes is None else step_bytes / 2**30,
                     "peak_memory_gib": (stats["peak_bytes_in_use"] / 2**30
                                         if "peak_bytes_in_use" in stats else None),
                     "calls": repeats, "setup_s": setup_s})
      run.close()
      on_rows()
  return rows


# --- the whole harness --------------------------------------------------------------------

def measure_model(label: str, config, mode: Mode, workdir: str) -> dict[str, Any]:
  start = time.perf_counter()
  out: dict[str, Any] = {"model": {k: (dict(v) if hasattr(v, "items") else v)
                                   for k, v in config.model.items()},
                         "dataset": config.dataset, "batch_size": config.batch_size,
                         "optimizer": config.optimizer}
  out["compiles"] = measure_compiles(config, mode, os.path.join(workdir, "compiles"))
  # The loop's run: enough batches for mode.loop_seconds at the motivated step's pace.
  probe = loop_config(config, 1)
  with CompileLog() as log:
    run, state0 = train.setup(probe, os.path.join(workdir, "probe"))
  out["setup_compiles_per_kind"] = compiles_per_kind(log.compiles())
  step_out = measure_steps(run, state0, mode)
  out["step_cost"] = step_out
  run.close()
  per_batch = (step_out["base"]["nested_us"] + step_out["motivated"]["nested_us"]) / 2e6
  # At least two epochs, so that a trial is more than its start and end.
  batches = max(2 * run.train_data.steps_per_epoch,
                int(mode.loop_seconds / per_batch)) if mode.loop_seconds else 20
  with CompileLog() as log:
    run, state0 = train.setup(loop_config(config, batches), os.path.join(workdir, "loop"))
    out["loop"] = measure_loop(resident(run), state0, mode)
  run.close()
  # After setup, no step kind compiles again however often the loop switches.
  out["loop"]["compiles_per_kind"] = compiles_per_kind(log.compiles())
  if label == mode.models[-1]:
    out["whole_run"] = measure_whole_run(config, mode, os.path.join(workdir, "whole"))
    out["overhead"] = measure_overhead(config, mode, os.path.join(workdir, "overhead"))
  out["seconds"] = time.perf_counter() - start
  return out


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
  """Each target of the issue, its value and whether it is met."""
  rows = []
  for label, r in results["models"].items():
    lag = str(r["loop_lag"])
    loop = r["loop"]["lags"][lag]
    step_ms = loop["schedule_us_per_batch"] / 1e3
    goal = 0.98 if step_ms >= 1.0 else 0.95
    rows.append({"what": f"loop overhead, {label} ({step_ms:.2f} ms/batch, lag {lag})",
                 "value": loop["overhead_ratio"], "target": f">= {goal}",
                 "met": loop["overhead_ratio"] >= goal})
    for kind in ("base", "motivated"):
      ratio = r["step_cost"][kind]["ratio"]
      rows.append({"what": f"step cost, {label}, {kind} / standalone", "value": ratio,
                   "target": "<= 1.05", "met": ratio <= 1.05})
    if "overhead" in r:
      o = r["overhead"]
      rows.append({"what": f"whole run, base alone, warm compilation cache / plain loop "
                           f"({o['batches']} batches)", "value": o["warm_ratio"],
                   "target": "<= 1.3", "met": o["warm_ratio"] <= 1.3})
    per_kind = r["compiles"]["compiles_per_kind"]
    rows.append({"what": f"compiles per step kind, {label}, "
                         f"{r['compiles']['switches']} switches",
                 "value": f"{per_kind['base']} / {per_kind['motivated']}",
                 "target": "1 / 1", "met": per_kind == {"base": 1, "motivated": 1}})
  if "paired" in results:
    p = results["paired"]
    rows.append({"what": f"step cost, a user's Linen MLP paired, base / its small module's "
                         f"own step ({p['paired_step_us']:.0f} vs {p['ordinary_step_us']:.0f} "
                         f"us)", "value": p["ratio"], "target": "<= 1.05",
                 "met": p["ratio"] <= 1.05})
  if "lm_steps" in results:
    lm = results["lm_steps"]
    for kind in ("base", "motivated"):
      k = lm[kind]
      rows.append({"what": f"step cost, LM ({lm['config_file']}), {kind} / its standalone "
                           f"transformer ({k['nested_ms']:.1f} vs {k['standalone_ms']:.1f} ms, "
                           f"{k['nested_tokens_per_s']:,.0f} tokens/s)",
                   "value": k["ratio"], "target": "<= 1.05", "met": k["ratio"] <= 1.05})
  return rows


def overhead_markdown(o: dict[str, Any]) -> list[str]:
  """The lines of ``measure_overhead``'s table."""
  lines = [f"Whole-run overhead (`train_and_evaluate` of the base alone, condition "
                f"`never`, against `benchmarks/plain_loop.py`, the plain flax/optax loop of "
                f"the standalone base on the same {o['batches']} batches, evaluating the test "
                f"set every {o['eval_every_epochs']} epoch(s); the package also "
                f"recalibrates batch norm on {o['bn_recalibration_batches']} batches before "
                f"each evaluation, evaluates the motivated model (never trained here) at the "
                f"end, and checkpoints every {o['checkpoint_every_epochs']} epochs with both "
                f"sub-networks' statistics; median of {o['repeats']}; "
                "in-memory caches cleared before each run"
                + ("" if o["cold_is_cold"] else "; JAX_COMPILATION_CACHE_DIR was set, so "
                   "no run was cold") + "):", "",
            "| run | cold cache s | warm cache s | compiled cold | compile s cold "
            "| from cache warm | read s warm | test acc |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for variant in ("package", "plain"):
    cold, warm = (o["compilation"][f"{variant} {t}"] for t in ("cold", "warm"))
    lines.append(f"| {variant} | {o['wall_time_s'][f'{variant} cold']:.1f} | "
                 f"{o['wall_time_s'][f'{variant} warm']:.1f} | {cold['compiled']} | "
                 f"{cold['compile_s']:.1f} | {warm['from_cache']} | "
                 f"{warm['cache_read_s']:.2f} | {o['test_accuracy'][variant]:.4f} |")
  lines += ["", f"Package / plain loop: cold {o['cold_ratio']:.2f}, warm "
                f"{o['warm_ratio']:.2f}."]
  return lines


def markdown(results: dict[str, Any]) -> str:
  m = results["machine"]
  lines = [
      "# Performance harness: the two-model loop against its parts",
      "",
      f"`{results['command']}` ({results['mode']} mode), "
      f"{m['date']}: {m['cpu']}, {m['cores']} cores; JAX {m['jax']} "
      f"({m['backend']}: {', '.join(m['devices'])}). Load average (1, 5, 15 min) "
      f"{results['load_before']} before, {results['load_after']} after (this harness "
      "included); other processes kept "
      f"{results.get('other_processes_cores', float('nan')):.2f} cores busy on average "
      f"meanwhile; {results['seconds']:.0f} s in all.",
      "",
  ]
  if not results.get("complete", True):
    lines += ["**Partial**: the run stopped before it finished; what follows is what it "
              "had measured.", ""]
  if results["models"]:
    lines += ["Ratios are medians over interleaved trials of two variants timed in this "
              "process", "(benchmarks/run.py says how each is taken).", ""]
  if results["targets"]:
    lines += ["## Targets", "", "| what | value | target | met |", "|---|---:|---:|---|"]
  for t in results["targets"]:
    value = f"{t['value']:.3f}" if isinstance(t["value"], float) else t["value"]
    lines.append(f"| {t['what']} | {value} | {t['target']} | {'yes' if t['met'] else 'NO'} |")
  for label, r in results["models"].items():
    model = r["model"]
    lines += ["", f"## {label}: {model['name']} {model['base']} in {model['motivated']}, "
                  f"{r['dataset']}, batch {r['batch_size']}, {r['optimizer']}", ""]
    s = r["step_cost"]
    lines += ["Step cost (same batch on the device):", "",
              "| kind | nested µs | standalone µs | ratio | nested GFLOPs | standalone GFLOPs |",
              "|---|---:|---:|---:|---:|---:|"]
    lines[-2] += " nested kernels | standalone kernels |"
    lines[-1] += "---:|---:|"
    for kind in ("base", "motivated"):
      k = s[kind]
      lines.append(f"| {kind} | {k['nested_us']:,.0f} | {k['standalone_us']:,.0f} | "
                   f"{k['ratio']:.3f} | {k['nested_flops'] / 1e9:.4f} | "
                   f"{k['standalone_flops'] / 1e9:.4f} | {k['nested_kernels']} | "
                   f"{k['standalone_kernels']} |")
    if "finite_check" in s["base"]:
      f = {kind: s[kind]["finite_check"] for kind in ("base", "motivated")}
      lines += ["", "The package's non-finite rule (`steps.all_finite`, "
                    "`steps.keep_finite_update`), priced on the standalone steps: with it "
                    f"they cost {f['base']['ratio']:.3f} (base) and "
                    f"{f['motivated']['ratio']:.3f} (motivated) of the same steps without "
                    f"it ({f['base']['unchecked_us']:,.0f} and "
                    f"{f['motivated']['unchecked_us']:,.0f} µs, "
                    f"{f['base']['unchecked_kernels']} and "
                    f"{f['motivated']['unchecked_kernels']} kernels)."]
    c = s["base"].get("carrying")
    if c:
      lines += ["", f"The base step against the standalone base step that also takes and "
                    f"returns the {c['leaves']} state leaves it has no counterpart of "
                    f"(batch counter, leaves outside the base, motivated statistics): that "
                    f"step costs {c['ratio_to_standalone']:.3f} of the standalone "
                    f"({c['us']:,.0f} µs, {c['kernels']} kernels), and the base step "
                    f"{c['nested_ratio_to_carrying']:.3f} of it (writing the base region "
                    "back)."]
    c = s["base"].get("constant_lr")
    if c:
      lines += ["", f"With the schedule's peak as a constant learning rate the base step "
                    f"costs {c['ratio']:.3f} of the standalone base step "
                    f"({c['nested_us']:,.0f} against {c['standalone_us']:,.0f} µs)."]
    loop = r["loop"]
    lines += ["", f"Loop (`train.train` against the same steps from its schedule), "
                  f"{loop['batches']} batches, {loop['trials']} trials:", "",
              "| decision lag | overhead ratio | bare reading loop | real µs/batch "
              "| schedule µs/batch | extra µs/batch | host wait µs/batch "
              "| loop host work µs/batch | motivated | switches |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lag, k in loop["lags"].items():
      lines.append(f"| {lag} | {k['overhead_ratio']:.3f} | {k['reading_loop_ratio']:.3f} "
                   f"| {k['real_us_per_batch']:,.1f} | "
                   f"{k['schedule_us_per_batch']:,.1f} | {k['extra_us_per_batch']:,.1f} | "
                   f"{k['host_wait_us_per_batch']:,.1f} | {k['host_work_us_per_batch']:,.1f} | "
                   f"{k['motivated_fraction']:.2f} | {k['switches']} |")
    c = r["compiles"]
    lines += ["", f"Compilations over a whole `train_and_evaluate` of {c['batches']} batches "
                  f"with {c['switches']} switches: {c['compiles_per_kind']['base']} base, "
                  f"{c['compiles_per_kind']['motivated']} motivated step; start-up compile "
                  f"{c['startup_compile_s']['base']:.2f} s (base), "
                  f"{c['startup_compile_s']['motivated']:.2f} s (motivated). All programs: "
                  + ", ".join(f"`{k}` {v}" for k, v in sorted(c["compiles_by_program"].items()))
                  + f". Compiles of a step kind during all the loop trials: "
                  f"{loop['compiles_per_kind']}."]
    if "whole_run" in r:
      w = r["whole_run"]
      lines += ["", f"Whole run (`train_and_evaluate`, {w['epochs']} epochs, "
                    f"median of {w['repeats']}):", "",
                "| run | wall s | training GFLOPs | base steps | motivated steps "
                "| base acc | motivated acc |", "|---|---:|---:|---:|---:|---:|---:|"]
      for name in ("motivated run", "large alone"):
        k = w[name]
        lines.append(f"| {name} | {k['wall_time_s']:.1f} | {k['training_flops'] / 1e9:,.1f} | "
                     f"{k['base_steps']} | {k['motivated_steps']} | "
                     f"{k['base_test_accuracy']:.3f} | {k['motivated_test_accuracy']:.3f} |")
      lines += ["", f"Motivated run / large alone: wall time {w['wall_time_ratio']:.3f}, "
                    f"FLOPs {w['flops_ratio']:.3f}."]
    if "overhead" in r:
      lines += [""] + overhead_markdown(r["overhead"])
  if results.get("accelerator"):
    lines += ["", "## Accelerator step times", "",
              "Each kind's compiled step (`run.train_steps`) on one batch of TFDS mock data, "
              f"median of the trials' mean over {results['accelerator'][0]['calls']} calls. "
              "MFU: the step's FLOPs (XLA's cost "
              "analysis) per second over the chip's dense peak (`PEAK_FLOPS`: float32 at "
              "the TF32 tensor-core rate, JAX's default precision there). Step GiB: XLA's "
              "buffer assignment for one call (arguments, outputs and temporaries, less "
              "what is written in place); process peak: the device's `peak_bytes_in_use` "
              "so far, rows in the order run. Setup: `train.setup`, compiles included.",
              "",
              "| model | dtype | kind | batch | ms/step | GFLOPs | peak TFLOP/s | MFU "
              "| step GiB | process peak GiB | setup s |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(value, spec):
      return "-" if value is None else format(value, spec)

    for a in results["accelerator"]:
      lines.append(f"| {a['model']} | {a['dtype']} | {a['kind']} | {a['batch']} | "
                   f"{a['step_ms']:.2f} | {a['flops'] / 1e9:,.1f} | "
                   f"{cell(a['peak_flops'] and a['peak_flops'] / 1e12, '.1f')} | "
                   f"{cell(a['mfu'], '.1%')} | {cell(a['step_memory_gib'], '.3f')} | "
                   f"{cell(a['peak_memory_gib'], '.2f')} | {a['setup_s']:.0f} |")
  if results.get("lm_steps"):
    from benchmarks import lm_steps
    lines += ["", f"## Language-model steps ({results['lm_steps']['config_file']})", ""]
    lines += lm_steps.table(results["lm_steps"])
  if results.get("note"):
    lines += ["", results["note"]]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/default.py",
                      help="the realistic step's config, PATH[:variant]")
  parser.add_argument("--quick", action="store_true", help="fewer, shorter trials")
  parser.add_argument("--tiny", action="store_true", help="only check that it all runs")
  item6 = parser.add_mutually_exclusive_group()
  item6.add_argument("--accelerator", action="store_true",
                     help="measure item 6 even on a CPU (always on an accelerator)")
  item6.add_argument("--accelerator-only", action="store_true",
                     help="measure item 6 alone (the first figures a lent GPU owes)")
  item6.add_argument("--skip-accelerator", action="store_true",
                     help="leave item 6 out, on an accelerator too")
  parser.add_argument("--out", default=None, help="writes OUT.json and OUT.md "
                      "(default: benchmarks/results/harness_BACKEND)")
  parser.add_argument("--lm-config", default="configs/lm_shakespeare.py",
                      help="the language-model steps' config, PATH[:variant] "
                           "(--tiny: its :smoke variant, unless one is named)")
  parser.add_argument("--note", default="", help="a sentence added to the markdown")
  args = parser.parse_args(argv)
  mode = MODES["tiny" if args.tiny else "quick" if args.quick else "full"]
  args.out = args.out or os.path.join(
      RESULTS, f"harness_{jax.default_backend()}" + ("_steps" if args.accelerator_only else ""))
  start, load_before, cpu_before = time.perf_counter(), load_average(), cpu_seconds()
  config = load_config(args.config)
  configs = {"tiny": tiny_config(config), "realistic": config}
  results: dict[str, Any] = {
      "command": " ".join(["python -m benchmarks.run",
                           *(argv if argv is not None else sys.argv[1:])]),
      "mode": mode.name, "machine": describe_machine(), "load_before": load_before,
      "models": {}}
  results["note"] = args.note
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

  def save(complete: bool = False) -> str:
    """Writes OUT.json and OUT.md with what is measured so far (a run cut short
    by a time limit keeps it; ``complete`` is False in them until the end)."""
    results["complete"] = complete
    results["targets"] = targets(results)
    results["load_after"] = load_average()
    results["seconds"] = time.perf_counter() - start
    cpu_after = cpu_seconds()
    if cpu_before and cpu_after:
      others = (cpu_after[0] - cpu_before[0]) - (cpu_after[1] - cpu_before[1])
      results["other_processes_cores"] = max(0.0, others / results["seconds"])
    with open(args.out + ".json", "w") as f:
      json.dump(results, f, indent=2)
    text = markdown(results)
    with open(args.out + ".md", "w") as f:
      f.write(text)
    return text

  with tempfile.TemporaryDirectory() as workdir:
    for label in () if args.accelerator_only else mode.models:
      results["models"][label] = measure_model(label, configs[label], mode,
                                               os.path.join(workdir, label))
      results["models"][label]["loop_lag"] = configs[label].motivation.decision_lag
      print(f"{label}: {time.perf_counter() - start:.0f} s", flush=True)
      save()
    if not args.accelerator_only:
      from benchmarks import paired_step
      results["paired"] = paired_step.measure(  # its own script's 15 trials in full
          trials=15 if mode.name == "full" else mode.trials,
          steps_per_trial=5 if mode.name == "tiny" else 200)
      print(f"paired: {time.perf_counter() - start:.0f} s", flush=True)
      save()
      from benchmarks import lm_steps
      spec = args.lm_config
      if mode.name == "tiny" and ":" not in spec:
        spec += ":smoke"
      results["lm_steps"] = lm_steps.measure(
          load_config(spec), trials=max(mode.trials, 3) if mode.name != "tiny" else 1,
          step_seconds=0.5 if mode.name == "full" else mode.step_seconds)
      results["lm_steps"]["config_file"] = spec
      print(f"lm steps: {time.perf_counter() - start:.0f} s", flush=True)
      save()
    on_accelerator = args.accelerator or jax.default_backend() != "cpu"
    if args.accelerator_only or (on_accelerator and not args.skip_accelerator):
      rows = results["accelerator"] = []

      def on_rows():
        print(f"accelerator, {rows[-1]['model']} {rows[-1]['dtype']}: "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        save()

      measure_accelerator(mode, os.path.join(workdir, "accelerator"),
                          variant="smoke" if mode.name == "tiny" else None,
                          rows=rows, on_rows=on_rows)
  print(save(complete=True))
  return results


if __name__ == "__main__":
  main()
