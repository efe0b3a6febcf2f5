"""The plain loop a user would write instead of ``train_and_evaluate`` for the base alone.

The harness's whole-run overhead (``measure_overhead`` in
benchmarks/whole_run_overhead.py) times ``train.train_and_evaluate`` with
condition ``never`` against ``plain_run``: the standalone base model
(``model.standalone("base")``, a plain Flax module of the base's size), the
config's optimizer and schedule, one jitted train step, the same batches from
the same pipeline (``data.TrainBatches``, the device copies prefetched), the
training loss read every ``log_every_steps``, and the test set evaluated every
``eval_every_epochs`` and at the end, with the running batch-norm averages. No
checkpoint, no log files, no recalibration, no controller, no evaluation of a
motivated model: what the package adds is what the ratio measures.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from motivation_jax import data, models, steps


def plain_run(config) -> dict[str, Any]:
  """Trains and evaluates the standalone base as a plain loop; returns its wall
  time (data set loading included, as in ``train_and_evaluate``'s summary)
  and its last test accuracy."""
  start = time.time()
  dataset = data.get_dataset(config.dataset, config.data_dir,
                             mock_examples=config.mock_data_examples,
                             image_size=config.image_size)
  module = models.build_model(config.model, dataset.num_classes,
                              dtype=config.dtype).standalone("base")
  train_data = data.TrainBatches(dataset, config.batch_size, seed=config.seed,
                                 augment=config.augment)
  eval_data = data.EvalBatches(dataset, config.eval_batch_size)
  total = config.num_epochs * train_data.steps_per_epoch
  optimizer = steps.make_optimizer(config, total, train_data.steps_per_epoch)
  normalisation = (dataset.mean, dataset.std)
  sample = np.zeros((1, *dataset.image_shape), np.float32)

  @jax.jit
  def init(seed):
    variables = module.init(jax.random.key(seed), sample, train=False)
    variables.setdefault("batch_stats", {})
    return variables, optimizer.init(variables["params"])

  def train_step(variables, opt_state, batch):
    images = steps.normalise_images(batch["image"], normalisation)

    def objective(params):
      logits, mutated = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                     images, train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
      return loss, mutated.get("batch_stats", {})
    (loss, stats), grads = jax.value_and_grad(objective, has_aux=True)(variables["params"])
    updates, opt_state = optimizer.update(grads, opt_state, variables["params"])
    return ({"params": optax.apply_updates(variables["params"], updates), "batch_stats": stats},
            opt_state, loss)

  def eval_step(variables, batch):
    logits = module.apply(variables, steps.normalise_images(batch["image"], normalisation),
                          train=False)
    mask = batch["mask"].astype(jnp.float32)
    return jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask), jnp.sum(mask)

  train_step = jax.jit(train_step, donate_argnums=(0, 1))
  eval_step = jax.jit(eval_step)

  def evaluate(variables) -> float:
    correct = count = 0.0
    for batch in data.prefetch_to_device(eval_data.iterator(threads=config.data_threads),
                                         jax.device_put):
      c, n = eval_step(variables, batch)
      correct, count = correct + float(c), count + float(n)
    return correct / count

  variables, opt_state = init(config.seed)
  per_epoch, accuracy, loss = train_data.steps_per_epoch, None, None
  batches = data.prefetch_to_device(
      train_data.iterator(0, total, threads=config.data_threads), jax.device_put)
  for t, batch in enumerate(batches):
    variables, opt_state, loss = train_step(variables, opt_state, batch)
    step = t + 1
    if step % config.log_every_steps == 0:
      float(loss)
    if step % per_epoch == 0 and (step // per_epoch % config.eval_every_epochs == 0
                                  or step == total):
      accuracy = evaluate(variables)
  return {"wall_time_s": time.time() - start, "test_accuracy": accuracy,
          "final_loss": float(loss)}
