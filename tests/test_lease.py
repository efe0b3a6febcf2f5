"""One run per workdir (issue 30): the lease, refusal, takeover and release.

The lease logic is tried on fake holders first (a lease file written by the
test, held by a process that is alive, gone, or on another host), then with
real runs: a second run started beside a running one refuses in one line and
the first ends as an uninterrupted run does; a SIGKILLed run's lease is taken
over by the next run; SIGTERM, an error and the end release it; a
two-process run shares one lease (process 0's) and refuses as one; the
experiments command and export respect it. The running run is held still with
SIGSTOP while the second one tries, so nothing depends on timing.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from motivation_jax import lease, train
from motivation_jax.errors import CheckpointError, ConfigError, TrainingError, WorkdirInUse
from motivation_jax.experiments import suite
from motivation_jax.export import export_run

from conftest import ROOT, what_it_trained
from test_reliability import WORKER, assert_same_run
from test_train import small_config


def fake_lease(workdir, *, pid=None, machine=None, renewed_ago=0.0, ttl_s=60.0,
               token="their-token", **extra) -> dict:
  """Writes DIR/lease.json as another run would have: by default held by a live
  process of this host (this test's own, which holds no lease itself)."""
  now = time.time()
  record = {"run_id": "theirs", "token": token, "host": "elsewhere",
            "machine": lease.machine_id() if machine is None else machine,
            "pid": os.getpid() if pid is None else pid,
            "pid_start": lease._process_start(os.getpid()) if pid is None else None,
            "processes": 1, "started_at": now - 100, "renewed_at": now - renewed_ago,
            "renewals": 3, "ttl_s": ttl_s, **extra}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, lease.FILE), "w") as f:
    json.dump(record, f)
  return record


def listing(workdir) -> dict:
  """Every file under ``workdir`` with its bytes."""
  out = {}
  for folder, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = f.read()
  return out


def dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


# --- the lease on fake holders --------------------------------------------------

def test_a_live_lease_is_refused_naming_its_holder_and_nothing_is_written(tmp_path):
  fake_lease(tmp_path, renewed_ago=3)
  before = listing(tmp_path)
  with pytest.raises(WorkdirInUse) as e:
    lease.acquire(str(tmp_path))
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"{tmp_path} is in use by another run: run theirs on host "
                            f"elsewhere, process {os.getpid()}, started ")
  assert "renewed its lease 3 s ago" in message and "pick another --workdir" in message
  assert listing(tmp_path) == before


@pytest.mark.parametrize("holder, reason", [
    ({"pid": "dead"}, "its process {pid} no longer runs on this host"),
    ({"machine": "another-host/boot/ns", "renewed_ago": 61},
     "it was last renewed 61 s ago, more than its lease_ttl_s=60"),
    ({"machine": "another-host/boot/ns", "renewed_ago": 5, "ttl_s": 2.0},
     "it was last renewed 5 s ago, more than its lease_ttl_s=2"),
])
def test_a_stale_lease_is_taken_over_with_one_warning(tmp_path, holder, reason):
  holder = dict(holder)
  if holder.get("pid") == "dead":
    holder["pid"] = dead_pid()
  fake_lease(tmp_path, **holder)
  warnings = []
  held = lease.acquire(str(tmp_path), warn=warnings.append)
  try:
    assert len(warnings) == 1
    assert warnings[0].startswith(f"warning: taking over the stale lease on {tmp_path} of "
                                  "run theirs on host elsewhere")
    assert warnings[0].endswith(reason.format(**holder))
    record = json.loads((tmp_path / lease.FILE).read_text())
    assert record["run_id"] == held.run_id != "theirs" and record["pid"] == os.getpid()
  finally:
    held.release()
  assert os.listdir(tmp_path) == []  # the lease and its takeover marker are gone


@pytest.mark.parametrize("holder", [{"machine": "another-host/boot/ns", "renewed_ago": 30},
                                    {"renewed_ago": 30}])
