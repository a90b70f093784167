//! Renewal sizing: from the used GPUs of each minute over the last 7, 30 and 60 days, the
//! distribution of use and — when the on-demand price is known — the commitment level that
//! would have cost least (commit for the base, pay on-demand for the peaks), with the saving
//! against the current commitment. Pure: no I/O, no clocks.
//!
//! # Units
//!
//! Use is in **used GPU-ms per minute** (the ledger's `used` of a sealed minute, `Kind::Used`:
//! all use, overage included, since the question is what to commit to; 60,000 is one GPU used
//! the whole minute), kept as integers; divide by 60,000 for GPUs, for display only. Where a
//! minute had unreported capacity its use is a lower bound: the sizing leans small there,
//! never towards a commitment nobody was seen to use.
//! Prices are in micro-units of the contract currency per GPU-hour
//! ([`super::sla::price_micros`]); costs in micro-units of the currency.
//!
//! # Coverage
//!
//! A lookback is shown only when at least [`MIN_COVERAGE_PERCENT`] % of its minutes are
//! accounted (sealed in the ledger with a `used` figure); otherwise it is `None`: too little
//! of it is known to mean anything. Minutes before the data's start count as missing, so a
//! ledger 20 days old shows the 7-day lookback only. Costs are those of the accounted
//! minutes (the missing ones are left out, not guessed).
//!
//! # Percentiles
//!
//! Nearest-rank: of `n` accounted minutes sorted ascending, the `p`-th percentile is the
//! value at 1-based rank `⌈p · n / 100⌉`: the smallest value that at least `p` % of the
//! minutes are at or below. Always a value that occurred; `max` is the 100th.
//!
//! # The cheapest commitment
//!
//! Committing `C` whole GPUs over the `M` accounted minutes costs
//! `C · price · M / 60` for the commitment plus `on_demand · Σ max(0, used − C) / 60` for the
//! use beyond it (GPU-hours). As a function of `C` this is convex and piecewise linear: the
//! step from `C` to `C + 1` adds `price · M` minutes' worth of commitment and saves
//! `on_demand · Σ min(1, max(0, used − C))` GPU-minutes of on-demand, and the saving only
//! shrinks as `C` grows. The cheapest `C` is therefore the smallest whose step does not pay;
//! with whole-GPU use that is the `1 − price / on_demand` quantile of use (commit to the level
//! used at least `price / on_demand` of the time). It is found exactly, in integers, by
//! binary search on the step's sign; ties go to the smaller commitment. An on-demand price
//! at or below the committed price gives 0: committing never pays.

use super::sla::{div_round_half_even, HOUR_MS};

/// Minutes in a day.
pub const DAY_MINUTES: u64 = 1440;
/// GPU-ms of one GPU used a whole minute.
pub const GPU_MINUTE_MS: i64 = 60_000;
/// The lookbacks, in days, as the clouds' own recommendations use them.
pub const LOOKBACK_DAYS: [u32; 3] = [7, 30, 60];
/// A lookback needs at least this share of its minutes accounted to be shown.
pub const MIN_COVERAGE_PERCENT: u64 = 90;

/// Prices for sizing, in micro-units of the contract currency per GPU-hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prices {
    /// The contract's `price_per_gpu_hour`.
    pub committed: i64,
    /// `on_demand_price_per_gpu_hour`; `None`: unknown, so no commitment is recommended.
    pub on_demand: Option<i64>,
}

/// Nearest-rank percentiles of used GPU-ms per minute over a lookback's accounted minutes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Distribution {
    pub p50: i64,
    pub p90: i64,
    pub p99: i64,
    pub max: i64,
}

/// The commitment that would have cost least over a lookback's accounted minutes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recommendation {
    /// Whole GPUs to commit; the smallest of the cheapest levels.
    pub gpus: u64,
    /// Commitment plus on-demand beyond it at `gpus`, in micro-units of the currency.
    pub cost_micros: i128,
    /// The same at the current commitment.
    pub current_cost_micros: i128,
    /// `current_cost − cost`, from the exact costs, rounded once; never negative.
    pub saving_micros: i128,
}

