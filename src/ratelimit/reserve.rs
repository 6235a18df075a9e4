//! Is there room for this request? The reserve call made before it goes
//! upstream, and what the service's answer to it means.

use crate::config::Policy;
use crate::ratelimit::descriptors::{descriptor, limit_items, Amounts, LimitItem, LimitState, Measure, Scope};
use crate::rls::{self, Code, RateLimitRequest, RateLimitResponse, UInt64Value};

/// The reserve call: `requests` requests charged (1, or more with a quota
/// lease), plus the estimated tokens and cost, at every level of `scope`.
/// `hits` of 0 for every descriptor makes it a pure check (compatibility
/// mode).
pub fn build_reserve(
    domain: &str,
    tenant: &str,
    policy: &Policy,
    scope: Option<&Scope>,
    requests: u64,
    estimate: Amounts,
    check_only: bool,
) -> (RateLimitRequest, Vec<LimitItem>) {
    let items = limit_items(policy, scope);
    let mut descriptors = Vec::with_capacity(items.len());
    for item in &items {
        let mut d = descriptor(tenant, scope, *item, policy);
        let hits = estimate.of(item.kind.measure(), requests);
        d.hits_addend = Some(UInt64Value { value: if check_only { 0 } else { hits } });
        descriptors.push(d);
    }
    (RateLimitRequest { domain: domain.into(), descriptors, hits_addend: 0 }, items)
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

/// Interprets a reserve answer, given the limits in descriptor order.
pub fn decide(resp: &RateLimitResponse, items: &[LimitItem]) -> Verdict {
    let overall = resp.overall_code;
    if overall != Code::Ok as i32 && overall != Code::OverLimit as i32 {
        return Verdict::Unreadable(format!("overall_code {overall}"));
    }
    let mut states = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let limit = item.limit;
        let st = resp.statuses.get(i);
        let over = st.is_some_and(|s| s.code == Code::OverLimit as i32);
        let remaining = st.map_or(limit, |s| u64::from(s.limit_remaining)).min(limit);
        let reset_ms = st.and_then(|s| s.duration_until_reset.as_ref()).map_or(0, rls::Duration::as_millis);
        states.push(LimitState { level: item.level, kind: item.kind, limit, remaining, reset_ms, over });
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

/// Output tokens the caller can still afford, given the remaining capacity of
/// every over-limit token or dollar limit, the input estimate and the price of
/// `n` output tokens (`micros_for_output(n)`). `None` when a request-count
/// or input-token limit is over (clamping output cannot help) or nothing fits.
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
            Measure::Requests | Measure::InputTokens if s.over => return None,
            Measure::Requests | Measure::InputTokens => {}
            Measure::Tokens => best = best.min(s.remaining.saturating_sub(input_tokens)),
            Measure::OutputTokens => best = best.min(s.remaining),
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
    use crate::ratelimit::descriptors::tests::policy;
    use crate::ratelimit::descriptors::{Level, LimitKind};

    fn amounts(tokens: u64, micros: u64) -> Amounts {
        Amounts { tokens, input: tokens / 3, output: tokens - tokens / 3, micros }
    }

    #[test]
    fn reserve_carries_every_limit() {
        let (req, items) = build_reserve("tollgate", "acme", &policy(), None, 1, amounts(300, 4500), false);
        let kinds: Vec<_> = items.iter().map(|i| i.kind).collect();
        assert_eq!(
            kinds,
            vec![
                LimitKind::RequestsPerMinute,
                LimitKind::TokensPerMinute,
                LimitKind::TokensPerMonth,
                LimitKind::UsdPerMonth
            ]
        );
        assert!(items.iter().all(|i| i.level == Level::Tenant));
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
    fn input_and_output_limits_are_charged_their_own_measure() {
        let mut p = policy();
        p.limits = Default::default();
        p.limits.set(LimitKind::InputTokensPerMinute, Some(1000));
        p.limits.set(LimitKind::OutputTokensPerMinute, Some(1000));
        let (req, _) = build_reserve("d", "acme", &p, None, 1, amounts(300, 0), false);
        let hits: Vec<u64> = req.descriptors.iter().map(|d| d.hits_addend.as_ref().unwrap().value).collect();
        assert_eq!(hits, vec![100, 200]);
    }

    #[test]
    fn unknown_code_is_unreadable() {
        let resp = RateLimitResponse { overall_code: 0, statuses: vec![] };
        assert!(matches!(decide(&resp, &[]), Verdict::Unreadable(_)));
    }

    #[test]
    fn affordable_output_respects_tokens_and_dollars() {
        let mk =
            |kind, remaining, over| LimitState { level: Level::Tenant, kind, limit: 0, remaining, reset_ms: 0, over };
        let states = [mk(LimitKind::TokensPerDay, 500, true), mk(LimitKind::UsdPerDay, 1000, false)];
        // 10 micro-dollars per output token, input costs 100.
        let n = affordable_output(&states, 200, 100, &|n| n * 10, 4096).unwrap();
        assert_eq!(n, 90); // dollars bind: (1000 - 100) / 10
        let states = [mk(LimitKind::RequestsPerMinute, 0, true)];
        assert_eq!(affordable_output(&states, 1, 1, &|n| n, 10), None);
        let states = [mk(LimitKind::TokensPerDay, 100, true)];
        assert_eq!(affordable_output(&states, 100, 0, &|n| n, 10), None);
        let states = [mk(LimitKind::OutputTokensPerMinute, 40, true)];
        assert_eq!(affordable_output(&states, 100, 0, &|n| n, 100), Some(40));
    }
}
