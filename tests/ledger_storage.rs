//! The ledger directory under careless operators and failing disks, through the real
//! binary: a second writer, a demo on a production ledger, a lost, emptied or replaced
//! ledger, a WAL deleted after `kill -9`, read-only storage, a ledger sealed in the
//! future, and `commitmeter ledger backup` while the aggregator runs.

// Tests read the clock and open SQLite as they please: clippy.toml keeps that to
// src/clock.rs and src/aggregator/store.rs in the product only.
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Runs `commitmeter args…`, which must exit non-zero within 30 s; its stderr.
fn refused(args: &[String]) -> String {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start commitmeter");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "commitmeter {args:?} did not refuse to start; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "{args:?} exited 0");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    eprintln!("refused as expected: {}", err.lines().last().unwrap_or(""));
    err
}

fn aggregator_args(config: &Path, data: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        "aggregator".to_string(),
        format!("--config.file={}", config.display()),
        format!("--storage.path={}", data.display()),
        "--web.listen-address=127.0.0.1:0".to_string(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// A config scraping `agent` every second for contract "lab" (grace 2 s).
fn config(dir: &TempDir, agent: &str) -> PathBuf {
    let path = dir.path("aggregator.toml");
    std::fs::write(
        &path,
        format!(
            "[aggregator]\nscrape_interval = \"1s\"\nscrape_timeout = \"1s\"\ngrace = \"2s\"\n\n\
             [[targets]]\ntargets = [\"{agent}\"]\nlabels = {{ provider = \"p\" }}\n\n{}",
            contract_toml("lab", "{provider=\"p\"}", 4)
        ),
    )
    .unwrap();
    path
}

fn agent() -> Agent {
    let a = Agent::start(&Scenario::default(), AgentOpts::default());
    a.wait_ready(Duration::from_secs(20));
    a
}

/// Starts an aggregator, waits for its first round, and stops it cleanly.
fn make_ledger(config: &Path, data: &Path) {
    let mut agg = Aggregator::start(config, data);
    agg.wait_ready(Duration::from_secs(20));
    assert!(terminate(&mut agg.child, Duration::from_secs(20)).success());
}

fn sealed_through(m: &Metrics) -> f64 {
    m.get("commitmeter_ledger_sealed_through_timestamp_seconds", &[])
        .unwrap()
}

fn committed(m: &Metrics) -> f64 {
    m.get(
        "commitmeter_contract_committed_gpu_seconds_total",
        &[("contract", "lab")],
    )
    .unwrap_or(0.0)
}

#[test]
fn a_second_aggregator_or_demo_on_the_same_directory_is_refused_naming_the_holder() {
    let a = agent();
    let dir = TempDir::new("two-writers");
    let config = config(&dir, &a.addr);
    let data = dir.path("data");
    let first = Aggregator::start(&config, &data);
    first.wait_ready(Duration::from_secs(20));
    let pid = first.child.id();
    let lock = data.join("lock").display().to_string();
    let err = refused(&aggregator_args(&config, &data, &[]));
    assert!(
        err.contains("is in use by another commitmeter")
            && err.contains(&format!("pid {pid}"))
            && err.contains("role commitmeter aggregator")
            && err.contains(&lock),
        "{err}"
    );
    let err = refused(&[
        "demo".into(),
        format!("--data.dir={}", data.display()),
        "--web.listen-address=127.0.0.1:0".into(),
    ]);
    assert!(
        err.contains("is in use by another commitmeter") && err.contains(&format!("pid {pid}")),
        "{err}"
    );
    // The demo wrote nothing into the production directory, and the first one still serves.
    assert!(!data.join("agents.json").exists());
    let t0 = Instant::now();
    let m = first.metrics();
    eprintln!(
        "GET /metrics of the holder after two refused writers: {:?}",
        t0.elapsed()
    );
    assert_eq!(
        m.get("commitmeter_target_up", &[("target", &a.addr)]),
        Some(1.0)
    );
    // A clean stop writes the hosts' checkpoints: the next start resumes every host.
    let mut first = first;
    assert!(terminate(&mut first.child, Duration::from_secs(20)).success());
    let log = first.log_text();
    assert!(log.contains("host checkpoints written at stop"), "{log}");
    let again = Aggregator::start(&config, &data);
    again.wait_ready(Duration::from_secs(20));
    let log = again.log_text();
    assert!(
        log.contains("ledger restored") && !log.contains("did not stop cleanly"),
        "{log}"
    );
}

#[test]
fn the_demo_refuses_a_production_ledger_and_the_aggregator_a_demos() {
    let a = agent();
    let dir = TempDir::new("kinds");
    let config = config(&dir, &a.addr);
    let data = dir.path("data");
    make_ledger(&config, &data);
    let before = std::fs::read(data.join("ledger.sqlite3")).unwrap();
    let err = refused(&[
        "demo".into(),
        format!("--data.dir={}", data.display()),
        "--web.listen-address=127.0.0.1:0".into(),
    ]);
    assert!(
        err.contains("holds a production (aggregator) ledger"),
        "{err}"
    );
    assert!(!data.join("agents.json").exists());
    assert_eq!(std::fs::read(data.join("ledger.sqlite3")).unwrap(), before);

    // A demo's ledger: written by the demo, refused by the aggregator.
    let demo_dir = dir.path("demo");
    let mut demo = Command::new(BIN)
        .args([
            "demo",
            &format!("--data.dir={}", demo_dir.display()),
            "--web.listen-address=127.0.0.1:0",
            JSON_LOG,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Serving and through its first round (so its SIGTERM handler is in place): its
    // ledger and config are written by then.
    let (addr, log) = follow_log(&mut demo);
    wait_until(
        Duration::from_secs(30),
        || format!("the demo to be ready; log:\n{}", log_text(&log)),
        || (http_get(&addr, "/-/ready").0 == 200).then_some(()),
    );
    assert!(demo_dir.join("ledger.id").exists() && demo_dir.join("aggregator.toml").exists());
    assert!(terminate(&mut demo, Duration::from_secs(20)).success());
    let marker = std::fs::read_to_string(demo_dir.join("ledger.id")).unwrap();
    assert!(marker.contains("kind = \"demo\""), "{marker}");
    let err = refused(&aggregator_args(&config, &demo_dir, &[]));
    assert!(err.contains("written by `commitmeter demo`"), "{err}");
}

#[test]
fn a_deleted_empty_or_foreign_ledger_is_refused_and_create_new_starts_over() {
    let a = agent();
    let dir = TempDir::new("lost");
    let config = config(&dir, &a.addr);
    let data = dir.path("data");
    make_ledger(&config, &data);
    let db = data.join("ledger.sqlite3");

    std::fs::remove_file(&db).unwrap();
    let err = refused(&aggregator_args(&config, &data, &[]));
    assert!(
        err.contains("the file is missing")
            && err.contains("ledger.id says ledger")
            && err.contains("--storage.create-new"),
        "{err}"
    );
    std::fs::write(&db, b"").unwrap();
    let err = refused(&aggregator_args(&config, &data, &[]));
    assert!(err.contains("the file is empty (0 bytes)"), "{err}");
    std::fs::remove_file(&db).unwrap();
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("CREATE TABLE photos (x); INSERT INTO photos VALUES (1);")
        .unwrap();
    let err = refused(&aggregator_args(&config, &data, &[]));
    assert!(err.contains("another SQLite database"), "{err}");

    // Deliberately: the old files are moved aside, a new ledger starts.
    let agg = Aggregator::start_with(&config, &data, &["--storage.create-new".to_string()]);
    agg.wait_ready(Duration::from_secs(20));
    assert!(agg.log_text().contains("moved aside"), "{}", agg.log_text());
    let aside: Vec<PathBuf> = std::fs::read_dir(&data)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("replaced-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert!(aside[0].join("ledger.sqlite3").exists() && aside[0].join("ledger.id").exists());
    agg.kill9();
    // And never over a valid ledger.
    let err = refused(&aggregator_args(&config, &data, &["--storage.create-new"]));
    assert!(err.contains("holds a valid ledger"), "{err}");
}

#[test]
fn a_wal_deleted_after_kill9_loses_no_sealed_minute_and_a_ledger_without_its_identity_is_refused() {
    let a = agent();
    let dir = TempDir::new("wal");
    let config = config(&dir, &a.addr);
    let data = dir.path("data");
    let agg = Aggregator::start(&config, &data);
    agg.wait_ready(Duration::from_secs(20));
    let since = agg.metrics();
    let since = since
        .get("commitmeter_ledger_since_timestamp_seconds", &[])
        .unwrap();
    let m = agg.wait_for(Duration::from_secs(150), "a sealed minute", |m| {
        sealed_through(m) > since
    });
    let (through, total) = (sealed_through(&m), committed(&m));
    agg.kill9();
    // The WAL is checkpointed after every commit: the main file alone holds the ledger.
    let wal = data.join("ledger.sqlite3-wal");
    let wal_len = std::fs::metadata(&wal).map_or(0, |m| m.len());
    eprintln!("WAL after kill -9: {wal_len} bytes");
    let _ = std::fs::remove_file(&wal);
    let agg = Aggregator::start(&config, &data);
    agg.wait_ready(Duration::from_secs(20));
    let m = agg.metrics();
    assert!(sealed_through(&m) >= through, "{}", agg.log_text());
    // Hourly host checkpoints: after kill -9 the hosts re-baseline, and the log says so.
    assert!(
        agg.log_text().contains("did not stop cleanly"),
        "{}",
        agg.log_text()
    );
    assert!(committed(&m) >= total);
    agg.kill9();

    // A young ledger whose first commit lived only in its WAL: the main file has the
    // schema but not the identity the marker names.
    let db = data.join("ledger.sqlite3");
    std::fs::remove_file(&db).unwrap();
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
             INSERT INTO meta VALUES ('schema_version', 3);",
        )
        .unwrap();
    let err = refused(&aggregator_args(&config, &data, &[]));
    assert!(
        err.contains("carries no ledger identity") && err.contains("-wal file deleted"),
        "{err}"
    );
}

/// A directory on read-only storage: a tmpfs remounted read-only when running as root
/// (permissions do not stop root), a mode 0555 directory otherwise.
struct ReadOnly {
    path: PathBuf,
    mounted: Option<Mount>,
}

impl ReadOnly {
    fn new(path: PathBuf) -> Self {
        std::fs::create_dir_all(&path).unwrap();
        let root = is_root();
        let mounted = root.then(|| Mount::tmpfs(&path, "16m")).flatten();
        assert!(
            mounted.is_some() || !root,
            "running as root without the right to mount a tmpfs: cannot make read-only storage"
        );
        Self { path, mounted }
    }

    fn make_read_only(&self) {
        if let Some(mount) = &self.mounted {
            assert!(mount.make_read_only(), "remount read-only");
        } else {
            use std::os::unix::fs::PermissionsExt;
            for e in std::fs::read_dir(&self.path).unwrap() {
                let p = e.unwrap().path();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o444)).unwrap();
            }
            std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o555)).unwrap();
        }
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        if self.mounted.is_none() {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o755));
        }
    }
}

