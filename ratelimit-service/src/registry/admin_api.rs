//! Who may change the registry, and how? The admin HTTP API: bearer tokens
//! (`name:token`, compared in constant time through their SHA-256), JSON in
//! and out, every change attributed to the token's name in the audit trail.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::http::{not_found, query_get, query_limit, query_pairs, ApiError, JsonBody};
use super::model::{
    check_digest, check_provider, check_secret, check_tenant_id, CreateTenant, ImportKey, IssueKey, PatchKey,
    PatchTenant, SetCredential,
};
use super::store::{valid_stream_id, RegistryStore};

/// Shortest accepted admin token.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokensError {
    #[error("no admin tokens: the admin API needs at least one name:token entry")]
    Empty,
    #[error("admin token entry {0}: expected name:token")]
    Shape(usize),
    #[error("admin token entry {0}: the name must be 1..=64 of letters, digits, '-', '_', '.', '@'")]
    Name(usize),
    #[error("admin token entry {0}: the token must be at least 16 visible ASCII characters")]
    Token(usize),
    #[error("admin token entry {0}: name {1} appears twice")]
    Duplicate(usize, String),
}

/// The admin tokens, kept as SHA-256 digests only.
#[derive(Clone)]
pub struct AdminTokens {
    entries: Vec<(String, [u8; 32])>,
}

impl std::fmt::Debug for AdminTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminTokens").field("names", &self.entries.iter().map(|e| &e.0).collect::<Vec<_>>()).finish()
    }
}

impl AdminTokens {
    /// Parse `name:token` entries separated by commas or newlines.
    pub fn parse(text: &str) -> Result<Self, TokensError> {
        let mut entries: Vec<(String, [u8; 32])> = Vec::new();
        for (i, entry) in text.split([',', '\n']).map(str::trim).filter(|e| !e.is_empty()).enumerate() {
            let n = i + 1;
            let (name, token) = entry.split_once(':').ok_or(TokensError::Shape(n))?;
            let name_ok = !name.is_empty()
                && name.len() <= 64
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'));
            if !name_ok {
                return Err(TokensError::Name(n));
            }
            if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
                return Err(TokensError::Token(n));
            }
            if entries.iter().any(|(existing, _)| existing == name) {
                return Err(TokensError::Duplicate(n, name.to_owned()));
            }
            entries.push((name.to_owned(), Sha256::digest(token.as_bytes()).into()));
        }
        if entries.is_empty() {
            return Err(TokensError::Empty);
        }
        Ok(Self { entries })
    }

    /// The name of the token `candidate` matches; every entry is compared, in constant time.
    pub fn authenticate(&self, candidate: &str) -> Option<String> {
        let digest: [u8; 32] = Sha256::digest(candidate.as_bytes()).into();
        let mut found = None;
        for (name, stored) in &self.entries {
            if bool::from(stored.ct_eq(&digest)) {
                found = Some(name.clone());
            }
        }
        found
    }
}

/// The authenticated caller: the token's name.
#[derive(Debug, Clone)]
pub struct Actor(pub String);

#[derive(Clone)]
struct AdminState {
    store: Arc<RegistryStore>,
}

async fn authenticate(State(tokens): State<Arc<AdminTokens>>, mut req: Request, next: Next) -> Response {
    let candidate = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    match candidate.and_then(|c| tokens.authenticate(c)) {
        Some(name) => {
            req.extensions_mut().insert(Actor(name));
            next.run(req).await
        }
        None => {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "a valid bearer token is required").into_response()
        }
    }
}

/// Every admin route, as `(method, path)`: the OpenAPI document must describe each.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/v1/openapi.json"),
    ("post", "/v1/tenants"),
    ("get", "/v1/tenants"),
    ("get", "/v1/tenants/{id}"),
    ("patch", "/v1/tenants/{id}"),
    ("delete", "/v1/tenants/{id}"),
    ("post", "/v1/tenants/{id}/keys"),
    ("get", "/v1/tenants/{id}/keys"),
    ("post", "/v1/tenants/{id}/keys/import"),
    ("put", "/v1/tenants/{id}/credentials/{provider}"),
    ("delete", "/v1/tenants/{id}/credentials/{provider}"),
    ("get", "/v1/keys/{sha256}"),
    ("patch", "/v1/keys/{sha256}"),
    ("delete", "/v1/keys/{sha256}"),
    ("post", "/v1/keys/{sha256}/revoke"),
    ("get", "/v1/audit"),
    ("get", "/v1/usage"),
    ("get", "/v1/tenants/{id}/quota"),
    ("get", "/v1/alerts/deliveries"),
];

