//! The thresholds of the contract alerts, owned here for Rust: the status page's "would
//! fire" list judges sealed minutes by these, and `tests/rules.rs` fails when they and the
//! shipped rules in `alerts/commitmeter-alerts.yml` disagree (alert name, windows, ratio,
//! `for` and severity). The underuse burn-rate tiers are in [`super::burn::TIERS`].
//!
//! Changing a threshold means changing it here and in the rule file (and its unit tests in
//! `alerts/tests/`); the rules test says which field of which alert differs.

use super::{Kind, Totals};

/// The `severity` label of an alert: who is woken up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Page,
    Ticket,
}

impl Severity {
    /// The label value, as written in the rules.
    pub const fn as_str(self) -> &'static str {
        match self {
            Severity::Page => "page",
            Severity::Ticket => "ticket",
        }
    }
}

/// An alert on the share of committed GPU time of one kind (undelivered, unreported)
/// over a long and a short window: it fires when both exceed `ratio`.
#[derive(Debug, Clone, Copy)]
pub struct RatioAlert {
    /// The `alert:` name in the rule file.
    pub alert: &'static str,
    pub severity: Severity,
    /// The share of committed GPU time above which the alert fires (strictly above).
    pub ratio: f64,
    pub long_s: f64,
    pub short_s: f64,
    /// The kind of GPU time whose share of committed time is watched (the
    /// `contract:commitmeter_<kind>_ratio:rate<window>` series of the recording rules).
    pub kind: Kind,
    /// What the status page calls it.
    pub summary: &'static str,
}

/// Page: more than 10 % of the committed GPU time undelivered over the last 30 minutes
/// (and its 5-minute window).
pub const DELIVERY_SHORTFALL_MAJOR: RatioAlert = RatioAlert {
    alert: "CommitmeterDeliveryShortfallMajor",
    severity: Severity::Page,
    ratio: 0.10,
    long_s: 1800.0,
    short_s: 300.0,
    kind: Kind::Undelivered,
    summary: "major delivery shortfall",
};

/// Ticket: more than 2 % of the committed GPU time undelivered over the last hour (and
/// its 5-minute window): SLA evidence.
pub const DELIVERY_SHORTFALL: RatioAlert = RatioAlert {
    alert: "CommitmeterDeliveryShortfall",
    severity: Severity::Ticket,
    ratio: 0.02,
    long_s: 3600.0,
    short_s: 300.0,
    kind: Kind::Undelivered,
    summary: "delivery shortfall",
};

/// Ticket: more than 5 % of the committed GPU time unreported (hosts no scrape covered)
/// over the last hour (and its 5-minute window).
pub const CAPACITY_UNREPORTED: RatioAlert = RatioAlert {
    alert: "CommitmeterCapacityUnreported",
    severity: Severity::Ticket,
    ratio: 0.05,
    long_s: 3600.0,
    short_s: 300.0,
    kind: Kind::Unreported,
    summary: "capacity unreported",
};

/// The ratio alerts, in the order of the rule file.
pub const RATIO_ALERTS: [RatioAlert; 3] = [
    DELIVERY_SHORTFALL_MAJOR,
    DELIVERY_SHORTFALL,
    CAPACITY_UNREPORTED,
];

/// A condition on the month-to-date figures, held for `for_s` before the rule fires.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Condition {
    /// The `alert:` name in the rule file.
    pub alert: &'static str,
    pub severity: Severity,
    /// The rule's `for:` (the status page judges the condition now, without the delay).
    pub for_s: f64,
}

/// Ticket when the idle budget remaining of the period is at or below
/// [`IDLE_BUDGET_EXHAUSTED_AT`] (0: spent; negative: overspent).
pub const IDLE_BUDGET_EXHAUSTED: Condition = Condition {
    alert: "CommitmeterIdleBudgetExhausted",
    severity: Severity::Ticket,
    for_s: 300.0,
};

/// The idle budget remaining (a share of the period's budget) at or below which
/// [`IDLE_BUDGET_EXHAUSTED`] fires.
pub const IDLE_BUDGET_EXHAUSTED_AT: f64 = 0.0;

/// Ticket when the projected period-end utilization is below the contract's target.
pub const PROJECTED_TARGET_MISS: Condition = Condition {
    alert: "CommitmeterProjectedTargetMiss",
    severity: Severity::Ticket,
    for_s: 3.0 * 3600.0,
};

/// Ticket when the aggregator cannot scrape an agent of the contract (any at all).
pub const TARGET_DOWN: Condition = Condition {
    alert: "CommitmeterTargetDown",
    severity: Severity::Ticket,
    for_s: 300.0,
};

impl RatioAlert {
    /// The share of committed GPU time of this alert's kind over the last `window_s` of
    /// sealed minutes (oldest first): a ratio of sums; `None` with nothing committed.
    pub fn ratio_over(&self, minutes: &[(i64, Totals)], window_s: f64) -> Option<f64> {
        let tail = &minutes[minutes.len().saturating_sub((window_s / 60.0) as usize)..];
        let committed: i64 = tail.iter().map(|(_, t)| t.committed).sum();
        let part: i64 = tail.iter().map(|(_, t)| t[self.kind]).sum();
        (committed > 0).then(|| part as f64 / committed as f64)
    }

    /// The long window's share when both windows exceed the ratio (the rule fires).
    pub fn firing(&self, minutes: &[(i64, Totals)]) -> Option<f64> {
        let over = |w: f64| self.ratio_over(minutes, w).filter(|r| *r > self.ratio);
        over(self.short_s).and(over(self.long_s))
    }
}
