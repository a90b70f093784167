//! The SLA credit of a billing period, from its sealed ledger totals: the delivered share of
//! the commitment, the credit tier reached, the credit in the contract currency and the claim
//! deadline. Pure: no I/O, no clocks (the period end is passed in).
//!
//! # Which figure decides the credit
//!
//! Every sealed minute splits the commitment exactly (`committed = used within the
//! commitment + idle + undelivered + unreported`, README "What each figure proves"):
//! **undelivered** is positive evidence that the provider did not deliver (GPUs an agent
//! watched and did not see present, or a fleet seen to be smaller than the commitment);
//! **unreported** is capacity commitmeter could not see, no claim either way (often our own
//! scrape failures). A credit is a claim against the provider, so it is decided on evidence
//! only:
//!
//! - [`Assessment::delivered_share`] = (committed − undelivered) / committed: unreported
//!   counts as delivered. This decides the tier and the credit.
//! - [`Assessment::delivered_share_seen`] = (committed − undelivered − unreported) /
//!   committed = (used within the commitment + idle) / committed: what was *seen* delivered,
//!   unreported counted against the provider. Shown beside it (with the tier it would reach,
//!   [`Assessment::tier_if_unreported_undelivered`]) so a reader knows how much the
//!   unreported could change the claim if the provider's own records showed it undelivered.
//!
//! # Exactness
//!
//! Shares are exact fractions of integer GPU-milliseconds; a tier is reached when the share is
//! strictly below its `below` threshold, compared by cross-multiplication against the
//! threshold in parts per million (the config allows at most 6 decimal places, so a threshold
//! is exactly what was written): no float rounding can tip a share exactly at a threshold
//! either way. Money is in micro-units of the contract currency (millionths of a dollar for
//! USD), from the price rounded once to micro-units ([`price_micros`]), each amount computed
//! from the exact product and rounded once, half to even (no bias towards either party).

use crate::contract::{Contract, CreditTier, Sla, PPM};
use crate::ledger::{Kind, Totals};

/// Milliseconds in an hour: prices are per GPU-hour, the ledger counts GPU-milliseconds.
pub const HOUR_MS: i128 = 3_600_000;

/// A price per GPU-hour (finite, >= 0, at most `MAX_PRICE_PER_GPU_HOUR` = 1e6 as the config
/// validates) in micro-units of its currency per GPU-hour, rounded to the nearest (a price
/// with more than 6 decimal places moves by less than half a micro-unit).
pub fn price_micros(price_per_gpu_hour: f64) -> i64 {
    (price_per_gpu_hour * f64::from(PPM)).round() as i64
}

/// `n / d` rounded to the nearest integer, ties to even; `n >= 0`, `d > 0`.
pub(crate) fn div_round_half_even(n: i128, d: i128) -> i128 {
    debug_assert!(n >= 0 && d > 0);
    let (q, r) = (n / d, n % d);
    if 2 * r > d || (2 * r == d && q % 2 == 1) {
        q + 1
    } else {
        q
    }
}

/// The cost of `gpu_ms` GPU-milliseconds at `price_micros` per GPU-hour, in micro-units of
/// the currency, rounded half to even (negative GPU-ms count as 0).
pub fn cost_micros(gpu_ms: i64, price_micros: i64) -> i128 {
    div_round_half_even(
        i128::from(gpu_ms.max(0)) * i128::from(price_micros.max(0)),
        HOUR_MS,
    )
}

/// An exact share of the commitment: `num / den` GPU-ms, `0 <= num <= den`, `den > 0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub num: i64,
    pub den: i64,
}

impl Share {
    /// Whether the share is strictly below `ppm` parts per million:
    /// `num / den < ppm / 1e6` ⇔ `num · 1e6 < ppm · den`, exactly in `i128`.
    pub fn is_below(&self, ppm: u32) -> bool {
        i128::from(self.num) * i128::from(PPM) < i128::from(ppm) * i128::from(self.den)
    }

    /// For display only (never for a decision): the share as a ratio in [0, 1].
    pub fn ratio(&self) -> f64 {
        self.num as f64 / self.den as f64
    }
}

