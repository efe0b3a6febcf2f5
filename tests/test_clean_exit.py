"""The end of a multi-process run (``distributed.end`` through ``cli.run``).

Two real processes join ``jax.distributed`` on localhost (tests/end_worker.py)
and leave as ``python -m motivation_jax.main`` does: they meet at one barrier
and shut ``jax.distributed`` down before the interpreter's exit, with the
status of how the run ended; a process whose peer never arrives leaves after
the timeout, with its own status and one warning line, instead of hanging or
aborting. docs/reliability.md, "The end of a multi-process run".
"""

import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, check_two_process_run, cpu_load, two_process_run

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "end_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(mode: str, timeout_s: int):
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  return [subprocess.Popen([sys.executable, WORKER, str(i), str(port), mode, str(timeout_s)],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True) for i in range(2)]


def _finish(proc, timeout: float):
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"process did not exit within {timeout} s: {err[-3000:]}")
  return proc.returncode, out, err


@pytest.mark.parametrize("mode, status", [("ok", 0), ("error", 2), ("preempted", 143)])
def test_every_process_meets_the_others_and_ends_with_its_status(mode, status):
  results = [_finish(p, 120) for p in _start(mode, timeout_s=60)]
  for returncode, out, err in results:
    assert returncode == status, err[-3000:]
    assert out.splitlines() == ["ended"], (out, err[-3000:])  # the explicit end ran, once
    assert "Fatal" not in err and "warning:" not in err, err[-3000:]
    lines = err.strip().splitlines()
    if mode == "error":
      assert lines == ["error: config.dataset 'nope' is not a data set this package has"], err
    if mode == "preempted":
      assert lines == ["stopped by SIGTERM after batch 3 of 44"], err


def test_a_process_whose_peer_never_arrives_leaves_after_the_timeout_with_its_status():
  first, second = _start("stall", timeout_s=3)
  try:
    start = time.monotonic()
    returncode, out, err = _finish(first, 120)
    waited = time.monotonic() - start
  finally:
    second.kill()
    second.communicate()
  assert returncode == 0, err[-3000:]
  assert "ended" not in out  # it did not shut down: JAX's would wait for the peer again
  warnings = [line for line in err.splitlines() if line.startswith("warning:")]
  assert len(warnings) == 1 and warnings[0].startswith(
      "warning: not every process of this run reached its end within 3 s"), err[-3000:]
  assert "Fatal" not in err and "Traceback" not in err, err[-3000:]
  assert waited < 60, waited  # not JAX's 300 s shutdown barrier


@pytest.mark.slow  # two 2-process runs beside a busy process: about 40 s
def test_two_process_runs_under_load_exit_0_with_their_summary_once(tmp_path):
  with cpu_load():
    for i in range(2):  # and twice more on a bucket, test_gcs_workdir.py
      workdir = tmp_path / f"run_{i}"
      result = two_process_run(str(workdir), str(tmp_path / f"logs_{i}"))
      check_two_process_run(*result, workdir_files=lambda name: (workdir / name).read_text())
      assert sorted(os.listdir(workdir / "checkpoints")) == ["22", "44"]
