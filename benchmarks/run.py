r"""The performance harness: what the two-model loop costs against its parts.

  python -m benchmarks.run [--config=configs/default.py[:variant]] [--quick] \
      [--accelerator | --accelerator-only | --skip-accelerator] \
      [--out=benchmarks/results/harness_BACKEND]   # harness_cpu, harness_gpu, ...

Every figure is a ratio of two variants timed in this one process, trial
against trial: each trial runs both variants back to back (in alternating
order), and the figure is the median over trials of the per-trial ratio. A
machine that slows down for a while slows both sides of a trial, so load
shifts the absolute times far more than the ratios (the load average before
and after is recorded, and how many cores other processes kept busy during
the run). The harness measures, for the config's model (the
"realistic" step) and for a tiny MLP on the same data (a step of about 100 µs
on a CPU):

1. *Loop overhead*: batches/s of ``train.train``, the real loop (controller,
   agreement check, metrics read ``decision_lag`` batches late, logging),
   against a loop that dispatches the same compiled steps on the same batches
   from the schedule the real loop took, reading no metric. The condition is
   ``loss_streak(k=1)``, which reads every loss and fires on about half the
   batches. Both loops take the same batches, put on the device beforehand
   (``ResidentBatches``: the input pipeline is data_throughput.py's subject).
   Evaluation and the checkpoint at the end of ``train`` are replaced by what
   the loop itself owes there (reading every pending loss, waiting for the
   last step): they are not per-batch costs. Also timed: a bare loop that only
   reads each loss at the lag (the least any loop that reads losses costs),
   and the loop's own host work with steps that return at once. Target: >= 0.98
   for steps of 1 ms or more, >= 0.95 for the tiny step.
2. *Step cost*: the compiled base step (``run.train_steps``) against an
   ordinary train step of the standalone base model (``model.standalone``,
   written here as any Flax user would, with the same optimizer, loss, batch
   and dtype), and the motivated step against the standalone large model's.
   Target <= 1.05.
3. *Host blocking*: the time per batch the loop's metric read waits for the
   device, at decision lag 0, 1 and 2, and each lag's loop-overhead ratio.
4. *Compilations*: XLA compilations by program over a whole
   ``train_and_evaluate`` run with hundreds of switches between the kinds
   (exactly one per step kind is the target), and the start-up compile time of
   each kind (tracing, lowering and XLA).
5. *Whole-run cost*: wall time and training FLOPs of ``train_and_evaluate``
   with the config's condition against the same run with ``always`` (the large
   model on every batch), for the same batches.
   *Whole-run overhead* (``measure_overhead`` of benchmarks/whole_run_overhead.py,
   which also runs it alone): ``train_and_evaluate`` of the base alone (condition
   ``never``) against ``benchmarks/plain_loop.py``, the plain flax/optax loop of
   the standalone base on the same batches, evaluating as often, each with a cold
   and then a warm compilation cache. Target (warm): <= 1.3.
   *Paired step* (``benchmarks/paired_step.py``): the base step of a user's own
   Linen module paired by ``nesting.paired`` against the ordinary optax step
   of the small module alone, in both state layouts (``model.state_layout``:
   in place, the default, and blocks, with the blocks' motivated step against
   the in-place one beside it). Target: <= 1.05.
   *LM steps* (``benchmarks/lm_steps.py``, ``--lm-config``, default
   configs/lm_shakespeare.py; its ``:smoke`` in ``--tiny``): the nested
   transformer's base and motivated steps against the standalone base and
   large transformers' ordinary steps, tokens/s, XLA's FLOPs against the
   formula, and MFU where the device's peak is known. Target: <= 1.05.
6. On an accelerator (or with ``--accelerator``; ``--accelerator-only`` skips
   1-5 and writes ``OUT`` = ``harness_BACKEND_steps`` by default): absolute step
   times, MFU and memory of ResNet-20 in ResNet-56 and ViT-Ti in ViT-S on 32x32
   images, in float32 and, where ``config.dtype`` exists, bfloat16.
   benchmarks/device/ runs it on a lent GPU.

Each item has its own module in benchmarks/, so that one measurement can be read
(and run, as loop_reads.py and whole_run_overhead.py do) without the others:
loop.py (1 and 3), step_cost.py (2), compiles.py (4), whole_run.py,
whole_run_overhead.py, paired_step.py and lm_steps.py (5), accelerator.py (6);
common.py holds what they share (the modes, the machine, the configs, the trial
scheme) and report.py the targets and the markdown. This file runs them in
turn and saves what they measured after each.

``--quick`` is for development (fewer and shorter trials; the figures are
noisier); ``--tiny`` only checks that everything runs (tests/
test_benchmark_harness.py). Results go to ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import jax

from benchmarks.accelerator import measure_accelerator
from benchmarks.common import (MODES, RESULTS, Mode, cpu_seconds, describe_machine,
                               load_average, load_config, loop_config, tiny_config)
from benchmarks.compiles import CompileLog, compiles_per_kind, measure_compiles
from benchmarks.loop import measure_loop, resident
from benchmarks.report import markdown, targets
from benchmarks.step_cost import measure_steps
from benchmarks.whole_run import measure_whole_run
from benchmarks.whole_run_overhead import measure_overhead
from motivation_jax import train


def measure_model(label: str, config, mode: Mode, workdir: str) -> dict[str, Any]:
  start = time.perf_counter()
  out: dict[str, Any] = {"model": {k: (dict(v) if hasattr(v, "items") else v)
                                   for k, v in config.model.items()},
                         "dataset": config.dataset, "batch_size": config.batch_size,
                         "optimizer": config.optimizer}
  out["compiles"] = measure_compiles(config, mode, os.path.join(workdir, "compiles"))
  # The loop's run: enough batches for mode.loop_seconds at the motivated step's pace.
  probe = loop_config(config, 1)
  with CompileLog() as log:
    run, state0 = train.setup(probe, os.path.join(workdir, "probe"))
  out["setup_compiles_per_kind"] = compiles_per_kind(log.compiles())
  step_out = measure_steps(run, state0, mode)
  out["step_cost"] = step_out
  run.close()
  per_batch = (step_out["base"]["nested_us"] + step_out["motivated"]["nested_us"]) / 2e6
  # At least two epochs, so that a trial is more than its start and end.
  batches = max(2 * run.train_data.steps_per_epoch,
                int(mode.loop_seconds / per_batch)) if mode.loop_seconds else 20
  with CompileLog() as log:
    run, state0 = train.setup(loop_config(config, batches), os.path.join(workdir, "loop"))
    out["loop"] = measure_loop(resident(run), state0, mode)
  run.close()
  # After setup, no step kind compiles again however often the loop switches.
  out["loop"]["compiles_per_kind"] = compiles_per_kind(log.compiles())
  if label == mode.models[-1]:
    out["whole_run"] = measure_whole_run(config, mode, os.path.join(workdir, "whole"))
    out["overhead"] = measure_overhead(config, mode, os.path.join(workdir, "overhead"))
  out["seconds"] = time.perf_counter() - start
  return out



def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/default.py",
                      help="the realistic step's config, PATH[:variant]")
  parser.add_argument("--quick", action="store_true", help="fewer, shorter trials")
  parser.add_argument("--tiny", action="store_true", help="only check that it all runs")
  item6 = parser.add_mutually_exclusive_group()
  item6.add_argument("--accelerator", action="store_true",
                     help="measure item 6 even on a CPU (always on an accelerator)")
  item6.add_argument("--accelerator-only", action="store_true",
                     help="measure item 6 alone (the first figures a lent GPU owes)")
  item6.add_argument("--skip-accelerator", action="store_true",
                     help="leave item 6 out, on an accelerator too")
  parser.add_argument("--out", default=None, help="writes OUT.json and OUT.md "
                      "(default: benchmarks/results/harness_BACKEND)")
  parser.add_argument("--lm-config", default="configs/lm_shakespeare.py",
                      help="the language-model steps' config, PATH[:variant] "
                           "(--tiny: its :smoke variant, unless one is named)")
  parser.add_argument("--note", default="", help="a sentence added to the markdown")
  args = parser.parse_args(argv)
  mode = MODES["tiny" if args.tiny else "quick" if args.quick else "full"]
  args.out = args.out or os.path.join(
      RESULTS, f"harness_{jax.default_backend()}" + ("_steps" if args.accelerator_only else ""))
  start, load_before, cpu_before = time.perf_counter(), load_average(), cpu_seconds()
  config = load_config(args.config)
  configs = {"tiny": tiny_config(config), "realistic": config}
  results: dict[str, Any] = {
      "command": " ".join(["python -m benchmarks.run",
                           *(argv if argv is not None else sys.argv[1:])]),
      "mode": mode.name, "machine": describe_machine(), "load_before": load_before,
      "models": {}}
  results["note"] = args.note
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

  def save(complete: bool = False) -> str:
    """Writes OUT.json and OUT.md with what is measured so far (a run cut short
    by a time limit keeps it; ``complete`` is False in them until the end)."""
    results["complete"] = complete
    results["targets"] = targets(results)
    results["load_after"] = load_average()
    results["seconds"] = time.perf_counter() - start
    cpu_after = cpu_seconds()
    if cpu_before and cpu_after:
      others = (cpu_after[0] - cpu_before[0]) - (cpu_after[1] - cpu_before[1])
      results["other_processes_cores"] = max(0.0, others / results["seconds"])
    with open(args.out + ".json", "w") as f:
      json.dump(results, f, indent=2)
    text = markdown(results)
    with open(args.out + ".md", "w") as f:
      f.write(text)
    return text

  with tempfile.TemporaryDirectory() as workdir:
    for label in () if args.accelerator_only else mode.models:
      results["models"][label] = measure_model(label, configs[label], mode,
                                               os.path.join(workdir, label))
      results["models"][label]["loop_lag"] = configs[label].motivation.decision_lag
      print(f"{label}: {time.perf_counter() - start:.0f} s", flush=True)
      save()
    if not args.accelerator_only:
      from benchmarks import paired_step
      paired_trials = dict(trials=15 if mode.name == "full" else mode.trials,
                           steps_per_trial=5 if mode.name == "tiny" else 200)
      results["paired"] = paired_step.measure(**paired_trials)  # its own script's, in full
      results["paired_blocks"] = paired_step.measure(**paired_trials, state_layout="blocks",
                                                     motivated=True)
      print(f"paired: {time.perf_counter() - start:.0f} s", flush=True)
      save()
      from benchmarks import lm_steps
      spec = args.lm_config
      if mode.name == "tiny" and ":" not in spec:
        spec += ":smoke"
      results["lm_steps"] = lm_steps.measure(
          load_config(spec), trials=max(mode.trials, 3) if mode.name != "tiny" else 1,
          step_seconds=0.5 if mode.name == "full" else mode.step_seconds)
      results["lm_steps"]["config_file"] = spec
      print(f"lm steps: {time.perf_counter() - start:.0f} s", flush=True)
      save()
    on_accelerator = args.accelerator or jax.default_backend() != "cpu"
    if args.accelerator_only or (on_accelerator and not args.skip_accelerator):
      rows = results["accelerator"] = []

      def on_rows():
        print(f"accelerator, {rows[-1]['model']} {rows[-1]['dtype']}: "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        save()

      measure_accelerator(mode, os.path.join(workdir, "accelerator"),
                          variant="smoke" if mode.name == "tiny" else None,
                          rows=rows, on_rows=on_rows)
  print(save(complete=True))
  return results


if __name__ == "__main__":
  main()
