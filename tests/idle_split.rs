//! Real agents on the fake NVML library and a real aggregator: the idle split by cause.
//!
//! Two hosts run the same scripted mix of GPUs — one no job holds, one a job holds without
//! launching anything, one stuck (a kernel always running, the SMs doing nearly nothing),
//! one doing real work, one pre-Hopper without GPM, and one whose job comes and goes — and
//! each host is the whole of one contract: one counts use by `busy`, the other by
//! `sm_active`. Every kind of both contracts is judged against the scenario's exact
//! integrals, and the split against the identity `idle = idle_unallocated + idle_allocated`
//! to the GPU-millisecond.

// Tests read the clock as they please: clippy.toml keeps that to src/clock.rs in the
// product only.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::*;
use nvidia_ml::scenario::cap;

/// A GPU whose job holds it from 0 to 40 s, lets go until 70.23 s, holds it again until
/// 150 s and then for good from 200.11 s: working (busy 80 %, SM 50 %) for the first 25 s
/// of each hold, then waiting on nothing. The steps sit at different phases of the agent's
/// 500 ms rounds, so their placement errors do not cancel.
fn coming_and_going() -> Gpu {
    let holds: [(u64, u64); 3] = [(0, 40_000), (70_230, 150_000), (200_110, 10_000_000)];
    let (mut util, mut procs, mut sm) = (vec![], vec![], vec![]);
    for (from, to) in holds {
        procs.push([from, 1]);
        procs.push([to, 0]);
        util.push([from, 80]);
        util.push([from + 25_000, 0]);
        sm.push([from, 50]);
        sm.push([from + 25_000, 0]);
    }
    Gpu {
        util,
        processes: procs,
        sm_active: Some(sm),
        ..Gpu::default()
    }
}

fn mix() -> Scenario {
    let gpu = |util: u64, procs: u64, sm: u64| Gpu {
        util: vec![[0, util]],
        processes: vec![[0, procs]],
        sm_active: Some(vec![[0, sm]]),
        ..Gpu::default()
    };
    Scenario {
        gpus: vec![
            // Delivered and no job holds it: idle, unallocated.
            gpu(0, 0, 0),
            // A job holds it and launches nothing: idle, allocated, by either signal.
            gpu(0, 1, 0),
            // Stuck: a kernel always running (a hung collective), the SMs nearly idle.
            // Used by `busy`; idle and allocated by `sm_active`.
            Gpu::stuck(1),
            // Real work.
            Gpu {
                tensor_active: vec![[0, 40]],
                ..gpu(90, 1, 70)
            },
            // Pre-Hopper, no GPM: `sm_active` falls back to busy for it.
            Gpu::pre_hopper(60),
            coming_and_going(),
        ],
        ..Scenario::default()
    }
}

/// The truth of a contract over `[from, to)` on the agent's timeline, in GPU-seconds:
/// (delivered, used, idle_allocated) by the contract's signal.
fn truth(sc: &Scenario, sm_signal: bool, from: u64, to: u64) -> (f64, f64, f64) {
    let (mut delivered, mut used, mut held) = (0.0, 0.0, 0.0);
    for g in 0..sc.gpus.len() {
        let gpm = sm_signal && sc.gpus[g].supports(cap::GPM);
        delivered += sc.present_seconds(g, from, to);
        let (u, allocated_used) = if gpm {
            (
                sc.sm_active_seconds(g, from, to),
                sc.allocated_sm_active_seconds(g, from, to),
            )
        } else {
            (
                sc.busy_seconds(g, from, to),
                sc.allocated_busy_seconds(g, from, to),
            )
        };
        used += u;
        held += sc.allocated_seconds(g, from, to) - allocated_used;
    }
    (delivered, used, held)
}

/// Step changes of the scripts inside `[from, to)`: each may be placed up to one sampling
/// round off (processes are read once a round, and a round's time is spread evenly).
fn steps_within(sc: &Scenario, from: u64, to: u64) -> usize {
    sc.gpus
        .iter()
        .flat_map(|g| {
            g.util
                .iter()
                .chain(&g.processes)
                .chain(g.sm_active.iter().flatten())
        })
        .filter(|s| s[0] > from && s[0] < to)
        .count()
}

