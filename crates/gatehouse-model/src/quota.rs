//! Where a quota's count lives: the calendar period a moment falls in and
//! the Redis key of one consumer's count for it. The data plane counts under
//! this key and `gatehousectl usage` reads it, so both use this one
//! definition.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::object::QuotaPeriod;

/// One period of a quota: its label and when it starts and ends (UTC).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Period {
    /// `2026-11-28` for a day, `2026-11` for a month.
    pub label: String,
    pub start: SystemTime,
    pub end: SystemTime,
}

/// (year, month 1-12, day 1-31) of days since 1970-01-01 (the proleptic
/// Gregorian calendar; Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days since 1970-01-01 of a date (Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn at_day(days: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(days.max(0)).unwrap_or(0) * 86_400)
}

/// The period of `period` that `now` falls in.
pub fn period_of(period: QuotaPeriod, now: SystemTime) -> Period {
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let days = secs.div_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    match period {
        QuotaPeriod::Day => Period {
            label: format!("{year:04}-{month:02}-{day:02}"),
            start: at_day(days),
            end: at_day(days + 1),
        },
        QuotaPeriod::Month => {
            let (ny, nm) = if month == 12 {
                (year + 1, 1)
            } else {
                (year, month + 1)
            };
            Period {
                label: format!("{year:04}-{month:02}"),
                start: at_day(days_from_civil(year, month, 1)),
                end: at_day(days_from_civil(ny, nm, 1)),
            }
        }
    }
}

/// The Redis key of `consumer`'s count of one quota of one policy in one
/// period. The hash tag is the consumer: all of a consumer's counts live in
/// one Redis Cluster slot.
pub fn redis_key(consumer: &str, policy: &str, quota: &str, period: &Period) -> String {
    format!(
        "gatehouse:quota:{{{consumer}}}:{policy}/{quota}:{}",
        period.label
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn days_and_months_are_calendar_periods_in_utc() {
        // 2024-02-29T23:59:59Z, a leap day.
        let t = at(1_709_251_199);
        let day = period_of(QuotaPeriod::Day, t);
        assert_eq!(day.label, "2024-02-29");
        assert_eq!(day.end, at(1_709_251_200));
        let month = period_of(QuotaPeriod::Month, t);
        assert_eq!(month.label, "2024-02");
        assert_eq!(month.start, at(1_706_745_600)); // 2024-02-01
        assert_eq!(month.end, at(1_709_251_200)); // 2024-03-01
                                                  // December rolls into the next year.
        let dec = period_of(QuotaPeriod::Month, at(1_735_603_200)); // 2024-12-31
        assert_eq!(dec.label, "2024-12");
        assert_eq!(dec.end, at(1_735_689_600)); // 2025-01-01
        assert_eq!(period_of(QuotaPeriod::Day, at(0)).label, "1970-01-01");
    }

    #[test]
    fn every_day_round_trips() {
        for days in -1000..100_000 {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn keys_tag_the_consumer() {
        let p = period_of(QuotaPeriod::Day, at(0));
        assert_eq!(
            redis_key("acme", "partners", "daily", &p),
            "gatehouse:quota:{acme}:partners/daily:1970-01-01"
        );
    }
}
