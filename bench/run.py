"""tollgate benchmarks: every figure side by side with its baseline in the same run.

Prints `RESULT <name>=<value>` lines. Run with ./bench.sh (builds first).
BENCH_ONLY=stream runs only the streaming section (TTFB and throughput);
BENCH_ONLY=scale runs only bench/scale.py (10 to 100k tenants in the config).

- Throughput and added latency (wrk, POST chat completions, 1 Envoy worker):
  bare Envoy; Envoy's native C++ ratelimit filter calling our service (request
  count only); Envoy + tollgate doing everything (API-key identity, an atomic
  reserve of five limits, response metering, settle). Every proxy runs at
  once and they are measured in interleaved slices (BENCH_ROUNDS rounds of
  BENCH_SECONDS each, the order reversed every other round), so a slow
  period of the machine hits them all alike; a ratio is the median of the
  per-round ratios, and `<ratio>_range` gives the lowest and highest.
- Identity cost: tollgate with API keys vs JWTs (RS256, ES256; cache hit and
  cache miss), no limits, so only identity differs.
- Streaming: time to first byte of a streamed completion with and without the
  filter (the mock waits like a provider before its first byte), and the
  throughput of a ~20 MB SSE stream.

The upstream for throughput runs is a second Envoy answering a fixed OpenAI
completion (direct_response), so the Python mock is not the bottleneck; the
streaming runs use the mock, which speaks SSE.
"""

import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "integration-tests"))

import harness  # noqa: E402

# Seconds of load per proxy per round, and rounds (throughput section).
DURATION = int(os.environ.get("BENCH_SECONDS", "2"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "10"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "32"))
KEY = "sk-bench-tenant"
# BENCH_ONLY=stream runs only the streaming section (6); empty or "all" runs everything.
ONLY = os.environ.get("BENCH_ONLY", "")
if ONLY not in ("", "all", "stream", "scale"):
    sys.exit("bench: BENCH_ONLY must be empty, all, stream or scale, not %r" % ONLY)
LOGDIR = tempfile.mkdtemp(prefix="tollgate-bench-")
COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini-2024-07-18",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there."}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15,
              "prompt_tokens_details": {"cached_tokens": 0}},
})
BODY = json.dumps({"model": "gpt-4o-mini", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]})


def result(name, value):
    print("RESULT %s=%s" % (name, value), flush=True)


def fast_upstream():
    port, admin = harness.free_port(), harness.free_port()
    cfg = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": [{
            "name": "upstream", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "up",
                    "route_config": {"virtual_hosts": [{"name": "up", "domains": ["*"], "routes": [{
                        "match": {"prefix": "/"},
                        "direct_response": {"status": 200, "body": {"inline_string": COMPLETION}},
                        "response_headers_to_add": [{"header": {"key": "content-type",
                                                                "value": "application/json"}}]}]}]},
                    "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                }}]}]}],
            "clusters": []},
    }
    return harness.Envoy(cfg, logdir=tempfile.mkdtemp(dir=LOGDIR), concurrency=1), port


def tenant_config(limits, extra=None):
    tier = {"models": ["*"], "max_request_bytes": 65536}
    if limits:
        tier.update({"requests_per_minute": 1_000_000_000, "tokens_per_minute": 1_000_000_000,
                     "tokens_per_day": 100_000_000_000, "usd_per_day": 1_000_000, "usd_per_month": 10_000_000})
    cfg = {
        "providers": {"openai": {"credential_header": "authorization"}},
        "routes": [{"path": "/v1/chat/completions", "api": "openai_chat", "provider": "openai"}],
        "tiers": {"bench": tier},
        "tenants": [{"id": "bench", "tier": "bench", "api_key_sha256": [harness.sha256_hex(KEY)],
                     "provider_key_env": {"openai": "BENCH_OPENAI_KEY"}}],
        "pricing": {"models": {"gpt-4o-mini": {"input": 0.15, "output": 0.6}}, "default": {"input": 1, "output": 1}},
    }
    if limits:
        cfg["rate_limit"] = {"cluster": "tollgate_rls", "timeout_ms": 500}
        # A reserve call per request unless a run asks for leases (they are
        # on by default).
        tier["lease_requests"] = 0
    cfg.update(extra or {})
    return cfg


BIG = 1_000_000_000


