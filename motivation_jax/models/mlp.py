"""A nested multi-layer perceptron.

The base uses the first ``len(base_widths)`` hidden layers, each sliced to its
base width; the motivated model may be wider in every layer and deeper (extra
hidden layers after the base's). The classifier head is shared: the base reads
the first ``base_widths[-1]`` rows of its kernel.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from motivation_jax.models.layers import NestedDense, NestingError, check_subnet


class NestedMLP(nn.Module):
  base_widths: Sequence[int]
  motivated_widths: Sequence[int]
  num_classes: int
  dtype: Any = jnp.float32

  def __post_init__(self):
    check_widths("NestedMLP", self.base_widths, self.motivated_widths)
    if self.base_widths[-1] > self.motivated_widths[-1]:
      raise NestingError(
          f"NestedMLP: the base's last hidden width {self.base_widths[-1]} exceeds the "
          f"motivated model's {self.motivated_widths[-1]}, so the shared head cannot nest")
    super().__post_init__()

  def widths(self, subnet: str) -> tuple[int, ...]:
    check_subnet(subnet)
    return tuple(self.base_widths if subnet == "base" else self.motivated_widths)

  def standalone(self, subnet: str) -> "NestedMLP":
    """The plain network of one sub-network's size (what ``export`` targets)."""
    widths = self.widths(subnet)
    # parent=None: a free-standing module, not a child of this one.
    return NestedMLP(widths, widths, self.num_classes, self.dtype, parent=None)

  @nn.compact
  def __call__(self, x: jax.Array, *, subnet: str = "motivated",
               train: bool = False) -> jax.Array:
    del train  # no dropout or batch norm here
    x = x.reshape((x.shape[0], -1)).astype(self.dtype)
    for i, width in enumerate(self.widths(subnet)):
      x = nn.relu(NestedDense(width, dtype=self.dtype, name=f"hidden_{i}")(x, subnet))
    return NestedDense(self.num_classes, dtype=self.dtype, name="head")(x, subnet)


def check_widths(family: str, base: Sequence[int], motivated: Sequence[int]) -> None:
  """Refuses a base that is deeper, or wider at some layer, than the motivated model."""
  if not base or any(w < 1 for w in (*base, *motivated)):
    raise ValueError(f"{family}: widths must be positive and the base needs at least one "
                     f"layer, got base={tuple(base)} motivated={tuple(motivated)}")
  if len(base) > len(motivated):
    raise NestingError(f"{family}: the base has {len(base)} layers but the motivated "
                       f"model only {len(motivated)}; the base is not nested")
  for i, (b, m) in enumerate(zip(base, motivated)):
    if b > m:
      raise NestingError(f"{family}: layer {i} is {b} wide in the base but {m} in the "
                         "motivated model; the base is not nested")
