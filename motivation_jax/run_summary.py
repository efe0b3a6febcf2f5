"""A finished run's summary: what it gave (both test accuracies) and what it
cost, as the dict ``train_and_evaluate`` returns and writes to
workdir/summary.json, and as the table the command prints.
"""

from __future__ import annotations

from typing import Any

import jax

from motivation_jax import compilation, lm, tasks
from motivation_jax.common import format_flops
from motivation_jax.run_setup import Run


def summarize(run: Run, eval_metrics: dict[str, float], wall_time_s: float) -> dict[str, Any]:
  """What the run gave (both test accuracies) and what it cost."""
  counts, flops = run.controller.counts, run.flops
  # Under policies "both" and "joint" the compiled motivated step includes a
  # base step (joint: the base's forward and backward, one update of the sum).
  # A kind the run never picks was not compiled (its FLOPs None): what needs
  # its count is None too, what multiplies it by zero batches is not.
  if flops["motivated"] is None or (flops["base"] is None
                                    and run.config.motivation.policy in ("both", "joint")):
    motivated_only_flops = None
  else:
    motivated_only_flops = flops["motivated"] - (
        flops["base"] if run.config.motivation.policy in ("both", "joint") else 0.0)
  total = counts["base"] + counts["motivated"]
  return {
      "dataset": run.dataset.name,
      "train_examples": len(run.dataset.train),
      "test_examples": len(run.dataset.test),
      "base/test_accuracy": eval_metrics["base/test_accuracy"],
      "motivated/test_accuracy": eval_metrics["motivated/test_accuracy"],
      "base_steps": counts["base"],
      "motivated_steps": counts["motivated"],
      # What a motivated batch trained: the motivated model ("switch"), the base
      # then it ("both"), or both at once, one update ("joint").
      "policy": run.config.motivation.policy,
      "activations": run.controller.activations,
      # Batches whose update was not applied (a non-finite loss or gradient).
      "nonfinite_steps": run.controller.missing_losses,
      "params": {"base": run.wmap.num_params("base"),
                 "motivated": run.wmap.num_params("motivated")},
      "flops_per_step": flops,
      "training_flops": float(sum(counts[k] * flops[k] for k in flops if counts[k])),
      # What training the motivated (large) model alone on every batch costs
      # (None: the run did not compile a step it needs, Controller.kinds).
      "large_alone_flops": (total * motivated_only_flops if motivated_only_flops is not None
                            else None),
      "wall_time_s": wall_time_s,
      "resumed_from_step": run.first_step,
      # 0 when the test accuracies use the running averages (no batch norm, or off).
      "bn_recalibration_batches": (run.config.bn_recalibration_batches
                                   if jax.tree.leaves(run.wmap["batch_stats"]) else 0),
      # A user's own module: {"exact", "gap", "api"} (exact False: the base only
      # shares weights, models/paired.py).
      **({"nesting": run.nesting} if run.nesting else {}),
      # The same accuracies with the running averages, where they differ.
      **{k: v for k, v in eval_metrics.items() if k.endswith("test_accuracy_running_stats")},
      # A language model's held-out loss, bits per byte, perplexity, FLOPs per token, tokens/s.
      **(lm.summary_fields(run, eval_metrics) if run.task is tasks.CAUSAL_LM else {}),
  }


def format_summary(summary: dict[str, Any]) -> str:
  """The summary as a small table for the terminal."""
  flops, params = summary["flops_per_step"], summary["params"]
  if summary.get("task") == "causal_lm":  # held-out bits per byte, FLOPs per token, tokens/s
    header, rows, extra = lm.summary_table(summary)
  else:
    header = (f"{summary['dataset']}: {summary['train_examples']:,} training and "
              f"{summary['test_examples']:,} test examples")
    rows = [
        ("test accuracy", f"{summary['base/test_accuracy']:.4f}",
         f"{summary['motivated/test_accuracy']:.4f}"),
        ("parameters", f"{params['base']:,}", f"{params['motivated']:,}"),
        ("train steps", f"{summary['base_steps']:,}", f"{summary['motivated_steps']:,}"),
        ("FLOPs per step", *(format_flops(flops[k]) for k in ("base", "motivated"))),
    ]
    extra = []
  rows = [("", "base", "motivated"), *rows]
  width = max(len(r[0]) for r in rows)
  lines = [header] + [f"{a:<{width}}  {b:>14}  {c:>14}" for a, b, c in rows]
  large = summary["large_alone_flops"]
  lines += [
      f"activations of the motivated model: {summary['activations']:,}",
      f"training FLOPs: {summary['training_flops']:.3e}" + (
          f" = {summary['training_flops'] / large:.1%} of training the motivated model "
          f"alone on every batch ({large:.3e})" if large is not None else
          f" (against the motivated model alone: not known, this run's condition never "
          f"picks its {' or '.join(k for k, v in flops.items() if v is None)} step, which "
          "it did not compile)"),
      *extra,
      f"wall time: {summary['wall_time_s']:.1f} s",
  ]
  if summary.get("nonfinite_steps"):
    lines.insert(-1, f"batches not applied (a non-finite loss or gradient): "
                     f"{summary['nonfinite_steps']:,}")
  nested = summary.get("nesting")
  if nested and not nested["exact"]:
    lines.insert(-1, f"the base is not exactly nested (exact=False): it shares the motivated "
                     f"model's weights, its outputs differ by up to {nested['gap']:.3g}")
  if summary["resumed_from_step"]:
    lines[-1] += f" (this process, resumed at batch {summary['resumed_from_step']:,})"
  if "compilation" in summary:
    lines.append(compilation.describe(summary["compilation"]))
  return "\n".join(lines)
