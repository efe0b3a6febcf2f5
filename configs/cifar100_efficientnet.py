r"""CIFAR-100: a nested EfficientNet-B0 base inside an EfficientNet-B2 motivated model.

The base is EfficientNet-B0, the motivated model B2 (width x1.1, depth x1.2 of
B0's table), both at CIFAR's 32x32: within a run both sub-networks see the
same images, so the family's per-model resolutions (224/260) do not apply
(docs/models.md). The motivated model trains on a batch when the training
loss fell on each of the last 3 batches. SGD with momentum, 200 epochs at
batch 128.

Command (needs CIFAR-100 prepared for TFDS, see docs/data.md):

  python -m motivation_jax.main --config=configs/cifar100_efficientnet.py \
      --workdir=workdirs/cifar100_efficientnet --config.data_dir=$HOME/tensorflow_datasets

Training augmentation: pad by 4, random 32x32 crop, random flip. Meant for
one GPU or a TPU VM. Expected result: not measured yet (no CIFAR-100 and no
accelerator where this was written).

Mixed precision on a GPU or TPU: add ``--config.dtype=bfloat16`` (bfloat16 compute,
float32 weights, optimizer state, batch-norm statistics and loss; docs/models.md). Its
speed and accuracy for this config are not measured yet.

Smoke variant, narrow, one block a stage (``depth`` 0.25: 7 and 8 blocks instead
of 16 and 23) and on TFDS mock data, under a minute on a 2-core CPU (its test, which
also exports, took 43 s on an AMD EPYC shared with other work, 2026-12-03; most of
it compiling):

  python -m motivation_jax.main --config=configs/cifar100_efficientnet.py:smoke \
      --workdir=/tmp/smoke
"""

from motivation_jax import config_lib


def get_config(arg: str | None = None):
  config = config_lib.default_config(__file__)
  config.dataset = "cifar100"
  config.model.name = "efficientnet"
  # Named architectures: b0, b1, b2, b3; "width" multiplies the width coefficient.
  config.model.base = {"arch": "b0", "width": 1.0}
  config.model.motivated = {"arch": "b2", "width": 1.0}
  config.optimizer = "sgd"
  config.learning_rate = 0.05
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.batch_size = 128
  config.num_epochs = 200
  config.eval_every_epochs = 5
  config.checkpoint_every_epochs = 5
  config.log_every_steps = 100

  def smoke(config):  # one block a stage (two in b1's sixth): the code paths, compiled fast
    config.model.base = {"arch": "b0", "width": 0.25, "depth": 0.25}
    config.model.motivated = {"arch": "b1", "width": 0.25, "depth": 0.25}

  return config_lib.variant(config, arg, smoke=smoke)
