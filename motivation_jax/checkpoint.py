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
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from motivation_jax.errors import CheckpointError

ITEMS = ("state", "controller", "data_position", "config", "dataset", "eval_stats")


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


class Checkpointer:
  """A thin wrapper over ``ocp.CheckpointManager`` for this package's items."""

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, *, state, controller_state: dict, data_position: dict,
           config: dict, dataset: dict, eval_stats=None) -> None:
    items = dict(state=ocp.args.StandardSave(state),
                 controller=ocp.args.JsonSave(controller_state),
                 data_position=ocp.args.JsonSave(data_position),
                 config=ocp.args.JsonSave(config),
                 dataset=ocp.args.JsonSave(dataset))
    if eval_stats is not None:
      items["eval_stats"] = ocp.args.StandardSave(eval_stats)
    self.manager.save(step, args=ocp.args.Composite(**items))

  def restore(self, abstract_state, step: int | None = None
              ) -> tuple[Any, dict, dict, int] | None:
    """A checkpoint (the latest by default) as ``(state, controller_state,
    data_position, step)``, or None when there is none."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      return None
    abstract_state = _placed(abstract_state)
    restored = self._restore(step, state=ocp.args.StandardRestore(abstract_state),
                             controller=ocp.args.JsonRestore(),
                             data_position=ocp.args.JsonRestore())
    state = restored["state"]
    restored_shapes = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    expected = jax.tree.map(lambda x: (x.shape, x.dtype), abstract_state)
    if restored_shapes != expected:
      raise CheckpointError(f"the checkpoint at {self.directory}/{step} holds a different "
                            "model or optimizer than this config builds")
    return state, restored["controller"], restored["data_position"], step

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
    if not os.path.isdir(os.path.join(self.directory, str(step), "eval_stats")):
      return None
    return self._restore(step, eval_stats=ocp.args.StandardRestore(
        _placed(abstract_stats)))["eval_stats"]

  def _restore(self, step: int, **items):
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax raises many types; the user needs one line.
      first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise CheckpointError(
          f"cannot restore the checkpoint at {self.directory}/{step} ({type(e).__name__}: "
          f"{first_line[:300]}); move it away to start afresh or pick another --workdir"
      ) from e

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
