//! Who is calling? The tenant (and end user) of a request, from an API key,
//! Envoy's `jwt_authn` or the filter's own JWT verifier; nothing the client
//! says about itself is believed.

pub mod api_key;
pub mod jwt;
pub mod jwt_authn;