/// What the SLA says about one billing period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assessment {
    /// Committed GPU-ms of the period (sealed minutes).
    pub committed_gpu_ms: i64,
    /// (committed − undelivered) / committed: the evidence-only share that decides the
    /// credit (see the module doc). `None` when nothing was committed.
    pub delivered_share: Option<Share>,
    /// (committed − undelivered − unreported) / committed: unreported counted against the
    /// provider. Information only. `None` when nothing was committed.
    pub delivered_share_seen: Option<Share>,
    /// Whether `delivered_share` reaches `delivery_target`; `None` when nothing was committed.
    pub target_met: Option<bool>,
    /// Index into `sla.credits` of the tier reached on `delivered_share`: the severest tier
    /// whose `below` the share is strictly under. `None`: no credit.
    pub tier: Option<usize>,
    /// The tier `delivered_share_seen` would reach. Information only: not claimable on
    /// commitmeter's evidence.
    pub tier_if_unreported_undelivered: Option<usize>,
    /// The credit of `tier` in parts per million of the committed cost; 0 without a tier.
    pub credit_ppm: u32,
    /// Committed GPU-ms × price, in micro-units of the contract currency.
    pub committed_cost_micros: i128,
    /// The credit owed: committed GPU-ms × price × credit, rounded once, in micro-units of the
    /// contract currency.
    pub credit_micros: i128,
}

/// The severest tier (`tiers` from mildest to severest, `below` strictly falling) whose
/// `below` the share is strictly under; `None` when the share is under none.
pub fn tier_reached(tiers: &[CreditTier], share: Share) -> Option<usize> {
    // `below` falls along the list, so the tiers reached are a prefix of it.
    tiers.iter().rposition(|t| share.is_below(t.below_ppm))
}

/// The SLA's verdict on a period's sealed `totals` (GPU-ms, [`Totals`] of the ledger) at a
/// price of `price_micros` per GPU-hour ([`price_micros`]).
pub fn assess(sla: &Sla, totals: &Totals, price_micros: i64) -> Assessment {
    let committed = totals[Kind::Committed].max(0);
    let share = |missing: i64| {
        (committed > 0).then(|| Share {
            num: committed.saturating_sub(missing).clamp(0, committed),
            den: committed,
        })
    };
    let undelivered = totals[Kind::Undelivered].max(0);
    let delivered_share = share(undelivered);
    let delivered_share_seen = share(undelivered.saturating_add(totals[Kind::Unreported].max(0)));
    let tier = delivered_share.and_then(|s| tier_reached(&sla.credits, s));
    let credit_ppm = tier.map_or(0, |i| sla.credits[i].credit_ppm);
    let product = i128::from(committed) * i128::from(price_micros.max(0));
    Assessment {
        committed_gpu_ms: committed,
        delivered_share,
        delivered_share_seen,
        target_met: delivered_share.map(|s| !s.is_below(sla.delivery_target_ppm)),
        tier,
        tier_if_unreported_undelivered: delivered_share_seen
            .and_then(|s| tier_reached(&sla.credits, s)),
        credit_ppm,
        committed_cost_micros: div_round_half_even(product, HOUR_MS),
        credit_micros: div_round_half_even(
            product * i128::from(credit_ppm),
            HOUR_MS * i128::from(PPM),
        ),
    }
}

