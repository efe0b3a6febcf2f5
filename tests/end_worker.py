"""One process of a 2-process run that leaves through ``cli.run`` and
``distributed.end``, as ``python -m motivation_jax.main`` does, without training
(tests/test_clean_exit.py). Arguments: PROCESS_ID PORT MODE TIMEOUT_S, MODE one of

- ``ok``: returns at once (status 0);
- ``error``: raises a ``ConfigError`` (status 2, one ``error:`` line);
- ``preempted``: raises ``Preempted`` with status 143;
- ``stall``: process 1 never reaches the end (it sleeps); process 0 returns.

Every process prints ``ended`` once ``distributed.end`` shut ``jax.distributed``
down, so the test sees that the explicit end ran, not JAX's at exit.
"""

import sys
import time


def main(process_id: int, port: int, mode: str, timeout_s: int) -> None:
  from motivation_jax import cli, distributed
  from motivation_jax.errors import ConfigError, Preempted

  sys.argv = sys.argv[:1]  # absl parses no flags of this script
  distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                         process_id=process_id, shutdown_timeout_s=timeout_s)

  def run() -> None:
    if mode == "error":
      raise ConfigError("config.dataset 'nope' is not a data set this package has")
    if mode == "preempted":
      raise Preempted("stopped by SIGTERM after batch 3 of 44", 143)
    if mode == "stall" and process_id == 1:
      time.sleep(600)

  def end() -> bool:
    ended = distributed.end(timeout_s)
    if ended:
      from jax._src import distributed as jax_distributed
      assert jax_distributed.global_state.client is None
      print("ended", flush=True)
    return ended

  cli.run(run, end=end)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
