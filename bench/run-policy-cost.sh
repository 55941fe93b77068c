#!/usr/bin/env bash
# What a policy on a route costs the proxy, measured in one Gatehouse
# process (gatehouse-bench policy-cost): a plain route and one route per
# policy (default: a local limit and a cluster limit in cost mode, lease
# 1000), one closed-loop load over the same keep-alive connections taking
# the routes in turn for 100 ms each, for 300 s; each policy's throughput
# as a share of the plain route's at its place, with a 95 % interval for
# the median over the rounds. Far less disturbed by a drifting machine than
# bench/run-ratelimit.sh, whose targets are processes of their own measured
# seconds apart (docs/benchmarks.md, "One process, routes in turn").
#
# Installs redis-server with apt-get when it is missing (Debian or Ubuntu,
# as root or with sudo), builds the binaries, and runs everything on
# 127.0.0.1 only. Results are printed and kept in
# target/bench-results/policy-cost-<UTC timestamp>.md. Extra arguments go
# to gatehouse-bench policy-cost and override this script's own (e.g.
# --policies gatehouse-lease-1000,gatehouse-lease-1000-no-headers --pin).
set -euo pipefail
cd "$(dirname "$0")/.."
# PROFILE (default dist; PROFILE=release for the quicker build), the
# redis-server install, the build and the results header.
. bench/redis-env.sh

out="target/bench-results/policy-cost-$(date -u +%Y%m%dT%H%M%SZ).md"
mkdir -p "$(dirname "$out")"
{
    results_header
    "target/$PROFILE/gatehouse-bench" policy-cost --duration 300 --warmup 5 --slice-ms 100 "$@"
} 2> >(tee "${out%.md}.log" >&2) | tee "$out"
echo "results: $out (progress: ${out%.md}.log)" >&2
