# Sourced by the end-to-end test scripts (browser, SDK, contract): a pinned Python virtualenv,
# and a real server + worker (the debug binary scripts/test.sh built) on a scratch database
# that is dropped, with its data folder, when the script exits.

# pinned_venv DIR REQUIREMENTS: DIR holds exactly what REQUIREMENTS pins (by sha256), installed
# again only when the file changes.
pinned_venv() {
  local dir=$1 req=$2
  local stamp="$dir/.installed-$(sha256sum "$req" | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    rm -rf "$dir"
    python3 -m venv "$dir"
    "$dir/bin/pip" install -q --require-hashes --only-binary :all: -r "$req"
    touch "$stamp"
  fi
}

# start_scratch_server NAME [PORT] [serve flags…]: sets BASE (the server's URL), ADMIN (its
# admin key), WORK (its folder; the log is $WORK/server.log) and FIX (the fixtures root), and
# waits until it is ready. PORT empty or absent: a free one.
start_scratch_server() {
  local name=$1 port=${2:-}
  shift $(( $# < 2 ? $# : 2 ))
  : "${DATABASE_URL:?DATABASE_URL names the Postgres server}"
  BIN=target/debug/sparsegrad
  [ -x "$BIN" ] || cargo build --locked --bin sparsegrad
  FIX="$("$BIN" fixtures | python3 -c 'import json,sys; print(json.load(sys.stdin)["root"])')"
  SCRATCH_ROOT="${DATABASE_URL%/*}"
  SCRATCH_DB="sparsegrad_${name}_$$"
  psql "$SCRATCH_ROOT/postgres" -qc "create database $SCRATCH_DB" >/dev/null
  WORK="$(mktemp -d)"
  [ -n "$port" ] || port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  ADMIN="${name}-admin-$$"
  DATABASE_URL="$SCRATCH_ROOT/$SCRATCH_DB" "$BIN" serve --workers 1 --lease-secs 10 \
    --admin-key "$ADMIN" --listen "127.0.0.1:$port" --data-dir "$WORK/data" \
    --models-dir "$FIX/models" "$@" >"$WORK/server.log" 2>&1 &
  SCRATCH_PID=$!
  trap stop_scratch_server EXIT
  BASE="http://127.0.0.1:$port"
  for _ in $(seq 100); do curl -sf "$BASE/readyz" >/dev/null && return 0; sleep 0.2; done
  echo "the server did not become ready:" >&2; tail -n 40 "$WORK/server.log" >&2
  return 1
}

stop_scratch_server() {
  kill "$SCRATCH_PID" 2>/dev/null || true; wait "$SCRATCH_PID" 2>/dev/null || true
  psql "$SCRATCH_ROOT/postgres" -qc "drop database if exists $SCRATCH_DB (force)" >/dev/null || true
  rm -rf "$WORK"
}

# server_log_tail: what a failing script prints after its own error.
server_log_tail() {
  echo "--- server log (tail)" >&2; tail -n 40 "$WORK/server.log" >&2
}
