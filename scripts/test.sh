#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this).
# Installs what it needs on a fresh machine (redis-server through apt-get);
# needs the Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."

# A clean clone (CI) gains nothing from incremental compilation, whose files
# were 1.7 GB of a 3.9 GB target/ here; CI's disk is not large (a run once
# ran out). Set CARGO_INCREMENTAL=1 to keep it for repeated local runs.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

step() { printf '\n==> %s\n' "$*"; }

# The rate-limit tests start real redis-server processes (and redis-cli for
# a Redis Cluster); a fresh CI machine (root) gets them from Debian.
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    step "installing redis-server and redis-tools"
    apt-get update -qq && apt-get install -y -qq redis-server redis-tools
fi

step "formatting (cargo fmt --check)"
cargo fmt --all -- --check

step "lints (cargo clippy -D warnings)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "building the binaries the end-to-end tests start"
cargo build --workspace --bins --locked

step "deployment files (offline: hadolint, yamllint, compose schema, kubernetes-validate, flags)"
./scripts/check-deploy.sh

step "tests (unit, property, storage conformance, end-to-end)"
cargo test --workspace --locked

# Fuzz smoke run: every cargo-fuzz target builds and survives a short run
# (docs/security.md says how to run them for long). The toolchain is stable;
# cargo-fuzz needs nightly flags, which RUSTC_BOOTSTRAP=1 allows. A debug
# build (--dev) compiles in about half the time of an optimised one, which
# matters more here than executions per second. Set GATEHOUSE_FUZZ_SECONDS=0
# to skip, or higher for a longer run.
fuzz_seconds="${GATEHOUSE_FUZZ_SECONDS:-20}"
if [ "$fuzz_seconds" -gt 0 ]; then
    step "fuzz smoke run (${fuzz_seconds}s per target)"
    if ! cargo fuzz --help >/dev/null 2>&1; then
        cargo install cargo-fuzz --locked
    fi
    (
        cd fuzz
        export RUSTC_BOOTSTRAP=1
        cargo fuzz build --dev
        # A fresh corpus each time: libFuzzer replays a whole corpus before
        # its time limit counts, so a corpus kept from long runs would make
        # the smoke run long too.
        smoke="$(mktemp -d)"
        trap 'rm -rf "$smoke"' EXIT
        for target in $(cargo fuzz list); do
            mkdir -p "$smoke/$target"
            cargo fuzz run --dev "$target" "$smoke/$target" seeds/"$target" -- \
                -max_total_time="$fuzz_seconds" -rss_limit_mb=2048 -print_final_stats=1
        done
    )
fi
