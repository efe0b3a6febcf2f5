"""The causal-LM task at the step boundary: the nested transformer's base step
is an ordinary step of the standalone base and leaves everything outside it
bit-identical; one compile per kind; the held-out metrics' arithmetic;
gradient clipping for every family."""

import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from motivation_jax import models, nesting, steps, tasks
from motivation_jax.controller import Controller, make_condition
from motivation_jax.errors import ConfigError

from test_steps import changed_outside_base

VOCAB, LENGTH = 37, 8
MODEL = ml_collections.ConfigDict({
    "name": "transformer", "d_model": 16, "head_dim": 4, "seq_len": LENGTH,
    "base": {"num_heads": 2, "ffn_dim": 8, "num_layers": 1},
    "motivated": {"num_heads": 4, "ffn_dim": 32, "num_layers": 2},
    "batch_norm_stats": "per_subnet", "extension_init": "default"})
OPTIMIZER = lambda: optax.chain(optax.clip_by_global_norm(1.0),
                                optax.adamw(1e-2, eps=1e-4, weight_decay=0.1))


def _tokens(seed, batch=4):
  return {"tokens": jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, LENGTH + 1)),
                                jnp.int32)}


def _copy(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


@pytest.fixture(scope="module")
def lm():
  model = models.build_model(MODEL, VOCAB)
  sample = jnp.zeros((1, LENGTH), jnp.int32)
  wmap = nesting.weights_map(model, sample, subnet="motivated")
  optimizer = OPTIMIZER()
  state = steps.create_train_state(model, optimizer, jax.random.key(0), sample)
  fns = steps.make_train_steps(model, optimizer, wmap=wmap, task=tasks.CAUSAL_LM)
  return model, optimizer, wmap, _copy(state), fns


def test_the_lm_base_step_is_the_standalone_base_step_and_changes_nothing_outside(lm):
  model, optimizer, wmap, state, fns = lm
  state, _ = fns["motivated"](jax.device_put(_copy(state)), _tokens(9))
  host = _copy(state)
  params = nesting.export(host.variables("base"), "base", wmap)["params"]
  opt_state = nesting.export_opt_state(optimizer, host.opt_state, wmap)
  standalone = model.standalone("base")

  @jax.jit
  def reference(params, opt_state, batch):  # an ordinary LM step, written independently
    def loss(p):
      logits = standalone.apply({"params": p}, batch["tokens"][:, :-1], deterministic=False)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, batch["tokens"][:, 1:]).mean()
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  for i in range(3):
    batch = _tokens(10 + i)
    before = _copy(state)
    state, metrics = fns["base"](state, batch)
    assert changed_outside_base(before, _copy(state), wmap, optimizer) == []
    params, opt_state, loss = reference(params, opt_state, batch)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  got = nesting.export(_copy(state.variables("base")), "base", wmap)["params"]
  chex.assert_trees_all_close(got, params, rtol=2e-5, atol=2e-6)
  assert not np.array_equal(before.params["block_0"]["ffn_in_DxF"],
                            state.params["block_0"]["ffn_in_DxF"])


def test_each_lm_step_compiles_once_over_many_switches(lm):
  model, optimizer, wmap, state, _ = lm
  raw = steps.make_train_steps(model, optimizer, wmap=wmap, task=tasks.CAUSAL_LM, jit=False)
  fns = {k: jax.jit(chex.assert_max_traces(f, n=1), donate_argnums=0) for k, f in raw.items()}
  compiles = []
  listener = lambda event, duration, **kw: compiles.append(event) if (
      event == "/jax/core/compile/backend_compile_duration") else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  controller = Controller(make_condition("random", p=0.5, seed=3), decision_lag=0)
  batches = [_tokens(i) for i in range(2)]
  state, kinds = jax.device_put(_copy(state)), []
  try:
    for t in range(60):
      kind = controller.next_kind()
      state, metrics = fns[kind](state, batches[t % 2])
      controller.observe(t, float(metrics["loss"]))
      kinds.append(kind)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert sum(a != b for a, b in zip(kinds, kinds[1:])) >= 20
  assert len(compiles) == 2, compiles


def test_the_compiled_lm_steps_cost_the_flops_formula_of_each_sub_network():
  """XLA's count of each compiled train step is ``flops_per_token`` of that
  sub-network's standalone transformer (6 N plus attention) times the tokens:
  the base step slices, it does not compute the motivated width masked. At
  nanoGPT's CPU shape, where matmuls dominate what else XLA counts (softmax,
  norms, AdamW's update); the cost test of the plain module is test_transformer.py's."""
  from motivation_jax.models import transformer
  shape = MODEL.to_dict()
  shape.update(d_model=128, head_dim=32, seq_len=64,
               base={"num_heads": 2, "ffn_dim": 128, "num_layers": 1},
               motivated={"num_heads": 4, "ffn_dim": 512, "num_layers": 2})
  model = models.build_model(ml_collections.ConfigDict(shape), 256)
  optimizer = optax.adamw(1e-3)
  sample = jnp.zeros((1, 64), jnp.int32)
  wmap = nesting.weights_map(model, sample, subnet="motivated")
  state = jax.eval_shape(lambda: steps.create_train_state(model, optimizer, jax.random.key(0),
                                                          sample))
  # XLA counts 3-4% over the formula here (2026-12-03): softmax, norms, AdamW's update.
  batch = {"tokens": jax.ShapeDtypeStruct((8, 65), jnp.int32)}
  fns = steps.make_train_steps(model, optimizer, wmap=wmap, task=tasks.CAUSAL_LM)
  flops = {}
  for subnet in ("base", "motivated"):
    flops[subnet] = steps.compiled_flops(fns[subnet].lower(state, batch).compile())
    expected = transformer.flops_per_token(model.standalone(subnet), seq_len=64) * 8 * 64
    assert abs(flops[subnet] - expected) < 0.05 * expected, (subnet, flops[subnet], expected)
  assert flops["base"] < 0.4 * flops["motivated"], flops


