"""metrics.jsonl stays JSON when a value is not finite."""

import json
import math

from motivation_jax import metrics


def _strict(line: str) -> dict:
  def refuse(name):
    raise ValueError(f"not JSON: {name}")
  return json.loads(line, parse_constant=refuse)


def test_non_finite_values_become_null_and_are_named(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write(3, {"base/test_loss": float("nan"), "motivated/test_loss": float("inf"),
                   "base/test_accuracy": 0.25})
  writer.write(4, {"base/test_loss": 0.5})
  writer.close()
  first, second = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert _strict(first) == {"step": 3, "base/test_loss": None, "motivated/test_loss": None,
                            "base/test_accuracy": 0.25,
                            "non_finite": ["base/test_loss", "motivated/test_loss"]}
  assert _strict(second) == {"step": 4, "base/test_loss": 0.5}  # no key when all are finite


def test_finite_json_leaves_other_values_alone():
  values = {"a": -math.inf, "b": 1, "c": "text", "d": {"nested": 1.0}, "e": 2.5}
  out, bad = metrics.finite_json(values)
  assert bad == ["a"] and out == {**values, "a": None}
