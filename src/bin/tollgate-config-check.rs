//! Will Envoy accept this configuration?
//!
//! `tollgate-config-check`: checks tollgate configurations the way the filter
//! will, before they reach Envoy or Istio.
//!
//! ```text
//! tollgate-config-check [--require-env] FILE...
//! ```
//!
//! Each FILE is one of:
//! - a plugin configuration (JSON, or YAML with the same fields);
//! - an Envoy configuration (YAML or JSON): every wasm filter
//!   (`envoy.extensions.filters.http.wasm.v3.Wasm`, inline or added as an
//!   ECDS extension) is checked, with the Envoy settings tollgate depends on;
//! - Kubernetes manifests (multi-document YAML): every Istio `WasmPlugin`
//!   (`spec.pluginConfig`), every wasm filter inside an `EnvoyFilter` or an
//!   Envoy Gateway `EnvoyPatchPolicy`, and Envoy configurations held in a
//!   `ConfigMap` entry.
//!
//! The plugin configuration is compiled by `tollgate::config::load`, the code
//! the filter runs in `on_configure`, so a file that passes here is one the
//! filter accepts. Output: `FILE: OK (N tenants, M routes)` or one line per
//! problem, `FILE[<location>]: <error>`. Exit status: 0 when every file is
//! fine, 1 when any configuration is refused, 2 on usage or read errors.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::process::ExitCode;

use serde::Deserialize;
use serde_json::Value;

const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const STRING_VALUE: &str = "type.googleapis.com/google.protobuf.StringValue";
const STRUCT: &str = "type.googleapis.com/google.protobuf.Struct";
const BYTES_VALUE: &str = "type.googleapis.com/google.protobuf.BytesValue";
/// Envoy's default `per_connection_buffer_limit_bytes`.
const ENVOY_DEFAULT_BUFFER_LIMIT: u64 = 1024 * 1024;

const USAGE: &str = "usage: tollgate-config-check [--require-env] FILE...

Checks tollgate plugin configurations (JSON), Envoy configurations (YAML or
JSON) and Kubernetes manifests (Istio WasmPlugin and EnvoyFilter, Envoy
Gateway EnvoyPatchPolicy, ConfigMaps holding an Envoy configuration) with the
filter's own configuration code.

  --require-env  resolve provider_key_env variables from this process's
                 environment (default: assume every variable is set)";

/// One problem found, with where it is.
struct Finding {
    location: String,
    message: String,
    warning: bool,
}

/// What a file held.
#[derive(Default)]
struct Report {
    configs: usize,
    tenants: usize,
    routes: usize,
    findings: Vec<Finding>,
    /// Failover targets of the plugins found under the HTTP connection
    /// manager being walked: each needs a route of its own.
    targets_in_hcm: BTreeSet<String>,
}

impl Report {
    fn error(&mut self, location: &str, message: impl Into<String>) {
        self.findings.push(Finding { location: location.to_string(), message: message.into(), warning: false });
    }

    /// Compiles a plugin configuration given as a JSON value, counting it or
    /// reporting its error at `location`.
    fn compile_value(&mut self, location: &str, value: &Value, env: EnvMode) -> Option<Compiled> {
        let compiled = serde_json::to_vec(value).map_err(|e| e.to_string()).and_then(|raw| compile_plugin(&raw, env));
        match compiled {
            Ok(c) => {
                self.configs += 1;
                self.tenants += c.tenants;
                self.routes += c.routes;
                Some(c)
            }
            Err(e) => {
                self.error(location, e);
                None
            }
        }
    }

    fn warn(&mut self, location: &str, message: impl Into<String>) {
        self.findings.push(Finding { location: location.to_string(), message: message.into(), warning: true });
    }

    fn has_errors(&self) -> bool {
        self.findings.iter().any(|f| !f.warning)
    }
}

/// How environment variables named by `provider_key_env` are resolved.
#[derive(Clone, Copy)]
enum EnvMode {
    /// Every variable is assumed set (the secret lives only where Envoy runs).
    Assume,
    /// The checker's own environment must hold them.
    Require,
}

/// What the compiled plugin says about the Envoy settings around it.
struct Compiled {
    tenants: usize,
    routes: usize,
    max_request_bytes: u64,
    /// Environment variables the configuration asked for.
    env_names: BTreeSet<String>,
    /// Failover targets that are not the provider their routes name: Envoy
    /// must route each by `x-tollgate-provider`.
    routed_targets: BTreeSet<String>,
}

