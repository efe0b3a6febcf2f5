"""Bring your own model: two configurations of one ordinary Flax module, checked to nest.

``paired(base, motivated, sample)`` takes two Linen modules, or two NNX
constructors (``lambda rngs: Model(cfg, rngs=rngs)``), written with no
knowledge of this package, and returns a ``Paired`` model that keeps the
package's model contract (``motivation_jax.models``): ``init(rng, x,
subnet="motivated")`` makes the one variables pytree at the motivated size,
``apply(variables, x, subnet=..., train=..., mutable=..., rngs=...)`` runs
either sub-network, ``standalone(subnet)`` is the user's own module of that
size. The base runs the user's small module on the leading slices of the
variables (the same slices ``nesting.weights_map`` finds), so it costs what
the small module costs; nothing is masked.

Checked when the pair is made (``NestingError``, one line):

- shapes: every variable of the small module exists at the same path in the
  large one and fits inside it;
- the gap: the small module on the leading slices of random variables, and
  the large one on the same variables with everything outside those slices
  zeroed, give the same output on ``sample``. Where they do not, the error
  names the first module (in call order) whose output differs and the kind
  of mismatch: a width under a normalisation over features, a fused
  ``[q|k|v]`` layout, Flax's automatic layer names, an attention head size,
  a block only the motivated model runs that is not the identity when
  zeroed. ``exact=False`` accepts a base that only shares weights (its gap
  is kept in ``Paired.gap``; the run's summary and the export say so).

An NNX model goes through ``nnx.split`` / ``nnx.merge`` inside ``apply``:
its ``nnx.Param`` and ``nnx.BatchStat`` state are the ``params`` and
``batch_stats`` collections, as pure dicts (``nnx.List`` gives integer keys);
its RNG state is made inside the step from the key the step passes
(``steps.batch_rngs``: a function of the seed and the batch index), so it goes
into the step as an argument and its advanced counts are dropped on the way
out: the next batch's key does not depend on them, which keeps a resumed run
bit-identical.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from motivation_jax.common import check_nested_shapes, check_subnet
from motivation_jax.errors import ConfigError, NestingError

PyTree = Any


class _LazyNNX:
  """``flax.nnx``, imported when first used: it imports optax, and a deployed
  Linen model (``models.load_exported``) loads without the training modules."""

  def __getattr__(self, name):
    from flax import nnx
    return getattr(nnx, name)


nnx = _LazyNNX()
# Keywords of a module's __call__ that switch it between training and
# evaluation: name -> whether it is True in training.
TRAIN_ARGS = {"train": True, "training": True, "is_training": True,
              "deterministic": False, "use_running_average": False, "eval": False}
# How far apart the base's and the zeroed motivated model's outputs may be,
# relative to the output's size (float32 sums in another order differ ~1e-7).
GAP_TOLERANCE = 1e-5
_NORMS = ("LayerNorm", "RMSNorm", "GroupNorm")


# --- one configuration, functionally ---------------------------------------------------------

class NNXModel:
  """One NNX configuration as pure functions over a variables dict (what Linen's
  ``init`` / ``apply`` give), so that the package's steps can jit it.

  ``constructor(rngs)`` builds the user's module. ``params`` are its
  ``nnx.Param`` state, ``batch_stats`` its ``nnx.BatchStat`` state, both pure
  dicts; any other state but RNG state is refused. ``apply`` merges them with
  the graph definition and RNG state made from ``rngs`` (``Paired``'s
  docstring), switches dropout and batch norm with ``nnx.view``, runs it and
  splits the batch statistics out again.
  """

  def __init__(self, constructor: Callable[[nnx.Rngs], nnx.Module], *,
               spec: Mapping[str, Any] | None = None):
    self.constructor = constructor
    self.spec = dict(spec) if spec is not None else None
    abstract = nnx.eval_shape(lambda: constructor(nnx.Rngs(0)))
    if not isinstance(abstract, nnx.Module):
      raise ConfigError(f"an NNX constructor must return an nnx.Module, got "
                        f"{type(abstract).__name__}")
    self.cls = type(abstract)
    self.graphdef, params, stats, rng_state, other = nnx.split(
        abstract, nnx.Param, nnx.BatchStat, nnx.RngState, ...)
    leftover = flax.traverse_util.flatten_dict(nnx.to_pure_dict(other))
    if leftover:
      path = "/".join(map(str, next(iter(leftover))))
      raise ConfigError(f"{self.cls.__name__}: state at {path} is neither nnx.Param, "
                        "nnx.BatchStat nor RNG state; a paired NNX model keeps only those")
    # Abstract templates: which leaves exist, their Variable types, the RNG tags.
    self._params, self._stats, self._rng_state = params, stats, rng_state

  def __repr__(self):
    return f"NNXModel({self.cls.__name__})"

  def module(self, rngs: nnx.Rngs | None = None) -> nnx.Module:
    """A new instance of the user's class (fresh random state)."""
    return self.constructor(rngs or nnx.Rngs(0))

  def init(self, rng: jax.Array, x: jax.Array, *, train: bool = False) -> dict[str, PyTree]:
    del x, train  # an NNX module's shapes come from its constructor
    _, params, stats, _ = nnx.split(self.constructor(nnx.Rngs(rng)), nnx.Param,
                                    nnx.BatchStat, ...)
    return {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(stats)}

  def merged(self, variables: Mapping[str, PyTree], rngs: Mapping[str, jax.Array] | None
             ) -> nnx.Module:
    """The user's module holding ``variables``, its RNG state from ``rngs``."""
    return nnx.merge(self.graphdef, *self._states(variables), self._rngs(rngs))

  def _states(self, variables):
    return (_fill(self._params, variables["params"]),
            _fill(self._stats, variables.get("batch_stats") or {}))

  def _rngs(self, rngs):
    """RNG state whose keys derive from ``rngs[tag]`` (or its first stream) and the
    leaf's position: a pure function of what the step passes."""
    flat = nnx.to_flat_state(self._rng_state)
    default = jax.random.key(0) if not rngs else next(iter(rngs.values()))
    values = {}
    for i, (path, variable) in enumerate(flat):
      if isinstance(variable, nnx.RngKey):
        key = (rngs or {}).get(variable.tag, default)
        values[path] = variable.replace(jax.random.fold_in(key, i))
      else:  # an RngCount starts at 0 on every batch
        value = variable.get_value()
        values[path] = variable.replace(jnp.zeros(value.shape, value.dtype))
    return nnx.from_flat_state(values)

  def apply(self, variables: Mapping[str, PyTree], x: jax.Array, *, train: bool = False,
            mutable=False, rngs: Mapping[str, jax.Array] | None = None,
            calibrate: bool = False):
    """Linen's ``apply`` for this model; ``calibrate``: dropout off, every
    ``nnx.BatchNorm`` normalising with the batch's statistics, which it returns
    as the ``batch_moments`` collection (``motivation_jax.recalibration``)."""
    model = self.merged(variables, rngs)
    if calibrate:
      model = nnx.view(model, deterministic=True, use_running_average=False,
                       raise_if_not_found=False)
      for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.BatchNorm):
          m.momentum = 0.0  # its running statistics become this batch's, exactly
    else:
      model = nnx.view(model, deterministic=not train, use_running_average=not train,
                       raise_if_not_found=False)
    y = model(x)
    if not mutable:
      return y
    stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    return y, {"batch_moments" if calibrate else "batch_stats": stats}


