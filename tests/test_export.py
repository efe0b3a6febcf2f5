"""Deploying one sub-network: ``python -m motivation_jax.export``."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from motivation_jax import data, train
from motivation_jax.errors import CheckpointError, ConfigError
from motivation_jax.export import export_run
from motivation_jax.models import load_exported

from conftest import ROOT, load_default_config

# Runs in a fresh interpreter with only the model's module, flax and orbax: it
# reads model.json, rebuilds the module, restores the variables and prints the
# test accuracy, and which of our training modules got imported.
LOADER = r"""
import importlib, json, sys
import jax, numpy as np, orbax.checkpoint as ocp
out, images, labels = sys.argv[1], np.load(sys.argv[2]), np.load(sys.argv[3])
spec = json.load(open(out + "/model.json"))
tuples = lambda v: tuple(map(tuples, v)) if isinstance(v, list) else v
cls = getattr(importlib.import_module(spec["module"]), spec["class"])
model = cls(**{k: tuples(v) for k, v in spec["kwargs"].items()})
variables = ocp.StandardCheckpointer().restore(out + "/variables")
p = spec["preprocess"]
x = (images.astype(np.float32) - np.float32(p["mean"])) / np.float32(p["std"])
logits = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
training = [m for m in ("motivation_jax.train", "motivation_jax.steps", "motivation_jax.nesting",
                        "motivation_jax.controller", "motivation_jax.data", "optax")
            if m in sys.modules]
print(json.dumps({"accuracy": float(np.mean(np.argmax(logits, -1) == labels)),
                  "training_modules": training}))
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A short run of the default config (residual CNNs with batch norm)."""
  workdir = tmp_path_factory.mktemp("run")
  config = load_default_config()
  config.progress_bar = False
  config.num_epochs = 2
  summary = train.train_and_evaluate(config, str(workdir))
  return workdir, summary


@pytest.mark.parametrize("subnet", ["base", "motivated"])
def test_an_exported_model_loads_without_the_training_code(run, subnet, tmp_path):
  workdir, summary = run
  out = tmp_path / "out"
  spec = export_run(str(workdir), subnet, str(out))
  assert spec["module"] == "motivation_jax.models.resnet"
  kwargs = spec["kwargs"]
  assert kwargs["base_widths"] == kwargs["motivated_widths"] == (
      [16, 32] if subnet == "base" else [32, 64])
  assert spec["params"] == summary["params"][subnet]
  assert spec["input_shape"] == [8, 8, 1] and spec["num_classes"] == 10
  test = data.get_dataset("digits").test
  np.save(tmp_path / "x.npy", test.images)
  np.save(tmp_path / "y.npy", test.labels)
  result = subprocess.run(
      [sys.executable, "-c", LOADER, str(out), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  loaded = json.loads(result.stdout.strip().splitlines()[-1])
  assert loaded["training_modules"] == []
  # The deployed model is the one the run evaluated (one example of 360 may
  # flip on a near-tie: the batch shapes, and so float summation, differ).
  assert abs(loaded["accuracy"] - summary[f"{subnet}/test_accuracy"]) <= 1 / 360 + 1e-9


def test_load_exported_gives_the_module_and_variables(run, tmp_path):
  workdir, _ = run
  export_run(str(workdir), "base", str(tmp_path / "out"))
  model, variables, spec = load_exported(str(tmp_path / "out"))
  assert model.stages("base") == ((16, 1), (32, 1))
  assert set(variables) == {"params", "batch_stats"}
  assert spec["subnet"] == "base"


def test_export_refuses_what_it_cannot_do_in_one_line(run, tmp_path):
  workdir, _ = run
  with pytest.raises(CheckpointError, match="no checkpoints in .*; train first"):
    export_run(str(tmp_path / "nothing"), "base", str(tmp_path / "a"))
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "keep.txt").write_text("mine")
  with pytest.raises(ConfigError, match="exists and is not empty"):
    export_run(str(workdir), "base", str(tmp_path / "full"))
  assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
  with pytest.raises(CheckpointError, match="no checkpoint of batch 3 in"):
    export_run(str(workdir), "base", str(tmp_path / "b"), step=3)


def test_the_command_line_exports_and_reports_errors_in_one_line(run, tmp_path):
  workdir, _ = run
  cmd = [sys.executable, "-m", "motivation_jax.export", f"--workdir={workdir}",
         "--subnet=motivated"]
  ok = subprocess.run([*cmd, f"--out={tmp_path / 'm'}"], capture_output=True, text=True,
                      cwd=ROOT, timeout=300)
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert "exported the motivated model" in ok.stdout
  assert os.path.exists(tmp_path / "m" / "model.json")
  bad = subprocess.run([*cmd, f"--out={tmp_path / 'm'}"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines() == [
      f"error: --out={tmp_path / 'm'} exists and is not empty; pick a new directory"]


def test_export_verifies_the_checksum_of_the_statistics_it_deploys(run, tmp_path):
  """Readable ``eval_stats`` that are not the ones saved (silent corruption) are
  refused, not deployed."""
  import shutil
  workdir = tmp_path / "run"
  shutil.copytree(run[0], workdir)
  step = max(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())
  path = workdir / "checkpoints" / str(step) / "checksum" / "metadata"
  checksum = json.loads(path.read_text())
  leaf = sorted(checksum["eval_stats"])[0]
  checksum["eval_stats"][leaf][0] ^= 1
  path.write_text(json.dumps(checksum))
  with pytest.raises(CheckpointError, match=rf"checkpoints/{step} is damaged \(its array "
                     rf"eval_stats/{leaf} does not match its checksum\)"):
    export_run(str(workdir), "base", str(tmp_path / "out"))
  assert not (tmp_path / "out" / "model.json").exists()
