"""Pure train and eval steps for the two sub-networks over one variables pytree.

``make_train_steps`` returns ``{"base": fn, "motivated": fn}``; each ``fn`` is
``(state, batch) -> (state, metrics)``, a pure function of pytrees, jitted once
with the state donated. A host-side controller picks which one to call; the two
compiled programs never retrace when the choice switches.

A base step:

1. takes the base view of the parameters, the batch statistics and every
   parameter-shaped optimizer-state entry (``nesting.base_view``);
2. runs the base forward/backward and the optimizer on those base-sized arrays,
   exactly as an ordinary step of the standalone base model would;
3. writes the results back with ``nesting.merge_base``, so every entry outside
   the base region is bit-identical before and after.

A batch whose loss or any gradient is not finite (NaN or inf) is not applied:
every step leaves ``params``, ``batch_stats`` and ``opt_state`` bit-identical
to before that batch (under policy ``both``, both halves or neither) and says
so in its ``nonfinite`` metric (a boolean). ``step``, the count of batches
seen, still advances, so the data position, the controller and the state keep
one batch count; the optimizer's own count, and with it the learning-rate
schedule, stays (it counts updates applied). The check is a select inside the
compiled step (``keep_if``): no host sync.

Under FSDP (a ``state_sharding`` that splits leaves) the steps read and write
the state in a storage order (``TrainState.order``; ``make_order_converters``
converts; docs/sharding.md): the base's rows of a split leaf come first in
every device's shard, so the base step's views and write-backs move nothing,
and it moves what an FSDP step of the standalone base moves.

Its compiled cost is the standalone base model's; the motivated step's is the
standalone motivated model's (tests/test_step_costs.py checks both against XLA's
cost analysis).

The batch is what the ``task`` says (``motivation_jax.tasks``): for
classification (the default) a dict with ``image`` (NHWC or NC) and ``label``
(int), eval batches may carry ``mask`` (1 for real examples, 0 for padding);
for causal language modelling ``tokens`` int [B, L+1] (and ``mask`` [B, L]). The steps
that ``make_train_steps``, ``make_eval_steps`` and
``recalibration.make_recalibrate`` build take ``image`` either as float,
already normalised (used as it is), or as uint8 pixels, which they normalise on
the device with the ``normalisation=(mean, std)`` given when they are built
(``normalise_images``): the input pipeline copies a quarter of the bytes to the
device. The pure step functions below (``base_train_step`` ...) take floats.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from motivation_jax import nesting, tasks
from motivation_jax.common import POLICIES
from motivation_jax.errors import ConfigError

PyTree = Any
Batch = Mapping[str, jax.Array]
# config.model.batch_norm_stats: docs/choices.md says what each keeps and why
# "per_subnet" is the default.
BATCH_NORM_STATS = ("shared", "per_subnet")
OPTIMIZERS = ("sgd", "adamw")
# TrainState.order: "logical", every leaf in the models' own order (what
# checkpoints, export, evaluation and recalibration read); "storage", the split
# leaves in the per-device interleaved order the train steps of an FSDP run
# read and write (docs/sharding.md, "Storage order"; make_order_converters).
# "blocks", a state in the blocks layout (BlockState: STATE_LAYOUTS).
ORDERS = ("logical", "storage", "blocks")
# config.model.state_layout, make_train_steps(state_layout=): how the train
# steps hold the base's part of each leaf. "in_place": inside the whole leaf,
# a leading slice the base step reads and writes back in place; "blocks": apart,
# as an array of its own (BlockState), so that a base step is an ordinary step
# of the standalone base on its own arrays (docs/choices.md, "The state layout").
STATE_LAYOUTS = ("in_place", "blocks")
# Per-channel (mean, std) of uint8 images on the 0..255 scale (data.Dataset's).
Normalisation = tuple[Sequence[float], Sequence[float]]


@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and writes.

  ``batch_stats`` holds the batch-norm running statistics as
  ``batch_norm_stats`` (``config.model.batch_norm_stats``) says: ``"shared"``,
  one motivated-sized tree that the base reads through its view;
  ``"per_subnet"``, a dict ``{"base": tree, "motivated": tree}`` of two
  motivated-sized trees, each updated only by its own sub-network's steps.
  docs/choices.md explains the two.
  """
  step: jax.Array          # batches trained on so far (int32 scalar)
  params: PyTree           # the motivated model's parameters; the base is a view
  batch_stats: PyTree      # batch-norm statistics ({} for models without them)
  opt_state: PyTree
  batch_norm_stats: str = flax.struct.field(pytree_node=False, default="per_subnet")
  # ORDERS: static, so a state in one order cannot be passed where the other
  # is expected (the compiled steps' shardings name it) without an error.
  order: str = flax.struct.field(pytree_node=False, default="logical")

  def subnet_stats(self, subnet: str) -> PyTree:
    """The batch-norm statistics ``subnet`` evaluates with (full size)."""
    if self.batch_norm_stats == "per_subnet":
      return self.batch_stats[subnet]
    return self.batch_stats

  def with_subnet_stats(self, subnet: str, stats: PyTree) -> PyTree:
    """The ``batch_stats`` field with one sub-network's statistics replaced."""
    if self.batch_norm_stats == "per_subnet":
      return {**self.batch_stats, subnet: stats}
    return stats

  def variables(self, subnet: str) -> dict[str, PyTree]:
    """The variables ``model.apply(..., subnet=subnet)`` runs with (full size)."""
    return {"params": self.params, "batch_stats": self.subnet_stats(subnet)}


@flax.struct.dataclass
class BlockState(TrainState):
  """A ``TrainState`` in the blocks layout (``order="blocks"``, ``to_blocks``).

  ``params``, ``opt_state`` and ``batch_stats`` hold only the base's block of
  every leaf: the standalone base's shapes (an empty array for a leaf the base
  skips), in the logical tree's structure, so that a base step is the
  ordinary optimizer step of those arrays and nothing else. ``batch_stats`` is
  ``{"base": tree}`` with per-subnet statistics. ``extension`` holds the rest:
  ``{"params", "opt_state", "batch_stats"}``, each leaf a list of blocks
  (``nesting.Region.extension``), and the motivated model's own statistics
  whole. Only a motivated step (and ``from_blocks``) reads it.
  """
  extension: PyTree = None

  def variables(self, subnet: str) -> dict[str, PyTree]:
    """Refused: ``params`` here is only the base's part of each leaf, which an
    export or an ``apply`` would take for the whole."""
    raise ValueError("a state in the blocks layout holds the base's part of each leaf apart: "
                     "convert it to logical order first (steps.make_order_converters(..., "
                     "state_layout='blocks')['logical'])")