fn compile_plugin(raw: &[u8], env: EnvMode) -> Result<Compiled, String> {
    let asked: RefCell<BTreeSet<String>> = RefCell::new(BTreeSet::new());
    let lookup = |name: &str| -> Option<String> {
        asked.borrow_mut().insert(name.to_string());
        match env {
            EnvMode::Assume => Some("checked".into()),
            EnvMode::Require => std::env::var(name).ok(),
        }
    };
    let plugin = tollgate::config::load(raw, &lookup).map_err(|e| e.to_string())?;
    let max_request_bytes = plugin
        .tenants
        .iter()
        .map(|t| t.policy.max_request_bytes)
        .max()
        .unwrap_or(tollgate::config::DEFAULT_MAX_REQUEST_BYTES);
    let mut routed_targets = BTreeSet::new();
    let name = |i: usize| plugin.providers.get(i).map(|p| p.name.clone());
    for (g, group) in plugin.providers.iter().enumerate() {
        routed_targets.extend(group.targets.iter().filter(|t| t.provider != g).filter_map(|t| name(t.provider)));
    }
    for t in &plugin.tenants {
        for (g, targets) in &t.policy.targets {
            routed_targets.extend(targets.iter().filter(|t| t.provider != *g).filter_map(|t| name(t.provider)));
        }
    }
    Ok(Compiled {
        tenants: plugin.tenants.len(),
        routes: plugin.routes.len(),
        max_request_bytes,
        env_names: asked.into_inner(),
        routed_targets,
    })
}

fn join(base: &str, key: &str) -> String {
    if base.is_empty() {
        key.to_string()
    } else {
        format!("{base}.{key}")
    }
}

/// Reads a u64 that protobuf JSON may spell as a number or a string.
fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// The raw plugin configuration bytes of an Envoy wasm `configuration` Any.
fn configuration_bytes(configuration: &Value) -> Result<Vec<u8>, String> {
    let type_url = configuration.get("@type").and_then(Value::as_str).unwrap_or("");
    let value = configuration.get("value");
    match (type_url, value) {
        (STRING_VALUE, Some(Value::String(text))) => Ok(text.clone().into_bytes()),
        (STRUCT, Some(v @ Value::Object(_))) => serde_json::to_vec(v).map_err(|e| e.to_string()),
        (BYTES_VALUE, Some(Value::String(b64))) => {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| format!("BytesValue is not base64: {e}"))
        }
        (STRING_VALUE | STRUCT | BYTES_VALUE, _) => Err(format!("{type_url} without a usable `value`")),
        _ => Err(format!(
            "unsupported configuration type {type_url:?}; give the plugin configuration as a \
             google.protobuf.StringValue holding JSON"
        )),
    }
}

/// Whether a wasm filter config is another plugin, not tollgate.
fn is_other_plugin(config: &Value) -> bool {
    let mentions = |v: Option<&Value>| v.and_then(Value::as_str).is_some_and(|s| s.contains("tollgate"));
    let root_id = config.get("root_id");
    let code = config.pointer("/vm_config/code").map(Value::to_string);
    let named = mentions(root_id)
        || mentions(config.get("name"))
        || mentions(config.pointer("/vm_config/vm_id"))
        || code.is_some_and(|c| c.contains("tollgate"));
    !named && root_id.is_some()
}

