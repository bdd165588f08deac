#!/usr/bin/env bash
# The official OpenAI Python SDK (pinned with hashes in tests/sdk/requirements.txt, in its own
# virtualenv .venv-sdk) in strict mode against a real server + worker (the debug binary
# scripts/test.sh built) on a scratch database: tests/sdk/test_openai_sdk.py; then the Python
# client (clients/python) installed from the repo: tests/sdk/test_client.py.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATABASE_URL:?DATABASE_URL names the Postgres server}"
BIN=target/debug/sparsegrad
[ -x "$BIN" ] || cargo build --locked --bin sparsegrad
FIX="$("$BIN" fixtures | python3 -c 'import json,sys; print(json.load(sys.stdin)["root"])')"
REQ=tests/sdk/requirements.txt
STAMP=".venv-sdk/.installed-$(sha256sum "$REQ" | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  rm -rf .venv-sdk
  python3 -m venv .venv-sdk
  .venv-sdk/bin/pip install -q --require-hashes --only-binary :all: -r "$REQ"
  touch "$STAMP"
fi

ROOT="${DATABASE_URL%/*}"
DB=sparsegrad_sdk_$$
psql "$ROOT/postgres" -qc "create database $DB" >/dev/null
WORK="$(mktemp -d)"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
ADMIN="sdk-admin-$$"
DATABASE_URL="$ROOT/$DB" "$BIN" serve --workers 1 --lease-secs 10 --admin-key "$ADMIN" \
  --listen "127.0.0.1:$PORT" --data-dir "$WORK" --models-dir "$FIX/models" \
  >"$WORK/server.log" 2>&1 &
PID=$!
cleanup() {
  kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true
  psql "$ROOT/postgres" -qc "drop database if exists $DB (force)" >/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.2; done
# The Python client from the repo, as a user installs it (its dependencies are pinned above).
.venv-sdk/bin/pip install -q --no-deps --no-build-isolation ./clients/python
if ! BASE_URL="http://127.0.0.1:$PORT" ADMIN_KEY="$ADMIN" FIXTURES="$FIX" \
     .venv-sdk/bin/python tests/sdk/test_openai_sdk.py ||
   ! BASE_URL="http://127.0.0.1:$PORT" ADMIN_KEY="$ADMIN" FIXTURES="$FIX" SPARSEGRAD_BIN="$PWD/$BIN" \
     .venv-sdk/bin/python tests/sdk/test_client.py; then
  echo "--- server log (tail)" >&2; tail -n 40 "$WORK/server.log" >&2
  exit 1
fi
