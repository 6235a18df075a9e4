//! Are tenants the registry knows served, and refused, as the static ones?
//!
//! Whole requests for keys and tenants only the tenant registry knows,
//! through the contexts Envoy calls: the lookup, the held body, the
//! credential swap, the caches, revocation through the change feed, the
//! bound on lookups in flight and what happens when the registry is down.

use prost::Message as _;

use super::*;
use crate::host::contexts::{Http, Root};
use crate::host::Action;
use crate::rls;

const STATIC_KEY: &str = "sk-static-acme";
const REG_KEY: &str = "tgk_registry-key-0001";

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

fn config(extra: &str) -> String {
    format!(
        r#"{{"providers": {{"openai": {{"credential_header": "authorization"}}}},
        "routes": [{{"path": "/v1/chat/completions", "api": "openai_chat", "provider": "openai"}}],
        "tiers": {{"pro": {{"models": ["*"], "requests_per_minute": 100}}, "free": {{"models": ["gpt-4o-mini"]}}}},
        "tenants": [{{"id": "acme", "tier": "pro", "api_key_sha256": ["{}"],
            "provider_key_env": {{"openai": "ACME_OPENAI_KEY"}}}}],
        "rate_limit": {{"cluster": "tollgate_rls", "timeout_ms": 500}},
        "registry": {{"cluster": "tollgate_registry", "poll_ms": 1000, "grace_s": 60 {extra}}}}}"#,
        sha256_hex(STATIC_KEY),
    )
}

fn configured(extra: &str) -> (Root, FakeHost) {
    let mut host = FakeHost::with_config(&config(extra));
    host.env.insert("ACME_OPENAI_KEY".into(), "sk-provider-acme".into());
    let mut root = Root::default();
    assert!(root.on_configure(&mut host));
    (root, host)
}

fn request_headers(key: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    headers(&[
        (":authority", "gateway"),
        (":path", "/v1/chat/completions"),
        (":method", "POST"),
        ("authorization", &format!("Bearer {key}")),
        ("content-type", "application/json"),
    ])
}

const BODY: &[u8] = br#"{"model": "gpt-4o-mini", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}"#;

fn found(version: u64, key: &str, tier: &str, enabled: bool, revoked: bool, secret: Option<&str>) -> Vec<u8> {
    let creds = secret.map_or(String::new(), |s| format!(r#", "credentials": {{"openai": "{s}"}}"#));
    format!(
        r#"{{"version": {version}, "status": "found",
            "tenant": {{"id": "initech", "tier": "{tier}", "enabled": {enabled}}},
            "key": {{"sha256": "{}", "tenant": "initech", "revoked": {revoked}}}{creds}}}"#,
        sha256_hex(key)
    )
    .into_bytes()
}

fn ok_answer(n: usize) -> Vec<u8> {
    let st =
        rls::DescriptorStatus { code: 1, current_limit: None, limit_remaining: 1_000_000, duration_until_reset: None };
    rls::RateLimitResponse { overall_code: 1, statuses: vec![st; n] }.encode_to_vec()
}

/// Headers and a complete body; answers the context and how the headers
/// callback ended.
fn start(root: &Root, host: &mut FakeHost, key: &str) -> (Http, Action) {
    let mut http = root.new_http().expect("configured");
    host.request_headers = request_headers(key);
    let a = http.on_request_headers(host, false);
    host.request_body = BODY.to_vec();
    (http, a)
}

/// Answers the reserve call, if one was sent.
fn answer_reserve(http: &mut Http, host: &mut FakeHost, calls_before: usize) {
    if host.rls_calls.len() > calls_before {
        let call = host.rls_calls.last().expect("a reserve").clone();
        let req = rls::RateLimitRequest::decode(call.message.as_slice()).expect("RLS");
        host.grpc_answer = Some(ok_answer(req.descriptors.len()));
        http.on_grpc_call_response(host, call.token, 0, 0);
    }
}

fn last_reply_code(host: &FakeHost) -> (u16, String) {
    let r = host.replies.last().expect("a reply");
    (r.status, r.header("x-tollgate-error").unwrap_or("").to_string())
}

