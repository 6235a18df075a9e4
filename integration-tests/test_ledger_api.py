"""The usage ledger, quota and alert-delivery endpoints through the real
service binary: traffic from rls-bench (reserve + settle with one usage row
per settle, over gRPC), then the admin API's reports checked to the token and
the micro-dollar, the CSV parsed, the CLI, 401/400 answers, and schemathesis
against the OpenAPI document. No Envoy needed."""

import base64
import csv
import datetime
import io
import os
import subprocess

import pytest

import harness
from test_admin_api import schemathesis_bin

TOKEN = "ops-" + base64.urlsafe_b64encode(os.urandom(18)).decode()
WEBHOOK_SECRET = "whsec-" + base64.urlsafe_b64encode(os.urandom(18)).decode()
# What rls-bench's usage row carries per settle (src/bin/rls-bench.rs).
ROW = {"requests": 1, "input_tokens": 1200, "cached_read_tokens": 200, "output_tokens": 300,
       "cost_micro_usd": 2300}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp("ledger"))
    redis = harness.Redis(logdir=logdir)
    # The webhook points at a closed port: deliveries fail and are logged.
    svc = harness.RateLimitService(
        redis.port, logdir=logdir, admin_tokens="ops:" + TOKEN,
        extra_args=["--usage-stream-max-len", "1000000",
                    "--alert-webhook-url", "http://127.0.0.1:%d/hook" % harness.free_port()],
        extra_env={"TOLLGATE_ALERT_WEBHOOK_SECRET": WEBHOOK_SECRET})
    if not os.path.exists(harness.BENCH_BIN):
        pytest.fail("%s is missing: cargo build --release -p tollgate-ratelimit" % harness.BENCH_BIN)
    out = subprocess.run([harness.BENCH_BIN, "run", "--grpc-addr", "127.0.0.1:%d" % svc.port,
                          "--concurrency", "4", "--connections", "1", "--duration-s", "2",
                          "--tenants", "3", "--usage"], capture_output=True, text=True, timeout=60)
    assert "RESULT service_errors=0" in out.stdout, out.stdout + out.stderr
    svc.redis = redis
    yield svc
    svc.stop()
    redis.stop()


def admin(svc, path, token=TOKEN):
    return svc.http(svc.admin_port, "GET", path, token=token)


def raw_get(svc, path):
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", svc.admin_port, timeout=10)
    c.request("GET", path, headers={"authorization": "Bearer " + TOKEN})
    r = c.getresponse()
    body = r.read().decode()
    c.close()
    return r.status, r.getheader("content-type"), body


def days():
    today = datetime.datetime.now(datetime.timezone.utc).date()
    return str(today - datetime.timedelta(days=1)), str(today + datetime.timedelta(days=1))


def test_usage_report_is_exact_and_csv_parses(service):
    frm, to = days()
    st, rep = admin(service, "/v1/usage?from=%s&to=%s&group_by=day,model,key" % (frm, to))
    assert st == 200, rep
    totals = rep["totals"]
    n = totals["requests"]
    assert n > 10, rep
    # every settle carried the same row: the ledger is exact
    for field, per in ROW.items():
        assert totals[field] == per * n, (field, totals)
    assert {r["tenant"] for r in rep["rows"]} == {"tenant-0", "tenant-1", "tenant-2"}
    assert sum(r["requests"] for r in rep["rows"]) == n
    # CSV: same numbers
    st, ctype, text = raw_get(service, "/v1/usage?from=%s&to=%s&format=csv" % (frm, to))
    assert st == 200 and ctype.startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert sum(int(r["cost_micro_usd"]) for r in rows) == totals["cost_micro_usd"]
    assert set(rows[0]) >= {"tenant", "day", "model", "key", "requests", "refusals"}
    # one tenant, filtered by model
    st, one = admin(service, "/v1/usage?tenant=tenant-1&model=gpt-4o-mini&from=%s&to=%s&group_by=model" % (frm, to))
    assert st == 200 and len(one["rows"]) == 1 and one["rows"][0]["model"] == "gpt-4o-mini"
    # the usage stream holds one entry per settle of the tenant
    xlen = sum(int(service.redis.cli("XLEN", "tg:{tollgate|tenant-%d}:usage" % t)) for t in range(3))
    assert xlen == n


