"""Orbax checkpoints of a run: train state, controller state, data position,
config and data set.

The ``data_position`` item is the next batch index plus what fixes the batches
(seed, global batch size, data set; ``data.TrainBatches.position``): every
batch is a pure function of its index, so that is all a resumed run needs to
see exactly the batches of an uninterrupted one, on any number of processes.

The ``dataset`` item (name, classes, image shape, normalisation) is what
``python -m motivation_jax.export`` needs to describe a deployed model without
loading the data; the optional ``eval_stats`` item (``{"base": tree,
"motivated": tree}``, the batch-norm statistics each sub-network was
recalibrated to at that batch, ``motivation_jax.recalibration``) is what it
deploys with them.

Resume order (``train.train_and_evaluate``): build the abstract state (with the
shardings of this run's mesh, which need not be the mesh that saved it),
restore the latest checkpoint into it, load the controller state (which
refuses a different motivation config), check the data position against this
run's batches, then continue at that batch.

Integrity. Each checkpoint also holds a ``checksum`` item: two wrapping
32-bit sums per array leaf (of its bits, one plain and one weighted by the
element's position), computed on the devices, so a sharded state costs one
small reduction and no copy; and a SHA-256 of each JSON item. Integer sums do
not depend on the order of addition, so they are the same whatever mesh
saves or restores. ``restore`` without a step takes the newest checkpoint
that is whole: one that is unfinished (a save killed before Orbax renamed
its ``*.orbax-checkpoint-tmp*`` directory), unreadable, or whose arrays or
JSON items do not match their checksum is moved aside to ``<step>.unusable``
(never deleted) with one warning line, and the next older one is tried. A
checkpoint that reads well but holds another model is not damage: that is
refused (``CheckpointError``) and left where it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from motivation_jax import files, steps
from motivation_jax.errors import CheckpointError

ITEMS = ("state", "controller", "data_position", "config", "dataset", "eval_stats",
         "log_interval", "checksum")
# A directory Orbax is still writing (or was, when the process died).
_UNFINISHED = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")
SET_ASIDE_SUFFIX = ".unusable"


class _Damaged(Exception):
  """A checkpoint that cannot be used as it is (internal: ``restore`` skips it)."""


def _leaf_sums(x: jax.Array) -> jax.Array:
  """``[sum of the bits, sum of the bits weighted by position]`` of one array,
  as wrapping uint32 sums: exact, so independent of the order of addition."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)  # 8 bytes: (..., 2)
  # Each element's flat index from iotas, not a reshape (which could gather a
  # sharded array onto one device).
  index = jnp.zeros(bits.shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(bits.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, dim) * jnp.uint32(stride)
    stride = (stride * bits.shape[dim]) % 2**32
  weight = index * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15) | jnp.uint32(1)
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weight, dtype=jnp.uint32)])


_tree_sums = jax.jit(lambda tree: jax.tree.map(_leaf_sums, tree))
# A save's checksums and its check that the state is finite, in one program (two
# programs compiled for every state structure: 0.8 s more of an ImageNet-stem
# ResNet-18/34 smoke run's 18 s of compiles on a 2-core CPU).
_tree_sums_and_finite = jax.jit(
    lambda tree, check: (jax.tree.map(_leaf_sums, tree), steps.all_finite(check)))


def _path_name(path) -> str:
  """``opt_state/0/mu/...``: the same for a ``TrainState`` and for the nested
  dicts Orbax restores it as without a target."""
  return "/".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))))
                  for k in path)


# Trees of at most this many bytes, every array whole on this process, are
# summed on the host instead: the same sums (``_host_leaf_sums``), without the
# program, whose first trace and read from the compilation cache cost a run
# 0.4 s on a 2-core CPU (more than the sums of a small model take in NumPy).
HOST_CHECKSUM_BYTES = 64 * 2**20


