"""The suite's statistics against values computed by hand."""

import pytest

from motivation_jax.experiments import stats


def test_mean_ci_of_three_seeds_by_hand():
  # mean = 0.9; deviations -0.1, 0, +0.1: sd = sqrt(0.02 / 2) = 0.1;
  # se = 0.1 / sqrt(3) = 0.0577350; t_{0.975, 2} = 4.302653; half = 0.2484138.
  ci = stats.mean_ci([0.8, 0.9, 1.0])
  assert ci["n"] == 3
  assert ci["mean"] == pytest.approx(0.9)
  assert ci["sd"] == pytest.approx(0.1)
  assert ci["low"] == pytest.approx(0.6515862, abs=1e-6)
  assert ci["high"] == pytest.approx(1.1484138, abs=1e-6)
  # 90%: t_{0.95, 2} = 2.919986; half = 0.1685848.
  ci90 = stats.mean_ci([0.8, 0.9, 1.0], confidence=0.9)
  assert ci90["high"] - ci90["mean"] == pytest.approx(0.1685848, abs=1e-6)


def test_mean_ci_of_two_seeds_by_hand():
  # mean 2, sd = sqrt(((1-2)^2 + (3-2)^2) / 1) = 1.4142136; se = 1;
  # t_{0.975, 1} = 12.706205: the interval of two seeds is wide.
  ci = stats.mean_ci([1.0, 3.0])
  assert ci["sd"] == pytest.approx(1.4142136, abs=1e-6)
  assert (ci["low"], ci["high"]) == pytest.approx((-10.706205, 14.706205), abs=1e-5)


def test_one_seed_has_a_mean_but_no_interval_and_no_seed_has_neither():
  assert stats.mean_ci([0.5]) == {"n": 1, "mean": 0.5, "sd": None, "low": None, "high": None,
                                  "confidence": 0.95}
  assert stats.mean_ci([])["mean"] is None
  assert stats.verdict(stats.mean_ci([0.5])) == "no difference detectable (one seed: no interval)"
  assert stats.verdict(stats.mean_ci([])) == "no difference detectable (no seed measured)"


def test_zero_variance_gives_a_point_interval():
  ci = stats.mean_ci([0.7, 0.7, 0.7])
  assert ci["sd"] == 0.0
  assert ci["low"] == ci["high"] == pytest.approx(0.7)
  assert stats.verdict(ci) == "helped"  # a point away from 0 excludes it
  assert stats.verdict(stats.mean_ci([0.0, 0.0])) == "no difference detectable"


def test_paired_difference_uses_the_common_seeds_by_hand():
  a = {0: 0.90, 1: 0.80, 2: 0.70, 5: 0.10}
  b = {0: 0.85, 1: 0.80, 2: 0.60, 3: 0.50}
  # Seeds 0, 1, 2: differences 0.05, 0.00, 0.10; mean 0.05; sd 0.05;
  # se = 0.05 / sqrt(3) = 0.0288675; half = 4.302653 * se = 0.1242069.
  d = stats.paired_difference(a, b)
  assert d["seeds"] == [0, 1, 2]
  assert d["differences"] == pytest.approx([0.05, 0.0, 0.1])
  assert d["mean"] == pytest.approx(0.05)
  assert (d["low"], d["high"]) == pytest.approx((-0.0742069, 0.1742069), abs=1e-6)
  assert stats.verdict(d) == "no difference detectable"
  assert stats.paired_difference({0: 1.0}, {1: 1.0})["n"] == 0


@pytest.mark.parametrize("low, high, higher_is_better, expected", [
    (0.01, 0.03, True, "helped"),
    (-0.03, -0.01, True, "hurt"),
    (-0.01, 0.03, True, "no difference detectable"),
    (0.01, 0.03, False, "hurt"),
    (-0.03, -0.01, False, "helped"),
])
def test_verdict_reads_the_side_of_zero(low, high, higher_is_better, expected):
  interval = {"n": 3, "mean": (low + high) / 2, "low": low, "high": high}
  assert stats.verdict(interval, higher_is_better=higher_is_better) == expected


def _decision(step, kind, reason, loss):
  return {"step": step, "kind": kind, "score": 0.0, "reason": reason, "loss": loss}


