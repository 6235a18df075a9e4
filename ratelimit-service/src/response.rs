//! Pure translation of a plan and its storage outcome into the RLS answer.
//!
//! Per descriptor, in request order:
//! - unlimited: `OK`, no `current_limit`, `limit_remaining` 0 (as envoyproxy/ratelimit);
//! - `current_limit.requests_per_unit` is the full limit saturated at u32::MAX;
//! - `limit_remaining` saturates at u32::MAX;
//! - code `OVER_LIMIT` when the request was refused and this descriptor did not fit,
//!   or (settle / replay) when usage is now strictly above the limit;
//! - `duration_until_reset`: calendar = until the window ends; GCRA = until the
//!   bucket is full again, except for a GCRA descriptor that refused the request:
//!   until the request's hits would fit (a retry-after). If the hits exceed the
//!   whole limit they never fit; the full-refill time is given.

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{Code, DescriptorStatus, RateLimit};
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse;
use envoy_types::pb::google::protobuf::Duration;
use rls_contract::RESPONSE_UNIT_WEEK;

use crate::plan::{DescriptorPlan, Plan};
use crate::storage::{Algorithm, Counter, CounterState, Outcome};

fn sat32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

fn duration_ms(ms: u64) -> Duration {
    Duration { seconds: (ms / 1000) as i64, nanos: ((ms % 1000) * 1_000_000) as i32 }
}

fn ceil_div(a: u128, b: u128) -> u128 {
    if b == 0 {
        0
    } else {
        a.div_ceil(b)
    }
}

/// Remaining hits, ms until reset, and whether usage is strictly above the limit.
pub fn counter_status(c: &Counter, s: &CounterState, refused_here: bool, now_ms: i64) -> (u64, u64, bool) {
    match c.algorithm {
        Algorithm::Calendar { end_ms, .. } => {
            let remaining = c.limit.saturating_sub(s.used);
            let reset = u64::try_from(end_ms.saturating_sub(now_ms)).unwrap_or(0);
            (remaining, reset, s.used > c.limit)
        }
        Algorithm::Gcra { period_ms } => {
            let (limit, period, level) = (u128::from(c.limit), u128::from(period_ms), u128::from(s.used));
            let cap = limit * period;
            let remaining = if level >= cap { 0 } else { (cap - level) / period.max(1) };
            let full_refill = ceil_div(level, limit);
            let reset = if refused_here && u128::from(c.hits) <= limit {
                let need = level + u128::from(c.hits) * period;
                ceil_div(need.saturating_sub(cap), limit)
            } else {
                full_refill
            };
            (u64::try_from(remaining).unwrap_or(u64::MAX), u64::try_from(reset).unwrap_or(u64::MAX), level > cap)
        }
    }
}

/// Build the answer.
pub fn build(plan: &Plan, outcome: &Outcome, now_ms: i64) -> RateLimitResponse {
    let overall = if outcome.allowed { Code::Ok } else { Code::OverLimit };
    let statuses = plan
        .descriptors
        .iter()
        .map(|d| match d {
            DescriptorPlan::Unlimited => DescriptorStatus { code: Code::Ok as i32, ..Default::default() },
            DescriptorPlan::Limited { counter, unit, name, week } => {
                // A plan only names its own counters; a missing one answers
                // as unlimited rather than panic.
                let Some(c) = plan.batch.counters.get(*counter) else {
                    return DescriptorStatus { code: Code::Ok as i32, ..Default::default() };
                };
                let s = outcome.counters.get(*counter).copied().unwrap_or(CounterState { fits: true, used: 0 });
                let refused_here = !outcome.allowed && !outcome.replay && !s.fits;
                let (remaining, reset_ms, above) = counter_status(c, &s, refused_here, now_ms);
                let code = if refused_here || above { Code::OverLimit } else { Code::Ok };
                DescriptorStatus {
                    code: code as i32,
                    current_limit: Some(RateLimit {
                        name: name.clone(),
                        requests_per_unit: sat32(c.limit),
                        // Requests have no WEEK unit, answers do.
                        unit: if *week { RESPONSE_UNIT_WEEK } else { *unit as i32 },
                    }),
                    limit_remaining: sat32(remaining),
                    duration_until_reset: Some(duration_ms(reset_ms)),
                    ..Default::default()
                }
            }
        })
        .collect();
    RateLimitResponse { overall_code: overall as i32, statuses, ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gcra(limit: u64, hits: u64) -> Counter {
        Counter {
            key: "k".into(),
            hash_tag: "{t}".into(),
            algorithm: Algorithm::Gcra { period_ms: 60_000 },
            limit,
            hits,
            refund: false,
        }
    }

    #[test]
    fn gcra_retry_after_is_time_until_hits_fit() {
        // 60/min: one hit costs 60000 hit·ms and drains in 1000 ms.
        let c = gcra(60, 3);
        let full = CounterState { fits: false, used: 60 * 60_000 };
        let (rem, reset, above) = counter_status(&c, &full, true, 0);
        assert_eq!((rem, reset, above), (0, 3000, false));
        let (_, reset, _) = counter_status(&c, &full, false, 0);
        assert_eq!(reset, 60_000);
        // hits above the whole limit never fit: full refill time
        let c = gcra(60, 61);
        let (_, reset, _) = counter_status(&c, &full, true, 0);
        assert_eq!(reset, 60_000);
    }

    #[test]
    fn a_week_is_answered_with_unit_week() {
        let plan = |week| Plan {
            descriptors: vec![DescriptorPlan::Limited {
                counter: 0,
                unit: rls_contract::Unit::Day,
                name: String::new(),
                week,
            }],
            batch: crate::storage::Batch {
                now_ms: 0,
                settle: false,
                counters: vec![Counter {
                    key: "k".into(),
                    hash_tag: "{t}".into(),
                    algorithm: Algorithm::Calendar { start_ms: 0, end_ms: 7 * 86_400_000 },
                    limit: 10,
                    hits: 1,
                    refund: false,
                }],
                idempotency: None,
                ledger: None,
            },
        };
        let outcome = Outcome {
            allowed: true,
            replay: false,
            counters: vec![CounterState { fits: true, used: 1 }],
            alerts: vec![],
        };
        let unit = |week| build(&plan(week), &outcome, 0).statuses[0].current_limit.as_ref().map(|l| l.unit);
        assert_eq!(unit(true), Some(7));
        assert_eq!(unit(false), Some(4));
    }

    #[test]
    fn calendar_remaining_and_reset() {
        let c = Counter {
            key: "k".into(),
            hash_tag: "{t}".into(),
            algorithm: Algorithm::Calendar { start_ms: 0, end_ms: 10_000 },
            limit: 10_000_000_000,
            hits: 1,
            refund: false,
        };
        let (rem, reset, above) = counter_status(&c, &CounterState { fits: true, used: 5 }, false, 2_500);
        assert_eq!((rem, reset, above), (9_999_999_995, 7_500, false));
        assert_eq!(sat32(rem), u32::MAX);
        assert_eq!(duration_ms(7_500), Duration { seconds: 7, nanos: 500_000_000 });
    }
}