#[test]
fn a_key_only_the_registry_knows_is_looked_up_once_and_gets_its_tenants_credential() {
    let (root, mut host) = configured("");
    let (mut http, a) = start(&root, &mut host, REG_KEY);
    assert_eq!(a, Action::Pause);
    let (cluster, path) = host.get_calls.last().expect("a lookup").clone();
    assert_eq!(cluster, "tollgate_registry");
    assert_eq!(path, format!("/v1/registry/keys/{}?credentials=true", sha256_hex(REG_KEY)));
    // The body completes while the lookup is in flight: held, not sent.
    assert_eq!(http.on_request_body(&mut host, BODY.len(), true), Action::Pause);
    assert_eq!(host.resumed, 0);

    host.http_answer = Some((200, found(5, REG_KEY, "pro", true, false, Some("sk-provider-initech"))));
    let rls_before = host.rls_calls.len();
    {
        let t = host.next_token;
        http.on_http_call_response(&mut host, t, 0);
    }
    assert!(host.replies.is_empty(), "{:?}", host.replies);
    assert_eq!(host.request_header("authorization").as_deref(), Some("Bearer sk-provider-initech"));
    assert_eq!(host.request_header("x-tollgate-tenant").as_deref(), Some("initech"));
    // The tier's limits apply: a reserve under the registry tenant's id.
    assert_eq!(host.rls_calls.len(), rls_before + 1);
    let req = rls::RateLimitRequest::decode(host.rls_calls[rls_before].message.as_slice()).unwrap();
    assert!(req.descriptors.iter().all(|d| d.entries.iter().any(|e| e.key == "tenant" && e.value == "initech")));
    answer_reserve(&mut http, &mut host, rls_before);
    assert_eq!(host.resumed, 1);

    // The next request of the key is served from this worker's cache.
    let lookups = host.get_calls.len();
    let (mut http2, _) = start(&root, &mut host, REG_KEY);
    let before = host.rls_calls.len();
    http2.on_request_body(&mut host, BODY.len(), true);
    answer_reserve(&mut http2, &mut host, before);
    assert_eq!(host.get_calls.len(), lookups, "no second lookup");
    assert_eq!(host.request_header("authorization").as_deref(), Some("Bearer sk-provider-initech"));
    assert_eq!(host.resumed, 2);
}

#[test]
fn the_static_configuration_wins_and_asks_nothing() {
    let (root, mut host) = configured("");
    let (mut http, _) = start(&root, &mut host, STATIC_KEY);
    let before = host.rls_calls.len();
    http.on_request_body(&mut host, BODY.len(), true);
    answer_reserve(&mut http, &mut host, before);
    assert!(host.get_calls.is_empty());
    assert_eq!(host.request_header("authorization").as_deref(), Some("Bearer sk-provider-acme"));
}

