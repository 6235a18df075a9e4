"""The soak test: one running stack (real Envoy 1.40 with build/tollgate.wasm,
the real rate-limit service, a real redis-server and the mock provider), a
long stream of mixed requests, one service restart and one Redis restart, and
checks that nothing leaks, hangs, drops or miscounts. Not part of the test
command; run it with `./soak.sh` (builds first) or, after building,
`.venv/bin/python bench/soak.py --requests 20000`. Depth: docs/soak.md.

The mix (seeded, `--seed`): every API (OpenAI chat, responses, embeddings,
Anthropic messages, Gemini generateContent), plain and streamed; refusals
(401 unknown key, 403 model outside the tier, 413 body too large, 429 from a
tenant over its request rate, 503 while the limiter is down); provider
trouble (a 500, a stream cut half-way, a response without usage, an error
event mid-stream); client disconnects (mid-stream, and before the answer);
leases (automatic leases on the busiest tenant, none on another, a tier
without limits: ledger-only settles); end users.

Redis runs with an append-only file fsynced on every write
(`--appendfsync always`), so its restart (SIGKILL, a crash, by default)
loses nothing Redis acknowledged; anything it applied but could not answer
is replayed by the filter's journal under the same idempotency key. The
ledger must therefore equal the access log over the whole run, exactly.

Prints `RESULT <name>=<value>` lines and exits 1 when a check fails:
  soak_requests, soak_rps, soak_client_timeouts (hung requests) = 0,
  soak_access_log_missing = 0 and soak_access_log_duplicates = 0 (every
  request logged once), envoy_downstream_rq_active_end = 0,
  tollgate_settle_dropped = 0, ledger_equals_access_log = 1 (per tenant,
  every count), envoy_rss_growth_mb and wasm_memory_growth_mb within their
  tolerances after warm-up (samples in <logdir>/memory.csv).
"""

import argparse
import asyncio
import collections
import datetime
import http.client
import json
import os
import random
import secrets
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration-tests"))

import harness  # noqa: E402
from conftest import PRICING  # noqa: E402  (the prices the integration tests meter with)

RUN = secrets.token_hex(3)
ADMIN_TOKEN = "soak-" + secrets.token_urlsafe(24)
ENV = {"SOAK_OPENAI_KEY": "sk-soak-openai", "SOAK_ANTHROPIC_KEY": "sk-ant-soak", "SOAK_GEMINI_KEY": "gm-soak"}
PROVIDER_ENV = {"openai": "SOAK_OPENAI_KEY", "anthropic": "SOAK_ANTHROPIC_KEY", "gemini": "SOAK_GEMINI_KEY"}
ROUTES = [
    {"path": "/v1/chat/completions", "api": "openai_chat", "provider": "openai", "trust_end_user_header": True},
    {"path": "/v1/responses", "api": "openai_responses", "provider": "openai", "trust_end_user_header": True},
    {"path": "/v1/embeddings", "api": "openai_embeddings", "provider": "openai", "trust_end_user_header": True},
    {"path": "/v1/messages", "api": "anthropic_messages", "provider": "anthropic", "trust_end_user_header": True},
    {"path_prefix": "/v1beta/models/", "api": "gemini", "provider": "gemini", "trust_end_user_header": True},
]
BIG = 10 ** 12
# name: (tier, share of the traffic)
TENANTS = {
    "leased": ("leased", 40),      # automatic leases, fail closed, end users
    "direct": ("direct", 25),      # no leases (one reserve per request), fail open
    "tight": ("tight", 10),        # 120 requests a minute: a steady stream of 429s
    "free": ("free", 20),          # no limits (ledger-only settles), a model allowlist, a 4 KiB body limit
}
UNKNOWN_SHARE = 1                  # requests with a key nobody has: 401, no tenant


def key(name):
    return "sk-soak-%s-%s" % (name, RUN)


def tenant_id(name):
    return "soak-%s-%s" % (name, RUN)


