//! What may the caller still use? The answer of the self-service quota
//! endpoint (`GET /tollgate/v1/quota`): every limit of the caller's own
//! levels (its tenant, API key and end user, never the shared pools or
//! another tenant), read with a pure check that charges nothing, and the
//! remaining budget after a request's charge.

use serde_json::{json, Value};

use crate::llm::LocalReply;
use crate::ratelimit::descriptors::{Amounts, LimitState, Measure, Window};

/// Whose quota it is.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    pub tenant: &'a str,
    pub tier: &'a str,
    pub key: Option<&'a str>,
    pub user: Option<&'a str>,
}

fn measure_name(m: Measure) -> &'static str {
    match m {
        Measure::Requests => "requests",
        Measure::Tokens => "tokens",
        Measure::InputTokens => "input_tokens",
        Measure::OutputTokens => "output_tokens",
        Measure::Micros => "micro_usd",
    }
}

fn window_name(w: Window) -> &'static str {
    match w {
        Window::Minute => "minute",
        Window::Hour => "hour",
        Window::Day => "day",
        Window::Week => "week",
        Window::Month => "month",
    }
}

/// One limit as the endpoint shows it. The service reports what remains as
/// a u32: above it (budgets over 4,294,967,295 units) `remaining` is a
/// lower bound and `used` is unknown (`null`).
pub fn limit_json(s: &LimitState) -> Value {
    let saturated = s.limit > u64::from(u32::MAX) && s.remaining >= u64::from(u32::MAX);
    json!({
        "level": s.level.name(),
        "name": s.kind.name(),
        "window": window_name(s.kind.window()),
        "unit": measure_name(s.kind.measure()),
        "limit": s.limit,
        "used": if saturated { Value::Null } else { json!(s.limit.saturating_sub(s.remaining)) },
        "remaining": s.remaining,
        "remaining_is_lower_bound": saturated,
        "resets_in_ms": s.reset_ms,
    })
}

/// The 200 answer of the quota endpoint.
pub fn reply(who: Who, states: &[LimitState], request_id: &str) -> LocalReply {
    let body = json!({
        "object": "tollgate.quota",
        "tenant": who.tenant,
        "tier": who.tier,
        "key": who.key,
        "user": who.user,
        "limits": states.iter().map(limit_json).collect::<Vec<_>>(),
    });
    LocalReply {
        status: 200,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("cache-control".into(), "no-store".into()),
            ("x-request-id".into(), request_id.to_string()),
        ],
        body: serde_json::to_vec(&body).unwrap_or_default(),
    }
}

/// What each budget (day, week, month windows) has left once a request's
/// usage replaced its reservation: the service's remainder after the
/// reservation, plus what was reserved, less what was used; clamped to the
/// limit. Rates are left out: they refill continuously.
pub fn remaining_after(states: &[LimitState], reserved: Amounts, used: Amounts) -> Vec<LimitState> {
    states
        .iter()
        .filter(|s| s.kind.is_budget())
        .map(|s| {
            let m = s.kind.measure();
            let back = s.remaining.saturating_add(reserved.of(m, 1));
            LimitState { remaining: back.saturating_sub(used.of(m, 1)).min(s.limit), ..*s }
        })
        .collect()
}

/// Response headers of the remaining budgets: the tightest dollar budget
/// (as dollars) and the tightest token budget, of every level. Built with
/// plain pushes: it runs for every non-streamed response.
pub fn remaining_headers(after: &[LimitState]) -> Vec<(String, String)> {
    let tightest = |m: Measure| after.iter().filter(|s| s.kind.measure() == m).min_by_key(|s| s.remaining);
    let (usd, tokens) = (tightest(Measure::Micros), tightest(Measure::Tokens));
    let mut out = Vec::with_capacity(2 * (usize::from(usd.is_some()) + usize::from(tokens.is_some())));
    if let Some(s) = usd {
        out.push(("x-tollgate-budget-remaining-usd".into(), crate::metering::record::format_usd(s.remaining)));
        out.push(("x-tollgate-budget-remaining-usd-limit".into(), limit_label(s)));
    }
    if let Some(s) = tokens {
        out.push(("x-tollgate-budget-remaining-tokens".into(), s.remaining.to_string()));
        out.push(("x-tollgate-budget-remaining-tokens-limit".into(), limit_label(s)));
    }
    out
}

fn limit_label(s: &LimitState) -> String {
    let (level, kind) = (s.level.name(), s.kind.name());
    let mut out = String::with_capacity(level.len() + 1 + kind.len());
    out.push_str(level);
    out.push('.');
    out.push_str(kind);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::descriptors::{Level, LimitKind};

    fn st(level: Level, kind: LimitKind, limit: u64, remaining: u64) -> LimitState {
        LimitState { level, kind, limit, remaining, reset_ms: 1000, over: false }
    }

    #[test]
    fn the_remainder_after_the_charge_replaces_the_reservation_with_the_usage() {
        let states = [
            st(Level::Tenant, LimitKind::RequestsPerMinute, 10, 9),
            st(Level::Tenant, LimitKind::UsdPerMonth, 5_000_000, 4_000_000),
            st(Level::Key, LimitKind::UsdPerDay, 1_000_000, 100_000),
            st(Level::Tenant, LimitKind::TokensPerDay, 1000, 900),
        ];
        let reserved = Amounts { tokens: 100, input: 20, output: 80, micros: 50_000 };
        let used = Amounts { tokens: 30, input: 20, output: 10, micros: 20_000 };
        let after = remaining_after(&states, reserved, used);
        assert_eq!(after.len(), 3, "rates are left out");
        assert_eq!(after[0].remaining, 4_030_000);
        assert_eq!(after[1].remaining, 130_000);
        assert_eq!(after[2].remaining, 970);
        let h = remaining_headers(&after);
        assert!(h.contains(&("x-tollgate-budget-remaining-usd".into(), "0.130000".into())));
        assert!(h.contains(&("x-tollgate-budget-remaining-usd-limit".into(), "key.usd_per_day".into())));
        assert!(h.contains(&("x-tollgate-budget-remaining-tokens".into(), "970".into())));
        // Never above the limit, never below zero.
        let over = remaining_after(&states[1..2], Amounts { micros: 9_000_000, ..reserved }, Amounts::default());
        assert_eq!(over[0].remaining, 5_000_000);
        let under = remaining_after(&states[1..2], Amounts::default(), Amounts { micros: 9_000_000, ..used });
        assert_eq!(under[0].remaining, 0);
    }

    #[test]
    fn the_quota_answer_lists_every_limit_with_used_and_remaining() {
        let states = [
            st(Level::Tenant, LimitKind::UsdPerMonth, 5_000_000, 4_000_000),
            st(Level::User, LimitKind::TokensPerMonth, 10_000_000_000, u64::from(u32::MAX)),
        ];
        let who = Who { tenant: "acme", tier: "pro", key: Some("ci"), user: Some("u-1") };
        let r = reply(who, &states, "rid");
        assert_eq!(r.status, 200);
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["tenant"], "acme");
        assert_eq!(v["key"], "ci");
        assert_eq!(v["limits"][0]["used"], 1_000_000);
        assert_eq!(v["limits"][0]["unit"], "micro_usd");
        assert_eq!(v["limits"][0]["window"], "month");
        assert_eq!(v["limits"][1]["level"], "user");
        assert!(v["limits"][1]["used"].is_null());
        assert_eq!(v["limits"][1]["remaining_is_lower_bound"], true);
    }
}
