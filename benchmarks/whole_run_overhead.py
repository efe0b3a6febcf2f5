r"""Item 7 of the harness alone: the whole-run overhead, cold and warm compilation cache.

  python -m benchmarks.whole_run_overhead [--config=configs/default.py] [--quick] \
      [--repeats=N] [--out=benchmarks/results/whole_run_overhead_BACKEND]

``measure_overhead`` (``python -m benchmarks.run`` measures it too, after
items 1-5, and renders it with ``overhead_markdown``): ``train_and_evaluate``
of the base alone against the plain loop of benchmarks/plain_loop.py. Writes
``OUT.json`` and ``OUT.md``. Run it without ``JAX_COMPILATION_CACHE_DIR`` set,
or no run is cold.
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import json
import os
import sys
import tempfile
import time
from typing import Any

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from benchmarks.common import (MODES, RESULTS, Mode, describe_machine, load_average,
                               load_config, median, rotated, steps_per_epoch)
from motivation_jax import compilation, train


# The package's runs: its defaults ("package", the quick start's settings), and
# the same work as the plain loop ("same_work"): no batch-norm recalibration
# (the plain loop evaluates with the running averages) and one checkpoint, the
# last (a run always writes it; the plain loop writes none).
PACKAGE_SETTINGS = {
    "package": lambda config: {},
    "same_work": lambda config: {"bn_recalibration_batches": 0,
                                 "checkpoint_every_epochs": config.num_epochs},
}
VARIANTS = (*PACKAGE_SETTINGS, "plain")


def measure_overhead(config, mode: Mode, workdir: str) -> dict[str, Any]:
  """Whole-run overhead: ``train_and_evaluate`` of the base alone (condition
  ``never``) against ``plain_loop.plain_run``, the plain flax/optax loop of the
  standalone base on the same batches, evaluating as often; each with a cold
  compilation cache (an empty directory) and then warm (the same directory,
  refilled by the cold run). In-memory caches are cleared before every run
  (``jax.clear_caches``), so a warm run reads its programs from disk as a new
  process would. The package runs twice: with its defaults, and doing the plain
  loop's work (``PACKAGE_SETTINGS``). Interleaved trials; the ratios are
  medians of per-trial ratios (``warm_ratio``: the defaults, ``same_work_warm_ratio``)."""
  from benchmarks.plain_loop import plain_run
  config = copy.deepcopy(config)
  config.progress_bar = False
  config.num_epochs = mode.overhead_epochs or config.num_epochs
  config.motivation.condition = "never"
  config.motivation.max_fraction = None
  cache_before = jax.config.jax_compilation_cache_dir
  times: dict[str, list[float]] = collections.defaultdict(list)
  compiles: dict[str, dict] = {}
  accuracy: dict[str, float] = {}
  for trial in range(mode.whole_run_repeats):
    for variant in rotated(list(VARIANTS), trial):
      cache = os.path.join(workdir, f"cache_{variant}_{trial}")
      for temperature in ("cold", "warm"):
        jax.clear_caches()
        if variant != "plain":
          run_config = copy.deepcopy(config)
          run_config.compilation_cache_dir = cache
          for key, value in PACKAGE_SETTINGS[variant](config).items():
            run_config[key] = value
          summary = train.train_and_evaluate(
              run_config, os.path.join(workdir, f"run_{variant}_{trial}_{temperature}"))
          seconds, log = summary["wall_time_s"], summary["compilation"]
          accuracy[variant] = summary["base/test_accuracy"]
        else:
          used = compilation.use_cache(cache)
          with compilation.CompileLog() as compile_log:
            result = plain_run(config)
          seconds, log = result["wall_time_s"], compile_log.summary(used)
          accuracy[variant] = result["test_accuracy"]
        times[f"{variant} {temperature}"].append(seconds)
        compiles[f"{variant} {temperature}"] = {
            k: v for k, v in log.items() if k != "programs"} | {  # no machine path in results
            "cache_dir": f"DIR/cache_{variant}_{trial}"}
  # Give the process back the cache it had (the directories above are temporary).
  jax.config.update("jax_compilation_cache_dir", cache_before)
  jax_cache.reset_cache()
  trials = range(mode.whole_run_repeats)
  out: dict[str, Any] = {
      "epochs": config.num_epochs, "repeats": mode.whole_run_repeats,
      "batches": config.num_epochs * steps_per_epoch(config),
      "eval_every_epochs": config.eval_every_epochs,
      "bn_recalibration_batches": config.bn_recalibration_batches,
      "checkpoint_every_epochs": config.checkpoint_every_epochs,
      "wall_time_s": {k: median(v) for k, v in times.items()},
      "compilation": compiles, "test_accuracy": accuracy,
      # A cache that JAX_COMPILATION_CACHE_DIR set wins over the harness's empty ones.
      "cold_is_cold": not os.environ.get(compilation.ENV),
  }
  for variant in PACKAGE_SETTINGS:
    prefix = "" if variant == "package" else f"{variant}_"
    for temperature in ("cold", "warm"):
      ratios = [times[f"{variant} {temperature}"][i] / times[f"plain {temperature}"][i]
                for i in trials]
      out[f"{prefix}{temperature}_ratio"] = median(ratios)
      out[f"{prefix}{temperature}_ratios"] = ratios  # each trial's, in trial order
  return out



def overhead_markdown(o: dict[str, Any]) -> list[str]:
  """The lines of ``measure_overhead``'s table."""
  lines = [f"Whole-run overhead (`train_and_evaluate` of the base alone, condition "
                f"`never`, against `benchmarks/plain_loop.py`, the plain flax/optax loop of "
                f"the standalone base on the same {o['batches']} batches, evaluating the test "
                f"set every {o['eval_every_epochs']} epoch(s); the package also "
                f"recalibrates batch norm on {o['bn_recalibration_batches']} batches before "
                f"each evaluation, evaluates the motivated model (never trained here) at the "
                f"end, and checkpoints every {o['checkpoint_every_epochs']} epochs with both "
                f"sub-networks' statistics; median of {o['repeats']}; "
                "in-memory caches cleared before each run"
                + ("" if o["cold_is_cold"] else "; JAX_COMPILATION_CACHE_DIR was set, so "
                   "no run was cold") + "):", "",
            "| run | cold cache s | warm cache s | compiled cold | compile s cold "
            "| from cache warm | read s warm | test acc |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for variant in [v for v in VARIANTS if f"{v} cold" in o["wall_time_s"]]:
    cold, warm = (o["compilation"][f"{variant} {t}"] for t in ("cold", "warm"))
    lines.append(f"| {variant} | {o['wall_time_s'][f'{variant} cold']:.1f} | "
                 f"{o['wall_time_s'][f'{variant} warm']:.1f} | {cold['compiled']} | "
                 f"{cold['compile_s']:.1f} | {warm['from_cache']} | "
                 f"{warm['cache_read_s']:.2f} | {o['test_accuracy'][variant]:.4f} |")
  spread = lambda key: (f" (trials {', '.join(f'{r:.2f}' for r in o[key])})"
                        if len(o.get(key, ())) > 1 else "")
  lines += ["", f"Package / plain loop: cold {o['cold_ratio']:.2f}{spread('cold_ratios')}, "
                f"warm {o['warm_ratio']:.2f}{spread('warm_ratios')}."]
  if "same_work_warm_ratio" in o:
    lines += ["", "`same_work`: the package doing the plain loop's work, no batch-norm "
              "recalibration (`bn_recalibration_batches=0`) and one checkpoint, the last "
              "(`checkpoint_every_epochs` = the run's epochs); it still evaluates the "
              "motivated model once, at the end. Same work / plain loop: cold "
              f"{o['same_work_cold_ratio']:.2f}{spread('same_work_cold_ratios')}, warm "
              f"{o['same_work_warm_ratio']:.2f}{spread('same_work_warm_ratios')}."]
  return lines



def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/default.py")
  parser.add_argument("--quick", action="store_true", help="5 epochs, one trial")
  parser.add_argument("--out", default=None)
  parser.add_argument("--repeats", type=int, default=None,
                      help="interleaved trials (default: the mode's, 2 in full mode)")
  parser.add_argument("--note", default="", help="a sentence added to the markdown")
  args = parser.parse_args(argv)
  mode = MODES["quick" if args.quick else "full"]
  if args.repeats is not None:
    if args.repeats < 1:
      parser.error(f"--repeats must be at least 1, got {args.repeats}")
    mode = dataclasses.replace(mode, whole_run_repeats=args.repeats)
  out = args.out or os.path.join(RESULTS, f"whole_run_overhead_{jax.default_backend()}")
  start, load_before = time.perf_counter(), load_average()
  with tempfile.TemporaryDirectory() as workdir:
    overhead = measure_overhead(load_config(args.config), mode, workdir)
  given = argv if argv is not None else sys.argv[1:]
  results = {"command": " ".join(["python -m benchmarks.whole_run_overhead",
                                  *(a for a in given if not a.startswith("--note"))]),
             "mode": mode.name, "machine": describe_machine(), "load_before": load_before,
             "load_after": load_average(), "seconds": time.perf_counter() - start,
             "overhead": overhead, "note": args.note}
  write(results, out)
  return results


def write(results: dict, out: str) -> None:
  """``OUT.json`` and ``OUT.md`` of ``results``."""
  with open(out + ".json", "w") as f:
    json.dump(results, f, indent=2)
  m, o = results["machine"], results["overhead"]
  lines = [f"# Whole-run overhead: the base alone against a plain loop", "",
           f"`{results['command']}`, {m['date']}: {m['cpu']}, {m['cores']} cores; JAX "
           f"{m['jax']} ({m['backend']}). Load average {results['load_before']} before, "
           f"{results['load_after']} after; {results['seconds']:.0f} s in all.", ""]
  lines += overhead_markdown(o)
  if results["note"]:
    lines += ["", results["note"]]
  with open(out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
