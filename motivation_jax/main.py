"""Command line: ``python -m motivation_jax.main --config=configs/default.py --workdir=DIR``.

Config values are overridden with ``--config.key=value``. Errors in the input
are printed as one line with exit status 2 (``motivation_jax.cli``).
"""

from absl import flags
from ml_collections import config_flags

from motivation_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main() -> None:
  try:
    config = _CONFIG.value
    config.to_dict()  # a config file that failed to load raises only when used
  except (OSError, SyntaxError, AttributeError, TypeError) as e:  # the config file failed
    cli.fail(f"cannot load --config: {e}", e)
  from motivation_jax import train  # after flag parsing: importing JAX takes a moment
  summary = train.train_and_evaluate(config, _WORKDIR.value)
  print(train.format_summary(summary))


if __name__ == "__main__":
  cli.run(main)
