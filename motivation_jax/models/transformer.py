"""A decoder-only transformer language model: an ordinary Flax Linen module.

No nesting code: two configurations of ``Transformer`` are paired as base and
motivated model by the adapter for a user's module. The layout makes the base
a sub-network of the motivated model (the leading slices of its parameters,
everything outside them zeroed, give the same logits; tests/test_transformer.py):

- FFN hidden units: ``ffn_in_DxF`` [D, F], ``ffn_out_FxD`` [F, D];
- attention heads at a fixed ``head_dim``: separate ``query_DxHxK``,
  ``key_DxHxK``, ``value_DxHxK`` [D, H, K] and ``out_HxKxD`` [H, K, D], so
  the first heads are the leading slice of the head axis (a fused [q|k|v]
  kernel would interleave them); each head keeps its 1/sqrt(K) scale;
- depth: blocks are named ``block_0 ... block_{n-1}`` and pre-norm, so an
  extra block with zero ``out_HxKxD`` and ``ffn_out_FxD`` is the identity.

``d_model`` does not nest: LayerNorm and RMSNorm take their statistics over
all D features, so extra features change how the base's are normalised
(MatFormer, MatViT and Flextron keep it fixed too).

The network: token embedding ``embed_VxD`` (plus ``position_LxD`` for learned
positions), ``num_layers`` blocks ``x + Attn(Norm(x))`` then ``x +
FFN(Norm(x))`` (GELU), a final norm, and logits from the embedding (tied) or
``head_DxV``. No biases anywhere (the norms have a scale only). Causal
attention runs through ``jax.nn.dot_product_attention(is_causal=True)``: no
mask is built for a training batch, and a GPU gets its fused kernel.
Parameters are float32; ``dtype`` is the compute dtype; logits are float32.

Decoding with a key-value cache (``init_cache``, ``decode``): ``apply(...,
decode=True, mutable=["cache"])`` runs ``tokens`` [B, T] at the cache's
position (``cache["index"]``), attends to everything cached before them, and
appends their keys and values. The cache holds ``seq_len`` positions; the
caller keeps ``index + T <= seq_len`` (``generate.sample`` restarts a full
cache from the last tokens).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from motivation_jax.errors import ConfigError

POSITIONS = ("rotary", "learned")
NORMS = ("layernorm", "rmsnorm")
INIT_STD = 0.02  # GPT-2's; residual outputs get INIT_STD / sqrt(2 * num_layers)


def _norm(kind: str, name: str, dtype) -> nn.Module:
  if kind == "layernorm":
    return nn.LayerNorm(epsilon=1e-5, use_bias=False, dtype=dtype, name=name)
  return nn.RMSNorm(epsilon=1e-5, dtype=dtype, name=name)


def rotary(x_BxLxHxK: jax.Array, positions_L: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding (RoFormer), the two halves of each head rotated."""
  half = x_BxLxHxK.shape[-1] // 2
  frequencies = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles_LxK = positions_L.astype(jnp.float32)[:, None] * frequencies[None, :]
  sin, cos = jnp.sin(angles_LxK)[:, None, :], jnp.cos(angles_LxK)[:, None, :]
  x = x_BxLxHxK.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_BxLxHxK.dtype)


