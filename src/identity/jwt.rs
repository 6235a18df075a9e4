//! JWT identity: who is calling, and for which tenant.
//!
//! Host-free: nothing here talks to proxy-wasm. The glue hands in the token
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
//! Also here: [`claims_from_jwt_authn_payload`], for deployments where Envoy's
//! own `jwt_authn` filter verified the token and this filter only reads the
//! claims it left in dynamic metadata.

use std::collections::VecDeque;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hashbrown::HashMap;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use thiserror::Error;

// ---------------------------------------------------------------------------
// Config (shape, checked by serde)
// ---------------------------------------------------------------------------

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

    fn hmac_min_secret_bytes(self) -> usize {
        match self {
            Self::HS384 => 48,
            Self::HS512 => 64,
            _ => 32,
        }
    }

    fn to_jsonwebtoken(self) -> Algorithm {
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

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// A config that parsed but does not make sense. `path` names the field, like
/// `jwt.providers[0].algorithms`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum JwtConfigError {
    /// A list or string that must not be empty is empty.
    #[error("{path}: must not be empty")]
    Empty {
        /// Field path.
        path: String,
    },
    /// A value is out of its allowed range or shape.
    #[error("{path}: {reason}")]
    Invalid {
        /// Field path.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Two providers use the same name or the same issuer.
    #[error("{path}: {what} `{value}` is already used by providers[{other}]")]
    Duplicate {
        /// Field path.
        path: String,
        /// "name" or "issuer".
        what: &'static str,
        /// The repeated value.
        value: String,
        /// Index of the provider that has it first.
        other: usize,
    },
    /// An HMAC algorithm is allowed but no secret is configured.
    #[error("{path}: {alg} requires hmac_secret_env")]
    HmacWithoutSecret {
        /// Field path.
        path: String,
        /// The HMAC algorithm.
        alg: &'static str,
    },
    /// HMAC and public-key algorithms (or HMAC and a JWKS) are mixed in one
    /// provider, which is what algorithm-confusion attacks need.
    #[error("{path}: {alg} cannot be combined with {other}; use a separate provider")]
    HmacMixed {
        /// Field path.
        path: String,
        /// The HMAC algorithm.
        alg: &'static str,
        /// What it is mixed with.
        other: String,
    },
    /// The environment variable named by `hmac_secret_env` is missing.
    #[error("{path}: environment variable `{var}` is not set or is empty")]
    MissingEnv {
        /// Field path.
        path: String,
        /// Variable name.
        var: String,
    },
    /// An inline JWKS is unusable.
    #[error("{path}: {source}")]
    Jwks {
        /// Field path.
        path: String,
        /// Why.
        source: JwksError,
    },
}

impl JwtConfigError {
    /// The field path this error is about.
    pub fn path(&self) -> &str {
        match self {
            Self::Empty { path }
            | Self::Invalid { path, .. }
            | Self::Duplicate { path, .. }
            | Self::HmacWithoutSecret { path, .. }
            | Self::HmacMixed { path, .. }
            | Self::MissingEnv { path, .. }
            | Self::Jwks { path, .. } => path,
        }
    }
}

/// Why a JWKS document gave no usable key set.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum JwksError {
    /// The document is larger than [`MAX_JWKS_BYTES`].
    #[error("JWKS document is larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    /// Not JSON, or not an object with a `keys` array.
    #[error("JWKS document is not a JSON object with a `keys` array: {0}")]
    NotJwks(String),
    /// The document has no key usable for signature verification.
    #[error(
        "JWKS has no usable signing key ({skipped} skipped: unsupported type, curve, size or use)"
    )]
    NoUsableKeys {
        /// Keys present but skipped.
        skipped: usize,
    },
    /// The HTTP fetch failed (no response, or a status other than 200).
    #[error("JWKS fetch failed: {0}")]
    FetchFailed(String),
}

/// Why a token was not accepted. Each variant has a stable machine code
/// ([`JwtError::code`]) and an HTTP status ([`JwtError::http_status`]).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum JwtError {
    /// No token where the provider expects one.
    #[error("no bearer token in the request")]
    MissingToken,
    /// Longer than the provider's `max_token_bytes`.
    #[error("token is longer than {limit} bytes")]
    TokenTooLarge {
        /// The limit that was exceeded.
        limit: usize,
    },
    /// Not three base64url parts, bad base64, header or payload not a JSON
    /// object, claims of the wrong type, or a required `exp` missing.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// `alg` is `none`, unknown, or not allowed for the provider.
    #[error("token algorithm `{0}` is not allowed")]
    DisallowedAlgorithm(String),
    /// `iss` missing or not a configured issuer (of the selected provider).
    #[error("token issuer is not accepted")]
    WrongIssuer,
    /// `aud` missing or none of its values is configured.
    #[error("token audience is not accepted")]
    WrongAudience,
    /// No key with the token's `kid` (or, without `kid`, not exactly one
    /// candidate key) for the token's algorithm.
    #[error("no signing key matches the token")]
    UnknownKeyId,
    /// The signature does not verify.
    #[error("token signature is invalid")]
    BadSignature,
    /// `exp` (plus leeway) has passed.
    #[error("token has expired")]
    Expired,
    /// `nbf` or `iat` is in the future (beyond the leeway).
    #[error("token is not valid yet")]
    NotYetValid,
    /// The tenant claim is absent or not a non-empty string or integer.
    #[error("tenant claim `{0}` is missing or not a string")]
    MissingTenantClaim(String),
    /// The provider's remote JWKS has never been fetched successfully.
    #[error("signing keys of provider `{0}` are not available yet")]
    KeysUnavailable(String),
    /// The caller named a provider index that does not exist (a bug in the
    /// caller, not in the request).
    #[error("JWT provider index {0} is not configured")]
    ProviderNotConfigured(usize),
}

impl JwtError {
    /// Stable machine-readable code, for response bodies, logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::TokenTooLarge { .. } => "token_too_large",
            Self::Malformed(_) => "malformed",
            Self::DisallowedAlgorithm(_) => "disallowed_algorithm",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
            Self::UnknownKeyId => "unknown_key_id",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::MissingTenantClaim(_) => "missing_tenant_claim",
            Self::KeysUnavailable(_) => "keys_unavailable",
            Self::ProviderNotConfigured(_) => "provider_not_configured",
        }
    }

    /// HTTP status to answer with.
    ///
    /// `keys_unavailable` is 503, not 401: the client's token may be fine,
    /// the gateway just cannot check it yet (the identity provider was not
    /// reachable), and a 401 would make clients throw away good tokens.
    /// `missing_tenant_claim` is 403: the token is genuine but does not grant
    /// access to any tenant.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::MissingTenantClaim(_) => 403,
            Self::KeysUnavailable(_) => 503,
            Self::ProviderNotConfigured(_) => 500,
            _ => 401,
        }
    }

    /// Value for a `WWW-Authenticate` header on 401 answers (RFC 6750).
    pub fn www_authenticate(&self) -> Option<&'static str> {
        match self.http_status() {
            401 if *self == Self::MissingToken => Some("Bearer"),
            401 => Some("Bearer error=\"invalid_token\""),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------
// Verified identity
// ---------------------------------------------------------------------------

/// What a verified token says about the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedIdentity {
    /// Name of the provider that accepted the token.
    pub provider: String,
    /// Value of the tenant claim (integers rendered in decimal).
    pub tenant_id: String,
    /// Value of the user claim, when configured and present.
    pub user_id: Option<String>,
    /// The token's `exp`, when it has one.
    pub exp: Option<u64>,
}

/// Which provider must accept a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderSelector {
    /// The provider whose `issuers` contain the token's `iss`.
    Auto,
    /// Exactly this provider (index into `JwtConfig::providers`); its issuers
    /// must still contain the token's `iss`.
    Index(usize),
}

// ---------------------------------------------------------------------------
// Claim paths
// ---------------------------------------------------------------------------

/// A claim named by a dotted path (see `JwtProvider::tenant_claim`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ClaimPath {
    whole: String,
    segments: Vec<String>,
}

impl ClaimPath {
    fn parse(path: &str) -> Option<Self> {
        if path.is_empty() {
            return None;
        }
        let segments: Vec<String> = path.split('.').map(str::to_string).collect();
        if segments.iter().any(String::is_empty) && !path.contains('/') {
            // `a..b` or `.a` is a typo; a URL-like namespaced claim may
            // legitimately contain dots and is then matched whole.
            return None;
        }
        Some(Self {
            whole: path.to_string(),
            segments,
        })
    }

    fn lookup<'a>(&self, claims: &'a Map<String, Value>) -> Option<&'a Value> {
        if let Some(v) = claims.get(&self.whole) {
            return Some(v);
        }
        let mut segments = self.segments.iter();
        let first = segments.next()?;
        let mut current = claims.get(first)?;
        for seg in segments {
            current = current.as_object()?.get(seg)?;
        }
        Some(current)
    }
}

/// A claim value usable as an identifier: a non-empty string, or an integer
/// (JSON integer, or a float with no fraction, as protobuf `Struct` carries
/// every number as a double).
fn claim_as_id(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                Some(u.to_string())
            } else if let Some(i) = n.as_i64() {
                Some(i.to_string())
            } else {
                let f = n.as_f64()?;
                // Beyond 2^53 a double no longer holds every integer exactly.
                if f.is_finite() && f.fract() == 0.0 && f.abs() <= 9_007_199_254_740_992.0 {
                    Some(format!("{f:.0}"))
                } else {
                    None
                }
            }
        }
        _ => None,
    }
}

/// A NumericDate claim (`exp`, `nbf`, `iat`): `Ok(None)` when absent.
/// Fractions are dropped; dates before 1970 count as 0.
fn numeric_date(
    claims: &Map<String, Value>,
    name: &'static str,
    err: &'static str,
) -> Result<Option<u64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(u) = n.as_u64() {
                Ok(Some(u))
            } else if let Some(f) = n.as_f64() {
                if !f.is_finite() {
                    return Err(JwtError::Malformed(err));
                }
                // `as` saturates for floats, so huge values become u64::MAX.
                Ok(Some(if f <= 0.0 { 0 } else { f as u64 }))
            } else {
                Err(JwtError::Malformed(err))
            }
        }
        Some(_) => Err(JwtError::Malformed(err)),
    }
}

// ---------------------------------------------------------------------------
// JWKS key sets
// ---------------------------------------------------------------------------

/// Largest JWKS document accepted.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;

/// RSA moduli accepted, in bits. Below 2048 is too weak; above 4096 the RSA
/// backend refuses to verify anyway.
const RSA_MIN_BITS: usize = 2048;
const RSA_MAX_BITS: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl KeyKind {
    fn supports(self, alg: JwtAlgorithm) -> bool {
        use JwtAlgorithm::*;
        match self {
            Self::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            Self::P256 => alg == ES256,
            Self::P384 => alg == ES384,
            Self::Ed25519 => alg == EdDSA,
        }
    }
}

#[derive(Clone)]
struct JwkKey {
    kid: Option<String>,
    kind: KeyKind,
    /// The JWK's own `alg`, when it pins one.
    alg: Option<JwtAlgorithm>,
    key: DecodingKey,
}

impl JwkKey {
    fn accepts(&self, alg: JwtAlgorithm) -> bool {
        self.kind.supports(alg) && self.alg.is_none_or(|a| a == alg)
    }
}

/// The usable signature-verification keys of one JWKS document.
#[derive(Clone)]
pub struct KeySet {
    keys: Vec<JwkKey>,
    skipped: usize,
    fingerprint: [u8; 32],
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("kids", &self.kids())
            .field("skipped", &self.skipped)
            .finish()
    }
}

impl PartialEq for KeySet {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint
    }
}

