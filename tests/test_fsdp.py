"""Sharded state: the ``data`` x ``fsdp`` mesh, the fsdp rule, steps and checkpoints.

The runs on 8 CPU devices happen in a subprocess (tests/fsdp_worker.py), since
this process has the 4 devices conftest asks for; the checkpoint saved there
(fsdp=8 on 8 devices) is resumed here (fsdp=2 on 4).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from motivation_jax import nesting, sharding, steps, train
from motivation_jax.errors import ConfigError

from conftest import MODELS, ROOT, load_default_config, load_script

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fsdp_worker.py")
TIMEOUT_S = 600


def run_worker(tmp_path, part: str, *args: str, devices: int = 8) -> dict:
  """Runs tests/fsdp_worker.py with ``devices`` CPU devices; its JSON output."""
  out = str(tmp_path / f"{part}.json")
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, WORKER, part, out, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=TIMEOUT_S)
  assert done.returncode == 0, done.stderr[-4000:]
  with open(out) as f:
    return json.load(f)


def test_the_fsdp_rule_splits_the_largest_dimension_that_divides():
  rule = lambda shape, fsdp, min_bytes=0: sharding.fsdp_spec(shape, 4, fsdp, min_bytes=min_bytes)
  assert rule((3, 3, 64, 128), 8) == P(None, None, None, "fsdp")
  assert rule((384, 6, 64), 8) == P("fsdp")
  assert rule((64, 64), 8) == P("fsdp")          # equal dims: the first
  assert rule((40, 12), 8) == P("fsdp")          # 40 divides, 12 does not
  assert rule((12, 40), 16) == P()               # nothing divides: replicated
  assert rule((), 8) == P()                      # a step count
  assert rule((1024, 1024), 1) == P()            # no fsdp axis
  # Small arrays stay replicated: 4 MiB by default, as big_vision's rule.
  assert rule((1024, 1024), 8, sharding.DEFAULT_FSDP_MIN_MIB * 2**20) == P()
  assert rule((1024, 1025), 8, sharding.DEFAULT_FSDP_MIN_MIB * 2**20) == P("fsdp")


def test_the_mesh_has_data_and_fsdp_axes_and_batches_split_over_both():
  assert jax.device_count() == 4  # conftest
  mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "fsdp_min_mib": 4.0})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2}
  assert mesh.devices.flatten().tolist() == jax.devices()  # process order, fsdp fastest
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
  assert dict(sharding.data_mesh().shape) == {"data": 4, "fsdp": 1}
  sharding.check_batch_size("batch_size", 8, mesh)
  with pytest.raises(ConfigError, match="config.batch_size=6 does not divide among the 4 "):
    sharding.check_batch_size("batch_size", 6, mesh)


@pytest.mark.parametrize("mesh, message", [
    ({"fsdp": 3}, r"^config.mesh.fsdp=3 does not divide the 4 devices; use a divisor of 4$"),
    ({"data": 2, "fsdp": 1}, r"^config.mesh.data=2 x config.mesh.fsdp=1 is 2 devices, but "
                             r"there are 4; set config.mesh.data=-1"),
    ({"data": 4, "fsdp": 2}, r"is 8 devices, but there are 4"),
    ({"fsdp": 0}, r"^config.mesh.fsdp must be an integer >= 1, got 0$"),
    ({"data": 0}, r"^config.mesh.data must be an integer >= 1, or -1"),
    ({"fsdp_min_mib": -1.0}, r"^config.mesh.fsdp_min_mib must be a finite number >= 0"),
])
def test_a_mesh_that_does_not_fit_is_refused_in_one_line(mesh, message):
  config = load_default_config()
  config.mesh.update(mesh)
  with pytest.raises(ConfigError, match=message):
    train.check_config(config)  # what no device count fits, before any work
    sharding.make_mesh(config.mesh)  # what does not fit this run's devices (train.setup)


def test_the_default_mesh_is_data_parallel_over_every_device():
  config = load_default_config()
  train.check_config(config)
  assert sharding.mesh_shape(config.mesh, jax.device_count()) == (4, 1)


def _check_equivalence(results: dict, model_names, fsdps) -> None:
  """Every run matches one device, its state has the rule's layout throughout."""
  for name in model_names:
    for fsdp in fsdps:
      r = results[name][str(fsdp)]
      assert r["mesh"] == {"data": 8 // fsdp, "fsdp": fsdp}
      assert r["step"] == 3
      np.testing.assert_allclose(r["losses"], r["expected_losses"], rtol=1e-5)
      for field, diff in r["diff"].items():
        assert diff < 1e-5, (name, fsdp, field, diff)
      assert r["created_in_layout"] and r["kept_layout"], (name, fsdp)
      # The steps ran on the storage order wherever the layout interleaves a leaf.
      interleaved = any(d is not None for d in r["interleaved"].values())
      assert r["order"] == ("storage" if interleaved else "logical"), (name, fsdp)
      assert (r["permuted_leaves"] > 0) == interleaved, (name, fsdp)
      if fsdp == 1:
        assert not interleaved
      for path, leaf in r["params"].items():
        expected = sharding.fsdp_spec(tuple(leaf["shape"]), 4, fsdp, min_bytes=0)
        assert P(*leaf["spec"]) == expected, (name, fsdp, path)
      # Parameter-shaped optimizer leaves take their parameter's layout; counts
      # are replicated; batch-norm statistics are replicated.
      for shape, spec in zip(r["opt_state_shapes"], r["opt_state_specs"]):
        assert P(*spec) == sharding.fsdp_spec(tuple(shape), 4, fsdp, min_bytes=0)
      assert all(spec == [] for spec in r["batch_stats_specs"])
      if fsdp > 1:  # the tests' models do split
        assert any(leaf["spec"] for leaf in r["params"].values())


def test_fsdp_8_gives_the_parameters_of_one_device_after_steps_of_both_kinds(tmp_path):
  results = run_worker(tmp_path, "equivalence", "mlp", "8")
  _check_equivalence(results, ["mlp"], [8])
  # The MLP's leaves take every path of nesting's sharded slices: stored
  # interleaved (the split dim, or None: in logical order).
  params, interleaved = results["mlp"]["8"]["params"], results["mlp"]["8"]["interleaved"]
  assert params["['hidden_1']['kernel']"]["spec"] == [None, "fsdp"]
  assert interleaved["['hidden_1']['kernel']"] == 1  # 24 of 48: 3 base rows of 6 a device
  assert params["['head']['kernel']"]["spec"] == ["fsdp"]
  assert interleaved["['head']['kernel']"] == 0      # 24 of 40: 3 of 5
  assert params["['hidden_0']['bias']"]["spec"] == ["fsdp"]
  assert interleaved["['hidden_0']['bias']"] is None  # 12 of 32: 8 does not divide 12
  assert params["['hidden_0']['kernel']"]["spec"] == ["fsdp"]
  assert interleaved["['hidden_0']['kernel']"] is None  # 64 inputs: not sliced


@pytest.mark.slow
def test_fsdp_2_and_8_give_the_parameters_of_one_device_for_every_family(tmp_path):
  # fsdp=1 is plain data parallelism (most other runs), 4 the transformer's in
  # test_tasks.py; 2 and 8 take the most and the fewest rows a device.
  results = run_worker(tmp_path, "equivalence", "mlp,cnn,vit", "2,8")
  _check_equivalence(results, ["mlp", "cnn", "vit"], [2, 8])


@pytest.mark.slow
def test_policy_both_under_fsdp_gives_the_parameters_of_one_device(tmp_path):
  results = run_worker(tmp_path, "equivalence", "cnn", "2,8", "both")
  _check_equivalence(results, ["cnn"], [2, 8])


def test_the_base_step_moves_what_the_standalone_base_step_moves():
  """Counted in the compiled programs (fsdp=4 on this process's 4 devices): in
  storage order the base step's views and write-backs are local, so it moves
  exactly the standalone base's gathers and reductions, byte for byte and op
  for op; the motivated step undoes the interleaving on its gathered copy
  (local too: no permutes). docs/sharding.md, "Storage order"."""
  collectives = load_script("benchmarks/fsdp_collectives.py").collectives
  model = MODELS["mlp"]()
  optimizer = optax.sgd(0.1, momentum=0.9)  # one parameter-shaped leaf per parameter
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "fsdp_min_mib": 0.0})
  batch_sharding = sharding.batch_sharding(mesh)
  batch = {"image": jax.ShapeDtypeStruct((16, 8, 8, 1), jnp.float32, sharding=batch_sharding),
           "label": jax.ShapeDtypeStruct((16,), jnp.int32, sharding=batch_sharding)}

  def moved(module, kind):
    sample = jnp.zeros((1, 8, 8, 1), jnp.float32)
    abstract = steps.abstract_train_state(module, optimizer, sample)
    layout = sharding.train_state_sharding(abstract, mesh, min_bytes=0)
    wmap = nesting.weights_map(module, sample, subnet="motivated")
    fn = steps.make_train_steps(module, optimizer, wmap=wmap, state_sharding=layout,
                                batch_sharding=batch_sharding)[kind]
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         abstract, layout).replace(order=steps.stored_order(layout, wmap))
    hlo = fn.lower(state, batch).compile().as_text()
    return {**collectives(hlo, 4), "copies": hlo.count(" copy(")}, wmap

  nested, wmap = moved(model, "base")
  alone, _ = moved(model.standalone("base"), "motivated")
  # In-place writes of the shards ordered after the reads (nesting.write_after):
  # no more buffer copies than the standalone base's step (20 against 15 without).
  assert nested.pop("copies") <= alone.pop("copies")
  assert nested == alone
  assert nested["all-gather"]["bytes"] > 0 and nested["collective-permute"]["ops"] == 0
  motivated, _ = moved(model, "motivated")
  motivated.pop("copies")
  assert motivated["collective-permute"]["ops"] == motivated["all-to-all"]["ops"] == 0
  assert motivated["all-gather"]["bytes"] > nested["all-gather"]["bytes"]


