//! What does the core ask the host to do? The steps a request's flow answers
//! each host callback with; `crate::host` carries them out and nothing else.

use std::borrow::Cow;
use std::rc::Rc;

use crate::llm::LocalReply;
use crate::metering::tap::ChunkEdit;
use crate::request::header_plan::HeaderPlan;

/// What the host contexts does after the request headers.
#[derive(Debug, PartialEq)]
pub enum HeadersStep {
    /// Send this reply and stop the request.
    Reply(LocalReply),
    /// Leave the request alone (unmatched path with `unmatched_routes: pass`),
    /// but for these headers: `x-tollgate-*` copies a client sent, which
    /// Envoy's routes would otherwise believe.
    PassThrough { remove: Vec<String> },
    /// Apply the plan (Envoy then re-matches the route) and wait for the whole body.
    ReadBody(HeaderPlan),
    /// Ask the tenant registry, hold the request (and its body), and hand
    /// the answer to `RequestFlow::on_lookup_answer`.
    Lookup(LookupCall),
    /// Make this rate-limit service call (the quota endpoint's pure check)
    /// and hand its answer to `RequestFlow::on_rls_reply`, which replies.
    Call(RlsCall),
    /// A request without a body to read (a WebSocket upgrade): apply the
    /// plan, make the reserve call and hand its answer to
    /// `RequestFlow::on_rls_reply`, which lets it go or refuses it.
    Admit(HeaderPlan, RlsCall),
    /// A request without a body to read, admitted without a call: apply the
    /// plan and let it go.
    Forward(HeaderPlan),
}

/// A lookup in the tenant registry: an HTTP GET.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupCall {
    pub cluster: String,
    pub path: String,
    pub authority: String,
    pub timeout_ms: u64,
}

/// A call to the rate-limit service.
#[derive(Debug, Clone, PartialEq)]
pub struct RlsCall {
    pub cluster: String,
    pub message: Vec<u8>,
    pub metadata: Vec<(String, String)>,
    pub timeout_ms: u64,
}

/// What the host contexts does after the request body (or the reserve answer).
#[derive(Debug, PartialEq)]
pub enum BodyStep {
    /// Keep buffering.
    NeedMore,
    /// Send this reply and stop the request.
    Reply(LocalReply),
    /// Ask the rate-limit service and wait for the answer.
    Call(RlsCall),
    /// Let the request go upstream; `body` replaces the body first.
    Forward { body: Option<Vec<u8>>, set_headers: Vec<(String, String)> },
}

/// What the host contexts does with the response headers.
#[derive(Debug, Default, PartialEq)]
pub struct ResponseHeadersStep {
    pub set: Vec<(String, String)>,
    /// Hold the (non-streamed) body until complete, to add usage headers.
    pub hold_body: bool,
}

/// What to forward in place of a response body chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyOut {
    /// The chunk itself, or how it changed.
    pub edit: ChunkEdit,
    /// Bytes to add after it (held bytes at the end of a stream, the usage
    /// comment).
    pub append: Vec<u8>,
}

/// What [`RequestFlow::on_response_chunk`] did with a chunk.
#[derive(Debug, Default)]
pub struct ResponseChunk {
    /// What to forward in its place.
    pub out: BodyOut,
    /// Set at the end of the response.
    pub finish: Option<Finish>,
    /// The whole chunk, when it was read in full.
    pub chunk: Option<Vec<u8>>,
    /// How many of its bytes were read (fewer than its length: it was
    /// edge-scanned).
    pub read: usize,
}

impl Default for BodyOut {
    fn default() -> Self {
        BodyOut { edit: ChunkEdit::Unchanged, append: Vec::new() }
    }
}

impl BodyOut {
    /// Whether the chunk goes out exactly as it came.
    pub fn is_unchanged(&self) -> bool {
        self.edit == ChunkEdit::Unchanged && self.append.is_empty()
    }

