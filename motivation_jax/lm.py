"""What a causal-LM run (``config.task = "causal_lm"``) needs of the run's modules
(``run_checks``, ``run_setup``, ``run_summary``): its config checks, its text
data and tokenizer, its schedule in steps.

Config keys beside configs/default.py's (the LM configs set them):

- ``tokenizer``: ``"byte"`` or ``"bpe:N"`` (``data.text``); a BPE is trained
  on the training split at the first start, written to ``DIR/tokenizer.json``
  and into every checkpoint, and read back from the workdir on a resume (the
  data position holds only its spec), so a resumed run tokenizes exactly as
  before; export carries it;
- ``num_train_steps``, ``eval_every_steps``, ``checkpoint_every_steps``:
  language-model runs count steps, not epochs (the LM quick start trains a
  third of an epoch of Shakespeare); ``warmup_steps`` (``steps.make_optimizer``);
- ``max_examples``: records read per split of a TFDS text set (``lm1b``);
- ``max_eval_tokens``: None (the held-out split in full, the default) or
  its first N tokens only (the ``:smoke`` variants; bits per byte are then of
  that prefix).

The context and the windows of text are one length, ``config.model.seq_len``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp

from motivation_jax import files, models
from motivation_jax.common import format_flops
from motivation_jax.data import text
from motivation_jax.errors import ConfigError, DataError

TOKENIZER_FILE = "tokenizer.json"
# Keys an LM config has beyond configs/default.py's: name -> (what, test).
_STEPS = ("an integer >= 1", lambda v: isinstance(v, numbers.Integral)
          and not isinstance(v, bool) and v >= 1)
CHECKS = {"num_train_steps": _STEPS, "eval_every_steps": _STEPS,
          "checkpoint_every_steps": _STEPS}
# Keys a resumed LM run may change (resuming.SAFE_TO_CHANGE_ON_RESUME has the rest).
SAFE_TO_CHANGE_ON_RESUME = ("num_train_steps", "eval_every_steps", "checkpoint_every_steps")


def check_config(config) -> None:
  """Refuses, in one line, an LM config that cannot train: a family that is not
  a language model, an image data set, a bad tokenizer or step count."""
  name = config.model.get("name")
  if not config.model.get("module") and name not in models.LANGUAGE_MODELS:
    raise ConfigError(f"config.task='causal_lm' needs a language model, got "
                      f"config.model.name={name!r}: use 'transformer' (or "
                      "config.model.module for your own)")
  if config.dataset not in (*text.TEXT_DATASETS, *text.TFDS_TEXT):
    raise ConfigError(f"config.task='causal_lm' needs a text data set, got "
                      f"config.dataset={config.dataset!r}; known: "
                      f"{', '.join([*text.TEXT_DATASETS, *text.TFDS_TEXT])}")
  if "tokenizer" not in config:
    raise ConfigError("config.tokenizer is missing ('byte' or 'bpe:N'; configs/lm_shakespeare.py)")
  text.parse_tokenizer_spec(config.tokenizer)
  for key, (rule, holds) in CHECKS.items():
    if key not in config:
      raise ConfigError(f"config.{key} is missing (configs/lm_shakespeare.py lists the LM keys)")
    if not holds(config[key]):
      raise ConfigError(f"config.{key} must be {rule}, got {config[key]!r}")
  seq_len = config.model.get("seq_len")
  if not isinstance(seq_len, int) or seq_len < 1:
    raise ConfigError(f"config.model.seq_len (the context and the windows of text) must be an "
                      f"integer >= 1, got {seq_len!r}")
  if config.get("mock_data_examples", 0) and config.dataset not in text.TFDS_TEXT:
    raise ConfigError(f"config.mock_data_examples is for TFDS text sets "
                      f"({', '.join(text.TFDS_TEXT)}); {config.dataset} is read from files on "
                      "this machine")


def check_classification_config(config) -> None:
  """The other way round: an image task with a language model."""
  if config.model.get("name") in models.LANGUAGE_MODELS and not config.model.get("module"):
    raise ConfigError(f"unknown model {config.model.name!r} for images: it is a language "
                      "model; set config.task='causal_lm' and a text data set "
                      "(configs/lm_shakespeare.py)")


@dataclasses.dataclass
class TextData:
  """A tokenized corpus with what ``run_setup`` and ``run_summary`` read of a data set."""
  dataset: text.TextDataset
  seq_len: int
  mock: bool = False  # TFDS mock data (config.mock_data_examples)

  @property
  def name(self) -> str:
    return self.dataset.name + (" (mock data)" if self.mock else "")

  @property
  def num_classes(self) -> int:  # what the model's output ranges over
    return self.dataset.vocab_size

  @property
  def train(self):
    return self.dataset.train

  @property
  def test(self):
    return self.dataset.test

  @property
  def tokenizer(self):
    return self.dataset.tokenizer

  def description(self) -> dict:
    """The checkpoint's ``dataset`` item: what export needs (the tokenizer too)."""
    return {**self.dataset.description(), "task": "causal_lm", "seq_len": self.seq_len,
            "tokenizer_json": self.dataset.tokenizer.to_json()}


