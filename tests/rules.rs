//! The Prometheus rules in `alerts/`: `promtool check rules` on every rule file, `promtool
//! test rules` on every unit test file in `alerts/tests/`, a firing and a non-firing unit
//! test for every alert, the labels and annotations every alert must carry, runbook links
//! that exist in the repository, and the example Alertmanager configuration (with `amtool`,
//! when installed).
//!
//! promtool comes from Debian's `prometheus` package, amtool from `prometheus-alertmanager`.
//! The YAML is read with plain line scanning (no YAML parser among the dependencies): it
//! relies on block-style YAML as written in `alerts/`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rel(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", rel(path)))
}

/// The `*.yml` / `*.yaml` files directly in `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", rel(dir)))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yml") | Some("yaml")
                )
        })
        .collect();
    files.sort();
    files
}

/// Rule files: the YAML files in `alerts/` with a top-level `groups:` key (not the
/// Alertmanager example).
fn rule_files() -> Vec<PathBuf> {
    let files: Vec<PathBuf> = yaml_files(&root().join("alerts"))
        .into_iter()
        .filter(|p| read(p).lines().any(|l| l.trim_end() == "groups:"))
        .collect();
    assert!(!files.is_empty(), "no rule files in alerts/");
    files
}

fn test_files() -> Vec<PathBuf> {
    let files = yaml_files(&root().join("alerts/tests"));
    assert!(!files.is_empty(), "no unit test files in alerts/tests/");
    files
}

fn promtool() -> Command {
    let found = Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "promtool not found: install Debian's `prometheus` package \
         (`apt-get install prometheus`, as .ci/run does)"
    );
    let mut cmd = Command::new("promtool");
    cmd.current_dir(root());
    cmd
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn promtool_check_rules_is_clean() {
    let files = rule_files();
    let out = promtool()
        .args(["check", "rules"])
        .args(&files)
        .output()
        .expect("run promtool check rules");
    let text = output_text(&out);
    // promtool 2.42 reports lint findings (duplicate rules) with exit status 0.
    let clean = out.status.success()
        && !text.contains("FAILED")
        && !text.contains("WARNING")
        && !text.contains("lint error");
    assert!(clean, "promtool check rules failed:\n{text}");
}

