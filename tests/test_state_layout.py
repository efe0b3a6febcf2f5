"""config.model.state_layout="blocks": the base's part of every leaf held apart,
so that a base step is the ordinary step of the small module's own arrays."""

import json
import os
import shutil
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import ROOT, check_two_process_run, load_default_config, two_process_run
from motivation_jax import data, models, nesting, run_checks, sharding, steps, train
from motivation_jax.errors import ConfigError
from motivation_jax.export import export_run
from motivation_jax.nesting import Region

sys.path.insert(0, ROOT)
from examples.byom_models import MLP  # noqa: E402


@pytest.mark.parametrize("full, base", [
    ((5, 7), (2, 3)), ((5, 7), (5, 3)), ((5, 7), (2, 7)), ((6,), (3,)), ((6,), (6,)),
    ((4, 5, 6), (2, 5, 3)), ((5, 7), (0, 0)), ((3, 4), (0, 2)), ((2, 3, 4), (2, 0, 4))])
def test_a_leaf_is_its_base_block_and_its_extension(full, base):
  region = Region(full, base, in_base=all(base))
  x = jnp.arange(np.prod(full), dtype=jnp.float32).reshape(full)
  blocks = region.extension(x)
  assert sum(b.size for b in blocks) + np.prod(base) == np.prod(full)  # each entry once
  np.testing.assert_array_equal(region.join(region.view(x), blocks), x)


SMALL, LARGE = (32, 16), (48, 24)


@pytest.fixture(scope="module")
def pair():
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(64, 8, 8, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, size=(64,)), jnp.int32)}
  model = nesting.paired(MLP(SMALL), MLP(LARGE), batch["image"])
  optimizer = optax.adamw(1e-2)
  wmap = nesting.weights_map(model, batch["image"], subnet="motivated")
  return model, optimizer, wmap, batch


def _fresh(pair, optimizer=None, batch_norm_stats="per_subnet"):
  model, adamw, wmap, batch = pair
  return steps.create_train_state(model, optimizer or adamw, jax.random.key(0), batch["image"],
                                  batch_norm_stats=batch_norm_stats)


def _equal(a, b) -> list[str]:
  """The paths at which two trees differ in shape or in any bit."""
  return [jax.tree_util.keystr(path) for (path, x), y in
          zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b))
          if x.shape != y.shape or not np.array_equal(np.asarray(x), np.asarray(y))]


def test_the_converters_round_trip_bit_for_bit_and_storage_takes_its_input(pair):
  model, optimizer, wmap, batch = pair
  order = steps.make_order_converters(optimizer, wmap=wmap, state_layout="blocks")
  state = _fresh(pair)
  kept = jax.tree.map(jnp.copy, state)
  blocks = order["storage"](state)
  assert isinstance(blocks, steps.BlockState) and blocks.order == "blocks"
  assert all(x.is_deleted() for x in jax.tree.leaves(state))  # as a donation would
  # The base's arrays have the standalone small module's shapes.
  small = nesting.export(kept.variables("base"), "base", wmap)["params"]
  assert jax.tree.map(jnp.shape, blocks.params) == jax.tree.map(jnp.shape, small)
  back = order["logical"](blocks)
  assert type(back) is steps.TrainState and back.order == "logical"
  assert _equal(back, kept) == []
  assert order["storage"](blocks) is blocks and order["logical"](back) is back
  with pytest.raises(ValueError, match="convert it to logical order first"):
    nesting.export(blocks.variables("motivated"), "motivated", wmap)  # not the whole leaves
  with pytest.raises(ValueError, match="got one in .blocks. order"):
    layout = sharding.train_state_sharding(kept, sharding.make_mesh(
        load_default_config().mesh), min_bytes=2**22)
    steps.make_order_converters(optimizer, wmap=wmap, state_sharding=layout)["storage"](blocks)


