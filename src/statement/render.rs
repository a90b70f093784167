//! A [`Statement`] as text (a readable table), CSV (the `csv` crate) and JSON (serde).
//!
//! GPU-hours are the rows' integer GPU-ms divided once, here; the exact GPU-ms are in the CSV
//! and JSON beside them, so a reader can re-add days to the total to the millisecond.

use serde::Serialize;

use super::{Row, Statement, HOUR_MS};
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
    let mut header: Vec<String> = vec!["day".into(), "hours".into()];
    header.extend(Kind::NAMES.iter().map(|n| n.to_string()));
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
        v.extend(Kind::ALL.iter().map(|&k| gpu_hours(r.totals[k])));
        v.extend([ratio(r.utilization()), coverage(r)]);
        v
    };
    let mut table: Vec<Vec<String>> = vec![header];
    table.extend(s.days.iter().map(line));
    table.push(line(&s.total));
    let widths: Vec<usize> = (0..table[0].len())
        .map(|c| table.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for (i, r) in table.iter().enumerate() {
        if i == table.len() - 1 {
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
    out.push_str("\nGPU-hours per kind; minutes: sealed minutes accounted / minutes in the span");
    if s.days.iter().any(|d| d.provisional) {
        out.push_str("; * not over yet");
    }
    out.push('\n');
    let costs: Vec<String> = Kind::ALL
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
    out.push_str(&format!(
        "Utilization {} against a target of {}\n",
        ratio(s.total.utilization()),
        s.target_utilization
    ));
    if let Some(l) = s.late {
        out.push_str(&format!(
            "Late (arrived after their minutes were sealed, counted nowhere, whole ledger): delivered {} GPU-hours, used {}\n",
            gpu_hours(l.delivered_gpu_ms),
            gpu_hours(l.used_gpu_ms)
        ));
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
    h.extend(["currency", "utilization", "target_utilization"].map(String::from));
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
        w.write_record(rec)?;
    }
    let bytes = w.into_inner().map_err(|e| e.into_error())?;
    Ok(String::from_utf8(bytes).expect("CSV of UTF-8 strings"))
}

#[derive(Serialize)]
struct KindJson {
    kind: &'static str,
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
    late: Option<super::Late>,
    days: Vec<RowJson<'a>>,
    total: RowJson<'a>,
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
                gpu_ms: r.totals[k],
                gpu_hours: r.totals[k] as f64 / HOUR_MS as f64,
                cost: r.cost(k, s.price_per_gpu_hour).map(|c| round(c, 2)),
            })
            .collect(),
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
        late: s.late,
        days: s.days.iter().map(|r| row_json(s, r)).collect(),
        total: row_json(s, &s.total),
    };
    let mut out = serde_json::to_string_pretty(&doc).expect("a statement serializes");
    out.push('\n');
    out
}