def plugin():
    return {
        "providers": {"openai": {"credential_header": "authorization"},
                      "anthropic": {"credential_header": "x-api-key"},
                      "gemini": {"credential_header": "x-goog-api-key"}},
        "identity": {"end_user_header": "x-end-user"},
        "routes": ROUTES,
        "rate_limit": {"cluster": "tollgate_rls", "timeout_ms": 300},
        "pricing": PRICING,
        "tiers": {
            "leased": {"models": ["*"], "requests_per_minute": 10_000_000, "tokens_per_day": BIG,
                       "usd_per_month": 1_000_000, "users": {"requests_per_minute": 1_000_000}},
            "direct": {"models": ["*"], "requests_per_minute": 10_000_000, "tokens_per_day": BIG,
                       "failure_mode": "open", "lease_requests": 0},
            "tight": {"models": ["*"], "requests_per_minute": 120},
            "free": {"models": ["gpt-4o-mini", "claude-3-5-haiku*", "gemini-2.0-flash", "text-embedding-3-small"],
                     "max_request_bytes": 4096},
        },
        "tenants": [{"id": tenant_id(n), "tier": tier, "api_key_sha256": [harness.sha256_hex(key(n))],
                     "provider_key_env": PROVIDER_ENV} for n, (tier, _) in TENANTS.items()],
    }


# ---------------------------------------------------------------- the mix

CHAT, RESP, EMB, ANTH, GEM = "chat", "responses", "embeddings", "anthropic", "gemini"
# (name, weight, api, stream, extra headers, kind) where kind is "plain",
# "disconnect-mid", "disconnect-early", "policy", "too-big".
SCENARIOS = [
    ("chat", 12, CHAT, False, {}, "plain"),
    ("chat-stream", 12, CHAT, True, {}, "plain"),
    ("responses", 7, RESP, False, {}, "plain"),
    ("responses-stream", 7, RESP, True, {}, "plain"),
    ("embeddings", 7, EMB, False, {}, "plain"),
    ("anthropic", 8, ANTH, False, {}, "plain"),
    ("anthropic-stream", 8, ANTH, True, {}, "plain"),
    ("gemini", 7, GEM, False, {}, "plain"),
    ("gemini-stream", 7, GEM, True, {}, "plain"),
    ("upstream-500", 2, CHAT, False, {"x-mock-status": "500"}, "plain"),
    ("upstream-429", 1, ANTH, False, {"x-mock-status": "429"}, "plain"),
    ("stream-cut", 2, ANTH, True, {"x-mock-fail": "cut"}, "plain"),
    ("no-usage", 2, CHAT, False, {"x-mock-fail": "no-usage"}, "plain"),
    ("midstream-error", 1, CHAT, True, {"x-mock-fail": "midstream"}, "plain"),
    ("disconnect-mid-stream", 3, GEM, True, {"x-mock-chunk-delay-ms": "5"}, "disconnect-mid"),
    ("disconnect-before-answer", 2, RESP, False, {"x-mock-first-byte-ms": "200"}, "disconnect-early"),
    ("policy-403", 2, CHAT, False, {}, "policy"),
    ("too-big-413", 1, EMB, False, {}, "too-big"),
]


