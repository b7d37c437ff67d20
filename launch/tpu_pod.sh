#!/usr/bin/env bash
# Runs one uvit_jax command on every worker of a Cloud TPU pod slice (the same command on each;
# `jax.distributed.initialize()` finds the other workers through the TPU metadata).
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh setup      # copy the repo, install
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh \
#       python main.py --config configs/imagenet256_uvit_large.py --workdir gs://bucket/l2
#
# The workdir must be shared by all workers (a gs:// bucket; orbax writes checkpoints from every
# process). Data: put the extracted dataset on a bucket or on every worker's disk and pass
# --config.data.latent_dir. Logs of every worker stream back prefixed by gcloud; process 0 alone
# writes metrics, sample grids and the config.
#
# Environment: TPU_NAME, ZONE (required), PROJECT (optional), REMOTE_DIR (default ~/uvit_jax).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to its zone}"
REMOTE_DIR="${REMOTE_DIR:-uvit_jax}"
project_args=()
if [[ -n "${PROJECT:-}" ]]; then project_args=(--project "$PROJECT"); fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${project_args[@]}" \
    --worker=all --command "$1"
}

if [[ "${1:-}" == "setup" ]]; then
  tarball="$(mktemp -d)/uvit_jax.tar.gz"
  tar -C "$repo" --exclude=.git --exclude='workdirs' -czf "$tarball" .
  gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:/tmp/uvit_jax.tar.gz" --zone "$ZONE" \
    "${project_args[@]}" --worker=all
  on_all_workers "mkdir -p ~/$REMOTE_DIR && tar -C ~/$REMOTE_DIR -xzf /tmp/uvit_jax.tar.gz && \
    cd ~/$REMOTE_DIR && pip install -q -U 'jax[tpu]' -e ."
  exit 0
fi

if [[ $# -eq 0 ]]; then
  echo "usage: $0 setup | $0 <command...>   (e.g. python main.py --config ... --workdir gs://...)" >&2
  exit 2
fi

# UVIT_DISTRIBUTED=auto: every worker calls jax.distributed.initialize() with no arguments.
printf -v cmd '%q ' "$@"
on_all_workers "cd ~/$REMOTE_DIR && UVIT_DISTRIBUTED=auto $cmd"
