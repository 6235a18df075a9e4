//! tollgate-ratelimit: an Envoy RLS v3 rate-limit service backed by Redis.
//!
//! Layout: pure request → [`plan`] and outcome → [`response`] functions, the
//! storage behind [`storage::Storage`] (Redis single node or cluster, one Lua
//! script per request in [`scripts`]), and thin tonic wiring in [`service`] and
//! [`server`].

// A panic in the request path would drop a connection mid-decision.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod calendar;
pub mod clock;
pub mod config;
pub mod keys;
pub mod metrics;
pub mod plan;
pub mod response;
pub mod scripts;
pub mod server;
pub mod service;
pub mod storage;
