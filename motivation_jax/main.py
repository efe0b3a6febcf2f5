"""Command line: ``python -m motivation_jax.main --config=configs/default.py --workdir=DIR``.

Config values are overridden with ``--config.key=value``. Errors in the input
are printed as one line with exit status 2 (``motivation_jax.cli``).

Several processes (hosts, or GPUs) form one run through ``jax.distributed``: on
TPU VMs, SLURM and Kubernetes JAX finds the processes itself; any other
launcher gives ``--coordinator_address``, ``--num_processes`` and
``--process_id`` (``motivation_jax.distributed``; launch/ has a script per
platform). Every process gets the same flags but ``--process_id``. A
multi-process run ends explicitly: once its last file is written, on every exit
path but an abort, the processes meet and shut ``jax.distributed`` down
(``distributed.end``, at most ``--shutdown_timeout_s`` of waiting).
"""

from absl import flags
from ml_collections import config_flags

from motivation_jax import cli, distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory or gs:// URL for checkpoints and "
                               "metrics (in a multi-process run, one that every process sees).")
flags.mark_flags_as_required(["config", "workdir"])
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for a multi-process run that JAX "
    "does not detect (with --num_processes and --process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index in [0, --num_processes).")
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    "local_device_ids", None, "Comma-separated ids of the local devices this process uses "
    "(default: all it sees; on SLURM, one GPU per task).")
_SHUTDOWN_TIMEOUT_S = flags.DEFINE_integer(
    "shutdown_timeout_s", distributed.SHUTDOWN_TIMEOUT_S,
    "In a multi-process run: how long a finished process waits for the others at the end "
    "before it leaves anyway, and JAX's own shutdown barrier.")


def main() -> None:
  try:
    config = _CONFIG.value
    config.to_dict()  # a config file that failed to load raises only when used
  except (OSError, SyntaxError, AttributeError, TypeError) as e:  # the config file failed
    cli.fail(f"cannot load --config: {e}", e)
  local_device_ids = _LOCAL_DEVICE_IDS.value
  if local_device_ids is not None:
    try:
      local_device_ids = [int(i) for i in local_device_ids]
    except ValueError:
      cli.fail(f"--local_device_ids must be comma-separated integers, got "
               f"{','.join(_LOCAL_DEVICE_IDS.value)!r}")
  # Before any JAX device exists: jax.distributed must start first.
  distributed.initialize(coordinator_address=_COORDINATOR_ADDRESS.value,
                         num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                         local_device_ids=local_device_ids,
                         shutdown_timeout_s=_SHUTDOWN_TIMEOUT_S.value)
  from motivation_jax import train  # after flag parsing: importing JAX takes a moment
  summary = train.train_and_evaluate(config, _WORKDIR.value)
  print(train.format_summary(summary))


def end() -> bool:
  """After the run's last write: ``distributed.end`` (nothing for one process)."""
  return distributed.end(_SHUTDOWN_TIMEOUT_S.value)


if __name__ == "__main__":
  cli.run(main, end=end)
