"""Token metering through real Envoy: usage per provider and mode, exactly as the
mock reports it, in the access log, metrics and headers; streams untouched."""

import http.client
import json
import socket
import time

import pytest

import harness
import mock_llm as M
from conftest import KEY_A, PRICING, LimitedStack, cost_micros, limited_config

N = 7  # output tokens asked of the mock


@pytest.fixture(scope="module")
def mstack(wasm, mock, rls, tmp_path_factory):
    cfg = limited_config()
    # acme (enterprise) gets a generous monthly token budget so every request
    # goes through reserve and settle.
    cfg["tiers"]["enterprise"]["tokens_per_month"] = 10_000_000
    cfg["metering"] = {"stream_usage_comment": False}
    s = LimitedStack(mock, rls, str(tmp_path_factory.mktemp("mstack")), cfg)
    yield s
    s.stop()


def openai_usage(n):
    return {"input": M.OPENAI_PROMPT - M.OPENAI_CACHED, "cache_read": M.OPENAI_CACHED, "cache_write": 0,
            "output": n, "reasoning": M.OPENAI_REASONING, "total": M.OPENAI_PROMPT + n}


def anthropic_usage(n):
    return {"input": M.ANTHROPIC_INPUT, "cache_read": M.ANTHROPIC_CACHE_READ, "cache_write": M.ANTHROPIC_CACHE_WRITE,
            "output": n, "reasoning": 0,
            "total": M.ANTHROPIC_INPUT + M.ANTHROPIC_CACHE_READ + M.ANTHROPIC_CACHE_WRITE + n}


def gemini_usage(n):
    return {"input": M.GEMINI_PROMPT - M.GEMINI_CACHED, "cache_read": M.GEMINI_CACHED, "cache_write": 0,
            "output": n + M.GEMINI_THOUGHTS, "reasoning": M.GEMINI_THOUGHTS,
            "total": M.GEMINI_PROMPT + n + M.GEMINI_THOUGHTS}


CHAT = {"model": "gpt-4o-mini", "max_tokens": N, "messages": [{"role": "user", "content": "hi"}]}
CASES = {
    "openai_chat": ("/v1/chat/completions", dict(CHAT), "gpt-4o-mini", openai_usage(N)),
    "openai_chat_stream": ("/v1/chat/completions", dict(CHAT, stream=True), "gpt-4o-mini", openai_usage(N)),
    "openai_chat_stream_client_usage": ("/v1/chat/completions",
                                        dict(CHAT, stream=True, stream_options={"include_usage": True}),
                                        "gpt-4o-mini", openai_usage(N)),
    "openai_responses": ("/v1/responses", {"model": "gpt-4o", "max_output_tokens": N, "input": "hi"}, "gpt-4o",
                         openai_usage(N)),
    "openai_responses_stream": ("/v1/responses", {"model": "gpt-4o", "max_output_tokens": N, "input": "hi",
                                                  "stream": True}, "gpt-4o", openai_usage(N)),
    "openai_embeddings": ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"},
                          "text-embedding-3-small",
                          {"input": M.EMBEDDING_PROMPT, "cache_read": 0, "cache_write": 0, "output": 0,
                           "reasoning": 0, "total": M.EMBEDDING_PROMPT}),
    "anthropic": ("/v1/messages", {"model": "claude-3-5-haiku-20241022", "max_tokens": N,
                                   "messages": [{"role": "user", "content": "hi"}]}, "claude-3-5-haiku",
                  anthropic_usage(N)),
    "anthropic_stream": ("/v1/messages", {"model": "claude-3-5-haiku-20241022", "max_tokens": N, "stream": True,
                                          "messages": [{"role": "user", "content": "hi"}]}, "claude-3-5-haiku",
                         anthropic_usage(N)),
    "gemini": ("/v1beta/models/gemini-2.0-flash:generateContent",
               {"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": N}},
               "gemini-2.0-flash", gemini_usage(N)),
    "gemini_sse": ("/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
                   {"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": N}},
                   "gemini-2.0-flash", gemini_usage(N)),
    "gemini_json_stream": ("/v1beta/models/gemini-2.0-flash:streamGenerateContent",
                           {"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": N}},
                           "gemini-2.0-flash", gemini_usage(N)),
}


