//! Where are the events in a server-sent event stream?
//!
//! Incremental, sans-IO parser for server-sent events (WHATWG HTML §9.2).
//!
//! The filter sees a response body as arbitrary network chunks. The parser takes
//! those chunks with [`SseParser::push`] and hands back complete events with
//! [`SseParser::next_event`]; it never does I/O and never panics.
//!
//! Framing rules implemented (the ones metering gets wrong most often):
//! - lines end in CRLF, LF or a lone CR; a CR that ends one chunk and an LF
//!   that starts the next are one line ending;
//! - the parser works on bytes and decodes each complete line lossily as UTF-8,
//!   so a multi-byte character split across chunks survives intact;
//! - `:` starts a comment, a field's value loses one optional leading space,
//!   `data` lines of one event are joined with `\n`, unknown fields are ignored;
//! - an event ends at a blank line only; [`SseParser::finish`] additionally
//!   yields a last event that the stream ended before terminating, because a
//!   truncated stream still has to be metered;
//! - a UTF-8 BOM at the very start of the stream is ignored.
//!
//! Memory is bounded: an event whose raw size exceeds `max_event_bytes` is
//! skipped (its bytes are not kept) and reported once as
//! [`SseError::Oversized`]. Optionally the last few KiB of a skipped event are
//! kept so a caller can still salvage a usage object from its end.

use std::mem;

/// A default bound on one event's raw size, large enough for an OpenAI
/// Responses `response.completed` event, which repeats the whole response.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

/// One dispatched event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event` field, or empty when the event had none (WHATWG then calls
    /// the event `message`).
    pub event: String,
    /// The `data` lines joined with `\n` (no trailing newline).
    pub data: String,
    /// The `id` field if this event carried one (not the persistent last-event-id).
    pub id: Option<String>,
    /// The `retry` field if this event carried one made only of ASCII digits.
    pub retry: Option<u64>,
}

/// A problem with one event. The parser carries on after it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// The event was larger than the parser's bound and was skipped.
    #[error("SSE event of {bytes} bytes exceeds the {limit} byte bound and was skipped")]
    Oversized {
        /// Raw bytes the skipped event occupied (seen so far, for a cut-off stream).
        bytes: u64,
        /// The bound that was exceeded.
        limit: usize,
        /// The last bytes of the skipped event's lines (line terminators left
        /// out; exactly the configured tail size, or fewer if the event was
        /// shorter; empty when no tail is kept), for salvaging a trailing field.
        tail: Vec<u8>,
    },
}

/// Where an event sat in the stream, as absolute byte offsets from the first
/// byte ever pushed: `start` is the first byte after the previous event's
/// terminating blank line, `end` is one past this event's terminating blank
/// line (or the end of stream).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Span {
    /// First byte of the event's block.
    pub start: u64,
    /// One past the last byte of the event's block.
    pub end: u64,
}

#[derive(Debug, Default)]
struct EventBuilder {
    event: String,
    data: String,
    has_data: bool,
    id: Option<String>,
    retry: Option<u64>,
    /// Raw bytes of the completed lines of this event, terminators included.
    raw_bytes: usize,
}

/// Incremental SSE parser. See the module documentation.
///
/// Usage: `push` each chunk, then call `next_event` until it returns `None`;
/// at end of stream call `finish` and drain `next_event` once more.
#[derive(Debug)]
pub struct SseParser {
    max_event_bytes: usize,
    tail_bytes: usize,
    /// Pushed bytes not consumed yet (`input[pos..]`).
    input: Vec<u8>,
    pos: usize,
    /// Absolute stream offset of `input[0]`.
    base: u64,
    /// The current, unterminated line (not stored for comments or while skipping).
    line: Vec<u8>,
    /// Bytes of the current line seen so far, stored or not.
    line_len: usize,
    line_is_comment: bool,
    /// The last byte consumed was a CR ending a line: a following LF belongs to it.
    after_cr: bool,
    /// No line has been completed yet (for stripping a BOM).
    at_stream_start: bool,
    ev: EventBuilder,
    /// The current event outgrew the bound: its bytes are dropped until it ends.
    skipping: bool,
    skipped_bytes: u64,
    skipped_tail: Vec<u8>,
    block_start: u64,
    last_span: Span,
    finishing: bool,
    finished: bool,
    events: u64,
    oversized: u64,
}