def _fill(template: nnx.State, pure: PyTree) -> nnx.State:
  """``template`` (an abstract State) holding the arrays of the pure dict ``pure``."""
  values = flax.traverse_util.flatten_dict(_int_keys(pure)) if pure else {}
  return nnx.from_flat_state({path: variable.replace(values[tuple(path)])
                              for path, variable in nnx.to_flat_state(template)})


def _int_keys(tree):
  """A pure dict with the integer keys NNX expects where a restore made them
  strings (Orbax writes dict keys as strings)."""
  if not isinstance(tree, Mapping):
    return tree
  return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v)
          for k, v in tree.items()}


def _linen_train_kwarg(module: nn.Module, train_arg: str | None) -> str | None:
  if train_arg != "auto":
    return train_arg
  names = inspect.signature(type(module).__call__).parameters
  found = [n for n in TRAIN_ARGS if n in names]
  return found[0] if found else None


# --- the pair ----------------------------------------------------------------------------------

class Paired:
  """Two configurations of one module as one nested model (``paired`` builds it).

  ``base`` / ``motivated``: Linen modules or ``NNXModel``s. ``regions``:
  ``{collection: {path: base_shape}}`` for the leaves the base has. ``gap``:
  the measured gap (0.0 when exact). ``exact``: whether the base is a true
  sub-network. ``zero_init``: None when ``extension_init="zero"`` makes the
  motivated model start as the base, else the reason it does not.
  """
  extension_last_layers: tuple[str, ...] = ()

  def __init__(self, base, motivated, *, regions, layouts, train_kwarg, rng_streams,
               exact: bool, gap: float, specs):
    self.base, self.motivated = base, motivated
    self.regions, self.layouts = regions, layouts
    self.train_kwarg, self.rng_streams = train_kwarg, tuple(rng_streams)
    self.exact, self.gap, self.specs = exact, gap, specs
    # None, the reason, or a function that finds it (``zero_init``).
    self._zero_init: str | Callable[[], str] | None = None

  @property
  def zero_init(self) -> str | None:
    """None when ``extension_init="zero"`` makes the motivated model start as the
    base, else the reason it does not. Where the check found that it does not,
    the reason's diagnosis (the first module whose output differs) is found the
    first time it is asked: it traces and compiles both models once more, which a
    run that does not ask for ``extension_init="zero"`` does not need (the
    language models' pair: 6 programs, 1.1 s of compiling on a 2-core CPU). It
    runs eagerly, inside a trace too (``zero_extensions`` is called in one)."""
    if callable(self._zero_init):
      with jax.ensure_compile_time_eval():
        self._zero_init = self._zero_init()
    return self._zero_init

  def __repr__(self):
    return f"Paired(base={self.base!r}, motivated={self.motivated!r})"

  @property
  def api(self) -> str:
    return "nnx" if isinstance(self.motivated, NNXModel) else "linen"

  def describe(self) -> dict[str, Any]:
    """What the summary and model.json say about the nesting."""
    return {"exact": self.exact, "gap": self.gap, "api": self.api}

  def standalone(self, subnet: str):
    """The user's own module of that size (an ``NNXModel`` for NNX)."""
    check_subnet(subnet)
    return self.base if subnet == "base" else self.motivated

  def _mode(self, train: bool) -> dict[str, bool]:
    if self.train_kwarg is None:
      return {}
    return {self.train_kwarg: train if TRAIN_ARGS.get(self.train_kwarg, True) else not train}

  def init(self, rng, x, *, subnet: str = "motivated", train: bool = False):
    if subnet != "motivated":
      raise NestingError("initialise a paired model with subnet='motivated'; the base is a "
                         "view into the motivated variables")
    return self.init_module(self.motivated, rng, x)

  def init_module(self, module, rng, x):
    if isinstance(module, NNXModel):
      return module.init(rng, x)
    return dict(module.init({"params": rng}, x, **self._mode(False)))

  def base_variables(self, variables: Mapping[str, PyTree]) -> dict[str, PyTree]:
    """The base's leaves of ``variables`` (full or already base-sized), sliced."""
    out = {}
    for col, tree in variables.items():
      flat = flax.traverse_util.flatten_dict(tree) if tree else {}
      shapes = self.regions.get(col, {})
      out[col] = flax.traverse_util.unflatten_dict({
          p: x[tuple(slice(0, d) for d in shapes[p])] for p, x in flat.items() if p in shapes})
    return out

  def apply(self, variables, x, *, subnet: str = "motivated", train: bool = False,
            mutable=False, rngs=None):
    check_subnet(subnet)
    module = self.motivated
    if subnet == "base":
      variables, module = self.base_variables(variables), self.base
    mutable = [mutable] if isinstance(mutable, str) else (list(mutable) if mutable else [])
    calibrate = "batch_moments" in mutable  # recalibration's forward (_moments)
    if isinstance(module, NNXModel):
      return module.apply(variables, x, train=train, mutable=bool(mutable), rngs=rngs,
                          calibrate=calibrate)
    kwargs = dict(rngs=rngs) if rngs else {}
    if calibrate:
      with nn.intercept_methods(_batch_moments_interceptor):
        return module.apply(dict(variables), x, mutable=mutable, **self._mode(False), **kwargs)
    return module.apply(dict(variables), x, mutable=mutable or False, **self._mode(train),
                        **kwargs)

  def zero_extensions(self, params: PyTree) -> PyTree:
    """``extension_init="zero"`` for this pair: in every split kernel the weights
    from extension inputs into base outputs are zero, with each kernel's own
    layout (``layouts``); refused where the motivated model would then not start
    as the base (``zero_init``)."""
    if self.zero_init is not None:
      raise NestingError(f"extension_init='zero' cannot be used here: {self.zero_init}; "
                         "use extension_init='default'")
    return _zero_kernels(params, self.regions.get("params", {}), self.layouts)


