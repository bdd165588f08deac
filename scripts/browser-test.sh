#!/usr/bin/env bash
# The dashboard's browser tests: a real server + worker (the debug binary scripts/test.sh
# built) on a scratch database, Debian's chromium driven by playwright-core (pinned in
# tests/browser/package-lock.json). Screenshots: target/screenshots/.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATABASE_URL:?DATABASE_URL names the Postgres server}"
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
[ -x "$CHROMIUM" ] || { echo "chromium not found at $CHROMIUM (Debian package chromium)" >&2; exit 1; }
BIN=target/debug/sparsegrad
[ -x "$BIN" ] || cargo build --locked --bin sparsegrad
FIX="$("$BIN" fixtures | python3 -c 'import json,sys; print(json.load(sys.stdin)["root"])')"
(cd tests/browser && npm ci --no-audit --no-fund --silent)

ROOT="${DATABASE_URL%/*}"
DB=sparsegrad_browser_$$
psql "$ROOT/postgres" -qc "create database $DB" >/dev/null
WORK="$(mktemp -d)"
PORT="${BROWSER_TEST_PORT:-18090}"
ADMIN="browser-admin-$$"
DATABASE_URL="$ROOT/$DB" "$BIN" serve --workers 1 --lease-secs 10 --admin-key "$ADMIN" \
  --webhook-allow-hosts 127.0.0.1 \
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
rm -rf target/screenshots
if ! BASE_URL="http://127.0.0.1:$PORT" ADMIN_KEY="$ADMIN" TRAIN_FILE="$FIX/data/rt_polarity/train.jsonl" \
     DEV_FILE="$FIX/data/rt_polarity/dev.jsonl" \
     SCREENSHOTS="$PWD/target/screenshots" CHROMIUM="$CHROMIUM" node tests/browser/dashboard.mjs; then
  echo "--- server log (tail)" >&2; tail -n 40 "$WORK/server.log" >&2
  exit 1
fi
