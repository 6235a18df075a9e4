//! What may an operator write under `jwt`? The config shape serde checks:
//! providers, where tokens are read, where keys come from, which algorithms
//! are allowed, and the defaults of each.

use jsonwebtoken::Algorithm;
use serde::{Deserialize, Serialize};
use serde_json::Value;

fn default_cache_max_entries() -> usize {
    1024
}
fn default_cache_max_ttl_s() -> u64 {
    300
}
fn default_leeway_s() -> u64 {
    60
}
fn default_max_token_bytes() -> usize {
    8192
}
fn default_user_claim() -> Option<String> {
    Some("sub".to_string())
}
fn default_true() -> bool {
    true
}
fn default_refresh_interval_s() -> u64 {
    300
}
fn default_timeout_ms() -> u64 {
    5000
}

/// JWT verification done by this filter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Identity providers whose tokens are accepted. At least one. A token is
    /// matched to a provider by its `iss` claim, so two providers may not
    /// share an issuer.
    pub providers: Vec<JwtProvider>,
    /// How many verified tokens each Envoy worker remembers, so a repeated
    /// token skips the signature check. Oldest entries are evicted first.
    /// 0 turns the cache off. Default 1024.
    #[serde(default = "default_cache_max_entries")]
    pub cache_max_entries: usize,
    /// Longest time, in seconds, a verified token is reused from the cache
    /// without checking its signature again. A cached token never outlives
    /// its own `exp`. Default 300.
    #[serde(default = "default_cache_max_ttl_s")]
    pub cache_max_ttl_s: u64,
}

/// One identity provider (one issuer, or a few that share keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtProvider {
    /// Name of this provider, reported with each verified identity and used
    /// in logs and errors. Unique among providers.
    pub name: String,
    /// Accepted values of the token's `iss` claim (exact string match). At
    /// least one.
    pub issuers: Vec<String>,
    /// Accepted audiences. The token's `aud` (a string or an array of
    /// strings) must contain at least one of them. Must not be empty unless
    /// `allow_any_audience` is true.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Accept tokens whatever their `aud` (and tokens with no `aud`). Only for
    /// issuers that mint tokens for this gateway alone. Default false.
    #[serde(default)]
    pub allow_any_audience: bool,
    /// Where the token is read from. Default: `"authorization"`
    /// (`Authorization: Bearer <token>`).
    #[serde(default)]
    pub from: TokenSource,
    /// Signature algorithms accepted for this provider. At least one. `HS256`,
    /// `HS384`, `HS512` need `hmac_secret_env` and cannot be mixed with the
    /// asymmetric ones (`RS*`, `PS*`, `ES256`, `ES384`, `EdDSA`), which need
    /// `jwks`. `none` does not exist here.
    pub algorithms: Vec<JwtAlgorithm>,
    /// Name of an environment variable (passed into the VM with
    /// `vm_config.environment_variables.host_env_keys`) that holds the shared
    /// secret for `HS*` algorithms, as raw bytes. It must be at least as long
    /// as the hash output (32 bytes for HS256, 48 for HS384, 64 for HS512).
    #[serde(default)]
    pub hmac_secret_env: Option<String>,
    /// Public keys for the asymmetric algorithms: `{"inline": <JWKS>}` or
    /// `{"remote": {...}}`. Required unless the provider is HMAC-only.
    #[serde(default)]
    pub jwks: Option<JwksSource>,
    /// Clock skew allowed, in seconds, when checking `exp`, `nbf` and `iat`.
    /// Default 60.
    #[serde(default = "default_leeway_s")]
    pub leeway_s: u64,
    /// Longest token accepted, in bytes; longer ones are rejected before any
    /// parsing. Default 8192.
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: usize,
    /// Claim that names the tenant, as a dotted path into the payload
    /// (`tenant_id`, `app_metadata.tenant_id`). A top-level claim whose name
    /// is the whole string wins over the dotted reading, so namespaced claims
    /// like `https://example.com/tenant` work. The value must be a non-empty
    /// string or an integer.
    pub tenant_claim: String,
    /// Claim that names the end user, as a dotted path like `tenant_claim`.
    /// Optional in the token. Default `"sub"`; `null` to not extract a user.
    #[serde(default = "default_user_claim")]
    pub user_claim: Option<String>,
    /// Reject tokens without an `exp` claim. Default true.
    #[serde(default = "default_true")]
    pub require_exp: bool,
}

