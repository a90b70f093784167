//! `commitmeter check-config`: the same validation the roles run at start.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Agent(#[from] crate::agent::config::ConfigError),
    #[error(transparent)]
    Aggregator(#[from] crate::contract::ConfigError),
    #[error(transparent)]
    Web(#[from] crate::http::webconfig::WebConfigError),
}

/// Validates one file. A `.yml`/`.yaml` file is a web config (`--web.config.file`);
/// an aggregator file is recognised by its top-level tables (`aggregator`, `targets`,
/// `file_sd`, `contracts`); anything else is read as an agent file. Returns a
/// one-line summary.
pub fn check_file(path: &Path) -> Result<String, CheckError> {
    if path.extension().is_some_and(|e| e == "yml" || e == "yaml") {
        crate::http::webconfig::WebConfig::load(path)?;
        return Ok(format!("{}: web config OK", path.display()));
    }
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let is_aggregator = text.parse::<toml::Table>().is_ok_and(|t| {
        ["aggregator", "targets", "file_sd", "contracts"]
            .iter()
            .any(|k| t.contains_key(*k))
    });
    if is_aggregator {
        let c = crate::contract::load(path)?;
        let targets: usize = c.static_targets.iter().map(|g| g.targets.len()).sum();
        Ok(format!(
            "{}: aggregator config OK: {} contracts, {} static targets, {} file_sd entries",
            path.display(),
            c.contracts.len(),
            targets,
            c.file_sd.len()
        ))
    } else {
        let c = crate::agent::config::AgentConfig::load(path)?;
        Ok(format!(
            "{}: agent config OK: {} host labels",
            path.display(),
            c.labels.len()
        ))
    }
}
