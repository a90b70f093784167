//! `--web.config.file`: the YAML web config of Prometheus's exporter-toolkit, so one file
//! format secures every exporter on a host.
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: server.crt            # relative paths: from this file's directory
//!   key_file: server.key
//!   client_auth_type: RequireAndVerifyClientCert   # default NoClientCert
//!   client_ca_file: ca.crt
//!   min_version: TLS12               # default TLS12; max_version default TLS13
//! basic_auth_users:
//!   alice: $2y$10$...                # bcrypt hashes
//! ```
//!
//! [`WebConfigFile::parse`] checks the text without I/O (paths resolved against the file's
//! directory, not read); [`WebConfigFile::build`] reads the certificate files. Both run
//! where a role is prepared ([`WebConfig::load`]), before a socket is opened: a mistake
//! names the file and the key. Unknown keys are errors, including exporter-toolkit keys commitmeter
//! does not implement (`http_server_config`, `cipher_suites`, …), so nothing is silently
//! ignored. An empty file, or an empty `tls_server_config`, means plain HTTP.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::auth::BasicAuth;
use super::tls::{self, ClientAuth, TlsVersion};

pub use crate::configfile::ConfigError;

/// What a listener does beyond plain, open HTTP. `default()` is plain and open.
#[derive(Clone, Default)]
pub struct WebConfig {
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    pub(crate) auth: Option<Arc<BasicAuth>>,
}

impl std::fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfig")
            .field("tls", &self.tls.is_some())
            .field("auth", &self.auth)
            .finish()
    }
}

impl WebConfig {
    /// Plain and open without a file, else [`WebConfig::load`].
    pub fn from_flag(path: Option<&Path>) -> Result<Self, ConfigError> {
        path.map_or_else(|| Ok(Self::default()), Self::load)
    }

    /// Reads the file, [parses](WebConfigFile::parse) it, and [reads the files it
    /// names](WebConfigFile::build).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = crate::configfile::read(path, "web config file")?;
        WebConfigFile::parse(path, &text)?.build()
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    pub fn has_auth(&self) -> bool {
        self.auth.is_some()
    }
}

/// A web config as written and checked, the files it names not read yet.
#[derive(Debug, Clone)]
pub struct WebConfigFile {
    /// The file, for messages.
    path: PathBuf,
    tls: Option<TlsFiles>,
    /// Valid user names and bcrypt hashes.
    users: BTreeMap<String, String>,
}

/// `tls_server_config`, paths resolved against the web config's directory.
#[derive(Debug, Clone)]
struct TlsFiles {
    /// `cert_file` as written, for messages.
    cert_file: String,
    cert: PathBuf,
    key: PathBuf,
    auth: ClientAuth,
    /// `client_ca_file`, given exactly when `auth` verifies certificates.
    client_ca: Option<PathBuf>,
    min: TlsVersion,
    max: TlsVersion,
}

impl WebConfigFile {
    /// Parses and checks `text` as the file at `path`, without I/O: relative paths are
    /// resolved against `path`'s directory, not read.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: Option<RawWebConfig> =
            serde_norway::from_str(text).map_err(|e| syntax_error(path, &e))?;
        let raw = raw.unwrap_or_default();
        let invalid = |key: &str, message: String| ConfigError::invalid(path, key, message);
        let dir = path.parent().unwrap_or(Path::new(""));
        let resolve = |p: &str| dir.join(p);

