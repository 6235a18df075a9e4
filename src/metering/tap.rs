//! What happens to each response chunk as it passes: metered, and edited only to hide an injected usage chunk?
//!
//! The response-body path of a metered response: one pass over each chunk
//! that meters it and, when the filter turned on `include_usage` itself,
//! removes the usage-only chunk the client did not ask for.
//!
//! OpenAI chat streams (the common case, and the only one the filter rewrites)
//! take a fast path:
//!
//! - Events are framed once, by [`crate::metering::scan::Hits`] (a SIMD pass that finds
//!   line ends and the places where `"usage"` or `"error"` keys can start).
//!   Events inside a chunk are never copied; only an event split across
//!   chunks is carried over.
//! - An event is *skimmed* (counted, not parsed) when it is one
//!   `data: {...}` line with no `"usage"` key other than `"usage": null`, no
//!   `"error"` key other than `"error": null`, and the model that answered is
//!   already known. Such an event can carry neither usage nor an error, so the
//!   provider's usage is still read exactly; it counts as one output token in
//!   the estimate used when usage is missing ([`crate::metering::usage::Metered`]).
//!   Every other event (the first ones, usage chunks, errors, `[DONE]`,
//!   comments, multi-line or typed events) is parsed fully, as before.
//! - Stripping: a usage-only event is dropped from the output. An unfinished
//!   event at the end of a chunk is held back (cut from the chunk, prepended
//!   to the next) only while it may still turn out to be the usage-only chunk:
//!   once its top-level `"choices"` array is seen to be non-empty, or its data
//!   is not a JSON object, it is forwarded at once. A chunk is rewritten only
//!   when something is actually held, released or removed.
//! - Edge scanning of large chunks ([`StreamTap::window`],
//!   [`StreamTap::push_window`]). Once the stream is past its first
//!   [`EDGE_HEAD_BYTES`] and the answering model is known, a chunk of at least
//!   [`EDGE_MIN_CHUNK_BYTES`] may be handed over as only its last
//!   `EDGE_TAIL_BYTES + EDGE_SEARCH_BYTES` bytes. The tap looks in them for
//!   the last event boundary (the end of a blank line; CR, LF and CRLF each
//!   end a line, a CRLF is one line end, and a line end the window's bytes do
//!   not prove, such as an LF at its first byte, is not used) at or before
//!   `chunk_len - EDGE_TAIL_BYTES`. Every event that ends at or before it, and
//!   the rest of the event carried from the last chunk, is *passed over*: its
//!   bytes are counted ([`Metered::passed_over_bytes`]) and forwarded as they
//!   are, and it is neither framed nor parsed nor stripped (a held event is
//!   released). Framing resumes at the boundary in a clean start-of-event
//!   state, so every event that ends in the last `EDGE_TAIL_BYTES` of the
//!   chunk, and the one that straddles that point whatever its size, is
//!   skimmed, parsed, stripped or held exactly as above. With no boundary in
//!   the window the chunk is read and framed in full, as it is while an
//!   oversized event is streamed to the parser, or right after a removed
//!   event's closing CR (its LF may start the chunk).
//!
//!   [`StreamTap::push_read`] drives this for the host contexts, through a reader of
//!   the chunk: it reads the window when one applies, and a large chunk that
//!   starts before the end of the head (the whole stream can arrive as one
//!   chunk when Envoy reads the upstream late) is taken as two: its first
//!   bytes up to the end of the head, read and framed in full, then the rest,
//!   from its window if the head named the model. The two edits are joined
//!   into one over the chunk.
//!
//!   Usage stays exact for OpenAI chat streams (and Azure OpenAI and vLLM,
//!   which stream the same way): the model is named by the first events,
//!   which are framed in full, and the usage chunk, an error (after which
//!   providers end the stream) and `[DONE]` are the last events, so they are
//!   in a chunk's tail; vLLM's cumulative usage on every chunk is
//!   latest-wins, and the latest is in the last chunk's tail. What is given
//!   up: a usage or error event followed, in the same chunk of at least
//!   `EDGE_MIN_CHUNK_BYTES`, by `EDGE_TAIL_BYTES` or more of other events is
//!   not read (nor, if it is the usage-only chunk, stripped). Passed-over
//!   events count in the estimate used when usage is missing, at the average
//!   size of the events framed ([`Metered::passed_over_events`]).
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

use crate::llm::openai_chat::is_usage_only_chunk;
use crate::llm::Api;
use crate::metering::meter::{BodyShape, ResponseMeter};
use crate::metering::scan::Hits;
use crate::metering::sse::SseParser;
use crate::metering::usage::Metered;

/// An unfinished event larger than this is forwarded as it arrives even while
/// it might be the usage-only chunk (which is a few hundred bytes).
pub const MAX_HOLD_BYTES: usize = 64 * 1024;

/// Edge scanning: the first this many bytes of a stream are always framed in
/// full (they name the model and carry the first events).
pub const EDGE_HEAD_BYTES: usize = 16 * 1024;
/// Edge scanning: every event that ends less than this many bytes before the
/// end of a chunk is parsed (or skimmed) as on the full path.
pub const EDGE_TAIL_BYTES: usize = 8 * 1024;
/// Edge scanning: how far before the tail the boundary of the event that
/// straddles it is looked for; the host contexts reads
/// `EDGE_TAIL_BYTES + EDGE_SEARCH_BYTES` bytes of a large chunk.
pub const EDGE_SEARCH_BYTES: usize = 8 * 1024;
/// Edge scanning: chunks shorter than this are framed in full (so at most
/// half of a chunk is read).
pub const EDGE_MIN_CHUNK_BYTES: usize = 2 * (EDGE_TAIL_BYTES + EDGE_SEARCH_BYTES);

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
    /// Forward `prefix`, then each range `chunk[a..b]` in order. What
    /// [`StreamTap::push_window`] gives where the full path gives `Replace`:
    /// it did not see the whole chunk, so it names the parts kept.
    Ranges {
        /// Bytes held back from earlier chunks, released now.
        prefix: Vec<u8>,
        /// Parts of the chunk kept, in order, not overlapping.
        keep: Vec<(usize, usize)>,
    },
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
            ChunkEdit::Ranges { prefix, keep } => {
                let mut out = prefix.clone();
                for &(a, b) in keep {
                    out.extend_from_slice(chunk.get(a..b).unwrap_or(&[]));
                }
                out
            }
        }
    }

    /// Whether writing this edit back over a chunk of `chunk_len` bytes needs
    /// the chunk's own bytes. The host can only drain the front of a chunk,
    /// prepend and append, so an edit that keeps anything other than a suffix
    /// of the chunk rewrites it from its first byte: a host context that read only a
    /// window of the chunk must then read all of it.
    pub fn needs_chunk_bytes(&self, chunk_len: usize) -> bool {
        match self {
            ChunkEdit::Unchanged | ChunkEdit::Replace(_) => false,
            ChunkEdit::Splice { to, .. } => *to < chunk_len,
            ChunkEdit::Ranges { .. } => true,
        }
    }
}