impl KeySet {
    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when no key is usable (never the case for a parsed set).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Keys in the document that were skipped (encryption keys, symmetric
    /// keys, unsupported types or curves, RSA outside 2048..=4096 bits).
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// The `kid` of each usable key, in document order.
    pub fn kids(&self) -> Vec<Option<&str>> {
        self.keys.iter().map(|k| k.kid.as_deref()).collect()
    }

    /// Whether any key can verify `alg`.
    fn supports(&self, alg: JwtAlgorithm) -> bool {
        self.keys.iter().any(|k| k.accepts(alg))
    }

    /// Picks the key for a token. With a `kid`, the key with that `kid` that
    /// accepts the algorithm. Without one, the only key that accepts the
    /// algorithm; if several do, the token is refused rather than tried
    /// against each (which would turn one bad token into many signature
    /// checks and blur key rotation).
    fn select(&self, kid: Option<&str>, alg: JwtAlgorithm) -> Result<&DecodingKey, JwtError> {
        let mut candidates = self.keys.iter().filter(|k| k.accepts(alg));
        match kid {
            Some(kid) => candidates
                .find(|k| k.kid.as_deref() == Some(kid))
                .map(|k| &k.key)
                .ok_or(JwtError::UnknownKeyId),
            None => match (candidates.next(), candidates.next()) {
                (Some(only), None) => Ok(&only.key),
                _ => Err(JwtError::UnknownKeyId),
            },
        }
    }
}

#[derive(Deserialize)]
struct RawJwk {
    kty: Option<String>,
    kid: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    key_ops: Option<Vec<String>>,
    alg: Option<String>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

fn b64url(s: &str) -> Option<Vec<u8>> {
    // JWK members are unpadded base64url, but some issuers pad them.
    URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()
}

/// Turns one JWK into a key, or `None` when it is not usable for verifying
/// signatures here. Lengths are checked so that no malformed key can reach a
/// crypto routine that might index out of bounds.
fn build_jwk(raw: &RawJwk, hasher: &mut Sha256) -> Option<JwkKey> {
    if raw.use_.as_deref().is_some_and(|u| u != "sig") {
        return None;
    }
    if raw
        .key_ops
        .as_ref()
        .is_some_and(|ops| !ops.iter().any(|o| o == "verify"))
    {
        return None;
    }
    let alg = match raw.alg.as_deref() {
        None => None,
        Some(name) => Some(JwtAlgorithm::from_name(name).filter(|a| !a.is_hmac())?),
    };
    let (kind, key, material): (KeyKind, DecodingKey, Vec<&str>) = match raw.kty.as_deref()? {
        "RSA" => {
            let (n, e) = (raw.n.as_deref()?, raw.e.as_deref()?);
            let n_bytes = b64url(n)?;
            let e_bytes = b64url(e)?;
            let n_trimmed: &[u8] = match n_bytes.iter().position(|b| *b != 0) {
                Some(i) => n_bytes.get(i..)?,
                None => return None,
            };
            let leading_zero_bits = n_trimmed.first().map_or(8, |b| b.leading_zeros() as usize);
            let bits = n_trimmed
                .len()
                .saturating_mul(8)
                .saturating_sub(leading_zero_bits);
            if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits)
                || e_bytes.is_empty()
                || e_bytes.len() > 8
            {
                return None;
            }
            (
                KeyKind::Rsa,
                DecodingKey::from_rsa_raw_components(n_trimmed, &e_bytes),
                vec!["RSA", n, e],
            )
        }
        "EC" => {
            let (crv, x, y) = (raw.crv.as_deref()?, raw.x.as_deref()?, raw.y.as_deref()?);
            let (kind, size) = match crv {
                "P-256" => (KeyKind::P256, 32),
                "P-384" => (KeyKind::P384, 48),
                _ => return None,
            };
            let (xb, yb) = (b64url(x)?, b64url(y)?);
            if xb.len() != size || yb.len() != size {
                return None;
            }
            let mut point = Vec::with_capacity(1 + 2 * size);
            point.push(0x04);
            point.extend_from_slice(&xb);
            point.extend_from_slice(&yb);
            (
                kind,
                DecodingKey::from_ec_der(&point),
                vec!["EC", crv, x, y],
            )
        }
        "OKP" => {
            let (crv, x) = (raw.crv.as_deref()?, raw.x.as_deref()?);
            if crv != "Ed25519" {
                return None;
            }
            let xb = b64url(x)?;
            // jsonwebtoken slices the first 32 bytes: shorter would panic.
            if xb.len() != 32 {
                return None;
            }
            (
                KeyKind::Ed25519,
                DecodingKey::from_ed_der(&xb),
                vec!["OKP", crv, x],
            )
        }
        // "oct" (shared secrets) never come from a JWKS here: HMAC secrets
        // are configured through `hmac_secret_env` only.
        _ => return None,
    };
    if let Some(a) = alg {
        if !kind.supports(a) {
            return None;
        }
    }
    hasher.update(raw.kid.as_deref().unwrap_or("").as_bytes());
    hasher.update([0]);
    hasher.update(alg.map_or("", JwtAlgorithm::as_str).as_bytes());
    for m in material {
        hasher.update([0]);
        hasher.update(m.as_bytes());
    }
    hasher.update([0xff]);
    Some(JwkKey {
        kid: raw.kid.clone(),
        kind,
        alg,
        key,
    })
}

/// Parses a JWKS document (`{"keys": [...]}`) into the keys usable for
/// signature verification. Unusable keys are skipped and counted; a
/// document with none is an error.
pub fn parse_jwks(body: &[u8]) -> Result<KeySet, JwksError> {
    if body.len() > MAX_JWKS_BYTES {
        return Err(JwksError::TooLarge);
    }
    let doc: Value = serde_json::from_slice(body).map_err(|e| JwksError::NotJwks(e.to_string()))?;
    keyset_from_value(&doc)
}

fn keyset_from_value(doc: &Value) -> Result<KeySet, JwksError> {
    let entries = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| JwksError::NotJwks("missing `keys` array".to_string()))?;
    let mut hasher = Sha256::new();
    let mut keys = Vec::new();
    let mut skipped = 0;
    for entry in entries {
        match serde_json::from_value::<RawJwk>(entry.clone())
            .ok()
            .and_then(|raw| build_jwk(&raw, &mut hasher))
        {
            Some(k) => keys.push(k),
            None => skipped += 1,
        }
    }
    if keys.is_empty() {
        return Err(JwksError::NoUsableKeys { skipped });
    }
    Ok(KeySet {
        keys,
        skipped,
        fingerprint: hasher.finalize().into(),
    })
}

// ---------------------------------------------------------------------------
// Remote key store
// ---------------------------------------------------------------------------

/// Keys of a remote JWKS, with the refresh schedule.
///
/// Pure state machine: the glue asks [`KeyStore::is_refresh_due`], calls
/// [`KeyStore::begin_refresh`] when it dispatches the fetch, and reports the
/// outcome with [`KeyStore::complete_refresh`]. A failed or unparsable fetch
/// keeps the last good keys and is retried with backoff (5 s, 10 s, 20 s, ...
/// up to the refresh interval).
#[derive(Debug, Clone)]
pub struct KeyStore {
    keys: Option<KeySet>,
    refresh_interval_s: u64,
    in_flight_timeout_s: u64,
    next_attempt_s: u64,
    in_flight_since: Option<u64>,
    consecutive_failures: u32,
}

/// What a completed refresh did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// New keys are in use. `changed` is false when they equal the old ones.
    Updated {
        /// The key material differs from the previous set.
        changed: bool,
    },
    /// The fetch or parse failed; the previous keys (if any) stay in use.
    Failed {
        /// Why.
        error: JwksError,
        /// Whether earlier keys are still available.
        kept_last_good: bool,
    },
}

const RETRY_BASE_S: u64 = 5;

impl KeyStore {
    /// A store with no keys yet; the first refresh is due at once.
    pub fn new(refresh_interval_s: u64, timeout_ms: u64) -> Self {
        Self {
            keys: None,
            refresh_interval_s,
            // If the host never reports back (it should, even on timeout),
            // allow a new fetch once twice the timeout has passed.
            in_flight_timeout_s: (timeout_ms / 1000).saturating_mul(2).max(2),
            next_attempt_s: 0,
            in_flight_since: None,
            consecutive_failures: 0,
        }
    }

    /// The current keys, if a fetch ever succeeded.
    pub fn keys(&self) -> Option<&KeySet> {
        self.keys.as_ref()
    }

    /// Whether a fetch should be dispatched now.
    pub fn is_refresh_due(&self, now_unix_s: u64) -> bool {
        match self.in_flight_since {
            Some(since) => now_unix_s >= since.saturating_add(self.in_flight_timeout_s),
            None => now_unix_s >= self.next_attempt_s,
        }
    }

    /// Records that a fetch was dispatched.
    pub fn begin_refresh(&mut self, now_unix_s: u64) {
        self.in_flight_since = Some(now_unix_s);
    }

    /// Records the outcome of a fetch: the parsed key set, or why there is
    /// none.
    pub fn complete_refresh(
        &mut self,
        result: Result<KeySet, JwksError>,
        now_unix_s: u64,
    ) -> RefreshOutcome {
        self.in_flight_since = None;
        match result {
            Ok(keys) => {
                let changed = self.keys.as_ref() != Some(&keys);
                self.keys = Some(keys);
                self.consecutive_failures = 0;
                self.next_attempt_s = now_unix_s.saturating_add(self.refresh_interval_s);
                RefreshOutcome::Updated { changed }
            }
            Err(error) => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                let shift = self.consecutive_failures.saturating_sub(1).min(16);
                let delay = RETRY_BASE_S
                    .saturating_mul(1u64 << shift)
                    .min(self.refresh_interval_s);
                self.next_attempt_s = now_unix_s.saturating_add(delay);
                RefreshOutcome::Failed {
                    error,
                    kept_last_good: self.keys.is_some(),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Compiled verifier
// ---------------------------------------------------------------------------

enum ProviderKeys {
    Hmac(DecodingKey),
    Static(KeySet),
    Remote { remote: RemoteJwks, store: KeyStore },
}

struct CompiledProvider {
    name: String,
    issuers: Vec<String>,
    audiences: Vec<String>,
    allow_any_audience: bool,
    source: TokenSource,
    algorithms: Vec<JwtAlgorithm>,
    keys: ProviderKeys,
    leeway_s: u64,
    max_token_bytes: usize,
    tenant_claim: ClaimPath,
    user_claim: Option<ClaimPath>,
    require_exp: bool,
}

/// A JWKS fetch the glue should dispatch (`GET path` to `cluster`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksFetch {
    /// Pass back to [`JwtVerifier::complete_jwks_fetch`].
    pub provider_index: usize,
    /// Envoy cluster to send the request to.
    pub cluster: String,
    /// `:path`.
    pub path: String,
    /// `:authority`.
    pub authority: String,
    /// Timeout for the call.
    pub timeout_ms: u64,
}

/// Compiled JWT config plus its per-worker state (remote keys and the
/// verified-token cache). One per Envoy worker (root context).
pub struct JwtVerifier {
    providers: Vec<CompiledProvider>,
    cache: TokenCache,
    max_token_bytes_any: usize,
    signature_checks: u64,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field(
                "providers",
                &self
                    .providers
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("cached", &self.cache.len())
            .finish()
    }
}

fn non_empty(path: &str, value: &str) -> Result<(), JwtConfigError> {
    if value.trim().is_empty() {
        return Err(JwtConfigError::Empty {
            path: path.to_string(),
        });
    }
    Ok(())
}

fn invalid(path: String, reason: impl Into<String>) -> JwtConfigError {
    JwtConfigError::Invalid {
        path,
        reason: reason.into(),
    }
}

impl JwtConfig {
    /// Checks the meaning of the config and builds the verifier. `env` reads
    /// environment variables (in the VM: `std::env::var(..).ok()`), for
    /// `hmac_secret_env`. Errors name the field, e.g.
    /// `jwt.providers[0].algorithms: HS256 requires hmac_secret_env`.
    pub fn compile(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<JwtVerifier, JwtConfigError> {
        // jsonwebtoken picks its crypto backend from crate features and
        // installs a panicking one if both backends end up enabled through
        // feature unification. Pin the pure-Rust one (the only one that
        // builds for wasm); an Err only means a provider is already set.
        let _ = jsonwebtoken::crypto::CryptoProvider::install_default(
            &jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER,
        );
        if self.providers.is_empty() {
            return Err(JwtConfigError::Empty {
                path: "jwt.providers".to_string(),
            });
        }
        let mut providers: Vec<CompiledProvider> = Vec::with_capacity(self.providers.len());
        for (i, p) in self.providers.iter().enumerate() {
            let compiled = compile_provider(i, p, env)?;
            for (j, earlier) in providers.iter().enumerate() {
                if earlier.name == compiled.name {
                    return Err(JwtConfigError::Duplicate {
                        path: format!("jwt.providers[{i}].name"),
                        what: "name",
                        value: compiled.name.clone(),
                        other: j,
                    });
                }
                if let Some(iss) = compiled
                    .issuers
                    .iter()
                    .find(|iss| earlier.issuers.contains(iss))
                {
                    return Err(JwtConfigError::Duplicate {
                        path: format!("jwt.providers[{i}].issuers"),
                        what: "issuer",
                        value: iss.clone(),
                        other: j,
                    });
                }
            }
            providers.push(compiled);
        }
        let max_token_bytes_any = providers
            .iter()
            .map(|p| p.max_token_bytes)
            .max()
            .unwrap_or(0);
        Ok(JwtVerifier {
            providers,
            cache: TokenCache::new(self.cache_max_entries, self.cache_max_ttl_s),
            max_token_bytes_any,
            signature_checks: 0,
        })
    }
}

fn compile_provider(
    i: usize,
    p: &JwtProvider,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<CompiledProvider, JwtConfigError> {
    let at = |field: &str| format!("jwt.providers[{i}].{field}");
    non_empty(&at("name"), &p.name)?;
    if p.issuers.is_empty() {
        return Err(JwtConfigError::Empty {
            path: at("issuers"),
        });
    }
    for (k, iss) in p.issuers.iter().enumerate() {
        non_empty(&at(&format!("issuers[{k}]")), iss)?;
    }
    if p.audiences.is_empty() && !p.allow_any_audience {
        return Err(invalid(
            at("audiences"),
            "must not be empty unless allow_any_audience is true",
        ));
    }
    for (k, aud) in p.audiences.iter().enumerate() {
        non_empty(&at(&format!("audiences[{k}]")), aud)?;
    }
    match &p.from {
        TokenSource::Authorization => {}
        TokenSource::Header { name, prefix } => {
            non_empty(&at("from.header.name"), name)?;
            if prefix.as_deref() == Some("") {
                return Err(invalid(
                    at("from.header.prefix"),
                    "must not be empty; omit it instead",
                ));
            }
        }
        TokenSource::Cookie { name } => non_empty(&at("from.cookie.name"), name)?,
    }
    if p.max_token_bytes == 0 {
        return Err(invalid(at("max_token_bytes"), "must be greater than 0"));
    }
    let tenant_claim = ClaimPath::parse(&p.tenant_claim).ok_or_else(|| {
        invalid(
            at("tenant_claim"),
            "must be a dotted claim path like `tenant_id` or `app_metadata.tenant_id`",
        )
    })?;
    let user_claim =
        match &p.user_claim {
            None => None,
            Some(c) => Some(ClaimPath::parse(c).ok_or_else(|| {
                invalid(at("user_claim"), "must be a dotted claim path like `sub`")
            })?),
        };

    if p.algorithms.is_empty() {
        return Err(JwtConfigError::Empty {
            path: at("algorithms"),
        });
    }
    let mut algorithms: Vec<JwtAlgorithm> = Vec::new();
    for a in &p.algorithms {
        if !algorithms.contains(a) {
            algorithms.push(*a);
        }
    }
    let hmac_alg = algorithms.iter().copied().find(|a| a.is_hmac());
    let asym_alg = algorithms.iter().copied().find(|a| !a.is_hmac());

    let keys = match hmac_alg {
        Some(h) => {
            if let Some(a) = asym_alg {
                return Err(JwtConfigError::HmacMixed {
                    path: at("algorithms"),
                    alg: h.as_str(),
                    other: a.as_str().to_string(),
                });
            }
            if p.jwks.is_some() {
                return Err(JwtConfigError::HmacMixed {
                    path: at("algorithms"),
                    alg: h.as_str(),
                    other: "jwks".to_string(),
                });
            }
            let var = p
                .hmac_secret_env
                .as_deref()
                .ok_or(JwtConfigError::HmacWithoutSecret {
                    path: at("algorithms"),
                    alg: h.as_str(),
                })?;
            non_empty(&at("hmac_secret_env"), var)?;
            let secret =
                env(var)
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| JwtConfigError::MissingEnv {
                        path: at("hmac_secret_env"),
                        var: var.to_string(),
                    })?;
            let needed = algorithms
                .iter()
                .map(|a| a.hmac_min_secret_bytes())
                .max()
                .unwrap_or(32);
            if secret.len() < needed {
                return Err(invalid(
                    at("hmac_secret_env"),
                    format!("the secret in `{var}` is {} bytes; the allowed algorithms need at least {needed}", secret.len()),
                ));
            }
            ProviderKeys::Hmac(DecodingKey::from_secret(secret.as_bytes()))
        }
        None => {
            if p.hmac_secret_env.is_some() {
                return Err(invalid(
                    at("hmac_secret_env"),
                    "is set but no HS256/HS384/HS512 algorithm is allowed",
                ));
            }
            match &p.jwks {
                None => {
                    return Err(invalid(
                        at("jwks"),
                        "is required for RS*/PS*/ES*/EdDSA algorithms",
                    ))
                }
                Some(JwksSource::Inline(doc)) => {
                    let path = at("jwks.inline");
                    let set = match doc {
                        Value::String(text) => parse_jwks(text.as_bytes()),
                        other => keyset_from_value(other),
                    }
                    .map_err(|source| JwtConfigError::Jwks {
                        path: path.clone(),
                        source,
                    })?;
                    if let Some(a) = algorithms.iter().find(|a| !set.supports(**a)) {
                        // Not fatal in the protocol, but an allowed algorithm
                        // that no key can verify is almost surely a mistake.
                        return Err(invalid(
                            path,
                            format!("no key can verify {}, which is in algorithms", a.as_str()),
                        ));
                    }
                    ProviderKeys::Static(set)
                }
                Some(JwksSource::Remote(r)) => {
                    non_empty(&at("jwks.remote.cluster"), &r.cluster)?;
                    if !r.path.starts_with('/') {
                        return Err(invalid(at("jwks.remote.path"), "must start with `/`"));
                    }
                    if let Some(a) = &r.authority {
                        non_empty(&at("jwks.remote.authority"), a)?;
                    }
                    if r.refresh_interval_s < 10 {
                        return Err(invalid(
                            at("jwks.remote.refresh_interval_s"),
                            "must be at least 10",
                        ));
                    }
                    if r.timeout_ms == 0 || r.timeout_ms > 60_000 {
                        return Err(invalid(
                            at("jwks.remote.timeout_ms"),
                            "must be between 1 and 60000",
                        ));
                    }
                    ProviderKeys::Remote {
                        remote: r.clone(),
                        store: KeyStore::new(r.refresh_interval_s, r.timeout_ms),
                    }
                }
            }
        }
    };

    Ok(CompiledProvider {
        name: p.name.clone(),
        issuers: p.issuers.clone(),
        audiences: p.audiences.clone(),
        allow_any_audience: p.allow_any_audience,
        source: p.from.clone(),
        algorithms,
        keys,
        leeway_s: p.leeway_s,
        max_token_bytes: p.max_token_bytes,
        tenant_claim,
        user_claim,
        require_exp: p.require_exp,
    })
}

/// Reads the token for `source` through `header` (a lookup of a request
/// header by lowercase name). `None` when absent or empty.
pub fn extract_token(
    source: &TokenSource,
    header: &dyn Fn(&str) -> Option<String>,
) -> Option<String> {
    let token = match source {
        TokenSource::Authorization => {
            let value = header("authorization")?;
            let value = value.trim();
            let (scheme, rest) = value.split_once(' ')?;
            if !scheme.eq_ignore_ascii_case("bearer") {
                return None;
            }
            rest.trim().to_string()
        }
        TokenSource::Header { name, prefix } => {
            let value = header(&name.to_ascii_lowercase())?;
            let value = value.trim();
            match prefix {
                None => value.to_string(),
                Some(prefix) => {
                    let head = value.get(..prefix.len())?;
                    if !head.eq_ignore_ascii_case(prefix) {
                        return None;
                    }
                    value.get(prefix.len()..)?.trim().to_string()
                }
            }
        }
        TokenSource::Cookie { name } => {
            let cookies = header("cookie")?;
            cookies.split(';').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                (k.trim() == name).then(|| v.trim().trim_matches('"').to_string())
            })?
        }
    };
    (!token.is_empty()).then_some(token)
}

struct Parsed<'a> {
    alg: JwtAlgorithm,
    kid: Option<String>,
    claims: Map<String, Value>,
    token: &'a str,
}

fn is_b64url_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Splits and decodes a compact JWS without verifying it.
fn parse_unverified(token: &str) -> Result<Parsed<'_>, JwtError> {
    if !token.bytes().all(|b| is_b64url_char(b) || b == b'.') {
        return Err(JwtError::Malformed(
            "token contains characters outside base64url",
        ));
    }
    let mut parts = token.split('.');
    let (header_b64, payload_b64, sig_b64) =
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(h), Some(p), Some(s), None) => (h, p, s),
            _ => {
                return Err(JwtError::Malformed(
                    "token must have three dot-separated parts",
                ))
            }
        };
    if header_b64.is_empty() || payload_b64.is_empty() {
        return Err(JwtError::Malformed("empty header or payload"));
    }
    let header_bytes = URL_SAFE_NO_PAD
        .decode(header_b64)
        .map_err(|_| JwtError::Malformed("header is not base64url"))?;
    let header: Map<String, Value> = serde_json::from_slice(&header_bytes)
        .map_err(|_| JwtError::Malformed("header is not a JSON object"))?;
    let alg_name = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or(JwtError::Malformed("header has no `alg`"))?;
    let alg = JwtAlgorithm::from_name(alg_name)
        .ok_or_else(|| JwtError::DisallowedAlgorithm(alg_name.chars().take(16).collect()))?;
    if sig_b64.is_empty() {
        // An unsigned token dressed up with a real `alg`.
        return Err(JwtError::BadSignature);
    }
    if URL_SAFE_NO_PAD.decode(sig_b64).is_err() {
        return Err(JwtError::Malformed("signature is not base64url"));
    }
    if header.contains_key("crit") {
        // RFC 7515 4.1.11: extensions we do not understand must be refused.
        return Err(JwtError::Malformed(
            "header has unsupported `crit` extensions",
        ));
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(JwtError::Malformed("`kid` is not a string")),
    };
    let payload_bytes = URL_SAFE_NO_PAD
        .decode(payload_b64)
        .map_err(|_| JwtError::Malformed("payload is not base64url"))?;
    let claims: Map<String, Value> = serde_json::from_slice(&payload_bytes)
        .map_err(|_| JwtError::Malformed("payload is not a JSON object"))?;
    Ok(Parsed {
        alg,
        kid,
        claims,
        token,
    })
}

