//! What does the client hear about its limits? The `x-ratelimit-*` headers
//! and the 429 reply to a refused reserve.

use crate::llm::{self, Family, LocalReply, Refusal};
use crate::ratelimit::descriptors::{Level, LimitState, Measure};

/// Formats a duration the way OpenAI's `x-ratelimit-reset-*` does: `6m0s`,
/// `1.5s`, `120ms`. Written into one buffer: it runs on every response.
pub fn openai_duration(ms: u64) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(12);
    if ms < 1000 {
        let _ = write!(out, "{ms}ms");
        return out;
    }
    let total_s = ms / 1000;
    let frac = ms % 1000;
    let (h, m, s) = (total_s / 3600, (total_s % 3600) / 60, total_s % 60);
    if h > 0 {
        let _ = write!(out, "{h}h{m}m");
    } else if m > 0 {
        let _ = write!(out, "{m}m");
    }
    let _ = write!(out, "{s}");
    if frac != 0 {
        let digits = [frac / 100, (frac / 10) % 10, frac % 10];
        let keep = if frac.is_multiple_of(100) {
            1
        } else if frac.is_multiple_of(10) {
            2
        } else {
            3
        };
        out.push('.');
        for d in digits.iter().take(keep) {
            out.push(char::from(b'0' + *d as u8));
        }
    }
    out.push('s');
    out
}

/// OpenAI-style `x-ratelimit-*` headers for the request and token rates:
/// of every level's rates of that measure (input and output token rates
/// count as tokens), the tightest (least remaining); without a rate, the
/// tightest budget.
pub fn ratelimit_headers(states: &[LimitState]) -> Vec<(String, String)> {
    const NAMES: [[&str; 3]; 2] = [
        ["x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"],
        ["x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"],
    ];
    let mut out = Vec::with_capacity(6);
    for (names, tokens) in NAMES.iter().zip([false, true]) {
        let pick = states
            .iter()
            .filter(|s| match s.kind.measure() {
                Measure::Requests => !tokens,
                Measure::Tokens | Measure::InputTokens | Measure::OutputTokens => tokens,
                Measure::Micros => false,
            })
            .min_by_key(|s| (s.kind.is_budget(), s.remaining, s.kind.window()));
        if let Some(s) = pick {
            let [limit, remaining, reset] = names;
            out.push(((*limit).to_string(), s.limit.to_string()));
            out.push(((*remaining).to_string(), s.remaining.to_string()));
            out.push(((*reset).to_string(), openai_duration(s.reset_ms)));
        }
    }
    out
}

/// The 429 for a refused reserve, in the client's envelope.
pub fn refusal_reply(family: Family, request_id: &str, states: &[LimitState], hit: &LimitState) -> LocalReply {
    let kind = hit.kind;
    let when = openai_duration(hit.reset_ms);
    let what = kind.name().replace('_', " ");
    let message = match (hit.level, kind.is_budget()) {
        (level, true) => format!("{} {what} budget is exhausted; it renews in {when}.", level.owner()),
        (Level::Tenant, false) => format!("Rate limit reached for {what}; retry in {when}."),
        (level, false) => format!("{} rate limit reached for {what}; retry in {when}.", level.owner()),
    };
    let refusal = Refusal::Custom { status: 429, code: hit.level.refusal_code(kind), message };
    let openai_type = match (kind.is_budget(), kind.measure()) {
        (true, _) => "insufficient_quota",
        (false, Measure::Requests) => "requests",
        (false, _) => "tokens",
    };
    let mut reply = llm::render(family, &refusal, request_id, Some(openai_type));
    reply.headers.extend(llm::retry_headers(hit.reset_ms, !kind.is_budget()));
    let limit = match hit.level {
        Level::Tenant => kind.name().to_string(),
        level => format!("{}.{}", level.name(), kind.name()),
    };
    reply.headers.push(("x-tollgate-limit".into(), limit));
    reply.headers.extend(ratelimit_headers(states));
    reply
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::descriptors::tests::policy;
    use crate::ratelimit::descriptors::{Amounts, LimitKind};
    use crate::ratelimit::reserve::{build_reserve, decide, Verdict};
    use crate::rls::{self, Code, RateLimitResponse};

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
        let (_, kinds) = build_reserve("d", "acme", &p, None, 1, Amounts::default(), false);
        let resp = RateLimitResponse {
            overall_code: Code::OverLimit as i32,
            statuses: vec![
                status(Code::Ok, 9, 6),
                status(Code::OverLimit, 0, 30),
                status(Code::Ok, 100, 86400),
                status(Code::OverLimit, 0, 86400 * 3),
            ],
        };
        let Verdict::Refuse { states, hit } = decide(&resp, &kinds) else { panic!() };
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
        let (_, kinds) = build_reserve("d", "acme", &p, None, 1, Amounts::default(), false);
        let resp = RateLimitResponse {
            overall_code: Code::OverLimit as i32,
            statuses: vec![
                status(Code::OverLimit, 0, 6),
                status(Code::Ok, 1, 1),
                status(Code::Ok, 1, 1),
                status(Code::Ok, 1, 1),
            ],
        };
        let Verdict::Refuse { states, hit } = decide(&resp, &kinds) else { panic!() };
        let r = refusal_reply(Family::Anthropic, "rid", &states, &hit);
        assert_eq!(r.header("x-should-retry"), Some("true"));
        assert_eq!(r.header("retry-after-ms"), Some("6000"));
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(v["error"]["code"], "request_rate_limited");
    }

    #[test]
    fn durations_like_openai() {
        assert_eq!(openai_duration(120), "120ms");
        assert_eq!(openai_duration(6000), "6s");
        assert_eq!(openai_duration(1500), "1.5s");
        assert_eq!(openai_duration(360_000), "6m0s");
        assert_eq!(openai_duration(3_723_000), "1h2m3s");
        assert_eq!(openai_duration(1050), "1.05s");
        assert_eq!(openai_duration(61_005), "1m1.005s");
        assert_eq!(openai_duration(3_600_000), "1h0m0s");
        assert_eq!(openai_duration(0), "0ms");
    }
}
