"""The performance harness (benchmarks/run.py) runs end to end in its tiny mode, its
accelerator part (item 6) too, and benchmarks/loop_reads.py; benchmarks/device/
carries every dependency a lent GPU machine lacks.

Only what does not depend on the machine's speed is asserted: one compilation
per step kind however often the loop switches, and the files it writes. The
timings themselves are recorded in benchmarks/results/, never asserted here.
"""

import importlib
import importlib.metadata
import json
import os
import re
import sys

import pytest
from packaging.requirements import Requirement

from conftest import ROOT


def _benchmark(name: str = "run"):
  # Imported as the package module ``python -m benchmarks.run`` runs (its
  # dataclasses need their module in sys.modules, which load_script skips).
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  return importlib.import_module(f"benchmarks.{name}")


# Slow (16-21 s): the whole harness on small models; the fast run keeps its
# accelerator part's test below and test_compilation.py's compile counts.
@pytest.mark.slow
def test_the_harness_counts_one_compile_per_kind_and_writes_its_files(tmp_path):
  out = str(tmp_path / "results" / "harness")
  results = _benchmark().main(["--tiny", "--out", out])
  (tiny,) = results["models"].values()
  compiles = tiny["compiles"]
  assert compiles["switches"] >= 100  # a run that switches often ...
  assert compiles["compiles_per_kind"] == {"base": 1, "motivated": 1}  # ... compiles once
  assert tiny["setup_compiles_per_kind"] == {"base": 1, "motivated": 1}
  assert tiny["loop"]["compiles_per_kind"] == {"base": 1, "motivated": 1}
  for kind in ("base", "motivated"):  # the non-finite rule is priced for both kinds
    check = tiny["step_cost"][kind]["finite_check"]
    assert check["unchecked_kernels"] < tiny["step_cost"][kind]["standalone_kernels"]
  recorded = json.load(open(out + ".json"))
  assert recorded["models"]["tiny"]["compiles"] == compiles
  assert recorded["machine"]["jax"] and recorded["machine"]["devices"]
  markdown = open(out + ".md").read()
  assert recorded["machine"]["cpu"] in markdown and "| compiles per step kind" in markdown
  assert "non-finite rule" in markdown
  # The whole-run overhead: both sides trained the same base; the warm runs
  # (the suite's cache, conftest.py: none was cold) compiled nothing.
  overhead = tiny["overhead"]
  assert not overhead["cold_is_cold"] and overhead["warm_ratio"] > 0
  assert overhead["compilation"]["package warm"]["compiled"] == 0
  assert overhead["compilation"]["plain warm"]["compiled"] == 0
  # ... and the package doing the plain loop's work (no recalibration, one checkpoint).
  assert overhead["compilation"]["same_work warm"]["compiled"] == 0
  assert overhead["compilation"]["same_work warm"]["from_cache"] > 0
  assert overhead["same_work_warm_ratio"] > 0 and len(overhead["same_work_warm_ratios"]) == 1
  assert "| the same, the package doing the plain loop's work" in markdown
  assert "| whole run, base alone, warm compilation cache / plain loop" in markdown
  # A user's own module, paired: its base step against the small module's own.
  assert recorded["paired"]["ratio"] > 0 and recorded["paired"]["target"] == 1.05
  assert "| step cost, a user's Linen MLP paired, base / its small module's own step" in markdown
  blocks = recorded["paired_blocks"]  # and in the blocks layout, with its motivated step
  assert blocks["state_layout"] == "blocks" and blocks["ratio"] > 0
  assert blocks["motivated"]["ratio_to_in_place"] > 0
  assert "| step cost, the same in blocks (model.state_layout=blocks), base /" in markdown
  # The language model's steps (configs/lm_shakespeare.py:smoke): each kind against
  # its standalone transformer, with XLA's FLOPs beside the formula's.
  lm = recorded["lm_steps"]
  assert lm["config_file"] == "configs/lm_shakespeare.py:smoke"
  for kind in ("base", "motivated"):
    assert lm[kind]["ratio"] > 0 and lm[kind]["nested_tokens_per_s"] > 0
    assert 0.9 < lm[kind]["xla_over_formula"] < 1.3, lm[kind]
  assert lm["base"]["params"] < lm["motivated"]["params"]
  assert "| step cost, LM (configs/lm_shakespeare.py:smoke), base / its standalone" in markdown
  assert "## Language-model steps" in markdown


