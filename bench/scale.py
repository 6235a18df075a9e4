"""tollgate with many tenants in its configuration (issue 14): does the size
of the tenant list cost throughput, CPU, memory, startup or push time?

Run with `BENCH_ONLY=scale ./bench.sh` (builds first), or directly with
`.venv/bin/python bench/scale.py` after building. Prints `RESULT` lines:

- `tenants_<N>_rps`, `tenants_<N>_cpu_us_per_req_envoy`: one Envoy worker
  per configuration (N = 10, 1k, 10k, 100k tenants, all running at once,
  measured in interleaved slices as bench/run.py does), traffic from 1,000
  tenants drawn at random from the whole list (wrk, a Lua script rotating
  their keys), the rate-limit service and Redis behind every request.
  `tenants_100k_vs_10_rps` is the median of the per-round ratios.
- `tenants_last_vs_first_cpu`: at N = 100k, Envoy CPU per request for the
  keys of the last 1,000 tenants over the first 1,000 (interleaved rounds).
- `tenants_<N>_startup_s`: Envoy start to ready, each started alone.
- `tenants_100k_push_s`: an LDS push adding one tenant, until its key is
  served; `tenants_100k_slowest_request_during_push_ms` (and before it):
  one client of an existing tenant, request after request, during the push.
- `tenants_<N>_rss_ready_mb`, `tenants_<N>_rss_mb` and
  `wasm_bytes_per_tenant_rss`: Envoy's resident memory when ready and after
  the load; Envoy has no stat for a wasm VM's memory (V8's linear memory is
  outside tcmalloc, so server.memory_allocated misses it), so the
  per-tenant figure is the difference of the ready RSS (no stats series
  yet) between N = 100k and N = 10 over the tenant difference. It counts every copy: the main
  thread's VM and the worker's VM (two plugin instances at one worker) and
  Envoy's own copies of the configuration text.
- `tenants_<N>_stats_series_per_active_tenant`: wasmcustom.tollgate.* stats
  over the 1,000 active tenants (per tenant label up to 1,000 tenants in
  the config, by tier above).
"""

import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration-tests"))

import harness  # noqa: E402
import run  # noqa: E402  (bench/run.py: RESULT, wrk, CPU helpers)
import scale_config as sc  # noqa: E402

SIZES = [int(s) for s in os.environ.get("BENCH_SCALE_SIZES", "10,1000,10000,100000").split(",")]
ACTIVE = 1000
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
DURATION = run.DURATION
CONNECTIONS = run.CONNECTIONS
result = run.result


def label(n):
    return {10: "10", 1000: "1k", 10_000: "10k", 100_000: "100k"}.get(n, str(n))


def rss_mb(pid):
    for line in open("/proc/%d/status" % pid):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def keys_file(indices):
    path = tempfile.mktemp(suffix=".keys", dir=run.LOGDIR)
    with open(path, "w") as f:
        f.write("\n".join(sc.key(i) for i in indices) + "\n")
    return path


def start(n, up_port, rls_port, lds=False):
    port, admin = harness.free_port(), harness.free_port()

    def listeners(extra_tenants=()):
        plugin = sc.config(n, extra_tenants=extra_tenants)
        cfg = harness.envoy_config(port, admin, up_port,
                                   [harness.wasm_filter(plugin, env_keys=sorted(sc.SCALE_ENV))],
                                   extra_clusters=[harness.grpc_cluster("tollgate_rls", rls_port)],
                                   stats_tags=harness.STATS_TAGS)
        return cfg, cfg["static_resources"]["listeners"]

    cfg, _ = listeners()
    t0 = time.perf_counter()
    e = harness.Envoy(cfg, env=sc.SCALE_ENV, logdir=tempfile.mkdtemp(dir=run.LOGDIR), concurrency=1, lds=lds,
                      expect_failure=True)
    e._wait_ready(timeout=300)
    result("tenants_%s_startup_s" % label(n), "%.2f" % (time.perf_counter() - t0))
    e.listeners = listeners
    e.rss_ready_mb = rss_mb(e.proc.pid)
    result("tenants_%s_rss_ready_mb" % label(n), "%.1f" % e.rss_ready_mb)
    return e


class Slot:
    def __init__(self, name, envoy, script):
        self.name, self.envoy, self.script = name, envoy, script
        self.rps, self.cpu, self.non2xx = [], [], 0


def rounds(slots):
    for s in slots:
        run.wrk(s.envoy.port, s.script, 4, 2)  # warm up
    for i in range(ROUNDS):
        for s in (slots if i % 2 == 0 else slots[::-1]):
            before = run.cpu_seconds(s.envoy.proc.pid)
            load = run.wrk(s.envoy.port, s.script, CONNECTIONS, DURATION)
            s.cpu.append((run.cpu_seconds(s.envoy.proc.pid) - before) / max(1, load["requests"]) * 1e6)
            s.rps.append(load["rps"])
            s.non2xx += load["non2xx"]
            if load["non2xx"]:
                print("# %s: %d non-2xx:\n%s" % (s.name, load["non2xx"], load["raw"]), file=sys.stderr)


