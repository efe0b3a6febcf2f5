"""Data sets as random-access sources (the ``tfds.data_source`` interface).

A source has ``len(source)`` and ``source.read(indices) -> (images, labels)``:
images as one uint8 (N, H, W, C) array, or a list of HWC arrays where sizes
vary (ImageNet). Nothing here downloads: a data set that is not on this
machine fails at once, naming it and how to get it.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import zlib
from typing import Callable

import numpy as np

from motivation_jax.errors import ConfigError, DataError

# Where Debian's package dataset-fashion-mnist puts the IDX files.
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class ArraySource:
  """In-memory source over image/label arrays (one numpy gather per batch)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if len(images) != len(labels):
      raise ValueError(f"{len(images)} images but {len(labels)} labels")
    self.images, self.labels = images, np.asarray(labels, np.int32)
    self.dtype = np.dtype(images.dtype)  # of the images ``read`` returns

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index):
    return {"image": self.images[index], "label": self.labels[index]}

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.images[indices], self.labels[indices]


class TfdsSource:
  """A ``tfds.data_source`` split, read (and its images decoded) on demand."""

  dtype = np.dtype(np.uint8)  # of the images ``read`` returns

  def __init__(self, source, *, fixed_shape: bool):
    self.source, self.fixed_shape = source, fixed_shape

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int):
    return self.source[int(index)]

  def read(self, indices: np.ndarray):
    # One record at a time: TFDS's batched __getitems__ does not work under
    # tfds.testing.mock_data, and decoding dominates anyway.
    examples = [self.source[int(i)] for i in indices]
    images = [np.asarray(e["image"], np.uint8) for e in examples]
    labels = np.asarray([e["label"] for e in examples], np.int32)
    return (np.stack(images) if self.fixed_shape else images), labels


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  train: ArraySource | TfdsSource
  test: ArraySource | TfdsSource
  num_classes: int
  # Per-channel statistics of the training images (0..255 scale), for normalising.
  mean: tuple[float, ...]
  std: tuple[float, ...]
  # The model's input (H, W, C); images of other sizes are cropped to it.
  image_shape: tuple[int, ...]
  # The data set's standard preprocessing (pipeline.PREPROCESSING):
  # "plain", "cifar" (pad-and-crop + flip) or "imagenet" (inception crop + flip,
  # centre crop for evaluation).
  preprocessing: str = "plain"

  def description(self) -> dict:
    """What a deployed model needs to know of its data (JSON values)."""
    return {"name": self.name, "num_classes": self.num_classes,
            "image_shape": list(self.image_shape), "mean": list(self.mean),
            "std": list(self.std)}


def _moments(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  # In chunks: a float64 copy of a whole data set would take GBs.
  flat = images.reshape(-1, images.shape[-1])
  total, squares = np.zeros(flat.shape[1]), np.zeros(flat.shape[1])
  for i in range(0, len(flat), 1 << 20):
    chunk = flat[i:i + (1 << 20)].astype(np.float64)
    total += chunk.sum(0)
    squares += np.square(chunk).sum(0)
  mean = total / len(flat)
  std = np.sqrt(np.maximum(squares / len(flat) - mean ** 2, 0))
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def load_digits(data_dir: str | None = None, *, image_size: int | None = None) -> Dataset:
  """scikit-learn's bundled digits: 1,797 8x8 images, no download.

  The values 0..16 are scaled to 0..255 (uint8, 8x8x1). There is no official
  split: a fixed permutation (seed 0) puts 360 images in ``test`` and 1,437 in
  ``train``, the same on every machine.
  """
  del data_dir, image_size  # bundled with scikit-learn; 8x8 only
  from sklearn.datasets import load_digits as sklearn_digits  # heavy import, only here
  digits = sklearn_digits()
  images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(labels))
  test, train = order[:360], order[360:]
  mean, std = _moments(images[train])
  return Dataset("digits", ArraySource(images[train], labels[train]),
                 ArraySource(images[test], labels[test]), 10, mean, std, (8, 8, 1))


