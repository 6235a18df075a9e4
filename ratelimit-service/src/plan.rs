//! Pure translation of a `RateLimitRequest` (plus gRPC metadata) into a
//! [`Plan`]: the counters to check and charge, in one batch for one Lua call
//! (on Redis Cluster, one per hash tag: `storage::slots`).
//!
//! Conventions (see README.md; the names and bounds are `rls-contract`'s):
//! - entries whose key starts with `tollgate.` are reserved parameters, not part of
//!   the counter key: `tollgate.limit` (decimal u64, the full limit),
//!   `tollgate.anchor_day` (1..=31), `tollgate.tz` (IANA zone) and
//!   `tollgate.window` (`week`: a DAY limit counted per calendar week);
//! - the limit comes from `tollgate.limit`, else the descriptor's `limit`
//!   override, else the static config; with none of them the descriptor is unlimited;
//! - hits: the descriptor's `hits_addend` if set (`Some(0)` = pure check), else
//!   the request's (`0` counts as 1); `is_negative_hits` refunds.

use chrono_tz::Tz;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;

use rls_contract::ledger::{UsageRow, META_USAGE};
use rls_contract::{
    is_reserved, is_valid_idempotency_key, parse_alert_thresholds, Mode, Unit, ANCHOR_DAYS, KEY_ALERTS, KEY_ANCHOR_DAY,
    KEY_LIMIT, KEY_TZ, KEY_WINDOW, MAX_DESCRIPTORS, MAX_EXACT, MAX_IDEMPOTENCY_KEY, META_IDEMPOTENCY_KEY, META_MODE,
    MODE_RESERVE, MODE_SETTLE, RESERVED_PREFIX, WINDOW_WEEK,
};

use crate::calendar::{self, CalendarUnit};
use crate::config::StaticLimits;
use crate::keys;
use crate::ledger::{self, KeyList, LedgerSettings};
use crate::storage::{Algorithm, Batch, Counter, CounterNote, Idempotency, LedgerWrite};

/// A GCRA period for the smooth units (SECOND, MINUTE, HOUR).
fn period_ms(unit: Unit) -> Option<u64> {
    match unit {
        Unit::Second => Some(1_000),
        Unit::Minute => Some(60_000),
        Unit::Hour => Some(3_600_000),
        Unit::Day | Unit::Month | Unit::Year => None,
    }
}

/// What the gRPC metadata of a request says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestMeta {
    pub mode: Mode,
    pub idempotency_key: Option<String>,
    /// Usage rows for the ledger (settles only; one tenant).
    pub usage: Vec<UsageRow>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("descriptor {index}: invalid {key} value {value:?}: {reason}")]
    InvalidReserved { index: usize, key: String, value: String, reason: &'static str },
    #[error(
        "descriptor {index}: unknown reserved entry {key:?} (keys starting with {RESERVED_PREFIX:?} are reserved)"
    )]
    UnknownReserved { index: usize, key: String },
    #[error("descriptor {index}: reserved entry {key:?} appears twice")]
    DuplicateReserved { index: usize, key: String },
    #[error("descriptor {index}: has no entries besides reserved ones")]
    NoEntries { index: usize },
    #[error("descriptor {index}: limit override has unit {unit}, expected SECOND..YEAR (1..=6)")]
    BadUnit { index: usize, unit: i32 },
    #[error("descriptor {index}: tollgate.limit needs a limit override that carries the unit")]
    LimitWithoutUnit { index: usize },
    #[error("descriptor {index}: tollgate.anchor_day and tollgate.tz apply to DAY, MONTH and YEAR limits only")]
    CalendarParamsOnRate { index: usize },
    #[error("descriptor {index}: {KEY_WINDOW}={WINDOW_WEEK} needs a DAY limit, got {unit}")]
    WeekNeedsDay { index: usize, unit: &'static str },
    #[error("descriptor {index}: {KEY_ANCHOR_DAY} does not apply to a {KEY_WINDOW}={WINDOW_WEEK} limit (weeks start on Monday)")]
    AnchorOnWeek { index: usize },
    #[error("descriptor {index}: hits_addend {hits} is above the maximum {MAX_EXACT}")]
    HitsTooLarge { index: usize, hits: u64 },
    #[error("{count} descriptors in one request, at most {MAX_DESCRIPTORS}")]
    TooManyDescriptors { count: usize },
    #[error("descriptor {index}: {reason}")]
    Calendar { index: usize, reason: String },
    #[error("invalid {META_MODE} metadata {0:?}: expected {MODE_SETTLE:?} or {MODE_RESERVE:?}")]
    BadMode(String),
    #[error("invalid {META_IDEMPOTENCY_KEY} metadata: must be 1..={MAX_IDEMPOTENCY_KEY} bytes of visible ASCII")]
    BadIdempotencyKey,
    #[error("descriptor {index}: tollgate.alerts applies to DAY, MONTH and YEAR limits only")]
    AlertsOnRate { index: usize },
    #[error("invalid {META_USAGE} metadata: {0}")]
    Usage(String),
    #[error("{META_USAGE} is only accepted with {META_MODE}: {MODE_SETTLE}")]
    UsageInReserve,
    #[error("{META_USAGE} needs {META_IDEMPOTENCY_KEY} (a retried settle must not count twice)")]
    UsageWithoutIdempotencyKey,
    #[error("{META_USAGE} rows belong to another tenant than the first descriptor (one tenant per settle)")]
    UsageTenant,
    #[error(transparent)]
    Row(#[from] ledger::RowError),
}

/// What the answer needs to know about a descriptor.
#[derive(Debug, Clone, PartialEq)]
pub enum DescriptorPlan {
    /// No override and no static limit: always OK.
    Unlimited,
    /// Decided by `batch.counters[counter]`. `week`: a DAY limit counted per
    /// calendar week (`tollgate.window=week`), answered with unit WEEK.
    Limited { counter: usize, unit: Unit, name: String, week: bool },
}

/// A request, ready for storage.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub descriptors: Vec<DescriptorPlan>,
    pub batch: Batch,
}

