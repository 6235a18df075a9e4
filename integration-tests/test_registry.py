"""Tenants, keys and provider credentials managed at runtime: created,
rotated, revoked and disabled through the service's admin API while Envoy
runs, with no restart and no configuration change; what happens when the
service is down; a flood of random keys; and no secret anywhere it should
not be."""

import base64
import http.client
import json
import os
import threading
import time
import uuid

import pytest

import harness
from conftest import PROVIDER_ENV, plugin_config

RUN = uuid.uuid4().hex[:6]
ADMIN_TOKEN = "adm-" + uuid.uuid4().hex
KEK = "k1:" + base64.b64encode(os.urandom(32)).decode()
POLL_MS = 200
# A change lands on every worker within one poll plus a round trip (about
# 0.25 s here); the tests allow 1 s for every worker, 3 s for the first.
EVERY_WORKER_S = 1.0
BOUND_S = 3.0
CHAT = {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


class RegistryService:
    """tollgate-ratelimit with its registry and admin ports."""

    def __init__(self, redis_port, logdir):
        self.port = harness.free_port()
        self.metrics_port = harness.free_port()
        self.registry_port = harness.free_port()
        self.admin_port = harness.free_port()
        self.redis_port = redis_port
        self.logdir = logdir
        self.procs = []
        self.start()

    def start(self):
        proc = harness.Proc(
            "rls-registry-%d-%d" % (self.port, len(self.procs)),
            [harness.RLS_BIN, "--grpc-addr", "127.0.0.1:%d" % self.port,
             "--metrics-addr", "127.0.0.1:%d" % self.metrics_port,
             "--registry-addr", "127.0.0.1:%d" % self.registry_port,
             "--admin-addr", "127.0.0.1:%d" % self.admin_port,
             "--redis-url", "redis://127.0.0.1:%d" % self.redis_port],
            env={"TOLLGATE_ADMIN_TOKENS": "ops:" + ADMIN_TOKEN, "TOLLGATE_KEK": KEK},
            logdir=self.logdir)
        self.procs.append(proc)
        self.proc = proc
        harness.wait_port(self.admin_port, proc=proc.proc)
        harness.wait_port(self.registry_port, proc=proc.proc)

    def admin(self, method, path, body=None, token=ADMIN_TOKEN):
        c = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=10)
        headers = {"content-type": "application/json"}
        if token is not None:
            headers["authorization"] = "Bearer " + token
        c.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, (json.loads(data) if data else None)

    def output(self):
        out = []
        for p in self.procs:
            if not p.log.closed:
                p.log.flush()
            with open(p.log_path, "rb") as f:
                out.append(f.read().decode("utf-8", "replace"))
        return "".join(out)

    def metrics(self):
        c = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=5)
        c.request("GET", "/metrics")
        data = c.getresponse().read().decode()
        c.close()
        return data

    def stop(self):
        self.proc.stop()


def http1_cluster(name, port):
    return {
        "name": name, "type": "STATIC", "connect_timeout": "0.5s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
    }


@pytest.fixture(scope="module")
def svc(redis, tmp_path_factory):
    s = RegistryService(redis.port, str(tmp_path_factory.mktemp("rls-registry")))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def gw(wasm, mock, svc, tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp("envoy-registry"))
    plugin = plugin_config(
        rate_limit={"cluster": "tollgate_rls", "timeout_ms": 500},
        registry={"cluster": "tollgate_registry", "poll_ms": POLL_MS, "timeout_ms": 1000,
                  "negative_ttl_ms": 500, "max_lookups_in_flight": 4, "grace_s": 300})
    port, admin = harness.free_port(), harness.free_port()
    cfg = harness.envoy_config(
        port, admin, mock.port, [harness.wasm_filter(plugin, env_keys=sorted(PROVIDER_ENV))],
        access_log_path=os.path.join(logdir, "access.log"),
        extra_clusters=[harness.grpc_cluster("tollgate_rls", svc.port),
                        http1_cluster("tollgate_registry", svc.registry_port)])
    env = harness.Envoy(cfg, env=PROVIDER_ENV, logdir=logdir)
    env.port = port
    env.logdir = logdir
    yield env
    env.stop()


def chat(gw, key):
    return harness.request(gw.port, "/v1/chat/completions", CHAT, {"authorization": "Bearer " + key})


def until(fn, want, timeout=BOUND_S):
    """Polls fn() until it returns want; answers (value, seconds taken)."""
    t0 = time.time()
    got = fn()
    while got != want and time.time() - t0 < timeout:
        time.sleep(0.05)
        got = fn()
    return got, time.time() - t0


def all_workers_after(t_change):
    """Sleeps until every worker has polled since `t_change`."""
    time.sleep(max(0.0, t_change + EVERY_WORKER_S - time.time()))


