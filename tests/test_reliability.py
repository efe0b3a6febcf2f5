"""Preemption, kills at any moment and damaged checkpoints lose nothing (issue 13).

The reference is one uninterrupted small run (two epochs of 22 batches,
checkpoints at 22 and 44). A run that is stopped (SIGTERM, SIGINT), killed
(SIGKILL, at a batch or while a checkpoint is being written) or handed a
damaged checkpoint, and then started again, must end with the same variables,
bit for bit, and the same decisions.jsonl and metrics.jsonl, line for line.
Signals need their own process: ``reliability_worker.py`` runs the same
config through the command line's error path.
"""

import asyncio
import gc
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from motivation_jax import checkpoint, train
from motivation_jax.errors import CheckpointError
from motivation_jax.metrics import cut_jsonl

from conftest import ROOT
from test_train import _restore, small_config

WORKER = os.path.join(ROOT, "tests", "reliability_worker.py")


def run_worker(workdir, **args) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, WORKER, json.dumps({"workdir": str(workdir), **args})],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The workdir of the uninterrupted run."""
  workdir = tmp_path_factory.mktemp("straight")
  train.train_and_evaluate(small_config(), str(workdir))
  return workdir


def assert_same_run(workdir, reference) -> None:
  """Same final variables (bitwise), decisions (text) and metrics (values to float
  tolerance) as ``reference``."""
  jax.tree.map(np.testing.assert_array_equal, _restore(reference), _restore(workdir))
  assert (workdir / "decisions.jsonl").read_text() == (reference / "decisions.jsonl").read_text()
  got, want = ([json.loads(l) for l in open(w / "metrics.jsonl")] for w in (workdir, reference))
  assert [sorted(m) for m in got] == [sorted(m) for m in want]
  for g, w in zip(got, want):
    assert g == pytest.approx(w, rel=1e-6), (g, w)


def _checksum_trees():
  rng = np.random.default_rng(0)
  return {"f32": jnp.asarray(rng.normal(size=(37, 5)), jnp.float32),
          "bf16": jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.bfloat16),
          "i32": jnp.asarray(rng.integers(-2**31, 2**31 - 1, size=(70_000,)), jnp.int32),
          "u8": jnp.asarray(rng.integers(0, 256, size=(7, 7, 3)), jnp.uint8),
          "bool": jnp.asarray(rng.integers(0, 2, size=(11,)).astype(bool)),
          "scalar": jnp.float32(3.5), "count": jnp.int32(-7)}


def test_checksums_on_the_host_are_the_devices_bit_for_bit(monkeypatch):
  """Small trees are summed in NumPy (``checkpoint.HOST_CHECKSUM_BYTES``),
  large ones by the program on the devices: the same sums either way, so a
  checkpoint written one way verifies the other way (an old checkpoint, a
  state that outgrew the threshold)."""
  tree = _checksum_trees()
  assert checkpoint._on_host(tree) is not None
  host = checkpoint.array_checksums(tree)
  monkeypatch.setattr(checkpoint, "HOST_CHECKSUM_BYTES", 0)
  assert checkpoint._on_host(tree) is None
  assert checkpoint.array_checksums(tree) == host
  assert len(set(map(tuple, host.values()))) == len(host)  # each leaf its own sums


def test_the_finite_check_is_the_same_on_the_host_and_on_the_devices(monkeypatch):
  tree = _checksum_trees()
  for poison in (None, jnp.nan, jnp.inf):
    check = dict(tree, f32=tree["f32"] if poison is None else tree["f32"].at[3, 1].set(poison),
                 bf16=tree["bf16"])
    results = []
    for threshold in (checkpoint.HOST_CHECKSUM_BYTES, 0):
      monkeypatch.setattr(checkpoint, "HOST_CHECKSUM_BYTES", threshold)
      results.append(checkpoint.array_checksums_and_finite({"state": tree}, finite_of=check))
    assert results[0] == results[1]
    assert results[0][1] is (poison is None)


def test_cutting_a_log_back_to_a_checkpoint_keeps_whole_lines_before_it(tmp_path):
  path = tmp_path / "decisions.jsonl"
  path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(6)) + '{"step": 6, "ki')
  assert cut_jsonl(str(path), keep_below=4) == 3
  assert [json.loads(l)["step"] for l in open(path)] == [0, 1, 2, 3]
  path.write_text('{"step": 0}\n{"step": 1, "ki')  # killed while writing a line
  assert cut_jsonl(str(path), keep_below=10) == 1
  assert path.read_text() == '{"step": 0}\n'
  assert cut_jsonl(str(tmp_path / "absent.jsonl"), keep_below=0) == 0


def test_sigterm_checkpoints_the_next_batch_exits_143_and_the_run_resumes(straight, tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
      [sys.executable, WORKER, json.dumps({"workdir": str(workdir), "report_batches": True})],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for line in proc.stdout:  # the batches go by one every 50 ms
    if line.startswith("batch 30"):
      proc.send_signal(signal.SIGTERM)
      break
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err
  last = err.strip().splitlines()[-1]
  stopped = re.fullmatch(r"stopped by SIGTERM after batch (\d+) of 44: checkpoint (\d+) is in "
                         r"\S+/checkpoints; the same command resumes from it", last)
  assert stopped and stopped[1] == stopped[2], last
  step = int(stopped[1])
  assert 31 <= step < 44
  assert f"batch {step}\n" not in out  # stopped after the batch in flight, not later
  assert sorted(os.listdir(workdir / "checkpoints")) == ["22", str(step)]
  # Everything up to the checkpoint is in the logs, nothing after it.
  assert [json.loads(l)["step"] for l in open(workdir / "decisions.jsonl")] == list(range(step))
  assert "Traceback" not in err

  resumed = run_worker(workdir)
  assert resumed.returncode == 0, resumed.stderr
  assert json.load(open(workdir / "summary.json"))["resumed_from_step"] == step
  assert_same_run(workdir, straight)


@pytest.mark.slow
def test_sigint_stops_like_sigterm_with_status_130(straight, tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
      [sys.executable, WORKER, json.dumps({"workdir": str(workdir), "report_batches": True})],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for line in proc.stdout:
    if line.startswith("batch 5"):  # before the first checkpoint
      proc.send_signal(signal.SIGINT)
      break
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err
  assert re.match(r"stopped by SIGINT after batch \d+ of 44", err.strip().splitlines()[-1])
  assert "Traceback" not in err
  assert run_worker(workdir).returncode == 0
  assert_same_run(workdir, straight)


@pytest.mark.slow
def test_sigkill_at_random_batches_and_during_saves_then_resume(straight, tmp_path):
  """Killed four times (at a batch before the first checkpoint, while writing
  it, at a batch after it, while writing the last one), started again each
  time: the same run."""
  rng = random.Random()
  kills = [{"kill_at_batch": rng.randrange(0, 21)}, {"kill_in_save": 22},
           {"kill_at_batch": rng.randrange(23, 43)}, {"kill_in_save": 44}]
  print("kills:", kills)  # shown when the test fails
  workdir = tmp_path / "run"
  for kill in kills:
    killed = run_worker(workdir, **kill)
    assert killed.returncode == -signal.SIGKILL, (kill, killed.stderr)
    if "kill_in_save" in kill:  # killed while Orbax was writing: not a checkpoint yet
      assert not (workdir / "checkpoints" / str(kill["kill_in_save"])).exists()
    if kill.get("kill_at_batch", 0) > 22:  # TensorBoard has the events up to the checkpoint
      events = b"".join(p.read_bytes() for p in (workdir / "tensorboard").iterdir())
      assert b"base/test_accuracy" in events
  finished = run_worker(workdir)
  assert finished.returncode == 0, finished.stderr
  assert_same_run(workdir, straight)
  # The unfinished saves, kept (22 twice when the kill after it came before
  # Orbax had finished writing it).
  unusable = {n for n in os.listdir(workdir / "checkpoints") if "unusable" in n}
  assert {"22.unusable", "44.unusable"} <= unusable <= {"22.unusable", "22.unusable2",
                                                        "44.unusable"}


@pytest.mark.slow  # two processes; test_train.py tests the same stop in this process
def test_non_finite_batches_in_a_row_stop_the_command_line_with_one_line(straight, tmp_path):
  workdir = tmp_path / "run"
  stopped = run_worker(workdir, poison_from_batch=30, overrides={"max_nonfinite_steps": 3})
  assert stopped.returncode == 2, stopped.stderr
  assert "Traceback" not in stopped.stderr
  last = stopped.stderr.strip().splitlines()[-1]
  assert re.fullmatch(r"error: the training loss or a gradient was not finite on 3 batches in "
                      r"a row \(batches 30 to 32, the last a (base|motivated) step; the training "
                      r"loss was nan\); their updates were not applied; the checkpoint of batch "
                      rf"22 in {workdir}/checkpoints is intact; lower config.learning_rate "
                      r"\(config.max_nonfinite_steps=3 stops a run here\)", last), last
  assert sorted(os.listdir(workdir / "checkpoints")) == ["22"]
  # Restarted without the bad batches, it resumes from that checkpoint: the same run.
  resumed = run_worker(workdir, overrides={"max_nonfinite_steps": 3})
  assert resumed.returncode == 0, resumed.stderr
  assert json.load(open(workdir / "summary.json"))["resumed_from_step"] == 22
  assert_same_run(workdir, straight)


def _damage_bytes(state_dir) -> None:
  """64 bytes changed in the middle of each array file (the issue's damage)."""
  for path in state_dir.rglob("*"):
    if path.is_file() and path.parent.name == "d":
      data = bytearray(path.read_bytes())
      middle = len(data) // 2
      data[middle:middle + 64] = bytes(b ^ 0x5A for b in data[middle:middle + 64])
      path.write_bytes(bytes(data))


def _truncate(state_dir) -> None:
  for path in state_dir.rglob("*"):
    if path.is_file():
      data = path.read_bytes()
      path.write_bytes(data[:len(data) // 2])


def _other_checksum(state_dir) -> None:
  """Readable arrays that are not the ones saved (as silent corruption gives)."""
  path = state_dir.parent / "checksum" / "metadata"
  checksum = json.loads(path.read_text())
  leaf = sorted(checksum["state"])[-1]
  checksum["state"][leaf][1] ^= 1
  path.write_text(json.dumps(checksum))


def _truncate_array_data(state_dir) -> None:
  """The array chunks cut to a third, the metadata left whole: the restore
  starts reading arrays, and fails on several at once."""
  for path in (state_dir / "ocdbt.process_0" / "d").iterdir():
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 3])


DAMAGE = {
    "changed_bytes": (_damage_bytes, "checksum|cannot be read"),
    "truncated_files": (_truncate, "cannot be read"),
    "other_checksum": (_other_checksum, r"its array state/\S+ does not match its checksum"),
    "truncated_array_data": (_truncate_array_data, "cannot be read"),
    "missing_manifest": (lambda d: (d / "manifest.ocdbt").unlink(), "cannot be read"),
    "missing_metadata": (lambda d: (d / "_METADATA").unlink(), "metadata cannot be read"),
    "missing_controller_item": (lambda d: (d.parent / "controller" / "metadata").unlink(),
                                "cannot be read"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_set_aside_for_the_previous_one(straight, tmp_path,
                                                                       capsys, damage):
  directory = tmp_path / "checkpoints"
  shutil.copytree(straight / "checkpoints", directory)
  damage_fn, why = DAMAGE[damage]
  damage_fn(directory / "44" / "state")
  ckpt = checkpoint.Checkpointer(str(directory))
  saved = ckpt.manager.restore(22, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          saved["state"])
  state, _, position, step, _ = ckpt.restore(abstract)
  ckpt.close()
  assert step == 22 and position["next_batch"] == 22
  jax.tree.map(np.testing.assert_array_equal, state, saved["state"])
  warnings = capsys.readouterr().err.strip().splitlines()
  assert len(warnings) == 1, warnings
  assert re.fullmatch(rf"warning: skipping the checkpoint at {directory}/44: .*({why}).*; "
                      rf"moved it to {directory}/44.unusable", warnings[0]), warnings[0]
  assert sorted(os.listdir(directory)) == ["22", "44.unusable"]


def test_a_run_with_a_damaged_newest_checkpoint_resumes_from_the_previous_one(straight, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(straight, workdir)
  _damage_bytes(workdir / "checkpoints" / "44" / "state")
  summary = train.train_and_evaluate(small_config(), str(workdir))
  assert summary["resumed_from_step"] == 22
  assert_same_run(workdir, straight)


def test_a_resume_past_unreadable_arrays_prints_one_warning_line(straight, tmp_path):
  """Orbax abandons the other reads when one array fails; each abandoned read
  coroutine raised again when collected (4,764 lines of "Exception ignored in"
  tracebacks after the warning, before the fix)."""
  workdir = tmp_path / "run"
  shutil.copytree(straight, workdir)
  _truncate_array_data(workdir / "checkpoints" / "44" / "state")
  resumed = run_worker(workdir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  lines = resumed.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      f"warning: skipping the checkpoint at {workdir}/checkpoints/44: it cannot be read: "), lines
  assert "TensorStore details" not in lines[0]  # cut before the spec's repr
  assert json.load(open(workdir / "summary.json"))["resumed_from_step"] == 22
  assert_same_run(workdir, straight)


def _unretrieved_task_failure(filename: str) -> None:
  """Lets a task whose coroutine was compiled from ``filename`` fail, unawaited,
  and be collected: asyncio then logs "Task exception was never retrieved"."""
  namespace = {}
  exec(compile("async def read():\n  raise ValueError('OUT_OF_RANGE')\n", filename, "exec"),
       namespace)
  loop = asyncio.new_event_loop()
  task = loop.create_task(namespace["read"]())
  loop.run_until_complete(asyncio.sleep(0))  # the task runs and fails; nobody awaits it
  loop.close()
  del task
  gc.collect()


def test_asyncio_records_of_abandoned_orbax_reads_are_dropped_and_no_others(caplog):
  """When several arrays of a checkpoint cannot be read, the reads Orbax gave up
  on are logged by asyncio when collected (153 and 228 lines after the warning,
  in 2 of 12 resumes on a 2-core machine; once in CI)."""
  checkpoint._drop_closed_loop_callbacks()
  with caplog.at_level(logging.ERROR, logger="asyncio"):
    _unretrieved_task_failure(os.path.join(os.sep, "site-packages", "orbax", "serialization.py"))
    assert caplog.records == []
    _unretrieved_task_failure(os.path.join(os.sep, "site-packages", "user_code", "reads.py"))
    assert [r.getMessage().splitlines()[0] for r in caplog.records] == [
        "Task exception was never retrieved"]


def test_a_damaged_checkpoint_asked_for_by_step_is_refused_in_one_line(straight, tmp_path):
  directory = tmp_path / "checkpoints"
  shutil.copytree(straight / "checkpoints", directory)
  _other_checksum(directory / "44" / "state")
  ckpt = checkpoint.Checkpointer(str(directory))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          _restore(straight))
  with pytest.raises(CheckpointError, match=r"checkpoints/44 is damaged \(its array state/"):
    ckpt.restore(abstract, 44)
  ckpt.close()
  assert sorted(os.listdir(directory)) == ["22", "44"]  # asked for by step: left as it is


def test_a_save_that_fails_in_the_background_is_one_line_and_keeps_the_last_checkpoint(
    straight, tmp_path, monkeypatch):
  """A full disk while Orbax writes in its threads (seen on a 300 KiB tmpfs:
  before, 460 lines of tracebacks and exit 1) reaches the caller as one
  CheckpointError with the OS's reason."""
  workdir = tmp_path / "run"
  shutil.copytree(straight, workdir)
  shutil.rmtree(workdir / "checkpoints" / "44")
  wait = ocp.CheckpointManager.wait_until_finished

  def full_disk(self):
    wait(self)
    if self._checkpoints_saved_after_22:  # Orbax's save itself waits first: it fails there
      raise ValueError('RESOURCE_EXHAUSTED: Error writing "step/0" in OCDBT database at local '
                       'file "...": Failed to write 1074330 bytes to file 8: No space left on '
                       "device [os_error_code='28']")

  save = ocp.CheckpointManager.save

  def noting_save(self, step, *args, **kwargs):
    self._checkpoints_saved_after_22 = True
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "_checkpoints_saved_after_22", False, raising=False)
  monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", full_disk)
  monkeypatch.setattr(ocp.CheckpointManager, "save", noting_save)
  with pytest.raises(CheckpointError, match=r"^cannot write a checkpoint in \S+/checkpoints \(No "
                     r"space left on device\); the checkpoints before it are intact") as e:
    train.train_and_evaluate(small_config(), str(workdir))
  assert "\n" not in str(e.value)
  monkeypatch.undo()
  ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"))
  assert ckpt.latest_step() == 22
  ckpt.close()
