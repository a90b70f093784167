//! Careless operators and small protocol faults, through the real binary: broken and
//! implausible config files (`check-config` and `aggregator`), what `check-config` decides a
//! file is, and agents answering with gzip or an oversized response head.

// Tests read the clock and open SQLite as they please: clippy.toml keeps that to
// src/clock.rs and src/aggregator/store.rs in the product only.
#![allow(clippy::disallowed_methods)]

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Runs the binary to its exit, killing it after `within`.
fn run(args: &[String], within: Duration) -> (Option<i32>, String, String, Duration) {
    let t = Instant::now();
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run commitmeter");
    let deadline = Instant::now() + within;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().unwrap();
    (
        status.code(),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
        t.elapsed(),
    )
}

const CONTRACT: &str = "[[contracts]]\nid = \"c1\"\nprovider = \"p\"\nprice_per_gpu_hour = 1.0\n\
                        currency = \"USD\"\nstart = \"2026-01-01\"\nend = \"2026-12-31\"\n\
                        selector = '{cluster=\"a\"}'\n";

fn contract_with(field: &str, value: &str) -> String {
    let mut text = String::new();
    for line in CONTRACT.lines() {
        if line.starts_with(&format!("{field} =")) {
            text.push_str(&format!("{field} = {value}\n"));
        } else {
            text.push_str(line);
            text.push('\n');
        }
    }
    if !text.contains(&format!("\n{field} =")) {
        text.push_str(&format!("{field} = {value}\n"));
    }
    if field != "ramp" {
        text.push_str("ramp = [ { from = \"2026-01-01\", gpus = 8 } ]\n");
    }
    text
}