fn map_jsonwebtoken_error(e: &jsonwebtoken::errors::Error) -> JwtError {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::UnsupportedAlgorithm => {
            JwtError::DisallowedAlgorithm("(key mismatch)".to_string())
        }
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => JwtError::Malformed("token rejected by the JWS decoder"),
        // Wrong signature, or a key the backend cannot use for it.
        _ => JwtError::BadSignature,
    }
}

impl JwtVerifier {
    /// Names of the providers, in config order (index = position).
    pub fn provider_names(&self) -> Vec<&str> {
        self.providers.iter().map(|p| p.name.as_str()).collect()
    }

    /// Index of the provider called `name`.
    pub fn provider_index(&self, name: &str) -> Option<usize> {
        self.providers.iter().position(|p| p.name == name)
    }

    /// How many signature checks were run (cache hits do not count).
    pub fn signature_checks(&self) -> u64 {
        self.signature_checks
    }

    /// Number of tokens in the verified-token cache.
    pub fn cached_tokens(&self) -> usize {
        self.cache.len()
    }

    /// Finds the token in the request: for `Index(i)` where provider `i`
    /// reads it; for `Auto`, the first source (in provider order) that has
    /// one.
    pub fn extract_token(
        &self,
        selector: ProviderSelector,
        header: &dyn Fn(&str) -> Option<String>,
    ) -> Option<String> {
        match selector {
            ProviderSelector::Index(i) => extract_token(&self.providers.get(i)?.source, header),
            ProviderSelector::Auto => {
                let mut tried: Vec<&TokenSource> = Vec::new();
                for p in &self.providers {
                    if tried.contains(&&p.source) {
                        continue;
                    }
                    tried.push(&p.source);
                    if let Some(t) = extract_token(&p.source, header) {
                        return Some(t);
                    }
                }
                None
            }
        }
    }

    /// [`Self::extract_token`] then [`Self::verify`]; no token is
    /// `MissingToken`.
    pub fn verify_request(
        &mut self,
        selector: ProviderSelector,
        header: &dyn Fn(&str) -> Option<String>,
        now_unix_s: u64,
    ) -> Result<VerifiedIdentity, JwtError> {
        let token = self
            .extract_token(selector, header)
            .ok_or(JwtError::MissingToken)?;
        self.verify(selector, &token, now_unix_s)
    }

    /// Verifies a compact JWS at time `now_unix_s` and extracts the identity.
    /// Repeated tokens are answered from the cache (still checked against
    /// `now` for expiry) without another signature check.
    pub fn verify(
        &mut self,
        selector: ProviderSelector,
        token: &str,
        now_unix_s: u64,
    ) -> Result<VerifiedIdentity, JwtError> {
        if let ProviderSelector::Index(i) = selector {
            if i >= self.providers.len() {
                return Err(JwtError::ProviderNotConfigured(i));
            }
        }
        let token = token.trim();
        if token.is_empty() {
            return Err(JwtError::MissingToken);
        }
        if token.len() > self.max_token_bytes_any {
            return Err(JwtError::TokenTooLarge {
                limit: self.max_token_bytes_any,
            });
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(hit) = self.cache.lookup(&digest, selector, now_unix_s) {
            return Ok(hit);
        }

        let parsed = parse_unverified(token)?;
        let iss = parsed
            .claims
            .get("iss")
            .and_then(Value::as_str)
            .ok_or(JwtError::WrongIssuer)?;
        let index = match selector {
            ProviderSelector::Index(i) => i,
            ProviderSelector::Auto => self
                .providers
                .iter()
                .position(|p| p.issuers.iter().any(|x| x == iss))
                .ok_or(JwtError::WrongIssuer)?,
        };
        let provider = self
            .providers
            .get(index)
            .ok_or(JwtError::ProviderNotConfigured(index))?;
        if !provider.issuers.iter().any(|x| x == iss) {
            return Err(JwtError::WrongIssuer);
        }
        if token.len() > provider.max_token_bytes {
            return Err(JwtError::TokenTooLarge {
                limit: provider.max_token_bytes,
            });
        }
        if !provider.algorithms.contains(&parsed.alg) {
            return Err(JwtError::DisallowedAlgorithm(
                parsed.alg.as_str().to_string(),
            ));
        }
        let key = match &provider.keys {
            ProviderKeys::Hmac(secret) => secret,
            ProviderKeys::Static(set) => set.select(parsed.kid.as_deref(), parsed.alg)?,
            ProviderKeys::Remote { store, .. } => match store.keys() {
                Some(set) => set.select(parsed.kid.as_deref(), parsed.alg)?,
                None => return Err(JwtError::KeysUnavailable(provider.name.clone())),
            },
        };

        // Pinned to the one algorithm already checked against the allow-list
        // and the key's type; jsonwebtoken checks it again against the
        // header. Its clock-based checks are off: time comes from the caller.
        let mut validation = Validation::new(parsed.alg.to_jsonwebtoken());
        validation.algorithms = vec![parsed.alg.to_jsonwebtoken()];
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        validation.leeway = 0;
        self.signature_checks = self.signature_checks.saturating_add(1);
        jsonwebtoken::decode::<Value>(parsed.token, key, &validation)
            .map_err(|e| map_jsonwebtoken_error(&e))?;

        let claims = &parsed.claims;
        let leeway = provider.leeway_s;
        let exp = numeric_date(claims, "exp", "`exp` is not a number")?;
        let nbf = numeric_date(claims, "nbf", "`nbf` is not a number")?;
        let iat = numeric_date(claims, "iat", "`iat` is not a number")?;
        match exp {
            None if provider.require_exp => return Err(JwtError::Malformed("token has no `exp`")),
            Some(exp) if now_unix_s >= exp.saturating_add(leeway) => return Err(JwtError::Expired),
            _ => {}
        }
        for not_before in [nbf, iat].into_iter().flatten() {
            if now_unix_s.saturating_add(leeway) < not_before {
                return Err(JwtError::NotYetValid);
            }
        }
        if !provider.allow_any_audience {
            let ok = match claims.get("aud") {
                Some(Value::String(a)) => provider.audiences.contains(a),
                Some(Value::Array(list)) => list
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|a| provider.audiences.iter().any(|x| x == a)),
                _ => false,
            };
            if !ok {
                return Err(JwtError::WrongAudience);
            }
        }
        let tenant_id = provider
            .tenant_claim
            .lookup(claims)
            .and_then(claim_as_id)
            .ok_or_else(|| JwtError::MissingTenantClaim(provider.tenant_claim.whole.clone()))?;
        let user_id = provider
            .user_claim
            .as_ref()
            .and_then(|c| c.lookup(claims))
            .and_then(claim_as_id);
        let identity = VerifiedIdentity {
            provider: provider.name.clone(),
            tenant_id,
            user_id,
            exp,
        };
        let expires_at = exp.map(|e| e.saturating_add(leeway));
        self.cache
            .insert(digest, index, identity.clone(), expires_at, now_unix_s);
        Ok(identity)
    }

    /// Whether any provider fetches its keys remotely, i.e. whether the glue
    /// needs a tick to call [`Self::plan_jwks_fetches`].
    pub fn has_remote_jwks(&self) -> bool {
        self.providers
            .iter()
            .any(|p| matches!(p.keys, ProviderKeys::Remote { .. }))
    }

