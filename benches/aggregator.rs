//! Aggregator benchmark (not a timed test): `cargo bench --bench aggregator`.
//!
//! One process simulates N agents of 8 GPUs on loopback (one port, a metrics path per
//! agent, listed in a file_sd file); the release aggregator scrapes them every 15 s
//! into one contract. After a warm-up round, CPU time of all its threads
//! (/proc/PID/task/*/schedstat), RSS (/proc/PID/status) and bytes written to storage
//! (`write_bytes` of /proc/PID/io) are read over `COMMITMETER_BENCH_SECS` (default 60)
//! seconds. Then SIGTERM: the bytes of the clean stop are the hosts' checkpoint (written
//! once an hour while running), so bytes per hour = the window's rate + one stop.
//! `COMMITMETER_BENCH_AGENTS` picks the fleet sizes (default "1000,10000");
//! `COMMITMETER_BENCH_ARGS` adds aggregator flags. `COMMITMETER_BENCH_DOWN_PERCENT=10` makes
//! that share of the agents answer 503, a different share every 15 s (the worst churn for
//! the log), and reports the aggregator's log lines per minute.

// Tests read the clock and open SQLite as they please: clippy.toml keeps that to
// src/clock.rs and src/aggregator/store.rs in the product only.
#![allow(clippy::disallowed_methods)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::convert::Infallible;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use common::*;

/// An agent's exposition: the accounting counters, the round time they belong to, plus the
/// gauges the parser skips. `start_unix` is when the simulated agents started.
fn exposition(agent: usize, start_unix: f64, elapsed: f64) -> String {
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
    s
}

fn simulate(listener: std::net::TcpListener, start: Instant, down_percent: usize) {
    let start_unix = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as f64)
        / 1000.0;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.spawn(async move {
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| async move {
                        let agent: usize = req
                            .uri()
                            .path()
                            .split('/')
                            .nth(2)
                            .and_then(|n| n.parse().ok())
                            .unwrap_or(0);
                        // Whole ms, as a real agent's rounds.
                        let elapsed = (start.elapsed().as_millis() as f64) / 1000.0;
                        let window = start.elapsed().as_secs() as usize / 15;
                        if down_percent > 0 && (agent + window) % (100 / down_percent) == 0 {
                            let mut r = hyper::Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                            return Ok::<_, Infallible>(r);
                        }
                        let body = exposition(agent, start_unix, elapsed);
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                    },
                );
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    std::mem::forget(rt);
}

fn run(agents: usize, secs: u64, down_percent: usize) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    simulate(listener, Instant::now(), down_percent);
    let dir = TempDir::new("bench-agg");
    let sd = dir.path("agents.json");
    let groups: Vec<String> = (0..agents)
        .map(|i| format!(r#"{{"targets":["{addr}"],"labels":{{"provider":"sim","__metrics_path__":"/agent/{i}/metrics"}}}}"#))
        .collect();
    std::fs::write(&sd, format!("[{}]", groups.join(","))).unwrap();
    let config = dir.path("aggregator.toml");
    std::fs::write(
        &config,
        format!(
            r#"[aggregator]
scrape_interval = "15s"
scrape_timeout = "10s"
grace = "1m"

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
"#,
            sd.display(),
            agents * 8
        ),
    )
    .unwrap();
    // More aggregator flags, e.g. `--storage.host-checkpoint-interval=0s`.
    let extra: Vec<String> = std::env::var("COMMITMETER_BENCH_ARGS")
        .map(|a| a.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let agg = Aggregator::start_with(&config, &dir.path("data"), &extra);
    let pid = agg.child.id();
    let up = |m: &Metrics| {
        m.series("commitmeter_target_up")
            .iter()
            .filter(|(_, v)| *v == 1.0)
            .count()
    };
    agg.wait_for(Duration::from_secs(60), "all targets scraped", |m| {
        m.series("commitmeter_target_up").len() == agents && (down_percent > 0 || up(m) == agents)
    });
    // The write after the first round holds every host's first checkpoint (then hourly):
    // let it land before the window opens.
    std::thread::sleep(Duration::from_secs(20));
    let lines0 = agg.log.lock().unwrap().len();
    let cpu0 = cpu_ns(pid);
    let written0 = write_bytes(pid).unwrap();
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let cpu = (cpu_ns(pid) - cpu0) as f64 / 1e9;
    let written = write_bytes(pid).unwrap() - written0;
    let wall = start.elapsed().as_secs_f64();
    let lines = agg.log.lock().unwrap().len() - lines0;
    let m = agg.metrics();
    let rejected: f64 = m
        .series("commitmeter_ledger_rejected_gpu_seconds_total")
        .iter()
        .map(|(_, v)| v)
        .sum();
    let (rss, hwm) = (status_kb(pid, "VmRSS:"), status_kb(pid, "VmHWM:"));
    // The clean stop writes every host's checkpoint: its bytes, read until the process
    // is gone (the last reading before exit).
    let mut agg = agg;
    let before_stop = write_bytes(pid).unwrap();
    signal(pid, "-TERM");
    let mut at_stop = before_stop;
    while let Some(b) = write_bytes(pid) {
        at_stop = at_stop.max(b);
        if agg.child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let stop = at_stop - before_stop;
    let per_min = written as f64 / wall * 60.0;
    println!(
        "aggregator: {agents} agents x 8 GPUs, 15 s scrapes, {wall:.0} s: CPU {:.1}% of one core, RSS {rss} kB, peak RSS {hwm} kB, {} targets up, {rejected} GPU-s rejected; \
         written {:.3} MB/min (rounds), host checkpoint at stop {:.2} MB, so {:.1} MB/h with hourly host checkpoints ({:.3} MB/min); \
         {down_percent}% down (rotating every 15 s): {:.1} log lines/min",
        cpu / wall * 100.0,
        up(&m),
        per_min / 1e6,
        stop as f64 / 1e6,
        (per_min * 60.0 + stop as f64) / 1e6,
        (per_min * 60.0 + stop as f64) / 60.0 / 1e6,
        lines as f64 / wall * 60.0,
    );
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
    let secs = std::env::var("COMMITMETER_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let sizes = std::env::var("COMMITMETER_BENCH_AGENTS").unwrap_or_else(|_| "1000,10000".into());
    let down_percent = std::env::var("COMMITMETER_BENCH_DOWN_PERCENT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0usize)
        .min(100);
    for n in sizes.split(',').filter_map(|s| s.trim().parse().ok()) {
        run(n, secs, down_percent);
    }
}
