"""The main job end to end: training, outputs, resume, and one-line errors."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from motivation_jax import checkpoint, train
from motivation_jax.errors import (CheckpointError, ConfigError, DataError, NestingError,
                                   TrainingError)

from conftest import ROOT, load_default_config


def default_config():
  config = load_default_config()
  config.progress_bar = False
  return config


def small_config(**overrides):
  """A fast MLP run of two epochs, checkpointed every epoch."""
  config = default_config()
  config.model.name = "mlp"
  config.model.base = {"widths": (32,)}
  config.model.motivated = {"widths": (64, 64)}
  config.optimizer = "adamw"
  config.learning_rate = 3e-3
  config.num_epochs = 2
  config.checkpoint_every_epochs = 1
  config.log_every_steps = 10
  for key, value in overrides.items():
    target = config
    *path, last = key.split(".")
    for p in path:
      target = target[p]
    target[last] = value
  return config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """``(workdir, summary)`` of one finished small run (one epoch, 22 batches,
  checkpointed at its end). Tests that change a workdir take a copy."""
  workdir = tmp_path_factory.mktemp("finished")
  return workdir, train.train_and_evaluate(small_config(num_epochs=1), str(workdir))


def copy_of(finished_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished_run[0], workdir)
  return workdir


@pytest.mark.slow
def test_the_default_config_trains_both_models_above_90_percent(tmp_path):
  summary = train.train_and_evaluate(default_config(), str(tmp_path))
  assert summary["base/test_accuracy"] > 0.9
  assert summary["motivated/test_accuracy"] > 0.9
  steps = summary["base_steps"] + summary["motivated_steps"]
  assert steps == 20 * (1437 // 64)
  assert 0 < summary["activations"] <= summary["motivated_steps"] < steps
  assert summary["flops_per_step"]["base"] < summary["flops_per_step"]["motivated"]
  assert summary["training_flops"] < summary["large_alone_flops"]


def test_a_run_writes_its_decisions_metrics_and_summary(finished_run):
  workdir, summary = finished_run
  steps = summary["base_steps"] + summary["motivated_steps"]
  assert steps == 1437 // 64
  assert 0 < summary["activations"] <= summary["motivated_steps"] < steps
  assert summary["flops_per_step"]["base"] < summary["flops_per_step"]["motivated"]
  assert summary["training_flops"] < summary["large_alone_flops"]
  assert summary["base/test_accuracy"] > 0.3  # one epoch; 10 classes: chance is 0.1
  decisions = [json.loads(l) for l in open(workdir / "decisions.jsonl")]
  assert [d["step"] for d in decisions] == list(range(steps))
  assert sum(d["kind"] == "motivated" for d in decisions) == summary["motivated_steps"]
  metrics = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert any("base/test_accuracy" in m for m in metrics)
  assert any("motivated/loss" in m for m in metrics)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
  assert json.load(open(workdir / "summary.json"))["activations"] == summary["activations"]
  table = train.format_summary(summary)
  assert "test accuracy" in table and "of training the motivated model alone" in table
  assert "resumed" not in table


def _restore(workdir):
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  state = ckpt.manager.restore(ckpt.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))["state"]
  ckpt.close()
  return state


def test_a_run_resumed_from_a_checkpoint_ends_bit_identical(tmp_path):
  config = small_config(**{"motivation.loss_streak.k": 2})
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  summary = train.train_and_evaluate(config, straight)
  assert summary["motivated_steps"] > 0 and summary["base_steps"] > 0
  # "Preempt" after the first epoch: keep only that checkpoint and what had
  # been flushed with it.
  shutil.copytree(straight, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "44"))
  with open(os.path.join(resumed, "decisions.jsonl")) as f:
    kept = [l for l in f if json.loads(l)["step"] < 22]
  with open(os.path.join(resumed, "decisions.jsonl"), "w") as f:
    f.writelines(kept)
  again = train.train_and_evaluate(config, resumed)
  assert again["resumed_from_step"] == 22
  # The state came from the checkpoint: no initial state was made (nor compiled).
  assert "jit(create_train_state)" not in again["compilation"]["programs"]
  assert again["compilation"]["programs"]["jit(base_train_step)"] == 1
  assert "(this process, resumed at batch 22)" in train.format_summary(again)
  assert again["motivated_steps"] == summary["motivated_steps"]
  jax.tree.map(np.testing.assert_array_equal, _restore(straight), _restore(resumed))
  assert open(os.path.join(straight, "decisions.jsonl")).read() == open(
      os.path.join(resumed, "decisions.jsonl")).read()


def test_max_fraction_caps_the_motivated_batches_of_a_run(tmp_path):
  config = small_config(**{"num_epochs": 1, "motivation.condition": "always",
                           "motivation.max_fraction": 0.2})
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["motivated_steps"] == 4 and summary["base_steps"] == 18  # 22 batches
  reasons = [json.loads(l)["reason"] for l in open(tmp_path / "decisions.jsonl")]
  assert reasons.count("max_fraction") == 18


def test_a_corrupt_checkpoint_is_set_aside_in_one_line_and_kept(finished_run, tmp_path, capsys):
  workdir = copy_of(finished_run, tmp_path)
  state_dir = workdir / "checkpoints" / "22" / "state"
  for root, _, files in os.walk(state_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"not a checkpoint")
  # The only checkpoint is unusable: the run starts afresh, and says why.
  summary = train.train_and_evaluate(small_config(num_epochs=1), str(workdir))
  assert summary["resumed_from_step"] == 0
  warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
  assert len(warnings) == 1 and "checkpoints/22: its metadata cannot be read" in warnings[0]
  assert (workdir / "checkpoints" / "22.unusable" / "state").exists()


def test_resuming_with_another_motivation_config_is_refused(finished_run, tmp_path):
  workdir = copy_of(finished_run, tmp_path)
  with pytest.raises(ConfigError, match="cannot resume .* condition_params"):
    train.train_and_evaluate(small_config(**{"num_epochs": 1, "motivation.loss_streak.k": 5}),
                             str(workdir))


def test_resuming_with_other_batches_is_refused_in_one_line(finished_run, tmp_path):
  workdir = copy_of(finished_run, tmp_path)
  with pytest.raises(DataError, match=r"data position was written for other batches "
                     r"\(global_batch_size 64 -> 32\)") as e:
    train.train_and_evaluate(small_config(num_epochs=1, batch_size=32), str(workdir))
  assert "\n" not in str(e.value)


def poison_labels(monkeypatch, batches):
  """Training batches ``batches`` (a container of indices) get a label past the
  last class: their loss is NaN in the real compiled step, as a corrupt
  record's would be."""
  getitem = train.data.TrainBatches.__getitem__

  def poisoned(self, step):
    batch = getitem(self, step)
    if step in batches:
      batch = {**batch, "label": batch["label"].copy()}
      batch["label"][0] = 200
    return batch

  monkeypatch.setattr(train.data.TrainBatches, "__getitem__", poisoned)


