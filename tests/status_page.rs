//! The aggregator's status page rendered by a real headless Chromium (Debian's
//! `chromium` package): every figure it shows equals the ledger's own sums, read
//! straight from the SQLite file. Also refreshes `docs/status-page.png`.

// Tests read the clock and open SQLite as they please: clippy.toml keeps that to
// src/clock.rs and src/aggregator/store.rs in the product only.
#![allow(clippy::disallowed_methods)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

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
fn the_status_page_in_chromium_shows_the_ledgers_figures() {
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
    let stdout = child.stdout.take().unwrap();
    let url = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.split("status page:").nth(1).map(|u| u.trim().to_string()))
        .expect("the demo printed no status page URL");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _demo = Kill(child);
    // Past the simulated host outage, the lost GPU and the ramp (6 h at 600x).
    std::thread::sleep(Duration::from_secs(40));

    let profile = dir.path("chromium-profile");
    let out = chromium(&profile, &["--dump-dom", &url]);
    let dom = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        dom.contains("data-contract"),
        "chromium rendered no contract: {dom}"
    );
    let through_ms = attr(&dom, 0, "data-ms");
    // The running demo holds its database exclusively: read a backup it writes (sealed
    // minutes never change, so the backup holds every minute the page showed).
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
    let since: i64 = ledger
        .query_row("SELECT value FROM meta WHERE key = 'since'", [], |r| {
            r.get(0)
        })
        .unwrap();
    let mut contracts = 0;
    for contract in ["acme-h100-east", "acme-h100-west", "borealis-h200"] {
        let at = dom.find(&format!("data-contract=\"{contract}\"")).unwrap();
        let start = attr(&dom, at, "data-period-start");
        let kinds = commitmeter::aggregator::metrics::KINDS;
        let sql = format!(
            "SELECT {} FROM minutes WHERE contract = ?1 AND minute >= ?2 AND minute < ?3",
            kinds.map(|k| format!("COALESCE(SUM({k}), 0)")).join(", ")
        );
        let sums: Vec<i64> = ledger
            .query_row(
                &sql,
                rusqlite::params![contract, (start / 60_000).max(since), through_ms / 60_000],
                |r| (0..7).map(|i| r.get(i)).collect(),
            )
            .unwrap();
        for (k, ms) in kinds.iter().zip(&sums) {
            let shown = field(&dom, at, k);
            let want = commitmeter::aggregator::status::thousands(*ms as f64 / 3_600_000.0);
            assert_eq!(shown, want, "{contract} {k}: page {shown}, ledger {want}");
        }
        // Non-trivial numbers: some idle and some undelivered in every contract.
        assert!(
            sums[0] > 0 && sums[3] > 0 && sums[4] > 0,
            "{contract}: {sums:?}"
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
