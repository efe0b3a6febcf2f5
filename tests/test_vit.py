"""The nested ViT family: export, zero extension init, validation, sizes.

(The compiled steps' FLOPs of every family are checked in test_step_costs.py.)
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from motivation_jax import nesting
from motivation_jax.errors import NestingError
from motivation_jax.models import build_standalone, standalone_spec
from motivation_jax.models.vit import ARCHS, NestedViT, from_config
from motivation_jax.nesting import init_variables

from conftest import apply, check_export_matches_standalone, make_batch


def tiny(base_heads, base_depth, motivated_heads, motivated_depth):
  """A tiny ViT through ``from_config``: "ti" has 3 heads, so width h/3 gives h heads of 8."""
  sub = lambda heads, depth: {"arch": "ti", "width": heads / 3, "depth": depth}
  return from_config(sub(base_heads, base_depth), sub(motivated_heads, motivated_depth),
                     num_classes=10, patch_size=4, head_dim=8)


PAIRS = {
    "depth": lambda: tiny(2, 1, 2, 3),
    "both": lambda: tiny(1, 1, 3, 2),
}


def images(n=4, hw=8, seed=0):
  return make_batch(n, hw, seed, channels=3)["image"]


def test_tiny_sizes():
  model = tiny(1, 1, 3, 2)
  assert model.sizes("base") == (8, 1, 32, 1)
  assert model.sizes("motivated") == (24, 3, 96, 2)


# Wider and deeper here; test_resnet.py exports a deeper base, test_efficientnet.py a
# wider one.
def test_export_base_matches_the_standalone_base():
  check_export_matches_standalone(PAIRS["both"](), images())


def _logits(model, extension_init, x, subnets=("base", "motivated")):
  variables = init_variables(model, jax.random.key(0), x, extension_init=extension_init)
  return [apply(model, variables, x, subnet=subnet) for subnet in subnets]


def test_zero_init_motivated_equals_base_for_a_depth_extension():
  model, x = PAIRS["depth"](), images()
  base, motivated = _logits(model, "zero", x)
  np.testing.assert_allclose(motivated, base, rtol=1e-5, atol=1e-6)
  # Without it the extra blocks change the logits (so the check above can fail).
  [default] = _logits(model, "default", x, ("motivated",))
  assert not np.allclose(default, base, atol=1e-3)


def test_zero_init_motivated_equals_base_with_more_heads_and_mlp_at_the_same_dim():
  """Extra heads and MLP units add nothing to the (unchanged) embedding dims."""
  model = NestedViT(base_dim=16, base_heads=1, base_mlp_dim=16, base_depth=1,
                    motivated_dim=16, motivated_heads=3, motivated_mlp_dim=48,
                    motivated_depth=2, num_classes=10, patch_size=4, head_dim=8)
  x = images()
  base, motivated = _logits(model, "zero", x)
  np.testing.assert_allclose(motivated, base, rtol=1e-5, atol=1e-6)
  [default] = _logits(model, "default", x, ("motivated",))
  assert not np.allclose(default, base, atol=1e-3)


def test_zero_init_with_a_wider_embedding_extra_blocks_are_identity_but_not_the_base():
  """What holds when D grows (documented in models/vit.py): the extra blocks are
  exactly the identity, but LayerNorm over D_m != D_b makes the motivated logits
  differ from the base's."""
  model, x = PAIRS["both"](), images()   # D 8 -> 24, depth 1 -> 2
  variables = init_variables(model, jax.random.key(0), x, extension_init="zero")
  motivated = apply(model, variables, x, subnet="motivated")
  # The same variables without the extra block, in the width-only model.
  shallow = NestedViT(**{**_fields(model), "motivated_depth": model.base_depth})
  params = {k: v for k, v in variables["params"].items() if k != "block_1"}
  np.testing.assert_allclose(apply(shallow, {"params": params}, x, subnet="motivated"),
                             motivated, rtol=1e-5, atol=1e-6)
  assert not np.allclose(apply(model, variables, x, subnet="base"), motivated, atol=1e-3)


