#!/usr/bin/env bash
# The project's test command: format, lints, release build, tests (guest tests included when the guest is
# built; under CI=true they fail instead of skipping without it).
#
# Usage: ci/test.sh [extra cargo test args...]      e.g. ci/test.sh -- --test-threads=1
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

t_all=$(date +%s.%N)
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
run() { # run LABEL CMD...
    local label=$1 t; shift
    echo "[test] $label: $*"
    t=$(date +%s.%N)
    "$@"
    echo "[test] $label ok ($(elapsed "$t") s)"
}

# Tests build the release binary themselves; line tables only, to keep the build quick.
export CARGO_PROFILE_RELEASE_DEBUG=${CARGO_PROFILE_RELEASE_DEBUG:-0}

run fmt cargo fmt --all --check
run clippy cargo clippy --workspace --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" run doc cargo doc --workspace --no-deps --quiet
run fuzz-targets cargo check --manifest-path fuzz/Cargo.toml --quiet
run test cargo test --workspace --release "$@"
echo "[test] all ok ($(elapsed "$t_all") s)"
