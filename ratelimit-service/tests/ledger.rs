//! The usage ledger, the quota index and budget alerts against real
//! `redis-server` (single node and a three-master cluster), plus webhook
//! delivery to a local receiver that is down, then up.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a failure should stop loudly
#![allow(clippy::cloned_ref_to_slice_refs)]

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use common::*;
use http_body_util::BodyExt as _;
use rls_contract::ledger::UsageRow;
use rls_contract::Mode;
use tollgate_ratelimit::clock::ManualClock;
use tollgate_ratelimit::config::StaticLimits;
use tollgate_ratelimit::ledger::alerts::{self, AlertSink, WebhookSecret, WebhookSettings};
use tollgate_ratelimit::ledger::api::{router, LedgerApi};
use tollgate_ratelimit::ledger::observer::LedgerObserver;
use tollgate_ratelimit::ledger::read::{self, GroupBy, UsageQuery};
use tollgate_ratelimit::ledger::{parse_day, LedgerSettings};
use tollgate_ratelimit::metrics::Metrics;
use tollgate_ratelimit::plan::{PlanSettings, RequestMeta};
use tollgate_ratelimit::service::RateLimiter;
use tollgate_ratelimit::storage::redis::{RedisStorage, RedisTarget};
use tower::ServiceExt as _;

/// 2026-12-04T03:00:00Z: still Dec 3 in New York.
const T0: i64 = 1_796_353_200_000;

struct Rig {
    limiter: RateLimiter<RedisStorage>,
    storage: Arc<RedisStorage>,
    clock: Arc<ManualClock>,
    metrics: Arc<Metrics>,
}

fn rig(target: RedisTarget, webhook: bool, usage_stream: u64) -> Rig {
    let storage = Arc::new(RedisStorage::new(&target, Duration::from_secs(10)).unwrap());
    let clock = Arc::new(ManualClock::new(T0));
    let metrics = Arc::new(Metrics::new());
    let ledger = LedgerSettings { usage_stream_max_len: usage_stream, ..LedgerSettings::default() };
    let limiter = RateLimiter::new(
        storage.clone(),
        Arc::new(StaticLimits::default()),
        clock.clone(),
        metrics.clone(),
        PlanSettings { ledger, ..PlanSettings::default() },
    )
    .with_observer(Arc::new(LedgerObserver::new(
        storage.clone(),
        metrics.clone(),
        clock.clone(),
        AlertSink { stream_max_len: 1000, webhook },
        400,
    )));
    Rig { limiter, storage, clock, metrics }
}

fn row(tenant: &str, key: &str, model: &str, tz: Option<&str>) -> UsageRow {
    UsageRow {
        tenant: tenant.into(),
        time_zone: tz.map(str::to_owned),
        finished_at_ms: T0 as u64,
        api_key: Some(key.into()),
        user: Some("alice".into()),
        model: model.into(),
        requests: 2,
        refusals: BTreeMap::from([("429".into(), 1)]),
        input_tokens: 1000,
        cached_read_tokens: 200,
        cache_write_tokens: 30,
        output_tokens: 400,
        reasoning_tokens: 50,
        cost_micro_usd: 12_345,
        estimated_requests: 1,
    }
}

fn settle(key: &str, rows: Vec<UsageRow>) -> RequestMeta {
    RequestMeta { mode: Mode::Settle, idempotency_key: Some(key.into()), usage: rows }
}

fn query(tenant: Option<&str>, group_by: &str) -> UsageQuery {
    UsageQuery {
        domain: "tollgate".into(),
        tenant: tenant.map(str::to_owned),
        key: None,
        user: None,
        model: None,
        from: parse_day("2026-12-01").unwrap(),
        to: parse_day("2026-12-31").unwrap(),
        group_by: GroupBy::parse(group_by).unwrap(),
    }
}

fn tpd(tenant: &str, hits: u64) -> D {
    D::new(&[("tenant", tenant), ("limit", "tokens_per_day")]).limit(1_000_000, DAY).hits(hits)
}

