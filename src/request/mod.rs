//! What happens next for this request? The per-request flow and the header
//! plan.

pub mod effect;
pub mod flow;
pub mod header_plan;
