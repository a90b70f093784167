//! A [`Statement`] as text (a readable table), CSV (the `csv` crate) and JSON (serde).
//!
//! GPU-hours are the rows' integer GPU-ms divided once, here; the exact GPU-ms are in the CSV
//! and JSON beside them, so a reader can re-add days to the total to the millisecond.

use serde::Serialize;

use super::charges::Charges;
use super::gap_summary::{CauseSummary, GapSummary};
use super::sizing::{Distribution, Lookback, Recommendation, GPU_MINUTE_MS};
use super::sla::{div_round_half_even, Share};
use super::{Row, SizingSection, SlaSection, Statement, HOUR_MS};
use crate::contract::PPM;
use crate::ledger::totals::billed;
use crate::ledger::{Kind, Totals};

/// GPU-ms as GPU-hours with three decimals, rounded half up in integers (no float drift).
pub fn gpu_hours(ms: i64) -> String {
    let thousandths =
        (i128::from(ms) * 1000 * 2 + i128::from(HOUR_MS)).div_euclid(2 * i128::from(HOUR_MS));
    let sign = if thousandths < 0 { "-" } else { "" };
    let a = thousandths.abs();
    format!("{sign}{}.{:03}", a / 1000, a % 1000)
}

fn ratio(r: Option<f64>) -> String {
    r.map_or_else(String::new, |u| format!("{u:.4}"))
}

fn money(v: f64) -> String {
    format!("{v:.2}")
}

fn coverage(row: &Row) -> String {
    format!("{}/{}", row.minutes_accounted, row.minutes())
}

/// A readable table: one line per local day and the total, in GPU-hours, then the costs.
pub fn text(s: &Statement) -> String {
    let mut out = String::new();
    let status = if s.provisional {
        "provisional: the period is not over"
    } else {
        "closed"
    };
    out.push_str(&format!(
        "Statement of contract {} ({}), billing period {} ({})\n",
        s.contract, s.provider, s.period, status
    ));
    out.push_str(&format!(
        "{} to {} ({}), {} per GPU-hour {}, target utilization {}\n",
        s.local_time(s.start_ms),
        s.local_time(s.end_ms),
        s.timezone,
        s.currency,
        s.price_per_gpu_hour,
        s.target_utilization
    ));
    if s.starts_before_ledger {
        match s.ledger_since_ms {
            Some(ms) => out.push_str(&format!(
                "The period starts before the ledger (it accounts from {}): earlier minutes are absent, not zero.\n",
                s.local_time(ms)
            )),
            None => out.push_str("The ledger has sealed no minute yet.\n"),
        }
    }
    out.push('\n');
    // The terms of the identity as columns; the idle split follows the table, indented
    // under idle (nine columns would not fit a terminal, and the parts add up to idle).
    let terms: Vec<Kind> = Kind::ALL
        .into_iter()
        .filter(|k| k.part_of().is_none())
        .collect();
    let mut header: Vec<String> = vec!["day".into(), "hours".into()];
    header.extend(terms.iter().map(|k| k.name().to_string()));
    header.extend(["utilization".into(), "minutes".into()]);
    let line = |r: &Row| -> Vec<String> {
        let mut v = vec![
            r.label.clone()
                + if r.provisional && r.label != "total" {
                    "*"
                } else {
                    ""
                },
            format!("{}", r.minutes() as f64 / 60.0),
        ];
        v.extend(terms.iter().map(|&k| gpu_hours(r.totals[k])));
        v.extend([ratio(r.utilization()), coverage(r)]);
        v
    };
    let mut table: Vec<Vec<String>> = vec![header];
    table.extend(s.days.iter().map(line));
    table.push(line(&s.total));
    out.push_str(&layout(&table, true));
    out.push_str("\nGPU-hours per kind; minutes: sealed minutes accounted / minutes in the span");
    if s.days.iter().any(|d| d.provisional) {
        out.push_str("; * not over yet");
    }
    out.push('\n');
    let costs: Vec<String> = terms
        .iter()
        .filter_map(|&k| {
            let cost = money(s.total.cost(k, s.price_per_gpu_hour)?);
            Some(match k {
                Kind::Used => format!("used within the commitment {cost}"),
                _ => format!("{k} {cost}"),
            })
        })
        .collect();
    out.push_str(&format!("Cost ({}): {}\n", s.currency, costs.join(", ")));
    out.push_str(&idle_split_text(s));
    out.push_str(&format!(
        "Utilization {} against a target of {}\n",
        ratio(s.total.utilization()),
        s.target_utilization
    ));
    let l = s.total.late;
    out.push_str(&format!(
        "Late (arrived after their minutes were sealed, counted nowhere): delivered {} GPU-hours, used {}\n",
        gpu_hours(l.delivered_gpu_ms),
        gpu_hours(l.used_gpu_ms)
    ));
    out.push_str(&charges_text(s));
    if let Some(sla) = &s.sections.sla {
        out.push_str(&sla_text(sla, &s.currency));
    }
    if let Some(g) = &s.sections.gaps {
        out.push_str(&gaps_text(s, g));
    }
    if let Some(z) = &s.sections.sizing {
        out.push_str(&sizing_text(s, z));
    }
    out
}

