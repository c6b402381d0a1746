#!/usr/bin/env bash
# Start the Ray head on this node, token authentication on (Ray's default), resources from the node.
#   cluster/start_head.sh [--port 6379] [--dashboard-port 8265] [--block] [other `ray start` options]
# Workers join with cluster/start_worker.sh HEAD_IP:PORT after copying ~/.ray/auth_token from the head.
set -euo pipefail
PORT=6379; DASH=8265; BLOCK=(); EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --port) PORT=$2; shift 2 ;;
    --dashboard-port) DASH=$2; shift 2 ;;
    --block) BLOCK=(--block); shift ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
exec ray start --head --port "$PORT" --dashboard-host 127.0.0.1 --dashboard-port "$DASH" --include-dashboard true "${BLOCK[@]}" "${EXTRA[@]}"
