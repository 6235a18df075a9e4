//! What does a parsed configuration compile to, and why is one refused?
//!
//! [`load`] decodes the raw bytes, [`compile()`] checks meaning (references
//! between sections, digests, limits, environment variables) and builds the
//! immutable [`Plugin`] with its lookup tables. Every error names the field.

use std::rc::Rc;

use hashbrown::HashMap;
use thiserror::Error;

use super::levels::{compile_key_spec, compile_pools, KeyInfo, Pool};
use super::spec::{
    CircuitBreakerSpec, IdentitySpec, MeteringSpec, PluginConfig, RateLimitedScopeSpec, RegistrySpec, RlsMode,
    TargetSelection, TenantLabelSpec, TierSpec, UnmatchedRoutes, AUTO_TENANT_LABEL_MAX, FILTER_STATE_FIELDS,
};
use super::tiers::{compile_tier, merge_tier, Policy};
use crate::llm::Api;
use crate::ratelimit::descriptors::Measure;
use crate::upstream::circuit::{self, CircuitConfig, RateLimitedScope};

/// Why a configuration was refused. The `path` names the field.
#[derive(Debug, Error, PartialEq)]
pub enum ConfigError {
    #[error("plugin configuration is not valid JSON for tollgate: {0}")]
    Shape(String),
    #[error("plugin configuration arrived as {0}")]
    Encoding(String),
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

pub(super) fn invalid(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { path: path.into(), message: message.into() }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(':')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// A provider, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    pub name: String,
    pub credential_header: String,
    pub credential_prefix: String,
    /// Whether OpenAI chat streams through this provider get
    /// `stream_options.include_usage` added when the client left it out.
    pub inject_stream_usage: bool,
    /// Failover targets (indexes into [`Plugin::providers`]); empty: this
    /// provider serves its routes itself, with no circuit breaker.
    pub targets: Vec<Target>,
    /// `selection: weighted`.
    pub weighted: bool,
    /// Requested model -> the name this provider expects (deployments).
    pub model_map: Vec<(String, String)>,
    /// Whom a 429 from this provider pauses.
    pub rate_limited_scope: RateLimitedScope,
    /// The shared-data key of this provider's circuit record (as a target).
    pub circuit_key: String,
}

/// One failover target, compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Index into [`Plugin::providers`].
    pub provider: usize,
    pub weight: u32,
}

impl Provider {
    /// The name `model` goes by at this provider (a deployment name), if it
    /// differs.
    pub fn mapped_model(&self, model: &str) -> Option<&str> {
        self.model_map.iter().find(|(from, _)| from == model).map(|(_, to)| to.as_str())
    }
}

/// How a route matches a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
}

/// A route, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub path: PathMatch,
    pub api: Api,
    /// Index into [`Plugin::providers`].
    pub provider: usize,
    /// `identity.end_user_header` is believed on this route.
    pub trust_end_user_header: bool,
}

/// A tenant, compiled: its effective policy and resolved provider keys.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: String,
    /// The tier's name, shared by its tenants.
    pub tier: Rc<str>,
    pub enabled: bool,
    /// The tier's policy, shared by every tenant of the tier without
    /// overrides (a tenant with overrides has its own).
    pub policy: Rc<Policy>,
    /// Provider key per provider index; `None` where the tenant has none.
    pub provider_keys: Vec<Option<String>>,
}

/// Which tenant a request is for: one of the configuration's, by index, or
/// one the tenant registry resolved at runtime. Per-worker state (leases,
/// in-flight counts, budget shares, the fail-open allowance) is kept under
/// [`TenantRef::slot`].
#[derive(Debug, Clone)]
pub enum TenantRef {
    Static(usize),
    /// `slot` is at least [`REGISTRY_SLOT_BASE`] and stays the tenant's for
    /// the worker's life, across refreshes of its record.
    Registry {
        slot: usize,
        tenant: Rc<Tenant>,
    },
}

/// Slots of registry tenants start here (static tenants are their index).
pub const REGISTRY_SLOT_BASE: usize = 1 << 30;

impl TenantRef {
    pub fn get<'a>(&'a self, plugin: &'a Plugin) -> Option<&'a Tenant> {
        match self {
            TenantRef::Static(i) => plugin.tenants.get(*i),
            TenantRef::Registry { tenant, .. } => Some(tenant),
        }
    }

    pub fn slot(&self) -> usize {
        match self {
            TenantRef::Static(i) => *i,
            TenantRef::Registry { slot, .. } => *slot,
        }
    }

