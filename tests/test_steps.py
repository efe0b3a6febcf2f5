"""Semantics of the two compiled train steps over one variables pytree."""

import functools

import chex
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from motivation_jax import nesting, steps
from motivation_jax.controller import Controller, make_condition

from conftest import MODELS, make_batch, randomise, reference_step

OPTIMIZERS = {
    "sgd_momentum": lambda: optax.sgd(0.05, momentum=0.9),
    # eps well above float noise: some parameters have a gradient that is zero in
    # exact arithmetic (a ViT's key bias, a bias followed by a convolution and train-mode
    # batch norm), and Adam with a tiny eps turns their rounding noise into full-size
    # steps that differ between any two ways of computing the same step.
    "adamw": lambda: optax.adamw(1e-2, eps=1e-4, weight_decay=0.1),
}


def _setup(model, optimizer, batch, policy="switch", jit=True, batch_norm_stats="per_subnet"):
  state = steps.create_train_state(model, optimizer, jax.random.key(0), batch["image"],
                                   batch_norm_stats=batch_norm_stats)
  wmap = nesting.weights_map(model, batch["image"], subnet="motivated")
  return state, wmap, steps.make_train_steps(model, optimizer, wmap=wmap, policy=policy,
                                             jit=jit)


@functools.cache
def _compiled(model_name, opt_name, batch_norm_stats="per_subnet", policy="switch"):
  """``(model, optimizer, initial state on the host, wmap, jitted steps)``, built once
  per combination: tests reuse the steps, which compile once per batch shape."""
  model, optimizer = MODELS[model_name](), OPTIMIZERS[opt_name]()
  state, wmap, fns = _setup(model, optimizer, make_batch(), policy=policy,
                            batch_norm_stats=batch_norm_stats)
  return model, optimizer, _copy(state), wmap, fns


def _fresh(model_name, opt_name, **kwargs):
  """Like ``_setup``, from the shared compiled steps (a new copy of the state:
  the steps donate it)."""
  model, optimizer, state, wmap, fns = _compiled(model_name, opt_name, **kwargs)
  return model, optimizer, jax.device_put(_copy(state)), wmap, fns


def _copy(tree):
  # A real copy: the steps donate their input state, whose buffers are then reused.
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _outside(x, region):
  """The entries of ``x`` outside the base region, as a flat array."""
  keep = np.ones(np.shape(x), bool)
  if region.in_base:
    keep[tuple(slice(0, d) for d in region.base_shape)] = False
  return np.asarray(x)[keep]


def changed_outside_base(before, after, wmap, optimizer) -> list[str]:
  """Paths of leaves (params, batch stats, param-shaped optimizer state) that
  differ anywhere outside the base region."""
  trees = {
      "params": (before.params, after.params, wmap.params),
      "batch_stats": (before.subnet_stats("base"), after.subnet_stats("base"),
                      wmap["batch_stats"]),
      "opt_state": (before.opt_state, after.opt_state,
                    nesting.opt_state_regions(optimizer, wmap.params)),
  }
  changed = []
  if before.batch_norm_stats == "per_subnet":  # the base must not touch the motivated statistics
    if not all(jax.tree.leaves(jax.tree.map(np.array_equal, before.batch_stats["motivated"],
                                            after.batch_stats["motivated"]))):
      changed.append("batch_stats['motivated']")
  for name, (old, new, regions) in trees.items():
    flat_regions = jax.tree_util.tree_leaves_with_path(regions)
    for (path, region), x, y in zip(flat_regions, jax.tree.leaves(old), jax.tree.leaves(new)):
      if region.base_shape is None:  # not parameter-shaped: the step count
        continue
      if not np.array_equal(_outside(x, region), _outside(y, region)):
        changed.append(name + jax.tree_util.keystr(path))
  return changed


# Every model with every optimizer, and with both batch-norm modes where it has
# batch norm (the MLP and the ViT have none, so "shared" would repeat
# "per_subnet"). The ImageNet-stem ResNet once: it is the CIFAR one's module and
# layers with another stem. The fast run takes every model once and every
# optimizer and mode on the CNN; the other combinations (about 15 s, mostly
# compiling, on a 2-core CPU) in the full run.
_FAST_CASES = {(name, "adamw", "per_subnet") for name in MODELS} | {
    ("cnn", opt, stats) for opt in OPTIMIZERS for stats in ("per_subnet", "shared")}
