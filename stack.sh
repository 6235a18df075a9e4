#!/usr/bin/env bash
# Starts the whole demo stack on loopback and prints curl examples:
# the mock LLM provider, Redis, the rate-limit service, and Envoy 1.40 with the
# tollgate filter (envoy/demo-envoy.yaml). Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
./wasm-build.sh
cargo build --release -p tollgate-ratelimit
exec .venv/bin/python integration-tests/stack.py "$@"
