"""Data sets and host-side input pipelines.

A data set is a pair of random-access *sources* (``len(source)`` and
``source.read(indices) -> (images, labels)``) over either in-memory arrays (the
offline data sets) or ``tfds.data_source`` splits, plus its metadata
(sources.py). The pipelines (pipeline.py) address every batch by its index, so
the data position is one integer.
"""

from motivation_jax.data.pipeline import (BatchIterator, EvalBatches, TrainBatches,
                                          num_eval_batches, prefetch_to_device)
from motivation_jax.data.sources import DATASETS, Dataset, get_dataset

__all__ = ["DATASETS", "BatchIterator", "Dataset", "EvalBatches", "TrainBatches",
           "get_dataset", "num_eval_batches", "prefetch_to_device"]
