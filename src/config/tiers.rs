//! How does a tier, with a tenant's overrides merged in, become that tenant's policy?

use std::rc::Rc;

use super::compile::{invalid, ConfigError, Provider, Target};
use super::spec::{FailureMode, LimitsSpec, TierSpec};
use crate::ratelimit::descriptors::{LimitKind, Limits};

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
    /// The tenant-level limits and budgets (dollars in micro-dollars).
    pub limits: Limits,
    /// Limits of each end user of the tenant.
    pub users: Option<Rc<Limits>>,
    pub max_concurrent_requests: Option<u64>,
    pub failure_mode: FailureMode,
    pub billing_anchor_day: u8,
    pub time_zone: Option<String>,
    pub default_max_output_tokens: u64,
    pub clamp_max_output_tokens: bool,
    /// WebSocket upgrades are let through (counted as requests, unmetered).
    pub allow_websocket: bool,
    pub fallback_model: Option<String>,
    /// Per-mille of a budget past which the fallback model is used.
    pub fallback_at_permille: Option<u16>,
    /// Requests' worth of quota a reserve may lease for local admission.
    pub lease: LeaseSize,
    /// Evaluate every limit, refuse nothing.
    pub shadow: bool,
    /// Weight of a cached-read input token in token limits, per mille.
    pub cached_read_permille: u64,
    /// The `tollgate.alerts` value of every budget (`None`: no alerts).
    pub alerts: Option<Rc<str>>,
    /// The tier's own failover targets by route provider (index), in order.
    pub targets: TierTargets,
}

/// How big a quota lease is (see `lease_requests`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseSize {
    Off,
    /// From the recent request rate on the worker, up to [`AUTO_LEASE_MAX`].
    Auto,
    Fixed(u64),
}

/// The largest automatic lease.
pub const AUTO_LEASE_MAX: u64 = 100;

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
        input_tokens_per_minute,
        output_tokens_per_minute,
        requests_per_hour,
        tokens_per_hour,
        tokens_per_week,
        usd_per_week,
        users,
        shadow,
        alert_thresholds,
        cached_read_token_weight,
        max_concurrent_requests,
        failure_mode,
        billing_anchor_day,
        time_zone,
        default_max_output_tokens,
        clamp_max_output_tokens,
        allow_websocket,
        fallback_model,
        fallback_at_budget_share,
        lease_requests,
        provider_targets,
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
pub(super) fn compile_tier(t: &TierSpec, path: &str, providers: &[Provider]) -> Result<Policy, ConfigError> {
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
    let limits = compile_limits(path, &tier_limits(t))?;
    let users = match &t.users {
        Some(u) => {
            let l = compile_limits(&format!("{path}.users"), u)?;
            (!l.is_empty()).then(|| Rc::new(l))
        }
        None => None,
    };
    let cached_read_permille = match t.cached_read_token_weight {
        None => 1000,
        Some(w) if w.is_finite() && (0.0..=1.0).contains(&w) => (w * 1000.0).round() as u64,
        Some(_) => return Err(invalid(format!("{path}.cached_read_token_weight"), "must be between 0 and 1")),
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
        limits,
        users,
        max_concurrent_requests: positive(path, "max_concurrent_requests", t.max_concurrent_requests)?,
        failure_mode: t.failure_mode.unwrap_or(FailureMode::Closed),
        billing_anchor_day,
        time_zone: t.time_zone.clone(),
        default_max_output_tokens,
        clamp_max_output_tokens: t.clamp_max_output_tokens.unwrap_or(false),
        allow_websocket: t.allow_websocket.unwrap_or(false),
        fallback_model: t.fallback_model.clone(),
        fallback_at_permille,
        lease: match t.lease_requests {
            None => LeaseSize::Auto,
            Some(0) => LeaseSize::Off,
            Some(n @ 1..=MAX_LEASE_REQUESTS) => LeaseSize::Fixed(n),
            Some(_) => {
                return Err(invalid(
                    format!("{path}.lease_requests"),
                    format!("must be between 0 (off) and {MAX_LEASE_REQUESTS}"),
                ))
            }
        },
        shadow: t.shadow.unwrap_or(false),
        cached_read_permille,
        alerts: compile_alerts(&format!("{path}.alert_thresholds"), t.alert_thresholds.as_deref())?,
        targets: compile_provider_targets(&format!("{path}.provider_targets"), t.provider_targets.as_ref(), providers)?,
    })
}

/// A tier's own failover targets: (route provider, its targets in order),
/// indexes into the providers.
pub type TierTargets = Vec<(usize, Rc<[Target]>)>;

