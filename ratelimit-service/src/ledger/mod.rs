//! What did each tenant use, and what has it left? The usage ledger, the
//! quota index and budget alerts.
//!
//! Everything a decision writes here rides in the decision's own Lua call
//! ([`crate::scripts::DECIDE`], ledger section), only when the batch is
//! applied and is not an idempotent replay: a retried settle never counts
//! twice. Every key carries the tenant's hash tag `{<domain>|<tenant>}`, so
//! it works on Redis Cluster, and every key expires.
//!
//! Redis layout (`<tag>` = `{<domain>|<tenant>}`, `<day>` = `YYYY-MM-DD` in the
//! row's time zone):
//!
//! ```text
//! tg:<tag>:led:<day>     hash  <key>|<model>|<metric> → count          (tenant × key × model × day)
//! tg:<tag>:ledu:<day>    hash  <user>|<key>|<model>|<metric> → count   (the same per end user)
//! tg:<tag>:led:days      zset  <day> scored by its day number (days since 1970-01-01) *
//! tg:<tag>:usage         stream, one entry per usage row (--usage-stream-max-len > 0)
//! tg:<tag>:quota         hash  <unit>:<entries> → the counter's limit and window
//! tg:<tag>:alerts        stream of thresholds crossed (the atomic record)
//! <counter key>:alert:<percent>   "taken" marker, expires with the window
//! tg:{tollgate-ledger}:tenants    zset <domain>|<tenant> scored by the last day with usage *
//! ```
//!
//! `*`: indexes, written right after the decision (once per tenant and day
//! per process, [`observer`]), not in the script: they are not counts, so
//! writing them twice is harmless, and reports do not depend on them for one
//! tenant (day keys are computed from the dates).
//!
//! `<key>`, `<user>` and `<model>` are escaped with [`crate::keys::escape`] (an
//! absent key or user is empty); metrics are [`METRICS`] plus `rf.<code>`
//! (refusals by code). Day hashes expire `retention + 2` days after the day,
//! so a late row for an old day cannot keep it alive; rows older than the
//! retention are not recorded.

pub mod alerts;
pub mod api;
pub mod observer;
pub mod read;

use std::collections::BTreeMap;

use chrono::{Datelike as _, NaiveDate, TimeZone as _};
use chrono_tz::Tz;
use rls_contract::ledger::UsageRow;

use crate::keys::{self, escape};
use crate::storage::{KeyRef, LedgerOp};

/// One day, in milliseconds.
pub const DAY_MS: i64 = 86_400_000;

/// The global index of tenants with usage (its own slot).
pub const TENANTS_KEY: &str = "tg:{tollgate-ledger}:tenants";

/// Ledger metrics, as stored and as named in reports.
pub const METRICS: [(&str, &str); 8] = [
    ("rq", "requests"),
    ("est", "estimated_requests"),
    ("in", "input_tokens"),
    ("cr", "cached_read_tokens"),
    ("cw", "cache_write_tokens"),
    ("out", "output_tokens"),
    ("rs", "reasoning_tokens"),
    ("usd", "cost_micro_usd"),
];

/// Prefix of the refusal metrics (`rf.429`).
pub const REFUSAL_PREFIX: &str = "rf.";

/// What the ledger records and keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerSettings {
    /// Record usage rows, the quota index and alerts. Off: rows are still
    /// checked, then ignored.
    pub enabled: bool,
    /// Days a day's aggregates are kept.
    pub retention_days: u64,
    /// Approximate bound of each tenant's usage stream; 0: no stream.
    pub usage_stream_max_len: u64,
    /// Most entries of a tenant's quota index.
    pub quota_index_cap: u64,
    /// Approximate bound of each tenant's alert stream.
    pub alert_stream_max_len: u64,
}

impl Default for LedgerSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            retention_days: 400,
            usage_stream_max_len: 0,
            quota_index_cap: 256,
            alert_stream_max_len: 10_000,
        }
    }
}

pub fn day_key(tag: &str, day: &str) -> String {
    format!("tg:{tag}:led:{day}")
}

pub fn user_day_key(tag: &str, day: &str) -> String {
    format!("tg:{tag}:ledu:{day}")
}

pub fn days_key(tag: &str) -> String {
    format!("tg:{tag}:led:days")
}

pub fn usage_stream_key(tag: &str) -> String {
    format!("tg:{tag}:usage")
}

