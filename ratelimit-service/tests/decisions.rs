//! Decision logic against a real redis-server, with a manual clock.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test and bench code: a failure should stop loudly
#![allow(clippy::cloned_ref_to_slice_refs)] // &[d.clone()] reads better in tests

mod common;

use std::sync::Arc;

use common::*;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use rls_contract::Mode;
use tollgate_ratelimit::config::StaticLimits;
use tollgate_ratelimit::plan::RequestMeta;
use tollgate_ratelimit::storage::redis::RedisTarget;

const T0: i64 = 1_750_000_000_000; // 2025-06-15T15:06:40Z

fn reserve() -> RequestMeta {
    RequestMeta::default()
}

fn settle(key: Option<&str>) -> RequestMeta {
    RequestMeta { mode: Mode::Settle, idempotency_key: key.map(str::to_owned), usage: vec![] }
}

async fn run(l: &Limiter, r: &RateLimitRequest, m: &RequestMeta) -> RateLimitResponse {
    l.decide(r, m).await.expect("decision")
}

fn remaining(r: &RateLimitResponse) -> Vec<u32> {
    r.statuses.iter().map(|s| s.limit_remaining).collect()
}

fn reset_ms(r: &RateLimitResponse, i: usize) -> i64 {
    let d = r.statuses[i].duration_until_reset.as_ref().expect("duration");
    d.seconds * 1000 + i64::from(d.nanos) / 1_000_000
}

#[tokio::test]
async fn exact_limit_allowed_then_refused() {
    let redis = RedisServer::start();
    let (l, _, _) = limiter(&redis, T0);
    let d = D::new(&[("tenant", "acme"), ("budget", "tokens")]).limit(10, DAY);
    let r = run(&l, &req("tollgate", &[d.clone().hits(7)]), &reserve()).await;
    assert_eq!((r.overall_code, remaining(&r)), (OK, vec![3]));
    let r = run(&l, &req("tollgate", &[d.clone().hits(4)]), &reserve()).await;
    assert_eq!((r.overall_code, r.statuses[0].code, remaining(&r)), (OVER, OVER, vec![3]));
    let r = run(&l, &req("tollgate", &[d.clone().hits(3)]), &reserve()).await;
    assert_eq!((r.overall_code, remaining(&r)), (OK, vec![0]));
    // pure check at exactly the limit passes (usage + 0 is not above it), charges nothing
    let r = run(&l, &req("tollgate", &[d.clone().hits(0)]), &reserve()).await;
    assert_eq!((r.overall_code, remaining(&r)), (OK, vec![0]));
    // request-level hits_addend 0 counts as 1
    let r = run(&l, &req("tollgate", &[d.clone()]), &reserve()).await;
    assert_eq!(r.overall_code, OVER);
    let limit = r.statuses[0].current_limit.as_ref().expect("limit");
    assert_eq!((limit.requests_per_unit, limit.unit), (10, DAY));
}

#[tokio::test]
async fn all_or_nothing() {
    let redis = RedisServer::start();
    let (l, _, _) = limiter(&redis, T0);
    let big = D::new(&[("tenant", "acme"), ("b", "big")]).limit(100, DAY);
    let small = D::new(&[("tenant", "acme"), ("b", "small")]).limit(5, MONTH);
    let rpm = D::new(&[("tenant", "acme"), ("b", "rpm")]).limit(100, MINUTE);
    let r =
        run(&l, &req("tollgate", &[big.clone().hits(4), small.clone().hits(4), rpm.clone().hits(4)]), &reserve()).await;
    assert_eq!((r.overall_code, remaining(&r)), (OK, vec![96, 1, 96]));
    let r =
        run(&l, &req("tollgate", &[big.clone().hits(2), small.clone().hits(2), rpm.clone().hits(2)]), &reserve()).await;
    assert_eq!(r.overall_code, OVER);
    assert_eq!(r.statuses.iter().map(|s| s.code).collect::<Vec<_>>(), vec![OK, OVER, OK]);
    // nothing was charged
    let r = run(&l, &req("tollgate", &[big.hits(0), small.hits(0), rpm.hits(0)]), &reserve()).await;
    assert_eq!((r.overall_code, remaining(&r)), (OK, vec![96, 1, 96]));
}

