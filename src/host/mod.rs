//! How does tollgate talk to Envoy? Through a small [`Host`] trait: the only
//! surface between the core and proxy-wasm.
//!
//! - [`contexts`] holds the root and HTTP contexts: each host callback reads
//!   what the host offers, hands it to the core (`crate::request`,
//!   `crate::worker`) and carries out the core's answer. That is the one
//!   interpreter of the core's steps; it makes no business decision and is
//!   generic over [`Host`], so it runs natively in `cargo test`.
//! - [`fake`] (native only) is a recording [`Host`]: a whole request runs
//!   through the same entry points Envoy calls.
//! - `abi` and `wasm` (wasm32 only) implement [`Host`] with proxy-wasm's
//!   `hostcalls` (which return `Result`, never the SDK's convenience methods,
//!   which panic on an unexpected status) and register the contexts.

pub mod contexts;
#[cfg(not(target_arch = "wasm32"))]
pub mod fake;

#[cfg(target_arch = "wasm32")]
mod abi;
#[cfg(target_arch = "wasm32")]
mod wasm;

use crate::admission::inflight::SlotStore;
use crate::llm::LocalReply;

/// What a callback tells the host about the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

/// The kinds of metric tollgate defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Histogram,
    Gauge,
}

/// A header map of the current stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Map {
    RequestHeaders,
    ResponseHeaders,
}

/// Everything tollgate asks of its host. Reads of the stream answer empty or
/// `None` when the host fails, calls out and the configuration read answer
/// `Err`; writes log their own failures: a failed host call never stops the
/// filter.
pub trait Host {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&mut self) -> u64;
    /// Follows the host's log level for wasm code.
    fn follow_log_level(&mut self) {}

    // Configuration and VM.
    /// The plugin configuration as given.
    fn plugin_config(&mut self) -> Result<Vec<u8>, String>;
    /// An environment variable of the host process.
    fn env(&self, name: &str) -> Option<String>;
    /// Sets the root context's tick period.
    fn set_tick_ms(&mut self, ms: u64) -> bool;
    /// The table of in-flight counts shared by every worker.
    fn slot_store(&mut self) -> Box<dyn SlotStore>;
    /// A number no other VM of this process has.
    fn new_vm_id(&mut self) -> u64;

    // The stream.
    /// A header map in the pairs encoding (empty when unreadable).
    fn header_pairs(&mut self, map: Map) -> Vec<u8>;
    /// Replaces a whole header map in one call.
    fn set_header_pairs(&mut self, map: Map, pairs: &[(Vec<u8>, Vec<u8>)]);
    fn set_header(&mut self, map: Map, name: &str, value: &str);
    fn remove_header(&mut self, map: Map, name: &str);
    /// `len` bytes of the buffered request body.
    fn request_body(&mut self, len: usize) -> Vec<u8>;
    /// Replaces the first `len` bytes of the request body.
    fn set_request_body(&mut self, len: usize, body: &[u8]);
    /// `len` bytes of the current response chunk from `from`.
    fn response_body(&mut self, from: usize, len: usize) -> Vec<u8>;
    /// Replaces `len` bytes of the response chunk at `start` with `data`.
    fn set_response_body(&mut self, start: usize, len: usize, data: &[u8]);
    fn resume_request(&mut self);
    fn send_reply(&mut self, reply: &LocalReply);
    /// A property of the stream (e.g. dynamic metadata).
    fn property(&mut self, path: &[&str]) -> Option<Vec<u8>>;
    /// Sets a filter-state property (`wasm.<name>`).
    fn set_property(&mut self, name: &str, value: &str);

    // Calls out.
    /// Sends a `ShouldRateLimit` call; answers the call's token.
    fn dispatch_rls(
        &mut self,
        cluster: &str,
        metadata: &[(String, String)],
        message: &[u8],
        timeout_ms: u64,
    ) -> Result<u32, String>;
    /// The message of the gRPC answer being delivered (`None`: unreadable).
    fn grpc_response(&mut self, len: usize) -> Option<Vec<u8>>;
    /// Sends an HTTP GET; answers the call's token.
    fn dispatch_get(&mut self, cluster: &str, path: &str, authority: &str, timeout_ms: u64) -> Result<u32, String>;
    /// The status and body of the HTTP answer being delivered.
    fn http_response(&mut self, len: usize) -> (Option<u32>, Option<Vec<u8>>);

    // Metrics.
    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Option<u32>;
    fn increment_metric(&mut self, id: u32, by: u64);
    fn record_metric(&mut self, id: u32, value: u64);
}