def _extensions_zeroed(model: "Paired", variables):
  """``variables`` with ``extension_init="zero"``'s zeros in their kernels."""
  return {**variables, "params": _zero_kernels(
      variables["params"], model.regions.get("params", {}), model.layouts)}


def _zero_kernels(params, regions, layouts):
  flat = dict(flax.traverse_util.flatten_dict(params))
  for path, base_shape in regions.items():
    x = flat[path]
    if path[-1] != "kernel" or x.ndim < 2 or tuple(base_shape) == x.shape:
      continue
    ins, outs = layouts.get(path, ((x.ndim - 2,), (x.ndim - 1,)))
    inside = lambda axes, extension: functools.reduce(
        jnp.logical_or if extension else jnp.logical_and,
        [(jax.lax.broadcasted_iota(jnp.int32, x.shape, a) >= base_shape[a]) if extension else
         (jax.lax.broadcasted_iota(jnp.int32, x.shape, a) < base_shape[a]) for a in axes])
    flat[path] = jnp.where(inside(ins, True) & inside(outs, False), 0, x)
  return flax.traverse_util.unflatten_dict(flat)


def _batch_moments_interceptor(next_fun, args, kwargs, context):
  """Recalibration through an ordinary ``nn.BatchNorm``: normalises with this
  batch's statistics (whatever ``use_running_average`` says) and writes them to
  the ``batch_moments`` collection at the module's path."""
  module = context.module
  if not isinstance(module, nn.BatchNorm) or context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  x = args[0]
  x32 = x.astype(jnp.float32)
  axes = module.axis if isinstance(module.axis, tuple) else (module.axis,)
  features = tuple(a % x.ndim for a in axes)
  reduce = tuple(a for a in range(x.ndim) if a not in features)
  mean = jnp.mean(x32, reduce)
  var = jnp.maximum(jnp.mean(jnp.square(x32), reduce) - jnp.square(mean), 0.0)
  shape = [x.shape[a] if a in features else 1 for a in range(x.ndim)]
  y = (x32 - mean.reshape(shape)) * jax.lax.rsqrt(var.reshape(shape) + module.epsilon)
  if module.use_scale:
    y = y * module.get_variable("params", "scale").reshape(shape)
  if module.use_bias:
    y = y + module.get_variable("params", "bias").reshape(shape)
  module.put_variable("batch_moments", "mean", mean)
  module.put_variable("batch_moments", "var", var)
  return y.astype(module.dtype or x.dtype)


# --- making and checking a pair ---------------------------------------------------------------

def _functional(model, spec):
  if isinstance(model, nn.Module):
    return model
  if isinstance(model, NNXModel):
    return model
  if isinstance(model, nnx.Module):
    raise ConfigError("give an NNX model as its constructor, e.g. "
                      "lambda rngs: Model(cfg, rngs=rngs), not an instance")
  if callable(model):
    return NNXModel(model, spec=spec)
  raise ConfigError(f"paired takes two Linen modules or two NNX constructors, got "
                    f"{type(model).__name__}")


