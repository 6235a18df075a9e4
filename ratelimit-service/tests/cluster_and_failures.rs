//! Redis Cluster (three masters on loopback) and Redis outages.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test and bench code: a failure should stop loudly
#![allow(clippy::cloned_ref_to_slice_refs)] // &[d.clone()] reads better in tests

mod common;

use std::time::{Duration, Instant};

use common::*;
use rls_contract::Mode;
use tollgate_ratelimit::config::StaticLimits;
use tollgate_ratelimit::plan::RequestMeta;
use tollgate_ratelimit::storage::redis::RedisTarget;

const T0: i64 = 1_750_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_decides_per_tenant_in_one_slot() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start).await.expect("cluster");
    let (l, _, _) = limiter_with(RedisTarget::Cluster(cluster.urls()), StaticLimits::default(), T0);
    // many tenants, so their slots land on all three masters
    for t in 0..30 {
        let tenant = format!("tenant-{t}");
        let ds = [
            D::new(&[("tenant", &tenant), ("b", "rpm")]).limit(10, MINUTE),
            D::new(&[("tenant", &tenant), ("b", "tpd")]).limit(100, DAY),
            D::new(&[("tenant", &tenant), ("b", "usd")]).limit(50, MONTH),
        ];
        let meta = RequestMeta { mode: Mode::Reserve, idempotency_key: Some(format!("r-{t}")), usage: vec![] };
        let r = l
            .decide(&req("tollgate", &[ds[0].clone().hits(1), ds[1].clone().hits(60), ds[2].clone().hits(50)]), &meta)
            .await
            .expect("ok");
        assert_eq!(r.overall_code, OK);
        // the idempotent retry replays
        let r = l
            .decide(&req("tollgate", &[ds[0].clone().hits(1), ds[1].clone().hits(60), ds[2].clone().hits(50)]), &meta)
            .await
            .expect("ok");
        assert_eq!(r.overall_code, OK);
        let r = l
            .decide(
                &req("tollgate", &[ds[0].clone().hits(1), ds[1].clone().hits(60), ds[2].clone().hits(0)]),
                &RequestMeta::default(),
            )
            .await
            .expect("ok");
        assert_eq!(r.overall_code, OVER);
        assert_eq!(r.statuses.iter().map(|s| s.limit_remaining).collect::<Vec<_>>(), vec![9, 40, 0]);
    }
    // keys are spread over the masters
    let with_keys =
        cluster.nodes.iter().filter(|n| n.cli(&["DBSIZE"]).map(|s| s.trim() != "0").unwrap_or(false)).count();
    assert_eq!(with_keys, 3);

    // descriptors of two tenants in one request: one script per slot, all-or-nothing
    // (tests/cluster_levels.rs has the levels in detail)
    let two = [D::new(&[("tenant", "a")]).limit(5, DAY), D::new(&[("tenant", "b")]).limit(5, DAY)];
    let none = RequestMeta::default();
    let r = l.decide(&req("tollgate", &[two[0].clone().hits(5), two[1].clone().hits(6)]), &none).await.expect("over");
    assert_eq!(r.overall_code, OVER);
    let r = l.decide(&req("tollgate", &[two[0].clone().hits(5), two[1].clone().hits(5)]), &none).await.expect("ok");
    assert_eq!(r.overall_code, OK);
    assert_eq!(r.statuses.iter().map(|s| s.limit_remaining).collect::<Vec<_>>(), vec![0, 0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_answers_unavailable_and_recovers() {
    let mut redis = RedisServer::start();
    let (l, _, metrics) = limiter(&redis, T0);
    let d = D::new(&[("tenant", "acme")]).limit(1_000, DAY);
    assert_eq!(l.decide(&req("t", &[d.clone()]), &RequestMeta::default()).await.expect("ok").overall_code, OK);

    redis.kill();
    for _ in 0..3 {
        let started = Instant::now();
        let e = l.decide(&req("t", &[d.clone()]), &RequestMeta::default()).await.expect_err("down");
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Unavailable);
        assert!(started.elapsed() < Duration::from_secs(3), "bounded by the timeout");
    }
    assert!(metrics.encode().contains("tollgate_rls_decisions_total{code=\"unavailable\"} 3"), "{}", metrics.encode());

    // same port, no restart of the limiter
    let _redis = tokio::task::spawn_blocking(move || {
        redis.restart();
        redis
    })
    .await
    .expect("restart");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match l.decide(&req("t", &[d.clone()]), &RequestMeta::default()).await {
            Ok(r) => {
                assert_eq!(r.overall_code, OK);
                break;
            }
            Err(e) => {
                assert_eq!(tonic::Status::from(e).code(), tonic::Code::Unavailable);
                assert!(Instant::now() < deadline, "did not recover");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_starts_while_redis_is_down() {
    let port = free_port();
    let (l, _, _) = limiter_with(RedisTarget::Single(format!("redis://127.0.0.1:{port}")), StaticLimits::default(), T0);
    let d = D::new(&[("tenant", "acme")]).limit(10, MINUTE);
    let e = l.decide(&req("t", &[d.clone()]), &RequestMeta::default()).await.expect_err("down");
    assert_eq!(tonic::Status::from(e).code(), tonic::Code::Unavailable);
    let _redis = tokio::task::spawn_blocking(move || RedisServer::start_on(port, &[])).await.expect("start");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match l.decide(&req("t", &[d.clone()]), &RequestMeta::default()).await {
            Ok(r) => {
                assert_eq!(r.overall_code, OK);
                break;
            }
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("did not recover: {e}"),
        }
    }
}
