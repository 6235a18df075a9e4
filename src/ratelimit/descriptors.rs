//! What does one limit look like to the rate-limit service? Limits at every
//! level (tenant, API key, end user, shared provider pool and a tier's share
//! of a pool), their kinds, measures and amounts, as RLS descriptors.
//!
//! One reserve call per request carries every limit of every level that
//! applies to it. The service decides all of them in one atomic step: if any
//! is over, nothing is charged. Token and dollar amounts are reserved from an
//! estimate (input from the body size, output from the request's max-output
//! field or the tier default) and settled to the metered usage afterwards:
//! see [`super::reserve`] and [`super::settle`].
//!
//! Descriptor shapes (the first entry is the service's hash tag, so a
//! tenant's levels share its Redis Cluster slot and a pool has its own):
//! - tenant: `tenant=<id>, limit=<kind>`
//! - API key: `tenant=<id>, key=<key id>, limit=<kind>`
//! - end user: `tenant=<id>, user=<user id>, limit=<kind>`
//! - provider pool: `pool=<name>, limit=<kind>`
//! - a tier's share of a pool: `pool=<name>, tier=<tier>, limit=<kind>`

use std::hash::{Hash, Hasher};
use std::rc::Rc;

use crate::config::Policy;
use crate::rls::{self, Descriptor, Entry, LimitOverride, Unit};

/// One limit a level may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    RequestsPerMinute,
    TokensPerMinute,
    InputTokensPerMinute,
    OutputTokensPerMinute,
    RequestsPerHour,
    TokensPerHour,
    RequestsPerDay,
    TokensPerDay,
    UsdPerDay,
    TokensPerWeek,
    UsdPerWeek,
    TokensPerMonth,
    UsdPerMonth,
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    Requests,
    /// Input and output tokens (cached reads weighted, see
    /// `cached_read_token_weight`).
    Tokens,
    InputTokens,
    OutputTokens,
    /// Micro-dollars.
    Micros,
}

/// The window a limit counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Window {
    Minute,
    Hour,
    Day,
    Week,
    Month,
}

/// Number of limit kinds.
pub const KINDS: usize = 13;

impl LimitKind {
    pub const ALL: [LimitKind; KINDS] = [
        LimitKind::RequestsPerMinute,
        LimitKind::TokensPerMinute,
        LimitKind::InputTokensPerMinute,
        LimitKind::OutputTokensPerMinute,
        LimitKind::RequestsPerHour,
        LimitKind::TokensPerHour,
        LimitKind::RequestsPerDay,
        LimitKind::TokensPerDay,
        LimitKind::UsdPerDay,
        LimitKind::TokensPerWeek,
        LimitKind::UsdPerWeek,
        LimitKind::TokensPerMonth,
        LimitKind::UsdPerMonth,
    ];

