r"""The language-model steps against the steps of the two transformers alone.

  python -m benchmarks.lm_steps [--config=configs/lm_shakespeare.py[:variant]] \
      [--trials=9] [--out=benchmarks/results/lm_steps_BACKEND]

For an LM config's nested transformer (``config.model.name = "transformer"``),
the compiled base step (``steps.make_train_steps`` with ``tasks.CAUSAL_LM``,
state donated) against the ordinary step of the standalone base transformer
(``model.standalone("base")``: its own parameters and optimizer state, the same
optimizer with its clipping, loss, batch, dtype, dropout keys and non-finite
rule), and the motivated step against the standalone large transformer's. Each
trial times the four back to back, in an order that changes from trial to
trial; a ratio is the median per-trial ratio. Target <= 1.05 (issues 26, 27).

Also: tokens/s of each step; each step's FLOPs from XLA's cost analysis
against the formula (``transformer.flops_per_token``: 6 N plus attention,
times the tokens of a batch); and, where the device's peak is known
(``benchmarks.accelerator.PEAK_FLOPS``), model FLOPs utilisation from the
formula's FLOPs. The batch is ``config.batch_size`` windows of ``seq_len + 1``
random byte-level tokens: a step's time does not depend on the text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.accelerator import peak_flops, step_memory_bytes  # noqa: E402
from benchmarks.common import (describe_machine, interleaved_times, load_config,  # noqa: E402
                               median)
from motivation_jax import models, nesting, steps, tasks  # noqa: E402
from motivation_jax.errors import ConfigError  # noqa: E402
from motivation_jax.models import transformer  # noqa: E402

VOCAB = 256  # byte-level
KINDS = ("base", "motivated")


def ordinary_lm_step(module, optimizer, seed: int, subnet: str) -> Callable:
  """The train step a user who trained ``module`` alone would write: next-token
  cross-entropy (``tasks.CAUSAL_LM``'s loss), the optimizer, and the package's
  rule for a non-finite batch (like for like, so a ratio measures the nesting
  alone), with the dropout keys the nested step of ``subnet`` draws."""
  def step(params, opt_state, batch, t):
    rngs = steps.batch_rngs(seed, t, subnet)

    def objective(p):
      logits = module.apply({"params": p}, tasks.CAUSAL_LM.inputs(batch), deterministic=False,
                            rngs=rngs)
      return tasks.CAUSAL_LM.loss(logits, batch), logits
    (loss, logits), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    new_params, _, opt_state = steps.keep_finite_update(  # a transformer has no statistics
        steps.all_finite(loss, grads), (new_params, {}, new_opt_state), (params, {}, opt_state))
    return new_params, opt_state, {"loss": loss,
                                   "accuracy": tasks.CAUSAL_LM.accuracy(logits, batch)}
  return jax.jit(step, donate_argnums=(0, 1))


def measure(config, *, trials: int = 9, step_seconds: float = 0.5) -> dict[str, Any]:
  """The four steps of ``config``'s LM pair, timed; see the module docstring."""
  if config.get("task") != "causal_lm" or config.model.name != "transformer":
    raise ConfigError("benchmarks.lm_steps needs an LM config (config.task='causal_lm', "
                      f"config.model.name='transformer'); got task={config.get('task')!r}, "
                      f"model {config.model.name!r}")
  model = models.build_model(config.model, VOCAB, dtype=config.dtype)
  batch_size, length = config.batch_size, config.model.seq_len
  tokens_per_step = batch_size * length
  rng = np.random.default_rng(0)
  batch = {"tokens": jnp.asarray(rng.integers(0, VOCAB, (batch_size, length + 1)), jnp.int32)}
  sample = batch["tokens"][:1, :-1]
  optimizer = steps.make_optimizer(config, config.num_train_steps, config.num_train_steps)
  wmap = nesting.weights_map(model, sample, subnet="motivated")
  nested = steps.make_train_steps(model, optimizer, wmap=wmap, task=tasks.CAUSAL_LM,
                                  seed=config.seed)
  state0 = steps.create_train_state(model, optimizer, jax.random.key(config.seed), sample)
  holder: dict[str, Any] = {}
  runners: dict[str, Callable[[int], None]] = {}
  out: dict[str, Any] = {}
  device = jax.devices()[0]
  peak = peak_flops(device, str(jnp.dtype(config.dtype).name))
  for kind in KINDS:
    compiled = nested[kind].lower(state0, batch).compile()
    holder[f"nested {kind}"] = jax.tree.map(jnp.copy, state0)

    def nested_runner(k, kind=kind, compiled=compiled):
      state = holder[f"nested {kind}"]
      for _ in range(k):
        state, metrics = compiled(state, batch)
      holder[f"nested {kind}"] = jax.block_until_ready(state)
    runners[f"nested {kind}"] = nested_runner

    standalone = model.standalone(kind)
    params = jax.tree.map(jnp.copy, nesting.export(state0.variables(kind), kind, wmap)["params"])
    opt_state = optimizer.init(params)
    ordinary = ordinary_lm_step(standalone, optimizer, config.seed, kind)
    alone = ordinary.lower(params, opt_state, batch, 0).compile()
    holder[f"standalone {kind}"] = (params, opt_state)

    def standalone_runner(k, kind=kind, alone=alone):
      params, opt_state = holder[f"standalone {kind}"]
      for t in range(k):
        params, opt_state, metrics = alone(params, opt_state, batch, t)
      holder[f"standalone {kind}"] = jax.block_until_ready((params, opt_state))
    runners[f"standalone {kind}"] = standalone_runner

    formula = transformer.flops_per_token(standalone, seq_len=length) * tokens_per_step
    out[kind] = {"params": int(sum(x.size for x in jax.tree.leaves(params))),
                 "nested_flops": steps.compiled_flops(compiled),
                 "standalone_flops": steps.compiled_flops(alone),
                 "formula_flops": formula,
                 "nested_memory_bytes": step_memory_bytes(compiled),
                 "standalone_memory_bytes": step_memory_bytes(alone)}

  # Steps of 30-400 ms here: a shorter warm-up and probe than the harness's.
  times, repeats = interleaved_times(runners, trials, step_seconds, warmup=1, probe=2,
                                     least=2)
  for kind in KINDS:
    n, a = times[f"nested {kind}"], times[f"standalone {kind}"]
    r = out[kind]
    r.update(ratio=median(x / y for x, y in zip(n, a)), nested_ms=median(n) * 1e3,
             standalone_ms=median(a) * 1e3,
             nested_tokens_per_s=tokens_per_step / median(n),
             standalone_tokens_per_s=tokens_per_step / median(a),
             xla_over_formula=r["nested_flops"] / r["formula_flops"],
             mfu=(r["formula_flops"] / median(n) / peak) if peak else None)
  return {"config": {"model": {k: (dict(v) if hasattr(v, "items") else v)
                               for k, v in config.model.items()},
                     "batch_size": batch_size, "dtype": str(config.dtype),
                     "optimizer": config.optimizer, "grad_clip_norm": config.grad_clip_norm},
          "tokens_per_step": tokens_per_step, "trials": trials, "repeats": repeats,
          "peak_flops": peak, "device": device.device_kind, **out,
          "machine": describe_machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                               time.gmtime())}


