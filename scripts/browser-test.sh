#!/usr/bin/env bash
# The dashboard's browser tests: a real server + worker (the debug binary scripts/test.sh
# built) on a scratch database, Debian's chromium driven by playwright-core (pinned in
# tests/browser/package-lock.json). Screenshots: target/screenshots/.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/scratch-server.sh
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
[ -x "$CHROMIUM" ] || { echo "chromium not found at $CHROMIUM (Debian package chromium)" >&2; exit 1; }
(cd tests/browser && npm ci --no-audit --no-fund --silent)
# Webhooks may reach the test's own receiver on loopback.
start_scratch_server browser "${BROWSER_TEST_PORT:-18090}" --webhook-allow-hosts 127.0.0.1
rm -rf target/screenshots
if ! BASE_URL="$BASE" ADMIN_KEY="$ADMIN" TRAIN_FILE="$FIX/data/rt_polarity/train.jsonl" \
     DEV_FILE="$FIX/data/rt_polarity/dev.jsonl" \
     SCREENSHOTS="$PWD/target/screenshots" CHROMIUM="$CHROMIUM" node tests/browser/dashboard.mjs; then
  server_log_tail
  exit 1
fi