        let tls = match raw.tls_server_config.filter(RawTlsServer::is_set) {
            None => None,
            Some(t) => {
                let cert_file = nonempty(&t.cert_file).ok_or_else(|| {
                    invalid(
                        "tls_server_config.cert_file",
                        "required when tls_server_config is set".into(),
                    )
                })?;
                let key_file = nonempty(&t.key_file).ok_or_else(|| {
                    invalid(
                        "tls_server_config.key_file",
                        "required when tls_server_config is set".into(),
                    )
                })?;
                let auth = t.client_auth_type.unwrap_or_default();
                let client_ca = match (auth, nonempty(&t.client_ca_file)) {
                    (a, None) if a.verifies() => {
                        return Err(invalid(
                            "tls_server_config.client_ca_file",
                            format!("required with client_auth_type {a:?}"),
                        ))
                    }
                    (ClientAuth::NoClientCert, Some(_)) => {
                        return Err(invalid(
                            "tls_server_config.client_auth_type",
                            "client_ca_file is set but client_auth_type is NoClientCert: \
                             set RequireAndVerifyClientCert or VerifyClientCertIfGiven"
                                .into(),
                        ))
                    }
                    (a, Some(_)) if !a.verifies() => {
                        return Err(invalid(
                            "tls_server_config.client_ca_file",
                            format!(
                                "not used with client_auth_type {a:?}, which accepts any \
                                 certificate: use RequireAndVerifyClientCert to check them"
                            ),
                        ))
                    }
                    (_, ca) => ca.map(resolve),
                };
                let min = t.min_version.unwrap_or(TlsVersion::TLS12);
                let max = t.max_version.unwrap_or(TlsVersion::TLS13);
                if max < TlsVersion::TLS12 {
                    return Err(invalid(
                        "tls_server_config.max_version",
                        format!("{max:?}: only TLS12 and TLS13 are supported"),
                    ));
                }
                if min > max {
                    return Err(invalid(
                        "tls_server_config.min_version",
                        format!("{min:?} is above max_version {max:?}"),
                    ));
                }
                Some(TlsFiles {
                    cert_file: cert_file.to_string(),
                    cert: resolve(cert_file),
                    key: resolve(key_file),
                    auth,
                    client_ca,
                    min,
                    max,
                })
            }
        };

        let users = raw.basic_auth_users.unwrap_or_default();
        for (user, hash) in &users {
            if user.is_empty() || user.contains(':') {
                return Err(invalid(
                    "basic_auth_users",
                    format!("{user:?}: a user name must be non-empty and without ':'"),
                ));
            }
            let Ok(parts) = hash.parse::<bcrypt::HashParts>() else {
                return Err(invalid(
                    &format!("basic_auth_users.{user}"),
                    format!(
                        "not a bcrypt hash (expected $2y$10$ and 53 more characters; \
                         `htpasswd -nBC 10 {user}` prints {user}:HASH)"
                    ),
                ));
            };
            let cost = parts.get_cost();
            if !BCRYPT_COSTS.contains(&cost) {
                return Err(invalid(
                    &format!("basic_auth_users.{user}"),
                    format!(
                        "bcrypt cost {cost} is outside {}..={}: {}; hash the password again, \
                         e.g. `htpasswd -nBC 10 {user}`",
                        BCRYPT_COSTS.start(),
                        BCRYPT_COSTS.end(),
                        cost_problem(cost)
                    ),
                ));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            tls,
            users,
        })
    }

    /// Reads the certificate, key and CA files and builds the TLS acceptor; a file that
    /// cannot be read or used names the file and the key.
    pub fn build(&self) -> Result<WebConfig, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::invalid(&self.path, key, message);
        let tls = match &self.tls {
            None => None,
            Some(t) => {
                let chain = tls::load_certs(&t.cert)
                    .map_err(|e| invalid("tls_server_config.cert_file", e.to_string()))?;
                let key = tls::load_key(&t.key)
                    .map_err(|e| invalid("tls_server_config.key_file", e.to_string()))?;
                let roots =
                    match &t.client_ca {
                        None => None,
                        Some(ca) => Some(tls::root_store(ca).map_err(|e| {
                            invalid("tls_server_config.client_ca_file", e.to_string())
                        })?),
                    };
                let config =
                    tls::server_config(chain, key, t.auth, roots, &tls::versions(t.min, t.max))
                        .map_err(|e| {
                            let key = match e {
                                tls::TlsError::Verifier(_) => "tls_server_config.client_ca_file",
                                _ => "tls_server_config.key_file",
                            };
                            invalid(key, format!("{e} (with cert_file {})", t.cert_file))
                        })?;
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
            }
        };
        let auth = (!self.users.is_empty()).then(|| Arc::new(BasicAuth::new(self.users.clone())));
        Ok(WebConfig { tls, auth })
    }
}