class Block(nn.Module):
  """Pre-norm block: causal multi-head attention, then a GELU FFN."""
  num_heads: int
  head_dim: int
  ffn_dim: int
  seq_len: int
  num_layers: int
  positions: str
  norm: str
  rope_base: float
  dropout_rate: float
  dtype: Any

  @nn.compact
  def __call__(self, x_BxLxD, positions_L, *, deterministic: bool, decode: bool,
               cache_index=None):
    D, H, K, F = x_BxLxD.shape[-1], self.num_heads, self.head_dim, self.ffn_dim
    kernel = nn.initializers.normal(INIT_STD)
    residual = nn.initializers.normal(INIT_STD / math.sqrt(2 * self.num_layers))
    param = lambda name, init, shape: self.param(name, init, shape, jnp.float32).astype(
        self.dtype)
    h = _norm(self.norm, "norm_attention", self.dtype)(x_BxLxD)
    q_BxLxHxK = jnp.einsum("bld,dhk->blhk", h, param("query_DxHxK", kernel, (D, H, K)))
    k_BxLxHxK = jnp.einsum("bld,dhk->blhk", h, param("key_DxHxK", kernel, (D, H, K)))
    v_BxLxHxK = jnp.einsum("bld,dhk->blhk", h, param("value_DxHxK", kernel, (D, H, K)))
    if self.positions == "rotary":
      q_BxLxHxK = rotary(q_BxLxHxK, positions_L, self.rope_base)
      k_BxLxHxK = rotary(k_BxLxHxK, positions_L, self.rope_base)
    if decode:
      batch, length = x_BxLxD.shape[0], x_BxLxD.shape[1]
      shape = (batch, self.seq_len, H, K)
      keys = self.variable("cache", "key_BxSxHxK", jnp.zeros, shape, self.dtype)
      values = self.variable("cache", "value_BxSxHxK", jnp.zeros, shape, self.dtype)
      start = (0, cache_index, 0, 0)
      keys.value = lax.dynamic_update_slice(keys.value, k_BxLxHxK, start)
      values.value = lax.dynamic_update_slice(values.value, v_BxLxHxK, start)
      # Query t (at cache_index + t) sees the cached positions up to its own:
      # a [T, S] mask, small next to the [B, T, H, K] of a decoding step.
      mask_TxS = (jnp.arange(self.seq_len)[None, :]
                  <= cache_index + jnp.arange(length)[:, None])
      attended = jax.nn.dot_product_attention(q_BxLxHxK, keys.value, values.value,
                                              mask=mask_TxS[None, None])
    else:
      attended = jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, is_causal=True)
    out_BxLxD = jnp.einsum("blhk,hkd->bld", attended, param("out_HxKxD", residual, (H, K, D)))
    x_BxLxD = x_BxLxD + nn.Dropout(self.dropout_rate)(out_BxLxD, deterministic=deterministic)
    h = _norm(self.norm, "norm_ffn", self.dtype)(x_BxLxD)
    h_BxLxF = nn.gelu(h @ param("ffn_in_DxF", kernel, (D, F)))
    out_BxLxD = h_BxLxF @ param("ffn_out_FxD", residual, (F, D))
    return x_BxLxD + nn.Dropout(self.dropout_rate)(out_BxLxD, deterministic=deterministic)


class Transformer(nn.Module):
  """Decoder-only LM: ``apply(variables, tokens_BxL) -> logits_BxLxV`` (float32).

  ``seq_len`` is the longest context (the learned position table's and the
  cache's length). ``positions``: "rotary" or "learned"; ``norm``:
  "layernorm" (scale only) or "rmsnorm"; ``tie_embeddings``: logits from
  ``embed_VxD`` (else a separate ``head_DxV``); ``dropout_rate`` on the
  embedding and on each residual branch, off when ``deterministic`` (the
  default; training passes ``deterministic=False`` and a "dropout" RNG).
  """
  vocab_size: int
  d_model: int
  num_heads: int
  head_dim: int
  ffn_dim: int
  num_layers: int
  seq_len: int
  positions: str = "rotary"
  norm: str = "layernorm"
  tie_embeddings: bool = True
  dropout_rate: float = 0.0
  rope_base: float = 10_000.0
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.positions not in POSITIONS:
      raise ConfigError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
    if self.norm not in NORMS:
      raise ConfigError(f"norm must be one of {NORMS}, got {self.norm!r}")
    if self.positions == "rotary" and self.head_dim % 2:
      raise ConfigError(f"rotary positions need an even head_dim, got {self.head_dim}")
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array, *, deterministic: bool = True,
               decode: bool = False) -> jax.Array:
    length = tokens_BxL.shape[1]
    if length > self.seq_len:
      raise ConfigError(f"{length} tokens are more than seq_len={self.seq_len}")
    embed_VxD = self.param("embed_VxD", nn.initializers.normal(INIT_STD),
                           (self.vocab_size, self.d_model), jnp.float32)
    cache_index = None
    if decode:
      index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
      cache_index = index.value
      positions_L = cache_index + jnp.arange(length)
      index.value = cache_index + length
    else:
      positions_L = jnp.arange(length)
    x_BxLxD = jnp.take(embed_VxD, tokens_BxL, axis=0).astype(self.dtype)
    if self.positions == "learned":
      table_LxD = self.param("position_LxD", nn.initializers.normal(INIT_STD),
                             (self.seq_len, self.d_model), jnp.float32)
      x_BxLxD = x_BxLxD + jnp.take(table_LxD, positions_L, axis=0).astype(self.dtype)
    x_BxLxD = nn.Dropout(self.dropout_rate)(x_BxLxD, deterministic=deterministic)
    for i in range(self.num_layers):
      x_BxLxD = Block(self.num_heads, self.head_dim, self.ffn_dim, self.seq_len,
                      self.num_layers, self.positions, self.norm, self.rope_base,
                      self.dropout_rate, self.dtype, name=f"block_{i}")(
                          x_BxLxD, positions_L, deterministic=deterministic, decode=decode,
                          cache_index=cache_index)
    x_BxLxD = _norm(self.norm, "norm_final", self.dtype)(x_BxLxD)
    if self.tie_embeddings:
      head_DxV = embed_VxD.T
    else:
      head_DxV = self.param("head_DxV", nn.initializers.normal(INIT_STD),
                            (self.d_model, self.vocab_size), jnp.float32)
    return (x_BxLxD @ head_DxV.astype(self.dtype)).astype(jnp.float32)


