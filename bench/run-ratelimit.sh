#!/usr/bin/env bash
# What rate limiting costs the proxy: the backend direct, Gatehouse plain,
# with a local limit, with a cluster limit in Redis (exact) and with one in
# cost mode (lease 100, and lease 1000), one worker each, with the parameters
# docs/benchmarks.md reports. Each closed-loop round measures every target
# at 32 and at 128 connections, and each target stands for its best count:
# exact mode's requests wait on Redis, and 32 of them leave its proxy idle
# at times (see "Each target at its best concurrency" in
# docs/benchmarks.md). Redis commands per request come from Redis's INFO
# commandstats.
#
# Installs redis-server with apt-get when it is missing (Debian or Ubuntu, as
# root or with sudo), builds the binaries, and runs everything on
# 127.0.0.1 only. Results are printed and kept in
# target/bench-results/ratelimit-<UTC timestamp>.md. Extra arguments go to
# gatehouse-bench proxies (e.g. --quiet-wait 20 on a machine shared with builds)
# and override this script's own (e.g. --duration 2 --warmup 1 --rounds 40).
set -euo pipefail
cd "$(dirname "$0")/.."
# PROFILE (default dist, the build the image ships; PROFILE=release for the
# quicker one), the redis-server install, the build and the results header.
. bench/redis-env.sh

out="target/bench-results/ratelimit-$(date -u +%Y%m%dT%H%M%SZ).md"
mkdir -p "$(dirname "$out")"
{
    results_header
    "target/$PROFILE/gatehouse-bench" proxies --connections 32,128 --warmup 3 --duration 10 --rate-fraction 0.5 \
        --proxy-threads 1 --backend-threads 1 --client-threads 1 \
        --targets direct,gatehouse,gatehouse-local,gatehouse-cluster,gatehouse-lease,gatehouse-lease-1000 "$@"
} 2> >(tee "${out%.md}.log" >&2) | tee "$out"
echo "results: $out (progress and warnings: ${out%.md}.log)" >&2
