//! Does a whole request come out right through the contexts Envoy calls?
//!
//! Whole requests through the contexts Envoy calls, against the recording
//! host: what reaches the provider, what the client gets, what is metered
//! and settled.

use prost::Message as _;

use super::*;
use crate::host::contexts::Root;
use crate::host::Action;
use crate::rls;

const CLIENT_KEY: &str = "sk-tenant-acme-0001";

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn config(lease: bool) -> String {
    format!(
        r#"{{"providers": {{"openai": {{"credential_header": "authorization"}}}},
        "routes": [{{"path": "/v1/chat/completions", "api": "openai_chat", "provider": "openai"}}],
        "tiers": {{"pro": {{"models": ["*"], "requests_per_minute": 100, "tokens_per_minute": 100000{lease}}}}},
        "tenants": [{{"id": "acme", "tier": "pro", "api_key_sha256": ["{}"],
            "provider_key_env": {{"openai": "ACME_OPENAI_KEY"}}}}],
        "pricing": {{"models": {{"gpt-4o-mini": {{"input": 0.15, "output": 0.6}}}}, "default": {{"input": 1, "output": 1}}}},
        "rate_limit": {{"cluster": "tollgate_rls", "timeout_ms": 500}}}}"#,
        sha256_hex(CLIENT_KEY),
        lease = if lease { r#", "lease_requests": 10"# } else { "" }
    )
}

fn configured(lease: bool) -> (Root, FakeHost) {
    let mut host = FakeHost::with_config(&config(lease));
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
        ("x-tollgate-tenant", "someone-else"),
    ])
}

fn ok_answer(n: usize) -> Vec<u8> {
    let st =
        rls::DescriptorStatus { code: 1, current_limit: None, limit_remaining: 1_000_000, duration_until_reset: None };
    rls::RateLimitResponse { overall_code: 1, statuses: vec![st; n] }.encode_to_vec()
}

const BODY: &[u8] = br#"{"model": "gpt-4o-mini", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}"#;
const RESPONSE: &[u8] = br#"{"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello."}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}"#;

/// Runs the request half: headers, body, reserve answer. Answers the
/// request's context.
fn send_request(root: &Root, host: &mut FakeHost, body: &[u8]) -> crate::host::contexts::Http {
    let mut http = root.new_http().expect("configured");
    host.request_headers = request_headers(CLIENT_KEY);
    assert_eq!(http.on_request_headers(host, false), Action::Pause);
    host.request_body = body.to_vec();
    let action = http.on_request_body(host, body.len(), true);
    if action == Action::Pause {
        let call = host.rls_calls.last().expect("a reserve call").clone();
        let req = rls::RateLimitRequest::decode(call.message.as_slice()).expect("an RLS request");
        host.grpc_answer = Some(ok_answer(req.descriptors.len()));
        let resumed = host.resumed;
        http.on_grpc_call_response(host, call.token, 0, 0);
        assert_eq!(host.resumed, resumed + 1);
    }
    http
}

