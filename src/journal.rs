//! The settle journal: charges and refunds waiting to reach the rate-limit
//! service, kept per VM and sent from the root context.
//!
//! Settles are sent from the root context's tick, never from the request's
//! own context, because a request context is gone by the time the answer to a
//! call made at the end of its stream arrives. Each entry carries an
//! idempotency key, so a retry after a lost answer is not charged twice. The
//! journal is bounded: when full, the oldest entry is dropped and counted.

use std::collections::VecDeque;

/// One call waiting to be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Serialized `RateLimitRequest`.
    pub message: Vec<u8>,
    pub idempotency_key: String,
    /// Sent with `x-tollgate-mode: settle` (applied unconditionally).
    pub settle_mode: bool,
    pub attempts: u32,
    pub next_attempt_ms: u64,
}

/// First retry delay; doubles per attempt up to [`MAX_BACKOFF_MS`].
pub const BASE_BACKOFF_MS: u64 = 200;
pub const MAX_BACKOFF_MS: u64 = 10_000;

#[derive(Debug, Default)]
pub struct Journal {
    capacity: usize,
    queue: VecDeque<Entry>,
    /// Entries sent and awaiting an answer, by call token.
    in_flight: Vec<(u32, Entry)>,
    pub dropped: u64,
}

impl Journal {
    pub fn new(capacity: usize) -> Self {
        Journal { capacity: capacity.max(1), ..Default::default() }
    }

    /// Adds an entry; returns how many old entries were dropped to make room.
    pub fn push(&mut self, entry: Entry) -> u64 {
        let mut dropped = 0;
        while self.queue.len() + self.in_flight.len() >= self.capacity {
            if self.queue.pop_front().is_none() {
                break;
            }
            dropped += 1;
        }
        if self.queue.len() + self.in_flight.len() >= self.capacity {
            // Everything is in flight: the new entry is the one dropped.
            self.dropped += dropped + 1;
            return dropped + 1;
        }
        self.queue.push_back(entry);
        self.dropped += dropped;
        dropped
    }

    /// Entries due at `now_ms`, at most `max`, moved out for sending.
    pub fn due(&mut self, now_ms: u64, max: usize) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut keep = VecDeque::with_capacity(self.queue.len());
        while let Some(e) = self.queue.pop_front() {
            if out.len() < max && e.next_attempt_ms <= now_ms {
                out.push(e);
            } else {
                keep.push_back(e);
            }
        }
        self.queue = keep;
        out
    }

    /// Records that `entry` was sent as call `token`.
    pub fn sent(&mut self, token: u32, entry: Entry) {
        self.in_flight.push((token, entry));
    }

    /// A call could not even be dispatched: retry later.
    pub fn retry_later(&mut self, mut entry: Entry, now_ms: u64) {
        entry.attempts = entry.attempts.saturating_add(1);
        entry.next_attempt_ms = now_ms.saturating_add(backoff_ms(entry.attempts));
        self.queue.push_back(entry);
    }

    /// The answer to call `token` arrived. `ok` means the service applied it.
    /// Returns whether the token was one of the journal's.
    pub fn answered(&mut self, token: u32, ok: bool, now_ms: u64) -> bool {
        let Some(pos) = self.in_flight.iter().position(|(t, _)| *t == token) else {
            return false;
        };
        let (_, entry) = self.in_flight.swap_remove(pos);
        if !ok {
            self.retry_later(entry, now_ms);
        }
        true
    }

    pub fn pending(&self) -> usize {
        self.queue.len() + self.in_flight.len()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

pub fn backoff_ms(attempts: u32) -> u64 {
    let shift = attempts.saturating_sub(1).min(16);
    BASE_BACKOFF_MS.saturating_mul(1u64 << shift).min(MAX_BACKOFF_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(key: &str) -> Entry {
        Entry { message: vec![1], idempotency_key: key.into(), settle_mode: true, attempts: 0, next_attempt_ms: 0 }
    }

    #[test]
    fn failed_calls_back_off_and_retry() {
        let mut j = Journal::new(10);
        j.push(e("a"));
        let due = j.due(0, 10);
        assert_eq!(due.len(), 1);
        j.sent(7, due[0].clone());
        assert!(j.answered(7, false, 1000));
        assert!(j.due(1100, 10).is_empty());
        let again = j.due(1200, 10);
        assert_eq!(again[0].attempts, 1);
        j.sent(8, again[0].clone());
        assert!(j.answered(8, true, 1300));
        assert_eq!(j.pending(), 0);
        assert!(!j.answered(99, true, 0));
    }

    #[test]
    fn bounded_drops_oldest() {
        let mut j = Journal::new(2);
        j.push(e("a"));
        j.push(e("b"));
        assert_eq!(j.push(e("c")), 1);
        assert_eq!(j.dropped, 1);
        let keys: Vec<String> = j.due(0, 10).into_iter().map(|x| x.idempotency_key).collect();
        assert_eq!(keys, vec!["b", "c"]);
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff_ms(1), 200);
        assert_eq!(backoff_ms(2), 400);
        assert_eq!(backoff_ms(30), MAX_BACKOFF_MS);
    }
}
