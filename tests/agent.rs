//! The real `commitmeter agent` against the fake NVML library: counters are compared
//! with the scenario's exact ground truth, and every driver fault keeps it serving.

// Tests read the clock and open SQLite as they please: clippy.toml keeps that to
// src/clock.rs and src/aggregator/store.rs in the product only.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::{Duration, Instant};

use common::*;

const INTERVAL: f64 = 0.5;

/// |measured − truth| ≤ 1% of truth + one sample interval's worth (+ 0.15 s for the
/// readiness poll that brackets the start).
fn assert_close(what: &str, measured: f64, truth: f64, per_second: f64) {
    let tolerance = 0.01 * truth.abs() + (INTERVAL + 0.15) * per_second;
    assert!(
        (measured - truth).abs() <= tolerance,
        "{what}: measured {measured:.3}, ground truth {truth:.3} (tolerance {tolerance:.3})"
    );
}

fn eight_gpus() -> Scenario {
    let mut gpus: Vec<Gpu> = [0, 10, 25, 50, 75, 100]
        .into_iter()
        .map(Gpu::at_util)
        .collect();
    // A job that steps from 20% to 80% and its processes come and go.
    gpus.push(Gpu {
        util: vec![[0, 20], [3_000, 80]],
        processes: vec![[0, 0], [2_000, 2], [5_000, 0]],
        xids: vec![[1_500, 79], [2_500, 48], [3_000, 79]],
        ..Gpu::default()
    });
    // Falls off the bus mid-run.
    gpus.push(Gpu {
        util: vec![[0, 60]],
        lost_at_ms: Some(4_000),
        ..Gpu::default()
    });
    gpus[0].samples_dry_when_idle = true;
    gpus[0].processes = vec![[0, 0]];
    gpus[1].energy_reset_at_ms = Some(3_500);
    Scenario {
        gpus,
        // A running machine: the driver was sampling before the agent started.
        sampled_before_ms: 10_000,
        ..Scenario::default()
    }
}

