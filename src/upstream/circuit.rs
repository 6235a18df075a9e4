//! Is this provider target healthy enough to send a request to?
//!
//! One circuit breaker per target, shared by every worker of an Envoy: the
//! record lives in the host's shared data (the same table as the in-flight
//! slots) and every change is a compare-and-swap, so two workers cannot both
//! take the half-open probe, and a failure seen by one worker counts for all.
//!
//! States, from the record and the clock:
//! - **closed**: requests go; consecutive failures (5xx, timeouts) are
//!   counted, and at [`CircuitConfig::consecutive_failures`] the circuit opens
//!   for [`CircuitConfig::open_ms`];
//! - **open**: requests skip the target until `open_until`;
//! - **half-open**: once `open_until` has passed, exactly one request (the
//!   probe) may go; its success closes the circuit, its failure opens it again
//!   for twice as long (up to [`CircuitConfig::max_open_ms`]). A probe that
//!   never answers frees the turn after [`CircuitConfig::probe_timeout_ms`].
//!
//! A provider 429 says the provider throttled a *credential*, not that the
//! target is down. With tollgate each tenant usually holds its own provider
//! key, so by default a 429 pauses only that credential on that target (for
//! the provider's `retry-after`, bounded); tenants with other keys keep the
//! target. Where the provider's quota is shared by every key (one
//! organisation key, or an Azure deployment's quota), the target's
//! `rate_limited_scope: target` pauses the whole target instead. The paused
//! credentials are kept as 64-bit FNV-1a hashes, never the keys.
//!
//! A success only costs a host call when the record it was chosen under was
//! not clean (failures counted, open, or probing): the common case writes
//! nothing.

use crate::admission::inflight::{SlotStore, StoreError};

/// Compare-and-swap attempts before giving up on the shared record.
const CAS_ATTEMPTS: usize = 16;
/// Credentials paused at once per target; past this the soonest to end is
/// dropped.
pub const MAX_PAUSED: usize = 64;
/// The retry hint while another request holds the half-open probe.
pub const PROBE_WAIT_MS: u64 = 1_000;

const HEAD_LEN: usize = 4 + 8 + 8 + 8;
const PAUSE_LEN: usize = 16;

/// The circuit breaker's settings (`circuit_breaker` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitConfig {
    /// Consecutive failures (5xx, timeouts) that open the circuit.
    pub consecutive_failures: u32,
    /// How long the circuit first stays open.
    pub open_ms: u64,
    /// The longest an open period grows to (each failed probe doubles it).
    pub max_open_ms: u64,
    /// The longest a provider's `retry-after` is honoured for.
    pub max_retry_after_ms: u64,
    /// A probe that has not answered by then frees the turn.
    pub probe_timeout_ms: u64,
}

impl Default for CircuitConfig {
    fn default() -> Self {
        CircuitConfig {
            consecutive_failures: 5,
            open_ms: 10_000,
            max_open_ms: 300_000,
            max_retry_after_ms: 300_000,
            probe_timeout_ms: 120_000,
        }
    }
}

/// Whom a provider 429 pauses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RateLimitedScope {
    /// The credential that got it, on this target (tenants with their own
    /// keys keep the target).
    #[default]
    Credential,
    /// The whole target (a quota shared by every key).
    Target,
}

/// A circuit's state at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    /// The value of the `circuit_state` gauge.
    pub fn gauge(self) -> u64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        }
    }
}

