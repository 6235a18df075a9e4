//! Per-tenant limits as RLS descriptors: the reserve before the call, the
//! settle after it, and what an answer means for the client.
//!
//! One reserve call per request carries every configured limit of the tenant
//! (requests and tokens per minute, requests and tokens per day, tokens per
//! month, dollars per day and month). The service decides all of them in one
//! atomic step: if any is over, nothing is charged. Token and dollar amounts
//! are reserved from an estimate (input from the body size, output from the
//! request's max-output field or the tier default) and settled to the metered
//! usage afterwards.

use crate::config::Policy;
use crate::llm::{self, Family, LocalReply, Refusal};
use crate::rls::{
    self, Code, Descriptor, Entry, LimitOverride, RateLimitRequest, RateLimitResponse, UInt64Value, Unit,
};

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

fn descriptor(tenant: &str, kind: LimitKind, limit: u64, policy: &Policy) -> Descriptor {
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

/// The reserve call: `requests` requests charged (1, or more with a quota
/// lease), plus the estimated tokens and cost. `hits` of 0 for every
/// descriptor makes it a pure check (compatibility mode).
pub fn build_reserve(
    domain: &str,
    tenant: &str,
    policy: &Policy,
    requests: u64,
    estimate: Amounts,
    check_only: bool,
) -> (RateLimitRequest, Vec<LimitKind>) {
    let limits = active_limits(policy);
    let mut descriptors = Vec::with_capacity(limits.len());
    let mut kinds = Vec::with_capacity(limits.len());
    for (kind, limit) in limits {
        let mut d = descriptor(tenant, kind, limit, policy);
        let hits = match kind.measure() {
            Measure::Requests => requests,
            Measure::Tokens => estimate.tokens,
            Measure::Micros => estimate.micros,
        };
        d.hits_addend = Some(UInt64Value { value: if check_only { 0 } else { hits } });
        descriptors.push(d);
        kinds.push(kind);
    }
    (RateLimitRequest { domain: domain.into(), descriptors, hits_addend: 0 }, kinds)
}

/// The settle call: the difference between what was reserved and what was
/// used, per limit: requests (`(reserved, used)`: `(0, 1)` charges a request
/// that was not reserved, `(n + 1, 1)` gives back an unused lease of `n`),
/// tokens and dollars. `None` when there is nothing to change.
pub fn build_settle(
    domain: &str,
    tenant: &str,
    policy: &Policy,
    reserved: Amounts,
    actual: Amounts,
    requests: (u64, u64),
) -> Option<RateLimitRequest> {
    build_settle_net(domain, tenant, policy, SettleNet::of(reserved, actual, requests))
}

/// What settles add to each measure (actual less reserved; negative gives
/// back). Settles are linear, so the settle of a sum of nets is the sum of
/// their settles: one request can carry many requests' settles.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SettleNet {
    pub requests: i128,
    pub tokens: i128,
    pub micros: i128,
}

impl SettleNet {
    /// One request's: `reserved` was charged for `requests.0` requests,
    /// `actual` was used by `requests.1`.
    pub fn of(reserved: Amounts, actual: Amounts, requests: (u64, u64)) -> Self {
        let d = |from: u64, to: u64| i128::from(to) - i128::from(from);
        SettleNet {
            requests: d(requests.0, requests.1),
            tokens: d(reserved.tokens, actual.tokens),
            micros: d(reserved.micros, actual.micros),
        }
    }

    pub fn add(&mut self, other: SettleNet) {
        self.requests = self.requests.saturating_add(other.requests);
        self.tokens = self.tokens.saturating_add(other.tokens);
        self.micros = self.micros.saturating_add(other.micros);
    }
}

/// The settle request of `net`, `None` when it changes nothing.
pub fn build_settle_net(domain: &str, tenant: &str, policy: &Policy, net: SettleNet) -> Option<RateLimitRequest> {
    let mut descriptors = Vec::new();
    for (kind, limit) in active_limits(policy) {
        let n = match kind.measure() {
            Measure::Requests => net.requests,
            Measure::Tokens => net.tokens,
            Measure::Micros => net.micros,
        };
        if n == 0 {
            continue;
        }
        let mut d = descriptor(tenant, kind, limit, policy);
        d.is_negative_hits = n < 0;
        d.hits_addend = Some(UInt64Value { value: u64::try_from(n.unsigned_abs()).unwrap_or(u64::MAX) });
        descriptors.push(d);
    }
    (!descriptors.is_empty()).then(|| RateLimitRequest { domain: domain.into(), descriptors, hits_addend: 0 })
}

