"""Data sources and host pipelines."""

import time

import numpy as np
import pytest

from motivation_jax import data
from motivation_jax.data.sources import ArraySource
from motivation_jax.errors import DataError


@pytest.fixture(scope="module")
def digits():
  return data.get_dataset("digits")


def test_digits_split_is_fixed_disjoint_and_complete(digits):
  assert (len(digits.train), len(digits.test)) == (1437, 360)
  assert digits.image_shape == (8, 8, 1) and digits.num_classes == 10
  train = {digits.train[i]["image"].tobytes() + bytes([digits.train[i]["label"]])
           for i in range(len(digits.train))}
  again = data.get_dataset("digits")
  np.testing.assert_array_equal(again.test.images, digits.test.images)
  assert digits.train.images.dtype == np.uint8 and digits.train.images.max() > 200
  # No test image (with its label) is also a training image... up to the few
  # exact duplicates digits has; almost all must differ.
  overlap = sum(digits.test[i]["image"].tobytes() + bytes([digits.test[i]["label"]]) in train
                for i in range(len(digits.test)))
  assert overlap < 5


def test_a_resumed_iterator_yields_exactly_the_uninterrupted_batches(digits):
  make = lambda: data.TrainBatches(digits.train, 100, seed=7, mean=digits.mean, std=digits.std)
  steps_per_epoch = make().steps_per_epoch
  assert steps_per_epoch == 14
  uninterrupted = make().iterate(0)
  straight = [next(uninterrupted) for _ in range(3 * steps_per_epoch)]
  resume_at = steps_per_epoch - 2  # the resumed run crosses an epoch boundary
  resumed = make().iterate(resume_at)
  for step in range(resume_at, 3 * steps_per_epoch):
    batch = next(resumed)
    np.testing.assert_array_equal(batch["image"], straight[step]["image"])
    np.testing.assert_array_equal(batch["label"], straight[step]["label"])
  # Epochs are reshuffled, and seeds matter.
  assert not np.array_equal(straight[0]["label"], straight[steps_per_epoch]["label"])
  other = data.TrainBatches(digits.train, 100, seed=8, mean=digits.mean, std=digits.std)
  assert not np.array_equal(other[0]["label"], straight[0]["label"])


def test_an_epoch_sees_each_training_example_at_most_once():
  n = 1000  # images that are their own index
  source = ArraySource(np.arange(n, dtype=np.int32).reshape(n, 1, 1, 1), np.zeros(n, np.int32))
  batches = data.TrainBatches(source, 64, seed=0, mean=(0.,), std=(1.,))
  for epoch in range(2):
    seen = np.concatenate([batches[epoch * batches.steps_per_epoch + i]["image"].ravel()
                           for i in range(batches.steps_per_epoch)])
    assert len(np.unique(seen)) == len(seen) == 64 * 15


def test_evaluation_counts_every_example_once_when_the_batch_size_does_not_divide(digits):
  batch_size = 97  # 360 = 3 * 97 + 69
  batches = list(data.eval_batches(digits.test, batch_size, mean=digits.mean, std=digits.std))
  assert len(batches) == data.num_eval_batches(digits.test, batch_size) == 4
  assert all(b["image"].shape == (batch_size, 8, 8, 1) for b in batches)
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == 360 and mask[:360].all() and not mask[360:].any()
  labels = np.concatenate([b["label"] for b in batches])[:360]
  np.testing.assert_array_equal(labels, digits.test.labels)


def test_an_unknown_data_set_fails_at_once_naming_it():
  with pytest.raises(DataError, match="unknown data set 'cifar11'; available here: cifar10, "
                     "cifar100, digits"):
    data.get_dataset("cifar11")


def test_a_missing_tfds_data_set_fails_at_once_saying_how_to_get_it(tmp_path):
  start = time.monotonic()
  with pytest.raises(DataError, match=r"data set 'cifar10' is not prepared in .*empty .*"
                     r"tfds build cifar10 --file_format=array_record.*--config.data_dir"):
    data.get_dataset("cifar10", str(tmp_path / "empty"))
  assert time.monotonic() - start < 30  # no download attempt
  assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").rglob("*.array*"))


def test_mock_data_stands_in_for_a_tfds_data_set_only():
  cifar = data.get_dataset("cifar100", mock_examples=40)
  assert cifar.name == "cifar100 (mock data)" and cifar.num_classes == 100
  assert len(cifar.train) == len(cifar.test) == 40
  assert cifar.image_shape == (32, 32, 3) and len(cifar.mean) == 3
  assert cifar.train[[0, 1]]["image"].dtype == np.uint8
  with pytest.raises(DataError, match="mock data stands in for TFDS data sets"):
    data.get_dataset("digits", mock_examples=40)
