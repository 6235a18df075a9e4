//! The tenant registry against a real `redis-server`: CRUD, secrets at rest,
//! KEK rotation, AAD binding, versions and the change feed, the audit trail,
//! and the admin and lookup HTTP APIs' refusals.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a failure should stop loudly

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use base64::Engine as _;
use common::*;
use rls_contract::registry::{LookupStatus, TierSpec};
use serde_json::{json, Value};
use tollgate_ratelimit::clock::ManualClock;
use tollgate_ratelimit::metrics::Metrics;
use tollgate_ratelimit::registry::admin_api::{self, AdminTokens};
use tollgate_ratelimit::registry::crypto::{KekRing, SealError};
use tollgate_ratelimit::registry::lookup_api::{self, LookupLimits};
use tollgate_ratelimit::registry::model::{CreateTenant, ImportKey, IssueKey, PatchKey, PatchTenant};
use tollgate_ratelimit::registry::sha256_hex;
use tollgate_ratelimit::registry::store::{RegistryStore, StoreError};
use tollgate_ratelimit::storage::redis::{RedisStorage, RedisTarget};
use tower::ServiceExt;

const T0: i64 = 1_780_000_000_000;
const TOKEN: &str = "ops-token-0123456789";
const SECRET: &str = "sk-provider-secret-xyz";

fn kek(entries: &[(&str, u8)]) -> KekRing {
    let text: Vec<String> = entries
        .iter()
        .map(|(kid, b)| format!("{kid}:{}", base64::engine::general_purpose::STANDARD.encode([*b; 32])))
        .collect();
    KekRing::parse(&text.join(",")).unwrap()
}

fn store_with(redis: &RedisServer, ring: KekRing, clock: Arc<ManualClock>) -> Arc<RegistryStore> {
    let storage = Arc::new(RedisStorage::new(&RedisTarget::Single(redis.url()), Duration::from_millis(1000)).unwrap());
    Arc::new(RegistryStore::new(storage, Arc::new(ring), clock, 100_000, 100_000))
}

fn store(redis: &RedisServer) -> (Arc<RegistryStore>, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(T0));
    (store_with(redis, kek(&[("k1", 1)]), clock.clone()), clock)
}

fn tenant(id: &str) -> CreateTenant {
    serde_json::from_value(json!({"id": id, "tier": "pro"})).unwrap()
}

fn issue(label: &str) -> IssueKey {
    serde_json::from_value(json!({"label": label})).unwrap()
}

/// Every value in Redis, as text (strings, hashes, sets, streams).
async fn dump_all(redis: &RedisServer) -> String {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut c).await.unwrap();
    let mut out = String::new();
    for k in keys {
        let t: String = redis::cmd("TYPE").arg(&k).query_async(&mut c).await.unwrap();
        let v: redis::Value = match t.as_str() {
            "string" => redis::cmd("GET").arg(&k).query_async(&mut c).await.unwrap(),
            "hash" => redis::cmd("HGETALL").arg(&k).query_async(&mut c).await.unwrap(),
            "zset" => redis::cmd("ZRANGE").arg(&k).arg(0).arg(-1).query_async(&mut c).await.unwrap(),
            "stream" => redis::cmd("XRANGE").arg(&k).arg("-").arg("+").query_async(&mut c).await.unwrap(),
            other => panic!("unexpected type {other} of {k}"),
        };
        out.push_str(&format!("{k} => {v:?}\n"));
        if let redis::Value::Array(items) = &v {
            for i in items {
                out.push_str(&format!("{:?}\n", i));
            }
        }
    }
    // Also the raw bytes, decoded lossily, in case Debug escapes something.
    out
}

