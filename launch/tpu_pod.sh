#!/bin/bash
# Runs the same spatial_jax command on every worker of a Cloud TPU pod (a TPU VM slice).
#
#   launch/tpu_pod.sh my-v5p-64 us-east5-a configs/reward_qwen25vl_7b.py /mnt/gcs/reward \
#       --config.model.pretrained=/mnt/gcs/Qwen2.5-VL-7B-Instruct --config.data.pairs=/mnt/gcs/pairs
#   launch/tpu_pod.sh --dry-run my-v5p-64 us-east5-a configs/reward_synthetic.py:smoke /mnt/gcs/r
#   # The paper's GRPO on a v5p-64 slice (8 hosts x 4 chips: FSDP within a host):
#   launch/tpu_pod.sh my-v5p-64 us-east5-a configs/grpo_flux_dev.py:nodes=8,chips=4 /mnt/gcs/grpo \
#       --config.model.pipeline=/mnt/gcs/FLUX.1-dev --config.reward.spatial_score=/mnt/gcs/ss \
#       --config.data.prompts=/mnt/gcs/spatial_prompts.txt
#
# Every worker runs `python -m spatial_jax.main --config CONFIG --workdir WORKDIR` at once, with
# SPATIAL_JAX_DISTRIBUTED=1 so that main.py calls jax.distributed.initialize(), which finds the
# pod's coordinator and this worker's rank by itself on TPU VMs. The repository (and its venv)
# must already be at the same path on every worker (REMOTE_ROOT, default ~/spatial_jax), e.g.
#   gcloud compute tpus tpu-vm scp --recurse . my-v5p-64:spatial_jax --zone us-east5-a --worker=all
# The repository's venv must be made on the workers (jax[tpu]; a venv from another machine has
# its jax and interpreter paths). The workdir must be one folder every worker sees at the same
# path: a bucket mounted with gcsfuse (or a Filestore share). gs:// URLs are refused: the jobs
# write their pairs, jsons and plots with plain file APIs (only the checkpoints speak gs://).
#
# Environment: PROJECT (gcloud project, default: gcloud's), REMOTE_ROOT, REMOTE_PYTHON (default
# REMOTE_ROOT/.venv/bin/python), DISTRIBUTED=0 for a single-host slice.

set -euo pipefail

usage() {
  echo "usage: launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE CONFIG[:ARG] WORKDIR [--config.FIELD=VALUE ...]" >&2
  exit 2
}
die() {
  echo "tpu_pod.sh: error: $*" >&2
  exit 1
}

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && usage
[[ $# -ge 4 ]] || usage
TPU=$1
ZONE=$2
CONFIG=$3
WORKDIR=$4
shift 4

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONFIG_FILE=${CONFIG%%:*}
[[ -f "$ROOT/$CONFIG_FILE" ]] || die "config file $CONFIG_FILE not found in $ROOT (give it relative to the repository root)."
if [[ "$WORKDIR" == gs://* ]]; then
  die "WORKDIR $WORKDIR: gs:// URLs are not supported (pairs, jsons and plots use plain file APIs); mount the bucket with gcsfuse at the same path on every worker and pass that path."
fi

REMOTE_ROOT=${REMOTE_ROOT:-'~/spatial_jax'}
REMOTE_PYTHON=${REMOTE_PYTHON:-"$REMOTE_ROOT/.venv/bin/python"}
DISTRIBUTED=${DISTRIBUTED:-1}
ARGS=$(printf ' %q' --config "$CONFIG" --workdir "$WORKDIR" "$@")
COMMAND="cd $REMOTE_ROOT && SPATIAL_JAX_DISTRIBUTED=$DISTRIBUTED $REMOTE_PYTHON -m spatial_jax.main$ARGS"
GCLOUD=(gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$COMMAND")
[[ -n "${PROJECT:-}" ]] && GCLOUD+=(--project "$PROJECT")

if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "${GCLOUD[@]}"
  echo
  exit 0
fi
command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk)."
gcloud compute tpus tpu-vm describe "$TPU" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} >/dev/null ||
  die "TPU VM $TPU not found in zone $ZONE${PROJECT:+ (project $PROJECT)}."
echo "tpu_pod.sh: on every worker of $TPU: $COMMAND"
exec "${GCLOUD[@]}"
