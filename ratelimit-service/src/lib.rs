//! tollgate-ratelimit: an Envoy RLS v3 rate-limit service backed by Redis.
//!
//! Layout: pure request → [`plan`] and outcome → [`response`] functions, the
//! storage behind [`storage::Storage`] (Redis single node or cluster, one Lua
//! script per request in [`scripts`]), and thin tonic wiring in [`service`] and
//! [`server`].
//!
//! The wire vocabulary (metadata keys and modes, reserved `tollgate.*`
//! entries, units, bounds) comes from the `rls-contract` crate, shared with
//! the filter; this crate declares none of it.
//!
//! Module dependencies, each on the ones before it only (no cycles):
//! 1. [`clock`], [`scripts`], [`metrics`]: leaves;
//! 2. [`calendar`], [`keys`], [`config`]: leaves too, besides `rls-contract`;
//! 3. [`storage`] (on [`scripts`], and [`keys`] for per-slot idempotency keys);
//! 4. [`plan`] (on [`calendar`], [`config`], [`keys`], [`storage`]);
//! 5. [`response`] (on [`plan`], [`storage`]);
//! 6. [`service`] (on [`clock`], [`config`], [`metrics`], [`plan`],
//!    [`response`], [`storage`]) and [`registry`] (the tenant registry: on
//!    [`clock`], [`metrics`], [`storage`]), then [`server`] (on all the above).
//!
//! [`ledger`] is in two parts: its pure layout and row planning (on [`keys`],
//! [`storage`]), which [`plan`] uses, and its readers, alert delivery, API
//! and [`service::DecisionObserver`] (on [`plan`], [`response`], [`service`]).

// A panic in the request path would drop a connection mid-decision.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod calendar;
pub mod clock;
pub mod config;
pub mod keys;
pub mod ledger;
pub mod metrics;
pub mod plan;
pub mod registry;
pub mod response;
pub mod scripts;
pub mod server;
pub mod service;
pub mod storage;