/// The period's idle by cause, its parts indented under it (per day in the CSV and JSON).
fn idle_split_text(s: &Statement) -> String {
    let t = &s.total;
    let mut kinds = vec![Kind::Idle];
    kinds.extend(Kind::Idle.parts());
    let mut table = vec![vec![
        format!("Idle by cause ({}):", s.currency),
        "GPU-hours".into(),
        "cost".into(),
    ]];
    table.extend(kinds.iter().map(|&k| {
        let indent = if k.part_of().is_some() { "    " } else { "  " };
        vec![
            format!("{indent}{k}"),
            gpu_hours(t.totals[k]),
            t.cost(k, s.price_per_gpu_hour)
                .map_or_else(String::new, money),
        ]
    }));
    let why = |k: Kind| match k {
        Kind::IdleUnallocated => "  no compute process held the GPU",
        Kind::IdleAllocated => "  a process held it; the usage signal says unused",
        _ => "",
    };
    let text = layout(&table, false);
    let mut lines = text.lines();
    let mut out = lines.next().unwrap_or_default().to_string() + "\n";
    for (line, &k) in lines.zip(&kinds) {
        out.push_str(line);
        out.push_str(why(k));
        out.push('\n');
    }
    out
}

/// A table as text: the first column left-aligned, the others right-aligned, two spaces
/// apart; with `total`, a rule above the last line.
fn layout(table: &[Vec<String>], total: bool) -> String {
    let mut out = String::new();
    let widths: Vec<usize> = (0..table.first().map_or(0, Vec::len))
        .map(|c| {
            table
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for (i, r) in table.iter().enumerate() {
        if total && i == table.len() - 1 {
            let w: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
            out.push_str(&"-".repeat(w));
            out.push('\n');
        }
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, w))| {
                if c == 0 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The period's charges: commitment, overage at its price, the SLA credit once the period is
/// over, what is due.
fn charges_text(s: &Statement) -> String {
    let c = &s.charges;
    let mut out = format!(
        "Charges ({}): commitment {} + overage {} GPU-hours at {} ({}) {} = {}",
        s.currency,
        micros(c.committed_micros),
        gpu_hours(c.overage_gpu_ms),
        micros(i128::from(c.overage_price_micros)),
        if c.overage_at_on_demand {
            "on demand"
        } else {
            "the contract price: no on_demand_price_per_gpu_hour"
        },
        micros(c.overage_micros),
        micros(c.total_micros)
    );
    match (c.credit_micros, &s.sections.sla) {
        (Some(credit), _) => out.push_str(&format!(
            ", less the SLA credit {}: due {}\n",
            micros(credit),
            micros(c.due_micros)
        )),
        (None, Some(_)) => out.push_str(" (the SLA credit is counted once the period is over)\n"),
        (None, None) => out.push('\n'),
    }
    out
}

/// The delivery gaps summary: one line per cause.
fn gaps_text(s: &Statement, g: &GapSummary) -> String {
    let mut out = format!(
        "Delivery gaps in the period (GPU-hours inside it; open gaps counted to {}; still open: not ended by {}):\n",
        s.local_time(g.until_ms),
        s.local_time(g.end_ms)
    );
    let mut table: Vec<Vec<String>> = vec![[
        "cause",
        "gaps",
        "GPU-hours",
        "longest (hours)",
        "longest from",
        "target GPU",
        "XIDs",
        "still open",
    ]
    .map(String::from)
    .to_vec()];
    for c in &g.causes {
        let l = c.longest.as_ref();
        table.push(vec![
            c.cause.as_str().to_string(),
            c.gaps.to_string(),
            format!(
                "{}{}",
                if c.prorated { "~" } else { "" },
                gpu_hours(c.gpu_ms)
            ),
            l.map_or_else(|| "-".into(), |l| gpu_hours(l.duration_ms)),
            l.map_or_else(|| "-".into(), |l| s.local_time(l.start_ms).to_string()),
            l.map_or_else(
                || "-".into(),
                |l| {
                    if l.target.is_empty() {
                        "(contract)".to_string()
                    } else {
                        format!("{} {}", l.target, l.gpu)
                    }
                },
            ),
            if c.xids.is_empty() {
                "-".into()
            } else {
                c.xids.join(",")
            },
            c.open.to_string(),
        ]);
    }
    for line in layout(&table, false).lines() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    if g.causes.iter().any(|c| c.prorated) {
        out.push_str("  ~ a short gap crossing the period's edge: its GPU-hours split by time\n");
    }
    out
}

/// Micro-units of a currency as an amount with cents, rounded once, half to even.
pub fn micros(v: i128) -> String {
    let cents = if v < 0 {
        -div_round_half_even(-v, 10_000)
    } else {
        div_round_half_even(v, 10_000)
    };
    let sign = if cents < 0 { "-" } else { "" };
    format!("{sign}{}.{:02}", cents.abs() / 100, cents.abs() % 100)
}

/// Parts per million as the decimal the config wrote (at most 6 places).
fn ppm(p: u32) -> String {
    let s = format!("{}.{:06}", p / PPM, p % PPM);
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A share for display: six decimals (the decision was made exactly, in integers).
fn share(s: Option<Share>) -> String {
    s.map_or_else(
        || "none (nothing committed)".into(),
        |s| format!("{:.6}", s.ratio()),
    )
}

/// Used GPU-ms per minute as GPUs with three decimals, rounded half up in integers.
fn gpus(ms_per_minute: i64) -> String {
    gpu_hours(ms_per_minute * (HOUR_MS / GPU_MINUTE_MS))
}

fn sla_text(z: &SlaSection, currency: &str) -> String {
    let a = &z.assessment;
    let tier = |t: Option<usize>| {
        t.map_or_else(
            || "none".to_string(),
            |i| {
                let c = &z.terms.credits[i];
                format!("below {}, credit {}", ppm(c.below_ppm), ppm(c.credit_ppm))
            },
        )
    };
    let mut out = format!(
        "SLA: delivered share {} on evidence ((committed − undelivered) / committed), {} seen (unreported counted against the provider); delivery target {} {}\n",
        share(a.delivered_share),
        share(a.delivered_share_seen),
        ppm(z.terms.delivery_target_ppm),
        match a.target_met {
            Some(true) => "met",
            Some(false) => "not met",
            None => "not assessed",
        }
    );
    out.push_str(&format!(
        "SLA credit: tier reached {} of the committed cost {} = {} {currency} (with unreported counted as undelivered the tier would be {})\n",
        tier(a.tier),
        micros(a.committed_cost_micros),
        micros(a.credit_micros),
        tier(a.tier_if_unreported_undelivered)
    ));
    out.push_str(&format!(
        "SLA claim deadline: {} ({} local days after the period ends)\n",
        z.claim_deadline
            .as_ref()
            .map_or("beyond the calendar's range", |(_, t)| t.as_str()),
        z.terms.claim_window_days
    ));
    out
}

fn sizing_text(s: &Statement, z: &SizingSection) -> String {
    let mut out = format!(
        "Renewal sizing: used GPUs per minute over the lookbacks ending {}; commitment then {} GPUs",
        s.local_time(z.end_ms),
        z.current_gpus
    );
    match z.on_demand_price_per_gpu_hour {
        Some(p) => out.push_str(&format!(", on demand {} per GPU-hour {p}\n", s.currency)),
        None => out.push_str(" (no on_demand_price_per_gpu_hour: no commitment recommended)\n"),
    }
    for (days, l) in &z.lookbacks {
        match l {
            None => out.push_str(&format!(
                "  {days} days: not shown (less than 90 % of its minutes in the ledger)\n"
            )),
            Some(l) => {
                let d = &l.distribution;
                out.push_str(&format!(
                    "  {days} days: p50 {}, p90 {}, p99 {}, max {} GPUs ({}/{} minutes)",
                    gpus(d.p50),
                    gpus(d.p90),
                    gpus(d.p99),
                    gpus(d.max),
                    l.accounted,
                    l.minutes
                ));
                if let Some(r) = &l.recommendation {
                    out.push_str(&format!(
                        "; cheapest commitment {} GPUs: {} {} against {} at {} GPUs (saving {})",
                        r.gpus,
                        micros(r.cost_micros),
                        s.currency,
                        micros(r.current_cost_micros),
                        z.current_gpus,
                        micros(r.saving_micros)
                    ));
                }
                out.push('\n');
            }
        }
    }
    out
}

/// The CSV header: row fields, then per kind its GPU-ms and GPU-hours, then the cost of each
/// priced kind.
pub fn csv_header() -> Vec<String> {
    let mut h: Vec<String> = [
        "contract",
        "period",
        "day",
        "start",
        "end",
        "hours",
        "minutes",
        "minutes_accounted",
        "provisional",
    ]
    .map(String::from)
    .to_vec();
    for k in Kind::ALL {
        h.push(format!("{k}_gpu_ms"));
        h.push(format!("{k}_gpu_hours"));
    }
    for k in priced_kinds() {
        h.push(format!("{k}_cost"));
    }
    h.extend(
        [
            "currency",
            "utilization",
            "target_utilization",
            "late_delivered_gpu_ms",
            "late_used_gpu_ms",
        ]
        .map(String::from),
    );
    h
}

/// The kinds the price applies to ([`billed`]), in [`Kind::ALL`] order.
fn priced_kinds() -> Vec<Kind> {
    Kind::ALL
        .into_iter()
        .filter(|&k| billed(&Totals::default(), k).is_some())
        .collect()
}

/// One line per local day, then `total`.
pub fn csv(s: &Statement) -> Result<String, csv::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(csv_header())?;
    for r in s.days.iter().chain([&s.total]) {
        let mut rec = vec![
            s.contract.clone(),
            s.period.clone(),
            r.label.clone(),
            s.local_time(r.start_ms).to_string(),
            s.local_time(r.end_ms).to_string(),
            format!("{}", r.minutes() as f64 / 60.0),
            r.minutes().to_string(),
            r.minutes_accounted.to_string(),
            r.provisional.to_string(),
        ];
        for k in Kind::ALL {
            rec.push(r.totals[k].to_string());
            rec.push(gpu_hours(r.totals[k]));
        }
        for k in priced_kinds() {
            rec.push(
                r.cost(k, s.price_per_gpu_hour)
                    .map_or_else(String::new, money),
            );
        }
        rec.push(s.currency.clone());
        rec.push(ratio(r.utilization()));
        rec.push(s.target_utilization.to_string());
        rec.push(r.late.delivered_gpu_ms.to_string());
        rec.push(r.late.used_gpu_ms.to_string());
        w.write_record(rec)?;
    }
    let bytes = w.into_inner().map_err(|e| e.into_error())?;
    Ok(String::from_utf8(bytes).expect("CSV of UTF-8 strings"))
}

#[derive(Serialize)]
struct KindJson {
    kind: &'static str,
    /// The kind this one is a part of (`idle` for the idle split): never add the two.
    #[serde(skip_serializing_if = "Option::is_none")]
    part_of: Option<&'static str>,
    gpu_ms: i64,
    gpu_hours: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cost: Option<f64>,
}

#[derive(Serialize)]
struct RowJson<'a> {
    day: &'a str,
    start: &'a str,
    end: &'a str,
    hours: f64,
    minutes: i64,
    minutes_accounted: i64,
    provisional: bool,
    identity_holds: bool,
    utilization: Option<f64>,
    kinds: Vec<KindJson>,
    /// GPU-ms that arrived for the span after it was sealed (in no kind).
    late: super::Late,
}

#[derive(Serialize)]
struct StatementJson<'a> {
    contract: &'a str,
    provider: &'a str,
    period: &'a str,
    start: &'a str,
    end: &'a str,
    timezone: &'a str,
    currency: &'a str,
    price_per_gpu_hour: f64,
    target_utilization: f64,
    provisional: bool,
    starts_before_ledger: bool,
    ledger_since: Option<&'a str>,
    days: Vec<RowJson<'a>>,
    total: RowJson<'a>,
    charges: ChargesJson,
    #[serde(skip_serializing_if = "Option::is_none")]
    sla: Option<SlaJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delivery_gaps: Option<GapsJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sizing: Option<SizingJson<'a>>,
}

/// Amounts in exact micro-units beside the same rounded to cents.
#[derive(Serialize)]
struct ChargesJson {
    committed_micros: i128,
    committed: String,
    overage_gpu_ms: i64,
    overage_price_per_gpu_hour_micros: i64,
    /// `on_demand` or `contract`: which of the contract's prices overage is billed at.
    overage_priced_at: &'static str,
    overage_micros: i128,
    overage: String,
    total_micros: i128,
    total: String,
    /// `null` without `sla` or while the period is not over.
    credit_micros: Option<i128>,
    credit: Option<String>,
    due_micros: i128,
    due: String,
}

#[derive(Serialize)]
struct GapsJson<'a> {
    /// Open gaps are counted up to here.
    until: &'a str,
    /// A gap not ended by here is still open.
    end: &'a str,
    causes: Vec<CauseJson<'a>>,
}

