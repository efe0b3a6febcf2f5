r"""CIFAR-10: a nested ViT-Ti base inside a ViT-S motivated model (patches of 4).

The base is ViT-Ti (3 heads, embedding 192), the motivated model ViT-S
(6 heads, embedding 384); both have 12 blocks, head dimension 64 and 4x4
patches of the 32x32 images (64 tokens and a class token). The motivated
model trains on a batch when the training loss fell on each of the last 3
batches. AdamW, 200 epochs at batch 128, 5 warm-up epochs.

Command (needs CIFAR-10 prepared for TFDS, see docs/data.md):

  python -m motivation_jax.main --config=configs/cifar10_vit.py \
      --workdir=workdirs/cifar10_vit --config.data_dir=$HOME/tensorflow_datasets

Training augmentation: pad by 4, random crop, random flip. Meant for one GPU
or a TPU VM. Expected result: not measured yet (no CIFAR-10 and no
accelerator where this was written); ViTs trained from scratch on CIFAR-10
usually need stronger augmentation (RandAugment, mixup) than this pipeline has.

Mixed precision on a GPU or TPU: add ``--config.dtype=bfloat16`` (bfloat16 compute,
float32 weights, optimizer state, batch-norm statistics and loss; docs/models.md). Its
speed and accuracy for this config are not measured yet.

Smoke variant, tiny and on TFDS mock data (seconds, any machine):

  python -m motivation_jax.main --config=configs/cifar10_vit.py:smoke --workdir=/tmp/smoke
"""

from motivation_jax import config_lib


def get_config(arg: str | None = None):
  config = config_lib.default_config(__file__)
  config.dataset = "cifar10"
  config.model.name = "vit"
  # Named architectures: ti, s, b (3, 6, 12 heads; 12 blocks). "depth" overrides
  # the number of blocks; "width" multiplies the number of heads.
  config.model.base = {"arch": "ti", "depth": 12, "width": 1.0}
  config.model.motivated = {"arch": "s", "depth": 12, "width": 1.0}
  config.model.patch_size = 4
  config.model.head_dim = 64  # the same in both sub-networks
  config.optimizer = "adamw"
  config.learning_rate = 1e-3
  config.weight_decay = 0.05
  config.warmup_epochs = 5.0
  config.batch_size = 128
  config.num_epochs = 200
  config.eval_every_epochs = 5
  config.checkpoint_every_epochs = 5
  config.log_every_steps = 100

  def smoke(config):
    config.model.head_dim = 8
    config.model.base = {"arch": "ti", "depth": 1, "width": 1 / 3}
    config.model.motivated = {"arch": "ti", "depth": 2, "width": 2 / 3}

  return config_lib.variant(config, arg, smoke=smoke)
