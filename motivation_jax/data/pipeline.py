"""Host-side input pipelines: shuffled training batches, padded exact evaluation.

Every batch is a pure function of its index: training batch ``t`` of the global
batch is fixed by ``(seed, t)`` (epoch ``t // steps_per_epoch`` has its own
permutation, augmentation is drawn from ``(seed, t)``), so

- the data position in a checkpoint is one integer, the next batch index, and a
  resumed run sees exactly the batches of an uninterrupted one;
- each process reads only its own share (a contiguous slice of the global batch,
  augmented with the global batch's random draws), and the global batch is the
  same whatever the number of processes.

Per-example work (reading, decoding, augmentation) is numpy on the host;
grain's threads, or its worker processes (``workers``: for decoding that costs
milliseconds per image, as ImageNet's JPEGs do), prepare batches ahead of the
train loop, and ``prefetch_to_device`` keeps the next batches on the device
already. Images stay uint8 where the data are 8-bit: a quarter of float32's
bytes to copy to the device, where the steps normalise them
(``steps.normalise_images``, the same arithmetic as ``normalise`` here).
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from motivation_jax.data import augment
from motivation_jax.data.sources import Dataset
from motivation_jax.errors import DataError

PREPROCESSING = ("plain", "cifar", "imagenet")
CIFAR_PAD = 4


def normalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """(images - mean) / std in float32, per channel.

  As ``(images - mean) * (1 / std)``: XLA turns a division by a constant into
  that product, so ``steps.normalise_images``, the same arithmetic on the
  device, gives these values bit for bit (tests/test_data_workers.py)."""
  inverse = np.float32(1) / np.maximum(np.asarray(std, np.float32), np.float32(1e-6))
  return (images.astype(np.float32) - np.asarray(mean, np.float32)) * inverse


def _image_dtype(source, normalise_on_host: bool) -> np.dtype:
  """uint8 where the source's images are 8-bit (normalised later, on the
  device); float32, normalised here, otherwise or when asked."""
  eight_bit = np.dtype(getattr(source, "dtype", np.float32)) == np.uint8
  return np.dtype(np.uint8 if eight_bit and not normalise_on_host else np.float32)


def _host_images(images, dtype: np.dtype, dataset: Dataset) -> np.ndarray:
  if dtype == np.uint8:
    return np.ascontiguousarray(images, np.uint8)
  return normalise(images, dataset.mean, dataset.std)


def _rows(rows: slice | None, global_batch_size: int) -> slice:
  """This process's rows of the global batch (all of them by default)."""
  if rows is None:
    return slice(0, global_batch_size)
  start, stop, step = rows.indices(global_batch_size)
  if step != 1 or start >= stop or (rows.stop or 0) > global_batch_size:
    raise ValueError(f"rows {rows} are not a contiguous part of a batch of {global_batch_size}")
  return slice(start, stop)


class AddressedBatches:
  """What every training-batch source shares: batch ``t`` is ``self[t]``, a pure
  function of its position (``position``), so a resume checks the position and
  reads on from its next batch."""

  def check_position(self, position: dict[str, Any]) -> int:
    """The next batch of a checkpointed position; refuses one from other batches."""
    mine = self.position(position.get("next_batch", 0))
    changed = [f"{k} {position.get(k)!r} -> {v!r}" for k, v in mine.items()
               if position.get(k) != v]
    if changed:
      raise DataError("the checkpoint's data position was written for other batches ("
                      + "; ".join(changed) + "); a resumed run would not see the batches of "
                      "an uninterrupted one, so start a new --workdir or restore those settings")
    return mine["next_batch"]

  def iterator(self, start: int, stop: int, *, threads: int = 2, workers: int = 0,
               buffer: int = 4) -> "BatchIterator":
    return BatchIterator(self.__getitem__, start, stop, threads=threads, workers=workers,
                         buffer=buffer)


