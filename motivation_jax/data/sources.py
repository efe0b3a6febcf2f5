"""Data sets as random-access sources (the ``tfds.data_source`` interface)."""

from __future__ import annotations

import dataclasses
import functools
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

  def description(self) -> dict:
    """What a deployed model needs to know of its data (JSON values)."""
    return {"name": self.name, "num_classes": self.num_classes,
            "image_shape": list(self.image_shape), "mean": list(self.mean),
            "std": list(self.std)}


def _from_arrays(name, train_x, train_y, test_x, test_y, num_classes) -> Dataset:
  # Per-channel moments in chunks: a float64 copy of CIFAR's 50,000 images
  # would take over a GB.
  flat = train_x.reshape(-1, train_x.shape[-1])
  total, squares = np.zeros(flat.shape[1]), np.zeros(flat.shape[1])
  for i in range(0, len(flat), 1 << 20):
    chunk = flat[i:i + (1 << 20)].astype(np.float64)
    total += chunk.sum(0)
    squares += np.square(chunk).sum(0)
  mean_values = total / len(flat)
  mean = tuple(float(m) for m in mean_values)
  std = tuple(float(s) for s in np.sqrt(np.maximum(squares / len(flat) - mean_values ** 2, 0)))
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


def load_tfds(name: str, data_dir: str | None = None, *, num_classes: int) -> Dataset:
  """A TFDS image data set that is already prepared (array_record), read into memory.

  Never downloads: a data set that is not there fails at once, naming it and
  how to get it. (In tests, ``tfds.testing.mock_data`` stands in for it.)
  """
  import tensorflow_datasets as tfds  # heavy import, only here

  splits = {}
  for split in ("train", "test"):
    try:
      source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                try_gcs=False)
    except Exception as e:  # TFDS raises several types for "not prepared here"
      where = data_dir or "TFDS's default data_dir (~/tensorflow_datasets)"
      raise DataError(
          f"data set {name!r} is not prepared in {where} ({type(e).__name__}); prepare it "
          f"where there is network with `tfds build {name} --file_format=array_record` and "
          "point --config.data_dir at that directory") from e
    examples = [source[i] for i in range(len(source))]
    splits[split] = (np.stack([np.asarray(x["image"], np.uint8) for x in examples]),
                     np.asarray([x["label"] for x in examples], np.int32))
  return _from_arrays(name, *splits["train"], *splits["test"], num_classes)


TFDS_DATASETS = ("cifar10", "cifar100")
DATASETS: dict[str, Callable[[str | None], Dataset]] = {
    "digits": load_digits,
    "cifar10": functools.partial(load_tfds, "cifar10", num_classes=10),
    "cifar100": functools.partial(load_tfds, "cifar100", num_classes=100),
}


def get_dataset(name: str, data_dir: str | None = None, *, mock_examples: int = 0) -> Dataset:
  """The data set ``name``; ``mock_examples > 0``: TFDS mock data of that many
  examples per split in its place (random images of the right shapes)."""
  if name not in DATASETS:
    raise DataError(f"unknown data set {name!r}; available here: {', '.join(sorted(DATASETS))}")
  if not mock_examples:
    return DATASETS[name](data_dir)
  if name not in TFDS_DATASETS:
    raise DataError(f"mock data stands in for TFDS data sets ({', '.join(TFDS_DATASETS)}), "
                    f"not for {name!r}")
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=mock_examples):
    dataset = DATASETS[name](None)
  return dataclasses.replace(dataset, name=f"{name} (mock data)")