def test_a_lease_renewed_within_its_ttl_is_live_on_any_host(tmp_path, holder):
  fake_lease(tmp_path, **holder)
  with pytest.raises(WorkdirInUse, match="renewed its lease 30 s ago"):
    lease.acquire(str(tmp_path))


def test_only_one_of_two_runs_takes_a_stale_lease_over(tmp_path):
  fake_lease(tmp_path, pid=dead_pid())
  store = lease._LocalStore(str(tmp_path))
  _, stale = store.read()
  ours = json.dumps({"token": "first"})
  assert store.take_over(stale, ours) == "first"
  assert store.take_over(stale, json.dumps({"token": "second"})) is None  # lost the race
  assert json.loads((tmp_path / lease.FILE).read_text())["token"] == "first"
  # The stale holder, had it lived, cannot renew over the new lease.
  assert store.renew(stale, json.dumps({"token": stale})) is None


def test_a_held_lease_refuses_the_same_process_too(tmp_path):
  with lease.acquire(str(tmp_path)) as held:
    with pytest.raises(WorkdirInUse, match="in use by this process already"):
      lease.acquire(str(tmp_path))
    assert json.loads((tmp_path / lease.FILE).read_text())["run_id"] == held.run_id
  assert not (tmp_path / lease.FILE).exists()


def test_the_lease_is_renewed_and_a_lost_lease_stops_the_writes(tmp_path):
  warnings = []
  held = lease.acquire(str(tmp_path), ttl_s=0.2, warn=warnings.append)  # renewed every 50 ms
  path = tmp_path / lease.FILE
  first = json.loads(path.read_text())
  deadline = time.time() + 10
  while json.loads(path.read_text())["renewals"] < 2 and time.time() < deadline:
    time.sleep(0.02)
  renewed = json.loads(path.read_text())
  assert renewed["renewals"] >= 2 and renewed["renewed_at"] > first["renewed_at"]
  assert renewed["token"] == first["token"] and warnings == []
  held.check()  # still ours: no error
  # Another run replaces it (as if this one had stalled past its TTL).
  theirs = fake_lease(tmp_path, machine="another-host/boot/ns")
  while held.lost is None and time.time() < deadline:
    time.sleep(0.02)
  assert held.lost is not None and len(warnings) == 1
  assert warnings[0].startswith(f"warning: this run lost its lease on {tmp_path} (another "
                                "run took it over: run theirs on host elsewhere")
  with pytest.raises(TrainingError, match="lost its lease"):
    held.check()
  held.release()
  assert json.loads(path.read_text()) == theirs  # never deleted another run's lease


def test_sigterm_during_setup_releases_the_lease_then_acts_as_before(tmp_path):
  got = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
  try:
    held = lease.acquire(str(tmp_path))
    with held.released_on_sigterm():
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.1)  # the handler runs between bytecodes
    assert got == [signal.SIGTERM]  # the handler before it ran too
    assert not (tmp_path / lease.FILE).exists()
    held.release()  # once is enough
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_a_bad_ttl_is_refused_in_one_line(tmp_path):
  with pytest.raises(ConfigError, match=r"config.lease_ttl_s must be a finite number > 0"):
    train.train_and_evaluate(small_config(lease_ttl_s=0.0), str(tmp_path))
  assert not (tmp_path / lease.FILE).exists()


def test_a_run_that_fails_in_setup_releases_its_lease(tmp_path):
  with pytest.raises(ConfigError, match="exceeds the 1437 training examples"):
    train.train_and_evaluate(small_config(batch_size=5000), str(tmp_path))
  assert not (tmp_path / lease.FILE).exists()


# --- real runs --------------------------------------------------------------------

@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """An uninterrupted small run (2 epochs of 22 batches), and its summary."""
  workdir = tmp_path_factory.mktemp("straight")
  return workdir, train.train_and_evaluate(small_config(), str(workdir))


