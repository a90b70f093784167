//! Deployment packaging: the systemd units in `packaging/` and the Debian package built by
//! cargo-deb from `[package.metadata.deb]`.
//!
//! - `systemd-analyze verify` on both units (a copy whose Exec lines point at the binary this
//!   test was built with, since verify checks that the command exists and is executable);
//! - `systemd-analyze security --offline=true` on both units as shipped: exposure ≤ 2.0;
//! - `cargo deb --no-build` on that same binary (no release build), then the .deb's control
//!   data, maintainer scripts and files with `dpkg-deb`, and the binary run from a throwaway
//!   root made with `dpkg-deb -x`.
//!
//! Needs systemd-analyze (Debian's `systemd`), dpkg-deb and cargo-deb
//! (`cargo install cargo-deb --locked --version 3.8.0`); `.ci/run` installs them. A missing
//! tool fails the test with a message, never skips it.

// Tests read the clock and open SQLite as they please: clippy.toml keeps that to
// src/clock.rs and src/aggregator/store.rs in the product only.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

use common::TempDir;

use common::BIN;
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const UNITS: [&str; 2] = [
    "commitmeter-agent.service",
    "commitmeter-aggregator.service",
];
/// The highest acceptable `systemd-analyze security` exposure (0 = fully locked down, 10 = none).
const MAX_EXPOSURE: f64 = 2.0;

