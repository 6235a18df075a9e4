//! What do one VM's requests share? The state of one Envoy worker: the settle
//! outbox, quota leases, the fail-open allowance, in-flight slots, budget
//! shares and metric names.

use std::rc::Rc;

use crate::admission::inflight::{self, Acquire, LocalStore, SlotStore};
use crate::config::Plugin;
use crate::metering::metrics;
use crate::ratelimit::descriptors::{self, Amounts, LimitState};
use crate::ratelimit::outbox::{self, Journal};
use hashbrown::{HashMap, HashSet};

/// Per-minute local allowance of one tenant on this worker (fail-open).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Window {
    pub(crate) minute: u64,
    pub(crate) requests: u64,
    pub(crate) tokens: u64,
}

/// How often the root context sends queued settles (ms). Short, so each tick
/// sends a small batch (a long tick makes a burst that stalls this worker's
/// requests).
pub const TICK_MS: u64 = 50;
/// How long a removed plugin keeps sending the settles that follow from
/// answers (see [`Worker::start_drain`]).
pub const DRAIN_MS: u64 = 5_000;
/// Settles in flight at once per worker. Must exceed (requests/s per worker x
/// settle round trip) or the journal backs up; it bounds memory, not rate.
pub const MAX_SETTLES_IN_FLIGHT: usize = 4096;

/// State shared by every request of one VM (one Envoy worker).
#[derive(Debug)]
pub struct Worker {
    pub journal: Journal,
    pub(crate) allowance: HashMap<usize, Window>,
    /// Per tenant, the highest share (per mille) of a token or dollar budget
    /// used, as of the last answer seen.
    pub(crate) budget_used: HashMap<usize, u64>,
    pub(crate) model_labels: HashSet<String>,
    /// Metric names by tenant and model as served (at most
    /// `metrics::MAX_MODEL_LABELS` models per tenant are kept).
    /// Keyed by tenant id, not index: a reconfiguration may renumber tenants.
    pub(crate) metric_names: HashMap<String, HashMap<String, Rc<metrics::TenantModelNames>>>,
    /// Requests in flight per tenant on this worker (slots taken in the
    /// shared table, or locally when it was unavailable).
    pub inflight: HashMap<usize, u64>,
    /// The table of in-flight counts across workers (see [`crate::admission::inflight`]);
    /// the filter installs Envoy's shared data here.
    pub slots: Box<dyn SlotStore>,
    /// This VM's identity in the shared tables.
    pub vm_id: u64,
    /// Shared-table keys of the tenants this VM holds slots for.
    pub(crate) held: HashMap<usize, (String, u64)>,
    pub(crate) last_heartbeat_ms: u64,
    /// Quota leases by tenant (see `lease_requests`).
    pub(crate) leases: HashMap<usize, Lease>,
    /// Per tenant, the limit states of the last answer: whether a lease fits.
    pub(crate) last_states: HashMap<usize, Vec<LimitState>>,
    /// Per tenant, a lease-sized reserve in flight on this worker, with the
    /// time (ms) after which it no longer counts (its answer is lost). One
    /// at a time: requests that find the lease empty meanwhile reserve for
    /// themselves alone instead of each asking for a lease.
    pub(crate) lease_refills: HashMap<usize, u64>,
    /// Settles of finished requests not yet in the journal, netted per
    /// tenant (in order of first use); [`Worker::queue_settle_nets`] turns
    /// each into one journal entry, once per tick.
    pub(crate) settle_nets: Vec<PendingNet>,
    /// Index into `settle_nets` by tenant id.
    pub(crate) settle_net_of: HashMap<String, usize>,
    pub counter: u64,
    /// Settles dropped as of the last [`Worker::newly_dropped`].
    pub(crate) dropped_reported: u64,
    /// The plugin is being removed: settles are sent until this time (ms).
    pub draining_until: Option<u64>,
}

/// One tenant's netted settles (see [`Worker::settle_nets`]).
#[derive(Debug)]
pub(crate) struct PendingNet {
    /// The configuration the settles were made under, and the tenant's index in it.
    pub(crate) plugin: Rc<Plugin>,
    pub(crate) tenant_idx: usize,
    pub(crate) net: descriptors::SettleNet,
    /// The first settle's idempotency key, and how many were netted.
    pub(crate) first_key: String,
    pub(crate) count: usize,
    pub(crate) first_ms: u64,
}

/// Quota this worker reserved ahead for one tenant and admits from locally.
#[derive(Debug, Clone)]
pub(crate) struct Lease {
    pub(crate) requests: u64,
    pub(crate) amounts: Amounts,
    pub(crate) expires_ms: u64,
    /// From this time (ms) on, the next request asks for a new lease while
    /// the others still draw from this one.
    pub(crate) refill_at_ms: u64,
    /// The limit states when the lease was granted, less what was drawn
    /// since (for the `x-ratelimit-*` headers).
    pub(crate) states: Vec<LimitState>,
    /// Idempotency stem of the reserve that granted it.
    pub(crate) key: String,
}

