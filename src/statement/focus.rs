//! A [`Statement`] as FOCUS 1.2 commitment rows (the FinOps Open Cost and Usage
//! Specification), CSV: per local day of the billing period, a `Purchase` row for the day's
//! commitment and two `Usage` rows, `Used` (used within the commitment) and `Unused` (the rest
//! of it: idle, undelivered and unreported), and on a day with overage an `Overage` `Usage`
//! row not covered by the commitment (no `CommitmentDiscount*` columns); then, once the period
//! is over, a `Credit` row for the SLA credit if there is one. commitmeter's own kinds are `x_`
//! columns, each on the one row of its day it belongs to, so every column sums over rows.
//! docs/focus.md maps every column. Pure.
//!
//! Quantities are GPU-hours with 9 decimals (from integer GPU-ms, rounded half to even);
//! costs are in the billing currency with 6 decimals (micro-units, [`super::sla`]). The
//! purchases of the days are the period's committed cost, rounded once, split by day with
//! [`super::charges::apportion`] (each within a micro-unit of its own rounded cost), and so are
//! the overage rows' costs: the rows add up to the statement's [`super::charges::Charges`]
//! exactly. The `Used` row's effective cost is the used GPU-ms at the price, rounded once (at
//! most the purchase); the `Unused` row's is the rest of the purchase, so each day's `Used` +
//! `Unused` effective cost equals its purchase exactly.

use super::charges::apportion;
use super::sla::{cost_micros, div_round_half_even, price_micros};
use super::Statement;
use crate::ledger::{Kind, Totals};

/// The FOCUS columns written, in order (FOCUS columns first, then the `x_` ones,
/// [`x_columns`]).
pub const FOCUS_COLUMNS: [&str; 25] = [
    "BilledCost",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargeFrequency",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "CommitmentDiscountCategory",
    "CommitmentDiscountId",
    "CommitmentDiscountName",
    "CommitmentDiscountQuantity",
    "CommitmentDiscountStatus",
    "CommitmentDiscountType",
    "CommitmentDiscountUnit",
    "ContractedCost",
    "ContractedUnitPrice",
    "EffectiveCost",
    "ListCost",
    "ListUnitPrice",
    "PricingQuantity",
    "PricingUnit",
    "ProviderName",
];

/// The unit of quantities and prices.
pub const UNIT: &str = "GPU-Hours";

/// The rows of a day, and the period's credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    /// The day's commitment, paid whether used or not.
    Purchase,
    /// Used within the commitment.
    Used,
    /// The commitment's rest: idle, undelivered, unreported.
    Unused,
    /// Used beyond the commitment: not covered by it, billed on its own (only on days with
    /// overage).
    Overage,
    /// The period's SLA credit (once the period is over, when there is one).
    Credit,
}

/// The row of its day a kind's `x_` column is filled on (empty on the others), so that a
/// column summed over rows is the kind's total. `used` on `Used`: all use, of which the row's
/// quantity is the part within the commitment and the `Overage` row's the rest.
pub fn row_of(kind: Kind) -> Charge {
    match kind {
        Kind::Committed | Kind::Delivered => Charge::Purchase,
        Kind::Used => Charge::Used,
        Kind::Overage => Charge::Overage,
        Kind::Idle
        | Kind::Undelivered
        | Kind::Unreported
        | Kind::IdleUnallocated
        | Kind::IdleAllocated => Charge::Unused,
    }
}

/// `x_<Kind>GPUHours` with the kind in PascalCase, e.g. `x_UndeliveredGPUHours`,
/// `x_IdleAllocatedGPUHours`.
fn x_kind(k: Kind) -> String {
    let pascal: String = k
        .name()
        .split('_')
        .map(|w| w[..1].to_uppercase() + &w[1..])
        .collect();
    format!("x_{pascal}GPUHours")
}

