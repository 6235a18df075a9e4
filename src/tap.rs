//! The response-body path of a metered response: one pass over each chunk
//! that meters it and, when the filter turned on `include_usage` itself,
//! removes the usage-only chunk the client did not ask for.
//!
//! OpenAI chat streams (the common case, and the only one the filter rewrites)
//! take a fast path:
//!
//! - Events are framed once, by [`crate::scan::Hits`] (a SIMD pass that finds
//!   line ends and the places where `"usage"` or `"error"` keys can start).
//!   Events inside a chunk are never copied; only an event split across
//!   chunks is carried over.
//! - An event is *skimmed* (counted, not parsed) when it is one
//!   `data: {...}` line with no `"usage"` key other than `"usage": null`, no
//!   `"error"` key other than `"error": null`, and the model that answered is
//!   already known. Such an event can carry neither usage nor an error, so the
//!   provider's usage is still read exactly; it counts as one output token in
//!   the estimate used when usage is missing ([`crate::usage::Metered`]).
//!   Every other event (the first ones, usage chunks, errors, `[DONE]`,
//!   comments, multi-line or typed events) is parsed fully, as before.
//! - Stripping: a usage-only event is dropped from the output. An unfinished
//!   event at the end of a chunk is held back (cut from the chunk, prepended
//!   to the next) only while it may still turn out to be the usage-only chunk:
//!   once its top-level `"choices"` array is seen to be non-empty, or its data
//!   is not a JSON object, it is forwarded at once. A chunk is rewritten only
//!   when something is actually held, released or removed.
//!
//! Other APIs and non-SSE bodies go to [`ResponseMeter`] unchanged.
//!
//! Limits of the byte-level test: a key spelled with JSON escapes (`"\u0075sage"`)
//! is not recognised, so such an event could be skimmed; no provider writes
//! keys that way. A skimmed event that is not valid JSON is not counted as
//! malformed, and does not update the answering model (when a stream names
//! several models, the latest parsed event's wins; the usage chunk is always
//! parsed). A stream that never names a model is parsed in full.

use std::mem;

use crate::scan::Hits;
use crate::sse::SseParser;
use crate::usage::{is_usage_only_chunk, Metered, ResponseMeter, UsageFormat};

/// An unfinished event larger than this is forwarded as it arrives even while
/// it might be the usage-only chunk (which is a few hundred bytes).
pub const MAX_HOLD_BYTES: usize = 64 * 1024;

/// What to forward in place of a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkEdit {
    /// Forward the chunk as it is.
    Unchanged,
    /// Forward `prefix`, then `chunk[from..to]`.
    Splice {
        /// Bytes held back from earlier chunks, released now.
        prefix: Vec<u8>,
        /// First byte of the chunk kept.
        from: usize,
        /// One past the last byte of the chunk kept.
        to: usize,
    },
    /// Forward these bytes instead (a usage-only event was removed from the
    /// middle of the chunk).
    Replace(Vec<u8>),
}