#[test]
fn unknown_revoked_disabled_and_misconfigured_are_refused_in_the_apis_envelope() {
    let (root, mut host) = configured("");
    // Unknown: 401, remembered (no second lookup).
    let (mut http, _) = start(&root, &mut host, "tgk_nope");
    host.http_answer = Some((200, br#"{"version": 1, "status": "unknown_key"}"#.to_vec()));
    {
        let t = host.next_token;
        http.on_http_call_response(&mut host, t, 0);
    }
    assert_eq!(last_reply_code(&host), (401, "invalid_api_key".into()));
    let body: serde_json::Value = serde_json::from_slice(&host.replies.last().unwrap().body).unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let lookups = host.get_calls.len();
    let _ = start(&root, &mut host, "tgk_nope");
    assert_eq!(host.get_calls.len(), lookups);
    assert_eq!(last_reply_code(&host).0, 401);

    for (answer, want) in [
        (found(2, "k-revoked", "pro", true, true, Some("s")), (401, "invalid_api_key")),
        (found(2, "k-disabled", "pro", false, false, Some("s")), (403, "tenant_disabled")),
        (found(2, "k-badtier", "gold", true, false, Some("s")), (403, "tenant_misconfigured")),
        (found(2, "k-nocred", "pro", true, false, None), (403, "provider_not_configured")),
    ] {
        let key = serde_json::from_slice::<serde_json::Value>(&answer).unwrap()["key"]["sha256"].clone();
        let plain = ["k-revoked", "k-disabled", "k-badtier", "k-nocred"]
            .into_iter()
            .find(|k| sha256_hex(k) == key.as_str().unwrap())
            .unwrap();
        let (mut http, _) = start(&root, &mut host, plain);
        host.http_answer = Some((200, answer));
        {
            let t = host.next_token;
            http.on_http_call_response(&mut host, t, 0);
        }
        assert_eq!(last_reply_code(&host), (want.0, want.1.to_string()), "{plain}");
    }
}

#[test]
fn a_registry_that_cannot_answer_gets_503_and_never_admits_an_unknown_key() {
    let (root, mut host) = configured("");
    for answer in [None, Some((503, b"{}".to_vec())), Some((200, b"not json".to_vec()))] {
        let (mut http, _) = start(&root, &mut host, REG_KEY);
        host.http_answer = answer;
        {
            let t = host.next_token;
            http.on_http_call_response(&mut host, t, 0);
        }
        assert_eq!(last_reply_code(&host), (503, "tenant_lookup_unavailable".into()));
    }
    // A lookup that cannot even be sent.
    host.fail_dispatch = true;
    let _ = start(&root, &mut host, REG_KEY);
    assert_eq!(last_reply_code(&host), (503, "tenant_lookup_unavailable".into()));
    assert_eq!(host.resumed, 0);
}

#[test]
fn lookups_in_flight_are_bounded_and_given_back_when_clients_leave() {
    let (root, mut host) = configured(r#", "max_lookups_in_flight": 2"#);
    let (mut a, _) = start(&root, &mut host, "k1");
    let (_b, _) = start(&root, &mut host, "k2");
    assert_eq!(host.get_calls.len(), 2);
    let _ = start(&root, &mut host, "k3");
    assert_eq!(host.get_calls.len(), 2, "no third lookup");
    assert_eq!(last_reply_code(&host), (503, "tenant_lookup_unavailable".into()));
    // The client of the first goes away: its slot is free again.
    a.on_log(&mut host);
    let _ = start(&root, &mut host, "k4");
    assert_eq!(host.get_calls.len(), 3);
}

#[test]
fn a_revocation_in_the_change_feed_lands_with_the_next_poll() {
    let (mut root, mut host) = configured("");
    // The first poll learns the version.
    root.on_tick(&mut host);
    let (_, path) = host.get_calls.last().unwrap().clone();
    assert_eq!(path, "/v1/registry/changes?since=0");
    host.http_answer = Some((200, br#"{"version": 5, "reset": true, "tenants": [], "keys": []}"#.to_vec()));
    {
        let t = host.next_token;
        root.on_http_call_response(&mut host, t, 0);
    }

    let (mut http, _) = start(&root, &mut host, REG_KEY);
    host.http_answer = Some((200, found(5, REG_KEY, "free", true, false, Some("sk-i"))));
    {
        let t = host.next_token;
        http.on_http_call_response(&mut host, t, 0);
    }
    http.on_request_body(&mut host, BODY.len(), true);
    assert!(host.replies.is_empty());

    // Revoked in the registry: the next poll lists the key.
    host.now_ms += 1000;
    root.on_tick(&mut host);
    let (_, path) = host.get_calls.last().unwrap().clone();
    assert_eq!(path, "/v1/registry/changes?since=5");
    let changes = format!(r#"{{"version": 6, "reset": false, "tenants": [], "keys": ["{}"]}}"#, sha256_hex(REG_KEY));
    host.http_answer = Some((200, changes.into_bytes()));
    {
        let t = host.next_token;
        root.on_http_call_response(&mut host, t, 0);
    }

    let lookups = host.get_calls.len();
    let (mut http, _) = start(&root, &mut host, REG_KEY);
    assert_eq!(host.get_calls.len(), lookups + 1, "looked up again");
    host.http_answer = Some((200, found(6, REG_KEY, "free", true, true, Some("sk-i"))));
    {
        let t = host.next_token;
        http.on_http_call_response(&mut host, t, 0);
    }
    assert_eq!(last_reply_code(&host), (401, "invalid_api_key".into()));
    // The revoked record is cached: refused again without a lookup.
    let (replies, lookups) = (host.replies.len(), host.get_calls.len());
    let _ = start(&root, &mut host, REG_KEY);
    assert_eq!((host.replies.len(), host.get_calls.len()), (replies + 1, lookups));
    assert_eq!(last_reply_code(&host), (401, "invalid_api_key".into()));
}

#[test]
fn cached_keys_work_through_the_grace_period_then_need_the_registry() {
    let (mut root, mut host) = configured("");
    let (mut http, _) = start(&root, &mut host, REG_KEY);
    host.http_answer = Some((200, found(1, REG_KEY, "free", true, false, Some("sk-i"))));
    {
        let t = host.next_token;
        http.on_http_call_response(&mut host, t, 0);
    }
    http.on_request_body(&mut host, BODY.len(), true);

    // The registry stops answering; polls fail.
    host.http_answer = None;
    for _ in 0..30 {
        host.now_ms += 1000;
        root.on_tick(&mut host);
        let t = host.next_token;
        root.on_http_call_response(&mut host, t, 0);
    }
    let lookups = host.get_calls.len();
    let replies = host.replies.len();
    let (mut http, _) = start(&root, &mut host, REG_KEY);
    http.on_request_body(&mut host, BODY.len(), true);
    assert_eq!(host.replies.len(), replies, "served from the cache within the grace period");
    assert_eq!(host.get_calls.len(), lookups);

    host.now_ms += 31_000;
    let (mut http, _) = start(&root, &mut host, REG_KEY);
    assert_eq!(host.get_calls.len(), lookups + 1, "past the grace period the key is looked up again");
    {
        let t = host.next_token;
        http.on_http_call_response(&mut host, t, 0);
    }
    assert_eq!(last_reply_code(&host), (503, "tenant_lookup_unavailable".into()));
}

#[test]
fn a_key_model_list_narrows_the_tier() {
    let (root, mut host) = configured("");
    let (mut http, _) = start(&root, &mut host, REG_KEY);
    let answer = format!(
        r#"{{"version": 1, "status": "found", "tenant": {{"id": "initech", "tier": "pro", "enabled": true}},
            "key": {{"sha256": "{}", "tenant": "initech", "revoked": false, "models": ["gpt-4o"]}},
            "credentials": {{"openai": "sk-i"}}}}"#,
        sha256_hex(REG_KEY)
    );
    host.http_answer = Some((200, answer.into_bytes()));
    {
        let t = host.next_token;
        http.on_http_call_response(&mut host, t, 0);
    }
    http.on_request_body(&mut host, BODY.len(), true);
    assert_eq!(last_reply_code(&host), (403, "model_not_allowed".into()));
    let prop = |k: &str| host.properties.get(k).cloned().unwrap_or_default();
    assert_eq!(
        (prop("tollgate_tenant"), prop("tollgate_model_requested"), prop("tollgate_error")),
        ("initech".into(), "gpt-4o-mini".into(), "model_not_allowed".into())
    );
}

#[test]
fn a_registry_key_of_a_static_tenant_serves_the_static_tenant() {
    let (root, mut host) = configured("");
    let (mut http, _) = start(&root, &mut host, REG_KEY);
    let answer = format!(
        r#"{{"version": 1, "status": "found", "tenant": {{"id": "acme", "tier": "free", "enabled": true}},
            "key": {{"sha256": "{}", "tenant": "acme", "revoked": false}},
            "credentials": {{"openai": "sk-from-registry"}}}}"#,
        sha256_hex(REG_KEY)
    );
    host.http_answer = Some((200, answer.into_bytes()));
    let before = host.rls_calls.len();
    {
        let t = host.next_token;
        http.on_http_call_response(&mut host, t, 0);
    }
    http.on_request_body(&mut host, BODY.len(), true);
    answer_reserve(&mut http, &mut host, before);
    assert!(host.replies.is_empty(), "{:?}", host.replies);
    // The static tenant's credential and tier (pro has limits: a reserve).
    assert_eq!(host.request_header("authorization").as_deref(), Some("Bearer sk-provider-acme"));
    assert_eq!(host.request_header("x-tollgate-tier").as_deref(), Some("pro"));
    assert_eq!(host.rls_calls.len(), before + 1);
}

#[test]
fn a_jwt_tenant_only_the_registry_knows_is_looked_up_by_id() {
    let extra = r#"}, "identity": {"jwt_authn": {"payload_in_metadata": "claims", "tenant_claim": "org"}"#;
    let (root, mut host) = configured(extra);
    host.readable.insert(
        "metadata.filter_metadata.envoy.filters.http.jwt_authn.claims".into(),
        br#"{"org": "initech", "sub": "u-1"}"#.to_vec(),
    );
    let mut http = root.new_http().expect("configured");
    host.request_headers = headers(&[(":path", "/v1/chat/completions"), (":method", "POST")]);
    assert_eq!(http.on_request_headers(&mut host, false), Action::Pause);
    let (_, path) = host.get_calls.last().expect("a lookup").clone();
    assert_eq!(path, "/v1/registry/tenants/initech?credentials=true");
    let answer = br#"{"version": 3, "status": "found", "tenant": {"id": "initech", "tier": "free", "enabled": true},
        "credentials": {"openai": "sk-i"}}"#;
    host.http_answer = Some((200, answer.to_vec()));
    {
        let t = host.next_token;
        http.on_http_call_response(&mut host, t, 0);
    }
    host.request_body = BODY.to_vec();
    http.on_request_body(&mut host, BODY.len(), true);
    assert!(host.replies.is_empty(), "{:?}", host.replies);
    assert_eq!(host.request_header("authorization").as_deref(), Some("Bearer sk-i"));
    assert_eq!(http.flow().user.as_deref(), Some("u-1"));

    // An id the registry does not know: 403 unknown_tenant, remembered.
    host.readable.insert(
        "metadata.filter_metadata.envoy.filters.http.jwt_authn.claims".into(),
        br#"{"org": "nobody", "sub": "u-2"}"#.to_vec(),
    );
    let mut http = root.new_http().expect("configured");
    assert_eq!(http.on_request_headers(&mut host, false), Action::Pause);
    host.http_answer = Some((200, br#"{"version": 3, "status": "unknown_tenant"}"#.to_vec()));
    {
        let t = host.next_token;
        http.on_http_call_response(&mut host, t, 0);
    }
    assert_eq!(last_reply_code(&host), (403, "unknown_tenant".into()));
    let lookups = host.get_calls.len();
    let mut http = root.new_http().expect("configured");
    http.on_request_headers(&mut host, false);
    assert_eq!(host.get_calls.len(), lookups);
    assert_eq!(last_reply_code(&host), (403, "unknown_tenant".into()));
}

#[test]
fn a_new_configuration_drops_registry_tenants_compiled_against_the_old_one() {
    let (mut root, mut host) = configured("");
    let (mut http, _) = start(&root, &mut host, REG_KEY);
    host.http_answer = Some((200, found(1, REG_KEY, "free", true, false, Some("sk-i"))));
    {
        let t = host.next_token;
        http.on_http_call_response(&mut host, t, 0);
    }
    // A push that adds a provider before `openai`: provider indices move.
    host.config = config("")
        .replace(
            r#""providers": {"openai""#,
            r#""providers": {"anthropic": {"credential_header": "x-api-key"}, "openai""#,
        )
        .into_bytes();
    assert!(root.on_configure(&mut host));
    let lookups = host.get_calls.len();
    let (mut http, _) = start(&root, &mut host, REG_KEY);
    assert_eq!(host.get_calls.len(), lookups + 1, "the tenant is fetched again");
    let (_, path) = host.get_calls.last().unwrap().clone();
    assert!(path.starts_with("/v1/registry/tenants/initech"), "{path}");
    host.http_answer = Some((
        200,
        br#"{"version": 2, "status": "found", "tenant": {"id": "initech", "tier": "free", "enabled": true},
            "credentials": {"openai": "sk-i"}}"#
            .to_vec(),
    ));
    {
        let t = host.next_token;
        http.on_http_call_response(&mut host, t, 0);
    }
    http.on_request_body(&mut host, BODY.len(), true);
    assert!(host.replies.is_empty(), "{:?}", host.replies);
    assert_eq!(host.request_header("authorization").as_deref(), Some("Bearer sk-i"));
    assert_eq!(host.request_header("x-api-key"), None);
}