/// A lease is only taken while every limit has room for this many leases.
pub(crate) const LEASE_HEADROOM: u64 = 4;

impl Worker {
    pub fn new(journal_capacity: usize) -> Self {
        Worker {
            journal: Journal::new(journal_capacity),
            allowance: HashMap::new(),
            budget_used: HashMap::new(),
            model_labels: HashSet::new(),
            metric_names: HashMap::new(),
            inflight: HashMap::new(),
            slots: Box::new(LocalStore::default()),
            vm_id: 0,
            held: HashMap::new(),
            last_heartbeat_ms: 0,
            leases: HashMap::new(),
            last_states: HashMap::new(),
            lease_refills: HashMap::new(),
            settle_nets: Vec::new(),
            settle_net_of: HashMap::new(),
            counter: 0,
            dropped_reported: 0,
            draining_until: None,
        }
    }

    /// Takes an in-flight slot for a tenant, across workers when the shared
    /// table works, on this worker alone when it does not.
    pub(crate) fn acquire_slot(&mut self, idx: usize, tenant_id: &str, cap: u64, now_ms: u64) -> Result<Slot, u64> {
        let key = inflight::key(tenant_id);
        match inflight::acquire(self.slots.as_ref(), &key, self.vm_id, cap, now_ms) {
            Acquire::Granted => {
                self.held.entry(idx).or_insert_with(|| (key, 0)).1 += 1;
                *self.inflight.entry(idx).or_insert(0) += 1;
                Ok(Slot::Shared)
            }
            Acquire::Full(n) => Err(n),
            Acquire::Unavailable => {
                let n = self.inflight.get(&idx).copied().unwrap_or(0);
                if n >= cap {
                    return Err(n);
                }
                log::warn!("tollgate: shared in-flight table unavailable; counting tenant {tenant_id} on this worker");
                *self.inflight.entry(idx).or_insert(0) += 1;
                Ok(Slot::Local)
            }
        }
    }

    pub(crate) fn release_slot(&mut self, idx: usize, slot: Slot, now_ms: u64) {
        if let Some(n) = self.inflight.get_mut(&idx) {
            *n = n.saturating_sub(1);
        }
        if slot == Slot::Shared {
            if let Some((key, n)) = self.held.get_mut(&idx) {
                *n = n.saturating_sub(1);
                if let Err(e) = inflight::release(self.slots.as_ref(), key, self.vm_id, now_ms) {
                    // The entry stops counting once its heartbeat goes stale.
                    log::warn!("tollgate: releasing an in-flight slot failed: {e:?}");
                }
                if *n == 0 {
                    self.held.remove(&idx);
                }
            }
        }
    }

    /// Admits one request of `estimate` from the tenant's lease, if it holds
    /// enough; answers the limit states to report.
    pub(crate) fn draw(&mut self, idx: usize, estimate: Amounts, now_ms: u64) -> Option<Vec<LimitState>> {
        let lease = self.leases.get_mut(&idx)?;
        if now_ms >= lease.expires_ms
            || lease.requests == 0
            || lease.amounts.tokens < estimate.tokens
            || lease.amounts.micros < estimate.micros
        {
            return None;
        }
        lease.requests -= 1;
        lease.amounts.tokens -= estimate.tokens;
        lease.amounts.micros -= estimate.micros;
        for st in &mut lease.states {
            let used = match st.kind.measure() {
                descriptors::Measure::Requests => 1,
                descriptors::Measure::Tokens => estimate.tokens,
                descriptors::Measure::Micros => estimate.micros,
            };
            st.remaining = st.remaining.saturating_sub(used);
        }
        Some(lease.states.clone())
    }

    /// Whether a request should ask for a new lease of `n` now: no
    /// lease-sized reserve is in flight for the tenant, and its lease is
    /// missing, expired, down to its last quarter of requests, or in the
    /// last quarter of its time. Refilling before the lease runs dry keeps
    /// concurrent requests drawing while the one refill is answered.
    pub(crate) fn lease_refill_due(&self, idx: usize, n: u64, now_ms: u64) -> bool {
        if self.lease_refills.get(&idx).is_some_and(|&until| now_ms < until) {
            return false;
        }
        self.leases
            .get(&idx)
            .is_none_or(|l| now_ms >= l.expires_ms || now_ms >= l.refill_at_ms || l.requests.saturating_mul(4) <= n)
    }

