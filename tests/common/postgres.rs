//! A real PostgreSQL for the tests: Debian's `postgresql` package (`initdb`, `pg_ctl` under
//! `/usr/lib/postgresql/<version>/bin`, not on PATH on a fresh machine), started on loopback
//! in a temporary directory on a free port, with password (SCRAM) authentication for the role
//! [`ROLE`] and TLS with a test CA, and stopped on drop. As root (CI), the server runs as the
//! unprivileged user `nobody` (initdb refuses root), in a directory given to that user.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, Weak};

use super::TempDir;

/// The role the book connects as.
pub const ROLE: &str = "book";
/// Its password.
pub const PASSWORD: &str = "book-pass-7c1f";

/// A running PostgreSQL server, stopped (immediately) on drop.
pub struct Postgres {
    dir: TempDir,
    bin: PathBuf,
    /// The user the server runs as when the tests run as root.
    run_as: Option<String>,
    port: u16,
}

/// The newest `/usr/lib/postgresql/<version>/bin` that has `initdb` and `pg_ctl`.
fn bin_dir() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").exists() && bin.join("pg_ctl").exists()).then_some((version, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "no PostgreSQL server under {}: install Debian's postgresql package (.ci/run does)",
            root.display()
        ),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn check(what: &str, out: Output) -> Output {
    assert!(
        out.status.success(),
        "{what}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Postgres {
    /// One server for the tests of this binary that run at the same time: started by the
    /// first, stopped when the last drops its handle (statics are never dropped, so a plain
    /// static server would outlive the tests).
    pub fn shared() -> Arc<Postgres> {
        static SHARED: Mutex<Weak<Postgres>> = Mutex::new(Weak::new());
        let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pg) = slot.upgrade() {
            return pg;
        }
        let pg = Arc::new(Postgres::start());
        *slot = Arc::downgrade(&pg);
        pg
    }

    /// Initialises and starts a new server.
    pub fn start() -> Postgres {
        let bin = bin_dir();
        let dir = TempDir::new("postgres");
        let run_as = rustix::process::geteuid()
            .is_root()
            .then(|| "nobody".to_string());
        let pki = Pki::write(dir.root());
        std::fs::write(dir.path("pwfile"), "superuser-pass\n").unwrap();
        // Written once, here: tests share the server and read this file concurrently, and a
        // rewrite (truncate, then write) let one of them read it empty.
        std::fs::write(dir.path("book.password"), format!("{PASSWORD}\n")).unwrap();
        if let Some(user) = &run_as {
            let out = check(
                "chown the server's directory",
                Command::new("chown")
                    .args(["-R", &format!("{user}:"), dir.root().to_str().unwrap()])
                    .output()
                    .expect("run chown"),
            );
            drop(out);
        }
        let mut pg = Postgres {
            dir,
            bin,
            run_as,
            port: 0,
        };
        let data = pg.dir.path("data");
        check(
            "initdb",
            pg.command("initdb")
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                ])
                .args(["-E", "UTF8", "--no-locale", "--no-sync"])
                .arg(format!("--pwfile={}", pg.dir.path("pwfile").display()))
                .output()
                .expect("run initdb"),
        );
        let mut last = String::new();
        for _ in 0..5 {
            pg.port = free_port();
            let opts = format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
                 -c full_page_writes=off -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                pg.port,
                pg.dir.root().display(),
                pki.server_cert.display(),
                pki.server_key.display(),
            );
            let out = pg
                .command("pg_ctl")
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(pg.dir.path("server.log"))
                .args(["-w", "-t", "60", "-o", &opts, "start"])
                .output()
                .expect("run pg_ctl");
            if out.status.success() {
                pg.psql(
                    "postgres",
                    &format!("CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'"),
                );
                return pg;
            }
            last = format!(
                "{}{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(pg.dir.path("server.log")).unwrap_or_default()
            );
        }
        panic!("PostgreSQL did not start: {last}");
    }

    /// A command of the server's package, run as the server's user.
    /// (In the server's directory: the server's user may not be allowed into the tests'.)
    fn command(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        let mut c = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        };
        c.current_dir(self.dir.root());
        c
    }

    fn psql_command(&self, db: &str, sql: &str) -> Command {
        let mut c = self.command("psql");
        c.arg("-h")
            .arg(self.dir.root())
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", db])
            .args(["-v", "ON_ERROR_STOP=1", "-X", "-A", "-t", "-c", sql]);
        c
    }

    /// Runs `sql` in database `db` as the superuser, over the Unix socket; its output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = check(
            &format!("psql {sql}"),
            self.psql_command(db, sql).output().expect("run psql"),
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Runs `sql` as [`Postgres::psql`] does, expecting the server to refuse it: its error.
    pub fn psql_refused(&self, db: &str, sql: &str) -> String {
        let out = self.psql_command(db, sql).output().expect("run psql");
        assert!(!out.status.success(), "psql {sql}: succeeded");
        String::from_utf8_lossy(&out.stderr).trim().to_string()
    }

    /// A new database owned by [`ROLE`]; its URL (no password: see [`Postgres::password_file`]),
    /// TLS off.
    pub fn database(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE {name} OWNER {ROLE}"));
        self.url(name, "sslmode=disable")
    }

    /// The URL of database `name` as [`ROLE`] with the query `query` (e.g. `sslmode=require`).
    pub fn url(&self, name: &str, query: &str) -> String {
        format!("postgres://{ROLE}@127.0.0.1:{}/{name}?{query}", self.port)
    }

    /// A file holding [`ROLE`]'s password, as an operator writes one (trailing newline).
    pub fn password_file(&self) -> PathBuf {
        self.dir.path("book.password")
    }

    /// The CA that signed the server's certificate (for 127.0.0.1 and localhost).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path("ca.crt")
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Postgres {
    /// Stops the server at once (`-m immediate`: as a crash would), keeping its data.
    pub fn stop(&self) {
        check(
            "pg_ctl stop",
            self.command("pg_ctl")
                .arg("-D")
                .arg(self.dir.path("data"))
                .args(["-m", "immediate", "-w", "stop"])
                .output()
                .expect("run pg_ctl"),
        );
    }

    /// Starts the stopped server again on the same port, with the same settings.
    pub fn start_again(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
            self.port,
            self.dir.root().display(),
            self.dir.path("server.crt").display(),
            self.dir.path("server.key").display(),
        );
        check(
            "pg_ctl start",
            self.command("pg_ctl")
                .arg("-D")
                .arg(self.dir.path("data"))
                .arg("-l")
                .arg(self.dir.path("server.log"))
                .args(["-w", "-t", "60", "-o", &opts, "start"])
                .output()
                .expect("run pg_ctl"),
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.path("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
        if let Ok(out) = out {
            if !out.status.success() {
                eprintln!(
                    "pg_ctl stop: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

/// The server's TLS files: a test CA and a certificate it signed for 127.0.0.1 and localhost.
struct Pki {
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl Pki {
    fn write(dir: &Path) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "commitmeter test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let pki = Pki {
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
        };
        std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
        std::fs::write(&pki.server_cert, cert.pem()).unwrap();
        std::fs::write(&pki.server_key, key.serialize_pem()).unwrap();
        // The server refuses a key file others can read.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pki.server_key, std::fs::Permissions::from_mode(0o600)).unwrap();
        pki
    }
}
