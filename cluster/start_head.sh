#!/usr/bin/env bash
# Start the Ray head on this node with token authentication explicitly on and the dashboard (job
# submission API) on 127.0.0.1 unless --dashboard-host asks otherwise.
#   cluster/start_head.sh [--port 6379] [--dashboard-port 8265] [--dashboard-host 127.0.0.1] [--block] [other `ray start` options]
# Workers join with cluster/start_worker.sh HEAD_IP:PORT after copying ~/.ray/auth_token from the head.
set -euo pipefail
PORT=6379; DASH=8265; DASH_HOST=127.0.0.1; BLOCK=(); EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --port) PORT=$2; shift 2 ;;
    --dashboard-port) DASH=$2; shift 2 ;;
    --dashboard-host) DASH_HOST=$2; shift 2 ;;
    --block) BLOCK=(--block); shift ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
if [ -n "${RAY_AUTH_MODE:-}" ] && [ "$RAY_AUTH_MODE" != token ]; then
  echo "start_head: RAY_AUTH_MODE=$RAY_AUTH_MODE; this launcher keeps Ray's token authentication on (unset it)" >&2
  exit 2
fi
export RAY_AUTH_MODE=token  # explicit: Ray's default has changed between releases
export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
# With the mode explicit, `ray start` no longer makes a token: make one (~/.ray/auth_token) when there is none.
if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
  ray get-auth-token --generate > /dev/null
  chmod 600 "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
fi
exec ray start --head --port "$PORT" --dashboard-host "$DASH_HOST" --dashboard-port "$DASH" --include-dashboard true \
  "${BLOCK[@]}" "${EXTRA[@]}"