impl Plan {
    pub fn unlimited_count(&self) -> usize {
        self.descriptors.iter().filter(|d| matches!(d, DescriptorPlan::Unlimited)).count()
    }
}

/// Settings that shape plans.
#[derive(Debug, Clone, Copy)]
pub struct PlanSettings {
    /// How long a settle's idempotency key is remembered: longer than the
    /// filter retries a settle ([`rls_contract::IDEMPOTENCY_RETRY_HORIZON_MS`]).
    pub idempotency_ttl_ms: u64,
    /// How long a reservation's key is remembered: long enough for a caller
    /// to resolve a reserve whose answer it lost (the filter's horizon too),
    /// and no longer: a filter keys every reservation.
    pub reserve_idempotency_ttl_ms: u64,
    /// The ledger, quota index and alerts.
    pub ledger: LedgerSettings,
}

impl Default for PlanSettings {
    fn default() -> Self {
        Self {
            idempotency_ttl_ms: rls_contract::DEFAULT_IDEMPOTENCY_TTL_MS,
            reserve_idempotency_ttl_ms: rls_contract::DEFAULT_IDEMPOTENCY_TTL_MS,
            ledger: LedgerSettings::default(),
        }
    }
}

/// Parse the tollgate metadata values (already extracted from gRPC metadata).
pub fn parse_meta(mode: Option<&str>, idempotency_key: Option<&str>) -> Result<RequestMeta, PlanError> {
    let mode = match mode {
        None => Mode::Reserve,
        Some(m) => Mode::parse(m).ok_or_else(|| PlanError::BadMode(m.trim().to_owned()))?,
    };
    let idempotency_key = match idempotency_key {
        None => None,
        Some(k) if is_valid_idempotency_key(k) => Some(k.to_owned()),
        Some(_) => return Err(PlanError::BadIdempotencyKey),
    };
    Ok(RequestMeta { mode, idempotency_key, usage: Vec::new() })
}

/// Parse the usage metadata (see `rls_contract::ledger`).
pub fn parse_usage(value: Option<&str>) -> Result<Vec<UsageRow>, PlanError> {
    match value {
        None => Ok(Vec::new()),
        Some(v) => rls_contract::ledger::decode(v).map_err(|e| PlanError::Usage(e.to_string())),
    }
}

#[derive(Default)]
struct Reserved<'a> {
    limit: Option<u64>,
    anchor_day: Option<u32>,
    tz: Option<Tz>,
    week: bool,
    alerts: Option<Vec<u32>>,
    seen: Vec<&'a str>,
}