#[derive(Serialize)]
struct CauseJson<'a> {
    cause: &'static str,
    gaps: u64,
    gpu_ms: i64,
    gpu_hours: f64,
    /// Some `short` gap crossed the period's edge: its GPU-ms are split by time.
    prorated: bool,
    longest: Option<LongestJson<'a>>,
    xids: &'a [String],
    open: u64,
}

#[derive(Serialize)]
struct LongestJson<'a> {
    target: &'a str,
    gpu: &'a str,
    start: &'a str,
    end: Option<&'a str>,
    duration_ms: i64,
}

fn charges_json(c: &Charges) -> ChargesJson {
    ChargesJson {
        committed_micros: c.committed_micros,
        committed: micros(c.committed_micros),
        overage_gpu_ms: c.overage_gpu_ms,
        overage_price_per_gpu_hour_micros: c.overage_price_micros,
        overage_priced_at: if c.overage_at_on_demand {
            "on_demand"
        } else {
            "contract"
        },
        overage_micros: c.overage_micros,
        overage: micros(c.overage_micros),
        total_micros: c.total_micros,
        total: micros(c.total_micros),
        credit_micros: c.credit_micros,
        credit: c.credit_micros.map(micros),
        due_micros: c.due_micros,
        due: micros(c.due_micros),
    }
}

