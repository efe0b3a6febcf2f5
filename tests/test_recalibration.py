"""Batch-norm recalibration: the statistics, what it leaves alone, and a run that uses it."""

import json
import os

import flax.linen as nn
import flax.traverse_util
import jax
import numpy as np
import optax
import pytest

from motivation_jax import checkpoint, export, nesting, recalibration, run_setup, steps, train
from motivation_jax.models.layers import NestedBatchNorm

from conftest import MODELS, load_default_config, make_batch


def plain_moments(model, variables, images, subnet):
  """Every batch norm's input in a train-mode forward, reduced with numpy
  (two-pass variance): ``{module path + (mean|var,): array}``."""
  found = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, NestedBatchNorm) and context.method_name == "__call__":
      x = np.asarray(args[0], np.float64).reshape(-1, args[0].shape[-1])
      path = tuple(context.module.path)
      found[path + ("mean",)] = x.mean(0)
      found[path + ("var",)] = ((x - x.mean(0)) ** 2).mean(0)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply(variables, images, subnet=subnet, train=True, mutable=["batch_stats"])
  return found


@pytest.fixture(scope="module")
def trained():
  """A nested ResNet (base 2 of 5 blocks, half width) after 4 steps of each kind,
  and 3 calibration batches."""
  model = MODELS["cnn"]()
  batches = [make_batch(32, seed=s) for s in range(3)]
  sample = batches[0]["image"][:1]
  wmap = nesting.weights_map(model, sample, subnet="motivated")
  optimizer = optax.sgd(0.1, momentum=0.9)
  states = {}
  for mode in steps.BATCH_NORM_STATS:
    state = steps.create_train_state(model, optimizer, jax.random.key(0), sample,
                                     batch_norm_stats=mode)
    train_steps = steps.make_train_steps(model, optimizer, wmap=wmap)
    for t in range(8):
      state, _ = train_steps["base" if t % 2 else "motivated"](state, make_batch(32, seed=9 + t))
    states[mode] = state
  return model, wmap, states, batches


@pytest.mark.parametrize("mode", steps.BATCH_NORM_STATS)
def test_statistics_are_the_plain_average_of_each_subnets_batch_moments(trained, mode):
  model, wmap, states, batches = trained
  state = states[mode]
  before = jax.tree.map(np.asarray, state)
  stats = recalibration.make_recalibrate(model, wmap)(state, iter(batches))
  regions = flax.traverse_util.flatten_dict(wmap["batch_stats"])
  for subnet in ("base", "motivated"):
    expected = {}
    for b in batches:
      for path, value in plain_moments(model, state.variables(subnet), b["image"],
                                       subnet).items():
        expected[path] = expected.get(path, 0) + value / len(batches)
    got = flax.traverse_util.flatten_dict(stats[subnet])
    old = flax.traverse_util.flatten_dict(jax.tree.map(np.asarray,
                                                       before.subnet_stats(subnet)))
    assert set(got) == set(old)
    for path, value in got.items():
      if path in expected:  # a batch norm this sub-network runs: its leading slice
        width = expected[path].shape[0]
        np.testing.assert_allclose(value[:width], expected[path], rtol=2e-5, atol=1e-6)
        np.testing.assert_array_equal(value[width:], old[path][width:])
      else:  # a block only the motivated model has: not the base's to change
        assert subnet == "base" and not regions[path].in_base
        np.testing.assert_array_equal(value, old[path])
    assert len(expected) < len(got) if subnet == "base" else len(expected) == len(got)
  # Parameters, optimizer state and the running statistics are untouched.
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state), before)


def test_a_model_without_batch_norm_has_nothing_to_recalibrate():
  model = MODELS["mlp"]()
  b = make_batch(8)
  wmap = nesting.weights_map(model, b["image"][:1], subnet="motivated")
  state = steps.create_train_state(model, optax.sgd(0.1), jax.random.key(0), b["image"][:1])
  assert recalibration.make_recalibrate(model, wmap)(state, iter([b])) is None