    /// Whether the last answer for the tenant left room for a lease of `n`
    /// requests of `estimate` on every limit, [`LEASE_HEADROOM`] times over.
    pub(crate) fn room_for_lease(&self, idx: usize, n: u64, estimate: Amounts) -> bool {
        let Some(states) = self.last_states.get(&idx) else { return false };
        !states.is_empty()
            && states.iter().all(|st| {
                let need = match st.kind.measure() {
                    descriptors::Measure::Requests => n,
                    descriptors::Measure::Tokens => estimate.tokens.saturating_mul(n),
                    descriptors::Measure::Micros => estimate.micros.saturating_mul(n),
                };
                !st.over && st.remaining >= need.saturating_mul(LEASE_HEADROOM)
            })
    }

    /// Takes the leases that expired by `now_ms` (all of them with `all`),
    /// for their unused quota to be given back.
    pub(crate) fn take_leases(&mut self, now_ms: u64, all: bool) -> Vec<(usize, Lease)> {
        let done: Vec<usize> =
            self.leases.iter().filter(|(_, l)| all || now_ms >= l.expires_ms).map(|(i, _)| *i).collect();
        done.into_iter().filter_map(|i| self.leases.remove(&i).map(|l| (i, l))).collect()
    }

    /// Queues the refund of every expired lease's unused quota; called from
    /// the root context's tick.
    pub fn expire_leases(&mut self, plugin: &Rc<Plugin>, now_ms: u64) {
        if plugin.rate_limit.is_none() {
            return;
        }
        for (idx, lease) in self.take_leases(now_ms, false) {
            if let Some(e) = lease_refund(plugin, idx, &lease, now_ms) {
                self.journal.push(e);
            }
        }
    }

    /// Queues the refund of every lease's unused quota, expired or not; the
    /// plugin is being removed. Returns how many leases there were.
    pub fn release_leases(&mut self, plugin: &Rc<Plugin>, now_ms: u64) -> usize {
        if plugin.rate_limit.is_none() {
            return 0;
        }
        let leases = self.take_leases(now_ms, true);
        let n = leases.len();
        for (idx, lease) in leases {
            if let Some(e) = lease_refund(plugin, idx, &lease, now_ms) {
                self.journal.push(e);
            }
        }
        n
    }

    /// Refreshes this VM's entries in the shared in-flight tables; called
    /// from the root context's tick.
    pub fn heartbeat(&mut self, now_ms: u64) {
        if now_ms.saturating_sub(self.last_heartbeat_ms) < inflight::HEARTBEAT_MS {
            return;
        }
        self.last_heartbeat_ms = now_ms;
        for (key, _) in self.held.values() {
            let _ = inflight::heartbeat(self.slots.as_ref(), key, self.vm_id, now_ms);
        }
    }

    /// The metric names of a tenant and model, and the model's label.
    pub(crate) fn metric_names(&mut self, tenant_id: &str, model: &str) -> Rc<metrics::TenantModelNames> {
        if let Some(n) = self.metric_names.get(tenant_id).and_then(|m| m.get(model)) {
            return Rc::clone(n);
        }
        let label = self.model_label(model);
        let names = Rc::new(metrics::TenantModelNames::new(tenant_id, &label));
        let by_model = self.metric_names.entry(tenant_id.to_string()).or_default();
        if by_model.len() < metrics::MAX_MODEL_LABELS {
            by_model.insert(model.to_string(), Rc::clone(&names));
        }
        names
    }

    /// Adds one request's settle to its tenant's net. `key` makes the
    /// idempotency key of the first one.
    pub(crate) fn net_settle(
        &mut self,
        plugin: &Rc<Plugin>,
        tenant_idx: usize,
        net: descriptors::SettleNet,
        key: impl FnOnce() -> String,
        now_ms: u64,
    ) {
        let Some(tenant) = plugin.tenants.get(tenant_idx) else { return };
        if let Some(p) = self.settle_net_of.get(tenant.id.as_str()).and_then(|&i| self.settle_nets.get_mut(i)) {
            if Rc::ptr_eq(&p.plugin, plugin) && p.tenant_idx == tenant_idx {
                p.net.add(net);
                p.count += 1;
                return;
            }
            // Another configuration of the same tenant: its own settle.
            self.queue_settle_nets();
        }
        self.settle_net_of.insert(tenant.id.clone(), self.settle_nets.len());
        self.settle_nets.push(PendingNet {
            plugin: Rc::clone(plugin),
            tenant_idx,
            net,
            first_key: key(),
            count: 1,
            first_ms: now_ms,
        });
    }

