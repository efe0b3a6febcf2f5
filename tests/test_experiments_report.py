"""The suite's report from synthetic run records: files, numbers, verdicts."""

import json

import numpy as np
import pytest

from motivation_jax.experiments import report, stats

ARMS = ("base_alone", "motivated", "large_alone", "random_rate", "random_times",
        "large_matched", "joint")
BATCHES, PHASE_STEPS = 240, 2
# Final test accuracies (base model, motivated model) per arm, for seeds 0, 1, 2:
# motivation adds 0.02-0.03 to the base; the motivated model is within noise
# of the large one.
ACCURACY = {
    "base_alone": ([0.80, 0.82, 0.81], [0.10, 0.10, 0.10]),  # the motivated model never trains
    "motivated": ([0.82, 0.85, 0.83], [0.88, 0.85, 0.87]),
    "large_alone": ([0.50, 0.52, 0.51], [0.87, 0.86, 0.88]),
    "random_rate": ([0.81, 0.82, 0.82], [0.86, 0.85, 0.86]),
    "random_times": ([0.815, 0.83, 0.82], [0.86, 0.86, 0.85]),
    # The large model alone for the motivated arm's FLOPs: worse than the motivated model.
    "large_matched": ([0.30, 0.30, 0.30], [0.85, 0.83, 0.85]),
    # MatFormer's joint training: both better than with motivation.
    "joint": ([0.83, 0.86, 0.845], [0.89, 0.865, 0.88]),
}
MATCHED_BATCHES = 77  # round(306e9 / 4e9): the motivated arm's FLOPs on the large step
FLOPS = {"base": 1e9, "motivated": 4e9}


def _record(arm, seed):
  rng = np.random.default_rng([seed, ARMS.index(arm)])
  # Phases of PHASE_STEPS batches start at 20, 40, ..., 220; large_alone: every
  # batch is motivated; base_alone: none. The loss falls, with noise.
  every = {"base_alone": None, "large_alone": 1, "large_matched": 1, "joint": 1}.get(arm, 20)
  decisions, phase = [], 0
  for t in range(MATCHED_BATCHES if arm == "large_matched" else BATCHES):
    loss = float(2.0 * np.exp(-t / 100) + 0.05 * rng.normal())
    if phase:
      phase -= 1
      decisions.append({"step": t, "kind": "motivated", "score": 0.0, "reason": "phase",
                        "loss": loss})
    elif every and t >= (0 if every == 1 else 10) and t % every == 0:
      phase = PHASE_STEPS - 1
      decisions.append({"step": t, "kind": "motivated", "score": 3.0, "reason": "condition",
                        "loss": loss})
    else:
      decisions.append({"step": t, "kind": "base", "score": 0.0, "reason": "condition",
                        "loss": loss})
  counts = {k: sum(d["kind"] == k for d in decisions) for k in ("base", "motivated")}
  base, motivated = (ACCURACY[arm][i][seed] for i in (0, 1))
  evals = [{"step": s, "epoch": e, "base/test_accuracy": base * (e + 1) / 4,
            "motivated/test_accuracy": motivated * (e + 1) / 4}
           for e, s in enumerate(range(59, BATCHES, 60))]
  # The joint step trains the base too: its FLOPs are both kinds'.
  flops = {**FLOPS, "motivated": FLOPS["base"] + FLOPS["motivated"]} if arm == "joint" else FLOPS
  summary = {
      "base/test_accuracy": base, "motivated/test_accuracy": motivated,
      "policy": "joint" if arm == "joint" else "switch",
      "base_steps": counts["base"], "motivated_steps": counts["motivated"],
      "activations": sum(d["reason"] == "condition" and d["kind"] == "motivated"
                         for d in decisions),
      "training_flops": counts["base"] * flops["base"] + counts["motivated"] * flops["motivated"],
      "large_alone_flops": BATCHES * FLOPS["motivated"], "wall_time_s": 10.0 + seed,
      "flops_per_step": flops, "params": {"base": 1000, "motivated": 4000},
      "dataset": "synthetic"}
  return {"arm": arm, "seed": seed, "workdir": f"/tmp/{arm}-seed{seed}", "summary": summary,
          "evals": evals, "decisions": decisions}


