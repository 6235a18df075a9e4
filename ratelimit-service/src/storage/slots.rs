//! A batch whose counters live in several Redis Cluster hash slots.
//!
//! One Lua script may only touch one slot. A request that carries several
//! limit levels (a tenant's counters, tagged `{<domain>|<tenant>}`, and a shared
//! provider pool's, tagged `{<domain>|<pool>}`) is therefore run as one script
//! per hash tag ("group"), one after the other:
//!
//! - groups are ordered by first appearance, so the first counter's group (the
//!   tenant's) goes first; inside a group the request order is kept;
//! - **settle**: every group is applied (settles are never refused);
//! - **reserve**: each group is decided all-or-nothing by its script; when a
//!   group refuses, the groups before it (which were charged) get their charges
//!   back with a settle-mode *undo* call ([`undo`]), the groups after it are only
//!   read ([`check`]), and the answer is OVER_LIMIT;
//! - **idempotency**: each group has its own key in its own slot, derived from
//!   the request's key ([`split`]), and an undo has `<group key>:u`, so a
//!   retried request replays every group that already ran and undoes a
//!   group at most once.
//!
//! What this costs in exactness (between a group's charge and its undo, other
//! requests see that quota as used: a transient under-admission) is written
//! down in the service README, "Levels across Redis Cluster slots".

use std::future::Future;

use rls_contract::Mode;

use super::{AlertHit, Algorithm, Batch, Counter, CounterState, Idempotency, Outcome, StorageError};

/// The counters of one hash tag.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// The `{...}` hash tag every key of the group carries.
    pub tag: String,
    /// Where the group's counters sit in the whole batch, in request order.
    pub indices: Vec<usize>,
    /// The group as a batch of its own: same clock and mode, its own
    /// idempotency key (in its slot).
    pub batch: Batch,
}

/// Whether the counters of `batch` carry more than one hash tag.
pub fn spans_slots(batch: &Batch) -> bool {
    match batch.counters.split_first() {
        Some((first, rest)) => rest.iter().any(|c| c.hash_tag != first.hash_tag),
        None => false,
    }
}

/// The Redis idempotency key of a group: the plan's key for the first group
/// (so a batch within one slot keeps the key it always had), else the same
/// request key and mode in the group's slot.
fn group_idempotency(batch: &Batch, tag: &str, first: bool) -> Option<Idempotency> {
    let i = batch.idempotency.as_ref()?;
    if first {
        return Some(i.clone());
    }
    let mode = if batch.settle { Mode::Settle } else { Mode::Reserve };
    Some(Idempotency::new(tag, mode, &i.request_key, i.ttl_ms))
}

/// Split `batch` by hash tag: groups in order of first appearance (the first
/// counter's group first), counters in request order within a group.
pub fn split(batch: &Batch) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for (i, c) in batch.counters.iter().enumerate() {
        match groups.iter_mut().find(|g| g.tag == c.hash_tag) {
            Some(g) => {
                g.indices.push(i);
                g.batch.counters.push(c.clone());
            }
            None => {
                let first = groups.is_empty();
                let idempotency = group_idempotency(batch, &c.hash_tag, first);
                // The ledger (usage rows, quota index, alerts) is the tenant's:
                // it rides with the first group only.
                let ledger = if first { batch.ledger.clone() } else { None };
                groups.push(Group {
                    tag: c.hash_tag.clone(),
                    indices: vec![i],
                    batch: Batch { counters: vec![c.clone()], idempotency, ledger, ..batch.clone() },
                });
            }
        }
    }
    // The first group's counter notes, in its own counter order.
    if let Some(g) = groups.first_mut() {
        let notes = batch.ledger.as_ref().map(|l| &l.notes);
        if let (Some(l), Some(all)) = (g.batch.ledger.as_mut(), notes) {
            l.notes = g.indices.iter().filter_map(|&i| all.get(i).cloned()).collect();
        }
    }
    groups
}