def prom_value(envoy, name, **labels):
    """Sum of a Prometheus series from Envoy's /stats/prometheus."""
    total = 0
    found = False
    for line in envoy.admin("/stats/prometheus").splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        if not (series == name or series.startswith(name + "{")):
            continue
        if all(('%s="%s"' % (k, v)) in series for k, v in labels.items()):
            total += float(value)
            found = True
    return total if found else None


@pytest.mark.parametrize("case", sorted(CASES))
def test_usage_matches_provider_exactly(mstack, mock, case):
    path, body, price_key, want = CASES[case]
    rid = "meter-" + case
    before = prom_value(mstack.envoy, "tollgate_tokens_output", tenant="acme") or 0
    r = mstack.post(path, body, {"authorization": "Bearer " + KEY_A, "x-request-id": rid})
    assert r.status == 200, r.body[:500]
    log = mstack.access_log_lines({rid})[rid]
    got = {k: int(log["tg_tokens_" + k]) for k in ("input", "cache_read", "cache_write", "output", "reasoning",
                                                     "total")}
    assert got == want, (case, got, want)
    assert log["tg_estimated"] == "false"
    assert log["tg_tenant"] == "acme"
    assert log["tg_outcome"] == "ok"
    assert log["tg_model_requested"] == (body.get("model") or "gemini-2.0-flash")
    assert log["tg_upstream_status"] == "200"
    assert int(log["tg_ttfb_ms"]) >= 0 and int(log["tg_duration_ms"]) >= 0
    expected_cost = cost_micros(PRICING["models"][price_key], want)
    assert log["tg_cost_usd"] == "%d.%06d" % divmod(expected_cost, 1_000_000), (log["tg_cost_usd"], expected_cost)
    # Metrics, labelled by tenant through stats_tags.
    deadline = time.time() + 3
    while time.time() < deadline:
        after = prom_value(mstack.envoy, "tollgate_tokens_output", tenant="acme") or 0
        if after - before == want["output"] or want["output"] == 0:
            break
        time.sleep(0.1)
    assert after - before == want["output"]
    # Non-streamed responses carry usage headers; streams cannot (headers go first).
    streamed = body.get("stream") or "stream" in path
    if not streamed:
        assert r.header("x-tollgate-usage-output-tokens") == str(want["output"])
        assert r.header("x-tollgate-cost-usd") == log["tg_cost_usd"]
        assert r.header("x-tollgate-usage-estimated") == "false"


def test_injected_include_usage_is_invisible(mstack, mock):
    mock.clear()
    r = mstack.post("/v1/chat/completions", dict(CHAT, stream=True), {"authorization": "Bearer " + KEY_A})
    assert r.status == 200
    rec = mock.requests()[-1]
    sent = json.loads(rec["body"])
    assert sent["stream_options"] == {"include_usage": True}, "tollgate asks the provider for usage"
    # The rewritten body goes up with its own length, not the client's.
    assert rec["header_map"].get("content-length") == str(len(rec["body"].encode())), rec["header_map"]
    # What the client receives equals the provider's stream minus the usage chunk,
    # byte for byte, as if it had asked without include_usage.
    text = r.body.decode()
    assert "prompt_tokens" not in text
    assert text.endswith("data: [DONE]\n\n")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert len(events) == N + 3  # role chunk, N deltas, finish chunk, [DONE]
    # A client that asked for usage gets it unchanged, and its body goes up
    # untouched, with the client's own length (no chunked re-framing).
    asked = dict(CHAT, stream=True, stream_options={"include_usage": True})
    r = mstack.post("/v1/chat/completions", asked, {"authorization": "Bearer " + KEY_A})
    assert '"prompt_tokens":12' in r.body.decode()
    rec = mock.requests()[-1]
    assert json.loads(rec["body"]) == asked
    assert rec["header_map"].get("content-length") == str(len(json.dumps(asked).encode())), rec["header_map"]
    assert "transfer-encoding" not in rec["header_map"]


