//! Process wiring: listeners, health, metrics, graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;

use crate::clock::SystemClock;
use crate::config::StaticLimits;
use crate::ledger::alerts::{AlertSink, WebhookSettings};
use crate::ledger::api::LedgerApi;
use crate::ledger::observer::LedgerObserver;
use crate::ledger::LedgerSettings;
use crate::metrics::Metrics;
use crate::plan::PlanSettings;
use crate::registry::admin_api::AdminTokens;
use crate::registry::crypto::KekRing;
use crate::registry::lookup_api::LookupLimits;
use crate::registry::serve::{serve, ServeLimits};
use crate::registry::store::RegistryStore;
use crate::service::RateLimiter;
use crate::storage::redis::{RedisStorage, RedisTarget};
use crate::storage::Storage;

/// Everything the process needs, already validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub redis: RedisTarget,
    pub redis_timeout: Duration,
    pub limits: Arc<StaticLimits>,
    pub idempotency_ttl: Duration,
    pub reserve_idempotency_ttl: Duration,
    pub registry: RegistrySettings,
    /// The ledger, quota index and alerts (on by default).
    pub ledger: LedgerSettings,
    /// Approximate bound of the global alert event stream.
    pub alert_stream_max_len: u64,
    /// Alert webhook delivery; off when `None`.
    pub webhook: Option<WebhookSettings>,
}

/// The tenant registry's listeners and secrets (both listeners off by default).
#[derive(Debug, Clone, Default)]
pub struct RegistrySettings {
    /// A separate Redis for the registry; `None`: the counters' Redis.
    pub redis: Option<RedisTarget>,
    /// Filter-facing lookups (no auth: an internal port).
    pub registry_addr: Option<SocketAddr>,
    /// Admin API; needs `admin_tokens`.
    pub admin_addr: Option<SocketAddr>,
    pub admin_tokens: Option<Arc<AdminTokens>>,
    /// Key-encryption keys of provider credentials (may be empty).
    pub kek: Arc<KekRing>,
    pub changes_max_len: u64,
    pub audit_max_len: u64,
    pub lookup_limits: LookupLimits,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen for gRPC on {addr}: {source}")]
    BindGrpc { addr: SocketAddr, source: std::io::Error },
    #[error("cannot listen for metrics on {addr}: {source}")]
    BindMetrics { addr: SocketAddr, source: std::io::Error },
    #[error("cannot listen for the registry on {addr}: {source}")]
    BindRegistry { addr: SocketAddr, source: std::io::Error },
    #[error("cannot listen for the admin API on {addr}: {source}")]
    BindAdmin { addr: SocketAddr, source: std::io::Error },
    #[error("the admin API needs admin tokens (--admin-tokens-file or TOLLGATE_ADMIN_TOKENS)")]
    NoAdminTokens,
    #[error("invalid Redis configuration: {0}")]
    Redis(#[from] crate::storage::StorageError),
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

/// The gRPC service name reported by health checks.
pub const RLS_SERVICE_NAME: &str = "envoy.service.ratelimit.v3.RateLimitService";

/// Serve until `shutdown` resolves, then drain in-flight requests and return.
pub async fn run(settings: Settings, shutdown: impl std::future::Future<Output = ()>) -> Result<(), ServeError> {
    let storage = Arc::new(RedisStorage::new(&settings.redis, settings.redis_timeout)?);
    let metrics = Arc::new(Metrics::new());
    let mut limiter = RateLimiter::new(
        storage.clone(),
        settings.limits.clone(),
        Arc::new(SystemClock),
        metrics.clone(),
        PlanSettings {
            idempotency_ttl_ms: settings.idempotency_ttl.as_millis() as u64,
            reserve_idempotency_ttl_ms: settings.reserve_idempotency_ttl.as_millis() as u64,
            ledger: settings.ledger,
        },
    );
    if settings.ledger.enabled {
        limiter = limiter.with_observer(Arc::new(LedgerObserver::new(
            storage.clone(),
            metrics.clone(),
            Arc::new(SystemClock),
            AlertSink { stream_max_len: settings.alert_stream_max_len, webhook: settings.webhook.is_some() },
            settings.ledger.retention_days,
        )));
    }

    let incoming = TcpIncoming::bind(settings.grpc_addr)
        .map_err(|source| ServeError::BindGrpc { addr: settings.grpc_addr, source })?
        .with_nodelay(Some(true));
    let metrics_listener = TcpListener::bind(settings.metrics_addr)
        .await
        .map_err(|source| ServeError::BindMetrics { addr: settings.metrics_addr, source })?;

    let registry_store = {
        let r = &settings.registry;
        let redis = match &r.redis {
            Some(target) => Arc::new(RedisStorage::new(target, settings.redis_timeout)?),
            None => storage.clone(),
        };
        Arc::new(RegistryStore::new(redis, r.kek.clone(), Arc::new(SystemClock), r.changes_max_len, r.audit_max_len))
    };
    let registry_listener = match settings.registry.registry_addr {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|source| ServeError::BindRegistry { addr, source })?),
        None => None,
    };
    let admin = match settings.registry.admin_addr {
        Some(addr) => {
            let tokens = settings.registry.admin_tokens.clone().ok_or(ServeError::NoAdminTokens)?;
            let l = TcpListener::bind(addr).await.map_err(|source| ServeError::BindAdmin { addr, source })?;
            Some((l, tokens))
        }
        None => None,
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };

    let (reporter, health_service) = tonic_health::server::health_reporter();
    // The RLS service is SERVING while Redis answers PING, NOT_SERVING otherwise;
    // the empty service name ("the process") stays SERVING.
    let health_task = {
        let storage = storage.clone();
        let mut rx = stop_rx.clone();
        tokio::spawn(async move {
            let mut last: Option<bool> = None;
            loop {
                let up = storage.ping().await.is_ok();
                if last != Some(up) {
                    if up {
                        reporter.set_service_status(RLS_SERVICE_NAME, tonic_health::ServingStatus::Serving).await;
                        tracing::info!("redis reachable");
                    } else {
                        reporter.set_service_status(RLS_SERVICE_NAME, tonic_health::ServingStatus::NotServing).await;
                        tracing::warn!("redis unreachable: answering UNAVAILABLE until it is back");
                    }
                    last = Some(up);
                }
                tokio::select! {
                    _ = rx.wait_for(|v| *v) => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        })
    };

    let metrics_task = tokio::spawn(crate::metrics::serve(metrics_listener, metrics.clone(), stopped(stop_rx.clone())));
    let mut http_tasks = Vec::new();
    if let Some(listener) = registry_listener {
        let app = crate::registry::lookup_api::router(
            registry_store.clone(),
            metrics.clone(),
            settings.registry.lookup_limits,
        );
        let limits = ServeLimits {
            max_connections: settings.registry.lookup_limits.max_concurrent * 4,
            ..ServeLimits::default()
        };
        http_tasks.push(tokio::spawn(serve(listener, app, limits, stopped(stop_rx.clone()))));
    }
    if let Some(webhook) = settings.webhook.clone() {
        http_tasks.push(tokio::spawn(crate::ledger::alerts::run_worker(
            storage.clone(),
            webhook,
            metrics.clone(),
            Arc::new(SystemClock),
            stopped(stop_rx.clone()),
        )));
    }
    if let Some((listener, tokens)) = admin {
        let ledger_api =
            crate::ledger::api::router(LedgerApi { storage: storage.clone(), clock: Arc::new(SystemClock) });
        let app = crate::registry::admin_api::router_with(registry_store.clone(), tokens, ledger_api);
        http_tasks.push(tokio::spawn(serve(listener, app, ServeLimits::default(), stopped(stop_rx.clone()))));
    }

    tracing::info!(
        grpc = %settings.grpc_addr,
        metrics = %settings.metrics_addr,
        registry = ?settings.registry.registry_addr,
        admin = ?settings.registry.admin_addr,
        ledger = settings.ledger.enabled,
        alert_webhook = settings.webhook.is_some(),
        kek_kids = ?settings.registry.kek.kids(),
        redis = ?settings.redis,
        "tollgate-ratelimit listening"
    );

    let grpc = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(RateLimitServiceServer::new(limiter))
        .serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone()));
    tokio::pin!(grpc);
    tokio::pin!(shutdown);

    let result = tokio::select! {
        r = &mut grpc => r,
        _ = &mut shutdown => {
            tracing::info!("shutting down: draining in-flight requests");
            let _ = stop_tx.send(true);
            grpc.await
        }
    };
    let _ = stop_tx.send(true);
    let _ = health_task.await;
    let _ = metrics_task.await;
    for t in http_tasks {
        let _ = t.await;
    }
    tracing::info!("stopped");
    Ok(result?)
}
