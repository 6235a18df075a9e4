//! After a decision: the tenants index (once per tenant and day per
//! process), alert events into the global stream and webhook outbox, and the
//! budget gauges. Never on the answer's path: the I/O is spawned.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use chrono_tz::Tz;

use super::alerts::{self, AlertSink};
use super::{day_number, days_key, local_day, read::level_of, tenant_member, DAY_MS, TENANTS_KEY};
use crate::clock::Clock;
use crate::keys;
use crate::metrics::Metrics;
use crate::plan::{DescriptorPlan, Plan, RequestMeta};
use crate::service::DecisionObserver;
use crate::storage::redis::RedisStorage;
use crate::storage::{Algorithm, Outcome};

/// Most (tenant, day) pairs remembered before the memory is cleared.
const SEEN_CAP: usize = 100_000;

pub struct LedgerObserver {
    storage: Arc<RedisStorage>,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    sink: AlertSink,
    retention_days: u64,
    seen: Mutex<HashSet<(String, i64)>>,
    /// Counter key → when its gauges were last set (at most once a second).
    gauged: Mutex<HashMap<String, i64>>,
}

impl LedgerObserver {
    pub fn new(
        storage: Arc<RedisStorage>,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
        sink: AlertSink,
        retention_days: u64,
    ) -> Self {
        Self {
            storage,
            metrics,
            clock,
            sink,
            retention_days,
            seen: Mutex::new(HashSet::new()),
            gauged: Mutex::new(HashMap::new()),
        }
    }

    /// The tenant's days index and the global tenants index: once per
    /// tenant and day per process, after the decision (idempotent writes).
    fn note_tenant_days(&self, domain: &str, meta: &RequestMeta) {
        let mut fresh = Vec::new();
        if let Ok(mut seen) = self.seen.lock() {
            if seen.len() > SEEN_CAP {
                seen.clear();
            }
            for r in &meta.usage {
                let tz = r.time_zone.as_deref().and_then(|t| t.parse::<Tz>().ok()).unwrap_or(Tz::UTC);
                let Some(day) = i64::try_from(r.finished_at_ms).ok().and_then(|ms| local_day(ms, tz)) else { continue };
                let k = (tenant_member(domain, &r.tenant), day_number(day));
                if !seen.contains(&k) {
                    seen.insert(k.clone());
                    fresh.push((k.0, k.1, day.format("%Y-%m-%d").to_string(), keys::hash_tag(domain, &r.tenant)));
                }
            }
        }
        if fresh.is_empty() {
            return;
        }
        let storage = self.storage.clone();
        let retention = i64::try_from(self.retention_days).unwrap_or(100_000);
        let today = self.clock.now_ms().div_euclid(DAY_MS);
        let trim = format!("({}", today - retention - 1);
        tokio::spawn(async move {
            // Two slots: each tenant's days index, then the global tenants index.
            let mut pipes = Vec::new();
            let mut tenants = redis::pipe();
            for (member, n, day, tag) in &fresh {
                let key = days_key(tag);
                let mut days = redis::pipe();
                days.cmd("ZADD").arg(&key).arg(n).arg(day).ignore();
                days.cmd("ZREMRANGEBYSCORE").arg(&key).arg("-inf").arg(&trim).ignore();
                days.cmd("PEXPIRE").arg(&key).arg((retention + 2) * DAY_MS).ignore();
                pipes.push(days);
                // GT: a late row for an old day never moves a tenant back.
                tenants.cmd("ZADD").arg(TENANTS_KEY).arg("GT").arg(n).arg(member).ignore();
            }
            tenants.cmd("ZREMRANGEBYSCORE").arg(TENANTS_KEY).arg("-inf").arg(&trim).ignore();
            tenants.cmd("PEXPIRE").arg(TENANTS_KEY).arg((retention + 2) * DAY_MS).ignore();
            pipes.push(tenants);
            for pipe in &pipes {
                if let Err(e) = storage.query_pipeline(pipe).await {
                    tracing::warn!(error = %e, "cannot update the ledger's day or tenant index");
                }
            }
        });
    }
}