def _ordinary_step(module, optimizer, seed):
  """What a user who trained the small module alone would write."""
  @jax.jit
  def step(variables, opt_state, batch, t):
    def objective(params):
      logits, mutated = module.apply(
          {"params": params, "batch_stats": variables["batch_stats"]}, batch["image"],
          train=True, mutable=["batch_stats"], rngs=steps.batch_rngs(seed, t, "base"))
      return steps.cross_entropy_loss(logits, batch["label"]), mutated["batch_stats"]
    (loss, stats), grads = jax.value_and_grad(objective, has_aux=True)(variables["params"])
    updates, opt_state = optimizer.update(grads, opt_state, variables["params"])
    return ({"params": optax.apply_updates(variables["params"], updates), "batch_stats": stats},
            opt_state, loss)
  return step


def test_a_base_step_is_the_small_modules_ordinary_step_bit_for_bit(pair):
  model, optimizer, wmap, batch = pair
  train_steps = steps.make_train_steps(model, optimizer, wmap=wmap, seed=5,
                                       state_layout="blocks")
  order = steps.make_order_converters(optimizer, wmap=wmap, state_layout="blocks")
  state = _fresh(pair)
  variables = jax.tree.map(jnp.copy, nesting.export(state.variables("base"), "base", wmap))
  opt_state = optimizer.init(variables["params"])
  ordinary = _ordinary_step(MLP(SMALL), optimizer, seed=5)
  state = order["storage"](state)
  extension = state.extension
  for t in range(4):  # with dropout and batch norm, several steps
    state, metrics = train_steps["base"](state, batch)
    variables, opt_state, loss = ordinary(variables, opt_state, batch, t)
    assert float(metrics["loss"]) == float(loss)
  assert _equal(state.params, variables["params"]) == []
  assert _equal(state.batch_stats["base"], variables["batch_stats"]) == []
  assert _equal(state.opt_state, opt_state) == []
  # The rest of the state is not handed through the base step at all.
  assert state.extension is extension
  assert not any(x.is_deleted() for x in jax.tree.leaves(extension))


def test_the_compiled_base_step_takes_only_the_bases_arrays(pair):
  model, optimizer, wmap, batch = pair
  base = steps.make_train_steps(model, optimizer, wmap=wmap, state_layout="blocks")["base"]
  state = steps.make_order_converters(optimizer, wmap=wmap, state_layout="blocks")[
      "storage"](_fresh(pair))
  compiled = base.lower(state, batch).compile()
  assert isinstance(compiled, steps.ExtensionAside)
  taken = jax.tree.leaves(compiled.in_tree.unflatten([0] * compiled.in_tree.num_leaves))
  assert len(taken) == len(jax.tree.leaves(state.replace(extension=None))) + len(batch)
  assert steps.compiled_flops(compiled) > 0
  new, _ = compiled(state, batch)  # the compiled program, called as the step is
  assert new.extension is state.extension


@pytest.mark.parametrize("policy, stats", [
    ("switch", "per_subnet"), ("both", "per_subnet"), ("joint", "per_subnet"),
    ("switch", "shared"), ("both", "shared")])
def test_a_motivated_step_computes_what_the_in_place_layouts_does(pair, policy, stats):
  """The same step on the joined leaves. XLA may fuse the joins into the
  update and round a few entries differently in the last bit (seen with the
  tests' compile flags, not with the defaults), hence the tolerance. With SGD:
  AdamW would scale those bits of the biases under batch norm (whose gradient
  is rounding noise around zero) up to whole steps of the learning rate."""
  model, _, wmap, batch = pair
  optimizer = optax.sgd(0.05, momentum=0.9)
  in_place = steps.make_train_steps(model, optimizer, wmap=wmap, seed=2, policy=policy)
  blocks = steps.make_train_steps(model, optimizer, wmap=wmap, seed=2, policy=policy,
                                  state_layout="blocks")
  order = steps.make_order_converters(optimizer, wmap=wmap, state_layout="blocks")
  logical = _fresh(pair, optimizer, stats)
  stored = order["storage"](jax.tree.map(jnp.copy, logical))
  for kind in ("motivated", "base", "motivated"):
    if kind == "base":  # the base step between two motivated ones
      logical, _ = in_place["base"](logical, batch)
      stored, _ = blocks["base"](stored, batch)
      continue
    logical, want = in_place[kind](logical, batch)
    stored, got = blocks[kind](stored, batch)
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-6)
  back = order["logical"](stored)
  assert jax.tree.structure(back) == jax.tree.structure(logical)
  jax.tree_util.tree_map_with_path(lambda path, a, b: np.testing.assert_allclose(
      a, b, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path)), back, logical)
  # Every entry outside the base moved: the motivated model trained.
  moved = nesting.extension_blocks(back.params, wmap.params)
  start = nesting.extension_blocks(_fresh(pair, optimizer).params, wmap.params)
  assert all(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(moved), jax.tree.leaves(start)))


