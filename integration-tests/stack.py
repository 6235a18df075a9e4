"""The demo stack: `./stack.sh` runs this after building.

Starts, on loopback, the mock LLM provider (:18000), Redis (:16379), the
rate-limit service (:18081, metrics :18091) and Envoy 1.40 with tollgate (envoy/demo-envoy.yaml,
:10000, admin :9901), sends one request to prove it works, prints curl examples
and waits. Ctrl-C (or SIGTERM) stops every process by PID.

`--check` sends the proof request and exits: 0 when the demo serves.
"""

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

ENVOY_CONFIG = os.path.join(harness.ROOT, "envoy", "demo-envoy.yaml")
LISTEN, ADMIN, MOCK, REDIS, RLS, RLS_METRICS = 10000, 9901, 18000, 16379, 18081, 18091
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

  # Metrics, the limiter's metrics, and what the provider received
  curl -s http://127.0.0.1:{admin}/stats/prometheus | grep ^tollgate
  curl -s http://127.0.0.1:{rls_metrics}/metrics | grep ^tollgate
  curl -s http://127.0.0.1:{mock}/__mock/requests

Logs: {logdir}    Ctrl-C stops everything.
"""


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
        rls = harness.RateLimitService(REDIS, logdir=logdir, port=RLS, metrics_port=RLS_METRICS)
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
        if args.check:
            return 0
        print(CURLS.format(port=LISTEN, admin=ADMIN, mock=MOCK, rls_metrics=RLS_METRICS, logdir=logdir))
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