def test_bulk_stream_is_metered_exactly_from_chunk_edges(mstack):
    # A ~4 MB stream from a fast upstream: Envoy hands the filter large
    # chunks (how large depends on the machine's timing: 64 KiB pieces, or
    # the whole stream in one chunk when Envoy gets to it late), which the
    # filter reads only near their edges (edge scanning, logged at debug
    # level; the first chunk's head is read in full). Usage is still the
    # provider's, exactly, and the client gets the stream minus the injected
    # usage chunk, byte for byte.
    rid = "meter-bulk"
    writes = M.bulk_stream({}, 4_000_000)
    usage_event = writes[-1][:writes[-1].index(b"data: [DONE]")]
    n = json.loads(usage_event[len(b"data: "):])["usage"]["completion_tokens"]
    admin = http.client.HTTPConnection("127.0.0.1", mstack.envoy.admin_port, timeout=10)
    admin.request("POST", "/logging?wasm=debug")
    assert admin.getresponse().status == 200
    admin.close()
    time.sleep(1.0)  # the filter follows the host's log level on its next tick (50 ms)
    try:
        r = mstack.post("/v1/chat/completions", dict(CHAT, stream=True),
                        {"authorization": "Bearer " + KEY_A, "x-request-id": rid, "x-mock-bulk-bytes": "4000000"},
                        timeout=60)
    finally:
        admin = http.client.HTTPConnection("127.0.0.1", mstack.envoy.admin_port, timeout=10)
        admin.request("POST", "/logging?wasm=info")
        admin.getresponse().read()
        admin.close()
    assert r.status == 200
    assert r.body == b"".join(writes).replace(usage_event, b"", 1)
    log = mstack.access_log_lines({rid})[rid]
    assert log["tg_estimated"] == "false"
    assert log["tg_outcome"] == "ok"
    assert int(log["tg_tokens_output"]) == n
    assert int(log["tg_tokens_input"]) + int(log["tg_tokens_cache_read"]) == M.OPENAI_PROMPT
    assert "read at its edges" in mstack.envoy.proc.output(), "no chunk was read from its edges"


def test_stream_is_not_buffered(mstack):
    # The mock waits 100 ms between writes; the first bytes must reach the
    # client long before the stream ends.
    body = dict(CHAT, stream=True, max_tokens=5)
    c = socket.create_connection(("127.0.0.1", mstack.port), timeout=10)
    payload = json.dumps(body).encode()
    c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + KEY_A.encode()
              + b"\r\ncontent-type: application/json\r\nx-mock-chunk-delay-ms: 100\r\ncontent-length: "
              + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    t0 = time.time()
    first = c.recv(65536)
    t_first = time.time() - t0
    data = first
    # Read to the end of the chunked body: the mock splits every event (even
    # `[DONE]`) over several writes, and they may reach the client as written.
    while not data.endswith(b"\r\n0\r\n\r\n"):
        piece = c.recv(65536)
        if not piece:
            break
        data += piece
    t_all = time.time() - t0
    c.close()
    assert b"200" in first.split(b"\r\n")[0]
    assert t_all > 1.0, t_all  # ~8 events x 3 writes x 100 ms
    assert t_first < t_all / 3, (t_first, t_all)


def test_missing_usage_is_an_estimate_and_counted(mstack):
    rid = "meter-no-usage"
    before = prom_value(mstack.envoy, "tollgate_usage_estimated", tenant="acme") or 0
    r = mstack.post("/v1/messages", {"model": "claude-3-5-haiku-x", "max_tokens": N, "stream": True,
                                     "messages": [{"role": "user", "content": "hi"}]},
                    {"x-api-key": KEY_A, "x-request-id": rid, "x-mock-fail": "no-usage"})
    assert r.status == 200
    log = mstack.access_log_lines({rid})[rid]
    assert log["tg_estimated"] == "true"
    assert int(log["tg_tokens_output"]) > 0 and int(log["tg_tokens_input"]) > 0
    assert float(log["tg_cost_usd"]) > 0
    time.sleep(0.3)
    assert (prom_value(mstack.envoy, "tollgate_usage_estimated", tenant="acme") or 0) == before + 1


