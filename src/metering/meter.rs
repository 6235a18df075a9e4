//! How is one response body metered, whatever its framing?
//!
//! Metering one response body: framing it (server-sent events, a JSON array
//! streamed in pieces, or one JSON document), handing each document to its
//! API's reader ([`crate::llm::Api::observe`]) and folding what they say into
//! a [`Metered`].
//!
//! Everything here is pure: no host calls, no clocks, no panics.

use std::mem;

use serde_json::Value;

use crate::llm::observation::{Observation, RawCounts};
use crate::llm::openai_chat::ChatBody;
use crate::llm::Api;
use crate::metering::sse::{SseError, SseEvent, SseParser};
use crate::metering::usage::{Iteration, MeterLimits, Metered, ServedAs};

/// At most this many mid-stream errors are kept, each cut to `MAX_ERROR_LEN`.
const MAX_ERRORS: usize = 8;
const MAX_ERROR_LEN: usize = 512;

/// Render an error object (or string) from a body as one short line.
fn describe_error(v: &Value) -> String {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Object(o) => {
            // Gemini's `status`, OpenAI/Anthropic's `type`, else `code`; a
            // Responses `error` event's own `"type": "error"` says nothing.
            let kind = ["status", "type", "code"].iter().find_map(|k| match o.get(*k) {
                Some(Value::String(s)) if !s.is_empty() && s != "error" => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => None,
            });
            let message = o.get("message").and_then(Value::as_str);
            match (kind, message) {
                (Some(k), Some(m)) => format!("{k}: {m}"),
                (Some(k), None) => k,
                (None, Some(m)) => m.to_string(),
                (None, None) => v.to_string(),
            }
        }
        other => other.to_string(),
    };
    truncate_utf8(text, MAX_ERROR_LEN)
}

fn truncate_utf8(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while cut > 0 && !s.is_char_boundary(cut) {
            cut = cut.saturating_sub(1);
        }
        s.truncate(cut);
    }
    s
}

/// Longest service tier, speed or region kept (they are short words).
const MAX_SERVED_LEN: usize = 64;

/// Everything a meter accumulates, independent of the body's framing: the
/// fold of the [`Observation`]s the API's reader makes of each document.
#[derive(Debug)]
struct Accum {
    api: Api,
    raw: RawCounts,
    model: Option<String>,
    text_bytes: u64,
    skimmed: u64,
    passed_over: u64,
    errors: Vec<String>,
    events: u64,
    oversized: u64,
    malformed: u64,
    salvaged: bool,
    complete: bool,
    served: ServedAs,
    iterations: Vec<Iteration>,
}

impl Accum {
    fn new(api: Api) -> Self {
        Accum {
            api,
            raw: RawCounts::default(),
            model: None,
            text_bytes: 0,
            skimmed: 0,
            passed_over: 0,
            errors: Vec::new(),
            events: 0,
            oversized: 0,
            malformed: 0,
            salvaged: false,
            complete: false,
            served: ServedAs::default(),
            iterations: Vec::new(),
        }
    }

    fn add_text(&mut self, n: u64) {
        self.text_bytes = self.text_bytes.saturating_add(n);
    }

    fn error(&mut self, v: &Value) {
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(describe_error(v));
        }
    }

    fn model(&mut self, m: &str) {
        if !m.is_empty() && self.model.as_deref() != Some(m) {
            self.model = Some(truncate_utf8(m.to_string(), 256));
        }
    }

    /// Folds what one document says into the totals: the latest counts win
    /// field by field, text adds up, errors are kept (bounded).
    fn apply(&mut self, obs: &Observation<'_>) {
        if let Some(err) = obs.error {
            self.error(err);
        }
        if let Some(m) = obs.model {
            self.model(m);
        }
        if let Some(counts) = obs.counts {
            self.raw.merge(counts);
        }
        if let Some(list) = obs.iterations {
            // Each report repeats the whole breakdown so far: the latest wins.
            self.iterations = crate::llm::anthropic::extra_iterations(list);
        }
        self.add_text(obs.text_bytes);
        if obs.complete {
            self.complete = true;
        }
        let keep = |slot: &mut Option<String>, new: Option<&str>| {
            if let Some(w) = new {
                if slot.as_deref() != Some(w) {
                    *slot = Some(truncate_utf8(w.to_string(), MAX_SERVED_LEN));
                }
            }
        };
        keep(&mut self.served.tier, obs.served.tier);
        keep(&mut self.served.speed, obs.served.speed);
        keep(&mut self.served.geo, obs.served.geo);
    }

    /// One SSE event of a stream.
    fn sse_event(&mut self, ev: &SseEvent) {
        self.events = self.events.saturating_add(1);
        let data = ev.data.trim();
        if data == "[DONE]" {
            self.complete = true;
            return;
        }
        if !self.wanted(&ev.event) {
            return;
        }
        if self.model.is_some() {
            // Most chunks of a chat stream carry only a text delta: read them
            // without building a JSON tree (the stream's throughput depends on it).
            if let Some(n) = self.api.delta_text_len(data) {
                self.add_text(n);
                return;
            }
        }
        match serde_json::from_str::<Value>(data) {
            Ok(doc) => {
                if ev.event == "error" && doc.get("error").is_none() && doc.get("type").is_none() {
                    // A typed `event: error` whose data is the error itself.
                    self.error(&doc);
                    return;
                }
                self.document(&doc, true);
            }
            Err(_) => {
                self.malformed = self.malformed.saturating_add(1);
                if ev.event == "error" {
                    self.error(&Value::String(data.to_string()));
                }
            }
        }
    }

    /// Whether an SSE event type can matter, to skip parsing the rest.
    fn wanted(&self, event: &str) -> bool {
        event.is_empty() || event == "error" || event == "message" || self.api.wants_event(event)
    }

    /// One JSON document: a stream chunk (`streamed`) or a whole body.
    fn document(&mut self, doc: &Value, streamed: bool) {
        if !doc.is_object() {
            if let (Value::Array(items), true) = (doc, self.api.streams_json_array()) {
                // A non-SSE stream (Gemini) that arrived as one body.
                for item in items.iter().filter(|i| i.is_object()) {
                    self.document(item, true);
                }
                return;
            }
            self.malformed = self.malformed.saturating_add(1);
            return;
        }
        self.apply(&self.api.observe(doc, streamed));
        if !streamed && self.errors.is_empty() {
            self.complete = true;
        }
    }

    /// A whole body read without a tree ([`Api::read_whole_body`]): what
    /// [`Accum::document`] does with it.
    fn whole_body(&mut self, body: ChatBody) {
        self.apply(&body.observation());
        if self.errors.is_empty() {
            self.complete = true;
        }
    }

    /// Look for the usage object at the end of a document too big to parse:
    /// the last usage key (`"usage":`, Gemini `"usageMetadata":`) in its tail.
    /// Inside a JSON string a quote is always escaped, so the pattern only
    /// matches real keys.
    fn salvage(&mut self, tail: &[u8]) {
        let key = self.api.usage_key();
        let mut end = tail.len();
        while let Some(at) = rfind(tail.get(..end).unwrap_or(&[]), key) {
            end = at;
            let after = tail.get(at.saturating_add(key.len())..).unwrap_or(&[]);
            let after = trim_ascii_start(after);
            let Some(after) = after.strip_prefix(b":") else {
                continue;
            };
            let mut stream = serde_json::Deserializer::from_slice(after).into_iter::<Value>();
            if let Some(Ok(u @ Value::Object(_))) = stream.next() {
                self.raw.merge(self.api.usage_counts(&u));
                self.salvaged = true;
                return;
            }
        }
    }

    fn finish(self, bytes_seen: u64) -> Metered {
        let usage = if self.raw.is_empty() { None } else { Some(self.api.normalise(&self.raw)) };
        Metered {
            usage,
            model_answered: self.model,
            bytes_seen,
            output_text_bytes: self.text_bytes,
            skimmed_events: self.skimmed,
            passed_over_bytes: self.passed_over,
            errors: self.errors,
            events: self.events,
            oversized: self.oversized,
            malformed: self.malformed,
            usage_salvaged: self.salvaged,
            complete: self.complete,
            served: self.served,
            iterations: self.iterations,
        }
    }
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).rposition(|w| w == needle)
}

