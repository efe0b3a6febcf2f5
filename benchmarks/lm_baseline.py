"""A plain language-model training loop: the reference the motivated run is held to.

  .venv/bin/python benchmarks/lm_baseline.py --shape=motivated --steps=2000 \
      --out=benchmarks/results/lm_baseline_cpu

trains one ``models.transformer.Transformer`` on every batch with its own
flax/optax loop (no package train steps, no controller), byte-level on the
Shakespeare corpus (``data.text``), and evaluates the held-out plays in full:
nanoGPT's CPU recipe (batch 12, context 64, AdamW beta2 0.99, weight decay
0.1, lr 1e-3 with 100 warm-up steps then cosine to 1e-4, no dropout, tied
embeddings). ``--shape=motivated`` is that recipe's model (4 layers, 4 heads
of 32, width 128, FFN 512); ``--shape=base`` the draft lm_shakespeare base (4
layers, 2 heads, FFN 128: docs/lm_design_notes.md), trained alone: the number
the base of a motivated run should come near. Writes ``OUT.json`` and
``OUT.md`` with the machine named; times are wall-clock seconds of this one
process (compile included in ``train_s``, reported apart as well).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from motivation_jax.data import text  # noqa: E402
from motivation_jax.models import transformer  # noqa: E402

SHAPES = {
    "motivated": dict(num_heads=4, ffn_dim=512, num_layers=4),
    "base": dict(num_heads=2, ffn_dim=128, num_layers=4),
}


def make_model(shape: str, vocab_size: int, seq_len: int) -> transformer.Transformer:
  return transformer.Transformer(vocab_size=vocab_size, d_model=128, head_dim=32,
                                 seq_len=seq_len, **SHAPES[shape])


def make_optimizer(steps: int, *, lr: float = 1e-3, final_lr: float = 1e-4,
                   warmup: int = 100) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, steps // 2), steps,
                                                end_value=final_lr)
  return optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=0.1)


def next_token_loss(logits_BxLxV, targets_BxL, mask_BxL=None):
  """(sum of nats over the targets, number of targets)."""
  nats = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
  mask = jnp.ones_like(nats) if mask_BxL is None else mask_BxL
  return (nats * mask).sum(), mask.sum()


def train_and_evaluate(shape: str, steps: int, *, batch_size: int = 12, seq_len: int = 64,
                       eval_batch_size: int = 128, seed: int = 0, log_every: int = 250):
  dataset = text.load_text_dataset("shakespeare")
  model = make_model(shape, dataset.vocab_size, seq_len)
  batches = text.TextTrainBatches(dataset, batch_size, seq_len=seq_len, seed=seed)
  evals = text.TextEvalBatches(dataset, eval_batch_size, seq_len=seq_len)
  optimizer = make_optimizer(steps)
  params = model.init(jax.random.key(seed), jnp.zeros((1, seq_len), jnp.int32))["params"]
  opt_state = optimizer.init(params)

  @jax.jit
  def train_step(params, opt_state, tokens):
    def loss_fn(p):
      total, count = next_token_loss(model.apply({"params": p}, tokens[:, :-1]), tokens[:, 1:])
      return total / count
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def eval_step(params, tokens, mask):
    return next_token_loss(model.apply({"params": params}, tokens[:, :-1]), tokens[:, 1:], mask)

  start = time.perf_counter()
  params, opt_state, loss = train_step(params, opt_state, jnp.asarray(batches[0]["tokens"]))
  loss.block_until_ready()
  compile_s = time.perf_counter() - start
  losses = []
  for t in range(1, steps):
    params, opt_state, loss = train_step(params, opt_state, jnp.asarray(batches[t]["tokens"]))
    if t % log_every == 0 or t == steps - 1:
      losses.append((t, float(loss)))  # a sync every log_every steps only
      print(f"step {t}: train loss {losses[-1][1]:.3f} nats/byte", flush=True)
  jax.block_until_ready(params)
  train_s = time.perf_counter() - start
  start = time.perf_counter()
  total = count = 0.0
  for b in range(len(evals)):
    batch = evals[b]
    s, n = eval_step(params, jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"]))
    total, count = total + float(s), count + float(n)
  eval_s = time.perf_counter() - start
  nats = total / count
  return {
      "shape": shape, "model": transformer.describe(model)["kwargs"],
      "params": transformer.param_count(model), "steps": steps, "batch_size": batch_size,
      "seq_len": seq_len, "train_tokens_seen": steps * batch_size * seq_len,
      "eval_nats_per_byte": nats / evals.bytes_per_token,
      "eval_bits_per_byte": text.bits_per_byte(nats, evals.bytes_per_token),
      "eval_targets": int(count), "final_train_loss": losses[-1][1] if losses else None,
      "train_losses": losses, "compile_s": compile_s, "train_s": train_s, "eval_s": eval_s,
      "tokens_per_s": (steps - 1) * batch_size * seq_len / max(train_s - compile_s, 1e-9),
      "flops_per_token": transformer.flops_per_token(model),
  }


def _machine() -> str:
  cpus = os.cpu_count()
  model = ""
  try:
    with open("/proc/cpuinfo") as f:
      model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return (f"{platform.machine()} CPU, {cpus} cores ({model}), JAX {jax.__version__} on "
          f"{jax.devices()[0].platform}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shape", choices=sorted(SHAPES), nargs="+", default=["motivated"])
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--note", default="", help="How loaded the machine was, etc.")
  parser.add_argument("--out", default=None, help="Write OUT.json and OUT.md.")
  args = parser.parse_args(argv)
  rows = [train_and_evaluate(shape, args.steps, seed=args.seed) for shape in args.shape]
  for row in rows:
    print(f"{row['shape']}: {row['params']:,} params, {row['steps']} steps, held-out "
          f"{row['eval_bits_per_byte']:.3f} bits/byte ({row['eval_nats_per_byte']:.3f} "
          f"nats/byte), train {row['train_s']:.0f} s (compile {row['compile_s']:.1f} s), "
          f"{row['tokens_per_s']:,.0f} tokens/s")
  if args.out:
    record = {"machine": _machine(), "note": args.note,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
      json.dump(record, f, indent=2)
    lines = [f"# LM baseline: plain loop, byte-level Shakespeare", "",
             f"{record['machine']}; {record['date']}. {args.note}", "",
             "| shape | params | steps | held-out bits/byte | nats/byte | train s | "
             "compile s | tokens/s |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['params']:,} | {r['steps']} | {r['eval_bits_per_byte']:.3f} "
              f"| {r['eval_nats_per_byte']:.3f} | {r['train_s']:.0f} | {r['compile_s']:.1f} | "
              f"{r['tokens_per_s']:,.0f} |" for r in rows]
    with open(args.out + ".md", "w") as f:
      f.write("\n".join(lines) + "\n")
  return rows


if __name__ == "__main__":
  main()
