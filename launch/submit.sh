#!/usr/bin/env bash
# Submit `rlhf-ray train CONFIG [overrides]` to a running Ray cluster as a Ray job.
#
#   launch/submit.sh [--address http://HEAD:8265] [--no-wait] [--resume] CONFIG [key.sub=value ...]
#
# Before anything is uploaded it (1) validates the config here, so a typo fails in a second, not on the
# cluster; (2) checks the size of what would be uploaded as the job's working dir (the repo without .venv,
# runs, caches), since an oversized working dir is a common way for job submission to fail. Ray's token
# authentication is always on: the client sends the token the head wrote (~/.ray/auth_token) or RAY_AUTH_TOKEN.
set -euo pipefail
cd "$(dirname "$0")/.."
ADDRESS=${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}
WAIT=1
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --address) ADDRESS=$2; shift 2 ;;
    --no-wait) WAIT=0; shift ;;
    --resume) EXTRA+=(--resume); shift ;;
    -h|--help) sed -n 2,9p "$0"; exit 0 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "usage: launch/submit.sh [--address URL] [--no-wait] [--resume] CONFIG [overrides]" >&2; exit 2; }
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

# 1. The config must validate here first.
"$PY" -m rlhf_ray.cli config "$@" > /dev/null

# 2. What is uploaded: the repo minus what the cluster does not need. Ray refuses packages over its limit.
EXCLUDES='[".venv", "runs", ".git", "**/__pycache__", "benchmarks/results", "*.egg-info", ".pytest_cache"]'
LIMIT_MB=${RLHF_RAY_MAX_UPLOAD_MB:-100}
size_kb=$(du -sk --exclude=.venv --exclude=runs --exclude=.git --exclude=__pycache__ --exclude=.pytest_cache \
          --exclude='benchmarks/results' --exclude='*.egg-info' . | cut -f1)
if [ "$size_kb" -gt $((LIMIT_MB * 1024)) ]; then
  echo "submit: the working dir to upload is $((size_kb / 1024)) MiB, over ${LIMIT_MB} MiB; move data out of the" \
       "repo (point data.* at cluster storage) or raise RLHF_RAY_MAX_UPLOAD_MB" >&2
  exit 2
fi

# 3. Token auth, always: the client sends the token the head wrote (~/.ray/auth_token, copied here) or
#    RAY_AUTH_TOKEN. Without one there is nothing to send, so say how to get it instead of a 401 later.
if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -f "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
  echo "submit: no Ray auth token here: copy ~/.ray/auth_token from the head node or set RAY_AUTH_TOKEN" >&2
  exit 2
fi
export RAY_AUTH_MODE=token

RUNTIME_ENV=$(printf '{"excludes": %s}' "$EXCLUDES")
ARGS=(--address "$ADDRESS" --working-dir . --runtime-env-json "$RUNTIME_ENV")
[ "$WAIT" = 1 ] || ARGS+=(--no-wait)
RAY=$(dirname "$PY")/ray
[ -x "$RAY" ] || RAY=ray
# The job agent can need a while after the head starts (a minute on a busy machine): retry that case only.
for attempt in $(seq 1 24); do
  if out=$("$RAY" job submit "${ARGS[@]}" -- python -m rlhf_ray.cli train "$@" cluster.address=auto "${EXTRA[@]}" 2>&1); then
    echo "$out"
    exit 0
  fi
  if grep -q "No available agent" <<<"$out"; then sleep 5; continue; fi
  echo "$out" >&2
  exit 1
done
echo "submit: the cluster at $ADDRESS had no job agent after 120 s" >&2
exit 1