def to_blocks(state: TrainState, wmap: nesting.WeightsMap, opt_regions: PyTree) -> BlockState:
  """``state`` (logical order) in the blocks layout; ``opt_regions``:
  ``nesting.opt_state_regions(optimizer, wmap.params)``. Pure: jit it."""
  _check_order(state, "logical")
  p, s = wmap.params, wmap["batch_stats"]
  if state.batch_norm_stats == "per_subnet":
    stats = {"base": nesting.base_view(state.batch_stats["base"], s)}
    rest = {"base": nesting.extension_blocks(state.batch_stats["base"], s),
            "motivated": state.batch_stats["motivated"]}
  else:
    stats, rest = (nesting.base_view(state.batch_stats, s),
                   nesting.extension_blocks(state.batch_stats, s))
  return BlockState(
      step=state.step, params=nesting.base_view(state.params, p), batch_stats=stats,
      opt_state=nesting.base_view(state.opt_state, opt_regions),
      extension={"params": nesting.extension_blocks(state.params, p), "batch_stats": rest,
                 "opt_state": nesting.extension_blocks(state.opt_state, opt_regions)},
      batch_norm_stats=state.batch_norm_stats, order="blocks")


def from_blocks(state: BlockState, wmap: nesting.WeightsMap, opt_regions: PyTree) -> TrainState:
  """The inverse of ``to_blocks``: the state in logical order, bit for bit."""
  _check_order(state, "blocks")
  p, s, rest = wmap.params, wmap["batch_stats"], state.extension
  if state.batch_norm_stats == "per_subnet":
    stats = {"base": nesting.join_blocks(state.batch_stats["base"], rest["batch_stats"]["base"],
                                         s),
             "motivated": rest["batch_stats"]["motivated"]}
  else:
    stats = nesting.join_blocks(state.batch_stats, rest["batch_stats"], s)
  return TrainState(
      step=state.step, params=nesting.join_blocks(state.params, rest["params"], p),
      batch_stats=stats,
      opt_state=nesting.join_blocks(state.opt_state, rest["opt_state"], opt_regions),
      batch_norm_stats=state.batch_norm_stats, order="logical")


def create_train_state(model, optimizer: optax.GradientTransformation,
                       rng: jax.Array | int, sample_input: jax.Array, *,
                       batch_norm_stats: str = "per_subnet",
                       extension_init: str = "default",
                       state_sharding: PyTree = None) -> TrainState:
  """Initialises the one variables pytree at the motivated size
  (``extension_init``: see ``nesting.init_variables``). ``rng`` is a key, or
  an integer seed, for ``jax.random.key(seed)``: with ``state_sharding`` the
  key is then made inside the program (made on the host it costs two more).

  ``state_sharding`` (a ``TrainState`` of shardings, e.g.
  ``sharding.train_state_sharding`` of ``abstract_train_state``): the whole
  initialisation is one program whose outputs are laid out that way, so each
  device computes only its own shards and the state is never whole on one
  device. The values do not depend on the layout (JAX's random bits are
  partitionable: each element depends on the key and its index only).
  """
  if isinstance(rng, int) and not (state_sharding is not None and -2**31 <= rng < 2**31):
    rng = jax.random.key(rng)  # a seed a traced int32 cannot hold, or no program
  elif not isinstance(rng, int) and np.ndim(rng) == 0 and jnp.issubdtype(rng.dtype, jnp.integer):
    rng = jax.random.key(rng)  # the seed, traced in the program below
  if state_sharding is not None:
    create = functools.partial(create_train_state, model, optimizer,
                               sample_input=sample_input, batch_norm_stats=batch_norm_stats,
                               extension_init=extension_init)
    # As in nesting.init_variables: a run-once program needs no backend optimisation.
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return jax.jit(create, out_shardings=state_sharding, compiler_options=options)(rng)
  variables = nesting.init_variables(model, rng, sample_input, extension_init=extension_init)
  return _train_state(variables, optimizer, batch_norm_stats)


def abstract_train_state(model, optimizer: optax.GradientTransformation,
                         sample_input: jax.Array, *,
                         batch_norm_stats: str = "per_subnet") -> TrainState:
  """Shapes and dtypes of ``create_train_state``'s result, computed without FLOPs
  (what a checkpoint restores into)."""
  return jax.eval_shape(lambda: _train_state(
      model.init(jax.random.key(0), sample_input, subnet="motivated", train=False),
      optimizer, batch_norm_stats))


def _train_state(variables, optimizer, batch_norm_stats: str) -> TrainState:
  if batch_norm_stats not in BATCH_NORM_STATS:
    raise ValueError(f"batch_norm_stats must be one of {BATCH_NORM_STATS}, "
                     f"got {batch_norm_stats!r}")
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  if batch_norm_stats == "per_subnet":
    batch_stats = {"base": batch_stats, "motivated": jax.tree.map(jnp.copy, batch_stats)}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=optimizer.init(params), batch_norm_stats=batch_norm_stats)


