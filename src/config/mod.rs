//! Plugin configuration: the JSON an operator writes, and the compiled form the
//! filter uses per request.
//!
//! Loading has two steps. serde checks the shape (every struct refuses unknown
//! fields, so a typo is an error rather than a silently ignored setting), then
//! [`compile`] checks meaning: references between sections, digests, limits,
//! environment variables. Any error makes `on_configure` return false, so Envoy
//! refuses the configuration and logs the message, which names the field.
//!
//! The configuration arrives as JSON text (a `google.protobuf.StringValue` in
//! Envoy, or Istio's `WasmPlugin.pluginConfig`). A `google.protobuf.Struct`
//! given directly in an Envoy config reaches the filter as binary protobuf; that
//! form is decoded too (see [`decode_plugin_config`]).

use std::collections::BTreeMap;

use hashbrown::HashMap;
use serde::Deserialize;
use thiserror::Error;

use crate::llm::Api;

/// Largest request body a tier may allow. Envoy buffers the body in memory
/// while tollgate inspects it, so this is a hard ceiling against mistakes.
pub const MAX_REQUEST_BYTES_CEILING: u64 = 64 * 1024 * 1024;
/// Default request body limit for tiers that do not set one.
pub const DEFAULT_MAX_REQUEST_BYTES: u64 = 1024 * 1024;

/// The plugin configuration as written by the operator.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Request headers a client may carry its tollgate API key in, tried in
    /// order. `authorization` is read as `Bearer <key>`. Every one of them is
    /// removed before the request goes upstream, whether used or not.
    #[serde(default = "default_client_key_headers")]
    pub client_key_headers: Vec<String>,
    /// Query parameter a client may carry its key in (Gemini clients send
    /// `?key=`). It is always removed from the upstream path. Empty to disable.
    #[serde(default = "default_client_key_query_param")]
    pub client_key_query_param: String,
    /// Extra client headers that claim an identity and must never reach the
    /// upstream (for example `x-user-id`). `x-tollgate-*` is always dropped.
    #[serde(default)]
    pub strip_request_headers: Vec<String>,
    /// Header carrying the request id. Kept when the client (or Envoy) set
    /// it, created otherwise, and echoed on the response.
    #[serde(default = "default_request_id_header")]
    pub request_id_header: String,
    /// What to do with a request whose path matches no route: `deny` (404 in
    /// OpenAI's envelope) or `pass` (forwarded untouched, without identity).
    #[serde(default)]
    pub unmatched_routes: UnmatchedRoutes,
    /// Upstream LLM providers and how their credential header is written.
    pub providers: BTreeMap<String, ProviderSpec>,
    /// Which inbound paths speak which API, and which provider serves them.
    pub routes: Vec<RouteSpec>,
    /// Named sets of limits and policies that tenants refer to.
    pub tiers: BTreeMap<String, TierSpec>,
    /// The tenants, their client keys (as SHA-256 digests) and provider keys.
    pub tenants: Vec<TenantSpec>,
    /// The rate-limit service. Required when any tier sets a limit.
    #[serde(default)]
    pub rate_limit: Option<RateLimitSpec>,
    /// Model prices, USD per million tokens. Required for dollar budgets.
    #[serde(default)]
    pub pricing: Option<crate::metering::pricing::PricingConfig>,
    /// How usage is read, estimated and reported.
    #[serde(default)]
    pub metering: MeteringSpec,
    /// JWT identity verified by tollgate itself (see `src/jwt.rs`).
    #[serde(default)]
    pub jwt: Option<crate::identity::jwt::JwtConfig>,
    /// Which identities are accepted, and trust in Envoy's `jwt_authn`.
    #[serde(default)]
    pub identity: IdentitySpec,
}

/// Which identities are accepted. Precedence, first match wins:
/// 1. `jwt_authn`: the payload Envoy's `jwt_authn` filter verified and wrote
///    to dynamic metadata (never a header a client could send);
/// 2. a JWT (a credential with three dot-separated parts) in the source of a
///    `jwt` provider, verified by tollgate;
/// 3. an API key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySpec {
    /// Accept API keys (default true). With false, only JWTs identify.
    #[serde(default = "default_true")]
    pub api_keys: bool,
    /// Take identity from Envoy's `jwt_authn` filter running before tollgate.
    #[serde(default)]
    pub jwt_authn: Option<JwtAuthnSpec>,
}

impl Default for IdentitySpec {
    fn default() -> Self {
        IdentitySpec { api_keys: true, jwt_authn: None }
    }
}

