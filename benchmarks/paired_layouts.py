r"""Issue 25's question, outside the package: which storage layout of the shared
(base-in-large) state lets a base step cost <= 1.05x an ordinary optax step of
the small module alone? (benchmarks/results/paired_step_scaling_cpu.md has the
answers measured on a CPU.)

Plain JAX + flax.linen + optax; nothing from motivation_jax.  The MLP is
examples/byom_models.py:MLP (Dense -> BatchNorm -> relu -> Dropout per hidden layer).

  taskset -c 1 python -m benchmarks.paired_layouts [--large=264,136] [--trials=9]
      [--steps=200] [--only=...] [--check] [--guard=ordered|plain] [--passthrough]

Variants (all jitted, variables and optimizer state donated, finite guard
``jnp.where(ok, new, old)`` on every leaf the step writes):

  ordinary   (0) the small module alone, natural arrays.
  natural    (1) large natural-layout leaves; base = leading slice; write-back =
                 lax.dynamic_update_slice of the guarded base into the donated leaf.
  blocks     (2) each leaf stored as separate arrays: kernel [A,B] ->
                 {base:[a,b], right:[a,B-b], below:[A-a,B]}, bias -> {base, rest}
                 (empty blocks omitted); base step replaces the base blocks, the others
                 pass through (donated, untouched).
  prefix     (3) each leaf stored flat, base region's a*b elements first (row-major),
                 then right.ravel(), below.ravel(); base view = reshape of a prefix
                 slice; write-back = DUS of the prefix.
  large      natural-layout step of the large module alone (the motivated step today).
  mot_blocks motivated step in block storage (concatenate blocks for the forward,
                 gradients split by autodiff, AdamW on the blocks).
  mot_prefix motivated step in prefix storage.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from examples.byom_models import MLP

SMALL = (256, 128)


# ----------------------------------------------------------------------------- layouts
# A layout maps one natural large leaf (shape L) whose base region is the leading slice
# of shape S to its storage, and back; ``view`` gives the base region (shape S) of a
# stored leaf, ``write`` puts a new base region into it.  Scalars (Adam's count) are
# stored as they are.

class Natural:
  name = "natural"

  @staticmethod
  def store(x, S):
    return x

  @staticmethod
  def natural(st, S, L):
    return st

  @staticmethod
  def view(st, S):
    if st.shape == S.shape:
      return st
    return lax.slice(st, (0,) * st.ndim, S.shape)

  @staticmethod
  def write(st, new, S):
    if st.shape == new.shape:
      return new
    return lax.dynamic_update_slice(st, new, (0,) * st.ndim)

  @staticmethod
  def view_at(st, S, z):
    if st.shape == S.shape:
      return st
    return lax.dynamic_slice(st, (z,) * st.ndim, S.shape)

  @staticmethod
  def write_at(st, new, S, z):
    if st.shape == new.shape:
      return new
    return lax.dynamic_update_slice(st, new, (z,) * st.ndim)


class Blocks:
  name = "blocks"

  @staticmethod
  def store(x, S):
    if x.ndim == 0:
      return x
    if x.ndim == 1:
      b = S.shape[0]
      d = {"base": x[:b]}
      if x.shape[0] > b:
        d["rest"] = x[b:]
      return d
    a, b = S.shape
    A, B = x.shape
    d = {"base": x[:a, :b]}
    if B > b:
      d["right"] = x[:a, b:]
    if A > a:
      d["below"] = x[a:, :]
    return d

  @staticmethod
  def natural(st, S, L):
    if not isinstance(st, dict):
      return st
    if len(S.shape) == 1:
      return jnp.concatenate([st["base"], st["rest"]]) if "rest" in st else st["base"]
    top = jnp.concatenate([st["base"], st["right"]], 1) if "right" in st else st["base"]
    return jnp.concatenate([top, st["below"]], 0) if "below" in st else top

  @staticmethod
  def view(st, S):
    return st["base"] if isinstance(st, dict) else st

  @staticmethod
  def write(st, new, S):
    return {**st, "base": new} if isinstance(st, dict) else new

  view_at = None  # the base blocks are whole arrays: no re-read needed


class Prefix:
  name = "prefix"

  @staticmethod
  def store(x, S):
    if x.ndim <= 1:
      return x  # a vector's base region is already its prefix
    a, b = S.shape
    A, B = x.shape
    return jnp.concatenate([x[:a, :b].ravel(), x[:a, b:].ravel(), x[a:, :].ravel()])

  @staticmethod
  def natural(st, S, L):
    if len(L.shape) <= 1:
      return st
    a, b = S.shape
    A, B = L.shape
    base = st[:a * b].reshape(a, b)
    right = st[a * b:a * B].reshape(a, B - b)
    below = st[a * B:].reshape(A - a, B)
    return jnp.concatenate([jnp.concatenate([base, right], 1), below], 0)

  @staticmethod
  def view(st, S):
    n = int(np.prod(S.shape))
    if st.size == n:
      return st.reshape(S.shape)
    return lax.slice(st, (0,), (n,)).reshape(S.shape)

  @staticmethod
  def write(st, new, S):
    if st.size == new.size:
      return new.reshape(st.shape)
    return lax.dynamic_update_slice(st, new.ravel(), (0,))

  @staticmethod
  def view_at(st, S, z):
    n = int(np.prod(S.shape))
    if st.size == n:
      return st.reshape(S.shape)
    return lax.dynamic_slice(st, (z,), (n,)).reshape(S.shape)

  @staticmethod
  def write_at(st, new, S, z):
    if st.size == new.size:
      return new.reshape(st.shape)
    return lax.dynamic_update_slice(st, new.ravel(), (z,))


LAYOUTS = {"natural": Natural, "blocks": Blocks, "prefix": Prefix}


# ----------------------------------------------------------------------------- steps

def loss_fn(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         labels).mean()


def all_finite(*trees):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trees)]))


def keep_if(ok, new, old):
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


GUARD = "ordered"  # or "plain"; set from --guard


def zero_after(tree):
  """An int32 zero XLA cannot prove is zero, computed from the first element of every
  leaf of ``tree`` (as motivation_jax.nesting.zero_after): what is selected or indexed
  with it waits for all of ``tree``."""
  firsts = [x[(0,) * x.ndim] for x in jax.tree.leaves(tree) if x.size]
  nan = firsts[0] != firsts[0]
  for f in firsts[1:]:
    nan = nan | (f != f)
  return jnp.minimum(nan.astype(jnp.int32), 0)


def rngs_for(t, subnet):
  return {"dropout": jax.random.fold_in(jax.random.fold_in(jax.random.key(7), subnet), t)}


def core_step(module, optimizer, params, stats, opt_state, batch, t, subnet=0,
              to_natural=None, stats_to_storage=None, opt_reread=None, write_params=None):
  """One guarded optax step; returns (params, stats, opt_state, metrics).
  ``to_natural``: storage params -> natural large params (motivated steps in a layout);
  ``stats_to_storage``: the mutated natural batch stats -> storage."""
  to_natural = to_natural or (lambda p: p)
  stats_nat = stats if stats_to_storage is None else stats[1]
  stats_old = stats if stats_to_storage is None else stats[0]

  def objective(p):
    logits, mutated = module.apply({"params": to_natural(p), "batch_stats": stats_nat},
                                   batch["image"], train=True, mutable=["batch_stats"],
                                   rngs=rngs_for(t, subnet))
    return loss_fn(logits, batch["label"]), (logits, mutated["batch_stats"])

  (loss, (logits, new_stats)), grads = jax.value_and_grad(objective, has_aux=True)(params)
  updates, new_opt = optimizer.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  if stats_to_storage is not None:
    new_stats = stats_to_storage(new_stats)
  ok = all_finite(loss, grads)
  new_params = keep_if(ok, new_params, params)
  new_stats = keep_if(ok, new_stats, stats_old)
  acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
  metrics = {"loss": loss, "accuracy": acc}
  if GUARD == "plain":
    return new_params, new_stats, keep_if(ok, new_opt, opt_state), metrics, 0
  # "ordered" (motivation_jax.steps.keep_finite_update / nesting.write_after): the
  # optimizer state's selects (and, for a view, its in-place write index) depend on the
  # selected parameters, so XLA need not copy the old moments before overwriting them.
  if write_params is not None:  # a view: the zero comes from the written-back leaves
    new_params = write_params(new_params)
  z = zero_after(new_params)
  late = ok & (z == 0)
  if opt_reread is not None:  # moments written = moments re-read at the write's index
    opt_state = opt_reread(z)
    _, new_opt = optimizer.update(grads, opt_state, params)
  return new_params, new_stats, keep_if(late, new_opt, opt_state), metrics, z


def make_ordinary(module, optimizer, subnet=0):
  def step(variables, opt_state, batch, t):
    p, s, o, m, _ = core_step(module, optimizer, variables["params"],
                              variables["batch_stats"], opt_state, batch, t, subnet)
    return {"params": p, "batch_stats": s}, o, m
  return jax.jit(step, donate_argnums=(0, 1))


def make_base_step(layout, small, optimizer, shapes):
  """Base step on stored (layout) large state.  ``shapes``: ShapeDtypeStruct trees of the
  small module's params / batch_stats / opt state (the base regions)."""
  sp, ss, so = shapes["params"], shapes["batch_stats"], shapes["opt"]
  view = lambda S, st: layout.view(st, S)
  write = lambda S, st, new: layout.write(st, new, S)

  def step(variables, opt_state, batch, t):
    params = jax.tree.map(view, sp, variables["params"])
    stats = jax.tree.map(view, ss, variables["batch_stats"])
    opt = jax.tree.map(view, so, opt_state)
    reread = None
    if GUARD == "ordered" and layout.view_at is not None:
      reread = lambda z: jax.tree.map(lambda S, st: layout.view_at(st, S, z), so, opt_state)
    write_p = lambda p: jax.tree.map(write, sp, variables["params"], p)
    p, s, o, m, z = core_step(small, optimizer, params, stats, opt, batch, t, 0,
                              opt_reread=reread, write_params=write_p if reread else None)
    if GUARD == "plain" or reread is None:
      p = write_p(p)
    if reread is None:
      new_opt = jax.tree.map(write, so, opt_state, o)
    else:
      new_opt = jax.tree.map(lambda S, st, new: layout.write_at(st, new, S, z), so,
                             opt_state, o)
    return ({"params": p,
             "batch_stats": jax.tree.map(write, ss, variables["batch_stats"], s)},
            new_opt, m)
  return jax.jit(step, donate_argnums=(0, 1))


