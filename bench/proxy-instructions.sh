#!/usr/bin/env bash
# Instructions per proxied request of `gatehouse standalone` (one worker, a
# route to a trivial backend, no policy), counted by valgrind's callgrind
# over SECS seconds (default 10) of closed-loop load on 8 connections
# (`GET /x`), divided by the requests the load generator counted.
# Instructions do not depend on what else the machine runs, so this compares
# builds on a busy machine. Usage: bench/proxy-instructions.sh [GATEHOUSE_BINARY [SECS]];
# `bench/proxy-instructions.sh nginx [SECS]` counts nginx instead (one worker
# process, keep-alive to the backend, as in bench/run-proxies.sh), for the
# same comparison in the same unit; `bench/proxy-instructions.sh floor [SECS]`
# counts `gatehouse-bench hyper-floor` (hyper's server and client with
# nothing between them, one worker thread).
# Builds release binaries unless NO_BUILD=1. Prints the requests, the total
# and the per-request figure; `callgrind_annotate` reads the profile kept
# in the printed directory.
set -euo pipefail
cd "$(dirname "$0")/.."
T=target/release
[ "${NO_BUILD:-}" = 1 ] || cargo build --release -p gatehouse -p gatehousectl -p gatehouse-bench
BIN=${1:-$T/gatehouse}
SECS=${2:-10}
D=$(mktemp -d /tmp/gatehouse-proxy-cpu.XXXX)
$T/gatehouse-bench backend --listen 127.0.0.1:0 --threads 1 --max-seconds 600 > "$D/backend.out" 2>&1 &
BP=$!
trap 'kill $BP 2>/dev/null || true' EXIT
for i in $(seq 50); do grep -q ready "$D/backend.out" && break; sleep 0.1; done
BADDR=$(sed -n 's/.*addr=\([^ ]*\).*/\1/p' "$D/backend.out" | head -1)
if [ "$BIN" = nginx ]; then
  PROXY=127.0.0.1:$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
  cat > "$D/nginx.conf" <<CONF
worker_processes 1;
daemon off;
master_process off;
pid $D/nginx.pid;
error_log $D/nginx.err;
events { worker_connections 1024; }
http {
  access_log off;
  upstream backend { server $BADDR; keepalive 64; }
  server {
    listen $PROXY;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$D/cg.out" \
    nginx -c "$D/nginx.conf" -p "$D" > "$D/gh.out" 2> "$D/gh.err" &
  GP=$!
  for i in $(seq 100); do curl -s -o /dev/null "http://$PROXY/x" && break; kill -0 $GP || { cat "$D/gh.err"; exit 1; }; sleep 0.2; done
elif [ "$BIN" = floor ]; then
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$D/cg.out" \
    $T/gatehouse-bench hyper-floor --listen 127.0.0.1:0 --upstream "$BADDR" --threads 1 --max-seconds 600 \
    > "$D/gh.out" 2> "$D/gh.err" &
  GP=$!
  for i in $(seq 100); do grep -q ready "$D/gh.out" && break; kill -0 $GP || { cat "$D/gh.err"; exit 1; }; sleep 0.2; done
  PROXY=$(sed -n 's/.*addr=\([^ ]*\).*/\1/p' "$D/gh.out" | head -1)
else
  export GATEHOUSE_BOOTSTRAP_TOKEN=ght_e2eTestBootstrapToken0123456789abcdefghi
  TOKIO_WORKER_THREADS=1 valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$D/cg.out" \
    "$BIN" standalone --data-dir "$D/data" --admin-listen 127.0.0.1:0 --raft-listen 127.0.0.1:0 \
    --listen 127.0.0.1:0 --ops-listen 127.0.0.1:0 --log-level warn > "$D/gh.out" 2> "$D/gh.err" &
  GP=$!
  for i in $(seq 600); do grep -q "ready admin" "$D/gh.out" && break; kill -0 $GP || { cat "$D/gh.err"; exit 1; }; sleep 0.2; done
  ADMIN=$(sed -n 's/.*ready admin=\([^ ]*\).*/\1/p' "$D/gh.out")
  PROXY=$(sed -n 's/.* proxy=\([^ ]*\).*/\1/p' "$D/gh.out")
  printf 'version: 1\nupstreams:\n  - name: backend\n    targets:\n      - address: "%s"\nroutes:\n  - name: all\n    paths:\n      - prefix: /\n    upstream: backend\n' "$BADDR" > "$D/g.yaml"
  for i in $(seq 60); do
    GATEHOUSE_TOKEN=$GATEHOUSE_BOOTSTRAP_TOKEN $T/gatehousectl --server "http://$ADMIN" apply -f "$D/g.yaml" >/dev/null 2>&1 && break
    sleep 1
  done
fi
$T/gatehouse-bench http --url "http://$PROXY/x" --connections 8 --duration 2 --warmup 1 >/dev/null 2>&1
callgrind_control -i on $GP >/dev/null 2>&1
$T/gatehouse-bench http --url "http://$PROXY/x" --connections 8 --duration "$SECS" --warmup 0 > "$D/load.out" 2>&1
callgrind_control -i off $GP >/dev/null 2>&1
callgrind_control -d $GP >/dev/null 2>&1
kill $GP; wait $GP 2>/dev/null || true
requests=$(awk -F'|' '/^\| closed loop/ {gsub(/ /,"",$8); print $8}' "$D/load.out" | tail -1)
total=$(callgrind_annotate "$D"/cg.out.1 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(/,/,"",$1); print $1}')
echo "requests $requests, instructions $total, per request $((total / requests)) (profile: $D/cg.out.1)"