/// Trust in Envoy's `jwt_authn` filter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtAuthnSpec {
    /// `payload_in_metadata` of the `jwt_authn` provider: the key under
    /// `envoy.filters.http.jwt_authn` dynamic metadata holding the payload.
    pub payload_in_metadata: String,
    /// Dotted path of the tenant id claim.
    pub tenant_claim: String,
    /// Dotted path of the user id claim (default `sub`).
    #[serde(default = "default_sub")]
    pub user_claim: Option<String>,
    /// `forward_payload_header` of the `jwt_authn` provider, if set: removed
    /// before the upstream (tollgate never reads identity from it).
    #[serde(default)]
    pub forward_payload_header: Option<String>,
}

fn default_sub() -> Option<String> {
    Some("sub".into())
}

/// Where and how the filter asks the rate-limit service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    /// Envoy cluster of the RLS v3 service (HTTP/2).
    pub cluster: String,
    /// RLS domain of tollgate's descriptors.
    #[serde(default = "default_domain")]
    pub domain: String,
    /// How long a request waits for the reserve answer (1-5000 ms). The
    /// tier's failure mode applies after it.
    #[serde(default = "default_rls_timeout_ms")]
    pub timeout_ms: u64,
    /// `reserve` (tollgate's service: atomic reserve, then settle) or
    /// `check_then_charge` (stock RLS servers: a pure check before, the full
    /// charge after; concurrent requests can overshoot).
    #[serde(default)]
    pub mode: RlsMode,
    /// Share (0 < s <= 1) of a tenant's per-minute limits each Envoy worker
    /// may admit on its own while the service is unreachable, for tiers with
    /// `failure_mode: open`.
    #[serde(default = "default_fail_open_share")]
    pub fail_open_share: f64,
    /// Requests per minute per worker admitted in fail-open for tenants with
    /// no `requests_per_minute`.
    #[serde(default = "default_fail_open_rpm")]
    pub fail_open_default_requests_per_minute: u64,
    /// Most settles kept for retry while the service is unreachable; beyond
    /// it the oldest is dropped and counted in `tollgate.settle.dropped`.
    #[serde(default = "default_journal_capacity")]
    pub journal_capacity: usize,
    /// How long a worker may admit from a quota lease (`lease_requests`)
    /// before the unused rest is refunded, in milliseconds.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
}

fn default_domain() -> String {
    "tollgate".into()
}
fn default_rls_timeout_ms() -> u64 {
    200
}
fn default_fail_open_share() -> f64 {
    0.1
}
fn default_fail_open_rpm() -> u64 {
    10
}
fn default_journal_capacity() -> usize {
    10_000
}
fn default_lease_ms() -> u64 {
    1000
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RlsMode {
    #[default]
    Reserve,
    CheckThenCharge,
}

/// Metering options.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeteringSpec {
    /// Request body bytes per input token, for the pre-call estimate and for
    /// responses without usage (default 4).
    #[serde(default = "default_bytes_per_token")]
    pub bytes_per_token: u64,
    /// Add `x-tollgate-usage-*` and `x-tollgate-cost-usd` headers to
    /// non-streamed responses (the body is held until it is complete).
    #[serde(default = "default_true")]
    pub usage_headers: bool,
    /// End streams with an SSE comment line carrying usage and cost.
    #[serde(default)]
    pub stream_usage_comment: bool,
    /// Ask OpenAI chat streams for usage (`stream_options.include_usage`)
    /// when the client did not, and hide the extra chunk from the client.
    #[serde(default = "default_true")]
    pub inject_stream_usage: bool,
    /// The `tollgate_<field>` filter-state fields set for access logs
    /// ([`FILTER_STATE_FIELDS`]): absent for all of them, or the listed ones
    /// (`[]` for none). Each field is a host call, about 2.5 us of Envoy's
    /// CPU per request.
    #[serde(default)]
    pub filter_state: Option<Vec<String>>,
}

/// The metering fields tollgate sets as filter state, `wasm.tollgate_<field>`.
pub const FILTER_STATE_FIELDS: &[&str] = &[
    "tenant",
    "tier",
    "user",
    "request_id",
    "api",
    "model_requested",
    "model_served",
    "model_answered",
    "tokens_input",
    "tokens_cache_read",
    "tokens_cache_write",
    "tokens_output",
    "tokens_reasoning",
    "tokens_total",
    "cost_usd",
    "ttfb_ms",
    "duration_ms",
    "upstream_status",
    "estimated",
    "outcome",
];

impl Default for MeteringSpec {
    fn default() -> Self {
        MeteringSpec {
            bytes_per_token: default_bytes_per_token(),
            usage_headers: true,
            stream_usage_comment: false,
            inject_stream_usage: true,
            filter_state: None,
        }
    }
}

fn default_bytes_per_token() -> u64 {
    4
}

fn default_client_key_headers() -> Vec<String> {
    ["authorization", "x-api-key", "api-key", "x-goog-api-key"].iter().map(|s| s.to_string()).collect()
}

fn default_client_key_query_param() -> String {
    "key".into()
}

