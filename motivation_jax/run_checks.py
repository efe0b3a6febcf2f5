"""What a run refuses before any work: a config value that cannot train, a
workdir it could not write in.

Each refusal is one line, and comes before the data set is read or a step
compiled (``run_setup.setup`` asks these first), so that a mistake costs
seconds, not a compile or an epoch.
"""

from __future__ import annotations

import math
import numbers

from motivation_jax import files, lease, lm, models, nesting, sharding, steps, tasks
from motivation_jax.errors import ConfigError

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
  state_layout = config.model.get("state_layout", "in_place")
  if state_layout not in steps.STATE_LAYOUTS:
    raise ConfigError(f"config.model.state_layout must be one of {steps.STATE_LAYOUTS}, "
                      f"got {state_layout!r}")
  if state_layout == "blocks" and config.get("mesh", {}).get("fsdp", 1) != 1:
    raise ConfigError("config.model.state_layout='blocks' does not split its blocks over "
                      "devices (FSDP) yet: use config.mesh.fsdp=1, or state_layout='in_place'")
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
    # Asked as "a file where a folder goes" (is_file), not "exists and is not a
    # folder": on a bucket a folder is only the objects under it, and another
    # process of the run checking the checkpoint folder writes one and deletes
    # it, so that exists() and then is_dir() could see it come and go (a
    # two-process run on a bucket refused itself under load that way).
    if files.is_file(path) if folder else files.is_dir(path):
      raise ConfigError(f"{path} is a {'file' if folder else 'folder'}, not a "
                        f"{'folder' if folder else 'file'}: a run writes one there; move it "
                        "away or pick another --workdir")
  files.writable_directory(files.join(workdir, "checkpoints"), "the checkpoint folder")