fn cause_json<'a>(s: &'a Statement, c: &'a CauseSummary) -> CauseJson<'a> {
    CauseJson {
        cause: c.cause.as_str(),
        gaps: c.gaps,
        gpu_ms: c.gpu_ms,
        gpu_hours: c.gpu_ms as f64 / HOUR_MS as f64,
        prorated: c.prorated,
        longest: c.longest.as_ref().map(|l| LongestJson {
            target: &l.target,
            gpu: &l.gpu,
            start: s.local_time(l.start_ms),
            end: l.end_ms.map(|e| s.local_time(e)),
            duration_ms: l.duration_ms,
        }),
        xids: &c.xids,
        open: c.open,
    }
}

fn gaps_json<'a>(s: &'a Statement, g: &'a GapSummary) -> GapsJson<'a> {
    GapsJson {
        until: s.local_time(g.until_ms),
        end: s.local_time(g.end_ms),
        causes: g.causes.iter().map(|c| cause_json(s, c)).collect(),
    }
}

#[derive(Serialize)]
struct TierJson {
    below: f64,
    credit: f64,
}

#[derive(Serialize)]
struct ShareJson {
    /// GPU-ms over GPU-ms: the exact fraction.
    gpu_ms: i64,
    of_gpu_ms: i64,
    ratio: f64,
}

