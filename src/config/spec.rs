//! What may an operator write in the plugin configuration?
//!
//! The serde shapes of the JSON an operator writes, their defaults and
//! documentation. Every struct refuses unknown fields, so a typo is an error
//! rather than a silently ignored setting. Meaning is checked later, by
//! [`compile()`](super::compile()).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::llm::Api;

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
    /// JWT identity verified by tollgate itself (see `src/identity/jwt/`).
    #[serde(default)]
    pub jwt: Option<crate::identity::jwt::JwtConfig>,
    /// Which identities are accepted, and trust in Envoy's `jwt_authn`.
    #[serde(default)]
    pub identity: IdentitySpec,
    /// The tenant registry of the rate-limit service: tenants, keys and
    /// provider credentials managed at runtime. Asked only for what
    /// `tenants` does not know (the static configuration wins).
    #[serde(default)]
    pub registry: Option<RegistrySpec>,
    /// Shared provider pools: the provider's own rate limits for a
    /// deployment and its models, shared by every tenant, with per-tier
    /// shares (see `docs/limits-and-leases.md`).
    #[serde(default)]
    pub pools: Vec<PoolSpec>,
    /// The circuit breaker of provider targets (providers with `targets`):
    /// when a target counts as down, and for how long.
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerSpec,
}

/// When a provider target's circuit opens, and for how long (see
/// `docs/failover.md`). Applies to the providers named in some provider's
/// `targets`; the circuit is shared by every worker of an Envoy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerSpec {
    /// Consecutive 5xx answers or timeouts that open a target's circuit.
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// How long a circuit first stays open; each failed half-open probe
    /// doubles it, up to `max_open_seconds`.
    #[serde(default = "default_open_seconds")]
    pub open_seconds: u64,
    #[serde(default = "default_max_open_seconds")]
    pub max_open_seconds: u64,
    /// The longest a provider's `retry-after` on a 429 is honoured for.
    #[serde(default = "default_max_retry_after_seconds")]
    pub max_retry_after_seconds: u64,
    /// A half-open probe with no answer (response headers) after this long
    /// frees the turn for another, and its late answer is ignored. A request
    /// sent to a target whose caller gave up after waiting this long with no
    /// answer counts as a timeout of the target.
    #[serde(default = "default_probe_timeout_seconds")]
    pub probe_timeout_seconds: u64,
}

impl Default for CircuitBreakerSpec {
    fn default() -> Self {
        CircuitBreakerSpec {
            consecutive_failures: default_consecutive_failures(),
            open_seconds: default_open_seconds(),
            max_open_seconds: default_max_open_seconds(),
            max_retry_after_seconds: default_max_retry_after_seconds(),
            probe_timeout_seconds: default_probe_timeout_seconds(),
        }
    }
}

fn default_consecutive_failures() -> u32 {
    5
}
fn default_open_seconds() -> u64 {
    10
}
fn default_max_open_seconds() -> u64 {
    300
}
fn default_max_retry_after_seconds() -> u64 {
    300
}
fn default_probe_timeout_seconds() -> u64 {
    120
}

/// A shared provider pool: what the provider allows the platform's one
/// account (its requests and tokens per minute for some models), so that
/// the sum of all tenants' traffic stays under it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    /// Letters, digits, `-`, `_` and `.`; used in limit keys and refusals.
    pub name: String,
    /// Name of an entry in `providers`: the pool counts requests routed there.
    pub provider: String,
    /// Models the pool counts (exact ids, `prefix*` or `*`), by the model
    /// served. A request counts in the first pool that matches.
    pub models: Vec<String>,
    /// The pool's limits: rates only (per minute or hour), as providers
    /// enforce them.
    pub limits: LimitsSpec,
    /// Tier name to the share (0 < s <= 1) of every pool limit the tier's
    /// tenants may use together: free tenants cannot take the capacity
    /// enterprise tenants need.
    #[serde(default)]
    pub tier_shares: BTreeMap<String, f64>,
}