def test_a_state_in_the_wrong_layout_is_refused_in_one_line(pair):
  model, optimizer, wmap, batch = pair
  blocks = steps.make_train_steps(model, optimizer, wmap=wmap, state_layout="blocks")
  with pytest.raises(ValueError, match="reads the state in blocks order, got one in logical"):
    blocks["motivated"](_fresh(pair), batch)
  in_place = steps.make_train_steps(model, optimizer, wmap=wmap)
  stored = steps.make_order_converters(optimizer, wmap=wmap, state_layout="blocks")[
      "storage"](_fresh(pair))
  for kind in ("base", "motivated"):
    with pytest.raises(ValueError, match="got one in the blocks layout"):
      in_place[kind](stored, batch)
  with pytest.raises(ValueError, match="state_layout must be one of"):
    steps.make_train_steps(model, optimizer, wmap=wmap, state_layout="apart")


def test_blocks_split_over_devices_are_refused_in_one_line(pair):
  model, optimizer, wmap, batch = pair
  mesh_config = load_default_config().mesh
  mesh_config.data, mesh_config.fsdp = 1, len(jax.devices())
  mesh = sharding.make_mesh(mesh_config)
  layout = sharding.train_state_sharding(_fresh(pair), mesh, min_bytes=0)
  with pytest.raises(ConfigError, match="FSDP"):
    steps.make_train_steps(model, optimizer, wmap=wmap, state_sharding=layout,
                           state_layout="blocks")
  config = load_default_config()
  config.model.state_layout = "blocks"
  config.mesh.fsdp = 2
  with pytest.raises(ConfigError, match="^config.model.state_layout='blocks' does not split"):
    run_checks.check_config(config)
  config.model.state_layout = "apart"
  with pytest.raises(ConfigError, match="^config.model.state_layout must be one of"):
    run_checks.check_config(config)


def _config(state_layout: str):
  config = load_default_config()
  config.progress_bar = False
  config.num_epochs = 2
  config.checkpoint_every_epochs = 1
  config.bn_recalibration_batches = 2
  config.model.module = "examples.byom_models:MLP"
  config.model.base = {"widths": (16,)}
  config.model.motivated = {"widths": (32,)}
  config.model.state_layout = state_layout
  return config


def _last_evaluation(workdir) -> dict:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return json.loads([line for line in lines if "base/test_loss" in line][-1])


@pytest.fixture(scope="module")
def blocks_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("blocks_run")
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)  # no donation JAX could not use
    summary = train.train_and_evaluate(_config("blocks"), str(workdir))
  return workdir, summary


def test_a_run_in_blocks_trains_both_models_and_checkpoints_logical_order(blocks_run):
  workdir, summary = blocks_run
  assert summary["base_steps"] > 0 and summary["motivated_steps"] > 0
  assert summary["base/test_accuracy"] > 0.5 and summary["motivated/test_accuracy"] > 0.5
  # The same decisions and nearly the same models as the in-place layout: its
  # base steps differ from the ordinary step in the last bits of AdamW's
  # moments, which the blocks' base step does not.
  in_place = train.train_and_evaluate(_config("in_place"), str(workdir.parent / "in_place"))
  assert in_place["base_steps"] == summary["base_steps"]
  ours, theirs = _last_evaluation(workdir), _last_evaluation(workdir.parent / "in_place")
  for key in ("base/test_loss", "motivated/test_loss"):
    assert ours[key] == pytest.approx(theirs[key], rel=1e-4)
  for key in ("base/test_accuracy", "motivated/test_accuracy"):
    assert abs(summary[key] - in_place[key]) <= 1 / summary["test_examples"]


