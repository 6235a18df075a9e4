//! What does the core ask the host to do? The steps a request's flow answers
//! each host callback with; `crate::host` carries them out and nothing else.

use std::rc::Rc;

use crate::llm::LocalReply;
use crate::metering::tap::ChunkEdit;
use crate::request::header_plan::HeaderPlan;

/// What the glue does after the request headers.
#[derive(Debug, PartialEq)]
pub enum HeadersStep {
    /// Send this reply and stop the request.
    Reply(LocalReply),
    /// Leave the request alone (unmatched path with `unmatched_routes: pass`).
    PassThrough,
    /// Apply the plan (Envoy then re-matches the route) and wait for the whole body.
    ReadBody(HeaderPlan),
}

/// A call to the rate-limit service.
#[derive(Debug, Clone, PartialEq)]
pub struct RlsCall {
    pub cluster: String,
    pub message: Vec<u8>,
    pub metadata: Vec<(String, String)>,
    pub timeout_ms: u64,
}

/// What the glue does after the request body (or the reserve answer).
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

/// What the glue does with the response headers.
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

    /// The bytes forwarded for `chunk` (for tests and tools; the filter
    /// applies the edit in place).
    pub fn bytes(&self, chunk: &[u8]) -> Vec<u8> {
        let mut out = self.edit.apply(chunk);
        out.extend_from_slice(&self.append);
        out
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
