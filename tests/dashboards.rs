//! Static checks of the Grafana dashboards in `dashboards/*.json` (no network, no Grafana).
//!
//! Every dashboard must parse, carry a title and a uid unique across files, and a `datasource`
//! variable that every panel and every query uses. Every query must be non-empty, name only
//! series documented in README.md (or the recording rules the dashboards read), and refer only
//! to defined variables, with `=~"$var"` matchers so multi-value variables keep working.
//! `dashboards/README.md` says which substitutions turn an expr into plain PromQL.

// Tests read the clock and open SQLite as they please: clippy.toml keeps that to
// src/clock.rs and src/aggregator/store.rs in the product only.
#![allow(clippy::disallowed_methods)]

mod common;

use common::expand_series;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The data source every panel and query must use: the dashboard's `datasource` variable.
const DATASOURCE_UID: &str = "${datasource}";

/// The dashboards this repository ships; more files are checked too if they appear.
const EXPECTED: &[&str] = &[
    "commitmeter-contract.json",
    "commitmeter-fleet.json",
    "commitmeter-host.json",
];

/// Recording rules from `alerts/` that the contract dashboard reads (not in README's tables).
const RECORDING_RULES: &[&str] = &[
    "contract:commitmeter_idle_ratio:rate5m",
    "contract:commitmeter_idle_ratio:rate30m",
    "contract:commitmeter_idle_ratio:rate1h",
    "contract:commitmeter_idle_ratio:rate2h",
    "contract:commitmeter_idle_ratio:rate6h",
    "contract:commitmeter_idle_ratio:rate1d",
    "contract:commitmeter_idle_ratio:rate3d",
    "contract:commitmeter_idle_budget_ratio",
];

/// Grafana's own variables an expr may use; a query test substitutes these too.
const GRAFANA_VARIABLES: &[&str] = &["__rate_interval", "__interval", "__range"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `dashboards/*.json`, sorted by file name, parsed.
fn dashboards() -> Vec<(String, Value)> {
    let dir = root().join("dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let value: Value = serde_json::from_str(&read(p))
                .unwrap_or_else(|e| panic!("{name}: not valid JSON: {e}"));
            (name, value)
        })
        .collect()
}

/// Series names documented in README.md: every `commitmeter_…` name in a code span, with
/// the tables' shorthands expanded ([`expand_series`]).
fn readme_series(readme: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut fenced = false;
    for line in readme.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        for span in line.split('`').skip(1).step_by(2) {
            for expanded in expand_series(span) {
                let name: String = expanded
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                if name.starts_with("commitmeter_") && !name.ends_with('_') {
                    names.insert(name);
                }
            }
        }
    }
    names
}

fn allowed_series() -> BTreeSet<String> {
    let mut allowed = readme_series(&read(&root().join("README.md")));
    allowed.extend(RECORDING_RULES.iter().map(|s| s.to_string()));
    allowed
}

/// Metric-name tokens of a PromQL expression that mention commitmeter: maximal runs of
/// `[A-Za-z0-9_:]` outside quoted strings (so `contract:commitmeter_x:rate5m` is one token).
fn commitmeter_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut token = String::new();
    let mut chars = expr.chars();
    let flush = |token: &mut String, out: &mut Vec<String>| {
        if token.contains("commitmeter_") {
            out.push(token.clone());
        }
        token.clear();
    };
    while let Some(c) = chars.next() {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            token.push(c);
            continue;
        }
        flush(&mut token, &mut out);
        if c == '"' || c == '\'' || c == '`' {
            let mut escaped = false;
            for d in chars.by_ref() {
                if escaped {
                    escaped = false;
                } else if d == '\\' && c != '`' {
                    escaped = true;
                } else if d == c {
                    break;
                }
            }
        }
    }
    flush(&mut token, &mut out);
    out
}

