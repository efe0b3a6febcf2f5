"""The ``cnn`` family: a residual CNN given by its channels and blocks per stage.

The module is ``resnet.NestedResNet`` with the CIFAR stem; where the ``resnet``
family picks named architectures, this one takes explicit stages, e.g. the
default config's ``{"widths": (16, 32), "depths": (1, 1)}``.
"""

from __future__ import annotations

from typing import Any, Mapping

from motivation_jax.models.options import subnet_options
from motivation_jax.models.resnet import NestedResNet


def from_config(base: Mapping[str, Any], motivated: Mapping[str, Any],
                num_classes: int) -> NestedResNet:
  """``config.model.base`` / ``.motivated`` are ``{"widths": (...), "depths": (...)}``."""
  (bw, bd), (mw, md) = (
      (tuple(o["widths"]), tuple(o["depths"]))
      for o in (subnet_options("cnn", d, required=("widths", "depths")) for d in (base, motivated)))
  return NestedResNet(bw, bd, mw, md, num_classes, stem="cifar")
