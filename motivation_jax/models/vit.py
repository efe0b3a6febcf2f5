"""A nested Vision Transformer (ViT-Ti/S/B style, pre-LayerNorm).

The network: non-overlapping ``patch_size`` patches embedded by one kernel
``[p, p, C, D]`` (a strided convolution, applied as a matmul on flattened
patches), a class token, a learned position embedding, ``depth`` encoder
blocks ``x + MSA(LN(x))`` then ``x + MLP(LN(x))`` (GELU), a final LayerNorm
and a dense head on the class token. There is no dropout or stochastic depth:
``train`` changes nothing.

Nesting, by width and by depth. The base reads, in every variable, the leading
slice of the motivated model's:

- embedding dims ``[:D_b]``: patch-embedding outputs, class token and position
  embedding (``[..., :D_b]``), every LayerNorm's scale/bias, the inputs of
  q/k/v and MLP ``fc1``, the outputs of the attention ``out`` projection and of
  MLP ``fc2``, the head's inputs;
- heads ``[:H_b]`` with the head dimension fixed: q/k/v kernels are
  ``[D, H * head_dim]`` with heads contiguous, so the first ``H_b * head_dim``
  columns are the first ``H_b`` heads (``out`` is ``[H * head_dim, D]``);
- MLP hidden units ``[:M_b]``;
- blocks ``[:depth_b]``: the motivated model's extra blocks come at the end.

The base forward runs on those slices (base-sized arrays, no masking). The
head dimension is shared, so every head keeps its ``1/sqrt(head_dim)`` scale in
both sub-networks. As in the other families, initialisers see the motivated
shapes (e.g. Xavier fans of ``D_m``), so a wider motivated model starts the
base with smaller weights than a standalone base would get.

``extension_init="zero"`` (``nesting.init_variables``) zeroes the attention
``out`` projection and MLP ``fc2`` of every extra block, so an extra block
starts as the identity (pre-LN residual), and the generic width rule zeroes
every kernel's weights from extension inputs into base outputs, so extra heads
and extra MLP units add nothing to the embedding dims. Hence at init the
motivated logits equal the base logits exactly when the embedding dimension is
the same (extra blocks, extra heads, wider MLP). They do NOT when the
motivated embedding is wider (``D_m > D_b``, e.g. ViT-Ti -> ViT-S): every
LayerNorm then normalises over all ``D_m`` dims, and the extension dims (fed
from the patches, class token and position embedding, which no zeroing can
silence without making them useless) change the mean and variance the base
dims are normalised with. The extra blocks are still the identity there.
"""

from __future__ import annotations

import numbers
from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from motivation_jax.common import check_subnet
from motivation_jax.errors import ConfigError, NestingError
from motivation_jax.models.layers import NestedDense, nested_variable
from motivation_jax.models.options import subnet_options

# Published sizes: arch -> (embedding dim, heads, depth); head dim 64, MLP 4 * dim.
ARCHS = {"ti": (192, 3, 12), "s": (384, 6, 12), "b": (768, 12, 12)}

_xavier = nn.initializers.xavier_uniform()


class NestedLayerNorm(nn.Module):
  """LayerNorm over the last axis; its scale and bias are sliced to the input's width."""
  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, subnet: str) -> jax.Array:
    shape = (x.shape[-1],)
    scale = nested_variable(self, "params", "scale", nn.initializers.ones, shape, subnet)
    bias = nested_variable(self, "params", "bias", nn.initializers.zeros, shape, subnet)
    # Statistics in float32 even for a bfloat16 compute dtype.
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, -1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
    y = (x32 - mean) * lax.rsqrt(var + self.epsilon)
    return (y * scale + bias).astype(self.dtype)