def paired(base, motivated, sample, *, exact: bool = True, train_arg: str | None = "auto",
           rng_streams: Sequence[str] = ("dropout",), specs: Mapping[str, Any] | None = None,
           ) -> Paired:
  """Two configurations of one module as one nested model, checked to nest.

  Args:
    base, motivated: two Linen modules (``MyNet(width=16)``, ``MyNet(width=64)``)
      or two NNX constructors (``lambda rngs: MyNet(16, rngs=rngs)``).
    sample: an input batch (array); its values drive the gap check.
    exact: refuse a pair whose gap is not 0 (``False``: accept a base that only
      shares weights; ``Paired.gap`` keeps the measured gap).
    train_arg: the keyword of a Linen module's ``__call__`` that switches
      training mode (``"auto"``: the first of ``TRAIN_ARGS`` it takes; None:
      none). NNX models are switched with ``nnx.view``.
    rng_streams: the RNG streams the steps pass (``steps.batch_rngs``).
    specs: ``{"base": spec, "motivated": spec}`` that rebuild each configuration
      (``module``, ``class``, ``kwargs``; ``from_class`` gives them), for export.
  """
  specs = dict(specs or {})
  base = _functional(base, specs.get("base"))
  motivated = _functional(motivated, specs.get("motivated"))
  if type(base) is not type(motivated):
    raise ConfigError("paired takes two Linen modules or two NNX constructors, not one of each")
  if isinstance(base, NNXModel) and base.cls is not motivated.cls:
    raise NestingError(f"the base is a {base.cls.__name__} and the motivated model a "
                       f"{motivated.cls.__name__}: pair two configurations of one class")
  if isinstance(base, nn.Module) and type(base) is not type(motivated):
    raise NestingError(f"the base is a {type(base).__name__} and the motivated model a "
                       f"{type(motivated).__name__}: pair two configurations of one class")
  train_kwarg = (None if isinstance(base, NNXModel) else _linen_train_kwarg(base, train_arg))
  for subnet, m in (("base", base), ("motivated", motivated)):
    if isinstance(m, nn.Module) and not specs.get(subnet):
      spec = linen_spec(m)
      if spec is not None:
        specs[subnet] = spec
  if not isinstance(sample, jax.Array):  # on the host: jnp.asarray compiled a program
    sample = np.asarray(sample)
    sample = sample.astype(jax.dtypes.canonicalize_dtype(sample.dtype), copy=False)
  probe = Paired(base, motivated, regions={}, layouts={}, train_kwarg=train_kwarg,
                 rng_streams=rng_streams, exact=exact, gap=0.0, specs=specs)
  regions = _shape_check(probe, sample)
  probe.regions = regions
  probe.layouts = _kernel_layouts(probe, sample)
  full = _random_variables(probe, sample)
  gap, where = _gap(probe, full, sample, _zero_outside(full, regions))
  probe.gap = gap
  if where is not None and exact:
    raise NestingError(f"the base is not a sub-network of the motivated model (gap "
                       f"{gap:.3g}): {where}; pass exact=False to share weights anyway")
  # extension_init="zero": the motivated model must then start as the base.
  if where is None:
    _, differs = _gap(probe, full, sample, _extensions_zeroed(probe, full), diagnose=False)
    if differs is not None:  # the reason is found when it is asked for (Paired.zero_init)
      probe._zero_init = functools.partial(_zero_init_refusal, _checked_as_now(probe), sample)
  else:
    probe._zero_init = "the base is not exactly nested (exact=False)"
  return probe


def _checked_as_now(model: "Paired") -> "Paired":
  """A copy of ``model`` as it is now (a caller may change its modules' dtype
  later: the check is made in the dtype it was made in), without its compiled
  check programs, which close over ``model`` itself."""
  copy = object.__new__(type(model))
  copy.__dict__.update({k: v for k, v in model.__dict__.items() if not k.startswith("_check_")})
  return copy


def _zero_init_refusal(model: "Paired", sample) -> str:
  """Why ``extension_init="zero"`` does not make the motivated model start as the
  base: the check of ``paired`` again, on the same random variables, diagnosed."""
  full = _random_variables(model, sample)
  gap, why = _gap(model, full, sample, _extensions_zeroed(model, full))
  return ("with the weights from extension inputs into base outputs zeroed the motivated "
          f"model does not compute the base ({why or f'gap {gap:.3g}'})")


def linen_spec(module: nn.Module) -> dict[str, Any] | None:
  """``{"module", "class", "kwargs"}`` that rebuild a Linen module, or None
  where its fields are not JSON values."""
  kwargs = {}
  for field in dataclasses.fields(module):
    if field.name in ("parent", "name"):
      continue
    value = getattr(module, field.name)
    if field.name == "dtype" and value is not None:
      value = jnp.dtype(value).name
    if isinstance(value, tuple):
      value = list(value)
    try:
      json.dumps(value)
    except TypeError:
      return None
    kwargs[field.name] = value
  cls = type(module)
  return {"module": cls.__module__, "class": cls.__qualname__, "kwargs": kwargs}


def _check_compiler():
  # Asked when a check runs, not at import: that would start a JAX backend.
  return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


def _eval_apply(model: Paired, subnet: str, variables, sample):
  # One program per sub-network, compiled for speed of compiling: a check runs
  # it once or twice (op by op, eagerly, each primitive compiles alone: slower).
  key = "_check_" + subnet
  if key not in model.__dict__:
    model.__dict__[key] = jax.jit(
        lambda v, x: model.apply(v, x, subnet=subnet, train=False),
        compiler_options=_check_compiler())
  return model.__dict__[key](variables, sample)