#[tokio::test]
async fn tenants_and_keys_round_trip() {
    let redis = RedisServer::start();
    let (s, clock) = store(&redis);
    assert_eq!(s.version().await.unwrap(), 0);
    let t = s.create_tenant("ops", tenant("acme")).await.unwrap();
    assert_eq!((t.tenant.tier.as_str(), t.tenant.enabled, t.tenant.created_at), ("pro", true, (T0 / 1000) as u64));
    assert!(matches!(s.create_tenant("ops", tenant("acme")).await, Err(StoreError::Conflict("tenant"))));
    for id in ["b1", "b2", "b3", "b4"] {
        s.create_tenant("ops", tenant(id)).await.unwrap();
    }
    let (page, next) = s.list_tenants(2, None).await.unwrap();
    let ids: Vec<_> = page.iter().map(|t| t.tenant.id.clone()).collect();
    assert_eq!(ids, ["acme", "b1"]);
    let (page, next) = s.list_tenants(2, next.as_deref()).await.unwrap();
    assert_eq!(page.iter().map(|t| t.tenant.id.as_str()).collect::<Vec<_>>(), ["b2", "b3"]);
    let (page, next) = s.list_tenants(2, next.as_deref()).await.unwrap();
    assert_eq!((page.len(), next), (1, None));

    clock.advance(5_000);
    let patch: PatchTenant =
        serde_json::from_value(json!({"tier": "enterprise", "overrides": {"requests_per_minute": 7}})).unwrap();
    let t = s.patch_tenant("ops", "acme", patch).await.unwrap();
    assert_eq!(t.tenant.overrides, Some(TierSpec { requests_per_minute: Some(7), ..TierSpec::default() }));
    assert_eq!(t.tenant.updated_at, (T0 / 1000 + 5) as u64);
    let clear: PatchTenant = serde_json::from_value(json!({"overrides": null, "enabled": false})).unwrap();
    let t = s.patch_tenant("ops", "acme", clear).await.unwrap();
    assert_eq!((t.tenant.overrides, t.tenant.enabled, t.tenant.tier.as_str()), (None, false, "enterprise"));

    let (plain, key) = s.issue_key("ops", "acme", issue("ci")).await.unwrap();
    assert!(plain.starts_with("tgk_"));
    assert_eq!(key.sha256, sha256_hex(plain.as_bytes()));
    let imported: ImportKey =
        serde_json::from_value(json!({"sha256": sha256_hex(b"legacy"), "label": "old", "models": ["gpt-4o"]})).unwrap();
    s.import_key("ops", "acme", imported.clone()).await.unwrap();
    assert!(matches!(s.import_key("ops", "acme", imported).await, Err(StoreError::Conflict("key"))));
    assert!(matches!(s.issue_key("ops", "nobody", issue("x")).await, Err(StoreError::NotFound("tenant"))));
    let (keys, next) = s.list_keys("acme", 100, None).await.unwrap();
    assert_eq!((keys.len(), next), (2, None));

    let a = s.lookup_key(&key.sha256, false).await.unwrap();
    assert_eq!(a.status, LookupStatus::Found);
    assert!(!a.tenant.as_ref().unwrap().enabled);
    assert_eq!(a.credentials, None);
    let patch: PatchKey = serde_json::from_value(json!({"expires_at": 1_900_000_000u64, "models": ["a"]})).unwrap();
    let k = s.patch_key("ops", &key.sha256, patch).await.unwrap();
    assert_eq!((k.expires_at, k.models.as_deref()), (Some(1_900_000_000), Some(&["a".to_owned()][..])));
    let k = s.revoke_key("ops", &key.sha256).await.unwrap();
    assert!(k.revoked);
    assert!(s.lookup_key(&key.sha256, false).await.unwrap().key.unwrap().revoked);
    s.delete_key("ops", &key.sha256).await.unwrap();
    assert_eq!(s.lookup_key(&key.sha256, false).await.unwrap().status, LookupStatus::UnknownKey);
    assert_eq!(s.list_keys("acme", 100, None).await.unwrap().0.len(), 1);

    // A key whose tenant record vanished answers unknown_tenant.
    let legacy = sha256_hex(b"legacy");
    redis.cli(&["DEL", "{tollgate-registry}:tenant:acme"]).unwrap();
    assert_eq!(s.lookup_key(&legacy, true).await.unwrap().status, LookupStatus::UnknownTenant);
    s.create_tenant("ops", tenant("acme")).await.unwrap();

    // Deleting a tenant deletes its keys and credentials.
    s.set_credential("ops", "acme", "openai", SECRET).await.unwrap();
    s.delete_tenant("ops", "acme").await.unwrap();
    assert_eq!(s.lookup_key(&legacy, false).await.unwrap().status, LookupStatus::UnknownKey);
    assert_eq!(s.lookup_tenant("acme", true).await.unwrap().status, LookupStatus::UnknownTenant);
    assert!(matches!(s.get_tenant("acme").await, Err(StoreError::NotFound("tenant"))));
    assert!(matches!(s.delete_tenant("ops", "acme").await, Err(StoreError::NotFound("tenant"))));
    assert!(!dump_all(&redis).await.contains("creds:acme"));
}

