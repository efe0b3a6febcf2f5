"""Data sources and host pipelines: resume, exact evaluation, shares, offline data."""

import gzip
import os
import time

import jax
import numpy as np
import pytest

from motivation_jax import data, sharding
from motivation_jax.data import augment, sources
from motivation_jax.data.sources import ArraySource, Dataset
from motivation_jax.errors import DataError


@pytest.fixture(scope="module")
def digits():
  return data.get_dataset("digits")


@pytest.fixture(scope="module")
def cifar():
  return data.get_dataset("cifar10", mock_examples=300)


def _equal_batches(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def _indexed_dataset(n: int, preprocessing="plain", shape=(1, 1, 1)) -> Dataset:
  """Images whose every pixel is their own index (mod 256 is not needed: n < 256)."""
  images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, *shape))
  source = ArraySource(np.ascontiguousarray(images), np.arange(n) % 10)
  return Dataset("indexed", source, source, 10, (0.0,) * shape[-1], (1.0,) * shape[-1],
                 shape, preprocessing)


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


@pytest.mark.parametrize("name", ["digits", "cifar"])
def test_a_resumed_iterator_yields_exactly_the_uninterrupted_batches(name, request):
  dataset = request.getfixturevalue(name)  # cifar: augmented, so the draws must match too
  batches = data.TrainBatches(dataset, 100, seed=7)
  per_epoch = batches.steps_per_epoch
  total = 3 * per_epoch
  uninterrupted = list(batches.iterator(0, total, threads=2))
  assert len(uninterrupted) == total
  # Interrupt just before an epoch boundary, with grain's threads running ahead.
  first = data.TrainBatches(dataset, 100, seed=7).iterator(0, total, threads=2, buffer=8)
  for _ in range(per_epoch - 1):
    next(first)
  position = batches.position(first.next_batch)
  del first
  again = data.TrainBatches(dataset, 100, seed=7)
  start = again.check_position(position)
  assert start == per_epoch - 1
  resumed = list(again.iterator(start, total, threads=2))
  assert len(resumed) == total - start
  for got, want in zip(resumed, uninterrupted[start:]):
    _equal_batches(got, want)
  # What run_setup.py compiles for, without reading a batch: the batches' own shapes.
  assert {k: (v.shape, v.dtype) for k, v in uninterrupted[0].items()} == batches.global_shapes()
  # Epochs are reshuffled, and seeds matter.
  assert not np.array_equal(uninterrupted[0]["label"], uninterrupted[per_epoch]["label"])
  other = data.TrainBatches(dataset, 100, seed=8)
  assert not np.array_equal(other[0]["image"], uninterrupted[0]["image"])


def test_a_position_from_other_batches_is_refused(digits):
  position = data.TrainBatches(digits, 100, seed=7).position(5)
  with pytest.raises(DataError, match=r"other batches \(global_batch_size 100 -> 50\)"):
    data.TrainBatches(digits, 50, seed=7).check_position(position)
  with pytest.raises(DataError, match=r"seed 7 -> 8"):
    data.TrainBatches(digits, 100, seed=8).check_position(position)


def test_an_epoch_sees_each_training_example_at_most_once():
  batches = data.TrainBatches(_indexed_dataset(250), 16, seed=0)
  assert batches.steps_per_epoch == 15
  for epoch in range(2):
    seen = np.concatenate([batches[epoch * 15 + i]["image"].ravel() for i in range(15)])
    assert len(np.unique(seen)) == len(seen) == 16 * 15


@pytest.mark.parametrize("processes", [2, 4])
def test_process_shares_make_the_same_global_batch_as_one_process(cifar, processes):
  alone = data.TrainBatches(cifar, 64, seed=3)
  share = 64 // processes
  parts = [data.TrainBatches(cifar, 64, seed=3, rows=slice(p * share, (p + 1) * share))
           for p in range(processes)]
  for step in (0, alone.steps_per_epoch):  # augmentation and the next epoch's order
    want = alone[step]
    got = [part[step] for part in parts]
    assert all(g["image"].shape == (share, 32, 32, 3) for g in got)
    _equal_batches({k: np.concatenate([g[k] for g in got]) for k in want}, want)


