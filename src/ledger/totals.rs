//! Month-to-date figures of a contract from its sealed minutes: utilization, idle
//! budget, month-end projection, required pace, costs. Pure functions of their inputs.

use std::collections::VecDeque;

use super::{Kind, Sealed, Totals, MINUTE_MS};

const HOUR_MS: f64 = 3_600_000.0;
const DAY_MINUTES: usize = 24 * 60;

/// Sealed totals of one contract: all time, the current billing period, the last 24 h.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Running {
    pub all_time: Totals,
    pub period_start_ms: i64,
    pub period_end_ms: i64,
    pub period: Totals,
    /// The last day of sealed minutes, oldest first, for the pace of use.
    recent: VecDeque<(i64, Totals)>,
    recent_sum: Totals,
}

impl Running {
    /// Starts tracking a period; `period` holds what was sealed in it so far, `recent`
    /// the sealed minutes of the last day (from durable storage after a restart).
    pub fn new(
        all_time: Totals,
        period: (i64, i64),
        in_period: Totals,
        recent: Vec<(i64, Totals)>,
    ) -> Self {
        let mut r = Self {
            all_time,
            period_start_ms: period.0,
            period_end_ms: period.1,
            period: in_period,
            ..Self::default()
        };
        for (m, t) in recent {
            r.push_recent(m, t);
        }
        r
    }

    fn push_recent(&mut self, minute: i64, t: Totals) {
        self.recent.push_back((minute, t));
        self.recent_sum.add(&t);
        while self
            .recent
            .front()
            .is_some_and(|(m, _)| *m <= minute - DAY_MINUTES as i64)
        {
            let (_, old) = self.recent.pop_front().expect("front exists");
            self.recent_sum.add(&negate(&old));
        }
    }

    /// Adds a sealed minute. Returns false when it belongs to a later period: the
    /// caller then starts a new `Running` for that period (figures reset monthly).
    pub fn add(&mut self, s: &Sealed) -> bool {
        let start = s.minute * MINUTE_MS;
        if start >= self.period_end_ms {
            return false;
        }
        self.all_time.add(&s.totals);
        if start >= self.period_start_ms {
            self.period.add(&s.totals);
        }
        self.push_recent(s.minute, s.totals);
        true
    }

    /// Adds a sealed minute, first moving to the period that contains it when it lies
    /// past the current one (`period_of` gives the billing period of an instant).
    pub fn record(&mut self, s: &Sealed, period_of: impl Fn(i64) -> (i64, i64)) {
        if !self.add(s) {
            self.roll(period_of(s.minute * MINUTE_MS));
            self.add(s);
        }
    }

    /// Moves to the next period, keeping all-time sums and the last day.
    pub fn roll(&mut self, period: (i64, i64)) {
        self.period_start_ms = period.0;
        self.period_end_ms = period.1;
        self.period = Totals::default();
    }

    pub fn recent(&self) -> (usize, Totals) {
        (self.recent.len(), self.recent_sum)
    }
}

fn negate(t: &Totals) -> Totals {
    Totals::from_fn(|k| -t[k])
}

/// The GPU-ms of a kind that the contract's price applies to, or `None` for a kind that
/// has no cost: what was paid for (committed) and where it went (used within the
/// commitment, idle and its two parts, undelivered). Delivered, unreported and overage are
/// not priced. The parts of idle are priced as idle is, so their costs add up to idle's:
/// never add them to it.
pub fn billed(t: &Totals, kind: Kind) -> Option<i64> {
    match kind {
        Kind::Committed
        | Kind::Idle
        | Kind::Undelivered
        | Kind::IdleUnallocated
        | Kind::IdleAllocated => Some(t[kind]),
        Kind::Used => Some(t.used_within()),
        Kind::Delivered | Kind::Unreported | Kind::Overage => None,
    }
}

/// The month-to-date gauges of a contract. `None` where a figure is undefined
/// (nothing committed yet, nothing left to use): left out rather than made up.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Figures {
    pub utilization: Option<f64>,
    pub idle_budget_remaining: Option<f64>,
    pub projected_utilization: Option<f64>,
    pub required_utilization: Option<f64>,
    /// Month-to-date cost per kind ([`billed`] GPU-ms at the contract's price); `None`
    /// for a kind that has no cost. Read it with [`Figures::cost`].
    pub costs: [Option<f64>; Kind::COUNT],
}

impl Figures {
    /// The month-to-date cost of a kind, or `None` when the kind has no cost.
    pub fn cost(&self, kind: Kind) -> Option<f64> {
        self.costs[kind as usize]
    }
}

/// Inputs besides the sealed totals: the commitment over the whole period and over
/// what is left of it (from the sealed horizon to the period end), the time left,
/// the target and the price.
#[derive(Debug, Clone, Copy)]
pub struct Terms {
    pub committed_period: i64,
    pub committed_remaining: i64,
    pub remaining_ms: i64,
    pub target_utilization: f64,
    pub price_per_gpu_hour: f64,
}

