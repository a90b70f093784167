//! The contract model: the aggregator's TOML config and its validation, the billing calendar
//! and ramps, and host selectors.
//!
//! Pure code: no I/O except reading the config file itself in [`load`] (the files it names
//! are read by the aggregator when it is prepared), no clocks (times are passed
//! in), no async. Times are `i64` milliseconds since the Unix epoch everywhere in this API;
//! time zones, DST and calendar months are handled inside (with jiff's bundled tz database, so
//! every host computes the same periods).
//!
//! # Which contract a target belongs to
//!
//! A target (an agent's `host:port`) is matched on its **target labels**: the labels of its
//! `[[targets]]` group (or its file_sd entry) plus `instance` = the target address; build that
//! map with [`target_labels`]. A contract's `selector` decides whether the target is the
//! contract's; a target may belong to at most one contract ([`assign`]). The contract's
//! optional `model` regex then filters GPUs on that host by the model name the agent reports.

mod calendar;
mod config;
mod selector;
pub mod shard;
pub mod teams;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use regex::Regex;

pub use config::{
    load, parse, AggregatorConfig, BasicAuthFile, ConfigError, ContractRef, FileSd, IdentityFiles,
    PostgresSettings, Scheme, ScrapeSettings, StorageSettings, TargetGroup,
    DEFAULT_BODY_LIMIT_BYTES, DEFAULT_GRACE, DEFAULT_SCRAPE_INTERVAL, DEFAULT_SCRAPE_TIMEOUT,
    DEFAULT_SHARD_GRACE, MAX_CLAIM_WINDOW_DAYS, MAX_COMMITTED_GPUS,
};
pub use config::{
    BODY_LIMIT_RANGE, MAX_GRACE, MAX_PRICE_PER_GPU_HOUR, MIN_SCRAPE_TIMEOUT, SCRAPE_INTERVAL_RANGE,
};
pub use selector::Selector;
pub use shard::{ShardError, ShardSpec};
pub use teams::{Teams, UNASSIGNED};

/// Which agent counter measures "used" for a contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UsageSignal {
    /// `commitmeter_gpu_busy_seconds_total`: utilization-weighted time (the default).
    #[default]
    Busy,
    /// `commitmeter_gpu_allocated_seconds_total`: time with at least one compute process.
    Allocated,
    /// `commitmeter_gpu_sm_active_seconds_total`: SM activity from GPM (Hopper and newer).
    /// A GPU without it (no GPM) is counted with busy time instead, and counted in
    /// `commitmeter_contract_usage_fallback_gpus`.
    SmActive,
}

impl UsageSignal {
    /// As written in the config: `busy`, `allocated` or `sm_active`.
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSignal::Busy => "busy",
            UsageSignal::Allocated => "allocated",
            UsageSignal::SmActive => "sm_active",
        }
    }
}

/// One validated `[[contracts]]` entry.
#[derive(Debug, Clone)]
pub struct Contract {
    /// `[a-zA-Z0-9_.-]+`, unique in the config.
    pub id: String,
    pub provider: String,
    /// Three uppercase letters, e.g. `USD`.
    pub currency: String,
    /// Finite, >= 0.
    pub price_per_gpu_hour: f64,
    /// `on_demand_price_per_gpu_hour`: what a GPU-hour beyond the commitment would cost, for
    /// the renewal sizing; finite, > 0, in the contract currency. `None`: not known, and no
    /// commitment level is recommended.
    pub on_demand_price_per_gpu_hour: Option<f64>,
    /// In (0, 1].
    pub target_utilization: f64,
    /// `sla`: the delivery target and the credits its breach earns; `None`: no SLA declared.
    pub sla: Option<Sla>,
    pub usage_signal: UsageSignal,
    /// The canonical IANA name (`america/los_angeles` in the file becomes
    /// `America/Los_Angeles`).
    pub timezone_name: String,
    /// First instant covered: a `start` date is local midnight in `timezone_name`.
    pub start_ms: i64,
    /// First instant no longer covered (exclusive); `None`: open-ended. An `end` date is
    /// inclusive in the file, so this is the following local midnight.
    pub end_ms: Option<i64>,
    tz: jiff::tz::TimeZone,
    anchor_day: i8,
    /// Clipped to `[start_ms, end_ms)`, sorted, non-overlapping, no empty steps.
    ramp: Vec<calendar::Step>,
    selector: Selector,
    model: Option<Regex>,
}