#[test]
fn promtool_unit_tests_pass() {
    // One promtool per file, all at once: the multi-day tests take seconds each.
    let children: Vec<(PathBuf, std::process::Child)> = test_files()
        .into_iter()
        .map(|file| {
            let child = promtool()
                .args(["test", "rules"])
                .arg(&file)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start promtool test rules");
            (file, child)
        })
        .collect();
    let mut failures = Vec::new();
    for (file, child) in children {
        let out = child.wait_with_output().expect("wait for promtool");
        if !out.status.success() {
            failures.push(format!(
                "promtool test rules {} failed:\n{}",
                rel(&file),
                output_text(&out)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The value of a `key: value` line, unquoted.
fn value_of(body: &str) -> &str {
    let v = body.split_once(':').map_or("", |(_, v)| v).trim();
    v.trim_matches(|c| c == '"' || c == '\'')
}

fn key_of(body: &str) -> &str {
    body.split_once(':').map_or("", |(k, _)| k.trim())
}

/// A non-blank, non-comment line of block YAML: whether it starts a sequence item (`- `),
/// and its content (after the dash) with the column where that content starts.
struct Line<'a> {
    item: bool,
    body: &'a str,
    column: usize,
}

fn scan(raw: &str) -> Option<Line<'_>> {
    let trimmed = raw.trim_start();
    if trimmed.is_empty() || trimmed.starts_with('#') {
        return None;
    }
    let indent = raw.len() - trimmed.len();
    match trimmed.strip_prefix("- ") {
        Some(rest) => {
            let body = rest.trim_start();
            Some(Line {
                item: true,
                body,
                column: indent + 2 + (rest.len() - body.len()),
            })
        }
        None => Some(Line {
            item: false,
            body: trimmed,
            column: indent,
        }),
    }
}

/// An alerting rule: its name, where it is, and its `key: value` lines (labels and
/// annotations included, by key).
struct Alert {
    name: String,
    at: String,
    fields: BTreeMap<String, String>,
}

fn alerts() -> Vec<Alert> {
    let mut alerts = Vec::new();
    for file in rule_files() {
        let text = read(&file);
        let mut current: Option<Alert> = None;
        // The column of a key whose value is a block scalar (`|`, `>-`, ...): deeper lines
        // are its text, not keys.
        let mut block: Option<usize> = None;
        for (n, raw) in text.lines().enumerate() {
            let Some(line) = scan(raw) else { continue };
            if block.is_some_and(|column| line.column > column) {
                continue;
            }
            block = None;
            let key = key_of(line.body);
            if matches!(value_of(line.body), "|" | "|-" | "|+" | ">" | ">-" | ">+") {
                block = Some(line.column);
            }
            if line.item && matches!(key, "alert" | "record" | "name") {
                alerts.extend(current.take());
                if key == "alert" {
                    current = Some(Alert {
                        name: value_of(line.body).to_string(),
                        at: format!("{}:{}", rel(&file), n + 1),
                        fields: BTreeMap::new(),
                    });
                }
            } else if let Some(alert) = current.as_mut() {
                if !key.is_empty() && !key.contains(' ') {
                    alert
                        .fields
                        .entry(key.to_string())
                        .or_insert_with(|| value_of(line.body).to_string());
                }
            }
        }
        alerts.extend(current);
    }
    assert!(!alerts.is_empty(), "no alerting rules found in alerts/");
    alerts
}

/// Every `alert_rule_test` item of a unit test file: (alert name, whether `exp_alerts` is
/// non-empty, where). An item starts at `- eval_time:`, `- alertname:` or `- exp_alerts:`;
/// its keys sit at the column of that first key.
fn alert_tests(file: &Path) -> Vec<(String, bool, String)> {
    struct Item {
        column: usize,
        at: String,
        name: Option<String>,
        firing: bool,
    }
    let text = read(file);
    let lines: Vec<(usize, Line<'_>)> = text
        .lines()
        .enumerate()
        .filter_map(|(n, raw)| scan(raw).map(|l| (n, l)))
        .collect();
    let mut items: Vec<Item> = Vec::new();
    for (i, (n, line)) in lines.iter().enumerate() {
        let key = key_of(line.body);
        if line.item && matches!(key, "eval_time" | "alertname" | "exp_alerts") {
            items.push(Item {
                column: line.column,
                at: format!("{}:{}", rel(file), n + 1),
                name: None,
                firing: false,
            });
        }
        let Some(item) = items.last_mut() else {
            continue;
        };
        if line.column != item.column {
            continue;
        }
        match key {
            "alertname" => item.name = Some(value_of(line.body).to_string()),
            "exp_alerts" => {
                let inline = line.body.split_once(':').map_or("", |(_, v)| v).trim();
                item.firing = if inline.is_empty() {
                    // A block sequence when the next line is an item nested under the key
                    // (its dash at the key's column or deeper); otherwise null, empty.
                    lines
                        .get(i + 1)
                        .is_some_and(|(_, next)| next.item && next.column > item.column)
                } else {
                    !matches!(inline, "[]" | "null" | "~")
                };
            }
            _ => {}
        }
    }
    items
        .into_iter()
        .map(|item| {
            let name = item
                .name
                .unwrap_or_else(|| panic!("{}: alert_rule_test without alertname", item.at));
            (name, item.firing, item.at)
        })
        .collect()
}

#[test]
fn every_alert_has_a_firing_and_a_quiet_unit_test() {
    let defined: BTreeSet<String> = alerts().into_iter().map(|a| a.name).collect();
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    let mut unknown = Vec::new();
    for file in test_files() {
        for (name, fires, at) in alert_tests(&file) {
            if !defined.contains(&name) {
                unknown.push(format!("{at}: {name}"));
            }
            if fires {
                firing.insert(name);
            } else {
                quiet.insert(name);
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "unit tests for alerts no rule defines:\n{}",
        unknown.join("\n")
    );
    let no_firing: Vec<&String> = defined.difference(&firing).collect();
    let no_quiet: Vec<&String> = defined.difference(&quiet).collect();
    assert!(
        no_firing.is_empty() && no_quiet.is_empty(),
        "alerts without a unit test where they fire (non-empty exp_alerts): {no_firing:?}\n\
         alerts without a unit test where they stay quiet (empty exp_alerts): {no_quiet:?}"
    );
}

#[test]
fn every_alert_has_severity_summary_description_and_runbook() {
    let mut problems = Vec::new();
    let mut names = BTreeSet::new();
    for alert in alerts() {
        if !names.insert(alert.name.clone()) {
            problems.push(format!("{}: {} defined twice", alert.at, alert.name));
        }
        match alert.fields.get("severity").map(String::as_str) {
            Some("page") | Some("ticket") => {}
            other => problems.push(format!(
                "{}: {}: severity must be page or ticket, found {other:?}",
                alert.at, alert.name
            )),
        }
        for key in ["summary", "description", "runbook_url"] {
            if !alert.fields.contains_key(key) {
                problems.push(format!("{}: {}: no {key}", alert.at, alert.name));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// GitHub's anchor for a Markdown heading: lower case, spaces to dashes, other
/// punctuation dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut fenced = false;
    let mut out = BTreeSet::new();
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            let text = line.trim_start_matches('#');
            if text.starts_with(' ') {
                out.insert(slug(text));
            }
        }
    }
    out
}

#[test]
fn every_runbook_url_exists_in_the_repository() {
    let mut problems = Vec::new();
    for alert in alerts() {
        let Some(url) = alert.fields.get("runbook_url") else {
            continue;
        };
        if url.contains("://") || url.starts_with('/') {
            problems.push(format!(
                "{}: {}: runbook_url {url} must be a path in the repository",
                alert.at, alert.name
            ));
            continue;
        }
        let (path, anchor) = url.split_once('#').unwrap_or((url.as_str(), ""));
        let file = root().join(path);
        if !file.is_file() {
            problems.push(format!(
                "{}: {}: runbook_url {url}: {path} does not exist",
                alert.at, alert.name
            ));
            continue;
        }
        if !anchor.is_empty() && !anchors(&read(&file)).contains(anchor) {
            problems.push(format!(
                "{}: {}: runbook_url {url}: no heading #{anchor} in {path}",
                alert.at, alert.name
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn alertmanager_example_passes_amtool() {
    let config = root().join("alerts/alertmanager/alertmanager.example.yml");
    assert!(config.is_file(), "{} is missing", rel(&config));
    let text = read(&config);
    for needle in ["severity=\"page\"", "severity=\"ticket\"", "receivers:"] {
        assert!(
            text.contains(needle),
            "{} does not mention {needle}",
            rel(&config)
        );
    }
    let Ok(out) = Command::new("amtool")
        .arg("check-config")
        .arg(&config)
        .current_dir(root())
        .output()
    else {
        eprintln!(
            "amtool not found, {} not checked: install Debian's `prometheus-alertmanager` package",
            rel(&config)
        );
        return;
    };
    assert!(
        out.status.success(),
        "amtool check-config {} failed:\n{}",
        rel(&config),
        output_text(&out)
    );
}
