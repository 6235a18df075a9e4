#!/usr/bin/env bash
# Benchmark of tollgate-ratelimit against the raw ceiling of the same Redis.
#
# Starts redis-server and the service on loopback, drives the service with
# rls-bench (reserve + settle of a five-descriptor LLM request, N concurrent
# clients, bounded duration), then runs redis-benchmark with the EVALSHA of the
# same Lua script with the same keys and arguments. Prints RESULT lines.
#
# Env: DURATION_S (10), CONCURRENCY (32), REDIS_BENCH_REQUESTS (200000),
#      REDIS_PORT (6391), GRPC_PORT (8391), METRICS_PORT (9391), CARGO_TARGET_DIR.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
DURATION_S="${DURATION_S:-10}"
CONCURRENCY="${CONCURRENCY:-32}"
REDIS_BENCH_REQUESTS="${REDIS_BENCH_REQUESTS:-200000}"
REDIS_PORT="${REDIS_PORT:-6391}"
GRPC_PORT="${GRPC_PORT:-8391}"
METRICS_PORT="${METRICS_PORT:-9391}"
target="${CARGO_TARGET_DIR:-$repo/target}"

# The workspace release profile uses fat LTO and one codegen unit (for the wasm
# filter); a faster-building profile is enough to measure the service.
echo "building (release)..." >&2
(cd "$repo" && CARGO_TARGET_DIR="$target" CARGO_PROFILE_RELEASE_LTO=false \
  CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
  cargo build --release -q -p tollgate-ratelimit --bins)
bin="$target/release"

work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

if redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
  echo "port $REDIS_PORT is in use; set REDIS_PORT" >&2; exit 1
fi
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$work" >"$work/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.05; done

RUST_LOG=warn "$bin/tollgate-ratelimit" --grpc-addr "127.0.0.1:$GRPC_PORT" \
  --metrics-addr "127.0.0.1:$METRICS_PORT" --redis-url "redis://127.0.0.1:$REDIS_PORT" \
  >"$work/service.log" 2>&1 &
pids+=($!)
sleep 0.5

echo "service: $CONCURRENCY clients for ${DURATION_S}s..." >&2
"$bin/rls-bench" run --grpc-addr "127.0.0.1:$GRPC_PORT" --concurrency "$CONCURRENCY" \
  --duration-s "$DURATION_S" | tee "$work/service.out"

echo "redis-benchmark: EVALSHA of the same script, $CONCURRENCY clients..." >&2
# -x passes the file byte for byte ($(...) would strip the final newline and change the SHA)
"$bin/rls-bench" script >"$work/decide.lua"
sha="$(redis-cli -p "$REDIS_PORT" -x SCRIPT LOAD <"$work/decide.lua")"
mapfile -t args < <("$bin/rls-bench" evalsha-args)
if [ "$sha" != "${args[0]}" ]; then
  echo "SCRIPT LOAD returned $sha, expected ${args[0]}" >&2; exit 1
fi
redis-cli -p "$REDIS_PORT" CONFIG RESETSTAT >/dev/null
redis-benchmark -p "$REDIS_PORT" -c "$CONCURRENCY" -n "$REDIS_BENCH_REQUESTS" --csv \
  EVALSHA "${args[@]}" >"$work/redis.csv"
# every EVALSHA must have succeeded, or the ceiling measured error replies
failed="$(redis-cli -p "$REDIS_PORT" INFO commandstats | sed -n 's/^cmdstat_evalsha:.*failed_calls=\([0-9]*\).*/\1/p')"
usec="$(redis-cli -p "$REDIS_PORT" INFO commandstats | sed -n 's/^cmdstat_evalsha:.*usec_per_call=\([0-9.]*\).*/\1/p')"
echo "RESULT redis_evalsha_failed_calls=${failed:-0}"
echo "RESULT redis_evalsha_cpu_usec_per_call=${usec:-0}"
if [ "${failed:-0}" != "0" ]; then echo "redis-benchmark EVALSHA calls failed" >&2; exit 1; fi
redis_rps="$(tail -n 1 "$work/redis.csv" | awk -F'","' '{print $2}')"
redis_p50="$(tail -n 1 "$work/redis.csv" | awk -F'","' '{print $5}')"
redis_p99="$(tail -n 1 "$work/redis.csv" | awk -F'","' '{print $7}')"
echo "RESULT redis_evalsha_per_s=${redis_rps%.*}"
echo "RESULT redis_evalsha_p50_ms=$redis_p50"
echo "RESULT redis_evalsha_p99_ms=$redis_p99"
service_rps="$(sed -n 's/^RESULT service_decisions_per_s=//p' "$work/service.out")"
awk -v s="$service_rps" -v r="$redis_rps" 'BEGIN { printf "RESULT service_vs_redis_ceiling=%.2f\n", s / r }'

# Four levels per request (tenant, key, user, pool and the tier's share:
# nine descriptors instead of five), against the same ceiling.
echo "service: four levels, $CONCURRENCY clients for ${DURATION_S}s..." >&2
"$bin/rls-bench" run --grpc-addr "127.0.0.1:$GRPC_PORT" --concurrency "$CONCURRENCY" \
  --duration-s "$DURATION_S" --levels 4 | sed 's/^RESULT service_/RESULT service_levels4_/' | tee "$work/levels4.out"
levels4_rps="$(sed -n 's/^RESULT service_levels4_decisions_per_s=//p' "$work/levels4.out")"
awk -v s="$levels4_rps" -v r="$redis_rps" 'BEGIN { printf "RESULT service_levels4_vs_redis_ceiling=%.2f\n", s / r }'
awk -v s="$levels4_rps" -v o="$service_rps" 'BEGIN { printf "RESULT service_levels4_vs_levels1=%.2f\n", s / o }'
