"""Command line: ``python -m motivation_jax.main --config=configs/default.py --workdir=DIR``.

Config values are overridden with ``--config.key=value``. Errors in the input
(a config value, a data set, a checkpoint, a model that does not nest) are
printed as one line and exit with status 2.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from motivation_jax.errors import MotivationError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  from motivation_jax import train  # after flag parsing: importing JAX takes a moment
  try:
    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except MotivationError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(train.format_summary(summary))


if __name__ == "__main__":
  app.run(main)