/// A client API key with a name, its own limits or model list.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    /// The key's name within its tenant (letters, digits, `-`, `_`, `.`).
    pub id: String,
    /// SHA-256 digest (hex) of the key.
    pub sha256: String,
    /// Models this key may call, within the tier's list.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// The key's own limits and budgets, checked with the tenant's.
    #[serde(default)]
    pub limits: Option<LimitsSpec>,
    /// Evaluate limits for this key's requests without refusing.
    #[serde(default)]
    pub shadow: Option<bool>,
}

/// Where and how the filter asks the tenant registry (see `docs/registry.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySpec {
    /// Envoy cluster of the service's registry port (`--registry-addr`).
    pub cluster: String,
    /// `:authority` of the lookups (default: the cluster name).
    #[serde(default)]
    pub authority: Option<String>,
    /// How long a request waits for a lookup, 1-5000 ms (default 500). After
    /// it the request gets 503 `tenant_lookup_unavailable`.
    #[serde(default = "default_registry_timeout_ms")]
    pub timeout_ms: u64,
    /// How often each worker asks for changes, 100-10000 ms (default 1000).
    /// A revocation, tier change or credential rotation lands within this
    /// period plus one round trip.
    #[serde(default = "default_registry_poll_ms")]
    pub poll_ms: u64,
    /// How long cached tenants and keys keep working while the registry
    /// cannot be reached, 0-86400 s (default 300). Changes made meanwhile
    /// land when it answers again.
    #[serde(default = "default_registry_grace_s")]
    pub grace_s: u64,
    /// How long a worker remembers that a key or tenant is unknown,
    /// 0-600000 ms (default 10000). A key issued meanwhile is forgotten from
    /// this cache by the next poll.
    #[serde(default = "default_registry_negative_ttl_ms")]
    pub negative_ttl_ms: u64,
    /// Lookups in flight at once per worker, 1-1024 (default 32). Requests
    /// needing a lookup beyond it get 503 `tenant_lookup_unavailable`: a
    /// flood of random keys cannot flood the service.
    #[serde(default = "default_registry_max_lookups")]
    pub max_lookups_in_flight: u64,
    /// Keys (and, separately, tenants and unknown answers) cached per
    /// worker, 1-10000000 (default 100000); a full cache is emptied.
    #[serde(default = "default_registry_max_cached")]
    pub max_cached: usize,
}

fn default_registry_timeout_ms() -> u64 {
    500
}
fn default_registry_poll_ms() -> u64 {
    1000
}
fn default_registry_grace_s() -> u64 {
    300
}
fn default_registry_negative_ttl_ms() -> u64 {
    10_000
}
fn default_registry_max_lookups() -> u64 {
    32
}
fn default_registry_max_cached() -> usize {
    100_000
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
    /// Request header carrying the end user's id, set by the platform's own
    /// backend. Read only on routes with `trust_end_user_header`; elsewhere a
    /// client's value is removed and ignored. A verified JWT's user claim
    /// wins over it.
    #[serde(default)]
    pub end_user_header: Option<String>,
}

impl Default for IdentitySpec {
    fn default() -> Self {
        IdentitySpec { api_keys: true, jwt_authn: None, end_user_header: None }
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
    /// Send every finished or refused request's usage to the service's
    /// usage ledger with the settles (`x-tollgate-usage`; see
    /// `docs/ledger.md`). Default: on in the reserve mode, off (and refused)
    /// with `check_then_charge`.
    #[serde(default)]
    pub ledger: Option<bool>,
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
    /// The `tenant` label of per-tenant metrics. Every distinct label value
    /// is a set of stats Envoy keeps for its lifetime (about 6 series per
    /// tenant and model), so at many tenants per-tenant series cost memory
    /// and make scrapes unusable; per-tenant billing truth is the access
    /// log. `auto` (default): per tenant up to [`AUTO_TENANT_LABEL_MAX`]
    /// tenants in the configuration, by tier above; `tenant`; `tier`
    /// (`tier-<name>`); `none` (`all`); or `{"only": [ids]}`: the listed
    /// tenants by id, every other one as `other`.
    #[serde(default)]
    pub tenant_label: TenantLabelSpec,
}

/// Above this many tenants, `metering.tenant_label: auto` labels by tier.
pub const AUTO_TENANT_LABEL_MAX: usize = 1000;

/// How per-tenant metrics are labelled (see [`MeteringSpec::tenant_label`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TenantLabelSpec {
    #[default]
    Auto,
    Tenant,
    Tier,
    None,
    Only(Vec<String>),
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
    "error",
    "limit",
    "key",
    "shadow_refusal",
    "service_tier",
    "unmetered",
];

