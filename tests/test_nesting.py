"""The weights map, the base view and export."""

import functools

import jax
import numpy as np
import pytest

from motivation_jax import nesting
from motivation_jax.errors import NestingError
from motivation_jax.models import NestedMLP, NestedResNet

from conftest import MODELS, apply, check_export_matches_standalone, make_batch, randomise


def _init(model, batch):
  return nesting.init_variables(model, jax.random.key(1), batch["image"])


@functools.cache
def _variables(model_name):
  """``(model, variables, wmap)`` of a conftest model, initialised once for this file."""
  model, x = MODELS[model_name](), make_batch()["image"]
  return model, _init(model, make_batch()), nesting.weights_map(model, x, subnet="motivated")


def test_export_base_gives_the_standalone_base_the_same_logits(batch):
  # The families' own files check export for ResNet, EfficientNet and ViT.
  check_export_matches_standalone(MODELS["mlp"](), batch["image"])


def test_export_motivated_gives_the_standalone_motivated_the_same_logits(model_name, batch):
  model, variables, wmap = _variables(model_name)
  variables = randomise(variables)
  exported = nesting.export(variables, "motivated", wmap)
  nested = apply(model, variables, batch["image"], subnet="motivated")
  alone = apply(model.standalone("motivated"), exported, batch["image"])
  np.testing.assert_array_equal(nested, alone)


def test_base_ignores_everything_outside_its_region(model_name, batch):
  model, variables, wmap = _variables(model_name)
  base_before = apply(model, variables, batch["image"], subnet="base")
  motivated_before = apply(model, variables, batch["image"], subnet="motivated")
  # Overwrite everything outside the base region with noise.
  noisy = {col: nesting.merge_base(randomise(tree, seed=7),
                                   nesting.base_view(tree, wmap[col]), wmap[col])
           for col, tree in variables.items()}
  np.testing.assert_array_equal(apply(model, noisy, batch["image"], subnet="base"),
                                base_before)
  assert not np.allclose(apply(model, noisy, batch["image"], subnet="motivated"),
                         motivated_before)


def test_base_runs_the_same_on_the_full_tree_and_on_its_view(model_name, batch):
  model, variables, wmap = _variables(model_name)
  variables = randomise(variables)
  view = {col: nesting.base_view(tree, wmap[col]) for col, tree in variables.items()}
  np.testing.assert_array_equal(apply(model, variables, batch["image"], subnet="base"),
                                apply(model, view, batch["image"], subnet="base"))


def test_merge_of_the_view_is_the_identity(model_name):
  _, variables, wmap = _variables(model_name)
  variables = randomise(variables)
  for col, tree in variables.items():
    merged = nesting.merge_base(tree, nesting.base_view(tree, wmap[col]), wmap[col])
    jax.tree.map(np.testing.assert_array_equal, merged, tree)


def test_extension_leaves_have_empty_views_and_count_in_the_motivated_size():
  model = NestedMLP((16,), (32, 32), 10)
  batch = make_batch()
  wmap = nesting.weights_map(model, batch["image"], subnet="motivated")
  assert wmap.params["hidden_1"]["kernel"].base_shape == (0, 0)
  assert not wmap.params["hidden_1"]["kernel"].in_base
  assert wmap.params["head"]["kernel"].base_shape == (16, 10)
  assert wmap.num_params("base") == 64 * 16 + 16 + 16 * 10 + 10
  assert wmap.num_params("motivated") == 64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10


@pytest.mark.parametrize("build, message", [
    (lambda: NestedMLP((64,), (32,), 10), "layer 0 is 64 wide in the base but 32"),
    (lambda: NestedMLP((16, 16, 16), (32, 32), 10), "the base has 3 layers"),
    (lambda: NestedResNet((8, 16), (1, 3), (16, 32), (2, 2), 10), "stage 1 has 3 blocks"),
    (lambda: NestedResNet((8,), (1,), (16, 32), (1, 1), 10), "same number of stages"),
])
def test_a_base_that_is_not_nested_is_refused(build, message):
  with pytest.raises(NestingError, match=message):
    build()


def test_weights_map_refuses_a_standalone_base_that_does_not_fit():
  """The generic check, for families whose constructor does not catch it."""

  class Wrong(NestedMLP):
    def standalone(self, subnet):
      return NestedMLP((8, 8), (8, 8), 12, parent=None)  # a 12-class head

  batch = make_batch()
  with pytest.raises(NestingError, match=r"params/head/bias has shape \(12,\) in the "
                     r"base but \(10,\)"):
    nesting.weights_map(Wrong((8, 8), (32, 32), 10), batch["image"], subnet="motivated")


def test_the_base_cannot_be_initialised_alone():
  batch = make_batch()
  with pytest.raises(NestingError, match="initialise the model with subnet='motivated'"):
    NestedMLP((8,), (16,), 10).init(jax.random.key(0), batch["image"], subnet="base")


def test_a_base_slice_larger_than_the_stored_variable_is_refused():
  batch = make_batch()
  small = NestedMLP((8,), (8,), 10).init(jax.random.key(0), batch["image"])
  with pytest.raises(NestingError, match="hidden_0/kernel: the base needs shape"):
    apply(NestedMLP((16,), (32,), 10), small, batch["image"], subnet="base")


def test_export_refuses_an_unknown_subnet(batch):
  model = NestedMLP((8,), (16,), 10)
  wmap = nesting.weights_map(model, batch["image"], subnet="motivated")
  with pytest.raises(ValueError, match="subnet must be 'base' or 'motivated'"):
    nesting.export(_init(model, batch), "small", wmap)