#[test]
fn idle_split_by_cause_matches_the_scenario_for_busy_and_sm_active_contracts() {
    let hosts = [
        Agent::start(&mix(), AgentOpts::default()),
        Agent::start(&mix(), AgentOpts::default()),
    ];
    for a in &hosts {
        a.wait_ready(Duration::from_secs(20));
    }
    let dir = TempDir::new("idle-split");
    let config = dir.path("aggregator.toml");
    let contract = |id: &str, host: &str, signal: &str| {
        format!(
            "[[contracts]]\nid = \"{id}\"\nprovider = \"p\"\nprice_per_gpu_hour = 3.6\n\
             currency = \"USD\"\ntarget_utilization = 0.9\nstart = \"2026-01-01\"\n\
             usage_signal = \"{signal}\"\nselector = '{{host=\"{host}\"}}'\n\
             ramp = [ {{ from = \"2026-01-01\", gpus = 6 }} ]\n"
        )
    };
    std::fs::write(
        &config,
        format!(
            "[aggregator]\nscrape_interval = \"1s\"\nscrape_timeout = \"1s\"\ngrace = \"2s\"\n\n\
             [[targets]]\ntargets = [\"{}\"]\nlabels = {{ host = \"a\" }}\n\n\
             [[targets]]\ntargets = [\"{}\"]\nlabels = {{ host = \"b\" }}\n\n{}\n{}",
            hosts[0].addr,
            hosts[1].addr,
            contract("by-busy", "a", "busy"),
            contract("by-sm", "b", "sm_active"),
        ),
    )
    .unwrap();
    let agg = Aggregator::start(&config, &dir.path("data"));
    agg.wait_ready(Duration::from_secs(20));
    let m = agg.wait_for(Duration::from_secs(20), "first round", |m| {
        hosts
            .iter()
            .all(|a| m.get("commitmeter_target_up", &[("target", &a.addr)]) == Some(1.0))
    });
    let since = m
        .get("commitmeter_ledger_since_timestamp_seconds", &[])
        .unwrap() as i64;
    // One whole sealed minute at least, with the coming-and-going job's steps inside it.
    let m = agg.wait_for(Duration::from_secs(200), "two sealed minutes", |m| {
        m.get("commitmeter_ledger_sealed_through_timestamp_seconds", &[])
            .unwrap() as i64
            >= since + 120
    });
    let through = m
        .get("commitmeter_ledger_sealed_through_timestamp_seconds", &[])
        .unwrap() as i64;
    let seconds = (through - since) as f64;

    for (host, id, sm_signal) in [(&hosts[0], "by-busy", false), (&hosts[1], "by-sm", true)] {
        let of = |kind: &str| {
            m.get(
                &format!("commitmeter_contract_{kind}_gpu_seconds_total"),
                &[("contract", id)],
            )
            .unwrap_or_else(|| panic!("no {kind} counter of {id}"))
        };
        let start = host.sc.start_unix_ms.unwrap() as i64;
        let (from, to) = (
            (since * 1000 - start).max(0) as u64,
            (through * 1000 - start) as u64,
        );
        let (delivered, used, held) = truth(&host.sc, sm_signal, from, to);
        // Steady GPUs are exact to a driver sample period (100 ms) at the span's edges;
        // a script step costs at most one sampling round (500 ms) at full scale.
        let gpus = host.sc.gpus.len() as f64;
        let tol = 2.0 * 0.1 * gpus + 0.5 * steps_within(&host.sc, from, to) as f64 + 0.01;
        let report = commitmeter::ledger::Kind::NAMES
            .iter()
            .map(|k| format!("{k}={:.3}", of(k)))
            .collect::<Vec<_>>()
            .join(" ");
        let check = |kind: &str, truth: f64, tolerance: f64| {
            let got = of(kind);
            eprintln!(
                "{id} {kind}: ledger {got:.3}, truth {truth:.3}, error {:+.3} GPU-s \
                 (tolerance {tolerance:.2}) over {seconds} s",
                got - truth
            );
            assert!(
                (got - truth).abs() <= tolerance,
                "{id} {kind}: ledger {got:.3}, truth {truth:.3}; {report}\n{}",
                agg.log_text()
            );
        };
        check("committed", 6.0 * seconds, 1e-6);
        check("delivered", delivered, 0.01);
        check("used", used, tol);
        check("idle", delivered - used, tol);
        check("idle_allocated", held, tol);
        check("idle_unallocated", delivered - used - held, 2.0 * tol);
        for kind in ["undelivered", "unreported", "overage"] {
            check(kind, 0.0, 1e-6);
        }
        // The split is a split: exact to the GPU-millisecond.
        let parts = of("idle_unallocated") + of("idle_allocated");
        assert!((of("idle") - parts).abs() < 1e-6, "{report}");
        // Month to date, the same figures.
        for kind in ["idle_unallocated", "idle_allocated"] {
            let mtd = m
                .get(
                    "commitmeter_contract_period_gpu_seconds",
                    &[("contract", id), ("kind", kind)],
                )
                .unwrap();
            assert_month_to_date(
                mtd,
                of(kind),
                period_holds_since(&m, id, since),
                &format!("{id} {kind} month to date"),
            );
        }
    }
    // The stuck GPU is what tells the signals apart: by `busy` it is used, by `sm_active`
    // it is held idle — a full GPU's worth more idle_allocated over the span.
    let held = |id: &str| {
        m.get(
            "commitmeter_contract_idle_allocated_gpu_seconds_total",
            &[("contract", id)],
        )
        .unwrap()
    };
    assert!(held("by-sm") - held("by-busy") > 0.9 * seconds);
    // The pre-Hopper GPU is counted with busy under `sm_active`, and says so.
    assert_eq!(
        m.get(
            "commitmeter_contract_usage_fallback_gpus",
            &[("contract", "by-sm")]
        ),
        Some(1.0)
    );
}
