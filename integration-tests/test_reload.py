"""A configuration push replaces the filter's plugin (Envoy's listener
update, as Istio's or any control plane's push does): what the old plugin
holds, quota leases and queued settles, goes back to the rate-limit service
before the old plugin is gone, instead of being stranded until the limit's
window resets."""

import os
import time
import uuid

import pytest

import harness
from conftest import PRICING, PROVIDER_ENV, plugin_config

RUN = uuid.uuid4().hex[:6]  # Redis state is shared across the session
KEY = "sk-reload-%s" % RUN
TENANT = "reload-%s" % RUN
CHAT = {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


def config(version):
    cfg = plugin_config(
        # Leases that would stay out for a minute: only the old plugin's
        # shutdown can bring their quota back within the test.
        rate_limit={"cluster": "tollgate_rls", "timeout_ms": 500, "lease_ms": 60_000},
        pricing=PRICING)
    cfg["tiers"]["leasing"] = {"models": ["*"], "requests_per_minute": 100_000, "requests_per_day": 1000,
                               "lease_requests": 10}
    cfg["tenants"].append({"id": TENANT, "tier": "leasing", "api_key_sha256": [harness.sha256_hex(KEY)],
                           "provider_key_env": {"openai": "ACME_OPENAI_KEY"}})
    # A different plugin configuration: Envoy builds a new plugin.
    cfg["strip_request_headers"] = ["x-user-id", "x-config-%d" % version]
    return cfg


def requests_today(redis):
    keys = [k for k in redis.cli("--scan", "--pattern", "tg:*%s*:D:*" % TENANT).split()
            if k.endswith("limit=requests_per_day")]
    return sum(int(redis.cli("GET", k) or 0) for k in keys)


def wait_for(fn, want, timeout=15.0):
    deadline = time.time() + timeout
    got = fn()
    while got != want and time.time() < deadline:
        time.sleep(0.1)
        got = fn()
    return got


@pytest.fixture
def lds_envoy(wasm, mock, rls, tmp_path):
    port, admin = harness.free_port(), harness.free_port()

    def listeners(version):
        cfg = harness.envoy_config(port, admin, mock.port,
                                   [harness.wasm_filter(config(version), env_keys=sorted(PROVIDER_ENV))],
                                   extra_clusters=[harness.grpc_cluster("tollgate_rls", rls.port)])
        return cfg, cfg["static_resources"]["listeners"]

    cfg, _ = listeners(1)
    # One worker: every request draws on the same lease.
    e = harness.Envoy(cfg, env=PROVIDER_ENV, logdir=str(tmp_path), concurrency=1, lds=True)
    e.listeners = listeners
    yield e
    e.stop()


def test_a_replaced_plugin_gives_back_its_leases(lds_envoy, redis):
    e = lds_envoy
    auth = {"authorization": "Bearer " + KEY}
    for _ in range(3):
        r = harness.request(e.port, "/v1/chat/completions", CHAT, auth)
        assert r.status == 200, r.body
    # The first request reserved itself (no answer yet to size a lease by),
    # the second itself and a lease of 10, the third drew on the lease.
    assert requests_today(redis) == 12
    e.update_listeners(e.listeners(2)[1])
    assert wait_for(lambda: e.stats("listener_manager.listener_modified").get(
        "listener_manager.listener_modified"), 1) == 1
    # The old listener drains (--drain-time-s 1) and its plugin is removed:
    # the 9 requests' worth it never used go back.
    assert wait_for(lambda: requests_today(redis), 3) == 3, e.proc.output()[-3000:]
    out = e.proc.output()
    assert "plugin removed: giving back 1 quota leases" in out
    assert "removed plugin drained" in out
    # The new plugin serves.
    r = harness.request(e.port, "/v1/chat/completions", CHAT, auth)
    assert r.status == 200, r.body
    assert wait_for(lambda: requests_today(redis), 4) == 4
    assert e.stats("tollgate.settle.dropped").get("tollgate.settle.dropped", 0) == 0
