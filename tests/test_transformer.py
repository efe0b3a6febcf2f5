"""The decoder-only transformer: causal, cached decoding as the full forward,
the base configurations nested in the motivated one, its parameter and FLOP
formulas."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from motivation_jax import models
from motivation_jax.errors import ConfigError
from motivation_jax.models import transformer
from motivation_jax.models.transformer import Transformer

from conftest import apply

LARGE = Transformer(vocab_size=61, d_model=16, num_heads=4, head_dim=4, ffn_dim=32,
                    num_layers=3, seq_len=12)
# The base of each nesting axis (d_model fixed), and all three at once.
SMALL = {"ffn": LARGE.clone(ffn_dim=8),
         "heads": LARGE.clone(num_heads=2),
         "depth": LARGE.clone(num_layers=1),
         "all": LARGE.clone(ffn_dim=8, num_heads=2, num_layers=2)}


def _tokens(batch=2, length=12, vocab=61, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, length)), jnp.int32)


def _params(model, seed=0):
  return model.init(jax.random.key(seed), _tokens(1, 4))["params"]


def _randomised(params, seed=1):
  """Norm scales away from 1, so a test of them can fail."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + jnp.asarray(0.1 * rng.normal(size=x.shape), x.dtype),
                      params)


def _nested(large_params, small_model):
  """(the small model's params as the leading slices of the large one's, the large
  params with everything outside those slices zeroed)."""
  shapes = jax.eval_shape(lambda: _params(small_model))
  sliced = {k: jax.tree.map(lambda big, s: big[tuple(slice(0, n) for n in s.shape)],
                            large_params[k], shapes[k]) for k in shapes}

  def zero_outside(big, s):
    inside = np.zeros(big.shape, bool)
    inside[tuple(slice(0, n) for n in s.shape)] = True
    return jnp.where(inside, big, 0)

  zeroed = {k: (jax.tree.map(zero_outside, v, shapes[k]) if k in shapes
                else jax.tree.map(jnp.zeros_like, v)) for k, v in large_params.items()}
  return sliced, zeroed


@pytest.mark.parametrize("axis", sorted(SMALL))
@pytest.mark.parametrize("positions", transformer.POSITIONS)
def test_the_base_is_a_sub_network_of_the_motivated_model(axis, positions):
  large = LARGE.clone(positions=positions)
  small = SMALL[axis].clone(positions=positions)
  params = _randomised(_params(large))
  sliced, zeroed = _nested(params, small)
  x = _tokens()
  small_logits = apply(small, {"params": sliced}, x)
  large_logits = apply(large, {"params": zeroed}, x)
  # Gap 0 up to float rounding: the extra terms are exact zeros, but a sum over
  # more (zero) terms may be grouped otherwise (XLA's CPU backend: bit-identical on
  # the machine these tests were written on, up to 3.6e-7 apart on another one). The d_model control below
  # is 1e-3 and more; nesting.paired's own tolerance is 1e-5 at this scale.
  np.testing.assert_allclose(small_logits, large_logits, rtol=0, atol=1e-5)
  # The slices matter: the whole large model computes something else.
  assert np.abs(apply(large, {"params": params}, x) - small_logits).max() > 1e-2


def test_d_model_does_not_nest_under_layernorm():
  # The control that shows the check above can fail: a narrower d_model on the
  # leading slices is not the wider model with the rest zeroed.
  small = LARGE.clone(d_model=8)
  params = _randomised(_params(LARGE))
  sliced, zeroed = _nested(params, small)
  x = _tokens()
  small_logits = apply(small, {"params": sliced}, x)
  large_logits = apply(LARGE, {"params": zeroed}, x)
  assert np.abs(small_logits - large_logits).max() > 1e-3


@pytest.mark.parametrize("positions", transformer.POSITIONS)
def test_a_later_token_never_changes_an_earlier_logit(positions):
  model = LARGE.clone(positions=positions)
  params = {"params": _randomised(_params(model))}
  x = _tokens()
  changed = x.at[:, 7:].set((x[:, 7:] + 1) % model.vocab_size)
  before, after = apply(model, params, x), apply(model, params, changed)
  np.testing.assert_array_equal(before[:, :7], after[:, :7])
  assert np.abs(before[:, 7:] - after[:, 7:]).max() > 1e-3