def onboard(svc, tenant, tier="free", secret=None):
    st, _ = svc.admin("POST", "/v1/tenants", {"id": tenant, "tier": tier})
    assert st == 201, st
    st, key = svc.admin("POST", "/v1/tenants/%s/keys" % tenant, {"label": "ci"})
    assert st == 201, (st, key)
    if secret:
        st, cred = svc.admin("PUT", "/v1/tenants/%s/credentials/openai" % tenant, {"secret": secret})
        assert st == 200, (st, cred)
        assert secret not in json.dumps(cred)
    return key


def provider_auth_for(mock, secret):
    return [r for r in mock.requests() if r["header_map"].get("authorization") == "Bearer " + secret]


def test_a_tenant_onboarded_at_runtime_is_served_with_its_own_credential(gw, svc, mock):
    tenant = "rt-%s-a" % RUN
    secret = "sk-live-%s-a" % uuid.uuid4().hex
    key = onboard(svc, tenant, secret=secret)
    assert key["key"].startswith("tgk_") and key["sha256"] == harness.sha256_hex(key["key"])
    status, took = until(lambda: chat(gw, key["key"]).status, 200)
    assert status == 200, "served within %.1fs" % BOUND_S
    got = provider_auth_for(mock, secret)
    assert got, "the provider received the tenant's own credential"
    assert key["key"] not in json.dumps(got), "the client's key never reaches the provider"


def test_a_revoked_key_is_refused_within_the_bound(gw, svc):
    tenant = "rt-%s-r" % RUN
    key = onboard(svc, tenant, secret="sk-r-" + uuid.uuid4().hex)
    assert until(lambda: chat(gw, key["key"]).status, 200)[0] == 200
    t_change = time.time()
    st, body = svc.admin("POST", "/v1/keys/%s/revoke" % key["sha256"])
    assert st == 200 and body["revoked"] is True
    status, took = until(lambda: chat(gw, key["key"]).status, 401)
    assert status == 401, "revocation landed within %.1fs" % BOUND_S
    all_workers_after(t_change)
    for _ in range(10):
        r = chat(gw, key["key"])
        assert r.status == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_a_rotated_credential_reaches_the_provider_within_the_bound(gw, svc, mock):
    tenant = "rt-%s-c" % RUN
    old, new = "sk-old-" + uuid.uuid4().hex, "sk-new-" + uuid.uuid4().hex
    key = onboard(svc, tenant, secret=old)
    for _ in range(6):  # both workers hold the old credential
        assert until(lambda: chat(gw, key["key"]).status, 200)[0] == 200
    t_change = time.time()
    st, _ = svc.admin("PUT", "/v1/tenants/%s/credentials/openai" % tenant, {"secret": new})
    assert st == 200

    def sends_new():
        mock.clear()
        chat(gw, key["key"])
        return bool(provider_auth_for(mock, new))

    assert until(sends_new, True)[0], "the new credential reached the provider within %.1fs" % BOUND_S
    # Every worker moved over: many requests, none with the old one.
    all_workers_after(t_change)
    mock.clear()
    for _ in range(10):
        chat(gw, key["key"])
    assert not provider_auth_for(mock, old)


def test_a_disabled_tenant_gets_403_within_the_bound(gw, svc):
    tenant = "rt-%s-d" % RUN
    key = onboard(svc, tenant, secret="sk-d-" + uuid.uuid4().hex)
    assert until(lambda: chat(gw, key["key"]).status, 200)[0] == 200
    t_change = time.time()
    st, body = svc.admin("PATCH", "/v1/tenants/%s" % tenant, {"enabled": False})
    assert st == 200 and body["enabled"] is False
    assert until(lambda: chat(gw, key["key"]).status, 403)[0] == 403
    all_workers_after(t_change)
    for _ in range(10):
        assert chat(gw, key["key"]).json()["error"]["code"] == "tenant_disabled"


def test_admin_calls_without_the_right_token_get_401(svc):
    for token in (None, "wrong-token-0123456789", ADMIN_TOKEN + "x"):
        st, body = svc.admin("GET", "/v1/tenants", token=token)
        assert st == 401, token
        assert "error" in body


def registry_calls(gw):
    stats = gw.stats("cluster.tollgate_registry.upstream_rq_total")
    return sum(int(v) for k, v in stats.items() if k.endswith("upstream_rq_total"))


