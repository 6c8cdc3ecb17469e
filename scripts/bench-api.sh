#!/usr/bin/env bash
# Load benchmark of synchronous scoring on loopback: `payguard demo` runs the stream (simulator at
# --rate), and `oha` sends single-transaction POST /v1/score requests (record=false, a card of
# the live stream) at a fixed rate, with latency correction (no coordinated omission). The
# baseline, measured in the same run at the same rate, is GET /health/live (HTTP alone). Reports
# the median over RUNS runs of p50/p99/p99.9 and the achieved rate, and the ratio to the baseline,
# and the CPU time the payguard process spent per request in each (stream included; read from
# /proc, so steadier than the tail latency on a noisy machine).
#
#   scripts/bench-api.sh [path/to/payguard]   (default: target/release/payguard)
#   RATE=5000 SECONDS_PER_RUN=20 RUNS=3 CONNECTIONS=32 STREAM_RATE=2000 scripts/bench-api.sh
#
# Needs oha (`cargo install oha --locked --no-default-features --features native-tls --root
# ~/.cache/payguard/tools`: Debian's OpenSSL instead of building aws-lc; found there or on PATH); without
# it, falls back to wrk (Debian `wrk`), which cannot hold a fixed rate: it then reports the
# latency at the rate the server sustains with CONNECTIONS connections (closed loop).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BIN="${1:-${CARGO_TARGET_DIR:-target}/release/payguard}"
RATE="${RATE:-5000}"
SECS="${SECONDS_PER_RUN:-20}"
RUNS="${RUNS:-3}"
CONN="${CONNECTIONS:-32}"
STREAM_RATE="${STREAM_RATE:-2000}"
OHA="$(command -v oha || echo "$HOME/.cache/payguard/tools/bin/oha")"
TOOL=oha
if [[ ! -x "$OHA" ]]; then
  command -v wrk >/dev/null || { echo "neither oha nor wrk found: cargo install oha --locked --no-default-features --features native-tls --root ~/.cache/payguard/tools" >&2; exit 2; }
  TOOL=wrk
  echo "oha not found: using wrk, closed loop (no fixed rate)"
fi
[[ -x "$BIN" ]] || { echo "no binary at $BIN" >&2; exit 2; }