    /// Name in descriptors, metrics and configuration.
    pub fn name(self) -> &'static str {
        match self {
            LimitKind::RequestsPerMinute => "requests_per_minute",
            LimitKind::TokensPerMinute => "tokens_per_minute",
            LimitKind::InputTokensPerMinute => "input_tokens_per_minute",
            LimitKind::OutputTokensPerMinute => "output_tokens_per_minute",
            LimitKind::RequestsPerHour => "requests_per_hour",
            LimitKind::TokensPerHour => "tokens_per_hour",
            LimitKind::RequestsPerDay => "requests_per_day",
            LimitKind::TokensPerDay => "tokens_per_day",
            LimitKind::UsdPerDay => "usd_per_day",
            LimitKind::TokensPerWeek => "tokens_per_week",
            LimitKind::UsdPerWeek => "usd_per_week",
            LimitKind::TokensPerMonth => "tokens_per_month",
            LimitKind::UsdPerMonth => "usd_per_month",
        }
    }

    /// The refusal code of this limit at the tenant level; other levels
    /// prefix it (see [`Level::refusal_code`]).
    pub fn refusal_code(self) -> &'static str {
        match self {
            LimitKind::RequestsPerMinute | LimitKind::RequestsPerHour => "request_rate_limited",
            LimitKind::TokensPerMinute | LimitKind::TokensPerHour => "token_rate_limited",
            LimitKind::InputTokensPerMinute => "input_token_rate_limited",
            LimitKind::OutputTokensPerMinute => "output_token_rate_limited",
            LimitKind::RequestsPerDay => "daily_request_budget_exhausted",
            LimitKind::TokensPerDay => "daily_token_budget_exhausted",
            LimitKind::TokensPerWeek => "weekly_token_budget_exhausted",
            LimitKind::TokensPerMonth => "monthly_token_budget_exhausted",
            LimitKind::UsdPerDay => "daily_spend_budget_exhausted",
            LimitKind::UsdPerWeek => "weekly_spend_budget_exhausted",
            LimitKind::UsdPerMonth => "monthly_spend_budget_exhausted",
        }
    }

    pub fn window(self) -> Window {
        match self {
            LimitKind::RequestsPerMinute
            | LimitKind::TokensPerMinute
            | LimitKind::InputTokensPerMinute
            | LimitKind::OutputTokensPerMinute => Window::Minute,
            LimitKind::RequestsPerHour | LimitKind::TokensPerHour => Window::Hour,
            LimitKind::RequestsPerDay | LimitKind::TokensPerDay | LimitKind::UsdPerDay => Window::Day,
            LimitKind::TokensPerWeek | LimitKind::UsdPerWeek => Window::Week,
            LimitKind::TokensPerMonth | LimitKind::UsdPerMonth => Window::Month,
        }
    }

    /// The RLS unit of the limit override (weeks are days with a
    /// `tollgate.window` entry: RLS v3 requests have no week).
    pub fn unit(self) -> Unit {
        match self.window() {
            Window::Minute => Unit::Minute,
            Window::Hour => Unit::Hour,
            Window::Day | Window::Week => Unit::Day,
            Window::Month => Unit::Month,
        }
    }

    pub fn measure(self) -> Measure {
        match self {
            LimitKind::RequestsPerMinute | LimitKind::RequestsPerHour | LimitKind::RequestsPerDay => Measure::Requests,
            LimitKind::TokensPerMinute
            | LimitKind::TokensPerHour
            | LimitKind::TokensPerDay
            | LimitKind::TokensPerWeek
            | LimitKind::TokensPerMonth => Measure::Tokens,
            LimitKind::InputTokensPerMinute => Measure::InputTokens,
            LimitKind::OutputTokensPerMinute => Measure::OutputTokens,
            LimitKind::UsdPerDay | LimitKind::UsdPerWeek | LimitKind::UsdPerMonth => Measure::Micros,
        }
    }

    /// A budget (calendar window) rather than a rate: retrying soon cannot help.
    pub fn is_budget(self) -> bool {
        self.window() >= Window::Day
    }

    /// Whether a pool may have this limit: providers enforce rates, not
    /// budgets.
    pub fn is_rate(self) -> bool {
        !self.is_budget() && self.measure() != Measure::Micros
    }

    fn index(self) -> usize {
        self as usize
    }

    pub fn by_name(name: &str) -> Option<LimitKind> {
        LimitKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// One level's limits, by kind (a missing one is no limit).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    values: [Option<u64>; KINDS],
}

impl Limits {
    pub fn get(&self, kind: LimitKind) -> Option<u64> {
        self.values.get(kind.index()).copied().flatten()
    }

    pub fn set(&mut self, kind: LimitKind, v: Option<u64>) {
        if let Some(slot) = self.values.get_mut(kind.index()) {
            *slot = v;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.values.iter().all(Option::is_none)
    }

    /// The limits set, in descriptor order.
    pub fn iter(&self) -> impl Iterator<Item = (LimitKind, u64)> + '_ {
        LimitKind::ALL.into_iter().filter_map(|k| self.get(k).map(|l| (k, l)))
    }