def test_client_disconnect_mid_stream_is_a_flagged_estimate(mstack):
    rid = "meter-disconnect"
    body = json.dumps(dict(CHAT, stream=True, max_tokens=40)).encode()
    c = socket.create_connection(("127.0.0.1", mstack.port), timeout=10)
    c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + KEY_A.encode()
              + b"\r\nx-request-id: " + rid.encode() + b"\r\nx-mock-chunk-delay-ms: 50\r\ncontent-length: "
              + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while got.count(b"data: ") < 3:
        got += c.recv(65536)
    c.close()  # the client goes away mid-stream
    log = mstack.access_log_lines({rid}, timeout=10)[rid]
    assert log["tg_estimated"] == "true"
    assert log["tg_outcome"] == "incomplete"
    assert int(log["tg_tokens_output"]) >= 1


@pytest.mark.parametrize("path,body,end", [
    ("/v1/chat/completions", dict(CHAT, stream=True), b"data: [DONE]"),
    ("/v1/messages", {"model": "claude-3-5-haiku-x", "max_tokens": N, "stream": True, "messages": []},
     b"message_stop"),
    ("/v1/responses", {"model": "gpt-4o", "max_output_tokens": N, "input": "hi", "stream": True},
     b"response.completed"),
])
def test_client_closing_after_the_end_marker_is_ok(mstack, path, body, end):
    # The OpenAI Python SDK closes the connection right after [DONE]; when the
    # upstream's end of stream comes later, the request was still whole.
    rid = "meter-close-after-end-" + path.rsplit("/", 1)[-1]
    raw = json.dumps(body).encode()
    auth = b"x-api-key: " if path == "/v1/messages" else b"authorization: Bearer "
    # Generous timeouts: on a loaded 2-core CI machine the first stream of a
    # module can take seconds; the test is about the outcome, not the time.
    c = socket.create_connection(("127.0.0.1", mstack.port), timeout=30)
    c.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nhost: x\r\n" + auth + KEY_A.encode()
              + b"\r\nx-request-id: " + rid.encode() + b"\r\nx-mock-end-delay-ms: 3000\r\ncontent-length: "
              + str(len(raw)).encode() + b"\r\n\r\n" + raw)
    got = b""
    deadline = time.time() + 30
    # The end marker's whole event (its data carries the usage): the mock
    # splits events across writes, so the marker can arrive before its data.
    while not (end in got and b"\n\n" in got[got.find(end):]) and time.time() < deadline:
        piece = c.recv(65536)
        if not piece:
            break
        got += piece
    assert end in got, got[-500:]
    c.close()  # before the upstream ends the stream
    log = mstack.access_log_lines({rid}, timeout=20)[rid]
    assert log["tg_outcome"] == "ok", log
    assert log["tg_estimated"] == "false"
    assert int(log["tg_tokens_output"]) == N


def test_upstream_cut_off_is_flagged(mstack):
    rid = "meter-cut"
    r = None
    try:
        r = mstack.post("/v1/messages", {"model": "claude-3-5-haiku-x", "max_tokens": 20, "stream": True,
                                         "messages": []},
                        {"x-api-key": KEY_A, "x-request-id": rid, "x-mock-fail": "cut"})
    except Exception:
        pass  # the client may see the reset
    log = mstack.access_log_lines({rid}, timeout=10)[rid]
    assert log["tg_estimated"] == "true"


