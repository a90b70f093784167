//! The delivery gaps of a period (the SLA's evidence) as CSV (the `csv` crate) and JSON
//! (serde), exported beside the statement. Pure: the caller passes the gaps the ledger stored
//! for the period ([`crate::ledger::gaps`]) and the time their open ones run to.
//!
//! One row per gap that overlaps the period, in order of start, then target and GPU, with
//! the same columns ([`COLUMNS`]) in both formats:
//!
//! | column | meaning |
//! |---|---|
//! | `contract` | the contract id |
//! | `target` | the scrape target (host); empty for `short` |
//! | `gpu` | the GPU's UUID; empty for `short` |
//! | `cause` | `gpu_lost`, `host_unreachable` or `short` |
//! | `start` | RFC 3339 UTC, to the millisecond: the reading that opened it |
//! | `end` | the reading that closed it; empty while open |
//! | `duration_ms` | `end − start`; empty while open |
//! | `in_period_ms` | the part within the period (an open gap up to `until`) |
//! | `short_gpu_ms` | `short` only: GPU-ms by which the commitment exceeded the known GPUs |
//! | `xids` | XID codes seen during the gap (CSV: separated by `;`; JSON: an array) |

use serde::Serialize;

use crate::ledger::{Cause, Gap};

/// The columns, in order: the CSV header and the JSON rows' keys.
pub const COLUMNS: [&str; 10] = [
    "contract",
    "target",
    "gpu",
    "cause",
    "start",
    "end",
    "duration_ms",
    "in_period_ms",
    "short_gpu_ms",
    "xids",
];

/// One gap as exported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    pub contract: String,
    pub target: String,
    pub gpu: String,
    pub cause: &'static str,
    pub start: String,
    pub end: Option<String>,
    pub duration_ms: Option<i64>,
    pub in_period_ms: i64,
    pub short_gpu_ms: Option<i64>,
    pub xids: Vec<String>,
}

/// Milliseconds since the epoch as RFC 3339 UTC with milliseconds.
fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| format!("{t:.3}"))
        .unwrap_or_else(|_| ms.to_string())
}

/// The rows of `gaps` (one contract's, `contract` its id) overlapping `[from_ms, to_ms)`;
/// open gaps run to `until_ms` (now, for a period not yet over).
pub fn rows(contract: &str, gaps: &[Gap], from_ms: i64, to_ms: i64, until_ms: i64) -> Vec<Row> {
    let mut out: Vec<(&Gap, Row)> = gaps
        .iter()
        .filter(|g| g.overlap_ms(from_ms, to_ms) > 0)
        .map(|g| {
            let clipped = Gap {
                end_ms: Some(g.end_ms.unwrap_or(until_ms).max(g.start_ms)),
                ..g.clone()
            };
            let row = Row {
                contract: contract.to_string(),
                target: g.target.clone(),
                gpu: g.gpu.clone(),
                cause: g.cause.as_str(),
                start: rfc3339(g.start_ms),
                end: g.end_ms.map(rfc3339),
                duration_ms: g.duration_ms(),
                in_period_ms: clipped.overlap_ms(from_ms, to_ms),
                short_gpu_ms: (g.cause == Cause::Short).then_some(g.short_gpu_ms),
                xids: g.xids.iter().cloned().collect(),
            };
            (g, row)
        })
        .collect();
    out.sort_by(|a, b| {
        (a.0.start_ms, &a.0.target, &a.0.gpu, a.0.cause).cmp(&(
            b.0.start_ms,
            &b.0.target,
            &b.0.gpu,
            b.0.cause,
        ))
    });
    out.into_iter().map(|(_, r)| r).collect()
}

/// The rows as CSV, with a header line.
pub fn csv(rows: &[Row]) -> Result<String, csv::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(COLUMNS)?;
    let opt = |v: Option<i64>| v.map(|x| x.to_string()).unwrap_or_default();
    for r in rows {
        w.write_record([
            r.contract.clone(),
            r.target.clone(),
            r.gpu.clone(),
            r.cause.to_string(),
            r.start.clone(),
            r.end.clone().unwrap_or_default(),
            opt(r.duration_ms),
            r.in_period_ms.to_string(),
            opt(r.short_gpu_ms),
            r.xids.join(";"),
        ])?;
    }
    let bytes = w.into_inner().map_err(|e| e.into_error())?;
    Ok(String::from_utf8(bytes).expect("csv of strings is UTF-8"))
}

