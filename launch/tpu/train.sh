#!/usr/bin/env bash
# TPU pod training: run the same jfl-train command on every worker of a TPU VM slice.
# jax.distributed.initialize() (jfl-train --distributed) discovers the workers from the TPU
# metadata. The repository and its virtualenv must exist at REPO_DIR (default ~/jfl) on every
# worker (clone and `pip install -e .` there with the same `gcloud ... ssh --worker=all --command`);
# WORKDIR must be a bucket or filesystem every worker can reach (gs://... works with Orbax).
#
#   TPU=my-v5p-64 ZONE=us-east5-a launch/tpu/train.sh configs/stage2_pretrain.py gs://bucket/runs/stage2 \
#       --config.init_from=gs://bucket/ckpt/janusflow_1_3b --config.mesh.fsdp=-1
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
config=${1:?usage: TPU=... ZONE=... $0 CONFIG WORKDIR [--config.x=y ...]}
workdir=${2:?usage: TPU=... ZONE=... $0 CONFIG WORKDIR [--config.x=y ...]}
shift 2
repo=${REPO_DIR:-\$HOME/jfl}
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd $repo && . .venv/bin/activate && python -m jfl.cli.train --distributed --config $config --workdir $workdir$args"
