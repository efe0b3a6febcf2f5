"""Item 2 of the harness (benchmarks/run.py): each compiled step kind against an
ordinary train step of its standalone model.

The reference (``standalone_train_step``) is written here as any Flax user who
trained that model alone would write it, independent of ``steps.py``, with the
same optimizer, loss, batch and dtype. Also priced: the package's non-finite
rule on the standalone steps, the state the base step carries beyond the
standalone one (``carrying_train_step``), and the schedule's learning rate
(``constant_lr_optimizer``). benchmarks/paired_step.py reuses the reference step.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from benchmarks.common import Mode, fresh_state, interleaved_times, median
from motivation_jax import models, nesting, steps, train

def standalone_train_step(module, optimizer, *, check: bool = True) -> Callable:
  """An ordinary Flax train step of a plain model, as a user who trained that
  model alone would write it (independent of ``steps.py``): the reference.
  ``check=False``: without the package's non-finite rule, to price that rule."""
  return jax.jit(_standalone_step(module, optimizer, check), donate_argnums=(0, 1))


def carrying_train_step(module, optimizer) -> Callable:
  """The standalone step that also takes and returns ``carried`` (a list whose
  first entry is the batch counter, which it increments): what a base step
  costs beyond the standalone one for carrying the state it leaves alone."""
  step = _standalone_step(module, optimizer)

  def carry(variables, opt_state, carried, batch):
    variables, opt_state, metrics = step(variables, opt_state, batch)
    return variables, opt_state, [carried[0] + 1, *carried[1:]], metrics
  return jax.jit(carry, donate_argnums=(0, 1, 2))


def carried_leaves(state: steps.TrainState, wmap: nesting.WeightsMap, optimizer) -> list:
  """The leaves of ``state`` a standalone base step has no counterpart of: the
  batch counter, the leaves outside the base (params, parameter-shaped
  optimizer state, the base's statistics) and the motivated statistics."""
  outside = lambda tree, regions: [x for r, x in zip(jax.tree.leaves(regions),
                                                     jax.tree.leaves(tree)) if not r.in_base]
  leaves = [state.step, *outside(state.params, wmap.params),
            *outside(state.opt_state, nesting.opt_state_regions(optimizer, wmap.params)),
            *outside(state.subnet_stats("base"), wmap["batch_stats"])]
  if state.batch_norm_stats == "per_subnet":
    leaves += jax.tree.leaves(state.batch_stats["motivated"])
  return leaves


def kernels(compiled) -> int:
  """Operations the CPU runtime runs one by one in a compiled program: the
  entry computation's instructions that are not parameters, constants,
  tuples or bitcasts."""
  entry = compiled.as_text().split("\nENTRY", 1)[1]
  ops = re.findall(r"= \S+ ([\w-]+)\(", entry)
  return sum(op not in ("parameter", "constant", "tuple", "get-tuple-element", "bitcast")
             for op in ops)


def _standalone_step(module, optimizer, check: bool = True) -> Callable:
  def step(variables, opt_state, batch):
    def objective(params):
      logits, mutated = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                     batch["image"], train=True, mutable=["batch_stats"])
      return steps.cross_entropy_loss(logits, batch["label"]), (logits,
                                                                 mutated.get("batch_stats", {}))
    (loss, (logits, stats)), grads = jax.value_and_grad(objective, has_aux=True)(
        variables["params"])
    updates, new_opt_state = optimizer.update(grads, opt_state, variables["params"])
    params = optax.apply_updates(variables["params"], updates)
    if check:
      # The package's rule for a non-finite batch, as the motivated step applies
      # it: like for like, so the ratios measure the nesting alone.
      params, stats, opt_state = steps.keep_finite_update(
          steps.all_finite(loss, grads), (params, stats, new_opt_state),
          (variables["params"], variables["batch_stats"], opt_state))
    else:
      opt_state = new_opt_state
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return {"params": params, "batch_stats": stats}, opt_state, {"loss": loss,
                                                                 "accuracy": accuracy}
  return step