#[tokio::test]
async fn refunds_clamp_at_zero_and_settle_is_unconditional() {
    let redis = RedisServer::start();
    let (l, _, _) = limiter(&redis, T0);
    let d = D::new(&[("tenant", "acme"), ("budget", "usd")]).limit(1_000, DAY);
    run(&l, &req("tollgate", &[d.clone().hits(300)]), &reserve()).await;
    let r = run(&l, &req("tollgate", &[d.clone().refund(500)]), &reserve()).await;
    assert_eq!((r.overall_code, remaining(&r)), (OK, vec![1_000]));
    // settle goes over the limit: accepted, answer OK, descriptor marked over
    let r = run(&l, &req("tollgate", &[d.clone().hits(1_200)]), &settle(None)).await;
    assert_eq!((r.overall_code, r.statuses[0].code, remaining(&r)), (OK, OVER, vec![0]));
    let r = run(&l, &req("tollgate", &[d.clone().hits(1)]), &reserve()).await;
    assert_eq!(r.overall_code, OVER);
    // refund the overshoot
    let r = run(&l, &req("tollgate", &[d.clone().refund(700)]), &settle(None)).await;
    assert_eq!((r.overall_code, r.statuses[0].code, remaining(&r)), (OK, OK, vec![500]));
}

#[tokio::test]
async fn gcra_refund_and_settle_debt() {
    let redis = RedisServer::start();
    let (l, clock, _) = limiter(&redis, T0);
    let d = D::new(&[("tenant", "acme"), ("r", "tpm")]).limit(600, MINUTE);
    assert_eq!(run(&l, &req("t", &[d.clone().hits(500)]), &reserve()).await.overall_code, OK);
    // a refund larger than the level clamps at an empty bucket
    let r = run(&l, &req("t", &[d.clone().refund(900)]), &reserve()).await;
    assert_eq!(remaining(&r), vec![600]);
    // settle into debt: 1200 tokens at 10/s takes 60 s to get back to a full... 120 s to drain
    let r = run(&l, &req("t", &[d.clone().hits(1_200)]), &settle(None)).await;
    assert_eq!((r.overall_code, r.statuses[0].code, reset_ms(&r, 0)), (OK, OVER, 120_000));
    clock.advance(59_000);
    assert_eq!(run(&l, &req("t", &[d.clone().hits(1)]), &reserve()).await.overall_code, OVER);
    clock.advance(1_100);
    assert_eq!(run(&l, &req("t", &[d.clone().hits(1)]), &reserve()).await.overall_code, OK);
}

#[tokio::test]
async fn settle_retried_charges_once() {
    let redis = RedisServer::start();
    let (l, _, metrics) = limiter(&redis, T0);
    let d = D::new(&[("tenant", "acme"), ("budget", "tokens")]).limit(1_000, MONTH);
    for _ in 0..5 {
        let r = run(&l, &req("tollgate", &[d.clone().hits(250)]), &settle(Some("req-42"))).await;
        assert_eq!((r.overall_code, remaining(&r)), (OK, vec![750]));
    }
    // a refund settle under another key applies once as well
    for _ in 0..3 {
        let r = run(&l, &req("tollgate", &[d.clone().refund(50)]), &settle(Some("req-43"))).await;
        assert_eq!(remaining(&r), vec![800]);
    }
    // the same key in reserve mode is a different operation
    let r = run(
        &l,
        &req("tollgate", &[d.clone().hits(100)]),
        &RequestMeta { mode: Mode::Reserve, idempotency_key: Some("req-42".into()), usage: vec![] },
    )
    .await;
    assert_eq!(remaining(&r), vec![700]);
    assert!(metrics.encode().contains("tollgate_rls_idempotent_replays_total 6"), "{}", metrics.encode());
}