def init_cache(model: Transformer, batch_size: int) -> dict:
  """An empty key-value cache (position 0) for ``batch_size`` sequences."""
  tokens = jnp.zeros((batch_size, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, decode=True))["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def decode(model: Transformer, params, cache, tokens_BxT: jax.Array
           ) -> tuple[jax.Array, dict]:
  """Logits [B, T, V] of ``tokens`` at the cache's position, and the cache after them."""
  logits, variables = model.apply({"params": params, "cache": cache}, tokens_BxT,
                                  decode=True, mutable=["cache"])
  return logits, variables["cache"]


def param_count(model: Transformer) -> int:
  """Parameters of ``model`` (the formula; tests check it against ``init``)."""
  D, V = model.d_model, model.vocab_size
  attention = 4 * D * model.num_heads * model.head_dim
  per_block = attention + 2 * D * model.ffn_dim + 2 * D  # + the two norms' scales
  total = V * D + model.num_layers * per_block + D  # + the final norm
  if model.positions == "learned":
    total += model.seq_len * D
  if not model.tie_embeddings:
    total += D * V
  return total


def matmul_params(model: Transformer) -> int:
  """Parameters used in a matmul for each token: the blocks' kernels and the
  output projection (tied or not); not the embedding lookup, norms or positions."""
  D = model.d_model
  return (model.num_layers * (4 * D * model.num_heads * model.head_dim + 2 * D * model.ffn_dim)
          + D * model.vocab_size)


def flops_per_token(model: Transformer, *, seq_len: int | None = None,
                    training: bool = True) -> float:
  """FLOPs per token: forward ``2 N + 4 n_layers L H K``, training three times that
  (the "6 N plus attention" of Kaplan et al. and PaLM's appendix B).

  ``N`` is ``matmul_params``; the attention term is the scores ``q k^T`` and
  their weighted sum of values for every one of ``L`` (``seq_len``, the
  model's by default) keys, as XLA computes them: the causal mask removes none
  of those FLOPs (a fused kernel may skip half). Elementwise work (softmax,
  norms, GELU) is not counted.
  """
  length = model.seq_len if seq_len is None else seq_len
  attention = 4 * model.num_layers * length * model.num_heads * model.head_dim
  forward = 2 * matmul_params(model) + attention
  return float(3 * forward if training else forward)


def describe(model: Transformer) -> dict[str, Any]:
  """JSON description of ``model`` (``models.build_standalone`` builds it back)."""
  kwargs = {name: getattr(model, name) for name in model.__dataclass_fields__
            if name not in ("parent", "name")}
  kwargs["dtype"] = jnp.dtype(kwargs["dtype"]).name
  return {"module": __name__, "class": type(model).__qualname__, "kwargs": kwargs}
