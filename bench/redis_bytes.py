"""Redis memory per request of the rate-limit service (issue 14): how many
bytes each request leaves in Redis, by key kind, and what that makes in
steady state at 1,000 requests/s.

Runs a real redis-server and the real service (`tollgate-ratelimit`, release
build) on loopback and drives them with the service's own load tool,
`rls-bench run --filter-keys`: each request is a reserve keyed
`<request id>:r1` and a settle keyed `<request id>:settle`, with an
Envoy-style UUID request id, over TENANTS tenants in turn (so, as the filter
does for tenants below a request per 50 ms tick, one settle per request).

Phases, each on a fresh Redis:

1. `idempotency`: REQUESTS requests after a warm-up (every tenant's counters
   exist: their bytes per key are printed too; they grow with tenants and
   limits, not with requests), then `used_memory` before and after: bytes per request in all.
   Then every idempotency key of one kind is deleted and the drop in
   `used_memory` is that kind's bytes per key (the key, its value, its
   entries in the main and the expires dict; the dicts' bucket arrays do not
   shrink on delete, so they stay in the remainder).
2. `steady`: the service with both idempotency TTLs at STEADY_TTL_S seconds,
   load for STEADY_S seconds: the idempotency keys and `used_memory` level
   off at rate x TTL keys (plus the keys expired and not yet collected:
   Redis expires keys lazily and in a background cycle); printed as live
   keys over rate x TTL and bytes per live key at the plateau.
3. `ledger`: settles carrying one usage row each (`--usage`) of
   LEDGER_TENANTS tenants (long streams, as in steady state), with the
   usage stream on (`--usage-stream-max-len 1000000`): bytes per row of the
   usage streams (`tg:<tag>:usage`) and the size of the day aggregates
   (`tg:<tag>:led:<day>`, bounded by tenant x key x model x day, not by
   requests).

4. `filter` (needs build/tollgate.wasm and wrk): the real filter in Envoy
   (one worker) in front of the service, wrk for FILTER_S seconds at 32
   connections, then the idempotency keys per request: `one_tenant` (one
   busy tenant, leases sized automatically as by default) and
   `1k_tenants` (the keys of 1,000 tenants in turn, the issue's soak shape:
   each tenant far below a request per 50 ms tick).

Prints `RESULT` lines; `redis_bytes_per_request_1k_rps_steady_mb` is the
steady-state memory of the idempotency keys at 1,000 requests/s with the
service's default TTLs (rate x TTL x bytes per key, per kind, summed).

Usage: `.venv/bin/python bench/redis_bytes.py` (builds the release binaries
into CARGO_TARGET_DIR, or `target/`). Env: REQUESTS (20000), TENANTS (1000),
CONCURRENCY (16), LEDGER_TENANTS (20), STEADY_TTL_S (10), FILTER_S (8), STEADY_S (30), REDIS_PORT (6394),
GRPC_PORT (8394), METRICS_PORT (9394), NO_BUILD=1 to skip the build.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
BIN = os.path.join(TARGET, "release")
REQUESTS = int(os.environ.get("REQUESTS", "20000"))
TENANTS = int(os.environ.get("TENANTS", "1000"))
CONCURRENCY = int(os.environ.get("CONCURRENCY", "16"))
STEADY_TTL_S = int(os.environ.get("STEADY_TTL_S", "10"))
STEADY_S = int(os.environ.get("STEADY_S", "30"))
REDIS_PORT = int(os.environ.get("REDIS_PORT", "6394"))
GRPC_PORT = int(os.environ.get("GRPC_PORT", "8394"))
METRICS_PORT = int(os.environ.get("METRICS_PORT", "9394"))
LEDGER_TENANTS = int(os.environ.get("LEDGER_TENANTS", "20"))
FILTER_S = int(os.environ.get("FILTER_S", "8"))

# The idempotency key kinds, as the service names them in Redis, and the
# service's flag for each one's TTL.
KINDS = {
    "reserve": (re.compile(r":idem:reserve:|:i:r:"), "--reserve-idempotency-ttl-s"),
    "settle": (re.compile(r":idem:settle:|:i:s:"), "--idempotency-ttl-s"),
}


def result(name, value):
    print(f"RESULT {name}={value}", flush=True)


def cli(*args):
    out = subprocess.run(
        ["redis-cli", "-p", str(REDIS_PORT), *map(str, args)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout


def info_memory():
    fields = dict(
        line.split(":", 1) for line in cli("info", "memory").splitlines() if ":" in line
    )
    return int(fields["used_memory"])


def scan(pattern):
    out = cli("--scan", "--pattern", pattern)
    return [k for k in out.splitlines() if k]


def delete(keys):
    for i in range(0, len(keys), 500):
        cli("del", *keys[i : i + 500])


def default_ttls():
    """The service's default TTL of each kind, read from its --help."""
    text = subprocess.run(
        [os.path.join(BIN, "tollgate-ratelimit"), "--help"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    ttls = {}
    for kind, (_, flag) in KINDS.items():
        m = re.search(re.escape(flag) + r"[^\[]*\[env: [^\]]*\]\s*\[default: (\d+)\]", text, re.S)
        if not m:
            raise SystemExit(f"no default for {flag} in --help")
        ttls[kind] = int(m.group(1))
    return ttls


class Stack:
    def __init__(self, extra_flags=()):
        self.dir = tempfile.mkdtemp(prefix="redis-bytes-")
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            try:
                cli("ping")
                break
            except subprocess.CalledProcessError:
                time.sleep(0.05)
        env = dict(os.environ, RUST_LOG="warn")
        self.svc = subprocess.Popen(
            [os.path.join(BIN, "tollgate-ratelimit"),
             "--grpc-addr", f"127.0.0.1:{GRPC_PORT}",
             "--metrics-addr", f"127.0.0.1:{METRICS_PORT}",
             "--redis-url", f"redis://127.0.0.1:{REDIS_PORT}", *extra_flags],
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self.dir, "service.log"), "w"),
            env=env,
        )
        time.sleep(0.7)

    def load(self, requests=0, duration_s=10, usage=False, tenants=TENANTS):
        args = [os.path.join(BIN, "rls-bench"), "run", "--grpc-addr", f"127.0.0.1:{GRPC_PORT}",
                "--concurrency", str(CONCURRENCY), "--tenants", str(tenants), "--filter-keys",
                "--requests", str(requests), "--duration-s", str(duration_s)]
        if usage:
            args.append("--usage")
        out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
        errors = int(re.search(r"service_errors=(\d+)", out).group(1))
        if errors:
            raise SystemExit(f"rls-bench: {errors} errors\n{out}")
        return out

    def load_async(self, duration_s):
        return subprocess.Popen(
            [os.path.join(BIN, "rls-bench"), "run", "--grpc-addr", f"127.0.0.1:{GRPC_PORT}",
             "--concurrency", str(CONCURRENCY), "--tenants", str(TENANTS), "--filter-keys",
             "--duration-s", str(duration_s)],
            stdout=subprocess.PIPE,
            text=True,
        )

    def close(self):
        for p in (self.svc, self.redis):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def keys_of(kind):
    rx = KINDS[kind][0]
    return [k for k in scan("tg:*") if rx.search(k)]


