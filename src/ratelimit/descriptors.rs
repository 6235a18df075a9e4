//! What does one limit look like to the rate-limit service? Per-tenant
//! limits (their kinds, measures and amounts) as RLS descriptors.
//!
//! One reserve call per request carries every configured limit of the tenant
//! (requests and tokens per minute, requests and tokens per day, tokens per
//! month, dollars per day and month). The service decides all of them in one
//! atomic step: if any is over, nothing is charged. Token and dollar amounts
//! are reserved from an estimate (input from the body size, output from the
//! request's max-output field or the tier default) and settled to the metered
//! usage afterwards: see [`super::reserve`] and [`super::settle`].

use crate::config::Policy;
use crate::rls::{self, Descriptor, Entry, LimitOverride, Unit};

/// One limit a tenant may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    RequestsPerMinute,
    TokensPerMinute,
    RequestsPerDay,
    TokensPerDay,
    TokensPerMonth,
    UsdPerDay,
    UsdPerMonth,
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    Requests,
    Tokens,
    /// Micro-dollars.
    Micros,
}

impl LimitKind {
    pub const ALL: [LimitKind; 7] = [
        LimitKind::RequestsPerMinute,
        LimitKind::TokensPerMinute,
        LimitKind::RequestsPerDay,
        LimitKind::TokensPerDay,
        LimitKind::TokensPerMonth,
        LimitKind::UsdPerDay,
        LimitKind::UsdPerMonth,
    ];

    /// Name in descriptors, metrics and configuration.
    pub fn name(self) -> &'static str {
        match self {
            LimitKind::RequestsPerMinute => "requests_per_minute",
            LimitKind::TokensPerMinute => "tokens_per_minute",
            LimitKind::RequestsPerDay => "requests_per_day",
            LimitKind::TokensPerDay => "tokens_per_day",
            LimitKind::TokensPerMonth => "tokens_per_month",
            LimitKind::UsdPerDay => "usd_per_day",
            LimitKind::UsdPerMonth => "usd_per_month",
        }
    }

    /// The refusal code a client sees when this limit is hit.
    pub fn refusal_code(self) -> &'static str {
        match self {
            LimitKind::RequestsPerMinute => "request_rate_limited",
            LimitKind::TokensPerMinute => "token_rate_limited",
            LimitKind::RequestsPerDay => "daily_request_budget_exhausted",
            LimitKind::TokensPerDay => "daily_token_budget_exhausted",
            LimitKind::TokensPerMonth => "monthly_token_budget_exhausted",
            LimitKind::UsdPerDay => "daily_spend_budget_exhausted",
            LimitKind::UsdPerMonth => "monthly_spend_budget_exhausted",
        }
    }

    pub fn unit(self) -> Unit {
        match self {
            LimitKind::RequestsPerMinute | LimitKind::TokensPerMinute => Unit::Minute,
            LimitKind::RequestsPerDay | LimitKind::TokensPerDay | LimitKind::UsdPerDay => Unit::Day,
            LimitKind::TokensPerMonth | LimitKind::UsdPerMonth => Unit::Month,
        }
    }

    pub fn measure(self) -> Measure {
        match self {
            LimitKind::RequestsPerMinute | LimitKind::RequestsPerDay => Measure::Requests,
            LimitKind::TokensPerMinute | LimitKind::TokensPerDay | LimitKind::TokensPerMonth => Measure::Tokens,
            LimitKind::UsdPerDay | LimitKind::UsdPerMonth => Measure::Micros,
        }
    }

    /// A budget (calendar window) rather than a rate: retrying soon cannot help.
    pub fn is_budget(self) -> bool {
        self.unit() != Unit::Minute
    }

    pub fn limit(self, p: &Policy) -> Option<u64> {
        match self {
            LimitKind::RequestsPerMinute => p.requests_per_minute,
            LimitKind::TokensPerMinute => p.tokens_per_minute,
            LimitKind::RequestsPerDay => p.requests_per_day,
            LimitKind::TokensPerDay => p.tokens_per_day,
            LimitKind::TokensPerMonth => p.tokens_per_month,
            LimitKind::UsdPerDay => p.usd_micros_per_day,
            LimitKind::UsdPerMonth => p.usd_micros_per_month,
        }
    }
}

/// The limits of one tenant, in descriptor order.
pub fn active_limits(p: &Policy) -> Vec<(LimitKind, u64)> {
    LimitKind::ALL.iter().filter_map(|k| k.limit(p).map(|l| (*k, l))).collect()
}

/// Amounts of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amounts {
    pub tokens: u64,
    pub micros: u64,
}

pub(crate) fn descriptor(tenant: &str, kind: LimitKind, limit: u64, policy: &Policy) -> Descriptor {
    let mut entries = vec![
        Entry { key: "tenant".into(), value: tenant.into() },
        Entry { key: "limit".into(), value: kind.name().into() },
    ];
    if limit > u64::from(u32::MAX) {
        entries.push(Entry { key: rls::KEY_LIMIT.into(), value: limit.to_string() });
    }
    if kind.is_budget() {
        if let Some(tz) = &policy.time_zone {
            entries.push(Entry { key: rls::KEY_TZ.into(), value: tz.clone() });
        }
        if kind.unit() == Unit::Month && policy.billing_anchor_day != 1 {
            entries.push(Entry { key: rls::KEY_ANCHOR_DAY.into(), value: policy.billing_anchor_day.to_string() });
        }
    }
    Descriptor {
        entries,
        limit: Some(LimitOverride {
            requests_per_unit: u32::try_from(limit).unwrap_or(u32::MAX),
            unit: kind.unit() as i32,
        }),
        hits_addend: None,
        is_negative_hits: false,
    }
}

/// Remaining capacity reported for one limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitState {
    pub kind: LimitKind,
    pub limit: u64,
    pub remaining: u64,
    pub reset_ms: u64,
    pub over: bool,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::tests::sample;

    /// acme's policy with a rate, a token rate, a month of tokens above
    /// `u32::MAX` and a month of dollars, in Berlin, billed from the 15th.
    pub(crate) fn policy() -> Policy {
        let mut p = Policy::clone(&sample().tenant_by_id("acme").unwrap().policy);
        p.requests_per_minute = Some(10);
        p.tokens_per_minute = Some(1000);
        p.tokens_per_month = Some(5_000_000_000);
        p.usd_micros_per_month = Some(2_000_000);
        p.billing_anchor_day = 15;
        p.time_zone = Some("Europe/Berlin".into());
        p
    }
}
