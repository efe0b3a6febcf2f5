r"""ImageNet-2012: a nested ResNet-18 base inside a ResNet-34 motivated model.

The base is ResNet-18 (11.7M parameters), the motivated model ResNet-34
(21.8M) with the same widths and more blocks per stage; it trains on a batch
when the training loss fell on each of the last 3 batches. SGD with
momentum 0.9, learning rate 0.1 per 256 images (0.4 at batch 1024), 5
warm-up epochs then cosine decay, 90 epochs, weight decay 1e-4. Training
augmentation: inception crop to 224x224 and random flip; evaluation: the
central 87.5% of the shorter side, resized to 224x224.

Data: TFDS's imagenet2012 needs a manual download. Put ILSVRC2012_img_train.tar
and ILSVRC2012_img_val.tar (image-net.org) in $DATA/downloads/manual, then
`tfds build imagenet2012 --data_dir=$DATA --manual_dir=$DATA/downloads/manual
--file_format=array_record`.

Command:

  python -m motivation_jax.main --config=configs/imagenet_resnet.py \
      --workdir=workdirs/imagenet_resnet --config.data_dir=$DATA

Meant for a TPU v4-32 slice or a node of 8 GPUs (batch 1024 split over the
devices; 16 grain worker processes decode the JPEGs, --config.data_workers=N for
about N x 500 images/s on such a host). Expected result: not
measured yet (no ImageNet and no accelerator where this was written); the
published standalone top-1 accuracies are 69.8% (ResNet-18) and 73.3% (ResNet-34).

Mixed precision on a GPU or TPU: add ``--config.dtype=bfloat16`` (bfloat16 compute,
float32 weights, optimizer state, batch-norm statistics and loss; docs/models.md). Its
speed and accuracy for this config are not measured yet.

Smoke variant, tiny and on TFDS mock data (seconds, any machine):

  python -m motivation_jax.main --config=configs/imagenet_resnet.py:smoke --workdir=/tmp/smoke
"""

from motivation_jax import config_lib


def get_config(arg: str | None = None):
  config = config_lib.default_config(__file__)
  config.dataset = "imagenet2012"
  config.image_size = 224
  config.model.name = "resnet"
  config.model.base = {"arch": "resnet18", "width": 1.0}
  config.model.motivated = {"arch": "resnet34", "width": 1.0}
  config.optimizer = "sgd"
  config.learning_rate = 0.4
  config.momentum = 0.9
  config.weight_decay = 1e-4
  config.warmup_epochs = 5.0
  config.batch_size = 1024
  config.eval_batch_size = 1024
  config.num_epochs = 90
  config.eval_every_epochs = 1
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
    config.model.base.width = config.model.motivated.width = 0.125

  return config_lib.variant(config, arg, smoke=smoke)
