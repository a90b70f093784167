//! Test harness: runs the real `commitmeter` binary against the fake NVML library
//! and reads its `/metrics` over loopback.
#![allow(dead_code)]

pub mod postgres;
pub mod prometheus;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use nvidia_ml::scenario::{Gpu, Scenario};

pub const BIN: &str = env!("CARGO_BIN_EXE_commitmeter");

fn target_dir() -> PathBuf {
    Path::new(BIN).parent().unwrap().to_path_buf()
}

/// Path of a fake NVML build: `nvidia_ml` (current driver) or `nvidia_ml_old`
/// (an old driver lacking some symbols). Built on first use if `cargo test` did not.
pub fn fake_library(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    let path = target_dir().join(format!("lib{name}.so"));
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "fake-nvml", "-p", "fake-nvml-old"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if target_dir().file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .expect("run cargo to build the fake NVML library");
        assert!(status.success(), "building the fake NVML library failed");
    });
    assert!(path.exists(), "{} missing", path.display());
    path
}

/// A unique scratch directory (`tempfile`), removed on drop, also when a test panics;
/// see [`TempDir::keep_on_failure`] for one a failure's post-mortem needs.
pub struct TempDir {
    dir: Option<tempfile::TempDir>,
    keep_on_failure: bool,
}

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("commitmeter-test-{tag}-"))
            .tempdir()
            .expect("create a temporary directory");
        Self {
            dir: Some(dir),
            keep_on_failure: false,
        }
    }

    /// A scratch directory that stays on disk when the test fails (panics), with its path
    /// printed, so logs written there can be read after the run; removed on success.
    pub fn keep_on_failure(tag: &str) -> Self {
        let mut dir = Self::new(tag);
        dir.keep_on_failure = true;
        dir
    }

    pub fn root(&self) -> &Path {
        self.dir.as_ref().expect("live temporary directory").path()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root().join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            if self.keep_on_failure && std::thread::panicking() {
                eprintln!("kept for the post-mortem: {}", dir.keep().display());
            }
        }
    }
}

/// Polls `probe` (every 50 ms) until it yields a value; fails the test after `within`,
/// saying what it waited for (`what`, called only then: a log can go there). The one way
/// the tests wait for something to happen, instead of sleeping for as long as it usually takes.
pub fn wait_until<T>(
    within: Duration,
    what: impl FnOnce() -> String,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for {}", what());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running `commitmeter agent`, killed on drop.
pub struct Agent {
    /// The scenario as the fake runs it: its timeline starts when the agent is spawned.
    pub sc: Scenario,
    pub child: Child,
    pub addr: String,
    pub log: Log,
    pub dir: TempDir,
}

pub struct AgentOpts<'a> {
    pub library: Option<PathBuf>,
    pub interval: &'a str,
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub log_level: &'a str,
}

impl Default for AgentOpts<'_> {
    fn default() -> Self {
        Self {
            library: Some(fake_library("nvidia_ml")),
            interval: "500ms",
            extra_args: vec![],
            env: vec![],
            log_level: "debug",
        }
    }
}

