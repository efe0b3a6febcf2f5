"""The weights map: which part of every variable belongs to the base.

Both sub-networks live in ONE variables pytree, the motivated model's. The
base is a static view into it: for every leaf, the leading slice whose shape is
that leaf's shape in the standalone base model (the prefix map of
docs/choices.md: the first ``d`` channels / units of every widened dimension,
the first ``n`` blocks of every deepened stage). Leaves of blocks the base skips have an empty
view. The paper's copy-in at the start of a motivated phase and copy-back at its
end are therefore implicit: there is nothing to copy.

Three operations use the map:

- ``base_view(tree, regions)``: the base's slice of every leaf, same tree
  structure (empty arrays for leaves outside the base), so an optimizer or a
  loss can run on base-sized arrays;
- ``merge_base(tree, base_tree, regions)``: writes a base view back into the
  full tree, leaving every entry outside the base bit-identical;
- ``export(variables, subnet, weights_map)``: variables for the standalone
  module of that sub-network (``model.standalone(subnet)``).

Under FSDP the train steps keep each split leaf whose base the devices
divide in a per-device interleaved *storage order* (``Region.interleaved``,
``to_storage``, ``to_logical``; docs/sharding.md): every device's shard starts
with its share of the base's rows, so ``base_view`` and ``merge_base``, given
the leaves' shardings, read and write them locally, without moving anything.

``paired(base, motivated, sample)`` makes a nested model of two
configurations of a user's own module (``models/paired.py``).

``init_variables`` creates the one tree, optionally with the base's extensions
starting at zero (``zero_extensions``). This module knows nothing about data or
the training loop; ``opt_state_regions`` extends a params map to any optax
state through ``optax.tree_map_params``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from motivation_jax.common import check_nested_shapes, check_subnet
from motivation_jax.errors import NestingError
from motivation_jax.models import paired as paired_lib

PyTree = Any
EXTENSION_INITS = ("default", "zero")


@dataclasses.dataclass(frozen=True)
class Region:
  """The base's part of one leaf: its leading ``base_shape`` slice.

  ``base_shape=None`` marks a leaf that is not parameter-shaped (an optimizer
  step count, say): the base step owns it whole.
  """
  full_shape: tuple[int, ...]
  base_shape: tuple[int, ...] | None
  in_base: bool = True

  @property
  def whole(self) -> bool:
    return self.base_shape is None or self.base_shape == self.full_shape

  def view(self, x: jax.Array, sharding=None) -> jax.Array:
    """The base's slice of ``x``; ``sharding``: ``x``'s ``NamedSharding``, in a
    step whose state is sharded and in storage order (docs/sharding.md)."""
    if self.whole:
      return x
    base = tuple(slice(0, d) for d in self.base_shape)
    split = _split_dim(sharding, self)
    if split is None:
      return x[base]
    if self.interleaved(sharding) is not None:
      # Storage order: the base's rows are the first c of every device's
      # shard, in the base's own order and even layout; nothing moves.
      local = tuple(slice(0, d // _axis_size(sharding, split)) if i == split else s
                    for i, (s, d) in enumerate(zip(base, self.base_shape)))
      spec = jax.sharding.PartitionSpec(*sharding.spec)
      return jax.shard_map(lambda shard: shard[local], mesh=sharding.mesh,
                           in_specs=spec, out_specs=spec)(x)
    # Otherwise (the devices do not divide the base's extent) XLA reshards the
    # slice: the dims that are not split are sliced first, where every device
    # holds them whole, so that only the base's rows travel.
    x = lax.with_sharding_constraint(
        x[tuple(slice(None) if i == split else s for i, s in enumerate(base))], sharding)
    return lax.with_sharding_constraint(x[base], self._view_sharding(sharding, split))

  def view_at(self, x: jax.Array, start, sharding=None) -> jax.Array:
    """``view``, read at ``start`` (a traced zero, ``write_after``'s) where the
    leaf is not split: the slice a ``merge`` at the same ``start`` writes, so
    that XLA may compute the written values from it in place (a static slice
    of the same buffer it copies out first). Split leaves: ``view``."""
    start = start[0] if isinstance(start, tuple) else start
    if self.whole or _split_dim(sharding, self) is not None:
      return self.view(x, sharding)
    return lax.dynamic_slice(x, (start,) * x.ndim, self.base_shape)

  def merge(self, full: jax.Array, part: jax.Array, sharding=None, start=0) -> jax.Array:
    """``full`` with its base region replaced by ``part``; ``start``: the
    region's first index (always 0; ``write_after`` says why it may be traced)."""
    if self.whole:
      return part
    if not self.in_base:
      return full
    part = part.astype(full.dtype)
    split = _split_dim(sharding, self)
    start, local_start = start if isinstance(start, tuple) else (start, None)
    if split is None:
      # dynamic_update_slice on a donated buffer is an in-place write in XLA: a
      # base step touches only base-sized memory.
      return lax.dynamic_update_slice(full, part, (start,) * full.ndim)
    if self.interleaved(sharding) is not None:
      # Storage order: each device writes its base rows into the head of its
      # own shard (``view``'s layout), in place, at a per-device zero
      # (``write_after``) where one is given.
      spec = jax.sharding.PartitionSpec(*sharding.spec)
      if local_start is None:
        local_start, start_spec = jnp.zeros((), jnp.int32), jax.sharding.PartitionSpec()
      else:
        start_spec = jax.sharding.PartitionSpec(sharding.spec[split])
      write = lambda shard, piece, i: lax.dynamic_update_slice(
          shard, piece, (i.reshape(()),) * shard.ndim)
      return jax.shard_map(write, mesh=sharding.mesh, in_specs=(spec, spec, start_spec),
                           out_specs=spec)(full, part, local_start)
    # XLA partitions a dynamic_update_slice of a split dim by gathering the
    # whole leaf on every device; a pad to the full layout moves only the
    # base's rows (the split dim first, then the rest, which is local), and
    # the select is local to each device's shard.
    zero = jnp.zeros((), full.dtype)
    grow = lambda dims: [(0, f - b if i in dims else 0, 0)
                         for i, (f, b) in enumerate(zip(self.full_shape, self.base_shape))]
    part = lax.with_sharding_constraint(lax.pad(part, zero, grow((split,))), sharding)
    part = lax.pad(part, zero, grow([i for i in range(full.ndim) if i != split]))
    return jnp.where(_inside(self.base_shape, full.shape), part, full)

  def extension(self, x: jax.Array) -> list[jax.Array]:
    """The rest of ``x`` outside the base region, as separate arrays (the
    blocks layout, ``steps.BlockState``): for each dim ``i`` the base does not
    fill, ``x[:b_0, ..., :b_{i-1}, b_i:, ...]`` (full in the dims after ``i``),
    so that ``join(view(x), extension(x))`` is ``x``. ``[]`` for a leaf the
    base holds whole; a leaf the base skips is one block, itself."""
    if self.whole:
      return []
    return [x[tuple(slice(0, b) for b in self.base_shape[:i]) + (slice(self.base_shape[i], None),)]
            for i in self._extension_dims()]

  def join(self, base: jax.Array, extension: list[jax.Array]) -> jax.Array:
    """The whole leaf from its base block and ``extension``'s blocks."""
    if self.whole:
      return base
    blocks = dict(zip(self._extension_dims(), extension))
    whole = base
    for i in reversed(range(len(self.full_shape))):
      if i in blocks:
        whole = jnp.concatenate([whole, blocks[i].astype(whole.dtype)], axis=i)
      elif self.base_shape[i] < self.full_shape[i]:
        # An empty block (an earlier dim of the base is 0): only the shape grows.
        whole = jnp.zeros(whole.shape[:i] + (self.full_shape[i],) + whole.shape[i + 1:],
                          whole.dtype)
    return whole

  def _extension_dims(self) -> list[int]:
    """The dims with a block of their own (not empty) in ``extension``."""
    b, f = self.base_shape, self.full_shape
    return [i for i in range(len(f)) if b[i] < f[i] and all(b[j] > 0 for j in range(i))]

  def interleaved(self, sharding) -> int | None:
    """The dim along which a leaf of this layout is stored interleaved, or None
    (stored in logical order).

    A leaf is interleaved when ``sharding`` splits a dim the base slices over
    ``n`` devices and ``n`` divides the base's extent ``b`` there: device
    ``k``'s shard of ``s`` rows then holds base rows ``[k c, (k+1) c)``
    (``c = b / n``) followed by extension rows ``[b + k (s-c), b + (k+1)(s-c))``
    (docs/sharding.md, "Storage order")."""
    split = _split_dim(sharding, self)
    if split is None or self.whole:
      return None
    base, full = self.base_shape[split], self.full_shape[split]
    return split if base < full and base % _axis_size(sharding, split) == 0 else None

  def to_storage(self, x: jax.Array, sharding=None) -> jax.Array:
    """``x`` (logical order) in the storage order of ``sharding``'s layout."""
    dim = self.interleaved(sharding)
    if dim is None:
      return x
    n, b, d = _axis_size(sharding, dim), self.base_shape[dim], self.full_shape[dim]
    split = lambda y, rows: y.reshape(y.shape[:dim] + (n, rows // n) + y.shape[dim + 1:])
    head = split(lax.slice_in_dim(x, 0, b, axis=dim), b)
    tail = split(lax.slice_in_dim(x, b, d, axis=dim), d - b)
    return jnp.concatenate([head, tail], axis=dim + 1).reshape(x.shape)

  def to_logical(self, x: jax.Array, sharding=None) -> jax.Array:
    """``x`` (storage order of ``sharding``'s layout) in logical order; the
    inverse of ``to_storage``. Inside a step, on a gathered copy, it is local."""
    dim = self.interleaved(sharding)
    if dim is None:
      return x
    n, b, d = _axis_size(sharding, dim), self.base_shape[dim], self.full_shape[dim]
    c = b // n
    rows = x.reshape(x.shape[:dim] + (n, d // n) + x.shape[dim + 1:])
    merge = lambda y: y.reshape(y.shape[:dim] + (-1,) + y.shape[dim + 2:])
    return jnp.concatenate([merge(lax.slice_in_dim(rows, 0, c, axis=dim + 1)),
                            merge(lax.slice_in_dim(rows, c, d // n, axis=dim + 1))], axis=dim)

  def _view_sharding(self, sharding, split: int):
    spec = list(sharding.spec) + [None] * (len(self.full_shape) - len(sharding.spec))
    if self.base_shape[split] % _axis_size(sharding, split):
      spec[split] = None
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def _split_dim(sharding, region: Region) -> int | None:
  """The one dim that ``sharding`` splits over devices (``sharding.fsdp_spec``
  splits at most one), or None when nothing moves between devices: one
  device, a replicated leaf, a leaf outside the base."""
  if sharding is None or not region.in_base or not hasattr(sharding, "spec"):
    return None
  split = [i for i, names in enumerate(sharding.spec) if names is not None]
  if not split:
    return None
  if len(split) > 1:
    raise NotImplementedError(f"a leaf split over more than one dim ({sharding.spec}); "
                              "sharding.fsdp_spec splits one")
  return split[0]


def _axis_size(sharding, dim: int) -> int:
  names = sharding.spec[dim]
  names = names if isinstance(names, tuple) else (names,)
  return int(np.prod([sharding.mesh.shape[a] for a in names]))


def _inside(base_shape, shape) -> jax.Array:
  """Mask of the base region (the leading ``base_shape``) in an array of ``shape``."""
  return functools.reduce(jnp.logical_and, [
      lax.broadcasted_iota(jnp.int32, shape, i) < b
      for i, b in enumerate(base_shape) if b < shape[i]], jnp.bool_(True))


@dataclasses.dataclass(frozen=True)
class WeightsMap:
  """Regions for the variables collections of a nested model (e.g. params, batch_stats)."""
  regions: Mapping[str, PyTree]

  @property
  def params(self) -> PyTree:
    return self.regions["params"]

  def __getitem__(self, collection: str) -> PyTree:
    # A collection the model does not have (batch_stats of an MLP) is empty.
    return self.regions.get(collection, {})

  def num_params(self, subnet: str) -> int:
    """Number of parameters of one sub-network."""
    shape = (lambda r: r.base_shape if r.in_base else (0,)) if subnet == "base" else (
        lambda r: r.full_shape)
    return int(sum(np.prod(shape(r)) for r in jax.tree.leaves(self.params)))


def weights_map(model, *sample_args, **sample_kwargs) -> WeightsMap:
  """Builds and validates the prefix weights map of ``model``.

  Compares the variable shapes of the nested model (motivated size) with those
  of ``model.standalone("base")``, abstractly (no FLOPs, no memory). Raises
  ``NestingError`` naming the first leaf where the base does not fit inside the
  motivated model.
  """
  def shapes(init):
    # The samples go in as arguments, so they may be arrays or ShapeDtypeStructs.
    variables = jax.eval_shape(lambda *args: init(jax.random.key(0), *args), *sample_args)
    return {col: flax.traverse_util.flatten_dict(tree) if tree else {}
            for col, tree in variables.items()}

  # The standalone base is an ordinary module of its own size: it is
  # initialised without ``subnet`` (a user's module takes none; the package's
  # families default to their whole size). A paired model knows how to
  # initialise its user's modules (``init_module``).
  standalone = model.standalone("base")
  own = {k: v for k, v in sample_kwargs.items() if k != "subnet"}
  base_init = (functools.partial(model.init_module, standalone) if hasattr(model, "init_module")
               else lambda rng, *args: standalone.init(rng, *args, **own))
  full = shapes(lambda rng, *args: model.init(rng, *args, **sample_kwargs))
  base = shapes(base_init)
  check_nested_shapes(full, base)
  regions = {}
  for col, leaves in full.items():
    flat = {}
    for path, leaf in leaves.items():
      inner = base.get(col, {}).get(path)
      flat[path] = Region(
          full_shape=tuple(leaf.shape),
          base_shape=tuple(inner.shape) if inner is not None else (0,) * leaf.ndim,
          in_base=inner is not None)
    regions[col] = flax.traverse_util.unflatten_dict(flat)
  return WeightsMap(regions)


def paired(base, motivated, sample, **options):
  """Two configurations of one ordinary Linen module (or two NNX constructors,
  ``lambda rngs: Model(cfg, rngs=rngs)``) as one nested model, checked to nest:
  ``motivation_jax.models.paired.paired`` documents it."""
  return paired_lib.paired(base, motivated, sample, **options)


def path_name(path: tuple) -> str:
  """``params/layers/0/kernel``: a variable's path as one string (NNX's
  ``nnx.List`` and ``nnx.bridge`` give integer keys)."""
  return "/".join(map(str, path))


def base_view(tree: PyTree, regions: PyTree, shardings: PyTree = None) -> PyTree:
  """The base's slice of every leaf of ``tree`` (same structure as ``regions``).

  ``shardings`` (``tree``'s ``NamedSharding``s, inside a jitted step whose
  state is sharded): ``tree`` is in the storage order of that layout, and the
  slices of its interleaved leaves are local; those of other split leaves
  move only the base's part (docs/sharding.md)."""
  if shardings is None:
    return jax.tree.map(lambda r, x: r.view(x), regions, tree)
  return jax.tree.map(lambda r, x, s: r.view(x, s), regions, tree, shardings)


def base_view_at(tree: PyTree, regions: PyTree, start, shardings: PyTree = None) -> PyTree:
  """``base_view`` read at ``start`` (``Region.view_at``): the view a
  ``merge_base(..., start=start)`` of the same leaves writes back in place."""
  if shardings is None:
    return jax.tree.map(lambda r, x: r.view_at(x, start), regions, tree)
  return jax.tree.map(lambda r, x, s: r.view_at(x, start, s), regions, tree, shardings)


def merge_base(tree: PyTree, base_tree: PyTree, regions: PyTree,
               shardings: PyTree = None, *, start=0) -> PyTree:
  """``tree`` with the base region of every leaf replaced by ``base_tree``'s
  values (``shardings`` as for ``base_view``; ``start``: see ``write_after``)."""
  if shardings is None:
    return jax.tree.map(lambda r, x, y: r.merge(x, y, start=start), regions, tree, base_tree)
  return jax.tree.map(lambda r, x, y, s: r.merge(x, y, s, start), regions, tree, base_tree,
                      shardings)


def extension_blocks(tree: PyTree, regions: PyTree) -> PyTree:
  """``Region.extension`` of every leaf of ``tree``: a tree of lists of blocks."""
  return jax.tree.map(lambda r, x: r.extension(x), regions, tree)


def join_blocks(base_tree: PyTree, extension: PyTree, regions: PyTree) -> PyTree:
  """The whole leaves from the base's (``base_view``) and the rest
  (``extension_blocks``): the inverse of the two."""
  return jax.tree.map(lambda r, b, e: r.join(b, e), regions, base_tree, extension)


def to_storage(tree: PyTree, regions: PyTree, shardings: PyTree) -> PyTree:
  """``tree`` (logical order) in the storage order of ``shardings``' layout:
  ``Region.to_storage`` on every leaf; a leaf that is not interleaved is
  returned as it is."""
  return jax.tree.map(lambda r, x, s: r.to_storage(x, s), regions, tree, shardings)


def to_logical(tree: PyTree, regions: PyTree, shardings: PyTree) -> PyTree:
  """The inverse of ``to_storage``."""
  return jax.tree.map(lambda r, x, s: r.to_logical(x, s), regions, tree, shardings)


def interleaves(regions: PyTree, shardings: PyTree) -> bool:
  """Whether any leaf of this layout is stored interleaved (``Region.interleaved``)."""
  return any(r.interleaved(s) is not None for r, s in
             zip(jax.tree.leaves(regions), jax.tree.leaves(shardings)))


def write_after(tree: PyTree, regions: PyTree, shardings: PyTree = None):
  """A zero to pass as ``merge_base(..., start=)`` so that those in-place
  writes wait until every partly-base leaf of ``tree`` is computed.

  Why: a base step's parameter update reads the old optimizer moments while
  ``merge_base`` overwrites them in place, and no data dependency orders the
  two, so XLA's copy insertion copies every moment of a partly-base leaf
  first, twice with donation (CPU backend: 13 copies in the base step of a
  two-layer MLP with AdamW, 1 with the order; 77 and 31 for the default
  config's CNN with SGD). Indexing the writes with a value computed from the
  merged parameters orders them after the update; XLA cannot tell it is zero
  (``min(isnan(x), 0)``), and the CPU backend drops
  ``lax.optimization_barrier`` before copy insertion.

  Leaves stored interleaved (``Region.interleaved``) are merged in place in
  each device's shard, so they need the order too, but reading one element of
  a split leaf would be a collective: for them the zero is computed per
  device from its own shards (an array of one zero per device, which
  ``Region.merge`` reads locally), and ``write_after`` returns the pair
  ``(zero, per-device zeros)`` (the default config's CNN, fsdp=8, every leaf
  it can split split: 119 copies in the base step without it, 81 with it, as
  many as the standalone base's step). Other split leaves are not read; their
  merges do not write in place anyway.
  """
  leaves = jax.tree.leaves(regions)
  layouts = [None] * len(leaves) if shardings is None else jax.tree.leaves(shardings)
  arrays = jax.tree.leaves(tree)
  firsts = [x[(0,) * x.ndim] for r, x, s in zip(leaves, arrays, layouts)
            if r.in_base and not r.whole and _split_dim(s, r) is None]
  zero = _zero_from(firsts) if firsts else 0
  local = [(x, s) for r, x, s in zip(leaves, arrays, layouts) if r.interleaved(s) is not None]
  axes = {s.spec[r.interleaved(s)] for r, s in zip(leaves, layouts)
          if r.interleaved(s) is not None}
  if not local or len(axes) != 1:
    return zero
  specs = tuple(jax.sharding.PartitionSpec(*s.spec) for _, s in local)
  per_device = jax.shard_map(
      lambda *shards: _zero_from([x[(0,) * x.ndim] for x in shards]).reshape(1),
      mesh=local[0][1].mesh, in_specs=specs,
      out_specs=jax.sharding.PartitionSpec(axes.pop()))(*[x for x, _ in local])
  return zero, per_device


def zero_after(arrays: list[jax.Array]) -> jax.Array | int:
  """An int32 zero computed from the first element of each of ``arrays``
  (``min(isnan(x), 0)``), which XLA cannot tell is zero: what it indexes or
  selects with waits until all of ``arrays`` are computed (``write_after``)."""
  firsts = [x[(0,) * x.ndim] for x in arrays if x.size]
  return _zero_from(firsts) if firsts else 0


def _zero_from(firsts: list[jax.Array]) -> jax.Array:
  nan = functools.reduce(jnp.logical_or, [jnp.isnan(x) for x in firsts])
  return jnp.minimum(nan.astype(jnp.int32), 0)


def abstract_init(optimizer: optax.GradientTransformation) -> Callable:
  """``optimizer.init`` run abstractly, for ``optax.tree_map_params``: optax finds
  the parameter-shaped entries by running init on a placeholder, and run as it
  is, init compiles a program for each array it creates (a step count's zeros)."""
  return lambda placeholder: jax.eval_shape(lambda: optimizer.init(placeholder))


def opt_state_regions(optimizer: optax.GradientTransformation,
                      params_regions: PyTree) -> PyTree:
  """Regions for an optax state: params regions on every parameter-shaped entry.

  Entries that are not parameter-shaped (step counts, injected
  hyper-parameters) get a whole-leaf region: a base step updates them as an
  ordinary step would (the count is the global batch count).
  """
  whole = lambda x: Region(tuple(np.shape(x)), None)
  # Only the state's structure matters here, so it is built abstractly.
  opt_state = jax.eval_shape(optimizer.init, jax.tree.map(
      lambda r: jax.ShapeDtypeStruct(r.full_shape, np.float32), params_regions))
  return optax.tree_map_params(
      abstract_init(optimizer), lambda _, r: r, opt_state, params_regions,
      transform_non_params=lambda x: jax.tree.map(whole, x))


def init_variables(model, rng: jax.Array, sample_input: jax.Array, *,
                   extension_init: str = "default") -> dict:
  """``model.init`` at the motivated size, compiled once.

  ``extension_init="zero"`` then zeroes the extensions of the base
  (``zero_extensions``), so that the motivated model starts out computing what
  the base computes where the family allows it (docs/models.md).

  Initialisers are many small threefry programs that XLA's CPU backend spends
  seconds optimising for a function that runs once, so on CPU the compile uses
  the lowest backend optimisation level (the values are the same).
  """
  if extension_init not in EXTENSION_INITS:
    raise ValueError(f"extension_init must be one of {EXTENSION_INITS}, got {extension_init!r}")
  init = functools.partial(model.init, subnet="motivated", train=False)
  if not isinstance(rng, jax.core.Tracer):  # inside a caller's jit, its options hold
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    init = jax.jit(init, compiler_options=options)
  variables = init(rng, sample_input)
  if extension_init == "zero" and hasattr(model, "zero_extensions"):
    # A paired model knows each kernel's layout, and refuses where it cannot
    # make the motivated model start as the base (models/paired.py).
    variables = {**variables, "params": jax.jit(model.zero_extensions)(variables["params"])}
  elif extension_init == "zero":
    wmap = weights_map(model, sample_input, subnet="motivated")
    zero = functools.partial(zero_extensions, params_regions=wmap.params,
                             last_layers=tuple(model.extension_last_layers))
    variables = {**variables, "params": jax.jit(zero)(variables["params"])}
  return variables


def zero_extensions(params: PyTree, params_regions: PyTree,
                    last_layers: tuple[str, ...]) -> PyTree:
  """``params`` with every extension of the base starting at zero.

  Two rules, which together make the motivated model compute what the base
  computes at initialisation wherever the family's architecture allows it
  (each family's docstring says where it does not):

  - width: in every ``kernel`` leaf (layout ``[..., in, out]``, as all nested
    layers store it) the weights from extension inputs into base outputs,
    ``kernel[..., base_in:, :base_out]``, are zero, so the extra units do not
    change the base's units;
  - depth: in a block only the motivated model has, the leaves whose path ends
    with one of ``last_layers`` (the family's last layer of a residual branch,
    e.g. ``bn2/scale``) are zero, so the block starts as the identity.

  The zeroed weights still get gradients: they are an initial value, not a mask.
  """
  def suffix(name, s):
    return name == s or name.endswith("/" + s)

  flat_regions = flax.traverse_util.flatten_dict(params_regions)
  flat = dict(flax.traverse_util.flatten_dict(params))
  for path, region in flat_regions.items():
    x, name = flat[path], path_name(path)
    if not region.in_base:
      if any(suffix(name, s) for s in last_layers):
        flat[path] = jax.numpy.zeros_like(x)
    elif path[-1] == "kernel" and x.ndim >= 2 and not region.whole:
      base_in, base_out = region.base_shape[-2:]
      flat[path] = x.at[..., base_in:, :base_out].set(0)
  return flax.traverse_util.unflatten_dict(flat)


def export(variables: Mapping[str, PyTree], subnet: str,
           wmap: WeightsMap) -> dict[str, PyTree]:
  """Variables of one sub-network, accepted by ``model.standalone(subnet)``."""
  check_subnet(subnet)
  if subnet == "motivated":
    return {col: tree for col, tree in variables.items()}
  out = {}
  for col, tree in variables.items():
    leaves = flax.traverse_util.flatten_dict(base_view(tree, wmap[col]))
    kept = flax.traverse_util.flatten_dict(_prune(wmap[col]))
    out[col] = flax.traverse_util.unflatten_dict({p: leaves[p] for p in kept})
  return out


def export_opt_state(optimizer: optax.GradientTransformation, opt_state: PyTree,
                     wmap: WeightsMap) -> PyTree:
  """The base's optimizer state, as ``optimizer.init`` of the exported base params
  would lay it out (e.g. to go on training the deployed base alone)."""
  regions = opt_state_regions(optimizer, wmap.params)
  view = base_view(opt_state, regions)
  keep = [r.base_shape is None or r.in_base for r in jax.tree.leaves(regions)]
  base_params = jax.tree.map(lambda r: jax.ShapeDtypeStruct(r.base_shape, np.float32),
                             _prune(wmap.params))
  treedef = jax.tree.structure(jax.eval_shape(optimizer.init, base_params))
  leaves = [x for x, k in zip(jax.tree.leaves(view), keep) if k]
  return jax.tree.unflatten(treedef, leaves)


def _prune(params_regions: PyTree) -> PyTree:
  """The regions of the leaves that belong to the base, in the base's tree layout."""
  flat = flax.traverse_util.flatten_dict(params_regions)
  return flax.traverse_util.unflatten_dict({p: r for p, r in flat.items() if r.in_base})