/// What [`StreamTap::push_read`] did with a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// What to forward in place of the chunk (offsets are the chunk's).
    pub edit: ChunkEdit,
    /// The whole chunk, when it was read in full (to write `edit` back
    /// without reading it again).
    pub chunk: Option<Vec<u8>>,
    /// How many bytes of the chunk were read: fewer than its length when it
    /// was edge-scanned.
    pub read: usize,
}

impl ChunkEdit {
    /// `(prefix, kept ranges)` of this edit over a chunk of `len` bytes.
    fn into_parts(self, len: usize) -> (Vec<u8>, Vec<(usize, usize)>) {
        match self {
            ChunkEdit::Unchanged => (Vec::new(), vec![(0, len)]),
            ChunkEdit::Splice { prefix, from, to } => (prefix, if from < to { vec![(from, to)] } else { Vec::new() }),
            ChunkEdit::Replace(bytes) => (bytes, Vec::new()),
            ChunkEdit::Ranges { prefix, keep } => (prefix, keep),
        }
    }

    /// The simplest edit that forwards `prefix`, then the `keep` ranges of a
    /// chunk of `len` bytes.
    fn from_parts(prefix: Vec<u8>, keep: Vec<(usize, usize)>, len: usize) -> ChunkEdit {
        match keep.as_slice() {
            [] => ChunkEdit::Replace(prefix),
            [(0, to)] if prefix.is_empty() && *to == len => ChunkEdit::Unchanged,
            &[(from, to)] => ChunkEdit::Splice { prefix, from, to },
            _ => ChunkEdit::Ranges { prefix, keep },
        }
    }
}

/// One edit for a chunk of `len` bytes taken as two: `first` over its first
/// `head.len()` bytes (`head`), then `second` over the rest. Bytes cannot be
/// forwarded between two kept ranges, so when the second part releases held
/// bytes, or the first part is edited, the first part's output is spelled
/// out (it is the stream's head, a few KiB).
fn join_edits(first: ChunkEdit, head: &[u8], second: ChunkEdit, len: usize) -> ChunkEdit {
    let h = head.len();
    let (p2, k2) = second.into_parts(len.saturating_sub(h));
    let (prefix, mut keep) = if first == ChunkEdit::Unchanged && p2.is_empty() {
        (Vec::new(), vec![(0, h)])
    } else {
        let mut p = first.apply(head);
        p.extend_from_slice(&p2);
        (p, Vec::new())
    };
    for (a, b) in k2 {
        let (a, b) = (a.saturating_add(h), b.saturating_add(h));
        match keep.last_mut() {
            Some(last) if last.1 == a => last.1 = b,
            _ if a < b => keep.push((a, b)),
            _ => {}
        }
    }
    ChunkEdit::from_parts(prefix, keep, len)
}