    /// Remote JWKS fetches due at `now`, marked as in flight. The glue
    /// dispatches each (HTTP GET through the cluster) and reports the result
    /// with [`Self::complete_jwks_fetch`], including when dispatching fails.
    /// Call it from a tick (once a second is plenty) and right after
    /// configuration; each worker fetches for itself, as each has its own VM.
    pub fn plan_jwks_fetches(&mut self, now_unix_s: u64) -> Vec<JwksFetch> {
        let mut due = Vec::new();
        for (provider_index, p) in self.providers.iter_mut().enumerate() {
            if let ProviderKeys::Remote { remote, store } = &mut p.keys {
                if store.is_refresh_due(now_unix_s) {
                    store.begin_refresh(now_unix_s);
                    due.push(JwksFetch {
                        provider_index,
                        cluster: remote.cluster.clone(),
                        path: remote.path.clone(),
                        authority: remote
                            .authority
                            .clone()
                            .unwrap_or_else(|| remote.cluster.clone()),
                        timeout_ms: remote.timeout_ms,
                    });
                }
            }
        }
        due
    }

    /// Reports a JWKS fetch: `http_status` is `None` when the call failed
    /// (timeout, reset, dispatch error). A 200 with a usable document
    /// replaces the keys; anything else keeps the last good keys. When the
    /// keys change, cached tokens of that provider are dropped.
    pub fn complete_jwks_fetch(
        &mut self,
        provider_index: usize,
        http_status: Option<u32>,
        body: Option<&[u8]>,
        now_unix_s: u64,
    ) -> Option<RefreshOutcome> {
        let provider = self.providers.get_mut(provider_index)?;
        let ProviderKeys::Remote { store, .. } = &mut provider.keys else {
            return None;
        };
        let result = match (http_status, body) {
            (Some(200), Some(body)) => parse_jwks(body),
            (Some(200), None) => Err(JwksError::FetchFailed("empty body".to_string())),
            (Some(status), _) => Err(JwksError::FetchFailed(format!("HTTP status {status}"))),
            (None, _) => Err(JwksError::FetchFailed("no response".to_string())),
        };
        let outcome = store.complete_refresh(result, now_unix_s);
        if outcome == (RefreshOutcome::Updated { changed: true }) {
            self.cache.remove_provider(provider_index);
        }
        Some(outcome)
    }

    /// The remote key store of a provider (for status reporting and tests).
    pub fn key_store(&self, provider_index: usize) -> Option<&KeyStore> {
        match &self.providers.get(provider_index)?.keys {
            ProviderKeys::Remote { store, .. } => Some(store),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------
// Verified-token cache
// ---------------------------------------------------------------------------

struct CacheEntry {
    provider: usize,
    identity: VerifiedIdentity,
    /// First second at which the entry must not be used.
    valid_until: u64,
    /// `exp` plus leeway, when the token has an `exp`.
    expires_at: Option<u64>,
    seq: u64,
}

/// Bounded map from SHA-256(token) to the identity it verified to. Eviction
/// is oldest-inserted first, after dropping entries that are already stale.
struct TokenCache {
    max_entries: usize,
    max_ttl_s: u64,
    map: HashMap<[u8; 32], CacheEntry>,
    order: VecDeque<([u8; 32], u64)>,
    next_seq: u64,
}

impl TokenCache {
    fn new(max_entries: usize, max_ttl_s: u64) -> Self {
        Self {
            max_entries,
            max_ttl_s,
            map: HashMap::new(),
            order: VecDeque::new(),
            next_seq: 0,
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn lookup(
        &mut self,
        digest: &[u8; 32],
        selector: ProviderSelector,
        now: u64,
    ) -> Option<VerifiedIdentity> {
        let entry = self.map.get(digest)?;
        let expired = entry.expires_at.is_some_and(|e| now >= e);
        if now >= entry.valid_until || expired {
            // Fall through to a full verification, which gives the precise
            // error (expired) or re-validates after the cache TTL.
            self.map.remove(digest);
            return None;
        }
        match selector {
            ProviderSelector::Index(i) if i != entry.provider => None,
            _ => Some(entry.identity.clone()),
        }
    }

    fn insert(
        &mut self,
        digest: [u8; 32],
        provider: usize,
        identity: VerifiedIdentity,
        expires_at: Option<u64>,
        now: u64,
    ) {
        if self.max_entries == 0 || self.max_ttl_s == 0 {
            return;
        }
        let valid_until = now
            .saturating_add(self.max_ttl_s)
            .min(expires_at.unwrap_or(u64::MAX));
        if valid_until <= now {
            return;
        }
        if !self.map.contains_key(&digest) && self.map.len() >= self.max_entries {
            self.map
                .retain(|_, e| now < e.valid_until && e.expires_at.is_none_or(|x| now < x));
            while self.map.len() >= self.max_entries {
                let Some((old, seq)) = self.order.pop_front() else {
                    break;
                };
                if self.map.get(&old).is_some_and(|e| e.seq == seq) {
                    self.map.remove(&old);
                }
            }
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.map.insert(
            digest,
            CacheEntry {
                provider,
                identity,
                valid_until,
                expires_at,
                seq,
            },
        );
        self.order.push_back((digest, seq));
        // Entries removed other than by eviction leave stale queue slots.
        if self.order.len() > self.max_entries.saturating_mul(2).max(16) {
            let map = &self.map;
            self.order
                .retain(|(d, s)| map.get(d).is_some_and(|e| e.seq == *s));
        }
    }

    fn remove_provider(&mut self, provider: usize) {
        self.map.retain(|_, e| e.provider != provider);
    }
}

// ---------------------------------------------------------------------------
// Trusting Envoy's jwt_authn
// ---------------------------------------------------------------------------

/// Provider name reported for identities taken from Envoy's `jwt_authn`.
pub const JWT_AUTHN_PROVIDER: &str = "envoy.filters.http.jwt_authn";

/// Extracts tenant and user from a payload that Envoy's `jwt_authn` filter
/// already verified and stored with `payload_in_metadata`.
///
/// The glue reads it with `get_property(["metadata", "filter_metadata",
/// "envoy.filters.http.jwt_authn", <payload_in_metadata>])`. Envoy answers a
/// `Struct` value at the end of a property path with the *binary protobuf*
/// of a `google.protobuf.Struct` (its `serializeValue` exports CEL maps that
/// way), so that is what this decodes; JSON text (first byte `{`) is also
/// accepted, for hosts or tests that hand over JSON. Numbers in a `Struct`
/// are doubles, so an integer tenant id `42` arrives as `42.0` and is
/// rendered `"42"`.
///
/// No signature or time checks happen here: that is `jwt_authn`'s job.
pub fn claims_from_jwt_authn_payload(
    payload: &[u8],
    tenant_claim: &str,
    user_claim: Option<&str>,
) -> Result<VerifiedIdentity, JwtError> {
    let first = payload.iter().find(|b| !b.is_ascii_whitespace());
    let claims: Map<String, Value> = if first == Some(&b'{') {
        serde_json::from_slice(payload)
            .map_err(|_| JwtError::Malformed("jwt_authn payload is not a JSON object"))?
    } else {
        use prost::Message as _;
        let st = prost_types::Struct::decode(payload)
            .map_err(|_| JwtError::Malformed("jwt_authn payload is not a protobuf Struct"))?;
        struct_to_map(st)
    };
    if claims.is_empty() {
        return Err(JwtError::MissingToken);
    }
    let tenant_path = ClaimPath::parse(tenant_claim)
        .ok_or_else(|| JwtError::MissingTenantClaim(tenant_claim.to_string()))?;
    let tenant_id = tenant_path
        .lookup(&claims)
        .and_then(claim_as_id)
        .ok_or_else(|| JwtError::MissingTenantClaim(tenant_claim.to_string()))?;
    let user_id = user_claim
        .and_then(ClaimPath::parse)
        .and_then(|p| p.lookup(&claims).and_then(claim_as_id));
    let exp = numeric_date(&claims, "exp", "`exp` is not a number")
        .ok()
        .flatten();
    Ok(VerifiedIdentity {
        provider: JWT_AUTHN_PROVIDER.to_string(),
        tenant_id,
        user_id,
        exp,
    })
}

fn struct_to_map(st: prost_types::Struct) -> Map<String, Value> {
    st.fields
        .into_iter()
        .map(|(k, v)| (k, proto_value_to_json(v)))
        .collect()
}

fn proto_value_to_json(v: prost_types::Value) -> Value {
    use prost_types::value::Kind;
    match v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::NumberValue(n)) => {
            serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)
        }
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::StructValue(s)) => Value::Object(struct_to_map(s)),
        Some(Kind::ListValue(l)) => {
            Value::Array(l.values.into_iter().map(proto_value_to_json).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const NOW: u64 = 1_700_000_000;
    const ISS: &str = "https://idp.example.test/";
    const AUD: &str = "tollgate";
    const HMAC_SECRET: &str = "0123456789abcdef0123456789abcdef-test-only";

    const JWKS: &[u8] = include_bytes!("../../tests/fixtures/jwt/jwks.json");
    const JWKS_ROTATED: &[u8] = include_bytes!("../../tests/fixtures/jwt/jwks_rotated.json");
    const JWKS_RSA1_NO_KID: &[u8] = include_bytes!("../../tests/fixtures/jwt/jwks_rsa1_no_kid.json");
    const RSA1_PUB_PEM: &[u8] = include_bytes!("../../tests/fixtures/jwt/rsa1.pub.pem");

    fn rsa1() -> EncodingKey {
        EncodingKey::from_rsa_der(include_bytes!("../../tests/fixtures/jwt/rsa1.key.der"))
    }
    fn rsa2() -> EncodingKey {
        EncodingKey::from_rsa_der(include_bytes!("../../tests/fixtures/jwt/rsa2.key.der"))
    }
    fn ec256() -> EncodingKey {
        EncodingKey::from_ec_der(include_bytes!("../../tests/fixtures/jwt/ec256.key.der"))
    }
    fn ec384() -> EncodingKey {
        EncodingKey::from_ec_der(include_bytes!("../../tests/fixtures/jwt/ec384.key.der"))
    }
    fn ed25519() -> EncodingKey {
        EncodingKey::from_ed_der(include_bytes!("../../tests/fixtures/jwt/ed25519.key.der"))
    }

    fn claims() -> Value {
        json!({
            "iss": ISS,
            "aud": AUD,
            "sub": "user-1",
            "tenant_id": "acme",
            "iat": NOW - 10,
            "exp": NOW + 600,
        })
    }

    fn mint(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&header, claims, key).expect("encode")
    }

    fn b64(v: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(v)
    }

    /// Signs arbitrary header and payload bytes, for tokens jsonwebtoken's
    /// encoder would not produce.
    fn sign_raw(header: &Value, payload: &[u8], key: &EncodingKey, alg: Algorithm) -> String {
        let message = format!("{}.{}", b64(header.to_string().as_bytes()), b64(payload));
        let sig = jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).expect("sign");
        format!("{message}.{sig}")
    }

    fn jwks_value(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).expect("fixture JWKS")
    }

    fn provider(extra: Value) -> Value {
        let mut p = json!({
            "name": "main",
            "issuers": [ISS],
            "audiences": [AUD],
            "algorithms": ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"],
            "jwks": {"inline": jwks_value(JWKS)},
            "tenant_claim": "tenant_id",
        });
        for (k, v) in extra.as_object().expect("object") {
            p[k] = v.clone();
        }
        p
    }

    fn hmac_provider() -> Value {
        json!({
            "name": "internal",
            "issuers": ["https://internal.example.test/"],
            "audiences": [AUD],
            "algorithms": ["HS256"],
            "hmac_secret_env": "TOLLGATE_JWT_SECRET",
            "tenant_claim": "tenant_id",
        })
    }

    fn env(name: &str) -> Option<String> {
        (name == "TOLLGATE_JWT_SECRET").then(|| HMAC_SECRET.to_string())
    }

    fn config(providers: Vec<Value>) -> JwtConfig {
        serde_json::from_value(json!({ "providers": providers })).expect("config shape")
    }

    fn verifier(providers: Vec<Value>) -> JwtVerifier {
        config(providers).compile(&env).expect("compile")
    }

    fn main_verifier() -> JwtVerifier {
        verifier(vec![provider(json!({})), hmac_provider()])
    }

    fn compile_err(providers: Vec<Value>) -> String {
        config(providers)
            .compile(&env)
            .expect_err("should not compile")
            .to_string()
    }

    fn code(r: Result<VerifiedIdentity, JwtError>) -> &'static str {
        match r {
            Ok(_) => "ok",
            Err(e) => e.code(),
        }
    }

    // ---- config ----------------------------------------------------------

    #[test]
    fn documented_example_config_parses_and_compiles() {
        let text = r#"{
          "providers": [
            {
              "name": "auth0",
              "issuers": ["https://tenant.eu.auth0.com/"],
              "audiences": ["https://api.example.com"],
              "from": "authorization",
              "algorithms": ["RS256"],
              "jwks": {
                "remote": {
                  "cluster": "auth0_jwks",
                  "path": "/.well-known/jwks.json",
                  "authority": "tenant.eu.auth0.com",
                  "refresh_interval_s": 600,
                  "timeout_ms": 3000
                }
              },
              "leeway_s": 30,
              "max_token_bytes": 8192,
              "tenant_claim": "https://example.com/tenant_id",
              "user_claim": "sub",
              "require_exp": true
            },
            {
              "name": "internal",
              "issuers": ["tollgate-internal"],
              "allow_any_audience": true,
              "from": {"header": {"name": "x-internal-token", "prefix": "Bearer "}},
              "algorithms": ["HS256"],
              "hmac_secret_env": "TOLLGATE_JWT_SECRET",
              "tenant_claim": "app_metadata.tenant_id"
            },
            {
              "name": "static",
              "issuers": ["https://static.example.test/"],
              "audiences": ["tollgate"],
              "from": {"cookie": {"name": "id_token"}},
              "algorithms": ["ES256"],
              "jwks": {"inline": "{\"keys\":[{\"kty\":\"EC\",\"crv\":\"P-256\",\"x\":\"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU\",\"y\":\"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0\"}]}"},
              "tenant_claim": "tenant_id",
              "user_claim": null
            }
          ],
          "cache_max_entries": 512,
          "cache_max_ttl_s": 120
        }"#;
        let cfg: JwtConfig = serde_json::from_str(text).expect("parse");
        assert_eq!(cfg.providers[1].leeway_s, 60);
        assert_eq!(cfg.providers[1].max_token_bytes, 8192);
        assert_eq!(cfg.providers[1].user_claim.as_deref(), Some("sub"));
        assert!(cfg.providers[1].require_exp);
        assert_eq!(cfg.providers[2].user_claim, None);
        let v = cfg.compile(&env).expect("compile");
        assert_eq!(v.provider_names(), vec!["auth0", "internal", "static"]);
        assert_eq!(v.provider_index("static"), Some(2));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let mut p = provider(json!({}));
        p["tenant_clam"] = json!("x");
        assert!(serde_json::from_value::<JwtConfig>(json!({"providers": [p]})).is_err());
        let p = provider(json!({"from": {"header": {"name": "x", "prefx": "B "}}}));
        assert!(serde_json::from_value::<JwtConfig>(json!({"providers": [p]})).is_err());
        let p = provider(json!({"jwks": {"remote": {"cluster": "c", "path": "/j", "refresh": 5}}}));
        assert!(serde_json::from_value::<JwtConfig>(json!({"providers": [p]})).is_err());
        assert!(serde_json::from_value::<JwtConfig>(json!({"providers": [], "cache": 1})).is_err());
        let p = provider(json!({"algorithms": ["none"]}));
        assert!(serde_json::from_value::<JwtConfig>(json!({"providers": [p]})).is_err());
    }

