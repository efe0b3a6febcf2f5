"""docs/costs.md is what benchmarks/cost_table.py computes (parameters checked here;
the FLOPs columns come from the same run)."""

import os

import jax.numpy as jnp
import pytest

from motivation_jax import models, nesting

from conftest import ROOT, load_script


def _script():
  return load_script("benchmarks/cost_table.py")


def _rows():
  with open(os.path.join(ROOT, "docs", "costs.md")) as f:
    lines = [l for l in f if l.startswith("| ") and not l.startswith("| family")]
  return [[c.strip() for c in l.strip().strip("|").split("|")] for l in lines]


def test_every_pair_of_the_script_is_in_the_doc_with_its_parameter_counts():
  script, rows = _script(), _rows()
  assert len(rows) == len(script.PAIRS)
  assert {r[0] for r in rows} == {"resnet", "efficientnet", "vit"}
  for row, (family, base, motivated, options, shape, classes, batch, _) in zip(rows,
                                                                              script.PAIRS):
    model = models.build_model({"name": family, "base": base, "motivated": motivated,
                                **options}, classes)
    wmap = nesting.weights_map(model, jnp.zeros((1, *shape)), subnet="motivated")
    assert row[0] == family and int(row[3]) == batch
    assert row[4:6] == [f"{wmap.num_params('base'):,}", f"{wmap.num_params('motivated'):,}"]
    base_flops, motivated_flops = (float(x.replace(",", "")) for x in row[6:8])
    assert 0 < base_flops < motivated_flops


# EfficientNet in the full run only (7 s; its steps are in test_steps.py and
# test_step_costs.py in the fast run too).
@pytest.mark.parametrize("family", ["resnet", pytest.param("efficientnet", marks=pytest.mark.slow),
                                    "vit"])
def test_the_script_measures_a_small_pair_of_every_family(family):
  base, motivated, options = {
      "resnet": ({"arch": "resnet20", "width": 0.25}, {"arch": "resnet32", "width": 0.25}, {}),
      "efficientnet": ({"arch": "b0", "width": 0.25}, {"arch": "b0", "width": 0.5}, {}),
      "vit": ({"arch": "ti", "depth": 1, "width": 1 / 3}, {"arch": "ti", "depth": 2},
              {"patch_size": 8, "head_dim": 8}),
  }[family]
  params, flops = _script().measure(family, base, motivated, options, (16, 16, 3), 10, 8)
  assert 0 < params["base"] < params["motivated"]
  assert 0 < flops["base"] < flops["motivated"]
