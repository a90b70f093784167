//! End to end on real software: `commitmeter demo` (simulated fleet, real aggregator
//! and ledger on simulated time), a real Prometheus (Debian's `prometheus` package)
//! scraping it on loopback with the shipped rule files (underuse pages, the GPU-use
//! tickets, silence on a healthy fleet), and every dashboard query.
//!
//! Time compression: the demo runs simulated time at 60x, so one real second is one
//! simulated minute. The test copy of the rules divides every range, `offset` and
//! `for:` duration by 60 (`for:` keeps at least 20 s); ratios of counter increases do
//! not care about the time scale, and the billing period length still comes from the
//! (simulated) period gauges.

// Tests read the clock and open SQLite as they please: clippy.toml keeps that to
// src/clock.rs and src/aggregator/store.rs in the product only.
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::prometheus::{api, urlencode, Prometheus};
use common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// One demo and one Prometheus at a time: three pairs at once starve a 2-core CI
/// machine until scrapes time out and "target down" alerts fire for the wrong reason.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Demo {
    child: Child,
    addr: String,
    data: PathBuf,
    /// The demo's standard error (warnings and errors), for a failure's message.
    log: PathBuf,
}

impl Demo {
    /// Whether the demo still runs, and the end of its log: what a failure needs to say.
    fn state(&mut self) -> String {
        let status = match self.child.try_wait() {
            Ok(None) => "running".to_string(),
            Ok(Some(s)) => format!("exited: {s}"),
            Err(e) => format!("unknown: {e}"),
        };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        format!(
            "demo {status}; its log (last lines):\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_demo(story: &str, speed: u32, dir: &TempDir) -> Demo {
    let data = dir.path("demo");
    let mut child = Command::new(BIN)
        .args([
            "demo",
            "--web.listen-address=127.0.0.1:0",
            "--log.level=warn",
        ])
        .arg(format!("--story={story}"))
        .arg(format!("--speed={speed}"))
        .arg(format!("--data.dir={}", data.display()))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path("demo.log")).unwrap())
        .spawn()
        .expect("start commitmeter demo");
    let addr = demo_banner(&mut child, "contract metrics:")
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_string();
    Demo {
        child,
        addr,
        data,
        log: dir.path("demo.log"),
    }
}

/// Rewrites a duration like `5m` to a 60th of it, in seconds (at least 1s).
fn compress(n: u64, unit: &str) -> String {
    let secs = n * match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => 1,
    };
    format!("{}s", (secs / 60).max(1))
}

/// The shipped rule files, with every range selector and `for:` divided by 60.
fn compressed_rules(dir: &TempDir) -> Vec<PathBuf> {
    let range = regex::Regex::new(r"\[(\d+)([smhdw])\]").unwrap();
    let for_ = regex::Regex::new(r"(?m)^(\s*for:\s*)(\d+)([smhdw])\s*$").unwrap();
    let offset = regex::Regex::new(r"offset (\d+)([smhdw])\b").unwrap();
    let mut out = Vec::new();
    for path in rule_files() {
        let text = std::fs::read_to_string(&path).unwrap();
        let text = range.replace_all(&text, |c: &regex::Captures| {
            format!("[{}]", compress(c[1].parse().unwrap(), &c[2]))
        });
        // `for:` keeps at least 20 s: a loaded CI machine may miss a few 1 s scrapes,
        // which should not read as an agent down for "5 minutes".
        let text = for_.replace_all(&text, |c: &regex::Captures| {
            let secs: u64 = compress(c[2].parse().unwrap(), &c[3])
                .trim_end_matches('s')
                .parse()
                .unwrap();
            format!("{}{}s", &c[1], secs.max(20))
        });
        let text = offset.replace_all(&text, |c: &regex::Captures| {
            format!("offset {}", compress(c[1].parse().unwrap(), &c[2]))
        });
        let copy = dir.path(path.file_name().unwrap().to_str().unwrap());
        std::fs::write(&copy, text.as_ref()).unwrap();
        out.push(copy);
    }
    assert!(!out.is_empty(), "no rule files under alerts/");
    out
}

fn rule_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(Path::new(ROOT).join("alerts"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yml" || e == "yaml")
                && !p
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .contains("alertmanager")
        })
        .collect();
    files.sort();
    files
}

/// Starts Prometheus scraping the demo's aggregator and its simulated agents, with `rules`.
fn start_prometheus(demo: &Demo, rules: &[PathBuf], dir: &TempDir) -> Prometheus {
    let scrape = format!(
        "  - job_name: commitmeter-aggregator\n    static_configs:\n      - targets: [\"{}\"]\n  \
         - job_name: commitmeter-agent\n    scrape_interval: 2s\n    scrape_timeout: 2s\n    file_sd_configs:\n      - files: [{:?}]\n        refresh_interval: 1s\n",
        demo.addr,
        demo.data.join("agents.json").display().to_string(),
    );
    Prometheus::start(&scrape, rules, dir)
}

