#!/usr/bin/env bash
# The official OpenAI Python SDK (pinned with hashes in tests/sdk/requirements.txt, in its own
# virtualenv .venv-sdk) in strict mode against a real server + worker on a scratch database:
# tests/sdk/test_openai_sdk.py; then the Python client (clients/python) installed from the
# repo: tests/sdk/test_client.py.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/scratch-server.sh
pinned_venv .venv-sdk tests/sdk/requirements.txt
start_scratch_server sdk ""
# The Python client from the repo, as a user installs it (its dependencies are pinned above).
.venv-sdk/bin/pip install -q --no-deps --no-build-isolation ./clients/python
export BASE_URL="$BASE" ADMIN_KEY="$ADMIN" FIXTURES="$FIX" SPARSEGRAD_BIN="$PWD/$BIN"
if ! .venv-sdk/bin/python tests/sdk/test_openai_sdk.py || ! .venv-sdk/bin/python tests/sdk/test_client.py; then
  server_log_tail
  exit 1
fi
