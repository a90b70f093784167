//! The set of agents to scrape: static groups from the config plus Prometheus
//! file_sd JSON files, each target mapped to at most one contract.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Deserialize;

use crate::contract::{self, Contract, FileSd, Scheme, TargetGroup};

/// One agent to scrape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host:port`; also the `instance` label.
    pub address: String,
    /// Path of the metrics endpoint (`__metrics_path__` in file_sd, default `/metrics`).
    pub metrics_path: String,
    /// `__scheme__` in file_sd, else the config's `scrape_scheme`.
    pub scheme: Scheme,
    /// Labels the contract selectors match on (group labels + `instance`).
    pub labels: BTreeMap<String, String>,
    pub contract: Option<usize>,
}

impl Target {
    /// The key the ledger and the `target` label know this host by: its `instance`
    /// when file_sd set one (as Prometheus would show it), else `host:port[path]`.
    pub fn key(&self) -> String {
        if let Some(instance) = self.labels.get("instance").filter(|i| **i != self.address) {
            instance.clone()
        } else if self.metrics_path == "/metrics" {
            self.address.clone()
        } else {
            format!("{}{}", self.address, self.metrics_path)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TargetsError {
    #[error("file_sd {path}: {reason}")]
    File { path: PathBuf, reason: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SdGroup {
    targets: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// The files the file_sd globs match now, sorted.
pub fn sd_files(file_sd: &[FileSd]) -> Vec<PathBuf> {
    let mut files = BTreeSet::new();
    for sd in file_sd {
        for pattern in &sd.files {
            if let Ok(paths) = glob::glob(pattern) {
                files.extend(paths.flatten());
            }
        }
    }
    files.into_iter().collect()
}

/// A cheap fingerprint of the file_sd files (names, sizes, mtimes) to notice changes.
pub fn fingerprint(files: &[PathBuf]) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    files
        .iter()
        .map(|p| {
            let meta = std::fs::metadata(p).ok();
            (
                p.clone(),
                meta.as_ref().map_or(0, |m| m.len()),
                meta.and_then(|m| m.modified().ok()),
            )
        })
        .collect()
}

/// What a file_sd group's meta labels say about how to scrape it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdMeta {
    /// `__metrics_path__`, default `/metrics`.
    pub metrics_path: String,
    /// `__scheme__`; `None`: the config's `scrape_scheme`.
    pub scheme: Option<Scheme>,
}

impl Default for SdMeta {
    fn default() -> Self {
        Self {
            metrics_path: "/metrics".into(),
            scheme: None,
        }
    }
}

/// 64 MiB: about 500,000 targets with labels.
pub const MAX_SD_FILE_BYTES: u64 = 64 << 20;

/// Parses one file_sd JSON file: `[{"targets": ["host:port"], "labels": {...}}]`.
pub fn read_sd_file(path: &Path) -> Result<Vec<(TargetGroup, SdMeta)>, TargetsError> {
    let err = |reason: String| TargetsError::File {
        path: path.to_path_buf(),
        reason,
    };
    // A glob can match a FIFO, a device or a directory: opening a FIFO would block until
    // a writer appears, so only regular files (after symlinks) of a sane size are read.
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file; skipped".into()));
    }
    if meta.len() > MAX_SD_FILE_BYTES {
        return Err(err(format!(
            "{} bytes, more than a file_sd file has ({MAX_SD_FILE_BYTES} at most)",
            meta.len()
        )));
    }
    let mut text = String::new();
    {
        use std::io::Read;
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_SD_FILE_BYTES + 1).read_to_string(&mut text))
            .map_err(|e| err(e.to_string()))?;
    }
    let groups: Vec<SdGroup> = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    let mut out = Vec::new();
    for (i, g) in groups.into_iter().enumerate() {
        let mut labels = BTreeMap::new();
        let mut meta = SdMeta::default();
        for (k, v) in g.labels {
            if k == "__metrics_path__" {
                if !v.starts_with('/') {
                    return Err(err(format!(
                        "[{i}].labels.__metrics_path__: must start with '/'"
                    )));
                }
                meta.metrics_path = v;
            } else if k == "__scheme__" {
                meta.scheme = Some(Scheme::parse(&v).ok_or_else(|| {
                    err(format!(
                        "[{i}].labels.__scheme__: {v:?} must be \"http\" or \"https\""
                    ))
                })?);
            } else if k.starts_with("__") {
                // Other meta labels are Prometheus's business, not a selector's.
            } else if crate::configfile::check_label_name(&k).is_err() {
                return Err(err(format!("[{i}].labels: invalid label name {k:?}")));
            } else {
                labels.insert(k, v);
            }
        }
        for t in &g.targets {
            if !crate::configfile::is_host_port(t) {
                return Err(err(format!(
                    "[{i}].targets: {t:?} is not host:port with a numeric port"
                )));
            }
        }
        out.push((
            TargetGroup {
                targets: g.targets,
                labels,
            },
            meta,
        ));
    }
    Ok(out)
}

/// The last good contents of each file_sd file: a file that turns unreadable or
/// malformed keeps its previous targets, as Prometheus does, so a bad edit loses nothing.
pub type SdCache = BTreeMap<PathBuf, Vec<(TargetGroup, SdMeta)>>;

/// The targets to scrape, and those left unscraped because several contracts select them
/// (by key, with those contracts: each contract's ledger keeps them dark, unreported).
#[derive(Debug, Default)]
pub struct Built {
    pub targets: Vec<Target>,
    pub conflicts: Vec<(String, Vec<usize>)>,
    /// For logging: unreadable files (their last good targets kept), duplicates, conflicts.
    pub problems: Vec<String>,
}

/// Builds the target list; `scheme` is for targets without `__scheme__`. Problems
/// (unreadable files, a host matched by two contracts, a duplicate) keep that file's
/// last good targets or skip that target, and are returned for logging.
pub fn build(
    contracts: &[Contract],
    static_groups: &[TargetGroup],
    sd_files: &[PathBuf],
    cache: &mut SdCache,
    scheme: Scheme,
) -> Built {
    let mut problems = Vec::new();
    let mut groups: Vec<(TargetGroup, SdMeta)> = static_groups
        .iter()
        .map(|g| (g.clone(), SdMeta::default()))
        .collect();
    cache.retain(|path, _| sd_files.contains(path));
    for f in sd_files {
        match read_sd_file(f) {
            Ok(g) => {
                cache.insert(f.clone(), g);
            }
            Err(e) => {
                let kept = cache.get(f).map_or(0, Vec::len);
                problems.push(format!(
                    "{e}; keeping its last good contents ({kept} groups)"
                ));
            }
        }
        if let Some(g) = cache.get(f) {
            groups.extend(g.iter().cloned());
        }
    }
    let mut seen = BTreeSet::new();
    let mut targets = Vec::new();
    let mut conflicts = Vec::new();
    for (g, meta) in groups {
        for address in g.targets {
            // An `instance` set in file_sd wins, as in Prometheus (one per group is
            // only useful with one target per group).
            let labels = match g.labels.get("instance") {
                Some(_) => g.labels.clone(),
                None => contract::target_labels(&address, &g.labels),
            };
            let t = Target {
                address,
                metrics_path: meta.metrics_path.clone(),
                scheme: meta.scheme.unwrap_or(scheme),
                labels,
                contract: None,
            };
            if !seen.insert(t.key()) {
                problems.push(format!(
                    "target {} listed twice; keeping the first",
                    t.key()
                ));
                continue;
            }
            match contract::assign(contracts, &t.address, &t.labels) {
                Ok(contract) => targets.push(Target { contract, ..t }),
                Err(e) => {
                    problems.push(format!("{e}; target skipped"));
                    let hits = contract::selecting(contracts, &t.address, &t.labels);
                    conflicts.push((t.key(), hits));
                }
            }
        }
    }
    Built {
        targets,
        conflicts,
        problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The targets of one file_sd file alone, no contracts, scheme `http`.
    fn build_one(file: &Path) -> Built {
        build(
            &[],
            &[],
            std::slice::from_ref(&file.to_path_buf()),
            &mut SdCache::new(),
            Scheme::Http,
        )
    }

    #[test]
    fn file_sd_groups_with_metrics_path_and_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let good = dir.join("good.json");
        std::fs::write(
            &good,
            r#"[{"targets":["a:1","b:2"],"labels":{"cluster":"x","__metrics_path__":"/agent/3/metrics"}},
                {"targets":["c:3"],"labels":{"instance":"gpu-07:9473","__metrics_path__":"/agent/7/metrics","__scheme__":"https"}}]"#,
        )
        .unwrap();
        let bad = dir.join("bad.json");
        std::fs::write(&bad, r#"[{"targets":["nohost"]}]"#).unwrap();
        let mut cache = SdCache::new();
        let Built {
            targets, problems, ..
        } = build(
            &[],
            &[],
            &[good.clone(), bad.clone()],
            &mut cache,
            Scheme::Http,
        );
        assert_eq!(targets.len(), 3);
        assert_eq!(targets[0].key(), "a:1/agent/3/metrics");
        assert_eq!(targets[2].key(), "gpu-07:9473");
        assert_eq!(targets[2].address, "c:3");
        assert_eq!(targets[0].scheme, Scheme::Http);
        assert_eq!(targets[2].scheme, Scheme::Https);
        assert_eq!(
            targets[0].labels.get("cluster").map(String::as_str),
            Some("x")
        );
        assert_eq!(
            targets[0].labels.get("instance").map(String::as_str),
            Some("a:1")
        );
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].contains("bad.json") && problems[0].contains("not host:port"),
            "{problems:?}"
        );
        let files = sd_files(&[FileSd {
            files: vec![format!("{}/*.json", dir.display())],
        }]);
        assert_eq!(files, vec![bad.clone(), good.clone()]);
        let bad_scheme = dir.join("bad-scheme.json");
        std::fs::write(
            &bad_scheme,
            r#"[{"targets":["d:4"],"labels":{"__scheme__":"HTTPS"}}]"#,
        )
        .unwrap();
        let Built {
            problems: scheme_problems,
            ..
        } = build_one(&bad_scheme);
        assert!(
            scheme_problems[0]
                .contains("[0].labels.__scheme__: \"HTTPS\" must be \"http\" or \"https\""),
            "{scheme_problems:?}"
        );
        std::fs::remove_file(&bad_scheme).unwrap();
        // A bad edit keeps the file's last good targets.
        std::fs::write(&good, "[{").unwrap();
        let Built {
            targets, problems, ..
        } = build(&[], &[], &[good], &mut cache, Scheme::Https);
        assert_eq!(targets.len(), 3);
        // Without `__scheme__`, the configured default.
        assert_eq!(targets[0].scheme, Scheme::Https);
        assert!(
            problems[0].contains("keeping its last good contents (2 groups)"),
            "{problems:?}"
        );
    }

    #[test]
    fn file_sd_targets_and_labels_are_checked_like_static_ones() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sd.json");
        // The same host:port check as `[[targets]]`: port 1..=65535, IPv6 in brackets.
        for (target, ok) in [
            ("[::1]:9473", true),
            ("gpu-a:65535", true),
            ("gpu-a:0", false),
            ("::1:9473", false),
            ("gpu a:9473", false),
        ] {
            std::fs::write(&file, format!(r#"[{{"targets":[{target:?}]}}]"#)).unwrap();
            let got = read_sd_file(&file).map_err(|e| e.to_string());
            assert_eq!(got.is_ok(), ok, "{target}: {got:?}");
            if !ok {
                assert!(got.unwrap_err().ends_with(&format!(
                    "[0].targets: {target:?} is not host:port with a numeric port"
                )),);
            }
        }
        std::fs::write(&file, r#"[{"targets":["a:1"],"labels":{"rack-7":"x"}}]"#).unwrap();
        let e = read_sd_file(&file).unwrap_err().to_string();
        assert!(
            e.ends_with("[0].labels: invalid label name \"rack-7\""),
            "{e}"
        );
        // A bad entry skips its file (last good contents kept), never fails the refresh.
        let Built {
            targets, problems, ..
        } = build_one(&file);
        assert!(targets.is_empty() && problems.len() == 1, "{problems:?}");
    }
}