def start_worker(workdir, **args) -> subprocess.Popen:
  """A small run in its own process (tests/reliability_worker.py) that prints
  ``batch k`` as it dispatches each batch."""
  return subprocess.Popen(
      [sys.executable, WORKER, json.dumps({"workdir": str(workdir), "report_batches": True,
                                           "batch_sleep_s": 0.0, **args})],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_at_batch(proc, k: int) -> None:
  """Waits until ``proc`` reports batch ``k``, then stops it (SIGSTOP)."""
  for line in proc.stdout:
    if line.startswith(f"batch {k}"):
      proc.send_signal(signal.SIGSTOP)
      return
  pytest.fail(f"the run ended before batch {k}: {proc.stderr.read()[-3000:]}")


def same_summary(a: dict, b: dict) -> bool:
  return what_it_trained(a) == what_it_trained(b)


@pytest.mark.slow  # two runs in processes of their own: about 15 s
def test_a_second_run_on_a_busy_workdir_refuses_and_the_first_is_undisturbed(straight,
                                                                              tmp_path):
  """The issue's experiment: the same command twice on one workdir."""
  reference, summary = straight
  workdir = tmp_path / "run"
  first = start_worker(workdir)
  try:
    stop_at_batch(first, 5)
    before = listing(workdir)
    assert json.loads(before[lease.FILE])["pid"] == first.pid
    second = subprocess.run([sys.executable, WORKER, json.dumps({"workdir": str(workdir)})],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr[-3000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert lines[0].startswith(f"error: {workdir} is in use by another run: run ")
    assert f"process {first.pid}, started " in lines[0]
    assert listing(workdir) == before  # the second run wrote nothing
  finally:
    first.send_signal(signal.SIGCONT)
  out, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-3000:]
  assert not (workdir / lease.FILE).exists()  # released at the end
  assert_same_run(workdir, reference)
  assert same_summary(json.loads((workdir / "summary.json").read_text()), summary)


@pytest.mark.slow  # a run killed in its own process, then resumed here: about 15 s
def test_a_sigkilled_runs_lease_is_taken_over_by_the_next_run(straight, tmp_path, capsys):
  reference, _ = straight
  workdir = tmp_path / "run"
  killed = subprocess.run([sys.executable, WORKER, json.dumps(
      {"workdir": str(workdir), "kill_at_batch": 35})], cwd=ROOT, capture_output=True,
      text=True, timeout=300)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  left = json.loads((workdir / lease.FILE).read_text())
  assert left["pid"] != os.getpid()
  capsys.readouterr()
  train.train_and_evaluate(small_config(), str(workdir))
  warnings = [l for l in capsys.readouterr().err.splitlines() if "taking over" in l]
  assert warnings == [f"warning: taking over the stale lease on {workdir} of run "
                      f"{left['run_id']} on host {left['host']}, process {left['pid']}, "
                      f"started {lease._utc(left['started_at'])}: its process {left['pid']} "
                      "no longer runs on this host"]
  assert not (workdir / lease.FILE).exists()
  assert_same_run(workdir, reference)


@pytest.mark.slow  # a run in its own process: about 10 s
def test_sigterm_while_training_releases_the_lease(tmp_path):
  workdir = tmp_path / "run"
  proc = start_worker(workdir)
  stop_at_batch(proc, 5)
  assert (workdir / lease.FILE).exists()
  proc.send_signal(signal.SIGTERM)
  proc.send_signal(signal.SIGCONT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-3000:]
  assert "stopped by SIGTERM after batch" in err
  assert not (workdir / lease.FILE).exists()


# --- multi-process runs -------------------------------------------------------------

LOCAL = os.path.join(ROOT, "launch", "local.sh")
TINY = ["--config=configs/default.py", "--config.num_epochs=1", "--config.progress_bar=False",
        "--config.model.name=mlp", "--config.model.base={'widths': (16,)}",
        "--config.model.motivated={'widths': (32,)}"]


def launch_two(workdir, logs) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", LOCAL, "2", f"--workdir={workdir}", *TINY], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "PYTHON": sys.executable, "LOG_DIR": str(logs)})


@pytest.mark.slow  # two processes start and stop: about 20 s
def test_a_two_process_run_on_a_busy_workdir_refuses_on_every_process(tmp_path):
  """Process 0 takes the lease and tells the others: on a busy workdir every
  process refuses with the same line, and none waits for the others. (That
  the processes of one run do not refuse each other, every multi-process run
  in the suite shows: test_launch.py, test_multiprocess.py and
  test_gcs_workdir.py start two processes on one workdir and need status 0,
  or the decision check's line, from both.)"""
  workdir = tmp_path / "two"
  fake_lease(workdir)
  before = listing(workdir)
  refused = launch_two(workdir, tmp_path / "logs")
  assert refused.returncode == 2, refused.stderr[-3000:]
  process_1 = (tmp_path / "logs" / "process_1.log").read_text()
  errors = {}
  for name, text in (("process 0", refused.stderr), ("process 1", process_1)):
    errors[name] = [l for l in text.splitlines() if l.startswith("error:")]
    assert "Traceback" not in text, text[-3000:]
  # local.sh copies the end of process 1's log to its stderr when process 1
  # fails first: then process 0's stderr holds the same line twice.
  assert len(errors["process 1"]) == 1 and 1 <= len(errors["process 0"]) <= 2, errors
  assert set(errors["process 0"]) == set(errors["process 1"]), errors
  assert errors["process 1"][0].startswith(
      f"error: {workdir} is in use by another run: run theirs ")
  assert listing(workdir) == before


# --- experiments and export -----------------------------------------------------------

def test_a_suite_refuses_an_arm_another_run_holds(tmp_path):
  fake_lease(tmp_path / "base_alone-seed0")
  with pytest.raises(WorkdirInUse, match="base_alone-seed0 is in use by another run"):
    suite.run_suite(small_config(num_epochs=1), [0], str(tmp_path), ["base_alone"],
                    log=lambda line: None)
  assert list(listing(tmp_path / "base_alone-seed0")) == [lease.FILE]


def test_two_suites_cannot_share_a_directory(tmp_path):
  """The experiments command holds its directory's lease (``suite.hold``)
  around the runs and the report."""
  with suite.hold(small_config(), str(tmp_path)) as held:
    record = json.loads((tmp_path / lease.FILE).read_text())
    assert record["what"] == "suite" and record["run_id"] == held.run_id
  assert not (tmp_path / lease.FILE).exists()
  fake_lease(tmp_path, what="suite")
  before = listing(tmp_path)
  with pytest.raises(WorkdirInUse, match=f"^{tmp_path} is in use by another suite: run theirs"):
    suite.hold(small_config(), str(tmp_path))
  assert listing(tmp_path) == before


def test_export_refuses_a_checkpoint_being_written_and_reads_without_a_lease(tmp_path):
  workdir = tmp_path / "run"
  train.train_and_evaluate(small_config(num_epochs=1), str(workdir))
  (workdir / "checkpoints" / "44.orbax-checkpoint-tmp-1796000000").mkdir()
  fake_lease(workdir)  # a run is writing checkpoint 44 now
  with pytest.raises(CheckpointError) as e:
    export_run(str(workdir), "base", str(tmp_path / "out44"), step=44)
  assert str(e.value).startswith(f"the checkpoint of batch 44 in {workdir}/checkpoints is "
                                 f"being written by the run training in {workdir} (run theirs")
  # The newest finished one exports beside the live run, and takes no lease.
  spec = export_run(str(workdir), "base", str(tmp_path / "out"))
  assert spec["source"]["step"] == 22
  assert json.loads((workdir / lease.FILE).read_text())["run_id"] == "theirs"
  # Without a live run, the same folder is a save that never finished.
  (workdir / lease.FILE).unlink()
  with pytest.raises(CheckpointError, match="no checkpoint of batch 44"):
    export_run(str(workdir), "base", str(tmp_path / "out44"), step=44)
