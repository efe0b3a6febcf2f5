r"""What reading the losses costs a loop: blocking on each step, or the read?

  python -m benchmarks.loop_reads [--config=configs/default.py[:variant]] [--tiny] \
      [--batches=330] [--trials=7]

A companion to the harness (benchmarks/run.py), whose loops (benchmarks/loop.py)
and trial scheme (benchmarks/common.py) it reuses: on the same compiled steps,
batches and schedule, each variant against the schedule loop that reads
nothing, as the median over interleaved trials of the per-trial ratio (1.0:
costs nothing; lower is slower):

- ``real``: ``train.train`` at decision lag 1 (the harness's loop overhead);
- ``reads``: reads each loss one batch late with ``float(np.asarray(...))``,
  blocking until its step is done (the harness's bare reading loop);
- ``waits``: blocks on each loss one batch late and reads nothing;
- ``reads when ready``: reads a loss only once ``is_ready()`` says its step is
  done, and never blocks before the end.

It prints a markdown table; benchmarks/results/README.md quotes what it measured.
"""

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time

import jax

from benchmarks.common import fresh_state, load_config, loop_config, rotated, tiny_config
from benchmarks.loop import read_loss, real_loop, reading_loop, resident, schedule_loop
from motivation_jax import train


def _reads_when_ready(run, state, kinds) -> float:
  start = time.perf_counter()
  pending = collections.deque()
  for t, kind in enumerate(kinds):
    state, metrics = run.train_steps[kind](state, run.train_data[t])
    pending.append(metrics["loss"])
    while pending and pending[0].is_ready():
      read_loss(pending.popleft())
  for loss in pending:
    read_loss(loss)
  jax.block_until_ready(state)
  return time.perf_counter() - start


VARIANTS = {  # (run, state, kinds) -> seconds
    "schedule": schedule_loop,
    "real": lambda run, state, kinds: real_loop(run, state, 1)[0],
    "reads": lambda run, state, kinds: reading_loop(run, state, kinds, 1),
    "waits": lambda run, state, kinds: reading_loop(
        run, state, kinds, 1, take=lambda loss: loss.block_until_ready()),
    "reads when ready": _reads_when_ready,
}


def measure(config, batches: int, trials: int) -> dict[str, dict[str, float]]:
  """``{variant: {"ratio": schedule / variant, "us_per_batch": ...}}``."""
  with tempfile.TemporaryDirectory() as workdir:
    run, state0 = train.setup(loop_config(config, batches), workdir)
    run = resident(run)
    _, kinds = real_loop(run, fresh_state(state0), 1)
    for loop in VARIANTS.values():  # warm-up
      loop(run, fresh_state(state0), kinds)
    times = collections.defaultdict(list)
    for trial in range(trials):
      for name in rotated(list(VARIANTS), trial):
        times[name].append(VARIANTS[name](run, fresh_state(state0), kinds))
    run.close()
  return {name: {"ratio": statistics.median(s / v for s, v in zip(times["schedule"], t)),
                 "us_per_batch": statistics.median(t) / len(kinds) * 1e6,
                 "batches": len(kinds)}
          for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[2])
  parser.add_argument("--config", default="configs/default.py",
                      help="the step's config, PATH[:variant]")
  parser.add_argument("--tiny", action="store_true", help="the harness's tiny MLP instead")
  parser.add_argument("--batches", type=int, default=330)
  parser.add_argument("--trials", type=int, default=7)
  args = parser.parse_args(argv)
  config = load_config(args.config)
  if args.tiny:
    config = tiny_config(config)
  result = measure(config, args.batches, args.trials)
  print(f"{result['schedule']['batches']} batches, {args.trials} trials, "
        f"{jax.devices()[0].device_kind} ({os.cpu_count()} cores)")
  print("| variant | schedule / variant | µs per batch |\n|---|---:|---:|")
  for name, r in result.items():
    print(f"| {name} | {r['ratio']:.3f} | {r['us_per_batch']:,.1f} |")
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
