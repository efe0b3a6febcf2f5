"""``setup(config, workdir)``: a run (data, model, controller, the two compiled
steps) and its state, initialised or restored.

``Run`` holds everything the loop (``train.train``), the evaluations
(``evaluation``) and the checkpoints (``saving``) read besides the train state;
``setup`` builds it once ``run_checks`` has refused bad input, and restores the
state from the workdir's latest checkpoint (``resuming``) if there is one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from motivation_jax import (checkpoint, data, files, lease, lm, models, nesting, recalibration,
                            sharding, steps, tasks)
from motivation_jax.common import SUBNETS
from motivation_jax.controller import Controller
from motivation_jax.errors import ConfigError
from motivation_jax.metrics import MetricWriter, cut_jsonl
from motivation_jax.resuming import resume
from motivation_jax.run_checks import check_config, check_workdir


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
  # "base" | "motivated" -> compiled step, or NotCompiled (a kind never picked)
  train_steps: dict[str, Any]
  eval_steps: dict[str, Callable]  # "base" | "motivated" -> jitted eval step
  # (state, subnets) -> {subnet: stats} recalibrated, or None (off, or no batch norm)
  recalibrate: Callable[..., dict | None]
  # Per train step, all devices together, from XLA; None for a kind not compiled.
  flops: dict[str, float | None]
  ckpt: checkpoint.Checkpointer
  writer: MetricWriter
  workdir: str
  chief: bool                      # process 0 writes the files
  first_step: int                  # 0, or the batch a resumed run starts at
  # "storage" | "logical" -> state -> the state in that order (steps.make_order_converters):
  # train_steps read and write the storage order (config.model.state_layout's:
  # a BlockState for "blocks"); everything else reads logical order.
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
  abstract = steps.abstract_train_state(model, optimizer, sample,
                                        batch_norm_stats=config.model.batch_norm_stats)
  state_sharding = sharding.train_state_sharding(
      abstract, mesh, min_bytes=config.mesh.fsdp_min_mib * 2**20)
  # Host batches carry uint8 images; the steps normalise them on the device.
  normalisation = (dataset.mean, dataset.std) if task is tasks.CLASSIFICATION else None
  # Checkpoints hold logical order whatever the layout, so it may change on resume.
  state_layout = config.model.get("state_layout", "in_place")
  train_steps = steps.make_train_steps(model, optimizer, wmap=wmap,
                                       policy=config.motivation.policy,
                                       state_sharding=state_sharding,
                                       batch_sharding=batch_sharding,
                                       normalisation=normalisation, seed=config.seed,
                                       task=task, state_layout=state_layout)
  # A checkpoint in the workdir is restored (into the abstract state's shapes
  # and layout) and its config checked before anything compiles, so that a
  # config that cannot resume is refused at once; a resumed run makes no
  # initial state.
  placed = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, state_sharding)
  ckpt = checkpoint.Checkpointer(files.join(workdir, "checkpoints"))
  state, first_step, log_interval = resume(ckpt, placed, controller, train_data,
                                           config=config)
  chief = jax.process_index() == 0
  if chief:  # what a killed process wrote after the checkpoint is written again
    cut_jsonl(files.join(workdir, "decisions.jsonl"), keep_below=first_step)
    cut_jsonl(files.join(workdir, "metrics.jsonl"), keep_below=first_step + 1)
  # The step kinds the controller can pick (both, unless its condition is
  # constant: ``Controller.kinds``) are lowered up front, from the batches'
  # declared shapes and the state's (in the order its layout stores:
  # docs/sharding.md, "Storage order"); XLA compiles them, or reads them from
  # the cache, in threads (it does not hold Python's lock) while this one makes
  # a new run's initial state.
  batch_spec = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
                for name, (shape, dtype) in train_data.global_shapes().items()}
  stored = steps.stored_state(placed, optimizer, wmap=wmap, state_sharding=state_sharding,
                              state_layout=state_layout)
  kinds = controller.kinds()
  lowered = {kind: train_steps[kind].lower(stored, batch_spec) for kind in kinds}
  pool = concurrent.futures.ThreadPoolExecutor(len(lowered), "compile")
  try:
    compiling = {kind: pool.submit(lowered[kind].compile) for kind in kinds}
    if state is None:  # a new run
      state = steps.create_train_state(
          model, optimizer, config.seed, sample,  # the key is made in its program
          batch_norm_stats=config.model.batch_norm_stats,
          extension_init=config.model.extension_init, state_sharding=state_sharding)
    compiled = {kind: compiling[kind].result() if kind in kinds
                else NotCompiled(kind, controller.condition.name) for kind in SUBNETS}
  finally:  # an error above is raised now, not after the compiles it no longer needs
    pool.shutdown(wait=False, cancel_futures=True)
  _check_compiled_for(state, placed)
  put = functools.partial(sharding.global_batch, sharding=batch_sharding)
  run = Run(config=config, dataset=dataset, wmap=wmap, controller=controller,
            train_data=train_data, eval_data=eval_data,
            put=put, train_steps=compiled,
            eval_steps=steps.make_eval_steps(model, normalisation=normalisation, task=task),
            recalibrate=(make_recalibrate(config, model, wmap, dataset, batch_sharding, put)
                         if task is tasks.CLASSIFICATION else lambda state, subnets=SUBNETS: None),
            # XLA counts one device's share of the partitioned program: times the
            # devices, the FLOPs every device executed together.
            # None: a kind this run never runs, so never compiled.
            flops={kind: steps.compiled_flops(c) * mesh.size if kind in kinds else None
                   for kind, c in compiled.items()},
            ckpt=ckpt, writer=MetricWriter(workdir, enabled=chief, first_step=first_step),
            workdir=workdir, chief=chief, first_step=first_step,
            order=steps.make_order_converters(optimizer, wmap=wmap,
                                              state_sharding=state_sharding,
                                              state_layout=state_layout),
            log_interval=log_interval, lease=held,
            nesting=model.describe() if hasattr(model, "describe") else None,
            task=task, schedule=schedule)
  return run, state


def _check_compiled_for(state: steps.TrainState, spec: steps.TrainState) -> None:
  """The steps were compiled for ``spec`` (the abstract state in logical order
  and its layout; they take it in their own order), before ``state`` was made
  or restored: a leaf of another shape, dtype or
  layout would be refused at the first step, deep in JAX; say it here."""
  for (path, leaf), want in zip(jax.tree_util.tree_leaves_with_path(state),
                                jax.tree.leaves(spec)):
    if (leaf.shape, leaf.dtype, leaf.sharding) != (want.shape, want.dtype, want.sharding):
      raise RuntimeError(
          f"the train state's {jax.tree_util.keystr(path)} is {leaf.dtype}{list(leaf.shape)} "
          f"laid out as {leaf.sharding}, but the steps were compiled for "
          f"{want.dtype}{list(want.shape)} laid out as {want.sharding}")


@dataclasses.dataclass(frozen=True)
class NotCompiled:
  """``Run.train_steps``'s entry for a step kind the run's condition never picks
  (``Controller.kinds``): compiling it would cost the start-up its trace, its
  compile or cache read, and nothing else. Called anyway, it says so in one line."""
  kind: str
  condition: str

  def __call__(self, *args, **kwargs):
    raise RuntimeError(f"the {self.kind} step was not compiled: condition "
                       f"{self.condition!r} never picks it (Controller.kinds)")


# Calibration batches of at most this many bytes in all stay on the devices
# between recalibrations (``make_recalibrate``).
CALIBRATION_CACHE_BYTES = 64 * 2**20


def make_recalibrate(config, model, wmap: nesting.WeightsMap, dataset: data.Dataset,
                     batch_sharding, put) -> Callable[[steps.TrainState], dict | None]:
  """``state -> recalibrated statistics`` from the config's calibration batches
  (``motivation_jax.recalibration``); returns None when recalibration is off.

  The calibration batches are the same at every recalibration. Where they are
  small (digits', CIFAR's: under ``CALIBRATION_CACHE_BYTES`` together) the
  first recalibration's device copies are kept, so the later ones prepare
  nothing on the host and copy nothing to the devices (the default config
  recalibrates 24 times: 480 batches made and copied, then 20). Larger ones
  (ImageNet's) are made again each time, as the training batches are."""
  num_batches = config.bn_recalibration_batches
  recalibrate = recalibration.make_recalibrate(
      model, wmap, normalisation=(dataset.mean, dataset.std))
  batches = recalibration.calibration_batches(
      dataset, config.batch_size, seed=config.seed,
      rows=sharding.process_rows(batch_sharding, config.batch_size))
  batch_bytes = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize
                    for shape, dtype in batches.global_shapes().values())
  keep = num_batches * batch_bytes <= CALIBRATION_CACHE_BYTES
  kept: list = []

  def device_batches():
    if kept:
      return iter(kept)
    stream = data.prefetch_to_device(
        batches.iterator(0, num_batches, threads=config.data_threads,
                         workers=config.data_workers), put)
    if not keep:
      return stream
    made = list(stream)  # kept only whole: a recalibration cut short keeps nothing
    kept.extend(made)
    return iter(kept)

  def calibrated(state: steps.TrainState, subnets: Sequence[str] = SUBNETS) -> dict | None:
    if num_batches == 0:
      return None
    return recalibrate(state, device_batches(), subnets)

  return calibrated
