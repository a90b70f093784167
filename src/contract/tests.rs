//! Config validation (every mistake with its exact message) and the contract API end to end.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::aggregator::scrape::ScrapeClient;

const BASE: &str = r#"
[[contracts]]
id = "acme-h100-east"
provider = "acme"
price_per_gpu_hour = 2.10
currency = "USD"
timezone = "America/Los_Angeles"
start = "2026-11-01"
end = "2027-10-31"
selector = '{provider="acme", cluster=~"east-.*"}'
ramp = [
  { from = "2026-11-01", gpus = 50000 },
  { from = "2027-01-15", gpus = 100000 },
]
"#;

const DAY: i64 = 86_400_000;
const HOUR: i64 = 3_600_000;

fn ok(text: &str) -> AggregatorConfig {
    parse(Path::new("aggregator.toml"), text).unwrap_or_else(|e| panic!("{e}"))
}

fn err(text: &str) -> String {
    match parse(Path::new("aggregator.toml"), text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

/// BASE with one exact substring replaced (which must be present).
fn base_with(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "{from}");
    BASE.replacen(from, to, 1)
}

fn contract(text: &str) -> Contract {
    ok(text).contracts.into_iter().next().unwrap()
}

/// Milliseconds of an RFC 3339 timestamp.
fn ms(s: &str) -> i64 {
    match calendar::parse_time_spec(s).unwrap() {
        calendar::TimeSpec::Instant(ms) => ms,
        calendar::TimeSpec::Date(_) => panic!("{s} is a date"),
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const C: &str = "aggregator.toml: contract \"acme-h100-east\"";

// ---------------------------------------------------------------- whole files

#[test]
fn the_example_config_is_valid() {
    let cfg = ok(include_str!("../../examples/aggregator.toml"));
    assert!(!cfg.contracts.is_empty());
    assert!(!cfg.static_targets.is_empty());
    assert!(!cfg.file_sd.is_empty());
    assert_eq!(cfg.teams.len(), 3);
}

#[test]
fn an_empty_file_gives_the_defaults_and_no_contracts() {
    let cfg = ok("");
    assert_eq!(cfg.scrape_interval, Duration::from_secs(15));
    assert_eq!(cfg.scrape_timeout, Duration::from_secs(10));
    assert_eq!(cfg.grace, Duration::from_secs(300));
    assert_eq!(cfg.body_limit_bytes, 16 * 1024 * 1024);
    assert!(cfg.static_targets.is_empty() && cfg.file_sd.is_empty() && cfg.contracts.is_empty());
    // Targets without contracts: allowed, the aggregator just scrapes.
    let cfg = ok("[[targets]]\ntargets = [\"gpu-a-01:9473\"]\n");
    assert_eq!(cfg.static_targets.len(), 1);
    assert!(cfg.contracts.is_empty());
}

#[test]
fn every_key_is_read() {
    let cfg = ok(r#"
[aggregator]
scrape_interval = "30s"
scrape_timeout = "20s"
grace = "50s"
body_limit_bytes = 1024

[[targets]]
targets = ["10.0.0.1:9473", "gpu-a-02:9473", "[fd00::1]:9473"]
labels = { provider = "acme", cluster = "east-1" }

[[targets]]
targets = ["gpu-b-01:9473"]

[[file_sd]]
files = ["/etc/commitmeter/targets/*.json", "/srv/sd/h100-?.json"]

[[contracts]]
id = "acme-h100-east"
provider = "acme"
model = "H100"
price_per_gpu_hour = 2
on_demand_price_per_gpu_hour = 6.5
currency = "EUR"
target_utilization = 1.0
timezone = "europe/berlin"
billing_anchor_day = 15
start = 2026-11-01
end = "2027-11-01T00:00:00+01:00"
usage_signal = "allocated"
selector = 'provider="acme"'
ramp = [{ from = "2026-11-01", gpus = 8 }]
sla = { delivery_target = 0.999, credits = [ { below = 0.999, credit = 0 }, { below = 0.99, credit = 0.10 }, { below = 0.000001, credit = 1 } ], claim_window_days = 45 }
"#);
    assert_eq!(cfg.scrape_interval, Duration::from_secs(30));
    assert_eq!(cfg.scrape_timeout, Duration::from_secs(20));
    assert_eq!(cfg.grace, Duration::from_secs(50));
    assert_eq!(cfg.body_limit_bytes, 1024);
    assert_eq!(
        cfg.static_targets[0],
        TargetGroup {
            targets: vec![
                "10.0.0.1:9473".into(),
                "gpu-a-02:9473".into(),
                "[fd00::1]:9473".into()
            ],
            labels: labels(&[("provider", "acme"), ("cluster", "east-1")]),
        }
    );
    assert!(cfg.static_targets[1].labels.is_empty());
    assert_eq!(cfg.file_sd[0].files.len(), 2);
    let c = &cfg.contracts[0];
    assert_eq!(c.id, "acme-h100-east");
    assert_eq!(c.provider, "acme");
    assert_eq!(c.price_per_gpu_hour, 2.0);
    assert_eq!(c.on_demand_price_per_gpu_hour, Some(6.5));
    let tier = |below_ppm, credit_ppm| CreditTier {
        below_ppm,
        credit_ppm,
    };
    assert_eq!(
        c.sla,
        Some(Sla {
            delivery_target_ppm: 999_000,
            credits: vec![tier(999_000, 0), tier(990_000, 100_000), tier(1, 1_000_000)],
            claim_window_days: 45,
        })
    );
    assert_eq!(c.currency, "EUR");
    assert_eq!(c.target_utilization, 1.0);
    assert_eq!(c.timezone_name, "Europe/Berlin");
    assert_eq!(c.billing_anchor_day(), 15);
    assert_eq!(c.usage_signal, UsageSignal::Allocated);
    assert_eq!(c.start_ms, ms("2026-10-31T23:00:00Z"));
    assert_eq!(c.end_ms, Some(ms("2027-10-31T23:00:00Z")));
    assert_eq!(c.model_pattern(), Some("H100"));
    assert_eq!(c.selector().to_string(), r#"{provider="acme"}"#);
    // The static targets of the first group carry provider="acme": the contract's.
    assert_eq!(
        assign(
            &cfg.contracts,
            "10.0.0.1:9473",
            &target_labels("10.0.0.1:9473", &cfg.static_targets[0].labels)
        ),
        Ok(Some(0))
    );
}

/// A contract with only the keys that have no default.
const MINIMAL: &str = r#"
[[contracts]]
id = "x"
provider = "p"
price_per_gpu_hour = 0
currency = "USD"
start = "2026-11-01"
selector = 'provider="p"'
ramp = [{ from = "2026-11-01", gpus = 1 }]
"#;

#[test]
fn defaults_of_a_contract() {
    let c = contract(MINIMAL);
    assert_eq!(c.target_utilization, 0.95);
    assert_eq!(c.on_demand_price_per_gpu_hour, None);
    assert_eq!(c.sla, None);
    assert_eq!(c.timezone_name, "UTC");
    assert_eq!(c.billing_anchor_day(), 1);
    assert_eq!(c.usage_signal, UsageSignal::Busy);
    assert_eq!(c.start_ms, ms("2026-11-01T00:00:00Z"));
    assert_eq!(c.end_ms, None);
    assert!(c.model_matches("anything at all"));
    assert_eq!(c.ramp_steps(), vec![(ms("2026-11-01T00:00:00Z"), None, 1)]);
    assert_eq!(c.committed_gpus_at(i64::MAX), 1);
}

#[test]
fn every_usage_signal_reads_as_written() {
    for (written, signal) in [
        ("busy", UsageSignal::Busy),
        ("allocated", UsageSignal::Allocated),
        ("sm_active", UsageSignal::SmActive),
    ] {
        let c = contract(&MINIMAL.replace(
            "selector =",
            &format!("usage_signal = \"{written}\"\nselector ="),
        ));
        assert_eq!(c.usage_signal, signal);
        assert_eq!(signal.as_str(), written);
    }
}

#[test]
fn a_short_scrape_interval_caps_the_default_timeout() {
    let cfg = ok("[aggregator]\nscrape_interval = \"5s\"\n");
    assert_eq!(cfg.scrape_timeout, Duration::from_secs(5));
}

// ---------------------------------------------------------------- syntax and unknown keys

#[test]
fn teams_mistakes_name_the_file_the_team_and_the_field() {
    let cfg = ok(&format!(
        "{BASE}\n[[teams]]\nname = \"vision\"\nslurm_account = \"vision|cv-.*\"\n\
         [[teams]]\nname = \"platform\"\nuser = \"svc-.*\"\n"
    ));
    assert_eq!(
        cfg.teams.names().collect::<Vec<_>>(),
        ["vision", "platform"]
    );
    assert!(ok(BASE).teams.is_empty());
    assert_eq!(
        err("[[teams]]\nname = \"vision\"\nslurm_account = \"vision(\"\n"),
        "aggregator.toml: [[teams]] \"vision\": slurm_account: invalid regex \"vision(\": \
         unclosed group"
    );
    assert_eq!(
        err("[[teams]]\nname = \"a\"\nuser = \"x\"\n[[teams]]\nname = \"a\"\nowner = \"y\"\n"),
        "aggregator.toml: [[teams]] \"a\": name: duplicate team: teams[1] repeats teams[0] \
         (list a team once; a rule takes alternatives, e.g. slurm_account = \"a|b\")"
    );
    assert_eq!(
        err("[[teams]]\nname = \"a\"\nnamespaces = \"x\"\n"),
        "aggregator.toml: [[teams]] \"a\": namespaces: unknown key, expected one of `name`, \
         `slurm_account`, `user`, `namespace`, `unit`, `owner`"
    );
    assert_eq!(
        err("[[teams]]\nname = \"\"\nuser = \"x\"\n"),
        "aggregator.toml: teams[0]: name: must not be empty"
    );
    assert!(err("[[teams]]\nname = \"a\"\n").contains("the team has no rule"));
    assert!(err("[[teams]]\nname = \"unassigned\"\nuser = \"x\"\n").contains("is reserved"));
}

#[test]
fn unknown_keys_at_every_level() {
    assert_eq!(
        err("colour = 1\n"),
        "aggregator.toml:1:1: unknown field `colour`, expected one of `aggregator`, `targets`, \
         `file_sd`, `contracts`, `teams`, `storage`"
    );
    assert_eq!(
        err("[aggregator]\nscrape_intervall = \"1s\"\n"),
        "aggregator.toml:2:1: unknown field `scrape_intervall`, expected one of \
         `scrape_interval`, `scrape_timeout`, `grace`, `body_limit_bytes`, `scrape_scheme`, \
         `tls_ca_file`, `tls_cert_file`, `tls_key_file`, `tls_server_name`, \
         `tls_insecure_skip_verify`, `basic_auth_username`, `basic_auth_password_file`"
    );
    assert_eq!(
        err("[[targets]]\ntargets = [\"a:1\"]\nlabel = {}\n"),
        "aggregator.toml:3:1: unknown field `label`, expected `targets` or `labels`"
    );
    assert_eq!(
        err("[[file_sd]]\nfile = []\n"),
        "aggregator.toml:2:1: unknown field `file`, expected `files`"
    );
    assert_eq!(
        err(&base_with(
            "currency = \"USD\"",
            "currency = \"USD\"\ncolor = 1"
        )),
        "aggregator.toml:7:1: unknown field `color`, expected one of `id`, `provider`, `model`, \
         `price_per_gpu_hour`, `on_demand_price_per_gpu_hour`, `currency`, \
         `target_utilization`, `timezone`, `billing_anchor_day`, `start`, `end`, \
         `usage_signal`, `selector`, `ramp`, `sla`"
    );
    let sla = |table: &str| {
        let e = err(&base_with(
            "currency = \"USD\"",
            &format!("currency = \"USD\"\nsla = {table}"),
        ));
        e.split_once(": ").map(|(_, m)| m.to_string()).unwrap()
    };
    assert_eq!(
        sla("{ delivery_target = 0.99, credits = [], claim_window_days = 30, window = 1 }"),
        "unknown field `window`, expected one of `delivery_target`, `credits`, `claim_window_days`"
    );
    assert_eq!(
        sla("{ delivery_target = 0.99, credits = [ { below = 0.9, credit = 0.1, above = 1 } ], claim_window_days = 30 }"),
        "unknown field `above`, expected `below` or `credit`"
    );
    assert_eq!(
        sla("{ delivery_target = 0.99, claim_window_days = 30 }"),
        "missing field `credits`"
    );
    assert_eq!(
        err(&base_with(
            "gpus = 50000 }",
            "gpus = 50000, to = \"2027-01-01\" }"
        )),
        "aggregator.toml:12:40: unknown field `to`, expected one of `from`, `until`, `gpus`"
    );
}

#[test]
fn syntax_and_type_errors_have_line_and_column() {
    assert_eq!(
        err(&base_with("start = \"2026-11-01\"", "start = 5")),
        "aggregator.toml:8:9: invalid type: integer `5`, expected a date (\"YYYY-MM-DD\") or an \
         RFC 3339 timestamp"
    );
    assert_eq!(
        err(&base_with(
            "price_per_gpu_hour = 2.10",
            "price_per_gpu_hour = \"2.10\""
        )),
        "aggregator.toml:5:22: invalid type: string \"2.10\", expected f64"
    );
    assert_eq!(
        err(&base_with("currency = \"USD\"\n", "")),
        "aggregator.toml:2:1: missing field `currency`"
    );
    assert_eq!(
        err(&base_with("gpus = 50000", "gpus = 5.5")),
        "aggregator.toml:12:33: invalid type: floating point `5.5`, expected i64"
    );
    assert_eq!(
        err(&base_with(
            "selector = ",
            "usage_signal = \"idle\"\nselector = "
        )),
        "aggregator.toml:10:16: unknown variant `idle`, expected one of `busy`, `allocated`, `sm_active`"
    );
    // DCGM's spelling is not the key's: the message lists the ones there are.
    assert_eq!(
        err(&base_with(
            "selector = ",
            "usage_signal = \"sm-active\"\nselector = "
        )),
        "aggregator.toml:10:16: unknown variant `sm-active`, expected one of `busy`, `allocated`, `sm_active`"
    );
    assert_eq!(
        err("[[targets]]\ntargets = [\"a:1\"]\nlabels = { rack = 7 }\n"),
        "aggregator.toml:3:19: invalid type: integer `7`, expected a string"
    );
    assert_eq!(
        err("[[contracts]\n"),
        "aggregator.toml:1:12: invalid table header expected `.`, `]]`"
    );
}

#[test]
fn bare_toml_dates_work_like_strings() {
    let quoted = contract(BASE);
    let bare = contract(
        &BASE
            .replace("\"2026-11-01\"", "2026-11-01")
            .replace("\"2027-10-31\"", "2027-10-31"),
    );
    assert_eq!(quoted.start_ms, bare.start_ms);
    assert_eq!(quoted.end_ms, bare.end_ms);
    assert_eq!(quoted.ramp_steps(), bare.ramp_steps());
    let offset = contract(&base_with(
        "start = \"2026-11-01\"",
        "start = 2026-11-01T07:00:00Z",
    ));
    assert_eq!(offset.start_ms, quoted.start_ms);
    assert_eq!(
        err(&base_with(
            "start = \"2026-11-01\"",
            "start = 2026-11-01T07:00:00"
        )),
        format!(
            "{C}: start: \"2026-11-01T07:00:00\": expected a date (YYYY-MM-DD) or an RFC 3339 \
             timestamp with an offset (e.g. 2026-11-01T08:00:00Z)"
        )
    );
}

#[test]
fn a_missing_file_is_a_read_error() {
    let e = load(Path::new("/nonexistent/commitmeter/aggregator.toml")).unwrap_err();
    assert!(matches!(
        e,
        ConfigError::File(crate::configfile::ConfigError::Read { .. })
    ));
    assert!(e
        .to_string()
        .starts_with("/nonexistent/commitmeter/aggregator.toml: cannot read config file: "));
}

// ---------------------------------------------------------------- [aggregator]

#[test]
fn aggregator_mistakes() {
    assert_eq!(
        err("[aggregator]\nscrape_interval = \"15\"\n"),
        "aggregator.toml: aggregator.scrape_interval: invalid duration \"15\": expected e.g. \
         15s, 500ms, 1m30s"
    );
    assert_eq!(
        err("[aggregator]\ngrace = \"-5m\"\n"),
        "aggregator.toml: aggregator.grace: invalid duration \"-5m\": expected e.g. 15s, 500ms, \
         1m30s"
    );
    assert_eq!(
        err("[aggregator]\nscrape_interval = \"0s\"\n"),
        "aggregator.toml: aggregator.scrape_interval: must be > 0"
    );
    assert_eq!(
        err("[aggregator]\nscrape_timeout = \"0ms\"\n"),
        "aggregator.toml: aggregator.scrape_timeout: must be > 0"
    );
    assert_eq!(
        err("[aggregator]\nscrape_timeout = \"20s\"\n"),
        "aggregator.toml: aggregator.scrape_timeout: 20s must be <= scrape_interval \
         (15000ms (the default))"
    );
    assert_eq!(
        err("[aggregator]\nscrape_interval = \"15s\"\nscrape_timeout = \"1m\"\n"),
        "aggregator.toml: aggregator.scrape_timeout: 1m must be <= scrape_interval (15s)"
    );
    assert_eq!(
        err("[aggregator]\nbody_limit_bytes = 0\n"),
        "aggregator.toml: aggregator.body_limit_bytes: must be > 0, got 0"
    );
    // A minute must not seal before the scrape covering it can have arrived.
    assert_eq!(
        err("[aggregator]\nscrape_interval = \"10s\"\nscrape_timeout = \"5s\"\ngrace = \"14s\"\n"),
        "aggregator.toml: aggregator.grace: 14s must be >= scrape_interval + scrape_timeout \
         (15000ms): a minute would seal before the scrape that covers it arrives, and be booked \
         unreported"
    );
    // Equal is fine, for the timeout and for grace.
    let cfg =
        ok("[aggregator]\nscrape_interval = \"10s\"\nscrape_timeout = \"10s\"\ngrace = \"20s\"\n");
    assert_eq!(cfg.scrape_timeout, cfg.scrape_interval);
}

/// A temporary directory with a CA, a client certificate and key, a key of another
/// certificate, and a password file, for the scrape TLS and auth keys. Its `parse` reads
/// them as the aggregator does when it is prepared (`ScrapeClient::load`).
struct ScrapeFiles(tempfile::TempDir);

impl ScrapeFiles {
    fn new(tag: &str) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("commitmeter-scrape-{tag}-"))
            .tempdir()
            .unwrap();
        let dir = tmp.path();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["aggregator".to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
        write("ca.crt", &ca.pem());
        write("client.crt", &cert.pem());
        write("client.key", &key.serialize_pem());
        write(
            "other.key",
            &rcgen::KeyPair::generate().unwrap().serialize_pem(),
        );
        write("password", "s3cret\n");
        write("empty", "\n");
        Self(tmp)
    }

    fn parse(&self, aggregator: &str) -> Result<ScrapeClient, String> {
        let path = self.0.path().join("aggregator.toml");
        let c = parse(&path, &format!("[aggregator]\n{aggregator}")).map_err(|e| e.to_string())?;
        ScrapeClient::load(&path, &c.scrape).map_err(|e| e.to_string())
    }
}

#[test]
fn scrape_scheme_tls_and_basic_auth() {
    let f = ScrapeFiles::new("ok");
    let c = ok("");
    assert_eq!(c.scrape.scheme, Scheme::Http);
    assert!(c.scrape.tls_ca_file.is_none() && c.scrape.basic_auth.is_none());
    // Relative paths are taken from the config file's directory.
    let c = f
        .parse(
            "scrape_scheme = \"https\"\ntls_ca_file = \"ca.crt\"\ntls_cert_file = \"client.crt\"\n\
             tls_key_file = \"client.key\"\ntls_server_name = \"gpu-01.example\"\n\
             basic_auth_username = \"scraper\"\nbasic_auth_password_file = \"password\"\n",
        )
        .unwrap();
    assert_eq!(c.scheme, Scheme::Https);
    assert_eq!(c.tls.ca.as_ref().map(|r| r.len()), Some(1));
    assert!(c.tls.identity.is_some());
    assert!(!c.tls.insecure_skip_verify);
    let auth = c.basic_auth.as_ref().unwrap();
    assert_eq!(
        (auth.username.as_str(), auth.password.as_str()),
        ("scraper", "s3cret")
    );
    assert!(!format!("{c:?}").contains("s3cret"));
    let c = f
        .parse(&format!(
            "tls_insecure_skip_verify = true\ntls_ca_file = {:?}\n",
            f.0.path().join("ca.crt").display().to_string()
        ))
        .unwrap();
    assert!(c.tls.insecure_skip_verify);
}

#[test]
fn parsing_reads_no_file_it_names() {
    // Paths are resolved against the config file's directory and kept as written; files
    // that do not exist are only noticed when the aggregator is prepared.
    let c = parse(
        Path::new("/nonexistent/etc/aggregator.toml"),
        "[aggregator]\ntls_ca_file = \"ca.crt\"\ntls_cert_file = \"/pki/client.crt\"\n\
         tls_key_file = \"client.key\"\nbasic_auth_username = \"scraper\"\n\
         basic_auth_password_file = \"secret/password\"\n",
    )
    .unwrap();
    assert_eq!(
        c.scrape.tls_ca_file.as_deref(),
        Some(Path::new("/nonexistent/etc/ca.crt"))
    );
    assert_eq!(
        c.scrape.tls_identity,
        Some(IdentityFiles {
            cert: "/pki/client.crt".into(),
            key: "/nonexistent/etc/client.key".into(),
        })
    );
    assert_eq!(
        c.scrape.basic_auth,
        Some(BasicAuthFile {
            username: "scraper".into(),
            password_file: "/nonexistent/etc/secret/password".into(),
        })
    );
    let e = ScrapeClient::load(Path::new("/nonexistent/etc/aggregator.toml"), &c.scrape)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(
            "/nonexistent/etc/aggregator.toml: aggregator.tls_ca_file: cannot read /nonexistent/etc/ca.crt"
        ),
        "{e}"
    );
}

#[test]
fn scrape_security_mistakes_name_the_file_and_the_key() {
    let f = ScrapeFiles::new("mistakes");
    let file = f.0.path().join("aggregator.toml").display().to_string();
    let cases = [
        (
            "scrape_scheme = \"HTTPS\"",
            "aggregator.scrape_scheme: \"HTTPS\" must be \"http\" or \"https\"",
        ),
        (
            "tls_ca_file = \"missing.crt\"",
            "aggregator.tls_ca_file: cannot read ",
        ),
        ("tls_ca_file = \"client.key\"", "aggregator.tls_ca_file: "),
        (
            "tls_ca_file = \"\"",
            "aggregator.tls_ca_file: must not be empty",
        ),
        (
            "tls_cert_file = \"client.crt\"",
            "aggregator.tls_key_file: required with tls_cert_file",
        ),
        (
            "tls_key_file = \"client.key\"",
            "aggregator.tls_cert_file: required with tls_key_file",
        ),
        (
            "tls_cert_file = \"client.crt\"\ntls_key_file = \"other.key\"",
            "aggregator.tls_key_file: the private key does not belong to the certificate",
        ),
        (
            "tls_cert_file = \"client.crt\"\ntls_key_file = \"ca.crt\"",
            "aggregator.tls_key_file: ",
        ),
        (
            "tls_server_name = \"not a name\"",
            "aggregator.tls_server_name: \"not a name\" is not",
        ),
        (
            "basic_auth_username = \"u\"",
            "aggregator.basic_auth_password_file: required with basic_auth_username",
        ),
        (
            "basic_auth_password_file = \"password\"",
            "aggregator.basic_auth_username: required with basic_auth_password_file",
        ),
        (
            "basic_auth_username = \"u\"\nbasic_auth_password_file = \"nope\"",
            "aggregator.basic_auth_password_file: cannot read ",
        ),
        (
            "basic_auth_username = \"u\"\nbasic_auth_password_file = \"empty\"",
            "aggregator.basic_auth_password_file: ",
        ),
        (
            "basic_auth_username = \"a:b\"\nbasic_auth_password_file = \"password\"",
            "aggregator.basic_auth_username: \"a:b\" must be",
        ),
    ];
    for (toml, want) in cases {
        let e = f.parse(toml).unwrap_err();
        assert!(e.starts_with(&format!("{file}: {want}")), "{toml}\n{e}");
    }
    assert!(f
        .parse("tls_insecure_skip_verify = \"yes\"")
        .unwrap_err()
        .contains("invalid type"));
}

// ---------------------------------------------------------------- [[targets]] and [[file_sd]]

#[test]
fn target_mistakes() {
    assert_eq!(
        err("[[targets]]\ntargets = []\n"),
        "aggregator.toml: targets[0].targets: must not be empty"
    );
    for bad in [
        "gpu-a-02",
        "gpu-a-02:",
        "gpu-a-02:http",
        ":9473",
        "gpu a:9473",
        "http://gpu-a:9473",
        "gpu-a:0",
        "gpu-a:65536",
        "::1:9473",
        "[nothex]:9473",
    ] {
        assert_eq!(
            err(&format!("[[targets]]\ntargets = [\"ok:1\", {bad:?}]\n")),
            format!(
                "aggregator.toml: targets[0].targets[1]: {bad:?} is not host:port with a \
                 numeric port"
            )
        );
    }
    assert_eq!(
        err("[[targets]]\ntargets = [\"10.0.0.1:9473\"]\n[[targets]]\ntargets = [\"a:1\", \"10.0.0.1:9473\"]\n"),
        "aggregator.toml: targets[1].targets[1]: duplicate target \"10.0.0.1:9473\" (also \
         targets[0].targets[0])"
    );
    assert_eq!(
        err("[[targets]]\ntargets = [\"GPU-A:1\", \"gpu-a:1\"]\n"),
        "aggregator.toml: targets[0].targets[1]: duplicate target \"gpu-a:1\" (also \
         targets[0].targets[0])"
    );
    assert_eq!(
        err("[[targets]]\ntargets = [\"a:1\"]\nlabels = { \"1rack\" = \"x\" }\n"),
        "aggregator.toml: targets[0].labels: \"1rack\" is not a valid label name \
         ([a-zA-Z_][a-zA-Z0-9_]*)"
    );
    assert_eq!(
        err("[[targets]]\ntargets = [\"a:1\"]\nlabels = { \"cluster-name\" = \"x\" }\n"),
        "aggregator.toml: targets[0].labels: \"cluster-name\" is not a valid label name \
         ([a-zA-Z_][a-zA-Z0-9_]*)"
    );
    assert_eq!(
        err("[[targets]]\ntargets = [\"a:1\"]\nlabels = { __address__ = \"x\" }\n"),
        "aggregator.toml: targets[0].labels: \"__address__\": label names starting with \"__\" \
         are reserved"
    );
    assert_eq!(
        err("[[targets]]\ntargets = [\"a:1\"]\nlabels = { instance = \"x\" }\n"),
        "aggregator.toml: targets[0].labels: \"instance\" is reserved: the aggregator sets it \
         to the target address"
    );
}

#[test]
fn file_sd_mistakes() {
    assert_eq!(
        err("[[file_sd]]\nfiles = []\n"),
        "aggregator.toml: file_sd[0].files: must not be empty"
    );
    assert_eq!(
        err("[[file_sd]]\nfiles = [\"/a/*.json\", \"/b/[.json\"]\n"),
        "aggregator.toml: file_sd[0].files[1]: invalid glob pattern \"/b/[.json\": invalid \
         range pattern"
    );
    assert_eq!(
        err("[[file_sd]]\nfiles = [\"\"]\n"),
        "aggregator.toml: file_sd[0].files[0]: must not be empty"
    );
}

// ---------------------------------------------------------------- [[contracts]]

#[test]
fn contract_id_mistakes_name_the_index() {
    assert_eq!(
        err(&base_with("id = \"acme-h100-east\"", "id = \"acme h100\"")),
        "aggregator.toml: contracts[0]: id: \"acme h100\" is not a valid contract id (letters, \
         digits, \"_\", \".\" and \"-\" only)"
    );
    assert_eq!(
        err(&base_with("id = \"acme-h100-east\"", "id = \"\"")),
        "aggregator.toml: contracts[0]: id: must not be empty"
    );
    let second = BASE.replace(
        "selector = '{provider=\"acme\", cluster=~\"east-.*\"}'",
        "selector = 'provider=\"other\"'",
    );
    assert_eq!(
        err(&format!("{BASE}{second}")),
        "aggregator.toml: contracts[1]: id: duplicate contract id \"acme-h100-east\" (also \
         contracts[0])"
    );
}

#[test]
fn contract_field_mistakes() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "provider = \"acme\"",
            "provider = \" \"",
            "provider: must not be empty",
        ),
        (
            "price_per_gpu_hour = 2.10",
            "price_per_gpu_hour = -0.5",
            "price_per_gpu_hour: must be a finite number >= 0, got -0.5",
        ),
        (
            "price_per_gpu_hour = 2.10",
            "price_per_gpu_hour = nan",
            "price_per_gpu_hour: must be a finite number >= 0, got NaN",
        ),
        (
            "price_per_gpu_hour = 2.10",
            "price_per_gpu_hour = inf",
            "price_per_gpu_hour: must be a finite number >= 0, got inf",
        ),
        (
            "currency = \"USD\"",
            "currency = \"usd\"",
            "currency: \"usd\" must be 3 uppercase letters (ISO 4217, e.g. \"USD\")",
        ),
        (
            "currency = \"USD\"",
            "currency = \"DOLLAR\"",
            "currency: \"DOLLAR\" must be 3 uppercase letters (ISO 4217, e.g. \"USD\")",
        ),
        (
            "currency = \"USD\"",
            "currency = \"USD\"\ntarget_utilization = 0",
            "target_utilization: must be in (0, 1], got 0",
        ),
        (
            "currency = \"USD\"",
            "currency = \"USD\"\ntarget_utilization = 1.5",
            "target_utilization: must be in (0, 1], got 1.5",
        ),
        (
            "currency = \"USD\"",
            "currency = \"USD\"\ntarget_utilization = -0.1",
            "target_utilization: must be in (0, 1], got -0.1",
        ),
        (
            "America/Los_Angeles",
            "America/Los_Angles",
            "timezone: unknown time zone \"America/Los_Angles\" (expected an IANA name such as \
             \"America/Los_Angeles\" or \"UTC\")",
        ),
        (
            "America/Los_Angeles",
            "PST",
            "timezone: unknown time zone \"PST\" (expected an IANA name such as \
             \"America/Los_Angeles\" or \"UTC\")",
        ),
        (
            "currency = \"USD\"",
            "currency = \"USD\"\nbilling_anchor_day = 0",
            "billing_anchor_day: must be between 1 and 31, got 0",
        ),
        (
            "currency = \"USD\"",
            "currency = \"USD\"\nbilling_anchor_day = 32",
            "billing_anchor_day: must be between 1 and 31, got 32",
        ),
        (
            "start = \"2026-11-01\"",
            "start = \"2026-11-31\"",
            "start: \"2026-11-31\": day 31 is out of range (2026-11 has 30 days)",
        ),
        (
            "start = \"2026-11-01\"",
            "start = \"11/01/2026\"",
            "start: \"11/01/2026\": expected a date (YYYY-MM-DD) or an RFC 3339 timestamp with \
             an offset (e.g. 2026-11-01T08:00:00Z)",
        ),
        (
            "end = \"2027-10-31\"",
            "end = \"2027-10-32\"",
            "end: \"2027-10-32\": day 32 is out of range (2027-10 has 31 days)",
        ),
        (
            "end = \"2027-10-31\"",
            "end = \"2026-10-31\"",
            "end: \"2026-10-31\" must be after start \"2026-11-01\" (an end date is inclusive)",
        ),
        (
            "end = \"2027-10-31\"",
            "end = \"2026-11-01T07:00:00Z\"",
            "end: \"2026-11-01T07:00:00Z\" must be after start \"2026-11-01\"",
        ),
        (
            "currency = \"USD\"",
            "currency = \"USD\"\nmodel = \"H100(\"",
            "model: invalid regex \"H100(\": unclosed group",
        ),
        (
            "currency = \"USD\"",
            "currency = \"USD\"\nmodel = \"\"",
            "model: must not be empty (leave it out to count every GPU model)",
        ),
        (
            "selector = '{provider=\"acme\", cluster=~\"east-.*\"}'",
            "selector = '{provider=\"acme\" cluster=~\"east-.*\"}'",
            "selector: expected \",\" or the end of the selector at column 18, found 'c'",
        ),
        (
            "selector = '{provider=\"acme\", cluster=~\"east-.*\"}'",
            "selector = '{provider=\"acme\", cluster=~\"east-(\"}'",
            "selector: invalid regex \"east-(\" for label \"cluster\" at column 28: unclosed group",
        ),
        (
            "selector = '{provider=\"acme\", cluster=~\"east-.*\"}'",
            "selector = '{provider==\"acme\"}'",
            "selector: unknown operator \"==\" after label \"provider\" at column 10 (expected =, \
             !=, =~ or !~)",
        ),
        (
            "selector = '{provider=\"acme\", cluster=~\"east-.*\"}'",
            "selector = '{}'",
            "selector: empty selector: it would match every host; give at least one matcher, \
             e.g. {provider=\"acme\"}",
        ),
        (
            "selector = '{provider=\"acme\", cluster=~\"east-.*\"}'",
            "selector = ''",
            "selector: empty selector: it would match every host; give at least one matcher, \
             e.g. {provider=\"acme\"}",
        ),
        (
            "selector = '{provider=\"acme\", cluster=~\"east-.*\"}'",
            "selector = '{provider!=\"acme\"}'",
            "selector: every matcher matches the empty string, so the selector would match \
             every host without those labels; give at least one matcher that needs a non-empty \
             value, e.g. {provider=\"acme\"}",
        ),
    ];
    for (from, to, want) in cases {
        assert_eq!(err(&base_with(from, to)), format!("{C}: {want}"), "{to}");
    }
}

