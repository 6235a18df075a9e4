//! How are provider credentials sealed at rest? AES-256-GCM under a
//! key-encryption key (KEK) ring: the first key seals, every key opens.
//!
//! Sealed form: `v1.<kid>.<nonce>.<ciphertext>` (base64url, no padding), a
//! random 96-bit nonce per seal. The additional authenticated data binds the
//! format version, kid, tenant and provider, so a ciphertext copied to another
//! tenant or provider does not open. Key material never appears in an error
//! or `Debug` output.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use rand::RngCore as _;

/// Longest kid.
pub const MAX_KID_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KekError {
    #[error("the KEK list is empty")]
    Empty,
    #[error("KEK entry {0}: expected <kid>:<base64 of 32 bytes>")]
    Shape(usize),
    #[error("KEK entry {0}: kid must be 1..=32 of letters, digits, '-', '_'")]
    Kid(usize),
    #[error("KEK entry {0}: the key is not base64 of exactly 32 bytes")]
    Key(usize),
    #[error("KEK entry {0}: kid {1} appears twice")]
    Duplicate(usize, String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("no key-encryption key is configured (--kek-file or TOLLGATE_KEK)")]
    NoKek,
    #[error("sealed credential is malformed")]
    Malformed,
    #[error("sealed credential names kid {0}, which is not in the KEK ring")]
    UnknownKid(String),
    #[error("sealed credential does not open (wrong key, tenant or provider, or tampered)")]
    Open,
    #[error("encryption failed")]
    Seal,
}

struct Kek {
    kid: String,
    cipher: Aes256Gcm,
}

/// The KEK ring (possibly empty: then sealing is refused, the service still runs).
#[derive(Default)]
pub struct KekRing {
    keys: Vec<Kek>,
}

impl std::fmt::Debug for KekRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KekRing").field("kids", &self.kids()).finish()
    }
}

fn valid_kid(kid: &str) -> bool {
    !kid.is_empty()
        && kid.len() <= MAX_KID_LEN
        && kid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn aad(kid: &str, tenant: &str, provider: &str) -> Vec<u8> {
    format!("tollgate-credential\0v1\0{kid}\0{tenant}\0{provider}").into_bytes()
}

impl KekRing {
    /// Parse `<kid>:<base64 of 32 bytes>` entries separated by commas or newlines.
    pub fn parse(text: &str) -> Result<Self, KekError> {
        let mut keys: Vec<Kek> = Vec::new();
        let entries = text.split([',', '\n']).map(str::trim).filter(|e| !e.is_empty());
        for (i, entry) in entries.enumerate() {
            let n = i + 1;
            let (kid, b64) = entry.split_once(':').ok_or(KekError::Shape(n))?;
            let (kid, b64) = (kid.trim(), b64.trim());
            if !valid_kid(kid) {
                return Err(KekError::Kid(n));
            }
            if keys.iter().any(|k| k.kid == kid) {
                return Err(KekError::Duplicate(n, kid.to_owned()));
            }
            let bytes = STANDARD.decode(b64).map_err(|_| KekError::Key(n))?;
            if bytes.len() != 32 {
                return Err(KekError::Key(n));
            }
            let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&bytes));
            keys.push(Kek { kid: kid.to_owned(), cipher });
        }
        if keys.is_empty() {
            return Err(KekError::Empty);
        }
        Ok(Self { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Kids in order; the first seals.
    pub fn kids(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.kid.clone()).collect()
    }

    /// Seal `secret` for (tenant, provider) with the first key; returns (sealed, kid).
    pub fn seal(&self, tenant: &str, provider: &str, secret: &str) -> Result<(String, String), SealError> {
        let kek = self.keys.first().ok_or(SealError::NoKek)?;
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        let ct = kek
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload { msg: secret.as_bytes(), aad: &aad(&kek.kid, tenant, provider) },
            )
            .map_err(|_| SealError::Seal)?;
        let sealed = format!("v1.{}.{}.{}", kek.kid, URL_SAFE_NO_PAD.encode(nonce), URL_SAFE_NO_PAD.encode(ct));
        Ok((sealed, kek.kid.clone()))
    }

    /// Open a sealed credential of (tenant, provider) with whichever key sealed it.
    pub fn open(&self, tenant: &str, provider: &str, sealed: &str) -> Result<String, SealError> {
        let mut parts = sealed.split('.');
        let (Some("v1"), Some(kid), Some(nonce), Some(ct), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(SealError::Malformed);
        };
        let kek = self.keys.iter().find(|k| k.kid == kid).ok_or_else(|| SealError::UnknownKid(kid.to_owned()))?;
        let nonce = URL_SAFE_NO_PAD.decode(nonce).map_err(|_| SealError::Malformed)?;
        if nonce.len() != 12 {
            return Err(SealError::Malformed);
        }
        let ct = URL_SAFE_NO_PAD.decode(ct).map_err(|_| SealError::Malformed)?;
        let plain = kek
            .cipher
            .decrypt(Nonce::from_slice(&nonce), Payload { msg: &ct, aad: &aad(kid, tenant, provider) })
            .map_err(|_| SealError::Open)?;
        String::from_utf8(plain).map_err(|_| SealError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> String {
        STANDARD.encode([b; 32])
    }

    #[test]
    fn seals_opens_and_rotates() {
        let old = KekRing::parse(&format!("k1:{}", key(1))).unwrap();
        let (sealed, kid) = old.seal("acme", "openai", "sk-secret").unwrap();
        assert_eq!(kid, "k1");
        assert!(sealed.starts_with("v1.k1."));
        assert!(!sealed.contains("sk-secret"));
        let rotated = KekRing::parse(&format!("k2:{}\nk1:{}", key(2), key(1))).unwrap();
        assert_eq!(rotated.open("acme", "openai", &sealed).unwrap(), "sk-secret");
        assert_eq!(rotated.seal("acme", "openai", "x").unwrap().1, "k2");
        let (a, _) = rotated.seal("acme", "openai", "x").unwrap();
        let (b, _) = rotated.seal("acme", "openai", "x").unwrap();
        assert_ne!(a, b, "fresh nonce per seal");
    }

    #[test]
    fn aad_binds_tenant_and_provider() {
        let ring = KekRing::parse(&format!("k1:{}", key(1))).unwrap();
        let (sealed, _) = ring.seal("acme", "openai", "sk-secret").unwrap();
        assert_eq!(ring.open("globex", "openai", &sealed), Err(SealError::Open));
        assert_eq!(ring.open("acme", "anthropic", &sealed), Err(SealError::Open));
        assert_eq!(ring.open("acme", "openai", "garbage"), Err(SealError::Malformed));
        let other = KekRing::parse(&format!("k9:{}", key(9))).unwrap();
        assert_eq!(other.open("acme", "openai", &sealed), Err(SealError::UnknownKid("k1".into())));
    }

    #[test]
    fn bad_rings_are_refused_without_echoing_keys() {
        assert_eq!(KekRing::parse("").unwrap_err(), KekError::Empty);
        assert_eq!(KekRing::parse("nokid").unwrap_err(), KekError::Shape(1));
        let e = KekRing::parse("k1:c2hvcnQ=").unwrap_err();
        assert_eq!(e, KekError::Key(1));
        assert!(!e.to_string().contains("c2hvcnQ"));
        assert!(matches!(KekRing::parse(&format!("k1:{},k1:{}", key(1), key(2))), Err(KekError::Duplicate(2, _))));
        assert!(!format!("{:?}", KekRing::parse(&format!("k1:{}", key(1))).unwrap()).contains(&key(1)));
        assert!(KekRing::default().seal("a", "b", "c").is_err());
    }
}