/// The last instant a credit for the period ending at `period_end_ms` (exclusive, as
/// [`Contract::billing_period`] gives it) can be claimed by: `claim_window_days` local
/// calendar days after the period end in the contract's time zone, same wall-clock time
/// (local midnight of the anchor day, so across a DST change the window is an hour shorter
/// or longer than `days × 24 h`). Claims must arrive before this instant. Returns the
/// instant in ms and as an RFC 9557 timestamp with offset and zone; `None` beyond the
/// calendar's range.
pub fn claim_deadline(contract: &Contract, sla: &Sla, period_end_ms: i64) -> Option<(i64, String)> {
    contract.local_days_after(period_end_ms, sla.claim_window_days)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The example: target 0.99, 10 % below 0.99, 30 % below 0.95.
    fn example() -> Sla {
        Sla {
            delivery_target_ppm: 990_000,
            credits: vec![
                CreditTier {
                    below_ppm: 990_000,
                    credit_ppm: 100_000,
                },
                CreditTier {
                    below_ppm: 950_000,
                    credit_ppm: 300_000,
                },
            ],
            claim_window_days: 30,
        }
    }

    /// A period's totals that keep the ledger identity: nothing used, the rest idle.
    fn totals(committed: i64, undelivered: i64, unreported: i64) -> Totals {
        let mut t = Totals::default();
        t[Kind::Committed] = committed;
        t[Kind::Undelivered] = undelivered;
        t[Kind::Unreported] = unreported;
        t[Kind::Idle] = committed - undelivered - unreported;
        t[Kind::Delivered] = t[Kind::Idle];
        t
    }

    /// 1,000 GPU-hours.
    const C: i64 = 1000 * 3_600_000;

    #[test]
    fn each_tier_boundary_exactly_at_one_gpu_ms_above_and_below() {
        let sla = example();
        // Undelivered GPU-ms that puts the share exactly at each threshold (C is a multiple
        // of 100, so 1 % and 5 % of it are whole GPU-ms).
        let at_99 = C / 100;
        let at_95 = C / 20;
        for (undelivered, tier, met) in [
            (0, None, true),
            (at_99 - 1, None, true),
            (at_99, None, true), // exactly 0.99: not below it
            (at_99 + 1, Some(0), false),
            (at_95 - 1, Some(0), false),
            (at_95, Some(0), false), // exactly 0.95: below 0.99, not below 0.95
            (at_95 + 1, Some(1), false),
            (C, Some(1), false),
        ] {
            let a = assess(&sla, &totals(C, undelivered, 0), 2_100_000);
            assert_eq!(a.tier, tier, "undelivered {undelivered}");
            assert_eq!(a.target_met, Some(met), "undelivered {undelivered}");
            let credit = [0, 100_000, 300_000][tier.map_or(0, |i| i + 1)];
            assert_eq!(a.credit_ppm, credit);
            // 1,000 GPU-hours at 2.10: 2,100.00, and the credit a whole share of it.
            assert_eq!(a.committed_cost_micros, 2_100_000_000);
            assert_eq!(
                a.credit_micros,
                2_100_000_000 * i128::from(credit) / 1_000_000
            );
        }
    }

    #[test]
    fn a_threshold_float_arithmetic_gets_wrong_is_decided_exactly() {
        // Committed 100 GPU-ms, 3 undelivered: the share is exactly 0.97, which no f64 holds
        // (0.97 as f64 is a little off it, and so is 97/100): the integer comparison says
        // "not below 0.97" whichever way a float would have rounded.
        let sla = Sla {
            delivery_target_ppm: 970_000,
            credits: vec![CreditTier {
                below_ppm: 970_000,
                credit_ppm: 250_000,
            }],
            claim_window_days: 1,
        };
        assert_eq!(assess(&sla, &totals(100, 3, 0), 1).tier, None);
        assert_eq!(assess(&sla, &totals(100, 4, 0), 1).tier, Some(0));
        // Committed not a multiple of the threshold's denominator: 0.97 × 7 = 6.79.
        assert_eq!(assess(&sla, &totals(7, 0, 0), 1).tier, None);
        assert_eq!(assess(&sla, &totals(7, 1, 0), 1).tier, Some(0)); // 6/7 = 0.857
        assert!(
            !Share { num: 679, den: 700 }.is_below(970_000),
            "exactly 0.97"
        );
        assert!(Share { num: 678, den: 700 }.is_below(970_000));
    }

    #[test]
    fn unreported_does_not_earn_a_credit_but_is_shown() {
        let sla = example();
        // 2 % unreported, nothing undelivered: no claim on the evidence.
        let a = assess(&sla, &totals(C, 0, C / 50), 2_100_000);
        assert_eq!(a.delivered_share, Some(Share { num: C, den: C }));
        assert_eq!(
            a.delivered_share_seen,
            Some(Share {
                num: C - C / 50,
                den: C
            })
        );
        assert_eq!(
            (a.tier, a.credit_micros, a.target_met),
            (None, 0, Some(true))
        );
        assert_eq!(a.tier_if_unreported_undelivered, Some(0));
        // 2 % undelivered and 4 % unreported: tier 0 claimable, tier 1 if all were undelivered.
        let a = assess(&sla, &totals(C, C / 50, C / 25), 2_100_000);
        assert_eq!(
            (a.tier, a.tier_if_unreported_undelivered),
            (Some(0), Some(1))
        );
        assert_eq!(a.credit_micros, 210_000_000);
    }

    #[test]
    fn nothing_committed_has_no_share_and_no_credit() {
        let a = assess(&example(), &Totals::default(), 2_100_000);
        assert_eq!(
            (a.delivered_share, a.target_met, a.tier, a.credit_micros),
            (None, None, None, 0)
        );
    }

    #[test]
    fn money_is_rounded_once_half_to_even() {
        assert_eq!(price_micros(2.10), 2_100_000);
        assert_eq!(price_micros(0.0000005), 1); // half a micro-unit rounds away from 0 here
        assert_eq!(price_micros(1e6), 1_000_000_000_000);
        assert_eq!(div_round_half_even(5, 2), 2);
        assert_eq!(div_round_half_even(7, 2), 4);
        assert_eq!(div_round_half_even(6, 4), 2);
        assert_eq!(div_round_half_even(5, 4), 1);
        // 1,800,000 GPU-ms (half a GPU-hour) at 1 micro-unit: exactly half → 0 (even).
        assert_eq!(cost_micros(1_800_000, 1), 0);
        assert_eq!(cost_micros(5_400_000, 1), 2); // 1.5 → 2
        assert_eq!(cost_micros(1_800_001, 1), 1);
        // The credit is rounded from the exact product, not from a rounded cost: 1 GPU-ms at
        // 3.60 is 1 micro-unit of cost; 30 % of it is 0.3, credited 0.
        let a = assess(&example(), &totals(1, 1, 0), 3_600_000);
        assert_eq!((a.committed_cost_micros, a.credit_micros), (1, 0));
    }

    fn arb_sla() -> impl Strategy<Value = Sla> {
        // 1..=4 distinct thresholds, sorted falling; credits strictly growing.
        (
            prop::collection::btree_set(1u32..=1_000_000, 1..=4),
            0u32..=1000,
        )
            .prop_map(|(belows, step)| {
                let belows: Vec<u32> = belows.into_iter().rev().collect();
                let target = belows[0];
                let credits = belows
                    .iter()
                    .enumerate()
                    .map(|(i, &b)| CreditTier {
                        below_ppm: b,
                        credit_ppm: (i as u32 + 1) * (step + 1),
                    })
                    .collect();
                Sla {
                    delivery_target_ppm: target,
                    credits,
                    claim_window_days: 30,
                }
            })
    }

    proptest! {
        /// The tier against an independent formulation: tier i is reached exactly when
        /// undelivered ≥ ⌊committed · (1e6 − below_i) / 1e6⌋ + 1.
        #[test]
        fn the_tier_is_the_severest_whose_undelivered_threshold_is_passed(
            sla in arb_sla(),
            committed in 1i64..=i64::MAX / 4,
            frac in 0u64..=1_000_000,
        ) {
            let undelivered = (i128::from(committed) * i128::from(frac) / 1_000_000) as i64;
            let truth = sla.credits.iter().rposition(|t| {
                let min = i128::from(committed) * i128::from(PPM - t.below_ppm)
                    / i128::from(PPM) + 1;
                i128::from(undelivered) >= min
            });
            let a = assess(&sla, &totals(committed, undelivered, 0), 2_100_000);
            prop_assert_eq!(a.tier, truth);
        }

        /// More delivered (undelivered turned idle) never reaches a severer tier, nor owes
        /// more credit.
        #[test]
        fn the_tier_is_monotone_in_delivered(
            sla in arb_sla(),
            committed in 1i64..=10_000_000_000,
            a in 0u64..=1_000_000,
            b in 0u64..=1_000_000,
            unreported_frac in 0u64..=1_000_000,
        ) {
            let part = |f: u64| (i128::from(committed) * i128::from(f) / 1_000_000) as i64;
            let (more, less) = (part(a.min(b)), part(a.max(b)));
            let unreported = part(unreported_frac).min(committed - less);
            let worse = assess(&sla, &totals(committed, less, unreported), 2_100_000);
            let better = assess(&sla, &totals(committed, more, unreported), 2_100_000);
            // None < Some(0) < Some(1) < ...: severity order.
            prop_assert!(better.tier <= worse.tier);
            prop_assert!(better.credit_micros <= worse.credit_micros);
            prop_assert!(better.tier_if_unreported_undelivered <= worse.tier_if_unreported_undelivered);
            prop_assert!(worse.tier <= worse.tier_if_unreported_undelivered);
        }
    }
}
