"""The usage ledger end to end: real Envoy with the filter, the real service
and Redis, the mock provider and a local webhook receiver. The ledger must
equal the access log to the token and the micro-dollar after mixed traffic
(every API, streams, refusals, a cut stream, a limiter restart with journal
replay); budget alerts arrive once, signed, also after a receiver outage."""

import base64
import csv
import datetime
import hashlib
import hmac
import http.client
import http.server
import io
import json
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

import harness
from conftest import PRICING, ROUTES, Stack

RUN = uuid.uuid4().hex[:6]
TOKEN = "ops-" + base64.urlsafe_b64encode(os.urandom(18)).decode()
SECRET = "whsec-" + base64.urlsafe_b64encode(os.urandom(18)).decode()
ENV = {"openai": "ACME_OPENAI_KEY", "anthropic": "ACME_ANTHROPIC_KEY", "gemini": "ACME_GEMINI_KEY"}
ALERT_BUDGET_USD = 0.02


def key(name):
    return "sk-ledger-%s-%s" % (name, RUN)


def tid(name):
    return "lg-%s-%s" % (name, RUN)


class Receiver:
    """A webhook receiver on loopback that records what it is sent; it can be
    started after the events (an outage)."""

    def __init__(self, port):
        self.port, self.got, self.server = port, [], None

    def start(self):
        got = self.got

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                got.append((dict(self.headers), body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        if self.server:
            self.server.shutdown()
            self.server.server_close()


def plugin():
    tenants = []
    for name, tier in (("mixed", "metered"), ("refused", "tight"), ("alerts", "alerted"), ("replay", "open")):
        tenants.append({"id": tid(name), "tier": tier, "api_key_sha256": [harness.sha256_hex(key(name))],
                        "provider_key_env": ENV})
    return {
        "providers": {"openai": {"credential_header": "authorization"},
                      "anthropic": {"credential_header": "x-api-key"},
                      "gemini": {"credential_header": "x-goog-api-key"}},
        "routes": ROUTES,
        "rate_limit": {"cluster": "tollgate_rls", "timeout_ms": 500},
        "pricing": PRICING,
        "tiers": {
            "metered": {"models": ["*"], "tokens_per_day": 100_000_000, "time_zone": "America/New_York"},
            "tight": {"models": ["*"], "requests_per_minute": 3},
            "alerted": {"models": ["*"], "usd_per_day": ALERT_BUDGET_USD, "clamp_max_output_tokens": True,
                        "default_max_output_tokens": 100, "alert_thresholds": [0.5, 0.8]},
            "open": {"models": ["*"], "requests_per_minute": 10_000, "tokens_per_day": 100_000_000,
                     "failure_mode": "open"},
        },
        "tenants": tenants,
    }


@pytest.fixture(scope="module")
def lstack(wasm, mock, redis, tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp("ledger-e2e"))
    hook_port = harness.free_port()
    rls = harness.RateLimitService(
        redis.port, logdir=logdir, admin_tokens="ops:" + TOKEN,
        extra_args=["--alert-webhook-url", "http://127.0.0.1:%d/hook" % hook_port],
        extra_env={"TOLLGATE_ALERT_WEBHOOK_SECRET": SECRET})
    s = Stack(mock, logdir, plugin=plugin(), extra_clusters=[harness.grpc_cluster("tollgate_rls", rls.port)])
    s.rls, s.receiver = rls, Receiver(hook_port)
    yield s
    s.stop()
    s.receiver.stop()
    rls.stop()


def usage(stack, tenant):
    today = datetime.datetime.now(datetime.timezone.utc).date()
    frm, to = today - datetime.timedelta(days=2), today + datetime.timedelta(days=2)
    st, rep = stack.rls.http(stack.rls.admin_port, "GET", "/v1/usage?tenant=%s&from=%s&to=%s" % (tenant, frm, to),
                             token=TOKEN)
    assert st == 200, rep
    return rep["totals"]


def log_totals(stack, ids):
    logs = stack.access_log_lines(set(ids), timeout=20)
    t = {"requests": 0, "refusals": 0, "input_tokens": 0, "cached_read_tokens": 0, "cache_write_tokens": 0,
         "output_tokens": 0, "reasoning_tokens": 0, "cost_micro_usd": 0, "estimated_requests": 0}
    for rec in logs.values():
        if rec["tg_outcome"] == "refused":
            t["refusals"] += 1
            continue
        t["requests"] += 1
        t["input_tokens"] += int(rec["tg_tokens_input"])
        t["cached_read_tokens"] += int(rec["tg_tokens_cache_read"])
        t["cache_write_tokens"] += int(rec["tg_tokens_cache_write"])
        t["output_tokens"] += int(rec["tg_tokens_output"])
        t["reasoning_tokens"] += int(rec["tg_tokens_reasoning"])
        t["cost_micro_usd"] += round(float(rec["tg_cost_usd"]) * 1e6)
        t["estimated_requests"] += rec["tg_estimated"] == "true"
    return t


def ledger_equals_log(stack, tenant, ids, timeout=20):
    want = log_totals(stack, ids)
    deadline = time.time() + timeout
    while True:
        got = usage(stack, tenant)
        have = {k: got.get(k, 0) for k in want if k != "refusals"}
        have["refusals"] = sum((got.get("refusals") or {}).values()) if isinstance(got.get("refusals"), dict) \
            else got.get("refusals", 0)
        if have == want or time.time() > deadline:
            return want, have
        time.sleep(0.2)


def call(stack, name, path, body, rid, extra=None):
    h = {"x-request-id": rid}
    if path == "/v1/messages":
        h["x-api-key"] = key(name)
    elif path.startswith("/v1beta"):
        h["x-goog-api-key"] = key(name)
    else:
        h["authorization"] = "Bearer " + key(name)
    h.update(extra or {})
    try:
        return harness.request(stack.port, path, body, h)
    except Exception:
        return None  # a cut stream may reset the client


MIXED = [
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}, {}),
    ("/v1/chat/completions", {"model": "gpt-4o", "stream": True, "messages": []}, {}),
    ("/v1/responses", {"model": "gpt-4o", "input": "hi"}, {}),
    ("/v1/responses", {"model": "gpt-4o-mini", "input": "hi", "stream": True}, {}),
    ("/v1/messages", {"model": "claude-3-5-haiku", "max_tokens": 30, "messages": []}, {}),
    ("/v1/messages", {"model": "claude-3-5-haiku", "max_tokens": 30, "stream": True, "messages": []}, {}),
    ("/v1beta/models/gemini-2.0-flash:generateContent", {"contents": []}, {}),
    ("/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse", {"contents": []}, {}),
    ("/v1/messages", {"model": "claude-3-5-haiku", "max_tokens": 30, "stream": True, "messages": []},
     {"x-mock-fail": "cut"}),
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": []}, {"x-mock-fail": "no-usage"}),
]