/// One lookback of the sizing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookback {
    pub days: u32,
    /// Minutes in the lookback: `days × 1440`.
    pub minutes: u64,
    /// Of them, minutes with a figure (at least 90 %).
    pub accounted: u64,
    pub distribution: Distribution,
    /// `None` when the on-demand price is unknown.
    pub recommendation: Option<Recommendation>,
}

/// The value at 1-based rank `⌈pct · n / 100⌉` of `sorted` (ascending, non-empty);
/// `pct` in 1..=100.
pub fn nearest_rank(sorted: &[i64], pct: u32) -> i64 {
    debug_assert!(!sorted.is_empty() && (1..=100).contains(&pct));
    let n = sorted.len() as u64;
    let rank = (u64::from(pct) * n).div_ceil(100).max(1);
    sorted[(rank - 1) as usize]
}

/// The sizing for each of [`LOOKBACK_DAYS`], in that order; `None` for a lookback less than
/// [`MIN_COVERAGE_PERCENT`] % covered.
///
/// `used` holds the used GPU-ms of each minute, oldest first, the last element being the
/// most recent minute (the lookbacks end after it); `None` for a minute not accounted.
/// Negative figures count as 0. `current_gpus` is the commitment the saving is measured
/// against (the ramp step in force now).
pub fn size(used: &[Option<i64>], prices: Prices, current_gpus: u64) -> Vec<Option<Lookback>> {
    LOOKBACK_DAYS
        .iter()
        .map(|&days| lookback(used, days, prices, current_gpus))
        .collect()
}

/// One lookback of [`size`].
pub fn lookback(
    used: &[Option<i64>],
    days: u32,
    prices: Prices,
    current_gpus: u64,
) -> Option<Lookback> {
    let minutes = u64::from(days) * DAY_MINUTES;
    let window = &used[used.len().saturating_sub(minutes as usize)..];
    let mut values: Vec<i64> = window.iter().flatten().map(|&u| u.max(0)).collect();
    let accounted = values.len() as u64;
    if accounted == 0 || accounted * 100 < minutes * MIN_COVERAGE_PERCENT {
        return None;
    }
    values.sort_unstable();
    let distribution = Distribution {
        p50: nearest_rank(&values, 50),
        p90: nearest_rank(&values, 90),
        p99: nearest_rank(&values, 99),
        max: nearest_rank(&values, 100),
    };
    let recommendation = prices
        .on_demand
        .map(|od| recommend(&values, prices.committed, od, current_gpus));
    Some(Lookback {
        days,
        minutes,
        accounted,
        distribution,
        recommendation,
    })
}

/// The cost of committing `gpus` over the minutes of `used`, in micro-units × ms per hour
/// (divide by [`HOUR_MS`] for micro-units): exact.
pub fn scaled_cost(used: &[i64], price: i64, on_demand: i64, gpus: u64) -> i128 {
    let level = i128::from(gpus) * i128::from(GPU_MINUTE_MS);
    let beyond: i128 = used
        .iter()
        .map(|&u| (i128::from(u.max(0)) - level).max(0))
        .sum();
    // Saturating: only a current commitment far beyond `MAX_COMMITTED_GPUS` could reach it.
    (i128::from(price) * level)
        .saturating_mul(used.len() as i128)
        .saturating_add(i128::from(on_demand) * beyond)
}

/// What committing one more GPU above `gpus` changes, in the units of [`scaled_cost`]:
/// `price · 60,000 · M − on_demand · Σ clamp(used − 60,000 · gpus, 0, 60,000)`.
/// Non-decreasing in `gpus` (the cost is convex).
fn step(used: &[i64], price: i64, on_demand: i64, gpus: u64) -> i128 {
    let level = i128::from(gpus) * i128::from(GPU_MINUTE_MS);
    let saved: i128 = used
        .iter()
        .map(|&u| (i128::from(u.max(0)) - level).clamp(0, i128::from(GPU_MINUTE_MS)))
        .sum();
    i128::from(price) * i128::from(GPU_MINUTE_MS) * used.len() as i128
        - i128::from(on_demand) * saved
}