class PatchEmbedding(nn.Module):
  """Non-overlapping patches -> ``features`` dims; kernel ``[p, p, C, D]`` (conv layout)."""
  features: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, subnet: str) -> jax.Array:
    n, h, w, c = x.shape
    p = self.patch_size
    # [N, H, W, C] -> [N, (H/p)(W/p), p*p*C], flattened in the kernel's (p, p, C) order.
    patches = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, (h // p) * (w // p), p * p * c)
    kernel = nested_variable(self, "params", "kernel", nn.initializers.lecun_normal(),
                             (p, p, c, self.features), subnet)
    bias = nested_variable(self, "params", "bias", nn.initializers.zeros,
                           (self.features,), subnet)
    kernel = kernel.reshape(p * p * c, self.features).astype(self.dtype)
    return jnp.dot(patches.astype(self.dtype), kernel) + bias.astype(self.dtype)


class NestedSelfAttention(nn.Module):
  """Multi-head self-attention with ``num_heads`` heads of ``head_dim`` each."""
  num_heads: int
  head_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, subnet: str) -> jax.Array:
    n, length, dim = x.shape
    inner = self.num_heads * self.head_dim
    dense = lambda features, name: NestedDense(features, dtype=self.dtype,
                                               kernel_init=_xavier, name=name)
    # Columns h * head_dim + j belong to head h: a column prefix is a head prefix.
    split = lambda y: y.reshape(n, length, self.num_heads, self.head_dim)
    q, k, v = (split(dense(inner, name)(x, subnet)) for name in ("query", "key", "value"))
    logits = jnp.einsum("nqhc,nkhc->nhqk", q, k) * self.head_dim ** -0.5
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    y = jnp.einsum("nhqk,nkhc->nqhc", weights, v).reshape(n, length, inner)
    return dense(dim, "out")(y, subnet)


class MlpBlock(nn.Module):
  """Dense(``hidden``) -> GELU -> Dense(input width)."""
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, subnet: str) -> jax.Array:
    dense = lambda features, name: NestedDense(features, dtype=self.dtype,
                                               kernel_init=_xavier, name=name)
    y = nn.gelu(dense(self.hidden, "fc1")(x, subnet), approximate=False)
    return dense(x.shape[-1], "fc2")(y, subnet)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block; its width is that of its input."""
  num_heads: int
  head_dim: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, subnet: str) -> jax.Array:
    y = NestedLayerNorm(dtype=self.dtype, name="ln1")(x, subnet)
    x = x + NestedSelfAttention(self.num_heads, self.head_dim, self.dtype,
                                name="attention")(y, subnet)
    y = NestedLayerNorm(dtype=self.dtype, name="ln2")(x, subnet)
    return x + MlpBlock(self.mlp_dim, self.dtype, name="mlp")(y, subnet)


class NestedViT(nn.Module):
  """A ViT at the motivated size whose base is a prefix of every variable.

  ``*_dim`` is the embedding width, ``*_heads`` the number of heads (each
  ``head_dim`` wide, shared), ``*_mlp_dim`` the MLP hidden width and
  ``*_depth`` the number of blocks. Images are NHWC with sides divisible by
  ``patch_size``; the position embedding fixes the image size at init.
  """
  base_dim: int
  base_heads: int
  base_mlp_dim: int
  base_depth: int
  motivated_dim: int
  motivated_heads: int
  motivated_mlp_dim: int
  motivated_depth: int
  num_classes: int
  patch_size: int = 16
  head_dim: int = 64
  dtype: Any = jnp.float32

  # The last layer of each residual branch: zero in an extra block, it is the identity.
  extension_last_layers: ClassVar[tuple[str, ...]] = (
      "attention/out/kernel", "attention/out/bias", "mlp/fc2/kernel", "mlp/fc2/bias")

  def __post_init__(self):
    for name in ("patch_size", "head_dim", "num_classes", "base_dim", "base_heads",
                 "base_mlp_dim", "base_depth", "motivated_dim", "motivated_heads",
                 "motivated_mlp_dim", "motivated_depth"):
      value = getattr(self, name)
      if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"NestedViT: {name} must be a positive integer, got {value!r}")
    for what, b, m in (("embedding dim", self.base_dim, self.motivated_dim),
                       ("number of heads", self.base_heads, self.motivated_heads),
                       ("MLP hidden width", self.base_mlp_dim, self.motivated_mlp_dim),
                       ("depth", self.base_depth, self.motivated_depth)):
      if b > m:
        raise NestingError(f"NestedViT: the base's {what} {b} exceeds the motivated "
                           f"model's {m}; the base is not nested")
    super().__post_init__()

  def sizes(self, subnet: str) -> tuple[int, int, int, int]:
    """(embedding dim, heads, MLP hidden width, depth) of one sub-network."""
    check_subnet(subnet)
    if subnet == "base":
      return self.base_dim, self.base_heads, self.base_mlp_dim, self.base_depth
    return self.motivated_dim, self.motivated_heads, self.motivated_mlp_dim, self.motivated_depth

  def standalone(self, subnet: str) -> "NestedViT":
    """The plain ViT of one sub-network's size (what ``export`` targets)."""
    dim, heads, mlp_dim, depth = self.sizes(subnet)
    # parent=None: a free-standing module, not a child of this one.
    return NestedViT(base_dim=dim, base_heads=heads, base_mlp_dim=mlp_dim, base_depth=depth,
                     motivated_dim=dim, motivated_heads=heads, motivated_mlp_dim=mlp_dim,
                     motivated_depth=depth, num_classes=self.num_classes,
                     patch_size=self.patch_size, head_dim=self.head_dim, dtype=self.dtype,
                     parent=None)

  @nn.compact
  def __call__(self, x: jax.Array, *, subnet: str = "motivated",
               train: bool = False) -> jax.Array:
    del train  # no dropout, no batch norm
    dim, heads, mlp_dim, depth = self.sizes(subnet)
    p = self.patch_size
    if x.ndim != 4 or x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f"NestedViT: expects NHWC images with height and width divisible "
                       f"by patch_size={p}, got shape {tuple(x.shape)}")
    x = PatchEmbedding(dim, p, self.dtype, name="embedding")(x, subnet)
    n, tokens = x.shape[0], x.shape[1] + 1
    # A smaller image would silently read a prefix of the position embedding.
    if self.has_variable("params", "pos_embedding"):
      stored = self.get_variable("params", "pos_embedding").shape[1]
      if stored != tokens:
        raise ValueError(f"NestedViT: the position embedding has {stored} tokens but these "
                         f"images give {tokens}; use the image size the model was "
                         "initialised with")
    cls = nested_variable(self, "params", "cls_token", nn.initializers.zeros,
                          (1, 1, dim), subnet)
    pos = nested_variable(self, "params", "pos_embedding",
                          nn.initializers.normal(stddev=0.02), (1, tokens, dim), subnet)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (n, 1, dim)), x], axis=1)
    x = x + pos.astype(self.dtype)
    for i in range(depth):
      x = EncoderBlock(heads, self.head_dim, mlp_dim, self.dtype, name=f"block_{i}")(x, subnet)
    x = NestedLayerNorm(dtype=self.dtype, name="ln_final")(x, subnet)
    # Not zero-initialised (as some ViTs do): zero logits would hide every difference.
    return NestedDense(self.num_classes, dtype=self.dtype, name="head")(x[:, 0], subnet)