    /// The host writes that turn a chunk of `size` bytes into what this
    /// forwards, in order. A write `(start, len, data)` replaces `len` bytes
    /// at `start` with `data` (`len = 0` inserts; a start at or past the end
    /// appends), which is what proxy-wasm's `set_buffer` does. Only the bytes
    /// that change cross into the host: a released hold is prepended, a new
    /// hold cuts the chunk's tail, a removed leading event is drained.
    ///
    /// `chunk` is the whole chunk, or `None` when only a window of it was
    /// read. An edit that needs the chunk's bytes
    /// ([`ChunkEdit::needs_chunk_bytes`]) and did not get all of them writes
    /// nothing to the chunk (it goes out as it came), only the append.
    pub fn writes<'a>(&'a self, chunk: Option<&'a [u8]>, size: usize) -> Vec<BufferWrite<'a>> {
        let mut out = Vec::new();
        let mut len = size;
        let readable = match chunk {
            Some(c) => c.len() == size,
            None => false,
        };
        match &self.edit {
            ChunkEdit::Unchanged => {}
            edit if edit.needs_chunk_bytes(size) && !readable => {}
            ChunkEdit::Splice { prefix, from, to } => {
                let (from, to) = ((*from).min(size), (*to).min(size));
                if to < size {
                    let kept = chunk.and_then(|c| c.get(from..to)).unwrap_or(&[]);
                    out.push(BufferWrite { start: 0, len: size, data: Cow::Borrowed(kept) });
                    len = to.saturating_sub(from);
                } else if from > 0 {
                    out.push(BufferWrite { start: 0, len: from, data: Cow::Borrowed(&[]) });
                    len = size.saturating_sub(from);
                }
                if !prefix.is_empty() {
                    out.push(BufferWrite { start: 0, len: 0, data: Cow::Borrowed(prefix) });
                    len = len.saturating_add(prefix.len());
                }
            }
            ChunkEdit::Replace(bytes) => {
                out.push(BufferWrite { start: 0, len: size, data: Cow::Borrowed(bytes) });
                len = bytes.len();
            }
            edit @ ChunkEdit::Ranges { .. } => {
                let bytes = edit.apply(chunk.unwrap_or(&[]));
                len = bytes.len();
                out.push(BufferWrite { start: 0, len: size, data: Cow::Owned(bytes) });
            }
        }
        if !self.append.is_empty() {
            out.push(BufferWrite { start: len, len: 0, data: Cow::Borrowed(&self.append) });
        }
        out
    }

    /// The bytes forwarded for `chunk` (for tests and tools; the filter
    /// applies the edit in place).
    pub fn bytes(&self, chunk: &[u8]) -> Vec<u8> {
        let mut out = self.edit.apply(chunk);
        out.extend_from_slice(&self.append);
        out
    }
}

/// One write into a host buffer: replace `len` bytes at `start` with `data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferWrite<'a> {
    pub start: usize,
    pub len: usize,
    pub data: Cow<'a, [u8]>,
}

impl BufferWrite<'_> {
    /// Carries the write out on `buf` as proxy-wasm's `set_buffer` does.
    pub fn apply_to(&self, buf: &mut Vec<u8>) {
        if self.start >= buf.len() {
            buf.extend_from_slice(&self.data);
        } else {
            let end = self.start.saturating_add(self.len).min(buf.len());
            buf.splice(self.start..end, self.data.iter().copied());
        }
    }
}

#[derive(Debug, Default, PartialEq)]
pub struct Finish {
    /// Filter-state properties (`wasm.<name>`), read by the access log.
    pub properties: Vec<(&'static str, String)>,
    /// Counter increments by metric name.
    pub counters: Vec<(Rc<str>, u64)>,
    /// Histogram samples by metric name.
    pub histograms: Vec<(Rc<str>, u64)>,
    /// Response headers (non-streamed responses held until complete).
    pub headers: Vec<(String, String)>,
    /// Bytes appended to a stream (the optional usage comment).
    pub append: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_result(out: &BodyOut, chunk: &[u8], give: Option<&[u8]>) -> Vec<u8> {
        let mut buf = chunk.to_vec();
        for w in out.writes(give, chunk.len()) {
            w.apply_to(&mut buf);
        }
        buf
    }

    #[test]
    fn host_writes_forward_exactly_what_the_edit_says() {
        let chunk: Vec<u8> = (0u8..40).collect();
        let n = chunk.len();
        let mut edits = vec![ChunkEdit::Unchanged, ChunkEdit::Replace(b"new".to_vec()), ChunkEdit::Replace(Vec::new())];
        for prefix in [Vec::new(), b"held".to_vec()] {
            for (from, to) in [(0, n), (0, 10), (5, n), (5, 30), (n, n), (0, 0), (7, 7)] {
                edits.push(ChunkEdit::Splice { prefix: prefix.clone(), from, to });
            }
            edits.push(ChunkEdit::Ranges { prefix: prefix.clone(), keep: vec![(0, 3), (10, 20), (35, 40)] });
            edits.push(ChunkEdit::Ranges { prefix: prefix.clone(), keep: Vec::new() });
        }
        for edit in edits {
            for append in [Vec::new(), b"tail".to_vec()] {
                let out = BodyOut { edit: edit.clone(), append };
                assert_eq!(host_result(&out, &chunk, Some(&chunk)), out.bytes(&chunk), "{out:?}");
            }
        }
    }

    #[test]
    fn an_edit_that_needs_unread_bytes_leaves_the_chunk_as_it_came() {
        let chunk: Vec<u8> = (0u8..40).collect();
        let out = BodyOut { edit: ChunkEdit::Splice { prefix: Vec::new(), from: 0, to: 10 }, append: b"x".to_vec() };
        let mut expected = chunk.clone();
        expected.extend_from_slice(b"x");
        assert_eq!(host_result(&out, &chunk, None), expected);
        assert_eq!(host_result(&out, &chunk, Some(&chunk[..5])), expected);
        // A suffix kept needs no bytes: drained at the front without reading.
        let out = BodyOut { edit: ChunkEdit::Splice { prefix: b"p".to_vec(), from: 30, to: 40 }, append: Vec::new() };
        assert_eq!(host_result(&out, &chunk, None), out.bytes(&chunk));
    }
}
