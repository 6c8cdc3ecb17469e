#!/usr/bin/env bash
# .ci/prometheus.sh — the Prometheus server (Debian package `prometheus`) for tests/grafana.rs.
#
#   prometheus.sh install   install the package if `prometheus` is missing (quick when installed)
#                           without starting Debian's service: each test starts its own server
#                           on a free port with a temporary config.
#   prometheus.sh path      print the binary's path
#
# The tests find the binary through $PAYGUARD_PROMETHEUS (default: `prometheus` on PATH).
set -euo pipefail

say() { echo "[prometheus] $*" >&2; }
die() { echo "[prometheus] ERROR: $*" >&2; exit 1; }

bin_path() { command -v prometheus 2>/dev/null || { [[ -x /usr/bin/prometheus ]] && echo /usr/bin/prometheus; } || true; }

cmd_install() {
  if [[ -z "$(bin_path)" ]]; then
    say "installing prometheus (apt)"
    export DEBIAN_FRONTEND=noninteractive
    local log; log="$(mktemp)"
    # The package's postinst would start a system service; without systemd there is none, and
    # policy-rc.d keeps invoke-rc.d from starting the sysv one.
    local prc=/usr/sbin/policy-rc.d created=0
    if [[ ! -e "$prc" ]]; then printf '#!/bin/sh\nexit 101\n' > "$prc"; chmod +x "$prc"; created=1; fi
    { apt-get install -y -qq --no-install-recommends prometheus \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; }; } >"$log" 2>&1 \
      || { [[ $created == 1 ]] && rm -f "$prc"; cat "$log" >&2; rm -f "$log"; die "apt-get install prometheus failed"; }
    [[ $created == 1 ]] && rm -f "$prc"
    rm -f "$log"
  fi
  [[ -n "$(bin_path)" ]] || die "prometheus binary not found after install"
  say "$("$(bin_path)" --version 2>&1 | head -n 1)"
}

case "${1:-}" in
  install) cmd_install ;;
  path) bin_path ;;
  *) echo "usage: $0 {install|path}" >&2; exit 2 ;;
esac
