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

from motivation_jax.models.layers import NestedDense, NestingError, check_subnet


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


def from_config(base: Mapping[str, Any], motivated: Mapping[str, Any],
                num_classes: int) -> NestedMLP:
  """``config.model.base`` / ``.motivated`` are ``{"widths": (...)}``."""
  widths = [subnet_options("mlp", d, required=("widths",))["widths"] for d in (base, motivated)]
  return NestedMLP(tuple(widths[0]), tuple(widths[1]), num_classes)


def subnet_options(family: str, options: Mapping[str, Any], required: Sequence[str] = (),
                   optional: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """One sub-network's config dict, checked: unknown keys and missing ones are refused."""
  optional = dict(optional or {})
  known = (*required, *optional)
  for key in options:
    if key not in known:
      raise ValueError(f"{key!r} is not a sub-network option of the {family} family "
                       f"(its options: {', '.join(known)})")
  missing = [k for k in required if k not in options]
  if missing:
    raise ValueError(f"the {family} family needs {', '.join(missing)} for each sub-network")
  return {**optional, **options}
