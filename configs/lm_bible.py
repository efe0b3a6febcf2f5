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

Expected result (measured once, seed 0, on a 2-core CPU shared with other
jobs): 2000 steps in 299 s wall; held-out bits/byte 2.144 (base) and 2.182
(motivated); the motivated model trained on 123 of the 2000 batches, at 41.2%
of the training FLOPs of the motivated model alone on every batch (the experiments
suite's seed 0 gave the same, 2026-12-04). Against the same shapes trained alone
and jointly, 3 seeds: docs/results/bible_baselines/report.md.
"""

import os

from motivation_jax import config_lib


def get_config(arg: str | None = None):
  config = config_lib.load_config_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_shakespeare.py"))
  config.dataset = "bible"
  return config_lib.variant(config, arg, smoke=config_lib.make_lm_smoke)