def test_the_global_batch_is_assembled_from_each_process_rows(cifar):
  mesh = sharding.data_mesh()
  spec = sharding.batch_sharding(mesh)
  rows = sharding.process_rows(spec, 64)
  assert rows == slice(0, 64)  # one process holds every row
  local = data.TrainBatches(cifar, 64, seed=0, rows=rows)[0]
  batch = sharding.global_batch(local, spec)
  assert batch["image"].shape == (64, 32, 32, 3) and batch["image"].sharding == spec
  assert len(batch["image"].addressable_shards) == len(jax.devices())
  np.testing.assert_array_equal(np.asarray(batch["label"]), local["label"])


def test_evaluation_counts_every_example_once_when_the_batch_size_does_not_divide(digits):
  batch_size = 98  # 360 = 3 * 98 + 66
  batches = data.EvalBatches(digits, batch_size)
  assert len(batches) == data.num_eval_batches(digits.test, batch_size) == 4
  got = list(batches.iterator(threads=2))
  assert all(b["image"].shape == (batch_size, 8, 8, 1) for b in got)
  mask = np.concatenate([b["mask"] for b in got])
  assert mask.sum() == 360 and mask[:360].all() and not mask[360:].any()
  labels = np.concatenate([b["label"] for b in got])[:360]
  np.testing.assert_array_equal(labels, digits.test.labels)
  # Split between two processes, the shares still count each example once.
  shares = [data.EvalBatches(digits, batch_size, rows=slice(p * 49, (p + 1) * 49))
            for p in range(2)]
  images = np.concatenate([np.concatenate([s[b]["image"] for s in shares]) for b in range(4)])
  mask = np.concatenate([np.concatenate([s[b]["mask"] for s in shares]) for b in range(4)])
  assert mask.sum() == 360 and mask[:360].all()
  np.testing.assert_array_equal(images, np.concatenate([b["image"] for b in got]))


def test_cifar_augmentation_pads_crops_and_flips(cifar):
  images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
  offsets = np.array([[0, 0], [4, 4], [8, 8], [2, 7], [4, 4], [8, 0]])
  flips = np.array([False, False, False, True, True, False])
  got = augment.crop_flip(images, offsets, flips, 4)
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  for i in range(6):  # the per-image definition
    want = padded[i, offsets[i, 0]:offsets[i, 0] + 32, offsets[i, 1]:offsets[i, 1] + 32]
    np.testing.assert_array_equal(got[i], want[:, ::-1] if flips[i] else want)
  np.testing.assert_array_equal(got[1], images[1])  # the centre crop is the image
  # In the pipeline: training batches are augmented (per batch and seed), evaluation not.
  plain = data.TrainBatches(cifar, 50, seed=0, augment=False)[0]
  augmented = data.TrainBatches(cifar, 50, seed=0)[0]
  np.testing.assert_array_equal(plain["label"], augmented["label"])
  assert not np.array_equal(plain["image"], augmented["image"])
  assert (augmented["image"] == 0).all(axis=-1).any()  # some zero padding came in


def test_inception_crops_stay_inside_the_image_and_cover_the_area_range():
  rng = np.random.default_rng(0)
  fractions = []
  for _ in range(500):
    height, width = rng.integers(20, 400, size=2)
    top, left, h, w = augment.draw_inception_box(rng, int(height), int(width))
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h and w
    fractions.append(h * w / (height * width))
  assert min(fractions) < 0.15 and max(fractions) > 0.9
  # A very wide image falls back to a central crop of the largest allowed ratio.
  assert augment.draw_inception_box(rng, 10, 1000, attempts=0) == (0, 493, 10, 13)
  image = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
  assert augment.inception_crop_flip(image, rng, 64).shape == (64, 64, 3)
  centre = augment.centre_crop(image, 175)  # 0.875 * 200 = 175: no resizing
  np.testing.assert_array_equal(centre, image[62:237, 12:187])


