"""Property: whatever ``--config.*`` overrides a user types, and whatever damage
a workdir has taken, the command lines (``motivation_jax.main`` and
``motivation_jax.export``) end with status 0 or 2, print no traceback, and a
status of 2 comes with one ``error:`` line, the last (issue 13).

Hypothesis draws the overrides (valid values and wrong ones, from the keys of
configs/default.py and a key that does not exist) and the damage (bytes
flipped, files truncated or removed in a checkpoint, a stray unfinished save,
garbage in the logs, a log or the checkpoint folder replaced); each example is
one or two real processes on a small model, so there are few of them.
"""

import os
import random
import shutil
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from conftest import ROOT

pytestmark = pytest.mark.slow  # minutes on the 2-core CPU: the full run only
# More examples, for a longer hunt: MOTIVATION_JAX_FUZZ_EXAMPLES=100 (drawn at
# random). Without it the examples are the same on every run (derandomize), so
# CI never passes or fails by the draw.
EXAMPLES = int(os.environ.get("MOTIVATION_JAX_FUZZ_EXAMPLES", "0")) or None

# A small CNN for one epoch, so that a run that trains takes seconds.
SMALL = ["--config=configs/default.py", "--config.num_epochs=1", "--config.progress_bar=False",
         "--config.model.base.widths=(4,8)", "--config.model.motivated.widths=(8,16)",
         "--config.model.motivated.depths=(1,2)", "--config.bn_recalibration_batches=2",
         "--config.checkpoint_every_epochs=1", "--config.log_every_steps=5",
         "--config.batch_size=128"]

# key -> values a user might type, right and wrong.
VALUES = {
    "num_epochs": ["1", "2", "0", "-1", "abc", "1.5"],
    "batch_size": ["64", "0", "7", "100000", "x"],
    "eval_batch_size": ["128", "6", "0"],
    "learning_rate": ["0.01", "0", "-1", "nan", "inf", "100.0", "1e30"],
    "momentum": ["0.5", "1.0", "-0.1"],
    "weight_decay": ["0.0", "-1"],
    "warmup_epochs": ["0.0", "-2", "nan"],
    "optimizer": ["adamw", "sgd", "lion", "it's"],
    "seed": ["3", "-1", "1e3"],
    "max_nonfinite_steps": ["1", "0", "-5"],
    "log_every_steps": ["1", "0"],
    "checkpoint_every_epochs": ["1", "0", "2"],
    "eval_every_epochs": ["1", "0"],
    "bn_recalibration_batches": ["0", "-1", "3"],
    "data_threads": ["0", "-1"],
    "augment": ["False", "maybe"],
    "dataset": ["digits", "cifar10", "imagenet", ""],
    "model.name": ["mlp", "vit", "transformer", "it's"],
    "model.base.widths": ["(4,)", "(64,8)", "()", "(4,8,16)", "wide"],
    "model.motivated.depths": ["(1,1)", "(0,0)", "(2,)"],
    "model.batch_norm_stats": ["shared", "mixed"],
    "model.extension_init": ["zero", "ones"],
    "motivation.condition": ["never", "always", "every_n", "random", "replay", "loss_falls"],
    "motivation.loss_streak.k": ["1", "0", "-3"],
    "motivation.every_n.n": ["2", "0"],
    "motivation.random.p": ["0.5", "1.5"],
    "motivation.replay.indices": ["(1,3)", "(-1,)", "x"],
    "motivation.phase_steps": ["2", "0"],
    "motivation.decision_lag": ["0", "2", "-1"],
    "motivation.policy": ["both", "sometimes"],
    "motivation.max_fraction": ["0.5", "2.0", "0"],
    "mesh.fsdp": ["1", "2", "3"],
    "mesh.data": ["-1", "0", "5"],
    "no_such_key": ["1"],
}


def _run(args, timeout=240) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


def assert_clean_end(result: subprocess.CompletedProcess, what) -> None:
  err = result.stderr
  assert "Traceback" not in err, (what, err[-3000:])
  assert result.returncode in (0, 2), (what, result.returncode, err[-3000:])
  errors = [line for line in err.splitlines() if line.startswith("error: ")]
  if result.returncode == 2:
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], (what, err[-3000:])
  else:
    assert errors == [], (what, err[-3000:])


@settings(max_examples=EXAMPLES or 4, deadline=None, database=None,
          derandomize=EXAMPLES is None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(sorted(VALUES)), min_size=1, max_size=3, unique=True)
       .flatmap(lambda keys: st.tuples(*[st.tuples(st.just(k), st.sampled_from(VALUES[k]))
                                         for k in keys])))
