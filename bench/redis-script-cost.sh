#!/usr/bin/env bash
# Redis's own time per call of the rate-limit script (the GCRA of
# crates/gatehouse-data/src/limits/store.rs, read from the source), and of
# the parts it is made of, from Redis's INFO commandstats while
# redis-benchmark calls it N times (default 200000) from 4 connections.
# One key, never refused, as the hot key of the rate-limit benchmark.
# Redis listens on a Unix socket in a temporary directory only (no TCP
# port). Needs redis-server, redis-cli and redis-benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d /tmp/gatehouse-redis-script.XXXX)
sock=$work/redis.sock
redis-server --port 0 --unixsocket "$sock" --save '' --appendonly no --dir "$work" > "$work/redis.log" 2>&1 &
RPID=$!
trap 'kill $RPID 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 50); do redis-cli -s "$sock" ping >/dev/null 2>&1 && break; sleep 0.1; done

python3 - "$work" <<'EOF'
import re, sys
src = open("crates/gatehouse-data/src/limits/store.rs").read()
gcra = re.search(r'pub const GCRA: &str = r"(.*?)";', src, re.S).group(1)
parts = {
    "1-call": "return 1",
    "2-time": "local t = redis.call('TIME')\nreturn 1",
    "3-time-get": "local t = redis.call('TIME')\nlocal v = redis.call('GET', KEYS[1])\nreturn 1",
    "4-time-get-set": "local t = redis.call('TIME')\nlocal v = redis.call('GET', KEYS[1])\n"
                      "redis.call('SET', KEYS[1], '1700000000000000', 'PX', 1000)\nreturn 1",
    "5-gcra": gcra,
}
for name, body in parts.items():
    open(f"{sys.argv[1]}/{name}.lua", "w").write(body)
EOF

printf '%-16s %s\n' script "µs per call (Redis's own time)"
for f in "$work"/*.lua; do
    sha=$(redis-cli -s "$sock" script load "$(cat "$f")")
    redis-cli -s "$sock" flushall >/dev/null
    redis-cli -s "$sock" config resetstat >/dev/null
    redis-benchmark -s "$sock" -n "${N:-200000}" -c 4 -q \
        evalsha "$sha" 1 'gatehouse:rl:{policy/limit/0123456789abcdef0123456789abcdef}' 1 1000000000 6 >/dev/null 2>&1
    us=$(redis-cli -s "$sock" info commandstats | sed -n 's/^cmdstat_evalsha:.*usec_per_call=\([0-9.]*\).*/\1/p')
    printf '%-16s %s\n' "$(basename "$f" .lua)" "$us"
done
echo "$(redis-server --version)"