def from_config(base: Mapping[str, Any], motivated: Mapping[str, Any], num_classes: int,
                patch_size: int = 16, head_dim: int = 64) -> NestedViT:
  """``config.model.base`` / ``.motivated`` are ``{"arch": "ti" | "s" | "b"}`` with
  optional ``"depth"`` (overrides the arch's 12) and ``"width"`` (multiplies the
  number of heads: ``max(1, round(heads * width))``). The embedding dim is
  ``heads * head_dim`` and the MLP hidden width ``4 * dim``; ``head_dim`` and
  ``patch_size`` are shared by both sub-networks."""
  if not isinstance(head_dim, numbers.Integral) or isinstance(head_dim, bool) or head_dim < 1:
    raise ConfigError(f"the vit family's head_dim must be a positive integer, got {head_dim!r}")
  (bd, bh, bm, bdepth), (md, mh, mm, mdepth) = (
      _subnet_sizes(options, head_dim) for options in (base, motivated))
  return NestedViT(base_dim=bd, base_heads=bh, base_mlp_dim=bm, base_depth=bdepth,
                   motivated_dim=md, motivated_heads=mh, motivated_mlp_dim=mm,
                   motivated_depth=mdepth, num_classes=num_classes, patch_size=patch_size,
                   head_dim=head_dim)


def _subnet_sizes(options: Mapping[str, Any], head_dim: int) -> tuple[int, int, int, int]:
  options = subnet_options("vit", options, required=("arch",),
                           optional={"depth": None, "width": 1.0})
  arch, width = options["arch"], options["width"]
  if arch not in ARCHS:
    raise ConfigError(f"unknown ViT arch {arch!r}; known: {', '.join(ARCHS)}")
  if not isinstance(width, numbers.Real) or isinstance(width, bool) or not width > 0:
    raise ConfigError(f"the vit family's width must be a positive number, got {width!r}")
  _, heads, depth = ARCHS[arch]
  heads = max(1, round(heads * width))
  depth = depth if options["depth"] is None else options["depth"]
  return heads * head_dim, heads, 4 * heads * head_dim, depth
