"""Sampling from a language model with the key-value cache, and the command line."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from motivation_jax import generate
from motivation_jax.data import text
from motivation_jax.errors import ConfigError, DataError
from motivation_jax.models import transformer
from motivation_jax.models.transformer import Transformer

from conftest import ROOT, xla_flags

MODEL = Transformer(vocab_size=256, d_model=16, num_heads=2, head_dim=8, ffn_dim=32,
                    num_layers=2, seq_len=8)


@pytest.fixture(scope="module")
def params():
  params = MODEL.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  # Larger weights than init's: logits far from uniform, so greedy and sampled differ.
  return jax.tree.map(lambda x: x * 8, params)


def _greedy_by_full_forward(params, prompt, n):
  """Greedy decoding without a cache: the full forward on the whole sequence."""
  forward = jax.jit(lambda p, t: MODEL.apply({"params": p}, t))
  tokens = list(prompt)
  for _ in range(n):
    tokens.append(int(jnp.argmax(forward(params, jnp.asarray([tokens]))[0, -1])))
  return np.asarray(tokens)


def test_greedy_sampling_with_the_cache_is_greedy_decoding(params):
  prompt = [72, 101, 108]
  got = generate.sample(MODEL, params, prompt, max_new_tokens=5, temperature=0)
  assert got.shape == (8,) and got.dtype == np.int32
  np.testing.assert_array_equal(got, _greedy_by_full_forward(params, prompt, 5))
  # top_k=1 is greedy too, whatever the temperature.
  np.testing.assert_array_equal(
      generate.sample(MODEL, params, prompt, max_new_tokens=5, top_k=1, seed=9), got)


def test_sampling_is_seeded(params):
  prompt = np.asarray([[1, 2], [3, 4]])  # a batch of two prompts
  a = generate.sample(MODEL, params, prompt, max_new_tokens=6, seed=1)
  np.testing.assert_array_equal(a, generate.sample(MODEL, params, prompt, max_new_tokens=6,
                                                   seed=1))
  assert a.shape == (2, 8)
  np.testing.assert_array_equal(a[:, :2], prompt)
  assert not np.array_equal(a, generate.sample(MODEL, params, prompt, max_new_tokens=6,
                                               seed=2))
  greedy = generate.sample(MODEL, params, prompt, max_new_tokens=6, temperature=0)
  assert not np.array_equal(a, greedy)


def test_top_k_only_picks_among_the_k_most_likely(params):
  prompt = [5]
  logits = MODEL.apply({"params": params}, jnp.asarray([prompt]))[0, -1]
  top3 = set(np.argsort(np.asarray(logits))[-3:].tolist())
  firsts = {int(generate.sample(MODEL, params, prompt, max_new_tokens=1, top_k=3,
                                temperature=5.0, seed=s)[-1]) for s in range(12)}
  assert firsts <= top3 and len(firsts) > 1


def test_a_sequence_longer_than_the_context_restarts_the_cache(params):
  # seq_len 8: the cache fills and restarts from the last 4 tokens, twice here.
  got = generate.sample(MODEL, params, [1, 2, 3], max_new_tokens=14, temperature=0)
  assert got.shape == (17,)
  # Up to the first restart (8 tokens in the cache) it is plain greedy decoding.
  np.testing.assert_array_equal(got[:9], _greedy_by_full_forward(params, [1, 2, 3], 6))
  # The token after the restart is greedy on the last 4 tokens of context.
  forward = MODEL.apply({"params": params}, jnp.asarray([got[5:9]]))
  assert got[9] == int(jnp.argmax(forward[0, -1]))


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": -1}, "max_new_tokens and temperature"),
    ({"max_new_tokens": 2, "temperature": -1.0}, "max_new_tokens and temperature"),
    ({"max_new_tokens": 2, "top_k": 0}, "top_k must be in"),
])
def test_bad_sampling_arguments_are_config_errors(params, kwargs, match):
  with pytest.raises(ConfigError, match=match):
    generate.sample(MODEL, params, [1], **kwargs)
  with pytest.raises(ConfigError, match="the prompt must be"):
    generate.sample(MODEL, params, [], max_new_tokens=1)


def write_lm_export(directory, model, params, tokenizer):
  """The layout ``generate.load_model`` reads (what the LM export is to write)."""
  os.makedirs(directory)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, "variables"), {"params": params})
  checkpointer.wait_until_finished()
  with open(os.path.join(directory, "model.json"), "w") as f:
    json.dump(transformer.describe(model), f)
  with open(os.path.join(directory, generate.TOKENIZER_FILE), "w") as f:
    f.write(tokenizer.to_json())


@pytest.fixture(scope="module")
def export_dir(params, tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("lm") / "export")
  write_lm_export(directory, MODEL, params, text.ByteTokenizer())
  return directory


def test_generate_continues_the_prompt_of_an_exported_model(export_dir, params):
  out = generate.generate(export_dir, "Hi", max_new_tokens=4, temperature=0)
  expected = _greedy_by_full_forward(params, list(b"Hi"), 4)
  assert out == text.ByteTokenizer().decode(expected)
  with pytest.raises(ConfigError, match="--prompt is empty"):
    generate.generate(export_dir, "", max_new_tokens=4)


def test_an_export_without_a_tokenizer_is_refused(export_dir, tmp_path):
  broken = str(tmp_path / "broken")
  write_lm_export(broken, MODEL, generate.load_model(export_dir)[1], text.ByteTokenizer())
  os.remove(os.path.join(broken, generate.TOKENIZER_FILE))
  with pytest.raises(DataError, match="has no tokenizer.json"):
    generate.load_model(broken)


@pytest.mark.slow  # a fresh interpreter: JAX's start-up and a compile, ~15 s here
def test_the_command_line_prints_the_continuation(export_dir):
  env = {**os.environ, "XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu"}
  done = subprocess.run(
      [sys.executable, "-m", "motivation_jax.generate", f"--model={export_dir}",
       "--prompt=Hi", "--max_new_tokens=4", "--temperature=0"],
      capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert done.returncode == 0, done.stderr
  assert done.stdout.startswith("Hi") and len(done.stdout) >= 3
  done = subprocess.run([sys.executable, "-m", "motivation_jax.generate",
                         f"--model={export_dir}/nothing", "--prompt=Hi"],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "no model.json" in \
      done.stderr
