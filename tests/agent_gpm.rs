//! The real `commitmeter agent` on the fake NVML library with GPM: SM- and tensor-active
//! seconds, the idle split's allocated-busy and allocated-SM-active seconds, stuck and
//! pre-Hopper GPUs, and GPM faults, against the scenario's exact ground truth.

// Tests read the clock as they please: clippy.toml keeps that to src/clock.rs in the
// product only.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::*;

const INTERVAL_S: f64 = 0.5;

/// A counter's growth between two scrapes.
fn delta(m1: &Metrics, m2: &Metrics, name: &str, gpu: usize) -> f64 {
    let v = |m: &Metrics| {
        m.gpu(name, gpu)
            .unwrap_or_else(|| panic!("{name} of gpu {gpu} missing"))
    };
    v(m2) - v(m1)
}

/// |measured − truth| ≤ 1 % of truth + `slack` seconds.
fn assert_within(what: &str, measured: f64, truth: f64, slack: f64) {
    let tolerance = 0.01 * truth.abs() + slack;
    assert!(
        (measured - truth).abs() <= tolerance,
        "{what}: measured {measured:.4}, ground truth {truth:.4} (tolerance {tolerance:.4})"
    );
}

/// A deterministic burst pattern over a minute: a step every 150–900 ms to a level in
/// 0–100 %, from a small linear congruential generator seeded by `seed`.
fn bursts(seed: u64) -> Vec<[u64; 2]> {
    let mut x = seed;
    let mut next = move || {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        x >> 33
    };
    let mut out = Vec::new();
    let mut t = 0;
    while t < 60_000 {
        out.push([t, next() % 101]);
        t += 150 + next() % 751;
    }
    out
}

/// GPU 0 bursts (SM activity, tensor activity and utilization each on its own script,
/// a job that comes and goes), GPU 1 is stuck (a process, 100 % utilization, SMs ~idle),
/// GPU 2 is a pre-Hopper A100 without GPM, GPU 3 has no SM script (it follows the
/// utilization, 50 %).
fn mixed() -> Scenario {
    Scenario {
        gpus: vec![
            Gpu {
                util: bursts(1),
                sm_active: Some(bursts(2)),
                tensor_active: bursts(3),
                processes: vec![[0, 1], [3_700, 0], [6_200, 2]],
                ..Gpu::default()
            },
            Gpu::stuck(1),
            Gpu::pre_hopper(70),
            Gpu::at_util(50),
        ],
        sampled_before_ms: 10_000,
        ..Scenario::default()
    }
}

