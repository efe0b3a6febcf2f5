"""Item 6 of the harness (benchmarks/run.py): absolute step times, MFU and memory
of each step kind on an accelerator.

ResNet-20 in ResNet-56 and ViT-Ti in ViT-S on 32x32 images, in float32 and,
where ``config.dtype`` exists, bfloat16. benchmarks/lm_steps.py takes its MFU
from ``peak_flops`` and its memory from ``step_memory_bytes``.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any, Callable

import jax

from benchmarks.common import Mode, load_config, median
from motivation_jax import train

# Dense peak FLOP/s per chip for (float32, bfloat16) operands, from the vendors' data
# sheets (SXM parts, no sparsity). JAX's default precision computes float32 matrix
# products and convolutions in TensorFloat-32 on these GPUs (docs.jax.dev, "Matmul
# precision"), so float32's peak is the TF32 tensor-core one, not plain FP32's.
PEAK_FLOPS = {"H100": (494.7e12, 989.4e12), "H200": (494.7e12, 989.4e12),
              "A100": (156e12, 312e12), "L4": (60e12, 121e12)}
# (label, config file): ResNet-20 in ResNet-56, ViT-Ti in ViT-S, 32x32, batch 128.
ACCELERATOR_CONFIGS = (("resnet20 in resnet56", "configs/cifar10_resnet.py"),
                       ("vit-ti in vit-s", "configs/cifar10_vit.py"))


def peak_flops(device, dtype: str) -> float | None:
  for key, (fp32, bf16) in PEAK_FLOPS.items():
    if key.lower() in device.device_kind.lower():
      return bf16 if dtype == "bfloat16" else fp32
  return None


def step_memory_bytes(compiled) -> int | None:
  """What XLA's buffer assignment gives one call of a compiled step at most:
  its arguments, outputs and temporaries, less the outputs written into
  donated arguments. Per program, unlike the device's ``peak_bytes_in_use``,
  which holds since the process started."""
  try:
    m = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):  # a backend that does not report it
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def measure_accelerator(mode: Mode, workdir: str, *, batch_size: int | None = None,
                        variant: str | None = None,
                        rows: list[dict[str, Any]] | None = None,
                        on_rows: Callable[[], None] = lambda: None) -> list[dict[str, Any]]:
  """Absolute step times, MFU and memory per step kind (item 6), through
  ``train.setup`` (TFDS mock data stands in for CIFAR-10); bfloat16 too where
  the config has ``dtype``. Appends to ``rows`` and calls ``on_rows`` after each
  (model, dtype), so that a run cut short keeps what it measured."""
  device = jax.devices()[0]
  rows = [] if rows is None else rows
  for label, path in ACCELERATOR_CONFIGS:
    base_config = load_config(path + (f":{variant}" if variant else ""))
    dtypes = ["float32"] + (["bfloat16"] if "dtype" in base_config else [])
    for dtype in dtypes:
      config = copy.deepcopy(base_config)
      if "dtype" in config:
        config.dtype = dtype
      config.mock_data_examples = max(config.mock_data_examples, 256)
      config.batch_size = batch_size or config.batch_size
      config.progress_bar = False
      config.bn_recalibration_batches = 0
      start = time.perf_counter()
      run, state = train.setup(config, os.path.join(workdir, f"{label}_{dtype}"))
      setup_s = time.perf_counter() - start
      batch = run.put(run.train_data[0])
      for kind in ("base", "motivated"):
        compiled = run.train_steps[kind]
        for _ in range(3):
          state, metrics = compiled(state, batch)
        jax.block_until_ready(state)
        repeats = 2 if mode.name == "tiny" else 20
        times = []
        for _ in range(max(mode.trials, 1)):
          start = time.perf_counter()
          for _ in range(repeats):
            state, metrics = compiled(state, batch)
          jax.block_until_ready(state)
          times.append((time.perf_counter() - start) / repeats)
        step_s = median(times)
        peak = peak_flops(device, dtype)
        stats = device.memory_stats() or {}
        step_bytes = step_memory_bytes(compiled)
        rows.append({"model": label, "dtype": dtype, "kind": kind, "batch": config.batch_size,
                     "step_ms": step_s * 1e3, "flops": run.flops[kind],
                     "peak_flops": peak, "mfu": run.flops[kind] / step_s / peak if peak else None,
                     "step_memory_gib": None if step_bytes is None else step_bytes / 2**30,
                     "peak_memory_gib": (stats["peak_bytes_in_use"] / 2**30
                                         if "peak_bytes_in_use" in stats else None),
                     "calls": repeats, "setup_s": setup_s})
      run.close()
      on_rows()
  return rows