/// Where edge scanning applies; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Edge {
    head: usize,
    tail: usize,
    search: usize,
    min_chunk: usize,
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
    edge: Edge,
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
            edge: Edge {
                head: EDGE_HEAD_BYTES,
                tail: EDGE_TAIL_BYTES,
                search: EDGE_SEARCH_BYTES,
                min_chunk: EDGE_MIN_CHUNK_BYTES,
            },
        }
    }

    /// Edge scanning with other bounds than the `EDGE_*` constants (for
    /// tests, fuzzing and benchmarks): a stream head of `head` bytes, a tail
    /// of `tail` bytes, a boundary search of `search` bytes before it (each
    /// at least 1), chunks of at least `2 * (tail + search)` bytes.
    /// `usize::MAX` as `head` turns edge scanning off.
    pub fn with_edge(mut self, head: usize, tail: usize, search: usize) -> Self {
        let (tail, search) = (tail.max(1), search.max(1));
        self.edge = Edge { head, tail, search, min_chunk: tail.saturating_add(search).saturating_mul(2) };
        self
    }

    /// Edge scanning: for a chunk of `chunk_len` bytes, the offset from which
    /// the caller may read it and hand it to [`StreamTap::push_window`]
    /// instead of [`StreamTap::push`]; `None` when the whole chunk must be
    /// read. See the module documentation.
    pub fn window(&self, chunk_len: usize) -> Option<usize> {
        let e = &self.edge;
        let usable = self.mode == Mode::Fast
            && !self.ended
            // An oversized event's bytes go to the parser as they come.
            && !self.streaming
            && chunk_len >= e.min_chunk
            && self.pos >= e.head as u64
            && self.meter.model_known()
            // The chunk's first byte may be the LF of a removed block's CRLF.
            && !(self.after_cr && self.cr_closed == Some(true));
        let from = chunk_len.checked_sub(e.tail.saturating_add(e.search))?;
        (usable && from > 0).then_some(from)
    }

    /// Edge scanning: take a chunk of `chunk_len` bytes of which the caller
    /// read only `tail == chunk[from..]`, `from` as [`StreamTap::window`]
    /// gave it. Events that end at least `EDGE_TAIL_BYTES` before the chunk's
    /// end (and the event carried from the last chunk) are passed over: counted
    /// but neither framed nor parsed, and forwarded as they are. Framing
    /// resumes at the last event boundary at or before that point and goes on
    /// exactly as [`StreamTap::push`] would. The edit's offsets are the full
    /// chunk's; it may need the chunk's bytes ([`ChunkEdit::needs_chunk_bytes`]).
    ///
    /// `None` (nothing taken) when no event boundary is found in `tail` before
    /// the last `EDGE_TAIL_BYTES`, or edge scanning does not apply: call
    /// [`StreamTap::push`] with the whole chunk.
    pub fn push_window(&mut self, chunk_len: usize, from: usize, tail: &[u8]) -> Option<ChunkEdit> {
        if self.window(chunk_len) != Some(from) || from.checked_add(tail.len()) != Some(chunk_len) {
            return None;
        }
        let limit = chunk_len.saturating_sub(self.edge.tail).saturating_sub(from);
        let b = last_boundary(tail, limit)?;
        let base = self.pos;
        self.pos = base.saturating_add(chunk_len as u64);
        self.meter.add_bytes(chunk_len);
        self.meter.passed_over(from.saturating_add(b));
        let mut out = Out::default();
        // The event carried over is forwarded unparsed: release what was held.
        if mem::replace(&mut self.held, false) {
            out.prefix = mem::take(&mut self.carry);
        } else {
            self.carry.clear();
        }
        let wbase = base.saturating_add(from as u64);
        let start = wbase.saturating_add(b as u64);
        self.block_start = start;
        self.line_start = start;
        self.lines = 0;
        self.marked = false;
        self.after_cr = false;
        self.cr_closed = None;
        self.frame(tail, wbase, b, &mut out);
        self.unfinished(tail, wbase, true, &mut out);
        Some(window_edit(chunk_len, from, out))
    }

    /// Take the next response chunk of `chunk_len` bytes, reading through
    /// `read(from, len)` only what is needed: the last bytes of a large chunk
    /// ([`StreamTap::window`]), the stream's head and the last bytes of a
    /// large chunk that starts the stream, or else the whole chunk. The
    /// outcome is what [`StreamTap::push`] of the whole chunk would give
    /// with edge scanning; a read that comes back short of `len` (the host
    /// could not read) falls back to reading the whole chunk.
    pub fn push_read(&mut self, chunk_len: usize, read: &mut dyn FnMut(usize, usize) -> Vec<u8>) -> Pushed {
        if let Some(from) = self.window(chunk_len) {
            let tail = read(from, chunk_len.saturating_sub(from));
            if let Some(edit) = self.push_window(chunk_len, from, &tail) {
                return Pushed { edit, chunk: None, read: tail.len() };
            }
        }
        if let Some(h) = self.head_split(chunk_len) {
            let head = read(0, h);
            if head.len() == h {
                // The head as a chunk of its own, then the rest (which is
                // past the head, so it is not split again).
                let first = self.push(&head);
                let rest_len = chunk_len.saturating_sub(h);
                let rest = self.push_read(rest_len, &mut |from, len| read(h.saturating_add(from), len));
                let edit = join_edits(first, &head, rest.edit, chunk_len);
                let chunk = match rest.chunk {
                    Some(r) if edit.needs_chunk_bytes(chunk_len) => {
                        let mut c = head;
                        c.extend_from_slice(&r);
                        Some(c)
                    }
                    _ => None,
                };
                return Pushed { edit, chunk, read: h.saturating_add(rest.read) };
            }
        }
        let chunk = read(0, chunk_len);
        let edit = self.push(&chunk);
        Pushed { edit, read: chunk.len(), chunk: Some(chunk) }
    }

    /// Edge scanning of a large chunk that starts before the end of the
    /// stream's head: how many of its first bytes are the rest of the head,
    /// when what follows them is large enough for [`StreamTap::window`].
    /// Only for OpenAI chat streams (a JSON body is never edge-scanned, so
    /// it is read in one piece).
    fn head_split(&self, chunk_len: usize) -> Option<usize> {
        let e = &self.edge;
        if self.ended
            || self.mode == Mode::Delegate
            || self.streaming
            || self.meter.api() != Api::OpenaiChat
            || !self.meter.is_streaming()
        {
            return None;
        }
        let h = usize::try_from((e.head as u64).checked_sub(self.pos)?).ok()?;
        (h > 0 && chunk_len.checked_sub(h)? >= e.min_chunk).then_some(h)
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
                let Some((_, shape)) = BodyShape::sniff(chunk) else {
                    self.meter.push(chunk);
                    if self.ws.len().saturating_add(chunk.len()) > MAX_HOLD_BYTES {
                        self.mode = Mode::Delegate;
                        self.ws = Vec::new();
                    } else {
                        self.ws.extend_from_slice(chunk);
                    }
                    return ChunkEdit::Unchanged;
                };
                let fast = self.meter.api() == Api::OpenaiChat && shape == BodyShape::Sse;
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
        self.frame(chunk, base, skip_to, &mut out);
        self.unfinished(chunk, base, emit, &mut out);
        if !emit {
            return ChunkEdit::Unchanged;
        }
        build_edit(chunk, out)
    }

    /// Frame `chunk` (whose first byte is at absolute offset `base`) from
    /// index `skip_to` on, closing every block that ends in it.
    fn frame(&mut self, chunk: &[u8], base: u64, skip_to: usize, out: &mut Out) {
        let mut skip_to = skip_to;
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
            let removed = self.end_block(chunk, base, end, out);
            if cr_at_end {
                self.cr_closed = Some(removed);
            }
        }
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
            out.prefix.extend_from_slice(bytes.get(..held_len).unwrap_or(&[]));
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
            out.prefix.extend_from_slice(self.carry.get(..held_len).unwrap_or(&[]));
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
                    // Judged as a held block would be too: with two top-level
                    // `"choices"` (serde keeps the last), the first one decides,
                    // so stripping never depends on where the chunks split.
                    removed |=
                        is_usage_only_chunk(&ev.data) && may_be_usage_only(&[b"data: ", ev.data.as_bytes()].concat());
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
        [] => ChunkEdit::Splice { prefix: out.prefix, from: 0, to },
        [(0, end)] => ChunkEdit::Splice { prefix: out.prefix, from: (*end).min(to), to },
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

/// [`build_edit`] for a window starting at `from` of a chunk of `len` bytes:
/// the edits' offsets are the window's; the result's are the chunk's.
fn window_edit(len: usize, from: usize, out: Out) -> ChunkEdit {
    let to = out.cut.map_or(len, |c| c.saturating_add(from));
    if out.removed.is_empty() {
        if out.prefix.is_empty() && to == len {
            return ChunkEdit::Unchanged;
        }
        return ChunkEdit::Splice { prefix: out.prefix, from: 0, to };
    }
    let mut keep = Vec::with_capacity(out.removed.len().saturating_add(1));
    let mut at = 0usize;
    for (a, b) in out.removed {
        let a = a.saturating_add(from).min(to);
        if a > at {
            keep.push((at, a));
        }
        at = b.saturating_add(from);
    }
    if to > at {
        keep.push((at, to));
    }
    ChunkEdit::Ranges { prefix: out.prefix, keep }
}