def make_optimizer(config, total_steps: int, steps_per_epoch: int
                   ) -> optax.GradientTransformation:
  """The optimizer of a config (keys ``optimizer``, ``learning_rate``, ``momentum``,
  ``weight_decay``, ``warmup_epochs``): linear warm-up, then cosine decay to 0,
  indexed by the global batch count.

  Optional keys (the language-model configs set them; absent, the optimizer is
  exactly the one above): ``train_steps`` (an image run of N batches: the
  warm-up is ``warmup_epochs / num_epochs`` of them), ``warmup_steps`` (instead
  of ``warmup_epochs``),
  ``final_learning_rate`` (where the cosine ends, default 0), ``adam_b2``
  (AdamW's second-moment decay, default 0.999), ``grad_clip_norm`` (None:
  off; else the gradient is scaled to at most this global norm before the
  update). A base step runs the optimizer on the base's views, so it clips by
  the base gradient's norm, as the standalone base's step does."""
  warmup_steps = config.get("warmup_steps")
  if warmup_steps is None and config.get("train_steps"):
    # N batches instead of num_epochs epochs: the same shape, compressed.
    warmup_steps = int(round(config.warmup_epochs * total_steps / config.num_epochs))
  elif warmup_steps is None:
    warmup_steps = int(config.warmup_epochs * steps_per_epoch)
  warmup = min(int(warmup_steps), max(total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, warmup_steps=warmup, decay_steps=max(total_steps, 1),
      end_value=config.get("final_learning_rate") or 0.0)
  if config.optimizer == "sgd":
    optimizer = optax.chain(optax.add_decayed_weights(config.weight_decay),
                            optax.sgd(schedule, momentum=config.momentum))
  elif config.optimizer == "adamw":
    optimizer = optax.adamw(schedule, b2=config.get("adam_b2") or 0.999,
                            weight_decay=config.weight_decay)
  else:
    raise ConfigError(f"config.optimizer must be one of {OPTIMIZERS}, "
                      f"got {config.optimizer!r}")
  clip = config.get("grad_clip_norm")
  if clip is None:
    return optimizer
  return optax.chain(optax.clip_by_global_norm(clip), optimizer)


def normalise_images(images: jax.Array, normalisation: Normalisation | None) -> jax.Array:
  """``images`` as the model takes them: uint8 pixels become ``(x - mean) / std``
  in float32, per channel, on the device (``data.pipeline.normalise``'s values,
  bit for bit on a CPU); any other dtype is taken as already normalised and
  returned as it is. Decided by the dtype while tracing: nothing is computed
  per step for float batches."""
  if images.dtype != jnp.uint8:
    return images
  if normalisation is None:
    raise ValueError("uint8 images need the data set's mean and std: build the steps with "
                     "normalisation=(dataset.mean, dataset.std), or give float images that "
                     "are already normalised")
  mean, std = normalisation
  # The host's arithmetic exactly (data.pipeline.normalise): the reciprocal in
  # float32 on the host, then a subtraction and a product, each exact IEEE.
  inverse = np.float32(1) / np.maximum(np.asarray(std, np.float32), np.float32(1e-6))
  return (images.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) * inverse


def _on_normalised_images(fn: Callable, normalisation: Normalisation | None) -> Callable:
  """``fn(x, batch)`` that first normalises ``batch["image"]`` (``normalise_images``);
  a batch without images (tokens) goes in as it is."""
  def step(x, batch):
    if "image" not in batch:
      return fn(x, batch)
    return fn(x, {**batch, "image": normalise_images(batch["image"], normalisation)})
  # The compiled program keeps the step's name (``jit(base_train_step)``), which
  # profiles and benchmarks/run.py's compile counts go by.
  step.__name__ = step.__qualname__ = getattr(fn, "func", fn).__name__
  return step


# Folded into the seed before the batch index, so that the keys of the steps
# differ from the initialisation's (``jax.random.key(seed)``).
_STEP_RNG_TAG = 0x6d6a7278
# The streams a model's train mode draws from, when it does not say
# (``model.rng_streams``): Flax's name for dropout's.
RNG_STREAMS = ("dropout",)


def batch_rngs(seed: int, step: jax.Array, subnet: str,
               streams: Sequence[str] = RNG_STREAMS) -> dict[str, jax.Array]:
  """The keys a train step of ``subnet`` passes to ``model.apply(rngs=...)`` for
  batch ``step``: a pure function of (seed, batch index, sub-network), so a
  resumed run draws exactly what an uninterrupted one does, and nothing is
  carried in the state. A model that draws nothing (no dropout) computes the
  same with or without them: the keys are dead code XLA removes."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _STEP_RNG_TAG), step)
  key = jax.random.fold_in(key, 0 if subnet == "base" else 1)
  return {name: jax.random.fold_in(key, i) for i, name in enumerate(streams)}


def _step_rngs(model, seed: int, step: jax.Array, subnet: str) -> dict[str, jax.Array]:
  return batch_rngs(seed, step, subnet, getattr(model, "rng_streams", RNG_STREAMS))


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels).mean()


def _update(model, optimizer, loss_fn, subnet, params, batch_stats, opt_state, batch,
            compute_sharding=None, to_logical=None, params_layout=None, rngs=None,
            task=tasks.CLASSIFICATION, with_reread: bool = False,
            whole_arrays: bool | None = None):
  """One ordinary optimizer step of ``subnet`` on the given (view or full) arrays.

  ``compute_sharding`` (replicated, when the state is split over devices): the
  forward and backward see every parameter whole, as FSDP means: XLA gathers
  each one where it is used and reduces its gradient back to the shards, and
  the compute stays data parallel. Without it XLA follows the parameters'
  layout into the activations and reshards those (measured: over 5x the
  bytes for ViT-S; docs/sharding.md).

  ``to_logical`` (the motivated step of a state in storage order): applied to
  the gathered parameters, where it is local; its transpose puts the gradient
  back in storage order before it is reduced to the shards. The optimizer
  then updates the leaves in storage order (docs/sharding.md says which
  optimizers that is right for).

  ``params_layout``: the parameters' shardings, if any (``keep_finite_update``
  reads no split leaf). ``rngs``: this batch's keys (``batch_rngs``). ``task``
  (``motivation_jax.tasks``): what the model reads of the batch, the loss and
  the accuracy. ``with_reread`` (the base step): also return
  ``reread(opt_state_again) -> new opt_state``, the same optimizer update of
  the same values read again (``base_train_step`` says why). ``whole_arrays``
  (default: the motivated step's): the arrays given are the state's own, not
  views, and are updated in place (``keep_finite_update`` orders their selects)."""
  def objective(p):
    if compute_sharding is not None:
      p = jax.lax.with_sharding_constraint(p, compute_sharding)
    if to_logical is not None:
      p = to_logical(p)
    variables = {"params": p, "batch_stats": batch_stats}
    logits, mutated = model.apply(variables, task.inputs(batch), subnet=subnet, train=True,
                                  mutable=["batch_stats"], rngs=rngs)
    return task.loss(logits, batch, loss_fn), (logits, mutated.get("batch_stats", {}))

  (loss, (logits, new_stats)), grads = jax.value_and_grad(objective, has_aux=True)(params)
  # Known before the update, so XLA can fold the select into the optimizer's
  # own elementwise pass (checking the updated parameters too cost a second
  # pass: +40% on a 170 us step, against +15%; an update that overflows is
  # caught one batch later, by its loss, and saving.save refuses a state that
  # is not finite).
  finite = all_finite(loss, grads)
  updates, new_opt_state = optimizer.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  accuracy = task.accuracy(logits, batch)
  # The motivated step updates whole arrays in place: order its selects. The
  # base step's are on views, and nesting.write_after orders their merges.
  if whole_arrays is None:
    whole_arrays = subnet == "motivated"
  select = functools.partial(keep_finite_update, params_layout=params_layout) if (
      whole_arrays) else (lambda finite, new, old: keep_if(finite, new, old))
  out = (*select(finite, (new_params, new_stats, new_opt_state),
                 (params, batch_stats, opt_state)),
         {"loss": loss, "accuracy": accuracy, "nonfinite": ~finite})
  if not with_reread:
    return out
  def reread(again):
    return keep_if(finite, optimizer.update(grads, again, params)[1], again)
  return (*out, reread)


def all_finite(*trees) -> jax.Array:
  """Whether every element of every leaf is finite (a boolean scalar)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trees)]))


