//! May this request go without asking the rate-limit service? The per-tenant
//! in-flight cap counted across workers, quota leases drawn from locally, and
//! the local allowance while the service is down.

pub mod fail_open;
pub mod inflight;
pub mod lease;
