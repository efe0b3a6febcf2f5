r"""Data headroom: images/s of each config's input pipeline against what its train
steps consume, measured one after the other in one process on this machine.

  python benchmarks/data_throughput.py --out benchmarks/results/data_throughput_cpu

- *pipeline*: host batches from ``TrainBatches.iterator`` at the config's batch
  size and ``data_threads`` (reading, augmentation; uint8 images), after two
  warm-up batches;
- *base step*, *motivated step*: the compiled train steps of the config's
  nested model on one device, on one batch already on the device, after a
  warm-up step;
- *headroom*: pipeline images/s over the base step's (the faster consumer).

Data sets that are not on this machine are replaced by TFDS mock data of
``--mock-examples`` examples per split (random images of the right shape,
generated on read instead of decoded); ``png_decode_us`` gives what decoding a
real PNG of that shape costs here, for comparison. ImageNet's mock images are
10-50 px, which says nothing about decoding; ``--synthetic-imagenet N`` instead
has TFDS's ImageNet builder write N synthetic JPEGs of 300-500 px a side (about
70 KB each, measured here) to a temporary directory, and the ImageNet configs
read those:

  python benchmarks/data_throughput.py --configs imagenet_resnet,imagenet_vit \
      --synthetic-imagenet 512 --batch-size 32 --out benchmarks/results/data_throughput_cpu_imagenet

``--workers 1,2`` measures the pipeline again with that many grain worker
processes (``config.data_workers``) against ``--threads`` threads (default: the
config's), pipeline only with ``--no-steps``, and gives the bytes a batch copies
to the device with uint8 images against float32 ones:

  python benchmarks/data_throughput.py --configs imagenet_resnet --synthetic-imagenet 512 \
      --batch-size 32 --threads 1,2 --workers 1,2 --no-steps \
      --out benchmarks/results/data_workers_cpu_imagenet
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from motivation_jax import config_lib, data, steps, train
from motivation_jax.common import cpu_model
from motivation_jax.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("fashion_mnist_cnn", "cifar10_resnet", "cifar100_efficientnet", "cifar10_vit")


def _synthetic_jpeg(rng: np.random.Generator) -> bytes:
  """A photo-like JPEG: smooth colour fields plus sensor-like noise, 300-500 px a side."""
  from PIL import Image

  height, width = (int(v) for v in rng.integers(300, 501, size=2))
  fields = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
  smooth = np.asarray(fields.resize((width, height), Image.BICUBIC), np.float32)
  pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def write_synthetic_imagenet(directory: str, train_examples: int) -> None:
  """An imagenet2012 TFDS directory (array_record) of synthetic JPEGs, offline."""
  from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as imagenet

  class SyntheticImagenet(imagenet.Builder, skip_registration=True):
    name = "imagenet2012"

    @classmethod
    def _get_pkg_dir_path(cls):  # ImageNet's own metadata (labels, citation)
      return imagenet.Builder._get_pkg_dir_path()

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(0, train_examples),
              "validation": self._generate_examples(1, max(train_examples // 4, 1))}

    def _generate_examples(self, seed, n):
      rng = np.random.default_rng(seed)
      for i in range(n):
        yield f"{seed}_{i}", {"file_name": f"{seed}_{i}.JPEG", "image": _synthetic_jpeg(rng),
                              "label": i % 1000}

  SyntheticImagenet(data_dir=directory, file_format="array_record").download_and_prepare()


def load_dataset(config, mock_examples: int, synthetic_imagenet: str | None = None):
  """The config's data set, or mock data where it is not on this machine."""
  if synthetic_imagenet and config.dataset == "imagenet2012":
    dataset = data.get_dataset("imagenet2012", synthetic_imagenet, image_size=config.image_size)
    return dataclasses.replace(dataset, name="imagenet2012 (synthetic JPEGs)")
  if not config.mock_data_examples:
    try:
      return data.get_dataset(config.dataset, config.data_dir, image_size=config.image_size)
    except DataError:
      pass
  return data.get_dataset(config.dataset, mock_examples=config.mock_data_examples or mock_examples,
                          image_size=config.image_size)


def pipeline_rate(train_data: data.TrainBatches, batches: int, threads: int,
                  workers: int = 0) -> float:
  # Warm-up: threads or worker processes started (each worker's first batch
  # includes its interpreter's start), the first epoch's order drawn.
  warmup = max(2, 2 * workers)
  iterator = train_data.iterator(0, batches + warmup, threads=threads, workers=workers)
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  rate = batches * train_data.global_batch_size / (time.perf_counter() - start)
  iterator.close()
  return rate


def device_bytes(train_data: data.TrainBatches) -> dict[str, int]:
  """Bytes one global batch copies to the devices: as the pipeline makes it
  (uint8 images for 8-bit data) and with float32 images (normalised on the host)."""
  shapes = train_data.global_shapes()
  labels = int(np.prod(shapes["label"][0])) * shapes["label"][1].itemsize
  pixels = int(np.prod(shapes["image"][0]))
  return {"batch_bytes": pixels * shapes["image"][1].itemsize + labels,
          "batch_bytes_float32": pixels * 4 + labels}