#[derive(Serialize)]
struct SlaJson<'a> {
    delivery_target: f64,
    credits: Vec<TierJson>,
    claim_window_days: u32,
    committed_gpu_ms: i64,
    delivered_share: Option<ShareJson>,
    delivered_share_seen: Option<ShareJson>,
    target_met: Option<bool>,
    tier: Option<TierJson>,
    tier_if_unreported_undelivered: Option<TierJson>,
    committed_cost_micros: i128,
    committed_cost: String,
    credit_micros: i128,
    credit: String,
    claim_deadline: Option<&'a str>,
}

#[derive(Serialize)]
struct SizingJson<'a> {
    end: &'a str,
    current_gpus: u64,
    on_demand_price_per_gpu_hour: Option<f64>,
    lookbacks: Vec<LookbackJson>,
}

#[derive(Serialize)]
struct LookbackJson {
    days: u32,
    /// `false`: less than 90 % of its minutes in the ledger; nothing else is given.
    shown: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    minutes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    accounted: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    used_gpu_ms_per_minute: Option<DistJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recommendation: Option<RecJson>,
}

#[derive(Serialize)]
struct DistJson {
    p50: i64,
    p90: i64,
    p99: i64,
    max: i64,
}

#[derive(Serialize)]
struct RecJson {
    gpus: u64,
    cost_micros: i128,
    current_cost_micros: i128,
    saving_micros: i128,
}

