#!/usr/bin/env bash
# Join a worker node to the head: cluster/start_worker.sh HEAD_IP:PORT [other `ray start` options]
# The head's token must be on this node first (scp head:~/.ray/auth_token ~/.ray/auth_token, or RAY_AUTH_TOKEN).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: cluster/start_worker.sh HEAD_IP:PORT" >&2; exit 2; }
[ -f "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ] || [ -n "${RAY_AUTH_TOKEN:-}" ] || {
  echo "no Ray auth token on this node: copy ~/.ray/auth_token from the head (token auth is on)" >&2; exit 2; }
export RAY_AUTH_MODE=token
HEAD=$1; shift
exec ray start --address "$HEAD" "$@"