fn parse_reserved<'a>(index: usize, d: &'a RateLimitDescriptor) -> Result<Reserved<'a>, PlanError> {
    let mut r = Reserved::default();
    for e in d.entries.iter().filter(|e| is_reserved(&e.key)) {
        if r.seen.contains(&e.key.as_str()) {
            return Err(PlanError::DuplicateReserved { index, key: e.key.clone() });
        }
        r.seen.push(&e.key);
        let invalid = |reason| PlanError::InvalidReserved { index, key: e.key.clone(), value: e.value.clone(), reason };
        match e.key.as_str() {
            KEY_LIMIT => {
                r.limit = Some(e.value.parse::<u64>().map_err(|_| invalid("expected a decimal u64"))?);
            }
            KEY_ANCHOR_DAY => {
                let a = e.value.parse::<u32>().map_err(|_| invalid("expected a day of month 1..=31"))?;
                if !ANCHOR_DAYS.contains(&a) {
                    return Err(invalid("expected a day of month 1..=31"));
                }
                r.anchor_day = Some(a);
            }
            KEY_TZ => {
                r.tz = Some(e.value.parse::<Tz>().map_err(|_| invalid("expected an IANA time zone name"))?);
            }
            KEY_WINDOW => {
                if e.value != WINDOW_WEEK {
                    return Err(invalid("expected \"week\""));
                }
                r.week = true;
            }
            KEY_ALERTS => {
                r.alerts = Some(
                    parse_alert_thresholds(&e.value)
                        .ok_or_else(|| invalid("expected 1..=8 increasing percentages 1..=1000, e.g. 50,80,100"))?,
                );
            }
            _ => return Err(PlanError::UnknownReserved { index, key: e.key.clone() }),
        }
    }
    Ok(r)
}

