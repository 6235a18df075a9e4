//! What does the registry store and accept? Stored records, admin request
//! bodies, and the checks on every field (pure, no I/O).

use std::collections::BTreeMap;

// Structs are read from JSON objects only (serde's derive also takes an
// array of the fields in order, which no client means): the contract's
// `Object` and `object_or_null`.
use rls_contract::registry::{
    object_or_null, valid_key_digest, valid_provider, valid_tenant_id, KeyRecord, LimitsSpec, Object as Obj,
    TenantRecord, TierSpec,
};
use serde::{Deserialize, Deserializer, Serialize};

/// Most labels on one tenant.
pub const MAX_LABELS: usize = 32;
/// Longest label key (bytes) / label value / tier name / key label (characters).
pub const MAX_LABEL_KEY_LEN: usize = 63;
pub const MAX_LABEL_VALUE_LEN: usize = 256;
pub const MAX_TIER_LEN: usize = 128;
pub const MAX_KEY_LABEL_LEN: usize = 128;
/// Most models on one key, and the longest model name.
pub const MAX_MODELS: usize = 256;
pub const MAX_MODEL_LEN: usize = 256;
/// Longest provider secret (visible ASCII).
pub const MAX_SECRET_LEN: usize = 4096;
/// Latest accepted `expires_at` (2^53 - 1: exact in every JSON reader).
pub const MAX_EXPIRES_AT: u64 = (1 << 53) - 1;

/// A bad field in a request: which one, and why (never its value: it may be a secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        Self { field: field.to_owned(), message: message.into() }
    }
}

/// A tenant as stored in Redis (JSON) and shown by the admin API (plus its credentials).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    pub id: String,
    pub tier: String,
    pub enabled: bool,
    pub overrides: Option<TierSpec>,
    pub labels: BTreeMap<String, String>,
    /// Unix seconds.
    pub created_at: u64,
    pub updated_at: u64,
}

impl Tenant {
    pub fn record(&self) -> TenantRecord {
        TenantRecord {
            id: self.id.clone(),
            tier: self.tier.clone(),
            enabled: self.enabled,
            overrides: self.overrides.clone(),
        }
    }
}

/// A client key as stored (by digest only) and shown by the admin API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    pub sha256: String,
    pub tenant: String,
    pub label: String,
    pub created_at: u64,
    pub expires_at: Option<u64>,
    pub revoked: bool,
    pub models: Option<Vec<String>>,
    /// The key's name within its tenant (limit keys, the usage ledger).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The key's own limits and budgets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsSpec>,
    /// Evaluate limits without refusing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<bool>,
}

impl ApiKey {
    pub fn record(&self) -> KeyRecord {
        KeyRecord {
            sha256: self.sha256.clone(),
            tenant: self.tenant.clone(),
            expires_at: self.expires_at,
            revoked: self.revoked,
            models: self.models.clone(),
            id: self.name.clone(),
            limits: self.limits.clone(),
            shadow: self.shadow,
        }
    }
}

/// A provider credential as stored: sealed, with the id of the key that sealed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredCredential {
    /// `v1.<kid>.<nonce>.<ciphertext>` (see `crypto`).
    pub sealed: String,
    pub kid: String,
    pub updated_at: u64,
}

/// What the admin API shows of a credential: never the secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CredentialInfo {
    pub provider: String,
    pub kid: String,
    pub updated_at: u64,
}

/// `POST /v1/tenants`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    pub id: String,
    pub tier: String,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `null` as absent: no overrides.
    #[serde(default, deserialize_with = "overrides")]
    pub overrides: Option<TierSpec>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

/// Absent → `None`; `null` → `Some(None)`; a value → `Some(Some(v))`.
fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// Overrides: an object, or `null` / absent for none.
fn overrides<'de, D: Deserializer<'de>>(d: D) -> Result<Option<TierSpec>, D::Error> {
    object_or_null(d)
}

