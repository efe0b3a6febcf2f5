"""grain worker processes (``config.data_workers``) and uint8 batches normalised on the device.

Workers must give the threads' batches bit for bit (also from a resumed
position) and never start a JAX backend; uint8 batches through the steps'
on-device normalisation must train, evaluate and recalibrate as the host's
float32 batches do; and a plain ``python -m motivation_jax.main`` start with
workers runs to the end.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from conftest import ROOT, SMALL_MLP, load_default_config
from motivation_jax import data, recalibration, steps, train
from motivation_jax.data.sources import ArraySource
from motivation_jax.errors import ConfigError


def _toy_cifar(n=96, seed=0) -> data.Dataset:
  """Random 16x16 RGB uint8 images with CIFAR's augmentation, in memory (picklable)."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, n).astype(np.int32)
  source = ArraySource(images, labels)
  return data.Dataset("toy_cifar", source, ArraySource(images[:40], labels[:40]), 10,
                      (120.0, 115.0, 100.0), (60.0, 61.0, 66.0), (16, 16, 3), "cifar")


def _same(got: list[dict], want: list[dict]) -> None:
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    for key in g:
      assert type(g[key]) is np.ndarray  # not grain's shared-memory view
      assert g[key].dtype == w[key].dtype and g[key].tobytes() == w[key].tobytes(), key


# Slow (9 s): the fast run has workers against threads on ImageNet's JPEGs and
# uint8 batches below; this one adds a resume.
@pytest.mark.slow
def test_workers_give_the_threads_batches_and_the_same_after_a_resume():
  dataset = _toy_cifar()
  batches = data.TrainBatches(dataset, 16, seed=3)  # 6 batches per epoch
  assert batches.augment and batches.global_shapes()["image"][1] == np.uint8
  total = 14  # two epoch boundaries
  threads = list(batches.iterator(0, total, threads=2))
  _same(list(batches.iterator(0, total, threads=0, workers=2)), threads)
  # A resumed run starts its workers at the checkpoint's next batch.
  resumed = batches.iterator(5, total, threads=0, workers=3)
  assert resumed.next_batch == 5
  _same(list(resumed), threads[5:])
  assert resumed.next_batch == total
  # Evaluation too: every test example once, padding and mask as with threads.
  eval_data = data.EvalBatches(dataset, 16)
  _same(list(eval_data.iterator(workers=2)), list(eval_data.iterator(threads=2)))


def _worker_report(index: int) -> dict:
  """Runs in a grain worker: what it has started."""
  from jax._src import distributed, xla_bridge

  return {"pid": np.array(os.getpid()), "index": np.array(index),
          "backends": np.array(len(xla_bridge._backends)),
          "distributed": np.array(distributed.global_state.client is not None),
          "platforms": np.array(str(jax.config.jax_platforms))}


def test_workers_are_other_processes_that_start_no_jax_backend():
  reports = list(data.BatchIterator(_worker_report, 0, 4, threads=0, buffer=1, workers=2))
  assert [int(r["index"]) for r in reports] == [0, 1, 2, 3]
  pids = {int(r["pid"]) for r in reports}
  assert len(pids) == 2 and os.getpid() not in pids
  assert all(int(r["backends"]) == 0 and not r["distributed"] for r in reports)
  # A stray device access in a worker would stay off the accelerator.
  assert all(str(r["platforms"]) == "cpu" for r in reports)


def test_imagenet_jpegs_decode_in_workers_as_in_threads(tmp_path):
  """The case workers are for: a TFDS array_record source, pickled to the workers."""
  script = __import__("conftest").load_script("benchmarks/data_throughput.py")
  script.write_synthetic_imagenet(str(tmp_path), 8)
  imagenet = data.get_dataset("imagenet2012", str(tmp_path), image_size=32)
  batches = data.TrainBatches(imagenet, 4, seed=0)
  threads = list(batches.iterator(0, 4, threads=2))
  assert threads[0]["image"].dtype == np.uint8 and threads[0]["image"].shape == (4, 32, 32, 3)
  _same(list(batches.iterator(0, 4, threads=0, workers=2)), threads)


def _small_cnn_config():
  """The default config (a batch-norm CNN) with a small pair: what is checked
  here does not depend on the widths, and the compile time grows with the depth."""
  config = load_default_config()
  config.model.base = {"widths": (4, 8), "depths": (1, 1)}
  config.model.motivated = {"widths": (8, 16), "depths": (1, 2)}
  return config