def _host_leaf_sums(x: np.ndarray) -> np.ndarray:
  """``_leaf_sums`` in NumPy, bit for bit: the same wrapping uint32 sums (each
  element's product and the totals are taken mod 2**32, in uint64 here)."""
  if x.dtype == np.bool_:
    bits = x.astype(np.uint64)
  else:
    bits = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).astype(np.uint64)
  bits = bits.reshape(-1)  # row-major: the flat index _leaf_sums builds from iotas
  index = np.arange(bits.size, dtype=np.uint64) % 2**32
  weight = ((index * 0x9E3779B1 + 0x7F4A7C15) % 2**32) | 1
  return np.array([int(bits.sum()) % 2**32, int((bits * weight % 2**32).sum()) % 2**32],
                  np.uint32)


def _on_host(*trees) -> list | None:
  """The leaves of ``trees`` as NumPy arrays where ``_host_leaf_sums`` can sum
  them (small, whole on this process, 1-, 2- or 4-byte elements, no PRNG
  keys), else None (the program on the devices sums them)."""
  leaves = jax.tree.leaves(trees)
  if sum(x.nbytes for x in leaves) > HOST_CHECKSUM_BYTES or any(
      not getattr(x, "is_fully_addressable", True)
      or jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
      or (x.dtype != np.bool_ and x.dtype.itemsize not in (1, 2, 4)) for x in leaves):
    return None
  return [np.asarray(x) for x in jax.device_get(leaves)]


def _host_tree_sums(tree, leaves: list):
  return jax.tree.unflatten(jax.tree.structure(tree), [_host_leaf_sums(x) for x in leaves])


def _finite(x: np.ndarray) -> bool:
  """``steps.all_finite`` of one array, in NumPy (bool and integers always are)."""
  if x.dtype.kind in "biu":
    return True
  return bool(np.isfinite(x.astype(np.float32) if x.dtype.itemsize < 4 else x).all())


def array_checksums(tree) -> dict[str, list[int]]:
  """``{leaf path: [plain sum, weighted sum]}`` of every array in ``tree``."""
  leaves = _on_host(tree)
  sums = (_host_tree_sums(tree, leaves) if leaves is not None else
          jax.device_get(_tree_sums(tree)))
  return {_path_name(path): [int(v) for v in np.asarray(leaf)]
          for path, leaf in jax.tree_util.tree_leaves_with_path(sums)}


