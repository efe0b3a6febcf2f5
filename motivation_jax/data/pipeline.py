"""Host-side batching: deterministic shuffled training batches, padded eval batches.

All per-example work happens here in numpy; the device only sees whole batches.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np


def normalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  return ((images.astype(np.float32) - np.asarray(mean, np.float32))
          / np.maximum(np.asarray(std, np.float32), 1e-6))


class TrainBatches:
  """Shuffled, drop-remainder training batches addressed by the global batch index.

  Batch ``t`` is a pure function of ``(seed, t)``: epoch ``t // steps_per_epoch``
  uses its own permutation of the training set. The data position saved in a
  checkpoint is therefore just the batch index, and a resumed run sees exactly
  the batches an uninterrupted run would.
  """

  def __init__(self, source, batch_size: int, *, seed: int, mean, std):
    if batch_size < 1 or batch_size > len(source):
      raise ValueError(f"batch_size must be in [1, {len(source)}] for this training set, "
                       f"got {batch_size}")
    self.source, self.batch_size, self.seed = source, batch_size, seed
    self.mean, self.std = mean, std
    self.steps_per_epoch = len(source) // batch_size
    self._epoch, self._order = -1, None

  def __getitem__(self, step: int) -> dict[str, np.ndarray]:
    epoch, within = divmod(step, self.steps_per_epoch)
    if epoch != self._epoch:
      self._epoch = epoch
      self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
    indices = np.sort(self._order[within * self.batch_size:(within + 1) * self.batch_size])
    examples = self.source[indices]
    return {"image": normalise(examples["image"], self.mean, self.std),
            "label": np.asarray(examples["label"], np.int32)}

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    step = start_step
    while True:
      yield self[step]
      step += 1


def num_eval_batches(source, batch_size: int) -> int:
  return -(-len(source) // batch_size)


def eval_batches(source, batch_size: int, *, mean, std) -> Iterator[dict[str, np.ndarray]]:
  """Every example exactly once; the last batch is padded and masked.

  All batches have the same shape (one compiled eval program); ``mask`` is 1
  for real examples and 0 for padding.
  """
  n = len(source)
  for start in range(0, n, batch_size):
    indices = np.arange(start, min(start + batch_size, n))
    examples = source[indices]
    pad = batch_size - len(indices)
    image = normalise(examples["image"], mean, std)
    yield {"image": np.concatenate([image, np.zeros((pad, *image.shape[1:]), np.float32)]),
           "label": np.concatenate([np.asarray(examples["label"], np.int32),
                                    np.zeros((pad,), np.int32)]),
           "mask": np.concatenate([np.ones(len(indices), np.float32),
                                   np.zeros(pad, np.float32)])}