/// A tier's own failover targets, by route provider (indexes into the
/// providers), tried in order.
fn compile_provider_targets(
    path: &str,
    spec: Option<&std::collections::BTreeMap<String, Vec<String>>>,
    providers: &[Provider],
) -> Result<TierTargets, ConfigError> {
    let Some(spec) = spec else { return Ok(Vec::new()) };
    let index = |name: &str| providers.iter().position(|p| p.name == name);
    let mut out = Vec::new();
    for (group, names) in spec {
        let gpath = format!("{path}.{group}");
        let g = index(group).ok_or_else(|| invalid(&gpath, format!("unknown provider '{group}'")))?;
        if names.is_empty() || names.len() > 16 {
            return Err(invalid(&gpath, "list 1 to 16 providers"));
        }
        let mut targets: Vec<Target> = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let tpath = format!("{gpath}[{i}]");
            let t = index(name).ok_or_else(|| invalid(&tpath, format!("unknown provider '{name}'")))?;
            if t != g && providers.get(t).is_some_and(|p| !p.targets.is_empty()) {
                return Err(invalid(&tpath, format!("'{name}' has targets of its own; targets do not nest")));
            }
            if targets.iter().any(|o| o.provider == t) {
                return Err(invalid(&tpath, format!("'{name}' is named twice")));
            }
            targets.push(Target { provider: t, weight: 1 });
        }
        out.push((g, Rc::from(targets)));
    }
    Ok(out)
}

/// Alert thresholds (shares) as the `tollgate.alerts` value (percents).
fn compile_alerts(path: &str, shares: Option<&[f64]>) -> Result<Option<Rc<str>>, ConfigError> {
    let percents: Vec<u32> = match shares {
        None => rls_contract::DEFAULT_ALERT_PERCENTS.to_vec(),
        Some(s) => {
            let mut out = Vec::with_capacity(s.len());
            for (i, share) in s.iter().enumerate() {
                let p = (share * 100.0).round();
                if !share.is_finite() || !(1.0..=1000.0).contains(&p) {
                    return Err(invalid(format!("{path}[{i}]"), "must be a share of the budget, 0.01 to 10"));
                }
                out.push(p as u32);
            }
            out
        }
    };
    if percents.is_empty() {
        return Ok(None);
    }
    if percents.len() > rls_contract::MAX_ALERT_THRESHOLDS || percents.windows(2).any(|w| w.first() >= w.last()) {
        return Err(invalid(path, "at most 8 thresholds, strictly increasing"));
    }
    Ok(Some(Rc::from(rls_contract::format_alert_thresholds(&percents))))
}

/// The limit fields of a tier, as one level's limits.
fn tier_limits(t: &TierSpec) -> LimitsSpec {
    LimitsSpec {
        requests_per_minute: t.requests_per_minute,
        tokens_per_minute: t.tokens_per_minute,
        input_tokens_per_minute: t.input_tokens_per_minute,
        output_tokens_per_minute: t.output_tokens_per_minute,
        requests_per_hour: t.requests_per_hour,
        tokens_per_hour: t.tokens_per_hour,
        requests_per_day: t.requests_per_day,
        tokens_per_day: t.tokens_per_day,
        tokens_per_week: t.tokens_per_week,
        tokens_per_month: t.tokens_per_month,
        usd_per_day: t.usd_per_day,
        usd_per_week: t.usd_per_week,
        usd_per_month: t.usd_per_month,
    }
}

/// One level's limits, checked: no zero limit, dollars exact to the
/// micro-dollar.
pub fn compile_limits(path: &str, l: &LimitsSpec) -> Result<Limits, ConfigError> {
    let mut out = Limits::default();
    let counts = [
        (LimitKind::RequestsPerMinute, l.requests_per_minute),
        (LimitKind::TokensPerMinute, l.tokens_per_minute),
        (LimitKind::InputTokensPerMinute, l.input_tokens_per_minute),
        (LimitKind::OutputTokensPerMinute, l.output_tokens_per_minute),
        (LimitKind::RequestsPerHour, l.requests_per_hour),
        (LimitKind::TokensPerHour, l.tokens_per_hour),
        (LimitKind::RequestsPerDay, l.requests_per_day),
        (LimitKind::TokensPerDay, l.tokens_per_day),
        (LimitKind::TokensPerWeek, l.tokens_per_week),
        (LimitKind::TokensPerMonth, l.tokens_per_month),
    ];
    for (kind, v) in counts {
        out.set(kind, positive(path, kind.name(), v)?);
    }
    for (kind, v) in [
        (LimitKind::UsdPerDay, l.usd_per_day),
        (LimitKind::UsdPerWeek, l.usd_per_week),
        (LimitKind::UsdPerMonth, l.usd_per_month),
    ] {
        if let Some(usd) = v {
            out.set(kind, Some(usd_to_micros(&format!("{path}.{}", kind.name()), usd)?));
        }
    }
    Ok(out)
}

impl Policy {
    /// Whether this policy limits anything at the tenant or user level.
    pub fn has_limits(&self) -> bool {
        !self.limits.is_empty() || self.users.is_some()
    }
}