/// BASE with `sla = <table>` added.
fn base_with_sla(table: &str) -> String {
    base_with(
        "currency = \"USD\"",
        &format!("currency = \"USD\"\nsla = {table}"),
    )
}

#[test]
fn sla_terms_are_exact_parts_per_million() {
    let c = contract(&base_with_sla(
        "{ delivery_target = 0.99, credits = [ { below = 0.99, credit = 0.10 }, { below = 0.95, credit = 0.30 } ], claim_window_days = 30 }",
    ));
    assert_eq!(
        c.sla,
        Some(Sla {
            delivery_target_ppm: 990_000,
            credits: vec![
                CreditTier {
                    below_ppm: 990_000,
                    credit_ppm: 100_000
                },
                CreditTier {
                    below_ppm: 950_000,
                    credit_ppm: 300_000
                },
            ],
            claim_window_days: 30,
        })
    );
    // The extremes: a target of 1, a tier below it with a credit of 0 and one of all of it.
    let c = contract(&base_with_sla(
        "{ delivery_target = 1, credits = [ { below = 1, credit = 0 }, { below = 0.5, credit = 1 } ], claim_window_days = 3660 }",
    ));
    let sla = c.sla.unwrap();
    assert_eq!(sla.delivery_target_ppm, PPM);
    assert_eq!(sla.credits[1].credit_ppm, PPM);
    assert_eq!(sla.claim_window_days, MAX_CLAIM_WINDOW_DAYS as u32);
}

