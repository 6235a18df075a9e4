import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

KEY_A = "sk-tg-acme-0001"
KEY_B = "sk-tg-globex-0002"
KEY_OFF = "sk-tg-initech-0003"

# Provider keys the tenants own; Envoy passes them to the VM by name.
PROVIDER_ENV = {
    "ACME_OPENAI_KEY": "sk-openai-acme",
    "ACME_ANTHROPIC_KEY": "sk-ant-acme",
    "ACME_GEMINI_KEY": "gm-acme",
    "GLOBEX_OPENAI_KEY": "sk-openai-globex",
    "GLOBEX_ANTHROPIC_KEY": "sk-ant-globex",
    "GLOBEX_GEMINI_KEY": "gm-globex",
}

ROUTES = [
    {"path": "/v1/chat/completions", "api": "openai_chat", "provider": "openai"},
    {"path": "/v1/responses", "api": "openai_responses", "provider": "openai"},
    {"path": "/v1/embeddings", "api": "openai_embeddings", "provider": "openai"},
    {"path": "/v1/messages", "api": "anthropic_messages", "provider": "anthropic"},
    {"path_prefix": "/v1beta/models/", "api": "gemini", "provider": "gemini"},
]


PRICING = {
    "models": {
        "gpt-4o-mini": {"input": 0.15, "cached_input": 0.075, "output": 0.6},
        "gpt-4o": {"input": 2.5, "cached_input": 1.25, "output": 10.0},
        "text-embedding-3-small": {"input": 0.02, "output": 0.0},
        "claude-3-5-haiku": {"input": 0.8, "cached_input": 0.08, "cache_write": 1.0, "output": 4.0},
        "gemini-2.0-flash": {"input": 0.1, "cached_input": 0.025, "output": 0.4},
    },
    "prefix_match": True,
    "default": {"input": 5.0, "output": 15.0},
}


def cost_micros(model_prices, usage):
    """Expected cost: integer pico-dollars per token, rounded up to micro-dollars."""
    p = model_prices
    pico = (usage["input"] * round(p["input"] * 1e6)
            + usage["cache_read"] * round(p.get("cached_input", p["input"]) * 1e6)
            + usage["cache_write"] * round(p.get("cache_write", p["input"]) * 1e6)
            + usage["output"] * round(p["output"] * 1e6))
    return -(-pico // 1_000_000)


def plugin_config(**extra):
    cfg = {
        "strip_request_headers": ["x-user-id"],
        "providers": {
            "openai": {"credential_header": "authorization"},
            "anthropic": {"credential_header": "x-api-key"},
            "gemini": {"credential_header": "x-goog-api-key"},
        },
        "routes": ROUTES,
        "tiers": {
            "free": {"models": ["gpt-4o-mini", "claude-3-5-haiku*", "gemini-2.0-flash", "text-embedding-3-small"],
                     "max_request_bytes": 4096},
            "enterprise": {"models": ["*"], "max_request_bytes": 8 * 1024 * 1024},
        },
        "tenants": [
            {"id": "acme", "tier": "enterprise", "api_key_sha256": [harness.sha256_hex(KEY_A)],
             "provider_key_env": {"openai": "ACME_OPENAI_KEY", "anthropic": "ACME_ANTHROPIC_KEY",
                                  "gemini": "ACME_GEMINI_KEY"}},
            {"id": "globex", "tier": "free", "api_key_sha256": [harness.sha256_hex(KEY_B)],
             "provider_key_env": {"openai": "GLOBEX_OPENAI_KEY", "anthropic": "GLOBEX_ANTHROPIC_KEY",
                                  "gemini": "GLOBEX_GEMINI_KEY"}},
            {"id": "initech", "tier": "free", "enabled": False, "api_key_sha256": [harness.sha256_hex(KEY_OFF)]},
        ],
    }
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="session")
def wasm():
    if not os.path.exists(harness.WASM):
        pytest.fail("build/tollgate.wasm is missing: run ./wasm-build.sh (the test command does)")
    return harness.WASM


@pytest.fixture(scope="session")
def mock(tmp_path_factory):
    m = harness.MockLLM(logdir=str(tmp_path_factory.mktemp("mock")))
    yield m
    m.stop()


class Stack:
    """Envoy + tollgate in front of the mock."""

    def __init__(self, mock, logdir, plugin=None, **kw):
        self.mock = mock
        self.port = harness.free_port()
        self.admin_port = harness.free_port()
        self.access_log = os.path.join(logdir, "access.log")
        env = kw.pop("provider_env", PROVIDER_ENV)
        filt = harness.wasm_filter(plugin or plugin_config(), env_keys=sorted(env),
                                   struct_config=kw.pop("struct_config", False))
        kw.setdefault("stats_tags", harness.STATS_TAGS)
        cfg = harness.envoy_config(self.port, self.admin_port, mock.port, [filt],
                                   access_log_path=self.access_log, **kw)
        self.envoy = harness.Envoy(cfg, env=env, logdir=logdir)

    def post(self, path, body=None, headers=None, **kw):
        return harness.request(self.port, path, body, headers, **kw)

    def access_log_lines(self, ids, timeout=5.0):
        """Access-log records by request id, waiting for all of `ids`."""
        import json
        import time
        deadline = time.time() + timeout
        found = {}
        while time.time() < deadline:
            if os.path.exists(self.access_log):
                with open(self.access_log) as f:
                    for line in f:
                        try:
                            rec = json.loads(line)
                        except ValueError:
                            continue
                        if rec.get("request_id") in ids:
                            found[rec["request_id"]] = rec
            if len(found) == len(ids):
                return found
            time.sleep(0.1)
        raise AssertionError("access log lines missing: %s" % (set(ids) - set(found)))

    def stop(self):
        self.envoy.stop()


@pytest.fixture(scope="module")
def stack(wasm, mock, tmp_path_factory):
    s = Stack(mock, str(tmp_path_factory.mktemp("envoy")))
    yield s
    s.stop()


@pytest.fixture(scope="session")
def redis(tmp_path_factory):
    r = harness.Redis(logdir=str(tmp_path_factory.mktemp("redis")))
    yield r
    r.stop()


@pytest.fixture(scope="session")
def rls(redis, tmp_path_factory):
    s = harness.RateLimitService(redis.port, logdir=str(tmp_path_factory.mktemp("rls")))
    yield s
    s.stop()


def limited_config(rls_timeout_ms=200, **tier_overrides):
    """plugin_config with the rate-limit service and prices wired in."""
    cfg = plugin_config(rate_limit={"cluster": "tollgate_rls", "timeout_ms": rls_timeout_ms}, pricing=PRICING)
    return cfg


class LimitedStack(Stack):
    def __init__(self, mock, rls, logdir, plugin, **kw):
        kw.setdefault("extra_clusters", [harness.grpc_cluster("tollgate_rls", rls.port)])
        super().__init__(mock, logdir, plugin=plugin, **kw)
