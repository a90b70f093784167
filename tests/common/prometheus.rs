//! A real Prometheus (Debian's `prometheus` package) on a free loopback port, for the
//! tests that check the shipped rules and dashboards against real aggregators.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{http_get, wait_until, TempDir};

/// A running Prometheus, killed on drop.
pub struct Prometheus {
    pub child: Child,
    pub addr: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus with `scrape_configs` (the YAML list items, indented by two
    /// spaces) and `rules`, scraping and evaluating every second, and waits until it is
    /// ready. Prometheus cannot be handed a bound socket, so the port is free only when
    /// picked: if another process takes it first, Prometheus exits with "address already in
    /// use" and it is started again on another port.
    pub fn start(scrape_configs: &str, rules: &[PathBuf], dir: &TempDir) -> Prometheus {
        let rule_list: Vec<String> = rules
            .iter()
            .map(|r| format!("  - {:?}", r.display().to_string()))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n{}\nscrape_configs:\n{}",
            rule_list.join("\n"),
            scrape_configs,
        );
        let path = dir.path("prometheus.yml");
        std::fs::write(&path, config).unwrap();
        let log = dir.path("prometheus.log");
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = Command::new("prometheus")
                .arg(format!("--config.file={}", path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path("tsdb").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect(
                    "prometheus not found: install Debian's `prometheus` package (see .ci/run)",
                );
            let mut p = Prometheus {
                child,
                addr: format!("127.0.0.1:{port}"),
            };
            let exited = wait_until(
                Duration::from_secs(60),
                || {
                    format!(
                        "prometheus to become ready:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    )
                },
                || match p.child.try_wait().unwrap() {
                    Some(status) => Some(Some(status)),
                    None => ready(&p.addr).then_some(None),
                },
            );
            let Some(status) = exited else {
                return p;
            };
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(
                text.contains("address already in use") && attempt < ATTEMPTS,
                "prometheus exited ({status}) on attempt {attempt}:\n{text}"
            );
            eprintln!("port {port} was taken before prometheus bound it: trying another");
        }
        unreachable!("the last attempt returns or fails")
    }
}

/// Whether a Prometheus answers ready on `addr` (its own words: not another server that
/// took the port).
fn ready(addr: &str) -> bool {
    if std::net::TcpStream::connect(addr).is_err() {
        return false;
    }
    let (status, body) = http_get(addr, "/-/ready");
    status == 200 && body.contains("Prometheus")
}

/// A Prometheus HTTP API answer, as JSON.
pub fn api(p: &Prometheus, path: &str) -> serde_json::Value {
    let (status, body) = http_get(&p.addr, path);
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// `s` percent-encoded for a query string.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