def phase_idempotency(ttls):
    s = Stack()
    try:
        empty, empty_keys = info_memory(), int(cli("dbsize"))
        s.load(requests=TENANTS)  # every tenant's counters exist
        for kind in KINDS:  # the warm-up's own keys
            delete(keys_of(kind))
        before = info_memory()
        counters = int(cli("dbsize")) - empty_keys
        # rate and calendar counters: per tenant and limit, not per request
        result("redis_counter_keys_per_tenant", f"{counters / TENANTS:.1f}")
        result("redis_counter_bytes_per_key", f"{(before - empty) / max(1, counters):.1f}")
        s.load(requests=REQUESTS)
        after = info_memory()
        counts = {}
        total = (after - before) / REQUESTS
        result("redis_bytes_per_request_total", f"{total:.1f}")
        per_key = {}
        for kind in KINDS:
            keys = keys_of(kind)
            counts[kind] = len(keys)
            sample = keys[0] if keys else ""
            m0 = info_memory()
            delete(keys)
            per_key[kind] = (m0 - info_memory()) / max(1, len(keys))
            result(f"redis_{kind}_keys_per_request", f"{len(keys) / REQUESTS:.3f}")
            result(f"redis_{kind}_bytes_per_key", f"{per_key[kind]:.1f}")
            result(f"redis_{kind}_key_length", len(sample))
            print(f"# {kind} key, e.g. {sample}", flush=True)
        rest = total - sum(per_key[k] * counts[k] / REQUESTS for k in KINDS)
        result("redis_bytes_per_request_dict_buckets_and_rest", f"{rest:.1f}")
        # steady state at 1k rps, default TTLs: each kind's live keys are
        # rate x keys per request x TTL; the bucket arrays grow with them
        steady = 0.0
        for kind in KINDS:
            share = counts[kind] / REQUESTS
            keys_live = 1000 * share * ttls[kind]
            bytes_live = keys_live * (per_key[kind] + rest / max(1e-9, sum(counts.values()) / REQUESTS))
            result(f"redis_{kind}_ttl_s", ttls[kind])
            result(f"redis_{kind}_1k_rps_steady_mb", f"{bytes_live / 2**20:.1f}")
            steady += bytes_live
        result("redis_bytes_per_request_1k_rps_steady_mb", f"{steady / 2**20:.1f}")
        return per_key
    finally:
        s.close()


