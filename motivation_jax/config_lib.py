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


def lm_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The keys a language-model config sets beside configs/default.py's, at the LM
  quick start's values (configs/lm_shakespeare.py; motivation_jax/lm.py documents them)."""
  config.task = "causal_lm"          # classification | causal_lm (motivation_jax/tasks.py)
  config.tokenizer = "byte"          # or "bpe:N": trained on the training split, kept in DIR
  # Records per split of a TFDS text set (lm1b); None: all.
  config.max_examples = ml_collections.FieldReference(None, field_type=int)
  # None: the held-out split in full; N: its first N tokens (the :smoke variants).
  config.max_eval_tokens = ml_collections.FieldReference(None, field_type=int)
  config.augment = False
  config.bn_recalibration_batches = 0  # no batch norm in a transformer
  config.model.name = "transformer"
  config.model.seq_len = 64          # the context and the windows of text
  config.model.d_model = 128         # shared: d_model does not nest
  config.model.head_dim = 32         # shared: heads nest at a fixed head size
  config.model.positions = "rotary"
  config.model.norm = "layernorm"
  config.model.tie_embeddings = True
  config.model.dropout_rate = 0.0
  config.optimizer = "adamw"
  config.learning_rate = 1e-3        # linear warm-up, cosine to final_learning_rate
  config.final_learning_rate = 1e-4
  config.warmup_steps = 100
  config.adam_b2 = 0.99
  config.weight_decay = 0.1
  config.grad_clip_norm = 1.0
  # LM runs count steps, not epochs (2000 steps are a third of an epoch here).
  config.num_train_steps = 2000
  config.eval_every_steps = 1000     # the held-out text in full, in order
  config.checkpoint_every_steps = 500
  config.log_every_steps = 100
  config.eval_batch_size = 128
  config.motivation.condition = "loss_streak"
  return config


def make_lm_smoke(config: ml_collections.ConfigDict) -> None:
  """After ``make_smoke``: a tiny transformer pair for 8 steps, the first 4,096
  held-out tokens (an LM config's ``:smoke`` variant)."""
  config.model.seq_len = 16
  config.model.d_model = 32
  config.model.head_dim = 8
  config.model.base = {"num_heads": 1, "ffn_dim": 16, "num_layers": 1}
  config.model.motivated = {"num_heads": 2, "ffn_dim": 64, "num_layers": 2}
  if config.dataset not in ("lm1b",):  # a TFDS text set keeps its mock data
    config.mock_data_examples = 0
  config.batch_size = 8
  config.eval_batch_size = 64
  config.max_eval_tokens = 4096
  config.num_train_steps = 8
  config.eval_every_steps = config.checkpoint_every_steps = 4
  config.warmup_steps = 2


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
