"""Trace spans carry the tenant: Envoy's HTTP connection manager tags each
span from tollgate's filter state (`tracing.custom_tags[].value`, an
access-log format string), here with Envoy's Zipkin tracer posting to a small
collector on loopback."""

import http.server
import json
import os
import threading
import time
import uuid

import pytest
import yaml

import harness
from conftest import KEY_A, KEY_B, PROVIDER_ENV, plugin_config

# The tags envoy/production-envoy.yaml sets (tested to match below).
CUSTOM_TAGS = [{"tag": "tollgate.%s" % f, "value": "%%FILTER_STATE(wasm.tollgate_%s:PLAIN)%%" % f}
               for f in ("tenant", "tier", "outcome", "error")]


class Collector:
    """A Zipkin v2 JSON collector: keeps every span it is sent."""

    def __init__(self):
        spans = self.spans = []

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                if "chunked" in self.headers.get("transfer-encoding", ""):
                    body = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        body += self.rfile.read(size + 2)[:size]
                        if size == 0:
                            break
                else:
                    body = self.rfile.read(int(self.headers.get("content-length", "0")))
                spans.extend(json.loads(body))
                self.send_response(202)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def span_of(self, request_id, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for s in list(self.spans):
                got = (s.get("tags") or {}).get("guid:x-request-id", "")
                # Envoy writes its trace decision into the id's 15th character.
                if len(got) == len(request_id) and got[:14] + got[15:] == request_id[:14] + request_id[15:]:
                    return s
            time.sleep(0.1)
        raise AssertionError("no span for %s in %s" % (request_id, self.spans))

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def traced(wasm, mock, tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp("tracing"))
    col = Collector()
    port, admin = harness.free_port(), harness.free_port()
    cfg = harness.envoy_config(port, admin, mock.port,
                               [harness.wasm_filter(plugin_config(), env_keys=sorted(PROVIDER_ENV))],
                               extra_clusters=[{
                                   "name": "zipkin", "type": "STATIC", "connect_timeout": "1s",
                                   "load_assignment": {"cluster_name": "zipkin", "endpoints": [{"lb_endpoints": [
                                       {"endpoint": {"address": {"socket_address": {
                                           "address": "127.0.0.1", "port_value": col.port}}}}]}]}}])
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["tracing"] = {
        "random_sampling": {"value": 100},
        "custom_tags": CUSTOM_TAGS,
        "provider": {"name": "envoy.tracers.zipkin", "typed_config": {
            "@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig",
            "collector_cluster": "zipkin", "collector_endpoint": "/api/v2/spans",
            "collector_endpoint_version": "HTTP_JSON"}},
    }
    # Send every span at once instead of in batches of 5.
    cfg["layered_runtime"] = {"layers": [{"name": "static", "static_layer": {"tracing.zipkin.min_flush_spans": 1}}]}
    envoy = harness.Envoy(cfg, env=PROVIDER_ENV, logdir=logdir)
    yield envoy, col
    envoy.stop()
    col.stop()


def test_the_span_carries_the_tenant_tier_and_outcome(traced):
    envoy, col = traced
    # A UUID: Envoy keeps its sampling decision in the request id and traces
    # no request whose id is not one.
    rid = str(uuid.uuid4())
    r = harness.request(envoy.port, "/v1/chat/completions",
                        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                        {"authorization": "Bearer " + KEY_A, "x-request-id": rid})
    assert r.status == 200, r.body
    tags = col.span_of(rid)["tags"]
    assert tags["tollgate.tenant"] == "acme" and tags["tollgate.tier"] == "enterprise", tags
    assert tags["tollgate.outcome"] == "ok", tags


def test_a_refusal_span_carries_the_tenant_and_the_code(traced):
    envoy, col = traced
    rid = str(uuid.uuid4())
    # globex is on the free tier: gpt-4o is outside its model allowlist.
    r = harness.request(envoy.port, "/v1/chat/completions",
                        {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
                        {"authorization": "Bearer " + KEY_B, "x-request-id": rid})
    assert r.status == 403, r.body
    tags = col.span_of(rid)["tags"]
    assert tags["tollgate.tenant"] == "globex" and tags["tollgate.outcome"] == "refused", tags
    assert tags["tollgate.error"] == r.header("x-tollgate-error"), (tags, r.headers)


def test_production_envoy_sets_the_same_tags():
    with open(os.path.join(harness.ROOT, "envoy", "production-envoy.yaml")) as f:
        cfg = yaml.safe_load(f)
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["tracing"]["custom_tags"] == CUSTOM_TAGS