#[test]
fn sm_and_tensor_active_match_the_exact_integral_over_bursts_and_stuck_and_old_gpus_show() {
    let agent = Agent::start(&mixed(), AgentOpts::default());
    let sc = &agent.sc;
    agent.wait_ready(Duration::from_secs(20));
    // Past the first GPM window, so both scrapes fall in an unbroken chain.
    std::thread::sleep(Duration::from_millis(1_200));
    let m1 = agent.metrics();
    // To the end of the bursty minute the scripts cover.
    std::thread::sleep(Duration::from_millis(60_000u64.saturating_sub(sc.now_ms())));
    let m2 = agent.metrics();
    let (t1, t2) = (last_round_ms(sc, &m1), last_round_ms(sc, &m2));
    assert!(t2 > t1 + 50_000, "rounds at {t1} and {t2} ms");
    let observed = |gpu| delta(&m1, &m2, "commitmeter_gpu_observed_seconds_total", gpu);
    for gpu in 0..4 {
        assert!(
            (observed(gpu) - (t2 - t1) as f64 / 1000.0).abs() < 1e-6,
            "gpu {gpu}: observed {} over rounds {t1}..{t2}",
            observed(gpu)
        );
    }

    // Bursts: GPM windows tile the chain, so between two scrapes the counters are the
    // exact integral of the script over the rounds' span, up to how far each sample
    // precedes its round's instant (milliseconds).
    let d = |name| delta(&m1, &m2, name, 0);
    let sm = d("commitmeter_gpu_sm_active_seconds_total");
    let tensor = d("commitmeter_gpu_tensor_active_seconds_total");
    let sm_truth = sc.sm_active_seconds(0, t1, t2);
    let tensor_truth = sc.tensor_active_seconds(0, t1, t2);
    eprintln!(
        "bursts over {} ms: SM-active {sm:.4} s vs {sm_truth:.4} s, tensor-active {tensor:.4} s vs {tensor_truth:.4} s",
        t2 - t1
    );
    assert_within("gpu 0 SM-active", sm, sm_truth, 0.02);
    assert_within("gpu 0 tensor-active", tensor, tensor_truth, 0.02);
    // The idle split: whole rounds count as allocated or not, by the processes read in
    // them, so each process step may move one interval's worth.
    let steps = 2.0;
    assert_within(
        "gpu 0 allocated",
        d("commitmeter_gpu_allocated_seconds_total"),
        sc.allocated_seconds(0, t1, t2),
        steps * INTERVAL_S,
    );
    assert_within(
        "gpu 0 allocated busy",
        d("commitmeter_gpu_allocated_busy_seconds_total"),
        sc.allocated_busy_seconds(0, t1, t2),
        steps * INTERVAL_S,
    );
    assert_within(
        "gpu 0 allocated SM-active",
        d("commitmeter_gpu_allocated_sm_active_seconds_total"),
        sc.allocated_sm_active_seconds(0, t1, t2),
        steps * INTERVAL_S,
    );

    // Stuck: busy all the time, allocated all the time, SMs at 1 %.
    let d1 = |name| delta(&m1, &m2, name, 1);
    let obs1 = observed(1);
    assert!(d1("commitmeter_gpu_busy_seconds_total") / obs1 > 0.99);
    assert!((d1("commitmeter_gpu_allocated_busy_seconds_total") - obs1).abs() < 0.01 * obs1);
    let sm1 = d1("commitmeter_gpu_sm_active_seconds_total");
    assert_within(
        "stuck SM-active",
        sm1,
        sc.sm_active_seconds(1, t1, t2),
        0.005,
    );
    assert!(sm1 / obs1 < 0.02, "stuck GPU SM-active {sm1} over {obs1} s");
    assert_within(
        "stuck allocated SM-active",
        d1("commitmeter_gpu_allocated_sm_active_seconds_total"),
        sm1,
        0.0,
    );

    // No SM script: SM activity is the utilization, over exactly the observed time.
    let sm3 = delta(&m1, &m2, "commitmeter_gpu_sm_active_seconds_total", 3);
    assert!((sm3 / observed(3) - 0.5).abs() < 0.002, "{sm3}");
    assert_eq!(
        delta(&m1, &m2, "commitmeter_gpu_tensor_active_seconds_total", 3),
        0.0
    );

    // Sources, and a pre-Hopper GPU: no GPM series at all, never a made-up 0.
    for (gpu, source) in [(0, "gpm"), (1, "gpm"), (2, "none"), (3, "gpm")] {
        assert_eq!(
            m2.get(
                "commitmeter_gpu_info",
                &[("uuid", &sc.uuid(gpu)), ("activity_source", source)]
            ),
            Some(1.0),
            "gpu {gpu}"
        );
    }
    for name in [
        "commitmeter_gpu_sm_active_seconds_total",
        "commitmeter_gpu_tensor_active_seconds_total",
        "commitmeter_gpu_allocated_sm_active_seconds_total",
    ] {
        assert_eq!(m2.gpu(name, 2), None, "{name} of the pre-Hopper GPU");
    }
    assert_within(
        "pre-Hopper allocated busy",
        delta(&m1, &m2, "commitmeter_gpu_allocated_busy_seconds_total", 2),
        0.7 * observed(2),
        1e-6,
    );
    assert!(m2
        .series("commitmeter_nvml_errors_total")
        .iter()
        .all(|(l, _)| !l.get("call").is_some_and(|c| c.starts_with("gpm"))));
    assert_eq!(agent.log_count("GPM sampling failing"), 0);

    // Every GPM sample is freed by the time NVML shuts down.
    let mut agent = agent;
    let status = terminate(&mut agent.child, Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        agent.log_count("not freed"),
        0,
        "log:\n{}",
        agent.log_text()
    );
}

