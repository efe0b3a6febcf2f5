"""The nested EfficientNet family: nesting, export and zero extension init.

(The compiled steps' FLOPs of every family are checked in test_step_costs.py.)
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from motivation_jax.errors import NestingError
from motivation_jax.models import build_standalone, efficientnet, standalone_spec
from motivation_jax.models.efficientnet import NestedEfficientNet
from motivation_jax.nesting import init_variables

from conftest import check_export_matches_standalone, make_batch, randomise

# Tiny width multipliers: channels are rounded to multiples of 8 (at least 8).
PAIRS = {
    "b0_to_b2": ({"arch": "b0", "width": 0.1}, {"arch": "b2", "width": 0.25}),  # both
}


def _model(pair, num_classes=10):
  return efficientnet.from_config(*PAIRS[pair], num_classes)


def _tiny(motivated_depths):
  """Two stages of MBConv (expand 1 and 6, squeeze-excitation, depthwise), the base
  at half the motivated width: the named architectures' 16 to 23 blocks cost
  XLA's CPU compiler tens of seconds and test no other code."""
  return NestedEfficientNet(
      base_stem=8, base_widths=(8, 8), base_depths=(1, 1), base_head=16,
      motivated_stem=16, motivated_widths=(16, 16), motivated_depths=motivated_depths,
      motivated_head=32, num_classes=10, blocks=((1, 3, 1), (6, 3, 2)))


def _batch():
  return make_batch(8, hw=16, channels=3)


def test_sizes_follow_the_original_scaling():
  assert efficientnet.arch("b0") == (32, (16, 24, 40, 80, 112, 192, 320),
                                     (1, 2, 2, 3, 3, 4, 1), 1280)
  assert efficientnet.arch("b3") == (40, (24, 32, 48, 96, 136, 232, 384),
                                     (2, 3, 3, 5, 5, 6, 2), 1536)
  # The official parameter counts (1000 classes), counted abstractly.
  x = jnp.zeros((1, 32, 32, 3))
  for arch, expected in (("b0", 5_288_548), ("b2", 9_109_994)):
    model = efficientnet.from_config({"arch": arch}, {"arch": arch}, 1000)
    shapes = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), x))
    assert sum(np.prod(s.shape) for s in jax.tree.leaves(shapes["params"])) == expected


# One nesting kind here (width); test_resnet.py exports a deeper base, test_vit.py
# one both wider and deeper.
def test_export_base_gives_the_standalone_base_the_same_logits():
  check_export_matches_standalone(_tiny(motivated_depths=(1, 1)), _batch()["image"])


def test_zero_extension_init_starts_the_motivated_model_at_the_base():
  # Wider and deeper: both zeroing rules must hold for the logits to match.
  model = _tiny(motivated_depths=(2, 3))
  x = _batch()["image"]

  @jax.jit  # one program for all four runs, compiled once for both inits
  def logits(variables):
    return {(subnet, train): model.apply(variables, x, subnet=subnet, train=train,
                                         mutable=("batch_stats",))[0]
            for subnet in ("base", "motivated") for train in (False, True)}

  outputs = {}
  for init in ("zero", "default"):
    variables = init_variables(model, jax.random.key(1), x, extension_init=init)
    # Running statistics away from (0, 1): in eval mode at init the signal of
    # deep nets otherwise fades to ~1e-7 logits. Equality does not depend on
    # them (batch norm is per channel).
    variables = {**variables, **randomise({"batch_stats": variables["batch_stats"]})}
    out = logits(variables)
    for train in (False, True):
      outputs[init, train] = out["base", train], out["motivated", train]
  for train in (False, True):
    base, motivated = outputs["zero", train]
    scale = np.abs(base).max()
    assert scale > 1e-2
    # Float summation order differs; in float64 the difference is ~1e-13.
    np.testing.assert_allclose(motivated, base, rtol=1e-4, atol=1e-4 * scale)
    # Without it the extensions change the logits (so the check above can fail).
    base, motivated = outputs["default", train]
    assert not np.allclose(motivated, base, rtol=1e-2, atol=1e-3), train


@pytest.mark.parametrize("base, motivated, message", [
    ({"arch": "b3"}, {"arch": "b0"}, "the stem has 40 channels in the base but 32"),
    ({"arch": "b1", "width": 0.25}, {"arch": "b0", "width": 0.5}, "stage 0 has 2 blocks"),
    ({"arch": "b0", "width": 0.5}, {"arch": "b1", "width": 0.25}, "has 16 channels in the "
     "base but 8"),
])
def test_a_base_that_is_not_nested_is_refused(base, motivated, message):
  with pytest.raises(NestingError, match=message):
    efficientnet.from_config(base, motivated, 10)


def test_a_different_number_of_stages_is_refused():
  with pytest.raises(NestingError, match="same number of stages, got 1 and 2"):
    NestedEfficientNet(8, (8,), (1,), 16, 8, (8, 16), (1, 1), 16, 10,
                       blocks=((1, 3, 1), (6, 3, 2)))


@pytest.mark.parametrize("base, message", [
    ({"arch": "b7"}, r"unknown EfficientNet 'b7'; known: b0, b1, b2, b3"),
    ({"arch": "b0", "width": 0}, "width multiplier must be a number > 0"),
    ({"arch": "b0", "depth": -1}, "depth multiplier must be a number > 0"),
    ({"arch": "b0", "blocks": 2}, r"'blocks' is not a sub-network option of the "
     "efficientnet family"),
    ({"width": 1.0}, "the efficientnet family needs arch"),
])
def test_bad_options_are_refused_with_a_clear_message(base, message):
  with pytest.raises(ValueError, match=message):
    efficientnet.from_config(base, {"arch": "b0"}, 10)


def test_the_depth_multiplier_scales_each_stages_repeats_rounding_up():
  assert efficientnet.arch("b0", depth=0.25)[2] == (1,) * 7  # B0: 1, 2, 2, 3, 3, 4, 1
  assert efficientnet.arch("b1", depth=0.25)[2] == (1, 1, 1, 1, 1, 2, 1)  # x 1.1 x 0.25
  assert efficientnet.arch("b0", depth=2)[2] == (2, 4, 4, 6, 6, 8, 2)


def test_the_standalone_model_is_the_subnet_alone():
  model = _model("b0_to_b2")
  base = model.standalone("base")
  assert base.parent is None
  assert base.sizes("base") == base.sizes("motivated") == model.sizes("base")
  assert model.standalone("motivated").sizes("base") == model.sizes("motivated")


def test_standalone_spec_round_trips_through_json():
  model = _model("b0_to_b2")
  spec = json.loads(json.dumps(standalone_spec(model, "base")))
  assert build_standalone(spec) == model.standalone("base")