#[test]
fn the_claim_deadline_is_local_calendar_days_after_the_period_end() {
    let c = contract(&base_with_sla(
        "{ delivery_target = 0.99, credits = [ { below = 0.99, credit = 0.10 } ], claim_window_days = 30 }",
    ));
    let sla = c.sla.clone().unwrap();
    let deadline = |end| crate::statement::sla::claim_deadline(&c, &sla, end).unwrap();
    // November 2026 ends at local midnight on Dec 1 (PST); 30 days later, still PST.
    let (_, end) = c.billing_period(ms("2026-11-15T00:00:00Z"));
    assert_eq!(end, ms("2026-12-01T08:00:00Z"));
    assert_eq!(
        deadline(end),
        (
            ms("2026-12-31T08:00:00Z"),
            "2026-12-31T00:00:00-08:00[America/Los_Angeles]".to_string()
        )
    );
    // February 2027 ends Mar 1 (PST); DST starts Mar 14: the window is 30 days less an hour.
    let (_, end) = c.billing_period(ms("2027-02-15T00:00:00Z"));
    let (at, text) = deadline(end);
    assert_eq!(text, "2027-03-31T00:00:00-07:00[America/Los_Angeles]");
    assert_eq!(at - end, 30 * DAY - HOUR);
}

#[test]
fn sla_mistakes_name_the_key() {
    let tiers = "[ { below = 0.99, credit = 0.10 }, { below = 0.95, credit = 0.30 } ]";
    let with = |target: &str, credits: &str, days: &str| {
        format!("{{ delivery_target = {target}, credits = {credits}, claim_window_days = {days} }}")
    };
    for (table, want) in [
        (with("0", tiers, "30"), "sla.delivery_target: must be in (0, 1], got 0"),
        (with("1.01", tiers, "30"), "sla.delivery_target: must be in (0, 1], got 1.01"),
        (with("-0.5", tiers, "30"), "sla.delivery_target: must be in (0, 1], got -0.5"),
        (with("nan", tiers, "30"), "sla.delivery_target: must be in (0, 1], got NaN"),
        (
            with("0.9999999", tiers, "30"),
            "sla.delivery_target: 0.9999999 has more than 6 decimal places (the SLA is decided in parts per million)",
        ),
        (
            with("0.99", "[]", "30"),
            "sla.credits: must not be empty (e.g. [ { below = 0.99, credit = 0.10 } ]): without a tier there is nothing to claim",
        ),
        (
            with("0.99", "[ { below = 0, credit = 0.1 } ]", "30"),
            "sla.credits[0].below: must be in (0, 1], got 0",
        ),
        (
            with("0.99", "[ { below = 0.99, credit = 1.5 } ]", "30"),
            "sla.credits[0].credit: must be in [0, 1], got 1.5",
        ),
        (
            with("0.99", "[ { below = 0.99, credit = -0.1 } ]", "30"),
            "sla.credits[0].credit: must be in [0, 1], got -0.1",
        ),
        (
            with("0.99", "[ { below = 0.99, credit = 0.1000001 } ]", "30"),
            "sla.credits[0].credit: 0.1000001 has more than 6 decimal places",
        ),
        (
            with("0.95", tiers, "30"),
            "sla.credits[0].below: 0.99 must be <= delivery_target 0.95: a credit would be owed while the target is met",
        ),
        // Listed severest first: the order is mildest to severest.
        (
            with("0.99", "[ { below = 0.95, credit = 0.30 }, { below = 0.99, credit = 0.10 } ]", "30"),
            "sla.credits[1].below: 0.99 must be below sla.credits[0].below 0.95 (list tiers from the mildest breach to the severest)",
        ),
        (
            with("0.99", "[ { below = 0.99, credit = 0.10 }, { below = 0.99, credit = 0.30 } ]", "30"),
            "sla.credits[1].below: 0.99 must be below sla.credits[0].below 0.99",
        ),
        (
            with("0.99", "[ { below = 0.99, credit = 0.30 }, { below = 0.95, credit = 0.10 } ]", "30"),
            "sla.credits[1].credit: 0.1 must be above sla.credits[0].credit 0.3 (a worse breach earns a larger credit)",
        ),
        (
            with("0.99", "[ { below = 0.99, credit = 0.10 }, { below = 0.95, credit = 0.10 } ]", "30"),
            "sla.credits[1].credit: 0.1 must be above sla.credits[0].credit 0.1",
        ),
        (with("0.99", tiers, "0"), "sla.claim_window_days: must be between 1 and 3660, got 0"),
        (with("0.99", tiers, "-30"), "sla.claim_window_days: must be between 1 and 3660, got -30"),
        (with("0.99", tiers, "3661"), "sla.claim_window_days: must be between 1 and 3660, got 3661"),
    ] {
        let e = err(&base_with_sla(&table));
        assert!(e.starts_with(&format!("{C}: {want}")), "{table}: {e}");
    }
    // Types: a string where a number goes, with line and column.
    let e = err(&base_with_sla(&with("\"99%\"", tiers, "30")));
    assert!(e.starts_with("aggregator.toml:7:"), "{e}");
    assert!(
        e.contains("invalid type: string \"99%\", expected f64"),
        "{e}"
    );
}

