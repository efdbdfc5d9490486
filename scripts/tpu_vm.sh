#!/usr/bin/env bash
# Create a Cloud TPU VM (or pod slice), install blockft_jax on every worker, and run a search.
#
#   scripts/tpu_vm.sh create   NAME ZONE ACCELERATOR [--spot]   e.g. my-tpu us-central2-b v4-32
#   scripts/tpu_vm.sh install  NAME ZONE                        copy this checkout, pip install
#   scripts/tpu_vm.sh run      NAME ZONE CONFIG WORKDIR [ARGS]  same command on every worker
#   scripts/tpu_vm.sh delete   NAME ZONE
#
# WORKDIR should be a path every worker can write the same way (e.g. a gcsfuse mount or a path
# on worker 0 only: results are written by process 0). A preempted spot VM resumes where it
# stopped when `run` is repeated with the same WORKDIR.
set -euo pipefail
cmd=${1:?usage: see the header of this script}; name=${2:?TPU name}; zone=${3:?zone}
shift 3 || true
runtime=${TPU_RUNTIME:-tpu-ubuntu2204-base}
ssh_all() { gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"; }

case "$cmd" in
  create)
    accel=${1:?accelerator type, e.g. v4-8}; shift
    gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$accel" \
      --version "$runtime" "$@" ;;
  install)
    root=$(cd "$(dirname "$0")/.." && pwd)
    tar -C "$root" --exclude .venv --exclude runs --exclude .git -czf /tmp/blockft_jax.tgz .
    gcloud compute tpus tpu-vm scp /tmp/blockft_jax.tgz "$name":~/ --zone "$zone" --worker=all
    ssh_all "mkdir -p ~/blockft_jax && tar -xzf ~/blockft_jax.tgz -C ~/blockft_jax && \
      cd ~/blockft_jax && python3 -m pip install -U pip && python3 -m pip install -e '.[tpu]'" ;;
  run)
    config=${1:?config file}; workdir=${2:?workdir}; shift 2
    ssh_all "cd ~/blockft_jax && python3 -m blockft_jax.main --config $config \
      --workdir $workdir --distributed $*" ;;
  delete)
    gcloud compute tpus tpu-vm delete "$name" --zone "$zone" --quiet ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