#[test]
fn a_whole_request_is_isolated_reserved_metered_and_settled() {
    let (mut root, mut host) = configured(false);
    let mut http = send_request(&root, &mut host, BODY);

    // The provider sees the tenant's own key, never the client's, and
    // tollgate's trusted tenant header, never the client's claim.
    assert_eq!(host.request_header("authorization").as_deref(), Some("Bearer sk-provider-acme"));
    assert_eq!(host.request_header("x-tollgate-tenant").as_deref(), Some("acme"));
    assert_eq!(host.request_header("accept-encoding").as_deref(), Some("identity"));
    assert!(host.request_header("x-request-id").is_some_and(|id| id.starts_with("tg-")));
    assert_eq!(host.writes.get("header_pairs"), Some(&1), "the request headers are written in one call");

    // One reserve, with an idempotency key, to the configured cluster.
    assert_eq!(host.rls_calls.len(), 1);
    let reserve = &host.rls_calls[0];
    assert_eq!(reserve.cluster, "tollgate_rls");
    assert!(reserve.meta(rls::META_IDEMPOTENCY_KEY).is_some_and(|k| k.ends_with(":r1")));
    assert_eq!(reserve.meta(rls::META_MODE), None);

    // A plain response is held for its usage headers.
    host.response_headers = headers(&[(":status", "200"), ("content-type", "application/json")]);
    assert_eq!(http.on_response_headers(&mut host, false), Action::Pause);
    host.response_chunk = RESPONSE.to_vec();
    assert_eq!(http.on_response_body(&mut host, RESPONSE.len(), true), Action::Continue);
    assert_eq!(host.response_chunk, RESPONSE, "the body goes out as it came");
    assert_eq!(host.response_header("x-tollgate-usage-total-tokens").as_deref(), Some("15"));
    assert_eq!(host.response_header("x-tollgate-usage-estimated").as_deref(), Some("false"));
    assert!(host.response_header("x-ratelimit-remaining-requests").is_some());
    http.on_log(&mut host);

    // The access log's filter state.
    assert_eq!(host.properties.get("tollgate_tenant").map(String::as_str), Some("acme"));
    assert_eq!(host.properties.get("tollgate_tokens_output").map(String::as_str), Some("3"));
    assert_eq!(host.properties.get("tollgate_outcome").map(String::as_str), Some("ok"));
    // Usage 12 in at $0.15/M and 3 out at $0.60/M: 1.8 + 1.8 µ$, rounded up.
    assert_eq!(host.properties.get("tollgate_cost_usd").map(String::as_str), Some("0.000004"));

    // The tick hands counters over and sends the settle.
    host.now_ms += 60;
    root.on_tick(&mut host);
    assert!(host.counters.keys().any(|k| k.contains("tenant.acme") || k.contains("acme")), "{:?}", host.counters);
    assert_eq!(host.rls_calls.len(), 2);
    let settle = host.rls_calls[1].clone();
    assert_eq!(settle.meta(rls::META_MODE), Some(rls::MODE_SETTLE));
    assert!(settle.meta(rls::META_IDEMPOTENCY_KEY).is_some_and(|k| k.ends_with(":settle")));
    host.grpc_answer = Some(ok_answer(0));
    assert!(!root.on_grpc_call_response(&mut host, settle.token, 0, 0));
    root.on_tick(&mut host);
    assert_eq!(host.counters.get("tollgate.settle.ok"), Some(&1));
    assert_eq!(root.worker().map(|w| w.borrow().pending_settles()), Some(0));

    // No secret reached what Envoy logs or exports.
    for v in host.properties.values() {
        assert!(!v.contains(CLIENT_KEY) && !v.contains("sk-provider-acme"));
    }
    for k in host.counters.keys().chain(host.histograms.keys()) {
        assert!(!k.contains(CLIENT_KEY) && !k.contains("sk-provider-acme"));
    }
}

#[test]
fn an_unknown_key_gets_the_apis_own_401_and_is_counted() {
    let (mut root, mut host) = configured(false);
    let mut http = root.new_http().expect("configured");
    host.request_headers = request_headers("sk-nobody");
    assert_eq!(http.on_request_headers(&mut host, false), Action::Pause);
    assert_eq!(host.replies.len(), 1);
    let reply = &host.replies[0];
    assert_eq!(reply.status, 401);
    let body: serde_json::Value = serde_json::from_slice(&reply.body).expect("JSON error body");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(host.rls_calls.is_empty());
    // Nothing was forwarded: the headers are untouched.
    assert_eq!(host.request_header("authorization").as_deref(), Some("Bearer sk-nobody"));
    root.on_tick(&mut host);
    assert!(host.counters.keys().any(|k| k.contains("refused")), "{:?}", host.counters);
    // The access log gets the refusal: outcome, code, request id.
    assert_eq!(host.properties.get("tollgate_outcome").map(String::as_str), Some("refused"));
    assert_eq!(host.properties.get("tollgate_error").map(String::as_str), Some("invalid_api_key"));
    assert_eq!(host.properties.get("tollgate_tenant").map(String::as_str), Some(""));
    assert!(host.properties.get("tollgate_request_id").is_some_and(|id| !id.is_empty()));
}

#[test]
fn a_reserve_that_cannot_be_dispatched_follows_the_failure_mode() {
    let (root, mut host) = configured(false);
    host.fail_dispatch = true;
    let mut http = root.new_http().expect("configured");
    host.request_headers = request_headers(CLIENT_KEY);
    assert_eq!(http.on_request_headers(&mut host, false), Action::Pause);
    host.request_body = BODY.to_vec();
    // The default failure mode is closed: 503 in the API's envelope, and
    // the request never leaves.
    assert_eq!(http.on_request_body(&mut host, BODY.len(), true), Action::Pause);
    assert!(host.rls_calls.is_empty());
    assert_eq!(host.replies.len(), 1);
    assert_eq!(host.replies[0].status, 503);
    assert_eq!(host.replies[0].header("x-tollgate-error"), Some("rate_limiter_unavailable"));
    assert_eq!(host.request_header("authorization").as_deref(), Some("Bearer sk-provider-acme"));
}

