#!/usr/bin/env bash
# The contract, kept honest: openapi.yaml linted by Redocly's CLI (pinned in
# tests/contract/package-lock.json; every warning fails), then fuzzed by schemathesis (pinned
# with hashes in tests/contract/requirements.txt, in .venv-contract) with all checks against a
# real server + worker (the debug binary scripts/test.sh built) on a scratch database.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/scratch-server.sh

(cd tests/contract && npm ci --no-audit --no-fund --silent)
lint="$(cd tests/contract && npx --no-install redocly lint ../../openapi.yaml --config redocly.yaml --format=stylish 2>&1)" || {
  echo "$lint" >&2; exit 1; }
if grep -qE '^\s+[0-9]+:[0-9]+\s+(warning|error)' <<<"$lint"; then
  echo "$lint" >&2; echo "openapi.yaml: the linter has findings" >&2; exit 1
fi
echo "openapi.yaml: lint clean"

pinned_venv .venv-contract tests/contract/requirements.txt
start_scratch_server contract ""
H="$BASE"
json() { python3 -c "import json,sys; print(json.load(sys.stdin)[\"$1\"])"; }
TENANT=$(curl -sf -XPOST "$H/v1/admin/tenants" -H "authorization: Bearer $ADMIN" \
  -H 'content-type: application/json' -d '{"name": "contract"}' | json id)
KEY=$(curl -sf -XPOST "$H/v1/admin/api_keys" -H "authorization: Bearer $ADMIN" \
  -H 'content-type: application/json' -d "{\"tenant_id\": \"$TENANT\"}" | json key)
# A real file, so generated requests meet an existing resource too.
head -n 32 "$FIX/data/rt_polarity/train.jsonl" | curl -sf -XPOST \
  "$H/v1/files?purpose=fine-tune&filename=train.jsonl" -H "authorization: Bearer $KEY" \
  --data-binary @- >/dev/null

# Bounded: examples per operation and a time budget, one worker (the server's limits are
# part of what is checked, not something to trip).
if ! .venv-contract/bin/schemathesis --config-file tests/contract/schemathesis.toml run openapi.yaml --url "$H" \
     -H "Authorization: Bearer $KEY" --max-examples "${CONTRACT_EXAMPLES:-25}" \
     --workers 1 --exclude-path-regex '^/v1/admin/' --seed 1 \
     --suppress-health-check all "$@"; then
  server_log_tail
  exit 1
fi