#[test]
fn a_gpm_failure_window_is_counted_logged_once_and_disturbs_no_other_counter() {
    let sc = Scenario {
        gpus: vec![
            Gpu {
                util: vec![[0, 60]],
                sm_active: Some(vec![[0, 40]]),
                tensor_active: vec![[0, 20]],
                processes: vec![[0, 1], [5_000, 0]],
                gpm_fail: vec![[2_500, 4_000]],
                ..Gpu::default()
            },
            Gpu::at_util(30),
        ],
        sampled_before_ms: 10_000,
        ..Scenario::default()
    };
    let agent = Agent::start(&sc, AgentOpts::default());
    let sc = &agent.sc;
    let ready = timeline_ms(sc, agent.wait_ready(Duration::from_secs(20)));
    assert!(
        ready < 2_000,
        "ready at {ready} ms: the scenario needs rounds before its fault"
    );
    std::thread::sleep(Duration::from_millis(7_000u64.saturating_sub(sc.now_ms())));
    let m = agent.metrics();
    let end = last_round_ms(sc, &m);

    // Counted (about three rounds' samples), one line when it starts, one when it ends.
    let errors = m
        .get(
            "commitmeter_nvml_errors_total",
            &[("call", "gpm_sample"), ("error", "Unknown")],
        )
        .unwrap_or(0.0);
    assert!((2.0..=4.0).contains(&errors), "{errors} gpm_sample errors");
    agent.wait_log(Duration::from_secs(10), "GPM sampling failing");
    assert_eq!(
        agent.log_count("GPM sampling failing"),
        1,
        "{}",
        agent.log_text()
    );
    agent.wait_log(Duration::from_secs(10), "GPM sampling recovered");
    assert_eq!(agent.log_count("GPM sampling recovered"), 1);
    assert_eq!(m.gpu("commitmeter_gpu_up", 0), Some(1.0));

    // Nothing else moved: both GPUs observed the same rounds, and busy, allocated and
    // allocated busy match the truth as on a GPU without faults.
    let g = |name, gpu| m.gpu(name, gpu).unwrap();
    let observed = g("commitmeter_gpu_observed_seconds_total", 0);
    assert_eq!(observed, g("commitmeter_gpu_observed_seconds_total", 1));
    let slack = INTERVAL_S + 0.15;
    for (name, truth) in [
        (
            "commitmeter_gpu_observed_seconds_total",
            sc.present_seconds(0, ready, end),
        ),
        (
            "commitmeter_gpu_busy_seconds_total",
            sc.busy_seconds(0, ready, end),
        ),
        (
            "commitmeter_gpu_allocated_seconds_total",
            sc.allocated_seconds(0, ready, end),
        ),
        (
            "commitmeter_gpu_allocated_busy_seconds_total",
            sc.allocated_busy_seconds(0, ready, end),
        ),
    ] {
        assert_within(name, g(name, 0), truth, slack);
    }
    assert!((g("commitmeter_gpu_busy_seconds_total", 0) / observed - 0.6).abs() < 0.005);

    // SM activity: 40 % of the observed time less the failed stretch (1.5 s) and at
    // most two rounds around it (the window open when it began, the baseline after).
    let sm = g("commitmeter_gpu_sm_active_seconds_total", 0);
    let tensor = g("commitmeter_gpu_tensor_active_seconds_total", 0);
    assert!(sm <= 0.4 * (observed - 1.5) + 1e-6, "{sm} of {observed} s");
    assert!(
        sm >= 0.4 * (observed - 1.5 - 3.0 * INTERVAL_S) - 1e-6,
        "{sm}"
    );
    assert!((tensor / sm - 0.5).abs() < 1e-6, "{tensor} vs {sm}");
    assert!(g("commitmeter_gpu_allocated_sm_active_seconds_total", 0) <= sm + 1e-9);
    // The other GPU's SM activity is whole.
    let sm1 = g("commitmeter_gpu_sm_active_seconds_total", 1);
    let observed1 = g("commitmeter_gpu_observed_seconds_total", 1);
    assert!(
        (sm1 / observed1 - 0.3).abs() < 0.002,
        "{sm1} of {observed1}"
    );
}

