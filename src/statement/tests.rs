use std::path::Path;

use proptest::prelude::*;

use super::*;
use crate::contract::parse;

/// A 4-GPU contract from 2026-01-01 in `tz` (also for other modules' tests).
pub(crate) fn contract(tz: &str, price: f64) -> Contract {
    contract_with(tz, price, "")
}

/// A 4-GPU contract from 2026-01-01 in `tz`, with `extra` keys.
pub(crate) fn contract_with(tz: &str, price: f64, extra: &str) -> Contract {
    let text = format!(
        r#"
[[targets]]
targets = ["h:1"]
labels = {{ provider = "p" }}

[[contracts]]
id = "c"
provider = "p"
price_per_gpu_hour = {price}
currency = "EUR"
target_utilization = 0.9
timezone = "{tz}"
start = "2026-01-01"
selector = 'provider="p"'
ramp = [{{ from = "2026-01-01", gpus = 4 }}]
{extra}
"#
    );
    parse(Path::new("t.toml"), &text)
        .unwrap()
        .contracts
        .remove(0)
}

fn t(m: i64) -> Totals {
    let committed = 4 * MINUTE_MS;
    let delivered = (m % 5) * MINUTE_MS;
    let used = (m % 7).min(5) * MINUTE_MS / 2;
    crate::ledger::split(committed, delivered, used.min(delivered), 0, false)
}

#[test]
fn berlin_october_2026_has_a_25_hour_day_and_march_2027_a_23_hour_one() {
    let c = contract("Europe/Berlin", 2.0);
    let oct = c.billing_period_of_month(2026, 10).unwrap();
    let s = build(&c, oct, &[], &[], &LedgerInfo::default(), oct.1 + 1);
    assert_eq!(s.days.len(), 31);
    assert_eq!(s.period, "2026-10");
    assert!(!s.provisional && s.starts_before_ledger);
    for d in &s.days {
        let want = if d.label == "2026-10-25" {
            25 * 60
        } else {
            24 * 60
        };
        assert_eq!(d.minutes(), want, "{}", d.label);
    }
    assert_eq!(s.local_time(oct.0), "2026-10-01T00:00:00+02:00");
    assert_eq!(s.local_time(oct.1), "2026-11-01T00:00:00+01:00");
    let mar = c.billing_period_of_month(2027, 3).unwrap();
    let s = build(&c, mar, &[], &[], &LedgerInfo::default(), mar.0);
    let short: Vec<_> = s.days.iter().filter(|d| d.minutes() != 1440).collect();
    assert_eq!(short.len(), 1);
    assert_eq!(
        (short[0].label.as_str(), short[0].minutes()),
        ("2027-03-28", 23 * 60)
    );
    assert!(s.provisional && s.days.iter().all(|d| d.provisional));
}

#[test]
fn periods_parse_as_year_and_month() {
    assert_eq!(parse_period("2026-11"), Ok((2026, 11)));
    for bad in [
        "2026-13",
        "2026-00",
        "2026-1",
        "26-11",
        "2026/11",
        "november",
        "2026-11-01",
    ] {
        let e = parse_period(bad).unwrap_err();
        assert!(e.contains(&format!("{bad:?}")), "{e}");
    }
}

fn late(delivered_gpu_ms: i64, used_gpu_ms: i64) -> Late {
    Late {
        delivered_gpu_ms,
        used_gpu_ms,
    }
}

