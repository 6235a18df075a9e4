"""Tenant identity from JWTs through real Envoy: each algorithm family, inline and
remote JWKS with rotation, Envoy's jwt_authn in front, and an attack suite."""

import base64
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt as pyjwt
import pytest

import harness
from conftest import KEY_A, PROVIDER_ENV, Stack, plugin_config

FIX = os.path.join(harness.ROOT, "tests", "fixtures", "jwt")
JWKS = json.load(open(os.path.join(FIX, "jwks.json")))
JWKS_ROTATED = json.load(open(os.path.join(FIX, "jwks_rotated.json")))
HMAC_SECRET = "an-hs256-secret-of-at-least-32-bytes!"
ENV = dict(PROVIDER_ENV, TG_JWT_SECRET=HMAC_SECRET)
CHAT = "/v1/chat/completions"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def pem(name):
    with open(os.path.join(FIX, name), "rb") as f:
        return f.read()


KEYS = {
    "RS256": (pem("rsa1.key.pem"), "rsa-1"),
    "PS256": (pem("rsa1.key.pem"), "rsa-1"),
    "ES256": (pem("ec256.key.pem"), "ec256-1"),
    "ES384": (pem("ec384.key.pem"), "ec384-1"),
    "EdDSA": (pem("ed25519.key.pem"), "ed-1"),
}


def claims(**over):
    now = int(time.time())
    c = {"iss": "https://issuer.inline/", "aud": "tollgate", "sub": "user-42", "iat": now - 10,
         "exp": now + 600, "app_metadata": {"tenant_id": "acme"}}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def mint(alg="RS256", kid=None, **over):
    key, default_kid = KEYS[alg]
    return pyjwt.encode(claims(**over), key, algorithm=alg, headers={"kid": kid or default_kid})


class JwksServer:
    """A local identity provider's JWKS endpoint; the document can be swapped."""

    def __init__(self, doc):
        self.doc = doc
        self.hits = 0
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits += 1
                body = json.dumps(outer.doc).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()


def jwt_config():
    return {
        "providers": [
            {"name": "inline", "issuers": ["https://issuer.inline/"], "audiences": ["tollgate"],
             "algorithms": ["RS256", "PS256", "ES256", "ES384", "EdDSA"], "jwks": {"inline": JWKS},
             "tenant_claim": "app_metadata.tenant_id", "user_claim": "sub", "leeway_s": 5},
            {"name": "remote", "issuers": ["https://issuer.remote/"], "audiences": ["tollgate"],
             "algorithms": ["RS256"],
             "jwks": {"remote": {"cluster": "jwks_server", "path": "/jwks.json", "authority": "idp.local",
                                 "refresh_interval_s": 10, "timeout_ms": 1000}},
             "tenant_claim": "app_metadata.tenant_id", "leeway_s": 5},
            {"name": "internal", "issuers": ["internal"], "allow_any_audience": True,
             "from": {"header": {"name": "x-internal-token"}}, "algorithms": ["HS256"],
             "hmac_secret_env": "TG_JWT_SECRET", "tenant_claim": "tenant", "leeway_s": 5},
        ]
    }


