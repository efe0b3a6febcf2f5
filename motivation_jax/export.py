"""Deploy one sub-network of a run: ``python -m motivation_jax.export``.

  python -m motivation_jax.export --workdir=DIR --subnet=base --out=OUT

writes, from the latest checkpoint of the run in ``DIR`` (or ``--step``):

- ``OUT/variables/``: an Orbax checkpoint of that sub-network's variables
  alone (``nesting.export``: the base's slices, or the whole motivated tree),
  with the batch-norm statistics that sub-network evaluates with (recalibrated
  at that checkpoint, ``motivation_jax.recalibration``, unless the run turned
  it off);
- ``OUT/model.json``: the standalone architecture (module, class and fields,
  among them the compute ``dtype`` the run trained with; the variables are
  float32 either way), the input shape and the normalisation the model expects;
- for a language model (``config.task = "causal_lm"``) ``OUT/tokenizer.json``
  too, the run's tokenizer (a BPE exactly as trained), and model.json gives the
  vocabulary size and the context instead of an input shape:
  ``python -m motivation_jax.generate --model=OUT`` samples from it.

Loading needs the model's module and flax, not the training code::

  spec = json.load(open("OUT/model.json"))
  model = motivation_jax.models.build_standalone(spec)   # or import spec["module"]
  variables = orbax.checkpoint.StandardCheckpointer().restore("OUT/variables")
  logits = model.apply(variables, (images - mean) / std)

``motivation_jax.models.load_exported(OUT)`` does exactly that. A user's own
module (``config.model.module``) is described by its class and keyword
arguments, with ``api`` "linen" or "nnx" and the pair's ``nesting``; an NNX
one reloads as an instance of the user's class holding the variables. An
export that would not rebuild into that class with exactly these variables is
refused before anything is written.

Export reads a workdir without taking its lease (``motivation_jax.lease``), so
it may run beside the training run; it refuses a checkpoint that run is still
writing, and says so when that run removed the one it was reading (a run keeps
its two newest checkpoints).
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import flags

from motivation_jax import checkpoint, cli, compilation, files, lease, models, nesting, steps
from motivation_jax.common import SUBNETS
from motivation_jax.models import paired as paired_lib
from motivation_jax.errors import CheckpointError, ConfigError

FORMAT = "motivation_jax.standalone/1"
TOKENIZER_FILE = "tokenizer.json"  # generate.TOKENIZER_FILE


def export_run(workdir: str, subnet: str, out: str, *, step: int | None = None) -> dict:
  """Exports ``subnet`` of the run in ``workdir`` to ``out``; returns model.json's content."""
  if subnet not in SUBNETS:
    raise ConfigError(f"--subnet must be 'base' or 'motivated', got {subnet!r}")
  if not workdir:
    raise ConfigError("--workdir is empty; give the training run's --workdir")
  if out and files.is_dir(out) and files.list_dir(out):  # "" is writable_directory's to refuse
    raise ConfigError(f"--out={out} exists and is not empty; pick a new directory")
  # Before the checkpoint is read: a bad --out fails at once, not after the restore.
  files.writable_directory(out, "--out")
  directory = files.join(workdir, "checkpoints")
  if not files.is_dir(directory):
    raise CheckpointError(f"no checkpoints in {directory}; train first with "
                          f"python -m motivation_jax.main --workdir={workdir} ...")
  ckpt = checkpoint.Checkpointer(directory)
  try:
    if step is not None:
      _refuse_a_checkpoint_being_written(workdir, ckpt, step)
    config_dict, dataset, step = ckpt.restore_description(step)
    config = ml_collections.ConfigDict(config_dict)
    language_model = dataset.get("task") == "causal_lm"
    if language_model:  # a text run's checkpoint (lm.TextData.description)
      sample = jnp.zeros((1, dataset["seq_len"]), jnp.int32)
      num_classes = dataset["vocab_size"]
    else:
      sample = jnp.zeros((1, *dataset["image_shape"]), jnp.float32)
      num_classes = dataset["num_classes"]
    # A checkpoint older than config.dtype trained in float32.
    model = models.build_model(config.model, num_classes,
                               dtype=config.get("dtype", "float32"),
                               sample=_check_sample(config, dataset))
    wmap = nesting.weights_map(model, sample, subnet="motivated")
    # The optimizer's state layout (not its schedule) is what the restore needs.
    optimizer = steps.make_optimizer(config, total_steps=1, steps_per_epoch=1)
    abstract = steps.abstract_train_state(model, optimizer, sample,
                                          batch_norm_stats=config.model.batch_norm_stats)
    try:
      state = ckpt.restore(abstract, step)[0]
      eval_stats = ckpt.restore_eval_stats(
          {s: abstract.subnet_stats(s) for s in SUBNETS}, step)
    except CheckpointError as e:
      held = lease.holder(workdir)
      if held is None or files.exists(files.join(directory, str(step))):
        raise
      raise CheckpointError(
          f"the checkpoint at {directory}/{step} was removed while it was read, by the run "
          f"still training in {workdir} ({lease.describe(held)}; it keeps its two newest "
          "checkpoints): export again, or once that run has ended") from e
  finally:
    ckpt.close()
  variables = state.variables(subnet)
  if eval_stats is not None:  # the statistics the run evaluated this sub-network with
    variables = {**variables, "batch_stats": eval_stats[subnet]}
  variables = nesting.export(variables, subnet, wmap)
  if not jax.tree.leaves(variables.get("batch_stats", {})):
    variables.pop("batch_stats", None)
  if language_model:
    spec = {
        "format": FORMAT,
        **models.standalone_spec(model, subnet),
        "subnet": subnet,
        "task": "causal_lm",
        "vocab_size": dataset["vocab_size"],
        "seq_len": dataset["seq_len"],
        "tokenizer": dataset["tokenizer"],
        "params": wmap.num_params(subnet),
        "source": {"workdir": files.resolve(workdir), "step": step,
                   "dataset": dataset["name"], "model": config.model.to_dict()},
    }
    return _write(spec, variables, out, sample, tokenizer=dataset["tokenizer_json"])
  spec = {
      "format": FORMAT,
      **models.standalone_spec(model, subnet),
      "subnet": subnet,
      "input_shape": dataset["image_shape"],
      "num_classes": dataset["num_classes"],
      "preprocess": {"mean": dataset["mean"], "std": dataset["std"],
                     "rule": "(pixels - mean) / std, pixels in 0..255, NHWC"},
      "params": wmap.num_params(subnet),
      "batch_norm": (None if "batch_stats" not in variables else
                     "running averages" if eval_stats is None else
                     f"recalibrated on {config.get('bn_recalibration_batches')} training batches"),
      "source": {"workdir": files.resolve(workdir), "step": step,
                 "dataset": dataset["name"], "model": config.model.to_dict()},
  }
  return _write(spec, variables, out, sample)