fn default_request_id_header() -> String {
    "x-request-id".into()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnmatchedRoutes {
    #[default]
    Deny,
    Pass,
}

/// An upstream provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSpec {
    /// Header the provider reads its API key from: `authorization` (OpenAI),
    /// `api-key` (Azure OpenAI), `x-api-key` (Anthropic), `x-goog-api-key`
    /// (Gemini).
    pub credential_header: String,
    /// Text written before the key. Defaults to `Bearer ` for
    /// `authorization` and to nothing for every other header.
    #[serde(default)]
    pub credential_prefix: Option<String>,
    /// Overrides `metering.inject_stream_usage` for this provider: for
    /// example `false` for an Azure OpenAI API version that rejects
    /// `stream_options` (those before 2024-09-01-preview) while OpenAI keeps it.
    #[serde(default)]
    pub inject_stream_usage: Option<bool>,
}

/// A route: requests whose path (without query) matches go to `provider`
/// and are read as `api`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Exact path to match. Give this or `path_prefix`.
    #[serde(default)]
    pub path: Option<String>,
    /// Path prefix to match. Give this or `path`.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// The API spoken on this path.
    pub api: Api,
    /// Name of an entry in `providers`.
    pub provider: String,
}

/// What happens when the rate-limit service cannot answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Refuse with 503 in the API's envelope.
    Closed,
    /// Admit within a local allowance derived from the tenant's limits, and
    /// replay the usage to the service when it returns.
    Open,
}

/// A tier's limits and policies. Tenants may override any field with the
/// same structure. Every limit is optional: absent means not limited.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierSpec {
    /// Models this tier may call: exact ids, or prefixes ending in `*`
    /// (`gpt-4o*`), or `*` for any model. Must not be empty.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// Largest request body accepted, in bytes (default 1 MiB, at most
    /// 64 MiB). Larger bodies get 413.
    #[serde(default)]
    pub max_request_bytes: Option<u64>,
    /// Requests per minute (smooth rate).
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    /// Tokens (input + output) per minute (smooth rate).
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    /// Requests per calendar day.
    #[serde(default)]
    pub requests_per_day: Option<u64>,
    /// Tokens per calendar day.
    #[serde(default)]
    pub tokens_per_day: Option<u64>,
    /// Tokens per billing month.
    #[serde(default)]
    pub tokens_per_month: Option<u64>,
    /// US dollars per calendar day (up to six decimals).
    #[serde(default)]
    pub usd_per_day: Option<f64>,
    /// US dollars per billing month (up to six decimals).
    #[serde(default)]
    pub usd_per_month: Option<f64>,
    /// Requests in flight at once.
    #[serde(default)]
    pub max_concurrent_requests: Option<u64>,
    /// `closed` (default) or `open` when the rate-limit service is down.
    #[serde(default)]
    pub failure_mode: Option<FailureMode>,
    /// Day of the month (1-31) the billing month renews. Day 31 renews on the
    /// last day of shorter months. Default 1.
    #[serde(default)]
    pub billing_anchor_day: Option<u8>,
    /// IANA time zone of days and billing months (default UTC).
    #[serde(default)]
    pub time_zone: Option<String>,
    /// Output tokens assumed when a request sets no maximum.
    #[serde(default)]
    pub default_max_output_tokens: Option<u64>,
    /// Lower a request's max output tokens to what the budget still allows
    /// instead of refusing it.
    #[serde(default)]
    pub clamp_max_output_tokens: Option<bool>,
    /// Model to serve instead of the requested one once
    /// `fallback_at_budget_share` of a budget is used.
    #[serde(default)]
    pub fallback_model: Option<String>,
    /// Quota leasing: when the last answer showed ample room, one reserve
    /// call also reserves this many more requests' worth (requests, tokens and
    /// dollars, sized by the current request's estimate) for this worker to
    /// admit locally, without a call, for up to `rate_limit.lease_ms`.
    /// Unused quota is refunded. Off by default (one call per request).
    #[serde(default)]
    pub lease_requests: Option<u64>,
    /// Share of a budget (0 < share < 1) past which `fallback_model` is used.
    #[serde(default)]
    pub fallback_at_budget_share: Option<f64>,
}

/// A tenant: one customer of the platform.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    /// Stable id, used in metrics, logs, limit keys and `x-tollgate-tenant`.
    /// Letters, digits, `-`, `_` and `.` only.
    pub id: String,
    /// Name of an entry in `tiers`.
    pub tier: String,
    /// A disabled tenant's requests get 403.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// SHA-256 digests (hex) of the tenant's client API keys. Plain keys never
    /// appear in the configuration: `printf %s "$KEY" | sha256sum`.
    #[serde(default)]
    pub api_key_sha256: Vec<String>,
    /// Per provider, the name of the environment variable holding this
    /// tenant's provider API key. Envoy passes it to the VM through
    /// `vm_config.environment_variables.host_env_keys`, so the secret never
    /// appears in the config dump.
    #[serde(default)]
    pub provider_key_env: BTreeMap<String, String>,
    /// Tier fields this tenant overrides.
    #[serde(default)]
    pub overrides: Option<TierSpec>,
}

