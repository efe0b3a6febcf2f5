"""launch/: the scripts (benchmarks/device/'s too) parse and pass shellcheck;
``launch/local.sh`` starts a real multi-process run of ``python -m
motivation_jax.main``; start-up flags are checked; every process takes the same
decisions, and a process made to decide differently stops the run with one line
instead of hanging.
"""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import yaml

from motivation_jax import agreement, distributed
from motivation_jax.errors import ConfigError

from conftest import ROOT, SMALL_MLP, run_launcher, xla_flags

LAUNCH = os.path.join(ROOT, "launch")
LOCAL = os.path.join(LAUNCH, "local.sh")
SCRIPTS = sorted(glob.glob(os.path.join(LAUNCH, "*.sh")) + glob.glob(os.path.join(LAUNCH, "*.sbatch"))
                 + glob.glob(os.path.join(ROOT, "benchmarks", "device", "*.sh")))
CONFIG = os.path.join(ROOT, "configs", "default.py")
# Small and fast: digits, 22 batches per epoch; the default condition
# (loss_streak) fires in the first epochs, so both step kinds run.
FAST = ["--config.progress_bar=False"]


def error_lines(text):
  return [line for line in text.splitlines() if line.startswith("error:")]


# --- the scripts ---------------------------------------------------------------------

def test_there_is_a_script_per_platform():
  names = {os.path.basename(p) for p in glob.glob(os.path.join(LAUNCH, "*"))}
  assert {"local.sh", "tpu_vm.sh", "slurm.sbatch", "gke_jobset.yaml", "README.md"} <= names
  for script in ("local.sh", "tpu_vm.sh"):
    assert os.access(os.path.join(LAUNCH, script), os.X_OK), script


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_every_script_parses(script):
  result = subprocess.run(["bash", "-n", script], capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_every_script_passes_shellcheck(script):
  if shutil.which("shellcheck") is None:  # .ci/run installs it and fails without it
    pytest.skip("shellcheck is not installed (Debian: apt install shellcheck)")
  result = subprocess.run(["shellcheck", "--shell=bash", script], capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr


def test_the_jobset_is_an_indexed_jobset_that_starts_main_with_explicit_flags():
  with open(os.path.join(LAUNCH, "gke_jobset.yaml")) as f:
    docs = [d for d in yaml.safe_load_all(f) if d]
  jobset = next(d for d in docs if d["kind"] == "JobSet")
  job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
  assert job["completionMode"] == "Indexed"
  assert job["parallelism"] == job["completions"]
  container = job["template"]["spec"]["containers"][0]
  command = " ".join(container.get("command", []) + container.get("args", []))
  for flag in ("motivation_jax.main", "--coordinator_address=", "--num_processes=",
               "--process_id="):
    assert flag in command, flag


FAKE_GCLOUD = """#!/usr/bin/env bash
# Logs its arguments, one call per line; a TPU VM that exists and is READY.
printf '%s\\n' "$*" >> "$GCLOUD_LOG"
case "$*" in *"tpu-vm describe"*) echo READY ;; esac
"""


def test_tpu_vm_sh_installs_on_every_worker_and_runs_main_on_all(tmp_path):
  # gcloud replaced by a script that records its calls: what the script asks of
  # Cloud TPU, not whether Cloud TPU does it.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  log = tmp_path / "gcloud.log"
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "GCLOUD_LOG": str(log),
         "ZONE": "us-central2-b", "ACCELERATOR_TYPE": "v4-16",
         "RUNTIME_VERSION": "tpu-ubuntu2204-base", "NFS_SHARE": "10.0.0.2:/runs"}
  status, out, err = run_launcher(
      ["bash", os.path.join(LAUNCH, "tpu_vm.sh"), "my-tpu", "run1",
       "--config=configs/default.py", "--config.motivation.condition=every_n"],
      timeout=120, env=env)
  assert status == 0, out + err
  calls = log.read_text().splitlines()
  assert not any(" create " in c for c in calls)  # READY: reused
  assert any(c.startswith("compute tpus tpu-vm scp") and "--worker=all" in c for c in calls)
  ssh = [c for c in calls if c.startswith("compute tpus tpu-vm ssh my-tpu --worker=all")]
  assert any("pip install -q -e ~/motivation_jax'[tpu]'" in c for c in ssh), ssh
  assert any("mount -t nfs" in c and "10.0.0.2:/runs" in c for c in ssh), ssh
  assert ssh[-1].endswith("-m motivation_jax.main --workdir=/mnt/shared/run1 "
                          "--config=configs/default.py "
                          "--config.motivation.condition=every_n"), ssh[-1]

  # A bucket instead of the share: nothing to mount, the workdir is the URL.
  log.unlink()
  status, out, err = run_launcher(
      ["bash", os.path.join(LAUNCH, "tpu_vm.sh"), "my-tpu", "run1", "--config=configs/default.py"],
      timeout=120, env={**env, "WORKDIR_ROOT": "gs://my-bucket/runs/"})
  assert status == 0, out + err
  ssh = [c for c in log.read_text().splitlines() if c.startswith("compute tpus tpu-vm ssh")]
  assert not any("mount" in c for c in ssh), ssh
  assert ssh[-1].endswith("-m motivation_jax.main --workdir=gs://my-bucket/runs/run1 "
                          "--config=configs/default.py"), ssh[-1]


def test_local_sh_refuses_a_bad_process_count():
  for args in ([], ["two"], ["0"]):
    result = subprocess.run(["bash", LOCAL, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, (args, result.stderr)
    assert "usage:" in result.stderr


def test_local_sh_exits_with_the_failure_of_its_processes(tmp_path):
  # Both processes fail at once (before JAX starts): the script says which and
  # returns the status.
  status, _, err = run_launcher(
      ["bash", LOCAL, "2", f"--config={tmp_path}/missing.py", f"--workdir={tmp_path}/w"],
      timeout=120, env={"LOG_DIR": str(tmp_path / "logs")})
  assert status == 2, err
  assert "cannot load --config" in err
  assert re.search(r"process \d of 2 failed \(exit status 2\)", err), err


# --- start-up ------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (dict(num_processes=2), "--num_processes needs --coordinator_address and --process_id"),
    (dict(coordinator_address="h:1", process_id=0), "needs --num_processes"),
    (dict(coordinator_address="host", num_processes=2, process_id=0), "HOST:PORT"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), "--process_id must be in"),
    (dict(coordinator_address="h:1", num_processes=0, process_id=0), "--num_processes must be"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=0, local_device_ids=[-1]),
     "--local_device_ids"),
])
def test_a_bad_flag_combination_is_refused(flags, message):
  args = dict(coordinator_address=None, num_processes=None, process_id=None,
              local_device_ids=None)
  with pytest.raises(ConfigError, match=re.escape(message)):
    distributed.check_flags(**{**args, **flags})