def phase_steady():
    flags = [f for _, (_, flag) in KINDS.items() for f in (flag, str(STEADY_TTL_S))]
    s = Stack(flags)
    try:
        s.load(requests=TENANTS)
        for kind in KINDS:
            delete(keys_of(kind))
        base = info_memory()
        base_keys = int(cli("dbsize"))
        started = time.time()
        p = s.load_async(STEADY_S)
        samples = []
        while p.poll() is None:
            time.sleep(2)
            t = time.time() - started
            if t > STEADY_S:
                break
            live = int(cli("dbsize")) - base_keys
            samples.append((t, live, info_memory() - base))
        out = p.communicate()[0]
        rate = float(re.search(r"service_decisions_per_s=(\d+)", out).group(1)) / 2
        plateau = [x for x in samples if x[0] > STEADY_TTL_S * 1.5]
        if not plateau:
            raise SystemExit("steady: no sample after 1.5 TTL; raise STEADY_S")
        live = sum(x[1] for x in plateau) / len(plateau)
        mem = sum(x[2] for x in plateau) / len(plateau)
        for t, n, m in samples:
            print(f"# steady t={t:.0f}s live_idempotency_keys={n} used_memory_delta={m}", flush=True)
        result("redis_steady_requests_per_s", f"{rate:.0f}")
        result("redis_steady_ttl_s", STEADY_TTL_S)
        result("redis_steady_live_keys", f"{live:.0f}")
        result("redis_steady_live_keys_per_rate_ttl", f"{live / (rate * STEADY_TTL_S):.2f}")
        result("redis_steady_bytes_per_live_key", f"{mem / max(1, live):.1f}")
    finally:
        s.close()


def phase_ledger():
    s = Stack(["--usage-stream-max-len", "1000000"])
    try:
        s.load(requests=LEDGER_TENANTS, usage=True, tenants=LEDGER_TENANTS)
        before = info_memory()
        streams_before = sum(int(cli("xlen", k)) for k in scan("tg:*:usage"))
        led = scan("tg:*:led:*")
        led_before = sum(int(cli("memory", "usage", k) or 0) for k in led if not k.endswith(":days"))
        s.load(requests=REQUESTS, usage=True, tenants=LEDGER_TENANTS)
        after = info_memory()
        streams = scan("tg:*:usage")
        entries = sum(int(cli("xlen", k)) for k in streams) - streams_before
        stream_bytes = sum(int(cli("memory", "usage", k, "samples", "0")) for k in streams)
        led = [k for k in scan("tg:*:led:*") if not k.endswith(":days")]
        led_bytes = sum(int(cli("memory", "usage", k) or 0) for k in led)
        # the usage streams alone: delete them and see the drop
        m0 = info_memory()
        delete(streams)
        stream_drop = m0 - info_memory()
        result("ledger_usage_stream_entries_per_request", f"{entries / REQUESTS:.3f}")
        result("ledger_usage_stream_bytes_per_row", f"{stream_drop / max(1, entries + streams_before):.1f}")
        result("ledger_usage_stream_memory_usage_bytes_per_row", f"{stream_bytes / max(1, entries + streams_before):.1f}")
        result("ledger_day_aggregate_keys", len(led))
        result("ledger_day_aggregate_bytes_per_key", f"{led_bytes / max(1, len(led)):.0f}")
        result("ledger_day_aggregate_growth_bytes", led_bytes - led_before)
        result("ledger_bytes_per_request_all_keys", f"{(after - before) / REQUESTS:.1f}")
    finally:
        s.close()