impl ChunkEdit {
    /// The bytes this edit forwards for `chunk`.
    pub fn apply(&self, chunk: &[u8]) -> Vec<u8> {
        match self {
            ChunkEdit::Unchanged => chunk.to_vec(),
            ChunkEdit::Splice { prefix, from, to } => {
                let mut out = prefix.clone();
                out.extend_from_slice(chunk.get(*from..*to).unwrap_or(&[]));
                out
            }
            ChunkEdit::Replace(bytes) => bytes.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Only whitespace seen: the framing is not known yet.
    Sniff,
    /// OpenAI chat SSE: the fast path.
    Fast,
    /// Everything else: the meter frames the body itself.
    Delegate,
}

/// Edits collected while one chunk is processed.
#[derive(Debug, Default)]
struct Out {
    prefix: Vec<u8>,
    /// Ranges of the chunk to drop, in order.
    removed: Vec<(usize, usize)>,
    /// Bytes from here on are held back.
    cut: Option<usize>,
}

/// Meters a response body and, on request, strips the usage-only chunk.
/// See the module documentation.
#[derive(Debug)]
pub struct StreamTap {
    meter: ResponseMeter,
    strip: bool,
    mode: Mode,
    /// Whitespace seen while sniffing (replayed into the fast path).
    ws: Vec<u8>,
    max_event_bytes: usize,
    /// Parses the events that are not skimmed, one complete block at a time.
    parser: SseParser,
    /// Absolute offset of the next chunk's first byte.
    pos: u64,
    /// Absolute offset where the unfinished block starts.
    block_start: u64,
    /// Absolute offset where the current line starts.
    line_start: u64,
    /// Complete non-blank lines in the unfinished block.
    lines: u32,
    /// A usage or error key was seen in the unfinished block (in-chunk part).
    marked: bool,
    /// Bytes of the unfinished block seen in earlier chunks (unless `streaming`).
    carry: Vec<u8>,
    /// The unfinished block outgrew `max_event_bytes`: its bytes go straight
    /// to the parser, which keeps only a bounded tail of it.
    streaming: bool,
    /// `carry` has not been forwarded yet.
    held: bool,
    /// The last byte seen was a CR ending a line; an LF next belongs to it.
    after_cr: bool,
    /// When `after_cr`: the CR ended the blank line closing a block, and
    /// whether that block was removed (so its LF goes too).
    cr_closed: Option<bool>,
    ended: bool,
    stripped: u64,
}

impl StreamTap {
    /// A tap around `meter`; `strip` removes the usage-only chunk of an
    /// OpenAI chat stream (set when the filter injected `include_usage`).
    pub fn new(meter: ResponseMeter, strip: bool) -> Self {
        let max_event_bytes = meter.limits().max_event_bytes;
        let tail = meter.limits().salvage_tail_bytes;
        StreamTap {
            meter,
            strip,
            mode: Mode::Sniff,
            ws: Vec::new(),
            max_event_bytes,
            parser: SseParser::new(max_event_bytes).with_oversized_tail(tail),
            pos: 0,
            block_start: 0,
            line_start: 0,
            lines: 0,
            marked: false,
            carry: Vec::new(),
            streaming: false,
            held: false,
            after_cr: false,
            cr_closed: None,
            ended: false,
            stripped: 0,
        }
    }

    /// Take the next response chunk; says what to forward in its place.
    pub fn push(&mut self, chunk: &[u8]) -> ChunkEdit {
        if self.ended {
            return ChunkEdit::Unchanged;
        }
        match self.mode {
            Mode::Delegate => {
                self.meter.push(chunk);
                ChunkEdit::Unchanged
            }
            Mode::Fast => {
                self.meter.add_bytes(chunk.len());
                self.push_fast(chunk, true)
            }
            Mode::Sniff => {
                let first = chunk.iter().find(|b| !b.is_ascii_whitespace()).copied();
                let Some(first) = first else {
                    self.meter.push(chunk);
                    if self.ws.len().saturating_add(chunk.len()) > MAX_HOLD_BYTES {
                        self.mode = Mode::Delegate;
                        self.ws = Vec::new();
                    } else {
                        self.ws.extend_from_slice(chunk);
                    }
                    return ChunkEdit::Unchanged;
                };
                let fast = self.meter.format() == UsageFormat::OpenAiChat
                    && first != b'{'
                    && first != b'[';
                if !fast {
                    self.mode = Mode::Delegate;
                    self.ws = Vec::new();
                    self.meter.push(chunk);
                    return ChunkEdit::Unchanged;
                }
                self.mode = Mode::Fast;
                // The whitespace went out already: frame it, never hold it.
                let ws = mem::take(&mut self.ws);
                self.push_fast(&ws, false);
                self.meter.add_bytes(chunk.len());
                self.push_fast(chunk, true)
            }
        }
    }

    /// End of stream: what is still held and must be forwarded after the
    /// last chunk (an unterminated usage-only event is dropped instead).
    pub fn end_stream(&mut self) -> Vec<u8> {
        if self.ended {
            return Vec::new();
        }
        self.ended = true;
        if self.mode != Mode::Fast {
            return Vec::new();
        }
        let carry = mem::take(&mut self.carry);
        let held = self.held;
        self.held = false;
        if !self.streaming && !carry.is_empty() {
            self.parser.push(&carry);
        }
        self.parser.finish();
        if self.drain(held) {
            return Vec::new();
        }
        if held {
            carry
        } else {
            Vec::new()
        }
    }

    /// Usage-only chunks removed so far.
    pub fn stripped(&self) -> u64 {
        self.stripped
    }

    /// Whether the meter frames this body itself (not the fast path).
    pub fn is_fast(&self) -> bool {
        self.mode == Mode::Fast
    }

    /// Report what was metered (an unfinished last event included).
    pub fn finish(mut self) -> Metered {
        self.end_stream();
        self.meter.finish()
    }

    fn push_fast(&mut self, chunk: &[u8], emit: bool) -> ChunkEdit {
        let base = self.pos;
        let len = chunk.len();
        if len == 0 {
            return ChunkEdit::Unchanged;
        }
        self.pos = self.pos.saturating_add(len as u64);
        let mut out = Out::default();
        let mut skip_to = 0usize;
        if self.after_cr {
            self.after_cr = false;
            let closed = self.cr_closed.take();
            if chunk.first() == Some(&b'\n') {
                skip_to = 1;
                self.line_start = base.saturating_add(1);
                if let Some(removed) = closed {
                    // The LF ends the blank line that closed the last block.
                    self.block_start = base.saturating_add(1);
                    if removed {
                        out.removed.push((0, 1));
                    }
                }
            }
        }
        for p in Hits::new(chunk, skip_to) {
            if p < skip_to {
                continue;
            }
            let Some(&b) = chunk.get(p) else { break };
            if b == b'"' {
                if !self.marked && marker_at(chunk, p) {
                    self.marked = true;
                }
                continue;
            }
            let (end, cr_at_end) = if b == b'\r' {
                match chunk.get(p.saturating_add(1)) {
                    Some(b'\n') => (p.saturating_add(2), false),
                    Some(_) => (p.saturating_add(1), false),
                    None => (p.saturating_add(1), true),
                }
            } else {
                (p.saturating_add(1), false)
            };
            skip_to = end;
            let blank = base.saturating_add(p as u64) == self.line_start;
            self.line_start = base.saturating_add(end as u64);
            if cr_at_end {
                self.after_cr = true;
            }
            if !blank {
                self.lines = self.lines.saturating_add(1);
                continue;
            }
            let removed = self.end_block(chunk, base, end, &mut out);
            if cr_at_end {
                self.cr_closed = Some(removed);
            }
        }
        self.unfinished(chunk, base, emit, &mut out);
        if !emit {
            return ChunkEdit::Unchanged;
        }
        build_edit(chunk, out)
    }

    /// A blank line ending at `end` (chunk index) closed the unfinished block.
    /// Returns whether the block was removed from the output.
    fn end_block(&mut self, chunk: &[u8], base: u64, end: usize, out: &mut Out) -> bool {
        let start = self.block_start;
        let lines = mem::take(&mut self.lines);
        let marked = mem::take(&mut self.marked);
        self.block_start = base.saturating_add(end as u64);
        if start >= base {
            // The whole block is in this chunk.
            let from = usize::try_from(start - base).unwrap_or(usize::MAX);
            let bytes = chunk.get(from..end).unwrap_or(&[]);
            if lines == 0 {
                return false;
            }
            if lines == 1 && !marked && self.meter.model_known() && is_data_object_line(bytes) {
                self.meter.skimmed_event();
                return false;
            }
            let removed = self.parse_block(bytes, true);
            if removed {
                out.removed.push((from, end));
            }
            return removed;
        }
        // The block began in an earlier chunk.
        let held = mem::replace(&mut self.held, false);
        let head = chunk.get(..end).unwrap_or(&[]);
        if self.streaming {
            self.streaming = false;
            self.parser.push(head);
            self.drain(false);
            return false;
        }
        let held_len = self.carry.len();
        self.carry.extend_from_slice(head);
        let bytes = mem::take(&mut self.carry);
        let removed = if self.meter.model_known() && skimmable(&bytes) {
            self.meter.skimmed_event();
            false
        } else {
            self.parse_block(&bytes, held)
        };
        if removed {
            out.removed.push((0, end));
        } else if held {
            out.prefix
                .extend_from_slice(bytes.get(..held_len).unwrap_or(&[]));
        }
        self.carry = bytes;
        self.carry.clear();
        removed
    }

    /// The bytes of the chunk after its last complete block.
    fn unfinished(&mut self, chunk: &[u8], base: u64, emit: bool, out: &mut Out) {
        let len = chunk.len();
        let end = base.saturating_add(len as u64);
        if self.block_start >= end {
            return;
        }
        let from = usize::try_from(self.block_start.saturating_sub(base)).unwrap_or(0);
        let new = chunk.get(from..).unwrap_or(&[]);
        if self.streaming {
            self.parser.push(new);
            self.drain(false);
            return;
        }
        let held_len = self.carry.len();
        if held_len.saturating_add(new.len()) > self.max_event_bytes {
            // Too big to keep: the parser takes it from here (keeping a tail).
            self.streaming = true;
            self.parser.push(&self.carry);
            self.parser.push(new);
            self.drain(false);
            if mem::replace(&mut self.held, false) {
                out.prefix.extend_from_slice(&self.carry);
            }
            self.carry = Vec::new();
            return;
        }
        self.carry.extend_from_slice(new);
        let may_hold = self.strip && emit && (self.held || self.block_start >= base);
        if may_hold && self.carry.len() <= MAX_HOLD_BYTES && may_be_usage_only(&self.carry) {
            self.held = true;
            out.cut = Some(from);
        } else if mem::replace(&mut self.held, false) {
            out.prefix
                .extend_from_slice(self.carry.get(..held_len).unwrap_or(&[]));
        }
    }

    /// Parse one complete block; returns whether it is the usage-only chunk
    /// and was removed (only when `removable`: nothing of it forwarded yet).
    fn parse_block(&mut self, bytes: &[u8], removable: bool) -> bool {
        self.parser.push(bytes);
        self.drain(removable)
    }

    fn drain(&mut self, removable: bool) -> bool {
        let mut removed = false;
        while let Some(item) = self.parser.next_event() {
            if removable && self.strip {
                if let Ok(ev) = &item {
                    removed |= is_usage_only_chunk(&ev.data);
                }
            }
            self.meter.sse_item(item);
        }
        if removed {
            self.stripped = self.stripped.saturating_add(1);
        }
        removed
    }
}

/// Turn the collected edits into what to forward.
fn build_edit(chunk: &[u8], out: Out) -> ChunkEdit {
    let to = out.cut.unwrap_or(chunk.len());
    match out.removed.as_slice() {
        [] if out.prefix.is_empty() && to == chunk.len() => ChunkEdit::Unchanged,
        [] => ChunkEdit::Splice {
            prefix: out.prefix,
            from: 0,
            to,
        },
        [(0, end)] => ChunkEdit::Splice {
            prefix: out.prefix,
            from: (*end).min(to),
            to,
        },
        ranges => {
            let mut bytes = out.prefix;
            let mut at = 0usize;
            for &(a, b) in ranges {
                bytes.extend_from_slice(chunk.get(at..a.min(to)).unwrap_or(&[]));
                at = b;
            }
            bytes.extend_from_slice(chunk.get(at.min(to)..to).unwrap_or(&[]));
            ChunkEdit::Replace(bytes)
        }
    }
}

/// Whether the quoted word at `p` is a `"usage"` or `"error"` key whose value
/// is not `null` (or cannot be told from the bytes at hand).
#[inline]
fn marker_at(hay: &[u8], p: usize) -> bool {
    let word = hay.get(p..p.saturating_add(7)).unwrap_or(&[]);
    if word != b"\"usage\"" && word != b"\"error\"" {
        return false;
    }
    let rest = hay.get(p.saturating_add(7)..).unwrap_or(&[]);
    let rest = skip_blanks(rest);
    let Some(rest) = rest.strip_prefix(b":") else {
        return true;
    };
    !skip_blanks(rest).starts_with(b"null")
}

fn skip_blanks(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|&&c| c == b' ' || c == b'\t').count();
    b.get(n..).unwrap_or(&[])
}

/// `data:` (one optional space) and a JSON object: the shape of a chat chunk.
fn is_data_object_line(block: &[u8]) -> bool {
    let Some(v) = block.strip_prefix(b"data:") else {
        return false;
    };
    let v = v.strip_prefix(b" ").unwrap_or(v);
    v.first() == Some(&b'{')
}

/// Whether a complete block (from an event split across chunks) may be
/// skimmed: one `data: {...}` line, a blank line, no usage or error key.
fn skimmable(block: &[u8]) -> bool {
    if !is_data_object_line(block) {
        return false;
    }
    let Some(eol) = memchr::memchr2(b'\r', b'\n', block) else {
        return false;
    };
    let rest = block.get(eol..).unwrap_or(&[]);
    if !matches!(
        rest,
        b"\n\n" | b"\r\r" | b"\r\n\r\n" | b"\n\r\n" | b"\r\n\n" | b"\n\r" | b"\r\n\r"
    ) {
        return false;
    }
    let line = block.get(..eol).unwrap_or(&[]);
    !Hits::new(line, 0).any(|p| line.get(p) == Some(&b'"') && marker_at(line, p))
}

/// Whether an unfinished block may still become the usage-only chunk
/// (`"choices": []` and a usage object). False only when its first line is a
/// `data:` line whose JSON is not an object, or whose top-level `"choices"`
/// array already has an element.
fn may_be_usage_only(block: &[u8]) -> bool {
    const FIELD: &[u8] = b"data:";
    if block.len() < FIELD.len() {
        return true;
    }
    let Some(v) = block.strip_prefix(FIELD) else {
        return true;
    };
    let v = v.strip_prefix(b" ").unwrap_or(v);
    let v = skip_blanks(v);
    match v.first() {
        None | Some(b'\r' | b'\n') => return true,
        Some(b'{') => {}
        Some(_) => return false,
    }
    let mut depth = 0u32;
    let mut in_string = false;
    let mut escape = false;
    let mut key_start = None;
    let mut i = 0usize;
    while let Some(&c) = v.get(i) {
        if in_string {
            if escape {
                escape = false;
            } else if c == b'\\' {
                escape = true;
            } else if c == b'"' {
                in_string = false;
                if let Some(s) = key_start.take() {
                    if depth == 1 && v.get(s..i) == Some(&b"choices"[..]) {
                        let after = v.get(i.saturating_add(1)..).unwrap_or(&[]);
                        return choices_may_be_empty(after);
                    }
                }
            }
        } else {
            match c {
                b'"' => {
                    in_string = true;
                    key_start = Some(i.saturating_add(1));
                }
                b'{' | b'[' => depth = depth.saturating_add(1),
                b'}' | b']' => depth = depth.saturating_sub(1),
                b'\r' | b'\n' => return true,
                _ => {}
            }
        }
        i = i.saturating_add(1);
    }
    true
}

/// After the `"choices"` key: false once `: [` is followed by an element.
fn choices_may_be_empty(after: &[u8]) -> bool {
    let after = skip_blanks(after);
    let Some(after) = after.strip_prefix(b":") else {
        // A string value "choices", or not known yet.
        return true;
    };
    let after = skip_blanks(after);
    let Some(after) = after.strip_prefix(b"[") else {
        return after.is_empty()
            || !matches!(
                after.first(),
                Some(b'{' | b'"' | b'0'..=b'9' | b't' | b'f' | b'n' | b'-')
            );
    };
    match skip_blanks(after).first() {
        None | Some(b']' | b'\r' | b'\n') => true,
        Some(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::{MeterLimits, ResponseMeter, UsageFormat};

    const FIXTURES: &[&[u8]] = &[
        include_bytes!("../tests/fixtures/openai_chat_stream_include_usage.sse"),
        include_bytes!("../tests/fixtures/openai_chat_stream_azure.sse"),
        include_bytes!("../tests/fixtures/openai_chat_stream_vllm_continuous.sse"),
        include_bytes!("../tests/fixtures/openai_chat_stream_error.sse"),
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
        let anthropic: &[u8] = include_bytes!("../tests/fixtures/anthropic_stream.sse");
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
}
