#!/usr/bin/env bash
# Build Nexus and run the whole platform with the demo setup: embedded broker on 1883,
# services on 4000-7000, a demo operator login, and the historian in a local PostgreSQL
# (started here on 127.0.0.1:5433 unless NEXUS_DATABASE_URL names another database; set
# NEXUS_DEMO_DB=off to run without it). Extra arguments go to `nexus up`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
cargo build --release -p nexus-orchestrator --bin nexus

pg_stop=()
if [ -z "${NEXUS_DATABASE_URL:-}" ] && [ "${NEXUS_DEMO_DB:-on}" != "off" ]; then
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  port=${NEXUS_DEMO_DB_PORT:-5433}
  run=()
  if [ "$(id -u)" -eq 0 ]; then
    # PostgreSQL refuses to run as root: the demo database runs as nobody.
    data=/var/tmp/nexus-demo-postgres
    run=(setpriv --reuid=nobody --regid=nogroup --clear-groups --)
  else
    data=$PWD/nexus-data/postgres
  fi
  if [ ! -s "$data/PG_VERSION" ]; then
    mkdir -p "$data"
    [ "$(id -u)" -eq 0 ] && chown nobody:nogroup "$data"
    chmod 700 "$data"
    "${run[@]}" "$bin/initdb" -D "$data" -U nexus --auth=trust -E UTF8 --locale=C >/dev/null
  fi
  if ! "${run[@]}" "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    "${run[@]}" "$bin/pg_ctl" -D "$data" -l "$data/postgres.log" -w \
      -o "-p $port -k $data -c listen_addresses=127.0.0.1" start >/dev/null
    pg_stop=("${run[@]}" "$bin/pg_ctl" -D "$data" -m fast stop)
  fi
  "$bin/psql" -h 127.0.0.1 -p "$port" -U nexus -d postgres -Atqc \
    "SELECT 1 FROM pg_database WHERE datname = 'nexus'" | grep -q 1 ||
    "$bin/psql" -h 127.0.0.1 -p "$port" -U nexus -d postgres -qc "CREATE DATABASE nexus"
  export NEXUS_DATABASE_URL="postgres://nexus@127.0.0.1:$port/nexus"
  echo "historian: PostgreSQL in $data on 127.0.0.1:$port (psql $NEXUS_DATABASE_URL)" >&2
fi

if [ ${#pg_stop[@]} -eq 0 ]; then
  exec target/release/nexus up --demo "$@"
fi
# Stop the demo database after Nexus.
trap 'true' INT
code=0
target/release/nexus up --demo "$@" || code=$?
"${pg_stop[@]}" >/dev/null 2>&1 || true
exit $code
