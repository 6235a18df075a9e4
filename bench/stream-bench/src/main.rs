//! Throughput of the response-body path on a streamed OpenAI chat body, the
//! shape `integration-tests/mock_llm.py` sends for `x-mock-bulk-bytes`: ~20 MB
//! of 200-character content deltas in 64 KiB writes, then the usage-only chunk
//! and `[DONE]`.
//!
//!   cargo run --release -p tollgate-stream-bench [MB] [CHUNK_BYTES] [openai]
//!
//! (`openai`: OpenAI's compact chunk shape with `"usage":null` on every chunk
//! instead of the mock's 200-character deltas.)
//!
//! Also runs as wasm under Node (V8, the engine Envoy uses):
//!   RUSTFLAGS="-C target-feature=+simd128" cargo build --release -p tollgate-stream-bench --target wasm32-wasip1
//!   node bench/run-wasi.mjs $CARGO_TARGET_DIR/wasm32-wasip1/release/tollgate-stream-bench.wasm
//!
//! Prints MB/s for the meter alone and for the meter plus the usage-chunk
//! stripper (what the filter runs when it injected `include_usage`), each with
//! every byte framed and with edge scanning (the filter's path: a large chunk
//! is read from `StreamTap::window` on, as the host contexts does), and checks that the
//! usage was metered exactly and the usage chunk removed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test and bench code: a failure should stop loudly

use std::time::Instant;

use tollgate::llm::Api;
use tollgate::metering::meter::ResponseMeter;
use tollgate::metering::tap::{ChunkEdit, StreamTap};
use tollgate::metering::usage::MeterLimits;

fn sse(json: &str) -> String {
    format!("data: {json}\n\n")
}

/// The mock's bulk stream: (body, number of content events, the usage event).
/// `openai` instead gives OpenAI's own shape: compact JSON, one word per
/// chunk and `"usage":null` on every chunk (as with `include_usage`).
fn bulk_stream(total: usize, openai: bool) -> (Vec<u8>, u64, String) {
    let text = "x".repeat(200);
    let event = if openai {
        sse("{\"id\":\"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT\",\"object\":\"chat.completion.chunk\",\"created\":1727000000,\"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_44709d6fcb\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" word\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}")
    } else {
        sse(&format!(
            "{{\"id\": \"chatcmpl-bulk\", \"object\": \"chat.completion.chunk\", \"created\": 1, \"model\": \"bulk\", \"choices\": [{{\"index\": 0, \"delta\": {{\"content\": \"{text}\"}}, \"finish_reason\": null}}]}}"
        ))
    };
    let per_write = (65536 / event.len()).max(1);
    let mut body = Vec::with_capacity(total + 65536);
    let mut n = 0u64;
    while body.len() < total {
        for _ in 0..per_write {
            body.extend_from_slice(event.as_bytes());
            n += 1;
        }
    }
    let usage = sse(&format!(
        "{{\"id\": \"chatcmpl-bulk\", \"object\": \"chat.completion.chunk\", \"created\": 1, \"model\": \"bulk\", \"choices\": [], \"usage\": {{\"prompt_tokens\": 12, \"completion_tokens\": {n}, \"total_tokens\": {}}}}}",
        n + 12
    ));
    body.extend_from_slice(usage.as_bytes());
    body.extend_from_slice(sse("[DONE]").as_bytes());
    (body, n, usage)
}

/// One pass; `collect` also gathers the forwarded bytes (outside the timing's
/// purpose: the filter forwards in place).
/// `edge`: each chunk goes through `push_read`, which reads only what edge
/// scanning needs (the bytes the host contexts would copy are counted in `read`).
fn run(body: &[u8], chunk: usize, strip: bool, edge: bool, collect: bool) -> (f64, u64, Vec<u8>, u64, usize) {
    let t0 = Instant::now();
    let mut tap = StreamTap::new(ResponseMeter::new(Api::OpenaiChat, true, MeterLimits::default()), strip);
    if !edge {
        tap = tap.with_edge(usize::MAX, 1, 1);
    }
    let mut out = Vec::with_capacity(body.len());
    let mut edits = 0u64;
    let mut read = 0usize;
    for piece in body.chunks(chunk) {
        let edit = if edge {
            // As the host contexts: the tap reads what it needs (copies, as the
            // host's get_buffer does).
            let pushed = tap.push_read(piece.len(), &mut |from, len| piece[from..from + len].to_vec());
            read += pushed.read;
            if pushed.chunk.is_none() && pushed.edit.needs_chunk_bytes(piece.len()) {
                read += piece.len();
            }
            pushed.edit
        } else {
            read += piece.len();
            tap.push(piece)
        };
        if edit != ChunkEdit::Unchanged {
            edits += 1;
        }
        if collect {
            out.extend_from_slice(&edit.apply(piece));
        }
    }
    out.extend_from_slice(&tap.end_stream());
    let metered = tap.finish();
    let secs = t0.elapsed().as_secs_f64();
    let output = metered.usage.map_or(0, |u| u.output);
    (body.len() as f64 / secs / 1e6, output, out, edits, read)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mb: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(20);
    let chunk: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(65536);
    let openai = args.get(3).map(String::as_str) == Some("openai");
    let (body, n, usage_event) = bulk_stream(mb * 1_000_000, openai);
    let want: Vec<u8> = {
        let s = String::from_utf8_lossy(&body);
        s.replacen(&usage_event, "", 1).into_bytes()
    };
    println!("stream: {} bytes, {n} content events, {chunk}-byte chunks", body.len());
    {
        // The scanner alone: the floor of the fast path.
        let mut best = 0f64;
        let mut hits = 0usize;
        for _ in 0..10 {
            let t0 = Instant::now();
            hits = body.chunks(chunk).map(|c| tollgate::metering::scan::Hits::new(c, 0).count()).sum();
            best = best.max(body.len() as f64 / t0.elapsed().as_secs_f64() / 1e6);
        }
        println!("scanner alone: {best:.0} MB/s ({hits} hits)");
    }
    for (strip, edge) in [(false, false), (true, false), (false, true), (true, true)] {
        let mut best = 0f64;
        let mut edited = 0;
        let (_, output, out, _, read) = run(&body, chunk, strip, edge, true);
        assert_eq!(output, n, "completion tokens metered");
        if strip {
            assert!(out == want, "the usage chunk is removed, nothing else");
        } else {
            assert!(out == body, "the stream passes unchanged");
        }
        // Ten passes: under V8 the first ones may still run baseline code.
        for _ in 0..10 {
            let (rate, output, _, edits, _) = run(&body, chunk, strip, edge, false);
            assert_eq!(output, n, "completion tokens metered");
            edited = edits;
            best = best.max(rate);
        }
        let label = match (strip, edge) {
            (false, false) => "meter only, every byte",
            (true, false) => "meter + stripper, every byte",
            (false, true) => "meter only, edge scanning",
            (true, true) => "meter + stripper, edge scanning",
        };
        let pct = read as f64 * 100.0 / body.len() as f64;
        println!("{label}: {best:.0} MB/s ({edited} chunks edited, {pct:.1}% of the bytes read)");
    }
}