#[test]
fn eight_gpus_match_ground_truth_and_a_lost_gpu_stops_accruing() {
    let agent = Agent::start(&eight_gpus(), AgentOpts::default());
    let sc = &agent.sc;
    let ready = timeline_ms(sc, agent.wait_ready(Duration::from_secs(20)));
    // Run well past the loss and the steps, and long enough to measure.
    let until = 7_000.max(ready + 5_000);
    std::thread::sleep(Duration::from_millis(until.saturating_sub(sc.now_ms())));
    let m = agent.metrics();
    // The counters stand as of the last round, whose instant the agent exports.
    let end = last_round_ms(sc, &m);
    assert!(end + 600 >= sc.now_ms(), "last round at {end} ms");

    assert_eq!(m.get("commitmeter_nvml_up", &[]), Some(1.0));
    for gpu in 0..8 {
        let uuid = sc.uuid(gpu);
        let busy = m
            .get("commitmeter_gpu_busy_seconds_total", &[("uuid", &uuid)])
            .unwrap();
        let observed = m
            .get("commitmeter_gpu_observed_seconds_total", &[("uuid", &uuid)])
            .unwrap();
        assert_close(
            &format!("gpu {gpu} observed"),
            observed,
            sc.present_seconds(gpu, ready, end),
            1.0,
        );
        assert_close(
            &format!("gpu {gpu} busy"),
            busy,
            sc.busy_seconds(gpu, ready, end),
            1.0,
        );
        if gpu != 7 {
            let allocated = m
                .gpu("commitmeter_gpu_allocated_seconds_total", gpu)
                .unwrap();
            assert_close(
                &format!("gpu {gpu} allocated"),
                allocated,
                sc.allocated_seconds(gpu, ready, end),
                1.0,
            );
            let energy = m.gpu("commitmeter_gpu_energy_joules_total", gpu).unwrap();
            let mut truth = sc.energy_joules(gpu, ready, end);
            if sc.gpus[gpu].energy_reset_at_ms.is_some() {
                // What the driver drew between the last poll and its counter reset
                // is unknowable: at most one interval's worth.
                truth -= INTERVAL * 300.0 / 2.0;
            }
            assert_close(&format!("gpu {gpu} energy"), energy, truth, 300.0);
            assert_eq!(m.gpu("commitmeter_gpu_up", gpu), Some(1.0));
        }
        // Over the very polls that bound `observed`, a constant load gives an exact
        // ratio: this catches proportional errors the absolute tolerance would hide.
        if let [[0, pct]] = sc.gpus[gpu].util[..] {
            let want = pct as f64 / 100.0;
            assert!(
                (busy / observed - want).abs() < 0.005,
                "gpu {gpu}: busy/observed {} vs {want}",
                busy / observed
            );
            if sc.gpus[gpu].energy_reset_at_ms.is_none() {
                let energy = m.gpu("commitmeter_gpu_energy_joules_total", gpu).unwrap();
                assert!(
                    (energy / observed - 300.0).abs() < 3.0,
                    "gpu {gpu}: {energy} J over {observed} s"
                );
            }
        }
        let info = m.get(
            "commitmeter_gpu_info",
            &[("uuid", &uuid), ("busy_source", "samples")],
        );
        assert_eq!(info, Some(1.0), "gpu {gpu} info");
    }
    // The step-changing GPU's XIDs, as a counter per code.
    assert_eq!(
        m.get(
            "commitmeter_gpu_xid_errors_total",
            &[("gpu", "6"), ("xid", "79")]
        ),
        Some(2.0)
    );
    assert_eq!(
        m.get(
            "commitmeter_gpu_xid_errors_total",
            &[("gpu", "6"), ("xid", "48")]
        ),
        Some(1.0)
    );

    // Gauges of a healthy GPU, in base units.
    assert_eq!(m.gpu("commitmeter_gpu_utilization_ratio", 3), Some(0.5));
    assert_eq!(m.gpu("commitmeter_gpu_power_watts", 3), Some(300.0));
    assert_eq!(m.gpu("commitmeter_gpu_power_limit_watts", 3), Some(700.0));
    assert_eq!(
        m.gpu("commitmeter_gpu_memory_total_bytes", 3),
        Some(85_899_345_920.0)
    );
    assert_eq!(
        m.gpu("commitmeter_gpu_memory_used_bytes", 3),
        Some(1_073_741_824.0)
    );
    assert_eq!(m.gpu("commitmeter_gpu_temperature_celsius", 3), Some(40.0));
    assert_eq!(m.gpu("commitmeter_gpu_sm_clock_hertz", 3), Some(1.98e9));
    assert_eq!(m.gpu("commitmeter_gpu_compute_processes", 3), Some(1.0));

    // The lost GPU: down, its gauges gone, its counters frozen, the rest still counting.
    assert_eq!(m.gpu("commitmeter_gpu_up", 7), Some(0.0));
    assert_eq!(m.gpu("commitmeter_gpu_utilization_ratio", 7), None);
    let frozen = m.gpu("commitmeter_gpu_observed_seconds_total", 7).unwrap();
    assert!(
        frozen <= (4_000 - ready.min(4_000)) as f64 / 1000.0 + 1e-9,
        "accrued after the loss: {frozen}"
    );
    std::thread::sleep(Duration::from_millis(1_200));
    let later = agent.metrics();
    assert_eq!(
        later.gpu("commitmeter_gpu_observed_seconds_total", 7),
        Some(frozen)
    );
    assert!(
        later
            .gpu("commitmeter_gpu_observed_seconds_total", 3)
            .unwrap()
            > m.gpu("commitmeter_gpu_observed_seconds_total", 3).unwrap()
    );
    agent.wait_log(Duration::from_secs(10), "GPU not answering");
    assert_eq!(
        agent.log_count("GPU not answering"),
        1,
        "log:\n{}",
        agent.log_text()
    );
}

#[test]
fn exposition_passes_promtool_check_metrics() {
    let sc = eight_gpus();
    let agent = Agent::start(&sc, AgentOpts::default());
    agent.wait_ready(Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(3_200));
    let (_, body) = agent.get("/metrics");
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool not found: install Debian's `prometheus` package (see .ci/run)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool: {report}\n{body}"
    );
    // Every series carries the prefix, but the process collector's, which tells
    // one agent process from the next.
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            line.starts_with("commitmeter_") || line.starts_with("process_"),
            "{line}"
        );
    }
    let m = Metrics::parse(&body);
    let start = m.get("process_start_time_seconds", &[]).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(now - 60.0 < start && start <= now, "{start} vs {now}");
    let last_round = m
        .get("commitmeter_agent_last_round_timestamp_seconds", &[])
        .unwrap();
    assert!(
        start - 1.0 <= last_round && last_round <= now,
        "{last_round}"
    );
    assert!(
        m.get("commitmeter_agent_sampled_seconds_total", &[])
            .unwrap()
            > 0.0
    );
}

#[test]
fn no_library_keeps_serving_and_logs_once() {
    let dir = TempDir::new("nolib");
    let agent = Agent::start(
        &Scenario::default(),
        AgentOpts {
            library: Some(dir.path("libnvidia-ml.so.1")),
            ..AgentOpts::default()
        },
    );
    // Attempts at 0 s, 1 s and 3 s.
    std::thread::sleep(Duration::from_millis(3_500));
    let m = agent.metrics();
    assert_eq!(m.get("commitmeter_nvml_up", &[]), Some(0.0));
    assert!(m.series("commitmeter_gpu_up").is_empty());
    assert!(
        m.get("commitmeter_nvml_errors_total", &[("call", "init")])
            .unwrap()
            >= 1.0
    );
    assert_eq!(agent.get("/-/ready").0, 503);
    assert_eq!(agent.get("/-/healthy").0, 200);
    agent.wait_log(Duration::from_secs(10), "NVML unavailable");
    assert_eq!(
        agent.log_count("NVML unavailable"),
        1,
        "log:\n{}",
        agent.log_text()
    );
}