def step_rates(config, dataset, train_data: data.TrainBatches, repeats: int) -> dict[str, float]:
  model, wmap, _ = train.build(config, dataset)
  optimizer = steps.make_optimizer(config, 1000, train_data.steps_per_epoch)
  fns = steps.make_train_steps(model, optimizer, wmap=wmap, policy=config.motivation.policy,
                               normalisation=(dataset.mean, dataset.std))
  sample = jnp.zeros((1, *dataset.image_shape), jnp.float32)
  state = steps.create_train_state(model, optimizer, jax.random.key(0), sample,
                                   batch_norm_stats=config.model.batch_norm_stats)
  batch = jax.device_put(train_data[0])
  rates = {}
  for kind, fn in fns.items():
    compiled = fn.lower(state, batch).compile()
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(repeats):
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    rates[kind] = repeats * train_data.global_batch_size / (time.perf_counter() - start)
  return rates


def png_decode_us(shape, samples: int = 500) -> float:
  """Microseconds to decode one PNG of ``shape`` with PIL (TFDS's decoder here)."""
  from PIL import Image

  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, shape, dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if shape[-1] == 1 else image).save(buffer, format="PNG")
  encoded = buffer.getvalue()
  start = time.perf_counter()
  for _ in range(samples):
    with Image.open(io.BytesIO(encoded)) as decoded:
      np.asarray(decoded)
  return (time.perf_counter() - start) / samples * 1e6


def measure_workers(name: str, *, variant: str | None, batches: int, mock_examples: int,
                    threads: list[int], workers: list[int], batch_size: int | None = None,
                    synthetic_imagenet: str | None = None) -> dict:
  """Pipeline images/s with each thread count and each worker count, one after
  the other in this process, and the bytes a batch copies to the devices."""
  config = config_lib.load_config_file(os.path.join(ROOT, "configs", f"{name}.py"), variant)
  if batch_size:
    config.batch_size = batch_size
  dataset = load_dataset(config, mock_examples, synthetic_imagenet)
  train_data = data.TrainBatches(dataset, config.batch_size, seed=0, augment=config.augment)
  return {"config": name + (f":{variant}" if variant else ""), "dataset": dataset.name,
          "batch_size": config.batch_size, "image_shape": list(dataset.image_shape),
          "threads_images_per_s": {t: pipeline_rate(train_data, batches, t) for t in threads},
          "workers_images_per_s": {w: pipeline_rate(train_data, batches, 0, w)
                                   for w in workers},
          **device_bytes(train_data), "load_average": os.getloadavg()}


def measure(name: str, *, variant: str | None, batches: int, repeats: int,
            mock_examples: int, batch_size: int | None = None,
            synthetic_imagenet: str | None = None) -> dict:
  config = config_lib.load_config_file(os.path.join(ROOT, "configs", f"{name}.py"), variant)
  if batch_size:
    config.batch_size = batch_size
  dataset = load_dataset(config, mock_examples, synthetic_imagenet)
  train_data = data.TrainBatches(dataset, config.batch_size, seed=0, augment=config.augment)
  pipeline = pipeline_rate(train_data, batches, config.data_threads)
  rates = step_rates(config, dataset, train_data, repeats)
  return {**device_bytes(train_data),
          "config": name + (f":{variant}" if variant else ""), "dataset": dataset.name,
          "preprocessing": dataset.preprocessing if train_data.augment else "plain",
          "batch_size": config.batch_size, "data_threads": config.data_threads,
          "pipeline_images_per_s": pipeline,
          "base_step_images_per_s": rates["base"],
          "motivated_step_images_per_s": rates["motivated"],
          "headroom": pipeline / rates["base"],
          "png_decode_us": png_decode_us(dataset.image_shape)
                           if dataset.preprocessing != "imagenet" else None}


def markdown(rows: list[dict], machine: str) -> str:
  lines = [
      "# Data headroom: input pipeline against the train steps",
      "",
      f"Measured by `benchmarks/data_throughput.py` on {machine}.",
      "Images per second; headroom = pipeline / base step (the faster consumer).",
      "",
      "| config | data | batch | threads | pipeline | base step | motivated step | headroom "
      "| PNG decode (µs/image) |",
      "|---|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(
        f"| {r['config']} | {r['dataset']} | {r['batch_size']} | {r['data_threads']} "
        f"| {r['pipeline_images_per_s']:,.0f} | {r['base_step_images_per_s']:,.0f} "
        f"| {r['motivated_step_images_per_s']:,.0f} | {r['headroom']:,.1f}x "
        f"| {'-' if r['png_decode_us'] is None else format(r['png_decode_us'], '.0f')} |")
  lines += [
      "",
      "Pipeline: host batches at the config's batch size and `data_threads`, with its",
      "augmentation (uint8 images: the steps normalise them). Steps: the compiled train",
      "steps on one device, on a batch already there. Where a data set is not on the",
      "machine (\"mock data\"), TFDS mock data stands in: its images are generated on read",
      "instead of decoded; the last column is what decoding one real PNG of that shape",
      "costs here, for comparison with the pipeline's time per image. In a real run on a",
      "CPU the pipeline's threads and the steps share the cores; on an accelerator they do",
      "not.",
  ]
  return "\n".join(lines) + "\n"


