"""One process of the multi-process tests (tests/test_multiprocess.py).

``python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR PART``,
with XLA_FLAGS giving each process its own CPU devices. It joins the others
through ``jax.distributed.initialize`` on localhost (the global mesh spans every
process's devices) and writes what the test checks to
``OUT_DIR/process_<id>.json`` and ``.npz``:

- ``data``: its rows of the global batches (``sharding.process_rows``), and the
  global training and evaluation batches assembled by ``sharding.global_batch``
  from every process's share, gathered back to the host;
- ``train``: the summary of ``train.train_and_evaluate``.

The sizes and the config come from the environment (``MP_*``), set by the test.
"""

import json
import os
import sys


def data_part(out: dict, arrays: dict) -> None:
  import jax
  import jax.numpy as jnp
  from jax.experimental import multihost_utils

  from motivation_jax import data, sharding

  examples = int(os.environ["MP_MOCK_EXAMPLES"])
  batch_size = int(os.environ["MP_BATCH_SIZE"])
  train_steps = [int(t) for t in os.environ["MP_TRAIN_STEPS"].split(",")]
  eval_batch_sizes = [int(b) for b in os.environ["MP_EVAL_BATCH_SIZES"].split(",")]

  mesh = sharding.data_mesh()
  batch_sharding = sharding.batch_sharding(mesh)
  dataset = data.get_dataset("cifar10", mock_examples=examples)

  rows = sharding.process_rows(batch_sharding, batch_size)
  out["train_rows"] = [rows.start, rows.stop]
  train = data.TrainBatches(dataset, batch_size, seed=int(os.environ["MP_SEED"]),
                            augment=True, rows=rows)
  out["steps_per_epoch"] = train.steps_per_epoch
  out["train_share_sizes"] = []
  for t in train_steps:
    share = train[t]
    out["train_share_sizes"].append(len(share["label"]))
    batch = sharding.global_batch(share, batch_sharding)
    assert batch["image"].shape == (batch_size, *dataset.image_shape), batch["image"].shape
    assert batch["image"].sharding == batch_sharding
    assert not batch["image"].is_fully_addressable  # really spread over the processes
    gathered = multihost_utils.process_allgather(batch, tiled=True)
    for key, value in gathered.items():
      arrays[f"train_{t}_{key}"] = value
      arrays[f"train_{t}_share_{key}"] = share[key]

  # Evaluation: the mask summed on the devices (a reduction over the sharded
  # global batch, result replicated) counts every test example once.
  count = jax.jit(jnp.sum, out_shardings=sharding.replicated(mesh))
  for size in eval_batch_sizes:
    rows = sharding.process_rows(batch_sharding, size)
    out[f"eval_{size}_rows"] = [rows.start, rows.stop]
    batches = data.EvalBatches(dataset, size, rows=rows)
    out[f"eval_{size}_num_batches"] = len(batches)
    total = 0.0
    for b in range(len(batches)):
      batch = sharding.global_batch(batches[b], batch_sharding)
      total += float(count(batch["mask"]))
      for key, value in multihost_utils.process_allgather(batch, tiled=True).items():
        arrays[f"eval_{size}_{b}_{key}"] = value
    out[f"eval_{size}_mask_sum"] = total


def train_part(out: dict) -> None:
  from motivation_jax import config_lib, train

  config = config_lib.load_config_file(os.environ["MP_CONFIG"])
  for key, value in json.loads(os.environ.get("MP_OVERRIDES", "{}")).items():
    target = config
    *path, last = key.split(".")
    for p in path:
      target = target[p]
    target[last] = value
  config.progress_bar = False
  out["summary"] = train.train_and_evaluate(config, os.environ["MP_WORKDIR"])


def _phase(name: str, _start=[]) -> None:
  """A time stamp in the process's log: in one cold full run on the loaded
  2-core machine the data part took 150 s against 6 s alone (cold) or beside two
  busy processes; the stamps say where such time goes."""
  import time
  _start.append(_start[0] if _start else time.monotonic())
  print(f"[worker] {name} at {time.monotonic() - _start[0]:.1f} s", flush=True)


def main(process_id: int, num_processes: int, port: int, out_dir: str, part: str) -> None:
  _phase("start")
  import jax

  # CPU collectives between processes (gloo is jax 0.10's default; said explicitly).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=120)
  _phase("initialized")
  import numpy as np
  from jax.experimental import multihost_utils

  from motivation_jax import sharding

  out = {"process_index": jax.process_index(), "process_count": jax.process_count(),
         "local_device_count": jax.local_device_count(), "device_count": jax.device_count(),
         "mesh_device_processes": [d.process_index
                                   for d in sharding.data_mesh().devices.flat]}
  arrays: dict = {}
  if part == "data":
    data_part(out, arrays)
  elif part == "train":
    train_part(out)
  else:
    raise ValueError(f"unknown part {part!r}")
  _phase(f"{part} part done")
  np.savez(os.path.join(out_dir, f"process_{process_id}.npz"), **arrays)
  with open(os.path.join(out_dir, f"process_{process_id}.json"), "w") as f:
    json.dump(out, f)
  # Leave together: a process that exits early can fail the others' last collectives.
  multihost_utils.sync_global_devices("done")
  _phase("met the others")
  jax.distributed.shutdown()
  _phase("shut down")


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
