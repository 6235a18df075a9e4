use super::*;
use crate::usage::{MeterLimits, ResponseMeter, UsageFormat};

const FIXTURES: &[&[u8]] = &[
    include_bytes!("../../tests/fixtures/openai_chat_stream_include_usage.sse"),
    include_bytes!("../../tests/fixtures/openai_chat_stream_azure.sse"),
    include_bytes!("../../tests/fixtures/openai_chat_stream_vllm_continuous.sse"),
    include_bytes!("../../tests/fixtures/openai_chat_stream_error.sse"),
];

fn chat_meter(limits: MeterLimits) -> ResponseMeter {
    ResponseMeter::new(UsageFormat::OpenAiChat, true, limits)
}

/// The meter alone (its own SSE parser, every event parsed).
fn reference(stream: &[u8], limits: MeterLimits) -> Metered {
    let mut m = chat_meter(limits);
    m.push(stream);
    m.finish()
}

/// The tap over `chunks`: what it forwarded and what it metered.
fn run(chunks: &[&[u8]], strip: bool, limits: MeterLimits) -> (Vec<u8>, Metered, u64) {
    let mut t = StreamTap::new(chat_meter(limits), strip);
    let mut out = Vec::new();
    for c in chunks {
        out.extend(t.push(c).apply(c));
    }
    out.extend(t.end_stream());
    let stripped = t.stripped();
    (out, t.finish(), stripped)
}

/// What the tap must report the same as the reference meter.
fn exact(m: &Metered) -> impl PartialEq + std::fmt::Debug {
    (
        m.usage,
        m.model_answered.clone(),
        m.errors.clone(),
        m.complete,
        m.events,
        m.oversized,
        m.usage_salvaged,
        m.bytes_seen,
    )
}

/// Streams in the shapes the fast path must get right.
fn streams() -> Vec<Vec<u8>> {
    let content = |i: usize, extra: &str| {
        format!("data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"m-1\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"w{i} \"}},\"finish_reason\":null}}]{extra}}}\n\n")
    };
    let usage_only = "data: {\"id\":\"c\",\"model\":\"m-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":4,\"total_tokens\":11}}\n\n";
    let mut out: Vec<Vec<u8>> = FIXTURES.iter().map(|f| f.to_vec()).collect();
    // Plain, with usage null everywhere, with usage on every chunk (vLLM).
    for extra in [
        "",
        ",\"usage\":null",
        ",\"usage\": {\"prompt_tokens\":7,\"completion_tokens\":1}",
    ] {
        let mut s = String::new();
        for i in 0..4 {
            s += &content(i, extra);
        }
        s += usage_only;
        s += "data: [DONE]\n\n";
        out.push(s.into_bytes());
    }
    // CRLF and lone-CR line endings, comments, an error, a multi-line event,
    // `"usage"` as a string value and spacing around the colon.
    let mut s = String::new();
    s += &content(0, "");
    s += ": keep-alive\n\n";
    s += &content(1, ",\"usage\" :  null");
    s += &content(2, ",\"note\":\"usage\"");
    s += "data: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\"}}\n\n";
    s += "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\ndata: \"model\":\"m-2\"}\n\n";
    s += usage_only;
    s += "data: [DONE]\n\n";
    out.push(s.clone().into_bytes());
    out.push(s.replace('\n', "\r\n").into_bytes());
    out.push(s.replace('\n', "\r").into_bytes());
    // Usage-only chunk last and unterminated.
    let mut s = content(0, "") + &content(1, "");
    s += usage_only.trim_end();
    out.push(s.into_bytes());
    out
}