/// The bcrypt costs accepted in `basic_auth_users`.
///
/// exporter-toolkit checks each hash with Go's `bcrypt.Cost`, which accepts 4 to 31
/// (`bcrypt.MinCost`, `bcrypt.MaxCost`); beyond 31 no bcrypt can verify it, so every login
/// would fail with 401. But the cost is exponential: about 70 ms at 10 on a current core,
/// doubling with each step, so 31 is some 40 hours of CPU for one uncached login. 16 is
/// about 5 s, already half the default scrape timeout; above it a login could outlast
/// the scrape that needs it. The floor is bcrypt's own (4).
pub const BCRYPT_COSTS: std::ops::RangeInclusive<u32> = 4..=16;

/// Why a bcrypt cost outside [`BCRYPT_COSTS`] cannot be used, for the error message.
fn cost_problem(cost: u32) -> String {
    if cost < 4 {
        return "bcrypt's smallest cost is 4, so no bcrypt can check this hash and every \
                login would be refused"
            .into();
    }
    if cost > 31 {
        return "bcrypt's largest cost is 31, so no bcrypt can check this hash and every \
                login would be refused"
            .into();
    }
    // ~70 ms at cost 10, doubling per step.
    let seconds = 0.07 * f64::from(1u32 << (cost - 10).min(21));
    let took = if seconds >= 7200.0 {
        format!("about {:.0} hours", seconds / 3600.0)
    } else if seconds >= 120.0 {
        format!("about {:.0} minutes", seconds / 60.0)
    } else {
        format!("about {seconds:.0} s")
    };
    format!("each uncached login would take {took} of CPU")
}

fn nonempty(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|s| !s.is_empty())
}

/// `file:line:column: message`, the position taken out of serde_norway's message.
fn syntax_error(path: &Path, e: &serde_norway::Error) -> ConfigError {
    let mut message = e.to_string();
    let mut location = String::new();
    if let Some(l) = e.location() {
        location = format!(":{}:{}", l.line(), l.column());
        let suffix = format!(" at line {} column {}", l.line(), l.column());
        if let Some(stripped) = message.strip_suffix(&suffix) {
            message = stripped.to_string();
        }
    }
    ConfigError::Syntax {
        path: path.to_path_buf(),
        location,
        message,
    }
}

