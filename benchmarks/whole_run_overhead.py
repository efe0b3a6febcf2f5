r"""Item 7 of the harness alone: the whole-run overhead, cold and warm compilation cache.

  python -m benchmarks.whole_run_overhead [--config=configs/default.py] [--quick] \
      [--out=benchmarks/results/whole_run_overhead_BACKEND]

``run.measure_overhead`` (``python -m benchmarks.run`` measures it too, after
items 1-5): ``train_and_evaluate`` of the base alone against the plain loop of
benchmarks/plain_loop.py. Writes ``OUT.json`` and ``OUT.md``. Run it without
``JAX_COMPILATION_CACHE_DIR`` set, or no run is cold.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax

from benchmarks import run


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/default.py")
  parser.add_argument("--quick", action="store_true", help="5 epochs, one trial")
  parser.add_argument("--out", default=None)
  parser.add_argument("--note", default="", help="a sentence added to the markdown")
  args = parser.parse_args(argv)
  mode = run.MODES["quick" if args.quick else "full"]
  out = args.out or os.path.join(run.RESULTS, f"whole_run_overhead_{jax.default_backend()}")
  start, load_before = time.perf_counter(), run.load_average()
  with tempfile.TemporaryDirectory() as workdir:
    overhead = run.measure_overhead(run.load_config(args.config), mode, workdir)
  given = argv if argv is not None else sys.argv[1:]
  results = {"command": " ".join(["python -m benchmarks.whole_run_overhead",
                                  *(a for a in given if not a.startswith("--note"))]),
             "mode": mode.name, "machine": run.describe_machine(), "load_before": load_before,
             "load_after": run.load_average(), "seconds": time.perf_counter() - start,
             "overhead": overhead, "note": args.note}
  write(results, out)
  return results


def write(results: dict, out: str) -> None:
  """``OUT.json`` and ``OUT.md`` of ``results``."""
  with open(out + ".json", "w") as f:
    json.dump(results, f, indent=2)
  m, o = results["machine"], results["overhead"]
  lines = [f"# Whole-run overhead: the base alone against a plain loop", "",
           f"`{results['command']}`, {m['date']}: {m['cpu']}, {m['cores']} cores; JAX "
           f"{m['jax']} ({m['backend']}). Load average {results['load_before']} before, "
           f"{results['load_after']} after; {results['seconds']:.0f} s in all.", ""]
  lines += run.overhead_markdown(o)
  if results["note"]:
    lines += ["", results["note"]]
  with open(out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
