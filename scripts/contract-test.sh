#!/usr/bin/env bash
# The contract, kept honest: openapi.yaml linted by Redocly's CLI (pinned in
# tests/contract/package-lock.json; every warning fails), then fuzzed by schemathesis (pinned
# with hashes in tests/contract/requirements.txt, in .venv-contract) with all checks against a
# real server + worker (the debug binary scripts/test.sh built) on a scratch database.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATABASE_URL:?DATABASE_URL names the Postgres server}"
BIN=target/debug/sparsegrad
[ -x "$BIN" ] || cargo build --locked --bin sparsegrad
FIX="$("$BIN" fixtures | python3 -c 'import json,sys; print(json.load(sys.stdin)["root"])')"

(cd tests/contract && npm ci --no-audit --no-fund --silent)
lint="$(cd tests/contract && npx --no-install redocly lint ../../openapi.yaml --config redocly.yaml --format=stylish 2>&1)" || {
  echo "$lint" >&2; exit 1; }
if grep -qE '^\s+[0-9]+:[0-9]+\s+(warning|error)' <<<"$lint"; then
  echo "$lint" >&2; echo "openapi.yaml: the linter has findings" >&2; exit 1
fi
echo "openapi.yaml: lint clean"

REQ=tests/contract/requirements.txt
STAMP=".venv-contract/.installed-$(sha256sum "$REQ" | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  rm -rf .venv-contract
  python3 -m venv .venv-contract
  .venv-contract/bin/pip install -q --require-hashes --only-binary :all: -r "$REQ"
  touch "$STAMP"
fi

ROOT="${DATABASE_URL%/*}"
DB=sparsegrad_contract_$$
psql "$ROOT/postgres" -qc "create database $DB" >/dev/null
WORK="$(mktemp -d)"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
ADMIN="contract-admin-$$"
DATABASE_URL="$ROOT/$DB" "$BIN" serve --workers 1 --lease-secs 10 --admin-key "$ADMIN" \
  --listen "127.0.0.1:$PORT" --data-dir "$WORK/data" --models-dir "$FIX/models" \
  >"$WORK/server.log" 2>&1 &
PID=$!
cleanup() {
  kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true
  psql "$ROOT/postgres" -qc "drop database if exists $DB (force)" >/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
H="http://127.0.0.1:$PORT"
for _ in $(seq 100); do curl -sf "$H/readyz" >/dev/null && break; sleep 0.2; done
json() { python3 -c "import json,sys; print(json.load(sys.stdin)[\"$1\"])"; }
TENANT=$(curl -sf -XPOST "$H/v1/admin/tenants" -H "authorization: Bearer $ADMIN" \
  -H 'content-type: application/json' -d '{"name": "contract"}' | json id)
KEY=$(curl -sf -XPOST "$H/v1/admin/api_keys" -H "authorization: Bearer $ADMIN" \
  -H 'content-type: application/json' -d "{\"tenant_id\": \"$TENANT\"}" | json key)
# A real file and job, so generated requests meet existing resources too.
head -n 32 "$FIX/data/rt_polarity/train.jsonl" | curl -sf -XPOST \
  "$H/v1/files?purpose=fine-tune&filename=train.jsonl" -H "authorization: Bearer $KEY" \
  --data-binary @- >/dev/null

# Bounded: examples per operation and a time budget, one worker (the server's limits are
# part of what is checked, not something to trip).
if ! .venv-contract/bin/schemathesis --config-file tests/contract/schemathesis.toml run openapi.yaml --url "$H" \
     -H "Authorization: Bearer $KEY" --max-examples "${CONTRACT_EXAMPLES:-25}" \
     --workers 1 --exclude-path-regex '^/v1/admin/' --seed 1 \
     --suppress-health-check all "$@"; then
  echo "--- server log (tail)" >&2; tail -n 40 "$WORK/server.log" >&2
  exit 1
fi
