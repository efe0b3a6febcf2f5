"""The harness's report (benchmarks/run.py): each target with its value, and the
markdown of everything measured.

Apart from the measurements, so that a run cut short can write what it has
(``run.main`` saves after each part) and the other scripts can render their
part alike (benchmarks/whole_run_overhead.py's table, benchmarks/lm_steps.py's).
"""

from __future__ import annotations

from typing import Any

from benchmarks.whole_run_overhead import overhead_markdown

def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
  """Each target of the issue, its value and whether it is met."""
  rows = []
  for label, r in results["models"].items():
    lag = str(r["loop_lag"])
    loop = r["loop"]["lags"][lag]
    step_ms = loop["schedule_us_per_batch"] / 1e3
    goal = 0.98 if step_ms >= 1.0 else 0.95
    rows.append({"what": f"loop overhead, {label} ({step_ms:.2f} ms/batch, lag {lag})",
                 "value": loop["overhead_ratio"], "target": f">= {goal}",
                 "met": loop["overhead_ratio"] >= goal})
    for kind in ("base", "motivated"):
      ratio = r["step_cost"][kind]["ratio"]
      rows.append({"what": f"step cost, {label}, {kind} / standalone", "value": ratio,
                   "target": "<= 1.05", "met": ratio <= 1.05})
    if "overhead" in r:
      o = r["overhead"]
      rows.append({"what": f"whole run, base alone, warm compilation cache / plain loop "
                           f"({o['batches']} batches)", "value": o["warm_ratio"],
                   "target": "<= 1.3", "met": o["warm_ratio"] <= 1.3})
      if "same_work_warm_ratio" in o:
        rows.append({"what": "the same, the package doing the plain loop's work (no "
                             "recalibration, one checkpoint)",
                     "value": o["same_work_warm_ratio"], "target": "<= 1.3",
                     "met": o["same_work_warm_ratio"] <= 1.3})
    per_kind = r["compiles"]["compiles_per_kind"]
    rows.append({"what": f"compiles per step kind, {label}, "
                         f"{r['compiles']['switches']} switches",
                 "value": f"{per_kind['base']} / {per_kind['motivated']}",
                 "target": "1 / 1", "met": per_kind == {"base": 1, "motivated": 1}})
  if "paired" in results:
    p = results["paired"]
    rows.append({"what": f"step cost, a user's Linen MLP paired, base / its small module's "
                         f"own step ({p['paired_step_us']:.0f} vs {p['ordinary_step_us']:.0f} "
                         f"us)", "value": p["ratio"], "target": "<= 1.05",
                 "met": p["ratio"] <= 1.05})
  if "paired_blocks" in results:
    p = results["paired_blocks"]
    rows.append({"what": f"step cost, the same in blocks (model.state_layout=blocks), base / "
                         f"its small module's own step ({p['paired_step_us']:.0f} vs "
                         f"{p['ordinary_step_us']:.0f} us; its motivated step "
                         f"{p['motivated']['ratio_to_in_place']:.2f}x the in-place one)",
                 "value": p["ratio"], "target": "<= 1.05", "met": p["ratio"] <= 1.05})
  if "lm_steps" in results:
    lm = results["lm_steps"]
    for kind in ("base", "motivated"):
      k = lm[kind]
      rows.append({"what": f"step cost, LM ({lm['config_file']}), {kind} / its standalone "
                           f"transformer ({k['nested_ms']:.1f} vs {k['standalone_ms']:.1f} ms, "
                           f"{k['nested_tokens_per_s']:,.0f} tokens/s)",
                   "value": k["ratio"], "target": "<= 1.05", "met": k["ratio"] <= 1.05})
  return rows


