//! What does the filter ask the registry, and how is the answer bounded?
//! The contract's three GETs (`rls_contract::registry`) on the registry port:
//! no admin auth (an internal port, like the RLS port), a concurrency cap and
//! a deadline per request so a flood answers 503 instead of piling up.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use rls_contract::registry::{valid_key_digest, valid_tenant_id, LookupAnswer, LookupStatus};
use tokio::sync::Semaphore;

use super::http::{not_found, query_get, query_pairs, ApiError};
use super::store::{RegistryStore, StoreError};
use crate::metrics::Metrics;

/// Bounds of the lookup port.
#[derive(Debug, Clone, Copy)]
pub struct LookupLimits {
    /// Lookups served at once; more wait up to `deadline`, then get 503.
    pub max_concurrent: usize,
    /// Whole-request deadline (waiting for a slot plus Redis).
    pub deadline: Duration,
}

impl Default for LookupLimits {
    fn default() -> Self {
        Self { max_concurrent: 256, deadline: Duration::from_secs(2) }
    }
}

#[derive(Clone)]
struct LookupState {
    store: Arc<RegistryStore>,
    metrics: Arc<Metrics>,
    permits: Arc<Semaphore>,
    deadline: Duration,
}

/// The filter-facing router.
pub fn router(store: Arc<RegistryStore>, metrics: Arc<Metrics>, limits: LookupLimits) -> Router {
    let state = LookupState {
        store,
        metrics,
        permits: Arc::new(Semaphore::new(limits.max_concurrent.max(1))),
        deadline: limits.deadline,
    };
    Router::new()
        .route("/v1/registry/keys/{sha256}", get(key))
        .route("/v1/registry/tenants/{id}", get(tenant))
        .route("/v1/registry/changes", get(changes))
        .fallback(not_found)
        .with_state(state)
}

fn credentials_flag(raw: Option<&str>) -> Result<bool, ApiError> {
    let pairs = query_pairs(raw)?;
    match query_get(&pairs, "credentials") {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(_) => Err(ApiError::invalid("credentials", "must be true or false")),
    }
}

fn status_name(a: &LookupAnswer) -> &'static str {
    match a.status {
        LookupStatus::Found => "found",
        LookupStatus::UnknownKey => "unknown_key",
        LookupStatus::UnknownTenant => "unknown_tenant",
    }
}

/// Run `work` within the port's bounds; count the answer under `kind`.
async fn bounded<T, F>(s: &LookupState, kind: &str, work: F, status: impl Fn(&T) -> &'static str) -> Response
where
    T: serde::Serialize,
    F: std::future::Future<Output = Result<T, StoreError>>,
{
    let run = async {
        let _permit = s.permits.acquire().await.map_err(|_| ApiError::unavailable())?;
        work.await.map_err(ApiError::from)
    };
    match tokio::time::timeout(s.deadline, run).await {
        Ok(Ok(answer)) => {
            s.metrics.lookup(kind, status(&answer));
            Json(answer).into_response()
        }
        Ok(Err(e)) => {
            let label = if e.status == StatusCode::SERVICE_UNAVAILABLE { "unavailable" } else { "error" };
            s.metrics.lookup(kind, label);
            e.into_response()
        }
        Err(_) => {
            s.metrics.lookup(kind, "unavailable");
            ApiError::unavailable().into_response()
        }
    }
}

fn invalid(s: &LookupState, kind: &str, e: ApiError) -> Response {
    s.metrics.lookup(kind, "invalid");
    e.into_response()
}

async fn key(State(s): State<LookupState>, Path(digest): Path<String>, RawQuery(q): RawQuery) -> Response {
    if !valid_key_digest(&digest) {
        return invalid(&s, "key", ApiError::invalid("sha256", "must be 64 lowercase hex characters"));
    }
    let creds = match credentials_flag(q.as_deref()) {
        Ok(c) => c,
        Err(e) => return invalid(&s, "key", e),
    };
    let store = s.store.clone();
    bounded(&s, "key", async move { store.lookup_key(&digest, creds).await }, status_name).await
}

async fn tenant(State(s): State<LookupState>, Path(id): Path<String>, RawQuery(q): RawQuery) -> Response {
    if !valid_tenant_id(&id) {
        return invalid(&s, "tenant", ApiError::invalid("id", "must be 1..=128 of letters, digits, '-', '_', '.'"));
    }
    let creds = match credentials_flag(q.as_deref()) {
        Ok(c) => c,
        Err(e) => return invalid(&s, "tenant", e),
    };
    let store = s.store.clone();
    bounded(&s, "tenant", async move { store.lookup_tenant(&id, creds).await }, status_name).await
}

async fn changes(State(s): State<LookupState>, RawQuery(q): RawQuery) -> Response {
    let since = match query_pairs(q.as_deref()).map(|p| query_get(&p, "since").and_then(|v| v.parse::<u64>().ok())) {
        Ok(Some(n)) => n,
        Ok(None) => return invalid(&s, "changes", ApiError::invalid("since", "must be a registry version (u64)")),
        Err(e) => return invalid(&s, "changes", e),
    };
    let store = s.store.clone();
    bounded(
        &s,
        "changes",
        async move { store.changes(since).await },
        |c: &rls_contract::registry::Changes| {
            if c.reset {
                "reset"
            } else {
                "changed"
            }
        },
    )
    .await
}