pub fn quota_key(tag: &str) -> String {
    format!("tg:{tag}:quota")
}

pub fn alert_stream_key(tag: &str) -> String {
    format!("tg:{tag}:alerts")
}

/// The member of [`TENANTS_KEY`] for a tenant.
pub fn tenant_member(domain: &str, tenant: &str) -> String {
    format!("{}|{}", escape(domain), tenant)
}

/// The day number (days since 1970-01-01) of a date.
pub fn day_number(d: NaiveDate) -> i64 {
    i64::from(d.num_days_from_ce()) - 719_163
}

/// The date of a day number.
pub fn day_of_number(n: i64) -> Option<NaiveDate> {
    NaiveDate::from_num_days_from_ce_opt(i32::try_from(n + 719_163).ok()?)
}

/// The calendar day of `ms` in `tz`.
pub fn local_day(ms: i64, tz: Tz) -> Option<NaiveDate> {
    tz.timestamp_millis_opt(ms).single().map(|t| t.date_naive())
}

/// Undo [`crate::keys::escape`].
pub fn unescape(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let h = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Why usage rows cannot be recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowError {
    #[error("x-tollgate-usage row {0}: unknown time zone")]
    TimeZone(usize),
    #[error("x-tollgate-usage row {0}: finish time out of range")]
    Time(usize),
}

/// Keys of one ledger write, deduplicated, in first-use order.
#[derive(Debug, Default)]
pub struct KeyList(pub Vec<String>);

impl KeyList {
    pub fn add(&mut self, key: String) -> KeyRef {
        if let Some(i) = self.0.iter().position(|k| *k == key) {
            return i;
        }
        self.0.push(key);
        self.0.len() - 1
    }
}

fn metric_pairs(r: &UsageRow, prefix: &str, into: &mut BTreeMap<String, u64>) {
    let values = [
        r.requests,
        r.estimated_requests,
        r.input_tokens,
        r.cached_read_tokens,
        r.cache_write_tokens,
        r.output_tokens,
        r.reasoning_tokens,
        r.cost_micro_usd,
    ];
    for ((m, _), v) in METRICS.iter().zip(values) {
        if v > 0 {
            *into.entry(format!("{prefix}{m}")).or_default() += v;
        }
    }
    for (code, n) in &r.refusals {
        *into.entry(format!("{prefix}{REFUSAL_PREFIX}{code}")).or_default() += n;
    }
}

/// Plan the writes of usage rows (one tenant's, already checked): pure.
/// Rows older than the retention are left out.
pub fn plan_rows(
    tag: &str,
    rows: &[UsageRow],
    settings: &LedgerSettings,
    now_ms: i64,
    idempotency_key: &str,
    keys: &mut KeyList,
) -> Result<Vec<LedgerOp>, RowError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let retention = i64::try_from(settings.retention_days).unwrap_or(i64::MAX / DAY_MS).min(100_000);
    let today = now_ms.div_euclid(DAY_MS);
    let mut tenant_days: BTreeMap<(i64, String), BTreeMap<String, u64>> = BTreeMap::new();
    let mut user_days: BTreeMap<(i64, String), BTreeMap<String, u64>> = BTreeMap::new();
    let mut streams = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let tz = match &r.time_zone {
            Some(name) => name.parse::<Tz>().map_err(|_| RowError::TimeZone(i))?,
            None => Tz::UTC,
        };
        let at = i64::try_from(r.finished_at_ms).map_err(|_| RowError::Time(i))?;
        let date = local_day(at, tz).ok_or(RowError::Time(i))?;
        let n = day_number(date);
        if n + retention + 2 <= today {
            continue;
        }
        let day = date.format("%Y-%m-%d").to_string();
        let key = escape(r.api_key.as_deref().unwrap_or(""));
        let model = escape(&r.model);
        metric_pairs(r, &format!("{key}|{model}|"), tenant_days.entry((n, day.clone())).or_default());
        if let Some(user) = &r.user {
            metric_pairs(
                r,
                &format!("{}|{key}|{model}|", escape(user)),
                user_days.entry((n, day.clone())).or_default(),
            );
        }
        if settings.usage_stream_max_len > 0 {
            streams.push(stream_fields(r, &day, idempotency_key));
        }
    }
    let ttl = |n: i64| u64::try_from((n + retention + 2) * DAY_MS - now_ms).unwrap_or(1).max(1);
    // The days index (tg:<tag>:led:days) is written after the decision,
    // once per tenant and day per process (ledger::observer): it is not a
    // count, so it needs no idempotency.
    let mut ops = Vec::new();
    for ((n, day), pairs) in tenant_days {
        ops.push(LedgerOp::HashIncr {
            key: keys.add(day_key(tag, &day)),
            ttl_ms: ttl(n),
            pairs: pairs.into_iter().collect(),
        });
    }
    for ((n, day), pairs) in user_days {
        ops.push(LedgerOp::HashIncr {
            key: keys.add(user_day_key(tag, &day)),
            ttl_ms: ttl(n),
            pairs: pairs.into_iter().collect(),
        });
    }
    if !streams.is_empty() {
        let key = keys.add(usage_stream_key(tag));
        for fields in streams {
            ops.push(LedgerOp::StreamAdd {
                key,
                ttl_ms: u64::try_from((retention + 2) * DAY_MS).unwrap_or(u64::MAX),
                max_len: settings.usage_stream_max_len,
                fields,
            });
        }
    }
    Ok(ops)
}

