"""The demo stack: `./stack.sh` runs this after building.

Starts, on loopback, the mock LLM provider (:18000), Redis (:16379), the
rate-limit service (:18081, metrics :18091, tenant registry :18083, admin API
:18082) and Envoy 1.40 with tollgate (envoy/demo-envoy.yaml, :10000, admin
:9901), sends one request to prove it works, onboards a tenant at runtime
through the admin API and proves its new key is served, prints examples and
waits. Ctrl-C (or SIGTERM) stops every process by PID.

The admin token (random per run) is written to <logdir>/admin-token (mode
0600), never printed; the key-encryption key is random per run too.

`--check` runs the proofs and exits: 0 when the demo serves.
"""

import argparse
import base64
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

ENVOY_CONFIG = os.path.join(harness.ROOT, "envoy", "demo-envoy.yaml")
LISTEN, ADMIN, MOCK, REDIS, RLS, RLS_METRICS = 10000, 9901, 18000, 16379, 18081, 18091
RLS_ADMIN, RLS_REGISTRY = 18082, 18083
DEMO_ENV = {
    # The mock provider accepts any key; real deployments export real ones.
    "DEMO_OPENAI_KEY": "sk-demo-openai-provider-key",
    "DEMO_ANTHROPIC_KEY": "sk-ant-demo-provider-key",
    "DEMO_GEMINI_KEY": "demo-gemini-provider-key",
    "BETA_OPENAI_KEY": "sk-beta-openai-provider-key",
}

CURLS = """
tollgate demo is up. Envoy with tollgate listens on http://127.0.0.1:{port}

  # OpenAI chat completion as tenant "demo" (enterprise tier)
  curl -s http://127.0.0.1:{port}/v1/chat/completions \\
    -H 'authorization: Bearer sk-tollgate-demo' -H 'content-type: application/json' \\
    -d '{{"model":"gpt-4o","messages":[{{"role":"user","content":"hi"}}]}}'

  # Streamed Anthropic message
  curl -sN http://127.0.0.1:{port}/v1/messages -H 'x-api-key: sk-tollgate-demo' \\
    -d '{{"model":"claude-sonnet-4-5","max_tokens":64,"stream":true,"messages":[{{"role":"user","content":"hi"}}]}}'

  # Gemini, key in the query string (removed before the provider sees it)
  curl -s 'http://127.0.0.1:{port}/v1beta/models/gemini-2.0-flash:generateContent?key=sk-tollgate-demo' \\
    -d '{{"contents":[{{"role":"user","parts":[{{"text":"hi"}}]}}]}}'

  # Tenant "beta" (free tier) asking for a model outside its allowlist: 403
  curl -s http://127.0.0.1:{port}/v1/chat/completions -H 'authorization: Bearer sk-tollgate-beta' \\
    -d '{{"model":"gpt-4o","messages":[]}}'

  # Onboard a tenant at runtime (no restart, no config push), with the CLI
  export TOLLGATE_ADMIN_URL=http://127.0.0.1:{rls_admin} TOLLGATE_ADMIN_TOKEN_FILE={logdir}/admin-token
  target/release/tollgate-admin tenant create initech --tier free
  target/release/tollgate-admin key issue initech --label laptop     # the key is shown once
  INITECH_OPENAI=sk-... target/release/tollgate-admin credential set initech openai --from-env INITECH_OPENAI
  target/release/tollgate-admin audit --limit 5

  # Metrics, the limiter's metrics, and what the provider received
  curl -s http://127.0.0.1:{admin}/stats/prometheus | grep ^tollgate
  curl -s http://127.0.0.1:{rls_metrics}/metrics | grep ^tollgate
  curl -s http://127.0.0.1:{mock}/__mock/requests

Logs: {logdir}    Ctrl-C stops everything.
"""


def onboard_at_runtime(rls, token):
    """Creates a tenant, a key and a provider credential through the admin
    API, then serves the new key through the running Envoy."""
    tenant = "runtime-" + secrets.token_hex(3)
    calls = [("POST", "/v1/tenants", {"id": tenant, "tier": "free"}, 201),
             ("PUT", "/v1/tenants/%s/credentials/openai" % tenant, {"secret": "sk-runtime-provider-key"}, 200),
             ("POST", "/v1/tenants/%s/keys" % tenant, {"label": "demo"}, 201)]
    answer = None
    for method, path, body, want in calls:
        status, answer = rls.http(RLS_ADMIN, method, path, body, token=token)
        if status != want:
            print("demo onboarding failed: %s %s -> %s %s" % (method, path, status, answer), file=sys.stderr)
            return False
    key = answer["key"]
    deadline = time.time() + 10
    while True:
        r = harness.request(LISTEN, "/v1/chat/completions",
                            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                            {"authorization": "Bearer " + key})
        if r.status == 200 or time.time() > deadline:
            break
        time.sleep(0.2)
    if r.status != 200:
        print("demo check failed for a runtime key: %s %s" % (r.status, r.body[:500]), file=sys.stderr)
        return False
    print("demo check: 200 for tenant %s onboarded at runtime through the admin API" % tenant)
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="prove the demo serves, then stop")
    args = ap.parse_args()

    logdir = tempfile.mkdtemp(prefix="tollgate-demo-")
    procs = []

    def stop_all(*_):
        for p in reversed(procs):
            p.stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop_all)
    try:
        mock = harness.MockLLM(logdir=logdir, port=MOCK)
        procs.append(mock.proc)
        redis = harness.Redis(logdir=logdir, port=REDIS)
        procs.append(redis.proc)
        token = secrets.token_urlsafe(32)
        token_file = os.path.join(logdir, "admin-token")
        with open(os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(token + "\n")
        kek = "demo:" + base64.b64encode(secrets.token_bytes(32)).decode()
        rls = harness.RateLimitService(REDIS, logdir=logdir, port=RLS, metrics_port=RLS_METRICS, registry=True,
                                       registry_port=RLS_REGISTRY, admin_tokens="demo:" + token, kek=kek,
                                       admin_port=RLS_ADMIN)
        procs.append(rls.proc)
        config_copy = os.path.join(logdir, "demo-envoy.yaml")
        shutil.copy(ENVOY_CONFIG, config_copy)
        envoy = harness.Proc("envoy", [harness.envoy_bin(), "-c", config_copy, "--use-dynamic-base-id",
                                       "--concurrency", "2", "--file-flush-interval-msec", "200"],
                             env=DEMO_ENV, logdir=logdir)
        procs.append(envoy)
        harness.wait_port(LISTEN, timeout=30, proc=envoy.proc)

        r = harness.request(LISTEN, "/v1/chat/completions",
                            {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
                            {"authorization": "Bearer sk-tollgate-demo"})
        if r.status != 200:
            print("demo check failed: %s %s" % (r.status, r.body[:500]), file=sys.stderr)
            print(envoy.output()[-4000:], file=sys.stderr)
            return 1
        print("demo check: 200, completion served through Envoy + tollgate:")
        print("  " + json.dumps(r.json())[:300])
        if not onboard_at_runtime(rls, token):
            print(envoy.output()[-4000:], file=sys.stderr)
            return 1
        if args.check:
            return 0
        print(CURLS.format(port=LISTEN, admin=ADMIN, mock=MOCK, rls_metrics=RLS_METRICS, rls_admin=RLS_ADMIN,
                           logdir=logdir))
        while all(p.alive() for p in procs):
            time.sleep(1)
        print("a process exited; stopping the demo", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        for p in reversed(procs):
            p.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
