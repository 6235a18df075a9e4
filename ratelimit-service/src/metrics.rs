//! Prometheus metrics and the tiny HTTP endpoint that serves them.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// ok, over_limit, unavailable, invalid_argument
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LookupLabels {
    /// key, tenant, changes
    pub kind: String,
    /// found, unknown_key, unknown_tenant, changed, reset, invalid, unavailable, error
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetLabels {
    pub tenant: String,
    /// tenant (key and user budgets are not exported: unbounded cardinality)
    pub level: String,
    /// the descriptor's `limit` entry, e.g. usd_per_month
    pub limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PercentLabel {
    pub percent: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// delivered, failed, expired
    pub status: String,
}

pub struct Metrics {
    registry: Registry,
    pub budget_used_ratio: Family<BudgetLabels, Gauge<f64, AtomicU64>>,
    pub budget_used: Family<BudgetLabels, Gauge<f64, AtomicU64>>,
    pub budget_limit: Family<BudgetLabels, Gauge<f64, AtomicU64>>,
    pub budget_alerts: Family<PercentLabel, Counter>,
    pub alert_deliveries: Family<StatusLabel, Counter>,
    pub ledger_rows: Counter,
    pub registry_lookups: Family<LookupLabels, Counter>,
    pub decisions: Family<CodeLabel, Counter>,
    pub redis_latency: Histogram,
    pub redis_errors: Counter,
    pub idempotent_replays: Counter,
    pub unlimited_descriptors: Counter,
    pub settles: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let decisions = Family::<CodeLabel, Counter>::default();
        let redis_latency = Histogram::new(exponential_buckets(0.000_1, 2.0, 16));
        let redis_errors = Counter::default();
        let idempotent_replays = Counter::default();
        let unlimited_descriptors = Counter::default();
        let settles = Counter::default();
        let registry_lookups = Family::<LookupLabels, Counter>::default();
        registry.register(
            "tollgate_rls_registry_lookups",
            "Filter-facing registry answers by kind and status",
            registry_lookups.clone(),
        );
        registry.register("tollgate_rls_decisions", "ShouldRateLimit answers by code", decisions.clone());
        registry.register(
            "tollgate_rls_redis_latency_seconds",
            "Latency of one Redis decision round trip",
            redis_latency.clone(),
        );
        registry.register("tollgate_rls_redis_errors", "Redis calls that failed or timed out", redis_errors.clone());
        registry.register(
            "tollgate_rls_idempotent_replays",
            "Requests answered from an existing idempotency key, charging nothing",
            idempotent_replays.clone(),
        );
        registry.register(
            "tollgate_rls_unlimited_descriptors",
            "Descriptors with neither a limit override nor a static limit (answered OK)",
            unlimited_descriptors.clone(),
        );
        registry.register("tollgate_rls_settles", "Requests in settle mode", settles.clone());
        let budget_used_ratio = Family::<BudgetLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "tollgate_budget_used_ratio",
            "Share of a tenant-level calendar budget (one with alert thresholds) used in its window, as of this replica's last settle on it (set at most once a second)",
            budget_used_ratio.clone(),
        );
        let budget_used = Family::<BudgetLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "tollgate_budget_used",
            "Usage of a tenant-level calendar budget in its window (its unit: micro-USD for usd_* budgets), as of this replica's last settle on it (set at most once a second)",
            budget_used.clone(),
        );
        let budget_limit = Family::<BudgetLabels, Gauge<f64, AtomicU64>>::default();
        registry.register("tollgate_budget_limit", "The limit of a tenant-level calendar budget", budget_limit.clone());
        let budget_alerts = Family::<PercentLabel, Counter>::default();
        registry.register(
            "tollgate_rls_budget_alerts",
            "Budget thresholds reached (one per counter, window and threshold across replicas)",
            budget_alerts.clone(),
        );
        let alert_deliveries = Family::<StatusLabel, Counter>::default();
        registry.register(
            "tollgate_rls_alert_deliveries",
            "Alert webhook attempts by outcome",
            alert_deliveries.clone(),
        );
        let ledger_rows = Counter::default();
        registry.register("tollgate_rls_ledger_rows", "Usage rows recorded in the ledger", ledger_rows.clone());
        Self {
            budget_used_ratio,
            budget_used,
            budget_limit,
            budget_alerts,
            alert_deliveries,
            ledger_rows,
            registry,
            registry_lookups,
            decisions,
            redis_latency,
            redis_errors,
            idempotent_replays,
            unlimited_descriptors,
            settles,
        }
    }

    pub fn decision(&self, code: &str) {
        self.decisions.get_or_create(&CodeLabel { code: code.to_owned() }).inc();
    }

    /// A budget's state after a decision: used and limit in its unit.
    pub fn budget(&self, tenant: &str, level: &str, limit_name: &str, used: u64, limit: u64) {
        let labels = BudgetLabels { tenant: tenant.to_owned(), level: level.to_owned(), limit: limit_name.to_owned() };
        self.budget_used_ratio.get_or_create(&labels).set(if limit == 0 { 1.0 } else { used as f64 / limit as f64 });
        self.budget_used.get_or_create(&labels).set(used as f64);
        self.budget_limit.get_or_create(&labels).set(limit as f64);
    }

    pub fn alert_event(&self, percent: u32) {
        self.budget_alerts.get_or_create(&PercentLabel { percent: percent.to_string() }).inc();
    }

    pub fn alert_delivery(&self, status: &str) {
        self.alert_deliveries.get_or_create(&StatusLabel { status: status.to_owned() }).inc();
    }

    pub fn lookup(&self, kind: &str, status: &str) {
        self.registry_lookups.get_or_create(&LookupLabels { kind: kind.to_owned(), status: status.to_owned() }).inc();
    }

    pub fn observe_redis(&self, d: Duration) {
        self.redis_latency.observe(d.as_secs_f64());
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// Serve `GET /metrics` (and `GET /healthz`) until `shutdown` resolves.
/// A deliberately small HTTP/1.0-style responder: one request per connection.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            a = listener.accept() => a,
        };
        let Ok((mut stream, _)) = accepted else { continue };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            let read = async {
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST_HEAD {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or(&[])),
                    }
                }
            };
            if tokio::time::timeout(Duration::from_secs(5), read).await.is_err() {
                return;
            }
            let head = String::from_utf8_lossy(&buf);
            let mut parts = head.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (status, ctype, body) = match (method, path) {
                ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", metrics.encode()),
                ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_owned()),
                _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
