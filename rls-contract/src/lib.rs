//! What do filter and service say on the wire?
//!
//! The tollgate filter and the `tollgate-ratelimit` service talk Envoy RLS v3
//! (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`) plus a few
//! conventions of their own. Both take every name and number of that contract
//! from this crate, so a rename on one side only cannot happen:
//! - [`messages`]: the RLS v3 messages, with their field numbers;
//! - [`metadata`]: the gRPC metadata keys and the request modes;
//! - [`reserved`]: the descriptor entries that are parameters, not counter keys;
//! - [`unit`]: the units of a limit, by number and by name;
//! - [`bounds`]: the numbers a request must stay within;
//! - [`ledger`]: the usage rows a settle carries for the ledger (`x-tollgate-usage`);
//! - [`registry`]: the tenant registry lookups and change feed (JSON over HTTP).
//!
//! See `README.md` next to this crate for the conventions in prose.

pub mod bounds;
pub mod ledger;
pub mod messages;
pub mod metadata;
pub mod registry;
pub mod reserved;
pub mod unit;

pub use bounds::*;
pub use messages::*;
pub use metadata::*;
pub use reserved::*;
pub use unit::*;
