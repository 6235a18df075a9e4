//! The operator's usage, quota and alert-delivery endpoints, on the admin
//! port behind the admin bearer tokens (`registry::admin_api` applies them).

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use redis::Value;
use rls_contract::registry::valid_tenant_id;
use serde_json::json;

use super::alerts::DELIVERIES_STREAM;
use super::read::{self, GroupBy, UsageQuery, MAX_REPORT_DAYS};
use super::{day_number, parse_day};
use crate::clock::Clock;
use crate::registry::http::{query_get, query_limit, query_pairs, ApiError};
use crate::registry::store::valid_stream_id;
use crate::storage::redis::RedisStorage;

/// The default RLS domain (the filter's default `rate_limit.domain`).
pub const DEFAULT_DOMAIN: &str = "tollgate";

#[derive(Clone)]
pub struct LedgerApi {
    pub storage: Arc<RedisStorage>,
    pub clock: Arc<dyn Clock>,
}

/// The routes (auth is added by the admin router).
pub fn router(api: LedgerApi) -> Router {
    Router::new()
        .route("/v1/usage", get(usage))
        .route("/v1/tenants/{id}/quota", get(quota))
        .route("/v1/alerts/deliveries", get(deliveries))
        .with_state(api)
}

type ApiResult<T> = Result<T, ApiError>;

fn unavailable(e: crate::storage::StorageError) -> ApiError {
    tracing::warn!(error = %e, "ledger storage unavailable");
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the ledger storage is unavailable; retry")
}

const KNOWN_USAGE_PARAMS: [&str; 9] = ["tenant", "key", "user", "model", "from", "to", "group_by", "format", "domain"];

fn domain(pairs: &[(String, String)]) -> ApiResult<String> {
    match query_get(pairs, "domain") {
        None => Ok(DEFAULT_DOMAIN.to_owned()),
        Some(d) if !d.is_empty() && d.len() <= 128 && d.bytes().all(|b| b.is_ascii_graphic()) => Ok(d.to_owned()),
        Some(_) => Err(ApiError::invalid("domain", "must be 1..=128 visible ASCII characters")),
    }
}

fn text_filter(pairs: &[(String, String)], name: &str) -> ApiResult<Option<String>> {
    match query_get(pairs, name) {
        None => Ok(None),
        Some(v) if !v.is_empty() && v.len() <= 128 && !v.chars().any(char::is_control) => Ok(Some(v.to_owned())),
        Some(_) => Err(ApiError::invalid(name, "must be 1..=128 characters without control characters")),
    }
}

async fn usage(State(api): State<LedgerApi>, RawQuery(q): RawQuery) -> ApiResult<Response> {
    let pairs = query_pairs(q.as_deref())?;
    if let Some((k, _)) = pairs.iter().find(|(k, _)| !KNOWN_USAGE_PARAMS.contains(&k.as_str())) {
        return Err(ApiError::invalid(k, "unknown query parameter"));
    }
    let tenant = match query_get(&pairs, "tenant") {
        None => None,
        Some(t) if valid_tenant_id(t) => Some(t.to_owned()),
        Some(_) => return Err(ApiError::invalid("tenant", "must be 1..=128 of letters, digits, '-', '_', '.'")),
    };
    let day = |name: &str| -> ApiResult<chrono::NaiveDate> {
        let v = query_get(&pairs, name).ok_or_else(|| ApiError::invalid(name, "required, YYYY-MM-DD"))?;
        parse_day(v).ok_or_else(|| ApiError::invalid(name, "must be a date YYYY-MM-DD from 1970"))
    };
    let (from, to) = (day("from")?, day("to")?);
    if to < from {
        return Err(ApiError::invalid("to", "must not be before from"));
    }
    if day_number(to) - day_number(from) >= MAX_REPORT_DAYS {
        return Err(ApiError::invalid("to", format!("a report covers at most {MAX_REPORT_DAYS} days")));
    }
    let group_by = match query_get(&pairs, "group_by") {
        None => GroupBy { day: true, model: true, key: true, user: false },
        Some(g) => GroupBy::parse(g)
            .ok_or_else(|| ApiError::invalid("group_by", "a comma-separated subset of day, model, key, user"))?,
    };
    let csv = match query_get(&pairs, "format") {
        None | Some("json") => false,
        Some("csv") => true,
        Some(_) => return Err(ApiError::invalid("format", "must be json or csv")),
    };
    let query = UsageQuery {
        domain: domain(&pairs)?,
        tenant,
        key: text_filter(&pairs, "key")?,
        user: text_filter(&pairs, "user")?,
        model: text_filter(&pairs, "model")?,
        from,
        to,
        group_by,
    };
    let (lines, totals) = read::usage(&api.storage, &query).await.map_err(unavailable)?;
    if csv {
        return Ok(
            ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], read::to_csv(&group_by, &lines)).into_response()
        );
    }
    Ok(Json(json!({
        "domain": query.domain,
        "tenant": query.tenant,
        "from": from.format("%Y-%m-%d").to_string(),
        "to": to.format("%Y-%m-%d").to_string(),
        "group_by": group_by.names(),
        "rows": lines,
        "totals": totals,
    }))
    .into_response())
}

