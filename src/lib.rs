//! tollgate: per-tenant isolation, rate limits, budgets and token metering for
//! LLM traffic, as a proxy-wasm filter for Envoy.
//!
//! Everything except `glue` is host-free logic that builds and is tested
//! natively. `glue` is the only module that talks to the proxy-wasm host, and it
//! only exists in the wasm32 build.

pub mod api;
pub mod config;
pub mod flow;
pub mod identity;
pub mod inflight;
pub mod journal;
pub mod jwt;
pub mod limits;
pub mod metrics;
pub mod pairs;
pub mod plan;
pub mod protostruct;
pub mod pricing;
pub mod request;
pub mod rls;
pub mod scan;
pub mod sse;
pub mod tap;
pub mod usage;

#[cfg(target_arch = "wasm32")]
mod glue;
