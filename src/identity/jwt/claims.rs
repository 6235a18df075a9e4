//! What does a verified token say about the caller, and how is one claim
//! read out of its payload?

use serde_json::{Map, Value};

use super::error::JwtError;

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

/// A claim named by a dotted path (see `JwtProvider::tenant_claim`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClaimPath {
    pub(crate) whole: String,
    segments: Vec<String>,
}

impl ClaimPath {
    pub(crate) fn parse(path: &str) -> Option<Self> {
        if path.is_empty() {
            return None;
        }
        let segments: Vec<String> = path.split('.').map(str::to_string).collect();
        if segments.iter().any(String::is_empty) && !path.contains('/') {
            // `a..b` or `.a` is a typo; a URL-like namespaced claim may
            // legitimately contain dots and is then matched whole.
            return None;
        }
        Some(Self { whole: path.to_string(), segments })
    }

    pub(crate) fn lookup<'a>(&self, claims: &'a Map<String, Value>) -> Option<&'a Value> {
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
pub(crate) fn claim_as_id(value: &Value) -> Option<String> {
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
pub(crate) fn numeric_date(
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