/// Whether a settle of `net` changes anything under `policy`: some limit of
/// it counts a measure the net moves (else [`build_settle_net`] is `None`).
pub fn settle_changes(policy: &Policy, net: SettleNet) -> bool {
    LimitKind::ALL.iter().any(|k| {
        k.limit(policy).is_some()
            && match k.measure() {
                Measure::Requests => net.requests != 0,
                Measure::Tokens => net.tokens != 0,
                Measure::Micros => net.micros != 0,
            }
    })
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

/// What the reserve answer means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Admit(Vec<LimitState>),
    Refuse {
        states: Vec<LimitState>,
        hit: LimitState,
    },
    /// The answer could not be read: treat as the service being unavailable.
    Unreadable(String),
}

/// Interprets a reserve answer, given the limit kinds in descriptor order.
pub fn decide(resp: &RateLimitResponse, kinds: &[LimitKind], policy: &Policy) -> Verdict {
    let overall = resp.overall_code;
    if overall != Code::Ok as i32 && overall != Code::OverLimit as i32 {
        return Verdict::Unreadable(format!("overall_code {overall}"));
    }
    let mut states = Vec::with_capacity(kinds.len());
    for (i, kind) in kinds.iter().enumerate() {
        let limit = kind.limit(policy).unwrap_or(0);
        let st = resp.statuses.get(i);
        let over = st.is_some_and(|s| s.code == Code::OverLimit as i32);
        let remaining = st.map_or(limit, |s| u64::from(s.limit_remaining)).min(limit);
        let reset_ms = st.and_then(|s| s.duration_until_reset.as_ref()).map_or(0, rls::Duration::as_millis);
        states.push(LimitState { kind: *kind, limit, remaining, reset_ms, over });
    }
    if overall == Code::Ok as i32 {
        return Verdict::Admit(states);
    }
    // The refusal names the limit that keeps the client waiting longest:
    // a budget beats a rate.
    let hit = states.iter().filter(|s| s.over).max_by_key(|s| (s.kind.is_budget(), s.reset_ms)).copied();
    match hit {
        Some(hit) => Verdict::Refuse { states, hit },
        None => Verdict::Unreadable("OVER_LIMIT without an over-limit descriptor".into()),
    }
}

/// Formats a duration the way OpenAI's `x-ratelimit-reset-*` does: `6m0s`,
/// `1.5s`, `120ms`.
pub fn openai_duration(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let total_s = ms / 1000;
    let frac = ms % 1000;
    let (h, m, s) = (total_s / 3600, (total_s % 3600) / 60, total_s % 60);
    let sec = if frac == 0 { format!("{s}s") } else { format!("{s}.{}s", format!("{frac:03}").trim_end_matches('0')) };
    match (h, m) {
        (0, 0) => sec,
        (0, m) => format!("{m}m{sec}"),
        (h, m) => format!("{h}h{m}m{sec}"),
    }
}

/// OpenAI-style `x-ratelimit-*` headers for the request and token rates (or,
/// when a tenant has no per-minute limit, its daily limit of that measure).
pub fn ratelimit_headers(states: &[LimitState]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (suffix, measure) in [("requests", Measure::Requests), ("tokens", Measure::Tokens)] {
        let pick = states
            .iter()
            .filter(|s| s.kind.measure() == measure)
            .min_by_key(|s| (s.kind.is_budget(), s.kind.unit() as i32));
        if let Some(s) = pick {
            out.push((format!("x-ratelimit-limit-{suffix}"), s.limit.to_string()));
            out.push((format!("x-ratelimit-remaining-{suffix}"), s.remaining.to_string()));
            out.push((format!("x-ratelimit-reset-{suffix}"), openai_duration(s.reset_ms)));
        }
    }
    out
}

