//! Static checks of the Grafana dashboards in `dashboards/*.json` (no network, no Grafana).
//!
//! Every dashboard must parse, carry a title and a uid unique across files, and a `datasource`
//! variable that every panel and every query uses. Every query must be non-empty, name only
//! series documented in README.md (or the recording rules the dashboards read), and refer only
//! to defined variables, with `=~"$var"` matchers so multi-value variables keep working.
//! `dashboards/README.md` says which substitutions turn an expr into plain PromQL.
//!
//! Several aggregators sharing a book serve the same contract series, differing only in
//! `instance`: every query over them is evaluated by Prometheus' own engine (`promtool test
//! rules`, Debian's `prometheus` package) on synthetic series served by one aggregator and
//! by two, and must give the same result (no double counting, one line per contract).

// Tests read the clock and open SQLite as they please: clippy.toml keeps that to
// src/clock.rs and src/aggregator/store.rs in the product only.
#![allow(clippy::disallowed_methods)]

mod common;

use common::{expand_series, TempDir};
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

// ---- Several aggregators: every query counts the replicas' series once ----------------

/// Series that every aggregator sharing a book serves alike (read from the book): scraped
/// from two replicas they differ only in `instance`. The aggregator's own health
/// (`commitmeter_target_*`, ledger write errors and pending minutes, rejected readings,
/// config) stays per aggregator and is not checked here.
fn replicated(name: &str) -> bool {
    name.starts_with("commitmeter_contract_")
        || name.starts_with("commitmeter_team_")
        || matches!(
            name,
            "commitmeter_ledger_sealed_through_timestamp_seconds"
                | "commitmeter_ledger_since_timestamp_seconds"
                | "commitmeter_ledger_late_gpu_seconds_total"
        )
}

/// A dashboard expr as plain PromQL: Grafana's variables to fixed ranges, the dashboard's
/// variables to `.+` (see dashboards/README.md).
fn plain_promql(expr: &str) -> String {
    let expr = expr
        .replace("${__rate_interval}", "5m")
        .replace("$__rate_interval", "5m")
        .replace("${__interval}", "1m")
        .replace("$__interval", "1m")
        .replace("${__range}", "1h")
        .replace("$__range", "1h");
    regex::Regex::new(r"\$\{\w+(?::\w+)?\}|\$\w+")
        .unwrap()
        .replace_all(&expr, ".+")
        .into_owned()
}

/// Every panel query of every dashboard: (where, expr).
fn panel_queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (file, dash) in dashboards() {
        for panel in panels(&dash) {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    let ref_id = target["refId"].as_str().unwrap_or("");
                    out.push((
                        format!("{file}: {} target {ref_id:?}", panel_name(panel)),
                        expr.to_string(),
                    ));
                }
            }
        }
    }
    out
}

/// The label sets (beyond `contract`, `job`, `instance`) a synthetic series of `name` gets,
/// as the aggregator exports them (README, "Series").
fn label_sets(name: &str) -> Vec<Vec<(&'static str, &'static str)>> {
    let each = |label: &'static str, values: &[&'static str]| -> Vec<Vec<(&str, &str)>> {
        values.iter().map(|v| vec![(label, *v)]).collect()
    };
    const NINE: &[&str] = &[
        "committed",
        "delivered",
        "used",
        "idle",
        "undelivered",
        "unreported",
        "overage",
        "idle_unallocated",
        "idle_allocated",
    ];
    match name {
        "commitmeter_contract_info" => vec![vec![
            ("provider", "cloud"),
            ("currency", "EUR"),
            ("usage_signal", "busy"),
            ("timezone", "UTC"),
        ]],
        "commitmeter_contract_price_per_gpu_second" => vec![vec![("currency", "EUR")]],
        "commitmeter_contract_period_cost" => NINE
            .iter()
            .filter(|k| !matches!(**k, "delivered" | "unreported" | "overage"))
            .map(|k| vec![("currency", "EUR"), ("kind", *k)])
            .collect(),
        "commitmeter_contract_period_gpu_seconds" => each("kind", NINE),
        "commitmeter_contract_burn_rate_tier_reachable" => {
            each("tier", &["page_1h", "page_6h", "ticket_1d", "ticket_3d"])
        }
        "commitmeter_team_period_gpu_seconds" => ["vision", "speech"]
            .iter()
            .flat_map(|t| {
                ["allocated", "used"]
                    .iter()
                    .map(move |k| vec![("team", *t), ("kind", *k)])
            })
            .collect(),
        n if n.starts_with("commitmeter_team_") => each("team", &["vision", "speech"]),
        "commitmeter_ledger_late_gpu_seconds_total" => each("kind", &["delivered", "used"]),
        _ => vec![vec![]],
    }
}