/// The admin router.
pub fn router(store: Arc<RegistryStore>, tokens: Arc<AdminTokens>) -> Router {
    router_with(store, tokens, Router::new())
}

/// The admin router plus `extra` routes (the ledger's), behind the same tokens.
pub fn router_with(store: Arc<RegistryStore>, tokens: Arc<AdminTokens>, extra: Router) -> Router {
    let state = AdminState { store };
    // (route_layer on a router without routes panics)
    let extra = if extra.has_routes() {
        extra.route_layer(middleware::from_fn_with_state(tokens.clone(), authenticate))
    } else {
        extra
    };
    let protected = Router::new()
        .route("/v1/tenants", post(create_tenant).get(list_tenants))
        .route("/v1/tenants/{id}", get(get_tenant).patch(patch_tenant).delete(delete_tenant))
        .route("/v1/tenants/{id}/keys", post(issue_key).get(list_keys))
        .route("/v1/tenants/{id}/keys/import", post(import_key))
        .route("/v1/tenants/{id}/credentials/{provider}", put(set_credential).delete(delete_credential))
        .route("/v1/keys/{sha256}", get(get_key).patch(patch_key).delete(delete_key))
        .route("/v1/keys/{sha256}/revoke", post(revoke_key))
        .route("/v1/audit", get(audit))
        .route_layer(middleware::from_fn_with_state(tokens, authenticate))
        .with_state(state);
    Router::new()
        .route("/v1/openapi.json", get(super::openapi::serve))
        .merge(protected)
        .merge(extra)
        .fallback(not_found)
}

type ApiResult<T> = std::result::Result<T, ApiError>;

fn tenant_id(id: &str) -> ApiResult<()> {
    Ok(check_tenant_id("id", id)?)
}

async fn create_tenant(
    State(s): State<AdminState>,
    Extension(Actor(actor)): Extension<Actor>,
    JsonBody(req): JsonBody<CreateTenant>,
) -> ApiResult<Response> {
    req.check()?;
    let t = s.store.create_tenant(&actor, req).await?;
    Ok((StatusCode::CREATED, Json(t)).into_response())
}

async fn list_tenants(State(s): State<AdminState>, RawQuery(q): RawQuery) -> ApiResult<Response> {
    let pairs = query_pairs(q.as_deref())?;
    let limit = query_limit(&pairs)?;
    let cursor = query_get(&pairs, "cursor");
    if let Some(c) = cursor {
        check_tenant_id("cursor", c)?;
    }
    let (tenants, next) = s.store.list_tenants(limit, cursor).await?;
    Ok(Json(json!({"tenants": tenants, "next_cursor": next})).into_response())
}

async fn get_tenant(State(s): State<AdminState>, Path(id): Path<String>) -> ApiResult<Response> {
    tenant_id(&id)?;
    Ok(Json(s.store.get_tenant(&id).await?).into_response())
}

async fn patch_tenant(
    State(s): State<AdminState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<PatchTenant>,
) -> ApiResult<Response> {
    tenant_id(&id)?;
    req.check()?;
    Ok(Json(s.store.patch_tenant(&actor, &id, req).await?).into_response())
}