#[test]
fn on_demand_price_mistakes_and_a_price_below_the_committed_one() {
    for (value, want) in [
        (
            "0",
            "on_demand_price_per_gpu_hour: must be a finite number > 0, got 0",
        ),
        (
            "-1",
            "on_demand_price_per_gpu_hour: must be a finite number > 0, got -1",
        ),
        (
            "nan",
            "on_demand_price_per_gpu_hour: must be a finite number > 0, got NaN",
        ),
        (
            "inf",
            "on_demand_price_per_gpu_hour: must be a finite number > 0, got inf",
        ),
        (
            "1e300",
            "on_demand_price_per_gpu_hour: 1e300 is more than any GPU-hour costs (at most 1000000)",
        ),
    ] {
        let e = err(&base_with(
            "currency = \"USD\"",
            &format!("currency = \"USD\"\non_demand_price_per_gpu_hour = {value}"),
        ));
        assert!(e.starts_with(&format!("{C}: {want}")), "{value}: {e}");
    }
    // Cheaper on demand than committed: possible, but committing never pays.
    let cfg = ok(&base_with(
        "currency = \"USD\"",
        "currency = \"USD\"\non_demand_price_per_gpu_hour = 2.10",
    ));
    assert_eq!(cfg.contracts[0].on_demand_price_per_gpu_hour, Some(2.10));
    assert_eq!(
        cfg.warnings,
        vec![format!(
            "{C}: on_demand_price_per_gpu_hour: 2.1 is not above price_per_gpu_hour (2.1): \
             committing never pays, so the renewal sizing recommends no commitment"
        )]
    );
}

