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
use crate::metrics::Metrics;
use crate::plan::PlanSettings;
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
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen for gRPC on {addr}: {source}")]
    BindGrpc { addr: SocketAddr, source: std::io::Error },
    #[error("cannot listen for metrics on {addr}: {source}")]
    BindMetrics { addr: SocketAddr, source: std::io::Error },
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
    let limiter = RateLimiter::new(
        storage.clone(),
        settings.limits.clone(),
        Arc::new(SystemClock),
        metrics.clone(),
        PlanSettings {
            idempotency_ttl_ms: settings.idempotency_ttl.as_millis() as u64,
            reserve_idempotency_ttl_ms: settings.reserve_idempotency_ttl.as_millis() as u64,
        },
    );

    let incoming = TcpIncoming::bind(settings.grpc_addr)
        .map_err(|source| ServeError::BindGrpc { addr: settings.grpc_addr, source })?
        .with_nodelay(Some(true));
    let metrics_listener = TcpListener::bind(settings.metrics_addr)
        .await
        .map_err(|source| ServeError::BindMetrics { addr: settings.metrics_addr, source })?;

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

    tracing::info!(
        grpc = %settings.grpc_addr,
        metrics = %settings.metrics_addr,
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
    tracing::info!("stopped");
    Ok(result?)
}
