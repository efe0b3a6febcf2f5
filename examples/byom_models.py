"""Ordinary Flax models, written with no knowledge of motivation_jax, that the
"bring your own model" tests pair (``nesting.paired``, or
``config.model.module = "examples.byom_models:MLP"`` run from the repository root)."""

from typing import Sequence

import flax.linen as nn
from flax import nnx


class MLP(nn.Module):
  """Linen: Dense -> BatchNorm -> relu -> Dropout per hidden layer, named layers."""
  widths: Sequence[int]
  num_classes: int = 10
  dropout: float = 0.1

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate(self.widths):
      x = nn.Dense(width, name=f"hidden_{i}")(x)
      x = nn.BatchNorm(use_running_average=not train, name=f"bn_{i}")(x)
      x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))
    return nn.Dense(self.num_classes, name="head")(x)


class Block(nn.Module):
  """Linen pre-LN transformer block: attention at a fixed head size, then an FFN."""
  dim: int
  heads: int
  mlp_dim: int
  head_dim: int = 8

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.LayerNorm(name="ln1")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.heads, qkv_features=self.heads * self.head_dim, out_features=self.dim,
        name="attn")(y, y)
    x = x + y
    y = nn.LayerNorm(name="ln2")(x)
    y = nn.Dense(self.dim, name="ffn_out")(nn.gelu(nn.Dense(self.mlp_dim, name="ffn_in")(y)))
    return x + nn.Dropout(0.1, deterministic=not train)(y)


class Transformer(nn.Module):
  """Linen: 8x8 images as 8 tokens of 8 pixels, ``depth`` pre-LN blocks, mean pool."""
  heads: int
  mlp_dim: int
  depth: int
  dim: int = 16
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(self.dim, name="embed")(x.reshape((x.shape[0], 8, -1)))
    for i in range(self.depth):
      x = Block(self.dim, self.heads, self.mlp_dim, name=f"block_{i}")(x, train)
    return nn.Dense(self.num_classes, name="head")(nn.LayerNorm(name="ln")(x).mean(1))


class NNXMLP(nnx.Module):
  """NNX: Linear -> BatchNorm -> relu -> Dropout per hidden layer (an nnx.List)."""

  def __init__(self, widths: Sequence[int], num_classes: int = 10, in_features: int = 64, *,
               rngs: nnx.Rngs):
    self.layers, self.norms = nnx.List([]), nnx.List([])
    d = in_features
    for width in widths:
      self.layers.append(nnx.Linear(d, width, rngs=rngs))
      self.norms.append(nnx.BatchNorm(width, rngs=rngs))
      d = width
    self.dropout = nnx.Dropout(0.1, rngs=rngs)
    self.head = nnx.Linear(d, num_classes, rngs=rngs)

  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for layer, norm in zip(self.layers, self.norms):
      x = self.dropout(nnx.relu(norm(layer(x))))
    return self.head(x)


class NNXTransformer(nnx.Module):
  """NNX: pre-LN blocks of nnx.MultiHeadAttention (fixed head size) and an FFN."""

  def __init__(self, heads: int, mlp_dim: int, depth: int, dim: int = 16, head_dim: int = 8,
               num_classes: int = 10, *, rngs: nnx.Rngs):
    self.embed = nnx.Linear(8, dim, rngs=rngs)
    self.blocks = nnx.List([])
    for _ in range(depth):
      self.blocks.append(nnx.Dict(
          ln1=nnx.LayerNorm(dim, rngs=rngs), ln2=nnx.LayerNorm(dim, rngs=rngs),
          attn=nnx.MultiHeadAttention(heads, dim, heads * head_dim, dim, decode=False,
                                      rngs=rngs),
          ffn_in=nnx.Linear(dim, mlp_dim, rngs=rngs), ffn_out=nnx.Linear(mlp_dim, dim, rngs=rngs)))
    self.dropout = nnx.Dropout(0.1, rngs=rngs)
    self.ln = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, num_classes, rngs=rngs)

  def __call__(self, x):
    x = self.embed(x.reshape((x.shape[0], 8, -1)))
    for b in self.blocks:
      y = b["ln1"](x)
      x = x + b["attn"](y, y)
      x = x + self.dropout(b["ffn_out"](nnx.gelu(b["ffn_in"](b["ln2"](x)))))
    return self.head(self.ln(x).mean(1))