def _write(spec: dict, variables, out: str, sample, *, tokenizer: str | None = None) -> dict:
  if "api" in spec:  # a user's own module (or a paired family): it must reload
    paired_lib.check_reloads(spec, variables, sample)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(files.join(files.resolve(out), "variables"), variables)
  checkpointer.wait_until_finished()
  if tokenizer is not None:
    files.write_text(files.join(out, TOKENIZER_FILE), tokenizer)
  files.write_text(files.join(out, "model.json"), json.dumps(spec, indent=2))
  return spec


def _refuse_a_checkpoint_being_written(workdir: str, ckpt: checkpoint.Checkpointer,
                                       step: int) -> None:
  """A ``CheckpointError`` when checkpoint ``step`` is not finished (a
  ``<step>.orbax-checkpoint-tmp*`` folder, or on a bucket a ``<step>`` folder
  without its commit) and a live run holds the workdir: it is writing it now."""
  if step in ckpt.manager.all_steps():
    return
  started = any(re.match(rf"^{step}(\.orbax-checkpoint-tmp|$)", name)
                for name in files.list_dir(ckpt.directory))
  held = lease.holder(workdir) if started else None
  if held is not None:
    raise CheckpointError(
        f"the checkpoint of batch {step} in {ckpt.directory} is being written by the run "
        f"training in {workdir} ({lease.describe(held)}): export it once that save has "
        "finished, or export a finished one (without --step: the newest)")


def _check_sample(config, dataset: dict):
  """The batch ``train`` checked a user's module on (``run_setup._check_sample``)."""
  if not config.model.get("module"):
    return None
  if dataset.get("task") == "causal_lm":
    return jax.random.randint(jax.random.key(config.seed), (8, dataset["seq_len"]), 0,
                              dataset["vocab_size"], jnp.int32)
  return jax.random.normal(jax.random.key(config.seed), (8, *dataset["image_shape"]))


def main() -> None:
  f = flags.FLAGS
  compilation.use_cache(f.compilation_cache_dir, label="--compilation_cache_dir")
  spec = export_run(f.workdir, f.subnet, f.out, step=f.step)
  print(f"exported the {spec['subnet']} model ({spec['params']:,} parameters, batch "
        f"{spec['source']['step']}) to {f.out}")


if __name__ == "__main__":
  # Flags only for the command line: importing export_run defines none.
  flags.DEFINE_string("workdir", None, "The training run's --workdir.")
  flags.DEFINE_enum("subnet", None, list(SUBNETS), "Which sub-network.")
  flags.DEFINE_string("out", None, "New directory for the exported model.")
  flags.DEFINE_integer("step", None, "Checkpoint to export (default: the latest).")
  flags.DEFINE_string("compilation_cache_dir", None, "JAX's persistent compilation cache "
                      "(docs/compilation.md); default: the user's cache directory; '': none.")
  flags.mark_flags_as_required(["workdir", "subnet", "out"])
  cli.run(main)
