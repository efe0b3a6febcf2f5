"""The ``transformer`` family (``config.model.name = "transformer"``): two
configurations of the plain ``models.transformer.Transformer``, paired by the
bring-your-own-model adapter (``models/paired.py``), which checks, when the
model is built, that the base is exactly a sub-network (gap 0 on a sample of
tokens) and slices the leading part of every parameter for the base's
forward: nothing is masked.

What nests, and so what ``config.model.base`` / ``.motivated`` take
(``NESTED``): ``num_heads`` (at a fixed ``head_dim``), ``ffn_dim`` and
``num_layers`` (pre-norm blocks). Everything else is shared and set once on
``config.model`` (``SHARED``): ``d_model`` above all, which does not nest
(LayerNorm and RMSNorm take their statistics over all D features, so extra
features change how the base's are normalised; tests/test_transformer.py).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from motivation_jax.errors import ConfigError
from motivation_jax.models import paired as paired_lib
from motivation_jax.models.transformer import Transformer

NESTED = ("num_heads", "ffn_dim", "num_layers")
SHARED = ("d_model", "head_dim", "seq_len", "positions", "norm", "tie_embeddings",
          "dropout_rate", "rope_base")
# Tokens of the nesting check's sample: its length does not change what nests
# (causal attention, positions by index), and a short one keeps a large
# model's check cheap.
SAMPLE_SHAPE = (2, 16)


def sample_tokens(vocab_size: int, seq_len: int, batch: int = SAMPLE_SHAPE[0],
                  seed: int = 0) -> np.ndarray:
  """Random tokens [batch, min(seq_len, 16)] (the nesting check's input), drawn
  in NumPy: ``jax.random`` on the host compiled three programs in every run."""
  return np.random.default_rng(seed).integers(
      0, vocab_size, (batch, min(seq_len, SAMPLE_SHAPE[1])), dtype=np.int32)


def from_config(base, motivated, num_classes, *, d_model: int | None = None,
                head_dim: int | None = None, seq_len: int | None = None,
                positions: str = "rotary", norm: str = "layernorm",
                tie_embeddings: bool = True, dropout_rate: float = 0.0,
                rope_base: float = 10_000.0, dtype: str = "float32") -> paired_lib.Paired:
  """The nested pair; ``num_classes`` is the vocabulary size."""
  for key, value in (("d_model", d_model), ("head_dim", head_dim), ("seq_len", seq_len)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ConfigError(f"config.model.{key} must be an integer >= 1 (shared by both "
                        f"sub-networks), got {value!r}")
  configs = {}
  for subnet, kwargs in (("base", base), ("motivated", motivated)):
    kwargs = dict(kwargs)
    for key in kwargs:
      if key in SHARED or key == "vocab_size":
        raise ConfigError(
            f"config.model.{subnet}.{key}: {key} is shared by both sub-networks; set "
            f"config.model.{key}" + (" (d_model does not nest: LayerNorm's statistics run "
                                     "over all features)" if key == "d_model" else "")
            if key != "vocab_size" else
            f"config.model.{subnet}.vocab_size: the vocabulary is the tokenizer's "
            "(config.tokenizer)")
      if key not in NESTED:
        raise ConfigError(f"config.model.{subnet}: {key!r} is not a key of the transformer "
                          f"family's sub-networks (known: {', '.join(NESTED)})")
    missing = [k for k in NESTED if k not in kwargs]
    if missing:
      raise ConfigError(f"config.model.{subnet} needs {', '.join(missing)}")
    configs[subnet] = kwargs
  shared = dict(vocab_size=num_classes, d_model=d_model, head_dim=head_dim, seq_len=seq_len,
                positions=positions, norm=norm, tie_embeddings=tie_embeddings,
                dropout_rate=dropout_rate, rope_base=rope_base, dtype=jnp.float32)
  try:
    base_model = Transformer(**shared, **configs["base"])
    motivated_model = Transformer(**shared, **configs["motivated"])
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.model: {e}") from e
  # Checked in float32: nesting is the architecture's, and bfloat16's rounding
  # of sums taken in another order (the zeroed extension) is not a gap.
  pair = paired_lib.paired(base_model, motivated_model, sample_tokens(num_classes, seq_len))
  if jnp.dtype(dtype) != jnp.float32:
    pair.base, pair.motivated = (m.clone(dtype=jnp.dtype(dtype))
                                 for m in (pair.base, pair.motivated))
    pair.specs = {s: paired_lib.linen_spec(pair.standalone(s)) for s in ("base", "motivated")}
  return pair
