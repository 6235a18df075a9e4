//! What did a response use and cost? SSE framing, byte scanning, the stream
//! tap, usage, pricing and metric names.

// The price catalogue import is a native command's, not the filter's.
#[cfg(not(target_arch = "wasm32"))]
pub mod catalogue;
pub mod meter;
pub mod metrics;
pub mod pricing;
pub mod record;
pub mod scan;
pub mod sse;
pub mod tap;
pub mod usage;