impl LedgerObserver {
    /// Whether a counter's gauges are due (last set over a second ago): the
    /// label work is done at most once a second per budget.
    fn gauge_due(&self, counter_key: &str, now_ms: i64) -> bool {
        let Ok(mut g) = self.gauged.lock() else { return false };
        match g.get_mut(counter_key) {
            Some(last) if now_ms - *last < 1_000 => false,
            Some(last) => {
                *last = now_ms;
                true
            }
            None => {
                if g.len() > SEEN_CAP {
                    g.clear();
                }
                g.insert(counter_key.to_owned(), now_ms);
                true
            }
        }
    }
}

impl DecisionObserver for LedgerObserver {
    fn observe(&self, domain: &str, meta: &RequestMeta, plan: &Plan, outcome: &Outcome) {
        let Some(ledger) = &plan.batch.ledger else { return };
        if !outcome.allowed || outcome.replay {
            return;
        }
        if !meta.usage.is_empty() {
            self.metrics.ledger_rows.inc_by(meta.usage.len() as u64);
            self.note_tenant_days(domain, meta);
        }
        // Budget gauges: tenant-level calendar budgets that carry thresholds,
        // after settles (the usage that stays; reserves are transient).
        let counters = if plan.batch.settle { plan.batch.counters.as_slice() } else { &[] };
        for (i, (c, s)) in counters.iter().zip(&outcome.counters).enumerate() {
            let Some(note) = ledger.notes.get(i) else { continue };
            if note.alerts.is_empty() || c.limit == 0 || !self.gauge_due(&c.key, plan.batch.now_ms) {
                continue;
            }
            let entries = entries_of(&c.key);
            if level_of(&entries) != "tenant" {
                continue;
            }
            let tenant = entries.first().map(|(_, v)| v.clone()).unwrap_or_default();
            let name = entries.iter().find(|(k, _)| k == "limit").map(|(_, v)| v.clone()).unwrap_or_default();
            self.metrics.budget(&tenant, "tenant", &name, s.used, c.limit);
        }
        for hit in &outcome.alerts {
            let Some(c) = plan.batch.counters.get(hit.counter) else { continue };
            let Some(note) = ledger.notes.get(hit.counter) else { continue };
            let Algorithm::Calendar { start_ms, end_ms } = c.algorithm else { continue };
            let unit = plan.descriptors.iter().find_map(|d| match d {
                DescriptorPlan::Limited { counter, unit, .. } if *counter == hit.counter => Some(*unit),
                _ => None,
            });
            let Some(unit) = unit else { continue };
            let threshold = note.alerts.iter().find(|(p, _)| *p == hit.percent).map(|(_, t)| *t).unwrap_or(0);
            let id = alerts::event_id(&c.key, hit.percent);
            let body = alerts::event_json(
                &id,
                domain,
                &entries_of(&c.key),
                unit,
                c.limit,
                hit.percent,
                threshold,
                hit.used,
                (start_ms, end_ms),
                plan.batch.now_ms,
            );
            self.metrics.alert_event(hit.percent);
            let storage = self.storage.clone();
            let sink = self.sink.clone();
            let now = plan.batch.now_ms;
            tokio::spawn(async move {
                // The event is already recorded in the tenant's alert stream;
                // retry the global enqueue through short Redis blips.
                for attempt in 0..5u32 {
                    match alerts::enqueue(&storage, &sink, &id, &body, now).await {
                        Ok(_) => return,
                        Err(e) => {
                            tracing::warn!(error = %e, event = %id, attempt, "cannot enqueue an alert");
                            tokio::time::sleep(std::time::Duration::from_millis(200 << attempt)).await;
                        }
                    }
                }
                tracing::error!(event = %id, "alert not enqueued for delivery (kept in the tenant's alert stream)");
            });
        }
    }
}

/// The descriptor entries of a counter key (its last `:` part: values are
/// escaped, so they hold no `:`).
fn entries_of(counter_key: &str) -> Vec<(String, String)> {
    let Some(rest) = counter_key.rsplit(':').next() else { return vec![] };
    rest.split('|')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((super::unescape(k)?, super::unescape(v)?))
        })
        .collect()
}
