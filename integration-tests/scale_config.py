"""Plugin configurations with many tenants, for the scale test and bench.

Tenant i has id `t%06d`, API key `sk-scale-<i>` and tier `TIERS[i % 3]`;
every tenant's OpenAI key comes from the one env var SCALE_OPENAI_KEY, so
Envoy's environment stays small however many tenants there are.
"""

import hashlib
import json

SCALE_ENV = {"SCALE_OPENAI_KEY": "sk-openai-scale"}
TIERS = ("small", "medium", "large")
CHAT = {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


def tenant_id(i):
    return "t%06d" % i


def key(i):
    return "sk-scale-%d" % i


def tier_of(i):
    return TIERS[i % len(TIERS)]


def tenant(i):
    return {"id": tenant_id(i), "tier": tier_of(i),
            "api_key_sha256": [hashlib.sha256(key(i).encode()).hexdigest()],
            "provider_key_env": {"openai": "SCALE_OPENAI_KEY"}}


def config(n, rls_cluster="tollgate_rls", extra_tenants=(), lease_requests=None, **extra):
    """A plugin config with tenants 0..n-1 (plus `extra_tenants` indices) in
    three tiers, each with a few limits; `rls_cluster=None` leaves limits and
    the rate_limit section out."""
    tiers = {}
    for scale, name in enumerate(TIERS, start=1):
        t = {"models": ["*"], "max_request_bytes": 65536}
        if rls_cluster:
            t.update({"requests_per_minute": 1_000_000 * scale, "tokens_per_minute": 100_000_000 * scale,
                      "usd_per_day": 10_000 * scale})
            if lease_requests:
                t["lease_requests"] = lease_requests
        tiers[name] = t
    cfg = {
        "providers": {"openai": {"credential_header": "authorization"}},
        "routes": [{"path": "/v1/chat/completions", "api": "openai_chat", "provider": "openai"}],
        "tiers": tiers,
        "tenants": [tenant(i) for i in range(n)] + [tenant(i) for i in extra_tenants],
        "pricing": {"models": {"gpt-4o-mini": {"input": 0.15, "output": 0.6}},
                    "default": {"input": 1, "output": 1}},
    }
    if rls_cluster:
        cfg["rate_limit"] = {"cluster": rls_cluster, "timeout_ms": 500}
    cfg.update(extra)
    return cfg


def json_size(cfg):
    return len(json.dumps(cfg))
