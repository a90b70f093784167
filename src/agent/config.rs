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
use std::path::Path;

use serde::Deserialize;

pub use crate::configfile::ConfigError;
use crate::configfile::{check_label_name, BadLabelName};

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
    /// Reads the file, then [`parse`](Self::parse)s it.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(path, &crate::configfile::read(path, "config file")?)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: Raw =
            toml::from_str(text).map_err(|e| crate::configfile::toml_error(path, text, &e))?;
        let mut labels = Vec::new();
        for (key, value) in raw.labels {
            let bad =
                |reason: &str| ConfigError::invalid(path, format!("[labels] key `{key}`"), reason);
            match check_label_name(&key) {
                Ok(()) => {}
                Err(BadLabelName::Syntax) => {
                    return Err(bad(
                        "not a valid Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)",
                    ))
                }
                Err(BadLabelName::Reserved) => {
                    return Err(bad("names starting with `__` are reserved by Prometheus"))
                }
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