#[tokio::test]
async fn idempotent_reserve_replays_the_decision() {
    let redis = RedisServer::start();
    let (l, _, _) = limiter(&redis, T0);
    let d = D::new(&[("tenant", "acme")]).limit(10, DAY);
    let key = |k: &str| RequestMeta { mode: Mode::Reserve, idempotency_key: Some(k.into()), usage: vec![] };
    let r = run(&l, &req("tollgate", &[d.clone().hits(8)]), &key("a")).await;
    assert_eq!(r.overall_code, OK);
    let r = run(&l, &req("tollgate", &[d.clone().hits(8)]), &key("b")).await;
    assert_eq!(r.overall_code, OVER);
    // retries: same codes, nothing charged again
    for _ in 0..3 {
        assert_eq!(run(&l, &req("tollgate", &[d.clone().hits(8)]), &key("a")).await.overall_code, OK);
        assert_eq!(run(&l, &req("tollgate", &[d.clone().hits(8)]), &key("b")).await.overall_code, OVER);
    }
    let r = run(&l, &req("tollgate", &[d.clone().hits(2)]), &key("c")).await;
    assert_eq!((r.overall_code, remaining(&r)), (OK, vec![0]));
}

#[tokio::test]
async fn a_retry_across_the_upgrade_to_short_keys_finds_the_old_decision() {
    let redis = RedisServer::start();
    let (l, _, metrics) = limiter(&redis, T0);
    let d = D::new(&[("tenant", "acme")]).limit(10, DAY);
    let meta = |mode: Mode, k: &str| RequestMeta { mode, idempotency_key: Some(k.into()), usage: vec![] };
    // first attempts answered by the service before the upgrade: a reserve
    // it refused, a settle it applied (stored under the old names)
    redis.cli(&["SET", "tg:{tollgate|acme}:idem:reserve:req-1%3Ar1", "2", "PX", "60000"]).expect("set");
    redis.cli(&["SET", "tg:{tollgate|acme}:idem:settle:req-1%3Asettle", "1", "PX", "60000"]).expect("set");
    // their retries replay the stored decision and charge nothing
    let r = run(&l, &req("tollgate", &[d.clone().hits(2)]), &meta(Mode::Reserve, "req-1:r1")).await;
    assert_eq!((r.overall_code, remaining(&r)), (OVER, vec![10]));
    let r = run(&l, &req("tollgate", &[d.clone().hits(3)]), &meta(Mode::Settle, "req-1:settle")).await;
    assert_eq!((r.overall_code, remaining(&r)), (OK, vec![10]));
    assert!(metrics.encode().contains("tollgate_rls_idempotent_replays_total 2"), "{}", metrics.encode());
    // a new call is stored under the short name only
    let r = run(&l, &req("tollgate", &[d.clone().hits(3)]), &meta(Mode::Reserve, "req-2:r1")).await;
    assert_eq!((r.overall_code, remaining(&r)), (OK, vec![7]));
    let short = tollgate_ratelimit::keys::idempotency_key("{tollgate|acme}", Mode::Reserve, "req-2:r1");
    assert_eq!(redis.cli(&["GET", &short]).expect("get").trim(), "1");
    assert_eq!(redis.cli(&["EXISTS", "tg:{tollgate|acme}:idem:reserve:req-2%3Ar1"]).expect("exists").trim(), "0");
}

