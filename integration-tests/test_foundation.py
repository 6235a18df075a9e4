"""The filter in real Envoy: identity, isolation, request policy, config refusal."""

import glob
import json
import os
import time

import pytest

import harness
from conftest import KEY_A, KEY_B, KEY_OFF, PROVIDER_ENV, Stack, plugin_config

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
GEMINI = "/v1beta/models/gemini-2.0-flash:generateContent"

# (path, credential header the provider reads, how the client sends its key, body)
APIS = {
    "openai": (CHAT, "authorization", lambda k: {"authorization": "Bearer " + k},
               {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}),
    "anthropic": (MESSAGES, "x-api-key", lambda k: {"x-api-key": k},
                  {"model": "claude-3-5-haiku-20241022", "max_tokens": 16,
                   "messages": [{"role": "user", "content": "hi"}]}),
    "gemini": (GEMINI, "x-goog-api-key", lambda k: {"x-goog-api-key": k},
               {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}),
}


def last_request(mock):
    reqs = mock.requests()
    assert reqs, "the provider received nothing"
    return reqs[-1]


def all_header_values(rec):
    return [v for _, v in rec["headers"]]


@pytest.mark.parametrize("api", sorted(APIS))
@pytest.mark.parametrize("tenant,key,secret_prefix", [("acme", KEY_A, "ACME"), ("globex", KEY_B, "GLOBEX")])
def test_tenant_key_is_swapped_for_its_provider_key(stack, mock, api, tenant, key, secret_prefix):
    path, cred_header, client_headers, body = APIS[api]
    mock.clear()
    r = stack.post(path, body, client_headers(key))
    assert r.status == 200, r.body
    rec = last_request(mock)
    provider_env = {"openai": "OPENAI", "anthropic": "ANTHROPIC", "gemini": "GEMINI"}[api]
    expected = PROVIDER_ENV["%s_%s_KEY" % (secret_prefix, provider_env)]
    want = ("Bearer " + expected) if cred_header == "authorization" else expected
    assert rec["header_map"][cred_header] == want
    # The client's tollgate key never reaches the provider, in any header.
    assert not any(key in v for v in all_header_values(rec))
    # Only the one credential header of this provider is present.
    for other in ("authorization", "x-api-key", "api-key", "x-goog-api-key"):
        if other != cred_header:
            assert other not in rec["header_map"], other
    # tollgate's routing headers stay inside the gateway.
    assert not any(k.startswith("x-tollgate-") for k, _ in rec["headers"])
    assert rec["header_map"]["accept-encoding"] == "identity"


def test_client_identity_headers_are_ignored(stack, mock):
    mock.clear()
    r = stack.post(CHAT, APIS["openai"][3], {"authorization": "Bearer " + KEY_A, "x-tollgate-tenant": "globex",
                                             "x-tollgate-tier": "free", "x-tollgate-anything": "1",
                                             "x-user-id": "mallory"})
    assert r.status == 200
    rec = last_request(mock)
    # Served as acme (its credential), and no x-tollgate-* header, the
    # client's or tollgate's, reaches the provider.
    assert not any(k.startswith("x-tollgate-") for k, _ in rec["headers"])
    assert "x-user-id" not in rec["header_map"]
    assert rec["header_map"]["authorization"] == "Bearer sk-openai-acme"


def test_client_tenant_header_alone_is_not_identity(stack, mock):
    mock.clear()
    r = stack.post(CHAT, APIS["openai"][3], {"x-tollgate-tenant": "acme"})
    assert r.status == 401
    assert mock.requests() == []


def test_tier_header_routes_to_dedicated_cluster(stack, mock):
    stack.post(CHAT, APIS["openai"][3], {"authorization": "Bearer " + KEY_A, "x-request-id": "route-acme"})
    stack.post(CHAT, APIS["openai"][3], {"authorization": "Bearer " + KEY_B, "x-request-id": "route-globex"})
    lines = stack.access_log_lines({"route-acme", "route-globex"})
    assert lines["route-acme"]["upstream_cluster"] == "llm_dedicated"
    assert lines["route-globex"]["upstream_cluster"] == "llm_upstream"


