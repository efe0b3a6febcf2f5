"""A process with its own number of CPU devices, for tests/test_fsdp.py.

``python fsdp_worker.py PART OUT_JSON [ARGS...]``, with XLA_FLAGS giving the
process its devices (the rest of the suite runs on 4):

- ``equivalence MODELS FSDPS [POLICY]``: for each model (``mlp``, ``cnn``, ``vit``) and
  each ``mesh.fsdp``, a run of base, motivated and base steps on a sharded
  state created already sharded, beside the same steps on one device; writes
  the largest differences, the losses, and the layout of every leaf;
- ``train CONFIG_JSON``: ``train.train_and_evaluate`` of that config (a
  checkpoint to resume on another mesh); writes the summary, the restored
  state's layout and its parameters (``.npz`` beside the JSON).
"""

import json
import os
import sys

import numpy as np

TESTS = os.path.dirname(os.path.abspath(__file__))


def _models():
  from motivation_jax.models import NestedMLP, NestedResNet, NestedViT
  # Widths with every kind of slice: split leaves stored interleaved (a base
  # extent the devices divide), a base extent they do not divide (logical
  # order, XLA's slices), a split dim the base does not slice, leaves outside
  # the base (extra blocks).
  return {
      "mlp": lambda: NestedMLP(base_widths=(12, 24), motivated_widths=(32, 48, 40),
                               num_classes=10),
      "cnn": lambda: NestedResNet(base_widths=(4, 8), base_depths=(1, 1),
                                  motivated_widths=(8, 16), motivated_depths=(2, 2),
                                  num_classes=10),
      "vit": lambda: NestedViT(base_dim=16, base_heads=2, base_mlp_dim=32, base_depth=1,
                               motivated_dim=32, motivated_heads=4, motivated_mlp_dim=64,
                               motivated_depth=2, num_classes=10, patch_size=4, head_dim=8),
  }


def _spec(sharding) -> list:
  return [None if a is None else a for a in sharding.spec]


