#!/usr/bin/env bash
# The README's run command: API + one in-process worker on the CPU, objects under data/.
# Uses the Postgres at DATABASE_URL, or brings one up (scripts/postgres.sh). Base models: the
# folder SPARSEGRAD_MODELS_DIR, by default the pinned fixtures (MiniLM-L6, SmolLM2-135M),
# fetched on first use. The admin key: SPARSEGRAD_ADMIN_KEY, or one generated into
# data/admin-key. Extra arguments go to `sparsegrad serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p data
if [ -z "${DATABASE_URL:-}" ]; then
  eval "$(./scripts/postgres.sh)"
fi
export DATABASE_URL
cargo build --release --locked --bin sparsegrad
BIN=target/release/sparsegrad
if [ -z "${SPARSEGRAD_MODELS_DIR:-}" ]; then
  FIX="$("$BIN" fixtures | python3 -c 'import json,sys; print(json.load(sys.stdin)["root"])')"
  export SPARSEGRAD_MODELS_DIR="$FIX/models"
fi
if [ -z "${SPARSEGRAD_ADMIN_KEY:-}" ]; then
  [ -s data/admin-key ] || (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > data/admin-key)
  SPARSEGRAD_ADMIN_KEY="$(cat data/admin-key)"
  echo "admin key: data/admin-key" >&2
fi
export SPARSEGRAD_ADMIN_KEY
exec "$BIN" serve "$@"