#[derive(Deserialize, Default)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping of tls_server_config and basic_auth_users"
)]
struct RawWebConfig {
    tls_server_config: Option<RawTlsServer>,
    basic_auth_users: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a mapping of TLS settings")]
struct RawTlsServer {
    cert_file: Option<String>,
    key_file: Option<String>,
    client_auth_type: Option<ClientAuth>,
    client_ca_file: Option<String>,
    min_version: Option<TlsVersion>,
    max_version: Option<TlsVersion>,
}

impl RawTlsServer {
    /// exporter-toolkit serves plain HTTP for a `tls_server_config` with nothing in it.
    fn is_set(&self) -> bool {
        nonempty(&self.cert_file).is_some()
            || nonempty(&self.key_file).is_some()
            || nonempty(&self.client_ca_file).is_some()
            || self.client_auth_type.is_some()
            || self.min_version.is_some()
            || self.max_version.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory with a CA, a server certificate signed by it, and a second key.
    struct Files(tempfile::TempDir);

    impl Files {
        fn new(tag: &str) -> Self {
            let tmp = tempfile::Builder::new()
                .prefix(&format!("commitmeter-webconfig-{tag}-"))
                .tempdir()
                .unwrap();
            let dir = tmp.path();
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca = ca_params.self_signed(&ca_key).unwrap();
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
                .unwrap()
                .signed_by(&key, &ca, &ca_key)
                .unwrap();
            let other = rcgen::KeyPair::generate().unwrap();
            std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
            std::fs::write(dir.join("server.crt"), cert.pem()).unwrap();
            std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
            std::fs::write(dir.join("other.key"), other.serialize_pem()).unwrap();
            Self(tmp)
        }

        fn parse(&self, yaml: &str) -> Result<WebConfig, String> {
            WebConfigFile::parse(&self.0.path().join("web.yml"), yaml)
                .and_then(|f| f.build())
                .map_err(|e| e.to_string())
        }

        fn file(&self) -> String {
            self.0.path().join("web.yml").display().to_string()
        }
    }

    #[test]
    fn full_config_with_relative_paths() {
        let f = Files::new("full");
        let hash = bcrypt::hash("pw", 4).unwrap();
        let w = f
            .parse(&format!(
                "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  \
                 client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n  \
                 min_version: TLS13\nbasic_auth_users:\n  alice: {hash}\n"
            ))
            .unwrap();
        assert!(w.is_tls() && w.has_auth());
        // Absolute paths work too; every client auth type is accepted.
        for auth in ["RequestClientCert", "RequireAnyClientCert", "NoClientCert"] {
            let w = f
                .parse(&format!(
                    "tls_server_config:\n  cert_file: {0}/server.crt\n  key_file: {0}/server.key\n  client_auth_type: {auth}\n",
                    f.0.path().display()
                ))
                .unwrap();
            assert!(w.is_tls() && !w.has_auth(), "{auth}");
        }
        let w = f
            .parse("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: ca.crt\n  min_version: TLS10\n")
            .unwrap();
        assert!(w.is_tls());
    }

    #[test]
    fn bcrypt_costs_4_to_16_are_accepted() {
        let f = Files::new("costs");
        // The costs are only parsed here: nothing is hashed.
        for cost in ["04", "10", "16"] {
            let w = f
                .parse(&format!(
                    "basic_auth_users:\n  carol: $2y${cost}$4gCQ3BBkE6HRfMH9DrHfJulFfcrNBDF3GhCmYkxz3SBzTFIOGSVXm\n"
                ))
                .unwrap();
            assert!(w.has_auth(), "{cost}");
        }
    }

    #[test]
    fn empty_means_plain_http() {
        let f = Files::new("empty");
        for yaml in [
            "",
            "# nothing\n",
            "tls_server_config:\n",
            "tls_server_config: {}\nbasic_auth_users: {}\n",
        ] {
            let w = f.parse(yaml).unwrap();
            assert!(!w.is_tls() && !w.has_auth(), "{yaml:?}");
        }
        let w = f
            .parse(&format!(
                "basic_auth_users:\n  bob: '{}'\n",
                bcrypt::hash("x", 4).unwrap()
            ))
            .unwrap();
        assert!(!w.is_tls() && w.has_auth());
    }

    #[test]
    fn mistakes_name_the_file_and_the_key() {
        let f = Files::new("mistakes");
        let file = f.file();
        let e = f
            .parse("tls_server_config:\n  cert_fil: server.crt\n")
            .unwrap_err();
        assert!(
            e.starts_with(&format!(
                "{file}:2:3: tls_server_config: unknown field `cert_fil`"
            )),
            "{e}"
        );
        let e = f
            .parse("http_server_config:\n  http2: false\n")
            .unwrap_err();
        assert!(e.contains("unknown field `http_server_config`"), "{e}");
        let e = f
            .parse("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_auth_type: RequireClientCert\n")
            .unwrap_err();
        assert!(e.starts_with(&format!("{file}:4:")), "{e}");
        assert!(e.contains("RequireClientCert"), "{e}");
        let cases = [
            (
                "tls_server_config:\n  key_file: server.key\n",
                "tls_server_config.cert_file: required",
            ),
            (
                "tls_server_config:\n  cert_file: server.crt\n",
                "tls_server_config.key_file: required",
            ),
            (
                "tls_server_config:\n  cert_file: missing.crt\n  key_file: server.key\n",
                "tls_server_config.cert_file: cannot read",
            ),
            (
                "tls_server_config:\n  cert_file: server.key\n  key_file: server.key\n",
                "tls_server_config.cert_file: ",
            ),
            (
                "tls_server_config:\n  cert_file: server.crt\n  key_file: server.crt\n",
                "tls_server_config.key_file: ",
            ),
            (
                "tls_server_config:\n  cert_file: server.crt\n  key_file: other.key\n",
                "tls_server_config.key_file: the private key does not belong to the certificate",
            ),
            (
                "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_auth_type: RequireAndVerifyClientCert\n",
                "tls_server_config.client_ca_file: required with client_auth_type RequireAndVerifyClientCert",
            ),
            (
                "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_ca_file: ca.crt\n",
                "tls_server_config.client_auth_type: client_ca_file is set but client_auth_type is NoClientCert",
            ),
            (
                "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_auth_type: RequireAnyClientCert\n  client_ca_file: ca.crt\n",
                "tls_server_config.client_ca_file: not used with client_auth_type RequireAnyClientCert",
            ),
            (
                "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: server.key\n",
                "tls_server_config.client_ca_file: ",
            ),
            (
                "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  max_version: TLS11\n",
                "tls_server_config.max_version: TLS11: only TLS12 and TLS13",
            ),
            (
                "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  min_version: TLS13\n  max_version: TLS12\n",
                "tls_server_config.min_version: TLS13 is above max_version TLS12",
            ),
            (
                "basic_auth_users:\n  alice: plaintext\n",
                "basic_auth_users.alice: not a bcrypt hash",
            ),
            (
                "basic_auth_users:\n  'a:b': $2y$04$4gCQ3BBkE6HRfMH9DrHfJulFfcrNBDF3GhCmYkxz3SBzTFIOGSVXm\n",
                "basic_auth_users: \"a:b\": a user name",
            ),
            (
                "basic_auth_users:\n  carol: $2y$99$4gCQ3BBkE6HRfMH9DrHfJulFfcrNBDF3GhCmYkxz3SBzTFIOGSVXm\n",
                "basic_auth_users.carol: bcrypt cost 99 is outside 4..=16: bcrypt's largest cost is 31",
            ),
            (
                "basic_auth_users:\n  carol: $2y$32$4gCQ3BBkE6HRfMH9DrHfJulFfcrNBDF3GhCmYkxz3SBzTFIOGSVXm\n",
                "basic_auth_users.carol: bcrypt cost 32 is outside 4..=16: bcrypt's largest cost is 31",
            ),
            (
                "basic_auth_users:\n  carol: $2y$31$4gCQ3BBkE6HRfMH9DrHfJulFfcrNBDF3GhCmYkxz3SBzTFIOGSVXm\n",
                "basic_auth_users.carol: bcrypt cost 31 is outside 4..=16: each uncached login would take about 41 hours of CPU",
            ),
            (
                "basic_auth_users:\n  carol: $2y$17$4gCQ3BBkE6HRfMH9DrHfJulFfcrNBDF3GhCmYkxz3SBzTFIOGSVXm\n",
                "basic_auth_users.carol: bcrypt cost 17 is outside 4..=16: each uncached login would take about 9 s of CPU",
            ),
            (
                "basic_auth_users:\n  carol: $2y$03$4gCQ3BBkE6HRfMH9DrHfJulFfcrNBDF3GhCmYkxz3SBzTFIOGSVXm\n",
                "basic_auth_users.carol: bcrypt cost 3 is outside 4..=16: bcrypt's smallest cost is 4",
            ),
        ];
        for (yaml, want) in cases {
            let e = f.parse(yaml).unwrap_err();
            assert!(e.starts_with(&format!("{file}: {want}")), "{yaml}\n{e}");
        }
        let e = WebConfig::load(Path::new("/nonexistent/web.yml")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/nonexistent/web.yml: cannot read web config file"),
            "{e}"
        );
    }
}