def keep_if(finite: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  """``new`` where ``finite``, else ``old``, leaf by leaf and bit for bit.

  A non-finite loss or gradient leaves the state as it was before the batch:
  the update is not applied (``optax.apply_if_finite``'s rule, without its
  extra state). A select, not ``lax.cond``: elementwise over the pieces the
  step writes (for a base step, the base's views only), so XLA can fuse it
  with the update and write the donated buffers in place; nothing waits on
  the host.
  """
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def keep_finite_update(finite: jax.Array, new: tuple[PyTree, PyTree, PyTree],
                       old: tuple[PyTree, PyTree, PyTree], *, params_layout: PyTree = None
                       ) -> tuple[PyTree, PyTree, PyTree]:
  """``keep_if`` for an optimizer step's ``(params, batch_stats, opt_state)``,
  with the optimizer state's selects ordered after the parameters'.

  The parameter update reads the old optimizer state (Adam's moments, its
  count) while the selects write the new one over it in place, and no data
  dependency orders the two, so XLA's copy insertion first copies every
  optimizer leaf (CPU backend: 10 copies in a standalone two-layer MLP's AdamW
  step against 3 without the check, 14 in the nested motivated step). Making
  the state's selects depend on the selected parameters (a zero XLA cannot
  prove is one, ``nesting.zero_after``) orders them after every read. A
  parameter split over devices (``params_layout``) is not read: that would be
  a collective (nor does XLA update a split leaf in place here anyway).
  """
  (new_params, new_stats, new_opt), (params, stats, opt_state) = new, old
  params = keep_if(finite, new_params, params)
  leaves = jax.tree.leaves(params)
  layouts = [None] * len(leaves) if params_layout is None else jax.tree.leaves(params_layout)
  whole = [x for x, s in zip(leaves, layouts)
           if not any(a is not None for a in getattr(s, "spec", ()))]
  late = finite & (nesting.zero_after(whole) == 0)
  return params, keep_if(finite, new_stats, stats), keep_if(late, new_opt, opt_state)


def _storage_to_logical(state: TrainState, state_sharding: TrainState | None,
                        wmap: nesting.WeightsMap | None) -> Callable | None:
  """For a step over the whole state: the function that puts gathered
  parameters of a state in storage order into logical order (checking that
  ``state`` is in storage order), or None where the layout interleaves nothing."""
  if stored_order(state_sharding, wmap) != "storage":
    return None
  _check_order(state, "storage")
  return functools.partial(nesting.to_logical, regions=wmap.params,
                           shardings=state_sharding.params)


def motivated_train_step(state: TrainState, batch: Batch, *, model, optimizer, loss_fn,
                         wmap: nesting.WeightsMap | None = None,
                         state_sharding: TrainState | None = None, seed: int = 0,
                         task=tasks.CLASSIFICATION
                         ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One step of the motivated model on the whole state; ``state_sharding`` (and
  ``wmap``, when it interleaves a leaf): as for ``base_train_step``; ``seed``:
  as for ``make_train_steps``."""
  _check_in_place(state)
  to_logical = _storage_to_logical(state, state_sharding, wmap)
  params, batch_stats, opt_state, metrics = _update(
      model, optimizer, loss_fn, "motivated", state.params, state.subnet_stats("motivated"),
      state.opt_state, batch, _compute_sharding(state_sharding), to_logical,
      None if state_sharding is None else state_sharding.params,
      _step_rngs(model, seed, state.step, "motivated"), task)
  return state.replace(step=state.step + 1, params=params,
                       batch_stats=state.with_subnet_stats("motivated", batch_stats),
                       opt_state=opt_state), metrics


def base_train_step(state: TrainState, batch: Batch, *, model, optimizer, loss_fn,
                    wmap: nesting.WeightsMap, opt_regions: PyTree,
                    advance_step: bool = True, state_sharding: TrainState | None = None,
                    seed: int = 0, task=tasks.CLASSIFICATION
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One step of the base on its view; ``advance_step=False`` leaves the batch
  counters (``state.step`` and the optimizer's non-parameter-shaped state, i.e.
  its update count) to a step that follows on the same batch.

  ``state_sharding`` (a ``TrainState`` of ``NamedSharding``s, when the state is
  sharded): the views and merges of split leaves move nothing where the
  state is in storage order, and only the base's part elsewhere
  (``nesting.base_view``; docs/sharding.md). A layout that interleaves a leaf
  takes a state in storage order (``make_order_converters``) and refuses
  one in logical order."""
  _check_in_place(state)
  params_layout = opt_layout = stats_layout = None
  if state_sharding is not None:
    _check_order(state, stored_order(state_sharding, wmap))
    params_layout, opt_layout = state_sharding.params, state_sharding.opt_state
    stats_layout = state_sharding.subnet_stats("base")
  stats_regions, stats = wmap["batch_stats"], state.subnet_stats("base")
  params, batch_stats, _, metrics, reread = _update(
      model, optimizer, loss_fn, "base",
      nesting.base_view(state.params, wmap.params, params_layout),
      nesting.base_view(stats, stats_regions, stats_layout),
      nesting.base_view(state.opt_state, opt_regions, opt_layout), batch,
      _compute_sharding(state_sharding), rngs=_step_rngs(model, seed, state.step, "base"),
      task=task, with_reread=True)
  params = nesting.merge_base(state.params, params, wmap.params, params_layout)
  # The moments are overwritten only after the parameter update has read them
  # (nesting.write_after: otherwise XLA copies each one first), and their new
  # values are computed from the moments read again at the index they are
  # written at (the same values: nothing has written them yet). From the first
  # view, a static slice, XLA cannot tell the write reads the region it writes,
  # and copied every moment's base region out first (an AdamW MLP's base step:
  # 18 copies, 412 KB of its 1.56 MB of temporaries; benchmarks/results/
  # paired_step_scaling_cpu.md).
  start = nesting.write_after(params, wmap.params, params_layout)
  opt_state = nesting.merge_base(
      state.opt_state, reread(nesting.base_view_at(state.opt_state, opt_regions, start,
                                                   opt_layout)),
      opt_regions, opt_layout, start=start)
  if not advance_step:
    opt_state = jax.tree.map(lambda r, old, new: old if r.base_shape is None else new,
                             opt_regions, state.opt_state, opt_state)
  return state.replace(
      step=state.step + int(advance_step),
      params=params,
      batch_stats=state.with_subnet_stats(
          "base", nesting.merge_base(stats, batch_stats, stats_regions, stats_layout)),
      opt_state=opt_state), metrics


def blocks_base_train_step(state: BlockState, batch: Batch, *, model, optimizer, loss_fn,
                           seed: int = 0, task=tasks.CLASSIFICATION
                           ) -> tuple[BlockState, dict[str, jax.Array]]:
  """One step of the base on a state in the blocks layout: the ordinary
  optimizer step of its base-sized arrays, which are whole arrays of their own,
  updated in place; ``state.extension`` is not read (``make_train_steps``'s
  compiled base step does not even take it: ``ExtensionAside``)."""
  _check_order(state, "blocks")
  params, batch_stats, opt_state, metrics = _update(
      model, optimizer, loss_fn, "base", state.params, state.subnet_stats("base"),
      state.opt_state, batch, rngs=_step_rngs(model, seed, state.step, "base"), task=task,
      whole_arrays=True)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       batch_stats=state.with_subnet_stats("base", batch_stats)), metrics


def blocks_motivated_train_step(state: BlockState, batch: Batch, *, model, optimizer, loss_fn,
                                wmap: nesting.WeightsMap, opt_regions: PyTree, seed: int = 0,
                                task=tasks.CLASSIFICATION
                                ) -> tuple[BlockState, dict[str, jax.Array]]:
  """One step of the motivated model on a state in the blocks layout (policy
  ``switch``): the forward joins each leaf's blocks (autodiff splits its
  gradient back into them), and the optimizer updates the blocks where they
  are, each in place, so that the moments are never joined nor split.

  The same update as ``motivated_train_step`` of the joined state for an
  optimizer that treats every entry on its own (SGD, momentum, Adam, AdamW,
  weight decay), and to within rounding for one that sums over the whole
  gradient (``clip_by_global_norm``: the sum runs block by block). One that
  mixes the entries of a leaf (a factored second moment, an orthogonalised
  update) would see blocks: use ``state_layout="in_place"`` for it."""
  _check_order(state, "blocks")
  p, s, rest = wmap.params, wmap["batch_stats"], state.extension
  # Every parameter as the pair (base block, [extension blocks]): the tree the
  # gradient and the optimizer see.
  pair = lambda regions, base, extension: jax.tree.map(
      lambda r, b, e: b if r.base_shape is None else (b, e), regions, base, extension)
  # A leaf that is not parameter-shaped (a step count) is the base's whole.
  unpair = lambda regions, tree, i: jax.tree.map(
      lambda r, x: (x if i == 0 else []) if r.base_shape is None else x[i], regions, tree)
  params, opt_state = pair(p, state.params, rest["params"]), pair(
      opt_regions, state.opt_state, rest["opt_state"])
  per_subnet = state.batch_norm_stats == "per_subnet"
  stats = rest["batch_stats"]["motivated"] if per_subnet else nesting.join_blocks(
      state.batch_stats, rest["batch_stats"], s)

  def objective(pairs):
    whole = jax.tree.map(lambda r, x: r.join(*x), p, pairs)
    logits, mutated = model.apply({"params": whole, "batch_stats": stats}, task.inputs(batch),
                                  subnet="motivated", train=True, mutable=["batch_stats"],
                                  rngs=_step_rngs(model, seed, state.step, "motivated"))
    return task.loss(logits, batch, loss_fn), (logits, mutated.get("batch_stats", {}))

  (loss, (logits, new_stats)), grads = jax.value_and_grad(objective, has_aux=True)(params)
  finite = all_finite(loss, grads)
  updates, new_opt_state = optimizer.update(grads, opt_state, params)
  params, new_stats, opt_state = keep_finite_update(
      finite, (optax.apply_updates(params, updates), new_stats, new_opt_state),
      (params, stats, opt_state))
  if per_subnet:
    base_stats, rest_stats = state.batch_stats, {**rest["batch_stats"], "motivated": new_stats}
  else:
    base_stats, rest_stats = (nesting.base_view(new_stats, s),
                              nesting.extension_blocks(new_stats, s))
  return state.replace(
      step=state.step + 1, params=unpair(p, params, 0), opt_state=unpair(opt_regions, opt_state, 0),
      batch_stats=base_stats,
      extension={"params": unpair(p, params, 1), "opt_state": unpair(opt_regions, opt_state, 1),
                 "batch_stats": rest_stats}), {
      "loss": loss, "accuracy": task.accuracy(logits, batch), "nonfinite": ~finite}


def _in_blocks(step: Callable, wmap: nesting.WeightsMap, opt_regions: PyTree) -> Callable:
  """``step`` (of a state in logical order) for a state in the blocks layout:
  its leaves joined into whole ones, the step, and split again. The motivated
  steps of policies ``both`` and ``joint`` run so: the same program on the same
  values, plus the joins and splits of every leaf, moments too
  (``blocks_motivated_train_step``, policy ``switch``'s, joins only parameters)."""
  def in_blocks(state: BlockState, batch: Batch):
    new, metrics = step(from_blocks(state, wmap, opt_regions), batch)
    return to_blocks(new, wmap, opt_regions), metrics
  in_blocks.__name__ = in_blocks.__qualname__ = getattr(step, "func", step).__name__
  return in_blocks


class ExtensionAside:
  """The compiled base step of a state in the blocks layout, called with the
  state and giving it back whole: the program takes the state without its
  ``extension`` (which a base step never reads), and the extension is put back
  on the result. Handing the extension's arrays through the call would cost
  about 2 µs of host time each (benchmarks/results/paired_step_scaling_cpu.md).

  ``lower`` and ``compile`` give the same wrapper around JAX's lowered and
  compiled programs; anything else (``cost_analysis``, ``as_text``, ...) is
  theirs."""

  def __init__(self, fn):
    self.fn = fn

  def __call__(self, state: BlockState, batch: Batch):
    new, metrics = self.fn(_with_extension(state, None), batch)
    return _with_extension(new, state.extension), metrics

  def lower(self, state, *args, **kwargs) -> "ExtensionAside":
    return ExtensionAside(self.fn.lower(_with_extension(state, None), *args, **kwargs))

  def compile(self, *args, **kwargs) -> "ExtensionAside":
    return ExtensionAside(self.fn.compile(*args, **kwargs))

  def __getattr__(self, name: str):
    return getattr(self.fn, name)


def _with_extension(state: BlockState, extension: PyTree) -> BlockState:
  """``state.replace(extension=extension)``, in a fifth of its host time
  (``dataclasses.replace`` runs ``__init__`` over every field: 5 µs a call on
  the 2-core CPU, twice a base step)."""
  new = object.__new__(type(state))
  new.__dict__.update(state.__dict__)
  new.__dict__["extension"] = extension
  return new


def _unsplit_layout(state_sharding: PyTree, state_layout: str):
  """The one sharding every leaf of a state in the blocks layout has (None:
  no layout given): blocks are not split over devices (yet), so a layout that
  splits a leaf (FSDP) is refused in one line."""
  if state_sharding is None or not isinstance(state_sharding, TrainState):
    return state_sharding
  leaves = [s for s in jax.tree.leaves(state_sharding) if hasattr(s, "spec")]
  split = [s for s in leaves if any(a is not None for a in s.spec)]
  if split:
    raise ConfigError(f"state_layout={state_layout!r} keeps each leaf's base apart, and "
                      "splitting those blocks over devices (FSDP) is not built; use "
                      "state_layout='in_place' with mesh.fsdp > 1")
  return jax.sharding.NamedSharding(leaves[0].mesh, jax.sharding.PartitionSpec()) if (
      leaves) else None


def check_state_layout(state_layout: str) -> None:
  if state_layout not in STATE_LAYOUTS:
    raise ValueError(f"state_layout must be one of {STATE_LAYOUTS}, got {state_layout!r}")


def stored_state(placed: TrainState, optimizer: optax.GradientTransformation, *,
                 wmap: nesting.WeightsMap, state_sharding: TrainState | None = None,
                 state_layout: str = "in_place") -> TrainState:
  """``placed`` (the abstract state in logical order, ``ShapeDtypeStruct``s with
  the layout's shardings) as the train steps of this layout take it: what to
  ``lower`` them for."""
  check_state_layout(state_layout)
  if state_layout == "in_place":
    return placed.replace(order=stored_order(state_sharding, wmap))
  one = _unsplit_layout(state_sharding, state_layout)
  opt_regions = nesting.opt_state_regions(optimizer, wmap.params)
  blocks = jax.eval_shape(lambda s: to_blocks(s, wmap, opt_regions), placed)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), blocks)