/// The `x_` columns, in order.
pub fn x_columns() -> Vec<String> {
    let mut v: Vec<String> = ["x_ContractId", "x_LocalDate", "x_TimeZone", "x_Provisional"]
        .map(String::from)
        .to_vec();
    v.extend(["x_MinutesAccounted".to_string(), "x_Minutes".to_string()]);
    v.extend(Kind::ALL.iter().map(|&k| x_kind(k)));
    v
}

/// GPU-ms as GPU-hours with 9 decimals, rounded half to even (nanohours = ms × 2500 / 9).
pub fn hours9(ms: i64) -> String {
    let n = i128::from(ms).abs() * 2500;
    let nano = div_round_half_even(n, 9);
    let sign = if ms < 0 && nano > 0 { "-" } else { "" };
    format!("{sign}{}.{:09}", nano / 1_000_000_000, nano % 1_000_000_000)
}

/// Micro-units as a decimal with 6 places.
pub fn money6(micros: i128) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let a = micros.abs();
    format!("{sign}{}.{:06}", a / 1_000_000, a % 1_000_000)
}

/// UTC `YYYY-MM-DDTHH:mm:ssZ`, the spec's date/time format.
pub fn utc(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

/// The FOCUS CSV of statements (one header).
pub fn csv(statements: &[Statement]) -> Result<String, csv::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut header: Vec<String> = FOCUS_COLUMNS.map(String::from).to_vec();
    header.extend(x_columns());
    w.write_record(&header)?;
    for s in statements {
        for r in rows(s) {
            w.write_record(&r)?;
        }
    }
    let bytes = w.into_inner().map_err(|e| e.into_error())?;
    Ok(String::from_utf8(bytes).expect("CSV of UTF-8 strings"))
}

/// One row's values before formatting.
struct Line {
    charge: Charge,
    /// `[start, end)` of the charge period.
    period: (i64, i64),
    what: String,
    /// The quantity (GPU-ms) and the unit prices (contracted, list); `None` for the credit.
    priced: Option<(i64, i64, i64)>,
    billed: i128,
    effective: i128,
    /// The day's row of the statement, for the `x_` columns; `None` for the credit.
    day: Option<usize>,
}

impl Charge {
    /// ChargeCategory, ChargeFrequency and CommitmentDiscountStatus, and whether the row is
    /// a charge of the commitment (the `CommitmentDiscount*` columns).
    fn columns(self) -> (&'static str, &'static str, &'static str, bool) {
        match self {
            Charge::Purchase => ("Purchase", "Recurring", "", true),
            Charge::Used => ("Usage", "Usage-Based", "Used", true),
            Charge::Unused => ("Usage", "Usage-Based", "Unused", true),
            Charge::Overage => ("Usage", "Usage-Based", "", false),
            Charge::Credit => ("Credit", "One-Time", "", true),
        }
    }
}