def _flat(variables):
  return {col: flax.traverse_util.flatten_dict(tree) if tree else {}
          for col, tree in variables.items()}


def _shape_check(model: Paired, sample) -> dict[str, dict]:
  # The key is made in the abstract trace: made on the host it compiled two programs.
  shapes = lambda module: jax.eval_shape(
      lambda x: model.init_module(module, jax.random.key(0), x), sample)
  full, base = _flat(shapes(model.motivated)), _flat(shapes(model.base))
  check_nested_shapes(full, base)
  return {col: {path: tuple(leaf.shape) for path, leaf in leaves.items()}
          for col, leaves in base.items() if leaves}


def _random_variables(model: Paired, sample):
  """The motivated model's variables at init, batch statistics made random too
  (means around 0, variances around 1) so that a wrong slice of them shows."""
  full = jax.jit(lambda x: model.init_module(model.motivated, jax.random.key(1), x),
                 compiler_options=_check_compiler())(sample)
  rng = np.random.default_rng(0)
  if full.get("batch_stats"):  # in numpy: an eager op would compile a program per shape
    full["batch_stats"] = jax.tree.map(
        lambda x: (np.asarray(x) + 0.2 * rng.uniform(size=x.shape)).astype(x.dtype),
        full["batch_stats"])
  return full


def _zero_outside(variables, regions):
  """``variables`` with every entry outside the base's leading slices set to
  zero, on the host (eager slicing and scatters compiled programs for every
  leaf: about 150 leaves in GPT-2 small's pair)."""
  out = {}
  for col, leaves in _flat(variables).items():
    shapes = regions.get(col, {})
    zeroed = {}
    for path, x in leaves.items():
      x = np.asarray(x)
      zeroed[path] = np.zeros_like(x)
      if path in shapes:
        index = tuple(slice(0, d) for d in shapes[path])
        zeroed[path][index] = x[index]
    out[col] = flax.traverse_util.unflatten_dict(zeroed) if zeroed else {}
  return out


def _differs(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b))) if a.size else 0.0


def _gap(model: Paired, full, sample, motivated_variables, *, diagnose: bool = True
         ) -> tuple[float, str | None]:
  """The gap, and None or the one-line diagnosis of where the outputs part
  (``diagnose=False``: only that they part, which costs no more programs)."""
  small = jax.tree.leaves(_eval_apply(model, "base", full, sample))
  large = jax.tree.leaves(_eval_apply(model, "motivated", motivated_variables, sample))
  if [x.shape for x in small] != [x.shape for x in large]:
    return float("inf"), (f"the outputs have shapes {[x.shape for x in small]} and "
                          f"{[x.shape for x in large]}")
  gap = max((_differs(a, b) for a, b in zip(small, large)), default=0.0)
  scale = max((float(np.max(np.abs(np.asarray(a)))) for a in small if a.size), default=0.0)
  if gap <= GAP_TOLERANCE * (1.0 + scale):
    return gap, None
  if not diagnose:
    return gap, f"gap {gap:.3g}"
  return gap, _diagnose(model, full, sample, motivated_variables)


# --- where the outputs part --------------------------------------------------------------------

@dataclasses.dataclass
class _Call:
  path: tuple
  kind: str               # the module's class name
  inputs: list            # array leaves of the positional arguments
  outputs: list           # array leaves of the output
  shapes: dict            # the module's own variables' shapes: {name: shape}
  children: list = dataclasses.field(default_factory=list)


def _trace(model: Paired, module, variables, sample) -> list[_Call]:
  """Every module call of one eval-mode forward, in the order the calls end
  (children before their parent), with inputs, outputs and variable shapes."""
  calls: list[_Call] = []  # filled while tracing; the arrays come out of the program

  def record(m, path, args, out, shapes):
    calls.append(_Call(path, type(m).__name__, [], [], shapes))
    return ([x for x in jax.tree.leaves(args) if hasattr(x, "shape")],
            [x for x in jax.tree.leaves(out) if hasattr(x, "shape")])

  if isinstance(module, NNXModel):
    def run(v, x):
      nnx_model = nnx.view(module.merged(v, None), deterministic=True,
                           use_running_average=True, raise_if_not_found=False)
      paths = {id(m): tuple(p) for p, m in nnx.iter_modules(nnx_model)}
      classes = {type(m) for _, m in nnx.iter_modules(nnx_model)}
      originals = {c: c.__dict__.get("__call__") for c in classes}
      arrays = []

      def wrap(cls):
        original = cls.__call__

        def call(self, *args, **kwargs):
          out = original(self, *args, **kwargs)
          shapes = {str(p[0]): tuple(v.get_value().shape) for p, v in
                    nnx.to_flat_state(nnx.state(self, nnx.Param)) if len(p) == 1}
          arrays.append(record(self, paths.get(id(self), ("?",)), args, out, shapes))
          return out
        return call

      try:
        for c in classes:
          c.__call__ = wrap(c)
        nnx_model(x)
      finally:
        for c, original in originals.items():
          if original is None:
            del c.__call__
          else:
            c.__call__ = original
      return arrays
  else:
    def run(v, x):
      arrays = []

      def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
          m = context.module
          own = m.variables.get("params", {}) if m.scope is not None else {}
          shapes = {k: tuple(a.shape) for k, a in own.items() if hasattr(a, "shape")}
          arrays.append(record(m, tuple(m.path), args, out, shapes))
        return out

      with nn.intercept_methods(interceptor):
        module.apply(dict(v), x, **model._mode(False))
      return arrays

  arrays = jax.jit(run, compiler_options=_check_compiler())(variables, sample)
  for call, (inputs, outputs) in zip(calls, arrays):
    call.inputs, call.outputs = _arrays(inputs), _arrays(outputs)
  return calls


