//! Aggregator benchmark (not a timed test): `cargo bench --bench aggregator`.
//!
//! One process simulates N agents of 8 GPUs on loopback (a port per 10,000 agents, each
//! with its own accept loop, a metrics path per agent, listed in a file_sd file; without
//! teams each body is a copy of one exposition rendered once a second, the agent's number
//! written in, so the simulator stays cheap at 125,000 agents); the release aggregator
//! scrapes them every 15 s into one contract. After the first round and its commit (every
//! host's first checkpoint), CPU time of all its threads (/proc/PID/task/*/schedstat), RSS
//! (/proc/PID/status) and bytes written to storage (`write_bytes` of /proc/PID/io) are read
//! over `COMMITMETER_BENCH_SECS` (default 60) seconds, with the simulator's own CPU (this
//! process) beside them, the scrape phase of each round and each ledger commit's duration
//! (the aggregator's debug log), then the size of `/metrics` and of the status page. Then
//! SIGTERM: the bytes of the clean stop are the hosts' checkpoint (written once an hour
//! while running), so bytes per hour = the window's rate + one stop.
//! `COMMITMETER_BENCH_AGENTS=125000` is 1,000,000 GPUs.
//! `COMMITMETER_BENCH_AGENTS` picks the fleet sizes (default "1000,10000");
//! `COMMITMETER_BENCH_ARGS` adds aggregator flags. `COMMITMETER_BENCH_DOWN_PERCENT=10` makes
//! that share of the agents answer 503, a different share every 15 s (the worst churn for
//! the log), and reports the aggregator's log lines per minute.
//! `COMMITMETER_BENCH_INTERVAL=1140ms` sets the scrape interval (default 15s; the timeout
//! is 10 s or the interval if shorter): 9,500 agents every 1.14 s are the scrapes a second
//! of 125,000 every 15 s (8,333/s), each over a kept connection, which 125,000 agents
//! cannot all have under a 20,000 descriptor limit. Work per round (the ledger's commit,
//! the round's summary) then comes 13 times as often: an upper bound on the CPU.
//! `COMMITMETER_BENCH_TEAMS=50` gives every simulated GPU a Slurm job of one of 50
//! accounts (each GPU's owner series beside its own counters) and the contract 50
//! `[[teams]]`, one per account: the cost of showback.
//!
//! `COMMITMETER_BENCH_STATEMENTS=1` measures statements requested while the aggregator
//! commits instead: the ledger is seeded with 60 days of minutes (the renewal sizing's
//! lookback), then four windows of `COMMITMETER_BENCH_SECS` (default 180) seconds: no
//! statements; `commitmeter statement` back to back against the live ledger (a consistent
//! copy the aggregator writes after a commit); `GET /statements/sim/<month>.json` back to
//! back and the moment each round ends (its commit just queued); none again, to tell the
//! machine's drift over the run from the statements' effect. For each window: scrape
//! round durations and interval drift (the round's debug log summary), how long commits
//! waited behind statement reads and how long those reads took (the ledger writer's debug
//! log), CPU and bytes written; every statement is checked (identity on every row, totals
//! = sum of days, seeded days equal to the seed, nothing going back) and the README's
//! table row is printed.
//!
//! `COMMITMETER_BENCH_SHARDS=2 COMMITMETER_BENCH_REPLICAS=2` measures a shared book instead:
//! a real PostgreSQL (the tests' harness, tests/common/postgres.rs) with one database, the
//! release aggregators of 2 shards × 2 replicas on it (each its own data directory and
//! `[storage] postgres, password_file, shard = "i/2"`, every one given the whole fleet and
//! scraping its shard's agents), and in the same run the single SQLite aggregator over the
//! whole fleet, for reference; grace and shard_grace 30 s, so minutes seal within the run.
//! Once the book has sealed its first minute (polled with psql), over
//! `COMMITMETER_BENCH_SECS`: CPU and RSS of each aggregator, CPU (its own and its reaped
//! children's ticks, /proc/PID/stat) and memory (Σ PSS) of all PostgreSQL's processes (the
//! postmaster of the data directory's `postmaster.pid` and its children), the rows of the
//! book's growing tables (count(*) before and after), its table and index bytes
//! (`pg_total_relation_size`) and the WAL written (`pg_current_wal_lsn()` before and
//! after), per hour; then whether every replica serves the same
//! `commitmeter_contract_delivered_gpu_seconds_total` at the same
//! `commitmeter_ledger_sealed_through_timestamp_seconds`, the identity on every sealed
//! minute. Prints the README's table row.

// Tests read the clock and open SQLite as they please: clippy.toml keeps that to
// src/clock.rs and src/aggregator/store.rs in the product only.
#![allow(clippy::disallowed_methods)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use commitmeter::aggregator::store::Store;
use commitmeter::ledger::{split, Kind, Sealed, Snapshot, Totals};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use common::postgres::Postgres;
use common::*;

/// An agent's exposition: the accounting counters, the round time they belong to, plus the
/// gauges the parser skips. `start_unix` is when the simulated agents started.
fn exposition(agent: usize, start_unix: f64, elapsed: f64, teams: usize) -> String {
    let mut s = String::with_capacity(16 * 1024);
    let _ = writeln!(
        s,
        "commitmeter_agent_last_round_timestamp_seconds {:.3}\n\
         commitmeter_agent_sampled_seconds_total {:.3}\n\
         process_start_time_seconds {start_unix:.3}",
        start_unix + elapsed,
        elapsed
    );
    s.push_str("# HELP commitmeter_gpu_info GPU identity.\n# TYPE commitmeter_gpu_info gauge\n");
    for g in 0..8 {
        let _ = writeln!(s, "commitmeter_gpu_info{{busy_source=\"samples\",gpu=\"{g}\",model=\"NVIDIA H100 80GB HBM3\",pci_bus_id=\"00000000:{g:02X}:00.0\",uuid=\"GPU-{agent:08}-{g}\"}} 1");
    }
    for (name, share) in [
        ("commitmeter_gpu_observed_seconds_total", 1.0),
        ("commitmeter_gpu_busy_seconds_total", 0.6),
        ("commitmeter_gpu_allocated_seconds_total", 0.8),
        ("commitmeter_gpu_energy_joules_total", 300.0),
        ("commitmeter_gpu_utilization_ratio", 0.0),
        ("commitmeter_gpu_memory_used_bytes", 0.0),
        ("commitmeter_gpu_memory_total_bytes", 0.0),
        ("commitmeter_gpu_power_watts", 0.0),
        ("commitmeter_gpu_temperature_celsius", 0.0),
        ("commitmeter_gpu_sm_clock_hertz", 0.0),
    ] {
        let _ = writeln!(s, "# HELP {name} x\n# TYPE {name} counter");
        for g in 0..8 {
            let _ = writeln!(
                s,
                "{name}{{gpu=\"{g}\",uuid=\"GPU-{agent:08}-{g}\"}} {:.3}",
                share * elapsed
            );
        }
    }
    if teams > 0 {
        owner_series(&mut s, agent, elapsed, teams);
    }
    s
}

/// Each GPU's job: Slurm job `<agent>-<gpu>` of account `team-<k>`, holding the GPU all
/// along, busy as the GPU is; as an agent exposes them (gpu, uuid, then the owner labels).
fn owner_series(s: &mut String, agent: usize, elapsed: f64, teams: usize) {
    use commitmeter::owner::{series, OWNER_LABELS};
    let owner = |g: usize| {
        let values = [
            "slurm_job".to_string(),
            format!("{agent}{g}"),
            "alice".to_string(),
            format!("team-{}", (agent * 8 + g) % teams),
            String::new(),
            String::new(),
            String::new(),
        ];
        OWNER_LABELS
            .iter()
            .zip(values)
            .map(|(n, v)| format!(",{n}=\"{v}\""))
            .collect::<String>()
    };
    for (name, share, kind) in [
        (series::INFO, None, "gauge"),
        (series::ALLOCATED, Some(0.8), "counter"),
        (series::BUSY, Some(0.6), "counter"),
    ] {
        let _ = writeln!(s, "# HELP {name} x\n# TYPE {name} {kind}");
        for g in 0..8 {
            let value = share.map_or(1.0, |f| f * elapsed);
            let _ = writeln!(
                s,
                "{name}{{gpu=\"{g}\",uuid=\"GPU-{agent:08}-{g}\"{}}} {value:.3}",
                owner(g)
            );
        }
    }
}