fn ratio_ppm(p: u32) -> f64 {
    f64::from(p) / f64::from(PPM)
}

fn sla_json(z: &SlaSection) -> SlaJson<'_> {
    let a = &z.assessment;
    let tier = |t: Option<usize>| {
        t.map(|i| TierJson {
            below: ratio_ppm(z.terms.credits[i].below_ppm),
            credit: ratio_ppm(z.terms.credits[i].credit_ppm),
        })
    };
    let share = |s: Option<Share>| {
        s.map(|s| ShareJson {
            gpu_ms: s.num,
            of_gpu_ms: s.den,
            ratio: round(s.ratio(), 9),
        })
    };
    SlaJson {
        delivery_target: ratio_ppm(z.terms.delivery_target_ppm),
        credits: (0..z.terms.credits.len())
            .filter_map(|i| tier(Some(i)))
            .collect(),
        claim_window_days: z.terms.claim_window_days,
        committed_gpu_ms: a.committed_gpu_ms,
        delivered_share: share(a.delivered_share),
        delivered_share_seen: share(a.delivered_share_seen),
        target_met: a.target_met,
        tier: tier(a.tier),
        tier_if_unreported_undelivered: tier(a.tier_if_unreported_undelivered),
        committed_cost_micros: a.committed_cost_micros,
        committed_cost: micros(a.committed_cost_micros),
        credit_micros: a.credit_micros,
        credit: micros(a.credit_micros),
        claim_deadline: z.claim_deadline.as_ref().map(|(_, t)| t.as_str()),
    }
}