class _From:
  def __init__(self, first):
    self.first = first

  def __contains__(self, step):
    return step >= self.first


def test_non_finite_batches_are_skipped_counted_and_logged(tmp_path, monkeypatch):
  config = small_config(num_epochs=1, **{"motivation.loss_streak.k": 1})
  poison_labels(monkeypatch, {5, 6, 14})
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["nonfinite_steps"] == 3
  assert summary["base_steps"] + summary["motivated_steps"] == 22  # training went on
  assert min(summary["base/test_accuracy"], summary["motivated/test_accuracy"]) > 0.2  # chance: 0.1
  assert "batches not applied (a non-finite loss or gradient): 3" in train.format_summary(summary)
  decisions = [json.loads(l) for l in open(tmp_path / "decisions.jsonl")]
  assert [d["step"] for d in decisions if d.get("nonfinite")] == [5, 6, 14]
  assert all(d["loss"] is None for d in decisions if d.get("nonfinite"))
  assert all(isinstance(d["loss"], float) for d in decisions if not d.get("nonfinite"))
  metrics = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  counts = {m["step"]: m.get("nonfinite_steps") for m in metrics if "base/loss" in m}
  assert counts == {10: 2, 20: 1}
  # The means leave the skipped batches out: every logged training value is a number.
  assert not any("non_finite" in m for m in metrics)


