"""Text from a language model: ``python -m motivation_jax.generate``.

  python -m motivation_jax.generate --model=EXPORT_DIR --prompt="ROMEO:" \
      --max_new_tokens=200 [--temperature=0.8] [--top_k=40] [--seed=0]

prints the prompt and its continuation, sampled from the exported model with
a key-value cache (``sample``). ``--temperature=0`` is greedy decoding. An
exported language model is ``models.load_exported``'s directory (``model.json``
describing a ``models.transformer.Transformer``, ``variables/``) plus
``tokenizer.json`` (``data.text``'s ``tokenizer.to_json()``); ``load_model``
reads it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from motivation_jax import cli, files, models
from motivation_jax.data import text
from motivation_jax.errors import ConfigError, DataError
from motivation_jax.models import transformer

TOKENIZER_FILE = "tokenizer.json"


def load_model(directory: str):
  """``(model, params, tokenizer)`` of an exported language model."""
  if not files.exists(files.join(directory, "model.json")):
    raise DataError(f"{directory} holds no exported model (no model.json); export one "
                    "with python -m motivation_jax.export")
  model, variables, spec = models.load_exported(directory)
  if not isinstance(model, transformer.Transformer):
    raise ConfigError(f"{directory} holds a {spec['class']}, not a language model "
                      f"({transformer.__name__}.Transformer)")
  path = files.join(directory, TOKENIZER_FILE)
  if not files.exists(path):
    raise DataError(f"{directory} has no {TOKENIZER_FILE}; export the model from a "
                    "language-model run")
  return model, variables["params"], text.tokenizer_from_json(files.read_text(path))


@functools.cache
def _step(model: transformer.Transformer, greedy: bool, top_k: int | None):
  """One compiled program: feed one token per sequence, choose the next."""

  def step(params, cache, tokens_B, key, temperature):
    logits, cache = transformer.decode(model, params, cache, tokens_B[:, None])
    logits_BxV = logits[:, -1]
    if greedy:
      return jnp.argmax(logits_BxV, -1).astype(jnp.int32), cache
    logits_BxV = logits_BxV / temperature
    if top_k is not None:
      kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
      logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(key, logits_BxV).astype(jnp.int32), cache

  return jax.jit(step)


def sample(model: transformer.Transformer, params, prompt, *, max_new_tokens: int,
           seed: int = 0, temperature: float = 1.0, top_k: int | None = None) -> np.ndarray:
  """``prompt`` (int tokens [T] or [B, T], T >= 1) and ``max_new_tokens`` more.

  Greedy for ``temperature == 0``; else from the softmax of logits /
  temperature, over the ``top_k`` most likely tokens if given. Token ``i`` of
  the sequence is drawn with ``fold_in(key(seed), i)``: the same arguments give
  the same text. Tokens are fed one at a time into the key-value cache (the
  prompt too: one compiled program whatever its length); when the cache is
  full (``model.seq_len`` positions) it restarts from the last ``seq_len // 2``
  tokens, so a sequence may be longer than the model's context.
  """
  tokens = np.asarray(prompt, np.int32)
  squeeze = tokens.ndim == 1
  tokens = tokens[None] if squeeze else tokens
  if tokens.ndim != 2 or tokens.shape[1] < 1:
    raise ConfigError(f"the prompt must be int tokens [T] or [B, T] with T >= 1, got shape "
                      f"{np.shape(prompt)}")
  if max_new_tokens < 0 or temperature < 0:
    raise ConfigError(f"max_new_tokens and temperature must be >= 0, got {max_new_tokens} "
                      f"and {temperature}")
  if top_k is not None and not 1 <= top_k <= model.vocab_size:
    raise ConfigError(f"top_k must be in [1, {model.vocab_size}], got {top_k}")
  step = _step(model, temperature == 0, top_k)
  batch, length = tokens.shape
  key = jax.random.key(seed)
  temperature = jnp.float32(max(temperature, 1e-6))
  keep = max(model.seq_len // 2, 1)
  out = np.concatenate([tokens, np.zeros((batch, max_new_tokens), np.int32)], 1)
  cache, index = transformer.init_cache(model, batch), 0
  for i in range(length + max_new_tokens - 1):
    if index == model.seq_len:  # full: start again from the last `keep` tokens
      cache, index = transformer.init_cache(model, batch), 0
      for j in range(i - keep, i):
        _, cache = step(params, cache, jnp.asarray(out[:, j]), key, temperature)
        index += 1
    chosen, cache = step(params, cache, jnp.asarray(out[:, i]), jax.random.fold_in(key, i + 1),
                         temperature)
    index += 1
    if i + 1 >= length:
      out[:, i + 1] = np.asarray(chosen)
  return out[0] if squeeze else out


def generate(directory: str, prompt: str, *, max_new_tokens: int, seed: int = 0,
             temperature: float = 1.0, top_k: int | None = None) -> str:
  """The prompt and its continuation from the exported model in ``directory``."""
  if not prompt:
    raise ConfigError("--prompt is empty; give at least one character")
  model, params, tokenizer = load_model(directory)
  ids = sample(model, params, tokenizer.encode(prompt), max_new_tokens=max_new_tokens,
               seed=seed, temperature=temperature, top_k=top_k)
  return tokenizer.decode(ids)


def main() -> None:
  f = flags.FLAGS
  print(generate(f.model, f.prompt, max_new_tokens=f.max_new_tokens, seed=f.seed,
                 temperature=f.temperature, top_k=f.top_k))


if __name__ == "__main__":
  flags.DEFINE_string("model", None, "Directory of an exported language model.")
  flags.DEFINE_string("prompt", "\n", "Text to continue.")
  flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.")
  flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 is greedy.")
  flags.DEFINE_integer("top_k", None, "Sample from the k most likely tokens only.")
  flags.DEFINE_integer("seed", 0, "Seed of the sampling.")
  flags.mark_flags_as_required(["model"])
  cli.run(main)