impl SseParser {
    /// A parser that skips any event whose raw size exceeds `max_event_bytes`.
    pub fn new(max_event_bytes: usize) -> Self {
        SseParser {
            max_event_bytes,
            tail_bytes: 0,
            input: Vec::new(),
            pos: 0,
            base: 0,
            line: Vec::new(),
            line_len: 0,
            line_is_comment: false,
            after_cr: false,
            at_stream_start: true,
            ev: EventBuilder::default(),
            skipping: false,
            skipped_bytes: 0,
            skipped_tail: Vec::new(),
            block_start: 0,
            last_span: Span::default(),
            finishing: false,
            finished: false,
            events: 0,
            oversized: 0,
        }
    }

    /// Keep the last `tail_bytes` raw bytes of a skipped oversized event and
    /// return them in [`SseError::Oversized`].
    pub fn with_oversized_tail(mut self, tail_bytes: usize) -> Self {
        self.tail_bytes = tail_bytes;
        self
    }

    /// Hand the parser the next chunk of the body. Drain [`Self::next_event`]
    /// after every push: unconsumed input is kept until then.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.finishing {
            return;
        }
        self.compact();
        self.input.extend_from_slice(chunk);
    }

    /// Declare the end of the stream: the next calls to [`Self::next_event`]
    /// also yield an event the stream ended before terminating.
    pub fn finish(&mut self) {
        self.finishing = true;
    }

    /// The next complete event, an oversized-event report, or `None` when more
    /// input is needed (or, after `finish`, when the stream is exhausted).
    pub fn next_event(&mut self) -> Option<Result<SseEvent, SseError>> {
        loop {
            let rest = self.input.get(self.pos..).unwrap_or(&[]);
            let Some(&first) = rest.first() else {
                return self.end_of_input();
            };
            if self.after_cr {
                self.after_cr = false;
                if first == b'\n' {
                    self.advance(1);
                    // The LF belongs to the line the CR ended; when that was the
                    // blank line closing a block, the block ends after it too.
                    let lf_at = self.abs_pos().saturating_sub(1);
                    if self.block_start == lf_at {
                        self.block_start = self.abs_pos();
                    }
                    continue;
                }
            }
            match memchr::memchr2(b'\r', b'\n', rest) {
                None => {
                    let n = rest.len();
                    self.append_to_line(n);
                    self.advance(n);
                    return self.end_of_input();
                }
                Some(i) => {
                    let is_cr = rest.get(i) == Some(&b'\r');
                    let lf_follows = is_cr && rest.get(i.saturating_add(1)) == Some(&b'\n');
                    self.append_to_line(i);
                    let term_len = if lf_follows { 2 } else { 1 };
                    self.advance(i.saturating_add(term_len));
                    // A CR at the very end of the input may be the first half
                    // of a CRLF split across chunks.
                    self.after_cr = is_cr && !lf_follows;
                    if let Some(item) = self.end_line(term_len) {
                        return Some(item);
                    }
                }
            }
        }
    }

    /// Where the item most recently returned by [`Self::next_event`] sat in
    /// the stream.
    pub fn last_span(&self) -> Span {
        self.last_span
    }

    /// Absolute offset where the event currently being assembled began; every
    /// byte before it belongs to completed events, comments or blank lines.
    pub fn pending_block_start(&self) -> u64 {
        self.block_start
    }

    /// True while the current event is being skipped as oversized.
    pub fn is_skipping(&self) -> bool {
        self.skipping
    }

    /// Absolute offset one past the last byte consumed.
    pub fn consumed(&self) -> u64 {
        self.abs_pos()
    }

    /// Events dispatched so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Oversized events skipped so far.
    pub fn oversized(&self) -> u64 {
        self.oversized
    }

    fn abs_pos(&self) -> u64 {
        self.base.saturating_add(self.pos as u64)
    }

    fn advance(&mut self, n: usize) {
        self.pos = self.pos.saturating_add(n).min(self.input.len());
    }

    fn compact(&mut self) {
        if self.pos == 0 {
            return;
        }
        let consumed = self.pos.min(self.input.len());
        self.input.drain(..consumed);
        self.base = self.base.saturating_add(consumed as u64);
        self.pos = 0;
    }

    fn end_of_input(&mut self) -> Option<Result<SseEvent, SseError>> {
        if !self.finishing || self.finished {
            return None;
        }
        self.finished = true;
        self.after_cr = false;
        if self.line_len > 0 {
            // The last line had no terminator: it still counts.
            if let Some(item) = self.end_line(0) {
                return Some(item);
            }
        }
        let end = self.abs_pos();
        if self.skipping {
            return Some(self.end_oversized(end));
        }
        self.dispatch(end).map(Ok)
    }

    /// Add `input[pos..pos+n]` to the current line, honouring the bound.
    fn append_to_line(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let start = self.pos;
        let end = start.saturating_add(n);
        let Some(bytes) = self.input.get(start..end) else {
            return;
        };
        if self.line_len == 0 && bytes.first() == Some(&b':') {
            self.line_is_comment = true;
        }
        self.line_len = self.line_len.saturating_add(n);
        if self.skipping {
            self.skipped_bytes = self.skipped_bytes.saturating_add(n as u64);
            keep_tail(&mut self.skipped_tail, bytes, self.tail_bytes);
            return;
        }
        if self.line_is_comment {
            return;
        }
        let size = self.ev.raw_bytes.saturating_add(self.line.len()).saturating_add(n);
        if size > self.max_event_bytes {
            self.skipping = true;
            self.skipped_bytes = size as u64;
            self.skipped_tail.clear();
            keep_tail(&mut self.skipped_tail, &self.line, self.tail_bytes);
            keep_tail(&mut self.skipped_tail, bytes, self.tail_bytes);
            self.line = Vec::new();
            self.ev = EventBuilder::default();
            return;
        }
        self.line.extend_from_slice(bytes);
    }

    /// The current line ended with a terminator of `term_len` bytes.
    fn end_line(&mut self, term_len: usize) -> Option<Result<SseEvent, SseError>> {
        let len = mem::take(&mut self.line_len);
        let was_comment = mem::replace(&mut self.line_is_comment, false);
        let at_start = mem::replace(&mut self.at_stream_start, false);
        let end = self.abs_pos();
        if len == 0 {
            if self.skipping {
                return Some(self.end_oversized(end));
            }
            return match self.dispatch(end) {
                Some(ev) => Some(Ok(ev)),
                None => {
                    // A blank line with nothing to dispatch still closes a block.
                    self.block_start = end;
                    None
                }
            };
        }
        if self.skipping {
            self.skipped_bytes = self.skipped_bytes.saturating_add(term_len as u64);
            return None;
        }
        if was_comment {
            return None;
        }
        let line = mem::take(&mut self.line);
        let mut content: &[u8] = &line;
        if at_start {
            content = content.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(content);
        }
        process_line(&mut self.ev, content);
        self.ev.raw_bytes = self.ev.raw_bytes.saturating_add(len).saturating_add(term_len);
        // Reuse the allocation for the next line.
        self.line = line;
        self.line.clear();
        None
    }

    fn end_oversized(&mut self, end: u64) -> Result<SseEvent, SseError> {
        self.skipping = false;
        self.oversized = self.oversized.saturating_add(1);
        self.last_span = Span { start: self.block_start, end };
        self.block_start = end;
        let mut tail = mem::take(&mut self.skipped_tail);
        // Exactly the last `tail_bytes`, so the result never depends on how
        // the stream was chunked.
        let excess = tail.len().saturating_sub(self.tail_bytes);
        tail.drain(..excess);
        Err(SseError::Oversized { bytes: mem::take(&mut self.skipped_bytes), limit: self.max_event_bytes, tail })
    }

    fn dispatch(&mut self, end: u64) -> Option<SseEvent> {
        let ev = mem::take(&mut self.ev);
        if !ev.has_data {
            // WHATWG: an event with an empty data buffer is not dispatched.
            return None;
        }
        self.events = self.events.saturating_add(1);
        self.last_span = Span { start: self.block_start, end };
        self.block_start = end;
        Some(SseEvent { event: ev.event, data: ev.data, id: ev.id, retry: ev.retry })
    }
}