def test_a_skipped_batch_leaves_the_state_as_it_was_in_the_loop(tmp_path, monkeypatch):
  """Batch 5 poisoned: the state after batch 5 is the state after batch 4,
  bit for bit (but its batch count), and batch 6 trains from it."""
  poison_labels(monkeypatch, {5})
  run, state = train.setup(small_config(num_epochs=1), str(tmp_path))
  states = []
  compiled = run.train_steps

  def recording(kind):
    def step(state, batch):
      state, metrics = compiled[kind](state, batch)
      states.append(jax.tree.map(lambda x: np.array(x, copy=True), state))
      return state, metrics
    return step

  run.train_steps = {kind: recording(kind) for kind in compiled}
  try:
    train.train(run, state)
  finally:
    run.close()
  for name in ("params", "batch_stats", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, getattr(states[4], name),
                 getattr(states[5], name))
  assert int(states[5].step) == 6
  assert not np.array_equal(states[5].params["head"]["kernel"],
                            states[6].params["head"]["kernel"])


def test_max_nonfinite_steps_in_a_row_stop_the_run_with_one_line(tmp_path):
  # A learning rate this large sends the parameters to inf at once; from then
  # on no update can be applied.
  with pytest.raises(TrainingError, match=r"not finite on 3 batches in a row \(batches \d+ "
                     r"to \d+, the last a (base|motivated) step; .*no checkpoint had been "
                     r"written yet; lower config.learning_rate \(config.max_nonfinite_steps=3 "
                     r"stops a run here\)") as e:
    train.train_and_evaluate(small_config(learning_rate=1e30, max_nonfinite_steps=3),
                             str(tmp_path))
  assert "\n" not in str(e.value)


