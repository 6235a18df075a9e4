"""Provider failover through real Envoy: two provider targets (two mock
providers), circuits shared by Envoy's two workers, a provider 429's
retry-after, every target down, timeouts, and the audit trail of it all."""

import time

import pytest

import harness
from conftest import KEY_A, KEY_B, PROVIDER_ENV, Stack, plugin_config

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
AZURE_KEY = "azure-key-acme-eu"
ENV = dict(PROVIDER_ENV, ACME_AZURE_KEY=AZURE_KEY)
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
CLAUDE = {"model": "claude-3-5-haiku-20241022", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def cluster(name, port):
    return {
        "name": name, "type": "STATIC", "connect_timeout": "2s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
    }


def failover_plugin():
    cfg = plugin_config()
    cfg["providers"]["openai"]["targets"] = [{"provider": "openai"}, {"provider": "azure-eu"}]
    cfg["providers"]["azure-eu"] = {"credential_header": "api-key", "model_map": {"gpt-4o-mini": "mini-eu"}}
    cfg["providers"]["anthropic"]["targets"] = [{"provider": "anthropic"}]
    cfg["tenants"][0]["provider_key_env"]["azure-eu"] = "ACME_AZURE_KEY"
    cfg["circuit_breaker"] = {"consecutive_failures": 3, "open_seconds": 2}
    return cfg


@pytest.fixture(scope="module")
def mocks(tmp_path_factory):
    a = harness.MockLLM(logdir=str(tmp_path_factory.mktemp("mock-a")))
    b = harness.MockLLM(logdir=str(tmp_path_factory.mktemp("mock-b")))
    yield a, b
    a.stop()
    b.stop()


ROUTES = [
    {"match": {"prefix": "/v1/", "headers": [{"name": "x-tollgate-provider",
                                               "string_match": {"exact": "azure-eu"}}]},
     "route": {"cluster": "azure_eu", "prefix_rewrite": "/openai/v1/", "timeout": "5s"}},
    # Any other target name: refused (a request with no header, like
    # Anthropic's here, passes on: an inverted match needs the header).
    {"match": {"prefix": "/", "headers": [{"name": "x-tollgate-provider",
                                           "string_match": {"safe_regex": {"regex": "^(openai|anthropic)$"}},
                                           "invert_match": True}]},
     "direct_response": {"status": 502, "body": {"inline_string": "no route for this target"}}},
    {"match": {"prefix": "/"}, "route": {"cluster": "llm_upstream", "timeout": "1s"}},
]


def stack(mocks, tmp_path, plugin):
    a, b = mocks
    return Stack(a, str(tmp_path), plugin=plugin, routes=ROUTES,
                 extra_clusters=[cluster("azure_eu", b.port)], provider_env=ENV)


@pytest.fixture
def fo(wasm, mocks, tmp_path):
    """A fresh Envoy (fresh circuits) in front of target A (openai,
    anthropic) and target B (azure-eu, Azure's v1 path)."""
    a, b = mocks
    a.recover()
    b.recover()
    a.clear()
    b.clear()
    s = stack(mocks, tmp_path, failover_plugin())
    yield s
    s.stop()
    a.recover()
    b.recover()


def acme(s, body=BODY, path=CHAT, **kw):
    return s.post(path, body, {"authorization": "Bearer " + KEY_A}, **kw)


def globex(s, body=BODY, path=CHAT):
    return s.post(path, body, {"authorization": "Bearer " + KEY_B})


def no_tollgate_headers(*mocks):
    for m in mocks:
        for rec in m.requests():
            assert not [k for k, _ in rec["headers"] if k.startswith("x-tollgate-")], rec["headers"]


def stat(s, name):
    """A tollgate stat by its name without tags, summed over tag values."""
    total = 0
    for k, v in s.envoy.stats("tollgate").items():
        if k.endswith(name) and isinstance(v, int):
            total += v
    return total


def test_a_failing_target_moves_traffic_to_the_next_and_gets_it_back(fo, mocks):
    a, b = mocks
    a.fail(503)
    for _ in range(3):
        r = acme(fo)
        assert r.status == 503, r.body  # the provider's own answer, passed on
    # The circuit is open on both workers: the next requests go to Azure,
    # with its credential, its deployment name and its path.
    for _ in range(4):
        r = acme(fo)
        assert r.status == 200, r.body
    got = b.requests()
    assert len(got) == 4
    rec = got[-1]
    assert rec["path"] == "/openai/v1/chat/completions"
    assert rec["header_map"]["api-key"] == AZURE_KEY
    assert "authorization" not in rec["header_map"]
    import json
    assert json.loads(rec["body"])["model"] == "mini-eu"
    # globex holds no Azure key: nowhere to go while openai is open.
    r = globex(fo)
    assert r.status == 503
    err = r.json()["error"]
    assert err["code"] == "provider_unavailable" and err["type"], err
    assert 1 <= int(r.header("retry-after")) <= 2
    assert r.header("x-should-retry") == "true"
    # openai recovers; once the open period is over one probe goes there,
    # succeeds, and the circuit closes for everyone.
    a.recover()
    a.clear()
    time.sleep(2.2)
    for _ in range(3):
        assert acme(fo).status == 200
    assert globex(fo).status == 200
    assert len(a.requests()) == 4
    assert len(b.requests()) == 4
    no_tollgate_headers(a, b)
    # Metrics by tenant and target, and the circuit's gauge.
    deadline = time.time() + 3
    while time.time() < deadline and stat(fo, "target.openai.target_errors") < 3:
        time.sleep(0.1)
    assert stat(fo, "target.openai.target_errors") == 3
    assert stat(fo, "target.azure-eu.target_requests") == 4
    # The gauge is set on the next tick of the worker that closed it.
    deadline = time.time() + 3
    while time.time() < deadline and stat(fo, "target.openai.target_circuit_state") != 0:
        time.sleep(0.1)
    assert stat(fo, "target.openai.target_circuit_state") == 0
    assert stat(fo, "limit.provider_unavailable.refused") == 1
    # The refusal is in the audit trail with its tenant and code.
    log = open(fo.access_log).read()
    assert '"tg_error":"provider_unavailable"' in log.replace(" ", "")
    assert "circuit opened" in fo.envoy.proc.output() and "circuit closed" in fo.envoy.proc.output()


def test_a_provider_429_pauses_that_credential_for_its_retry_after(fo, mocks):
    a, b = mocks
    a.fail(429, retry_after=2)
    r = acme(fo)
    assert r.status == 429
    a.recover()
    # acme's key is paused on openai for 2 s: it goes to Azure meanwhile;
    # globex's own key was never throttled and keeps openai.
    assert acme(fo).status == 200
    assert globex(fo).status == 200
    assert len(b.requests()) == 1
    assert len(a.requests()) == 2
    time.sleep(2.1)
    assert acme(fo).status == 200
    assert len(a.requests()) == 3 and len(b.requests()) == 1
    deadline = time.time() + 3
    while time.time() < deadline and stat(fo, "target.openai.target_rate_limited") < 1:
        time.sleep(0.1)
    assert stat(fo, "target.openai.target_rate_limited") == 1
    no_tollgate_headers(a, b)


def test_every_target_down_is_a_503_in_the_apis_envelope_with_retry_after(fo, mocks):
    a, _ = mocks
    a.fail(500)
    for _ in range(3):
        assert acme(fo, CLAUDE, MESSAGES).status == 500
    r = acme(fo, CLAUDE, MESSAGES)
    assert r.status == 503
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "overloaded_error", body
    assert r.header("retry-after") in ("1", "2")
    assert r.header("x-tollgate-error") == "provider_unavailable"
    # No request reached the provider while its circuit was open.
    assert len(a.requests()) == 3


def test_timeouts_open_the_circuit(fo, mocks):
    a, b = mocks
    slow = {"authorization": "Bearer " + KEY_A, "x-mock-first-byte-ms": "1500"}
    for _ in range(3):
        r = fo.post(CHAT, BODY, slow)
        assert r.status == 504, r.body  # Envoy's route timeout
    r = fo.post(CHAT, BODY, slow)
    assert r.status == 200  # Azure: its route allows 5 s
    assert len(b.requests()) == 1
    deadline = time.time() + 3
    while time.time() < deadline and stat(fo, "target.openai.target_timeouts") < 3:
        time.sleep(0.1)
    assert stat(fo, "target.openai.target_timeouts") == 3


def test_a_target_without_its_route_is_refused_not_sent_on(wasm, mocks, tmp_path):
    # A third target the Envoy routes do not know: once the first two are
    # down, its requests meet the guard route (502), and no provider sees
    # its credential.
    a, b = mocks
    a.recover(), b.recover(), a.clear(), b.clear()
    plugin = failover_plugin()
    plugin["providers"]["openai"]["targets"].append({"provider": "azure-us"})
    plugin["providers"]["azure-us"] = {"credential_header": "api-key"}
    plugin["tenants"][0]["provider_key_env"]["azure-us"] = "ACME_AZURE_US_KEY"
    s = Stack(a, str(tmp_path), plugin=plugin, routes=ROUTES,
              extra_clusters=[cluster("azure_eu", b.port)], provider_env=dict(ENV, ACME_AZURE_US_KEY="azure-us-key"))
    try:
        a.fail(503)
        b.fail(503)
        for _ in range(6):
            assert acme(s).status == 503
        a.clear()
        b.clear()
        r = acme(s)
        assert r.status == 502, r.body
        assert a.requests() == [] and b.requests() == []
    finally:
        s.stop()
        a.recover()
        b.recover()
