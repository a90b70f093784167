//! `commitmeter demo` through the real binary: a stop by SIGTERM leaves no unreported
//! GPU-ms in the minutes sealed last (simulated time freezes before the last seal), and the
//! status page shows the renewal sizing once the demo's ledger holds a lookback's minutes.

// Tests read the clock and open SQLite as they please: clippy.toml keeps that to
// src/clock.rs and src/aggregator/store.rs in the product only.
#![allow(clippy::disallowed_methods)]

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::*;

/// One demo at a time: each keeps a core busy at these speeds.
static ONE_DEMO: Mutex<()> = Mutex::new(());

#[test]
fn a_stopped_demo_has_no_unreported_gpu_ms_in_its_last_minutes() {
    let _one = ONE_DEMO.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("demo-stop");
    let data = dir.path("demo");
    // At 2400x one real second is 40 simulated minutes: before the fix, the ~25 minutes
    // sealed last at a stop had nothing delivered, all unreported.
    let mut demo = Demo::start(&data, &["--story=healthy", "--speed=2400"]);
    // Six simulated hours sealed, then the stop.
    let m = wait_sealed_span(
        &demo.addr,
        Duration::from_secs(90),
        Duration::from_secs(6 * 3600),
    );
    // Showback: the demo's jobs belong to three teams and to none, and every contract's
    // teams add up to its allocated time.
    for c in ["acme-h100-east", "acme-h100-west", "borealis-h200"] {
        let teams: Vec<(String, f64)> = m
            .series("commitmeter_team_allocated_gpu_seconds_total")
            .iter()
            .filter(|(l, _)| l.get("contract").map(String::as_str) == Some(c))
            .map(|(l, v)| (l.get("team").unwrap().to_string(), *v))
            .collect();
        let names: Vec<&str> = teams.iter().map(|t| t.0.as_str()).collect();
        assert_eq!(names, ["llm", "research", "unassigned", "vision"], "{c}");
        let sum: f64 = teams.iter().map(|t| t.1).sum();
        let allocated = m
            .get(
                "commitmeter_contract_allocated_gpu_seconds_total",
                &[("contract", c)],
            )
            .unwrap();
        assert!(
            allocated > 0.0 && (sum - allocated).abs() < 1e-6,
            "{c}: {sum} vs {allocated}"
        );
    }
    assert!(terminate(&mut demo.child, Duration::from_secs(30)).success());
    let db = rusqlite::Connection::open(data.join("ledger.sqlite3")).unwrap();
    // The last two simulated hours of every contract.
    let last: Vec<(String, i64, i64, i64)> = db
        .prepare(
            "SELECT contract, minute, committed, unreported FROM minutes \
             WHERE minute >= (SELECT MAX(minute) FROM minutes) - 119 ORDER BY minute",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(last.len(), 3 * 120, "three contracts, 120 minutes each");
    let unreported: Vec<_> = last.iter().filter(|m| m.3 != 0).collect();
    assert!(unreported.is_empty(), "unreported minutes: {unreported:?}");
    assert!(last.iter().all(|m| m.2 > 0), "committed every minute");
}

#[test]
fn the_demos_status_page_shows_the_sizing_once_a_week_is_sealed() {
    let _one = ONE_DEMO.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("demo-sizing");
    let data = dir.path("demo");
    // A week of simulated time in about 30 s.
    let mut demo = Demo::start(&data, &["--story=default", "--speed=20000"]);
    let addr = demo.addr.clone();
    let (_, young) = http_get(&addr, "/");
    assert!(!young.contains("data-sizing-days"), "{young}");
    let page = wait_until(
        Duration::from_secs(240),
        || "the 7-day sizing on the demo's status page".to_string(),
        || {
            let (status, page) = http_get(&addr, "/");
            (status == 200 && page.matches("<tr data-sizing-days=7>").count() == 3).then_some(page)
        },
    );
    assert!(terminate(&mut demo.child, Duration::from_secs(30)).success());
    // A week and some days: the 30- and 60-day lookbacks are not shown.
    assert!(
        !page.contains("data-sizing-days=30") && !page.contains("data-sizing-days=60"),
        "{page}"
    );
    assert_eq!(page.matches("Not shown: 30 days, 60 days").count(), 3);
}
