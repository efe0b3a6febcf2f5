"""``train_and_evaluate(config, workdir)``: wires data, model, steps and controller.

The loop per batch t (nothing else happens on the host per step)::

    kind = controller.next_kind()              # host, plain Python
    state, metrics = steps[kind](state, batch)  # one compiled program per kind
    controller.observe(t - lag, loss of batch t - lag)   # already on the host

Both step kinds are compiled ahead of time, before the first batch, which also
gives their FLOPs for the summary.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import numbers
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from motivation_jax import checkpoint, data, models, nesting, sharding, steps
from motivation_jax.controller import Controller
from motivation_jax.errors import ConfigError, MotivationError, TrainingError
from motivation_jax.metrics import MetricWriter


def make_optimizer(config, total_steps: int, steps_per_epoch: int) -> optax.GradientTransformation:
  warmup = min(int(config.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, warmup_steps=warmup, decay_steps=max(total_steps, 1))
  if config.optimizer == "sgd":
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(schedule, momentum=config.momentum))
  if config.optimizer == "adamw":
    return optax.adamw(schedule, weight_decay=config.weight_decay)
  raise ConfigError(f"config.optimizer must be 'sgd' or 'adamw', got {config.optimizer!r}")


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
    "learning_rate": (float, "a finite number > 0", lambda v: v > 0),
    "momentum": (float, "a number in [0, 1)", lambda v: 0 <= v < 1),
    "weight_decay": (float, *_NON_NEGATIVE), "warmup_epochs": (float, *_NON_NEGATIVE),
}


def check_config(config) -> None:
  """Refuses, in one line and before any work, a value that cannot train."""
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
  image_size = config.get("image_size", "missing")
  if image_size is not None and not (isinstance(image_size, int) and image_size >= 8):
    raise ConfigError(f"config.image_size must be unset (None) or an integer >= 8, "
                      f"got {image_size!r}")
  for key in ("name", "base", "motivated", "batch_norm_stats", "extension_init"):
    if key not in config.model:
      raise ConfigError(f"config.model.{key} is missing (configs/default.py lists every key)")
  if config.model.batch_norm_stats not in steps.BATCH_STATS:
    raise ConfigError(f"config.model.batch_norm_stats must be one of {steps.BATCH_STATS}, "
                      f"got {config.model.batch_norm_stats!r}")
  if config.model.extension_init not in models.EXTENSION_INITS:
    raise ConfigError(f"config.model.extension_init must be one of {models.EXTENSION_INITS}, "
                      f"got {config.model.extension_init!r}")


def build(config, dataset: data.Dataset):
  """Model, weights map and controller from a config, with one-line errors."""
  try:
    model = models.build_model(config.model, dataset.num_classes)
  except MotivationError:
    raise
  except (ValueError, KeyError, TypeError) as e:
    raise ConfigError(f"config.model: {e}") from e
  try:
    controller = Controller.from_config(config.motivation)
  except ValueError as e:
    raise ConfigError(f"config.motivation: {e}") from e
  sample = jnp.zeros((1, *dataset.image_shape), jnp.float32)
  wmap = nesting.weights_map(model, sample, subnet="motivated")
  return model, wmap, controller


def evaluate(eval_steps, state, eval_data: data.EvalBatches, put, threads: int
             ) -> dict[str, float]:
  """Test accuracy and loss of each sub-network, every test example counted once."""
  sums = {k: collections.Counter() for k in eval_steps}
  for batch in data.prefetch_to_device(eval_data.iterator(threads=threads), put):
    for subnet, fn in eval_steps.items():
      sums[subnet].update(jax.device_get(fn(state.variables(subnet), batch)))
  out = {}
  for subnet, s in sums.items():
    out[f"{subnet}/test_accuracy"] = float(s["correct"] / s["count"])
    out[f"{subnet}/test_loss"] = float(s["loss_sum"] / s["count"])
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains both sub-networks and returns the summary (also in workdir/summary.json)."""
  start_time = time.time()
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  dataset = data.get_dataset(config.dataset, config.data_dir,
                             mock_examples=config.mock_data_examples,
                             image_size=config.image_size)
  model, wmap, controller = build(config, dataset)
  if config.batch_size > len(dataset.train):
    raise ConfigError(f"config.batch_size={config.batch_size} exceeds the {len(dataset.train)} "
                      f"training examples of {dataset.name}")
  # Data parallel over every device: state replicated, batches split; each
  # process reads the rows of each batch that its devices hold.
  mesh = sharding.data_mesh()
  for name in ("batch_size", "eval_batch_size"):
    sharding.check_batch_size(name, config[name], mesh)
  batch_sharding, state_sharding = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  put = functools.partial(sharding.global_batch, sharding=batch_sharding)
  train_data = data.TrainBatches(
      dataset, config.batch_size, seed=config.seed, augment=config.augment,
      rows=sharding.process_rows(batch_sharding, config.batch_size))
  eval_data = data.EvalBatches(
      dataset, config.eval_batch_size,
      rows=sharding.process_rows(batch_sharding, config.eval_batch_size))
  total_steps = config.num_epochs * train_data.steps_per_epoch
  optimizer = make_optimizer(config, total_steps, train_data.steps_per_epoch)
  train_steps = steps.make_train_steps(model, optimizer, wmap=wmap,
                                       policy=config.motivation.policy,
                                       state_sharding=state_sharding,
                                       batch_sharding=batch_sharding)
  eval_steps = steps.make_eval_steps(model)

  rng = jax.random.key(config.seed)
  sample = jnp.zeros((1, *dataset.image_shape), jnp.float32)
  state = steps.create_train_state(model, optimizer, rng, sample,
                                   stats=config.model.batch_norm_stats,
                                   extension_init=config.model.extension_init)
  state = jax.device_put(state, state_sharding)

  # Resume: state, then controller (checks the motivation config), then the
  # data position (checks that the batches would be the same).
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  restored = ckpt.restore(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=state_sharding), state))
  first_step = 0
  if restored is not None:
    state, controller_state, position, _ = restored
    try:
      controller.load_state_dict(controller_state)
      first_step = train_data.check_position(position)
    except ValueError as e:
      raise ConfigError(f"cannot resume from {ckpt.directory}: {e}") from e
  if not int(state.step) == first_step == controller.step:
    raise TrainingError(f"checkpoint inconsistent: state at batch {int(state.step)}, data at "
                        f"batch {first_step}, controller at batch {controller.step}")

  # Compile both step kinds up front (also gives their FLOPs).
  batch_spec = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
                for name, (shape, dtype) in train_data.global_shapes().items()}
  compiled = {kind: fn.lower(state, batch_spec).compile() for kind, fn in train_steps.items()}
  flops = {kind: steps.compiled_flops(c) for kind, c in compiled.items()}

  # Every process takes the same decisions; process 0 writes the files.
  chief = jax.process_index() == 0
  writer = MetricWriter(workdir, enabled=chief)
  decisions_path = os.path.join(workdir, "decisions.jsonl")
  lag = controller.config["decision_lag"]
  in_flight: collections.deque = collections.deque()
  interval = collections.defaultdict(list)
  eval_metrics: dict[str, float] = {}

  def observe_oldest():
    t, kind, metrics = in_flight.popleft()
    metrics = jax.device_get(metrics)  # batch t finished long ago: no stall
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      last = ckpt.latest_step()
      kept = (f"the checkpoint of batch {last} in {ckpt.directory} is intact" if last is not None
              else "no checkpoint had been written yet")
      raise TrainingError(f"the training loss is {loss} at batch {t} ({kind} step); {kept}; "
                          "lower config.learning_rate")
    controller.observe(t, loss)
    for name, value in metrics.items():
      interval[f"{kind}/{name}"].append(float(value))

  def flush_decisions():
    decisions = controller.drain_decisions()
    if chief:
      with open(decisions_path, "a") as f:
        for d in decisions:
          f.write(json.dumps(d.to_dict()) + "\n")

  def save(step):
    while in_flight:  # the controller state must hold every loss
      observe_oldest()
    flush_decisions()
    ckpt.save(step, state=state, controller_state=controller.state_dict(),
              data_position=train_data.position(step), config=json.loads(config.to_json()),
              dataset=dataset.description())

  bar = tqdm.tqdm(total=total_steps, initial=first_step, disable=not config.progress_bar,
                  unit="batch", dynamic_ncols=True)
  # grain's threads prepare host batches ahead; the next batches are copied to
  # the devices while the current step runs.
  batches = data.prefetch_to_device(
      train_data.iterator(first_step, total_steps, threads=config.data_threads), put)
  for t, batch in zip(range(first_step, total_steps), batches):
    kind = controller.next_kind()
    state, metrics = compiled[kind](state, batch)
    in_flight.append((t, kind, metrics))
    while len(in_flight) > lag:
      observe_oldest()
    bar.update(1)
    step = t + 1
    if step % config.log_every_steps == 0:
      summary = {k: float(np.mean(v)) for k, v in interval.items()}
      summary["motivated_fraction"] = controller.counts["motivated"] / max(step, 1)
      writer.write(step, summary)
      interval.clear()
      bar.set_postfix({k.replace("/", "_"): f"{v:.3f}" for k, v in summary.items()
                       if k.endswith("loss")})
    epoch_end = step % train_data.steps_per_epoch == 0
    epoch = step // train_data.steps_per_epoch
    if epoch_end and (epoch % config.eval_every_epochs == 0 or step == total_steps):
      eval_metrics = evaluate(eval_steps, state, eval_data, put, config.data_threads)
      writer.write(step, {**eval_metrics, "epoch": epoch})
      bar.write(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
    if (epoch_end and epoch % config.checkpoint_every_epochs == 0) or step == total_steps:
      save(step)
  bar.close()
  if first_step == total_steps or not eval_metrics:
    eval_metrics = evaluate(eval_steps, state, eval_data, put, config.data_threads)
  ckpt.close()
  writer.close()

  counts = controller.counts
  # Under policy "both" the compiled motivated step includes a base step.
  motivated_only_flops = flops["motivated"] - (
      flops["base"] if config.motivation.policy == "both" else 0.0)
  summary = {
      "dataset": dataset.name,
      "train_examples": len(dataset.train),
      "test_examples": len(dataset.test),
      "base/test_accuracy": eval_metrics["base/test_accuracy"],
      "motivated/test_accuracy": eval_metrics["motivated/test_accuracy"],
      "base_steps": counts["base"],
      "motivated_steps": counts["motivated"],
      "activations": controller.activations,
      "params": {"base": wmap.num_params("base"), "motivated": wmap.num_params("motivated")},
      "flops_per_step": flops,
      "training_flops": counts["base"] * flops["base"] + counts["motivated"] * flops["motivated"],
      # What training the motivated (large) model alone on every batch costs.
      "large_alone_flops": (counts["base"] + counts["motivated"]) * motivated_only_flops,
      "wall_time_s": time.time() - start_time,
      "resumed_from_step": first_step,
  }
  if chief:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary


def format_summary(summary: dict[str, Any]) -> str:
  """The summary as a small table for the terminal."""
  flops, params = summary["flops_per_step"], summary["params"]
  ratio = summary["training_flops"] / summary["large_alone_flops"]
  rows = [
      ("", "base", "motivated"),
      ("test accuracy", f"{summary['base/test_accuracy']:.4f}",
       f"{summary['motivated/test_accuracy']:.4f}"),
      ("parameters", f"{params['base']:,}", f"{params['motivated']:,}"),
      ("train steps", f"{summary['base_steps']:,}", f"{summary['motivated_steps']:,}"),
      ("FLOPs per step", f"{flops['base']:.3e}", f"{flops['motivated']:.3e}"),
  ]
  width = max(len(r[0]) for r in rows)
  lines = [f"{a:<{width}}  {b:>14}  {c:>14}" for a, b, c in rows]
  lines = [f"{summary['dataset']}: {summary['train_examples']:,} training and "
           f"{summary['test_examples']:,} test examples"] + lines
  lines += [
      f"activations of the motivated model: {summary['activations']:,}",
      f"training FLOPs: {summary['training_flops']:.3e} = {ratio:.1%} of training the "
      f"motivated model alone on every batch ({summary['large_alone_flops']:.3e})",
      f"wall time: {summary['wall_time_s']:.1f} s",
  ]
  if summary["resumed_from_step"]:
    lines[-1] += f" (this process, resumed at batch {summary['resumed_from_step']:,})"
  return "\n".join(lines)