def test_imagenet_batches_are_cropped_to_the_configured_size():
  imagenet = data.get_dataset("imagenet2012", mock_examples=20, image_size=24)
  assert imagenet.image_shape == (24, 24, 3) and imagenet.num_classes == 1000
  sizes = {imagenet.train[i]["image"].shape for i in range(20)}
  assert len(sizes) > 1  # mock images come in many sizes
  train = data.TrainBatches(imagenet, 8, seed=0)[0]
  evaluation = data.EvalBatches(imagenet, 8)[2]  # 20 = 2 * 8 + 4: padded
  assert train["image"].shape == evaluation["image"].shape == (8, 24, 24, 3)
  assert evaluation["mask"].tolist() == [1] * 4 + [0] * 4
  assert train["image"].dtype == np.uint8  # normalised on the device
  normalised = data.TrainBatches(imagenet, 8, seed=0, normalise_on_host=True)[0]["image"]
  assert normalised.dtype == np.float32 and abs(float(normalised.mean())) < 3
  np.testing.assert_array_equal(
      normalised, data.pipeline.normalise(train["image"], imagenet.mean, imagenet.std))
  with pytest.raises(DataError, match=r"config.image_size=24 applies only to ImageNet"):
    data.get_dataset("cifar10", mock_examples=4, image_size=24)


def test_prefetch_to_device_keeps_order_and_loses_nothing():
  put = lambda x: jax.device_put(np.asarray(x))
  assert [int(x) for x in data.prefetch_to_device(iter(range(7)), put, size=3)] == list(range(7))
  assert list(data.prefetch_to_device(iter([]), put)) == []