async fn quota(State(api): State<LedgerApi>, Path(id): Path<String>, RawQuery(q): RawQuery) -> ApiResult<Response> {
    if !valid_tenant_id(&id) {
        return Err(ApiError::invalid("id", "must be 1..=128 of letters, digits, '-', '_', '.'"));
    }
    let pairs = query_pairs(q.as_deref())?;
    if let Some((k, _)) = pairs.iter().find(|(k, _)| k != "domain") {
        return Err(ApiError::invalid(k, "unknown query parameter"));
    }
    let domain = domain(&pairs)?;
    let now = api.clock.now_ms();
    let limits = read::quota(&api.storage, &domain, &id, now).await.map_err(unavailable)?;
    Ok(Json(json!({"tenant": id, "domain": domain, "at_ms": now, "limits": limits})).into_response())
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        _ => String::new(),
    }
}

async fn deliveries(State(api): State<LedgerApi>, RawQuery(q): RawQuery) -> ApiResult<Response> {
    let pairs = query_pairs(q.as_deref())?;
    if let Some((k, _)) = pairs.iter().find(|(k, _)| k != "limit" && k != "before") {
        return Err(ApiError::invalid(k, "unknown query parameter"));
    }
    let limit = query_limit(&pairs)?;
    let before = query_get(&pairs, "before");
    if let Some(b) = before {
        if !valid_stream_id(b) {
            return Err(ApiError::invalid("before", "must be a delivery entry id (<ms>-<n>)"));
        }
    }
    // Nothing is before 0-0 (and Redis refuses the exclusive bound "(0-0").
    if before.is_some_and(|b| b.split('-').all(|n| n.bytes().all(|c| c == b'0'))) {
        return Ok(Json(json!({"deliveries": [], "next": null})).into_response());
    }
    let mut cmd = redis::cmd("XREVRANGE");
    cmd.arg(DELIVERIES_STREAM).arg(before.map(|b| format!("({b}")).unwrap_or_else(|| "+".into())).arg("-");
    cmd.arg("COUNT").arg(limit);
    let v = api.storage.query(&cmd).await.map_err(unavailable)?;
    let mut entries = Vec::new();
    if let Value::Array(items) = v {
        for item in items {
            let Value::Array(pair) = item else { continue };
            let [id, Value::Array(fields)] = pair.as_slice() else { continue };
            let mut e = serde_json::Map::new();
            e.insert("entry".into(), json!(text(id)));
            for kv in fields.chunks_exact(2) {
                if let [k, v] = kv {
                    let (k, v) = (text(k), text(v));
                    let value = match k.as_str() {
                        "attempt" | "at" | "http_status" => v.parse::<u64>().map(|n| json!(n)).unwrap_or(json!(null)),
                        _ => json!(v),
                    };
                    e.insert(if k == "id" { "event".into() } else { k }, value);
                }
            }
            entries.push(serde_json::Value::Object(e));
        }
    }
    let next = (entries.len() == limit).then(|| entries.last().and_then(|e| e.get("entry").cloned())).flatten();
    Ok(Json(json!({"deliveries": entries, "next": next})).into_response())
}