/// Overrides in a patch: absent → `None`; `null` → `Some(None)` (clear); an object → `Some(Some(_))`.
fn patch_overrides<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<TierSpec>>, D::Error> {
    overrides(d).map(Some)
}

/// Absent → `None`; a value → `Some(v)`; `null` is refused (it is not a value
/// of this field; only the fields documented as nullable take it).
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// Absent → `None`; an object → `Some(v)`; `null` and arrays are refused.
fn present_object<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Obj::<T>::deserialize(d).map(|Obj(t)| Some(t))
}

/// Absent → `None`; `null` → `Some(None)`; an object → `Some(Some(v))`.
fn nullable_object<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    object_or_null(d).map(Some)
}

/// `PATCH /v1/tenants/{id}`: absent fields stay as they are.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchTenant {
    #[serde(default, deserialize_with = "present")]
    pub tier: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub enabled: Option<bool>,
    /// `null` clears the overrides.
    #[serde(default, deserialize_with = "patch_overrides")]
    pub overrides: Option<Option<TierSpec>>,
    #[serde(default, deserialize_with = "present")]
    pub labels: Option<BTreeMap<String, String>>,
}

/// `POST /v1/tenants/{id}/keys` (issue) and `.../keys/import` (with `sha256`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueKey {
    pub label: String,
    #[serde(default, deserialize_with = "present")]
    pub expires_at: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    pub models: Option<Vec<String>>,
    #[serde(default, deserialize_with = "present")]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "present_object")]
    pub limits: Option<LimitsSpec>,
    #[serde(default, deserialize_with = "present")]
    pub shadow: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportKey {
    pub sha256: String,
    pub label: String,
    #[serde(default, deserialize_with = "present")]
    pub expires_at: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    pub models: Option<Vec<String>>,
    #[serde(default, deserialize_with = "present")]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "present_object")]
    pub limits: Option<LimitsSpec>,
    #[serde(default, deserialize_with = "present")]
    pub shadow: Option<bool>,
}

/// `PATCH /v1/keys/{sha256}`: `null` clears `expires_at` / `models`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchKey {
    #[serde(default, deserialize_with = "present")]
    pub label: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub expires_at: Option<Option<u64>>,
    #[serde(default, deserialize_with = "nullable")]
    pub models: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "nullable")]
    pub name: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable_object")]
    pub limits: Option<Option<LimitsSpec>>,
    #[serde(default, deserialize_with = "nullable")]
    pub shadow: Option<Option<bool>>,
}

/// `PUT /v1/tenants/{id}/credentials/{provider}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetCredential {
    pub secret: String,
}

// Debug must never show the secret.
impl std::fmt::Debug for SetCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetCredential").field("secret", &"<redacted>").finish()
    }
}

pub fn check_tenant_id(field: &str, id: &str) -> Result<(), FieldError> {
    if valid_tenant_id(id) {
        Ok(())
    } else {
        Err(FieldError::new(field, "must be 1..=128 of letters, digits, '-', '_', '.'"))
    }
}

pub fn check_digest(field: &str, d: &str) -> Result<(), FieldError> {
    if valid_key_digest(d) {
        Ok(())
    } else {
        Err(FieldError::new(field, "must be a SHA-256 digest: 64 lowercase hex characters"))
    }
}

pub fn check_provider(field: &str, p: &str) -> Result<(), FieldError> {
    if valid_provider(p) {
        Ok(())
    } else {
        Err(FieldError::new(field, "must be 1..=64 of lowercase letters, digits, '-', '_'"))
    }
}

fn printable(s: &str) -> bool {
    !s.chars().any(char::is_control)
}

pub fn check_tier(tier: &str) -> Result<(), FieldError> {
    if tier.is_empty() || tier.chars().count() > MAX_TIER_LEN || !printable(tier) || tier.trim() != tier {
        return Err(FieldError::new("tier", "must be 1..=128 characters, no control characters or outer spaces"));
    }
    Ok(())
}

pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), FieldError> {
    if labels.len() > MAX_LABELS {
        return Err(FieldError::new("labels", format!("at most {MAX_LABELS} labels")));
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= MAX_LABEL_KEY_LEN
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
        if !key_ok {
            return Err(FieldError::new("labels", "keys must be 1..=63 of letters, digits, '-', '_', '.', '/'"));
        }
        if v.chars().count() > MAX_LABEL_VALUE_LEN || !printable(v) {
            return Err(FieldError::new("labels", "values must be at most 256 characters, no control characters"));
        }
    }
    Ok(())
}

pub fn check_key_label(label: &str) -> Result<(), FieldError> {
    if label.is_empty() || label.chars().count() > MAX_KEY_LABEL_LEN || !printable(label) {
        return Err(FieldError::new("label", "must be 1..=128 characters, no control characters"));
    }
    Ok(())
}

pub fn check_expires_at(expires_at: Option<u64>) -> Result<(), FieldError> {
    match expires_at {
        Some(0) => Err(FieldError::new("expires_at", "must be unix seconds > 0")),
        Some(t) if t > MAX_EXPIRES_AT => Err(FieldError::new("expires_at", "must be at most 2^53-1")),
        _ => Ok(()),
    }
}

pub fn check_models(models: Option<&[String]>) -> Result<(), FieldError> {
    let Some(models) = models else { return Ok(()) };
    if models.is_empty() || models.len() > MAX_MODELS {
        return Err(FieldError::new("models", "must list 1..=256 models (omit it for all the tier allows)"));
    }
    if models.iter().any(|m| m.is_empty() || m.chars().count() > MAX_MODEL_LEN || !printable(m)) {
        return Err(FieldError::new("models", "each model must be 1..=256 characters, no control characters"));
    }
    Ok(())
}

pub fn check_secret(secret: &str) -> Result<(), FieldError> {
    if secret.is_empty() || secret.len() > MAX_SECRET_LEN || !secret.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(FieldError::new("secret", "must be 1..=4096 visible ASCII characters"));
    }
    Ok(())
}

/// Largest `max_request_bytes` the filter accepts.
pub const MAX_REQUEST_BYTES_LIMIT: u64 = 64 * 1024 * 1024;

/// Some bounds `TierSpec` documents (the filter's tier semantics stay the
/// filter's; these are the ones an operator would otherwise only learn from a
/// refused tenant at the gateway). `fallback_at_budget_share` is left to the
/// filter: serde_json's default float parsing can round 0.9999999999999999 to
/// 1.0, so an exclusive bound here would refuse values the schema allows.
pub fn check_overrides(o: Option<&TierSpec>) -> Result<(), FieldError> {
    let Some(o) = o else { return Ok(()) };
    if let Some(models) = &o.models {
        if models.is_empty() {
            return Err(FieldError::new("overrides.models", "must not be empty"));
        }
    }
    if o.max_request_bytes.is_some_and(|b| b > MAX_REQUEST_BYTES_LIMIT) {
        return Err(FieldError::new("overrides.max_request_bytes", "must be at most 64 MiB"));
    }
    if o.billing_anchor_day.is_some_and(|d| !(1..=31).contains(&d)) {
        return Err(FieldError::new("overrides.billing_anchor_day", "must be 1..=31"));
    }
    if let Some(u) = &o.users {
        check_limits("overrides.users", u)?;
    }
    if let Some(a) = &o.alert_thresholds {
        if a.len() > 8 || a.iter().any(|x| !x.is_finite() || !(0.01..=10.0).contains(x)) {
            return Err(FieldError::new("overrides.alert_thresholds", "at most 8 shares of a budget, 0.01 to 10"));
        }
    }
    Ok(())
}

impl CreateTenant {
    pub fn check(&self) -> Result<(), FieldError> {
        check_tenant_id("id", &self.id)?;
        check_tier(&self.tier)?;
        check_overrides(self.overrides.as_ref())?;
        check_labels(&self.labels)
    }
}

