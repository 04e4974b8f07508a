#!/usr/bin/env bash
# The worker benchmark on the binary as shipped: `cargo build --release` (the link order of
# packaging/link-order.txt, no dev-dependency features), copied aside because `cargo bench`
# rebuilds target/release/hydraflow with the dev-dependencies' features, then measured by
# benches/worker.rs.
#
# usage: bench/worker.sh [-- BENCH OPTIONS]   e.g. bench/worker.sh -- --quick
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --release --quiet
shipped=$(mktemp -d)
trap 'rm -rf "$shipped"' EXIT
cp "$CARGO_TARGET_DIR/release/hydraflow" "$shipped/hydraflow"
[ "${1:-}" = "--" ] && shift
HYDRAFLOW_BENCH_BIN=$shipped/hydraflow cargo bench --bench worker -- "$@"
