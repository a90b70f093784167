//! `commitmeter statement` through the real binary: a ledger written by the store, its
//! statement in every format equal to its minutes, read from a running demo without stopping
//! it, and bad input (an unknown contract, a malformed or future period, a missing ledger, a
//! ledger from a newer schema) refused in one line naming the input, exit status 1.

// Tests read the clock and open SQLite as they please: clippy.toml keeps that to
// src/clock.rs and src/aggregator/store.rs in the product only.
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use commitmeter::aggregator::store::Store;
use commitmeter::ledger::{Cause, Gap, Kind, Ledger, MINUTE_MS};
use common::*;

const CONFIG: &str = r#"
[[targets]]
targets = ["10.0.0.1:9473"]
labels = { provider = "lab" }

[[contracts]]
id = "lab"
provider = "lab"
price_per_gpu_hour = 2.5
currency = "EUR"
timezone = "Europe/Berlin"
start = "2026-10-01"
selector = '{provider="lab"}'
ramp = [ { from = "2026-10-01", gpus = 4 } ]
"#;

/// Oct 1 2026 00:00 Europe/Berlin (CEST, UTC+2).
const OCT_1_MS: i64 = 1_790_805_600_000;

/// A config and a ledger of contract "lab" sealed for the first three days of October 2026
/// (no host ever reported: the whole commitment is unreported).
fn ledger(dir: &TempDir) -> (PathBuf, PathBuf) {
    let config = dir.path("aggregator.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let data = dir.path("data");
    let ids = vec!["lab".to_string()];
    let mut store = Store::open(&data).unwrap();
    store.load(&ids).unwrap();
    let mut l = Ledger::new(1, OCT_1_MS - MINUTE_MS);
    let sealed = l.seal(OCT_1_MS + 3 * 86_400_000, 0, |_, a, b| 4 * (b - a));
    assert_eq!(sealed.len(), 3 * 1440);
    store.commit(&ids, &sealed, &l.snapshot()).unwrap();
    drop(store);
    (config, data)
}

fn statement(config: &Path, data: &Path, extra: &[&str]) -> Output {
    let out = Command::new(BIN)
        .arg("statement")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.path={}", data.display()))
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run commitmeter statement");
    out
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "statement failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Exit status 1 and one line on stderr containing every `names`.
fn refused(out: &Output, names: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    for n in names {
        assert!(err.contains(n), "{err:?} does not name {n:?}");
    }
    assert!(out.stdout.is_empty());
    err
}

#[test]
fn the_statement_equals_the_ledgers_minutes_in_every_format() {
    let dir = TempDir::new("statement");
    let (config, data) = ledger(&dir);
    let committed_per_day = 4 * 86_400_000i64;

    let csv = ok(&statement(
        &config,
        &data,
        &["--period=2026-10", "--format=csv"],
    ));
    let mut r = csv::Reader::from_reader(csv.as_bytes());
    let headers = r.headers().unwrap().clone();
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let rows: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 32, "31 days and the total");
    let total = rows.last().unwrap();
    assert_eq!(&total[col("day")], "total");
    for k in Kind::ALL {
        let c = col(&format!("{k}_gpu_ms"));
        let days: i64 = rows[..31]
            .iter()
            .map(|r| r[c].parse::<i64>().unwrap())
            .sum();
        assert_eq!(days, total[c].parse::<i64>().unwrap(), "{k}");
    }
    assert_eq!(
        total[col("committed_gpu_ms")].parse::<i64>().unwrap(),
        3 * committed_per_day
    );
    assert_eq!(
        total[col("unreported_gpu_ms")].parse::<i64>().unwrap(),
        3 * committed_per_day
    );
    assert_eq!(&total[col("committed_cost")], "720.00", "288 GPU-h at 2.50");
    assert_eq!(&rows[24][col("day")], "2026-10-25");
    assert_eq!(&rows[24][col("minutes")], "1500", "the 25-hour day");
    assert_eq!(&rows[0][col("minutes_accounted")], "1440");
    assert_eq!(&rows[3][col("minutes_accounted")], "0");
    assert_eq!(&total[col("provisional")], "false");

    let json: serde_json::Value = serde_json::from_str(&ok(&statement(
        &config,
        &data,
        &["--period=2026-10", "--format=json"],
    )))
    .unwrap();
    assert_eq!(json["contract"], "lab");
    assert_eq!(json["starts_before_ledger"], false);
    assert_eq!(json["total"]["kinds"][0]["kind"], "committed");
    assert_eq!(json["total"]["kinds"][0]["gpu_ms"], 3 * committed_per_day);
    assert_eq!(json["total"]["minutes_accounted"], 3 * 1440);
    assert_eq!(json["days"].as_array().unwrap().len(), 31);

    // The sizing section is there, its lookbacks too short for a ledger of three days.
    assert_eq!(json["sizing"]["lookbacks"][0]["shown"], false);

    let focus = ok(&statement(
        &config,
        &data,
        &["--period=2026-10", "--format=focus"],
    ));
    assert_eq!(validate_focus(&focus).rows, 3 * 31);
    assert!(
        focus.contains(",2026-10-25,"),
        "the local day in x_LocalDate"
    );

    let text = ok(&statement(
        &config,
        &data,
        &["--period=2026-10", "--format=text"],
    ));
    assert!(
        text.contains("Statement of contract lab (lab), billing period 2026-10 (closed)"),
        "{text}"
    );
    assert!(text.contains("2026-10-25     25"), "{text}");
    assert!(text.contains("Cost (EUR): committed 720.00"), "{text}");
    // The default period is the current one (later than October 2026, not over), and the
    // default format where standard output is not a terminal (here a pipe) is CSV.
    let now = ok(&statement(&config, &data, &["--contract=lab"]));
    let mut r = csv::Reader::from_reader(now.as_bytes());
    let h = r.headers().unwrap().clone();
    let total = r
        .records()
        .map(Result::unwrap)
        .find(|rec| &rec[h.iter().position(|c| c == "day").unwrap()] == "total")
        .unwrap_or_else(|| panic!("a CSV with a total row: {now}"));
    let col = |name: &str| &total[h.iter().position(|c| c == name).unwrap()];
    assert!(col("period") > "2026-10", "{now}");
    assert_eq!(col("provisional"), "true", "{now}");
}

/// The delivery gaps the store holds for the period, as `--evidence` writes them: each gap
/// that overlaps the period once, its part within the period, an open one up to the first
/// minute not yet sealed; the same rows in CSV and JSON.
#[test]
fn the_evidence_is_the_periods_delivery_gaps_in_csv_and_json() {
    let dir = TempDir::new("statement-evidence");
    let (config, data) = ledger(&dir);
    const H: i64 = 3_600_000;
    let gap = |target: &str, gpu: &str, cause, start_ms, end_ms, xids: &[&str]| Gap {
        contract: 0,
        target: target.into(),
        gpu: gpu.into(),
        cause,
        start_ms,
        end_ms,
        short_gpu_ms: if cause == Cause::Short { 3 * H } else { 0 },
        xids: xids.iter().map(|x| x.to_string()).collect(),
    };
    let gaps = [
        // Across the period's start: 1 hour of its 2 in October.
        gap(
            "10.0.0.1:9473",
            "GPU-a",
            Cause::GpuLost,
            OCT_1_MS - H,
            Some(OCT_1_MS + H),
            &["79"],
        ),
        // Still open: up to the first minute not yet sealed (Oct 4, 00:00).
        gap(
            "10.0.0.1:9473",
            "",
            Cause::HostUnreachable,
            OCT_1_MS + 60 * H,
            None,
            &[],
        ),
        gap(
            "",
            "",
            Cause::Short,
            OCT_1_MS + 2 * H,
            Some(OCT_1_MS + 5 * H),
            &[],
        ),
        // Before the period: not evidence of it.
        gap(
            "10.0.0.1:9473",
            "GPU-b",
            Cause::GpuLost,
            OCT_1_MS - 5 * H,
            Some(OCT_1_MS - 4 * H),
            &[],
        ),
    ];
    let ids = vec!["lab".to_string()];
    let mut store = Store::open(&data).unwrap();
    let snap = store.load(&ids).unwrap().unwrap();
    store.commit_with_gaps(&ids, &[], &snap, &gaps).unwrap();
    drop(store);

    let (csv_file, json_file) = (dir.path("gaps.csv"), dir.path("gaps.json"));
    for file in [&csv_file, &json_file] {
        ok(&statement(
            &config,
            &data,
            &[
                "--period=2026-10",
                &format!("--evidence={}", file.display()),
            ],
        ));
    }
    let text = std::fs::read_to_string(&csv_file).unwrap();
    let mut r = csv::Reader::from_reader(text.as_bytes());
    let headers = r.headers().unwrap().clone();
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let rows: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
    let got: Vec<(&str, &str, &str, &str, &str)> = rows
        .iter()
        .map(|r| {
            (
                &r[col("cause")],
                &r[col("start")],
                &r[col("end")],
                &r[col("in_period_ms")],
                &r[col("xids")],
            )
        })
        .collect();
    let (h, open) = (H.to_string(), (12 * H).to_string());
    assert_eq!(
        got,
        [
            (
                "gpu_lost",
                "2026-09-30T21:00:00.000Z",
                "2026-09-30T23:00:00.000Z",
                h.as_str(),
                "79"
            ),
            (
                "short",
                "2026-10-01T00:00:00.000Z",
                "2026-10-01T03:00:00.000Z",
                &(3 * H).to_string(),
                ""
            ),
            (
                "host_unreachable",
                "2026-10-03T10:00:00.000Z",
                "",
                open.as_str(),
                ""
            ),
        ]
    );
    assert_eq!(&rows[1][col("short_gpu_ms")], (3 * H).to_string());
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_file).unwrap()).unwrap();
    let json = json.as_array().unwrap();
    assert_eq!(json.len(), rows.len());
    for (j, c) in json.iter().zip(&rows) {
        assert_eq!(j["cause"], c[col("cause")]);
        assert_eq!(j["start"], c[col("start")]);
        assert_eq!(
            j["in_period_ms"].as_i64().unwrap().to_string(),
            c[col("in_period_ms")]
        );
    }
    assert_eq!(json[0]["xids"], serde_json::json!(["79"]));
    assert!(json[2]["end"].is_null());

    // The statement's summary of the same gaps: per cause, the evidence rows' part within
    // the period summed (a short gap inside the period: its shortfall, whole), the longest
    // and the ones still running at its end.
    let doc: serde_json::Value = serde_json::from_str(&ok(&statement(
        &config,
        &data,
        &["--period=2026-10", "--format=json"],
    )))
    .unwrap();
    let causes = doc["delivery_gaps"]["causes"].as_array().unwrap();
    let summary: Vec<(&str, i64, i64, i64, bool)> = causes
        .iter()
        .map(|c| {
            (
                c["cause"].as_str().unwrap(),
                c["gaps"].as_i64().unwrap(),
                c["gpu_ms"].as_i64().unwrap(),
                c["open"].as_i64().unwrap(),
                c["prorated"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("gpu_lost", 1, H, 0, false),
            ("host_unreachable", 1, 12 * H, 1, false),
            ("short", 1, 3 * H, 0, false),
        ]
    );
    assert_eq!(causes[0]["xids"], serde_json::json!(["79"]));
    assert_eq!(causes[0]["longest"]["duration_ms"], 2 * H);
    assert_eq!(
        doc["delivery_gaps"]["until"], "2026-10-04T00:00:00+02:00",
        "open gaps run to the first minute not yet sealed"
    );
    let text = ok(&statement(
        &config,
        &data,
        &["--period=2026-10", "--format=text"],
    ));
    assert!(text.contains("Delivery gaps in the period"), "{text}");
}

#[test]
fn bad_input_is_one_line_naming_it_and_exit_status_1() {
    let dir = TempDir::new("statement-bad");
    let (config, data) = ledger(&dir);
    refused(
        &statement(&config, &data, &["--contract=nope"]),
        &["nope", "lab"],
    );
    for bad in ["2026-13", "october", "2026-1"] {
        refused(
            &statement(&config, &data, &[&format!("--period={bad}")]),
            &[bad],
        );
    }
    refused(
        &statement(&config, &data, &["--period=2099-01"]),
        &["2099-01", "future"],
    );
    let empty = dir.path("empty");
    std::fs::create_dir_all(&empty).unwrap();
    refused(
        &statement(&config, &empty, &[]),
        &[&empty.display().to_string(), "no ledger"],
    );
    let missing = dir.path("missing");
    refused(
        &statement(&config, &missing, &[]),
        &[&missing.display().to_string()],
    );
    assert!(
        !missing.exists(),
        "a missing ledger's directory is not created"
    );
    refused(
        &statement(&dir.path("nope.toml"), &data, &[]),
        &["nope.toml"],
    );
    refused(
        &statement(&config, &data, &["--evidence=gaps.txt"]),
        &["--evidence", "gaps.txt", ".csv"],
    );

    rusqlite::Connection::open(data.join("ledger.sqlite3"))
        .unwrap()
        .execute(
            "UPDATE meta SET value = 99 WHERE key = 'schema_version'",
            [],
        )
        .unwrap();
    refused(
        &statement(&config, &data, &["--period=2026-10"]),
        &["schema version 99", "ledger.sqlite3"],
    );
}

#[test]
fn a_running_demo_is_read_without_stopping_it() {
    let dir = TempDir::new("statement-demo");
    let data = dir.path("demo");
    let mut demo = Demo::start(&data, &["--speed=600"]);
    let addr = demo.addr.clone();
    let config = data.join("aggregator.toml");
    // Wait until minutes are sealed, then ask for a statement while it keeps sealing.
    wait_until(
        Duration::from_secs(60),
        || "sealed minutes".to_string(),
        || {
            let (_, body) = http_get(&addr, "/metrics");
            body.lines()
                .any(|l| {
                    l.starts_with("commitmeter_contract_committed_gpu_seconds_total{")
                        && !l.ends_with(" 0")
                })
                .then_some(())
        },
    );
    let started = Instant::now();
    let json = ok(&statement(&config, &data, &["--format=json"]));
    let took = started.elapsed();
    let docs: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(docs.len(), 3, "the demo's three contracts");
    let accounted: i64 = docs
        .iter()
        .map(|d| d["total"]["minutes_accounted"].as_i64().unwrap())
        .sum();
    assert!(accounted > 0, "{json}");
    for d in &docs {
        let sum: i64 = d["days"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["kinds"][0]["gpu_ms"].as_i64().unwrap())
            .sum();
        assert_eq!(sum, d["total"]["kinds"][0]["gpu_ms"].as_i64().unwrap());
    }
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert!(
        demo.child.try_wait().unwrap().is_none(),
        "the demo still runs"
    );
    let (status, _) = http_get(&addr, "/metrics");
    assert_eq!(status, 200);
    let leftovers: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("statement-") || n.starts_with("backup."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// The golden month: contract "golden" in Europe/Berlin, October 2026 (the 25-hour day on
/// Oct 25), 16 GPUs committed, 24 from Oct 15 (a ramp step mid-month); three hosts of 8 GPUs
/// read every 10 minutes through the pure ledger; all 24 GPUs busy on Oct 3–6 (overage while
/// 16 are committed), host h3 unreachable from Oct 17 10:00 to Oct 18 04:00 local (no reading
/// in between, each failed scrape told to the ledger; its GPUs unreported meanwhile; what it
/// reports on return is late), GPU h2-7 lost from Oct 20 on.
const GOLDEN: &str = r#"
[[targets]]
targets = ["h1:9473", "h2:9473", "h3:9473"]
labels = { provider = "gold" }

[[contracts]]
id = "golden"
provider = "gold"
price_per_gpu_hour = 2.0
currency = "EUR"
target_utilization = 0.9
timezone = "Europe/Berlin"
start = "2026-10-01"
selector = '{provider="gold"}'
ramp = [ { from = "2026-10-01", gpus = 16 }, { from = "2026-10-15", gpus = 24 } ]
on_demand_price_per_gpu_hour = 3.0
sla = { delivery_target = 0.995, credits = [ { below = 0.995, credit = 0.05 }, { below = 0.99, credit = 0.10 }, { below = 0.95, credit = 0.30 } ], claim_window_days = 30 }
"#;

fn golden_statement() -> (
    commitmeter::statement::Statement,
    Vec<(i64, commitmeter::ledger::Totals)>,
) {
    use commitmeter::ledger::{GpuCounters, Reading, Totals};
    use std::collections::BTreeMap;

    let contract = commitmeter::contract::parse(Path::new("golden.toml"), GOLDEN)
        .unwrap()
        .contracts
        .remove(0);
    let period = contract.billing_period_of_month(2026, 10).unwrap();
    assert_eq!(period.0, OCT_1_MS);
    let day = |d: i64| OCT_1_MS + (d - 1) * 86_400_000; // UTC+2 days until Oct 25
    let step = 600_000;
    let t0 = OCT_1_MS - step;
    let hosts = ["h1", "h2", "h3"];
    let mut ledger = Ledger::new(1, t0);
    let targets: Vec<(String, Vec<usize>)> = hosts
        .iter()
        .map(|h| (format!("{h}:9473"), vec![0]))
        .collect();
    ledger.configure(t0, &targets, |_, now| now);
    let mut counters: Vec<BTreeMap<String, GpuCounters>> = hosts
        .iter()
        .map(|h| {
            (0..8)
                .map(|g| {
                    let c = GpuCounters {
                        allocated_ms: Some(0),
                        allocated_used_ms: Some(0),
                        ..GpuCounters::default()
                    };
                    (format!("{h}-{g}"), c)
                })
                .collect()
        })
        .collect();
    let mut minutes: Vec<(i64, Totals)> = Vec::new();
    let end = period.1 + 2 * step;
    let mut t = t0;
    while t <= end {
        for (i, h) in hosts.iter().enumerate() {
            if t > t0 {
                // Busy share in percent: all busy Oct 3-6, else by host and hour of day.
                let hour = (t - t0) / 3_600_000 % 24;
                let pct = if (day(3)..day(7)).contains(&t) {
                    100
                } else {
                    [35, 60, 80][i] * (10 + hour % 6) / 15
                };
                for (uuid, c) in counters[i].iter_mut() {
                    let busy = step * pct.min(100) / 100;
                    c.observed_ms += step;
                    c.used_ms += busy;
                    // A job holds GPUs 0-2 of each host all along (idle while it holds
                    // them: allocated idle); the others only while busy.
                    let held_all = ["-0", "-1", "-2"].iter().any(|g| uuid.ends_with(g));
                    let allocated = if held_all { step } else { busy };
                    c.allocated_ms = c.allocated_ms.map(|a| a + allocated);
                    c.allocated_used_ms = c.allocated_used_ms.map(|a| a + busy);
                }
            }
            if *h == "h2" && t >= day(20) {
                counters[i].remove("h2-7");
            }
            if *h == "h3" && (day(17) + 10 * 3_600_000..day(18) + 4 * 3_600_000).contains(&t) {
                // Unreachable: no reading; the aggregator tells the ledger of the failed scrape.
                ledger.unreachable("h3:9473", 0);
                continue;
            }
            ledger.observe(
                &format!("{h}:9473"),
                0,
                Reading {
                    received_ms: t + 7,
                    agent_ms: Some(t),
                    agent_start_ms: Some(t0 - step),
                    sampled_ms: Some(t - t0 + step),
                    gpus: counters[i].clone(),
                    owners: Default::default(),
                },
            );
        }
        for s in ledger.seal(t, 5 * MINUTE_MS, |_, a, b| contract.committed_gpu_ms(a, b)) {
            minutes.push((s.minute, s.totals));
        }
        t += step;
    }
    // Nothing was written: every late GPU-ms is pending, by the minute it was for, and
    // they add up to the ledger's all-time late sums.
    let late = ledger.pending_late();
    let sum = late
        .iter()
        .fold((0, 0), |a, l| (a.0 + l.delivered, a.1 + l.used));
    assert_eq!(sum, ledger.late()[0]);
    let late: Vec<(i64, i64, i64)> = late
        .iter()
        .map(|l| (l.minute, l.delivered, l.used))
        .collect();
    let info = commitmeter::statement::LedgerInfo {
        since_minute: Some(ledger.since()),
        sealed_through_minute: Some(ledger.sealed_through()),
        late: commitmeter::statement::late_by_minute(&late),
    };
    let (gaps, _) = ledger.pending_gaps();
    let s = commitmeter::statement::build(
        &contract,
        period,
        &minutes,
        &gaps,
        &info,
        period.1 + 86_400_000,
    );
    let inside = minutes
        .into_iter()
        .filter(|(m, _)| (period.0..period.1).contains(&(m * MINUTE_MS)))
        .collect();
    (s, inside)
}

/// Compares with the checked-in file, or writes it with `UPDATE_GOLDEN=1`.
fn golden(name: &str, got: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, got).unwrap();
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
    assert!(
        want == got,
        "{} differs from the statement (UPDATE_GOLDEN=1 rewrites it after review); got:\n{got}",
        path.display()
    );
}

#[test]
fn the_golden_month_sums_exactly_and_renders_as_checked_in() {
    use commitmeter::ledger::Totals;
    use commitmeter::statement::render;

    let (s, minutes) = golden_statement();
    // Every minute of the period is sealed, once.
    assert_eq!(minutes.len() as i64, s.total.minutes());
    assert_eq!(s.total.minutes_accounted, s.total.minutes());
    let mut from_minutes = Totals::default();
    for (_, t) in &minutes {
        from_minutes.add(t);
    }
    let mut from_days = Totals::default();
    for d in &s.days {
        assert!(d.identity_holds(), "{}", d.label);
        assert_eq!(d.minutes_accounted, d.minutes(), "{}", d.label);
        from_days.add(&d.totals);
    }
    assert!(s.total.identity_holds());
    assert_eq!(s.total.totals, from_minutes);
    assert_eq!(s.total.totals, from_days);
    let by_day = |date: &str| s.days.iter().find(|d| d.label == date).unwrap();
    assert_eq!(by_day("2026-10-25").minutes(), 25 * 60);
    // What the story must show: overage while everything is busy under the lower step, the
    // ramp step, the unreachable host unreported, the lost GPU undelivered, late GPU-ms.
    assert!(by_day("2026-10-04").totals.overage > 0);
    assert_eq!(by_day("2026-10-14").totals.committed, 16 * 86_400_000);
    assert_eq!(by_day("2026-10-16").totals.committed, 24 * 86_400_000);
    assert!(by_day("2026-10-17").totals.unreported > 0);
    assert_eq!(by_day("2026-10-16").totals.unreported, 0);
    assert!(by_day("2026-10-21").totals.undelivered > 0);
    // The GPU vanished in the last interval before it was found missing, on Oct 19.
    assert_eq!(by_day("2026-10-19").totals.undelivered, 10 * MINUTE_MS);
    assert_eq!(by_day("2026-10-18").totals.undelivered, 0);
    // What host h3 reports on its return is late, for the minutes it was away (Oct 17-18).
    assert!(s.total.late.delivered_gpu_ms > 0);
    let late_days: Vec<&str> = s
        .days
        .iter()
        .filter(|d| d.late != Default::default())
        .map(|d| d.label.as_str())
        .collect();
    assert_eq!(late_days, ["2026-10-17", "2026-10-18"]);
    assert!(!s.provisional && !s.starts_before_ledger);
    // The idle split against the script: on Oct 16 all 24 GPUs are delivered and committed,
    // and GPUs 0-2 of each host are held all day: idle_allocated is their unbusy time, the
    // readings' intervals (t − 10 min, t] taken as the script accrued them.
    let (step, t0) = (600_000i64, OCT_1_MS - 600_000);
    let day16 = OCT_1_MS + 15 * 86_400_000;
    let mut held = 0;
    let mut t = day16 + step;
    while t <= day16 + 86_400_000 {
        let hour = (t - t0) / 3_600_000 % 24;
        for share in [35, 60, 80] {
            held += 3 * (step - step * (share * (10 + hour % 6) / 15) / 100);
        }
        t += step;
    }
    let oct16 = by_day("2026-10-16").totals;
    assert_eq!(oct16.idle_allocated, held);
    assert_eq!(oct16.idle_unallocated, oct16.idle - held);
    // While all GPUs are busy (Oct 4), nothing is idle either way.
    let oct4 = by_day("2026-10-04").totals;
    assert_eq!((oct4.idle_allocated, oct4.idle_unallocated), (0, 0));

    let csv = render::csv(&s).unwrap();
    golden("statement-golden-2026-10.csv", &csv);
    golden("statement-golden-2026-10.json", &render::json(&s));
    golden("statement-golden-2026-10.txt", &render::text(&s));
    // The SLA and sizing figures checked by hand against the month's story: committed
    // 16 GPUs × 14 days + 24 × 17 days + the extra hour of Oct 25 = 15,192 GPU-hours
    // (30,384.00 EUR); GPU h2-7 undelivered from the last 10 minutes of Oct 19 to the end
    // (289 h 10 min): share 0.980966, below 0.99, not below 0.95: the 10 % tier, 3,038.40.
    let sla = s.sections.sla.as_ref().unwrap();
    assert_eq!(sla.assessment.committed_gpu_ms, 15_192 * 3_600_000);
    assert_eq!(
        sla.assessment.committed_gpu_ms - sla.assessment.delivered_share.unwrap().num,
        (289 * 60 + 10) * MINUTE_MS
    );
    assert_eq!(sla.assessment.tier, Some(1));
    assert_eq!(sla.assessment.credit_micros, 3_038_400_000);
    assert_eq!(
        sla.claim_deadline.as_ref().unwrap().1,
        "2026-12-01T00:00:00+01:00[Europe/Berlin]"
    );
    // The delivery gaps, by hand from the script: h2-7 lost from the last reading that saw it
    // (Oct 19 23:50) and still lost at the end, inside the period 289 h 10 min (its
    // undelivered GPU-ms exactly), 15 min more to the last sealed minute; h3's 8 GPUs from
    // its last reading before the outage (Oct 17 09:50) to its first after (Oct 18 04:00),
    // 18 h 10 min each (2 GPU-hours more than their unreported: the last 15 minutes were not
    // sealed yet when h3 returned, and its counters delivered them); never short.
    use commitmeter::ledger::Cause;
    let gaps = s.sections.gaps.as_ref().unwrap();
    let cause = |c: Cause| gaps.causes.iter().find(|x| x.cause == c).unwrap();
    let lost = cause(Cause::GpuLost);
    assert_eq!((lost.gaps, lost.open), (1, 1));
    assert_eq!(lost.gpu_ms, s.total.totals.undelivered);
    assert_eq!(lost.gpu_ms, (289 * 60 + 10) * MINUTE_MS);
    let longest = lost.longest.as_ref().unwrap();
    assert_eq!(
        (longest.gpu.as_str(), longest.start_ms, longest.end_ms),
        ("h2-7", OCT_1_MS + 19 * 86_400_000 - 10 * MINUTE_MS, None)
    );
    assert_eq!(longest.duration_ms, (289 * 60 + 25) * MINUTE_MS);
    let dark = cause(Cause::HostUnreachable);
    assert_eq!((dark.gaps, dark.open), (8, 0));
    assert_eq!(dark.gpu_ms, 8 * (18 * 60 + 10) * MINUTE_MS);
    assert_eq!(dark.gpu_ms - s.total.totals.unreported, 8 * 15 * MINUTE_MS);
    let longest = dark.longest.as_ref().unwrap();
    assert_eq!(
        (longest.start_ms, longest.end_ms),
        (
            OCT_1_MS + 16 * 86_400_000 + (9 * 60 + 50) * MINUTE_MS,
            Some(OCT_1_MS + 17 * 86_400_000 + 4 * 3_600_000)
        )
    );
    let short = cause(Cause::Short);
    assert_eq!((short.gaps, short.gpu_ms), (0, 0));
    // The charges: the commitment (30,384.00), the overage of Oct 3-6 (8 GPUs beyond the 16
    // committed for 96 hours: 768 GPU-hours at the on-demand 3.00 = 2,304.00), less the
    // credit of the closed period (3,038.40).
    let ch = &s.charges;
    assert_eq!(ch.overage_gpu_ms, 768 * 3_600_000);
    assert_eq!(
        (ch.committed_micros, ch.overage_micros, ch.credit_micros),
        (30_384_000_000, 2_304_000_000, Some(3_038_400_000))
    );
    assert_eq!(ch.due_micros, 29_649_600_000);
    // The last week: 23 GPUs at six levels (8.88 .. 13.4 GPUs) in equal shares; at 2.00
    // committed against 3.00 on demand the cheapest commitment is 10 GPUs: 3,360.00 + the
    // use beyond 10 (1.34667 GPUs on average × 168 h × 3.00 = 678.72) = 4,038.72.
    let sizing = s.sections.sizing.as_ref().unwrap();
    let week = sizing.lookbacks[0].1.as_ref().unwrap();
    assert_eq!(week.distribution.max, 804_000);
    assert_eq!(week.distribution.p50, 643_200);
    let rec = week.recommendation.unwrap();
    assert_eq!((rec.gpus, rec.cost_micros), (10, 4_038_720_000));
    assert_eq!(rec.current_cost_micros, 24 * 2 * 168 * 1_000_000);
    // The ledger holds 31 days: no 60-day lookback.
    assert!(sizing.lookbacks[1].1.is_some() && sizing.lookbacks[2].1.is_none());
    // The CSV read back: each kind's column of days sums to the total row.
    let mut r = csv::Reader::from_reader(csv.as_bytes());
    let headers = r.headers().unwrap().clone();
    let rows: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
    for k in Kind::ALL {
        let c = headers
            .iter()
            .position(|h| h == format!("{k}_gpu_ms"))
            .unwrap();
        let days: i64 = rows[..rows.len() - 1]
            .iter()
            .map(|r| r[c].parse::<i64>().unwrap())
            .sum();
        assert_eq!(days, rows[rows.len() - 1][c].parse::<i64>().unwrap(), "{k}");
        assert_eq!(days, s.total.totals[k], "{k}");
    }
}

/// Checks FOCUS CSV against the FOCUS 1.2 rules of the columns it uses (read back with the csv
/// crate): column names (PascalCase FOCUS IDs, custom ones `x_`-prefixed and after them), types
/// (Decimal in numeric format, Date/Time as UTC `YYYY-MM-DDTHH:mm:ssZ`), allowed values,
/// nullability and the required-when rules between columns, and the commitment's cost rules:
/// per commitment, the usage rows' EffectiveCost sums to the purchases' BilledCost, and per
/// charge period Used + Unused quantities are the purchased quantity; the `Credit` row (costs
/// equal to what it bills, no quantity or unit prices) and usage outside the commitment (no
/// `CommitmentDiscount*` columns, billed as used).
fn validate_focus(text: &str) -> FocusCheck {
    use std::collections::BTreeMap;
    let mut r = csv::Reader::from_reader(text.as_bytes());
    let headers: Vec<String> = r.headers().unwrap().iter().map(String::from).collect();
    let mut custom = false;
    for h in &headers {
        if h.starts_with("x_") {
            custom = true;
        } else {
            assert!(!custom, "{h}: a FOCUS column after a custom one");
            assert!(
                h.chars().next().unwrap().is_ascii_uppercase()
                    && h.chars().all(|c| c.is_ascii_alphanumeric())
                    && h.len() <= 50,
                "{h}: not a FOCUS column ID"
            );
        }
    }
    let decimal = |v: &str| {
        let v = v.strip_prefix('-').unwrap_or(v);
        let (i, f) = v.split_once('.').unwrap_or((v, "0"));
        !i.is_empty()
            && !f.is_empty()
            && i.bytes().all(|b| b.is_ascii_digit())
            && f.bytes().all(|b| b.is_ascii_digit())
    };
    let datetime = |v: &str| {
        let b = v.as_bytes();
        b.len() == 20
            && b.iter().enumerate().all(|(i, c)| match i {
                4 | 7 => *c == b'-',
                10 => *c == b'T',
                13 | 16 => *c == b':',
                19 => *c == b'Z',
                _ => c.is_ascii_digit(),
            })
    };
    // Column ID: (nullable, type check, allowed values).
    type Check = fn(&str) -> bool;
    let any: Check = |_| true;
    let rules: Vec<(&str, bool, Option<Check>, &[&str])> = vec![
        ("BilledCost", false, None, &[]),
        (
            "BillingCurrency",
            false,
            Some(|v: &str| v.len() == 3 && v.bytes().all(|b| b.is_ascii_uppercase())),
            &[],
        ),
        ("BillingPeriodEnd", false, Some(any), &[]),
        ("BillingPeriodStart", false, Some(any), &[]),
        (
            "ChargeCategory",
            false,
            Some(any),
            &["Usage", "Purchase", "Tax", "Credit", "Adjustment"],
        ),
        ("ChargeClass", true, Some(any), &["Correction"]),
        ("ChargeDescription", true, Some(any), &[]),
        (
            "ChargeFrequency",
            false,
            Some(any),
            &["One-Time", "Recurring", "Usage-Based"],
        ),
        ("ChargePeriodEnd", false, Some(any), &[]),
        ("ChargePeriodStart", false, Some(any), &[]),
        (
            "CommitmentDiscountCategory",
            true,
            Some(any),
            &["Spend", "Usage"],
        ),
        ("CommitmentDiscountId", true, Some(any), &[]),
        ("CommitmentDiscountName", true, Some(any), &[]),
        ("CommitmentDiscountQuantity", true, None, &[]),
        (
            "CommitmentDiscountStatus",
            true,
            Some(any),
            &["Used", "Unused"],
        ),
        ("CommitmentDiscountType", true, Some(any), &[]),
        ("CommitmentDiscountUnit", true, Some(any), &[]),
        ("ContractedCost", false, None, &[]),
        ("ContractedUnitPrice", true, None, &[]),
        ("EffectiveCost", false, None, &[]),
        ("ListCost", false, None, &[]),
        ("ListUnitPrice", true, None, &[]),
        ("PricingQuantity", true, None, &[]),
        ("PricingUnit", true, Some(any), &[]),
        ("ProviderName", false, Some(any), &[]),
    ];
    for (c, ..) in &rules {
        assert!(headers.iter().any(|h| h == c), "{c} missing");
    }
    let micros = |v: &str| -> i128 {
        let (i, f) = v.trim_start_matches('-').split_once('.').unwrap();
        assert_eq!(f.len(), 6, "{v}: 6 decimals");
        let m = i.parse::<i128>().unwrap() * 1_000_000 + f.parse::<i128>().unwrap();
        if v.starts_with('-') {
            -m
        } else {
            m
        }
    };
    let nanohours = |v: &str| -> i128 {
        let (i, f) = v.split_once('.').unwrap();
        assert_eq!(f.len(), 9, "{v}: 9 decimals");
        i.parse::<i128>().unwrap() * 1_000_000_000 + f.parse::<i128>().unwrap()
    };
    let mut usage_effective: BTreeMap<String, i128> = BTreeMap::new();
    let mut purchase_billed: BTreeMap<String, i128> = BTreeMap::new();
    let mut per_period: BTreeMap<(String, String), [i128; 3]> = BTreeMap::new();
    let (mut effective_total, mut billed_total) = (0i128, 0i128);
    let mut n = 0;
    for rec in r.records() {
        let rec = rec.unwrap();
        let get = |c: &str| &rec[headers.iter().position(|h| h == c).unwrap()];
        for (c, nullable, check, allowed) in &rules {
            let v = get(c);
            if v.is_empty() {
                assert!(nullable, "{c} is null");
                continue;
            }
            match check {
                None => assert!(decimal(v), "{c}: {v:?} is not a decimal"),
                Some(f) => assert!(f(v), "{c}: {v:?}"),
            }
            if c.ends_with("PeriodStart") || c.ends_with("PeriodEnd") {
                assert!(datetime(v), "{c}: {v:?} is not UTC ISO 8601");
            }
            assert!(allowed.is_empty() || allowed.contains(&v), "{c}: {v:?}");
        }
        assert!(get("ChargePeriodStart") < get("ChargePeriodEnd"));
        assert!(get("BillingPeriodStart") <= get("ChargePeriodStart"));
        assert!(get("ChargePeriodEnd") <= get("BillingPeriodEnd"));
        let (category, id) = (get("ChargeCategory"), get("CommitmentDiscountId"));
        let on_commitment = !id.is_empty();
        for c in [
            "CommitmentDiscountStatus",
            "CommitmentDiscountCategory",
            "CommitmentDiscountType",
            "CommitmentDiscountName",
        ] {
            if !on_commitment {
                assert!(get(c).is_empty(), "{c} without CommitmentDiscountId");
            }
        }
        if on_commitment {
            assert!(!get("CommitmentDiscountType").is_empty());
            assert!(!get("CommitmentDiscountCategory").is_empty());
            if category == "Usage" {
                assert!(!get("CommitmentDiscountStatus").is_empty());
            }
        }
        let usage_or_purchase = category == "Usage" || category == "Purchase";
        let correction = get("ChargeClass") == "Correction";
        assert_eq!(
            !get("CommitmentDiscountQuantity").is_empty(),
            usage_or_purchase && on_commitment && !correction,
            "CommitmentDiscountQuantity"
        );
        assert_eq!(
            get("CommitmentDiscountUnit").is_empty(),
            get("CommitmentDiscountQuantity").is_empty()
        );
        if usage_or_purchase && !correction {
            for c in ["PricingQuantity", "ContractedUnitPrice", "ListUnitPrice"] {
                assert!(!get(c).is_empty(), "{c} is null on a {category} row");
            }
        }
        // No corrections are written: a credit of the period is not one (FOCUS: ChargeClass
        // is null for a charge within the current billing period).
        assert!(!correction);
        if category == "Credit" {
            // A charge unrelated to other charges: EffectiveCost matches BilledCost, and so
            // do ListCost and ContractedCost where their unit prices are null. A credit is
            // granted: negative.
            assert!(micros(get("BilledCost")) < 0, "a credit bills less");
            assert_eq!(get("EffectiveCost"), get("BilledCost"));
            assert!(get("CommitmentDiscountStatus").is_empty());
        }
        for (unit, cost) in [
            ("ContractedUnitPrice", "ContractedCost"),
            ("ListUnitPrice", "ListCost"),
        ] {
            if get(unit).is_empty() {
                assert_eq!(get(cost), get("BilledCost"), "{cost} without {unit}");
            }
        }
        if category == "Usage" && !on_commitment {
            // Usage outside the commitment (overage) is billed as it is used: nothing
            // amortized, nothing covered.
            assert_eq!(get("EffectiveCost"), get("BilledCost"));
            assert!(micros(get("BilledCost")) >= 0);
        }
        effective_total += micros(get("EffectiveCost"));
        billed_total += micros(get("BilledCost"));
        assert_eq!(
            get("PricingUnit").is_empty(),
            get("PricingQuantity").is_empty()
        );
        if category == "Purchase" {
            assert_ne!(get("ChargeFrequency"), "Usage-Based");
            // A purchase covering the period's usage: its effective cost is in the usage rows.
            assert_eq!(micros(get("EffectiveCost")), 0);
        }
        // Quantity × unit price matches the cost (to the rounding of both to their decimals).
        for (unit, cost) in [
            ("ContractedUnitPrice", "ContractedCost"),
            ("ListUnitPrice", "ListCost"),
        ] {
            if get("PricingQuantity").is_empty() || get(unit).is_empty() {
                continue;
            }
            let q = nanohours(get("PricingQuantity"));
            let want = q * micros(get(unit));
            let got = micros(get(cost)) * 1_000_000_000;
            assert!(
                (want - got).abs() <= 1_000_000_000 + micros(get(unit)),
                "{cost}"
            );
        }
        if on_commitment && usage_or_purchase {
            let slot = per_period
                .entry((id.to_string(), get("ChargePeriodStart").to_string()))
                .or_default();
            let cq = nanohours(get("CommitmentDiscountQuantity"));
            match (category, get("CommitmentDiscountStatus")) {
                ("Purchase", _) => {
                    *purchase_billed.entry(id.to_string()).or_default() +=
                        micros(get("BilledCost"));
                    slot[0] += cq;
                }
                ("Usage", s) => {
                    *usage_effective.entry(id.to_string()).or_default() +=
                        micros(get("EffectiveCost"));
                    slot[if s == "Used" { 1 } else { 2 }] += cq;
                }
                _ => {}
            }
        }
        n += 1;
    }
    assert_eq!(
        usage_effective, purchase_billed,
        "usage EffectiveCost = purchase BilledCost"
    );
    for (k, [bought, used, unused]) in per_period {
        // Each is rounded to 9 decimals on its own: at most a nanohour apart.
        assert!((bought - used - unused).abs() <= 1, "{k:?}");
    }
    // Amortized or billed, the rows cost the same in all.
    assert_eq!(effective_total, billed_total);
    FocusCheck {
        rows: n,
        effective_micros: effective_total,
    }
}

/// What [`validate_focus`] read: the rows, and their EffectiveCost summed in micro-units.
struct FocusCheck {
    rows: usize,
    effective_micros: i128,
}

#[test]
fn the_golden_month_as_focus_follows_the_spec_and_is_as_checked_in() {
    use commitmeter::ledger::Kind;
    use commitmeter::statement::focus;

    let (s, _) = golden_statement();
    let out = focus::csv(std::slice::from_ref(&s)).unwrap();
    golden("statement-golden-2026-10.focus.csv", &out);
    let check = validate_focus(&out);
    // Three rows a day, an overage row on each day with overage (Oct 2-6: the readings that
    // show everything busy cover the 10 minutes before each, so the busy spell starts on the
    // last 10 minutes of Oct 2), one credit row.
    let overage_days = s.days.iter().filter(|d| d.totals.overage > 0).count();
    assert_eq!(overage_days, 5);
    assert_eq!(check.rows, 3 * s.days.len() + overage_days + 1);
    // The rows' EffectiveCost is the statement's cost (commitment and overage) less the SLA
    // credit, to the micro-unit.
    let credit = s.charges.credit_micros.unwrap();
    assert_eq!(check.effective_micros, s.charges.total_micros - credit);
    assert_eq!(check.effective_micros, 29_649_600_000);
    // Each x_ kind column sums (over rows) to the statement's total, to the nanohour.
    let mut r = csv::Reader::from_reader(out.as_bytes());
    let headers = r.headers().unwrap().clone();
    let rows: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
    for k in Kind::ALL {
        let pascal: String = k
            .name()
            .split('_')
            .map(|w| w[..1].to_uppercase() + &w[1..])
            .collect();
        let name = format!("x_{pascal}GPUHours");
        let c = headers.iter().position(|h| h == name).unwrap();
        let sum: f64 = rows
            .iter()
            .filter(|r| !r[c].is_empty())
            .map(|r| r[c].parse::<f64>().unwrap())
            .sum();
        let want = s.total.totals[k] as f64 / 3_600_000.0;
        assert!((sum - want).abs() < 1e-6, "{k}: {sum} against {want}");
    }
    // The 25-hour day runs 2026-10-24T22:00:00Z to 2026-10-25T23:00:00Z.
    assert!(out.contains("2026-10-25T23:00:00Z,2026-10-24T22:00:00Z,Usage,"));
}

/// Milliseconds since the epoch of an RFC 3339 time as the evidence writes it.
fn unix_ms(rfc3339: &str) -> i64 {
    rfc3339
        .parse::<jiff::Timestamp>()
        .unwrap_or_else(|e| panic!("{rfc3339:?}: {e}"))
        .as_millisecond()
}

/// The evidence of a fake-NVML fleet run through the real agents and aggregator is its
/// scripted outages: a GPU lost at a scripted time (`gpu_lost`, open, from the last reading
/// that saw it) and a host stopped and resumed (`host_unreachable`, from its last reading
/// before the stop to its first after the resume, with the XID its GPU raised meanwhile),
/// each within a scrape interval of the script, read from the running aggregator; and the
/// same after the aggregator is killed (`kill -9`) mid-outage and restarted.
#[test]
fn the_evidence_of_a_real_fleet_is_its_scripted_outages() {
    const LOST_AT_MS: u64 = 15_000;
    // Host b is stopped from 2 s after the loss for 6 s, and raises XID 79 while stopped.
    const STOP_AT_MS: u64 = LOST_AT_MS + 2_000;
    const XID_AT_MS: u64 = STOP_AT_MS + 3_000;
    let a = Agent::start(
        &Scenario {
            gpus: vec![
                Gpu::at_util(50),
                Gpu {
                    lost_at_ms: Some(LOST_AT_MS),
                    ..Gpu::at_util(50)
                },
            ],
            ..Scenario::default()
        },
        AgentOpts::default(),
    );
    let b = Agent::start(
        &Scenario {
            gpus: vec![Gpu {
                xids: vec![[XID_AT_MS, 79]],
                ..Gpu::at_util(50)
            }],
            ..Scenario::default()
        },
        AgentOpts::default(),
    );
    for agent in [&a, &b] {
        agent.wait_ready(Duration::from_secs(20));
    }
    let lost_ms = (a.sc.start_unix_ms.unwrap() + LOST_AT_MS) as i64;
    let lost_uuid = a.sc.uuid(1);
    let dir = TempDir::new("statement-fleet");
    let config = dir.path("aggregator.toml");
    std::fs::write(
        &config,
        format!(
            "[aggregator]\nscrape_interval = \"1s\"\nscrape_timeout = \"1s\"\ngrace = \"2s\"\n\n\
             [[targets]]\ntargets = [\"{}\", \"{}\"]\nlabels = {{ provider = \"p\" }}\n\n{}",
            a.addr,
            b.addr,
            contract_toml("lab", "{provider=\"p\"}", 3)
        ),
    )
    .unwrap();
    let data = dir.path("data");
    let agg = Aggregator::start(&config, &data);
    agg.wait_ready(Duration::from_secs(20));
    let gpus = |m: &Metrics| m.get("commitmeter_target_gpus", &[("target", &a.addr)]);
    assert_eq!(
        gpus(&agg.metrics()),
        Some(2.0),
        "the GPU is seen before it is lost"
    );

    // Host b stopped (SIGSTOP: its port stays its own) for 6 s, after the GPU is lost.
    let stop_at = (b.sc.start_unix_ms.unwrap() + STOP_AT_MS) as i64;
    agg.wait(Duration::from_secs(30), "the time to stop host b", || {
        now_ms() >= stop_at
    });
    let stopped_ms = now_ms();
    signal(b.child.id(), "-STOP");
    std::thread::sleep(Duration::from_secs(6));
    let resumed_ms = now_ms();
    signal(b.child.id(), "-CONT");

    let evidence = dir.path("evidence.csv");
    let mut rows: Vec<csv::StringRecord> = Vec::new();
    let mut headers = csv::StringRecord::new();
    let read = || -> (csv::StringRecord, Vec<csv::StringRecord>) {
        ok(&statement(
            &config,
            &data,
            &[
                &format!("--evidence={}", evidence.display()),
                "--timeout=20s",
            ],
        ));
        let text = std::fs::read_to_string(&evidence).unwrap();
        let mut r = csv::Reader::from_reader(text.as_bytes());
        let headers = r.headers().unwrap().clone();
        (headers, r.records().map(Result::unwrap).collect())
    };
    // When the test first read the gap closed: its end, a reading the aggregator committed
    // before that read, cannot be later.
    let mut seen_closed_ms = 0;
    agg.wait(Duration::from_secs(30), "the host's gap to close", || {
        (headers, rows) = read();
        seen_closed_ms = now_ms();
        let (cause, end) = (pos(&headers, "cause"), pos(&headers, "end"));
        rows.iter()
            .any(|r| &r[cause] == "host_unreachable" && !r[end].is_empty())
    });
    let col = |name: &str| pos(&headers, name);
    let of = |cause: &str| -> Vec<&csv::StringRecord> {
        rows.iter().filter(|r| &r[col("cause")] == cause).collect()
    };
    let table = || format!("{rows:?}\nlog:\n{}", agg.log_text());
    // Readings are at most a scrape interval (1 s) and an agent round (0.5 s) apart.
    let within = 1_500 + 500;

    let lost = of("gpu_lost");
    assert_eq!(lost.len(), 1, "{}", table());
    let g = lost[0];
    assert_eq!(
        (&g[col("target")], &g[col("gpu")]),
        (a.addr.as_str(), lost_uuid.as_str())
    );
    let start = unix_ms(&g[col("start")]);
    assert!(
        (lost_ms - within..=lost_ms).contains(&start),
        "gpu_lost starts at {start}, lost at {lost_ms}: {}",
        table()
    );
    assert!(
        g[col("end")].is_empty(),
        "the GPU never returns: {}",
        table()
    );
    assert_eq!(&g[col("xids")], "", "{}", table());

    let down = of("host_unreachable");
    assert_eq!(down.len(), 1, "{}", table());
    let h = down[0];
    assert_eq!(&h[col("target")], b.addr.as_str());
    assert_eq!(&h[col("gpu")], b.sc.uuid(0).as_str());
    let (start, end) = (unix_ms(&h[col("start")]), unix_ms(&h[col("end")]));
    assert!(
        (stopped_ms - within..=stopped_ms).contains(&start),
        "host_unreachable starts at {start}, stopped at {stopped_ms}: {}",
        table()
    );
    // It ends at the first reading after the resume: within a scrape interval, an agent
    // round and a scrape that was hung on the stopped host (timeout 1 s) on an idle machine;
    // a loaded one delays the rounds, so the upper bound here is when the test saw it closed
    // (the pure gap tests hold the ends to one scrape interval with scripted timing). A scrape
    // that lands between SIGCONT and the agent's next round reads the round the agent made
    // just before it was stopped: the readings then bound the gap at that round (the agent's
    // next reading covers the stopped seconds with its counters), so the end is no earlier
    // than an agent round (0.5 s) before the stop.
    assert!(
        (stopped_ms - 500..=seen_closed_ms.max(resumed_ms + within + 1_000)).contains(&end),
        "host_unreachable ends at {end}, resumed at {resumed_ms}, seen closed at {seen_closed_ms}: {}",
        table()
    );
    assert_eq!(
        h[col("duration_ms")].parse::<i64>().unwrap(),
        end - start,
        "{}",
        table()
    );
    assert_eq!(&h[col("xids")], "79", "{}", table());
    assert!(
        of("short").is_empty(),
        "no capacity short of 3 GPUs: {}",
        table()
    );

    // The running aggregator's statement summarizes the same gaps (its route builds the
    // statement as the CLI does, from the gaps it has committed).
    let cli: serde_json::Value = serde_json::from_str(&ok(&statement(
        &config,
        &data,
        &["--format=json", "--timeout=20s"],
    )))
    .unwrap();
    let period = cli["period"].as_str().unwrap();
    let (status, body) = http_get(&agg.addr, &format!("/statements/lab/{period}.json"));
    assert_eq!(status, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    // At least the scripted gaps (a loaded machine may add a spurious outage later): the
    // lost GPU's, still open, and the host's, closed, with its XID and its whole duration.
    for (doc, what) in [(&doc, body.as_str()), (&cli, "the CLI's")] {
        let cause = |name: &str| -> &serde_json::Value {
            doc["delivery_gaps"]["causes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["cause"] == name)
                .unwrap()
        };
        let count = |v: &serde_json::Value, k: &str| v[k].as_i64().unwrap();
        let lost = cause("gpu_lost");
        assert!(
            count(lost, "gaps") >= 1 && count(lost, "open") >= 1,
            "{what}"
        );
        let down = cause("host_unreachable");
        assert!(count(down, "gaps") >= 1, "{what}");
        assert!(
            down["xids"].as_array().unwrap().contains(&"79".into()),
            "{what}"
        );
        assert!(count(down, "gpu_ms") >= end - start, "{what}");
    }

    // kill -9 while the GPU is still lost, and a restart on the same ledger: the hosts
    // re-baseline (hourly checkpoints) and the open gap comes back. The GPU's first reading
    // after the restart ends it; the next, still short, reopens it: one row still, from the
    // same start, open.
    let lost_start = g[col("start")].to_string();
    let host_gap: Vec<String> = h.iter().map(str::to_string).collect();
    agg.kill9();
    let agg = Aggregator::start(&config, &data);
    agg.wait_ready(Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(3));
    let mut rows: Vec<csv::StringRecord> = Vec::new();
    agg.wait(
        Duration::from_secs(20),
        "the lost GPU's one gap, open",
        || {
            rows = read().1;
            let lost: Vec<_> = rows
                .iter()
                .filter(|r| &r[col("cause")] == "gpu_lost")
                .collect();
            lost.len() == 1 && lost[0][col("end")].is_empty()
        },
    );
    let table = || format!("{rows:?}\nlog:\n{}", agg.log_text());
    let lost: Vec<_> = rows
        .iter()
        .filter(|r| &r[col("cause")] == "gpu_lost")
        .collect();
    assert_eq!(&lost[0][col("start")], lost_start.as_str(), "{}", table());
    // The host's gap as stored before the kill (a loaded machine may add a spurious outage
    // later, never change this one), no two gaps of a GPU overlapping, nothing short.
    assert!(
        rows.iter()
            .any(|r| r.iter().map(str::to_string).collect::<Vec<_>>() == host_gap),
        "{}",
        table()
    );
    let span = |r: &csv::StringRecord| {
        let end = &r[col("end")];
        (
            unix_ms(&r[col("start")]),
            if end.is_empty() {
                i64::MAX
            } else {
                unix_ms(end)
            },
        )
    };
    for (i, x) in rows.iter().enumerate() {
        for y in &rows[i + 1..] {
            let (a, b) = (span(x), span(y));
            let same = x[col("target")] == y[col("target")] && x[col("gpu")] == y[col("gpu")];
            assert!(!same || a.1 <= b.0 || b.1 <= a.0, "overlap: {}", table());
        }
    }
    assert!(
        rows.iter().all(|r| &r[col("cause")] != "short"),
        "{}",
        table()
    );
}

/// The index of column `name`.
fn pos(headers: &csv::StringRecord, name: &str) -> usize {
    headers.iter().position(|h| h == name).unwrap()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// [`CONFIG`] for a running aggregator that scrapes every second and seals two seconds
/// after a minute ends: its one target is unreachable, so every minute of contract "lab" is
/// unreported.
fn live_config(dir: &TempDir) -> PathBuf {
    let config = dir.path("aggregator.toml");
    std::fs::write(
        &config,
        format!(
            "[aggregator]\nscrape_interval = \"1s\"\nscrape_timeout = \"1s\"\ngrace = \"2s\"\n{}",
            // A refused connection, not one that waits out the scrape timeout every round.
            CONFIG.replace("10.0.0.1:9473", "127.0.0.1:1")
        ),
    )
    .unwrap();
    config
}

/// The periods the status page links statements for, newest first.
fn linked_periods(page: &str) -> Vec<String> {
    page.split("data-period=")
        .skip(1)
        .map(|rest| rest.chars().take_while(|c| *c != '>').collect())
        .collect()
}

#[test]
fn the_aggregator_serves_the_statement_the_cli_writes() {
    let dir = TempDir::new("statement-http");
    let config = live_config(&dir);
    let data = dir.path("data");
    let mut agg = Aggregator::start(&config, &data);
    agg.wait_ready(Duration::from_secs(30));
    // The page links the current period first; a new ledger has no earlier one.
    let (status, page) = http_get(&agg.addr, "/");
    assert_eq!(status, 200);
    let periods = linked_periods(&page);
    assert_eq!(periods.len(), 1, "{periods:?}");
    let current = &periods[0];
    assert!(
        page.contains(&format!("href=\"/statements/lab/{current}.csv\""))
            && page.contains(&format!("href=\"/statements/lab/{current}.json\"")),
        "{page}"
    );
    // Before any minute is sealed: served (and kept for the next requests of the same
    // ledger write and minute, which get the same body).
    let early = http_get(&agg.addr, &format!("/statements/lab/{current}.json"));
    assert_eq!(early.0, 200, "{}", early.1);
    let early: serde_json::Value = serde_json::from_str(&early.1).unwrap();
    assert_eq!(early["total"]["minutes_accounted"], 0, "{early}");
    // Just after a minute is sealed, nothing more is due for a minute: the statement served
    // now and the CLI's after the stop are of the same sealed minutes.
    // The ledger starts at the next whole minute, which seals 2 s after it ends: up to 2 min.
    wait_sealed_span(&agg.addr, Duration::from_secs(180), Duration::from_secs(60));
    let csv = http_get(&agg.addr, &format!("/statements/lab/{current}.csv"));
    let focus = http_get(&agg.addr, &format!("/statements/lab/{current}.focus.csv"));
    let json = http_get(&agg.addr, &format!("/statements/lab/{current}.json"));
    let (_, page_after) = http_get(&agg.addr, "/");
    assert!(terminate(&mut agg.child, Duration::from_secs(20)).success());
    assert_eq!(csv.0, 200, "{}", csv.1);
    assert_eq!(focus.0, 200, "{}", focus.1);
    assert_eq!(json.0, 200, "{}", json.1);
    let cli = |format: &str| {
        ok(&statement(
            &config,
            &data,
            &["--contract=lab", &format!("--period={current}"), format],
        ))
    };
    assert_eq!(csv.1, cli("--format=csv"));
    assert_eq!(focus.1, cli("--format=focus"));
    let doc: serde_json::Value = serde_json::from_str(&json.1).unwrap();
    let accounted = doc["total"]["minutes_accounted"].as_i64().unwrap();
    assert!(
        accounted >= 1,
        "a statement built once the minutes were written, not the one kept from before: {}",
        json.1
    );
    let cli_doc: serde_json::Value = serde_json::from_str(&cli("--format=json")).unwrap();
    assert_eq!(doc["total"], cli_doc["total"]);
    assert_eq!(doc["days"], cli_doc["days"]);
    // The same builder: the charges and the delivery gaps summary beside the SLA.
    assert!(doc["delivery_gaps"]["causes"].is_array(), "{}", json.1);
    assert_eq!(
        doc["delivery_gaps"]["causes"],
        cli_doc["delivery_gaps"]["causes"]
    );
    assert_eq!(doc["charges"], cli_doc["charges"]);
    // A ledger minutes old: the sizing was computed at the start, and no lookback is shown.
    assert!(
        page_after.contains("data-k=sizing ") && !page_after.contains("data-sizing-days"),
        "{page_after}"
    );
    assert!(page_after.contains("Not shown: 7 days, 30 days, 60 days"));
}

/// The value in `data-v` of the cell `data-k=KEY` of a status page's sizing row.
fn sizing_value(row: &str, key: &str) -> i64 {
    let needle = format!("data-k={key} data-v=");
    let at = row
        .find(&needle)
        .unwrap_or_else(|| panic!("no {key} in {row}"))
        + needle.len();
    let end = at + row[at..].find('>').unwrap();
    row[at..end].parse().unwrap()
}

#[test]
fn the_status_page_shows_the_statements_renewal_sizing() {
    let dir = TempDir::new("statement-sizing-page");
    // 45 days of minutes sealed up to the minute before this one: the 7- and 30-day
    // lookbacks have their minutes, the 60-day one has 75 % of them (not shown).
    let end = now_ms().div_euclid(MINUTE_MS) - 1;
    let first = end - 45 * 1440;
    let start = jiff::Timestamp::from_millisecond((first - 100 * 1440) * MINUTE_MS).unwrap();
    let config = dir.path("aggregator.toml");
    std::fs::write(
        &config,
        format!(
            "[aggregator]\nscrape_interval = \"1s\"\nscrape_timeout = \"1s\"\ngrace = \"2s\"\n\
             [[targets]]\ntargets = [\"127.0.0.1:1\"]\nlabels = {{ provider = \"lab\" }}\n\
             [[contracts]]\nid = \"size\"\nprovider = \"lab\"\nprice_per_gpu_hour = 2.5\n\
             on_demand_price_per_gpu_hour = 6.0\ncurrency = \"EUR\"\ntimezone = \"UTC\"\n\
             start = \"{}\"\nselector = '{{provider=\"lab\"}}'\nramp = [ {{ from = \"{}\", gpus = 8 }} ]\n",
            start.strftime("%Y-%m-%d"),
            start.strftime("%Y-%m-%d")
        ),
    )
    .unwrap();
    let data = dir.path("data");
    let ids = vec!["size".to_string()];
    let mut store = Store::open(&data).unwrap();
    store.load(&ids).unwrap();
    let mut l = Ledger::new(1, (first - 1) * MINUTE_MS);
    let mut sealed = l.seal(end * MINUTE_MS, 0, |_, a, b| 8 * (b - a));
    assert_eq!(sealed.len() as i64, end - first);
    // 0 to 12 GPUs used, 12 delivered, 8 committed: some minutes with overage.
    for s in &mut sealed {
        let used = (s.minute * 7919).rem_euclid(13);
        s.totals =
            commitmeter::ledger::split(8 * MINUTE_MS, 12 * MINUTE_MS, used * MINUTE_MS, 0, false);
    }
    store.commit(&ids, &sealed, &l.snapshot()).unwrap();
    drop(store);
    // The CLI's statement of the current period before the aggregator seals anything more:
    // its lookbacks end where the page's computed at the start do.
    let period = jiff::Timestamp::from_millisecond(end * MINUTE_MS)
        .unwrap()
        .strftime("%Y-%m")
        .to_string();
    let json = ok(&statement(
        &config,
        &data,
        &[
            "--contract=size",
            &format!("--period={period}"),
            "--format=json",
        ],
    ));
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    let sizing = &doc["sizing"];

    let mut agg = Aggregator::start(&config, &data);
    let page = wait_until(
        Duration::from_secs(30),
        || format!("the page's sizing; log:\n{}", agg.log_text()),
        || {
            let (status, page) = http_get(&agg.addr, "/");
            (status == 200 && page.contains("data-k=sizing ")).then_some(page)
        },
    );
    assert!(terminate(&mut agg.child, Duration::from_secs(20)).success());
    assert!(
        page.contains(&format!("data-end-ms={}", end * MINUTE_MS)),
        "{page}"
    );
    let as_of = sizing["end"].as_str().unwrap();
    assert!(page.contains(&format!("as of {as_of}")), "{as_of}: {page}");
    let mut shown = Vec::new();
    for l in sizing["lookbacks"].as_array().unwrap() {
        let days = l["days"].as_u64().unwrap();
        let tag = format!("<tr data-sizing-days={days}>");
        if !l["shown"].as_bool().unwrap() {
            assert!(!page.contains(&tag), "{days} days shown: {page}");
            assert!(page.contains(&format!("{days} days")), "{page}");
            continue;
        }
        shown.push(days);
        let at = page
            .find(&tag)
            .unwrap_or_else(|| panic!("no {days} days row: {page}"));
        let row = &page[at..at + page[at..].find("</tr>").unwrap()];
        let dist = &l["used_gpu_ms_per_minute"];
        for k in ["p50", "p90", "p99", "max"] {
            assert_eq!(
                sizing_value(row, &format!("sizing_{k}")),
                dist[k].as_i64().unwrap(),
                "{days} days {k}"
            );
        }
        assert_eq!(
            sizing_value(row, "sizing_accounted"),
            l["accounted"].as_i64().unwrap()
        );
        let rec = &l["recommendation"];
        assert_eq!(
            sizing_value(row, "sizing_gpus"),
            rec["gpus"].as_i64().unwrap()
        );
        for k in ["cost", "current_cost", "saving"] {
            let want = rec[format!("{k}_micros")].as_i64().unwrap();
            assert_eq!(
                sizing_value(row, &format!("sizing_{k}")),
                want,
                "{days} days {k}"
            );
        }
    }
    assert_eq!(shown, [7, 30], "{json}");
    assert!(page.contains("Not shown: 60 days"), "{page}");
}

#[test]
fn bad_statement_requests_are_refused_and_auth_applies() {
    let dir = TempDir::new("statement-http-bad");
    let config = live_config(&dir);
    let data = dir.path("data");
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let web = dir.path("web.yml");
    std::fs::write(&web, format!("basic_auth_users:\n  alice: {hash}\n")).unwrap();
    let agg = Aggregator::start_with(
        &config,
        &data,
        &[format!("--web.config.file={}", web.display())],
    );
    let get = |path: &str, auth: bool| {
        use base64::Engine;
        let token = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        let header = if auth {
            format!("Authorization: Basic {token}\r\n")
        } else {
            String::new()
        };
        http_request(
            &agg.addr,
            &format!("GET {path} HTTP/1.0\r\nHost: x\r\n{header}\r\n"),
        )
    };
    wait_until(
        Duration::from_secs(30),
        || format!("the aggregator to be ready; log:\n{}", agg.log_text()),
        || (get("/-/ready", true).0 == 200).then_some(()),
    );
    let (_, page) = get("/", true);
    let current = linked_periods(&page).remove(0);
    let (y, m): (i32, u32) = (current[..4].parse().unwrap(), current[5..].parse().unwrap());
    let previous = if m == 1 {
        format!("{:04}-12", y - 1)
    } else {
        format!("{y:04}-{:02}", m - 1)
    };
    assert_eq!(get(&format!("/statements/lab/{current}.csv"), false).0, 401);
    assert_eq!(get(&format!("/statements/lab/{current}.csv"), true).0, 200);
    for (path, want) in [
        (format!("/statements/nope/{current}.csv"), 404),
        (format!("/statements/lab/{current}.xml"), 404),
        ("/statements/live".to_string(), 404),
        ("/statements/lab/2026-13.csv".to_string(), 400),
        ("/statements/lab/nov.json".to_string(), 400),
        ("/statements/lab/2999-01.json".to_string(), 404),
    ] {
        let (status, body) = get(&path, true);
        assert_eq!(status, want, "{path}: {body}");
        assert_eq!(body.trim_end().lines().count(), 1, "{path}: {body}");
    }
    // A period before the ledger's first minute: served, and it says so.
    let (status, body) = get(&format!("/statements/lab/{previous}.json"), true);
    assert_eq!(status, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["starts_before_ledger"], true, "{body}");
    assert_eq!(doc["total"]["minutes_accounted"], 0, "{body}");
}
