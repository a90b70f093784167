//! The Prometheus rules in `alerts/`: `promtool check rules` on every rule file, `promtool
//! test rules` on every unit test file in `alerts/tests/`, a firing and a non-firing unit
//! test for every alert, the labels and annotations every alert must carry, runbook links
//! that exist in the repository, and the example Alertmanager configuration (with `amtool`,
//! when installed).
//!
//! It also holds the Rust side of the contract alerts to the rules: the burn-rate tiers of
//! `ledger::burn::TIERS` and the thresholds of `ledger::alerts` (which the status page's
//! "would fire" list uses) must match the alerts' windows, threshold factors, ratios, `for`
//! and severities, read from the YAML with serde_norway.
//!
//! promtool comes from Debian's `prometheus` package, amtool from `prometheus-alertmanager`.
//! The older checks read the YAML with plain line scanning: they rely on block-style YAML as
//! written in `alerts/`.

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

// ---- The Rust thresholds and the rules agree -------------------------------------------

use commitmeter::ledger::alerts::{
    Condition, RatioAlert, IDLE_BUDGET_EXHAUSTED, IDLE_BUDGET_EXHAUSTED_AT, PROJECTED_TARGET_MISS,
    RATIO_ALERTS, TARGET_DOWN,
};
use commitmeter::ledger::burn::{Tier, TIERS};
use serde_norway::Value;

/// A rule of `alerts/*.yml`, parsed as YAML: its alert or record name, labels, `for` and
/// expression.
struct Rule {
    alert: Option<String>,
    record: Option<String>,
    expr: String,
    for_s: f64,
    labels: BTreeMap<String, String>,
}

fn parsed_rules() -> Vec<Rule> {
    let mut out = Vec::new();
    for file in rule_files() {
        let doc: Value = serde_norway::from_str(&read(&file))
            .unwrap_or_else(|e| panic!("{}: not YAML: {e}", rel(&file)));
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
        for group in doc["groups"].as_sequence().into_iter().flatten() {
            for rule in group["rules"].as_sequence().into_iter().flatten() {
                let labels = rule
                    .get("labels")
                    .and_then(Value::as_mapping)
                    .into_iter()
                    .flatten()
                    .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
                    .collect();
                out.push(Rule {
                    alert: text(rule.get("alert")),
                    record: text(rule.get("record")),
                    expr: text(rule.get("expr")).unwrap_or_default(),
                    for_s: text(rule.get("for")).map_or(0.0, |d| seconds(&d)),
                    labels,
                });
            }
        }
    }
    out
}

/// A Prometheus duration of one unit ("5m", "1h", "3d") in seconds.
fn seconds(d: &str) -> f64 {
    let split = d.find(|c: char| !c.is_ascii_digit()).unwrap_or(d.len());
    let n: f64 = d[..split]
        .parse()
        .unwrap_or_else(|_| panic!("duration {d:?}"));
    n * match &d[split..] {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        "w" => 7.0 * 86_400.0,
        unit => panic!("duration {d:?}: unit {unit:?}"),
    }
}

/// Differences between the Rust side and the rules, one line each: "what: field: rules X,
/// Rust Y".
#[derive(Default)]
struct Diffs(Vec<String>);

impl Diffs {
    fn check<T: PartialEq + std::fmt::Debug>(
        &mut self,
        what: &str,
        field: &str,
        rules: T,
        rust: T,
    ) {
        if rules != rust {
            self.0
                .push(format!("{what}: {field}: rules {rules:?}, Rust {rust:?}"));
        }
    }
}

fn alert_rule<'a>(
    rules: &'a [Rule],
    name: &str,
    diffs: &mut Diffs,
    what: &str,
) -> Option<&'a Rule> {
    let found = rules.iter().find(|r| r.alert.as_deref() == Some(name));
    if found.is_none() {
        diffs.0.push(format!("{what}: no alert {name} in alerts/"));
    }
    found
}

/// `series` windows and `> threshold` comparisons in an expression: every
/// `{series}:rate{window}` with the number it is compared to (`None` when not `> n`).
fn windows_of(expr: &str, series: &str) -> Vec<(f64, Option<f64>)> {
    let re = regex::Regex::new(&format!(
        r"{}:rate(\w+)(?:\s*>\s*([0-9.]+)(?:\s|$))?",
        regex::escape(series)
    ))
    .unwrap();
    re.captures_iter(expr)
        .map(|c| {
            (
                seconds(&c[1]),
                c.get(2).map(|n| n.as_str().parse().unwrap()),
            )
        })
        .collect()
}

