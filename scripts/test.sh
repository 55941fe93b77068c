#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this).
# Installs what it needs on a fresh machine (redis-server through apt-get);
# needs the Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."

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
