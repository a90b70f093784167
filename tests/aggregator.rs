//! Real agents on the fake NVML library and a real aggregator: SIGKILL mid-run leaves the
//! sealed month-to-date totals equal to the fleet's ground truth; our own mistakes (a wrong
//! port, another exporter on the port) are unreported, never undelivered; a hostile agent's
//! impossible counters are rejected and counted while the honest hosts' figures stay exact.

// Tests read the clock and open SQLite as they please: clippy.toml keeps that to
// src/clock.rs and src/aggregator/store.rs in the product only.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::{Duration, Instant};

use common::*;

const CONTRACT: &[(&str, &str)] = &[("contract", "lab")];

fn counter(m: &Metrics, kind: &str) -> f64 {
    m.get(
        &format!("commitmeter_contract_{kind}_gpu_seconds_total"),
        CONTRACT,
    )
    .unwrap_or_else(|| panic!("no {kind} counter"))
}

#[test]
fn sigkill_mid_run_keeps_month_to_date_equal_to_ground_truth() {
    // Two agents for the contract (4 GPUs at 60 %, 2 GPUs at 30 % of which one is
    // lost after 50 s), one for no contract, one that hangs for good.
    let a = Agent::start(
        &Scenario {
            gpus: (0..4).map(|_| Gpu::at_util(60)).collect(),
            ..Scenario::default()
        },
        AgentOpts::default(),
    );
    let b = Agent::start(
        &Scenario {
            gpus: vec![
                Gpu::at_util(30),
                Gpu {
                    lost_at_ms: Some(50_000),
                    ..Gpu::at_util(30)
                },
            ],
            ..Scenario::default()
        },
        AgentOpts::default(),
    );
    let other = Agent::start(&Scenario::default(), AgentOpts::default());
    let doomed = Agent::start(
        &Scenario {
            gpus: vec![Gpu::at_util(100)],
            ..Scenario::default()
        },
        AgentOpts::default(),
    );
    for agent in [&a, &b, &other, &doomed] {
        agent.wait_ready(Duration::from_secs(20));
    }
    let dir = TempDir::new("aggregator");
    let config = dir.path("aggregator.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[aggregator]
scrape_interval = "1s"
scrape_timeout = "1s"
grace = "2s"

[[targets]]
targets = ["{}", "{}", "{}"]
labels = {{ provider = "acme", cluster = "east-1" }}

[[targets]]
targets = ["{}"]
labels = {{ provider = "other" }}

[[contracts]]
id = "lab"
provider = "acme"
price_per_gpu_hour = 3.6
currency = "USD"
target_utilization = 0.9
timezone = "Europe/Berlin"
start = "2026-01-01"
selector = '{{provider="acme"}}'
ramp = [ {{ from = "2026-01-01", gpus = 8 }} ]
"#,
            a.addr, b.addr, doomed.addr, other.addr
        ),
    )
    .unwrap();
    let data = dir.path("data");
    // Host checkpoints every round: the mode in which kill -9 costs nothing (with the
    // default hourly checkpoints, hosts re-baseline after a crash; tests/ledger_storage.rs).
    let every_round = ["--storage.host-checkpoint-interval=0s".to_string()];
    let agg = Aggregator::start_with(&config, &data, &every_round);
    agg.wait_ready(Duration::from_secs(20));
    let m = agg.wait_for(Duration::from_secs(20), "first round", |m| {
        m.get("commitmeter_target_up", &[("target", &a.addr)]) == Some(1.0)
    });
    let since = m
        .get("commitmeter_ledger_since_timestamp_seconds", &[])
        .unwrap() as i64;
    assert_eq!(
        m.get(
            "commitmeter_target_up",
            &[("target", &other.addr), ("contract", "")]
        ),
        Some(1.0)
    );

    // Let the first minute seal, then kill the doomed agent and, mid-minute, the aggregator.
    agg.wait_for(Duration::from_secs(150), "a sealed minute", |m| {
        m.get("commitmeter_ledger_sealed_through_timestamp_seconds", &[])
            .unwrap() as i64
            > since
    });
    // Each round reuses its agent's connection from the round before: one per agent
    // stays open between rounds; agent `a` sees it (beside this test's own).
    let m = agg.wait_for(Duration::from_secs(20), "a connection per agent", |m| {
        m.get("commitmeter_scrape_connections", &[]) == Some(4.0)
    });
    assert_eq!(m.get("commitmeter_scrape_connections", &[]), Some(4.0));
    // (Polled: a scrape that timed out on a loaded machine closes its connection until
    // the next round.)
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let open = a.metrics().get("commitmeter_http_connections", &[]);
        if open == Some(2.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agent a's open connections: {open:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(20));
    // SIGSTOP, not a kill: a hung host, and its port cannot be reused by another
    // test's agent while the aggregator keeps trying it.
    let pid = doomed.child.id();
    signal(pid, "-STOP");
    let doomed_died_ms = now_unix_ms();
    std::thread::sleep(Duration::from_secs(5));
    let before = agg.metrics();
    agg.kill9();
    let agg = Aggregator::start_with(&config, &data, &every_round);
    agg.wait_log(Duration::from_secs(5), "ledger restored");
    let sealed_before = before
        .get("commitmeter_ledger_sealed_through_timestamp_seconds", &[])
        .unwrap() as i64;
    let m = agg.wait_for(
        Duration::from_secs(90),
        "the minute of the crash to seal",
        |m| {
            m.get("commitmeter_ledger_sealed_through_timestamp_seconds", &[])
                .unwrap() as i64
                > sealed_before
        },
    );
    let through = m
        .get("commitmeter_ledger_sealed_through_timestamp_seconds", &[])
        .unwrap() as i64;
    // Counters never went back across the crash.
    for kind in commitmeter::ledger::Kind::NAMES {
        assert!(
            counter(&m, kind) >= counter(&before, kind),
            "{kind} went back"
        );
    }

    // Ground truth over the sealed span [since, through).
    let span = |agent: &Agent| {
        let start = agent.sc.start_unix_ms.unwrap() as i64;
        (
            (since * 1000 - start).max(0) as u64,
            (through * 1000 - start) as u64,
        )
    };
    let (mut delivered, mut used) = (0.0, 0.0);
    for agent in [&a, &b] {
        let (from, to) = span(agent);
        for g in 0..agent.sc.gpus.len() {
            delivered += agent.sc.present_seconds(g, from, to);
            used += agent.sc.busy_seconds(g, from, to);
        }
    }
    let (from, _) = span(&doomed);
    let died = (doomed_died_ms - doomed.sc.start_unix_ms.unwrap() as i64) as u64;
    delivered += doomed.sc.present_seconds(0, from, died);
    used += doomed.sc.busy_seconds(0, from, died);
    let unreported_truth = (through * 1000 - doomed_died_ms) as f64 / 1000.0;
    let seconds = (through - since) as f64;

    // What the design promises against the fake driver's exact timeline (README, "How
    // accurate"): steady GPUs to the ms; a GPU lost while its agent runs, within one
    // sampling round (500 ms: its last healthy round); the agent that hangs, within one
    // round plus one scrape (1 s: the rounds after its last scrape are never read);
    // busy time, also within one driver sample period (100 ms) per GPU at the span's
    // edges. None of it is a share of the truth.
    const ROUND: f64 = 0.5;
    const SCRAPE: f64 = 1.0;
    const PERIOD: f64 = 0.1;
    const MS: f64 = 0.01;
    let delivered_tol = ROUND + (ROUND + SCRAPE) + MS;
    let used_tol = delivered_tol + 7.0 * PERIOD;
    let unreported_tol = ROUND + SCRAPE + MS;
    let report: Vec<String> = commitmeter::ledger::Kind::NAMES
        .iter()
        .map(|k| format!("{k}={:.1}", counter(&m, k)))
        .collect();
    // Derived figures carry the error of each measured one they are made of.
    let check = |kind: &str, truth: f64, tolerance: f64| {
        let got = counter(&m, kind);
        eprintln!(
            "{kind}: ledger {got:.3}, ground truth {truth:.3}, error {:+.3} GPU-s (tolerance {tolerance:.3}) over {seconds} s",
            got - truth
        );
        assert!(
            (got - truth).abs() <= tolerance,
            "{kind}: ledger {got:.1}, ground truth {truth:.1} (tolerance {tolerance:.1}) over {seconds} s; ledger: {}\n{}",
            report.join(" "),
            agg.log_text()
        );
    };
    check("committed", 8.0 * seconds, 1e-6);
    check("delivered", delivered, delivered_tol);
    check("used", used, used_tol);
    check("unreported", unreported_truth, unreported_tol);
    let undelivered = 8.0 * seconds - delivered - unreported_truth;
    check("undelivered", undelivered, delivered_tol + unreported_tol);
    check("idle", delivered - used, delivered_tol + used_tol);
    assert_eq!(counter(&m, "overage"), 0.0);
    // The identity, exactly (to the GPU-millisecond).
    let lhs = counter(&m, "committed");
    let rhs = counter(&m, "used") - counter(&m, "overage")
        + counter(&m, "idle")
        + counter(&m, "undelivered")
        + counter(&m, "unreported");
    assert!((lhs - rhs).abs() < 1e-6, "{lhs} != {rhs}");

    // Month-to-date: everything sealed so far is in this billing period.
    let mtd = |kind: &str| {
        m.get(
            "commitmeter_contract_period_gpu_seconds",
            &[("contract", "lab"), ("kind", kind)],
        )
        .unwrap()
    };
    let whole_run = period_holds_since(&m, "lab", since);
    for kind in ["committed", "used", "idle", "undelivered", "unreported"] {
        assert_month_to_date(mtd(kind), counter(&m, kind), whole_run, kind);
    }
    // The period's ratio and cost follow its month-to-date figures.
    if mtd("committed") > 0.0 {
        let util = m
            .get("commitmeter_contract_utilization_ratio", CONTRACT)
            .unwrap();
        assert!((util - (mtd("used") / mtd("committed"))).abs() < 1e-9);
    }
    let cost_used = m
        .get(
            "commitmeter_contract_period_cost",
            &[("contract", "lab"), ("kind", "used")],
        )
        .unwrap();
    assert!((cost_used - mtd("used") / 3600.0 * 3.6).abs() < 1e-6);
    assert_eq!(
        m.get("commitmeter_contract_committed_gpus", CONTRACT),
        Some(8.0)
    );
    assert_eq!(
        m.get("commitmeter_target_up", &[("target", &doomed.addr)]),
        Some(0.0)
    );
    drop(other);
}

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn config_mistakes_name_file_contract_and_field() {
    let dir = TempDir::new("aggcfg");
    let cases = [
        (
            "[[contracts]]\nid = \"x\"\nprovider = \"p\"\nprice_per_gpu_hour = 1.0\ncurrency = \"USD\"\nstart = \"2026-01-01\"\nselector = '{a=\"b\"}'\nramp = [{ from = \"2026-01-01\", gpus = -5 }]\n",
            "contract \"x\": ramp[0].gpus",
        ),
        (
            "[[contracts]]\nid = \"x\"\nprovider = \"p\"\nprice_per_gpu_hour = 1.0\ncurrency = \"USD\"\nstart = \"2026-01-01\"\ntimezone = \"Mars/Olympus\"\nselector = '{a=\"b\"}'\nramp = [{ from = \"2026-01-01\", gpus = 5 }]\n",
            "contract \"x\": timezone",
        ),
        ("[aggregator]\nscrape_intervall = \"1s\"\n", "unknown field `scrape_intervall`"),
    ];
    for (text, expected) in cases {
        let file = dir.path("aggregator.toml");
        std::fs::write(&file, text).unwrap();
        for args in [
            vec!["check-config".to_string(), file.display().to_string()],
            vec![
                "aggregator".to_string(),
                format!("--config.file={}", file.display()),
                "--web.listen-address=127.0.0.1:0".to_string(),
                format!("--storage.path={}", dir.path("data").display()),
            ],
        ] {
            let out = std::process::Command::new(BIN)
                .args(&args)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
            assert!(
                stderr.contains(&file.display().to_string()) && stderr.contains(expected),
                "{args:?}: {stderr}"
            );
            assert!(!stderr.contains("serving"), "{stderr}");
        }
        // Nothing started: no ledger was created.
        assert!(!dir.path("data").exists());
    }
    let ok = dir.path("agent.toml");
    std::fs::write(&ok, "[labels]\ncluster = \"a\"\n").unwrap();
    let out = std::process::Command::new(BIN)
        .args(["check-config", &ok.display().to_string()])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("agent config OK"));
}