/// The call that gives back what a charged reserve group took: a settle with
/// every charge turned into a refund (and a refund into a charge), pure checks
/// left as they are, at the group's own clock reading (so calendar counters hit
/// the same window key), keyed `<group key>:u` so a retry undoes it once.
pub fn undo(group: &Batch) -> Batch {
    Batch {
        settle: true,
        counters: group.counters.iter().map(|c| Counter { refund: !c.refund && c.hits > 0, ..c.clone() }).collect(),
        idempotency: group.idempotency.as_ref().map(Idempotency::undo),
        // An undo writes no usage, index entry or alert.
        ledger: None,
        ..group.clone()
    }
}

/// A read of a group's counters that charges nothing (every hit 0, no key).
pub fn check(group: &Batch) -> Batch {
    Batch {
        settle: false,
        counters: group.counters.iter().map(|c| Counter { hits: 0, refund: false, ..c.clone() }).collect(),
        idempotency: None,
        ledger: None,
        ..group.clone()
    }
}

/// Whether `c`'s hits would fit on a counter at `used` (the script's rule:
/// over = used + cost > capacity; a refund always fits).
pub fn would_fit(c: &Counter, used: u64) -> bool {
    if c.refund {
        return true;
    }
    let (cost, cap) = match c.algorithm {
        Algorithm::Gcra { period_ms } => {
            (u128::from(c.hits) * u128::from(period_ms), u128::from(c.limit) * u128::from(period_ms))
        }
        Algorithm::Calendar { .. } => (u128::from(c.hits), u128::from(c.limit)),
    };
    u128::from(used) + cost <= cap
}

/// Put a group's states at their places in the whole batch; `fits` may
/// rewrite each state's `fits` from its counter.
fn place(
    states: &mut [Option<CounterState>],
    group: &Group,
    outcome: &Outcome,
    fits: impl Fn(&Counter, &CounterState) -> bool,
) -> Result<(), StorageError> {
    if outcome.counters.len() != group.indices.len() {
        return Err(StorageError::Reply(format!(
            "expected {} counter states for {}, got {}",
            group.indices.len(),
            group.tag,
            outcome.counters.len()
        )));
    }
    for ((&i, c), s) in group.indices.iter().zip(&group.batch.counters).zip(&outcome.counters) {
        if let Some(slot) = states.get_mut(i) {
            *slot = Some(CounterState { fits: fits(c, s), used: s.used });
        }
    }
    Ok(())
}

fn collect(states: Vec<Option<CounterState>>) -> Result<Vec<CounterState>, StorageError> {
    states.into_iter().map(|s| s.ok_or_else(|| StorageError::Reply("a counter was left undecided".into()))).collect()
}

