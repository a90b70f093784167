//! The aggregator's status page rendered by a real headless Chromium (Debian's
//! `chromium` package), its figures judged against what the demo's scripted fleet did
//! (the simulation's own integrals, never the ledger's sums). Also refreshes
//! `docs/status-page.png`.

// Tests read the clock and open SQLite as they please: clippy.toml keeps that to
// src/clock.rs and src/aggregator/store.rs in the product only.
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use commitmeter::aggregator::status::thousands;
use commitmeter::demo::sim::{Fleet, SimContract, SimGpu, SimHost, Story};
use commitmeter::ledger::Kind;
use common::*;

/// The demo's simulated start: the `start` of the contracts in the config it wrote.
fn simulation_start(config: &Path) -> i64 {
    let text = std::fs::read_to_string(config).unwrap();
    let v: toml::Value = toml::from_str(&text).unwrap();
    let start = v["contracts"][0]["start"].as_str().unwrap();
    start.parse::<jiff::Timestamp>().unwrap().as_millisecond()
}

/// What the scripted fleet did for one contract over `[from_ms, to_ms)`, in GPU-hours and
/// in the order of `Kind::ALL`, computed from the simulation itself (never from the ledger):
/// the ramp's commitment; the capacity of the contract's GPUs while their host answered
/// (delivered) and their use by the contract's `usage_signal` (busy time, or SM-active
/// time where the GPU has GPM under `sm_active`); capacity that was there but dark (its
/// host down) and capacity missing while everything reported, as far as the commitment
/// reaches (unreported, undelivered); use filling the delivered capacity within the
/// commitment, its rest (idle) and use beyond it (overage). Idle splits by the rule of
/// `ledger::Kind::IdleAllocated`: per GPU, the time a process held it unused by the signal,
/// as far as the GPU's own unused time reaches, then as far as the contract's idle reaches.
fn truth(start_ms: i64, contract: &SimContract, from_ms: i64, to_ms: i64) -> [f64; Kind::COUNT] {
    const STEP_MS: i64 = 10_000;
    let hours = STEP_MS as f64 / 3_600_000.0;
    let mut fleet = Fleet::new(Story::Default, start_ms);
    fleet.advance(from_ms);
    let mine = |h: &&SimHost| h.provider == contract.provider && h.cluster == contract.cluster;
    // Per GPU: whether its host answered, and its observed, used, allocated and
    // allocated-and-used seconds by the contract's signal.
    let gpus = |fleet: &Fleet| -> Vec<(bool, [f64; 4])> {
        let hosts = fleet.hosts.iter().filter(mine);
        let counters = |g: &SimGpu| match contract.usage_signal {
            "allocated" => [g.observed_s, g.allocated_s, g.allocated_s, g.allocated_s],
            "sm_active" if g.gpm => [
                g.observed_s,
                g.sm_active_s,
                g.allocated_s,
                g.allocated_sm_active_s,
            ],
            _ => [g.observed_s, g.busy_s, g.allocated_s, g.allocated_busy_s],
        };
        hosts
            .flat_map(|h| h.gpus.iter().map(move |g| (h.reachable, counters(g))))
            .collect()
    };
    let committed_gpus = |t: i64| {
        let mut steps = contract
            .ramp
            .iter()
            .filter(|(h, _)| start_ms + h * 3_600_000 <= t);
        steps.next_back().map_or(0, |(_, g)| *g as i64)
    };
    // In GPU-ms, exactly as the ledger counts it.
    let mut committed_ms = 0;
    let [mut delivered, mut used, mut idle, mut idle_allocated] = [0.0; 4];
    let [mut undelivered, mut unreported, mut overage] = [0.0; 3];
    let mut now = from_ms;
    while now < to_ms {
        let before = gpus(&fleet);
        fleet.advance(now + STEP_MS);
        let (mut seen, mut dark, mut busy, mut held) = (0.0, 0.0, 0.0, 0.0);
        for ((reachable, after), (_, before)) in gpus(&fleet).iter().zip(&before) {
            let [observed, use_s, allocated, allocated_use] =
                std::array::from_fn(|i| (after[i] - before[i]) / 3600.0);
            if *reachable {
                seen += observed;
                busy += use_s;
                held += (allocated - allocated_use).clamp(0.0, (observed - use_s).max(0.0));
            } else {
                dark += observed;
            }
        }
        committed_ms += committed_gpus(now) * STEP_MS;
        let c = committed_gpus(now) as f64 * hours;
        let within = seen.min(c);
        let not_seen = dark.min(c - within);
        let used_within = busy.min(within);
        delivered += seen;
        used += busy;
        idle += within - used_within;
        idle_allocated += held.min(within - used_within);
        undelivered += c - within - not_seen;
        unreported += not_seen;
        overage += busy - used_within;
        now += STEP_MS;
    }
    let committed = committed_ms as f64 / 3_600_000.0;
    Kind::ALL.map(|k| match k {
        Kind::Committed => committed,
        Kind::Delivered => delivered,
        Kind::Used => used,
        Kind::Idle => idle,
        Kind::Undelivered => undelivered,
        Kind::Unreported => unreported,
        Kind::Overage => overage,
        Kind::IdleUnallocated => idle - idle_allocated,
        Kind::IdleAllocated => idle_allocated,
    })
}