#[test]
fn ramp_mistakes() {
    let ramp = |steps: &str| {
        let start = BASE.find("ramp = [").unwrap();
        format!("{}ramp = [\n{steps}\n]\n", &BASE[..start])
    };
    let cases: &[(&str, &str)] = &[
        ("", "ramp: must not be empty (give at least one step, e.g. { from = \"2026-11-01\", gpus = 8 })"),
        (
            "{ from = \"2026-11-01\", gpus = 50000 },\n{ from = \"2027-01-15\", gpus = -1 },",
            "ramp[1].gpus: must be >= 0, got -1",
        ),
        (
            "{ from = \"2026-11-01\", gpus = 9223372036854775807 },",
            "ramp[0].gpus: 9223372036854775807 is more than any fleet has (at most 10000000)",
        ),
        (
            "{ from = \"2026-11-01\", gpus = 50000 },\n{ from = \"2027-01-32\", gpus = 1 },",
            "ramp[1].from: \"2027-01-32\": day 32 is out of range (2027-01 has 31 days)",
        ),
        (
            "{ from = \"2026-11-01\", until = \"2026-12\", gpus = 50000 },",
            "ramp[0].until: \"2026-12\": expected a date (YYYY-MM-DD) or an RFC 3339 timestamp \
             with an offset (e.g. 2026-11-01T08:00:00Z)",
        ),
        // `from` not strictly after the previous step's `from`.
        (
            "{ from = \"2027-01-15\", gpus = 50000 },\n{ from = \"2026-11-01\", gpus = 100000 },",
            "ramp[1].from: \"2026-11-01\" must be after ramp[0].from \"2027-01-15\" (list steps \
             in time order)",
        ),
        (
            "{ from = \"2026-11-01\", gpus = 50000 },\n{ from = \"2026-11-01T07:00:00Z\", gpus = 1 },",
            "ramp[1].from: \"2026-11-01T07:00:00Z\" must be after ramp[0].from \"2026-11-01\" \
             (list steps in time order)",
        ),
        // A previous `until` after the next `from`.
        (
            "{ from = \"2026-11-01\", until = \"2027-02-01\", gpus = 50000 },\n\
             { from = \"2027-01-15\", gpus = 100000 },",
            "ramp[0].until: \"2027-02-01\" is after ramp[1].from \"2027-01-15\": steps must not \
             overlap",
        ),
        // `until <= from`.
        (
            "{ from = \"2026-11-01\", until = \"2026-11-01\", gpus = 50000 },",
            "ramp[0].until: \"2026-11-01\" must be after ramp[0].from \"2026-11-01\"",
        ),
        (
            "{ from = \"2026-11-01\", until = \"2026-10-01\", gpus = 50000 },",
            "ramp[0].until: \"2026-10-01\" must be after ramp[0].from \"2026-11-01\"",
        ),
    ];
    for (steps, want) in cases {
        assert_eq!(err(&ramp(steps)), format!("{C}: {want}"), "{steps}");
    }
    // Touching steps and a gap between steps are fine.
    let c = contract(&ramp(
        "{ from = \"2026-11-01\", until = \"2027-01-15\", gpus = 5 },\n\
         { from = \"2027-01-15\", until = \"2027-02-01\", gpus = 6 },\n\
         { from = \"2027-03-01\", gpus = 7 },",
    ));
    assert_eq!(c.ramp_steps().len(), 3);
}