/// The rows of one statement, in [`FOCUS_COLUMNS`] then [`x_columns`] order.
pub fn rows(s: &Statement) -> Vec<Vec<String>> {
    let price = price_micros(s.price_per_gpu_hour);
    let list = s.on_demand_price_per_gpu_hour.map_or(price, price_micros);
    let overage_price = s.charges.overage_price_micros;
    let of_days = |k: Kind| -> Vec<i64> { s.days.iter().map(|d| d.totals[k].max(0)).collect() };
    let purchases = apportion(&of_days(Kind::Committed), price);
    let overages = apportion(&of_days(Kind::Overage), overage_price);
    let mut lines: Vec<Line> = Vec::new();
    for (i, d) in s.days.iter().enumerate() {
        let t: &Totals = &d.totals;
        let committed = t[Kind::Committed].max(0);
        let used = t.used_within().clamp(0, committed);
        let purchase = purchases[i];
        let used_cost = cost_micros(used, price).min(purchase);
        let line = |charge, quantity, unit, billed, effective, what: &str| Line {
            charge,
            period: (d.start_ms, d.end_ms),
            what: format!("{}, {} ({}): {what}", s.contract, d.label, s.timezone),
            priced: Some((quantity, unit, list)),
            billed,
            effective,
            day: Some(i),
        };
        lines.push(line(
            Charge::Purchase,
            committed,
            price,
            purchase,
            0,
            "committed GPU capacity",
        ));
        lines.push(line(
            Charge::Used,
            used,
            price,
            0,
            used_cost,
            "used within the commitment",
        ));
        lines.push(line(
            Charge::Unused,
            committed - used,
            price,
            0,
            purchase - used_cost,
            "unused commitment (idle, undelivered, unreported)",
        ));
        let overage = t[Kind::Overage].max(0);
        if overage > 0 {
            let what = if s.charges.overage_at_on_demand {
                "used beyond the commitment, at the on-demand price"
            } else {
                "used beyond the commitment, at the contract price"
            };
            lines.push(line(
                Charge::Overage,
                overage,
                overage_price,
                overages[i],
                overages[i],
                what,
            ));
        }
    }
    if let (Some(credit), Some(sla)) = (s.charges.credit_micros, &s.sections.sla) {
        if credit != 0 {
            let share = sla
                .assessment
                .delivered_share
                .map_or_else(String::new, |x| {
                    format!(", delivered share {:.6}", x.ratio())
                });
            lines.push(Line {
                charge: Charge::Credit,
                period: (s.start_ms, s.end_ms),
                what: format!(
                    "{}, billing period {} ({}): SLA credit{share}",
                    s.contract, s.period, s.timezone
                ),
                priced: None,
                billed: -credit,
                effective: -credit,
                day: None,
            });
        }
    }
    lines.iter().map(|l| row(s, l)).collect()
}

