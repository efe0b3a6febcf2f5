"""Nested EfficientNets: the B0..B3 family of Tan & Le (2019) as base / motivated pairs.

``NestedEfficientNet`` is a 3x3 stride-2 stem (conv, batch norm, swish), stages
of MBConv blocks, a 1x1 head convolution (batch norm, swish), global average
pooling and a dense classifier. An MBConv block is a 1x1 expansion (skipped for
expand ratio 1), a depthwise kxk convolution, squeeze-and-excitation (global
pool, reduce to ``max(1, int(0.25 * block input channels))`` units with bias and
swish, expand back with bias and a sigmoid gate), a 1x1 projection with batch
norm and no activation, and (except in the first block of a stage) an identity
skip connection. Batch norm uses the original momentum 0.99 and epsilon 1e-3,
and the initialisers are the original ones (fan-out normal for convolutions,
uniform +-1/sqrt(classes) for the classifier).

Nesting rule: the base uses, in every stage, the first ``base_depths[s]``
blocks, each sliced to its base channels: output channels ``base_widths[s]``,
expanded channels ``expand_ratio * base input channels``, SE units from the
base input channels, so every layer reads the leading slice of its variables.
Depthwise convolutions and batch norm are per channel and skips add prefixes
to prefixes, so the base is exactly the standalone network of its size. Extra
blocks of the motivated model are at the end of each stage: stride 1 and as
many input as output channels, so skipping them leaves a well-formed network.
Stem and head channels nest the same way; the number of stages and the block
table (``blocks``: expand ratio, kernel, stride per stage) are shared.

Skip connections: a block has one iff it is not the first of its stage. In the
B0..B3 tables this is the original rule (stride 1 and equal input and output
channels), since every stage's first block strides or changes the channels. At
tiny width multipliers channel rounding can make a first block's input and
output widths equal in one sub-network only; the original rule would then give
it a skip in one sub-network and not the other, so the skip is fixed by position.

Named architectures (``ARCHS``): b0..b3, the B0 table scaled by (width, depth)
coefficients (channels rounded to multiples of 8, never below 90% of the scaled
value; repeats rounded up). A ``width`` option per sub-network multiplies the
width coefficient and a ``depth`` option the depth coefficient, for small nets
(e.g. ``{"arch": "b0", "width": 0.25, "depth": 0.25}``: one block a stage).

Deviations from the original family:

- both sub-networks see the same input resolution within a run (the original
  trains B0/B1/B2/B3 at 224/240/260/300 pixels), since they share every batch;
- no dropout before the classifier and no drop-connect (stochastic depth) in
  the blocks; a train step is deterministic given the batch.

``extension_init="zero"``: the project batch norm's scale starts at 0 in every
extra block, so the block is the identity (no activation follows the skip:
``x + 0 = x``), and the generic width rule zeroes the weights from extra
channels into base channels in every kernel: the expansion and projection
convolutions, the stem and head, both SE dense layers (extra SE units feed only
extra expanded channels; base SE units read only base expanded channels) and
the classifier. The depthwise kernel is stored ``(k, k, 1, C)``, so the rule
leaves it alone, as it should: it mixes no channels. Pooling, SE gating and
batch norm (in train mode too, whose statistics are per channel) never mix
channels either, so at initialisation the motivated model computes the base's
logits exactly (up to float summation order), by depth and by width.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from motivation_jax.common import check_subnet
from motivation_jax.errors import ConfigError, NestingError
from motivation_jax.models.layers import (NestedBatchNorm, NestedConv, NestedDense,
                                         nested_variable)
from motivation_jax.models.options import subnet_options

# The B0 stage table: (expand ratio, kernel, stride, output channels, repeats).
B0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
             (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
B0_BLOCKS = tuple((e, k, s) for e, k, s, _, _ in B0_STAGES)
B0_STEM, B0_HEAD = 32, 1280
# name -> (width coefficient, depth coefficient)
ARCHS = {"b0": (1.0, 1.0), "b1": (1.0, 1.1), "b2": (1.1, 1.2), "b3": (1.2, 1.4)}
SE_RATIO = 0.25
BN_MOMENTUM, BN_EPSILON = 0.99, 1e-3
DIVISOR = 8

# The original initialisers: "fan_out" normal for convolutions (and the SE 1x1
# convolutions, dense here), uniform(+-1/sqrt(classes)) for the classifier.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# Fan-out k*k for the depthwise kernel (k, k, 1, C), as the original computes it.
DEPTHWISE_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal", in_axis=-1,
                                                  out_axis=-2)
DENSE_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")


class NestedDepthwiseConv(nn.Module):
  """Depthwise kxk convolution, NHWC, no bias, over all channels of its input.

  The kernel is stored ``(k, k, 1, C)`` (``[..., in, out]`` with one input per
  group), so the base's leading ``C_base`` channels read its leading slice.
  """
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  dtype: Any = jnp.float32
  kernel_init: Callable[..., jax.Array] = DEPTHWISE_INIT

  @nn.compact
  def __call__(self, x: jax.Array, subnet: str) -> jax.Array:
    channels = x.shape[-1]
    shape = (*self.kernel_size, 1, channels)
    kernel = nested_variable(self, "params", "kernel", self.kernel_init, shape, subnet)
    return lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype),
        window_strides=self.strides, padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)


def _norm(dtype: Any, name: str) -> NestedBatchNorm:
  return NestedBatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype, name=name)


class MBConvBlock(nn.Module):
  """Mobile inverted bottleneck with squeeze-and-excitation; widths from its input."""
  features: int
  expand_ratio: int
  kernel_size: int
  strides: int
  skip: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, subnet: str, *, train: bool) -> jax.Array:
    conv = lambda f, name: NestedConv(f, (1, 1), dtype=self.dtype, kernel_init=CONV_INIT,
                                      name=name)
    inputs, channels = x, x.shape[-1]
    expanded = channels * self.expand_ratio
    if self.expand_ratio != 1:
      x = conv(expanded, "expand_conv")(x, subnet)
      x = nn.swish(_norm(self.dtype, "expand_bn")(x, subnet, train=train))
    k, s = self.kernel_size, self.strides
    x = NestedDepthwiseConv((k, k), (s, s), dtype=self.dtype, name="dw_conv")(x, subnet)
    x = nn.swish(_norm(self.dtype, "dw_bn")(x, subnet, train=train))
    # Squeeze-and-excitation: SE units scale with the block's input, as in the original.
    units = max(1, int(channels * SE_RATIO))
    gate = jnp.mean(x, axis=(1, 2))
    gate = nn.swish(NestedDense(units, dtype=self.dtype, kernel_init=CONV_INIT,
                                name="se_reduce")(gate, subnet))
    gate = nn.sigmoid(NestedDense(expanded, dtype=self.dtype, kernel_init=CONV_INIT,
                                  name="se_expand")(gate, subnet))
    x = x * gate[:, None, None, :]
    x = conv(self.features, "project_conv")(x, subnet)
    x = _norm(self.dtype, "project_bn")(x, subnet, train=train)
    if self.skip:
      x = x + inputs
    return x


class NestedEfficientNet(nn.Module):
  """An EfficientNet at the motivated size whose base is a prefix slice (module docstring)."""
  base_stem: int                  # stem channels of the base
  base_widths: Sequence[int]      # output channels per stage in the base
  base_depths: Sequence[int]      # blocks per stage in the base
  base_head: int                  # head (last 1x1 convolution) channels of the base
  motivated_stem: int
  motivated_widths: Sequence[int]
  motivated_depths: Sequence[int]
  motivated_head: int
  num_classes: int
  # Per stage: (expand ratio, kernel size, stride), shared by both sub-networks.
  blocks: Sequence[tuple[int, int, int]] = B0_BLOCKS
  dtype: Any = jnp.float32

  # The last layer of an MBConv branch, zeroed in extra blocks by extension_init="zero".
  extension_last_layers: ClassVar[tuple[str, ...]] = ("project_bn/scale",)

  def __post_init__(self):
    family = type(self).__name__
    stages = len(self.blocks)
    if not stages or any(len(b) != 3 or min(b) < 1 for b in self.blocks):
      raise ConfigError(f"{family}: blocks must give (expand ratio, kernel, stride) >= 1 for "
                        f"at least one stage, got {tuple(self.blocks)}")
    if len(self.base_widths) != len(self.motivated_widths):
      raise NestingError(f"{family}: base and motivated models need the same number of "
                         f"stages, got {len(self.base_widths)} and {len(self.motivated_widths)}")
    for name, widths, depths in (("base", self.base_widths, self.base_depths),
                                 ("motivated", self.motivated_widths, self.motivated_depths)):
      if len(widths) != stages or len(depths) != stages:
        raise ConfigError(f"{family}: {name}_widths and {name}_depths must have one entry for "
                          f"each of the {stages} stages of blocks, got {tuple(widths)} and "
                          f"{tuple(depths)}")
      sizes = (getattr(self, f"{name}_stem"), *widths, *depths, getattr(self, f"{name}_head"))
      if any(not isinstance(v, numbers.Integral) or v < 1 for v in sizes):
        raise ConfigError(f"{family}: the {name}'s channels and depths must be integers >= 1")
    layers = [("the stem", self.base_stem, self.motivated_stem),
              *((f"stage {s}", b, m)
                for s, (b, m) in enumerate(zip(self.base_widths, self.motivated_widths))),
              ("the head", self.base_head, self.motivated_head)]
    for where, b, m in layers:
      if b > m:
        raise NestingError(f"{family}: {where} has {b} channels in the base but {m} in the "
                           "motivated model; the base is not nested")
    for s, (b, m) in enumerate(zip(self.base_depths, self.motivated_depths)):
      if b > m:
        raise NestingError(f"{family}: stage {s} has {b} blocks in the base but {m} in the "
                           "motivated model; the base is not nested")
    super().__post_init__()

  def sizes(self, subnet: str) -> tuple[int, tuple[int, ...], tuple[int, ...], int]:
    """(stem channels, widths, depths, head channels) of one sub-network."""
    check_subnet(subnet)
    return (getattr(self, f"{subnet}_stem"), tuple(getattr(self, f"{subnet}_widths")),
            tuple(getattr(self, f"{subnet}_depths")), getattr(self, f"{subnet}_head"))

  def standalone(self, subnet: str) -> "NestedEfficientNet":
    stem, widths, depths, head = self.sizes(subnet)
    # parent=None: a free-standing module, not a child of this one.
    return type(self)(base_stem=stem, base_widths=widths, base_depths=depths, base_head=head,
                      motivated_stem=stem, motivated_widths=widths, motivated_depths=depths,
                      motivated_head=head, num_classes=self.num_classes,
                      blocks=tuple(map(tuple, self.blocks)), dtype=self.dtype, parent=None)

  @nn.compact
  def __call__(self, x: jax.Array, *, subnet: str = "motivated",
               train: bool = False) -> jax.Array:
    stem, widths, depths, head = self.sizes(subnet)
    x = NestedConv(stem, (3, 3), (2, 2), dtype=self.dtype, kernel_init=CONV_INIT,
                   name="stem")(x, subnet)
    x = nn.swish(_norm(self.dtype, "stem_bn")(x, subnet, train=train))
    for s, ((expand, kernel, stride), width, depth) in enumerate(
        zip(self.blocks, widths, depths)):
      for b in range(depth):
        # Only the first block of a stage strides and changes the channels.
        x = MBConvBlock(width, expand, kernel, stride if b == 0 else 1, skip=b > 0,
                        dtype=self.dtype, name=f"stage{s}_block{b}")(x, subnet, train=train)
    x = NestedConv(head, (1, 1), dtype=self.dtype, kernel_init=CONV_INIT,
                   name="head_conv")(x, subnet)
    x = nn.swish(_norm(self.dtype, "head_bn")(x, subnet, train=train))
    x = jnp.mean(x, axis=(1, 2))
    return NestedDense(self.num_classes, dtype=self.dtype, kernel_init=DENSE_INIT,
                       name="head")(x, subnet)


def round_filters(filters: float, width: float, divisor: int = DIVISOR) -> int:
  """Channels scaled by ``width``: a multiple of ``divisor``, at least ``divisor``,
  never rounded down by more than 10% (the original ``round_filters``)."""
  filters *= width
  rounded = max(divisor, int(filters + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * filters:
    rounded += divisor
  return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
  return int(math.ceil(depth * repeats))


def arch(name: str, width: float = 1.0, depth: float = 1.0
         ) -> tuple[int, tuple[int, ...], tuple[int, ...], int]:
  """(stem, widths, depths, head) of a named EfficientNet, with extra width and
  depth multipliers."""
  if name not in ARCHS:
    raise ConfigError(f"unknown EfficientNet {name!r}; known: {', '.join(ARCHS)}")
  for what, value in (("width", width), ("depth", depth)):
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value)
                                       and value > 0):
      raise ConfigError(f"an EfficientNet {what} multiplier must be a number > 0, got {value!r}")
  width_coefficient, depth_coefficient = ARCHS[name]
  width = width_coefficient * width
  return (round_filters(B0_STEM, width),
          tuple(round_filters(c, width) for _, _, _, c, _ in B0_STAGES),
          tuple(round_repeats(r, depth_coefficient * depth) for *_, r in B0_STAGES),
          round_filters(B0_HEAD, width))


def from_config(base: Mapping[str, Any], motivated: Mapping[str, Any],
                num_classes: int) -> NestedEfficientNet:
  """``config.model.base`` / ``.motivated`` are ``{"arch": "b0", "width": 1.0}``
  (and optionally ``"depth": 1.0``)."""
  sizes = []
  for options in (base, motivated):
    options = subnet_options("efficientnet", options, required=("arch",),
                             optional={"width": 1.0, "depth": 1.0})
    sizes.append(arch(options["arch"], options["width"], options["depth"]))
  (bs, bw, bd, bh), (ms, mw, md, mh) = sizes
  return NestedEfficientNet(base_stem=bs, base_widths=bw, base_depths=bd, base_head=bh,
                            motivated_stem=ms, motivated_widths=mw, motivated_depths=md,
                            motivated_head=mh, num_classes=num_classes)
