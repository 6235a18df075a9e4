//! Static limits for callers that send no `limit` override (Envoy's native
//! `envoy.filters.http.ratelimit` filter, for one).
//!
//! The file is YAML (JSON is valid YAML too) and mirrors the envoyproxy/ratelimit
//! descriptor tree, with all domains in one file:
//!
//! ```yaml
//! domains:
//!   - domain: tollgate_native
//!     descriptors:
//!       - key: generic_key
//!         value: per_tenant_rpm
//!         rate_limit: { unit: minute, requests_per_unit: 60 }
//!       - key: tenant            # no value: matches any value
//!         descriptors:
//!           - key: budget
//!             value: daily_tokens
//!             rate_limit: { unit: day, requests_per_unit: 1000000, time_zone: Europe/Paris }
//! ```
//!
//! Parsing has two steps: serde checks the shape (unknown fields are errors), then
//! [`StaticLimits::compile`] checks meaning (units, anchors, zones, duplicates).

use std::collections::HashMap;
use std::path::Path;

use chrono_tz::Tz;
use serde::Deserialize;

use rls_contract::{is_reserved, Unit, ANCHOR_DAYS, RESERVED_PREFIX};

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// One entry per RLS domain.
    #[serde(default)]
    pub domains: Vec<DomainConfig>,
}

/// The limits of one domain (the `domain` field of `RateLimitRequest`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainConfig {
    /// The domain name; must be unique in the file.
    pub domain: String,
    /// The descriptor tree: the first entry of a request descriptor matches at this level.
    #[serde(default)]
    pub descriptors: Vec<DescriptorConfig>,
}

/// One node of the descriptor tree.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescriptorConfig {
    /// The entry key to match.
    pub key: String,
    /// The entry value to match; absent = any value (an exact value wins over this).
    #[serde(default)]
    pub value: Option<String>,
    /// The limit applied when a request descriptor's last entry matches this node.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// Nested nodes, matched by the next entry.
    #[serde(default)]
    pub descriptors: Vec<DescriptorConfig>,
}

/// A limit.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// second, minute, hour (smooth GCRA rates) or day, month, year (calendar windows).
    pub unit: String,
    /// The limit per unit. A u64: static limits are not bound to the uint32 of the protocol.
    pub requests_per_unit: u64,
    /// Reported as `current_limit.name` in the answer.
    #[serde(default)]
    pub name: Option<String>,
    /// Calendar units only: day of month the period renews, 1..=31 (default 1).
    #[serde(default)]
    pub anchor_day: Option<u32>,
    /// Calendar units only: IANA time zone of the windows (default UTC).
    #[serde(default)]
    pub time_zone: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read limits file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("limits file {path} is not valid: {source}")]
    Parse { path: String, source: serde_yaml::Error },
    #[error("domain {0:?} appears twice")]
    DuplicateDomain(String),
    #[error("domain {domain:?}, descriptor {path}: {reason}")]
    Invalid { domain: String, path: String, reason: String },
}

/// A compiled static limit.
#[derive(Debug, Clone, PartialEq)]
pub struct StaticLimit {
    pub unit: Unit,
    pub limit: u64,
    pub name: String,
    pub anchor_day: Option<u32>,
    pub tz: Option<Tz>,
}

#[derive(Debug, Default)]
struct Node {
    exact: HashMap<(String, String), Node>,
    any: HashMap<String, Node>,
    limit: Option<StaticLimit>,
}

/// All static limits, ready for matching.
#[derive(Debug, Default)]
pub struct StaticLimits {
    domains: HashMap<String, Node>,
}

impl StaticLimits {
    /// Read and compile a limits file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse { path: path.display().to_string(), source },
            other => other,
        })
    }

    /// Parse and compile limits from YAML or JSON text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let file: LimitsFile =
            serde_yaml::from_str(text).map_err(|source| ConfigError::Parse { path: "<text>".into(), source })?;
        Self::compile(file)
    }

    /// Check the meaning of a parsed file.
    pub fn compile(file: LimitsFile) -> Result<Self, ConfigError> {
        let mut domains = HashMap::new();
        for d in file.domains {
            let mut root = Node::default();
            compile_level(&d.domain, "", &d.descriptors, &mut root)?;
            if domains.insert(d.domain.clone(), root).is_some() {
                return Err(ConfigError::DuplicateDomain(d.domain));
            }
        }
        Ok(Self { domains })
    }

    /// The limit for a descriptor's (non-reserved) entries, if the tree has one.
    /// Every entry must match a level; the limit is the one on the last matched node.
    pub fn lookup<'a, I>(&self, domain: &str, entries: I) -> Option<&StaticLimit>
    where
        I: IntoIterator<Item = (&'a str, &'a str)>,
    {
        let mut node = self.domains.get(domain)?;
        for (k, v) in entries {
            node = node.exact.get(&(k.to_owned(), v.to_owned())).or_else(|| node.any.get(k))?;
        }
        node.limit.as_ref()
    }

    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }
}

