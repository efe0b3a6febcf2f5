"""Helpers for config files (``configs/`` is a folder of files, not a package)."""

from __future__ import annotations

import importlib.util
import inspect
import os

import ml_collections

from motivation_jax.errors import ConfigError


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """``get_config(arg)`` of the config file at ``path`` (``get_config()`` if no arg)."""
  spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if arg is None:
    return module.get_config()
  if not inspect.signature(module.get_config).parameters:
    raise ConfigError(f"{path} has no variants (its get_config() takes no argument); "
                      f"drop ':{arg}'")
  return module.get_config(arg)


def default_config(config_file: str) -> ml_collections.ConfigDict:
  """``configs/default.py``'s config, found beside ``config_file`` (pass ``__file__``):
  the family configs start from it and override what differs."""
  return load_config_file(os.path.join(os.path.dirname(os.path.abspath(config_file)),
                                       "default.py"))


def make_smoke(config: ml_collections.ConfigDict, *, examples: int = 64) -> None:
  """Turns ``config`` into its ``:smoke`` variant: TFDS mock data, one short epoch."""
  config.mock_data_examples = examples
  config.batch_size = 16
  config.eval_batch_size = 24  # does not divide the test set: padded evaluation
  config.num_epochs = 1
  config.warmup_epochs = 0.0
  config.log_every_steps = 2
  config.eval_every_epochs = config.checkpoint_every_epochs = 1
  config.progress_bar = False
  # Both compiled steps run in a few batches, whatever the losses do.
  config.motivation.condition = "every_n"
  config.motivation.every_n.n = 2


def variant(config: ml_collections.ConfigDict, arg: str | None, *,
            smoke=None) -> ml_collections.ConfigDict:
  """``config`` turned into the variant ``arg`` names: ``None`` leaves it as it is;
  ``"smoke"`` applies ``make_smoke``, then ``smoke(config)`` (a config's own
  shrinking, e.g. narrower models). Any other name is refused."""
  if arg == "smoke":
    make_smoke(config)
    if smoke is not None:
      smoke(config)
  elif arg is not None:
    raise ValueError(f"unknown config variant {arg!r}; known: smoke")
  return config


def flat(tree: dict, prefix: str = "") -> dict:
  """A nested dict (a config's ``to_json``) as ``{"dotted.key": value}``: what
  resume and the experiments suite compare, key by key, to name differences."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out
