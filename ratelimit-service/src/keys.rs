//! Redis key construction. Every key of one tenant starts with the same
//! `{<domain>|<first entry value>}` hash tag, so one Lua script may touch them
//! all in Redis Cluster.

use rls_contract::{Mode, Unit};

/// The unit's part of a counter key (one letter; keep: it is in stored keys).
pub fn unit_tag(unit: Unit) -> &'static str {
    match unit {
        Unit::Second => "s",
        Unit::Minute => "m",
        Unit::Hour => "h",
        Unit::Day => "D",
        Unit::Month => "M",
        Unit::Year => "Y",
    }
}

/// The part of a counter key for a DAY limit counted per calendar week
/// (`tollgate.window=week`; keep: it is in stored keys).
pub const WEEK_TAG: &str = "W";

/// Escape the characters that structure keys (`{ } | : = %`), so a value
/// cannot end the hash tag early or collide with another key's layout.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '{' | '}' | '|' | ':' | '=' | '%' => {
                out.push('%');
                out.push_str(&format!("{:02X}", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}

/// The hash tag of a tenant, braces included.
pub fn hash_tag(domain: &str, first_value: &str) -> String {
    format!("{{{}|{}}}", escape(domain), escape(first_value))
}

/// `tg:{tag}:<unit>[:<window start ms>]:<k=v|k=v...>`
pub fn counter_key(tag: &str, unit: &str, window_start_ms: Option<i64>, entries: &[(&str, &str)]) -> String {
    let mut key = format!("tg:{tag}:{unit}:");
    if let Some(w) = window_start_ms {
        key.push_str(&w.to_string());
        key.push(':');
    }
    for (i, (k, v)) in entries.iter().enumerate() {
        if i > 0 {
            key.push('|');
        }
        key.push_str(&escape(k));
        key.push('=');
        key.push_str(&escape(v));
    }
    key
}

/// `tg:{tag}:i:<r|s>:<digest>`: a reserve and a settle may reuse one request
/// id. The digest is the first 128 bits of the SHA-256 of the caller's key,
/// base64url (22 characters), so a key costs the same whatever the caller's
/// key length: with a filter key (`<uuid>:settle`) the name fits a 64-byte
/// allocation instead of 96 (see docs/sizing.md). The mode letters are
/// spelled here, not taken from the metadata values: they are part of stored
/// keys.
pub fn idempotency_key(tag: &str, mode: Mode, key: &str) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let mode = match mode {
        Mode::Reserve => "r",
        Mode::Settle => "s",
    };
    let digest = sha2::Sha256::digest(key.as_bytes());
    let digest = digest.as_slice();
    // 32 bytes: the first 16 are always there
    let short = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.get(..16).unwrap_or(digest));
    format!("tg:{tag}:i:{mode}:{short}")
}

/// `tg:{tag}:idem:<reserve|settle>:<escaped key>`: the name the service gave
/// an idempotency key before [`idempotency_key`]. Read, never written: a call
/// retried across the upgrade finds the decision its first attempt stored
/// (these keys are gone one TTL after the upgrade, 24 h at most).
pub fn legacy_idempotency_key(tag: &str, mode: Mode, key: &str) -> String {
    let mode = match mode {
        Mode::Reserve => "reserve",
        Mode::Settle => "settle",
    };
    format!("tg:{tag}:idem:{mode}:{}", escape(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_keeps_the_tag_whole() {
        assert_eq!(hash_tag("d", "a}b{c"), "{d|a%7Db%7Bc}");
        assert_eq!(counter_key("{d|x}", "m", None, &[("tenant", "x"), ("m", "a=b")]), "tg:{d|x}:m:tenant=x|m=a%3Db");
        assert_eq!(counter_key("{d|x}", "D", Some(5), &[("t", "x")]), "tg:{d|x}:D:5:t=x");
        assert_eq!(Unit::ALL.map(unit_tag), ["s", "m", "h", "D", "M", "Y"]);
        assert!(!Unit::ALL.map(unit_tag).contains(&WEEK_TAG));
        assert_eq!(legacy_idempotency_key("{d|x}", Mode::Reserve, "k"), "tg:{d|x}:idem:reserve:k");
        assert_eq!(legacy_idempotency_key("{d|x}", Mode::Settle, "a:b"), "tg:{d|x}:idem:settle:a%3Ab");
    }

    #[test]
    fn idempotency_keys_are_short_digests_per_mode() {
        // SHA-256("k") = 8254c329a92850f6d539dd376f4816ee2764517da5e0235514af433164480d7a
        assert_eq!(idempotency_key("{d|x}", Mode::Reserve, "k"), "tg:{d|x}:i:r:glTDKakoUPbVOd03b0gW7g");
        assert_eq!(idempotency_key("{d|x}", Mode::Settle, "k"), "tg:{d|x}:i:s:glTDKakoUPbVOd03b0gW7g");
        let uuid = "7e4fb691-ead7-47e3-a31d-c7ee14ecf018:settle";
        let tag = hash_tag("tollgate", "tenant-900");
        // the filter's key: 51 characters (3 + 1 + 51 in a 64-byte allocation), was 82
        assert_eq!(idempotency_key(&tag, Mode::Settle, uuid).len(), 51);
        assert_eq!(legacy_idempotency_key(&tag, Mode::Settle, uuid).len(), 82);
        assert_ne!(idempotency_key(&tag, Mode::Settle, "a"), idempotency_key(&tag, Mode::Settle, "b"));
    }
}
