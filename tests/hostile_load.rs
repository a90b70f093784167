//! The aggregator under hostile load, through the real binary: a crowd on the status page,
//! a target with a 100,000-label line, many targets that send 14 MB and stall, a FIFO
//! matched by a file_sd glob, a frozen and a full disk. Each test checks that serving,
//! the scrape loop and the honest host go on, and records the latency of a legitimate
//! `GET /metrics` meanwhile (printed with `--nocapture`; only generous bounds asserted).

// Tests read the clock and open SQLite as they please: clippy.toml keeps that to
// src/clock.rs and src/aggregator/store.rs in the product only.
#![allow(clippy::disallowed_methods)]

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// An honest agent on the fake library: 2 GPUs at 50 %.
fn honest() -> Agent {
    let a = Agent::start(
        &Scenario {
            gpus: vec![Gpu::at_util(50), Gpu::at_util(50)],
            ..Scenario::default()
        },
        AgentOpts::default(),
    );
    a.wait_ready(Duration::from_secs(20));
    a
}

/// An aggregator config scraping every `timeout` (the longest a scrape may take), with `[[targets]]` for `honest` and
/// file_sd files under `sd_glob`.
fn config(dir: &TempDir, honest: &str, sd_glob: Option<&str>, timeout: &str) -> std::path::PathBuf {
    let path = dir.path("aggregator.toml");
    let sd = sd_glob.map_or(String::new(), |g| {
        format!("[[file_sd]]\nfiles = [\"{g}\"]\n")
    });
    std::fs::write(
        &path,
        format!(
            "[aggregator]\nscrape_interval = \"{timeout}\"\nscrape_timeout = \"{timeout}\"\ngrace = \"10s\"\n\n\
             [[targets]]\ntargets = [\"{honest}\"]\nlabels = {{ provider = \"p\" }}\n\n{sd}\n{}",
            contract_toml("lab", r#"{provider="p"}"#, 2)
        ),
    )
    .unwrap();
    path
}

/// One `GET path` with a fresh connection; how long the whole answer took.
fn timed_get(addr: &str, path: &str) -> (u16, Duration) {
    let t = Instant::now();
    let (status, _) = http_get(addr, path);
    (status, t.elapsed())
}

/// Polls `GET /metrics` every 100 ms while `busy` holds; the latencies.
fn probe_metrics(addr: &str, busy: &AtomicBool) -> Vec<Duration> {
    let mut out = Vec::new();
    while busy.load(Ordering::Relaxed) {
        let (status, took) = timed_get(addr, "/metrics");
        assert_eq!(status, 200);
        out.push(took);
        std::thread::sleep(Duration::from_millis(100));
    }
    out
}

fn summary(mut l: Vec<Duration>) -> (Duration, Duration, usize) {
    l.sort();
    let median = l.get(l.len() / 2).copied().unwrap_or_default();
    (median, l.last().copied().unwrap_or_default(), l.len())
}

fn errors(m: &Metrics, target: &str, reason: &str) -> f64 {
    m.get(
        "commitmeter_target_scrape_errors_total",
        &[("target", target), ("reason", reason)],
    )
    .unwrap_or(0.0)
}

/// A server that answers each connection on its own thread with headers declaring
/// `declared` bytes, sends `sent` bytes of comment lines, then stalls until dropped.
struct Staller {
    addr: String,
    stop: Arc<AtomicBool>,
}

impl Staller {
    fn start(declared: usize, sent: usize) -> Staller {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let Ok((mut s, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let stopped = stopped.clone();
                std::thread::spawn(move || {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf);
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {declared}\r\n\r\n"
                    );
                    if s.write_all(head.as_bytes()).is_err() {
                        return;
                    }
                    let mut chunk = vec![b'x'; 64 * 1024];
                    chunk[0] = b'#';
                    chunk[1] = b' ';
                    *chunk.last_mut().unwrap() = b'\n';
                    let mut left = sent;
                    while left > 0 {
                        let n = left.min(chunk.len());
                        if s.write_all(&chunk[..n]).is_err() {
                            return;
                        }
                        left -= n;
                    }
                    while !stopped.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(50));
                        // The aggregator hung up (timeout): stop holding the thread.
                        if s.write_all(b"").is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Staller { addr, stop }
    }
}

impl Drop for Staller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// file_sd JSON with `n` targets at `addr`, each on its own metrics path.
fn sd_targets(addr: &str, n: usize, provider: &str) -> String {
    let groups: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"targets":["{addr}"],"labels":{{"provider":"{provider}","__metrics_path__":"/t/{i}"}}}}"#
            )
        })
        .collect();
    format!("[{}]", groups.join(","))
}

