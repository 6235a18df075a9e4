//! Reading the ledger and the quota index back: usage reports by day, key,
//! model (and user), and every limit a tenant has with what is left of it.

use std::collections::BTreeMap;

use chrono::NaiveDate;
use chrono_tz::Tz;
use redis::Value;
use rls_contract::Unit;
use serde::Serialize;

use super::{day_key, day_number, format_day, quota_key, unescape, user_day_key, QuotaEntry, METRICS, REFUSAL_PREFIX};
use crate::calendar::{self, CalendarUnit};
use crate::keys;
use crate::response::counter_status;
use crate::storage::redis::RedisStorage;
use crate::storage::{Algorithm, Counter, CounterState, StorageError};

/// Most days one report covers.
pub const MAX_REPORT_DAYS: i64 = 366;
/// Tenants read at once by an all-tenant report.
const TENANT_CONCURRENCY: usize = 16;

/// Dimensions a report may group by (the tenant is always one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupBy {
    pub day: bool,
    pub model: bool,
    pub key: bool,
    pub user: bool,
}

impl GroupBy {
    /// `day,model,key,user` in any order, each at most once.
    pub fn parse(s: &str) -> Option<Self> {
        let mut g = GroupBy::default();
        for part in s.split(',') {
            let slot = match part {
                "day" => &mut g.day,
                "model" => &mut g.model,
                "key" => &mut g.key,
                "user" => &mut g.user,
                _ => return None,
            };
            if *slot {
                return None;
            }
            *slot = true;
        }
        Some(g)
    }

    pub fn names(&self) -> Vec<&'static str> {
        [("day", self.day), ("key", self.key), ("model", self.model), ("user", self.user)]
            .into_iter()
            .filter_map(|(n, on)| on.then_some(n))
            .collect()
    }
}

/// What to report.
#[derive(Debug, Clone)]
pub struct UsageQuery {
    pub domain: String,
    /// None: every tenant of the tenants index.
    pub tenant: Option<String>,
    pub key: Option<String>,
    pub user: Option<String>,
    pub model: Option<String>,
    pub from: NaiveDate,
    pub to: NaiveDate,
    pub group_by: GroupBy,
}

/// The counts of one group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub requests: u64,
    pub estimated_requests: u64,
    pub input_tokens: u64,
    pub cached_read_tokens: u64,
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    pub cost_micro_usd: u64,
    pub refusals: BTreeMap<String, u64>,
}

impl Totals {
    fn add_metric(&mut self, metric: &str, v: u64) {
        let slot = match metric {
            "rq" => &mut self.requests,
            "est" => &mut self.estimated_requests,
            "in" => &mut self.input_tokens,
            "cr" => &mut self.cached_read_tokens,
            "cw" => &mut self.cache_write_tokens,
            "out" => &mut self.output_tokens,
            "rs" => &mut self.reasoning_tokens,
            "usd" => &mut self.cost_micro_usd,
            m => match m.strip_prefix(REFUSAL_PREFIX) {
                Some(code) => self.refusals.entry(code.to_owned()).or_default(),
                None => return,
            },
        };
        *slot = slot.saturating_add(v);
    }

    pub fn add(&mut self, o: &Totals) {
        self.requests += o.requests;
        self.estimated_requests += o.estimated_requests;
        self.input_tokens += o.input_tokens;
        self.cached_read_tokens += o.cached_read_tokens;
        self.cache_write_tokens += o.cache_write_tokens;
        self.output_tokens += o.output_tokens;
        self.reasoning_tokens += o.reasoning_tokens;
        self.cost_micro_usd += o.cost_micro_usd;
        for (c, n) in &o.refusals {
            *self.refusals.entry(c.clone()).or_default() += n;
        }
    }
}

/// One row of a report: its group and counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageLine {
    pub tenant: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub day: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(flatten)]
    pub totals: Totals,
}

type GroupKey = (String, Option<String>, Option<String>, Option<String>, Option<String>);

