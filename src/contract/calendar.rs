//! The billing calendar and ramps: local dates in a contract's time zone turned into instants
//! (milliseconds since the Unix epoch), billing periods, and the exact integral of a ramp.
//!
//! jiff is used only in here; everything outside sees `i64` milliseconds.

use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;
use jiff::Timestamp;

/// A point in time as written in the config: a local date (midnight in the contract's time
/// zone) or an RFC 3339 timestamp with an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimeSpec {
    Date(Date),
    Instant(i64),
}

/// Parses `YYYY-MM-DD` or an RFC 3339 timestamp (`2026-11-01T08:00:00Z`,
/// `2026-11-01T00:00:00.250-08:00`; `T`, `t` or a space between date and time; fractions below
/// a millisecond are truncated towards the past).
pub(crate) fn parse_time_spec(s: &str) -> Result<TimeSpec, String> {
    let bytes = s.as_bytes();
    let is_digits = |r: std::ops::Range<usize>| {
        bytes
            .get(r)
            .is_some_and(|b| b.iter().all(u8::is_ascii_digit))
    };
    let date_shape = is_digits(0..4)
        && bytes.get(4) == Some(&b'-')
        && is_digits(5..7)
        && bytes.get(7) == Some(&b'-')
        && is_digits(8..10);
    let expected = "expected a date (YYYY-MM-DD) or an RFC 3339 timestamp with an offset \
                    (e.g. 2026-11-01T08:00:00Z)";
    if !date_shape {
        return Err(format!("{s:?}: {expected}"));
    }
    // Check the date ourselves for a message that does not depend on jiff's wording.
    let num = |r: std::ops::Range<usize>| s[r].parse::<i16>().unwrap_or(0);
    let (year, month, day) = (num(0..4), num(5..7), num(8..10));
    if !(1..=12).contains(&month) {
        return Err(format!("{s:?}: month {month} is out of range (1..=12)"));
    }
    let days = Date::new(year, month as i8, 1)
        .map_err(|e| format!("{s:?}: {}", jiff_error(&e)))?
        .days_in_month();
    if !(1..=i16::from(days)).contains(&day) {
        return Err(format!(
            "{s:?}: day {day} is out of range ({year:04}-{month:02} has {days} days)"
        ));
    }
    let date = Date::new(year, month as i8, day as i8)
        .map_err(|e| format!("{s:?}: {}", jiff_error(&e)))?;
    if bytes.len() == 10 {
        return Ok(TimeSpec::Date(date));
    }
    if !rfc3339_shape(s) {
        return Err(format!("{s:?}: {expected}"));
    }
    let ts: Timestamp = s
        .parse()
        .map_err(|e: jiff::Error| format!("{s:?}: {}", jiff_error(&e)))?;
    Ok(TimeSpec::Instant(timestamp_ms(ts)))
}

/// `YYYY-MM-DD[Tt ]hh:mm:ss[.f{1,9}](Z|z|±hh:mm)`; the date part is already checked.
fn rfc3339_shape(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|x| x.iter().all(u8::is_ascii_digit));
    if !(matches!(b.get(10), Some(b'T' | b't' | b' '))
        && digits(11..13)
        && b.get(13) == Some(&b':')
        && digits(14..16)
        && b.get(16) == Some(&b':')
        && digits(17..19))
    {
        return false;
    }
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        let n = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if !(1..=9).contains(&n) {
            return false;
        }
        i += 1 + n;
    }
    match &b[i..] {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit()),
        _ => false,
    }
}

fn jiff_error(e: &jiff::Error) -> String {
    e.to_string()
}

fn timestamp_ms(ts: Timestamp) -> i64 {
    // Floor, not truncation towards zero, so pre-1970 fractions round to the past too.
    let ms = ts.as_nanosecond().div_euclid(1_000_000);
    i64::try_from(ms).unwrap_or(if ms < 0 { i64::MIN } else { i64::MAX })
}

/// Looks up an IANA time zone name in the bundled database (case-insensitively); returns the
/// zone and its canonical spelling.
pub(crate) fn time_zone(name: &str) -> Result<(TimeZone, String), String> {
    let tz = TimeZone::get(name)
        .map_err(|_| format!("unknown time zone {name:?} (expected an IANA name such as \"America/Los_Angeles\" or \"UTC\")"))?;
    let canonical = tz.iana_name().unwrap_or(name).to_string();
    Ok((tz, canonical))
}

