"""Nested ResNets: CIFAR-style 6n+2 and ImageNet-style basic-block ResNet-18/34.

``NestedResNet`` is a stem, stages of basic residual blocks, global average
pooling and a dense head. The base uses, in every stage, the first
``base_depths[s]`` blocks, each sliced to ``base_widths[s]`` channels; the
motivated model may be wider per stage and deeper (extra blocks at the end of
each stage, which the base skips). The first block of a later stage halves the
resolution; a block whose input and output shapes differ has a 1x1 projection
shortcut (option B of He et al.; the CIFAR paper's option A pads with zeros
instead), so the extra blocks at the end of a stage are identity-shortcut
blocks and skipping them leaves a well-formed network.

Stems: ``"cifar"`` is a 3x3 convolution at full resolution; ``"imagenet"`` a
7x7 stride-2 convolution and a 3x3 stride-2 max pool. The stem has as many
channels as the first stage.

Named architectures (``ARCHS``, chosen by name in the config): resnet20/32/44/
56/110 (CIFAR, 16/32/64 channels, n blocks per stage for depth 6n+2) and
resnet18/34 (ImageNet, 64/128/256/512 channels). Any two of the same style
nest (the smaller depth is the base); a ``width`` multiplier per sub-network
nests them by width too (channels rounded, at least 1).

``extension_init="zero"``: the last batch norm of every extra block starts
with scale 0, so the block is the identity (its input is a ReLU output, so
``relu(x + 0) = x``), and the weights from extra channels into base channels
start at 0. At initialisation the motivated model then computes the base's
logits exactly (up to float summation order), by depth and by width.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from motivation_jax.common import check_subnet
from motivation_jax.errors import ConfigError, NestingError
from motivation_jax.models.layers import NestedBatchNorm, NestedConv, NestedDense
from motivation_jax.models.options import check_widths, subnet_options

STEMS = ("cifar", "imagenet")
# name -> (stem, channels per stage, blocks per stage)
ARCHS = {
    **{f"resnet{6 * n + 2}": ("cifar", (16, 32, 64), (n, n, n)) for n in (3, 5, 7, 9, 18)},
    "resnet18": ("imagenet", (64, 128, 256, 512), (2, 2, 2, 2)),
    "resnet34": ("imagenet", (64, 128, 256, 512), (3, 4, 6, 3)),
}


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


class NestedResNet(nn.Module):
  base_widths: Sequence[int]      # channels per stage in the base
  base_depths: Sequence[int]      # residual blocks per stage in the base
  motivated_widths: Sequence[int]
  motivated_depths: Sequence[int]
  num_classes: int
  stem: str = "cifar"
  dtype: Any = jnp.float32

  # The last layer of a residual branch, zeroed in extra blocks by extension_init="zero".
  extension_last_layers: ClassVar[tuple[str, ...]] = ("bn2/scale",)

  def __post_init__(self):
    family = type(self).__name__
    if self.stem not in STEMS:
      raise ConfigError(f"{family}: stem must be one of {STEMS}, got {self.stem!r}")
    check_widths(family, self.base_widths, self.motivated_widths)
    if len(self.base_widths) != len(self.motivated_widths):
      raise NestingError(f"{family}: base and motivated models need the same number of "
                         f"stages, got {len(self.base_widths)} and {len(self.motivated_widths)}")
    for name, widths, depths in (("base", self.base_widths, self.base_depths),
                                 ("motivated", self.motivated_widths, self.motivated_depths)):
      if len(depths) != len(widths) or any(d < 1 for d in depths):
        raise ConfigError(f"{family}: {name}_depths must give at least one block for each "
                          f"of the {len(widths)} stages, got {tuple(depths)}")
    for s, (b, m) in enumerate(zip(self.base_depths, self.motivated_depths)):
      if b > m:
        raise NestingError(f"{family}: stage {s} has {b} blocks in the base but {m} in "
                           "the motivated model; the base is not nested")
    super().__post_init__()

  def stages(self, subnet: str) -> tuple[tuple[int, int], ...]:
    """(width, depth) of every stage of one sub-network."""
    check_subnet(subnet)
    if subnet == "base":
      return tuple(zip(self.base_widths, self.base_depths))
    return tuple(zip(self.motivated_widths, self.motivated_depths))

  def standalone(self, subnet: str) -> "NestedResNet":
    widths, depths = zip(*self.stages(subnet))
    # parent=None: a free-standing module, not a child of this one.
    return type(self)(widths, depths, widths, depths, self.num_classes, self.stem,
                      self.dtype, parent=None)

  @nn.compact
  def __call__(self, x: jax.Array, *, subnet: str = "motivated",
               train: bool = False) -> jax.Array:
    stages = self.stages(subnet)
    imagenet = self.stem == "imagenet"
    stem = NestedConv(stages[0][0], (7, 7) if imagenet else (3, 3),
                      (2, 2) if imagenet else (1, 1), dtype=self.dtype, name="stem")
    x = nn.relu(NestedBatchNorm(dtype=self.dtype, name="stem_bn")(stem(x, subnet), subnet,
                                                                  train=train))
    if imagenet:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for s, (width, depth) in enumerate(stages):
      for b in range(depth):
        strides = (2, 2) if s > 0 and b == 0 else (1, 1)
        x = ResidualBlock(width, strides, self.dtype, name=f"stage{s}_block{b}")(
            x, subnet, train=train)
    x = jnp.mean(x, axis=(1, 2))
    return NestedDense(self.num_classes, dtype=self.dtype, name="head")(x, subnet)


def arch(name: str, width: float = 1.0) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
  """(stem, widths, depths) of a named ResNet, channels scaled by ``width``."""
  if name not in ARCHS:
    raise ConfigError(f"unknown ResNet {name!r}; known: {', '.join(ARCHS)}")
  if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
    raise ConfigError(f"a ResNet width multiplier must be a number > 0, got {width!r}")
  stem, widths, depths = ARCHS[name]
  return stem, tuple(max(1, round(w * width)) for w in widths), depths


def from_config(base: Mapping[str, Any], motivated: Mapping[str, Any],
                num_classes: int) -> NestedResNet:
  """``config.model.base`` / ``.motivated`` are ``{"arch": "resnet20", "width": 1.0}``."""
  subnets = []
  for options in (base, motivated):
    options = subnet_options("resnet", options, required=("arch",), optional={"width": 1.0})
    subnets.append((options["arch"], *arch(options["arch"], options["width"])))
  (base_name, base_stem, bw, bd), (mot_name, mot_stem, mw, md) = subnets
  if base_stem != mot_stem:
    raise NestingError(f"{base_name} ({base_stem}-style) and {mot_name} ({mot_stem}-style) "
                       "are different families; the base must nest in the motivated model")
  return NestedResNet(bw, bd, mw, md, num_classes, stem=base_stem)
