//! What do filter and service say about tenants managed at runtime?
//!
//! The tenant registry lives in the rate-limit service (Redis-backed, managed
//! through its admin API). The filter asks it, over plain HTTP/1.1 GETs with
//! JSON answers on the service's registry port, only for what its static
//! configuration does not know:
//!
//! - [`key_path`]: a client key's SHA-256 digest (lowercase hex) not in the
//!   static config → the key, its tenant and (on request) the tenant's
//!   provider credentials;
//! - [`tenant_path`]: a JWT's tenant id not in the static config → the tenant
//!   (and credentials);
//! - [`changes_path`]: what changed since a registry version, polled on the
//!   filter's tick so that revocations, tier changes and credential rotations
//!   land within a poll period.
//!
//! Every answer is `200` with a JSON body ([`LookupAnswer`] or [`Changes`]);
//! "not found" is an answer, not an error. Any other status, a timeout or a
//! body that does not parse means "the registry is unavailable".
//!
//! Versions: every change to the registry increments one counter (the
//! registry version) and is recorded with it. A lookup answer carries the
//! version read *before* its records, so a record is at least as new as its
//! version. A filter never trusts a record older than a change it has seen.
//!
//! The registry port carries provider credentials in clear: expose it to the
//! gateways only (as the RLS port), over loopback, a private network or mTLS.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Path of a key lookup; `credentials` asks for the tenant's provider keys.
pub fn key_path(sha256_hex: &str, credentials: bool) -> String {
    format!("/v1/registry/keys/{sha256_hex}{}", if credentials { "?credentials=true" } else { "" })
}

/// Path of a tenant lookup by id.
pub fn tenant_path(tenant_id: &str, credentials: bool) -> String {
    format!("/v1/registry/tenants/{tenant_id}{}", if credentials { "?credentials=true" } else { "" })
}

/// Path of the change feed after `since`.
pub fn changes_path(since: u64) -> String {
    format!("/v1/registry/changes?since={since}")
}

/// Most changes one [`Changes`] answer lists; beyond it the answer is a reset.
pub const MAX_CHANGES_PER_ANSWER: usize = 1000;

/// Longest tenant id.
pub const MAX_TENANT_ID_LEN: usize = 128;

/// A tenant id: 1..=128 of letters, digits, `-`, `_` and `.` (the same rule
/// as the static configuration), so it is safe in paths, Redis keys,
/// metrics and descriptor values.
pub fn valid_tenant_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_TENANT_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A key digest: 64 lowercase hex characters (SHA-256 of the key's bytes).
pub fn valid_key_digest(d: &str) -> bool {
    d.len() == 64 && d.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A provider name: 1..=64 of lowercase letters, digits, `-` and `_`.
pub fn valid_provider(p: &str) -> bool {
    !p.is_empty() && p.len() <= 64 && p.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_'))
}

/// What a lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LookupStatus {
    /// The tenant (and the key, for a key lookup) exist.
    Found,
    /// No such key digest.
    UnknownKey,
    /// No such tenant (or the key's tenant was deleted).
    UnknownTenant,
}

/// The answer to a key or tenant lookup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupAnswer {
    /// The registry version read before the records.
    pub version: u64,
    pub status: LookupStatus,
    /// Present when `status` is `found`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<TenantRecord>,
    /// Present for a found key lookup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<KeyRecord>,
    /// Provider name → the tenant's provider API key, in clear. Present only
    /// when asked for (`?credentials=true`) and the tenant was found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<BTreeMap<String, String>>,
}

/// A tenant as the filter needs it (never its credentials).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantRecord {
    pub id: String,
    /// Name of a tier of the filter's plugin configuration.
    pub tier: String,
    /// A disabled tenant's requests get 403.
    pub enabled: bool,
    /// Tier fields this tenant overrides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overrides: Option<TierSpec>,
}

/// A client API key, by digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    /// SHA-256 of the key, lowercase hex.
    pub sha256: String,
    pub tenant: String,
    /// Unix seconds after which the key is refused (401).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// A revoked key is refused (401).
    pub revoked: bool,
    /// Models this key may call (within the tenant's tier); absent: all the
    /// tier allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    /// The key's name within its tenant (letters, digits, `-`, `_`, `.`),
    /// used in limit keys, the usage ledger and logs. Required for `limits`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The key's own limits and budgets, checked with the tenant's.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "object_or_null")]
    pub limits: Option<LimitsSpec>,
    /// Evaluate the key's (and its tenant's) limits without refusing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<bool>,
}

/// A struct read from a JSON object only: serde's derive also takes an array
/// of the fields in order, which no operator means.
pub struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData)).map(Object)
    }
}

/// An optional struct field: an object, or `null` / absent for none.
pub fn object_or_null<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    Option::<Object<T>>::deserialize(d).map(|o| o.map(|Object(t)| t))
}

/// Limits of one level (an API key, each end user, a provider pool). Every
/// limit is optional: absent means not limited.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    /// Input plus output tokens per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_hour: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_hour: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_day: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_day: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_week: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_month: Option<u64>,
    /// US dollars (up to six decimals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usd_per_day: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usd_per_week: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usd_per_month: Option<f64>,
}

/// What changed after a version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Changes {
    /// The registry version now; the next poll asks `since` it.
    pub version: u64,
    /// The changes since cannot be listed (too many, too old, or the registry
    /// version went back): drop everything cached from the registry.
    pub reset: bool,
    /// Tenants whose record or credentials changed.
    #[serde(default)]
    pub tenants: Vec<String>,
    /// Key digests whose record changed (issued, revoked, expiry, deleted).
    #[serde(default)]
    pub keys: Vec<String>,
}