/// Checks one wasm filter (`typed_config` of type Wasm). Returns the largest
/// `max_request_bytes`, for the listener buffer check.
fn check_wasm_filter(typed_config: &Value, location: &str, env: EnvMode, report: &mut Report) -> Option<u64> {
    let Some(config) = typed_config.get("config") else {
        report.error(location, "wasm filter without `config`");
        return None;
    };
    if is_other_plugin(config) {
        return None;
    }
    let Some(configuration) = config.get("configuration") else {
        report.error(&join(location, "config.configuration"), "missing: tollgate needs its plugin configuration");
        return None;
    };
    let raw = match configuration_bytes(configuration) {
        Ok(raw) => raw,
        Err(e) => {
            report.error(&join(location, "config.configuration"), e);
            return None;
        }
    };
    let compiled = match compile_plugin(&raw, env) {
        Ok(c) => c,
        Err(e) => {
            report.error(&join(location, "config.configuration"), e);
            return None;
        }
    };
    report.configs += 1;
    report.tenants += compiled.tenants;
    report.routes += compiled.routes;
    report.targets_in_hcm.extend(compiled.routed_targets.iter().cloned());

    if config.get("allow_on_headers_stop_iteration") != Some(&Value::Bool(true)) {
        report.error(
            &join(location, "config.allow_on_headers_stop_iteration"),
            "must be true: tollgate pauses at the request headers to read the body; without \
             it Envoy stops all iteration and requests hang",
        );
    }
    if config.get("failure_policy").and_then(Value::as_str) == Some("FAIL_OPEN") {
        report.warn(
            &join(location, "config.failure_policy"),
            "FAIL_OPEN lets requests through without tenant isolation when the VM fails",
        );
    }
    // Every provider key variable must be passed into the VM, or the filter
    // refuses its configuration when Envoy loads it.
    let env_vars = config.pointer("/vm_config/environment_variables");
    let mut passed: BTreeSet<String> = BTreeSet::new();
    if let Some(keys) = env_vars.and_then(|e| e.get("host_env_keys")).and_then(Value::as_array) {
        passed.extend(keys.iter().filter_map(Value::as_str).map(String::from));
    }
    if let Some(kv) = env_vars.and_then(|e| e.get("key_values")).and_then(Value::as_object) {
        passed.extend(kv.keys().cloned());
    }
    for name in compiled.env_names.difference(&passed) {
        report.error(
            &join(location, "config.vm_config.environment_variables.host_env_keys"),
            format!("does not list {name}, which provider_key_env refers to"),
        );
    }
    Some(compiled.max_request_bytes)
}

/// Finds every wasm filter under `value` and checks it. Returns the largest
/// `max_request_bytes` seen.
fn walk(value: &Value, location: &str, env: EnvMode, report: &mut Report) -> Option<u64> {
    let mut largest: Option<u64> = None;
    match value {
        Value::Object(map) => {
            let is_wasm = map.get("@type").and_then(Value::as_str) == Some(WASM_TYPE);
            if is_wasm {
                return check_wasm_filter(value, location, env, report);
            }
            let is_hcm = map.contains_key("http_filters");
            let outer = if is_hcm { std::mem::take(&mut report.targets_in_hcm) } else { BTreeSet::new() };
            for (key, child) in map {
                let found = walk(child, &join(location, key), env, report);
                largest = largest.max(found);
            }
            if is_hcm {
                let targets = std::mem::replace(&mut report.targets_in_hcm, outer);
                check_target_routes(map, &targets, location, report);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                let found = walk(child, &format!("{location}[{i}]"), env, report);
                largest = largest.max(found);
            }
        }
        _ => {}
    }
    largest
}

/// Failover targets need routes of their own: tollgate names the target in
/// `x-tollgate-provider`, and a request Envoy routes elsewhere would carry
/// that target's credential to another provider. Checks an inline
/// `route_config` of the HTTP connection manager `hcm`.
fn check_target_routes(
    hcm: &serde_json::Map<String, Value>,
    targets: &BTreeSet<String>,
    location: &str,
    report: &mut Report,
) {
    if targets.is_empty() {
        return;
    }
    let Some(rc) = hcm.get("route_config") else {
        report.warn(
            location,
            format!(
                "failover targets {targets:?} need routes matching x-tollgate-provider; the route \
                 configuration is not inline, so it was not checked"
            ),
        );
        return;
    };
    let removed = rc
        .get("request_headers_to_remove")
        .and_then(Value::as_array)
        .is_some_and(|h| h.iter().filter_map(Value::as_str).any(|n| n.eq_ignore_ascii_case("x-tollgate-provider")));
    if !removed {
        report.error(
            &join(location, "route_config.request_headers_to_remove"),
            "must list x-tollgate-provider: tollgate's routing headers never reach a provider",
        );
    }
    let mut routed: BTreeSet<String> = BTreeSet::new();
    let hosts = rc.get("virtual_hosts").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    for route in hosts.iter().filter_map(|h| h.get("routes").and_then(Value::as_array)).flatten() {
        let headers = route.pointer("/match/headers").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        for h in headers {
            if h.get("name").and_then(Value::as_str).is_some_and(|n| n.eq_ignore_ascii_case("x-tollgate-provider")) {
                let exact = h.pointer("/string_match/exact").or_else(|| h.get("exact_match"));
                if let Some(v) = exact.and_then(Value::as_str) {
                    routed.insert(v.to_string());
                }
            }
        }
    }
    for t in targets.difference(&routed) {
        report.error(
            &join(location, "route_config"),
            format!(
                "no route matches x-tollgate-provider: {t}; requests failed over to target '{t}' would \
                 take another route, with '{t}''s credential"
            ),
        );
    }
}

