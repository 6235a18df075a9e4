"""The 2026 endpoints and usage shapes through real Envoy, the rate-limit
service and Redis: Anthropic usage.iterations (compaction and advisor calls
priced at their own models), OpenAI /v1/responses/compact (billed), token
counting (free, one request against request limits), Gemini's Interactions
API, and the Azure OpenAI v1 and Bedrock routes that parse as OpenAI and
Anthropic."""

import copy
import json
import uuid

import pytest

import harness
import mock_llm as M
from conftest import KEY_A, PRICING, LimitedStack, limited_config

N = 5  # output tokens asked of the mock
RUN = uuid.uuid4().hex[:6]  # tenant ids unique per run: Redis state is shared
COUNTER_KEY = "sk-endpoints-counter-" + RUN

OPUS = {"input": 5.0, "cached_input": 0.5, "output": 25.0}
PRICES = copy.deepcopy(PRICING)
PRICES["models"][M.ADVISOR_MODEL] = OPUS
PRICES["models"]["gpt-4o-mini"] = dict(PRICES["models"]["gpt-4o-mini"], service_tiers={"priority": {"multiplier": 2}})


def pico(p, usage):
    """Integer pico-dollars of `usage` at prices `p` (USD per million tokens)."""
    rate = lambda k, d: round(p.get(k, p[d]) * 1e6)  # noqa: E731
    return (usage.get("input", 0) * rate("input", "input")
            + usage.get("cache_read", 0) * rate("cached_input", "input")
            + usage.get("cache_write", 0) * rate("cache_write", "input")
            + usage.get("output", 0) * rate("output", "output"))


