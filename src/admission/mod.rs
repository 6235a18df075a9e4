//! May this request go without asking the rate-limit service? The per-tenant
//! in-flight cap counted across workers.

pub mod inflight;
