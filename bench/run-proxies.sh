#!/usr/bin/env bash
# Proxy throughput and latency (the backend direct, and behind nginx, HAProxy,
# the hyper floor (hyper's server and client with nothing between them) and
# Gatehouse, one worker each; Gatehouse twice: without a policy, and with
# the default firewall rule set) and config propagation (3 control-plane
# nodes, 2 data planes), with the parameters docs/benchmarks.md reports.
#
# Installs nginx and haproxy with apt-get when they are missing (Debian or
# Ubuntu, as root or with sudo), builds the binaries, and runs everything
# on 127.0.0.1 only. The proxies are started by the benchmark on free loopback
# ports with configs in a temporary directory, and stopped at the end.
#
# Takes about 8 minutes. Results are printed and kept in
# target/bench-results/proxies-<UTC timestamp>.md, the progress lines and
# warnings (stderr) next to it in .log.
set -euo pipefail
cd "$(dirname "$0")/.."

# The build that ships (deploy/docker/Dockerfile): the `dist` profile,
# release with fat LTO and one codegen unit (about 10 minutes from scratch
# on 2 cores; docs/benchmarks.md, "The dist build"). PROFILE=release
# measures the quicker build instead.
PROFILE=${PROFILE:-dist}

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
if [ ${#need[@]} -gt 0 ]; then
    sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    echo "installing ${need[*]} with apt-get" >&2
    "${sudo[@]}" apt-get update
    # The benchmark runs its own instances; the packages' services are not used.
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends "${need[@]}"
fi

cargo build --profile "$PROFILE" -p gatehouse -p gatehousectl -p gatehouse-bench

out="target/bench-results/proxies-$(date -u +%Y%m%dT%H%M%SZ).md"
mkdir -p "$(dirname "$out")"
bench="target/$PROFILE/gatehouse-bench"

{
    echo "# $(date -u +%FT%TZ), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo
    echo "- build: cargo --profile $PROFILE"
    echo "- code: $(git rev-parse --short HEAD 2>/dev/null || echo unknown); uncommitted changes outside bench/ and docs/:"
    git status --short -- . ':!bench' ':!docs' ':!target' 2>/dev/null | sed 's/^/    /' || true
    echo "- $(uname -sr), $(rustc --version)"
    echo "- $( (nginx -v 2>&1 || /usr/sbin/nginx -v 2>&1) | head -1)"
    echo "- $( (haproxy -v 2>/dev/null || /usr/sbin/haproxy -v) | head -1)"
    for run in 1 2; do
        echo
        echo "## proxies, run $run: 32 connections, 3 s warmup + 15 s per phase, fixed rate 0.5 x the slowest closed-loop throughput"
        echo
        "$bench" proxies --connections 32 --warmup 3 --duration 15 --rate-fraction 0.5 \
            --proxy-threads 1 --backend-threads 1 --client-threads 1
    done
    echo
    echo "## propagation: 500 route writes to the leader, 2 data planes polled every 1 ms"
    echo
    "$bench" propagation --writes 500 --pause-ms 50 --poll-ms 1 --timeout-ms 10000
} 2> >(tee "${out%.md}.log" >&2) | tee "$out"
echo "results: $out (progress and warnings: ${out%.md}.log)" >&2
