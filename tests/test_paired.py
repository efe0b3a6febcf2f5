"""Bring your own model: two configurations of an ordinary Linen or NNX module
(examples/byom_models.py), paired, checked to nest, trained by the package's steps."""

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import ROOT, make_batch
from motivation_jax import nesting, recalibration, steps
from motivation_jax.errors import ConfigError, NestingError

sys.path.insert(0, ROOT)  # examples/ is not a package that is installed
from examples import byom_models as user  # noqa: E402

PAIRS = {
    "linen_mlp": lambda: (user.MLP((16, 8)), user.MLP((32, 16))),
    "linen_transformer": lambda: (user.Transformer(2, 16, 1), user.Transformer(4, 32, 2)),
    "nnx_mlp": lambda: (lambda rngs: user.NNXMLP((16, 8), rngs=rngs),
                        lambda rngs: user.NNXMLP((32, 16), rngs=rngs)),
    "nnx_transformer": lambda: (lambda rngs: user.NNXTransformer(2, 16, 1, rngs=rngs),
                                lambda rngs: user.NNXTransformer(4, 32, 2, rngs=rngs)),
}
SEED = 7


@pytest.fixture(scope="module", params=sorted(PAIRS))
def pair(request):
  batch = make_batch(n=8)
  model = nesting.paired(*PAIRS[request.param](), batch["image"])
  # SGD, not Adam: attention's key bias has an analytically zero gradient, whose
  # float noise Adam's g / |g| would blow up to a full step in either program.
  optimizer = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.1, momentum=0.9))
  wmap = nesting.weights_map(model, batch["image"], subnet="motivated")
  fns = steps.make_train_steps(model, optimizer, wmap=wmap, seed=SEED, jit=False)
  fns = {k: jax.jit(f) for k, f in fns.items()}  # not donated: the tests reuse the state
  state = steps.create_train_state(model, optimizer, jax.random.key(0), batch["image"])
  return request.param, model, optimizer, wmap, fns, state, batch


def _outside_base(tree, regions):
  """Every entry of ``tree`` outside the base (the base's slice set to 0)."""
  def outside(r, x):
    if not r.in_base:
      return x
    return x.at[tuple(slice(0, d) for d in r.base_shape)].set(0)
  return jax.tree.map(outside, regions, tree)


def test_the_pair_nests_exactly(pair):
  _, model, *_ = pair
  assert model.exact and model.gap < 1e-5


def test_a_base_step_leaves_everything_outside_the_base_bit_identical(pair):
  name, model, optimizer, wmap, fns, state, batch = pair
  state = state.replace(step=jnp.asarray(3, jnp.int32))
  new, metrics = fns["base"](state, batch)
  assert np.isfinite(float(metrics["loss"]))
  before = _outside_base(state.params, wmap.params)
  after = _outside_base(new.params, wmap.params)
  jax.tree.map(np.testing.assert_array_equal, before, after)
  # The base did change, so the test can fail the other way.
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, new.params)
  assert any(jax.tree.leaves(changed))
  if jax.tree.leaves(wmap["batch_stats"]):
    jax.tree.map(np.testing.assert_array_equal,
                 _outside_base(state.batch_stats["base"], wmap["batch_stats"]),
                 _outside_base(new.batch_stats["base"], wmap["batch_stats"]))


def test_a_base_step_is_an_ordinary_optax_step_of_the_small_module(pair):
  name, model, optimizer, wmap, fns, state, batch = pair
  step = 5
  state = state.replace(step=jnp.asarray(step, jnp.int32))
  new, metrics = fns["base"](state, batch)
  small = model.standalone("base")
  variables = nesting.export(state.variables("base"), "base", wmap)
  params, stats = variables["params"], variables.get("batch_stats", {})
  rngs = steps.batch_rngs(SEED, step, "base")

  @jax.jit
  def ordinary(params, stats, opt_state):
    def loss_fn(p):
      if isinstance(small, nn.Module):
        logits, mutated = small.apply({"params": p, "batch_stats": stats}, batch["image"],
                                      train=True, mutable=["batch_stats"], rngs=rngs)
      else:  # the NNX module, merged with these variables and RNG state
        logits, mutated = small.apply({"params": p, "batch_stats": stats}, batch["image"],
                                      train=True, mutable=True, rngs=rngs)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
      return loss, mutated.get("batch_stats", {})
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, loss

  want_params, want_stats, want_loss = ordinary(params, stats, optimizer.init(params))
  got = nesting.export(new.variables("base"), "base", wmap)
  np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               got["params"], want_params)
  if want_stats:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 got["batch_stats"], want_stats)