#[test]
fn costs_follow_billed_and_the_text_names_them() {
    let c = contract("UTC", 2.0);
    let p = c.billing_period_of_month(2026, 11).unwrap();
    let m0 = p.0 / MINUTE_MS;
    // One hour of 4 committed GPUs, 3 delivered, 2 used: 2 GPU-h used, 1 idle (a quarter
    // of it held by a process), 1 undelivered.
    let minute = crate::ledger::split_held(
        4 * MINUTE_MS,
        3 * MINUTE_MS,
        2 * MINUTE_MS,
        MINUTE_MS / 4,
        0,
        false,
    );
    let minutes: Vec<_> = (0..60).map(|i| (m0 + i, minute)).collect();
    let info = LedgerInfo {
        since_minute: Some(m0),
        sealed_through_minute: Some(m0 + 60),
        // Late GPU-ms for the period's first minute, its second day and the minute before
        // it: the last is another period's.
        late: vec![
            (m0 - 1, late(7, 7)),
            (m0, late(1, 0)),
            (m0 + 1440, late(2, 1)),
        ],
    };
    let s = build(&c, p, &minutes, &[], &info, p.0 + 3_600_000);
    assert!(!s.starts_before_ledger && s.provisional);
    assert_eq!(s.total.cost(Kind::Committed, 2.0), Some(8.0));
    assert_eq!(s.total.cost(Kind::Used, 2.0), Some(4.0));
    assert_eq!(s.total.cost(Kind::Idle, 2.0), Some(2.0));
    assert_eq!(s.total.cost(Kind::Undelivered, 2.0), Some(2.0));
    assert_eq!(s.total.cost(Kind::Delivered, 2.0), None);
    assert_eq!(s.total.utilization(), Some(0.5));
    assert_eq!(
        (s.total.minutes_accounted, s.total.minutes()),
        (60, 30 * 1440)
    );
    assert_eq!(
        (s.days[0].late, s.days[1].late, s.total.late),
        (late(1, 0), late(2, 1), late(3, 1)),
        "late GPU-ms land in the day of their minute; other periods' are left out"
    );
    let text = render::text(&s);
    assert!(
        text.contains("Cost (EUR): committed 8.00, used within the commitment 4.00, idle 2.00, undelivered 2.00"),
        "{text}"
    );
    assert!(text.contains("provisional"), "{text}");
    // The idle split, indented under idle; its parts are in no column of the day table.
    assert!(
        text.contains(
            "Idle by cause (EUR):  GPU-hours  cost\n  \
               idle                    1.000  2.00\n    \
                 idle_unallocated      0.750  1.50  no compute process held the GPU\n    \
                 idle_allocated        0.250  0.50  a process held it; the usage signal says unused\n"
        ),
        "{text}"
    );
    let header = text.lines().find(|l| l.starts_with("day")).unwrap();
    assert!(!header.contains("idle_"), "{header}");
    let csv = render::csv(&s).unwrap();
    let mut r = csv::Reader::from_reader(csv.as_bytes());
    assert_eq!(r.records().count(), 31);
}

#[test]
fn gpu_hours_round_half_up_in_integers() {
    assert_eq!(render::gpu_hours(0), "0.000");
    assert_eq!(render::gpu_hours(3_600_000), "1.000");
    assert_eq!(render::gpu_hours(1_800), "0.001");
    assert_eq!(render::gpu_hours(1_799), "0.000");
    assert_eq!(render::gpu_hours(123 * 3_600_000 + 3_599_999), "124.000");
}

proptest! {
    /// Day rows sum exactly to the total, the total to the minutes, every row's identity
    /// holds, and the days tile the period (23/24/25-hour days only).
    #[test]
    fn days_sum_to_the_total_and_the_minutes(
        zone in prop::sample::select(vec!["Europe/Berlin", "America/Los_Angeles", "Australia/Lord_Howe", "UTC", "Asia/Kolkata"]),
        month in 1i8..=12,
        picks in prop::collection::btree_set(0i64..45_000, 0..400),
    ) {
        let c = contract(zone, 1.5);
        let (a, b) = c.billing_period_of_month(2026, month).unwrap();
        // Minutes from a little before the period to a little after it.
        let first = a / MINUTE_MS - 60;
        let minutes: Vec<(i64, Totals)> = picks.iter().map(|&i| (first + i, t(i))).collect();
        let s = build(&c, (a, b), &minutes, &[], &LedgerInfo::default(), b);
        let inside: Vec<&(i64, Totals)> =
            minutes.iter().filter(|(m, _)| *m * MINUTE_MS >= a && *m * MINUTE_MS < b).collect();
        let mut want = Totals::default();
        for (_, x) in &inside {
            want.add(x);
        }
        prop_assert_eq!(s.total.totals, want);
        prop_assert_eq!(s.total.minutes_accounted, inside.len() as i64);
        let mut sum = Totals::default();
        let mut accounted = 0;
        let mut at = a;
        for d in &s.days {
            prop_assert_eq!(d.start_ms, at);
            prop_assert!([23 * 60, 24 * 60, 25 * 60, 23 * 60 + 30, 24 * 60 + 30].contains(&d.minutes()), "{} {}", d.label, d.minutes());
            prop_assert!(d.identity_holds());
            sum.add(&d.totals);
            accounted += d.minutes_accounted;
            at = d.end_ms;
        }
        prop_assert_eq!(at, b);
        prop_assert_eq!(sum, s.total.totals);
        prop_assert_eq!(accounted, s.total.minutes_accounted);
        prop_assert!(s.total.identity_holds());
        prop_assert_eq!(s.total.minutes(), (b - a) / MINUTE_MS);
    }
}

