#!/usr/bin/env bash
# Start N local CPU processes that train together through jax.distributed (for testing multi-host
# code paths on one machine). Every process runs the same jfl-train command; process 0 logs.
#
#   launch/local.sh 2 --config configs/train_tiny.py --workdir /tmp/jfl_local --config.train.num_steps=5
#
# Environment: DEVICES_PER_PROCESS (default 1) simulated CPU devices per process; PORT (default: a
# free port) for the coordinator at 127.0.0.1.
set -euo pipefail
if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NUM_PROCESSES jfl-train-args..." >&2
  exit 2
fi
n=$1; shift
port=${PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
root=$(cd "$(dirname "$0")/.." && pwd)
pids=()
for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1}" \
  JAX_COORDINATOR_ADDRESS="127.0.0.1:${port}" JAX_NUM_PROCESSES="$n" JAX_PROCESS_ID="$i" \
  PYTHONPATH="${root}${PYTHONPATH:+:$PYTHONPATH}" \
    python -m jfl.cli.train --distributed "$@" 2>&1 | sed -u "s/^/[p$i] /" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit $status
