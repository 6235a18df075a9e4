//! Fuzz the metering core: SSE parser, response meter, the stream tap (fast
//! path and usage-chunk stripping) and pricing, with the body cut into chunks
//! chosen by the input itself.
//!
//! Input layout: byte 0 picks the format and flags, byte 1 seeds the chunk
//! sizes, the rest is the response body.
//!
//! Properties checked, besides "never panics":
//! - metering gives the same result however the body is chunked;
//! - the tap meters usage, errors and completion exactly like the
//!   meter alone, however the body is chunked;
//! - the tap's output is the same however the body is chunked, and is the
//!   input unchanged when it stripped nothing;
//! - edge scanning (the window API, with small bounds) on an OpenAI chat
//!   stream made of a head event naming the model, the body, and a final
//!   usage chunk and `[DONE]`: usage output and total, completion and bytes
//!   the same as the full path; when nothing was passed over, everything the
//!   same, output included.
#![no_main]

use libfuzzer_sys::fuzz_target;

// The metering core is host-free: the fuzzer drives it through the crate's
// public API, natively, without proxy-wasm.
use tollgate::llm::openai_chat::inject_include_usage;
use tollgate::llm::Api;
use tollgate::metering::meter::ResponseMeter;
use tollgate::metering::pricing;
use tollgate::metering::tap::StreamTap;
use tollgate::metering::usage::{self, MeterLimits};

/// Chunk `body` into pieces of 1..=max bytes from a tiny xorshift stream.
fn chunks(body: &[u8], seed: u8) -> Vec<&[u8]> {
    let max = usize::from(seed % 64) + 1;
    let mut state = u32::from(seed) | 0x9E37_0000;
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let n = (state as usize % max + 1).min(rest.len());
        let (a, b) = rest.split_at(n);
        out.push(a);
        rest = b;
    }
    out
}

fn meter(
    format: Api,
    streaming: bool,
    limits: MeterLimits,
    parts: &[&[u8]],
) -> usage::Metered {
    let mut m = ResponseMeter::new(format, streaming, limits);
    for p in parts {
        m.push(p);
    }
    m.finish()
}

fn tap(
    format: Api,
    limits: MeterLimits,
    parts: &[&[u8]],
) -> (Vec<u8>, u64, usage::Metered) {
    let mut t = StreamTap::new(ResponseMeter::new(format, true, limits), true);
    let mut out = Vec::new();
    for p in parts {
        out.extend(t.push(p).apply(p));
    }
    out.extend(t.end_stream());
    let n = t.stripped();
    (out, n, t.finish())
}

/// The tap driven as the host contexts drives it: each chunk through `push_read`,
/// which reads only what it needs (tiny edge bounds, so small chunks are
/// edge-scanned, and a chunk that spans the 24-byte head is split after it;
/// a tail of 16 bytes is still more than the `[DONE]` event after the usage
/// chunk, as the real 8 KiB tail is). Every read must be inside the chunk,
/// and a chunk said to be read whole must be the chunk.
fn tap_edge(limits: MeterLimits, parts: &[&[u8]]) -> (Vec<u8>, usage::Metered) {
    let meter = ResponseMeter::new(Api::OpenaiChat, true, limits);
    let mut t = StreamTap::new(meter, true).with_edge(24, 16, 16);
    let mut out = Vec::new();
    for p in parts {
        let mut read = |from: usize, len: usize| {
            let end = from.checked_add(len).expect("read range");
            p.get(from..end).expect("read inside the chunk").to_vec()
        };
        let pushed = t.push_read(p.len(), &mut read);
        if let Some(whole) = &pushed.chunk {
            assert_eq!(whole.as_slice(), *p);
        }
        assert!(pushed.read <= p.len());
        out.extend(pushed.edit.apply(p));
    }
    out.extend(t.end_stream());
    (out, t.finish())
}

/// What the tap reports exactly like the meter (its estimate may differ, and
/// a skimmed event does not update the answering model: when a stream names
/// different models, the latest *parsed* event's wins). `oversized` is left
/// out: it counts events whose parse was cut at the size bound, and an event
/// the tap skims whole inside one chunk is neither buffered nor parsed, so the
/// tap can report fewer (checked as `<=`).
fn exact(m: &usage::Metered) -> impl PartialEq + std::fmt::Debug {
    (
        m.usage,
        m.errors.clone(),
        m.complete,
        m.events,
        m.bytes_seen,
    )
}

