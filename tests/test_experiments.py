"""The experiments command end to end: every arm over two seeds, reuse, resume, report."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from motivation_jax import config_lib, train
from motivation_jax.errors import ConfigError
from motivation_jax.experiments import suite

from conftest import ROOT

# A tiny MLP run on digits: 2 epochs of 11 batches, the condition firing on a
# loss that fell twice in a row.
TINY_CONFIG = f'''
import os
from motivation_jax import config_lib

def get_config():
  config = config_lib.load_config_file({os.path.join(ROOT, "configs", "default.py")!r})
  config.model.name = "mlp"
  config.model.base = {{"widths": (16,)}}
  config.model.motivated = {{"widths": (32, 32)}}
  config.optimizer = "adamw"
  config.learning_rate = 3e-3
  config.batch_size = 128
  config.num_epochs = 2
  config.log_every_steps = 5
  config.checkpoint_every_epochs = 1
  config.motivation.loss_streak.k = 2
  return config
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """``(config file, config, suite workdir, records, trained)``: both seeds of every
  arm, run once for the module; ``trained`` lists the (arm, seed) runs trained."""
  root = tmp_path_factory.mktemp("suite")
  path = root / "tiny.py"
  path.write_text(TINY_CONFIG)
  config = config_lib.load_config_file(str(path))
  trained = []

  def train_fn(c, directory):
    trained.append((os.path.basename(directory), c.seed))
    return train.train_and_evaluate(c, directory)

  workdir = root / "suite"
  records = suite.run_suite(config, [0, 1], str(workdir), train_fn=train_fn, log=lambda _: None)
  return path, config, workdir, records, trained


def test_every_arm_runs_for_every_seed_with_its_own_motivation(tiny):
  _, config, workdir, records, trained = tiny
  assert [(r["arm"], r["seed"]) for r in records] == [
      (arm, seed) for seed in (0, 1) for arm in suite.ARMS]
  assert len(trained) == 14
  by = {(r["arm"], r["seed"]): r for r in records}
  steps = 2 * (1437 // 128)
  for (arm, seed), r in by.items():
    s = r["summary"]
    batches = suite.matched_steps(by["motivated", seed]["summary"]) if (
        arm == "large_matched") else steps
    assert s["base_steps"] + s["motivated_steps"] == batches == len(r["decisions"])
    assert [d["step"] for d in r["decisions"]] == list(range(batches))
    assert all(isinstance(d["loss"], float) for d in r["decisions"])
    if arm != "large_matched":
      assert [e["epoch"] for e in r["evals"]] == [1, 2]
    saved = json.load(open(os.path.join(r["workdir"], "checkpoints", str(batches), "config",
                                        "metadata")))
    assert saved["seed"] == seed
  for seed in (0, 1):
    motivated = by["motivated", seed]["summary"]
    assert motivated["activations"] > 0
    assert by["base_alone", seed]["summary"]["motivated_steps"] == 0
    assert by["large_alone", seed]["summary"]["base_steps"] == 0
    # Experiment B: as many activations as the motivated run, elsewhere.
    replayed = by["random_times", seed]
    fired = [d["step"] for d in replayed["decisions"] if d["kind"] == "motivated"]
    assert len(fired) == motivated["activations"]
    assert fired != [d["step"] for d in by["motivated", seed]["decisions"]
                     if d["kind"] == "motivated"]
    # Experiment A: the motivated run's firing rate as the coin's p.
    rate = json.load(open(os.path.join(by["random_rate", seed]["workdir"], "checkpoints",
                                       str(steps), "config", "metadata")))["motivation"]
    assert rate["condition"] == "random" and rate["random"]["seed"] == seed
    assert rate["random"]["p"] == pytest.approx(motivated["activations"] / steps)
    # The large model alone for the motivated run's FLOPs: within half a step of them.
    matched, spent = by["large_matched", seed]["summary"], motivated["training_flops"]
    step_flops = matched["flops_per_step"]["motivated"]
    assert matched["base_steps"] == 0 and matched["motivated_steps"] < steps
    assert abs(matched["training_flops"] - spent) <= step_flops / 2
    saved = json.load(open(os.path.join(by["large_matched", seed]["workdir"], "checkpoints",
                                        str(matched["motivated_steps"]), "config", "metadata")))
    assert saved["train_steps"] == matched["motivated_steps"]
    # MatFormer's joint training: both sub-networks on every batch, one update each.
    joint = by["joint", seed]["summary"]
    assert joint["policy"] == "joint" and joint["motivated_steps"] == steps
    # (Its condition is "always": its base step alone is never run, never compiled.)
    assert joint["flops_per_step"]["base"] is None
    assert joint["flops_per_step"]["motivated"] > (motivated["flops_per_step"]["base"]
                                                   + motivated["flops_per_step"]["motivated"]) * 0.9
    assert {"base/test_accuracy", "motivated/test_accuracy"} <= set(by["joint", seed]["evals"][0])
  # Same seed, same data and initial weights: before any motivated batch, the
  # base_alone and motivated arms train the same base on the same first batch.
  assert by["base_alone", 0]["decisions"][0]["loss"] == by["motivated", 0]["decisions"][0]["loss"]


def test_a_sub_network_that_has_not_trained_is_evaluated_only_at_the_end(tiny):
  """base_alone never trains its motivated model, large_alone never its base on
  its own: their intermediate evaluations leave that model out (and its
  batch-norm recalibration, which costs a forward pass of 20 batches); the last
  evaluation, the summary's, has both. The motivated arm, whose condition fired
  in the first epoch, evaluates both every time."""
  _, _, _, records, _ = tiny
  by = {(r["arm"], r["seed"]): r for r in records}
  for arm, absent in (("base_alone", "motivated"), ("large_alone", "base")):
    first, last = by[arm, 0]["evals"]
    assert f"{absent}/test_accuracy" not in first, first
    assert {"base/test_accuracy", "motivated/test_accuracy"} <= set(last)
  fired = min(d["step"] for d in by["motivated", 0]["decisions"] if d["kind"] == "motivated")
  assert fired < by["motivated", 0]["evals"][0]["step"]
  assert all("motivated/test_accuracy" in e and "base/test_accuracy" in e
             for e in by["motivated", 0]["evals"])


def test_an_interrupted_suite_reuses_finished_runs_and_resumes_the_rest(tiny, tmp_path):
  _, config, workdir, records, _ = tiny
  copy = tmp_path / "suite"
  shutil.copytree(workdir, copy)
  # "Killed" after its first checkpoint: no summary, the last checkpoint gone.
  killed = suite.run_dir(str(copy), "random_times", 1)
  os.remove(os.path.join(killed, "summary.json"))
  shutil.rmtree(os.path.join(killed, "checkpoints", str(2 * 11)))
  trained = []

  def train_fn(c, directory):
    trained.append(directory)
    return train.train_and_evaluate(c, directory)

  again = suite.run_suite(config, [0, 1], str(copy), train_fn=train_fn, log=lambda _: None)
  assert trained == [killed]
  resumed = json.load(open(os.path.join(killed, "summary.json")))
  assert resumed["resumed_from_step"] == 11
  before = {(r["arm"], r["seed"]): r["summary"] for r in records}
  after = {(r["arm"], r["seed"]): r["summary"] for r in again}
  assert after["random_times", 1]["motivated_steps"] == before["random_times", 1][
      "motivated_steps"]
  assert after["random_times", 1]["motivated/test_accuracy"] == before["random_times", 1][
      "motivated/test_accuracy"]
  # Another config in the same directory is refused, naming what differs.
  config.num_epochs = 3
  with pytest.raises(ConfigError, match="num_epochs"):
    suite.run_suite(config, [0], str(copy), train_fn=train_fn)
  config.num_epochs = 2


def test_unknown_arms_are_refused():
  with pytest.raises(ConfigError, match="--arms must name some of"):
    suite.check_arms(["motivated", "bogus"])
  assert suite.check_arms(["random_rate"]) == ("motivated", "random_rate")


def test_the_command_writes_the_report_from_the_finished_runs(tiny, tmp_path):
  path, _, workdir, _, _ = tiny
  copy = tmp_path / "suite"
  shutil.copytree(workdir, copy)
  out = subprocess.run(
      [sys.executable, "-m", "motivation_jax.experiments", f"--config={path}", "--seeds=2",
       f"--workdir={copy}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "training in" not in out.stdout  # every run was reused
  for name in ("report.md", "report.json", "accuracy_over_training.png",
               "activation_timeline.png", "accuracy_vs_flops.png"):
    assert (copy / name).stat().st_size > 0, name
  data = json.load(open(copy / "report.json"))
  assert data["meta"]["seeds"] == [0, 1]
  assert "--seeds=2" in data["meta"]["command"]
  assert "motivation_jax.experiments" in (copy / "report.md").read_text()
  # Every arm and seed has the first run's shapes: each run after it read every
  # program back from the compilation cache (the test suite's, tests/conftest.py).
  compiled = data["compilation"]
  # (The joint step is a program of its own, and each seed's large_matched run
  # has its own schedule length, compiled into its steps.)
  assert compiled["runs"] == 14 and compiled["runs_compiling_nothing"] >= 10, compiled
  assert compiled["from_cache"] > 0
  assert "## Compilation" in (copy / "report.md").read_text()


def test_the_command_refuses_bad_arms_in_one_line(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "motivation_jax.experiments", "--config=configs/default.py",
       "--arms=motivated,bogus", f"--workdir={tmp_path}"],
      capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      "error: --arms must name some of base_alone, motivated, large_alone, random_rate, "
      "random_times, large_matched, joint; got motivated, bogus"]
