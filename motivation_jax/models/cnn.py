"""A small nested residual CNN with batch norm.

Stages of residual blocks; the base uses, in every stage, the first
``base_depths[s]`` blocks, each sliced to ``base_widths[s]`` channels. The
motivated model may be wider per stage and deeper (extra blocks at the end of
each stage, which the base skips). The first block of a later stage halves the
resolution; blocks whose input and output shapes differ use a 1x1 projection
shortcut, so the extra blocks at the end of a stage are identity-shortcut
residual blocks and skipping them leaves a well-formed network.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from motivation_jax.models.layers import (NestedBatchNorm, NestedConv, NestedDense,
                                         NestingError, check_subnet)
from motivation_jax.models.mlp import check_widths


class ResidualBlock(nn.Module):
  features: int
  strides: tuple[int, int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, subnet: str, *, train: bool) -> jax.Array:
    conv = lambda f, k, s, name: NestedConv(f, k, s, dtype=self.dtype, name=name)
    norm = lambda name: NestedBatchNorm(dtype=self.dtype, name=name)
    y = conv(self.features, (3, 3), self.strides, "conv1")(x, subnet)
    y = nn.relu(norm("bn1")(y, subnet, train=train))
    y = conv(self.features, (3, 3), (1, 1), "conv2")(y, subnet)
    y = norm("bn2")(y, subnet, train=train)
    if x.shape[-1] != self.features or self.strides != (1, 1):
      x = conv(self.features, (1, 1), self.strides, "proj")(x, subnet)
      x = norm("proj_bn")(x, subnet, train=train)
    return nn.relu(x + y)


class NestedCNN(nn.Module):
  base_widths: Sequence[int]      # channels per stage in the base
  base_depths: Sequence[int]      # residual blocks per stage in the base
  motivated_widths: Sequence[int]
  motivated_depths: Sequence[int]
  num_classes: int
  dtype: Any = jnp.float32

  def __post_init__(self):
    check_widths("NestedCNN", self.base_widths, self.motivated_widths)
    if len(self.base_widths) != len(self.motivated_widths):
      raise NestingError("NestedCNN: base and motivated models need the same number of "
                         f"stages, got {len(self.base_widths)} and {len(self.motivated_widths)}")
    for name, widths, depths in (("base", self.base_widths, self.base_depths),
                                 ("motivated", self.motivated_widths, self.motivated_depths)):
      if len(depths) != len(widths) or any(d < 1 for d in depths):
        raise ValueError(f"NestedCNN: {name}_depths must give at least one block for each "
                         f"of the {len(widths)} stages, got {tuple(depths)}")
    for s, (b, m) in enumerate(zip(self.base_depths, self.motivated_depths)):
      if b > m:
        raise NestingError(f"NestedCNN: stage {s} has {b} blocks in the base but {m} in "
                           "the motivated model; the base is not nested")
    super().__post_init__()

  def stages(self, subnet: str) -> tuple[tuple[int, int], ...]:
    """(width, depth) of every stage of one sub-network."""
    check_subnet(subnet)
    if subnet == "base":
      return tuple(zip(self.base_widths, self.base_depths))
    return tuple(zip(self.motivated_widths, self.motivated_depths))

  def standalone(self, subnet: str) -> "NestedCNN":
    widths, depths = zip(*self.stages(subnet))
    # parent=None: a free-standing module, not a child of this one.
    return NestedCNN(widths, depths, widths, depths, self.num_classes, self.dtype,
                     parent=None)

  @nn.compact
  def __call__(self, x: jax.Array, *, subnet: str = "motivated",
               train: bool = False) -> jax.Array:
    stages = self.stages(subnet)
    x = NestedConv(stages[0][0], (3, 3), dtype=self.dtype, name="stem")(x, subnet)
    x = nn.relu(NestedBatchNorm(dtype=self.dtype, name="stem_bn")(x, subnet, train=train))
    for s, (width, depth) in enumerate(stages):
      for b in range(depth):
        strides = (2, 2) if s > 0 and b == 0 else (1, 1)
        x = ResidualBlock(width, strides, self.dtype, name=f"stage{s}_block{b}")(
            x, subnet, train=train)
    x = jnp.mean(x, axis=(1, 2))
    return NestedDense(self.num_classes, dtype=self.dtype, name="head")(x, subnet)
