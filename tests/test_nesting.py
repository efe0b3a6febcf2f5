"""The weights map, the base view and export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from motivation_jax import nesting
from motivation_jax.models import NestedCNN, NestedMLP, NestingError, init_variables

from conftest import apply, make_batch


def _init(model, batch):
  return init_variables(model, jax.random.key(1), batch["image"])


def _randomise(variables, seed=3):
  """Perturbs every leaf (batch stats too), so that tests of them can fail."""
  rng = np.random.default_rng(seed)  # numpy: no XLA compile per leaf shape
  return jax.tree.map(lambda x: x + jnp.asarray(0.1 * rng.uniform(size=x.shape), x.dtype),
                      variables)


def test_export_base_gives_the_standalone_base_the_same_logits(model, batch):
  variables = _randomise(_init(model, batch))
  wmap = nesting.weights_map(model, batch["image"], subnet="motivated")
  exported = nesting.export(variables, "base", wmap)
  standalone = model.standalone("base")
  # The standalone module's own init has exactly the exported structure and shapes.
  expected = jax.eval_shape(
      lambda: standalone.init(jax.random.key(1), batch["image"], subnet="motivated"))
  assert jax.tree.map(jnp.shape, exported) == jax.tree.map(lambda s: s.shape, expected)
  for train in (False, True):
    nested, nested_stats = apply(model, variables, batch["image"], subnet="base",
                                       train=train, mutable=("batch_stats",))
    alone, alone_stats = apply(standalone, exported, batch["image"], subnet="motivated",
                                          train=train, mutable=("batch_stats",))
    np.testing.assert_allclose(nested, alone, rtol=1e-5, atol=1e-5)
    if train and "batch_stats" in variables:
      # The nested base updates exactly the base slice of the running statistics.
      got = nesting.export({"batch_stats": nested_stats["batch_stats"]}, "base", wmap)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                   got["batch_stats"], alone_stats["batch_stats"])


def test_export_motivated_gives_the_standalone_motivated_the_same_logits(model, batch):
  variables = _randomise(_init(model, batch))
  wmap = nesting.weights_map(model, batch["image"], subnet="motivated")
  exported = nesting.export(variables, "motivated", wmap)
  nested = apply(model, variables, batch["image"], subnet="motivated")
  alone = apply(model.standalone("motivated"), exported, batch["image"])
  np.testing.assert_array_equal(nested, alone)


def test_base_ignores_everything_outside_its_region(model, batch):
  variables = _init(model, batch)
  wmap = nesting.weights_map(model, batch["image"], subnet="motivated")
  base_before = apply(model, variables, batch["image"], subnet="base")
  motivated_before = apply(model, variables, batch["image"], subnet="motivated")
  # Overwrite everything outside the base region with noise.
  noisy = {col: nesting.merge_base(_randomise(tree, seed=7),
                                   nesting.base_view(tree, wmap[col]), wmap[col])
           for col, tree in variables.items()}
  np.testing.assert_array_equal(apply(model, noisy, batch["image"], subnet="base"),
                                base_before)
  assert not np.allclose(apply(model, noisy, batch["image"], subnet="motivated"),
                         motivated_before)


def test_base_runs_the_same_on_the_full_tree_and_on_its_view(model, batch):
  variables = _randomise(_init(model, batch))
  wmap = nesting.weights_map(model, batch["image"], subnet="motivated")
  view = {col: nesting.base_view(tree, wmap[col]) for col, tree in variables.items()}
  np.testing.assert_array_equal(apply(model, variables, batch["image"], subnet="base"),
                                apply(model, view, batch["image"], subnet="base"))


def test_merge_of_the_view_is_the_identity(model, batch):
  variables = _randomise(_init(model, batch))
  wmap = nesting.weights_map(model, batch["image"], subnet="motivated")
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
    (lambda: NestedCNN((8, 16), (1, 3), (16, 32), (2, 2), 10), "stage 1 has 3 blocks"),
    (lambda: NestedCNN((8,), (1,), (16, 32), (1, 1), 10), "same number of stages"),
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