/// How far the page may be from the fleet's truth, in GPU-hours: the ledger knows the
/// fleet only at its readings, one per real second, ten simulated minutes at 600x; when
/// a host goes dark and comes back (the one story event whose time the ledger can only
/// bracket), its 8 GPUs may be placed up to two readings off at each end.
const READING_SLACK_H: f64 = 8.0 * 2.0 * (2.0 * 600.0 / 3600.0);

/// Headless Chromium with a profile of its own, so it never waits on another
/// Chromium's profile lock.
fn chromium(profile: &Path, args: &[&str]) -> std::process::Output {
    Command::new("chromium")
        .arg(format!("--user-data-dir={}", profile.display()))
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("chromium not found: install Debian's `chromium` package (see .ci/run)")
}

/// The text of the first element with `data-k=KEY` after `from` in Chromium's DOM.
fn field<'a>(dom: &'a str, from: usize, key: &str) -> &'a str {
    let needle = format!("data-k=\"{key}\"");
    let at = from
        + dom[from..]
            .find(&needle)
            .unwrap_or_else(|| panic!("no {key} in the page"));
    let open = at + dom[at..].find('>').unwrap() + 1;
    let close = open + dom[open..].find('<').unwrap();
    &dom[open..close]
}

fn attr(dom: &str, from: usize, name: &str) -> i64 {
    let needle = format!("{name}=\"");
    let at = from + dom[from..].find(&needle).unwrap() + needle.len();
    let end = at + dom[at..].find('"').unwrap();
    dom[at..end].parse().unwrap()
}