def stored_order(state_sharding: TrainState | None, wmap: nesting.WeightsMap | None) -> str:
  """The order (``ORDERS``) of the state the train steps of this layout read and
  write: "storage" where the layout interleaves a parameter (its optimizer
  leaves follow it, ``check_layout``), else "logical". E.g. to lower a step
  for an abstract state: ``abstract.replace(order=stored_order(layout, wmap))``."""
  if state_sharding is None or wmap is None:
    return "logical"
  return "storage" if nesting.interleaves(wmap.params, state_sharding.params) else "logical"


def _check_order(state: TrainState, expected: str) -> None:
  if state.order != expected:
    raise ValueError(f"this step reads the state in {expected} order, got one in "
                     f"{state.order} order; convert it with steps.make_order_converters "
                     "(docs/sharding.md, \"Storage order\")")


def _check_in_place(state: TrainState) -> None:
  if state.order == "blocks":
    raise ValueError("these steps read a state in the in_place layout, got one in the blocks "
                     "layout (a BlockState): build them with state_layout='blocks', or convert "
                     "it to logical order")


def _compute_sharding(state_sharding: TrainState | None):
  """Replicated on the state's mesh when some parameter is split over devices
  (see ``_update``); None otherwise (one device, or data parallel only)."""
  if state_sharding is None:
    return None
  leaves = [s for s in jax.tree.leaves(state_sharding.params) if hasattr(s, "spec")]
  if not any(any(a is not None for a in s.spec) for s in leaves):
    return None
  return jax.sharding.NamedSharding(leaves[0].mesh, jax.sharding.PartitionSpec())


