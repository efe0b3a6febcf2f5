r"""ImageNet-2012: a nested ViT-Ti/16 base inside a ViT-S/16 motivated model.

The base is ViT-Ti (3 heads, embedding 192), the motivated model ViT-S
(6 heads, embedding 384); both have 12 blocks, head dimension 64 and 16x16
patches of 224x224 images. The motivated model trains on a batch when the
training loss fell on each of the last 3 batches. AdamW (learning rate 1e-3
at batch 1024, weight decay 0.05), 5 warm-up epochs then cosine decay, 300
epochs: DeiT's schedule, without its RandAugment, mixup and stochastic depth.
Training augmentation: inception crop to 224x224 and random flip; evaluation:
the central 87.5%, resized to 224x224.

Data: TFDS's imagenet2012 needs a manual download; see configs/imagenet_resnet.py.

Command:

  python -m motivation_jax.main --config=configs/imagenet_vit.py \
      --workdir=workdirs/imagenet_vit --config.data_dir=$DATA

Meant for a TPU v4-32 slice or a node of 8 GPUs. Expected result: not measured
yet (no ImageNet and no accelerator where this was written); DeiT reports
72.2% (Ti) and 79.8% (S) with its full augmentation, so expect less here.

Mixed precision on a GPU or TPU: add ``--config.dtype=bfloat16`` (bfloat16 compute,
float32 weights, optimizer state, batch-norm statistics and loss; docs/models.md). Its
speed and accuracy for this config are not measured yet.

Smoke variant, tiny and on TFDS mock data (seconds, any machine):

  python -m motivation_jax.main --config=configs/imagenet_vit.py:smoke --workdir=/tmp/smoke
"""

from motivation_jax import config_lib


def get_config(arg: str | None = None):
  config = config_lib.default_config(__file__)
  config.dataset = "imagenet2012"
  config.image_size = 224
  config.model.name = "vit"
  config.model.base = {"arch": "ti", "depth": 12, "width": 1.0}
  config.model.motivated = {"arch": "s", "depth": 12, "width": 1.0}
  config.model.patch_size = 16
  config.model.head_dim = 64
  config.optimizer = "adamw"
  config.learning_rate = 1e-3
  config.weight_decay = 0.05
  config.warmup_epochs = 5.0
  config.batch_size = 1024
  config.eval_batch_size = 1024
  config.num_epochs = 300
  config.eval_every_epochs = 5
  config.checkpoint_every_epochs = 1
  config.log_every_steps = 100
  config.data_threads = 16
  # JPEG decoding costs ~2 ms of one core per image: worker processes, not
  # threads (benchmarks/results/data_workers_cpu_imagenet.md); ~N / 500 of
  # them for an accelerator host training at N images/s.
  config.data_workers = 16

  def smoke(config):
    config.image_size = 32
    config.data_threads = 2
    config.data_workers = 0  # seconds of work: starting 16 workers would dominate
    config.model.patch_size = 8
    config.model.head_dim = 8
    config.model.base = {"arch": "ti", "depth": 1, "width": 1 / 3}
    config.model.motivated = {"arch": "ti", "depth": 2, "width": 2 / 3}

  return config_lib.variant(config, arg, smoke=smoke)
