#!/usr/bin/env bash
# Instructions per proxied request of `gatehouse standalone` (one worker),
# plain and with one cluster limit (exact, lease 100; 10^9 per second on
# client_ip, never refused), counted by valgrind's callgrind while a
# closed-loop load of DUR seconds (default 15) runs; requests from
# gatehouse_requests_total. Instructions do not depend on what else the
# machine runs, so this works on a busy machine where throughput does not.
# Needs valgrind, redis-server, redis-cli and curl; builds release binaries
# unless NO_BUILD=1. GH=path runs another gatehouse binary (e.g. an older
# build) with this tree's gatehousectl and load generator; T=dir takes all
# three from another directory (e.g. T=target/prof/release NO_BUILD=1 for a
# build with line tables). VARIANTS picks
# a subset of "plain local exact lease lease1000 local-no-headers
# lease1000-no-headers" (default: plain exact lease; the last two under
# `rate_limit_headers: false`).
set -euo pipefail
cd "$(dirname "$0")/.."
T=${T:-target/release}
[ "${NO_BUILD:-}" = 1 ] || cargo build --release -p gatehouse -p gatehousectl -p gatehouse-bench
TOKEN=ght_e2eTestBootstrapToken0123456789abcdefghi
work=$(mktemp -d /tmp/gatehouse-rl-cpu.XXXX)
PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" > "$work/redis.log" 2>&1 &
RPID=$!
$T/gatehouse-bench backend > $work/backend.out 2>&1 &
BPID=$!
trap 'kill $BPID $RPID 2>/dev/null || true' EXIT
for i in $(seq 50); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
for i in $(seq 50); do grep -q ready $work/backend.out && break; sleep 0.1; done
BACKEND=$(sed -n 's/.*addr=\([^ ]*\).*/\1/p' $work/backend.out | head -1)
for v in ${VARIANTS:-plain exact lease}; do
  redis-cli -p $PORT flushall >/dev/null
  redis-cli -p $PORT config resetstat >/dev/null
  d=$work/$v; mkdir -p $d
  extra=()
  [ $v != plain ] && extra=(--redis-url redis://127.0.0.1:$PORT)
  GATEHOUSE_BOOTSTRAP_TOKEN=$TOKEN TOKIO_WORKER_THREADS=1 valgrind --tool=callgrind \
    --callgrind-out-file=$d/cg.out ${GH:-$T/gatehouse} standalone --data-dir $d/data --admin-listen 127.0.0.1:0 \
    --raft-listen 127.0.0.1:0 --listen 127.0.0.1:0 --ops-listen 127.0.0.1:0 --log-level warn "${extra[@]}" \
    > $d/out 2> $d/err &
  GPID=$!
  for i in $(seq 600); do grep -q "ready admin" $d/out && break; kill -0 $GPID || { cat $d/err; exit 1; }; sleep 0.2; done
  ADMIN=$(sed -n 's/.*ready admin=\([^ ]*\).*/\1/p' $d/out); PROXY=$(sed -n 's/.* proxy=\([^ ]*\).*/\1/p' $d/out); OPS=$(sed -n 's/.* ops=\([^ ]*\).*/\1/p' $d/out)
  case $v in
    plain) pol=""; polref="";;
    exact) pol="policies:\n  - name: limited\n    rate_limits:\n      - { name: l, scope: cluster, key: [client_ip], limit: 1000000000, window: 1s }\n"; polref="    policy: limited\n";;
    local) pol="policies:\n  - name: limited\n    rate_limits:\n      - { name: l, scope: local, key: [client_ip], limit: 1000000000, window: 1s }\n"; polref="    policy: limited\n";;
    lease) pol="policies:\n  - name: limited\n    rate_limits:\n      - { name: l, scope: cluster, lease: 100, key: [client_ip], limit: 1000000000, window: 1s }\n"; polref="    policy: limited\n";;
    lease1000) pol="policies:\n  - name: limited\n    rate_limits:\n      - { name: l, scope: cluster, lease: 1000, key: [client_ip], limit: 1000000000, window: 1s }\n"; polref="    policy: limited\n";;
    local-no-headers) pol="policies:\n  - name: limited\n    rate_limit_headers: false\n    rate_limits:\n      - { name: l, scope: local, key: [client_ip], limit: 1000000000, window: 1s }\n"; polref="    policy: limited\n";;
    lease1000-no-headers) pol="policies:\n  - name: limited\n    rate_limit_headers: false\n    rate_limits:\n      - { name: l, scope: cluster, lease: 1000, key: [client_ip], limit: 1000000000, window: 1s }\n"; polref="    policy: limited\n";;
  esac
  printf "version: 1\n${pol}upstreams:\n  - name: backend\n    targets:\n      - address: \"$BACKEND\"\nroutes:\n  - name: all\n    paths:\n      - prefix: /\n    upstream: backend\n${polref}" > $d/gw.yaml
  for i in $(seq 100); do GATEHOUSE_TOKEN=$TOKEN $T/gatehousectl --server $ADMIN apply -f $d/gw.yaml >/dev/null 2>&1 && break; sleep 0.5; done
  for i in $(seq 100); do [ "$(curl -s -o /dev/null -w '%{http_code}' http://$PROXY/items)" = 200 ] && break; sleep 0.3; done
  $T/gatehouse-bench http --url http://$PROXY/items?q=blue+running+shoes --connections 32 --duration 3 --warmup 0 >/dev/null 2>&1
  before=$(curl -s http://$OPS/metrics | awk '/^gatehouse_requests_total/ {s+=$2} END {print s+0}')
  callgrind_control -z $GPID >/dev/null
  $T/gatehouse-bench http --url "http://$PROXY/items?q=blue+running+shoes&page=2" --connections 32 --duration ${DUR:-15} --warmup 0 > $d/load.out 2>&1

  after=$(curl -s http://$OPS/metrics | awk '/^gatehouse_requests_total/ {s+=$2} END {print s+0}')
  callgrind_control -d $GPID >/dev/null
  sleep 1
  kill $GPID; wait $GPID 2>/dev/null || true
  ir=$(cat $(ls $d/cg.out.* | sort -V | tail -1) | awk '/^summary:/ {s+=$2} END {print s}')
  n=$((after-before))
  ev=$(redis-cli -p $PORT info commandstats | grep evalsha || true)
  echo "$v: requests=$n instructions=$ir per_request=$((ir / (n>0?n:1))) redis: $ev"
done