def test_lm_steps_refuses_a_config_that_is_not_a_language_model():
  from motivation_jax.errors import ConfigError
  lm_steps = _benchmark("lm_steps")
  with pytest.raises(ConfigError, match="needs an LM config"):
    lm_steps.measure(lm_steps.load_config("configs/default.py"))


def test_loop_reads_times_every_variant_on_the_same_batches(capsys):
  loop_reads = _benchmark("loop_reads")
  result = loop_reads.main(["--tiny", "--batches=12", "--trials=1"])
  assert set(result) == set(loop_reads.VARIANTS)
  assert result["schedule"]["ratio"] == 1.0
  assert len({r["batches"] for r in result.values()}) == 1  # one schedule for all
  assert all(r["us_per_batch"] > 0 for r in result.values())
  table = capsys.readouterr().out
  assert all(f"| {name} |" in table for name in loop_reads.VARIANTS)


def test_the_accelerator_part_measures_each_kind_and_dtype(tmp_path, monkeypatch):
  run, accelerator = _benchmark(), _benchmark("accelerator")
  (vit,) = [c for c in accelerator.ACCELERATOR_CONFIGS if "vit" in c[0]]
  monkeypatch.setattr(accelerator, "ACCELERATOR_CONFIGS", (vit,))
  out = str(tmp_path / "harness_steps")
  written = []
  save = run.markdown
  monkeypatch.setattr(run, "markdown", lambda r: written.append(r["complete"]) or save(r))
  results = run.main(["--tiny", "--accelerator-only", "--out", out])
  assert results["models"] == {} and written == [False, False, True]  # saved as it went
  rows = results["accelerator"]
  assert [(r["dtype"], r["kind"]) for r in rows] == [
      ("float32", "base"), ("float32", "motivated"),
      ("bfloat16", "base"), ("bfloat16", "motivated")]
  for r in rows:
    assert r["step_ms"] > 0 and r["flops"] > 0 and r["step_memory_gib"] > 0
  for dtype in ("float32", "bfloat16"):  # the motivated step is the larger program
    base, motivated = (r for r in rows if r["dtype"] == dtype)
    assert motivated["flops"] > base["flops"]
    assert motivated["step_memory_gib"] > base["step_memory_gib"]
  markdown = open(out + ".md").read()
  assert "## Accelerator step times" in markdown and "## Targets" not in markdown
  assert json.load(open(out + ".json"))["complete"] is True


def _norm(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def test_the_device_wheels_carry_what_the_gpu_image_lacks():
  """Every distribution motivation_jax needs (transitively, extras followed, for
  the device's Python 3.12 on Linux) is in the image's list or in wheels.txt,
  and wheels.txt names nothing it does not need (fetch_wheels.sh takes each at
  the version installed where the tests ran)."""
  device = os.path.join(ROOT, "benchmarks", "device")
  with open(os.path.join(device, "image_packages.txt")) as f:
    image = {_norm(w) for line in f if not line.startswith("#") for w in line.split()}
  with open(os.path.join(device, "wheels.txt")) as f:
    carried = {_norm(line.strip()) for line in f if line.strip() and not line.startswith("#")}
  environment = {"python_version": "3.12", "python_full_version": "3.12.3",
                 "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
                 "platform_machine": "x86_64", "implementation_name": "cpython",
                 "platform_python_implementation": "CPython"}
  needed, todo, done = set(), [("motivation-jax", "")], set()
  while todo:
    name, extra = todo.pop()
    if (name, extra) in done:
      continue
    done.add((name, extra))
    dist = importlib.metadata.distribution(name)
    needed.add(_norm(name))
    for text in dist.requires or []:
      requirement = Requirement(text)
      if requirement.marker and not requirement.marker.evaluate(
          {**environment, "extra": extra}):
        continue
      todo += [(_norm(requirement.name), e) for e in ("", *requirement.extras)]
  needed.discard("motivation-jax")
  assert "tensorflow-datasets" in needed and "jax" in needed  # the walk went somewhere
  missing = sorted(n for n in needed if n not in image and n not in carried)
  assert not missing, f"add to benchmarks/device/wheels.txt: {missing}"
  unneeded = sorted(carried - needed)
  assert not unneeded, f"benchmarks/device/wheels.txt names what nothing needs: {unneeded}"
