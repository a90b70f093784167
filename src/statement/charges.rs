//! What a billing period costs, in integer micro-units of the contract currency: the
//! commitment, the overage beyond it and, once the period is over, the SLA credit. The FOCUS
//! export ([`super::focus`]) splits the same amounts by day with [`apportion`], so its rows
//! add up to these exactly. Pure.
//!
//! - **Commitment**: committed GPU-ms × `price_per_gpu_hour`, rounded once (the SLA's
//!   committed cost).
//! - **Overage**: GPU time used beyond the commitment is not covered by it, so it is billed
//!   as uncommitted GPU time: at `on_demand_price_per_gpu_hour` when the contract sets one
//!   (the provider's price of a GPU-hour without a commitment, validated to be above the
//!   committed price), else at `price_per_gpu_hour` (the only price known: a lower bound of
//!   what the provider may bill). Rounded once.
//! - **SLA credit**: [`super::sla::Assessment::credit_micros`], counted only once the period
//!   is over: before, the delivered share can still change, and a credit is owed for a
//!   period, not for part of one.

use super::sla::{cost_micros, price_micros};
use crate::contract::Contract;
use crate::ledger::{Kind, Totals};

/// The period's charges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Charges {
    /// Committed GPU-ms at the contract price.
    pub committed_micros: i128,
    pub overage_gpu_ms: i64,
    /// The price overage is billed at, micro-units per GPU-hour.
    pub overage_price_micros: i64,
    /// `true`: the contract's on-demand price; `false`: its committed price.
    pub overage_at_on_demand: bool,
    pub overage_micros: i128,
    /// `committed_micros + overage_micros`.
    pub total_micros: i128,
    /// The SLA credit: `None` for a contract without `sla` or a period not yet over.
    pub credit_micros: Option<i128>,
    /// `total_micros` less the credit.
    pub due_micros: i128,
}

/// The price overage is billed at, micro-units per GPU-hour, and whether it is on demand.
pub fn overage_price(contract_price: f64, on_demand: Option<f64>) -> (i64, bool) {
    match on_demand {
        Some(p) => (price_micros(p), true),
        None => (price_micros(contract_price), false),
    }
}

/// The charges of a period's sealed `totals`; `credit_micros` is the SLA's credit, passed
/// only for a period that is over.
pub fn of(contract: &Contract, totals: &Totals, credit_micros: Option<i128>) -> Charges {
    let committed_micros = cost_micros(
        totals[Kind::Committed],
        price_micros(contract.price_per_gpu_hour),
    );
    let (overage_price_micros, overage_at_on_demand) = overage_price(
        contract.price_per_gpu_hour,
        contract.on_demand_price_per_gpu_hour,
    );
    let overage_gpu_ms = totals[Kind::Overage].max(0);
    let overage_micros = cost_micros(overage_gpu_ms, overage_price_micros);
    let total_micros = committed_micros + overage_micros;
    Charges {
        committed_micros,
        overage_gpu_ms,
        overage_price_micros,
        overage_at_on_demand,
        overage_micros,
        total_micros,
        credit_micros,
        due_micros: total_micros - credit_micros.unwrap_or(0),
    }
}

/// Splits the cost of `parts` GPU-ms (each at least 0) at `price_micros` per GPU-hour into
/// one amount per part, such that they add up to the cost of their sum rounded once
/// ([`cost_micros`]) exactly: part `i` is the rounded cost of the running sum through `i`
/// less that through `i − 1`, so each differs from its own rounded cost by at most one
/// micro-unit and the roundings do not accumulate.
pub fn apportion(parts: &[i64], price_micros: i64) -> Vec<i128> {
    let mut sum: i64 = 0;
    let mut before: i128 = 0;
    parts
        .iter()
        .map(|&p| {
            sum = sum.saturating_add(p.max(0));
            let through = cost_micros(sum, price_micros);
            let part = through - before;
            before = through;
            part
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn overage_is_on_demand_when_the_contract_says_and_the_credit_comes_off() {
        let mut c = crate::statement::tests::contract("UTC", 2.0);
        let mut t = Totals::default();
        t[Kind::Committed] = 10 * 3_600_000;
        t[Kind::Overage] = 1_800_000; // half a GPU-hour
        let ch = of(&c, &t, None);
        assert_eq!(
            (
                ch.committed_micros,
                ch.overage_micros,
                ch.overage_at_on_demand
            ),
            (20_000_000, 1_000_000, false)
        );
        assert_eq!(ch.due_micros, 21_000_000);
        c.on_demand_price_per_gpu_hour = Some(3.5);
        let ch = of(&c, &t, Some(2_000_000));
        assert_eq!(
            (
                ch.overage_micros,
                ch.overage_price_micros,
                ch.overage_at_on_demand
            ),
            (1_750_000, 3_500_000, true)
        );
        assert_eq!((ch.total_micros, ch.due_micros), (21_750_000, 19_750_000));
    }

    proptest! {
        /// The parts add up to the whole's cost rounded once, and each is within one
        /// micro-unit of its own rounded cost.
        #[test]
        fn apportioned_parts_add_up_to_the_whole_exactly(
            parts in prop::collection::vec(0i64..(1 << 40), 0..60),
            price in 0i64..1_000_000_000_000,
        ) {
            let got = apportion(&parts, price);
            prop_assert_eq!(got.len(), parts.len());
            let total: i64 = parts.iter().sum();
            prop_assert_eq!(got.iter().sum::<i128>(), cost_micros(total, price));
            for (p, g) in parts.iter().zip(&got) {
                prop_assert!((g - cost_micros(*p, price)).abs() <= 1);
                prop_assert!(*g >= 0);
            }
        }
    }
}
