#!/usr/bin/env bash
# Settle decisions/s of tollgate-ratelimit with the ledger on vs off.
#
# One redis-server and the service on loopback; rls-bench drives reserve +
# settle of a five-descriptor request whose settles carry one usage row
# (x-tollgate-usage) and whose day/month budgets carry tollgate.alerts, as the
# filter sends them. The same load runs against the service started with
# `--ledger true` and `--ledger false`, alternating ROUNDS times (the machine
# is shared: alternating spreads the noise). Prints RESULT lines, among them
# `RESULT ledger_settle_ratio=<on/off>` (goal >= 0.8).
#
# Env: DURATION_S (8), CONCURRENCY (32), ROUNDS (2), REDIS_PORT (6392),
#      GRPC_PORT (8392), METRICS_PORT (9392), CARGO_TARGET_DIR.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
DURATION_S="${DURATION_S:-8}"
CONCURRENCY="${CONCURRENCY:-32}"
ROUNDS="${ROUNDS:-2}"
REDIS_PORT="${REDIS_PORT:-6392}"
GRPC_PORT="${GRPC_PORT:-8392}"
METRICS_PORT="${METRICS_PORT:-9392}"
target="${CARGO_TARGET_DIR:-$repo/target}"

echo "building (release)..." >&2
(cd "$repo" && CARGO_TARGET_DIR="$target" CARGO_PROFILE_RELEASE_LTO=false \
  CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
  cargo build --release -q -p tollgate-ratelimit --bins)
bin="$target/release"

work="$(mktemp -d)"
redis_pid=""
svc_pid=""
cleanup() {
  [ -n "$svc_pid" ] && kill "$svc_pid" 2>/dev/null && wait "$svc_pid" 2>/dev/null || true
  [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null && wait "$redis_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

if redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
  echo "port $REDIS_PORT is in use; set REDIS_PORT" >&2; exit 1
fi
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$work" >"$work/redis.log" 2>&1 &
redis_pid=$!
for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.05; done

measure() { # $1 = true|false → decisions/s
  RUST_LOG=warn "$bin/tollgate-ratelimit" --grpc-addr "127.0.0.1:$GRPC_PORT" \
    --metrics-addr "127.0.0.1:$METRICS_PORT" --redis-url "redis://127.0.0.1:$REDIS_PORT" \
    --ledger "$1" >"$work/service-$1.log" 2>&1 &
  svc_pid=$!
  sleep 0.5
  "$bin/rls-bench" run --grpc-addr "127.0.0.1:$GRPC_PORT" --concurrency "$CONCURRENCY" \
    --duration-s "$DURATION_S" --usage >"$work/out-$1" 2>&1
  kill "$svc_pid"; wait "$svc_pid" 2>/dev/null || true; svc_pid=""
  redis-cli -p "$REDIS_PORT" flushall >/dev/null
  grep -q 'service_errors=0' "$work/out-$1" || { cat "$work/out-$1" >&2; echo "errors in the run" >&2; exit 1; }
  sed -n 's/^RESULT service_decisions_per_s=//p' "$work/out-$1"
}

on_total=0; off_total=0
for r in $(seq "$ROUNDS"); do
  on=$(measure true); off=$(measure false)
  echo "round $r: ledger on $on/s, off $off/s" >&2
  on_total=$((on_total + on)); off_total=$((off_total + off))
done
echo "RESULT ledger_on_decisions_per_s=$((on_total / ROUNDS))"
echo "RESULT ledger_off_decisions_per_s=$((off_total / ROUNDS))"
python3 -c "print('RESULT ledger_settle_ratio=%.3f' % ($on_total / $off_total))"
