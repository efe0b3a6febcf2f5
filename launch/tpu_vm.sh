#!/usr/bin/env bash
# A run on a Cloud TPU VM (a single host or a multi-host pod slice): creates the
# TPU (or reuses it), installs this checkout with the [tpu] extra on every
# worker, and runs python -m motivation_jax.main on all workers at once; JAX
# finds the other workers itself (jax.distributed's Cloud TPU detection).
#
#   ZONE=us-central2-b ACCELERATOR_TYPE=v4-16 RUNTIME_VERSION=tpu-ubuntu2204-base \
#   WORKDIR_ROOT=gs://my-bucket/runs \
#     launch/tpu_vm.sh my-tpu imagenet_resnet --config=configs/imagenet_resnet.py
#
# Arguments: the TPU's name, the run's name (its workdir is WORKDIR_ROOT/RUN), and
# main's flags. Running the same command again (after a preemption, say)
# recreates a TPU that is gone, preempted or failed, and the run resumes from
# its last checkpoint in the workdir.
#
# Environment: ZONE, ACCELERATOR_TYPE and RUNTIME_VERSION (required); PROJECT
# (default: gcloud's); QUEUED=1 to ask through a queued resource (waits for
# capacity), SPOT=1 for spot capacity. The workdir must be shared: every
# worker writes its part of a checkpoint. WORKDIR_ROOT, a Cloud Storage URL
# (gs://bucket/prefix; the TPU VM's service account needs write access) under
# which the run's workdir is; or NFS_SHARE, an NFS export (Filestore:
# IP:/share) that every worker mounts at /mnt/shared for the workdir. With
# neither, the workdir is the workers' local disk, which is right only for a
# single-host TPU and lost with the VM.
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: ZONE=... ACCELERATOR_TYPE=... RUNTIME_VERSION=... $0 TPU_NAME RUN_NAME [main flags...]" >&2
  exit 2
fi
tpu=$1
run=$2
shift 2
case $run in
  '' | *[!A-Za-z0-9._-]*) echo "error: RUN_NAME must be letters, digits, '.', '_' or '-', got '$run'" >&2; exit 2 ;;
esac
: "${ZONE:?set ZONE, e.g. us-central2-b}"
: "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE, e.g. v4-16}"
: "${RUNTIME_VERSION:?set RUNTIME_VERSION, e.g. tpu-ubuntu2204-base}"
gcloud_args=(--zone="$ZONE")
if [ -n "${PROJECT:-}" ]; then gcloud_args+=(--project="$PROJECT"); fi
spot_args=()
if [ "${SPOT:-0}" = 1 ]; then spot_args=(--spot); fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

tpu_state() {
  gcloud compute tpus tpu-vm describe "$tpu" "${gcloud_args[@]}" --format='value(state)' 2>/dev/null || true
}

queued_state() {
  gcloud compute tpus queued-resources describe "$tpu" "${gcloud_args[@]}" \
    --format='value(state.state)' 2>/dev/null || true
}

create_tpu() {
  if [ "${QUEUED:-0}" = 1 ]; then
    case $(queued_state) in
      ACTIVE) return ;;
      ACCEPTED | PROVISIONING | WAITING_FOR_RESOURCES | CREATING) ;;
      "") gcloud compute tpus queued-resources create "$tpu" --node-id="$tpu" \
            --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" \
            "${spot_args[@]}" "${gcloud_args[@]}" ;;
      *) # FAILED, SUSPENDED (preempted), ...: start afresh
         gcloud compute tpus queued-resources delete "$tpu" --force --quiet "${gcloud_args[@]}"
         gcloud compute tpus queued-resources create "$tpu" --node-id="$tpu" \
           --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" \
           "${spot_args[@]}" "${gcloud_args[@]}" ;;
    esac
    echo "waiting for queued resource $tpu to become ACTIVE..." >&2
    until [ "$(queued_state)" = ACTIVE ]; do
      case $(queued_state) in
        FAILED | SUSPENDED) echo "error: queued resource $tpu is $(queued_state)" >&2; exit 1 ;;
      esac
      sleep 30
    done
  else
    case $(tpu_state) in
      READY) return ;;
      "") ;;
      *) # PREEMPTED, TERMINATED, ...: start afresh
         gcloud compute tpus tpu-vm delete "$tpu" --quiet "${gcloud_args[@]}" ;;
    esac
    gcloud compute tpus tpu-vm create "$tpu" --accelerator-type="$ACCELERATOR_TYPE" \
      --version="$RUNTIME_VERSION" "${spot_args[@]}" "${gcloud_args[@]}"
  fi
}

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${gcloud_args[@]}" --command="$1"
}

create_tpu

# This checkout's tracked and new files (not .venv or outputs), on every worker.
archive=$(mktemp "${TMPDIR:-/tmp}/motivation_jax.XXXXXX.tar.gz")
trap 'rm -f "$archive"' EXIT
(cd "$root" && git ls-files -z --cached --others --exclude-standard \
  | tar -czf "$archive" --null -T -)
gcloud compute tpus tpu-vm scp "$archive" "$tpu":motivation_jax.tar.gz --worker=all "${gcloud_args[@]}"
on_all_workers "set -e; rm -rf ~/motivation_jax && mkdir ~/motivation_jax \
  && tar -xzf ~/motivation_jax.tar.gz -C ~/motivation_jax \
  && (test -x ~/venv/bin/python || python3 -m venv ~/venv) \
  && ~/venv/bin/pip install -q -e ~/motivation_jax'[tpu]'"

# Without a share: the worker's own home (\$HOME expands there), kept across installs.
workdir="\$HOME/motivation_jax_runs/$run"
if [ -n "${WORKDIR_ROOT:-}" ]; then
  workdir=${WORKDIR_ROOT%/}/$run
elif [ -n "${NFS_SHARE:-}" ]; then
  on_all_workers "set -e; sudo mkdir -p /mnt/shared; mountpoint -q /mnt/shared \
    || { (command -v mount.nfs >/dev/null || sudo apt-get install -y -qq nfs-common) \
         && sudo mount -t nfs -o rw,hard $(printf '%q' "$NFS_SHARE") /mnt/shared; }; \
    sudo chmod a+rwx /mnt/shared"
  workdir=/mnt/shared/$run
fi

# The same command on every worker; each is one process of the run. Arguments
# are quoted for the remote shell.
command="cd ~/motivation_jax && ~/venv/bin/python -m motivation_jax.main --workdir=$workdir"
for arg in "$@"; do
  command+=" $(printf '%q' "$arg")"
done
on_all_workers "$command"
