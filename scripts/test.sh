#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this).
# Installs what it needs on a fresh machine; needs only the Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

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
