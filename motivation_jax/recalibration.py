"""Batch-norm statistics recomputed for each sub-network before it is evaluated or exported.

Why: a sub-network's running statistics are an exponential average over the
batches *it* trained on, taken while its parameters moved. The motivated model
trains on a few percent of the batches, so its averages trail its parameters
by many updates, and under ``batch_norm_stats="shared"`` each sub-network
evaluates with statistics the other one wrote. Slimmable networks, US-Nets and
once-for-all recompute each sub-network's statistics instead: a train-mode
forward over a few batches, no parameter update, a plain average of the
batches' means and variances. That is what ``recalibrate`` does
(docs/choices.md, "Batch-norm recalibration", has the measurement).

Which batches: the first ``config.bn_recalibration_batches`` training batches
of the run's seed, without augmentation (``calibration_batches``). They are
fixed, so a resumed run, and an export of its checkpoint, compute the same
statistics from the same parameters.

The train state is not touched: train steps never read the running statistics
(they normalise with the batch's), so training is the same with or without
recalibration. The recalibrated statistics are what evaluation uses; each
checkpoint keeps them beside the state, and ``motivation_jax.export`` deploys them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from motivation_jax import data, nesting
from motivation_jax.common import SUBNETS
from motivation_jax.steps import Normalisation, normalise_images

PyTree = Any


def calibration_batches(dataset: data.Dataset, batch_size: int, *, seed: int,
                        rows: slice | None = None) -> data.TrainBatches:
  """The run's training batches in their seed-fixed order, without augmentation
  (batches ``0..n-1`` of it are the calibration batches)."""
  return data.TrainBatches(dataset, batch_size, seed=seed, augment=False, rows=rows)


def _moments(variables: Mapping[str, PyTree], images: jax.Array, *, model, subnet: str
             ) -> PyTree:
  """This batch's per-channel mean and variance at every batch norm ``subnet``
  runs (train mode; only the ``batch_moments`` collection is mutable, so
  nothing in ``variables`` changes)."""
  _, mutated = model.apply(variables, images, subnet=subnet, train=True,
                           mutable=["batch_moments"])
  return mutated["batch_moments"]


def _host_zeros(shapes: PyTree, images: jax.Array) -> PyTree:
  """Zeros of ``shapes``, replicated on the devices of ``images``, made on the
  host: no program per shape (``jnp.zeros`` compiles one), and already laid
  out as the sums ``accumulate`` returns, so its first call compiles the
  program every later call runs (zeros on one device would compile another)."""
  sharding = getattr(images, "sharding", None)  # a host batch (NumPy) has none
  if isinstance(sharding, jax.sharding.NamedSharding):
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    # Replicated: every process's share is the whole array.
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        replicated, np.zeros(x.shape, x.dtype)), shapes)
  return jax.tree.map(lambda x: jax.device_put(np.zeros(x.shape, x.dtype)), shapes)


def make_recalibrate(model, wmap: nesting.WeightsMap, *,
                     normalisation: Normalisation | None = None
                     ) -> Callable[[Any, Iterable], dict[str, PyTree] | None]:
  """``recalibrate(state, batches, subnets=SUBNETS) -> {"base": stats, "motivated": stats}``
  (the sub-networks ``subnets`` names: an evaluation of one recalibrates one).

  ``state`` in logical order (``steps.ORDERS``; a state in storage order is
  refused). ``batches`` are device batches (the calibration batches); uint8 images are
  normalised with ``normalisation`` on the device, float images are taken as
  normalised (``steps.normalise_images``). Each returned tree
  has the layout of ``state.subnet_stats(subnet)`` (motivated size): the
  statistics the sub-network reads are the plain averages of its batch moments
  over the batches; entries it does not read (outside the base) are left as
  they were. Returns None for a model without batch norm. One compiled
  program per sub-network adds each batch's moments to the running sums.
  """
  regions = flax.traverse_util.flatten_dict(wmap["batch_stats"])
  moments = {subnet: functools.partial(_moments, model=model, subnet=subnet)
             for subnet in SUBNETS}

  def accumulate(sums, variables, images, *, subnet):
    images = normalise_images(images, normalisation)
    return jax.tree.map(jnp.add, sums, moments[subnet](variables, images))

  def finish(stats: PyTree, sums: PyTree, count: int) -> PyTree:
    # A sub-network's moments cover the batch norms it runs (the base skips the
    # motivated model's extra blocks) at its own width: they go into the
    # leading slice of the full-size statistics.
    flat = dict(flax.traverse_util.flatten_dict(stats))
    for path, total in flax.traverse_util.flatten_dict(sums).items():
      mean = total / count
      flat[path] = (mean if mean.shape == flat[path].shape
                    else regions[path].merge(flat[path], mean))
    return flax.traverse_util.unflatten_dict(flat)

  steps = {subnet: jax.jit(functools.partial(accumulate, subnet=subnet), donate_argnums=0)
           for subnet in SUBNETS}

  def normalised_moments(variables, images, *, subnet):
    return moments[subnet](variables, normalise_images(images, normalisation))

  # One function per sub-network for the whole run: jax.eval_shape traces a
  # function once per argument shapes (a new function each call traced the
  # model at every evaluation).
  moment_shapes = {subnet: functools.partial(normalised_moments, subnet=subnet)
                   for subnet in SUBNETS}
  finish = jax.jit(finish, static_argnums=2)

  def recalibrate(state, batches: Iterable, subnets: Iterable[str] = SUBNETS
                  ) -> dict[str, PyTree] | None:
    wanted = set(subnets)
    subnets = tuple(s for s in SUBNETS if s in wanted)  # in order, each once
    if getattr(state, "order", "logical") != "logical":
      raise ValueError(f"recalibration reads a state in logical order, got one in "
                       f"{state.order} order; convert it with steps.make_order_converters")
    if not jax.tree.leaves(state.batch_stats):
      return None
    # In a multi-process run each accumulate program holds a collective (a
    # batch's moments are averaged over every device), and the sub-networks'
    # chains of them do not depend on each other, so the CPU runtime may start
    # them in another order on each process, and the collectives would then wait
    # for each other forever: there each program is waited for before the next
    # starts. (Suspected, not proven, cause of a hang of tests/test_multiprocess.py's
    # two processes in one CI run; one device or one process is not affected.)
    ordered = jax.process_count() > 1
    sums, count = None, 0
    for batch in batches:
      if sums is None:  # zeros of the moments' shapes, known without running anything
        sums = {subnet: _host_zeros(jax.eval_shape(moment_shapes[subnet],
                                                   state.variables(subnet), batch["image"]),
                                    batch["image"])
                for subnet in subnets}
      for subnet in subnets:
        sums[subnet] = steps[subnet](sums[subnet], state.variables(subnet), batch["image"])
        if ordered:
          jax.block_until_ready(sums[subnet])
      count += 1
    if count == 0:
      raise ValueError("recalibration needs at least one batch")
    return {subnet: finish(state.subnet_stats(subnet), sums[subnet], count)
            for subnet in subnets}

  return recalibrate