impl PatchTenant {
    pub fn check(&self) -> Result<(), FieldError> {
        if let Some(t) = &self.tier {
            check_tier(t)?;
        }
        if let Some(l) = &self.labels {
            check_labels(l)?;
        }
        check_overrides(self.overrides.as_ref().and_then(Option::as_ref))
    }

    /// The tenant after this patch, at `now` (unix s).
    pub fn apply(&self, t: &Tenant, now: u64) -> Tenant {
        let mut t = t.clone();
        if let Some(tier) = &self.tier {
            t.tier = tier.clone();
        }
        if let Some(e) = self.enabled {
            t.enabled = e;
        }
        if let Some(o) = &self.overrides {
            t.overrides = o.clone();
        }
        if let Some(l) = &self.labels {
            t.labels = l.clone();
        }
        t.updated_at = now;
        t
    }
}

impl IssueKey {
    pub fn check(&self) -> Result<(), FieldError> {
        check_key_label(&self.label)?;
        check_expires_at(self.expires_at)?;
        check_models(self.models.as_deref())?;
        check_key_levels(self.name.as_deref(), self.limits.as_ref(), self.shadow)
    }
}

impl ImportKey {
    pub fn check(&self) -> Result<(), FieldError> {
        check_digest("sha256", &self.sha256)?;
        check_key_label(&self.label)?;
        check_expires_at(self.expires_at)?;
        check_models(self.models.as_deref())?;
        check_key_levels(self.name.as_deref(), self.limits.as_ref(), self.shadow)
    }
}

/// A key's name, limits and shadow flag: limits and shadow mode need a
/// name (the filter counts a key's limits under it); every limit is
/// positive and dollars are exact to the micro-dollar.
pub fn check_key_levels(
    name: Option<&str>,
    limits: Option<&LimitsSpec>,
    shadow: Option<bool>,
) -> Result<(), FieldError> {
    if let Some(n) = name {
        if !valid_tenant_id(n) {
            return Err(FieldError::new("name", "must be 1..=128 of letters, digits, '-', '_', '.'"));
        }
    }
    if (limits.is_some() || shadow.is_some()) && name.is_none() {
        return Err(FieldError::new("name", "is required with limits or shadow (limits are counted under it)"));
    }
    if let Some(l) = limits {
        check_limits("limits", l)?;
    }
    Ok(())
}

/// Every limit positive; dollars finite and 0.000001..=1000000000 (stored
/// rounded to the micro-dollar, see [`round_limits`]).
pub fn check_limits(path: &'static str, l: &LimitsSpec) -> Result<(), FieldError> {
    let counts = [
        l.requests_per_minute,
        l.tokens_per_minute,
        l.input_tokens_per_minute,
        l.output_tokens_per_minute,
        l.requests_per_hour,
        l.tokens_per_hour,
        l.requests_per_day,
        l.tokens_per_day,
        l.tokens_per_week,
        l.tokens_per_month,
    ];
    if counts.contains(&Some(0)) {
        return Err(FieldError::new(path, "a limit of 0 would refuse everything; omit it for no limit"));
    }
    for usd in [l.usd_per_day, l.usd_per_week, l.usd_per_month].into_iter().flatten() {
        if !usd.is_finite() || !(0.000_001..=1e9).contains(&usd) {
            return Err(FieldError::new(path, "dollar limits must be between 0.000001 and 1000000000"));
        }
    }
    Ok(())
}

/// Dollar limits rounded to the micro-dollar (what the filter counts in).
pub fn round_limits(l: Option<LimitsSpec>) -> Option<LimitsSpec> {
    let round = |v: Option<f64>| v.map(|usd| ((usd * 1e6).round() / 1e6).max(0.000_001));
    l.map(|l| LimitsSpec {
        usd_per_day: round(l.usd_per_day),
        usd_per_week: round(l.usd_per_week),
        usd_per_month: round(l.usd_per_month),
        ..l
    })
}