fn repo(rel: &str) -> PathBuf {
    Path::new(ROOT).join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs a tool; a tool that is not installed fails the test with `install_hint`.
fn run(cmd: &mut Command, install_hint: &str) -> Output {
    let program = cmd.get_program().to_string_lossy().into_owned();
    match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("`{program}` is not installed ({e}): {install_hint}")
        }
        Err(e) => panic!("cannot run {cmd:?}: {e}"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn ok(cmd: &mut Command, install_hint: &str) -> String {
    let out = run(cmd, install_hint);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

const SYSTEMD_HINT: &str = "install Debian's `systemd` package (see .ci/run)";
const DPKG_HINT: &str = "dpkg-deb is part of Debian's `dpkg` package";

/// The unit's directives as (key, value) pairs, comments and section headers left out.
fn directives(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn values<'a>(d: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    d.iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

fn assert_has(d: &[(String, String)], unit: &str, key: &str, value: &str) {
    assert!(
        values(d, key).contains(&value),
        "{unit}: expected {key}={value}, found {:?}",
        values(d, key)
    );
}

/// Lines of a systemd-analyze run's standard error that are about our unit file (unknown
/// keys, unparsable values, missing commands: verify reports these and still exits 0).
fn unit_complaints(stderr: &str, unit: &str) -> Vec<String> {
    let stem = unit.trim_end_matches(".service");
    stderr
        .lines()
        .filter(|l| l.contains(stem))
        .map(str::to_string)
        .collect()
}

#[test]
fn units_declare_the_deployment_contract() {
    let agent = read(&repo("packaging/commitmeter-agent.service"));
    let a = directives(&agent);
    let unit = "commitmeter-agent.service";
    assert_eq!(
        values(&a, "ExecStart"),
        ["/usr/bin/commitmeter agent --config.file=/etc/commitmeter/agent.toml $ARGS"]
    );
    for (k, v) in [
        ("User", "commitmeter"),
        ("Group", "commitmeter"),
        ("Restart", "on-failure"),
        ("EnvironmentFile", "-/etc/default/commitmeter-agent"),
        ("ConfigurationDirectory", "commitmeter"),
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("SystemCallFilter", "@system-service"),
        ("DevicePolicy", "closed"),
        ("DeviceAllow", "char-nvidia-frontend rw"),
        ("DeviceAllow", "char-nvidia rw"),
        ("LimitNOFILE", "16384"),
        ("WantedBy", "multi-user.target"),
    ] {
        assert_has(&a, unit, k, v);
    }
    // NVML needs /dev/nvidia* and /proc/driver/nvidia: these would break the agent.
    for key in [
        "PrivateDevices",
        "ProcSubset",
        "PrivateUsers",
        "IPAddressDeny",
    ] {
        assert!(values(&a, key).is_empty(), "{unit}: {key}= must not be set");
    }

    let aggregator = read(&repo("packaging/commitmeter-aggregator.service"));
    let g = directives(&aggregator);
    let unit = "commitmeter-aggregator.service";
    assert_eq!(
        values(&g, "ExecStart"),
        [
            "/usr/bin/commitmeter aggregator --config.file=/etc/commitmeter/aggregator.toml \
          --storage.path=/var/lib/commitmeter $ARGS"
        ]
    );
    for (k, v) in [
        ("User", "commitmeter"),
        ("Group", "commitmeter"),
        ("Restart", "on-failure"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("EnvironmentFile", "-/etc/default/commitmeter-aggregator"),
        ("ConditionPathExists", "/etc/commitmeter/aggregator.toml"),
        ("StateDirectory", "commitmeter"),
        ("ConfigurationDirectory", "commitmeter"),
        ("ProtectSystem", "strict"),
        ("PrivateDevices", "yes"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("LimitNOFILE", "262144"),
        ("WantedBy", "multi-user.target"),
    ] {
        assert_has(&g, unit, k, v);
    }
    assert!(
        values(&g, "IPAddressDeny").is_empty(),
        "{unit}: a network service"
    );
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let dir = TempDir::new("verify");
    assert!(
        !BIN.chars().any(|c| c == '"' || c == '\\' || c == '%'),
        "binary path {BIN} needs escaping in a unit file"
    );
    for unit in UNITS {
        let shipped = read(&repo(&format!("packaging/{unit}")));
        // verify checks that each Exec command exists: point them at the binary under test.
        let copy: String = shipped
            .lines()
            .map(|l| {
                let mut line = if l.starts_with("ExecStart=/usr/bin/commitmeter ") {
                    l.replacen("/usr/bin/commitmeter", &format!("\"{BIN}\""), 1)
                } else {
                    l.to_string()
                };
                line.push('\n');
                line
            })
            .collect();
        assert_ne!(
            copy, shipped,
            "{unit}: no ExecStart=/usr/bin/commitmeter line"
        );
        let path = dir.path(unit);
        std::fs::write(&path, copy).unwrap();
        let out = run(
            Command::new("systemd-analyze")
                .args(["verify", "--man=no", "--generators=no"])
                .arg(&path),
            SYSTEMD_HINT,
        );
        let stderr = text(&out.stderr);
        let complaints = unit_complaints(&stderr, unit);
        assert!(
            out.status.success() && complaints.is_empty(),
            "systemd-analyze verify {unit}: {}\n{stderr}{}",
            out.status,
            text(&out.stdout)
        );
    }
}

/// "→ Overall exposure level for commitmeter-agent.service: 1.4 OK 🙂" → 1.4
fn overall_exposure(table: &str) -> Option<f64> {
    let line = table
        .lines()
        .find(|l| l.contains("Overall exposure level for"))?;
    let (_, rest) = line.rsplit_once(".service:")?;
    rest.split_whitespace().next()?.parse().ok()
}

#[test]
fn units_exposure_is_at_most_2() {
    for unit in UNITS {
        let path = repo(&format!("packaging/{unit}"));
        let out = run(
            Command::new("systemd-analyze")
                .args(["security", "--offline=true", "--no-pager"])
                .arg(&path)
                .env("SYSTEMD_COLORS", "0"),
            SYSTEMD_HINT,
        );
        let table = text(&out.stdout);
        let stderr = text(&out.stderr);
        let complaints = unit_complaints(&stderr, unit);
        assert!(
            out.status.success() && complaints.is_empty(),
            "systemd-analyze security {unit}: {}\n{stderr}\n{table}",
            out.status
        );
        let score = overall_exposure(&table)
            .unwrap_or_else(|| panic!("no overall exposure level in:\n{table}\n{stderr}"));
        println!("{unit}: exposure {score}");
        assert!(
            score <= MAX_EXPOSURE,
            "{unit}: exposure {score} > {MAX_EXPOSURE}:\n{table}"
        );
    }
}

#[test]
fn example_agent_config_is_valid_as_shipped_and_uncommented() {
    let dir = TempDir::new("agentcfg");
    let example = read(&repo("examples/agent.toml"));
    assert!(example.lines().any(|l| l.trim() == "[labels]"));
    // The commented example labels ("# provider = ...") must be valid once uncommented.
    let uncommented: String = example
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest
                    .split_once(" = ")
                    .is_some_and(|(k, _)| !k.contains(' ')) =>
            {
                rest.to_string() + "\n"
            }
            _ => l.to_string() + "\n",
        })
        .collect();
    let path = dir.path("agent.toml");
    std::fs::write(&path, &uncommented).unwrap();
    let shipped = ok(
        Command::new(BIN)
            .arg("check-config")
            .arg(repo("examples/agent.toml")),
        "",
    );
    assert!(
        shipped.contains("agent config OK: 0 host labels"),
        "{shipped}"
    );
    let labelled = ok(Command::new(BIN).arg("check-config").arg(&path), "");
    assert!(
        labelled.contains("agent config OK: 4 host labels"),
        "{labelled}\n{uncommented}"
    );
}

/// Which `--profile` makes cargo-deb package the binary under test: the one `cargo test`
/// just built (target/debug for `cargo test`, target/release for `cargo test --release`).
fn cargo_profile_of_bin() -> &'static str {
    let dir = Path::new(BIN).parent().and_then(Path::file_name);
    match dir.and_then(|d| d.to_str()) {
        Some("debug") => "dev",
        Some("release") => "release",
        other => panic!("{BIN}: built into {other:?}, not target/debug or target/release"),
    }
}

fn repo_files(dir: &str, suffix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(repo(dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(suffix))
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no {dir}/*{suffix}");
    names
}

#[test]
fn debian_package() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let version = run(
        Command::new(&cargo).args(["deb", "--version"]),
        "cargo is missing",
    );
    assert!(
        version.status.success(),
        "cargo-deb is not installed (`cargo deb --version`: {}): install it with \
         `cargo install cargo-deb --locked --version 3.8.0` (.ci/run does)\n{}",
        version.status,
        text(&version.stderr)
    );
    println!("{}", text(&version.stdout).trim());

    // Package the binary `cargo test` built; no second (release) build.
    let out_dir = TempDir::new("deb");
    let built = run(
        Command::new(&cargo)
            .args(["deb", "--no-build", "--fast", "--profile"])
            .arg(cargo_profile_of_bin())
            .arg("--manifest-path")
            .arg(repo("Cargo.toml"))
            .arg("--output")
            .arg(out_dir.path("commitmeter.deb")),
        "",
    );
    let deb = out_dir.path("commitmeter.deb");
    assert!(
        built.status.success() && deb.is_file(),
        "cargo deb failed ({}):\n{}\n{}",
        built.status,
        text(&built.stdout),
        text(&built.stderr)
    );

    // Control data.
    let info = ok(Command::new("dpkg-deb").arg("-I").arg(&deb), DPKG_HINT);
    let field = |name: &str| -> String {
        info.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} in dpkg-deb -I:\n{info}"))
            .to_string()
    };
    assert_eq!(field("Package"), "commitmeter");
    assert_eq!(field("Version"), format!("{}-1", env!("CARGO_PKG_VERSION")));
    assert_eq!(field("Section"), "admin");
    assert_eq!(field("Priority"), "optional");
    assert!(field("Maintainer").contains('@'), "{info}");
    let depends: Vec<String> = field("Depends")
        .split(',')
        .map(|d| d.trim().to_string())
        .collect();
    assert!(depends.contains(&"adduser".to_string()), "{depends:?}");
    assert!(
        depends.iter().any(|d| d.starts_with("libc6")),
        "$auto found no libc6: {depends:?}"
    );

    // Maintainer scripts.
    let control = out_dir.path("control");
    ok(
        Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control),
        DPKG_HINT,
    );
    let script = |name: &str| read(&control.join(name));
    let postinst = script("postinst");
    let postrm = script("postrm");
    let prerm = script("prerm");
    for (name, body) in [
        ("postinst", &postinst),
        ("postrm", &postrm),
        ("prerm", &prerm),
    ] {
        assert!(
            !body.contains("#DEBHELPER#"),
            "{name}: marker not replaced:\n{body}"
        );
        ok(Command::new("sh").arg("-n").arg(control.join(name)), "");
    }
    assert!(
        postinst.contains("adduser --system --group --no-create-home --home /var/lib/commitmeter"),
        "{postinst}"
    );
    let user_at = postinst.find("adduser --system").unwrap();
    let enable_at = postinst
        .find("deb-systemd-helper enable commitmeter-agent.service")
        .unwrap_or_else(|| panic!("agent not enabled:\n{postinst}"));
    assert!(
        user_at < enable_at,
        "the user must exist before units are enabled"
    );
    // The aggregator is enabled only if the operator enabled it before (upgrades).
    assert!(
        postinst.contains("deb-systemd-helper debian-installed commitmeter-aggregator.service"),
        "{postinst}"
    );
    // Nothing is started on install; upgrades restart only what runs.
    assert!(!postinst.contains("deb-systemd-invoke start"), "{postinst}");
    assert!(
        !postinst.contains("deb-systemd-invoke restart"),
        "{postinst}"
    );
    for unit in UNITS {
        assert!(
            postinst.contains(&format!("deb-systemd-invoke try-restart {unit}")),
            "{postinst}"
        );
        assert!(
            prerm.contains(&format!("deb-systemd-invoke stop {unit}")),
            "{prerm}"
        );
        assert!(
            postrm.contains(&format!("deb-systemd-helper purge {unit}")),
            "{postrm}"
        );
    }
    let conffiles: BTreeSet<String> = script("conffiles").lines().map(str::to_string).collect();
    let expected_conffiles: BTreeSet<String> = [
        "/etc/commitmeter/agent.toml",
        "/etc/commitmeter/aggregator.toml.example",
        "/etc/default/commitmeter-agent",
        "/etc/default/commitmeter-aggregator",
    ]
    .into_iter()
    .map(str::to_string)
    .collect();
    assert_eq!(conffiles, expected_conffiles);

    // Files.
    let listing = ok(Command::new("dpkg-deb").arg("-c").arg(&deb), DPKG_HINT);
    let files: BTreeSet<String> = listing
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches('.').to_string())
        .collect();
    let mut expected: Vec<String> = [
        "/usr/bin/commitmeter",
        "/usr/lib/systemd/system/commitmeter-agent.service",
        "/usr/lib/systemd/system/commitmeter-aggregator.service",
        "/etc/commitmeter/agent.toml",
        "/etc/commitmeter/aggregator.toml.example",
        "/etc/default/commitmeter-agent",
        "/etc/default/commitmeter-aggregator",
        "/usr/share/commitmeter/alerts/alertmanager/alertmanager.example.yml",
        "/usr/share/doc/commitmeter/install.md",
        "/usr/share/doc/commitmeter/README.md",
        "/usr/share/doc/commitmeter/dashboards.md",
        "/usr/share/doc/commitmeter/copyright",
    ]
    .into_iter()
    .map(str::to_string)
    .collect();
    for (dir, suffix, dest) in [
        ("dashboards", ".json", "/usr/share/commitmeter/dashboards"),
        ("alerts", ".yml", "/usr/share/commitmeter/alerts"),
        (
            "alerts/tests",
            ".yml",
            "/usr/share/commitmeter/alerts/tests",
        ),
        ("docs/alerts", ".md", "/usr/share/doc/commitmeter/alerts"),
    ] {
        expected.extend(
            repo_files(dir, suffix)
                .into_iter()
                .map(|f| format!("{dest}/{f}")),
        );
    }
    let missing: Vec<&String> = expected.iter().filter(|f| !files.contains(*f)).collect();
    assert!(
        missing.is_empty(),
        "missing from the .deb: {missing:?}\n{listing}"
    );
    // The aggregator waits for its config: only the .example is shipped.
    assert!(
        !files.contains("/etc/commitmeter/aggregator.toml"),
        "{listing}"
    );
    let bin_line = listing
        .lines()
        .find(|l| l.ends_with("./usr/bin/commitmeter"))
        .unwrap();
    let mut cols = bin_line.split_whitespace();
    assert_eq!(cols.next(), Some("-rwxr-xr-x"), "{bin_line}");
    assert!(
        matches!(cols.next(), Some("0/0" | "root/root")),
        "{bin_line}"
    );

    // Unpacked into a throwaway root: the files are the repository's, the binary runs.
    let root = out_dir.path("root");
    ok(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
        DPKG_HINT,
    );
    for (packaged, source) in [
        (
            "usr/lib/systemd/system/commitmeter-agent.service",
            "packaging/commitmeter-agent.service",
        ),
        (
            "usr/lib/systemd/system/commitmeter-aggregator.service",
            "packaging/commitmeter-aggregator.service",
        ),
        ("etc/commitmeter/agent.toml", "examples/agent.toml"),
        (
            "etc/commitmeter/aggregator.toml.example",
            "examples/aggregator.toml",
        ),
    ] {
        assert_eq!(
            read(&root.join(packaged)),
            read(&repo(source)),
            "{packaged} differs from {source}"
        );
    }
    let bin = root.join("usr/bin/commitmeter");
    let v = ok(Command::new(&bin).arg("--version"), "");
    assert_eq!(
        v.trim(),
        format!("commitmeter {}", env!("CARGO_PKG_VERSION"))
    );
    let checked = ok(
        Command::new(&bin)
            .arg("check-config")
            .arg(root.join("etc/commitmeter/agent.toml"))
            .arg(root.join("etc/commitmeter/aggregator.toml.example")),
        "",
    );
    assert!(checked.contains("agent config OK"), "{checked}");
    assert!(checked.contains("aggregator config OK"), "{checked}");
}
