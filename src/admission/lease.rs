//! May this worker admit a tenant's request from quota it already holds?
//! Quota leases: quota reserved ahead along with one request, drawn from
//! locally, refilled before it runs dry and given back when it expires.

use std::rc::Rc;

use hashbrown::HashMap;

use crate::config::{Plugin, TenantRef};
use crate::ratelimit::descriptors::{Amounts, LimitState, Scope};
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
    pub(crate) scope: Option<Rc<Scope>>,
}

/// Whose quota a lease holds: a tenant (by slot) and the scope of its
/// requests (key, user, pool). Requests of one account share a lease.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Account {
    pub slot: usize,
    pub scope: Option<Rc<Scope>>,
}

/// Requests seen per account in the current and the last lease period, to
/// size automatic leases.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Rate {
    period_start_ms: u64,
    this: u64,
    last: u64,
}

/// A lease is only taken while every limit has room for this many leases.
pub(crate) const LEASE_HEADROOM: u64 = 4;

/// The leases of one worker, by account (see `lease_requests`).
#[derive(Debug, Default)]
pub struct Leases {
    pub(crate) by_tenant: HashMap<Account, Lease>,
    /// Per account, the limit states of the last answer (whether a lease
    /// fits) and when it came (ms).
    pub(crate) last_states: HashMap<Account, (Vec<LimitState>, u64)>,
    /// Per account, a lease-sized reserve in flight on this worker, with the
    /// time (ms) after which it no longer counts (its answer is lost). One
    /// at a time: requests that find the lease empty meanwhile reserve for
    /// themselves alone instead of each asking for a lease.
    pub(crate) refills: HashMap<Account, u64>,
    /// Per account, the recent request rate (automatic lease sizes).
    pub(crate) rates: HashMap<Account, Rate>,
}

impl Leases {
    /// Admits one request of `estimate` from the account's lease, if it
    /// holds enough; answers the limit states to report.
    pub(crate) fn draw(&mut self, acct: &Account, estimate: Amounts, now_ms: u64) -> Option<Vec<LimitState>> {
        let lease = self.by_tenant.get_mut(acct)?;
        if now_ms >= lease.expires_ms
            || lease.requests == 0
            || lease.amounts.tokens < estimate.tokens
            || lease.amounts.input < estimate.input
            || lease.amounts.output < estimate.output
            || lease.amounts.micros < estimate.micros
        {
            return None;
        }
        lease.requests -= 1;
        lease.amounts.tokens -= estimate.tokens;
        lease.amounts.input -= estimate.input;
        lease.amounts.output -= estimate.output;
        lease.amounts.micros -= estimate.micros;
        for st in &mut lease.states {
            st.remaining = st.remaining.saturating_sub(estimate.of(st.kind.measure(), 1));
        }
        Some(lease.states.clone())
    }

    /// Counts a request of `acct` and answers the automatic lease size: the
    /// most requests this worker saw for the account in one lease period,
    /// this one or the last, up to `max`; 0 (no lease) below 4. A burst
    /// after a quiet spell leases as soon as it has shown its rate.
    pub(crate) fn auto_size(&mut self, acct: &Account, period_ms: u64, max: u64, now_ms: u64) -> u64 {
        let period_ms = period_ms.max(1);
        let r = self.rates.entry(acct.clone()).or_default();
        if now_ms >= r.period_start_ms.saturating_add(period_ms) {
            let gap = now_ms - r.period_start_ms;
            r.last = if gap < period_ms.saturating_mul(2) { r.this } else { 0 };
            r.this = 0;
            r.period_start_ms = now_ms;
        }
        r.this += 1;
        let seen = r.last.max(r.this);
        if seen < 4 {
            0
        } else {
            seen.min(max)
        }
    }

    /// Forgets what no request needed for `idle_ms`: automatic-lease rates
    /// and last answers of accounts without a lease (end users come and go).
    pub(crate) fn prune(&mut self, now_ms: u64, idle_ms: u64) {
        self.rates.retain(|_, r| now_ms < r.period_start_ms.saturating_add(idle_ms));
        let leased = &self.by_tenant;
        self.last_states.retain(|a, (_, at)| leased.contains_key(a) || now_ms < at.saturating_add(idle_ms));
        self.refills.retain(|_, until| now_ms < *until);
    }

    /// Whether a request should ask for a new lease of `n` now: no
    /// lease-sized reserve is in flight for the tenant, and its lease is
    /// missing, expired, down to its last quarter of requests, or in the
    /// last quarter of its time. Refilling before the lease runs dry keeps
    /// concurrent requests drawing while the one refill is answered.
    pub(crate) fn refill_due(&self, acct: &Account, n: u64, now_ms: u64) -> bool {
        if self.refills.get(acct).is_some_and(|&until| now_ms < until) {
            return false;
        }
        self.by_tenant
            .get(acct)
            .is_none_or(|l| now_ms >= l.expires_ms || now_ms >= l.refill_at_ms || l.requests.saturating_mul(4) <= n)
    }

    /// Whether the last answer for the tenant left room for a lease of `n`
    /// requests of `estimate` on every limit, [`LEASE_HEADROOM`] times over.
    pub(crate) fn room_for(&self, acct: &Account, n: u64, estimate: Amounts) -> bool {
        let Some((states, _)) = self.last_states.get(acct) else { return false };
        !states.is_empty()
            && states.iter().all(|st| {
                let need = estimate.of(st.kind.measure(), 1).saturating_mul(n);
                !st.over && st.remaining >= need.saturating_mul(LEASE_HEADROOM)
            })
    }

    /// Keeps `lease` as the account's; answers the one it replaces.
    pub(crate) fn grant(&mut self, acct: Account, lease: Lease) -> Option<Lease> {
        self.by_tenant.insert(acct, lease)
    }

    /// Takes the leases that expired by `now_ms` (all of them with `all`),
    /// for their unused quota to be given back.
    pub(crate) fn take(&mut self, now_ms: u64, all: bool) -> Vec<(Account, Lease)> {
        let done: Vec<Account> =
            self.by_tenant.iter().filter(|(_, l)| all || now_ms >= l.expires_ms).map(|(i, _)| i.clone()).collect();
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
    Amounts {
        tokens: a.tokens.saturating_mul(n),
        input: a.input.saturating_mul(n),
        output: a.output.saturating_mul(n),
        micros: a.micros.saturating_mul(n),
    }
}

/// The settle that gives back a lease's unused quota.
pub(crate) fn lease_refund(plugin: &Rc<Plugin>, lease: &Lease, now_ms: u64) -> Option<outbox::Entry> {
    let net = SettleNet::of_request(lease.amounts, Amounts::default(), (lease.requests, 0));
    Settle::new(plugin, &lease.tenant, lease.scope.as_ref(), net)
        .map(|s| outbox::Entry::settle(s, format!("{}:lease", lease.key), true, now_ms))
}