/// Apply a batch spanning several hash tags, one `run` (one script call on
/// one slot) per group, as described in the module comment.
///
/// On a storage error the error is returned (the caller answers UNAVAILABLE)
/// and the groups already charged stay charged when the request has an
/// idempotency key: its retry replays them and then either charges the rest or
/// undoes them (once). Without a key no retry can find them, so they are
/// given back at once, as far as the storage still answers.
pub async fn apply_groups<F, Fut>(batch: &Batch, run: F) -> Result<Outcome, StorageError>
where
    F: Fn(Batch) -> Fut,
    Fut: Future<Output = Result<Outcome, StorageError>>,
{
    let groups = split(batch);
    let mut states: Vec<Option<CounterState>> = vec![None; batch.counters.len()];
    let mut alerts = Vec::new();
    // A group's alert names its counter within the group: renumber it.
    let mut take_alerts = |g: &Group, o: &Outcome| {
        for a in &o.alerts {
            if let Some(&i) = g.indices.get(a.counter) {
                alerts.push(AlertHit { counter: i, ..*a });
            }
        }
    };
    // A replay only when every group that ran replayed: then nothing was charged now.
    let mut replay = true;

    if batch.settle {
        for g in &groups {
            let o = run(g.batch.clone()).await?;
            replay &= o.replay;
            take_alerts(g, &o);
            place(&mut states, g, &o, |_, s| s.fits)?;
        }
        return Ok(Outcome { allowed: true, replay, counters: collect(states)?, alerts });
    }

    let mut refused = None;
    for (gi, g) in groups.iter().enumerate() {
        let o = match run(g.batch.clone()).await {
            Ok(o) => o,
            Err(e) => {
                if batch.idempotency.is_none() {
                    for earlier in groups.iter().take(gi) {
                        // Best effort: the error answered is the first one.
                        if let Err(undo_error) = run(undo(&earlier.batch)).await {
                            tracing::warn!(error = %undo_error, tag = %earlier.tag, "could not give back a group's charge");
                        }
                    }
                }
                return Err(e);
            }
        };
        replay &= o.replay;
        take_alerts(g, &o);
        place(&mut states, g, &o, |_, s| s.fits)?;
        if !o.allowed {
            refused = Some(gi);
            break;
        }
    }
    let Some(refused) = refused else {
        return Ok(Outcome { allowed: true, replay, counters: collect(states)?, alerts });
    };

    // The groups before the refusing one fitted and were charged: give it back.
    // Their states are as they are after the undo; they did not refuse.
    for g in groups.iter().take(refused) {
        let o = run(undo(&g.batch)).await?;
        place(&mut states, g, &o, |_, _| true)?;
    }
    // The groups after it were never decided: their current state, and
    // whether the request's hits would have fitted there.
    for g in groups.iter().skip(refused + 1) {
        let o = run(check(&g.batch)).await?;
        place(&mut states, g, &o, |c, s| would_fit(c, s.used))?;
    }
    // Alerts a refused reserve's charged groups crossed stand: they were
    // reached (then given back), as a reserve that refuses later would.
    Ok(Outcome { allowed: false, replay, counters: collect(states)?, alerts })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;
    use crate::keys;

    const TENANT: &str = "{tollgate|acme}";
    const POOL: &str = "{tollgate|gpt-pool}";
    const OTHER_POOL: &str = "{tollgate|eu-pool}";

    fn counter(tag: &str, name: &str, limit: u64, hits: u64) -> Counter {
        Counter {
            key: format!("tg:{tag}:D:0:{name}"),
            hash_tag: tag.into(),
            algorithm: Algorithm::Calendar { start_ms: 0, end_ms: 86_400_000 },
            limit,
            hits,
            refund: false,
        }
    }

    fn batch(counters: Vec<Counter>, key: Option<&str>, settle: bool) -> Batch {
        let mode = if settle { Mode::Settle } else { Mode::Reserve };
        let idempotency = match (key, counters.first()) {
            (Some(k), Some(first)) => Some(Idempotency::new(&first.hash_tag, mode, k, 1000)),
            _ => None,
        };
        Batch { now_ms: 1, settle, counters, idempotency, ledger: None }
    }

    /// An in-memory stand-in for one DECIDE call per group (calendar counters
    /// only), with the script's semantics, which counts calls and can fail one.
    #[derive(Default)]
    struct Fake {
        values: Mutex<HashMap<String, u64>>,
        idem: Mutex<HashMap<String, bool>>,
        calls: Mutex<Vec<Batch>>,
        fail_call: Mutex<Option<usize>>,
    }

    impl Fake {
        fn get(&self, key: &str) -> u64 {
            self.values.lock().unwrap().get(key).copied().unwrap_or(0)
        }

        fn set(&self, key: &str, v: u64) {
            self.values.lock().unwrap().insert(key.into(), v);
        }

        fn run(&self, b: Batch) -> Result<Outcome, StorageError> {
            let call = {
                let mut calls = self.calls.lock().unwrap();
                calls.push(b.clone());
                calls.len()
            };
            if *self.fail_call.lock().unwrap() == Some(call) {
                return Err(StorageError::Timeout(1));
            }
            let stored = b.idempotency.as_ref().and_then(|i| self.idem.lock().unwrap().get(&i.key).copied());
            let mut values = self.values.lock().unwrap();
            let mut cur: HashMap<String, u64> = HashMap::new();
            let (mut before, mut after, mut fits) = (vec![], vec![], vec![]);
            for c in &b.counters {
                let v = cur.get(&c.key).copied().unwrap_or_else(|| values.get(&c.key).copied().unwrap_or(0));
                let hits = if stored.is_some() { 0 } else { c.hits };
                let nv = if c.refund { v.saturating_sub(hits) } else { v + hits };
                fits.push(c.refund || nv <= c.limit);
                before.push(v);
                after.push(nv);
                cur.insert(c.key.clone(), nv);
            }
            let allowed = match stored {
                Some(a) => a,
                None => b.settle || fits.iter().all(|f| *f),
            };
            if stored.is_none() && allowed {
                values.extend(cur);
            }
            if let (None, Some(i)) = (stored, &b.idempotency) {
                self.idem.lock().unwrap().insert(i.key.clone(), allowed);
            }
            let used = if allowed && stored.is_none() { after } else { before };
            Ok(Outcome {
                allowed,
                replay: stored.is_some(),
                counters: fits.into_iter().zip(used).map(|(fits, used)| CounterState { fits, used }).collect(),
                alerts: vec![],
            })
        }

        async fn apply(&self, b: &Batch) -> Result<Outcome, StorageError> {
            apply_groups(b, |g| std::future::ready(self.run(g))).await
        }

        fn calls(&self) -> Vec<Batch> {
            self.calls.lock().unwrap().clone()
        }
    }

    #[test]
    fn groups_follow_first_appearance_and_keep_request_order() {
        let b = batch(
            vec![
                counter(TENANT, "rpm", 10, 1),
                counter(POOL, "tpm", 10, 1),
                counter(TENANT, "tpd", 10, 1),
                counter(OTHER_POOL, "tpm", 10, 1),
                counter(POOL, "tier", 10, 1),
            ],
            Some("req-1"),
            false,
        );
        assert!(spans_slots(&b));
        let groups = split(&b);
        let shape: Vec<_> = groups.iter().map(|g| (g.tag.as_str(), g.indices.clone())).collect();
        assert_eq!(shape, vec![(TENANT, vec![0, 2]), (POOL, vec![1, 4]), (OTHER_POOL, vec![3])]);
        let names: Vec<_> = groups[1].batch.counters.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(names, ["tg:{tollgate|gpt-pool}:D:0:tpm", "tg:{tollgate|gpt-pool}:D:0:tier"]);
        // each group's key lives in its own slot; the first keeps the plan's key
        let idem: Vec<_> = groups.iter().map(|g| g.batch.idempotency.clone().unwrap()).collect();
        let short: Vec<_> = idem.iter().map(|i| i.key.clone()).collect();
        assert_eq!(short, [TENANT, POOL, OTHER_POOL].map(|t| keys::idempotency_key(t, Mode::Reserve, "req-1")));
        let legacy: Vec<_> = idem.iter().map(|i| i.legacy_key.as_str()).collect();
        assert_eq!(
            legacy,
            [
                "tg:{tollgate|acme}:idem:reserve:req-1",
                "tg:{tollgate|gpt-pool}:idem:reserve:req-1",
                "tg:{tollgate|eu-pool}:idem:reserve:req-1"
            ]
        );
        assert!(groups.iter().all(|g| g.batch.now_ms == 1 && !g.batch.settle));

        let one = batch(vec![counter(TENANT, "a", 1, 1), counter(TENANT, "b", 1, 1)], None, false);
        assert!(!spans_slots(&one));
        assert_eq!(split(&one).len(), 1);
        assert!(!spans_slots(&batch(vec![], None, false)));
    }

    #[test]
    fn settle_keys_carry_the_mode() {
        let b = batch(vec![counter(TENANT, "a", 1, 1), counter(POOL, "b", 1, 1)], Some("r:1"), true);
        let groups = split(&b);
        let i = groups[1].batch.idempotency.as_ref().unwrap();
        assert_eq!(i.key, keys::idempotency_key(POOL, Mode::Settle, "r:1"));
        assert_eq!(i.legacy_key, "tg:{tollgate|gpt-pool}:idem:settle:r%3A1");
    }

    #[test]
    fn undo_turns_charges_into_refunds_and_keeps_checks() {
        let mut refund = counter(TENANT, "r", 10, 4);
        refund.refund = true;
        let g = batch(vec![counter(TENANT, "a", 10, 3), counter(TENANT, "c", 10, 0), refund], Some("k"), false);
        let u = undo(&g);
        assert!(u.settle);
        assert_eq!(u.now_ms, g.now_ms);
        let hits: Vec<_> = u.counters.iter().map(|c| (c.hits, c.refund)).collect();
        assert_eq!(hits, [(3, true), (0, false), (4, false)]);
        let i = u.idempotency.unwrap();
        assert_eq!(i.key, format!("{}:u", keys::idempotency_key(TENANT, Mode::Reserve, "k")));
        assert_eq!(i.legacy_key, "tg:{tollgate|acme}:idem:reserve:k:undo");
        assert_eq!(undo(&batch(vec![counter(TENANT, "a", 1, 1)], None, false)).idempotency, None);

        let c = check(&g);
        assert!(!c.settle && c.idempotency.is_none());
        assert!(c.counters.iter().all(|c| c.hits == 0 && !c.refund));
    }

    #[test]
    fn would_fit_is_the_scripts_rule() {
        let c = counter(POOL, "a", 10, 3);
        assert!(would_fit(&c, 7));
        assert!(!would_fit(&c, 8));
        let g = Counter { algorithm: Algorithm::Gcra { period_ms: 60_000 }, ..c.clone() };
        assert!(would_fit(&g, 7 * 60_000));
        assert!(!would_fit(&g, 7 * 60_000 + 1));
        assert!(would_fit(&Counter { refund: true, ..c }, u64::MAX));
    }

    #[tokio::test]
    async fn tenant_fits_pool_refuses_nothing_stays_charged() {
        let f = Fake::default();
        f.set("tg:{tollgate|gpt-pool}:D:0:tpm", 95);
        let b = batch(
            vec![
                counter(TENANT, "rpm", 100, 1),
                counter(POOL, "tpm", 100, 10),
                counter(TENANT, "tpd", 1000, 10),
                counter(OTHER_POOL, "tpm", 5, 10),
            ],
            Some("r1"),
            false,
        );
        let o = f.apply(&b).await.unwrap();
        assert!(!o.allowed && !o.replay);
        // tenant: back to zero after the undo, and not blamed
        // pool: its real state (95, does not fit); other pool: read, would not fit
        let states: Vec<_> = o.counters.iter().map(|s| (s.fits, s.used)).collect();
        assert_eq!(states, [(true, 0), (false, 95), (true, 0), (false, 0)]);
        assert_eq!(f.get("tg:{tollgate|acme}:D:0:rpm"), 0);
        assert_eq!(f.get("tg:{tollgate|acme}:D:0:tpd"), 0);
        assert_eq!(f.get("tg:{tollgate|gpt-pool}:D:0:tpm"), 95);
        assert_eq!(f.get("tg:{tollgate|eu-pool}:D:0:tpm"), 0);
        // decide tenant, decide pool, undo tenant, check the other pool
        let calls = f.calls();
        let kinds: Vec<_> = calls.iter().map(|c| (c.counters[0].hash_tag.as_str(), c.settle)).collect();
        assert_eq!(kinds, [(TENANT, false), (POOL, false), (TENANT, true), (OTHER_POOL, false)]);

        // the retry replays every step: still nothing charged, the undo not repeated
        let o = f.apply(&b).await.unwrap();
        assert!(!o.allowed && o.replay);
        assert_eq!(f.get("tg:{tollgate|acme}:D:0:rpm"), 0);
        assert_eq!(f.get("tg:{tollgate|gpt-pool}:D:0:tpm"), 95);
    }

    #[tokio::test]
    async fn first_group_refuses_later_groups_are_only_read() {
        let f = Fake::default();
        let b = batch(vec![counter(TENANT, "rpm", 1, 2), counter(POOL, "tpm", 100, 10)], None, false);
        let o = f.apply(&b).await.unwrap();
        assert!(!o.allowed);
        assert_eq!(o.counters.iter().map(|s| (s.fits, s.used)).collect::<Vec<_>>(), [(false, 0), (true, 0)]);
        assert_eq!(f.calls().len(), 2);
        assert_eq!(f.get("tg:{tollgate|gpt-pool}:D:0:tpm"), 0);
    }

    #[tokio::test]
    async fn all_groups_fit_all_charged_once() {
        let f = Fake::default();
        let b = batch(vec![counter(TENANT, "rpm", 10, 1), counter(POOL, "tpm", 100, 10)], Some("r"), false);
        let o = f.apply(&b).await.unwrap();
        assert!(o.allowed && !o.replay);
        assert_eq!(o.counters.iter().map(|s| s.used).collect::<Vec<_>>(), [1, 10]);
        let o = f.apply(&b).await.unwrap();
        assert!(o.allowed && o.replay);
        assert_eq!((f.get("tg:{tollgate|acme}:D:0:rpm"), f.get("tg:{tollgate|gpt-pool}:D:0:tpm")), (1, 10));
    }

    #[tokio::test]
    async fn retry_after_a_partial_failure_charges_or_undoes_exactly_once() {
        let f = Fake::default();
        let b = batch(vec![counter(TENANT, "rpm", 10, 1), counter(POOL, "tpm", 100, 10)], Some("r"), false);
        // group 1 applied, group 2 fails: UNAVAILABLE, group 1 stays charged for the retry
        *f.fail_call.lock().unwrap() = Some(2);
        assert!(matches!(f.apply(&b).await, Err(StorageError::Timeout(_))));
        assert_eq!(f.get("tg:{tollgate|acme}:D:0:rpm"), 1);
        // meanwhile the pool filled up: the retry replays group 1, group 2 refuses,
        // and group 1 is given back
        f.set("tg:{tollgate|gpt-pool}:D:0:tpm", 95);
        let o = f.apply(&b).await.unwrap();
        assert!(!o.allowed && !o.replay);
        assert_eq!(f.get("tg:{tollgate|acme}:D:0:rpm"), 0);
        // someone else charges the tenant; a second retry must not refund again
        f.set("tg:{tollgate|acme}:D:0:rpm", 4);
        let o = f.apply(&b).await.unwrap();
        assert!(!o.allowed);
        assert_eq!(f.get("tg:{tollgate|acme}:D:0:rpm"), 4);
        assert_eq!(f.get("tg:{tollgate|gpt-pool}:D:0:tpm"), 95);
    }

    #[tokio::test]
    async fn retry_after_a_partial_failure_that_then_fits_charges_once() {
        let f = Fake::default();
        let b = batch(vec![counter(TENANT, "rpm", 10, 1), counter(POOL, "tpm", 100, 10)], Some("r"), false);
        *f.fail_call.lock().unwrap() = Some(2);
        assert!(f.apply(&b).await.is_err());
        let o = f.apply(&b).await.unwrap();
        assert!(o.allowed && !o.replay);
        assert_eq!((f.get("tg:{tollgate|acme}:D:0:rpm"), f.get("tg:{tollgate|gpt-pool}:D:0:tpm")), (1, 10));
    }

    #[tokio::test]
    async fn without_a_key_a_failure_gives_earlier_groups_back_at_once() {
        let f = Fake::default();
        let b = batch(vec![counter(TENANT, "rpm", 10, 1), counter(POOL, "tpm", 100, 10)], None, false);
        *f.fail_call.lock().unwrap() = Some(2);
        assert!(f.apply(&b).await.is_err());
        assert_eq!(f.get("tg:{tollgate|acme}:D:0:rpm"), 0);
        assert!(f.calls()[2].settle);
    }

    #[tokio::test]
    async fn settle_applies_every_group_even_over_the_limit() {
        let f = Fake::default();
        let mut refund = counter(TENANT, "tpd", 10, 3);
        refund.refund = true;
        f.set("tg:{tollgate|acme}:D:0:tpd", 5);
        let b = batch(vec![refund, counter(POOL, "tpm", 10, 15)], Some("s"), true);
        let o = f.apply(&b).await.unwrap();
        assert!(o.allowed);
        assert_eq!((f.get("tg:{tollgate|acme}:D:0:tpd"), f.get("tg:{tollgate|gpt-pool}:D:0:tpm")), (2, 15));
        assert_eq!(o.counters.iter().map(|s| (s.fits, s.used)).collect::<Vec<_>>(), [(true, 2), (false, 15)]);
        // retried: applied once
        let o = f.apply(&b).await.unwrap();
        assert!(o.replay);
        assert_eq!((f.get("tg:{tollgate|acme}:D:0:tpd"), f.get("tg:{tollgate|gpt-pool}:D:0:tpm")), (2, 15));
    }
}
