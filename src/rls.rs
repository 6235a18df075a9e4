//! The Envoy RLS v3 wire messages the filter sends and reads.
//!
//! They, and tollgate's conventions on top of RLS v3 (metadata keys and modes,
//! reserved `tollgate.*` descriptor entries, units, bounds), are declared once
//! in the `rls-contract` crate, which the rate-limit service uses too; this
//! module re-exports it so the filter names them `crate::rls::...`.

pub use rls_contract::*;