fn default_true() -> bool {
    true
}

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

fn invalid(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { path: path.into(), message: message.into() }
}

/// A compiled model allowlist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelAllowlist {
    any: bool,
    exact: Vec<String>,
    prefixes: Vec<String>,
}

impl ModelAllowlist {
    fn compile(path: &str, models: &[String]) -> Result<Self, ConfigError> {
        if models.is_empty() {
            return Err(invalid(path, "the model list is empty, so nothing could be called"));
        }
        let mut list = ModelAllowlist { any: false, exact: Vec::new(), prefixes: Vec::new() };
        for (i, m) in models.iter().enumerate() {
            let m = m.trim();
            if m.is_empty() {
                return Err(invalid(format!("{path}[{i}]"), "empty model name"));
            }
            if m == "*" {
                list.any = true;
            } else if let Some(prefix) = m.strip_suffix('*') {
                if prefix.contains('*') {
                    return Err(invalid(format!("{path}[{i}]"), "only a trailing * is supported"));
                }
                list.prefixes.push(prefix.to_string());
            } else if m.contains('*') {
                return Err(invalid(format!("{path}[{i}]"), "only a trailing * is supported"));
            } else {
                list.exact.push(m.to_string());
            }
        }
        Ok(list)
    }

    pub fn allows(&self, model: &str) -> bool {
        self.any || self.exact.iter().any(|m| m == model) || self.prefixes.iter().any(|p| model.starts_with(p.as_str()))
    }
}

/// A tier after a tenant's overrides are applied and every value checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub models: ModelAllowlist,
    pub max_request_bytes: u64,
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub requests_per_day: Option<u64>,
    pub tokens_per_day: Option<u64>,
    pub tokens_per_month: Option<u64>,
    /// Micro-dollars per day.
    pub usd_micros_per_day: Option<u64>,
    /// Micro-dollars per billing month.
    pub usd_micros_per_month: Option<u64>,
    pub max_concurrent_requests: Option<u64>,
    pub failure_mode: FailureMode,
    pub billing_anchor_day: u8,
    pub time_zone: Option<String>,
    pub default_max_output_tokens: u64,
    pub clamp_max_output_tokens: bool,
    pub fallback_model: Option<String>,
    /// Per-mille of a budget past which the fallback model is used.
    pub fallback_at_permille: Option<u16>,
    /// Requests' worth of quota a reserve may lease for local admission.
    pub lease_requests: Option<u64>,
}

/// The largest lease: each lease is quota one worker holds back from others.
pub const MAX_LEASE_REQUESTS: u64 = 1000;

/// Default output tokens assumed when neither the request nor the tier says.
pub const DEFAULT_MAX_OUTPUT_TOKENS: u64 = 4096;

macro_rules! merge {
    ($base:expr, $over:expr, $($field:ident),* $(,)?) => {
        TierSpec { $($field: $over.$field.clone().or_else(|| $base.$field.clone()),)* }
    };
}

fn merge_tier(base: &TierSpec, over: &TierSpec) -> TierSpec {
    merge!(
        base,
        over,
        models,
        max_request_bytes,
        requests_per_minute,
        tokens_per_minute,
        requests_per_day,
        tokens_per_day,
        tokens_per_month,
        usd_per_day,
        usd_per_month,
        max_concurrent_requests,
        failure_mode,
        billing_anchor_day,
        time_zone,
        default_max_output_tokens,
        clamp_max_output_tokens,
        fallback_model,
        fallback_at_budget_share,
        lease_requests,
    )
}

fn positive(path: &str, field: &str, v: Option<u64>) -> Result<Option<u64>, ConfigError> {
    match v {
        Some(0) => Err(invalid(
            format!("{path}.{field}"),
            "a limit of 0 would refuse everything; remove the field for no limit or disable the tenant",
        )),
        other => Ok(other),
    }
}

