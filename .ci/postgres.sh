#!/usr/bin/env bash
# .ci/postgres.sh — Debian's PostgreSQL 15 cluster "main" for payguard's tests.
#
#   postgres.sh start    install postgresql-15 if missing, create the cluster if
#                        missing, apply test-box settings (ALTER SYSTEM; restart
#                        only when one changed), start it, wait for pg_isready,
#                        ensure role payguard/payguard (SUPERUSER) and database
#                        payguard owned by it, then check the TCP password login.
#   postgres.sh stop     stop the cluster (ok if not running)
#   postgres.sh status   say whether it runs
#
# URL for tests: postgresql://payguard:payguard@127.0.0.1:5432/payguard
# Environment: PG_VERSION (default 15), PG_CLUSTER (default main), PG_PORT (5432),
# PG_TIMESCALEDB=1 (preload TimescaleDB with the settings its README asks for; .ci/timescaledb.sh
# starts its cluster "tsdb" on 5433 that way).
# Runs as root; SQL runs as the postgres OS user over the local socket (peer).
set -euo pipefail

PG_VERSION="${PG_VERSION:-15}"
PG_CLUSTER="${PG_CLUSTER:-main}"
PG_PORT="${PG_PORT:-5432}"
DB_USER=payguard
DB_PASS=payguard
DB_NAME=payguard
URL="postgresql://$DB_USER:$DB_PASS@127.0.0.1:$PG_PORT/$DB_NAME"

# Settings for a fast test box; synchronous_commit/fsync stay at their
# defaults (on) because the tests rely on durability semantics.
declare -A SETTINGS=(
  [max_connections]=200
  [shared_buffers]=512MB
)

# With PG_TIMESCALEDB=1, the settings TimescaleDB needs, in the cluster's conf.d (ALTER SYSTEM
# refuses timescaledb.* before the library is loaded). 8 worker processes are too few for its
# policy jobs.
TIMESCALEDB_CONF="shared_preload_libraries = 'timescaledb'
max_worker_processes = 32
timescaledb.telemetry_level = off"

# Write the conf.d file when PG_TIMESCALEDB=1; prints "changed" if it did.
write_timescaledb_conf() {
  [[ "${PG_TIMESCALEDB:-}" == 1 ]] || return 0
  local f="/etc/postgresql/$PG_VERSION/$PG_CLUSTER/conf.d/timescaledb.conf"
  [[ -f "$f" && "$(cat "$f")" == "$TIMESCALEDB_CONF" ]] && return 0
  mkdir -p "$(dirname "$f")"
  printf '%s\n' "$TIMESCALEDB_CONF" > "$f"
  echo changed
}

say() { echo "[postgres] $*"; }
die() { echo "[postgres] ERROR: $*" >&2; exit 1; }

as_pg() { (cd / && runuser -u postgres -- "$@"); }
psql_pg() {  # psql_pg SQL... as the postgres superuser, quiet, stop on error
  as_pg psql -p "$PG_PORT" -X -q -v ON_ERROR_STOP=1 -At "$@"
}

ensure_installed() {
  [[ -x "/usr/lib/postgresql/$PG_VERSION/bin/postgres" ]] && command -v pg_ctlcluster >/dev/null && return 0
  say "installing postgresql-$PG_VERSION (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "postgresql-$PG_VERSION" >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null && apt-get install -y -qq "postgresql-$PG_VERSION" >/dev/null; } \
    || die "could not install postgresql-$PG_VERSION"
}

cluster_exists() { [[ -d "/etc/postgresql/$PG_VERSION/$PG_CLUSTER" ]]; }
is_running() { pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" status >/dev/null 2>&1; }
pgctl() { pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" "$PG_CLUSTER" "$@"; }

wait_ready() {
  local i
  for ((i = 0; i < 60; i++)); do
    pg_isready -q -h 127.0.0.1 -p "$PG_PORT" && return 0
    sleep 0.5
  done
  tail -n 30 "/var/log/postgresql/postgresql-$PG_VERSION-$PG_CLUSTER.log" >&2 || true
  die "server not ready on 127.0.0.1:$PG_PORT after 30s"
}

# ALTER SYSTEM for each differing setting; prints "restart" if a change needs one
apply_settings() {
  local name want cur ctx need_restart=0 changed=0
  for name in "${!SETTINGS[@]}"; do
    want="${SETTINGS[$name]}"
    # compare in the setting's own unit via current_setting (e.g. 512MB, 200)
    cur="$(psql_pg -c "select current_setting('$name')")"
    if [[ "$cur" != "$want" ]]; then
      say "ALTER SYSTEM SET $name = '$want' (was $cur)"
      psql_pg -c "ALTER SYSTEM SET $name = '$want'"
      changed=1
      ctx="$(psql_pg -c "select context from pg_settings where name = '$name'")"
      [[ "$ctx" == postmaster ]] && need_restart=1
    fi
  done
  if ((need_restart)); then
    say "restarting to apply settings"
    pgctl restart
    wait_ready
  elif ((changed)); then
    psql_pg -c "select pg_reload_conf()" >/dev/null
  fi
}

ensure_role_and_db() {
  psql_pg <<SQL
SELECT format('CREATE ROLE %I LOGIN SUPERUSER', '$DB_USER')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$DB_USER')
\gexec
ALTER ROLE $DB_USER WITH LOGIN SUPERUSER PASSWORD '$DB_PASS';
SELECT format('CREATE DATABASE %I OWNER %I', '$DB_NAME', '$DB_USER')
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = '$DB_NAME')
\gexec
SQL
}

cmd_start() {
  ensure_installed
  if ! cluster_exists; then
    say "creating cluster $PG_VERSION/$PG_CLUSTER"
    pg_createcluster "$PG_VERSION" "$PG_CLUSTER" --port "$PG_PORT" >/dev/null
  fi
  local conf
  conf="$(write_timescaledb_conf)"
  if is_running && [[ -n "$conf" ]]; then
    say "restarting cluster $PG_VERSION/$PG_CLUSTER to preload timescaledb"
    pgctl restart
  elif is_running; then
    say "cluster $PG_VERSION/$PG_CLUSTER already running"
  else
    say "starting cluster $PG_VERSION/$PG_CLUSTER"
    pgctl start
  fi
  wait_ready
  apply_settings
  ensure_role_and_db
  PGCONNECT_TIMEOUT=5 psql "$URL" -X -q -At -c 'select 1' >/dev/null \
    || die "password login over TCP failed: $URL"
  say "ready: $URL"
}

cmd_stop() {
  if cluster_exists && is_running; then
    say "stopping cluster $PG_VERSION/$PG_CLUSTER"
    pgctl stop
  else
    say "not running"
  fi
}

cmd_status() {
  if cluster_exists && is_running; then say "running on port $PG_PORT"; else say "not running"; return 1; fi
}

case "${1:-}" in
  start)  cmd_start ;;
  stop)   cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 {start|stop|status}" >&2; exit 2 ;;
esac