fn without_usage_only(stream: &[u8]) -> Vec<u8> {
    // Events are separated by blank lines of one style per stream.
    let text = String::from_utf8(stream.to_vec()).expect("utf8");
    let sep = if text.contains("\r\n") {
        "\r\n\r\n"
    } else if text.contains('\n') {
        "\n\n"
    } else {
        "\r\r"
    };
    let mut out = String::new();
    for (i, ev) in text.split_inclusive(sep).enumerate() {
        let data = ev.trim_end().strip_prefix("data: ").unwrap_or("");
        if crate::usage::is_usage_only_chunk(data) {
            continue;
        }
        let _ = i;
        out += ev;
    }
    out.into_bytes()
}

#[test]
fn meters_like_the_full_parser_at_every_split() {
    let limits = MeterLimits::default();
    for (n, s) in streams().iter().enumerate() {
        let want = reference(s, limits);
        let stripped_want = without_usage_only(s);
        for i in 0..=s.len() {
            let (a, b) = s.split_at(i);
            for strip in [false, true] {
                let (out, got, stripped) = run(&[a, b], strip, limits);
                assert_eq!(
                    exact(&got),
                    exact(&want),
                    "stream {n} split at {i} strip {strip}"
                );
                if strip {
                    assert_eq!(
                        String::from_utf8_lossy(&out),
                        String::from_utf8_lossy(&stripped_want),
                        "stream {n} split at {i}"
                    );
                    assert_eq!(stripped, u64::from(out.len() != s.len()));
                } else {
                    assert_eq!(out, *s, "stream {n} split at {i}");
                }
            }
        }
        let bytes: Vec<&[u8]> = s.chunks(1).collect();
        let (out, got, _) = run(&bytes, true, limits);
        assert_eq!(exact(&got), exact(&want), "stream {n} byte by byte");
        assert_eq!(out, stripped_want, "stream {n} byte by byte");
    }
}

#[test]
fn three_way_splits() {
    let limits = MeterLimits::default();
    let s = &streams()[7];
    let want = reference(s, limits);
    let stripped_want = without_usage_only(s);
    for i in (0..=s.len()).step_by(3) {
        for j in (i..=s.len()).step_by(5) {
            let (a, rest) = s.split_at(i);
            let (b, c) = rest.split_at(j - i);
            let (out, got, _) = run(&[a, b, c], true, limits);
            assert_eq!(exact(&got), exact(&want), "split at {i},{j}");
            assert_eq!(out, stripped_want, "split at {i},{j}");
        }
    }
}

#[test]
fn content_events_are_skimmed_and_estimated() {
    let s = &streams()[4];
    let (_, got, _) = run(&[s], false, MeterLimits::default());
    // The first event is parsed (model unknown), the next three skimmed; the
    // usage chunk and [DONE] parsed.
    assert_eq!(got.skimmed_events, 3);
    assert_eq!(got.output_text_bytes, 3);
    assert_eq!(got.estimated_output_tokens(), 1 + 3);
}

#[test]
fn usage_on_content_chunks_is_never_skimmed() {
    // vLLM continuous usage: the latest report wins, so every one is read.
    let s = &streams()[6];
    let (_, got, _) = run(&[s], false, MeterLimits::default());
    assert_eq!(got.skimmed_events, 0);
    assert_eq!(got.usage.map(|u| u.output), Some(4));
}

#[test]
fn oversized_events_are_bounded_and_usage_after_them_counts() {
    let limits = MeterLimits {
        max_event_bytes: 256,
        ..MeterLimits::default()
    };
    let big = format!(
        "data: {{\"model\":\"m\",\"choices\":[{{\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
        "x".repeat(2000)
    );
    let stream = format!(
        "{big}{big}data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}}}\n\ndata: [DONE]\n\n"
    );
    let s = stream.as_bytes();
    let want = reference(s, limits);
    assert_eq!(want.oversized, 2);
    for size in [1, 7, 100, 300, 5000] {
        let chunks: Vec<&[u8]> = s.chunks(size).collect();
        let (out, got, stripped) = run(&chunks, true, limits);
        assert_eq!(exact(&got), exact(&want), "chunks of {size}");
        assert_eq!(stripped, 1);
        assert_eq!(
            out.len(),
            2 * big.len() + "data: [DONE]\n\n".len(),
            "chunks of {size}"
        );
    }
}