#[tokio::test]
async fn big_numbers_use_tollgate_limit_and_saturate() {
    let redis = RedisServer::start();
    let (l, _, _) = limiter(&redis, T0);
    // $50,000 a month in micro-dollars
    let d = D::new(&[("tenant", "acme"), ("budget", "usd_micros")]).limit(50_000_000_000, MONTH);
    let r = run(&l, &req("tollgate", &[d.clone().hits(10_000_000_000)]), &reserve()).await;
    assert_eq!(r.overall_code, OK);
    assert_eq!(r.statuses[0].limit_remaining, u32::MAX); // 40e9 saturates
    assert_eq!(r.statuses[0].current_limit.as_ref().map(|l| l.requests_per_unit), Some(u32::MAX));
    let r = run(&l, &req("tollgate", &[d.clone().hits(39_999_999_999)]), &reserve()).await;
    assert_eq!((r.overall_code, remaining(&r)), (OK, vec![1]));
    let r = run(&l, &req("tollgate", &[d.clone().hits(2)]), &reserve()).await;
    assert_eq!(r.overall_code, OVER);
}

#[tokio::test]
async fn invalid_reserved_values_are_invalid_argument() {
    let redis = RedisServer::start();
    let (l, _, _) = limiter(&redis, T0);
    let bad = D::new(&[("tenant", "acme")]).limit(10, MONTH).entry("tollgate.anchor_day", "40");
    let e = l.decide(&req("tollgate", &[bad]), &reserve()).await.expect_err("invalid");
    let status = tonic::Status::from(e);
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("tollgate.anchor_day"), "{}", status.message());
}

#[tokio::test]
async fn gcra_smooth_rate_without_double_burst() {
    let redis = RedisServer::start();
    let (l, clock, _) = limiter(&redis, T0 - T0 % 60_000 + 59_000); // one second before a minute edge
    let d = D::new(&[("tenant", "acme"), ("r", "rpm")]).limit(60, MINUTE);
    let one = req("tollgate", &[d.clone().hits(1)]);
    // burst: the full limit at once
    for _ in 0..60 {
        assert_eq!(run(&l, &one, &reserve()).await.overall_code, OK);
    }
    let r = run(&l, &one, &reserve()).await;
    assert_eq!(r.overall_code, OVER);
    assert_eq!(reset_ms(&r, 0), 1_000); // one hit drains every second
                                        // crossing the minute edge gives no new burst
    clock.advance(1_500);
    assert_eq!(run(&l, &one, &reserve()).await.overall_code, OK);
    assert_eq!(run(&l, &one, &reserve()).await.overall_code, OVER);
    // steady state: one per second, no more
    let mut admitted = 0;
    for _ in 0..120 {
        clock.advance(250);
        if run(&l, &one, &reserve()).await.overall_code == OK {
            admitted += 1;
        }
    }
    assert!((29..=31).contains(&admitted), "admitted {admitted} in 30 s at 1/s");
    // retry-after for 5 hits
    let r = run(&l, &req("tollgate", &[d.clone().hits(5)]), &reserve()).await;
    assert_eq!(r.overall_code, OVER);
    let wait = reset_ms(&r, 0);
    assert!((4_000..=5_000).contains(&wait), "wait {wait}");
    clock.advance(wait);
    assert_eq!(run(&l, &req("tollgate", &[d.clone().hits(5)]), &reserve()).await.overall_code, OK);
    // idle for a long time refills to the full burst, and not beyond
    clock.advance(600_000);
    let r = run(&l, &req("tollgate", &[d.clone().hits(0)]), &reserve()).await;
    assert_eq!(remaining(&r), vec![60]);
    assert_eq!(run(&l, &req("tollgate", &[d.clone().hits(61)]), &reserve()).await.overall_code, OVER);
    assert_eq!(run(&l, &req("tollgate", &[d.clone().hits(60)]), &reserve()).await.overall_code, OK);
}

