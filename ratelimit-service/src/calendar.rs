//! Calendar windows for DAY, WEEK, MONTH and YEAR limits: pure functions from an
//! instant, a time zone and a billing anchor day to the window's bounds.
//!
//! - DAY: local midnight to the next local midnight (23 or 25 hours on DST days).
//! - WEEK (a DAY limit with `tollgate.window=week`): Monday's local midnight to
//!   the next Monday's (167 or 169 hours in a week with a DST change); a week
//!   may span two years (Monday 2024-12-30 to Monday 2025-01-06).
//! - MONTH: starts at local midnight of day `anchor` of the month, clamped to the
//!   month's last day (anchor 31 renews on Feb 28/29, Apr 30, ...).
//! - YEAR: the calendar year in the time zone (the anchor day is not used).

use chrono::{DateTime, Datelike, Days, Duration, LocalResult, NaiveDate, NaiveDateTime, TimeZone};
use chrono_tz::Tz;
use rls_contract::Unit;

/// The kinds of calendar window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalendarUnit {
    Day,
    /// Monday to Monday; not a unit of RLS v3 requests (see `rls_contract::KEY_WINDOW`).
    Week,
    Month,
    Year,
}

impl CalendarUnit {
    /// The window kind of a calendar unit; `None` for the smooth rates. A week
    /// is never a unit of its own: see [`CalendarUnit::Week`].
    pub fn of(unit: Unit) -> Option<Self> {
        match unit {
            Unit::Day => Some(Self::Day),
            Unit::Month => Some(Self::Month),
            Unit::Year => Some(Self::Year),
            Unit::Second | Unit::Minute | Unit::Hour => None,
        }
    }
}

/// A half-open window `[start_ms, end_ms)` in Unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start_ms: i64,
    pub end_ms: i64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CalendarError {
    #[error("timestamp {0} ms is out of range")]
    OutOfRange(i64),
}

/// The window containing `now_ms`. `anchor_day` must be in 1..=31 (checked by the caller).
pub fn window(unit: CalendarUnit, now_ms: i64, tz: Tz, anchor_day: u32) -> Result<Window, CalendarError> {
    let now: DateTime<Tz> =
        DateTime::from_timestamp_millis(now_ms).ok_or(CalendarError::OutOfRange(now_ms))?.with_timezone(&tz);
    let today = now.date_naive();
    let (start, end) = match unit {
        CalendarUnit::Day => {
            let next = today.succ_opt().ok_or(CalendarError::OutOfRange(now_ms))?;
            (today, next)
        }
        CalendarUnit::Week => {
            let since_monday = u64::from(today.weekday().num_days_from_monday());
            let monday = today.checked_sub_days(Days::new(since_monday)).ok_or(CalendarError::OutOfRange(now_ms))?;
            let next = monday.checked_add_days(Days::new(7)).ok_or(CalendarError::OutOfRange(now_ms))?;
            (monday, next)
        }
        CalendarUnit::Month => {
            let (y, m) = (today.year(), today.month());
            let this = anchored(y, m, anchor_day).ok_or(CalendarError::OutOfRange(now_ms))?;
            let start = if today >= this {
                this
            } else {
                let (py, pm) = prev_month(y, m);
                anchored(py, pm, anchor_day).ok_or(CalendarError::OutOfRange(now_ms))?
            };
            let (ny, nm) = next_month(start.year(), start.month());
            let end = anchored(ny, nm, anchor_day).ok_or(CalendarError::OutOfRange(now_ms))?;
            (start, end)
        }
        CalendarUnit::Year => {
            let y = today.year();
            let start = NaiveDate::from_ymd_opt(y, 1, 1).ok_or(CalendarError::OutOfRange(now_ms))?;
            let end = NaiveDate::from_ymd_opt(y + 1, 1, 1).ok_or(CalendarError::OutOfRange(now_ms))?;
            (start, end)
        }
    };
    Ok(Window {
        start_ms: local_midnight_ms(tz, start).ok_or(CalendarError::OutOfRange(now_ms))?,
        end_ms: local_midnight_ms(tz, end).ok_or(CalendarError::OutOfRange(now_ms))?,
    })
}

fn days_in_month(y: i32, m: u32) -> Option<u32> {
    let (ny, nm) = next_month(y, m);
    let first_next = NaiveDate::from_ymd_opt(ny, nm, 1)?;
    Some(first_next.pred_opt()?.day())
}

/// Day `anchor` of month `m`, clamped to the month's last day.
fn anchored(y: i32, m: u32, anchor: u32) -> Option<NaiveDate> {
    let d = anchor.clamp(1, days_in_month(y, m)?);
    NaiveDate::from_ymd_opt(y, m, d)
}

fn prev_month(y: i32, m: u32) -> (i32, u32) {
    if m == 1 {
        (y - 1, 12)
    } else {
        (y, m - 1)
    }
}

