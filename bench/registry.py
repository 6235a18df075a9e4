"""Tenants from the runtime registry (issue 15): what do they cost next to
the same tenants in the static configuration?

Run with `BENCH_ONLY=registry ./bench.sh` (builds first), or directly with
`.venv/bin/python bench/registry.py` after building. Prints `RESULT` lines:

- `registry_vs_static_rps` (goal >= 0.97) and `registry_vs_static_cpu`:
  two Envoys (one worker each) side by side, one with ACTIVE tenants in its
  plugin configuration, the other knowing none of them and resolving every
  key through the registry (caches warm), both labelling metrics by tier,
  measured in interleaved rounds with wrk rotating the tenants' keys;
  medians of the per-round ratios.
- `registry_first_request_added_ms` (median) and `..._p90_ms`: the first
  request of a key no worker has seen, less the second request of the same
  key (the lookup's round trip through Envoy, the service and Redis).
- `registry_lookups_per_s` and `registry_lookup_cpu_us_service`,
  `..._redis`: wrk straight at the service's registry port, key lookups with
  credentials over many keys (what a cold gateway fleet asks), and the CPU
  per lookup of the service and of Redis.
- `redis_bytes_per_tenant_<N>` and `redis_bytes_per_key_<N>`: Redis
  `used_memory` growth per tenant and per key as the registry grows
  (tenants: BENCH_REGISTRY_TENANTS, default 10k,100k; keys:
  BENCH_REGISTRY_KEYS, default 100k,1M, spread over the tenants), created
  through the admin API (keys imported by digest).
- `filter_bytes_per_cached_key`: Envoy RSS growth per key after one worker
  resolved BENCH_REGISTRY_CACHED keys (default 20k) of distinct tenants: the
  worker's key and tenant caches and the shared key records.
"""

import base64
import http.client
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration-tests"))

import harness  # noqa: E402
import run  # noqa: E402  (bench/run.py: RESULT, wrk, CPU helpers)
import scale_config as sc  # noqa: E402