#[test]
fn unchanged_chunks_are_not_rewritten() {
    // Whole events per chunk, no usage chunk: nothing is ever edited.
    let s = &streams()[4];
    let mut t = StreamTap::new(chat_meter(MeterLimits::default()), true);
    let text = std::str::from_utf8(s).expect("utf8");
    for ev in text.split_inclusive("\n\n") {
        if ev.contains("\"choices\":[]") {
            break;
        }
        assert_eq!(t.push(ev.as_bytes()), ChunkEdit::Unchanged, "{ev}");
    }
}

#[test]
fn other_apis_and_json_bodies_are_delegated() {
    let body =
        br#"{"model":"gpt-4o","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
    let mut t = StreamTap::new(chat_meter(MeterLimits::default()), true);
    assert_eq!(t.push(b"  \n"), ChunkEdit::Unchanged);
    assert_eq!(t.push(body), ChunkEdit::Unchanged);
    assert!(!t.is_fast());
    assert_eq!(t.finish().usage.map(|u| u.total), Some(7));
    let anthropic: &[u8] = include_bytes!("../../tests/fixtures/anthropic_stream.sse");
    let m = ResponseMeter::new(UsageFormat::AnthropicMessages, true, MeterLimits::default());
    let mut t = StreamTap::new(m, false);
    assert_eq!(t.push(anthropic), ChunkEdit::Unchanged);
    assert!(!t.is_fast());
    assert!(t.finish().usage.is_some());
}

#[test]
fn leading_whitespace_then_sse() {
    let s = &streams()[4];
    let limits = MeterLimits::default();
    let mut with_ws = b"\n\n".to_vec();
    with_ws.extend_from_slice(s);
    let want = reference(&with_ws, limits);
    for i in 0..=4 {
        let (a, b) = with_ws.split_at(i);
        let (out, got, _) = run(&[a, b], true, limits);
        assert_eq!(exact(&got), exact(&want), "split at {i}");
        assert_eq!(out, without_usage_only(&with_ws), "split at {i}");
    }
}

#[test]
fn usage_only_prefix_test() {
    assert!(may_be_usage_only(b""));
    assert!(may_be_usage_only(b"dat"));
    assert!(may_be_usage_only(b"data: "));
    assert!(may_be_usage_only(b"data: {\"id\":\"x\",\"choi"));
    assert!(may_be_usage_only(b"data: {\"id\":\"x\",\"choices\": [ "));
    assert!(may_be_usage_only(b"data: {\"id\":\"x\",\"choices\":[]"));
    assert!(may_be_usage_only(
        b"data: {\"a\":{\"choices\":[1]},\"choices\":["
    ));
    assert!(may_be_usage_only(b"event: x\n"));
    assert!(!may_be_usage_only(b"data: {\"id\":\"x\",\"choices\":[{"));
    assert!(!may_be_usage_only(b"data: {\"id\":\"x\",\"choices\" : [ {"));
    assert!(!may_be_usage_only(b"data: {\"choices\":{}"));
    assert!(!may_be_usage_only(b"data: [DON"));
    assert!(!may_be_usage_only(b"data:[DONE]"));
    // A "choices" string inside a value does not count.
    assert!(may_be_usage_only(b"data: {\"x\":\"\\\"choices\\\":[1]\","));
}

#[test]
fn markers() {
    assert!(marker_at(b"\"usage\":{", 0));
    assert!(!marker_at(b"\"usage\":null", 0));
    assert!(!marker_at(b"\"usage\" : \tnull", 0));
    assert!(marker_at(b"\"usage\"", 0));
    assert!(marker_at(b"\"error\":\"x\"", 0));
    assert!(!marker_at(b"\"error\":null", 0));
    assert!(!marker_at(b"\"model\":{", 0));
}