fn next_month(y: i32, m: u32) -> (i32, u32) {
    if m == 12 {
        (y + 1, 1)
    } else {
        (y, m + 1)
    }
}

/// The first instant of local date `d`. Where a DST jump skips midnight
/// (some zones switch at 00:00), the day starts at the first local time that exists.
fn local_midnight_ms(tz: Tz, d: NaiveDate) -> Option<i64> {
    let midnight: NaiveDateTime = d.and_hms_opt(0, 0, 0)?;
    for minutes in (0..=180).step_by(15) {
        let t = midnight + Duration::minutes(minutes);
        match tz.from_local_datetime(&t) {
            LocalResult::Single(x) => return Some(x.timestamp_millis()),
            LocalResult::Ambiguous(a, b) => return Some(a.timestamp_millis().min(b.timestamp_millis())),
            LocalResult::None => continue,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).map(|d| d.timestamp_millis()).unwrap()
    }

    #[test]
    fn utc_month_end() {
        let w = window(CalendarUnit::Month, ms("2025-01-31T23:59:59.999Z"), Tz::UTC, 1).unwrap();
        assert_eq!(w.start_ms, ms("2025-01-01T00:00:00Z"));
        assert_eq!(w.end_ms, ms("2025-02-01T00:00:00Z"));
        let w = window(CalendarUnit::Month, ms("2025-02-01T00:00:00Z"), Tz::UTC, 1).unwrap();
        assert_eq!(w.start_ms, ms("2025-02-01T00:00:00Z"));
    }

    #[test]
    fn leap_day() {
        let w = window(CalendarUnit::Day, ms("2024-02-29T12:00:00Z"), Tz::UTC, 1).unwrap();
        assert_eq!(w.start_ms, ms("2024-02-29T00:00:00Z"));
        assert_eq!(w.end_ms, ms("2024-03-01T00:00:00Z"));
        // anchor 30 in a leap February renews on the 29th
        let w = window(CalendarUnit::Month, ms("2024-02-29T12:00:00Z"), Tz::UTC, 30).unwrap();
        assert_eq!(w.start_ms, ms("2024-02-29T00:00:00Z"));
        assert_eq!(w.end_ms, ms("2024-03-30T00:00:00Z"));
    }

    #[test]
    fn anchor_31_clamps() {
        // Feb 2025 has 28 days: the period renews on Feb 28.
        let w = window(CalendarUnit::Month, ms("2025-02-27T10:00:00Z"), Tz::UTC, 31).unwrap();
        assert_eq!(w.start_ms, ms("2025-01-31T00:00:00Z"));
        assert_eq!(w.end_ms, ms("2025-02-28T00:00:00Z"));
        let w = window(CalendarUnit::Month, ms("2025-02-28T10:00:00Z"), Tz::UTC, 31).unwrap();
        assert_eq!(w.start_ms, ms("2025-02-28T00:00:00Z"));
        assert_eq!(w.end_ms, ms("2025-03-31T00:00:00Z"));
        // April has 30 days
        let w = window(CalendarUnit::Month, ms("2025-04-30T00:00:00Z"), Tz::UTC, 31).unwrap();
        assert_eq!(w.start_ms, ms("2025-04-30T00:00:00Z"));
        assert_eq!(w.end_ms, ms("2025-05-31T00:00:00Z"));
    }

    #[test]
    fn dst_days_are_23_and_25_hours() {
        let ny: Tz = "America/New_York".parse().unwrap();
        let spring = window(CalendarUnit::Day, ms("2025-03-09T12:00:00-04:00"), ny, 1).unwrap();
        assert_eq!(spring.end_ms - spring.start_ms, 23 * 3_600_000);
        assert_eq!(spring.start_ms, ms("2025-03-09T00:00:00-05:00"));
        let fall = window(CalendarUnit::Day, ms("2025-11-02T12:00:00-05:00"), ny, 1).unwrap();
        assert_eq!(fall.end_ms - fall.start_ms, 25 * 3_600_000);
    }

    #[test]
    fn zone_month_starts_at_local_midnight() {
        let ny: Tz = "America/New_York".parse().unwrap();
        // 02:00 UTC on Feb 1 is still Jan 31 in New York.
        let w = window(CalendarUnit::Month, ms("2025-02-01T02:00:00Z"), ny, 1).unwrap();
        assert_eq!(w.start_ms, ms("2025-01-01T00:00:00-05:00"));
        assert_eq!(w.end_ms, ms("2025-02-01T00:00:00-05:00"));
    }

    #[test]
    fn midnight_gap_zone() {
        // America/Havana jumps from 00:00 to 01:00 on DST start (2024-03-10).
        let havana: Tz = "America/Havana".parse().unwrap();
        let w = window(CalendarUnit::Day, ms("2024-03-10T12:00:00-04:00"), havana, 1).unwrap();
        assert_eq!(w.start_ms, ms("2024-03-10T01:00:00-04:00"));
    }

    #[test]
    fn week_runs_monday_to_monday() {
        // Wednesday
        let w = window(CalendarUnit::Week, ms("2025-06-11T15:00:00Z"), Tz::UTC, 1).unwrap();
        assert_eq!(w.start_ms, ms("2025-06-09T00:00:00Z"));
        assert_eq!(w.end_ms, ms("2025-06-16T00:00:00Z"));
        // the last millisecond of Sunday and Monday 00:00 are in different weeks
        let w = window(CalendarUnit::Week, ms("2025-06-15T23:59:59.999Z"), Tz::UTC, 1).unwrap();
        assert_eq!(w.start_ms, ms("2025-06-09T00:00:00Z"));
        let w = window(CalendarUnit::Week, ms("2025-06-16T00:00:00Z"), Tz::UTC, 1).unwrap();
        assert_eq!(w.start_ms, ms("2025-06-16T00:00:00Z"));
        assert_eq!(w.end_ms - w.start_ms, 7 * 86_400_000);
    }

    #[test]
    fn week_across_the_year_boundary() {
        // 2025-01-01 is a Wednesday: its week began on Monday 2024-12-30
        let w = window(CalendarUnit::Week, ms("2025-01-01T08:00:00Z"), Tz::UTC, 1).unwrap();
        assert_eq!(w.start_ms, ms("2024-12-30T00:00:00Z"));
        assert_eq!(w.end_ms, ms("2025-01-06T00:00:00Z"));
        // 2026-12-31 is a Thursday; the week ends in 2027
        let w = window(CalendarUnit::Week, ms("2026-12-31T23:00:00Z"), Tz::UTC, 1).unwrap();
        assert_eq!(w.start_ms, ms("2026-12-28T00:00:00Z"));
        assert_eq!(w.end_ms, ms("2027-01-04T00:00:00Z"));
        // a leap year's Feb 29 (Thursday 2024)
        let w = window(CalendarUnit::Week, ms("2024-02-29T12:00:00Z"), Tz::UTC, 1).unwrap();
        assert_eq!(w.start_ms, ms("2024-02-26T00:00:00Z"));
        assert_eq!(w.end_ms, ms("2024-03-04T00:00:00Z"));
    }

    #[test]
    fn dst_weeks_are_167_and_169_hours() {
        let ny: Tz = "America/New_York".parse().unwrap();
        // DST starts Sunday 2025-03-09: the week of Monday 03-03 is an hour short
        let spring = window(CalendarUnit::Week, ms("2025-03-05T12:00:00-05:00"), ny, 1).unwrap();
        assert_eq!(spring.start_ms, ms("2025-03-03T00:00:00-05:00"));
        assert_eq!(spring.end_ms, ms("2025-03-10T00:00:00-04:00"));
        assert_eq!(spring.end_ms - spring.start_ms, 167 * 3_600_000);
        // DST ends Sunday 2025-11-02: the week of Monday 10-27 is an hour long
        let fall = window(CalendarUnit::Week, ms("2025-11-02T23:30:00-05:00"), ny, 1).unwrap();
        assert_eq!(fall.start_ms, ms("2025-10-27T00:00:00-04:00"));
        assert_eq!(fall.end_ms, ms("2025-11-03T00:00:00-05:00"));
        assert_eq!(fall.end_ms - fall.start_ms, 169 * 3_600_000);
        // Europe/Paris switches on the last Sunday of March (2025-03-30)
        let paris: Tz = "Europe/Paris".parse().unwrap();
        let w = window(CalendarUnit::Week, ms("2025-03-30T12:00:00+02:00"), paris, 1).unwrap();
        assert_eq!(w.start_ms, ms("2025-03-24T00:00:00+01:00"));
        assert_eq!(w.end_ms - w.start_ms, 167 * 3_600_000);
    }

    #[test]
    fn week_starts_at_the_zones_monday() {
        let ny: Tz = "America/New_York".parse().unwrap();
        // Monday 02:00 UTC is still Sunday evening in New York: last week
        let w = window(CalendarUnit::Week, ms("2025-06-16T02:00:00Z"), ny, 1).unwrap();
        assert_eq!(w.start_ms, ms("2025-06-09T00:00:00-04:00"));
        assert_eq!(w.end_ms, ms("2025-06-16T00:00:00-04:00"));
        // and in Tokyo it has long been Monday: this week
        let tokyo: Tz = "Asia/Tokyo".parse().unwrap();
        let w = window(CalendarUnit::Week, ms("2025-06-15T16:00:00Z"), tokyo, 1).unwrap();
        assert_eq!(w.start_ms, ms("2025-06-16T00:00:00+09:00"));
    }

    #[test]
    fn year() {
        let w = window(CalendarUnit::Year, ms("2024-12-31T23:00:00Z"), Tz::UTC, 15).unwrap();
        assert_eq!(w.start_ms, ms("2024-01-01T00:00:00Z"));
        assert_eq!(w.end_ms, ms("2025-01-01T00:00:00Z"));
    }
}
