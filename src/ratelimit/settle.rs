//! What does a tenant owe or get back once its requests are done? The
//! settle: what was used less what was reserved, netted per tenant and kept
//! typed until it is sent.

use std::rc::Rc;

use hashbrown::HashMap;

use crate::config::{Plugin, Policy, TenantRef};
use crate::ratelimit::descriptors::{descriptor, limit_items, Amounts, Measure, Scope};
use crate::ratelimit::outbox::{Entry, Journal};
use crate::rls::ledger::{self, UsageRow};
use crate::rls::{RateLimitRequest, UInt64Value};

/// The settle call: the difference between what was reserved and what was
/// used, per limit: requests (`(reserved, used)`: `(0, 1)` charges a request
/// that was not reserved, `(n + 1, 1)` gives back an unused lease of `n`),
/// tokens and dollars. `None` when there is nothing to change.
pub fn build_settle(
    domain: &str,
    tenant: &str,
    policy: &Policy,
    reserved: Amounts,
    actual: Amounts,
    requests: (u64, u64),
) -> Option<RateLimitRequest> {
    build_settle_net(domain, tenant, policy, None, SettleNet::of_request(reserved, actual, requests))
}

/// What settles add to each measure (actual less reserved; negative gives
/// back). Settles are linear, so the settle of a sum of nets is the sum of
/// their settles: one request can carry many requests' settles.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SettleNet {
    pub requests: i128,
    pub tokens: i128,
    pub input: i128,
    pub output: i128,
    pub micros: i128,
}

impl SettleNet {
    /// One request's: `reserved` was charged for `requests.0` requests,
    /// `actual` was used by `requests.1`.
    pub fn of_request(reserved: Amounts, actual: Amounts, requests: (u64, u64)) -> Self {
        let d = |from: u64, to: u64| i128::from(to) - i128::from(from);
        SettleNet {
            requests: d(requests.0, requests.1),
            tokens: d(reserved.tokens, actual.tokens),
            input: d(reserved.input, actual.input),
            output: d(reserved.output, actual.output),
            micros: d(reserved.micros, actual.micros),
        }
    }

    pub fn add(&mut self, other: SettleNet) {
        self.requests = self.requests.saturating_add(other.requests);
        self.tokens = self.tokens.saturating_add(other.tokens);
        self.input = self.input.saturating_add(other.input);
        self.output = self.output.saturating_add(other.output);
        self.micros = self.micros.saturating_add(other.micros);
    }

    /// What it moves of `measure`.
    pub fn of(&self, measure: Measure) -> i128 {
        match measure {
            Measure::Requests => self.requests,
            Measure::Tokens => self.tokens,
            Measure::InputTokens => self.input,
            Measure::OutputTokens => self.output,
            Measure::Micros => self.micros,
        }
    }
}

/// The settle request of `net` at every level of `scope`, `None` when it
/// changes nothing.
pub fn build_settle_net(
    domain: &str,
    tenant: &str,
    policy: &Policy,
    scope: Option<&Scope>,
    net: SettleNet,
) -> Option<RateLimitRequest> {
    let mut descriptors = Vec::new();
    for item in limit_items(policy, scope) {
        let n = net.of(item.kind.measure());
        if n == 0 {
            continue;
        }
        let mut d = descriptor(tenant, scope, item, policy);
        d.is_negative_hits = n < 0;
        d.hits_addend = Some(UInt64Value { value: u64::try_from(n.unsigned_abs()).unwrap_or(u64::MAX) });
        descriptors.push(d);
    }
    (!descriptors.is_empty()).then(|| RateLimitRequest { domain: domain.into(), descriptors, hits_addend: 0 })
}

/// Whether a settle of `net` changes anything under `policy` and `scope`:
/// some limit counts a measure the net moves (else [`build_settle_net`] is
/// `None`).
pub fn settle_changes(policy: &Policy, scope: Option<&Scope>, net: SettleNet) -> bool {
    limit_items(policy, scope).iter().any(|i| net.of(i.kind.measure()) != 0)
}

/// What one tenant owes or gets back, under the configuration it was
/// incurred under.
#[derive(Debug, Clone)]
pub struct Settle {
    pub plugin: Rc<Plugin>,
    pub tenant: TenantRef,
    /// The key, user and pool levels of the requests settled.
    pub scope: Option<Rc<Scope>>,
    pub net: SettleNet,
    /// Usage rows for the ledger (`x-tollgate-usage`, encoded); a settle
    /// with rows is never merged with another (its rows were netted already).
    pub usage: Option<String>,
}

impl Settle {
    /// `None` when it changes nothing: no limit of the tenant or its scope
    /// counts what it nets.
    pub fn new(plugin: &Rc<Plugin>, tenant: &TenantRef, scope: Option<&Rc<Scope>>, net: SettleNet) -> Option<Settle> {
        let t = tenant.get(plugin)?;
        (plugin.rate_limit.is_some() && settle_changes(&t.policy, scope.map(|s| &**s), net)).then(|| Settle {
            plugin: Rc::clone(plugin),
            tenant: tenant.clone(),
            scope: scope.cloned(),
            net,
            usage: None,
        })
    }