/// The recorded idle-ratio threshold of a tier, `f * period / w * budget` as the rules
/// write it, evaluated for a period `period_s` and an idle budget `budget`.
fn recorded_threshold(expr: &str, period_s: f64, budget: f64) -> Result<f64, String> {
    let mut tokens = expr.split_whitespace();
    let operand = |t: Option<&str>| -> Result<f64, String> {
        match t {
            Some("contract:commitmeter_period_seconds") => Ok(period_s),
            Some("contract:commitmeter_idle_budget_ratio") => Ok(budget),
            Some(n) => n
                .parse()
                .map_err(|_| format!("cannot read {n:?} in {expr:?}")),
            None => Err(format!("{expr:?} ends with an operator")),
        }
    };
    let mut value = operand(tokens.next())?;
    while let Some(op) = tokens.next() {
        let rhs = operand(tokens.next())?;
        match op {
            "*" => value *= rhs,
            "/" => value /= rhs,
            _ => {
                return Err(format!(
                    "operator {op:?} in {expr:?}: only * and / are read"
                ))
            }
        }
    }
    Ok(value)
}

fn check_tier(rules: &[Rule], t: &Tier, diffs: &mut Diffs) {
    let what = format!("tier {} ({})", t.name, t.alert);
    if let Some(a) = alert_rule(rules, t.alert, diffs, &what) {
        diffs.check(
            &what,
            "tier label",
            a.labels.get("tier").map(String::as_str),
            Some(t.name),
        );
        diffs.check(
            &what,
            "severity",
            a.labels.get("severity").map(String::as_str),
            Some(t.severity.as_str()),
        );
        diffs.check(&what, "for (s)", a.for_s, t.for_s);
        let windows = windows_of(&a.expr, "contract:commitmeter_idle_ratio");
        let long = windows.iter().map(|w| w.0).fold(f64::NAN, f64::max);
        let short = windows.iter().map(|w| w.0).fold(f64::NAN, f64::min);
        diffs.check(&what, "number of windows", windows.len(), 2);
        diffs.check(&what, "long window (s)", long, t.long_s);
        diffs.check(&what, "short window (s)", short, t.short_s);
        let compared: BTreeSet<&str> = a
            .expr
            .match_indices("contract:commitmeter_idle_ratio_threshold{tier=\"")
            .map(|(i, m)| {
                let rest = &a.expr[i + m.len()..];
                &rest[..rest.find('"').unwrap_or(0)]
            })
            .collect();
        diffs.check(
            &what,
            "thresholds compared to",
            compared,
            BTreeSet::from([t.name]),
        );
        // The recording rules behind both windows average over that window.
        for (w, _) in windows {
            let name = format!("contract:commitmeter_idle_ratio:rate{}", prom_duration(w));
            match rules.iter().find(|r| r.record.as_deref() == Some(&name)) {
                None => diffs.0.push(format!("{what}: no recording rule {name}")),
                Some(r) => diffs.check(
                    &what,
                    &format!("{name} range"),
                    r.expr.matches(&format!("[{}]", prom_duration(w))).count(),
                    2,
                ),
            }
        }
    }
    let recorded: Vec<&Rule> = rules
        .iter()
        .filter(|r| {
            r.record.as_deref() == Some("contract:commitmeter_idle_ratio_threshold")
                && r.labels.get("tier").map(String::as_str) == Some(t.name)
        })
        .collect();
    let [r] = recorded[..] else {
        diffs.0.push(format!(
            "{what}: {} recorded contract:commitmeter_idle_ratio_threshold{{tier=\"{}\"}} (want one)",
            recorded.len(),
            t.name
        ));
        return;
    };
    // f · P / w · B for a short and a long month, a tight and a loose budget.
    for (days, target) in [(28.0, 0.95), (31.0, 0.7)] {
        let period_s = days * 86_400.0;
        match recorded_threshold(&r.expr, period_s, 1.0 - target) {
            Err(e) => diffs.0.push(format!("{what}: recorded threshold: {e}")),
            Ok(v) if (v - t.threshold(period_s, target)).abs() > 1e-9 => diffs.0.push(format!(
                "{what}: threshold factor (budget fraction x period / window): rules `{}` gives \
                 factor {:.4} for a {days}-day period, Rust {} x P / {} s gives {:.4}",
                r.expr.trim(),
                v / (1.0 - target),
                t.budget_fraction,
                t.long_s,
                t.factor(period_s)
            )),
            Ok(_) => {}
        }
    }
}

