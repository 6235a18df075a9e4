"""Static checks of what tollgate ships for operators: the OCI image layout
(wasm-build.sh --oci), the Istio and Kubernetes manifests, the production
Envoy example, the Prometheus alerts and the Grafana dashboard, and the
config checker run over every configuration in the repository.

No Kubernetes cluster or registry is available here: the manifests are
checked for shape and content, not applied."""

import glob
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile

import pytest
import yaml

import harness

ROOT = harness.ROOT
ENVOY_DIR = os.path.join(ROOT, "envoy")
ISTIO_DIR = os.path.join(ENVOY_DIR, "istio")
OBS_DIR = os.path.join(ENVOY_DIR, "observability")
OCI_DIR = os.path.join(ROOT, "build", "oci")
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"

HISTOGRAMS = {"tollgate_ttfb_ms", "tollgate_duration_ms", "tollgate_rls_latency_ms",
              "tollgate_rls_redis_latency_seconds"}
METRICS = {
    "tollgate_requests", "tollgate_tokens_input", "tollgate_tokens_cache_read", "tollgate_tokens_cache_write",
    "tollgate_tokens_output", "tollgate_tokens_reasoning", "tollgate_cost_micro_usd", "tollgate_usage_estimated",
    "tollgate_refused", "tollgate_stream_errors", "tollgate_unpriced", "tollgate_rls_grpc_status_14",
    "tollgate_rls_grpc_status_4", "tollgate_settle_ok", "tollgate_settle_retried", "tollgate_settle_dropped",
    "tollgate_rls_decisions_total", "tollgate_rls_redis_errors_total",
    "tollgate_budget_used_ratio", "tollgate_budget_used", "tollgate_budget_limit",
    "tollgate_target_requests", "tollgate_target_errors", "tollgate_target_timeouts", "tollgate_target_rate_limited",
    "tollgate_target_circuit_state",
} | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                "offset", "inf", "nan"}


def load_yaml_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def shipped_files(*exts):
    out = []
    for ext in exts:
        out += glob.glob(os.path.join(ENVOY_DIR, "**", "*." + ext), recursive=True)
    return sorted(out)


# --- every file parses ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", shipped_files("yaml", "yml", "json"), ids=lambda p: os.path.relpath(p, ENVOY_DIR))
def test_every_envoy_dir_file_parses(path):
    if path.endswith(".json"):
        with open(path) as f:
            json.load(f)
    else:
        assert load_yaml_docs(path), "empty YAML file"


# --- config checker over the repository ------------------------------------------------------------

@pytest.fixture(scope="module")
def checker():
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    subprocess.run(["cargo", "build", "--quiet", "--bin", "tollgate-config-check"], cwd=ROOT, check=True,
                   timeout=1200)
    path = os.path.join(target, "debug", "tollgate-config-check")
    assert os.access(path, os.X_OK), path
    return path


def repo_tollgate_configs():
    """Every shipped file that holds a tollgate configuration."""
    files = []
    for path in shipped_files("yaml", "json"):
        with open(path) as f:
            text = f.read()
        if WASM_TYPE in text or "kind: WasmPlugin" in text:
            files.append(path)
    return files


def test_repo_has_tollgate_configs():
    names = {os.path.relpath(p, ENVOY_DIR) for p in repo_tollgate_configs()}
    assert {"demo-envoy.yaml", "production-envoy.yaml", "istio/gateway.yaml", "istio/sidecar.yaml",
            "istio/wasmplugin.yaml"} <= names, names


@pytest.mark.parametrize("path", repo_tollgate_configs(), ids=lambda p: os.path.relpath(p, ENVOY_DIR))
def test_config_checker_passes_on_repo_config(checker, path):
    p = subprocess.run([checker, path], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r": OK \((\d+ configurations: )?[1-9]\d* tenants, [1-9]\d* routes\)", p.stdout), p.stdout