/// One target's shared record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// Consecutive failures while closed.
    pub failures: u32,
    /// Open until this time (ms); 0: closed.
    pub open_until: u64,
    /// The length of the last open period (doubles after a failed probe).
    pub last_open_ms: u64,
    /// A half-open probe is in flight until this time (ms).
    pub probe_until: u64,
    /// Credentials a provider 429 paused: (FNV-1a hash, until ms).
    pub paused: Vec<(u64, u64)>,
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEAD_LEN + self.paused.len() * PAUSE_LEN);
        out.extend_from_slice(&self.failures.to_le_bytes());
        out.extend_from_slice(&self.open_until.to_le_bytes());
        out.extend_from_slice(&self.last_open_ms.to_le_bytes());
        out.extend_from_slice(&self.probe_until.to_le_bytes());
        for (hash, until) in &self.paused {
            out.extend_from_slice(&hash.to_le_bytes());
            out.extend_from_slice(&until.to_le_bytes());
        }
        out
    }

    /// A record from shared data; anything unreadable is a closed circuit
    /// (a corrupt record must not take a target out of service).
    pub fn decode(b: &[u8]) -> Record {
        let head = (|| {
            let failures = u32::from_le_bytes(b.get(..4)?.try_into().ok()?);
            Some((failures, u64_at(b, 4)?, u64_at(b, 12)?, u64_at(b, 20)?))
        })();
        let Some((failures, open_until, last_open_ms, probe_until)) = head else {
            return Record::default();
        };
        let paused = b
            .get(HEAD_LEN..)
            .unwrap_or_default()
            .chunks_exact(PAUSE_LEN)
            .filter_map(|c| Some((u64_at(c, 0)?, u64_at(c, 8)?)))
            .take(MAX_PAUSED)
            .collect();
        Record { failures, open_until, last_open_ms, probe_until, paused }
    }

    pub fn state(&self, now_ms: u64) -> State {
        if self.open_until == 0 {
            State::Closed
        } else if now_ms < self.open_until {
            State::Open
        } else {
            State::HalfOpen
        }
    }

    /// Nothing to report on a success: closed, no failures, no probe.
    pub fn is_clean(&self) -> bool {
        self.failures == 0 && self.open_until == 0 && self.probe_until == 0
    }

    /// Until when `credential` is paused on this target, if it is.
    pub fn paused_until(&self, credential: u64, now_ms: u64) -> Option<u64> {
        self.paused.iter().find(|(h, until)| *h == credential && *until > now_ms).map(|(_, until)| *until)
    }

    fn pause(&mut self, credential: u64, until: u64, now_ms: u64) {
        self.paused.retain(|(h, u)| *h != credential && *u > now_ms);
        if self.paused.len() >= MAX_PAUSED {
            // Keep the longest pauses: drop the one that ends first.
            if let Some(i) = self.paused.iter().enumerate().min_by_key(|(_, (_, u))| *u).map(|(i, _)| i) {
                self.paused.swap_remove(i);
            }
        }
        self.paused.push((credential, until));
    }

    fn open(&mut self, length_ms: u64, now_ms: u64) {
        self.failures = 0;
        self.last_open_ms = length_ms;
        self.open_until = now_ms.saturating_add(length_ms).max(1);
        self.probe_until = 0;
    }

    fn close(&mut self) {
        self.failures = 0;
        self.open_until = 0;
        self.last_open_ms = 0;
        self.probe_until = 0;
    }
}

/// A credential's hash in the record: FNV-1a, 64 bits. Deterministic in
/// every worker's VM; the key itself is never stored.
pub fn credential_hash(key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The shared-data key of a target's record.
pub fn key(target: &str) -> String {
    format!("tollgate.circuit.{target}")
}

/// What a request may do with a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Take {
    /// Send to it. `probe`: this request is the half-open probe. `clean`:
    /// the record had nothing to reset, so a success reports nothing.
    Go { probe: bool, clean: bool },
    /// Skip it until this time (ms): open, paused for this credential, or
    /// another request holds the probe.
    Skip { until: u64, state: State },
}

/// Asks whether a request with `credential` may go to the target whose
/// record is at `key`, taking the half-open probe when it is free. A store
/// that cannot be used lets the request go (the breaker fails towards
/// serving).
pub fn take(store: &dyn SlotStore, key: &str, credential: &str, now_ms: u64, cfg: &CircuitConfig) -> Take {
    for _ in 0..CAS_ATTEMPTS {
        let Ok((value, cas)) = store.get(key) else {
            return Take::Go { probe: false, clean: true };
        };
        let mut rec = value.as_deref().map(Record::decode).unwrap_or_default();
        if !rec.paused.is_empty() {
            if let Some(until) = rec.paused_until(credential_hash(credential), now_ms) {
                return Take::Skip { until, state: State::Closed };
            }
        }
        match rec.state(now_ms) {
            State::Closed => return Take::Go { probe: false, clean: rec.is_clean() },
            State::Open => return Take::Skip { until: rec.open_until, state: State::Open },
            State::HalfOpen if rec.probe_until > now_ms => {
                return Take::Skip { until: now_ms.saturating_add(PROBE_WAIT_MS), state: State::HalfOpen };
            }
            State::HalfOpen => {
                rec.probe_until = now_ms.saturating_add(cfg.probe_timeout_ms);
                match store.set(key, &rec.encode(), cas) {
                    Ok(()) => return Take::Go { probe: true, clean: false },
                    Err(StoreError::CasMismatch) => continue,
                    Err(StoreError::Unavailable) => return Take::Go { probe: false, clean: true },
                }
            }
        }
    }
    // Contended past every attempt: others are writing it right now; skip
    // it this once rather than guess.
    Take::Skip { until: now_ms.saturating_add(PROBE_WAIT_MS), state: State::HalfOpen }
}