/// Every broken file stops both `check-config` and the aggregator with status 1 and a
/// message naming the file and the key, before the aggregator binds its port or touches
/// its storage: the port given is held by the test, so an aggregator that got as far as
/// binding would report that instead.
#[test]
fn broken_config_files_are_refused_naming_file_and_key_before_anything_starts() {
    let dir = TempDir::new("hostile-config");
    let (_held, port) = silent_port();
    let agg = |keys: &str| format!("[aggregator]\n{keys}\n");
    let sla = |target: &str, tiers: &str| {
        contract_with(
            "sla",
            &format!(
                "{{ delivery_target = {target}, credits = [ {tiers} ], claim_window_days = 30 }}"
            ),
        )
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "interval-1ms",
            agg("scrape_interval = \"1ms\""),
            "aggregator.scrape_interval: 1ms is outside 1s..=1h",
        ),
        (
            "interval-huge",
            agg("scrape_interval = \"99999999h\""),
            "aggregator.scrape_interval: 99999999h is outside 1s..=1h",
        ),
        (
            "interval-zero",
            agg("scrape_interval = \"0s\""),
            "aggregator.scrape_interval: must be > 0",
        ),
        (
            "interval-over-1h",
            agg("scrape_interval = \"2h\"\ngrace = \"3h\""),
            "aggregator.scrape_interval: 2h is outside",
        ),
        (
            "interval-int",
            agg("scrape_interval = 15"),
            "invalid type: integer `15`, expected a string",
        ),
        (
            "interval-typo",
            agg("scrape_intervall = \"15s\""),
            "unknown field `scrape_intervall`",
        ),
        (
            "timeout-1ms",
            agg("scrape_timeout = \"1ms\""),
            "aggregator.scrape_timeout: 1ms must be >= 100ms",
        ),
        (
            "timeout-over-interval",
            agg("scrape_timeout = \"20s\""),
            "aggregator.scrape_timeout: 20s must be <= scrape_interval",
        ),
        (
            "grace-100000w",
            agg("grace = \"100000w\""),
            "aggregator.grace: 100000w must be <= 7d",
        ),
        (
            "grace-overflow",
            agg("grace = \"99999999999w\""),
            "aggregator.grace: invalid duration",
        ),
        (
            "grace-short",
            agg("grace = \"20s\""),
            "aggregator.grace: 20s must be >= scrape_interval + scrape_timeout",
        ),
        (
            "body-i64-max",
            agg("body_limit_bytes = 9223372036854775807"),
            "aggregator.body_limit_bytes: 9223372036854775807 is outside 1024..=268435456",
        ),
        (
            "body-zero",
            agg("body_limit_bytes = 0"),
            "aggregator.body_limit_bytes: must be > 0",
        ),
        (
            "body-tiny",
            agg("body_limit_bytes = 100"),
            "aggregator.body_limit_bytes: 100 is outside",
        ),
        (
            "scheme",
            agg("scrape_scheme = \"ftp\""),
            "aggregator.scrape_scheme: \"ftp\" must be",
        ),
        (
            "ca-missing",
            agg("tls_ca_file = \"nope.pem\""),
            "aggregator.tls_ca_file",
        ),
        (
            "price-1e308",
            contract_with("price_per_gpu_hour", "1e308"),
            "contract \"c1\": price_per_gpu_hour: 1e308 is more than any GPU-hour costs",
        ),
        (
            "price-nan",
            contract_with("price_per_gpu_hour", "nan"),
            "contract \"c1\": price_per_gpu_hour: must be a finite number",
        ),
        (
            "sla-tiers-severest-first",
            sla("0.99", "{ below = 0.95, credit = 0.3 }, { below = 0.99, credit = 0.1 }"),
            "contract \"c1\": sla.credits[1].below: 0.99 must be below sla.credits[0].below 0.95",
        ),
        (
            "sla-target-over-1",
            sla("99", "{ below = 0.99, credit = 0.1 }"),
            "contract \"c1\": sla.delivery_target: must be in (0, 1], got 99",
        ),
        (
            "sla-typo",
            contract_with("sla", "{ delivery_target = 0.99, credits = [], claim_window = 30 }"),
            "unknown field `claim_window`, expected one of `delivery_target`, `credits`, `claim_window_days`",
        ),
        (
            "on-demand-zero",
            contract_with("on_demand_price_per_gpu_hour", "0"),
            "contract \"c1\": on_demand_price_per_gpu_hour: must be a finite number > 0, got 0",
        ),
        (
            "ramp-before-start",
            contract_with(
                "ramp",
                "[ { from = \"2025-01-01\", until = \"2025-12-01\", gpus = 8 } ]",
            ),
            "contract \"c1\": ramp: no step overlaps the contract's span",
        ),
        (
            "ramp-after-end",
            contract_with("ramp", "[ { from = \"2027-02-01\", gpus = 8 } ]"),
            "contract \"c1\": ramp: no step overlaps the contract's span",
        ),
        (
            "gpus-negative",
            contract_with("ramp", "[ { from = \"2026-01-01\", gpus = -5 } ]"),
            "contract \"c1\": ramp[0].gpus: must be >= 0",
        ),
        (
            "currency",
            contract_with("currency", "\"usd\""),
            "contract \"c1\": currency",
        ),
        (
            "utilization",
            contract_with("target_utilization", "1.5"),
            "contract \"c1\": target_utilization: must be in (0, 1]",
        ),
        (
            "selector",
            contract_with("selector", "'{cluster=~\"(\"}'"),
            "contract \"c1\": selector",
        ),
        (
            "target-no-port",
            "[[targets]]\ntargets = [\"host\"]\n".into(),
            "targets[0].targets[0]: \"host\" is not host:port",
        ),
        (
            "target-twice",
            "[[targets]]\ntargets = [\"h:1\", \"H:1\"]\n".into(),
            "targets[0].targets[1]: duplicate target",
        ),
        (
            "label-name",
            "[[targets]]\ntargets = [\"h:1\"]\nlabels = { \"a-b\" = \"x\" }\n".into(),
            "targets[0].labels: \"a-b\" is not a valid label name",
        ),
        (
            "glob",
            "[[file_sd]]\nfiles = [\"sd/[*.json\"]\n".into(),
            "file_sd[0].files[0]: invalid glob pattern",
        ),
        (
            "team-bad-regex",
            "[[teams]]\nname = \"vision\"\nslurm_account = \"vision|(cv\"\n".into(),
            "[[teams]] \"vision\": slurm_account: invalid regex \"vision|(cv\"",
        ),
        (
            "team-twice",
            "[[teams]]\nname = \"vision\"\nslurm_account = \"vision\"\n\
             [[teams]]\nname = \"vision\"\nnamespace = \"vision-.*\"\n"
                .into(),
            "[[teams]] \"vision\": name: duplicate team: teams[1] repeats teams[0]",
        ),
        (
            "team-unknown-key",
            "[[teams]]\nname = \"vision\"\naccount = \"vision\"\n".into(),
            "[[teams]] \"vision\": account: unknown key",
        ),
        (
            "broken-syntax",
            "[aggregator\nscrape_interval = \"15s\"\n".into(),
            ":1:12:",
        ),
    ];
    assert!(cases.len() >= 20);
    let mut slowest = Duration::ZERO;
    for (name, text, want) in &cases {
        // Named without "aggregator": the kind must come from the tables, even broken ones.
        let file = dir.path(&format!("{name}.toml"));
        std::fs::write(&file, text).unwrap();
        let data = dir.path(&format!("data-{name}"));
        for args in [
            vec!["check-config".to_string(), file.display().to_string()],
            vec![
                "aggregator".to_string(),
                format!("--config.file={}", file.display()),
                format!("--web.listen-address={port}"),
                format!("--storage.path={}", data.display()),
            ],
        ] {
            let (code, _, stderr, took) = run(&args, Duration::from_secs(20));
            slowest = slowest.max(took);
            assert_eq!(code, Some(1), "{name} {args:?}: {stderr}");
            assert!(
                stderr.contains(&file.display().to_string()) && stderr.contains(want),
                "{name} {args:?}: want {want:?} in:\n{stderr}"
            );
            assert!(!stderr.contains("cannot listen"), "{name}: {stderr}");
            assert!(!stderr.contains("serving"), "{name}: {stderr}");
            // Said once, not twice (no cause repeated).
            assert_eq!(stderr.matches(*want).count(), 1, "{name}: {stderr}");
            if args[0] == "check-config" {
                assert!(
                    stderr.contains("(checked as aggregator file: it has"),
                    "{name}: {stderr}"
                );
            }
        }
        assert!(!data.exists(), "{name}: storage touched");
    }
    eprintln!(
        "{} broken files refused by check-config and aggregator; slowest exit {:?}",
        cases.len(),
        slowest
    );
}