    #[test]
    fn compile_errors_name_the_field() {
        let mut hs = hmac_provider();
        hs.as_object_mut()
            .expect("object")
            .remove("hmac_secret_env");
        assert_eq!(
            compile_err(vec![hs]),
            "jwt.providers[0].algorithms: HS256 requires hmac_secret_env"
        );

        let mut hs = hmac_provider();
        hs["jwks"] = json!({"inline": jwks_value(JWKS)});
        assert_eq!(
            compile_err(vec![hs]),
            "jwt.providers[0].algorithms: HS256 cannot be combined with jwks; use a separate provider"
        );

        let p = provider(
            json!({"algorithms": ["RS256", "HS256"], "hmac_secret_env": "TOLLGATE_JWT_SECRET"}),
        );
        assert_eq!(
            compile_err(vec![p]),
            "jwt.providers[0].algorithms: HS256 cannot be combined with RS256; use a separate provider"
        );

        let mut hs = hmac_provider();
        hs["hmac_secret_env"] = json!("NOT_SET");
        assert_eq!(
            compile_err(vec![provider(json!({})), hs]),
            "jwt.providers[1].hmac_secret_env: environment variable `NOT_SET` is not set or is empty"
        );

        let short = config(vec![hmac_provider()])
            .compile(&|_| Some("short".to_string()))
            .expect_err("short secret");
        assert_eq!(short.path(), "jwt.providers[0].hmac_secret_env");

        let mut hs512 = hmac_provider();
        hs512["algorithms"] = json!(["HS256", "HS512"]);
        // 42 bytes is enough for HS256 but not HS512.
        assert!(compile_err(vec![hs512]).contains("need at least 64"));

        let p = provider(json!({"audiences": []}));
        assert_eq!(
            compile_err(vec![p]),
            "jwt.providers[0].audiences: must not be empty unless allow_any_audience is true"
        );
        assert!(verifier(vec![provider(
            json!({"audiences": [], "allow_any_audience": true})
        )])
        .provider_index("main")
        .is_some());

        let dup = provider(json!({"name": "other"}));
        assert_eq!(
            compile_err(vec![provider(json!({})), dup]),
            format!("jwt.providers[1].issuers: issuer `{ISS}` is already used by providers[0]")
        );
        let dup = provider(json!({"issuers": ["x"]}));
        assert!(compile_err(vec![provider(json!({})), dup])
            .starts_with("jwt.providers[1].name: name `main`"));

        assert_eq!(compile_err(vec![]), "jwt.providers: must not be empty");
        assert_eq!(
            compile_err(vec![provider(json!({"algorithms": []}))]),
            "jwt.providers[0].algorithms: must not be empty"
        );
        assert_eq!(
            compile_err(vec![provider(json!({"issuers": []}))]),
            "jwt.providers[0].issuers: must not be empty"
        );

        let p = provider(json!({"hmac_secret_env": "TOLLGATE_JWT_SECRET"}));
        assert!(compile_err(vec![p])
            .starts_with("jwt.providers[0].hmac_secret_env: is set but no HS256"));

        let mut p = provider(json!({}));
        p.as_object_mut().expect("object").remove("jwks");
        assert_eq!(
            compile_err(vec![p]),
            "jwt.providers[0].jwks: is required for RS*/PS*/ES*/EdDSA algorithms"
        );

        let p = provider(json!({"jwks": {"inline": {"keys": []}}}));
        assert!(compile_err(vec![p])
            .starts_with("jwt.providers[0].jwks.inline: JWKS has no usable signing key"));
        let p = provider(json!({"jwks": {"inline": {"nokeys": 1}}}));
        assert!(
            compile_err(vec![p]).starts_with("jwt.providers[0].jwks.inline: JWKS document is not")
        );
        let p = provider(
            json!({"jwks": {"inline": jwks_value(JWKS_ROTATED)}, "algorithms": ["RS256", "ES512x"]}),
        );
        assert!(serde_json::from_value::<JwtConfig>(json!({"providers": [p]})).is_err());
        let p = provider(
            json!({"jwks": {"inline": jwks_value(JWKS_RSA1_NO_KID)}, "algorithms": ["RS256", "ES256"]}),
        );
        assert_eq!(
            compile_err(vec![p]),
            "jwt.providers[0].jwks.inline: no key can verify ES256, which is in algorithms"
        );

        let p = provider(json!({"jwks": {"remote": {"cluster": "idp", "path": "jwks.json"}}}));
        assert_eq!(
            compile_err(vec![p]),
            "jwt.providers[0].jwks.remote.path: must start with `/`"
        );
        let p = provider(
            json!({"jwks": {"remote": {"cluster": "idp", "path": "/j", "refresh_interval_s": 1}}}),
        );
        assert_eq!(
            compile_err(vec![p]),
            "jwt.providers[0].jwks.remote.refresh_interval_s: must be at least 10"
        );
        let p = provider(json!({"jwks": {"remote": {"cluster": "", "path": "/j"}}}));
        assert_eq!(
            compile_err(vec![p]),
            "jwt.providers[0].jwks.remote.cluster: must not be empty"
        );

        for bad in ["", "a..b", ".a", "a."] {
            let p = provider(json!({"tenant_claim": bad}));
            assert!(
                compile_err(vec![p]).starts_with("jwt.providers[0].tenant_claim:"),
                "{bad}"
            );
        }
        let p = provider(json!({"from": {"header": {"name": " "}}}));
        assert_eq!(
            compile_err(vec![p]),
            "jwt.providers[0].from.header.name: must not be empty"
        );
    }

    // ---- algorithm families ------------------------------------------------

    #[test]
    fn every_rsa_algorithm_verifies() {
        let mut v = main_verifier();
        for alg in [
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ] {
            let token = mint(alg, Some("rsa-1"), &rsa1(), &claims());
            let id = v
                .verify(ProviderSelector::Auto, &token, NOW)
                .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
            assert_eq!(
                id,
                VerifiedIdentity {
                    provider: "main".to_string(),
                    tenant_id: "acme".to_string(),
                    user_id: Some("user-1".to_string()),
                    exp: Some(NOW + 600),
                }
            );
        }
        assert_eq!(v.signature_checks(), 6);
    }

