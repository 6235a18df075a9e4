//! How is a bearer JWT verified here? JWT identity: who is calling, and for
//! which tenant.
//!
//! Host-free: nothing here talks to proxy-wasm. The host contexts hands in the token
//! (or a closure that reads request headers), the current time and, for
//! remote key sets, the bodies of JWKS responses it fetched through an Envoy
//! cluster. Everything else (config checks, key selection, signature and claim
//! checks, the verified-token cache) is here and unit-tested natively.
//!
//! Time is always a parameter (`now_unix_s`). Inside Envoy there is no clock
//! this module may read on its own, and tests drive expiry through that seam.
//! For the same reason jsonwebtoken's own `exp`/`nbf` checks are switched off
//! (they read the system clock) and done here with the provider's leeway.
//!
//! Flow of [`JwtVerifier::verify`]:
//! 1. size limit, then the verified-token cache (SHA-256 of the token);
//! 2. split and decode header and payload (unverified), reject `alg` values
//!    that are unknown or `none`;
//! 3. pick the provider by the unverified `iss` (or take the one the caller
//!    names) and check the algorithm against that provider's allow-list;
//! 4. pick the key by `kid` and verify the signature with jsonwebtoken, the
//!    `Validation` pinned to exactly the token's (already allowed) algorithm;
//! 5. only then check `exp`/`nbf`/`iat`, `aud`, and extract tenant and user.
//!
//! Where each part lives: `config` (what an operator writes), `error` (why
//! something is refused), `claims` (the verified identity and claim paths),
//! `jwks` (key sets), `keys` (the remote key store), `verify` (the compiled
//! verifier and the flow above), `cache` (verified tokens). Deployments
//! where Envoy's own `jwt_authn` filter verified the token read its claims
//! with [`crate::identity::jwt_authn`] instead.

mod cache;
mod claims;
mod config;
mod error;
mod jwks;
mod keys;
mod verify;

#[cfg(test)]
mod tests;

pub use super::jwt_authn::{claims_from_jwt_authn_payload, JWT_AUTHN_PROVIDER};
pub(super) use claims::{claim_as_id, numeric_date, ClaimPath};
pub use claims::{ProviderSelector, VerifiedIdentity};
pub use config::{JwksSource, JwtAlgorithm, JwtConfig, JwtProvider, RemoteJwks, TokenSource};
pub use error::{JwksError, JwtConfigError, JwtError};
pub use jwks::{parse_jwks, KeySet, MAX_JWKS_BYTES};
pub use keys::{KeyStore, RefreshOutcome};
pub use verify::{extract_token, JwksFetch, JwtVerifier};
