#!/usr/bin/env bash
# Starts (or stops) the S3-compatible server the storage tests run against: moto, pinned, in
# its own virtualenv (.venv-s3). `start` prints `export SPARSEGRAD_TEST_S3_ENDPOINT=…` and
# `SPARSEGRAD_TEST_S3_PID=…` lines for the caller to eval; `stop PID` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-start}" in
start)
  if [ ! -x .venv-s3/bin/moto_server ]; then
    python3 -m venv .venv-s3 >&2
    .venv-s3/bin/pip install -q 'moto[s3]==5.2.5' 'flask==3.1.3' 'flask-cors==6.0.5' >&2
  fi
  # A free port from the kernel, so parallel runs do not collide.
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  .venv-s3/bin/moto_server -H 127.0.0.1 -p "$port" >/tmp/moto-$port.log 2>&1 &
  pid=$!
  for _ in $(seq 100); do
    if curl -sf "http://127.0.0.1:$port/moto-api/" >/dev/null 2>&1; then
      echo "export SPARSEGRAD_TEST_S3_ENDPOINT=http://127.0.0.1:$port"
      echo "export SPARSEGRAD_TEST_S3_PID=$pid"
      exit 0
    fi
    sleep 0.2
  done
  echo "moto did not start; see /tmp/moto-$port.log" >&2
  kill "$pid" 2>/dev/null || true
  exit 1
  ;;
stop)
  kill "${2:?pid}" 2>/dev/null || true
  ;;
esac
