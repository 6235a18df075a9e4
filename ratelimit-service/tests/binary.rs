//! The real `tollgate-ratelimit` binary: gRPC wiring, metadata, health, metrics,
//! startup errors and graceful shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test and bench code: a failure should stop loudly
#![allow(clippy::cloned_ref_to_slice_refs)] // &[d.clone()] reads better in tests

mod common;

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const BIN: &str = env!("CARGO_BIN_EXE_tollgate-ratelimit");

const LIMITS: &str = r#"
domains:
  - domain: tollgate_native
    descriptors:
      - key: generic_key
        value: per_tenant_rpm
        rate_limit: { unit: minute, requests_per_unit: 2 }
"#;

struct Service {
    child: Child,
    grpc: u16,
    metrics: u16,
    dir: std::path::PathBuf,
}

impl Service {
    fn start(redis_url: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tollgate-rls-bin-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).expect("dir");
        let config = dir.join("limits.yaml");
        std::fs::write(&config, LIMITS).expect("write");
        let (grpc, metrics) = (free_port(), free_port());
        let child = Command::new(BIN)
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
            .args(["--redis-url", redis_url, "--redis-timeout-ms", "300", "--log-json"])
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn service");
        Self { child, grpc, metrics, dir }
    }

    async fn client(&self) -> Channel {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Channel::from_shared(format!("http://127.0.0.1:{}", self.grpc)).expect("uri").connect().await {
                Ok(c) => return c,
                Err(e) if Instant::now() > deadline => panic!("service did not start: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    fn http_get(&self, path: &str) -> String {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics)).expect("connect metrics");
        write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        out
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "no graceful exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn with_meta(r: RateLimitRequest, meta: &[(&'static str, &str)]) -> tonic::Request<RateLimitRequest> {
    let mut req = tonic::Request::new(r);
    for (k, v) in meta {
        req.metadata_mut().insert(*k, v.parse().expect("ascii"));
    }
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_rls_health_and_metrics() {
    let mut redis = RedisServer::start();
    let mut svc = Service::start(&redis.url());
    let channel = svc.client().await;
    let mut rls = RateLimitServiceClient::new(channel.clone());
    let mut health = HealthClient::new(channel);

    // health: the process and the RLS service (once Redis answered PING)
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = health
            .check(HealthCheckRequest { service: "envoy.service.ratelimit.v3.RateLimitService".into() })
            .await
            .map(|r| r.into_inner().status);
        if matches!(s, Ok(v) if v == ServingStatus::Serving as i32) {
            break;
        }
        assert!(Instant::now() < deadline, "not serving: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // overrides: reserve then settle with idempotency over gRPC metadata
    let budget = D::new(&[("tenant", "acme"), ("budget", "tokens")]).limit(1_000, DAY);
    let r = rls.should_rate_limit(req("tollgate", &[budget.clone().hits(600)])).await.expect("rpc").into_inner();
    assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (OK, 400));
    for _ in 0..3 {
        let r = rls
            .should_rate_limit(with_meta(
                req("tollgate", &[budget.clone().hits(700)]),
                &[("x-tollgate-mode", "settle"), ("x-tollgate-idempotency-key", "req-1")],
            ))
            .await
            .expect("rpc")
            .into_inner();
        assert_eq!((r.overall_code, r.statuses[0].code, r.statuses[0].limit_remaining), (OK, OVER, 0));
    }
    let r = rls
        .should_rate_limit(with_meta(req("tollgate", &[budget.clone().refund(500)]), &[("x-tollgate-mode", "settle")]))
        .await
        .expect("rpc")
        .into_inner();
    assert_eq!(r.statuses[0].limit_remaining, 200); // 600 + 700 - 500 = 800 used

    // bad metadata and bad reserved entries are INVALID_ARGUMENT
    let e = rls
        .should_rate_limit(with_meta(req("tollgate", &[budget.clone()]), &[("x-tollgate-mode", "later")]))
        .await
        .expect_err("bad mode");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = rls
        .should_rate_limit(req("tollgate", &[budget.clone().entry("tollgate.limit", "lots")]))
        .await
        .expect_err("bad limit");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // static config, as Envoy's native ratelimit filter would send it (no override)
    let native = RateLimitRequest {
        domain: "tollgate_native".into(),
        descriptors: vec![D::new(&[("generic_key", "per_tenant_rpm")]).0],
        hits_addend: 0,
    };
    let codes: Vec<i32> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(rls.should_rate_limit(native.clone()).await.expect("rpc").into_inner().overall_code);
        }
        v
    };
    assert_eq!(codes, vec![OK, OK, OVER]);

    // metrics endpoint
    let m = svc.http_get("/metrics");
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    for needle in [
        "tollgate_rls_decisions_total{code=\"ok\"}",
        "tollgate_rls_decisions_total{code=\"over_limit\"} 1",
        "tollgate_rls_decisions_total{code=\"invalid_argument\"} 2",
        "tollgate_rls_idempotent_replays_total 2",
        "tollgate_rls_redis_latency_seconds_bucket",
        "tollgate_rls_redis_errors_total 0",
    ] {
        assert!(m.contains(needle), "missing {needle} in\n{m}");
    }
    assert!(svc.http_get("/nope").starts_with("HTTP/1.1 404"));

    // Redis down: UNAVAILABLE and NOT_SERVING; back: OK again, same process
    redis.kill();
    let e = rls.should_rate_limit(req("tollgate", &[budget.clone()])).await.expect_err("down");
    assert_eq!(e.code(), tonic::Code::Unavailable);
    let redis = tokio::task::spawn_blocking(move || {
        redis.restart();
        redis
    })
    .await
    .expect("restart");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match rls.should_rate_limit(req("tollgate", &[budget.clone()])).await {
            Ok(r) => {
                assert_eq!(r.into_inner().overall_code, OK);
                break;
            }
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::Unavailable);
                assert!(Instant::now() < deadline, "did not recover");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert!(svc.http_get("/metrics").contains("tollgate_rls_redis_errors_total"));

    // graceful shutdown
    let status = svc.terminate();
    assert!(status.success(), "exit status {status:?}");
    drop(redis);
}

#[test]
fn startup_errors_are_clear() {
    let dir = std::env::temp_dir().join(format!("tollgate-rls-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "domains: [{domain: d, descriptors: [{key: k, rate_limit: {unit: fortnight, requests_per_unit: 1}}]}]",
    )
    .expect("write");
    let out = Command::new(BIN).arg("--config").arg(&bad).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fortnight"), "{err}");

    let out = Command::new(BIN).args(["--redis-timeout-ms", "0"]).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("redis-timeout-ms"));

    let out = Command::new(BIN)
        .args(["--redis-url", "redis://127.0.0.1:1", "--redis-cluster-nodes", "127.0.0.1:2"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn registry_secrets_are_checked_at_startup_without_echoing_them() {
    // The admin API without tokens: refused.
    let out = Command::new(BIN)
        .args(["--admin-addr", "127.0.0.1:0"])
        .env_remove("TOLLGATE_ADMIN_TOKENS")
        .env_remove("TOLLGATE_ADMIN_TOKENS_FILE")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin tokens"));
    // A short token: refused, and not printed.
    let out = Command::new(BIN)
        .args(["--admin-addr", "127.0.0.1:0"])
        .env("TOLLGATE_ADMIN_TOKENS", "ops:tooshort-xyz")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at least 16") && !err.contains("tooshort-xyz"), "{err}");
    // A KEK that is not 32 bytes: refused, and not printed.
    let out = Command::new(BIN).env("TOLLGATE_KEK", "k1:c2hvcnQta2V5LW1hdGVyaWFs").output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("32 bytes") && !err.contains("c2hvcnQta2V5LW1hdGVyaWFs"), "{err}");
}
