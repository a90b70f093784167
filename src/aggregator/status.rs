//! The built-in status page (`GET /`): per contract, the month so far in GPU-hours
//! and money, utilization against target, projection, burn rates, the contract alerts
//! (underuse, budget, delivery, agents down) that would be firing, a chart of the
//! month, the showback by team, the renewal sizing of the last 7, 30 and 60 days and the
//! statements.
//! Server-rendered HTML with inline SVG: no scripts, no external assets.
//! Rendering is a pure function of [`View`].

use std::fmt::Write as _;

use crate::ledger::alerts;
use crate::ledger::burn::{self, TIERS, WINDOWS};
use crate::ledger::totals::Figures;
use crate::ledger::{Kind, Totals, MINUTE_MS};
use crate::statement::render::{gpu_hours, micros};
use crate::statement::sizing::{GPU_MINUTE_MS, MIN_COVERAGE_PERCENT};
use crate::statement::{SizingSection, HOUR_MS};

/// Everything the page shows, gathered from the ledger under its lock.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub now_ms: i64,
    pub since_ms: i64,
    pub sealed_through_ms: i64,
    pub contracts: Vec<ContractView>,
}

#[derive(Debug, Clone, Default)]
pub struct ContractView {
    pub id: String,
    pub provider: String,
    pub currency: String,
    pub timezone: String,
    pub target: f64,
    pub committed_gpus_now: u64,
    pub period: (i64, i64),
    pub mtd: Totals,
    pub figures: Figures,
    /// Sealed minutes of the period so far, oldest first.
    pub minutes: Vec<(i64, Totals)>,
    pub targets_up: usize,
    pub targets_down: usize,
    /// The billing periods (`YYYY-MM`) from the ledger's first to the current one, newest
    /// first, each with its statement's links ([`periods`]).
    pub periods: Vec<String>,
    /// The renewal sizing last computed (`None`: not yet).
    pub sizing: Option<Sizing>,
    /// The contract price, for the showback's costs.
    pub price_per_gpu_hour: f64,
    /// Showback, month to date of the billing period: `(team, allocated GPU-ms, used
    /// GPU-ms)` per team with time, as the ledger's team book has them
    /// (`Books::team_period`). Empty: no team has time yet (no owners reported).
    pub teams: Vec<(String, i64, i64)>,
}

/// The statement's renewal sizing ([`crate::statement::sizing_section`]) as computed last.
#[derive(Debug, Clone)]
pub struct Sizing {
    pub section: SizingSection,
    /// The lookbacks' end in the contract's local time: when it was computed.
    pub end_local: String,
}

/// At most this many billing periods are listed (ten years of months).
pub const MAX_PERIODS: usize = 120;

/// The billing periods of `contract` (`YYYY-MM`, the local month each starts in) that end
/// after `since_ms` (the ledger's first accounted minute) and after the contract's start,
/// and start at or before `now_ms`, newest first, at most [`MAX_PERIODS`]: from the
/// calendar alone, no ledger read.
pub fn periods(contract: &crate::contract::Contract, since_ms: i64, now_ms: i64) -> Vec<String> {
    let mut out = Vec::new();
    let first = since_ms.max(contract.start_ms);
    let mut at = now_ms;
    while out.len() < MAX_PERIODS {
        let (start, end) = contract.billing_period(at);
        if end <= first || start > at {
            break;
        }
        let (y, m) = contract.local_month(start);
        out.push(format!("{y:04}-{m:02}"));
        at = start - 1;
    }
    out
}

/// A contract alert the shipped rules would be firing, judged on sealed minutes.
#[derive(Debug, Clone, PartialEq)]
pub struct WouldFire {
    pub severity: &'static str,
    pub what: String,
}