def test_uint8_batches_normalised_on_the_device_train_as_host_normalised_ones():
  dataset = _toy_cifar()
  config = _small_cnn_config()
  model, wmap, _ = train.build(config, dataset)
  optimizer = steps.make_optimizer(config, 100, 6)
  normalisation = (dataset.mean, dataset.std)
  uint8 = data.TrainBatches(dataset, 16, seed=0)[0]
  floats = data.TrainBatches(dataset, 16, seed=0, normalise_on_host=True)[0]
  assert uint8["image"].dtype == np.uint8 and floats["image"].dtype == np.float32
  # The same arithmetic on the device as on the host: the same values, bit for bit.
  normalise = jax.jit(steps.normalise_images, static_argnums=1)
  np.testing.assert_array_equal(normalise(uint8["image"], normalisation), floats["image"])
  every_value = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
  for mean, std in data.sources.STATS.values():
    pixels = every_value[:, :len(mean)]
    np.testing.assert_array_equal(normalise(pixels, (mean, std)),
                                  data.pipeline.normalise(pixels, mean, std))

  fns = steps.make_train_steps(model, optimizer, wmap=wmap, normalisation=normalisation)
  init = lambda: steps.create_train_state(model, optimizer, jax.random.key(0),
                                          floats["image"][:1])
  for kind in ("base", "motivated"):
    # A float batch is used as it is (users' own pipelines), a uint8 one normalised.
    state_f, metrics_f = fns[kind](init(), floats)
    state_u, metrics_u = fns[kind](init(), uint8)
    np.testing.assert_allclose(metrics_u["loss"], metrics_f["loss"], rtol=1e-5)
    jax.tree.map(lambda u, f: np.testing.assert_allclose(u, f, rtol=1e-5, atol=1e-6),
                 state_u.params, state_f.params)

  state = init()
  eval_steps = steps.make_eval_steps(model, normalisation=normalisation)
  eval_u, eval_f = (data.EvalBatches(dataset, 16, normalise_on_host=h)[2] for h in (False, True))
  for subnet, fn in eval_steps.items():
    sums_u, sums_f = fn(state.variables(subnet), eval_u), fn(state.variables(subnet), eval_f)
    assert float(sums_u["count"]) == float(sums_f["count"]) == 8  # 40 = 2 * 16 + 8
    np.testing.assert_allclose(sums_u["loss_sum"], sums_f["loss_sum"], rtol=1e-5)

  recalibrate = recalibration.make_recalibrate(model, wmap, normalisation=normalisation)
  stats_u = recalibrate(state, [uint8])
  stats_f = recalibrate(state, [floats])
  jax.tree.map(lambda u, f: np.testing.assert_allclose(u, f, rtol=1e-5, atol=1e-6),
               stats_u, stats_f)


def test_uint8_images_without_the_data_sets_statistics_are_refused():
  dataset = _toy_cifar()
  config = _small_cnn_config()
  model, wmap, _ = train.build(config, dataset)
  batch = data.EvalBatches(dataset, 8)[0]
  state = steps.create_train_state(model, optax.sgd(0.1), jax.random.key(0),
                                   np.zeros((1, 16, 16, 3), np.float32))
  with pytest.raises(ValueError, match=r"uint8 images need the data set's mean and std"):
    steps.make_eval_steps(model)["base"](state.variables("base"), batch)


def test_a_negative_worker_count_is_refused(tmp_path):
  config = load_default_config()
  config.data_workers = -1
  with pytest.raises(ConfigError, match=r"config.data_workers must be an integer >= 0"):
    train.train_and_evaluate(config, str(tmp_path))


def _run_main(workdir, *overrides):
  return subprocess.run(
      [sys.executable, "-m", "motivation_jax.main", "--config=configs/default.py",
       f"--workdir={workdir}", "--config.num_epochs=1", "--config.progress_bar=False",
       "--config.bn_recalibration_batches=2", *overrides],
      cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # two whole runs; the workers' batches are checked in process above
def test_a_run_with_workers_runs_to_the_end_with_the_decisions_of_a_run_with_threads(tmp_path):
  """A plain ``python -m`` start with workers: they re-import
  ``motivation_jax.main`` as ``__mp_main__`` (spawn), with no second ``main()``,
  no second ``jax.distributed`` and flags readable; and its batches are the
  threads' (a small MLP: the data path is what is tested)."""
  for name, workers in (("workers", 2), ("threads", 0)):
    result = _run_main(tmp_path / name, f"--config.data_workers={workers}", *SMALL_MLP)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
  summaries = [json.load(open(tmp_path / name / "summary.json")) for name in ("workers", "threads")]
  assert summaries[0]["base_steps"] + summaries[0]["motivated_steps"] == 22  # 1,437 // 64
  keys = ("base/test_accuracy", "motivated/test_accuracy", "base_steps", "motivated_steps")
  assert [summaries[0][k] for k in keys] == [summaries[1][k] for k in keys]
  decisions = [open(tmp_path / name / "decisions.jsonl").read() for name in ("workers", "threads")]
  assert decisions[0] == decisions[1]  # every decision and every loss, to the last digit