#[tokio::test]
async fn gcra_a_clock_behind_does_not_refill_twice() {
    // Two callers one second apart in their clock readings (two replicas, or a
    // request whose charge is given back after others wrote the bucket).
    let redis = RedisServer::start();
    let (ahead, _, _) = limiter(&redis, T0 + 1_000);
    let (behind, _, _) = limiter(&redis, T0);
    let d = D::new(&[("tenant", "acme"), ("r", "rpm")]).limit(60, MINUTE);
    assert_eq!(run(&ahead, &req("t", &[d.clone().hits(30)]), &reserve()).await.overall_code, OK);
    assert_eq!(run(&behind, &req("t", &[d.clone().hits(30)]), &reserve()).await.overall_code, OK);
    // the bucket is full as of T0 + 1 s: no time has passed for the caller ahead
    let r = run(&ahead, &req("t", &[d.clone().hits(1)]), &reserve()).await;
    assert_eq!((r.overall_code, reset_ms(&r, 0)), (OVER, 1_000));
    // and a refund from behind does not set the bucket's time back either
    assert_eq!(run(&behind, &req("t", &[d.clone().refund(1)]), &reserve()).await.overall_code, OK);
    assert_eq!(run(&ahead, &req("t", &[d.clone().hits(1)]), &reserve()).await.overall_code, OK);
    assert_eq!(run(&ahead, &req("t", &[d.clone().hits(1)]), &reserve()).await.overall_code, OVER);
}

#[tokio::test]
async fn gcra_per_second_tokens() {
    let redis = RedisServer::start();
    let (l, clock, _) = limiter(&redis, T0);
    let d = D::new(&[("tenant", "acme"), ("r", "tps")]).limit(1_000, SECOND);
    assert_eq!(run(&l, &req("t", &[d.clone().hits(1_000)]), &reserve()).await.overall_code, OK);
    clock.advance(100);
    let r = run(&l, &req("t", &[d.clone().hits(101)]), &reserve()).await;
    assert_eq!((r.overall_code, reset_ms(&r, 0)), (OVER, 1));
    let r = run(&l, &req("t", &[d.clone().hits(100)]), &reserve()).await;
    assert_eq!((r.overall_code, remaining(&r), reset_ms(&r, 0)), (OK, vec![0], 1_000));
}

#[tokio::test]
async fn calendar_month_end_and_leap_day() {
    let redis = RedisServer::start();
    let (l, clock, _) = limiter(&redis, ms("2024-01-31T23:59:59Z"));
    let month = D::new(&[("tenant", "acme"), ("b", "m")]).limit(10, MONTH);
    let day = D::new(&[("tenant", "acme"), ("b", "d")]).limit(10, DAY);
    let r = run(&l, &req("t", &[month.clone().hits(10), day.clone().hits(10)]), &reserve()).await;
    assert_eq!((r.overall_code, reset_ms(&r, 0), reset_ms(&r, 1)), (OK, 1_000, 1_000));
    assert_eq!(run(&l, &req("t", &[month.clone().hits(1)]), &reserve()).await.overall_code, OVER);
    clock.set(ms("2024-02-01T00:00:00Z"));
    let r = run(&l, &req("t", &[month.clone().hits(1)]), &reserve()).await;
    assert_eq!((r.overall_code, remaining(&r)), (OK, vec![9]));
    // leap day is its own day; the month (29 days) ends on Mar 1
    clock.set(ms("2024-02-29T12:00:00Z"));
    let r = run(&l, &req("t", &[day.clone().hits(10), month.clone().hits(1)]), &reserve()).await;
    assert_eq!((r.overall_code, remaining(&r)), (OK, vec![0, 8]));
    assert_eq!(reset_ms(&r, 0), 12 * 3_600_000);
    assert_eq!(reset_ms(&r, 1), 12 * 3_600_000);
    clock.set(ms("2024-03-01T00:00:00Z"));
    let r = run(&l, &req("t", &[day.clone().hits(10), month.clone().hits(10)]), &reserve()).await;
    assert_eq!(r.overall_code, OK);
}