def test_config_checker_refuses_a_broken_manifest(checker, tmp_path):
    with open(os.path.join(ISTIO_DIR, "gateway.yaml")) as f:
        text = f.read()
    broken = tmp_path / "gateway.yaml"
    broken.write_text(text.replace("allow_on_headers_stop_iteration: true", "allow_on_headers_stop_iteration: false"))
    p = subprocess.run([checker, str(broken)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stdout
    assert "allow_on_headers_stop_iteration]: must be true" in p.stdout, p.stdout


# --- OCI image ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def oci():
    subprocess.run([os.path.join(ROOT, "wasm-build.sh"), "--oci"], cwd=ROOT, check=True, timeout=1800,
                   capture_output=True)
    return OCI_DIR


def blob(oci_dir, digest):
    algo, hexd = digest.split(":", 1)
    assert algo == "sha256"
    with open(os.path.join(oci_dir, "blobs", "sha256", hexd), "rb") as f:
        data = f.read()
    assert hashlib.sha256(data).hexdigest() == hexd, "blob content does not match its digest " + digest
    return data


def check_descriptor(oci_dir, desc, media_type):
    assert desc["mediaType"] == media_type
    data = blob(oci_dir, desc["digest"])
    assert desc["size"] == len(data), desc
    return data


def test_oci_layout_is_the_istio_compat_variant(oci):
    with open(os.path.join(oci, "oci-layout")) as f:
        assert json.load(f) == {"imageLayoutVersion": "1.0.0"}
    with open(os.path.join(oci, "index.json")) as f:
        index = json.load(f)
    assert index["schemaVersion"] == 2
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert len(index["manifests"]) == 1
    mdesc = index["manifests"][0]
    assert mdesc["annotations"]["org.opencontainers.image.ref.name"]
    manifest = json.loads(check_descriptor(oci, mdesc, "application/vnd.oci.image.manifest.v1+json"))
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    config = json.loads(check_descriptor(oci, manifest["config"], "application/vnd.oci.image.config.v1+json"))
    # Istio's compat variant: the (single) layer is a gzipped tar holding plugin.wasm.
    assert len(manifest["layers"]) == 1
    layer = check_descriptor(oci, manifest["layers"][0], "application/vnd.oci.image.layer.v1.tar+gzip")
    raw_tar = gzip.decompress(layer)
    assert config["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw_tar).hexdigest()]}
    with tarfile.open(fileobj=io.BytesIO(raw_tar)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["plugin.wasm"]
        wasm = tar.extractfile(members[0]).read()
    with open(os.path.join(ROOT, "build", "tollgate.wasm"), "rb") as f:
        assert wasm == f.read()
    assert wasm[:4] == b"\0asm"
    # The digest to pin in the WasmPlugin is the manifest digest.
    with open(os.path.join(oci, "tollgate.sha256")) as f:
        assert f.read().strip() == mdesc["digest"].split(":", 1)[1]


def test_oci_build_is_reproducible(oci, tmp_path):
    with open(os.path.join(oci, "tollgate.sha256")) as f:
        first = f.read()
    saved = tmp_path / "oci"
    shutil.copytree(oci, saved)
    subprocess.run([os.path.join(ROOT, "wasm-build.sh"), "--oci"], cwd=ROOT, check=True, timeout=1800,
                   capture_output=True)
    with open(os.path.join(oci, "tollgate.sha256")) as f:
        assert f.read() == first


# --- Istio manifests ---------------------------------------------------------------------------------

def istio_objects():
    objs = []
    for path in sorted(glob.glob(os.path.join(ISTIO_DIR, "*.yaml"))):
        objs += [(os.path.basename(path), d) for d in load_yaml_docs(path)]
    return objs


def test_wasmplugin_fields():
    plugins = [d for _, d in istio_objects() if d["kind"] == "WasmPlugin"]
    assert len(plugins) == 1
    p = plugins[0]
    assert p["apiVersion"] == "extensions.istio.io/v1alpha1"
    spec = p["spec"]
    assert spec["url"].startswith("oci://")
    assert re.fullmatch(r"[0-9a-f]{64}", spec["sha256"])
    assert spec["failStrategy"] == "FAIL_CLOSE"
    assert spec["phase"] == "UNSPECIFIED_PHASE" and isinstance(spec["priority"], int)
    assert spec["pluginName"] == "tollgate"
    env = spec["vmConfig"]["env"]
    assert env and all(e["valueFrom"] == "HOST" for e in env)
    referenced = {v for t in spec["pluginConfig"]["tenants"] for v in t.get("provider_key_env", {}).values()}
    assert referenced == {e["name"] for e in env}
    for t in spec["pluginConfig"]["tenants"]:
        assert all(re.fullmatch(r"[0-9a-f]{64}", k) for k in t["api_key_sha256"])


@pytest.mark.parametrize("name", ["gateway.yaml", "sidecar.yaml"])
def test_envoyfilter_carries_the_full_filter(name):
    (ef,) = load_yaml_docs(os.path.join(ISTIO_DIR, name))
    assert ef["kind"] == "EnvoyFilter"
    patches = ef["spec"]["configPatches"]
    by_kind = {p["applyTo"]: p for p in patches}
    cluster = by_kind["CLUSTER"]["patch"]
    assert cluster["operation"] == "ADD"
    assert cluster["value"]["name"] == "tollgate_rls"
    opts = cluster["value"]["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in opts["explicit_http_config"]
    ext = by_kind["EXTENSION_CONFIG"]["patch"]
    assert ext["operation"] == "ADD"
    config = ext["value"]["typed_config"]["config"]
    assert ext["value"]["typed_config"]["@type"] == WASM_TYPE
    assert config["allow_on_headers_stop_iteration"] is True
    assert config["failure_policy"] == "FAIL_CLOSED"
    plugin = json.loads(config["configuration"]["value"])
    assert plugin["rate_limit"]["cluster"] == "tollgate_rls"
    http = by_kind["HTTP_FILTER"]
    assert http["patch"]["operation"] == "INSERT_BEFORE"
    assert http["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == "envoy.filters.http.router"
    assert http["patch"]["value"]["name"] == ext["value"]["name"]


def test_ratelimit_and_redis_manifests():
    objs = {(d["kind"], d["metadata"]["name"]): d for _, d in istio_objects()}
    dep = objs[("Deployment", "tollgate-ratelimit")]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    args = " ".join(c["args"])
    for flag in ("--grpc-addr", "--metrics-addr", "--redis-url", "--redis-timeout-ms"):
        assert flag in args
    assert c["readinessProbe"]["grpc"]["port"] == 8081
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["requests"] and c["resources"]["limits"]
    svc = objs[("Service", "tollgate-ratelimit")]
    assert any(p["port"] == 8081 for p in svc["spec"]["ports"])
    # The registry and admin ports as on plain Kubernetes: the admin API on
    # its own Service, its tokens and the key-encryption keys from a Secret.
    flags = dict(a.split("=", 1) for a in c["args"] if "=" in a)
    assert flags["--registry-addr"].endswith(":8083") and flags["--admin-addr"].endswith(":8082")
    env = {e["name"]: e for e in c["env"]}
    for name in ("TOLLGATE_ADMIN_TOKENS", "TOLLGATE_KEK"):
        assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"], name
    assert {p["containerPort"] for p in c["ports"]} == {8081, 8082, 8083, 9090}
    assert sorted(p["port"] for p in svc["spec"]["ports"]) == [8081, 8083, 9090]
    assert [p["port"] for p in objs[("Service", "tollgate-ratelimit-admin")]["spec"]["ports"]] == [8082]
    assert ("StatefulSet", "tollgate-redis") in objs and ("Service", "tollgate-redis") in objs
    # The EnvoyFilter cluster points at this Service.
    (gw,) = load_yaml_docs(os.path.join(ISTIO_DIR, "gateway.yaml"))
    sa = next(p for p in gw["spec"]["configPatches"] if p["applyTo"] == "CLUSTER")["patch"]["value"][
        "load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert sa["address"] == "tollgate-ratelimit.%s.svc.cluster.local" % svc["metadata"]["namespace"]
    assert sa["port_value"] == 8081


# --- production Envoy example -----------------------------------------------------------------------

def test_production_envoy_example():
    (cfg,) = load_yaml_docs(os.path.join(ENVOY_DIR, "production-envoy.yaml"))
    tags = [{"tag_name": t["tag_name"], "regex": t["regex"]} for t in cfg["stats_config"]["stats_tags"]]
    assert tags == harness.STATS_TAGS
    (listener,) = cfg["static_resources"]["listeners"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    fields = hcm["access_log"][0]["typed_config"]["log_format"]["json_format"]["tollgate"]
    assert fields == {f: "%%FILTER_STATE(wasm.tollgate_%s:PLAIN)%%" % f for f in harness.METERING_FIELDS}
    wasm = hcm["http_filters"][0]["typed_config"]["config"]
    assert wasm["allow_on_headers_stop_iteration"] is True
    assert wasm["failure_policy"] == "FAIL_CLOSED"
    # Tenant ids serve routing and never reach a provider.
    assert set(hcm["route_config"]["request_headers_to_remove"]) >= set(harness.TRUSTED_HEADERS)
    plugin = json.loads(wasm["configuration"]["value"])
    largest = max(t["max_request_bytes"] for t in plugin["tiers"].values())
    assert listener["per_connection_buffer_limit_bytes"] > largest
    assert set(wasm["vm_config"]["environment_variables"]["host_env_keys"]) == {
        v for t in plugin["tenants"] for v in t.get("provider_key_env", {}).values()}
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    rls = clusters[plugin["rate_limit"]["cluster"]]
    assert "http2_protocol_options" in rls["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
    assert rls["connect_timeout"]


# --- observability ----------------------------------------------------------------------------------

def metric_names(expr):
    """Metric names in a PromQL expression (identifiers that are not functions,
    keywords, label names or durations)."""
    e = re.sub(r'"[^"]*"', "", expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", e)
    e = re.sub(r"(?<![A-Za-z0-9_])\d+(\.\d+)?([eE][+-]?\d+)?", "", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word = m.group(0)
        rest = e[m.end():].lstrip()
        if rest.startswith("(") or word.lower() in PROMQL_WORDS or word.startswith("$"):
            continue
        if e[max(0, m.start() - 1):m.start()] == "$":
            continue
        names.add(word)
    return names


def test_metric_name_extraction():
    assert metric_names('histogram_quantile(0.9, sum by (le) (rate(tollgate_ttfb_ms_bucket{tenant=~"$t"}[5m])))') == {
        "tollgate_ttfb_ms_bucket"}
    assert metric_names("sum(rate(x_total[1m])) > 2 * y / 1e6") == {"x_total", "y"}


def test_dashboard_queries_use_known_metrics():
    with open(os.path.join(OBS_DIR, "grafana-dashboard.json")) as f:
        dash = json.load(f)
    panels = dash["panels"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("tokens", "cost", "outcome", "limit", "first byte", "limiter"):
        assert topic in titles, topic
    seen = set()
    for p in panels:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            names = metric_names(t["expr"])
            assert names and names <= METRICS, (p["title"], names - METRICS)
            seen |= names
    assert {"tollgate_refused", "tollgate_cost_micro_usd", "tollgate_ttfb_ms_bucket",
            "tollgate_rls_grpc_status_14", "tollgate_settle_dropped"} <= seen


def alert_rules():
    (doc,) = load_yaml_docs(os.path.join(OBS_DIR, "alerts.yaml"))
    return [r for g in doc["groups"] for r in g["rules"]]


def test_alerts_use_known_metrics_and_cover_the_brief():
    rules = alert_rules()
    for r in rules:
        names = metric_names(r["expr"])
        assert names and names <= METRICS, (r["alert"], names - METRICS)
    alerts = {r["alert"] for r in rules}
    assert {"TollgateTenantCostSpike", "TollgateEstimatedUsageRising", "TollgateRateLimiterUnavailable",
            "TollgateRateLimiterTimingOut", "TollgateSettlesDropped", "TollgateBudgetNearlyExhausted"} <= alerts


def promtool():
    path = shutil.which("promtool")
    if not path:
        pytest.skip("promtool not installed (Debian package prometheus; scripts/setup.sh installs it as root)")
    return path


def test_promtool_check_rules():
    p = subprocess.run([promtool(), "check", "rules", "alerts.yaml"], cwd=OBS_DIR, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def test_promtool_unit_tests():
    p = subprocess.run([promtool(), "test", "rules", "alerts-test.yaml"], cwd=OBS_DIR, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr


def test_the_filter_stays_under_1_85_mb():
    # Every Envoy worker compiles the module, and Istio pulls it per pod: its
    # size is a budget (release profile: symbols stripped, the JWT crypto
    # stack built for size; docs/architecture.md). 1.45 MB before the tenant
    # registry client (about 84 KB: its JSON messages and caches); 1.59 MB
    # before limit levels (about 75 KB: keys, users, pools, their config) and
    # the usage ledger rows and quota endpoint (about 47 KB): 1.71 MB;
    # provider failover 1.788 MB; Anthropic iterations, Gemini Interactions,
    # the endpoint kinds and WebSocket admission (about 24 KB): 1.812 MB,
    # past the 1.8 MB budget kept until then.
    size = os.path.getsize(os.path.join(ROOT, "build", "tollgate.wasm"))
    assert size <= 1_850_000, f"build/tollgate.wasm is {size} bytes"


# --- plain Kubernetes and Envoy Gateway manifests ----------------------------------------------------
#
# Core kinds are validated with kubernetes-validate against the Kubernetes
# OpenAPI schemas (strict: unknown fields are errors) of the oldest version
# the manifests need (1.33: image volumes, beta there) and the newest the
# validator ships. It has no schemas for CRDs (Gateway API, Envoy Gateway):
# those are checked structurally below, and the core objects they embed
# (env, volumes, mounts of an EnvoyProxy) are validated as a Pod.

K8S_DIR = os.path.join(ENVOY_DIR, "kubernetes")
EG_DIR = os.path.join(ENVOY_DIR, "envoy-gateway")
K8S_VERSIONS = ("1.33.0", "1.37.0")
CRD_KINDS = {
    "gateway.networking.k8s.io/v1": {"GatewayClass", "Gateway", "HTTPRoute"},
    "gateway.envoyproxy.io/v1alpha1": {"EnvoyProxy", "EnvoyPatchPolicy"},
    "networking.istio.io/v1alpha3": {"EnvoyFilter"},
    "extensions.istio.io/v1alpha1": {"WasmPlugin"},
}
EG_RESOURCE_TYPES = {"type.googleapis.com/envoy.config.listener.v3.Listener",
                     "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
                     "type.googleapis.com/envoy.config.cluster.v3.Cluster",
                     "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"}
IMAGE_USER = 65532
SERVICE_OCI_DIR = os.path.join(ROOT, "build", "service-oci")
MUSL_TARGET = "x86_64-unknown-linux-musl"


def kv():
    return pytest.importorskip("kubernetes_validate",
                               reason="pip install -r integration-tests/requirements.txt (kubernetes-validate)")


def k8s_manifest_files():
    return sorted(glob.glob(os.path.join(K8S_DIR, "*.yaml")) + glob.glob(os.path.join(EG_DIR, "*.yaml")))


def schema_checked_files():
    """Every manifest with core kinds: plain Kubernetes, Envoy Gateway and
    Istio (whose EnvoyFilter and WasmPlugin are CRDs, checked above)."""
    return k8s_manifest_files() + sorted(glob.glob(os.path.join(ISTIO_DIR, "*.yaml")))


def objects_in(directory):
    out = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.yaml"))):
        for d in load_yaml_docs(path):
            out[(d["kind"], d["metadata"]["name"])] = d
    return out


def test_kubernetes_manifests_are_there():
    names = {os.path.relpath(p, ENVOY_DIR) for p in k8s_manifest_files()}
    assert {"kubernetes/ratelimit.yaml", "kubernetes/redis.yaml", "kubernetes/gateway.yaml",
            "envoy-gateway/gateway.yaml", "envoy-gateway/patch-policy.yaml"} <= names, names


@pytest.mark.parametrize("path", schema_checked_files(), ids=lambda p: os.path.relpath(p, ENVOY_DIR))
def test_manifest_validates_against_kubernetes_schemas(path):
    k = kv()
    for doc in load_yaml_docs(path):
        if doc["kind"] in CRD_KINDS.get(doc["apiVersion"], ()):
            continue  # no schema: checked structurally (test_envoy_gateway_*)
        for version in K8S_VERSIONS:
            try:
                k.validate(doc, version, strict=True)
            except k.ValidationError as e:
                pytest.fail("%s %s/%s on Kubernetes %s: %s" % (os.path.basename(path), doc["kind"],
                                                              doc["metadata"]["name"], version, e.message))


def test_kubernetes_validate_catches_mistakes():
    # The validator is only worth running if it refuses what a cluster would.
    k = kv()
    dep = objects_in(K8S_DIR)[("Deployment", "tollgate-ratelimit")]
    k.validate(dep, K8S_VERSIONS[0], strict=True)
    typo = json.loads(json.dumps(dep))
    typo["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {"port": 8081}
    wrong_type = json.loads(json.dumps(dep))
    wrong_type["spec"]["replicas"] = "two"
    for bad in (typo, wrong_type):
        with pytest.raises(k.ValidationError):
            k.validate(bad, K8S_VERSIONS[0], strict=True)


def container(deployment):
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def test_kubernetes_ratelimit_service():
    objs = objects_in(K8S_DIR)
    dep = objs[("Deployment", "tollgate-ratelimit")]
    c = container(dep)
    args = dict(a.split("=", 1) for a in c["args"] if "=" in a)
    assert args["--grpc-addr"].endswith(":8081") and args["--metrics-addr"].endswith(":9090")
    assert args["--registry-addr"].endswith(":8083") and args["--admin-addr"].endswith(":8082")
    assert "--redis-url" in args or "--redis-cluster-nodes" in args
    # Admin tokens and key-encryption keys come from a Secret, never inline.
    env = {e["name"]: e for e in c["env"]}
    for name in ("TOLLGATE_ADMIN_TOKENS", "TOLLGATE_KEK"):
        assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"], name
    assert c["readinessProbe"]["grpc"] == {"port": 8081, "service": "envoy.service.ratelimit.v3.RateLimitService"}
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    pod_sc = dep["spec"]["template"]["spec"]["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] == IMAGE_USER
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    # The filter-facing Service has no admin port; the admin port has its own.
    ports = {p["name"]: p["port"] for p in objs[("Service", "tollgate-ratelimit")]["spec"]["ports"]}
    assert sorted(ports.values()) == [8081, 8083, 9090]
    admin = objs[("Service", "tollgate-ratelimit-admin")]["spec"]["ports"]
    assert [p["port"] for p in admin] == [8082]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        obj = objs[(kind, "tollgate-ratelimit")]
        sel = obj["spec"].get("selector", obj["spec"].get("podSelector"))
        assert sel["matchLabels"].items() <= labels.items(), kind
    for svc in ("tollgate-ratelimit", "tollgate-ratelimit-admin"):
        assert objs[("Service", svc)]["spec"]["selector"].items() <= labels.items()
    hpa = objs[("HorizontalPodAutoscaler", "tollgate-ratelimit")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "tollgate-ratelimit"}
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert hpa["spec"]["minReplicas"] >= objs[("PodDisruptionBudget", "tollgate-ratelimit")]["spec"]["minAvailable"] + 1
    redis = objs[("StatefulSet", "tollgate-redis")]
    assert args["--redis-url"] == "redis://tollgate-redis.%s.svc.cluster.local:6379" % redis["metadata"]["namespace"]


def plugin_of(wasm_config):
    return json.loads(wasm_config["configuration"]["value"])


def check_tollgate_clusters(plugin, clusters, ratelimit_objs):
    """The clusters the plugin names exist, speak the right protocol and
    reach the rate-limit Service's ports."""
    svc = ratelimit_objs[("Service", "tollgate-ratelimit")]
    host = "tollgate-ratelimit.%s.svc.cluster.local" % svc["metadata"]["namespace"]
    ports = {p["port"] for p in svc["spec"]["ports"]}
    rls = clusters[plugin["rate_limit"]["cluster"]]
    assert "http2_protocol_options" in rls["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
    registry = clusters[plugin["registry"]["cluster"]]
    assert "typed_extension_protocol_options" not in registry, "the registry port speaks HTTP/1.1"
    for cluster, port in ((rls, 8081), (registry, 8083)):
        sa = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        assert (sa["address"], sa["port_value"]) == (host, port) and port in ports


def standalone_gateway():
    objs = objects_in(K8S_DIR)
    envoy = yaml.safe_load(objs[("ConfigMap", "tollgate-envoy")]["data"]["envoy.yaml"])
    return objs, envoy


def test_kubernetes_standalone_gateway():
    objs, envoy = standalone_gateway()
    listener = envoy["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    wasm = hcm["http_filters"][0]["typed_config"]["config"]
    assert hcm["http_filters"][-1]["name"] == "envoy.filters.http.router"
    assert wasm["allow_on_headers_stop_iteration"] is True and wasm["failure_policy"] == "FAIL_CLOSED"
    assert set(hcm["route_config"]["request_headers_to_remove"]) >= set(harness.TRUSTED_HEADERS)
    plugin = plugin_of(wasm)
    assert plugin["registry"]["cluster"] == "tollgate_registry"
    assert listener["per_connection_buffer_limit_bytes"] > max(t["max_request_bytes"] for t in plugin["tiers"].values())
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    check_tollgate_clusters(plugin, clusters, objs)
    assert envoy["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    # Provider keys: host_env_keys == the Secret-backed env of the container
    # == what the tenants refer to.
    dep = objs[("Deployment", "tollgate-envoy")]
    c = container(dep)
    host_keys = set(wasm["vm_config"]["environment_variables"]["host_env_keys"])
    assert host_keys == {v for t in plugin["tenants"] for v in t.get("provider_key_env", {}).values()}
    assert host_keys == {e["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    # The module file is in the image volume, pinned by digest; the config in the ConfigMap.
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    wasm_file = wasm["vm_config"]["code"]["local"]["filename"]
    image = volumes[mounts[os.path.dirname(wasm_file)]]["image"]
    assert os.path.basename(wasm_file) == "plugin.wasm"  # the file of the wasm-build.sh --oci layer
    assert re.fullmatch(r"[^@]+@sha256:[0-9a-f]{64}", image["reference"]), image
    assert volumes[mounts["/etc/envoy"]]["configMap"]["name"] == "tollgate-envoy"
    assert c["args"][:2] == ["-c", "/etc/envoy/envoy.yaml"]
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    probes = {p["name"]: p["containerPort"] for p in c["ports"]}
    probe_listener = next(li for li in envoy["static_resources"]["listeners"] if li["name"] == "envoy_probes")
    assert probe_listener["address"]["socket_address"]["port_value"] == probes["probes"]
    svc = objs[("Service", "tollgate-envoy")]
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
    assert probes["http"] == listener["address"]["socket_address"]["port_value"]


def test_kubernetes_standalone_gateway_envoy_config_validates(oci, tmp_path):
    # The ConfigMap's Envoy configuration, with the module path pointed at
    # the fresh build: envoy --mode validate loads the filter and its config.
    _, envoy = standalone_gateway()
    text = yaml.safe_dump(envoy).replace("/etc/tollgate/plugin.wasm", os.path.join(ROOT, "build", "tollgate.wasm"))
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    env = {k: "sk-test" for k in ("ACME_OPENAI_KEY", "ACME_ANTHROPIC_KEY", "GLOBEX_OPENAI_KEY")}
    ok, out = harness.validate_envoy_config(str(path), env=env)
    assert ok, out[-3000:]


def test_envoy_gateway_resources_fit_together():
    objs = objects_in(EG_DIR)
    for (kind, name), d in objs.items():
        known = CRD_KINDS.get(d["apiVersion"], set()) | {"Namespace"}
        assert kind in known, (d["apiVersion"], kind)
    gc = objs[("GatewayClass", "tollgate")]
    assert gc["spec"]["controllerName"] == "gateway.envoyproxy.io/gatewayclass-controller"
    gw = objs[("Gateway", "tollgate")]
    assert gw["spec"]["gatewayClassName"] == gc["metadata"]["name"]
    ref = gw["spec"]["infrastructure"]["parametersRef"]
    proxy = objs[(ref["kind"], ref["name"])]
    assert ref["group"] == "gateway.envoyproxy.io" and proxy["metadata"]["namespace"] == gw["metadata"]["namespace"]
    listeners = {li["name"]: li for li in gw["spec"]["listeners"]}
    route = objs[("HTTPRoute", "llm")]
    for parent in route["spec"]["parentRefs"]:
        assert parent["name"] == gw["metadata"]["name"] and parent["sectionName"] in listeners


def envoy_patch_policy():
    objs = objects_in(EG_DIR)
    return objs, objs[("EnvoyPatchPolicy", "tollgate")]


def test_envoy_gateway_patch_policy():
    objs, epp = envoy_patch_policy()
    gw = objs[("Gateway", "tollgate")]
    spec = epp["spec"]
    assert spec["type"] == "JSONPatch"
    assert spec["targetRef"] == {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "tollgate"}
    assert epp["metadata"]["namespace"] == gw["metadata"]["namespace"], "the policy must sit with its Gateway"
    listener_names = {"%s/%s/%s" % (gw["metadata"]["namespace"], gw["metadata"]["name"], li["name"])
                      for li in gw["spec"]["listeners"]}
    clusters, filters, buffer_limit, removed = {}, [], None, set()
    for p in spec["jsonPatches"]:
        assert p["type"] in EG_RESOURCE_TYPES and p["operation"]["op"] in {"add", "remove", "replace", "move",
                                                                            "copy", "test"}
        path = p["operation"]["path"]
        assert path == "" or path.startswith("/"), path  # a JSON pointer (RFC 6901)
        if p["type"].endswith("Cluster"):
            # `add` with an empty path adds a whole resource (Envoy Gateway
            # internal/xds/translator/jsonpatch.go).
            assert p["operation"]["op"] == "add" and path == ""
            assert p["operation"]["value"]["name"] == p["name"]
            clusters[p["name"]] = p["operation"]["value"]
        elif p["type"].endswith("Listener"):
            assert p["name"] in listener_names, p["name"]
            value = p["operation"]["value"]
            if isinstance(value, dict) and value.get("typed_config", {}).get("@type") == WASM_TYPE:
                assert re.fullmatch(r"/default_filter_chain/filters/0/typed_config/http_filters/\d+", path), path
                filters.append(value["typed_config"]["config"])
            elif path == "/per_connection_buffer_limit_bytes":
                buffer_limit = value
        elif p["type"].endswith("RouteConfiguration"):
            assert p["name"] in listener_names, p["name"]
            if path == "/request_headers_to_remove":
                removed = set(p["operation"]["value"])
    (wasm,) = filters
    assert wasm["allow_on_headers_stop_iteration"] is True and wasm["failure_policy"] == "FAIL_CLOSED"
    plugin = plugin_of(wasm)
    assert removed >= set(harness.TRUSTED_HEADERS), "tenant ids must not reach a provider"
    assert buffer_limit is not None and buffer_limit > max(t["max_request_bytes"] for t in plugin["tiers"].values())
    check_tollgate_clusters(plugin, clusters, objects_in(K8S_DIR))
    # Provider keys and the module file come from the EnvoyProxy.
    proxy = objs[("EnvoyProxy", "tollgate")]["spec"]["provider"]["kubernetes"]["envoyDeployment"]
    host_keys = set(wasm["vm_config"]["environment_variables"]["host_env_keys"])
    assert host_keys == {v for t in plugin["tenants"] for v in t.get("provider_key_env", {}).values()}
    assert host_keys == {e["name"] for e in proxy["container"]["env"] if "secretKeyRef" in e["valueFrom"]}
    mounts = {m["mountPath"]: m["name"] for m in proxy["container"]["volumeMounts"]}
    volumes = {v["name"]: v for v in proxy["pod"]["volumes"]}
    image = volumes[mounts[os.path.dirname(wasm["vm_config"]["code"]["local"]["filename"])]]["image"]
    assert re.fullmatch(r"[^@]+@sha256:[0-9a-f]{64}", image["reference"]), image


def test_envoy_proxy_pod_parts_validate_as_a_pod():
    # EnvoyProxy embeds core types (EnvVar, VolumeMount, Volume,
    # ResourceRequirements): validate them where Kubernetes defines them.
    k = kv()
    objs, _ = envoy_patch_policy()
    proxy = objs[("EnvoyProxy", "tollgate")]["spec"]["provider"]["kubernetes"]["envoyDeployment"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "envoy"},
           "spec": {"containers": [dict(proxy["container"], name="envoy", image="envoyproxy/envoy:distroless-v1.40.0")],
                    "volumes": proxy["pod"]["volumes"]}}
    for version in K8S_VERSIONS:
        k.validate(pod, version, strict=True)


def test_config_checker_covers_the_kubernetes_manifests(checker, tmp_path):
    names = {os.path.relpath(p, ENVOY_DIR) for p in repo_tollgate_configs()}
    assert {"kubernetes/gateway.yaml", "envoy-gateway/patch-policy.yaml"} <= names, names
    # And it reads the filter inside them: a broken flag or buffer limit is refused.
    cases = [
        ("kubernetes/gateway.yaml", "allow_on_headers_stop_iteration: true", "allow_on_headers_stop_iteration: false",
         "allow_on_headers_stop_iteration]: must be true"),
        ("kubernetes/gateway.yaml", "per_connection_buffer_limit_bytes: 9437184\n        filter_chains",
         "per_connection_buffer_limit_bytes: 1024\n        filter_chains", "below the largest tier max_request_bytes"),
        ("envoy-gateway/patch-policy.yaml", "allow_on_headers_stop_iteration: true",
         "allow_on_headers_stop_iteration: false", "allow_on_headers_stop_iteration]: must be true"),
        ("envoy-gateway/patch-policy.yaml", '"tier": "pro"', '"tier": "gold"', "gold"),
    ]
    for i, (name, old, new, needle) in enumerate(cases):
        with open(os.path.join(ENVOY_DIR, name)) as f:
            text = f.read()
        assert old in text, (name, old)
        broken = tmp_path / ("%d-%s" % (i, os.path.basename(name)))
        broken.write_text(text.replace(old, new))
        p = subprocess.run([checker, str(broken)], capture_output=True, text=True, timeout=60)
        assert p.returncode == 1 and needle in p.stdout, (name, p.stdout)


# --- the rate-limit service's container image (service-image.sh) --------------------------------------

def musl_binary():
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    return os.path.join(target, MUSL_TARGET, "release", "tollgate-ratelimit")


@pytest.fixture(scope="module")
def service_image():
    # The static binary needs Rust's musl target; a machine that cannot
    # fetch it (no toolchain downloads) skips these tests, loudly.
    installed = subprocess.run(["rustup", "target", "list", "--installed"], capture_output=True, text=True)
    if MUSL_TARGET not in installed.stdout.split():
        added = subprocess.run(["rustup", "target", "add", MUSL_TARGET], capture_output=True, text=True, timeout=600)
        if added.returncode != 0:
            pytest.skip("the %s target cannot be installed here: %s" % (MUSL_TARGET, added.stderr[-300:]))
    # --quick: no LTO, parallel codegen; the test command's time budget.
    p = subprocess.run([os.path.join(ROOT, "service-image.sh"), "--quick"], cwd=ROOT, capture_output=True,
                       text=True, timeout=2400)
    assert p.returncode == 0, p.stderr[-3000:]
    return SERVICE_OCI_DIR


def service_image_parts(oci_dir):
    with open(os.path.join(oci_dir, "index.json")) as f:
        index = json.load(f)
    (mdesc,) = index["manifests"]
    manifest = json.loads(check_descriptor(oci_dir, mdesc, "application/vnd.oci.image.manifest.v1+json"))
    config = json.loads(check_descriptor(oci_dir, manifest["config"], "application/vnd.oci.image.config.v1+json"))
    (ldesc,) = manifest["layers"]
    raw_tar = gzip.decompress(check_descriptor(oci_dir, ldesc, "application/vnd.oci.image.layer.v1.tar+gzip"))
    return index, mdesc, manifest, config, raw_tar


def is_static_elf(data):
    import struct
    assert data[:4] == b"\x7fELF" and data[4] == 2
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != 3 for i in range(phnum))  # PT_INTERP


def test_service_image_layout_config_and_binary(service_image, tmp_path):
    with open(os.path.join(service_image, "oci-layout")) as f:
        assert json.load(f) == {"imageLayoutVersion": "1.0.0"}
    index, mdesc, manifest, config, raw_tar = service_image_parts(service_image)
    assert index["schemaVersion"] == 2 and manifest["schemaVersion"] == 2
    assert mdesc["annotations"]["org.opencontainers.image.ref.name"]
    assert mdesc["platform"] == {"architecture": "amd64", "os": "linux"}
    assert (config["architecture"], config["os"]) == ("amd64", "linux")
    assert config["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw_tar).hexdigest()]}
    cfg = config["config"]
    assert cfg["Entrypoint"] == ["/usr/local/bin/tollgate-ratelimit"]
    assert cfg["User"] == "%d:%d" % (IMAGE_USER, IMAGE_USER)
    assert set(cfg["ExposedPorts"]) == {"8081/tcp", "8082/tcp", "8083/tcp", "9090/tcp"}
    with tarfile.open(fileobj=io.BytesIO(raw_tar)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"etc", "etc/group", "etc/passwd", "usr", "usr/local", "usr/local/bin",
                                "usr/local/bin/tollgate-ratelimit"}
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members.values())
        entry = members["usr/local/bin/tollgate-ratelimit"]
        assert entry.mode == 0o755
        binary = tar.extractfile(entry).read()
        passwd = tar.extractfile(members["etc/passwd"]).read().decode()
    assert ":%d:%d:" % (IMAGE_USER, IMAGE_USER) in passwd
    with open(musl_binary(), "rb") as f:
        assert binary == f.read(), "the layer holds the binary just built"
    assert is_static_elf(binary), "the image has no libc: the binary must be static"
    with open(os.path.join(service_image, "tollgate-ratelimit.sha256")) as f:
        assert f.read().strip() == mdesc["digest"].split(":", 1)[1]
    # The binary out of the layer runs on its own.
    exe = tmp_path / "tollgate-ratelimit"
    exe.write_bytes(binary)
    exe.chmod(0o755)
    p = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=30, env={})
    assert p.returncode == 0, p.stderr
    for flag in ("--grpc-addr", "--metrics-addr", "--redis-url"):
        assert flag in p.stdout, flag


def test_service_image_is_reproducible(service_image, tmp_path):
    with open(os.path.join(service_image, "tollgate-ratelimit.sha256")) as f:
        first = f.read()
    subprocess.run([os.path.join(ROOT, "service-image.sh"), "--no-build"], cwd=ROOT, check=True, timeout=300,
                   capture_output=True)
    with open(os.path.join(service_image, "tollgate-ratelimit.sha256")) as f:
        assert f.read() == first


def test_service_image_matches_the_manifests(service_image):
    _, _, _, config, _ = service_image_parts(service_image)
    ports = {int(p.split("/")[0]) for p in config["config"]["ExposedPorts"]}
    dep = objects_in(K8S_DIR)[("Deployment", "tollgate-ratelimit")]
    assert {p["containerPort"] for p in container(dep)["ports"]} == ports
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == IMAGE_USER


def test_service_image_binary_knows_the_manifests_flags(service_image, tmp_path):
    # Every flag the Deployments pass, and the Secret-fed variables, are ones
    # the binary in the image documents: a renamed flag breaks this, not a rollout.
    _, _, _, _, raw_tar = service_image_parts(service_image)
    with tarfile.open(fileobj=io.BytesIO(raw_tar)) as tar:
        binary = tar.extractfile("usr/local/bin/tollgate-ratelimit").read()
    exe = tmp_path / "tollgate-ratelimit"
    exe.write_bytes(binary)
    exe.chmod(0o755)
    p = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=30, env={})
    assert p.returncode == 0, p.stderr
    for directory in (K8S_DIR, ISTIO_DIR):
        c = container(objects_in(directory)[("Deployment", "tollgate-ratelimit")])
        for arg in c["args"]:
            flag = arg.split("=", 1)[0]
            assert re.search(r"(^|\s)%s[\s=<]" % re.escape(flag), p.stdout), (directory, flag)
        for e in c.get("env", []):
            if "secretKeyRef" in e.get("valueFrom", {}):
                assert e["name"] in p.stdout, (directory, e["name"])
