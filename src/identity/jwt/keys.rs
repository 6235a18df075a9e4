//! When are a remote JWKS's keys fetched again, and what stays in use when a
//! fetch fails?

use super::error::JwksError;
use super::jwks::KeySet;

/// Keys of a remote JWKS, with the refresh schedule.
///
/// Pure state machine: the host contexts asks [`KeyStore::is_refresh_due`], calls
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
    pub fn complete_refresh(&mut self, result: Result<KeySet, JwksError>, now_unix_s: u64) -> RefreshOutcome {
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
                let delay = RETRY_BASE_S.saturating_mul(1u64 << shift).min(self.refresh_interval_s);
                self.next_attempt_s = now_unix_s.saturating_add(delay);
                RefreshOutcome::Failed { error, kept_last_good: self.keys.is_some() }
            }
        }
    }
}