work="$(mktemp -d)"
log="$work/demo.log"
RUST_LOG=warn,payguard::app=info "$BIN" demo --listen 127.0.0.1:0 --rate "$STREAM_RATE" 2>"$log" >/dev/null &
pid=$!
cleanup() { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
addr=""
for _ in $(seq 1 300); do
  addr="$(grep -o 'addr=[0-9.:]*' "$log" | head -1 | cut -d= -f2 || true)"
  [[ -n "$addr" ]] && break
  sleep 0.2
done
[[ -n "$addr" ]] || { cat "$log" >&2; exit 1; }

# A card with history in the live stream (the newest alert's), scored one second after it.
body=""
for _ in $(seq 1 120); do
  body="$(curl -s "http://$addr/v1/alerts?limit=1" | python3 -c '
import json, sys, datetime
a = json.load(sys.stdin)["alerts"]
if a:
    a = a[0]
    t = datetime.datetime.fromisoformat(a["event_time"].replace("Z", "+00:00")) + datetime.timedelta(seconds=1)
    print(json.dumps({"record": False, "transaction": {
        "transaction_id": "bench-1", "event_time": t.isoformat().replace("+00:00", "Z"),
        "source": "card", "amount": "42.10", "currency": "BRL", "customer_id": a["customer_id"],
        "card_id": a["card_id"], "merchant_id": a["merchant_id"], "channel": "ecommerce"}}))
' 2>/dev/null || true)"
  [[ -n "$body" ]] && break
  sleep 1
done
[[ -n "$body" ]] || { echo "no alert to take a card from" >&2; exit 1; }
echo "$body" > "$work/body.json"
# oha sends these line by line: one body per request, each with a transaction id of its own (as
# an authorisation stream has them; repeats of an id are evaluated one after the other).
python3 - "$work/body.json" "$work/bodies.jsonl" <<'PY'
import json, sys
b = json.load(open(sys.argv[1]))
with open(sys.argv[2], "w") as out:
    for i in range(200000):
        b["transaction"]["transaction_id"] = f"bench-{i}"
        out.write(json.dumps(b, separators=(",", ":")) + "\n")
PY
code="$(curl -s -o "$work/one.json" -w '%{http_code}' -H 'content-type: application/json' --data @"$work/body.json" "http://$addr/v1/score")"
[[ "$code" == 200 ]] || { echo "scoring answered $code: $(cat "$work/one.json")" >&2; exit 1; }

run_oha() { # name, extra args...
  local name="$1"; shift
  "$OHA" --no-tui --output-format json -z "${SECS}s" -q "$RATE" -c "$CONN" --latency-correction "$@" \
    > "$work/$name.json"
  python3 - "$work/$name.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
p = r["latencyPercentiles"]
codes = r.get("statusCodeDistribution", {})
ok = codes.get("200", 0)
total = sum(codes.values()) or 1
print(f'{p["p50"]*1000:.3f} {p["p99"]*1000:.3f} {p["p99.9"]*1000:.3f} {r["summary"]["requestsPerSec"]:.0f} {ok/total:.4f}')
PY
}

run_wrk() { # name, url, [body file]
  local name="$1" url="$2" bodyfile="${3:-}"
  if [[ -n "$bodyfile" ]]; then
    printf 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = io.open("%s"):read("*a")\n' "$bodyfile" > "$work/post.lua"
    wrk -t2 -c"$CONN" -d"${SECS}s" --latency -s "$work/post.lua" "$url" > "$work/$name.raw"
  else
    wrk -t2 -c"$CONN" -d"${SECS}s" --latency "$url" > "$work/$name.raw"
  fi
  python3 - "$work/$name.raw" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
def ms(v, u):
    return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[u]
pct = {m.group(1): ms(m.group(2), m.group(3)) for m in re.finditer(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s)", t, re.M)}
total = int(re.search(r"(\d+) requests in", t).group(1)) or 1
bad = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", t)) else 0
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
print(f'{pct["50"]:.3f} {pct["99"]:.3f} nan {rps:.0f} {(total - bad) / total:.4f}')
PY
}

# CPU seconds (user + system) the demo process has used so far.
cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$pid/stat"; }
# Run a load (name, runner args...), print its figures and the process CPU µs per request.
measured() {
  local c0 c1 out
  c0="$(cpu)"; out="$("$@")"; c1="$(cpu)"
  python3 -c 'import sys; c0, c1, rps, secs = map(float, sys.argv[1:5]); print(f"{sys.argv[5]} {(c1 - c0) * 1e6 / max(rps * secs, 1):.0f}")' \
    "$c0" "$c1" "$(echo "$out" | cut -d' ' -f4)" "$SECS" "$out"
}

echo "stream: demo simulator at $STREAM_RATE msg/s; load: $RATE req/s, $CONN connections, ${SECS}s x $RUNS runs"
echo "run kind    p50_ms p99_ms p99.9_ms req/s ok_share cpu_us_per_req"
: > "$work/score.txt"; : > "$work/live.txt"
for i in $(seq 1 "$RUNS"); do
  if [[ "$TOOL" == oha ]]; then
    l="$(measured run_oha live "http://$addr/health/live")"
    s="$(measured run_oha score -m POST -H 'content-type: application/json' -Z "$work/bodies.jsonl" "http://$addr/v1/score")"
  else
    l="$(measured run_wrk live "http://$addr/health/live")"
    s="$(measured run_wrk score "http://$addr/v1/score" "$work/body.json")"
  fi
  echo "$i live     $l"; echo "$l" >> "$work/live.txt"
  echo "$i score    $s"; echo "$s" >> "$work/score.txt"
done
python3 - "$work/score.txt" "$work/live.txt" <<'PY'
import statistics, sys
def med(path):
    rows = [list(map(float, l.split())) for l in open(path) if l.strip()]
    return [statistics.median(c) for c in zip(*rows)]
s, l = med(sys.argv[1]), med(sys.argv[2])
print(f"median  score: p50 {s[0]:.3f} ms, p99 {s[1]:.3f} ms, p99.9 {s[2]:.3f} ms, {s[3]:.0f} req/s, {s[4]*100:.2f}% 200, {s[5]:.0f} µs CPU a request")
print(f"median  live : p50 {l[0]:.3f} ms, p99 {l[1]:.3f} ms, p99.9 {l[2]:.3f} ms, {l[3]:.0f} req/s, {l[5]:.0f} µs CPU a request")
print(f"ratio   score/live p99: {s[1]/l[1]:.1f}x; target p99 < 2 ms: {'met' if s[1] < 2 and s[4] > 0.999 else 'NOT met'}")
PY
grep -o 'batches=[0-9]*' "$log" | tail -1 || true