def test_loss_drop_after_counts_base_batches_only_by_hand():
  # Base losses 5, 4, 3, 2, 1 at batches 0-4; a phase of 2 at batches 5-6
  # (their loss is the motivated network's, 100: never counted); base 0.5, 0.3, 0.1 at 7-9.
  d = [_decision(t, "base", "condition", l) for t, l in enumerate([5, 4, 3, 2, 1])]
  d += [_decision(5, "motivated", "condition", 100), _decision(6, "motivated", "phase", 100)]
  d += [_decision(t, "base", "condition", l) for t, l in zip((7, 8, 9), (0.5, 0.3, 0.1))]
  # t=5, window 2: before = batches 3, 4 -> 1.5; after batch 6: 7, 8 -> 0.4; drop 1.1.
  # window 3: (3 + 2 + 1) / 3 - (0.5 + 0.3 + 0.1) / 3 = 2.0 - 0.3 = 1.7.
  assert stats.loss_drop_after(d, [5], window=2, phase_steps=2) == {5: pytest.approx(1.1)}
  assert stats.loss_drop_after(d, [5], window=3, phase_steps=2) == {5: pytest.approx(1.7)}
  # window 4: only 3 base batches after the phase: left out; t=1: 1 base batch before.
  assert stats.loss_drop_after(d, [5], window=4, phase_steps=2) == {}
  assert stats.loss_drop_after(d, [1], window=2, phase_steps=2) == {}
  # t=4 with a gap of 2: before = 2, 3 -> 2.5; after batch 5: base 7, 8 -> 0.4; 2.1.
  assert stats.loss_drop_after(d, [4], window=2, phase_steps=2) == {4: pytest.approx(2.1)}


def test_signal_analysis_on_one_fired_batch_by_hand():
  # Batches 0-3 warmup (not candidates), 4 the only batch where the condition
  # was consulted and did not fire, 5 fires a phase of 2, 7-8 cooldown.
  d = [_decision(t, "base", "warmup", l) for t, l in enumerate([6, 5, 4, 3])]
  d += [_decision(4, "base", "condition", 2), _decision(5, "motivated", "condition", 99),
        _decision(6, "motivated", "phase", 99), _decision(7, "base", "cooldown", 1.0),
        _decision(8, "base", "cooldown", 0.5)]
  # drop(5): (3 + 2) / 2 - (1 + 0.5) / 2 = 2.5 - 0.75 = 1.75;
  # drop(4) (matched): before 2, 3 -> (4 + 3) / 2 = 3.5; after batch 5: 7, 8 -> 0.75; 2.75.
  r = stats.signal_analysis(d, window=2, phase_steps=2, rng_seed=0, span=2)
  assert r == {"fired": 1, "pairs_measured": 1, "drop_fired": pytest.approx(1.75),
               "drop_matched": pytest.approx(2.75), "difference": pytest.approx(-1.0)}
  # No candidate within +-1 of batch 5: nothing measured.
  r = stats.signal_analysis(d, window=2, phase_steps=2, rng_seed=0, span=0)
  assert r["pairs_measured"] == 0 and r["difference"] is None


def test_signal_analysis_draws_reproducibly_within_the_span():
  import numpy as np
  rng = np.random.default_rng(1)
  losses = 3 + rng.normal(size=400).cumsum() * 0.01
  fired = set(range(40, 400, 37))
  d = [_decision(t, "motivated" if t in fired else "base", "condition", float(l))
       for t, l in enumerate(losses)]
  a = stats.signal_analysis(d, window=5, phase_steps=1, rng_seed=3, span=10)
  assert a == stats.signal_analysis(d, window=5, phase_steps=1, rng_seed=3, span=10)
  assert a["fired"] == len(fired) and 0 < a["pairs_measured"] <= len(fired)
  assert a["difference"] == pytest.approx(a["drop_fired"] - a["drop_matched"])


def test_signal_over_seeds_by_hand():
  # 0.2, 0.3, 0.4: mean 0.3, sd 0.1, half 0.2484138 -> [0.0515862, 0.5484138] above 0.
  per_seed = {s: {"difference": v} for s, v in enumerate([0.2, 0.3, 0.4])}
  per_seed[3] = {"difference": None}  # nothing measured in that seed: left out
  r = stats.signal_over_seeds(per_seed)
  assert r["seeds"] == [0, 1, 2] and r["n"] == 3
  assert (r["low"], r["high"]) == pytest.approx((0.0515862, 0.5484138), abs=1e-6)
  assert r["verdict"] == "larger drops after the fired batches"
  assert set(r["per_seed"]) == {"0", "1", "2", "3"}  # JSON keys