def four_level_config(leases=False):
    """The bench tenant's five tenant limits, plus a named key's own limit,
    a per-user limit (the end user from a trusted header) and a provider
    pool with the tier's share: four levels in one reserve."""
    cfg = tenant_config(limits=True)
    if leases:
        del cfg["tiers"]["bench"]["lease_requests"]
    cfg["tiers"]["bench"]["users"] = {"requests_per_minute": BIG}
    cfg["tenants"][0]["api_key_sha256"] = []
    cfg["tenants"][0]["keys"] = [{"id": "bench-key", "sha256": harness.sha256_hex(KEY),
                                  "limits": {"usd_per_day": 1_000_000}}]
    cfg["routes"][0]["trust_end_user_header"] = True
    cfg["identity"] = {"end_user_header": "x-end-user"}
    cfg["pools"] = [{"name": "bench-pool", "provider": "openai", "models": ["gpt-4o-mini"],
                     "limits": {"requests_per_minute": BIG, "output_tokens_per_minute": BIG},
                     "tier_shares": {"bench": 0.5}}]
    return cfg


def proxy(upstream_port, filters, rls_port=None, routes=None, env=None):
    port, admin = harness.free_port(), harness.free_port()
    clusters = [harness.grpc_cluster("tollgate_rls", rls_port)] if rls_port else []
    cfg = harness.envoy_config(port, admin, upstream_port, filters, extra_clusters=clusters, routes=routes,
                               stats_tags=harness.STATS_TAGS)
    e = harness.Envoy(cfg, env=dict(env or {}, BENCH_OPENAI_KEY="sk-upstream"),
                      logdir=tempfile.mkdtemp(dir=LOGDIR), concurrency=1)
    return e, port


def lua_script(headers, tokens_file=None):
    lines = ['wrk.method = "POST"', "wrk.body = %s" % json.dumps(BODY),
             'wrk.headers["content-type"] = "application/json"']
    for k, v in headers.items():
        lines.append('wrk.headers["%s"] = "%s"' % (k, v))
    if tokens_file:
        lines += ['local tokens = {}', 'for line in io.lines("%s") do tokens[#tokens + 1] = line end' % tokens_file,
                  'local i = 0',
                  'request = function()',
                  '  i = i % #tokens + 1',
                  '  wrk.headers["authorization"] = "Bearer " .. tokens[i]',
                  '  return wrk.format()',
                  'end']
    path = tempfile.mktemp(suffix=".lua", dir=LOGDIR)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def to_ms(s):
    m = re.match(r"([\d.]+)(us|ms|s)", s)
    if not m:
        return float("nan")
    v = float(m.group(1))
    return {"us": v / 1000, "ms": v, "s": v * 1000}[m.group(2)]


def wrk(port, script, connections, seconds):
    out = subprocess.run(["wrk", "-t1", "-c%d" % connections, "-d%ds" % seconds, "--latency", "-s", script,
                          "http://127.0.0.1:%d/v1/chat/completions" % port],
                         capture_output=True, timeout=seconds + 60).stdout.decode()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    done = re.search(r"(\d+) requests in", out)
    return {"rps": rps, "p50": to_ms(lat.get("50", "nan")), "p99": to_ms(lat.get("99", "nan")), "non2xx": errors,
            "requests": int(done.group(1)) if done else 0, "raw": out}


def cpu_seconds(pid):
    """User plus system CPU time a process has used so far."""
    fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(name, port, headers, tokens_file=None, cpu=None):
    """wrk under load and with one connection. `cpu` names processes (name ->
    pid) whose CPU time per request under load is reported: on a shared
    machine CPU per request says where the time goes better than rps does."""
    script = lua_script(headers, tokens_file)
    warm = wrk(port, script, 4, 2)  # warm up connections, VMs, caches
    before = {k: cpu_seconds(pid) for k, pid in (cpu or {}).items()}
    load = wrk(port, script, CONNECTIONS, DURATION * 2)
    done = max(1, load["requests"])
    for k, pid in (cpu or {}).items():
        result("%s_cpu_us_per_req_%s" % (name, k), "%.1f" % ((cpu_seconds(pid) - before[k]) / done * 1e6))
    single = wrk(port, script, 1, 3)
    if load["non2xx"] or single["non2xx"]:
        print("# %s: %d non-2xx responses under load:\n%s" % (name, load["non2xx"], load["raw"]), file=sys.stderr)
    result("%s_rps" % name, "%.0f" % load["rps"])
    result("%s_p50_ms" % name, "%.3f" % single["p50"])
    result("%s_p99_ms" % name, "%.3f" % single["p99"])
    result("%s_non2xx" % name, load["non2xx"] + single["non2xx"])
    load["requests_all"] = warm["requests"] + load["requests"] + single["requests"]
    return load, single


