r"""Default: nested residual CNNs with batch norm on scikit-learn's digits (offline).

The base is a 2-stage residual CNN (16/32 channels, one block per stage); the
motivated model extends it to 32/64 channels and two blocks per stage. The
motivated model trains on a batch when the training loss fell on each of the
last 3 batches (decision lag 1).

Command:

  python -m motivation_jax.main --config=configs/default.py --workdir=/tmp/digits

Expected result: see README.md ("Quick start"), measured on a 2-core CPU.

Overrides go on the command line, e.g. ``--config.num_epochs=5``,
``--config.motivation.condition=never`` (the base alone) or ``=always`` (the
motivated model alone).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Data set: "digits" (scikit-learn's bundled 8x8 digits; works offline),
  # "fashion_mnist", "mnist", "cifar10", "cifar100" or "imagenet2012" (docs/data.md).
  config.dataset = "digits"
  # Where TFDS data sets (or MNIST-format IDX files) live; unused by digits.
  config.data_dir = ml_collections.FieldReference(None, field_type=str)
  # > 0: use this many examples of TFDS mock data per split instead of the data
  # set (the configs' ":smoke" variants; TFDS data sets only).
  config.mock_data_examples = 0
  # The data set's standard training augmentation (CIFAR: pad-and-crop + flip;
  # ImageNet: inception crop + flip); none exists for digits and the MNISTs.
  config.augment = True
  # Side of the model's input for ImageNet, whose images vary in size (None: 224).
  config.image_size = ml_collections.FieldReference(None, field_type=int)
  # Host threads preparing batches ahead of the train loop (0: in the loop).
  config.data_threads = 2
  # > 0: grain worker processes preparing batches instead of the threads, for
  # decoding that costs milliseconds per image (ImageNet's JPEGs); the same
  # batches either way (docs/data.md).
  config.data_workers = 0

  # What a batch holds and what is minimised: "classification" (images and
  # labels) or "causal_lm" (tokens; configs/lm_shakespeare.py, motivation_jax/tasks.py).
  config.task = "classification"

  # The nested model: one module at the motivated size; the base is a view.
  config.model = ml_collections.ConfigDict()
  config.model.name = "cnn"  # "cnn" (residual CNN, batch norm) or "mlp"
  # Channels and residual blocks per stage of each sub-network ("mlp": widths only).
  config.model.base = ml_collections.ConfigDict({"widths": (16, 32), "depths": (1, 1)})
  config.model.motivated = ml_collections.ConfigDict({"widths": (32, 64), "depths": (2, 2)})
  # Batch-norm running statistics: "per_subnet" (each sub-network keeps its own,
  # the default) or "shared" (the paper's copied buffers; see docs/choices.md).
  config.model.batch_norm_stats = "per_subnet"
  # Extensions of the base: "default" (the layers' own initialisers) or "zero"
  # (the motivated model starts out computing the base; see docs/models.md).
  config.model.extension_init = "default"
  # How the train steps hold the base's part of each leaf: "in_place" (a slice
  # of the whole leaf, written back in place) or "blocks" (apart, as arrays of
  # their own: a base step is then an ordinary step of the base's arrays, a
  # motivated step joins and splits them; not with mesh.fsdp > 1). Checkpoints
  # and exports are the same either way (docs/choices.md, "The state layout").
  config.model.state_layout = "in_place"

  # Compute dtype: "float32" or "bfloat16" (for GPUs and TPUs). Parameters,
  # optimizer state, batch-norm statistics and the loss stay float32 in both
  # (docs/models.md "Mixed precision").
  config.dtype = "float32"

  # Optimisation. The learning-rate schedule (linear warm-up, then cosine decay
  # to 0) is indexed by the global batch count (under policy "both" the two
  # updates of a motivated batch share one position).
  config.optimizer = "sgd"  # "sgd" (with momentum) or "adamw"
  config.learning_rate = 0.05
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.warmup_epochs = 1.0
  # Gradient clipping by global norm before each update (None: off). A base step
  # clips the base's gradient, as the standalone base's step would.
  config.grad_clip_norm = ml_collections.FieldReference(None, field_type=float)
  config.batch_size = 64
  config.num_epochs = 20
  # None: num_epochs epochs. N: stop after N batches, with the warm-up and the
  # cosine decay compressed to them (the experiments' large_matched arm trains
  # the large model for the FLOPs the motivated arm spent). Image runs; a
  # language model's length is num_train_steps.
  config.train_steps = ml_collections.FieldReference(None, field_type=int)
  config.seed = 0

  # The motivation controller (motivation_jax/controller.py documents each key).
  config.motivation = ml_collections.ConfigDict()
  # loss_streak | never | always | every_n | random | replay
  config.motivation.condition = "loss_streak"
  # Fire when the training loss fell on each of the last k batches.
  config.motivation.loss_streak = ml_collections.ConfigDict(
      {"k": 3, "margin": 0.0, "ema": 0.0})
  config.motivation.every_n = ml_collections.ConfigDict({"n": 10})
  config.motivation.random = ml_collections.ConfigDict({"p": 0.1, "seed": 0})
  # Experiment B: fire at these batch indices.
  config.motivation.replay = ml_collections.ConfigDict({"indices": ()})
  config.motivation.phase_steps = 1     # motivated batches per activation
  config.motivation.warmup_steps = 0    # base-only batches at the start
  config.motivation.cooldown_steps = 0  # base-only batches after each phase
  config.motivation.decision_lag = 1    # 0: the paper's exact timing (a sync per step)
  # "switch", "both" (base step, then motivated) or "joint" (one update of both losses summed)
  config.motivation.policy = "switch"
  # Cost cap: at most this fraction of the batches so far are motivated (None: no cap).
  config.motivation.max_fraction = ml_collections.FieldReference(None, field_type=float)

  # Batch norm: before each evaluation, each checkpoint and export, every
  # sub-network's statistics are recomputed from this many fixed training
  # batches (0: evaluate with the running averages; docs/choices.md). Models
  # without batch norm ignore it.
  config.bn_recalibration_batches = 20

  # The device mesh: batches split over every device; with fsdp > 1 the
  # parameters and optimizer state are split over the fsdp axis too
  # (docs/sharding.md). data=-1 takes the devices fsdp leaves. Arrays of at
  # most fsdp_min_mib stay replicated (big_vision's fsdp rule uses 4 MiB).
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "fsdp_min_mib": 4.0})

  # A batch whose loss or a gradient is not finite is not applied (the state
  # stays as it was) and is counted; after this many such batches in a row the
  # run stops with one line (docs/reliability.md).
  config.max_nonfinite_steps = 10

  # One run per workdir: a run holds DIR/lease.json while it runs and renews it
  # every lease_ttl_s / 4 seconds; a second run on DIR refuses, and takes the
  # lease over only once its holder's process is gone (same host) or it was not
  # renewed for lease_ttl_s (docs/reliability.md "One run per workdir").
  config.lease_ttl_s = 60.0

  # JAX's persistent compilation cache: a run reads back what an earlier run of
  # the same shapes compiled (docs/compilation.md). None: the user's cache
  # directory, $XDG_CACHE_HOME/motivation_jax/xla (~/.cache/motivation_jax/xla);
  # "": no cache; JAX_COMPILATION_CACHE_DIR, when set, wins. Safe to change on resume.
  config.compilation_cache_dir = ml_collections.FieldReference(None, field_type=str)

  # Logging, evaluation and checkpoints.
  config.log_every_steps = 50
  config.eval_every_epochs = 1
  config.checkpoint_every_epochs = 5
  config.eval_batch_size = 256
  config.progress_bar = True
  return config
