"""Data sets as random-access sources (the ``tfds.data_source`` interface)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from motivation_jax.errors import DataError


class ArraySource:
  """In-memory random-access source over image/label arrays.

  Indexing with an int gives one example; with an array of indices, a batch
  (one numpy gather instead of a Python loop).
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if len(images) != len(labels):
      raise ValueError(f"{len(images)} images but {len(labels)} labels")
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index):
    return {"image": self.images[index], "label": self.labels[index]}


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  train: ArraySource
  test: ArraySource
  num_classes: int
  # Per-channel statistics of the training images (0..255 scale), for normalising.
  mean: tuple[float, ...]
  std: tuple[float, ...]

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.train[0]["image"].shape)


def _from_arrays(name, train_x, train_y, test_x, test_y, num_classes) -> Dataset:
  axes = tuple(range(train_x.ndim - 1))
  mean = tuple(float(m) for m in train_x.mean(axis=axes))
  std = tuple(float(s) for s in train_x.std(axis=axes))
  return Dataset(name, ArraySource(train_x, train_y), ArraySource(test_x, test_y),
                 num_classes, mean, std)


def load_digits(data_dir: str | None = None) -> Dataset:
  """scikit-learn's bundled digits: 1,797 8x8 images, no download.

  The values 0..16 are scaled to 0..255 (uint8, 8x8x1). There is no official
  split: a fixed permutation (seed 0) puts 360 images in ``test`` and 1,437 in
  ``train``, the same on every machine.
  """
  del data_dir  # bundled with scikit-learn
  from sklearn.datasets import load_digits as sklearn_digits  # heavy import, only here
  digits = sklearn_digits()
  images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(labels))
  test, train = order[:360], order[360:]
  return _from_arrays("digits", images[train], labels[train], images[test], labels[test], 10)


DATASETS: dict[str, Callable[[str | None], Dataset]] = {"digits": load_digits}


def get_dataset(name: str, data_dir: str | None = None) -> Dataset:
  if name not in DATASETS:
    raise DataError(f"unknown data set {name!r}; available here: {', '.join(sorted(DATASETS))}")
  return DATASETS[name](data_dir)