def _records(arms=ARMS, seeds=(0, 1, 2)):
  return [_record(a, s) for s in seeds for a in arms]


def _meta(arms=ARMS, seeds=(0, 1, 2)):
  return {"config": "configs/default.py", "overrides": ["--config.num_epochs=1"],
          "seeds": list(seeds), "arms": list(arms), "machine": "test machine",
          "command": "python -m motivation_jax.experiments --seeds=3", "phase_steps": PHASE_STEPS}


def _is_png(path):
  data = open(path, "rb").read()
  return len(data) > 100 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_full_report_has_its_files_numbers_and_verdicts(tmp_path):
  records = _records()
  rep = report.build_report(records, _meta())
  paths = report.write_report(rep, records, str(tmp_path))
  names = {"report.md", "report.json", "accuracy_over_training.png",
           "activation_timeline.png", "accuracy_vs_flops.png"}
  assert {p.rsplit("/", 1)[-1] for p in paths} == names
  for name in names - {"report.md", "report.json"}:
    assert _is_png(tmp_path / name), name

  data = json.loads((tmp_path / "report.json").read_text())
  assert data["meta"] == _meta()
  acc = {a: {s: v for s, v in enumerate(ACCURACY[a][0])} for a in ARMS}
  assert data["scores"]["motivated"]["base"] == pytest.approx(
      stats.mean_ci(ACCURACY["motivated"][0]))
  helped = data["paired"]["motivated - base_alone"]["base"]
  # Differences 0.02, 0.03, 0.02: mean 0.0233333, sd 0.0057735, half
  # 4.302653 * 0.0057735 / sqrt(3) = 0.0143422: [0.0089912, 0.0376755], above 0.
  assert (helped["mean"], helped["low"], helped["high"]) == pytest.approx(
      (0.0233333, 0.0089912, 0.0376755), abs=1e-6)
  assert helped["verdict"] == "helped"
  expected = stats.paired_difference(acc["motivated"], acc["base_alone"])
  assert helped["seeds"] == expected["seeds"] == [0, 1, 2]
  for key in ("mean", "sd", "low", "high"):
    assert helped[key] == pytest.approx(expected[key]), key
  # Motivated model, motivated - large_alone: 0.01, -0.01, -0.01: interval around 0.
  vs_large = data["paired"]["motivated - large_alone"]["motivated"]
  assert vs_large["differences"] == pytest.approx([0.01, -0.01, -0.01])
  assert vs_large["verdict"] == "no difference detectable"
  assert set(data["paired"]["motivated - random_times"]) == {"base", "motivated"}
  assert "base_alone - large_alone" not in data["paired"]  # its motivated model never trains
  assert "large_alone - base_alone" not in data["paired"]  # its base never trains alone
  assert data["not_measured"] == []

  # large_alone trains the motivated model on every batch: its ratio is 1.
  cost = data["cost"]
  assert cost["large_alone"]["flops_ratio_to_large_alone"] == pytest.approx(1.0)
  # The motivated arm: phases of 2 at batches 20, 40, ..., 220: 22 motivated,
  # 218 base batches; (218 * 1e9 + 22 * 4e9) / (240 * 4e9) = 306 / 960.
  assert cost["motivated"]["motivated_fraction"] == pytest.approx(22 / 240)
  assert cost["motivated"]["flops_ratio_to_large_alone"] == pytest.approx(0.31875)
  assert cost["motivated"]["training_flops"] == pytest.approx(306e9)
  assert cost["base_alone"]["wall_time_s"] == pytest.approx(11.0)

  signal = data["signal"]["arms"]["motivated"]
  per_seed = {seed: stats.signal_analysis(r["decisions"], window=report.SIGNAL_WINDOW,
                                          phase_steps=PHASE_STEPS, rng_seed=seed,
                                          span=report.SIGNAL_SPAN)
              for seed, r in enumerate(r for r in records if r["arm"] == "motivated")}
  assert signal["mean"] == pytest.approx(stats.signal_over_seeds(per_seed)["mean"])
  assert signal["per_seed"]["0"]["fired"] == 11  # batches 20, 40, ..., 220
  assert "motivated - random_times" in data["signal"]

  claims = {c["id"]: c for c in data["claims"]}
  assert len(claims) == 8 and all(c["verdict"] for c in claims.values())
  # The two baselines a user would choose instead. Same compute on the large
  # model alone: 0.03, 0.02, 0.02 worse than the motivated model.
  matched = data["paired"]["motivated - large_matched"]["motivated"]
  assert matched["differences"] == pytest.approx([0.03, 0.02, 0.02])
  assert claims["motivated_as_good_as_large_matched"]["verdict"] == "helped"
  assert "on 77 batches" in claims["motivated_as_good_as_large_matched"]["statement"]
  assert ": better." in claims["motivated_as_good_as_large_matched"]["statement"]
  # Joint training did better on both models, at 1200e9 FLOPs against 306e9.
  for model, diffs in (("base", [-0.01, -0.01, -0.015]), ("motivated", [-0.01, -0.015, -0.01])):
    d = data["paired"]["motivated - joint"][model]
    assert d["differences"] == pytest.approx(diffs) and d["verdict"] == "hurt"
  assert "25.5% of the joint arm's training FLOPs" in claims["base_against_joint"]["statement"]
  assert data["trained"]["joint"] == ["base", "motivated"]
  assert data["trained"]["large_matched"] == ["motivated"]
  assert data["cost"]["joint"]["policy"] == "joint"
  assert data["cost"]["large_matched"]["batches"] == 77
  assert claims["motivation_helped_base"]["verdict"] == "helped"
  assert "+0.0233 [+0.0090, +0.0377]" in claims["motivation_helped_base"]["statement"]

  md = (tmp_path / "report.md").read_text()
  assert md.index("## Verdicts") < md.index("## Test accuracy")
  assert "(3 seeds): helped." in md and "(3 seeds): no difference detectable" in md
  assert "`python -m motivation_jax.experiments --seeds=3`" in md and "test machine" in md
  for name in names - {"report.md", "report.json"}:
    assert f"]({name})" in md
  # Both columns: sd 0.0152753, half 4.302653 * 0.0152753 / sqrt(3) = 0.0379462.
  assert "| motivated | 3 | 0.8333 ± 0.0379 | 0.8667 ± 0.0379 |" in md
  assert "| large_alone | 3 | (0.5100 ± 0.0248: never trained on its own) |" in md
  assert "(2 batches); fired" in md


