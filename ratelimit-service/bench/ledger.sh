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
# Then fills the ledger with a month of rows for TENANTS tenants (one row per
# tenant and day) and times the usage report of one tenant's month and of
# every tenant's month (best of three).
#
# Env: DURATION_S (8), CONCURRENCY (32), ROUNDS (2), TENANTS (10000),
#      REDIS_PORT (6392), GRPC_PORT (8392), METRICS_PORT (9392), ADMIN_PORT (8393),
#      CARGO_TARGET_DIR.
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

# Usage reports: a month of one row per tenant and day for TENANTS tenants,
# then the time to answer one tenant's month and every tenant's month.
TENANTS="${TENANTS:-10000}"
ADMIN_PORT="${ADMIN_PORT:-8393}"
token="bench-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
TOLLGATE_ADMIN_TOKENS="bench:$token" RUST_LOG=warn "$bin/tollgate-ratelimit" \
  --grpc-addr "127.0.0.1:$GRPC_PORT" --metrics-addr "127.0.0.1:$METRICS_PORT" \
  --admin-addr "127.0.0.1:$ADMIN_PORT" --redis-url "redis://127.0.0.1:$REDIS_PORT" \
  >"$work/service-report.log" 2>&1 &
svc_pid=$!
sleep 0.5
echo "seeding a month of ledger rows for $TENANTS tenants..." >&2
"$bin/rls-bench" seed-ledger --grpc-addr "127.0.0.1:$GRPC_PORT" --tenants "$TENANTS" --days 30
from=$(date -u -d '29 days ago' +%F); to=$(date -u +%F)
report() { # $1 = query → seconds, best of 3
  best=""
  for _ in 1 2 3; do
    t=$(curl -s -o "$work/report" -w '%{time_total}' -H "authorization: Bearer $token" \
      "http://127.0.0.1:$ADMIN_PORT/v1/usage?$1")
    best=$(python3 -c "print(min(float('$t'), float('${best:-1e9}')))")
  done
  echo "$best"
}
one=$(report "tenant=tenant-7&from=$from&to=$to&group_by=day,model,key")
grep -q '"requests":300' "$work/report" || { echo "unexpected one-tenant report" >&2; head -c 400 "$work/report" >&2; exit 1; }
all=$(report "from=$from&to=$to&group_by=model")
python3 - "$work/report" "$TENANTS" <<'PY' || exit 1
import json, sys
r = json.load(open(sys.argv[1]))
assert r["totals"]["requests"] == 300 * int(sys.argv[2]), r["totals"]
PY
python3 -c "print('RESULT usage_report_one_tenant_month_ms=%.1f' % (1000 * $one))"
python3 -c "print('RESULT usage_report_all_tenants_month_ms=%.0f' % (1000 * $all))"
echo "RESULT usage_report_tenants=$TENANTS"
