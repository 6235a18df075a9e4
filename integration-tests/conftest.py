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
        filt = harness.wasm_filter(plugin or plugin_config(), env_keys=sorted(PROVIDER_ENV),
                                   struct_config=kw.pop("struct_config", False))
        cfg = harness.envoy_config(self.port, self.admin_port, mock.port, [filt],
                                   access_log_path=self.access_log, **kw)
        self.envoy = harness.Envoy(cfg, env=PROVIDER_ENV, logdir=logdir)

    def post(self, path, body=None, headers=None, **kw):
        return harness.request(self.port, path, body, headers, **kw)

    def stop(self):
        self.envoy.stop()


@pytest.fixture(scope="module")
def stack(wasm, mock, tmp_path_factory):
    s = Stack(mock, str(tmp_path_factory.mktemp("envoy")))
    yield s
    s.stop()