/// A file with only implausible values is warned about (file and key) by `check-config`,
/// which exits 0, and by the aggregator at start, which then runs.
#[test]
fn implausible_config_files_are_warned_about_and_still_start() {
    let dir = TempDir::new("implausible-config");
    let sd = dir.path("sd");
    std::fs::create_dir_all(&sd).unwrap();
    std::fs::write(
        sd.join("a.json"),
        r#"[{"targets":["127.0.0.1:1"],"labels":{"cluster":"a"}}]"#,
    )
    .unwrap();
    let file = dir.path("site.toml");
    std::fs::write(
        &file,
        format!(
            "[aggregator]\nscrape_interval = \"6m\"\ngrace = \"2h\"\nbody_limit_bytes = 4096\n\n\
             [[file_sd]]\nfiles = [\"{sd}/*.json\", \"{sd}/none-*.json\"]\n\n\
             {CONTRACT}ramp = [ {{ from = \"2025-01-01\", until = \"2025-02-01\", gpus = 1 }}, \
             {{ from = \"2026-01-01\", gpus = 8 }} ]\n\
             sla = {{ delivery_target = 0.99, credits = [ {{ below = 0.99, credit = 0.10 }}, \
             {{ below = 0.95, credit = 0.30 }} ], claim_window_days = 30 }}\n\n\
             [[contracts]]\nid = \"nobody\"\nprovider = \"p\"\nprice_per_gpu_hour = 1.0\n\
             on_demand_price_per_gpu_hour = 0.5\n\
             currency = \"USD\"\nstart = \"2026-01-01\"\nselector = '{{cluster=\"zzz\"}}'\n\
             ramp = [ {{ from = \"2026-01-01\", gpus = 8 }} ]\n",
            sd = sd.display()
        ),
    )
    .unwrap();
    let f = file.display().to_string();
    let wants = [
        format!("{f}: aggregator.scrape_interval: 6m is long"),
        format!("{f}: aggregator.grace: 2h is long"),
        format!("{f}: aggregator.body_limit_bytes: 4096 is small"),
        format!("{f}: contract \"c1\": ramp[0]: lies wholly outside the contract's span"),
        format!("{f}: contract \"nobody\": selector: matches none of the 1 targets"),
        format!(
            "{f}: contract \"nobody\": on_demand_price_per_gpu_hour: 0.5 is not above \
             price_per_gpu_hour (1): committing never pays"
        ),
        format!("{f}: file_sd[0].files[1]:"),
    ];
    let (code, stdout, stderr, _) = run(
        &["check-config".to_string(), f.clone()],
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    for w in &wants {
        assert!(stderr.contains(w), "want {w:?} in:\n{stderr}");
    }
    assert!(
        stdout.contains("contract \"c1\": 1 targets: 127.0.0.1:1"),
        "{stdout}"
    );
    assert!(
        stdout.contains("contract \"nobody\": 0 targets"),
        "{stdout}"
    );
    assert!(stdout.contains("a.json: 1 targets"), "{stdout}");

    let agg = Aggregator::start(&file, &dir.path("data"));
    assert_eq!(http_get(&agg.addr, "/-/healthy").0, 200);
    let log = agg.log_text();
    for w in &wants {
        assert!(log.contains(w), "want {w:?} in:\n{log}");
    }
}

/// What `check-config` takes a file for, and that it says so.
#[test]
fn check_config_says_which_kind_it_checked_and_why_and_reads_file_sd() {
    let dir = TempDir::new("check-kind");
    let check = |args: &[String]| run(args, Duration::from_secs(20));
    let s = |p: &Path| p.display().to_string();

    // An empty file named for the aggregator is an (empty) aggregator file.
    let empty_agg = dir.path("aggregator.toml");
    std::fs::write(&empty_agg, "").unwrap();
    let (code, out, err, _) = check(&["check-config".into(), s(&empty_agg)]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("aggregator config OK")
            && out.contains("(checked as aggregator file: its name contains \"aggregator\")"),
        "{out}"
    );
    // A broken aggregator file without a telling name: by the table it has.
    let broken = dir.path("site.toml");
    std::fs::write(
        &broken,
        "[[contracts]]\nid = \"x\"\nprice_per_gpu_hour = \n",
    )
    .unwrap();
    let (code, _, err, _) = check(&["check-config".into(), s(&broken)]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains(&format!("{}:3:", s(&broken)))
            && err.contains("(checked as aggregator file: it has [[contracts]])"),
        "{err}"
    );
    // An empty file with no hint is an agent file, and the output says how to change that.
    let plain = dir.path("plain.toml");
    std::fs::write(&plain, "").unwrap();
    let (code, out, _, _) = check(&["check-config".into(), s(&plain)]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("agent config OK") && out.contains("--kind aggregator"),
        "{out}"
    );
    let (code, out, _, _) = check(&["check-config".into(), "--kind=aggregator".into(), s(&plain)]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("aggregator config OK")
            && out.contains("(checked as aggregator file: --kind)"),
        "{out}"
    );
    // An aggregator file checked as an agent file on request fails as one.
    let (code, _, err, _) = check(&["check-config".into(), "--kind=agent".into(), s(&broken)]);
    assert_eq!(code, Some(1));
    assert!(err.contains("(checked as agent file: --kind)"), "{err}");

    // file_sd files are read: a malformed one fails the check naming it; targets two
    // contracts select are reported.
    let sd = dir.path("sd");
    std::fs::create_dir_all(&sd).unwrap();
    std::fs::write(
        sd.join("good.json"),
        r#"[{"targets":["h:1"],"labels":{"cluster":"a"}}]"#,
    )
    .unwrap();
    std::fs::write(sd.join("bad.json"), r#"[{"targets":["nohost"]}]"#).unwrap();
    let file = dir.path("sd.toml");
    std::fs::write(
        &file,
        format!(
            "[[file_sd]]\nfiles = [\"{}/*.json\"]\n{}",
            sd.display(),
            contract_toml("c1", "{cluster=\"a\"}", 8)
        ),
    )
    .unwrap();
    let (code, _, err, _) = check(&["check-config".into(), s(&file)]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&s(&file))
            && err.contains("bad.json: [0].targets: \"nohost\" is not host:port"),
        "{err}"
    );
    std::fs::remove_file(sd.join("bad.json")).unwrap();
    let (code, out, err, _) = check(&["check-config".into(), s(&file)]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("contract \"c1\": 1 targets: h:1"), "{out}");
    std::fs::write(
        &file,
        format!(
            "[[file_sd]]\nfiles = [\"{}/*.json\"]\n{}{}",
            sd.display(),
            contract_toml("c1", "{cluster=\"a\"}", 8),
            contract_toml("c2", "{instance=\"h:1\"}", 8)
        ),
    )
    .unwrap();
    let (code, _, err, _) = check(&["check-config".into(), s(&file)]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("h:1") && err.contains("c1") && err.contains("c2"),
        "{err}"
    );
}

/// A hostile agent on loopback that answers every request with `response`, verbatim.
fn raw_peer(response: Vec<u8>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            let response = response.clone();
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(k) => req.extend_from_slice(&buf[..k]),
                    }
                }
                let _ = s.write_all(&response);
            });
        }
    });
    addr
}