def test_the_steps_of_a_storage_layout_refuse_a_state_in_logical_order():
  model = MODELS["mlp"]()
  optimizer = optax.sgd(0.1, momentum=0.9)
  sample = jnp.zeros((1, 8, 8, 1), jnp.float32)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "fsdp_min_mib": 0.0})
  abstract = steps.abstract_train_state(model, optimizer, sample)
  layout = sharding.train_state_sharding(abstract, mesh, min_bytes=0)
  wmap = nesting.weights_map(model, sample, subnet="motivated")
  assert steps.stored_order(layout, wmap) == "storage"
  pure = steps.make_train_steps(model, optimizer, wmap=wmap, state_sharding=layout, jit=False)
  batch = {"image": sample, "label": jnp.zeros((1,), jnp.int32)}
  for kind, fn in pure.items():
    with pytest.raises(ValueError, match="reads the state in storage order, got one in logical"):
      jax.eval_shape(fn, abstract, batch)
  from motivation_jax import recalibration
  recalibrate = recalibration.make_recalibrate(model, wmap)
  with pytest.raises(ValueError, match="logical order, got one in storage"):
    recalibrate(abstract.replace(order="storage"), [])
  # Moments in another layout than their parameter's would be in another order.
  bad = layout.replace(opt_state=jax.tree.map(lambda _: sharding.replicated(mesh),
                                              layout.opt_state))
  with pytest.raises(ValueError, match="its parameter as"):
    steps.make_train_steps(model, optimizer, wmap=wmap, state_sharding=bad)


