//! Endpoint security with the real binary on loopback: `--web.config.file` (TLS, client
//! certificates, basic auth) on the agent and the aggregator, and the aggregator scraping
//! a TLS + basic-auth agent. Certificates come from rcgen, made fresh for each test.

// Tests read the clock and open SQLite as they please: clippy.toml keeps that to
// src/clock.rs and src/aggregator/store.rs in the product only.
#![allow(clippy::disallowed_methods)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

const PASSWORD: &str = "correct horse battery staple";

/// A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate, all
/// as PEM files in a temporary directory, plus a web config written there.
struct Pki {
    dir: TempDir,
}

impl Pki {
    fn new(tag: &str) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let dir = TempDir::new(tag);
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "commitmeter test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, stem: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names).unwrap();
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
            std::fs::write(dir.path(&format!("{stem}.crt")), cert.pem()).unwrap();
            std::fs::write(dir.path(&format!("{stem}.key")), key.serialize_pem()).unwrap();
        };
        leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "server",
        );
        leaf(
            vec!["scraper".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
            "client",
        );
        std::fs::write(dir.path("ca.crt"), ca.pem()).unwrap();
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path(name)
    }

    /// Writes `web.yml` (relative certificate paths, as an operator would) and returns
    /// the flag that points at it.
    fn web_config(&self, yaml: &str) -> String {
        let path = self.path("web.yml");
        std::fs::write(&path, yaml).unwrap();
        format!("--web.config.file={}", path.display())
    }

    /// TLS with basic auth for `alice`, whose password is [`PASSWORD`].
    fn tls_and_auth(&self) -> String {
        let hash = bcrypt::hash(PASSWORD, 4).unwrap();
        self.web_config(&format!(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n\
             basic_auth_users:\n  alice: {hash}\n"
        ))
    }

    /// A client that trusts the test CA, with the client certificate if asked.
    fn client(&self, with_cert: bool) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(self.path("ca.crt")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        Arc::new(if with_cert {
            let chain = CertificateDer::pem_file_iter(self.path("client.crt"))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_file(self.path("client.key")).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        } else {
            builder.with_no_client_auth()
        })
    }
}

struct Reply {
    status: u16,
    head: String,
    body: String,
}

/// GET over TLS (HTTP/1.0, so the server closes), as `user:password` if given. An error
/// is any TLS or I/O failure, as text.
fn https_get(
    client: &Arc<rustls::ClientConfig>,
    addr: &str,
    path: &str,
    credentials: Option<(&str, &str)>,
) -> Result<Reply, String> {
    let sock = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(client.clone(), name).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let mut request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n");
    if let Some((user, password)) = credentials {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        request.push_str(&format!("Authorization: Basic {token}\r\n"));
    }
    request.push_str("\r\n");
    tls.write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    match tls.read_to_end(&mut buf) {
        Ok(_) => {}
        // A peer that closes without close_notify after a whole response is fine here.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => {}
        Err(e) => return Err(e.to_string()),
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP response")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no status")?;
    Ok(Reply {
        status,
        head: head.to_string(),
        body: body.to_string(),
    })
}

/// Sends a plain HTTP request to `addr`; returns what came back (possibly a TLS alert),
/// empty when the connection was closed or reset.
fn plain_http_bytes(addr: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .unwrap();
    let mut buf = Vec::new();
    let started = Instant::now();
    let _ = s.read_to_end(&mut buf);
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "the TLS port held a plain HTTP connection open"
    );
    buf
}

