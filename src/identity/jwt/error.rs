//! Why was a JWT config, a JWKS document or a token refused?

use thiserror::Error;

use super::jwks::MAX_JWKS_BYTES;

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
    #[error("JWKS has no usable signing key ({skipped} skipped: unsupported type, curve, size or use)")]
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