fuzz_target!(|data: &[u8]| {
    let [flags, seed, body @ ..] = data else {
        return;
    };
    let format = match flags % 6 {
        0 => Api::OpenaiChat,
        1 => Api::OpenaiResponses,
        2 => Api::OpenaiEmbeddings,
        3 => Api::AnthropicMessages,
        4 => Api::Gemini,
        _ => Api::GeminiInteractions,
    };
    let streaming = flags & 0x08 != 0;
    // Small bounds so the oversized and salvage paths are reached often.
    let limits = if flags & 0x10 != 0 {
        MeterLimits {
            max_event_bytes: 96,
            max_body_bytes: 160,
            salvage_tail_bytes: 48,
        }
    } else {
        MeterLimits::default()
    };
    let parts = chunks(body, *seed);

    if format == Api::OpenaiChat {
        let mut stream = b"data: {\"model\":\"m\",\"choices\":[{\"delta\":{}}]}\n\n".to_vec();
        stream.extend_from_slice(body);
        stream.extend_from_slice(b"\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":9,\"total_tokens\":14}}\n\ndata: [DONE]\n\n");
        let max = usize::from(*seed % 64) + 32;
        let parts: Vec<&[u8]> = stream.chunks(max).collect();
        let (full_out, _, full) = tap(format, limits, &parts);
        let (edge_out, edge) = tap_edge(limits, &parts);
        let key = |m: &usage::Metered| (m.usage.map(|u| (u.output, u.total)), m.complete, m.bytes_seen);
        assert_eq!(key(&edge), key(&full), "edge scanning meters differently");
        if edge.passed_over_bytes == 0 {
            assert_eq!(exact(&edge), exact(&full), "edge scanning without passing over");
            assert_eq!(edge_out, full_out, "edge scanning without passing over");
        }
    }

    let whole = meter(format, streaming, limits, &[body]);
    let split = meter(format, streaming, limits, &parts);
    assert_eq!(whole, split, "metering depends on chunking");
    assert_eq!(whole.bytes_seen, body.len() as u64);

    let reference = meter(format, true, limits, &[body]);
    let (out_whole, n_whole, m_whole) = tap(format, limits, &[body]);
    let (out_split, n_split, m_split) = tap(format, limits, &parts);
    assert_eq!(
        exact(&m_whole),
        exact(&reference),
        "the tap meters differently"
    );
    assert_eq!(
        exact(&m_split),
        exact(&reference),
        "the tap depends on chunking"
    );
    assert_eq!(
        m_split.model_answered, m_whole.model_answered,
        "the model depends on chunking"
    );
    assert!(m_whole.oversized <= reference.oversized && m_split.oversized <= reference.oversized);
    // A block over the size bound is skimmed when it arrives in one chunk
    // and parsed (cut, counted oversized) when split; the tap bounds a
    // block's raw bytes, comments and unknown lines included, which the
    // parser does not count. So skimming is only chunk-independent when no
    // block can exceed the bound: with the default bounds (far above any
    // fuzz input), not the tiny ones.
    if flags & 0x10 == 0 {
        assert_eq!(
            m_split.skimmed_events, m_whole.skimmed_events,
            "skimming depends on chunking"
        );
    }
    // Bodies here are far below the tap's hold bound, so stripping never
    // depends on chunking.
    assert_eq!(out_whole, out_split, "stripping depends on chunking");
    assert_eq!(n_whole, n_split);
    assert!(out_split.len() <= body.len());
    if n_split == 0 {
        assert_eq!(out_split, body, "nothing stripped but output differs");
    }

    // Anthropic iterations: each report replaces the last, so the
    // breakdown is bounded by one report's.
    assert!(whole.iterations.len() <= tollgate::llm::anthropic::MAX_ITERATIONS);
    if let Some(u) = whole.usage {
        let table = pricing::PricingConfig::from_json(
            br#"{"models":{"gpt-4o":{"input":2.5,"cached_input":1.25,"output":10},"claude-opus-4-7":{"input":5,"output":25}},"prefix_match":true,"default":{"input":1e6,"output":1e6}}"#,
        )
        .and_then(|c| c.compile());
        if let Ok(t) = table {
            let model = whole.model_answered.as_deref().unwrap_or("");
            let top = t.cost_as(model, &u, &whole.served);
            let all = t.cost_with_iterations(model, &u, &whole.served, &whole.iterations);
            // Iterations only ever add to the bill, and the sum is rounded once.
            assert!(all.pico >= top.pico);
            assert_eq!(all.micros, pricing::pico_to_micros_ceil(all.pico));
            let billed = whole.billed_usage(u);
            assert!(billed.input_total() >= u.input_total() && billed.output >= u.output);
        }
    }
    if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(body) {
        let _ = inject_include_usage(&mut v);
    }
});