/// Version of the usage stream entries.
pub const USAGE_STREAM_VERSION: &str = "1";

/// One usage stream entry (documented in README.md, "Usage event stream").
fn stream_fields(r: &UsageRow, day: &str, idempotency_key: &str) -> Vec<(String, String)> {
    let refusals: Vec<String> = r.refusals.iter().map(|(c, n)| format!("{c}:{n}")).collect();
    [
        ("v", USAGE_STREAM_VERSION.to_owned()),
        ("tenant", r.tenant.clone()),
        ("day", day.to_owned()),
        ("tz", r.time_zone.clone().unwrap_or_default()),
        ("finished_at_ms", r.finished_at_ms.to_string()),
        ("key", r.api_key.clone().unwrap_or_default()),
        ("user", r.user.clone().unwrap_or_default()),
        ("model", r.model.clone()),
        ("requests", r.requests.to_string()),
        ("refusals", refusals.join("+")),
        ("input_tokens", r.input_tokens.to_string()),
        ("cached_read_tokens", r.cached_read_tokens.to_string()),
        ("cache_write_tokens", r.cache_write_tokens.to_string()),
        ("output_tokens", r.output_tokens.to_string()),
        ("reasoning_tokens", r.reasoning_tokens.to_string()),
        ("cost_micro_usd", r.cost_micro_usd.to_string()),
        ("estimated_requests", r.estimated_requests.to_string()),
        ("settle", idempotency_key.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The quota index field of a counter: `<unit letter>:<k=v|k=v>` (its key
/// without the tag and window), stable across windows.
pub fn quota_field(unit_tag: &str, entries: &[(&str, &str)]) -> String {
    let key = keys::counter_key("", unit_tag, None, entries);
    key.strip_prefix("tg::").unwrap_or(&key).to_owned()
}

/// What the quota index remembers of a counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaEntry {
    pub unit: rls_contract::Unit,
    pub limit: u64,
    /// Calendar window `[start, end)`; GCRA: the period.
    pub window: Option<(i64, i64)>,
    pub period_ms: Option<u64>,
    pub tz: String,
    pub anchor_day: u32,
    pub counter_key: String,
}

impl QuotaEntry {
    /// `1|<unit letter>|<limit>|<start>|<end>|<period>|<tz>|<anchor>|<counter key>`
    /// (`-` for none), as the decision script writes it.
    pub fn encode(&self) -> String {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
        format!(
            "1|{}|{}|{}|{}|{}|{}|{}|{}",
            keys::unit_tag(self.unit),
            self.limit,
            opt(self.window.map(|w| w.0.to_string())),
            opt(self.window.map(|w| w.1.to_string())),
            opt(self.period_ms.map(|p| p.to_string())),
            self.tz,
            self.anchor_day,
            self.counter_key,
        )
    }

    /// Parse a quota index value (written by the decision script).
    pub fn decode(s: &str) -> Option<Self> {
        let parts: Vec<&str> = s.splitn(9, '|').collect();
        let ["1", unit, limit, start, end, period, tz, anchor, key] = parts.as_slice() else {
            return None;
        };
        let window = match (start.parse::<i64>(), end.parse::<i64>()) {
            (Ok(s), Ok(e)) => Some((s, e)),
            _ => None,
        };
        Some(Self {
            unit: rls_contract::Unit::ALL.into_iter().find(|u| keys::unit_tag(*u) == *unit)?,
            limit: limit.parse().ok()?,
            window,
            period_ms: period.parse().ok(),
            tz: (*tz).to_owned(),
            anchor_day: anchor.parse().unwrap_or(1),
            counter_key: (*key).to_owned(),
        })
    }
}

/// The calendar date of a day number, `YYYY-MM-DD`.
pub fn format_day(n: i64) -> String {
    day_of_number(n).map(|d| d.format("%Y-%m-%d").to_string()).unwrap_or_default()
}

/// Parse `YYYY-MM-DD`.
pub fn parse_day(s: &str) -> Option<NaiveDate> {
    if s.len() != 10 {
        return None;
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d").ok().filter(|d| d.year() >= 1970)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(at: u64, tz: Option<&str>) -> UsageRow {
        UsageRow {
            tenant: "acme".into(),
            time_zone: tz.map(str::to_owned),
            finished_at_ms: at,
            api_key: Some("k1".into()),
            user: Some("u|1".into()),
            model: "gpt-4o".into(),
            requests: 2,
            refusals: BTreeMap::from([("429".into(), 1)]),
            input_tokens: 10,
            output_tokens: 5,
            cost_micro_usd: 7,
            ..UsageRow::default()
        }
    }

    #[test]
    fn rows_land_on_the_day_of_their_time_zone() {
        // 2026-12-04T03:00Z is still Dec 3 in New York.
        let at = 1_796_353_200_000u64;
        let mut keys = KeyList::default();
        let s = LedgerSettings::default();
        let ops =
            plan_rows("{d|acme}", &[row(at, Some("America/New_York")), row(at, None)], &s, at as i64, "s1", &mut keys)
                .unwrap();
        assert!(keys.0.contains(&"tg:{d|acme}:led:2026-12-03".to_owned()), "{:?}", keys.0);
        assert!(keys.0.contains(&"tg:{d|acme}:led:2026-12-04".to_owned()));
        assert!(keys.0.contains(&"tg:{d|acme}:ledu:2026-12-04".to_owned()));
        let LedgerOp::HashIncr { pairs, ttl_ms, .. } = &ops[0] else { panic!("{ops:?}") };
        assert!(pairs.contains(&("k1|gpt-4o|rq".to_owned(), 2)), "{pairs:?}");
        assert!(pairs.contains(&("k1|gpt-4o|rf.429".to_owned(), 1)));
        assert!(!pairs.iter().any(|(f, _)| f.ends_with("|cr")), "zeros are not written");
        assert!(*ttl_ms > 400 * DAY_MS as u64 && *ttl_ms < 403 * DAY_MS as u64);
        assert!(ops.iter().any(
            |o| matches!(o, LedgerOp::HashIncr { pairs, .. } if pairs.iter().any(|(f, _)| f == "u%7C1|k1|gpt-4o|usd"))
        ));
        // too old: dropped
        let mut keys = KeyList::default();
        let ops = plan_rows("{d|acme}", &[row(1_000, None)], &s, at as i64, "s1", &mut keys).unwrap();
        assert!(ops.is_empty());
        assert!(plan_rows("{d|acme}", &[row(at, Some("Mars/Base"))], &s, 0, "s", &mut KeyList::default()).is_err());
    }

    #[test]
    fn quota_entries_round_trip() {
        let e = QuotaEntry {
            unit: rls_contract::Unit::Month,
            limit: 5_000_000,
            window: Some((1, 2)),
            period_ms: None,
            tz: "Europe/Paris".into(),
            anchor_day: 15,
            counter_key: "tg:{d|a}:M:1:tenant=a|limit=usd".into(),
        };
        assert_eq!(QuotaEntry::decode(&e.encode()), Some(e));
        assert_eq!(quota_field("M", &[("tenant", "a"), ("limit", "x|y")]), "M:tenant=a|limit=x%7Cy");
        assert_eq!(unescape("x%7Cy%25").as_deref(), Some("x|y%"));
        assert_eq!(format_day(day_number(parse_day("2026-02-28").unwrap())), "2026-02-28");
        assert_eq!(day_number(parse_day("1970-01-02").unwrap()), 1);
    }
}
