//! Which settles are still to reach the rate-limit service, and when is each sent again?
//!
//! The outbox (its type is still called `Journal`, as the `journal_capacity`
//! setting is): charges and refunds waiting to reach the rate-limit service,
//! kept per VM and sent from the root context.
//!
//! Settles are sent from the root context's tick, never from the request's
//! own context, because a request context is gone by the time the answer to a
//! call made at the end of its stream arrives. Each entry carries an
//! idempotency key, so a retry after a lost answer is not charged twice. The
//! journal is bounded: when full, the oldest entry is dropped and counted.
//! An entry is sent for at most [`rls::IDEMPOTENCY_RETRY_HORIZON_MS`] after
//! its first attempt, then dropped and counted: the service remembers
//! idempotency keys for longer than that, so no retry can apply twice.

use std::borrow::Cow;
use std::collections::VecDeque;

use prost::Message;

use crate::ratelimit::settle;
pub use crate::ratelimit::settle::Settle;
use crate::rls;

/// What a journal call sends.
#[derive(Debug, Clone)]
pub enum Call {
    /// A charge or refund, kept typed until it is sent: settles of one
    /// tenant net without decoding anything.
    Settle(Settle),
    /// An encoded `RateLimitRequest`: a replayed reserve, sent again byte for
    /// byte.
    Encoded(Vec<u8>),
}

impl PartialEq for Call {
    fn eq(&self, other: &Call) -> bool {
        match (self, other) {
            (Call::Settle(a), Call::Settle(b)) => a == b,
            (Call::Encoded(a), Call::Encoded(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Call {}

/// One call waiting to be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// What is sent; encoded by [`Entry::encode`] just before sending.
    pub call: Call,
    pub idempotency_key: String,
    /// Sent with `x-tollgate-mode: settle` (applied unconditionally).
    pub settle_mode: bool,
    pub attempts: u32,
    pub next_attempt_ms: u64,
    /// When the entry was first due: its retries stop
    /// [`rls::IDEMPOTENCY_RETRY_HORIZON_MS`] later.
    pub first_ms: u64,
    /// For a replayed reserve: what to queue once its outcome is known.
    pub then: Option<Box<Resolution>>,
}

/// A reserve whose answer was lost (timeout, service down, client gone) is
/// sent again with the same idempotency key: the service either replays the
/// stored decision or decides it now, so its answer says whether the
/// reservation stands, and the follow-up fits that.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// Queued when the reservation stands (the service answered OK).
    pub if_applied: Option<Entry>,
    /// Queued when it was refused (OVER_LIMIT: nothing was charged).
    pub if_refused: Option<Entry>,
}

impl Entry {
    /// A first-attempt entry, due now.
    pub fn new(call: Call, idempotency_key: String, settle_mode: bool, now_ms: u64) -> Self {
        Entry { call, idempotency_key, settle_mode, attempts: 0, next_attempt_ms: now_ms, first_ms: now_ms, then: None }
    }

    /// A first-attempt settle, due now.
    pub fn settle(settle: Settle, idempotency_key: String, settle_mode: bool, now_ms: u64) -> Self {
        Entry::new(Call::Settle(settle), idempotency_key, settle_mode, now_ms)
    }

    /// The serialized `RateLimitRequest` to send; `None` for a settle that
    /// changes nothing (never queued).
    pub fn encode(&self) -> Option<Cow<'_, [u8]>> {
        match &self.call {
            Call::Encoded(m) => Some(Cow::Borrowed(m.as_slice())),
            Call::Settle(s) => s.request().map(|r| Cow::Owned(r.encode_to_vec())),
        }
    }
}

/// How the service answered a journal call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Applied (or, for a replayed reserve, the reservation stands).
    Applied,
    /// A replayed reserve the service refused: nothing is charged.
    Refused,
    /// No usable answer: send again later.
    Failed,
    /// The service calls the request invalid: it never will succeed; drop it.
    Rejected,
}

impl Answer {
    /// Classifies the service's answer to a journal call: `status` is the
    /// gRPC status, `body` the response message (`None`: it could not be
    /// read). INVALID_ARGUMENT will never succeed: it is dropped (counted)
    /// rather than retried until the journal overflows.
    pub fn of(status: u32, body: Option<&[u8]>) -> Answer {
        if status == 3 {
            return Answer::Rejected;
        }
        if status != 0 {
            return Answer::Failed;
        }
        match body.map(<rls::RateLimitResponse as prost::Message>::decode) {
            Some(Ok(r)) if r.overall_code == rls::Code::OverLimit as i32 => Answer::Refused,
            Some(Ok(_)) => Answer::Applied,
            _ => Answer::Failed,
        }
    }

