r"""Bytes each compiled train step moves between devices under FSDP, read from XLA's HLO.

For each config and mesh: the nested base step, the nested motivated step and an
FSDP step of the standalone base model (the same fsdp rule applied to its own
shapes), compiled with explicit shardings as ``train.setup`` compiles them, and
the two conversions between the logical and the storage order
(``steps.make_order_converters``: once as training starts, once per checkpoint
and evaluation); the collectives of each compiled program
(``.lower(...).compile().as_text()``), counted per kind. docs/sharding.md
quotes the table.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
    python benchmarks/fsdp_collectives.py --out benchmarks/results/fsdp_collectives_cpu
  # the same base steps with the slices left to XLA, for comparison
  ... python benchmarks/fsdp_collectives.py --xla_slices \
    --out benchmarks/results/fsdp_collectives_cpu_xla_slices

Bytes are what one device receives per step, averaged over the devices, with
the usual ring costs: an all-gather receives (g-1)/g of its result, a
reduce-scatter or all-to-all (g-1)/g of its operand, an all-reduce twice that
(a reduce-scatter, then an all-gather), for g devices in a group; a
collective-permute moves its operand once per pair whose source and target
differ. The counts are from XLA's CPU backend: a GPU or TPU backend may
choose other collectives (e.g. reduce-scatter for gradients where the CPU
backend all-reduces), so compare rows within one table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
          "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_OP = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.*?)\s+(" + "|".join(KINDS) +
                 r")(?:-start)?\((.*)$")


def _array_bytes(shapes: str) -> int:
  return sum(_BYTES.get(dtype, 0) * math.prod(int(d) for d in dims.split(",") if d)
             for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shapes))


def _group_size(attrs: str, num_devices: int) -> int:
  # e.g. mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_0'}
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs)
  if mesh:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", mesh.group(2)))
  iota = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)
  if iota:
    return int(iota.group(1).split(",")[-1])
  groups = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
  if groups:
    return len(groups.group(1).split(","))
  return num_devices


def collectives(hlo_text: str, num_devices: int) -> dict[str, dict[str, float]]:
  """``{kind: {"ops": n, "bytes": bytes received per device}}`` of a compiled
  (SPMD-partitioned) HLO module, by the ring costs of the module docstring."""
  out = {kind: {"ops": 0, "bytes": 0.0} for kind in KINDS}
  for line in hlo_text.splitlines():
    match = _OP.match(line)
    if not match:
      continue
    result, kind, rest = match.groups()
    # An async start's result holds its operands and results; the operands
    # come first in the line's arguments, so size by the arguments where needed.
    size = _array_bytes(result)
    if kind == "collective-permute":
      pairs = re.findall(r"\{(\d+),(\d+)\}", rest.split("source_target_pairs=", 1)[-1])
      moved = sum(a != b for a, b in pairs)
      bytes_ = size * moved / num_devices
    else:
      g = _group_size(rest, num_devices)
      share = (g - 1) / g
      if kind == "all-gather":
        bytes_ = size * share
      elif kind == "reduce-scatter":
        bytes_ = size * g * share
      elif kind == "all-reduce":
        bytes_ = 2 * size * share
      else:  # all-to-all
        bytes_ = size * share
    out[kind]["ops"] += 1
    out[kind]["bytes"] += bytes_
  return out


def _step_programs(config, mesh_shape: tuple[int, int], batch_size: int):
  """HLO text of the nested base and motivated steps and the standalone base's step."""
  import jax
  import jax.numpy as jnp

  from motivation_jax import models, nesting, sharding, steps

  shape, classes = {"digits": ((8, 8, 1), 10), "cifar10": ((32, 32, 3), 10)}[config.dataset]
  mesh = sharding.make_mesh({"data": mesh_shape[0], "fsdp": mesh_shape[1],
                             "fsdp_min_mib": config.mesh.fsdp_min_mib})
  min_bytes = config.mesh.fsdp_min_mib * 2**20
  optimizer = steps.make_optimizer(config, 1000, 100)
  batch_sharding = sharding.batch_sharding(mesh)
  batch = {"image": jax.ShapeDtypeStruct((batch_size, *shape), jnp.float32,
                                         sharding=batch_sharding),
           "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batch_sharding)}
  nested = models.build_model(config.model, classes)
  texts, params = {}, {}
  for label, model, kind in (("nested base", nested, "base"),
                             ("nested motivated", nested, "motivated"),
                             ("standalone base", nested.standalone("base"), "motivated")):
    sample = jnp.zeros((1, *shape), jnp.float32)
    abstract = steps.abstract_train_state(model, optimizer, sample,
                                          batch_norm_stats=config.model.batch_norm_stats)
    layout = sharding.train_state_sharding(abstract, mesh, min_bytes=min_bytes)
    wmap = nesting.weights_map(model, sample, subnet="motivated")
    fns = steps.make_train_steps(model, optimizer, wmap=wmap, state_sharding=layout,
                                 batch_sharding=batch_sharding)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         abstract, layout)
    # The steps take the state in the order its layout stores (docs/sharding.md).
    state = state.replace(order=steps.stored_order(layout, wmap))
    texts[label] = fns[kind].lower(state, batch).compile().as_text()
    params[label] = wmap.num_params("base" if kind == "base" else "motivated")
    if label == "nested motivated" and state.order == "storage":
      # The conversions between the orders: once into storage order as training
      # starts, once back for each checkpoint and evaluation (docs/sharding.md).
      order = steps.make_order_converters(optimizer, wmap=wmap, state_sharding=layout)
      for name, stored in (("to storage order", state.replace(order="logical")),
                           ("to logical order", state)):
        texts[name] = order[name.split()[1]].jitted.lower(stored).compile().as_text()
        params[name] = params[label]
  return texts, params


