//! Which gRPC metadata does a call carry besides its message?
//!
//! Two optional keys: the mode of the call and an idempotency key. Absent,
//! the call is a plain RLS v3 reserve that a stock server understands.

/// The call's [`Mode`] (values [`MODE_RESERVE`], the default, or [`MODE_SETTLE`]).
pub const META_MODE: &str = "x-tollgate-mode";
/// A key that makes the call apply at most once (see [`is_valid_idempotency_key`]).
pub const META_IDEMPOTENCY_KEY: &str = "x-tollgate-idempotency-key";

/// `META_MODE` of a reserve (the default when the metadata is absent).
pub const MODE_RESERVE: &str = "reserve";
/// `META_MODE` of a settle (refunds and extra charges, never refused).
pub const MODE_SETTLE: &str = "settle";

/// Upper bound on the idempotency key length, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 256;

/// How long after its first attempt the filter may still send a keyed call
/// again (a settle, or a reserve whose answer was lost), in ms. Older calls
/// are dropped (counted in `tollgate_settle_dropped`), never sent: the
/// service remembers each idempotency key for longer than this, so no call
/// the filter sends can apply twice.
pub const IDEMPOTENCY_RETRY_HORIZON_MS: u64 = 600_000;

/// The service's default memory of an idempotency key (reserve and settle),
/// in ms: [`IDEMPOTENCY_RETRY_HORIZON_MS`] plus a margin for the time a
/// call is in flight and the first attempt's age before it was queued (a
/// reserve's own timeout), far above both.
pub const DEFAULT_IDEMPOTENCY_TTL_MS: u64 = 900_000;

/// The least idempotency TTL that still covers every call the filter
/// sends: the horizon plus a minute for calls in flight.
pub const MIN_SAFE_IDEMPOTENCY_TTL_MS: u64 = IDEMPOTENCY_RETRY_HORIZON_MS + 60_000;

const _: () = assert!(DEFAULT_IDEMPOTENCY_TTL_MS >= MIN_SAFE_IDEMPOTENCY_TTL_MS);

/// How the charges of a call apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    /// All-or-nothing: refused (and nothing charged) if any descriptor would go over.
    #[default]
    Reserve,
    /// Charges and refunds apply unconditionally; the answer is OK.
    Settle,
}

impl Mode {
    /// The `META_MODE` value of this mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reserve => MODE_RESERVE,
            Self::Settle => MODE_SETTLE,
        }
    }

    /// The mode a `META_MODE` value names: either name in any case, with
    /// surrounding white space; empty means the default.
    pub fn parse(value: &str) -> Option<Self> {
        let v = value.trim();
        if v.eq_ignore_ascii_case(MODE_SETTLE) {
            Some(Self::Settle)
        } else if v.eq_ignore_ascii_case(MODE_RESERVE) || v.is_empty() {
            Some(Self::Reserve)
        } else {
            None
        }
    }
}

/// Whether a `META_IDEMPOTENCY_KEY` value is acceptable: 1 to
/// [`MAX_IDEMPOTENCY_KEY`] bytes of visible ASCII.
pub fn is_valid_idempotency_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= MAX_IDEMPOTENCY_KEY && key.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_round_trip_and_default_to_reserve() {
        for m in [Mode::Reserve, Mode::Settle] {
            assert_eq!(Mode::parse(m.as_str()), Some(m));
        }
        assert_eq!(Mode::parse(MODE_SETTLE), Some(Mode::Settle));
        assert_eq!(Mode::parse(" Settle "), Some(Mode::Settle));
        assert_eq!(Mode::parse("RESERVE"), Some(Mode::Reserve));
        assert_eq!(Mode::parse(""), Some(Mode::Reserve));
        assert_eq!(Mode::default(), Mode::Reserve);
        assert_eq!(Mode::parse("yolo"), None);
    }

    #[test]
    fn idempotency_keys_are_short_visible_ascii() {
        assert!(is_valid_idempotency_key("req-1"));
        assert!(is_valid_idempotency_key(&"k".repeat(MAX_IDEMPOTENCY_KEY)));
        assert!(!is_valid_idempotency_key(&"k".repeat(MAX_IDEMPOTENCY_KEY + 1)));
        assert!(!is_valid_idempotency_key(""));
        assert!(!is_valid_idempotency_key("has space"));
        assert!(!is_valid_idempotency_key("caf\u{e9}"));
    }

    #[test]
    fn metadata_keys_are_lower_case() {
        // gRPC metadata keys are lower case on the wire (HTTP/2 headers).
        for k in [META_MODE, META_IDEMPOTENCY_KEY] {
            assert_eq!(k, k.to_ascii_lowercase());
        }
    }
}
