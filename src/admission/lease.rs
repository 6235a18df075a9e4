//! May this worker admit a tenant's request from quota it already holds?
//! Quota leases: quota reserved ahead along with one request, drawn from
//! locally, refilled before it runs dry and given back when it expires.

use std::rc::Rc;

use hashbrown::HashMap;

use crate::config::{Plugin, TenantRef};
use crate::ratelimit::descriptors::{Amounts, LimitState, Measure};
use crate::ratelimit::outbox;
use crate::ratelimit::settle::{Settle, SettleNet};

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
    /// Whose quota it is (its unused rest is given back to them).
    pub(crate) tenant: TenantRef,
}

/// A lease is only taken while every limit has room for this many leases.
pub(crate) const LEASE_HEADROOM: u64 = 4;

/// The leases of one worker, by tenant index (see `lease_requests`).
#[derive(Debug, Default)]
pub struct Leases {
    pub(crate) by_tenant: HashMap<usize, Lease>,
    /// Per tenant, the limit states of the last answer: whether a lease fits.
    pub(crate) last_states: HashMap<usize, Vec<LimitState>>,
    /// Per tenant, a lease-sized reserve in flight on this worker, with the
    /// time (ms) after which it no longer counts (its answer is lost). One
    /// at a time: requests that find the lease empty meanwhile reserve for
    /// themselves alone instead of each asking for a lease.
    pub(crate) refills: HashMap<usize, u64>,
}

impl Leases {
    /// Admits one request of `estimate` from the tenant's lease, if it holds
    /// enough; answers the limit states to report.
    pub(crate) fn draw(&mut self, idx: usize, estimate: Amounts, now_ms: u64) -> Option<Vec<LimitState>> {
        let lease = self.by_tenant.get_mut(&idx)?;
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
                Measure::Requests => 1,
                Measure::Tokens => estimate.tokens,
                Measure::Micros => estimate.micros,
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
    pub(crate) fn refill_due(&self, idx: usize, n: u64, now_ms: u64) -> bool {
        if self.refills.get(&idx).is_some_and(|&until| now_ms < until) {
            return false;
        }
        self.by_tenant
            .get(&idx)
            .is_none_or(|l| now_ms >= l.expires_ms || now_ms >= l.refill_at_ms || l.requests.saturating_mul(4) <= n)
    }

    /// Whether the last answer for the tenant left room for a lease of `n`
    /// requests of `estimate` on every limit, [`LEASE_HEADROOM`] times over.
    pub(crate) fn room_for(&self, idx: usize, n: u64, estimate: Amounts) -> bool {
        let Some(states) = self.last_states.get(&idx) else { return false };
        !states.is_empty()
            && states.iter().all(|st| {
                let need = match st.kind.measure() {
                    Measure::Requests => n,
                    Measure::Tokens => estimate.tokens.saturating_mul(n),
                    Measure::Micros => estimate.micros.saturating_mul(n),
                };
                !st.over && st.remaining >= need.saturating_mul(LEASE_HEADROOM)
            })
    }

    /// Keeps `lease` as the tenant's; answers the one it replaces.
    pub(crate) fn grant(&mut self, idx: usize, lease: Lease) -> Option<Lease> {
        self.by_tenant.insert(idx, lease)
    }

    /// Takes the leases that expired by `now_ms` (all of them with `all`),
    /// for their unused quota to be given back.
    pub(crate) fn take(&mut self, now_ms: u64, all: bool) -> Vec<(usize, Lease)> {
        let done: Vec<usize> =
            self.by_tenant.iter().filter(|(_, l)| all || now_ms >= l.expires_ms).map(|(i, _)| *i).collect();
        done.into_iter().filter_map(|i| self.by_tenant.remove(&i).map(|l| (i, l))).collect()
    }

    /// Takes the leases that expired by `now_ms` (all of them with `all`)
    /// and answers how many there were and the settles giving back their
    /// unused quota. Nothing is taken when `plugin` has no rate limit.
    pub(crate) fn refunds(&mut self, plugin: &Rc<Plugin>, now_ms: u64, all: bool) -> (usize, Vec<outbox::Entry>) {
        if plugin.rate_limit.is_none() {
            return (0, Vec::new());
        }
        let leases = self.take(now_ms, all);
        let n = leases.len();
        (n, leases.into_iter().filter_map(|(_, lease)| lease_refund(plugin, &lease, now_ms)).collect())
    }
}

/// `n` requests' worth of one estimate.
pub(crate) fn times(a: Amounts, n: u64) -> Amounts {
    Amounts { tokens: a.tokens.saturating_mul(n), micros: a.micros.saturating_mul(n) }
}

/// The settle that gives back a lease's unused quota.
pub(crate) fn lease_refund(plugin: &Rc<Plugin>, lease: &Lease, now_ms: u64) -> Option<outbox::Entry> {
    let net = SettleNet::of(lease.amounts, Amounts::default(), (lease.requests, 0));
    Settle::new(plugin, &lease.tenant, net)
        .map(|s| outbox::Entry::settle(s, format!("{}:lease", lease.key), true, now_ms))
}