def test_dropout_draws_a_key_per_batch_and_repeats_it_exactly(pair):
  name, model, optimizer, wmap, fns, state, batch = pair
  at = lambda t: fns["motivated"](state.replace(step=jnp.asarray(t, jnp.int32)), batch)[1]
  first, again, other = at(2), at(2), at(3)
  assert float(first["loss"]) == float(again["loss"])  # a resumed batch draws the same
  assert float(first["loss"]) != float(other["loss"])  # dropout is on, per batch


def test_each_step_kind_compiles_once(pair):
  name, model, optimizer, wmap, fns, state, batch = pair
  jitted = steps.make_train_steps(model, optimizer, wmap=wmap, seed=SEED)
  s = jax.tree.map(jnp.copy, state)
  for kind in ("base", "motivated", "base", "motivated"):
    s, _ = jitted[kind](s, batch)
  assert all(fn._cache_size() == 1 for fn in jitted.values())


@pytest.mark.parametrize("pair", ["linen_mlp", "nnx_mlp"], indirect=True)  # batch norm, dropout
def test_policy_both_is_the_base_step_then_the_motivated_step(pair):
  name, model, optimizer, wmap, fns, state, batch = pair
  both = jax.jit(steps.make_train_steps(model, optimizer, wmap=wmap, seed=SEED, policy="both",
                                        jit=False)["motivated"])
  state = state.replace(step=jnp.asarray(4, jnp.int32))
  expected, base_metrics = fns["base"](state, batch)
  # Both halves at one batch index: the same dropout keys and schedule position
  # (this SGD has no count to hold back).
  expected, expected_metrics = fns["motivated"](expected.replace(step=state.step), batch)
  got, metrics = both(state, batch)
  assert int(got.step) == 5
  np.testing.assert_allclose(metrics["base_loss"], base_metrics["loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics["loss"], expected_metrics["loss"], rtol=1e-6)
  # One program against two rounds differently, far below one update's size.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               got.params, expected.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               got.batch_stats, expected.batch_stats)
  # The base half did move the base: both updates landed.
  assert not np.allclose(*(jax.tree.leaves(nesting.base_view(p, wmap.params))[0]
                           for p in (got.params, fns["motivated"](state, batch)[0].params)))


def test_policy_joint_trains_a_pair_and_its_base_keeps_its_own_statistics(pair):
  """Policy joint: one update of both losses; the base's batch norms (a pair's
  base gives base-sized statistics) update the base region of its own."""
  name, model, optimizer, wmap, fns, state, batch = pair
  joint = jax.jit(steps.make_train_steps(model, optimizer, wmap=wmap, seed=SEED, policy="joint",
                                         jit=False)["motivated"])
  got, metrics = joint(state, batch)
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["base_loss"]))
  assert jax.tree.map(jnp.shape, got.batch_stats) == jax.tree.map(jnp.shape, state.batch_stats)
  if jax.tree.leaves(wmap["batch_stats"]):
    jax.tree.map(np.testing.assert_array_equal,
                 _outside_base(state.batch_stats["base"], wmap["batch_stats"]),
                 _outside_base(got.batch_stats["base"], wmap["batch_stats"]))
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.batch_stats, got.batch_stats)
    assert all(jax.tree.leaves(moved["base"])) and all(jax.tree.leaves(moved["motivated"]))


@pytest.mark.parametrize("pair", ["linen_mlp", "nnx_mlp"], indirect=True)  # the batch norms
def test_recalibration_reads_ordinary_batch_norms(pair):
  name, model, optimizer, wmap, fns, state, batch = pair
  recalibrate = recalibration.make_recalibrate(model, wmap)
  stats = recalibrate(state, [batch])
  x = batch["image"].reshape((batch["image"].shape[0], -1))
  # The first batch norm sees the first layer's output: its statistics are that batch's.
  key = "bn_0" if "linen" in name else "norms"
  first = stats["base"][key] if "linen" in name else stats["base"][key][0]
  params = state.params["hidden_0"] if "linen" in name else state.params["layers"][0]
  h = x @ params["kernel"][:, :16] + params["bias"][:16]
  np.testing.assert_allclose(first["mean"][:16], h.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(first["var"][:16], h.var(0), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("pair", ["nnx_mlp"], indirect=True)  # its nnx.List
def test_integer_path_keys_are_named_in_errors_and_maps(pair):
  name, model, optimizer, wmap, *_ = pair
  assert wmap.params["layers"][0]["kernel"].base_shape == (64, 16)
  assert nesting.path_name(("params", "layers", 0, "kernel")) == "params/layers/0/kernel"


# --- refusals ------------------------------------------------------------------------------------

class AutoNamed(nn.Module):
  widths: tuple

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for w in self.widths:
      x = nn.relu(nn.Dense(w)(x))
    return nn.Dense(10)(x)


class UnderLayerNorm(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.width, name="inp")(x.reshape((x.shape[0], -1)))
    return nn.Dense(10, name="head")(nn.LayerNorm(name="ln")(x))


class PostLN(nn.Module):
  depth: int

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8, name="inp")(x.reshape((x.shape[0], -1)))
    for i in range(self.depth):
      x = nn.LayerNorm(name=f"ln_{i}")(x + nn.Dense(8, name=f"dense_{i}")(x))
    return nn.Dense(10, name="head")(x)


class HeadSize(nn.Module):
  head_dim: int

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], 8, -1))
    return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=2 * self.head_dim,
                                           out_features=8, name="attn")(x, x).mean(1)