def build(rng, sc, tenant):
    """(path, headers, body bytes) of one request."""
    name, _w, api, stream, extra, kind = sc
    out = rng.randint(1, 24)
    h = {"x-mock-output-tokens": str(out)}
    h.update(extra)
    model = {CHAT: "gpt-4o-mini", RESP: "gpt-4o", EMB: "text-embedding-3-small", ANTH: "claude-3-5-haiku",
             GEM: "gemini-2.0-flash"}[api]
    if tenant == "free" and api == RESP:
        model = "gpt-4o-mini"
    if kind == "policy":
        model = "gpt-4o" if tenant == "free" else "gpt-4o-mini"
    text = "hi " * rng.randint(1, 40)
    if kind == "too-big":
        text = "x" * (4096 if tenant == "free" else 1024)
    if api == CHAT:
        path = "/v1/chat/completions"
        body = {"model": model, "messages": [{"role": "user", "content": text}]}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        if rng.random() < 0.5:
            body["max_tokens"] = rng.randint(8, 64)
    elif api == RESP:
        path = "/v1/responses"
        body = {"model": model, "input": text, "stream": stream}
    elif api == EMB:
        path = "/v1/embeddings"
        body = {"model": model, "input": text}
    elif api == ANTH:
        path = "/v1/messages"
        body = {"model": model, "max_tokens": rng.randint(8, 64), "stream": stream,
                "messages": [{"role": "user", "content": text}]}
    else:
        path = "/v1beta/models/%s:%s" % (model, "streamGenerateContent?alt=sse" if stream else "generateContent")
        body = {"contents": [{"role": "user", "parts": [{"text": text}]}]}
    k = key(tenant) if tenant else "sk-soak-nobody-%s" % RUN
    if api == ANTH:
        h["x-api-key"] = k
    elif api == GEM:
        h["x-goog-api-key"] = k
    else:
        h["authorization"] = "Bearer " + k
    if tenant == "leased" and rng.random() < 0.7:
        h["x-end-user"] = "user-%d" % rng.randint(1, 25)
    return path, h, json.dumps(body).encode()


class Tally:
    def __init__(self):
        self.sent = 0
        self.done = 0
        self.timeouts = 0
        self.errors = collections.Counter()
        self.status = collections.Counter()
        self.by_scenario = collections.Counter()
        self.ids = []
        self.error_ids = {}


async def read_response(reader):
    """(status, connection reusable) of one HTTP/1.1 response, body read whole."""
    line = await reader.readline()
    if not line:
        raise ConnectionError("closed before the status line")
    status = int(line.split(b" ", 2)[1])
    clen, chunked, close = None, False, False
    while True:
        h = await reader.readline()
        if h in (b"\r\n", b"\n"):
            break
        if not h:
            raise ConnectionError("closed in the headers")
        k, _, v = h.decode("latin-1").partition(":")
        k, v = k.strip().lower(), v.strip().lower()
        if k == "content-length":
            clen = int(v)
        elif k == "transfer-encoding" and "chunked" in v:
            chunked = True
        elif k == "connection" and v == "close":
            close = True
    if chunked:
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("stream cut: closed before its last chunk")
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                break
            await reader.readexactly(size + 2)
    elif clen is not None:
        await reader.readexactly(clen)
    else:
        await reader.read()
        close = True
    return status, not close