/// Parts per million: the unit of [`Sla`]'s ratios.
pub const PPM: u32 = 1_000_000;

/// A contract's `sla` table, validated: every ratio in parts per million (the file's
/// decimals have at most 6 places, so these are exact).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sla {
    /// `delivery_target`, in (0, 1_000_000].
    pub delivery_target_ppm: u32,
    /// `credits`, from the mildest breach to the severest: `below_ppm` strictly falling
    /// (the first at most `delivery_target_ppm`), `credit_ppm` strictly growing. Never empty.
    pub credits: Vec<CreditTier>,
    /// `claim_window_days`: 1 ..= 3660 local calendar days after the period ends.
    pub claim_window_days: u32,
}

/// One `sla.credits` entry: a delivered share below `below_ppm` earns `credit_ppm` of the
/// period's committed cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditTier {
    /// In (0, 1_000_000].
    pub below_ppm: u32,
    /// In [0, 1_000_000].
    pub credit_ppm: u32,
}

impl Contract {
    /// `t_ms` plus `days` local calendar days in the contract's time zone: the same
    /// wall-clock time that many days later (a day across a DST change lasts 23 or 25 hours).
    /// Returns the instant and its RFC 9557 form with offset and zone, e.g.
    /// `2026-12-31T00:00:00-08:00[America/Los_Angeles]`; `None` beyond the calendar's range.
    pub fn local_days_after(&self, t_ms: i64, days: u32) -> Option<(i64, String)> {
        calendar::days_after(&self.tz, t_ms, days)
    }

    /// Committed GPUs at `t_ms`: 0 outside `[start_ms, end_ms)` and outside every ramp step.
    pub fn committed_gpus_at(&self, t_ms: i64) -> u64 {
        calendar::gpus_at(&self.ramp, t_ms)
    }

    /// Exact `∫ committed GPUs dt` over `[from_ms, to_ms)` in GPU-milliseconds (0 when
    /// `from_ms >= to_ms`), pro-rated to the millisecond across ramp steps, start and end.
    /// Equals the sum of [`committed_gpus_at`](Self::committed_gpus_at) over every millisecond
    /// of the span; saturates at `i64::MAX` (over 2.5 billion GPU-hours) instead of overflowing.
    pub fn committed_gpu_ms(&self, from_ms: i64, to_ms: i64) -> i64 {
        calendar::gpu_ms(&self.ramp, from_ms, to_ms)
    }

    /// `[start, end)` of the billing period containing `t_ms`: periods start at local midnight
    /// (the first instant of the day) on `billing_anchor_day` of each month in the contract's
    /// time zone, clamped to the month's last day (31 gives Feb 28/29, Apr 30, ...). Follows
    /// DST: a Los Angeles period starts at 07:00 or 08:00 UTC. Defined for any instant, also
    /// outside the contract's span (the caller clips with `start_ms`/`end_ms` if it wants).
    pub fn billing_period(&self, t_ms: i64) -> (i64, i64) {
        calendar::billing_period(&self.tz, self.anchor_day, t_ms)
    }