/// 150 clients reload the status page as fast as they can: `/metrics` stays fast and the
/// aggregator's own scrapes do not time out (the page is rendered once per round in the
/// background and served as a copy).
#[test]
fn a_crowd_on_the_status_page_stalls_neither_metrics_nor_scrapes() {
    let agent = honest();
    let dir = TempDir::new("hostile-page");
    let agg = Aggregator::start(&config(&dir, &agent.addr, None, "2s"), &dir.path("data"));
    agg.wait_ready(Duration::from_secs(20));
    let (_, alone) = timed_get(&agg.addr, "/metrics");

    let busy = Arc::new(AtomicBool::new(true));
    let pages = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let crowd: Vec<_> = (0..150)
        .map(|_| {
            let (addr, busy, pages) = (agg.addr.clone(), busy.clone(), pages.clone());
            std::thread::spawn(move || {
                while busy.load(Ordering::Relaxed) {
                    let (status, body) = http_get(&addr, "/");
                    assert_eq!(status, 200);
                    assert!(body.contains("commitmeter"), "{body}");
                    pages.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let prober = {
        let (addr, busy) = (agg.addr.clone(), busy.clone());
        std::thread::spawn(move || probe_metrics(&addr, &busy))
    };
    std::thread::sleep(Duration::from_secs(8));
    busy.store(false, Ordering::Relaxed);
    for c in crowd {
        c.join().unwrap();
    }
    let (median, max, n) = summary(prober.join().unwrap());
    let m = agg.metrics();
    eprintln!(
        "status page crowd (150 clients, 8 s): {} pages served; GET /metrics alone {alone:?}, during: median {median:?}, max {max:?} over {n} requests",
        pages.load(Ordering::Relaxed)
    );
    assert_eq!(
        m.get("commitmeter_target_up", &[("target", &agent.addr)]),
        Some(1.0)
    );
    assert_eq!(
        errors(&m, &agent.addr, "timeout"),
        0.0,
        "{}",
        agg.log_text()
    );
    assert!(max < Duration::from_secs(5), "GET /metrics took {max:?}");
}

/// A target sending one line with 100,000 labels and 40 targets that each send 14 MB of a
/// declared 15 MB and stall: the bodies in flight stay within the global budget (64 MiB
/// by default), the honest host is scraped every round, and `/metrics` stays fast.
#[test]
fn huge_and_stalled_bodies_are_bounded_in_memory_and_stall_nothing() {
    let agent = honest();
    let labels: String = (0..100_000)
        .map(|i| format!("l{i}=\"v\""))
        .collect::<Vec<_>>()
        .join(",");
    let line = format!("commitmeter_gpu_observed_seconds_total{{{labels}}} 1\n");
    let wide = Exporter::start(move |_| line.clone());
    let stall = Staller::start(15_000_000, 14_000_000);
    let dir = TempDir::new("hostile-bodies");
    std::fs::create_dir_all(dir.path("sd")).unwrap();
    std::fs::write(
        dir.path("sd/wide.json"),
        format!(
            r#"[{{"targets":["{}"],"labels":{{"provider":"hostile"}}}}]"#,
            wide.addr
        ),
    )
    .unwrap();
    let glob = format!("{}/*.json", dir.path("sd").display());
    let agg = Aggregator::start(
        &config(&dir, &agent.addr, Some(&glob), "3s"),
        &dir.path("data"),
    );
    agg.wait_ready(Duration::from_secs(30));
    // The wide line is read alone first: its body is above FREE_BODY_BYTES, so behind 40
    // bodies that declare 15 MB and stall it waits for the shared budget (first come, first
    // served), and whether it ever reached the parser would depend on arrival order.
    let deadline = Instant::now() + Duration::from_secs(30);
    while errors(&agg.metrics(), &wide.addr, "parse") < 1.0 {
        assert!(Instant::now() < deadline, "{}", agg.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    std::fs::write(
        dir.path("sd/stall.json"),
        sd_targets(&stall.addr, 40, "hostile"),
    )
    .unwrap();
    let busy = Arc::new(AtomicBool::new(true));
    let prober = {
        let (addr, busy) = (agg.addr.clone(), busy.clone());
        std::thread::spawn(move || probe_metrics(&addr, &busy))
    };
    let first = agg.metrics();
    let honest_before = first
        .get(
            "commitmeter_target_scrape_duration_seconds",
            &[("target", &agent.addr)],
        )
        .is_some();
    std::thread::sleep(Duration::from_secs(12));
    busy.store(false, Ordering::Relaxed);
    let (median, max, n) = summary(prober.join().unwrap());
    let m = agg.metrics();
    let pid = agg.child.id();
    let hwm_mb = status_kb(pid, "VmHWM:") as f64 / 1024.0;
    let stalled_timeouts: f64 = (0..40)
        .map(|i| errors(&m, &format!("{}/t/{i}", stall.addr), "timeout"))
        .sum();
    eprintln!(
        "40 stalled 14 MB bodies + a 100,000-label line: aggregator peak RSS {hwm_mb:.0} MB; \
         {stalled_timeouts} stalled scrapes timed out; GET /metrics median {median:?}, max {max:?} over {n} requests"
    );
    assert!(honest_before);
    assert!(stalled_timeouts >= 40.0, "the attack did not run");
    assert!(errors(&m, &wide.addr, "parse") >= 1.0, "{}", agg.log_text());
    assert_eq!(
        m.get("commitmeter_target_up", &[("target", &agent.addr)]),
        Some(1.0)
    );
    for reason in ["timeout", "too_large", "body", "parse"] {
        assert_eq!(errors(&m, &agent.addr, reason), 0.0, "{reason}");
    }
    // 40 × 14 MB would be 560 MB; the budget keeps bodies in flight near 64 MiB.
    assert!(hwm_mb < 250.0, "peak RSS {hwm_mb:.0} MB");
    assert!(max < Duration::from_secs(5), "GET /metrics took {max:?}");
}

/// A FIFO matched by a file_sd glob is skipped as a problem (opening it would block
/// forever), the other file's target is scraped, and SIGTERM still ends the process.
#[test]
fn a_fifo_matched_by_file_sd_is_skipped_and_sigterm_still_stops() {
    let agent = honest();
    let dir = TempDir::new("hostile-fifo");
    std::fs::create_dir_all(dir.path("sd")).unwrap();
    std::fs::write(
        dir.path("sd/good.json"),
        format!(
            r#"[{{"targets":["{}"],"labels":{{"provider":"p"}}}}]"#,
            agent.addr
        ),
    )
    .unwrap();
    let fifo = dir.path("sd/fifo.json");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let path = dir.path("aggregator.toml");
    std::fs::write(
        &path,
        format!(
            "[aggregator]\nscrape_interval = \"1s\"\nscrape_timeout = \"1s\"\ngrace = \"5s\"\n\n\
             [[file_sd]]\nfiles = [\"{}/*.json\"]\n\n{}",
            dir.path("sd").display(),
            contract_toml("lab", r#"{provider="p"}"#, 2)
        ),
    )
    .unwrap();
    let mut agg = Aggregator::start(&path, &dir.path("data"));
    agg.wait_ready(Duration::from_secs(20));
    agg.wait_for(Duration::from_secs(10), "the good target", |m| {
        m.get("commitmeter_target_up", &[("target", &agent.addr)]) == Some(1.0)
    });
    assert!(
        agg.log_text().contains("not a regular file"),
        "{}",
        agg.log_text()
    );
    let t = Instant::now();
    let status = terminate(&mut agg.child, Duration::from_secs(15));
    eprintln!(
        "SIGTERM with a FIFO in file_sd: exited in {:?}",
        t.elapsed()
    );
    assert!(status.success(), "{status:?}\n{}", agg.log_text());
}

/// 40 targets of which 4 refuse connections and 3 flap: the log has a summary line when
/// the picture changes and at most ten state-change lines a round, never a line per
/// target per round (and no "scrape ok" line per target at start).
#[test]
fn the_log_stays_bounded_whatever_the_fleet_does() {
    let agent = honest();
    let fine = Exporter::start(|_| "node_load1 0.5\n".into());
    let flapping = Exporter::start(|n| {
        // Odd requests get an impossible counter: the scrape fails.
        if n % 2 == 1 {
            "commitmeter_gpu_observed_seconds_total{gpu=\"0\",uuid=\"GPU-0\"} -1\n".into()
        } else {
            "node_load1 0.5\n".into()
        }
    });
    let refused = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let dir = TempDir::new("hostile-logs");
    std::fs::create_dir_all(dir.path("sd")).unwrap();
    std::fs::write(dir.path("sd/fine.json"), sd_targets(&fine.addr, 32, "q")).unwrap();
    std::fs::write(dir.path("sd/flap.json"), sd_targets(&flapping.addr, 3, "q")).unwrap();
    std::fs::write(dir.path("sd/down.json"), sd_targets(&refused, 4, "q")).unwrap();
    let glob = format!("{}/*.json", dir.path("sd").display());
    let agg = Aggregator::start(
        &config(&dir, &agent.addr, Some(&glob), "1s"),
        &dir.path("data"),
    );
    agg.wait_ready(Duration::from_secs(20));
    let rounds_before = agg.log_text().matches("scrape round").count();
    let lines_before = agg.log.lock().unwrap().len();
    std::thread::sleep(Duration::from_secs(10));
    let log = agg.log_text();
    let lines: Vec<&str> = log.lines().skip(lines_before).collect();
    let rounds = log.matches("scrape round").count() - rounds_before;
    eprintln!(
        "40 targets (4 refused, 3 flapping): {} log lines over {rounds} rounds after the first",
        lines.len()
    );
    assert!(rounds >= 1, "{log}");
    // No line per healthy target at start.
    assert!(
        log.matches(&fine.addr).count() <= 10 * (rounds + 1),
        "{log}"
    );
    // Flapping targets change every round: at most 10 state lines and a summary each.
    assert!(
        lines.len() <= 12 * (rounds + 2),
        "{} lines over {rounds} rounds:\n{log}",
        lines.len()
    );
    // The refused ones are reported once at first, not every round.
    let refused_lines = log.matches(&refused).count();
    assert!(
        refused_lines <= 4,
        "{refused_lines} lines about {refused}:\n{log}"
    );
}

fn ready(addr: &str) -> u16 {
    http_get(addr, "/-/ready").0
}

/// A frozen disk (`fsfreeze`) under the ledger: `/metrics`, the status page and the scrape
/// loop go on, readiness fails while the write hangs, and after the thaw the pending
/// minutes are written and the aggregator is ready again. Needs root and loop devices.
#[test]
fn a_frozen_disk_stalls_neither_serving_nor_scraping_and_fails_readiness() {
    let dir = TempDir::new("hostile-freeze");
    let Some(mount) = Mount::ext4(&dir.path("fs")) else {
        eprintln!("SKIPPED: cannot mount a loop file system here (not root?)");
        return;
    };
    let agent = honest();
    let agg = Aggregator::start(
        &config(&dir, &agent.addr, None, "1s"),
        &mount.0.join("ledger"),
    );
    agg.wait_ready(Duration::from_secs(20));
    assert!(sh(&format!("fsfreeze -f {}", mount.0.display())));
    let frozen_at = Instant::now();
    let mut worst = Duration::ZERO;
    agg.wait(
        Duration::from_secs(40),
        "readiness fails on a frozen disk",
        || {
            for path in ["/metrics", "/", "/-/healthy"] {
                let (status, took) = timed_get(&agg.addr, path);
                assert_eq!(status, 200, "{path}");
                worst = worst.max(took);
            }
            ready(&agg.addr) == 503
        },
    );
    let unready_after = frozen_at.elapsed();
    // Scrapes go on while the disk is frozen.
    let before = agg.metrics();
    std::thread::sleep(Duration::from_secs(3));
    let after = agg.metrics();
    let dur = |m: &Metrics| {
        m.get(
            "commitmeter_target_scrape_duration_seconds",
            &[("target", &agent.addr)],
        )
    };
    assert_eq!(
        after.get("commitmeter_target_up", &[("target", &agent.addr)]),
        Some(1.0)
    );
    assert!(dur(&before).is_some() && dur(&after).is_some());
    eprintln!(
        "frozen disk: not ready after {unready_after:?}; slowest GET of /metrics, / or /-/healthy meanwhile {worst:?}"
    );
    assert!(worst < Duration::from_secs(5), "{worst:?}");
    assert!(sh(&format!("fsfreeze -u {}", mount.0.display())));
    agg.wait(
        Duration::from_secs(30),
        "ready again after the thaw",
        || ready(&agg.addr) == 200,
    );
    let m = agg.metrics();
    assert_eq!(
        m.get("commitmeter_ledger_last_write_successful", &[]),
        Some(1.0)
    );
    drop(agg);
}

/// A full disk under the ledger: writes fail, readiness fails, the process lives on
/// (no SIGBUS), sealed minutes wait in memory, and once space is back they are written
/// and the aggregator is ready again. Needs root (a small tmpfs).
#[test]
fn a_full_disk_fails_readiness_keeps_minutes_and_recovers() {
    let dir = TempDir::new("hostile-full");
    let Some(mount) = Mount::tmpfs(&dir.path("fs"), "2m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root?)");
        return;
    };
    let agent = honest();
    let agg = Aggregator::start(
        &config(&dir, &agent.addr, None, "1s"),
        &mount.0.join("ledger"),
    );
    agg.wait_ready(Duration::from_secs(20));
    let log = || agg.log_text();
    let filler = mount.0.join("filler");
    // Fill every byte left.
    fill_file_system(&filler);
    agg.wait(
        Duration::from_secs(30),
        "readiness fails on a full disk",
        || ready(&agg.addr) == 503,
    );
    let m = agg.metrics();
    assert_eq!(
        m.get("commitmeter_ledger_last_write_successful", &[]),
        Some(0.0)
    );
    assert!(
        m.get(
            "commitmeter_ledger_store_errors_total",
            &[("operation", "commit")]
        )
        .unwrap()
            >= 1.0
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        agg_alive(&agg),
        "the aggregator died on a full disk:\n{}",
        log()
    );
    std::fs::remove_file(&filler).unwrap();
    agg.wait(
        Duration::from_secs(30),
        "ready again once space is back",
        || ready(&agg.addr) == 200,
    );
    let m = agg.metrics();
    assert_eq!(
        m.get("commitmeter_ledger_last_write_successful", &[]),
        Some(1.0)
    );
    assert_eq!(m.get("commitmeter_ledger_pending_minutes", &[]), Some(0.0));
    assert!(log().contains("the ledger is written again"), "{}", log());
}

fn agg_alive(agg: &Aggregator) -> bool {
    TcpStream::connect(&agg.addr).is_ok()
        && std::fs::metadata(format!("/proc/{}", agg.child.id())).is_ok()
}