def test_a_flood_of_random_keys_is_refused_and_bounded(gw, svc):
    before = registry_calls(gw)
    n = 200
    statuses = []
    lock = threading.Lock()

    def one(i):
        r = chat(gw, "tgk_random-%s-%d" % (uuid.uuid4().hex, i))
        with lock:
            statuses.append(r.status)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.time() - t0
    assert all(s in (401, 503) for s in statuses), sorted(set(statuses))
    assert statuses.count(401) > 0
    sent = registry_calls(gw) - before
    # Each lookup is one registry request; polls add one per worker per
    # poll period. The bound: no more lookups than keys, and at most
    # max_lookups_in_flight (4) per worker (2) at once.
    polls = 2 * (took / (POLL_MS / 1000.0) + 2)
    assert sent <= n + polls, (sent, n, polls)


def test_with_the_service_down_cached_keys_work_and_new_keys_get_503(gw, svc, mock):
    tenant = "rt-%s-o" % RUN
    key = onboard(svc, tenant, secret="sk-o-" + uuid.uuid4().hex)
    # Warm both workers' caches.
    assert until(lambda: chat(gw, key["key"]).status, 200)[0] == 200
    for _ in range(8):
        assert chat(gw, key["key"]).status == 200
    fresh = onboard(svc, "rt-%s-n" % RUN, secret="sk-n-" + uuid.uuid4().hex)
    svc.proc.kill()
    try:
        for _ in range(8):
            assert chat(gw, key["key"]).status == 200
        r = chat(gw, fresh["key"])
        assert r.status == 503, r.status
        assert r.json()["error"]["code"] == "tenant_lookup_unavailable"
    finally:
        svc.start()
    assert until(lambda: chat(gw, fresh["key"]).status, 200, timeout=10)[0] == 200


def test_no_secret_appears_in_redis_logs_stats_or_config_dump(gw, svc, redis, mock):
    tenant = "rt-%s-s" % RUN
    secret = "sk-secret-" + uuid.uuid4().hex
    key = onboard(svc, tenant, secret=secret)
    assert until(lambda: chat(gw, key["key"]).status, 200)[0] == 200
    # Redis holds the key's digest only and the credential as ciphertext.
    dump = []
    for k in redis.cli("--scan", "--pattern", "*").split():
        t = redis.cli("TYPE", k).strip()
        if t == "string":
            dump.append(redis.cli("GET", k))
        elif t == "hash":
            dump.append(redis.cli("HGETALL", k))
        elif t == "set":
            dump.append(redis.cli("SMEMBERS", k))
        elif t == "zset":
            dump.append(redis.cli("ZRANGE", k, "0", "-1"))
        elif t == "stream":
            dump.append(redis.cli("XRANGE", k, "-", "+"))
        dump.append(k)
    text = "\n".join(dump)
    assert key["sha256"] in text
    for s in (secret, key["key"], ADMIN_TOKEN, KEK.split(":", 1)[1]):
        assert s not in text
        assert s not in svc.output()
        assert s not in svc.metrics()
        assert s not in gw.admin("/config_dump")
        assert s not in gw.admin("/stats")
        with open(os.path.join(gw.logdir, "access.log")) as f:
            assert s not in f.read()
        assert s not in json.dumps(svc.admin("GET", "/v1/tenants/%s" % tenant)[1])
        assert s not in json.dumps(svc.admin("GET", "/v1/audit?limit=1000")[1])
    for p in os.listdir(gw.logdir):
        with open(os.path.join(gw.logdir, p), errors="replace") as f:
            body = f.read()
        assert secret not in body and key["key"] not in body, p


def test_a_registry_keys_own_limits_are_enforced_with_its_tenants(gw, svc):
    tenant = "rt-%s-kl" % RUN
    onboard(svc, tenant, secret="sk-kl-" + uuid.uuid4().hex)
    st, limited = svc.admin("POST", "/v1/tenants/%s/keys" % tenant,
                            {"label": "agent", "name": "agent-1", "limits": {"requests_per_minute": 2}})
    assert st == 201, (st, limited)
    assert limited["name"] == "agent-1" and limited["limits"] == {"requests_per_minute": 2}
    st, body = svc.admin("POST", "/v1/tenants/%s/keys" % tenant, {"label": "x", "limits": {"requests_per_day": 1}})
    assert st == 400 and "name" in json.dumps(body), body
    assert until(lambda: chat(gw, limited["key"]).status, 200)[0] == 200
    codes = [chat(gw, limited["key"]) for _ in range(3)]
    refused = [r for r in codes if r.status == 429]
    assert refused, [r.status for r in codes]
    assert refused[0].header("x-tollgate-error") == "key_request_rate_limited"
    assert refused[0].header("x-tollgate-limit") == "key.requests_per_minute"
    # Another key of the tenant has no key limit.
    st, other = svc.admin("POST", "/v1/tenants/%s/keys" % tenant, {"label": "other"})
    assert st == 201
    assert until(lambda: chat(gw, other["key"]).status, 200)[0] == 200
    assert [chat(gw, other["key"]).status for _ in range(3)] == [200, 200, 200]