def _named_sums(sums: dict) -> dict[str, dict[str, list[int]]]:
  return {name: {_path_name(path): [int(v) for v in np.asarray(leaf)]
                 for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
          for name, tree in sums.items()}


def array_checksums_of(trees: dict) -> dict[str, dict[str, list[int]]]:
  """``{name: array_checksums(tree)}`` for ``trees = {name: tree}``, in one
  program (one call per tree would compile one per tree), or on the host
  (``HOST_CHECKSUM_BYTES``)."""
  leaves = _on_host(trees)
  if leaves is not None:
    return _named_sums(_host_tree_sums(trees, leaves))
  return _named_sums(jax.device_get(_tree_sums(trees)))


def array_checksums_and_finite(trees: dict, finite_of) -> tuple[dict, bool]:
  """``array_checksums_of(trees)``, and whether every element of the pytree
  ``finite_of`` is finite, from the same program (or both on the host)."""
  leaves = _on_host(trees, finite_of)
  if leaves is not None:
    count = len(jax.tree.leaves(trees))
    return (_named_sums(_host_tree_sums(trees, leaves[:count])),
            all(_finite(x) for x in leaves[count:]))
  sums, finite = jax.device_get(_tree_sums_and_finite(trees, finite_of))
  return _named_sums(sums), bool(finite)


def saved_arrays(state, eval_stats=None) -> dict:
  """The array items of a checkpoint, by name, as their checksums name them."""
  return {"state": state, **({} if eval_stats is None else {"eval_stats": eval_stats})}


def json_checksum(value) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _first_difference(saved: dict, now: dict) -> str | None:
  for path in sorted(set(saved) | set(now)):
    if saved.get(path) != now.get(path):
      return path
  return None


def _placed(abstract: Any) -> Any:
  """``abstract`` with a sharding on every leaf: a leaf that has none is
  restored onto this process's first device.

  Orbax restores each array into the sharding its target leaf names, whatever
  the layout it was saved in (e.g. saved split over 8 devices with fsdp=8,
  restored into fsdp=2 on 4 devices). A leaf without one would take the saved
  layout, which may name devices this process does not have.
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda x: x if getattr(x, "sharding", None) is not None else
                      jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)


class _OrbaxTaskRecords(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" records of tasks
  whose coroutine is Orbax's (see ``_drop_closed_loop_callbacks``)."""

  def filter(self, record: logging.LogRecord) -> bool:
    lines = str(record.msg).split("\n", 2)
    orbax_task = (lines[0] == "Task exception was never retrieved" and len(lines) > 1
                  and lines[1].startswith("future: <Task")
                  and f"{os.sep}orbax{os.sep}" in lines[1])
    return not orbax_task


def _drop_closed_loop_callbacks() -> None:
  """Keeps the reads of a damaged checkpoint from printing tracebacks.

  When one array of a checkpoint cannot be read, Orbax gives up and closes its
  event loop while TensorStore is still reading the others; each of those
  reads then finds the loop closed, and Python prints its ``RuntimeError:
  Event loop is closed`` as an unraisable exception, after the one line that
  says what is wrong; and each read coroutine it abandoned raises its own
  error when it is collected (``Exception ignored in: <coroutine object
  _read_array_index_and_device_put ...>``: 4,764 lines after one resume from
  a checkpoint with truncated array files). When more than one read fails,
  each failed read task that nobody awaits any more is logged by asyncio when
  it is collected (``Task exception was never retrieved``, with its traceback
  and the spec's repr: 228 lines after the warning, in one resume out of a
  dozen). Those, and only unraisable exceptions raised in Orbax's code and
  asyncio's records of Orbax's own tasks, are dropped: the error they repeat
  has been reported already.
  """
  asyncio_logger = logging.getLogger("asyncio")
  if not any(isinstance(f, _OrbaxTaskRecords) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_OrbaxTaskRecords())
  previous = sys.unraisablehook
  if getattr(previous, "_drops_closed_loop_callbacks", False):
    return

  def from_orbax(tb) -> bool:
    while tb is not None:
      if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
        return True
      tb = tb.tb_next
    return False

  def hook(unraisable):
    value = unraisable.exc_value
    closed_loop = isinstance(value, RuntimeError) and str(value) == "Event loop is closed"
    if not (closed_loop or from_orbax(unraisable.exc_traceback)):
      previous(unraisable)

  hook._drops_closed_loop_callbacks = True
  sys.unraisablehook = hook


def _first_line(e: BaseException) -> str:
  first = (str(e).strip().splitlines() or [""])[0]
  first = first.split(" See full TensorStore details")[0]  # a repr of the whole spec follows
  return f"{type(e).__name__}: {first[:300]}"


def _shape_and_dtype(leaf) -> tuple[tuple[int, ...], str]:
  return tuple(leaf.shape), str(np.dtype(leaf.dtype))


class Checkpointer:
  """A thin wrapper over ``ocp.CheckpointManager`` for this package's items."""

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self.directory = files.resolve(directory)  # a local path, or a bucket URL
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, *, state, controller_state: dict, data_position: dict,
           config: dict, dataset: dict, eval_stats=None, log_interval: dict | None = None,
           array_checksums: dict | None = None) -> None:
    """Starts writing checkpoint ``step`` (Orbax finishes it in the background;
    ``committed_step`` waits for it). ``log_interval`` is the training metrics
    since the last log line, so a resumed run logs the same means.
    ``array_checksums``: ``array_checksums_of(saved_arrays(state, eval_stats))``
    where the caller computed it already."""
    if array_checksums is None:
      array_checksums = array_checksums_of(saved_arrays(state, eval_stats))
    checksum = {**array_checksums,
                "controller": json_checksum(controller_state),
                "data_position": json_checksum(data_position)}
    items = dict(state=ocp.args.StandardSave(state),
                 controller=ocp.args.JsonSave(controller_state),
                 data_position=ocp.args.JsonSave(data_position),
                 config=ocp.args.JsonSave(config),
                 dataset=ocp.args.JsonSave(dataset),
                 log_interval=ocp.args.JsonSave(log_interval or {}))
    if eval_stats is not None:
      items["eval_stats"] = ocp.args.StandardSave(eval_stats)
    items["checksum"] = ocp.args.JsonSave(checksum)
    with self._writing():  # Orbax first waits for the save before, and may raise its error
      self.manager.save(step, args=ocp.args.Composite(**items))

  def committed_step(self) -> int | None:
    """The newest checkpoint that is completely written, after waiting for a
    save in flight (``latest_step`` alone may name one Orbax is still writing)."""
    with self._writing():
      self.manager.wait_until_finished()
    return self.manager.latest_step()

  @contextlib.contextmanager
  def _writing(self):
    """A save that failed in Orbax's background threads (a full disk, a folder
    that went away) as one ``CheckpointError`` line: the previous checkpoint
    is untouched, and the unfinished one is set aside on the next start."""
    try:
      yield
    except Exception as e:  # Orbax raises what TensorStore or the OS raised
      cause = e
      while cause.__cause__ is not None:
        cause = cause.__cause__
      # TensorStore's message is paths first; the OS's reason is at its end.
      code = re.search(r"os_error_code='(\d+)'", str(cause))
      why = os.strerror(int(code[1])) if code else _first_line(cause)
      raise CheckpointError(
          f"cannot write a checkpoint in {self.directory} ({why}); the "
          "checkpoints before it are intact: free the space or fix the folder, then run "
          "the same command again to resume") from e

  def restore(self, abstract_state, step: int | None = None
              ) -> tuple[Any, dict, dict, int, dict] | None:
    """A checkpoint as ``(state, controller_state, data_position, step,
    log_interval)``, or None when there is none.

    Without ``step``: the newest checkpoint that is whole; each unfinished or
    damaged one on the way is moved aside with one warning line (module
    docstring). With ``step``: that one, or a ``CheckpointError``.
    """
    abstract_state = _placed(abstract_state)
    _drop_closed_loop_callbacks()
    if step is not None:
      try:
        return self._restore_checked(abstract_state, step)
      except _Damaged as e:
        raise CheckpointError(f"the checkpoint at {self.directory}/{step} is damaged ({e})"
                              ) from e
    self._set_aside_unfinished()
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self._restore_checked(abstract_state, step)
      except _Damaged as e:
        self._set_aside(str(step), str(e))
    return None

  def _restore_checked(self, abstract_state, step: int) -> tuple[Any, dict, dict, int, dict]:
    """Checkpoint ``step``, its arrays and JSON items verified against its checksum.

    Raises ``_Damaged`` for what is wrong with the files, ``CheckpointError``
    for a whole checkpoint of another model (shapes read from its metadata).
    """
    path = files.join(self.directory, str(step))
    try:
      metadata = ocp.StandardCheckpointHandler().metadata(files.path(path) / "state")
      saved = sorted(map(_shape_and_dtype, jax.tree.leaves(metadata)))
    except Exception as e:  # Orbax raises many types
      raise _Damaged(f"its metadata cannot be read: {_first_line(e)}") from e
    if saved != sorted(map(_shape_and_dtype, jax.tree.leaves(abstract_state))):
      raise CheckpointError(f"the checkpoint at {path} holds a different model or optimizer "
                            "than this config builds")
    items = dict(state=ocp.args.StandardRestore(abstract_state),
                 controller=ocp.args.JsonRestore(), data_position=ocp.args.JsonRestore())
    for name in ("log_interval", "checksum"):  # absent in checkpoints of older versions
      if files.is_dir(files.join(path, name)):
        items[name] = ocp.args.JsonRestore()
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise _Damaged(f"it cannot be read: {_first_line(e)}") from e
    checksum = restored.get("checksum") if "checksum" in items else None
    if checksum is not None:
      for name in ("controller", "data_position"):
        if json_checksum(restored[name]) != checksum.get(name):
          raise _Damaged(f"its {name} item does not match its checksum")
      differs = _first_difference(checksum["state"], array_checksums(restored["state"]))
      if differs is not None:
        raise _Damaged(f"its array state/{differs} does not match its checksum")
    log_interval = restored.get("log_interval") if "log_interval" in items else None
    return (restored["state"], restored["controller"], restored["data_position"], step,
            log_interval or {})

  def _set_aside_unfinished(self) -> None:
    """Moves aside the directories of saves that never finished (a process
    killed while Orbax was writing), which Orbax itself ignores."""
    if not files.is_dir(self.directory):
      return
    finished = {str(s) for s in self.manager.all_steps()}
    for name in files.list_dir(self.directory):
      if _UNFINISHED.match(name) or (name.isdigit() and name not in finished):
        self._set_aside(name, "its save did not finish")

  def _set_aside(self, name: str, why: str) -> None:
    """Renames checkpoint directory ``name`` to ``<step>.unusable`` (a name
    Orbax does not read as a step), says so in one line, and rescans."""
    step = re.match(r"\d+", name).group()
    target = files.join(self.directory, step + SET_ASIDE_SUFFIX)
    n = 1
    while files.exists(target):
      n += 1
      target = files.join(self.directory, f"{step}{SET_ASIDE_SUFFIX}{n}")
    if jax.process_index() == 0:
      # On a bucket a rename is a copy and a delete of every object (epath).
      files.path(files.join(self.directory, name)).rename(target)
      print(f"warning: skipping the checkpoint at {self.directory}/{name}: {why}; "
            f"moved it to {target}", file=sys.stderr, flush=True)
    if jax.process_count() > 1:  # the others rescan after process 0 renamed it
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"motivation_jax set aside {name}")
    self.manager.reload()

  def restore_description(self, step: int | None = None) -> tuple[dict, dict, int]:
    """``(config, dataset, step)`` of a checkpoint, without its arrays."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    if step not in self.manager.all_steps():
      raise CheckpointError(f"no checkpoint of batch {step} in {self.directory} (there are: "
                            f"{', '.join(map(str, self.manager.all_steps()))})")
    restored = self._restore(step, config=ocp.args.JsonRestore(),
                             dataset=ocp.args.JsonRestore())
    return restored["config"], restored["dataset"], step

  def restore_eval_stats(self, abstract_stats, step: int):
    """The ``eval_stats`` item of checkpoint ``step``, or None if it has none
    (a run without recalibration, or a model without batch norm)."""
    path = files.join(self.directory, str(step))
    if not files.is_dir(files.join(path, "eval_stats")):
      return None
    items = {"eval_stats": ocp.args.StandardRestore(_placed(abstract_stats))}
    if files.is_dir(files.join(path, "checksum")):  # absent in older checkpoints
      items["checksum"] = ocp.args.JsonRestore()
    _drop_closed_loop_callbacks()
    restored = self._restore(step, **items)
    saved = (restored.get("checksum") or {}).get("eval_stats")
    if saved is not None:
      differs = _first_difference(saved, array_checksums(restored["eval_stats"]))
      if differs is not None:
        raise CheckpointError(f"the checkpoint at {path} is damaged (its array "
                              f"eval_stats/{differs} does not match its checksum)")
    return restored["eval_stats"]

  def _restore(self, step: int, **items):
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax raises many types; the user needs one line.
      raise CheckpointError(
          f"cannot restore the checkpoint at {self.directory}/{step} ({_first_line(e)}); "
          "move it away to start afresh or pick another --workdir") from e

  def close(self) -> None:
    try:
      with self._writing():
        self.manager.wait_until_finished()
    finally:
      try:
        self.manager.close()
      except Exception:  # after a failed save: the error above is the one to report
        pass