    /// Whether a target with these target labels (see [`target_labels`]) is selected. A
    /// missing label matches as "", like Prometheus.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.matches(labels)
    }

    /// Whether a GPU model name (as reported by the agent, e.g. `NVIDIA H100 80GB HBM3`)
    /// counts for this contract: the unanchored `model` regex, or true when there is none.
    pub fn model_matches(&self, model: &str) -> bool {
        self.model.as_ref().is_none_or(|re| re.is_match(model))
    }

    /// The ramp after clipping to the contract's span, for display: `(from_ms, until_ms,
    /// gpus)`, `until_ms` exclusive, `None` when open-ended. Steps wholly outside the span are
    /// left out; between steps (and outside them) nothing is committed.
    pub fn ramp_steps(&self) -> Vec<(i64, Option<i64>, u64)> {
        self.ramp
            .iter()
            .map(|s| (s.from, s.until, s.gpus))
            .collect()
    }

    /// The parsed selector (its Display is the canonical `{name="value", ...}` form).
    pub fn selector(&self) -> &Selector {
        &self.selector
    }

    /// The `model` pattern as written, if any.
    pub fn model_pattern(&self) -> Option<&str> {
        self.model.as_ref().map(Regex::as_str)
    }

    /// The billing period that starts in local month `year`-`month` (`[start, end)`), or
    /// `None` for a month beyond the calendar's range.
    pub fn billing_period_of_month(&self, year: i16, month: i8) -> Option<(i64, i64)> {
        if !(1..=12).contains(&month) {
            return None;
        }
        calendar::period_of_month(&self.tz, self.anchor_day, year, month)
    }

    /// The local calendar days (in the contract's time zone) that start in `[from_ms,
    /// to_ms)`: `(YYYY-MM-DD, start_ms, end_ms)`, end exclusive, 23 or 25 hours long across
    /// DST, the last clipped to `to_ms`.
    pub fn local_days(&self, from_ms: i64, to_ms: i64) -> Vec<(String, i64, i64)> {
        calendar::local_days(&self.tz, from_ms, to_ms)
            .into_iter()
            .map(|(d, a, b)| (d.to_string(), a, b))
            .collect()
    }

    /// `(year, month)` of the local date at `t_ms` in the contract's time zone.
    pub fn local_month(&self, t_ms: i64) -> (i16, i8) {
        let d = calendar::local_days(&self.tz, t_ms, t_ms.saturating_add(1));
        d.first()
            .map_or((1970, 1), |(date, _, _)| (date.year(), date.month()))
    }

    /// An instant as local time with the offset in force, e.g. `2026-10-25T02:30:00+01:00`.
    pub fn local_time(&self, t_ms: i64) -> String {
        calendar::local_rfc3339(&self.tz, t_ms)
    }

    /// `billing_anchor_day`, 1..=31.
    pub fn billing_anchor_day(&self) -> u8 {
        self.anchor_day.unsigned_abs()
    }
}

/// The labels a target is matched on: its group's labels plus `instance` = the target
/// address (which wins over a group label of that name; the config rejects one anyway).
pub fn target_labels(
    target: &str,
    group_labels: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut labels = group_labels.clone();
    labels.insert("instance".to_string(), target.to_string());
    labels
}

/// Which contract a target belongs to: `Ok(Some(index into contracts))`, `Ok(None)` when no
/// contract selects it, or `Err` naming the target and every contract that selects it when
/// there is more than one (a host may belong to one contract only). The aggregator calls this
/// whenever file_sd targets change; [`parse`] calls it for every static target.
///
/// `labels` are the target labels ([`target_labels`]); when they lack `instance`, it is taken
/// to be `target`.
pub fn assign(
    contracts: &[Contract],
    target: &str,
    labels: &BTreeMap<String, String>,
) -> Result<Option<usize>, String> {
    let hits = selecting(contracts, target, labels);
    match hits.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        many => Err(format!(
            "target {target:?} is matched by more than one contract: {} (a host may belong to \
             one contract only; narrow the selectors)",
            many.iter()
                .map(|&i| format!("{:?}", contracts[i].id))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Every contract whose selector matches a target (see [`assign`] for `labels`).
pub fn selecting(
    contracts: &[Contract],
    target: &str,
    labels: &BTreeMap<String, String>,
) -> Vec<usize> {
    let with_instance;
    let labels = if labels.contains_key("instance") {
        labels
    } else {
        with_instance = target_labels(target, labels);
        &with_instance
    };
    contracts
        .iter()
        .enumerate()
        .filter(|(_, c)| c.matches(labels))
        .map(|(i, _)| i)
        .collect()
}
