r"""The King James Bible, byte-level: the LM quick start's shapes on a second corpus.

configs/lm_shakespeare.py's nested transformer (motivated: nanoGPT's CPU shape,
4 layers, 4 heads of 32, width 128, FFN 512, context 64, batch 12; base: 2
heads, FFN 128, the same 4 blocks) on Debian's King James Bible, one verse a
line, the verse references stripped. Held out: Ruth, Job, Proverbs, Mark,
Romans, Hebrews (353,765 bytes, 8.5%; data/text.py).

Data: ``apt-get install bible-kjv-text bible-kjv`` (the ``bible`` program reads
its compressed data file). Nothing downloads at run time.

Command:

  python -m motivation_jax.main --config=configs/lm_bible.py --workdir=workdirs/lm_bible

Expected result: not measured yet (the Shakespeare config's run is in its
docstring and README "Language models").
"""

from motivation_jax import config_lib


def get_config(arg: str | None = None):
  config = config_lib.lm_defaults(config_lib.default_config(__file__))
  config.dataset = "bible"
  config.batch_size = 12
  config.model.base = {"num_heads": 2, "ffn_dim": 128, "num_layers": 4}
  config.model.motivated = {"num_heads": 4, "ffn_dim": 512, "num_layers": 4}
  return config_lib.variant(config, arg, smoke=config_lib.make_lm_smoke)
