"""Item 5 of the harness (benchmarks/run.py): the whole run's cost.

Wall time and training FLOPs of ``train_and_evaluate`` with the config's
condition against the same run with ``always`` (the large model on every
batch), for the same batches. The whole-run overhead against a plain loop is
benchmarks/whole_run_overhead.py's.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from benchmarks.common import Mode, median, rotated
from motivation_jax import train

def measure_whole_run(config, mode: Mode, workdir: str) -> dict[str, Any]:
  """``train_and_evaluate`` with the config's condition against ``always`` (the
  large model on every batch), same batches; interleaved repeats."""
  config = copy.deepcopy(config)
  config.progress_bar = False
  config.num_epochs = mode.whole_run_epochs
  alone = copy.deepcopy(config)
  alone.motivation.condition = "always"
  variants = {"motivated run": config, "large alone": alone}
  results: dict[str, list[dict]] = {name: [] for name in variants}
  for trial in range(mode.whole_run_repeats):
    for name in rotated(list(variants), trial):
      directory = os.path.join(workdir, f"{name.replace(' ', '_')}_{trial}")
      results[name].append(train.train_and_evaluate(variants[name], directory))
  out: dict[str, Any] = {"epochs": mode.whole_run_epochs, "repeats": mode.whole_run_repeats}
  for name, summaries in results.items():
    last = summaries[-1]
    out[name] = {"wall_time_s": median(s["wall_time_s"] for s in summaries),
                 "training_flops": last["training_flops"],
                 "base_steps": last["base_steps"], "motivated_steps": last["motivated_steps"],
                 "base_test_accuracy": last["base/test_accuracy"],
                 "motivated_test_accuracy": last["motivated/test_accuracy"]}
  out["wall_time_ratio"] = median(
      a["wall_time_s"] / b["wall_time_s"]
      for a, b in zip(results["motivated run"], results["large alone"]))
  out["flops_ratio"] = (out["motivated run"]["training_flops"]
                        / out["large alone"]["training_flops"])
  return out