/// Minutes of synthetic history; the queries are evaluated at [`EVAL_TIMES`].
const HISTORY_MIN: usize = 120;
const EVAL_TIMES: &[&str] = &["30m", "60m", "100m", "120m"];

/// How a second aggregator serves the same series.
#[derive(Clone, Copy, Debug)]
enum Second {
    /// None: one aggregator.
    Absent,
    /// The same values at the same times.
    Twin,
    /// Down from 40m to 80m (its series stale, then back with the book's values).
    DownAWhile,
    /// A sealed minute behind: its values one minute late.
    MinuteBehind,
}

/// A promtool unit test file: the synthetic aggregator series of `names` (two contracts),
/// served by `agg-a` and as `second` says by `agg-b`, the recording rules, and every query
/// at every eval time with no expected samples (promtool prints what it got).
fn replica_test_file(names: &BTreeSet<String>, queries: &[String], second: Second) -> String {
    let mut input = String::new();
    let mut k = 0u32;
    for name in names {
        let contracts: &[&str] = if name.starts_with("commitmeter_ledger_")
            && name != "commitmeter_ledger_late_gpu_seconds_total"
        {
            &[""]
        } else {
            &["north", "south"]
        };
        for contract in contracts {
            for labels in label_sets(name) {
                k += 1;
                let values: Vec<f64> = (0..=HISTORY_MIN)
                    .map(|m| {
                        let m = m as f64;
                        match name.as_str() {
                            "commitmeter_ledger_sealed_through_timestamp_seconds" => 60.0 * m,
                            "commitmeter_ledger_since_timestamp_seconds" => 0.0,
                            "commitmeter_contract_period_start_timestamp_seconds" => 0.0,
                            "commitmeter_contract_period_end_timestamp_seconds" => 2_592_000.0,
                            "commitmeter_contract_target_utilization_ratio" => 0.9,
                            "commitmeter_contract_price_per_gpu_second" => 0.0005,
                            n if n.ends_with("_total") => 60.0 * f64::from(k) * m,
                            _ => 0.125 * f64::from(k),
                        }
                    })
                    .collect();
                for instance in ["agg-a", "agg-b"] {
                    let served: Vec<Option<f64>> = match (instance, second) {
                        ("agg-a", _) | (_, Second::Twin) => {
                            values.iter().copied().map(Some).collect()
                        }
                        (_, Second::Absent) => continue,
                        (_, Second::DownAWhile) => values
                            .iter()
                            .enumerate()
                            .map(|(m, v)| (!(40..80).contains(&m)).then_some(*v))
                            .collect(),
                        (_, Second::MinuteBehind) => std::iter::once(None)
                            .chain(values.iter().copied().map(Some))
                            .take(values.len())
                            .collect(),
                    };
                    let mut selector =
                        format!("{name}{{job=\"commitmeter-aggregator\",instance=\"{instance}\"");
                    if !contract.is_empty() {
                        selector.push_str(&format!(",contract=\"{contract}\""));
                    }
                    for (label, value) in &labels {
                        selector.push_str(&format!(",{label}=\"{value}\""));
                    }
                    selector.push('}');
                    let values: Vec<String> = served
                        .iter()
                        .map(|v| v.map_or("_".to_string(), |v| format!("{v}")))
                        .collect();
                    input.push_str(&format!(
                        "      - series: {}\n        values: \"{}\"\n",
                        serde_json::to_string(&selector).unwrap(),
                        values.join(" ")
                    ));
                }
            }
        }
    }
    let mut exprs = String::new();
    for (i, q) in queries.iter().enumerate() {
        for at in EVAL_TIMES {
            exprs.push_str(&format!(
                "      - expr: {}\n        eval_time: {at}\n        exp_samples: []\n",
                serde_json::to_string(&format!("# q{i}\n{q}")).unwrap()
            ));
        }
    }
    format!(
        "rule_files:\n  - {}\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{input}    promql_expr_test:\n{exprs}",
        serde_json::to_string(&root().join("alerts/commitmeter-recording.yml")).unwrap()
    )
}

