"""Meshes and shardings: a ``data`` x ``fsdp`` mesh over every device of every process.

``config.mesh`` gives the two axes' sizes (``data=-1`` takes the devices the
``fsdp`` axis leaves). Each global batch is split over both axes, as
big_vision splits it over every device of its mesh: every device trains on its
own rows. The train state is replicated over ``data``; with ``fsdp > 1``
the parameters and every parameter-shaped optimizer-state leaf are sharded over
``fsdp`` by ``fsdp_spec``'s shape rule (big_vision's ``fsdp`` rule), and XLA
gathers each parameter where a step needs it whole (docs/sharding.md says
what the base step's gathers cost).

In a multi-host run each process reads only the rows of each batch its
devices hold (``process_rows``, passed to ``data.TrainBatches(rows=...)``) and
``global_batch`` assembles the global ``jax.Array`` from those shares without
moving data between hosts.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from motivation_jax.errors import ConfigError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
# A batch is split over both axes: every device of the mesh holds its own rows.
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
# Arrays up to this size stay replicated (big_vision's fsdp rule uses 4 MiB):
# gathering them costs a collective's latency and sharding saves little memory.
DEFAULT_FSDP_MIN_MIB = 4.0


def check_mesh_config(mesh_config: Mapping[str, Any]) -> None:
  """Refuses a ``config.mesh`` that no device count fits, in one line (without
  starting JAX's backend: ``mesh_shape`` checks it against the devices)."""
  for key in ("data", "fsdp", "fsdp_min_mib"):
    if key not in mesh_config:
      raise ConfigError(f"config.mesh.{key} is missing (configs/default.py lists every key)")
  data, fsdp, min_mib = mesh_config["data"], mesh_config["fsdp"], mesh_config["fsdp_min_mib"]
  for key, value in (("data", data), ("fsdp", fsdp)):
    if not isinstance(value, int) or isinstance(value, bool) or not (value >= 1 or (
        key == "data" and value == -1)):
      rule = "an integer >= 1, or -1 (the devices fsdp leaves)" if key == "data" else (
          "an integer >= 1")
      raise ConfigError(f"config.mesh.{key} must be {rule}, got {value!r}")
  if (not isinstance(min_mib, (int, float)) or isinstance(min_mib, bool)
      or not math.isfinite(min_mib) or min_mib < 0):
    raise ConfigError(f"config.mesh.fsdp_min_mib must be a finite number >= 0, got {min_mib!r}")


def mesh_shape(mesh_config: Mapping[str, Any], num_devices: int) -> tuple[int, int]:
  """``(data, fsdp)`` sizes of ``config.mesh`` on ``num_devices`` devices, or a
  one-line ``ConfigError``."""
  check_mesh_config(mesh_config)
  data, fsdp = mesh_config["data"], mesh_config["fsdp"]
  if data == -1:
    if num_devices % fsdp:
      raise ConfigError(f"config.mesh.fsdp={fsdp} does not divide the {num_devices} devices; "
                        f"use a divisor of {num_devices}")
    data = num_devices // fsdp
  if data * fsdp != num_devices:
    raise ConfigError(f"config.mesh.data={data} x config.mesh.fsdp={fsdp} is {data * fsdp} "
                      f"devices, but there are {num_devices}; set config.mesh.data=-1 to "
                      "take the devices fsdp leaves")
  return data, fsdp


def make_mesh(mesh_config: Mapping[str, Any] | None = None, devices=None) -> Mesh:
  """The ``(data, fsdp)`` mesh of ``config.mesh`` over ``devices`` (all devices
  of all processes by default); no ``mesh_config``: data parallel only.

  Devices go in process order, ``fsdp`` the faster-varying axis: an fsdp
  group is consecutive devices (one host's, when it fits on one), so the
  parameter gathers stay on the fast links within a host and each process's
  rows of a batch are contiguous. Auto axes: the steps are written for one
  device, and XLA inserts the gathers and reductions.
  """
  devices = jax.devices() if devices is None else list(devices)
  if mesh_config is None:
    mesh_config = {"data": -1, "fsdp": 1, "fsdp_min_mib": DEFAULT_FSDP_MIN_MIB}
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, BATCH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def data_mesh(devices=None) -> Mesh:
  """A data-parallel mesh over ``devices``: ``make_mesh`` with ``fsdp=1``."""
  return make_mesh(None, devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Examples split over every device (the ``data`` and ``fsdp`` axes); every
  other dimension whole."""
  return NamedSharding(mesh, P(_batch_axes(mesh)))


def check_batch_size(name: str, batch_size: int, mesh: Mesh) -> None:
  """Refuses a global batch size that does not split evenly over the devices."""
  devices = math.prod(mesh.shape[a] for a in _batch_axes(mesh))
  if batch_size % devices:
    raise ConfigError(f"config.{name}={batch_size} does not divide among the {devices} devices "
                      f"of the mesh; use a multiple of {devices}")


def fsdp_spec(shape: tuple[int, ...], itemsize: int, fsdp: int, *,
              min_bytes: float = DEFAULT_FSDP_MIN_MIB * 2**20) -> P:
  """big_vision's fsdp rule: the largest dimension that ``fsdp`` divides is
  split over the ``fsdp`` axis (the first of equal ones); arrays of at most
  ``min_bytes``, and those no dimension of which ``fsdp`` divides, stay
  replicated."""
  if fsdp == 1 or math.prod(shape) * itemsize <= min_bytes:
    return P()
  for i in sorted(range(len(shape)), key=lambda i: (-shape[i], i)):
    if shape[i] % fsdp == 0:
      return P(*(None,) * i, FSDP_AXIS)
  return P()


def fsdp_shardings(tree: Any, mesh: Mesh, *, min_bytes: float) -> Any:
  """A ``NamedSharding`` for every leaf of ``tree`` (arrays or
  ``jax.ShapeDtypeStruct``s) by ``fsdp_spec``."""
  fsdp = mesh.shape.get(FSDP_AXIS, 1)
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(
      tuple(x.shape), np.dtype(x.dtype).itemsize, fsdp, min_bytes=min_bytes)), tree)


def train_state_sharding(abstract_state: Any, mesh: Mesh, *, min_bytes: float) -> Any:
  """Shardings of a ``steps.TrainState`` (from ``steps.abstract_train_state``).

  The parameters and the optimizer state take ``fsdp_shardings``: a
  parameter-shaped optimizer leaf has its parameter's shape, so it gets its
  parameter's layout and the update is local to each shard; the step counts
  are scalars and stay replicated. The batch-norm statistics stay replicated:
  they are per-channel vectors (8 KiB for 2,048 channels), far below any
  useful ``min_bytes``, and every forward reads them.

  The train steps hold the split leaves in a storage order within this
  layout (``steps.make_order_converters``, docs/sharding.md).
  """
  repl = replicated(mesh)
  return abstract_state.replace(
      step=repl,
      params=fsdp_shardings(abstract_state.params, mesh, min_bytes=min_bytes),
      opt_state=fsdp_shardings(abstract_state.opt_state, mesh, min_bytes=min_bytes),
      batch_stats=jax.tree.map(lambda _: repl, abstract_state.batch_stats))


def global_batch(local_batch: Any, sharding: NamedSharding) -> Any:
  """The global batch from this process's share (a pytree of numpy arrays).

  Every process passes its own share, in process order; the result is one
  ``jax.Array`` per leaf, ``process_count`` times the local batch long. In one
  process that is one ``device_put`` of the tree, which is what
  ``make_array_from_process_local_data`` does there too, after checks that
  cost more than the copy (a digits batch on a 2-core CPU: 215-235 µs of host
  time, against 304-393 µs through it, per leaf or for the whole tree).
  """
  if jax.process_count() == 1:
    return jax.device_put(local_batch, sharding)
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