/// What the target answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Any answer that shows the target works (2xx, 4xx other than 429).
    Success,
    /// A 5xx other than 504.
    Error,
    /// A 504: the provider or Envoy's route timeout gave up.
    Timeout,
    /// A provider 429, with its retry hint if it gave one.
    RateLimited { retry_after_ms: Option<u64> },
    /// No answer reached the filter (the client left first).
    Abandoned,
}

impl Outcome {
    /// The outcome of an upstream response status (and its retry hint).
    pub fn of_status(status: u16, retry_after_ms: Option<u64>) -> Outcome {
        match status {
            429 => Outcome::RateLimited { retry_after_ms },
            504 => Outcome::Timeout,
            500..=599 => Outcome::Error,
            _ => Outcome::Success,
        }
    }
}

/// A change of a circuit's state, for the gauge and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Opened for this long (ms), after failures or a failed probe.
    Opened {
        for_ms: u64,
        failures: u32,
    },
    /// Paused for this long by a provider 429 (whole target).
    Paused {
        for_ms: u64,
    },
    Closed,
}

/// The new record after `outcome`, and the transition it makes (if any).
pub fn apply(rec: &mut Record, a: &Answer<'_>, now_ms: u64, cfg: &CircuitConfig) -> Option<Transition> {
    let (outcome, credential, scope) = (a.outcome, a.credential, a.scope);
    let state = rec.state(now_ms);
    // Only the probe that still holds the turn speaks for the half-open
    // circuit: one whose turn expired (and went to another) is ignored.
    let holds_probe = a.probe && state != State::Closed && (a.probe_token == 0 || rec.probe_until == a.probe_token);
    match outcome {
        Outcome::Abandoned => {
            if holds_probe {
                rec.probe_until = 0;
            }
            None
        }
        Outcome::Success => {
            if holds_probe {
                rec.close();
                return Some(Transition::Closed);
            }
            if state == State::Closed {
                rec.failures = 0;
            }
            None
        }
        Outcome::Error | Outcome::Timeout => {
            if holds_probe {
                let length = rec.last_open_ms.saturating_mul(2).clamp(cfg.open_ms, cfg.max_open_ms.max(cfg.open_ms));
                rec.open(length, now_ms);
                return Some(Transition::Opened { for_ms: length, failures: 1 });
            }
            if state != State::Closed {
                // Admitted before the circuit opened: already counted.
                return None;
            }
            rec.failures = rec.failures.saturating_add(1);
            if rec.failures >= cfg.consecutive_failures.max(1) {
                let failures = rec.failures;
                rec.open(cfg.open_ms, now_ms);
                return Some(Transition::Opened { for_ms: cfg.open_ms, failures });
            }
            None
        }
        Outcome::RateLimited { retry_after_ms } => {
            let length = retry_after_ms.unwrap_or(cfg.open_ms).clamp(1, cfg.max_retry_after_ms.max(1));
            match scope {
                RateLimitedScope::Credential => {
                    rec.pause(credential_hash(credential), now_ms.saturating_add(length), now_ms);
                    // The target answered: a probe has shown it is up.
                    if holds_probe {
                        rec.close();
                        return Some(Transition::Closed);
                    }
                    None
                }
                RateLimitedScope::Target => {
                    let until = now_ms.saturating_add(length);
                    if until <= rec.open_until && !holds_probe {
                        return None;
                    }
                    rec.failures = 0;
                    rec.probe_until = 0;
                    rec.open_until = until.max(1);
                    // A pause is the provider's word, not a failure: the next
                    // open period after a failed probe starts from the base.
                    rec.last_open_ms = rec.last_open_ms.min(cfg.open_ms);
                    Some(Transition::Paused { for_ms: length })
                }
            }
        }
    }
}

/// What one request saw of a target, for [`report`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer<'a> {
    pub outcome: Outcome,
    /// The request held the half-open probe.
    pub probe: bool,
    /// The probe's turn as [`take`] wrote it (`probe_until`: the take's time
    /// plus the probe timeout); 0 when unknown.
    pub probe_token: u64,
    /// [`take`] found the record clean: a success writes nothing.
    pub clean: bool,
    /// The key the request carried (a 429 pauses its hash).
    pub credential: &'a str,
    pub scope: RateLimitedScope,
}

