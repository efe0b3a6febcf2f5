"""A nested multi-layer perceptron.

The base uses the first ``len(base_widths)`` hidden layers, each sliced to its
base width; the motivated model may be wider in every layer and deeper (extra
hidden layers after the base's). The classifier head is shared: the base reads
the first ``base_widths[-1]`` rows of its kernel.

``extension_init="zero"``: the motivated model starts out computing the base's
logits when it is only wider; extra hidden layers are not residual, so no
initialisation makes them the identity, and a deeper motivated MLP differs.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from motivation_jax.common import check_subnet
from motivation_jax.errors import NestingError
from motivation_jax.models.layers import NestedDense
from motivation_jax.models.options import check_widths, subnet_options


class NestedMLP(nn.Module):
  base_widths: Sequence[int]
  motivated_widths: Sequence[int]
  num_classes: int
  dtype: Any = jnp.float32

  # Extra hidden layers are not residual branches: nothing to zero by depth.
  extension_last_layers: ClassVar[tuple[str, ...]] = ()

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


def from_config(base: Mapping[str, Any], motivated: Mapping[str, Any],
                num_classes: int) -> NestedMLP:
  """``config.model.base`` / ``.motivated`` are ``{"widths": (...)}``."""
  widths = [subnet_options("mlp", d, required=("widths",))["widths"] for d in (base, motivated)]
  return NestedMLP(tuple(widths[0]), tuple(widths[1]), num_classes)
