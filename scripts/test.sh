#!/usr/bin/env bash
# The README's test command (and what .ci/run calls): installs missing prerequisites,
# then runs fmt, clippy and every test (real nats-server, real binaries, real Docker).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/prereqs.sh
source scripts/prereqs.sh
keel_install_prereqs

# A clean CI build gains nothing from incremental compilation, only its overhead.
if [ "${CI:-}" = "true" ]; then export CARGO_INCREMENTAL=0; fi

started=$(date +%s)
step() { echo "==> $* ($(($(date +%s) - started)) s)"; }

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "container images (scripts/images.sh)"
scripts/images.sh

step "tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace
else
    cargo test --workspace --no-fail-fast
fi
step "done"