    /// The same tenant under the same record (settles may be netted).
    pub fn same(&self, other: &TenantRef) -> bool {
        match (self, other) {
            (TenantRef::Static(a), TenantRef::Static(b)) => a == b,
            (TenantRef::Registry { tenant: a, .. }, TenantRef::Registry { tenant: b, .. }) => Rc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// The per-worker JWT verifier (it caches verified tokens and keys).
pub struct JwtSlot(pub std::cell::RefCell<crate::identity::jwt::JwtVerifier>);

impl std::fmt::Debug for JwtSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtVerifier")
    }
}

/// The compiled configuration, built once in `on_configure`.
#[derive(Debug)]
pub struct Plugin {
    pub client_key_headers: Vec<String>,
    pub client_key_query_param: Option<String>,
    pub strip_request_headers: Vec<String>,
    pub request_id_header: String,
    pub unmatched_routes: UnmatchedRoutes,
    pub providers: Vec<Provider>,
    pub routes: Vec<Route>,
    pub tenants: Vec<Tenant>,
    /// SHA-256 digest of a client key -> index into `tenants`.
    key_index: HashMap<[u8; 32], usize>,
    /// Named keys (`tenants[].keys`) by digest: their limits and models.
    key_infos: HashMap<[u8; 32], Rc<KeyInfo>>,
    /// Shared provider pools, in configuration order.
    pub pools: Vec<Pool>,
    /// `identity.end_user_header`, lower case.
    pub end_user_header: Option<String>,
    /// Tenant id -> index into `tenants`.
    id_index: HashMap<String, usize>,
    pub rate_limit: Option<RateLimit>,
    pub pricing: Option<crate::metering::pricing::PriceTable>,
    pub metering: MeteringSpec,
    /// How per-tenant metrics name their tenant (`metering.tenant_label`,
    /// `auto` resolved).
    pub tenant_label: TenantLabel,
    pub jwt: Option<JwtSlot>,
    pub identity: IdentitySpec,
    /// Headers that carry JWTs or jwt_authn payloads, removed before the
    /// upstream so a client's token never reaches a provider.
    pub jwt_strip_headers: Vec<String>,
    /// The tenant registry, when configured.
    pub registry: Option<Registry>,
    /// The tiers by name, for tenants the registry resolves: the spec (to
    /// merge overrides into), the shared name and the compiled policy.
    tiers: HashMap<String, (TierSpec, Rc<str>, Rc<Policy>)>,
    /// The circuit breaker of failover targets.
    pub circuit: CircuitConfig,
}

/// The registry settings, compiled (see [`super::spec::RegistrySpec`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    pub cluster: String,
    pub authority: String,
    pub timeout_ms: u64,
    pub poll_ms: u64,
    pub grace_ms: u64,
    pub negative_ttl_ms: u64,
    pub max_lookups_in_flight: u64,
    pub max_cached: usize,
}

/// Why a registry tenant record cannot serve requests (an operator's
/// mistake: the record names a tier this gateway does not have, say).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0}")]
pub struct RecordError(pub String);

/// The rate-limit settings, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    pub cluster: String,
    pub domain: String,
    pub timeout_ms: u64,
    pub mode: RlsMode,
    /// Per-mille of per-minute limits admitted per worker in fail-open.
    pub fail_open_permille: u64,
    pub fail_open_default_rpm: u64,
    pub journal_capacity: usize,
    pub lease_ms: u64,
    /// Usage rows go to the service's ledger with the settles.
    pub ledger: bool,
}

/// `metering.tenant_label`, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantLabel {
    Tenant,
    Tier,
    None,
    Only(hashbrown::HashSet<String>),
}