def equivalence(out_path: str, model_names: str, fsdps: str, policy: str = "switch") -> None:
  import jax
  import jax.numpy as jnp
  import optax

  from motivation_jax import nesting, sharding, steps

  rng = np.random.default_rng(0)
  batches = [{"image": jnp.asarray(rng.normal(size=(16, 8, 8, 1)), jnp.float32),
              "label": jnp.asarray(rng.integers(0, 10, size=(16,)), jnp.int32)}
             for _ in range(3)]
  kinds = ("base", "motivated", "base")
  optimizers = {
      # SGD as make_optimizer builds it (momentum: one parameter-shaped leaf);
      # AdamW has two. eps well above float noise, as in test_steps.py.
      "mlp": lambda: optax.adamw(1e-2, eps=1e-4, weight_decay=0.1),
      "cnn": lambda: optax.chain(optax.add_decayed_weights(5e-4),
                                 optax.sgd(0.05, momentum=0.9)),
      "vit": lambda: optax.adamw(1e-2, eps=1e-4, weight_decay=0.1),
  }
  results = {}
  for name in model_names.split(","):
    model, optimizer = _models()[name](), optimizers[name]()
    sample = batches[0]["image"][:1]
    wmap = nesting.weights_map(model, sample, subnet="motivated")
    key = jax.random.key(1)

    # One device, no shardings: the reference.
    expected = steps.create_train_state(model, optimizer, key, sample)
    plain = steps.make_train_steps(model, optimizer, wmap=wmap, policy=policy)
    expected_losses = []
    for kind, batch in zip(kinds, batches):
      expected, metrics = plain[kind](expected, batch)
      expected_losses.append(float(metrics["loss"]))
    expected = jax.device_get(expected)

    results[name] = {}
    for fsdp in (int(f) for f in fsdps.split(",")):
      mesh = sharding.make_mesh({"data": -1, "fsdp": fsdp, "fsdp_min_mib": 0.0})
      abstract = steps.abstract_train_state(model, optimizer, sample)
      layout = sharding.train_state_sharding(abstract, mesh, min_bytes=0)
      batch_sharding = sharding.batch_sharding(mesh)
      state = steps.create_train_state(model, optimizer, key, sample, state_sharding=layout)
      created_as = jax.tree.map(lambda x, s: x.sharding == s, state, layout)
      fns = steps.make_train_steps(model, optimizer, wmap=wmap, state_sharding=layout,
                                   batch_sharding=batch_sharding, policy=policy)
      # The steps read and write the storage order; the comparisons are in logical order.
      order = steps.make_order_converters(optimizer, wmap=wmap, state_sharding=layout)
      logical_params = jax.device_get(state.params)
      state = order["storage"](state)
      permuted = [not np.array_equal(x, y) for x, y in zip(
          jax.tree.leaves(logical_params), jax.tree.leaves(jax.device_get(state.params)))]
      losses = []
      for kind, batch in zip(kinds, batches):
        state, metrics = fns[kind](state, jax.device_put(batch, batch_sharding))
        losses.append(float(metrics["loss"]))
      kept = [x.sharding == s for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(layout))]
      stored_order = state.order
      got = jax.device_get(order["logical"](state))
      diff = lambda a, b: max([float(np.max(np.abs(np.asarray(x) - np.asarray(y)), initial=0))
                               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))],
                              default=0.0)
      flat = jax.tree_util.tree_leaves_with_path(layout.params)
      results[name][str(fsdp)] = {
          "mesh": dict(mesh.shape),
          "diff": {field: diff(getattr(got, field), getattr(expected, field))
                   for field in ("params", "opt_state", "batch_stats")},
          "step": int(got.step),
          "losses": losses, "expected_losses": expected_losses,
          "created_in_layout": all(jax.tree.leaves(created_as)),
          "kept_layout": all(kept),
          "order": stored_order,
          "permuted_leaves": int(sum(permuted)),
          "interleaved": {jax.tree_util.keystr(path): r.interleaved(s) for (path, s), r in
                          zip(flat, jax.tree.leaves(wmap.params))},
          "params": {jax.tree_util.keystr(path): {
              "shape": list(x.shape), "spec": _spec(s)}
              for (path, s), x in zip(flat, jax.tree.leaves(abstract.params))},
          "opt_state_specs": [_spec(s) for s in jax.tree.leaves(layout.opt_state)],
          "opt_state_shapes": [list(x.shape) for x in jax.tree.leaves(abstract.opt_state)],
          "batch_stats_specs": [_spec(s) for s in jax.tree.leaves(layout.batch_stats)],
      }
  with open(out_path, "w") as f:
    json.dump(results, f)


def train(out_path: str, config_json: str) -> None:
  import jax
  import ml_collections

  from motivation_jax import train as train_lib

  spec = json.loads(config_json)
  config = ml_collections.ConfigDict(spec["config"])
  run, state = train_lib.setup(config, spec["workdir"])
  restored = {"first_step": run.first_step,
              "params_specs": [_spec(x.sharding) for x in jax.tree.leaves(state.params)],
              "opt_state_specs": [_spec(x.sharding) for x in jax.tree.leaves(state.opt_state)],
              "mesh": dict(jax.tree.leaves(state.params)[0].sharding.mesh.shape)}
  np.savez(out_path + ".restored.npz",
           *[np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))])
  state, _ = train_lib.train(run, state)
  run.close()
  np.savez(out_path + ".final.npz",
           *[np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))])
  with open(out_path, "w") as f:
    json.dump({"restored": restored, "devices": jax.device_count()}, f)


if __name__ == "__main__":
  sys.path.insert(0, TESTS)
  part, out = sys.argv[1], sys.argv[2]
  {"equivalence": equivalence, "train": train}[part](out, *sys.argv[3:])