def workers_markdown(rows: list[dict], machine: str) -> str:
  lines = [
      "# Data workers against threads, and uint8 batches",
      "",
      f"Measured by `benchmarks/data_throughput.py --workers` on {machine}.",
      "Images/s of the training pipeline (read, decode, inception crop, resize, flip), in",
      "one process one after the other; the load average is `os.getloadavg()` after each",
      "config.",
      "",
      "| config | data | batch | image | " + " | ".join(
          [f"{t} threads" for t in rows[0]["threads_images_per_s"]]
          + [f"{w} workers" for w in rows[0]["workers_images_per_s"]])
      + " | bytes/batch uint8 | float32 | load average |",
      "|---|---|---:|---|" + "---:|" * (len(rows[0]["threads_images_per_s"])
                                       + len(rows[0]["workers_images_per_s"]) + 3),
  ]
  for r in rows:
    rates = list(r["threads_images_per_s"].values()) + list(r["workers_images_per_s"].values())
    lines.append(
        f"| {r['config']} | {r['dataset']} | {r['batch_size']} "
        f"| {'x'.join(map(str, r['image_shape']))} | "
        + " | ".join(f"{v:,.0f}" for v in rates)
        + f" | {r['batch_bytes']:,} | {r['batch_bytes_float32']:,} "
        f"| {', '.join(f'{v:.2f}' for v in r['load_average'])} |")
  return "\n".join(lines) + "\n"


def describe_machine() -> str:
  devices = jax.devices()
  return (f"{os.cpu_count()} CPU cores ({cpu_model()}, {platform.machine()}), {len(devices)} "
          f"{devices[0].platform.upper()} device(s), jax {jax.__version__}, "
          f"{datetime.date.today().isoformat()}")


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--configs", default=",".join(CONFIGS))
  parser.add_argument("--variant", default=None, help="e.g. smoke")
  parser.add_argument("--batches", type=int, default=50, help="pipeline batches timed")
  parser.add_argument("--repeats", type=int, default=5, help="train steps timed per kind")
  parser.add_argument("--mock-examples", type=int, default=50_000)
  parser.add_argument("--batch-size", type=int, default=None,
                      help="instead of the configs' (ImageNet's 1024 is too big for a CPU)")
  parser.add_argument("--synthetic-imagenet", type=int, default=0,
                      help="> 0: ImageNet configs read this many synthetic JPEGs")
  parser.add_argument("--threads", default=None,
                      help="with --workers: comma-separated thread counts (default: the config's)")
  parser.add_argument("--workers", default=None,
                      help="comma-separated grain worker counts to measure against threads")
  parser.add_argument("--no-steps", action="store_true",
                      help="with --workers: the pipeline only, no train steps")
  parser.add_argument("--out", default=None, help="writes OUT.json and OUT.md")
  args = parser.parse_args(argv)
  rows = []
  with tempfile.TemporaryDirectory() as synthetic:
    if args.synthetic_imagenet:
      write_synthetic_imagenet(synthetic, args.synthetic_imagenet)
    for name in args.configs.split(","):
      if args.workers:
        config = config_lib.load_config_file(os.path.join(ROOT, "configs", f"{name}.py"),
                                             args.variant)
        threads = ([int(t) for t in args.threads.split(",")] if args.threads
                   else [config.data_threads])
        rows.append(measure_workers(
            name, variant=args.variant, batches=args.batches,
            mock_examples=args.mock_examples, threads=threads,
            workers=[int(w) for w in args.workers.split(",")], batch_size=args.batch_size,
            synthetic_imagenet=synthetic if args.synthetic_imagenet else None))
        print(json.dumps(rows[-1]), flush=True)
        if args.no_steps:
          continue
      rows.append(measure(name, variant=args.variant, batches=args.batches,
                          repeats=args.repeats, mock_examples=args.mock_examples,
                          batch_size=args.batch_size,
                          synthetic_imagenet=synthetic if args.synthetic_imagenet else None))
      print(json.dumps(rows[-1]), flush=True)
  machine = describe_machine()
  worker_rows = [r for r in rows if "workers_images_per_s" in r]
  step_rows = [r for r in rows if "workers_images_per_s" not in r]
  text = ((workers_markdown(worker_rows, machine) if worker_rows else "")
          + ("\n" if worker_rows and step_rows else "")
          + (markdown(step_rows, machine) if step_rows else ""))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
      json.dump({"machine": machine, "rows": rows}, f, indent=2)
    with open(args.out + ".md", "w") as f:
      f.write(text)
  print(text)
  return rows


if __name__ == "__main__":
  main()