/// The 429 for a refused reserve, in the client's envelope.
pub fn refusal_reply(family: Family, request_id: &str, states: &[LimitState], hit: &LimitState) -> LocalReply {
    let kind = hit.kind;
    let when = openai_duration(hit.reset_ms);
    let message = if kind.is_budget() {
        format!("This account's {} budget is exhausted; it renews in {when}.", kind.name().replace('_', " "))
    } else {
        format!("Rate limit reached for {}; retry in {when}.", kind.name().replace('_', " "))
    };
    let refusal = Refusal::Custom { status: 429, code: kind.refusal_code().into(), message };
    let openai_type = match (kind.is_budget(), kind.measure()) {
        (true, _) => "insufficient_quota",
        (false, Measure::Requests) => "requests",
        (false, _) => "tokens",
    };
    let mut reply = llm::render(family, &refusal, request_id, Some(openai_type));
    reply.headers.extend(llm::retry_headers(hit.reset_ms, !kind.is_budget()));
    reply.headers.push(("x-tollgate-limit".into(), kind.name().into()));
    reply.headers.extend(ratelimit_headers(states));
    reply
}

/// Output tokens the tenant can still afford, given the remaining capacity of
/// every over-limit token or dollar limit, the input estimate and the price of
/// an output token (micro-dollars per million output tokens... expressed as
/// `micros_for(n)`). `None` when a request-count limit is over (clamping
/// output cannot help) or nothing fits.
pub fn affordable_output(
    states: &[LimitState],
    input_tokens: u64,
    input_micros: u64,
    micros_for_output: &dyn Fn(u64) -> u64,
    wanted: u64,
) -> Option<u64> {
    let mut best = wanted;
    for s in states {
        match s.kind.measure() {
            Measure::Requests if s.over => return None,
            Measure::Requests => {}
            Measure::Tokens => best = best.min(s.remaining.saturating_sub(input_tokens)),
            Measure::Micros => {
                let budget = s.remaining.saturating_sub(input_micros);
                // Largest n with micros_for(n) <= budget, by bisection.
                let (mut lo, mut hi) = (0u64, best);
                while lo < hi {
                    let mid = lo + (hi - lo).div_ceil(2);
                    if micros_for_output(mid) <= budget {
                        lo = mid;
                    } else {
                        hi = mid - 1;
                    }
                }
                best = best.min(lo);
            }
        }
    }
    (best >= 1).then_some(best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::sample;

    fn policy() -> Policy {
        let mut p = sample().tenant_by_id("acme").unwrap().policy.clone();
        p.requests_per_minute = Some(10);
        p.tokens_per_minute = Some(1000);
        p.tokens_per_month = Some(5_000_000_000);
        p.usd_micros_per_month = Some(2_000_000);
        p.billing_anchor_day = 15;
        p.time_zone = Some("Europe/Berlin".into());
        p
    }

    #[test]
    fn reserve_carries_every_limit() {
        let (req, kinds) =
            build_reserve("tollgate", "acme", &policy(), 1, Amounts { tokens: 300, micros: 4500 }, false);
        assert_eq!(
            kinds,
            vec![
                LimitKind::RequestsPerMinute,
                LimitKind::TokensPerMinute,
                LimitKind::TokensPerMonth,
                LimitKind::UsdPerMonth
            ]
        );
        let hits: Vec<u64> = req.descriptors.iter().map(|d| d.hits_addend.as_ref().unwrap().value).collect();
        assert_eq!(hits, vec![1, 300, 300, 4500]);
        let month = &req.descriptors[2];
        assert_eq!(month.limit.as_ref().unwrap().requests_per_unit, u32::MAX);
        let keys: Vec<(&str, &str)> = month.entries.iter().map(|e| (e.key.as_str(), e.value.as_str())).collect();
        assert!(keys.contains(&("tollgate.limit", "5000000000")));
        assert!(keys.contains(&("tollgate.anchor_day", "15")));
        assert!(keys.contains(&("tollgate.tz", "Europe/Berlin")));
        // Rates carry no calendar parameters.
        assert_eq!(req.descriptors[0].entries.len(), 2);
    }

    #[test]
    fn settle_refunds_and_adds() {
        let p = policy();
        let req = build_settle(
            "d",
            "acme",
            &p,
            Amounts { tokens: 300, micros: 4500 },
            Amounts { tokens: 120, micros: 5000 },
            (1, 1),
        )
        .unwrap();
        assert_eq!(req.descriptors.len(), 3);
        assert!(req.descriptors[0].is_negative_hits);
        assert_eq!(req.descriptors[0].hits_addend.as_ref().unwrap().value, 180);
        assert!(!req.descriptors[2].is_negative_hits);
        assert_eq!(req.descriptors[2].hits_addend.as_ref().unwrap().value, 500);
        assert!(build_settle(
            "d",
            "acme",
            &p,
            Amounts { tokens: 1, micros: 1 },
            Amounts { tokens: 1, micros: 1 },
            (1, 1)
        )
        .is_none());
    }

    fn status(code: Code, remaining: u32, reset_s: i64) -> rls::DescriptorStatus {
        rls::DescriptorStatus {
            code: code as i32,
            current_limit: None,
            limit_remaining: remaining,
            duration_until_reset: Some(rls::Duration { seconds: reset_s, nanos: 0 }),
        }
    }

    #[test]
    fn refusal_names_the_budget_and_says_do_not_retry() {
        let p = policy();
        let (_, kinds) = build_reserve("d", "acme", &p, 1, Amounts::default(), false);
        let resp = RateLimitResponse {
            overall_code: Code::OverLimit as i32,
            statuses: vec![
                status(Code::Ok, 9, 6),
                status(Code::OverLimit, 0, 30),
                status(Code::Ok, 100, 86400),
                status(Code::OverLimit, 0, 86400 * 3),
            ],
        };
        let Verdict::Refuse { states, hit } = decide(&resp, &kinds, &p) else { panic!() };
        assert_eq!(hit.kind, LimitKind::UsdPerMonth);
        let r = refusal_reply(Family::OpenAi, "rid", &states, &hit);
        assert_eq!(r.status, 429);
        assert_eq!(r.header("x-should-retry"), Some("false"));
        assert_eq!(r.header("retry-after"), Some("259200"));
        assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("9"));
        assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("1000"));
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"]["code"], "monthly_spend_budget_exhausted");
        assert_eq!(v["error"]["type"], "insufficient_quota");
    }

    #[test]
    fn rate_refusal_says_retry() {
        let p = policy();
        let (_, kinds) = build_reserve("d", "acme", &p, 1, Amounts::default(), false);
        let resp = RateLimitResponse {
            overall_code: Code::OverLimit as i32,
            statuses: vec![
                status(Code::OverLimit, 0, 6),
                status(Code::Ok, 1, 1),
                status(Code::Ok, 1, 1),
                status(Code::Ok, 1, 1),
            ],
        };
        let Verdict::Refuse { states, hit } = decide(&resp, &kinds, &p) else { panic!() };
        let r = refusal_reply(Family::Anthropic, "rid", &states, &hit);
        assert_eq!(r.header("x-should-retry"), Some("true"));
        assert_eq!(r.header("retry-after-ms"), Some("6000"));
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(v["error"]["code"], "request_rate_limited");
    }

    #[test]
    fn unknown_code_is_unreadable() {
        let p = policy();
        let resp = RateLimitResponse { overall_code: 0, statuses: vec![] };
        assert!(matches!(decide(&resp, &[], &p), Verdict::Unreadable(_)));
    }

    #[test]
    fn durations_like_openai() {
        assert_eq!(openai_duration(120), "120ms");
        assert_eq!(openai_duration(6000), "6s");
        assert_eq!(openai_duration(1500), "1.5s");
        assert_eq!(openai_duration(360_000), "6m0s");
        assert_eq!(openai_duration(3_723_000), "1h2m3s");
    }

    #[test]
    fn affordable_output_respects_tokens_and_dollars() {
        let mk = |kind, remaining, over| LimitState { kind, limit: 0, remaining, reset_ms: 0, over };
        let states = [mk(LimitKind::TokensPerDay, 500, true), mk(LimitKind::UsdPerDay, 1000, false)];
        // 10 micro-dollars per output token, input costs 100.
        let n = affordable_output(&states, 200, 100, &|n| n * 10, 4096).unwrap();
        assert_eq!(n, 90); // dollars bind: (1000 - 100) / 10
        let states = [mk(LimitKind::RequestsPerMinute, 0, true)];
        assert_eq!(affordable_output(&states, 1, 1, &|n| n, 10), None);
        let states = [mk(LimitKind::TokensPerDay, 100, true)];
        assert_eq!(affordable_output(&states, 100, 0, &|n| n, 10), None);
    }
}