def test_absent_arms_leave_their_statistics_and_plots_out(tmp_path):
  arms = ("base_alone",)
  records = _records(arms, seeds=(0, 1))
  rep = report.build_report(records, _meta(arms, seeds=(0, 1)))
  paths = report.write_report(rep, records, str(tmp_path))
  assert not (tmp_path / "activation_timeline.png").exists()
  assert {p.rsplit("/", 1)[-1] for p in paths} == {
      "report.md", "report.json", "accuracy_over_training.png", "accuracy_vs_flops.png"}
  assert rep["paired"] == {} and rep["signal"]["arms"] == {}
  assert all(c["verdict"] is None for c in rep["claims"])
  assert rep["cost"]["base_alone"]["flops_ratio_to_large_alone"] is None
  md = (tmp_path / "report.md").read_text()
  assert "needs the motivated arm" in md and "needs the large_alone arm" in md
  assert "activation_timeline.png" not in md


def test_a_seed_missing_from_one_arm_is_left_out_of_its_pairs_and_one_seed_has_no_interval(
    tmp_path):
  arms = ("base_alone", "motivated")
  records = [r for r in _records(arms) if not (r["arm"] == "base_alone" and r["seed"] > 0)]
  records[0]["summary"]["resumed_from_step"] = 120
  rep = report.build_report(records, _meta(arms))
  d = rep["paired"]["motivated - base_alone"]["base"]
  assert d["seeds"] == [0] and d["low"] is None
  assert d["verdict"] == "no difference detectable (one seed: no interval)"
  assert "needs the large_alone arm" in " ".join(rep["not_measured"])
  report.write_report(rep, records, str(tmp_path))
  md = (tmp_path / "report.md").read_text()
  assert "| +0.0200 (no interval) | no difference detectable (one seed: no interval) |" in md
  assert "| base_alone | 1 | 0.8000 (one seed) | never trained |" in md
  assert "1 run(s) were resumed" in md


