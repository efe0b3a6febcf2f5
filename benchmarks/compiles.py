"""Item 4 of the harness (benchmarks/run.py): XLA compilations by program over a
whole ``train_and_evaluate`` with hundreds of switches between the step kinds
(exactly one per kind is the target), and each kind's start-up compile time.

``CompileLog`` also counts the compilations of the harness's other runs
(``run.measure_model``): setup, and none in the loop trials after it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from benchmarks.common import Mode, loop_config
from motivation_jax import train

_COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
                   "/jax/core/compile/backend_compile_duration": "compile"}


class CompileLog:
  """Records JAX's compile events (``jax.monitoring``) while active: how many
  XLA compilations each program had, and the seconds spent tracing, lowering
  and compiling it. A persistent-cache hit counts as a compilation too (JAX
  reports it through the same event), which is what a count of programs wants."""

  def __init__(self):
    self.events: list[tuple[str, str, float]] = []  # (phase, program, seconds)

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    if event in _COMPILE_EVENTS:
      self.events.append((_COMPILE_EVENTS[event], str(kwargs.get("fun_name", "?")), duration))

  def __enter__(self) -> CompileLog:
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_duration_listener(self._listen)

  def compiles(self) -> dict[str, int]:
    counts: dict[str, int] = {}
    for phase, name, _ in self.events:
      if phase == "compile":
        counts[name] = counts.get(name, 0) + 1
    return counts

  def seconds(self, program: str) -> float:
    return sum(s for _, name, s in self.events if program in name)


def step_kind_of(program: str) -> str | None:
  """The step kind a compiled program is, from its name (``jit(base_train_step)``)."""
  if "base_train_step" in program:
    return "base"
  if "motivated_train_step" in program or "both_train_step" in program:
    return "motivated"
  return None


def compiles_per_kind(counts: dict[str, int]) -> dict[str, int]:
  per_kind = {"base": 0, "motivated": 0}
  for program, n in counts.items():
    kind = step_kind_of(program)
    if kind:
      per_kind[kind] += n
  return per_kind


def measure_compiles(config, mode: Mode, workdir: str) -> dict[str, Any]:
  """Compilations over one whole ``train_and_evaluate`` with hundreds of switches."""
  config = loop_config(config, mode.switch_batches)
  config.log_every_steps = max(1, min(config.log_every_steps, 50))
  with CompileLog() as log:
    summary = train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "decisions.jsonl")) as f:
    kinds = [json.loads(line)["kind"] for line in f]
  counts = log.compiles()
  return {
      "batches": len(kinds),
      "switches": sum(a != b for a, b in zip(kinds, kinds[1:])),
      "motivated_batches": summary["motivated_steps"],
      "compiles_per_kind": compiles_per_kind(counts),
      "compiles_by_program": counts,
      "startup_compile_s": {kind: sum(s for _, name, s in log.events
                                      if step_kind_of(name) == kind)
                            for kind in ("base", "motivated")},
  }
