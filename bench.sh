#!/usr/bin/env bash
# Runs every benchmark, each side by side with its baseline in the same run, and
# prints `RESULT <name>=<value>` lines: the filter (bench/run.py) and the
# rate-limit service against the raw Redis ceiling (ratelimit-service/bench).
# Not part of the test command. Needs wrk (Debian) and redis-benchmark.
# BENCH_ONLY=scale runs only bench/scale.py: 10 to 100k tenants in the
# filter's configuration (throughput, CPU, memory, startup and push times).
# BENCH_ONLY=registry runs only bench/registry.py: tenants from the runtime
# registry against the same tenants in the static configuration.
# BENCH_ONLY=redis runs only bench/redis_bytes.py: Redis bytes per request by
# key kind and the steady state at 1,000 requests/s (docs/sizing.md).
# BENCH_ONLY=push runs only bench/push_memory.py: Envoy memory across
# configuration pushes and wasm VM recycles (docs/sizing.md).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
if ! command -v wrk >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi
./wasm-build.sh
cargo build --release -p tollgate-ratelimit
if [ "${BENCH_ONLY:-}" = scale ]; then
  exec .venv/bin/python bench/scale.py
fi
if [ "${BENCH_ONLY:-}" = registry ]; then
  exec .venv/bin/python bench/registry.py
fi
if [ "${BENCH_ONLY:-}" = redis ]; then
  NO_BUILD=1 exec .venv/bin/python bench/redis_bytes.py
fi
if [ "${BENCH_ONLY:-}" = push ]; then
  exec .venv/bin/python bench/push_memory.py
fi
.venv/bin/python bench/run.py
if [ "${1:-}" != "--filter-only" ]; then
  bash ratelimit-service/bench/bench.sh
fi
