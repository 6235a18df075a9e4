//! What is the tenant registry? Tenants, client keys and provider credentials
//! managed at runtime, kept in Redis, served to the filter (`lookup_api`) and
//! managed by operators (`admin_api`).
//!
//! Modules, each on the ones before it only: [`model`] and [`crypto`] (pure),
//! [`store`] (Redis), [`http`] (the JSON error envelope), then [`lookup_api`],
//! [`admin_api`] and [`openapi`]; [`serve`] runs a listener within bounds.

pub mod admin_api;
pub mod crypto;
pub mod http;
pub mod lookup_api;
pub mod model;
pub mod openapi;
pub mod serve;
pub mod store;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::RngCore as _;
use sha2::{Digest, Sha256};

/// Prefix of every key the service issues.
pub const CLIENT_KEY_PREFIX: &str = "tgk_";

/// A new client key: `tgk_` + 32 random bytes, base64url.
pub fn new_client_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{CLIENT_KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// SHA-256, lowercase hex (the registry's key digest).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_keys_are_random_and_digests_valid() {
        let (a, b) = (new_client_key(), new_client_key());
        assert_ne!(a, b);
        assert!(a.starts_with("tgk_") && a.len() == 4 + 43);
        assert!(rls_contract::registry::valid_key_digest(&sha256_hex(a.as_bytes())));
    }
}