fn compile_level(
    domain: &str,
    parent: &str,
    descriptors: &[DescriptorConfig],
    node: &mut Node,
) -> Result<(), ConfigError> {
    for d in descriptors {
        let path = match &d.value {
            Some(v) => format!("{parent}/{}={v}", d.key),
            None => format!("{parent}/{}", d.key),
        };
        let invalid = |reason: String| ConfigError::Invalid { domain: domain.to_owned(), path: path.clone(), reason };
        if is_reserved(&d.key) {
            return Err(invalid(format!("keys starting with {RESERVED_PREFIX:?} are reserved")));
        }
        let mut child = Node::default();
        if let Some(rl) = &d.rate_limit {
            child.limit = Some(compile_limit(rl).map_err(invalid)?);
        }
        compile_level(domain, &path, &d.descriptors, &mut child)?;
        let duplicate = match &d.value {
            Some(v) => node.exact.insert((d.key.clone(), v.clone()), child).is_some(),
            None => node.any.insert(d.key.clone(), child).is_some(),
        };
        if duplicate {
            return Err(invalid("appears twice at this level".into()));
        }
    }
    Ok(())
}

fn compile_limit(rl: &RateLimitConfig) -> Result<StaticLimit, String> {
    let unit = Unit::parse_name(&rl.unit)
        .ok_or_else(|| format!("unknown unit {:?} ({})", rl.unit, Unit::ALL.map(Unit::name).join(", ")))?;
    if let Some(a) = rl.anchor_day {
        if !ANCHOR_DAYS.contains(&a) {
            return Err(format!("anchor_day {a} is not in 1..=31"));
        }
    }
    let tz = match &rl.time_zone {
        Some(name) => Some(name.parse::<Tz>().map_err(|_| format!("unknown time zone {name:?}"))?),
        None => None,
    };
    if !unit.is_calendar() && (rl.anchor_day.is_some() || tz.is_some()) {
        return Err("anchor_day and time_zone apply to day, month and year only".into());
    }
    Ok(StaticLimit {
        unit,
        limit: rl.requests_per_unit,
        name: rl.name.clone().unwrap_or_default(),
        anchor_day: rl.anchor_day,
        tz,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
domains:
  - domain: tollgate_native
    descriptors:
      - key: generic_key
        value: per_tenant_rpm
        rate_limit: { unit: minute, requests_per_unit: 60, name: rpm }
      - key: tenant
        descriptors:
          - key: budget
            value: daily
            rate_limit: { unit: DAY, requests_per_unit: 5000000000, time_zone: Europe/Paris, anchor_day: 3 }
      - key: tenant
        value: vip
        rate_limit: { unit: second, requests_per_unit: 1000 }
"#;

    #[test]
    fn matches_exact_then_any() {
        let l = StaticLimits::parse(YAML).unwrap();
        let rpm = l.lookup("tollgate_native", [("generic_key", "per_tenant_rpm")]).unwrap();
        assert_eq!((rpm.unit, rpm.limit, rpm.name.as_str()), (Unit::Minute, 60, "rpm"));
        assert!(l.lookup("tollgate_native", [("generic_key", "other")]).is_none());
        let daily = l.lookup("tollgate_native", [("tenant", "acme"), ("budget", "daily")]).unwrap();
        assert_eq!(daily.limit, 5_000_000_000);
        assert_eq!(daily.tz, Some(chrono_tz::Europe::Paris));
        // a node without a limit
        assert!(l.lookup("tollgate_native", [("tenant", "acme")]).is_none());
        assert_eq!(l.lookup("tollgate_native", [("tenant", "vip")]).unwrap().limit, 1000);
        assert!(l.lookup("other", [("tenant", "vip")]).is_none());
    }

    #[test]
    fn shipped_example_is_valid() {
        let l = StaticLimits::parse(include_str!("../config/limits.example.yaml")).unwrap();
        let rpm = l.lookup("tollgate_native", [("generic_key", "per_tenant_rpm")]).unwrap();
        assert_eq!((rpm.unit, rpm.limit), (Unit::Minute, 60));
        let usd = l.lookup("tollgate_native", [("tenant", "acme"), ("budget", "monthly_usd")]).unwrap();
        assert_eq!((usd.unit, usd.anchor_day), (Unit::Month, Some(15)));
    }

    #[test]
    fn json_works_too() {
        let l = StaticLimits::parse(
            r#"{"domains":[{"domain":"d","descriptors":[{"key":"k","rate_limit":{"unit":"hour","requests_per_unit":3}}]}]}"#,
        )
        .unwrap();
        assert_eq!(l.lookup("d", [("k", "x")]).unwrap().unit, Unit::Hour);
    }

    #[test]
    fn rejects_bad_files() {
        for bad in [
            "domains: [{domain: d, descriptors: [{key: k, rate_limit: {unit: week, requests_per_unit: 1}}]}]",
            "domains: [{domain: d, descriptors: [{key: k, rate_limit: {unit: day, requests_per_unit: 1, anchor_day: 32}}]}]",
            "domains: [{domain: d, descriptors: [{key: k, rate_limit: {unit: day, requests_per_unit: 1, time_zone: Mars/Base}}]}]",
            "domains: [{domain: d, descriptors: [{key: k, rate_limit: {unit: minute, requests_per_unit: 1, anchor_day: 2}}]}]",
            "domains: [{domain: d, descriptors: [{key: k, value: v}, {key: k, value: v}]}]",
            "domains: [{domain: d}, {domain: d}]",
            "domains: [{domain: d, descriptors: [{key: tollgate.limit}]}]",
            "domains: [{domain: d, descriptors: [{key: k, rate_limt: {unit: day, requests_per_unit: 1}}]}]",
        ] {
            assert!(StaticLimits::parse(bad).is_err(), "accepted: {bad}");
        }
    }
}
