"""Shared test fixtures and the test-wide compile settings.

XLA's compile time is most of this suite's time, so, set here once and
inherited by the subprocesses tests start:

- ``JAX_DISABLE_MOST_OPTIMIZATIONS``: XLA's CPU backend compiles at LLVM's
  lowest optimisation level. Values are the same; so are XLA's FLOP counts,
  since the HLO passes that fuse and simplify still run (checked for every case
  of test_step_costs.py: equal with and without), and the FLOPs tests
  compare programs compiled alike anyway;
- ``--xla_cpu_use_fusion_emitters=false``: XLA's CPU backend emits its loop
  fusions with the older elemental emitter instead of the MLIR fusion emitters,
  which takes a third to a half of the compile time of every step here (e.g.
  conftest's EfficientNet train step, 4.2 s -> 1.4 s). Values agree to float
  rounding; XLA's FLOP counts differ by under 0.05% (the FLOPs tests compare
  programs compiled alike anyway). A test about the program the default flags
  compile passes ``DEFAULT_COMPILER``, which puts the emitters back for one
  compile. ``xla_flags(devices)`` gives a subprocess these flags;
- a persistent compilation cache under ``.pytest_cache/``, so a program compiled
  again (each ``train_and_evaluate`` builds new jitted functions; a second run
  of the suite) is read back instead. Workers share it; an entry is written in
  place, but compressed, so one read half-written fails to decompress and JAX
  warns and compiles instead.
"""

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def _xla_knows_the_emitter_flag() -> bool:
  """Whether this jaxlib's XLA has ``--xla_cpu_use_fusion_emitters`` (JAX 0.10
  does; the XLA of JAX 0.12 aborts on it as an unknown flag). Asked once, of a
  subprocess, for a JAX other than 0.10; the answer goes to the workers and the
  subprocesses through the environment."""
  known = os.environ.get("MOTIVATION_JAX_TEST_EMITTER_FLAG")
  if known is None:
    from importlib.metadata import version
    if version("jax").startswith("0.10."):
      known = "1"
    else:
      probe = subprocess.run(
          [sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
          env={**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": "--xla_cpu_use_fusion_emitters=false"}, timeout=120)
      known = "1" if probe.returncode == 0 else "0"
    os.environ["MOTIVATION_JAX_TEST_EMITTER_FLAG"] = known
  return known == "1"


# Flags that cut XLA's CPU compile time without changing what is computed
# (none where this XLA no longer has the flag: the tests then compile as a run does).
COMPILE_FLAGS = "--xla_cpu_use_fusion_emitters=false" if _xla_knows_the_emitter_flag() else ""
# ``.compile(compiler_options=DEFAULT_COMPILER)``: this one program as the default
# flags compile it (per-compile options override XLA_FLAGS).
DEFAULT_COMPILER = {"xla_cpu_use_fusion_emitters": True} if COMPILE_FLAGS else {}


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a subprocess with ``devices`` CPU devices."""
  return f"--xla_force_host_platform_device_count={devices} {COMPILE_FLAGS}"


# Before JAX starts: CPU runs with several devices for sharding tests.
os.environ.setdefault("XLA_FLAGS", xla_flags(4))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(ROOT, ".pytest_cache", "xla-compilation-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Before google-auth and gcsfs load (they read these at import): nothing asks
# Google's metadata server (a link-local address, off this machine) for
# credentials, and gcsfs does not probe a bucket's type over gRPC. Only
# test_gcs_workdir.py touches a bucket, its emulator's on loopback.
os.environ["NO_GCE_CHECK"] = "true"
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

from motivation_jax import config_lib, nesting, steps  # noqa: E402
from motivation_jax.models import (NestedEfficientNet, NestedMLP, NestedResNet,  # noqa: E402
                                   NestedViT)


# The costliest test files, most first, as xdist hands them out (`-n auto --dist
# loadfile` gives the workers files in collection order; setup.cfg turns off
# xdist's own order, by test count): the long ones first, so the workers finish
# together instead of one waiting for another's last long file.
# Fast loop (seconds in one process from a cold compile cache on a 2-core CPU:
# 76, 22, 21, 21, 21, 19, 18, 17, 16, 16, 15, 15, 14, 13, 13, 11; the other files
# take under 7 each; test_benchmark_harness.py's 21 timed alone, cold, once its
# item-6 test came; test_paired.py's 45 and test_paired_run.py's 16 alone, warm cache):
COSTLIEST_FILES = (
    "test_steps.py", "test_paired.py", "test_configs.py", "test_step_costs.py",
    "test_data_workers.py",
    "test_benchmark_harness.py", "test_recalibration.py", "test_bad_input.py",
    "test_transformer.py", "test_generate.py", "test_lm_run.py", "test_compilation.py",
    "test_tasks.py", "test_train.py", "test_resnet.py", "test_reliability.py", "test_cost_table.py",
    "test_experiments.py", "test_fsdp.py", "test_export.py", "test_launch.py",
    "test_nesting.py")
# With the slow tests (`-m ""`, what CI runs; seconds per file on one of 2 workers
# from a cold cache, fresh clone, AMD EPYC, 2026-12-03, pytest 9 min 34 s in all:
# 247, 99, 90, 71, 60, 46, 43, 42, 37, 34, 30, 22, 22, 22, 21, 20, 19, 18, 17, 16, 13, 13, 13, 13;
# the other files 12 s or less each). The fast order would send the slow-only files last.
COSTLIEST_FILES_WITH_SLOW = (
    "test_configs.py", "test_steps.py", "test_fsdp.py", "test_command_line_fuzz.py",
    "test_reliability.py", "test_train.py", "test_gcs_workdir.py", "test_paired.py",
    "test_data_workers.py", "test_multiprocess.py", "test_clean_exit.py",
    "test_step_costs.py", "test_bad_input.py", "test_launch.py", "test_paired_run.py",
    "test_mixed_precision.py", "test_lease.py", "test_cost_table.py",
    "test_benchmark_harness.py", "test_experiments.py", "test_export.py",
    "test_lm_run.py", "test_recalibration.py", "test_resnet.py")


@pytest.hookimpl(trylast=True)  # after `-m` has deselected: order what runs
def pytest_collection_modifyitems(items):
  slow = any(item.get_closest_marker("slow") for item in items)
  rank = {name: i for i, name in enumerate(COSTLIEST_FILES_WITH_SLOW if slow
                                               else COSTLIEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


def run_launcher(args, *, timeout, env=None):
  """Runs a command in its own process group; on a timeout kills the group (the
  launcher and every process it started) and fails. The launcher's processes
  run this interpreter (``PYTHON``, which launch/local.sh reads), not whatever
  ``python3`` or the checkout's .venv is: the suite passes from any environment
  that has the package and its test extra."""
  proc = subprocess.Popen(args, cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, err = proc.communicate()
    pytest.fail(f"{' '.join(args)} did not finish within {timeout} s (a hang?)\n"
                f"stdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}", pytrace=False)
  return proc.returncode, out, err


@contextlib.contextmanager
def cpu_load(processes: int = 1):
  """Busy processes beside the test (each keeps a core busy until the block ends)."""
  burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
             for _ in range(processes)]
  try:
    yield
  finally:
    for burner in burners:
      burner.kill()
      burner.wait()


# A 2-process run of launch/local.sh that costs little besides starting and
# ending: a small MLP pair on digits (22 batches an epoch), a checkpoint each epoch.
SMALL_MLP = ["--config.model.name=mlp", "--config.model.base={'widths': (16,)}",
             "--config.model.motivated={'widths': (32,)}"]


def two_process_run(workdir: str, log_dir: str, *, epochs: int = 2, timeout: int = 300,
                    overrides: tuple[str, ...] = ()):
  """``launch/local.sh 2`` of configs/default.py with ``SMALL_MLP`` (and
  ``overrides``, more ``--config.*`` flags); returns (status, process 0's stdout,
  its stderr, process 1's log)."""
  status, out, err = run_launcher(
      ["bash", os.path.join(ROOT, "launch", "local.sh"), "2",
       f"--config={os.path.join(ROOT, 'configs', 'default.py')}", f"--workdir={workdir}",
       f"--config.num_epochs={epochs}", "--config.checkpoint_every_epochs=1",
       "--config.progress_bar=False", *SMALL_MLP, *overrides],
      timeout=timeout, env={"LOG_DIR": log_dir, "PYTHON": sys.executable})
  path = os.path.join(log_dir, "process_1.log")
  process_1 = open(path).read() if os.path.exists(path) else ""
  return status, out, err, process_1


def check_two_process_run(status, out, err, process_1, *, workdir_files):
  """Both processes exited 0 after the explicit end; process 0 alone wrote the
  summary, once; each printed its table once."""
  assert status == 0, out[-2000:] + err[-3000:] + process_1[-3000:]
  for text in (err, process_1):
    assert "Fatal Python error" not in text and "Aborted" not in text, text[-3000:]
    assert "warning: not every process" not in text, text[-3000:]
  for text in (out, process_1):
    assert text.count("training FLOPs:") == 1, text[-3000:]
  summary = json.loads(workdir_files("summary.json"))
  decisions = workdir_files("decisions.jsonl").splitlines()
  assert len(decisions) == summary["base_steps"] + summary["motivated_steps"]


# Summary keys that record how a run went on this machine, not what it trained:
# its wall time and what it compiled or read from the compilation cache.
HOW_IT_RAN = ("wall_time_s", "compilation")


def what_it_trained(summary: dict, *also: str) -> dict:
  """``summary`` without ``HOW_IT_RAN`` (and ``also``): what two runs that trained
  alike have in common."""
  return {k: v for k, v in summary.items() if k not in HOW_IT_RAN + also}


def load_script(path: str):
  """A script outside the package (e.g. ``benchmarks/cost_table.py``) as a module."""
  import importlib.util
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_default_config():
  """``configs/default.py``'s ``get_config()`` (configs/ is not a package)."""
  return config_lib.load_config_file(os.path.join(ROOT, "configs", "default.py"))


def apply(model, variables, x, **kwargs):
  """``model.apply`` compiled as one program (eager op-by-op dispatch is slow on CPU);
  a call with an equal module and arguments reuses the compiled program."""
  frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))
  return _jitted_apply(model, frozen)(variables, x)


@functools.cache
def _jitted_apply(model, frozen_kwargs):
  kwargs = dict(frozen_kwargs)
  return jax.jit(lambda v, x: model.apply(v, x, **kwargs))


def make_batch(n: int = 16, hw: int = 8, seed: int = 0, channels: int = 1) -> dict:
  rng = np.random.default_rng(seed)
  return {"image": jnp.asarray(rng.normal(size=(n, hw, hw, channels)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, 10, size=(n,)), jnp.int32)}


MODELS = {
    "mlp": lambda: NestedMLP(base_widths=(16, 24), motivated_widths=(32, 48, 40),
                             num_classes=10),
    "cnn": lambda: NestedResNet(base_widths=(4, 8), base_depths=(1, 1),
                             motivated_widths=(8, 16), motivated_depths=(2, 3),
                             num_classes=10),
    "resnet_imagenet": lambda: NestedResNet(base_widths=(4, 8), base_depths=(1, 1),
                                            motivated_widths=(8, 16), motivated_depths=(2, 2),
                                            num_classes=10, stem="imagenet"),
    # Two stages of MBConv (expand 1 and 4), wider stem/head and one extra block.
    "efficientnet": lambda: NestedEfficientNet(
        base_stem=4, base_widths=(4, 8), base_depths=(1, 1), base_head=8,
        motivated_stem=8, motivated_widths=(8, 12), motivated_depths=(1, 2), motivated_head=16,
        num_classes=10, blocks=((1, 3, 1), (4, 3, 2))),
    "vit": lambda: NestedViT(base_dim=16, base_heads=2, base_mlp_dim=32, base_depth=1,
                             motivated_dim=24, motivated_heads=3, motivated_mlp_dim=48,
                             motivated_depth=2, num_classes=10, patch_size=4, head_dim=8),
}


@pytest.fixture(params=sorted(MODELS))
def model_name(request):
  return request.param


@pytest.fixture
def model(model_name):
  return MODELS[model_name]()


@pytest.fixture
def batch():
  return make_batch()


def reference_step(module, optimizer, variables, opt_state, batch):
  """One ordinary train step of a plain Flax model, written independently
  (with the same metrics as ours: loss and accuracy)."""
  def loss(p):
    logits, new = module.apply({"params": p, "batch_stats": variables["batch_stats"]},
                               batch["image"], train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, (logits, new.get("batch_stats", {}))
  (loss, (logits, stats)), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
  updates, opt_state = optimizer.update(grads, opt_state, variables["params"])
  # A train step that reports accuracy computes the logits' argmax as well.
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
  return ({"params": optax.apply_updates(variables["params"], updates), "batch_stats": stats},
          opt_state, loss, accuracy)


def randomise(variables, seed=3):
  """Perturbs every leaf (batch stats too), so that tests of them can fail."""
  rng = np.random.default_rng(seed)  # numpy: no XLA compile per leaf shape
  return jax.tree.map(lambda x: x + jnp.asarray(0.1 * rng.uniform(size=x.shape), x.dtype),
                      variables)


def check_export_matches_standalone(model, x, *, rtol=1e-5, atol=1e-5):
  """``export(variables, "base")`` in the standalone base gives the nested base's
  logits (eval and train mode) and the same batch-stat updates."""
  variables = randomise(nesting.init_variables(model, jax.random.key(1), x))
  wmap = nesting.weights_map(model, x, subnet="motivated")
  exported = nesting.export(variables, "base", wmap)
  standalone = model.standalone("base")
  # The standalone module's own init has exactly the exported structure and shapes.
  expected = jax.eval_shape(lambda: standalone.init(jax.random.key(1), x, subnet="motivated"))
  assert jax.tree.map(jnp.shape, exported) == jax.tree.map(lambda s: s.shape, expected)
  for train in (False, True):
    nested, nested_stats = apply(model, variables, x, subnet="base", train=train,
                                 mutable=("batch_stats",))
    alone, alone_stats = apply(standalone, exported, x, subnet="motivated", train=train,
                               mutable=("batch_stats",))
    np.testing.assert_allclose(nested, alone, rtol=rtol, atol=atol)
    if train and "batch_stats" in variables:
      # The nested base updates exactly the base slice of the running statistics.
      got = nesting.export({"batch_stats": nested_stats["batch_stats"]}, "base", wmap)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol),
                   got["batch_stats"], alone_stats["batch_stats"])


def check_step_flops(model, batch, *, optimizer=None, max_base_fraction=0.6):
  """Each compiled train step costs (XLA FLOPs, within 5%) what an ordinary step
  of the standalone model of that size costs, and the base is really cheaper.

  XLA's cost analysis charges the in-place write-back of the base region a few
  FLOPs per element of the whole leaf (~5 per parameter with AdamW), an
  accounting cost, not arithmetic. It is independent of the batch size, so at a
  real batch size (128) it is well under 5% even for tiny models.
  """
  optimizer = optimizer or optax.adamw(1e-2, weight_decay=0.1)
  state = steps.create_train_state(model, optimizer, jax.random.key(0), batch["image"])
  wmap = nesting.weights_map(model, batch["image"], subnet="motivated")
  fns = steps.make_train_steps(model, optimizer, wmap=wmap)
  flops = {}
  for subnet in ("base", "motivated"):
    standalone = model.standalone(subnet)
    variables = nesting.export(state.variables(subnet), subnet, wmap)
    variables.setdefault("batch_stats", {})
    opt_state = optimizer.init(variables["params"])
    reference = steps.compiled_flops(jax.jit(
        lambda v, o, b: reference_step(standalone, optimizer, v, o, b)).lower(
            variables, opt_state, batch).compile())
    flops[subnet] = steps.compiled_flops(fns[subnet].lower(state, batch).compile())
    assert reference > 0
    assert abs(flops[subnet] - reference) <= 0.05 * reference, (subnet, flops[subnet],
                                                                reference)
  # Not a masked full-width computation.
  assert flops["base"] < max_base_fraction * flops["motivated"], flops
  return flops