impl Agent {
    /// Starts the agent; the scenario's timeline zero is set to now, after any build
    /// of the fake library, so a slow machine does not eat into the script.
    pub fn start(scenario: &Scenario, opts: AgentOpts<'_>) -> Agent {
        let dir = TempDir::new("agent");
        let scenario_path = dir.path("scenario.json");
        let sc = scenario.clone().with_start_now();
        std::fs::write(&scenario_path, serde_json::to_string(&sc).unwrap()).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("agent")
            .arg("--web.listen-address=127.0.0.1:0")
            .arg(format!("--sample.interval={}", opts.interval))
            .arg(format!("--log.level={}", opts.log_level))
            .arg(JSON_LOG)
            .args(&opts.extra_args)
            .env("FAKE_NVML_SCENARIO", &scenario_path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(lib) = &opts.library {
            cmd.arg(format!("--nvml.library={}", lib.display()));
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start commitmeter agent");
        let (addr, log) = follow_log(&mut child);
        Agent {
            sc,
            child,
            addr,
            log,
            dir,
        }
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(&self.addr, path)
    }

    pub fn metrics(&self) -> Metrics {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "{body}");
        Metrics::parse(&body)
    }

    /// Waits until `/-/ready` answers 200; returns the instant it did.
    pub fn wait_ready(&self, within: Duration) -> Instant {
        wait_until(
            within,
            || format!("the agent to be ready; log:\n{}", self.log_text()),
            || (self.get("/-/ready").0 == 200).then(Instant::now),
        )
    }

    /// Polls `/metrics` until `pred` holds.
    pub fn wait_for(
        &self,
        within: Duration,
        what: &str,
        pred: impl Fn(&Metrics) -> bool,
    ) -> Metrics {
        wait_for_metrics(&self.addr, &self.log, within, what, pred)
    }

    pub fn log_text(&self) -> String {
        log_text(&self.log)
    }

    pub fn log_count(&self, needle: &str) -> usize {
        log_count(&self.log, needle)
    }

    /// Waits until a log line contains `needle`: stderr is read on another thread, so a
    /// metric can show an event before its log line has been collected.
    pub fn wait_log(&self, within: Duration, needle: &str) {
        wait_until(
            within,
            || format!("{needle:?} in the log:\n{}", self.log_text()),
            || (self.log_count(needle) > 0).then_some(()),
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The flag every `commitmeter` a test follows with [`follow_log`] runs with: events as
/// JSON lines, so the address it serves on is read from a field, not scraped from text.
pub const JSON_LOG: &str = "--log.format=json";

/// The shared log of a followed child: one line per event, rendered as the text format
/// writes it (`TIMESTAMP LEVEL target: message key=value …`, fields in the order logged),
/// and any line that is not JSON (a panic) as written.
pub type Log = Arc<Mutex<Vec<String>>>;

/// One JSON log event, its fields in the order written.
struct Event(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Event {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = Event;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON log event")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Event, A::Error> {
                let mut fields = Vec::new();
                while let Some(field) = map.next_entry()? {
                    fields.push(field);
                }
                Ok(Event(fields))
            }
        }
        d.deserialize_map(Fields)
    }
}

impl Event {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.as_str())
    }

    /// The line as `--log.format=text` would write it (without colours or spans).
    fn render(&self) -> String {
        let head = ["timestamp", "level", "target", "message"];
        let mut line = format!(
            "{} {:>5} {}: {}",
            self.get("timestamp").unwrap_or(""),
            self.get("level").unwrap_or(""),
            self.get("target").unwrap_or(""),
            self.get("message").unwrap_or("")
        );
        for (k, v) in self.0.iter().filter(|(k, _)| !head.contains(&k.as_str())) {
            match v {
                serde_json::Value::String(s) => line.push_str(&format!(" {k}={s}")),
                other => line.push_str(&format!(" {k}={other}")),
            }
        }
        line
    }
}

/// The whole log, a line per event.
pub fn log_text(log: &Log) -> String {
    log.lock().unwrap().join("\n")
}

/// How many lines of the log contain `needle`.
pub fn log_count(log: &Log, needle: &str) -> usize {
    log.lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(needle))
        .count()
}

/// Reads the child's stderr (JSON events: start it with [`JSON_LOG`]) on a thread; returns
/// the address of its `serving /metrics` event, and its log.
pub fn follow_log(child: &mut Child) -> (String, Log) {
    let log = Log::default();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let line = match serde_json::from_str::<Event>(&line) {
                Ok(event) => {
                    if event.get("message") == Some("serving /metrics") {
                        if let Some(addr) = event.get("address") {
                            let _ = tx.send(addr.to_string());
                        }
                    }
                    event.render()
                }
                Err(_) => line,
            };
            sink.lock().unwrap().push(line);
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| {
            panic!(
                "no `serving /metrics` event with an address (is it started with {JSON_LOG}?); log:\n{}",
                log.lock().unwrap().join("\n")
            )
        });
    (addr, log)
}

/// The value after `key` in the banner `commitmeter demo` prints on its standard output
/// (`status page:`, `contract metrics:`). The output is read to its end on a thread: a
/// reader that stopped at the wanted line would close the pipe while the demo still
/// writes the rest of its banner, and kill it with EPIPE.
pub fn demo_banner(child: &mut Child, key: &str) -> String {
    let stdout = child.stdout.take().expect("the demo's stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted = key.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.split(&wanted).nth(1) {
                let _ = tx.send(rest.trim().to_string());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("the demo printed no {key:?}"))
}