pub fn figures(r: &Running, terms: &Terms) -> Figures {
    let p = &r.period;
    let ratio = |a: f64, b: f64| (b > 0.0).then(|| a / b);
    let used = p.used_within() as f64;
    let utilization = ratio(used, p.committed as f64);

    // The idle budget is the share of the whole period's commitment that may sit idle.
    let budget = (1.0 - terms.target_utilization) * terms.committed_period as f64;
    let idle_budget_remaining = if budget > 0.0 {
        Some(1.0 - p.idle as f64 / budget)
    } else if terms.committed_period > 0 {
        Some(if p.idle > 0 { 0.0 } else { 1.0 })
    } else {
        None
    };

    // Pace of use over the last day of sealed minutes, in GPUs, projected over what
    // is left of the period; use within the commitment cannot exceed what is committed.
    let (minutes, recent) = r.recent();
    let projected_utilization = if minutes > 0 && terms.committed_period > 0 {
        // The pace of all use, not only use within the commitment: a commitment that
        // ramps up absorbs today's overage, and `committed_remaining` caps it anyway.
        let pace = recent.used as f64 / (minutes as f64 * MINUTE_MS as f64);
        let projected =
            (pace * terms.remaining_ms.max(0) as f64).min(terms.committed_remaining as f64);
        Some((used + projected) / terms.committed_period as f64)
    } else {
        None
    };

    let required_utilization = ratio(
        (terms.target_utilization * terms.committed_period as f64 - used).max(0.0),
        terms.committed_remaining as f64,
    );

    let cost = |gpu_ms: i64| gpu_ms as f64 / HOUR_MS * terms.price_per_gpu_hour;
    Figures {
        utilization,
        idle_budget_remaining,
        projected_utilization,
        required_utilization,
        costs: Kind::ALL.map(|k| billed(p, k).map(cost)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::split;
    use proptest::prelude::*;

    const M: i64 = MINUTE_MS;

    fn sealed(minute: i64, committed: i64, delivered: i64, used: i64) -> Sealed {
        Sealed {
            contract: 0,
            minute,
            totals: split(committed, delivered, used, 0, false),
            ..Sealed::default()
        }
    }

    #[test]
    fn month_to_date_figures_by_hand() {
        // A 30-day period of 10 GPUs; one day sealed at 8 GPUs delivered, 6 used.
        let period_ms = 30 * 24 * 60 * M;
        let mut r = Running::new(Totals::default(), (0, period_ms), Totals::default(), vec![]);
        for m in 0..1440 {
            assert!(r.add(&sealed(m, 10 * M, 8 * M, 6 * M)));
        }
        let terms = Terms {
            committed_period: 10 * period_ms,
            committed_remaining: 10 * 29 * 1440 * M,
            remaining_ms: 29 * 1440 * M,
            target_utilization: 0.9,
            price_per_gpu_hour: 2.0,
        };
        let f = figures(&r, &terms);
        assert_eq!(f.utilization, Some(0.6));
        // Budget: 10 % of 300 GPU-days = 30 GPU-days; 2 GPU-days idle spent.
        assert!((f.idle_budget_remaining.unwrap() - (1.0 - 2.0 / 30.0)).abs() < 1e-12);
        // Pace 6 GPUs for 29 more days: (6 + 6*29) / 300 = 0.6.
        assert!((f.projected_utilization.unwrap() - 0.6).abs() < 1e-12);
        // Need 270 GPU-days, have 6: 264 over 290 committed remaining.
        assert!((f.required_utilization.unwrap() - 264.0 / 290.0).abs() < 1e-12);
        let cost = |k| f.cost(k).expect("a priced kind");
        assert!((cost(Kind::Committed) - 10.0 * 24.0 * 2.0).abs() < 1e-9);
        assert!((cost(Kind::Used) - 6.0 * 24.0 * 2.0).abs() < 1e-9);
        assert!((cost(Kind::Idle) - 2.0 * 24.0 * 2.0).abs() < 1e-9);
        assert!((cost(Kind::Undelivered) - 2.0 * 24.0 * 2.0).abs() < 1e-9);
        for k in [Kind::Delivered, Kind::Unreported, Kind::Overage] {
            assert_eq!(f.cost(k), None);
        }
        // The next period's first minute is refused until the caller rolls over.
        assert!(!r.add(&sealed(30 * 1440, 10 * M, 10 * M, 10 * M)));
        r.roll((period_ms, 2 * period_ms));
        assert!(r.add(&sealed(30 * 1440, 10 * M, 10 * M, 10 * M)));
        assert_eq!(r.period.used, 10 * M);
        assert_eq!(r.all_time.used, 1440 * 6 * M + 10 * M);
    }

    #[test]
    fn undefined_figures_are_left_out() {
        let r = Running::new(Totals::default(), (0, M), Totals::default(), vec![]);
        let terms = Terms {
            committed_period: 0,
            committed_remaining: 0,
            remaining_ms: M,
            target_utilization: 0.95,
            price_per_gpu_hour: 1.0,
        };
        let f = figures(&r, &terms);
        assert_eq!(
            (
                f.utilization,
                f.idle_budget_remaining,
                f.projected_utilization,
                f.required_utilization
            ),
            (None, None, None, None)
        );
    }

    proptest! {
        /// The window of the last day holds exactly the minutes of the last 24 h,
        /// and its sums match a recomputation.
        #[test]
        fn last_day_window_is_exact(gaps in prop::collection::vec((1i64..200, 0i64..100), 1..200)) {
            let mut r = Running::new(Totals::default(), (0, i64::MAX), Totals::default(), vec![]);
            let mut minute = 0;
            let mut all = Vec::new();
            for (gap, used) in gaps {
                minute += gap;
                let s = sealed(minute, 100, 100, used);
                r.add(&s);
                all.push(s);
            }
            let want: Vec<&Sealed> = all.iter().filter(|s| s.minute > minute - 1440).collect();
            let (n, sum) = r.recent();
            prop_assert_eq!(n, want.len());
            prop_assert_eq!(sum.used, want.iter().map(|s| s.totals.used).sum::<i64>());
        }
    }
}