class Run:
    """One proxy of the interleaved throughput section."""

    def __init__(self, name, envoy, port, cpu):
        self.name, self.envoy, self.port, self.cpu = name, envoy, port, cpu
        self.script = None
        self.rps, self.cpu_us, self.requests, self.non2xx = [], {k: [] for k in cpu}, 0, 0
        self.single = None


def interleaved(runs, headers):
    """Measures `runs` (all started) in ROUNDS rounds of one load slice each,
    the order reversed every other round, then each with one connection for
    latency. Prints each run's median rps, CPU per request, latency and
    non-2xx count; returns the runs by name."""
    for r in runs:
        r.script = lua_script(headers)
        r.requests += wrk(r.port, r.script, 4, 2)["requests"]  # warm up connections, VMs, caches
    for i in range(ROUNDS):
        for r in (runs if i % 2 == 0 else runs[::-1]):
            before = {k: cpu_seconds(pid) for k, pid in r.cpu.items()}
            load = wrk(r.port, r.script, CONNECTIONS, DURATION)
            done = max(1, load["requests"])
            for k, pid in r.cpu.items():
                r.cpu_us[k].append((cpu_seconds(pid) - before[k]) / done * 1e6)
            r.rps.append(load["rps"])
            r.requests += load["requests"]
            r.non2xx += load["non2xx"]
            if load["non2xx"]:
                print("# %s: %d non-2xx responses under load:\n%s" % (r.name, load["non2xx"], load["raw"]),
                      file=sys.stderr)
    for r in runs:
        r.single = wrk(r.port, r.script, 1, 3)
        r.requests += r.single["requests"]
        r.non2xx += r.single["non2xx"]
        for k, v in r.cpu_us.items():
            result("%s_cpu_us_per_req_%s" % (r.name, k), "%.1f" % statistics.median(v))
        result("%s_rps" % r.name, "%.0f" % statistics.median(r.rps))
        result("%s_p50_ms" % r.name, "%.3f" % r.single["p50"])
        result("%s_p99_ms" % r.name, "%.3f" % r.single["p99"])
        result("%s_non2xx" % r.name, r.non2xx)
    return {r.name: r for r in runs}


def ratio(name, a, b):
    """The median of the per-round rps ratios of runs a and b, and their range."""
    per_round = [x / y for x, y in zip(a.rps, b.rps)]
    result(name, "%.3f" % statistics.median(per_round))
    result(name + "_range", "%.3f-%.3f" % (min(per_round), max(per_round)))


def native_filter():
    return {"name": "envoy.filters.http.ratelimit", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
        "domain": "tollgate_native", "failure_mode_deny": True, "timeout": "0.5s",
        "rate_limit_service": {"transport_api_version": "V3",
                               "grpc_service": {"envoy_grpc": {"cluster_name": "tollgate_rls"}}}}}


def mint_tokens(alg, n):
    import jwt as pyjwt
    fix = os.path.join(ROOT, "tests", "fixtures", "jwt")
    keyfile, kid = {"RS256": ("rsa1.key.pem", "rsa-1"), "ES256": ("ec256.key.pem", "ec256-1")}[alg]
    from cryptography.hazmat.primitives import serialization
    # Parse the key once: PyJWT re-parses (and re-validates) a PEM per call.
    key = serialization.load_pem_private_key(open(os.path.join(fix, keyfile), "rb").read(), password=None)
    now = int(time.time())
    toks = [pyjwt.encode({"iss": "https://bench/", "aud": "tollgate", "sub": "u%d" % i, "exp": now + 3600,
                          "iat": now, "tenant": "bench"}, key, algorithm=alg, headers={"kid": kid})
            for i in range(n)]
    path = tempfile.mktemp(suffix=".tokens", dir=LOGDIR)
    with open(path, "w") as f:
        f.write("\n".join(toks) + "\n")
    return toks, path


