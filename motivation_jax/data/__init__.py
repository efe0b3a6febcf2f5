"""Data sets and host-side input pipelines.

A data set is a pair of random-access *sources* (``len(source)`` and
``source[i] -> {"image": uint8 HWC, "label": int}``), the interface of
``tfds.data_source``, plus its metadata. The pipelines only use that
interface, so the TFDS data sets plug in beside the offline ones.
"""

from motivation_jax.data.pipeline import TrainBatches, eval_batches, num_eval_batches
from motivation_jax.data.sources import DATASETS, Dataset, get_dataset

__all__ = ["DATASETS", "Dataset", "TrainBatches", "eval_batches", "get_dataset",
           "num_eval_batches"]