def test_random_overrides_end_in_status_0_or_2_without_a_traceback(tmp_path_factory, overrides):
  workdir = tmp_path_factory.mktemp("run")
  args = ["-m", "motivation_jax.main", *SMALL, f"--workdir={workdir}",
          f"--config.data_dir={workdir}/tfds",
          *[f"--config.{key}={value}" for key, value in overrides]]
  result = _run(args)
  assert_clean_end(result, overrides)
  if result.returncode == 0:
    assert (workdir / "summary.json").exists()
    exported = _run(["-m", "motivation_jax.export", f"--workdir={workdir}", "--subnet=base",
                     f"--out={workdir}/export"])
    assert_clean_end(exported, ("export after", overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished run of SMALL for two epochs of 11 batches (checkpoints 11 and
  22), made through the command line."""
  workdir = tmp_path_factory.mktemp("trained")
  result = _run(["-m", "motivation_jax.main", *SMALL, "--config.num_epochs=2",
                 f"--workdir={workdir}"])
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def _files(directory):
  return sorted(os.path.join(root, name) for root, _, names in os.walk(directory)
                for name in names)


def damage(workdir, kind: str, rng: random.Random) -> str:
  """Applies one kind of damage at a place ``rng`` picks; returns what it did."""
  checkpoints = workdir / "checkpoints"
  files = _files(checkpoints)
  target = rng.choice(files)
  if kind == "flip_bytes":
    data = bytearray(open(target, "rb").read())
    if data:
      start = rng.randrange(len(data))
      for i in range(start, min(start + rng.randint(1, 64), len(data))):
        data[i] ^= 0xFF
    open(target, "wb").write(bytes(data))
  elif kind == "truncate":
    data = open(target, "rb").read()
    open(target, "wb").write(data[:rng.randrange(len(data) + 1)])
  elif kind == "remove_file":
    os.remove(target)
  elif kind == "remove_item":  # one item folder of one checkpoint
    steps = sorted(n for n in os.listdir(checkpoints) if n.isdigit())
    step = rng.choice(steps)
    item = rng.choice(sorted(os.listdir(checkpoints / step)))
    target = str(checkpoints / step / item)
    shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
  elif kind == "unfinished_save":
    target = str(checkpoints / "30.orbax-checkpoint-tmp-1234")
    os.makedirs(os.path.join(target, "state"))
  elif kind == "garbage_in_logs":  # into a log that is still a file (see log_is_a_folder)
    target = str(workdir / rng.choice(sorted(
        n for n in ("decisions.jsonl", "metrics.jsonl") if (workdir / n).is_file())))
    with open(target, "a") as f:
      f.write(rng.choice(['{"step": 3, "ki', "not json\n", '{"no_step": 1}\n', "\x00\xff\n"]))
  elif kind == "log_is_a_folder":
    target = str(workdir / rng.choice(["decisions.jsonl", "metrics.jsonl", "summary.json"]))
    os.remove(target)
    os.makedirs(target)
  elif kind == "checkpoints_is_a_file":
    target = str(checkpoints)
    shutil.rmtree(target)
    open(target, "w").write("not a folder")
  return f"{kind} {os.path.relpath(target, workdir)}"


DAMAGE = ["flip_bytes", "truncate", "remove_file", "remove_item", "unfinished_save",
          "garbage_in_logs", "log_is_a_folder", "checkpoints_is_a_file"]


@settings(max_examples=EXAMPLES or 2, deadline=None, database=None,
          derandomize=EXAMPLES is None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
# A draw that once broke this test itself (garbage written into a log made a folder).
@example(kinds=["log_is_a_folder", "garbage_in_logs"], seed=0, more_epochs=False)
@given(kinds=st.lists(st.sampled_from(DAMAGE), min_size=1, max_size=2),
       seed=st.integers(0, 2**32 - 1), more_epochs=st.booleans())
def test_a_damaged_workdir_ends_in_status_0_or_2_without_a_traceback(
    trained, tmp_path_factory, kinds, seed, more_epochs):
  workdir = tmp_path_factory.mktemp("damaged") / "run"
  shutil.copytree(trained, workdir)
  rng = random.Random(seed)
  done = []
  for kind in kinds:
    if kind != "checkpoints_is_a_file" or (workdir / "checkpoints").is_dir():
      if (workdir / "checkpoints").is_dir() and _files(workdir / "checkpoints"):
        done.append(damage(workdir, kind, rng))
  exported = _run(["-m", "motivation_jax.export", f"--workdir={workdir}", "--subnet=motivated",
                   f"--out={workdir}/export"])
  assert_clean_end(exported, ("export", done))
  resumed = _run(["-m", "motivation_jax.main", *SMALL,
                  f"--config.num_epochs={3 if more_epochs else 2}", f"--workdir={workdir}"])
  assert_clean_end(resumed, ("main", done))