/// `COMMITMETER_BENCH_INTERVAL`: the scrape interval, 15 s unless set.
fn bench_interval() -> Duration {
    std::env::var("COMMITMETER_BENCH_INTERVAL")
        .map(|v| commitmeter::configfile::parse_duration(&v).expect("COMMITMETER_BENCH_INTERVAL"))
        .unwrap_or(Duration::from_secs(15))
}

/// `COMMITMETER_BENCH_TEAMS`: 0 (no owner series, no teams) unless set.
fn bench_teams() -> usize {
    std::env::var("COMMITMETER_BENCH_TEAMS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The exposition every plain agent serves (no owner series) for one whole second of the
/// simulation, rendered once for agent [`MARK`]: each agent's copy is this body with its
/// number written over the mark (a fixed 8 digits), so serving 8,000 scrapes a second
/// costs the simulator a copy of 15 kB each rather than a render.
struct Template {
    second: u64,
    body: Vec<u8>,
    /// Where the 8 digits of the agent's number are in `body`.
    marks: Vec<usize>,
}

/// An agent number no fleet reaches, rendered as the template's agent.
const MARK: usize = 99_999_999;

impl Template {
    fn render(second: u64, start_unix: f64) -> Self {
        let body = exposition(MARK, start_unix, second as f64, 0).into_bytes();
        let needle = format!("GPU-{MARK:08}-");
        let marks = body
            .windows(needle.len())
            .enumerate()
            .filter(|(_, w)| *w == needle.as_bytes())
            .map(|(i, _)| i + 4)
            .collect();
        Self {
            second,
            body,
            marks,
        }
    }

    /// Agent `agent`'s exposition.
    fn body(&self, agent: usize) -> Vec<u8> {
        let mut b = self.body.clone();
        let digits = format!("{agent:08}");
        for &at in &self.marks {
            b[at..at + 8].copy_from_slice(digits.as_bytes());
        }
        b
    }
}

/// Serves the simulated agents on `listeners` (an accept loop each, so one loop is not what
/// limits thousands of new connections a second) on a runtime of two threads.
fn simulate(listeners: Vec<std::net::TcpListener>, start: Instant, down_percent: usize) {
    let start_unix = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as f64)
        / 1000.0;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let teams = bench_teams();
    let template = std::sync::Arc::new(std::sync::RwLock::new(std::sync::Arc::new(
        Template::render(0, start_unix),
    )));
    for listener in listeners {
        let template = template.clone();
        rt.spawn(async move {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let template = template.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let template = template.clone();
                        async move {
                            let agent: usize = req
                                .uri()
                                .path()
                                .split('/')
                                .nth(2)
                                .and_then(|n| n.parse().ok())
                                .unwrap_or(0);
                            let window = start.elapsed().as_secs() as usize / 15;
                            if down_percent > 0 && (agent + window) % (100 / down_percent) == 0 {
                                let mut r = hyper::Response::new(Full::new(Bytes::new()));
                                *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                                return Ok::<_, Infallible>(r);
                            }
                            let body = if teams > 0 {
                                // Whole ms, as a real agent's rounds.
                                let elapsed = (start.elapsed().as_millis() as f64) / 1000.0;
                                exposition(agent, start_unix, elapsed, teams).into_bytes()
                            } else {
                                // Whole seconds: an agent's counters as of its last round.
                                let second = start.elapsed().as_secs();
                                let t = template.read().unwrap().clone();
                                let t = if t.second == second {
                                    t
                                } else {
                                    let fresh =
                                        std::sync::Arc::new(Template::render(second, start_unix));
                                    let mut w = template.write().unwrap();
                                    if w.second < second {
                                        *w = fresh;
                                    }
                                    w.clone()
                                };
                                t.body(agent)
                            };
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    }
    std::mem::forget(rt);
}

/// Simulated agents per listening port.
const AGENTS_PER_PORT: usize = 10_000;

/// The simulator's listeners for `agents` agents (one port per [`AGENTS_PER_PORT`]) and
/// their ports. They listen on every address (`0.0.0.0`) so each agent can have its own
/// loopback address ([`agent_address`]): a real fleet's agents are distinct hosts, and the
/// aggregator keeps one connection per agent (per address and port) for the next round.
fn listeners(agents: usize) -> (Vec<std::net::TcpListener>, Vec<u16>) {
    (0..agents.div_ceil(AGENTS_PER_PORT).max(1))
        .map(|_| {
            let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
            let port = l.local_addr().unwrap().port();
            (l, port)
        })
        .unzip()
}

/// Agent `i`'s address: its own in 127.0.0.0/8 (all loopback on Linux), at one of the
/// simulator's `ports`.
fn agent_address(i: usize, ports: &[u16]) -> String {
    let (a, b, c) = (1 + i / 62_500, 1 + (i / 250) % 250, 1 + i % 250);
    format!("127.{a}.{b}.{c}:{}", ports[i % ports.len()])
}

/// Raises this process's descriptor limit (inherited by the aggregators it starts) to
/// hold a connection per agent on both sides: the aggregator keeps one open per agent
/// between rounds, and the simulator the other end. Root may raise the hard limit; anyone
/// else gets their hard limit, and the aggregator then pools what fits (its log says so).
fn raise_fd_limit(agents: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let want = ((agents as u64) * 2 + 65_536).min(1 << 20);
    let now = getrlimit(Resource::Nofile);
    if now.current.is_some_and(|c| c >= want) {
        return;
    }
    let raised = Rlimit {
        current: Some(want),
        maximum: Some(want.max(now.maximum.unwrap_or(want))),
    };
    if setrlimit(Resource::Nofile, raised).is_err() {
        let hard = Rlimit {
            current: now.maximum,
            maximum: now.maximum,
        };
        let _ = setrlimit(Resource::Nofile, hard);
    }
    let got = getrlimit(Resource::Nofile);
    println!(
        "descriptor limit {:?} (wanted {want} for {agents} agents)",
        got.current
    );
}

/// The aggregator's config for `agents` simulated agents on `ports` (listed in a file_sd
/// file in `dir`): one contract, `sim`, committing all their GPUs.
fn fleet_config(dir: &TempDir, ports: &[u16], agents: usize, terms: &str) -> std::path::PathBuf {
    write_sd(dir, ports, agents);
    write_config(dir, "aggregator", agents, "1m", terms, "")
}

/// The file_sd file listing the `agents` simulated agents on `ports` (an address and a
/// metrics path each).
fn write_sd(dir: &TempDir, ports: &[u16], agents: usize) {
    let groups: Vec<String> = (0..agents)
        .map(|i| format!(r#"{{"targets":["{}"],"labels":{{"provider":"sim","__metrics_path__":"/agent/{i}/metrics"}}}}"#, agent_address(i, ports)))
        .collect();
    std::fs::write(dir.path("agents.json"), format!("[{}]", groups.join(","))).unwrap();
}

/// `<name>.toml` in `dir`: the aggregator over the file_sd file [`write_sd`] wrote, with
/// `grace`, contract `sim` (plus `terms`) and `storage` (a `[storage]` table, or nothing).
fn write_config(
    dir: &TempDir,
    name: &str,
    agents: usize,
    grace: &str,
    terms: &str,
    storage: &str,
) -> std::path::PathBuf {
    let sd = dir.path("agents.json");
    let config = dir.path(&format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            r#"[aggregator]
scrape_interval = "{}ms"
scrape_timeout = "{}ms"
grace = "{grace}"

[[file_sd]]
files = ["{}"]

[[contracts]]
id = "sim"
provider = "sim"
price_per_gpu_hour = 2.0
currency = "USD"
start = "2026-01-01"
selector = '{{provider="sim"}}'
ramp = [ {{ from = "2026-01-01", gpus = {} }} ]
{terms}
{}
{storage}"#,
            bench_interval().as_millis(),
            bench_interval().min(Duration::from_secs(10)).as_millis(),
            sd.display(),
            agents * 8,
            (0..bench_teams())
                .map(|k| format!("[[teams]]\nname = \"t{k}\"\nslurm_account = \"team-{k}\"\n"))
                .collect::<String>(),
        ),
    )
    .unwrap();
    config
}

fn run(agents: usize, secs: u64, down_percent: usize) {
    let (listeners, ports) = listeners(agents);
    simulate(listeners, Instant::now(), down_percent);
    let dir = TempDir::new("bench-agg");
    let config = fleet_config(&dir, &ports, agents, "");
    // More aggregator flags, e.g. `--storage.host-checkpoint-interval=0s`.
    let extra: Vec<String> = std::env::var("COMMITMETER_BENCH_ARGS")
        .map(|a| a.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let agg = start_logged(&config, &dir.path("data"), &extra);
    let pid = agg.child.id();
    let up = |m: &Metrics| {
        m.series("commitmeter_target_up")
            .iter()
            .filter(|(_, v)| *v == 1.0)
            .count()
    };
    // The first round's summary (from the log: polling `/metrics` of 125,000 targets
    // would load the machine being measured).
    wait_until(
        Duration::from_secs(120 + agents as u64 / 500),
        || format!("all targets scraped; log:\n{}", agg.log_text()),
        || {
            events(&agg.log, "scrape round")
                .iter()
                .any(|(_, l)| {
                    field(l, "targets") == Some(agents as i64)
                        && (down_percent > 0 || field(l, "up") == Some(agents as i64))
                })
                .then_some(())
        },
    );
    // The write after the first round holds every host's first checkpoint (then hourly):
    // let it land before the window opens.
    wait_until(
        Duration::from_secs(300),
        || format!("the first checkpoint written; log:\n{}", agg.log_text()),
        || (!events(&agg.log, "ledger commit").is_empty()).then_some(()),
    );
    std::thread::sleep(Duration::from_secs(20));
    let checkpoint_ms = events(&agg.log, "ledger commit")
        .first()
        .and_then(|(_, l)| field(l, "took_ms"))
        .unwrap_or(0);
    let lines0 = agg.log.lock().unwrap().len();
    let cpu0 = cpu_ns(pid);
    let sim0 = cpu_ticks(std::process::id());
    let written0 = write_bytes(pid).unwrap();
    let from_ms = unix_ms();
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let cpu = (cpu_ns(pid) - cpu0) as f64 / 1e9;
    let sim = (cpu_ticks(std::process::id()) - sim0) as f64 / 100.0;
    let written = write_bytes(pid).unwrap() - written0;
    let wall = start.elapsed().as_secs_f64();
    let to_ms = unix_ms();
    let (rss, hwm) = (status_kb(pid, "VmRSS:"), status_kb(pid, "VmHWM:"));
    // Log lines a person reads: the debug lines the bench asked for (every round's
    // summary, every commit) are not counted.
    let lines = agg.log.lock().unwrap()[lines0..]
        .iter()
        .filter(|l| l.split_whitespace().nth(1) != Some("DEBUG"))
        .count();
    let within = |at: &i64| (from_ms..to_ms).contains(at);
    let rounds: Vec<i64> = events(&agg.log, "scrape round")
        .into_iter()
        .filter(|(at, _)| within(at))
        .filter_map(|(_, l)| field(&l, "took_ms"))
        .collect();
    let commits: Vec<i64> = events(&agg.log, "ledger commit")
        .into_iter()
        .filter(|(at, _)| within(at))
        .filter_map(|(_, l)| field(&l, "took_ms"))
        .collect();
    let t = Instant::now();
    let (status, body) = http_get(&agg.addr, "/metrics");
    let metrics_ms = t.elapsed().as_millis();
    assert_eq!(status, 200, "/metrics");
    let metrics_bytes = body.len();
    let m = Metrics::parse(&body);
    drop(body);
    let t = Instant::now();
    let (status, page) = http_get(&agg.addr, "/");
    let page_ms = t.elapsed().as_millis();
    assert_eq!(status, 200, "/");
    let rejected: f64 = m
        .series("commitmeter_ledger_rejected_gpu_seconds_total")
        .iter()
        .map(|(_, v)| v)
        .sum();
    let targets_up = up(&m);
    let kept = m.get("commitmeter_scrape_connections", &[]).unwrap_or(0.0);
    drop(m);
    // Team and contract time count sealed minutes only (grace 1m): after the window, wait
    // for one with allocated time, so the team figures below are never of an empty ledger.
    let m = wait_until(
        Duration::from_secs(180),
        || {
            format!(
                "a sealed minute with allocated time; log:\n{}",
                agg.log_text()
            )
        },
        || {
            std::thread::sleep(Duration::from_secs(5));
            Some(agg.metrics()).filter(|m| {
                m.get(
                    "commitmeter_contract_allocated_gpu_seconds_total",
                    &[("contract", "sim")],
                )
                .is_some_and(|v| v > 0.0)
            })
        },
    );
    let teams = m.series("commitmeter_team_allocated_gpu_seconds_total");
    let team_sum: f64 = teams.iter().map(|(_, v)| v).sum();
    let allocated = m
        .get(
            "commitmeter_contract_allocated_gpu_seconds_total",
            &[("contract", "sim")],
        )
        .unwrap_or(0.0);
    let same_ms = (team_sum * 1000.0).round() == (allocated * 1000.0).round();
    // The clean stop writes every host's checkpoint: its bytes, read until the process
    // is gone (the last reading before exit).
    let mut agg = agg;
    let before_stop = write_bytes(pid).unwrap();
    let stopping = Instant::now();
    signal(pid, "-TERM");
    let mut at_stop = before_stop;
    while let Some(b) = write_bytes(pid) {
        at_stop = at_stop.max(b);
        if agg.child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let stop_ms = stopping.elapsed().as_millis();
    let stop = at_stop - before_stop;
    let per_min = written as f64 / wall * 60.0;
    println!(
        "aggregator: {agents} agents x 8 GPUs (an address each) on {} ports, scraped every {} ms ({:.0} scrapes/s), {wall:.0} s: CPU {:.1}% of one core (the simulator: {:.1}%), RSS {rss} kB, peak RSS {hwm} kB, {targets_up} targets up ({kept} connections kept for the next round), {rejected} GPU-s rejected; \
         {} rounds, scrape phase p50/max {}/{} ms; {} commits, took p50/max {}/{} ms, the first (every host's checkpoint) {checkpoint_ms} ms; \
         written {:.3} MB/min (rounds), host checkpoint at stop {:.2} MB (stop took {stop_ms} ms), so {:.1} MB/h with hourly host checkpoints ({:.3} MB/min); \
         /metrics {:.1} MB in {metrics_ms} ms, status page {:.1} MB in {page_ms} ms; \
         {down_percent}% down (rotating every 15 s): {:.1} log lines/min; \
         {} teams with time, allocated {allocated:.3} GPU-s, over the teams {team_sum:.3} (equal to the GPU-ms: {})",
        ports.len(),
        bench_interval().as_millis(),
        agents as f64 / bench_interval().as_secs_f64(),
        cpu / wall * 100.0,
        sim / wall * 100.0,
        rounds.len(),
        pct(&rounds, 50),
        pct(&rounds, 100),
        commits.len(),
        pct(&commits, 50),
        pct(&commits, 100),
        per_min / 1e6,
        stop as f64 / 1e6,
        (per_min * 60.0 + stop as f64) / 1e6,
        (per_min * 60.0 + stop as f64) / 60.0 / 1e6,
        metrics_bytes as f64 / 1e6,
        page.len() as f64 / 1e6,
        lines as f64 / wall * 60.0,
        teams.len(),
        same_ms,
    );
    assert!(
        same_ms,
        "the teams' allocated time does not sum to the contract's"
    );
}

// ---- COMMITMETER_BENCH_STATEMENTS=1: statements requested while the aggregator commits ----

/// Days of sealed minutes seeded before the aggregator starts: the renewal sizing's longest
/// lookback, so a statement reads the period and 60 days before now (~86,000 minutes).
const SEED_DAYS: i64 = 60;

/// A seeded minute of `gpus` committed GPUs, in integer GPU-ms: delivery a fiftieth short
/// for 3 minutes in 211, a twentieth over for 1 (overage); usage on a daily cycle, 45 % of
/// delivered at midnight to 95 % at noon. Split by the ledger's own rule, so every minute
/// satisfies the identity; the bench's independent truth for the seeded days.
fn seeded(minute: i64, gpus: i64) -> Totals {
    let committed = gpus * 60_000;
    let day = minute.rem_euclid(1440);
    let cycle = 1000 - (day - 720).abs() * 1000 / 720;
    let delivered = match minute.rem_euclid(211) {
        0..=2 => committed - gpus / 50 * 60_000,
        3 => committed + gpus / 20 * 60_000,
        _ => committed,
    };
    let used = delivered / 1000 * (450 + cycle / 2);
    split(committed, delivered, used, 0, false)
}

/// Writes `SEED_DAYS` of sealed minutes `[to − SEED_DAYS days, to)` of contract `sim` into a
/// new ledger in `data` through the store (one commit), as an aggregator that ran for two
/// months would have left them. Returns the first seeded minute.
fn seed(data: &std::path::Path, gpus: i64, to: i64) -> i64 {
    let from = to - SEED_DAYS * 1440;
    let sealed: Vec<Sealed> = (from..to)
        .map(|minute| Sealed {
            contract: 0,
            minute,
            totals: seeded(minute, gpus),
            ..Sealed::default()
        })
        .collect();
    let mut store = Store::open(data).expect("open the bench's ledger");
    let snap = Snapshot {
        since: from,
        sealed_through: to,
        late: vec![(0, 0)],
        ..Snapshot::default()
    };
    store
        .commit(&["sim".to_string()], &sealed, &snap)
        .expect("seed the ledger");
    from
}

/// The aggregator, logging every scrape round's summary and every ledger-writer job (debug).
fn start_logged(config: &std::path::Path, data: &std::path::Path, extra: &[String]) -> Aggregator {
    let mut child = std::process::Command::new(BIN)
        .arg("aggregator")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.path={}", data.display()))
        .arg("--web.listen-address=127.0.0.1:0")
        .arg("--log.level=info,commitmeter::aggregator::round=debug,commitmeter::aggregator::writer=debug")
        .arg(JSON_LOG)
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start commitmeter aggregator");
    let (addr, log) = follow_log(&mut child);
    Aggregator { child, addr, log }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Log events with `message`: (wall time in ms, the rendered line).
fn events(log: &Log, message: &str) -> Vec<(i64, String)> {
    let needle = format!(": {message} ");
    log.lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(&needle))
        .filter_map(|l| {
            let at: jiff::Timestamp = l.split_whitespace().next()?.parse().ok()?;
            Some((at.as_millisecond(), l.clone()))
        })
        .collect()
}

/// The integer field `key` of a rendered log line.
fn field(line: &str, key: &str) -> Option<i64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// Nearest-rank percentile `p` (0–100) of `v`; 0 when empty.
fn pct(v: &[i64], p: usize) -> i64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    match v.len() {
        0 => 0,
        n => v[((n * p).div_ceil(100)).clamp(1, n) - 1],
    }
}

/// One measuring window: its wall-clock span, the aggregator's CPU and bytes written, and
/// the statements fetched in it (JSON) with how long each took to come back.
struct Window {
    name: &'static str,
    from_ms: i64,
    to_ms: i64,
    cpu_s: f64,
    written: u64,
    /// The distinct statements fetched (a body seen before is not kept again).
    docs: Vec<serde_json::Value>,
    /// How long each fetch took, one per statement fetched.
    fetch_ms: Vec<i64>,
}

/// Statements asked of the running aggregator for `secs`: `name` is `"cli"` (back to back,
/// `commitmeter statement` against the live ledger) or `"http"` (one client back to back,
/// one more that asks the moment a scrape round ends, when its commit is handed to the
/// writer), or anything else for none.
fn window(agg: &Aggregator, name: &'static str, secs: u64, cli: &[String], period: &str) -> Window {
    let pid = agg.child.id();
    let (cpu0, written0) = (cpu_ticks(pid), write_bytes(pid).unwrap());
    let from_ms = unix_ms();
    let deadline = Instant::now() + Duration::from_secs(secs);
    // Each statement's fetch time, and its document when its body is new: the aggregator
    // serves the same body until its next write, and a back-to-back client gets thousands.
    let fetched: Mutex<Vec<(Option<serde_json::Value>, i64)>> = Mutex::default();
    let bodies: Mutex<std::collections::HashSet<u64>> = Mutex::default();
    let new_body = |body: &str| {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let h = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .hash_one(body);
        bodies.lock().unwrap().insert(h)
    };
    let parse = |body: &str, what: &str| -> serde_json::Value {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {body}"))
    };
    match name {
        "cli" => {
            while Instant::now() < deadline {
                let t = Instant::now();
                let out = std::process::Command::new(BIN)
                    .args(cli)
                    .output()
                    .expect("run commitmeter statement");
                assert!(
                    out.status.success(),
                    "commitmeter statement: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let body = String::from_utf8_lossy(&out.stdout);
                let doc = new_body(&body).then(|| parse(&body, "commitmeter statement"));
                fetched
                    .lock()
                    .unwrap()
                    .push((doc, t.elapsed().as_millis() as i64));
            }
        }
        "http" => {
            let path = format!("/statements/sim/{period}.json");
            let get = || {
                let t = Instant::now();
                let (status, body) = http_get(&agg.addr, &path);
                assert_eq!(status, 200, "GET {path}: {body}");
                let doc = new_body(&body).then(|| parse(&body, &path));
                fetched
                    .lock()
                    .unwrap()
                    .push((doc, t.elapsed().as_millis() as i64));
            };
            std::thread::scope(|s| {
                s.spawn(|| {
                    while Instant::now() < deadline {
                        get();
                    }
                });
                s.spawn(|| {
                    let rounds = |log: &Log| {
                        log.lock()
                            .unwrap()
                            .iter()
                            .filter(|l| l.contains(": scrape round "))
                            .count()
                    };
                    let mut seen = rounds(&agg.log);
                    while Instant::now() < deadline {
                        let now = rounds(&agg.log);
                        if now > seen {
                            seen = now;
                            get();
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                });
            });
        }
        _ => std::thread::sleep(Duration::from_secs(secs)),
    }
    let fetched = fetched.into_inner().unwrap();
    Window {
        name,
        from_ms,
        to_ms: unix_ms(),
        cpu_s: (cpu_ticks(pid) - cpu0) as f64 / 100.0,
        written: write_bytes(pid).unwrap() - written0,
        fetch_ms: fetched.iter().map(|f| f.1).collect(),
        docs: fetched.into_iter().filter_map(|f| f.0).collect(),
    }
}

/// CPU time of process `pid`, its exited threads included, in clock ticks (10 ms): user
/// and system time of /proc/PID/stat. The sum over /proc/PID/task/* loses the time of a
/// thread that exits, and the runtime's blocking threads (a statement is built on one) exit
/// after 10 s idle.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name (in parentheses): state is the first, utime the 12th.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|v| v.parse().unwrap())
        .collect();
    f[0] + f[1]
}

/// A statement row's figures, its accounted minutes, whether it says the identity holds,
/// and the late GPU-ms (delivered, used) that arrived for it.
fn row(r: &serde_json::Value) -> (String, Totals, i64, bool, (i64, i64)) {
    let mut t = Totals::default();
    for k in r["kinds"].as_array().expect("kinds") {
        let kind = Kind::from_name(k["kind"].as_str().unwrap()).expect("a ledger kind");
        t[kind] = k["gpu_ms"].as_i64().expect("integer GPU-ms");
    }
    (
        r["day"].as_str().unwrap().to_string(),
        t,
        r["minutes_accounted"].as_i64().unwrap(),
        r["identity_holds"].as_bool() == Some(true),
        (
            r["late"]["delivered_gpu_ms"]
                .as_i64()
                .expect("late delivered GPU-ms"),
            r["late"]["used_gpu_ms"].as_i64().expect("late used GPU-ms"),
        ),
    )
}

/// A statement's days by label: figures, minutes accounted and late GPU-ms.
type Days = std::collections::BTreeMap<String, (Totals, i64, (i64, i64))>;

/// Checks every statement: the identity on every row (and the row saying so), no negative
/// figure, used within delivered; the total the sum of its days, kind by kind and in
/// minutes and late GPU-ms; every day wholly inside the seeded minutes equal to the seed, to
/// the GPU-ms. Then, ordered by accounted minutes (the ledger only ever adds sealed minutes
/// and late GPU-ms), no figure of any day goes back from one statement to the next, and a day
/// with the same minutes accounted has the same figures. Returns the days compared with the
/// seed.
fn check_statements(docs: &[&serde_json::Value], gpus: i64, seed: (i64, i64)) -> usize {
    let mut seed_days = 0;
    // Per statement: its minutes accounted, and per day the figures and minutes accounted.
    let mut days_of: Vec<(i64, Days)> = Vec::new();
    for doc in docs {
        let mut sum = Totals::default();
        let mut minutes = 0;
        let mut late_sum = (0, 0);
        let mut days = std::collections::BTreeMap::new();
        for r in doc["days"].as_array().expect("days") {
            let (day, t, accounted, holds, late) = row(r);
            let identity = t.used_within() + t.idle + t.undelivered + t.unreported == t.committed;
            assert!(identity && holds, "identity broken on {day}: {t:?}");
            assert!(
                t.values().iter().all(|v| *v >= 0) && t.used <= t.delivered && t.overage <= t.used,
                "{day}: {t:?}"
            );
            sum.add(&t);
            minutes += accounted;
            late_sum = (late_sum.0 + late.0, late_sum.1 + late.1);
            let date: jiff::civil::Date = day.parse().expect("a day's label is its date");
            let start = date
                .to_zoned_datetime(jiff::tz::TimeZone::UTC)
                .unwrap()
                .timestamp()
                .as_millisecond()
                / 60_000;
            if start >= seed.0 && start + 1440 <= seed.1 {
                let mut want = Totals::default();
                for m in start..start + 1440 {
                    want.add(&seeded(m, gpus));
                }
                assert_eq!(
                    t, want,
                    "{day}: the statement differs from the seeded minutes"
                );
                seed_days += 1;
            }
            days.insert(day, (t, accounted, late));
        }
        let (_, total, accounted, holds, late) = row(&doc["total"]);
        assert!(holds, "identity broken on the total: {total:?}");
        assert_eq!(total, sum, "the total is not the sum of the days");
        assert_eq!(accounted, minutes, "the total's minutes are not the days'");
        assert_eq!(late, late_sum, "the total's late GPU-ms are not the days'");
        days_of.push((minutes, days));
    }
    days_of.sort_by_key(|d| d.0);
    for pair in days_of.windows(2) {
        let (before, after) = (&pair[0].1, &pair[1].1);
        for (day, (t0, m0, l0)) in before {
            let (t1, m1, l1) = after
                .get(day)
                .unwrap_or_else(|| panic!("{day} gone from a later statement"));
            assert!(m1 >= m0, "{day}: accounted minutes went back");
            assert!(l1.0 >= l0.0 && l1.1 >= l0.1, "{day}: late GPU-ms went back");
            for k in Kind::ALL {
                assert!(
                    t1[k] >= t0[k],
                    "{day}: {k} went back from {} to {} GPU-ms",
                    t0[k],
                    t1[k]
                );
            }
            if m1 == m0 {
                assert_eq!(t1, t0, "{day}: the same minutes with other figures");
            }
        }
    }
    seed_days
}

/// What one window measured: scrape rounds, writer jobs (ms) and statements.
struct Summary {
    /// The scrape phase of each round (`took_ms` of its summary).
    rounds: Vec<i64>,
    /// How far the time between two rounds' starts strayed from the scrape interval.
    drift: Vec<i64>,
    cpu_percent: f64,
    written_mb_min: f64,
    commit_wait: Vec<i64>,
    commit_took: Vec<i64>,
    read_wait: Vec<i64>,
    read_took: Vec<i64>,
    read_rows: Vec<i64>,
    /// The CLI's consistent copies (`ledger backed up`).
    copies: Vec<i64>,
}

fn summarize(log: &Log, w: &Window, interval_ms: i64) -> Summary {
    let within = |at: &i64| (w.from_ms..w.to_ms).contains(at);
    let rounds: Vec<(i64, i64)> = events(log, "scrape round")
        .into_iter()
        .filter(|(at, _)| within(at))
        .map(|(at, l)| (at, field(&l, "took_ms").expect("took_ms")))
        .collect();
    let jobs = |message: &str, key: &str| -> Vec<i64> {
        events(log, message)
            .into_iter()
            .filter(|(at, _)| within(at))
            .filter_map(|(_, l)| field(&l, key))
            .collect()
    };
    let wall = (w.to_ms - w.from_ms) as f64 / 1000.0;
    Summary {
        rounds: rounds.iter().map(|r| r.1).collect(),
        // A round's start: its summary's time less its duration.
        drift: rounds
            .windows(2)
            .map(|p| ((p[1].0 - p[1].1) - (p[0].0 - p[0].1) - interval_ms).abs())
            .collect(),
        cpu_percent: w.cpu_s / wall * 100.0,
        written_mb_min: w.written as f64 / wall * 60.0 / 1e6,
        commit_wait: jobs("ledger commit", "waited_ms"),
        commit_took: jobs("ledger commit", "took_ms"),
        read_wait: jobs("ledger read", "waited_ms"),
        read_took: jobs("ledger read", "took_ms"),
        read_rows: jobs("ledger read", "rows"),
        copies: jobs("ledger backed up", "ms"),
    }
}

/// `p50/p99/max` of `v`.
fn spread(v: &[i64]) -> String {
    format!("{}/{}/{}", pct(v, 50), pct(v, 99), pct(v, 100))
}

/// One window's figures in full, for the bench's output.
fn detail(w: &Window, s: &Summary) -> String {
    let mut line = format!(
        "{}: {} rounds, scrape phase p50/p99/max {} ms, interval drift max {} ms; CPU {:.1} % of one core; written {:.1} MB/min; \
         {} commits, waited p50/max {}/{} ms ({} waited ≥ 1 ms), took p50/max {}/{} ms",
        w.name,
        s.rounds.len(),
        spread(&s.rounds),
        pct(&s.drift, 100),
        s.cpu_percent,
        s.written_mb_min,
        s.commit_wait.len(),
        pct(&s.commit_wait, 50),
        pct(&s.commit_wait, 100),
        s.commit_wait.iter().filter(|w| **w >= 1).count(),
        pct(&s.commit_took, 50),
        pct(&s.commit_took, 100),
    );
    if !w.fetch_ms.is_empty() {
        let _ = write!(
            line,
            "; {} statements ({} distinct), fetched in p50/max {}/{} ms",
            w.fetch_ms.len(),
            w.docs.len(),
            pct(&w.fetch_ms, 50),
            pct(&w.fetch_ms, 100)
        );
    }
    if !s.read_took.is_empty() {
        let _ = write!(
            line,
            "; {} writer reads of {}–{} minutes, took p50/p99/max {} ms, waited in the writer's queue max {} ms ({} waited ≥ 1 ms)",
            s.read_took.len(),
            pct(&s.read_rows, 0),
            pct(&s.read_rows, 100),
            spread(&s.read_took),
            pct(&s.read_wait, 100),
            s.read_wait.iter().filter(|w| **w >= 1).count(),
        );
    }
    if !s.copies.is_empty() {
        let _ = write!(
            line,
            "; {} consistent copies for the CLI (VACUUM INTO on the writer thread, after a commit), p50/max {}/{} ms",
            s.copies.len(),
            pct(&s.copies, 50),
            pct(&s.copies, 100)
        );
    }
    line
}

/// The README's table row of a run: `w` and `s` are the windows none, CLI, HTTP, none.
fn table_row(agents: usize, secs: u64, w: &[Window], s: &[Summary], seed_days: usize) -> String {
    let rounds: Vec<String> = w
        .iter()
        .zip(s)
        .map(|(w, s)| {
            format!(
                "{} {} ms, drift ≤ {} ms",
                w.name,
                spread(&s.rounds),
                pct(&s.drift, 100)
            )
        })
        .collect();
    let cpu: Vec<String> = s.iter().map(|s| format!("{:.1}", s.cpu_percent)).collect();
    let statements: usize = w.iter().map(|w| w.fetch_ms.len()).sum();
    let distinct: usize = w.iter().map(|w| w.docs.len()).sum();
    let (cli, http) = (&s[1], &s[2]);
    format!(
        "| aggregator, {} agents, statements requested mid-commit | `COMMITMETER_BENCH_STATEMENTS=1 COMMITMETER_BENCH_AGENTS={agents} cargo bench --bench aggregator` (prints this row): the ledger seeded with {SEED_DAYS} days of minutes (a statement reads ~86,400), then four {secs} s windows: none; `commitmeter statement --format=json` back to back; `GET /statements/sim/<month>.json` back to back plus one the moment each round ends, as its commit is queued; none again (the machine's drift over the run). Round figures from the `scrape round` log summaries, writer jobs from the writer's debug log (`ledger commit`, `ledger read`: waited, took) | scrape phase of a round p50/p99/max: {}. HTTP: {} statements ({:.1}/s), each new one (one per ledger write and minute; the others served from the aggregator's cache) a writer read of {} minutes in p50/p99/max {} ms; a commit waited behind one p50/max {}/{} ms. CLI: {} statements (each waits for the next commit), its copy (VACUUM INTO on the writer, after a commit) p50/max {}/{} ms, {:.1} MB/min written. Aggregator CPU {} % of one core. All {statements} statements consistent ({distinct} distinct bodies checked: identity on every row, totals = sum of days, {seed_days} seeded day rows equal to the seed to the GPU-ms, nothing went back) | rounds no slower with statements; a commit waits for one read at most |",
        thousands(agents),
        rounds.join("; "),
        w[2].fetch_ms.len(),
        w[2].fetch_ms.len() as f64 / ((w[2].to_ms - w[2].from_ms) as f64 / 1000.0),
        pct(&http.read_rows, 100),
        spread(&http.read_took),
        pct(&http.commit_wait, 50),
        pct(&http.commit_wait, 100),
        w[1].fetch_ms.len(),
        pct(&cli.copies, 50),
        pct(&cli.copies, 100),
        cli.written_mb_min,
        cpu.join(" / "),
    )
}

/// `COMMITMETER_BENCH_STATEMENTS=1`: a ledger seeded with 60 days of minutes, the
/// aggregator scraping `agents` agents on it, and four windows of `secs`: no statements,
/// `commitmeter statement` back to back, `GET /statements/…` back to back (and at each
/// round's end), none again. Prints each window's figures, then the README's table row.
fn run_statements(agents: usize, secs: u64) {
    let (listeners, ports) = listeners(agents);
    simulate(listeners, Instant::now(), 0);
    let dir = TempDir::new("bench-statements");
    let config = fleet_config(&dir, &ports, agents, "on_demand_price_per_gpu_hour = 4.0");
    let data = dir.path("data");
    let gpus = agents as i64 * 8;
    let now_ms = unix_ms();
    let seed_to = now_ms / 60_000 - 2;
    let seed_from = seed(&data, gpus, seed_to);
    let period = jiff::Timestamp::from_millisecond(now_ms)
        .unwrap()
        .strftime("%Y-%m")
        .to_string();
    let agg = start_logged(&config, &data, &[]);
    agg.wait_for(Duration::from_secs(120), "all targets scraped", |m| {
        m.series("commitmeter_target_up")
            .iter()
            .filter(|(_, v)| *v == 1.0)
            .count()
            == agents
    });
    std::thread::sleep(Duration::from_secs(20));
    let cli: Vec<String> = vec![
        "statement".into(),
        format!("--config.file={}", config.display()),
        format!("--storage.path={}", data.display()),
        "--contract=sim".into(),
        format!("--period={period}"),
        "--format=json".into(),
    ];
    let windows: Vec<Window> = ["none", "cli", "http", "none again"]
        .into_iter()
        .map(|name| window(&agg, name, secs, &cli, &period))
        .collect();
    let docs: Vec<&serde_json::Value> = windows.iter().flat_map(|w| &w.docs).collect();
    let seed_days = check_statements(&docs, gpus, (seed_from, seed_to));
    let summaries: Vec<Summary> = windows
        .iter()
        .map(|w| summarize(&agg.log, w, 15_000))
        .collect();
    for (w, s) in windows.iter().zip(&summaries) {
        println!(
            "statements, {agents} agents x 8 GPUs, {secs} s: {}",
            detail(w, s)
        );
    }
    println!(
        "statements: all {} distinct bodies consistent (identity on every row, totals = sum of days, nothing went back; {seed_days} seeded day rows equal the seed to the GPU-ms)",
        docs.len()
    );
    println!(
        "{}",
        table_row(agents, secs, &windows, &summaries, seed_days)
    );
}

// ---- COMMITMETER_BENCH_SHARDS / _REPLICAS: a shared book on PostgreSQL ----

/// The book's tables that grow with time (a row per contract and minute, and per shard or
/// team): their rows are what the bench counts.
const BOOK_TABLES: [&str; 4] = [
    "contributions",
    "contribution_teams",
    "sealed_minutes",
    "sealed_teams",
];

/// Process `pid`'s parent and its CPU ticks (1/100 s): its own and those of its children it
/// has reaped (utime, stime, cutime, cstime of /proc/PID/stat); `None` once it is gone.
fn proc_stat(pid: u32) -> Option<(u32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (in parentheses): state, ppid, … utime is the 12th.
    let f: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    let ppid = f.get(1)?.parse().ok()?;
    let ticks = (11..15)
        .map(|i| f.get(i)?.parse::<u64>().ok())
        .sum::<Option<u64>>()?;
    Some((ppid, ticks))
}

/// PostgreSQL's processes now: the postmaster and its children (backends, checkpointer,
/// WAL writer, autovacuum, …).
fn server_processes(postmaster: u32) -> Vec<u32> {
    let mut pids = vec![postmaster];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if proc_stat(pid).is_some_and(|(ppid, _)| ppid == postmaster) {
            pids.push(pid);
        }
    }
    pids
}

/// CPU ticks of the whole server: each live process's own and its reaped children's, so a
/// backend that ended in the window still counts (in the postmaster's cutime).
fn server_ticks(postmaster: u32) -> u64 {
    server_processes(postmaster)
        .into_iter()
        .filter_map(proc_stat)
        .map(|(_, t)| t)
        .sum()
}

/// A `kB` field of a /proc file (`Pss:` of smaps_rollup, `VmRSS:` of status); 0 if gone.
fn kb_field(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Memory of the whole server, kB: (Σ PSS, Σ RSS). PSS shares the shared buffers out among
/// the processes that touched them; Σ RSS counts them once per process.
fn server_memory_kb(postmaster: u32) -> (u64, u64) {
    server_processes(postmaster)
        .into_iter()
        .fold((0, 0), |(pss, rss), pid| {
            (
                pss + kb_field(&format!("/proc/{pid}/smaps_rollup"), "Pss:"),
                rss + kb_field(&format!("/proc/{pid}/status"), "VmRSS:"),
            )
        })
}

/// What the book holds at one moment.
struct BookState {
    /// Rows of each of [`BOOK_TABLES`].
    rows: Vec<i64>,
    /// `pg_total_relation_size` (heap, indexes, TOAST) of every table of the book.
    bytes: i64,
    /// `pg_current_wal_lsn()`: WAL written so far (the whole server: only the book uses it).
    lsn: String,
}

fn book_state(pg: &Postgres, db: &str) -> BookState {
    let counts: Vec<String> = BOOK_TABLES
        .iter()
        .map(|t| format!("(SELECT count(*) FROM {t})"))
        .collect();
    let row = pg.psql(
        db,
        &format!(
            "SELECT {}, (SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'public' AND c.relkind = 'r'), pg_current_wal_lsn()",
            counts.join(", ")
        ),
    );
    let f: Vec<&str> = row.split('|').collect();
    assert_eq!(f.len(), BOOK_TABLES.len() + 2, "the book's state: {row}");
    BookState {
        rows: f[..BOOK_TABLES.len()]
            .iter()
            .map(|v| v.parse().unwrap())
            .collect(),
        bytes: f[BOOK_TABLES.len()].parse().unwrap(),
        lsn: f[BOOK_TABLES.len() + 1].to_string(),
    }
}

/// The first `scrape round` summary of `agg` in which every target it scrapes was up: how
/// many it scrapes.
fn first_full_round(agg: &Aggregator, name: &str, within: Duration) -> i64 {
    wait_until(
        within,
        || format!("{name}'s targets all scraped; log:\n{}", agg.log_text()),
        || {
            events(&agg.log, "scrape round").iter().find_map(|(_, l)| {
                let targets = field(l, "targets")?;
                (targets > 0 && field(l, "up") == Some(targets)).then_some(targets)
            })
        },
    )
}

/// `COMMITMETER_BENCH_SHARDS` × `COMMITMETER_BENCH_REPLICAS`: a real PostgreSQL with one
/// database, the aggregators of `shards` shards × `replicas` replicas on it (each its own
/// data directory, the whole fleet listed, each scraping its shard's agents), and beside
/// them in the same run the single SQLite aggregator over the whole fleet. Graces are
/// short (grace 30 s, shard_grace 30 s), so minutes seal within the run. After the book
/// has sealed its first minute, over `secs`: CPU and RSS of each aggregator and of
/// PostgreSQL (all its processes), the book's rows, table bytes and WAL; then whether every
/// replica serves the same contract counters at the same sealed-through time. Prints the
/// README's table row.
fn run_shared(agents: usize, secs: u64, shards: u32, replicas: u32) {
    let (listeners, ports) = listeners(agents);
    simulate(listeners, Instant::now(), 0);
    let pg = Postgres::start();
    let db = "bench";
    let url = pg.database(db);
    let password = pg.password_file();
    let postmaster: u32 = {
        let data = pg.psql(db, "SHOW data_directory");
        let pid = std::fs::read_to_string(std::path::Path::new(&data).join("postmaster.pid"))
            .expect("the server's postmaster.pid");
        pid.lines().next().unwrap().trim().parse().unwrap()
    };
    let dir = TempDir::new("bench-shared");
    write_sd(&dir, &ports, agents);
    let extra: Vec<String> = std::env::var("COMMITMETER_BENCH_ARGS")
        .map(|a| a.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let reference = start_logged(
        &write_config(&dir, "reference", agents, "30s", "", ""),
        &dir.path("reference"),
        &extra,
    );
    let mut names = vec!["SQLite".to_string()];
    let mut aggs = vec![reference];
    for s in 0..shards {
        let storage = format!(
            "[storage]\npostgres = \"{url}\"\npassword_file = \"{}\"\nshard = \"{s}/{shards}\"\nshard_grace = \"30s\"\n",
            password.display()
        );
        let config = write_config(&dir, &format!("shard{s}"), agents, "30s", "", &storage);
        for r in 0..replicas {
            names.push(format!("shard {s} replica {r}"));
            aggs.push(start_logged(
                &config,
                &dir.path(&format!("shard{s}-replica{r}")),
                &extra,
            ));
        }
    }
    let within = Duration::from_secs(120 + agents as u64 / 500);
    let targets: Vec<i64> = aggs
        .iter()
        .zip(&names)
        .map(|(a, n)| first_full_round(a, n, within))
        .collect();
    assert_eq!(targets[0], agents as i64, "the SQLite aggregator's targets");
    // Every replica of a shard scrapes the same agents; the shards together, the fleet.
    let per_shard: Vec<&[i64]> = targets[1..].chunks(replicas as usize).collect();
    assert!(
        per_shard.iter().all(|r| r.iter().all(|t| *t == r[0])),
        "replicas of a shard scrape different numbers of agents: {targets:?}"
    );
    let covered: i64 = per_shard.iter().map(|r| r[0]).sum();
    assert_eq!(covered, agents as i64, "the shards' agents: {targets:?}");
    // Warm up until the book has sealed its first minute (minutes seal grace + shard_grace
    // after their end at the latest).
    let sealed = || -> i64 {
        pg.psql(db, "SELECT count(*) FROM sealed_minutes")
            .parse()
            .unwrap()
    };
    wait_until(
        Duration::from_secs(360),
        || {
            format!(
                "the book's first sealed minute; shard 0's log:\n{}",
                aggs[1].log_text()
            )
        },
        || {
            std::thread::sleep(Duration::from_secs(2));
            (sealed() > 0).then_some(())
        },
    );

    let pids: Vec<u32> = aggs.iter().map(|a| a.child.id()).collect();
    let book0 = book_state(&pg, db);
    let book_from = Instant::now();
    let cpu0: Vec<u64> = pids.iter().map(|p| cpu_ns(*p)).collect();
    let written0: Vec<u64> = pids.iter().map(|p| write_bytes(*p).unwrap()).collect();
    let pg0 = server_ticks(postmaster);
    let sim0 = cpu_ticks(std::process::id());
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let cpu: Vec<f64> = pids
        .iter()
        .zip(&cpu0)
        .map(|(p, c)| (cpu_ns(*p) - c) as f64 / 1e9)
        .collect();
    let pg_cpu = (server_ticks(postmaster) - pg0) as f64 / 100.0;
    let sim = (cpu_ticks(std::process::id()) - sim0) as f64 / 100.0;
    let written: Vec<u64> = pids
        .iter()
        .zip(&written0)
        .map(|(p, w)| write_bytes(*p).unwrap() - w)
        .collect();
    let wall = start.elapsed().as_secs_f64();
    let book1 = book_state(&pg, db);
    let book_wall = book_from.elapsed().as_secs_f64();
    let mem: Vec<(u64, u64)> = pids
        .iter()
        .map(|p| (status_kb(*p, "VmRSS:"), status_kb(*p, "VmHWM:")))
        .collect();
    let (pg_pss, pg_rss) = server_memory_kb(postmaster);
    let pg_processes = server_processes(postmaster).len();
    let per_hour = |d: f64| d / book_wall * 3600.0;
    let rows: Vec<f64> = book1
        .rows
        .iter()
        .zip(&book0.rows)
        .map(|(a, b)| per_hour((a - b) as f64))
        .collect();
    let rows_h: f64 = rows.iter().sum();
    let wal: f64 = pg
        .psql(
            db,
            &format!("SELECT pg_wal_lsn_diff('{}', '{}')", book1.lsn, book0.lsn),
        )
        .parse()
        .unwrap();
    let wal_h = per_hour(wal);
    let table_h = per_hour((book1.bytes - book0.bytes) as f64);
    let rows_now: i64 = book1.rows.iter().sum();

    // Every replica serves the book's sealed minutes: the same contract counters at the same
    // sealed-through time (read until all four have read back the same minute).
    let deadline = Instant::now() + Duration::from_secs(120);
    let served: Vec<(f64, f64)> = loop {
        let v: Vec<(f64, f64)> = aggs[1..]
            .iter()
            .map(|a| {
                let m = a.metrics();
                (
                    m.get("commitmeter_ledger_sealed_through_timestamp_seconds", &[])
                        .unwrap_or(0.0),
                    m.get(
                        "commitmeter_contract_delivered_gpu_seconds_total",
                        &[("contract", "sim")],
                    )
                    .unwrap_or(f64::NAN),
                )
            })
            .collect();
        // Not at the same minute within 2 minutes: reported as such, not a panic.
        if v.iter().all(|x| x.0 > 0.0 && x.0 == v[0].0) || Instant::now() >= deadline {
            break v;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let through = served[0].0 as i64 / 60;
    let same = served
        .iter()
        .all(|x| x.0 == served[0].0 && x.1 == served[0].1);
    // The book's own sums to that minute, and its identity on every sealed minute.
    let book_delivered: i64 = pg
        .psql(
            db,
            &format!("SELECT COALESCE(sum(delivered), 0) FROM sealed_minutes WHERE contract = 'sim' AND minute < {through}"),
        )
        .parse()
        .unwrap();
    let broken = pg.psql(
        db,
        "SELECT count(*) FROM sealed_minutes WHERE committed <> (used - overage) + idle + undelivered + unreported",
    );
    // A clean stop of every aggregator, then the server (dropped).
    for a in &mut aggs {
        terminate(&mut a.child, Duration::from_secs(60));
    }
    drop(aggs);
    drop(pg);
    // pg_ctl returns once postmaster.pid is gone, a moment before the process is.
    let gone = Instant::now();
    while std::path::Path::new(&format!("/proc/{postmaster}")).exists()
        && gone.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = std::path::Path::new(&format!("/proc/{postmaster}")).exists();

    for (i, name) in names.iter().enumerate() {
        let line = format!(
            "{name}: {} agents, CPU {:.1}% of one core, RSS {:.0} MB (peak {:.0} MB), wrote {:.2} MB/h to its own storage",
            targets[i],
            cpu[i] / wall * 100.0,
            mem[i].0 as f64 / 1e3,
            mem[i].1 as f64 / 1e3,
            written[i] as f64 / wall * 3600.0 / 1e6
        );
        println!("shared book, {agents} agents x 8 GPUs, {wall:.0} s: {line}");
    }
    println!(
        "shared book: PostgreSQL ({pg_processes} processes): CPU {:.1}% of one core, PSS {:.0} MB (RSS summed over its processes {:.0} MB); the simulator {:.1}%",
        pg_cpu / wall * 100.0,
        pg_pss as f64 / 1e3,
        pg_rss as f64 / 1e3,
        sim / wall * 100.0
    );
    let per_table: Vec<String> = BOOK_TABLES
        .iter()
        .zip(&rows)
        .map(|(t, r)| format!("{t} {r:.0}"))
        .collect();
    println!(
        "shared book: rows written {rows_h:.0}/h ({}); WAL {:.3} MB/h (pg_wal_lsn_diff); tables + indexes {:+.3} MB/h (pg_total_relation_size, in 8 kB pages); {rows_now} rows in {:.3} MB now",
        per_table.join(", "),
        wal_h / 1e6,
        table_h / 1e6,
        book1.bytes as f64 / 1e6
    );
    println!(
        "shared book: every replica serves delivered {:?} GPU-s at sealed through {through} (minute): the same: {same}; the book's sealed minutes to it: {:.3} GPU-s; minutes breaking the identity: {broken}; PostgreSQL left running: {left}",
        served.iter().map(|x| x.1).collect::<Vec<_>>(),
        book_delivered as f64 / 1000.0,
    );
    let shard_cpu: Vec<String> = (1..names.len())
        .map(|i| format!("{:.1}", cpu[i] / wall * 100.0))
        .collect();
    let shard_rss: Vec<String> = (1..names.len())
        .map(|i| format!("{:.0}", mem[i].0 as f64 / 1e3))
        .collect();
    println!(
        "| shared book, {} agents, {shards} shards × {replicas} replicas on one PostgreSQL | `COMMITMETER_BENCH_AGENTS={agents} COMMITMETER_BENCH_SHARDS={shards} COMMITMETER_BENCH_REPLICAS={replicas} COMMITMETER_BENCH_SECS={secs} cargo bench --bench aggregator` (prints this row): a real PostgreSQL (the tests' harness), one database; each aggregator lists the whole fleet and scrapes its shard's agents; the single SQLite aggregator over the whole fleet in the same run; grace 30 s, shard_grace 30 s; after the book's first sealed minute, {wall:.0} s of CPU and RSS (/proc) per aggregator and of PostgreSQL (all its processes), the book's rows (count(*)) and WAL (pg_current_wal_lsn) before and after | per aggregator (shard 0 replicas, then shard 1's, ≈ {} agents each) CPU {} % of one core, RSS {} MB; SQLite aggregator of the same run ({} agents) {:.1} %, {:.0} MB. PostgreSQL {:.1} % of one core, {:.0} MB (PSS). Book: {rows_h:.0} rows/h, WAL {:.2} MB/h; every replica the same delivered at the same sealed minute: {} | — |",
        thousands(agents),
        per_shard[0][0],
        shard_cpu.join(" / "),
        shard_rss.join(" / "),
        thousands(agents),
        cpu[0] / wall * 100.0,
        mem[0].0 as f64 / 1e3,
        pg_cpu / wall * 100.0,
        pg_pss as f64 / 1e3,
        wal_h / 1e6,
        if same { "yes" } else { "**no**" },
    );
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `write_bytes` of /proc/PID/io: bytes this process caused to be written to storage;
/// `None` once it is gone.
fn write_bytes(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes:")?.trim().parse().ok())
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let statements = std::env::var("COMMITMETER_BENCH_STATEMENTS").is_ok_and(|v| v == "1");
    // A statements window is 12 rounds by default.
    let secs = std::env::var("COMMITMETER_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if statements { 180 } else { 60 });
    let sizes = std::env::var("COMMITMETER_BENCH_AGENTS").unwrap_or_else(|_| "1000,10000".into());
    let down_percent = std::env::var("COMMITMETER_BENCH_DOWN_PERCENT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0usize)
        .min(100);
    // Both set (and above 0): the shared-book mode.
    let count = |var: &str| -> u32 {
        std::env::var(var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    };
    let (shards, replicas) = (
        count("COMMITMETER_BENCH_SHARDS"),
        count("COMMITMETER_BENCH_REPLICAS"),
    );
    for n in sizes.split(',').filter_map(|s| s.trim().parse().ok()) {
        raise_fd_limit(n);
        if shards > 0 && replicas > 0 {
            run_shared(n, secs, shards, replicas);
        } else if statements {
            run_statements(n, secs);
        } else {
            run(n, secs, down_percent);
        }
    }
}