fn prom_duration(s: f64) -> String {
    let s = s as u64;
    match s {
        _ if s % 86_400 == 0 => format!("{}d", s / 86_400),
        _ if s % 3600 == 0 => format!("{}h", s / 3600),
        _ if s % 60 == 0 => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

fn check_ratio_alert(rules: &[Rule], a: &RatioAlert, diffs: &mut Diffs) {
    let what = a.alert;
    let series = format!("contract:commitmeter_{}_ratio", a.kind);
    let Some(rule) = alert_rule(rules, a.alert, diffs, what) else {
        return;
    };
    diffs.check(
        what,
        "severity",
        rule.labels.get("severity").map(String::as_str),
        Some(a.severity.as_str()),
    );
    diffs.check(what, "for (s)", rule.for_s, 0.0);
    let windows = windows_of(&rule.expr, &series);
    let mut seen: Vec<f64> = windows.iter().map(|w| w.0).collect();
    seen.sort_by(f64::total_cmp);
    diffs.check(
        what,
        &format!("{series} windows (s)"),
        seen,
        vec![a.short_s, a.long_s],
    );
    for (w, ratio) in windows {
        diffs.check(
            what,
            &format!("ratio over {}", prom_duration(w)),
            ratio,
            Some(a.ratio),
        );
    }
}

fn check_condition(
    rules: &[Rule],
    c: &Condition,
    expr_has: &[&str],
    diffs: &mut Diffs,
) -> Option<String> {
    let rule = alert_rule(rules, c.alert, diffs, c.alert)?;
    diffs.check(
        c.alert,
        "severity",
        rule.labels.get("severity").map(String::as_str),
        Some(c.severity.as_str()),
    );
    diffs.check(c.alert, "for (s)", rule.for_s, c.for_s);
    for needle in expr_has {
        if !rule.expr.contains(needle) {
            diffs.0.push(format!(
                "{}: expr does not contain {needle:?}: {}",
                c.alert,
                rule.expr.trim()
            ));
        }
    }
    Some(rule.expr.clone())
}

#[test]
fn rust_thresholds_and_the_rules_agree() {
    let rules = parsed_rules();
    let mut diffs = Diffs::default();
    for t in &TIERS {
        check_tier(&rules, t, &mut diffs);
    }
    // Every tier the rules know is a Rust tier.
    let rust: BTreeSet<&str> = TIERS.iter().map(|t| t.name).collect();
    for r in &rules {
        if let Some(tier) = r.labels.get("tier") {
            if !rust.contains(tier.as_str()) {
                let name = r
                    .alert
                    .as_ref()
                    .or(r.record.as_ref())
                    .cloned()
                    .unwrap_or_default();
                diffs.0.push(format!(
                    "rule {name}: tier {tier} is not in ledger::burn::TIERS"
                ));
            }
        }
    }
    for a in &RATIO_ALERTS {
        check_ratio_alert(&rules, a, &mut diffs);
    }
    if let Some(expr) = check_condition(
        &rules,
        &IDLE_BUDGET_EXHAUSTED,
        &["commitmeter_contract_idle_budget_remaining_ratio"],
        &mut diffs,
    ) {
        let at = expr
            .rsplit_once("<=")
            .and_then(|(_, n)| n.trim().parse::<f64>().ok());
        diffs.check(
            IDLE_BUDGET_EXHAUSTED.alert,
            "remaining at or below",
            at,
            Some(IDLE_BUDGET_EXHAUSTED_AT),
        );
    }
    check_condition(
        &rules,
        &PROJECTED_TARGET_MISS,
        &[
            "commitmeter_contract_projected_utilization_ratio",
            "< on (contract)",
            "commitmeter_contract_target_utilization_ratio",
        ],
        &mut diffs,
    );
    check_condition(
        &rules,
        &TARGET_DOWN,
        &["commitmeter_target_up == 0"],
        &mut diffs,
    );
    assert!(
        diffs.0.is_empty(),
        "the Rust alert thresholds (src/ledger/burn.rs, src/ledger/alerts.rs) and alerts/*.yml disagree:\n{}",
        diffs.0.join("\n")
    );
}