def test_the_lm_loss_is_token_weighted_over_the_mask():
  logits = jnp.log(jnp.asarray([[[0.5, 0.5], [0.9, 0.1]], [[0.2, 0.8], [0.5, 0.5]]]))
  batch = {"tokens": jnp.asarray([[0, 0, 1], [0, 1, 0]]),
           "mask": jnp.asarray([[1.0, 1.0], [1.0, 0.0]])}
  # Targets [0, 1] and [1, -]: three tokens, -ln(0.5), -ln(0.1), -ln(0.8).
  want = -(math.log(0.5) + math.log(0.1) + math.log(0.8)) / 3
  assert float(tasks.CAUSAL_LM.loss(logits, batch)) == pytest.approx(want, rel=1e-6)
  assert float(tasks.CAUSAL_LM.accuracy(logits, batch)) == pytest.approx(2 / 3)  # argmax 0, 0, 1
  sums = jax.device_get(tasks.CAUSAL_LM.eval_sums(logits, batch))
  assert float(sums["count"]) == 3.0


def test_held_out_bits_per_byte_and_perplexity_on_a_hand_made_example():
  # 4 targets at ln 4 nats each (2 bits a token), 2 bytes a token: 1 bit per byte.
  sums = {"loss_sum": 4 * math.log(4), "correct": 1.0, "count": 4.0}
  got = tasks.CAUSAL_LM.eval_metrics(sums, bytes_per_token=2.0)
  assert got["test_bits_per_byte"] == pytest.approx(1.0)
  assert got["test_perplexity"] == pytest.approx(4.0)
  assert got["test_loss"] == pytest.approx(math.log(4)) and got["test_accuracy"] == 0.25
  assert tasks.CLASSIFICATION.eval_metrics(sums) == {"test_accuracy": 0.25,
                                                     "test_loss": math.log(4)}


def test_grad_clip_norm_chains_a_global_norm_clip_and_is_off_by_default():
  config = ml_collections.ConfigDict({"optimizer": "sgd", "learning_rate": 1.0, "momentum": 0.0,
                                      "weight_decay": 0.0, "warmup_epochs": 0.0})
  params = {"w": jnp.zeros(4)}
  grads = {"w": jnp.full(4, 3.0)}  # global norm 6
  plain = steps.make_optimizer(config, 10, 10)
  config.grad_clip_norm = 1.5
  clipped = steps.make_optimizer(config, 10, 10)
  u_plain, _ = plain.update(grads, plain.init(params), params)
  u_clip, _ = clipped.update(grads, clipped.init(params), params)
  np.testing.assert_allclose(u_clip["w"], u_plain["w"] / 4, rtol=1e-6)  # 6 -> 1.5


@pytest.mark.parametrize("change, words", [
    ({"base": {"num_heads": 2, "ffn_dim": 8, "num_layers": 1, "d_model": 8}}, "d_model does not nest"),
    ({"base": {"num_heads": 2, "ffn_dim": 8}}, "needs num_layers"),
    ({"d_model": None}, "config.model.d_model must be"),
])
def test_a_bad_transformer_config_is_one_line(change, words):
  config = ml_collections.ConfigDict(MODEL.to_dict())
  for k, v in change.items():
    config[k] = v
  with pytest.raises(ConfigError, match=words) as e:
    models.build_model(config, VOCAB)
  assert "\n" not in str(e.value)


def test_an_unknown_task_is_refused():
  with pytest.raises(ConfigError, match="config.task must be one of"):
    tasks.get("translation")


def test_fsdp_over_4_devices_gives_the_lm_parameters_of_one_device(lm):
  from motivation_jax import sharding
  model, optimizer, wmap, host_state, _ = lm
  sample = jnp.zeros((1, LENGTH), jnp.int32)
  kinds, batches = ("base", "motivated", "base"), [_tokens(20 + i) for i in range(3)]
  plain = steps.make_train_steps(model, optimizer, wmap=wmap, task=tasks.CAUSAL_LM)
  expected = jax.device_put(_copy(host_state))
  for kind, batch in zip(kinds, batches):
    expected, _ = plain[kind](expected, batch)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "fsdp_min_mib": 0.0})
  layout = sharding.train_state_sharding(steps.abstract_train_state(model, optimizer, sample),
                                         mesh, min_bytes=0)
  batch_sharding = sharding.batch_sharding(mesh)
  fns = steps.make_train_steps(model, optimizer, wmap=wmap, task=tasks.CAUSAL_LM,
                               state_sharding=layout, batch_sharding=batch_sharding)
  order = steps.make_order_converters(optimizer, wmap=wmap, state_sharding=layout)
  state = order["storage"](jax.device_put(_copy(host_state), layout))
  assert state.order == "storage"  # some leaf is interleaved: the storage order is used
  for kind, batch in zip(kinds, batches):
    state, _ = fns[kind](state, jax.device_put(batch, batch_sharding))
  got = jax.device_get(order["logical"](state))
  chex.assert_trees_all_close(got.params, jax.device_get(expected.params), rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(got.opt_state, jax.device_get(expected.opt_state), rtol=1e-5,
                              atol=1e-6)
