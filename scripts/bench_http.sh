#!/usr/bin/env bash
# HTTP benchmark (printed, never asserted): wrk with 64 connections against
# `GET /v1/fine_tuning/jobs` (auth + a page of 20 jobs from Postgres) and against a trivial
# handler of the same server (`GET /healthz`), on this machine. Starts its own server (API
# only, no workers) on a scratch database it drops afterwards.
#   scripts/bench_http.sh [DURATION_SECS=15] [THREADS=2]
set -euo pipefail
cd "$(dirname "$0")/.."
DUR="${1:-15}"; THREADS="${2:-2}"
command -v wrk >/dev/null || { echo "wrk is needed (Debian package wrk)" >&2; exit 1; }
if [ -z "${DATABASE_URL:-}" ]; then eval "$(./scripts/postgres.sh)"; fi
ROOT="${DATABASE_URL%/*}"
DB="sparsegrad_bench_http"
psql "$ROOT/postgres" -qc "drop database if exists $DB" >/dev/null
psql "$ROOT/postgres" -qc "create database $DB" >/dev/null
cargo build --release --locked --bin sparsegrad >&2
WORK="$(mktemp -d)"
ADMIN=bench-admin
PORT=18089
DATABASE_URL="$ROOT/$DB" target/release/sparsegrad serve --workers 0 --admin-key $ADMIN \
  --listen 127.0.0.1:$PORT --data-dir "$WORK" >"$WORK/server.log" 2>&1 &
PID=$!
cleanup() { kill $PID 2>/dev/null || true; wait $PID 2>/dev/null || true; rm -rf "$WORK"
            psql "$ROOT/postgres" -qc "drop database if exists $DB" >/dev/null; }
trap cleanup EXIT
H=http://127.0.0.1:$PORT
for _ in $(seq 100); do curl -sf $H/healthz >/dev/null && break; sleep 0.1; done
TENANT=$(curl -sf -XPOST $H/v1/admin/tenants -H "authorization: Bearer $ADMIN" \
  -H 'content-type: application/json' -d '{"name":"bench"}' | python3 -c 'import json,sys;print(json.load(sys.stdin)["id"])')
KEY=$(curl -sf -XPOST $H/v1/admin/api_keys -H "authorization: Bearer $ADMIN" \
  -H 'content-type: application/json' -d "{\"tenant_id\":\"$TENANT\"}" | python3 -c 'import json,sys;print(json.load(sys.stdin)["key"])')
# 200 queued jobs straight into the table (the API would need a model and files for each).
psql "$ROOT/$DB" -qc "insert into jobs (id, tenant_id, status, spec)
  select 'ftjob_bench_' || g, '$TENANT', 'queued',
         jsonb_build_object('model', 'm', 'training_file', jsonb_build_object('id', 'file_x'))
    from generate_series(1, 200) g" >/dev/null
echo "== GET /healthz (trivial handler), 64 connections, ${DUR}s, $THREADS wrk threads"
wrk -t"$THREADS" -c64 -d"${DUR}s" --latency $H/healthz
echo "== GET /v1/fine_tuning/jobs (auth + 20 jobs with queue position/ETA), 64 connections"
wrk -t"$THREADS" -c64 -d"${DUR}s" --latency -H "authorization: Bearer $KEY" $H/v1/fine_tuning/jobs
