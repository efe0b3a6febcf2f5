"""Multi-process start-up: ``jax.distributed.initialize`` when this process is one of several.

JAX's multi-controller runtime runs one Python process per host (or per GPU);
every process runs the same program and they find each other through a
coordinator (process 0's address). ``initialize`` calls
``jax.distributed.initialize`` when, and only when, the run has several
processes:

- explicit flags (``--coordinator_address``, ``--num_processes``,
  ``--process_id``, optionally ``--local_device_ids``) from any launcher
  (``launch/local.sh``, ``launch/gke_jobset.yaml``); JAX's own cluster detection
  is then switched off, so nothing it guesses overrides them;
- otherwise a cluster that JAX itself detects (``jax._src.clusters``: a Cloud
  TPU VM or GKE TPU slice, SLURM (``srun``), Open MPI, Kubernetes with the
  ``kubernetes`` package) and that reports more than one process. JAX then fills
  in every value, so this module asks it only *whether* to start, with the same
  detection in the same order, and never re-derives addresses or ids.

A plain single-process run calls nothing: no coordinator, no port. The flags are
checked before JAX is imported, so a bad combination costs no start-up time.
Importing this module imports no JAX.

``end`` closes a multi-process run explicitly, after its last write: every
process waits for the others at one barrier of the coordination service, then
calls ``jax.distributed.shutdown()``, before Python's own exit begins. Left to
JAX's ``atexit`` hook instead, the shutdown runs while the interpreter tears
down the run's threads and the backend, and a shutdown barrier that fails
there aborts every process (SIGABRT, status 134) after a run that succeeded;
docs/reliability.md ("The end of a multi-process run") says what was seen and
what a process does when a peer never arrives.
"""

from __future__ import annotations

import re
import sys
from typing import Sequence

from motivation_jax.errors import ConfigError, TrainingError

_ADDRESS = re.compile(r"^\S+:\d+$")
# The coordination service's barrier that every process of a run meets at its end.
END_BARRIER = "motivation_jax_end_of_run"
# How long a process waits for the others there, and JAX's own shutdown barrier
# (``shutdown_timeout_seconds``) after it: JAX's default.
SHUTDOWN_TIMEOUT_S = 300
# Whether ``initialize`` joined a multi-process run (a client whose connect
# failed has no run to end).
_started = False


def check_flags(coordinator_address: str | None, num_processes: int | None,
                process_id: int | None, local_device_ids: Sequence[int] | None) -> bool:
  """Whether the explicit flags ask for a multi-process run; refuses a combination
  that cannot start one (``ConfigError``, one line)."""
  given = {name: value for name, value in (("--coordinator_address", coordinator_address),
                                           ("--num_processes", num_processes),
                                           ("--process_id", process_id))
           if value is not None}
  if given and len(given) < 3:
    missing = [name for name in ("--coordinator_address", "--num_processes", "--process_id")
               if name not in given]
    raise ConfigError(f"{', '.join(given)} needs {' and '.join(missing)} too (an explicit "
                      "multi-process start gives all three; on TPU VMs, SLURM and Kubernetes "
                      "give none and JAX finds them)")
  if not given:
    return False
  if not _ADDRESS.match(coordinator_address):
    raise ConfigError(f"--coordinator_address must be HOST:PORT (process 0's host), "
                      f"got {coordinator_address!r}")
  if num_processes < 1:
    raise ConfigError(f"--num_processes must be >= 1, got {num_processes}")
  if not 0 <= process_id < num_processes:
    raise ConfigError(f"--process_id must be in [0, {num_processes - 1}] for "
                      f"--num_processes={num_processes}, got {process_id}")
  if local_device_ids is not None and any(i < 0 for i in local_device_ids):
    raise ConfigError(f"--local_device_ids must be device numbers >= 0, got {local_device_ids}")
  return True


def detected_cluster():
  """The cluster environment JAX's ``jax.distributed.initialize()`` would use, or None.

  The same choice as ``ClusterEnv.auto_detect_unset_distributed_params``: the
  first registered environment that is present and not opt-in only (mpi4py is).
  A private module of JAX: setup.cfg pins jax below 0.11, and tests/test_launch.py
  fails if its shape changes.
  """
  from jax._src import clusters
  return next((env for env in clusters.ClusterEnv._cluster_types
               if not env.opt_in_only_method and env.is_env_present()), None)


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
               shutdown_timeout_s: int = SHUTDOWN_TIMEOUT_S) -> str | None:
  """Joins the run's other processes if it has any; returns how (``"flags"`` or
  the detected cluster's name), or None for a single-process run.

  Must run before anything touches a JAX device (``main()`` calls it first).
  """
  explicit = check_flags(coordinator_address, num_processes, process_id, local_device_ids)
  if shutdown_timeout_s < 1:
    raise ConfigError(f"--shutdown_timeout_s must be >= 1, got {shutdown_timeout_s}")
  import jax
  if explicit:
    how, kwargs = "flags", dict(coordinator_address=coordinator_address,
                                num_processes=num_processes, process_id=process_id,
                                cluster_detection_method="deactivate")
  else:
    try:
      cluster = detected_cluster()
      count = cluster.get_process_count() if cluster is not None else 1
    except Exception as e:  # a cluster that half answers (metadata server, Kubernetes API)
      raise TrainingError(f"cannot read the multi-process settings of this cluster "
                          f"({type(e).__name__}: {e}); give --coordinator_address, "
                          "--num_processes and --process_id instead") from e
    if count <= 1:
      if local_device_ids is not None:
        raise ConfigError("--local_device_ids is for a multi-process run: give it with "
                          "--coordinator_address, --num_processes and --process_id, or run "
                          "under a launcher JAX detects (TPU VM, SLURM, Kubernetes)")
      return None
    how, kwargs = getattr(cluster, "name", "") or cluster.__name__, {}
  if local_device_ids is not None:
    kwargs["local_device_ids"] = list(local_device_ids)
  try:
    jax.distributed.initialize(shutdown_timeout_seconds=shutdown_timeout_s, **kwargs)
  except (RuntimeError, ValueError) as e:  # JaxRuntimeError is a RuntimeError
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise TrainingError(f"jax.distributed.initialize ({how}) failed: {first_line[:300]}") from e
  global _started
  _started = True
  return how



def end(timeout_s: int = SHUTDOWN_TIMEOUT_S) -> bool:
  """Ends this process's part of a multi-process run; returns whether it did.

  Call it after the run's last write (final checkpoint, summary, writers
  closed), on every exit path that is not an abort. Every process waits at
  ``END_BARRIER`` for the others (at most ``timeout_s``), then shuts
  ``jax.distributed`` down while the interpreter, its threads and the backend
  are all still whole. Returns True at once where ``jax.distributed`` is not
  running (a single process). Where a peer does not arrive in time, it prints
  one ``warning:`` line and returns False without shutting down: the caller
  must then leave with ``os._exit`` (``cli.run`` does), since JAX's own
  shutdown at exit would wait for the missing peer as long again and then
  abort the process.
  """
  from jax._src import distributed as jax_distributed
  client = jax_distributed.global_state.client
  if not _started or client is None:
    return True
  import jax
  try:
    client.wait_at_barrier(END_BARRIER, timeout_s * 1000)
  except Exception as e:  # a JaxRuntimeError: the barrier timed out or failed
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    print(f"warning: not every process of this run reached its end within {timeout_s} s "
          f"({first_line[:200]}); this process leaves without shutting jax.distributed "
          "down (--shutdown_timeout_s sets the wait)", file=sys.stderr)
    return False
  jax.distributed.shutdown()
  return True
