"""The performance harness (benchmarks/run.py) runs end to end in its tiny mode, and
benchmarks/loop_reads.py too.

Only what does not depend on the machine's speed is asserted: one compilation
per step kind however often the loop switches, and the files it writes. The
timings themselves are recorded in benchmarks/results/, never asserted here.
"""

import importlib
import json
import sys

from conftest import ROOT


def _benchmark(name: str = "run"):
  # Imported as the package module ``python -m benchmarks.run`` runs (its
  # dataclasses need their module in sys.modules, which load_script skips).
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  return importlib.import_module(f"benchmarks.{name}")


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


def test_loop_reads_times_every_variant_on_the_same_batches(capsys):
  loop_reads = _benchmark("loop_reads")
  result = loop_reads.main(["--tiny", "--batches=12", "--trials=1"])
  assert set(result) == set(loop_reads.VARIANTS)
  assert result["schedule"]["ratio"] == 1.0
  assert len({r["batches"] for r in result.values()}) == 1  # one schedule for all
  assert all(r["us_per_batch"] > 0 for r in result.values())
  table = capsys.readouterr().out
  assert all(f"| {name} |" in table for name in loop_reads.VARIANTS)
