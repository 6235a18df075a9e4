//! The thin tonic wiring: metadata → plan → storage → answer.

use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use rls_contract::ledger::META_USAGE;
use rls_contract::{META_IDEMPOTENCY_KEY, META_MODE};
use tonic::{Request, Response, Status};

use crate::clock::Clock;
use crate::config::StaticLimits;
use crate::metrics::Metrics;
use crate::plan::{self, Plan, PlanError, PlanSettings, RequestMeta};
use crate::response;
use crate::storage::{Outcome, Storage, StorageError};

#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl DecideError {
    fn metric_code(&self) -> &'static str {
        match self {
            DecideError::Storage(e) if e.is_transient() => "unavailable",
            _ => "invalid_argument",
        }
    }
}

impl From<DecideError> for Status {
    fn from(e: DecideError) -> Self {
        match &e {
            // A storage failure is UNAVAILABLE, never OK or UNKNOWN: Envoy's
            // ratelimit filter (and our wasm filter) then applies its configured
            // failure mode (`failure_mode_deny`), which is the operator's choice
            // between failing open and closed. OK would silently fail open and
            // UNKNOWN hides that the error is transient and retryable.
            DecideError::Storage(s) if s.is_transient() => Status::unavailable(e.to_string()),
            _ => Status::invalid_argument(e.to_string()),
        }
    }
}

/// What happens after a decision besides the answer (the ledger's tenant
/// index, alert delivery, budget gauges). Must not block: it spawns its I/O.
pub trait DecisionObserver: Send + Sync + 'static {
    fn observe(&self, domain: &str, meta: &RequestMeta, plan: &Plan, outcome: &Outcome);
}

/// The rate limiter: holds the storage, the static limits and the clock.
pub struct RateLimiter<S> {
    storage: Arc<S>,
    limits: Arc<StaticLimits>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    settings: PlanSettings,
    observer: Option<Arc<dyn DecisionObserver>>,
}

impl<S: Storage> RateLimiter<S> {
    pub fn new(
        storage: Arc<S>,
        limits: Arc<StaticLimits>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        settings: PlanSettings,
    ) -> Self {
        Self { storage, limits, clock, metrics, settings, observer: None }
    }

    /// Call `observer` after every decision.
    pub fn with_observer(mut self, observer: Arc<dyn DecisionObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Decide one request (without gRPC), recording metrics.
    pub async fn decide(&self, req: &RateLimitRequest, meta: &RequestMeta) -> Result<RateLimitResponse, DecideError> {
        let result = self.decide_inner(req, meta).await;
        match &result {
            Ok(r) => self.metrics.decision(if r.overall_code == 1 { "ok" } else { "over_limit" }),
            Err(e) => self.metrics.decision(e.metric_code()),
        }
        result
    }

    async fn decide_inner(&self, req: &RateLimitRequest, meta: &RequestMeta) -> Result<RateLimitResponse, DecideError> {
        let now = self.clock.now_ms();
        let plan = plan::build(req, meta, &self.limits, self.settings, now)?;
        let unlimited = plan.unlimited_count();
        if unlimited > 0 {
            self.metrics.unlimited_descriptors.inc_by(unlimited as u64);
        }
        if plan.batch.settle {
            self.metrics.settles.inc();
        }
        let outcome = if plan.batch.counters.is_empty() && plan.batch.ledger.is_none() {
            Outcome { allowed: true, replay: false, counters: vec![], alerts: vec![] }
        } else {
            let started = Instant::now();
            let r = self.storage.apply(&plan.batch).await;
            self.metrics.observe_redis(started.elapsed());
            match r {
                Ok(o) => o,
                Err(e) => {
                    if e.is_transient() {
                        self.metrics.redis_errors.inc();
                        tracing::warn!(error = %e, domain = %req.domain, "storage error, answering UNAVAILABLE");
                    }
                    return Err(e.into());
                }
            }
        };
        if outcome.replay {
            self.metrics.idempotent_replays.inc();
        }
        if let Some(o) = &self.observer {
            o.observe(&req.domain, meta, &plan, &outcome);
        }
        Ok(response::build(&plan, &outcome, now))
    }
}

fn metadata_str<'a>(req: &'a Request<RateLimitRequest>, key: &str) -> Result<Option<&'a str>, Status> {
    match req.metadata().get(key) {
        None => Ok(None),
        Some(v) => {
            v.to_str().map(Some).map_err(|_| Status::invalid_argument(format!("{key} metadata is not visible ASCII")))
        }
    }
}

#[tonic::async_trait]
impl<S: Storage> RateLimitService for RateLimiter<S> {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let usage = metadata_str(&request, META_USAGE)?;
        let meta = plan::parse_meta(metadata_str(&request, META_MODE)?, metadata_str(&request, META_IDEMPOTENCY_KEY)?)
            .and_then(|mut m| {
                m.usage = plan::parse_usage(usage)?;
                Ok(m)
            })
            .map_err(|e| {
                self.metrics.decision("invalid_argument");
                Status::invalid_argument(e.to_string())
            })?;
        let req = request.into_inner();
        match self.decide(&req, &meta).await {
            Ok(r) => Ok(Response::new(r)),
            Err(e) => {
                tracing::debug!(error = %e, domain = %req.domain, "request failed");
                Err(e.into())
            }
        }
    }
}