def test_a_resumed_run_in_blocks_is_bit_identical(blocks_run, tmp_path):
  workdir, summary = blocks_run
  copy = tmp_path / "resumed"
  shutil.copytree(workdir, copy)
  saved = sorted(int(d) for d in os.listdir(copy / "checkpoints") if d.isdigit())
  shutil.rmtree(copy / "checkpoints" / str(saved[-1]))  # as if killed after epoch 1
  resumed = train.train_and_evaluate(_config("blocks"), str(copy))
  assert resumed["resumed_from_step"] == saved[0]
  assert (copy / "decisions.jsonl").read_text() == (workdir / "decisions.jsonl").read_text()
  assert _last_evaluation(copy) == _last_evaluation(workdir)


def test_a_run_in_blocks_exports_the_base_that_was_evaluated(blocks_run, tmp_path):
  workdir, summary = blocks_run
  export_run(str(workdir), "base", str(tmp_path / "out"))
  module, variables, _ = models.load_exported(str(tmp_path / "out"))
  assert isinstance(module, MLP) and module.widths == (16,)
  digits = data.get_dataset("digits")
  test = data.EvalBatches(digits, len(digits.test), normalise_on_host=True)[0]
  accuracy = float(np.mean(np.argmax(module.apply(variables, test["image"]), -1)
                           == test["label"]))
  assert accuracy == pytest.approx(summary["base/test_accuracy"], abs=1e-6)


def test_a_run_in_blocks_resumes_in_place(blocks_run, tmp_path):
  """The checkpoint holds logical order in either layout: the layout may change on resume."""
  workdir, summary = blocks_run
  copy = tmp_path / "resumed_in_place"
  shutil.copytree(workdir, copy)
  saved = sorted(int(d) for d in os.listdir(copy / "checkpoints") if d.isdigit())
  shutil.rmtree(copy / "checkpoints" / str(saved[-1]))
  resumed = train.train_and_evaluate(_config("in_place"), str(copy))
  assert resumed["resumed_from_step"] == saved[0]
  assert resumed["base_steps"] + resumed["motivated_steps"] == (
      summary["base_steps"] + summary["motivated_steps"])
  assert resumed["base/test_accuracy"] > 0.5 and resumed["motivated/test_accuracy"] > 0.5


def test_the_pure_steps_compose_in_a_users_own_jit(pair):
  model, optimizer, wmap, batch = pair
  pure = steps.make_train_steps(model, optimizer, wmap=wmap, seed=1, state_layout="blocks",
                                jit=False)
  compiled = steps.make_train_steps(model, optimizer, wmap=wmap, seed=1, state_layout="blocks")
  order = steps.make_order_converters(optimizer, wmap=wmap, state_layout="blocks")
  mine = order["storage"](_fresh(pair))
  theirs = jax.tree.map(jnp.copy, mine)
  for kind in ("base", "motivated", "base"):
    mine, _ = jax.jit(pure[kind])(mine, batch)  # the whole BlockState in and out
    theirs, _ = compiled[kind](theirs, batch)
  assert _equal(mine, theirs) == []


@pytest.mark.slow  # two processes, twice: about 40 s on 2 cores
def test_two_processes_train_in_blocks_as_in_place(tmp_path):
  """Data parallel over two processes: the blocks replicated on every device,
  the same decisions, losses and accuracies as in place (SGD: no moments whose
  last bits the in-place base step rounds differently)."""
  runs = {}
  for layout in ("blocks", "in_place"):
    workdir = tmp_path / layout
    result = two_process_run(str(workdir), str(tmp_path / f"logs_{layout}"),
                             overrides=(f"--config.model.state_layout={layout}",))
    check_two_process_run(*result, workdir_files=lambda name: (workdir / name).read_text())
    runs[layout] = ((workdir / "decisions.jsonl").read_text(),
                    json.loads((workdir / "summary.json").read_text()))
  assert runs["blocks"][0] == runs["in_place"][0]
  for key in ("base/test_accuracy", "motivated/test_accuracy", "base_steps"):
    assert runs["blocks"][1][key] == runs["in_place"][1][key]
