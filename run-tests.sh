#!/usr/bin/env bash
# Runs every test: native unit tests of the filter and the rate-limit service
# (with real redis-server processes), then the integration suite against real
# Envoy 1.40 with the built filter, Redis, the service and the mock provider.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
./wasm-build.sh
cargo build --release -p tollgate-ratelimit
cargo test --workspace
cargo build --bin tollgate-config-check
.venv/bin/python -m pytest integration-tests -q -p no:cacheprovider "$@"