def make_motivated_step(layout, large, optimizer, shapes, lshapes):
  sp, ss = shapes["params"], shapes["batch_stats"]
  lp, ls = lshapes["params"], lshapes["batch_stats"]
  to_nat = lambda tree, S, L: jax.tree.map(lambda s_, l_, st: layout.natural(st, s_, l_),
                                           S, L, tree)
  to_st = lambda tree, S: jax.tree.map(lambda s_, x: layout.store(x, s_), S, tree)

  def step(variables, opt_state, batch, t):
    stats_nat = to_nat(variables["batch_stats"], ss, ls)
    p, s, o, m, _ = core_step(large, optimizer, variables["params"],
                           (variables["batch_stats"], stats_nat), opt_state, batch, t, 1,
                           to_natural=lambda q: to_nat(q, sp, lp),
                           stats_to_storage=lambda x: to_st(x, ss))
    return {"params": p, "batch_stats": s}, o, m
  return jax.jit(step, donate_argnums=(0, 1))


# ----------------------------------------------------------------------------- setup

def setup(large_widths, batch_size=128):
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(batch_size, 8, 8, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, size=(batch_size,)), jnp.int32)}
  small, large = MLP(SMALL), MLP(tuple(large_widths))
  optimizer = optax.adamw(1e-3)
  lvars = large.init({"params": jax.random.key(0)}, batch["image"])
  lvars = {"params": lvars["params"], "batch_stats": lvars["batch_stats"]}
  # Non-trivial optimizer moments and stats so the write-backs carry real values.
  lopt = optimizer.init(lvars["params"])
  key = jax.random.key(3)
  lopt = jax.tree.map(lambda x: x if x.ndim == 0 else 1e-3 * jnp.abs(
      jax.random.normal(jax.random.fold_in(key, x.size), x.shape)), lopt)
  svars_shape = jax.eval_shape(lambda: small.init({"params": jax.random.key(0)},
                                                  batch["image"]))
  shapes = {"params": svars_shape["params"], "batch_stats": svars_shape["batch_stats"]}
  shapes["opt"] = jax.eval_shape(optimizer.init, shapes["params"])
  lshapes = {"params": jax.eval_shape(lambda: lvars["params"]),
             "batch_stats": jax.eval_shape(lambda: lvars["batch_stats"]),
             "opt": jax.eval_shape(lambda: lopt)}
  return batch, small, large, optimizer, lvars, lopt, shapes, lshapes


