#!/usr/bin/env bash
# Admin API write benchmark on a 3-node loopback control plane, with the
# parameters docs/benchmarks.md reports. Builds the binaries first; the
# benchmark starts its own `gatehouse control-plane` processes (a fresh
# cluster per cell, data in a temporary directory) and talks to 127.0.0.1 only.
#
# Takes about 5 minutes. Results are printed and kept in
# target/bench-results/admin-writes-<UTC timestamp>.md.
set -euo pipefail
cd "$(dirname "$0")/.."

# The build that ships (deploy/docker/Dockerfile): the `dist` profile,
# release with fat LTO and one codegen unit (about 10 minutes from scratch
# on 2 cores; docs/benchmarks.md, "The dist build"). PROFILE=release
# measures the quicker build instead.
PROFILE=${PROFILE:-dist}

cargo build --profile "$PROFILE" -p gatehouse -p gatehouse-bench

out="target/bench-results/admin-writes-$(date -u +%Y%m%dT%H%M%SZ).md"
mkdir -p "$(dirname "$out")"
bench="target/$PROFILE/gatehouse-bench"

{
    echo "# $(date -u +%FT%TZ), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo
    echo "- build: cargo --profile $PROFILE, code $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"    echo
    echo "## admin-writes: smallest consumer, every target"
    echo
    "$bench" admin-writes --nodes 3 --concurrency 1,8,32 --target leader,follower,all \
        --warmup 3 --duration 15 --object-bytes 0
    echo
    echo "## admin-writes: 4 KiB consumer, to the leader"
    echo
    "$bench" admin-writes --nodes 3 --concurrency 1,8,32 --target leader \
        --warmup 3 --duration 15 --object-bytes 4096
    echo
    echo "## sled-flush: one small batch + flush, default sled config, same disk"
    echo
    "$bench" sled-flush --count 5000 --value-bytes 400
} | tee "$out"
echo "results: $out" >&2