#[test]
fn the_status_page_in_chromium_shows_what_the_simulated_fleet_did() {
    let dir = TempDir::new("status");
    let data = dir.path("demo");
    let mut child = Command::new(BIN)
        .args([
            "demo",
            "--web.listen-address=127.0.0.1:0",
            "--speed=600",
            "--log.level=warn",
        ])
        .arg(format!("--data.dir={}", data.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = demo_banner(&mut child, "status page:");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _demo = Kill(child);
    // Past the simulated host outage, the lost GPU and the ramp: 6 h sealed (some 37 s).
    let base = url.trim_start_matches("http://").trim_end_matches('/');
    let m = wait_sealed_span(
        base,
        Duration::from_secs(120),
        Duration::from_secs(6 * 3600),
    );
    let since_s = m
        .get("commitmeter_ledger_since_timestamp_seconds", &[])
        .unwrap();

    let profile = dir.path("chromium-profile");
    let out = chromium(&profile, &["--dump-dom", &url]);
    let dom = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        dom.contains("data-contract"),
        "chromium rendered no contract: {dom}"
    );
    let through_ms = attr(&dom, 0, "data-ms");
    let since_ms = since_s as i64 * 1000;
    let start_ms = simulation_start(&data.join("aggregator.toml"));
    // The page renders the ledger, not a recomputation of it: every figure equals the sum
    // of the sealed minutes, read from a backup the running demo writes (it holds its
    // database exclusively; sealed minutes never change, so the backup holds every minute
    // the page showed). The fleet's truth below judges those minutes themselves.
    let backup = dir.path("backup.sqlite3");
    let out = Command::new(BIN)
        .args(["ledger", "backup", "--timeout=30s"])
        .arg(format!("--storage.path={}", data.display()))
        .arg(format!("--output={}", backup.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ledger backup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ledger = rusqlite::Connection::open(&backup).unwrap();
    let mut contracts = 0;
    for contract in Fleet::new(Story::Default, start_ms).contracts() {
        let id = contract.id;
        let at = dom.find(&format!("data-contract=\"{id}\"")).unwrap();
        let from_ms = attr(&dom, at, "data-period-start").max(since_ms);
        let sql = format!(
            "SELECT {} FROM minutes WHERE contract = ?1 AND minute >= ?2 AND minute < ?3",
            Kind::NAMES
                .map(|k| format!("COALESCE(SUM({k}), 0)"))
                .join(", ")
        );
        let sums: [i64; Kind::COUNT] = ledger
            .query_row(
                &sql,
                rusqlite::params![id, from_ms / 60_000, through_ms / 60_000],
                |r| Ok(Kind::ALL.map(|k| r.get(k as usize).unwrap())),
            )
            .unwrap();
        for (k, ms) in Kind::NAMES.iter().zip(sums) {
            let shown = field(&dom, at, k);
            let want = thousands(ms as f64 / 3_600_000.0);
            assert_eq!(shown, want, "{id} {k}: page {shown}, ledger {want}");
        }
        let truth = truth(start_ms, &contract, from_ms, through_ms);
        let page = |k: &str| -> f64 {
            let text = field(&dom, at, k);
            text.replace(',', "")
                .parse()
                .unwrap_or_else(|e| panic!("{id} {k}: {text:?}: {e}"))
        };
        let shown: [f64; Kind::COUNT] = Kind::ALL.map(|k| page(k.name()));
        for ((k, page), fleet) in Kind::NAMES.iter().zip(shown).zip(truth) {
            eprintln!("{id} {k}: page {page}, fleet {fleet:.2}");
        }
        // The commitment is the contract's alone: to the digit the page shows.
        assert_eq!(
            field(&dom, at, "committed"),
            thousands(truth[0]),
            "{id}: committed on the page vs the ramp"
        );
        for ((k, page), fleet) in Kind::NAMES.iter().zip(shown).zip(truth) {
            assert!(
                (page - fleet).abs() <= READING_SLACK_H,
                "{id} {k}: page {page}, the fleet's truth {fleet:.2}"
            );
        }
        // The page adds up, to its rounding: the commitment is delivered (used or idle),
        // undelivered or unreported; used time beyond the commitment is overage.
        let [committed, _, used, idle, undelivered, unreported, overage, ..] = shown;
        assert!(
            (used - overage + idle + undelivered + unreported - committed).abs() <= 0.25,
            "{id}: the page's figures do not add up: {shown:?}"
        );
        // The idle split adds up to idle, to the page's rounding: two parts rounded to
        // 0.1 each sum to within one 0.1 step of their rounded sum (125.6 + 108.6 for 234.1).
        let parts: f64 = Kind::Idle.parts().map(|k| page(k.name())).sum();
        assert!(
            (parts - idle).abs() <= 0.1 + 1e-6,
            "{id}: idle {idle} is not its parts' sum {parts}"
        );
        // Non-trivial numbers: some idle and some undelivered in every contract.
        assert!(
            committed > 0.0 && idle > 0.0 && undelivered > 0.0,
            "{id}: {shown:?}"
        );
        contracts += 1;
    }
    assert_eq!(contracts, 3);
    let east = dom.find("data-contract=\"acme-h100-east\"").unwrap();
    assert_ne!(
        field(&dom, east, "undelivered"),
        "0.0",
        "the ramp outruns delivery"
    );
    let west = dom.find("data-contract=\"acme-h100-west\"").unwrap();
    assert_ne!(field(&dom, west, "unreported"), "0.0", "a host was down");
    assert!(dom.contains("<svg") && dom.contains("<polyline"));
    assert!(!dom.contains("<script"));
    // Showback: every contract's table has the demo's three teams and unassigned time.
    assert_eq!(dom.matches("data-k=\"showback\"").count(), 3);
    for team in ["vision", "llm", "research", "unassigned"] {
        assert_eq!(
            dom.matches(&format!("data-team=\"{team}\"")).count(),
            3,
            "{team} in every contract's showback"
        );
    }

    // The screenshot kept for the README (refreshed with COMMITMETER_UPDATE_SCREENSHOT=1).
    let shot = dir.path("status-page.png");
    let out = chromium(
        &profile,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,1500",
            &url,
        ],
    );
    assert!(
        shot.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    if std::env::var_os("COMMITMETER_UPDATE_SCREENSHOT").is_some() {
        std::fs::copy(&shot, docs.join("status-page.png")).unwrap();
    }
}
