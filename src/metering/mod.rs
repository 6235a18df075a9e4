//! What did a response use and cost? SSE framing, byte scanning, the stream
//! tap, usage, pricing and metric names.

pub mod meter;
pub mod metrics;
pub mod pricing;
pub mod record;
pub mod scan;
pub mod sse;
pub mod tap;
pub mod usage;