#[test]
fn a_stream_passes_byte_for_byte_in_pieces_and_is_metered() {
    let (root, mut host) = configured(false);
    let body = br#"{"model": "gpt-4o-mini", "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "hi"}]}"#;
    let mut http = send_request(&root, &mut host, body);
    assert_eq!(host.request_body, body, "a body the filter need not change goes as it came");
    host.response_headers = headers(&[(":status", "200"), ("content-type", "text/event-stream")]);
    let stream = concat!(
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"stop\"}]}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n",
        "data: [DONE]\n\n",
    )
    .as_bytes();
    // A stream is never held.
    assert_eq!(http.on_response_headers(&mut host, false), Action::Continue);
    let mut forwarded = Vec::new();
    for (i, piece) in stream.chunks(7).enumerate() {
        let last = (i + 1) * 7 >= stream.len();
        host.response_chunk = piece.to_vec();
        http.on_response_body(&mut host, piece.len(), last);
        forwarded.extend_from_slice(&host.response_chunk);
    }
    http.on_log(&mut host);
    assert_eq!(forwarded, stream, "the client asked for usage: every byte is forwarded");
    assert_eq!(host.writes.get("response_body"), None, "no chunk was written back");
    assert_eq!(host.properties.get("tollgate_tokens_total").map(String::as_str), Some("11"));
    assert_eq!(host.properties.get("tollgate_estimated").map(String::as_str), Some("false"));
}

#[test]
fn a_stream_without_usage_asked_has_it_injected_and_the_usage_chunk_hidden() {
    let (root, mut host) = configured(false);
    let body = br#"{"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]}"#;
    let mut http = send_request(&root, &mut host, body);
    let sent: serde_json::Value = serde_json::from_slice(&host.request_body).expect("JSON body");
    assert_eq!(sent["stream_options"]["include_usage"], serde_json::Value::Bool(true));
    assert_eq!(host.request_header("content-length"), Some(host.request_body.len().to_string()));
    host.response_headers = headers(&[(":status", "200"), ("content-type", "text/event-stream")]);
    assert_eq!(http.on_response_headers(&mut host, false), Action::Continue);
    let content = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":\"stop\"}]}\n\n";
    let usage = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":1,\"total_tokens\":10}}\n\n";
    let stream = format!("{content}{usage}data: [DONE]\n\n");
    let mut forwarded = Vec::new();
    for (i, piece) in stream.as_bytes().chunks(5).enumerate() {
        let last = (i + 1) * 5 >= stream.len();
        host.response_chunk = piece.to_vec();
        http.on_response_body(&mut host, piece.len(), last);
        forwarded.extend_from_slice(&host.response_chunk);
    }
    http.on_log(&mut host);
    assert_eq!(String::from_utf8_lossy(&forwarded), format!("{content}data: [DONE]\n\n"));
    assert_eq!(host.properties.get("tollgate_tokens_total").map(String::as_str), Some("10"));
}

#[test]
fn leased_requests_make_no_call_and_the_lease_is_given_back_on_removal() {
    let (mut root, mut host) = configured(true);
    // The first answer shows room: the next request reserves a lease.
    let mut first = send_request(&root, &mut host, BODY);
    first.on_log(&mut host);
    let mut second = send_request(&root, &mut host, BODY);
    second.on_log(&mut host);
    let calls = host.rls_calls.len();
    let mut third = send_request(&root, &mut host, BODY);
    third.on_log(&mut host);
    assert_eq!(host.rls_calls.len(), calls, "the third request drew from the lease");
    // Removing the plugin gives the lease back and drains the settles.
    let drained = root.on_done(&mut host);
    let refunds: Vec<_> = host.rls_calls[calls..].iter().filter(|c| c.meta(rls::META_MODE) == Some("settle")).collect();
    assert!(refunds.iter().any(|c| c.meta(rls::META_IDEMPOTENCY_KEY).is_some_and(|k| k.contains(":lease"))));
    assert!(!drained, "settles are in flight");
    host.grpc_answer = Some(ok_answer(0));
    let tokens: Vec<u32> = host.rls_calls[calls..].iter().map(|c| c.token).collect();
    let mut done = false;
    for t in tokens {
        done = root.on_grpc_call_response(&mut host, t, 0, 0);
    }
    assert!(done, "the drain ends with the last answer");
}