def cnn_config(**overrides):
  config = load_default_config()
  config.progress_bar = False
  config.model.base = {"widths": (4, 8), "depths": (1, 1)}
  config.model.motivated = {"widths": (8, 16), "depths": (1, 2)}
  config.num_epochs = 1
  config.batch_size = 128  # 11 batches of digits
  config.log_every_steps = 5
  config.motivation.condition = "every_n"
  config.motivation.every_n.n = 3
  config.bn_recalibration_batches = 3
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The same small CNN run with recalibration (3 batches) and without."""
  out = {}
  for name, batches in (("on", 3), ("off", 0)):
    workdir = tmp_path_factory.mktemp(name)
    out[name] = workdir, train.train_and_evaluate(
        cnn_config(bn_recalibration_batches=batches), str(workdir))
  return out


def _checkpoint(workdir):
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  return ckpt, ckpt.latest_step()


def test_recalibration_changes_no_training_only_the_evaluation(runs):
  (on, summary_on), (off, summary_off) = runs["on"], runs["off"]
  assert open(on / "decisions.jsonl").read() == open(off / "decisions.jsonl").read()
  states = []
  for workdir in (on, off):
    ckpt, step = _checkpoint(workdir)
    states.append(ckpt.manager.restore(step, args=checkpoint.ocp.args.Composite(
        state=checkpoint.ocp.args.StandardRestore()))["state"])
    ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, *states)
  assert summary_on["bn_recalibration_batches"] == 3
  assert summary_off["bn_recalibration_batches"] == 0
  # Without recalibration the accuracies are the running averages' ones.
  evals = [json.loads(l) for l in open(on / "metrics.jsonl") if '"epoch"' in l]
  last_off = [json.loads(l) for l in open(off / "metrics.jsonl") if '"epoch"' in l][-1]
  for subnet in ("base", "motivated"):
    assert evals[-1][f"{subnet}/test_accuracy_running_stats"] == last_off[
        f"{subnet}/test_accuracy"]
    assert f"{subnet}/test_accuracy_running_stats" in summary_on
    assert f"{subnet}/test_accuracy_running_stats" not in summary_off


def test_a_checkpoints_statistics_are_recomputed_exactly_after_a_resume(runs):
  """The checkpoint keeps the recalibrated statistics; recalibrating its restored
  state (as a resumed run or an export would) gives the same bits."""
  workdir, _ = runs["on"]
  run, state = train.setup(cnn_config(), str(workdir))  # restores the checkpoint
  try:
    assert run.first_step == int(state.step) > 0
    saved = run.ckpt.restore_eval_stats(
        {s: jax.tree.map(np.asarray, state.subnet_stats(s)) for s in ("base", "motivated")},
        run.first_step)
    jax.tree.map(np.testing.assert_array_equal, run.recalibrate(state), saved)
  finally:
    run.close()


def test_small_calibration_batches_are_copied_once_and_give_the_same_bits(runs, monkeypatch):
  """Kept on the devices after the first recalibration (under
  ``CALIBRATION_CACHE_BYTES``), the calibration batches are not made or copied
  again, and the statistics are those of batches made afresh each time."""
  workdir, _ = runs["on"]
  run, state = train.setup(cnn_config(), str(workdir))
  try:
    config = cnn_config()
    model, wmap, _ = run_setup.build(config, run.dataset)
    # The batches' sharding, as setup lays them out (one device here: any rows).
    batch_sharding = jax.tree.leaves(run.put(run.train_data[0]))[0].sharding
    copies = []

    def counting_put(batch):
      copies.append(1)
      return run.put(batch)

    def make(cache_bytes):
      monkeypatch.setattr(run_setup, "CALIBRATION_CACHE_BYTES", cache_bytes)
      return run_setup.make_recalibrate(config, model, wmap, run.dataset, batch_sharding,
                                        counting_put)
    kept, streamed = make(run_setup.CALIBRATION_CACHE_BYTES), make(0)
    first = kept(state)
    assert len(copies) == 3
    again = kept(state)
    assert len(copies) == 3  # nothing made or copied the second time
    fresh = streamed(state), streamed(state)
    assert len(copies) == 9  # over the threshold: made and copied each time
    for other in (again, *fresh):
      jax.tree.map(np.testing.assert_array_equal, first, other)
  finally:
    run.close()


def test_export_deploys_the_recalibrated_statistics(runs, tmp_path):
  workdir, _ = runs["on"]
  ckpt, step = _checkpoint(workdir)
  saved = ckpt.manager.restore(step, args=checkpoint.ocp.args.Composite(
      eval_stats=checkpoint.ocp.args.StandardRestore()))["eval_stats"]
  ckpt.close()
  export.export_run(str(workdir), "base", str(tmp_path / "base"))
  deployed = checkpoint.ocp.StandardCheckpointer().restore(str(tmp_path / "base" / "variables"))
  flat = flax.traverse_util.flatten_dict(deployed["batch_stats"])
  full = flax.traverse_util.flatten_dict(saved["base"])
  assert flat
  for path, value in flat.items():
    np.testing.assert_array_equal(value, full[path][:value.shape[0]])
  spec = json.load(open(tmp_path / "base" / "model.json"))
  assert spec["batch_norm"] == "recalibrated on 3 training batches"
