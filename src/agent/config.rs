//! The agent's optional TOML config: host labels exported in `commitmeter_host_info`.
//!
//! ```toml
//! [labels]
//! provider = "coreweave"
//! cluster = "h200-east"
//! region = "us-east-1"
//! ```
//!
//! Parsing is pure (`parse` takes the text), so every mistake is testable and is
//! reported with the file and the key before anything starts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read config file: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}{location}: {message}")]
    Syntax {
        path: PathBuf,
        location: String,
        message: String,
    },
    #[error("{path}: [labels] key `{key}`: {reason}")]
    Label {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// Host labels, sorted by name.
    pub labels: Vec<(String, String)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// Label names Prometheus or this series already uses; a host label may not shadow them.
const RESERVED: &[&str] = &["job", "instance", "le", "quantile"];

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| syntax_error(path, text, &e))?;
        let mut labels = Vec::new();
        for (key, value) in raw.labels {
            let bad = |reason: &str| ConfigError::Label {
                path: path.to_path_buf(),
                key: key.clone(),
                reason: reason.to_string(),
            };
            if !is_label_name(&key) {
                return Err(bad(
                    "not a valid Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)",
                ));
            }
            if key.starts_with("__") {
                return Err(bad("names starting with `__` are reserved by Prometheus"));
            }
            if RESERVED.contains(&key.as_str()) {
                return Err(bad("reserved: Prometheus sets this label itself"));
            }
            if value.trim().is_empty() {
                return Err(bad("value must not be empty"));
            }
            labels.push((key, value));
        }
        Ok(Self { labels })
    }
}

/// Turns a toml error into "file:line:column: message" without the source excerpt.
pub fn syntax_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let location = crate::configfile::toml_location(text, e);
    ConfigError::Syntax {
        path: path.to_path_buf(),
        location,
        message: e.message().trim().to_string(),
    }
}

pub fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentConfig, String> {
        AgentConfig::parse(Path::new("/etc/commitmeter/agent.toml"), text)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn labels_are_read_sorted() {
        let c = parse("[labels]\nregion = \"us-east-1\"\nprovider = \"acme\"\n").unwrap();
        assert_eq!(
            c.labels,
            vec![
                ("provider".to_string(), "acme".to_string()),
                ("region".to_string(), "us-east-1".to_string())
            ]
        );
        assert_eq!(parse("").unwrap(), AgentConfig::default());
    }

    #[test]
    fn mistakes_name_the_file_and_the_key() {
        assert_eq!(
            parse("[lables]\nx = \"y\"\n").unwrap_err(),
            "/etc/commitmeter/agent.toml:1:2: unknown field `lables`, expected `labels`"
        );
        assert_eq!(
            parse("[labels]\nrack = 7\n").unwrap_err(),
            "/etc/commitmeter/agent.toml:2:8: invalid type: integer `7`, expected a string"
        );
        assert_eq!(
            parse("[labels]\n\"1rack\" = \"a\"\n").unwrap_err(),
            "/etc/commitmeter/agent.toml: [labels] key `1rack`: not a valid Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)"
        );
        assert!(parse("[labels]\n__name = \"a\"\n")
            .unwrap_err()
            .contains("key `__name`: names starting with `__`"));
        assert!(parse("[labels]\ninstance = \"a\"\n")
            .unwrap_err()
            .contains("key `instance`: reserved"));
        assert!(parse("[labels]\nzone = \" \"\n")
            .unwrap_err()
            .contains("key `zone`: value must not be empty"));
        assert!(parse("[labels\n")
            .unwrap_err()
            .starts_with("/etc/commitmeter/agent.toml:1:"));
    }
}