#[tokio::test]
async fn calendar_anchor_31_in_february_and_time_zone_dst() {
    let redis = RedisServer::start();
    let (l, clock, _) = limiter(&redis, ms("2025-02-27T12:00:00Z"));
    let m = D::new(&[("tenant", "acme"), ("b", "m")]).limit(5, MONTH).entry("tollgate.anchor_day", "31");
    assert_eq!(run(&l, &req("t", &[m.clone().hits(5)]), &reserve()).await.overall_code, OK);
    let r = run(&l, &req("t", &[m.clone().hits(1)]), &reserve()).await;
    assert_eq!((r.overall_code, reset_ms(&r, 0)), (OVER, 12 * 3_600_000)); // renews Feb 28 00:00
    clock.set(ms("2025-02-28T00:00:00Z"));
    assert_eq!(run(&l, &req("t", &[m.clone().hits(5)]), &reserve()).await.overall_code, OK);

    // New York spring-forward day lasts 23 hours
    clock.set(ms("2025-03-09T01:00:00-05:00"));
    let d = D::new(&[("tenant", "acme"), ("b", "d")]).limit(3, DAY).entry("tollgate.tz", "America/New_York");
    let r = run(&l, &req("t", &[d.clone().hits(3)]), &reserve()).await;
    assert_eq!((r.overall_code, reset_ms(&r, 0)), (OK, 22 * 3_600_000));
    clock.set(ms("2025-03-09T23:59:00-04:00"));
    assert_eq!(run(&l, &req("t", &[d.clone().hits(1)]), &reserve()).await.overall_code, OVER);
    clock.set(ms("2025-03-10T00:00:00-04:00"));
    assert_eq!(run(&l, &req("t", &[d.clone().hits(3)]), &reserve()).await.overall_code, OK);
    // fall-back day lasts 25 hours
    clock.set(ms("2025-11-02T00:00:00-04:00"));
    let r = run(&l, &req("t", &[d.clone().hits(1)]), &reserve()).await;
    assert_eq!(reset_ms(&r, 0), 25 * 3_600_000);
}

#[tokio::test]
async fn hourly_limit_admits_exactly_its_limit_then_one_per_36_s() {
    let redis = RedisServer::start();
    // one second before an hour edge: the edge brings no new burst
    let (l, clock, _) = limiter(&redis, T0 - T0 % 3_600_000 + 3_599_000);
    // as the filter sends requests_per_hour: unit HOUR, one hit per request
    let d = D::new(&[("tenant", "acme"), ("limit", "requests_per_hour")]).limit(100, HOUR);
    let one = req("tollgate", &[d.clone()]);
    for i in 0..100 {
        let r = run(&l, &one, &reserve()).await;
        assert_eq!((r.overall_code, remaining(&r)), (OK, vec![99 - i]), "request {i}");
    }
    let r = run(&l, &one, &reserve()).await;
    assert_eq!((r.overall_code, r.statuses[0].code, remaining(&r)), (OVER, OVER, vec![0]));
    assert_eq!(reset_ms(&r, 0), 36_000, "100/h: one request drains every 36 s");
    let limit = r.statuses[0].current_limit.as_ref().expect("limit");
    assert_eq!((limit.requests_per_unit, limit.unit), (100, HOUR));
    // across the hour edge, 1 ms short of one request's worth: still refused
    clock.advance(35_999);
    assert_eq!(run(&l, &one, &reserve()).await.overall_code, OVER);
    clock.advance(1);
    assert_eq!(run(&l, &one, &reserve()).await.overall_code, OK);
    assert_eq!(run(&l, &one, &reserve()).await.overall_code, OVER);
    // an idle hour refills exactly the limit
    clock.advance(3_600_000);
    for _ in 0..100 {
        assert_eq!(run(&l, &one, &reserve()).await.overall_code, OK);
    }
    assert_eq!(run(&l, &one, &reserve()).await.overall_code, OVER);
}

