//! Test helpers: real `redis-server` processes on free loopback ports (killed by
//! PID on drop), a Redis Cluster, and request builders.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{Entry, RateLimitOverride};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::google::protobuf::UInt64Value;
use tollgate_ratelimit::clock::ManualClock;
use tollgate_ratelimit::config::StaticLimits;
use tollgate_ratelimit::metrics::Metrics;
use tollgate_ratelimit::plan::PlanSettings;
use tollgate_ratelimit::service::RateLimiter;
use tollgate_ratelimit::storage::redis::{RedisStorage, RedisTarget};

pub const OK: i32 = 1;
pub const OVER: i32 = 2;

pub const SECOND: i32 = 1;
pub const MINUTE: i32 = 2;
pub const HOUR: i32 = 3;
pub const DAY: i32 = 4;
pub const MONTH: i32 = 5;
pub const YEAR: i32 = 6;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tollgate-rls-test-{}-{tag}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&d).expect("tmpdir");
    d
}

/// One `redis-server` process.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_on(free_port(), &[])
    }

    pub fn start_on(port: u16, extra: &[&str]) -> Self {
        let dir = tmpdir(&format!("redis{port}"));
        let mut s = Self { port, child: None, dir, extra: extra.iter().map(|s| s.to_string()).collect() };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", &self.dir.display().to_string()])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.cli(&["PING"]).map(|o| o.trim() == "PONG").unwrap_or(false) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not start", self.port);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Run `redis-cli` against this server; stdout on success.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Kill the process (SIGKILL, by PID) and wait for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A three-master Redis Cluster on loopback.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                let port = free_port();
                RedisServer::start_on(
                    port,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        &format!("nodes-{port}.conf"),
                        "--cluster-node-timeout",
                        "2000",
                    ],
                )
            })
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli");
        assert!(out.success(), "redis-cli --cluster create failed");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = nodes
                .iter()
                .all(|n| n.cli(&["CLUSTER", "INFO"]).map(|s| s.contains("cluster_state:ok")).unwrap_or(false));
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "cluster did not become ok");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { nodes }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }
}

pub type Limiter = RateLimiter<RedisStorage>;

/// A limiter on `target` with a manual clock at `now_ms`.
pub fn limiter_with(
    target: RedisTarget,
    limits: StaticLimits,
    now_ms: i64,
) -> (Limiter, Arc<ManualClock>, Arc<Metrics>) {
    limiter_timeout(target, limits, now_ms, Duration::from_millis(1000))
}

/// As [`limiter_with`], with the Redis timeout given: tests that load Redis
/// with hundreds of concurrent calls on a small, busy machine need more than
/// the default second.
pub fn limiter_timeout(
    target: RedisTarget,
    limits: StaticLimits,
    now_ms: i64,
    timeout: Duration,
) -> (Limiter, Arc<ManualClock>, Arc<Metrics>) {
    let storage = Arc::new(RedisStorage::new(&target, timeout).expect("storage"));
    let clock = Arc::new(ManualClock::new(now_ms));
    let metrics = Arc::new(Metrics::new());
    let l = RateLimiter::new(
        storage,
        Arc::new(limits),
        clock.clone(),
        metrics.clone(),
        PlanSettings { idempotency_ttl_ms: 60_000, reserve_idempotency_ttl_ms: 60_000, ..PlanSettings::default() },
    );
    (l, clock, metrics)
}

pub fn limiter(redis: &RedisServer, now_ms: i64) -> (Limiter, Arc<ManualClock>, Arc<Metrics>) {
    limiter_with(RedisTarget::Single(redis.url()), StaticLimits::default(), now_ms)
}

/// Descriptor builder.
#[derive(Clone, Debug)]
pub struct D(pub RateLimitDescriptor);

impl D {
    pub fn new(entries: &[(&str, &str)]) -> Self {
        D(RateLimitDescriptor {
            entries: entries.iter().map(|(k, v)| Entry { key: k.to_string(), value: v.to_string() }).collect(),
            limit: None,
            hits_addend: None,
            is_negative_hits: false,
        })
    }
    /// Limit override; values above u32 go into `tollgate.limit`.
    pub fn limit(mut self, limit: u64, unit: i32) -> Self {
        self.0.limit = Some(RateLimitOverride { requests_per_unit: u32::try_from(limit).unwrap_or(u32::MAX), unit });
        if limit > u64::from(u32::MAX) {
            self.0.entries.push(Entry { key: "tollgate.limit".into(), value: limit.to_string() });
        }
        self
    }
    pub fn entry(mut self, k: &str, v: &str) -> Self {
        self.0.entries.push(Entry { key: k.into(), value: v.into() });
        self
    }
    pub fn hits(mut self, h: u64) -> Self {
        self.0.hits_addend = Some(UInt64Value { value: h });
        self
    }
    pub fn refund(mut self, h: u64) -> Self {
        self.0.hits_addend = Some(UInt64Value { value: h });
        self.0.is_negative_hits = true;
        self
    }
}

pub fn req(domain: &str, ds: &[D]) -> RateLimitRequest {
    RateLimitRequest { domain: domain.into(), descriptors: ds.iter().map(|d| d.0.clone()).collect(), hits_addend: 0 }
}

pub fn ms(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339).expect("date").timestamp_millis()
}