fn firing(p: &Prometheus) -> Vec<(String, String, String)> {
    let v = api(p, "/api/v1/alerts");
    v["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == "firing")
        .map(|a| {
            let l = &a["labels"];
            let s = |k: &str| l[k].as_str().unwrap_or("").to_string();
            (s("alertname"), s("severity"), s("contract"))
        })
        .collect()
}

/// A demo story at 60x and a Prometheus scraping it with the rules compressed to match.
fn story_at_60x(story: &str, dir: &TempDir) -> (Demo, Prometheus) {
    let demo = start_demo(story, 60, dir);
    let prom = start_prometheus(&demo, &compressed_rules(dir), dir);
    (demo, prom)
}

#[test]
fn underuse_pages_through_prometheus() {
    let _serial = serial();
    let dir = TempDir::keep_on_failure("e2e-underuse");
    let (mut demo, prom) = story_at_60x("underuse", &dir);
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let f = firing(&prom);
        let paged: Vec<_> = f
            .iter()
            .filter(|(_, sev, c)| sev == "page" && c == "acme-h100-east")
            .collect();
        if paged
            .iter()
            .any(|(name, _, _)| name.to_lowercase().contains("underuse"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no underuse page for acme-h100-east; firing: {f:?}\n{}",
            demo.state()
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

#[test]
fn a_healthy_fleet_fires_nothing() {
    let _serial = serial();
    let dir = TempDir::keep_on_failure("e2e-healthy");
    let (_demo, prom) = story_at_60x("healthy", &dir);
    // As long as the underuse test takes to page, and then some: 100 simulated minutes.
    let until = Instant::now() + Duration::from_secs(100);
    // Scrape-health alerts (`up == 0` for a compressed 20 s) depend on this machine's
    // scrape timing: on a loaded 2-core CI run a series of 1 s scrapes of the debug-built
    // demo can time out. They are unit-tested with promtool; here they are reported,
    // and every other alert - all the contract and fleet alerts - must stay quiet.
    const SCRAPE_HEALTH: [&str; 3] = [
        "CommitmeterAgentDown",
        "CommitmeterAggregatorDown",
        "CommitmeterTargetDown",
    ];
    while Instant::now() < until {
        let f = firing(&prom);
        let (scrape, other): (Vec<_>, Vec<_>) = f
            .into_iter()
            .partition(|(name, _, _)| SCRAPE_HEALTH.contains(&name.as_str()));
        assert!(
            other.is_empty(),
            "alerts fired on a healthy fleet: {other:?}"
        );
        if !scrape.is_empty() {
            eprintln!("scrape-health alerts on this machine (not asserted): {scrape:?}");
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    // The rules did evaluate: the recording rules have data.
    let v = api(
        &prom,
        "/api/v1/query?query=contract%3Acommitmeter_idle_ratio%3Arate5m",
    );
    assert!(!v["data"]["result"].as_array().unwrap().is_empty(), "{v}");
}

/// The default story's GPU-use tickets through Prometheus: the GPU hung in a collective
/// (CommitmeterGPUStuck) and the 16 GPUs a job holds without using them
/// (CommitmeterGPUAllocatedIdle), each named by host and GPU; no other GPU is ever
/// ticketed, and none of the lab's A100s (no GPM) is called stuck.
#[test]
fn the_default_story_tickets_its_stuck_and_held_idle_gpus() {
    use commitmeter::demo::sim::{HELD_IDLE_HOSTS, STUCK_GPU};
    use std::collections::BTreeSet;
    let _serial = serial();
    let dir = TempDir::keep_on_failure("e2e-gpu-use");
    let (mut demo, prom) = story_at_60x("default", &dir);
    let stuck: BTreeSet<String> = [format!("{}:9473 GPU {}", STUCK_GPU.0, STUCK_GPU.1)].into();
    let held: BTreeSet<String> = HELD_IDLE_HOSTS
        .iter()
        .flat_map(|h| (0..8).map(move |g| format!("{h}:9473 GPU {g}")))
        .collect();
    // Compressed: the stuck ticket after 15 s (the hang) + 10 s (window) + 20 s (`for`),
    // the held-idle one after 60 s (`for`) on a 120 s window.
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let now_stuck = firing_gpus(&prom, "CommitmeterGPUStuck");
        let now_held = firing_gpus(&prom, "CommitmeterGPUAllocatedIdle");
        assert!(
            now_stuck.is_subset(&stuck) && now_held.is_subset(&held),
            "tickets for the wrong GPUs: stuck {now_stuck:?}, held idle {now_held:?}"
        );
        if now_stuck == stuck && now_held == held {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every ticket fired: stuck {now_stuck:?}, held idle {now_held:?}; firing: {:?}\n{}",
            firing(&prom),
            demo.state()
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// `instance GPU gpu` of every firing alert named `alertname`, with severity ticket.
fn firing_gpus(p: &Prometheus, alertname: &str) -> std::collections::BTreeSet<String> {
    let v = api(p, "/api/v1/alerts");
    v["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == "firing" && a["labels"]["alertname"] == alertname)
        .map(|a| {
            let l = &a["labels"];
            assert_eq!(l["severity"], "ticket", "{a}");
            let s = |k: &str| l[k].as_str().unwrap_or("").to_string();
            format!("{} GPU {}", s("instance"), s("gpu"))
        })
        .collect()
}

/// Every expression of every dashboard panel parses and returns data, against the
/// default story (a host down, a lost GPU, XIDs, a ramp) at 600x.
#[test]
fn every_dashboard_query_returns_data() {
    let _serial = serial();
    let dir = TempDir::keep_on_failure("e2e-dashboards");
    let demo = start_demo("default", 600, &dir);
    let prom = start_prometheus(&demo, &compressed_rules(&dir), &dir);
    // 6 simulated hours sealed (some 37 s at 600x): past the host outage, the lost GPU
    // and the ramp.
    wait_sealed_span(
        &demo.addr,
        Duration::from_secs(120),
        Duration::from_secs(6 * 3600),
    );
    // On a loaded machine scrapes can time out: wait until Prometheus has every agent.
    let deadline = Instant::now() + Duration::from_secs(60);
    while api_query(&prom, "sum(up{job=\"commitmeter-agent\"}) >= 64") != Ok(1) {
        assert!(Instant::now() < deadline, "agents not all up in Prometheus");
        std::thread::sleep(Duration::from_secs(1));
    }
    let mut exprs = Vec::new();
    for entry in std::fs::read_dir(Path::new(ROOT).join("dashboards")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            collect_exprs(&v, &path, &mut exprs);
        }
    }
    assert!(
        exprs.len() > 10,
        "too few dashboard queries: {}",
        exprs.len()
    );
    let mut failures = Vec::new();
    for (where_, expr) in &exprs {
        let q = substitute(expr);
        let v = api_query(&prom, &q);
        match v {
            Err(e) => failures.push(format!("{where_}: {q}: {e}")),
            Ok(0) => failures.push(format!("{where_}: {q}: no data")),
            Ok(_) => {}
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} queries failed:\n{}",
        failures.len(),
        exprs.len(),
        failures.join("\n")
    );
}

fn api_query(p: &Prometheus, q: &str) -> Result<usize, String> {
    let (status, body) = http_get(&p.addr, &format!("/api/v1/query?query={}", urlencode(q)));
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    if status != 200 || v["status"] != "success" {
        return Err(format!("HTTP {status}: {}", v["error"]));
    }
    Ok(match &v["data"]["result"] {
        serde_json::Value::Array(a) => a.len(),
        serde_json::Value::Null => 0,
        _ => 1,
    })
}

/// Grafana variables to what a test Prometheus understands.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("${__rate_interval}", "1m")
        .replace("$__interval", "15s")
        .replace("${__interval}", "15s")
        .replace("$__range", "1h")
        .replace("${__range}", "1h")
        .replace("${contract:regex}", ".+")
        .replace("${contract}", ".+")
        .replace("$contract", ".+")
        .replace("${instance:regex}", ".+")
        .replace("${instance}", ".+")
        .replace("$instance", ".+")
        .replace("${cluster:regex}", ".+")
        .replace("${cluster}", ".+")
        .replace("$cluster", ".+")
        .replace("${gpu:regex}", ".+")
        .replace("${gpu}", ".+")
        .replace("$gpu", ".+")
}

fn collect_exprs(v: &serde_json::Value, file: &Path, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(map) => {
            if let (Some(serde_json::Value::Array(targets)), Some(title)) =
                (map.get("targets"), map.get("title"))
            {
                for t in targets {
                    if let Some(expr) = t.get("expr").and_then(|e| e.as_str()) {
                        let name = file.file_name().unwrap().to_string_lossy();
                        out.push((
                            format!("{name} / {}", title.as_str().unwrap_or("?")),
                            expr.to_string(),
                        ));
                    }
                }
            }
            for (k, child) in map {
                if k != "targets" {
                    collect_exprs(child, file, out);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|c| collect_exprs(c, file, out)),
        _ => {}
    }
}