def markdown(results: dict[str, Any]) -> str:
  m = results["machine"]
  lines = [
      "# Performance harness: the two-model loop against its parts",
      "",
      f"`{results['command']}` ({results['mode']} mode), "
      f"{m['date']}: {m['cpu']}, {m['cores']} cores; JAX {m['jax']} "
      f"({m['backend']}: {', '.join(m['devices'])}). Load average (1, 5, 15 min) "
      f"{results['load_before']} before, {results['load_after']} after (this harness "
      "included); other processes kept "
      f"{results.get('other_processes_cores', float('nan')):.2f} cores busy on average "
      f"meanwhile; {results['seconds']:.0f} s in all.",
      "",
  ]
  if not results.get("complete", True):
    lines += ["**Partial**: the run stopped before it finished; what follows is what it "
              "had measured.", ""]
  if results["models"]:
    lines += ["Ratios are medians over interleaved trials of two variants timed in this "
              "process", "(benchmarks/run.py says how each is taken).", ""]
  if results["targets"]:
    lines += ["## Targets", "", "| what | value | target | met |", "|---|---:|---:|---|"]
  for t in results["targets"]:
    value = f"{t['value']:.3f}" if isinstance(t["value"], float) else t["value"]
    lines.append(f"| {t['what']} | {value} | {t['target']} | {'yes' if t['met'] else 'NO'} |")
  for label, r in results["models"].items():
    model = r["model"]
    lines += ["", f"## {label}: {model['name']} {model['base']} in {model['motivated']}, "
                  f"{r['dataset']}, batch {r['batch_size']}, {r['optimizer']}", ""]
    s = r["step_cost"]
    lines += ["Step cost (same batch on the device):", "",
              "| kind | nested µs | standalone µs | ratio | nested GFLOPs | standalone GFLOPs |",
              "|---|---:|---:|---:|---:|---:|"]
    lines[-2] += " nested kernels | standalone kernels |"
    lines[-1] += "---:|---:|"
    for kind in ("base", "motivated"):
      k = s[kind]
      lines.append(f"| {kind} | {k['nested_us']:,.0f} | {k['standalone_us']:,.0f} | "
                   f"{k['ratio']:.3f} | {k['nested_flops'] / 1e9:.4f} | "
                   f"{k['standalone_flops'] / 1e9:.4f} | {k['nested_kernels']} | "
                   f"{k['standalone_kernels']} |")
    if "finite_check" in s["base"]:
      f = {kind: s[kind]["finite_check"] for kind in ("base", "motivated")}
      lines += ["", "The package's non-finite rule (`steps.all_finite`, "
                    "`steps.keep_finite_update`), priced on the standalone steps: with it "
                    f"they cost {f['base']['ratio']:.3f} (base) and "
                    f"{f['motivated']['ratio']:.3f} (motivated) of the same steps without "
                    f"it ({f['base']['unchecked_us']:,.0f} and "
                    f"{f['motivated']['unchecked_us']:,.0f} µs, "
                    f"{f['base']['unchecked_kernels']} and "
                    f"{f['motivated']['unchecked_kernels']} kernels)."]
    c = s["base"].get("carrying")
    if c:
      lines += ["", f"The base step against the standalone base step that also takes and "
                    f"returns the {c['leaves']} state leaves it has no counterpart of "
                    f"(batch counter, leaves outside the base, motivated statistics): that "
                    f"step costs {c['ratio_to_standalone']:.3f} of the standalone "
                    f"({c['us']:,.0f} µs, {c['kernels']} kernels), and the base step "
                    f"{c['nested_ratio_to_carrying']:.3f} of it (writing the base region "
                    "back)."]
    c = s["base"].get("constant_lr")
    if c:
      lines += ["", f"With the schedule's peak as a constant learning rate the base step "
                    f"costs {c['ratio']:.3f} of the standalone base step "
                    f"({c['nested_us']:,.0f} against {c['standalone_us']:,.0f} µs)."]
    loop = r["loop"]
    lines += ["", f"Loop (`train.train` against the same steps from its schedule), "
                  f"{loop['batches']} batches, {loop['trials']} trials:", "",
              "| decision lag | overhead ratio | bare reading loop | real µs/batch "
              "| schedule µs/batch | extra µs/batch | host wait µs/batch "
              "| loop host work µs/batch | motivated | switches |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lag, k in loop["lags"].items():
      lines.append(f"| {lag} | {k['overhead_ratio']:.3f} | {k['reading_loop_ratio']:.3f} "
                   f"| {k['real_us_per_batch']:,.1f} | "
                   f"{k['schedule_us_per_batch']:,.1f} | {k['extra_us_per_batch']:,.1f} | "
                   f"{k['host_wait_us_per_batch']:,.1f} | {k['host_work_us_per_batch']:,.1f} | "
                   f"{k['motivated_fraction']:.2f} | {k['switches']} |")
    c = r["compiles"]
    lines += ["", f"Compilations over a whole `train_and_evaluate` of {c['batches']} batches "
                  f"with {c['switches']} switches: {c['compiles_per_kind']['base']} base, "
                  f"{c['compiles_per_kind']['motivated']} motivated step; start-up compile "
                  f"{c['startup_compile_s']['base']:.2f} s (base), "
                  f"{c['startup_compile_s']['motivated']:.2f} s (motivated). All programs: "
                  + ", ".join(f"`{k}` {v}" for k, v in sorted(c["compiles_by_program"].items()))
                  + f". Compiles of a step kind during all the loop trials: "
                  f"{loop['compiles_per_kind']}."]
    if "whole_run" in r:
      w = r["whole_run"]
      lines += ["", f"Whole run (`train_and_evaluate`, {w['epochs']} epochs, "
                    f"median of {w['repeats']}):", "",
                "| run | wall s | training GFLOPs | base steps | motivated steps "
                "| base acc | motivated acc |", "|---|---:|---:|---:|---:|---:|---:|"]
      for name in ("motivated run", "large alone"):
        k = w[name]
        lines.append(f"| {name} | {k['wall_time_s']:.1f} | {k['training_flops'] / 1e9:,.1f} | "
                     f"{k['base_steps']} | {k['motivated_steps']} | "
                     f"{k['base_test_accuracy']:.3f} | {k['motivated_test_accuracy']:.3f} |")
      lines += ["", f"Motivated run / large alone: wall time {w['wall_time_ratio']:.3f}, "
                    f"FLOPs {w['flops_ratio']:.3f}."]
    if "overhead" in r:
      lines += [""] + overhead_markdown(r["overhead"])
  if results.get("accelerator"):
    lines += ["", "## Accelerator step times", "",
              "Each kind's compiled step (`run.train_steps`) on one batch of TFDS mock data, "
              f"median of the trials' mean over {results['accelerator'][0]['calls']} calls. "
              "MFU: the step's FLOPs (XLA's cost "
              "analysis) per second over the chip's dense peak (`PEAK_FLOPS`: float32 at "
              "the TF32 tensor-core rate, JAX's default precision there). Step GiB: XLA's "
              "buffer assignment for one call (arguments, outputs and temporaries, less "
              "what is written in place); process peak: the device's `peak_bytes_in_use` "
              "so far, rows in the order run. Setup: `train.setup`, compiles included.",
              "",
              "| model | dtype | kind | batch | ms/step | GFLOPs | peak TFLOP/s | MFU "
              "| step GiB | process peak GiB | setup s |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(value, spec):
      return "-" if value is None else format(value, spec)

    for a in results["accelerator"]:
      lines.append(f"| {a['model']} | {a['dtype']} | {a['kind']} | {a['batch']} | "
                   f"{a['step_ms']:.2f} | {a['flops'] / 1e9:,.1f} | "
                   f"{cell(a['peak_flops'] and a['peak_flops'] / 1e12, '.1f')} | "
                   f"{cell(a['mfu'], '.1%')} | {cell(a['step_memory_gib'], '.3f')} | "
                   f"{cell(a['peak_memory_gib'], '.2f')} | {a['setup_s']:.0f} |")
  if results.get("lm_steps"):
    from benchmarks import lm_steps
    lines += ["", f"## Language-model steps ({results['lm_steps']['config_file']})", ""]
    lines += lm_steps.table(results["lm_steps"])
  if results.get("note"):
    lines += ["", results["note"]]
  return "\n".join(lines) + "\n"