/// What happens when the rate-limit service cannot answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierSpec {
    /// Models this tier may call: exact ids, or prefixes ending in `*`
    /// (`gpt-4o*`), or `*` for any model. Must not be empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    /// Largest request body accepted, in bytes (default 1 MiB, at most
    /// 64 MiB). Larger bodies get 413.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_bytes: Option<u64>,
    /// Requests per minute (smooth rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    /// Tokens (input + output) per minute (smooth rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    /// Requests per calendar day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_day: Option<u64>,
    /// Tokens per calendar day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_day: Option<u64>,
    /// Tokens per billing month.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_month: Option<u64>,
    /// US dollars per calendar day (up to six decimals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usd_per_day: Option<f64>,
    /// US dollars per billing month (up to six decimals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usd_per_month: Option<f64>,
    /// Input tokens per minute (smooth rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens_per_minute: Option<u64>,
    /// Output tokens per minute (smooth rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens_per_minute: Option<u64>,
    /// Requests per hour (smooth rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_hour: Option<u64>,
    /// Tokens per hour (smooth rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_hour: Option<u64>,
    /// Tokens per calendar week (from Monday 00:00 in `time_zone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_week: Option<u64>,
    /// US dollars per calendar week (up to six decimals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usd_per_week: Option<f64>,
    /// Limits of every end user of a tenant of this tier, each counted on
    /// its own (within the tenant's limits).
    /// (Boxed: a tenant's overrides rarely set it, and 100k of them are
    /// parsed at once.)
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "object_or_null")]
    pub users: Option<Box<LimitsSpec>>,
    /// Shadow mode: every limit is evaluated and counted, but nothing is
    /// refused; a request that would have been refused is marked in the
    /// access log, the metrics and `x-tollgate-shadow-refusal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<bool>,
    /// Budget alert thresholds, as shares of each dollar and token budget
    /// at every level (default `[0.5, 0.8, 1.0]`; `[]` for none): the
    /// service emits one event per threshold crossed in a window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert_thresholds: Option<Vec<f64>>,
    /// Weight (0-1) of cached-read input tokens in token limits (default 1:
    /// every token counts, as OpenAI's token rate limits do).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_read_token_weight: Option<f64>,
    /// Requests in flight at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests: Option<u64>,
    /// `closed` (default) or `open` when the rate-limit service is down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_mode: Option<FailureMode>,
    /// Day of the month (1-31) the billing month renews. Day 31 renews on the
    /// last day of shorter months. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub billing_anchor_day: Option<u8>,
    /// IANA time zone of days and billing months (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// Output tokens assumed when a request sets no maximum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_max_output_tokens: Option<u64>,
    /// Lower a request's max output tokens to what the budget still allows
    /// instead of refusing it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clamp_max_output_tokens: Option<bool>,
    /// Let WebSocket upgrades (OpenAI Responses WebSocket mode, Realtime)
    /// through on metered routes. Their traffic cannot be metered: each is
    /// counted as one request against request limits, charged no tokens or
    /// dollars, and flagged `unmetered` in the access log. Default false:
    /// they are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_websocket: Option<bool>,
    /// Model to serve instead of the requested one once
    /// `fallback_at_budget_share` of a budget is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_model: Option<String>,
    /// Quota leasing: when the last answer showed ample room, one reserve
    /// call also reserves this many more requests' worth (requests, tokens and
    /// dollars, sized by the current request's estimate) for this worker to
    /// admit locally, without a call, for up to `rate_limit.lease_ms`.
    /// Unused quota is refunded. Absent: sized automatically from the
    /// worker's recent request rate for the same tenant, key, user and pool
    /// (no lease below 4 requests per lease period); `0`: off (one call per
    /// request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_requests: Option<u64>,
    /// Share of a budget (0 < share < 1) past which `fallback_model` is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_at_budget_share: Option<f64>,
    /// Failover targets for this tier's tenants, by the provider a route
    /// names: `{"openai": ["azure-dedicated", "openai"]}` tries those provider
    /// entries in order, in place of the provider's own `targets`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_targets: Option<std::collections::BTreeMap<String, Vec<String>>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_digests_and_providers_are_checked() {
        assert!(valid_tenant_id("acme-1.eu_west"));
        assert!(!valid_tenant_id(""));
        assert!(!valid_tenant_id("a/b"));
        assert!(!valid_tenant_id(&"a".repeat(129)));
        assert!(valid_key_digest(&"ab".repeat(32)));
        assert!(!valid_key_digest(&"AB".repeat(32)));
        assert!(!valid_key_digest("abc"));
        assert!(valid_provider("openai"));
        assert!(!valid_provider("Open AI"));
    }

    #[test]
    fn answers_round_trip_and_refuse_unknown_fields() {
        let a = LookupAnswer {
            version: 7,
            status: LookupStatus::Found,
            tenant: Some(TenantRecord {
                id: "acme".into(),
                tier: "pro".into(),
                enabled: true,
                overrides: Some(TierSpec { requests_per_minute: Some(5), ..TierSpec::default() }),
            }),
            key: None,
            credentials: None,
        };
        let text = serde_json::to_string(&a).unwrap();
        assert_eq!(
            text,
            r#"{"version":7,"status":"found","tenant":{"id":"acme","tier":"pro","enabled":true,"overrides":{"requests_per_minute":5}}}"#
        );
        assert_eq!(serde_json::from_str::<LookupAnswer>(&text).unwrap(), a);
        assert!(serde_json::from_str::<LookupAnswer>(r#"{"version":1,"status":"found","extra":1}"#).is_err());
        assert_eq!(key_path("ab", true), "/v1/registry/keys/ab?credentials=true");
        assert_eq!(changes_path(3), "/v1/registry/changes?since=3");
    }
}