/// A [`Line`] as a row's fields.
fn row(s: &Statement, l: &Line) -> Vec<String> {
    let (category, frequency, status, commitment) = l.charge.columns();
    let on = |v: String| if commitment { v } else { String::new() };
    // Quantity, unit, contracted and list unit prices and costs; for the credit, null
    // prices and costs equal to what it bills (FOCUS: a charge unrelated to other charges).
    let (quantity, unit, contracted, contracted_cost, list, list_cost) = match l.priced {
        Some((q, price, list)) => (
            hours9(q),
            UNIT.to_string(),
            money6(i128::from(price)),
            money6(cost_micros(q, price)),
            money6(i128::from(list)),
            money6(cost_micros(q, list)),
        ),
        None => (
            String::new(),
            String::new(),
            String::new(),
            money6(l.billed),
            String::new(),
            money6(l.billed),
        ),
    };
    let mut r = vec![
        money6(l.billed),
        s.currency.clone(),
        utc(s.end_ms),
        utc(s.start_ms),
        category.to_string(),
        String::new(), // ChargeClass: no corrections
        format!("GPU commitment {}", l.what),
        frequency.to_string(),
        utc(l.period.1),
        utc(l.period.0),
        on("Usage".to_string()),
        on(format!("commitmeter/contract/{}", s.contract)),
        on(s.contract.clone()),
        // CommitmentDiscountQuantity/Unit: on the commitment's usage and purchase rows only.
        if commitment && l.priced.is_some() {
            quantity.clone()
        } else {
            String::new()
        },
        status.to_string(),
        on("GPU capacity commitment".to_string()),
        if commitment && l.priced.is_some() {
            unit.clone()
        } else {
            String::new()
        },
        contracted_cost,
        contracted,
        money6(l.effective),
        list_cost,
        list,
        quantity,
        unit,
        s.provider.clone(),
    ];
    let day = l.day.map(|i| &s.days[i]);
    r.extend([
        s.contract.clone(),
        day.map_or_else(String::new, |d| d.label.clone()),
        s.timezone.clone(),
        day.map_or(s.provisional, |d| d.provisional).to_string(),
        day.map_or_else(String::new, |d| d.minutes_accounted.to_string()),
        day.map_or_else(String::new, |d| d.minutes().to_string()),
    ]);
    r.extend(Kind::ALL.iter().map(|&k| match day {
        Some(d) if row_of(k) == l.charge => hours9(d.totals[k]),
        _ => String::new(),
    }));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn formats() {
        assert_eq!(hours9(3_600_000), "1.000000000");
        assert_eq!(hours9(1), "0.000000278"); // 0.2777… nanohours up
        assert_eq!(hours9(0), "0.000000000");
        assert_eq!(money6(1_234_567), "1.234567");
        assert_eq!(money6(-5), "-0.000005");
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
    }

    /// Sums a money column (6 decimals) of FOCUS rows in micro-units, exactly.
    fn sum_micros(rows: &[Vec<String>], column: &str) -> i128 {
        let c = FOCUS_COLUMNS.iter().position(|h| *h == column).unwrap();
        rows.iter()
            .map(|r| {
                let v = &r[c];
                let (i, f) = v.trim_start_matches('-').split_once('.').unwrap();
                let m = i.parse::<i128>().unwrap() * 1_000_000 + f.parse::<i128>().unwrap();
                if v.starts_with('-') {
                    -m
                } else {
                    m
                }
            })
            .sum()
    }

    fn column<'a>(r: &'a [String], column: &str) -> &'a str {
        &r[FOCUS_COLUMNS.iter().position(|h| *h == column).unwrap()]
    }

    /// A UTC January of 4 committed GPUs under the SLA of the example, every minute
    /// with `undelivered` and `overage` GPU-ms, at `now`.
    fn statement(undelivered: i64, overage: i64, on_demand: bool, now: Option<i64>) -> Statement {
        use crate::ledger::MINUTE_MS;
        let extra = format!(
            "{}sla = {{ delivery_target = 0.99, credits = [ {{ below = 0.99, credit = 0.10 }} ], claim_window_days = 30 }}",
            if on_demand { "on_demand_price_per_gpu_hour = 3.3\n" } else { "" }
        );
        let c = crate::statement::tests::contract_with("UTC", 2.1, &extra);
        let p = c.billing_period_of_month(2026, 1).unwrap();
        let mut t = Totals::default();
        let per = 4 * MINUTE_MS;
        t[Kind::Committed] = per;
        t[Kind::Undelivered] = undelivered;
        t[Kind::Delivered] = per - undelivered + overage;
        t[Kind::Used] = per - undelivered + overage;
        t[Kind::Overage] = overage;
        let minutes: Vec<(i64, Totals)> = (p.0 / MINUTE_MS..p.1 / MINUTE_MS)
            .step_by(7)
            .map(|m| (m, t))
            .collect();
        let info = crate::statement::LedgerInfo {
            since_minute: Some(p.0 / MINUTE_MS),
            sealed_through_minute: Some(p.1 / MINUTE_MS),
            late: Vec::new(),
        };
        crate::statement::build(&c, p, &minutes, &[], &info, now.unwrap_or(p.1))
    }

    #[test]
    fn a_closed_period_has_one_credit_row_and_a_provisional_one_none() {
        // 2 % undelivered: below 0.99, the 10 % tier.
        let s = statement(4_800, 1_000, true, None);
        let credit = s.charges.credit_micros.unwrap();
        assert!(credit > 0);
        let rows = rows(&s);
        let credits: Vec<&Vec<String>> = rows
            .iter()
            .filter(|r| column(r, "ChargeCategory") == "Credit")
            .collect();
        assert_eq!(credits.len(), 1);
        let r = credits[0];
        assert_eq!(column(r, "BilledCost"), money6(-credit));
        for c in ["EffectiveCost", "ListCost", "ContractedCost"] {
            assert_eq!(column(r, c), money6(-credit), "{c}");
        }
        for c in [
            "CommitmentDiscountQuantity",
            "CommitmentDiscountUnit",
            "CommitmentDiscountStatus",
            "PricingQuantity",
            "PricingUnit",
            "ListUnitPrice",
            "ContractedUnitPrice",
            "ChargeClass",
        ] {
            assert_eq!(column(r, c), "", "{c}");
        }
        assert_eq!(column(r, "CommitmentDiscountId"), "commitmeter/contract/c");
        assert_eq!(
            column(r, "ChargePeriodStart"),
            column(r, "BillingPeriodStart")
        );
        assert_eq!(column(r, "ChargePeriodEnd"), column(r, "BillingPeriodEnd"));
        // The period not yet over: the credit is not counted, no row.
        let s = statement(4_800, 1_000, true, Some(s.end_ms - 1));
        assert_eq!(s.charges.credit_micros, None);
        assert!(rows_of(&s, "Credit").is_empty());
        // No tier reached: no row either.
        let s = statement(0, 1_000, true, None);
        assert_eq!(s.charges.credit_micros, Some(0));
        assert!(rows_of(&s, "Credit").is_empty());
    }

    fn rows_of(s: &Statement, category: &str) -> Vec<Vec<String>> {
        rows(s)
            .into_iter()
            .filter(|r| column(r, "ChargeCategory") == category)
            .collect()
    }

    #[test]
    fn overage_rows_are_not_on_the_commitment_and_priced_on_demand_if_known() {
        for on_demand in [true, false] {
            let s = statement(0, 1_000, on_demand, None);
            let over: Vec<Vec<String>> = rows(&s)
                .into_iter()
                .filter(|r| {
                    column(r, "ChargeCategory") == "Usage"
                        && column(r, "CommitmentDiscountId").is_empty()
                })
                .collect();
            assert_eq!(over.len(), s.days.len());
            let unit = if on_demand { "3.300000" } else { "2.100000" };
            for r in &over {
                assert_eq!(column(r, "ContractedUnitPrice"), unit);
                assert_eq!(column(r, "BilledCost"), column(r, "EffectiveCost"));
                for c in FOCUS_COLUMNS
                    .iter()
                    .filter(|c| c.starts_with("CommitmentDiscount"))
                {
                    assert_eq!(column(r, c), "", "{c}");
                }
            }
            assert_eq!(sum_micros(&over, "BilledCost"), s.charges.overage_micros);
        }
    }

    proptest! {
        /// The rows' EffectiveCost (and BilledCost) add up to the statement's charges less
        /// the credit, exactly; the purchases to the committed cost.
        #[test]
        fn effective_cost_sums_to_the_charges_less_the_credit(
            undelivered in 0i64..240_000,
            overage in 0i64..1_000_000,
            on_demand in any::<bool>(),
            closed in any::<bool>(),
        ) {
            // Provisional: on 2026-01-02 (UTC).
            let now = (!closed).then_some(1_767_225_600_000 + 86_400_000);
            let s = statement(undelivered, overage, on_demand, now);
            let rows = rows(&s);
            prop_assert_eq!(sum_micros(&rows, "EffectiveCost"), s.charges.due_micros);
            prop_assert_eq!(sum_micros(&rows, "BilledCost"), s.charges.due_micros);
            prop_assert_eq!(sum_micros(&rows_of(&s, "Purchase"), "BilledCost"), s.charges.committed_micros);
            prop_assert_eq!(
                s.charges.due_micros,
                s.charges.total_micros - s.charges.credit_micros.unwrap_or(0)
            );
            prop_assert_eq!(s.charges.credit_micros.is_some(), closed);
        }

        /// Read back, a quantity is the GPU-ms within half a nanohour.
        #[test]
        fn hours9_is_the_gpu_ms_rounded_to_a_nanohour(ms in -(1i64 << 50)..(1i64 << 50)) {
            let v = hours9(ms);
            let (i, f) = v.trim_start_matches('-').split_once('.').unwrap();
            let mut nano = i.parse::<i128>().unwrap() * 1_000_000_000 + f.parse::<i128>().unwrap();
            if v.starts_with('-') {
                nano = -nano;
            }
            // |nano · 0.0036 − ms| ≤ half a nanohour = 0.0018 ms; in integers × 10,000.
            prop_assert!((nano * 36 - i128::from(ms) * 10_000).abs() <= 18);
        }
    }
}