def usd(p):
    micros = -(-p // 1_000_000)
    return "%d.%06d" % divmod(micros, 1_000_000)


@pytest.fixture(scope="module")
def estack(wasm, mock, rls, tmp_path_factory):
    cfg = limited_config()
    cfg["pricing"] = PRICES
    cfg["metering"] = {"stream_usage_comment": False}
    cfg["routes"] = [
        {"path_prefix": "/v1/responses", "api": "openai_responses", "provider": "openai"},
        {"path_prefix": "/v1/messages", "api": "anthropic_messages", "provider": "anthropic"},
        # Azure OpenAI v1 API and Bedrock's compatible endpoints: the same APIs on other paths.
        {"path": "/openai/v1/chat/completions", "api": "openai_chat", "provider": "openai"},
        {"path_prefix": "/openai/v1/responses", "api": "openai_responses", "provider": "openai"},
        {"path": "/anthropic/v1/messages", "api": "anthropic_messages", "provider": "anthropic"},
        {"path": "/v1beta/interactions", "api": "gemini_interactions", "provider": "gemini"},
    ] + [r for r in cfg["routes"] if r.get("path") not in ("/v1/responses", "/v1/messages")]
    cfg["tiers"]["enterprise"]["tokens_per_month"] = 10_000_000
    # Token counting is free, but a request: 3 a minute; one token a minute
    # refuses any billable request.
    cfg["tiers"]["counting"] = {"models": ["*"], "requests_per_minute": 3, "tokens_per_minute": 1,
                                "lease_requests": 0}
    cfg["tenants"].append({"id": "counter-" + RUN, "tier": "counting",
                           "api_key_sha256": [harness.sha256_hex(COUNTER_KEY)],
                           "provider_key_env": {"openai": "ACME_OPENAI_KEY", "anthropic": "ACME_ANTHROPIC_KEY"}})
    s = LimitedStack(mock, rls, str(tmp_path_factory.mktemp("estack")), cfg)
    yield s
    s.stop()


def tokens(log):
    return {k: int(log["tg_tokens_" + k]) for k in ("input", "cache_read", "cache_write", "output", "total")}


HAIKU = "claude-3-5-haiku-20241022"


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_iterations_are_added_and_priced_at_their_own_models(estack, stream):
    rid = "iterations-%s-%s" % (stream, RUN)
    body = {"model": HAIKU, "max_tokens": N, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    r = estack.post("/v1/messages", body,
                    {"authorization": "Bearer " + KEY_A, "x-request-id": rid, "x-mock-iterations": "1"})
    assert r.status == 200, r.body[:300]
    log = estack.access_log_lines({rid})[rid]
    top = {"input": M.ANTHROPIC_INPUT, "cache_read": M.ANTHROPIC_CACHE_READ,
           "cache_write": M.ANTHROPIC_CACHE_WRITE, "output": N}
    comp = {"input": M.ITERATION_COMPACTION["input_tokens"], "output": M.ITERATION_COMPACTION["output_tokens"]}
    adv = {"input": M.ITERATION_ADVISOR["input_tokens"], "cache_read": M.ITERATION_ADVISOR["cache_read_input_tokens"],
           "output": M.ITERATION_ADVISOR["output_tokens"]}
    want = {k: top.get(k, 0) + comp.get(k, 0) + adv.get(k, 0) for k in ("input", "cache_read", "cache_write", "output")}
    want["total"] = sum(want.values())
    assert tokens(log) == want
    assert log["tg_estimated"] == "false" and log["tg_outcome"] == "ok"
    # The top level and the compaction at the response's model (Haiku), the
    # advisor call at its own (Opus): exact, rounded up once.
    haiku = PRICES["models"]["claude-3-5-haiku"]
    expected = pico(haiku, top) + pico(haiku, comp) + pico(OPUS, adv)
    assert log["tg_cost_usd"] == usd(expected), (log["tg_cost_usd"], expected)
    # Without the advisor priced apart it would be cheaper: the two models matter.
    assert usd(pico(haiku, top) + pico(haiku, comp) + pico(haiku, adv)) != log["tg_cost_usd"]


def test_responses_compact_is_billed_as_the_requested_model(estack, mock):
    rid = "compact-" + RUN
    mock.clear()
    body = {"model": "gpt-4o", "input": [{"role": "user", "content": "summarise everything so far"}]}
    r = estack.post("/v1/responses/compact", body, {"authorization": "Bearer " + KEY_A, "x-request-id": rid})
    assert r.status == 200, r.body[:300]
    assert json.loads(r.body)["object"] == "response.compaction"
    # The compact call takes no max-output field: none is written in.
    sent = json.loads(mock.requests()[-1]["body"])
    assert sent == body
    log = estack.access_log_lines({rid})[rid]
    want = {"input": M.COMPACT_INPUT - M.COMPACT_CACHED, "cache_read": M.COMPACT_CACHED, "cache_write": 0,
            "output": M.COMPACT_OUTPUT, "total": M.COMPACT_INPUT + M.COMPACT_OUTPUT}
    assert tokens(log) == want
    assert log["tg_model_answered"] == "gpt-4o"
    assert log["tg_estimated"] == "false" and log["tg_outcome"] == "ok"
    assert log["tg_cost_usd"] == usd(pico(PRICES["models"]["gpt-4o"], want)) != "0.000000"
    assert r.header("x-tollgate-cost-usd") == log["tg_cost_usd"]


def test_token_counting_is_free_but_counts_as_a_request(estack, mock):
    auth = {"authorization": "Bearer " + COUNTER_KEY}
    # A billable request needs more than the tier's one token a minute.
    r = estack.post("/v1/messages", {"model": HAIKU, "max_tokens": N, "messages": [{"role": "user", "content": "x"}]},
                    auth)
    assert r.status == 429, r.body[:300]
    mock.clear()
    calls = [("/v1/messages/count_tokens", {"model": HAIKU, "messages": [{"role": "user", "content": "hi"}]}),
             ("/v1/responses/input_tokens", {"model": "gpt-4o", "input": "hi"}),
             ("/v1/messages/count_tokens", {"model": HAIKU, "messages": [{"role": "user", "content": "hey"}]})]
    rids = []
    for i, (path, body) in enumerate(calls):
        rid = "count-%d-%s" % (i, RUN)
        rids.append(rid)
        r = estack.post(path, body, dict(auth, **{"x-request-id": rid}))
        assert r.status == 200, (path, r.body[:300])
        assert json.loads(r.body)["input_tokens"] == M.COUNTED_INPUT
    logs = estack.access_log_lines(set(rids))
    for rid in rids:
        log = logs[rid]
        assert tokens(log) == {"input": 0, "cache_read": 0, "cache_write": 0, "output": 0, "total": 0}, rid
        assert log["tg_cost_usd"] == "0.000000" and log["tg_estimated"] == "false" and log["tg_outcome"] == "ok"
    # Forwarded as sent: no max-output field written into a counting call.
    assert [json.loads(rec["body"]) for rec in mock.requests()] == [b for _, b in calls]
    # The fourth request of the minute is over the request limit.
    r = estack.post("/v1/messages/count_tokens", calls[0][1], auth)
    assert r.status == 429, r.body[:300]
    assert json.loads(r.body)["error"]["type"] == "rate_limit_error"


def test_azure_v1_and_bedrock_routes_parse_as_openai_and_anthropic(estack, mock):
    auth = {"authorization": "Bearer " + KEY_A}
    mock.clear()
    cases = [
        # Azure OpenAI v1: no api-version, `model` is the deployment name.
        ("/openai/v1/chat/completions", {"model": "prod-gpt-4o-mini", "max_tokens": N, "stream": True,
                                         "messages": [{"role": "user", "content": "hi"}]}),
        ("/openai/v1/responses", {"model": "prod-gpt-4o", "max_output_tokens": N, "input": "hi"}),
        # Bedrock: OpenAI-compatible (bedrock-runtime /openai/v1) and Anthropic-compatible (bedrock-mantle).
        ("/anthropic/v1/messages", {"model": "anthropic.claude-3-5-haiku", "max_tokens": N, "stream": True,
                                    "messages": [{"role": "user", "content": "hi"}]}),
    ]
    for path, body in cases:
        rid = "compat-%s-%s" % (path.strip("/").replace("/", "-"), RUN)
        r = estack.post(path, body, dict(auth, **{"x-request-id": rid}))
        assert r.status == 200, (path, r.body[:300])
        log = estack.access_log_lines({rid})[rid]
        if "anthropic" in path:
            want = {"input": M.ANTHROPIC_INPUT, "cache_read": M.ANTHROPIC_CACHE_READ,
                    "cache_write": M.ANTHROPIC_CACHE_WRITE, "output": N}
        else:
            want = {"input": M.OPENAI_PROMPT - M.OPENAI_CACHED, "cache_read": M.OPENAI_CACHED, "cache_write": 0,
                    "output": N}
        want["total"] = sum(want.values())
        assert tokens(log) == want, path
        assert log["tg_estimated"] == "false" and log["tg_outcome"] == "ok", path
        assert log["tg_model_requested"] == body["model"]
        assert log["tg_api"] == {"/openai/v1/chat/completions": "openai_chat", "/openai/v1/responses":
                                 "openai_responses", "/anthropic/v1/messages": "anthropic_messages"}[path]
    # What reached the provider went to the same paths; the chat stream was
    # asked for usage as on OpenAI's own path.
    recs = mock.requests()
    assert [rec["path"] for rec in recs] == [p for p, _ in cases]
    assert json.loads(recs[0]["body"])["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("stream", [False, True])
def test_gemini_interactions_are_metered_with_cached_tokens_inside_the_input(estack, mock, stream):
    rid = "interactions-%s-%s" % (stream, RUN)
    mock.clear()
    body = {"model": "gemini-2.0-flash", "input": "hi", "stream": stream, "generation_config": {"max_output_tokens": N}}
    r = estack.post("/v1beta/interactions", body, {"authorization": "Bearer " + KEY_A, "x-request-id": rid})
    assert r.status == 200, r.body[:300]
    assert json.loads(mock.requests()[-1]["body"]) == body
    log = estack.access_log_lines({rid})[rid]
    n = N
    want = {"input": M.GEMINI_PROMPT - M.GEMINI_CACHED, "cache_read": M.GEMINI_CACHED, "cache_write": 0,
            "output": n + M.GEMINI_THOUGHTS, "total": M.GEMINI_PROMPT + n + M.GEMINI_THOUGHTS}
    assert tokens(log) == want
    assert log["tg_api"] == "gemini_interactions"
    assert log["tg_estimated"] == "false" and log["tg_outcome"] == "ok"
    assert log["tg_cost_usd"] == usd(pico(PRICES["models"]["gemini-2.0-flash"], want))


@pytest.mark.parametrize("stream", [False, True])
def test_the_served_service_tier_is_in_the_access_log_and_billed(estack, stream):
    auth = {"authorization": "Bearer " + KEY_A}
    body = {"model": "gpt-4o-mini", "max_tokens": N, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    want = {"input": M.OPENAI_PROMPT - M.OPENAI_CACHED, "cache_read": M.OPENAI_CACHED, "cache_write": 0, "output": N}
    base = pico(PRICES["models"]["gpt-4o-mini"], want)
    for asked, served, factor in (("fast", "priority", 2), ("auto", "standard", 1), (None, "", 1)):
        rid = "tier-%s-%s-%s" % (stream, asked, RUN)
        b = dict(body, service_tier=asked) if asked else body
        r = estack.post("/v1/chat/completions", b, dict(auth, **{"x-request-id": rid}))
        assert r.status == 200, r.body[:300]
        log = estack.access_log_lines({rid})[rid]
        assert log["tg_service_tier"] == served, (asked, log["tg_service_tier"])
        assert log["tg_cost_usd"] == usd(base * factor), (asked, log["tg_cost_usd"])


WS_KEY = "sk-endpoints-ws-" + RUN


@pytest.fixture(scope="module")
def wsstack(wasm, mock, rls, tmp_path_factory):
    """Envoy that lets WebSocket upgrades through to the filter, which decides."""
    cfg = limited_config()
    cfg["routes"] = [{"path_prefix": "/v1/responses", "api": "openai_responses", "provider": "openai"},
                     {"path_prefix": "/v1/realtime", "api": "openai_responses", "provider": "openai"}]
    cfg["tiers"]["sockets"] = {"models": ["gpt-realtime*", "gpt-4o"], "requests_per_minute": 2, "lease_requests": 0,
                               "tokens_per_minute": 1, "allow_websocket": True}
    cfg["tenants"].append({"id": "ws-" + RUN, "tier": "sockets", "api_key_sha256": [harness.sha256_hex(WS_KEY)],
                           "provider_key_env": {"openai": "ACME_OPENAI_KEY"}})
    s = LimitedStack(mock, rls, str(tmp_path_factory.mktemp("wsstack")), cfg, upgrades=["websocket"])
    yield s
    s.stop()


def ws_handshake(port, path, key, rid, payload=b""):
    """A raw WebSocket handshake; answers (status line, headers, bytes echoed back after it)."""
    import socket
    c = socket.create_connection(("127.0.0.1", port), timeout=10)
    c.sendall(("GET %s HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
               "Authorization: Bearer %s\r\nx-request-id: %s\r\n\r\n" % (path, key, rid)).encode())
    data = b""
    while b"\r\n\r\n" not in data:
        piece = c.recv(65536)
        if not piece:
            break
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    hdrs = dict((k.strip().lower(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:]))
    if lines[0].split(" ")[1] == "101" and payload:
        c.sendall(payload)
        while len(rest) < len(payload):
            piece = c.recv(65536)
            if not piece:
                break
            rest += piece
    elif "content-length" in hdrs:
        while len(rest) < int(hdrs["content-length"]):
            rest += c.recv(65536)
    c.close()
    return int(lines[0].split(" ")[1]), hdrs, rest


def test_websocket_upgrades_are_refused_in_the_api_envelope(wsstack, mock):
    # acme's tier does not allow them: a clear refusal, the provider never sees it.
    mock.clear()
    rid = "ws-refused-" + RUN
    status, hdrs, body = ws_handshake(wsstack.port, "/v1/responses", KEY_A, rid)
    assert status == 403
    assert hdrs.get("x-tollgate-error") == "websocket_not_allowed"
    err = json.loads(body)["error"]
    assert err["code"] == "websocket_not_allowed" and "WebSocket" in err["message"]
    assert mock.requests() == []
    log = wsstack.access_log_lines({rid})[rid]
    assert log["tg_outcome"] == "refused" and log["tg_error"] == "websocket_not_allowed"


def test_an_allowed_websocket_is_one_unmetered_request(wsstack, mock):
    mock.clear()
    rids = ["ws-ok-%d-%s" % (i, RUN) for i in range(2)]
    for rid in rids:
        status, _, echoed = ws_handshake(wsstack.port, "/v1/realtime?model=gpt-realtime", WS_KEY, rid,
                                         payload=b"\x81\x05hello")
        assert status == 101
        assert echoed == b"\x81\x05hello"
    # The provider got the handshake with the tenant's own key, not the client's.
    recs = mock.requests()
    assert [r["path"] for r in recs] == ["/v1/realtime?model=gpt-realtime"] * 2
    assert recs[0]["header_map"]["authorization"] == "Bearer " + harness_key("ACME_OPENAI_KEY")
    logs = wsstack.access_log_lines(set(rids))
    for rid in rids:
        log = logs[rid]
        assert log["tg_unmetered"] == "websocket", log
        assert log["tg_outcome"] == "ok" and log["tg_upstream_status"] == "101", log
        assert tokens(log)["total"] == 0 and log["tg_cost_usd"] == "0.000000" and log["tg_estimated"] == "false"
        assert log["tg_model_requested"] == "gpt-realtime"
    # Each counted as a request: the third of the minute is over the limit.
    status, hdrs, body = ws_handshake(wsstack.port, "/v1/realtime?model=gpt-realtime", WS_KEY, "ws-over-" + RUN)
    assert status == 429, body
    # A model the tier does not allow is refused as in a body.
    status, hdrs, _ = ws_handshake(wsstack.port, "/v1/realtime?model=gpt-5", WS_KEY, "ws-model-" + RUN)
    assert (status, hdrs.get("x-tollgate-error")) == (403, "model_not_allowed")


def harness_key(env_name):
    from conftest import PROVIDER_ENV
    return PROVIDER_ENV[env_name]
