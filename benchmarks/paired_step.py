r"""The paired base step against an ordinary step of the user's small module.

  python -m benchmarks.paired_step [--trials=15] [--large=1024,512] \
      [--state_layout=blocks] [--out=benchmarks/results/paired_step_cpu]

A user's Linen MLP (examples/byom_models.py: Dense, BatchNorm, dropout; widths
(256, 128) in (1024, 512)) on digits-sized batches of 128: the compiled base
step of ``nesting.paired`` (``steps.make_train_steps``, state donated) against
the step a user who trained the small module alone would write (the harness's
``standalone_train_step``, with the same optimizer, loss, batch and the same
dropout keys). Each trial times both back to back, alternating which goes
first; the figure is the median per-trial ratio. Target <= 1.05 (issue 25).

``--state_layout`` (``steps.STATE_LAYOUTS``): how the pair's state holds the
base ("in_place": a slice of each whole leaf, written back in place; "blocks":
apart, docs/choices.md "State layout"). ``--motivated`` also times the
motivated step of that layout against the in-place one (the price of blocks).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import describe_machine  # noqa: E402
from examples.byom_models import MLP  # noqa: E402
from motivation_jax import nesting, steps  # noqa: E402

SEED = 0


def _ordinary_step(module, optimizer):
  """``benchmarks.step_cost._standalone_step`` with the dropout keys the paired step draws."""
  def step(variables, opt_state, batch, t):
    rngs = steps.batch_rngs(SEED, t, "base")

    def objective(params):
      logits, mutated = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                     batch["image"], train=True, mutable=["batch_stats"],
                                     rngs=rngs)
      return steps.cross_entropy_loss(logits, batch["label"]), (logits, mutated["batch_stats"])
    (loss, (logits, stats)), grads = jax.value_and_grad(objective, has_aux=True)(
        variables["params"])
    updates, new_opt_state = optimizer.update(grads, opt_state, variables["params"])
    params = optax.apply_updates(variables["params"], updates)
    params, stats, opt_state = steps.keep_finite_update(
        steps.all_finite(loss, grads), (params, stats, new_opt_state),
        (variables["params"], variables["batch_stats"], opt_state))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return {"params": params, "batch_stats": stats}, opt_state, {"loss": loss,
                                                                 "accuracy": accuracy}
  return jax.jit(step, donate_argnums=(0, 1))


def measure(trials: int = 15, steps_per_trial: int = 200, batch_size: int = 128,
            large_widths: tuple[int, ...] = (1024, 512), state_layout: str = "in_place",
            motivated: bool = False) -> dict:
  """``large_widths``: the large module's widths (the small one's are (256, 128))."""
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(batch_size, 8, 8, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, size=(batch_size,)), jnp.int32)}
  small, large = MLP((256, 128)), MLP(tuple(large_widths))
  model = nesting.paired(small, large, batch["image"])
  optimizer = optax.adamw(1e-3)
  wmap = nesting.weights_map(model, batch["image"], subnet="motivated")
  paired_steps = steps.make_train_steps(model, optimizer, wmap=wmap, seed=SEED,
                                        state_layout=state_layout)
  paired_step = paired_steps["base"]
  state = steps.create_train_state(model, optimizer, jax.random.key(0), batch["image"])
  ordinary = _ordinary_step(small, optimizer)
  variables = jax.tree.map(jnp.copy, nesting.export(state.variables("base"), "base", wmap))
  opt_state = optimizer.init(variables["params"])
  convert = steps.make_order_converters(optimizer, wmap=wmap, state_layout=state_layout)
  logical_state = jax.tree.map(jnp.copy, state)
  state = convert["storage"](state)
  result = {}
  if motivated:
    result["motivated"] = _motivated_ratio(
        paired_steps["motivated"], jax.tree.map(jnp.copy, state),
        steps.make_train_steps(model, optimizer, wmap=wmap, seed=SEED)["motivated"],
        logical_state, batch, trials, steps_per_trial // 4)

  def run_paired(n):
    nonlocal state
    start = time.perf_counter()
    for _ in range(n):
      state, metrics = paired_step(state, batch)
    metrics["loss"].block_until_ready()
    return (time.perf_counter() - start) / n

  def run_ordinary(n):
    nonlocal variables, opt_state
    start = time.perf_counter()
    for t in range(n):
      variables, opt_state, metrics = ordinary(variables, opt_state, batch, t)
    metrics["loss"].block_until_ready()
    return (time.perf_counter() - start) / n

  run_paired(5), run_ordinary(5)  # compile and warm up
  ratios, times = [], {"paired": [], "ordinary": []}
  for trial in range(trials):
    order = (run_paired, run_ordinary) if trial % 2 == 0 else (run_ordinary, run_paired)
    got = {fn.__name__: fn(steps_per_trial) for fn in order}
    times["paired"].append(got["run_paired"])
    times["ordinary"].append(got["run_ordinary"])
    ratios.append(got["run_paired"] / got["run_ordinary"])
  return {**result, "ratio": statistics.median(ratios), "target": 1.05,
          "state_layout": state_layout,
          "paired_step_us": 1e6 * statistics.median(times["paired"]),
          "ordinary_step_us": 1e6 * statistics.median(times["ordinary"]),
          "trials": trials, "steps_per_trial": steps_per_trial, "batch_size": batch_size,
          "model": f"examples.byom_models:MLP widths (256, 128) in {tuple(large_widths)}",
          "machine": describe_machine(), "date": time.strftime("%Y-%m-%d")}


def _motivated_ratio(step, state, in_place_step, in_place_state, batch, trials, n) -> dict:
  """The motivated step of ``state``'s layout against the in-place layout's."""
  states = {"layout": state, "in_place": in_place_state}
  fns = {"layout": step, "in_place": in_place_step}

  def run(name):
    start = time.perf_counter()
    for _ in range(n):
      states[name], metrics = fns[name](states[name], batch)
    metrics["loss"].block_until_ready()
    return (time.perf_counter() - start) / n

  run("layout"), run("in_place")
  times = {"layout": [], "in_place": []}
  for trial in range(trials):
    for name in (("layout", "in_place") if trial % 2 == 0 else ("in_place", "layout")):
      times[name].append(run(name))
  ratios = [a / b for a, b in zip(times["layout"], times["in_place"])]
  return {"ratio_to_in_place": statistics.median(ratios),
          "step_us": 1e6 * statistics.median(times["layout"]),
          "in_place_step_us": 1e6 * statistics.median(times["in_place"])}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser()
  parser.add_argument("--trials", type=int, default=15)
  parser.add_argument("--large", default="1024,512",
                      help="the large module's widths, comma-separated")
  parser.add_argument("--state_layout", default="in_place", choices=steps.STATE_LAYOUTS)
  parser.add_argument("--motivated", action="store_true",
                      help="also time the motivated step against the in-place layout's")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  result = measure(args.trials, large_widths=tuple(int(w) for w in args.large.split(",")),
                   state_layout=args.state_layout, motivated=args.motivated)
  print(f"paired base step ({args.state_layout}) / ordinary small-module step: "
        f"{result['ratio']:.3f} ({result['paired_step_us']:.0f} us vs "
        f"{result['ordinary_step_us']:.0f} us; target <= 1.05)")
  if args.motivated:
    m = result["motivated"]
    print(f"motivated step ({args.state_layout}) / in place: {m['ratio_to_in_place']:.3f} "
          f"({m['step_us']:.0f} us vs {m['in_place_step_us']:.0f} us)")
  if args.out:
    with open(args.out + ".json", "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