class TrainBatches(AddressedBatches):
  """Shuffled, drop-remainder training batches addressed by the global batch index.

  ``batches[t]`` is this process's share of global batch ``t`` (its ``rows``,
  ``sharding.process_rows``): a dict of ``image`` and ``label`` (int32). Images
  are uint8 as the data set stores them (augmented, not normalised: the steps
  normalise on the device) where it stores 8-bit images, else float32 and
  normalised; ``normalise_on_host=True`` gives float32, normalised, always (for
  steps that do not normalise). Thread-safe: grain's threads call it for several
  ``t`` at once; picklable: grain's worker processes each get a copy.
  """

  def __init__(self, dataset: Dataset, global_batch_size: int, *, seed: int,
               augment: bool = True, rows: slice | None = None,
               normalise_on_host: bool = False):
    n = len(dataset.train)
    if not 1 <= global_batch_size <= n:
      raise DataError(f"the batch size must be in [1, {n}] for the {n} training examples "
                      f"of {dataset.name}, got {global_batch_size}")
    self.rows = _rows(rows, global_batch_size)
    self.dataset, self.global_batch_size, self.seed = dataset, global_batch_size, seed
    self.augment = augment and dataset.preprocessing != "plain"
    self.steps_per_epoch = n // global_batch_size
    self.image_dtype = _image_dtype(dataset.train, normalise_on_host)
    self._cache_orders()

  def _cache_orders(self):
    # Batches come in order, so the last two epochs' orders are all that is needed.
    self._order = functools.lru_cache(maxsize=2)(self._permutation)

  def __getstate__(self):
    # For grain's worker processes: the cache is rebuilt there, not pickled.
    return {k: v for k, v in self.__dict__.items() if k != "_order"}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._cache_orders()

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset.train))

  def global_indices(self, step: int) -> np.ndarray:
    """The training examples of global batch ``step`` (sorted: reads in file order)."""
    epoch, within = divmod(step, self.steps_per_epoch)
    size = self.global_batch_size
    return np.sort(self._order(epoch)[within * size:(within + 1) * size])

  def __getitem__(self, step: int) -> dict[str, np.ndarray]:
    if step < 0:
      raise IndexError(step)
    images, labels = self.dataset.train.read(self.global_indices(step)[self.rows])
    if self.augment:
      # Drawn for the whole global batch, then sliced: the same global batch for
      # any number of processes. A different entropy than the epoch's order.
      rng = np.random.default_rng([self.seed, step, 1])
      images = _augment_train(images, self.dataset, rng, self.rows, self.global_batch_size)
    else:
      images = _evaluation_view(images, self.dataset)
    return {"image": _host_images(images, self.image_dtype, self.dataset), "label": labels}

  def global_shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each leaf of a global batch, without reading any data."""
    return {"image": ((self.global_batch_size, *self.dataset.image_shape), self.image_dtype),
            "label": ((self.global_batch_size,), np.dtype(np.int32))}

  def position(self, next_batch: int) -> dict[str, Any]:
    """The data position to checkpoint: the next batch, and what fixes the batches."""
    return {"next_batch": int(next_batch), "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "train_examples": len(self.dataset.train), "dataset": self.dataset.name,
            "augment": self.augment}



def _evaluation_view(images, dataset: Dataset):
  """Images as evaluation sees them: ImageNet's centre crop, the others as they are."""
  if dataset.preprocessing == "imagenet":
    return np.stack([augment.centre_crop(x, dataset.image_shape[0]) for x in images])
  return images


def _augment_train(images, dataset: Dataset, rng: np.random.Generator, share: slice,
                   global_batch_size: int) -> np.ndarray:
  if dataset.preprocessing == "cifar":
    params = augment.draw_crop_flip(rng, global_batch_size, CIFAR_PAD)
    return augment.crop_flip(images, params["offsets"][share], params["flips"][share],
                             CIFAR_PAD)
  if dataset.preprocessing == "imagenet":
    # Crops depend on each image's size: one generator per example, keyed by its
    # position in the global batch.
    seeds = rng.integers(0, 2 ** 63, size=global_batch_size)[share]
    size = dataset.image_shape[0]
    return np.stack([augment.inception_crop_flip(x, np.random.default_rng(s), size)
                     for x, s in zip(images, seeds)])
  raise ValueError(f"unknown preprocessing {dataset.preprocessing!r}; "
                   f"known: {', '.join(PREPROCESSING)}")


class BatchIterator:
  """Batches ``fn(start) ... fn(stop - 1)``, made ahead of use by grain.

  ``workers == 0``: ``threads`` grain threads in this process (0: one batch at a
  time in this thread, for debugging). ``workers > 0``: that many grain worker
  processes (``mp_prefetch``), each making one batch at a time and holding one
  more ready (``threads`` is then unused); worker ``i`` makes batches ``start +
  i``, ``start + i + workers``, ... and they are taken in turn, so the order
  and the batches are the threads' (``fn`` is a pure function of the index).
  ``fn`` must be picklable; the workers start with ``spawn`` (a fresh
  interpreter: no copy of this process's JAX runtime) and never touch a JAX
  device (``_start_worker``).

  ``next_batch`` is the index of the batch ``next()`` returns next: the
  iterator's position, whatever grain has prepared beyond it.
  """

  def __init__(self, fn: Callable[[int], Any], start: int, stop: int, *, threads: int,
               buffer: int, workers: int = 0):
    self.start = start
    self._taken = 0
    self._own = lambda batch: batch
    self._iterator: Iterator
    if workers == 0 and threads == 0:  # in this thread, one batch at a time (for debugging)
      self._iterator = map(fn, range(start, stop))
      return
    import grain  # heavy import, only here

    batches = grain.MapDataset.range(start, stop).map(fn)
    if workers == 0:
      self._iterator = iter(batches.to_iter_dataset(
          grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(buffer, 1))))
      return
    _readable_flags()  # grain reads an absl flag here, in this process
    # In each worker its batches are made in its one thread: processes, not
    # threads, give the parallelism, and a worker holds at most two batches.
    self._iterator = iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=0)).mp_prefetch(
        grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=1),
        worker_init_fn=_start_worker))
    # A worker's batch arrives in shared memory that is freed when its array is
    # collected (and warned about, if that is at exit): a copy we own instead.
    shared = grain.multiprocessing.SharedMemoryArray
    own = lambda x: np.array(x) if isinstance(x, shared) else x
    self._own = lambda batch: ({k: own(v) for k, v in batch.items()}
                               if isinstance(batch, dict) else own(batch))

  @property
  def next_batch(self) -> int:
    return self.start + self._taken

  def __iter__(self):
    return self

  def __next__(self):
    try:
      batch = next(self._iterator)
    except StopIteration:
      self.close()
      raise
    self._taken += 1
    return self._own(batch)

  def close(self) -> None:
    """Stops grain's workers now rather than when this is garbage collected."""
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()