def main():
    procs, envoys = [], {}
    rng = random.Random(14)
    try:
        up, up_port = run.fast_upstream()
        procs.append(up)
        redis = harness.Redis(logdir=run.LOGDIR)
        procs.append(redis)
        rls = harness.RateLimitService(redis.port, logdir=run.LOGDIR, redis_timeout_ms=500)
        procs.append(rls)
        for n in SIZES:
            envoys[n] = start(n, up_port, rls.port, lds=(n == max(SIZES)))
            procs.append(envoys[n])
        slots = []
        for n in SIZES:
            active = sorted(rng.sample(range(n), min(ACTIVE, n)))
            script = run.lua_script({}, tokens_file=keys_file(active))
            slots.append(Slot(label(n), envoys[n], script))
        rounds(slots)
        by = {s.name: s for s in slots}
        for s in slots:
            result("tenants_%s_rps" % s.name, "%.0f" % statistics.median(s.rps))
            result("tenants_%s_cpu_us_per_req_envoy" % s.name, "%.1f" % statistics.median(s.cpu))
            result("tenants_%s_non2xx" % s.name, s.non2xx)
        big, small = label(max(SIZES)), label(min(SIZES))
        per_round = [a / b for a, b in zip(by[big].rps, by[small].rps)]
        result("tenants_%s_vs_%s_rps" % (big, small), "%.3f" % statistics.median(per_round))
        result("tenants_%s_vs_%s_rps_range" % (big, small), "%.3f-%.3f" % (min(per_round), max(per_round)))

        # Memory and stats series after the load.
        for n in SIZES:
            e = envoys[n]
            result("tenants_%s_rss_mb" % label(n), "%.1f" % rss_mb(e.proc.pid))
            names = [l.rpartition(": ")[0] for l in e.admin("/stats").splitlines()]
            tg = [x for x in names if x.startswith("wasmcustom.tollgate.")]
            result("tenants_%s_stats_series_per_active_tenant" % label(n), "%.3f" % (len(tg) / min(ACTIVE, n)))
            result("tenants_%s_tollgate_stats" % label(n), len(tg))
        hi, lo = max(SIZES), min(SIZES)
        # Ready, before any traffic: no stats series yet, only the configs.
        result("wasm_bytes_per_tenant_rss", "%.0f" % ((envoys[hi].rss_ready_mb - envoys[lo].rss_ready_mb)
                                                      * 1024 * 1024 / (hi - lo)))
        wasm_stats = {k: v for k, v in envoys[hi].stats("wasm").items() if "memory" in k or "heap" in k}
        if wasm_stats:
            print("# wasm memory stats at %d tenants: %s" % (hi, wasm_stats))

        # First vs last 1,000 tenants of the biggest list.
        e = envoys[hi]
        first = Slot("first", e, run.lua_script({}, tokens_file=keys_file(range(ACTIVE))))
        last = Slot("last", e, run.lua_script({}, tokens_file=keys_file(range(hi - ACTIVE, hi))))
        rounds([first, last])
        per_round = [a / b for a, b in zip(last.cpu, first.cpu)]
        result("tenants_%s_first_cpu_us_per_req_envoy" % big, "%.1f" % statistics.median(first.cpu))
        result("tenants_%s_last_cpu_us_per_req_envoy" % big, "%.1f" % statistics.median(last.cpu))
        result("tenants_last_vs_first_cpu", "%.3f" % statistics.median(per_round))
        result("tenants_last_vs_first_cpu_range", "%.3f-%.3f" % (min(per_round), max(per_round)))

        # A push adding one tenant to the biggest list.
        pushed = e.listeners(extra_tenants=[hi])[1]
        # One client of an existing tenant, request after request: its slowest
        # answer during the push is how long the worker stalled.
        lat, stop = [], threading.Event()

        def client():
            while not stop.is_set():
                s0 = time.perf_counter()
                st = harness.request(e.port, "/v1/chat/completions", sc.CHAT,
                                     {"authorization": "Bearer " + sc.key(hi - 1)}).status
                lat.append((time.perf_counter() - s0, st))

        th = threading.Thread(target=client)
        th.start()
        time.sleep(2)
        quiet = len(lat)
        t0 = time.perf_counter()
        e.update_listeners(pushed)  # writes the LDS file, then renames it
        deadline = time.time() + 300
        while time.time() < deadline:
            r = harness.request(e.port, "/v1/chat/completions", sc.CHAT, {"authorization": "Bearer " + sc.key(hi)})
            if r.status == 200:
                break
            time.sleep(0.05)
        result("tenants_%s_push_s" % big, "%.2f" % (time.perf_counter() - t0) if r.status == 200 else "timeout")
        time.sleep(2)
        stop.set()
        th.join()
        result("tenants_%s_slowest_request_before_push_ms" % big, "%.0f" % (max(l for l, _ in lat[:quiet]) * 1000))
        result("tenants_%s_slowest_request_during_push_ms" % big, "%.0f" % (max(l for l, _ in lat[quiet:]) * 1000))
        result("tenants_%s_non200_during_push" % big, sum(1 for _, st in lat[quiet:] if st != 200))
    finally:
        for p in reversed(procs):
            p.stop()


if __name__ == "__main__":
    main()