#[test]
fn init_failure_then_driver_reload_recovers_without_losing_counts() {
    let sc = Scenario {
        init_fail_until_ms: 1_500,
        driver_down: vec![[4_000, 5_500]],
        gpus: vec![Gpu::at_util(40)],
        ..Scenario::default()
    };
    let agent = Agent::start(&sc, AgentOpts::default());
    let sc = &agent.sc;
    let m = agent.metrics();
    assert_eq!(m.get("commitmeter_nvml_up", &[]), Some(0.0));
    let ready = timeline_ms(sc, agent.wait_ready(Duration::from_secs(10)));
    assert!(ready >= 1_500);
    let before = agent.wait_for(Duration::from_secs(5), "the driver reload", |m| {
        m.get("commitmeter_nvml_up", &[]) == Some(0.0)
    });
    assert_eq!(before.gpu("commitmeter_gpu_up", 0), Some(0.0));
    let m = agent.wait_for(Duration::from_secs(10), "NVML back after the reload", |m| {
        m.get("commitmeter_nvml_up", &[]) == Some(1.0)
            && m.gpu("commitmeter_gpu_up", 0) == Some(1.0)
    });
    std::thread::sleep(Duration::from_millis(1_500));
    let m2 = agent.metrics();
    let end = sc.now_ms();
    let observed = m2.gpu("commitmeter_gpu_observed_seconds_total", 0).unwrap();
    assert!(observed >= m.gpu("commitmeter_gpu_observed_seconds_total", 0).unwrap());
    // The reload window is not delivered time. Around it the agent loses at most
    // the interval that saw the failure, the retries' backoff (1 s, then 2 s) and
    // one interval for the new baseline: it never claims more than was present.
    let truth = sc.present_seconds(0, ready, end);
    assert!(
        observed <= truth + 0.2,
        "observed {observed} > truth {truth}"
    );
    assert!(
        observed >= truth - 3.0 - 2.0 * INTERVAL - 0.2,
        "observed {observed} ≪ truth {truth}"
    );
    assert_close(
        "busy/observed",
        m2.gpu("commitmeter_gpu_busy_seconds_total", 0).unwrap(),
        0.4 * observed,
        0.0,
    );
    assert_eq!(
        agent.log_count("NVML initialized"),
        2,
        "log:\n{}",
        agent.log_text()
    );
}

#[test]
fn old_driver_without_samples_or_energy_falls_back_and_omits() {
    let sc = Scenario {
        gpus: vec![Gpu::at_util(30), Gpu::at_util(90)],
        ..Scenario::default()
    };
    let agent = Agent::start(
        &sc,
        AgentOpts {
            library: Some(fake_library("nvidia_ml_old")),
            ..AgentOpts::default()
        },
    );
    let sc = &agent.sc;
    let ready = timeline_ms(sc, agent.wait_ready(Duration::from_secs(20)));
    std::thread::sleep(Duration::from_millis(2_500));
    let m = agent.metrics();
    let end = sc.now_ms();
    for gpu in 0..2 {
        let uuid = sc.uuid(gpu);
        assert_eq!(
            m.get(
                "commitmeter_gpu_info",
                &[("uuid", &uuid), ("busy_source", "utilization_rates")]
            ),
            Some(1.0)
        );
        assert_close(
            "busy from rates",
            m.gpu("commitmeter_gpu_busy_seconds_total", gpu).unwrap(),
            sc.busy_seconds(gpu, ready, end),
            1.0,
        );
        // Capabilities the driver lacks are left out, never exported as 0.
        assert_eq!(m.gpu("commitmeter_gpu_energy_joules_total", gpu), None);
        assert_eq!(m.gpu("commitmeter_gpu_allocated_seconds_total", gpu), None);
        assert_eq!(m.gpu("commitmeter_gpu_memory_used_bytes", gpu), None);
        assert_eq!(m.gpu("commitmeter_gpu_power_watts", gpu), Some(300.0));
    }
    assert!(!agent.log_text().contains("panicked"));
}