/// The checks every TLS + basic-auth listener must pass.
fn check_tls_and_auth(pki: &Pki, addr: &str, log: &dyn Fn() -> String) {
    let client = pki.client(false);
    let ok = https_get(&client, addr, "/metrics", Some(("alice", PASSWORD)))
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", log()));
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert!(ok.body.contains("commitmeter_build_info"), "{}", ok.body);
    // Again: served from the verification cache, same answer.
    let again = https_get(&client, addr, "/metrics", Some(("alice", PASSWORD))).unwrap();
    assert_eq!(again.status, 200);

    for credentials in [
        None,
        Some(("alice", "wrong")),
        Some(("mallory", PASSWORD)),
        Some(("", "")),
    ] {
        let r = https_get(&client, addr, "/metrics", credentials).unwrap();
        assert_eq!(r.status, 401, "{credentials:?}: {}", r.body);
        assert!(
            r.head
                .lines()
                .any(|l| l.eq_ignore_ascii_case("www-authenticate: Basic")),
            "{}",
            r.head
        );
        assert!(!r.body.contains("commitmeter_"), "{}", r.body);
    }
    // Health endpoints are protected too, as in exporter-toolkit.
    for path in ["/-/healthy", "/-/ready", "/", "/nope"] {
        assert_eq!(https_get(&client, addr, path, None).unwrap().status, 401);
    }
    assert_eq!(
        https_get(&client, addr, "/-/healthy", Some(("alice", PASSWORD)))
            .unwrap()
            .status,
        200
    );

    // Plain HTTP to the TLS port gets no HTTP answer: the handshake fails and the
    // connection closes (at most a TLS alert comes back).
    let plain = plain_http_bytes(addr);
    assert!(
        !plain.starts_with(b"HTTP/"),
        "{}",
        String::from_utf8_lossy(&plain)
    );
    // The server is still fine afterwards.
    assert_eq!(
        https_get(&client, addr, "/metrics", Some(("alice", PASSWORD)))
            .unwrap()
            .status,
        200
    );
}

#[test]
fn agent_serves_tls_and_basic_auth() {
    let pki = Pki::new("agent-tls");
    let agent = Agent::start(
        &Scenario::default(),
        AgentOpts {
            extra_args: vec![pki.tls_and_auth()],
            ..AgentOpts::default()
        },
    );
    check_tls_and_auth(&pki, &agent.addr, &|| agent.log_text());
    assert!(agent.log_text().contains("tls=true basic_auth=true"));
}

#[test]
fn aggregator_serves_tls_and_basic_auth() {
    let pki = Pki::new("aggregator-tls");
    let config = pki.path("aggregator.toml");
    std::fs::write(&config, "[aggregator]\nscrape_interval = \"1s\"\n").unwrap();
    let agg = Aggregator::start_with(&config, &pki.path("data"), &[pki.tls_and_auth()]);
    check_tls_and_auth(&pki, &agg.addr, &|| agg.log_text());
}

#[test]
fn agent_requires_a_verified_client_certificate() {
    let pki = Pki::new("agent-mtls");
    let flag = pki.web_config(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  \
         client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n  \
         min_version: TLS13\n",
    );
    let agent = Agent::start(
        &Scenario::default(),
        AgentOpts {
            extra_args: vec![flag],
            ..AgentOpts::default()
        },
    );
    let with_cert = https_get(&pki.client(true), &agent.addr, "/metrics", None)
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", agent.log_text()));
    assert_eq!(with_cert.status, 200);
    // Without a certificate the server ends the handshake (with TLS 1.3 the client
    // learns it on its first read).
    let e = https_get(&pki.client(false), &agent.addr, "/metrics", None)
        .err()
        .expect("served a client without a certificate");
    assert!(
        e.contains("Certificate") || e.contains("certificate"),
        "{e}"
    );
}

/// Runs the binary to its exit (it must not start serving) and returns status and stderr.
fn run_to_exit(args: &[String]) -> (Option<i32>, String) {
    let mut child = std::process::Command::new(BIN)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} did not exit: it started serving");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status.code(), stderr)
}

#[test]
fn bad_web_config_exits_1_naming_file_and_key() {
    let pki = Pki::new("bad-web");
    let config = pki.path("aggregator.toml");
    std::fs::write(&config, "[aggregator]\nscrape_interval = \"1s\"\n").unwrap();
    let web = pki.path("web.yml").display().to_string();
    let cases = [
        (
            "tls_server_config:\n  cert_file: missing.crt\n  key_file: server.key\n",
            format!("{web}: tls_server_config.cert_file: cannot read "),
        ),
        (
            "tls_server_config:\n  cert_file: server.crt\n  key_file: client.key\n",
            format!("{web}: tls_server_config.key_file: the private key does not belong"),
        ),
        (
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_auth_type: RequireAndVerifyClientCert\n",
            format!("{web}: tls_server_config.client_ca_file: required"),
        ),
        (
            "tls_server_config:\n  cert_file: server.crt\n  keyfile: server.key\n",
            format!("{web}:3:3: tls_server_config: unknown field `keyfile`"),
        ),
        (
            "basic_auth_users:\n  alice: hunter2\n",
            format!("{web}: basic_auth_users.alice: not a bcrypt hash"),
        ),
    ];
    for (yaml, want) in &cases {
        let flag = pki.web_config(yaml);
        for role in [
            vec!["agent".to_string(), "--nvml.library=/nonexistent.so".into()],
            vec![
                "aggregator".to_string(),
                format!("--config.file={}", config.display()),
                format!("--storage.path={}", pki.path("data").display()),
            ],
        ] {
            let mut args = role.clone();
            args.push("--web.listen-address=127.0.0.1:0".into());
            args.push(flag.clone());
            let (code, stderr) = run_to_exit(&args);
            assert_eq!(code, Some(1), "{args:?}: {stderr}");
            assert!(
                stderr.contains(want.as_str()),
                "{args:?}\nwant {want}\n{stderr}"
            );
            assert!(!stderr.contains("serving"), "{stderr}");
        }
        // check-config runs the same validation on a web config file.
        let (code, stderr) = run_to_exit(&["check-config".to_string(), web.clone()]);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(
            stderr.contains(want.as_str()),
            "check-config\nwant {want}\n{stderr}"
        );
    }
    // Nothing started: no ledger was created.
    assert!(!pki.path("data").exists());
}

