"""Limits at every level in one reserve, through real Envoy, the real
rate-limit service and Redis (single node, and the three-node cluster):
an API key's own budget, end users, the shared provider pool and its tier
shares, shadow mode, hourly and weekly windows."""

import copy
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

import harness
import mock_llm as M
from conftest import PRICING, ROUTES, Stack

RUN = uuid.uuid4().hex[:6]  # ids unique per run: Redis state is shared
CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
PROVIDERS = {"openai": {"credential_header": "authorization"},
             "anthropic": {"credential_header": "x-api-key"},
             "gemini": {"credential_header": "x-goog-api-key"}}
ENV = {"openai": "ACME_OPENAI_KEY", "anthropic": "ACME_ANTHROPIC_KEY", "gemini": "ACME_GEMINI_KEY"}
KEY_BUDGET_USD = 0.01
POOL_RPM = 60
FREE_SHARE = 0.25


def key(name):
    return "sk-levels-%s-%s" % (name, RUN)


def tid(name):
    return "%s-%s" % (name, RUN)


def tenant(name, tier, keys=None, plain=True, **over):
    t = {"id": tid(name), "tier": tier, "provider_key_env": ENV,
         "api_key_sha256": [harness.sha256_hex(key(name))] if plain else []}
    if keys:
        t["keys"] = keys
    if over:
        t["overrides"] = over
    return t


def routes(trusted=True):
    r = copy.deepcopy(ROUTES)
    for route in r:
        if route.get("path") == CHAT:
            route["trust_end_user_header"] = trusted
    return r


def levels_config(pool_prefix="pool"):
    return {
        "providers": PROVIDERS,
        "routes": routes(),
        "identity": {"end_user_header": "x-end-user"},
        "rate_limit": {"cluster": "tollgate_rls", "timeout_ms": 500},
        "pricing": PRICING,
        "tiers": {
            "keyed": {"models": ["*"], "tokens_per_day": 10_000_000, "clamp_max_output_tokens": True,
                      "default_max_output_tokens": 100},
            "peruser": {"models": ["*"], "requests_per_minute": 10_000, "users": {"requests_per_minute": 3}},
            "free": {"models": ["*"], "requests_per_minute": 10_000},
            "enterprise": {"models": ["*"], "requests_per_minute": 10_000},
            "enforce": {"models": ["*"], "requests_per_minute": 5},
            "shadow": {"models": ["*"], "requests_per_minute": 5, "shadow": True},
            "windows": {"models": ["*"], "requests_per_hour": 2},
            "weekly": {"models": ["*"], "tokens_per_week": 60, "lease_requests": 0},
            "quota": {"models": ["*"], "requests_per_minute": 2, "usd_per_month": 50},
        },
        "pools": [{"name": "%s-%s" % (pool_prefix, RUN), "provider": "openai", "models": ["gpt-4o-mini"],
                   "limits": {"requests_per_minute": POOL_RPM}, "tier_shares": {"free": FREE_SHARE}}],
        "tenants": [
            tenant("kb", "keyed", keys=[{"id": "ci", "sha256": harness.sha256_hex(key("kb-ci")),
                                         "limits": {"usd_per_day": KEY_BUDGET_USD}}]),
            tenant("eu", "peruser"),
            tenant("noisy", "free"),
            tenant("big", "enterprise"),
            tenant("enf", "enforce"),
            tenant("sh", "shadow"),
            tenant("hourly", "windows"),
            tenant("week", "weekly"),
            tenant("qt", "quota", keys=[{"id": "q1", "sha256": harness.sha256_hex(key("qt-q1")),
                                         "limits": {"usd_per_day": 10}}]),
        ],
    }


@pytest.fixture(scope="module")
def vstack(wasm, mock, redis, tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp("levels"))
    rls = harness.RateLimitService(redis.port, logdir=logdir)
    s = Stack(mock, logdir, plugin=levels_config(),
              extra_clusters=[harness.grpc_cluster("tollgate_rls", rls.port)])
    s.rls = rls
    yield s
    s.stop()
    rls.stop()