def head(path, headers, body, rid):
    lines = ["POST %s HTTP/1.1" % path, "host: soak", "content-type: application/json",
             "content-length: %d" % len(body), "x-request-id: " + rid]
    lines += ["%s: %s" % kv for kv in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def one_off(port, data, kind):
    """A request on its own connection that the client abandons."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if kind == "disconnect-mid":
            # Hang up after the first event of a stream; a refusal (no
            # stream) is read whole instead.
            got = b""
            while b"data:" not in got:
                piece = await reader.read(4096)
                if not piece:
                    break
                got += piece
                if b"\r\n\r\n" in got and not got.startswith(b"HTTP/1.1 200"):
                    break
        else:
            await asyncio.sleep(0.05)
    finally:
        writer.transport.abort()


async def client(idx, port, plan, tally, args):
    rng = random.Random("%d-%d" % (args.seed, idx))
    conn = None
    prev = None
    tenants = [t for t in TENANTS] + [None]
    weights = [w for _, w in TENANTS.values()] + [UNKNOWN_SHARE]
    while True:
        n = plan.take()
        if n is None:
            break
        sc = rng.choices(SCENARIOS, weights=[s[1] for s in SCENARIOS])[0]
        tenant = rng.choices(tenants, weights=weights)[0]
        path, h, body = build(rng, sc, tenant)
        rid = "soak-%s-%d" % (RUN, n)
        tally.ids.append(rid)
        tally.sent += 1
        tally.by_scenario[sc[0]] += 1
        data = head(path, h, body, rid)
        try:
            if sc[5] in ("disconnect-mid", "disconnect-early"):
                await asyncio.wait_for(one_off(port, data, sc[5]), args.timeout_s)
                tally.status["abandoned"] += 1
            else:
                if conn is None:
                    conn = await asyncio.open_connection("127.0.0.1", port)
                    prev = "new connection"
                reader, writer = conn
                writer.write(data)
                await writer.drain()
                status, reusable = await asyncio.wait_for(read_response(reader), args.timeout_s)
                tally.status[status] += 1
                prev = "%s %s %s" % (rid, sc[0], status)
                if not reusable:
                    writer.transport.abort()
                    conn = None
        except asyncio.TimeoutError:
            tally.timeouts += 1
            print("# client timeout: %s %s (%s)" % (rid, path, sc[0]), file=sys.stderr, flush=True)
            if conn:
                conn[1].transport.abort()
            conn = None
        except (ConnectionError, OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
            if sc[0] == "stream-cut" and "stream cut" in str(e):
                tally.status["cut"] += 1  # what the scenario is for: the provider cut the stream
            else:
                tally.errors[type(e).__name__] += 1
            tally.error_ids[rid] = "%s %s: %s; before it on the connection: %s" % (sc[0], type(e).__name__, e, prev)
            if conn:
                conn[1].transport.abort()
            conn = None
        tally.done += 1
    if conn:
        conn[1].close()


class Plan:
    def __init__(self, total):
        self.total, self.next = total, 0

    def take(self):
        if self.next >= self.total:
            return None
        self.next += 1
        return self.next - 1


# ---------------------------------------------------------------- the stack

class DurableRedis(harness.Redis):
    """redis-server with an append-only file fsynced before every reply."""

    def __init__(self, logdir, persist=True):
        self.dir = tempfile.mkdtemp(prefix="redis-", dir=logdir)
        self.persist = persist
        super().__init__(logdir=logdir)

    def start(self):
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.persist else ["--appendonly", "no"]
        self.proc = harness.Proc("redis-%d" % self.port,
                                 [harness.redis_bin(), "--port", str(self.port), "--bind", "127.0.0.1",
                                  "--dir", self.dir, "--save", ""] + aof, logdir=self.logdir)
        harness.wait_port(self.port, proc=self.proc.proc)
        deadline = time.time() + 60
        while self.cli("PING") != "PONG" and time.time() < deadline:  # LOADING while it reads the file
            time.sleep(0.1)


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def wasm_memories(pid):
    """The wasm linear memories in Envoy, as [(size kB, resident kB)]. V8
    reserves each one as a region of 8 GiB or more: the memory's current
    pages (an anonymous rw-p mapping that grows with memory.grow) directly
    followed by an inaccessible guard (---p) up to the end of the
    reservation. Linear memory never shrinks: its size is the VM's
    high-water mark, its resident part the pages the module touched."""
    maps = []
    cur = None
    with open("/proc/%d/smaps" % pid) as f:
        for line in f:
            first = line.split(" ", 1)[0]
            if "-" in first and all(c in "0123456789abcdef-" for c in first):
                lo, hi = (int(x, 16) for x in first.split("-"))
                parts = line.split()
                cur = {"lo": lo, "hi": hi, "perms": parts[1], "anon": len(parts) < 6, "rss": 0}
                maps.append(cur)
            elif line.startswith("Rss:") and cur is not None:
                cur["rss"] = int(line.split()[1])
    out = []
    for prev, m in zip(maps, maps[1:]):
        if (m["perms"] == "---p" and m["hi"] - m["lo"] >= 4 << 30 and prev["hi"] == m["lo"]
                and prev["perms"] == "rw-p" and prev["anon"]):
            out.append(((prev["hi"] - prev["lo"]) // 1024, prev["rss"]))
    return out


class Sampler(threading.Thread):
    def __init__(self, envoy, tally, path, every):
        super().__init__(daemon=True)
        self.envoy, self.tally, self.every = envoy, tally, every
        self.samples = []
        self.stop_ev = threading.Event()
        self.f = open(path, "w")
        self.f.write("t_s,requests,rss_mb,wasm_mb,wasm_vms,tcmalloc_allocated_mb,tcmalloc_heap_mb,event\n")
        self.t0 = time.time()
        self.lock = threading.Lock()

    def sample(self, event=""):
        with self.lock:
            return self._sample(event)

    def _sample(self, event):
        pid = self.envoy.proc.pid
        try:
            st = self.envoy.stats("server.memory")
        except OSError:
            st = {}
        mems = wasm_memories(pid)
        n, wkb = len(mems), sum(size for size, _ in mems)
        s = {"t": time.time() - self.t0, "requests": self.tally.done, "rss_mb": rss_kb(pid) / 1024,
             "wasm_mb": wkb / 1024, "wasm_vms": n,
             "alloc_mb": st.get("server.memory_allocated", 0) / 2 ** 20,
             "heap_mb": st.get("server.memory_heap_size", 0) / 2 ** 20, "event": event}
        self.samples.append(s)
        self.f.write("%.1f,%d,%.2f,%.2f,%d,%.2f,%.2f,%s\n" % (s["t"], s["requests"], s["rss_mb"], s["wasm_mb"],
                                                               n, s["alloc_mb"], s["heap_mb"], s["event"]))
        self.f.flush()
        return s

    def run(self):
        while not self.stop_ev.wait(self.every):
            self.sample()


class Abort(Exception):
    """Stops the checks: one failed so that the others cannot run."""


def result(name, value):
    print("RESULT %s=%s" % (name, value), flush=True)


def access_log_records(path, prefix):
    out = collections.defaultdict(list)
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            rid = rec.get("request_id") or ""
            if rid.startswith(prefix):
                out[rid].append(rec)
    return out


COUNTS = ["requests", "input_tokens", "cached_read_tokens", "cache_write_tokens", "output_tokens",
          "reasoning_tokens", "cost_micro_usd", "estimated_requests"]


def log_totals(records):
    """Per tenant: the ledger's counts as the access log gives them."""
    per = {}
    for recs in records.values():
        rec = recs[0]
        t = rec.get("tg_tenant") or ""
        if t in ("", "-"):
            continue
        d = per.setdefault(t, dict({k: 0 for k in COUNTS}, refusals=collections.Counter()))
        if rec.get("tg_outcome") == "refused":
            d["refusals"][rec.get("tg_error") or "refused"] += 1
            continue
        if rec.get("tg_outcome") == "cancelled":
            # The client left before the request went upstream: neither a
            # request nor a refusal in the ledger.
            continue
        d["requests"] += 1
        d["input_tokens"] += int(rec["tg_tokens_input"])
        d["cached_read_tokens"] += int(rec["tg_tokens_cache_read"])
        d["cache_write_tokens"] += int(rec["tg_tokens_cache_write"])
        d["output_tokens"] += int(rec["tg_tokens_output"])
        d["reasoning_tokens"] += int(rec["tg_tokens_reasoning"])
        d["cost_micro_usd"] += round(float(rec["tg_cost_usd"]) * 1e6)
        d["estimated_requests"] += rec["tg_estimated"] == "true"
    return per


def ledger_totals(rls, tenant):
    today = datetime.datetime.now(datetime.timezone.utc).date()
    frm, to = today - datetime.timedelta(days=2), today + datetime.timedelta(days=2)
    st, rep = rls.http(rls.admin_port, "GET", "/v1/usage?tenant=%s&from=%s&to=%s" % (tenant, frm, to),
                       token=ADMIN_TOKEN)
    if st != 200:
        return None
    tot = rep["totals"]
    d = {k: tot.get(k, 0) for k in COUNTS}
    d["refusals"] = collections.Counter(tot.get("refusals") or {})
    return d


def growth(xs, key):
    """(value at the start, growth, MB per 100k requests) over the samples
    `xs`: the median of the last three minus the median of the first three,
    and the least-squares slope."""
    if len(xs) < 6:
        return None
    a = statistics.median(s[key] for s in xs[:3])
    b = statistics.median(s[key] for s in xs[-3:])
    mx = statistics.mean(s["requests"] for s in xs)
    my = statistics.mean(s[key] for s in xs)
    den = sum((s["requests"] - mx) ** 2 for s in xs) or 1
    slope = sum((s["requests"] - mx) * (s[key] - my) for s in xs) / den
    return a, b - a, slope * 100_000


async def drive(args, envoy, rls, redis, sampler, tally):
    plan = Plan(args.requests)
    tasks = [asyncio.ensure_future(client(i, envoy.port, plan, tally, args))
             for i in range(args.connections)]
    events = sorted([(int(args.requests * args.service_restart_at), "service"),
                     (int(args.requests * args.redis_restart_at), "redis")])
    last_clear, last_print = time.time(), time.time()
    while not all(t.done() for t in tasks):
        await asyncio.sleep(0.2)
        if events and tally.done >= events[0][0]:
            _, what = events.pop(0)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, restart, what, rls, redis, args, sampler)
        if time.time() - last_clear > 5:
            # The mock records every request; keep its memory flat.
            await asyncio.get_running_loop().run_in_executor(None, mock_clear, args.mock_port)
            last_clear = time.time()
        if time.time() - last_print > 30:
            last_print = time.time()
            s = sampler.samples[-1] if sampler.samples else {}
            print("# %d/%d requests, %d timeouts, rss %.1f MB, wasm %.1f MB" % (
                tally.done, args.requests, tally.timeouts, s.get("rss_mb", 0), s.get("wasm_mb", 0)),
                file=sys.stderr, flush=True)
    for t in tasks:
        t.result()


