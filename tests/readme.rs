//! The README is a public contract: every series its tables document is exported by a
//! running agent or aggregator, and every series they export is documented; every flag it
//! mentions exists; every config key it documents is one the parser knows.

// Tests read the clock and open SQLite as they please: clippy.toml keeps that to
// src/clock.rs and src/aggregator/store.rs in the product only.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

/// The series named in the first column of the tables under `### Series` in `section`.
fn documented(text: &str, section: &str) -> BTreeSet<String> {
    let start = text.find(section).unwrap_or_else(|| panic!("no {section}"));
    let rest = &text[start..];
    let series = rest.find("### Series").expect("no series table") + start;
    let mut out = BTreeSet::new();
    for line in text[series..]
        .lines()
        .skip(1)
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
    {
        let first = line.split('|').nth(1).unwrap_or("");
        for token in first.split('`').skip(1).step_by(2) {
            if token.starts_with("commitmeter_") || token.starts_with("process_") {
                out.extend(expand_series(token));
            }
        }
    }
    out
}

/// The `/metrics` body at `addr`, or `None` while it cannot answer yet.
fn scrape(addr: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    (head.split_whitespace().nth(1) == Some("200")).then(|| body.to_string())
}

fn exported(body: &str) -> BTreeSet<String> {
    Metrics::parse(body).samples.keys().cloned().collect()
}

fn compare(role: &str, documented: &BTreeSet<String>, exported: &BTreeSet<String>) {
    let missing: Vec<_> = documented.difference(exported).collect();
    let undocumented: Vec<_> = exported.difference(documented).collect();
    assert!(
        missing.is_empty() && undocumented.is_empty(),
        "{role}: documented in the README but not exported: {missing:?}\n\
         exported but not documented in the README: {undocumented:?}"
    );
}

#[test]
fn expansion_reads_alternatives_and_drops_label_sets() {
    assert_eq!(
        expand_series("commitmeter_contract_{a,b}_total{contract}"),
        [
            "commitmeter_contract_a_total",
            "commitmeter_contract_b_total"
        ]
    );
    assert_eq!(expand_series("x{gpu,uuid}"), ["x"]);
    assert_eq!(
        expand_series("commitmeter_host_info{<labels>}"),
        ["commitmeter_host_info"]
    );
    assert_eq!(expand_series("p_{a,b}{gpu,uuid}"), ["p_a", "p_b"]);
}

#[test]
fn every_agent_series_in_the_readme_is_exported_and_every_exported_one_documented() {
    // Everything a real agent can export: an NVML init that fails once (an error series),
    // an XID event, processes, energy.
    let agent = Agent::start(
        &Scenario {
            init_fail_until_ms: 300,
            gpus: vec![
                Gpu {
                    xids: vec![[1_500, 79]],
                    ..Gpu::at_util(60)
                },
                Gpu::at_util(30),
            ],
            ..Scenario::default()
        },
        AgentOpts::default(),
    );
    let m = agent.wait_for(Duration::from_secs(30), "the XID event", |m| {
        m.get("commitmeter_gpu_xid_errors_total", &[]).is_some()
    });
    let names: BTreeSet<String> = m.samples.keys().cloned().collect();
    compare("agent", &documented(&readme(), "## The agent"), &names);
}