fn fields(v: Value) -> Vec<(String, u64)> {
    let items = match v {
        Value::Array(items) => items,
        Value::Map(pairs) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => return vec![],
    };
    items
        .chunks_exact(2)
        .filter_map(|c| match c {
            [Value::BulkString(f), Value::BulkString(v)] => {
                Some((String::from_utf8(f.clone()).ok()?, std::str::from_utf8(v).ok()?.parse().ok()?))
            }
            _ => None,
        })
        .collect()
}

/// One tenant's usage, grouped.
async fn tenant_usage(
    storage: &RedisStorage,
    q: &UsageQuery,
    tenant: &str,
    into: &mut BTreeMap<GroupKey, Totals>,
) -> Result<(), StorageError> {
    let tag = keys::hash_tag(&q.domain, tenant);
    let per_user = q.group_by.user || q.user.is_some();
    let mut pipe = redis::pipe();
    let mut days = Vec::new();
    let mut d = q.from;
    while d <= q.to {
        let day = d.format("%Y-%m-%d").to_string();
        pipe.cmd("HGETALL").arg(if per_user { user_day_key(&tag, &day) } else { day_key(&tag, &day) });
        days.push(day);
        match d.succ_opt() {
            Some(n) => d = n,
            None => break,
        }
    }
    let replies = storage.query_pipeline(&pipe).await?;
    for (day, reply) in days.iter().zip(replies) {
        for (field, v) in fields(reply) {
            let mut parts: Vec<&str> = field.split('|').collect();
            let Some(metric) = parts.pop() else { continue };
            let (user, key, model) = match (per_user, parts.as_slice()) {
                (true, [u, k, m]) => (unescape(u), unescape(k), unescape(m)),
                (false, [k, m]) => (None, unescape(k), unescape(m)),
                _ => continue,
            };
            let (Some(key), Some(model)) = (key, model) else { continue };
            if q.key.as_ref().is_some_and(|want| *want != key)
                || q.model.as_ref().is_some_and(|want| *want != model)
                || q.user.as_ref().is_some_and(|want| Some(want) != user.as_ref())
            {
                continue;
            }
            let g = &q.group_by;
            let group = (
                tenant.to_owned(),
                g.day.then(|| day.clone()),
                g.key.then_some(key),
                g.model.then_some(model),
                if g.user { user } else { None },
            );
            into.entry(group).or_default().add_metric(metric, v);
        }
    }
    Ok(())
}

/// The tenants of the tenants index with usage on or after `from`.
pub async fn tenants(storage: &RedisStorage, domain: &str, from: NaiveDate) -> Result<Vec<String>, StorageError> {
    let mut cmd = redis::cmd("ZRANGE");
    cmd.arg(super::TENANTS_KEY).arg(day_number(from) - 1).arg("+inf").arg("BYSCORE");
    let prefix = format!("{}|", keys::escape(domain));
    let Value::Array(items) = storage.query(&cmd).await? else {
        return Err(StorageError::Reply("tenants: expected an array".into()));
    };
    let mut out: Vec<String> = items
        .iter()
        .filter_map(|v| match v {
            Value::BulkString(b) => std::str::from_utf8(b).ok()?.strip_prefix(&prefix).map(str::to_owned),
            _ => None,
        })
        .collect();
    out.sort();
    Ok(out)
}

/// A usage report: lines sorted by group, and the grand totals.
pub async fn usage(storage: &RedisStorage, q: &UsageQuery) -> Result<(Vec<UsageLine>, Totals), StorageError> {
    let tenants = match &q.tenant {
        Some(t) => vec![t.clone()],
        None => tenants(storage, &q.domain, q.from).await?,
    };
    let mut groups = BTreeMap::new();
    for chunk in tenants.chunks(TENANT_CONCURRENCY) {
        let parts = futures_util::future::join_all(chunk.iter().map(|t| async {
            let mut g = BTreeMap::new();
            tenant_usage(storage, q, t, &mut g).await.map(|()| g)
        }))
        .await;
        for p in parts {
            groups.extend(p?);
        }
    }
    let mut total = Totals::default();
    let lines = groups
        .into_iter()
        .map(|((tenant, day, key, model, user), totals)| {
            total.add(&totals);
            UsageLine { tenant, day, key, model, user, totals }
        })
        .collect();
    Ok((lines, total))
}

fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) || s.starts_with(['=', '+', '-', '@']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// A report as CSV: the grouped columns, then the counts; refusals as
/// `code:count` joined by `+`.
pub fn to_csv(group_by: &GroupBy, lines: &[UsageLine]) -> String {
    let mut head = vec!["tenant"];
    head.extend(group_by.names());
    head.extend(METRICS.iter().map(|(_, name)| *name));
    head.push("refusals");
    let mut out = head.join(",");
    out.push('\n');
    for l in lines {
        let mut cells = vec![csv_cell(&l.tenant)];
        for (on, v) in
            [(group_by.day, &l.day), (group_by.key, &l.key), (group_by.model, &l.model), (group_by.user, &l.user)]
        {
            if on {
                cells.push(csv_cell(v.as_deref().unwrap_or("")));
            }
        }
        let t = &l.totals;
        for v in [
            t.requests,
            t.estimated_requests,
            t.input_tokens,
            t.cached_read_tokens,
            t.cache_write_tokens,
            t.output_tokens,
            t.reasoning_tokens,
            t.cost_micro_usd,
        ] {
            cells.push(v.to_string());
        }
        let refusals: Vec<String> = t.refusals.iter().map(|(c, n)| format!("{c}:{n}")).collect();
        cells.push(csv_cell(&refusals.join("+")));
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

/// Which level a descriptor is: `user`, `key` or `tenant` (by its entries).
pub fn level_of(entries: &[(String, String)]) -> &'static str {
    if entries.iter().any(|(k, _)| k == "user") {
        "user"
    } else if entries.iter().any(|(k, _)| k == "key") {
        "key"
    } else {
        "tenant"
    }
}

/// One limit of a tenant, with what is left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QuotaLine {
    pub level: &'static str,
    /// The value of the descriptor's `limit` entry (e.g. `usd_per_month`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub descriptor: BTreeMap<String, String>,
    pub unit: &'static str,
    pub limit: u64,
    pub used: u64,
    pub remaining: u64,
    /// When the window renews (calendar) or the bucket is full again (rate), unix ms.
    pub reset_at_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_start_ms: Option<i64>,
}

fn parse_entries(field: &str) -> Option<Vec<(String, String)>> {
    let (_, rest) = field.split_once(':')?;
    rest.split('|')
        .map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((unescape(k)?, unescape(v)?))
        })
        .collect()
}