#[test]
fn a_static_target_matched_by_two_contracts() {
    let second = BASE.replace("acme-h100-east", "acme-all").replace(
        "selector = '{provider=\"acme\", cluster=~\"east-.*\"}'",
        "selector = 'provider=\"acme\"'",
    );
    let targets = "[[targets]]\ntargets = [\"gpu-w-01:9473\"]\nlabels = { provider = \"acme\", cluster = \"west-1\" }\n\
                   [[targets]]\ntargets = [\"gpu-e-01:9473\", \"gpu-e-02:9473\"]\nlabels = { provider = \"acme\", cluster = \"east-1\" }\n";
    assert_eq!(
        err(&format!("{targets}{BASE}{second}")),
        "aggregator.toml: targets[1].targets[0]: target \"gpu-e-01:9473\" is matched by more \
         than one contract: \"acme-h100-east\", \"acme-all\" (a host may belong to one contract \
         only; narrow the selectors)"
    );
    // Narrowed: fine.
    let narrowed = second.replace(
        "'provider=\"acme\"'",
        "'provider=\"acme\", cluster!~\"east-.*\"'",
    );
    let cfg = ok(&format!("{targets}{BASE}{narrowed}"));
    let owner = |g: usize, t: &str| {
        assign(
            &cfg.contracts,
            t,
            &target_labels(t, &cfg.static_targets[g].labels),
        )
        .unwrap()
        .map(|i| cfg.contracts[i].id.as_str())
    };
    assert_eq!(owner(0, "gpu-w-01:9473"), Some("acme-all"));
    assert_eq!(owner(1, "gpu-e-02:9473"), Some("acme-h100-east"));
}

#[test]
fn assign_at_run_time() {
    let c = contract(BASE);
    let other = contract(
        &base_with(
            "selector = '{provider=\"acme\", cluster=~\"east-.*\"}'",
            "selector = '{instance=~\"gpu-e-0[12]:.*\"}'",
        )
        .replace("acme-h100-east", "acme-reserved"),
    );
    let contracts = vec![c, other];
    let east = labels(&[("provider", "acme"), ("cluster", "east-1")]);
    assert_eq!(assign(&contracts, "gpu-e-09:9473", &east), Ok(Some(0)));
    assert_eq!(assign(&contracts, "gpu-x:1", &labels(&[])), Ok(None));
    assert_eq!(assign(&contracts, "gpu-e-03:1", &labels(&[])), Ok(None));
    // `instance` is the target address when the map lacks it...
    assert_eq!(assign(&contracts, "gpu-e-01:1", &labels(&[])), Ok(Some(1)));
    // ...and it is what the selector sees when present.
    assert_eq!(
        assign(
            &contracts,
            "gpu-e-01:1",
            &target_labels("gpu-e-01:1", &east)
        ),
        Err(
            "target \"gpu-e-01:1\" is matched by more than one contract: \"acme-h100-east\", \
             \"acme-reserved\" (a host may belong to one contract only; narrow the selectors)"
                .to_string()
        )
    );
    assert_eq!(assign(&[], "a:1", &east), Ok(None));
}

// ---------------------------------------------------------------- the contract API

#[test]
fn model_and_selector_matching() {
    let c = contract(&base_with(
        "currency = \"USD\"",
        "currency = \"USD\"\nmodel = \"H100\"",
    ));
    assert!(c.model_matches("NVIDIA H100 80GB HBM3"));
    assert!(!c.model_matches("NVIDIA H200"));
    assert!(c.matches(&labels(&[("provider", "acme"), ("cluster", "east-1")])));
    assert!(!c.matches(&labels(&[("provider", "acme"), ("cluster", "west-1")])));
    assert!(!c.matches(&labels(&[("cluster", "east-1")])));
}

#[test]
fn la_billing_periods_follow_dst() {
    let c = contract(BASE);
    // DST ends Nov 1 2026 at 02:00; local midnight that day is still PDT (UTC-7).
    assert_eq!(
        c.billing_period(ms("2026-11-20T00:00:00Z")),
        (ms("2026-11-01T07:00:00Z"), ms("2026-12-01T08:00:00Z"))
    );
    assert_eq!(
        c.billing_period(ms("2027-03-20T00:00:00Z")),
        (ms("2027-03-01T08:00:00Z"), ms("2027-04-01T07:00:00Z"))
    );
    assert_eq!(c.start_ms, ms("2026-11-01T07:00:00Z"));
}

#[test]
fn berlin_march_2027_and_anchor_31_in_february() {
    let c = contract(&base_with("America/Los_Angeles", "Europe/Berlin").replace(
        "currency = \"USD\"",
        "currency = \"EUR\"\nbilling_anchor_day = 31",
    ));
    // Jan 31 -> Feb 28 (clamped) -> Mar 31; DST starts Mar 28 2027.
    assert_eq!(
        c.billing_period(ms("2027-02-15T00:00:00Z")),
        (ms("2027-01-30T23:00:00Z"), ms("2027-02-27T23:00:00Z"))
    );
    assert_eq!(
        c.billing_period(ms("2027-03-28T12:00:00Z")),
        (ms("2027-02-27T23:00:00Z"), ms("2027-03-30T22:00:00Z"))
    );
    let c = contract(&base_with("America/Los_Angeles", "Europe/Berlin"));
    let (s, e) = c.billing_period(ms("2027-03-28T12:00:00Z"));
    assert_eq!(
        (s, e),
        (ms("2027-02-28T23:00:00Z"), ms("2027-03-31T22:00:00Z"))
    );
    assert_eq!(e - s, 31 * DAY - HOUR);
}