#[test]
fn file_sd_changes_and_sighup_are_picked_up_a_bad_edit_loses_nothing_and_no_series_goes_stale() {
    let a = Agent::start(&Scenario::default(), AgentOpts::default());
    let b = Agent::start(&Scenario::default(), AgentOpts::default());
    let dir = TempDir::new("filesd");
    let sd_dir = dir.path("targets");
    std::fs::create_dir_all(&sd_dir).unwrap();
    let sd = sd_dir.join("gpus.json");
    let write = |targets: &[&str]| {
        let list: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        std::fs::write(
            &sd,
            format!(
                r#"[{{"targets":[{}],"labels":{{"provider":"acme"}}}}]"#,
                list.join(",")
            ),
        )
        .unwrap();
    };
    write(&[&a.addr]);
    let config = dir.path("aggregator.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[aggregator]
scrape_interval = "1s"
scrape_timeout = "1s"

[[file_sd]]
files = ["{}/*.json"]

{}
{}"#,
            sd_dir.display(),
            contract_toml("lab", r#"{provider="acme"}"#, 4),
            contract_toml("lab2", r#"{provider="acme2"}"#, 4),
        ),
    )
    .unwrap();
    let agg = Aggregator::start(&config, &dir.path("data"));
    let up_in = |m: &Metrics, t: &str, contract: &str| {
        m.get(
            "commitmeter_target_up",
            &[("target", t), ("contract", contract)],
        )
    };
    let up = |m: &Metrics, t: &str| up_in(m, t, "lab");
    agg.wait_for(Duration::from_secs(20), "agent a", |m| {
        up(m, &a.addr) == Some(1.0)
    });
    // A change to the file is noticed without a signal.
    write(&[&a.addr, &b.addr]);
    agg.wait_for(
        Duration::from_secs(20),
        "agent b from the changed file",
        |m| up(m, &b.addr) == Some(1.0),
    );
    // A broken edit keeps the last good targets and is reported.
    std::fs::write(&sd, "[{\"targets\": [").unwrap();
    let m = agg.wait_for(Duration::from_secs(20), "the problem gauge", |m| {
        m.get("commitmeter_targets_config_problems", &[]) == Some(1.0)
    });
    assert_eq!(up(&m, &a.addr), Some(1.0));
    assert_eq!(up(&m, &b.addr), Some(1.0));
    assert!(agg.log_text().contains("keeping its last good contents"));
    // Removing b; SIGHUP forces a re-read even when size and mtime look unchanged.
    write(&[&a.addr]);
    let pid = agg.child.id();
    signal(pid, "-HUP");
    let m = agg.wait_for(Duration::from_secs(20), "b removed", |m| {
        up(m, &b.addr).is_none()
    });
    assert!(agg.log_text().contains("SIGHUP"));
    for series in [
        "commitmeter_target_scrape_duration_seconds",
        "commitmeter_target_gpus",
    ] {
        assert_eq!(m.get(series, &[("target", &b.addr)]), None, "{series}");
    }
    // A target that moves to another contract leaves no series behind under the old one.
    std::fs::write(
        &sd,
        format!(
            r#"[{{"targets":["{}"],"labels":{{"provider":"acme"}}}},{{"targets":["{}"],"labels":{{"provider":"acme2"}}}}]"#,
            a.addr, b.addr
        ),
    )
    .unwrap();
    agg.wait_for(Duration::from_secs(20), "b under lab2", |m| {
        up_in(m, &b.addr, "lab2") == Some(1.0)
    });
    std::fs::write(
        &sd,
        format!(
            r#"[{{"targets":["{}"],"labels":{{"provider":"acme2"}}}}]"#,
            a.addr
        ),
    )
    .unwrap();
    let m = agg.wait_for(Duration::from_secs(20), "a moved to lab2", |m| {
        up_in(m, &a.addr, "lab2") == Some(1.0)
    });
    assert_eq!(up_in(&m, &a.addr, "lab"), None);
    assert_eq!(up_in(&m, &b.addr, "lab2"), None);
}

#[test]
fn sighup_reloads_targets_a_bad_reload_keeps_the_old_config_and_sigterm_stops_cleanly() {
    let a = Agent::start(&Scenario::default(), AgentOpts::default());
    let b = Agent::start(&Scenario::default(), AgentOpts::default());
    let dir = TempDir::new("reload");
    let config = dir.path("aggregator.toml");
    let write = |targets: &[&str], price: f64| {
        let list: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        std::fs::write(
            &config,
            format!(
                "[aggregator]\nscrape_interval = \"1s\"\nscrape_timeout = \"1s\"\n\n\
                 [[targets]]\ntargets = [{}]\nlabels = {{ provider = \"acme\" }}\n\n\
                 [[contracts]]\nid = \"lab\"\nprovider = \"acme\"\nprice_per_gpu_hour = {price:.1}\ncurrency = \"EUR\"\n\
                 start = \"2026-01-01\"\nselector = '{{provider=\"acme\"}}'\nramp = [ {{ from = \"2026-01-01\", gpus = 4 }} ]\n",
                list.join(", ")
            ),
        )
        .unwrap();
    };
    write(&[&a.addr], 1.0);
    let mut agg = Aggregator::start(&config, &dir.path("data"));
    agg.wait_ready(Duration::from_secs(20));
    let pid = agg.child.id();
    let up = |m: &Metrics, t: &str| m.get("commitmeter_target_up", &[("target", t)]);
    let gauge = |m: &Metrics, name: &str| m.get(name, &[]);

    // A good reload adds a target at once.
    write(&[&a.addr, &b.addr], 1.0);
    signal(pid, "-HUP");
    let m = agg.wait_for(Duration::from_secs(20), "b after reload", |m| {
        up(m, &b.addr) == Some(1.0)
    });
    assert_eq!(
        gauge(&m, "commitmeter_config_last_reload_successful"),
        Some(1.0)
    );
    assert_eq!(gauge(&m, "commitmeter_config_restart_required"), Some(0.0));

    // A bad reload keeps the running config, says so, and sets the metric.
    std::fs::write(&config, "[aggregator]\nscrape_interval = 5\n").unwrap();
    signal(pid, "-HUP");
    let m = agg.wait_for(Duration::from_secs(20), "the failed reload", |m| {
        gauge(m, "commitmeter_config_last_reload_successful") == Some(0.0)
    });
    assert_eq!(up(&m, &a.addr), Some(1.0));
    assert_eq!(up(&m, &b.addr), Some(1.0));
    assert!(
        agg.log_text().contains("config reload failed"),
        "{}",
        agg.log_text()
    );

    // A contract change is accepted but applies at the next restart.
    write(&[&a.addr, &b.addr], 2.0);
    signal(pid, "-HUP");
    agg.wait_for(Duration::from_secs(20), "restart required", |m| {
        gauge(m, "commitmeter_config_restart_required") == Some(1.0)
            && gauge(m, "commitmeter_config_last_reload_successful") == Some(1.0)
    });

    // SIGTERM: drains and exits 0.
    let status = terminate(&mut agg.child, Duration::from_secs(20));
    assert!(status.success(), "{status:?}\n{}", agg.log_text());
}

// ---- What each figure proves ----

fn of(m: &Metrics, contract: &str, kind: &str) -> f64 {
    m.get(
        &format!("commitmeter_contract_{kind}_gpu_seconds_total"),
        &[("contract", contract)],
    )
    .unwrap_or_else(|| panic!("no {kind} counter of {contract}"))
}

/// Delivered and busy seconds of an honest agent's GPUs over `[since, through)`.
fn truth(agent: &Agent, since: i64, through: i64) -> (f64, f64) {
    let start = agent.sc.start_unix_ms.unwrap() as i64;
    let (from, to) = (
        (since * 1000 - start).max(0) as u64,
        (through * 1000 - start) as u64,
    );
    (0..agent.sc.gpus.len()).fold((0.0, 0.0), |(d, u), g| {
        (
            d + agent.sc.present_seconds(g, from, to),
            u + agent.sc.busy_seconds(g, from, to),
        )
    })
}

#[test]
fn our_mistakes_are_unreported_a_hostile_agent_is_rejected_and_a_masked_restart_loses_nothing() {
    let honest = |util| {
        Agent::start(
            &Scenario {
                gpus: vec![Gpu::at_util(util), Gpu::at_util(util)],
                ..Scenario::default()
            },
            AgentOpts::default(),
        )
    };
    let a = honest(50);
    let b = honest(80);
    // Another exporter on an agent's port: 200, but no GPU series.
    let other = Exporter::start(|_| "node_load1 0.5\nup 1\n".into());
    let (_held, wrong_port) = silent_port();
    // Hostile agents: a value no counter can hold; a counter racing 10^6 s per scrape next
    // to busy 50x observed; counters that go down every other scrape; one UUID twice.
    let absurd = Exporter::start(|_| {
        "commitmeter_gpu_observed_seconds_total{gpu=\"0\",uuid=\"GPU-x\"} 1e300\n".into()
    });
    let racing = Exporter::start(|n| {
        format!(
            "commitmeter_gpu_observed_seconds_total{{gpu=\"0\",uuid=\"GPU-r0\"}} {}\n\
             commitmeter_gpu_busy_seconds_total{{gpu=\"0\",uuid=\"GPU-r0\"}} 0\n\
             commitmeter_gpu_observed_seconds_total{{gpu=\"1\",uuid=\"GPU-r1\"}} {n}\n\
             commitmeter_gpu_busy_seconds_total{{gpu=\"1\",uuid=\"GPU-r1\"}} {}\n",
            n as f64 * 1e6,
            n * 50
        )
    });
    let flapping = Exporter::start(|n| {
        let v = if n % 2 == 0 { 1000 + n } else { n };
        format!(
            "commitmeter_gpu_observed_seconds_total{{gpu=\"0\",uuid=\"GPU-f\"}} {v}\n\
             commitmeter_gpu_busy_seconds_total{{gpu=\"0\",uuid=\"GPU-f\"}} {v}\n"
        )
    });
    let twice = Exporter::start(|n| {
        format!(
            "commitmeter_gpu_observed_seconds_total{{gpu=\"0\",uuid=\"GPU-t\"}} {n}\n\
             commitmeter_gpu_observed_seconds_total{{gpu=\"1\",uuid=\"GPU-t\"}} {}\n",
            100 * n
        )
    });
    for agent in [&a, &b] {
        agent.wait_ready(Duration::from_secs(20));
    }
    let dir = TempDir::new("evidence");
    let config = dir.path("aggregator.toml");
    // The restart contract's host comes through file_sd, behind a stable instance name.
    let sd = dir.path("restart.json");
    std::fs::write(&sd, "[]").unwrap();
    let instance = "gpu-host-1:9473";
    let place_restart_host = |addr: &str| {
        std::fs::write(
            &sd,
            format!(
                r#"[{{"targets":["{addr}"],"labels":{{"instance":"{instance}","provider":"restart"}}}}]"#
            ),
        )
        .unwrap();
    };
    let list = |t: &[&str]| {
        t.iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    std::fs::write(
        &config,
        format!(
            r#"
[aggregator]
scrape_interval = "1s"
scrape_timeout = "1s"
grace = "10s"

[[targets]]
targets = [{}]
labels = {{ provider = "mistakes" }}

[[targets]]
targets = [{}]
labels = {{ provider = "hostile" }}

[[file_sd]]
files = ["{}"]

{}
{}
{}"#,
            list(&[&a.addr, &wrong_port, &other.addr]),
            list(&[
                &b.addr,
                &absurd.addr,
                &racing.addr,
                &flapping.addr,
                &twice.addr
            ]),
            sd.display(),
            contract_toml("restart", r#"{provider="restart"}"#, 2),
            contract_toml("mistakes", r#"{provider="mistakes"}"#, 8),
            contract_toml("hostile", r#"{provider="hostile"}"#, 8),
        ),
    )
    .unwrap();
    let data = dir.path("data");
    let agg = Aggregator::start(&config, &data);

    // A masked restart: the first process is read once, young, and dies; the second runs
    // longer before its first reading, so its counters are past the old ones and no
    // counter ever goes down. Its process start time tells the ledger it restarted, so
    // it credits all the new process counted, not the difference.
    let m = agg.wait_for(Duration::from_secs(30), "the ledger's start", |m| {
        m.get("commitmeter_ledger_since_timestamp_seconds", &[])
            .is_some_and(|s| s > 0.0)
    });
    let since = m
        .get("commitmeter_ledger_since_timestamp_seconds", &[])
        .unwrap() as i64;
    while now_unix_ms() < since * 1000 + 1000 {
        std::thread::sleep(Duration::from_millis(100));
    }
    let twin = Scenario {
        gpus: vec![Gpu::at_util(60), Gpu::at_util(60)],
        ..Scenario::default()
    };
    let first = Agent::start(&twin, AgentOpts::default());
    // Counted something already, so a ledger that took the difference would lose it.
    first.wait_for(Duration::from_secs(20), "the first process counting", |m| {
        m.gpu("commitmeter_gpu_observed_seconds_total", 0)
            .is_some_and(|s| s >= 0.5)
    });
    place_restart_host(&first.addr);
    agg.wait_for(Duration::from_secs(20), "the first process read", |m| {
        m.get("commitmeter_target_up", &[("target", instance)]) == Some(1.0)
    });
    let old_age = first.sc.now_ms();
    drop(first);
    let second = Agent::start(
        &Scenario {
            // Its sampling hangs after 30 s: the counters freeze, still served, so the
            // test knows the last values the aggregator can read.
            hang_at_ms: Some(30_000),
            ..twin.clone()
        },
        AgentOpts::default(),
    );
    second.wait_ready(Duration::from_secs(20));
    while second.sc.now_ms() < old_age + 3_000 {
        std::thread::sleep(Duration::from_millis(100));
    }
    place_restart_host(&second.addr);
    while second.sc.now_ms() < 32_000 {
        std::thread::sleep(Duration::from_millis(200));
    }
    let frozen = second.metrics();
    let last_round = frozen
        .get("commitmeter_agent_last_round_timestamp_seconds", &[])
        .unwrap() as i64;
    let sum = |name: &str| {
        frozen
            .series(name)
            .iter()
            .map(|(_, v)| (v * 1000.0).round() / 1000.0)
            .sum::<f64>()
    };
    let (counted, busy) = (
        sum("commitmeter_gpu_observed_seconds_total"),
        sum("commitmeter_gpu_busy_seconds_total"),
    );
    let m = agg.wait_for(
        Duration::from_secs(200),
        "the frozen counters to seal, and two minutes",
        |m| {
            m.get("commitmeter_ledger_sealed_through_timestamp_seconds", &[])
                .unwrap() as i64
                >= (last_round / 60 + 1) * 60
                && m.get("commitmeter_ledger_sealed_through_timestamp_seconds", &[])
                    .unwrap() as i64
                    >= since + 120
        },
    );
    let through = m
        .get("commitmeter_ledger_sealed_through_timestamp_seconds", &[])
        .unwrap() as i64;
    let log = agg.log_text();
    // What the new process counted before its first reading may reach into minutes
    // already sealed: it is then counted as late, not lost.
    let late = |kind: &str| {
        m.get(
            "commitmeter_ledger_late_gpu_seconds_total",
            &[("contract", "restart"), ("kind", kind)],
        )
        .unwrap()
    };
    let got = of(&m, "restart", "delivered") + late("delivered");
    assert!(
        (got - counted).abs() <= 0.004,
        "delivered {got}, the new process counted {counted}\n{log}"
    );
    let got = of(&m, "restart", "used") + late("used");
    assert!(
        (got - busy).abs() <= 0.004,
        "used {got}, the new process counted {busy} busy\n{log}"
    );
    // The restart gap and the silence after the hang are unreported, nothing undelivered.
    assert_eq!(of(&m, "restart", "undelivered"), 0.0, "{log}");
    assert!(log.contains("agent restarted"), "{log}");

    let seconds = (through - since) as f64;

    // Our mistakes: the wrong port and the other exporter could be the missing capacity,
    // so everything short of the commitment is unreported, nothing undelivered.
    let (delivered, used) = truth(&a, since, through);
    let tol = TOLERANCE_PER_GPU_S * 2.0;
    let got = of(&m, "mistakes", "delivered");
    eprintln!("honest host: delivered error {:+.3} GPU-s", got - delivered);
    assert!(
        (got - delivered).abs() <= tol,
        "delivered {got} vs {delivered}\n{log}"
    );
    let got = of(&m, "mistakes", "used");
    eprintln!("honest host: used error {:+.3} GPU-s", got - used);
    assert!((got - used).abs() <= tol, "used {got} vs {used}\n{log}");
    assert_eq!(of(&m, "mistakes", "undelivered"), 0.0, "{log}");
    let unreported = of(&m, "mistakes", "unreported");
    assert!(
        (unreported - (8.0 * seconds - of(&m, "mistakes", "delivered"))).abs() < 1e-6,
        "unreported {unreported} over {seconds} s\n{log}"
    );
    assert_eq!(
        m.get("commitmeter_target_up", &[("target", &wrong_port)]),
        Some(0.0)
    );
    assert_eq!(
        m.get("commitmeter_target_gpus", &[("target", &other.addr)]),
        Some(0.0)
    );

    // The hostile agents: only the honest host's time is credited.
    let (delivered, used) = truth(&b, since, through);
    let got = of(&m, "hostile", "delivered");
    assert!(
        (got - delivered).abs() <= tol,
        "delivered {got} vs {delivered}\n{log}"
    );
    let got = of(&m, "hostile", "used");
    assert!((got - used).abs() <= tol, "used {got} vs {used}\n{log}");
    assert_eq!(of(&m, "hostile", "overage"), 0.0);
    assert_eq!(of(&m, "hostile", "undelivered"), 0.0);
    let rejected = |reason: &str| {
        m.get(
            "commitmeter_ledger_rejected_gpu_seconds_total",
            &[("contract", "hostile"), ("reason", reason)],
        )
        .unwrap_or(0.0)
    };
    for reason in [
        "exceeds_elapsed",
        "used_exceeds_delivered",
        "repeated_restart",
    ] {
        assert!(rejected(reason) > 0.0, "{reason}: {}", rejected(reason));
    }
    let errors = |t: &str, reason: &str| {
        m.get(
            "commitmeter_target_scrape_errors_total",
            &[("target", t), ("reason", reason)],
        )
        .unwrap_or(0.0)
    };
    assert!(errors(&absurd.addr, "invalid_value") > 0.0);
    assert!(errors(&twice.addr, "duplicate_series") > 0.0);
    assert!(
        log.contains("agent readings rejected as physically impossible"),
        "{log}"
    );
    // Rate-limited: one line per target, not one per scrape.
    assert!(log.matches("agent readings rejected").count() <= 2, "{log}");

    // Nothing it said can keep the aggregator from starting again.
    let before = agg.metrics();
    let mut agg = agg;
    let status = terminate(&mut agg.child, Duration::from_secs(20));
    assert!(status.success(), "{status:?}\n{}", agg.log_text());
    let agg = Aggregator::start(&config, &data);
    agg.wait_ready(Duration::from_secs(20));
    let after = agg.metrics();
    for kind in commitmeter::ledger::Kind::NAMES {
        assert!(of(&after, "hostile", kind) >= of(&before, "hostile", kind));
    }
    assert!(agg.log_text().contains("ledger restored"));
}

/// What the design promises per steady GPU over a sealed span, against the fake driver's
/// exact timeline: the counters are placed at the agent's own round times, so only the
/// rounding of seconds to ms remains.
const TOLERANCE_PER_GPU_S: f64 = 0.005;

/// The top-level keys of one JSON object, in order (a duplicate stays visible, where a
/// JSON parser would keep only the last).
fn top_level_keys(line: &str) -> Vec<String> {
    let (mut depth, mut keys, mut chars) = (0, Vec::new(), line.chars().peekable());
    let mut expect_key = false;
    while let Some(c) = chars.next() {
        match c {
            '{' | '[' => {
                depth += 1;
                expect_key = c == '{' && depth == 1;
            }
            '}' | ']' => depth -= 1,
            ',' if depth == 1 => expect_key = true,
            '"' => {
                let mut s = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        c => s.push(c),
                    }
                }
                if expect_key {
                    keys.push(s);
                    expect_key = false;
                }
            }
            _ => {}
        }
    }
    keys
}

#[test]
fn json_log_lines_have_one_key_per_field() {
    let dir = TempDir::new("jsonlog");
    let (_held, wrong_port) = silent_port();
    let config = dir.path("aggregator.toml");
    std::fs::write(
        &config,
        format!(
            "[aggregator]\nscrape_interval = \"1s\"\nscrape_timeout = \"1s\"\n\n\
             [[targets]]\ntargets = [\"{}\"]\n",
            wrong_port
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(BIN)
        .arg("aggregator")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.path={}", dir.path("data").display()))
        .args(["--web.listen-address=127.0.0.1:0", "--log.format=json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read until the failed scrape is logged (the line that names the target).
    let stderr = child.stderr.take().unwrap();
    let mut lines = Vec::new();
    for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
        let done = line.contains("scrape failed");
        lines.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let failed = lines.last().cloned().unwrap_or_default();
    assert!(failed.contains("scrape failed"), "{lines:?}");
    assert!(top_level_keys(&failed).contains(&"scrape_target".to_string()));
    for line in &lines {
        let keys = top_level_keys(line);
        let mut unique = keys.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(keys.len(), unique.len(), "a key twice in {line}");
    }
}
