#!/usr/bin/env bash
# What authentication costs the proxy: the backend direct, HAProxy and
# Gatehouse plain, Gatehouse with an API key, with an RS256 JWT and with an
# ES256 JWT (static issuer keys), and HAProxy checking the same JWTs with
# `jwt_verify` (plus alg, iss, aud and exp), one worker each, in one run, with
# the parameters docs/benchmarks.md reports. Every request carries the same
# credential, as a client reusing its key or token does.
#
# Installs haproxy with apt-get when it is missing (Debian or Ubuntu, as root
# or with sudo), makes the signing keys with openssl, builds the
# binaries, and runs everything on 127.0.0.1 only. Results are printed and
# kept in target/bench-results/auth-<UTC timestamp>.md. Extra arguments go to
# gatehouse-bench proxies (e.g. --quiet-wait 20 on a machine shared with builds)
# and override this script's own (e.g. --duration 2 --warmup 1 --rounds 40).
set -euo pipefail
cd "$(dirname "$0")/.."

# The build that ships (deploy/docker/Dockerfile): the `dist` profile,
# release with fat LTO and one codegen unit (about 10 minutes from scratch
# on 2 cores; docs/benchmarks.md, "The dist build"). PROFILE=release
# measures the quicker build instead.
PROFILE=${PROFILE:-dist}

need=()
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
    sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    echo "installing ${need[*]} with apt-get" >&2
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

cargo build --profile "$PROFILE" -p gatehouse -p gatehousectl -p gatehouse-bench

out="target/bench-results/auth-$(date -u +%Y%m%dT%H%M%SZ).md"
mkdir -p "$(dirname "$out")"
{
    echo "# $(date -u +%FT%TZ), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo
    echo "- build: cargo --profile $PROFILE"
    echo "- code: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- $(uname -sr), $(rustc --version), $( (haproxy -v 2>/dev/null || /usr/sbin/haproxy -v) | head -1)"
    echo
    "target/$PROFILE/gatehouse-bench" proxies --connections 32 --warmup 3 --duration 10 --rate-fraction 0.5 \
        --proxy-threads 1 --backend-threads 1 --client-threads 1 \
        --targets direct,haproxy,haproxy-jwt-rs256,haproxy-jwt-es256,gatehouse,gatehouse-api-key,gatehouse-jwt-rs256,gatehouse-jwt-es256 "$@"
} 2> >(tee "${out%.md}.log" >&2) | tee "$out"
echo "results: $out (progress and warnings: ${out%.md}.log)" >&2