def test_mid_stream_error_is_recorded(mstack):
    rid = "meter-midstream-error"
    r = mstack.post("/v1/messages", {"model": "claude-3-5-haiku-x", "max_tokens": N, "stream": True,
                                     "messages": []},
                    {"x-api-key": KEY_A, "x-request-id": rid, "x-mock-fail": "midstream"})
    assert r.status == 200
    log = mstack.access_log_lines({rid})[rid]
    assert log["tg_outcome"] == "stream_error"


def test_compressed_upstream_is_avoided(mstack, mock):
    # The client allows gzip, but tollgate asks the provider for identity so
    # the meter sees plain bytes.
    rid = "meter-gzip"
    r = mstack.post("/v1/chat/completions", CHAT, {"authorization": "Bearer " + KEY_A, "x-request-id": rid,
                                                   "accept-encoding": "gzip", "x-mock-gzip": "1"})
    assert r.status == 200
    assert r.header("content-encoding") is None
    assert mock.requests()[-1]["header_map"]["accept-encoding"] == "identity"
    log = mstack.access_log_lines({rid})[rid]
    assert log["tg_estimated"] == "false" and int(log["tg_tokens_output"]) == N


def test_settles_reach_redis(mstack, redis):
    # The monthly token counter of acme reflects settled (not estimated) usage.
    time.sleep(1.0)  # settles go out on the root tick
    keys = redis.cli("--scan", "--pattern", "*acme*").split()
    assert keys, "no counter keys for acme in Redis"
    assert mstack.envoy.stats("tollgate.settle").get("wasmcustom.tollgate.settle.dropped", 0) == 0


def test_a_provider_can_turn_off_usage_injection(mock, wasm, tmp_path):
    # For an Azure API version that rejects stream_options: the body reaches
    # the provider untouched, the client's stream is the provider's, and the
    # usage is a flagged estimate instead.
    from conftest import Stack, plugin_config
    cfg = plugin_config()
    cfg["providers"]["openai"]["inject_stream_usage"] = False
    stack = Stack(mock, str(tmp_path), plugin=cfg)
    try:
        mock.clear()
        rid = "no-inject-1"
        r = stack.post("/v1/chat/completions", dict(CHAT, stream=True),
                       {"authorization": "Bearer " + KEY_A, "x-request-id": rid})
        assert r.status == 200
        sent = json.loads(mock.requests()[-1]["body"])
        assert "stream_options" not in sent
        assert r.body.decode().endswith("data: [DONE]\n\n")
        log = stack.access_log_lines({rid})[rid]
        assert log["tg_estimated"] == "true", log
        assert int(log["tg_tokens_output"]) > 0, log
    finally:
        stack.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_provider_headers_survive_tollgates_header_rewrite(mstack, stream):
    # tollgate writes its headers (request id, x-ratelimit-*, usage) with one
    # call that replaces the whole response header map: every provider
    # header must come through with its repeats and its bytes.
    body = json.dumps(dict(CHAT, stream=stream)).encode()
    c = socket.create_connection(("127.0.0.1", mstack.port), timeout=10)
    c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\nauthorization: Bearer "
              + KEY_A.encode() + b"\r\nx-request-id: hdr-rewrite\r\nx-mock-extra-headers: 1\r\ncontent-length: "
              + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while True:
        piece = c.recv(65536)
        if not piece:
            break
        got += piece
    c.close()
    head = got.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert head[0].startswith(b"HTTP/1.1 200"), head
    lines = [tuple(h.split(b": ", 1)) for h in head[1:]]
    names = [k.lower() for k, _ in lines]
    assert [v for k, v in lines if k.lower() == b"set-cookie"] == [b"a=1", b"b=2"]
    assert (b"x-provider-odd", b"caf\xe9") in lines
    assert (b"x-request-id", b"hdr-rewrite") in lines
    assert b"x-ratelimit-remaining-tokens" in names
    for name in set(names) - {b"set-cookie"}:
        assert names.count(name) == 1, (name, head)
    if not stream:
        assert b"x-tollgate-usage-total-tokens" in names and b"x-tollgate-cost-usd" in names