def _lm_record(arm, seed):
  """``_record`` as a language model's: held-out bits per byte = 3 - the accuracy
  above, so every arm that scores better there scores lower here."""
  r = _record(arm, seed)
  for holder in [r["summary"]] + r["evals"]:
    for model in report.MODELS:
      holder[f"{model}/test_bits_per_byte"] = 3.0 - holder[f"{model}/test_accuracy"]
      holder[f"{model}/test_accuracy"] /= 2  # per-token accuracy: not what is compared
  r["summary"]["task"] = "causal_lm"
  return r


def test_a_language_model_suite_compares_bits_per_byte_lower_being_better(tmp_path):
  records = [_lm_record(a, s) for s in (0, 1, 2) for a in ARMS]
  rep = report.build_report(records, _meta())
  assert rep["metric"]["key"] == "test_bits_per_byte" and not rep["metric"]["higher_is_better"]
  assert rep["scores"]["motivated"]["base"]["mean"] == pytest.approx(3 - 0.8333333)
  helped = rep["paired"]["motivated - base_alone"]["base"]
  # Bits per byte fell by 0.02, 0.03, 0.02: below 0, which is better.
  assert (helped["mean"], helped["low"], helped["high"]) == pytest.approx(
      (-0.0233333, -0.0376755, -0.0089912), abs=1e-6)
  assert helped["verdict"] == "helped"
  claims = {c["id"]: c for c in rep["claims"]}
  assert claims["motivation_helped_base"]["statement"].startswith(
      "With motivation the base model's held-out bits per byte changed by −0.0233")
  assert claims["motivation_helped_base"]["verdict"] == "helped"
  # The large model alone scores 0.87, 0.86, 0.88 (bits per byte 2.13, ...): no difference.
  assert claims["motivated_as_good_as_large"]["verdict"] == "no difference detectable"

  paths = report.write_report(rep, records, str(tmp_path))
  names = {p.rsplit("/", 1)[-1] for p in paths}
  assert names == {"report.md", "report.json", "bits_per_byte_over_training.png",
                   "activation_timeline.png", "bits_per_byte_vs_flops.png"}
  md = (tmp_path / "report.md").read_text()
  assert "## Held-out bits per byte (mean ± half-width of the 95% interval; lower is better)" in md
  assert "## Paired differences of held-out bits per byte" in md
  assert "| motivated | 3 | 2.1667 ± 0.0379 | 2.1333 ± 0.0379 |" in md
  assert "test accuracy" not in md


def test_a_suite_of_two_tasks_is_refused():
  records = [_record("motivated", 0), _lm_record("base_alone", 0)]
  with pytest.raises(ValueError, match="share one task"):
    report.build_report(records, _meta())


def test_number_formats():
  assert report.fmt_diff({"mean": 0.0031, "low": -0.001, "high": 0.0072}) == \
      "+0.0031 [\u22120.0010, +0.0072]"
  assert report.fmt_flops(1.2345e12) == "1.23e12"
  assert report.fmt_acc(stats.mean_ci([0.98, 0.98])) == "0.9800 ± 0.0000"