def http_cluster(name, port):
    return {"name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}


@pytest.fixture(scope="module")
def idp():
    s = JwksServer(JWKS)
    yield s
    s.stop()


class JwtStack(Stack):
    def __init__(self, mock, logdir, plugin, env, clusters, filters_before=()):
        self.mock = mock
        self.port = harness.free_port()
        self.admin_port = harness.free_port()
        self.access_log = os.path.join(logdir, "access.log")
        filt = harness.wasm_filter(plugin, env_keys=sorted(env))
        cfg = harness.envoy_config(self.port, self.admin_port, mock.port, list(filters_before) + [filt],
                                   access_log_path=self.access_log, extra_clusters=clusters)
        self.envoy = harness.Envoy(cfg, env=env, logdir=logdir)


@pytest.fixture(scope="module")
def jstack(wasm, mock, idp, tmp_path_factory):
    cfg = plugin_config(jwt=jwt_config())
    s = JwtStack(mock, str(tmp_path_factory.mktemp("jwt")), cfg, ENV, [http_cluster("jwks_server", idp.port)])
    yield s
    s.stop()


def bearer(token):
    return {"authorization": "Bearer " + token}


@pytest.mark.parametrize("alg", sorted(KEYS))
def test_each_algorithm_family_identifies_the_tenant(jstack, mock, alg):
    mock.clear()
    token = mint(alg)
    r = jstack.post(CHAT, BODY, bearer(token))
    assert r.status == 200, r.body
    rec = mock.requests()[-1]
    assert rec["header_map"]["authorization"] == "Bearer sk-openai-acme"
    assert not any(token in v for _, v in rec["headers"]), "the client's JWT reached the provider"


def test_hs256_with_a_configured_secret(jstack, mock):
    mock.clear()
    token = pyjwt.encode({"iss": "internal", "tenant": "globex", "exp": int(time.time()) + 60}, HMAC_SECRET,
                         algorithm="HS256")
    r = jstack.post(CHAT, BODY, {"x-internal-token": token})
    assert r.status == 200, r.body
    rec = mock.requests()[-1]
    assert rec["header_map"]["authorization"] == "Bearer sk-openai-globex"
    assert "x-internal-token" not in rec["header_map"]


def test_api_keys_still_work_beside_jwts(jstack):
    assert jstack.post(CHAT, BODY, bearer(KEY_A)).status == 200


def test_user_id_is_recorded_in_metering(jstack):
    rid = "jwt-user"
    jstack.post(CHAT, BODY, dict(bearer(mint()), **{"x-request-id": rid}))
    assert jstack.access_log_lines({rid})[rid]["tg_user"] == "user-42"


def test_remote_jwks_and_key_rotation(jstack, idp):
    token = mint("RS256", iss="https://issuer.remote/")
    deadline = time.time() + 10
    while True:  # the first fetch happens on the first tick
        r = jstack.post(CHAT, BODY, bearer(token))
        if r.status == 200 or time.time() > deadline:
            break
        time.sleep(0.2)
    assert r.status == 200, r.body
    assert idp.hits >= 1
    # Rotate: rsa-1 goes away, rsa-2 comes in.
    idp.doc = JWKS_ROTATED
    new_token = pyjwt.encode(claims(iss="https://issuer.remote/"), pem("rsa2.key.pem"), algorithm="RS256",
                             headers={"kid": "rsa-2"})
    deadline = time.time() + 25
    while True:
        r = jstack.post(CHAT, BODY, bearer(new_token))
        if r.status == 200 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert r.status == 200, r.body
    old = jstack.post(CHAT, BODY, bearer(mint("RS256", iss="https://issuer.remote/", sub="fresh")))
    assert old.status == 401 and old.header("x-tollgate-error") == "unknown_key_id", old.body


def b64(d):
    return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()


def attacks():
    good = mint("RS256")
    h, p, sig = good.split(".")
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    rsa_pub = pem("rsa1.pub.pem")
    # HS256 "signed" with the RSA public key as the secret (algorithm confusion),
    # computed by hand: PyJWT refuses to do it.
    import hashlib
    import hmac
    header = b64({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"})
    payload = b64(claims())
    confused = header + "." + payload + "." + base64.urlsafe_b64encode(
        hmac.new(rsa_pub, (header + "." + payload).encode(), hashlib.sha256).digest()).rstrip(b"=").decode()
    none = b64({"alg": "none", "typ": "JWT"}) + "." + b64(claims()) + "."
    non_json = h + "." + base64.urlsafe_b64encode(b"not json at all").rstrip(b"=").decode() + "." + sig
    return {
        "alg_none": (none, 401, None),
        "alg_confusion_hs256_with_rsa_public_key": (confused, 401, None),
        "forged_kid": (mint("RS256", kid="not-a-key"), 401, "unknown_key_id"),
        "expired": (mint(exp=int(time.time()) - 3600), 401, "expired"),
        "not_yet_valid": (mint(nbf=int(time.time()) + 3600), 401, "not_yet_valid"),
        "wrong_issuer": (mint(iss="https://evil.example/"), 401, "wrong_issuer"),
        "wrong_audience": (mint(aud="someone-else"), 401, "wrong_audience"),
        "flipped_signature_bit": (h + "." + p + "." + flipped, 401, "bad_signature"),
        "truncated": (good[: len(good) // 2], 401, None),
        "oversized": (mint(pad="x" * 9000), 401, "token_too_large"),
        "non_json_payload": (non_json, 401, None),
        "missing_tenant_claim": (mint(app_metadata={}), 403, "missing_tenant_claim"),
        "unknown_tenant": (mint(app_metadata={"tenant_id": "nobody"}), 403, "unknown_tenant"),
    }


ATTACKS = attacks()


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_suite_is_refused(jstack, mock, name):
    token, status, code = ATTACKS[name]
    mock.clear()
    r = jstack.post(CHAT, BODY, bearer(token))
    assert r.status == status, (name, r.status, r.body)
    if code:
        assert r.header("x-tollgate-error") == code, (name, r.header("x-tollgate-error"))
    assert r.json()["error"]["code"] == r.header("x-tollgate-error")
    assert mock.requests() == [], "a forged token reached the provider"


def test_jwt_authn_runs_first_and_tollgate_trusts_only_its_metadata(wasm, mock, tmp_path):
    authn = {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"idp": {
                "issuer": "https://issuer.inline/", "audiences": ["tollgate"],
                "local_jwks": {"inline_string": json.dumps(JWKS)},
                "payload_in_metadata": "tg_payload", "forward": False,
                "forward_payload_header": "x-jwt-payload",
            }},
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "idp"}}],
        },
    }
    cfg = plugin_config(identity={"api_keys": False, "jwt_authn": {
        "payload_in_metadata": "tg_payload", "tenant_claim": "app_metadata.tenant_id", "user_claim": "sub",
        "forward_payload_header": "x-jwt-payload"}})
    s = JwtStack(mock, str(tmp_path), cfg, PROVIDER_ENV, [], filters_before=[authn])
    try:
        mock.clear()
        # A client-made payload header claiming another tenant is not believed.
        fake = base64.urlsafe_b64encode(json.dumps({"app_metadata": {"tenant_id": "globex"}}).encode()).decode()
        r = s.post(CHAT, BODY, dict(bearer(mint("ES256")), **{"x-jwt-payload": fake}))
        assert r.status == 200, r.body
        rec = mock.requests()[-1]
        assert "x-jwt-payload" not in rec["header_map"]
        assert rec["header_map"]["authorization"] == "Bearer sk-openai-acme"
        # No token: jwt_authn refuses before tollgate.
        assert s.post(CHAT, BODY, {}).status == 401
        # A payload header alone (no verified token) gets nothing.
        assert s.post(CHAT, BODY, {"x-jwt-payload": fake}).status == 401
    finally:
        s.stop()