#[test]
fn read_only_storage_is_refused_at_start() {
    let a = agent();
    let dir = TempDir::new("readonly");
    let config = config(&dir, &a.addr);
    let ro = ReadOnly::new(dir.path("data"));
    make_ledger(&config, &ro.path);
    ro.make_read_only();
    let err = refused(&aggregator_args(&config, &ro.path, &[]));
    assert!(
        err.contains("ledger directory lock")
            && err.contains("must be writable")
            && (err.contains("Read-only file system") || err.contains("Permission denied")),
        "{err}"
    );
}

#[test]
fn a_ledger_sealed_in_the_future_is_refused_unless_its_future_minutes_are_discarded() {
    let a = agent();
    let dir = TempDir::new("future");
    let config = config(&dir, &a.addr);
    let data = dir.path("data");
    make_ledger(&config, &data);
    // As a forward clock step of a day leaves it: sealed through tomorrow.
    let tomorrow = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + 86_400)
        / 60;
    rusqlite::Connection::open(data.join("ledger.sqlite3"))
        .unwrap()
        .execute(
            "UPDATE meta SET value = ?1 WHERE key = 'sealed_through'",
            [tomorrow],
        )
        .unwrap();
    let err = refused(&aggregator_args(&config, &data, &[]));
    let when = jiff::Timestamp::from_second(tomorrow * 60)
        .unwrap()
        .to_string();
    assert!(
        err.contains(&format!("sealed through {when} but the clock says"))
            && err.contains("--storage.discard-future-minutes"),
        "{err}"
    );
    let agg = Aggregator::start_with(
        &config,
        &data,
        &["--storage.discard-future-minutes".to_string()],
    );
    agg.wait_ready(Duration::from_secs(20));
    assert!(
        agg.log_text()
            .contains("dropped the minutes sealed in the future"),
        "{}",
        agg.log_text()
    );
    let m = agg.metrics();
    assert!(sealed_through(&m) < (tomorrow * 60) as f64 - 3_600.0);
}