def chat(stack, k, model="gpt-4o-mini", headers=None, stream=False, **body):
    b = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        b["stream"] = True
    b.update(body)
    h = {"authorization": "Bearer " + k}
    h.update(headers or {})
    return harness.request(stack.port, CHAT, b, h)


def mock_count(mock, run, since):
    return [r for r in mock.requests() if r["time"] >= since and r["header_map"].get("x-test-run") == run]


def test_a_key_budget_holds_under_32_concurrent_streams_and_the_tenants_other_keys_keep_working(vstack):
    rids = ["kb-%s-%d" % (RUN, i) for i in range(32)]

    def one(rid):
        return chat(vstack, key("kb-ci"), model="gpt-4o", stream=True,
                    headers={"x-request-id": rid, "x-mock-output-tokens": "150"})

    with ThreadPoolExecutor(max_workers=32) as ex:
        results = list(ex.map(one, rids))
    codes = [r.status for r in results]
    assert set(codes) <= {200, 429}, codes
    refused = [r for r in results if r.status == 429]
    assert refused, "a $%.2f budget admitted 32 requests of ~$0.001" % KEY_BUDGET_USD
    for r in refused:
        assert r.header("x-tollgate-error") == "key_daily_spend_budget_exhausted", r.body[:300]
        assert r.header("x-should-retry") == "false"
    admitted = [rid for rid, r in zip(rids, results) if r.status == 200]
    logs = vstack.access_log_lines(set(admitted), timeout=20)
    spent = sum(float(logs[rid]["tg_cost_usd"]) for rid in admitted)
    # Exact with the clamp on: never above the key's budget; and most of it used.
    assert spent <= KEY_BUDGET_USD + 1e-9, spent
    assert spent >= KEY_BUDGET_USD * 0.5, (spent, len(admitted))
    assert all(logs[rid]["tg_key"] == "ci" for rid in admitted)
    # The tenant's other key has no key budget: it keeps working.
    for _ in range(3):
        r = chat(vstack, key("kb"), model="gpt-4o")
        assert r.status == 200, r.body[:300]


def test_an_end_user_limit_refuses_one_user_while_others_pass(vstack):
    alice = [chat(vstack, key("eu"), headers={"x-end-user": "alice-" + RUN}).status for _ in range(5)]
    assert alice[:3] == [200, 200, 200] and alice[3:] == [429, 429], alice
    r = chat(vstack, key("eu"), headers={"x-end-user": "alice-" + RUN})
    assert r.header("x-tollgate-error") == "user_request_rate_limited"
    assert r.header("x-tollgate-limit") == "user.requests_per_minute"
    assert r.header("x-should-retry") == "true" and r.header("retry-after")
    bob = [chat(vstack, key("eu"), headers={"x-end-user": "bob-" + RUN}).status for _ in range(3)]
    assert bob == [200, 200, 200]
    # Without the header the tenant is limited as a whole, not as a user.
    assert chat(vstack, key("eu")).status == 200


def test_a_clients_end_user_header_is_dropped_and_ignored_where_not_trusted(vstack, mock):
    since = time.time()
    run = "eu-untrusted-" + RUN
    # /v1/messages does not trust the header: the exhausted user passes
    # there, and the header never reaches the provider.
    for _ in range(4):
        r = harness.request(vstack.port, MESSAGES,
                            {"model": "claude-3-5-haiku", "max_tokens": 5, "messages": []},
                            {"x-api-key": key("eu"), "x-end-user": "carol-" + RUN, "x-test-run": run})
        assert r.status == 200, r.body[:300]
    seen = mock_count(mock, run, since)
    assert len(seen) == 4
    assert all("x-end-user" not in rec["header_map"] for rec in seen)