#[test]
fn metrics_carry_the_tier_not_the_tenant_when_so_configured() {
    let cfg = config(false).replacen('{', r#"{"metering": {"tenant_label": "tier"}, "#, 1);
    let mut host = FakeHost::with_config(&cfg);
    host.env.insert("ACME_OPENAI_KEY".into(), "sk-provider-acme".into());
    let mut root = Root::default();
    assert!(root.on_configure(&mut host));
    let mut http = send_request(&root, &mut host, BODY);
    host.response_headers = headers(&[(":status", "200"), ("content-type", "application/json")]);
    http.on_response_headers(&mut host, false);
    host.response_chunk = RESPONSE.to_vec();
    http.on_response_body(&mut host, RESPONSE.len(), true);
    root.on_tick(&mut host);
    let names: Vec<&String> = host.counters.keys().collect();
    assert!(names.iter().any(|k| k.starts_with("tollgate.tenant.tier-pro.model.")), "{names:?}");
    assert!(!names.iter().any(|k| k.contains("acme")), "{names:?}");
    // The access log still names the tenant.
    assert_eq!(host.properties.get("tollgate_tenant").map(String::as_str), Some("acme"));
}

#[test]
fn a_reconfiguration_gives_back_leases_under_the_tenants_they_belong_to() {
    let (mut root, mut host) = configured(true);
    for _ in 0..3 {
        let mut http = send_request(&root, &mut host, BODY);
        http.on_log(&mut host);
    }
    // The new configuration puts another tenant first: acme's index changes.
    let other = format!(
        r#"{{"id": "globex", "tier": "pro", "api_key_sha256": ["{}"], "provider_key_env": {{"openai": "ACME_OPENAI_KEY"}}}}, "#,
        sha256_hex("sk-globex")
    );
    let cfg = config(true).replacen(r#""tenants": ["#, &format!(r#""tenants": [{other}"#), 1);
    host.config = cfg.into_bytes();
    let before = host.rls_calls.len();
    assert!(root.on_configure(&mut host));
    // Every settle from now on, the lease's expiry included, names acme:
    // none is charged or refunded to the tenant that took its index.
    for _ in 0..3 {
        host.now_ms += 60_000;
        root.on_tick(&mut host);
    }
    let after = &host.rls_calls[before..];
    assert!(!after.is_empty(), "the lease is given back");
    for call in after {
        let req = rls::RateLimitRequest::decode(call.message.as_slice()).expect("an RLS request");
        for d in &req.descriptors {
            let tenant = d.entries.iter().find(|e| e.key == "tenant").map(|e| e.value.as_str());
            assert_eq!(tenant, Some("acme"), "{:?}", call.meta(rls::META_IDEMPOTENCY_KEY));
        }
    }
}

#[test]
fn an_allowed_websocket_is_reserved_from_its_headers_and_its_frames_wait_for_the_answer() {
    let config = config(false).replace(r#""models": ["*"],"#, r#""models": ["*"], "allow_websocket": true,"#);
    assert!(config.contains("allow_websocket"));
    let mut host = FakeHost::with_config(&config);
    host.env.insert("ACME_OPENAI_KEY".into(), "sk-provider-acme".into());
    let mut root = Root::default();
    assert!(root.on_configure(&mut host));
    let mut http = root.new_http().expect("configured");
    host.request_headers = headers(&[
        (":authority", "gateway"),
        (":path", "/v1/chat/completions?model=gpt-realtime"),
        (":method", "GET"),
        ("authorization", &format!("Bearer {CLIENT_KEY}")),
        ("connection", "Upgrade"),
        ("upgrade", "websocket"),
    ]);
    // Held at its headers for the reserve, with the provider's key already in.
    assert_eq!(http.on_request_headers(&mut host, false), Action::Pause);
    assert_eq!(host.request_header("authorization").as_deref(), Some("Bearer sk-provider-acme"));
    let call = host.rls_calls.last().expect("a reserve from the headers").clone();
    // A frame that arrives before the answer waits: letting it go would let the request go.
    assert_eq!(http.on_request_body(&mut host, 7, false), Action::Pause);
    let req = rls::RateLimitRequest::decode(call.message.as_slice()).expect("an RLS request");
    host.grpc_answer = Some(ok_answer(req.descriptors.len()));
    let resumed = host.resumed;
    http.on_grpc_call_response(&mut host, call.token, 0, 0);
    assert_eq!(host.resumed, resumed + 1);
    assert!(host.replies.is_empty());
    // Then frames pass both ways, unread.
    assert_eq!(http.on_request_body(&mut host, 7, false), Action::Continue);
    host.response_headers = headers(&[(":status", "101"), ("upgrade", "websocket")]);
    assert_eq!(http.on_response_headers(&mut host, false), Action::Continue);
    host.response_chunk = b"\x81\x02hi".to_vec();
    assert_eq!(http.on_response_body(&mut host, 4, false), Action::Continue);
    http.on_log(&mut host);
    let prop = |k: &str| host.properties.get(k).map(String::as_str);
    assert_eq!(prop("tollgate_unmetered"), Some("websocket"));
    assert_eq!(prop("tollgate_outcome"), Some("ok"));
    assert_eq!(prop("tollgate_tokens_total"), Some("0"));
    assert_eq!(prop("tollgate_model_requested"), Some("gpt-realtime"));
}