async fn delete_tenant(
    State(s): State<AdminState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    tenant_id(&id)?;
    s.store.delete_tenant(&actor, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn issue_key(
    State(s): State<AdminState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<IssueKey>,
) -> ApiResult<Response> {
    tenant_id(&id)?;
    req.check()?;
    let (plain, key) = s.store.issue_key(&actor, &id, req).await?;
    let mut body = serde_json::to_value(&key)
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "encoding failed"))?;
    if let Some(obj) = body.as_object_mut() {
        obj.insert("key".into(), json!(plain));
    }
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn import_key(
    State(s): State<AdminState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<ImportKey>,
) -> ApiResult<Response> {
    tenant_id(&id)?;
    req.check()?;
    Ok((StatusCode::CREATED, Json(s.store.import_key(&actor, &id, req).await?)).into_response())
}

async fn list_keys(State(s): State<AdminState>, Path(id): Path<String>, RawQuery(q): RawQuery) -> ApiResult<Response> {
    tenant_id(&id)?;
    let pairs = query_pairs(q.as_deref())?;
    let limit = query_limit(&pairs)?;
    let cursor = query_get(&pairs, "cursor");
    if let Some(c) = cursor {
        check_digest("cursor", c)?;
    }
    let (keys, next) = s.store.list_keys(&id, limit, cursor).await?;
    Ok(Json(json!({"keys": keys, "next_cursor": next})).into_response())
}

async fn get_key(State(s): State<AdminState>, Path(d): Path<String>) -> ApiResult<Response> {
    check_digest("sha256", &d)?;
    Ok(Json(s.store.get_key(&d).await?).into_response())
}

async fn patch_key(
    State(s): State<AdminState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(d): Path<String>,
    JsonBody(req): JsonBody<PatchKey>,
) -> ApiResult<Response> {
    check_digest("sha256", &d)?;
    req.check()?;
    Ok(Json(s.store.patch_key(&actor, &d, req).await?).into_response())
}

async fn revoke_key(
    State(s): State<AdminState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(d): Path<String>,
) -> ApiResult<Response> {
    check_digest("sha256", &d)?;
    Ok(Json(s.store.revoke_key(&actor, &d).await?).into_response())
}

async fn delete_key(
    State(s): State<AdminState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(d): Path<String>,
) -> ApiResult<Response> {
    check_digest("sha256", &d)?;
    s.store.delete_key(&actor, &d).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn set_credential(
    State(s): State<AdminState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path((id, provider)): Path<(String, String)>,
    JsonBody(req): JsonBody<SetCredential>,
) -> ApiResult<Response> {
    tenant_id(&id)?;
    check_provider("provider", &provider)?;
    check_secret(&req.secret)?;
    if s.store.kek().is_empty() {
        return Err(super::store::StoreError::Seal(super::crypto::SealError::NoKek).into());
    }
    Ok(Json(s.store.set_credential(&actor, &id, &provider, &req.secret).await?).into_response())
}

async fn delete_credential(
    State(s): State<AdminState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path((id, provider)): Path<(String, String)>,
) -> ApiResult<Response> {
    tenant_id(&id)?;
    check_provider("provider", &provider)?;
    s.store.delete_credential(&actor, &id, &provider).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn audit(State(s): State<AdminState>, RawQuery(q): RawQuery) -> ApiResult<Response> {
    let pairs = query_pairs(q.as_deref())?;
    let limit = query_limit(&pairs)?;
    let before = query_get(&pairs, "before");
    if let Some(b) = before {
        if !valid_stream_id(b) {
            return Err(ApiError::invalid("before", "must be an audit entry id (<ms>-<n>)"));
        }
    }
    let (entries, next) = s.store.audit(limit, before).await?;
    Ok(Json(json!({"entries": entries, "next": next})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_and_authenticate() {
        let t = AdminTokens::parse("alice:0123456789abcdef,\nbob:fedcba9876543210xx").unwrap();
        assert_eq!(t.authenticate("0123456789abcdef").as_deref(), Some("alice"));
        assert_eq!(t.authenticate("fedcba9876543210xx").as_deref(), Some("bob"));
        assert_eq!(t.authenticate("0123456789abcdeX"), None);
        assert_eq!(t.authenticate(""), None);
        assert!(!format!("{t:?}").contains("0123456789abcdef"));
        assert_eq!(AdminTokens::parse("").unwrap_err(), TokensError::Empty);
        assert_eq!(AdminTokens::parse("alice:short").unwrap_err(), TokensError::Token(1));
        assert_eq!(AdminTokens::parse("nocolon").unwrap_err(), TokensError::Shape(1));
        assert!(!AdminTokens::parse("alice:short").unwrap_err().to_string().contains("short"));
    }
}