def _readable_flags() -> None:
  """Marks absl's flags parsed (at their defaults) where nothing parsed them.

  grain (0.2.18) reads its flag ``--grain_enable_multiprocess_worker_profiling``
  when it starts worker processes, and absl raises ``UnparsedFlagAccessError``
  for a flag read before parsing: in a program that does not start with
  ``absl.app`` (pytest, a script, a notebook), and in every worker, which is a
  fresh interpreter (google/grain#1355; later grain reads the default
  instead). A program started by ``absl.app``, as ``motivation_jax.main`` is,
  keeps its parsed values.
  """
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _start_worker(index: int, count: int) -> None:
  """Runs first in each grain worker process.

  A worker is a fresh interpreter (``spawn``) that re-imports the main module
  as ``__mp_main__``, so ``main()`` (and its ``jax.distributed.initialize``)
  does not run there. Importing grain imports JAX, but nothing here may start
  a JAX backend: on a TPU or GPU host that would claim the accelerators the
  train loop holds, so JAX is pinned to the CPU in case anything tries. The
  worker's flags are marked parsed (``_readable_flags``): what a worker needs
  comes pickled with ``fn``, not from flags.
  """
  del index, count
  import sys

  _readable_flags()
  if "jax" in sys.modules:
    sys.modules["jax"].config.update("jax_platforms", "cpu")


def num_eval_batches(source, batch_size: int) -> int:
  return -(-len(source) // batch_size)


class EvalBatches:
  """Every test example exactly once; the last global batch is padded and masked.

  ``batches[b]`` is this process's share of global batch ``b``: ``image``,
  ``label`` and ``mask`` (1 for real examples, 0 for padding). Images as in
  ``TrainBatches`` (uint8 for 8-bit data; padding is zeros). All batches have
  one shape, so there is one compiled eval program.
  """

  def __init__(self, dataset: Dataset, global_batch_size: int, *, rows: slice | None = None,
               normalise_on_host: bool = False):
    if global_batch_size < 1:
      raise DataError(f"the evaluation batch size must be >= 1, got {global_batch_size}")
    self.rows = _rows(rows, global_batch_size)
    self.dataset, self.global_batch_size = dataset, global_batch_size
    self.num_batches = num_eval_batches(dataset.test, global_batch_size)
    self.image_dtype = _image_dtype(dataset.test, normalise_on_host)

  def __len__(self) -> int:
    return self.num_batches

  def __getitem__(self, b: int) -> dict[str, np.ndarray]:
    if not 0 <= b < self.num_batches:
      raise IndexError(b)
    lo = b * self.global_batch_size + self.rows.start
    hi = min(b * self.global_batch_size + self.rows.stop, len(self.dataset.test))
    indices = np.arange(lo, max(lo, hi))
    shape, dtype = self.dataset.image_shape, self.image_dtype
    if len(indices):
      images, labels = self.dataset.test.read(indices)
      images = _host_images(_evaluation_view(images, self.dataset), dtype, self.dataset)
    else:  # this process's share is all padding
      images, labels = np.zeros((0, *shape), dtype), np.zeros((0,), np.int32)
    pad = self.rows.stop - self.rows.start - len(indices)
    return {"image": np.concatenate([images, np.zeros((pad, *shape), dtype)]),
            "label": np.concatenate([labels, np.zeros((pad,), np.int32)]),
            "mask": np.concatenate([np.ones(len(indices), np.float32),
                                    np.zeros(pad, np.float32)])}

  def iterator(self, *, threads: int = 2, workers: int = 0, buffer: int = 4) -> BatchIterator:
    return BatchIterator(self.__getitem__, 0, self.num_batches, threads=threads,
                         workers=workers, buffer=buffer)


def prefetch_to_device(iterator: Iterator, put: Callable[[Any], Any], size: int = 2
                       ) -> Iterator:
  """Yields ``put(batch)`` for each batch, ``size`` batches ahead: the copies of
  the next batches run while the device computes on this one."""
  queue: collections.deque = collections.deque()
  for batch in iterator:
    queue.append(put(batch))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
