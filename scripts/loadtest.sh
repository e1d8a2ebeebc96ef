#!/usr/bin/env bash
# Load test of `differnet serve` on loopback with wrk (Debian package `wrk`): 32 connections for
# 60 s POSTing one image. Prints wrk's latency/throughput, the status counts from /metrics and the
# server's RSS sampled every second (peak and last).
# Usage: scripts/loadtest.sh MODEL IMAGE [extra serve flags, e.g. --views 4]
set -euo pipefail
model=$1; image=$2; shift 2
port=${PORT:-18080}; duration=${DURATION:-60s}; conns=${CONNECTIONS:-32}
bin=${DIFFERNET_BIN:-target/release/differnet}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
"$bin" --quiet serve --model "$model" --addr "127.0.0.1:$port" "$@" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.5; done
lua=$(mktemp --suffix .lua)
cat > "$lua" <<LUA
wrk.method = "POST"
local f = io.open("$image", "rb"); wrk.body = f:read("*all"); f:close()
wrk.headers["Content-Type"] = "application/octet-stream"
LUA
rss_log=$(mktemp)
( while kill -0 $pid 2>/dev/null; do awk '/VmRSS/ {print $2}' /proc/$pid/status >> "$rss_log"; sleep 1; done ) &
wrk -t2 -c"$conns" -d"$duration" --timeout 120s --latency -s "$lua" "http://127.0.0.1:$port/v1/score"
echo "--- /metrics"
curl -fs "http://127.0.0.1:$port/metrics" | grep -E '^differnet_(requests_total|rejected|images|score_seconds_(sum|count))'
echo "--- server RSS (kB): first $(head -1 "$rss_log"), peak $(sort -n "$rss_log" | tail -1), last $(tail -1 "$rss_log")"