STEP_CASES = [(name, opt, stats) for name in sorted(MODELS) if name != "resnet_imagenet"
              for opt in sorted(OPTIMIZERS)
              for stats in (("per_subnet", "shared") if name in ("cnn", "efficientnet")
                            else ("per_subnet",))] + [("resnet_imagenet", "adamw", "shared")]
STEP_CASES = [case if case in _FAST_CASES or case[0] == "resnet_imagenet"
              else pytest.param(*case, marks=pytest.mark.slow) for case in STEP_CASES]


@functools.cache
def _reference(model_name, opt_name):
  """An ordinary train step of the standalone base, written independently (jitted once)."""
  model, optimizer = MODELS[model_name](), OPTIMIZERS[opt_name]()
  standalone = model.standalone("base")
  return jax.jit(lambda v, o, b: reference_step(standalone, optimizer, v, o, b))


@pytest.mark.parametrize("model_name, opt_name, batch_norm_stats", STEP_CASES)
def test_base_step_is_an_ordinary_base_step_and_changes_nothing_outside_the_base(
    model_name, opt_name, batch_norm_stats):
  _, optimizer, state, wmap, fns = _fresh(model_name, opt_name,
                                          batch_norm_stats=batch_norm_stats)
  # A motivated step first: the base starts mid-run, momentum / Adam moments are
  # non-zero everywhere, and a leaking base step would move them (and, with
  # weight decay, the params).
  state, _ = fns["motivated"](state, make_batch(seed=9))
  # The same start for the standalone base, exported from host copies (the steps
  # donate the state; numpy slices compile nothing).
  host = _copy(state)
  variables = nesting.export(host.variables("base"), "base", wmap)
  opt_state = nesting.export_opt_state(optimizer, host.opt_state, wmap)
  chex.assert_trees_all_equal_structs(opt_state, optimizer.init(variables["params"]))
  reference = _reference(model_name, opt_name)
  for i in range(3):  # several steps, so the optimizer's moments take part
    b = make_batch(seed=10 + i)
    before = _copy(state)
    state, metrics = fns["base"](state, b)
    assert changed_outside_base(before, _copy(state), wmap, optimizer) == []
    variables, opt_state, loss, _ = reference(variables, opt_state, b)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  got = nesting.export(_copy(state.variables("base")), "base", wmap)
  chex.assert_trees_all_close(got["params"], variables["params"], rtol=2e-5, atol=2e-6)
  chex.assert_trees_all_close(got["batch_stats"], variables["batch_stats"], rtol=2e-5,
                              atol=2e-6)
  # ... so inside the region it did train.
  assert not np.array_equal(before.params["head"]["kernel"], state.params["head"]["kernel"])
  assert int(state.step) == 4  # one motivated step, then three base steps