ACTIVE = int(os.environ.get("BENCH_REGISTRY_ACTIVE", "1000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "6"))
TENANT_STEPS = [int(s) for s in os.environ.get("BENCH_REGISTRY_TENANTS", "10000,100000").split(",")]
KEY_STEPS = [int(s) for s in os.environ.get("BENCH_REGISTRY_KEYS", "100000,1000000").split(",")]
CACHED = int(os.environ.get("BENCH_REGISTRY_CACHED", "20000"))
TOKEN = "bench-admin-token-0123456789abcdef"
KEK = "k1:" + base64.b64encode(b"\x07" * 32).decode()
result = run.result


def rss_mb(pid):
    for line in open("/proc/%d/status" % pid):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Service:
    def __init__(self, redis_port):
        self.port, self.metrics_port = harness.free_port(), harness.free_port()
        self.registry_port, self.admin_port = harness.free_port(), harness.free_port()
        self.proc = harness.Proc(
            "rls-registry", [harness.RLS_BIN, "--grpc-addr", "127.0.0.1:%d" % self.port,
                             "--metrics-addr", "127.0.0.1:%d" % self.metrics_port,
                             "--registry-addr", "127.0.0.1:%d" % self.registry_port,
                             "--admin-addr", "127.0.0.1:%d" % self.admin_port,
                             "--redis-url", "redis://127.0.0.1:%d" % redis_port, "--redis-timeout-ms", "1000"],
            env={"TOLLGATE_ADMIN_TOKENS": "bench:" + TOKEN, "TOLLGATE_KEK": KEK}, logdir=run.LOGDIR)
        harness.wait_port(self.admin_port, proc=self.proc.proc)
        harness.wait_port(self.registry_port, proc=self.proc.proc)
        self.local = threading.local()

    def admin(self, method, path, body=None):
        c = getattr(self.local, "conn", None)
        if c is None:
            c = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=30)
        c.request(method, path, body=json.dumps(body) if body is not None else None,
                  headers={"content-type": "application/json", "authorization": "Bearer " + TOKEN})
        r = c.getresponse()
        data = r.read()
        if r.status >= 300 and r.status != 409:
            raise RuntimeError("%s %s: %d %s" % (method, path, r.status, data[:300]))
        return r.status

    def stop(self):
        self.proc.stop()


def parallel(fn, items, workers=16):
    with ThreadPoolExecutor(max_workers=workers) as ex:
        for _ in ex.map(fn, items):
            pass


def create_tenants(svc, indices, credential=True):
    def one(i):
        svc.admin("POST", "/v1/tenants", {"id": sc.tenant_id(i), "tier": sc.tier_of(i)})
        if credential:
            svc.admin("PUT", "/v1/tenants/%s/credentials/openai" % sc.tenant_id(i),
                      {"secret": sc.SCALE_ENV["SCALE_OPENAI_KEY"]})
    parallel(one, indices)


def import_keys(svc, pairs):
    """pairs: (tenant index, key text)."""
    def one(p):
        i, k = p
        svc.admin("POST", "/v1/tenants/%s/keys/import" % sc.tenant_id(i),
                  {"sha256": harness.sha256_hex(k), "label": "bench"})
    parallel(one, pairs)


def envoy(plugin, up_port, svc):
    port, admin = harness.free_port(), harness.free_port()
    cfg = harness.envoy_config(
        port, admin, up_port, [harness.wasm_filter(plugin, env_keys=sorted(sc.SCALE_ENV))],
        extra_clusters=[harness.grpc_cluster("tollgate_rls", svc.port),
                        {"name": "tollgate_registry", "type": "STATIC", "connect_timeout": "0.5s",
                         "load_assignment": {"cluster_name": "tollgate_registry", "endpoints": [{"lb_endpoints": [
                             {"endpoint": {"address": {"socket_address": {
                                 "address": "127.0.0.1", "port_value": svc.registry_port}}}}]}]}}],
        stats_tags=harness.STATS_TAGS)
    e = harness.Envoy(cfg, env=sc.SCALE_ENV, logdir=tempfile.mkdtemp(dir=run.LOGDIR), concurrency=1)
    e.port = port
    return e


def keys_file(keys):
    path = tempfile.mktemp(suffix=".keys", dir=run.LOGDIR)
    with open(path, "w") as f:
        f.write("\n".join(keys) + "\n")
    return path


def chat_ms(port, key):
    t0 = time.perf_counter()
    r = harness.request(port, "/v1/chat/completions", sc.CHAT, {"authorization": "Bearer " + key})
    if r.status != 200:
        raise RuntimeError("status %d: %s" % (r.status, r.body[:200]))
    return (time.perf_counter() - t0) * 1000


def lookup_script(digests):
    path = tempfile.mktemp(suffix=".lua", dir=run.LOGDIR)
    table = keys_file(digests)
    with open(path, "w") as f:
        f.write("\n".join([
            "local d = {}", 'for line in io.lines("%s") do d[#d + 1] = line end' % table, "local i = 0",
            "request = function()", "  i = i % #d + 1",
            '  return wrk.format("GET", "/v1/registry/keys/" .. d[i] .. "?credentials=true")', "end"]) + "\n")
    return path


def used_memory(redis):
    info = redis.cli("INFO", "memory")
    return int(next(line.split(":")[1] for line in info.splitlines() if line.startswith("used_memory:")))


def main():
    procs = []
    rng = random.Random(15)
    try:
        up, up_port = run.fast_upstream()
        procs.append(up)
        redis = harness.Redis(logdir=run.LOGDIR)
        procs.append(redis)
        svc = Service(redis.port)
        procs.append(svc)

        # 1. Steady state: ACTIVE tenants, static vs registry.
        create_tenants(svc, range(ACTIVE))
        import_keys(svc, [(i, sc.key(i)) for i in range(ACTIVE)])
        # Both label metrics by tier (a registry's tenant count is open, so
        # `auto` labels by tier there): the same stats work on both sides.
        tier_labels = {"tenant_label": "tier"}
        static = envoy(sc.config(ACTIVE, metering=tier_labels), up_port, svc)
        procs.append(static)
        reg_cfg = sc.config(0, registry={"cluster": "tollgate_registry", "poll_ms": 1000}, metering=tier_labels)
        registry = envoy(reg_cfg, up_port, svc)
        procs.append(registry)
        keys = [sc.key(i) for i in range(ACTIVE)]
        for k in keys:  # warm the registry Envoy's caches
            chat_ms(registry.port, k)
        script = run.lua_script({}, tokens_file=keys_file(keys))
        slots = {"static": (static, [], []), "registry": (registry, [], [])}
        for e, _, _ in slots.values():
            run.wrk(e.port, script, 4, 2)
        for r in range(ROUNDS):
            for name in (("static", "registry") if r % 2 == 0 else ("registry", "static")):
                e, rps, cpu = slots[name]
                before = run.cpu_seconds(e.proc.pid)
                load = run.wrk(e.port, script, run.CONNECTIONS, run.DURATION)
                cpu.append((run.cpu_seconds(e.proc.pid) - before) / max(1, load["requests"]) * 1e6)
                rps.append(load["rps"])
                if load["non2xx"]:
                    print("# %s: %d non-2xx\n%s" % (name, load["non2xx"], load["raw"]), file=sys.stderr)
        s, g = slots["static"], slots["registry"]
        result("static_rps", "%.0f" % statistics.median(s[1]))
        result("registry_rps", "%.0f" % statistics.median(g[1]))
        result("static_cpu_us_per_req_envoy", "%.1f" % statistics.median(s[2]))
        result("registry_cpu_us_per_req_envoy", "%.1f" % statistics.median(g[2]))
        result("registry_vs_static_rps", "%.3f" % statistics.median([b / a for a, b in zip(s[1], g[1])]))
        result("registry_vs_static_cpu", "%.3f" % statistics.median([b / a for a, b in zip(s[2], g[2])]))

        # 2. The first request of a key no worker has seen.
        fresh = [(ACTIVE + i, "sk-fresh-%d" % i) for i in range(200)]
        create_tenants(svc, [i for i, _ in fresh])
        import_keys(svc, fresh)
        added = []
        for _, k in fresh:
            first = chat_ms(registry.port, k)
            second = chat_ms(registry.port, k)
            added.append(first - second)
        added.sort()
        result("registry_first_request_added_ms", "%.2f" % statistics.median(added))
        result("registry_first_request_added_p90_ms", "%.2f" % added[int(len(added) * 0.9)])

        # 3. Lookups per second at the service.
        digests = [harness.sha256_hex(k) for k in keys]
        redis_pid = redis.proc.pid
        before = (run.cpu_seconds(svc.proc.pid), run.cpu_seconds(redis_pid))
        out = run.wrk_get(svc.registry_port, lookup_script(digests), run.CONNECTIONS, run.DURATION * 3) \
            if hasattr(run, "wrk_get") else None
        if out is None:
            import re
            import subprocess
            raw = subprocess.run(["wrk", "-t1", "-c%d" % run.CONNECTIONS, "-d%ds" % (run.DURATION * 3), "-s",
                                  lookup_script(digests), "http://127.0.0.1:%d/" % svc.registry_port],
                                 capture_output=True, timeout=120).stdout.decode()
            rps = float(re.search(r"Requests/sec:\s+([\d.]+)", raw).group(1))
            n = int(re.search(r"(\d+) requests in", raw).group(1))
            bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", raw)
            out = {"rps": rps, "requests": n, "non2xx": int(bad.group(1)) if bad else 0}
        after = (run.cpu_seconds(svc.proc.pid), run.cpu_seconds(redis_pid))
        result("registry_lookups_per_s", "%.0f" % out["rps"])
        result("registry_lookups_non2xx", out["non2xx"])
        result("registry_lookup_cpu_us_service", "%.1f" % ((after[0] - before[0]) / max(1, out["requests"]) * 1e6))
        result("registry_lookup_cpu_us_redis", "%.1f" % ((after[1] - before[1]) / max(1, out["requests"]) * 1e6))

        # 4. Filter memory per cached key.
        cache_env = envoy(sc.config(0, registry={"cluster": "tollgate_registry", "max_cached": 1_000_000}),
                          up_port, svc)
        procs.append(cache_env)
        cached = [(ACTIVE + 1000 + i, "sk-cached-%d" % i) for i in range(CACHED)]
        create_tenants(svc, [i for i, _ in cached])
        import_keys(svc, cached)
        chat_ms(cache_env.port, keys[0])
        rss0 = rss_mb(cache_env.proc.pid)
        parallel(lambda p: chat_ms(cache_env.port, p[1]), cached, workers=8)
        rss1 = rss_mb(cache_env.proc.pid)
        result("filter_bytes_per_cached_key", "%.0f" % ((rss1 - rss0) * 1024 * 1024 / CACHED))

        # 5. Redis memory per tenant and per key as the registry grows.
        base = ACTIVE + 1000 + CACHED
        made = 0
        for n in TENANT_STEPS:
            m0 = used_memory(redis)
            create_tenants(svc, range(base + made, base + n), credential=False)
            result("redis_bytes_per_tenant_%d" % n, "%.0f" % ((used_memory(redis) - m0) / max(1, n - made)))
            made = n
        owners = max(TENANT_STEPS)
        done = 0
        for n in KEY_STEPS:
            m0 = used_memory(redis)
            t0 = time.perf_counter()
            import_keys(svc, [(base + rng.randrange(owners), "sk-mem-%d" % i) for i in range(done, n)])
            took = time.perf_counter() - t0
            result("redis_bytes_per_key_%d" % n, "%.0f" % ((used_memory(redis) - m0) / max(1, n - done)))
            result("admin_key_imports_per_s_%d" % n, "%.0f" % ((n - done) / took))
            done = n
    finally:
        for p in reversed(procs):
            try:
                p.stop()
            except Exception:  # noqa: BLE001  (best effort at exit)
                pass


if __name__ == "__main__":
    main()