    /// Each limit times `permille` / 1000, rounded down but at least 1 (a
    /// tier's share of a pool).
    pub fn share(&self, permille: u64) -> Limits {
        let mut out = Limits::default();
        for (k, l) in self.iter() {
            out.set(k, Some((l.saturating_mul(permille) / 1000).max(1)));
        }
        out
    }
}

/// Which level a limit belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Level {
    Tenant,
    Key,
    User,
    Pool,
    /// A tier's share of a pool.
    PoolShare,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Tenant => "tenant",
            Level::Key => "key",
            Level::User => "user",
            Level::Pool => "pool",
            Level::PoolShare => "pool_share",
        }
    }

    /// The refusal code a client sees when `kind` of this level is hit:
    /// `key_daily_spend_budget_exhausted`, `user_request_rate_limited`,
    /// `provider_pool_token_rate_limited`.
    pub fn refusal_code(self, kind: LimitKind) -> String {
        match self {
            Level::Tenant => kind.refusal_code().to_string(),
            Level::Key => format!("key_{}", kind.refusal_code()),
            Level::User => format!("user_{}", kind.refusal_code()),
            Level::Pool | Level::PoolShare => format!("provider_pool_{}", kind.refusal_code()),
        }
    }

    /// Whose limit it is, for messages.
    pub fn owner(self) -> &'static str {
        match self {
            Level::Tenant => "This account's",
            Level::Key => "This API key's",
            Level::User => "This end user's",
            Level::Pool => "The shared provider capacity's",
            Level::PoolShare => "This tier's share of the shared provider capacity's",
        }
    }
}

/// An API key's own limits (static `keys` entries and registry keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyScope {
    pub id: Rc<str>,
    pub limits: Rc<Limits>,
    pub shadow: bool,
}

/// A shared provider pool matched by a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolScope {
    pub name: Rc<str>,
    pub limits: Rc<Limits>,
    /// The tenant's tier and its share of the pool, if the pool gives it one.
    pub share: Option<(Rc<str>, Rc<Limits>)>,
}

/// Everything beyond the tenant that limits one request: its API key, its
/// end user and the provider pool it draws from. Requests with equal scopes
/// (and tenant) share leases and net their settles.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    pub key: Option<KeyScope>,
    /// The end user's id and the tier's per-user limits.
    pub user: Option<(Rc<str>, Rc<Limits>)>,
    pub pool: Option<PoolScope>,
}

impl Scope {
    pub fn is_empty(&self) -> bool {
        self.key.is_none() && self.user.is_none() && self.pool.is_none()
    }
}

impl Hash for Scope {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key.as_ref().map(|k| &k.id).hash(state);
        self.user.as_ref().map(|u| &u.0).hash(state);
        self.pool.as_ref().map(|p| &p.name).hash(state);
    }
}

/// One limit of one level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitItem {
    pub level: Level,
    pub kind: LimitKind,
    pub limit: u64,
}

/// Every limit of every level for a tenant under `policy` and `scope`, in
/// descriptor order: tenant, key, user, pool, pool share.
pub fn limit_items(policy: &Policy, scope: Option<&Scope>) -> Vec<LimitItem> {
    let mut out = Vec::new();
    let mut add = |level: Level, limits: &Limits| {
        out.extend(limits.iter().map(|(kind, limit)| LimitItem { level, kind, limit }));
    };
    add(Level::Tenant, &policy.limits);
    if let Some(s) = scope {
        if let Some(k) = &s.key {
            add(Level::Key, &k.limits);
        }
        if let Some((_, l)) = &s.user {
            add(Level::User, l);
        }
        if let Some(p) = &s.pool {
            add(Level::Pool, &p.limits);
            if let Some((_, l)) = &p.share {
                add(Level::PoolShare, l);
            }
        }
    }
    out
}

/// Whether any level limits a request of `policy` and `scope`.
pub fn has_limits(policy: &Policy, scope: Option<&Scope>) -> bool {
    !policy.limits.is_empty()
        || scope.is_some_and(|s| {
            s.key.as_ref().is_some_and(|k| !k.limits.is_empty())
                || s.user.as_ref().is_some_and(|u| !u.1.is_empty())
                || s.pool.is_some()
        })
}

