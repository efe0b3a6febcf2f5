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
  try:
    config = _CONFIG.value
    config.to_dict()  # a config file that failed to load raises only when used
  except (OSError, SyntaxError, AttributeError, TypeError) as e:  # the config file failed
    _fail(f"cannot load --config: {e}")
  from motivation_jax import train  # after flag parsing: importing JAX takes a moment
  try:
    summary = train.train_and_evaluate(config, _WORKDIR.value)
  except MotivationError as e:
    _fail(str(e))
  print(train.format_summary(summary))


def _fail(message: str) -> None:
  # One line: ml_collections' messages carry escaped newlines and quotes.
  text = message.replace("\\n", " ").replace("\\", "").replace("'", "")
  print(f"error: {' '.join(text.split())}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  """absl's parser, with a bad ``--config.*`` override reported in one line."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    # ml_collections raises the latter for a key that does not exist or a
    # value of the wrong type.
    _fail(f"bad command line: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
