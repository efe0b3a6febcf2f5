"""Statistics of a suite, with the seed as the unit: intervals, paired
differences, verdicts, and the loss-drop analysis of the condition's signal.

Pure numpy/scipy; every result is a dict of plain Python numbers (JSON-ready).
Runs of one seed share the batches, the initial weights and the augmentation,
so two arms are compared seed by seed (paired), on the seeds both have.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats

VERDICTS = ("helped", "no difference detectable", "hurt")


def _float(x) -> float | None:
  return None if x is None else float(x)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict:
  """``{n, mean, sd, low, high, confidence}``: the mean of ``values`` and its
  Student-t interval, mean +- t_{(1+c)/2, n-1} * sd / sqrt(n), sd with n-1.
  With n < 2 there is no interval (sd, low, high are None); with n = 0 no mean."""
  x = np.asarray(values, dtype=np.float64)
  n = int(x.size)
  out = {"n": n, "mean": _float(x.mean()) if n else None, "sd": None, "low": None,
         "high": None, "confidence": confidence}
  if n >= 2:
    # Exactly 0 for equal values (the float mean need not equal them).
    sd = 0.0 if np.ptp(x) == 0 else float(x.std(ddof=1))
    half = float(scipy_stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / np.sqrt(n)
    out.update(sd=sd, low=float(out["mean"] - half), high=float(out["mean"] + half))
  return out


def paired_difference(a: Mapping[int, float], b: Mapping[int, float],
                      confidence: float = 0.95) -> dict:
  """``mean_ci`` of a[seed] - b[seed] over the seeds both have, plus ``seeds``
  and ``differences`` (in seed order)."""
  seeds = sorted(set(a) & set(b))
  differences = [float(a[s]) - float(b[s]) for s in seeds]
  return {**mean_ci(differences, confidence), "seeds": [int(s) for s in seeds],
          "differences": differences}


def verdict(interval: Mapping, *, higher_is_better: bool = True,
            words: Sequence[str] = VERDICTS) -> str:
  """``words[0]`` ("helped") when the interval lies above 0 (below, with
  ``higher_is_better=False``), ``words[2]`` ("hurt") in the opposite case,
  else ``words[1]`` ("no difference detectable"), with the reason when there
  is no interval (fewer than two seeds). A zero-variance interval is a point:
  it excludes 0 unless the mean is 0."""
  helped, none, hurt = words
  if interval["n"] == 0:
    return f"{none} (no seed measured)"
  if interval["low"] is None:
    return f"{none} (one seed: no interval)"
  if interval["low"] > 0:
    return helped if higher_is_better else hurt
  if interval["high"] < 0:
    return hurt if higher_is_better else helped
  return none


def _base_losses(decisions: Sequence[Mapping]) -> tuple[np.ndarray, np.ndarray]:
  """Batch indices and training losses of the base-kind batches, in batch order."""
  base = sorted((d["step"], d["loss"]) for d in decisions if d["kind"] == "base")
  steps = np.array([s for s, _ in base], dtype=np.int64)
  return steps, np.array([l for _, l in base], dtype=np.float64)


def loss_drop_after(decisions: Sequence[Mapping], batches: Sequence[int], *,
                    window: int, phase_steps: int) -> dict[int, float]:
  """``{t: drop}`` for each batch t of ``batches``: the mean training loss of
  the last ``window`` base-kind batches before t minus that of the first
  ``window`` base-kind batches after t + phase_steps - 1 (after the phase a
  firing at t starts). Positive: the base's loss fell. Batches with fewer than
  ``window`` base batches on either side are left out.

  Only base-kind losses count: the loss logged for a motivated batch is the
  motivated network's, another network's loss on another scale.
  """
  steps, losses = _base_losses(decisions)
  drops = {}
  for t in batches:
    before = int(np.searchsorted(steps, t, side="left"))
    after = int(np.searchsorted(steps, t + phase_steps - 1, side="right"))
    if before >= window and after + window <= len(steps):
      drops[int(t)] = float(losses[before - window:before].mean()
                            - losses[after:after + window].mean())
  return drops


def signal_analysis(decisions: Sequence[Mapping], *, window: int, phase_steps: int,
                    rng_seed: int, span: int = 50) -> dict:
  """Is the loss falling faster after the batches where the condition fired
  than after nearby batches where it was consulted and did not fire? One run.

  Fired: batches of kind "motivated" with reason "condition" (a phase starts).
  Matched: for each fired batch t, one batch drawn uniformly
  (``numpy.random.default_rng(rng_seed)``) among the batches within +-``span``
  of t where the condition was consulted and did not fire (kind "base", reason
  "condition"); none there, the fired batch is left out. Each pair where both
  drops are defined (``loss_drop_after``, the same window and the same gap of
  ``phase_steps`` on both) gives drop(fired) - drop(matched); ``difference`` is
  their mean, None when no pair is measured.

  What this measures, and what it does not:
  - the after-window of a fired batch follows a motivated phase, that of a
    matched batch does not: the difference mixes what the condition picks
    with what the phase does to the shared weights. The same analysis of the
    ``random_times`` arm (phases at random batches) estimates the phase alone;
  - the condition selects on the loss itself: it fires after a run of falling
    losses, which noise alone produces too. The before-window of a fired batch
    is such a run, those of matched batches are not; a fall by noise does not
    persist (regression to the mean), a real trend may. The difference measures
    the two together, not what the condition predicts about the loss alone;
  - the matching controls for the time in training (the schedule, the usual
    rate of progress), only within +-``span`` batches;
  - losses are of different batches; the windows average that noise away only
    partly, and the drops of nearby pairs overlap (they are not independent).
  Across seeds, only the per-seed means are treated as independent.
  """
  fired = [d["step"] for d in decisions if d["kind"] == "motivated" and d["reason"] == "condition"]
  candidates = np.array(sorted(d["step"] for d in decisions
                               if d["kind"] == "base" and d["reason"] == "condition"),
                        dtype=np.int64)
  rng = np.random.default_rng(rng_seed)
  pairs = []
  for t in fired:
    near = candidates[(candidates >= t - span) & (candidates <= t + span)]
    if near.size:
      pairs.append((t, int(rng.choice(near))))
  drops = loss_drop_after(decisions, [b for p in pairs for b in p],
                          window=window, phase_steps=phase_steps)
  measured = [(t, m) for t, m in pairs if t in drops and m in drops]
  fired_drops = [drops[t] for t, _ in measured]
  matched_drops = [drops[m] for _, m in measured]
  return {
      "fired": len(fired), "pairs_measured": len(measured),
      "drop_fired": _float(np.mean(fired_drops)) if measured else None,
      "drop_matched": _float(np.mean(matched_drops)) if measured else None,
      "difference": (_float(np.mean(fired_drops) - np.mean(matched_drops))
                     if measured else None),
  }


SIGNAL_VERDICTS = ("larger drops after the fired batches", "no difference detectable",
                   "smaller drops after the fired batches")


def signal_over_seeds(per_seed: Mapping[int, Mapping], confidence: float = 0.95) -> dict:
  """``mean_ci`` over seeds of ``signal_analysis``'s per-seed ``difference``
  (seeds with none measured are left out), with ``per_seed`` and a verdict."""
  values = {s: r["difference"] for s, r in sorted(per_seed.items())
            if r["difference"] is not None}
  interval = mean_ci(list(values.values()), confidence)
  return {**interval, "seeds": [int(s) for s in values],
          "per_seed": {str(s): dict(r) for s, r in sorted(per_seed.items())},
          "verdict": verdict(interval, words=SIGNAL_VERDICTS)}