def load(config, workdir: str, *, chief: bool = True) -> TextData:
  """The corpus of ``config.dataset``, tokenized by the workdir's tokenizer when a
  run started there before (else by a new one, written there by the chief)."""
  path = files.join(workdir, TOKENIZER_FILE)
  tokenizer = config.tokenizer
  if files.exists(path):
    tokenizer = text.tokenizer_from_json(files.read_text(path))
    if tokenizer.spec != config.tokenizer:
      raise ConfigError(f"{path} holds a {tokenizer.spec} tokenizer but config.tokenizer="
                        f"{config.tokenizer!r}: that changes what the saved model means; use a "
                        "new --workdir")
  load = lambda: text.load_text_dataset(config.dataset, tokenizer=tokenizer,
                                       data_dir=config.get("data_dir"),
                                       max_examples=config.get("max_examples"))
  mock = config.get("mock_data_examples", 0)
  if mock:  # the configs' :smoke variants of a TFDS text set
    import tensorflow_datasets as tfds  # heavy import, only here
    with tfds.testing.mock_data(num_examples=mock):
      dataset = load()
  else:
    dataset = load()
  if chief and not files.exists(path):
    files.write_text(path, dataset.tokenizer.to_json())
  limit = config.get("max_eval_tokens")
  if limit is not None:
    if not isinstance(limit, int) or limit < 2:
      raise ConfigError(f"config.max_eval_tokens must be None (all) or an integer >= 2, "
                        f"got {limit!r}")
    dataset = dataclasses.replace(dataset, test=dataset.test[:limit])
  return TextData(dataset, config.model.seq_len, mock=bool(mock))


def batches(config, data: TextData, *, train_rows, eval_rows):
  """``(TextTrainBatches, TextEvalBatches)`` of a run (one-line errors)."""
  try:
    return (text.TextTrainBatches(data.dataset, config.batch_size, seq_len=data.seq_len,
                                  seed=config.seed, rows=train_rows),
            text.TextEvalBatches(data.dataset, config.eval_batch_size, seq_len=data.seq_len,
                                 rows=eval_rows))
  except DataError as e:
    raise ConfigError(f"config.batch_size / model.seq_len: {e}") from e


def sample(vocab_size: int, seq_len: int, batch: int = 1, seed: int = 0) -> jax.Array:
  """Tokens the model can be initialised (and a user's module checked) on."""
  return jax.random.randint(jax.random.key(seed), (batch, seq_len), 0, vocab_size, jnp.int32)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """When a run evaluates and checkpoints: every ``eval_every`` / ``checkpoint_every``
  periods of ``period`` batches, and at the last batch (``total_steps``).
  Images: a period is an epoch; LMs: ``gcd(eval_every_steps, checkpoint_every_steps)``."""
  total_steps: int
  period: int
  eval_every: int
  checkpoint_every: int
  unit: str  # "epoch" | "batch": what the evaluation lines count


