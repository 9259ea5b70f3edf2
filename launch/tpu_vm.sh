#!/usr/bin/env bash
# Kept for existing commands (e.g. a sweep's --launcher): runs a module on every worker of a
# Cloud TPU VM through the Python launcher, which also creates, sets up, watches, restarts after
# pre-emption and deletes VMs (python -m distill_sbs.launch.tpu_vm --help):
#   launch/tpu_vm.sh TPU_NAME ZONE [flags...]
# is `python -m distill_sbs.launch.tpu_vm run --name TPU_NAME --zone ZONE --module MODULE -- flags`
# with MODULE from the environment (default distill_sbs.train).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,7p' "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; shift 2
exec python3 -m distill_sbs.launch.tpu_vm run --name "$TPU_NAME" --zone "$ZONE" \
  --module "${MODULE:-distill_sbs.train}" -- "$@"
