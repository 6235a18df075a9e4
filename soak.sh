#!/usr/bin/env bash
# The soak test (docs/soak.md): one running stack (Envoy with the filter, the
# rate-limit service, Redis, the mock provider), 500,000 mixed requests by
# default, one service restart and one Redis restart; prints `RESULT` lines
# and exits 1 when a check fails. Not part of the test command. Arguments go
# to bench/soak.py, e.g. `./soak.sh --requests 20000`; `./soak.sh --help`.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
./wasm-build.sh
cargo build --release -p tollgate-ratelimit
export TOLLGATE_RLS_BIN="${TOLLGATE_RLS_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/release/tollgate-ratelimit}"
exec .venv/bin/python bench/soak.py "$@"