/// Where in the request the token is found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TokenSource {
    /// `Authorization: Bearer <token>` (scheme matched case-insensitively).
    #[default]
    Authorization,
    /// A request header carrying the token.
    Header {
        /// Header name (case-insensitive, as Envoy lowercases them).
        name: String,
        /// Text before the token that must be present and is stripped, for
        /// example `"Bearer "`. Matched case-insensitively. No prefix: the
        /// whole (trimmed) header value is the token.
        #[serde(default)]
        prefix: Option<String>,
    },
    /// A cookie carrying the token.
    Cookie {
        /// Cookie name (case-sensitive).
        name: String,
    },
}

/// Where a provider's public keys come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum JwksSource {
    /// A JWKS document written into the config: a JSON object
    /// `{"keys": [...]}`, or a string holding that JSON.
    Inline(Value),
    /// A JWKS document fetched over HTTP through an Envoy cluster and
    /// refreshed periodically. Until the first fetch succeeds, tokens of this
    /// provider are answered with 503 `keys_unavailable`.
    Remote(RemoteJwks),
}

/// A JWKS endpoint reached through an Envoy cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteJwks {
    /// Name of the Envoy cluster that reaches the identity provider (TLS is
    /// configured on the cluster).
    pub cluster: String,
    /// Request path of the JWKS document, e.g. `/.well-known/jwks.json`.
    pub path: String,
    /// `:authority` (Host) sent with the request. Default: the cluster name.
    #[serde(default)]
    pub authority: Option<String>,
    /// Seconds between refreshes after a successful fetch. At least 10.
    /// Failed fetches are retried sooner, with backoff, and the last good
    /// keys stay in use meanwhile. Default 300.
    #[serde(default = "default_refresh_interval_s")]
    pub refresh_interval_s: u64,
    /// Timeout of one fetch, in milliseconds. Default 5000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

/// A JWS signature algorithm that may be allowed. There is no `none`.
#[allow(clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RS384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    RS512,
    /// RSASSA-PSS with SHA-256.
    PS256,
    /// RSASSA-PSS with SHA-384.
    PS384,
    /// RSASSA-PSS with SHA-512.
    PS512,
    /// ECDSA on P-256 with SHA-256.
    ES256,
    /// ECDSA on P-384 with SHA-384.
    ES384,
    /// Ed25519.
    EdDSA,
    /// HMAC with SHA-256 (shared secret).
    HS256,
    /// HMAC with SHA-384 (shared secret).
    HS384,
    /// HMAC with SHA-512 (shared secret).
    HS512,
}

impl JwtAlgorithm {
    const ALL: [JwtAlgorithm; 12] = [
        Self::RS256,
        Self::RS384,
        Self::RS512,
        Self::PS256,
        Self::PS384,
        Self::PS512,
        Self::ES256,
        Self::ES384,
        Self::EdDSA,
        Self::HS256,
        Self::HS384,
        Self::HS512,
    ];

    /// The `alg` header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RS256 => "RS256",
            Self::RS384 => "RS384",
            Self::RS512 => "RS512",
            Self::PS256 => "PS256",
            Self::PS384 => "PS384",
            Self::PS512 => "PS512",
            Self::ES256 => "ES256",
            Self::ES384 => "ES384",
            Self::EdDSA => "EdDSA",
            Self::HS256 => "HS256",
            Self::HS384 => "HS384",
            Self::HS512 => "HS512",
        }
    }

    /// Parses an `alg` header value (case-sensitive, as RFC 7515 says).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == name)
    }

    /// True for the shared-secret algorithms.
    pub fn is_hmac(self) -> bool {
        matches!(self, Self::HS256 | Self::HS384 | Self::HS512)
    }

    pub(super) fn hmac_min_secret_bytes(self) -> usize {
        match self {
            Self::HS384 => 48,
            Self::HS512 => 64,
            _ => 32,
        }
    }

    pub(super) fn to_jsonwebtoken(self) -> Algorithm {
        match self {
            Self::RS256 => Algorithm::RS256,
            Self::RS384 => Algorithm::RS384,
            Self::RS512 => Algorithm::RS512,
            Self::PS256 => Algorithm::PS256,
            Self::PS384 => Algorithm::PS384,
            Self::PS512 => Algorithm::PS512,
            Self::ES256 => Algorithm::ES256,
            Self::ES384 => Algorithm::ES384,
            Self::EdDSA => Algorithm::EdDSA,
            Self::HS256 => Algorithm::HS256,
            Self::HS384 => Algorithm::HS384,
            Self::HS512 => Algorithm::HS512,
        }
    }
}