def _write_idx(path, array):
  header = bytes([0, 0, 8, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def _fake_mnist_dir(directory, n_train=30, n_test=12):
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n in (("train", n_train), ("test", n_test)):
    images_stem, labels_stem = sources.IDX_FILES[split]
    arrays[split] = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                     rng.integers(0, 10, n, dtype=np.uint8))
    _write_idx(os.path.join(directory, images_stem + ".gz"), arrays[split][0])
    _write_idx(os.path.join(directory, labels_stem + ".gz"), arrays[split][1])
  return arrays


def test_mnist_format_files_in_data_dir_are_read_offline(tmp_path):
  arrays = _fake_mnist_dir(tmp_path)
  mnist = data.get_dataset("mnist", str(tmp_path))
  assert (len(mnist.train), len(mnist.test), mnist.image_shape) == (30, 12, (28, 28, 1))
  np.testing.assert_array_equal(mnist.train.images[..., 0], arrays["train"][0])
  np.testing.assert_array_equal(mnist.test.labels, arrays["test"][1])
  assert mnist.mean == sources.STATS["mnist"][0]


def test_a_corrupt_idx_file_fails_in_one_line(tmp_path):
  _fake_mnist_dir(tmp_path)
  path = tmp_path / "train-images-idx3-ubyte.gz"
  raw = gzip.decompress(path.read_bytes())
  path.write_bytes(gzip.compress(raw[:-100]))  # truncated
  with pytest.raises(DataError, match="truncated or corrupt") as e:
    data.get_dataset("mnist", str(tmp_path))
  assert "\n" not in str(e.value)
  path.write_bytes(b"not gzip at all")
  with pytest.raises(DataError, match="cannot read .*train-images-idx3-ubyte.gz"):
    data.get_dataset("mnist", str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(sources.DEBIAN_FASHION_MNIST),
                    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
def test_fashion_mnist_is_read_from_the_debian_package():
  fashion = data.get_dataset("fashion_mnist")
  assert (len(fashion.train), len(fashion.test)) == (60_000, 10_000)
  assert fashion.image_shape == (28, 28, 1) and fashion.name == "fashion_mnist"
  assert np.bincount(fashion.train.labels).tolist() == [6000] * 10
  assert np.bincount(fashion.test.labels).tolist() == [1000] * 10
  assert fashion.train.labels[:5].tolist() == [9, 0, 0, 3, 0]  # the data set's own order
  # The normalisation constants are the training images' own moments.
  images = fashion.train.images.astype(np.float64)
  assert abs(images.mean() - fashion.mean[0]) < 0.01
  assert abs(images.std() - fashion.std[0]) < 0.01


def _no_debian_package(monkeypatch, tmp_path):
  monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-such-dir"))


@pytest.mark.parametrize("name, how", [
    ("cifar10", "tfds build cifar10 --file_format=array_record`"),
    ("fashion_mnist", "or install Debian's package dataset-fashion-mnist"),
    ("imagenet2012", "--manual_dir=<data_dir>/downloads/manual` after putting "
                     "ILSVRC2012_img_train.tar"),
])
def test_a_missing_data_set_fails_at_once_saying_how_to_get_it(name, how, tmp_path,
                                                               monkeypatch):
  _no_debian_package(monkeypatch, tmp_path)
  start = time.monotonic()
  with pytest.raises(DataError) as e:
    data.get_dataset(name, str(tmp_path / "empty"))
  message = str(e.value)
  assert time.monotonic() - start < 30  # no download attempt
  assert f"data set {name!r} is not prepared in {tmp_path / 'empty'}" in message
  assert how in message and "--config.data_dir" in message and "\n" not in message
  assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").rglob("*.array*"))


def _png(image: np.ndarray) -> bytes:
  import io
  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def test_a_prepared_tfds_directory_is_read_and_its_pngs_decoded(tmp_path):
  """The real read path (mock data skips decoding): TFDS's own CIFAR-10 builder
  writes array_record files of PNGs offline, from images made here."""
  from tensorflow_datasets.image_classification import cifar

  rng = np.random.default_rng(0)
  written = {f"{split}_{i}": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
             for split, n in (("train", 40), ("test", 12)) for i in range(n)}

  class LocalCifar10(cifar.Cifar10, skip_registration=True):
    name = "cifar10"

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split):
      for key, image in written.items():
        if key.startswith(split):
          yield key, {"id": key, "image": _png(image), "label": int(key.split("_")[1]) % 10}

  LocalCifar10(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  cifar10 = data.get_dataset("cifar10", str(tmp_path))
  assert (cifar10.name, len(cifar10.train), len(cifar10.test)) == ("cifar10", 40, 12)
  images, labels = cifar10.train.read(np.arange(40))
  ids = [cifar10.train[i]["id"].decode() for i in range(40)]
  np.testing.assert_array_equal(images, np.stack([written[k] for k in ids]))
  np.testing.assert_array_equal(labels, [int(k.split("_")[1]) % 10 for k in ids])
  batch = data.TrainBatches(cifar10, 16, seed=0)[0]  # augmented, uint8
  assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.uint8


def test_an_unknown_data_set_fails_at_once_naming_it():
  with pytest.raises(DataError, match="unknown data set 'cifar11'; available here: cifar10, "
                     "cifar100, digits, fashion_mnist, imagenet2012, mnist"):
    data.get_dataset("cifar11")


def test_mock_data_stands_in_for_a_tfds_data_set_only():
  cifar = data.get_dataset("cifar100", mock_examples=40)
  assert cifar.name == "cifar100 (mock data)" and cifar.num_classes == 100
  assert len(cifar.train) == len(cifar.test) == 40
  assert cifar.image_shape == (32, 32, 3) and len(cifar.mean) == 3
  images, labels = cifar.train.read(np.array([0, 1]))
  assert images.dtype == np.uint8 and images.shape == (2, 32, 32, 3) and labels.dtype == np.int32
  fashion = data.get_dataset("fashion_mnist", mock_examples=40)  # not the Debian files
  assert fashion.name == "fashion_mnist (mock data)" and len(fashion.train) == 40
  with pytest.raises(DataError, match="mock data stands in for TFDS data sets"):
    data.get_dataset("digits", mock_examples=40)