/// An Envoy bootstrap: checks wasm filters listener by listener so the
/// listener's buffer limit can be compared with the tiers' body limit.
fn check_envoy(doc: &Value, location: &str, env: EnvMode, report: &mut Report) {
    let listeners = doc.pointer("/static_resources/listeners").and_then(Value::as_array);
    let mut checked_listeners = false;
    if let Some(listeners) = listeners {
        checked_listeners = true;
        for (i, listener) in listeners.iter().enumerate() {
            let at = join(location, &format!("static_resources.listeners[{i}]"));
            let Some(largest) = walk(listener, &at, env, report) else {
                continue;
            };
            let limit = listener.get("per_connection_buffer_limit_bytes").and_then(as_u64);
            let effective = limit.unwrap_or(ENVOY_DEFAULT_BUFFER_LIMIT);
            if effective < largest {
                let what = match limit {
                    Some(l) => format!("is {l}"),
                    None => format!("is unset (Envoy's default {ENVOY_DEFAULT_BUFFER_LIMIT})"),
                };
                report.error(
                    &join(&at, "per_connection_buffer_limit_bytes"),
                    format!(
                        "{what}, below the largest tier max_request_bytes {largest}: Envoy \
                         answers 413 itself before tollgate can answer in the client's format"
                    ),
                );
            }
        }
    }
    // Wasm filters anywhere else (dynamic resources, ECDS).
    if let Value::Object(map) = doc {
        for (key, child) in map {
            if checked_listeners && key == "static_resources" {
                if let Value::Object(sr) = child {
                    for (k, c) in sr {
                        if k != "listeners" {
                            walk(c, &join(location, &format!("static_resources.{k}")), env, report);
                        }
                    }
                }
                continue;
            }
            walk(child, &join(location, key), env, report);
        }
    }
}

/// A Kubernetes object: WasmPlugin, TrafficExtension, EnvoyFilter,
/// EnvoyPatchPolicy, or a ConfigMap holding an Envoy configuration.
fn check_k8s(doc: &Value, location: &str, env: EnvMode, report: &mut Report) {
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("");
    let name = doc.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("?");
    let at = if location.is_empty() { format!("{kind}/{name}") } else { format!("{location} {kind}/{name}") };
    match kind {
        "WasmPlugin" | "TrafficExtension" => {
            let spec = doc.get("spec");
            let (config_path, plugin_config) = if kind == "WasmPlugin" {
                ("spec.pluginConfig", spec.and_then(|s| s.get("pluginConfig")))
            } else {
                ("spec.wasm.pluginConfig", spec.and_then(|s| s.pointer("/wasm/pluginConfig")))
            };
            if kind == "TrafficExtension" && spec.and_then(|s| s.get("wasm")).is_none() {
                return; // a Lua extension
            }
            let at = format!("{at} {config_path}");
            let Some(plugin_config) = plugin_config else {
                report.error(&at, "missing: tollgate needs its plugin configuration");
                return;
            };
            // Istio turns pluginConfig into JSON text in a StringValue.
            if let Some(c) = report.compile_value(&at, plugin_config, env) {
                let vm_env = if kind == "WasmPlugin" {
                    spec.and_then(|s| s.pointer("/vmConfig/env"))
                } else {
                    spec.and_then(|s| s.pointer("/wasm/vmConfig/env"))
                };
                let passed: BTreeSet<String> = vm_env
                    .and_then(Value::as_array)
                    .map(|items| {
                        items.iter().filter_map(|e| e.get("name").and_then(Value::as_str)).map(String::from).collect()
                    })
                    .unwrap_or_default();
                for name in c.env_names.difference(&passed) {
                    report.error(
                        &format!("{at} vmConfig.env"),
                        format!("does not list {name}, which provider_key_env refers to"),
                    );
                }
                // Istio builds the Envoy filter itself and (checked in
                // pilot/pkg/model/extensions.go) leaves the flag unset.
                report.warn(
                    &at,
                    format!(
                        "Istio's {kind} does not set allow_on_headers_stop_iteration, which \
                         tollgate requires (requests hang without it); deploy with the \
                         EnvoyFilter in envoy/istio/ (see envoy/istio/README.md)"
                    ),
                );
            }
        }
        // Envoy Gateway's EnvoyPatchPolicy carries the filter in a JSON patch
        // value, like an EnvoyFilter in a configPatch.
        "EnvoyFilter" | "EnvoyPatchPolicy" => {
            if let Some(spec) = doc.get("spec") {
                walk(spec, &format!("{at} spec"), env, report);
            }
        }
        // A standalone Envoy's bootstrap, as a ConfigMap entry.
        "ConfigMap" => {
            let Some(data) = doc.get("data").and_then(Value::as_object) else {
                return;
            };
            for (key, text) in data {
                let Some(text) = text.as_str().filter(|t| t.contains(WASM_TYPE)) else {
                    continue;
                };
                let at = format!("{at} data.{key}");
                match serde_yaml::from_str::<Value>(text) {
                    Ok(inner) => check_document(&inner, &at, env, report),
                    Err(e) => report.error(&at, format!("not valid YAML: {e}")),
                }
            }
        }
        _ => {}
    }
}

