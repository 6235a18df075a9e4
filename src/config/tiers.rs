//! How does a tier, with a tenant's overrides merged in, become that tenant's policy?

use super::compile::{invalid, ConfigError};
use super::spec::{FailureMode, TierSpec};

/// Largest request body a tier may allow. Envoy buffers the body in memory
/// while tollgate inspects it, so this is a hard ceiling against mistakes.
pub const MAX_REQUEST_BYTES_CEILING: u64 = 64 * 1024 * 1024;
/// Default request body limit for tiers that do not set one.
pub const DEFAULT_MAX_REQUEST_BYTES: u64 = 1024 * 1024;

/// A compiled model allowlist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelAllowlist {
    any: bool,
    exact: Vec<String>,
    prefixes: Vec<String>,
}

impl ModelAllowlist {
    pub(crate) fn compile(path: &str, models: &[String]) -> Result<Self, ConfigError> {
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

pub(super) fn merge_tier(base: &TierSpec, over: &TierSpec) -> TierSpec {
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

/// What a tier (merged with a tenant's overrides) compiles to.
pub(super) fn compile_tier(t: &TierSpec, path: &str) -> Result<Policy, ConfigError> {
    let models = match &t.models {
        Some(m) => ModelAllowlist::compile(&format!("{path}.models"), m)?,
        None => return Err(invalid(format!("{path}.models"), "is required")),
    };
    let max_request_bytes = match t.max_request_bytes {
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
    let usd_micros_per_day = match t.usd_per_day {
        Some(v) => Some(usd_to_micros(&format!("{path}.usd_per_day"), v)?),
        None => None,
    };
    let usd_micros_per_month = match t.usd_per_month {
        Some(v) => Some(usd_to_micros(&format!("{path}.usd_per_month"), v)?),
        None => None,
    };
    let billing_anchor_day = match t.billing_anchor_day {
        None => 1,
        Some(d @ 1..=31) => d,
        Some(_) => return Err(invalid(format!("{path}.billing_anchor_day"), "must be between 1 and 31")),
    };
    if let Some(tz) = &t.time_zone {
        let ok =
            !tz.is_empty() && tz.len() <= 64 && tz.bytes().all(|b| b.is_ascii_alphanumeric() || b"/_-+".contains(&b));
        if !ok {
            return Err(invalid(format!("{path}.time_zone"), "must be an IANA time zone name such as Europe/Berlin"));
        }
    }
    let default_max_output_tokens = match t.default_max_output_tokens {
        Some(0) => return Err(invalid(format!("{path}.default_max_output_tokens"), "must be at least 1")),
        Some(n) => n,
        None => DEFAULT_MAX_OUTPUT_TOKENS,
    };
    let fallback_at_permille = match t.fallback_at_budget_share {
        None => None,
        Some(s) if s.is_finite() && s > 0.0 && s < 1.0 => Some((s * 1000.0).round() as u16),
        Some(_) => {
            return Err(invalid(format!("{path}.fallback_at_budget_share"), "must be a share strictly between 0 and 1"))
        }
    };
    if fallback_at_permille.is_some() != t.fallback_model.is_some() {
        return Err(invalid(path, "fallback_model and fallback_at_budget_share must be given together"));
    }
    if let Some(fb) = &t.fallback_model {
        if !models.allows(fb) {
            return Err(invalid(format!("{path}.fallback_model"), format!("'{fb}' is not in this tier's model list")));
        }
    }
    Ok(Policy {
        models,
        max_request_bytes,
        requests_per_minute: positive(path, "requests_per_minute", t.requests_per_minute)?,
        tokens_per_minute: positive(path, "tokens_per_minute", t.tokens_per_minute)?,
        requests_per_day: positive(path, "requests_per_day", t.requests_per_day)?,
        tokens_per_day: positive(path, "tokens_per_day", t.tokens_per_day)?,
        tokens_per_month: positive(path, "tokens_per_month", t.tokens_per_month)?,
        usd_micros_per_day,
        usd_micros_per_month,
        max_concurrent_requests: positive(path, "max_concurrent_requests", t.max_concurrent_requests)?,
        failure_mode: t.failure_mode.unwrap_or(FailureMode::Closed),
        billing_anchor_day,
        time_zone: t.time_zone.clone(),
        default_max_output_tokens,
        clamp_max_output_tokens: t.clamp_max_output_tokens.unwrap_or(false),
        fallback_model: t.fallback_model.clone(),
        fallback_at_permille,
        lease_requests: match t.lease_requests {
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
