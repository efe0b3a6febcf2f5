"""Evaluations of both sub-networks during and at the end of a run: every test
example counted once, with the recalibrated batch-norm statistics, and a
warning where a model diverged.
"""

from __future__ import annotations

import collections
import math
import time
from typing import Sequence

import jax
import tqdm

from motivation_jax import data, steps, tasks
from motivation_jax.common import SUBNETS
from motivation_jax.metrics import finite_json
from motivation_jax.run_setup import Run


def evaluate(eval_steps, state, eval_data: data.EvalBatches, put, threads: int,
             eval_stats: dict | None = None, *, workers: int = 0,
             task=tasks.CLASSIFICATION) -> dict[str, float]:
  """Test accuracy and loss of each sub-network, every test example (or held-out
  target token: then bits per byte and perplexity too, ``tasks``) counted once,
  with the batch-norm statistics ``eval_stats`` gives (``{"base": tree,
  "motivated": tree}``, recalibrated) or else the state's running averages.
  ``state`` in logical order (``Run.order``)."""
  _check_logical(state, "evaluate")
  variables = {subnet: state.variables(subnet) if eval_stats is None else
               {"params": state.params, "batch_stats": eval_stats[subnet]}
               for subnet in eval_steps}
  sums = {k: collections.Counter() for k in eval_steps}
  for batch in data.prefetch_to_device(eval_data.iterator(threads=threads, workers=workers),
                                       put):
    for subnet, fn in eval_steps.items():
      sums[subnet].update(jax.device_get(fn(variables[subnet], batch)))
  out = {}
  extra = ({"bytes_per_token": eval_data.bytes_per_token} if task is tasks.CAUSAL_LM else {})
  for subnet, s in sums.items():
    out.update({f"{subnet}/{k}": v for k, v in task.eval_metrics(s, **extra).items()})
  return out


# Evaluations (counted in eval_every_epochs) that also report the accuracy with
# the running averages, so that the effect of recalibration is visible; the
# last evaluation of a run does too.
COMPARED_EVALUATIONS = 3


def evaluate_run(run: Run, state: steps.TrainState, *, compare: bool = False,
                 subnets: Sequence[str] = SUBNETS) -> dict[str, float]:
  """``evaluate`` of ``subnets`` with the run's recalibrated statistics; with
  ``compare`` (and recalibration on) also with the running averages, as
  ``{subnet}/test_accuracy_running_stats`` and ``{subnet}/test_loss_running_stats``.
  ``state`` in either order (the loop's is in storage order): it reads logical order."""
  state = run.order["logical"](state)
  eval_stats = run.eval_stats(state, subnets)
  eval_steps = {s: run.eval_steps[s] for s in SUBNETS if s in subnets}
  metrics = evaluate(eval_steps, state, run.eval_data, run.put,
                     run.config.data_threads, eval_stats, workers=run.config.data_workers,
                     task=run.task)
  if compare and eval_stats is not None:
    running = evaluate(eval_steps, state, run.eval_data, run.put, run.config.data_threads,
                       workers=run.config.data_workers)
    metrics.update({f"{k}_running_stats": v for k, v in running.items()})
  return metrics


def evaluate_and_log(run: Run, state: steps.TrainState, step: int, bar: tqdm.tqdm
                     ) -> dict[str, float]:
  start = time.perf_counter()
  epoch = step // run.train_data.steps_per_epoch
  compare = (step // run.schedule.period <= COMPARED_EVALUATIONS * run.schedule.eval_every
             or step == run.total_steps)
  # Until the last evaluation, only the sub-networks that have trained: one
  # that never took an update of its own (the motivated model of a run whose
  # condition has not fired, as in the experiments' base_alone arm) is
  # evaluated, and recalibrated, once, at the end, for the summary.
  subnets = SUBNETS if step == run.total_steps else (trained_subnets(run) or SUBNETS)
  metrics = evaluate_run(run, state, compare=compare, subnets=subnets)
  run.writer.write(step, {**metrics, "epoch": epoch})
  if run.schedule.unit == "batch":  # LM runs count steps (lm.Schedule)
    epoch = step
  bar.write(f"{run.schedule.unit} {epoch}: " + ", ".join(
      f"{k} {v:.4f}" for k, v in metrics.items() if "running_stats" not in k))
  _, bad = finite_json(metrics)
  if bad:  # the training loss stayed finite (else the run stopped): the weights diverged
    bar.write(f"warning: {', '.join(bad)} not finite at {run.schedule.unit} {epoch}: that "
              "model diverged; lower config.learning_rate")
  worse = worse_than_guessing(run, metrics)
  if worse:
    bar.write(f"warning: at {run.schedule.unit} {epoch} {'; '.join(worse)}: training diverged; "
              "lower config.learning_rate")
  run.eval_time_s += time.perf_counter() - start
  return metrics


def trained_subnets(run: Run) -> list[str]:
  """The sub-networks that took at least one update of their own so far."""
  counts = run.controller.counts
  base = counts["base"] > 0 or (run.config.motivation.policy in ("both", "joint")
                                and counts["motivated"] > 0)
  return [s for s, trained in (("base", base), ("motivated", counts["motivated"] > 0))
          if trained]


def worse_than_guessing(run: Run, metrics: dict[str, float]) -> list[str]:
  """For each sub-network that trained and whose test loss is not finite, or is
  over ten times a uniform guess's (10 ln classes) while its accuracy is below
  twice chance: what it scored. A learning rate far too large gives this with
  a training loss that stays finite: the weights swing to where every
  prediction is confident and wrong (test losses of 58 to 8,705 for 10 classes
  at learning rate 100). An undertrained model is far from it: EfficientNet's
  smoke run on mock data, 100 classes, ends near 11 > 2 ln 100, so twice a
  uniform guess's would call it diverged."""
  classes = run.dataset.num_classes
  out = []
  for subnet in trained_subnets(run):
    loss = metrics.get(f"{subnet}/test_loss")
    accuracy = metrics.get(f"{subnet}/test_accuracy")
    if loss is None or accuracy is None:
      continue
    if not math.isfinite(loss) or (loss > 10 * math.log(classes) and accuracy < 2 / classes):
      out.append(f"the {subnet} model is worse than guessing (test loss {loss:.4g} > "
                 f"10 ln {classes}, test accuracy {accuracy:.4f}, chance {1 / classes:.4f})")
  return out


def _check_logical(state: steps.TrainState, reader: str) -> None:
  if getattr(state, "order", "logical") != "logical":
    raise ValueError(f"{reader} reads a state in logical order, got one in {state.order} "
                     "order; convert it with Run.order['logical'] "
                     "(steps.make_order_converters)")