    #[test]
    fn ec_ed_and_hmac_verify() {
        let mut v = main_verifier();
        let cases = [
            (Algorithm::ES256, Some("ec256-1"), ec256()),
            (Algorithm::ES384, Some("ec384-1"), ec384()),
            (Algorithm::EdDSA, Some("ed-1"), ed25519()),
            // Only one Ed25519 key in the set: a token without kid is fine.
            (Algorithm::EdDSA, None, ed25519()),
        ];
        for (alg, kid, key) in cases {
            let token = mint(alg, kid, &key, &claims());
            let id = v
                .verify(ProviderSelector::Auto, &token, NOW)
                .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
            assert_eq!(id.tenant_id, "acme");
        }

        let mut c = claims();
        c["iss"] = json!("https://internal.example.test/");
        let token = mint(
            Algorithm::HS256,
            None,
            &EncodingKey::from_secret(HMAC_SECRET.as_bytes()),
            &c,
        );
        let id = v
            .verify(ProviderSelector::Auto, &token, NOW)
            .expect("hs256");
        assert_eq!(id.provider, "internal");
        let wrong = mint(
            Algorithm::HS256,
            None,
            &EncodingKey::from_secret(b"another-secret-another-secret-xx"),
            &c,
        );
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &wrong, NOW)),
            "bad_signature"
        );
        // HS384 is not in that provider's list.
        let hs384 = mint(
            Algorithm::HS384,
            None,
            &EncodingKey::from_secret(HMAC_SECRET.as_bytes()),
            &c,
        );
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &hs384, NOW)),
            "disallowed_algorithm"
        );
    }

    #[test]
    fn algorithm_not_in_the_provider_list_is_refused() {
        let mut v = verifier(vec![provider(json!({"algorithms": ["ES256"]}))]);
        let token = mint(Algorithm::RS256, Some("rsa-1"), &rsa1(), &claims());
        assert_eq!(
            v.verify(ProviderSelector::Auto, &token, NOW),
            Err(JwtError::DisallowedAlgorithm("RS256".to_string()))
        );
        assert_eq!(v.signature_checks(), 0);
    }

    // ---- key selection -----------------------------------------------------

    #[test]
    fn kid_selects_the_key() {
        let mut v = main_verifier();
        // EC key ids exist but cannot verify RS256.
        let token = mint(Algorithm::RS256, Some("ec256-1"), &rsa1(), &claims());
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &token, NOW)),
            "unknown_key_id"
        );
        // ES256 with the P-384 key's id: wrong curve for the algorithm.
        let token = mint(Algorithm::ES256, Some("ec384-1"), &ec256(), &claims());
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &token, NOW)),
            "unknown_key_id"
        );
        // rsa-1's id on a token signed by rsa2.
        let token = mint(Algorithm::RS256, Some("rsa-1"), &rsa2(), &claims());
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &token, NOW)),
            "bad_signature"
        );
    }

    #[test]
    fn token_without_kid_needs_exactly_one_candidate_key() {
        let mut v = verifier(vec![provider(
            json!({"jwks": {"inline": jwks_value(JWKS_RSA1_NO_KID)}, "algorithms": ["RS256"]}),
        )]);
        let token = mint(Algorithm::RS256, None, &rsa1(), &claims());
        assert_eq!(code(v.verify(ProviderSelector::Auto, &token, NOW)), "ok");
        // A kid the set does not have is refused even though the set has a
        // kid-less key that would verify.
        let token = mint(Algorithm::RS256, Some("rsa-1"), &rsa1(), &claims());
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &token, NOW)),
            "unknown_key_id"
        );

        // Two RSA keys and no kid: ambiguous.
        let mut two = jwks_value(JWKS_ROTATED);
        let extra = jwks_value(JWKS)["keys"][0].clone();
        two["keys"].as_array_mut().expect("keys").push(extra);
        let mut v = verifier(vec![provider(json!({"jwks": {"inline": two}}))]);
        let token = mint(Algorithm::RS256, None, &rsa1(), &claims());
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &token, NOW)),
            "unknown_key_id"
        );
    }

    #[test]
    fn jwk_alg_pins_the_algorithm() {
        let mut set = jwks_value(JWKS);
        set["keys"][0]["alg"] = json!("PS256");
        // rsa-2 (unpinned) keeps RS256 verifiable, as the config check wants.
        let rsa2_jwk = jwks_value(JWKS_ROTATED)["keys"][0].clone();
        set["keys"].as_array_mut().expect("keys").push(rsa2_jwk);
        let mut v = verifier(vec![provider(json!({"jwks": {"inline": set}}))]);
        let rs = mint(Algorithm::RS256, Some("rsa-1"), &rsa1(), &claims());
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &rs, NOW)),
            "unknown_key_id"
        );
        let ps = mint(Algorithm::PS256, Some("rsa-1"), &rsa1(), &claims());
        assert_eq!(code(v.verify(ProviderSelector::Auto, &ps, NOW)), "ok");
    }

    #[test]
    fn jwks_parsing_skips_unusable_keys() {
        let mut doc = jwks_value(JWKS);
        let keys = doc["keys"].as_array_mut().expect("keys");
        keys.push(json!({"kty": "oct", "kid": "sym", "k": "c2VjcmV0"}));
        keys.push(
            json!({"kty": "RSA", "kid": "enc", "use": "enc", "n": keys[0]["n"], "e": "AQAB"}),
        );
        keys.push(json!({"kty": "RSA", "kid": "small", "n": b64(&[0xC5; 128]), "e": "AQAB"}));
        keys.push(json!({"kty": "OKP", "kid": "short-ed", "crv": "Ed25519", "x": b64(&[1; 16])}));
        keys.push(json!({"kty": "OKP", "kid": "x448", "crv": "Ed448", "x": b64(&[1; 57])}));
        keys.push(json!({"kty": "EC", "kid": "p521", "crv": "P-521", "x": b64(&[1; 66]), "y": b64(&[1; 66])}));
        keys.push(json!({"kty": "EC", "kid": "short-ec", "crv": "P-256", "x": b64(&[1; 31]), "y": b64(&[1; 32])}));
        keys.push(
            json!({"kty": "RSA", "kid": "oaep", "alg": "RSA-OAEP", "n": keys[0]["n"], "e": "AQAB"}),
        );
        keys.push(
            json!({"kty": "RSA", "kid": "hs-alg", "alg": "HS256", "n": keys[0]["n"], "e": "AQAB"}),
        );
        keys.push(json!({"kty": "EC", "kid": "mismatch", "alg": "RS256", "crv": "P-256", "x": b64(&[1; 32]), "y": b64(&[1; 32])}));
        keys.push(json!({"kty": "RSA", "kid": "not-b64", "n": "!!!", "e": "AQAB"}));
        keys.push(json!("not an object"));
        let set = parse_jwks(doc.to_string().as_bytes()).expect("parse");
        assert_eq!(set.len(), 4);
        assert_eq!(set.skipped(), 12);
        assert_eq!(
            set.kids(),
            vec![
                Some("rsa-1"),
                Some("ec256-1"),
                Some("ec384-1"),
                Some("ed-1")
            ]
        );

        assert!(matches!(
            parse_jwks(b"not json"),
            Err(JwksError::NotJwks(_))
        ));
        assert!(matches!(parse_jwks(b"[1,2]"), Err(JwksError::NotJwks(_))));
        assert_eq!(
            parse_jwks(br#"{"keys":[{"kty":"oct","k":"AA"}]}"#),
            Err(JwksError::NoUsableKeys { skipped: 1 })
        );
        assert_eq!(
            parse_jwks(&vec![b' '; MAX_JWKS_BYTES + 1]),
            Err(JwksError::TooLarge)
        );
    }

    // ---- remote keys and rotation -----------------------------------------

    fn remote_verifier() -> JwtVerifier {
        verifier(vec![provider(json!({
            "jwks": {"remote": {"cluster": "idp", "path": "/.well-known/jwks.json", "refresh_interval_s": 300, "timeout_ms": 2000}}
        }))])
    }

    #[test]
    fn remote_keys_unavailable_until_first_fetch() {
        assert!(!main_verifier().has_remote_jwks());
        let mut with_authority = verifier(vec![provider(json!({
            "jwks": {"remote": {"cluster": "outbound|443||idp", "path": "/keys", "authority": "idp.example.test"}}
        }))]);
        assert!(with_authority.has_remote_jwks());
        let planned = with_authority.plan_jwks_fetches(NOW);
        assert_eq!(
            planned
                .iter()
                .map(|f| (f.authority.as_str(), f.timeout_ms))
                .collect::<Vec<_>>(),
            vec![("idp.example.test", 5000)]
        );

        let mut v = remote_verifier();
        let token = mint(Algorithm::RS256, Some("rsa-1"), &rsa1(), &claims());
        let err = v
            .verify(ProviderSelector::Auto, &token, NOW)
            .expect_err("no keys yet");
        assert_eq!((err.code(), err.http_status()), ("keys_unavailable", 503));

        let fetches = v.plan_jwks_fetches(NOW);
        assert_eq!(
            fetches,
            vec![JwksFetch {
                provider_index: 0,
                cluster: "idp".to_string(),
                path: "/.well-known/jwks.json".to_string(),
                authority: "idp".to_string(),
                timeout_ms: 2000,
            }]
        );
        // In flight: not planned again until the in-flight timeout (2 x 2 s).
        assert!(v.plan_jwks_fetches(NOW + 1).is_empty());
        let outcome = v.complete_jwks_fetch(0, None, None, NOW + 2);
        assert!(matches!(
            outcome,
            Some(RefreshOutcome::Failed {
                kept_last_good: false,
                ..
            })
        ));
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &token, NOW + 2)),
            "keys_unavailable"
        );
        // Retry after 5 s backoff.
        assert!(v.plan_jwks_fetches(NOW + 6).is_empty());
        assert_eq!(v.plan_jwks_fetches(NOW + 7).len(), 1);
        assert_eq!(
            v.complete_jwks_fetch(0, Some(200), Some(JWKS), NOW + 7),
            Some(RefreshOutcome::Updated { changed: true })
        );
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &token, NOW + 7)),
            "ok"
        );
    }

    #[test]
    fn rotation_replaces_keys_and_failed_refresh_keeps_the_last_good_ones() {
        let mut v = remote_verifier();
        assert_eq!(v.plan_jwks_fetches(NOW).len(), 1);
        v.complete_jwks_fetch(0, Some(200), Some(JWKS), NOW);
        let old = mint(Algorithm::RS256, Some("rsa-1"), &rsa1(), &claims());
        let new = mint(Algorithm::RS256, Some("rsa-2"), &rsa2(), &claims());
        assert_eq!(code(v.verify(ProviderSelector::Auto, &old, NOW)), "ok");
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &new, NOW)),
            "unknown_key_id"
        );
        assert_eq!(v.cached_tokens(), 1);

        // Not due before the refresh interval.
        assert!(v.plan_jwks_fetches(NOW + 299).is_empty());
        assert_eq!(v.plan_jwks_fetches(NOW + 300).len(), 1);
        // Same keys again: nothing changes, the cache stays.
        assert_eq!(
            v.complete_jwks_fetch(0, Some(200), Some(JWKS), NOW + 300),
            Some(RefreshOutcome::Updated { changed: false })
        );
        assert_eq!(v.cached_tokens(), 1);

        // Rotation: rsa-1 is gone, so its (cached) token is refused.
        assert_eq!(v.plan_jwks_fetches(NOW + 600).len(), 1);
        assert_eq!(
            v.complete_jwks_fetch(0, Some(200), Some(JWKS_ROTATED), NOW + 400),
            Some(RefreshOutcome::Updated { changed: true })
        );
        assert_eq!(v.cached_tokens(), 0);
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &old, NOW + 400)),
            "unknown_key_id"
        );
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &new, NOW + 400)),
            "ok"
        );

        // Failed refreshes (HTTP error, garbage, no response) keep rsa-2.
        assert_eq!(v.plan_jwks_fetches(NOW + 700).len(), 1);
        let failed = v.complete_jwks_fetch(0, Some(503), Some(b"oops"), NOW + 700);
        assert!(matches!(
            failed,
            Some(RefreshOutcome::Failed {
                kept_last_good: true,
                ..
            })
        ));
        assert_eq!(v.plan_jwks_fetches(NOW + 705).len(), 1);
        let failed = v.complete_jwks_fetch(0, Some(200), Some(b"<html>"), NOW + 705);
        assert!(matches!(
            failed,
            Some(RefreshOutcome::Failed {
                kept_last_good: true,
                ..
            })
        ));
        // Backoff doubles: 5 s, then 10 s.
        assert!(v.plan_jwks_fetches(NOW + 714).is_empty());
        assert_eq!(v.plan_jwks_fetches(NOW + 715).len(), 1);
        v.complete_jwks_fetch(0, None, None, NOW + 715);
        let fresh = mint(
            Algorithm::RS256,
            Some("rsa-2"),
            &rsa2(),
            &json!({"iss": ISS, "aud": AUD, "tenant_id": "t2", "exp": NOW + 2000}),
        );
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &fresh, NOW + 716)),
            "ok"
        );
        assert_eq!(
            v.key_store(0).and_then(KeyStore::keys).map(KeySet::kids),
            Some(vec![
                Some("rsa-2"),
                Some("ec256-1"),
                Some("ec384-1"),
                Some("ed-1")
            ])
        );
        // Not a remote provider / no such provider.
        assert_eq!(v.complete_jwks_fetch(7, Some(200), Some(JWKS), NOW), None);
    }

    #[test]
    fn key_store_backoff_is_capped_by_the_refresh_interval() {
        let mut s = KeyStore::new(20, 1000);
        assert!(s.is_refresh_due(0));
        let mut now = 0;
        for expected in [5, 10, 20, 20, 20] {
            s.begin_refresh(now);
            s.complete_refresh(Err(JwksError::FetchFailed("x".to_string())), now);
            assert!(!s.is_refresh_due(now + expected - 1));
            assert!(s.is_refresh_due(now + expected));
            now += expected;
        }
        // A host that never answers does not block refreshes forever.
        s.begin_refresh(now);
        assert!(!s.is_refresh_due(now + 1));
        assert!(s.is_refresh_due(now + 2));
    }

    // ---- cache -------------------------------------------------------------

    #[test]
    fn cache_hit_skips_the_signature_check_but_not_expiry() {
        let mut v = main_verifier();
        let token = mint(Algorithm::RS256, Some("rsa-1"), &rsa1(), &claims());
        let first = v
            .verify(ProviderSelector::Auto, &token, NOW)
            .expect("first");
        for t in 0..5 {
            assert_eq!(
                v.verify(ProviderSelector::Auto, &token, NOW + t),
                Ok(first.clone())
            );
        }
        assert_eq!(v.signature_checks(), 1);
        // exp = NOW + 600, leeway 60: fine at +659, expired at +660.
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &token, NOW + 250)),
            "ok"
        );
        assert_eq!(v.signature_checks(), 1);
        // The cache TTL (300 s) forces a re-check after it.
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &token, NOW + 301)),
            "ok"
        );
        assert_eq!(v.signature_checks(), 2);
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &token, NOW + 659)),
            "ok"
        );
        assert_eq!(
            v.verify(ProviderSelector::Auto, &token, NOW + 660),
            Err(JwtError::Expired)
        );
        assert_eq!(
            v.verify(ProviderSelector::Auto, &token, NOW + 660),
            Err(JwtError::Expired)
        );
    }

    #[test]
    fn cache_respects_an_explicit_provider_and_is_bounded() {
        let mut v = config(vec![provider(json!({})), hmac_provider()])
            .compile(&env)
            .expect("compile");
        let token = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &claims());
        assert_eq!(
            code(v.verify(ProviderSelector::Index(0), &token, NOW)),
            "ok"
        );
        // Cached for provider 0; provider 1 must not get it from the cache.
        assert_eq!(
            code(v.verify(ProviderSelector::Index(1), &token, NOW)),
            "wrong_issuer"
        );
        assert_eq!(
            code(v.verify(ProviderSelector::Index(2), &token, NOW)),
            "provider_not_configured"
        );

        let mut small: JwtConfig = serde_json::from_value(
            json!({"providers": [provider(json!({}))], "cache_max_entries": 3}),
        )
        .expect("cfg");
        small.cache_max_ttl_s = 1000;
        let mut v = small.compile(&env).expect("compile");
        let tokens: Vec<String> = (0..10)
            .map(|i| {
                let mut c = claims();
                c["tenant_id"] = json!(format!("t{i}"));
                mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c)
            })
            .collect();
        for t in &tokens {
            assert_eq!(code(v.verify(ProviderSelector::Auto, t, NOW)), "ok");
            assert!(v.cached_tokens() <= 3);
        }
        assert_eq!(v.signature_checks(), 10);
        // The newest three are cached, the oldest were evicted.
        for t in &tokens[7..] {
            assert_eq!(code(v.verify(ProviderSelector::Auto, t, NOW)), "ok");
        }
        assert_eq!(v.signature_checks(), 10);
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &tokens[0], NOW)),
            "ok"
        );
        assert_eq!(v.signature_checks(), 11);

        let mut off: JwtConfig = serde_json::from_value(
            json!({"providers": [provider(json!({}))], "cache_max_entries": 0}),
        )
        .expect("cfg");
        off.cache_max_ttl_s = 10;
        let mut v = off.compile(&env).expect("compile");
        v.verify(ProviderSelector::Auto, &tokens[0], NOW)
            .expect("ok");
        v.verify(ProviderSelector::Auto, &tokens[0], NOW)
            .expect("ok");
        assert_eq!((v.signature_checks(), v.cached_tokens()), (2, 0));
    }

    // ---- time --------------------------------------------------------------

    #[test]
    fn time_claims_use_the_leeway() {
        let mut v = verifier(vec![provider(json!({"leeway_s": 10}))]);
        let mut c = claims();
        c["exp"] = json!(NOW);
        let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c);
        assert_eq!(code(v.verify(ProviderSelector::Auto, &t, NOW + 9)), "ok");
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &t, NOW + 10)),
            "expired"
        );

        let mut c = claims();
        c["nbf"] = json!(NOW + 100);
        let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c);
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &t, NOW + 89)),
            "not_yet_valid"
        );
        assert_eq!(code(v.verify(ProviderSelector::Auto, &t, NOW + 90)), "ok");

        let mut c = claims();
        c["iat"] = json!(NOW + 100);
        let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c);
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &t, NOW)),
            "not_yet_valid"
        );

        // Fractional NumericDate is fine; a string is not.
        let mut c = claims();
        c["exp"] = json!((NOW + 100) as f64 + 0.5);
        let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c);
        assert_eq!(
            v.verify(ProviderSelector::Auto, &t, NOW).map(|i| i.exp),
            Ok(Some(NOW + 100))
        );
        let mut c = claims();
        c["exp"] = json!("tomorrow");
        let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c);
        assert_eq!(code(v.verify(ProviderSelector::Auto, &t, NOW)), "malformed");
    }

    #[test]
    fn exp_is_required_unless_disabled() {
        let mut c = claims();
        c.as_object_mut().expect("object").remove("exp");
        let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c);
        let mut v = main_verifier();
        assert_eq!(
            v.verify(ProviderSelector::Auto, &t, NOW),
            Err(JwtError::Malformed("token has no `exp`"))
        );
        let mut v = verifier(vec![provider(json!({"require_exp": false}))]);
        let id = v
            .verify(ProviderSelector::Auto, &t, NOW)
            .expect("no exp allowed");
        assert_eq!(id.exp, None);
        // Cached, but only for the cache TTL.
        v.verify(ProviderSelector::Auto, &t, NOW + 299)
            .expect("cached");
        assert_eq!(v.signature_checks(), 1);
        v.verify(ProviderSelector::Auto, &t, NOW + 300)
            .expect("re-verified");
        assert_eq!(v.signature_checks(), 2);
    }

    // ---- claims ------------------------------------------------------------

    #[test]
    fn tenant_and_user_claims_by_path() {
        let mut v = verifier(vec![provider(
            json!({"tenant_claim": "app_metadata.tenant_id", "user_claim": "app_metadata.user.id"}),
        )]);
        let mut c = claims();
        c["app_metadata"] = json!({"tenant_id": 42, "user": {"id": "u-9"}});
        let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c);
        let id = v.verify(ProviderSelector::Auto, &t, NOW).expect("ok");
        assert_eq!(
            (id.tenant_id.as_str(), id.user_id.as_deref()),
            ("42", Some("u-9"))
        );

        let mut v = verifier(vec![provider(
            json!({"tenant_claim": "https://example.com/tenant", "user_claim": "email"}),
        )]);
        let mut c = claims();
        c["https://example.com/tenant"] = json!("globex");
        let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c);
        let id = v.verify(ProviderSelector::Auto, &t, NOW).expect("ok");
        assert_eq!((id.tenant_id.as_str(), id.user_id), ("globex", None));
    }

    #[test]
    fn missing_or_unusable_tenant_claim_is_403() {
        let mut v = main_verifier();
        for bad in [
            json!(null),
            json!(""),
            json!(1.5),
            json!(["a"]),
            json!({"id": "a"}),
            json!(true),
        ] {
            let mut c = claims();
            c["tenant_id"] = bad.clone();
            let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c);
            let err = v
                .verify(ProviderSelector::Auto, &t, NOW)
                .expect_err("tenant");
            assert_eq!(
                (err.code(), err.http_status()),
                ("missing_tenant_claim", 403),
                "{bad}"
            );
        }
        let mut c = claims();
        c.as_object_mut().expect("object").remove("tenant_id");
        let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c);
        assert_eq!(
            v.verify(ProviderSelector::Auto, &t, NOW),
            Err(JwtError::MissingTenantClaim("tenant_id".to_string()))
        );
    }

    #[test]
    fn audience_may_be_a_string_or_a_list() {
        let mut v = main_verifier();
        for (aud, expected) in [
            (json!(AUD), "ok"),
            (json!(["other", AUD]), "ok"),
            (json!("other"), "wrong_audience"),
            (json!(["other", 7]), "wrong_audience"),
            (json!([]), "wrong_audience"),
            (json!(null), "wrong_audience"),
        ] {
            let mut c = claims();
            c["aud"] = aud.clone();
            let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c);
            assert_eq!(
                code(v.verify(ProviderSelector::Auto, &t, NOW)),
                expected,
                "{aud}"
            );
        }
        let mut v = verifier(vec![provider(
            json!({"audiences": [], "allow_any_audience": true}),
        )]);
        let mut c = claims();
        c.as_object_mut().expect("object").remove("aud");
        let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c);
        assert_eq!(code(v.verify(ProviderSelector::Auto, &t, NOW)), "ok");
    }

    // ---- attacks -----------------------------------------------------------

    #[test]
    fn alg_none_is_always_refused() {
        let mut v = main_verifier();
        let payload = claims().to_string();
        for alg in ["none", "None", "NONE", "nOnE"] {
            let header = json!({"alg": alg, "typ": "JWT"});
            let unsigned = format!(
                "{}.{}.",
                b64(header.to_string().as_bytes()),
                b64(payload.as_bytes())
            );
            assert_eq!(
                code(v.verify(ProviderSelector::Auto, &unsigned, NOW)),
                "disallowed_algorithm",
                "{alg}"
            );
            let with_sig = format!("{unsigned}c2ln");
            assert_eq!(
                code(v.verify(ProviderSelector::Auto, &with_sig, NOW)),
                "disallowed_algorithm",
                "{alg}"
            );
        }
        // A real alg with the signature stripped.
        let t = mint(Algorithm::RS256, Some("rsa-1"), &rsa1(), &claims());
        let stripped = &t[..t.rfind('.').expect("dot") + 1];
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, stripped, NOW)),
            "bad_signature"
        );
        assert_eq!(v.signature_checks(), 0);
    }

    #[test]
    fn hs256_signed_with_the_rsa_public_key_is_refused() {
        // The classic algorithm confusion: the attacker knows the public key
        // and uses its PEM as an HMAC secret.
        let mut v = main_verifier();
        let forged = mint(
            Algorithm::HS256,
            Some("rsa-1"),
            &EncodingKey::from_secret(RSA1_PUB_PEM),
            &claims(),
        );
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &forged, NOW)),
            "disallowed_algorithm"
        );
        // Even naming the HMAC provider explicitly: its issuer differs.
        assert_eq!(
            code(v.verify(ProviderSelector::Index(1), &forged, NOW)),
            "wrong_issuer"
        );
        // And an HMAC-only provider whose secret is not that PEM refuses it.
        let mut c = claims();
        c["iss"] = json!("https://internal.example.test/");
        let forged = mint(
            Algorithm::HS256,
            Some("rsa-1"),
            &EncodingKey::from_secret(RSA1_PUB_PEM),
            &c,
        );
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &forged, NOW)),
            "bad_signature"
        );
        // The raw DER/JWK forms of the key as secret fare no better.
        let n = b64url(jwks_value(JWKS)["keys"][0]["n"].as_str().expect("n")).expect("n");
        let forged = mint(
            Algorithm::HS256,
            Some("rsa-1"),
            &EncodingKey::from_secret(&n),
            &claims(),
        );
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &forged, NOW)),
            "disallowed_algorithm"
        );
    }

    #[test]
    fn forged_kid_and_embedded_keys_are_refused() {
        let mut v = main_verifier();
        let t = mint(Algorithm::RS256, Some("attacker-key"), &rsa2(), &claims());
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &t, NOW)),
            "unknown_key_id"
        );
        for kid in ["../../etc/passwd", "rsa-1' OR '1'='1", ""] {
            let t = mint(Algorithm::RS256, Some(kid), &rsa1(), &claims());
            assert_eq!(
                code(v.verify(ProviderSelector::Auto, &t, NOW)),
                "unknown_key_id",
                "{kid}"
            );
        }
        // `jwk` / `jku` in the header are ignored: only configured keys count.
        let jwk2 = jwks_value(JWKS_ROTATED)["keys"][0].clone();
        let header = json!({"alg": "RS256", "kid": "rsa-1", "jwk": jwk2, "jku": "https://evil.example/jwks"});
        let t = sign_raw(
            &header,
            claims().to_string().as_bytes(),
            &rsa2(),
            Algorithm::RS256,
        );
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &t, NOW)),
            "bad_signature"
        );
        // `kid` of the wrong type.
        let header = json!({"alg": "RS256", "kid": 1});
        let t = sign_raw(
            &header,
            claims().to_string().as_bytes(),
            &rsa1(),
            Algorithm::RS256,
        );
        assert_eq!(code(v.verify(ProviderSelector::Auto, &t, NOW)), "malformed");
        // Header says PS256, signature is RS256 (same key).
        let header = json!({"alg": "PS256", "kid": "rsa-1"});
        let rs = sign_raw(
            &json!({"alg": "RS256", "kid": "rsa-1"}),
            claims().to_string().as_bytes(),
            &rsa1(),
            Algorithm::RS256,
        );
        let sig = rs.rsplit('.').next().expect("sig");
        let t = format!(
            "{}.{}.{sig}",
            b64(header.to_string().as_bytes()),
            b64(claims().to_string().as_bytes())
        );
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &t, NOW)),
            "bad_signature"
        );
        // Unknown critical extension.
        let header = json!({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"]});
        let t = sign_raw(
            &header,
            claims().to_string().as_bytes(),
            &rsa1(),
            Algorithm::RS256,
        );
        assert_eq!(code(v.verify(ProviderSelector::Auto, &t, NOW)), "malformed");
    }

    #[test]
    fn expired_and_not_yet_valid_tokens_are_refused() {
        let mut v = main_verifier();
        let mut c = claims();
        c["exp"] = json!(NOW - 3600);
        let t = mint(Algorithm::EdDSA, Some("ed-1"), &ed25519(), &c);
        let err = v
            .verify(ProviderSelector::Auto, &t, NOW)
            .expect_err("expired");
        assert_eq!((err.code(), err.http_status()), ("expired", 401));
        let mut c = claims();
        c["nbf"] = json!(NOW + 3600);
        let t = mint(Algorithm::EdDSA, Some("ed-1"), &ed25519(), &c);
        assert_eq!(
            v.verify(ProviderSelector::Auto, &t, NOW),
            Err(JwtError::NotYetValid)
        );
        // Neither error is given before the signature checks out.
        let mut c = claims();
        c["exp"] = json!(NOW - 3600);
        let t = mint(Algorithm::EdDSA, Some("ed-1"), &ed25519(), &c);
        let (message, sig) = t.rsplit_once('.').expect("dot");
        let mut raw = URL_SAFE_NO_PAD.decode(sig).expect("sig");
        raw[0] ^= 0x80;
        let forged = format!("{message}.{}", b64(&raw));
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &forged, NOW)),
            "bad_signature"
        );
    }

    #[test]
    fn wrong_issuer_and_wrong_audience_are_refused() {
        let mut v = main_verifier();
        for iss in [
            json!("https://evil.example/"),
            json!(null),
            json!(["x"]),
            json!(ISS.trim_end_matches('/')),
        ] {
            let mut c = claims();
            c["iss"] = iss.clone();
            let t = mint(Algorithm::RS256, Some("rsa-1"), &rsa1(), &c);
            assert_eq!(
                code(v.verify(ProviderSelector::Auto, &t, NOW)),
                "wrong_issuer",
                "{iss}"
            );
        }
        let mut c = claims();
        c["aud"] = json!("someone-else");
        let t = mint(Algorithm::RS256, Some("rsa-1"), &rsa1(), &c);
        assert_eq!(
            v.verify(ProviderSelector::Auto, &t, NOW),
            Err(JwtError::WrongAudience)
        );
    }

    #[test]
    fn tampered_tokens_are_refused() {
        let mut v = main_verifier();
        for (alg, kid, key) in [
            (Algorithm::RS256, "rsa-1", rsa1()),
            (Algorithm::PS256, "rsa-1", rsa1()),
            (Algorithm::ES256, "ec256-1", ec256()),
            (Algorithm::ES384, "ec384-1", ec384()),
            (Algorithm::EdDSA, "ed-1", ed25519()),
        ] {
            let t = mint(alg, Some(kid), &key, &claims());
            let (message, sig) = t.rsplit_once('.').expect("dot");
            let mut raw = URL_SAFE_NO_PAD.decode(sig).expect("sig");
            raw[3] ^= 0x01;
            let flipped = format!("{message}.{}", b64(&raw));
            assert_eq!(
                code(v.verify(ProviderSelector::Auto, &flipped, NOW)),
                "bad_signature",
                "{alg:?}"
            );
            // Shortened signature.
            let short = format!("{message}.{}", b64(&raw[..raw.len() / 2]));
            assert_eq!(
                code(v.verify(ProviderSelector::Auto, &short, NOW)),
                "bad_signature",
                "{alg:?}"
            );
            // Payload changed, signature kept.
            let mut c = claims();
            c["tenant_id"] = json!("victim");
            let (header, _) = message.split_once('.').expect("dot");
            let swapped = format!("{header}.{}.{sig}", b64(c.to_string().as_bytes()));
            assert_eq!(
                code(v.verify(ProviderSelector::Auto, &swapped, NOW)),
                "bad_signature",
                "{alg:?}"
            );
        }
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let mut v = main_verifier();
        let t = mint(Algorithm::RS256, Some("rsa-1"), &rsa1(), &claims());
        let mut bad: Vec<String> = vec![
            "abc".to_string(),
            "a.b".to_string(),
            "a.b.c.d".to_string(),
            "..".to_string(),
            format!("{t}.extra"),
            t.replacen('.', "..", 1),
            format!("{}!{}", &t[..10], &t[11..]),
            format!("%%%.{}", &t[t.find('.').expect("dot") + 1..]),
            format!("{}.e30", b64(b"not json")),
        ];
        // Truncated at every offset inside the payload.
        let first_dot = t.find('.').expect("dot");
        let second_dot = t.rfind('.').expect("dot");
        for cut in (first_dot + 1..second_dot).step_by(7) {
            bad.push(t[..cut].to_string());
        }
        for token in &bad {
            let c = code(v.verify(ProviderSelector::Auto, token, NOW));
            assert!(c == "malformed" || c == "bad_signature", "{token}: {c}");
        }
        // Truncated signature: still three parts. Cut to a length that is not
        // base64 it is malformed; cut to one that is, the signature fails.
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &t[..t.len() - 5], NOW)),
            "malformed"
        );
        assert_eq!(
            code(v.verify(ProviderSelector::Auto, &t[..t.len() - 4], NOW)),
            "bad_signature"
        );

        // Correctly signed, but the payload is not JSON / not an object.
        let header = json!({"alg": "RS256", "kid": "rsa-1"});
        for payload in [
            &b"not json at all"[..],
            b"[1,2,3]",
            b"\"str\"",
            b"{\"iss\": ",
        ] {
            let t = sign_raw(&header, payload, &rsa1(), Algorithm::RS256);
            assert_eq!(code(v.verify(ProviderSelector::Auto, &t, NOW)), "malformed");
        }
        // Header not JSON.
        let t = format!(
            "{}.{}.{}",
            b64(b"{alg"),
            b64(claims().to_string().as_bytes()),
            b64(b"sig")
        );
        assert_eq!(code(v.verify(ProviderSelector::Auto, &t, NOW)), "malformed");
        // Header without alg.
        let t = format!(
            "{}.{}.{}",
            b64(b"{}"),
            b64(claims().to_string().as_bytes()),
            b64(b"sig")
        );
        assert_eq!(code(v.verify(ProviderSelector::Auto, &t, NOW)), "malformed");
        // Only the well-formed truncated signature reached the crypto.
        assert_eq!(v.signature_checks(), 1);
    }

    #[test]
    fn oversized_and_empty_tokens_are_refused() {
        let mut v = verifier(vec![provider(json!({"max_token_bytes": 2048}))]);
        let mut c = claims();
        c["padding"] = json!("x".repeat(3000));
        let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c);
        assert_eq!(
            v.verify(ProviderSelector::Auto, &t, NOW),
            Err(JwtError::TokenTooLarge { limit: 2048 })
        );
        assert_eq!(
            v.verify(ProviderSelector::Auto, &"a".repeat(1 << 20), NOW),
            Err(JwtError::TokenTooLarge { limit: 2048 })
        );
        assert_eq!(
            v.verify(ProviderSelector::Auto, "", NOW),
            Err(JwtError::MissingToken)
        );
        assert_eq!(
            v.verify(ProviderSelector::Auto, "  ", NOW),
            Err(JwtError::MissingToken)
        );
        // The limit of the matched provider applies when providers differ.
        let mut v = verifier(vec![provider(json!({"max_token_bytes": 600})), {
            let mut p = hmac_provider();
            p["max_token_bytes"] = json!(100_000);
            p
        }]);
        let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c);
        assert_eq!(
            v.verify(ProviderSelector::Auto, &t, NOW),
            Err(JwtError::TokenTooLarge { limit: 600 })
        );
    }

    // ---- token extraction ----------------------------------------------------

    #[test]
    fn token_extraction() {
        let headers = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let auth = TokenSource::Authorization;
        assert_eq!(
            extract_token(&auth, &headers(&[("authorization", "Bearer abc.def.ghi")])),
            Some("abc.def.ghi".to_string())
        );
        assert_eq!(
            extract_token(&auth, &headers(&[("authorization", "  bearer   abc ")])),
            Some("abc".to_string())
        );
        assert_eq!(
            extract_token(&auth, &headers(&[("authorization", "Basic dXNlcjpwYXNz")])),
            None
        );
        assert_eq!(
            extract_token(&auth, &headers(&[("authorization", "Bearer")])),
            None
        );
        assert_eq!(
            extract_token(&auth, &headers(&[("authorization", "Bearer ")])),
            None
        );
        assert_eq!(extract_token(&auth, &headers(&[])), None);

        let h = TokenSource::Header {
            name: "X-Token".to_string(),
            prefix: Some("Token ".to_string()),
        };
        assert_eq!(
            extract_token(&h, &headers(&[("x-token", "token a.b.c")])),
            Some("a.b.c".to_string())
        );
        assert_eq!(extract_token(&h, &headers(&[("x-token", "a.b.c")])), None);
        assert_eq!(extract_token(&h, &headers(&[("x-token", "é")])), None);
        let h = TokenSource::Header {
            name: "x-token".to_string(),
            prefix: None,
        };
        assert_eq!(
            extract_token(&h, &headers(&[("x-token", " a.b.c ")])),
            Some("a.b.c".to_string())
        );

        let c = TokenSource::Cookie {
            name: "id_token".to_string(),
        };
        assert_eq!(
            extract_token(&c, &headers(&[("cookie", "a=1; id_token=x.y.z; b=2")])),
            Some("x.y.z".to_string())
        );
        assert_eq!(
            extract_token(&c, &headers(&[("cookie", "xid_token=1; id_token_2=3")])),
            None
        );

        let mut v = verifier(vec![
            provider(json!({"from": {"cookie": {"name": "id_token"}}})),
            hmac_provider(),
        ]);
        let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &claims());
        let cookie = format!("id_token={t}");
        let lookup = |name: &str| (name == "cookie").then(|| cookie.clone());
        assert_eq!(
            code(v.verify_request(ProviderSelector::Auto, &lookup, NOW)),
            "ok"
        );
        assert_eq!(
            code(v.verify_request(ProviderSelector::Index(1), &lookup, NOW)),
            "missing_token"
        );
        assert_eq!(
            code(v.verify_request(ProviderSelector::Auto, &|_: &str| None, NOW)),
            "missing_token"
        );
    }

    // ---- errors --------------------------------------------------------------

    #[test]
    fn error_codes_and_statuses_are_stable() {
        let table = [
            (JwtError::Expired, "expired", 401),
            (JwtError::NotYetValid, "not_yet_valid", 401),
            (JwtError::WrongIssuer, "wrong_issuer", 401),
            (JwtError::WrongAudience, "wrong_audience", 401),
            (JwtError::BadSignature, "bad_signature", 401),
            (JwtError::UnknownKeyId, "unknown_key_id", 401),
            (
                JwtError::MissingTenantClaim("t".to_string()),
                "missing_tenant_claim",
                403,
            ),
            (
                JwtError::DisallowedAlgorithm("none".to_string()),
                "disallowed_algorithm",
                401,
            ),
            (JwtError::TokenTooLarge { limit: 1 }, "token_too_large", 401),
            (JwtError::Malformed("x"), "malformed", 401),
            (JwtError::MissingToken, "missing_token", 401),
            (
                JwtError::KeysUnavailable("p".to_string()),
                "keys_unavailable",
                503,
            ),
            (
                JwtError::ProviderNotConfigured(3),
                "provider_not_configured",
                500,
            ),
        ];
        for (err, c, status) in table {
            assert_eq!((err.code(), err.http_status()), (c, status));
        }
        assert_eq!(JwtError::MissingToken.www_authenticate(), Some("Bearer"));
        assert_eq!(
            JwtError::Expired.www_authenticate(),
            Some("Bearer error=\"invalid_token\"")
        );
        assert_eq!(
            JwtError::KeysUnavailable("p".to_string()).www_authenticate(),
            None
        );
        // The attacker-chosen alg is cut short in messages.
        let mut v = main_verifier();
        let header = json!({"alg": "x".repeat(500)});
        let t = format!("{}.{}.c2ln", b64(header.to_string().as_bytes()), b64(b"{}"));
        assert_eq!(
            v.verify(ProviderSelector::Auto, &t, NOW),
            Err(JwtError::DisallowedAlgorithm("x".repeat(16)))
        );
    }

    // ---- jwt_authn payload ---------------------------------------------------

    fn pv(kind: prost_types::value::Kind) -> prost_types::Value {
        prost_types::Value { kind: Some(kind) }
    }

    #[test]
    fn jwt_authn_payload_as_protobuf_struct() {
        use prost::Message as _;
        use prost_types::value::Kind;
        let mut app = prost_types::Struct::default();
        app.fields
            .insert("tenant_id".to_string(), pv(Kind::NumberValue(42.0)));
        let mut st = prost_types::Struct::default();
        st.fields
            .insert("iss".to_string(), pv(Kind::StringValue(ISS.to_string())));
        st.fields.insert(
            "sub".to_string(),
            pv(Kind::StringValue("user-7".to_string())),
        );
        st.fields
            .insert("exp".to_string(), pv(Kind::NumberValue((NOW + 60) as f64)));
        st.fields
            .insert("app_metadata".to_string(), pv(Kind::StructValue(app)));
        st.fields.insert(
            "roles".to_string(),
            pv(Kind::ListValue(prost_types::ListValue {
                values: vec![pv(Kind::NullValue(0))],
            })),
        );
        let bytes = st.encode_to_vec();
        let id = claims_from_jwt_authn_payload(&bytes, "app_metadata.tenant_id", Some("sub"))
            .expect("claims");
        assert_eq!(
            id,
            VerifiedIdentity {
                provider: JWT_AUTHN_PROVIDER.to_string(),
                tenant_id: "42".to_string(),
                user_id: Some("user-7".to_string()),
                exp: Some(NOW + 60),
            }
        );
        assert_eq!(
            claims_from_jwt_authn_payload(&bytes, "tenant", None),
            Err(JwtError::MissingTenantClaim("tenant".to_string()))
        );
        assert_eq!(
            code(claims_from_jwt_authn_payload(
                &[0xff, 0xff, 0xff],
                "tenant",
                None
            )),
            "malformed"
        );
        assert_eq!(
            code(claims_from_jwt_authn_payload(&[], "tenant", None)),
            "missing_token"
        );
    }

    /// A `jwt_authn` payload `Struct` with `tenant` (and any other fields)
    /// set to the given values.
    fn authn_struct(fields: Vec<(&str, prost_types::value::Kind)>) -> Vec<u8> {
        use prost::Message as _;
        let mut st = prost_types::Struct::default();
        for (k, kind) in fields {
            st.fields.insert(k.to_string(), pv(kind));
        }
        st.encode_to_vec()
    }

    #[test]
    fn jwt_authn_struct_numbers_and_values_as_tenant_ids() {
        use prost_types::value::Kind;
        let tenant = |kind: Kind| {
            claims_from_jwt_authn_payload(&authn_struct(vec![("tenant", kind)]), "tenant", None)
                .map(|id| id.tenant_id)
        };
        let missing = Err(JwtError::MissingTenantClaim("tenant".to_string()));
        // Struct numbers are doubles: integral ones are integer ids.
        assert_eq!(tenant(Kind::NumberValue(42.0)), Ok("42".to_string()));
        assert_eq!(tenant(Kind::NumberValue(0.0)), Ok("0".to_string()));
        assert_eq!(tenant(Kind::NumberValue(-7.0)), Ok("-7".to_string()));
        assert_eq!(tenant(Kind::NumberValue(-0.0)), Ok("-0".to_string()));
        assert_eq!(
            tenant(Kind::NumberValue(9_007_199_254_740_991.0)),
            Ok("9007199254740991".to_string())
        );
        assert_eq!(
            tenant(Kind::NumberValue(9_007_199_254_740_992.0)),
            Ok("9007199254740992".to_string())
        );
        assert_eq!(
            tenant(Kind::NumberValue(-9_007_199_254_740_992.0)),
            Ok("-9007199254740992".to_string())
        );
        // Beyond 2^53 a double does not name one integer.
        assert_eq!(tenant(Kind::NumberValue(9_007_199_254_740_994.0)), missing);
        assert_eq!(tenant(Kind::NumberValue(1e300)), missing);
        // Fractions, non-finite numbers and non-scalars are no ids.
        assert_eq!(tenant(Kind::NumberValue(1.5)), missing);
        assert_eq!(tenant(Kind::NumberValue(-0.25)), missing);
        assert_eq!(tenant(Kind::NumberValue(f64::NAN)), missing);
        assert_eq!(tenant(Kind::NumberValue(f64::INFINITY)), missing);
        assert_eq!(tenant(Kind::NumberValue(f64::NEG_INFINITY)), missing);
        assert_eq!(tenant(Kind::StringValue("acme".to_string())), Ok("acme".to_string()));
        assert_eq!(tenant(Kind::StringValue(" 7 ".to_string())), Ok(" 7 ".to_string()));
        assert_eq!(tenant(Kind::StringValue(String::new())), missing);
        assert_eq!(tenant(Kind::BoolValue(true)), missing);
        assert_eq!(tenant(Kind::BoolValue(false)), missing);
        assert_eq!(tenant(Kind::NullValue(0)), missing);
        let mut inner = prost_types::Struct::default();
        inner
            .fields
            .insert("id".to_string(), pv(Kind::NumberValue(5.0)));
        assert_eq!(tenant(Kind::StructValue(inner.clone())), missing);
        assert_eq!(
            tenant(Kind::ListValue(prost_types::ListValue {
                values: vec![pv(Kind::StringValue("acme".to_string()))],
            })),
            missing
        );
        assert_eq!(
            tenant(Kind::ListValue(prost_types::ListValue::default())),
            missing
        );
        // A dotted path reaches into nested Structs; a whole-name key wins.
        let bytes = authn_struct(vec![
            ("org", Kind::StructValue(inner.clone())),
            ("org.id", Kind::StringValue("whole".to_string())),
        ]);
        assert_eq!(
            claims_from_jwt_authn_payload(&bytes, "org.id", None).map(|id| id.tenant_id),
            Ok("whole".to_string())
        );
        let bytes = authn_struct(vec![("org", Kind::StructValue(inner))]);
        assert_eq!(
            claims_from_jwt_authn_payload(&bytes, "org.id", None).map(|id| id.tenant_id),
            Ok("5".to_string())
        );
    }

    #[test]
    fn jwt_authn_struct_odd_numbers_elsewhere_do_not_spoil_the_payload() {
        use prost_types::value::Kind;
        let with = |user: Kind, exp: Kind| {
            let bytes = authn_struct(vec![
                ("tenant", Kind::StringValue("acme".to_string())),
                ("sub", user),
                ("exp", exp),
                ("score", Kind::NumberValue(f64::NAN)),
                (
                    "weights",
                    Kind::ListValue(prost_types::ListValue {
                        values: vec![
                            pv(Kind::NumberValue(f64::INFINITY)),
                            pv(Kind::NumberValue(0.5)),
                        ],
                    }),
                ),
            ]);
            claims_from_jwt_authn_payload(&bytes, "tenant", Some("sub"))
                .map(|id| (id.tenant_id, id.user_id, id.exp))
        };
        let acme = || "acme".to_string();
        assert_eq!(
            with(Kind::NumberValue(12.0), Kind::NumberValue((NOW + 60) as f64)),
            Ok((acme(), Some("12".to_string()), Some(NOW + 60)))
        );
        // A fractional `exp` is cut to whole seconds; before 1970 is 0.
        assert_eq!(
            with(Kind::NumberValue(12.5), Kind::NumberValue(NOW as f64 + 0.75)),
            Ok((acme(), None, Some(NOW)))
        );
        assert_eq!(
            with(Kind::BoolValue(true), Kind::NumberValue(-5.0)),
            Ok((acme(), None, Some(0)))
        );
        // Unusable user and `exp` values are dropped, not errors.
        assert_eq!(
            with(Kind::NumberValue(f64::NAN), Kind::NumberValue(f64::INFINITY)),
            Ok((acme(), None, None))
        );
        assert_eq!(
            with(
                Kind::StringValue(String::new()),
                Kind::StringValue("soon".to_string())
            ),
            Ok((acme(), None, None))
        );
        // An empty Struct carries no claims at all.
        assert_eq!(
            claims_from_jwt_authn_payload(&authn_struct(vec![]), "tenant", None),
            Err(JwtError::MissingToken)
        );
    }

    #[test]
    fn jwt_authn_payload_as_json() {
        let json = br#" {"tenant_id": "acme", "sub": 12}"#;
        let id = claims_from_jwt_authn_payload(json, "tenant_id", Some("sub")).expect("claims");
        assert_eq!(
            (id.tenant_id.as_str(), id.user_id.as_deref(), id.exp),
            ("acme", Some("12"), None)
        );
        assert_eq!(
            code(claims_from_jwt_authn_payload(
                b"{not json",
                "tenant_id",
                None
            )),
            "malformed"
        );
    }
}