/// Amounts of one request (or of a lease of several).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amounts {
    /// Input plus output tokens.
    pub tokens: u64,
    pub input: u64,
    pub output: u64,
    pub micros: u64,
}

impl Amounts {
    /// The amount of `measure` in these amounts (`requests` for requests).
    pub fn of(&self, measure: Measure, requests: u64) -> u64 {
        match measure {
            Measure::Requests => requests,
            Measure::Tokens => self.tokens,
            Measure::InputTokens => self.input,
            Measure::OutputTokens => self.output,
            Measure::Micros => self.micros,
        }
    }
}

/// The reserved entry naming a calendar week window on a DAY override.
pub use crate::rls::{KEY_WINDOW, WINDOW_WEEK};

pub(crate) fn descriptor(tenant: &str, scope: Option<&Scope>, item: LimitItem, policy: &Policy) -> Descriptor {
    let mut entries = Vec::with_capacity(4);
    let entry = |k: &str, v: &str| Entry { key: k.into(), value: v.into() };
    match (item.level, scope) {
        (Level::Key, Some(Scope { key: Some(k), .. })) => {
            entries.push(entry("tenant", tenant));
            entries.push(entry("key", &k.id));
        }
        (Level::User, Some(Scope { user: Some((u, _)), .. })) => {
            entries.push(entry("tenant", tenant));
            entries.push(entry("user", u));
        }
        (Level::Pool, Some(Scope { pool: Some(p), .. })) => entries.push(entry("pool", &p.name)),
        (Level::PoolShare, Some(Scope { pool: Some(p @ PoolScope { share: Some((tier, _)), .. }), .. })) => {
            entries.push(entry("pool", &p.name));
            entries.push(entry("tier", tier));
        }
        _ => entries.push(entry("tenant", tenant)),
    }
    entries.push(entry("limit", item.kind.name()));
    if item.limit > u64::from(u32::MAX) {
        entries.push(Entry { key: rls::KEY_LIMIT.into(), value: item.limit.to_string() });
    }
    if item.kind.is_budget() {
        if let Some(tz) = &policy.time_zone {
            entries.push(Entry { key: rls::KEY_TZ.into(), value: tz.clone() });
        }
        if item.kind.window() == Window::Month && policy.billing_anchor_day != 1 {
            entries.push(Entry { key: rls::KEY_ANCHOR_DAY.into(), value: policy.billing_anchor_day.to_string() });
        }
        if item.kind.window() == Window::Week {
            entries.push(Entry { key: KEY_WINDOW.into(), value: WINDOW_WEEK.into() });
        }
        if let Some(a) = &policy.alerts {
            entries.push(Entry { key: rls::KEY_ALERTS.into(), value: a.to_string() });
        }
    }
    Descriptor {
        entries,
        limit: Some(LimitOverride {
            requests_per_unit: u32::try_from(item.limit).unwrap_or(u32::MAX),
            unit: item.kind.unit() as i32,
        }),
        hits_addend: None,
        is_negative_hits: false,
    }
}