def _arrays(tree) -> list:
  return [np.asarray(x) for x in jax.tree.leaves(tree) if hasattr(x, "shape")]


def _leading(big: np.ndarray, shape) -> np.ndarray | None:
  if big.ndim != len(shape) or any(s > b for s, b in zip(shape, big.shape)):
    return None
  return big[tuple(slice(0, s) for s in shape)]


def _output_differs(small: list, large: list) -> bool:
  if len(small) != len(large):
    return True
  for a, b in zip(small, large):
    part = _leading(b, a.shape)
    if part is None:
      return True
    scale = float(np.max(np.abs(a))) if a.size else 0.0
    if _differs(a, part) > GAP_TOLERANCE * (1.0 + scale):
      return True
  return False


def _diagnose(model: Paired, full, sample, motivated_variables) -> str:
  small = _trace(model, model.base, model.base_variables(full), sample)
  large = _trace(model, model.motivated, motivated_variables, sample)
  by_path = {}
  for c in large:
    by_path.setdefault(c.path, c)
  base_paths = {c.path for c in small}
  for c in small:
    other = by_path.get(c.path)
    if other is None or c.kind != other.kind or not _output_differs(c.outputs, other.outputs):
      continue
    # Its own children agree (they came first): does the motivated model run
    # more inside it?
    # The modules only the motivated model ran before this one's output.
    extra = [d for d in large[:large.index(other)] if d.path not in base_paths]
    if extra:
      shared_auto = [d.path for d in small if _auto_named(d.path, d.kind)
                     and d.path[:-1] == extra[0].path[:-1]]
      first = extra[0]
      if _auto_named(first.path, first.kind) and shared_auto:
        return (f"{_name(first.path)} runs only in the motivated model, and Flax's automatic "
                f"names ({first.kind}_0, {first.kind}_1, ... in call order) make "
                f"{_name(shared_auto[-1])} a different layer in each configuration "
                "(automatic names): give the layers names that do not depend on the depth")
      for d in extra:
        if not d.inputs or not d.outputs:
          continue
        if d.inputs[0].shape != d.outputs[0].shape or _differs(d.inputs[0], d.outputs[0]) > 0:
          return (f"{_name(d.path)} ({d.kind}), which only the motivated model runs, is not "
                  "the identity with its parameters zeroed (depth: a post-LN or non-residual "
                  "block); only residual pre-LN blocks nest by depth")
    return f"{_name(c.path)} ({c.kind}) {_kind(c, other, small, large)}"
  return "its output is not the leading slice of the motivated model's"


def _name(path) -> str:
  return "/".join(map(str, path)) or "the top module"


def _auto_named(path, kind) -> bool:
  return bool(path) and re.fullmatch(rf"{re.escape(kind)}_\d+", str(path[-1])) is not None


def _kind(small: _Call, large: _Call, small_calls, large_calls) -> str:
  """The kind of mismatch at the first module whose output differs."""
  if small.kind in _NORMS or small.kind.endswith("Norm") and small.kind != "BatchNorm":
    b, m = small.inputs[0].shape[-1], large.inputs[0].shape[-1]
    if b != m:
      return (f"normalises over all {m} features in the motivated model but {b} in the "
              "base: a width under a normalisation over features does not nest (its "
              "statistics run over every feature)")
  if _auto_named(small.path, small.kind):
    parent = small.path[:-1]
    count = lambda calls: len({c.path for c in calls if c.path[:-1] == parent
                               and _auto_named(c.path, small.kind)})
    if count(small_calls) != count(large_calls) or small.shapes != large.shapes:
      return ("is a different layer in each configuration: Flax names unnamed layers by "
              "call order (automatic names); give the layers names that do not depend on "
              "the depth")
  parent = next((c for c in small_calls if c.path == small.path[:-1]), None)
  if "Attention" not in small.kind and parent is not None and "Attention" in parent.kind:
    # A projection inside attention: what differs is the attention around it.
    other = next((c for c in large_calls if c.path == parent.path), None)
    if other is not None:
      small, large = parent, other
  if "Attention" in small.kind:
    heads = _head_shapes(small, small_calls), _head_shapes(large, large_calls)
    if heads[0] and heads[1]:
      (qb, kb), (qm, km) = heads
      if qb[-1] != qm[-1]:
        return (f"has head size {qb[-1]} in the base but {qm[-1]} in the motivated model: "
                "the 1/sqrt(head size) scale differs (nest heads at a fixed head size)")
      if kb is not None and km is not None and qb[-2] * km[-2] != qm[-2] * kb[-2]:
        return ("groups its query heads differently (grouped-query attention with another "
                "number of query heads per key/value head)")
  fused = [s for c in small_calls if c.path[:len(small.path)] == small.path
           for name, s in c.shapes.items() if name == "kernel" and s[-1] % 3 == 0]
  if fused and small.kind not in ("Dense", "Linear"):
    return ("splits a kernel whose output is a fused [q|k|v] (or similar) along one axis: "
            "the base's leading slice of it is not its q, k and v (fused layout; lay it out "
            "per head, [..., heads, 3, head size], or use separate kernels)")
  if _output_differs(small.inputs, large.inputs):
    # Its input already differs, though every module before it agreed: the
    # difference arose in code between modules, e.g. a split of a fused kernel.
    before = small_calls[:small_calls.index(small)]
    large_shapes = {c.path: c.shapes for c in large_calls}
    for c in reversed(before):
      kernel, other = c.shapes.get("kernel"), large_shapes.get(c.path, {}).get("kernel")
      if kernel and other and kernel[-1] % 3 == 0 and other[-1] % 3 == 0 and kernel != other:
        return (f"gets an input that differs although every module before it agrees: "
                f"{_name(c.path)}'s output ({kernel[-1]} wide in the base, {other[-1]} in the "
                "motivated model) is probably split as a fused [q|k|v] along one axis, whose "
                "leading slice is not the base's q, k and v (fused layout; lay it out per "
                "head, [..., heads, 3, head size], or use separate kernels)")
    return ("gets an input that differs although every module before it agrees: what runs "
            "between the modules (outside any submodule) does not nest")
  return "gives an output that is not the leading slice of the motivated model's"