#[test]
fn committed_gpu_ms_with_a_mid_month_ramp_step() {
    let c = contract(BASE);
    // January 2027 in Los Angeles (PST all month): [Jan 1 08:00Z, Feb 1 08:00Z).
    let (s, e) = c.billing_period(ms("2027-01-20T00:00:00Z"));
    assert_eq!(
        (s, e),
        (ms("2027-01-01T08:00:00Z"), ms("2027-02-01T08:00:00Z"))
    );
    // 50,000 GPUs for 14 days (to Jan 15 local midnight), then 100,000 for 17 days:
    // 50_000 × 14 × 86_400_000 + 100_000 × 17 × 86_400_000
    //   = 60_480_000_000_000 + 146_880_000_000_000.
    assert_eq!(c.committed_gpu_ms(s, e), 207_360_000_000_000);
    let step = ms("2027-01-15T08:00:00Z");
    assert_eq!(c.committed_gpus_at(step - 1), 50_000);
    assert_eq!(c.committed_gpus_at(step), 100_000);
    // November 2026 is 30 days and the hour DST gives back: 50,000 × 721 h.
    let (s, e) = c.billing_period(ms("2026-11-15T00:00:00Z"));
    assert_eq!(c.committed_gpu_ms(s, e), 50_000 * 721 * HOUR);
    assert_eq!(c.committed_gpu_ms(e, s), 0);
    assert_eq!(c.committed_gpu_ms(s, s), 0);
    assert_eq!(
        c.ramp_steps(),
        vec![
            (ms("2026-11-01T07:00:00Z"), Some(step), 50_000),
            (step, Some(ms("2027-11-01T07:00:00Z")), 100_000),
        ]
    );
}

#[test]
fn clipping_by_start_and_an_inclusive_end_date() {
    // Starts mid-month by timestamp; the ramp's first step begins before the start.
    let c = contract(&base_with(
        "start = \"2026-11-01\"",
        "start = \"2026-11-10T00:00:00Z\"",
    ));
    assert_eq!(c.committed_gpus_at(ms("2026-11-09T23:59:59.999Z")), 0);
    assert_eq!(c.committed_gpus_at(ms("2026-11-10T00:00:00Z")), 50_000);
    let (s, e) = c.billing_period(ms("2026-11-15T00:00:00Z"));
    assert_eq!(s, ms("2026-11-01T07:00:00Z"));
    assert_eq!(c.committed_gpu_ms(s, e), 50_000 * (21 * DAY + 8 * HOUR));
    assert_eq!(c.ramp_steps()[0].0, ms("2026-11-10T00:00:00Z"));

    // end = "2027-10-31" covers all of Oct 31 local (PDT, UTC-7): ends Nov 1 07:00Z.
    let c = contract(BASE);
    let end = ms("2027-11-01T07:00:00Z");
    assert_eq!(c.end_ms, Some(end));
    assert_eq!(c.committed_gpus_at(end - 1), 100_000);
    assert_eq!(c.committed_gpus_at(end), 0);
    let (s, e) = c.billing_period(ms("2027-10-31T12:00:00Z"));
    assert_eq!((s, e), (ms("2027-10-01T07:00:00Z"), end));
    assert_eq!(c.committed_gpu_ms(s, e), 100_000 * 31 * DAY);
    // The next period has nothing committed.
    assert_eq!(c.committed_gpu_ms(e, e + 30 * DAY), 0);
    assert_eq!(
        c.committed_gpu_ms(i64::MIN, i64::MAX),
        c.committed_gpu_ms(c.start_ms, end)
    );

    // An end timestamp is exclusive, and clips a ramp step that runs past it.
    let c = contract(&base_with(
        "end = \"2027-10-31\"",
        "end = \"2027-01-20T00:00:00-08:00\"",
    ));
    assert_eq!(c.end_ms, Some(ms("2027-01-20T08:00:00Z")));
    assert_eq!(c.committed_gpus_at(ms("2027-01-20T07:59:59.999Z")), 100_000);
    assert_eq!(c.committed_gpus_at(ms("2027-01-20T08:00:00Z")), 0);
    let (s, e) = c.billing_period(ms("2027-01-20T00:00:00Z"));
    assert_eq!(
        c.committed_gpu_ms(s, e),
        50_000 * 14 * DAY + 100_000 * 5 * DAY
    );

    // Steps wholly outside the span are left out of the display.
    let c = contract(&base_with(
        "{ from = \"2026-11-01\", gpus = 50000 },",
        "{ from = \"2026-01-01\", until = \"2026-06-01\", gpus = 1 },\n  { from = \"2026-11-01\", gpus = 50000 },",
    ));
    assert_eq!(c.ramp_steps().len(), 2);
}

#[test]
fn a_pause_between_steps_commits_nothing() {
    let start = BASE.find("ramp = [").unwrap();
    let c = contract(&format!(
        "{}ramp = [\n\
         {{ from = \"2026-11-01\", gpus = 100 }},\n\
         {{ from = \"2027-06-01\", until = \"2027-07-01\", gpus = 0 }},\n\
         {{ from = \"2027-08-01\", gpus = 300 }},\n]\n",
        &BASE[..start]
    ));
    // Jun: 0 by the step; Jul: 0 between steps (nothing covers it); Aug: 300.
    let june = ms("2027-06-15T00:00:00Z");
    let july = ms("2027-07-15T00:00:00Z");
    assert_eq!(c.committed_gpus_at(ms("2027-05-31T06:59:59.999Z")), 100);
    assert_eq!(c.committed_gpus_at(june), 0);
    assert_eq!(c.committed_gpus_at(july), 0);
    let (s, e) = c.billing_period(july);
    assert_eq!(c.committed_gpu_ms(s, e), 0);
    let (s, e) = c.billing_period(ms("2027-08-15T00:00:00Z"));
    assert_eq!(c.committed_gpu_ms(s, e), 300 * 31 * DAY);
}

fn arb_contract() -> impl Strategy<Value = Contract> {
    let zones = prop::sample::select(vec![
        "UTC",
        "America/Los_Angeles",
        "Europe/Berlin",
        "Asia/Kolkata",
        "Australia/Lord_Howe",
    ]);
    (
        zones,
        1i64..=31,
        prop::collection::vec((1u32..90, 0i64..1_000_000, any::<bool>()), 1..5),
        proptest::option::of(100u32..700),
    )
        .prop_map(|(zone, anchor, steps, end_days)| {
            let base = jiff::civil::date(2026, 1, 1);
            let mut day = 0;
            let mut ramp = String::new();
            for (gap, gpus, as_timestamp) in steps {
                day += gap;
                let date = base
                    .checked_add(jiff::Span::new().days(i64::from(day)))
                    .unwrap();
                let from = if as_timestamp {
                    format!("{date}T13:17:19.123+05:30")
                } else {
                    date.to_string()
                };
                ramp.push_str(&format!("{{ from = \"{from}\", gpus = {gpus} }},\n"));
            }
            let end = end_days
                .map(|d| {
                    let date = base
                        .checked_add(jiff::Span::new().days(i64::from(d)))
                        .unwrap();
                    format!("end = \"{date}\"\n")
                })
                .unwrap_or_default();
            let text = format!(
                "[[contracts]]\nid = \"p\"\nprovider = \"p\"\nprice_per_gpu_hour = 1\n\
                 currency = \"USD\"\ntimezone = \"{zone}\"\nbilling_anchor_day = {anchor}\n\
                 start = \"2026-01-15\"\n{end}selector = 'provider=\"p\"'\nramp = [\n{ramp}]\n"
            );
            contract(&text)
        })
}

proptest! {
    #[test]
    fn committed_gpu_ms_is_additive(
        c in arb_contract(),
        mut pts in prop::collection::vec(ms("2025-12-01T00:00:00Z")..ms("2028-06-01T00:00:00Z"), 3),
    ) {
        pts.sort_unstable();
        let (a, b, d) = (pts[0], pts[1], pts[2]);
        prop_assert_eq!(c.committed_gpu_ms(a, b) + c.committed_gpu_ms(b, d), c.committed_gpu_ms(a, d));
    }

    /// Brute force around every boundary (ramp steps, start, end) and billing period start.
    #[test]
    fn committed_gpu_ms_is_the_sum_over_each_millisecond(
        c in arb_contract(),
        pick in any::<prop::sample::Index>(),
        offset in -1500i64..1500,
        len in 0i64..1500,
    ) {
        let mut edges: Vec<i64> = vec![c.start_ms];
        edges.extend(c.end_ms);
        for (from, until, _) in c.ramp_steps() {
            edges.push(from);
            edges.extend(until);
        }
        let edge = *pick.get(&edges);
        let a = edge + offset;
        let brute: i64 = (a..a + len).map(|t| c.committed_gpus_at(t) as i64).sum();
        prop_assert_eq!(c.committed_gpu_ms(a, a + len), brute);
    }

    /// The integral over a billing period never exceeds max GPUs × period length, and the
    /// periods of a span add up to the span.
    #[test]
    fn billing_periods_partition_the_committed_total(c in arb_contract()) {
        let from = ms("2026-01-01T00:00:00Z");
        let (mut t, _) = c.billing_period(from);
        let first = t;
        let mut sum = 0i64;
        for _ in 0..30 {
            let (s, e) = c.billing_period(t);
            prop_assert_eq!(s, t);
            sum += c.committed_gpu_ms(s, e);
            t = e;
        }
        prop_assert_eq!(sum, c.committed_gpu_ms(first, t));
    }
}

