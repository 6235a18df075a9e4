//! Which keys of a JWKS document can verify signatures here, and which one
//! verifies a given token?

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::DecodingKey;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::config::JwtAlgorithm;
use super::error::{JwksError, JwtError};

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
        f.debug_struct("KeySet").field("kids", &self.kids()).field("skipped", &self.skipped).finish()
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
    pub(super) fn supports(&self, alg: JwtAlgorithm) -> bool {
        self.keys.iter().any(|k| k.accepts(alg))
    }

    /// Picks the key for a token. With a `kid`, the key with that `kid` that
    /// accepts the algorithm. Without one, the only key that accepts the
    /// algorithm; if several do, the token is refused rather than tried
    /// against each (which would turn one bad token into many signature
    /// checks and blur key rotation).
    pub(super) fn select(&self, kid: Option<&str>, alg: JwtAlgorithm) -> Result<&DecodingKey, JwtError> {
        let mut candidates = self.keys.iter().filter(|k| k.accepts(alg));
        match kid {
            Some(kid) => {
                candidates.find(|k| k.kid.as_deref() == Some(kid)).map(|k| &k.key).ok_or(JwtError::UnknownKeyId)
            }
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

pub(super) fn b64url(s: &str) -> Option<Vec<u8>> {
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
    if raw.key_ops.as_ref().is_some_and(|ops| !ops.iter().any(|o| o == "verify")) {
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
            let bits = n_trimmed.len().saturating_mul(8).saturating_sub(leading_zero_bits);
            if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) || e_bytes.is_empty() || e_bytes.len() > 8 {
                return None;
            }
            (KeyKind::Rsa, DecodingKey::from_rsa_raw_components(n_trimmed, &e_bytes), vec!["RSA", n, e])
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
            (kind, DecodingKey::from_ec_der(&point), vec!["EC", crv, x, y])
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
            (KeyKind::Ed25519, DecodingKey::from_ed_der(&xb), vec!["OKP", crv, x])
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
    Some(JwkKey { kid: raw.kid.clone(), kind, alg, key })
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

pub(super) fn keyset_from_value(doc: &Value) -> Result<KeySet, JwksError> {
    let entries = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| JwksError::NotJwks("missing `keys` array".to_string()))?;
    let mut hasher = Sha256::new();
    let mut keys = Vec::new();
    let mut skipped = 0;
    for entry in entries {
        match serde_json::from_value::<RawJwk>(entry.clone()).ok().and_then(|raw| build_jwk(&raw, &mut hasher)) {
            Some(k) => keys.push(k),
            None => skipped += 1,
        }
    }
    if keys.is_empty() {
        return Err(JwksError::NoUsableKeys { skipped });
    }
    Ok(KeySet { keys, skipped, fingerprint: hasher.finalize().into() })
}