class FusedQKV(nn.Module):
  """GPT-2's layout: one [q|k|v] kernel, split along its output axis."""
  heads: int

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], 8, -1))
    q, k, v = jnp.split(nn.Dense(3 * 4 * self.heads, name="qkv")(x), 3, -1)
    weights = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k))
    return nn.Dense(10, name="head")(jnp.einsum("bts,bsd->btd", weights, v).mean(1))


@pytest.mark.parametrize("small,large,words", [
    (FusedQKV(2), FusedQKV(4), "fused layout"),
    (AutoNamed((16,)), AutoNamed((32, 32)), "automatic names"),
    (UnderLayerNorm(16), UnderLayerNorm(32), "normalisation over features"),
    (PostLN(1), PostLN(2), "not the identity"),
    (HeadSize(4), HeadSize(8), "head size"),
])
def test_a_pair_that_does_not_nest_is_refused_in_one_line(small, large, words):
  x = make_batch(n=4)["image"]
  with pytest.raises(NestingError, match=words) as e:
    nesting.paired(small, large, x)
  assert "\n" not in str(e.value)
  # exact=False shares the weights anyway, and says how far apart they are.
  assert nesting.paired(small, large, x, exact=False).gap > 1e-3


def test_shapes_that_do_not_fit_and_mixed_kinds_are_refused():
  x = make_batch(n=4)["image"]
  with pytest.raises(NestingError, match="has shape"):
    nesting.paired(user.MLP((32,)), user.MLP((16,)), x)
  with pytest.raises(ConfigError, match="not one of each"):
    nesting.paired(user.MLP((8,)), lambda rngs: user.NNXMLP((16,), rngs=rngs), x)


def test_zero_extension_init_follows_each_kernel_layout_or_is_refused():
  x = make_batch(n=4)["image"]
  mlp = nesting.paired(user.MLP((16, 8)), user.MLP((32, 16)), x)
  assert mlp.zero_init is None
  variables = nesting.init_variables(mlp, jax.random.key(0), x, extension_init="zero")
  # The motivated model starts out computing the base.
  np.testing.assert_allclose(mlp.apply(variables, x, subnet="motivated"),
                             mlp.apply(variables, x, subnet="base"), rtol=1e-5, atol=1e-5)
  # [D, H, hd] attention kernels: heads at a fixed head size, zeroed by their own layout.
  tokens = jax.random.normal(jax.random.key(1), (4, 8, 16))
  heads = nesting.paired(user.Block(16, 2, 16), user.Block(16, 4, 32), tokens)
  assert heads.zero_init is None
  q = nesting.init_variables(heads, jax.random.key(0), tokens, extension_init="zero")["params"]
  # A new head's query kernel is not zeroed (its gradient would stay 0 forever);
  # its rows into the base's outputs are.
  assert jnp.any(q["attn"]["query"]["kernel"][:, 2:] != 0)
  assert jnp.all(q["attn"]["out"]["kernel"][2:] == 0)
  np.testing.assert_allclose(heads.apply({"params": q}, tokens, subnet="motivated"),
                             heads.apply({"params": q}, tokens, subnet="base"), atol=1e-5)
  deeper = nesting.paired(user.Transformer(2, 16, 1), user.Transformer(2, 16, 2), x)
  # Where it does not hold, the first module that differs is named, found only
  # when asked (inside the initialisation's trace here), not when the pair is made.
  assert callable(deeper._zero_init)
  with pytest.raises(NestingError, match=r"extension_init='zero' cannot be used.*"
                                         r"does not compute the base \(block_1/ln1 \(LayerNorm\)"):
    nesting.init_variables(deeper, jax.random.key(0), x, extension_init="zero")
  assert deeper.zero_init.startswith("with the weights from extension inputs")
