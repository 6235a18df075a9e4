//! What does the rate-limit service hear from the filter? Limits as RLS
//! descriptors (reserve and settle) and the outbox of settles.

pub mod descriptors;
pub mod outbox;