/// Append `bytes` to `tail`, keeping at most about `cap` of the newest bytes.
fn keep_tail(tail: &mut Vec<u8>, bytes: &[u8], cap: usize) {
    if cap == 0 {
        return;
    }
    let take_from = bytes.len().saturating_sub(cap);
    tail.extend_from_slice(bytes.get(take_from..).unwrap_or(&[]));
    // Trim lazily (at twice the cap) so the cost stays amortised O(1) per byte.
    if tail.len() > cap.saturating_mul(2) {
        let excess = tail.len().saturating_sub(cap);
        tail.drain(..excess);
    }
}

/// Interpret one complete, non-blank, non-comment line.
fn process_line(ev: &mut EventBuilder, line: &[u8]) {
    let (name, value) = match line.iter().position(|&b| b == b':') {
        Some(i) => {
            let name = line.get(..i).unwrap_or(&[]);
            let mut value = line.get(i.saturating_add(1)..).unwrap_or(&[]);
            if let Some(v) = value.strip_prefix(b" ") {
                value = v;
            }
            (name, value)
        }
        None => (line, &[][..]),
    };
    match name {
        b"data" => {
            if ev.has_data {
                ev.data.push('\n');
            }
            ev.has_data = true;
            ev.data.push_str(&String::from_utf8_lossy(value));
        }
        b"event" => ev.event = String::from_utf8_lossy(value).into_owned(),
        // WHATWG: an id containing NUL is ignored.
        b"id" if !value.contains(&0) => {
            ev.id = Some(String::from_utf8_lossy(value).into_owned());
        }
        b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
            ev.retry = std::str::from_utf8(value).ok().and_then(|s| s.parse::<u64>().ok());
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(s: &str) -> SseEvent {
        SseEvent { data: s.to_string(), ..SseEvent::default() }
    }

    fn typed(event: &str, d: &str) -> SseEvent {
        SseEvent { event: event.to_string(), data: d.to_string(), ..SseEvent::default() }
    }

    /// Feed `chunks` one after the other, draining after each; then finish.
    fn run(max: usize, chunks: &[&[u8]]) -> Vec<Result<SseEvent, SseError>> {
        let mut p = SseParser::new(max);
        let mut out = Vec::new();
        for c in chunks {
            p.push(c);
            while let Some(item) = p.next_event() {
                out.push(item);
            }
        }
        p.finish();
        while let Some(item) = p.next_event() {
            out.push(item);
        }
        out
    }

    fn events(chunks: &[&[u8]]) -> Vec<SseEvent> {
        run(1 << 20, chunks).into_iter().map(|r| r.expect("no errors expected")).collect()
    }

    #[test]
    fn single_event() {
        assert_eq!(events(&[b"data: hello\n\n"]), vec![data("hello")]);
    }

    #[test]
    fn partial_event() {
        let mut p = SseParser::new(1024);
        p.push(b"data: hel");
        assert_eq!(p.next_event(), None);
        p.push(b"lo\n");
        assert_eq!(p.next_event(), None);
        p.push(b"\n");
        assert_eq!(p.next_event(), Some(Ok(data("hello"))));
        assert_eq!(p.next_event(), None);
    }

    #[test]
    fn mixed_eol_events() {
        let got = events(&[b"data: a\r\n\r\ndata: b\n\ndata: c\r\rdata: d\r\n\n"]);
        assert_eq!(got, vec![data("a"), data("b"), data("c"), data("d")]);
    }

    #[test]
    fn cr_split_across_chunks() {
        // "\r" | "\n" is one line ending, so no blank line between them.
        let got = events(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]);
        assert_eq!(got, vec![data("a\nb")]);
    }

    #[test]
    fn lone_cr_then_chunk_without_lf() {
        let got = events(&[b"data: a\r", b"\r", b"data: b\r\r"]);
        assert_eq!(got, vec![data("a"), data("b")]);
    }

    #[test]
    fn utf8_split() {
        let text = "data: héllo – ✓ 🦀\n\n".as_bytes();
        for i in 0..text.len() {
            let (a, b) = text.split_at(i);
            assert_eq!(events(&[a, b]), vec![data("héllo – ✓ 🦀")], "split at {i}");
        }
    }

    #[test]
    fn invalid_utf8_is_replaced_not_fatal() {
        assert_eq!(events(&[b"data: a\xFFb\n\n"]), vec![data("a\u{FFFD}b")]);
    }

    #[test]
    fn unicode_line_separators_are_not_line_breaks() {
        let got = events(&["data: a\u{2028}b\u{85}c\n\n".as_bytes()]);
        assert_eq!(got, vec![data("a\u{2028}b\u{85}c")]);
    }

    #[test]
    fn comment_only() {
        assert_eq!(events(&[b": keep-alive\n\n:\n\n"]), vec![]);
    }

    #[test]
    fn comments_between_fields() {
        let got = events(&[b"data: a\n: ping\ndata: b\n\n"]);
        assert_eq!(got, vec![data("a\nb")]);
    }

    #[test]
    fn multi_line_data_joined_with_newline() {
        let got = events(&[b"data: {\"a\":\ndata:1}\ndata\n\n"]);
        assert_eq!(got, vec![data("{\"a\":\n1}\n")]);
    }

    #[test]
    fn only_one_space_after_colon_is_stripped() {
        let got = events(&[b"data:  two\n\ndata:none\n\n"]);
        assert_eq!(got, vec![data(" two"), data("none")]);
    }

    #[test]
    fn empty_data_line_dispatches_empty_event() {
        assert_eq!(events(&[b"data:\n\n"]), vec![data("")]);
    }

    #[test]
    fn event_without_data_is_not_dispatched() {
        assert_eq!(events(&[b"event: ping\n\n"]), vec![]);
    }

    #[test]
    fn event_id_retry_fields() {
        let got = events(&[b"event: message_start\nid: 7\nretry: 1500\ndata: {}\n\n"]);
        let want =
            SseEvent { event: "message_start".into(), data: "{}".into(), id: Some("7".into()), retry: Some(1500) };
        assert_eq!(got, vec![want]);
    }

    #[test]
    fn retry_with_non_digits_is_ignored() {
        let got = events(&[b"retry: 10s\ndata: x\n\n"]);
        assert_eq!(got, vec![data("x")]);
    }

    #[test]
    fn unknown_fields_ignored() {
        let got = events(&[b"foo: bar\nevent: e\ndata: x\n\n"]);
        assert_eq!(got, vec![typed("e", "x")]);
    }

    #[test]
    fn final_unterminated_event() {
        assert_eq!(events(&[b"data: a\n\ndata: b"]), vec![data("a"), data("b")]);
        assert_eq!(events(&[b"data: b\n"]), vec![data("b")]);
        assert_eq!(events(&[b"data: b\r"]), vec![data("b")]);
    }

    #[test]
    fn nothing_after_finish_twice() {
        let mut p = SseParser::new(64);
        p.push(b"data: x");
        p.finish();
        assert_eq!(p.next_event(), Some(Ok(data("x"))));
        assert_eq!(p.next_event(), None);
        p.push(b"\n\ndata: y\n\n");
        assert_eq!(p.next_event(), None);
    }

    #[test]
    fn bom_at_start_is_ignored() {
        assert_eq!(events(&[b"\xEF\xBB", b"\xBFdata: x\n\n"]), vec![data("x")]);
    }

    #[test]
    fn oversized_event_skipped() {
        let big = format!("data: {}\n\n", "x".repeat(100));
        let stream = format!("data: a\n\n{big}data: b\n\n");
        let got = run(32, &[stream.as_bytes()]);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], Ok(data("a")));
        assert!(matches!(got[1], Err(SseError::Oversized { limit: 32, .. })));
        assert_eq!(got[2], Ok(data("b")));
    }

    #[test]
    fn oversized_event_memory_stays_bounded() {
        let mut p = SseParser::new(1024);
        p.push(b"data: ");
        for _ in 0..1000 {
            p.push(&[b'x'; 1000]);
            assert_eq!(p.next_event(), None);
            assert!(p.line.capacity() <= 4096);
        }
        p.push(b"\n\ndata: ok\n\n");
        assert!(matches!(p.next_event(), Some(Err(SseError::Oversized { .. }))));
        assert_eq!(p.next_event(), Some(Ok(data("ok"))));
        assert_eq!(p.oversized(), 1);
        assert_eq!(p.events(), 1);
    }

    #[test]
    fn oversized_keeps_tail_when_asked() {
        let mut p = SseParser::new(16).with_oversized_tail(8);
        p.push(b"data: 0123456789abcdefghij\n\n");
        match p.next_event() {
            Some(Err(SseError::Oversized { tail, bytes, .. })) => {
                assert_eq!(tail, b"cdefghij");
                assert_eq!(bytes, 27);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn oversized_unterminated_at_finish_is_reported() {
        let got = run(8, &[b"data: 0123456789"]);
        assert!(matches!(got.as_slice(), [Err(SseError::Oversized { .. })]));
    }

    #[test]
    fn long_comment_lines_are_not_buffered() {
        let mut p = SseParser::new(16);
        p.push(b":");
        p.push(&[b'x'; 10_000]);
        p.push(b"\ndata: y\n\n");
        assert_eq!(p.next_event(), Some(Ok(data("y"))));
        assert_eq!(p.oversized(), 0);
    }

    #[test]
    fn spans_cover_blocks() {
        let mut p = SseParser::new(64);
        p.push(b": hi\n\ndata: a\r\n\r\ndata: b\r\n\r");
        assert_eq!(p.next_event(), Some(Ok(data("a"))));
        assert_eq!(p.last_span(), Span { start: 6, end: 17 });
        assert_eq!(p.next_event(), Some(Ok(data("b"))));
        assert_eq!(p.last_span(), Span { start: 17, end: 27 });
        // The LF completing the final CRLF arrives later and joins that block.
        p.push(b"\n");
        assert_eq!(p.next_event(), None);
        assert_eq!(p.pending_block_start(), 28);
    }

    #[test]
    fn every_split_gives_same_events() {
        let stream: &[u8] =
            b": c\r\nevent: x\r\ndata: 1\r\ndata: 2\r\n\r\ndata: \xC3\xA9\r\rid: 3\ndata: z\n\ndata: tail";
        let want = events(&[stream]);
        assert_eq!(want.len(), 4);
        for i in 0..=stream.len() {
            let (a, b) = stream.split_at(i);
            assert_eq!(events(&[a, b]), want, "split at {i}");
            for j in i..=stream.len() {
                let (b1, b2) = b.split_at(j - i);
                assert_eq!(events(&[a, b1, b2]), want, "split at {i},{j}");
            }
        }
    }
}