impl Plugin {
    /// The `tenant` label value of a tenant's metrics.
    pub fn metric_tenant<'a>(&self, tenant: &'a Tenant) -> std::borrow::Cow<'a, str> {
        use std::borrow::Cow;
        match &self.tenant_label {
            TenantLabel::Tenant => Cow::Borrowed(tenant.id.as_str()),
            TenantLabel::Tier => Cow::Owned(format!("tier-{}", tenant.tier)),
            TenantLabel::None => Cow::Borrowed("all"),
            TenantLabel::Only(ids) if ids.contains(&tenant.id) => Cow::Borrowed(tenant.id.as_str()),
            TenantLabel::Only(_) => Cow::Borrowed("other"),
        }
    }

    /// The tenant owning a client key, by its digest.
    pub fn tenant_by_key_digest(&self, digest: &[u8; 32]) -> Option<&Tenant> {
        self.key_index.get(digest).and_then(|&i| self.tenants.get(i))
    }

    /// A named key's limits and models, by its digest.
    pub fn key_info(&self, digest: &[u8; 32]) -> Option<&Rc<KeyInfo>> {
        self.key_infos.get(digest)
    }

    /// The pool a request to `provider` for `model` counts in.
    pub fn pool_for(&self, provider: usize, model: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.provider == provider && p.models.allows(model))
    }

    pub fn tenant_by_id(&self, id: &str) -> Option<&Tenant> {
        self.id_index.get(id).and_then(|&i| self.tenants.get(i))
    }

    /// A tenant's index in `tenants`, by id: one hash lookup, whatever the
    /// number of tenants.
    pub fn tenant_index(&self, id: &str) -> Option<usize> {
        self.id_index.get(id).copied()
    }

    /// Compiles a tenant record of the registry against this configuration's
    /// tiers and providers. `credentials` are the tenant's provider keys by
    /// provider name (names this configuration lacks are ignored).
    pub fn registry_tenant(
        &self,
        record: &rls_contract::registry::TenantRecord,
        credentials: &std::collections::BTreeMap<String, String>,
    ) -> Result<Tenant, RecordError> {
        if !valid_id(&record.id) {
            return Err(RecordError("the tenant id is not valid".into()));
        }
        let Some((spec, name, tier_policy)) = self.tiers.get(&record.tier) else {
            return Err(RecordError(format!("unknown tier '{}'", record.tier)));
        };
        let policy = match &record.overrides {
            Some(over) => Rc::new(
                compile_tier(&merge_tier(spec, over), "overrides", &self.providers)
                    .map_err(|e| RecordError(e.to_string()))?,
            ),
            None => Rc::clone(tier_policy),
        };
        if policy.has_limits() && self.rate_limit.is_none() {
            return Err(RecordError("has limits, but no rate_limit section is configured".into()));
        }
        let usd = |l: &crate::ratelimit::descriptors::Limits| l.iter().any(|(k, _)| k.measure() == Measure::Micros);
        if (usd(&policy.limits) || policy.users.as_deref().is_some_and(usd)) && self.pricing.is_none() {
            return Err(RecordError("has dollar budgets, but there is no pricing table".into()));
        }
        let mut provider_keys = vec![None; self.providers.len()];
        for (provider, secret) in credentials {
            let Some(i) = self.providers.iter().position(|p| p.name == *provider) else { continue };
            if secret.is_empty() || secret.bytes().any(|b| b.is_ascii_control()) {
                continue;
            }
            if let Some(slot) = provider_keys.get_mut(i) {
                *slot = Some(secret.clone());
            }
        }
        Ok(Tenant { id: record.id.clone(), tier: Rc::clone(name), enabled: record.enabled, policy, provider_keys })
    }

    /// The route for a path (query string ignored). Exact matches win over
    /// prefixes; among prefixes the longest wins.
    pub fn route_for(&self, path: &str) -> Option<&Route> {
        let path = path.split(['?', '#']).next().unwrap_or(path);
        let mut best: Option<(&Route, usize)> = None;
        for r in &self.routes {
            match &r.path {
                PathMatch::Exact(p) if p == path => return Some(r),
                PathMatch::Prefix(p) if path.starts_with(p.as_str()) && best.is_none_or(|(_, len)| p.len() > len) => {
                    best = Some((r, p.len()));
                }
                _ => {}
            }
        }
        best.map(|(r, _)| r)
    }

    pub fn provider(&self, index: usize) -> Option<&Provider> {
        self.providers.get(index)
    }
}

