//! Limit levels on a three-master Redis Cluster: one request carries a tenant's
//! counters (slot of `{tollgate|<tenant>}`) and a shared pool's (slot of
//! `{tollgate|<pool>}`), decided all-or-nothing across the slots.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a failure should stop loudly
#![allow(clippy::cloned_ref_to_slice_refs)] // &[d.clone()] reads better in tests

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use rls_contract::Mode;
use tollgate_ratelimit::config::StaticLimits;
use tollgate_ratelimit::plan::RequestMeta;
use tollgate_ratelimit::storage::redis::RedisTarget;

const T0: i64 = 1_750_000_000_000;

fn tenant(id: &str, limit: u64) -> D {
    D::new(&[("tenant", id), ("limit", "tokens_per_day")]).limit(limit, DAY)
}

fn api_key(id: &str, limit: u64) -> D {
    D::new(&[("tenant", id), ("key", "k1"), ("limit", "tokens_per_day")]).limit(limit, DAY)
}

fn pool(name: &str, limit: u64) -> D {
    D::new(&[("pool", name), ("limit", "tokens_per_minute")]).limit(limit, MINUTE)
}

fn pool_tier(name: &str, limit: u64) -> D {
    D::new(&[("pool", name), ("tier", "gold"), ("limit", "tokens_per_day")]).limit(limit, DAY)
}

fn keyed(key: &str) -> RequestMeta {
    RequestMeta { mode: Mode::Reserve, idempotency_key: Some(key.into()), ..RequestMeta::default() }
}

/// `limit_remaining` of each descriptor, read with a pure check.
async fn remaining(l: &Limiter, ds: &[D]) -> Vec<u32> {
    let checks: Vec<D> = ds.iter().map(|d| d.clone().hits(0)).collect();
    let r = l.decide(&req("tollgate", &checks), &RequestMeta::default()).await.expect("check");
    r.statuses.iter().map(|s| s.limit_remaining).collect()
}

fn codes(r: &envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse) -> Vec<i32> {
    r.statuses.iter().map(|s| s.code).collect()
}