#[test]
fn bad_scrape_security_keys_exit_1_naming_file_and_key() {
    let pki = Pki::new("bad-scrape");
    let config = pki.path("aggregator.toml");
    let file = config.display().to_string();
    std::fs::write(pki.path("password"), format!("{PASSWORD}\n")).unwrap();
    let cases = [
        (
            "basic_auth_username = \"alice\"\nbasic_auth_password_file = \"nope\"\n",
            "aggregator.basic_auth_password_file: cannot read ",
        ),
        ("tls_ca_file = \"server.key\"\n", "aggregator.tls_ca_file: "),
        (
            "tls_cert_file = \"client.crt\"\n",
            "aggregator.tls_key_file: required with tls_cert_file",
        ),
        ("scrape_scheme = \"ftp\"\n", "aggregator.scrape_scheme: "),
    ];
    for (keys, want) in cases {
        std::fs::write(&config, format!("[aggregator]\n{keys}")).unwrap();
        for args in [
            vec!["check-config".to_string(), file.clone()],
            vec![
                "aggregator".to_string(),
                format!("--config.file={file}"),
                format!("--storage.path={}", pki.path("data").display()),
                "--web.listen-address=127.0.0.1:0".into(),
            ],
        ] {
            let (code, stderr) = run_to_exit(&args);
            assert_eq!(code, Some(1), "{args:?}: {stderr}");
            assert!(
                stderr.contains(&format!("{file}: {want}")),
                "{args:?}\nwant {want}\n{stderr}"
            );
        }
    }
}

fn write_scrape_config(pki: &Pki, name: &str, keys: &str, targets: &str) -> PathBuf {
    let config = pki.path(name);
    std::fs::write(
        &config,
        format!("[aggregator]\nscrape_interval = \"1s\"\n{keys}\n{targets}"),
    )
    .unwrap();
    config
}

fn up(m: &Metrics, target: &str) -> Option<f64> {
    m.get("commitmeter_target_up", &[("target", target)])
}

fn errors(m: &Metrics, target: &str, reason: &str) -> f64 {
    m.get(
        "commitmeter_target_scrape_errors_total",
        &[("target", target), ("reason", reason)],
    )
    .unwrap_or(0.0)
}

