"""What a configuration push costs in Envoy memory, and what gives it back
(issue 14).

A wasm VM's linear memory only grows: a VM keeps the peak of every
configuration it loaded. Envoy reuses a VM across pushes while its key is
unchanged, and the key is made of `vm_config.vm_id`, `vm_config.configuration`
and the code (`proxy_wasm::makeVmKey` in Envoy's
source/extensions/common/wasm/wasm.cc); the plugin's `configuration`, where
tollgate's tenants are, is not part of it.

Real Envoy (one worker, listeners from an LDS file, `--drain-time-s 1`):

1. start with BIG tenants (default 100,000): RSS when ready;
2. push the 10-tenant configuration, same `vm_config`: RSS once the old
   listener drained (the same VMs keep their peak);
3. push the 10-tenant configuration again with a `vm_config.configuration`
   set (a generation string tollgate ignores): Envoy builds new VMs and
   frees the old ones once the old listener drained;
4. push BIG tenants again (same VM key as 3: the VMs grow to the peak);
5. push the 10-tenant configuration with `vm_config.vm_id` changed: new VMs
   again (and, unlike 3, new shared data: see docs/sizing.md);
6. for reference, a fresh Envoy started with the 10-tenant configuration.

Prints `RESULT push_<step>_rss_mb=...`. Usage (after ./wasm-build.sh):
`.venv/bin/python bench/push_memory.py` (env BIG, SETTLE_S (8)).
"""

import os
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration-tests"))

import harness  # noqa: E402
import scale_config as sc  # noqa: E402

BIG = int(os.environ.get("BIG", "100000"))
SMALL = 10
SETTLE_S = float(os.environ.get("SETTLE_S", "8"))


def result(name, value):
    print("RESULT %s=%s" % (name, value), flush=True)


def rss_mb(pid):
    for line in open("/proc/%d/status" % pid):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def listeners(port, admin, up_port, rls_port, n, vm_id="tollgate", generation=None):
    filt = harness.wasm_filter(sc.config(n), env_keys=sorted(sc.SCALE_ENV))
    vm = filt["typed_config"]["config"]["vm_config"]
    vm["vm_id"] = vm_id
    if generation is not None:
        # tollgate ignores the VM configuration; Envoy's VM key includes it
        vm["configuration"] = {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": generation}
    cfg = harness.envoy_config(port, admin, up_port, [filt],
                               extra_clusters=[harness.grpc_cluster("tollgate_rls", rls_port)])
    return cfg


def accepted(e, n):
    """How many times the filter logged a configuration of n tenants."""
    return len(re.findall(r"configuration accepted: %d tenants" % n, e.proc.output()))


def wait_accepted(e, n, count, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if accepted(e, n) >= count:
            return
        time.sleep(0.2)
    raise SystemExit("no 'configuration accepted: %d tenants' (x%d) in Envoy's log" % (n, count))


def main():
    logdir = tempfile.mkdtemp(prefix="push-memory-")
    port, admin = harness.free_port(), harness.free_port()
    up_port, rls_port = harness.free_port(), harness.free_port()  # nothing is sent
    envoys = []
    try:
        cfg = listeners(port, admin, up_port, rls_port, BIG)
        t0 = time.perf_counter()
        e = harness.Envoy(cfg, env=sc.SCALE_ENV, logdir=logdir, concurrency=1, lds=True, expect_failure=True)
        envoys.append(e)
        e._wait_ready(timeout=300)
        result("push_start_%d_s" % BIG, "%.2f" % (time.perf_counter() - t0))
        # the main thread's VM and the worker's VM each loaded it
        wait_accepted(e, BIG, 2)
        time.sleep(SETTLE_S)
        result("push_1_ready_%d_tenants_rss_mb" % BIG, "%.0f" % rss_mb(e.proc.pid))

        small = listeners(port, admin, up_port, rls_port, SMALL)["static_resources"]["listeners"]
        e.update_listeners(small)
        wait_accepted(e, SMALL, 2)
        time.sleep(SETTLE_S)
        result("push_2_same_vm_%d_tenants_rss_mb" % SMALL, "%.0f" % rss_mb(e.proc.pid))

        gen = listeners(port, admin, up_port, rls_port, SMALL, generation="2")["static_resources"]["listeners"]
        e.update_listeners(gen)
        wait_accepted(e, SMALL, 4)
        time.sleep(SETTLE_S)
        result("push_3_new_vm_configuration_%d_tenants_rss_mb" % SMALL, "%.0f" % rss_mb(e.proc.pid))

        big = listeners(port, admin, up_port, rls_port, BIG, generation="2")["static_resources"]["listeners"]
        e.update_listeners(big)
        wait_accepted(e, BIG, 4)
        time.sleep(SETTLE_S)
        result("push_4_back_to_%d_tenants_rss_mb" % BIG, "%.0f" % rss_mb(e.proc.pid))

        fresh = listeners(port, admin, up_port, rls_port, SMALL, vm_id="tollgate-2")["static_resources"]["listeners"]
        e.update_listeners(fresh)
        wait_accepted(e, SMALL, 6)
        time.sleep(SETTLE_S)
        result("push_5_new_vm_id_%d_tenants_rss_mb" % SMALL, "%.0f" % rss_mb(e.proc.pid))
        result("push_vms_created", e.stats("wasm.envoy.wasm.runtime.v8.created").get(
            "wasm.envoy.wasm.runtime.v8.created", "?"))
        result("push_vms_active", e.stats("wasm.envoy.wasm.runtime.v8.active").get(
            "wasm.envoy.wasm.runtime.v8.active", "?"))
        e.stop()
        envoys.pop()

        port2, admin2 = harness.free_port(), harness.free_port()
        cfg = listeners(port2, admin2, up_port, rls_port, SMALL)
        e2 = harness.Envoy(cfg, env=sc.SCALE_ENV, logdir=tempfile.mkdtemp(prefix="push-memory-"), concurrency=1)
        envoys.append(e2)
        wait_accepted(e2, SMALL, 2)
        time.sleep(SETTLE_S)
        result("push_6_fresh_envoy_%d_tenants_rss_mb" % SMALL, "%.0f" % rss_mb(e2.proc.pid))
    finally:
        for e in envoys:
            e.stop()


if __name__ == "__main__":
    main()
