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
            "TollgateRateLimiterTimingOut", "TollgateSettlesDropped"} <= alerts


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


def test_the_filter_stays_under_1_6_mb():
    # Every Envoy worker compiles the module, and Istio pulls it per pod: its
    # size is a budget (release profile: symbols stripped, the JWT crypto
    # stack built for size; docs/architecture.md). 1.45 MB before the tenant
    # registry client (about 84 KB: its JSON messages and caches).
    size = os.path.getsize(os.path.join(ROOT, "build", "tollgate.wasm"))
    assert size <= 1_600_000, f"build/tollgate.wasm is {size} bytes"