def stored(layout, lvars, lopt, shapes):
  st = lambda S, x: layout.store(x, S)
  return ({"params": jax.tree.map(st, shapes["params"], lvars["params"]),
           "batch_stats": jax.tree.map(st, shapes["batch_stats"], lvars["batch_stats"])},
          jax.tree.map(st, shapes["opt"], lopt))


def small_of(lvars, lopt, shapes):
  v = lambda S, x: jnp.copy(Natural.view(x, S))
  return ({"params": jax.tree.map(v, shapes["params"], lvars["params"]),
           "batch_stats": jax.tree.map(v, shapes["batch_stats"], lvars["batch_stats"])},
          jax.tree.map(v, shapes["opt"], lopt))


def fresh(x):
  return jax.tree.map(jnp.copy, x)


def build(large_widths):
  batch, small, large, optimizer, lvars, lopt, shapes, lshapes = setup(large_widths)
  # lshapes for the motivated steps need small (base) shapes for params and stats
  variants = {}
  sv, so = small_of(lvars, lopt, shapes)
  variants["ordinary"] = (make_ordinary(small, optimizer), fresh(sv), fresh(so))
  for name in ("natural", "blocks", "prefix"):
    L = LAYOUTS[name]
    v, o = stored(L, lvars, lopt, shapes)
    variants[name] = (make_base_step(L, small, optimizer, shapes), fresh(v), fresh(o))
  variants["large"] = (make_ordinary(large, optimizer, subnet=1), fresh(lvars), fresh(lopt))
  for name in ("blocks", "prefix"):
    L = LAYOUTS[name]
    v, o = stored(L, lvars, lopt, shapes)
    variants["mot_" + name] = (make_motivated_step(L, large, optimizer, shapes, lshapes),
                               fresh(v), fresh(o))
  return batch, variants, (lvars, lopt, shapes, lshapes)