async fn start() -> (RedisCluster, Limiter) {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start).await.expect("cluster");
    let (l, _, _) =
        limiter_timeout(RedisTarget::Cluster(cluster.urls()), StaticLimits::default(), T0, Duration::from_secs(5));
    (cluster, l)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_anywhere_charges_nowhere() {
    let (_cluster, l) = start().await;
    let all = [tenant("acme", 1_000), api_key("acme", 500), pool("gpt", 100), pool_tier("gpt", 60)];

    // tenant group fits, pool group refuses (the tier share is the one over)
    let ask = |t: u64, p: u64| {
        [all[0].clone().hits(t), all[1].clone().hits(t), all[2].clone().hits(p), all[3].clone().hits(p)]
    };
    let r = l.decide(&req("tollgate", &ask(10, 70)), &RequestMeta::default()).await.expect("decide");
    assert_eq!(r.overall_code, OVER);
    assert_eq!(codes(&r), [OK, OK, OK, OVER]);
    assert_eq!(r.statuses.iter().map(|s| s.limit_remaining).collect::<Vec<_>>(), [1_000, 500, 100, 60]);
    assert_eq!(remaining(&l, &all).await, [1_000, 500, 100, 60], "nothing charged anywhere");

    // the same request within the limits is charged everywhere
    let r = l.decide(&req("tollgate", &ask(10, 50)), &keyed("fits")).await.expect("decide");
    assert_eq!(r.overall_code, OK);
    assert_eq!(r.statuses.iter().map(|s| s.limit_remaining).collect::<Vec<_>>(), [990, 490, 50, 10]);

    // pool group fits, tenant group refuses (the key's budget is the one over)
    let r = l.decide(&req("tollgate", &ask(495, 5)), &RequestMeta::default()).await.expect("decide");
    assert_eq!(r.overall_code, OVER);
    assert_eq!(codes(&r), [OK, OVER, OK, OK]);
    assert_eq!(remaining(&l, &all).await, [990, 490, 50, 10]);

    // the pool first in the request: its group is charged first, then given
    // back when the tenant's refuses
    let pool_first = [all[2].clone().hits(5), all[3].clone().hits(5), all[1].clone().hits(495)];
    let r = l.decide(&req("tollgate", &pool_first), &keyed("pool-first")).await.expect("decide");
    assert_eq!(r.overall_code, OVER);
    assert_eq!(codes(&r), [OK, OK, OVER]);
    assert_eq!(r.statuses.iter().map(|s| s.limit_remaining).collect::<Vec<_>>(), [50, 10, 490]);
    assert_eq!(remaining(&l, &all).await, [990, 490, 50, 10]);
    // its retry replays: still refused, the pool not given back twice
    let r = l.decide(&req("tollgate", &pool_first), &keyed("pool-first")).await.expect("decide");
    assert_eq!(r.overall_code, OVER);
    assert_eq!(remaining(&l, &all).await, [990, 490, 50, 10]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_retries_charge_each_slot_once() {
    let (cluster, l) = start().await;
    let all = [tenant("acme", 1_000), pool("gpt", 100), pool("claude", 100)];
    let ask = [all[0].clone().hits(10), all[1].clone().hits(20), all[2].clone().hits(30)];
    for _ in 0..3 {
        let r = l.decide(&req("tollgate", &ask), &keyed("req-1")).await.expect("decide");
        assert_eq!(r.overall_code, OK);
    }
    assert_eq!(remaining(&l, &all).await, [990, 80, 70]);

    // settles across slots: applied once however often they are retried,
    // never refused, even over the limit
    let settle = RequestMeta { mode: Mode::Settle, idempotency_key: Some("req-1".into()), ..RequestMeta::default() };
    let fix = [all[0].clone().refund(4), all[1].clone().hits(100), all[2].clone().refund(30)];
    for _ in 0..3 {
        let r = l.decide(&req("tollgate", &fix), &settle).await.expect("settle");
        assert_eq!(r.overall_code, OK);
        assert_eq!(codes(&r), [OK, OVER, OK]);
    }
    assert_eq!(remaining(&l, &all).await, [994, 0, 100]);

    // every group's idempotency key is in its own slot, on whichever master holds it
    let mut idem = Vec::new();
    for n in &cluster.nodes {
        let keys = n.cli(&["KEYS", "tg:*:i:*"]).unwrap_or_default();
        idem.extend(keys.lines().map(str::to_owned).filter(|k| !k.is_empty()));
    }
    idem.sort();
    let mut expected: Vec<String> = ["acme", "claude", "gpt"]
        .iter()
        .flat_map(|t| {
            let tag = format!("{{tollgate|{t}}}");
            [Mode::Reserve, Mode::Settle].map(|m| tollgate_ratelimit::keys::idempotency_key(&tag, m, "req-1"))
        })
        .collect();
    expected.sort();
    assert_eq!(idem, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reserves_never_admit_more_than_the_pool() {
    let (_cluster, l) = start().await;
    let l = Arc::new(l);
    const N: usize = 60;
    const POOL: u64 = 10;

    // many tenants with room, one tight pool
    let mut tasks = Vec::new();
    for i in 0..N {
        let l = l.clone();
        tasks.push(tokio::spawn(async move {
            let ds = [tenant(&format!("t{}", i % 6), 1_000).hits(1), pool_tier("shared", POOL).hits(1)];
            l.decide(&req("tollgate", &ds), &keyed(&format!("c-{i}"))).await.expect("decide").overall_code == OK
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.expect("task"));
    }
    assert_eq!(admitted, POOL as usize, "the tenants always had room: the pool admits exactly its limit");
    assert_eq!(remaining(&l, &[pool_tier("shared", POOL)]).await, [0]);
    // every refused request's tenant charge was given back
    let mut tenant_used = 0;
    for t in 0..6 {
        tenant_used += 1_000 - u64::from(remaining(&l, &[tenant(&format!("t{t}"), 1_000)]).await[0]);
    }
    assert_eq!(tenant_used, POOL);

    // tight on both levels: a tenant charge waiting for its undo can make another
    // request refuse (under-admission), but never more than either limit passes
    let mut tasks = Vec::new();
    for i in 0..N {
        let l = l.clone();
        tasks.push(tokio::spawn(async move {
            let ds = [tenant("tight", 12).hits(1), pool_tier("tight-pool", POOL).hits(1)];
            l.decide(&req("tollgate", &ds), &keyed(&format!("d-{i}"))).await.expect("decide").overall_code == OK
        }));
    }
    let mut admitted = 0u64;
    for t in tasks {
        admitted += u64::from(t.await.expect("task"));
    }
    assert!((1..=POOL).contains(&admitted), "admitted {admitted}");
    let left = remaining(&l, &[tenant("tight", 12), pool_tier("tight-pool", POOL)]).await;
    assert_eq!(left, [12 - admitted as u32, (POOL - admitted) as u32], "charged exactly what was admitted");
}

/// The master that holds `tag`'s keys (by where a key of it landed).
fn node_of(cluster: &RedisCluster, tag: &str) -> usize {
    let found: Vec<usize> = (0..cluster.nodes.len())
        .filter(|&i| {
            cluster.nodes[i].cli(&["KEYS", &format!("tg:{{tollgate|{tag}}}:*")]).is_some_and(|s| !s.trim().is_empty())
        })
        .collect();
    assert_eq!(found.len(), 1, "{tag}: {found:?}");
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_failure_half_way_charges_once_or_undoes_once() {
    let (mut cluster, l) = start().await;
    let acme = tenant("acme", 1_000);
    // one hit, so a key shows which master holds the tenant
    l.decide(&req("tollgate", &[acme.clone().hits(1)]), &RequestMeta::default()).await.expect("charge");
    let tenant_node = node_of(&cluster, "acme");
    // a pool on another master
    let mut pool_name = None;
    for i in 0..50 {
        let name = format!("pool-{i}");
        l.decide(&req("tollgate", &[pool(&name, 100).hits(1)]), &RequestMeta::default()).await.expect("place");
        if node_of(&cluster, &name) != tenant_node {
            pool_name = Some(name);
            break;
        }
    }
    let name = pool_name.expect("a pool on another master");
    let fits = [acme.clone().hits(10), pool(&name, 100).hits(10)];
    let refused = [acme.clone().hits(10), pool_tier(&name, 5).hits(10)];
    let pool_node = node_of(&cluster, &name);

    // the pool's master dies: the tenant's group is charged, the pool's fails
    cluster.nodes[pool_node].kill();
    for (meta, ds) in [(keyed("a"), &fits), (keyed("b"), &refused)] {
        let e = l.decide(&req("tollgate", ds), &meta).await.expect_err("pool down");
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Unavailable);
    }
    let mut node = cluster.nodes.remove(pool_node);
    let node = tokio::task::spawn_blocking(move || {
        node.restart(); // same port and cluster config: it takes its slots back, empty
        node
    })
    .await
    .expect("restart");
    cluster.nodes.insert(pool_node, node);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let probe = [acme.clone().hits(0), pool(&name, 100).hits(0)];
        if let Ok(r) = l.decide(&req("tollgate", &probe), &RequestMeta::default()).await {
            // both failed attempts left the tenant charged, for their retries;
            // the pool's master came back empty
            assert_eq!(r.statuses.iter().map(|s| s.limit_remaining).collect::<Vec<_>>(), [1_000 - 1 - 20, 100]);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "cluster did not come back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // "a" now fits: the tenant's group replays (no second charge), the pool is charged
    let r = l.decide(&req("tollgate", &fits), &keyed("a")).await.expect("retry a");
    assert_eq!(r.overall_code, OK);
    assert_eq!(remaining(&l, &[acme.clone(), pool(&name, 100)]).await, [979, 90]);
    // "b" is refused by the pool's tier share: the tenant's charge is given back, once
    let r = l.decide(&req("tollgate", &refused), &keyed("b")).await.expect("retry b");
    assert_eq!((r.overall_code, codes(&r)), (OVER, vec![OK, OVER]));
    assert_eq!(remaining(&l, &[acme.clone()]).await, [989]);
    l.decide(&req("tollgate", &[acme.clone().hits(5)]), &RequestMeta::default()).await.expect("other");
    for _ in 0..2 {
        let r = l.decide(&req("tollgate", &refused), &keyed("b")).await.expect("retry b again");
        assert_eq!(r.overall_code, OVER);
    }
    assert_eq!(remaining(&l, &[acme.clone()]).await, [984], "the undo is not repeated");
}