fn trim_ascii_start(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
    b.get(n..).unwrap_or(&[])
}

/// Append `bytes` to a rolling window holding about the last `cap` bytes.
fn keep_tail(tail: &mut Vec<u8>, bytes: &[u8], cap: usize) {
    if cap == 0 {
        return;
    }
    let from = bytes.len().saturating_sub(cap);
    tail.extend_from_slice(bytes.get(from..).unwrap_or(&[]));
    if tail.len() > cap.saturating_mul(2) {
        let excess = tail.len().saturating_sub(cap);
        tail.drain(..excess);
    }
}

/// Splits a JSON array streamed in pieces (Gemini `streamGenerateContent`
/// without `alt=sse`) into its elements, or yields one top-level object.
#[derive(Debug)]
struct JsonSplitter {
    max: usize,
    tail_cap: usize,
    depth: u32,
    /// Depth at which the current element started (1 inside the array, 0 for
    /// a body that is a bare object).
    elem_depth: u32,
    in_elem: bool,
    in_string: bool,
    escape: bool,
    buf: Vec<u8>,
    skipping: bool,
    tail: Vec<u8>,
}

#[derive(Debug)]
enum Piece {
    /// A complete element; `true` when it was inside a top-level array (one
    /// chunk of a stream) rather than a whole-body object.
    Element(Vec<u8>, bool),
    /// An element that outgrew the bound: the tail of it.
    Oversized(Vec<u8>),
}

impl JsonSplitter {
    fn new(max: usize, tail_cap: usize) -> Self {
        JsonSplitter {
            max,
            tail_cap,
            depth: 0,
            elem_depth: 0,
            in_elem: false,
            in_string: false,
            escape: false,
            buf: Vec::new(),
            skipping: false,
            tail: Vec::new(),
        }
    }

    fn push(&mut self, chunk: &[u8], out: &mut Vec<Piece>) {
        // Elements are copied a run at a time, not byte by byte.
        let mut run_start = 0usize;
        for (i, &b) in chunk.iter().enumerate() {
            if self.in_string {
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => {
                    let starts_elem = !self.in_elem && ((self.depth == 1) || (self.depth == 0 && b == b'{'));
                    if starts_elem {
                        self.in_elem = true;
                        self.elem_depth = self.depth;
                        self.buf.clear();
                        self.tail.clear();
                        self.skipping = false;
                        run_start = i;
                    }
                    self.depth = self.depth.saturating_add(1);
                }
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.in_elem && self.depth == self.elem_depth {
                        let end = i.saturating_add(1);
                        self.take(chunk.get(run_start..end).unwrap_or(&[]));
                        self.in_elem = false;
                        let piece = if self.skipping {
                            Piece::Oversized(self.take_tail())
                        } else {
                            Piece::Element(mem::take(&mut self.buf), self.elem_depth > 0)
                        };
                        out.push(piece);
                        run_start = end;
                    }
                }
                _ => {}
            }
        }
        if self.in_elem {
            self.take(chunk.get(run_start..).unwrap_or(&[]));
        }
    }

    fn take(&mut self, bytes: &[u8]) {
        if self.skipping {
            keep_tail(&mut self.tail, bytes, self.tail_cap);
            return;
        }
        if self.buf.len().saturating_add(bytes.len()) > self.max {
            self.skipping = true;
            keep_tail(&mut self.tail, &self.buf, self.tail_cap);
            keep_tail(&mut self.tail, bytes, self.tail_cap);
            self.buf = Vec::new();
            return;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Exactly the last `tail_cap` bytes of a skipped element, so salvage
    /// does not depend on how the body was chunked.
    fn take_tail(&mut self) -> Vec<u8> {
        let mut tail = mem::take(&mut self.tail);
        let excess = tail.len().saturating_sub(self.tail_cap);
        tail.drain(..excess);
        tail
    }

    /// An element the body ended in the middle of.
    fn finish(&mut self) -> Option<Piece> {
        if !self.in_elem {
            return None;
        }
        self.in_elem = false;
        if self.skipping {
            Some(Piece::Oversized(self.take_tail()))
        } else {
            Some(Piece::Element(mem::take(&mut self.buf), self.elem_depth > 0))
        }
    }
}

/// How a response body is framed, told by its first non-blank byte: `{` is
/// one JSON document, `[` a JSON array of chunks, anything else server-sent
/// events. The one rule both the meter and the stream tap's fast path go by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyShape {
    Json,
    JsonArray,
    Sse,
}