/// The contract alerts of `alerts/` that would be firing for a contract, by the
/// thresholds of [`crate::ledger::alerts`] and [`TIERS`] (which the rules test holds to
/// the rule file), judged now, without the rules' `for` delays. Host and pipeline alerts
/// other than the contract's agents down are not judged here.
pub fn would_fire(c: &ContractView) -> Vec<WouldFire> {
    let period_s = (c.period.1 - c.period.0) as f64 / 1000.0;
    let mut out: Vec<WouldFire> = burn::firing(&c.minutes, period_s, c.target)
        .into_iter()
        .map(|t| WouldFire {
            severity: t.severity.as_str(),
            what: format!(
                "underuse: idle above {:.0}% over {} and its short window (spending {:.0}% of the idle budget)",
                t.threshold(period_s, c.target) * 100.0,
                duration(t.long_s),
                t.budget_fraction * 100.0
            ),
        })
        .collect();
    for a in alerts::RATIO_ALERTS {
        if let Some(r) = a.firing(&c.minutes) {
            out.push(WouldFire {
                severity: a.severity.as_str(),
                what: format!(
                    "{}: {:.1}% of committed GPU time {} over the last {}",
                    a.summary,
                    100.0 * r,
                    a.kind,
                    window_words(a.long_s)
                ),
            });
        }
    }
    if c.figures
        .idle_budget_remaining
        .is_some_and(|r| r <= alerts::IDLE_BUDGET_EXHAUSTED_AT)
    {
        out.push(WouldFire {
            severity: alerts::IDLE_BUDGET_EXHAUSTED.severity.as_str(),
            what: "idle budget of the period exhausted".into(),
        });
    }
    if let Some(p) = c.figures.projected_utilization.filter(|p| *p < c.target) {
        out.push(WouldFire {
            severity: alerts::PROJECTED_TARGET_MISS.severity.as_str(),
            what: format!(
                "projected month-end utilization {:.1}% below the {:.1}% target",
                p * 100.0,
                c.target * 100.0
            ),
        });
    }
    if c.targets_down > 0 {
        out.push(WouldFire {
            severity: alerts::TARGET_DOWN.severity.as_str(),
            what: format!("{} agent(s) not answering", c.targets_down),
        });
    }
    out
}

/// "hour" for 3600 s, "30 minutes" below it, else the short form ("6h").
fn window_words(s: f64) -> String {
    if s == 3600.0 {
        "hour".into()
    } else if s < 3600.0 {
        format!("{} minutes", s / 60.0)
    } else {
        duration(s)
    }
}

