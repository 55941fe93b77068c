#!/usr/bin/env bash
# Scale benchmark: a single-node loopback control plane loaded with 1,000,000
# API keys (over 100,000 consumers) and 10,000 routes, then 2 data planes:
# their full-snapshot load time and memory, and the propagation of single key
# creates and revocations as deltas. Builds the binaries first; talks to
# 127.0.0.1 only. Pass flags through, e.g. `--keys 100000` for a smaller run.
#
# Needs several GiB of memory and, on a 2-core machine, tens of minutes.
# Results are printed and kept in target/bench-results/scale-<UTC timestamp>.md.
set -euo pipefail
cd "$(dirname "$0")/.."

# The build that ships (deploy/docker/Dockerfile): the `dist` profile,
# release with fat LTO and one codegen unit (about 10 minutes from scratch
# on 2 cores; docs/benchmarks.md, "The dist build"). PROFILE=release
# measures the quicker build instead.
PROFILE=${PROFILE:-dist}

cargo build --profile "$PROFILE" -p gatehouse -p gatehouse-bench

out="target/bench-results/scale-$(date -u +%Y%m%dT%H%M%SZ).md"
mkdir -p "$(dirname "$out")"
{
    echo "# $(date -u +%FT%TZ), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), load average $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
    echo "- build: cargo --profile $PROFILE, code $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"    echo
    "target/$PROFILE/gatehouse-bench" scale "$@"
} | tee "$out"
echo "results: $out" >&2
