//! Burn-rate tiers on the idle budget (after the SRE workbook's multi-window,
//! multi-burn-rate alerts). A tier fires when the idle ratio over both its windows
//! exceeds `f · P / w · B`: spending a fraction `f` of the period's idle budget
//! `B = 1 − target` within the long window `w`, for a billing period of length `P`.
//! The idle ratio cannot exceed 1, so a tier whose threshold is above 1 can never
//! fire: the aggregator reports that instead of letting a page silently never come.

use super::alerts::Severity;

/// One alerting tier; names match the `tier` label and the alert rules
/// (`tests/rules.rs` checks every field against `alerts/`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tier {
    /// The `tier` label of the alert and of its recorded threshold.
    pub name: &'static str,
    /// The `alert:` name in `alerts/commitmeter-alerts.yml`.
    pub alert: &'static str,
    pub severity: Severity,
    /// Share of the period's idle budget spent within `long_s`.
    pub budget_fraction: f64,
    /// The long window `w`, in seconds.
    pub long_s: f64,
    /// The short window that must burn too (so the alert resets soon after the burn stops).
    pub short_s: f64,
    /// The rule's `for:` (none: the short window already debounces).
    pub for_s: f64,
}

pub const TIERS: [Tier; 4] = [
    Tier {
        name: "page_1h",
        alert: "CommitmeterUnderuseBurn1h",
        severity: Severity::Page,
        budget_fraction: 0.02,
        long_s: 3600.0,
        short_s: 300.0,
        for_s: 0.0,
    },
    Tier {
        name: "page_6h",
        alert: "CommitmeterUnderuseBurn6h",
        severity: Severity::Page,
        budget_fraction: 0.05,
        long_s: 6.0 * 3600.0,
        short_s: 1800.0,
        for_s: 0.0,
    },
    Tier {
        name: "ticket_1d",
        alert: "CommitmeterUnderuseBurn1d",
        severity: Severity::Ticket,
        budget_fraction: 0.10,
        long_s: 86_400.0,
        short_s: 2.0 * 3600.0,
        for_s: 0.0,
    },
    Tier {
        name: "ticket_3d",
        alert: "CommitmeterUnderuseBurn3d",
        severity: Severity::Ticket,
        budget_fraction: 0.10,
        long_s: 3.0 * 86_400.0,
        short_s: 6.0 * 3600.0,
        for_s: 0.0,
    },
];

impl Tier {
    /// The burn rate factor `f · P / w` (14.4 for the fast page in a 30-day month).
    pub fn factor(&self, period_s: f64) -> f64 {
        self.budget_fraction * period_s / self.long_s
    }

    /// The idle ratio above which this tier fires.
    pub fn threshold(&self, period_s: f64, target_utilization: f64) -> f64 {
        self.factor(period_s) * (1.0 - target_utilization)
    }

    /// Whether the idle ratio (at most 1) can ever exceed the threshold.
    pub fn reachable(&self, period_s: f64, target_utilization: f64) -> bool {
        self.threshold(period_s, target_utilization) < 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DAY: f64 = 86_400.0;

    #[test]
    fn factors_follow_the_real_month_length() {
        let fast = TIERS[0];
        assert!((fast.factor(28.0 * DAY) - 13.44).abs() < 1e-9);
        assert!((fast.factor(30.0 * DAY) - 14.4).abs() < 1e-9);
        assert!((fast.factor(31.0 * DAY) - 14.88).abs() < 1e-9);
        // T = 0.95 in a 30-day month: the fast page needs 72 % idle.
        assert!((fast.threshold(30.0 * DAY, 0.95) - 0.72).abs() < 1e-9);
        assert!(fast.reachable(30.0 * DAY, 0.95));
        // T = 0.93: 14.4 × 0.07 = 1.008 > 1, the fast page can never fire.
        assert!(!fast.reachable(30.0 * DAY, 0.93));
        // The 3-day ticket (factor 1.03 in a 31-day month) is reachable unless the
        // target is under 3.3 %.
        assert!(TIERS[3].reachable(31.0 * DAY, 0.05));
        assert!(!TIERS[3].reachable(31.0 * DAY, 0.0));
    }

    proptest! {
        /// A higher target (smaller budget) never makes a tier unreachable, and a
        /// shorter month never does either.
        #[test]
        fn reachability_is_monotonic(t in 0.0f64..1.0, dt in 0.0f64..0.5, days in 28u32..=31) {
            let p = f64::from(days) * DAY;
            for tier in TIERS {
                if tier.reachable(p, t) {
                    prop_assert!(tier.reachable(p, (t + dt).min(1.0)));
                    prop_assert!(tier.reachable(28.0 * DAY, t));
                }
            }
        }
    }
}

/// Windows shown next to the alert tiers, in minutes.
pub const WINDOWS: [(&str, usize); 7] = [
    ("5m", 5),
    ("30m", 30),
    ("1h", 60),
    ("2h", 120),
    ("6h", 360),
    ("1d", 1440),
    ("3d", 4320),
];

/// Idle ratio over the last `window` sealed minutes (oldest first in `minutes`):
/// a ratio of sums, never a mean of per-minute ratios, since commitments ramp.
pub fn idle_ratio(minutes: &[(i64, super::Totals)], window: usize) -> Option<f64> {
    let tail = &minutes[minutes.len().saturating_sub(window)..];
    let committed: i64 = tail.iter().map(|(_, t)| t.committed).sum();
    let idle: i64 = tail.iter().map(|(_, t)| t.idle).sum();
    (committed > 0).then(|| idle as f64 / committed as f64)
}

/// The tiers whose long and short windows both burn above their threshold now.
pub fn firing(minutes: &[(i64, super::Totals)], period_s: f64, target: f64) -> Vec<Tier> {
    TIERS
        .into_iter()
        .filter(|t| {
            let thr = t.threshold(period_s, target);
            let over = |w: f64| idle_ratio(minutes, (w / 60.0) as usize).is_some_and(|r| r > thr);
            t.reachable(period_s, target) && over(t.long_s) && over(t.short_s)
        })
        .collect()
}

#[cfg(test)]
mod window_tests {
    use super::*;
    use crate::ledger::split;

    #[test]
    fn ratios_are_ratios_of_sums_and_tiers_need_both_windows() {
        // An hour at 10 GPUs all idle, then 5 minutes at 20 GPUs all busy.
        let mut m: Vec<(i64, crate::ledger::Totals)> =
            (0..60).map(|i| (i, split(600, 600, 0, 0, false))).collect();
        m.extend((60..65).map(|i| (i, split(1200, 1200, 1200, 0, false))));
        assert_eq!(idle_ratio(&m, 5), Some(0.0));
        let r = idle_ratio(&m, 60).unwrap();
        assert!((r - 55.0 * 600.0 / (55.0 * 600.0 + 5.0 * 1200.0)).abs() < 1e-12);
        // The 1h window burns, its 5m window does not: no fast page. (The slower
        // tiers fire: on a history shorter than their windows they act early.)
        let fast = |m: &[(i64, crate::ledger::Totals)]| {
            firing(m, 30.0 * 86_400.0, 0.95)
                .iter()
                .any(|t| t.name == "page_1h")
        };
        assert!(!fast(&m));
        m.extend((65..70).map(|i| (i, split(1200, 1200, 0, 0, false))));
        assert!(fast(&m));
        assert_eq!(idle_ratio(&[], 5), None);
    }
}
