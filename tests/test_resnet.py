"""The nested ResNet family: named architectures, pairs, export, zero init.

(The compiled steps' FLOPs of every family are checked in test_step_costs.py.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from motivation_jax.errors import NestingError
from motivation_jax.models import build_model, resnet
from motivation_jax.nesting import init_variables

from conftest import apply, check_export_matches_standalone, make_batch

# (base, motivated) sub-network configs, tiny widths so that CPU tests are fast.
PAIRS = {
    "cifar_depth": ({"arch": "resnet20", "width": 0.25}, {"arch": "resnet32", "width": 0.25}),
    "cifar_width": ({"arch": "resnet20", "width": 0.25}, {"arch": "resnet20", "width": 0.5}),
    "cifar_both": ({"arch": "resnet20", "width": 0.25}, {"arch": "resnet44", "width": 0.5}),
    "imagenet_depth": ({"arch": "resnet18", "width": 1 / 16}, {"arch": "resnet34", "width": 1 / 16}),
    "imagenet_both": ({"arch": "resnet18", "width": 1 / 16}, {"arch": "resnet34", "width": 1 / 8}),
}


def _model(pair):
  base, motivated = PAIRS[pair]
  return resnet.from_config(base, motivated, num_classes=10)


def _params(module, hw):
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, hw, hw, 3))))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("name, hw, num_classes, expected", [
    # torchvision's counts for ResNet-18/34 (same architecture).
    ("resnet18", 224, 1000, 11_689_512), ("resnet34", 224, 1000, 21_797_672),
    # He et al. (2016) Table 6: 0.27M, 0.85M, 1.7M (option A shortcuts; our
    # projections add a little).
    ("resnet20", 32, 10, 272_474), ("resnet56", 32, 10, 855_770), ("resnet110", 32, 10, 1_730_714),
])
def test_named_resnets_have_the_published_sizes(name, hw, num_classes, expected):
  model = resnet.from_config({"arch": name}, {"arch": name}, num_classes)
  assert _params(model.standalone("base"), hw) == expected


# One nesting kind here (depth); test_efficientnet.py exports a wider base,
# test_vit.py one both wider and deeper, test_nesting.py the MLP.
def test_export_base_matches_the_standalone_base():
  check_export_matches_standalone(_model("imagenet_depth"),
                                  make_batch(n=4, hw=16, channels=3)["image"])


def test_zero_extension_init_starts_the_motivated_model_at_the_base():
  # Wider and deeper: both zeroing rules must hold for the logits to match.
  model, x = _model("imagenet_both"), make_batch(n=4, hw=16, channels=3)["image"]
  for init in ("default", "zero"):
    variables = init_variables(model, jax.random.key(0), x, extension_init=init)
    for train in (False, True):
      logits = {s: apply(model, variables, x, subnet=s, train=train, mutable=["batch_stats"])[0]
                for s in ("base", "motivated")}
      # Equal up to float summation order (train-mode batch norm over a few
      # 1x1 positions amplifies it a little); default init is far off.
      gap = np.max(np.abs(logits["motivated"] - logits["base"]))
      assert gap < 5e-4 if init == "zero" else gap > 1e-2, (init, train, gap)


def test_zero_extension_init_zeroes_only_the_extensions():
  model, x = _model("cifar_both"), make_batch(n=2, hw=16, channels=3)["image"]
  default = init_variables(model, jax.random.key(0), x)["params"]
  zero = init_variables(model, jax.random.key(0), x, extension_init="zero")["params"]
  # An extra block's last batch-norm scale is zero; its other layers are untouched.
  assert not np.any(zero["stage0_block3"]["bn2"]["scale"])
  np.testing.assert_array_equal(zero["stage0_block3"]["conv1"]["kernel"],
                                default["stage0_block3"]["conv1"]["kernel"])
  # A widened kernel: extra inputs into base outputs are zero, the rest unchanged.
  k, k0 = zero["stage1_block0"]["conv2"]["kernel"], default["stage1_block0"]["conv2"]["kernel"]
  assert k.shape == (3, 3, 16, 16)
  assert not np.any(k[:, :, 8:, :8])
  np.testing.assert_array_equal(k[:, :, :8, :], k0[:, :, :8, :])
  np.testing.assert_array_equal(k[:, :, :, 8:], k0[:, :, :, 8:])
  # The base's own region is what default init gives.
  np.testing.assert_array_equal(zero["stem"]["kernel"][..., :4], default["stem"]["kernel"][..., :4])


def test_pairs_are_chosen_by_name_in_the_config():
  model = build_model({"name": "resnet", "base": {"arch": "resnet20"},
                       "motivated": {"arch": "resnet56"}}, num_classes=10)
  assert model.stages("base") == ((16, 3), (32, 3), (64, 3))
  assert model.stages("motivated") == ((16, 9), (32, 9), (64, 9))
  wide = build_model({"name": "resnet", "base": {"arch": "resnet18", "width": 0.5},
                      "motivated": {"arch": "resnet34"}}, num_classes=100)
  assert wide.stages("base") == ((32, 2), (64, 2), (128, 2), (256, 2))
  assert wide.stem == "imagenet"


@pytest.mark.parametrize("base, motivated, error, message", [
    ({"arch": "resnet20"}, {"arch": "resnet18"}, NestingError,
     r"resnet20 \(cifar-style\) and resnet18 \(imagenet-style\) are different families"),
    ({"arch": "resnet56"}, {"arch": "resnet20"}, NestingError, "stage 0 has 9 blocks in the base"),
    ({"arch": "resnet20", "width": 2.0}, {"arch": "resnet56"}, NestingError,
     "layer 0 is 32 wide in the base but 16"),
    ({"arch": "resnet21"}, {"arch": "resnet56"}, ValueError, "unknown ResNet 'resnet21'; known:"),
    ({"arch": "resnet20", "width": 0}, {"arch": "resnet56"}, ValueError, "must be a number > 0"),
    ({"arch": "resnet20", "depth": 3}, {"arch": "resnet56"}, ValueError,
     "'depth' is not a sub-network option of the resnet family"),
])
def test_pairs_that_cannot_nest_are_refused_in_one_line(base, motivated, error, message):
  with pytest.raises(error, match=message):
    resnet.from_config(base, motivated, num_classes=10)