def both_train_step(state: TrainState, batch: Batch, *, model, optimizer, loss_fn,
                    wmap: nesting.WeightsMap, opt_regions: PyTree,
                    state_sharding: TrainState | None = None, seed: int = 0,
                    task=tasks.CLASSIFICATION):
  """Policy ``both``: a base step, then a motivated step, on the same batch.

  The two updates share one position of the learning-rate schedule: the base
  half does not advance the optimizer's count, so the schedule stays indexed by
  the global batch count under either policy.
  """
  deps = dict(model=model, optimizer=optimizer, loss_fn=loss_fn, seed=seed, task=task)
  before = state
  state, base_metrics = base_train_step(state, batch, wmap=wmap, opt_regions=opt_regions,
                                        advance_step=False, state_sharding=state_sharding,
                                        **deps)
  state, metrics = motivated_train_step(state, batch, wmap=wmap,
                                        state_sharding=state_sharding, **deps)
  # Both halves or neither: a non-finite motivated half takes the base half back.
  nonfinite = base_metrics["nonfinite"] | metrics["nonfinite"]
  params, batch_stats, opt_state = keep_if(
      ~nonfinite, (state.params, state.batch_stats, state.opt_state),
      (before.params, before.batch_stats, before.opt_state))
  return state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state), {
      **metrics, "nonfinite": nonfinite, "base_loss": base_metrics["loss"],
      "base_accuracy": base_metrics["accuracy"]}


def joint_train_step(state: TrainState, batch: Batch, *, model, optimizer, loss_fn,
                     wmap: nesting.WeightsMap | None = None,
                     state_sharding: TrainState | None = None, seed: int = 0,
                     task=tasks.CLASSIFICATION):
  """Policy ``joint`` (MatFormer's recipe, as MatFormer-OLMo's and scenic
  MatViT's trainers do it): both sub-networks on the same batch, their losses
  summed, one gradient of the sum over the shared parameters and one
  optimizer update. Unlike ``both`` (a base update, then a motivated update),
  the base's parameters take one step, of the gradient of both losses.

  Each sub-network normalises with, and updates, its own batch-norm
  statistics (``batch_norm_stats="per_subnet"``; a state with shared
  statistics is refused when the step is traced). Dropout keys: each
  sub-network's own (``batch_rngs``). Metrics: ``loss`` and ``accuracy`` are the
  motivated model's (the controller's signal, as under ``both``),
  ``base_loss`` and ``base_accuracy`` the base's."""
  _check_in_place(state)
  to_logical = _storage_to_logical(state, state_sharding, wmap)
  compute_sharding = _compute_sharding(state_sharding)
  inputs = task.inputs(batch)

  def objective(p):
    if compute_sharding is not None:
      p = jax.lax.with_sharding_constraint(p, compute_sharding)
    if to_logical is not None:
      p = to_logical(p)
    out = {}
    for subnet in ("base", "motivated"):
      logits, mutated = model.apply(
          {"params": p, "batch_stats": state.subnet_stats(subnet)}, inputs, subnet=subnet,
          train=True, mutable=["batch_stats"], rngs=_step_rngs(model, seed, state.step, subnet))
      out[subnet] = (task.loss(logits, batch, loss_fn), logits, mutated.get("batch_stats", {}))
    return out["base"][0] + out["motivated"][0], out

  (total, out), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  finite = all_finite(total, grads)
  updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  new_stats = state.batch_stats
  if jax.tree.leaves(new_stats):
    if state.batch_norm_stats != "per_subnet":
      raise ValueError("policy 'joint' needs batch_norm_stats='per_subnet' (each sub-network "
                       f"its own statistics), got {state.batch_norm_stats!r}")
    # A paired model's base (models/paired.py) gives its own, base-sized statistics.
    new_stats = {**new_stats, **{subnet: _full_size(out[subnet][2], new_stats[subnet],
                                                    wmap["batch_stats"] if wmap else None)
                                 for subnet in ("base", "motivated")}}
  params, batch_stats, opt_state = keep_finite_update(
      finite, (new_params, new_stats, new_opt_state),
      (state.params, state.batch_stats, state.opt_state),
      params_layout=None if state_sharding is None else state_sharding.params)
  (base_loss, base_logits, _), (loss, logits, _) = out["base"], out["motivated"]
  return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                       opt_state=opt_state), {
      "loss": loss, "accuracy": task.accuracy(logits, batch), "nonfinite": ~finite,
      "base_loss": base_loss, "base_accuracy": task.accuracy(base_logits, batch)}