/// The first instant of a local day: local midnight, or the end of the gap if midnight does not
/// exist that day (a DST jump at midnight), or the earlier midnight if it happens twice.
pub(crate) fn start_of_day(tz: &TimeZone, date: Date) -> Result<i64, String> {
    tz.to_ambiguous_timestamp(DateTime::from(date))
        .compatible()
        .map(timestamp_ms)
        .map_err(|e| format!("{date} is out of range: {}", jiff_error(&e)))
}

/// Resolves a [`TimeSpec`] in a time zone: a date is the start of that local day.
pub(crate) fn resolve(tz: &TimeZone, spec: TimeSpec) -> Result<i64, String> {
    match spec {
        TimeSpec::Date(d) => start_of_day(tz, d),
        TimeSpec::Instant(ms) => Ok(ms),
    }
}

/// Resolves a contract `end`: a date is inclusive (the end is the start of the next local day),
/// a timestamp exclusive.
pub(crate) fn resolve_end(tz: &TimeZone, spec: TimeSpec) -> Result<i64, String> {
    match spec {
        TimeSpec::Date(d) => {
            let next = d
                .tomorrow()
                .map_err(|e| format!("{d} is out of range: {}", jiff_error(&e)))?;
            start_of_day(tz, next)
        }
        TimeSpec::Instant(ms) => Ok(ms),
    }
}

/// The start of the billing period that begins in local month (`year`, `month`): the start of
/// the anchor day, clamped to the month's last day. `None` beyond jiff's range.
fn period_start(tz: &TimeZone, anchor_day: i8, year: i16, month: i8) -> Option<i64> {
    let first = Date::new(year, month, 1).ok()?;
    let day = anchor_day.clamp(1, first.days_in_month());
    let date = Date::new(year, month, day).ok()?;
    start_of_day(tz, date).ok()
}

fn next_month(year: i16, month: i8) -> (i16, i8) {
    if month == 12 {
        (year.saturating_add(1), 1)
    } else {
        (year, month + 1)
    }
}

fn prev_month(year: i16, month: i8) -> (i16, i8) {
    if month == 1 {
        (year.saturating_sub(1), 12)
    } else {
        (year, month - 1)
    }
}

/// `[start, end)` of the billing period containing `t_ms`. Periods start at the first instant
/// of the anchor day (clamped to the month's last day) in local time, so they follow DST.
/// Beyond the calendar's range (years ±9999) the open side saturates to `i64::MIN`/`i64::MAX`.
pub(crate) fn billing_period(tz: &TimeZone, anchor_day: i8, t_ms: i64) -> (i64, i64) {
    let lo = Timestamp::MIN.as_millisecond();
    let hi = Timestamp::MAX.as_millisecond();
    let clamped = t_ms.clamp(lo, hi);
    let Ok(ts) = Timestamp::from_millisecond(clamped) else {
        return (i64::MIN, i64::MAX);
    };
    let local = tz.to_datetime(ts).date();
    let (y, m) = (local.year(), local.month());
    let this = period_start(tz, anchor_day, y, m);
    let (ny, nm) = next_month(y, m);
    let (py, pm) = prev_month(y, m);
    match this {
        Some(start) if start <= t_ms => (
            start,
            period_start(tz, anchor_day, ny, nm).unwrap_or(i64::MAX),
        ),
        Some(end) => (
            period_start(tz, anchor_day, py, pm).unwrap_or(i64::MIN),
            end,
        ),
        // This month's anchor day is beyond jiff's range: t is at the very edge of it.
        None if t_ms < 0 => (
            i64::MIN,
            period_start(tz, anchor_day, ny, nm).unwrap_or(i64::MAX),
        ),
        None => (
            period_start(tz, anchor_day, py, pm).unwrap_or(i64::MIN),
            i64::MAX,
        ),
    }
}