def test_pool_noisy_neighbour_free_tier_never_takes_more_than_its_share(vstack, mock):
    since = time.time()
    noisy, big = [], []

    def flood():
        end = time.time() + 3
        while time.time() < end:
            noisy.append(chat(vstack, key("noisy"), headers={"x-test-run": "pool-" + RUN}))

    with ThreadPoolExecutor(max_workers=8) as ex:
        floods = [ex.submit(flood) for _ in range(6)]
        time.sleep(0.3)
        for _ in range(20):
            big.append(chat(vstack, key("big"), headers={"x-test-run": "pool-" + RUN}))
        for f in floods:
            f.result()
    elapsed = time.time() - since
    share = int(POOL_RPM * FREE_SHARE)
    admitted = sum(r.status == 200 for r in noisy)
    # The free tier's share of a 60/min pool is 15/min: its burst, plus the
    # refill over the test.
    assert admitted <= share + int(elapsed * share / 60) + 1, (admitted, len(noisy), elapsed)
    refused = [r for r in noisy if r.status == 429]
    assert refused, "the flood was never refused"
    assert {r.header("x-tollgate-error") for r in refused} == {"provider_pool_request_rate_limited"}
    assert all(r.header("x-should-retry") == "true" and r.header("retry-after") for r in refused)
    # The enterprise tenant gets no refusal at all.
    assert [r.status for r in big] == [200] * 20
    # The provider never saw more than the pool allows.
    got = len(mock_count(mock, "pool-" + RUN, since))
    assert got == admitted + 20
    assert got <= POOL_RPM + int(elapsed * POOL_RPM / 60) + 1, (got, elapsed)


def test_shadow_mode_marks_one_for_one_what_enforce_refuses(vstack):
    enforce, shadow = [], []
    for i in range(9):
        enforce.append(chat(vstack, key("enf")))
        shadow.append(chat(vstack, key("sh"), headers={"x-request-id": "sh-%s-%d" % (RUN, i)}))
    refused = [i for i, r in enumerate(enforce) if r.status == 429]
    marked = [i for i, r in enumerate(shadow) if r.header("x-tollgate-shadow-refusal")]
    assert refused, "enforce mode refused nothing"
    assert marked == refused
    assert all(r.status == 200 for r in shadow), [r.status for r in shadow]
    assert {shadow[i].header("x-tollgate-shadow-refusal") for i in marked} == {"request_rate_limited"}
    logs = vstack.access_log_lines({"sh-%s-%d" % (RUN, i) for i in marked}, timeout=10)
    assert {rec["tg_shadow_refusal"] for rec in logs.values()} == {"request_rate_limited"}
    stats = harness.request(vstack.admin_port, "/stats?filter=shadow_refused", method="GET").body.decode()
    assert "shadow_refused" in stats, stats


def test_hourly_and_weekly_windows(vstack):
    codes = [chat(vstack, key("hourly")) for _ in range(3)]
    assert [r.status for r in codes] == [200, 200, 429]
    assert codes[2].header("x-tollgate-limit") == "requests_per_hour"
    # 60 tokens a week: the estimate (body bytes / 4 plus max_tokens 20) fits once or twice.
    week = [chat(vstack, key("week"), max_tokens=20) for _ in range(4)]
    assert week[0].status == 200
    refused = [r for r in week if r.status == 429]
    assert refused and refused[0].header("x-tollgate-error") == "weekly_token_budget_exhausted"
    assert refused[0].header("x-should-retry") == "false"


def quota(stack, k):
    r = harness.request(stack.port, "/tollgate/v1/quota", None, {"authorization": "Bearer " + k}, method="GET")
    assert r.status == 200, r.body[:300]
    return {(x["level"], x["name"]): x for x in r.json()["limits"]}, r.json()