def test_non_finite_batches_after_a_checkpoint_stop_the_run_and_keep_it(finished_run, tmp_path,
                                                                         monkeypatch):
  workdir = copy_of(finished_run, tmp_path)
  ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"))
  saved = ckpt.manager.restore(22, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  ckpt.close()
  # The second epoch (a safe change on resume) goes bad at batch 25 for good.
  poison_labels(monkeypatch, _From(25))
  with pytest.raises(TrainingError, match=r"on 10 batches in a row \(batches 25 to 34, .*the "
                     r"checkpoint of batch 22 in .* is intact"):
    train.train_and_evaluate(small_config(num_epochs=2), str(workdir))
  ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"))
  assert ckpt.latest_step() == 22
  jax.tree.map(np.testing.assert_array_equal, saved["state"], _restore(workdir))
  ckpt.close()


def test_divergence_with_a_finite_training_loss_ends_the_run_with_one_line(tmp_path, capsys):
  """A learning rate of 100 (the issue's case): the training loss stays finite,
  the test accuracy at chance. Not a success: one line, and the summary says so."""
  config = small_config(num_epochs=1, learning_rate=100.0, optimizer="sgd")
  with pytest.raises(TrainingError, match=r"the run ended, but the base model is worse than "
                     r"guessing \(test loss \S+ > 10 ln 10, test accuracy 0\.\d+, chance "
                     r"0\.1000\): training diverged; its summary and last checkpoint are in "):
    train.train_and_evaluate(config, str(tmp_path))
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["diverged"] == ["base"]  # the motivated model never trained
  assert summary["base/test_accuracy"] < 0.2
  assert "warning: at epoch 1 the base model is worse than guessing" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, error, message", [
    ({"motivation.condition": "loss_falls"}, ConfigError, "unknown motivation condition"),
    ({"motivation.policy": "sometimes"}, ConfigError, "policy"),
    ({"motivation.max_fraction": 1.5}, ConfigError,
     r"config.motivation: max_fraction must be a number in \(0, 1\]"),
    ({"model.name": "transformer"}, ConfigError, "unknown model 'transformer'"),
    ({"optimizer": "lion"}, ConfigError, "config.optimizer must be"),
    ({"dtype": "float16"}, ConfigError, r"config.dtype must be one of \('float32', 'bfloat16'\)"),
    ({"model.base": {"widths": (128,)}}, NestingError, "layer 0 is 128 wide in the base"),
    ({"model.batch_norm_stats": "mixed"}, ConfigError, "batch_norm_stats"),
    ({"batch_size": 0}, ConfigError, r"config.batch_size must be an integer >= 1, got 0"),
    ({"learning_rate": float("nan")}, ConfigError, r"learning_rate must be a finite number > 0"),
    ({"momentum": 1.0}, ConfigError, r"config.momentum must be a number in \[0, 1\), got 1.0"),
    ({"eval_every_epochs": 0}, ConfigError, "config.eval_every_epochs must be an integer >= 1"),
    ({"seed": -1}, ConfigError, "config.seed must be an integer >= 0"),
    ({"model.extension_init": "ones"}, ConfigError, "config.model.extension_init must be one of"),
    ({"model.base": {"widths": (32,), "depths": (1,)}}, ConfigError,
     "'depths' is not a sub-network option of the mlp family"),
    ({"model.name": "resnet", "model.base": {"arch": "resnet21"},
      "model.motivated": {"arch": "resnet56"}}, ConfigError, "unknown ResNet 'resnet21'"),
    ({"model.name": "vit", "model.base": {"arch": "ti"}, "model.motivated": {"arch": "s"},
      "model.patch": 4}, ConfigError, "'patch' is not an option of the vit family"),
    ({"mock_data_examples": 8}, DataError, "mock data stands in for TFDS data sets"),
    # conftest gives this process 4 devices; the batch is split over them.
    ({"batch_size": 30}, ConfigError, r"config.batch_size=30 does not divide among the 4 "
     "devices"),
    ({"eval_batch_size": 6}, ConfigError, "config.eval_batch_size=6 does not divide"),
    ({"data_threads": -1}, ConfigError, "config.data_threads must be an integer >= 0"),
    ({"image_size": 4}, ConfigError, "config.image_size must be unset"),
    ({"image_size": 64}, DataError, "image_size=64 applies only to ImageNet"),
    ({"dataset": "imagenet"}, DataError, "unknown data set 'imagenet'"),
])
def test_bad_config_values_fail_in_one_line(tmp_path, overrides, error, message):
  with pytest.raises(error, match=message) as e:
    train.train_and_evaluate(small_config(**overrides), str(tmp_path))
  assert "\n" not in str(e.value)