impl PatchKey {
    pub fn check(&self) -> Result<(), FieldError> {
        if let Some(l) = &self.label {
            check_key_label(l)?;
        }
        if let Some(e) = self.expires_at {
            check_expires_at(e)?;
        }
        if let Some(m) = &self.models {
            check_models(m.as_deref())?;
        }
        if let Some(Some(n)) = &self.name {
            check_key_levels(Some(n), None, None)?;
        }
        if let Some(Some(l)) = &self.limits {
            check_limits("limits", l)?;
        }
        Ok(())
    }

    pub fn apply(&self, k: &ApiKey) -> ApiKey {
        let mut k = k.clone();
        if let Some(l) = &self.label {
            k.label = l.clone();
        }
        if let Some(e) = self.expires_at {
            k.expires_at = e;
        }
        if let Some(m) = &self.models {
            k.models = m.clone();
        }
        if let Some(n) = &self.name {
            k.name = n.clone();
        }
        if let Some(l) = &self.limits {
            k.limits = round_limits(l.clone());
        }
        if let Some(s) = self.shadow {
            k.shadow = s;
        }
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_distinguishes_absent_from_null() {
        let p: PatchTenant = serde_json::from_str(r#"{"overrides":null}"#).unwrap();
        assert_eq!(p.overrides, Some(None));
        let p: PatchTenant = serde_json::from_str(r#"{}"#).unwrap();
        assert_eq!(p.overrides, None);
        assert!(serde_json::from_str::<PatchTenant>(r#"{"tier":null}"#).is_err());
        assert!(serde_json::from_str::<PatchKey>(r#"{"label":null}"#).is_err());
        assert!(serde_json::from_str::<IssueKey>(r#"{"label":"a","models":null}"#).is_err());
        let p: PatchKey = serde_json::from_str(r#"{"models":null,"expires_at":5}"#).unwrap();
        assert_eq!(p.models, Some(None));
        assert_eq!(p.expires_at, Some(Some(5)));
    }

    #[test]
    fn bodies_refuse_unknown_fields_and_overrides_are_tier_specs() {
        assert!(serde_json::from_str::<CreateTenant>(r#"{"id":"a","tier":"t","x":1}"#).is_err());
        assert!(serde_json::from_str::<CreateTenant>(r#"{"id":"a","tier":"t","overrides":{"rpm":1}}"#).is_err());
        let c: CreateTenant =
            serde_json::from_str(r#"{"id":"a","tier":"t","overrides":{"requests_per_minute":1}}"#).unwrap();
        assert!(c.enabled);
        assert_eq!(c.overrides.unwrap().requests_per_minute, Some(1));
    }

    #[test]
    fn field_checks() {
        assert!(check_secret("sk-abc").is_ok());
        assert_eq!(check_secret("a b").unwrap_err().field, "secret");
        assert!(check_secret(&"a".repeat(4097)).is_err());
        assert!(check_models(Some(&[])).is_err());
        assert!(check_expires_at(Some(0)).is_err());
        assert!(check_tier(" pro").is_err());
        let bad = |json: &str| check_overrides(Some(&serde_json::from_str(json).unwrap())).unwrap_err().field;
        assert_eq!(bad(r#"{"models":[]}"#), "overrides.models");
        assert_eq!(bad(r#"{"billing_anchor_day":0}"#), "overrides.billing_anchor_day");
        assert_eq!(bad(r#"{"max_request_bytes":67108865}"#), "overrides.max_request_bytes");
        assert!(check_overrides(Some(&serde_json::from_str(r#"{"billing_anchor_day":31}"#).unwrap())).is_ok());
        let format = format!("{:?}", SetCredential { secret: "sk-very-secret".into() });
        assert!(!format.contains("sk-very-secret"));
    }
}
