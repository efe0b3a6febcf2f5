r"""Fashion-MNIST (offline, real data): nested residual CNNs.

The base is a 2-stage residual CNN (16/32 channels, one block per stage); the
motivated model extends it to 32/64 channels and two blocks per stage, as in
configs/default.py, here on Fashion-MNIST's 60,000 / 10,000 28x28 images. The
motivated model trains on a batch when the training loss fell on each of the
last 3 batches. SGD with momentum, 10 epochs at batch 128, no augmentation.

Data: Debian's package dataset-fashion-mnist (`apt install dataset-fashion-mnist`,
IDX files in /usr/share/datasets/fashion-mnist), read offline; or, without
it, Fashion-MNIST prepared for TFDS in --config.data_dir.

Command:

  python -m motivation_jax.main --config=configs/fashion_mnist_cnn.py \
      --workdir=workdirs/fashion_mnist_cnn

Meant for any machine. Expected result (seed 0, measured on the 2-core, 24 GiB
CPU machine this project is developed on): test accuracy 0.9069 (base) and
0.8863 (motivated), with 218 motivated batches of 4,680 (16.5% of the FLOPs of
training the motivated model alone on every batch); 1,182 s with other jobs
sharing the CPU (a first epoch alone took 104 s).

Smoke variant, tiny and on TFDS mock data (seconds, any machine):

  python -m motivation_jax.main --config=configs/fashion_mnist_cnn.py:smoke --workdir=/tmp/smoke
"""

from motivation_jax import config_lib


def get_config(arg: str | None = None):
  config = config_lib.default_config(__file__)
  config.dataset = "fashion_mnist"
  config.model.name = "cnn"
  config.model.base = {"widths": (16, 32), "depths": (1, 1)}
  config.model.motivated = {"widths": (32, 64), "depths": (2, 2)}
  config.optimizer = "sgd"
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.warmup_epochs = 0.5
  config.batch_size = 128
  config.num_epochs = 10
  config.eval_every_epochs = 1
  config.checkpoint_every_epochs = 1
  config.log_every_steps = 100
  return config_lib.variant(config, arg)