fn parse_digest(path: &str, hex_digest: &str) -> Result<[u8; 32], ConfigError> {
    let trimmed = hex_digest.trim();
    if trimmed.len() != 64 {
        return Err(invalid(
            path,
            "must be a SHA-256 digest: 64 hex characters (the plain key never belongs in the config)",
        ));
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(trimmed, &mut out)
        .map_err(|_| invalid(path, "must be a SHA-256 digest: 64 hex characters"))?;
    Ok(out)
}

/// Decodes the raw plugin configuration bytes into JSON.
///
/// JSON text (from a `StringValue`, a `BytesValue`, or Istio) is used as is.
/// A `google.protobuf.Struct` reaches the filter as binary protobuf; it is
/// decoded into the equivalent JSON.
pub fn decode_plugin_config(raw: &[u8]) -> Result<serde_json::Value, ConfigError> {
    let text_start = raw.iter().position(|b| !b.is_ascii_whitespace());
    match text_start.and_then(|i| raw.get(i)) {
        None => return Err(ConfigError::Encoding("an empty value; tollgate needs a JSON configuration".into())),
        Some(b'{') => {
            return serde_json::from_slice(raw).map_err(|e| ConfigError::Shape(e.to_string()));
        }
        Some(_) => {}
    }
    crate::envoy::structs::struct_to_json(raw).map_err(|e| {
        ConfigError::Encoding(format!(
            "neither JSON text nor a protobuf Struct ({e}); give the configuration as a \
             google.protobuf.StringValue holding JSON"
        ))
    })
}

/// Parses and compiles a configuration. `env` resolves environment variable
/// names (the host's `host_env_keys` in Envoy).
///
/// JSON text is read straight into the configuration's types, never through
/// a `serde_json::Value` tree: a VM's memory grows to the peak of this load
/// and never shrinks, and a tree costs about ten times the text.
pub fn load(raw: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Plugin, ConfigError> {
    let is_json = raw.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    // The (rare) protobuf Struct form is turned into JSON text first, so the
    // configuration's deserializer exists once in the wasm, for text.
    let text;
    let json = if is_json {
        raw
    } else {
        let value = decode_plugin_config(raw)?;
        text = serde_json::to_vec(&value).map_err(|e| ConfigError::Shape(e.to_string()))?;
        text.as_slice()
    };
    let config: PluginConfig = serde_json::from_slice(json).map_err(|e| ConfigError::Shape(e.to_string()))?;
    compile(&config, env)
}

/// Checks the meaning of a parsed configuration and builds the lookup tables.
pub fn compile(config: &PluginConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Plugin, ConfigError> {
    // Headers.
    if config.client_key_headers.is_empty() && config.client_key_query_param.is_empty() {
        return Err(invalid("client_key_headers", "no header or query parameter to read client keys from"));
    }
    let mut client_key_headers = Vec::new();
    for (i, h) in config.client_key_headers.iter().enumerate() {
        let h = h.to_ascii_lowercase();
        if !valid_header_name(&h) {
            return Err(invalid(format!("client_key_headers[{i}]"), "not a valid header name"));
        }
        client_key_headers.push(h);
    }
    let mut strip_request_headers = Vec::new();
    for (i, h) in config.strip_request_headers.iter().enumerate() {
        let h = h.to_ascii_lowercase();
        if !valid_header_name(&h) {
            return Err(invalid(format!("strip_request_headers[{i}]"), "not a valid header name"));
        }
        strip_request_headers.push(h);
    }
    let request_id_header = config.request_id_header.to_ascii_lowercase();
    if !valid_header_name(&request_id_header) {
        return Err(invalid("request_id_header", "not a valid header name"));
    }

    // Providers.
    if config.providers.is_empty() {
        return Err(invalid("providers", "at least one provider is required"));
    }
    let mut providers = Vec::new();
    for (name, p) in &config.providers {
        let path = format!("providers.{name}");
        if !valid_id(name) {
            return Err(invalid(path, "provider names use letters, digits, - _ . only"));
        }
        let header = p.credential_header.to_ascii_lowercase();
        if !valid_header_name(&header) {
            return Err(invalid(format!("{path}.credential_header"), "not a valid header name"));
        }
        let prefix = match &p.credential_prefix {
            Some(prefix) => prefix.clone(),
            None if header == "authorization" => "Bearer ".into(),
            None => String::new(),
        };
        for (from, to) in &p.model_map {
            let name_ok = |n: &str| {
                !n.is_empty()
                    && n.len() <= 256
                    && n.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'@'))
            };
            if from.is_empty() || !name_ok(to) {
                return Err(invalid(
                    format!("{path}.model_map.{from}"),
                    "a mapped model name is 1-256 letters, digits and - _ . : @ (it may be written into a path)",
                ));
            }
        }
        providers.push(Provider {
            name: name.clone(),
            credential_header: header,
            credential_prefix: prefix,
            inject_stream_usage: p.inject_stream_usage.unwrap_or(config.metering.inject_stream_usage),
            targets: Vec::new(),
            weighted: p.selection == TargetSelection::Weighted,
            model_map: p.model_map.iter().map(|(a, b)| (a.clone(), b.clone())).collect(),
            rate_limited_scope: match p.rate_limited_scope {
                RateLimitedScopeSpec::Credential => RateLimitedScope::Credential,
                RateLimitedScopeSpec::Target => RateLimitedScope::Target,
            },
            circuit_key: circuit::key(name),
        });
    }
    // Failover targets, once every provider has its index (the order of
    // `config.providers`, as pushed above).
    let provider_index = |name: &str| config.providers.keys().position(|k| k == name);
    let mut all_targets = Vec::with_capacity(providers.len());
    for (name, p) in &config.providers {
        let path = format!("providers.{name}.targets");
        let mut targets: Vec<Target> = Vec::new();
        for (i, t) in p.targets.iter().enumerate() {
            let tpath = format!("{path}[{i}]");
            let idx = provider_index(&t.provider)
                .ok_or_else(|| invalid(format!("{tpath}.provider"), format!("unknown provider '{}'", t.provider)))?;
            if t.provider != *name && config.providers.get(&t.provider).is_some_and(|o| !o.targets.is_empty()) {
                return Err(invalid(
                    format!("{tpath}.provider"),
                    format!("'{}' has targets of its own; targets do not nest", t.provider),
                ));
            }
            if targets.iter().any(|o| o.provider == idx) {
                return Err(invalid(format!("{tpath}.provider"), format!("'{}' is named twice", t.provider)));
            }
            let weight = match (p.selection, t.weight) {
                (TargetSelection::Order, Some(_)) => {
                    return Err(invalid(
                        format!("{tpath}.weight"),
                        "weights only apply with selection: weighted (order takes the list's order)",
                    ))
                }
                (TargetSelection::Order, None) => 1,
                (TargetSelection::Weighted, w) => {
                    let w = w.unwrap_or(1);
                    if !(1..=10_000).contains(&w) {
                        return Err(invalid(format!("{tpath}.weight"), "must be between 1 and 10000"));
                    }
                    w
                }
            };
            targets.push(Target { provider: idx, weight });
        }
        if p.targets.is_empty() && (p.selection != TargetSelection::Order) {
            return Err(invalid(format!("providers.{name}.selection"), "applies only to a provider with targets"));
        }
        all_targets.push(targets);
    }
    for (p, targets) in providers.iter_mut().zip(all_targets) {
        p.targets = targets;
    }
    let circuit = compile_circuit(&config.circuit_breaker)?;
    let provider_index = |name: &str| providers.iter().position(|p| p.name == name);

    // Routes.
    if config.routes.is_empty() {
        return Err(invalid("routes", "at least one route is required"));
    }
    let mut routes = Vec::new();
    for (i, r) in config.routes.iter().enumerate() {
        let path = format!("routes[{i}]");
        let matcher = match (&r.path, &r.path_prefix) {
            (Some(p), None) => PathMatch::Exact(p.clone()),
            (None, Some(p)) => PathMatch::Prefix(p.clone()),
            _ => return Err(invalid(path, "give exactly one of path and path_prefix")),
        };
        let p = match &matcher {
            PathMatch::Exact(p) | PathMatch::Prefix(p) => p,
        };
        if !p.starts_with('/') || p.contains('?') {
            return Err(invalid(path, "paths start with / and carry no query"));
        }
        if routes.iter().any(|other: &Route| other.path == matcher) {
            return Err(invalid(path, "the same path is routed twice"));
        }
        let provider = provider_index(&r.provider)
            .ok_or_else(|| invalid(format!("{path}.provider"), format!("unknown provider '{}'", r.provider)))?;
        routes.push(Route { path: matcher, api: r.api, provider, trust_end_user_header: r.trust_end_user_header });
    }

    // Tiers: each must compile on its own, so a mistake in an unused tier is
    // still caught.
    if config.tiers.is_empty() {
        return Err(invalid("tiers", "at least one tier is required"));
    }
    let mut tier_policies: HashMap<&str, (Rc<str>, Rc<Policy>)> = HashMap::new();
    for (name, tier) in &config.tiers {
        let policy = compile_tier(tier, &format!("tiers.{name}"), &providers)?;
        tier_policies.insert(name.as_str(), (Rc::from(name.as_str()), Rc::new(policy)));
    }
    let registry = match &config.registry {
        None => None,
        Some(r) => Some(compile_registry(r)?),
    };
    let tiers = if registry.is_some() {
        config
            .tiers
            .iter()
            .filter_map(|(name, spec)| {
                let (n, p) = tier_policies.get(name.as_str())?;
                Some((name.clone(), (spec.clone(), Rc::clone(n), Rc::clone(p))))
            })
            .collect()
    } else {
        HashMap::new()
    };

    // Tenants.
    let mut tenants = Vec::new();
    let mut key_index = HashMap::new();
    let mut key_infos = HashMap::new();
    let mut id_index = HashMap::new();
    for (i, t) in config.tenants.iter().enumerate() {
        let path = format!("tenants[{i}]");
        if !valid_id(&t.id) {
            return Err(invalid(format!("{path}.id"), "tenant ids use 1-128 letters, digits, - _ . only"));
        }
        if id_index.insert(t.id.clone(), i).is_some() {
            return Err(invalid(format!("{path}.id"), format!("duplicate tenant id '{}'", t.id)));
        }
        let (tier, (tier_name, tier_policy)) = config
            .tiers
            .get(&t.tier)
            .zip(tier_policies.get(t.tier.as_str()))
            .ok_or_else(|| invalid(format!("{path}.tier"), format!("unknown tier '{}'", t.tier)))?;
        let policy = match &t.overrides {
            Some(over) => Rc::new(compile_tier(&merge_tier(tier, over), &format!("{path}.overrides"), &providers)?),
            None => Rc::clone(tier_policy),
        };
        for (k, digest) in t.api_key_sha256.iter().enumerate() {
            let kpath = format!("{path}.api_key_sha256[{k}]");
            let bytes = parse_digest(&kpath, digest)?;
            if let Some(prev) = key_index.insert(bytes, i) {
                let owner = config.tenants.get(prev).map(|p| p.id.as_str()).unwrap_or("?");
                return Err(invalid(kpath, format!("duplicate key digest (also a key of tenant '{owner}')")));
            }
        }
        let mut key_ids: Vec<&str> = Vec::new();
        for (k, spec) in t.keys.iter().flat_map(|k| k.iter()).enumerate() {
            let kpath = format!("{path}.keys[{k}]");
            let bytes = parse_digest(&format!("{kpath}.sha256"), &spec.sha256)?;
            if let Some(prev) = key_index.insert(bytes, i) {
                let owner = config.tenants.get(prev).map(|p| p.id.as_str()).unwrap_or("?");
                return Err(invalid(
                    format!("{kpath}.sha256"),
                    format!("duplicate key digest (also a key of tenant '{owner}')"),
                ));
            }
            if key_ids.contains(&spec.id.as_str()) {
                return Err(invalid(format!("{kpath}.id"), format!("duplicate key id '{}'", spec.id)));
            }
            key_ids.push(&spec.id);
            let info = compile_key_spec(&kpath, spec)?;
            if let Some(m) = &spec.models {
                for (j, model) in m.iter().enumerate() {
                    let exact = !model.contains('*');
                    if exact && !policy.models.allows(model.trim()) {
                        return Err(invalid(
                            format!("{kpath}.models[{j}]"),
                            format!("'{model}' is not in the tenant's model list"),
                        ));
                    }
                }
            }
            key_infos.insert(bytes, Rc::new(info));
        }
        let mut provider_keys = vec![None; providers.len()];
        for (pname, var) in &t.provider_key_env {
            let ppath = format!("{path}.provider_key_env.{pname}");
            let idx = provider_index(pname).ok_or_else(|| invalid(&ppath, format!("unknown provider '{pname}'")))?;
            let value = env(var).filter(|v| !v.is_empty()).ok_or_else(|| {
                invalid(
                    &ppath,
                    format!(
                        "environment variable '{var}' is missing or empty in the VM; list it in \
                         vm_config.environment_variables.host_env_keys"
                    ),
                )
            })?;
            if value.bytes().any(|b| b.is_ascii_control()) {
                return Err(invalid(&ppath, format!("environment variable '{var}' holds control characters")));
            }
            if let Some(slot) = provider_keys.get_mut(idx) {
                *slot = Some(value);
            }
        }
        tenants.push(Tenant {
            id: t.id.clone(),
            tier: Rc::clone(tier_name),
            enabled: t.enabled,
            policy,
            provider_keys,
        });
    }

    let rate_limit = match &config.rate_limit {
        None => None,
        Some(r) => {
            if r.cluster.trim().is_empty() {
                return Err(invalid("rate_limit.cluster", "must name an Envoy cluster"));
            }
            if r.domain.trim().is_empty() {
                return Err(invalid("rate_limit.domain", "must not be empty"));
            }
            if !(1..=5000).contains(&r.timeout_ms) {
                return Err(invalid("rate_limit.timeout_ms", "must be between 1 and 5000"));
            }
            if !(r.fail_open_share.is_finite() && r.fail_open_share > 0.0 && r.fail_open_share <= 1.0) {
                return Err(invalid("rate_limit.fail_open_share", "must be a share in (0, 1]"));
            }
            if r.fail_open_default_requests_per_minute == 0 {
                return Err(invalid("rate_limit.fail_open_default_requests_per_minute", "must be at least 1"));
            }
            if r.journal_capacity == 0 || r.journal_capacity > 1_000_000 {
                return Err(invalid("rate_limit.journal_capacity", "must be between 1 and 1000000"));
            }
            if !(10..=60_000).contains(&r.lease_ms) {
                return Err(invalid("rate_limit.lease_ms", "must be between 10 and 60000"));
            }
            if r.mode == RlsMode::CheckThenCharge {
                if let Some(t) = tenants.iter().find(|t| matches!(t.policy.lease, super::tiers::LeaseSize::Fixed(_))) {
                    return Err(invalid(
                        format!("tenants.{}.lease_requests", t.id),
                        "quota leases need the reserve mode; check_then_charge cannot lease",
                    ));
                }
            }
            Some(RateLimit {
                cluster: r.cluster.clone(),
                domain: r.domain.clone(),
                timeout_ms: r.timeout_ms,
                mode: r.mode,
                fail_open_permille: ((r.fail_open_share * 1000.0).round() as u64).max(1),
                fail_open_default_rpm: r.fail_open_default_requests_per_minute,
                journal_capacity: r.journal_capacity,
                ledger: match (r.ledger, r.mode) {
                    (Some(true), RlsMode::CheckThenCharge) => {
                        return Err(invalid(
                            "rate_limit.ledger",
                            "the usage ledger needs tollgate's service (mode: reserve); stock servers ignore it",
                        ))
                    }
                    (Some(on), _) => on,
                    (None, mode) => mode == RlsMode::Reserve,
                },
                lease_ms: r.lease_ms,
            })
        }
    };
    let pricing = match &config.pricing {
        None => None,
        Some(p) => Some(p.compile().map_err(|e| invalid("pricing", e.to_string()))?),
    };
    if config.metering.bytes_per_token == 0 || config.metering.bytes_per_token > 64 {
        return Err(invalid("metering.bytes_per_token", "must be between 1 and 64"));
    }
    for (i, f) in config.metering.filter_state.iter().flatten().enumerate() {
        if !FILTER_STATE_FIELDS.contains(&f.as_str()) {
            return Err(invalid(
                format!("metering.filter_state[{i}]"),
                format!("unknown field '{f}'; known: {}", FILTER_STATE_FIELDS.join(", ")),
            ));
        }
    }
    let tenant_label = match &config.metering.tenant_label {
        // With a registry the number of tenants has no bound: by tier.
        TenantLabelSpec::Auto if tenants.len() <= AUTO_TENANT_LABEL_MAX && registry.is_none() => TenantLabel::Tenant,
        TenantLabelSpec::Auto | TenantLabelSpec::Tier => TenantLabel::Tier,
        TenantLabelSpec::Tenant => TenantLabel::Tenant,
        TenantLabelSpec::None => TenantLabel::None,
        TenantLabelSpec::Only(ids) => {
            for (i, id) in ids.iter().enumerate() {
                if !id_index.contains_key(id.as_str()) {
                    return Err(invalid(format!("metering.tenant_label.only[{i}]"), format!("no tenant '{id}'")));
                }
            }
            TenantLabel::Only(ids.iter().cloned().collect())
        }
    };
    let has_usd = |l: &crate::ratelimit::descriptors::Limits| l.iter().any(|(k, _)| k.measure() == Measure::Micros);
    for (i, t) in tenants.iter().enumerate() {
        let path = format!("tenants[{i}] (tier '{}')", t.tier);
        if t.policy.has_limits() && rate_limit.is_none() {
            return Err(invalid(path, "has limits, but no rate_limit section names the rate-limit service cluster"));
        }
        let user_usd = t.policy.users.as_deref().is_some_and(has_usd);
        if (has_usd(&t.policy.limits) || user_usd) && pricing.is_none() {
            return Err(invalid(path, "has dollar budgets, but there is no pricing table"));
        }
    }
    for k in key_infos.values() {
        if !k.limits.is_empty() && rate_limit.is_none() {
            return Err(invalid(
                format!("key '{}'", k.id),
                "has limits, but no rate_limit section names the rate-limit service cluster",
            ));
        }
        if has_usd(&k.limits) && pricing.is_none() {
            return Err(invalid(format!("key '{}'", k.id), "has dollar budgets, but there is no pricing table"));
        }
    }
    let pools = compile_pools(&config.pools, &|n: &str| provider_index(n), &|t: &str| config.tiers.contains_key(t))?;
    if !pools.is_empty() && rate_limit.is_none() {
        return Err(invalid("pools", "pools need a rate_limit section naming the rate-limit service cluster"));
    }
    let end_user_header = match &config.identity.end_user_header {
        None => None,
        Some(h) => {
            let h = h.trim().to_ascii_lowercase();
            if h.is_empty()
                || h.starts_with(':')
                || !h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(invalid("identity.end_user_header", "not a valid header name"));
            }
            Some(h)
        }
    };
    if end_user_header.is_none() {
        if let Some(i) = config.routes.iter().position(|r| r.trust_end_user_header) {
            return Err(invalid(
                format!("routes[{i}].trust_end_user_header"),
                "is set, but identity.end_user_header names no header",
            ));
        }
    }

    let jwt = match &config.jwt {
        None => None,
        Some(j) => Some(JwtSlot(std::cell::RefCell::new(j.compile(env).map_err(|e| invalid("jwt", e.to_string()))?))),
    };
    let mut jwt_strip_headers = Vec::new();
    if let Some(j) = &config.jwt {
        for p in &j.providers {
            match &p.from {
                crate::identity::jwt::TokenSource::Authorization => jwt_strip_headers.push("authorization".to_string()),
                crate::identity::jwt::TokenSource::Header { name, .. } => {
                    jwt_strip_headers.push(name.to_ascii_lowercase())
                }
                crate::identity::jwt::TokenSource::Cookie { .. } => jwt_strip_headers.push("cookie".to_string()),
            }
        }
    }
    if let Some(a) = &config.identity.jwt_authn {
        if a.payload_in_metadata.trim().is_empty() || a.tenant_claim.trim().is_empty() {
            return Err(invalid("identity.jwt_authn", "payload_in_metadata and tenant_claim are required"));
        }
        if let Some(h) = &a.forward_payload_header {
            jwt_strip_headers.push(h.to_ascii_lowercase());
        }
    }
    if !config.identity.api_keys && config.jwt.is_none() && config.identity.jwt_authn.is_none() {
        return Err(invalid("identity.api_keys", "false, but no jwt or jwt_authn identity is configured"));
    }

    let query = config.client_key_query_param.trim();
    Ok(Plugin {
        jwt,
        identity: config.identity.clone(),
        jwt_strip_headers,
        rate_limit,
        pricing,
        metering: config.metering.clone(),
        tenant_label,
        client_key_headers,
        client_key_query_param: (!query.is_empty()).then(|| query.to_string()),
        strip_request_headers,
        request_id_header,
        unmatched_routes: config.unmatched_routes,
        providers,
        routes,
        tenants,
        key_index,
        key_infos,
        pools,
        end_user_header,
        id_index,
        registry,
        tiers,
        circuit,
    })
}