def test_the_quota_endpoint_shows_what_is_left_and_drops_by_exactly_the_metered_cost(vstack):
    before, body = quota(vstack, key("qt-q1"))
    assert (body["tenant"], body["key"]) == (tid("qt"), "q1")
    assert set(before) == {("tenant", "requests_per_minute"), ("tenant", "usd_per_month"), ("key", "usd_per_day")}
    # Asking charged nothing, however often (the tier allows 2 requests a minute).
    for _ in range(4):
        assert quota(vstack, key("qt-q1"))[0][("tenant", "requests_per_minute")]["remaining"] == 2
    r = chat(vstack, key("qt-q1"), model="gpt-4o", max_tokens=20)
    assert r.status == 200
    cost = round(float(r.header("x-tollgate-cost-usd")) * 1e6)
    assert cost > 0
    # The response said what the tightest dollar budget has left after its charge.
    left_header = round(float(r.header("x-tollgate-budget-remaining-usd")) * 1e6)
    assert r.header("x-tollgate-budget-remaining-usd-limit") == "key.usd_per_day"
    deadline = time.time() + 5
    while True:
        after, _ = quota(vstack, key("qt-q1"))
        moved = [before[k]["remaining"] - after[k]["remaining"] for k in (("key", "usd_per_day"),
                                                                         ("tenant", "usd_per_month"))]
        if moved == [cost, cost] or time.time() > deadline:
            break
        time.sleep(0.1)
    assert moved == [cost, cost], (moved, cost)
    assert after[("key", "usd_per_day")]["remaining"] == left_header
    assert after[("key", "usd_per_day")]["used"] == cost
    # Another tenant's key sees its own levels only.
    _, other = quota(vstack, key("big"))
    assert other["tenant"] == tid("big") and tid("qt") not in json.dumps(other)
    # No key: 401 in the OpenAI envelope.
    r = harness.request(vstack.port, "/tollgate/v1/quota", None, {}, method="GET")
    assert r.status == 401 and r.json()["error"]["code"] == "missing_api_key"


@pytest.fixture(scope="module")
def cstack(wasm, mock, tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp("levels-cluster"))
    cluster = harness.RedisCluster(logdir)
    rls = harness.RateLimitService(0, logdir=logdir, cluster_nodes=cluster.nodes())
    cfg = levels_config(pool_prefix="cpool")
    cfg["pools"][0]["limits"] = {"requests_per_minute": 10}
    cfg["pools"][0]["tier_shares"] = {}
    cfg["tiers"]["daily"] = {"models": ["*"], "requests_per_day": 3}
    cfg["tiers"]["counted"] = {"models": ["*"], "requests_per_day": 100}
    cfg["tenants"] = [tenant("ct-day", "daily"), tenant("ct-counted", "counted"), tenant("ct-free", "free")]
    s = Stack(mock, logdir, plugin=cfg, extra_clusters=[harness.grpc_cluster("tollgate_rls", rls.port)])
    s.rls, s.cluster = rls, cluster
    yield s
    s.stop()
    rls.stop()
    cluster.stop()


def test_a_tenant_and_pool_reserve_on_the_three_node_cluster_charges_all_or_nothing(cstack):
    t0 = time.time()
    # The tenant's budget refuses: the pool keeps what it did not serve.
    day = [chat(cstack, key("ct-day")).status for _ in range(6)]
    assert day == [200, 200, 200, 429, 429, 429], day
    # The pool (10 a minute) refuses: the tenant is charged only what passed.
    counted = [chat(cstack, key("ct-counted")).status for _ in range(12)]
    elapsed = time.time() - t0
    refill = int(elapsed * 10 / 60) + 1
    ok = counted.count(200)
    # 3 of the pool went to ct-day; its refused requests took nothing.
    assert 7 <= ok <= 7 + refill, (counted, elapsed)
    # The tenant's day counter on its own node holds exactly what was admitted.
    tag = "{tollgate|%s}" % tid("ct-counted")
    found = None
    for port in cstack.cluster.ports:
        out = harness.subprocess.run(["redis-cli", "-c", "-p", str(port), "--scan", "--pattern",
                                      "tg:%s:D:*" % tag], capture_output=True, timeout=10).stdout.decode().split()
        for k in out:
            if "requests_per_day" in k:
                found = harness.subprocess.run(["redis-cli", "-c", "-p", str(port), "GET", k], capture_output=True,
                                               timeout=10).stdout.decode().strip()
    assert found == str(ok), (found, ok)
    assert chat(cstack, key("ct-free")).status in (200, 429)