impl BodyShape {
    /// The shape a body starting with `first` (not blank) has.
    pub fn of(first: u8) -> Self {
        match first {
            b'{' => BodyShape::Json,
            b'[' => BodyShape::JsonArray,
            _ => BodyShape::Sse,
        }
    }

    /// The offset and shape of the first non-blank byte of `chunk`.
    pub fn sniff(chunk: &[u8]) -> Option<(usize, Self)> {
        let at = chunk.iter().position(|b| !b.is_ascii_whitespace())?;
        chunk.get(at).map(|&b| (at, BodyShape::of(b)))
    }
}

#[derive(Debug)]
enum Framing {
    /// Nothing but whitespace seen yet.
    Sniffing,
    Sse(SseParser),
    /// A JSON array of chunks (Gemini without `alt=sse`) or one JSON object.
    Json(JsonSplitter),
}

/// Meters one response body. See the module documentation.
///
/// The body's framing is taken from its first non-blank byte, not from the
/// `streaming` flag: `{` is one JSON document, `[` a JSON array of chunks, and
/// anything else server-sent events. So an error body sent to a streaming
/// request, or a Gemini stream without `alt=sse`, is still read correctly.
#[derive(Debug)]
pub struct ResponseMeter {
    limits: MeterLimits,
    streaming: bool,
    framing: Framing,
    acc: Accum,
    bytes_seen: u64,
    pieces: Vec<Piece>,
}

impl ResponseMeter {
    /// A meter for a response of `api`. `streaming` is what the request
    /// asked for; it only sets the size bound of a single JSON body
    /// (`max_body_bytes` when not streaming, `max_event_bytes` per element).
    pub fn new(api: Api, streaming: bool, limits: MeterLimits) -> Self {
        ResponseMeter {
            limits,
            streaming,
            framing: Framing::Sniffing,
            acc: Accum::new(api),
            bytes_seen: 0,
            pieces: Vec::new(),
        }
    }

    /// Feed the next response body chunk.
    pub fn push(&mut self, chunk: &[u8]) {
        self.bytes_seen = self.bytes_seen.saturating_add(chunk.len() as u64);
        let mut chunk = chunk;
        if let Framing::Sniffing = self.framing {
            let Some((skip, shape)) = BodyShape::sniff(chunk) else {
                return;
            };
            chunk = chunk.get(skip..).unwrap_or(&[]);
            self.framing = match shape {
                BodyShape::Json | BodyShape::JsonArray => {
                    let max = if self.streaming && shape == BodyShape::JsonArray {
                        self.limits.max_event_bytes
                    } else {
                        self.limits.max_body_bytes
                    };
                    Framing::Json(JsonSplitter::new(max, self.limits.salvage_tail_bytes))
                }
                BodyShape::Sse => Framing::Sse(
                    SseParser::new(self.limits.max_event_bytes).with_oversized_tail(self.limits.salvage_tail_bytes),
                ),
            };
        }
        match &mut self.framing {
            Framing::Sniffing => {}
            Framing::Sse(parser) => {
                parser.push(chunk);
                drain_sse(parser, &mut self.acc);
            }
            Framing::Json(splitter) => {
                splitter.push(chunk, &mut self.pieces);
                drain_pieces(&mut self.pieces, &mut self.acc);
            }
        }
    }

    /// The bounds this meter was made with.
    pub fn limits(&self) -> MeterLimits {
        self.limits
    }

    /// The API whose response this meter reads.
    pub fn api(&self) -> Api {
        self.acc.api
    }

    /// Whether this meter reads a streamed response.
    pub(crate) fn is_streaming(&self) -> bool {
        self.streaming
    }

    /// Whether the model that answered is known yet (the chat fast path
    /// parses events fully until it is).
    pub(crate) fn model_known(&self) -> bool {
        self.acc.model.is_some()
    }

    /// Count body bytes framed by someone else ([`crate::metering::tap::StreamTap`]).
    pub(crate) fn add_bytes(&mut self, n: usize) {
        self.bytes_seen = self.bytes_seen.saturating_add(n as u64);
    }

    /// One SSE item framed by someone else.
    pub(crate) fn sse_item(&mut self, item: Result<SseEvent, SseError>) {
        sse_item(&mut self.acc, item);
    }

    /// One content event counted without parsing it (see
    /// [`Metered::skimmed_events`]).
    pub(crate) fn skimmed_event(&mut self) {
        self.acc.events = self.acc.events.saturating_add(1);
        self.acc.skimmed = self.acc.skimmed.saturating_add(1);
    }

    /// Body bytes passed over without framing (already counted by
    /// [`ResponseMeter::add_bytes`]; see [`Metered::passed_over_bytes`]).
    pub(crate) fn passed_over(&mut self, n: usize) {
        self.acc.passed_over = self.acc.passed_over.saturating_add(n as u64);
    }

    /// End of body: parse what is left and report.
    pub fn finish(mut self) -> Metered {
        match &mut self.framing {
            Framing::Sniffing => {}
            Framing::Sse(parser) => {
                parser.finish();
                drain_sse(parser, &mut self.acc);
            }
            Framing::Json(splitter) => {
                if let Some(piece) = splitter.finish() {
                    // A cut-off document cannot parse, but its tail may hold usage.
                    self.acc.complete = false;
                    let bytes = match piece {
                        Piece::Element(b, _) | Piece::Oversized(b) => b,
                    };
                    self.acc.malformed = self.acc.malformed.saturating_add(1);
                    let from = bytes.len().saturating_sub(self.limits.salvage_tail_bytes);
                    self.acc.salvage(bytes.get(from..).unwrap_or(&[]));
                }
            }
        }
        self.acc.finish(self.bytes_seen)
    }
}

fn drain_sse(parser: &mut SseParser, acc: &mut Accum) {
    while let Some(item) = parser.next_event() {
        sse_item(acc, item);
    }
}

fn sse_item(acc: &mut Accum, item: Result<SseEvent, SseError>) {
    match item {
        Ok(ev) => acc.sse_event(&ev),
        Err(SseError::Oversized { tail, .. }) => {
            acc.events = acc.events.saturating_add(1);
            acc.oversized = acc.oversized.saturating_add(1);
            acc.salvage(&tail);
        }
    }
}