fn compile_circuit(c: &CircuitBreakerSpec) -> Result<CircuitConfig, ConfigError> {
    let ranges: [(&str, u64, u64, u64); 5] = [
        ("consecutive_failures", u64::from(c.consecutive_failures), 1, 1000),
        ("open_seconds", c.open_seconds, 1, 3600),
        ("max_open_seconds", c.max_open_seconds, 1, 86_400),
        ("max_retry_after_seconds", c.max_retry_after_seconds, 1, 86_400),
        ("probe_timeout_seconds", c.probe_timeout_seconds, 1, 3600),
    ];
    for (field, v, lo, hi) in ranges {
        if !(lo..=hi).contains(&v) {
            return Err(invalid(format!("circuit_breaker.{field}"), format!("must be between {lo} and {hi}")));
        }
    }
    if c.max_open_seconds < c.open_seconds {
        return Err(invalid("circuit_breaker.max_open_seconds", "must be at least open_seconds"));
    }
    Ok(CircuitConfig {
        consecutive_failures: c.consecutive_failures,
        open_ms: c.open_seconds * 1000,
        max_open_ms: c.max_open_seconds * 1000,
        max_retry_after_ms: c.max_retry_after_seconds * 1000,
        probe_timeout_ms: c.probe_timeout_seconds * 1000,
    })
}