    /// Puts the netted settles in the journal, one entry per tenant (key:
    /// the first settle's, `+<count>` when several were netted; the same
    /// keys [`outbox::merge`] gives). Returns how many were dropped from a
    /// full journal.
    pub fn queue_settle_nets(&mut self) -> u64 {
        self.settle_net_of.clear();
        let mut dropped = 0;
        for p in std::mem::take(&mut self.settle_nets) {
            let Some(settle) = outbox::Settle::new(&p.plugin, p.tenant_idx, p.net) else {
                continue;
            };
            let key = if p.count == 1 { p.first_key } else { format!("{}+{}", p.first_key, p.count) };
            dropped += self.journal.push(outbox::Entry::settle(settle, key, true, p.first_ms));
        }
        if dropped > 0 {
            log::warn!("tollgate: settle journal full; dropped {dropped} settles");
        }
        dropped
    }

    /// A request id for a request that brought none: unique per VM and
    /// time-ordered.
    pub fn new_request_id(&mut self, now_ms: u64) -> String {
        self.counter = self.counter.wrapping_add(1);
        format!("tg-{:012x}{:08x}", now_ms, self.counter as u32)
    }

    /// The settles to send now (every queued one with `force`), merged per
    /// tenant where they can be, at most [`MAX_SETTLES_IN_FLIGHT`] in flight.
    /// Settles of finished requests are netted into the outbox first.
    pub fn settles_due(&mut self, now_ms: u64, force: bool) -> Vec<outbox::Entry> {
        self.queue_settle_nets();
        let room = MAX_SETTLES_IN_FLIGHT.saturating_sub(self.journal.in_flight());
        outbox::merge(self.journal.due(if force { u64::MAX } else { now_ms }, room))
    }

    /// How many settles the outbox dropped since the last call.
    pub fn newly_dropped(&mut self) -> u64 {
        let n = self.journal.dropped.saturating_sub(self.dropped_reported);
        self.dropped_reported = self.journal.dropped;
        n
    }

    /// The plugin is being removed (a configuration push replaced it, or
    /// Envoy stops): unused lease quota is given back and the drain starts:
    /// every queued settle is to be sent at once, and settles that follow
    /// from answers (a replay's settle) for up to [`DRAIN_MS`]. Returns the
    /// leases given back and the settles pending.
    pub fn start_drain(&mut self, plugin: &Rc<Plugin>, now_ms: u64) -> (usize, usize) {
        let leases = self.release_leases(plugin, now_ms);
        let queued = self.pending_settles();
        self.draining_until = Some(now_ms.saturating_add(DRAIN_MS));
        (leases, queued)
    }

    /// While draining: whether settles that follow from answers may still
    /// be sent at `now_ms`.
    pub fn drain_sends(&self, now_ms: u64) -> bool {
        self.draining_until.is_some_and(|until| now_ms < until)
    }

    /// While draining: whether the drain is over (no settle in flight).
    /// What is still queued then (settles whose call failed) is dropped and
    /// counted in the outbox.
    pub fn drain_finished(&mut self) -> bool {
        if self.draining_until.is_none() || self.journal.in_flight() > 0 {
            return false;
        }
        let queued = self.journal.pending().saturating_sub(self.journal.in_flight());
        if queued > 0 {
            let lost = self.journal.drop_queued();
            log::warn!("tollgate: plugin removed with {lost} settles unsent (the rate-limit service did not answer)");
        }
        self.draining_until = None;
        true
    }

    /// Settles not yet answered: in the journal, or netted and not yet in it.
    pub fn pending_settles(&self) -> usize {
        self.journal.pending().saturating_add(self.settle_nets.len())
    }

    /// A bounded metric label for a model name.
    pub(crate) fn model_label(&mut self, model: &str) -> String {
        let l = metrics::label(model);
        if self.model_labels.contains(&l) {
            return l;
        }
        if self.model_labels.len() >= metrics::MAX_MODEL_LABELS {
            return "other".into();
        }
        self.model_labels.insert(l.clone());
        l
    }
}

/// Where a request's in-flight slot was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    Shared,
    Local,
}

/// `n` requests' worth of one estimate.
pub(crate) fn times(a: Amounts, n: u64) -> Amounts {
    Amounts { tokens: a.tokens.saturating_mul(n), micros: a.micros.saturating_mul(n) }
}

/// The settle that gives back a lease's unused quota.
pub(crate) fn lease_refund(
    plugin: &Rc<Plugin>,
    tenant_idx: usize,
    lease: &Lease,
    now_ms: u64,
) -> Option<outbox::Entry> {
    let net = descriptors::SettleNet::of(lease.amounts, Amounts::default(), (lease.requests, 0));
    outbox::Settle::new(plugin, tenant_idx, net)
        .map(|s| outbox::Entry::settle(s, format!("{}:lease", lease.key), true, now_ms))
}
