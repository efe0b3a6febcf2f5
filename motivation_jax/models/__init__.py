"""Nested model families: one Flax module at the motivated size, a static ``subnet``.

The contract every family follows (and ``nesting`` relies on):

- ``model.init(rng, x, subnet="motivated")`` creates the one variables pytree;
- ``model.apply(variables, x, subnet="base" | "motivated", train=...)`` runs
  that sub-network; the base slices the leading part of each variable;
- ``model.standalone(subnet)`` returns the plain module of that sub-network's
  size, which accepts ``nesting.export(variables, subnet, ...)``; its fields
  are JSON values, so ``standalone_spec`` can describe it for deployment;
- every ``kernel`` leaf is laid out ``[..., in, out]``, and
  ``model.extension_last_layers`` names the last layer of a residual branch,
  which ``extension_init="zero"`` zeroes in blocks only the motivated model has
  (``nesting.init_variables``);
- the family module has ``from_config(base, motivated, num_classes, **options)``
  taking the ``config.model.base`` / ``.motivated`` dicts (``FAMILIES`` below).

A user's own module needs none of that: ``nesting.paired(base, motivated, sample)``
adapts two configurations of an ordinary Linen or NNX module to the contract
(``models/paired.py``), and ``config.model.module = "package.module:Name"``
does it from a config file (``build_model``).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from motivation_jax.common import check_keys
from motivation_jax.errors import ConfigError
from motivation_jax.models import (cnn, efficientnet, mlp, nested_transformer,
                                   paired as paired_lib, resnet, vit)
from motivation_jax.models.efficientnet import NestedEfficientNet
from motivation_jax.models.mlp import NestedMLP
from motivation_jax.models.paired import Paired
from motivation_jax.models.resnet import NestedResNet
from motivation_jax.models.vit import NestedViT

# Family name (config.model.name) -> module with ``from_config``.
FAMILIES = {
    "mlp": mlp, "cnn": cnn, "resnet": resnet, "efficientnet": efficientnet, "vit": vit,
    "transformer": nested_transformer}
# The families of each task (config.task): a classifier's logits are per
# example, a language model's per token.
LANGUAGE_MODELS = ("transformer",)
# Keys of config.model that are not options of the family.
_COMMON_KEYS = ("name", "base", "motivated", "batch_norm_stats", "extension_init", "module",
                "state_layout")
# Keys of config.model a user's own module (config.model.module) may have
# besides the common ones (models/paired.py, ``from_config``).
MODULE_KEYS = ("exact", "train_arg")
# config.dtype: the compute dtype. Parameters, optimizer state, batch-norm
# statistics and the loss stay float32 in either (docs/models.md).
DTYPES = ("float32", "bfloat16")


def build_model(config: Mapping[str, Any], num_classes: int, *, dtype: str = "float32",
                sample=None):
  """Builds a nested model from ``config.model`` (see configs/default.py) that
  computes in ``dtype`` (``config.dtype``, one of ``DTYPES``).

  With ``config.model.module`` (``"package.module:Name"``) it is a user's own
  Linen or NNX class, ``base`` / ``motivated`` its keyword arguments, paired and
  checked on ``sample`` (an input batch, needed then): ``paired.from_config``."""
  if dtype not in DTYPES:
    raise ConfigError(f"dtype must be one of {DTYPES}, got {dtype!r}")
  if config.get("module"):
    extra = [k for k in config if k not in (*_COMMON_KEYS, *MODULE_KEYS)]
    if extra:
      raise ConfigError(f"{extra[0]!r} is not a key for a model given by module (known: "
                        f"{', '.join((*_COMMON_KEYS, *MODULE_KEYS))})")
    if sample is None:
      raise ValueError("build_model needs a sample input batch for config.model.module")
    return paired_lib.from_config(config, num_classes, sample, dtype=dtype)
  name = config["name"]
  if name not in FAMILIES:
    raise ConfigError(f"unknown model {name!r}; known: {', '.join(sorted(FAMILIES))}")
  from_config = FAMILIES[name].from_config
  accepted = [p for p in inspect.signature(from_config).parameters
              if p not in ("base", "motivated", "num_classes", "dtype")]
  options = {k: config[k] for k in config if k not in _COMMON_KEYS}
  check_keys(options, accepted, f"an option of the {name} family")
  if "dtype" in inspect.signature(from_config).parameters:
    # A family built by the paired adapter (transformer) takes the dtype itself.
    return from_config(dict(config["base"]), dict(config["motivated"]), num_classes,
                       dtype=dtype, **options)
  model = from_config(dict(config["base"]), dict(config["motivated"]), num_classes, **options)
  # Every family has a ``dtype`` field that its layers inherit; ``standalone``
  # keeps it, so an exported model records it in model.json.
  return model.clone(dtype=jnp.dtype(dtype))


def standalone_spec(model, subnet: str) -> dict[str, Any]:
  """JSON description of ``model.standalone(subnet)``: module path and fields
  (for a paired model: the user's class and keyword arguments, with ``api``
  "linen" or "nnx"; refused where they are not known)."""
  if isinstance(model, Paired):
    spec = model.specs.get(subnet)
    if spec is None:
      raise ConfigError(f"the {subnet} model cannot be exported: its configuration is not "
                        "known as JSON (build the pair with paired.from_class, or from "
                        "config.model.module)")
    return {"api": model.api, **spec, "nesting": model.describe()}
  alone = model.standalone(subnet)
  kwargs = {}
  for field in dataclasses.fields(alone):
    if field.name in ("parent", "name"):
      continue
    value = getattr(alone, field.name)
    if field.name == "dtype":
      value = jnp.dtype(value).name
    elif isinstance(value, tuple):
      value = list(value)
    kwargs[field.name] = value
  cls = type(alone)
  return {"module": cls.__module__, "class": cls.__qualname__, "kwargs": kwargs}


def build_standalone(spec: Mapping[str, Any]) -> nn.Module:
  """The module ``standalone_spec`` describes (imports only its own module); for
  an ``api`` "nnx" spec, an instance of the user's NNX class."""
  if "api" in spec:
    return paired_lib.build_standalone(spec)
  cls = getattr(importlib.import_module(spec["module"]), spec["class"])
  tuples = lambda v: tuple(map(tuples, v)) if isinstance(v, list) else v
  kwargs = {k: tuples(v) for k, v in spec["kwargs"].items()}
  if "dtype" in kwargs:
    kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  return cls(**kwargs)


def load_exported(directory: str) -> tuple[nn.Module, dict, dict]:
  """``(module, variables, spec)`` of a model written by ``motivation_jax.export``."""
  import orbax.checkpoint as ocp  # only here: building a model needs no checkpointing

  from etils import epath  # a local directory or a bucket URL, as Orbax reads them

  directory = epath.Path(directory if "://" in directory else os.path.abspath(directory))
  spec = json.loads((directory / "model.json").read_text())
  variables = ocp.StandardCheckpointer().restore(directory / "variables")
  module = build_standalone(spec)
  if spec.get("api") == "nnx":  # the user's NNX instance, holding the variables
    module = paired_lib.load_nnx(module, variables)
  return module, variables, spec


__all__ = ["DTYPES", "FAMILIES", "NestedEfficientNet", "NestedMLP", "NestedResNet", "NestedViT",
           "Paired", "build_model", "build_standalone", "load_exported", "standalone_spec"]
