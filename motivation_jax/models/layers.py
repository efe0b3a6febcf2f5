"""Layers that live at the motivated size and slice themselves for the base.

Every layer here declares its variables at the size of the motivated network
(the size seen at ``init``) and, when called with ``subnet="base"``, reads the
leading slice of each variable: the first ``d`` input and output channels. The
base forward therefore runs on small arrays and costs what the small network
costs; nothing is masked with zeros.

The same layers accept variables that are already base-sized (the base view of
``nesting.base_view``): slicing ``w[:d]`` of an array of length ``d`` is a no-op.
That is what the train steps use, so gradients and optimizer updates of a base
step are computed on base-sized arrays only.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from motivation_jax.errors import NestingError


def nested_variable(module: nn.Module, collection: str, name: str,
                    init_fn: Callable[..., jax.Array], shape: tuple[int, ...],
                    subnet: str) -> jax.Array:
  """Returns the leading ``shape`` slice of a variable declared at the motivated size.

  In the motivated sub-network ``shape`` is the variable's full shape and the
  variable is created (at init) or read as usual. In the base sub-network the
  variable must already exist (the base is a view, never initialised alone)
  and may be stored at the motivated size or already sliced to the base size.
  """
  if subnet == "motivated" or not module.has_variable(collection, name):
    if subnet == "base":
      raise NestingError(
          f"{module.path and '/'.join(module.path)}/{name}: initialise the model with "
          "subnet='motivated'; the base is a view into the motivated variables")
    # Parameters and statistics are float32 whatever the compute dtype (the
    # mixed-precision recipe): each layer casts them where it computes.
    if collection == "params":
      return module.param(name, init_fn, shape, jnp.float32)
    return module.variable(collection, name, init_fn, shape, jnp.float32).value
  value = module.get_variable(collection, name)
  if value.ndim != len(shape) or any(d > s for d, s in zip(shape, value.shape)):
    raise NestingError(
        f"{'/'.join(module.path)}/{name}: the base needs shape {shape} but the "
        f"motivated variable has shape {value.shape}; the base is not nested in "
        "the motivated model")
  return value[tuple(slice(0, d) for d in shape)]


class NestedDense(nn.Module):
  """Dense layer; ``features`` is this sub-network's output width."""
  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array, subnet: str) -> jax.Array:
    shape = (x.shape[-1], self.features)
    kernel = nested_variable(self, "params", "kernel", self.kernel_init, shape, subnet)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = nested_variable(self, "params", "bias", nn.initializers.zeros,
                             (self.features,), subnet)
      y = y + bias.astype(self.dtype)
    return y


class NestedConv(nn.Module):
  """2-D convolution, NHWC, without bias; ``features`` is this sub-network's width."""
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  dtype: Any = jnp.float32
  kernel_init: Callable[..., jax.Array] = nn.initializers.variance_scaling(
      2.0, "fan_out", "normal")

  @nn.compact
  def __call__(self, x: jax.Array, subnet: str) -> jax.Array:
    shape = (*self.kernel_size, x.shape[-1], self.features)
    kernel = nested_variable(self, "params", "kernel", self.kernel_init, shape, subnet)
    return lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype),
        window_strides=self.strides, padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class NestedBatchNorm(nn.Module):
  """Batch norm over all but the last axis; the base uses the first ``C_base`` channels.

  In train mode it normalises with the batch's statistics and, when
  ``batch_stats`` is mutable, updates the leading slice of the running
  statistics it is given; in eval mode it normalises with them. Which running
  statistics a sub-network is given is the train state's choice
  (``config.model.batch_norm_stats``, docs/choices.md): its own copy
  (``per_subnet``, the default) or one tree that both read through the view
  (``shared``, the paper's copied buffers).

  With the ``batch_moments`` collection mutable, a train-mode call also
  returns this batch's mean and variance there (``motivation_jax.recalibration``
  averages them into statistics each sub-network can trust).
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  scale_init: Callable[..., jax.Array] = nn.initializers.ones

  @nn.compact
  def __call__(self, x: jax.Array, subnet: str, *, train: bool) -> jax.Array:
    shape = (x.shape[-1],)
    scale = nested_variable(self, "params", "scale", self.scale_init, shape, subnet)
    bias = nested_variable(self, "params", "bias", nn.initializers.zeros, shape, subnet)
    mean = nested_variable(self, "batch_stats", "mean", jnp.zeros, shape, subnet)
    var = nested_variable(self, "batch_stats", "var", jnp.ones, shape, subnet)
    # Statistics and the normalisation in float32 (as flax.linen.BatchNorm does):
    # a bfloat16 x - mean loses the few bits that tell examples apart.
    x32 = x.astype(jnp.float32)
    if train and not self.is_initializing():
      axes = tuple(range(x.ndim - 1))
      batch_mean = jnp.mean(x32, axes)
      batch_var = jnp.maximum(jnp.mean(jnp.square(x32), axes) - jnp.square(batch_mean), 0.)
      if self.is_mutable_collection("batch_moments"):  # recalibration reads these
        self.put_variable("batch_moments", "mean", batch_mean)
        self.put_variable("batch_moments", "var", batch_var)
      if self.is_mutable_collection("batch_stats"):
        m = self.momentum
        self._update_stat("mean", m * mean + (1. - m) * batch_mean)
        self._update_stat("var", m * var + (1. - m) * batch_var)
      mean, var = batch_mean, batch_var
    y = (x32 - mean) * lax.rsqrt(var + self.epsilon)
    return (y * scale + bias).astype(self.dtype)

  def _update_stat(self, name: str, value: jax.Array) -> None:
    # The stored statistic may be motivated-sized (a base step through the full
    # tree): only its leading slice changes.
    stored = self.get_variable("batch_stats", name)
    self.put_variable("batch_stats", name,
                      lax.dynamic_update_slice(stored, value.astype(stored.dtype), (0,)))