    /// The counter a settle's answer increments.
    pub fn metric(self) -> &'static str {
        match self {
            Answer::Rejected => "tollgate.settle.rejected",
            Answer::Applied | Answer::Refused => "tollgate.settle.ok",
            Answer::Failed => "tollgate.settle.retried",
        }
    }
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

    /// The answer to call `token` arrived. Returns whether the token was one
    /// of the journal's.
    pub fn answered(&mut self, token: u32, answer: Answer, now_ms: u64) -> bool {
        let Some(pos) = self.in_flight.iter().position(|(t, _)| *t == token) else {
            return false;
        };
        let (_, entry) = self.in_flight.swap_remove(pos);
        let follow = match answer {
            Answer::Failed => {
                self.retry_later(entry, now_ms);
                None
            }
            Answer::Rejected => None,
            Answer::Applied => entry.then.and_then(|r| r.if_applied),
            Answer::Refused => entry.then.and_then(|r| r.if_refused),
        };
        if let Some(mut next) = follow {
            // a follow-up is a call of its own: its horizon starts now
            next.next_attempt_ms = now_ms;
            next.first_ms = now_ms;
            self.push(next);
        }
        true
    }

    /// Drops the queued entries whose first attempt is more than
    /// [`rls::IDEMPOTENCY_RETRY_HORIZON_MS`] before `now_ms` (counted in
    /// `dropped`): sent later, the service may have forgotten their
    /// idempotency key and apply them twice. Returns how many.
    pub fn expire(&mut self, now_ms: u64) -> u64 {
        let before = self.queue.len();
        self.queue.retain(|e| now_ms.saturating_sub(e.first_ms) <= rls::IDEMPOTENCY_RETRY_HORIZON_MS);
        let n = (before - self.queue.len()) as u64;
        self.dropped = self.dropped.saturating_add(n);
        n
    }

    /// Drops every queued entry (not those in flight), counted in
    /// `dropped`; returns how many.
    pub fn drop_queued(&mut self) -> u64 {
        let n = self.queue.len() as u64;
        self.queue.clear();
        self.dropped = self.dropped.saturating_add(n);
        n
    }