def test_request_id_is_kept_and_echoed(stack, mock):
    r = stack.post(CHAT, APIS["openai"][3], {"authorization": "Bearer " + KEY_A, "x-request-id": "client-rid-1"})
    assert r.header("x-request-id") == "client-rid-1"
    assert last_request(mock)["header_map"]["x-request-id"] == "client-rid-1"
    r = stack.post(CHAT, APIS["openai"][3], {"authorization": "Bearer " + KEY_A})
    assert r.header("x-request-id")  # Envoy or tollgate made one


def test_gemini_query_key_is_used_and_removed(stack, mock):
    mock.clear()
    r = stack.post(GEMINI + "?key=" + KEY_A, APIS["gemini"][3])
    assert r.status == 200, r.body
    rec = last_request(mock)
    assert rec["path"] == GEMINI
    assert rec["header_map"]["x-goog-api-key"] == "gm-acme"


def check_envelope(api, r, status, code):
    assert r.status == status, (r.status, r.body)
    assert r.header("content-type") == "application/json"
    assert r.header("x-tollgate-error") == code
    v = r.json()
    if api == "openai":
        assert v["error"]["code"] == code
        assert set(v["error"]) == {"message", "type", "param", "code"}
    elif api == "anthropic":
        assert v["type"] == "error"
        assert v["error"]["type"] == {401: "authentication_error", 403: "permission_error",
                                      413: "request_too_large"}.get(status, "invalid_request_error")
        assert v["request_id"]
    else:
        assert v["error"]["code"] == status
        assert v["error"]["status"] == {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED"}.get(status, "INVALID_ARGUMENT")
        assert v["error"]["details"][0]["reason"] == code.upper()


@pytest.mark.parametrize("api", sorted(APIS))
def test_identity_refusals_in_each_envelope(stack, mock, api):
    path, _, client_headers, body = APIS[api]
    mock.clear()
    check_envelope(api, stack.post(path, body, {}), 401, "missing_api_key")
    check_envelope(api, stack.post(path, body, client_headers("sk-not-a-tenant")), 401, "invalid_api_key")
    check_envelope(api, stack.post(path, body, client_headers(KEY_OFF)), 403, "tenant_disabled")
    assert mock.requests() == []


@pytest.mark.parametrize("api", sorted(APIS))
def test_request_policy_refusals(stack, mock, api):
    path, _, client_headers, body = APIS[api]
    mock.clear()
    # globex is on the free tier: 4096 bytes, a short model list.
    big = dict(body, padding="x" * 5000)
    check_envelope(api, stack.post(path, big, client_headers(KEY_B)), 413, "request_too_large")
    # Chunked upload without content-length: the limit still holds.
    chunked = iter([json.dumps(big).encode()[:3000], json.dumps(big).encode()[3000:]])
    r = harness.request(stack.port, path, headers=client_headers(KEY_B),
                        raw_body=chunked)
    check_envelope(api, r, 413, "request_too_large")
    check_envelope(api, stack.post(path, raw_body=b'{"model": "gpt-4o-mini", ', headers=client_headers(KEY_B)),
                   400, "invalid_json")
    if api == "gemini":
        r = stack.post("/v1beta/models/gemini-2.5-pro:generateContent", body, client_headers(KEY_B))
    else:
        r = stack.post(path, dict(body, model="gpt-4o"), client_headers(KEY_B))
    check_envelope(api, r, 403, "model_not_allowed")
    assert mock.requests() == []


def test_large_body_within_tier_limit_passes(stack, mock):
    # acme's tier allows 8 MiB; Envoy's buffer limit in the test config is 16 MiB.
    body = dict(APIS["openai"][3], padding="y" * (3 * 1024 * 1024))
    mock.clear()
    r = stack.post(CHAT, body, {"authorization": "Bearer " + KEY_A})
    assert r.status == 200, r.body[:300]
    assert len(last_request(mock)["body"]) > 3 * 1024 * 1024


def test_unknown_route_is_denied(stack):
    r = stack.post("/v1/admin", {}, {"authorization": "Bearer " + KEY_A})
    assert r.status == 404
    assert r.json()["error"]["code"] == "unknown_route"


def test_struct_configuration_is_decoded(wasm, mock, tmp_path):
    s = Stack(mock, str(tmp_path), struct_config=True)
    try:
        r = s.post(CHAT, APIS["openai"][3], {"authorization": "Bearer " + KEY_A})
        assert r.status == 200, r.body
    finally:
        s.stop()


@pytest.mark.parametrize("mutate,needle", [
    (lambda c: c["tenants"][0].update(tier="platinum"), "tenants[0].tier: unknown tier 'platinum'"),
    (lambda c: c["tiers"]["free"].update(requests_per_minite=5), "unknown field `requests_per_minite`"),
    (lambda c: c["tenants"][1].update(api_key_sha256=c["tenants"][0]["api_key_sha256"]), "duplicate key digest"),
    (lambda c: c["tenants"][0]["provider_key_env"].update(openai="NOT_PASSED_TO_VM"),
     "environment variable 'NOT_PASSED_TO_VM' is missing"),
])
def test_bad_plugin_config_is_refused_by_envoy(wasm, mock, tmp_path, mutate, needle):
    cfg = plugin_config()
    mutate(cfg)
    filt = harness.wasm_filter(cfg, env_keys=sorted(PROVIDER_ENV))
    econf = harness.envoy_config(harness.free_port(), harness.free_port(), mock.port, [filt])
    e = harness.Envoy(econf, env=PROVIDER_ENV, logdir=str(tmp_path), expect_failure=True)
    code = e.wait_exit(timeout=30)
    out = e.proc.output()
    e.stop()
    assert code not in (None, 0), "Envoy accepted a bad configuration"
    assert "tollgate: configuration refused" in out, out[-3000:]
    assert needle in out, out[-3000:]


def repo_envoy_configs():
    return sorted(glob.glob(os.path.join(harness.ROOT, "envoy", "**", "*envoy*.yaml"), recursive=True))


def test_repo_has_envoy_configs():
    assert repo_envoy_configs(), "no Envoy configs found under envoy/"


@pytest.mark.parametrize("path", repo_envoy_configs(), ids=os.path.basename)
def test_repo_envoy_config_validates(wasm, path):
    env = dict(PROVIDER_ENV)
    env.update({k: "demo-secret" for k in ("DEMO_OPENAI_KEY", "DEMO_ANTHROPIC_KEY", "DEMO_GEMINI_KEY",
                                           "BETA_OPENAI_KEY", "ACME_AZURE_OPENAI_EU_KEY")})
    ok, out = harness.validate_envoy_config(path, env=env)
    assert ok, out[-3000:]


def test_header_bytes_that_are_not_utf8_do_not_break_the_filter(stack, mock):
    # HTTP allows obs-text (bytes 0x80-0xFF) in header values and Envoy passes
    # them on. The proxy-wasm SDK's header reader panics on them, which would
    # kill the worker's VM with one request; every worker must keep serving.
    path, _, auth, body = APIS["openai"]
    for i in range(6):
        mock.clear()
        r = stack.post(path, body, dict(auth(KEY_A), **{"x-odd": "caf\xe9 %d" % i}))
        assert r.status == 200, (i, r.status, r.body[:200])
        assert last_request(mock)["header_map"]["x-odd"] == "caf\xe9 %d" % i, "passed on untouched"
    # A key that is not UTF-8 is no tenant's key: refused in the API's envelope.
    r = stack.post(path, body, {"authorization": "Bearer sk-tg-\xe9"})
    assert r.status == 401 and json.loads(r.body)["error"]["code"], r.body
    assert stack.post(path, body, auth(KEY_A)).status == 200


def test_refused_requests_reach_the_access_log_with_tenant_and_code(stack):
    cases = {
        "audit-unknown": ({"authorization": "Bearer sk-nobody"}, APIS["openai"][3], 401, "", "invalid_api_key"),
        "audit-disabled": ({"authorization": "Bearer " + KEY_OFF}, APIS["openai"][3], 403, "initech", "tenant_disabled"),
        "audit-model": ({"authorization": "Bearer " + KEY_B}, {"model": "gpt-4o", "messages": []}, 403, "globex",
                        "model_not_allowed"),
    }
    for rid, (headers, body, status, _, _) in cases.items():
        r = stack.post(CHAT, body, dict(headers, **{"x-request-id": rid}))
        assert r.status == status, (rid, r.status)
    lines = stack.access_log_lines(set(cases))
    for rid, (_, _, status, tenant, code) in cases.items():
        rec = lines[rid]
        assert rec["status"] == status
        assert rec["tg_outcome"] == "refused", rec
        assert rec["tg_error"] == code, rec
        assert rec["tg_tenant"] == tenant, rec
