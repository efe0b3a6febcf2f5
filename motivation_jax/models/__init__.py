"""Nested model families: one Flax module at the motivated size, a static ``subnet``.

The contract every family follows (and ``nesting`` relies on):

- ``model.init(rng, x, subnet="motivated")`` creates the one variables pytree;
- ``model.apply(variables, x, subnet="base" | "motivated", train=...)`` runs
  that sub-network; the base slices the leading part of each variable;
- ``model.standalone(subnet)`` returns the plain module of that sub-network's
  size, which accepts ``nesting.export(variables, subnet, ...)``.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax

from motivation_jax.models.cnn import NestedCNN
from motivation_jax.models.layers import SUBNETS, NestingError
from motivation_jax.models.mlp import NestedMLP

MODELS = {"mlp": NestedMLP, "cnn": NestedCNN}


def init_variables(model, rng: jax.Array, sample_input: jax.Array) -> dict:
  """``model.init`` at the motivated size, compiled once.

  Initialisers are many small threefry programs that XLA's CPU backend spends
  seconds optimising for a function that runs once, so on CPU the compile uses
  the lowest backend optimisation level (the values are the same).
  """
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  init = jax.jit(functools.partial(model.init, subnet="motivated", train=False),
                 compiler_options=options)
  return init(rng, sample_input)


def build_model(config: Mapping[str, Any], num_classes: int):
  """Builds a nested model from ``config.model`` (see configs/default.py)."""
  name = config["name"]
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
  base, motivated = dict(config["base"]), dict(config["motivated"])
  if name == "mlp":
    return NestedMLP(tuple(base["widths"]), tuple(motivated["widths"]), num_classes)
  return NestedCNN(tuple(base["widths"]), tuple(base["depths"]),
                   tuple(motivated["widths"]), tuple(motivated["depths"]), num_classes)


__all__ = ["MODELS", "NestedCNN", "NestedMLP", "NestingError", "SUBNETS", "build_model",
           "init_variables"]
