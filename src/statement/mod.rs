//! The statement of a billing period: what a contract committed, what was delivered and used,
//! day by day in the contract's time zone, priced in its currency. Pure: no I/O, no clock (the
//! caller passes the ledger's sealed minutes and "now").
//!
//! Every figure is a sum of the ledger's sealed minutes in integer GPU-milliseconds: a day row
//! sums the minutes that start in that local day, the total sums the minutes of the period, so
//! the total equals the sum of its days and of the minutes exactly, and the ledger's identity
//! (`used − overage + idle + undelivered + unreported = committed`) holds on every row. GPU-hours,
//! costs and ratios are derived from those integers once, when rendered ([`render`]).
//!
//! Sections other modules add (SLA credit, delivery gaps summary, renewal sizing) go into
//! [`Sections`]; the period's charges in micro-units are [`charges`]; the delivery gaps'
//! evidence export is [`gaps`].

pub mod charges;
pub mod focus;
pub mod gap_summary;
pub mod gaps;
pub mod render;
pub mod sizing;
pub mod sla;

use serde::Serialize;

use crate::contract::{Contract, Sla};
use crate::ledger::totals::billed;
use crate::ledger::{Gap, Kind, Totals, MINUTE_MS};

/// Milliseconds in an hour: GPU-ms per GPU-hour.
pub const HOUR_MS: i64 = 3_600_000;

/// What the ledger says besides its minutes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerInfo {
    /// The first minute the ledger accounts (`None`: it has sealed nothing yet).
    pub since_minute: Option<i64>,
    /// The first minute not yet sealed.
    pub sealed_through_minute: Option<i64>,
    /// GPU-ms that arrived after their minutes were sealed, by the minute they were for
    /// (`(minute, late)`, at most one entry per minute). A ledger from before schema
    /// version 5 kept only all-time sums: its earlier late GPU-ms are not here.
    pub late: Vec<(i64, Late)>,
}

/// Late GPU-ms (delivered, used): counted nowhere, reported for what they are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Late {
    pub delivered_gpu_ms: i64,
    pub used_gpu_ms: i64,
}

/// The store's late rows `(minute, delivered, used)` as [`LedgerInfo::late`].
pub fn late_by_minute(rows: &[(i64, i64, i64)]) -> Vec<(i64, Late)> {
    rows.iter()
        .map(|&(minute, d, u)| {
            (
                minute,
                Late {
                    delivered_gpu_ms: d,
                    used_gpu_ms: u,
                },
            )
        })
        .collect()
}

impl Late {
    fn add(&mut self, other: &Late) {
        self.delivered_gpu_ms = self.delivered_gpu_ms.saturating_add(other.delivered_gpu_ms);
        self.used_gpu_ms = self.used_gpu_ms.saturating_add(other.used_gpu_ms);
    }
}

/// One row of a statement: a local calendar day, or the period total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// `YYYY-MM-DD` (the local date), or `total`.
    pub label: String,
    pub start_ms: i64,
    /// Exclusive.
    pub end_ms: i64,
    /// The sum of the ledger's sealed minutes that start in `[start_ms, end_ms)`.
    pub totals: Totals,
    /// How many sealed minutes the ledger holds for the span.
    pub minutes_accounted: i64,
    /// GPU-ms that arrived for the span's minutes after they were sealed: in none of the
    /// figures (sealed minutes never change), shown so that coverage is complete.
    pub late: Late,
    /// The span is not over at "now": figures may still grow.
    pub provisional: bool,
}

impl Row {
    /// Minutes in the span (1380, 1440 or 1500 for a local day).
    pub fn minutes(&self) -> i64 {
        (self.end_ms - self.start_ms).div_euclid(MINUTE_MS)
    }

    /// Used within the commitment over committed, `None` when nothing was committed.
    pub fn utilization(&self) -> Option<f64> {
        (self.totals.committed > 0)
            .then(|| self.totals.used_within() as f64 / self.totals.committed as f64)
    }