#[test]
fn a_driver_reload_frees_every_sample_and_keeps_the_gpm_decision() {
    let sc = Scenario {
        driver_down: vec![[2_000, 3_000]],
        gpus: vec![Gpu {
            sm_active: Some(vec![[0, 40]]),
            ..Gpu::at_util(70)
        }],
        ..Scenario::default()
    };
    let agent = Agent::start(&sc, AgentOpts::default());
    agent.wait_ready(Duration::from_secs(20));
    agent.wait_for(Duration::from_secs(10), "the driver reload", |m| {
        m.get("commitmeter_nvml_up", &[]) == Some(0.0)
    });
    agent.wait_for(Duration::from_secs(10), "NVML back after the reload", |m| {
        m.gpu("commitmeter_gpu_up", 0) == Some(1.0)
    });
    std::thread::sleep(Duration::from_millis(2_000));
    let m = agent.metrics();
    let observed = m.gpu("commitmeter_gpu_observed_seconds_total", 0).unwrap();
    let sm = m.gpu("commitmeter_gpu_sm_active_seconds_total", 0).unwrap();
    // A GPM window never spans the reload: the first round of each session is a
    // baseline, so SM-active is 40 % of observed less up to one round per session.
    assert!(sm <= 0.4 * observed + 1e-9, "{sm} of {observed} s");
    assert!(
        sm >= 0.4 * (observed - 2.0 * INTERVAL_S) - 1e-6,
        "{sm} of {observed} s"
    );
    assert_eq!(
        m.get("commitmeter_gpu_info", &[("activity_source", "gpm")]),
        Some(1.0)
    );
    assert_eq!(m.series("commitmeter_gpu_info").len(), 1);
    // The old session's samples were freed before its NVML shut down.
    assert_eq!(agent.log_count("NVML initialized"), 2);
    assert_eq!(
        agent.log_count("not freed"),
        0,
        "log:\n{}",
        agent.log_text()
    );
}

#[test]
fn an_old_driver_without_gpm_symbols_exports_no_gpm_series() {
    let agent = Agent::start(
        &Scenario {
            gpus: vec![Gpu::at_util(40)],
            ..Scenario::default()
        },
        AgentOpts {
            library: Some(fake_library("nvidia_ml_old")),
            ..AgentOpts::default()
        },
    );
    let m = agent.wait_for(Duration::from_secs(20), "two rounds", |m| {
        m.get("commitmeter_agent_polls_total", &[]) >= Some(2.0)
    });
    assert_eq!(
        m.get("commitmeter_gpu_info", &[("activity_source", "none")]),
        Some(1.0)
    );
    for name in [
        "commitmeter_gpu_sm_active_seconds_total",
        "commitmeter_gpu_tensor_active_seconds_total",
        "commitmeter_gpu_allocated_sm_active_seconds_total",
    ] {
        assert!(m.series(name).is_empty(), "{name}");
    }
    // A missing capability is not an error.
    assert!(m.series("commitmeter_nvml_errors_total").is_empty());
    assert!(!agent.log_text().contains("panicked"));
}