/// Build the plan of a request. Pure: the clock reading comes in as `now_ms`.
pub fn build(
    req: &RateLimitRequest,
    meta: &RequestMeta,
    limits: &StaticLimits,
    settings: PlanSettings,
    now_ms: i64,
) -> Result<Plan, PlanError> {
    if req.descriptors.len() > MAX_DESCRIPTORS {
        return Err(PlanError::TooManyDescriptors { count: req.descriptors.len() });
    }
    let request_hits = u64::from(req.hits_addend.max(1));
    let mut descriptors = Vec::with_capacity(req.descriptors.len());
    let mut counters = Vec::new();
    let mut notes: Vec<CounterNote> = Vec::new();
    let indexing = settings.ledger.enabled;
    for (index, d) in req.descriptors.iter().enumerate() {
        let reserved = parse_reserved(index, d)?;
        let entries: Vec<(&str, &str)> =
            d.entries.iter().filter(|e| !is_reserved(&e.key)).map(|e| (e.key.as_str(), e.value.as_str())).collect();
        let Some(&(_, first_value)) = entries.first() else {
            return Err(PlanError::NoEntries { index });
        };

        // Where the limit comes from: tollgate.limit > override > static config.
        let (unit, limit, name, mut anchor, mut tz) = match (&d.limit, reserved.limit) {
            (Some(o), full) => {
                let unit = Unit::from_proto(o.unit).ok_or(PlanError::BadUnit { index, unit: o.unit })?;
                (unit, full.unwrap_or(u64::from(o.requests_per_unit)), String::new(), None, None)
            }
            (None, Some(_)) => return Err(PlanError::LimitWithoutUnit { index }),
            (None, None) => match limits.lookup(&req.domain, entries.iter().copied()) {
                Some(s) => (s.unit, s.limit, s.name.clone(), s.anchor_day, s.tz),
                None => {
                    descriptors.push(DescriptorPlan::Unlimited);
                    continue;
                }
            },
        };
        if reserved.anchor_day.is_some() {
            anchor = reserved.anchor_day;
        }
        if reserved.tz.is_some() {
            tz = reserved.tz;
        }
        if !unit.is_calendar() && (reserved.anchor_day.is_some() || reserved.tz.is_some()) {
            return Err(PlanError::CalendarParamsOnRate { index });
        }
        if reserved.week {
            if unit != Unit::Day {
                return Err(PlanError::WeekNeedsDay { index, unit: unit.name() });
            }
            if reserved.anchor_day.is_some() {
                return Err(PlanError::AnchorOnWeek { index });
            }
        }
        if !unit.is_calendar() && reserved.alerts.is_some() {
            return Err(PlanError::AlertsOnRate { index });
        }

        let hits = match &d.hits_addend {
            Some(h) => h.value,
            None => request_hits,
        };
        if hits > MAX_EXACT {
            return Err(PlanError::HitsTooLarge { index, hits });
        }

        let tag = keys::hash_tag(&req.domain, first_value);
        let calendar_unit = match CalendarUnit::of(unit) {
            Some(CalendarUnit::Day) if reserved.week => Some(CalendarUnit::Week),
            other => other,
        };
        let algorithm = match (period_ms(unit), calendar_unit) {
            (Some(period_ms), _) => Algorithm::Gcra { period_ms },
            (None, Some(cu)) => {
                let w = calendar::window(cu, now_ms, tz.unwrap_or(Tz::UTC), anchor.unwrap_or(1))
                    .map_err(|e| PlanError::Calendar { index, reason: e.to_string() })?;
                Algorithm::Calendar { start_ms: w.start_ms, end_ms: w.end_ms }
            }
            (None, None) => return Err(PlanError::BadUnit { index, unit: unit as i32 }),
        };
        let window = match algorithm {
            Algorithm::Calendar { start_ms, .. } => Some(start_ms),
            Algorithm::Gcra { .. } => None,
        };
        // A week has a tag of its own: its window starts at a day's start, so
        // with the day's tag a week and a Monday would share a key.
        let unit_tag = if reserved.week { keys::WEEK_TAG } else { keys::unit_tag(unit) };
        let key = keys::counter_key(&tag, unit_tag, window, &entries);
        let limit = limit.min(MAX_EXACT);
        if indexing {
            let charged = hits > 0 && !d.is_negative_hits;
            let index = match algorithm {
                Algorithm::Calendar { start_ms, .. } => {
                    format!("{}|{start_ms}|{}|{}", unit_tag, tz.unwrap_or(Tz::UTC).name(), anchor.unwrap_or(1))
                }
                Algorithm::Gcra { .. } => format!("{}|-|-|-", unit_tag),
            };
            let alerts = reserved
                .alerts
                .iter()
                .flatten()
                .map(|p| {
                    let t = (u128::from(limit) * u128::from(*p)).div_ceil(100);
                    (*p, u64::try_from(t).unwrap_or(MAX_EXACT).min(MAX_EXACT))
                })
                .collect();
            // Alerts ride on every applied decision (only a charge can cross
            // a threshold); the index entry only on charges.
            notes.push(CounterNote { index: if charged { index } else { String::new() }, alerts });
        }
        counters.push(Counter { key, hash_tag: tag, algorithm, limit, hits, refund: d.is_negative_hits });
        descriptors.push(DescriptorPlan::Limited { counter: counters.len() - 1, unit, name, week: reserved.week });
    }

    if !meta.usage.is_empty() {
        if meta.mode != Mode::Settle {
            return Err(PlanError::UsageInReserve);
        }
        if meta.idempotency_key.is_none() {
            return Err(PlanError::UsageWithoutIdempotencyKey);
        }
    }
    let usage_tag = meta.usage.first().map(|r| keys::hash_tag(&req.domain, &r.tenant));
    if let (Some(tag), Some(first)) = (&usage_tag, counters.first()) {
        if *tag != first.hash_tag {
            return Err(PlanError::UsageTenant);
        }
    }
    let ledger = match counters.first().map(|c| c.hash_tag.clone()).or(usage_tag) {
        Some(tag)
            if indexing
                && (!meta.usage.is_empty() || notes.iter().any(|n| !n.index.is_empty() || !n.alerts.is_empty())) =>
        {
            let mut keys = KeyList::default();
            let quota = keys.add(ledger::quota_key(&tag));
            let alert_stream = notes
                .iter()
                .any(|n| !n.alerts.is_empty())
                .then(|| (keys.add(ledger::alert_stream_key(&tag)), settings.ledger.alert_stream_max_len));
            let ops = ledger::plan_rows(
                &tag,
                &meta.usage,
                &settings.ledger,
                now_ms,
                meta.idempotency_key.as_deref().unwrap_or(""),
                &mut keys,
            )?;
            Some(LedgerWrite {
                hash_tag: tag,
                keys: keys.0,
                quota_index: Some((quota, settings.ledger.quota_index_cap)),
                alert_stream,
                notes,
                ops,
            })
        }
        _ => None,
    };
    let tag = counters.first().map(|c| c.hash_tag.as_str()).or(ledger.as_ref().map(|l| l.hash_tag.as_str()));
    let idempotency = match (&meta.idempotency_key, tag) {
        (Some(k), Some(first)) => Some(Idempotency::new(
            first,
            meta.mode,
            k,
            match meta.mode {
                Mode::Reserve => settings.reserve_idempotency_ttl_ms,
                Mode::Settle => settings.idempotency_ttl_ms,
            }
            .max(1),
        )),
        _ => None,
    };
    Ok(Plan { descriptors, batch: Batch { now_ms, settle: meta.mode == Mode::Settle, counters, idempotency, ledger } })
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{Entry, RateLimitOverride};
    use envoy_types::pb::google::protobuf::UInt64Value;

    fn desc(entries: &[(&str, &str)], limit: Option<(u32, i32)>) -> RateLimitDescriptor {
        RateLimitDescriptor {
            entries: entries.iter().map(|(k, v)| Entry { key: (*k).into(), value: (*v).into() }).collect(),
            limit: limit.map(|(r, u)| RateLimitOverride { requests_per_unit: r, unit: u }),
            hits_addend: None,
            is_negative_hits: false,
        }
    }

    fn req(ds: Vec<RateLimitDescriptor>, hits: u32) -> RateLimitRequest {
        RateLimitRequest { domain: "tollgate".into(), descriptors: ds, hits_addend: hits }
    }

    const S: PlanSettings = PlanSettings {
        idempotency_ttl_ms: 1000,
        reserve_idempotency_ttl_ms: 1000,
        ledger: LedgerSettings {
            enabled: true,
            retention_days: 400,
            usage_stream_max_len: 0,
            quota_index_cap: 256,
            alert_stream_max_len: 100,
        },
    };

    #[test]
    fn reserved_entries_are_parameters() {
        let r = req(
            vec![desc(
                &[
                    ("tenant", "acme"),
                    (KEY_LIMIT, "5000000000"),
                    ("budget", "usd"),
                    (KEY_TZ, "Europe/Paris"),
                    (KEY_ANCHOR_DAY, "15"),
                ],
                Some((u32::MAX, 5)),
            )],
            0,
        );
        let p = build(&r, &RequestMeta::default(), &StaticLimits::default(), S, 1_700_000_000_000).unwrap();
        let c = &p.batch.counters[0];
        assert_eq!(c.limit, 5_000_000_000);
        assert_eq!(c.hits, 1);
        assert!(c.key.starts_with("tg:{tollgate|acme}:M:"));
        assert!(c.key.ends_with(":tenant=acme|budget=usd"), "{}", c.key);
        assert!(!c.key.contains("tollgate.limit"));
    }

    #[test]
    fn hits_precedence() {
        let mut d0 = desc(&[("tenant", "a")], Some((10, 1)));
        d0.hits_addend = Some(UInt64Value { value: 0 });
        let mut d1 = desc(&[("tenant", "a")], Some((10, 2)));
        d1.hits_addend = Some(UInt64Value { value: 7 });
        d1.is_negative_hits = true;
        let d2 = desc(&[("tenant", "a")], Some((10, 3)));
        let p =
            build(&req(vec![d0.clone(), d1, d2.clone()], 3), &RequestMeta::default(), &StaticLimits::default(), S, 0)
                .unwrap();
        let hits: Vec<_> = p.batch.counters.iter().map(|c| (c.hits, c.refund)).collect();
        assert_eq!(hits, vec![(0, false), (7, true), (3, false)]);
        let p = build(&req(vec![d2], 0), &RequestMeta::default(), &StaticLimits::default(), S, 0).unwrap();
        assert_eq!(p.batch.counters[0].hits, 1);
    }

    #[test]
    fn unlimited_and_static() {
        let limits = StaticLimits::parse(
            "domains: [{domain: tollgate, descriptors: [{key: generic_key, value: per_tenant_rpm, rate_limit: {unit: minute, requests_per_unit: 5}}]}]",
        )
        .unwrap();
        let r = req(vec![desc(&[("generic_key", "per_tenant_rpm")], None), desc(&[("x", "y")], None)], 1);
        let p = build(&r, &RequestMeta::default(), &limits, S, 0).unwrap();
        assert_eq!(p.batch.counters.len(), 1);
        assert_eq!(p.batch.counters[0].limit, 5);
        assert_eq!(p.descriptors[1], DescriptorPlan::Unlimited);
        assert_eq!(p.unlimited_count(), 1);
    }

    #[test]
    fn invalid_reserved_values() {
        for (k, v, lim) in [
            (KEY_LIMIT, "-1", Some((1, 4))),
            (KEY_LIMIT, "1e9", Some((1, 4))),
            (KEY_LIMIT, "5", None),
            (KEY_ANCHOR_DAY, "0", Some((1, 5))),
            (KEY_ANCHOR_DAY, "32", Some((1, 5))),
            (KEY_TZ, "Mars/Olympus", Some((1, 4))),
            (KEY_TZ, "UTC", Some((1, 2))),
            ("tollgate.bogus", "1", Some((1, 4))),
        ] {
            let r = req(vec![desc(&[("tenant", "a"), (k, v)], lim)], 1);
            assert!(build(&r, &RequestMeta::default(), &StaticLimits::default(), S, 0).is_err(), "{k}={v}");
        }
        let r = req(vec![desc(&[(KEY_LIMIT, "5")], Some((1, 1)))], 1);
        assert_eq!(
            build(&r, &RequestMeta::default(), &StaticLimits::default(), S, 0),
            Err(PlanError::NoEntries { index: 0 })
        );
        let r = req(vec![desc(&[("t", "a")], Some((1, 0)))], 1);
        assert!(matches!(
            build(&r, &RequestMeta::default(), &StaticLimits::default(), S, 0),
            Err(PlanError::BadUnit { .. })
        ));
    }

    #[test]
    fn weekly_window_on_a_day_limit() {
        let now = chrono::DateTime::parse_from_rfc3339("2025-01-01T12:00:00Z").unwrap().timestamp_millis();
        let monday = chrono::DateTime::parse_from_rfc3339("2024-12-30T00:00:00-05:00").unwrap().timestamp_millis();
        let week = desc(
            &[
                ("tenant", "acme"),
                ("limit", "tokens_per_week"),
                (KEY_WINDOW, WINDOW_WEEK),
                (KEY_TZ, "America/New_York"),
            ],
            Some((1000, Unit::Day as i32)),
        );
        let day = desc(&[("tenant", "acme"), ("limit", "tokens_per_week")], Some((1000, Unit::Day as i32)));
        let p = build(&req(vec![week, day], 1), &RequestMeta::default(), &StaticLimits::default(), S, now).unwrap();
        let c = &p.batch.counters[0];
        assert_eq!(c.key, format!("tg:{{tollgate|acme}}:W:{monday}:tenant=acme|limit=tokens_per_week"));
        let Algorithm::Calendar { start_ms, end_ms } = c.algorithm else { panic!("calendar") };
        assert_eq!((start_ms, end_ms - start_ms), (monday, 7 * 86_400_000));
        assert!(matches!(p.descriptors[0], DescriptorPlan::Limited { week: true, unit: Unit::Day, .. }));
        // the same entries as a DAY limit are another counter
        assert!(p.batch.counters[1].key.starts_with("tg:{tollgate|acme}:D:"));
        assert!(matches!(p.descriptors[1], DescriptorPlan::Limited { week: false, .. }));
    }

    #[test]
    fn weekly_window_misuse_is_refused() {
        let build1 = |entries: &[(&str, &str)], unit: i32| {
            let r = req(vec![desc(entries, Some((10, unit)))], 1);
            build(&r, &RequestMeta::default(), &StaticLimits::default(), S, 0)
        };
        for unit in [Unit::Second, Unit::Minute, Unit::Hour, Unit::Month, Unit::Year] {
            assert_eq!(
                build1(&[("tenant", "a"), (KEY_WINDOW, WINDOW_WEEK)], unit as i32),
                Err(PlanError::WeekNeedsDay { index: 0, unit: unit.name() }),
                "{unit:?}"
            );
        }
        assert_eq!(
            build1(&[("tenant", "a"), (KEY_WINDOW, WINDOW_WEEK)], Unit::Minute as i32).unwrap_err().to_string(),
            "descriptor 0: tollgate.window=week needs a DAY limit, got minute"
        );
        assert_eq!(
            build1(&[("tenant", "a"), (KEY_WINDOW, WINDOW_WEEK), (KEY_ANCHOR_DAY, "3")], Unit::Day as i32),
            Err(PlanError::AnchorOnWeek { index: 0 })
        );
        for bad in ["Week", "fortnight", "", "7"] {
            assert!(
                matches!(
                    build1(&[("tenant", "a"), (KEY_WINDOW, bad)], Unit::Day as i32),
                    Err(PlanError::InvalidReserved { .. })
                ),
                "{bad:?}"
            );
        }
        assert_eq!(
            build1(&[("tenant", "a"), (KEY_WINDOW, WINDOW_WEEK), (KEY_WINDOW, WINDOW_WEEK)], Unit::Day as i32),
            Err(PlanError::DuplicateReserved { index: 0, key: KEY_WINDOW.into() })
        );
        // a static DAY limit may be counted per week by the request
        let limits = StaticLimits::parse(
            "domains: [{domain: tollgate, descriptors: [{key: tenant, rate_limit: {unit: day, requests_per_unit: 5}}]}]",
        )
        .unwrap();
        let r = req(vec![desc(&[("tenant", "a"), (KEY_WINDOW, WINDOW_WEEK)], None)], 1);
        let p = build(&r, &RequestMeta::default(), &limits, S, 0).unwrap();
        assert!(p.batch.counters[0].key.starts_with("tg:{tollgate|a}:W:"));
    }

    #[test]
    fn metadata() {
        assert_eq!(parse_meta(Some("settle"), None).unwrap().mode, Mode::Settle);
        assert_eq!(parse_meta(None, None).unwrap().mode, Mode::Reserve);
        assert!(parse_meta(Some("yolo"), None).is_err());
        assert!(parse_meta(None, Some("")).is_err());
        assert!(parse_meta(None, Some("has space")).is_err());
        assert_eq!(parse_meta(None, Some("req-1")).unwrap().idempotency_key.as_deref(), Some("req-1"));
        assert_eq!(
            parse_meta(Some(" yolo "), None).unwrap_err().to_string(),
            "invalid x-tollgate-mode metadata \"yolo\": expected \"settle\" or \"reserve\""
        );
        assert_eq!(
            PlanError::UnknownReserved { index: 0, key: "tollgate.x".into() }.to_string(),
            "descriptor 0: unknown reserved entry \"tollgate.x\" (keys starting with \"tollgate.\" are reserved)"
        );
    }

    #[test]
    fn idempotency_key_shares_the_slot_and_mode() {
        let r = req(vec![desc(&[("tenant", "acme")], Some((10, 4)))], 1);
        let m = RequestMeta { mode: Mode::Settle, idempotency_key: Some("r1".into()), usage: vec![] };
        let p = build(&r, &m, &StaticLimits::default(), S, 0).unwrap();
        let i = p.batch.idempotency.unwrap();
        assert_eq!(i.key, "tg:{tollgate|acme}:i:s:gvPpxpXca40bEYGNVwGRng");
        assert_eq!(i.legacy_key, "tg:{tollgate|acme}:idem:settle:r1");
        assert!(p.batch.settle);
    }

    #[test]
    fn each_mode_has_its_own_key_ttl() {
        let d = PlanSettings::default();
        assert_eq!((d.reserve_idempotency_ttl_ms, d.idempotency_ttl_ms), (900_000, 900_000));
        let r = req(vec![desc(&[("tenant", "acme")], Some((10, 4)))], 1);
        let s = PlanSettings { idempotency_ttl_ms: 86_400_000, reserve_idempotency_ttl_ms: 900_000, ..S };
        let reserve = RequestMeta { mode: Mode::Reserve, idempotency_key: Some("r1".into()), usage: vec![] };
        let settle = RequestMeta { mode: Mode::Settle, idempotency_key: Some("r1".into()), usage: vec![] };
        let ttl =
            |m: &RequestMeta| build(&r, m, &StaticLimits::default(), s, 0).unwrap().batch.idempotency.unwrap().ttl_ms;
        assert_eq!((ttl(&reserve), ttl(&settle)), (900_000, 86_400_000));
    }
}