async fn ledger_is_idempotent_and_follows_time_zones(r: &Rig) {
    let rows = vec![row("acme", "k1", "gpt-4o", Some("America/New_York")), row("acme", "k1", "gpt-4o", None)];
    for _ in 0..3 {
        let a = r.limiter.decide(&req("tollgate", &[tpd("acme", 100)]), &settle("s-1", rows.clone())).await.unwrap();
        assert_eq!(a.overall_code, OK);
    }
    // a ledger-only settle (refusals, no descriptor), also retried
    let mut refused = row("acme", "k2", "claude-sonnet", None);
    refused.requests = 0;
    refused.estimated_requests = 0;
    refused.refusals = BTreeMap::from([("budget".into(), 3)]);
    refused.input_tokens = 0;
    refused.cached_read_tokens = 0;
    refused.cache_write_tokens = 0;
    refused.output_tokens = 0;
    refused.reasoning_tokens = 0;
    refused.cost_micro_usd = 0;
    for _ in 0..2 {
        r.limiter.decide(&req("tollgate", &[]), &settle("s-2", vec![refused.clone()])).await.unwrap();
    }
    let (lines, totals) = read::usage(&r.storage, &query(Some("acme"), "day,key,model")).await.unwrap();
    let days: Vec<_> =
        lines.iter().map(|l| (l.day.clone().unwrap(), l.key.clone().unwrap(), l.totals.requests)).collect();
    assert_eq!(
        days,
        [
            ("2026-12-03".into(), "k1".into(), 2),
            ("2026-12-04".into(), "k1".into(), 2),
            ("2026-12-04".into(), "k2".into(), 0)
        ]
    );
    assert_eq!(totals.requests, 4);
    assert_eq!(totals.estimated_requests, 2);
    assert_eq!(totals.input_tokens, 2000);
    assert_eq!(totals.cached_read_tokens, 400);
    assert_eq!(totals.cache_write_tokens, 60);
    assert_eq!(totals.output_tokens, 800);
    assert_eq!(totals.reasoning_tokens, 100);
    assert_eq!(totals.cost_micro_usd, 24_690);
    assert_eq!(totals.refusals, BTreeMap::from([("429".into(), 2), ("budget".into(), 3)]));
    // per user
    let mut q = query(Some("acme"), "user");
    q.user = Some("alice".into());
    let (lines, _) = read::usage(&r.storage, &q).await.unwrap();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0].user.as_deref(), Some("alice"));
    assert_eq!(lines[0].totals.cost_micro_usd, 24_690);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_settle_counts_once_and_days_follow_the_time_zone() {
    let redis = RedisServer::start();
    let r = rig(RedisTarget::Single(redis.url()), false, 100);
    ledger_is_idempotent_and_follows_time_zones(&r).await;
    // the counter was charged once too
    let keys = redis.cli(&["--scan", "--pattern", "tg:*"]).unwrap();
    let counter = keys.lines().find(|k| k.contains(":D:") && !k.contains("alert")).unwrap().to_owned();
    assert_eq!(redis.cli(&["GET", &counter]).unwrap().trim(), "100");
    // every key expires
    for k in keys.lines() {
        let ttl: i64 = redis.cli(&["PTTL", k]).unwrap().trim().parse().unwrap();
        assert!(ttl > 0, "{k} has no TTL");
    }
    // one usage stream entry per row per applied settle: 3 rows, not 7
    assert_eq!(redis.cli(&["XLEN", "tg:{tollgate|acme}:usage"]).unwrap().trim(), "3");
    let entry = redis.cli(&["XRANGE", "tg:{tollgate|acme}:usage", "-", "+", "COUNT", "1"]).unwrap();
    assert!(entry.contains("cost_micro_usd") && entry.contains("s-1"), "{entry}");
    // rows without an idempotency key, in a reserve, or of another tenant are refused
    let no_key = RequestMeta { mode: Mode::Settle, idempotency_key: None, usage: vec![row("acme", "k", "m", None)] };
    assert!(r.limiter.decide(&req("tollgate", &[]), &no_key).await.is_err());
    let reserve = RequestMeta { mode: Mode::Reserve, ..settle("x", vec![row("acme", "k", "m", None)]) };
    assert!(r.limiter.decide(&req("tollgate", &[]), &reserve).await.is_err());
    let other = settle("y", vec![row("other", "k", "m", None)]);
    assert!(r.limiter.decide(&req("tollgate", &[tpd("acme", 1)]), &other).await.is_err());
    // the tenants index (written after the decision) lists acme
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(read::tenants(&r.storage, "tollgate", parse_day("2026-12-01").unwrap()).await.unwrap(), ["acme"]);
    // and the tenant's days index lists its two days
    let days = redis.cli(&["ZRANGE", "tg:{tollgate|acme}:led:days", "0", "-1"]).unwrap();
    assert_eq!(days.lines().collect::<Vec<_>>(), ["2026-12-03", "2026-12-04"]);
    assert!(r.metrics.encode().contains("tollgate_rls_ledger_rows_total 3"));
}