def read_idx(path: str, *, dims: int) -> np.ndarray:
  """An IDX file (MNIST's format, gzipped or not) as a uint8 array."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f"cannot read {path}: {e}") from e
  # Magic: two zero bytes, 0x08 (unsigned byte), the number of dimensions.
  if len(raw) < 4 + 4 * dims or raw[:4] != bytes([0, 0, 8, dims]):
    raise DataError(f"{path} is not an IDX file of {dims}-dimensional uint8 data")
  shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
  data = np.frombuffer(raw, np.uint8, offset=4 + 4 * dims)
  if data.size != np.prod(shape):
    raise DataError(f"{path} is truncated or corrupt: header says {shape}, "
                    f"it holds {data.size} values")
  return data.reshape(shape)


def _idx_file(directory: str, stem: str) -> str | None:
  for name in (stem + ".gz", stem):
    if os.path.isfile(os.path.join(directory, name)):
      return os.path.join(directory, name)
  return None


def _idx_directory(candidates) -> str | None:
  """The first directory that holds all four IDX files."""
  for directory in candidates:
    if directory and all(_idx_file(directory, stem)
                         for pair in IDX_FILES.values() for stem in pair):
      return directory
  return None


def _load_idx_split(directory: str, split: str) -> ArraySource:
  images_stem, labels_stem = IDX_FILES[split]
  images = read_idx(_idx_file(directory, images_stem), dims=3)[..., None]
  labels = read_idx(_idx_file(directory, labels_stem), dims=1)
  if len(images) != len(labels):
    raise DataError(f"{directory}: {len(images)} {split} images but {len(labels)} labels")
  return ArraySource(images, labels)


# Normalisation of the TFDS data sets: per-channel mean and std of the training
# images (0..255), the published values; Fashion-MNIST's were computed from its
# 60,000 training images (tests/test_data.py checks them against the data).
STATS = {
    "mnist": ((33.32,), (78.57,)),
    "fashion_mnist": ((72.94,), (90.02,)),
    "cifar10": ((125.31, 122.95, 113.87), (62.99, 62.09, 66.70)),
    "cifar100": ((129.30, 124.07, 112.43), (68.17, 65.39, 70.41)),
    "imagenet2012": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
}


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
  """How a TFDS data set is used here."""
  num_classes: int
  image_shape: tuple[int, ...] | None  # None: sizes vary, crop to config.image_size
  preprocessing: str
  eval_split: str = "test"
  how_to_get: str = ""  # beyond `tfds build`


TFDS_DATASETS = {
    "mnist": TfdsSpec(10, (28, 28, 1), "plain"),
    "fashion_mnist": TfdsSpec(
        10, (28, 28, 1), "plain",
        how_to_get=f"or install Debian's package dataset-fashion-mnist (IDX files in "
                   f"{DEBIAN_FASHION_MNIST}, read without TFDS)"),
    "cifar10": TfdsSpec(10, (32, 32, 3), "cifar"),
    "cifar100": TfdsSpec(100, (32, 32, 3), "cifar"),
    "imagenet2012": TfdsSpec(
        1000, None, "imagenet", eval_split="validation",
        how_to_get="after putting ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
                   "(from image-net.org) in <data_dir>/downloads/manual"),
}


def load_tfds(name: str, data_dir: str | None = None, *, image_size: int | None = None
              ) -> Dataset:
  """A TFDS data set that is already prepared (array_record), read on demand.

  Never downloads: a data set that is not there fails at once, naming it and
  how to get it. (In tests, ``tfds.testing.mock_data`` stands in for it.)
  """
  import tensorflow_datasets as tfds  # heavy import, only here

  spec = TFDS_DATASETS[name]
  splits = {}
  for split in ("train", spec.eval_split):
    try:
      source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                try_gcs=False)
    except Exception as e:  # TFDS raises several types for "not prepared here"
      where = data_dir or "TFDS's default data_dir (~/tensorflow_datasets)"
      manual = " --manual_dir=<data_dir>/downloads/manual" if name == "imagenet2012" else ""
      get = f" {spec.how_to_get}" if spec.how_to_get else ""
      raise DataError(
          f"data set {name!r} is not prepared in {where} ({type(e).__name__}); prepare it "
          f"where there is network with `tfds build {name} --file_format=array_record"
          f"{manual}`{get} and point --config.data_dir at that directory") from e
    splits[split] = TfdsSource(source, fixed_shape=spec.image_shape is not None)
  mean, std = STATS[name]
  return Dataset(name, splits["train"], splits[spec.eval_split], spec.num_classes, mean, std,
                 _image_shape(name, spec, image_size), spec.preprocessing)


def _image_shape(name: str, spec: TfdsSpec, image_size: int | None) -> tuple[int, ...]:
  if spec.image_shape is None:
    size = image_size or 224
    return (size, size, 3)
  return spec.image_shape


def load_idx_or_tfds(name: str, data_dir: str | None = None, *,
                     image_size: int | None = None) -> Dataset:
  """MNIST-format data sets: the IDX files in ``data_dir`` (or, for
  Fashion-MNIST, Debian's package), read offline; else the prepared TFDS set."""
  spec = TFDS_DATASETS[name]
  candidates = [data_dir, data_dir and os.path.join(data_dir, name)]
  if name == "fashion_mnist":
    candidates.append(DEBIAN_FASHION_MNIST)
  directory = _idx_directory(candidates)
  if directory is None:
    return load_tfds(name, data_dir, image_size=image_size)
  mean, std = STATS[name]
  return Dataset(name, _load_idx_split(directory, "train"), _load_idx_split(directory, "test"),
                 spec.num_classes, mean, std, spec.image_shape, spec.preprocessing)


DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
    "mnist": functools.partial(load_idx_or_tfds, "mnist"),
    "fashion_mnist": functools.partial(load_idx_or_tfds, "fashion_mnist"),
    "cifar10": functools.partial(load_tfds, "cifar10"),
    "cifar100": functools.partial(load_tfds, "cifar100"),
    "imagenet2012": functools.partial(load_tfds, "imagenet2012"),
}


def get_dataset(name: str, data_dir: str | None = None, *, mock_examples: int = 0,
                image_size: int | None = None) -> Dataset:
  """The data set ``name``; ``mock_examples > 0``: TFDS mock data of that many
  examples per split in its place (random images of the right shapes).

  ``image_size``: the side of the model's input for ImageNet (224 if unset).
  """
  if name not in DATASETS:
    raise DataError(f"unknown data set {name!r}; available here: {', '.join(sorted(DATASETS))}")
  if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                 or image_size < 8):
    raise ConfigError(f"config.image_size must be unset (None) or an integer >= 8, "
                      f"got {image_size!r}")
  if image_size and name != "imagenet2012":
    raise DataError(f"config.image_size={image_size} applies only to ImageNet, whose images "
                    f"vary in size; {name}'s have one size (leave it unset)")
  if not mock_examples:
    return DATASETS[name](data_dir, image_size=image_size)
  if name not in TFDS_DATASETS:
    raise DataError(f"mock data stands in for TFDS data sets ({', '.join(TFDS_DATASETS)}), "
                    f"not for {name!r}")
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=mock_examples):
    dataset = load_tfds(name, None, image_size=image_size)
  return dataclasses.replace(dataset, name=f"{name} (mock data)")