fn compile_registry(r: &RegistrySpec) -> Result<Registry, ConfigError> {
    if r.cluster.trim().is_empty() {
        return Err(invalid("registry.cluster", "must name an Envoy cluster"));
    }
    let ranges: [(&str, u64, u64, u64); 6] = [
        ("timeout_ms", r.timeout_ms, 1, 5000),
        ("poll_ms", r.poll_ms, 100, 10_000),
        ("grace_s", r.grace_s, 0, 86_400),
        ("negative_ttl_ms", r.negative_ttl_ms, 0, 600_000),
        ("max_lookups_in_flight", r.max_lookups_in_flight, 1, 1024),
        ("max_cached", r.max_cached as u64, 1, 10_000_000),
    ];
    for (field, v, lo, hi) in ranges {
        if !(lo..=hi).contains(&v) {
            return Err(invalid(format!("registry.{field}"), format!("must be between {lo} and {hi}")));
        }
    }
    let authority = r.authority.clone().unwrap_or_else(|| r.cluster.clone());
    if authority.is_empty() || authority.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(invalid("registry.authority", "not a valid authority"));
    }
    Ok(Registry {
        cluster: r.cluster.clone(),
        authority,
        timeout_ms: r.timeout_ms,
        poll_ms: r.poll_ms,
        grace_ms: r.grace_s.saturating_mul(1000),
        negative_ttl_ms: r.negative_ttl_ms,
        max_lookups_in_flight: r.max_lookups_in_flight,
        max_cached: r.max_cached,
    })
}