def ttfb_ms(port, body, headers, n=30):
    samples = []
    payload = json.dumps(body).encode()
    head = "".join("%s: %s\r\n" % kv for kv in headers.items())
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", port), timeout=30)
        t0 = time.perf_counter()
        c.sendall(("POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
                   "connection: close\r\n%scontent-length: %d\r\n\r\n" % (head, len(payload))).encode() + payload)
        c.recv(1)
        samples.append((time.perf_counter() - t0) * 1000)
        while c.recv(65536):
            pass
        c.close()
    return statistics.median(samples)


def stream_seconds(port, headers, size):
    payload = json.dumps(dict(json.loads(BODY), stream=True)).encode()
    head = "".join("%s: %s\r\n" % kv for kv in headers.items())
    c = socket.create_connection(("127.0.0.1", port), timeout=120)
    t0 = time.perf_counter()
    c.sendall(("POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
               "x-mock-bulk-bytes: %d\r\n%sconnection: close\r\ncontent-length: %d\r\n\r\n"
               % (size, head, len(payload))).encode() + payload)
    got = 0
    while True:
        piece = c.recv(1 << 20)
        if not piece:
            break
        got += len(piece)
    c.close()
    return time.perf_counter() - t0, got


def sections_1_to_4(up_port, rls_port, auth, limiter):
    runs = []

    def add(name, filters, rls=False, routes=None, cpu_limiter=False):
        e, p = proxy(up_port, filters, rls_port=rls_port if rls else None, routes=routes)
        runs.append(Run(name, e, p, dict(limiter if cpu_limiter else {}, envoy=e.proc.pid)))

    def leased(extra=None):
        cfg = tenant_config(limits=True, extra=extra)
        cfg["tiers"]["bench"]["lease_requests"] = 100
        return [harness.wasm_filter(cfg, env_keys=["BENCH_OPENAI_KEY"])]

    def default(cfg):
        """As an operator would configure it: leases sized automatically."""
        cfg["tiers"]["bench"].pop("lease_requests", None)
        return [harness.wasm_filter(cfg, env_keys=["BENCH_OPENAI_KEY"])]

    try:
        # 1. bare Envoy
        add("bare_envoy", [])
        # 1b. the floor of any wasm filter: tollgate loaded, but the path is
        # not one of its routes and is passed through untouched.
        passthrough = tenant_config(limits=False, extra={"unmatched_routes": "pass"})
        passthrough["routes"][0]["path"] = "/elsewhere"
        add("wasm_passthrough", [harness.wasm_filter(passthrough, env_keys=["BENCH_OPENAI_KEY"])])
        # 1c. tollgate metering only (identity, credentials, usage), no limits
        add("tollgate_no_limits", [harness.wasm_filter(tenant_config(limits=False), env_keys=["BENCH_OPENAI_KEY"])])
        # 1d. metering only, to a provider with two failover targets: the
        # pick reads the first target's circuit from shared data per request.
        failover = tenant_config(limits=False)
        failover["providers"]["openai"]["targets"] = [{"provider": "openai"}, {"provider": "backup"}]
        failover["providers"]["backup"] = {"credential_header": "api-key"}
        failover["tenants"][0]["provider_key_env"]["backup"] = "BENCH_OPENAI_KEY"
        add("tollgate_no_limits_failover", [harness.wasm_filter(failover, env_keys=["BENCH_OPENAI_KEY"])])
        # 2. tollgate doing everything, a reserve call per request
        add("tollgate", [harness.wasm_filter(tenant_config(limits=True), env_keys=["BENCH_OPENAI_KEY"])], rls=True,
            cpu_limiter=True)
        # 3. native ratelimit filter, request count only (measured between
        # the two runs compared with it: this order is the measuring order)
        routes = [{"match": {"prefix": "/"}, "route": {"cluster": "llm_upstream", "rate_limits": [
            {"actions": [{"generic_key": {"descriptor_value": "bench"}}]}]}}]
        add("native_ratelimit", [native_filter()], rls=True, routes=routes, cpu_limiter=True)
        # 4. tollgate doing everything with quota leasing (lease_requests:
        # 100): most requests are admitted from the worker's lease, no call.
        add("tollgate_leased", leased(), rls=True, cpu_limiter=True)
        # 4b. leased, with the four access-log fields most operators log instead
        # of all twenty (metering.filter_state): everything else the same.
        add("tollgate_leased_lean", leased({"metering": {
            "filter_state": ["tenant", "model_served", "tokens_total", "cost_usd"]}}), rls=True, cpu_limiter=True)
        # 4c. the defaults (automatic leases), one level and four levels
        add("tollgate_default", default(tenant_config(limits=True)), rls=True, cpu_limiter=True)
        add("tollgate_default_levels4", default(four_level_config(leases=True)), rls=True, cpu_limiter=True)
        # 4d. a reserve per request over four levels (tenant, key, user,
        # pool and its tier share: nine descriptors), against "tollgate" above.
        add("tollgate_levels4", [harness.wasm_filter(four_level_config(), env_keys=["BENCH_OPENAI_KEY"])],
            rls=True, cpu_limiter=True)
        r = interleaved(runs, dict(auth, **{"x-end-user": "bench-user"}))
        for name in ("tollgate", "tollgate_leased"):
            result("%s_settles_dropped" % name, r[name].envoy.stats("tollgate.settle").get(
                "wasmcustom.tollgate.settle.dropped", 0))
        for name in ("tollgate_leased", "tollgate_default", "tollgate_default_levels4"):
            result("%s_rls_calls_per_1000_requests" % name, "%.1f" % (
                r[name].envoy.stats("cluster.tollgate_rls.upstream_rq_total").get(
                    "cluster.tollgate_rls.upstream_rq_total", 0) / max(1, r[name].requests) * 1000))
    finally:
        for run in runs:
            run.envoy.stop()
    bare, native = r["bare_envoy"], r["native_ratelimit"]
    ratio("tollgate_vs_bare_envoy_rps", r["tollgate"], bare)
    ratio("tollgate_vs_native_ratelimit_rps", r["tollgate"], native)
    ratio("tollgate_leased_vs_native_ratelimit_rps", r["tollgate_leased"], native)
    ratio("tollgate_leased_lean_vs_native_ratelimit_rps", r["tollgate_leased_lean"], native)
    ratio("tollgate_leased_vs_bare_envoy_rps", r["tollgate_leased"], bare)
    ratio("native_ratelimit_vs_bare_envoy_rps", native, bare)
    ratio("wasm_passthrough_vs_bare_envoy_rps", r["wasm_passthrough"], bare)
    ratio("tollgate_no_limits_vs_bare_envoy_rps", r["tollgate_no_limits"], bare)
    ratio("tollgate_levels4_vs_levels1_rps", r["tollgate_levels4"], r["tollgate"])
    ratio("tollgate_failover_vs_single_provider_rps", r["tollgate_no_limits_failover"], r["tollgate_no_limits"])
    ratio("tollgate_default_vs_native_ratelimit_rps", r["tollgate_default"], native)
    ratio("tollgate_default_levels4_vs_native_ratelimit_rps", r["tollgate_default_levels4"], native)

    def cpu(run, parts=("envoy", "rls", "redis")):
        return sum(statistics.median(run.cpu_us[p]) for p in parts if p in run.cpu_us)

    result("tollgate_levels4_vs_levels1_envoy_cpu_per_req", "%.3f" % (
        cpu(r["tollgate_levels4"], ("envoy",)) / cpu(r["tollgate"], ("envoy",))))
    result("tollgate_failover_vs_single_provider_envoy_cpu_per_req", "%.3f" % (
        cpu(r["tollgate_no_limits_failover"], ("envoy",)) / cpu(r["tollgate_no_limits"], ("envoy",))))
    # Whole system (Envoy + service + Redis) CPU per request, against the
    # native filter's: below 1 means cheaper.
    for name in ("tollgate_default", "tollgate_default_levels4", "tollgate_leased", "tollgate"):
        result("%s_vs_native_system_cpu_per_req" % name, "%.3f" % (cpu(r[name]) / cpu(native)))
    for name, run in (("tollgate", r["tollgate"]), ("tollgate_leased", r["tollgate_leased"]),
                      ("native_ratelimit", native)):
        result("%s_added_p50_ms" % name, "%.3f" % (run.single["p50"] - bare.single["p50"]))
        result("%s_added_p99_ms" % name, "%.3f" % (run.single["p99"] - bare.single["p99"]))

    # 5. identity: API key vs JWT (no limits, so only identity differs)
    jwks = json.load(open(os.path.join(ROOT, "tests", "fixtures", "jwt", "jwks.json")))
    jwt_cfg = {"providers": [{"name": "bench", "issuers": ["https://bench/"], "audiences": ["tollgate"],
                              "algorithms": ["RS256", "ES256"], "jwks": {"inline": jwks},
                              "tenant_claim": "tenant"}], "cache_max_entries": 1024}
    filt = harness.wasm_filter(tenant_config(limits=False, extra={"jwt": jwt_cfg}), env_keys=["BENCH_OPENAI_KEY"])
    e, p = proxy(up_port, [filt])
    key_run, _ = measure("identity_api_key", p, auth)
    for alg in ("RS256", "ES256"):
        toks, _ = mint_tokens(alg, 1)
        hit, _ = measure("identity_jwt_%s_cache_hit" % alg.lower(), p, {"authorization": "Bearer " + toks[0]})
        # Far more distinct tokens than the cache holds: every request verifies.
        _, path = mint_tokens(alg, 6000)
        miss, _ = measure("identity_jwt_%s_cache_miss" % alg.lower(), p, {}, tokens_file=path)
        result("jwt_%s_cache_hit_vs_api_key_rps" % alg.lower(), "%.3f" % (hit["rps"] / key_run["rps"]))
        result("jwt_%s_cache_miss_vs_api_key_rps" % alg.lower(), "%.3f" % (miss["rps"] / key_run["rps"]))
    e.stop()