@pytest.mark.parametrize("positions, tie", [("rotary", True), ("learned", False)])
def test_cached_decoding_gives_the_full_forward_logits(positions, tie):
  model = LARGE.clone(positions=positions, tie_embeddings=tie, norm="rmsnorm")
  params = _randomised(_params(model))
  x = _tokens()
  full = apply(model, {"params": params}, x)
  decode = jax.jit(lambda p, c, t: transformer.decode(model, p, c, t))
  cache = transformer.init_cache(model, 2)
  assert int(cache["index"]) == 0
  steps = []
  for i in range(x.shape[1]):  # one token at a time
    logits, cache = decode(params, cache, x[:, i:i + 1])
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, rtol=0, atol=1e-5)
  assert int(cache["index"]) == x.shape[1]
  # A prompt of 5 at once, then the rest: the same logits.
  cache = transformer.init_cache(model, 2)
  first, cache = decode(params, cache, x[:, :5])
  rest, cache = decode(params, cache, x[:, 5:])
  np.testing.assert_allclose(jnp.concatenate([first, rest], 1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model", [
    LARGE, LARGE.clone(tie_embeddings=False), LARGE.clone(positions="learned"),
    LARGE.clone(norm="rmsnorm", num_layers=1)])
def test_the_parameter_count_formula_counts_init(model):
  params = _params(model)
  assert transformer.param_count(model) == sum(x.size for x in jax.tree.leaves(params))
  names = set(params)
  assert {f"block_{i}" for i in range(model.num_layers)} <= names  # depth nests by name
  assert ("head_DxV" in names) == (not model.tie_embeddings)
  assert not any("bias" in "/".join(map(str, path))
                 for path, _ in jax.tree_util.tree_leaves_with_path(params))


def test_the_flops_formula_matches_xla_on_the_forward_and_the_gradient():
  # nanoGPT's CPU shape, where matmuls dominate the elementwise work XLA also counts.
  model = Transformer(vocab_size=256, d_model=128, num_heads=4, head_dim=32, ffn_dim=512,
                      num_layers=2, seq_len=64)
  params = jax.eval_shape(lambda: _params(model))
  x = jax.ShapeDtypeStruct((4, 64), jnp.int32)
  tokens = 4 * 64

  def flops(fn):
    cost = jax.jit(fn).lower(params, x).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]

  forward = flops(lambda p, t: model.apply({"params": p}, t))
  expected = transformer.flops_per_token(model, training=False) * tokens
  assert abs(forward - expected) < 0.05 * expected, (forward, expected)
  loss = lambda p, t: model.apply({"params": p}, t).sum()
  training = flops(jax.grad(loss))
  expected = transformer.flops_per_token(model) * tokens
  assert abs(training - expected) < 0.05 * expected, (training, expected)


def test_dropout_is_on_only_when_asked():
  model = LARGE.clone(dropout_rate=0.5)
  params = {"params": _params(model)}
  x = _tokens()
  plain = apply(LARGE, params, x)
  np.testing.assert_array_equal(apply(model, params, x), plain)  # deterministic by default
  dropped = jax.jit(lambda v, t: model.apply(v, t, deterministic=False,
                                             rngs={"dropout": jax.random.key(2)}))(params, x)
  assert np.abs(dropped - plain).max() > 1e-3


def test_bfloat16_computes_in_bfloat16_with_float32_params_and_logits():
  model = LARGE.clone(dtype=jnp.bfloat16)
  params = _params(model)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  logits = apply(model, {"params": params}, _tokens())
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, apply(LARGE, {"params": params}, _tokens()), atol=0.05)


def test_the_description_builds_the_same_model():
  model = LARGE.clone(positions="learned", dtype=jnp.bfloat16)
  spec = transformer.describe(model)
  assert spec["kwargs"]["dtype"] == "bfloat16"
  assert models.build_standalone(spec) == model


@pytest.mark.parametrize("field, value, match", [
    ("positions", "sinusoidal", "positions must be one of"),
    ("norm", "batchnorm", "norm must be one of"),
    ("head_dim", 5, "even head_dim")])
def test_a_bad_field_is_a_config_error(field, value, match):
  with pytest.raises(ConfigError, match=match):
    LARGE.clone(**{field: value})


def test_more_tokens_than_the_context_is_a_config_error():
  with pytest.raises(ConfigError, match="more than seq_len=12"):
    LARGE.init(jax.random.key(0), _tokens(1, 13))