def measure_steps(run: train.Run, state0, mode: Mode) -> dict[str, Any]:
  """Each compiled step kind against its standalone model's step: the same batch
  (already on the device), optimizer and dtype; interleaved timed blocks."""
  config = run.config
  model = models.build_model(config.model, run.dataset.num_classes, dtype=config.dtype)
  optimizer = steps.make_optimizer(config, run.total_steps, run.train_data.steps_per_epoch)
  batch = run.put(run.train_data[0])
  runners: dict[str, Callable[[int], None]] = {}
  flops: dict[str, float] = {}
  holder = {"nested": fresh_state(state0)}

  def nested_runner(kind):
    fn = run.train_steps[kind]

    def go(k):
      state = holder["nested"]
      for _ in range(k):
        state, metrics = fn(state, batch)
      holder["nested"] = jax.block_until_ready(state)
    return go

  ops: dict[str, int] = {}
  for kind in ("base", "motivated"):
    runners[f"nested {kind}"] = nested_runner(kind)
    flops[f"nested {kind}"] = run.flops[kind]
    ops[f"nested {kind}"] = kernels(run.train_steps[kind])
    variables = nesting.export(state0.variables(kind), kind, run.wmap)
    variables.setdefault("batch_stats", {})
    variables = jax.tree.map(jnp.copy, variables)
    opt_state = optimizer.init(variables["params"])
    compiled = standalone_train_step(model.standalone(kind), optimizer).lower(
        variables, opt_state, batch).compile()
    flops[f"standalone {kind}"] = steps.compiled_flops(compiled)
    ops[f"standalone {kind}"] = kernels(compiled)
    holder[kind] = (variables, opt_state)

    def standalone_runner(kind=kind, compiled=compiled):
      def go(k):
        variables, opt_state = holder[kind]
        for _ in range(k):
          variables, opt_state, metrics = compiled(variables, opt_state, batch)
        holder[kind] = jax.block_until_ready((variables, opt_state))
      return go
    runners[f"standalone {kind}"] = standalone_runner()
    # The same without the non-finite rule: what the rule itself costs.
    unchecked = standalone_train_step(model.standalone(kind), optimizer, check=False).lower(
        variables, opt_state, batch).compile()
    ops[f"unchecked {kind}"] = kernels(unchecked)
    holder[f"unchecked {kind}"] = jax.tree.map(jnp.copy, (variables, opt_state))

    def unchecked_runner(kind=kind, compiled=unchecked):
      def go(k):
        variables, opt_state = holder[f"unchecked {kind}"]
        for _ in range(k):
          variables, opt_state, metrics = compiled(variables, opt_state, batch)
        holder[f"unchecked {kind}"] = jax.block_until_ready((variables, opt_state))
      return go
    runners[f"unchecked {kind}"] = unchecked_runner()

  # The base step's cost beyond the standalone one, in two parts: carrying the
  # state it leaves alone through the call, and writing the base region back.
  carried = [jnp.copy(x) for x in carried_leaves(state0, run.wmap, optimizer)]
  variables, opt_state = holder["base"]
  carrying = carrying_train_step(model.standalone("base"), optimizer).lower(
      *jax.tree.map(jnp.copy, (variables, opt_state)), carried, batch).compile()
  ops["carrying base"] = kernels(carrying)
  holder["carrying"] = (*jax.tree.map(jnp.copy, (variables, opt_state)), carried)

  def carrying_runner(k):
    variables, opt_state, carried = holder["carrying"]
    for _ in range(k):
      variables, opt_state, carried, metrics = carrying(variables, opt_state, carried, batch)
    holder["carrying"] = jax.block_until_ready((variables, opt_state, carried))
  runners["carrying base"] = carrying_runner

  # The same base step and standalone step with the schedule's peak as a
  # constant learning rate: on the CPU backend the schedule's scalar arithmetic
  # (a cosine) is fused into each in-place write-back of the base region, and
  # this pair shows what that costs.
  constant = constant_lr_optimizer(config)
  sample = jnp.zeros((1, *run.dataset.image_shape), jnp.float32)
  nested_constant = steps.make_train_steps(
      model, constant, wmap=run.wmap, normalisation=(run.dataset.mean, run.dataset.std))["base"]
  state_c = steps.create_train_state(model, constant, jax.random.key(0), sample,
                                     batch_norm_stats=config.model.batch_norm_stats)
  holder["nested constant"] = state_c
  compiled_c = nested_constant.lower(state_c, batch).compile()
  variables_c = nesting.export(state_c.variables("base"), "base", run.wmap)
  variables_c.setdefault("batch_stats", {})
  variables_c = jax.tree.map(jnp.copy, variables_c)
  holder["standalone constant"] = (variables_c, constant.init(variables_c["params"]))
  alone_c = standalone_train_step(model.standalone("base"), constant).lower(
      *holder["standalone constant"], batch).compile()

  def nested_constant_runner(k):
    state = holder["nested constant"]
    for _ in range(k):
      state, metrics = compiled_c(state, batch)
    holder["nested constant"] = jax.block_until_ready(state)

  def standalone_constant_runner(k):
    variables, opt_state = holder["standalone constant"]
    for _ in range(k):
      variables, opt_state, metrics = alone_c(variables, opt_state, batch)
    holder["standalone constant"] = jax.block_until_ready((variables, opt_state))
  runners["nested base, constant lr"] = nested_constant_runner
  runners["standalone base, constant lr"] = standalone_constant_runner

  times, _ = interleaved_times(runners, mode.trials, mode.step_seconds)
  out = {"trials": mode.trials}
  for kind in ("base", "motivated"):
    nested, alone = times[f"nested {kind}"], times[f"standalone {kind}"]
    out[kind] = {"ratio": median(a / b for a, b in zip(nested, alone)),
                 "nested_us": median(nested) * 1e6, "standalone_us": median(alone) * 1e6,
                 "nested_flops": flops[f"nested {kind}"],
                 "standalone_flops": flops[f"standalone {kind}"],
                 "nested_kernels": ops[f"nested {kind}"],
                 "standalone_kernels": ops[f"standalone {kind}"],
                 # The non-finite rule's own price: the standalone step with it
                 # against the same step without it.
                 "finite_check": {
                     "ratio": median(a / u for a, u in zip(alone, times[f"unchecked {kind}"])),
                     "unchecked_us": median(times[f"unchecked {kind}"]) * 1e6,
                     "unchecked_kernels": ops[f"unchecked {kind}"]}}
  nested, alone, carrying = (times[k] for k in ("nested base", "standalone base",
                                                "carrying base"))
  out["base"]["carrying"] = {
      "leaves": len(carried), "kernels": ops["carrying base"],
      # Every leaf of the state is either carried or has a standalone counterpart.
      "all_leaves_accounted": len(carried) + len(jax.tree.leaves(holder["base"])) == len(
          jax.tree.leaves(state0)),
      "us": median(carrying) * 1e6,
      "ratio_to_standalone": median(c / a for c, a in zip(carrying, alone)),
      "nested_ratio_to_carrying": median(n / c for n, c in zip(nested, carrying))}
  nested, alone = times["nested base, constant lr"], times["standalone base, constant lr"]
  out["base"]["constant_lr"] = {
      "ratio": median(n / a for n, a in zip(nested, alone)),
      "nested_us": median(nested) * 1e6, "standalone_us": median(alone) * 1e6}
  return out


def constant_lr_optimizer(config) -> optax.GradientTransformation:
  """``steps.make_optimizer``'s optimizer with its peak learning rate held
  constant (no schedule)."""
  if config.optimizer == "sgd":
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(config.learning_rate, momentum=config.momentum))
  return optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
