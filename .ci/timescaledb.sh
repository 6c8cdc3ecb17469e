#!/usr/bin/env bash
# .ci/timescaledb.sh — the TimescaleDB path of payguard's tests: a second PostgreSQL 15 cluster
# ("tsdb", port 5433) with TimescaleDB preloaded, beside the plain cluster "main" on 5432.
#
#   timescaledb.sh install   extract the prebuilt TimescaleDB build for this server's minor
#                            version from the shared folder (files under usr/, at /); skipped when
#                            already installed. Without a build for this server it writes the
#                            reason to $PAYGUARD_CACHE/timescaledb.skip (the TimescaleDB tests read
#                            it and say they are skipped) and exits 0.
#   timescaledb.sh start     install, then create/start the cluster with
#                            shared_preload_libraries = 'timescaledb' (postgres.sh, PG_TIMESCALEDB=1)
#   timescaledb.sh stop      stop the cluster (ok if not running)
#   timescaledb.sh url       print the admin URL when the cluster is up
#
# Environment: PAYGUARD_SHARED (default: the project's ../shared), PAYGUARD_TIMESCALEDB_TARBALL (a
# tarball to use instead), PAYGUARD_CACHE (default ~/.cache/payguard).
# Users install TimescaleDB from their distribution's or Timescale's packages (README).
set -euo pipefail

CI_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$CI_DIR/.." && pwd)"
SHARED="${PAYGUARD_SHARED:-$ROOT/../shared}"
CACHE="${PAYGUARD_CACHE:-$HOME/.cache/payguard}"
SKIP_FILE="$CACHE/timescaledb.skip"
PORT=5433
CLUSTER=tsdb
PG_BIN=/usr/lib/postgresql/15/bin
URL="postgresql://payguard:payguard@127.0.0.1:$PORT/payguard"

say() { echo "[timescaledb] $*"; }
die() { echo "[timescaledb] ERROR: $*" >&2; exit 1; }

skip() {
  mkdir -p "$CACHE"
  echo "$*" > "$SKIP_FILE"
  say "SKIPPED: $* — the TimescaleDB tests will say they are skipped"
}

# Server minor version, e.g. 15.18 (an extension loads only on the minor it was built for).
server_version() { "$PG_BIN/postgres" --version | awk '{print $3}'; }

installed_for() {  # the server minor version the installed build was extracted for
  cat /usr/share/postgresql/15/extension/payguard-timescaledb.build 2>/dev/null || true
}

cmd_install() {
  [[ -x "$PG_BIN/postgres" ]] || die "PostgreSQL 15 is not installed (.ci/postgres.sh start installs it)"
  local ver tarball
  ver="$(server_version)"
  tarball="${PAYGUARD_TIMESCALEDB_TARBALL:-}"
  if [[ -z "$tarball" ]]; then
    tarball="$(ls "$SHARED"/timescaledb/timescaledb-*-pg"$ver".tar.gz 2>/dev/null | sort -V | tail -n 1 || true)"
  fi
  if [[ -z "$tarball" || ! -f "$tarball" ]]; then
    skip "no TimescaleDB build for PostgreSQL $ver in $SHARED/timescaledb/"
    return 0
  fi
  if [[ "$(installed_for)" == "$(basename "$tarball")" && -f /usr/lib/postgresql/15/lib/timescaledb.so ]]; then
    say "already installed: $(basename "$tarball")"
  else
    say "installing $(basename "$tarball") for PostgreSQL $ver (extracting at /)"
    tar -xzf "$tarball" -C / usr/ || die "could not extract $tarball"
    basename "$tarball" > /usr/share/postgresql/15/extension/payguard-timescaledb.build
  fi
  rm -f "$SKIP_FILE"
}

cmd_start() {
  cmd_install
  [[ -f "$SKIP_FILE" ]] && return 0
  PG_CLUSTER=$CLUSTER PG_PORT=$PORT PG_TIMESCALEDB=1 "$CI_DIR/postgres.sh" start
  local have
  have="$(PGCONNECT_TIMEOUT=5 psql "$URL" -X -q -At -c "select count(*) from pg_settings where name like 'timescaledb.%'")"
  [[ "$have" -gt 0 ]] || die "cluster $CLUSTER runs without the timescaledb library loaded"
  say "ready: $URL"
}

cmd_stop() {
  PG_CLUSTER=$CLUSTER PG_PORT=$PORT "$CI_DIR/postgres.sh" stop
}

cmd_url() {
  [[ -f "$SKIP_FILE" ]] && return 1
  echo "$URL"
}

case "${1:-}" in
  install) cmd_install ;;
  start)   cmd_start ;;
  stop)    cmd_stop ;;
  url)     cmd_url ;;
  *) echo "usage: $0 {install|start|stop|url}" >&2; exit 2 ;;
esac