# ----------------------------------------------------------------------------- checks

def check(large_widths, nsteps=3):
  batch, variants, (lvars, lopt, shapes, lshapes) = build(large_widths)
  outs = {}
  for name, (fn, v, o) in variants.items():
    v, o = fresh(v), fresh(o)
    for t in range(nsteps):
      v, o, m = fn(v, o, batch, t)
    outs[name] = (v, o, m)
  report = {}
  # base steps: base region of every stored leaf against the ordinary step
  ref_v, ref_o, ref_m = outs["ordinary"]
  for name in ("natural", "blocks", "prefix"):
    L = LAYOUTS[name]
    v, o, m = outs[name]
    view = lambda S, st: L.view(st, S)
    got = ({"params": jax.tree.map(view, shapes["params"], v["params"]),
            "batch_stats": jax.tree.map(view, shapes["batch_stats"], v["batch_stats"])},
           jax.tree.map(view, shapes["opt"], o))
    report[name] = compare(got, (ref_v, ref_o))
    # the region outside the base must be untouched
    lv = {"params": jax.tree.map(lambda S, L_, st: L.natural(st, S, L_), shapes["params"],
                                 lshapes["params"], v["params"]),
          "batch_stats": jax.tree.map(lambda S, L_, st: L.natural(st, S, L_),
                                      shapes["batch_stats"], lshapes["batch_stats"],
                                      v["batch_stats"])}
    outside_ok = all(
        bool(jnp.array_equal(_mask_out(a, S), _mask_out(b, S)))
        for a, b, S in zip(jax.tree.leaves(lv), jax.tree.leaves(lvars),
                           jax.tree.leaves({"params": shapes["params"],
                                            "batch_stats": shapes["batch_stats"]})))
    report[name] += f", outside base untouched: {outside_ok}"
  # motivated steps in a layout against the natural large step
  ref_v, ref_o, _ = outs["large"]
  for name in ("blocks", "prefix"):
    L = LAYOUTS[name]
    v, o, _ = outs["mot_" + name]
    nat = lambda S, L_, st: L.natural(st, S, L_)
    got = ({"params": jax.tree.map(nat, shapes["params"], lshapes["params"], v["params"]),
            "batch_stats": jax.tree.map(nat, shapes["batch_stats"], lshapes["batch_stats"],
                                        v["batch_stats"])},
           jax.tree.map(nat, shapes["opt"], lshapes["opt"], o))
    report["mot_" + name] = compare(got, (ref_v, ref_o))
  return report


def _mask_out(x, S):
  """x with its base region zeroed (to compare only what lies outside it)."""
  if x.shape == S.shape:
    return jnp.zeros_like(x)
  return lax.dynamic_update_slice(x, jnp.zeros(S.shape, x.dtype), (0,) * x.ndim)


