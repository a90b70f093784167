//! A [`Statement`] as FOCUS 1.2 commitment rows (the FinOps Open Cost and Usage
//! Specification), CSV: per local day of the billing period, a `Purchase` row for the day's
//! commitment and two `Usage` rows, `Used` (used within the commitment) and `Unused` (the rest
//! of it: idle, undelivered and unreported). commitmeter's own kinds are `x_` columns, each on
//! the one row of its day it belongs to, so every column sums over rows. docs/focus.md maps
//! every column. Pure.
//!
//! Quantities are GPU-hours with 9 decimals (from integer GPU-ms, rounded half to even);
//! costs are in the billing currency with 6 decimals (micro-units, [`super::sla`]): the
//! purchase is the committed GPU-ms at the price, rounded once; the `Used` row's effective
//! cost is the used GPU-ms at the price, rounded once; the `Unused` row's is the difference,
//! so each day's `Used` + `Unused` effective cost equals its purchase exactly.

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

/// The three rows of a day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    /// The day's commitment, paid whether used or not.
    Purchase,
    /// Used within the commitment.
    Used,
    /// The commitment's rest: idle, undelivered, unreported.
    Unused,
}

impl Charge {
    pub const ALL: [Charge; 3] = [Charge::Purchase, Charge::Used, Charge::Unused];
}

/// The row of its day a kind's `x_` column is filled on (empty on the other two), so that a
/// column summed over rows is the kind's total. `used` and `overage` on `Used`: all use and
/// the part beyond the commitment, which is *not* in the row's quantity.
pub fn row_of(kind: Kind) -> Charge {
    match kind {
        Kind::Committed | Kind::Delivered => Charge::Purchase,
        Kind::Used | Kind::Overage => Charge::Used,
        Kind::Idle | Kind::Undelivered | Kind::Unreported => Charge::Unused,
    }
}

/// `x_<Kind>GPUHours`, e.g. `x_UndeliveredGPUHours`.
fn x_kind(k: Kind) -> String {
    let n = k.name();
    format!("x_{}{}GPUHours", n[..1].to_uppercase(), &n[1..])
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

/// The rows of one statement, in [`FOCUS_COLUMNS`] then [`x_columns`] order.
pub fn rows(s: &Statement) -> Vec<Vec<String>> {
    let price = price_micros(s.price_per_gpu_hour);
    let list = s.on_demand_price_per_gpu_hour.map_or(price, price_micros);
    let mut out = Vec::new();
    for d in &s.days {
        let t: &Totals = &d.totals;
        let committed = t[Kind::Committed].max(0);
        let used = t.used_within().clamp(0, committed);
        let purchase = cost_micros(committed, price);
        let used_cost = cost_micros(used, price);
        for charge in Charge::ALL {
            let (category, frequency, status, quantity, billed, effective, what) = match charge {
                Charge::Purchase => (
                    "Purchase",
                    "Recurring",
                    "",
                    committed,
                    purchase,
                    0,
                    "committed GPU capacity",
                ),
                Charge::Used => (
                    "Usage",
                    "Usage-Based",
                    "Used",
                    used,
                    0,
                    used_cost,
                    "used within the commitment",
                ),
                Charge::Unused => (
                    "Usage",
                    "Usage-Based",
                    "Unused",
                    committed - used,
                    0,
                    purchase - used_cost,
                    "unused commitment (idle, undelivered, unreported)",
                ),
            };
            let mut r = vec![
                money6(billed),
                s.currency.clone(),
                utc(s.end_ms),
                utc(s.start_ms),
                category.to_string(),
                String::new(), // ChargeClass: no corrections
                format!(
                    "GPU commitment {}, {} ({}): {what}",
                    s.contract, d.label, s.timezone
                ),
                frequency.to_string(),
                utc(d.end_ms),
                utc(d.start_ms),
                "Usage".to_string(),
                format!("commitmeter/contract/{}", s.contract),
                s.contract.clone(),
                hours9(quantity),
                status.to_string(),
                "GPU capacity commitment".to_string(),
                UNIT.to_string(),
                money6(cost_micros(quantity, price)),
                money6(i128::from(price)),
                money6(effective),
                money6(cost_micros(quantity, list)),
                money6(i128::from(list)),
                hours9(quantity),
                UNIT.to_string(),
                s.provider.clone(),
            ];
            r.extend([
                s.contract.clone(),
                d.label.clone(),
                s.timezone.clone(),
                d.provisional.to_string(),
                d.minutes_accounted.to_string(),
                d.minutes().to_string(),
            ]);
            r.extend(Kind::ALL.iter().map(|&k| {
                if row_of(k) == charge {
                    hours9(t[k])
                } else {
                    String::new()
                }
            }));
            out.push(r);
        }
    }
    out
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

    proptest! {
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