/// Converts a dollar amount to micro-dollars, refusing what cannot be exact.
pub fn usd_to_micros(path: &str, usd: f64) -> Result<u64, ConfigError> {
    if !usd.is_finite() || usd <= 0.0 {
        return Err(invalid(path, "must be a positive number of US dollars"));
    }
    let micros = (usd * 1_000_000.0).round();
    if !(1.0..=1e15).contains(&micros) {
        return Err(invalid(path, "must be between 0.000001 and 1000000000 US dollars"));
    }
    if ((micros / 1_000_000.0) - usd).abs() > 1e-9 * usd.max(1.0) {
        return Err(invalid(path, "at most six decimals (micro-dollars) are supported"));
    }
    Ok(micros as u64)
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

impl TierSpec {
    fn compile(&self, path: &str) -> Result<Policy, ConfigError> {
        let models = match &self.models {
            Some(m) => ModelAllowlist::compile(&format!("{path}.models"), m)?,
            None => return Err(invalid(format!("{path}.models"), "is required")),
        };
        let max_request_bytes = match self.max_request_bytes {
            None => DEFAULT_MAX_REQUEST_BYTES,
            Some(0) => return Err(invalid(format!("{path}.max_request_bytes"), "must be at least 1")),
            Some(n) if n > MAX_REQUEST_BYTES_CEILING => {
                return Err(invalid(
                    format!("{path}.max_request_bytes"),
                    format!("must be at most {MAX_REQUEST_BYTES_CEILING}"),
                ))
            }
            Some(n) => n,
        };
        let usd_micros_per_day = match self.usd_per_day {
            Some(v) => Some(usd_to_micros(&format!("{path}.usd_per_day"), v)?),
            None => None,
        };
        let usd_micros_per_month = match self.usd_per_month {
            Some(v) => Some(usd_to_micros(&format!("{path}.usd_per_month"), v)?),
            None => None,
        };
        let billing_anchor_day = match self.billing_anchor_day {
            None => 1,
            Some(d @ 1..=31) => d,
            Some(_) => return Err(invalid(format!("{path}.billing_anchor_day"), "must be between 1 and 31")),
        };
        if let Some(tz) = &self.time_zone {
            let ok = !tz.is_empty()
                && tz.len() <= 64
                && tz.bytes().all(|b| b.is_ascii_alphanumeric() || b"/_-+".contains(&b));
            if !ok {
                return Err(invalid(
                    format!("{path}.time_zone"),
                    "must be an IANA time zone name such as Europe/Berlin",
                ));
            }
        }
        let default_max_output_tokens = match self.default_max_output_tokens {
            Some(0) => return Err(invalid(format!("{path}.default_max_output_tokens"), "must be at least 1")),
            Some(n) => n,
            None => DEFAULT_MAX_OUTPUT_TOKENS,
        };
        let fallback_at_permille = match self.fallback_at_budget_share {
            None => None,
            Some(s) if s.is_finite() && s > 0.0 && s < 1.0 => Some((s * 1000.0).round() as u16),
            Some(_) => {
                return Err(invalid(
                    format!("{path}.fallback_at_budget_share"),
                    "must be a share strictly between 0 and 1",
                ))
            }
        };
        if fallback_at_permille.is_some() != self.fallback_model.is_some() {
            return Err(invalid(path, "fallback_model and fallback_at_budget_share must be given together"));
        }
        if let Some(fb) = &self.fallback_model {
            if !models.allows(fb) {
                return Err(invalid(
                    format!("{path}.fallback_model"),
                    format!("'{fb}' is not in this tier's model list"),
                ));
            }
        }
        Ok(Policy {
            models,
            max_request_bytes,
            requests_per_minute: positive(path, "requests_per_minute", self.requests_per_minute)?,
            tokens_per_minute: positive(path, "tokens_per_minute", self.tokens_per_minute)?,
            requests_per_day: positive(path, "requests_per_day", self.requests_per_day)?,
            tokens_per_day: positive(path, "tokens_per_day", self.tokens_per_day)?,
            tokens_per_month: positive(path, "tokens_per_month", self.tokens_per_month)?,
            usd_micros_per_day,
            usd_micros_per_month,
            max_concurrent_requests: positive(path, "max_concurrent_requests", self.max_concurrent_requests)?,
            failure_mode: self.failure_mode.unwrap_or(FailureMode::Closed),
            billing_anchor_day,
            time_zone: self.time_zone.clone(),
            default_max_output_tokens,
            clamp_max_output_tokens: self.clamp_max_output_tokens.unwrap_or(false),
            fallback_model: self.fallback_model.clone(),
            fallback_at_permille,
            lease_requests: match self.lease_requests {
                None => None,
                Some(n @ 1..=MAX_LEASE_REQUESTS) => Some(n),
                Some(_) => {
                    return Err(invalid(
                        format!("{path}.lease_requests"),
                        format!("must be between 1 and {MAX_LEASE_REQUESTS}"),
                    ))
                }
            },
        })
    }
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
}

/// A tenant, compiled: its effective policy and resolved provider keys.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: String,
    pub tier: String,
    pub enabled: bool,
    pub policy: Policy,
    /// Provider key per provider index; `None` where the tenant has none.
    pub provider_keys: Vec<Option<String>>,
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
    /// Tenant id -> index into `tenants`.
    id_index: HashMap<String, usize>,
    pub rate_limit: Option<RateLimit>,
    pub pricing: Option<crate::metering::pricing::PriceTable>,
    pub metering: MeteringSpec,
    pub jwt: Option<JwtSlot>,
    pub identity: IdentitySpec,
    /// Headers that carry JWTs or jwt_authn payloads, removed before the
    /// upstream so a client's token never reaches a provider.
    pub jwt_strip_headers: Vec<String>,
}

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
}

