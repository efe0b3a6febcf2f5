"""The summary's FLOPs are those of all devices, whatever their number.

XLA's cost analysis of a partitioned program counts one device's share; with
4 devices it reported about a quarter of the one-device count.
"""

import json
import os
import subprocess
import sys

from conftest import ROOT, xla_flags

SCRIPT = """
import json, sys, tempfile
sys.path.insert(0, "tests")
from test_train import small_config
from motivation_jax import train
import jax
config = small_config(num_epochs=1)
config.batch_size = 64
run, _ = train.setup(config, tempfile.mkdtemp())
print(json.dumps({"devices": jax.device_count(), "flops": run.flops}))
"""


def _flops(devices: int) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": xla_flags(devices)}
  out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["devices"] == devices
  return result["flops"]


def test_flops_per_step_count_every_device():
  one, four = _flops(1), _flops(4)
  for kind in ("base", "motivated"):
    # The same arithmetic on the batch; the replicated optimizer update runs on
    # every device, so the total grows a little with the device count.
    assert one[kind] <= four[kind] <= 1.3 * one[kind], (kind, one, four)
