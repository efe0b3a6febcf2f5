"""Meshes and shardings: data parallelism over every device of every process.

The train state is replicated; each global batch is split along the mesh's
``data`` axis. In a multi-host run each process reads only the rows of each
batch its devices hold (``process_rows``, passed to ``data.TrainBatches(rows=...)``)
and ``global_batch`` assembles the global ``jax.Array`` from those shares
without moving data between hosts.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from motivation_jax.errors import ConfigError

DATA_AXIS = "data"


def data_mesh(devices=None) -> Mesh:
  """A 1-D mesh over ``devices`` (all devices of all processes by default).

  Auto axes: the steps are written for one device, and XLA inserts the
  gradient all-reduce."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Examples split along the ``data`` axis; every other dimension whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(name: str, batch_size: int, mesh: Mesh) -> None:
  """Refuses a global batch size that does not split evenly over the devices."""
  devices = mesh.shape[DATA_AXIS]
  if batch_size % devices:
    raise ConfigError(f"config.{name}={batch_size} does not divide among the {devices} devices "
                      f"of the data axis; use a multiple of {devices}")


def global_batch(local_batch: Any, sharding: NamedSharding) -> Any:
  """The global batch from this process's share (a pytree of numpy arrays).

  Every process passes its own share, in process order; the result is one
  ``jax.Array`` per leaf, ``process_count`` times the local batch long.
  """
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def process_rows(sharding: NamedSharding, global_batch_size: int) -> slice:
  """The rows of a global batch that this process's devices hold: what its
  input pipeline reads (``data.TrainBatches(rows=...)``)."""
  shape = (global_batch_size,)
  starts, stops = [], []
  for index in sharding.addressable_devices_indices_map(shape).values():
    start, stop, _ = index[0].indices(global_batch_size)
    starts.append(start)
    stops.append(stop)
  rows = slice(min(starts), max(stops))
  held = sum(stop - start for start, stop in set(zip(starts, stops)))
  if held != rows.stop - rows.start:
    raise ConfigError("this process's devices hold rows of the batch that are not contiguous; "
                      "order the mesh's devices by process")
  return rows
