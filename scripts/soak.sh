#!/usr/bin/env bash
# Soak test of `differnet serve` (loopback only, stops by itself after SOAK_SECONDS, default 1800):
# concurrent clients mix good images, junk, bombs, oversized bodies and slow senders while the
# models are reloaded (SIGHUP) every RELOAD_SECONDS; prints requests by status, p50/p99 latency,
# RSS every 10 s and a pass/fail verdict (scripts/soak.py).
# Usage: scripts/soak.sh MODEL IMAGE [extra serve flags, e.g. --views 1]
set -euo pipefail
exec python3 "$(dirname "$0")/soak.py" "$@"