/// What promtool got for each (query index, eval time) it printed: `got: ...` (a query
/// that returned nothing is not printed) or `err: ...`.
fn promtool_results(file: &Path) -> BTreeMap<(usize, String), String> {
    let out = std::process::Command::new("promtool")
        .args(["test", "rules"])
        .arg(file)
        .output()
        .expect("promtool not found: install Debian's `prometheus` package");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let head =
        regex::Regex::new(r##"^\s*expr: "# q(\d+)\\n.*", time: (\w+),(?: err: (.*))?$"##).unwrap();
    let mut results = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let Some(c) = head.captures(line) else {
            continue;
        };
        let key = (c[1].parse().unwrap(), c[2].to_string());
        let value = match c.get(3) {
            Some(err) => format!("err: {}", err.as_str()),
            None => lines[i + 1..]
                .iter()
                .take(2)
                .find_map(|l| l.trim().strip_prefix("got:"))
                .unwrap_or("?")
                .trim()
                .to_string(),
        };
        results.insert(key, value);
    }
    results
}

#[test]
fn every_query_over_the_aggregators_series_counts_replicas_once() {
    let recording = read(&root().join("alerts/commitmeter-recording.yml"));
    let mut checked = Vec::new();
    let mut names = BTreeSet::new();
    for (at, expr) in panel_queries() {
        let used = commitmeter_names(&expr);
        if !used
            .iter()
            .any(|n| replicated(n) || n.starts_with("contract:"))
        {
            continue;
        }
        names.extend(used.into_iter().filter(|n| replicated(n)));
        checked.push((at, plain_promql(&expr)));
    }
    // The recording rules the dashboards read need their inputs.
    for line in recording
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
    {
        names.extend(
            commitmeter_names(line)
                .into_iter()
                .filter(|n| replicated(n)),
        );
    }
    assert!(
        checked.len() > 20,
        "too few dashboard queries over the aggregators' series: {}",
        checked.len()
    );
    let queries: Vec<String> = checked.iter().map(|(_, q)| q.clone()).collect();
    let dir = TempDir::keep_on_failure("dashboards-replicas");
    let run = |second: Second| {
        let file = dir.path(&format!("{second:?}.yml"));
        std::fs::write(&file, replica_test_file(&names, &queries, second)).unwrap();
        promtool_results(&file)
    };
    let one = run(Second::Absent);
    let mut problems = Vec::new();
    // Every query evaluates, and returns data with one aggregator: else the comparison
    // below would prove nothing.
    for (i, (at, q)) in checked.iter().enumerate() {
        let got: Vec<&String> = EVAL_TIMES
            .iter()
            .filter_map(|t| one.get(&(i, t.to_string())))
            .collect();
        if let Some(err) = got.iter().find(|g| g.starts_with("err:")) {
            problems.push(format!("{at}: {q}: {err}"));
        } else if got.is_empty() {
            problems.push(format!("{at}: {q}: no data with one aggregator"));
        }
    }
    for second in [Second::Twin, Second::DownAWhile, Second::MinuteBehind] {
        let two = run(second);
        for (i, (at, q)) in checked.iter().enumerate() {
            for t in EVAL_TIMES {
                let key = (i, t.to_string());
                let (a, b) = (one.get(&key), two.get(&key));
                if a != b {
                    problems.push(format!(
                        "{at}: {q}\n  at {t}, one aggregator:  {}\n  at {t}, two ({second:?}): {}",
                        a.map_or("nothing", String::as_str),
                        b.map_or("nothing", String::as_str)
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "dashboard queries that count a second aggregator's series (take the max per \
         contract: README, \"Several aggregators: no double counting\"), {} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}