def _main(*args, config="configs/default.py"):
  return subprocess.run([sys.executable, "-m", "motivation_jax.main", f"--config={config}", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_main_reports_bad_input_in_one_line_and_the_traceback_only_when_asked(tmp_path):
  result = _main(f"--workdir={tmp_path}", "--config.model.motivated.widths=(8,8)")
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("error: NestedResNet: layer 0 is 16")
  assert "Traceback" not in result.stderr
  result = _main(f"--workdir={tmp_path}", "--config.learning_rat=0.1")
  assert result.returncode != 0
  assert "learning_rat" in result.stderr and "Traceback" not in result.stderr
  assert result.stderr.count("\n") == 1
  result = _main(f"--workdir={tmp_path}", config="configs/missing.py")
  assert result.returncode == 2
  assert result.stderr.startswith("error: cannot load --config") and "configs/missing.py" in result.stderr
  assert result.stderr.count("\n") == 1
  for args, says in (
      (["--config.seed=1"], "No such file or directory: 'configs/missing.py'"),
      (["--config=configs/cifar10_resnet.py:large"], "unknown config variant 'large'")):
    result = _main(f"--workdir={tmp_path}", *args, config="configs/missing.py")
    assert result.returncode == 2 and says in result.stderr, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
  # The one error path: the traceback only when asked for, the same one line last.
  for flags, env in ((["--verbosity=1"], {}), ([], {"MOTIVATION_JAX_TRACEBACK": "1"})):
    result = subprocess.run(
        [sys.executable, "-m", "motivation_jax.main", "--config=configs/default.py",
         f"--workdir={tmp_path}", "--config.model.motivated.widths=(8,8)", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "NestingError" in result.stderr, flags
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: NestedResNet: layer 0 is 16")


def test_a_bug_in_model_code_is_not_reported_as_a_config_error(monkeypatch):
  """Only the package's own errors become one-line config errors; a TypeError from
  a family's code is a bug and keeps its type (and traceback)."""
  from motivation_jax import models

  class Broken:
    @staticmethod
    def from_config(base, motivated, num_classes):
      raise TypeError("a bug in the family's code")

  monkeypatch.setitem(models.FAMILIES, "broken", Broken)
  config = small_config(**{"model.name": "broken"})
  dataset = train.data.get_dataset("digits")
  with pytest.raises(TypeError, match="a bug in the family's code"):
    train.build(config, dataset)


def test_resume_refuses_a_config_that_changes_what_the_state_means(finished_run, tmp_path):
  workdir = copy_of(finished_run, tmp_path)
  # Same motivated model, another base: the saved shapes alone cannot tell.
  with pytest.raises(ConfigError, match=r"model\.base\.widths \(\[32\] -> \[16\]\)") as e:
    train.train_and_evaluate(small_config(num_epochs=1, **{"model.base": {"widths": (16,)}}),
                             str(workdir))
  assert "\n" not in str(e.value) and "use a new --workdir" in str(e.value)
  with pytest.raises(ConfigError, match=r"learning_rate \(0\.003 -> 0\.01\)"):
    train.train_and_evaluate(small_config(num_epochs=1, learning_rate=0.01), str(workdir))


def test_resume_continues_with_more_epochs_and_says_so(finished_run, tmp_path, capsys):
  workdir = copy_of(finished_run, tmp_path)
  # The compute dtype too: the state is float32 in either (a run moved to an accelerator).
  summary = train.train_and_evaluate(
      small_config(num_epochs=2, log_every_steps=5, dtype="bfloat16"), str(workdir))
  assert summary["resumed_from_step"] == 22 and summary["base_steps"] + summary[
      "motivated_steps"] == 44
  err = capsys.readouterr().err
  assert ("resuming with changed dtype, log_every_steps, num_epochs (safe to continue with)"
          in err)


def test_a_state_that_overflowed_is_never_checkpointed(tmp_path):
  """An update whose gradient was finite can still send a parameter to inf (the
  steps check what they see before updating): the checkpoint is refused rather
  than written over the good ones."""
  run, state = train.setup(small_config(), str(tmp_path))
  try:
    kernel = state.params["head"]["kernel"]
    bad = state.replace(params={**state.params, "head": {
        **state.params["head"], "kernel": kernel.at[0, 0].set(float("inf"))}})
    pending = train.PendingMetrics(run.controller, run.ckpt)
    with pytest.raises(TrainingError, match=r"^the parameters or optimizer state are not "
                       r"finite at batch 22 \(an update overflowed\), so they were not "
                       r"checkpointed; no checkpoint had been written yet; lower "
                       r"config.learning_rate$"):
      train.save(run, bad, pending, 22)
    train.save(run, state, pending, 22)  # the same state, finite: saved
    assert run.ckpt.committed_step() == 22
  finally:
    run.close()