def test_the_outside_check_catches_a_leaking_base_step():
  """The naive base step (base forward, optimizer over the whole tree) leaks
  momentum and weight decay outside the base; the check above must see it."""
  model, optimizer, state, wmap, fns = _fresh("cnn", "adamw", batch_norm_stats="shared")
  batch = make_batch()
  state, _ = fns["motivated"](state, batch)

  @jax.jit
  def leaky_base_step(state, batch):
    def loss(p):
      logits, new = model.apply({"params": p, "batch_stats": state.batch_stats},
                                batch["image"], subnet="base", train=True,
                                mutable=["batch_stats"])
      return steps.cross_entropy_loss(logits, batch["label"]), new["batch_stats"]
    (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return state.replace(params=optax.apply_updates(state.params, updates),
                         batch_stats=stats, opt_state=opt_state)

  before = _copy(state)
  changed = changed_outside_base(before, _copy(leaky_base_step(state, batch)), wmap, optimizer)
  assert "params['stage1_block2']['conv1']['kernel']" in changed
  assert any(path.startswith("opt_state") for path in changed)


def test_motivated_step_updates_the_whole_tree(model_name):
  _, _, state, wmap, fns = _fresh(model_name, "sgd_momentum")
  before = _copy(state)
  state, _ = fns["motivated"](state, make_batch())
  for name, old_tree, new_tree in (
      ("params", before.params, state.params),
      ("batch_stats", before.subnet_stats("motivated"), state.subnet_stats("motivated"))):
    leaves = jax.tree_util.tree_leaves_with_path(old_tree)
    for (path, old), new in zip(leaves, jax.tree.leaves(new_tree)):
      # Every leaf, in its extension part too.
      assert not np.array_equal(old, new), f"{name}{jax.tree_util.keystr(path)} did not move"
  region = wmap.params["head"]["kernel"]
  assert not np.array_equal(_outside(before.params["head"]["kernel"], region),
                            _outside(state.params["head"]["kernel"], region))


def _counts(opt_state) -> list[int]:
  return [int(c) for _, c in optax.tree_utils.tree_get_all_with_path(opt_state, "count")]


def test_both_policy_is_a_base_step_then_a_motivated_step(batch):
  _, _, state, _, both = _fresh("cnn", "adamw", policy="both")
  _, _, _, _, switch = _fresh("cnn", "adamw")
  expected, _ = switch["base"](_copy(state), batch)
  # ... at the same position of the schedule: the base half leaves the count.
  # (Copies: the steps donate their input, and ``state`` is used below.)
  expected = expected.replace(step=_copy(state.step), opt_state=optax.tree_utils.tree_set(
      expected.opt_state, count=_copy(state.opt_state[0].count)))
  expected, expected_metrics = switch["motivated"](expected, batch)
  got, metrics = both["motivated"](state, batch)
  # One program against two rounds differently (conftest's compile flags: up to
  # 3e-6 in a weight, 3e-8 in a moment, over 8 batches); the two updates move
  # weights by up to 2.5e-2, so a missing or doubled one is far outside these.
  chex.assert_trees_all_close(got.params, expected.params, rtol=1e-6, atol=3e-5)
  chex.assert_trees_all_close(got.opt_state, expected.opt_state, rtol=1e-6, atol=3e-7)
  np.testing.assert_allclose(metrics["loss"], expected_metrics["loss"], rtol=1e-6)
  assert "base_loss" in metrics
  assert int(got.step) == 1 and _counts(got.opt_state) == [1]


def test_joint_policy_is_one_update_of_the_summed_losses(batch):
  """MatFormer's recipe: with plain SGD, one update of the gradient of the
  summed losses is the base step's move plus the motivated step's move, both
  taken from the same parameters (p - lr (g_base + g_motivated)); each
  sub-network's batch-norm statistics are those its own step writes; one
  optimizer count per batch."""
  model, optimizer = MODELS["cnn"](), optax.sgd(0.05)
  state, _, joint = _setup(model, optimizer, batch, policy="joint")
  _, _, switch = _setup(model, optimizer, batch)
  start = _copy(state)
  state, _ = switch["motivated"](state, make_batch(seed=5))  # mid-run parameters
  mid = _copy(state)
  base, base_metrics = switch["base"](jax.device_put(_copy(mid)), batch)
  motivated, motivated_metrics = switch["motivated"](jax.device_put(_copy(mid)), batch)
  got, metrics = joint["motivated"](jax.device_put(_copy(mid)), batch)
  expected = jax.tree.map(lambda b, m, p: np.asarray(b) + np.asarray(m) - p,
                          _copy(base.params), _copy(motivated.params), mid.params)
  # The base region moves by both gradients; the extensions by the motivated one.
  chex.assert_trees_all_close(got.params, expected, rtol=1e-5, atol=1e-6)
  moved_base = jax.tree.map(lambda b, p: np.abs(np.asarray(b) - p).max(), _copy(base.params),
                            mid.params)
  assert max(jax.tree.leaves(moved_base)) > 1e-3  # a base gradient that is not negligible
  for subnet, alone in (("base", base), ("motivated", motivated)):
    chex.assert_trees_all_close(got.batch_stats[subnet], alone.batch_stats[subnet],
                                rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["loss"], motivated_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["base_loss"], base_metrics["loss"], rtol=1e-5)
  assert int(got.step) == int(mid.step) + 1
  assert jax.tree.leaves(start.params)  # (the initial state was used above)


def test_joint_policy_refuses_shared_batch_norm_statistics(batch):
  model, optimizer = MODELS["cnn"](), optax.sgd(0.05)
  state, _, joint = _setup(model, optimizer, batch, policy="joint", batch_norm_stats="shared")
  with pytest.raises(ValueError, match="policy 'joint' needs batch_norm_stats='per_subnet'"):
    joint["motivated"](state, batch)


def test_the_schedule_is_indexed_by_the_batch_count_under_both_policies(batch):
  # A schedule that is non-zero only at position 1: a step at any other
  # position moves no parameter.
  optimizer = optax.sgd(lambda count: jnp.where(count == 1, 0.1, 0.0))
  model = MODELS["mlp"]()
  for policy in ("switch", "both", "joint"):
    state, _, fns = _setup(model, optimizer, batch, policy=policy)
    kinds = ("motivated", "base", "motivated", "base")
    for t, kind in enumerate(kinds):
      before = _copy(state.params)
      state, _ = fns[kind](state, make_batch(seed=t))
      moved = not np.array_equal(before["head"]["kernel"], state.params["head"]["kernel"])
      assert moved == (t == 1), (policy, t, kind)
    assert int(state.step) == len(kinds) and _counts(state.opt_state) == [len(kinds)]


def test_unknown_policy_is_refused(batch):
  with pytest.raises(ValueError, match="policy must be one of"):
    _setup(MODELS["mlp"](), OPTIMIZERS["adamw"](), batch, policy="alternate")


def test_each_step_is_traced_and_compiled_once_over_hundreds_of_switches():
  model, optimizer = MODELS["mlp"](), OPTIMIZERS["adamw"]()
  batches = [make_batch(seed=i) for i in range(4)]
  state, wmap, raw = _setup(model, optimizer, batches[0], jit=False)
  # chex counts traces of the pure functions; the monitoring listener counts
  # XLA compilations of anything at all while the loop runs.

  def base(state, batch):
    return raw["base"](state, batch)

  def motivated(state, batch):
    return raw["motivated"](state, batch)

  fns = {"base": jax.jit(chex.assert_max_traces(base, n=1), donate_argnums=0),
         "motivated": jax.jit(chex.assert_max_traces(motivated, n=1), donate_argnums=0)}
  compiles = []
  listener = lambda event, duration, **kw: compiles.append(event) if (
      event == "/jax/core/compile/backend_compile_duration") else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  controller = Controller(make_condition("random", p=0.5, seed=3), decision_lag=1)
  kinds, pending = [], []
  try:
    for t in range(400):
      kind = controller.next_kind()
      state, metrics = fns[kind](state, batches[t % 4])
      kinds.append(kind)
      pending.append((t, metrics["loss"]))
      if len(pending) > 1:
        step, loss = pending.pop(0)
        controller.observe(step, float(loss))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  switches = sum(a != b for a, b in zip(kinds, kinds[1:]))
  assert switches >= 150
  assert len(compiles) == 2, compiles


def test_steps_run_data_parallel_with_explicit_shardings():
  from jax.sharding import NamedSharding, PartitionSpec as P
  assert len(jax.devices()) == 4  # conftest asks XLA for 4 CPU devices
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  model, optimizer, state, wmap, plain = _fresh("cnn", "sgd_momentum")
  batch = make_batch(n=16)
  state_sharding = jax.tree.map(lambda _: NamedSharding(mesh, P()), state)
  batch_sharding = NamedSharding(mesh, P("data"))
  sharded = steps.make_train_steps(model, optimizer, wmap=wmap, state_sharding=state_sharding,
                                   batch_sharding=batch_sharding)
  expected = _copy(state)
  got = jax.device_put(state, state_sharding)
  for kind in ("motivated", "base", "base"):
    expected, _ = plain[kind](expected, batch)
    got, metrics = sharded[kind](got, jax.device_put(batch, batch_sharding))
  assert got.params["head"]["kernel"].sharding.is_fully_replicated
  chex.assert_trees_all_close(got.params, expected.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(got.batch_stats, expected.batch_stats, rtol=1e-5, atol=1e-6)


def _compute_dtypes(fn, *args) -> set[str]:
  """Operand dtypes of every matmul and convolution in ``fn``'s program (forward
  and backward), nested programs included."""
  found = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
        found.update(str(v.aval.dtype) for v in eqn.invars)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def _float_dtypes(tree) -> set[str]:
  return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_bfloat16_computes_in_bfloat16_keeps_the_state_float32_and_the_base_step_its_region(
    model_name):
  model = MODELS[model_name]().clone(dtype=jnp.bfloat16)
  optimizer = OPTIMIZERS["adamw"]()
  batch = make_batch()
  state, wmap, fns = _setup(model, optimizer, batch)
  raw = steps.make_train_steps(model, optimizer, wmap=wmap, jit=False)
  for kind in ("base", "motivated"):  # traced, not compiled
    assert _compute_dtypes(raw[kind], state, batch) == {"bfloat16"}, kind
    new_state, metrics = jax.eval_shape(raw[kind], state, batch)
    assert _float_dtypes(new_state) == {"float32"} and metrics["loss"].dtype == jnp.float32
  if model_name in ("efficientnet", "resnet_imagenet"):
    return  # one compiled step for the MLP, the batch-norm CNN and the ViT is enough
  # Moments and statistics non-zero everywhere (as after a motivated step), so
  # that a base step leaking outside its region would move them.
  state = state.replace(opt_state=randomise(state.opt_state),
                        batch_stats=randomise(state.batch_stats))
  before = _copy(state)
  state, metrics = fns["base"](state, batch)
  assert changed_outside_base(before, _copy(state), wmap, optimizer) == []
  assert not np.array_equal(before.params["head"]["kernel"], state.params["head"]["kernel"])
  assert _float_dtypes(state) == {"float32"} and np.isfinite(metrics["loss"])


def _poisoned(how, seed=0):
  """A batch whose loss is not finite: a NaN or inf pixel, or a label past the
  last class (the cross entropy's gather then reads NaN)."""
  batch = make_batch(seed=seed)
  if how == "label_out_of_range":
    return {**batch, "label": batch["label"].at[3].set(200)}
  value = float("nan") if how == "nan_image" else float("inf")
  return {**batch, "image": batch["image"].at[2, 1, 1, 0].set(value)}


def _model_state(state):
  return {"params": state.params, "batch_stats": state.batch_stats,
          "opt_state": state.opt_state}


@pytest.mark.parametrize("policy", ["switch", "both", "joint"])
@pytest.mark.parametrize("how", ["nan_image", "inf_image", "label_out_of_range"])
def test_a_non_finite_batch_is_not_applied_by_either_step(policy, how):
  _, _, state, _, fns = _fresh("cnn", "adamw", policy=policy)
  state, _ = fns["motivated"](state, make_batch(seed=1))  # mid-run: moments are non-zero
  for i, kind in enumerate(("base", "motivated", "base")):
    before = _copy(state)
    state, metrics = fns[kind](state, _poisoned(how, seed=i))
    assert bool(metrics["nonfinite"])
    if how == "label_out_of_range":
      assert not np.isfinite(metrics["loss"])
    # (A bad pixel can leave this CNN's loss finite and only its gradient not.)
    after = _copy(state)
    # Bit for bit, every leaf, the optimizer's count included.
    jax.tree.map(np.testing.assert_array_equal, _model_state(before), _model_state(after))
    assert int(after.step) == int(before.step) + 1  # the batch count still advances
  # ... and training goes on from there.
  before = _copy(state)
  state, metrics = fns["base"](state, make_batch(seed=7))
  assert not bool(metrics["nonfinite"]) and np.isfinite(metrics["loss"])
  assert not np.array_equal(before.params["head"]["kernel"], state.params["head"]["kernel"])


# "both" compiles two more programs: in the full run only.
@pytest.mark.parametrize("policy", ["switch", pytest.param("both", marks=pytest.mark.slow)])
def test_the_finite_check_changes_no_bit_of_a_finite_step(monkeypatch, policy):
  """The same steps built without the select (``keep_if`` taking the update
  as it is) give the same state and metrics, bit for bit."""
  model, optimizer, host, wmap, guarded = _compiled("cnn", "adamw", policy=policy)
  monkeypatch.setattr(steps, "keep_if", lambda finite, new, old: new)
  unguarded = steps.make_train_steps(model, optimizer, wmap=wmap, policy=policy)
  monkeypatch.undo()
  states = {"guarded": jax.device_put(_copy(host)), "unguarded": jax.device_put(_copy(host))}
  for i, kind in enumerate(("motivated", "base", "base", "motivated")):
    outputs = {}
    for name, fns in (("guarded", guarded), ("unguarded", unguarded)):
      states[name], metrics = fns[kind](states[name], make_batch(seed=20 + i))
      outputs[name] = (_copy(states[name]),
                       {k: np.asarray(v) for k, v in metrics.items() if k != "nonfinite"})
    jax.tree.map(np.testing.assert_array_equal, outputs["guarded"], outputs["unguarded"])
