#!/usr/bin/env bash
# Runs distill_sbs training on every worker of a Cloud TPU VM (single host or pod slice).
#   launch/tpu_vm.sh TPU_NAME ZONE [train flags...]
# e.g.
#   launch/tpu_vm.sh my-tpu us-central2-b --gin_file=paper/base.gin --gin_file=paper/cqa.gin \
#       --gin_file=models/t5_1_1_xxl.gin --gin.METHOD="'dss'" --gin.NUM_PARTITIONS=8 \
#       --gin.FULLY_SHARDED=True --gin.MODEL_DIR="'gs://bucket/run'" \
#       --gin.PRETRAINED_DIR="'gs://bucket/t5-v1_1-xxl'"
# The repository is expected at ~/distill_sbs on each worker (set REPO to change), installed with
# `pip install -e .` and `jax[tpu]`; MODEL_DIR must be shared storage (gs://). Every worker runs
# the same command; jax.distributed initialises itself on a multi-host slice.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,11p' "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; shift 2
REPO=${REPO:-~/distill_sbs}
MODULE=${MODULE:-distill_sbs.train}  # e.g. MODULE=distill_sbs.sweep for `sweep --print_commands`
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
  --command "cd $REPO && python3 -m $MODULE$ARGS"