    /// The cost of a kind in the contract's currency (`price` per GPU-hour applied to
    /// [`billed`] GPU-ms), `None` for a kind that has no cost.
    pub fn cost(&self, kind: Kind, price_per_gpu_hour: f64) -> Option<f64> {
        billed(&self.totals, kind).map(|ms| ms as f64 * price_per_gpu_hour / HOUR_MS as f64)
    }

    /// `used − overage + idle + undelivered + unreported = committed`.
    pub fn identity_holds(&self) -> bool {
        let t = &self.totals;
        t.used_within() + t.idle + t.undelivered + t.unreported == t.committed
            && t.idle_unallocated + t.idle_allocated == t.idle
    }
}

/// Sections other modules add to a statement, filled by [`build`] and rendered after the rows
/// (text and JSON; the CSV is the table of rows only); absent ones are not rendered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sections {
    /// The SLA credit of the period ([`sla`]), for a contract with an `sla`.
    pub sla: Option<SlaSection>,
    /// The period's delivery gaps, per cause ([`gap_summary`]).
    pub gaps: Option<gap_summary::GapSummary>,
    /// Renewal sizing ([`sizing`]) over the lookbacks ending at [`SizingSection::end_ms`].
    pub sizing: Option<SizingSection>,
}

/// The SLA's verdict on the period's sealed totals ([`sla::assess`] of the total row).
#[derive(Debug, Clone, PartialEq)]
pub struct SlaSection {
    pub terms: Sla,
    pub assessment: sla::Assessment,
    /// [`sla::claim_deadline`] of the period end; `None` beyond the calendar's range.
    pub claim_deadline: Option<(i64, String)>,
}

/// Renewal sizing from the used GPU-ms of each sealed minute before `end_ms`.
#[derive(Debug, Clone, PartialEq)]
pub struct SizingSection {
    /// The lookbacks end here (exclusive): the period end, or the first minute not yet sealed
    /// when that is earlier.
    pub end_ms: i64,
    /// The commitment in force in the last minute before `end_ms`: what savings are against.
    pub current_gpus: u64,
    pub on_demand_price_per_gpu_hour: Option<f64>,
    /// One per [`sizing::LOOKBACK_DAYS`], in order; `None`: too short or too little covered.
    pub lookbacks: Vec<(u32, Option<sizing::Lookback>)>,
}

/// Minutes of the longest sizing lookback: how far before the period's end a caller reads the
/// ledger's minutes for [`build`].
pub const SIZING_MINUTES: i64 =
    sizing::LOOKBACK_DAYS[sizing::LOOKBACK_DAYS.len() - 1] as i64 * sizing::DAY_MINUTES as i64;

/// The minutes `[from, to)` a caller reads for [`build`] of the billing period
/// `(start_ms, end_ms)` at `now_ms`: the period's own, and the longest sizing lookback before
/// its end (or before now, for the current period).
pub fn minutes_to_read(period: (i64, i64), now_ms: i64) -> (i64, i64) {
    let to = period.1.div_euclid(MINUTE_MS);
    let from = period
        .0
        .div_euclid(MINUTE_MS)
        .min(to.min(now_ms.div_euclid(MINUTE_MS) + 1) - SIZING_MINUTES);
    (from, to)
}

/// The statement of one contract's billing period.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    pub contract: String,
    pub provider: String,
    pub currency: String,
    pub price_per_gpu_hour: f64,
    /// The contract's `on_demand_price_per_gpu_hour`, if known.
    pub on_demand_price_per_gpu_hour: Option<f64>,
    pub target_utilization: f64,
    /// The IANA time zone the days are local to.
    pub timezone: String,
    /// `YYYY-MM`: the local month the period starts in.
    pub period: String,
    pub start_ms: i64,
    /// Exclusive.
    pub end_ms: i64,
    /// The period is not over at "now".
    pub provisional: bool,
    /// The period starts before the ledger's first accounted minute: its earlier minutes are
    /// absent, not zero.
    pub starts_before_ledger: bool,
    pub ledger_since_ms: Option<i64>,
    /// One per local calendar day of the period, in order.
    pub days: Vec<Row>,
    pub total: Row,
    /// What the period costs: commitment, overage, the SLA credit once it is over.
    pub charges: charges::Charges,
    pub sections: Sections,
    /// Local time of an instant, for rendering (the contract's calendar).
    local_times: Vec<(i64, String)>,
}