#[test]
fn the_sla_credit_through_the_statement_at_each_tier_boundary() {
    let c = contract_with(
        "UTC",
        2.0,
        "sla = { delivery_target = 0.99, credits = [ { below = 0.99, credit = 0.10 }, \
         { below = 0.95, credit = 0.30 } ], claim_window_days = 30 }",
    );
    let period = c.billing_period_of_month(2026, 1).unwrap();
    let first = period.0 / MINUTE_MS;
    // 100 sealed minutes of 4 GPUs: 24,000,000 committed GPU-ms, so 1 % and 5 % are whole
    // GPU-ms; `undelivered` spread over the first minutes, the rest idle.
    let minutes = |undelivered: i64| -> Vec<(i64, Totals)> {
        let per = 4 * MINUTE_MS;
        (0..100)
            .map(|i| {
                let u = (undelivered - i * per).clamp(0, per);
                let mut t = Totals::default();
                t[Kind::Committed] = per;
                t[Kind::Undelivered] = u;
                t[Kind::Delivered] = per - u;
                t[Kind::Idle] = per - u;
                (first + i, t)
            })
            .collect()
    };
    let committed = 100 * 4 * MINUTE_MS;
    let (at_99, at_95) = (committed / 100, committed / 20);
    // 24,000,000 GPU-ms at 2.00 per GPU-hour = 13.333333 EUR: 10 % is 1.333333, 30 % 4.
    for (undelivered, tier, credit_micros) in [
        (at_99 - 1, None, 0),
        (at_99, None, 0), // exactly 0.99 is not below it
        (at_99 + 1, Some(0), 1_333_333),
        (at_95 - 1, Some(0), 1_333_333),
        (at_95, Some(0), 1_333_333),
        (at_95 + 1, Some(1), 4_000_000),
    ] {
        let s = build(
            &c,
            period,
            &minutes(undelivered),
            &[],
            &LedgerInfo::default(),
            period.1,
        );
        assert_eq!(s.total.totals[Kind::Undelivered], undelivered);
        let sla = s.sections.sla.as_ref().unwrap();
        assert_eq!(sla.assessment.tier, tier, "undelivered {undelivered}");
        assert_eq!(sla.assessment.committed_cost_micros, 13_333_333);
        assert_eq!(sla.assessment.credit_micros, credit_micros);
        assert_eq!(
            sla.claim_deadline.as_ref().unwrap().1,
            "2026-03-03T00:00:00+00:00[UTC]"
        );
        let json = render::json(&s);
        assert!(json.contains(&format!("\"credit_micros\": {credit_micros},")));
        let text = render::text(&s);
        assert!(text.contains("SLA credit: tier reached"), "{text}");
        // 100 minutes are far too few for any sizing lookback.
        let sizing = s.sections.sizing.as_ref().unwrap();
        assert!(sizing.lookbacks.iter().all(|(_, l)| l.is_none()));
    }
}