#[test]
fn unsupported_capabilities_per_gpu_are_left_out() {
    let sc = Scenario {
        gpus: vec![Gpu {
            unsupported: ["samples", "utilization", "temperature", "events"]
                .map(String::from)
                .to_vec(),
            ..Gpu::at_util(70)
        }],
        ..Scenario::default()
    };
    let agent = Agent::start(&sc, AgentOpts::default());
    agent.wait_ready(Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(1_200));
    let m = agent.metrics();
    assert_eq!(
        m.get(
            "commitmeter_gpu_info",
            &[("gpu", "0"), ("busy_source", "none")]
        ),
        Some(1.0)
    );
    assert_eq!(m.series("commitmeter_gpu_info").len(), 1);
    assert_eq!(m.gpu("commitmeter_gpu_busy_seconds_total", 0), Some(0.0));
    assert!(m.gpu("commitmeter_gpu_observed_seconds_total", 0).unwrap() > 0.0);
    assert_eq!(m.gpu("commitmeter_gpu_temperature_celsius", 0), None);
    assert_eq!(m.gpu("commitmeter_gpu_utilization_ratio", 0), None);
    assert_eq!(m.gpu("commitmeter_gpu_sm_clock_hertz", 0), Some(1.98e9));
}

#[test]
fn default_lookup_uses_the_dynamic_loader_path() {
    let dir = TempDir::new("ldpath");
    std::os::unix::fs::symlink(fake_library("nvidia_ml"), dir.path("libnvidia-ml.so.1")).unwrap();
    let agent = Agent::start(
        &Scenario::default(),
        AgentOpts {
            library: None,
            env: vec![("LD_LIBRARY_PATH".into(), dir.root().display().to_string())],
            ..AgentOpts::default()
        },
    );
    agent.wait_ready(Duration::from_secs(20));
    let m = agent.metrics();
    assert_eq!(m.get("commitmeter_nvml_up", &[]), Some(1.0));
    assert_eq!(m.series("commitmeter_gpu_up").len(), 2);
}