async fn get(app: &axum::Router, uri: &str) -> (u16, String, String) {
    let resp = app.clone().oneshot(Request::get(uri).body(Body::empty()).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let ctype = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, ctype, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_report_json_and_csv_and_quota() {
    let redis = RedisServer::start();
    let r = rig(RedisTarget::Single(redis.url()), false, 0);
    for (i, t) in ["acme", "beta"].iter().enumerate() {
        let rows = vec![row(t, "k1", "gpt-4o", None), row(t, "k1", "gpt-4o-mini", None)];
        r.limiter.decide(&req("tollgate", &[tpd(t, 10)]), &settle(&format!("s{i}"), rows)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let app = router(LedgerApi { storage: r.storage.clone(), clock: r.clock.clone() });
    let (st, ct, body) = get(&app, "/v1/usage?tenant=acme&from=2026-12-01&to=2026-12-31&group_by=model").await;
    assert_eq!((st, ct.as_str()), (200, "application/json"), "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["rows"].as_array().unwrap().len(), 2);
    assert_eq!(v["rows"][0]["model"], "gpt-4o");
    assert_eq!(v["rows"][0]["cost_micro_usd"], 12_345);
    assert_eq!(v["totals"]["requests"], 4);
    assert_eq!(v["totals"]["refusals"]["429"], 2);
    // every tenant, CSV
    let (st, ct, csv) = get(&app, "/v1/usage?from=2026-12-01&to=2026-12-04&group_by=day&format=csv").await;
    assert_eq!((st, ct.as_str()), (200, "text/csv; charset=utf-8"));
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(lines[0].starts_with("tenant,day,requests,estimated_requests,input_tokens"));
    assert_eq!(lines[1], "acme,2026-12-04,4,2,2000,400,60,800,100,24690,429:2");
    assert!(lines[2].starts_with("beta,2026-12-04,4,"));
    // bad input: 400 with a JSON error naming the field
    for (uri, field) in [
        ("/v1/usage?from=2026-12-01", "to"),
        ("/v1/usage?from=2026-12-31&to=2026-12-01", "to"),
        ("/v1/usage?from=2026-02-30&to=2026-03-01", "from"),
        ("/v1/usage?from=2024-01-01&to=2026-01-01", "to"),
        ("/v1/usage?from=2026-12-01&to=2026-12-02&group_by=day,day", "group_by"),
        ("/v1/usage?from=2026-12-01&to=2026-12-02&format=xml", "format"),
        ("/v1/usage?from=2026-12-01&to=2026-12-02&tenant=a/b", "tenant"),
        ("/v1/usage?from=2026-12-01&to=2026-12-02&bogus=1", "bogus"),
        ("/v1/tenants/a%20b/quota", "id"),
        ("/v1/alerts/deliveries?before=x", "before"),
    ] {
        let (st, _, body) = get(&app, uri).await;
        assert_eq!(st, 400, "{uri}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["field"], field, "{uri}: {body}");
    }

    // quota: tenant, key and user levels, calendar and rate
    let ds = [
        D::new(&[("tenant", "acme"), ("limit", "usd_per_month")]).limit(5_000_000, MONTH).hits(1_000_000),
        D::new(&[("tenant", "acme"), ("key", "k1"), ("limit", "requests_per_minute")]).limit(60, MINUTE).hits(1),
        D::new(&[("tenant", "acme"), ("user", "alice"), ("limit", "tokens_per_day")]).limit(10_000, DAY).hits(2_500),
    ];
    let a = r.limiter.decide(&req("tollgate", &ds), &RequestMeta::default()).await.unwrap();
    assert_eq!(a.overall_code, OK);
    let (st, _, body) = get(&app, "/v1/tenants/acme/quota").await;
    assert_eq!(st, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let limits = v["limits"].as_array().unwrap();
    let find = |name: &str, level: &str| {
        limits.iter().find(|l| l["name"] == name && l["level"] == level).unwrap_or_else(|| panic!("{name}: {body}"))
    };
    assert_eq!(limits.len(), 4, "{body}");
    let usd = find("usd_per_month", "tenant");
    assert_eq!(
        (usd["level"].as_str(), usd["limit"].as_u64(), usd["used"].as_u64()),
        (Some("tenant"), Some(5_000_000), Some(1_000_000))
    );
    assert_eq!(usd["remaining"], 4_000_000);
    assert_eq!(usd["reset_at_ms"], ms("2027-01-01T00:00:00Z"));
    let rpm = find("requests_per_minute", "key");
    assert_eq!(
        (rpm["level"].as_str(), rpm["used"].as_u64(), rpm["remaining"].as_u64()),
        (Some("key"), Some(1), Some(59))
    );
    let tokens = find("tokens_per_day", "user");
    assert_eq!((tokens["level"].as_str(), tokens["remaining"].as_u64()), (Some("user"), Some(7_500)));
    assert_eq!(tokens["reset_at_ms"], ms("2026-12-05T00:00:00Z"));
    // after the day ends: the day budget shows its new window, unused
    r.clock.advance(86_400_000);
    let (_, _, body) = get(&app, "/v1/tenants/acme/quota").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let tokens = v["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "tokens_per_day" && l["level"] == "user")
        .unwrap()
        .clone();
    assert_eq!((tokens["used"].as_u64(), tokens["remaining"].as_u64()), (Some(0), Some(10_000)));
    assert_eq!(tokens["reset_at_ms"], ms("2026-12-06T00:00:00Z"));
    // a tenant never seen: empty
    let (st, _, body) = get(&app, "/v1/tenants/nobody/quota").await;
    assert_eq!(st, 200);
    assert!(body.contains("\"limits\":[]"), "{body}");
}

fn budget(tenant: &str, hits: u64) -> D {
    D::new(&[("tenant", tenant), ("limit", "usd_per_month")])
        .limit(1_000, MONTH)
        .entry("tollgate.alerts", "50,80,100")
        .hits(hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_settles_cross_each_threshold_once() {
    let redis = RedisServer::start();
    let r = Arc::new(rig(RedisTarget::Single(redis.url()), false, 0));
    // a second "replica": its own limiter, connection and metrics
    let r2 = Arc::new(rig(RedisTarget::Single(redis.url()), false, 0));
    let mut tasks = Vec::new();
    for i in 0..32 {
        let r = if i % 2 == 0 { r.clone() } else { r2.clone() };
        tasks.push(tokio::spawn(async move {
            // 32 × 26 = 832: past 50% and 80%, not 100%
            let meta = RequestMeta { mode: Mode::Settle, idempotency_key: Some(format!("c{i}")), usage: vec![] };
            r.limiter.decide(&req("tollgate", &[budget("acme", 26)]), &meta).await.unwrap();
            // a retry of the same settle changes nothing
            r.limiter.decide(&req("tollgate", &[budget("acme", 26)]), &meta).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(redis.cli(&["XLEN", "tg:{tollgate|acme}:alerts"]).unwrap().trim(), "2");
    assert_eq!(redis.cli(&["XLEN", alerts::EVENTS_STREAM]).unwrap().trim(), "2");
    // across both replicas: one event per threshold
    let (m, m2) = (r.metrics.encode(), r2.metrics.encode());
    let count = |p: &str| {
        let line = format!("tollgate_rls_budget_alerts_total{{percent=\"{p}\"}} 1");
        usize::from(m.contains(&line)) + usize::from(m2.contains(&line))
    };
    assert_eq!((count("50"), count("80")), (1, 1), "{m}\n{m2}");
    assert!(!m.contains("percent=\"100\"") && !m2.contains("percent=\"100\""), "{m}");
    assert!(m.contains("tollgate_budget_used_ratio{tenant=\"acme\",level=\"tenant\",limit=\"usd_per_month\"}"), "{m}");
    let events = redis.cli(&["XRANGE", alerts::EVENTS_STREAM, "-", "+"]).unwrap();
    assert!(events.contains("\"threshold_percent\":80") && events.contains("\"threshold\":800"), "{events}");
    // a refund below 80% and a new crossing in the same window: no new event
    let meta = RequestMeta { mode: Mode::Settle, idempotency_key: Some("refund".into()), usage: vec![] };
    r.limiter.decide(&req("tollgate", &[budget("acme", 100).refund(100)]), &meta).await.unwrap();
    let meta = RequestMeta { mode: Mode::Settle, idempotency_key: Some("again".into()), usage: vec![] };
    r.limiter.decide(&req("tollgate", &[budget("acme", 100)]), &meta).await.unwrap();
    assert_eq!(redis.cli(&["XLEN", "tg:{tollgate|acme}:alerts"]).unwrap().trim(), "2");
    // tollgate.alerts on a rate limit is refused
    let bad = D::new(&[("tenant", "acme")]).limit(10, MINUTE).entry("tollgate.alerts", "80");
    assert!(r.limiter.decide(&req("tollgate", &[bad]), &RequestMeta::default()).await.is_err());
}

/// (timestamp, signature, event id, body) of each POST received.
type Received = Arc<Mutex<Vec<(String, String, String, String)>>>;

/// A webhook receiver: records each POST and answers 200.
async fn receiver(listener: tokio::net::TcpListener, got: Received) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { return };
        let got = got.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let got = got.clone();
                async move {
                    let h = |n: &str| req.headers().get(n).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
                    let (ts, sig, id) =
                        (h("x-tollgate-timestamp"), h("x-tollgate-signature"), h("x-tollgate-event-id"));
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    got.lock().unwrap().push((ts, sig, id, String::from_utf8(body.to_vec()).unwrap()));
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                        hyper::body::Bytes::from_static(b"ok"),
                    )))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_events_are_signed_and_survive_a_receiver_outage() {
    let redis = RedisServer::start();
    let r = rig(RedisTarget::Single(redis.url()), true, 0);
    // the worker runs on the real clock: decide at the same time
    r.clock.set(chrono::Utc::now().timestamp_millis());
    let port = free_port();
    let secret = WebhookSecret::new("whsec-test-0123456789");
    let mut settings = WebhookSettings::new(format!("http://127.0.0.1:{port}/hook"), secret.clone());
    settings.min_backoff = Duration::from_millis(100);
    settings.max_backoff = Duration::from_millis(400);
    settings.poll = Duration::from_millis(50);
    settings.timeout = Duration::from_millis(500);
    // the worker runs on the real clock; the decisions on the manual one
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(alerts::run_worker(
        r.storage.clone(),
        settings,
        r.metrics.clone(),
        Arc::new(tollgate_ratelimit::clock::SystemClock),
        async move {
            let _ = stop_rx.await;
        },
    ));
    // receiver down: cross 80%
    let meta = RequestMeta { mode: Mode::Settle, idempotency_key: Some("w1".into()), usage: vec![] };
    r.limiter.decide(&req("tollgate", &[budget("acme", 850)]), &meta).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let log = redis.cli(&["XRANGE", alerts::DELIVERIES_STREAM, "-", "+"]).unwrap();
    assert!(log.contains("failed") && !log.contains("delivered"), "{log}");
    // receiver up: both events (50%, 80%) arrive, signed
    let got = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let rx = tokio::spawn(receiver(listener, got.clone()));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while got.lock().unwrap().len() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = got.lock().unwrap().clone();
    assert_eq!(got.len(), 2, "{got:?}");
    let mut percents = Vec::new();
    for (ts, sig, id, body) in &got {
        let ts: i64 = ts.parse().unwrap();
        assert!(alerts::verify(&secret, ts, body.as_bytes(), sig), "bad signature");
        // a replay with a wrong signature, or a changed body or time, does not verify
        assert!(!alerts::verify(&secret, ts, body.as_bytes(), &sig.replace('a', "b").replace('1', "2")));
        assert!(!alerts::verify(&secret, ts + 1, body.as_bytes(), sig));
        assert!(!alerts::verify(&WebhookSecret::new("another-secret-123"), ts, body.as_bytes(), sig));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["id"], id.as_str());
        assert_eq!(v["tenant"], "acme");
        assert_eq!(v["limit_name"], "usd_per_month");
        percents.push(v["threshold_percent"].as_u64().unwrap());
    }
    percents.sort();
    assert_eq!(percents, [50, 80]);
    // the outbox is empty, the log shows failures then deliveries
    assert_eq!(redis.cli(&["ZCARD", alerts::OUTBOX_DUE]).unwrap().trim(), "0");
    let app = router(LedgerApi { storage: r.storage.clone(), clock: r.clock.clone() });
    let (st, _, body) = get(&app, "/v1/alerts/deliveries?limit=1000").await;
    assert_eq!(st, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let statuses: Vec<&str> =
        v["deliveries"].as_array().unwrap().iter().map(|d| d["status"].as_str().unwrap()).collect();
    assert_eq!(statuses.iter().filter(|s| **s == "delivered").count(), 2, "{statuses:?}");
    assert!(statuses.contains(&"failed"));
    assert!(!body.contains("whsec"), "the secret never shows");
    let _ = stop_tx.send(());
    worker.await.unwrap();
    rx.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_quota_and_alerts_work_on_redis_cluster() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start).await.unwrap();
    let r = rig(RedisTarget::Cluster(cluster.urls()), true, 100);
    ledger_is_idempotent_and_follows_time_zones(&r).await;
    // many tenants land on every master; each one's writes stay in its slot
    for t in 0..12 {
        let tenant = format!("t{t}");
        let rows = vec![row(&tenant, "k", "m", None)];
        for _ in 0..2 {
            r.limiter
                .decide(
                    &req("tollgate", &[budget(&tenant, 900), tpd(&tenant, 5)]),
                    &settle(&format!("s{t}"), rows.clone()),
                )
                .await
                .unwrap();
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (lines, totals) = read::usage(&r.storage, &query(None, "model")).await.unwrap();
    assert_eq!(lines.len(), 13 + 1, "{lines:?}");
    assert_eq!(totals.requests, 4 + 12 * 2);
    let q = read::quota(&r.storage, "tollgate", "t3", T0).await.unwrap();
    assert_eq!(q.len(), 2, "{q:?}");
    assert!(q.iter().any(|l| l.name.as_deref() == Some("usd_per_month") && l.used == 900));
    let events: usize = cluster
        .nodes
        .iter()
        .map(|n| n.cli(&["-c", "XLEN", alerts::EVENTS_STREAM]).unwrap().trim().parse::<usize>().unwrap_or(0))
        .max()
        .unwrap();
    // 12 tenants × (50%, 80%)
    assert_eq!(events, 24);
}
