//! What the config files share: their one error shape, and small pure helpers used by the
//! config files and the command line (durations, TOML error positions, label names,
//! `host:port` addresses).
//!
//! Every config file (the agent's and the aggregator's TOML, the web config YAML) is parsed
//! without I/O beyond reading the file itself: paths are resolved against the file's
//! directory but not opened. The files they name are read where the role is prepared
//! (`agent::prepare`, `aggregator::prepare`, `check-config`), with errors in this same shape.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// A mistake in a config file. Display is one line naming the file, and the key where
/// there is one:
///
/// - `agent.toml: cannot read config file: No such file or directory (os error 2)`
/// - `web.yml:2:3: tls_server_config: unknown field `cert_fil`` (syntax, types, unknown
///   keys: line and column from the parser)
/// - `aggregator.toml: aggregator.tls_ca_file: cannot read ca.crt: …`
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file itself cannot be read; `what` names it (`config file`, `web config
    /// file`).
    #[error("{path}: cannot read {what}: {source}")]
    Read {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{path}{location}: {message}")]
    Syntax {
        path: PathBuf,
        /// `:line:column`, or empty when the parser gave no position.
        location: String,
        message: String,
    },
    /// A value that parses but cannot be used, or a file it names that cannot be read or
    /// used; `key` is e.g. `aggregator.tls_ca_file`, `tls_server_config.cert_file`,
    /// ``[labels] key `rack` ``.
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// A `key` of the file at `path` that cannot be used.
    pub fn invalid(path: &Path, key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Reads a config file whole; `what` names it in the error (`config file`).
pub fn read(path: &Path, what: &'static str) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        what,
        source,
    })
}

/// A TOML error as `file:line:column: message`, without the source excerpt.
pub fn toml_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    ConfigError::Syntax {
        path: path.to_path_buf(),
        location: toml_location(text, e),
        message: e.message().trim().replace('\n', " "),
    }
}

/// Why a label name cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadLabelName {
    /// Not `[a-zA-Z_][a-zA-Z0-9_]*`.
    Syntax,
    /// Starts with `__`, which Prometheus reserves for itself.
    Reserved,
}

/// Checks a Prometheus label name a user may set: `[a-zA-Z_][a-zA-Z0-9_]*`, not starting
/// with `__`. The one check for every label name in the config files and file_sd; callers
/// add the names their own role sets (`instance`, …).
pub fn check_label_name(name: &str) -> Result<(), BadLabelName> {
    let mut chars = name.chars();
    let valid = chars.next().is_some_and(is_label_start) && chars.all(is_label_char);
    if !valid {
        Err(BadLabelName::Syntax)
    } else if name.starts_with("__") {
        Err(BadLabelName::Reserved)
    } else {
        Ok(())
    }
}

/// Whether `c` may begin a label name: `[a-zA-Z_]`.
pub fn is_label_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

/// Whether `c` may follow the first character of a label name: `[a-zA-Z0-9_]`.
pub fn is_label_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// `host:port` with a numeric port 1..=65535; the host is a DNS name / IPv4 address
/// (`[A-Za-z0-9._-]+`) or a bracketed IPv6 address (`[::1]:9473`). The one check for
/// static and file_sd targets.
pub fn is_host_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let port_ok = !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|p| p > 0);
    let host_ok = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        inner.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    };
    port_ok && host_ok
}

/// Parses a Prometheus-style duration: `1s`, `500ms`, `1m30s`, `2h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("invalid duration {s:?}: expected e.g. 15s, 500ms, 1m30s");
    if s.is_empty() {
        return Err(err());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
        if digits == 0 {
            return Err(err());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86_400),
            "w" => Duration::from_secs(7 * 86_400),
            _ => return Err(err()),
        };
        let part = unit
            .checked_mul(u32::try_from(n).map_err(|_| err())?)
            .ok_or_else(err)?;
        total = total.checked_add(part).ok_or_else(err)?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// Where a TOML error is, as `:line:column` (column in characters), or "" when the
/// parser gave no position.
pub fn toml_location(text: &str, e: &toml::de::Error) -> String {
    e.span()
        .map(|span| {
            let mut start = span.start.min(text.len());
            while !text.is_char_boundary(start) {
                start -= 1;
            }
            let before = &text[..start];
            let line = before.matches('\n').count() + 1;
            let col = before[before.rfind('\n').map_or(0, |i| i + 1)..]
                .chars()
                .count()
                + 1;
            format!(":{line}:{col}")
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["", "s", "1", "1x", "-1s", "1.5s", "99999999999s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn label_names() {
        for good in ["a", "_a", "rack_7", "A_b9"] {
            assert_eq!(check_label_name(good), Ok(()), "{good}");
        }
        for bad in ["", "1rack", "cluster-name", "a.b", "é"] {
            assert_eq!(check_label_name(bad), Err(BadLabelName::Syntax), "{bad}");
        }
        for reserved in ["__", "__address__", "__name"] {
            assert_eq!(
                check_label_name(reserved),
                Err(BadLabelName::Reserved),
                "{reserved}"
            );
        }
    }

    #[test]
    fn host_ports() {
        for good in [
            "a:1",
            "gpu-a.example:9473",
            "10.0.0.1:65535",
            "[::1]:9473",
            "h_1:80",
        ] {
            assert!(is_host_port(good), "{good}");
        }
        for bad in [
            "nohost",
            "gpu-a:",
            "gpu-a:http",
            ":9473",
            "gpu a:9473",
            "http://gpu-a:9473",
            "gpu-a:0",
            "gpu-a:65536",
            "gpu-a:+80",
            "::1:9473",
            "[nothex]:9473",
        ] {
            assert!(!is_host_port(bad), "{bad}");
        }
    }

    #[test]
    fn toml_locations_count_characters() {
        let text = "a = \"é\"\nb = 7x\n";
        let e = text.parse::<toml::Table>().unwrap_err();
        assert_eq!(toml_location(text, &e), ":2:6");
    }
}
