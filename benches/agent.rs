//! Agent benchmark (not a timed test): `cargo bench --bench agent`.
//!
//! 1. The cost of one `/metrics` render for 8 GPUs, in process, under the round lock
//!    as the agent serves it: without and with the `process_*` collector.
//! 2. The real release binary on the fake NVML library with 8 GPUs at 1 Hz for
//!    `COMMITMETER_BENCH_SECS` (default 60) seconds, scraped every 15 s like
//!    Prometheus would: RSS (current and peak) from /proc/PID/status and CPU
//!    time of all threads from /proc/PID/task/*/schedstat (nanoseconds).
//! 3. The same with owners: 8 GPUs × 10 compute processes each, every process its own
//!    Slurm job in a fixture procfs tree (`--path.procfs`, `--path.rootfs`), so 80
//!    owners and their series (the cost of per-owner attribution).

// Tests read the clock and open SQLite as they please: clippy.toml keeps that to
// src/clock.rs and src/aggregator/store.rs in the product only.
#![allow(clippy::disallowed_methods)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use commitmeter::agent::metrics::{AgentMetrics, GaugeKind, GpuInfoLabels, GpuXidLabels};
use common::*;

fn render_cost(process: bool) {
    let m = AgentMetrics::new(&[
        ("provider".into(), "acme".into()),
        ("cluster".into(), "east".into()),
    ])
    .unwrap();
    if process {
        m.register_process_collector(1_800_000_000_000).unwrap();
    }
    m.polls.inc();
    m.sampled.inc_by(123.0);
    m.last_round.set(1.8e9);
    for i in 0..8u32 {
        let uuid = format!("GPU-bench-{i:032}");
        let s = m.gpu(i, &uuid);
        s.up.set(1.0);
        s.observed.inc_by(123.0);
        s.busy.inc_by(100.0);
        m.allocated.with(&s.labels()).inc_by(99.0);
        m.allocated_busy.with(&s.labels()).inc_by(90.0);
        m.sm_active.with(&s.labels()).inc_by(80.0);
        m.tensor_active.with(&s.labels()).inc_by(40.0);
        m.allocated_sm_active.with(&s.labels()).inc_by(75.0);
        m.energy.with(&s.labels()).inc_by(5e6);
        m.xid
            .with(&GpuXidLabels {
                gpu: &s.gpu,
                uuid: &uuid,
                xid: "79",
            })
            .inc();
        m.gpu_info
            .with(&GpuInfoLabels {
                gpu: &s.gpu,
                uuid: &uuid,
                model: "NVIDIA H200",
                pci_bus_id: "00000000:17:00.0",
                busy_source: "samples",
                activity_source: "gpm",
            })
            .set(1.0);
        for k in GaugeKind::ALL {
            m.set_gauge(k, &s, Some(1.0));
        }
    }
    let n = 20_000;
    let start = Instant::now();
    let mut bytes = 0;
    for _ in 0..n {
        let r = m.render();
        bytes = hyper::body::Body::size_hint(r.body()).exact().unwrap_or(0);
    }
    let per = start.elapsed() / n;
    println!(
        "render: 8 GPUs{}, {bytes} bytes, {:.1} µs per /metrics render (mean of {n})",
        if process { " + process_*" } else { "" },
        per.as_secs_f64() * 1e6
    );
}

/// Runs the release agent on `sc` at 1 Hz for `COMMITMETER_BENCH_SECS` and prints its
/// CPU (share of a core, and per round) and memory, as `what`.
fn run_agent(what: &str, sc: &Scenario, extra_args: Vec<String>) {
    let secs: u64 = std::env::var("COMMITMETER_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let agent = Agent::start(
        sc,
        AgentOpts {
            interval: "1s",
            log_level: "info",
            extra_args,
            ..AgentOpts::default()
        },
    );
    agent.wait_ready(Duration::from_secs(30));
    let pid = agent.child.id();
    let polls = |m: &Metrics| m.get("commitmeter_agent_polls_total", &[]).unwrap_or(0.0);
    let polls0 = polls(&agent.metrics());
    let cpu0 = cpu_ns(pid);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(
            Duration::from_secs(15).min(Duration::from_secs(secs).saturating_sub(start.elapsed())),
        );
        let _ = agent.get("/metrics");
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = (cpu_ns(pid) - cpu0) as f64 / 1e9;
    let m = agent.metrics();
    let rounds = polls(&m) - polls0;
    let (_, body) = agent.get("/metrics");
    println!(
        "agent: {what} at 1 Hz for {wall:.0} s, {rounds} rounds: CPU {:.3}% of one core ({:.3} s, {:.0} µs per round, scrapes included), RSS {} kB ({} kB anonymous, {} kB file-backed: the binary's and libraries' pages, shared through the page cache), peak RSS {} kB, /metrics {} bytes",
        cpu / wall * 100.0,
        cpu,
        cpu / rounds.max(1.0) * 1e6,
        status_kb(pid, "VmRSS:"),
        status_kb(pid, "RssAnon:"),
        status_kb(pid, "RssFile:"),
        status_kb(pid, "VmHWM:"),
        body.len(),
    );
}

fn eight_gpus() -> Scenario {
    Scenario {
        gpus: (0..8)
            .map(|i| Gpu {
                xids: vec![[5_000, 79]],
                ..Gpu::at_util(10 * i)
            })
            .collect(),
        ..Scenario::default()
    }
}

/// 8 GPUs with 10 processes each, every process its own Slurm job (job 1000 + PID) of
/// one of 8 users, written as a procfs tree under `dir`; the flags that point the agent
/// at it.
fn owners_tree(dir: &std::path::Path) -> (Scenario, Vec<String>) {
    let mut sc = eight_gpus();
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    let mut passwd = String::from("root:x:0:0:root:/root:/bin/bash\n");
    for u in 0..8 {
        passwd.push_str(&format!(
            "user{u}:x:{0}:{0}::/home/user{u}:/bin/bash\n",
            2000 + u
        ));
    }
    std::fs::write(dir.join("etc/passwd"), passwd).unwrap();
    for (g, gpu) in sc.gpus.iter_mut().enumerate() {
        let pids: Vec<u32> = (0..10).map(|k| 10_000 + 100 * g as u32 + k).collect();
        for &pid in &pids {
            let d = dir.join(pid.to_string());
            std::fs::create_dir_all(&d).unwrap();
            let uid = 2000 + pid % 8;
            std::fs::write(
                d.join("status"),
                format!("Name:\tpython\nPid:\t{pid}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t{uid}\t{uid}\t{uid}\t{uid}\n"),
            )
            .unwrap();
            std::fs::write(
                d.join("cgroup"),
                format!(
                    "0::/system.slice/slurmstepd.scope/job_{}/step_0/user/task_0\n",
                    1000 + pid
                ),
            )
            .unwrap();
        }
        gpu.pids = Some(vec![(0, pids)]);
    }
    let args = vec![
        format!("--path.procfs={}", dir.display()),
        format!("--path.rootfs={}", dir.display()),
    ];
    (sc, args)
}

fn main() {
    // `cargo test --benches` passes --bench-less args; run only under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    render_cost(false);
    render_cost(true);
    run_agent("8 fake GPUs", &eight_gpus(), Vec::new());
    let tree = TempDir::new("bench-procfs");
    let (sc, args) = owners_tree(tree.root());
    run_agent("8 fake GPUs × 10 processes (80 Slurm jobs)", &sc, args);
}
