//! tollgate: per-tenant isolation, rate limits, budgets and token metering for
//! LLM traffic, as a proxy-wasm filter for Envoy.
//!
//! Every folder answers one question; read them top-down. Everything except
//! `host` is host-free logic that builds and is tested natively; `host` is
//! the only code that talks to the proxy-wasm host.

pub mod admission;
pub mod config;
pub mod envoy;
pub mod host;
pub mod identity;
pub mod incident;
pub mod llm;
pub mod metering;
pub mod ratelimit;
pub mod request;
pub mod upstream;
pub mod worker;

/// The RLS wire contract shared with the rate-limit service.
pub use rls_contract as rls;
