"""Resuming a run: its state, controller state and data position from the
workdir's newest intact checkpoint, and the config changes a resume accepts.

Apart from ``run_setup``, which calls ``resume`` once the state's layout is
known, so that what a checkpoint may hold is read in one place; the other half,
writing a checkpoint, is ``saving.save``.
"""

from __future__ import annotations

import json
import sys

import jax
import ml_collections

from motivation_jax import checkpoint, config_lib, data, lm, steps
from motivation_jax.controller import Controller
from motivation_jax.errors import ConfigError, TrainingError

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
    "compilation_cache_dir", "model.state_layout", *lm.SAFE_TO_CHANGE_ON_RESUME)
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


def resume(ckpt: checkpoint.Checkpointer, abstract_state: steps.TrainState,
           controller: Controller, train_data: data.TrainBatches, *,
           config: ml_collections.ConfigDict | None = None
           ) -> tuple[steps.TrainState | None, int, dict]:
  """``(state, first batch, log interval)`` from the newest intact checkpoint
  (``Checkpointer.restore`` moves damaged ones aside), or ``(None, 0, {})``
  without one. ``abstract_state``: the state's shapes, dtypes and shardings
  (``jax.ShapeDtypeStruct`` leaves), as the run lays the state out.

  The order matters: the state is restored into ``abstract_state``, then the
  controller state (which refuses another motivation config), then the data
  position (which refuses other batches).
  """
  restored = ckpt.restore(abstract_state)
  if restored is None:
    return None, 0, {}
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