#[test]
fn every_aggregator_series_in_the_readme_is_exported_and_every_exported_one_documented() {
    // The demo runs the real aggregator: at 600x, minutes seal within seconds (defining
    // every month-to-date ratio) and a simulated host goes down (a scrape error series).
    /// Killed on drop, also when an assertion fails: a demo left running at 600x would
    /// load the machine for every test after it.
    struct Demo(std::process::Child);
    impl Drop for Demo {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut demo = Demo(
        Command::new(BIN)
            .args([
                "demo",
                "--speed",
                "600",
                "--web.listen-address",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // It prints where it serves: "  contract metrics:  http://127.0.0.1:PORT/metrics".
    let port = demo_banner(&mut demo.0, "contract metrics:")
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_string();
    let want = [
        "commitmeter_contract_utilization_ratio",
        "commitmeter_contract_projected_utilization_ratio",
        "commitmeter_target_scrape_errors_total",
    ];
    let body = wait_until(
        Duration::from_secs(90),
        || format!("the demo's aggregator to export {want:?}"),
        || {
            let body = scrape(&port).unwrap_or_default();
            let names = exported(&body);
            want.iter().all(|w| names.contains(*w)).then_some(body)
        },
    );
    drop(demo);
    // One exposition, one clock: the config's reload time is on the demo's simulated
    // clock like the ledger's (which starts on the 2nd of the month, days from real time
    // on all but a few hours of a month), read just before the first round.
    let m = Metrics::parse(&body);
    let at = |name: &str| m.get(name, &[]).unwrap_or_else(|| panic!("no {name}"));
    let reload = at("commitmeter_config_last_reload_success_timestamp_seconds");
    let since = at("commitmeter_ledger_since_timestamp_seconds");
    assert!(
        reload <= since && since - reload < 6.0 * 3600.0,
        "the reload time {reload} is not on the ledger's clock (ledger since {since})"
    );
    compare(
        "aggregator",
        &documented(&readme(), "## The aggregator"),
        &exported(&body),
    );
}

#[test]
fn every_flag_in_the_readme_exists() {
    // cargo's own flags, in the test and bench commands.
    let cargo = [
        "--all-targets",
        "--bench",
        "--check",
        "--ignored",
        "--lib",
        "--nocapture",
        "--release",
        "--test",
        "--workspace",
    ];
    let mut help = String::new();
    for role in [
        "agent",
        "aggregator",
        "demo",
        "check-config",
        "ledger backup",
        "statement",
    ] {
        let args: Vec<&str> = role.split(' ').chain(["--help"]).collect();
        let out = Command::new(BIN).args(&args).output().unwrap();
        assert!(out.status.success(), "{role} --help");
        help.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    let text = readme();
    let mut flags = BTreeSet::new();
    for (i, _) in text.match_indices("--") {
        let flag: String = text[i + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
            .collect();
        if flag.starts_with(|c: char| c.is_ascii_lowercase()) {
            flags.insert(format!("--{}", flag.trim_end_matches('.')));
        }
    }
    let unknown: Vec<_> = flags
        .iter()
        .filter(|f| !cargo.contains(&f.as_str()))
        .filter(|f| {
            !help.contains(&format!("{f} "))
                && !help.contains(&format!("{f}="))
                && !help.contains(&format!("{f}\n"))
        })
        .collect();
    assert!(
        unknown.is_empty(),
        "flags in the README that no role has: {unknown:?}"
    );
    assert!(flags.contains("--web.listen-address") && flags.contains("--storage.path"));
}

/// The keys the config parser accepts in a table, from its own error for an unknown key.
fn known_keys(dir: &TempDir, toml: &str) -> BTreeSet<String> {
    let file = dir.path("probe.toml");
    std::fs::write(&file, toml).unwrap();
    let out = Command::new(BIN)
        .args(["check-config", &file.display().to_string()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let list = err
        .split("expected one of")
        .nth(1)
        .or_else(|| err.split("expected").nth(1))
        .unwrap_or_else(|| panic!("no key list in: {err}"));
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

#[test]
fn every_config_key_in_the_readme_is_known_to_the_parser() {
    let dir = TempDir::new("readme-keys");
    let contract = "[[contracts]]\nid = \"x\"\nprovider = \"p\"\nprice_per_gpu_hour = 1.0\n\
                    currency = \"USD\"\nstart = \"2026-01-01\"\nselector = '{a=\"b\"}'\n";
    let mut known = BTreeSet::new();
    for probe in [
        "zzz = 1\n".to_string(),
        "[aggregator]\nzzz = 1\n".to_string(),
        "[[targets]]\ntargets = [\"a:1\"]\nzzz = 1\n".to_string(),
        "[[file_sd]]\nfiles = [\"x\"]\nzzz = 1\n".to_string(),
        "[[teams]]\nname = \"t\"\nzzz = 1\n".to_string(),
        "[storage]\nzzz = 1\n".to_string(),
        format!("{contract}zzz = 1\nramp = [{{ from = \"2026-01-01\", gpus = 1 }}]\n"),
        format!("{contract}ramp = [{{ from = \"2026-01-01\", gpus = 1, zzz = 1 }}]\n"),
        format!("{contract}ramp = [{{ from = \"2026-01-01\", gpus = 1 }}]\nsla = {{ zzz = 1 }}\n"),
        format!(
            "{contract}ramp = [{{ from = \"2026-01-01\", gpus = 1 }}]\n\
             sla = {{ delivery_target = 1, credits = [{{ zzz = 1 }}], claim_window_days = 1 }}\n"
        ),
    ] {
        known.extend(known_keys(&dir, &probe));
    }
    // The aggregator's config as the README shows it, and the `[aggregator]` key table.
    let text = readme();
    let section = &text[text.find("## The aggregator").unwrap()..];
    let block = section
        .split("```toml")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    let mut keys = BTreeSet::new();
    for line in block.lines() {
        let line = line.split('#').next().unwrap();
        // Label names in `labels = { ... }` and anything quoted are values, not keys.
        if line.trim_start().starts_with("labels") {
            keys.insert("labels".to_string());
            continue;
        }
        let mut bare = String::new();
        let mut quote = None;
        for c in line.chars() {
            match (quote, c) {
                (None, '"' | '\'') => quote = Some(c),
                (Some(q), c) if c == q => quote = None,
                (None, c) => bare.push(c),
                _ => {}
            }
        }
        for part in bare.split(['{', ',']) {
            if let Some((key, _)) = part.split_once('=') {
                let key = key.trim();
                if !key.is_empty() {
                    keys.insert(key.to_string());
                }
            }
        }
    }
    let table = &section[section.find("| key | meaning |").unwrap()..];
    for line in table.lines().skip(2).take_while(|l| l.starts_with('|')) {
        let first = line.split('|').nth(1).unwrap();
        keys.extend(first.split('`').skip(1).step_by(2).map(str::to_string));
    }
    assert!(keys.len() > 20, "{keys:?}");
    let unknown: Vec<_> = keys.difference(&known).collect();
    assert!(
        unknown.is_empty(),
        "config keys in the README the parser does not know: {unknown:?} (known: {known:?})"
    );
}