#[test]
fn aggregator_scrapes_a_tls_agent_with_basic_auth() {
    let pki = Pki::new("scrape-tls");
    // The agent also wants a client certificate, so the aggregator's is exercised too.
    let hash = bcrypt::hash(PASSWORD, 4).unwrap();
    let flag = pki.web_config(&format!(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  \
         client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n\
         basic_auth_users:\n  alice: {hash}\n"
    ));
    let agent = Agent::start(
        &Scenario {
            gpus: vec![Gpu::at_util(50)],
            ..Scenario::default()
        },
        AgentOpts {
            extra_args: vec![flag],
            ..AgentOpts::default()
        },
    );
    let addr = agent.addr.clone();
    let port = addr.rsplit_once(':').unwrap().1.to_string();
    std::fs::write(pki.path("password"), format!("{PASSWORD}\n")).unwrap();
    std::fs::write(pki.path("wrong-password"), "guess\n").unwrap();
    let client_keys = "tls_ca_file = \"ca.crt\"\ntls_cert_file = \"client.crt\"\n\
                       tls_key_file = \"client.key\"\nbasic_auth_username = \"alice\"\n";
    // One file_sd target per case, told apart by `instance`: all are the same agent.
    let sd = |instance: &str, scheme: Option<&str>| {
        let scheme = scheme.map_or(String::new(), |s| format!(r#","__scheme__":"{s}""#));
        format!(r#"{{"targets":["{addr}"],"labels":{{"instance":"{instance}"{scheme}}}}}"#)
    };

    // Right password, https by default; `localhost` checks the server name.
    let good = write_scrape_config(
        &pki,
        "good.toml",
        &format!(
            "scrape_scheme = \"https\"\n{client_keys}basic_auth_password_file = \"password\"\n"
        ),
        &format!("[[targets]]\ntargets = [\"{addr}\", \"localhost:{port}\"]\n"),
    );
    // http by default; file_sd switches one target to https with `__scheme__`.
    std::fs::write(
        pki.path("sd.json"),
        format!(
            "[{}, {}]",
            sd("per-target-https", Some("https")),
            sd("plain", None)
        ),
    )
    .unwrap();
    let per_target = write_scrape_config(
        &pki,
        "per-target.toml",
        &format!("{client_keys}basic_auth_password_file = \"password\"\n"),
        &format!(
            "[[file_sd]]\nfiles = [{:?}]\n",
            pki.path("sd.json").display().to_string()
        ),
    );
    // Wrong password.
    let wrong = write_scrape_config(
        &pki,
        "wrong.toml",
        &format!(
            "scrape_scheme = \"https\"\n{client_keys}basic_auth_password_file = \"wrong-password\"\n"
        ),
        &format!("[[targets]]\ntargets = [\"{addr}\"]\n"),
    );
    // No CA file: the system's roots do not know the test CA.
    let untrusted = write_scrape_config(
        &pki,
        "untrusted.toml",
        "scrape_scheme = \"https\"\n",
        &format!("[[targets]]\ntargets = [\"{addr}\"]\n"),
    );

    let start = |config: &Path, data: &str| Aggregator::start(config, &pki.path(data));
    let (a_good, a_per_target, a_wrong, a_untrusted) = (
        start(&good, "data-good"),
        start(&per_target, "data-per-target"),
        start(&wrong, "data-wrong"),
        start(&untrusted, "data-untrusted"),
    );
    let within = Duration::from_secs(30);
    let localhost = format!("localhost:{port}");
    let m = a_good.wait_for(within, "both TLS targets up", |m| {
        up(m, &addr) == Some(1.0) && up(m, &localhost) == Some(1.0)
    });
    assert_eq!(
        m.get("commitmeter_target_gpus", &[("target", &addr)]),
        Some(1.0)
    );

    let m = a_per_target.wait_for(within, "the __scheme__ target up", |m| {
        up(m, "per-target-https") == Some(1.0) && up(m, "plain") == Some(0.0)
    });
    assert_eq!(errors(&m, "per-target-https", "tls"), 0.0);
    // Plain HTTP to a TLS port: the agent hangs up mid-handshake.
    assert!(errors(&m, "plain", "connect") >= 1.0, "{m:?}");

    let m = a_wrong.wait_for(within, "a 401 from the agent", |m| {
        up(m, &addr) == Some(0.0) && errors(m, &addr, "http_status") >= 1.0
    });
    assert_eq!(errors(&m, &addr, "tls"), 0.0);
    assert!(
        a_wrong.log_text().contains("HTTP status 401"),
        "{}",
        a_wrong.log_text()
    );

    a_untrusted.wait_for(within, "a TLS error", |m| {
        up(m, &addr) == Some(0.0) && errors(m, &addr, "tls") >= 1.0
    });
    assert!(
        a_untrusted.log_text().contains("TLS: "),
        "{}",
        a_untrusted.log_text()
    );

    // The password file is fixed: SIGHUP applies it at once, no restart needed.
    std::fs::write(pki.path("wrong-password"), format!("{PASSWORD}\n")).unwrap();
    signal(a_wrong.child.id(), "-HUP");
    let m = a_wrong.wait_for(within, "the new password applied", |m| {
        up(m, &addr) == Some(1.0)
    });
    assert_eq!(m.get("commitmeter_config_restart_required", &[]), Some(0.0));
}