/// The rows as a JSON array (pretty-printed, a newline at the end).
pub fn json(rows: &[Row]) -> String {
    let mut s = serde_json::to_string_pretty(rows).expect("rows serialize");
    s.push('\n');
    s
}

#[cfg(test)]
pub(super) mod tests {
    use std::collections::BTreeSet;

    use super::*;

    const T0: i64 = 1_764_547_200_000; // 2025-12-01T00:00:00Z

    /// A gap without XIDs or shortfall (also for [`super::super::gap_summary`]'s tests).
    pub(in crate::statement) fn gap(
        target: &str,
        gpu: &str,
        cause: Cause,
        start: i64,
        end: Option<i64>,
    ) -> Gap {
        Gap {
            contract: 0,
            target: target.into(),
            gpu: gpu.into(),
            cause,
            start_ms: start,
            end_ms: end,
            short_gpu_ms: 0,
            xids: BTreeSet::new(),
        }
    }

    fn sample() -> Vec<Gap> {
        let mut lost = gap(
            "node-1:9473",
            "GPU-a",
            Cause::GpuLost,
            T0 + 90_000,
            Some(T0 + 405_000),
        );
        lost.xids = ["48".to_string(), "79".to_string()].into();
        let mut short = gap("", "", Cause::Short, T0 + 60_000, None);
        short.short_gpu_ms = 120_000;
        vec![
            // Before the period: left out.
            gap(
                "node-1:9473",
                "GPU-a",
                Cause::GpuLost,
                T0 - 10_000,
                Some(T0),
            ),
            gap(
                "node-2:9473",
                "GPU-b, \"odd\"",
                Cause::HostUnreachable,
                T0 - 30_000,
                Some(T0 + 30_000),
            ),
            lost,
            short,
        ]
    }

    #[test]
    fn csv_quotes_and_reads_back_with_the_columns() {
        let rows = rows(
            "lab \"A\", 2026",
            &sample(),
            T0,
            T0 + 3_600_000,
            T0 + 600_000,
        );
        assert_eq!(rows.len(), 3);
        let text = csv(&rows).unwrap();
        let mut r = csv::Reader::from_reader(text.as_bytes());
        assert_eq!(r.headers().unwrap().iter().collect::<Vec<_>>(), COLUMNS);
        let recs: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
        assert_eq!(recs.len(), 3);
        // The unreachable gap began before the period: 30 s of it are in the period.
        assert_eq!(&recs[0][0], "lab \"A\", 2026");
        assert_eq!(&recs[0][2], "GPU-b, \"odd\"");
        assert_eq!(&recs[0][3], "host_unreachable");
        assert_eq!(&recs[0][4], "2025-11-30T23:59:30.000Z");
        assert_eq!((&recs[0][6], &recs[0][7]), ("60000", "30000"));
        // The short interval is open: no end, in the period up to `until`.
        assert_eq!(&recs[1][3], "short");
        assert_eq!((&recs[1][5], &recs[1][6], &recs[1][7]), ("", "", "540000"));
        assert_eq!(&recs[1][8], "120000");
        assert_eq!(&recs[2][9], "48;79");
        assert_eq!(&recs[2][5], "2025-12-01T00:06:45.000Z");
    }

    #[test]
    fn json_has_the_same_columns_and_values() {
        let rows = rows("c", &sample(), T0, T0 + 3_600_000, T0 + 600_000);
        let v: serde_json::Value = serde_json::from_str(&json(&rows)).unwrap();
        let arr = v.as_array().unwrap();
        assert_eq!(arr.len(), 3);
        for o in arr {
            let keys: Vec<&str> = o.as_object().unwrap().keys().map(String::as_str).collect();
            let mut want = COLUMNS.to_vec();
            want.sort_unstable();
            let mut keys = keys;
            keys.sort_unstable();
            assert_eq!(keys, want);
        }
        assert_eq!(arr[1]["end"], serde_json::Value::Null);
        assert_eq!(arr[2]["xids"], serde_json::json!(["48", "79"]));
        assert_eq!(arr[2]["duration_ms"], 315_000);
    }

    #[test]
    fn no_gaps_is_a_header_and_an_empty_array() {
        assert_eq!(csv(&[]).unwrap(), format!("{}\n", COLUMNS.join(",")));
        assert_eq!(json(&[]), "[]\n");
    }
}
