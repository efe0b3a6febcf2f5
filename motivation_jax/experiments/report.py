"""The report of a suite: report.json (every number), report.md (verdicts
first, then tables) and plots, from the run records of ``suite.load_run``.

Every interval has the seed as the unit (``stats``); two arms are compared on
the seeds both ran. A statistic that needs an arm the suite did not run is
left out, and report.md says which arm it needs.

What is compared is the task's held-out score (``metric_of``): test accuracy
for classification (higher is better), held-out bits per byte for a language
model (lower is better; its per-token accuracy stays in each run's summary).
Differences are always ``arm - reference`` in the metric's own unit; a verdict
("helped", "hurt") reads the metric's direction.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from motivation_jax.experiments import stats
from motivation_jax.experiments.suite import ARMS

MODELS = ("base", "motivated")
SIGNAL_WINDOW = 10  # base batches averaged on each side of a fired batch
SIGNAL_SPAN = 50  # matched batches are drawn within this many batches of it
COLORS = dict(zip(ARMS, ("tab:gray", "tab:red", "tab:blue", "tab:orange", "tab:green",
                         "tab:purple", "tab:brown")))


def _by_arm(records: Sequence[Mapping]) -> dict[str, dict[int, Mapping]]:
  """``{arm: {seed: record}}``, arms in suite order."""
  out = {arm: {} for arm in ARMS}
  for r in records:
    out[r["arm"]][int(r["seed"])] = r
  return {arm: dict(sorted(runs.items())) for arm, runs in out.items() if runs}


@dataclasses.dataclass(frozen=True)
class Metric:
  """The held-out number a suite compares: ``{model}/{key}`` of each summary
  (and of each evaluation in metrics.jsonl, for the plots over training)."""
  key: str  # "test_accuracy"
  name: str  # "test accuracy", in sentences and headings
  higher_is_better: bool
  slug: str  # in the plots' file names

  def of(self, summary: Mapping, model: str) -> float:
    return float(summary[f"{model}/{self.key}"])


ACCURACY = Metric("test_accuracy", "test accuracy", True, "accuracy")
BITS_PER_BYTE = Metric("test_bits_per_byte", "held-out bits per byte", False, "bits_per_byte")


def metric_of(records: Sequence[Mapping]) -> Metric:
  """Bits per byte for a suite of language-model runs, test accuracy otherwise.
  Every run of one suite has one config, so one task; a mix is refused."""
  tasks = {r["summary"].get("task", "classification") for r in records}
  if len(tasks) > 1:
    raise ValueError(f"a suite's runs must share one task; these have {sorted(tasks)}")
  return BITS_PER_BYTE if tasks == {"causal_lm"} else ACCURACY


def _scores(runs: Mapping[int, Mapping], model: str, metric: Metric) -> dict[int, float]:
  return {s: metric.of(r["summary"], model) for s, r in runs.items()}


def _trained_in(summary: Mapping, model: str) -> bool:
  if model == "motivated":
    return summary["motivated_steps"] > 0
  # Under "both" and "joint" every motivated batch trains the base too.
  return summary["base_steps"] > 0 or (
      summary.get("policy") in ("both", "joint") and summary["motivated_steps"] > 0)


def _trained(runs: Mapping[int, Mapping], model: str) -> bool:
  """Whether the arm trained ``model`` as a model of its own: not the motivated
  model of base_alone (never trained: its initial weights), nor the base of
  large_alone or large_matched (trained only as part of the large network,
  never on its own output; a base view of it scores near chance). Neither is
  plotted. joint trains both on every batch."""
  return any(_trained_in(r["summary"], model) for r in runs.values())


def _mean(runs: Mapping[int, Mapping], fn) -> float:
  return float(np.mean([fn(r["summary"]) for r in runs.values()]))


def _comparisons() -> list[tuple[str, str, tuple[str, ...]]]:
  """(arm, reference, models) of every paired comparison the report makes."""
  # Not large_alone nor large_matched: their base never trains on its own.
  out = [(a, "base_alone", ("base",)) for a in ARMS
         if a not in ("base_alone", "large_alone", "large_matched")]
  # Not base_alone: its motivated model never trains.
  out += [(a, "large_alone", ("motivated",)) for a in ARMS
          if a not in ("large_alone", "base_alone")]
  out += [("motivated", r, MODELS) for r in ("random_times", "random_rate")]
  # The two baselines a user would choose instead: the same compute on the
  # large model alone, and MatFormer's joint training of both.
  out += [("motivated", "large_matched", ("motivated",)), ("motivated", "joint", MODELS)]
  return out


def _paired(a: Mapping[int, float], b: Mapping[int, float], confidence: float,
            metric: Metric) -> dict:
  d = stats.paired_difference(a, b, confidence)
  return {**d, "verdict": stats.verdict(d, higher_is_better=metric.higher_is_better)}


def build_report(records: Sequence[Mapping], meta: Mapping[str, Any], *,
                 confidence: float = 0.95, signal_window: int = SIGNAL_WINDOW,
                 signal_span: int = SIGNAL_SPAN) -> dict[str, Any]:
  """The report as a JSON-ready dict: ``meta``, ``metric`` (what ``scores``
  and ``paired`` measure), ``arms``, ``seeds``, ``scores``, ``paired``,
  ``not_measured``, ``cost``, ``compilation``, ``signal``, ``claims``."""
  runs = _by_arm(records)
  arms = list(runs)
  metric = metric_of(records)
  report: dict[str, Any] = {
      "meta": dict(meta), "confidence": confidence, "metric": dataclasses.asdict(metric),
      "arms": arms, "seeds": {a: list(runs[a]) for a in arms},
      "scores": {a: {m: stats.mean_ci(list(_scores(runs[a], m, metric).values()), confidence)
                     for m in MODELS} for a in arms},
      "paired": {}, "not_measured": [],
      "trained": {a: [m for m in MODELS if _trained(runs[a], m)] for a in arms},
  }
  # paired["motivated - base_alone"]["base"]: the base model's score, same seed.
  for arm, ref, models in _comparisons():
    if arm in runs and ref in runs:
      report["paired"][f"{arm} - {ref}"] = {
          m: _paired(_scores(runs[arm], m, metric), _scores(runs[ref], m, metric),
                     confidence, metric)
          for m in models}
    elif arm in runs or arm == "motivated":
      needs = " and ".join(a for a in (arm, ref) if a not in runs)
      report["not_measured"].append(f"{arm} - {ref}: needs the {needs} arm")

  large_flops = (_mean(runs["large_alone"], lambda s: s["training_flops"])
                 if "large_alone" in runs else None)
  report["cost"] = {}
  for a in arms:
    flops = _mean(runs[a], lambda s: s["training_flops"])
    report["cost"][a] = {
        "n": len(runs[a]), "training_flops": flops,
        "flops_ratio_to_large_alone": flops / large_flops if large_flops else None,
        "wall_time_s": _mean(runs[a], lambda s: s["wall_time_s"]),
        "motivated_fraction": _mean(runs[a], lambda s: s["motivated_steps"]
                                    / max(s["base_steps"] + s["motivated_steps"], 1)),
        "activations": _mean(runs[a], lambda s: s["activations"]),
        # A resumed run's wall time is that of its last process only.
        "resumed_runs": sum(bool(r["summary"].get("resumed_from_step")) for r in runs[a].values()),
        "batches": _mean(runs[a], lambda s: s["base_steps"] + s["motivated_steps"]),
        # What a motivated batch trained (steps.make_train_steps' policy).
        "policy": "/".join(sorted({r["summary"].get("policy", "switch")
                                   for r in runs[a].values()})),
    }

  report["compilation"] = _compilation(records)

  signal = {"window": signal_window, "span": signal_span, "phase_steps": meta["phase_steps"],
            "arms": {}}
  per_seed = {}
  for a in ("motivated", "random_times", "random_rate"):
    if a in runs:
      per_seed[a] = {s: stats.signal_analysis(r["decisions"], window=signal_window,
                                              phase_steps=meta["phase_steps"],
                                              rng_seed=s, span=signal_span)
                     for s, r in runs[a].items()}
      signal["arms"][a] = stats.signal_over_seeds(per_seed[a], confidence)
  if "motivated" in per_seed and "random_times" in per_seed:
    # The phase itself acts on the drop in both arms; what remains is the choice of batches.
    values = {a: {s: r["difference"] for s, r in per_seed[a].items()
                  if r["difference"] is not None} for a in ("motivated", "random_times")}
    d = stats.paired_difference(values["motivated"], values["random_times"], confidence)
    signal["motivated - random_times"] = {**d, "verdict": stats.verdict(
        d, words=stats.SIGNAL_VERDICTS)}
  report["signal"] = signal
  report["claims"] = _claims(report)
  return report


def _compilation(records: Sequence[Mapping]) -> dict[str, Any]:
  """The suite's programs compiled and read from the compilation cache, and
  their seconds, summed over its runs (``summary.json``'s ``compilation``;
  docs/compilation.md). ``runs_not_counted``: runs whose summary has no count
  (written before the count existed)."""
  counted = [r["summary"]["compilation"] for r in records if "compilation" in r["summary"]]
  out = {k: sum(c[k] for c in counted) for k in
         ("compiled", "from_cache", "compile_s", "cache_read_s", "trace_and_lower_s")}
  out.update(runs=len(counted), runs_not_counted=len(records) - len(counted),
             runs_compiling_nothing=sum(c["compiled"] == 0 for c in counted),
             cache_dirs=sorted({c["cache_dir"] or "" for c in counted}))
  return out


def _claim(id_: str, question: str, needs: Sequence[str], report: Mapping, make) -> dict:
  """A claim; ``make()`` gives (statement, difference, verdict, numbers) when
  every arm it ``needs`` ran."""
  missing = [a for a in needs if a not in report["arms"]]
  out = {"id": id_, "question": question, "needs": list(needs)}
  if missing:
    return {**out, "statement": f"Not measured: needs the {' and '.join(missing)} arm.",
            "difference": None, "verdict": None, "numbers": {}}
  statement, difference, verdict, numbers = make()
  return {**out, "statement": statement, "difference": difference, "verdict": verdict,
          "numbers": numbers}


def _claims(report: Mapping) -> list[dict]:
  acc, paired, cost, signal = (report[k] for k in ("scores", "paired", "cost", "signal"))
  name = report["metric"]["name"]

  def helped_base():
    d = paired["motivated - base_alone"]["base"]
    return (f"With motivation the base model's {name} changed by {fmt_diff(d)} "
            f"against the same base trained alone ({_seeds(d)}): {d['verdict']}.",
            d, d["verdict"], {m: acc[m]["base"]["mean"] for m in ("motivated", "base_alone")})

  def as_good_as_large():
    d = paired["motivated - large_alone"]["motivated"]
    ratio = cost["motivated"]["flops_ratio_to_large_alone"]
    plain = {"helped": "better", "hurt": "worse"}.get(d["verdict"], d["verdict"])
    return (f"The motivated model's {name} differs from the large model trained alone "
            f"on every batch by {fmt_diff(d)} ({_seeds(d)}): {plain}; its training took "
            f"{ratio:.1%} of the large model's FLOPs.",
            d, d["verdict"], {"motivated": acc["motivated"]["motivated"]["mean"],
                              "large_alone": acc["large_alone"]["motivated"]["mean"],
                              "flops_ratio_to_large_alone": ratio})

  def when(model):
    def make():
      d = paired["motivated - random_times"][model]
      return (f"Training the motivated model on the condition's batches instead of as many "
              f"random batches changed the {model} model's {name} by {fmt_diff(d)} "
              f"({_seeds(d)}): {d['verdict']}.",
              d, d["verdict"], {a: acc[a][model]["mean"] for a in ("motivated", "random_times")})
    return make

  def as_good_as_matched():
    d = paired["motivated - large_matched"]["motivated"]
    plain = {"helped": "better", "hurt": "worse"}.get(d["verdict"], d["verdict"])
    c, m = cost["large_matched"], cost["motivated"]
    return (f"With the same training FLOPs the motivated model's {name} differs from the "
            f"large model trained alone (on {c['batches']:.0f} batches, "
            f"{c['training_flops'] / m['training_flops']:.1%} of the motivated arm's FLOPs) "
            f"by {fmt_diff(d)} ({_seeds(d)}): {plain}.",
            d, d["verdict"], {"motivated": acc["motivated"]["motivated"]["mean"],
                              "large_matched": acc["large_matched"]["motivated"]["mean"],
                              "large_matched_batches": c["batches"]})

  def against_joint(model):
    def make():
      d = paired["motivated - joint"][model]
      plain = {"helped": "better", "hurt": "worse"}.get(d["verdict"], d["verdict"])
      ratio = cost["motivated"]["training_flops"] / cost["joint"]["training_flops"]
      return (f"The {model} model's {name} with motivation differs from the same model "
              f"trained jointly (both sub-networks on every batch, one update of the summed "
              f"losses) by {fmt_diff(d)} ({_seeds(d)}): {plain}; the motivated arm took "
              f"{ratio:.1%} of the joint arm's training FLOPs.",
              d, d["verdict"], {"motivated": acc["motivated"][model]["mean"],
                                "joint": acc["joint"][model]["mean"],
                                "flops_ratio_to_joint": ratio})
    return make

  def signal_claim():
    s = signal["arms"]["motivated"]
    if s["n"] == 0:
      return ("No fired batch of the motivated arm had enough base batches on both sides "
              "to be measured.", None, s["verdict"], {})
    numbers = {"fired": float(np.mean([r["fired"] for r in s["per_seed"].values()]))}
    if "random_times" in signal["arms"]:
      numbers["random_times_difference"] = signal["arms"]["random_times"]["mean"]
    return (f"Over the {signal['window']} base batches after a fired batch's phase, the base's "
            f"training loss fell by {fmt_diff(s)} more than after nearby batches where the "
            f"condition did not fire ({_seeds(s)}): {s['verdict']}.",
            {k: s[k] for k in ("n", "mean", "sd", "low", "high", "confidence", "seeds")},
            s["verdict"], numbers)

  return [
      _claim("motivation_helped_base", "Did motivation help the base model?",
             ("motivated", "base_alone"), report, helped_base),
      _claim("motivated_as_good_as_large",
             "Is the motivated model as good as the large model trained alone, and at what cost?",
             ("motivated", "large_alone"), report, as_good_as_large),
      _claim("motivated_as_good_as_large_matched",
             "With the same compute, would the large model alone be better?",
             ("motivated", "large_matched"), report, as_good_as_matched),
      _claim("base_against_joint",
             "Is the base model better with motivation than trained jointly (MatFormer)?",
             ("motivated", "joint"), report, against_joint("base")),
      _claim("motivated_against_joint",
             "Is the motivated model better with motivation than trained jointly (MatFormer)?",
             ("motivated", "joint"), report, against_joint("motivated")),
      _claim("when_matters_base", "Does it matter when the motivated model trains (base model)?",
             ("motivated", "random_times"), report, when("base")),
      _claim("when_matters_motivated",
             "Does it matter when the motivated model trains (motivated model)?",
             ("motivated", "random_times"), report, when("motivated")),
      _claim("condition_picks_drops",
             "Does the condition pick moments followed by bigger drops of the training loss?",
             ("motivated",), report, signal_claim),
  ]


# Formatting.

def _signed(x: float) -> str:
  return f"{x:+.4f}".replace("-", "\u2212")


def fmt_diff(d: Mapping) -> str:
  """'+0.0031 [−0.0010, +0.0072]'; '+0.0031 (no interval)' for one seed."""
  if d["mean"] is None:
    return "not measured"
  if d["low"] is None:
    return f"{_signed(d['mean'])} (no interval)"
  return f"{_signed(d['mean'])} [{_signed(d['low'])}, {_signed(d['high'])}]"


def fmt_acc(d: Mapping) -> str:
  """'0.9812 ± 0.0020' (the interval's half-width)."""
  if d["high"] is None:
    return f"{d['mean']:.4f} (one seed)"
  return f"{d['mean']:.4f} ± {d['high'] - d['mean']:.4f}"


def fmt_flops(x: float) -> str:
  """'1.23e12'."""
  mantissa, exponent = f"{x:.2e}".split("e")
  return f"{mantissa}e{int(exponent)}"


def _seeds(d: Mapping) -> str:
  return f"{d['n']} seed{'s' if d['n'] != 1 else ''}"


# Plots: each a Figure drawn on its own Agg canvas (no pyplot global state).

def _save(fig: Figure, path: str) -> str:
  FigureCanvasAgg(fig)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def plot_over_training(runs: Mapping, path: str, metric: Metric = ACCURACY) -> str | None:
  """The held-out score of both models against the batch, per arm that trained the
  model: thin lines per seed, a thick line for the mean over seeds at the
  batches all seeds evaluated. The bottom row zooms into the second half of
  training, where the arms differ by a point or less."""
  if not any(r["evals"] for a in runs for r in runs[a].values()):
    return None
  fig = Figure(figsize=(11, 7))
  for column, model in enumerate(MODELS):
    key = f"{model}/{metric.key}"
    full, zoom = fig.add_subplot(2, 2, column + 1), fig.add_subplot(2, 2, column + 3)
    last, late = 0, []
    for arm, by_seed in runs.items():
      if not _trained(by_seed, model):
        continue
      curves = [{e["step"]: e[key] for e in r["evals"] if key in e} for r in by_seed.values()]
      last = max([last] + [s for c in curves for s in c])
      common = sorted(set.intersection(*(set(c) for c in curves)))
      for ax in (full, zoom):  # markers: a run evaluated once is a point, not a line
        for c in curves:
          ax.plot(list(c), list(c.values()), ".-", color=COLORS[arm], lw=0.6, ms=3,
                  alpha=0.35)
        if common:
          ax.plot(common, [np.mean([c[s] for c in curves]) for s in common], "o-",
                  color=COLORS[arm], lw=2, ms=4, label=arm)
      late += [(s, v) for c in curves for s, v in c.items()]
    full.set(title=f"{model} model", ylabel=metric.name)
    zoom.set(title=f"{model} model, second half (zoomed)", xlabel="batch",
             ylabel=metric.name)
    late = [v for s, v in late if s >= last / 2]
    if late:
      low, high = min(late), max(late)
      pad = max(high - low, 1e-3) * 0.1
      zoom.set_xlim(last / 2, last * 1.01)
      zoom.set_ylim(low - pad, high + pad)
    for ax in (full, zoom):
      ax.grid(alpha=0.3)
      if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
  return _save(fig, path)


def plot_activation_timeline(runs: Mapping, path: str, metric: Metric = ACCURACY
                             ) -> str | None:
  """Per-batch training loss of the lowest seed of the ``motivated`` arm,
  base and motivated batches apart, with a rug at the motivated batches."""
  del metric  # the training loss, whatever the task
  if "motivated" not in runs:
    return None
  seed, record = next(iter(runs["motivated"].items()))
  fig = Figure(figsize=(11, 4))
  ax = fig.add_subplot(1, 1, 1)
  for kind, color in (("base", "tab:gray"), ("motivated", "tab:red")):
    d = [(x["step"], x["loss"]) for x in record["decisions"] if x["kind"] == kind]
    ax.plot([s for s, _ in d], [l for _, l in d], ".", ms=2, color=color,
            label=f"{kind} batches ({len(d)})")
  motivated = [x["step"] for x in record["decisions"] if x["kind"] == "motivated"]
  ax.vlines(motivated, 0, 0.04, transform=ax.get_xaxis_transform(), color="tab:red", lw=0.5)
  ax.set(title=f"motivated arm, seed {seed}: training loss per batch", xlabel="batch",
         ylabel="training loss (of the network that trained)")
  ax.legend(fontsize=8, markerscale=4)
  return _save(fig, path)


def plot_vs_flops(runs: Mapping, path: str, metric: Metric = ACCURACY) -> str | None:
  """The final held-out score against training FLOPs: a point per run and model."""
  if not runs:
    return None
  fig = Figure(figsize=(7, 5))
  ax = fig.add_subplot(1, 1, 1)
  markers = {"base": "o", "motivated": "^"}
  for arm, by_seed in runs.items():
    for r in by_seed.values():
      for model in MODELS:
        if not _trained(by_seed, model):
          continue
        ax.plot(r["summary"]["training_flops"], metric.of(r["summary"], model),
                markers[model], color=COLORS[arm], alpha=0.8)
  if all(r["summary"]["training_flops"] > 0 for a in runs for r in runs[a].values()):
    ax.set_xscale("log")
  handles = [Line2D([], [], ls="", marker="s", color=COLORS[a], label=a) for a in runs]
  handles += [Line2D([], [], ls="", marker=markers[m], color="k", label=f"{m} model")
              for m in MODELS]
  ax.legend(handles=handles, fontsize=8)
  ax.set(xlabel="training FLOPs", ylabel=f"final {metric.name}",
         title=f"{metric.name} against cost")
  ax.grid(alpha=0.3)
  return _save(fig, path)


# (file name, title, plot); {slug} and {name} are the metric's.
PLOTS = (("{slug}_over_training.png", "{Name} over training", plot_over_training),
         ("activation_timeline.png", "When the motivated model trained", plot_activation_timeline),
         ("{slug}_vs_flops.png", "{Name} against training FLOPs", plot_vs_flops))


def _markdown(report: Mapping, plots: Sequence[tuple[str, str]]) -> str:
  meta, pct = report["meta"], f"{report['confidence']:.0%}"
  lines = [
      "# Motivated training: suite report", "",
      f"- command: `{meta['command']}`",
      f"- config: `{meta['config']}`" + "".join(f" `{o}`" for o in meta.get("overrides", [])),
      f"- machine: {meta['machine']}",
      f"- seeds: {', '.join(map(str, meta['seeds']))}; arms: {', '.join(report['arms'])}", "",
      f"Intervals are {pct} Student-t intervals with the seed as the unit; two arms are "
      "compared seed by seed, on the seeds both ran. \"no difference detectable\" means the "
      "interval contains 0, not that the two are equal.", "",
      "## Verdicts", "",
  ]
  for i, c in enumerate(report["claims"], 1):
    lines.append(f"{i}. **{c['question']}** {c['statement']}")

  name = report["metric"]["name"]
  better = "higher" if report["metric"]["higher_is_better"] else "lower"
  lines += ["", f"## {name[0].upper() + name[1:]} (mean ± half-width of the {pct} interval; "
            f"{better} is better)", "",
            "| arm | seeds | base model | motivated model |", "|---|---|---|---|"]
  for a, acc in report["scores"].items():
    trained = report["trained"][a]
    motivated = fmt_acc(acc["motivated"]) if "motivated" in trained else "never trained"
    base = (fmt_acc(acc["base"]) if "base" in trained
            else f"({fmt_acc(acc['base'])}: never trained on its own)")
    lines.append(f"| {a} | {acc['base']['n']} | {base} | {motivated} |")

  lines += ["", f"## Paired differences of {name} (same seed)", "",
            f"| comparison | model | seeds | difference [{pct} interval] | verdict |",
            "|---|---|---|---|---|"]
  for name, by_model in report["paired"].items():
    for model, d in by_model.items():
      lines.append(f"| {name} | {model} | {d['n']} | {fmt_diff(d)} | {d['verdict']} |")
  if report["not_measured"]:
    lines += ["", "Not measured:"] + [f"- {n}" for n in report["not_measured"]]

  lines += ["", "## Cost (mean over seeds)", "",
            "| arm | policy | batches | training FLOPs | / large_alone | wall time (s) "
            "| motivated fraction | activations |", "|---|---|---|---|---|---|---|---|"]
  for a, c in report["cost"].items():
    ratio = c["flops_ratio_to_large_alone"]
    ratio = "" if ratio is None else f"{ratio:.1%}"
    lines.append(f"| {a} | {c['policy']} | {c['batches']:.0f} "
                 f"| {fmt_flops(c['training_flops'])} | {ratio} "
                 f"| {c['wall_time_s']:.1f} | {c['motivated_fraction']:.3f} "
                 f"| {c['activations']:.1f} |")
  if "large_alone" not in report["cost"]:
    lines.append("\nThe ratio to the large model's FLOPs needs the large_alone arm.")
  lines.append("\nPolicy: what a motivated batch trained. `switch`: the motivated model; "
               "`both`: a base update, then a motivated update; `joint` (MatFormer's recipe): "
               "both sub-networks, one update of their summed losses.")
  resumed = sum(c["resumed_runs"] for c in report["cost"].values())
  if resumed:
    lines.append(f"\n{resumed} run(s) were resumed: their wall time is that of the last "
                 "process only.")

  c = report.get("compilation")
  if c and c["runs"]:
    lines += ["", "## Compilation", "",
              f"Over {c['runs']} runs: {c['compiled']} programs compiled "
              f"({c['compile_s']:.1f} s of XLA), {c['from_cache']} read from the compilation "
              f"cache ({c['cache_read_s']:.1f} s); {c['runs_compiling_nothing']} runs compiled "
              f"nothing; tracing and lowering took {c['trace_and_lower_s']:.1f} s. Cache: "
              + (", ".join(f"`{d}`" for d in c["cache_dirs"] if d) or "none")
              + " (docs/compilation.md). A reused run counts what it compiled when it ran; "
              "a resumed one, its last process."]
    if c["runs_not_counted"]:
      lines.append(f"\n{c['runs_not_counted']} run(s) predate the count and are not in it.")

  s = report["signal"]
  lines += ["", "## Does the signal matter?", "",
            f"Drop = mean training loss of the {s['window']} base batches before a batch minus "
            f"that of the {s['window']} base batches after the phase it starts "
            f"({s['phase_steps']} batch{'es' if s['phase_steps'] != 1 else ''}); fired batches against one batch drawn within "
            f"±{s['span']} batches where the condition did not fire. The phase itself also "
            "acts on the drop: the random_times arm shows the drop after phases at random "
            "batches (docstring of `stats.signal_analysis`).", "",
            f"| arm | seeds | fired batches (mean) | difference of drops [{pct} interval] "
            "| verdict |", "|---|---|---|---|---|"]
  for a, r in s["arms"].items():
    fired = np.mean([p["fired"] for p in r["per_seed"].values()])
    lines.append(f"| {a} | {r['n']} | {fired:.1f} | {fmt_diff(r)} | {r['verdict']} |")
  if not s["arms"]:
    lines.append("\nNot measured: needs the motivated arm.")
  if "motivated - random_times" in s:
    d = s["motivated - random_times"]
    lines.append(f"\nmotivated - random_times, same seed (what choosing the batches adds to "
                 f"the phase's own effect): {fmt_diff(d)} ({_seeds(d)}): {d['verdict']}.")

  if plots:
    lines += ["", "## Plots", ""] + [f"![{title}]({name})\n" for name, title in plots]
  return "\n".join(lines) + "\n"


def write_report(report: Mapping, records: Sequence[Mapping], out_dir: str) -> list[str]:
  """Writes report.md, report.json and the plots whose arms ran into
  ``out_dir``; gives their paths."""
  os.makedirs(out_dir, exist_ok=True)
  runs, metric = _by_arm(records), Metric(**report["metric"])
  words = {"slug": metric.slug, "Name": metric.name[0].upper() + metric.name[1:]}
  plots, paths = [], []
  for name, title, plot in PLOTS:
    name, title = name.format(**words), title.format(**words)
    if plot(runs, os.path.join(out_dir, name), metric):
      plots.append((name, title))
      paths.append(os.path.join(out_dir, name))
  md, js = os.path.join(out_dir, "report.md"), os.path.join(out_dir, "report.json")
  with open(md, "w") as f:
    f.write(_markdown(report, plots))
  with open(js, "w") as f:
    json.dump(report, f, indent=2)
  return [md, js] + paths
