#!/usr/bin/env bash
# .ci/services.sh — bring up / tear down every external service payguard's
# integration tests need, on Debian 12 as root, without Docker.
#
#   services.sh up     kcat (apt, if missing), ONNX Runtime library, Prometheus
#                      (apt, if missing; started by tests/grafana.rs itself),
#                      PostgreSQL 15 (plain, cluster main on 5432), TimescaleDB
#                      (the prebuilt build from ../shared/timescaledb/ when it has
#                      one for this server: cluster tsdb on 5433; else the
#                      TimescaleDB tests say they are skipped), Kafka (install +
#                      start + wait)
#   services.sh down   stop Kafka, then both PostgreSQL clusters
#
# After `up`, the connection settings are printed and also written to
# ${PAYGUARD_CACHE:-$HOME/.cache/payguard}/services.env (source it):
#   PAYGUARD_DATABASE_URL  postgresql://payguard:payguard@127.0.0.1:5432/payguard
#   PAYGUARD_TIMESCALEDB_ADMIN_URL  postgresql://payguard:payguard@127.0.0.1:5433/payguard
#                          (only when TimescaleDB is up)
#   PAYGUARD_KAFKA_BROKERS 127.0.0.1:9092
#   ORT_DYLIB_PATH         .../onnxruntime/lib/libonnxruntime.so
set -euo pipefail

CI_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${PAYGUARD_CACHE:-$HOME/.cache/payguard}"

say() { echo "[services] $*"; }

ensure_kcat() {
  command -v kcat >/dev/null 2>&1 && return 0
  say "installing kcat (apt)"
  export DEBIAN_FRONTEND=noninteractive
  local log; log="$(mktemp)"
  { apt-get update -qq && apt-get install -y -qq kcat; } >"$log" 2>&1 \
    || { cat "$log" >&2; rm -f "$log"; echo "[services] ERROR: apt-get install kcat failed" >&2; exit 1; }
  rm -f "$log"
}

cmd_up() {
  local t0=$SECONDS ort
  ensure_kcat
  ort="$("$CI_DIR/onnxruntime.sh")"
  "$CI_DIR/prometheus.sh" install
  "$CI_DIR/postgres.sh" start
  "$CI_DIR/timescaledb.sh" start
  "$CI_DIR/kafka.sh" install
  "$CI_DIR/kafka.sh" start
  mkdir -p "$CACHE"
  cat > "$CACHE/services.env" <<EOF
export PAYGUARD_DATABASE_URL=postgresql://payguard:payguard@127.0.0.1:5432/payguard
export PAYGUARD_KAFKA_BROKERS=127.0.0.1:9092
export ORT_DYLIB_PATH=$ort
EOF
  local ts
  if ts="$("$CI_DIR/timescaledb.sh" url)"; then
    echo "export PAYGUARD_TIMESCALEDB_ADMIN_URL=$ts" >> "$CACHE/services.env"
  else
    say "TimescaleDB: SKIPPED ($(cat "$CACHE/timescaledb.skip"))"
  fi
  say "all services up in $((SECONDS - t0))s; settings in $CACHE/services.env:"
  sed 's/^export /  /' "$CACHE/services.env"
}

cmd_down() {
  "$CI_DIR/kafka.sh" stop
  "$CI_DIR/timescaledb.sh" stop
  "$CI_DIR/postgres.sh" stop
  say "all services stopped"
}

case "${1:-}" in
  up)   cmd_up ;;
  down) cmd_down ;;
  *) echo "usage: $0 {up|down}" >&2; exit 2 ;;
esac
