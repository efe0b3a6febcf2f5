r"""CIFAR-10: a nested ResNet-20 base inside a ResNet-56 motivated model.

The base is He et al.'s ResNet-20 (0.27M parameters), the motivated model
ResNet-56 (0.86M) with the same widths and three times the blocks per stage;
it trains on a batch when the training loss fell on each of the last 3
batches. SGD with momentum, 160 epochs at batch 128 (the CIFAR ResNet
schedule's length, with a cosine decay).

Command (needs CIFAR-10 prepared for TFDS, see docs/data.md):

  python -m motivation_jax.main --config=configs/cifar10_resnet.py \
      --workdir=workdirs/cifar10_resnet --config.data_dir=$HOME/tensorflow_datasets

Training augmentation: pad by 4, random 32x32 crop, random flip. Meant for
one GPU or a TPU VM. Expected result: not measured yet (no CIFAR-10 and no
accelerator where this was written); the published standalone accuracies are
91.3% (ResNet-20) and 93.0% (ResNet-56).

Mixed precision on a GPU or TPU: add ``--config.dtype=bfloat16`` (bfloat16 compute,
float32 weights, optimizer state, batch-norm statistics and loss; docs/models.md). Its
speed and accuracy for this config are not measured yet.

Smoke variant, ResNet-20 in ResNet-32 at a quarter of the width, on TFDS mock data
(its test, which also exports, took 24 s on a 2-core AMD EPYC, 2026-12-03):

  python -m motivation_jax.main --config=configs/cifar10_resnet.py:smoke --workdir=/tmp/smoke
"""

from motivation_jax import config_lib


def get_config(arg: str | None = None):
  config = config_lib.default_config(__file__)
  config.dataset = "cifar10"
  config.model.name = "resnet"
  # Named architectures: resnet20/32/44/56/110 (CIFAR) or resnet18/34 (ImageNet);
  # "width" multiplies every stage's channels.
  config.model.base = {"arch": "resnet20", "width": 1.0}
  config.model.motivated = {"arch": "resnet56", "width": 1.0}
  config.optimizer = "sgd"
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.batch_size = 128
  config.num_epochs = 160
  config.eval_every_epochs = 5
  config.checkpoint_every_epochs = 5
  config.log_every_steps = 100

  def smoke(config):  # ResNet-20 in ResNet-32, narrow: the code paths, compiled fast
    config.model.base.width = config.model.motivated.width = 0.25
    config.model.motivated.arch = "resnet32"

  return config_lib.variant(config, arg, smoke=smoke)