#[tokio::test]
async fn weekly_budget_renews_on_monday_in_its_zone() {
    let redis = RedisServer::start();
    // Sunday 23:00 in New York, in the week DST started (Mon 03-03 to Mon 03-10: 167 h)
    let (l, clock, _) = limiter(&redis, ms("2025-03-09T23:00:00-04:00"));
    let week = D::new(&[("tenant", "acme"), ("limit", "tokens_per_week")])
        .limit(100, DAY)
        .entry("tollgate.window", "week")
        .entry("tollgate.tz", "America/New_York");
    let day = D::new(&[("tenant", "acme"), ("limit", "tokens_per_week")]).limit(100, DAY);
    let r = run(&l, &req("t", &[week.clone().hits(100)]), &reserve()).await;
    assert_eq!((r.overall_code, reset_ms(&r, 0)), (OK, 3_600_000));
    let limit = r.statuses[0].current_limit.as_ref().expect("limit");
    assert_eq!((limit.requests_per_unit, limit.unit), (100, 7), "answered as WEEK");
    assert_eq!(run(&l, &req("t", &[week.clone().hits(1)]), &reserve()).await.overall_code, OVER);
    // the same entries as a DAY limit are a counter of their own
    let r = run(&l, &req("t", &[day.clone().hits(100)]), &reserve()).await;
    assert_eq!((r.overall_code, r.statuses[0].current_limit.as_ref().map(|l| l.unit)), (OK, Some(DAY)));
    // Monday 00:00 local: a new week
    clock.set(ms("2025-03-10T00:00:00-04:00"));
    let r = run(&l, &req("t", &[week.clone().hits(60)]), &reserve()).await;
    assert_eq!((r.overall_code, remaining(&r), reset_ms(&r, 0)), (OK, vec![40], 7 * 86_400_000));
    // Sunday still in that week
    clock.set(ms("2025-03-16T23:59:59-04:00"));
    assert_eq!(run(&l, &req("t", &[week.clone().hits(41)]), &reserve()).await.overall_code, OVER);

    // a week across the new year: Monday 2024-12-30 to Monday 2025-01-06 (UTC)
    let utc =
        D::new(&[("tenant", "acme"), ("limit", "requests_per_week")]).limit(3, DAY).entry("tollgate.window", "week");
    clock.set(ms("2024-12-31T12:00:00Z"));
    assert_eq!(run(&l, &req("t", &[utc.clone().hits(3)]), &reserve()).await.overall_code, OK);
    clock.set(ms("2025-01-05T23:00:00Z"));
    let r = run(&l, &req("t", &[utc.clone().hits(1)]), &reserve()).await;
    assert_eq!((r.overall_code, reset_ms(&r, 0)), (OVER, 3_600_000));
    clock.set(ms("2025-01-06T00:00:00Z"));
    assert_eq!(run(&l, &req("t", &[utc.clone().hits(3)]), &reserve()).await.overall_code, OK);

    // misuse is INVALID_ARGUMENT
    let minute = D::new(&[("tenant", "acme")]).limit(3, MINUTE).entry("tollgate.window", "week");
    let e = l.decide(&req("t", &[minute]), &reserve()).await.expect_err("week on MINUTE");
    let status = tonic::Status::from(e);
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("tollgate.window=week needs a DAY limit"), "{}", status.message());
}

#[tokio::test]
async fn static_config_and_unlimited() {
    let redis = RedisServer::start();
    let limits = StaticLimits::parse(
        "domains:\n  - domain: tollgate_native\n    descriptors:\n      - key: generic_key\n        value: per_tenant_rpm\n        rate_limit: { unit: minute, requests_per_unit: 3, name: rpm }\n",
    )
    .expect("limits");
    let (l, _, metrics) = limiter_with(RedisTarget::Single(redis.url()), limits, T0);
    let native = D::new(&[("generic_key", "per_tenant_rpm")]);
    let other = D::new(&[("generic_key", "something_else")]);
    for _ in 0..3 {
        let r = run(&l, &req("tollgate_native", &[native.clone(), other.clone()]), &reserve()).await;
        assert_eq!(r.overall_code, OK);
        assert_eq!(r.statuses[1].current_limit, None);
        assert_eq!(r.statuses[0].current_limit.as_ref().map(|l| l.name.as_str()), Some("rpm"));
    }
    assert_eq!(run(&l, &req("tollgate_native", &[native.clone()]), &reserve()).await.overall_code, OVER);
    // unlimited alone never touches Redis
    assert_eq!(run(&l, &req("tollgate_native", &[other.clone()]), &reserve()).await.overall_code, OK);
    assert!(metrics.encode().contains("tollgate_rls_unlimited_descriptors_total 4"));
}