/// Variable references in an expr: `$name`, `${name}`, `${name:format}`, `[[name]]`, each with
/// the byte offset where it starts.
fn variable_refs(expr: &str) -> Vec<(usize, String)> {
    let bytes = expr.as_bytes();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' {
            let name = if bytes.get(i + 1) == Some(&b'{') {
                ident(&expr[i + 2..])
            } else {
                ident(&expr[i + 1..])
            };
            out.push((i, name));
        } else if expr[i..].starts_with("[[") {
            out.push((i, ident(&expr[i + 2..])));
        }
        i += 1;
    }
    out
}

/// Parentheses, brackets and braces balance and nest, outside strings; strings close.
fn balanced(expr: &str) -> Result<(), String> {
    let mut stack = Vec::new();
    let mut chars = expr.chars();
    while let Some(c) = chars.next() {
        match c {
            '(' | '[' | '{' => stack.push(c),
            ')' | ']' | '}' => {
                let want = match c {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                if stack.pop() != Some(want) {
                    return Err(format!("unbalanced `{c}`"));
                }
            }
            '"' | '\'' | '`' => {
                let mut escaped = false;
                let mut closed = false;
                for d in chars.by_ref() {
                    if escaped {
                        escaped = false;
                    } else if d == '\\' && c != '`' {
                        escaped = true;
                    } else if d == c {
                        closed = true;
                        break;
                    }
                }
                if !closed {
                    return Err(format!("unterminated {c}string"));
                }
            }
            _ => {}
        }
    }
    match stack.pop() {
        Some(c) => Err(format!("unclosed `{c}`")),
        None => Ok(()),
    }
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            if let Some(nested) = panel.get("panels") {
                walk(nested, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

fn variables(dashboard: &Value) -> &[Value] {
    dashboard["templating"]["list"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn variable_query(var: &Value) -> Option<&str> {
    var["query"]
        .as_str()
        .or_else(|| var["query"]["query"].as_str())
}

fn panel_name(panel: &Value) -> String {
    format!(
        "panel {} {:?}",
        panel["id"],
        panel["title"].as_str().unwrap_or("")
    )
}

fn is_our_datasource(ds: &Value) -> bool {
    ds["type"] == "prometheus" && ds["uid"] == DATASOURCE_UID
}

/// Everything wrong with one dashboard, one line each.
fn problems(file: &str, dash: &Value, allowed: &BTreeSet<String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut problem = |s: String| out.push(format!("{file}: {s}"));

    for key in ["title", "uid"] {
        if dash[key].as_str().is_none_or(|s| s.trim().is_empty()) {
            problem(format!("no {key}"));
        }
    }
    if dash["uid"].as_str().is_some_and(|u| u.len() > 40) {
        problem("uid longer than Grafana's 40 characters".into());
    }
    if !dash["schemaVersion"].is_u64() {
        problem("no schemaVersion".into());
    }

    // Variables.
    if !dash["templating"]["list"].is_array() {
        problem("no templating.list".into());
    }
    let vars = variables(dash);
    let mut defined = BTreeMap::new();
    for var in vars {
        let name = var["name"].as_str().unwrap_or("");
        if defined.insert(name.to_string(), var).is_some() {
            problem(format!("variable {name:?} defined twice"));
        }
    }
    match defined.get("datasource") {
        Some(ds) if ds["type"] == "datasource" && ds["query"] == "prometheus" => {}
        Some(_) => problem("variable datasource is not a prometheus datasource variable".into()),
        None => problem("no datasource variable".into()),
    }
    let check_refs = |what: &str, expr: &str, problem: &mut dyn FnMut(String)| {
        for (at, name) in variable_refs(expr) {
            if GRAFANA_VARIABLES.contains(&name.as_str()) {
                continue;
            }
            if !defined.contains_key(&name) {
                problem(format!(
                    "{what}: ${name} is not a variable of the dashboard"
                ));
            } else if !expr[..at].ends_with("=~\"") {
                problem(format!(
                    "{what}: ${name} must be used as a regex matcher: label=~\"${name}\""
                ));
            }
        }
    };
    for var in vars {
        let name = var["name"].as_str().unwrap_or("");
        if var["type"] != "query" {
            continue;
        }
        if !is_our_datasource(&var["datasource"]) {
            problem(format!(
                "variable {name}: datasource is not ${{datasource}}"
            ));
        }
        let Some(query) = variable_query(var).filter(|q| !q.trim().is_empty()) else {
            problem(format!("variable {name}: empty query"));
            continue;
        };
        for metric in commitmeter_names(query) {
            if !allowed.contains(&metric) {
                problem(format!("variable {name}: unknown series {metric}"));
            }
        }
        check_refs(&format!("variable {name}"), query, &mut problem);
    }
    if let Some(contract) = defined.get("contract") {
        if variable_query(contract) != Some("label_values(commitmeter_contract_info, contract)")
            || contract["multi"] != true
            || contract["includeAll"] != true
        {
            problem(
                "variable contract: want label_values(commitmeter_contract_info, contract), \
                 multi, include all"
                    .into(),
            );
        }
    }

    // Panels.
    let all = panels(dash);
    if all.is_empty() {
        problem("no panels".into());
    }
    let mut ids = BTreeSet::new();
    for panel in &all {
        let name = panel_name(panel);
        match panel["id"].as_u64() {
            Some(id) if !ids.insert(id) => problem(format!("{name}: duplicate panel id {id}")),
            Some(_) => {}
            None => problem(format!("{name}: no numeric id")),
        }
        if panel["type"].as_str().is_none() || !panel["gridPos"].is_object() {
            problem(format!("{name}: no type or gridPos"));
        }
        let Some(targets) = panel.get("targets") else {
            continue;
        };
        let targets = targets.as_array().map(Vec::as_slice).unwrap_or(&[]);
        if targets.is_empty() {
            problem(format!("{name}: targets is empty or not a list"));
            continue;
        }
        if !is_our_datasource(&panel["datasource"]) {
            problem(format!("{name}: panel datasource is not ${{datasource}}"));
        }
        if matches!(
            panel["type"].as_str(),
            Some("timeseries" | "stat" | "bargauge" | "gauge")
        ) && panel["fieldConfig"]["defaults"]["unit"]
            .as_str()
            .is_none_or(str::is_empty)
        {
            problem(format!("{name}: no unit"));
        }
        let mut refs = BTreeSet::new();
        for target in targets {
            let ref_id = target["refId"].as_str().unwrap_or("");
            let what = format!("{name} target {ref_id:?}");
            if ref_id.is_empty() || !refs.insert(ref_id) {
                problem(format!("{what}: missing or duplicate refId"));
            }
            if !is_our_datasource(&target["datasource"]) {
                problem(format!("{what}: datasource is not ${{datasource}}"));
            }
            let Some(expr) = target["expr"].as_str().filter(|e| !e.trim().is_empty()) else {
                problem(format!("{what}: empty expr"));
                continue;
            };
            if let Err(e) = balanced(expr) {
                problem(format!("{what}: {e} in {expr}"));
            }
            for metric in commitmeter_names(expr) {
                if !allowed.contains(&metric) {
                    problem(format!("{what}: unknown series {metric}"));
                }
            }
            check_refs(&what, expr, &mut problem);
        }
    }
    out
}

#[test]
fn the_dashboards_are_there() {
    let files: Vec<String> = dashboards().into_iter().map(|(f, _)| f).collect();
    for want in EXPECTED {
        assert!(files.iter().any(|f| f == want), "dashboards/{want} missing");
    }
    let readme = read(&root().join("dashboards/README.md"));
    for file in &files {
        assert!(
            readme.contains(file.as_str()),
            "dashboards/README.md does not mention {file}"
        );
    }
}

#[test]
fn every_dashboard_passes_the_checks() {
    let allowed = allowed_series();
    let mut all = Vec::new();
    let mut uids: BTreeMap<String, String> = BTreeMap::new();
    for (file, dash) in dashboards() {
        all.extend(problems(&file, &dash, &allowed));
        if let Some(uid) = dash["uid"].as_str() {
            if let Some(other) = uids.insert(uid.to_string(), file.clone()) {
                all.push(format!("{file}: uid {uid:?} also used by {other}"));
            }
        }
    }
    assert!(all.is_empty(), "\n{}", all.join("\n"));
}

#[test]
fn readme_series_are_read_with_their_shorthands_expanded() {
    let names = readme_series(&read(&root().join("README.md")));
    for want in [
        "commitmeter_gpu_info",
        "commitmeter_gpu_observed_seconds_total",
        "commitmeter_gpu_xid_errors_total",
        "commitmeter_gpu_utilization_ratio",
        "commitmeter_gpu_memory_used_bytes",
        "commitmeter_gpu_compute_processes",
        "commitmeter_host_info",
        "commitmeter_build_info",
        "commitmeter_contract_info",
        "commitmeter_contract_committed_gpu_seconds_total",
        "commitmeter_contract_overage_gpu_seconds_total",
        "commitmeter_contract_period_start_timestamp_seconds",
        "commitmeter_contract_period_end_timestamp_seconds",
        "commitmeter_contract_period_cost",
        "commitmeter_target_up",
        "commitmeter_target_gpus",
        "commitmeter_ledger_store_errors_total",
    ] {
        assert!(
            names.contains(want),
            "{want} not found in README.md: {names:?}"
        );
    }
    assert!(
        names.iter().all(|n| !n.contains('{') && !n.ends_with('_')),
        "{names:?}"
    );
}

#[test]
fn the_checks_catch_typos_and_bare_variables() {
    let allowed = allowed_series();
    let dash = |expr: &str| {
        serde_json::json!({
            "title": "t", "uid": "u", "schemaVersion": 38,
            "templating": {"list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                {"name": "contract", "type": "query", "multi": true, "includeAll": true,
                 "datasource": {"type": "prometheus", "uid": "${datasource}"},
                 "query": {"query": "label_values(commitmeter_contract_info, contract)"}}
            ]},
            "panels": [{"type": "row", "id": 1, "gridPos": {}, "panels": [
                {"id": 2, "type": "table", "gridPos": {},
                 "datasource": {"type": "prometheus", "uid": "${datasource}"},
                 "targets": [{"refId": "A", "expr": expr,
                              "datasource": {"type": "prometheus", "uid": "${datasource}"}}]}
            ]}]
        })
    };
    let ok = r#"rate(commitmeter_contract_idle_gpu_seconds_total{contract=~"$contract"}[$__rate_interval]) / on (contract) contract:commitmeter_idle_budget_ratio"#;
    assert_eq!(problems("ok", &dash(ok), &allowed), Vec::<String>::new());
    for bad in [
        "commitmeter_gpu_observd_seconds_total",
        "contract:commitmeter_idle_ratio:rate7m",
        r#"commitmeter_contract_info{contract="$contract"}"#,
        r#"commitmeter_contract_info{contract=~"$contracts"}"#,
        "sum(commitmeter_contract_info",
        "",
    ] {
        assert_eq!(
            problems("bad", &dash(bad), &allowed).len(),
            1,
            "not caught: {bad:?}"
        );
    }
    let mut twice = dash(ok);
    twice["panels"][0]["panels"][0]["id"] = 1.into();
    assert_eq!(problems("ids", &twice, &allowed).len(), 1);
    let mut elsewhere = dash(ok);
    elsewhere["panels"][0]["panels"][0]["datasource"]["uid"] = "prom".into();
    assert_eq!(problems("ds", &elsewhere, &allowed).len(), 1);
}