def table(r: dict[str, Any]) -> list[str]:
  """The measurement's lines of markdown (here and in the harness's report)."""
  lines = [f"Batch {r['config']['batch_size']} x {r['config']['model']['seq_len']} tokens, "
           f"{r['config']['dtype']}, {r['trials']} trials; the nested steps of "
           f"`steps.make_train_steps` against ordinary steps of the standalone transformers.",
           "",
           "| step | params | nested ms | standalone ms | ratio (target <= 1.05) "
           "| tokens/s | XLA FLOPs / formula | MFU |", "|---|---|---|---|---|---|---|---|"]
  for kind in KINDS:
    k = r[kind]
    mfu = "" if k["mfu"] is None else f"{k['mfu']:.1%}"
    lines.append(f"| {kind} | {k['params']:,} | {k['nested_ms']:.2f} | {k['standalone_ms']:.2f} "
                 f"| {k['ratio']:.3f} | {k['nested_tokens_per_s']:,.0f} "
                 f"| {k['xla_over_formula']:.3f} | {mfu} |")
  if r["peak_flops"] is None:
    lines.append("\nMFU: the device's peak is not known here (benchmarks.accelerator.PEAK_FLOPS).")
  return lines


def markdown(r: dict[str, Any]) -> str:
  m = r["machine"]
  lines = [f"# LM steps: nested against standalone ({r['device']})", "",
           f"`{r['command']}`: {m['cpu']}, {m['cores']} cores; JAX {m['jax']} on "
           f"{m['backend']}; {r['date']}.", ""]
  return "\n".join(lines + table(r)) + "\n"


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/lm_shakespeare.py")
  parser.add_argument("--trials", type=int, default=9)
  parser.add_argument("--out", default=None, help="writes OUT.json and OUT.md")
  args = parser.parse_args(argv)
  result = measure(load_config(args.config), trials=args.trials)
  result["command"] = "python -m benchmarks.lm_steps " + " ".join(
      argv if argv is not None else sys.argv[1:])
  text = markdown(result)
  print(text)
  if args.out:
    with open(args.out + ".json", "w") as f:
      json.dump(result, f, indent=2)
    with open(args.out + ".md", "w") as f:
      f.write(text)
  return result


if __name__ == "__main__":
  main()