/// Every limit the service has decided for the tenant (within the quota
/// index's bounds), with usage now. Calendar entries whose window ended more
/// than a window ago are dropped from the index; rate entries stay until the
/// index expires (it lives as long as its longest window or period).
pub async fn quota(
    storage: &RedisStorage,
    domain: &str,
    tenant: &str,
    now_ms: i64,
) -> Result<Vec<QuotaLine>, StorageError> {
    let qk = quota_key(&keys::hash_tag(domain, tenant));
    let index = storage.query(redis::cmd("HGETALL").arg(&qk)).await?;
    let items = match index {
        Value::Array(items) => items,
        Value::Map(pairs) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => vec![],
    };
    let mut entries = Vec::new();
    for c in items.chunks_exact(2) {
        if let [Value::BulkString(f), Value::BulkString(v)] = c {
            let (Ok(f), Ok(v)) = (std::str::from_utf8(f), std::str::from_utf8(v)) else { continue };
            if let (Some(e), Some(d)) = (QuotaEntry::decode(v), parse_entries(f)) {
                entries.push((f.to_owned(), e, d));
            }
        }
    }
    if entries.is_empty() {
        return Ok(vec![]);
    }
    let mut pipe = redis::pipe();
    for (_, e, _) in &entries {
        pipe.cmd("GET").arg(&e.counter_key);
    }
    let values = storage.query_pipeline(&pipe).await?;
    let mut lines = Vec::new();
    let mut stale = Vec::new();
    for ((field, e, desc), v) in entries.into_iter().zip(values) {
        let raw = match v {
            Value::BulkString(b) => String::from_utf8(b).ok(),
            _ => None,
        };
        let (used_state, algorithm, window_start) = match (e.window, e.period_ms) {
            (Some((start, end)), _) if end > now_ms => {
                let used = raw.and_then(|r| r.parse::<f64>().ok()).unwrap_or(0.0) as u64;
                (used, Algorithm::Calendar { start_ms: start, end_ms: end }, Some(start))
            }
            (Some((start, end)), _) => {
                if now_ms - end > end - start {
                    stale.push(field.clone());
                }
                let Some(cu) = CalendarUnit::of(e.unit) else { continue };
                let tz = e.tz.parse::<Tz>().unwrap_or(Tz::UTC);
                let Ok(w) = calendar::window(cu, now_ms, tz, e.anchor_day) else { continue };
                (0, Algorithm::Calendar { start_ms: w.start_ms, end_ms: w.end_ms }, Some(w.start_ms))
            }
            (None, Some(period_ms)) => {
                // A bucket that drained has no key: the full limit is left.
                let r = raw.unwrap_or_default();
                let mut it = r.split(' ').map(|x| x.parse::<f64>().unwrap_or(0.0));
                let (level, t) = (it.next().unwrap_or(0.0), it.next().unwrap_or(now_ms as f64));
                let drained = (level - (now_ms as f64 - t).max(0.0) * e.limit as f64).max(0.0);
                (drained as u64, Algorithm::Gcra { period_ms }, None)
            }
            (None, None) => continue,
        };
        let counter = Counter {
            key: e.counter_key.clone(),
            hash_tag: String::new(),
            algorithm,
            limit: e.limit,
            hits: 0,
            refund: false,
        };
        let (remaining, reset_ms, _) =
            counter_status(&counter, &CounterState { fits: true, used: used_state }, false, now_ms);
        let used = match algorithm {
            Algorithm::Calendar { .. } => used_state,
            Algorithm::Gcra { .. } => e.limit.saturating_sub(remaining),
        };
        lines.push(QuotaLine {
            level: level_of(&desc),
            name: desc.iter().find(|(k, _)| k == "limit").map(|(_, v)| v.clone()),
            descriptor: desc.into_iter().collect(),
            unit: e.unit.name(),
            limit: e.limit,
            used,
            remaining,
            reset_at_ms: now_ms + i64::try_from(reset_ms).unwrap_or(i64::MAX / 2),
            window_start_ms: window_start,
        });
    }
    if !stale.is_empty() {
        let mut cmd = redis::cmd("HDEL");
        cmd.arg(&qk).arg(&stale);
        if let Err(e) = storage.query(&cmd).await {
            tracing::debug!(error = %e, "cannot trim the quota index");
        }
    }
    let rank = |l: &QuotaLine| (["tenant", "key", "user"].iter().position(|x| *x == l.level), Unit::parse_name(l.unit));
    lines.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.descriptor.cmp(&b.descriptor)));
    Ok(lines)
}

/// Format a day number for reports.
pub fn day_text(n: i64) -> String {
    format_day(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_by_and_csv() {
        let g = GroupBy::parse("model,day").unwrap();
        assert_eq!(g.names(), ["day", "model"]);
        assert!(GroupBy::parse("day,day").is_none());
        assert!(GroupBy::parse("tenant").is_none());
        assert!(GroupBy::parse("").is_none());
        let line = UsageLine {
            tenant: "acme".into(),
            day: Some("2026-12-04".into()),
            key: None,
            model: Some("=cmd,x".into()),
            user: None,
            totals: Totals { requests: 2, refusals: BTreeMap::from([("429".into(), 1)]), ..Totals::default() },
        };
        let csv = to_csv(&g, &[line]);
        assert_eq!(
            csv,
            "tenant,day,model,requests,estimated_requests,input_tokens,cached_read_tokens,cache_write_tokens,output_tokens,reasoning_tokens,cost_micro_usd,refusals\nacme,2026-12-04,\"=cmd,x\",2,0,0,0,0,0,0,0,429:1\n"
        );
        assert_eq!(
            parse_entries("M:tenant=a|limit=x%7Cy").unwrap(),
            vec![("tenant".into(), "a".into()), ("limit".into(), "x|y".into())]
        );
    }
}