def schedule(config, steps_per_epoch: int) -> Schedule:
  if config.get("task", "classification") != "causal_lm":
    return Schedule(config.get("train_steps") or config.num_epochs * steps_per_epoch,
                    steps_per_epoch,
                    config.eval_every_epochs, config.checkpoint_every_epochs, "epoch")
  period = math.gcd(config.eval_every_steps, config.checkpoint_every_steps)
  return Schedule(config.num_train_steps, period, config.eval_every_steps // period,
                  config.checkpoint_every_steps // period, "batch")


def flops_per_token(flops_per_step: dict[str, float | None], tokens_per_step: int
                    ) -> dict[str, float | None]:
  """Training FLOPs per token of each step kind, from XLA's counts per step
  (None: a kind the run never compiled)."""
  return {k: None if v is None else v / tokens_per_step for k, v in flops_per_step.items()}


SUBNETS = ("base", "motivated")


def summary_fields(run, eval_metrics: dict[str, float]) -> dict:
  """What an LM run's summary adds (``run_summary.summarize``): the held-out numbers of
  both sub-networks, FLOPs per token (XLA's count per step over the tokens of a
  step) and the training throughput (tokens of the steps this process ran, over
  the loop's time outside evaluations; checkpoints are inside it)."""
  tokens_per_step = run.config.batch_size * run.config.model.seq_len
  steps_run = run.total_steps - run.first_step
  train_s = max(run.loop_time_s - run.eval_time_s, 1e-9)
  out = {"task": "causal_lm", "tokenizer": run.dataset.tokenizer.spec,
         "train_tokens": len(run.dataset.train),
         "test_tokens": run.eval_data.num_targets,
         "test_bytes_per_token": run.eval_data.bytes_per_token,
         "seq_len": run.config.model.seq_len,
         "flops_per_token": flops_per_token(run.flops, tokens_per_step),
         "tokens_per_s": steps_run * tokens_per_step / train_s,
         "train_loop_s": run.loop_time_s, "eval_s": run.eval_time_s}
  for subnet in SUBNETS:
    for name in ("test_loss", "test_bits_per_byte", "test_perplexity"):
      key = f"{subnet}/{name}"
      if key in eval_metrics:
        out[key] = eval_metrics[key]
  return out


def summary_table(summary: dict) -> tuple[str, list[tuple[str, str, str]], list[str]]:
  """An LM run's lines of ``run_summary.format_summary``: the header, the rows of the
  two columns, and the throughput line."""
  flops, params = summary["flops_per_step"], summary["params"]
  per_token = summary["flops_per_token"]
  both = lambda f: tuple(f(s) for s in SUBNETS)
  rows = [
      ("held-out bits/byte", *both(lambda s: f"{summary[f'{s}/test_bits_per_byte']:.4f}")),
      ("held-out loss (nats/token)", *both(lambda s: f"{summary[f'{s}/test_loss']:.4f}")),
      ("perplexity (per token)", *both(lambda s: f"{summary[f'{s}/test_perplexity']:.3f}")),
      ("accuracy (per token)", *both(lambda s: f"{summary[f'{s}/test_accuracy']:.4f}")),
      ("parameters", *both(lambda s: f"{params[s]:,}")),
      ("train steps", f"{summary['base_steps']:,}", f"{summary['motivated_steps']:,}"),
      ("training FLOPs per token", *both(lambda s: format_flops(per_token[s]))),
      ("FLOPs per step", *both(lambda s: format_flops(flops[s]))),
  ]
  header = (f"{summary['dataset']} ({summary['tokenizer']}, context {summary['seq_len']}): "
            f"{summary['train_tokens']:,} training tokens, {summary['test_tokens']:,} held-out "
            f"targets ({summary['test_bytes_per_token']:.3f} bytes each)")
  throughput = (f"throughput: {summary['tokens_per_s']:,.0f} tokens/s (the train loop "
                f"without its evaluations, {summary['eval_s']:.1f} s)")
  return header, rows, [throughput]