def _resume_config(fsdp: int, num_epochs: int) -> dict:
  config = load_default_config()
  config.model.name = "mlp"
  config.model.base = {"widths": (16, 24)}
  config.model.motivated = {"widths": (32, 48, 40)}
  config.batch_size, config.eval_batch_size = 128, 120  # both divide among 8 devices
  config.num_epochs, config.checkpoint_every_epochs = num_epochs, 1
  config.bn_recalibration_batches = 0
  config.data_threads, config.progress_bar = 0, False
  config.motivation.condition, config.motivation.every_n.n = "every_n", 2
  config.mesh.update({"fsdp": fsdp, "fsdp_min_mib": 0.0})
  return config


def test_a_checkpoint_saved_with_fsdp_8_on_8_devices_resumes_with_fsdp_2_on_4(tmp_path):
  workdir = str(tmp_path / "run")
  saved = run_worker(tmp_path, "train", json.dumps(
      {"config": _resume_config(8, 1).to_dict(), "workdir": workdir}))
  assert saved["devices"] == 8 and saved["restored"]["mesh"] == {"data": 1, "fsdp": 8}
  assert ["fsdp"] in saved["restored"]["params_specs"]
  final = np.load(str(tmp_path / "train.json") + ".final.npz")

  config = _resume_config(2, 2)
  run, state = train.setup(config, workdir)
  steps_per_epoch = run.train_data.steps_per_epoch
  assert run.first_step == int(state.step) == steps_per_epoch
  restored = jax.tree.leaves(state.params)
  for i, x in enumerate(restored):  # bit-identical, in this run's layout
    np.testing.assert_array_equal(np.asarray(x), final[f"arr_{i}"])
  layout = sharding.train_state_sharding(
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state),
      sharding.make_mesh(config.mesh), min_bytes=0)
  for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(layout)):
    assert x.sharding == s
  assert any(s.spec for s in jax.tree.leaves(layout.params))
  state, metrics = train.train(run, state)
  run.close()
  assert int(state.step) == 2 * steps_per_epoch
  assert 0 <= metrics["base/test_accuracy"] <= 1