def _full_size(stats: PyTree, like: PyTree, regions: PyTree) -> PyTree:
  """``stats`` written over the base region of ``like`` where they are smaller."""
  if jax.tree.map(jnp.shape, stats) == jax.tree.map(jnp.shape, like):
    return stats
  if regions is None:
    raise ValueError("this model's base gives base-sized batch statistics: give the step "
                     "its weights map (wmap=)")
  return nesting.merge_base(like, stats, regions)


def make_train_steps(model, optimizer: optax.GradientTransformation, *,
                     wmap: nesting.WeightsMap,
                     loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy_loss,
                     policy: str = "switch", jit: bool = True,
                     state_sharding: PyTree = None, batch_sharding: PyTree = None,
                     normalisation: Normalisation | None = None,
                     seed: int = 0, task=tasks.CLASSIFICATION,
                     state_layout: str = "in_place") -> dict[str, Callable]:
  """Builds the base and motivated train steps.

  Args:
    model: a nested Flax module (see ``motivation_jax.models``).
    optimizer: any optax transformation whose ``init`` maps parameter trees to
      state trees (what ``optax.tree_map_params`` needs).
    wmap: ``nesting.weights_map(model, ...)``.
    loss_fn: ``(logits, labels) -> scalar`` (classification's; the causal-LM
      task's loss is its own token-weighted cross-entropy).
    policy: ``"switch"``: a motivated batch trains the motivated model only;
      ``"both"``: the "motivated" step is a base step followed by a motivated
      step on the same batch (one compiled program, two optimizer updates at
      one position of the learning-rate schedule); ``"joint"``: the
      "motivated" step trains both on the batch with one update of their
      summed losses (``joint_train_step``, MatFormer's recipe).
    jit: return ``jax.jit``-ed functions (state donated); ``False`` returns the
      pure functions, for users who compose them inside their own jit.
    state_sharding, batch_sharding: optional shardings for ``jax.jit`` (one
      sharding, or a ``TrainState`` of them, e.g. ``sharding.train_state_sharding``'s
      FSDP layout); the state keeps its sharding from step to step.
    normalisation: ``(mean, std)`` per channel on the 0..255 scale (a
      ``data.Dataset``'s ``mean`` and ``std``): a batch whose ``image`` is uint8
      is normalised with it on the device. A float ``image`` is taken as
      already normalised and used as it is, so batches from your own pipeline
      work unchanged; without ``normalisation`` a uint8 batch is refused.
      Each dtype is its own compiled program.
    seed: the RNG a model's train mode draws from (dropout): batch ``t``'s keys
      are ``batch_rngs(seed, t, subnet)``, passed as ``model.apply(rngs=...)``
      for the streams ``model.rng_streams`` names (default ``RNG_STREAMS``).
    task: ``tasks.CLASSIFICATION`` (``image``, ``label``) or ``tasks.CAUSAL_LM``
      (``tokens``): what a batch holds, the loss and the accuracy.
    state_layout: ``"in_place"`` (``STATE_LAYOUTS``): the steps take a
      ``TrainState`` (in the order ``stored_order`` says); ``"blocks"``: a
      ``BlockState`` (``to_blocks``; ``make_order_converters``), whose base
      step is the ordinary step of the base's own arrays and whose motivated
      step joins and splits the blocks around the logical one. Not with a
      layout that splits a leaf over devices (FSDP).

  Returns:
    ``{"base": fn, "motivated": fn}`` with ``fn(state, batch) -> (state, metrics)``.
  """
  if policy not in POLICIES:
    raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
  check_state_layout(state_layout)
  opt_regions = nesting.opt_state_regions(optimizer, wmap.params)
  deps = dict(model=model, optimizer=optimizer, loss_fn=loss_fn, seed=seed, task=task)
  if state_layout == "blocks":
    state_sharding = _unsplit_layout(state_sharding, state_layout)
    steps = _blocks_train_steps(deps, wmap, opt_regions, policy, normalisation)
  else:
    if isinstance(state_sharding, TrainState):
      check_layout(optimizer, state_sharding, wmap)
      # A layout that interleaves a leaf is that of a state in storage order.
      state_sharding = state_sharding.replace(order=stored_order(state_sharding, wmap))
    steps = _in_place_train_steps(deps, wmap, opt_regions, policy, state_sharding,
                                  normalisation)
  if not jit:
    return steps
  shardings = {}
  if state_sharding is not None or batch_sharding is not None:
    shardings = dict(in_shardings=(state_sharding, batch_sharding),
                     out_shardings=(state_sharding, None))
  # Donating the state lets XLA write the new state into the old buffers; for a
  # base step in place merge_base then becomes an in-place write of the base region.
  jitted = {kind: jax.jit(fn, donate_argnums=0, **shardings) for kind, fn in steps.items()}
  if state_layout == "blocks":
    jitted["base"] = ExtensionAside(jitted["base"])
  return jitted


def _in_place_train_steps(deps, wmap, opt_regions, policy, state_sharding,
                          normalisation) -> dict[str, Callable]:
  """``make_train_steps``'s pure steps for ``state_layout="in_place"``
  (``state_sharding``: a checked layout in its stored order, or one sharding)."""
  # Per-leaf shardings (not one sharding for the whole state) reach the base
  # step, whose slices of split leaves need them.
  layout = state_sharding if isinstance(state_sharding, TrainState) else None
  base = functools.partial(base_train_step, wmap=wmap, opt_regions=opt_regions,
                           state_sharding=layout, **deps)
  if policy == "switch":
    motivated = functools.partial(motivated_train_step, wmap=wmap, state_sharding=layout,
                                  **deps)
  elif policy == "joint":
    motivated = functools.partial(joint_train_step, wmap=wmap, state_sharding=layout, **deps)
  else:
    motivated = functools.partial(both_train_step, wmap=wmap, opt_regions=opt_regions,
                                  state_sharding=layout, **deps)
  return {kind: _on_normalised_images(fn, normalisation)
          for kind, fn in {"base": base, "motivated": motivated}.items()}


def _blocks_train_steps(deps, wmap, opt_regions, policy, normalisation
                        ) -> dict[str, Callable]:
  """``make_train_steps``'s pure steps for ``state_layout="blocks"``."""
  if policy == "switch":
    motivated = _on_normalised_images(functools.partial(
        blocks_motivated_train_step, wmap=wmap, opt_regions=opt_regions, **deps), normalisation)
  else:  # the logical step of the joined state, split again
    logical = {"joint": functools.partial(joint_train_step, wmap=wmap, **deps),
               "both": functools.partial(both_train_step, wmap=wmap, opt_regions=opt_regions,
                                         **deps)}[policy]
    motivated = _in_blocks(_on_normalised_images(logical, normalisation), wmap, opt_regions)
  return {"base": _on_normalised_images(functools.partial(blocks_base_train_step, **deps),
                                        normalisation),
          "motivated": motivated}