def mock_clear(port):
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("DELETE", "/__mock/requests")
        c.getresponse().read()
        c.close()
    except OSError:
        pass


def keep_log(proc):
    """The restarted process writes a new log of the same name: keep the old."""
    os.replace(proc.log_path, proc.log_path + ".before-restart")


def restart(what, rls, redis, args, sampler):
    t0 = time.time()
    if what == "service":
        sampler.sample("service-stop")
        rls.stop()
        keep_log(rls.proc)
        time.sleep(args.outage_s)
        rls.start()
        sampler.sample("service-up")
    else:
        sampler.sample("redis-stop")
        before = redis.cli("DBSIZE")
        redis.proc.stop(signal.SIGKILL if args.redis_signal == "kill" else signal.SIGTERM)
        keep_log(redis.proc)
        time.sleep(args.outage_s)
        redis.start()
        sampler.sample("redis-up")
        # The append-only file brought the data back.
        result("redis_keys_before_restart", before)
        result("redis_keys_after_restart", redis.cli("DBSIZE"))
    print("# %s restarted (down %.1f s)" % (what, time.time() - t0), file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=500_000, help="requests to send (default 500000)")
    ap.add_argument("--connections", type=int, default=32, help="concurrent clients (default 32)")
    ap.add_argument("--seed", type=int, default=19)
    ap.add_argument("--timeout-s", type=float, default=60.0, help="a request slower than this is hung")
    ap.add_argument("--outage-s", type=float, default=3.0, help="how long the service and Redis stay down")
    ap.add_argument("--service-restart-at", type=float, default=0.35, help="share of the run")
    ap.add_argument("--redis-restart-at", type=float, default=0.65, help="share of the run")
    ap.add_argument("--redis-signal", choices=["kill", "term"], default="kill")
    ap.add_argument("--redis-persistence", choices=["aof", "none"], default="aof",
                    help="none: Redis forgets everything at its restart (the ledger check then fails)")
    ap.add_argument("--warmup", type=float, default=0.1, help="share of the run before memory must be flat")
    ap.add_argument("--recovery-s", type=float, default=30.0,
                    help="seconds after the first restart before memory must be flat again")
    ap.add_argument("--rss-tolerance-mb", type=float, default=8.0)
    ap.add_argument("--wasm-tolerance-mb", type=float, default=1.0)
    ap.add_argument("--ledger-wait-s", type=float, default=120.0,
                    help="how long the journal may take to deliver the last settles")
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--envoy-concurrency", type=int, default=2)
    ap.add_argument("--logdir", default=None)
    args = ap.parse_args()

    logdir = args.logdir or tempfile.mkdtemp(prefix="tollgate-soak-")
    os.makedirs(logdir, exist_ok=True)
    print("# soak run %s: %d requests, %d connections, logs in %s" % (RUN, args.requests, args.connections, logdir),
          file=sys.stderr, flush=True)
    procs = []
    failed = []

    def check(name, value, ok):
        result(name, value)
        if not ok:
            failed.append(name)

    try:
        mock = harness.MockLLM(logdir=logdir)
        procs.append(mock)
        args.mock_port = mock.port
        redis = DurableRedis(logdir, persist=args.redis_persistence == "aof")
        procs.append(redis)
        rls = harness.RateLimitService(redis.port, logdir=logdir, admin_tokens="soak:" + ADMIN_TOKEN)
        procs.append(rls)
        port, admin = harness.free_port(), harness.free_port()
        access_log = os.path.join(logdir, "access.log")
        cfg = harness.envoy_config(port, admin, mock.port, [harness.wasm_filter(plugin(), env_keys=sorted(ENV))],
                                   access_log_path=access_log,
                                   extra_clusters=[harness.grpc_cluster("tollgate_rls", rls.port)],
                                   stats_tags=harness.STATS_TAGS)
        envoy = harness.Envoy(cfg, env=ENV, logdir=logdir, concurrency=args.envoy_concurrency)
        procs.append(envoy)
        tally = Tally()
        sampler = Sampler(envoy, tally, os.path.join(logdir, "memory.csv"), args.sample_s)
        sampler.sample("start")
        sampler.start()
        t0 = time.time()
        asyncio.run(drive(args, envoy, rls, redis, sampler, tally))
        elapsed = time.time() - t0
        sampler.stop_ev.set()
        sampler.sample("end")

        result("soak_requests", tally.done)
        result("soak_seconds", "%.0f" % elapsed)
        result("soak_rps", "%.0f" % (tally.done / elapsed))
        result("soak_mix", ",".join("%s:%d" % kv for kv in sorted(tally.by_scenario.items())))
        result("soak_status", ",".join("%s:%d" % kv for kv in sorted(tally.status.items(), key=str)))
        result("soak_client_errors", ",".join("%s:%d" % kv for kv in sorted(tally.errors.items())) or "0")
        check("soak_client_timeouts", tally.timeouts, tally.timeouts == 0)

        alive = envoy.proc.alive()
        check("envoy_alive_end", int(alive), alive)
        if not alive:
            print("# Envoy exited during the run:\n" + envoy.proc.output()[-3000:], file=sys.stderr)
            raise Abort()
        # Every request reaches the access log once; none still open.
        time.sleep(1.5)
        deadline = time.time() + 30
        while True:
            active = envoy.stats("http.llm_ingress.downstream_rq_active").get("http.llm_ingress.downstream_rq_active")
            if active == 0 or time.time() > deadline:
                break
            time.sleep(0.5)
        check("envoy_downstream_rq_active_end", active, active == 0)
        records = access_log_records(access_log, "soak-%s-" % RUN)
        missing = sum(1 for rid in tally.ids if rid not in records)
        dups = sum(len(v) - 1 for v in records.values())
        for rid in [r for r in tally.ids if r not in records][:10]:
            print("# not in the access log: %s (%s)" % (rid, tally.error_ids.get(rid, "answered")), file=sys.stderr)
        check("soak_access_log_missing", missing, missing == 0)
        check("soak_access_log_duplicates", dups, dups == 0)
        outcomes = collections.Counter(r[0].get("tg_outcome") for r in records.values())
        result("soak_outcomes", ",".join("%s:%d" % kv for kv in sorted(outcomes.items(), key=str)))
        # Not a check of this script (see docs/soak.md): requests the client
        # left before the filter wrote any field (status 0, flag DC).
        blank = [rid for rid, r in records.items() if not r[0].get("tg_outcome")]
        result("soak_access_log_without_outcome",
               "%d%s" % (len(blank), (" e.g. " + ",".join(blank[:3])) if blank else ""))

        # The ledger equals the access log, per tenant, exactly (the journal
        # may still be retrying: wait for it).
        want = log_totals(records)
        deadline = time.time() + args.ledger_wait_s
        while True:
            have = {t: ledger_totals(rls, t) for t in want}
            if have == want or time.time() > deadline:
                break
            time.sleep(1)
        for t in sorted(want):
            if have.get(t) != want[t]:
                print("# ledger %s: %s\n# log    %s: %s" % (t, have.get(t), t, want[t]), file=sys.stderr)
        for t, d in sorted(want.items()):
            result("access_log_%s" % t.rsplit("-", 1)[0].replace("-", "_"),
                   "requests:%d,refusals:%d,output_tokens:%d,cost_micro_usd:%d" % (
                       d["requests"], sum(d["refusals"].values()), d["output_tokens"], d["cost_micro_usd"]))
        check("ledger_equals_access_log", int(have == want), have == want)

        stats = envoy.stats("tollgate.settle")
        dropped = stats.get("wasmcustom.tollgate.settle.dropped", 0)
        check("tollgate_settle_dropped", dropped, dropped == 0)
        result("tollgate_settle_ok", stats.get("wasmcustom.tollgate.settle.ok", 0))
        result("tollgate_settle_retried", stats.get("wasmcustom.tollgate.settle.retried", 0))
        leased = sum(v for k, v in envoy.stats("tollgate").items()
                     if k.startswith("wasmcustom.tollgate.") and k.endswith(".leased") and isinstance(v, int))
        result("tollgate_leased", leased)
        warnings = sum(1 for line in envoy.proc.output().splitlines() if "[warning]" in line and "wasm" in line)
        result("envoy_wasm_warning_lines", warnings)

        # Memory: flat after warm-up.
        s = sampler.samples
        result("memory_samples", len(s))
        result("envoy_rss_mb_start", "%.1f" % s[0]["rss_mb"])
        result("envoy_rss_mb_max", "%.1f" % max(x["rss_mb"] for x in s))
        result("envoy_rss_mb_end", "%.1f" % s[-1]["rss_mb"])
        result("wasm_memory_mb_end", "%.2f (%d VMs)" % (s[-1]["wasm_mb"], s[-1]["wasm_vms"]))
        # Two windows, each of which must be flat: warm-up to the first
        # restart, and from --recovery-s after the first restart to the end,
        # which includes the second.
        # Between them memory may step up once: the journal holds every
        # settle while the service is away, and wasm linear memory (like
        # tcmalloc's heap) keeps its high-water mark.
        warm = int(args.requests * args.warmup)
        stops = [i for i, x in enumerate(s) if x["event"].endswith("-stop")]
        ups = [x["t"] for x in s if x["event"].endswith("-up")]
        if stops and ups:
            before = [x for x in s[:stops[0]] if x["requests"] >= warm]
            after = [x for x in s if x["t"] >= ups[0] + args.recovery_s]
        else:
            before, after = [x for x in s if x["requests"] >= warm], []
        windows = [("before_restarts", before), ("after_recovery", after)]
        for key_, name, tol in (("rss_mb", "envoy_rss", args.rss_tolerance_mb),
                                ("wasm_mb", "wasm_memory", args.wasm_tolerance_mb)):
            for wname, xs in windows:
                g = growth(xs, key_)
                if g is None:
                    check("%s_growth_mb_%s" % (name, wname), "n/a (fewer than 6 samples: run longer or lower "
                          "--sample-s)", False)
                    continue
                result("%s_mb_%s_start" % (name, wname), "%.2f" % g[0])
                result("%s_slope_mb_per_100k_%s" % (name, wname), "%.3f" % g[2])
                check("%s_growth_mb_%s" % (name, wname), "%.2f" % g[1], g[1] <= tol)
            step = growth([x for x in s if x["requests"] >= warm], key_)
            if step:
                result("%s_growth_mb_warmup_to_end" % name, "%.2f" % step[1])
    except Abort:
        pass
    except Exception:
        traceback.print_exc()
        failed.append("exception")
    finally:
        for p in reversed(procs):
            try:
                p.stop()
            except Exception:
                pass
    result("soak_logdir", logdir)
    result("soak_verdict", "FAIL: " + ",".join(failed) if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