/// The agent's CPU time per round with and without GPM, 8 fake GPUs polled every
/// 200 ms (so that every round takes a GPM sample: at 100 ms every other round skips),
/// by `/proc/PID/task/*/schedstat`; the fake library runs in the agent's process, so its
/// own work is included. Not a timed test:
/// `cargo test --release --test agent_gpm -- --ignored --nocapture gpm_cost`.
#[test]
#[ignore = "a measurement, not a check: run by hand"]
fn gpm_cost_per_poll() {
    let secs: u64 = std::env::var("COMMITMETER_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    // Alternating, so that a change in the machine's load shows as disagreeing pairs.
    for gpm in [false, true, false, true, false, true] {
        let gpus = (0..8)
            .map(|i| Gpu {
                unsupported: if gpm { vec![] } else { vec!["gpm".into()] },
                ..Gpu::at_util(10 * i)
            })
            .collect();
        let agent = Agent::start(
            &Scenario {
                gpus,
                ..Scenario::default()
            },
            AgentOpts {
                interval: "200ms",
                log_level: "info",
                ..AgentOpts::default()
            },
        );
        agent.wait_ready(Duration::from_secs(30));
        let pid = agent.child.id();
        let polls = |m: &Metrics| m.get("commitmeter_agent_polls_total", &[]).unwrap_or(0.0);
        let (cpu0, p0) = (cpu_ns(pid), polls(&agent.metrics()));
        std::thread::sleep(Duration::from_secs(secs));
        let (cpu1, p1) = (cpu_ns(pid), polls(&agent.metrics()));
        let per_poll_us = (cpu1 - cpu0) as f64 / 1e3 / (p1 - p0);
        println!(
            "gpm {}: 8 fake GPUs every 200 ms, {} rounds, {per_poll_us:.1} µs CPU per round ({:.2} µs per GPU)",
            if gpm { "on " } else { "off" },
            p1 - p0,
            per_poll_us / 8.0
        );
    }
    // The GPM calls alone, through nvml-wrapper on the fake in this process: what a
    // round adds per GPU (a sample allocated, taken and freed; one metrics call).
    let nvml = nvml_wrapper::Nvml::builder()
        .lib_path(fake_library("nvidia_ml").as_os_str())
        .init()
        .unwrap();
    let dev = nvml.device_by_index(0).unwrap();
    let n = 20_000u32;
    let start = std::time::Instant::now();
    for _ in 0..n {
        drop(dev.gpm_sample().unwrap());
    }
    let sample_us = start.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    let first = dev.gpm_sample().unwrap();
    std::thread::sleep(Duration::from_millis(150));
    let second = dev.gpm_sample().unwrap();
    let ids = [
        nvml_wrapper::enums::gpm::GpmMetricId::SmUtil,
        nvml_wrapper::enums::gpm::GpmMetricId::AnyTensorUtil,
    ];
    let start = std::time::Instant::now();
    for _ in 0..n {
        nvml_wrapper::gpm::gpm_metrics_get(&nvml, &first, &second, &ids).unwrap();
    }
    let metrics_us = start.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    println!(
        "gpm calls on the fake: sample (alloc, get, free) {sample_us:.2} µs, metrics (SM, tensor) {metrics_us:.2} µs: {:.2} µs per GPU and round",
        sample_us + metrics_us
    );
}

#[test]
fn a_gpm_failure_from_the_first_sample_still_gives_the_series_from_the_first_round() {
    // The driver says GPM is supported, and its samples fail for the first 3 s.
    let sc = Scenario {
        gpus: vec![Gpu {
            util: vec![[0, 60]],
            sm_active: Some(vec![[0, 40]]),
            gpm_fail: vec![[0, 3_000]],
            ..Gpu::default()
        }],
        sampled_before_ms: 10_000,
        ..Scenario::default()
    };
    let agent = Agent::start(&sc, AgentOpts::default());
    let sc = &agent.sc;
    agent.wait_ready(Duration::from_secs(20));
    let m = agent.metrics();
    let at = last_round_ms(sc, &m);
    assert!(at < 2_500, "first scrape after the round at {at} ms");
    // Already there, at 0, while the samples fail: the GPU will not switch signal later.
    assert_eq!(
        m.gpu("commitmeter_gpu_sm_active_seconds_total", 0),
        Some(0.0)
    );
    assert_eq!(
        m.get(
            "commitmeter_gpu_info",
            &[("gpu", "0"), ("activity_source", "gpm")]
        ),
        Some(1.0)
    );
    let m = agent.wait_for(Duration::from_secs(10), "SM activity counted", |m| {
        m.gpu("commitmeter_gpu_sm_active_seconds_total", 0)
            .is_some_and(|s| s > 0.5)
    });
    assert!(
        m.get(
            "commitmeter_nvml_errors_total",
            &[("call", "gpm_sample"), ("error", "Unknown")]
        )
        .is_some_and(|n| n >= 1.0),
        "the failures are counted"
    );
}