def phase_filter():
    sys.path.insert(0, os.path.join(REPO, "bench"))
    sys.path.insert(0, os.path.join(REPO, "integration-tests"))
    os.environ.setdefault("TOLLGATE_RLS_BIN", os.path.join(BIN, "tollgate-ratelimit"))
    import harness  # noqa: E402
    import run  # noqa: E402  (bench/run.py: the upstream, wrk)
    import scale_config as sc  # noqa: E402

    procs = []
    try:
        up, up_port = run.fast_upstream()
        procs.append(up)
        redis = harness.Redis(logdir=run.LOGDIR)
        procs.append(redis)
        rls = harness.RateLimitService(redis.port, logdir=run.LOGDIR, redis_timeout_ms=500)
        procs.append(rls)

        def rcli(*args):
            return subprocess.run(["redis-cli", "-p", str(redis.port), *map(str, args)], check=True,
                                  capture_output=True, text=True).stdout

        for name, tenants in (("one_tenant", 1), ("1k_tenants", 1000)):
            cfg = harness.envoy_config(
                harness.free_port(), harness.free_port(), up_port,
                [harness.wasm_filter(sc.config(tenants), env_keys=sorted(sc.SCALE_ENV))],
                extra_clusters=[harness.grpc_cluster("tollgate_rls", rls.port)])
            port = cfg["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
            e = harness.Envoy(cfg, env=sc.SCALE_ENV, logdir=tempfile.mkdtemp(dir=run.LOGDIR), concurrency=1)
            procs.append(e)
            keys = os.path.join(run.LOGDIR, "%s.keys" % name)
            with open(keys, "w") as f:
                f.write("\n".join(sc.key(i) for i in range(tenants)) + "\n")
            run.wrk(port, run.lua_script({}, tokens_file=keys), 4, 1)  # warm up
            time.sleep(2)
            rcli("flushall")
            load = run.wrk(port, run.lua_script({}, tokens_file=keys), 32, FILTER_S)
            time.sleep(3)  # leases given back, settles sent
            if load["non2xx"]:
                raise SystemExit("filter %s: %d non-2xx answers" % (name, load["non2xx"]))
            all_keys = [k for k in rcli("--scan", "--pattern", "tg:*").splitlines() if k]
            for kind, (rx, _) in KINDS.items():
                n = sum(1 for k in all_keys if rx.search(k))
                result(f"filter_{name}_{kind}_keys_per_request", f"{n / max(1, load['requests']):.3f}")
            result(f"filter_{name}_requests", load["requests"])
            e.stop()
            procs.remove(e)
    finally:
        for p in procs:
            p.stop()


def main():
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not on PATH")
    if not os.environ.get("NO_BUILD"):
        subprocess.run(
            ["cargo", "build", "--release", "-q", "-p", "tollgate-ratelimit", "--bins"],
            check=True,
            cwd=REPO,
            env=dict(os.environ, CARGO_PROFILE_RELEASE_LTO="false", CARGO_PROFILE_RELEASE_CODEGEN_UNITS="16"),
        )
    only = set(sys.argv[1:]) or {"idempotency", "steady", "ledger", "filter"}
    ttls = default_ttls()
    if "idempotency" in only:
        phase_idempotency(ttls)
    if "steady" in only:
        phase_steady()
    if "ledger" in only:
        phase_ledger()
    if "filter" in only:
        if shutil.which("wrk") and os.path.exists(os.path.join(REPO, "build", "tollgate.wasm")):
            phase_filter()
        else:
            print("# filter phase skipped: needs wrk and build/tollgate.wasm (./wasm-build.sh)", flush=True)


if __name__ == "__main__":
    main()