def disconnect_mid_stream(stack, name, rid):
    """The client hangs up half-way through a slow stream."""
    raw = json.dumps({"model": "gpt-4o-mini", "stream": True, "messages": []}).encode()
    c = socket.create_connection(("127.0.0.1", stack.port), timeout=30)
    c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + key(name).encode()
              + b"\r\nx-request-id: " + rid.encode() + b"\r\nx-mock-output-tokens: 40"
              + b"\r\nx-mock-chunk-delay-ms: 50\r\ncontent-length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
    got = b""
    while b"data:" not in got:
        piece = c.recv(4096)
        if not piece:
            break
        got += piece
    c.close()


def test_the_ledger_equals_the_access_log_after_mixed_traffic(lstack):
    ids = []
    for i, (path, body, extra) in enumerate(MIXED * 2):
        rid = "lg-mixed-%s-%d" % (RUN, i)
        call(lstack, "mixed", path, body, rid, extra)
        ids.append(rid)
        if i == 5:
            rid = "lg-mixed-%s-gone" % RUN
            disconnect_mid_stream(lstack, "mixed", rid)
            ids.append(rid)
    want, have = ledger_equals_log(lstack, tid("mixed"), ids)
    assert have == want, (have, want)
    assert want["estimated_requests"] >= 2 and want["cost_micro_usd"] > 0
    assert lstack.access_log_lines({"lg-mixed-%s-gone" % RUN})["lg-mixed-%s-gone" % RUN]["tg_outcome"] == "incomplete"
    # The CSV export parses and sums to the same.
    today = datetime.datetime.now(datetime.timezone.utc).date()
    path = "/v1/usage?tenant=%s&from=%s&to=%s&group_by=day,model&format=csv" % (
        tid("mixed"), today - datetime.timedelta(days=2), today + datetime.timedelta(days=2))
    c = http.client.HTTPConnection("127.0.0.1", lstack.rls.admin_port, timeout=10)
    c.request("GET", path, headers={"authorization": "Bearer " + TOKEN})
    text = c.getresponse().read().decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert {r["model"] for r in rows} >= {"gpt-4o", "gpt-4o-mini", "claude-3-5-haiku", "gemini-2.0-flash"}
    for field in ("requests", "input_tokens", "output_tokens", "cost_micro_usd"):
        assert sum(int(r[field]) for r in rows) == want[field], field


