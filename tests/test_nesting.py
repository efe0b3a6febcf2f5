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


def _split_over_4(x, dim):
  """``x`` split along ``dim`` over this process's 4 devices (an fsdp=4 mesh)."""
  from motivation_jax import sharding
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "fsdp_min_mib": 0.0})
  spec = (None,) * dim + (sharding.FSDP_AXIS,)
  layout = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  return jax.device_put(x, layout), layout


def test_the_storage_order_holds_each_devices_base_rows_first_and_the_base_view_reads_them():
  # 12 rows over 4 devices (3 each), base 8 (2 each): device k holds logical
  # rows 2k, 2k+1 (base) and 8+k (extension); the second dim is sliced too.
  region = nesting.Region(full_shape=(12, 3), base_shape=(8, 2))
  logical = np.arange(36, dtype=np.float32).reshape(12, 3)
  x, layout = _split_over_4(logical, 0)
  assert region.interleaved(layout) == 0
  stored = jax.jit(region.to_storage, static_argnums=1, out_shardings=layout)(x, layout)
  for shard in stored.addressable_shards:
    k = shard.index[0].start // 3
    np.testing.assert_array_equal(shard.data, logical[[2 * k, 2 * k + 1, 8 + k]])
  np.testing.assert_array_equal(jax.jit(region.to_logical, static_argnums=1)(stored, layout),
                                logical)
  # The base view of the storage order is the logical base, evenly split, in place.
  view_fn = jax.jit(region.view, static_argnums=1)
  view = view_fn(stored, layout)
  np.testing.assert_array_equal(view, logical[:8, :2])
  hlo = view_fn.lower(stored, layout).compile().as_text()
  assert not any(op in hlo for op in ("all-gather", "collective-permute", "all-to-all",
                                      "all-reduce")), hlo
  for shard in view.addressable_shards:
    k = shard.index[0].start // 2
    np.testing.assert_array_equal(shard.data, logical[2 * k:2 * k + 2, :2])
  # The write-back lands in the logical base region, and nothing else changes.
  part = -np.arange(16, dtype=np.float32).reshape(8, 2)
  merged = jax.jit(region.merge, static_argnums=2)(stored, part, layout)
  expected = logical.copy()
  expected[:8, :2] = part
  np.testing.assert_array_equal(jax.jit(region.to_logical, static_argnums=1)(merged, layout),
                                expected)


def test_a_leaf_whose_base_the_devices_do_not_divide_stays_in_logical_order():
  region = nesting.Region(full_shape=(12, 3), base_shape=(6, 3))  # 6 rows over 4 devices
  logical = np.arange(36, dtype=np.float32).reshape(12, 3)
  x, layout = _split_over_4(logical, 0)
  assert region.interleaved(layout) is None
  assert region.to_storage(x, layout) is x
  np.testing.assert_array_equal(jax.jit(region.view, static_argnums=1)(x, layout), logical[:6])
  # A split dim the base does not slice, and one device, need no order either.
  assert nesting.Region((12, 3), (12, 2)).interleaved(layout) is None
  assert nesting.Region((12, 3), (8, 2)).interleaved(None) is None
