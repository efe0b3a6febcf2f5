#!/usr/bin/env bash
# Here (registries reachable): downloads into .whl/ the wheels that
# benchmarks/device/run.sh installs on a lent GPU machine, for its Python
# (3.12, x86-64; PYTHON_VERSION=3.11 fetches them for a rehearsal here). Each
# package of wheels.txt at the version installed in PYTHON's environment, the
# one the tests ran in (README's: .venv/bin/python).
#   PYTHON=.venv/bin/python bash benchmarks/device/fetch_wheels.sh
# Then name .whl in the device tool's carry (git ignores it).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
DEST=${DEST:-.whl}
mkdir -p "$DEST"
platforms=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
grep -v '^#' benchmarks/device/wheels.txt | while read -r name; do
  [ -n "$name" ] || continue
  version=$("$PYTHON" - "$name" << 'PY'
import importlib.metadata, sys
try:
  print(importlib.metadata.version(sys.argv[1]))
except importlib.metadata.PackageNotFoundError:
  sys.exit(f"fetch_wheels.sh: {sys.argv[1]} is not installed where {sys.executable} looks")
PY
)
  pin="$name==$version"
  if ! "$PYTHON" -m pip download -q --no-deps --only-binary=:all: \
      --python-version "$PYTHON_VERSION" --implementation cp "${platforms[@]}" \
      -d "$DEST" "$pin" 2> /dev/null; then
    # No wheel on the index (promise is a source distribution): build a
    # pure-Python one here. One with compiled code would be built for this
    # machine's Python, not the device's: the check below refuses it.
    "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$pin"
  fi
done
for w in "$DEST"/*.whl; do
  case "$w" in
    *-cp"${PYTHON_VERSION/./}"-*|*-py3-none-any.whl|*-py2.py3-none-any.whl) ;;
    *) echo "fetch_wheels.sh: $w is not for Python $PYTHON_VERSION" >&2; exit 1 ;;
  esac
done
twice=$(for w in "$DEST"/*.whl; do basename "$w" | cut -d- -f1; done | sort | uniq -d)
if [ -n "$twice" ]; then  # pip refuses the whole install then
  echo "fetch_wheels.sh: more than one version of: $twice (empty $DEST and fetch again)" >&2
  exit 1
fi
du -sh "$DEST"
