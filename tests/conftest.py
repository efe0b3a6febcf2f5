"""Shared test fixtures: small nested models and batches."""

import importlib.util
import os

# Before JAX starts: deterministic CPU runs with several devices for sharding tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from motivation_jax.models import NestedCNN, NestedMLP  # noqa: E402


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_default_config():
  """``configs/default.py``'s ``get_config()`` (configs/ is not a package)."""
  spec = importlib.util.spec_from_file_location("default",
                                                os.path.join(ROOT, "configs", "default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def apply(model, variables, x, **kwargs):
  """``model.apply`` compiled as one program (eager op-by-op dispatch is slow on CPU)."""
  return jax.jit(lambda v, x: model.apply(v, x, **kwargs))(variables, x)


def make_batch(n: int = 16, hw: int = 8, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {"image": jnp.asarray(rng.normal(size=(n, hw, hw, 1)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, 10, size=(n,)), jnp.int32)}


MODELS = {
    "mlp": lambda: NestedMLP(base_widths=(16, 24), motivated_widths=(32, 48, 40),
                             num_classes=10),
    "cnn": lambda: NestedCNN(base_widths=(4, 8), base_depths=(1, 1),
                             motivated_widths=(8, 16), motivated_depths=(2, 3),
                             num_classes=10),
}


@pytest.fixture(params=sorted(MODELS))
def model_name(request):
  return request.param


@pytest.fixture
def model(model_name):
  return MODELS[model_name]()


@pytest.fixture
def batch():
  return make_batch()