/// Gzip the aggregator did not ask for is reported as such (reason `body`), with or without
/// `Content-Encoding`; a response head over hyper's limit is `too_large`, not `connect`.
#[test]
fn gzip_and_oversized_heads_get_their_own_reasons() {
    let gzip_body: &[u8] = &[
        0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0xcb, 0x55, 0x30, 0xe4, 0x02,
        0x00, 0x3c, 0x2b, 0x1d, 0x2c, 0x04, 0x00, 0x00, 0x00,
    ];
    let with_header = |extra: &str| {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n{extra}content-length: {}\r\n\
             connection: close\r\n\r\n",
            gzip_body.len()
        )
        .into_bytes();
        r.extend_from_slice(gzip_body);
        r
    };
    let gzip = raw_peer(with_header("content-encoding: gzip\r\n"));
    let bare_gzip = raw_peer(with_header(""));
    let head = format!(
        "HTTP/1.1 200 OK\r\nx-junk: {}\r\ncontent-length: 4\r\nconnection: close\r\n\r\nm 1\n",
        "a".repeat(1 << 20)
    );
    let big_head = raw_peer(head.into_bytes());

    let dir = TempDir::new("hostile-heads");
    let config = dir.path("aggregator.toml");
    std::fs::write(
        &config,
        format!(
            "[aggregator]\nscrape_interval = \"1s\"\nscrape_timeout = \"1s\"\n\n\
             [[targets]]\ntargets = [\"{gzip}\", \"{bare_gzip}\", \"{big_head}\"]\n"
        ),
    )
    .unwrap();
    let agg = Aggregator::start(&config, &dir.path("data"));
    let errors = |m: &Metrics, t: &str, reason: &str| {
        m.get(
            "commitmeter_target_scrape_errors_total",
            &[("target", t), ("reason", reason)],
        )
        .unwrap_or(0.0)
    };
    let m = agg.wait_for(Duration::from_secs(30), "three failing targets", |m| {
        errors(m, &gzip, "body") >= 1.0
            && errors(m, &bare_gzip, "body") >= 1.0
            && errors(m, &big_head, "too_large") >= 1.0
    });
    for t in [&gzip, &bare_gzip, &big_head] {
        assert_eq!(errors(&m, t, "connect"), 0.0, "{t}");
    }
    let t = Instant::now();
    let (status, _) = http_get(&agg.addr, "/metrics");
    eprintln!(
        "GET /metrics beside the hostile peers: {status} in {:?}",
        t.elapsed()
    );
    let log = agg.log_text();
    assert!(
        log.contains("response is gzip-encoded; the aggregator asks for identity"),
        "{log}"
    );
    assert!(!log.contains("invalid utf-8"), "{log}");
}

