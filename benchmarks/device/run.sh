#!/usr/bin/env bash
# On a GPU machine lent through the device tool, from the repo root, with .whl
# carried (benchmarks/device/fetch_wheels.sh makes it):
#   bash benchmarks/device/run.sh [steps] [harness] [-- ARGS for benchmarks.run]
# steps:   item 6 alone (`--accelerator-only`): step times, MFU and memory of
#          ResNet-20 in ResNet-56 and ViT-Ti in ViT-S, float32 and bfloat16;
# harness: items 1-5 (`--skip-accelerator`), the loop and step-cost ratios.
# Both by default, steps first: they are what no CPU run can give. Each stage
# has its own time limit (STEPS_S, HARNESS_S seconds) and writes its files
# after every part it finishes, so a stage cut short keeps what it measured.
# Results and logs go to $OUT (the device tool brings them back, 8 files at
# most: this writes 7), else benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/results}
SITE=${SITE:-/tmp/site}
STEPS_S=${STEPS_S:-240}
HARNESS_S=${HARNESS_S:-200}
stages=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do stages+=("$1"); shift; done
[ $# -gt 0 ] && shift  # the "--"
[ ${#stages[@]} -gt 0 ] || stages=(steps harness)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
    2> /dev/null || echo "no nvidia-smi"
  python3 - << 'PY'
import importlib.metadata as md, platform
import jax
print("python", platform.python_version(), "| devices:", jax.devices())
for name in ("jax", "jaxlib", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint",
             "chex", "tensorstore", "numpy", "tensorflow-datasets", "grain"):
  try:
    print(name, md.version(name))
  except md.PackageNotFoundError:
    print(name, "-")
PY
} 2>&1 | tee "$OUT/device_versions.txt"
status=0
for stage in "${stages[@]}"; do
  case "$stage" in
    steps) flags=(--accelerator-only --out "$OUT/harness_gpu_steps"); limit=$STEPS_S ;;
    harness) flags=(--skip-accelerator --out "$OUT/harness_gpu"); limit=$HARNESS_S ;;
    *) echo "run.sh: unknown stage '$stage' (steps, harness)" >&2; exit 2 ;;
  esac
  echo "== $stage (at most $limit s)"
  timeout "$limit" python3 -m benchmarks.run "${flags[@]}" "$@" \
    > "$OUT/$stage.log" 2>&1 || { s=$?; status=$s; echo "$stage: exit $s" >&2; }
  tail -n 40 "$OUT/$stage.log"
done
exit $status