/// Classifies one parsed document and checks it.
fn check_document(doc: &Value, location: &str, env: EnvMode, report: &mut Report) {
    let Some(map) = doc.as_object() else {
        if !doc.is_null() {
            report.error(location, "not an object");
        }
        return;
    };
    if map.contains_key("apiVersion") && map.contains_key("kind") {
        check_k8s(doc, location, env, report);
    } else if ["static_resources", "dynamic_resources", "admin", "layered_runtime", "node"]
        .iter()
        .any(|k| map.contains_key(*k))
    {
        check_envoy(doc, location, env, report);
    } else if map.get("@type").and_then(Value::as_str) == Some(WASM_TYPE) {
        walk(doc, location, env, report);
    } else {
        // A plugin configuration on its own.
        report.compile_value(location, doc, env);
    }
}

fn check_file(path: &str, env: EnvMode) -> Result<Report, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut report = Report::default();
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        // JSON (plugin configuration or Envoy config). A plain plugin
        // configuration is passed as the exact bytes Envoy would pass.
        let doc: Value = serde_json::from_str(&text).map_err(|e| format!("not valid JSON: {e}"))?;
        let is_plugin = doc.as_object().is_some_and(|m| {
            !m.contains_key("apiVersion")
                && !m.contains_key("static_resources")
                && !m.contains_key("dynamic_resources")
                && !m.contains_key("@type")
        });
        if is_plugin {
            match compile_plugin(text.as_bytes(), env) {
                Ok(c) => {
                    report.configs += 1;
                    report.tenants += c.tenants;
                    report.routes += c.routes;
                }
                Err(e) => report.error("", e),
            }
        } else {
            check_document(&doc, "", env, &mut report);
        }
        return Ok(report);
    }
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .enumerate()
        .map(|(i, d)| Value::deserialize(d).map_err(|e| format!("document {}: not valid YAML: {e}", i + 1)))
        .collect::<Result<_, _>>()?;
    let multi = docs.iter().filter(|d| !d.is_null()).count() > 1;
    for (i, doc) in docs.iter().enumerate() {
        let location = if multi { format!("doc {}", i + 1) } else { String::new() };
        check_document(doc, &location, env, &mut report);
    }
    Ok(report)
}

fn main() -> ExitCode {
    let mut env = EnvMode::Assume;
    let mut files = Vec::new();
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--require-env" => env = EnvMode::Require,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            a if a.starts_with('-') && a != "-" => {
                eprintln!("tollgate-config-check: unknown option {a}\n\n{USAGE}");
                return ExitCode::from(2);
            }
            _ => files.push(arg),
        }
    }
    if files.is_empty() {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    }
    let mut status = 0u8;
    for path in &files {
        let report = match check_file(path, env) {
            Ok(r) => r,
            Err(e) => {
                println!("{path}: {e}");
                status = status.max(2);
                continue;
            }
        };
        for f in &report.findings {
            let prefix = if f.location.is_empty() { path.clone() } else { format!("{path}[{}]", f.location) };
            if f.warning {
                println!("{prefix}: warning: {}", f.message);
            } else {
                println!("{prefix}: {}", f.message);
            }
        }
        if report.has_errors() {
            status = status.max(1);
        } else if report.configs == 0 {
            println!("{path}: OK (no tollgate configuration found)");
        } else if report.configs == 1 {
            println!("{path}: OK ({} tenants, {} routes)", report.tenants, report.routes);
        } else {
            println!(
                "{path}: OK ({} configurations: {} tenants, {} routes)",
                report.configs, report.tenants, report.routes
            );
        }
    }
    ExitCode::from(status)
}