def main():
    procs = []
    try:
        up, up_port = fast_upstream()
        procs.append(up)
        redis = harness.Redis(logdir=LOGDIR)
        procs.append(redis)
        limits = os.path.join(LOGDIR, "limits.yaml")
        with open(limits, "w") as f:
            f.write("domains:\n- domain: tollgate_native\n  descriptors:\n  - key: generic_key\n"
                    "    value: bench\n    rate_limit: {unit: minute, requests_per_unit: 1000000000}\n")
        rls_port = harness.free_port()
        rls = harness.Proc("rls", [harness.RLS_BIN, "--grpc-addr", "127.0.0.1:%d" % rls_port, "--metrics-addr",
                                   "127.0.0.1:%d" % harness.free_port(), "--redis-url",
                                   "redis://127.0.0.1:%d" % redis.port, "--config", limits], logdir=LOGDIR)
        procs.append(rls)
        harness.wait_port(rls_port, proc=rls.proc)
        auth = {"authorization": "Bearer " + KEY}

        if ONLY in ("", "all"):
            sections_1_to_4(up_port, rls_port, auth, {"rls": rls.proc.pid, "redis": redis.proc.pid})

        # 6. streaming through the mock: TTFB and throughput, with and without tollgate
        mock = harness.MockLLM(logdir=LOGDIR)
        procs.append(mock)
        e_bare, p_bare = proxy(mock.port, [])
        filt = harness.wasm_filter(tenant_config(limits=True), env_keys=["BENCH_OPENAI_KEY"])
        e_tg, p_tg = proxy(mock.port, [filt], rls_port=rls_port)
        body = dict(json.loads(BODY), stream=True)
        think = {"x-mock-first-byte-ms": "150"}
        t_bare = ttfb_ms(p_bare, body, dict(auth, **think))
        t_tg = ttfb_ms(p_tg, body, dict(auth, **think))
        result("stream_ttfb_bare_ms", "%.1f" % t_bare)
        result("stream_ttfb_tollgate_ms", "%.1f" % t_tg)
        result("stream_ttfb_ratio", "%.3f" % (t_tg / t_bare))
        t0_bare = ttfb_ms(p_bare, body, auth)
        t0_tg = ttfb_ms(p_tg, body, auth)
        result("stream_ttfb_added_ms_instant_provider", "%.2f" % (t0_tg - t0_bare))
        size = 20_000_000
        rates = {}
        for name, port in (("bare", p_bare), ("tollgate", p_tg)):
            best = 0
            for _ in range(3):
                secs, got = stream_seconds(port, auth, size)
                best = max(best, got / secs)
            rates[name] = best
            result("stream_%s_mb_per_s" % name, "%.1f" % (rates[name] / 1e6))
        result("stream_throughput_ratio", "%.3f" % (rates["tollgate"] / rates["bare"]))
        e_bare.stop()
        e_tg.stop()
    finally:
        for p in reversed(procs):
            p.stop()


if __name__ == "__main__":
    main()