impl Statement {
    /// The local time (with offset) of a row boundary or the period's.
    pub fn local_time(&self, ms: i64) -> &str {
        self.local_times
            .iter()
            .find(|(t, _)| *t == ms)
            .map_or("", |(_, s)| s.as_str())
    }
}

/// `YYYY-MM` → (year, month), or an error naming the input.
pub fn parse_period(s: &str) -> Result<(i16, i8), String> {
    let bad = || format!("{s:?}: expected a month as YYYY-MM (e.g. 2026-11)");
    let (y, m) = s.split_once('-').ok_or_else(bad)?;
    if y.len() != 4 || m.len() != 2 || !(y.bytes().chain(m.bytes())).all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let (year, month): (i16, i8) = (y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if !(1..=12).contains(&month) {
        return Err(format!("{s:?}: month {month} is out of range (1..=12)"));
    }
    Ok((year, month))
}

/// Where the open delivery gaps of a statement made at `now_ms` run to: the first minute not
/// yet sealed, as the minutes do (`now_ms` for a ledger that has sealed nothing).
pub fn gaps_until(ledger: &LedgerInfo, now_ms: i64) -> i64 {
    ledger
        .sealed_through_minute
        .map_or(now_ms, |m| m.saturating_mul(MINUTE_MS))
}

/// Builds the statement of `contract`'s billing period `[period.0, period.1)` from the
/// ledger's sealed minutes `(minute, totals)` (each minute at most once) and its delivery
/// gaps overlapping the period (open ones running to [`gaps_until`]), at `now_ms`. The rows
/// sum the minutes inside the period; the renewal sizing reads the used GPU-ms of the minutes
/// in the [`SIZING_MINUTES`] before the period's end (or before the first minute not yet
/// sealed, when earlier), so pass those too. The one builder of the CLI and the HTTP route.
pub fn build(
    contract: &Contract,
    period: (i64, i64),
    minutes: &[(i64, Totals)],
    gaps: &[Gap],
    ledger: &LedgerInfo,
    now_ms: i64,
) -> Statement {
    let (start, end) = period;
    let days = contract.local_days(start, end);
    let mut rows: Vec<Row> = days
        .iter()
        .map(|(date, a, b)| Row {
            label: date.clone(),
            start_ms: *a,
            end_ms: *b,
            totals: Totals::default(),
            minutes_accounted: 0,
            late: Late::default(),
            provisional: now_ms < *b,
        })
        .collect();
    let mut total = Row {
        label: "total".to_string(),
        start_ms: start,
        end_ms: end,
        totals: Totals::default(),
        minutes_accounted: 0,
        late: Late::default(),
        provisional: now_ms < end,
    };
    // The index of the day row holding `minute`, if the minute is in the period (days
    // are sorted and contiguous: the last one starting at or before it).
    let day_of = |rows: &[Row], minute: i64| -> Option<Option<usize>> {
        let at = minute.saturating_mul(MINUTE_MS);
        (start..end)
            .contains(&at)
            .then(|| rows.partition_point(|r| r.start_ms <= at).checked_sub(1))
    };
    for (minute, t) in minutes {
        let Some(day) = day_of(&rows, *minute) else {
            continue;
        };
        if let Some(row) = day.and_then(|i| rows.get_mut(i)) {
            row.totals.add(t);
            row.minutes_accounted += 1;
        }
        total.totals.add(t);
        total.minutes_accounted += 1;
    }
    for (minute, late) in &ledger.late {
        let Some(day) = day_of(&rows, *minute) else {
            continue;
        };
        if let Some(row) = day.and_then(|i| rows.get_mut(i)) {
            row.late.add(late);
        }
        total.late.add(late);
    }
    let ledger_since_ms = ledger.since_minute.map(|m| m.saturating_mul(MINUTE_MS));
    let mut sections = sections(contract, period, minutes, ledger, &total);
    sections.gaps = Some(gap_summary::summarize(
        gaps,
        period,
        gaps_until(ledger, now_ms),
    ));
    let provisional = now_ms < end;
    let credit = sections
        .sla
        .as_ref()
        .filter(|_| !provisional)
        .map(|z| z.assessment.credit_micros);
    let charges = charges::of(contract, &total.totals, credit);
    let mut local_times: Vec<(i64, String)> = rows
        .iter()
        .flat_map(|r| [r.start_ms, r.end_ms])
        .chain([start, end])
        .chain(ledger_since_ms)
        .chain(sections.sizing.as_ref().map(|z| z.end_ms))
        .chain(sections.gaps.iter().flat_map(|g| {
            [g.until_ms, g.end_ms].into_iter().chain(
                g.causes
                    .iter()
                    .filter_map(|c| c.longest.as_ref())
                    .flat_map(|l| [Some(l.start_ms), l.end_ms])
                    .flatten(),
            )
        }))
        .map(|t| (t, contract.local_time(t)))
        .collect();
    local_times.sort();
    local_times.dedup();
    let (y, m) = contract.local_month(start);
    Statement {
        contract: contract.id.clone(),
        provider: contract.provider.clone(),
        currency: contract.currency.clone(),
        price_per_gpu_hour: contract.price_per_gpu_hour,
        on_demand_price_per_gpu_hour: contract.on_demand_price_per_gpu_hour,
        target_utilization: contract.target_utilization,
        timezone: contract.timezone_name.clone(),
        period: format!("{y:04}-{m:02}"),
        start_ms: start,
        end_ms: end,
        provisional,
        starts_before_ledger: ledger_since_ms.is_none_or(|s| s > start),
        ledger_since_ms,
        days: rows,
        total,
        charges,
        sections,
        local_times,
    }
}

/// The SLA and sizing sections of [`build`].
fn sections(
    contract: &Contract,
    (_, end): (i64, i64),
    minutes: &[(i64, Totals)],
    ledger: &LedgerInfo,
    total: &Row,
) -> Sections {
    let price = sla::price_micros(contract.price_per_gpu_hour);
    let sla = contract.sla.as_ref().map(|terms| SlaSection {
        terms: terms.clone(),
        assessment: sla::assess(terms, &total.totals, price),
        claim_deadline: sla::claim_deadline(contract, terms, end),
    });
    let end_minute = ledger
        .sealed_through_minute
        .map_or(end.div_euclid(MINUTE_MS), |s| {
            s.min(end.div_euclid(MINUTE_MS))
        });
    Sections {
        sla,
        gaps: None,
        sizing: Some(sizing_section(contract, minutes, end_minute)),
    }
}

/// The renewal sizing of `contract` over the lookbacks ending at `end_minute` (exclusive),
/// from the ledger's sealed minutes `(minute, totals)`; minutes outside the longest lookback
/// are ignored. The one computation behind the statement's sizing section and the status
/// page's.
pub fn sizing_section(
    contract: &Contract,
    minutes: &[(i64, Totals)],
    end_minute: i64,
) -> SizingSection {
    let first = end_minute - SIZING_MINUTES;
    // One entry per minute of the longest lookback, oldest first; `None` where not sealed.
    let mut used: Vec<Option<i64>> = vec![None; SIZING_MINUTES as usize];
    for (m, t) in minutes {
        if (first..end_minute).contains(m) {
            used[(m - first) as usize] = Some(t[Kind::Used]);
        }
    }
    let end_ms = end_minute.saturating_mul(MINUTE_MS);
    let prices = sizing::Prices {
        committed: sla::price_micros(contract.price_per_gpu_hour),
        on_demand: contract.on_demand_price_per_gpu_hour.map(sla::price_micros),
    };
    let current_gpus = contract.committed_gpus_at(end_ms - 1);
    let lookbacks = sizing::LOOKBACK_DAYS
        .into_iter()
        .zip(sizing::size(&used, prices, current_gpus))
        .collect();
    SizingSection {
        end_ms,
        current_gpus,
        on_demand_price_per_gpu_hour: contract.on_demand_price_per_gpu_hour,
        lookbacks,
    }
}

#[cfg(test)]
pub(crate) mod tests;