def compare(got, ref):
  g, r = jax.tree.leaves(got), jax.tree.leaves(ref)
  assert len(g) == len(r)
  same = all(bool(jnp.array_equal(a, b)) for a, b in zip(g, r))
  close = all(bool(jnp.allclose(a, b, rtol=1e-5, atol=1e-6)) for a, b in zip(g, r))
  maxdiff = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                if a.size else 0.0 for a, b in zip(g, r))
  return f"bit-identical: {same}, allclose: {close}, max |diff|: {maxdiff:.3g}"


# ----------------------------------------------------------------------------- timing

def time_variants(large_widths, trials=9, steps=200, only=None):
  batch, variants, _ = build(large_widths)
  names = [n for n in variants if only is None or n in only or n == "ordinary"]
  state = {n: (variants[n][1], variants[n][2]) for n in names}

  def run(name, n):
    fn = variants[name][0]
    v, o = state[name]
    start = time.perf_counter()
    for t in range(n):
      v, o, m = fn(v, o, batch, t)
    m["loss"].block_until_ready()
    state[name] = (v, o)
    return (time.perf_counter() - start) / n

  for n in names:  # compile and warm up
    run(n, 20)
  times = {n: [] for n in names}
  ratios = {n: [] for n in names}
  for trial in range(trials):
    k = trial % len(names)
    order = names[k:] + names[:k]
    if trial % 2:
      order = order[::-1]
    got = {n: run(n, steps) for n in order}
    for n in names:
      times[n].append(got[n])
      ratios[n].append(got[n] / got["ordinary"])
  return {n: (1e6 * statistics.median(times[n]), statistics.median(ratios[n]),
              1e6 * min(times[n])) for n in names}


def passthrough_us(n_extra: int, returned: bool = True, reps: int = 2000) -> float:
  """Host time of a jitted call that hands ``n_extra`` small donated arrays
  through untouched (``returned``) or takes them unused, less the same call
  without them: what the untouched blocks cost a base step over the whole state."""
  def bench(n):
    a = jnp.ones((64, 256))
    extra = [jnp.ones((8,)) + i for i in range(n)]
    if returned:
      f = jax.jit(lambda a, e: (a * 1.0001, e), donate_argnums=(0, 1))
    else:
      f = jax.jit(lambda a, e: a * 1.0001, donate_argnums=(0,))
    ts = []
    for trial in range(8):  # the first warms up
      t0 = time.perf_counter()
      for _ in range(reps if trial else 50):
        if returned:
          a, extra = f(a, extra)
        else:
          a = f(a, extra)
      a.block_until_ready()
      ts.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(ts[1:])
  return bench(n_extra) - bench(0)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--large", default="264,136")
  ap.add_argument("--trials", type=int, default=9)
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--only", default=None)
  ap.add_argument("--check", action="store_true")
  ap.add_argument("--guard", default="ordered", choices=("ordered", "plain"))
  ap.add_argument("--hlo", default=None, help="dump compiled HLO of this variant")
  ap.add_argument("--passthrough", action="store_true",
                  help="only the host cost of handing untouched arrays through a call")
  args = ap.parse_args()
  if args.passthrough:
    for n in (17, 34, 68):
      print(f"{n} untouched arrays: {passthrough_us(n):.1f} us handed through, "
            f"{passthrough_us(n, returned=False):.1f} us taken unused")
    return
  lw = tuple(int(w) for w in args.large.split(","))
  global GUARD
  GUARD = args.guard
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; small {SMALL} in large {lw}; "
        f"guard {GUARD}")
  if args.hlo:
    batch, variants, _ = build(lw)
    fn, v, o = variants[args.hlo]
    print(fn.lower(v, o, batch, 0).compile().as_text())
    return
  if args.check:
    for k, r in check(lw).items():
      print(f"  check {k:11s} {r}")
  only = None if args.only is None else set(args.only.split(","))
  res = time_variants(lw, args.trials, args.steps, only)
  print(f"  {'variant':11s} {'median us':>10s} {'min us':>8s} {'ratio to (0)':>13s}")
  for n, (us, r, mn) in res.items():
    print(f"  {n:11s} {us:10.0f} {mn:8.0f} {r:13.3f}")
  if "large" in res:
    for n in ("mot_blocks", "mot_prefix"):
      if n in res:
        print(f"  {n} / large (median of medians): {res[n][0] / res['large'][0]:.3f}")


if __name__ == "__main__":
  main()
