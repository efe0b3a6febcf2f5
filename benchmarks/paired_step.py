r"""The paired base step against an ordinary step of the user's small module.

  python -m benchmarks.paired_step [--trials=15] [--large=1024,512] \
      [--out=benchmarks/results/paired_step_cpu]

A user's Linen MLP (examples/byom_models.py: Dense, BatchNorm, dropout; widths
(256, 128) in (1024, 512)) on digits-sized batches of 128: the compiled base
step of ``nesting.paired`` (``steps.make_train_steps``, state donated) against
the step a user who trained the small module alone would write (the harness's
``standalone_train_step``, with the same optimizer, loss, batch and the same
dropout keys). Each trial times both back to back, alternating which goes
first; the figure is the median per-trial ratio. Target <= 1.05 (issue 25).
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
            large_widths: tuple[int, ...] = (1024, 512)) -> dict:
  """``large_widths``: the large module's widths (the small one's are (256, 128))."""
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(batch_size, 8, 8, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, size=(batch_size,)), jnp.int32)}
  small, large = MLP((256, 128)), MLP(tuple(large_widths))
  model = nesting.paired(small, large, batch["image"])
  optimizer = optax.adamw(1e-3)
  wmap = nesting.weights_map(model, batch["image"], subnet="motivated")
  paired_step = steps.make_train_steps(model, optimizer, wmap=wmap, seed=SEED)["base"]
  state = steps.create_train_state(model, optimizer, jax.random.key(0), batch["image"])
  ordinary = _ordinary_step(small, optimizer)
  variables = jax.tree.map(jnp.copy, nesting.export(state.variables("base"), "base", wmap))
  opt_state = optimizer.init(variables["params"])

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
  return {"ratio": statistics.median(ratios), "target": 1.05,
          "paired_step_us": 1e6 * statistics.median(times["paired"]),
          "ordinary_step_us": 1e6 * statistics.median(times["ordinary"]),
          "trials": trials, "steps_per_trial": steps_per_trial, "batch_size": batch_size,
          "model": f"examples.byom_models:MLP widths (256, 128) in {tuple(large_widths)}",
          "machine": describe_machine(), "date": time.strftime("%Y-%m-%d")}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser()
  parser.add_argument("--trials", type=int, default=15)
  parser.add_argument("--large", default="1024,512",
                      help="the large module's widths, comma-separated")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  result = measure(args.trials, large_widths=tuple(int(w) for w in args.large.split(",")))
  print(f"paired base step / ordinary small-module step: {result['ratio']:.3f} "
        f"({result['paired_step_us']:.0f} us vs {result['ordinary_step_us']:.0f} us; "
        f"target <= 1.05)")
  if args.out:
    with open(args.out + ".json", "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