def test_explicit_flags_ask_for_a_multi_process_run_and_none_do_not():
  assert distributed.check_flags("localhost:1234", 2, 1, None)
  assert not distributed.check_flags(None, None, None, None)


def test_a_single_process_run_does_not_start_jax_distributed():
  # This machine is no cluster JAX knows, and no flags ask for one.
  assert distributed.detected_cluster() is None
  assert distributed.initialize() is None
  with pytest.raises(ConfigError, match="--local_device_ids is for a multi-process run"):
    distributed.initialize(local_device_ids=[0])


def test_a_cluster_is_detected_as_jax_detects_it(monkeypatch):
  # JAX's private cluster registry (tests the shape distributed.py relies on).
  from jax._src import clusters
  assert clusters.SlurmCluster in clusters.ClusterEnv._cluster_types
  for name, value in {"SLURM_JOB_ID": "42", "SLURM_STEP_NODELIST": "node[001-002]",
                      "SLURM_NTASKS": "8", "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}.items():
    monkeypatch.setenv(name, value)
  assert distributed.detected_cluster() is clusters.SlurmCluster
  args = clusters.ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None,
                                                                  None, None)
  assert args[1:] == (8, 3, [3])  # what initialize() would be given: one GPU per task


def test_main_reports_a_bad_combination_in_one_line_before_starting_jax(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "motivation_jax.main", f"--config={CONFIG}",
       f"--workdir={tmp_path}", "--num_processes=2"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert lines == error_lines(result.stderr) and len(lines) == 1, result.stderr
  assert "--num_processes needs --coordinator_address and --process_id" in lines[0]
  assert not os.path.exists(tmp_path / "checkpoints")


# --- the same decision on every process ---------------------------------------------

def test_the_flip_hook_is_read_only_when_set(monkeypatch):
  monkeypatch.delenv(agreement.FLIP_DECISION_ENV, raising=False)
  assert agreement._test_flip() is None
  monkeypatch.setenv(agreement.FLIP_DECISION_ENV, "1:5")
  assert agreement._test_flip() == (1, 5)
  monkeypatch.setenv(agreement.FLIP_DECISION_ENV, "1")
  with pytest.raises(ConfigError, match="PROCESS:BATCH"):
    agreement._test_flip()


def test_a_process_that_decides_differently_stops_the_run_in_one_line(tmp_path):
  # SMALL_MLP: the run stops at batch 3, so compiling is most of its cost, and
  # the decision check does not depend on the model.
  status, out, err = run_launcher(
      ["bash", LOCAL, "2", f"--config={CONFIG}", f"--workdir={tmp_path}/w",
       "--config.num_epochs=1", *FAST, *SMALL_MLP],
      timeout=240, env={agreement.FLIP_DECISION_ENV: "1:3", "LOG_DIR": str(tmp_path / "logs")})
  assert not os.path.exists(tmp_path / "w" / "summary.json")
  if status == 134:
    # Known race, CPU only: the check reads the exchanged digests a batch after
    # the divergent step was dispatched, and gloo (the CPU collectives) may see
    # the mismatched step first and abort the process; NCCL and TPUs wait
    # instead, and the check fires before anything waits (agreement.py). Not a
    # hang either way; about 1 run in 4 under load.
    assert "collective mismatch" in err, err[-3000:]
    return
  assert status == 2, out + err
  with open(tmp_path / "logs" / "process_1.log") as f:
    process_1 = f.read()
  for text in (err, process_1):  # process 0's stderr, process 1's log
    lines = error_lines(text)
    assert len(lines) == 1, text[-3000:]
    assert lines[0].startswith("error: the processes' decisions differ at batch 3 "
                               "(process 1 against process 0)"), lines[0]
    assert "Traceback" not in text


def _table(text):
  """The summary table's rows that are the same on every process."""
  keep = ("test accuracy", "train steps", "activations", "digits:")
  return [line for line in text.splitlines() if line.startswith(keep)]


@pytest.mark.slow
def test_two_processes_decide_alike_and_summarize_as_one_process(tmp_path):
  overrides = ["--config.num_epochs=2", *FAST, *SMALL_MLP]
  status, out, err = run_launcher(
      ["bash", LOCAL, "2", f"--config={CONFIG}", f"--workdir={tmp_path}/two", *overrides],
      timeout=480, env={"LOG_DIR": str(tmp_path / "logs")})
  assert status == 0, out[-3000:] + err[-3000:]
  with open(tmp_path / "logs" / "process_1.log") as f:
    process_1 = f.read()
  # Both processes ran every batch's step kind after the check compared their
  # decision digests batch by batch, and end with the same table.
  assert _table(out) and _table(out) == _table(process_1)
  # One process with the same global devices (2 CPU devices).
  result = subprocess.run(
      [sys.executable, "-m", "motivation_jax.main", f"--config={CONFIG}",
       f"--workdir={tmp_path}/one", *overrides], cwd=ROOT, capture_output=True, text=True,
      timeout=480, env={**os.environ, "XLA_FLAGS": xla_flags(2)})
  assert result.returncode == 0, result.stderr[-3000:]
  summaries = {}
  for name in ("one", "two"):
    with open(tmp_path / name / "summary.json") as f:
      summaries[name] = json.load(f)
  one, two = summaries["one"], summaries["two"]
  assert two["motivated_steps"] > 0 and two["base_steps"] > 0  # the condition fired
  for subnet in ("base", "motivated"):
    assert abs(one[f"{subnet}/test_accuracy"] - two[f"{subnet}/test_accuracy"]) <= 0.02
  # Process 0 alone writes decisions.jsonl, one line per batch; here the
  # decisions are those of the single process (the losses agree to float
  # rounding, and the condition compares them).
  decisions = {}
  for name in ("one", "two"):
    with open(tmp_path / name / "decisions.jsonl") as f:
      decisions[name] = [json.loads(line) for line in f]
  assert [d["step"] for d in decisions["two"]] == list(range(44))
  assert ([(d["kind"], d["reason"]) for d in decisions["one"]]
          == [(d["kind"], d["reason"]) for d in decisions["two"]])