def _head_shapes(call: _Call, calls):
  """(query kernel shape, key kernel shape or None) of an attention module."""
  inside = {c.path[-1]: c.shapes.get("kernel") for c in calls
            if c.path[:-1] == call.path and c.shapes.get("kernel") is not None}
  query = inside.get("query") or call.shapes.get("query")
  return (query, inside.get("key")) if query is not None and len(query) >= 3 else None


def _kernel_layouts(model: Paired, sample) -> dict[tuple, tuple[tuple, tuple]]:
  """``{params path of a kernel: (input axes, output axes)}`` for the layers
  whose layout is known (Dense, DenseGeneral, Conv, and NNX's Linear,
  LinearGeneral, Conv); other kernels are taken as ``[..., in, out]``, and the
  zero-init check refuses them where that is wrong."""
  layouts = {}
  m = model.motivated
  if isinstance(m, NNXModel):
    for path, module in nnx.iter_modules(nnx.eval_shape(lambda: m.constructor(nnx.Rngs(0)))):
      kernel = getattr(module, "kernel", None)
      if not isinstance(kernel, nnx.Variable):
        continue
      ndim = len(kernel.get_value().shape)
      if isinstance(module, nnx.LinearGeneral):
        n_in = len(module.in_features)
        layouts[(*path, "kernel")] = (tuple(range(n_in)), tuple(range(n_in, ndim)))
      elif isinstance(module, (nnx.Linear, nnx.Conv)):
        layouts[(*path, "kernel")] = ((ndim - 2,), (ndim - 1,))
    return layouts

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, nn.DenseGeneral):
      axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
      features = module.features if isinstance(module.features, tuple) else (module.features,)
      n_in = len(axis)
      layouts[(*module.path, "kernel")] = (tuple(range(n_in)),
                                           tuple(range(n_in, n_in + len(features))))
    elif context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.Conv)):
      layouts[(*module.path, "kernel")] = "last-two"
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    shapes = jax.eval_shape(lambda x: model.init_module(m, jax.random.key(0), x), sample)
  flat = flax.traverse_util.flatten_dict(shapes["params"])
  for path, layout in list(layouts.items()):
    if layout == "last-two" and path in flat:
      n = flat[path].ndim
      layouts[path] = ((n - 2,), (n - 1,))
    elif path not in flat:
      del layouts[path]
  return layouts


# --- from a config -----------------------------------------------------------------------------