CASES = {
    # name: (config file, overrides, batch size)
    "default_cnn": ("default.py", {"mesh.fsdp_min_mib": 0.0}, 64),
    "cifar10_vit": ("cifar10_vit.py", {"mesh.fsdp_min_mib": 0.0}, 128),
    "cifar10_resnet": ("cifar10_resnet.py", {"mesh.fsdp_min_mib": 0.0}, 128),
}


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--meshes", default="1x8,2x4", help="data x fsdp, comma separated")
  parser.add_argument("--out", default=None, help="path prefix for .json and .md")
  parser.add_argument("--xla_slices", action="store_true",
                      help="for comparison: leave the base step's slices of split leaves "
                           "and its write-back to XLA's partitioner (nesting's plain path)")
  args = parser.parse_args(argv)
  import jax
  sys.path.insert(0, ROOT)
  from motivation_jax import config_lib, nesting

  if args.xla_slices:
    nesting._split_dim = lambda sharding, region: None

  rows = []
  for case in args.cases.split(","):
    path, overrides, batch_size = CASES[case]
    config = config_lib.load_config_file(os.path.join(ROOT, "configs", path))
    for key, value in overrides.items():
      section, name = key.split(".")
      config[section][name] = value
    for mesh in args.meshes.split(","):
      shape = tuple(int(n) for n in mesh.split("x"))
      texts, params = _step_programs(config, shape, batch_size)
      for label, text in texts.items():
        if args.xla_slices and label != "nested base":
          continue
        counts = collectives(text, jax.device_count())
        rows.append({"case": case, "mesh": mesh, "params": params[label],
                     "step": label + (" (XLA's slices)" if args.xla_slices else ""),
                     "batch_size": batch_size, **{k: counts[k] for k in KINDS},
                     "total_bytes": sum(c["bytes"] for c in counts.values())})
        print(json.dumps(rows[-1]), flush=True)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
      json.dump({"machine": f"{jax.device_count()} {jax.devices()[0].platform.upper()} devices "
                            "(XLA's host platform)", "jax": jax.__version__, "rows": rows},
                f, indent=1)
    with open(args.out + ".md", "w") as f:
      f.write(table(rows))
  return rows


def table(rows: list[dict]) -> str:
  """The rows as a markdown table (KiB received per device per step)."""
  kib = lambda b: f"{b / 1024:,.1f}"
  lines = ["| config | mesh (data x fsdp) | step | parameters | all-gather | all-reduce | "
           "reduce-scatter | all-to-all | collective-permute | total KiB |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['case']} | {r['mesh']} | {r['step']} | {r['params']:,} | " + " | ".join(
        f"{kib(r[k]['bytes'])} ({r[k]['ops']})" for k in
        ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute"))
        + f" | {kib(r['total_bytes'])} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
