#!/usr/bin/env bash
# Runs every test: formatting and lints first (cargo fmt --check; clippy with
# warnings denied, natively and for the wasm32 filter), then native unit tests
# of the filter and the rate-limit service (with real redis-server
# processes), then the integration suite against real
# Envoy 1.40 with the built filter, Redis, the service and the mock provider.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy -p tollgate --lib --target wasm32-wasip1 -- -D warnings
./wasm-build.sh
cargo build --release -p tollgate-ratelimit
cargo test --workspace
cargo build --bin tollgate-config-check
.venv/bin/python -m pytest integration-tests -q -p no:cacheprovider "$@"