/// A flapping GPU (2,000 XIDs in two seconds) is counted in full on `/metrics`, but logs one
/// line: its first XID; repeats are summarized at most every 5 minutes per GPU.
#[test]
fn a_flapping_gpu_cannot_flood_the_log_with_xids() {
    let xids: Vec<[u64; 2]> = (0..2_000u64).map(|i| [500 + i, 79 + i % 2]).collect();
    let scenario = Scenario {
        gpus: vec![
            Gpu {
                xids,
                ..Gpu::at_util(50)
            },
            Gpu {
                xids: vec![[1_000, 13]],
                ..Gpu::at_util(10)
            },
        ],
        ..Scenario::default()
    };
    let agent = Agent::start(&scenario, AgentOpts::default());
    let total = |m: &Metrics| -> f64 {
        m.series("commitmeter_gpu_xid_errors_total")
            .iter()
            .map(|(_, v)| v)
            .sum()
    };
    let m = agent.wait_for(Duration::from_secs(30), "2,001 XIDs counted", |m| {
        total(m) >= 2_001.0
    });
    assert_eq!(total(&m), 2_001.0);
    let lines = agent.log_count("XID error");
    eprintln!("2,001 XIDs on two GPUs: {lines} log lines");
    // One per GPU: the flapping one's first and the other's only.
    assert_eq!(lines, 2, "{}", agent.log_text());
}

/// The allocator is chosen from the command line before `main` (src/alloc.rs): mimalloc for
/// the aggregator and the demo, the system allocator for the agent. If the linker dropped
/// the constructor, every role would silently run on the system allocator.
#[test]
fn each_role_gets_its_allocator() {
    for (args, want) in [
        (
            &[
                "--log.level=debug",
                "aggregator",
                "--config.file=/nonexistent",
            ][..],
            "mimalloc",
        ),
        (
            &[
                "--log.level",
                "debug",
                "agent",
                "--config.file=/nonexistent",
            ][..],
            "system",
        ),
        (
            &[
                "statement",
                "--log.level=debug",
                "--contract=demo",
                "--config.file=/nonexistent",
            ][..],
            "system",
        ),
    ] {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let (_, _, stderr, _) = run(&args, Duration::from_secs(30));
        let line = stderr
            .lines()
            .find(|l| l.contains("allocator chosen"))
            .unwrap_or_else(|| panic!("{args:?}: no 'allocator chosen' line in:\n{stderr}"));
        assert!(
            line.contains(&format!("allocator=\"{want}\"")),
            "{args:?}: want {want}, got: {line}"
        );
    }
}
