//! Which units may a limit have, and what are they called?
//!
//! The numbers are RLS v3's (`RateLimitUnit`, also `RateLimit.Unit`). Neither
//! side accepts `UNKNOWN` (0) nor `WEEK` (7) in a request: the service answers
//! `INVALID_ARGUMENT` for them, so they have no variant here. (Requests have
//! no WEEK; a weekly limit is a DAY limit with `tollgate.window=week`, and its
//! answer names [`RESPONSE_UNIT_WEEK`].) The names are the protocol's, lower
//! case, as written in configuration files.

/// `RateLimit.Unit.WEEK` of an RLS v3 *response* (requests have no such unit):
/// the `current_limit.unit` the service answers for a descriptor with
/// `tollgate.window=week`.
pub const RESPONSE_UNIT_WEEK: i32 = 7;

/// A limit's unit. `unit as i32` is its number on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(i32)]
pub enum Unit {
    Second = 1,
    Minute = 2,
    Hour = 3,
    Day = 4,
    Month = 5,
    Year = 6,
}

impl Unit {
    /// Every unit, shortest first.
    pub const ALL: [Unit; 6] = [Unit::Second, Unit::Minute, Unit::Hour, Unit::Day, Unit::Month, Unit::Year];

    /// The unit with this RLS v3 number, if it is one of ours.
    pub fn from_proto(v: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|u| *u as i32 == v)
    }

    /// The unit's name: `second`, `minute`, `hour`, `day`, `month`, `year`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Second => "second",
            Self::Minute => "minute",
            Self::Hour => "hour",
            Self::Day => "day",
            Self::Month => "month",
            Self::Year => "year",
        }
    }

    /// The unit of a name, in any case (`minute`, `MINUTE`).
    pub fn parse_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|u| s.eq_ignore_ascii_case(u.name()))
    }

    /// A calendar window (DAY, MONTH, YEAR: a budget, renewed at a date) rather
    /// than a smooth rate (SECOND, MINUTE, HOUR). Only calendar units take
    /// `tollgate.anchor_day` and `tollgate.tz`.
    pub fn is_calendar(self) -> bool {
        matches!(self, Self::Day | Self::Month | Self::Year)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_names_round_trip() {
        for u in Unit::ALL {
            assert_eq!(Unit::from_proto(u as i32), Some(u));
            assert_eq!(Unit::parse_name(u.name()), Some(u));
            assert_eq!(Unit::parse_name(&u.name().to_ascii_uppercase()), Some(u));
        }
        assert_eq!(Unit::ALL.map(|u| u as i32), [1, 2, 3, 4, 5, 6]);
        for bad in [0, 7, -1] {
            assert_eq!(Unit::from_proto(bad), None, "{bad}");
        }
        for bad in ["", "week", "minutes", " minute"] {
            assert_eq!(Unit::parse_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn calendar_units_are_day_month_year() {
        let calendar: Vec<_> = Unit::ALL.into_iter().filter(|u| u.is_calendar()).collect();
        assert_eq!(calendar, [Unit::Day, Unit::Month, Unit::Year]);
    }
}
