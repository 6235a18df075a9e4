//! What do one VM's requests share? The state of one Envoy worker, composed:
//! the settle outbox and the settles netted for it, quota leases, the
//! fail-open allowance, in-flight slots, budget shares and metric names; and
//! when settles are sent (each tick, and the drain when the plugin goes).

use std::rc::Rc;

use crate::admission::fail_open::Allowance;
use crate::admission::inflight::{self, Acquire, LocalStore, SlotStore};
use crate::admission::lease::Leases;
use crate::config::{Plugin, TenantRef};
use crate::metering::metrics;
use crate::ratelimit::descriptors::Scope;
use crate::ratelimit::outbox::{self, Journal};
use crate::ratelimit::settle::{SettleNet, SettleNets};
use crate::rls::ledger::UsageRow;
use hashbrown::{HashMap, HashSet};

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
/// How often the circuit gauges are read from the shared records (ms).
pub const CIRCUIT_GAUGE_MS: u64 = 1_000;

/// State shared by every request of one VM (one Envoy worker).
#[derive(Debug)]
pub struct Worker {
    pub journal: Journal,
    /// The fail-open local allowance per tenant.
    pub(crate) allowance: Allowance,
    /// Per tenant, the highest share (per mille) of a token or dollar budget
    /// used, as of the last answer seen.
    pub(crate) budget_used: HashMap<usize, u64>,
    pub(crate) model_labels: HashSet<String>,
    /// Metric names by the tenant's metric label (`Plugin::metric_tenant`)
    /// and model as served (at most `metrics::MAX_MODEL_LABELS` models per
    /// label are kept). Keyed by label, not index: a reconfiguration may
    /// renumber tenants.
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
    pub(crate) leases: Leases,
    /// Settles of finished requests not yet in the journal, netted per
    /// tenant; [`Worker::queue_settle_nets`] puts them in it once per tick.
    pub(crate) settle_nets: SettleNets,
    pub counter: u64,
    /// Settles dropped as of the last [`Worker::newly_dropped`].
    pub(crate) dropped_reported: u64,
    /// The plugin is being removed: settles are sent until this time (ms).
    pub draining_until: Option<u64>,
    /// This worker's cache of the tenant registry.
    pub registry: crate::identity::registry::RegistryCache,
    /// Failures to reach the rate-limit service, told once and summarised.
    pub rls_incident: crate::incident::Incident,
    /// This worker's running count of weighted failover picks.
    pub target_turn: u64,
    /// Circuit gauges to set on the next tick: (metric name, state).
    pub circuit_gauges: Vec<(String, u64)>,
    /// Reserves asked again after this worker stalled past their deadline,
    /// not yet counted (`tollgate.rls.stall_retries`).
    pub stall_retries: u64,
    /// When the circuit gauges were last read from the shared records.
    pub(crate) circuits_read_ms: u64,
}

impl Worker {
    pub fn new(journal_capacity: usize) -> Self {
        Worker {
            journal: Journal::new(journal_capacity),
            allowance: Allowance::default(),
            budget_used: HashMap::new(),
            model_labels: HashSet::new(),
            metric_names: HashMap::new(),
            inflight: HashMap::new(),
            slots: Box::new(LocalStore::default()),
            vm_id: 0,
            held: HashMap::new(),
            last_heartbeat_ms: 0,
            leases: Leases::default(),
            settle_nets: SettleNets::default(),
            counter: 0,
            dropped_reported: 0,
            draining_until: None,
            registry: Default::default(),
            rls_incident: crate::incident::Incident::new("rate-limit service", crate::incident::SUMMARY_MS),
            target_turn: 0,
            circuit_gauges: Vec::new(),
            stall_retries: 0,
            circuits_read_ms: 0,
        }
    }

    /// Once a second, queues every used circuit's state for its gauge, read
    /// from the shared records: a circuit's state also changes with time (an
    /// open period ends) and in other workers, and a target with no traffic
    /// would otherwise keep its last gauge.
    pub fn refresh_circuit_gauges(&mut self, plugin: &Plugin, now_ms: u64) {
        if now_ms.saturating_sub(self.circuits_read_ms) < CIRCUIT_GAUGE_MS {
            return;
        }
        self.circuits_read_ms = now_ms;
        for p in &plugin.providers {
            // Never written (not a target, or never failed): no series.
            let Ok((Some(bytes), _)) = self.slots.get(&p.circuit_key) else { continue };
            if bytes.is_empty() {
                continue;
            }
            let state = crate::upstream::circuit::Record::decode(&bytes).state(now_ms);
            self.circuit_gauges.push((metrics::circuit_state(&p.name), state.gauge()));
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

    /// Queues the refund of every expired lease's unused quota; called from
    /// the root context's tick.
    pub fn expire_leases(&mut self, plugin: &Rc<Plugin>, now_ms: u64) {
        for e in self.leases.refunds(plugin, now_ms, false).1 {
            self.journal.push(e);
        }
        // End users come and go: what was kept to size and place their
        // leases is forgotten a minute after their last request.
        self.leases.prune(now_ms, 60_000);
    }

    /// Queues the refund of every lease's unused quota, expired or not; the
    /// plugin is being removed. Returns how many leases there were.
    /// A new configuration replaces `old` on this worker. State keyed by
    /// tenant index belongs to the old numbering: leases are given back under
    /// the old configuration, budget shares, last answers, lease refills and
    /// fail-open windows start afresh. Returns the leases given back.
    pub fn reconfigured(&mut self, old: &Rc<Plugin>, now_ms: u64) -> usize {
        let n = self.release_leases(old, now_ms);
        self.leases.last_states.clear();
        self.leases.refills.clear();
        self.leases.rates.clear();
        self.budget_used.clear();
        self.allowance = Allowance::default();
        // Registry tenants were compiled against the old tiers and providers.
        self.registry.reconfigured();
        n
    }

    pub fn release_leases(&mut self, plugin: &Rc<Plugin>, now_ms: u64) -> usize {
        let (n, refunds) = self.leases.refunds(plugin, now_ms, true);
        for e in refunds {
            self.journal.push(e);
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

    /// The summaries of failing dependencies that are due.
    pub fn incident_lines(&mut self, now_ms: u64) -> Vec<String> {
        self.rls_incident.tick(now_ms).into_iter().chain(self.registry.incident.tick(now_ms)).collect()
    }

    /// Adds one request's settle to its tenant's net (see [`SettleNets::add`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn net_settle(
        &mut self,
        plugin: &Rc<Plugin>,
        tenant: &TenantRef,
        scope: Option<&Rc<Scope>>,
        net: SettleNet,
        row: Option<UsageRow>,
        key: impl FnOnce() -> String,
        now_ms: u64,
    ) {
        self.settle_nets.add(&mut self.journal, plugin, tenant, scope, net, row, key, now_ms);
    }

    /// Puts the netted settles in the journal, one entry per tenant; returns
    /// how many were dropped from a full journal (see [`SettleNets::queue`]).
    pub fn queue_settle_nets(&mut self) -> u64 {
        self.settle_nets.queue(&mut self.journal)
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
    /// Entries past the retry horizon are dropped first (counted): the
    /// service may have forgotten their idempotency keys.
    pub fn settles_due(&mut self, now_ms: u64, force: bool) -> Vec<outbox::Entry> {
        self.queue_settle_nets();
        let expired = self.journal.expire(now_ms);
        if expired > 0 {
            log::warn!(
                "tollgate: dropped {expired} settles unanswered for {} s (the service may have forgotten their idempotency keys)",
                crate::rls::IDEMPOTENCY_RETRY_HORIZON_MS / 1000
            );
        }
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