impl Default for MeteringSpec {
    fn default() -> Self {
        MeteringSpec {
            bytes_per_token: default_bytes_per_token(),
            usage_headers: true,
            stream_usage_comment: false,
            inject_stream_usage: true,
            filter_state: None,
            tenant_label: TenantLabelSpec::Auto,
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
    /// Failover: the providers (entries of `providers`, this one included
    /// when it serves too) that serve this provider's routes. Each request
    /// goes to one target, skipping those whose circuit is open or that the
    /// tenant holds no key for; Envoy routes it by the `x-tollgate-provider`
    /// header, which carries the target's name (see `docs/failover.md`).
    #[serde(default)]
    pub targets: Vec<TargetSpec>,
    /// How a target is chosen among the available ones: `order` (the first
    /// available in the list) or `weighted` (spread by `weight`, skipping
    /// unavailable ones).
    #[serde(default)]
    pub selection: TargetSelection,
    /// Model names this provider knows by another name: for Azure OpenAI,
    /// the requested model to the deployment name written into the body.
    /// Prices, pools and metrics keep the requested name.
    #[serde(default)]
    pub model_map: BTreeMap<String, String>,
    /// Whom a 429 from this provider pauses, for its `retry-after`:
    /// `credential` (only the key that got it; tenants with their own keys
    /// keep the target) or `target` (everyone: a quota shared by every key).
    #[serde(default)]
    pub rate_limited_scope: RateLimitedScopeSpec,
}

/// One target of a provider with failover.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    /// Name of an entry in `providers` (its credential header, its tenants'
    /// keys, its `model_map`); it must not have targets of its own.
    pub provider: String,
    /// Share of requests with `selection: weighted` (default 1).
    #[serde(default)]
    pub weight: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetSelection {
    #[default]
    Order,
    Weighted,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitedScopeSpec {
    #[default]
    Credential,
    Target,
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
    /// Believe `identity.end_user_header` on this route (only where the
    /// platform's backend, not an end client, sets it).
    #[serde(default)]
    pub trust_end_user_header: bool,
}

pub use rls_contract::registry::{FailureMode, LimitsSpec, TierSpec};

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
    /// Named client keys, each with its own limits or model list. (Boxed:
    /// most tenants have none, and 100k tenants are parsed at once.)
    #[serde(default)]
    pub keys: Option<Box<Vec<KeySpec>>>,
    /// Per provider, the name of the environment variable holding this
    /// tenant's provider API key. Envoy passes it to the VM through
    /// `vm_config.environment_variables.host_env_keys`, so the secret never
    /// appears in the config dump.
    /// (Read as pairs sorted by provider, not a tree: a tenant's entry costs
    /// what it holds, which matters at 100k tenants; a provider named twice is
    /// refused.)
    #[serde(default, deserialize_with = "provider_pairs")]
    pub provider_key_env: Vec<(String, String)>,
    /// Tier fields this tenant overrides (boxed: most tenants have none).
    #[serde(default)]
    pub overrides: Option<Box<TierSpec>>,
}

/// A JSON object of provider name to variable name, as sorted pairs.
fn provider_pairs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
    struct Pairs;
    impl<'de> serde::de::Visitor<'de> for Pairs {
        type Value = Vec<(String, String)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object of provider name to environment variable name")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out: Vec<(String, String)> = Vec::with_capacity(map.size_hint().unwrap_or(1).min(16));
            while let Some((provider, var)) = map.next_entry::<String, String>()? {
                if out.iter().any(|(p, _)| *p == provider) {
                    return Err(serde::de::Error::custom(format!("provider '{provider}' is named twice")));
                }
                out.push((provider, var));
            }
            out.sort();
            Ok(out)
        }
    }
    d.deserialize_map(Pairs)
}

fn default_true() -> bool {
    true
}
