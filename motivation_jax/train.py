"""``train_and_evaluate(config, workdir)``: wires data, model, steps and controller.

Three parts: ``setup`` builds a run (data, model, controller, the two compiled
steps) and its state, restored from the workdir's latest checkpoint if there is
one; ``train`` is the loop; ``summarize`` the numbers a user asks for. The loop
is DESIGN's path of one batch::

    kind = controller.next_kind()               # host, plain Python
    state, metrics = train_steps[kind](state, batch)  # one compiled program per kind
    pending.push(t, kind, metrics)              # read decision_lag batches late,
                                                # then controller.observe(loss)

Nothing else happens on the host per batch but logging, evaluation and
checkpoints at their intervals. docs/choices.md explains the decision lag.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import numbers
import signal
import sys
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from motivation_jax import (agreement, checkpoint, config_lib, data, files, lease, lm, models,
                            nesting, recalibration, sharding, steps, tasks)
from motivation_jax import compilation
from motivation_jax.common import SUBNETS
from motivation_jax.controller import Controller
from motivation_jax.errors import ConfigError, Preempted, TrainingError
from motivation_jax.metrics import MetricWriter, cut_jsonl, finite_json

_AT_LEAST_1 = ("an integer >= 1", lambda v: v >= 1)
_NON_NEGATIVE = ("a finite number >= 0", lambda v: v >= 0)
# Top-level config values: name -> (kind, what it must be, test).
_CHECKS = {
    "batch_size": (int, *_AT_LEAST_1), "eval_batch_size": (int, *_AT_LEAST_1),
    "num_epochs": (int, *_AT_LEAST_1), "log_every_steps": (int, *_AT_LEAST_1),
    "eval_every_epochs": (int, *_AT_LEAST_1), "checkpoint_every_epochs": (int, *_AT_LEAST_1),
    "seed": (int, "an integer >= 0", lambda v: v >= 0),
    "mock_data_examples": (int, "an integer >= 0", lambda v: v >= 0),
    "data_threads": (int, "an integer >= 0", lambda v: v >= 0),
    "data_workers": (int, "an integer >= 0", lambda v: v >= 0),
    "bn_recalibration_batches": (int, "an integer >= 0", lambda v: v >= 0),
    "max_nonfinite_steps": (int, *_AT_LEAST_1),
    "learning_rate": (float, "a finite number > 0", lambda v: v > 0),
    "lease_ttl_s": (float, "a finite number > 0", lambda v: v > 0),
    "momentum": (float, "a number in [0, 1)", lambda v: 0 <= v < 1),
    "weight_decay": (float, *_NON_NEGATIVE), "warmup_epochs": (float, *_NON_NEGATIVE),
}


def check_config(config) -> None:
  """Refuses, in one line and before any work, a value that cannot train.

  (``image_size`` is checked by ``data.get_dataset``, the first thing a run does.)
  """
  for name, (kind, rule, holds) in _CHECKS.items():
    if name not in config:
      raise ConfigError(f"config.{name} is missing (configs/default.py lists every key)")
    value = config[name]
    number = numbers.Integral if kind is int else numbers.Real
    ok = (isinstance(value, number) and not isinstance(value, bool)
          and math.isfinite(value) and holds(value))
    if not ok:
      raise ConfigError(f"config.{name} must be {rule}, got {value!r}")
  if not isinstance(config.get("augment"), bool):
    raise ConfigError(f"config.augment must be True or False, got {config.get('augment')!r}")
  for key in ("name", "base", "motivated", "batch_norm_stats", "extension_init"):
    if key not in config.model:
      raise ConfigError(f"config.model.{key} is missing (configs/default.py lists every key)")
  for key, allowed in (("batch_norm_stats", steps.BATCH_NORM_STATS),
                       ("extension_init", nesting.EXTENSION_INITS)):
    if config.model[key] not in allowed:
      raise ConfigError(f"config.model.{key} must be one of {allowed}, "
                        f"got {config.model[key]!r}")
  if (config.motivation.get("policy") == "joint"
      and config.model.batch_norm_stats != "per_subnet"):
    raise ConfigError("config.motivation.policy='joint' needs config.model.batch_norm_stats="
                      f"'per_subnet' (each sub-network its own statistics), got "
                      f"{config.model.batch_norm_stats!r}")
  if config.get("dtype") not in models.DTYPES:
    raise ConfigError(f"config.dtype must be one of {models.DTYPES}, "
                      f"got {config.get('dtype')!r}")
  if "mesh" not in config:
    raise ConfigError("config.mesh is missing (configs/default.py lists every key)")
  sharding.check_mesh_config(config.mesh)  # setup checks it against the devices
  train_steps = config.get("train_steps")
  if train_steps is not None:
    if not (isinstance(train_steps, int) and not isinstance(train_steps, bool)
            and train_steps >= 1):
      raise ConfigError(f"config.train_steps must be None (num_epochs epochs) or an integer "
                        f">= 1, got {train_steps!r}")
    if config.get("task") == "causal_lm":
      raise ConfigError("config.train_steps is for image runs; a language model's length is "
                        "config.num_train_steps")
  clip = config.get("grad_clip_norm")
  if clip is not None and not (isinstance(clip, numbers.Real) and not isinstance(clip, bool)
                               and math.isfinite(clip) and clip > 0):
    raise ConfigError(f"config.grad_clip_norm must be None (off) or a finite number > 0, "
                      f"got {clip!r}")
  # The task: what a batch holds and what is minimised (motivation_jax.tasks).
  if tasks.of_config(config) is tasks.CAUSAL_LM:
    lm.check_config(config)
  else:
    lm.check_classification_config(config)


# What a run writes in its workdir: name -> whether it is a folder.
WORKDIR_ENTRIES = {"checkpoints": True, "tensorboard": True, "decisions.jsonl": False,
                   "metrics.jsonl": False, "summary.json": False, lease.FILE: False,
                   lm.TOKENIZER_FILE: False}


def check_workdir(workdir: str) -> None:
  """Refuses, in one line and before any work, a workdir this run could not
  write in: one that is a file, empty, read-only, or where a file the run
  writes is a folder or the other way round (found after training otherwise,
  or, for a checkpoint Orbax writes in the background, never)."""
  files.writable_directory(workdir, "workdir")
  for name, folder in WORKDIR_ENTRIES.items():
    path = files.join(workdir, name)
    if files.exists(path) and files.is_dir(path) != folder:
      raise ConfigError(f"{path} is a {'file' if folder else 'folder'}, not a "
                        f"{'folder' if folder else 'file'}: a run writes one there; move it "
                        "away or pick another --workdir")
  files.writable_directory(files.join(workdir, "checkpoints"), "the checkpoint folder")


def build(config, dataset: data.Dataset):
  """Model, weights map and controller from a config, with one-line errors."""
  try:
    # A user's own module (config.model.module) is checked to nest on a
    # random sample batch (models/paired.py).
    model = models.build_model(config.model, dataset.num_classes, dtype=config.dtype,
                               sample=_check_sample(config, dataset))
  except ConfigError as e:  # a NestingError passes as it is
    message = str(e)
    raise ConfigError(message if message.startswith("config.model") else
                      f"config.model: {message}") from e
  try:
    controller = Controller.from_config(config.motivation)
  except ValueError as e:  # the controller's checks of its own config
    raise ConfigError(f"config.motivation: {e}") from e
  wmap = nesting.weights_map(model, _sample(config, dataset), subnet="motivated")
  return model, wmap, controller


def _sample(config, dataset, batch: int = 1) -> np.ndarray:
  """An input batch of the model's shape: zero images, or tokens of the context
  (NumPy: a host array compiles no program, docs/compilation.md)."""
  if tasks.of_config(config) is tasks.CAUSAL_LM:
    return np.zeros((batch, config.model.seq_len), np.int32)
  return np.zeros((batch, *dataset.image_shape), np.float32)


def _check_sample(config, dataset: data.Dataset) -> jax.Array | None:
  """A normal random batch of the model's input shape, for the nesting check of
  a user's module (None for the package's own families, which need none)."""
  if not config.model.get("module"):
    return None
  if tasks.of_config(config) is tasks.CAUSAL_LM:
    return lm.sample(dataset.num_classes, config.model.seq_len, 8, config.seed)
  return jax.random.normal(jax.random.key(config.seed), (8, *dataset.image_shape))


@dataclasses.dataclass
class Run:
  """Everything a run needs besides its train state, built by ``setup``."""
  config: ml_collections.ConfigDict
  dataset: data.Dataset
  wmap: nesting.WeightsMap
  controller: Controller
  train_data: data.TrainBatches
  eval_data: data.EvalBatches
  put: Callable[[Any], Any]        # a host batch -> the global batch on the devices
  train_steps: dict[str, Any]      # "base" | "motivated" -> compiled step
  eval_steps: dict[str, Callable]  # "base" | "motivated" -> jitted eval step
  # (state, subnets) -> {subnet: stats} recalibrated, or None (off, or no batch norm)
  recalibrate: Callable[..., dict | None]
  flops: dict[str, float]          # per train step, all devices together, from XLA
  ckpt: checkpoint.Checkpointer
  writer: MetricWriter
  workdir: str
  chief: bool                      # process 0 writes the files
  first_step: int                  # 0, or the batch a resumed run starts at
  # "storage" | "logical" -> state -> the state in that order (steps.make_order_converters):
  # train_steps read and write the storage order; everything else reads logical order.
  order: dict[str, Callable[[steps.TrainState], steps.TrainState]]
  # The checkpoint's training metrics since its last log line ({"kind/name": [values]}).
  log_interval: dict = dataclasses.field(default_factory=dict)
  # The workdir's lease (motivation_jax.lease), held from setup to close.
  lease: lease.Lease | lease.Follower | None = None
  # A user's own module (models/paired.py): whether its base is exactly nested, the gap.
  nesting: dict | None = None
  # config.task's (motivation_jax.tasks), and when to evaluate and checkpoint.
  task: Any = tasks.CLASSIFICATION
  schedule: lm.Schedule | None = None
  # Seconds spent in the train loop and, within it, in evaluations (tokens/s).
  loop_time_s: float = 0.0
  eval_time_s: float = 0.0

  _eval_stats: tuple[int, dict | None] | None = None

  def eval_stats(self, state: steps.TrainState, subnets: Sequence[str] = SUBNETS
                 ) -> dict | None:
    """The recalibrated statistics of ``state`` for ``subnets``, each computed
    once per batch count (an evaluation and a checkpoint of the same batch
    share them); None where recalibration is off or the model has no batch norm."""
    step = int(state.step)
    if self._eval_stats is None or self._eval_stats[0] != step:
      self._eval_stats = (step, {})
    done = self._eval_stats[1]
    if done is None:
      return None
    missing = [s for s in subnets if s not in done]
    if missing:
      got = self.recalibrate(state, missing)
      if got is None:
        self._eval_stats = (step, None)
        return None
      done.update(got)
    return {s: done[s] for s in subnets}

  def __post_init__(self):
    if self.schedule is None:
      self.schedule = lm.schedule(self.config, self.train_data.steps_per_epoch)

  @property
  def total_steps(self) -> int:
    return self.schedule.total_steps

  def epoch_ends(self, step: int, every_epochs: int) -> bool:
    """Whether batch ``step`` ends a period (an epoch; for LMs ``lm.Schedule``'s)
    that is a multiple of ``every_epochs``."""
    per_epoch = self.schedule.period
    return step % per_epoch == 0 and (step // per_epoch) % every_epochs == 0

  def close(self, *, release_lease: bool = True) -> None:
    try:
      self.ckpt.close()
      self.writer.close()
    finally:
      if release_lease and self.lease is not None:
        self.lease.release()


def setup(config: ml_collections.ConfigDict, workdir: str) -> tuple[Run, steps.TrainState]:
  """A run and its state: initialised, or restored from the latest checkpoint in
  ``workdir``. Refuses bad input in one line before any training, and compiles
  both step kinds (which also gives their FLOPs).

  Takes the workdir's lease before anything is written there, and refuses a
  workdir another run holds (``errors.WorkdirInUse``); the run holds it until
  ``Run.close`` (or the end of the process)."""
  check_config(config)
  check_workdir(workdir)  # a local directory, or a bucket URL (motivation_jax.files)
  held = lease.acquire_for_run(workdir, ttl_s=config.lease_ttl_s)
  try:
    with held.released_on_sigterm():  # train's StopRequest takes SIGTERM over later
      return _setup(config, workdir, held)
  except BaseException:
    held.release()
    raise


def _setup(config: ml_collections.ConfigDict, workdir: str, held
           ) -> tuple[Run, steps.TrainState]:
  task = tasks.of_config(config)
  if task is tasks.CAUSAL_LM:
    dataset = lm.load(config, workdir, chief=jax.process_index() == 0)
  else:
    dataset = data.get_dataset(config.dataset, config.data_dir,
                               mock_examples=config.mock_data_examples,
                               image_size=config.image_size)
  model, wmap, controller = build(config, dataset)
  if task is tasks.CLASSIFICATION and config.batch_size > len(dataset.train):
    raise ConfigError(f"config.batch_size={config.batch_size} exceeds the {len(dataset.train)} "
                      f"training examples of {dataset.name}")
  # A data x fsdp mesh over every device (config.mesh): each batch split over
  # both axes, each process reading the rows its devices hold.
  mesh = sharding.make_mesh(config.mesh)
  for name in ("batch_size", "eval_batch_size"):
    sharding.check_batch_size(name, config[name], mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  train_rows = sharding.process_rows(batch_sharding, config.batch_size)
  eval_rows = sharding.process_rows(batch_sharding, config.eval_batch_size)
  if task is tasks.CAUSAL_LM:
    train_data, eval_data = lm.batches(config, dataset, train_rows=train_rows,
                                       eval_rows=eval_rows)
  else:
    train_data = data.TrainBatches(dataset, config.batch_size, seed=config.seed,
                                   augment=config.augment, rows=train_rows)
    eval_data = data.EvalBatches(dataset, config.eval_batch_size, rows=eval_rows)
  schedule = lm.schedule(config, train_data.steps_per_epoch)
  optimizer = steps.make_optimizer(config, schedule.total_steps, train_data.steps_per_epoch)
  sample = _sample(config, dataset)
  # The state's layout from its shapes alone (no FLOPs): replicated, or with
  # mesh.fsdp > 1 split by the fsdp rule; then the state is created in it.
  state_sharding = sharding.train_state_sharding(
      steps.abstract_train_state(model, optimizer, sample,
                                 batch_norm_stats=config.model.batch_norm_stats),
      mesh, min_bytes=config.mesh.fsdp_min_mib * 2**20)
  # Host batches carry uint8 images; the steps normalise them on the device.
  normalisation = (dataset.mean, dataset.std) if task is tasks.CLASSIFICATION else None
  train_steps = steps.make_train_steps(model, optimizer, wmap=wmap,
                                       policy=config.motivation.policy,
                                       state_sharding=state_sharding,
                                       batch_sharding=batch_sharding,
                                       normalisation=normalisation, seed=config.seed,
                                       task=task)
  state = steps.create_train_state(
      model, optimizer, config.seed, sample,  # the key is made in its program
      batch_norm_stats=config.model.batch_norm_stats,
      extension_init=config.model.extension_init, state_sharding=state_sharding)
  ckpt = checkpoint.Checkpointer(files.join(workdir, "checkpoints"))
  state, first_step, log_interval = resume(ckpt, state, controller, train_data, config=config)
  chief = jax.process_index() == 0
  if chief:  # what a killed process wrote after the checkpoint is written again
    cut_jsonl(files.join(workdir, "decisions.jsonl"), keep_below=first_step)
    cut_jsonl(files.join(workdir, "metrics.jsonl"), keep_below=first_step + 1)

  # Compile both step kinds up front, from the batches' declared shapes, for
  # the state in the order its layout stores (docs/sharding.md, "Storage order").
  batch_spec = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
                for name, (shape, dtype) in train_data.global_shapes().items()}
  stored = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state).replace(order=steps.stored_order(state_sharding, wmap))
  compiled = {kind: fn.lower(stored, batch_spec).compile() for kind, fn in train_steps.items()}
  put = functools.partial(sharding.global_batch, sharding=batch_sharding)
  run = Run(config=config, dataset=dataset, wmap=wmap, controller=controller,
            train_data=train_data, eval_data=eval_data,
            put=put, train_steps=compiled,
            eval_steps=steps.make_eval_steps(model, normalisation=normalisation, task=task),
            recalibrate=(make_recalibrate(config, model, wmap, dataset, batch_sharding, put)
                         if task is tasks.CLASSIFICATION else lambda state, subnets=SUBNETS: None),
            # XLA counts one device's share of the partitioned program: times the
            # devices, the FLOPs every device executed together.
            flops={kind: steps.compiled_flops(c) * mesh.size for kind, c in compiled.items()},
            ckpt=ckpt, writer=MetricWriter(workdir, enabled=chief, first_step=first_step),
            workdir=workdir, chief=chief, first_step=first_step,
            order=steps.make_order_converters(optimizer, wmap=wmap,
                                              state_sharding=state_sharding),
            log_interval=log_interval, lease=held,
            nesting=model.describe() if hasattr(model, "describe") else None,
            task=task, schedule=schedule)
  return run, state


def make_recalibrate(config, model, wmap: nesting.WeightsMap, dataset: data.Dataset,
                     batch_sharding, put) -> Callable[[steps.TrainState], dict | None]:
  """``state -> recalibrated statistics`` from the config's calibration batches
  (``motivation_jax.recalibration``); returns None when recalibration is off."""
  num_batches = config.bn_recalibration_batches
  recalibrate = recalibration.make_recalibrate(
      model, wmap, normalisation=(dataset.mean, dataset.std))
  batches = recalibration.calibration_batches(
      dataset, config.batch_size, seed=config.seed,
      rows=sharding.process_rows(batch_sharding, config.batch_size))

  def calibrated(state: steps.TrainState, subnets: Sequence[str] = SUBNETS) -> dict | None:
    if num_batches == 0:
      return None
    return recalibrate(state, data.prefetch_to_device(
        batches.iterator(0, num_batches, threads=config.data_threads,
                         workers=config.data_workers), put), subnets)

  return calibrated


# Config keys a run may change when it resumes: how long it trains, how often it
# logs, evaluates and checkpoints, how its batches are fed and laid out on the
# devices. The state means the same afterwards. (num_epochs also stretches the
# learning-rate schedule from the resumed batch on.) Any other key that differs
# is refused. motivation.*, seed and batch_size are left to the controller and
# the data position, which refuse them with their own messages.
SAFE_TO_CHANGE_ON_RESUME = (
    "num_epochs", "log_every_steps", "eval_every_epochs", "checkpoint_every_epochs",
    "bn_recalibration_batches", "eval_batch_size", "data_threads", "data_workers",
    "data_dir", "progress_bar", "max_nonfinite_steps", "mesh.", "dtype", "lease_ttl_s",
    "compilation_cache_dir", *lm.SAFE_TO_CHANGE_ON_RESUME)
_CHECKED_ELSEWHERE = ("motivation.", "seed", "batch_size")


def check_resumed_config(saved: dict | None, config: ml_collections.ConfigDict,
                         directory: str) -> list[str]:
  """Refuses, in one line, a config that would change what the checkpoint's
  state means (the model, any sub-network, the optimizer, the data set);
  returns the safe keys that changed. A key the checkpoint did not record
  (an older checkpoint) is not compared."""
  if not saved:
    return []
  old, new = config_lib.flat(saved), config_lib.flat(json.loads(config.to_json()))
  changed = sorted(k for k in old.keys() & new.keys() if old[k] != new[k]
                   and not k.startswith(_CHECKED_ELSEWHERE))
  def safe(key):
    return any(key == s or (s.endswith(".") and key.startswith(s))
               for s in SAFE_TO_CHANGE_ON_RESUME)
  refused = [k for k in changed if not safe(k)]
  if refused:
    raise ConfigError(f"cannot resume from {directory}: the config differs in "
                      + ", ".join(f"{k} ({old[k]!r} -> {new[k]!r})" for k in refused)
                      + "; that changes what the saved state means: use a new --workdir")
  return [k for k in changed if safe(k)]


def resume(ckpt: checkpoint.Checkpointer, state: steps.TrainState, controller: Controller,
           train_data: data.TrainBatches, *, config: ml_collections.ConfigDict | None = None
           ) -> tuple[steps.TrainState, int, dict]:
  """``(state, first batch, log interval)`` from the newest intact checkpoint
  (``Checkpointer.restore`` moves damaged ones aside), or ``(state, 0, {})``
  without one.

  The order matters: the state is restored into the shapes and shardings of
  ``state``, then the controller state (which refuses another motivation
  config), then the data position (which refuses other batches).
  """
  restored = ckpt.restore(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
  if restored is None:
    return state, 0, {}
  state, controller_state, position, step, log_interval = restored
  if config is not None:
    saved_config, _, _ = ckpt.restore_description(step)
    changed = check_resumed_config(saved_config, config, ckpt.directory)
    if changed and jax.process_index() == 0:
      print(f"resuming with changed {', '.join(changed)} (safe to continue with)", file=sys.stderr)
  try:
    controller.load_state_dict(controller_state)
    first_step = train_data.check_position(position)
  except ValueError as e:
    raise ConfigError(f"cannot resume from {ckpt.directory}: {e}") from e
  if not int(state.step) == first_step == controller.step:
    raise TrainingError(f"checkpoint inconsistent: state at batch {int(state.step)}, data at "
                        f"batch {first_step}, controller at batch {controller.step}")
  return state, first_step, log_interval


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


class StopRequest:
  """SIGTERM and SIGINT as a request to stop at the next batch boundary.

  A single process catches both signals while it trains (``with``): the
  handler only notes the signal, and ``reached(step)``, asked once per batch,
  says to checkpoint that batch and stop. A second signal acts as it would
  without this (the handlers are given back at the first), so a run that
  hangs can still be stopped.

  In a multi-process run JAX's preemption service owns SIGTERM (it tells every
  process, and they agree on the batch to stop at): no Python handler replaces
  it; ``reached`` asks Orbax's ``reached_preemption`` at every batch instead,
  so all processes checkpoint the same batch.
  """

  def __init__(self, ckpt: checkpoint.Checkpointer):
    self._ckpt = ckpt
    self._multi_process = jax.process_count() > 1
    self._previous: dict[int, Any] = {}
    self.signal: signal.Signals | None = None

  def __enter__(self) -> "StopRequest":
    if not self._multi_process and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._note)
    return self

  def __exit__(self, *exc) -> None:
    self._give_back()

  def _note(self, signum: int, frame) -> None:
    self.signal = signal.Signals(signum)
    self._give_back()

  def _give_back(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    self._previous.clear()

  def reached(self, step: int) -> bool:
    """Whether to checkpoint batch ``step`` (batches done) and stop."""
    if self._multi_process and self.signal is None:
      if self._ckpt.manager.reached_preemption(step):  # the same answer on every process
        self.signal = signal.SIGTERM
    return self.signal is not None


def train(run: Run, state: steps.TrainState) -> tuple[steps.TrainState, dict[str, float]]:
  """Trains from ``run.first_step`` to the end; returns the state and the last
  evaluation (empty if no evaluation was due). Raises ``Preempted`` after
  checkpointing the batch at which a stop was requested (``StopRequest``)."""
  with StopRequest(run.ckpt) as stop:
    # The steps read and write the storage order (a permutation within the
    # split leaves, docs/sharding.md); the state goes in and out in logical order.
    start = time.perf_counter()
    state, eval_metrics = _train(run, run.order["storage"](state), stop)
    run.loop_time_s += time.perf_counter() - start
    return run.order["logical"](state), eval_metrics


def _train(run: Run, state: steps.TrainState, stop: StopRequest
           ) -> tuple[steps.TrainState, dict[str, float]]:
  config, controller = run.config, run.controller
  pending = PendingMetrics(controller, run.ckpt,
                           max_nonfinite_steps=config.max_nonfinite_steps)
  pending.resume_interval(run.log_interval)
  decisions = agreement.DecisionCheck(controller)  # the same on every process
  eval_metrics: dict[str, float] = {}
  bar = tqdm.tqdm(total=run.total_steps, initial=run.first_step, unit="batch",
                  disable=not (config.progress_bar and run.chief), dynamic_ncols=True)
  # grain's threads (or worker processes) prepare host batches ahead; the next
  # batches are copied to the devices while the current step runs.
  batches = data.prefetch_to_device(run.train_data.iterator(
      run.first_step, run.total_steps, threads=config.data_threads,
      workers=config.data_workers), run.put)
  # What every batch asks, looked up once (a ConfigDict attribute costs about a
  # µs, a tenth of the loop's own host work per batch; benchmarks/run.py).
  total, per_epoch = run.total_steps, run.schedule.period
  log_every = config.log_every_steps
  next_kind, push, train_steps = decisions.next_kind, pending.push, run.train_steps
  for t, batch in zip(range(run.first_step, total), batches):
    kind = next_kind(t)
    state, metrics = train_steps[kind](state, batch)
    push(t, kind, metrics)
    bar.update(1)
    step = t + 1
    if step % log_every == 0:
      log_training(run, step, pending.interval_means(), bar)
    stopping = stop.reached(step) and step < total
    if step % per_epoch and step != total and not stopping:
      continue  # evaluations and checkpoints fall on epoch (period) ends and the last batch
    evaluate_now = run.epoch_ends(step, run.schedule.eval_every) or step == total
    save_now = (run.epoch_ends(step, run.schedule.checkpoint_every)
                or step == total or stopping)
    if evaluate_now or save_now:
      decisions.flush()  # before waiting on this step's state
    if evaluate_now:
      eval_metrics = evaluate_and_log(run, state, step, bar)
    if save_now:
      save(run, state, pending, step)
    if stopping:
      bar.close()
      committed = run.ckpt.committed_step()
      raise Preempted(f"stopped by {stop.signal.name} after batch {step} of "
                      f"{run.total_steps}: checkpoint {committed} is in {run.ckpt.directory}; "
                      "the same command resumes from it", 128 + stop.signal.value)
  bar.close()
  return state, eval_metrics


def log_training(run: Run, step: int, means: dict[str, float], bar: tqdm.tqdm) -> None:
  means["motivated_fraction"] = run.controller.counts["motivated"] / step
  run.writer.write(step, means)
  bar.set_postfix({k.replace("/", "_"): f"{v:.3f}" for k, v in means.items()
                   if k.endswith("loss")})


def evaluate(eval_steps, state, eval_data: data.EvalBatches, put, threads: int,
             eval_stats: dict | None = None, *, workers: int = 0,
             task=tasks.CLASSIFICATION) -> dict[str, float]:
  """Test accuracy and loss of each sub-network, every test example (or held-out
  target token: then bits per byte and perplexity too, ``tasks``) counted once,
  with the batch-norm statistics ``eval_stats`` gives (``{"base": tree,
  "motivated": tree}``, recalibrated) or else the state's running averages.
  ``state`` in logical order (``Run.order``)."""
  _check_logical(state, "evaluate")
  variables = {subnet: state.variables(subnet) if eval_stats is None else
               {"params": state.params, "batch_stats": eval_stats[subnet]}
               for subnet in eval_steps}
  sums = {k: collections.Counter() for k in eval_steps}
  for batch in data.prefetch_to_device(eval_data.iterator(threads=threads, workers=workers),
                                       put):
    for subnet, fn in eval_steps.items():
      sums[subnet].update(jax.device_get(fn(variables[subnet], batch)))
  out = {}
  extra = ({"bytes_per_token": eval_data.bytes_per_token} if task is tasks.CAUSAL_LM else {})
  for subnet, s in sums.items():
    out.update({f"{subnet}/{k}": v for k, v in task.eval_metrics(s, **extra).items()})
  return out


# Evaluations (counted in eval_every_epochs) that also report the accuracy with
# the running averages, so that the effect of recalibration is visible; the
# last evaluation of a run does too.
COMPARED_EVALUATIONS = 3


def evaluate_run(run: Run, state: steps.TrainState, *, compare: bool = False,
                 subnets: Sequence[str] = SUBNETS) -> dict[str, float]:
  """``evaluate`` of ``subnets`` with the run's recalibrated statistics; with
  ``compare`` (and recalibration on) also with the running averages, as
  ``{subnet}/test_accuracy_running_stats`` and ``{subnet}/test_loss_running_stats``.
  ``state`` in either order (the loop's is in storage order): it reads logical order."""
  state = run.order["logical"](state)
  eval_stats = run.eval_stats(state, subnets)
  eval_steps = {s: run.eval_steps[s] for s in SUBNETS if s in subnets}
  metrics = evaluate(eval_steps, state, run.eval_data, run.put,
                     run.config.data_threads, eval_stats, workers=run.config.data_workers,
                     task=run.task)
  if compare and eval_stats is not None:
    running = evaluate(eval_steps, state, run.eval_data, run.put, run.config.data_threads,
                       workers=run.config.data_workers)
    metrics.update({f"{k}_running_stats": v for k, v in running.items()})
  return metrics


def evaluate_and_log(run: Run, state: steps.TrainState, step: int, bar: tqdm.tqdm
                     ) -> dict[str, float]:
  start = time.perf_counter()
  epoch = step // run.train_data.steps_per_epoch
  compare = (step // run.schedule.period <= COMPARED_EVALUATIONS * run.schedule.eval_every
             or step == run.total_steps)
  # Until the last evaluation, only the sub-networks that have trained: one
  # that never took an update of its own (the motivated model of a run whose
  # condition has not fired, as in the experiments' base_alone arm) is
  # evaluated, and recalibrated, once, at the end, for the summary.
  subnets = SUBNETS if step == run.total_steps else (trained_subnets(run) or SUBNETS)
  metrics = evaluate_run(run, state, compare=compare, subnets=subnets)
  run.writer.write(step, {**metrics, "epoch": epoch})
  if run.schedule.unit == "batch":  # LM runs count steps (lm.Schedule)
    epoch = step
  bar.write(f"{run.schedule.unit} {epoch}: " + ", ".join(
      f"{k} {v:.4f}" for k, v in metrics.items() if "running_stats" not in k))
  _, bad = finite_json(metrics)
  if bad:  # the training loss stayed finite (else the run stopped): the weights diverged
    bar.write(f"warning: {', '.join(bad)} not finite at {run.schedule.unit} {epoch}: that "
              "model diverged; lower config.learning_rate")
  worse = worse_than_guessing(run, metrics)
  if worse:
    bar.write(f"warning: at {run.schedule.unit} {epoch} {'; '.join(worse)}: training diverged; "
              "lower config.learning_rate")
  run.eval_time_s += time.perf_counter() - start
  return metrics


def trained_subnets(run: Run) -> list[str]:
  """The sub-networks that took at least one update of their own so far."""
  counts = run.controller.counts
  base = counts["base"] > 0 or (run.config.motivation.policy in ("both", "joint")
                                and counts["motivated"] > 0)
  return [s for s, trained in (("base", base), ("motivated", counts["motivated"] > 0))
          if trained]


def worse_than_guessing(run: Run, metrics: dict[str, float]) -> list[str]:
  """For each sub-network that trained and whose test loss is not finite, or is
  over ten times a uniform guess's (10 ln classes) while its accuracy is below
  twice chance: what it scored. A learning rate far too large gives this with
  a training loss that stays finite: the weights swing to where every
  prediction is confident and wrong (test losses of 58 to 8,705 for 10 classes
  at learning rate 100). An undertrained model is far from it: EfficientNet's
  smoke run on mock data, 100 classes, ends near 11 > 2 ln 100, so twice a
  uniform guess's would call it diverged."""
  classes = run.dataset.num_classes
  out = []
  for subnet in trained_subnets(run):
    loss = metrics.get(f"{subnet}/test_loss")
    accuracy = metrics.get(f"{subnet}/test_accuracy")
    if loss is None or accuracy is None:
      continue
    if not math.isfinite(loss) or (loss > 10 * math.log(classes) and accuracy < 2 / classes):
      out.append(f"the {subnet} model is worse than guessing (test loss {loss:.4g} > "
                 f"10 ln {classes}, test accuracy {accuracy:.4f}, chance {1 / classes:.4f})")
  return out


def _check_logical(state: steps.TrainState, reader: str) -> None:
  if getattr(state, "order", "logical") != "logical":
    raise ValueError(f"{reader} reads a state in logical order, got one in {state.order} "
                     "order; convert it with Run.order['logical'] "
                     "(steps.make_order_converters)")


def save(run: Run, state: steps.TrainState, pending: PendingMetrics, step: int) -> None:
  """Checkpoints batch ``step``, after the decisions up to it are in decisions.jsonl
  and the metrics up to it on disk.

  Those lines are written before the checkpoint commits: if the process dies
  during the save, the next start resumes from the previous checkpoint and
  first cuts the logs back to it (``setup``), so no line is ever doubled.

  A state that is not finite (an update whose gradient was finite overflowed;
  the steps skip only what they can see before updating) is never saved:
  the run stops there, and the checkpoints before it stay the newest.

  ``state`` in either order: the checkpoint holds logical order, so that any
  mesh resumes it (a copy of the split leaves while it is written).
  """
  pending.flush()
  if run.lease is not None:
    run.lease.check()  # another run took the workdir over: write nothing more
  state = run.order["logical"](state)
  eval_stats = run.eval_stats(state)
  checksums, finite = checkpoint.array_checksums_and_finite(
      checkpoint.saved_arrays(state, eval_stats),
      finite_of=(state.params, state.batch_stats, state.opt_state))
  if not finite:
    last = run.ckpt.committed_step()
    kept = (f"the checkpoint of batch {last} in {run.ckpt.directory} is intact"
            if last is not None else "no checkpoint had been written yet")
    raise TrainingError(f"the parameters or optimizer state are not finite at batch {step} "
                        f"(an update overflowed), so they were not checkpointed; {kept}; "
                        "lower config.learning_rate")
  decisions = run.controller.drain_decisions()
  if run.chief:
    lines = []
    for d in decisions:
      loss = pending.losses.pop(d.step)
      lines.append(json.dumps({**d.to_dict(), "loss": loss,
                               **({"nonfinite": True} if loss is None else {})}) + "\n")
    files.append_lines(files.join(run.workdir, "decisions.jsonl"), lines)
  run.writer.flush()
  run.ckpt.save(step, state=state, controller_state=run.controller.state_dict(),
                data_position=run.train_data.position(step),
                config=json.loads(run.config.to_json()), dataset=run.dataset.description(),
                eval_stats=eval_stats, log_interval=pending.interval(),
                array_checksums=checksums)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains both sub-networks and returns the summary (also in workdir/summary.json)."""
  start_time = time.time()
  # Before the first compile (motivation_jax.compilation): every program this
  # run compiles, or reads back from the cache, is counted in its summary.
  cache_dir = compilation.use_cache(config.get("compilation_cache_dir"))
  with compilation.CompileLog() as compiles:
    run, state = setup(config, workdir)  # takes the workdir's lease
    try:
      summary, worse = _train_and_summarize(run, state, start_time,
                                            compiled=lambda: compiles.summary(cache_dir))
    finally:  # the end, an error, SIGTERM or SIGINT (Preempted, KeyboardInterrupt)
      run.lease.release()
  if worse:  # not a success, whatever was written: a scheduler must see it
    raise TrainingError(f"the run ended, but {'; '.join(worse)}: training diverged; its "
                        f"summary and last checkpoint are in {workdir}; lower "
                        "config.learning_rate")
  return summary


def _train_and_summarize(run: Run, state: steps.TrainState, start_time: float, *,
                         compiled: Callable[[], dict] | None = None
                         ) -> tuple[dict[str, Any], list[str]]:
  """``train``, then the summary, written to workdir/summary.json while the
  run still holds its lease."""
  try:
    state, eval_metrics = train(run, state)
    if not eval_metrics:  # resumed at the end: nothing was trained or evaluated
      eval_metrics = evaluate_run(run, state, compare=True)
  except Exception as e:
    # Let a save in flight finish (Orbax would otherwise die with the
    # interpreter, with tracebacks), and close the writers; not when device
    # work that never finishes is in flight (the error's exit_at_once).
    if not getattr(e, "exit_at_once", False):
      try:
        run.close(release_lease=False)
      except Exception:  # the first error is the one to report
        pass
    raise
  run.close(release_lease=False)
  summary = summarize(run, eval_metrics, time.time() - start_time)
  if compiled is not None:
    summary["compilation"] = compiled()
  worse = worse_than_guessing(run, eval_metrics)
  if worse:
    summary["diverged"] = [w.split()[1] for w in worse]
  if run.chief:
    run.lease.check()
    written, bad = finite_json(summary)
    files.write_text(files.join(run.workdir, "summary.json"), json.dumps(
        {**written, **({"non_finite": bad} if bad else {})}, indent=2, allow_nan=False))
  return summary, worse


def summarize(run: Run, eval_metrics: dict[str, float], wall_time_s: float) -> dict[str, Any]:
  """What the run gave (both test accuracies) and what it cost."""
  counts, flops = run.controller.counts, run.flops
  # Under policies "both" and "joint" the compiled motivated step includes a
  # base step (joint: the base's forward and backward, one update of the sum).
  motivated_only_flops = flops["motivated"] - (
      flops["base"] if run.config.motivation.policy in ("both", "joint") else 0.0)
  return {
      "dataset": run.dataset.name,
      "train_examples": len(run.dataset.train),
      "test_examples": len(run.dataset.test),
      "base/test_accuracy": eval_metrics["base/test_accuracy"],
      "motivated/test_accuracy": eval_metrics["motivated/test_accuracy"],
      "base_steps": counts["base"],
      "motivated_steps": counts["motivated"],
      # What a motivated batch trained: the motivated model ("switch"), the base
      # then it ("both"), or both at once, one update ("joint").
      "policy": run.config.motivation.policy,
      "activations": run.controller.activations,
      # Batches whose update was not applied (a non-finite loss or gradient).
      "nonfinite_steps": run.controller.missing_losses,
      "params": {"base": run.wmap.num_params("base"),
                 "motivated": run.wmap.num_params("motivated")},
      "flops_per_step": flops,
      "training_flops": counts["base"] * flops["base"] + counts["motivated"] * flops["motivated"],
      # What training the motivated (large) model alone on every batch costs.
      "large_alone_flops": (counts["base"] + counts["motivated"]) * motivated_only_flops,
      "wall_time_s": wall_time_s,
      "resumed_from_step": run.first_step,
      # 0 when the test accuracies use the running averages (no batch norm, or off).
      "bn_recalibration_batches": (run.config.bn_recalibration_batches
                                   if jax.tree.leaves(run.wmap["batch_stats"]) else 0),
      # A user's own module: {"exact", "gap", "api"} (exact False: the base only
      # shares weights, models/paired.py).
      **({"nesting": run.nesting} if run.nesting else {}),
      # The same accuracies with the running averages, where they differ.
      **{k: v for k, v in eval_metrics.items() if k.endswith("test_accuracy_running_stats")},
      # A language model's held-out loss, bits per byte, perplexity, FLOPs per token, tokens/s.
      **(lm.summary_fields(run, eval_metrics) if run.task is tasks.CAUSAL_LM else {}),
  }


def format_summary(summary: dict[str, Any]) -> str:
  """The summary as a small table for the terminal."""
  flops, params = summary["flops_per_step"], summary["params"]
  ratio = summary["training_flops"] / summary["large_alone_flops"]
  if summary.get("task") == "causal_lm":  # held-out bits per byte, FLOPs per token, tokens/s
    header, rows, extra = lm.summary_table(summary)
  else:
    header = (f"{summary['dataset']}: {summary['train_examples']:,} training and "
              f"{summary['test_examples']:,} test examples")
    rows = [
        ("test accuracy", f"{summary['base/test_accuracy']:.4f}",
         f"{summary['motivated/test_accuracy']:.4f}"),
        ("parameters", f"{params['base']:,}", f"{params['motivated']:,}"),
        ("train steps", f"{summary['base_steps']:,}", f"{summary['motivated_steps']:,}"),
        ("FLOPs per step", f"{flops['base']:.3e}", f"{flops['motivated']:.3e}"),
    ]
    extra = []
  rows = [("", "base", "motivated"), *rows]
  width = max(len(r[0]) for r in rows)
  lines = [header] + [f"{a:<{width}}  {b:>14}  {c:>14}" for a, b, c in rows]
  lines += [
      f"activations of the motivated model: {summary['activations']:,}",
      f"training FLOPs: {summary['training_flops']:.3e} = {ratio:.1%} of training the "
      f"motivated model alone on every batch ({summary['large_alone_flops']:.3e})",
      *extra,
      f"wall time: {summary['wall_time_s']:.1f} s",
  ]
  if summary.get("nonfinite_steps"):
    lines.insert(-1, f"batches not applied (a non-finite loss or gradient): "
                     f"{summary['nonfinite_steps']:,}")
  nested = summary.get("nesting")
  if nested and not nested["exact"]:
    lines.insert(-1, f"the base is not exactly nested (exact=False): it shares the motivated "
                     f"model's weights, its outputs differ by up to {nested['gap']:.3g}")
  if summary["resumed_from_step"]:
    lines[-1] += f" (this process, resumed at batch {summary['resumed_from_step']:,})"
  if "compilation" in summary:
    lines.append(compilation.describe(summary["compilation"]))
  return "\n".join(lines)