/// The local calendar days of `tz` that start in `[from_ms, to_ms)`, each as `(date, start, end)`
/// with `end` the start of the next local day (23 or 25 hours apart across DST), the last one
/// clipped to `to_ms`. `from_ms` should be the start of a local day (a billing period's start
/// is); otherwise the first day is clipped to it.
pub(crate) fn local_days(tz: &TimeZone, from_ms: i64, to_ms: i64) -> Vec<(Date, i64, i64)> {
    let mut out = Vec::new();
    let Ok(ts) = Timestamp::from_millisecond(from_ms) else {
        return out;
    };
    let mut date = tz.to_datetime(ts).date();
    let mut start = from_ms;
    while start < to_ms {
        let Ok(next) = date.tomorrow() else { break };
        let Ok(next_start) = start_of_day(tz, next) else {
            break;
        };
        let end = next_start.min(to_ms);
        if end > start {
            out.push((date, start, end));
        }
        start = end;
        date = next;
    }
    out
}

/// The billing period that starts in local month (`year`, `month`): `None` for a month out of
/// range.
pub(crate) fn period_of_month(
    tz: &TimeZone,
    anchor_day: i8,
    year: i16,
    month: i8,
) -> Option<(i64, i64)> {
    let start = period_start(tz, anchor_day, year, month)?;
    let (ny, nm) = next_month(year, month);
    Some((start, period_start(tz, anchor_day, ny, nm)?))
}

/// An instant as local time with its offset, `2026-10-25T02:30:00+01:00` (whole seconds).
pub(crate) fn local_rfc3339(tz: &TimeZone, ms: i64) -> String {
    let Ok(ts) = Timestamp::from_millisecond(ms) else {
        return String::new();
    };
    let offset = tz.to_offset(ts);
    let dt = tz.to_datetime(ts);
    let secs = offset.seconds();
    let sign = if secs < 0 { '-' } else { '+' };
    let a = secs.unsigned_abs();
    format!(
        "{}{sign}{:02}:{:02}",
        dt.strftime("%Y-%m-%dT%H:%M:%S"),
        a / 3600,
        a / 60 % 60
    )
}

/// `t_ms` plus `days` local calendar days in `tz` (same wall-clock time, resolved like
/// jiff's zoned arithmetic: a gap moves forward, a fold takes the earlier offset): the
/// instant and its RFC 9557 form. `None` beyond jiff's range.
pub(crate) fn days_after(tz: &TimeZone, t_ms: i64, days: u32) -> Option<(i64, String)> {
    let ts = Timestamp::from_millisecond(t_ms).ok()?;
    let later = ts
        .to_zoned_datetime(tz.clone())
        .checked_add(jiff::Span::new().days(i64::from(days)))
        .ok()?;
    Some((timestamp_ms(later.timestamp()), later.to_string()))
}

/// One committed step, already clipped to the contract's span: `gpus` from `from` (inclusive)
/// until `until` (exclusive; `None` = open-ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Step {
    pub from: i64,
    pub until: Option<i64>,
    pub gpus: u64,
}

impl Step {
    fn until_or_max(&self) -> i128 {
        self.until.map_or(i128::from(i64::MAX), i128::from)
    }
}

/// Builds the clipped ramp from resolved, validated steps `(from, until, gpus)` (sorted by
/// `from`, non-overlapping, `until` already defaulted where the next step or the contract end
/// gives one). Steps are clipped to `[start, end)`; empty ones are dropped.
pub(crate) fn clip_ramp(
    start: i64,
    end: Option<i64>,
    steps: &[(i64, Option<i64>, u64)],
) -> Vec<Step> {
    steps
        .iter()
        .filter_map(|&(from, until, gpus)| {
            let from = from.max(start);
            let until = match (until, end) {
                (Some(u), Some(e)) => Some(u.min(e)),
                (Some(u), None) => Some(u),
                (None, e) => e,
            };
            if until.is_some_and(|u| u <= from) {
                return None;
            }
            Some(Step { from, until, gpus })
        })
        .collect()
}

/// Committed GPUs at an instant: the step covering `t`, else 0.
pub(crate) fn gpus_at(ramp: &[Step], t_ms: i64) -> u64 {
    ramp.iter()
        .find(|s| s.from <= t_ms && s.until.is_none_or(|u| t_ms < u))
        .map_or(0, |s| s.gpus)
}

