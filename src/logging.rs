//! Logging to standard error through tracing-subscriber. Colours only on a terminal,
//! so journald and log shippers get clean lines.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

#[derive(Debug, thiserror::Error)]
#[error("--log.level {level:?}: {reason}")]
pub struct LogError {
    level: String,
    reason: String,
}

pub fn init(level: &str, format: LogFormat) -> Result<(), LogError> {
    let filter = EnvFilter::try_new(level).map_err(|e| LogError {
        level: level.to_string(),
        reason: e.to_string(),
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
    Ok(())
}
