"""What a batch holds and what is minimised and reported: the task at the step boundary.

Two tasks (``config.task``), each a small object with no knowledge of nesting:

- ``classification`` (the default): a batch holds ``image`` (NHWC or NC,
  float or uint8 pixels) and ``label`` (int); the model sees the image; the
  loss is the mean softmax cross-entropy (the steps' ``loss_fn``), the metric
  accuracy. Evaluation batches may carry ``mask`` (1 for real examples).
- ``causal_lm``: a batch holds ``tokens`` int [B, L+1]; the model sees
  ``tokens[:, :-1]`` and predicts ``tokens[:, 1:]``; the loss is the
  token-weighted mean next-token cross-entropy over the targets a ``mask``
  [B, L] (optional in training, 1 for a real target) keeps; the metric the
  per-token accuracy. Evaluation sums the nats and counts the targets over
  every held-out batch, so the held-out loss is exact whatever the padding,
  and ``eval_metrics`` turns it into bits per byte (``bytes_per_token`` of the
  held-out text) and perplexity.

Both give the same per-batch evaluation sums (``loss_sum``, ``correct``,
``count``: examples or targets), so the evaluation loop, the controller's
signal (the training ``loss``) and the non-finite rule are one code path.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from motivation_jax.data.text import bits_per_byte
from motivation_jax.errors import ConfigError

Batch = Mapping[str, jax.Array]
TASKS = ("classification", "causal_lm")


class Classification:
  """Images and labels: today's task, bit for bit."""
  name = "classification"
  input_key = "image"

  def inputs(self, batch: Batch) -> jax.Array:
    return batch["image"]

  def loss(self, logits: jax.Array, batch: Batch,
           loss_fn: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
    return loss_fn(logits, batch["label"])

  def accuracy(self, logits: jax.Array, batch: Batch) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, -1) == batch["label"])

  def eval_sums(self, logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    mask = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32)).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"loss_sum": jnp.sum(losses * mask), "correct": jnp.sum(correct * mask),
            "count": jnp.sum(mask)}

  def eval_metrics(self, sums: Mapping[str, float], **_) -> dict[str, float]:
    return {"test_accuracy": float(sums["correct"] / sums["count"]),
            "test_loss": float(sums["loss_sum"] / sums["count"])}


class CausalLM:
  """Next-token prediction over ``tokens`` [B, L+1]."""
  name = "causal_lm"
  input_key = "tokens"

  def inputs(self, batch: Batch) -> jax.Array:
    return batch["tokens"][:, :-1]

  def _per_token(self, logits, batch):
    targets = batch["tokens"][:, 1:]
    mask = batch.get("mask")
    mask = (jnp.ones(targets.shape, jnp.float32) if mask is None
            else mask.astype(jnp.float32))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                             targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return losses, correct, mask

  def loss(self, logits: jax.Array, batch: Batch, loss_fn=None) -> jax.Array:
    """Token-weighted: every target counts once, whatever its row's padding."""
    del loss_fn  # the classification loss; this task's is its own
    losses, _, mask = self._per_token(logits, batch)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)

  def accuracy(self, logits: jax.Array, batch: Batch) -> jax.Array:
    _, correct, mask = self._per_token(logits, batch)
    return jnp.sum(correct * mask) / jnp.maximum(jnp.sum(mask), 1.0)

  def eval_sums(self, logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    losses, correct, mask = self._per_token(logits, batch)
    return {"loss_sum": jnp.sum(losses * mask), "correct": jnp.sum(correct * mask),
            "count": jnp.sum(mask)}

  def eval_metrics(self, sums: Mapping[str, float], *, bytes_per_token: float | None = None
                   ) -> dict[str, float]:
    """Held-out loss (nats per token), per-token accuracy, perplexity (per
    token) and, given the bytes the targets spell per target, bits per byte."""
    loss = float(sums["loss_sum"] / sums["count"])
    out = {"test_accuracy": float(sums["correct"] / sums["count"]), "test_loss": loss,
           "test_perplexity": math.exp(loss) if loss < 700 else math.inf}
    if bytes_per_token is not None:
      out["test_bits_per_byte"] = bits_per_byte(loss, bytes_per_token)
    return out


CLASSIFICATION = Classification()
CAUSAL_LM = CausalLM()
_BY_NAME = {t.name: t for t in (CLASSIFICATION, CAUSAL_LM)}


def get(name: Any) -> Classification | CausalLM:
  """The task ``config.task`` names; a ConfigError for anything else."""
  if name not in _BY_NAME:
    raise ConfigError(f"config.task must be one of {TASKS}, got {name!r}")
  return _BY_NAME[name]


def of_config(config) -> Classification | CausalLM:
  """The task of a config (``classification`` where it names none)."""
  return get(config.get("task", "classification"))
