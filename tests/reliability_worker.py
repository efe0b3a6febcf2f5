"""One small training run in its own process, for tests/test_reliability.py.

``python tests/reliability_worker.py '{"workdir": ..., ...}'`` trains
``test_train.small_config`` (with ``overrides``) through the command line's
error path (``cli.run``), so its exit status and last line are what a user
sees. Optional keys stop it the way the tests need:

- ``"kill_at_batch": k``: SIGKILL itself once batch k is dispatched;
- ``"kill_in_save": n``: SIGKILL itself right after the save of batch n has
  started, while Orbax is still writing it in the background;
- ``"poison_from_batch": k``: from training batch k on, each batch has a label
  past the last class, so its loss is NaN in the real compiled step;
- ``"report_batches": true``: print ``batch k`` on stdout as each batch is
  dispatched, and sleep ``batch_sleep_s`` after it, so that a test can send a
  signal from outside while it trains.
"""

import json
import os
import signal
import sys
import time

# The package of this tree, whatever is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import conftest  # noqa: E402,F401  (the suite's JAX settings, before JAX starts)
from test_train import small_config  # noqa: E402

from motivation_jax import checkpoint, cli, train  # noqa: E402


def main() -> None:
  args = json.loads(sys.argv[1])
  del sys.argv[1:]  # absl parses the rest
  config = small_config(**args.get("overrides", {}))

  push = train.PendingMetrics.push

  def push_and_maybe_stop(self, t, kind, metrics):
    push(self, t, kind, metrics)
    if t == args.get("kill_at_batch"):
      os.kill(os.getpid(), signal.SIGKILL)
    if args.get("report_batches"):
      print(f"batch {t}", flush=True)
      time.sleep(args.get("batch_sleep_s", 0.05))

  save = checkpoint.Checkpointer.save

  def save_and_maybe_die(self, step, **items):
    save(self, step, **items)
    if step == args.get("kill_in_save"):
      os.kill(os.getpid(), signal.SIGKILL)

  getitem = train.data.TrainBatches.__getitem__

  def maybe_poisoned(self, step):
    batch = getitem(self, step)
    if step >= args.get("poison_from_batch", float("inf")):
      batch = {**batch, "label": batch["label"] + 200}
    return batch

  train.data.TrainBatches.__getitem__ = maybe_poisoned
  train.PendingMetrics.push = push_and_maybe_stop
  checkpoint.Checkpointer.save = save_and_maybe_die
  cli.run(lambda: train.train_and_evaluate(config, args["workdir"]))


if __name__ == "__main__":
  main()