#[tokio::test]
async fn plain_keys_and_secrets_never_reach_redis() {
    let redis = RedisServer::start();
    let (s, _) = store(&redis);
    s.create_tenant("ops", tenant("acme")).await.unwrap();
    let (plain, key) = s.issue_key("ops", "acme", issue("ci")).await.unwrap();
    let info = s.set_credential("ops", "acme", "openai", SECRET).await.unwrap();
    assert_eq!(info.kid, "k1");
    let all = dump_all(&redis).await;
    assert!(all.contains(&key.sha256), "the digest is stored");
    assert!(!all.contains(&plain), "the plain key is not");
    assert!(!all.contains(&plain["tgk_".len()..]));
    assert!(!all.contains(SECRET), "the secret is not");
    assert!(all.contains("v1.k1."), "the sealed form is");
    // Only on request, and in clear then.
    let a = s.lookup_key(&key.sha256, true).await.unwrap();
    assert_eq!(a.credentials.unwrap()["openai"], SECRET);
    assert_eq!(s.lookup_tenant("acme", false).await.unwrap().credentials, None);
    let view = s.get_tenant("acme").await.unwrap();
    assert!(!serde_json::to_string(&view).unwrap().contains(SECRET));
    assert_eq!(view.credentials[0].provider, "openai");
}

#[tokio::test]
async fn credentials_open_after_kek_rotation() {
    let redis = RedisServer::start();
    let clock = Arc::new(ManualClock::new(T0));
    let before = store_with(&redis, kek(&[("k1", 1)]), clock.clone());
    before.create_tenant("ops", tenant("acme")).await.unwrap();
    before.set_credential("ops", "acme", "openai", SECRET).await.unwrap();
    let after = store_with(&redis, kek(&[("k2", 2), ("k1", 1)]), clock.clone());
    assert_eq!(after.lookup_tenant("acme", true).await.unwrap().credentials.unwrap()["openai"], SECRET);
    after.set_credential("ops", "acme", "anthropic", "sk-ant-2").await.unwrap();
    let kids: Vec<_> =
        after.get_tenant("acme").await.unwrap().credentials.into_iter().map(|c| (c.provider, c.kid)).collect();
    assert_eq!(kids, [("anthropic".to_owned(), "k2".to_owned()), ("openai".to_owned(), "k1".to_owned())]);
    // Dropping k1 before re-sealing: the old credential no longer opens (an error, not a crash).
    let dropped = store_with(&redis, kek(&[("k2", 2)]), clock);
    assert!(matches!(
        dropped.lookup_tenant("acme", true).await,
        Err(StoreError::Seal(SealError::UnknownKid(k))) if k == "k1"
    ));
    assert_eq!(dropped.lookup_tenant("acme", false).await.unwrap().status, LookupStatus::Found);
}