    /// A settle of `net` (which may change nothing) carrying usage rows.
    pub fn with_usage(
        plugin: &Rc<Plugin>,
        tenant: &TenantRef,
        scope: Option<&Rc<Scope>>,
        net: SettleNet,
        usage: String,
    ) -> Option<Settle> {
        plugin.rate_limit.as_ref()?;
        Some(Settle {
            plugin: Rc::clone(plugin),
            tenant: tenant.clone(),
            scope: scope.cloned(),
            net,
            usage: Some(usage),
        })
    }

    /// The `RateLimitRequest` of this settle (`None`: it changes nothing).
    pub fn request(&self) -> Option<RateLimitRequest> {
        let rl = self.plugin.rate_limit.as_ref()?;
        let tenant = self.tenant.get(&self.plugin)?;
        build_settle_net(&rl.domain, &tenant.id, &tenant.policy, self.scope.as_deref(), self.net).or_else(|| {
            // A ledger-only settle: rows, no descriptor.
            self.usage.as_ref().map(|_| RateLimitRequest {
                domain: rl.domain.clone(),
                descriptors: vec![],
                hits_addend: 0,
            })
        })
    }

    /// Whether this settle's first descriptor is one of its tenant's
    /// (`tenant=<id>`, first entry): usage rows may ride it.
    pub(crate) fn starts_with_tenant(&self) -> bool {
        let Some(tenant) = self.tenant.get(&self.plugin) else { return false };
        self.request().is_none_or(|r| {
            r.descriptors
                .first()
                .is_none_or(|d| d.entries.first().is_some_and(|e| e.key == "tenant" && e.value == tenant.id))
        })
    }

    /// Whether `other` settles the same tenant and scope under the same
    /// configuration (same domain and limits), so the two may be netted.
    pub(crate) fn same_account(&self, other: &Settle) -> bool {
        Rc::ptr_eq(&self.plugin, &other.plugin) && self.tenant.same(&other.tenant) && self.scope == other.scope
    }
}

impl PartialEq for Settle {
    fn eq(&self, other: &Settle) -> bool {
        self.same_account(other) && self.net == other.net && self.usage == other.usage
    }
}

impl Eq for Settle {}

/// One tenant's netted settles (see [`SettleNets`]).
#[derive(Debug)]
pub(crate) struct PendingNet {
    /// The configuration the settles were made under, and the tenant.
    pub(crate) plugin: Rc<Plugin>,
    pub(crate) tenant: TenantRef,
    pub(crate) scope: Option<Rc<Scope>>,
    pub(crate) net: SettleNet,
    /// Usage rows for the ledger, one per key, user, model and minute.
    pub(crate) rows: Vec<UsageRow>,
    /// The first settle's idempotency key, and how many were netted.
    pub(crate) first_key: String,
    pub(crate) count: usize,
    pub(crate) first_ms: u64,
}

/// Settles of finished requests not yet in the journal, netted per tenant
/// (in order of first use); [`SettleNets::queue`] turns each into one journal
/// entry, once per tick.
#[derive(Debug, Default)]
pub struct SettleNets {
    nets: Vec<PendingNet>,
    /// Index into `nets` by tenant id and scope.
    of_tenant: HashMap<(String, Option<Rc<Scope>>), usize>,
}