fn drain_pieces(pieces: &mut Vec<Piece>, acc: &mut Accum) {
    for piece in pieces.drain(..) {
        acc.events = acc.events.saturating_add(1);
        match piece {
            Piece::Element(bytes, false) => match acc.api.read_whole_body(&bytes) {
                Some(body) => acc.whole_body(body),
                None => match serde_json::from_slice::<Value>(&bytes) {
                    Ok(doc) => acc.document(&doc, false),
                    Err(_) => acc.malformed = acc.malformed.saturating_add(1),
                },
            },
            Piece::Element(bytes, in_array) => match serde_json::from_slice::<Value>(&bytes) {
                Ok(doc) => acc.document(&doc, in_array),
                Err(_) => acc.malformed = acc.malformed.saturating_add(1),
            },
            Piece::Oversized(tail) => {
                acc.oversized = acc.oversized.saturating_add(1);
                acc.salvage(&tail);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::openai_chat::read_chat_body;
    use crate::metering::usage::Usage;

    fn u(input_uncached: u64, cache_read: u64, cache_write: u64, output: u64, reasoning: u64, total: u64) -> Usage {
        Usage { input_uncached, cache_read, cache_write, output, reasoning, total, ..Usage::default() }
    }

    struct Case {
        name: &'static str,
        body: &'static [u8],
        api: Api,
        streaming: bool,
        usage: Option<Usage>,
        model: &'static str,
        errors: usize,
        complete: bool,
    }

    macro_rules! fixture {
        ($name:literal) => {
            ($name, include_bytes!(concat!("../../tests/fixtures/", $name)) as &'static [u8])
        };
    }

    fn cases() -> Vec<Case> {
        use Api::*;
        let case = |(name, body): (&'static str, &'static [u8]), api, streaming, usage, model, errors, complete| Case {
            name,
            body,
            api,
            streaming,
            usage,
            model,
            errors,
            complete,
        };
        vec![
            case(
                fixture!("openai_chat_stream_include_usage.sse"),
                OpenaiChat,
                true,
                Some(u(176, 1024, 0, 25, 0, 1225)),
                "gpt-4o-2024-08-06",
                0,
                true,
            ),
            case(
                fixture!("openai_chat_stream_azure.sse"),
                OpenaiChat,
                true,
                Some(u(19, 0, 0, 4, 0, 23)),
                "gpt-4o-2024-11-20",
                0,
                true,
            ),
            case(
                fixture!("openai_chat_stream_vllm_continuous.sse"),
                OpenaiChat,
                true,
                Some(u(42, 0, 0, 4, 0, 46)),
                "meta-llama/Llama-3.1-8B-Instruct",
                0,
                true,
            ),
            case(
                fixture!("openai_chat.json"),
                OpenaiChat,
                false,
                Some(u(512, 1536, 0, 600, 576, 2648)),
                "o3-mini-2025-01-31",
                0,
                true,
            ),
            case(fixture!("openai_chat_stream_error.sse"), OpenaiChat, true, None, "gpt-4o-2024-08-06", 1, false),
            case(
                fixture!("openai_responses_stream.sse"),
                OpenaiResponses,
                true,
                Some(u(52, 2048, 0, 300, 128, 2400)),
                "o4-mini-2025-04-16",
                0,
                true,
            ),
            case(
                fixture!("openai_responses.json"),
                OpenaiResponses,
                false,
                Some(u(52, 2048, 0, 300, 128, 2400)),
                "o4-mini-2025-04-16",
                0,
                true,
            ),
            case(
                fixture!("openai_responses_stream_failed.sse"),
                OpenaiResponses,
                true,
                Some(u(50, 0, 0, 3, 0, 53)),
                "o4-mini-2025-04-16",
                1,
                true,
            ),
            case(
                fixture!("openai_embeddings.json"),
                OpenaiEmbeddings,
                false,
                Some(u(8, 0, 0, 0, 0, 8)),
                "text-embedding-3-small",
                0,
                true,
            ),
            case(
                fixture!("anthropic_stream.sse"),
                AnthropicMessages,
                true,
                Some(u(25, 12000, 1800, 15, 0, 13840)),
                "claude-sonnet-4-5-20250929",
                0,
                true,
            ),
            case(
                fixture!("anthropic.json"),
                AnthropicMessages,
                false,
                Some(u(100, 2000, 0, 250, 0, 2350)),
                "claude-opus-4-1-20250805",
                0,
                true,
            ),
            case(
                fixture!("anthropic_stream_error.sse"),
                AnthropicMessages,
                true,
                Some(u(410, 0, 0, 1, 0, 411)),
                "claude-3-5-haiku-20241022",
                1,
                false,
            ),
            case(
                fixture!("gemini_stream.sse"),
                Gemini,
                true,
                Some(u(404, 4096, 0, 112, 100, 4612)),
                "gemini-2.5-flash",
                0,
                true,
            ),
            case(
                fixture!("gemini_stream_array.json"),
                Gemini,
                true,
                Some(u(404, 4096, 0, 112, 100, 4612)),
                "gemini-2.5-flash",
                0,
                true,
            ),
            case(
                fixture!("gemini.json"),
                Gemini,
                false,
                Some(u(2000, 8000, 0, 1500, 1200, 11500)),
                "gemini-2.5-pro",
                0,
                true,
            ),
            case(
                fixture!("gemini_stream_error.sse"),
                Gemini,
                true,
                Some(u(404, 4096, 0, 100, 100, 4600)),
                "gemini-2.5-flash",
                1,
                false,
            ),
            case(
                fixture!("gemini_stream_array_error.json"),
                Gemini,
                true,
                Some(u(404, 4096, 0, 100, 100, 4600)),
                "gemini-2.5-flash",
                1,
                false,
            ),
            // Usage details and served conditions (see `details_and_conditions`).
            case(
                fixture!("openai_chat_stream_usage_choice_delta.sse"),
                OpenaiChat,
                true,
                Some(Usage { input_audio: 100, ..u(952, 2048, 0, 420, 256, 3420) }),
                "gpt-5.1-2025-11-13",
                0,
                true,
            ),
            case(
                fixture!("openai_chat_audio.json"),
                OpenaiChat,
                false,
                Some(Usage { input_audio: 300, output_audio: 600, ..u(800, 500, 200, 800, 0, 2300) }),
                "gpt-4o-audio-preview-2025-06-03",
                0,
                true,
            ),
            case(
                fixture!("openai_responses_stream_priority.sse"),
                OpenaiResponses,
                true,
                Some(u(200_000, 100_000, 0, 2000, 1500, 302_000)),
                "gpt-5.4-2026-03-05",
                0,
                true,
            ),
            case(
                fixture!("anthropic_stream_cache_1h_tools.sse"),
                AnthropicMessages,
                true,
                Some(Usage {
                    cache_write_1h: 4000,
                    web_search_requests: 2,
                    web_fetch_requests: 1,
                    ..u(40, 20_000, 5600, 350, 0, 25_990)
                }),
                "claude-sonnet-4-5-20250929",
                0,
                true,
            ),
            case(
                fixture!("anthropic_fast.json"),
                AnthropicMessages,
                false,
                Some(u(1000, 0, 0, 500, 200, 1500)),
                "claude-opus-4-6",
                0,
                true,
            ),
            case(
                fixture!("gemini_vertex_audio.json"),
                Gemini,
                false,
                Some(Usage { input_audio: 1000, output_audio: 400, ..u(4050, 1000, 0, 500, 100, 5550) }),
                "gemini-2.5-flash",
                0,
                true,
            ),
            // `/v1/responses/compact`: a `response.compaction` object, which names no model.
            case(
                fixture!("openai_responses_compact.json"),
                OpenaiResponses,
                false,
                Some(u(32_000, 16_000, 0, 2200, 1800, 50_200)),
                "",
                0,
                true,
            ),
            // Gemini Interactions: cached tokens inside the input total, thoughts on top of output.
            case(
                fixture!("gemini_interactions.json"),
                GeminiInteractions,
                false,
                Some(u(1104, 4096, 0, 500, 380, 5700)),
                "gemini-3-pro-preview",
                0,
                true,
            ),
            case(
                fixture!("gemini_interactions_stream.sse"),
                GeminiInteractions,
                true,
                Some(Usage { input_audio: 200, ..u(282, 2048, 0, 78, 64, 2408) }),
                "gemini-3-flash-preview",
                0,
                true,
            ),
            // Iterations outside the top-level totals (see `iterations_...`): `usage` is the top level.
            case(
                fixture!("anthropic_iterations.json"),
                AnthropicMessages,
                false,
                Some(u(1200, 30_000, 0, 900, 0, 32_100)),
                "claude-sonnet-4-6",
                0,
                true,
            ),
            case(
                fixture!("anthropic_stream_iterations.sse"),
                AnthropicMessages,
                true,
                Some(u(1200, 30_000, 0, 900, 0, 32_100)),
                "claude-sonnet-4-6",
                0,
                true,
            ),
            case(
                fixture!("gemini_stream_provisioned.sse"),
                Gemini,
                true,
                Some(u(100, 0, 0, 20, 0, 120)),
                "gemini-2.5-pro",
                0,
                true,
            ),
        ]
    }

    #[test]
    fn details_and_conditions() {
        let served = |tier: Option<&str>, speed: Option<&str>, geo: Option<&str>| ServedAs {
            tier: tier.map(str::to_string),
            speed: speed.map(str::to_string),
            geo: geo.map(str::to_string),
        };
        let want = [
            ("openai_chat_stream_usage_choice_delta.sse", served(Some("priority"), None, None)),
            ("openai_chat_audio.json", served(Some("standard"), None, None)),
            // `response.created` says `auto`; the final event says what served it.
            ("openai_responses_stream_priority.sse", served(Some("priority"), None, None)),
            ("anthropic_stream_cache_1h_tools.sse", served(Some("standard"), None, Some("us"))),
            ("anthropic_fast.json", served(Some("priority"), Some("fast"), Some("global"))),
            ("gemini_vertex_audio.json", served(Some("priority"), None, None)),
            ("gemini_stream_provisioned.sse", served(Some("provisioned"), None, None)),
            ("openai_chat_stream_azure.sse", served(None, None, None)),
        ];
        let cases = cases();
        for (name, served) in want {
            let c = cases.iter().find(|c| c.name == name).expect(name);
            assert_eq!(meter(c).served, served, "{name}");
        }
    }

    #[test]
    fn iterations_outside_the_totals_are_summed_and_priced_at_their_own_models() {
        use crate::metering::pricing::{PricedBy, PricingConfig};
        use crate::metering::usage::{Iteration, IterationKind};
        let want = vec![
            Iteration { kind: IterationKind::Compaction, model: None, usage: u(180_000, 0, 0, 3500, 0, 183_500) },
            Iteration {
                kind: IterationKind::Advisor,
                model: Some("claude-opus-4-7".into()),
                usage: Usage { cache_write_1h: 2000, ..u(32_000, 0, 2000, 1500, 0, 35_500) },
            },
        ];
        let table = PricingConfig::from_json(
            br#"{"models": {"claude-sonnet-4-6": {"input": 3, "cached_input": 0.3, "output": 15},
                            "claude-opus-4-7": {"input": 5, "cache_write": 6.25, "cache_write_1h": 10, "output": 25}},
                 "default": {"input": 100, "output": 100}}"#,
        )
        .and_then(|c| c.compile())
        .expect("pricing");
        let cases = cases();
        for name in ["anthropic_iterations.json", "anthropic_stream_iterations.sse"] {
            let c = cases.iter().find(|c| c.name == name).expect(name);
            let m = meter(c);
            assert_eq!(m.iterations, want, "{name}");
            let top = m.usage.expect("usage");
            // Summed: the top level (the `message` entries) plus compaction and advisor.
            let all = m.billed_usage(top);
            assert_eq!(
                (all.input_uncached, all.cache_read, all.cache_write, all.cache_write_1h, all.output, all.total),
                (213_200, 30_000, 2000, 2000, 5900, 251_100),
                "{name}"
            );
            // Sonnet: 1200 x 3 + 30000 x 0.3 + 900 x 15 = 26100 µ$ (top level),
            // 180000 x 3 + 3500 x 15 = 592500 µ$ (compaction, on the response's model);
            // Opus: 32000 x 5 + 2000 x 10 (1-hour writes) + 1500 x 25 = 217500 µ$ (advisor).
            let cost = table.cost_with_iterations("claude-sonnet-4-6", &top, &m.served, &m.iterations);
            assert_eq!(cost.micros, 26_100 + 592_500 + 217_500, "{name}");
            assert_eq!(cost.pico, 836_100 * 1_000_000, "{name}");
            assert_eq!(cost.priced_by, PricedBy::Exact);
            // An advisor on a model missing from the table is priced, and flagged, at the default.
            let mut unknown = m.iterations.clone();
            if let Some(it) = unknown.get_mut(1) {
                it.model = Some("claude-unlisted".into());
            }
            let cost = table.cost_with_iterations("claude-sonnet-4-6", &top, &m.served, &unknown);
            assert_eq!(cost.priced_by, PricedBy::Default);
            assert_eq!(cost.micros, 26_100 + 592_500 + (34_000 + 1500) * 100);
        }
        // The latest report wins: the interim `message_delta` had only the compaction.
        let c = cases.iter().find(|c| c.name == "anthropic_stream_iterations.sse").expect("stream");
        let body = std::str::from_utf8(c.body).expect("utf8");
        let cut = body.rfind("event: message_delta").expect("final delta");
        let m = meter_chunks(c, MeterLimits::default(), &[body.get(..cut).unwrap_or_default().as_bytes()]);
        assert_eq!(m.iterations, want.get(..1).unwrap_or_default());
        // `message` and `fallback_message` entries are inside the top-level totals,
        // unknown types are taken to be too; a missing model is the response's.
        let doc: Value = serde_json::from_str(
            r#"[{"type": "message", "model": "a", "input_tokens": 5}, {"type": "fallback_message", "model": "b", "input_tokens": 6},
                {"type": "something_new", "input_tokens": 7}, {"type": "advisor_message", "model": "", "input_tokens": 8}]"#,
        )
        .expect("json");
        let got = crate::llm::anthropic::extra_iterations(&doc);
        assert_eq!(got.len(), 1);
        assert_eq!(
            got.first().map(|i| (i.kind, i.model.clone(), i.usage.input_uncached)),
            Some((IterationKind::Advisor, None, 8))
        );
    }

    fn meter_chunks(c: &Case, limits: MeterLimits, chunks: &[&[u8]]) -> Metered {
        let mut m = ResponseMeter::new(c.api, c.streaming, limits);
        for chunk in chunks {
            m.push(chunk);
        }
        m.finish()
    }

    fn meter(c: &Case) -> Metered {
        meter_chunks(c, MeterLimits::default(), &[c.body])
    }

    #[test]
    fn fixtures_meter_as_documented() {
        for c in cases() {
            let m = meter(&c);
            assert_eq!(m.usage, c.usage, "{}: usage", c.name);
            assert_eq!(m.model_answered.as_deref().unwrap_or_default(), c.model, "{}: model", c.name);
            assert_eq!(m.errors.len(), c.errors, "{}: errors {:?}", c.name, m.errors);
            assert_eq!(m.complete, c.complete, "{}: complete", c.name);
            assert_eq!(m.bytes_seen, c.body.len() as u64, "{}", c.name);
            assert_eq!(m.oversized, 0, "{}", c.name);
            assert_eq!(m.malformed, 0, "{}", c.name);
            assert!(!m.usage_salvaged, "{}", c.name);
            assert!(m.events > 0, "{}", c.name);
        }
    }

    #[test]
    fn fixtures_give_same_result_at_every_split() {
        for c in cases() {
            let whole = meter(&c);
            let body = c.body;
            for i in 0..=body.len() {
                let (a, b) = body.split_at(i);
                let got = meter_chunks(&c, MeterLimits::default(), &[a, b]);
                assert_eq!(got, whole, "{} split at {i}", c.name);
            }
            let step = body.len() / 37 + 1;
            for i in (0..=body.len()).step_by(step) {
                for j in (i..=body.len()).step_by(step) {
                    let (a, rest) = body.split_at(i);
                    let (b, d) = rest.split_at(j - i);
                    let got = meter_chunks(&c, MeterLimits::default(), &[a, b, d]);
                    assert_eq!(got, whole, "{} split at {i},{j}", c.name);
                }
            }
            let bytes: Vec<&[u8]> = body.chunks(1).collect();
            assert_eq!(meter_chunks(&c, MeterLimits::default(), &bytes), whole, "{} byte by byte", c.name);
        }
    }

    #[test]
    fn chat_bodies_read_without_a_tree_meter_as_the_full_path_does() {
        let full = |api: Api, body: &str| {
            let mut acc = Accum::new(api);
            match serde_json::from_str::<Value>(body) {
                Ok(doc) => acc.document(&doc, false),
                Err(_) => acc.malformed += 1,
            }
            acc.finish(0)
        };
        let fast = |api: Api, body: &str| {
            let mut acc = Accum::new(api);
            acc.whole_body(read_chat_body(body.as_bytes())?);
            Some(acc.finish(0))
        };
        let taken = [
            r#"{"id":"c","model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"Hello \"there\" \u00e9"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":4},"completion_tokens_details":{"reasoning_tokens":2}}}"#,
            r#"{"model":"m","choices":[{"message":{"content":[{"type":"text","text":"ab"},{"type":"image"},"x",7,{"text":["cd",{"text":"e"}]}],"reasoning_content":"rr","reasoning":null,"refusal":"no"}}]}"#,
            r#"{"model":"m","choices":[{"delta":null,"text":"ignored"},{"delta":null,"message":{"content":"not read"}},{"text":"legacy"},{"message":null},{"message":{"content":{"text":"obj"}}},{}]}"#,
            r#"{"choices":null,"usage":null,"error":null,"model":""}"#,
            r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,-0.2,3e-5]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#,
            r#"  {"model":"m","usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3},"choices":[]}"#,
        ];
        for body in taken {
            for format in [Api::OpenaiChat, Api::OpenaiEmbeddings] {
                let got = fast(format, body).unwrap_or_else(|| panic!("not taken: {body}"));
                assert_eq!(got, full(format, body), "{body}");
            }
        }
        // Bodies the full path reads: an error, tool calls, arrays where
        // objects belong, duplicate keys, other shapes.
        let left = [
            r#"{"error":{"message":"bad","type":"invalid_request_error"}}"#,
            r#"{"choices":[{"message":{"content":null,"tool_calls":[{"function":{"arguments":"{}"}}]}}]}"#,
            r#"{"choices":[["x"]]}"#,
            r#"{"choices":[{"message":["x"]}]}"#,
            r#"{"model":"a","model":"b"}"#,
            r#"{"model":7}"#,
            r#"[{"model":"m"}]"#,
            r#""text""#,
            r#"{"model":"m","choices":[{"message":{"content":[{"text":"a","text":"b"}]}}]}"#,
            r#"{"model":"m""#,
        ];
        for body in left {
            assert!(fast(Api::OpenaiChat, body).is_none(), "{body}");
        }
    }

    #[test]
    fn error_messages_name_the_error() {
        let by_name = |name: &str| {
            let c = cases().into_iter().find(|c| c.name == name).expect("case");
            meter(&c).errors
        };
        assert_eq!(by_name("anthropic_stream_error.sse"), vec!["overloaded_error: Overloaded".to_string()]);
        assert_eq!(
            by_name("gemini_stream_error.sse"),
            vec!["UNAVAILABLE: The model is overloaded. Please try again later.".to_string()]
        );
        assert_eq!(
            by_name("openai_responses_stream_failed.sse"),
            vec!["server_error: The model failed to generate a response.".to_string()]
        );
        assert!(by_name("openai_chat_stream_error.sse")[0].starts_with("server_error: The server"));
        assert!(by_name("gemini_stream_array_error.json")[0].starts_with("INTERNAL: "));
    }

    #[test]
    fn output_text_bytes_count_content_and_tool_arguments() {
        let c = &cases()[0];
        // "Hello" + " wörld ✓" + `{"city":` + `"Paris"}`
        assert_eq!(meter(c).output_text_bytes, 5 + 11 + 8 + 8);
        let m = meter(&cases()[4]);
        assert_eq!(m.output_text_bytes, 28);
        assert_eq!(m.estimated_output_tokens(), 7);
    }

    #[test]
    fn anthropic_cumulative_output_is_not_summed() {
        let c = cases().into_iter().find(|c| c.name == "anthropic_stream.sse").expect("case");
        let usage = meter(&c).usage.expect("usage");
        // message_start says 1, message_delta 9 then 15: the last one wins.
        assert_eq!(usage.output, 15);
    }

    #[test]
    fn anthropic_newer_message_delta_repeats_input_counts() {
        let stream = concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-x\",\"usage\":{\"input_tokens\":10,\"cache_read_input_tokens\":5,\"output_tokens\":1}}}\n\n",
            "event: message_delta\n",
            "data: {\"type\":\"message_delta\",\"usage\":{\"input_tokens\":10,\"cache_read_input_tokens\":5,\"cache_creation_input_tokens\":null,\"output_tokens\":30}}\n\n",
        );
        let mut m = ResponseMeter::new(Api::AnthropicMessages, true, MeterLimits::default());
        m.push(stream.as_bytes());
        let got = m.finish();
        assert_eq!(got.usage, Some(u(10, 5, 0, 30, 0, 45)));
        assert!(!got.complete);
    }

    #[test]
    fn responses_error_event_is_reported() {
        let stream = b"event: error\ndata: {\"type\":\"error\",\"code\":\"ERR_SOMETHING\",\"message\":\"Something went wrong\",\"param\":null,\"sequence_number\":1}\n\n";
        let mut m = ResponseMeter::new(Api::OpenaiResponses, true, MeterLimits::default());
        m.push(stream);
        let got = m.finish();
        assert_eq!(got.errors, vec!["ERR_SOMETHING: Something went wrong".to_string()]);
        assert_eq!(got.usage, None);
    }

    #[test]
    fn error_body_to_a_streaming_request_is_read_as_json() {
        let body = br#"  {"error": {"message": "Rate limit reached", "type": "tokens", "param": null, "code": "rate_limit_exceeded"}}"#;
        let mut m = ResponseMeter::new(Api::OpenaiChat, true, MeterLimits::default());
        m.push(body);
        let got = m.finish();
        assert_eq!(got.errors, vec!["tokens: Rate limit reached".to_string()]);
        assert!(!got.complete);
    }

    #[test]
    fn oversized_final_event_usage_is_salvaged_from_its_tail() {
        let c = cases().into_iter().find(|c| c.name == "openai_responses_stream.sse").expect("case");
        let limits = MeterLimits { max_event_bytes: 700, ..MeterLimits::default() };
        let whole = meter_chunks(&c, limits, &[c.body]);
        assert_eq!(whole.usage, c.usage);
        assert_eq!(whole.oversized, 1);
        assert!(whole.usage_salvaged);
        for i in (0..c.body.len()).step_by(13) {
            let (a, b) = c.body.split_at(i);
            assert_eq!(meter_chunks(&c, limits, &[a, b]), whole, "split at {i}");
        }
    }

    #[test]
    fn oversized_body_usage_is_salvaged_from_its_tail() {
        let body = format!(
            "{{\"model\":\"gpt-4o\",\"choices\":[{{\"message\":{{\"content\":\"{}\"}}}}],\"usage\":{{\"prompt_tokens\":9,\"completion_tokens\":3000,\"total_tokens\":3009}}}}",
            "a \\\"usage\\\": {}".repeat(1000)
        );
        let limits = MeterLimits { max_body_bytes: 4096, max_event_bytes: 4096, salvage_tail_bytes: 256 };
        let mut m = ResponseMeter::new(Api::OpenaiChat, false, limits);
        for piece in body.as_bytes().chunks(100) {
            m.push(piece);
        }
        let got = m.finish();
        assert_eq!(got.usage, Some(u(9, 0, 0, 3000, 0, 3009)));
        assert!(got.usage_salvaged);
        assert_eq!(got.oversized, 1);
    }

    #[test]
    fn truncated_body_is_not_complete() {
        let c = cases().into_iter().find(|c| c.name == "openai_chat.json").expect("case");
        let cut = c.body.len() - 10;
        let got = meter_chunks(&c, MeterLimits::default(), &[&c.body[..cut]]);
        assert!(!got.complete);
        assert_eq!(got.malformed, 1);
        // The usage object itself was complete before the cut, so it is salvaged.
        assert_eq!(got.usage, c.usage);
    }

    #[test]
    fn garbage_is_counted_not_fatal() {
        let mut m = ResponseMeter::new(Api::OpenaiChat, true, MeterLimits::default());
        m.push(b"data: {not json\n\ndata: [1,2]\n\ndata: \"s\"\n\n");
        let got = m.finish();
        assert_eq!(got.usage, None);
        assert_eq!(got.malformed, 3);
        assert_eq!(got.events, 3);
    }

    #[test]
    fn provider_total_is_kept_even_if_parts_disagree() {
        // Gemini's OpenAI-compatible endpoint: prompt + completion != total.
        let body = br#"{"model":"gemini-2.5-flash","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":40}}"#;
        let mut m = ResponseMeter::new(Api::OpenaiChat, false, MeterLimits::default());
        m.push(body);
        assert_eq!(m.finish().usage, Some(u(10, 0, 0, 5, 0, 40)));
    }

    #[test]
    fn empty_body_has_no_usage() {
        let m = ResponseMeter::new(Api::Gemini, true, MeterLimits::default());
        let got = m.finish();
        assert_eq!(got, Metered::default());
    }

    fn tap(strip: bool) -> crate::metering::tap::StreamTap {
        crate::metering::tap::StreamTap::new(ResponseMeter::new(Api::OpenaiChat, true, MeterLimits::default()), strip)
    }

    fn strip_all(chunks: &[&[u8]]) -> (Vec<u8>, u64) {
        let mut t = tap(true);
        let mut out = Vec::new();
        for c in chunks {
            out.extend(t.push(c).apply(c));
        }
        out.extend(t.end_stream());
        (out, t.stripped())
    }

    /// The stream with the usage-only event's block removed.
    fn without_usage_block(stream: &[u8]) -> Vec<u8> {
        let text = std::str::from_utf8(stream).expect("utf8");
        let at = text.find("\"choices\":[],\"usage\":{").expect("usage chunk");
        let start = text[..at].rfind("data: ").expect("data line");
        let rest = &text[start..];
        let end = ["\r\n\r\n", "\n\n", "\r\r"]
            .iter()
            .filter_map(|t| rest.find(t).map(|i| i + t.len()))
            .min()
            .expect("terminator");
        let mut out = stream[..start].to_vec();
        out.extend_from_slice(&rest.as_bytes()[end..]);
        out
    }

    #[test]
    fn stripper_removes_exactly_the_usage_event_at_every_split() {
        for name in ["openai_chat_stream_include_usage.sse", "openai_chat_stream_azure.sse"] {
            let c = cases().into_iter().find(|c| c.name == name).expect("case");
            let want = without_usage_block(c.body);
            assert!(want.len() < c.body.len());
            for i in 0..=c.body.len() {
                let (a, b) = c.body.split_at(i);
                let (got, stripped) = strip_all(&[a, b]);
                assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&want), "{name} split at {i}");
                assert_eq!(stripped, 1);
            }
            let bytes: Vec<&[u8]> = c.body.chunks(1).collect();
            assert_eq!(strip_all(&bytes).0, want, "{name} byte by byte");
            // The meter, fed the original bytes, still sees the usage.
            assert_eq!(meter(&c).usage, c.usage);
        }
    }

    #[test]
    fn stripper_with_lone_cr_line_endings() {
        let stream: &[u8] =
            b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\r\rdata: {\"choices\":[],\"usage\":{\"total_tokens\":3}}\r\rdata: [DONE]\r\r";
        let want: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\r\rdata: [DONE]\r\r";
        for i in 0..=stream.len() {
            let (a, b) = stream.split_at(i);
            assert_eq!(strip_all(&[a, b]).0, want, "split at {i}");
        }
    }

    #[test]
    fn stripper_passes_other_streams_unchanged() {
        for name in ["openai_chat_stream_vllm_continuous.sse", "openai_chat_stream_error.sse", "anthropic_stream.sse"] {
            let c = cases().into_iter().find(|c| c.name == name).expect("case");
            for i in (0..=c.body.len()).step_by(7) {
                let (a, b) = c.body.split_at(i);
                let (got, stripped) = strip_all(&[a, b]);
                assert_eq!(got, c.body, "{name} split at {i}");
                assert_eq!(stripped, 0);
            }
        }
    }

    #[test]
    fn stripper_holds_only_what_may_be_the_usage_chunk() {
        use crate::metering::tap::ChunkEdit;
        let mut t = tap(true);
        let first: &[u8] = b"data: {\"id\":\"a\",\"choices\":[{\"delta\":{}}]}\n\ndata: {\"id\":\"b\",";
        // The second event cannot be told from the usage chunk yet: held.
        assert_eq!(t.push(first), ChunkEdit::Splice { prefix: Vec::new(), from: 0, to: 43 });
        let second: &[u8] = b"\"choices\":[{\"delta\":{}}]}\n\n: keep-alive\n";
        // Its choices are not empty: released. The comment may still be anything.
        let edit = t.push(second);
        assert_eq!(edit.apply(second), b"data: {\"id\":\"b\",\"choices\":[{\"delta\":{}}]}\n\n".to_vec());
        // A partial event whose choices are visibly non-empty is not held.
        let third: &[u8] = b"\ndata: {\"choices\":[{\"delta\":{\"content\":\"x";
        assert_eq!(
            t.push(third).apply(third),
            b": keep-alive\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"x".to_vec()
        );
        assert_eq!(t.push(b"\"}}]}\n\n"), ChunkEdit::Unchanged);
        assert_eq!(t.end_stream(), b"");
        assert_eq!(t.stripped(), 0);
    }

    #[test]
    fn stripper_drops_unterminated_final_usage_chunk() {
        let (got, stripped) = strip_all(&[b"data: x\n\ndata: {\"choices\":[],\"usage\":{}}"]);
        assert_eq!(got, b"data: x\n\n");
        assert_eq!(stripped, 1);
    }

    #[test]
    fn stripper_hold_is_bounded() {
        let mut t = tap(true);
        let mut out = Vec::new();
        let mut held_max = 0usize;
        let mut sent = 0usize;
        for piece in std::iter::once(&b": "[..]).chain(std::iter::repeat_n(&[b'x'; 1000][..], 100)) {
            let edit = t.push(piece);
            out.extend(edit.apply(piece));
            sent += piece.len();
            held_max = held_max.max(sent - out.len());
        }
        assert!(held_max <= crate::metering::tap::MAX_HOLD_BYTES, "held {held_max}");
        let last: &[u8] = b"\n\ndata: {\"choices\":[],\"usage\":{}}\n\n";
        out.extend(t.push(last).apply(last));
        out.extend(t.end_stream());
        assert_eq!(out.len(), 2 + 100 * 1000 + 2);
        assert_eq!(t.stripped(), 1);
    }

    #[test]
    fn a_body_is_shaped_by_its_first_non_blank_byte() {
        assert_eq!(BodyShape::sniff(b" \r\n{\"a\":1}"), Some((3, BodyShape::Json)));
        assert_eq!(BodyShape::sniff(b"[{}]"), Some((0, BodyShape::JsonArray)));
        assert_eq!(BodyShape::sniff(b"\ndata: {}"), Some((1, BodyShape::Sse)));
        assert_eq!(BodyShape::sniff(b": ping\n\n"), Some((0, BodyShape::Sse)));
        assert_eq!(BodyShape::sniff(b" \t\r\n"), None);
        assert_eq!(BodyShape::sniff(b""), None);
    }
}