def _fields(model):
  return {k: getattr(model, k) for k in ("base_dim", "base_heads", "base_mlp_dim",
                                         "base_depth", "motivated_dim", "motivated_heads",
                                         "motivated_mlp_dim", "motivated_depth", "num_classes",
                                         "patch_size", "head_dim", "dtype")}


@pytest.mark.parametrize("change, message", [
    ({"base_dim": 32}, "base's embedding dim 32 exceeds the motivated model's 16"),
    ({"base_heads": 3}, "base's number of heads 3 exceeds the motivated model's 2"),
    ({"base_mlp_dim": 128}, "base's MLP hidden width 128 exceeds the motivated model's 64"),
    ({"base_depth": 3}, "base's depth 3 exceeds the motivated model's 2"),
])
def test_a_base_that_is_not_nested_is_refused(change, message):
  ok = dict(base_dim=8, base_heads=1, base_mlp_dim=32, base_depth=1, motivated_dim=16,
            motivated_heads=2, motivated_mlp_dim=64, motivated_depth=2, num_classes=10)
  NestedViT(**ok)
  with pytest.raises(NestingError, match=message):
    NestedViT(**{**ok, **change})


def test_from_config_refuses_a_base_larger_than_the_motivated_model():
  with pytest.raises(NestingError, match="embedding dim 384 exceeds the motivated model's 192"):
    from_config({"arch": "s"}, {"arch": "ti"}, 10)
  with pytest.raises(NestingError, match="depth 12 exceeds the motivated model's 6"):
    from_config({"arch": "ti"}, {"arch": "s", "depth": 6}, 10)


@pytest.mark.parametrize("base, motivated, options, message", [
    ({"arch": "l"}, {"arch": "s"}, {}, r"unknown ViT arch 'l'; known: ti, s, b"),
    ({"arch": "ti", "widht": 2}, {"arch": "s"}, {}, "'widht' is not a sub-network option"),
    ({"depth": 2}, {"arch": "s"}, {}, "the vit family needs arch"),
    ({"arch": "ti", "width": 0}, {"arch": "s"}, {}, "width must be a positive number"),
    ({"arch": "ti"}, {"arch": "s"}, {"head_dim": 0}, "head_dim must be a positive integer"),
    ({"arch": "ti", "depth": 0}, {"arch": "s"}, {}, "base_depth must be a positive integer"),
])
def test_from_config_refuses_bad_options(base, motivated, options, message):
  with pytest.raises(ValueError, match=message):
    from_config(base, motivated, 10, **options)


def test_images_must_divide_into_patches_and_keep_their_size():
  model = tiny(1, 1, 2, 1)
  with pytest.raises(ValueError, match=r"divisible by patch_size=4, got shape \(2, 6, 6, 3\)"):
    init_variables(model, jax.random.key(0), jnp.zeros((2, 6, 6, 3)))
  variables = init_variables(model, jax.random.key(0), images(2, 16))
  with pytest.raises(ValueError, match="position embedding has 17 tokens but these images "
                     "give 5"):
    apply(model, variables, images(2, 8), subnet="base")


def test_published_sizes_and_parameter_counts():
  """ViT-Ti/16 -> ViT-S/16 at 224x224, 1000 classes, counted abstractly (no init)."""
  model = from_config({"arch": "ti"}, {"arch": "s"}, 1000)
  assert ARCHS["ti"][:2] == model.sizes("base")[:2] == (192, 3)
  assert ARCHS["s"][:2] == model.sizes("motivated")[:2] == (384, 6)
  assert model.sizes("base")[2:] == (768, 12)
  wmap = nesting.weights_map(model, jnp.zeros((1, 224, 224, 3)), subnet="motivated")
  # timm's vit_tiny_patch16_224 / vit_small_patch16_224: 5.72M / 22.05M.
  assert wmap.num_params("base") == 5_717_416
  assert wmap.num_params("motivated") == 22_050_664


def test_standalone_spec_round_trips_through_json():
  model = tiny(1, 1, 2, 2)
  spec = json.loads(json.dumps(standalone_spec(model, "base")))
  assert build_standalone(spec) == model.standalone("base")
  assert model.standalone("base").sizes("motivated") == model.sizes("base")