impl SettleNets {
    /// Adds one request's settle to its tenant's net. `key` makes the
    /// idempotency key of the first one. A settle made under another
    /// configuration of the same tenant first queues what is netted into
    /// `journal`: it is its own settle.
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &mut self,
        journal: &mut Journal,
        plugin: &Rc<Plugin>,
        tref: &TenantRef,
        scope: Option<&Rc<Scope>>,
        net: SettleNet,
        row: Option<UsageRow>,
        key: impl FnOnce() -> String,
        now_ms: u64,
    ) {
        let Some(tenant) = tref.get(plugin) else { return };
        let at = (tenant.id.clone(), scope.cloned());
        if let Some(p) = self.of_tenant.get(&at).and_then(|&i| self.nets.get_mut(i)) {
            if Rc::ptr_eq(&p.plugin, plugin) && p.tenant.same(tref) {
                p.net.add(net);
                p.count += 1;
                if let Some(r) = row {
                    add_row(&mut p.rows, r);
                }
                return;
            }
            // Another configuration of the same tenant: its own settle.
            self.queue(journal);
        }
        self.of_tenant.insert(at, self.nets.len());
        self.nets.push(PendingNet {
            plugin: Rc::clone(plugin),
            tenant: tref.clone(),
            scope: scope.cloned(),
            net,
            rows: row.into_iter().collect(),
            first_key: key(),
            count: 1,
            first_ms: now_ms,
        });
    }

    /// Puts the netted settles in `journal`, one typed entry per tenant
    /// (key: the first settle's, `+<count>` when several were netted; the
    /// same keys [`crate::ratelimit::outbox::merge`] gives). Returns how many
    /// were dropped from a full journal.
    pub fn queue(&mut self, journal: &mut Journal) -> u64 {
        self.of_tenant.clear();
        let mut dropped = 0;
        for p in std::mem::take(&mut self.nets) {
            let key = if p.count == 1 { p.first_key } else { format!("{}+{}", p.first_key, p.count) };
            // The rows, in values that fit the metadata bounds: the first
            // rides with the net's settle, the others go on their own.
            let chunks = if p.rows.is_empty() {
                Vec::new()
            } else {
                ledger::encode_chunks(&p.rows).unwrap_or_else(|e| {
                    log::warn!("tollgate: usage rows not sent to the ledger: {e}");
                    Vec::new()
                })
            };
            let mut chunks = chunks.into_iter().peekable();
            let plain = Settle::new(&p.plugin, &p.tenant, p.scope.as_ref(), p.net);
            // Rows ride a settle whose first descriptor is the tenant's (the
            // service writes them in that slot); a settle that moves only a
            // pool's counters goes without them.
            let settle = match (plain, chunks.peek()) {
                (Some(s), Some(_)) if !s.starts_with_tenant() => Some(s),
                (_, Some(_)) => chunks
                    .next()
                    .and_then(|first| Settle::with_usage(&p.plugin, &p.tenant, p.scope.as_ref(), p.net, first)),
                (plain, None) => plain,
            };
            if let Some(settle) = settle {
                dropped += journal.push(Entry::settle(settle, key.clone(), true, p.first_ms));
            }
            for (i, more) in chunks.enumerate() {
                let extra = Settle::with_usage(&p.plugin, &p.tenant, None, SettleNet::default(), more);
                if let Some(s) = extra {
                    dropped += journal.push(Entry::settle(s, format!("{key}:u{}", i + 2), true, p.first_ms));
                }
            }
        }
        if dropped > 0 {
            log::warn!("tollgate: settle journal full; dropped {dropped} settles");
        }
        dropped
    }

    /// Tenants with settles netted and not yet queued.
    pub fn len(&self) -> usize {
        self.nets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }
}

/// Adds `row` to the row of the same key, user, model and minute (so days
/// in any time zone stay apart), or appends it.
fn add_row(rows: &mut Vec<UsageRow>, row: UsageRow) {
    let minute = |r: &UsageRow| r.finished_at_ms / 60_000;
    let same = |r: &&mut UsageRow| {
        r.api_key == row.api_key && r.user == row.user && r.model == row.model && minute(r) == minute(&row)
    };
    match rows.iter_mut().find(|r| same(r)) {
        Some(r) => {
            r.requests = r.requests.saturating_add(row.requests);
            for (code, n) in row.refusals {
                let c = r.refusals.entry(code).or_insert(0);
                *c = c.saturating_add(n);
            }
            r.input_tokens = r.input_tokens.saturating_add(row.input_tokens);
            r.cached_read_tokens = r.cached_read_tokens.saturating_add(row.cached_read_tokens);
            r.cache_write_tokens = r.cache_write_tokens.saturating_add(row.cache_write_tokens);
            r.output_tokens = r.output_tokens.saturating_add(row.output_tokens);
            r.reasoning_tokens = r.reasoning_tokens.saturating_add(row.reasoning_tokens);
            r.cost_micro_usd = r.cost_micro_usd.saturating_add(row.cost_micro_usd);
            r.estimated_requests = r.estimated_requests.saturating_add(row.estimated_requests);
        }
        None => rows.push(row),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::descriptors::tests::policy;

    #[test]
    fn settle_refunds_and_adds() {
        let p = policy();
        let req = build_settle(
            "d",
            "acme",
            &p,
            Amounts { tokens: 300, micros: 4500, ..Amounts::default() },
            Amounts { tokens: 120, micros: 5000, ..Amounts::default() },
            (1, 1),
        )
        .unwrap();
        assert_eq!(req.descriptors.len(), 3);
        assert!(req.descriptors[0].is_negative_hits);
        assert_eq!(req.descriptors[0].hits_addend.as_ref().unwrap().value, 180);
        assert!(!req.descriptors[2].is_negative_hits);
        assert_eq!(req.descriptors[2].hits_addend.as_ref().unwrap().value, 500);
        assert!(build_settle(
            "d",
            "acme",
            &p,
            Amounts { tokens: 1, micros: 1, ..Amounts::default() },
            Amounts { tokens: 1, micros: 1, ..Amounts::default() },
            (1, 1)
        )
        .is_none());
    }
}