def check_layout(optimizer: optax.GradientTransformation, state_sharding: TrainState,
                 wmap: nesting.WeightsMap) -> None:
  """Refuses a layout in which a parameter-shaped optimizer leaf is split
  differently from its parameter (e.g. moments of another dtype, which the
  size threshold of ``sharding.fsdp_spec`` left replicated): in storage order
  the two would be in different row orders."""
  abstract = jax.tree.map(lambda r: jax.ShapeDtypeStruct(r.full_shape, np.float32),
                          wmap.params)
  opt_abstract = jax.eval_shape(optimizer.init, abstract)
  spec = lambda s: tuple(getattr(s, "spec", ()))
  # The parameter's sharding at each parameter-shaped entry; "-" elsewhere.
  paired = optax.tree_map_params(
      nesting.abstract_init(optimizer), lambda _, s: s, opt_abstract, state_sharding.params,
      transform_non_params=lambda x: jax.tree.map(lambda _: "-", x))
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(paired),
                               jax.tree.leaves(state_sharding.opt_state)):
    if want != "-" and spec(want) != spec(got):
      raise ValueError(f"optimizer state {jax.tree_util.keystr(path)} is laid out as "
                       f"{spec(got)}, its parameter as {spec(want)}; give parameter-shaped "
                       "optimizer leaves their parameter's layout")


def make_order_converters(optimizer: optax.GradientTransformation, *,
                          wmap: nesting.WeightsMap, state_sharding: TrainState | None = None,
                          state_layout: str = "in_place"
                          ) -> dict[str, Callable[[TrainState], TrainState]]:
  """``{"storage": fn, "logical": fn}``: ``fn(state)`` is ``state`` in that
  order (``ORDERS``; docs/sharding.md, "Storage order"), with the same layout.

  The train steps ``make_train_steps`` builds for ``state_sharding`` take and
  give a state in storage order when that layout interleaves a leaf; every
  reader of parameters (checkpoints, evaluation, recalibration, export) takes
  logical order. A state already in the asked order is returned as it is, so
  where the layout interleaves nothing (one device, fsdp=1, every leaf
  replicated) both are the identity and nothing runs. ``"storage"`` donates
  its input (the state it replaces); ``"logical"`` keeps it (a checkpoint or
  an evaluation reads a copy while training goes on).

  ``state_layout="blocks"``: ``"storage"`` is ``to_blocks`` and ``"logical"``
  ``from_blocks``. ``state_sharding=None`` (no layout): in place, both are
  the identity.
  """
  opt_regions = nesting.opt_state_regions(optimizer, wmap.params)
  check_state_layout(state_layout)
  if state_layout == "blocks":
    return _blocks_converters(wmap, opt_regions, _unsplit_layout(state_sharding, state_layout))
  if state_sharding is None:
    return {order: lambda state: state for order in ("storage", "logical")}
  check_layout(optimizer, state_sharding, wmap)
  stored = stored_order(state_sharding, wmap)
  layouts = {order: state_sharding.replace(order=order) for order in ("logical", "storage")}

  def convert(state: TrainState, order: str) -> TrainState:
    fn = nesting.to_storage if order == "storage" else nesting.to_logical
    return state.replace(
        params=fn(state.params, wmap.params, state_sharding.params),
        opt_state=fn(state.opt_state, opt_regions, state_sharding.opt_state), order=order)

  jitted = {"storage": jax.jit(functools.partial(convert, order="storage"), donate_argnums=0,
                               in_shardings=(layouts["logical"],),
                               out_shardings=layouts["storage"]),
            "logical": jax.jit(functools.partial(convert, order="logical"),
                               in_shardings=(layouts["storage"],),
                               out_shardings=layouts["logical"])}

  def converter(order: str):
    def fn(state: TrainState) -> TrainState:
      if state.order not in ("logical", "storage"):
        raise ValueError(f"a state in logical or storage order converts here, got one in "
                         f"{state.order!r} order (a BlockState converts with the "
                         "converters of state_layout='blocks')")
      if state.order == order or stored == "logical":
        return state
      return jitted[order](state)
    fn.__name__ = f"to_{order}"
    fn.jitted = jitted[order]  # its program (benchmarks/fsdp_collectives.py counts its bytes)
    return fn

  return {order: converter(order) for order in ("logical", "storage")}


def _blocks_converters(wmap, opt_regions, one) -> dict[str, Callable]:
  """``make_order_converters`` for the blocks layout (``one``: every leaf's sharding)."""
  shardings = {} if one is None else dict(out_shardings=one)
  # Not donated: few of the blocks could reuse a whole leaf's buffer (JAX
  # warns of each); "storage" deletes its input instead, as a donation would.
  jitted = {"storage": jax.jit(functools.partial(to_blocks, wmap=wmap, opt_regions=opt_regions),
                               **shardings),
            "logical": jax.jit(functools.partial(from_blocks, wmap=wmap,
                                                 opt_regions=opt_regions), **shardings)}
  wanted = {"storage": "blocks", "logical": "logical"}

  def converter(order: str):
    def fn(state: TrainState) -> TrainState:
      if state.order not in ("logical", "blocks"):
        raise ValueError(f"a state in the blocks layout or in logical order converts, got one "
                         f"in {state.order!r} order")
      if state.order == wanted[order]:
        return state
      converted = jitted[order](state)
      if order == "storage":
        kept = {id(x) for x in jax.tree.leaves(converted)}  # a leaf JAX handed back as it was
        for x in jax.tree.leaves(state):
          if id(x) not in kept:
            x.delete()
      return converted
    fn.__name__ = f"to_{order}"
    fn.jitted = jitted[order]
    return fn

  return {order: converter(order) for order in ("storage", "logical")}


def eval_step(variables: Mapping[str, PyTree], batch: Batch, *, model, subnet: str,
              loss_fn=cross_entropy_loss, task=tasks.CLASSIFICATION) -> dict[str, jax.Array]:
  """Sums over one eval batch: loss, correct predictions and the count of
  examples (classification) or targets (causal LM) the ``mask`` keeps."""
  logits = model.apply(variables, task.inputs(batch), subnet=subnet, train=False)
  return task.eval_sums(logits, batch)


def make_eval_steps(model, *, jit: bool = True, normalisation: Normalisation | None = None,
                    task=tasks.CLASSIFICATION) -> dict[str, Callable]:
  """``{"base": fn, "motivated": fn}`` with ``fn(variables, batch) -> sums``; a
  uint8 ``image`` is normalised with ``normalisation`` as in ``make_train_steps``."""
  steps = {subnet: _on_normalised_images(
      functools.partial(eval_step, model=model, subnet=subnet, task=task), normalisation)
           for subnet in ("base", "motivated")}
  return {k: jax.jit(f) for k, f in steps.items()} if jit else steps


def compiled_flops(compiled) -> float:
  """FLOPs of one call of a compiled program, from XLA's cost analysis (a
  ``Lowered`` program works too: the count before backend optimisation)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  if flops is None:
    raise RuntimeError("this backend's XLA cost analysis reports no FLOPs")
  return float(flops)