    pub fn pending(&self) -> usize {
        self.queue.len() + self.in_flight.len()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

/// Folds first-attempt settles of the same tenant into one call: the net of
/// their charges and refunds. One RLS call then settles a whole tick's worth
/// of a tenant's requests. Settles stay typed: netting them adds their
/// [`SettleNet`]s, nothing is decoded. Retried entries keep their own
/// identity (and idempotency key), so a retry is never applied twice; a
/// merged entry gets a key of its own (`<first key>+<count>`), unique because
/// each request's settle joins exactly one batch, and kept across its retries.
/// Only first-attempt settle-mode settles with no follow-up merge; a group
/// that nets to nothing is not sent.
pub fn merge(entries: Vec<Entry>) -> Vec<Entry> {
    struct Group {
        first_key: String,
        count: usize,
        settle: Settle,
        next_attempt_ms: u64,
        first_ms: u64,
    }
    let mut out = Vec::new();
    let mut groups: Vec<Group> = Vec::new();
    for e in entries {
        let Entry {
            call: Call::Settle(settle),
            idempotency_key,
            settle_mode: true,
            attempts: 0,
            next_attempt_ms,
            first_ms,
            then: None,
        } = e
        else {
            out.push(e);
            continue;
        };
        if settle.usage.is_some() {
            // Its rows were netted already; merged, they could outgrow the
            // metadata bounds.
            let mut e = Entry::settle(settle, idempotency_key, true, next_attempt_ms);
            e.first_ms = first_ms;
            out.push(e);
            continue;
        }
        match groups.iter_mut().find(|g| g.settle.same_account(&settle)) {
            Some(g) => {
                g.count += 1;
                g.settle.net.add(settle.net);
                g.first_ms = g.first_ms.min(first_ms);
            }
            None => groups.push(Group { first_key: idempotency_key, count: 1, settle, next_attempt_ms, first_ms }),
        }
    }
    for g in groups {
        let Some(tenant) = g.settle.tenant.get(&g.settle.plugin) else { continue };
        if !settle::settle_changes(&tenant.policy, g.settle.scope.as_deref(), g.settle.net) {
            continue;
        }
        let key = if g.count == 1 { g.first_key } else { format!("{}+{}", g.first_key, g.count) };
        let mut e = Entry::settle(g.settle, key, true, g.next_attempt_ms);
        e.first_ms = g.first_ms;
        out.push(e);
    }
    out
}

pub fn backoff_ms(attempts: u32) -> u64 {
    let shift = attempts.saturating_sub(1).min(16);
    BASE_BACKOFF_MS.saturating_mul(1u64 << shift).min(MAX_BACKOFF_MS)
}

impl Entry {
    /// The gRPC metadata of this entry's call: its idempotency key, and the
    /// settle mode when it is a settle.
    pub fn metadata(&self) -> Vec<(String, String)> {
        let mut m = vec![(rls::META_IDEMPOTENCY_KEY.to_string(), self.idempotency_key.clone())];
        if self.settle_mode {
            m.push((rls::META_MODE.to_string(), rls::MODE_SETTLE.to_string()));
        }
        if let Call::Settle(Settle { usage: Some(u), .. }) = &self.call {
            m.push((rls::ledger::META_USAGE.to_string(), u.clone()));
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Plugin;
    use crate::ratelimit::descriptors::Amounts;
    use crate::ratelimit::settle::SettleNet;
    use std::rc::Rc;

    fn e(key: &str) -> Entry {
        Entry::new(Call::Encoded(vec![1]), key.into(), true, 0)
    }

    #[test]
    fn failed_calls_back_off_and_retry() {
        let mut j = Journal::new(10);
        j.push(e("a"));
        let due = j.due(0, 10);
        assert_eq!(due.len(), 1);
        j.sent(7, due[0].clone());
        assert!(j.answered(7, Answer::Failed, 1000));
        assert!(j.due(1100, 10).is_empty());
        let again = j.due(1200, 10);
        assert_eq!(again[0].attempts, 1);
        j.sent(8, again[0].clone());
        assert!(j.answered(8, Answer::Applied, 1300));
        assert_eq!(j.pending(), 0);
        assert!(!j.answered(99, Answer::Applied, 0));
    }

    #[test]
    fn calls_are_not_sent_again_past_the_services_memory_of_their_keys() {
        const H: u64 = rls::IDEMPOTENCY_RETRY_HORIZON_MS;
        // the service keeps keys for longer than the filter may send them
        const { assert!(rls::DEFAULT_IDEMPOTENCY_TTL_MS >= H + 60_000) };
        let mut j = Journal::new(10);
        j.push(e("a"));
        let first = j.due(0, 10).remove(0);
        j.sent(1, first);
        // every retry fails, up to the horizon: still queued
        assert!(j.answered(1, Answer::Failed, H - 5_000));
        assert_eq!(j.expire(H), 0);
        let again = j.due(H, 10).remove(0);
        assert_eq!((again.first_ms, again.attempts), (0, 1));
        j.sent(2, again);
        // past it: dropped and counted, never sent
        assert!(j.answered(2, Answer::Failed, H + 1));
        assert_eq!(j.expire(H + 1), 1);
        assert_eq!((j.pending(), j.dropped), (0, 1));
        assert!(j.due(u64::MAX, 10).is_empty());
    }

    #[test]
    fn a_follow_up_has_its_own_horizon_and_a_merge_keeps_the_oldest() {
        const H: u64 = rls::IDEMPOTENCY_RETRY_HORIZON_MS;
        let mut replay = Entry::new(Call::Encoded(vec![9]), "a:r1".into(), false, 0);
        replay.then = Some(Box::new(Resolution { if_applied: Some(e("refund")), if_refused: None }));
        let mut j = Journal::new(10);
        j.push(replay);
        let first = j.due(0, 10).remove(0);
        j.sent(1, first);
        // answered just before the horizon: the refund is due from then on
        assert!(j.answered(1, Answer::Applied, H - 1));
        assert_eq!(j.expire(H + 1_000), 0);
        assert_eq!(j.due(H + 1_000, 10)[0].first_ms, H - 1);

        let p = plugin();
        let mut older = settle(&p, "r1", 0, (100, true), (0, false));
        older.first_ms = 5;
        let mut newer = settle(&p, "r2", 0, (100, true), (0, false));
        newer.first_ms = 9;
        let out = merge(vec![newer, older]);
        assert_eq!((out.len(), out[0].first_ms, out[0].idempotency_key.as_str()), (1, 5, "r2+2"));
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

    /// A plugin with tenants "a" and "b" (acme's policy: tokens and
    /// dollars per minute and month), and its domain.
    fn plugin() -> Rc<Plugin> {
        let mut p = crate::config::tests::sample();
        let mut policy = crate::config::Policy::clone(&p.tenant_by_id("acme").unwrap().policy);
        policy.limits.set(crate::ratelimit::descriptors::LimitKind::RequestsPerMinute, None);
        policy.limits.set(crate::ratelimit::descriptors::LimitKind::RequestsPerDay, None);
        policy.limits.set(crate::ratelimit::descriptors::LimitKind::TokensPerDay, None);
        policy.limits.set(crate::ratelimit::descriptors::LimitKind::UsdPerDay, None);
        policy.limits.set(crate::ratelimit::descriptors::LimitKind::TokensPerMinute, Some(10_000));
        policy.limits.set(crate::ratelimit::descriptors::LimitKind::TokensPerMonth, None);
        policy.limits.set(crate::ratelimit::descriptors::LimitKind::UsdPerMonth, Some(1_000_000));
        let mut a = p.tenants[0].clone();
        a.id = "a".into();
        a.policy = Rc::new(policy);
        let mut b = a.clone();
        b.id = "b".into();
        p.tenants = vec![a, b];
        Rc::new(p)
    }

    /// A settle of `tokens` and `micros` (value, refund?) for tenant index `t`.
    fn settle(p: &Rc<Plugin>, key: &str, t: usize, tokens: (u64, bool), micros: (u64, bool)) -> Entry {
        let signed = |(v, neg): (u64, bool)| if neg { -i128::from(v) } else { i128::from(v) };
        let net = SettleNet { requests: 0, tokens: signed(tokens), micros: signed(micros), ..SettleNet::default() };
        Entry::settle(Settle::new(p, &crate::config::TenantRef::Static(t), None, net).unwrap(), key.into(), true, 0)
    }

    fn request(e: &Entry) -> rls::RateLimitRequest {
        rls::RateLimitRequest::decode(&*e.encode().unwrap()).unwrap()
    }

    #[test]
    fn merge_nets_a_tenants_settles_into_one_call() {
        let p = plugin();
        let mut retried = settle(&p, "r0", 0, (1, false), (1, false));
        retried.attempts = 2;
        let out = merge(vec![
            settle(&p, "r1", 0, (100, true), (50, false)),
            settle(&p, "r2", 0, (30, false), (50, true)),
            settle(&p, "r3", 1, (7, false), (1, false)),
            retried.clone(),
        ]);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0], retried, "a retry keeps its identity");
        let a = out.iter().find(|e| e.idempotency_key == "r1+2").unwrap();
        let req = request(a);
        // tokens: -100 + 30 = -70; dollars: +50 - 50 = 0 (dropped).
        assert_eq!(req.descriptors.len(), 1);
        assert!(req.descriptors[0].is_negative_hits);
        assert_eq!(req.descriptors[0].hits_addend.as_ref().unwrap().value, 70);
        let b = out.iter().find(|e| e.idempotency_key == "r3").unwrap();
        assert_eq!(request(b).descriptors.len(), 2);
    }

    #[test]
    fn merge_leaves_apart_what_may_not_net() {
        let p = plugin();
        let mut check_mode = settle(&p, "c", 0, (5, false), (5, false));
        check_mode.settle_mode = false;
        let mut with_follow_up = settle(&p, "f", 0, (5, false), (5, false));
        with_follow_up.then = Some(Box::new(Resolution { if_applied: None, if_refused: None }));
        // Another configuration of the same tenant: its own call.
        let other = plugin();
        let out = merge(vec![
            check_mode.clone(),
            settle(&p, "s1", 0, (5, false), (5, false)),
            with_follow_up.clone(),
            settle(&other, "o1", 0, (1, false), (1, false)),
            // Nets to nothing with s1: nothing sent.
            settle(&p, "s2", 0, (5, true), (5, true)),
        ]);
        let keys: Vec<&str> = out.iter().map(|e| e.idempotency_key.as_str()).collect();
        assert_eq!(keys, vec!["c", "f", "o1"]);
        assert_eq!(out[0], check_mode);
        assert_eq!(out[1], with_follow_up);
    }

    #[test]
    fn a_typed_settle_encodes_to_the_bytes_build_settle_makes() {
        let p = plugin();
        let mut full = crate::config::tests::sample();
        full.tenants.truncate(1);
        let mut policy = crate::config::Policy::clone(&p.tenants[0].policy);
        policy.limits.set(crate::ratelimit::descriptors::LimitKind::RequestsPerMinute, Some(10));
        policy.limits.set(crate::ratelimit::descriptors::LimitKind::TokensPerMonth, Some(5_000_000_000));
        policy.billing_anchor_day = 15;
        policy.time_zone = Some("Europe/Berlin".into());
        full.tenants[0].policy = Rc::new(policy);
        let full = Rc::new(full);
        let rl = full.rate_limit.as_ref().unwrap();
        let tenant = &full.tenants[0];
        let a = |tokens, micros| Amounts { tokens, micros, ..Amounts::default() };
        for (reserved, actual, requests) in [
            (a(300, 4500), a(120, 5000), (1, 1)),
            (a(0, 0), a(30, 300), (0, 1)),
            (a(60, 600), a(0, 0), (6, 1)),
            (a(u64::MAX, 0), a(0, u64::MAX), (0, 0)),
        ] {
            let built = settle::build_settle(&rl.domain, &tenant.id, &tenant.policy, reserved, actual, requests)
                .unwrap()
                .encode_to_vec();
            let net = SettleNet::of_request(reserved, actual, requests);
            assert_eq!(
                settle::build_settle_net(&rl.domain, &tenant.id, &tenant.policy, None, net).unwrap().encode_to_vec(),
                built
            );
            let typed = Entry::settle(
                Settle::new(&full, &crate::config::TenantRef::Static(0), None, net).unwrap(),
                "k".into(),
                true,
                0,
            );
            assert_eq!(typed.encode().unwrap().as_ref(), built.as_slice());
            // A netted settle of one is the same call.
            assert_eq!(merge(vec![typed.clone()])[0].encode(), typed.encode());
        }
        // Nothing to change: no settle at all.
        assert!(Settle::new(
            &full,
            &crate::config::TenantRef::Static(0),
            None,
            SettleNet::of_request(a(5, 5), a(5, 5), (1, 1))
        )
        .is_none());
        assert!(Settle::new(
            &full,
            &crate::config::TenantRef::Static(9),
            None,
            SettleNet::of_request(a(0, 0), a(5, 5), (1, 1))
        )
        .is_none());
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff_ms(1), 200);
        assert_eq!(backoff_ms(2), 400);
        assert_eq!(backoff_ms(30), MAX_BACKOFF_MS);
    }

    #[test]
    fn a_replayed_reserve_queues_the_follow_up_that_fits_its_outcome() {
        let replay = |key: &str| {
            let mut r = Entry::new(Call::Encoded(vec![9]), key.into(), false, 0);
            r.then = Some(Box::new(Resolution { if_applied: Some(e("refund")), if_refused: Some(e("charge")) }));
            r
        };
        let mut j = Journal::new(10);
        j.push(replay("a:r1"));
        j.push(replay("b:r1"));
        let due = j.due(0, 10);
        assert!(merge(due.clone()).iter().all(|x| !x.settle_mode), "replays are never merged");
        let mut due = due.into_iter();
        j.sent(1, due.next().unwrap());
        j.sent(2, due.next().unwrap());
        // A lost answer: the replay itself is retried, follow-ups untouched.
        assert!(j.answered(1, Answer::Failed, 10));
        assert_eq!(j.pending(), 2);
        let again = j.due(10_000, 10);
        assert_eq!(again[0].idempotency_key, "a:r1");
        j.sent(3, again.into_iter().next().unwrap());
        assert!(j.answered(3, Answer::Applied, 20_000));
        assert!(j.answered(2, Answer::Refused, 20_000));
        let keys: Vec<String> = j.due(20_000, 10).into_iter().map(|x| x.idempotency_key).collect();
        assert_eq!(keys, vec!["refund".to_string(), "charge".to_string()]);
    }

    #[test]
    fn answers_are_classified_by_status_and_overall_code() {
        let over = rls::RateLimitResponse { overall_code: rls::Code::OverLimit as i32, ..Default::default() };
        let ok = rls::RateLimitResponse { overall_code: rls::Code::Ok as i32, ..Default::default() };
        assert_eq!(Answer::of(0, Some(&over.encode_to_vec())), Answer::Refused);
        assert_eq!(Answer::of(0, Some(&ok.encode_to_vec())), Answer::Applied);
        // An empty message is a default response: applied.
        assert_eq!(Answer::of(0, Some(&[])), Answer::Applied);
        assert_eq!(Answer::of(0, None), Answer::Failed);
        assert_eq!(Answer::of(0, Some(&[0xff, 0xff])), Answer::Failed);
        assert_eq!(Answer::of(3, Some(&ok.encode_to_vec())), Answer::Rejected);
        assert_eq!(Answer::of(14, None), Answer::Failed);
        assert_eq!(Answer::of(4, Some(&ok.encode_to_vec())), Answer::Failed);
        assert_eq!(Answer::Rejected.metric(), "tollgate.settle.rejected");
        assert_eq!(Answer::Refused.metric(), "tollgate.settle.ok");
        assert_eq!(Answer::Failed.metric(), "tollgate.settle.retried");
    }
}
