//! What does the rate-limit service hear from the filter, and the client
//! about its limits? Limits as RLS descriptors, the reserve before a call,
//! the settle after it, the outbox of settles and the `x-ratelimit-*`
//! headers.

pub mod descriptors;
pub mod headers;
pub mod outbox;
pub mod quota;
pub mod reserve;
pub mod settle;
