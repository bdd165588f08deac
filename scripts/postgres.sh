#!/usr/bin/env bash
# Brings up a Postgres for the service when DATABASE_URL names none, and prints the
# `export DATABASE_URL=…` line to eval:
#   1. the server at 127.0.0.1:5432 if one answers (database `sparsegrad`, created if missing);
#   2. otherwise a project-local cluster under data/postgres on port 5433 (initdb from the
#      distribution's postgresql package, installed if missing and we are root).
# SPARSEGRAD_PG_LOCAL=1 skips step 1. `scripts/postgres.sh stop` stops the local cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${SPARSEGRAD_PG_DIR:-$PWD/data/postgres}"
PORT="${SPARSEGRAD_PG_PORT:-5433}"

bin_dir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1; }
as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$*"; else sh -c "$*"; fi; }

if [ "${1:-start}" = stop ]; then
  B="$(bin_dir)"; [ -n "$B" ] && [ -d "$DIR" ] && as_pg "$B/pg_ctl -D '$DIR' stop -m fast" >&2 || true
  exit 0
fi

if [ -z "${SPARSEGRAD_PG_LOCAL:-}" ] && command -v pg_isready >/dev/null \
   && pg_isready -q -h 127.0.0.1 -p 5432; then
  URL="postgres://postgres@127.0.0.1:5432"
  if psql "$URL/postgres" -qAtc 'select 1' >/dev/null 2>&1; then
    psql "$URL/postgres" -qAtc "select 1 from pg_database where datname = 'sparsegrad'" | grep -q 1 \
      || psql "$URL/postgres" -qc 'create database sparsegrad' >&2
    echo "export DATABASE_URL=$URL/sparsegrad"
    exit 0
  fi
  echo "a Postgres answers on 127.0.0.1:5432 but not to user postgres without a password;" \
       "set DATABASE_URL" >&2
  exit 1
fi

if [ -z "$(bin_dir)" ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >&2
  else
    echo "no Postgres found: install the postgresql package or set DATABASE_URL" >&2
    exit 1
  fi
fi
B="$(bin_dir)"
if [ ! -f "$DIR/PG_VERSION" ]; then
  mkdir -p "$DIR"
  [ "$(id -u)" = 0 ] && chown postgres "$DIR"
  as_pg "$B/initdb -D '$DIR' -U postgres --auth=trust -E UTF8" >&2
fi
if ! "$B/pg_isready" -q -h 127.0.0.1 -p "$PORT"; then
  as_pg "$B/pg_ctl -D '$DIR' -l '$DIR/server.log' -w start -o '-p $PORT -k $DIR -c listen_addresses=127.0.0.1'" >&2
fi
URL="postgres://postgres@127.0.0.1:$PORT"
psql "$URL/postgres" -qAtc "select 1 from pg_database where datname = 'sparsegrad'" | grep -q 1 \
  || psql "$URL/postgres" -qc 'create database sparsegrad' >&2
echo "export DATABASE_URL=$URL/sparsegrad"