impl Policy {
    /// Whether this policy needs the rate-limit service at all.
    pub fn has_limits(&self) -> bool {
        self.requests_per_minute.is_some()
            || self.tokens_per_minute.is_some()
            || self.requests_per_day.is_some()
            || self.tokens_per_day.is_some()
            || self.tokens_per_month.is_some()
            || self.usd_micros_per_day.is_some()
            || self.usd_micros_per_month.is_some()
    }
}

impl Plugin {
    /// The tenant owning a client key, by its digest.
    pub fn tenant_by_key_digest(&self, digest: &[u8; 32]) -> Option<&Tenant> {
        self.key_index.get(digest).and_then(|&i| self.tenants.get(i))
    }

    pub fn tenant_by_id(&self, id: &str) -> Option<&Tenant> {
        self.id_index.get(id).and_then(|&i| self.tenants.get(i))
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
pub fn load(raw: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Plugin, ConfigError> {
    let value = decode_plugin_config(raw)?;
    let config: PluginConfig = serde_json::from_value(value).map_err(|e| ConfigError::Shape(e.to_string()))?;
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
        providers.push(Provider {
            name: name.clone(),
            credential_header: header,
            credential_prefix: prefix,
            inject_stream_usage: p.inject_stream_usage.unwrap_or(config.metering.inject_stream_usage),
        });
    }
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
        routes.push(Route { path: matcher, api: r.api, provider });
    }

    // Tiers: each must compile on its own, so a mistake in an unused tier is
    // still caught.
    if config.tiers.is_empty() {
        return Err(invalid("tiers", "at least one tier is required"));
    }
    for (name, tier) in &config.tiers {
        tier.compile(&format!("tiers.{name}"))?;
    }

    // Tenants.
    let mut tenants = Vec::new();
    let mut key_index = HashMap::new();
    let mut id_index = HashMap::new();
    for (i, t) in config.tenants.iter().enumerate() {
        let path = format!("tenants[{i}]");
        if !valid_id(&t.id) {
            return Err(invalid(format!("{path}.id"), "tenant ids use 1-128 letters, digits, - _ . only"));
        }
        if id_index.insert(t.id.clone(), i).is_some() {
            return Err(invalid(format!("{path}.id"), format!("duplicate tenant id '{}'", t.id)));
        }
        let tier = config
            .tiers
            .get(&t.tier)
            .ok_or_else(|| invalid(format!("{path}.tier"), format!("unknown tier '{}'", t.tier)))?;
        let effective = match &t.overrides {
            Some(over) => merge_tier(tier, over),
            None => tier.clone(),
        };
        let policy = effective.compile(&format!("{path}.overrides"))?;
        for (k, digest) in t.api_key_sha256.iter().enumerate() {
            let kpath = format!("{path}.api_key_sha256[{k}]");
            let bytes = parse_digest(&kpath, digest)?;
            if let Some(prev) = key_index.insert(bytes, i) {
                let owner = config.tenants.get(prev).map(|p| p.id.as_str()).unwrap_or("?");
                return Err(invalid(kpath, format!("duplicate key digest (also a key of tenant '{owner}')")));
            }
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
        tenants.push(Tenant { id: t.id.clone(), tier: t.tier.clone(), enabled: t.enabled, policy, provider_keys });
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
                if let Some(t) = tenants.iter().find(|t| t.policy.lease_requests.is_some()) {
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
    for (i, t) in tenants.iter().enumerate() {
        let path = format!("tenants[{i}] (tier '{}')", t.tier);
        if t.policy.has_limits() && rate_limit.is_none() {
            return Err(invalid(path, "has limits, but no rate_limit section names the rate-limit service cluster"));
        }
        if (t.policy.usd_micros_per_day.is_some() || t.policy.usd_micros_per_month.is_some()) && pricing.is_none() {
            return Err(invalid(path, "has dollar budgets, but there is no pricing table"));
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
        client_key_headers,
        client_key_query_param: (!query.is_empty()).then(|| query.to_string()),
        strip_request_headers,
        request_id_header,
        unmatched_routes: config.unmatched_routes,
        providers,
        routes,
        tenants,
        key_index,
        id_index,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const KEY_A: &str = "sk-tenant-a";
    pub const KEY_B: &str = "sk-tenant-b";
    pub const KEY_OFF: &str = "sk-tenant-off";

    pub fn sha(s: &str) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(s.as_bytes()))
    }

    pub fn sample_json() -> serde_json::Value {
        serde_json::json!({
            "strip_request_headers": ["x-user-id"],
            "rate_limit": {"cluster": "tollgate_rls"},
            "pricing": {
                "models": {"gpt-4o": {"input": 2.5, "cached_input": 1.25, "output": 10.0}},
                "prefix_match": true,
                "default": {"input": 1.0, "output": 4.0}
            },
            "providers": {
                "openai": {"credential_header": "authorization"},
                "anthropic": {"credential_header": "x-api-key"},
                "gemini": {"credential_header": "x-goog-api-key"}
            },
            "routes": [
                {"path": "/v1/chat/completions", "api": "openai_chat", "provider": "openai"},
                {"path": "/v1/messages", "api": "anthropic_messages", "provider": "anthropic"},
                {"path_prefix": "/v1beta/models/", "api": "gemini", "provider": "gemini"}
            ],
            "tiers": {
                "free": {"models": ["gpt-4o-mini", "claude-3-5-haiku*", "gemini-2.0-flash"],
                         "max_request_bytes": 4096, "requests_per_minute": 10},
                "pro": {"models": ["*"], "usd_per_month": 100.5, "failure_mode": "open"}
            },
            "tenants": [
                {"id": "acme", "tier": "pro", "api_key_sha256": [sha(KEY_A)],
                 "provider_key_env": {"openai": "ACME_OPENAI", "anthropic": "ACME_ANTHROPIC",
                                      "gemini": "ACME_GEMINI"}},
                {"id": "globex", "tier": "free", "api_key_sha256": [sha(KEY_B)],
                 "provider_key_env": {"openai": "GLOBEX_OPENAI"},
                 "overrides": {"requests_per_minute": 20}},
                {"id": "initech", "tier": "free", "enabled": false,
                 "api_key_sha256": [sha(KEY_OFF)]}
            ]
        })
    }

    pub fn env(name: &str) -> Option<String> {
        Some(format!("provider-key-for-{name}"))
    }

    pub fn sample() -> Plugin {
        load(sample_json().to_string().as_bytes(), &env).unwrap()
    }

    fn load_err(v: serde_json::Value) -> String {
        load(v.to_string().as_bytes(), &env).unwrap_err().to_string()
    }

    #[test]
    fn sample_compiles_with_overrides_and_defaults() {
        let p = sample();
        let acme = p.tenant_by_id("acme").unwrap();
        assert_eq!(acme.policy.usd_micros_per_month, Some(100_500_000));
        assert_eq!(acme.policy.failure_mode, FailureMode::Open);
        assert_eq!(acme.policy.max_request_bytes, DEFAULT_MAX_REQUEST_BYTES);
        let globex = p.tenant_by_id("globex").unwrap();
        assert_eq!(globex.policy.requests_per_minute, Some(20));
        assert_eq!(globex.policy.max_request_bytes, 4096);
        assert!(globex.policy.models.allows("claude-3-5-haiku-20241022"));
        assert!(!globex.policy.models.allows("gpt-4o"));
        assert_eq!(p.providers.iter().find(|x| x.name == "openai").unwrap().credential_prefix, "Bearer ");
        assert_eq!(p.client_key_query_param.as_deref(), Some("key"));
    }

    #[test]
    fn routes_prefer_exact_then_longest_prefix() {
        let p = sample();
        assert_eq!(p.route_for("/v1/chat/completions?x=1").unwrap().api, Api::OpenaiChat);
        assert_eq!(p.route_for("/v1beta/models/gemini-2.0-flash:generateContent").unwrap().api, Api::Gemini);
        assert!(p.route_for("/v1/chat/completions/extra").is_none());
    }

    #[test]
    fn unknown_field_is_refused() {
        let mut v = sample_json();
        v["tiers"]["free"]["requests_per_minite"] = 5.into();
        let e = load_err(v);
        assert!(e.contains("unknown field `requests_per_minite`"), "{e}");
    }

    #[test]
    fn unknown_tier_is_refused() {
        let mut v = sample_json();
        v["tenants"][0]["tier"] = "platinum".into();
        assert_eq!(load_err(v), "tenants[0].tier: unknown tier 'platinum'");
    }

    #[test]
    fn duplicate_digest_is_refused() {
        let mut v = sample_json();
        v["tenants"][1]["api_key_sha256"] = serde_json::json!([sha(KEY_A)]);
        let e = load_err(v);
        assert!(e.starts_with("tenants[1].api_key_sha256[0]: duplicate key digest"), "{e}");
        assert!(e.contains("acme"), "{e}");
    }

    #[test]
    fn plain_key_instead_of_digest_is_refused() {
        let mut v = sample_json();
        v["tenants"][1]["api_key_sha256"] = serde_json::json!(["sk-live-123"]);
        assert!(load_err(v).contains("SHA-256 digest"));
    }

    #[test]
    fn missing_env_var_is_refused() {
        let v = sample_json();
        let e = load(v.to_string().as_bytes(), &|name| (name != "GLOBEX_OPENAI").then(|| "k".to_string()))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("tenants[1].provider_key_env.openai: environment variable 'GLOBEX_OPENAI'"), "{e}");
    }

    #[test]
    fn empty_model_list_and_zero_limit_are_refused() {
        let mut v = sample_json();
        v["tiers"]["free"]["models"] = serde_json::json!([]);
        assert!(load_err(v).starts_with("tiers.free.models: the model list is empty"));
        let mut v = sample_json();
        v["tiers"]["pro"]["tokens_per_day"] = 0.into();
        assert!(load_err(v).starts_with("tiers.pro.tokens_per_day: a limit of 0"));
        let mut v = sample_json();
        v["tenants"][1]["overrides"]["requests_per_minute"] = 0.into();
        assert!(load_err(v).starts_with("tenants[1].overrides.requests_per_minute"));
    }

    #[test]
    fn filter_state_fields_are_checked() {
        let mut v = sample_json();
        v["metering"] = serde_json::json!({"filter_state": ["tenant", "cost_usd"]});
        let p = load(v.to_string().as_bytes(), &env).unwrap();
        assert_eq!(p.metering.filter_state.as_deref(), Some(&["tenant".to_string(), "cost_usd".to_string()][..]));
        v["metering"] = serde_json::json!({"filter_state": ["tenant", "cost"]});
        let e = load_err(v);
        assert!(e.starts_with("metering.filter_state[1]") && e.contains("unknown field 'cost'"), "{e}");
    }

    #[test]
    fn leases_need_the_reserve_mode() {
        let mut v = sample_json();
        v["tiers"]["pro"]["lease_requests"] = 20.into();
        assert_eq!(load(v.to_string().as_bytes(), &env).unwrap().rate_limit.unwrap().lease_ms, 1000);
        v["rate_limit"]["mode"] = "check_then_charge".into();
        assert!(load_err(v.clone()).contains("lease_requests: quota leases need the reserve mode"));
        v["rate_limit"]["mode"] = "reserve".into();
        v["rate_limit"]["lease_ms"] = 5.into();
        assert!(load_err(v).starts_with("rate_limit.lease_ms"));
    }

    #[test]
    fn bad_values_are_refused() {
        for (field, value, needle) in [
            ("usd_per_day", serde_json::json!(-1.0), "usd_per_day"),
            ("usd_per_day", serde_json::json!(0.0000001), "usd_per_day"),
            ("billing_anchor_day", serde_json::json!(32), "billing_anchor_day"),
            ("max_request_bytes", serde_json::json!(1u64 << 40), "max_request_bytes"),
            ("time_zone", serde_json::json!("Not a zone!"), "time_zone"),
            ("failure_mode", serde_json::json!("sometimes"), "unknown variant"),
            ("lease_requests", serde_json::json!(0), "lease_requests: must be between 1 and 1000"),
            ("lease_requests", serde_json::json!(5000), "lease_requests: must be between 1 and 1000"),
        ] {
            let mut v = sample_json();
            v["tiers"]["pro"][field] = value;
            let e = load_err(v);
            assert!(e.contains(needle), "{field}: {e}");
        }
    }

    #[test]
    fn route_to_unknown_provider_is_refused() {
        let mut v = sample_json();
        v["routes"][0]["provider"] = "azure".into();
        assert_eq!(load_err(v), "routes[0].provider: unknown provider 'azure'");
    }

    #[test]
    fn limits_need_the_service_and_dollars_need_prices() {
        let mut v = sample_json();
        v.as_object_mut().unwrap().remove("rate_limit");
        assert!(load_err(v).contains("no rate_limit section"));
        let mut v = sample_json();
        v.as_object_mut().unwrap().remove("pricing");
        assert!(load_err(v).contains("no pricing table"));
        let mut v = sample_json();
        v["rate_limit"]["timeout_ms"] = 0.into();
        assert!(load_err(v).starts_with("rate_limit.timeout_ms"));
    }

    #[test]
    fn fallback_model_must_be_allowed() {
        let mut v = sample_json();
        v["tiers"]["free"]["fallback_model"] = "gpt-4o".into();
        v["tiers"]["free"]["fallback_at_budget_share"] = 0.8.into();
        assert!(load_err(v).contains("fallback_model"));
    }

    #[test]
    fn empty_and_garbage_configs_are_refused() {
        assert!(matches!(load(b"", &env), Err(ConfigError::Encoding(_))));
        assert!(matches!(load(b"{not json", &env), Err(ConfigError::Shape(_))));
        assert!(matches!(load(b"\xff\xfe\x00", &env), Err(ConfigError::Encoding(_))));
    }
}