/// A `commitmeter demo` on `data` with `args`, killed on drop (also when an assertion
/// fails); `addr` is its aggregator's `host:port`.
pub struct Demo {
    pub child: Child,
    pub addr: String,
}

impl Demo {
    pub fn start(data: &Path, args: &[&str]) -> Demo {
        let mut child = Command::new(BIN)
            .args(["demo", "--web.listen-address=127.0.0.1:0"])
            .arg(format!("--data.dir={}", data.display()))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start commitmeter demo");
        let url = demo_banner(&mut child, "status page:");
        let addr = url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        Demo { child, addr }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.0 GET (no chunked bodies to decode); returns status and body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    http_request(
        addr,
        &format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n"),
    )
}

pub fn http_request(addr: &str, raw: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

pub type Labels = BTreeMap<String, String>;

/// Scraped samples keyed by metric name, each with its labels.
#[derive(Debug, Default)]
pub struct Metrics {
    pub samples: BTreeMap<String, Vec<(Labels, f64)>>,
}

impl Metrics {
    /// Reads a text exposition with the product's own parser (the aggregator's, which is
    /// property-tested against the encoder); a malformed body fails the test.
    pub fn parse(body: &str) -> Metrics {
        let mut m = Metrics::default();
        commitmeter::aggregator::parse::parse(
            body,
            |_| true,
            |s| {
                let labels = s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                m.samples
                    .entry(s.name.to_string())
                    .or_default()
                    .push((labels, s.value));
            },
        )
        .unwrap_or_else(|e| panic!("malformed exposition: {e}\n{body}"));
        m
    }

    /// The value of `name` whose labels include all of `want`.
    pub fn get(&self, name: &str, want: &[(&str, &str)]) -> Option<f64> {
        self.samples.get(name)?.iter().find_map(|(labels, v)| {
            want.iter()
                .all(|(k, w)| labels.get(*k).map(String::as_str) == Some(*w))
                .then_some(*v)
        })
    }

    pub fn gpu(&self, name: &str, gpu: usize) -> Option<f64> {
        self.get(name, &[("gpu", &gpu.to_string())])
    }

    pub fn series(&self, name: &str) -> &[(Labels, f64)] {
        self.samples.get(name).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// Milliseconds on the scenario's timeline at `at`.
pub fn timeline_ms(scenario: &Scenario, at: Instant) -> u64 {
    let now_ms = scenario.now_ms();
    let back = Instant::now().saturating_duration_since(at).as_millis() as u64;
    now_ms.saturating_sub(back)
}

/// The instant of an agent's last completed round (its
/// `commitmeter_agent_last_round_timestamp_seconds`) on the scenario's timeline.
pub fn last_round_ms(sc: &Scenario, m: &Metrics) -> u64 {
    let ts = m
        .get("commitmeter_agent_last_round_timestamp_seconds", &[])
        .expect("no round completed");
    ((ts * 1000.0).round() as u64).saturating_sub(sc.start_unix_ms.unwrap())
}

/// A running `commitmeter aggregator`, killed on drop.
pub struct Aggregator {
    pub child: Child,
    pub addr: String,
    pub log: Log,
}

impl Aggregator {
    pub fn start(config: &Path, data: &Path) -> Aggregator {
        Self::start_with(config, data, &[])
    }

    /// Starts it with more flags (e.g. `--web.config.file=…`).
    pub fn start_with(config: &Path, data: &Path, extra_args: &[String]) -> Aggregator {
        let mut child = Command::new(BIN)
            .arg("aggregator")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", data.display()))
            .arg("--web.listen-address=127.0.0.1:0")
            .arg("--log.level=info")
            .arg(JSON_LOG)
            .args(extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start commitmeter aggregator");
        let (addr, log) = follow_log(&mut child);
        Aggregator { child, addr, log }
    }

    pub fn metrics(&self) -> Metrics {
        let (status, body) = http_get(&self.addr, "/metrics");
        assert_eq!(status, 200, "{body}");
        Metrics::parse(&body)
    }

    /// Polls `/metrics` until `pred` holds.
    pub fn wait_for(
        &self,
        within: Duration,
        what: &str,
        pred: impl Fn(&Metrics) -> bool,
    ) -> Metrics {
        wait_for_metrics(&self.addr, &self.log, within, what, pred)
    }

    pub fn log_text(&self) -> String {
        log_text(&self.log)
    }

    /// Waits until the first scrape round has finished (`/-/ready`).
    pub fn wait_ready(&self, within: Duration) {
        wait_until(
            within,
            || format!("the aggregator to be ready; log:\n{}", self.log_text()),
            || (http_get(&self.addr, "/-/ready").0 == 200).then_some(()),
        )
    }

    /// Polls `cond` until it holds; on timeout fails saying `what`, with the log.
    pub fn wait(&self, within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
        wait_until(
            within,
            || format!("{what}; log:\n{}", self.log_text()),
            || cond().then_some(()),
        )
    }

    /// Waits until a line of its log contains `needle`.
    pub fn wait_log(&self, within: Duration, needle: &str) {
        wait_until(
            within,
            || format!("{needle:?} in the log:\n{}", self.log_text()),
            || self.log_text().contains(needle).then_some(()),
        )
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `addr`'s `/metrics` until `pred` holds; on timeout fails with the process log.
fn wait_for_metrics(
    addr: &str,
    log: &Log,
    within: Duration,
    what: &str,
    pred: impl Fn(&Metrics) -> bool,
) -> Metrics {
    wait_until(
        within,
        || format!("{what}; log:\n{}", log_text(log)),
        || {
            let (status, body) = http_get(addr, "/metrics");
            assert_eq!(status, 200, "{body}");
            Some(Metrics::parse(&body)).filter(&pred)
        },
    )
}

/// Waits until the ledger served at `addr` (an aggregator's or a demo's `/metrics`) has
/// sealed `span` of its own time past its first minute: with a demo, simulated time.
pub fn wait_sealed_span(addr: &str, within: Duration, span: Duration) -> Metrics {
    wait_until(
        within,
        || format!("{span:?} of sealed ledger minutes at {addr}"),
        || {
            let (status, body) = http_get(addr, "/metrics");
            assert_eq!(status, 200, "{body}");
            let m = Metrics::parse(&body);
            let since = m.get("commitmeter_ledger_since_timestamp_seconds", &[])?;
            let through = m.get("commitmeter_ledger_sealed_through_timestamp_seconds", &[])?;
            (since > 0.0 && through - since >= span.as_secs_f64()).then_some(m)
        },
    )
}

/// Runs `cmd` with `sh -c`; true if it succeeded.
pub fn sh(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", cmd])
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether the tests run as root (and may mount file systems).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A file system of its own at a test's path: a small tmpfs (to fill, or to make
/// read-only) or a loop-mounted ext4 image (to freeze). Needs root: `None` where it cannot
/// be mounted. Thawed and unmounted on drop.
pub struct Mount(pub PathBuf);

impl Mount {
    /// A tmpfs of `size` (`2m`, `16m`) at `at`.
    pub fn tmpfs(at: &Path, size: &str) -> Option<Mount> {
        std::fs::create_dir_all(at).unwrap();
        sh(&format!(
            "mount -t tmpfs -o size={size} tmpfs {}",
            at.display()
        ))
        .then(|| Mount(at.to_path_buf()))
    }

    /// A 64 MB ext4 image (beside `at`) loop-mounted at `at`.
    pub fn ext4(at: &Path) -> Option<Mount> {
        std::fs::create_dir_all(at).unwrap();
        let img = at.with_extension("img");
        sh(&format!(
            "truncate -s 64M {0} && mkfs.ext4 -q -F {0} && mount -o loop {0} {1}",
            img.display(),
            at.display()
        ))
        .then(|| Mount(at.to_path_buf()))
    }

    /// Remounts it read-only; true if that worked.
    pub fn make_read_only(&self) -> bool {
        sh(&format!("mount -o remount,ro {}", self.0.display()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = sh(&format!(
            "fsfreeze -u {0} 2>/dev/null; umount -l {0}",
            self.0.display()
        ));
    }
}

/// Writes zeros to `file` until its file system has no byte left.
pub fn fill_file_system(file: &Path) {
    let mut f = std::fs::File::create(file).unwrap();
    let block = vec![0u8; 64 * 1024];
    while f.write_all(&block).is_ok() {}
    let _ = f.sync_all();
}

/// CPU time of every thread of `pid`, in nanoseconds (schedstat's first field). For benches.
pub fn cpu_ns(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// A `kB` field of /proc/PID/status (`VmRSS:`, `VmHWM:`). For benches.
pub fn status_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// A plain HTTP server on loopback that answers every request with `body(n)` for the n-th
/// request (from 0): another exporter on an agent's port, or a hostile agent. Stops on drop.
pub struct Exporter {
    pub addr: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Exporter {
    pub fn start(body: impl Fn(usize) -> String + Send + 'static) -> Exporter {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stopped.load(Ordering::Relaxed) {
                let Ok((mut s, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => req.extend_from_slice(&buf[..k]),
                    }
                }
                let text = body(n);
                n += 1;
                let _ = s.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                        text.len()
                    )
                    .as_bytes(),
                );
            }
        });
        Exporter { addr, stop }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A loopback address that accepts connections and never answers (a wrong port). The
/// listener is returned so the port stays taken: a released port could be handed to
/// another test's agent.
pub fn silent_port() -> (std::net::TcpListener, String) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    (l, addr)
}

/// Sends `signal` (`-HUP`, `-TERM`, `-STOP`, …) to process `pid` with kill(1).
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {pid}");
}

/// A `[[contracts]]` table committing `gpus` from 2026-01-01 on to the targets `selector`
/// matches, at 1 USD per GPU-hour.
pub fn contract_toml(id: &str, selector: &str, gpus: u64) -> String {
    format!(
        "[[contracts]]\nid = \"{id}\"\nprovider = \"p\"\nprice_per_gpu_hour = 1.0\n\
         currency = \"USD\"\nstart = \"2026-01-01\"\nselector = '{selector}'\n\
         ramp = [ {{ from = \"2026-01-01\", gpus = {gpus} }} ]\n"
    )
}

/// Expands the README's series shorthands: a brace group after a `_`, or followed by more
/// name, is a set of alternatives (`commitmeter_contract_{a,b}_gpu_seconds_total`,
/// `process_{a,b}`); one after a whole name is its label set (`…_total{contract}`).
pub fn expand_series(span: &str) -> Vec<String> {
    let Some(open) = span.find('{') else {
        return vec![span.to_string()];
    };
    let Some(close) = span[open..].find('}').map(|i| open + i) else {
        return vec![span[..open].to_string()];
    };
    let (head, inner, tail) = (&span[..open], &span[open + 1..close], &span[close + 1..]);
    if head.ends_with('_') || tail.starts_with(|c: char| c == '_' || c.is_ascii_lowercase()) {
        inner
            .split(',')
            .flat_map(|alt| expand_series(&format!("{head}{}{tail}", alt.trim())))
            .collect()
    } else {
        vec![head.to_string()]
    }
}

/// SIGTERM, then waits up to `within` for the process to exit; its exit status.
pub fn terminate(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    signal(child.id(), "-TERM");
    wait_until(
        within,
        || "the process to exit on SIGTERM".to_string(),
        || child.try_wait().expect("wait"),
    )
}

/// Whether contract `contract`'s current billing period began at or before `since_s` (unix
/// seconds), so that its month-to-date figures hold everything sealed since then. False
/// when the run crossed the end of a month in the contract's time zone: the new period
/// then holds only part of it.
pub fn period_holds_since(m: &Metrics, contract: &str, since_s: i64) -> bool {
    let start = m
        .get(
            "commitmeter_contract_period_start_timestamp_seconds",
            &[("contract", contract)],
        )
        .expect("the billing period's start");
    start as i64 <= since_s
}

/// Month to date against all time: equal while the period holds the whole run
/// ([`period_holds_since`]), else no more than it.
pub fn assert_month_to_date(mtd: f64, all_time: f64, whole_run: bool, what: &str) {
    if whole_run {
        assert!((mtd - all_time).abs() < 1e-6, "{what}: {mtd} != {all_time}");
    } else {
        assert!(mtd <= all_time + 1e-6, "{what}: {mtd} > {all_time}");
    }
}