/// The cheapest whole-GPU commitment for `used` (non-empty), see the module doc.
fn recommend(used: &[i64], price: i64, on_demand: i64, current_gpus: u64) -> Recommendation {
    let (price, on_demand) = (price.max(0), on_demand.max(0));
    let max = used.iter().copied().max().unwrap_or(0).max(0);
    // At ⌈max / 60,000⌉ GPUs nothing is on demand, so one more never pays: the answer is
    // at most that. Smallest `gpus` in [lo, hi] with step(gpus) >= 0.
    let (mut lo, mut hi) = (0u64, (max as u64).div_ceil(GPU_MINUTE_MS as u64));
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if step(used, price, on_demand, mid) >= 0 {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let best = scaled_cost(used, price, on_demand, lo);
    let current = scaled_cost(used, price, on_demand, current_gpus);
    Recommendation {
        gpus: lo,
        cost_micros: div_round_half_even(best, HOUR_MS),
        current_cost_micros: div_round_half_even(current, HOUR_MS),
        saving_micros: div_round_half_even(current - best, HOUR_MS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const G: i64 = GPU_MINUTE_MS;

    #[test]
    fn nearest_rank_percentiles() {
        // 1..=10: p50 is rank 5, p90 rank 9, p99 rank ⌈9.9⌉ = 10.
        let v: Vec<i64> = (1..=10).collect();
        assert_eq!(nearest_rank(&v, 50), 5);
        assert_eq!(nearest_rank(&v, 90), 9);
        assert_eq!(nearest_rank(&v, 99), 10);
        assert_eq!(nearest_rank(&v, 100), 10);
        assert_eq!(nearest_rank(&v, 1), 1);
        // 1..=100: p-th percentile is p.
        let v: Vec<i64> = (1..=100).collect();
        for p in 1..=100 {
            assert_eq!(nearest_rank(&v, p), i64::from(p));
        }
        // One value: every percentile is it.
        assert_eq!(nearest_rank(&[7], 1), 7);
        assert_eq!(nearest_rank(&[7], 99), 7);
        // 201 values: p50 is rank ⌈100.5⌉ = 101 (the median), p99 rank ⌈198.99⌉ = 199.
        let v: Vec<i64> = (0..201).collect();
        assert_eq!(nearest_rank(&v, 50), 100);
        assert_eq!(nearest_rank(&v, 99), 198);
    }

    #[test]
    fn a_lookback_is_shown_only_when_90_percent_covered() {
        let week = (7 * DAY_MINUTES) as usize;
        let prices = Prices {
            committed: 2_000_000,
            on_demand: None,
        };
        // 20 days of data: 7 days shown, 30 and 60 not.
        let used = vec![Some(8 * G); 20 * DAY_MINUTES as usize];
        let s = size(&used, prices, 8);
        assert_eq!(s.len(), 3);
        let w = s[0].as_ref().unwrap();
        assert_eq!(
            (w.days, w.minutes, w.accounted),
            (7, week as u64, week as u64)
        );
        assert_eq!(w.distribution.max, 8 * G);
        assert_eq!(w.recommendation, None, "no on-demand price");
        assert!(s[1].is_none() && s[2].is_none());
        // Exactly 90 % of the week accounted: shown; one minute fewer: not.
        let missing = week / 10;
        let mut used = vec![Some(G); week];
        for m in used.iter_mut().take(missing) {
            *m = None;
        }
        assert_eq!(lookback(&used, 7, prices, 1).unwrap().accounted, 9072);
        used[missing] = None;
        assert_eq!(lookback(&used, 7, prices, 1), None);
        // Only the last `days` minutes count: data before the window is ignored.
        let mut used = vec![Some(100 * G); 10];
        used.extend(vec![Some(G); week]);
        assert_eq!(lookback(&used, 7, prices, 1).unwrap().distribution.max, G);
        assert_eq!(lookback(&[], 7, prices, 1), None);
    }

    #[test]
    fn the_cheapest_commitment_is_the_quantile_at_one_minus_price_over_on_demand() {
        // A week: 8 GPUs all the time, 12 for 25 % of it, 20 for 5 % of it.
        let week = (7 * DAY_MINUTES) as usize;
        let mut used = vec![Some(8 * G); week];
        for (i, m) in used.iter_mut().enumerate() {
            if i % 20 == 0 {
                *m = Some(20 * G);
            } else if i % 20 < 6 {
                *m = Some(12 * G);
            }
        }
        let rec = |on_demand: i64, current: u64| {
            lookback(
                &used,
                7,
                Prices {
                    committed: 2_000_000,
                    on_demand: Some(on_demand),
                },
                current,
            )
            .unwrap()
            .recommendation
            .unwrap()
        };
        // On-demand 4× the price: commit where use exceeds C at most 25 % of the time → 12.
        let r = rec(8_000_000, 20);
        assert_eq!(r.gpus, 12);
        // Cost at 12: 12 GPUs × 2.00 × 168 h + 8 GPUs × 8.00 × 5 % of 168 h.
        assert_eq!(
            r.cost_micros,
            12 * 2 * 168 * 1_000_000 + 8 * 8 * 168 * 1_000_000 / 20
        );
        assert_eq!(r.current_cost_micros, 20 * 2 * 168 * 1_000_000);
        assert_eq!(r.saving_micros, r.current_cost_micros - r.cost_micros);
        // On-demand 1.5× : only what is used ≥ 2/3 of the time → 8.
        assert_eq!(rec(3_000_000, 8).gpus, 8);
        assert_eq!(rec(3_000_000, 8).saving_micros, 0);
        // On-demand 40×: even the 5 % peak pays → 20.
        assert_eq!(rec(80_000_000, 8).gpus, 20);
        // On-demand no dearer than committed: commit nothing.
        assert_eq!(rec(2_000_000, 8).gpus, 0);
        assert_eq!(rec(1_000_000, 8).gpus, 0);
        // A tie: 1 GPU used a quarter of the time at on-demand 4× the price costs the same
        // committed or not; the smaller commitment is recommended.
        let vals = [G, 0, 0, 0];
        assert_eq!(scaled_cost(&vals, 1, 4, 0), scaled_cost(&vals, 1, 4, 1));
        assert_eq!(recommend(&vals, 1, 4, 1).gpus, 0);
        // An absurd current commitment saturates rather than overflowing.
        assert!(recommend(&vals, 1_000_000_000_000, 4, u64::MAX).saving_micros > 0);
    }

    proptest! {
        /// The found level against brute force over every level from 0 to one above the peak:
        /// it costs the least, and no smaller level costs as little.
        #[test]
        fn the_recommendation_is_the_cheapest_level_by_brute_force(
            used in prop::collection::vec(0i64..=40 * G, 1..200),
            price in 0i64..=5_000_000,
            on_demand in 0i64..=40_000_000,
            current in 0u64..=45,
        ) {
            let r = recommend(&used, price, on_demand, current);
            let peak = used.iter().max().unwrap().div_euclid(G) as u64 + 2;
            let costs: Vec<i128> =
                (0..=peak).map(|c| scaled_cost(&used, price, on_demand, c)).collect();
            let min = *costs.iter().min().unwrap();
            let first = costs.iter().position(|&c| c == min).unwrap() as u64;
            prop_assert_eq!(r.gpus, first);
            prop_assert_eq!(r.cost_micros, div_round_half_even(min, HOUR_MS));
            prop_assert!(r.saving_micros >= 0);
            // Convex: the steps never shrink.
            for w in costs.windows(3) {
                prop_assert!(w[2] - w[1] >= w[1] - w[0]);
            }
        }

        /// Nearest rank against its definition: the smallest value that at least p % of the
        /// values are at or below.
        #[test]
        fn nearest_rank_is_the_smallest_value_covering_p_percent(
            mut v in prop::collection::vec(-5i64..50, 1..300),
            p in 1u32..=100,
        ) {
            v.sort_unstable();
            let x = nearest_rank(&v, p);
            let n = v.len() as u64;
            let at_or_below = v.iter().filter(|&&y| y <= x).count() as u64;
            let below = v.iter().filter(|&&y| y < x).count() as u64;
            prop_assert!(at_or_below * 100 >= u64::from(p) * n);
            prop_assert!(below * 100 < u64::from(p) * n);
        }
    }
}
