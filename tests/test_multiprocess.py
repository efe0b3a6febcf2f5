"""Per-host input sharding in a real multi-process JAX run on CPU.

Two processes (tests/multiprocess_worker.py) join through
``jax.distributed.initialize`` on localhost, each with 2 CPU devices: one global
mesh of 4 devices. Each process reads only its rows of every batch
(``sharding.process_rows``) and ``sharding.global_batch`` assembles the global
``jax.Array``; the workers gather it back and this (single, undistributed)
process compares it with the batches it computes alone.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from motivation_jax import data

from conftest import ROOT, what_it_trained, xla_flags

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiprocess_worker.py")
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
TIMEOUT_S = 240

# CIFAR-10 mock data (its augmentation: pad-and-crop + flip): 20 examples per
# split, 2 batches of 8 per epoch, so steps 0..3 cross an epoch boundary.
MOCK_EXAMPLES = 20
BATCH_SIZE = 8
TRAIN_STEPS = (0, 1, 2, 3)
SEED = 7
# Neither divides the 20 test examples: with 8, process 1's share of the last
# batch is all padding; with 12, it is partly padding.
EVAL_BATCH_SIZES = (8, 12)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _log_tail(path: str, chars: int = 4000) -> str:
  with open(path, errors="replace") as f:
    return f.read()[-chars:]


def _wait_for_coordinator(proc, port: int, deadline: float) -> str | None:
  """Waits until process 0 listens on ``port``, before the others start. A
  process that connects before the coordinator's service is up retries with
  gRPC's growing backoff (by default 1 s, then 1.6x each time, up to 2 min). In
  one cold full run on the loaded 2-core machine the data fixture took 152 s
  (5 s alone, cold); a late coordinator is the suspected cause, not a proven one."""
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      return "process 0 exited before its coordinator listened"
    try:
      with socket.create_connection(("localhost", port), timeout=1):
        return None
    except OSError:
      time.sleep(0.05)
  return f"process 0's coordinator did not listen on port {port} within {TIMEOUT_S} s"


def run_workers(out_dir, part: str, **env) -> list[tuple[dict, dict]]:
  """Runs the workers to the end; ``[(json, arrays)]`` of each process, in
  process order. Fails with their output if one fails or they time out."""
  out_dir = str(out_dir)
  env = {**os.environ, **env,
         "XLA_FLAGS": xla_flags(DEVICES_PER_PROCESS),
         "JAX_PLATFORMS": "cpu"}
  port = _free_port()
  logs = [os.path.join(out_dir, f"process_{i}.log") for i in range(NUM_PROCESSES)]
  procs = []
  deadline = time.monotonic() + TIMEOUT_S
  problem = None
  for i, log in enumerate(logs):
    with open(log, "w") as f:
      procs.append(subprocess.Popen(
          [sys.executable, WORKER, str(i), str(NUM_PROCESSES), str(port), out_dir, part],
          cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
    if i == 0:
      problem = _wait_for_coordinator(procs[0], port, deadline)
      if problem is not None:
        break
  while problem is None and any(p.poll() is None for p in procs):
    if any(p.poll() not in (None, 0) for p in procs):
      problem = "a worker failed"  # the others would wait for it until their timeout
    elif time.monotonic() > deadline:
      problem = f"the workers did not finish within {TIMEOUT_S} s"
    else:
      time.sleep(0.1)
  for p in procs:
    if p.poll() is None:
      p.kill()
    p.wait()
  if problem is None and any(p.returncode for p in procs):
    problem = "a worker failed"
  if problem:
    report = "\n".join(f"--- process {i} (exit status {p.returncode}):\n{_log_tail(log)}"
                       for i, (p, log) in enumerate(zip(procs, logs)))
    pytest.fail(f"{problem}\n{report}", pytrace=False)
  results = []
  for i in range(NUM_PROCESSES):
    with open(os.path.join(out_dir, f"process_{i}.json")) as f:
      info = json.load(f)
    with np.load(os.path.join(out_dir, f"process_{i}.npz")) as npz:
      results.append((info, dict(npz)))
  return results


@pytest.fixture(scope="module")
def data_results(tmp_path_factory):
  return run_workers(tmp_path_factory.mktemp("multiprocess_data"), "data",
                     MP_MOCK_EXAMPLES=str(MOCK_EXAMPLES), MP_BATCH_SIZE=str(BATCH_SIZE),
                     MP_TRAIN_STEPS=",".join(map(str, TRAIN_STEPS)), MP_SEED=str(SEED),
                     MP_EVAL_BATCH_SIZES=",".join(map(str, EVAL_BATCH_SIZES)))


@pytest.fixture(scope="module")
def cifar():
  return data.get_dataset("cifar10", mock_examples=MOCK_EXAMPLES)


def test_the_processes_form_one_mesh_of_all_their_devices(data_results):
  for i, (info, _) in enumerate(data_results):
    assert info["process_index"] == i
    assert info["process_count"] == NUM_PROCESSES
    assert info["local_device_count"] == DEVICES_PER_PROCESS
    assert info["device_count"] == NUM_PROCESSES * DEVICES_PER_PROCESS
    # The mesh's devices in process order: each process's devices hold one
    # contiguous part of a batch.
    assert info["mesh_device_processes"] == sorted(info["mesh_device_processes"])
    assert sorted(set(info["mesh_device_processes"])) == list(range(NUM_PROCESSES))


@pytest.mark.parametrize("key,size", [("train", BATCH_SIZE)]
                         + [(f"eval_{b}", b) for b in EVAL_BATCH_SIZES])
def test_each_process_reads_a_distinct_contiguous_share_and_together_the_whole_batch(
    data_results, key, size):
  shares = [tuple(info[f"{key}_rows"]) for info, _ in data_results]
  # In process order, end to end from row 0 to the last: contiguous, distinct
  # (no overlap), none empty, and covering the global batch.
  assert shares[0][0] == 0 and shares[-1][1] == size, shares
  for (start, stop), (next_start, _) in zip(shares, shares[1:]):
    assert stop == next_start, shares
  assert all(start < stop for start, stop in shares), shares
  # With equal devices per process, equal shares.
  assert len({stop - start for start, stop in shares}) == 1, shares


def test_each_process_reads_only_its_share_of_a_training_batch(data_results):
  for info, arrays in data_results:
    start, stop = info["train_rows"]
    assert info["train_share_sizes"] == [stop - start] * len(TRAIN_STEPS)
    for t in TRAIN_STEPS:
      for key in ("image", "label"):
        assert arrays[f"train_{t}_share_{key}"].shape[0] == stop - start
        # Its rows of the global array are exactly what it read.
        np.testing.assert_array_equal(arrays[f"train_{t}_{key}"][start:stop],
                                      arrays[f"train_{t}_share_{key}"])


def test_the_global_training_batches_are_the_single_process_batches(data_results, cifar):
  alone = data.TrainBatches(cifar, BATCH_SIZE, seed=SEED, augment=True, rows=None)
  assert alone.augment
  assert [info["steps_per_epoch"] for info, _ in data_results] == [alone.steps_per_epoch] * 2
  # The steps include an epoch boundary (a new permutation).
  assert min(TRAIN_STEPS) < alone.steps_per_epoch <= max(TRAIN_STEPS)
  plain = data.TrainBatches(cifar, BATCH_SIZE, seed=SEED, augment=False)
  augmented_somewhere = False
  for t in TRAIN_STEPS:
    expected = alone[t]
    for info, arrays in data_results:
      for key in ("image", "label"):
        got = arrays[f"train_{t}_{key}"]
        assert got.dtype == expected[key].dtype and got.shape == expected[key].shape
        # Bit for bit (a view of the same bytes: -0.0 vs 0.0 or NaNs would differ).
        assert got.tobytes() == expected[key].tobytes(), (
            f"process {info['process_index']}: global batch {t} {key} differs from the "
            "single-process batch")
    augmented_somewhere |= not np.array_equal(expected["image"], plain[t]["image"])
  # The augmentation really ran (so the shares had to slice the global draws).
  assert augmented_somewhere


@pytest.mark.parametrize("size", EVAL_BATCH_SIZES)
def test_evaluation_counts_every_test_example_exactly_once(data_results, cifar, size):
  n = len(cifar.test)
  assert n % size, "the global eval batch must not divide the test set"
  alone = data.EvalBatches(cifar, size, rows=None)
  for info, arrays in data_results:
    assert info[f"eval_{size}_num_batches"] == len(alone) == -(-n // size)
    # The mask summed on the devices over the sharded global batches.
    assert info[f"eval_{size}_mask_sum"] == n
    labels, images = [], []
    for b in range(len(alone)):
      expected = alone[b]
      for key in ("image", "label", "mask"):
        assert arrays[f"eval_{size}_{b}_{key}"].tobytes() == expected[key].tobytes(), (
            f"process {info['process_index']}: eval batch {b} {key}")
      mask = arrays[f"eval_{size}_{b}_mask"].astype(bool)
      labels.append(arrays[f"eval_{size}_{b}_label"][mask])
      images.append(arrays[f"eval_{size}_{b}_image"][mask])
    # The real rows, in order, are the test set once.
    all_images, all_labels = cifar.test.read(np.arange(n))
    np.testing.assert_array_equal(np.concatenate(labels), all_labels)
    np.testing.assert_array_equal(np.concatenate(images), all_images)  # uint8, as stored


# --- train_and_evaluate on two processes -------------------------------------

TRAIN_OVERRIDES = {"num_epochs": 1}


@pytest.fixture(scope="module")
def train_results(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("multiprocess_train")
  workdir = out_dir / "workdir"  # the same for both processes (Orbax writes one checkpoint)
  results = run_workers(out_dir, "train", MP_CONFIG=os.path.join(ROOT, "configs", "default.py"),
                        MP_OVERRIDES=json.dumps(TRAIN_OVERRIDES), MP_WORKDIR=str(workdir))
  return [info for info, _ in results], workdir


# The full run only (about 30 s): the fast loop starts two processes in
# tests/test_launch.py's decision-check test.
@pytest.mark.slow
def test_training_on_two_processes_gives_both_the_same_summary(train_results):
  infos, workdir = train_results
  summaries = [what_it_trained(info["summary"]) for info in infos]
  assert summaries[0] == summaries[1]
  summary = summaries[0]
  steps = summary["base_steps"] + summary["motivated_steps"]
  assert steps == 1437 // 64  # one epoch of digits at the default batch size
  assert 0 < summary["motivated_steps"] < steps
  assert summary["resumed_from_step"] == 0
  for subnet in ("base", "motivated"):
    assert 0.0 <= summary[f"{subnet}/test_accuracy"] <= 1.0
  # One checkpoint, written by both processes together, of the last batch.
  assert os.listdir(workdir / "checkpoints") == [str(steps)]
  assert (workdir / "checkpoints" / str(steps) / "commit_success.txt").exists()
  # Process 0 alone writes the metrics: one eval record.
  metrics = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert sum("base/test_accuracy" in m for m in metrics) == 1


@pytest.mark.slow
def test_training_on_two_processes_records_each_decision_once(train_results):
  _, workdir = train_results
  decisions = [json.loads(l) for l in open(workdir / "decisions.jsonl")]
  assert [d["step"] for d in decisions] == list(range(1437 // 64))