/// The end of the last blank line (an SSE event boundary) in `hay` that ends
/// at or before `limit`, among those the bytes of `hay` alone prove to be one:
/// a CR, an LF and a CRLF each end a line, a CR followed by LF is one line end
/// (so a CR right before `hay`'s end, or an LF at its start, is not trusted).
fn last_boundary(hay: &[u8], limit: usize) -> Option<usize> {
    let mut end = limit.min(hay.len());
    while let Some(i) = memchr::memrchr2(b'\r', b'\n', hay.get(..end)?) {
        let b = i.saturating_add(1);
        if is_boundary(hay, b) {
            return Some(b);
        }
        end = i;
    }
    None
}

/// Whether a blank line ends right before `hay[b]` (see [`last_boundary`]).
fn is_boundary(hay: &[u8], b: usize) -> bool {
    let at = |back: usize| b.checked_sub(back).and_then(|i| hay.get(i)).copied();
    let eol = |c: Option<u8>| matches!(c, Some(b'\r' | b'\n'));
    match at(1) {
        // LF after LF (alone or ending a CRLF); CRLF after any line end.
        Some(b'\n') => match at(2) {
            Some(b'\n') => true,
            Some(b'\r') => eol(at(3)),
            _ => false,
        },
        // A CR not followed by LF, after any line end.
        Some(b'\r') => matches!(hay.get(b), Some(&c) if c != b'\n') && eol(at(2)),
        _ => false,
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
    // The line's end, then the blank line's: each is a CRLF, a lone CR or
    // an LF (a CR is taken with the LF after it, as the framing does), so
    // `}\r\r\n` (a lone CR, then a CRLF) is one line and a blank line, as
    // it is when the block arrives in one chunk.
    let rest = block.get(eol..).unwrap_or(&[]);
    let blank = rest.get(line_end_len(rest)..).unwrap_or(&[]);
    if blank.is_empty() || line_end_len(blank) != blank.len() {
        return false;
    }
    let line = block.get(..eol).unwrap_or(&[]);
    !Hits::new(line, 0).any(|p| line.get(p) == Some(&b'"') && marker_at(line, p))
}

/// The length of the line end `b` starts with: 2 for a CRLF, 1 for a CR not
/// followed by LF or an LF, 0 for none.
fn line_end_len(b: &[u8]) -> usize {
    match b {
        [b'\r', b'\n', ..] => 2,
        [b'\r' | b'\n', ..] => 1,
        _ => 0,
    }
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

/// After the `"choices"` key: false once `: [` is followed by an element
/// that is not an object, or an object that cannot be a choice that says
/// nothing (see [`crate::llm::openai_chat::is_usage_only_chunk`]).
fn choices_may_be_empty(after: &[u8]) -> bool {
    let after = skip_blanks(after);
    let Some(after) = after.strip_prefix(b":") else {
        // A string value "choices", or not known yet.
        return true;
    };
    let after = skip_blanks(after);
    let Some(after) = after.strip_prefix(b"[") else {
        return after.is_empty()
            || !matches!(after.first(), Some(b'{' | b'"' | b'0'..=b'9' | b't' | b'f' | b'n' | b'-'));
    };
    let after = skip_blanks(after);
    match after.first() {
        None | Some(b']' | b'\r' | b'\n') => true,
        Some(b'{') => element_may_say_nothing(after),
        Some(_) => false,
    }
}

/// Longest choice that says nothing, with generous spacing
/// (`{"index":0,"delta":{},"logprobs":null,"finish_reason":null}` is 59).
const MAX_SILENT_CHOICE: usize = 160;

/// Whether the first element (an object) of a choices array may still be a
/// choice that says nothing: the bytes seen of it are short and hold no
/// string value other than keys (every key and value of such a choice is a
/// key, a number, `{}` or `null`) and no nested object with content.
fn element_may_say_nothing(elem: &[u8]) -> bool {
    let seen = elem.len().min(MAX_SILENT_CHOICE);
    let mut depth = 0u32;
    let mut in_string = false;
    let mut escape = false;
    let mut expect_key = false;
    for &c in elem.iter().take(seen) {
        if in_string {
            if escape {
                escape = false;
            } else if c == b'\\' {
                escape = true;
            } else if c == b'"' {
                in_string = false;
            }
            continue;
        }
        match c {
            b'"' => {
                // A string where a value goes (`"finish_reason":"stop"`), or
                // a key inside a nested object (a delta with content).
                if !expect_key || depth > 1 {
                    return false;
                }
                in_string = true;
                expect_key = false;
            }
            b'{' => {
                depth = depth.saturating_add(1);
                expect_key = true;
            }
            b'}' => {
                if depth == 0 {
                    return false;
                }
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return true;
                }
            }
            b',' => expect_key = depth == 1,
            b'[' => return false,
            b'\r' | b'\n' => return true,
            _ => {}
        }
    }
    seen < MAX_SILENT_CHOICE
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::Api;
    use crate::metering::meter::ResponseMeter;
    use crate::metering::usage::MeterLimits;

    const FIXTURES: &[&[u8]] = &[
        include_bytes!("../../tests/fixtures/openai_chat_stream_include_usage.sse"),
        include_bytes!("../../tests/fixtures/openai_chat_stream_azure.sse"),
        include_bytes!("../../tests/fixtures/openai_chat_stream_vllm_continuous.sse"),
        include_bytes!("../../tests/fixtures/openai_chat_stream_error.sse"),
    ];

    fn chat_meter(limits: MeterLimits) -> ResponseMeter {
        ResponseMeter::new(Api::OpenaiChat, true, limits)
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
        for extra in ["", ",\"usage\":null", ",\"usage\": {\"prompt_tokens\":7,\"completion_tokens\":1}"] {
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
        // Last, so the indices above stay put: a usage chunk with a silent choice.
        out.push(include_bytes!("../../tests/fixtures/openai_chat_stream_usage_choice_delta.sse").to_vec());
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
            if crate::llm::openai_chat::is_usage_only_chunk(data) {
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
                    assert_eq!(exact(&got), exact(&want), "stream {n} split at {i} strip {strip}");
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
    fn a_usage_chunk_whose_choice_says_nothing_is_stripped_at_every_split() {
        let s: &[u8] = include_bytes!("../../tests/fixtures/openai_chat_stream_usage_choice_delta.sse");
        let limits = MeterLimits::default();
        for i in 0..=s.len() {
            let (a, b) = s.split_at(i);
            let (out, got, stripped) = run(&[a, b], true, limits);
            let out = String::from_utf8(out).expect("utf8");
            assert!(!out.contains("\"usage\":{"), "split at {i}");
            assert!(out.contains("\"finish_reason\":\"stop\"") && out.ends_with("data: [DONE]\n\n"), "split at {i}");
            assert_eq!(stripped, 1, "split at {i}");
            let u = got.usage.expect("usage");
            assert_eq!((u.input_total(), u.cache_read, u.output, u.reasoning, u.total), (3000, 2048, 420, 256, 3420));
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
    fn skimming_does_not_depend_on_where_a_lone_cr_splits() {
        // A content event whose data line ends with a lone CR and whose blank
        // line is a CRLF (`}\r\r\n`), then a stray LF (an empty blank line):
        // skimmed whole, and split at every byte (the event is carried over
        // when the split is inside it). Every pair of line ends too.
        let content = |i: usize| {
            format!("data: {{\"id\":\"c\",\"model\":\"m-1\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"w{i}\"}}}}]}}")
        };
        let usage_only =
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":4,\"total_tokens\":11}}\n\n";
        let mut streams = vec![(content(0) + "\n\n" + &content(1) + "\r\r\n\n" + &content(2) + "\n\n").into_bytes()];
        for a in ["\n", "\r\n", "\r"] {
            for b in ["\n", "\r\n", "\r"] {
                if a == "\r" && b == "\n" {
                    continue; // That is one CRLF line end.
                }
                let mut s = content(0) + "\n\n";
                for i in 1..4 {
                    s += &(content(i) + a + b);
                }
                s += usage_only;
                s += "data: [DONE]\n\n";
                streams.push(s.into_bytes());
            }
        }
        let limits = MeterLimits::default();
        for (n, s) in streams.iter().enumerate() {
            let want = reference(s, limits);
            let (_, whole, _) = run(&[s], false, limits);
            assert_eq!(exact(&whole), exact(&want), "stream {n} whole");
            assert!(whole.skimmed_events >= 1, "stream {n}");
            for strip in [false, true] {
                for i in 0..=s.len() {
                    let (a, b) = s.split_at(i);
                    let (_, got, _) = run(&[a, b], strip, limits);
                    assert_eq!(exact(&got), exact(&want), "stream {n} split at {i}");
                    assert_eq!(got.skimmed_events, whole.skimmed_events, "stream {n} split at {i} strip {strip}");
                }
                let bytes: Vec<&[u8]> = s.chunks(1).collect();
                let (_, got, _) = run(&bytes, strip, limits);
                assert_eq!(got.skimmed_events, whole.skimmed_events, "stream {n} byte by byte");
            }
        }
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
        let limits = MeterLimits { max_event_bytes: 256, ..MeterLimits::default() };
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
            assert_eq!(out.len(), 2 * big.len() + "data: [DONE]\n\n".len(), "chunks of {size}");
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
        let body = br#"{"model":"gpt-4o","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
        let mut t = StreamTap::new(chat_meter(MeterLimits::default()), true);
        assert_eq!(t.push(b"  \n"), ChunkEdit::Unchanged);
        assert_eq!(t.push(body), ChunkEdit::Unchanged);
        assert!(!t.is_fast());
        assert_eq!(t.finish().usage.map(|u| u.total), Some(7));
        let anthropic: &[u8] = include_bytes!("../../tests/fixtures/anthropic_stream.sse");
        let m = ResponseMeter::new(Api::AnthropicMessages, true, MeterLimits::default());
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

    /// The tap over `chunks` the way the host contexts drives it: each chunk through
    /// `push_read`, from a reader that checks every read is inside the chunk.
    /// Returns what it forwarded, what it metered, the chunks edge-scanned
    /// (read only in part), and those of them that released a held event.
    fn run_edge(
        chunks: &[&[u8]],
        strip: bool,
        limits: MeterLimits,
        head: usize,
        tail: usize,
    ) -> (Vec<u8>, Metered, usize, usize) {
        let mut t = StreamTap::new(chat_meter(limits), strip).with_edge(head, tail, tail);
        let mut out = Vec::new();
        let (mut windowed, mut released) = (0, 0);
        for c in chunks {
            let was_held = t.held;
            let mut read = |from: usize, len: usize| {
                let end = from.checked_add(len).expect("read range");
                c.get(from..end).expect("read inside the chunk").to_vec()
            };
            let pushed = t.push_read(c.len(), &mut read);
            if let Some(whole) = &pushed.chunk {
                assert_eq!(whole.as_slice(), *c);
            }
            if pushed.read < c.len() {
                windowed += 1;
                released += usize::from(was_held);
            }
            // An edit that does not say it needs the chunk's bytes only
            // drains its front and prepends.
            if !pushed.edit.needs_chunk_bytes(c.len()) {
                assert!(matches!(pushed.edit, ChunkEdit::Unchanged | ChunkEdit::Splice { .. } | ChunkEdit::Replace(_)));
            }
            out.extend(pushed.edit.apply(c));
        }
        out.extend(t.end_stream());
        (out, t.finish(), windowed, released)
    }

    /// What edge scanning reports exactly like the full path.
    fn edge_exact(m: &Metered) -> impl PartialEq + std::fmt::Debug {
        (m.usage, m.model_answered.clone(), m.errors.clone(), m.complete, m.oversized, m.usage_salvaged, m.bytes_seen)
    }

    /// An OpenAI chat stream of `n` content events of varied sizes (the usage
    /// key as `null`, absent or, vLLM style, cumulative on every chunk), the
    /// usage-only chunk and `[DONE]`, with `eol` line ends.
    fn bulk(n: usize, usage: &str, eol: &str) -> Vec<u8> {
        let mut s = String::new();
        for i in 0..n {
            let extra = match usage {
                "null" => ",\"usage\":null".to_string(),
                "vllm" => format!(",\"usage\":{{\"prompt_tokens\":7,\"completion_tokens\":{i}}}"),
                _ => String::new(),
            };
            let text = "t".repeat(1 + (i * 37) % 90);
            s += &format!("data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"m-1\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}},\"finish_reason\":null}}]{extra}}}\n\n");
        }
        s += &format!("data: {{\"id\":\"c\",\"model\":\"m-1\",\"choices\":[],\"usage\":{{\"prompt_tokens\":7,\"completion_tokens\":{n},\"total_tokens\":{}}}}}\n\n", n + 7);
        s += "data: [DONE]\n\n";
        s.replace('\n', eol).into_bytes()
    }

    /// `first` bytes, then pieces of `size`.
    fn split(s: &[u8], first: usize, size: usize) -> Vec<&[u8]> {
        let (a, rest) = s.split_at(first.min(s.len()));
        let mut v = vec![a];
        v.extend(rest.chunks(size));
        v
    }

    /// Edge scanning against the full path, for `stream` cut every way in
    /// `cuts`; returns how many chunks were windowed in all.
    fn check_edge(stream: &[u8], cuts: &[(usize, usize)], head: usize, tail: usize) -> usize {
        let limits = MeterLimits::default();
        let mut windowed_all = 0;
        for &(first, size) in cuts {
            let chunks = split(stream, first, size);
            for strip in [false, true] {
                let (want_out, want, _) = run(&chunks, strip, limits);
                let (out, got, windowed, _) = run_edge(&chunks, strip, limits, head, tail);
                let what = format!("first {first} size {size} strip {strip}");
                assert_eq!(edge_exact(&got), edge_exact(&want), "{what}");
                assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(&want_out), "{what}");
                assert_eq!(got.passed_over_bytes > 0, windowed > 0, "{what}");
                windowed_all += windowed;
            }
        }
        windowed_all
    }

    fn cuts(len: usize, sizes: &[usize]) -> Vec<(usize, usize)> {
        let mut v = Vec::new();
        for &size in sizes {
            for first in (0..size.min(len)).step_by(size / 13 + 1) {
                v.push((first, size));
            }
        }
        v
    }

    #[test]
    fn edge_scanning_meters_and_strips_like_the_full_path() {
        for eol in ["\n", "\r\n", "\r"] {
            for usage in ["", "null", "vllm"] {
                let s = bulk(120, usage, eol);
                let want = reference(&s, MeterLimits::default());
                assert!(want.usage.is_some());
                let windowed = check_edge(&s, &cuts(s.len(), &[256, 301, 700, 1500, 4096]), 512, 64);
                assert!(windowed > 0, "{eol:?} {usage}");
                // Usage exact, with the middle of the stream passed over.
                let chunks = split(&s, 600, 2000);
                let (_, got, windowed, _) = run_edge(&chunks, true, MeterLimits::default(), 512, 400);
                assert_eq!(got.usage, want.usage, "{eol:?} {usage}");
                assert!(windowed > 0 && got.passed_over_bytes > s.len() as u64 / 2);
            }
        }
    }

    #[test]
    fn edge_scanning_at_the_real_bounds() {
        let s = bulk(12_000, "null", "\n");
        let want = reference(&s, MeterLimits::default());
        let chunks = split(&s, 20_000, 300_000);
        let (want_out, full, _) = run(&chunks, true, MeterLimits::default());
        let mut t = StreamTap::new(chat_meter(MeterLimits::default()), true);
        let mut out = Vec::new();
        let mut read = 0;
        for c in &chunks {
            if let Some(from) = t.window(c.len()) {
                assert_eq!(from, c.len() - EDGE_TAIL_BYTES - EDGE_SEARCH_BYTES);
                if let Some(edit) = t.push_window(c.len(), from, &c[from..]) {
                    read += c.len() - from;
                    out.extend(edit.apply(c));
                    continue;
                }
            }
            read += c.len();
            out.extend(t.push(c).apply(c));
        }
        out.extend(t.end_stream());
        let got = t.finish();
        assert_eq!(edge_exact(&got), edge_exact(&want));
        assert_eq!(out, want_out);
        assert!(read < s.len() / 8, "read {read} of {}", s.len());
        assert!(got.passed_over_bytes > s.len() as u64 * 3 / 4);
        // The estimate for a stream without usage stays near the full path's.
        let (est, full_est) = (got.estimated_output_tokens(), full.estimated_output_tokens());
        assert!(est.abs_diff(full_est) < full_est / 20, "{est} vs {full_est}");
    }

    #[test]
    fn a_final_usage_event_larger_than_the_tail_is_parsed() {
        for eol in ["\n", "\r\n", "\r"] {
            let mut s = String::from_utf8(bulk(60, "", "\n")).expect("utf8");
            let done = "data: [DONE]\n\n";
            s.truncate(s.rfind("data: {\"id\":\"c\",\"model\"").expect("usage chunk"));
            // 400 bytes of padding: larger than tail and search together.
            s += &format!("data: {{\"id\":\"c\",\"model\":\"m-1\",\"system_fingerprint\":\"{}\",\"choices\":[],\"usage\":{{\"prompt_tokens\":3,\"completion_tokens\":60,\"total_tokens\":63}}}}\n\n{done}", "p".repeat(400));
            let s = s.replace('\n', eol).into_bytes();
            let want = reference(&s, MeterLimits::default());
            assert_eq!(want.usage.map(|u| u.output), Some(60));
            let windowed = check_edge(&s, &cuts(s.len(), &[512, 1024, 3000]), 256, 64);
            assert!(windowed > 0);
            // The last chunk holds the whole usage event and more: no
            // boundary in the window, so it is read in full.
            let last = s.len() - 1000;
            let chunks = split(&s, last, 1000);
            let (out, got, _, _) = run_edge(&chunks, true, MeterLimits::default(), 256, 64);
            assert_eq!(got.usage, want.usage, "{eol:?}");
            assert!(!String::from_utf8_lossy(&out).contains("pppp"));
        }
    }

    #[test]
    fn an_error_at_a_chunk_end_is_read() {
        for eol in ["\n", "\r\n", "\r"] {
            let mut s = String::from_utf8(bulk(60, "null", "\n")).expect("utf8");
            s.truncate(s.rfind("data: {\"id\":\"c\",\"model\"").expect("usage chunk"));
            s += "data: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\"}}\n\n";
            let s = s.replace('\n', eol).into_bytes();
            let want = reference(&s, MeterLimits::default());
            assert_eq!(want.errors.len(), 1);
            assert!(check_edge(&s, &cuts(s.len(), &[512, 2000, 5000]), 256, 64) > 0);
            let chunks = split(&s, 1000, s.len());
            let (_, got, windowed, _) = run_edge(&chunks, true, MeterLimits::default(), 256, 64);
            // The first chunk past the head, and the second.
            assert_eq!((windowed, got.errors.clone()), (2, want.errors.clone()));
            assert!(got.usage.is_none());
        }
    }

    #[test]
    fn a_blank_line_split_between_cr_and_lf() {
        let s = bulk(80, "null", "\r\n");
        let seps: Vec<usize> = s.windows(4).enumerate().filter(|(_, w)| w == b"\r\n\r\n").map(|(i, _)| i + 3).collect();
        let mut split_then_windowed = 0;
        for &at in seps.iter().filter(|&&at| at > 1000).step_by(7) {
            // The chunk before ends with "\r\n\r", the next starts with "\n".
            for size in [300, 999, 2500] {
                let chunks = split(&s, at, size);
                for strip in [false, true] {
                    let (want_out, want, _) = run(&chunks, strip, MeterLimits::default());
                    let (out, got, _, _) = run_edge(&chunks, strip, MeterLimits::default(), 256, 64);
                    assert_eq!(edge_exact(&got), edge_exact(&want), "at {at} size {size}");
                    assert_eq!(out, want_out, "at {at} size {size}");
                }
                let mut t = StreamTap::new(chat_meter(MeterLimits::default()), true).with_edge(256, 64, 64);
                t.push(chunks[0]);
                assert!(t.after_cr);
                let c = chunks[1];
                if let Some(from) = t.window(c.len()) {
                    split_then_windowed += usize::from(t.push_window(c.len(), from, &c[from..]).is_some());
                }
            }
        }
        assert!(split_then_windowed > 0);
        // The boundary search trusts only what the bytes show.
        assert_eq!(last_boundary(b"ab\r\n\r\ncd", 9), Some(6));
        assert_eq!(last_boundary(b"ab\r\n\r\ncd", 5), None);
        assert_eq!(last_boundary(b"\r\ncd", 4), None);
        assert_eq!(last_boundary(b"\n\r\ncd", 5), Some(3));
        assert_eq!(last_boundary(b"ab\r\r", 4), None);
        assert_eq!(last_boundary(b"ab\r\rc", 5), Some(4));
        assert_eq!(last_boundary(b"ab\r\r\nc", 6), Some(5));
        assert_eq!(last_boundary(b"ab\n\rc\n\nd", 5), Some(4));
        assert_eq!(last_boundary(b"ab\n\nc\n\nd", 8), Some(7));
        assert_eq!(last_boundary(b"a\nb\nc\r\nd", 8), None);
    }

    #[test]
    fn held_events_in_edge_mode() {
        let s = bulk(100, "", "\n");
        let text = String::from_utf8(s.clone()).expect("utf8");
        let usage_at = text.rfind("data: {\"id\":\"c\",\"model\"").expect("usage chunk");
        let want_stripped = without_usage_only(&s);
        // A chunk ending early in a content event holds it; the next, large
        // chunk releases it (edge mode) and passes it over.
        let mut released = 0;
        for at in (2000..2600).step_by(3) {
            let chunks = split(&s, at, 1500);
            let (out, got, _, r) = run_edge(&chunks, true, MeterLimits::default(), 256, 64);
            assert_eq!(out, want_stripped, "at {at}");
            assert_eq!(got.usage.map(|u| u.output), Some(100));
            released += r;
        }
        assert!(released > 0);
        // The usage chunk held across a windowed chunk and the (small) last
        // one: still stripped and metered.
        for cut in usage_at + 1..usage_at + 60 {
            let chunks = [&s[..1200], &s[1200..cut], &s[cut..]];
            let mut t = StreamTap::new(chat_meter(MeterLimits::default()), true).with_edge(256, 64, 400);
            let mut out = t.push(chunks[0]).apply(chunks[0]);
            let c = chunks[1];
            let from = t.window(c.len()).expect("windowed");
            let edit = t.push_window(c.len(), from, &c[from..]).expect("boundary");
            assert!(t.held && edit.needs_chunk_bytes(c.len()), "cut {cut}");
            out.extend(edit.apply(c));
            out.extend(t.push(chunks[2]).apply(chunks[2]));
            out.extend(t.end_stream());
            assert_eq!(t.stripped(), 1);
            let got = t.finish();
            assert_eq!(out, want_stripped, "cut {cut}");
            assert_eq!(got.usage.map(|u| u.output), Some(100));
        }
        // The usage chunk removed from a windowed chunk: the edit names ranges.
        let chunks = split(&s, 1000, s.len());
        let mut t = StreamTap::new(chat_meter(MeterLimits::default()), true).with_edge(256, 64, 400);
        let mut out = t.push(chunks[0]).apply(chunks[0]);
        let c = chunks[1];
        let from = t.window(c.len()).expect("windowed");
        let edit = t.push_window(c.len(), from, &c[from..]).expect("boundary");
        assert!(matches!(edit, ChunkEdit::Ranges { .. }) && edit.needs_chunk_bytes(c.len()));
        out.extend(edit.apply(c));
        out.extend(t.end_stream());
        assert_eq!(out, want_stripped);
    }

    #[test]
    fn small_chunks_and_the_stream_head_are_framed_in_full() {
        let s = bulk(200, "null", "\n");
        let want = reference(&s, MeterLimits::default());
        let chunks: Vec<&[u8]> = s.chunks(255).collect();
        let (_, got, windowed, _) = run_edge(&chunks, true, MeterLimits::default(), 256, 64);
        assert_eq!((windowed, got.passed_over_bytes), (0, 0));
        assert_eq!(exact(&got), exact(&want));
        // A large chunk that starts the stream: its head is read and framed
        // in full (it names the model), then the rest from its edge.
        let t = StreamTap::new(chat_meter(MeterLimits::default()), true).with_edge(256, 64, 64);
        assert_eq!(t.window(s.len()), None);
        let want_out = without_usage_only(&s);
        // (A tail of 300 bytes: room for an event boundary in the window.)
        let (out, got, windowed, _) = run_edge(&[&s], true, MeterLimits::default(), 256, 300);
        assert_eq!((windowed, edge_exact(&got)), (1, edge_exact(&want)));
        assert_eq!(out, want_out);
        assert!(got.passed_over_bytes > s.len() as u64 / 2);
        let chunks = split(&s, 1000, s.len());
        let (out, got, windowed, _) = run_edge(&chunks, true, MeterLimits::default(), 2000, 300);
        assert_eq!((windowed, edge_exact(&got)), (1, edge_exact(&want)));
        assert_eq!(out, want_out);
        // Not when the rest of the chunk after the head is too small for a
        // window, nor when the head does not name the model.
        let (_, got, windowed, _) = run_edge(&[&s[..256 + 1199]], true, MeterLimits::default(), 256, 300);
        assert_eq!((windowed, got.passed_over_bytes), (0, 0));
        let anon = String::from_utf8(s.clone()).expect("utf8").replace("\"model\":\"m-1\",", "");
        let (out, got, windowed, _) = run_edge(&[anon.as_bytes()], true, MeterLimits::default(), 256, 300);
        assert_eq!((windowed, got.passed_over_bytes), (0, 0));
        assert_eq!(exact(&got), exact(&reference(anon.as_bytes(), MeterLimits::default())));
        assert_eq!(out, without_usage_only(anon.as_bytes()));
        // At the real bounds, a stream of chunks below the threshold.
        let chunks: Vec<&[u8]> = s.chunks(EDGE_MIN_CHUNK_BYTES - 1).collect();
        let mut t = StreamTap::new(chat_meter(MeterLimits::default()), true);
        for c in &chunks {
            assert_eq!(t.window(c.len()), None);
            t.push(c);
        }
        assert!(t.window(EDGE_MIN_CHUNK_BYTES).is_some());
        // Not in a non-chat or non-SSE body.
        let json = br#"{"model":"gpt-4o","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
        let mut t = StreamTap::new(chat_meter(MeterLimits::default()), true).with_edge(0, 1, 1);
        t.push(json);
        assert_eq!(t.window(1 << 20), None);
    }

    #[test]
    fn a_chunk_split_after_the_head_is_joined_into_one_edit() {
        // One chunk holding the whole stream, the head ending at every byte:
        // the head's edit (a held event, a removed usage chunk) and the
        // rest's (a released event, the window's ranges) make one edit that
        // forwards what the full path forwards.
        for eol in ["\n", "\r\n"] {
            // A usage-only chunk first as well (removed from the head when
            // the head holds all of it; before that it would be passed
            // over, as any usage-only chunk in the middle of a large chunk).
            let early = format!("data: {{\"id\":\"c\",\"model\":\"m-1\",\"choices\":[],\"usage\":{{\"prompt_tokens\":1,\"completion_tokens\":1,\"total_tokens\":2}}}}{eol}{eol}");
            for lead in ["", early.as_str()] {
                let mut s = lead.as_bytes().to_vec();
                s.extend_from_slice(&bulk(12, "", eol));
                for strip in [false, true] {
                    let (want_out, want, _) = run(&[&s], strip, MeterLimits::default());
                    let mut split_windowed = 0;
                    for head in lead.len().max(1)..s.len() {
                        let (out, got, windowed, _) = run_edge(&[&s], strip, MeterLimits::default(), head, 160);
                        assert_eq!(edge_exact(&got), edge_exact(&want), "head {head} strip {strip}");
                        assert_eq!(out, want_out, "head {head} strip {strip}");
                        split_windowed += windowed;
                    }
                    assert!(split_windowed > s.len() / 3, "{split_windowed} of {}", s.len());
                }
            }
        }
        let parts = |e: ChunkEdit| e.into_parts(10);
        assert_eq!(parts(ChunkEdit::Unchanged), (vec![], vec![(0, 10)]));
        let j = join_edits(ChunkEdit::Unchanged, b"abc", ChunkEdit::Unchanged, 10);
        assert_eq!(j, ChunkEdit::Unchanged);
        let cut = ChunkEdit::Splice { prefix: vec![], from: 0, to: 2 };
        let rel = ChunkEdit::Splice { prefix: b"c".to_vec(), from: 0, to: 7 };
        assert_eq!(join_edits(cut, b"abc", rel, 10), ChunkEdit::Splice { prefix: b"abc".to_vec(), from: 3, to: 10 });
        let gap = ChunkEdit::Ranges { prefix: vec![], keep: vec![(0, 2), (4, 7)] };
        assert_eq!(
            join_edits(ChunkEdit::Unchanged, b"abc", gap, 10),
            ChunkEdit::Ranges { prefix: vec![], keep: vec![(0, 5), (7, 10)] }
        );
        let all = ChunkEdit::Replace(b"x".to_vec());
        assert_eq!(join_edits(ChunkEdit::Unchanged, b"abc", all, 10), ChunkEdit::Replace(b"abcx".to_vec()));
    }

    #[test]
    fn passed_over_events_are_estimated() {
        let m =
            Metered { bytes_seen: 1000, passed_over_bytes: 600, events: 4, skimmed_events: 3, ..Metered::default() };
        // 400 bytes framed in 4 events: 600 bytes are 6 events more.
        assert_eq!(m.passed_over_events(), 6);
        assert_eq!(m.estimated_output_tokens(), 3 + 6);
        let none_framed = Metered { bytes_seen: 600, passed_over_bytes: 600, ..Metered::default() };
        assert_eq!(none_framed.passed_over_events(), 150);
    }

    #[test]
    fn a_usage_chunk_with_two_choices_keys_strips_the_same_at_every_split() {
        // Found by the fuzzer: the first `"choices"` has an element, the last
        // is empty. Held or whole, the first one decides: not stripped.
        let s = "data: {\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n\
                 data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"choices\":[],\
                 \"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1,\"total_tokens\":2}}\n\ndata: [DONE]\n\n";
        let b = s.as_bytes();
        let (whole, _, n) = run(&[b], true, MeterLimits::default());
        assert_eq!((whole.as_slice(), n), (b, 0));
        for i in 0..=b.len() {
            let (a, c) = b.split_at(i);
            let (out, _, n) = run(&[a, c], true, MeterLimits::default());
            assert_eq!((out, n), (whole.clone(), 0), "split at {i}");
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
        assert!(may_be_usage_only(b"data: {\"a\":{\"choices\":[1]},\"choices\":["));
        assert!(may_be_usage_only(b"event: x\n"));
        // The first choice may still say nothing, until it does say something.
        assert!(may_be_usage_only(b"data: {\"id\":\"x\",\"choices\":[{"));
        assert!(may_be_usage_only(b"data: {\"id\":\"x\",\"choices\" : [ {\"index\":0,\"delta\":{"));
        assert!(may_be_usage_only(b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":null}],"));
        assert!(!may_be_usage_only(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\""));
        assert!(!may_be_usage_only(b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\""));
        assert!(!may_be_usage_only(b"data: {\"choices\":[{\"index\":0,\"logprobs\":{\"content\":["));
        assert!(!may_be_usage_only(b"data: {\"choices\":[[1]"));
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
