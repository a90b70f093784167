//! `commitmeter check-config`: the same validation the roles run at start, plus what the
//! aggregator only learns at run time: the file_sd files present now and the targets each
//! contract selects.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::aggregator::targets;
use crate::contract::AggregatorConfig;

/// What a file is checked as (`--kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// The agent's `--config.file` (`[labels]`).
    Agent,
    /// The aggregator's `--config.file` (`[aggregator]`, `[[targets]]`, `[[file_sd]]`,
    /// `[[contracts]]`, `[[teams]]`, `[storage]`).
    Aggregator,
    /// A `--web.config.file` (YAML).
    Web,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Agent => "agent file",
            Kind::Aggregator => "aggregator file",
            Kind::Web => "web config",
        })
    }
}

/// A mistake, with the kind the file was checked as and why, so a file read as the wrong
/// kind is obvious: `a.toml:3:1: … (checked as aggregator file: it has [[contracts]])`.
#[derive(Debug, thiserror::Error)]
#[error("{error} (checked as {kind}: {why})")]
pub struct CheckError {
    pub kind: Kind,
    pub why: String,
    #[source]
    pub error: Box<Problem>,
}

#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// Any config file, or a file it names.
    #[error(transparent)]
    File(#[from] crate::configfile::ConfigError),
    /// A mistake in an aggregator file's contracts.
    #[error(transparent)]
    Aggregator(#[from] crate::contract::ConfigError),
    /// file_sd files the aggregator would log as unusable, or targets it would skip.
    #[error("{path}: {problems}")]
    Targets { path: PathBuf, problems: String },
}

/// A file that passed: what was checked, and anything implausible in it.
#[derive(Debug)]
pub struct Checked {
    /// One line: the file, its kind and why, and counts.
    pub summary: String,
    /// Indented lines: file_sd files and the targets each contract selects.
    pub details: Vec<String>,
    /// Implausible values, each naming the file and key.
    pub warnings: Vec<String>,
}

/// Decides what `path` is: `--kind` if given; a `.yml`/`.yaml` file is a web config; a
/// TOML file by the tables it has (even when its syntax is broken), else by its name
/// (containing `aggregator` or `agent`), else an agent file. Returns the reason too.
pub fn kind_of(path: &Path, text: &str, explicit: Option<Kind>) -> (Kind, String) {
    if let Some(k) = explicit {
        return (k, "--kind".into());
    }
    if path.extension().is_some_and(|e| e == "yml" || e == "yaml") {
        return (Kind::Web, "its .yml/.yaml extension".into());
    }
    let tables = tables(text);
    let aggregator: Vec<&str> = tables
        .iter()
        .map(String::as_str)
        .filter(|t| {
            [
                "aggregator",
                "targets",
                "file_sd",
                "contracts",
                "teams",
                "storage",
            ]
            .contains(t)
        })
        .collect();
    if !aggregator.is_empty() {
        return (
            Kind::Aggregator,
            format!("it has {}", shown_tables(&aggregator)),
        );
    }
    if tables.iter().any(|t| t == "labels") {
        return (Kind::Agent, "it has [labels]".into());
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if name.contains("aggregator") {
        return (Kind::Aggregator, "its name contains \"aggregator\"".into());
    }
    if name.contains("agent") {
        return (Kind::Agent, "its name contains \"agent\"".into());
    }
    (
        Kind::Agent,
        "no aggregator tables and no kind in its name; pass --kind aggregator if it is one".into(),
    )
}

/// Top-level table and key names of a TOML text: from the parsed table when the syntax is
/// valid, else from `[name]`/`[[name]]` headers and `name =`/`name.x =` lines before the
/// first header, so a broken file is still recognised by what it holds.
fn tables(text: &str) -> Vec<String> {
    if let Ok(t) = text.parse::<toml::Table>() {
        return t.keys().cloned().collect();
    }
    let mut names = Vec::new();
    let mut in_root = true;
    for line in text.lines() {
        let line = line.trim();
        let name = if let Some(header) = line.strip_prefix('[') {
            in_root = false;
            header.trim_start_matches('[').split(['.', ']']).next()
        } else if in_root {
            line.split(['=', '.']).next().filter(|_| line.contains('='))
        } else {
            None
        };
        if let Some(n) = name.map(|n| n.trim().trim_matches('"')) {
            if !n.is_empty() && !names.iter().any(|x| x == n) {
                names.push(n.to_string());
            }
        }
    }
    names
}

fn shown_tables(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| match *n {
            "aggregator" | "storage" => format!("[{n}]"),
            other => format!("[[{other}]]"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Validates one file as `kind_of` decides.
pub fn check_file(path: &Path, explicit: Option<Kind>) -> Result<Checked, CheckError> {
    // An unreadable file is reported by the loader below, with its path.
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let (kind, why) = kind_of(path, &text, explicit);
    let fail = |error: Problem| CheckError {
        kind,
        why: why.clone(),
        error: Box::new(error),
    };
    match kind {
        Kind::Web => {
            crate::http::webconfig::WebConfig::load(path).map_err(|e| fail(e.into()))?;
            Ok(Checked {
                summary: format!(
                    "{}: web config OK (checked as {kind}: {why})",
                    path.display()
                ),
                details: Vec::new(),
                warnings: Vec::new(),
            })
        }
        Kind::Agent => {
            let c = crate::agent::config::AgentConfig::load(path).map_err(|e| fail(e.into()))?;
            Ok(Checked {
                summary: format!(
                    "{}: agent config OK: {} host labels (checked as {kind}: {why})",
                    path.display(),
                    c.labels.len()
                ),
                details: Vec::new(),
                warnings: Vec::new(),
            })
        }
        Kind::Aggregator => {
            let c = crate::contract::load(path).map_err(|e| fail(e.into()))?;
            // The files it names, read as the aggregator reads them when it starts.
            crate::aggregator::scrape::ScrapeClient::load(path, &c.scrape)
                .map_err(|e| fail(e.into()))?;
            let report = targets_report(path, &c);
            if !report.problems.is_empty() {
                return Err(fail(Problem::Targets {
                    path: path.to_path_buf(),
                    problems: report.problems.join("; "),
                }));
            }
            let static_targets: usize = c.static_targets.iter().map(|g| g.targets.len()).sum();
            let mut warnings = c.warnings.clone();
            warnings.extend(report.warnings);
            let mut details = report.details;
            details.extend(teams_report(&c.teams));
            Ok(Checked {
                summary: format!(
                    "{}: aggregator config OK: {} contracts, {} teams, {} static targets, {} \
                     file_sd entries, {} file_sd files, {} targets in all (checked as {kind}: \
                     {why})",
                    path.display(),
                    c.contracts.len(),
                    c.teams.len(),
                    static_targets,
                    c.file_sd.len(),
                    report.files.len(),
                    report.targets
                ),
                details,
                warnings,
            })
        }
    }
}

/// One line per `[[teams]]` entry, in the order they are tried: its name and rules.
pub fn teams_report(teams: &crate::contract::Teams) -> Vec<String> {
    let mut out: Vec<String> = teams
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let rules: Vec<String> = t.rules().map(|(f, p)| format!("{f} = {p:?}")).collect();
            format!(
                "  team {:?} (tried {}): {}",
                t.name,
                i + 1,
                rules.join(" or ")
            )
        })
        .collect();
    if !teams.is_empty() {
        out.push(format!(
            "  owners no team matches: team {:?}",
            crate::contract::UNASSIGNED
        ));
    }
    out
}

/// The targets an aggregator config gives now (static ones plus the file_sd files present),
/// as the aggregator would build them at start.
#[derive(Debug, Default)]
pub struct TargetsReport {
    pub files: Vec<PathBuf>,
    pub targets: usize,
    /// Unreadable or malformed file_sd files, duplicate targets, targets two contracts select.
    pub problems: Vec<String>,
    /// A contract that selects none of them; a file_sd pattern that matches no file.
    pub warnings: Vec<String>,
    /// Per file and per contract, for `check-config`'s output.
    pub details: Vec<String>,
}

/// Reads the file_sd files the config's globs match now and assigns every target to its
/// contract, as the aggregator does at start; `path` is the config file, for messages.
pub fn targets_report(path: &Path, cfg: &AggregatorConfig) -> TargetsReport {
    let mut r = TargetsReport::default();
    for (n, sd) in cfg.file_sd.iter().enumerate() {
        for (i, pattern) in sd.files.iter().enumerate() {
            let matches = glob::glob(pattern).map_or(0, |g| g.flatten().count());
            if matches == 0 {
                r.warnings.push(format!(
                    "{}: file_sd[{n}].files[{i}]: {pattern:?} matches no file now",
                    path.display()
                ));
            }
        }
    }
    r.files = targets::sd_files(&cfg.file_sd);
    // Each file once on its own, so a bad one is named with its own error; the good ones
    // then go through the aggregator's own target building.
    let mut good = Vec::new();
    for f in &r.files {
        match targets::read_sd_file(f) {
            Ok(groups) => {
                r.details.push(format!(
                    "  file_sd {}: {} targets",
                    f.display(),
                    groups.iter().map(|(g, _)| g.targets.len()).sum::<usize>()
                ));
                good.push(f.clone());
            }
            Err(e) => r.problems.push(e.to_string()),
        }
    }
    let built = targets::build(
        &cfg.contracts,
        &cfg.static_targets,
        &good,
        &mut targets::SdCache::new(),
        cfg.scrape.scheme,
    );
    r.problems.extend(built.problems);
    r.targets = built.targets.len();
    for (i, c) in cfg.contracts.iter().enumerate() {
        let keys: Vec<String> = built
            .targets
            .iter()
            .filter(|t| t.contract == Some(i))
            .map(|t| t.key())
            .collect();
        let contested = built.conflicts.iter().any(|(_, hits)| hits.contains(&i));
        if keys.is_empty() && !contested {
            r.warnings.push(format!(
                "{}: contract {:?}: selector: matches none of the {} targets configured now \
                 (static and file_sd); nothing is delivered to it until one appears",
                path.display(),
                c.id,
                built.targets.len()
            ));
        }
        const SHOWN: usize = 5;
        let mut list = keys
            .iter()
            .take(SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if keys.len() > SHOWN {
            list.push_str(&format!(", … ({} more)", keys.len() - SHOWN));
        }
        r.details.push(format!(
            "  contract {:?}: {} targets{}{list}",
            c.id,
            keys.len(),
            if keys.is_empty() { "" } else { ": " }
        ));
    }
    let free = built
        .targets
        .iter()
        .filter(|t| t.contract.is_none())
        .count();
    if !cfg.contracts.is_empty() {
        r.details.push(format!(
            "  {free} targets in no contract (delivery reported only)"
        ));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kind_is_what_the_user_means() {
        let k = |name: &str, text: &str| kind_of(Path::new(name), text, None);
        assert_eq!(k("web.yml", "").0, Kind::Web);
        assert_eq!(k("x.toml", "[[contracts]]\nid = 1\n").0, Kind::Aggregator);
        assert!(k("x.toml", "[[contracts]]\n").1.contains("[[contracts]]"));
        // Broken syntax: recognised by its headers anyway.
        let (kind, why) = k("x.toml", "[aggregator]\nscrape_interval = \n");
        assert_eq!(
            (kind, why.as_str()),
            (Kind::Aggregator, "it has [aggregator]")
        );
        assert_eq!(k("x.toml", "targets.x = [\n").0, Kind::Aggregator);
        assert_eq!(k("x.toml", "[labels]\na = \"b\"\n").0, Kind::Agent);
        // Empty or broken without tables: by name.
        assert_eq!(
            k("/etc/commitmeter/aggregator.toml", "").0,
            Kind::Aggregator
        );
        assert_eq!(k("my-Aggregator.toml", "= broken").0, Kind::Aggregator);
        assert_eq!(k("agent.toml", "").0, Kind::Agent);
        let (kind, why) = k("site.toml", "");
        assert_eq!(kind, Kind::Agent);
        assert!(why.contains("--kind aggregator"), "{why}");
        // --kind wins over everything.
        assert_eq!(
            kind_of(Path::new("agent.yml"), "[labels]", Some(Kind::Aggregator)),
            (Kind::Aggregator, "--kind".to_string())
        );
    }
}