def test_refusals_are_in_the_ledger_by_code(lstack):
    ids = []
    for i in range(6):
        rid = "lg-refused-%s-%d" % (RUN, i)
        call(lstack, "refused", "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": []}, rid)
        ids.append(rid)
    want, have = ledger_equals_log(lstack, tid("refused"), ids)
    assert have == want and want["refusals"] == 3, (have, want)
    got = usage(lstack, tid("refused"))
    assert got["refusals"] == {"request_rate_limited": 3}, got


def test_a_limiter_restart_mid_load_loses_and_doubles_nothing(lstack):
    ids = []
    for i in range(4):
        rid = "lg-replay-a-%s-%d" % (RUN, i)
        call(lstack, "replay", "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": []}, rid)
        ids.append(rid)
    lstack.rls.stop()
    # Fail-open tier: admitted within the local allowance while the
    # service is down; their settles wait in the journal.
    for i in range(3):
        rid = "lg-replay-b-%s-%d" % (RUN, i)
        r = call(lstack, "replay", "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": []}, rid)
        assert r is not None and r.status == 200, r and r.body[:200]
        ids.append(rid)
    lstack.rls.start()
    want, have = ledger_equals_log(lstack, tid("replay"), ids, timeout=40)
    assert have == want, (have, want)


def test_budget_alerts_arrive_once_signed_after_a_receiver_outage(lstack):
    # The receiver is down while 32 concurrent requests cross 50 % and 80 %
    # of the $0.02 budget.
    body = {"model": "gpt-4o", "stream": True, "messages": []}
    with ThreadPoolExecutor(max_workers=32) as ex:
        list(ex.map(lambda i: call(lstack, "alerts", "/v1/chat/completions", body, "lg-al-%s-%d" % (RUN, i),
                                   {"x-mock-output-tokens": "150"}), range(32)))
    time.sleep(2)
    lstack.receiver.start()
    deadline = time.time() + 40
    mine = []
    while time.time() < deadline:
        mine = [(h, b) for h, b in lstack.receiver.got if json.loads(b).get("tenant") == tid("alerts")]
        if len({json.loads(b)["threshold_percent"] for _, b in mine}) >= 2:
            break
        time.sleep(0.3)
    events = [json.loads(b) for _, b in mine]
    by_threshold = {}
    for e in events:
        by_threshold.setdefault((e["limit_name"], e["threshold_percent"]), set()).add(e["id"])
    assert by_threshold.get(("usd_per_day", 50)) and by_threshold.get(("usd_per_day", 80)), events
    # Exactly one event per threshold (deliveries are at least once: the
    # same id may repeat, never a second id).
    assert all(len(ids) == 1 for ids in by_threshold.values()), by_threshold
    for h, b in mine:
        headers = {k.lower(): v for k, v in h.items()}
        ts = headers["x-tollgate-timestamp"]
        want = hmac.new(SECRET.encode(), ts.encode() + b"." + b, hashlib.sha256).hexdigest()
        assert headers["x-tollgate-signature"] == "sha256=" + want
        # A replay with a wrong signature (or a changed body) is detectable.
        forged = hmac.new(b"not-the-secret", ts.encode() + b"." + b, hashlib.sha256).hexdigest()
        assert forged != want
        tampered = hmac.new(SECRET.encode(), ts.encode() + b"." + b + b" ", hashlib.sha256).hexdigest()
        assert tampered != want
    # The secret never appears in the service's log.
    assert SECRET not in lstack.rls.proc.output()