def resolve(path: str):
  """``"package.module:Name"`` -> the object, with one-line errors."""
  if not isinstance(path, str) or path.count(":") != 1 or not all(path.split(":")):
    raise ConfigError(f"config.model.module must be 'package.module:Name', got {path!r}")
  module_name, attr = path.split(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ConfigError(f"config.model.module={path!r}: cannot import {module_name!r} ({e})") from e
  obj = module
  for part in attr.split("."):
    if not hasattr(obj, part):
      raise ConfigError(f"config.model.module={path!r}: {module_name} has no {attr!r}")
    obj = getattr(obj, part)
  return obj


def _is_linen(obj) -> bool:
  return isinstance(obj, type) and issubclass(obj, nn.Module)


def _is_nnx(obj) -> bool:
  return isinstance(obj, type) and issubclass(obj, nnx.Module)


def _check_kwargs(obj, kwargs: Mapping[str, Any], where: str, *, nnx_api: bool) -> None:
  try:
    signature = inspect.signature(obj)
  except (TypeError, ValueError):
    return
  params = signature.parameters
  if any(p.kind == p.VAR_KEYWORD for p in params.values()):
    return
  accepted = [n for n in params if n not in ("parent", "name", "rngs")]
  for key in kwargs:
    if key not in params or key in ("parent", "name", "rngs"):
      raise ConfigError(f"{where}: {obj.__name__} takes no keyword {key!r} (it takes "
                        f"{', '.join(accepted) or 'none'})")
  try:
    signature.bind_partial(**kwargs, **({"rngs": None} if nnx_api else {}))
  except TypeError as e:
    raise ConfigError(f"{where}: {obj.__name__}: {e}") from e
  missing = [n for n, p in params.items() if p.default is p.empty and n not in kwargs
             and n not in ("parent", "name", "rngs", "self")
             and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
  if missing:
    raise ConfigError(f"{where}: {obj.__name__} needs {', '.join(missing)}")


def from_class(obj, base_kwargs: Mapping[str, Any], motivated_kwargs: Mapping[str, Any],
               sample, *, path: str | None = None, **options) -> Paired:
  """``paired`` of ``obj(**base_kwargs)`` and ``obj(**motivated_kwargs)``: a Linen
  module class, or an NNX class or constructor function taking ``rngs=``; the
  export rebuilds each from ``path`` (``"package.module:Name"``) and the kwargs."""
  tuples = lambda v: tuple(map(tuples, v)) if isinstance(v, (list, tuple)) else v
  nnx_api = not _is_linen(obj)
  if nnx_api and not _is_nnx(obj) and "rngs" not in inspect.signature(obj).parameters:
    raise ConfigError(f"config.model.module: {getattr(obj, '__name__', obj)!r} is neither a "
                      "Linen module class nor an NNX class or constructor taking rngs=")
  where = lambda s: f"config.model.{s}"
  configs = {}
  for subnet, kwargs in (("base", base_kwargs), ("motivated", motivated_kwargs)):
    kwargs = {k: tuples(v) for k, v in dict(kwargs).items()}
    _check_kwargs(obj, kwargs, where(subnet), nnx_api=nnx_api)
    configs[subnet] = kwargs
  if path is None:
    path = f"{obj.__module__}:{obj.__qualname__}"
  module_name, attr = path.split(":")
  specs = {s: {"module": module_name, "class": attr, "kwargs": _jsonable(kw),
               "api": "nnx" if nnx_api else "linen"} for s, kw in configs.items()}
  if nnx_api:
    build = lambda kw: (lambda rngs: obj(**kw, rngs=rngs))
  else:
    build = lambda kw: obj(**kw)
  try:
    base, motivated = build(configs["base"]), build(configs["motivated"])
    return paired(base, motivated, sample, specs=specs, **options)
  except (ConfigError, NestingError):
    raise
  except TypeError as e:  # the class refused its keywords when it was built
    raise ConfigError(f"config.model.module={path!r}: {type(e).__name__}: {e}") from e


def _jsonable(value):
  if isinstance(value, tuple):
    return [_jsonable(v) for v in value]
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  return value


def from_config(config: Mapping[str, Any], num_classes: int, sample, *,
                dtype: str = "float32") -> Paired:
  """``config.model`` with ``module = "package.module:Name"``: ``base`` and
  ``motivated`` are its keyword arguments; ``num_classes`` (and ``dtype`` when
  not float32) are added where the class takes them and the config does not
  give them; ``exact`` (default True) as for ``paired``."""
  path = config["module"]
  obj = resolve(path)
  if not callable(obj):
    raise ConfigError(f"config.model.module={path!r} is not a class or function")
  options = {k: config[k] for k in config if k in ("exact", "train_arg")}
  kwargs = []
  try:
    params = inspect.signature(obj).parameters
  except (TypeError, ValueError):
    params = {}
  for subnet in ("base", "motivated"):
    kw = dict(config[subnet])
    if "num_classes" in params and "num_classes" not in kw:
      kw["num_classes"] = num_classes
    if dtype != "float32" and "dtype" in params and "dtype" not in kw:
      kw["dtype"] = dtype
    kwargs.append(kw)
  return from_class(obj, kwargs[0], kwargs[1], sample, path=path, **options)


def build_standalone(spec: Mapping[str, Any]):
  """The user's module a paired model's ``model.json`` describes: a Linen module,
  or an NNX instance (random state; ``load_exported`` puts the variables in)."""
  cls = resolve(f"{spec['module']}:{spec['class']}")
  tuples = lambda v: tuple(map(tuples, v)) if isinstance(v, list) else v
  kwargs = {k: tuples(v) for k, v in spec["kwargs"].items()}
  if spec.get("api") == "nnx":
    return cls(**kwargs, rngs=nnx.Rngs(0))
  return cls(**kwargs)


def load_nnx(module: nnx.Module, variables: Mapping[str, PyTree]) -> nnx.Module:
  """``module`` (an NNX instance) with an export's variables in it."""
  _, params, stats, rest = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
  nnx.replace_by_pure_dict(params, _int_keys(variables["params"]))
  if variables.get("batch_stats"):
    nnx.replace_by_pure_dict(stats, _int_keys(variables["batch_stats"]))
  nnx.update(module, params, stats)
  return module


def check_reloads(spec: Mapping[str, Any], variables: Mapping[str, PyTree], sample) -> None:
  """Refuses (one line) an export that would not reload into the user's class
  from ``spec`` with exactly ``variables``' structure and shapes."""
  try:
    rebuilt = build_standalone(spec)
  except Exception as e:  # any failure to rebuild: the export would be useless
    raise ConfigError(f"the export could not be reloaded: {spec['module']}:{spec['class']}"
                      f"(**{spec['kwargs']}) fails ({type(e).__name__}: {e})") from e
  if spec.get("api") == "nnx":
    _, params, stats, _ = nnx.split(rebuilt, nnx.Param, nnx.BatchStat, ...)
    want = {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(stats)}
  else:
    want = dict(jax.eval_shape(lambda x: rebuilt.init(jax.random.key(0), x), sample))
  shapes = lambda t: {c: {p: tuple(np.shape(x)) for p, x in
                          flax.traverse_util.flatten_dict(_int_keys(v)).items()}
                      for c, v in t.items() if v}
  if shapes(want) != shapes(variables):
    raise ConfigError(f"the export could not be reloaded: {spec['class']}(**{spec['kwargs']}) "
                      "makes variables of other shapes than the exported sub-network's")

