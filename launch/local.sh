#!/usr/bin/env bash
# Starts N CPU processes on this machine that form one jax.distributed run: the
# way to test multi-host behaviour (per-process data shares, collective
# checkpoints, the same decision on every process) on a laptop.
#
#   launch/local.sh N [flags of python -m motivation_jax.main...]
#   launch/local.sh 2 --config=configs/default.py --workdir=/tmp/digits_2proc
#
# Process 0 prints to this terminal; process i > 0 writes to LOG_DIR/process_i.log
# (LOG_DIR: a new temporary directory unless set). Every process gets
# JAX_PLATFORMS=cpu and DEVICES_PER_PROCESS CPU devices (default 1), the flags
# given here, and --coordinator_address (a free port on localhost),
# --num_processes and --process_id. The script waits for all of them; if one
# fails, it stops the others and exits with that process's status.
#
# Environment: PYTHON (default: the checkout's .venv/bin/python if there is one,
# else python3), DEVICES_PER_PROCESS, LOG_DIR.
set -euo pipefail

usage() {
  echo "usage: $0 N [python -m motivation_jax.main flags...]" >&2
  exit 2
}
[ $# -ge 1 ] || usage
num_processes=$1
shift
case $num_processes in
  '' | *[!0-9]* | 0) echo "error: N must be an integer >= 1, got '$num_processes'" >&2; usage ;;
esac

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$root/.venv/bin/python" ]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
fi
devices=${DEVICES_PER_PROCESS:-1}
log_dir=${LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/motivation_jax_local.XXXXXX")}
mkdir -p "$log_dir"

# A free port: bound and released at once (another program could take it in
# between; then the run fails to start, and running again picks another).
port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')

# Each process sees only its own CPU devices (a previous device count is dropped).
read -ra inherited <<< "${XLA_FLAGS:-}"
xla_flags=()
for flag in "${inherited[@]}"; do
  case $flag in --xla_force_host_platform_device_count=*) ;; *) xla_flags+=("$flag") ;; esac
done
export XLA_FLAGS="${xla_flags[*]} --xla_force_host_platform_device_count=$devices"
export JAX_PLATFORMS=cpu

pids=()
stop_all() {
  for pid in "${pids[@]}"; do
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi
  done
}
trap 'stop_all; exit 130' INT TERM

if [ "$num_processes" -gt 1 ]; then
  echo "launch/local.sh: $num_processes processes, coordinator localhost:$port; the logs of processes 1 to $((num_processes - 1)) go to $log_dir" >&2
fi
for ((i = 0; i < num_processes; i++)); do
  args=(-m motivation_jax.main "--coordinator_address=localhost:$port"
        "--num_processes=$num_processes" "--process_id=$i" "$@")
  if [ "$i" -eq 0 ]; then
    "$PYTHON" "${args[@]}" &
  else
    "$PYTHON" "${args[@]}" > "$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=("$!")
done

# Wait for all; the first failure stops the rest (they would wait for it in
# their collectives until jax.distributed's heartbeat timeout).
running=$num_processes
while [ "$running" -gt 0 ]; do
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    if [ -z "$pid" ] || kill -0 "$pid" 2>/dev/null; then
      continue
    fi
    status=0
    wait "$pid" || status=$?
    pids[i]=""
    running=$((running - 1))
    if [ "$status" -ne 0 ]; then
      stop_all
      wait 2>/dev/null || true
      if [ "$i" -gt 0 ]; then
        echo "--- the end of process $i's log ($log_dir/process_$i.log):" >&2
        tail -n 20 "$log_dir/process_$i.log" >&2
      fi
      echo "launch/local.sh: process $i of $num_processes failed (exit status $status); stopped the others" >&2
      exit "$status"
    fi
  done
  sleep 0.2
done
