//! May a request go while the rate-limit service is down? This worker's
//! local per-minute allowance of each tenant (fail-open).

use hashbrown::HashMap;

/// Per-minute local allowance of one tenant on this worker.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Window {
    pub(crate) minute: u64,
    pub(crate) requests: u64,
    pub(crate) tokens: u64,
}

/// The allowance windows of every tenant seen failing open, by tenant index.
#[derive(Debug, Default)]
pub struct Allowance {
    windows: HashMap<usize, Window>,
}

impl Allowance {
    /// Admits one request of `estimate` tokens for `tenant` in the minute of
    /// `now_ms` if that minute's window still has room for it: fewer than
    /// `max_requests` requests, and at most `max_tokens` tokens (when set)
    /// once it is counted. An admitted request is counted.
    pub fn admit(
        &mut self,
        tenant: usize,
        now_ms: u64,
        max_requests: u64,
        max_tokens: Option<u64>,
        estimate: u64,
    ) -> bool {
        let minute = now_ms / 60_000;
        let w = self.windows.entry(tenant).or_default();
        if w.minute != minute {
            *w = Window { minute, requests: 0, tokens: 0 };
        }
        let tokens_ok = max_tokens.is_none_or(|m| w.tokens.saturating_add(estimate) <= m);
        if w.requests < max_requests && tokens_ok {
            w.requests += 1;
            w.tokens = w.tokens.saturating_add(estimate);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_request_cap_per_minute() {
        let mut a = Allowance::default();
        assert!(a.admit(0, 1_000, 2, None, 10));
        assert!(a.admit(0, 2_000, 2, None, 10));
        assert!(!a.admit(0, 3_000, 2, None, 10), "third request in the minute");
        assert!(a.admit(1, 3_000, 2, None, 10), "another tenant has its own window");
        assert!(a.admit(0, 60_000, 2, None, 10), "a new minute starts afresh");
    }

    #[test]
    fn admits_up_to_the_token_cap_and_a_refusal_counts_nothing() {
        let mut a = Allowance::default();
        assert!(a.admit(0, 0, 10, Some(100), 60));
        assert!(!a.admit(0, 1, 10, Some(100), 60), "60 + 60 > 100");
        assert!(a.admit(0, 2, 10, Some(100), 40), "60 + 40 = 100 fits");
        assert!(!a.admit(0, 3, 10, Some(100), 1));
        assert!(a.admit(0, 60_000, 10, Some(100), 100));
    }
}