// ---------------------------------------------------------------- careless values

#[test]
fn careless_aggregator_values_are_refused_naming_the_key() {
    let cases: &[(&str, &str)] = &[
        (
            "scrape_interval = \"1ms\"",
            "aggregator.scrape_interval: 1ms is outside 1s..=1h",
        ),
        (
            "scrape_interval = \"999ms\"",
            "aggregator.scrape_interval: 999ms is outside 1s..=1h",
        ),
        (
            "scrape_interval = \"99999999h\"",
            "aggregator.scrape_interval: 99999999h is outside 1s..=1h",
        ),
        (
            "scrape_interval = \"1h1s\"\ngrace = \"2h\"",
            "aggregator.scrape_interval: 1h1s is outside 1s..=1h",
        ),
        (
            "scrape_timeout = \"99ms\"",
            "aggregator.scrape_timeout: 99ms must be >= 100ms",
        ),
        (
            "grace = \"100000w\"",
            "aggregator.grace: 100000w must be <= 7d",
        ),
        ("grace = \"7d1s\"", "aggregator.grace: 7d1s must be <= 7d"),
        (
            "body_limit_bytes = 9223372036854775807",
            "aggregator.body_limit_bytes: 9223372036854775807 is outside 1024..=268435456",
        ),
        (
            "body_limit_bytes = 268435457",
            "aggregator.body_limit_bytes: 268435457 is outside 1024..=268435456",
        ),
        (
            "body_limit_bytes = 1023",
            "aggregator.body_limit_bytes: 1023 is outside 1024..=268435456",
        ),
        (
            "body_limit_bytes = -1",
            "aggregator.body_limit_bytes: must be > 0, got -1",
        ),
    ];
    for (keys, want) in cases {
        let e = err(&format!("[aggregator]\n{keys}\n"));
        assert!(
            e.starts_with(&format!("aggregator.toml: {want}")),
            "{keys}: {e}"
        );
    }
    // The bounds themselves are accepted.
    let cfg = ok(
        "[aggregator]\nscrape_interval = \"1h\"\nscrape_timeout = \"100ms\"\n\
                  grace = \"7d\"\nbody_limit_bytes = 268435456\n",
    );
    assert_eq!(cfg.scrape_interval, SCRAPE_INTERVAL_RANGE.1);
    assert_eq!(cfg.scrape_timeout, MIN_SCRAPE_TIMEOUT);
    assert_eq!(cfg.grace, MAX_GRACE);
    assert_eq!(cfg.body_limit_bytes, BODY_LIMIT_RANGE.1);
    let cfg = ok("[aggregator]\nscrape_interval = \"1s\"\nbody_limit_bytes = 1024\n");
    assert_eq!(cfg.body_limit_bytes, BODY_LIMIT_RANGE.0);
}

#[test]
fn careless_contract_values_are_refused_naming_the_key() {
    for (from, to, want) in [
        (
            "price_per_gpu_hour = 2.10",
            "price_per_gpu_hour = 1e308",
            "price_per_gpu_hour: 1e308 is more than any GPU-hour costs (at most 1000000)",
        ),
        (
            "price_per_gpu_hour = 2.10",
            "price_per_gpu_hour = 1000000.01",
            "price_per_gpu_hour: 1000000.01 is more than any GPU-hour costs (at most 1000000)",
        ),
        // Every step before the start: the contract can never commit a GPU.
        (
            "ramp = [\n  { from = \"2026-11-01\", gpus = 50000 },\n  { from = \"2027-01-15\", gpus = 100000 },\n]",
            "ramp = [ { from = \"2025-01-01\", until = \"2025-06-01\", gpus = 8 } ]",
            "ramp: no step overlaps the contract's span (\"2026-11-01\"–\"2027-10-31\"): it can never commit a GPU",
        ),
        // Every step after the end.
        (
            "ramp = [\n  { from = \"2026-11-01\", gpus = 50000 },\n  { from = \"2027-01-15\", gpus = 100000 },\n]",
            "ramp = [ { from = \"2027-11-01\", gpus = 8 } ]",
            "ramp: no step overlaps the contract's span",
        ),
    ] {
        let e = err(&base_with(from, to));
        assert!(e.starts_with(&format!("{C}: {want}")), "{to}: {e}");
    }
    assert_eq!(
        contract(&base_with(
            "price_per_gpu_hour = 2.10",
            "price_per_gpu_hour = 1e6"
        ))
        .price_per_gpu_hour,
        MAX_PRICE_PER_GPU_HOUR
    );
}

#[test]
fn implausible_values_are_warned_not_refused() {
    assert!(ok(BASE).warnings.is_empty(), "{:?}", ok(BASE).warnings);
    assert!(ok("").warnings.is_empty());
    let cfg = ok(
        "[aggregator]\nscrape_interval = \"10m\"\nscrape_timeout = \"10s\"\n\
                  grace = \"2d\"\nbody_limit_bytes = 4096\n",
    );
    let w = cfg.warnings.join("\n");
    assert_eq!(cfg.warnings.len(), 3, "{w}");
    assert!(
        w.contains("aggregator.toml: aggregator.scrape_interval: 10m is long"),
        "{w}"
    );
    assert!(
        w.contains("aggregator.toml: aggregator.grace: 2d is long"),
        "{w}"
    );
    assert!(
        w.contains("aggregator.toml: aggregator.body_limit_bytes: 4096 is small"),
        "{w}"
    );
    // One step outside the span: it never counts, but the others do.
    let cfg = ok(&base_with(
        "{ from = \"2026-11-01\", gpus = 50000 },",
        "{ from = \"2026-01-01\", until = \"2026-06-01\", gpus = 1 },\n  { from = \"2026-11-01\", gpus = 50000 },",
    ));
    assert_eq!(
        cfg.warnings,
        vec![format!(
            "{C}: ramp[0]: lies wholly outside the contract's span (\"2026-11-01\"–\"2027-10-31\"); it never counts"
        )]
    );
}

#[test]
fn storage_names_the_book_and_the_shard_and_refuses_what_cannot_work() {
    let c = ok("");
    assert_eq!(c.storage, StorageSettings::default());
    assert!(c.storage.shard.is_whole());
    let c = ok(
        "[storage]\npostgres = \"postgres://cm@db:5432/book?sslmode=require\"\n\
                password_file = \"pw\"\nshard = \"1/3\"\nshard_grace = \"90s\"\n",
    );
    let pg = c.storage.postgres.expect("a shared book");
    assert_eq!(pg.url, "postgres://cm@db:5432/book?sslmode=require");
    assert_eq!(pg.password_file.as_deref(), Some(Path::new("pw")));
    assert_eq!(pg.shard_grace, Duration::from_secs(90));
    assert_eq!(c.storage.shard, ShardSpec { index: 1, count: 3 });
    assert_eq!(
        ok("[storage]\npostgres = \"postgresql://db/book\"\n")
            .storage
            .postgres
            .unwrap()
            .shard_grace,
        DEFAULT_SHARD_GRACE
    );
    for (text, want) in [
        (
            "[storage]\npostgres = \"postgres://db/b\"\nshard = \"5/4\"\n",
            "aggregator.toml: storage.shard: \"5/4\": the index is the target's hashmod value, 0 to 3 for 4 shards",
        ),
        (
            "[storage]\npostgres = \"postgres://db/b\"\nshard = \"0/0\"\n",
            "aggregator.toml: storage.shard: \"0/0\": the shard count must be at least 1",
        ),
        (
            "[storage]\nshard = \"0/2\"\n",
            "aggregator.toml: storage.shard: needs storage.postgres",
        ),
        (
            "[storage]\npostgres = \"postgres://cm:secret@db/b\"\n",
            "aggregator.toml: storage.postgres: holds a password",
        ),
        (
            "[storage]\npostgres = \"mysql://db/b\"\n",
            "aggregator.toml: storage.postgres: \"mysql://db/b\" must start with postgres://",
        ),
        (
            "[storage]\npostgres = \"postgres:///b\"\n",
            "aggregator.toml: storage.postgres: \"postgres:///b\" names no host",
        ),
        (
            "[storage]\npostgres = \"postgres://db/b\"\nshard_grace = \"7d\"\n",
            "aggregator.toml: storage.shard_grace: 7d plus grace must be <= 7d",
        ),
    ] {
        let e = err(text);
        assert!(e.starts_with(want), "{e}\nwanted: {want}");
    }
}