/// Exact `∫ committed dt` over `[from, to)` in GPU-milliseconds, saturating at `i64::MAX`.
pub(crate) fn gpu_ms(ramp: &[Step], from_ms: i64, to_ms: i64) -> i64 {
    if from_ms >= to_ms {
        return 0;
    }
    let (a, b) = (i128::from(from_ms), i128::from(to_ms));
    let mut total: i128 = 0;
    for s in ramp {
        let lo = a.max(i128::from(s.from));
        let hi = b.min(s.until_or_max());
        if hi > lo {
            total = total.saturating_add((hi - lo).saturating_mul(i128::from(s.gpus)));
        }
    }
    i64::try_from(total).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ZONES: &[&str] = &[
        "UTC",
        "America/Los_Angeles",
        "Europe/Berlin",
        "Asia/Kolkata",
        "Australia/Lord_Howe",
    ];

    fn ms(s: &str) -> i64 {
        match parse_time_spec(s).unwrap() {
            TimeSpec::Instant(ms) => ms,
            TimeSpec::Date(_) => panic!("{s} is a date"),
        }
    }

    fn tz(name: &str) -> TimeZone {
        time_zone(name).unwrap().0
    }

    #[test]
    fn time_specs() {
        assert_eq!(
            parse_time_spec("2026-11-01"),
            Ok(TimeSpec::Date(jiff::civil::date(2026, 11, 1)))
        );
        assert_eq!(ms("1970-01-01T00:00:00Z"), 0);
        assert_eq!(ms("1970-01-01T01:00:00.25+01:00"), 250);
        assert_eq!(ms("1970-01-01 00:00:01.0009z"), 1000);
        assert_eq!(ms("1969-12-31T23:59:59.9999Z"), -1);
        let expected = "expected a date (YYYY-MM-DD) or an RFC 3339 timestamp with an offset \
                        (e.g. 2026-11-01T08:00:00Z)";
        for bad in [
            "",
            "20261101",
            "+002026-11-01",
            "2026-11-1",
            "2026-11-01T00:00:00",
            "2026-11-01T00:00Z",
            "2026-11-01T00:00:00+01:00[Europe/Berlin]",
            "2026-11-01T00:00:00.Z",
            "2026-11-01T00:00:00+0100",
            "next tuesday",
        ] {
            assert_eq!(
                parse_time_spec(bad),
                Err(format!("{bad:?}: {expected}")),
                "{bad}"
            );
        }
        assert_eq!(
            parse_time_spec("2026-02-30"),
            Err("\"2026-02-30\": day 30 is out of range (2026-02 has 28 days)".to_string())
        );
        assert_eq!(
            parse_time_spec("2028-02-30T00:00:00Z"),
            Err(
                "\"2028-02-30T00:00:00Z\": day 30 is out of range (2028-02 has 29 days)"
                    .to_string()
            )
        );
        assert_eq!(
            parse_time_spec("2026-13-01"),
            Err("\"2026-13-01\": month 13 is out of range (1..=12)".to_string())
        );
        assert_eq!(
            parse_time_spec("2026-00-01"),
            Err("\"2026-00-01\": month 0 is out of range (1..=12)".to_string())
        );
        assert_eq!(
            parse_time_spec("2026-01-00"),
            Err("\"2026-01-00\": day 0 is out of range (2026-01 has 31 days)".to_string())
        );
        assert_eq!(
            parse_time_spec("0000-01-01"),
            Ok(TimeSpec::Date(jiff::civil::date(0, 1, 1)))
        );
        assert!(parse_time_spec("2026-11-01T25:00:00Z").is_err());
    }

    #[test]
    fn los_angeles_november_2026_spans_the_end_of_dst() {
        // DST ends Nov 1 2026 at 02:00 local; local midnight that day is still PDT (UTC-7),
        // Dec 1 is PST (UTC-8).
        let la = tz("America/Los_Angeles");
        let want = (ms("2026-11-01T07:00:00Z"), ms("2026-12-01T08:00:00Z"));
        for t in [want.0, ms("2026-11-15T12:00:00Z"), want.1 - 1] {
            assert_eq!(billing_period(&la, 1, t), want);
        }
        assert_eq!(billing_period(&la, 1, want.0 - 1).1, want.0);
        assert_eq!(billing_period(&la, 1, want.1).0, want.1);
        assert_eq!(want.1 - want.0, 30 * 86_400_000 + 3_600_000);
    }

    #[test]
    fn berlin_march_2027_spans_the_start_of_dst() {
        // DST starts Mar 28 2027: Mar 1 00:00 CET = Feb 28 23:00Z, Apr 1 00:00 CEST = Mar 31 22:00Z.
        let berlin = tz("Europe/Berlin");
        let want = (ms("2027-02-28T23:00:00Z"), ms("2027-03-31T22:00:00Z"));
        assert_eq!(billing_period(&berlin, 1, ms("2027-03-28T12:00:00Z")), want);
        assert_eq!(want.1 - want.0, 31 * 86_400_000 - 3_600_000);
        // Anchor day 28: Mar 28 00:00 CET (the DST day) -> Apr 28 00:00 CEST.
        assert_eq!(
            billing_period(&berlin, 28, ms("2027-04-01T00:00:00Z")),
            (ms("2027-03-27T23:00:00Z"), ms("2027-04-27T22:00:00Z"))
        );
    }

    #[test]
    fn anchor_day_31_clamps_to_the_end_of_february() {
        let utc = tz("UTC");
        // 2027 is not a leap year: Jan 31 -> Feb 28 -> Mar 31.
        assert_eq!(
            billing_period(&utc, 31, ms("2027-02-10T00:00:00Z")),
            (ms("2027-01-31T00:00:00Z"), ms("2027-02-28T00:00:00Z"))
        );
        assert_eq!(
            billing_period(&utc, 31, ms("2027-03-01T00:00:00Z")),
            (ms("2027-02-28T00:00:00Z"), ms("2027-03-31T00:00:00Z"))
        );
        // 2028 is: Feb 29.
        assert_eq!(
            billing_period(&utc, 31, ms("2028-03-30T23:59:59.999Z")),
            (ms("2028-02-29T00:00:00Z"), ms("2028-03-31T00:00:00Z"))
        );
        // Anchor 30 in April (30 days) is not clamped.
        assert_eq!(
            billing_period(&utc, 30, ms("2027-05-01T00:00:00Z")),
            (ms("2027-04-30T00:00:00Z"), ms("2027-05-30T00:00:00Z"))
        );
    }

    #[test]
    fn midnight_in_a_dst_gap_starts_the_period_when_the_day_starts() {
        // America/Santiago: DST starts at local midnight on Sep 6 2026 (00:00 -> 01:00, UTC-4 ->
        // UTC-3), so that day starts at 01:00 local = 04:00Z.
        let scl = tz("America/Santiago");
        let (start, _) = billing_period(&scl, 6, ms("2026-09-10T00:00:00Z"));
        assert_eq!(start, ms("2026-09-06T04:00:00Z"));
    }

    #[test]
    fn extreme_instants_do_not_panic() {
        for name in ZONES {
            let z = tz(name);
            for t in [
                i64::MIN,
                i64::MIN + 1,
                -377_705_023_201_000,
                0,
                253_402_207_200_999,
                i64::MAX,
            ] {
                for anchor in [1, 15, 31] {
                    let (s, e) = billing_period(&z, anchor, t);
                    assert!(s < e, "{name} {t} {anchor}");
                }
            }
        }
    }

    #[test]
    fn ramp_integral_by_hand() {
        let ramp = clip_ramp(
            100,
            Some(1000),
            &[(0, Some(200), 3), (200, Some(500), 5), (600, None, 7)],
        );
        assert_eq!(
            ramp,
            vec![
                Step {
                    from: 100,
                    until: Some(200),
                    gpus: 3
                },
                Step {
                    from: 200,
                    until: Some(500),
                    gpus: 5
                },
                Step {
                    from: 600,
                    until: Some(1000),
                    gpus: 7
                },
            ]
        );
        assert_eq!(
            gpu_ms(&ramp, i64::MIN, i64::MAX),
            100 * 3 + 300 * 5 + 400 * 7
        );
        assert_eq!(gpu_ms(&ramp, 150, 650), 50 * 3 + 300 * 5 + 50 * 7);
        assert_eq!(gpu_ms(&ramp, 650, 150), 0);
        assert_eq!(gpus_at(&ramp, 99), 0);
        assert_eq!(gpus_at(&ramp, 100), 3);
        assert_eq!(gpus_at(&ramp, 550), 0);
        assert_eq!(gpus_at(&ramp, 999), 7);
        assert_eq!(gpus_at(&ramp, 1000), 0);
        // Entirely outside the span: dropped.
        assert_eq!(
            clip_ramp(100, Some(200), &[(0, Some(100), 1), (200, None, 2)]),
            vec![]
        );
        // Open-ended and huge: saturates instead of overflowing.
        let open = clip_ramp(0, None, &[(0, None, u64::MAX)]);
        assert_eq!(gpu_ms(&open, 0, i64::MAX), i64::MAX);
        assert_eq!(gpus_at(&open, i64::MAX), u64::MAX);
    }

    fn arb_ramp() -> impl Strategy<Value = Vec<Step>> {
        (
            -50i64..50,
            proptest::option::of(0i64..400),
            proptest::collection::vec((1i64..60, proptest::option::of(1i64..60), 0u64..1000), 1..6),
        )
            .prop_map(|(start, end_len, raw)| {
                let mut steps = Vec::new();
                let mut t = -100;
                for (gap, len, gpus) in raw {
                    t += gap;
                    steps.push((t, len.map(|l| t + l), gpus));
                }
                // Default a missing `until` to the next step's `from`; cap explicit ones there.
                let n = steps.len();
                for i in 0..n {
                    let next = steps.get(i + 1).map(|s| s.0);
                    let s = &mut steps[i];
                    s.1 = match (s.1, next) {
                        (Some(u), Some(nx)) => Some(u.min(nx)),
                        (Some(u), None) => Some(u),
                        (None, nx) => nx,
                    };
                }
                clip_ramp(start, end_len.map(|l| start + l), &steps)
            })
    }

    proptest! {
        #[test]
        fn billing_periods_are_consecutive_local_months(
            t in ms_between("2020-01-01T00:00:00Z", "2035-12-31T23:59:59.999Z"),
            zone in 0..ZONES.len(),
            anchor in 1i8..=31,
        ) {
            let z = tz(ZONES[zone]);
            let (start, end) = billing_period(&z, anchor, t);
            prop_assert!(start <= t && t < end);
            // Consecutive: the next period starts exactly at `end`, the previous ends at `start`.
            prop_assert_eq!(billing_period(&z, anchor, end).0, end);
            prop_assert_eq!(billing_period(&z, anchor, start - 1).1, start);
            // The start is the first instant of the (clamped) anchor day, in local time.
            let local = z.to_datetime(Timestamp::from_millisecond(start).unwrap());
            let clamped = anchor.min(local.date().days_in_month());
            prop_assert_eq!(local.day(), clamped);
            prop_assert_eq!(local.time(), jiff::civil::Time::midnight());
            prop_assert_eq!(start_of_day(&z, local.date()).unwrap(), start);
            // 28..=31 days, give or take a DST shift (at most an hour).
            let len = end - start;
            prop_assert!(len >= 28 * 86_400_000 - 3_600_000, "{}", len);
            prop_assert!(len <= 31 * 86_400_000 + 3_600_000, "{}", len);
        }

        #[test]
        fn gpu_ms_is_additive(ramp in arb_ramp(), mut pts in proptest::collection::vec(-200i64..600, 3)) {
            pts.sort_unstable();
            let (a, b, c) = (pts[0], pts[1], pts[2]);
            prop_assert_eq!(gpu_ms(&ramp, a, b) + gpu_ms(&ramp, b, c), gpu_ms(&ramp, a, c));
        }

        #[test]
        fn gpu_ms_is_the_sum_over_each_millisecond(ramp in arb_ramp(), a in -200i64..600, len in 0i64..500) {
            let brute: i64 = (a..a + len).map(|t| gpus_at(&ramp, t) as i64).sum();
            prop_assert_eq!(gpu_ms(&ramp, a, a + len), brute);
        }

        #[test]
        fn time_spec_parsing_never_panics(s in "[0-9T:Zz+. -]{0,40}") {
            let _ = parse_time_spec(&s);
        }
    }

    fn ms_between(a: &str, b: &str) -> std::ops::Range<i64> {
        ms(a)..ms(b)
    }
}