fn lookback_json(days: u32, l: &Option<Lookback>) -> LookbackJson {
    let dist = |d: &Distribution| DistJson {
        p50: d.p50,
        p90: d.p90,
        p99: d.p99,
        max: d.max,
    };
    let rec = |r: &Recommendation| RecJson {
        gpus: r.gpus,
        cost_micros: r.cost_micros,
        current_cost_micros: r.current_cost_micros,
        saving_micros: r.saving_micros,
    };
    LookbackJson {
        days,
        shown: l.is_some(),
        minutes: l.as_ref().map(|l| l.minutes),
        accounted: l.as_ref().map(|l| l.accounted),
        used_gpu_ms_per_minute: l.as_ref().map(|l| dist(&l.distribution)),
        recommendation: l.as_ref().and_then(|l| l.recommendation.as_ref().map(rec)),
    }
}

fn sizing_json<'a>(s: &'a Statement, z: &'a SizingSection) -> SizingJson<'a> {
    SizingJson {
        end: s.local_time(z.end_ms),
        current_gpus: z.current_gpus,
        on_demand_price_per_gpu_hour: z.on_demand_price_per_gpu_hour,
        lookbacks: z
            .lookbacks
            .iter()
            .map(|(d, l)| lookback_json(*d, l))
            .collect(),
    }
}

fn round(v: f64, places: i32) -> f64 {
    let p = 10f64.powi(places);
    (v * p).round() / p
}

fn row_json<'a>(s: &'a Statement, r: &'a Row) -> RowJson<'a> {
    RowJson {
        day: &r.label,
        start: s.local_time(r.start_ms),
        end: s.local_time(r.end_ms),
        hours: r.minutes() as f64 / 60.0,
        minutes: r.minutes(),
        minutes_accounted: r.minutes_accounted,
        provisional: r.provisional,
        identity_holds: r.identity_holds(),
        utilization: r.utilization().map(|u| round(u, 6)),
        kinds: Kind::ALL
            .iter()
            .map(|&k| KindJson {
                kind: k.name(),
                part_of: k.part_of().map(Kind::name),
                gpu_ms: r.totals[k],
                gpu_hours: r.totals[k] as f64 / HOUR_MS as f64,
                cost: r.cost(k, s.price_per_gpu_hour).map(|c| round(c, 2)),
            })
            .collect(),
        late: r.late,
    }
}

/// The statement as pretty-printed JSON: exact GPU-ms per kind beside GPU-hours and costs
/// (rounded to cents).
pub fn json(s: &Statement) -> String {
    let doc = StatementJson {
        contract: &s.contract,
        provider: &s.provider,
        period: &s.period,
        start: s.local_time(s.start_ms),
        end: s.local_time(s.end_ms),
        timezone: &s.timezone,
        currency: &s.currency,
        price_per_gpu_hour: s.price_per_gpu_hour,
        target_utilization: s.target_utilization,
        provisional: s.provisional,
        starts_before_ledger: s.starts_before_ledger,
        ledger_since: s.ledger_since_ms.map(|t| s.local_time(t)),
        days: s.days.iter().map(|r| row_json(s, r)).collect(),
        total: row_json(s, &s.total),
        charges: charges_json(&s.charges),
        sla: s.sections.sla.as_ref().map(sla_json),
        delivery_gaps: s.sections.gaps.as_ref().map(|g| gaps_json(s, g)),
        sizing: s.sections.sizing.as_ref().map(|z| sizing_json(s, z)),
    };
    let mut out = serde_json::to_string_pretty(&doc).expect("a statement serializes");
    out.push('\n');
    out
}
