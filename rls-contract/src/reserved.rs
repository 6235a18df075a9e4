//! Which descriptor entries are parameters rather than part of the counter key?
//!
//! An entry whose key starts with [`RESERVED_PREFIX`] tunes how its descriptor
//! is counted; the service leaves it out of the counter key and refuses any
//! reserved key it does not know. A caller never uses the prefix for its own
//! entries.

use std::ops::RangeInclusive;

/// Keys with this prefix are reserved.
pub const RESERVED_PREFIX: &str = "tollgate.";
/// The full limit as a decimal u64 (the `limit` override, a u32, carries
/// `min(limit, u32::MAX)` and the unit).
pub const KEY_LIMIT: &str = "tollgate.limit";
/// The day of the month a MONTH window renews, in [`ANCHOR_DAYS`] (clamped to
/// the month's last day).
pub const KEY_ANCHOR_DAY: &str = "tollgate.anchor_day";
/// The IANA time zone of DAY, MONTH and YEAR windows (default UTC).
pub const KEY_TZ: &str = "tollgate.tz";
/// The window of a DAY-unit limit, when it is not one day. RLS v3 requests
/// have no WEEK unit (only responses do), so a weekly limit is sent with unit
/// DAY and this entry set to [`WINDOW_WEEK`]. The service answers the
/// descriptor's `current_limit.unit` as [`crate::RESPONSE_UNIT_WEEK`]. Any other
/// unit, any other value, or `tollgate.anchor_day` next to it is refused.
pub const KEY_WINDOW: &str = "tollgate.window";
/// `tollgate.window=week`: a calendar week, from Monday 00:00 to the next
/// Monday 00:00 in the descriptor's `tollgate.tz` (UTC by default); 167 or 169
/// hours in a week with a DST change.
pub const WINDOW_WEEK: &str = "week";

/// Budget alert thresholds, in percent of the limit: `50,80,100` (1..=8
/// strictly increasing values in [`ALERT_PERCENTS`]). On DAY (and weekly), MONTH
/// and YEAR limits only. The service emits one event when a charge makes the counter
/// reach a threshold in its window (see [`parse_alert_thresholds`]).
pub const KEY_ALERTS: &str = "tollgate.alerts";

/// Every reserved key the service knows.
pub const RESERVED_KEYS: [&str; 5] = [KEY_LIMIT, KEY_ANCHOR_DAY, KEY_TZ, KEY_WINDOW, KEY_ALERTS];

/// The percentages a `tollgate.alerts` threshold may take.
pub const ALERT_PERCENTS: RangeInclusive<u32> = 1..=1000;
/// Most thresholds in one `tollgate.alerts` entry.
pub const MAX_ALERT_THRESHOLDS: usize = 8;
/// The thresholds the filter sends when a tier sets none.
pub const DEFAULT_ALERT_PERCENTS: [u32; 3] = [50, 80, 100];

/// The thresholds of a `tollgate.alerts` value (`50,80,100`): 1..=8 plain
/// decimals in [`ALERT_PERCENTS`], strictly increasing. `None` if malformed.
pub fn parse_alert_thresholds(value: &str) -> Option<Vec<u32>> {
    let mut out: Vec<u32> = Vec::new();
    for part in value.split(',') {
        if part.is_empty() || part.len() > 4 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let p = part.parse::<u32>().ok().filter(|p| ALERT_PERCENTS.contains(p))?;
        if out.last().is_some_and(|last| *last >= p) || out.len() == MAX_ALERT_THRESHOLDS {
            return None;
        }
        out.push(p);
    }
    Some(out)
}

/// The `tollgate.alerts` value of thresholds (the inverse of [`parse_alert_thresholds`]).
pub fn format_alert_thresholds(percents: &[u32]) -> String {
    percents.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// The days of the month a `tollgate.anchor_day` may name.
pub const ANCHOR_DAYS: RangeInclusive<u32> = 1..=31;

/// Whether an entry with this key is a parameter, not part of the counter key.
pub fn is_reserved(key: &str) -> bool {
    key.starts_with(RESERVED_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reserved_key_has_the_prefix() {
        for k in RESERVED_KEYS {
            assert!(is_reserved(k), "{k}");
        }
        assert!(!is_reserved("tenant"));
        assert!(!is_reserved("tollgate"));
        assert_eq!((*ANCHOR_DAYS.start(), *ANCHOR_DAYS.end()), (1, 31));
    }

    #[test]
    fn alert_thresholds_are_strict() {
        assert_eq!(parse_alert_thresholds("50,80,100"), Some(vec![50, 80, 100]));
        assert_eq!(parse_alert_thresholds(&format_alert_thresholds(&DEFAULT_ALERT_PERCENTS)), Some(vec![50, 80, 100]));
        assert_eq!(parse_alert_thresholds("1000"), Some(vec![1000]));
        for bad in ["", "0", "80,50", "50,50", "50,", " 50", "+50", "1001", "1,2,3,4,5,6,7,8,9", "5e1", "50;80"] {
            assert_eq!(parse_alert_thresholds(bad), None, "{bad:?}");
        }
    }
}
