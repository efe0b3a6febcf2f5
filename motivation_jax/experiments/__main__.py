"""Command line: every arm of a config over seeds, then the report.

  python -m motivation_jax.experiments --config=configs/default.py --seeds=5 \
      --workdir=DIR [--arms=base_alone,motivated,...] [--config.key=value ...]

runs the arms (``suite.ARMS``; ``--arms`` picks some) for seeds 0..N-1 in
``DIR/<arm>-seed<seed>`` (finished runs are reused, interrupted ones resume),
then writes ``DIR/report.md``, ``DIR/report.json`` and the plots. Errors in the
input are one line with exit status 2 (``motivation_jax.cli``).
"""

from __future__ import annotations

import os
import shlex
import sys

import jax
from absl import flags
from ml_collections import config_flags

from motivation_jax import cli
from motivation_jax.common import cpu_model
from motivation_jax.experiments import report, suite

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the suite's runs and report.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Run seeds 0..seeds-1.", lower_bound=1)
_ARMS = flags.DEFINE_list("arms", ",".join(suite.ARMS),
                          "Arms to run and report (the random arms and large_matched also "
                          "need 'motivated', which then runs too).")
flags.mark_flags_as_required(["config", "workdir"])


def describe_machine() -> str:
  """CPU model, cores, memory and JAX's devices, for the report."""
  memory = ""
  try:
    pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    memory = f", {pages * size / 2 ** 30:.0f} GiB"
  except (ValueError, OSError, AttributeError):
    pass
  devices = jax.devices()
  return (f"{cpu_model()}, {os.cpu_count()} cores{memory}; JAX {jax.__version__}, "
          f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()})")


def main() -> None:
  try:
    config = _CONFIG.value
    config.to_dict()  # a config file that failed to load raises only when used
  except (OSError, SyntaxError, AttributeError, TypeError) as e:
    cli.fail(f"cannot load --config: {e}", e)
  arms = suite.check_arms(_ARMS.value)
  seeds = list(range(_SEEDS.value))
  with suite.hold(config, _WORKDIR.value):  # one suite per directory, to its report
    report_paths = _run_and_report(config, seeds, arms)
  print("\n".join(["report:"] + [f"  {p}" for p in report_paths]))


def _run_and_report(config, seeds: list[int], arms: tuple[str, ...]) -> list[str]:
  records = suite.run_suite(config, seeds, _WORKDIR.value, _ARMS.value)
  meta = {
      "config": config_flags.get_config_filename(flags.FLAGS["config"]),
      "overrides": [a for a in sys.argv[1:] if a.startswith("--config.")],
      "seeds": seeds, "arms": [a for a in arms if a in _ARMS.value],
      "machine": describe_machine(),
      "command": "python -m motivation_jax.experiments " + shlex.join(sys.argv[1:]),
      "phase_steps": config.motivation.phase_steps,
  }
  return report.write_report(report.build_report(records, meta), records, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