#[tokio::test]
async fn ciphertext_moved_to_another_tenant_does_not_open() {
    let redis = RedisServer::start();
    let (s, _) = store(&redis);
    s.create_tenant("ops", tenant("acme")).await.unwrap();
    s.create_tenant("ops", tenant("globex")).await.unwrap();
    s.set_credential("ops", "acme", "openai", SECRET).await.unwrap();
    let stolen = redis.cli(&["HGET", "{tollgate-registry}:creds:acme", "openai"]).unwrap();
    redis.cli(&["HSET", "{tollgate-registry}:creds:globex", "openai", stolen.trim()]).unwrap();
    assert!(matches!(s.lookup_tenant("globex", true).await, Err(StoreError::Seal(SealError::Open))));
    // Over HTTP: an error answer, and the service keeps serving.
    let metrics = Arc::new(Metrics::new());
    let app = lookup_api::router(s.clone(), metrics.clone(), LookupLimits::default());
    let (status, body) = call(&app, get("/v1/registry/tenants/globex?credentials=true")).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!body.to_string().contains(SECRET));
    let (status, body) = call(&app, get("/v1/registry/tenants/acme?credentials=true")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["credentials"]["openai"], SECRET);
    assert!(metrics.encode().contains(r#"tollgate_rls_registry_lookups_total{kind="tenant",status="error"} 1"#));
}

#[tokio::test]
async fn versions_and_the_change_feed() {
    let redis = RedisServer::start();
    let (s, clock) = store(&redis);
    s.create_tenant("ops", tenant("acme")).await.unwrap();
    let v1 = s.version().await.unwrap();
    assert!(v1 > T0 as u64, "a fresh registry starts its versions at the clock: {v1}");
    let c = s.changes(v1).await.unwrap();
    assert_eq!((c.version, c.reset, c.tenants.len(), c.keys.len()), (v1, false, 0, 0));
    let (_, k) = s.issue_key("ops", "acme", issue("a")).await.unwrap();
    s.revoke_key("ops", &k.sha256).await.unwrap();
    let patch: PatchTenant = serde_json::from_value(json!({"tier": "x"})).unwrap();
    s.patch_tenant("ops", "acme", patch).await.unwrap();
    s.set_credential("ops", "acme", "openai", SECRET).await.unwrap();
    let c = s.changes(v1).await.unwrap();
    assert_eq!(c.version, v1 + 4);
    assert!(!c.reset);
    assert_eq!(c.tenants, ["acme"], "deduplicated");
    assert_eq!(c.keys, vec![k.sha256.clone()]);
    let c = s.changes(v1 + 3).await.unwrap();
    assert_eq!((c.tenants.len(), c.keys.len()), (1, 0), "only the credential change");
    // The lookup's version is read before its records.
    assert_eq!(s.lookup_tenant("acme", false).await.unwrap().version, v1 + 4);
    // Ahead of the registry (it was flushed): reset.
    assert!(s.changes(v1 + 100).await.unwrap().reset);
    // Older than the oldest entry retained: reset.
    redis.cli(&["XTRIM", "{tollgate-registry}:changes", "MAXLEN", "1"]).unwrap();
    assert!(s.changes(v1).await.unwrap().reset);
    assert!(!s.changes(v1 + 3).await.unwrap().reset);
    // Redis flushed, then written again: the versions restart above the old ones.
    redis.cli(&["FLUSHALL"]).unwrap();
    assert!(s.changes(v1 + 4).await.unwrap().reset);
    clock.advance(1_000);
    s.create_tenant("ops", tenant("acme")).await.unwrap();
    let c = s.changes(v1 + 4).await.unwrap();
    assert!(c.reset, "entries after the flush start above since+1");
    assert!(c.version > v1 + 4);
}

#[tokio::test]
async fn too_many_changes_answer_a_reset() {
    let redis = RedisServer::start();
    let (s, _) = store(&redis);
    s.create_tenant("ops", tenant("t0")).await.unwrap();
    let v = s.version().await.unwrap();
    for i in 1..=rls_contract::registry::MAX_CHANGES_PER_ANSWER {
        s.create_tenant("ops", tenant(&format!("t{i}"))).await.unwrap();
    }
    let c = s.changes(v - 1).await.unwrap();
    assert!(c.reset, "1001 distinct tenants");
    let c = s.changes(v).await.unwrap();
    assert_eq!((c.reset, c.tenants.len()), (false, 1000));
}

#[tokio::test]
async fn the_audit_trail_names_the_actor_and_no_secret() {
    let redis = RedisServer::start();
    let (s, _) = store(&redis);
    s.create_tenant("alice", tenant("acme")).await.unwrap();
    let (plain, _) = s.issue_key("bob", "acme", issue("ci")).await.unwrap();
    s.set_credential("alice", "acme", "openai", SECRET).await.unwrap();
    let (entries, next) = s.audit(2, None).await.unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!((entries[0].action.as_str(), entries[0].actor.as_str()), ("credential.set", "alice"));
    assert_eq!(entries[0].changes, json!({"provider": "openai", "kid": "k1"}));
    assert_eq!((entries[1].action.as_str(), entries[1].actor.as_str()), ("key.issue", "bob"));
    assert!(entries[1].target.starts_with("key:"));
    let (older, next) = s.audit(10, next.as_deref()).await.unwrap();
    assert_eq!((older.len(), older[0].action.as_str(), next), (1, "tenant.create", None));
    assert!(older[0].at >= T0 as u64);
    let all = serde_json::to_string(&s.audit(100, None).await.unwrap().0).unwrap();
    assert!(!all.contains(SECRET) && !all.contains(&plain));
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

fn authed(method: &str, path: &str, body: Option<&str>) -> Request<Body> {
    let b = Request::builder().method(method).uri(path).header("authorization", format!("Bearer {TOKEN}"));
    match body {
        Some(json) => b.header("content-type", "application/json").body(Body::from(json.to_owned())).unwrap(),
        None => b.body(Body::empty()).unwrap(),
    }
}

async fn call(app: &Router, req: Request<Body>) -> (StatusCode, Value) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    let v = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
    (status, v)
}

fn admin(s: Arc<RegistryStore>) -> Router {
    admin_api::router(s, Arc::new(AdminTokens::parse(&format!("ops:{TOKEN}")).unwrap()))
}

#[tokio::test]
async fn admin_api_refuses_bad_requests_with_json() {
    let redis = RedisServer::start();
    let (s, _) = store(&redis);
    let app = admin(s);
    // Auth.
    let (st, body) = call(&app, get("/v1/tenants")).await;
    assert_eq!((st, body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("unauthorized")));
    let wrong = Request::get("/v1/tenants").header("authorization", "Bearer ops-token-012345678X").body(Body::empty());
    assert_eq!(call(&app, wrong.unwrap()).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&app, get("/v1/openapi.json")).await.0, StatusCode::OK, "the document needs no token");
    // Create, conflict, unknown field, bad id, bad type.
    let (st, body) = call(&app, authed("POST", "/v1/tenants", Some(r#"{"id":"acme","tier":"pro"}"#))).await;
    assert_eq!((st, body["id"].as_str(), body["credentials"].clone()), (StatusCode::CREATED, Some("acme"), json!([])));
    let (st, _) = call(&app, authed("POST", "/v1/tenants", Some(r#"{"id":"acme","tier":"pro"}"#))).await;
    assert_eq!(st, StatusCode::CONFLICT);
    let (st, body) = call(&app, authed("POST", "/v1/tenants", Some(r#"{"id":"x","tier":"pro","tire":1}"#))).await;
    assert_eq!((st, body["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("tire")));
    assert_eq!(body["error"]["code"], "invalid_request");
    let (st, body) = call(&app, authed("POST", "/v1/tenants", Some(r#"{"id":"a/b","tier":"pro"}"#))).await;
    assert_eq!((st, body["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("id")));
    let (st, body) = call(&app, authed("POST", "/v1/tenants", Some(r#"{"id":"x","tier":7}"#))).await;
    assert_eq!((st, body["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("tier")));
    let (st, body) = call(&app, authed("PATCH", "/v1/tenants/acme", Some(r#"{"overrides":{"rpm":1}}"#))).await;
    assert_eq!((st, body["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("overrides.rpm")));
    let (st, body) = call(&app, authed("GET", "/v1/tenants/a%20b", None)).await;
    assert_eq!((st, body["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("id")));
    let (st, body) = call(&app, authed("GET", "/v1/tenants?limit=0", None)).await;
    assert_eq!((st, body["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("limit")));
    let (st, body) = call(&app, authed("GET", "/v1/keys/ABC", None)).await;
    assert_eq!((st, body["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("sha256")));
    // Size and content type.
    let big = format!(r#"{{"id":"big","tier":"{}"}}"#, "x".repeat(70_000));
    let (st, body) = call(&app, authed("POST", "/v1/tenants", Some(&big))).await;
    assert_eq!((st, body["error"]["code"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("body_too_large")));
    let text = Request::post("/v1/tenants")
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "text/plain")
        .body(Body::from(r#"{"id":"t","tier":"pro"}"#))
        .unwrap();
    assert_eq!(call(&app, text).await.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // Not found.
    assert_eq!(call(&app, authed("GET", "/v1/tenants/nobody", None)).await.0, StatusCode::NOT_FOUND);
    assert_eq!(call(&app, authed("GET", &format!("/v1/keys/{}", "a".repeat(64)), None)).await.0, StatusCode::NOT_FOUND);
    assert_eq!(call(&app, authed("GET", "/v1/nothing", None)).await.0, StatusCode::NOT_FOUND);
    // Keys and credentials over HTTP.
    let (st, key) =
        call(&app, authed("POST", "/v1/tenants/acme/keys", Some(r#"{"label":"ci","models":["gpt-4o"]}"#))).await;
    assert_eq!(st, StatusCode::CREATED);
    assert_eq!(key["sha256"].as_str().unwrap(), sha256_hex(key["key"].as_str().unwrap().as_bytes()));
    let (st, got) = call(&app, authed("GET", &format!("/v1/keys/{}", key["sha256"].as_str().unwrap()), None)).await;
    assert_eq!((st, got.get("key")), (StatusCode::OK, None), "the plain key is shown once");
    let (st, body) =
        call(&app, authed("PUT", "/v1/tenants/acme/credentials/openai", Some(&format!(r#"{{"secret":"{SECRET}"}}"#))))
            .await;
    assert_eq!((st, body["kid"].as_str()), (StatusCode::OK, Some("k1")));
    let (st, body) =
        call(&app, authed("PUT", "/v1/tenants/acme/credentials/Open%20AI", Some(r#"{"secret":"x"}"#))).await;
    assert_eq!((st, body["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("provider")));
    let (st, body) =
        call(&app, authed("PUT", "/v1/tenants/acme/credentials/openai", Some(r#"{"secret":"a b"}"#))).await;
    assert_eq!((st, body["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("secret")));
    let (st, body) = call(&app, authed("GET", "/v1/tenants/acme", None)).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body["credentials"], json!([{"provider": "openai", "kid": "k1", "updated_at": T0 / 1000}]));
    assert!(!body.to_string().contains(SECRET));
    assert_eq!(
        call(&app, authed("DELETE", "/v1/tenants/acme/credentials/openai", None)).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        call(&app, authed("DELETE", "/v1/tenants/acme/credentials/openai", None)).await.0,
        StatusCode::NOT_FOUND
    );
    let (st, body) = call(&app, authed("GET", "/v1/audit?limit=1", None)).await;
    assert_eq!((st, body["entries"][0]["actor"].as_str()), (StatusCode::OK, Some("ops")));
    assert_eq!(body["entries"][0]["action"], "credential.delete");
    assert!(body["next"].is_string());
    assert_eq!(call(&app, authed("DELETE", "/v1/tenants/acme", None)).await.0, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn without_a_kek_credentials_are_refused_and_the_rest_works() {
    let redis = RedisServer::start();
    let clock = Arc::new(ManualClock::new(T0));
    let app = admin(store_with(&redis, KekRing::default(), clock));
    assert_eq!(
        call(&app, authed("POST", "/v1/tenants", Some(r#"{"id":"acme","tier":"pro"}"#))).await.0,
        StatusCode::CREATED
    );
    let (st, body) =
        call(&app, authed("PUT", "/v1/tenants/acme/credentials/openai", Some(r#"{"secret":"sk-x"}"#))).await;
    assert_eq!((st, body["error"]["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("no_kek")));
}

#[tokio::test]
async fn lookup_api_answers_and_fails_closed() {
    let mut redis = RedisServer::start();
    let (s, _) = store(&redis);
    s.create_tenant("ops", tenant("acme")).await.unwrap();
    let metrics = Arc::new(Metrics::new());
    let app = lookup_api::router(s.clone(), metrics.clone(), LookupLimits::default());
    let (st, body) = call(&app, get(&format!("/v1/registry/keys/{}", "0".repeat(64)))).await;
    assert_eq!((st, body["status"].as_str()), (StatusCode::OK, Some("unknown_key")));
    let (st, body) = call(&app, get("/v1/registry/keys/xyz")).await;
    assert_eq!((st, body["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("sha256")));
    let (st, _) = call(&app, get("/v1/registry/tenants/acme?credentials=maybe")).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, body) = call(&app, get("/v1/registry/changes")).await;
    assert_eq!((st, body["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("since")));
    let (st, body) = call(&app, get("/v1/registry/tenants/acme")).await;
    let parsed: rls_contract::registry::LookupAnswer = serde_json::from_value(body).unwrap();
    assert_eq!((st, parsed.status), (StatusCode::OK, LookupStatus::Found));
    let (st, body) = call(&app, get("/v1/registry/changes?since=0")).await;
    let parsed: rls_contract::registry::Changes = serde_json::from_value(body).unwrap();
    assert_eq!((st, parsed.reset), (StatusCode::OK, true));
    redis.kill();
    let (st, body) = call(&app, get("/v1/registry/tenants/acme")).await;
    assert_eq!((st, body["error"]["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("unavailable")));
    let m = metrics.encode();
    assert!(m.contains(r#"tollgate_rls_registry_lookups_total{kind="tenant",status="unavailable"} 1"#), "{m}");
    assert!(m.contains(r#"tollgate_rls_registry_lookups_total{kind="key",status="invalid"} 1"#), "{m}");
}

#[tokio::test]
async fn the_registry_works_on_redis_cluster() {
    let cluster = RedisCluster::start();
    let storage =
        Arc::new(RedisStorage::new(&RedisTarget::Cluster(cluster.urls()), Duration::from_millis(2000)).unwrap());
    let clock = Arc::new(ManualClock::new(T0));
    let s = Arc::new(RegistryStore::new(storage, Arc::new(kek(&[("k1", 1)])), clock, 100_000, 100_000));
    s.create_tenant("ops", tenant("acme")).await.unwrap();
    let v = s.version().await.unwrap();
    let (_, key) = s.issue_key("ops", "acme", issue("ci")).await.unwrap();
    s.set_credential("ops", "acme", "openai", SECRET).await.unwrap();
    let a = s.lookup_key(&key.sha256, true).await.unwrap();
    assert_eq!((a.status, a.version), (LookupStatus::Found, v + 2));
    assert_eq!(a.credentials.unwrap()["openai"], SECRET);
    let c = s.changes(v).await.unwrap();
    assert_eq!((c.reset, c.tenants.len(), c.keys.len()), (false, 1, 1));
    assert_eq!(s.list_tenants(10, None).await.unwrap().0.len(), 1);
    assert_eq!(s.list_keys("acme", 10, None).await.unwrap().0.len(), 1);
    s.delete_tenant("ops", "acme").await.unwrap();
    assert_eq!(s.lookup_key(&key.sha256, false).await.unwrap().status, LookupStatus::UnknownKey);
    assert_eq!(s.audit(10, None).await.unwrap().0.len(), 4);
}

#[tokio::test]
async fn listeners_drop_slow_and_excess_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tollgate_ratelimit::registry::serve::{serve, ServeLimits};
    let redis = RedisServer::start();
    let (s, _) = store(&redis);
    let app = lookup_api::router(s, Arc::new(Metrics::new()), LookupLimits::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let limits = ServeLimits {
        max_connections: 1,
        header_read_timeout: Duration::from_millis(300),
        grace: Duration::from_secs(1),
    };
    let server = tokio::spawn(serve(listener, app, limits, async move {
        let _ = stop_rx.await;
    }));
    // A client that never finishes its headers holds the only slot...
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /v1/registry/changes?since=0 HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // ...so another connection is closed at once...
    let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut buf)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    // ...and the slow one is dropped after the header deadline.
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3), slow.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the slow client was not cut off");
    // The slot is free again: a normal request is answered.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut ok = tokio::net::TcpStream::connect(addr).await.unwrap();
    ok.write_all(b"GET /v1/registry/changes?since=0 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(3), ok.read_to_string(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(3), server).await.unwrap().unwrap();
}
