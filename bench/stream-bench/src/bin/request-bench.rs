//! Cost of tollgate's own logic per request, without the host: one OpenAI
//! chat request through identity, header plan, body, reserve answer, response
//! headers, a non-streamed response body and the end of the stream, with the
//! bench's five limits. What Envoy adds on top (callbacks into the VM, host
//! calls) is the difference to `bench/run.py`'s CPU per request.
//!
//!   cargo run --release -p tollgate-stream-bench --bin request-bench [N]
//!   (as wasm under Node: see bench/run-wasi.mjs)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test and bench code: a failure should stop loudly

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Instant;

use tollgate::config;
use tollgate::request::effect::{BodyStep, HeadersStep};
use tollgate::request::flow::RequestFlow;
use tollgate::worker::Worker;

const KEY: &str = "sk-bench-tenant";

fn main() {
    let n: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(200_000);
    // `leased`: the tier leases quota (lease_requests 100), as in the bench's
    // tollgate_leased run: most requests make no reserve call.
    let leased = std::env::args().nth(2).is_some_and(|a| a == "leased");
    let key_sha: String = {
        use sha2::Digest;
        sha2::Sha256::digest(KEY.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
    };
    let cfg = format!(
        r#"{{"providers": {{"openai": {{"credential_header": "authorization"}}}},
        "routes": [{{"path": "/v1/chat/completions", "api": "openai_chat", "provider": "openai"}}],
        "tiers": {{"bench": {{"models": ["*"], "max_request_bytes": 65536,
            "requests_per_minute": 1000000000, "tokens_per_minute": 1000000000,
            "tokens_per_day": 100000000000, "usd_per_day": 1000000, "usd_per_month": 10000000{lease}}}}},
        "tenants": [{{"id": "bench", "tier": "bench", "api_key_sha256": ["{key_sha}"],
            "provider_key_env": {{"openai": "BENCH_OPENAI_KEY"}}}}],
        "pricing": {{"models": {{"gpt-4o-mini": {{"input": 0.15, "output": 0.6}}}}, "default": {{"input": 1, "output": 1}}}},
        "rate_limit": {{"cluster": "tollgate_rls", "timeout_ms": 500}}}}"#,
        lease = if leased { r#", "lease_requests": 100"# } else { "" }
    );
    let env = |k: &str| (k == "BENCH_OPENAI_KEY").then(|| "sk-upstream".to_string());
    let plugin = Rc::new(config::load(cfg.as_bytes(), &env).expect("bench config"));
    let shared = Rc::new(RefCell::new(Worker::new(1024)));
    let auth = format!("Bearer {KEY}");
    let headers: Vec<(String, String)> = [
        (":authority", "127.0.0.1:10000"),
        (":path", "/v1/chat/completions"),
        (":method", "POST"),
        (":scheme", "http"),
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
        ("content-length", "76"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "5e7c3a55-1b1f-4a43-9d0b-2f54d7a0c6a1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let body = br#"{"model": "gpt-4o-mini", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}"#;
    let response = br#"{"id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini-2024-07-18", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there."}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15, "prompt_tokens_details": {"cached_tokens": 0}}}"#;
    // An OK answer to a five-descriptor reserve.
    let ok = {
        use prost::Message;
        let st = tollgate::rls::DescriptorStatus {
            code: 1,
            current_limit: None,
            limit_remaining: 1_000_000,
            duration_until_reset: None,
        };
        tollgate::rls::RateLimitResponse { overall_code: 1, statuses: vec![st; 5] }.encode_to_vec()
    };

    let mut phases = [0f64; 6];
    let t_all = Instant::now();
    for i in 0..n {
        let now = 1_700_000_000_000 + i;
        let mut f = RequestFlow::new(Rc::clone(&plugin), Rc::clone(&shared));
        let t = Instant::now();
        let step = f.on_request_headers(&headers, false, now, || format!("tg-{i:020}"));
        assert!(matches!(step, HeadersStep::ReadBody(_)));
        phases[0] += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let step = f.on_request_body(body, now);
        phases[1] += t.elapsed().as_secs_f64();
        let t = Instant::now();
        match step {
            BodyStep::Call(_) => {
                let step = f.on_rls_reply(Ok(&ok), now);
                assert!(matches!(step, BodyStep::Forward { .. }), "{step:?}");
            }
            step => assert!(leased && matches!(step, BodyStep::Forward { .. }), "{step:?}"),
        }
        phases[2] += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let _ = f.on_response_headers(200);
        phases[3] += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let (_, fin) = f.on_response_body(response, true, now + 1);
        phases[4] += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let fin2 = f.on_stream_done(now + 1);
        assert!(fin.is_some() || fin2.is_some());
        phases[5] += t.elapsed().as_secs_f64();
        if i % 64 == 0 {
            // the root's tick: settles netted and sent
            let mut s = shared.borrow_mut();
            s.queue_settle_nets();
            let due = tollgate::ratelimit::outbox::merge(s.journal.due(now, usize::MAX));
            for (t, entry) in due.into_iter().enumerate() {
                let _ = entry.metadata();
                let _ = std::hint::black_box(entry.encode());
                s.journal.sent(t as u32, entry);
                s.journal.answered(t as u32, tollgate::ratelimit::outbox::Answer::Applied, now);
            }
        }
    }
    let total = t_all.elapsed().as_secs_f64();
    let names = ["headers", "body+reserve", "rls_reply", "resp_headers", "resp_body", "done"];
    for (name, s) in names.iter().zip(phases) {
        println!("{name:>14}: {:7.2} us/req", s / n as f64 * 1e6);
    }
    println!("{:>14}: {:7.2} us/req ({n} requests)", "total", total / n as f64 * 1e6);
}