/// Remaining capacity reported for one limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitState {
    pub level: Level,
    pub kind: LimitKind,
    pub limit: u64,
    pub remaining: u64,
    pub reset_ms: u64,
    pub over: bool,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::tests::sample;

    /// acme's policy with a rate, a token rate, a month of tokens above
    /// `u32::MAX` and a month of dollars, in Berlin, billed from the 15th.
    pub(crate) fn policy() -> Policy {
        let mut p = Policy::clone(&sample().tenant_by_id("acme").unwrap().policy);
        p.limits = Limits::default();
        p.limits.set(LimitKind::RequestsPerMinute, Some(10));
        p.limits.set(LimitKind::TokensPerMinute, Some(1000));
        p.limits.set(LimitKind::TokensPerMonth, Some(5_000_000_000));
        p.limits.set(LimitKind::UsdPerMonth, Some(2_000_000));
        p.billing_anchor_day = 15;
        p.time_zone = Some("Europe/Berlin".into());
        p
    }

    fn lim(pairs: &[(LimitKind, u64)]) -> Rc<Limits> {
        let mut l = Limits::default();
        for (k, v) in pairs {
            l.set(*k, Some(*v));
        }
        Rc::new(l)
    }

    #[test]
    fn every_level_has_its_own_descriptor_shape_and_refusal_code() {
        let p = policy();
        let scope = Scope {
            key: Some(KeyScope { id: "ci".into(), limits: lim(&[(LimitKind::UsdPerDay, 5_000_000)]), shadow: false }),
            user: Some(("u-7".into(), lim(&[(LimitKind::RequestsPerMinute, 20)]))),
            pool: Some(PoolScope {
                name: "openai-gpt4o".into(),
                limits: lim(&[(LimitKind::InputTokensPerMinute, 30_000)]),
                share: Some(("free".into(), lim(&[(LimitKind::InputTokensPerMinute, 6_000)]))),
            }),
        };
        let items = limit_items(&p, Some(&scope));
        let levels: Vec<_> = items.iter().map(|i| i.level).collect();
        assert_eq!(
            levels,
            [
                Level::Tenant,
                Level::Tenant,
                Level::Tenant,
                Level::Tenant,
                Level::Key,
                Level::User,
                Level::Pool,
                Level::PoolShare
            ]
        );
        let shape = |i: usize| -> Vec<String> {
            descriptor("acme", Some(&scope), items[i], &p)
                .entries
                .iter()
                .map(|e| format!("{}={}", e.key, e.value))
                .collect()
        };
        assert_eq!(shape(0), ["tenant=acme", "limit=requests_per_minute"]);
        assert_eq!(
            shape(4),
            ["tenant=acme", "key=ci", "limit=usd_per_day", "tollgate.tz=Europe/Berlin", "tollgate.alerts=50,80,100"]
        );
        assert_eq!(shape(5), ["tenant=acme", "user=u-7", "limit=requests_per_minute"]);
        assert_eq!(shape(6), ["pool=openai-gpt4o", "limit=input_tokens_per_minute"]);
        assert_eq!(shape(7), ["pool=openai-gpt4o", "tier=free", "limit=input_tokens_per_minute"]);
        assert_eq!(Level::Key.refusal_code(LimitKind::UsdPerDay), "key_daily_spend_budget_exhausted");
        assert_eq!(Level::User.refusal_code(LimitKind::RequestsPerMinute), "user_request_rate_limited");
        assert_eq!(Level::Pool.refusal_code(LimitKind::TokensPerMinute), "provider_pool_token_rate_limited");
        assert_eq!(Level::Tenant.refusal_code(LimitKind::UsdPerMonth), "monthly_spend_budget_exhausted");
    }

    #[test]
    fn weeks_are_days_with_a_window_entry() {
        let mut p = policy();
        p.limits = Limits::default();
        let item = LimitItem { level: Level::Tenant, kind: LimitKind::UsdPerWeek, limit: 7 };
        let d = descriptor("acme", None, item, &p);
        assert_eq!(d.limit.unwrap().unit, Unit::Day as i32);
        assert!(d.entries.iter().any(|e| e.key == KEY_WINDOW && e.value == WINDOW_WEEK));
        assert!(LimitKind::UsdPerWeek.is_budget() && !LimitKind::UsdPerWeek.is_rate());
        assert!(LimitKind::RequestsPerHour.is_rate() && !LimitKind::RequestsPerHour.is_budget());
    }

    #[test]
    fn a_share_is_rounded_down_but_never_zero() {
        let l = lim(&[(LimitKind::RequestsPerMinute, 10), (LimitKind::TokensPerMinute, 1)]);
        let s = l.share(250);
        assert_eq!(s.get(LimitKind::RequestsPerMinute), Some(2));
        assert_eq!(s.get(LimitKind::TokensPerMinute), Some(1));
    }
}