fn duration(s: f64) -> String {
    if s >= 86_400.0 {
        format!("{}d", s / 86_400.0)
    } else if s >= 3600.0 {
        format!("{}h", s / 3600.0)
    } else {
        format!("{}m", s / 60.0)
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// 1234567.8 → "1,234,567.8" (one decimal).
pub fn thousands(v: f64) -> String {
    let s = format!("{:.1}", v.abs());
    let (int, frac) = s.split_once('.').unwrap_or((&s, "0"));
    let mut out = String::new();
    for (i, ch) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    format!("{}{out}.{frac}", if v < 0.0 { "-" } else { "" })
}

fn pct(v: Option<f64>) -> String {
    v.map_or("—".into(), |v| format!("{:.1}%", v * 100.0))
}

fn iso(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.strftime("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_default()
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1b1f24;background:#f6f7f9}\
h1{font-size:20px;margin:0 0 4px}h2{font-size:17px;margin:0 0 8px}.sub{color:#57606a;margin-bottom:16px}\
section{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:16px;margin:0 0 16px}\
table{border-collapse:collapse;margin:8px 0}td,th{padding:3px 10px;text-align:right;border-bottom:1px solid #eaeef2}\
th{text-align:left;font-weight:600;color:#57606a}th.part{padding-left:26px;font-weight:400}.grid{display:flex;gap:24px;flex-wrap:wrap}\
.page{color:#fff;background:#cf222e;border-radius:3px;padding:0 6px}.ticket{color:#fff;background:#bf8700;border-radius:3px;padding:0 6px}\
.ok{color:#1a7f37}.bad{color:#cf222e}.legend span{margin-right:14px}";

pub fn render(v: &View) -> String {
    let mut h = String::with_capacity(64 * 1024);
    let _ = write!(
        h,
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>commitmeter</title>\
         <meta name=viewport content=\"width=device-width\"><style>{STYLE}</style></head><body>\
         <h1>commitmeter — contracts this billing period</h1>\
         <div class=sub>Sealed ledger minutes through <b data-k=sealed_through data-ms={}>{}</b> (accounting since {}). \
         Figures are month to date in GPU-hours; <a href=\"/metrics\">/metrics</a> has them as series.</div>",
        v.sealed_through_ms,
        iso(v.sealed_through_ms),
        iso(v.since_ms)
    );
    if v.contracts.is_empty() {
        h.push_str("<section>No contracts configured.</section>");
    }
    for c in &v.contracts {
        contract(&mut h, c);
    }
    h.push_str("</body></html>\n");
    h
}

fn contract(h: &mut String, c: &ContractView) {
    let id = esc(&c.id);
    let hours = |ms: i64| thousands(ms as f64 / 3_600_000.0);
    let money = |x: f64| format!("{} {}", thousands(x), esc(&c.currency));
    let f = &c.figures;
    let util_class = if f.utilization.is_some_and(|u| u >= c.target) {
        "ok"
    } else {
        "bad"
    };
    let _ = write!(
        h,
        "<section data-contract=\"{id}\" data-period-start={} data-period-end={}><h2>{id} <small class=sub>{} · {} · {} GPUs committed now</small></h2>\
         <div class=sub>Billing period {} → {} ({})</div><div class=grid><div><table>\
         <tr><th></th><th>GPU-hours</th><th>cost</th></tr>",
        c.period.0,
        c.period.1,
        esc(&c.provider),
        esc(&c.timezone),
        c.committed_gpus_now,
        iso(c.period.0),
        iso(c.period.1),
        esc(&c.timezone),
    );
    // The idle split indented under idle: its parts add up to idle, never to the rest.
    for kind in Kind::shown() {
        let class = if kind.part_of().is_some() {
            " class=part"
        } else {
            ""
        };
        let _ = write!(
            h,
            "<tr><th{class}>{kind}</th><td data-k={kind}>{}</td>",
            hours(c.mtd[kind])
        );
        match f.cost(kind) {
            Some(cost) => {
                let _ = write!(h, "<td data-k=cost_{kind}>{}</td></tr>", money(cost));
            }
            None => h.push_str("<td></td></tr>"),
        }
    }
    let _ = write!(
        h,
        "</table></div><div><table>\
         <tr><th>utilization (month to date)</th><td class={util_class} data-k=utilization>{}</td></tr>\
         <tr><th>target</th><td data-k=target>{}</td></tr>\
         <tr><th>projected at period end</th><td data-k=projected>{}</td></tr>\
         <tr><th>required for the rest</th><td data-k=required>{}</td></tr>\
         <tr><th>idle budget remaining</th><td data-k=budget>{}</td></tr>\
         <tr><th>agents up / down</th><td>{} / {}</td></tr></table></div><div><table><tr><th>burn rate</th>",
        pct(f.utilization),
        pct(Some(c.target)),
        pct(f.projected_utilization),
        pct(f.required_utilization),
        pct(f.idle_budget_remaining),
        c.targets_up,
        c.targets_down,
    );
    let budget = 1.0 - c.target;
    for (name, _) in WINDOWS {
        let _ = write!(h, "<th>{name}</th>");
    }
    h.push_str("</tr><tr><th>idle ratio / budget</th>");
    for (name, minutes) in WINDOWS {
        let r = burn::idle_ratio(&c.minutes, minutes);
        let text = match (r, budget > 0.0) {
            (Some(r), true) => format!("{:.2}", r / budget),
            _ => "—".into(),
        };
        let _ = write!(h, "<td data-k=\"burn_{name}\">{text}</td>");
    }
    h.push_str("</tr></table>");
    let period_s = (c.period.1 - c.period.0) as f64 / 1000.0;
    let unreachable: Vec<&str> = TIERS
        .iter()
        .filter(|t| !t.reachable(period_s, c.target))
        .map(|t| t.name)
        .collect();
    if !unreachable.is_empty() {
        let _ = write!(
            h,
            "<div class=sub>Tiers that cannot fire at this target: {} (threshold above 100% idle).</div>",
            unreachable.join(", ")
        );
    }
    let alerts = would_fire(c);
    h.push_str("<div><b>Contract alerts that would be firing:</b> ");
    if alerts.is_empty() {
        h.push_str("<span class=ok data-k=alerts>none</span>");
    }
    h.push_str("<ul data-k=alert-list>");
    for a in &alerts {
        let _ = write!(
            h,
            "<li><span class={0}>{0}</span> {1}</li>",
            a.severity,
            esc(&a.what)
        );
    }
    h.push_str(
        "</ul><div class=sub>The underuse, budget and delivery rules of alerts/ and the \
         contract's agents down, judged on sealed minutes without the rules' <code>for</code> \
         delays; other host and pipeline alerts are left to Prometheus.</div></div></div></div>",
    );
    chart(h, c);
    showback(h, c);
    sizing(h, c);
    statements(h, c);
    h.push_str("</section>");
}

/// The showback table of [`ContractView::teams`]: per team, month to date, the GPU-hours
/// it used (by the contract's usage signal) and held without using (allocated − used),
/// each at the contract price, and the share of the period's commitment so far it held
/// (allocated / committed). Teams by allocated time, largest first, `unassigned` last;
/// then the sum over the teams, which is the contract's allocated time. Each cell carries
/// its integer GPU-ms (or parts per million of the share) in `data-v`.
fn showback(h: &mut String, c: &ContractView) {
    if c.teams.is_empty() {
        return;
    }
    let currency = esc(&c.currency);
    let hours = |ms: i64| thousands(ms as f64 / 3_600_000.0);
    let cost = |ms: i64| {
        format!(
            "{} {currency}",
            thousands(ms as f64 / 3_600_000.0 * c.price_per_gpu_hour)
        )
    };
    let committed = c.mtd[Kind::Committed];
    let share = |ms: i64| {
        if committed > 0 {
            let ppm = (ms as i128 * 1_000_000 / committed as i128) as i64;
            (
                ppm.to_string(),
                format!("{:.1}%", ms as f64 / committed as f64 * 100.0),
            )
        } else {
            (String::new(), "—".into())
        }
    };
    let mut rows = c.teams.clone();
    rows.sort_by(|a, b| {
        (a.0 == crate::contract::UNASSIGNED)
            .cmp(&(b.0 == crate::contract::UNASSIGNED))
            .then(b.1.cmp(&a.1))
            .then(a.0.cmp(&b.0))
    });
    let total = rows.iter().fold((0i64, 0i64), |(a, u), r| {
        (a.saturating_add(r.1), u.saturating_add(r.2))
    });
    let _ = write!(
        h,
        "<div data-k=showback><b>Showback by team</b> <span class=sub>month to date: GPU-hours each \
         team used (by the contract's usage signal) and held without using (allocated − used), \
         their cost at the contract price ({currency} {} per GPU-hour), and the share of the \
         commitment so far each held (allocated / committed). Unassigned: allocated time no \
         [[teams]] rule claims.</span><table><tr><th>team</th><th>GPU-h used</th>\
         <th>GPU-h held</th><th>used cost</th><th>held cost</th><th>share of the commitment</th></tr>",
        c.price_per_gpu_hour
    );
    let row = |h: &mut String, attr: &str, name: &str, allocated: i64, used: i64| {
        let held = allocated.saturating_sub(used).max(0);
        let (ppm, shown) = share(allocated);
        let _ = write!(
            h,
            "<tr {attr}><th>{}</th><td data-k=team_used data-v={used}>{}</td>\
             <td data-k=team_held data-v={held}>{}</td><td data-k=team_used_cost>{}</td>\
             <td data-k=team_held_cost>{}</td><td data-k=team_share data-v={ppm}>{shown}</td></tr>",
            esc(name),
            hours(used),
            hours(held),
            cost(used),
            cost(held),
        );
    };
    for (team, allocated, used) in &rows {
        row(
            h,
            &format!("data-team=\"{}\"", esc(team)),
            team,
            *allocated,
            *used,
        );
    }
    row(h, "data-team-total", "all teams", total.0, total.1);
    h.push_str("</table></div>");
}

/// Used GPU-ms per minute as GPUs with three decimals, as the statement prints them.
fn gpus(ms_per_minute: i64) -> String {
    gpu_hours(ms_per_minute * (HOUR_MS / GPU_MINUTE_MS))
}

/// The renewal sizing of [`ContractView::sizing`], the statement's figures: one row per
/// lookback with at least 90 % of its minutes in the ledger (the others are named, never
/// shown), each value also in the attribute `data-v` as the statement's JSON has it
/// (used GPU-ms per minute, micro-units of the currency).
fn sizing(h: &mut String, c: &ContractView) {
    let Some(Sizing {
        section: z,
        end_local,
    }) = &c.sizing
    else {
        return;
    };
    let currency = esc(&c.currency);
    let _ = write!(
        h,
        "<div data-k=sizing data-end-ms={}><b>Renewal sizing</b> <span class=sub>as of {}: used GPUs \
         per minute over the lookbacks ending then (computed again each hour of sealed minutes), \
         against the {} GPUs committed then; ",
        z.end_ms,
        esc(end_local),
        z.current_gpus
    );
    match z.on_demand_price_per_gpu_hour {
        Some(p) => {
            let _ = write!(h, "on demand {currency} {p} per GPU-hour.</span>");
        }
        None => h.push_str(
            "no <code>on_demand_price_per_gpu_hour</code>: no commitment recommended.</span>",
        ),
    }
    let shown: Vec<_> = z
        .lookbacks
        .iter()
        .filter_map(|(d, l)| l.as_ref().map(|l| (*d, l)))
        .collect();
    let hidden: Vec<String> = z
        .lookbacks
        .iter()
        .filter(|(_, l)| l.is_none())
        .map(|(d, _)| format!("{d} days"))
        .collect();
    if !shown.is_empty() {
        h.push_str(
            "<table><tr><th>lookback</th><th>p50</th><th>p90</th><th>p99</th><th>max GPUs</th>\
             <th>minutes</th>",
        );
        if z.on_demand_price_per_gpu_hour.is_some() {
            let _ = write!(
                h,
                "<th>cheapest commitment</th><th>its cost</th><th>cost at {} GPUs</th><th>saving</th>",
                z.current_gpus
            );
        }
        h.push_str("</tr>");
        for (days, l) in shown {
            let d = &l.distribution;
            let _ = write!(h, "<tr data-sizing-days={days}><th>{days} days</th>");
            for (k, v) in [
                ("p50", d.p50),
                ("p90", d.p90),
                ("p99", d.p99),
                ("max", d.max),
            ] {
                let _ = write!(h, "<td data-k=sizing_{k} data-v={v}>{}</td>", gpus(v));
            }
            let _ = write!(
                h,
                "<td data-k=sizing_accounted data-v={}>{}/{}</td>",
                l.accounted, l.accounted, l.minutes
            );
            if let Some(r) = &l.recommendation {
                let _ = write!(h, "<td data-k=sizing_gpus data-v={0}>{0} GPUs</td>", r.gpus);
                for (k, v) in [
                    ("cost", r.cost_micros),
                    ("current_cost", r.current_cost_micros),
                    ("saving", r.saving_micros),
                ] {
                    let _ = write!(
                        h,
                        "<td data-k=sizing_{k} data-v={v}>{} {currency}</td>",
                        micros(v)
                    );
                }
            }
            h.push_str("</tr>");
        }
        h.push_str("</table>");
    }
    if !hidden.is_empty() {
        let _ = write!(
            h,
            "<div class=sub data-k=sizing_not_shown>Not shown: {} (less than {MIN_COVERAGE_PERCENT} % of \
             the lookback's minutes in the ledger).</div>",
            hidden.join(", ")
        );
    }
    h.push_str("</div>");
}

/// The statements of the periods in [`ContractView::periods`], with links.
fn statements(h: &mut String, c: &ContractView) {
    if c.periods.is_empty() {
        return;
    }
    // Contract ids are letters, digits, `_`, `.` and `-`: safe in a path as they are.
    let id = esc(&c.id);
    h.push_str("<div><b>Statements:</b><ul data-k=statements>");
    for p in &c.periods {
        let _ = write!(
            h,
            "<li data-period={p}>{p}: <a href=\"/statements/{id}/{p}.csv\">csv</a> · \
             <a href=\"/statements/{id}/{p}.json\">json</a> · \
             <a href=\"/statements/{id}/{p}.focus.csv\">FOCUS csv</a></li>"
        );
    }
    h.push_str("</ul></div>");
}

/// Average GPUs committed, delivered and used per hour of the month so far (per
/// minute while the month is younger than six hours), from the first accounted
/// minute to the last sealed one.
fn chart(h: &mut String, c: &ContractView) {
    let (w, ht, pad) = (960.0, 220.0, 40.0);
    let (Some(first), Some(last)) = (c.minutes.first(), c.minutes.last()) else {
        h.push_str("<div class=sub>No sealed minutes in this period yet.</div>");
        return;
    };
    let (p0, p1) = (first.0 * MINUTE_MS, (last.0 + 1) * MINUTE_MS);
    let span = (p1 - p0).max(1) as f64;
    let bucket_ms: i64 = if p1 - p0 < 6 * 3_600_000 {
        MINUTE_MS
    } else {
        3_600_000
    };
    let mut hours: Vec<(i64, Totals, i64)> = Vec::new();
    for (m, t) in &c.minutes {
        let hour = (m * MINUTE_MS - p0).div_euclid(bucket_ms);
        match hours.last_mut() {
            Some((hh, acc, n)) if *hh == hour => {
                acc.add(t);
                *n += 1;
            }
            _ => hours.push((hour, *t, 1)),
        }
    }
    let gpus = |ms: i64, n: i64| ms as f64 / (n.max(1) * MINUTE_MS) as f64;
    let max = hours
        .iter()
        .map(|(_, t, n)| gpus(t.committed.max(t.delivered), *n))
        .fold(1.0f64, f64::max)
        * 1.1;
    let x = |b: i64| pad + (b as f64 + 0.5) * bucket_ms as f64 / span * (w - 2.0 * pad);
    let y = |g: f64| ht - pad / 2.0 - g / max * (ht - pad);
    let line = |sel: &dyn Fn(&Totals) -> i64| -> String {
        hours
            .iter()
            .map(|(hh, t, n)| format!("{:.1},{:.1}", x(*hh), y(gpus(sel(t), *n))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let _ = write!(
        h,
        "<svg viewBox=\"0 0 {w} {ht}\" width=\"100%\" role=img aria-label=\"GPUs over the month so far\">\
         <rect x={pad} y={} width={} height={} fill=\"#fafbfc\" stroke=\"#d0d7de\"/>\
         <text x=4 y={} font-size=11 fill=\"#57606a\">{:.0}</text><text x=4 y={} font-size=11 fill=\"#57606a\">0</text>\
         <text x={pad} y={} font-size=11 fill=\"#57606a\">{}</text><text x={} y={} font-size=11 fill=\"#57606a\" text-anchor=end>{}</text>\
         <polyline fill=none stroke=\"#8c959f\" stroke-dasharray=\"4 3\" stroke-width=2 points=\"{}\"/>\
         <polyline fill=none stroke=\"#0969da\" stroke-width=2 points=\"{}\"/>\
         <polyline fill=none stroke=\"#1a7f37\" stroke-width=2 points=\"{}\"/></svg>\
         <div class=\"legend sub\"><span>average GPUs per bucket of the month so far:</span><span style=\"color:#8c959f\">- - committed</span>\
         <span style=\"color:#0969da\">— delivered</span><span style=\"color:#1a7f37\">— used (within commitment)</span></div>",
        pad / 2.0,
        w - 2.0 * pad,
        ht - pad,
        pad / 2.0 + 10.0,
        max,
        ht - pad / 2.0,
        ht - 2.0,
        iso(p0),
        w - pad,
        ht - 2.0,
        iso(p1),
        line(&|t| t.committed),
        line(&|t| t.delivered),
        line(&|t| t.used_within()),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::split;

    #[test]
    fn periods_run_from_the_ledgers_first_to_now_newest_first() {
        let c = crate::statement::tests::contract("Europe/Paris", 2.0);
        let day = 86_400_000;
        let now = c.billing_period_of_month(2026, 11).unwrap().0 + 3 * day;
        let since = c.billing_period_of_month(2026, 8).unwrap().0 + 10 * day;
        assert_eq!(
            periods(&c, since, now),
            ["2026-11", "2026-10", "2026-09", "2026-08"]
        );
        // A ledger started at a period's very start lists that period, not the one before.
        let since = c.billing_period_of_month(2026, 9).unwrap().0;
        assert_eq!(periods(&c, since, now), ["2026-11", "2026-10", "2026-09"]);
        // A ledger started now: the current period only.
        assert_eq!(periods(&c, now, now), ["2026-11"]);
        // Nothing before the contract's start (2026-01-01).
        let all = periods(&c, i64::MIN / 2, now);
        assert_eq!(
            (all.len(), all.last().map(String::as_str)),
            (11, Some("2026-01"))
        );
    }

    #[test]
    fn the_sizing_shows_only_covered_lookbacks_with_the_statements_integers() {
        use crate::statement::sizing::{self, Prices};
        let g = GPU_MINUTE_MS;
        // 20 days of 3 GPUs used, 5 for a tenth of the minutes: only the 7-day lookback.
        let used: Vec<Option<i64>> = (0..20 * 1440)
            .map(|m| Some(if m % 10 == 0 { 5 * g } else { 3 * g }))
            .collect();
        let prices = Prices {
            committed: 2_000_000,
            on_demand: Some(8_000_000),
        };
        let section = |used: &[Option<i64>]| SizingSection {
            end_ms: 0,
            current_gpus: 8,
            on_demand_price_per_gpu_hour: Some(8.0),
            lookbacks: sizing::LOOKBACK_DAYS
                .into_iter()
                .zip(sizing::size(used, prices, 8))
                .collect(),
        };
        let page = |z: SizingSection| {
            let mut h = String::new();
            let c = ContractView {
                currency: "USD".into(),
                sizing: Some(Sizing {
                    section: z,
                    end_local: "1970-01-01T00:00:00+00:00".into(),
                }),
                ..ContractView::default()
            };
            super::sizing(&mut h, &c);
            h
        };
        let z = section(&used);
        let week = z.lookbacks[0].1.clone().unwrap();
        let r = week.recommendation.unwrap();
        let h = page(z);
        assert!(h.contains("as of 1970-01-01T00:00:00+00:00"), "{h}");
        assert!(h.contains("<tr data-sizing-days=7>"), "{h}");
        assert!(!h.contains("data-sizing-days=30") && !h.contains("data-sizing-days=60"));
        assert!(h.contains("Not shown: 30 days, 60 days"), "{h}");
        assert!(h.contains(&format!("data-k=sizing_p50 data-v={}>3.000<", 3 * g)));
        assert!(h.contains(&format!("data-k=sizing_max data-v={}>5.000<", 5 * g)));
        assert!(h.contains(&format!("data-k=sizing_gpus data-v={0}>{0} GPUs<", r.gpus)));
        assert!(h.contains(&format!(
            "data-k=sizing_saving data-v={}>{} USD<",
            r.saving_micros,
            micros(r.saving_micros)
        )));
        // Too little history: no figures at all.
        let h = page(section(&used[..1440]));
        assert!(
            !h.contains("data-sizing-days") && !h.contains("data-v"),
            "{h}"
        );
        assert!(h.contains("Not shown: 7 days, 30 days, 60 days"), "{h}");
    }

    #[test]
    fn showback_rows_are_the_team_books_figures_at_the_contract_price() {
        let hour = 3_600_000;
        let mut c = ContractView {
            currency: "USD".into(),
            price_per_gpu_hour: 2.0,
            ..ContractView::default()
        };
        c.mtd.committed = 100 * hour;
        let mut h = String::new();
        showback(&mut h, &c);
        assert!(h.is_empty(), "no teams with time: no table");
        c.teams = vec![
            ("a<b".into(), 10 * hour, 4 * hour),
            (crate::contract::UNASSIGNED.into(), 30 * hour, 0),
            ("vision".into(), 20 * hour, 15 * hour),
        ];
        showback(&mut h, &c);
        assert!(
            !h.contains("a<b") && h.contains("data-team=\"a&lt;b\""),
            "{h}"
        );
        // Largest allocation first, unassigned last whatever its size.
        let order: Vec<&str> = h
            .split("<tr data-team=\"")
            .skip(1)
            .map(|r| r.split('"').next().unwrap())
            .collect();
        assert_eq!(order, ["vision", "a&lt;b", "unassigned"]);
        let vision = h.split("data-team=\"vision\"").nth(1).unwrap();
        let vision = vision.split("</tr>").next().unwrap();
        assert!(
            vision.contains(&format!("data-k=team_used data-v={}>15.0<", 15 * hour)),
            "{vision}"
        );
        assert!(
            vision.contains(&format!("data-k=team_held data-v={}>5.0<", 5 * hour)),
            "{vision}"
        );
        assert!(
            vision.contains("data-k=team_used_cost>30.0 USD<"),
            "{vision}"
        );
        assert!(
            vision.contains("data-k=team_held_cost>10.0 USD<"),
            "{vision}"
        );
        assert!(
            vision.contains("data-k=team_share data-v=200000>20.0%<"),
            "{vision}"
        );
        // The sum over the teams: the contract's allocated time (60 of 100 committed hours).
        let total = h.split("data-team-total").nth(1).unwrap();
        assert!(total.contains(&format!("data-k=team_used data-v={}>19.0<", 19 * hour)));
        assert!(total.contains(&format!("data-k=team_held data-v={}>41.0<", 41 * hour)));
        assert!(total.contains("data-v=600000>60.0%<"), "{total}");
        // Nothing committed yet: no share, never a division by zero.
        c.mtd.committed = 0;
        let mut h = String::new();
        showback(&mut h, &c);
        assert!(h.contains("data-k=team_share data-v=>—<"), "{h}");
    }

    #[test]
    fn numbers_are_grouped_and_html_is_escaped() {
        assert_eq!(thousands(1_234_567.84), "1,234,567.8");
        assert_eq!(thousands(0.0), "0.0");
        assert_eq!(thousands(-1000.0), "-1,000.0");
        let v = View {
            contracts: vec![ContractView {
                id: "a<b".into(),
                currency: "USD".into(),
                target: 0.95,
                period: (0, 30 * 86_400_000),
                mtd: crate::ledger::split_held(
                    3_600_000 * 10,
                    3_600_000 * 9,
                    3_600_000 * 4,
                    3_600_000 * 2,
                    0,
                    false,
                ),
                minutes: (0..120)
                    .map(|m| (m, split(600_000, 600_000, 0, 0, false)))
                    .collect(),
                ..ContractView::default()
            }],
            ..View::default()
        };
        let html = render(&v);
        assert!(html.contains("a&lt;b") && !html.contains("a<b"));
        assert!(html.contains("<td data-k=committed>10.0</td>"));
        assert!(html.contains("<td data-k=idle>5.0</td>"));
        // The idle split right under idle, indented: its parts add up to it.
        let rows: Vec<&str> = html
            .split("<tr><th")
            .filter_map(|r| r.split("</th>").next())
            .filter(|r| {
                let name = r.rsplit('>').next().unwrap_or("");
                name.starts_with("idle") && !name.contains(' ')
            })
            .collect();
        assert_eq!(
            rows,
            [
                ">idle",
                " class=part>idle_unallocated",
                " class=part>idle_allocated"
            ]
        );
        assert!(html.contains("<td data-k=idle_unallocated>3.0</td>"));
        assert!(html.contains("<td data-k=idle_allocated>2.0</td>"));
        assert!(html.contains("<polyline"));
        // 10 GPUs idle for two hours: the fast page would fire.
        assert!(would_fire(&v.contracts[0])
            .iter()
            .any(|a| a.severity == "page"));
        assert!(!html.contains("<script"));
    }

    #[test]
    fn contract_conditions_use_the_ledger_thresholds() {
        // An hour at 100 GPUs all busy, `lost` of them undelivered.
        let view = |lost: i64| ContractView {
            target: 0.9,
            period: (0, 30 * 86_400_000),
            minutes: (0..60)
                .map(|m| {
                    let d = 100 - lost;
                    (m, split(100 * 60_000, d * 60_000, d * 60_000, 0, false))
                })
                .collect(),
            ..ContractView::default()
        };
        let shortfall = |c: &ContractView| {
            would_fire(c)
                .into_iter()
                .filter(|a| a.what.starts_with("delivery shortfall"))
                .collect::<Vec<_>>()
        };
        assert!(shortfall(&view(2)).is_empty(), "2 % is not above 2 %");
        let three = shortfall(&view(3));
        assert_eq!(three.len(), 1);
        assert_eq!(three[0].severity, "ticket");
        assert!(three[0].what.contains("3.0%") && three[0].what.ends_with("last hour"));
        // Like the rule, the short window must be over too: a shortfall that ended five
        // minutes ago no longer fires.
        let mut healed = view(3);
        for (_, t) in healed.minutes.iter_mut().skip(55) {
            *t = split(100 * 60_000, 100 * 60_000, 100 * 60_000, 0, false);
        }
        assert!(shortfall(&healed).is_empty());
        // 15 % undelivered: the major page as well as the ticket.
        let major: Vec<&str> = would_fire(&view(15)).iter().map(|a| a.severity).collect();
        assert_eq!(major, ["page", "ticket"]);
        // 6 % of the capacity unseen: unreported, not undelivered.
        let mut blind = view(6);
        for (_, t) in blind.minutes.iter_mut() {
            *t = split(100 * 60_000, 94 * 60_000, 94 * 60_000, 6 * 60_000, false);
        }
        let fired = would_fire(&blind);
        assert_eq!(fired.len(), 1);
        assert_eq!(
            fired[0].what,
            "capacity unreported: 6.0% of committed GPU time unreported over the last hour"
        );

        let mut c = view(0);
        assert!(would_fire(&c).is_empty());
        c.figures.idle_budget_remaining = Some(0.0);
        c.figures.projected_utilization = Some(0.85);
        c.targets_down = 2;
        let all: Vec<String> = would_fire(&c).into_iter().map(|a| a.what).collect();
        assert_eq!(
            all,
            [
                "idle budget of the period exhausted",
                "projected month-end utilization 85.0% below the 90.0% target",
                "2 agent(s) not answering"
            ]
        );
        c.figures.idle_budget_remaining = Some(0.01);
        c.figures.projected_utilization = Some(0.9);
        c.targets_down = 0;
        assert!(would_fire(&c).is_empty());
    }
}
