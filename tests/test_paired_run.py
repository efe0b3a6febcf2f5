"""A user's own module named by config.model.module: trained end to end, resumed
exactly with dropout, exported and reloaded into the user's own class."""

import os
import shutil
import sys

import numpy as np
import pytest

from conftest import ROOT, load_default_config
from motivation_jax import models, train
from motivation_jax.errors import ConfigError, MotivationError
from motivation_jax.export import export_run

sys.path.insert(0, ROOT)  # where `python -m motivation_jax.main` finds examples/ (its cwd)


def _config(module: str, base: dict, motivated: dict):
  config = load_default_config()
  config.progress_bar = False
  config.num_epochs = 2
  config.checkpoint_every_epochs = 1
  config.bn_recalibration_batches = 2
  config.model.module = module
  config.model.base = base
  config.model.motivated = motivated
  return config


MODULES = {
    "linen": ("examples.byom_models:MLP", {"widths": (16,)}, {"widths": (32,)}),
    "nnx": ("examples.byom_models:NNXMLP", {"widths": (16,)}, {"widths": (32,)}),
}


@pytest.fixture(scope="module", params=sorted(MODULES))
def run(request, tmp_path_factory):
  workdir = tmp_path_factory.mktemp(f"run_{request.param}")
  config = _config(*MODULES[request.param])
  summary = train.train_and_evaluate(config, str(workdir))
  return request.param, config, workdir, summary


def test_a_users_module_trains_from_a_config(run):
  api, config, workdir, summary = run
  assert summary["nesting"] == {"exact": True, "gap": summary["nesting"]["gap"], "api": api}
  assert summary["base/test_accuracy"] > 0.5 and summary["motivated/test_accuracy"] > 0.5
  assert summary["params"]["base"] < summary["params"]["motivated"]


@pytest.mark.parametrize("run", ["linen"], indirect=True)  # one resume is enough
def test_a_resumed_run_with_dropout_is_bit_identical(run, tmp_path):
  api, config, workdir, summary = run
  copy = tmp_path / "resumed"
  shutil.copytree(workdir, copy)
  steps = sorted(int(d) for d in os.listdir(copy / "checkpoints") if d.isdigit())
  shutil.rmtree(copy / "checkpoints" / str(steps[-1]))  # as if killed after epoch 1
  resumed = train.train_and_evaluate(config, str(copy))
  assert resumed["resumed_from_step"] == steps[0]
  assert (copy / "decisions.jsonl").read_text() == (workdir / "decisions.jsonl").read_text()
  for key in ("base/test_accuracy", "motivated/test_accuracy"):
    assert resumed[key] == summary[key]


def test_the_export_reloads_into_the_users_own_class(run, tmp_path):
  api, config, workdir, summary = run
  out = tmp_path / "out"
  spec = export_run(str(workdir), "base", str(out))
  assert spec["api"] == api and spec["class"] in ("MLP", "NNXMLP")
  assert spec["kwargs"]["widths"] == [16] and spec["nesting"]["exact"]
  module, variables, loaded = models.load_exported(str(out))
  x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype(np.float32)
  from examples import byom_models
  if api == "nnx":
    assert isinstance(module, byom_models.NNXMLP)
    module.eval()
    logits = module(x)
  else:
    assert isinstance(module, byom_models.MLP)
    logits = module.apply(variables, x)
  assert logits.shape == (4, 10) and np.all(np.isfinite(logits))


@pytest.mark.parametrize("change,words", [
    ({"module": "examples.no_such_module:MLP"}, "cannot import"),
    ({"module": "examples.byom_models"}, "package.module:Name"),
    ({"module": "examples.byom_models:NoSuchClass"}, "has no 'NoSuchClass'"),
    ({"base": {"widths": (16,), "depth": 3}}, "takes no keyword 'depth'"),
    ({"motivated": {"widths": (8,)}}, "has shape"),
])
def test_a_bad_module_config_is_one_line(change, words, tmp_path):
  module, base, motivated = MODULES["linen"]
  config = _config(module, base, motivated)
  for key, value in change.items():
    config.model[key] = value
  with pytest.raises(MotivationError, match=words) as e:
    train.setup(config, str(tmp_path))
  assert "\n" not in str(e.value)


def test_an_export_that_would_not_reload_is_refused():
  from motivation_jax.models import paired as paired_lib
  variables = {"params": {"head": {"kernel": np.zeros((16, 10)), "bias": np.zeros(10)}}}
  spec = {"api": "linen", "module": "examples.byom_models", "class": "MLP",
          "kwargs": {"widths": [16]}}
  x = np.zeros((1, 8, 8, 1), np.float32)
  with pytest.raises(ConfigError, match="could not be reloaded"):
    paired_lib.check_reloads(spec, variables, x)  # MLP((16,)) has hidden_0 and bn_0 too
  with pytest.raises(ConfigError, match="could not be reloaded"):
    paired_lib.check_reloads({**spec, "module": "__main__"}, variables, x)


# d_model under LayerNorm: shapes nest, outputs do not (models/paired.py).
WIDER = ("examples.byom_models:Transformer", {"heads": 2, "mlp_dim": 16, "depth": 1, "dim": 8},
         {"heads": 4, "mlp_dim": 32, "depth": 1, "dim": 16})


def test_a_base_that_only_shares_weights_needs_exact_false_and_says_so(tmp_path):
  config = _config(*WIDER)
  config.num_epochs = 1
  with pytest.raises(MotivationError, match="normalisation over features") as e:
    train.setup(config, str(tmp_path / "refused"))
  assert "\n" not in str(e.value) and "exact=False" in str(e.value)
  config.model.exact = False
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["nesting"]["exact"] is False and summary["nesting"]["gap"] > 1e-3
  assert "not exactly nested" in train.format_summary(summary)
  spec = export_run(str(tmp_path / "run"), "base", str(tmp_path / "out"))
  assert spec["nesting"]["exact"] is False and spec["kwargs"]["dim"] == 8


def test_the_experiments_suite_trains_a_users_module(tmp_path):
  from motivation_jax.experiments import report, suite
  config = _config(*MODULES["nnx"])
  config.num_epochs = 1
  arms = ("base_alone", "motivated")
  records = suite.run_suite(config, [0], str(tmp_path), arms, log=lambda _: None)
  assert [(r["arm"], r["seed"]) for r in records] == [(a, 0) for a in arms]
  assert all(r["summary"]["nesting"]["api"] == "nnx" for r in records)
  assert records[0]["summary"]["motivated_steps"] == 0 < records[1]["summary"]["motivated_steps"]
  meta = {"config": "byom", "overrides": [], "seeds": [0], "arms": list(arms),
          "machine": "test", "command": "python -m motivation_jax.experiments ...",
          "phase_steps": config.motivation.phase_steps}
  paths = report.write_report(report.build_report(records, meta), records, str(tmp_path))
  assert any(p.endswith("report.md") for p in paths)