def test_quota_shows_every_limit_with_what_is_left(service):
    st, q = admin(service, "/v1/tenants/tenant-0/quota")
    assert st == 200, q
    names = {l["name"]: l for l in q["limits"]}
    assert set(names) == {"rpm", "tpm", "tokens_per_day", "usd_per_day", "usd_per_month"}, q
    for l in q["limits"]:
        assert l["level"] == "tenant"
        assert l["remaining"] == l["limit"] - l["used"], l
        assert l["reset_at_ms"] >= q["at_ms"]
    assert names["usd_per_month"]["unit"] == "month" and names["usd_per_month"]["used"] > 0
    st, q = admin(service, "/v1/tenants/never-seen/quota")
    assert st == 200 and q["limits"] == []


def test_ledger_endpoints_need_the_token_and_refuse_bad_input(service):
    frm, to = days()
    for path in ["/v1/usage?from=%s&to=%s" % (frm, to), "/v1/tenants/tenant-0/quota", "/v1/alerts/deliveries"]:
        st, body = admin(service, path, token="wrong-token-0123456789")
        assert st == 401, (path, body)
    for path, field in [("/v1/usage?from=%s" % frm, "to"),
                        ("/v1/usage?from=%s&to=%s&format=xml" % (frm, to), "format"),
                        ("/v1/usage?from=2020-01-01&to=2026-01-01", "to"),
                        ("/v1/usage?from=%s&to=%s&group_by=tenant" % (frm, to), "group_by"),
                        ("/v1/alerts/deliveries?limit=0", "limit")]:
        st, body = admin(service, path)
        assert st == 400 and body["error"]["field"] == field, (path, body)
    st, d = admin(service, "/v1/alerts/deliveries")
    assert st == 200 and d["deliveries"] == [] and d["next"] is None
    # the webhook secret is never in the log or the metrics
    assert WEBHOOK_SECRET not in service.proc.output()
    assert WEBHOOK_SECRET not in service.metrics()


def test_cli_prints_usage_and_quota(service, tmp_path):
    if not os.path.exists(harness.ADMIN_BIN):
        pytest.fail("%s is missing: cargo build --release -p tollgate-ratelimit" % harness.ADMIN_BIN)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    base = ["--url", "http://127.0.0.1:%d" % service.admin_port, "--token-file", str(token_file)]
    frm, to = days()
    out = subprocess.run([harness.ADMIN_BIN] + base + ["usage", "--from", frm, "--to", to, "--tenant", "tenant-2",
                                                        "--csv"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert rows and all(r["tenant"] == "tenant-2" for r in rows)
    out = subprocess.run([harness.ADMIN_BIN] + base + ["quota", "tenant-2"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and '"usd_per_month"' in out.stdout, out.stderr
    out = subprocess.run([harness.ADMIN_BIN] + base + ["usage", "--from", "nope", "--to", to],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "from" in out.stderr


def test_schemathesis_on_the_ledger_endpoints(service, tmp_path):
    """quota and deliveries: every check; usage: every check but
    positive_data_acceptance (its cross-field rules, e.g. to >= from, are
    beyond a schema and answer 400)."""
    exe = schemathesis_bin()
    if not exe:
        pytest.fail("schemathesis is missing: pip install -r integration-tests/requirements.txt")
    base = "http://127.0.0.1:%d" % service.admin_port
    env = dict(os.environ)
    env["SCHEMATHESIS_HOOKS"] = ""
    common = [exe, "run", base + "/v1/openapi.json", "--url", base, "-H", "Authorization: Bearer " + TOKEN,
              "--max-examples", "25", "--seed", "1", "--workers", "1", "--suppress-health-check", "all",
              "--no-color"]
    for extra in (["--include-path-regex", "^/v1/(tenants/\\{id\\}/quota|alerts/deliveries)$", "--checks", "all"],
                  ["--include-path", "/v1/usage", "--checks", "all",
                   "--exclude-checks", "positive_data_acceptance"]):
        out = subprocess.run(common + extra, capture_output=True, text=True, timeout=150, env=env,
                             cwd=str(tmp_path))
        assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert service.proc.alive()
    assert TOKEN not in service.proc.output()