#[test]
fn a_backup_taken_while_running_opens_as_the_same_ledger() {
    let a = agent();
    let dir = TempDir::new("backup");
    let config = config(&dir, &a.addr);
    let data = dir.path("data");
    let agg = Aggregator::start(&config, &data);
    agg.wait_ready(Duration::from_secs(20));
    let since = agg.metrics();
    let since = since
        .get("commitmeter_ledger_since_timestamp_seconds", &[])
        .unwrap();
    agg.wait_for(Duration::from_secs(150), "a sealed minute", |m| {
        sealed_through(m) > since
    });
    // Its directory is created by the aggregator.
    let output = data.join("backups").join("ledger-1.sqlite3");
    let before = agg.metrics();
    let t0 = Instant::now();
    let out = Command::new(BIN)
        .args([
            "ledger",
            "backup",
            &format!("--storage.path={}", data.display()),
            &format!("--output={}", output.display()),
            "--timeout=30s",
        ])
        .output()
        .unwrap();
    let took = t0.elapsed();
    let after = agg.metrics();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("by the running commitmeter"), "{said}");
    eprintln!("backup while running: {took:?}: {said}");
    // Again to the same file: refused, nothing overwritten.
    let again = Command::new(BIN)
        .args([
            "ledger",
            "backup",
            &format!("--storage.path={}", data.display()),
            &format!("--output={}", output.display()),
        ])
        .output()
        .unwrap();
    assert!(!again.status.success());

    // The backup is a ledger whose sealed minutes are those exported between the two reads.
    let c = rusqlite::Connection::open(&output).unwrap();
    let (minutes, sum): (i64, i64) = c
        .query_row(
            "SELECT count(*), COALESCE(sum(committed), 0) FROM minutes WHERE contract = 'lab'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let sum = sum as f64 / 1000.0;
    assert!(minutes >= 1);
    assert!(
        committed(&before) <= sum && sum <= committed(&after),
        "{} <= {sum} <= {}",
        committed(&before),
        committed(&after)
    );
    drop(c);
    agg.kill9();

    // Restored into an empty directory, it is adopted and serves the same figures.
    let restored = dir.path("restored");
    std::fs::create_dir_all(&restored).unwrap();
    std::fs::copy(&output, restored.join("ledger.sqlite3")).unwrap();
    let agg = Aggregator::start(&config, &restored);
    agg.wait_ready(Duration::from_secs(20));
    let m = agg.metrics();
    assert!(committed(&m) >= sum, "{}", agg.log_text());
    assert!(
        agg.log_text().contains("marker written"),
        "{}",
        agg.log_text()
    );
    agg.kill9();

    // A stopped ledger is backed up directly.
    let stopped = dir.path("stopped.sqlite3");
    let out = Command::new(BIN)
        .args([
            "ledger",
            "backup",
            &format!("--storage.path={}", restored.display()),
            &format!("--output={}", stopped.display()),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("was not running"));
    assert!(stopped.exists());
}

#[test]
fn a_full_disk_mid_run_is_an_error_not_a_signal_and_writing_resumes_when_space_returns() {
    if !is_root() {
        eprintln!("not root: cannot mount a small tmpfs to fill; skipped");
        return;
    }
    let a = agent();
    let dir = TempDir::new("full");
    let config = config(&dir, &a.addr);
    let data = dir.path("data");
    let _mount = Mount::tmpfs(&data, "2m").expect("mount a tmpfs");
    let agg = Aggregator::start(&config, &data);
    agg.wait_ready(Duration::from_secs(20));
    let errors = |m: &Metrics| {
        m.get(
            "commitmeter_ledger_store_errors_total",
            &[("operation", "commit")],
        )
        .unwrap_or(0.0)
    };
    // Fill the disk.
    let filler = data.join("filler");
    fill_file_system(&filler);
    let m = agg.wait_for(Duration::from_secs(30), "failed commits", |m| {
        errors(m) >= 3.0
    });
    let failed = errors(&m);
    let t0 = Instant::now();
    let (status, _) = http_get(&agg.addr, "/metrics");
    eprintln!(
        "disk full: {failed} failed commits, GET /metrics {status} in {:?}",
        t0.elapsed()
    );
    assert_eq!(status, 200);
    assert!(
        agg.child.id() > 0 && std::fs::metadata(format!("/proc/{}", agg.child.id())).is_ok(),
        "the aggregator died"
    );
    // Space returns: the pending minutes are written and sealing goes on.
    std::fs::remove_file(&filler).unwrap();
    let through = sealed_through(&m);
    let mut agg = agg;
    let m = agg.wait_for(Duration::from_secs(150), "commits again", |m| {
        sealed_through(m) > through
    });
    eprintln!(
        "after space returned: sealed through {} (was {through}), {} failed commits in all",
        sealed_through(&m),
        errors(&m)
    );
    assert!(
        agg.child.try_wait().unwrap().is_none(),
        "the aggregator exited"
    );
}