#[tokio::test]
async fn every_key_expires_and_script_cache_loss_recovers() {
    let redis = RedisServer::start();
    let (l, _, _) = limiter(&redis, T0);
    let ds = [
        D::new(&[("tenant", "acme"), ("b", "rpm")]).limit(100, MINUTE).hits(1),
        D::new(&[("tenant", "acme"), ("b", "tpd")]).limit(100, DAY).hits(1),
        D::new(&[("tenant", "acme"), ("b", "usd")]).limit(100, YEAR).hits(1),
    ];
    run(&l, &req("t", &ds), &RequestMeta { mode: Mode::Reserve, idempotency_key: Some("x".into()), usage: vec![] })
        .await;
    redis.cli(&["SCRIPT", "FLUSH"]).expect("flush");
    run(&l, &req("t", &ds), &reserve()).await;
    let keys = redis.cli(&["--scan", "--pattern", "tg:*"]).expect("scan");
    let keys: Vec<&str> = keys.lines().collect();
    // three counters, the idempotency key and the tenant's quota index
    assert_eq!(keys.len(), 5, "{keys:?}");
    for k in keys {
        assert!(k.starts_with("tg:{t|acme}:"), "{k}");
        let ttl: i64 = redis.cli(&["PTTL", k]).expect("pttl").trim().parse().expect("int");
        assert!(ttl > 0, "{k} has no TTL ({ttl})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reserves_never_exceed_the_budget() {
    use rand::Rng;
    let redis = RedisServer::start();
    let target = RedisTarget::Single(redis.url());
    let (l, _, _) = limiter_timeout(target, StaticLimits::default(), T0, std::time::Duration::from_secs(10));
    let l = Arc::new(l);
    const BUDGET: u64 = 1_000;
    // sizes 1: exactly the budget is admitted
    let ones = D::new(&[("tenant", "acme"), ("b", "ones")]).limit(150, DAY);
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let l = l.clone();
        let r = req("t", &[ones.clone().hits(1)]);
        tasks.push(tokio::spawn(async move { l.decide(&r, &RequestMeta::default()).await.expect("ok").overall_code }));
    }
    let mut admitted = 0;
    for t in tasks {
        if t.await.expect("join") == OK {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 150);

    // random sizes against a budget plus an rpm on the same request
    let budget = D::new(&[("tenant", "acme"), ("b", "rand")]).limit(BUDGET, MONTH);
    let rpm = D::new(&[("tenant", "acme"), ("b", "rpm")]).limit(10_000, MINUTE);
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let size = rand::rng().random_range(1..=40u64);
        let l = l.clone();
        let r = req("t", &[budget.clone().hits(size), rpm.clone().hits(1)]);
        tasks.push(tokio::spawn(async move {
            let code = l.decide(&r, &RequestMeta::default()).await.expect("ok").overall_code;
            (code, size)
        }));
    }
    let mut sum = 0;
    let mut n_ok = 0;
    for t in tasks {
        let (code, size) = t.await.expect("join");
        if code == OK {
            sum += size;
            n_ok += 1;
        }
    }
    assert!(sum <= BUDGET, "admitted {sum} > {BUDGET}");
    let r = run(&l, &req("t", &[budget.hits(0), rpm.hits(0)]), &reserve()).await;
    assert_eq!(u64::from(r.statuses[0].limit_remaining), BUDGET - sum, "counter matches admitted hits");
    assert_eq!(u64::from(r.statuses[1].limit_remaining), 10_000 - n_ok);
}