/// Reports what a target answered to its shared record.
pub fn report(
    store: &dyn SlotStore,
    key: &str,
    a: &Answer<'_>,
    now_ms: u64,
    cfg: &CircuitConfig,
) -> Result<Option<Transition>, StoreError> {
    if a.outcome == Outcome::Success && a.clean && !a.probe {
        return Ok(None);
    }
    if a.outcome == Outcome::Abandoned && !a.probe {
        return Ok(None);
    }
    for _ in 0..CAS_ATTEMPTS {
        let (value, cas) = store.get(key)?;
        let mut rec = value.as_deref().map(Record::decode).unwrap_or_default();
        let before = rec.clone();
        let transition = apply(&mut rec, a, now_ms, cfg);
        if rec == before {
            return Ok(transition);
        }
        match store.set(key, &rec.encode(), cas) {
            Ok(()) => return Ok(transition),
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::CasMismatch)
}

/// A provider's retry hint, in ms: `retry-after-ms` (OpenAI) first, then
/// `retry-after` in seconds. An HTTP date or anything unreadable is no hint.
pub fn retry_after_ms(retry_after_ms: Option<&str>, retry_after: Option<&str>) -> Option<u64> {
    if let Some(ms) = retry_after_ms.and_then(|v| v.trim().parse::<f64>().ok()) {
        if ms.is_finite() && ms >= 0.0 {
            return Some((ms.ceil() as u64).min(u64::from(u32::MAX)));
        }
    }
    let s = retry_after?.trim().parse::<f64>().ok()?;
    (s.is_finite() && s >= 0.0).then(|| ((s * 1000.0).ceil() as u64).min(u64::from(u32::MAX)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::inflight::LocalStore;

    const K: &str = "tollgate.circuit.a";

    fn cfg() -> CircuitConfig {
        CircuitConfig { consecutive_failures: 3, open_ms: 1_000, max_open_ms: 8_000, ..CircuitConfig::default() }
    }

    fn answer(outcome: Outcome, probe: bool, clean: bool, scope: RateLimitedScope) -> Answer<'static> {
        Answer { outcome, probe, clean, credential: "sk-a", scope, probe_token: 0 }
    }

    fn rep(store: &LocalStore, outcome: Outcome, probe: bool, now: u64) -> Option<Transition> {
        report(store, K, &answer(outcome, probe, false, RateLimitedScope::Credential), now, &cfg()).unwrap()
    }

    fn go(probe: bool) -> Take {
        Take::Go { probe, clean: false }
    }

    #[test]
    fn records_survive_encoding_and_garbage_is_a_closed_circuit() {
        let r = Record { failures: 2, open_until: 9, last_open_ms: 4, probe_until: 7, paused: vec![(1, 2), (3, 4)] };
        assert_eq!(Record::decode(&r.encode()), r);
        assert_eq!(Record::decode(b"short"), Record::default());
        assert_eq!(Record::decode(&[]).state(5), State::Closed);
        // A trailing partial entry is ignored, not misread.
        let mut b = r.encode();
        b.extend_from_slice(&[1, 2, 3]);
        assert_eq!(Record::decode(&b), r);
    }

    #[test]
    fn consecutive_failures_open_the_circuit_and_a_success_in_between_resets_the_count() {
        let s = LocalStore::default();
        let c = cfg();
        assert_eq!(take(&s, K, "sk-a", 0, &c), Take::Go { probe: false, clean: true });
        assert_eq!(rep(&s, Outcome::Error, false, 0), None);
        assert_eq!(rep(&s, Outcome::Timeout, false, 0), None);
        assert_eq!(take(&s, K, "sk-a", 0, &c), go(false), "two failures: still closed, not clean");
        assert_eq!(rep(&s, Outcome::Success, false, 0), None);
        assert_eq!(rep(&s, Outcome::Error, false, 0), None);
        assert_eq!(rep(&s, Outcome::Error, false, 0), None);
        assert_eq!(rep(&s, Outcome::Error, false, 10), Some(Transition::Opened { for_ms: 1_000, failures: 3 }));
        assert_eq!(take(&s, K, "sk-a", 500, &c), Take::Skip { until: 1_010, state: State::Open });
        // Failures of requests admitted before it opened change nothing.
        assert_eq!(rep(&s, Outcome::Error, false, 600), None);
        assert_eq!(take(&s, K, "sk-b", 1_009, &c), Take::Skip { until: 1_010, state: State::Open });
    }

    #[test]
    fn one_probe_at_a_time_closes_on_success_and_doubles_the_wait_on_failure() {
        let s = LocalStore::default();
        let c = cfg();
        for _ in 0..3 {
            rep(&s, Outcome::Error, false, 0);
        }
        // Half-open at 1000: one probe; the others wait for it.
        assert_eq!(take(&s, K, "sk-a", 1_000, &c), go(true));
        assert_eq!(take(&s, K, "sk-b", 1_001, &c), Take::Skip { until: 2_001, state: State::HalfOpen });
        // The probe fails: open for 2 s, then 4, then 8 (the cap), then 8.
        assert_eq!(rep(&s, Outcome::Error, true, 1_100), Some(Transition::Opened { for_ms: 2_000, failures: 1 }));
        assert_eq!(take(&s, K, "sk-a", 3_099, &c), Take::Skip { until: 3_100, state: State::Open });
        let mut now = 3_100;
        for want in [4_000, 8_000, 8_000] {
            assert_eq!(take(&s, K, "sk-a", now, &c), go(true));
            assert_eq!(rep(&s, Outcome::Timeout, true, now), Some(Transition::Opened { for_ms: want, failures: 1 }));
            now += want;
        }
        // A success of the probe closes it; the next failure starts over.
        assert_eq!(take(&s, K, "sk-a", now, &c), go(true));
        assert_eq!(rep(&s, Outcome::Success, true, now), Some(Transition::Closed));
        assert_eq!(take(&s, K, "sk-a", now, &c), Take::Go { probe: false, clean: true });
        for _ in 0..3 {
            rep(&s, Outcome::Error, false, now);
        }
        assert_eq!(take(&s, K, "sk-a", now + 999, &c), Take::Skip { until: now + 1_000, state: State::Open });
    }

    #[test]
    fn a_probe_whose_turn_expired_is_not_heard() {
        let s = LocalStore::default();
        let c = CircuitConfig { probe_timeout_ms: 5_000, ..cfg() };
        for _ in 0..3 {
            rep(&s, Outcome::Error, false, 0);
        }
        // Probe A at 1000 (its turn: until 6000); its turn expires and
        // probe B takes it at 6000 (until 11000).
        assert_eq!(take(&s, K, "sk-a", 1_000, &c), go(true));
        assert_eq!(take(&s, K, "sk-a", 6_000, &c), go(true));
        let late_a =
            Answer { probe_token: 6_000, ..answer(Outcome::Success, true, false, RateLimitedScope::Credential) };
        assert_eq!(report(&s, K, &late_a, 7_000, &c), Ok(None), "A's late success closes nothing");
        assert!(matches!(take(&s, K, "sk-a", 7_001, &c), Take::Skip { state: State::HalfOpen, .. }));
        let b = Answer { probe_token: 11_000, ..late_a };
        assert_eq!(report(&s, K, &b, 7_002, &c), Ok(Some(Transition::Closed)));
    }

    #[test]
    fn a_probe_that_never_answers_frees_the_turn() {
        let s = LocalStore::default();
        let c = CircuitConfig { probe_timeout_ms: 5_000, ..cfg() };
        for _ in 0..3 {
            rep(&s, Outcome::Error, false, 0);
        }
        assert_eq!(take(&s, K, "sk-a", 1_000, &c), go(true));
        assert!(matches!(take(&s, K, "sk-a", 5_999, &c), Take::Skip { .. }));
        assert_eq!(take(&s, K, "sk-a", 6_000, &c), go(true));
        // A probe whose client left gives the turn back at once.
        assert_eq!(rep(&s, Outcome::Abandoned, true, 6_001), None);
        assert_eq!(take(&s, K, "sk-a", 6_002, &c), go(true));
    }

    #[test]
    fn a_provider_429_pauses_the_credential_for_its_retry_after_and_others_keep_the_target() {
        let s = LocalStore::default();
        let c = cfg();
        let t = rep(&s, Outcome::RateLimited { retry_after_ms: Some(2_000) }, false, 100);
        assert_eq!(t, None);
        assert_eq!(take(&s, K, "sk-a", 2_099, &c), Take::Skip { until: 2_100, state: State::Closed });
        assert_eq!(take(&s, K, "sk-b", 2_099, &c), Take::Go { probe: false, clean: true });
        assert_eq!(take(&s, K, "sk-a", 2_100, &c), Take::Go { probe: false, clean: true });
        // Without a hint: the base open period; a huge hint is bounded.
        rep(&s, Outcome::RateLimited { retry_after_ms: None }, false, 3_000);
        assert_eq!(take(&s, K, "sk-a", 3_999, &c), Take::Skip { until: 4_000, state: State::Closed });
        rep(&s, Outcome::RateLimited { retry_after_ms: Some(u64::MAX) }, false, 5_000);
        assert_eq!(take(&s, K, "sk-a", 5_000, &c), Take::Skip { until: 305_000, state: State::Closed });
        // 429s are not failures: they never open the circuit.
        for i in 0..10 {
            rep(&s, Outcome::RateLimited { retry_after_ms: Some(1) }, false, 400_000 + i);
        }
        assert_eq!(take(&s, K, "sk-z", 400_100, &c), Take::Go { probe: false, clean: true });
    }

    #[test]
    fn a_target_scoped_429_pauses_everyone_for_its_retry_after() {
        let s = LocalStore::default();
        let c = cfg();
        let a = answer(Outcome::RateLimited { retry_after_ms: Some(3_000) }, false, true, RateLimitedScope::Target);
        let t = report(&s, K, &a, 0, &c);
        assert_eq!(t, Ok(Some(Transition::Paused { for_ms: 3_000 })));
        assert_eq!(take(&s, K, "sk-b", 2_999, &c), Take::Skip { until: 3_000, state: State::Open });
        assert_eq!(take(&s, K, "sk-b", 3_000, &c), go(true));
    }

    #[test]
    fn paused_credentials_are_bounded_and_stored_as_hashes() {
        let mut r = Record::default();
        for i in 0..(MAX_PAUSED as u64 + 10) {
            r.pause(i, 1_000 + i, 0);
        }
        assert_eq!(r.paused.len(), MAX_PAUSED);
        // The ones that end first went.
        assert!(r.paused.iter().all(|(_, u)| *u >= 1_010));
        let secret = "sk-live-very-secret";
        let mut s = Record::default();
        s.pause(credential_hash(secret), 5, 0);
        let bytes = s.encode();
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()));
        assert_ne!(credential_hash("a"), credential_hash("b"));
    }

    #[test]
    fn a_clean_success_costs_no_store_call() {
        struct Refuse;
        impl SlotStore for Refuse {
            fn get(&self, _: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
                panic!("no call expected")
            }
            fn set(&self, _: &str, _: &[u8], _: Option<u32>) -> Result<(), StoreError> {
                panic!("no call expected")
            }
        }
        let c = cfg();
        let r = report(&Refuse, K, &answer(Outcome::Success, false, true, RateLimitedScope::Credential), 0, &c);
        assert_eq!(r, Ok(None));
        let r = report(&Refuse, K, &answer(Outcome::Abandoned, false, false, RateLimitedScope::Credential), 0, &c);
        assert_eq!(r, Ok(None));
    }

    #[test]
    fn an_unusable_store_lets_requests_go() {
        struct Down;
        impl SlotStore for Down {
            fn get(&self, _: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
                Err(StoreError::Unavailable)
            }
            fn set(&self, _: &str, _: &[u8], _: Option<u32>) -> Result<(), StoreError> {
                Err(StoreError::Unavailable)
            }
        }
        assert_eq!(take(&Down, K, "k", 0, &cfg()), Take::Go { probe: false, clean: true });
    }

    #[test]
    fn statuses_and_retry_hints() {
        assert_eq!(Outcome::of_status(200, None), Outcome::Success);
        assert_eq!(Outcome::of_status(400, None), Outcome::Success);
        assert_eq!(Outcome::of_status(503, None), Outcome::Error);
        assert_eq!(Outcome::of_status(504, None), Outcome::Timeout);
        assert_eq!(Outcome::of_status(429, Some(5)), Outcome::RateLimited { retry_after_ms: Some(5) });
        assert_eq!(retry_after_ms(Some("1500"), Some("9")), Some(1_500));
        assert_eq!(retry_after_ms(None, Some("2")), Some(2_000));
        assert_eq!(retry_after_ms(None, Some("0.5")), Some(500));
        assert_eq!(retry_after_ms(Some("x"), Some("3")), Some(3_000));
        assert_eq!(retry_after_ms(None, Some("Wed, 21 Oct 2026 07:28:00 GMT")), None);
        assert_eq!(retry_after_ms(None, Some("-1")), None);
        assert_eq!(retry_after_ms(None, Some("1e300")), Some(u64::from(u32::MAX)));
        assert_eq!(retry_after_ms(None, None), None);
    }
}