#[test]
fn host_labels_and_http_edges() {
    let dir = TempDir::new("labels");
    let cfg = dir.path("agent.toml");
    std::fs::write(
        &cfg,
        "[labels]\nprovider = \"acme\"\ncluster = \"east-1\"\n",
    )
    .unwrap();
    let agent = Agent::start(
        &Scenario::default(),
        AgentOpts {
            extra_args: vec![format!("--config.file={}", cfg.display())],
            ..AgentOpts::default()
        },
    );
    agent.wait_ready(Duration::from_secs(20));
    let m = agent.metrics();
    assert_eq!(
        m.get(
            "commitmeter_host_info",
            &[("provider", "acme"), ("cluster", "east-1")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.get("commitmeter_build_info", &[("role", "agent")]),
        Some(1.0)
    );
    assert_eq!(agent.get("/nope").0, 404);
    assert_eq!(agent.get("/-/healthy").0, 200);
    let (status, _) = http_request(
        &agent.addr,
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 405);
}

#[test]
fn config_mistakes_exit_non_zero_before_serving() {
    let dir = TempDir::new("badcfg");
    let cases = [
        (
            "[labels]\nrack = 7\n",
            "agent.toml:2:8: invalid type: integer `7`, expected a string",
        ),
        ("[lables]\n", "unknown field `lables`"),
        (
            "[labels]\n\"9x\" = \"a\"\n",
            "[labels] key `9x`: not a valid Prometheus label name",
        ),
    ];
    for (text, expected) in cases {
        let cfg = dir.path("agent.toml");
        std::fs::write(&cfg, text).unwrap();
        let start = Instant::now();
        let out = std::process::Command::new(BIN)
            .args([
                "agent",
                "--web.listen-address=127.0.0.1:0",
                "--nvml.library=/nonexistent.so",
            ])
            .arg(format!("--config.file={}", cfg.display()))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&cfg.display().to_string()) && stderr.contains(expected),
            "{stderr}"
        );
        assert!(
            !stderr.contains("serving"),
            "started before failing: {stderr}"
        );
        assert!(start.elapsed() < Duration::from_secs(30));
    }
    let out = std::process::Command::new(BIN)
        .args(["agent", "--config.file=/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("/nonexistent/agent.toml: cannot read config file"));
    let out = std::process::Command::new(BIN)
        .args(["agent", "--web.listen-address=nowhere"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--web.listen-address \"nowhere\""));
}

/// `:PORT` listens on every interface, IPv6 and IPv4, as a Go exporter's does: one
/// agent started with `:0` answers on 127.0.0.1 and on [::1] (where the machine has an
/// IPv6 loopback).
#[test]
fn colon_port_answers_on_ipv4_and_ipv6_loopback() {
    let mut child = std::process::Command::new(BIN)
        .args([
            "agent",
            "--web.listen-address=:0",
            "--nvml.library=/nonexistent.so",
            JSON_LOG,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let logged =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| follow_log(&mut child).0)).ok();
    let result = std::panic::catch_unwind(|| {
        let logged = logged.expect("the agent did not log its address");
        let bound: std::net::SocketAddr = logged.parse().expect("a socket address");
        let port = bound.port();
        let mut reach = vec![format!("127.0.0.1:{port}")];
        if std::net::TcpListener::bind("[::1]:0").is_ok() {
            assert_eq!(logged, format!("[::]:{port}"));
            reach.push(format!("[::1]:{port}"));
        } else {
            eprintln!("no IPv6 loopback on this machine: checking 127.0.0.1 only");
        }
        for addr in reach {
            assert_eq!(http_get(&addr, "/-/healthy").0, 200, "{addr}");
        }
    });
    let _ = child.kill();
    let _ = child.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn sigterm_stops_cleanly() {
    let agent = Agent::start(&Scenario::default(), AgentOpts::default());
    agent.wait_ready(Duration::from_secs(20));
    let mut agent = agent;
    let status = terminate(&mut agent.child, Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
}

#[test]
fn sighup_reloads_host_labels_and_a_bad_file_keeps_them() {
    let dir = TempDir::new("reload");
    let cfg = dir.path("agent.toml");
    std::fs::write(&cfg, "[labels]\nprovider = \"acme\"\n").unwrap();
    let agent = Agent::start(
        &Scenario::default(),
        AgentOpts {
            extra_args: vec![format!("--config.file={}", cfg.display())],
            ..AgentOpts::default()
        },
    );
    agent.wait_ready(Duration::from_secs(20));
    let hup = || {
        let pid = agent.child.id();
        signal(pid, "-HUP");
    };
    std::fs::write(&cfg, "[labels]\nprovider = \"beta\"\n").unwrap();
    hup();
    let m = agent.wait_for(Duration::from_secs(10), "new labels", |m| {
        m.get("commitmeter_host_info", &[("provider", "beta")]) == Some(1.0)
    });
    assert_eq!(m.series("commitmeter_host_info").len(), 1);
    assert_eq!(
        m.get("commitmeter_config_last_reload_successful", &[]),
        Some(1.0)
    );
    std::fs::write(&cfg, "[labels]\nprovider = 7\n").unwrap();
    hup();
    let m = agent.wait_for(Duration::from_secs(10), "the failed reload", |m| {
        m.get("commitmeter_config_last_reload_successful", &[]) == Some(0.0)
    });
    assert_eq!(
        m.get("commitmeter_host_info", &[("provider", "beta")]),
        Some(1.0)
    );
    agent.wait_log(Duration::from_secs(10), "config reload failed");
    assert_eq!(
        agent.log_count("config reload failed"),
        1,
        "{}",
        agent.log_text()
    );
    assert_eq!(m.get("commitmeter_nvml_up", &[]), Some(1.0));
}

#[test]
fn oversized_and_slow_requests_are_cut_off_without_stalling_others() {
    let agent = Agent::start(&Scenario::default(), AgentOpts::default());
    agent.wait_ready(Duration::from_secs(20));
    // 100 kB of headers: over the 64 kB buffer.
    let big = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Junk: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(100_000)
    );
    assert_eq!(http_request(&agent.addr, &big).0, 431);
    // A client that sends half a request and stalls is dropped after the 10 s header
    // timeout; meanwhile everyone else is served.
    use std::io::{Read, Write};
    let mut slow = std::net::TcpStream::connect(&agent.addr).unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    assert_eq!(agent.get("/-/healthy").0, 200);
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    assert!(
        started.elapsed() < Duration::from_secs(19),
        "slow client never cut off"
    );
    assert_eq!(agent.get("/-/healthy").0, 200);
}

/// The first sample after a dry buffer describes one driver sample period, not the
/// gap since the sample before it; a dry poll is idle time and nothing is counted
/// twice. The scenario ends idle, so every sample has been read and integrated by the
/// time of the scrape, and the counter must equal the exact ground truth (2.2576 s)
/// up to the default period's guess for the blip (+0.7 ms) and float noise.
///
/// The code before this test (busy fraction weighted by the whole gap since the
/// previous sample, times the poll's elapsed time; the utilization rate on dry polls)
/// fails it: 3.4466 s, 3.4495 s and 3.4503 s in three runs, +1.19 s (+53 %).
#[test]
fn a_blip_after_a_dry_buffer_counts_one_sample_period() {
    let agent = Agent::start(&Scenario::dry_then_busy(), AgentOpts::default());
    let sc = &agent.sc;
    let ready = timeline_ms(sc, agent.wait_ready(Duration::from_secs(20)));
    assert!(
        ready < 2_500,
        "ready at {ready} ms, after the dry start: the machine is too slow for this test"
    );
    // The busy stretch ends at 7.968 s; then idle rounds settle the carry.
    let m = agent.wait_for(
        Duration::from_secs(30),
        "the end of the busy stretch",
        |_| sc.now_ms() >= 9_500,
    );
    let busy = m.gpu("commitmeter_gpu_busy_seconds_total", 0).unwrap();
    let observed = m.gpu("commitmeter_gpu_observed_seconds_total", 0).unwrap();
    let truth = sc.busy_seconds(0, 0, sc.now_ms());
    assert!((truth - 2.2576).abs() < 1e-9);
    eprintln!("busy {busy:.4} s, ground truth {truth:.4} s");
    assert!(
        (busy - truth).abs() <= 0.002,
        "busy {busy:.4} s, ground truth {truth:.4} s; log:\n{}",
        agent.log_text()
    );
    assert!(busy <= observed);
    assert_eq!(
        m.get(
            "commitmeter_gpu_info",
            &[("gpu", "0"), ("busy_source", "samples")]
        ),
        Some(1.0)
    );
}

/// Rounds are atomic for scrapes: every scrape sees, for each GPU healthy all along,
/// exactly as much observed time as sampled time (the same round instants), and the
/// round timestamp moved by exactly the sampled time.
#[test]
fn every_scrape_sees_whole_rounds_on_one_clock() {
    let sc = Scenario {
        gpus: (0..8).map(|i| Gpu::at_util(10 * i)).collect(),
        ..Scenario::default()
    };
    let agent = Agent::start(
        &sc,
        AgentOpts {
            interval: "100ms",
            ..AgentOpts::default()
        },
    );
    agent.wait_ready(Duration::from_secs(20));
    let first = agent.metrics();
    let ts0 = first
        .get("commitmeter_agent_last_round_timestamp_seconds", &[])
        .unwrap();
    let sampled0 = first
        .get("commitmeter_agent_sampled_seconds_total", &[])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    let (mut scrapes, mut last_ts) = (0, ts0);
    while Instant::now() < deadline {
        let m = agent.metrics();
        let ts = m
            .get("commitmeter_agent_last_round_timestamp_seconds", &[])
            .unwrap();
        let sampled = m
            .get("commitmeter_agent_sampled_seconds_total", &[])
            .unwrap();
        assert!(
            ts >= last_ts,
            "the round timestamp went back: {last_ts} → {ts}"
        );
        // Whole milliseconds on both sides.
        assert!(
            ((ts - ts0) - (sampled - sampled0)).abs() < 1e-6,
            "{ts} {sampled}"
        );
        for gpu in 0..8 {
            let observed = m
                .gpu("commitmeter_gpu_observed_seconds_total", gpu)
                .unwrap();
            assert_eq!(observed, sampled, "gpu {gpu}: a scrape saw half a round");
            let ms = observed * 1000.0;
            assert!((ms - ms.round()).abs() < 1e-6, "{observed}");
        }
        last_ts = ts;
        scrapes += 1;
    }
    assert!(last_ts - ts0 > 2.0, "rounds stopped? {ts0} → {last_ts}");
    assert!(scrapes > 20, "{scrapes} scrapes");
}

fn ready_status(agent: &Agent) -> (u16, String) {
    agent.get("/-/ready")
}

/// A driver that hangs blocks the sampling thread inside NVML: `/-/ready` turns 503
/// with the reason once the last round is older than max_gap (5 s here), the round
/// timestamp stops, `/metrics` keeps answering, and SIGTERM still ends the agent.
#[test]
fn a_hung_driver_makes_the_agent_unready_and_freezes_its_round_timestamp() {
    let sc = Scenario {
        hang_at_ms: Some(1_500),
        ..Scenario::default()
    };
    let mut agent = Agent::start(&sc, AgentOpts::default());
    let ready = timeline_ms(&agent.sc, agent.wait_ready(Duration::from_secs(20)));
    assert!(ready < 1_500, "ready at {ready} ms, after the hang began");
    // The last round ends before 1.5 s; 5 s later the agent is no longer ready.
    let deadline = Instant::now() + Duration::from_secs(20);
    let reason = loop {
        let (status, body) = ready_status(&agent);
        if status == 503 {
            break body;
        }
        assert!(Instant::now() < deadline, "still ready: {body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let unready = agent.sc.now_ms();
    assert!(reason.contains("sampling stalled"), "{reason}");
    let frozen = agent.metrics();
    let ts = frozen
        .get("commitmeter_agent_last_round_timestamp_seconds", &[])
        .unwrap();
    let last = last_round_ms(&agent.sc, &frozen);
    assert!(
        last < 1_550,
        "last round at {last} ms, after the hang began"
    );
    assert!(
        unready >= last + 5_000,
        "unready at {unready} ms, last round at {last} ms: sooner than max_gap"
    );
    std::thread::sleep(Duration::from_millis(1_500));
    let started = Instant::now();
    let later = agent.metrics();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        later.get("commitmeter_agent_last_round_timestamp_seconds", &[]),
        Some(ts)
    );
    assert_eq!(
        later.get("commitmeter_agent_polls_total", &[]),
        frozen.get("commitmeter_agent_polls_total", &[])
    );
    assert_eq!(later.get("commitmeter_nvml_up", &[]), Some(1.0));
    assert_eq!(ready_status(&agent).0, 503);
    assert_eq!(agent.get("/-/healthy").0, 200);
    agent.wait_log(Duration::from_secs(10), "sampling stalled");
    assert_eq!(
        agent.log_count("sampling stalled"),
        1,
        "{}",
        agent.log_text()
    );
    // SIGTERM: the stuck thread is left behind, the process exits 0.
    let status = terminate(&mut agent.child, Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
}

/// After a hang the agent resumes: ready again, and neither the sampled span nor a
/// GPU's observed time counts the hang (a gap over max_gap); each healthy GPU's
/// observed time equals the sampled time exactly.
#[test]
fn sampling_resumes_after_a_hang_without_counting_it() {
    let sc = Scenario {
        hang_at_ms: Some(1_500),
        hang_until_ms: Some(8_000),
        ..Scenario::default()
    };
    let agent = Agent::start(&sc, AgentOpts::default());
    let sc = &agent.sc;
    let ready = timeline_ms(sc, agent.wait_ready(Duration::from_secs(20)));
    assert!(ready < 1_500, "ready at {ready} ms, after the hang began");
    let stalled = agent.wait_for(Duration::from_secs(20), "the stall", |_| {
        ready_status(&agent).0 == 503
    });
    let m = agent.wait_for(Duration::from_secs(20), "sampling to resume", |m| {
        sc.now_ms() >= 9_500
            && m.get("commitmeter_agent_polls_total", &[])
                > stalled.get("commitmeter_agent_polls_total", &[])
    });
    assert_eq!(ready_status(&agent).0, 200);
    let sampled = m
        .get("commitmeter_agent_sampled_seconds_total", &[])
        .unwrap();
    // Watched from ready until 1.5 s and from 8 s on: the hang is not in it.
    let watched = (1_500 - ready) as f64 / 1000.0 + (sc.now_ms() - 8_000) as f64 / 1000.0;
    assert!(
        sampled <= watched + 0.1,
        "sampled {sampled} s, watched at most {watched} s"
    );
    for gpu in 0..2 {
        assert_eq!(
            m.gpu("commitmeter_gpu_observed_seconds_total", gpu),
            Some(sampled),
            "gpu {gpu}"
        );
    }
    agent.wait_log(Duration::from_secs(10), "sampling resumed");
    assert_eq!(
        agent.log_count("sampling resumed"),
        1,
        "{}",
        agent.log_text()
    );
}

/// A driver reload that enumerates the GPUs in another order: every series of a GPU
/// keeps the `gpu` label of the index at which the agent first saw its UUID, info
/// included, and the counters go on under the same series.
#[test]
fn gpu_labels_stay_with_the_uuid_when_a_reload_reorders_the_gpus() {
    let sc = Scenario {
        driver_down: vec![[1_500, 2_200]],
        reorder_on_reload: vec![vec![1, 0]],
        sampled_before_ms: 10_000,
        gpus: vec![Gpu::at_util(20), Gpu::at_util(80)],
        ..Scenario::default()
    };
    let agent = Agent::start(&sc, AgentOpts::default());
    let sc = &agent.sc;
    agent.wait_ready(Duration::from_secs(20));
    agent.wait_for(Duration::from_secs(10), "the driver reload", |m| {
        m.get("commitmeter_nvml_up", &[]) == Some(0.0)
    });
    agent.wait_for(Duration::from_secs(10), "NVML back after the reload", |m| {
        m.get("commitmeter_nvml_up", &[]) == Some(1.0)
    });
    std::thread::sleep(Duration::from_millis(2_000));
    let m = agent.metrics();
    assert_eq!(m.series("commitmeter_gpu_info").len(), 2);
    for gpu in 0..2 {
        let uuid = sc.uuid(gpu);
        let label = gpu.to_string();
        let want = [("gpu", label.as_str()), ("uuid", uuid.as_str())];
        let info = [
            ("gpu", label.as_str()),
            ("uuid", uuid.as_str()),
            ("pci_bus_id", &sc.pci_bus_id(gpu)),
        ];
        assert_eq!(m.get("commitmeter_gpu_info", &info), Some(1.0), "gpu {gpu}");
        assert_eq!(m.get("commitmeter_gpu_up", &want), Some(1.0), "gpu {gpu}");
        let observed = m
            .get("commitmeter_gpu_observed_seconds_total", &want)
            .unwrap();
        let busy = m.get("commitmeter_gpu_busy_seconds_total", &want).unwrap();
        assert!(observed > 1.5, "gpu {gpu}: {observed}");
        // The counters of each UUID kept its own load across the reload.
        let load = [0.2, 0.8][gpu];
        assert!(
            (busy / observed - load).abs() < 0.005,
            "gpu {gpu}: busy/observed {}",
            busy / observed
        );
        for name in [
            "commitmeter_gpu_up",
            "commitmeter_gpu_observed_seconds_total",
            "commitmeter_gpu_utilization_ratio",
        ] {
            assert_eq!(m.series(name).len(), 2, "{name}");
        }
    }
    assert!(agent.log_count("GPU present") >= 4, "{}", agent.log_text());
}

/// A sample buffer that stays empty while the GPU is busy is broken, not dry: once the
/// utilization rate has said busy at every read for longer than max_gap (5 s here)
/// without a sample, the agent counts busy time from the rate and says so in
/// `busy_source`. What passed before the switch is lost, as idle.
#[test]
fn a_sample_buffer_empty_while_busy_gives_way_to_the_rate() {
    let sc = Scenario {
        gpus: vec![
            Gpu {
                samples_broken: true,
                ..Gpu::at_util(60)
            },
            Gpu::at_util(60),
        ],
        ..Scenario::default()
    };
    let agent = Agent::start(&sc, AgentOpts::default());
    agent.wait_ready(Duration::from_secs(20));
    let info = |m: &Metrics, gpu: &str, source: &str| {
        m.get(
            "commitmeter_gpu_info",
            &[("gpu", gpu), ("busy_source", source)],
        )
    };
    let m = agent.wait_for(Duration::from_secs(20), "the switch to the rate", |m| {
        info(m, "0", "utilization_rates") == Some(1.0)
    });
    assert_eq!(info(&m, "1", "samples"), Some(1.0));
    assert_eq!(m.series("commitmeter_gpu_info").len(), 2);
    let busy = |m: &Metrics| m.gpu("commitmeter_gpu_busy_seconds_total", 0).unwrap();
    let observed = |m: &Metrics| m.gpu("commitmeter_gpu_observed_seconds_total", 0).unwrap();
    std::thread::sleep(Duration::from_millis(1_500));
    let later = agent.metrics();
    let ratio = (busy(&later) - busy(&m)) / (observed(&later) - observed(&m));
    assert!((ratio - 0.6).abs() < 1e-9, "{ratio}");
    agent.wait_log(Duration::from_secs(10), "the sample buffer stays empty");
    assert_eq!(
        agent.log_count("the sample buffer stays empty"),
        1,
        "{}",
        agent.log_text()
    );
}

/// A slow read of one GPU must not cost another GPU its samples. GPU 2's sample
/// buffer takes 300 ms to read once a second (three sample periods); GPUs 0 and 1,
/// read before it, run at 50 % and 100 %. Mapped from the round's end instead of
/// their own reads, their frontiers passed samples they had not read yet: counted
/// idle, then dropped when they came.
#[test]
fn a_slow_read_of_one_gpu_costs_the_others_no_busy_time() {
    let slow: Vec<[u64; 2]> = (1..=5)
        .flat_map(|s| [[s * 1_000, 300], [s * 1_000 + 500, 0]])
        .collect();
    let sc = Scenario {
        gpus: vec![
            Gpu::at_util(50),
            Gpu::at_util(100),
            Gpu {
                samples_slow: slow,
                ..Gpu::at_util(50)
            },
        ],
        // The driver was sampling before the agent started.
        sampled_before_ms: 10_000,
        ..Scenario::default()
    };
    let agent = Agent::start(&sc, AgentOpts::default());
    let sc = &agent.sc;
    let ready = timeline_ms(sc, agent.wait_ready(Duration::from_secs(20)));
    assert!(
        ready < 1_000,
        "ready at {ready} ms, after the first slow read: the machine is too slow for this test"
    );
    // Past the last slow read, so that the last round ends close to its reads.
    let m = agent.wait_for(Duration::from_secs(30), "the slow reads", |_| {
        sc.now_ms() >= 6_800
    });
    let busy = |gpu| m.gpu("commitmeter_gpu_busy_seconds_total", gpu).unwrap();
    let observed = |gpu| {
        m.gpu("commitmeter_gpu_observed_seconds_total", gpu)
            .unwrap()
    };
    for gpu in 0..3 {
        eprintln!(
            "gpu {gpu}: busy {:.4} s of {:.4} s observed",
            busy(gpu),
            observed(gpu)
        );
    }
    for gpu in [0, 2] {
        let ratio = busy(gpu) / observed(gpu);
        assert!(
            (ratio - 0.5).abs() < 0.005,
            "gpu {gpu} at 50 %: busy / observed {ratio}; log:\n{}",
            agent.log_text()
        );
    }
    // At 100 %, busy read after a slow round beyond that round's observed time waits
    // in the carry until a round has room for it: at most one slow read's 0.3 s.
    assert!(
        busy(1) <= observed(1) && busy(1) >= observed(1) - 0.3 - 0.01,
        "gpu 1 at 100 %: busy {} s, observed {} s",
        busy(1),
        observed(1)
    );
}
