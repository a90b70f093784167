//! The aggregator's TOML config: parsing and validation, all of it at load time.
//!
//! See `examples/aggregator.toml` for a commented example. Every mistake becomes a
//! [`ConfigError`] naming the file, the contract (by id, or by index when the id itself is the
//! problem) and the field; TOML syntax and type errors (including unknown keys, at any level)
//! name the file, line and column instead.
//!
//! Parsing is pure: the files the config names (CA, client certificate and key, password)
//! are resolved against the config file's directory but not read here. The aggregator reads
//! them where it is prepared (`aggregator::scrape::ScrapeClient::load`), as does
//! `check-config`, with errors in the same shape.
//!
//! A config without `[[contracts]]` is valid: the aggregator then scrapes and reports
//! delivery and usage, but nothing is committed.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;

use super::calendar::{self, TimeSpec};
use super::selector::{regex_error, Selector};
use super::shard::{ShardError, ShardSpec};
use super::teams::{TeamRef, Teams};
use super::{assign, target_labels, Contract, CreditTier, Sla, UsageSignal, PPM};

/// Defaults of the `[aggregator]` table.
pub const DEFAULT_SCRAPE_INTERVAL: Duration = Duration::from_secs(15);
/// Default scrape timeout (capped at the scrape interval when that is shorter, like Prometheus).
pub const DEFAULT_SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time after its end at which a ledger minute is sealed.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(300);
/// Default cap on a scraped body: 16 MiB.
pub const DEFAULT_BODY_LIMIT_BYTES: usize = 16 << 20;
/// Bounds on `[aggregator]` values: outside them a value is a typo or cannot work, and the
/// aggregator refuses to start. Within them, [`AggregatorConfig::warnings`] notes the
/// implausible.
///
/// `scrape_interval`: at least 1 s (below that an agent's own 1 s sampling has nothing new),
/// at most 1 h (the ledger books minutes; an hour between readings is not metering).
pub const SCRAPE_INTERVAL_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(3600));
/// `scrape_timeout`: at least 100 ms, enough for a loopback TLS handshake and a body.
pub const MIN_SCRAPE_TIMEOUT: Duration = Duration::from_millis(100);
/// `grace`: minutes stay open in memory this long, and the contract metrics lag by it; a
/// week is already more than any outage worth waiting for.
pub const MAX_GRACE: Duration = Duration::from_secs(7 * 86_400);
/// `body_limit_bytes`: 1 KiB (an agent with one GPU needs a few) to 256 MiB (over a
/// thousand times what a 64-GPU host serves).
pub const BODY_LIMIT_RANGE: (usize, usize) = (1 << 10, 256 << 20);
/// `price_per_gpu_hour`: above this it is a typo (or a price in the wrong unit); the
/// ledger's money series would lose their precision long before.
pub const MAX_PRICE_PER_GPU_HOUR: f64 = 1e6;
/// More GPUs than any fleet has: a ramp step above this is a typo, and would overflow the
/// ledger's integer GPU-milliseconds within decades.
pub const MAX_COMMITTED_GPUS: i64 = 10_000_000;
/// `sla.claim_window_days`: above ten years it is a typo.
pub const MAX_CLAIM_WINDOW_DAYS: i64 = 3660;

/// The validated aggregator config.
#[derive(Debug, Clone)]
pub struct AggregatorConfig {
    pub scrape_interval: Duration,
    /// Never longer than `scrape_interval`.
    pub scrape_timeout: Duration,
    /// A ledger minute seals this long after it ends; at least `scrape_interval +
    /// scrape_timeout`, so the scrape that covers a minute has arrived before it seals.
    pub grace: Duration,
    /// Cap on a scraped body, > 0.
    pub body_limit_bytes: usize,
    /// `[[targets]]`, in file order. Addresses are unique across all groups.
    pub static_targets: Vec<TargetGroup>,
    /// `[[file_sd]]`, in file order.
    pub file_sd: Vec<FileSd>,
    /// `[[contracts]]`, in file order; ids are unique, and no static target is matched by two.
    pub contracts: Vec<Contract>,
    /// How agents are reached: scheme, TLS and basic auth, files not yet read.
    pub scrape: ScrapeSettings,
    /// `[[teams]]`, in file order: which team an owner of a GPU belongs to (showback).
    /// Applies at once on SIGHUP, to the time attributed from then on.
    pub teams: Teams,
    /// `[storage]`: the embedded SQLite ledger alone (the default), or a book shared with
    /// other aggregators in PostgreSQL, and this aggregator's shard of the targets.
    pub storage: StorageSettings,
    /// Implausible but possible values, one line each naming file and key, for the
    /// aggregator to log at start and `check-config` to print.
    pub warnings: Vec<String>,
}

/// `[storage]`. Without `postgres` the ledger is the embedded SQLite database alone, as a
/// single aggregator keeps it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StorageSettings {
    /// The shared book; `None`: SQLite only.
    pub postgres: Option<PostgresSettings>,
    /// This aggregator's slice of the targets (`0/1`: all of them). Only with `postgres`:
    /// a shard alone would serve a part of each contract as if it were the whole.
    pub shard: ShardSpec,
}

/// `[storage] postgres` and its companions: how the shared book is reached.
#[derive(Debug, Clone, PartialEq)]
pub struct PostgresSettings {
    /// `postgres://user@host:port/db` (or `postgresql://`), without a password.
    pub url: String,
    /// `password_file`: the password, read at start (never in the config itself).
    pub password_file: Option<PathBuf>,
    /// `tls_ca_file`: connect over TLS, the server's certificate checked against this CA
    /// bundle. Without it, `sslmode=require` in the URL asks for TLS checked against the
    /// system's CA certificates.
    pub tls_ca_file: Option<PathBuf>,
    /// `shard_grace`: how long after a minute's own `grace` the book waits for every shard's
    /// contribution; then it seals the minute without the shards still missing, their
    /// hosts' capacity unreported.
    pub shard_grace: Duration,
}

/// Default `[storage] shard_grace`.
pub const DEFAULT_SHARD_GRACE: Duration = Duration::from_secs(300);

/// What an empty file gives: defaults, no targets, no contracts.
impl Default for AggregatorConfig {
    fn default() -> Self {
        Self {
            scrape_interval: DEFAULT_SCRAPE_INTERVAL,
            scrape_timeout: DEFAULT_SCRAPE_TIMEOUT,
            grace: DEFAULT_GRACE,
            body_limit_bytes: DEFAULT_BODY_LIMIT_BYTES,
            static_targets: Vec::new(),
            file_sd: Vec::new(),
            contracts: Vec::new(),
            scrape: ScrapeSettings::default(),
            teams: Teams::default(),
            storage: StorageSettings::default(),
            warnings: Vec::new(),
        }
    }
}

/// `http` or `https`: `scrape_scheme`, or a file_sd target's `__scheme__`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scheme {
    #[default]
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "http" => Some(Scheme::Http),
            "https" => Some(Scheme::Https),
            _ => None,
        }
    }
}

/// The `[aggregator]` keys that say how agents are reached, as written: file paths
/// resolved against the config file's directory (as Prometheus does), not read.
#[derive(Debug, Clone, Default)]
pub struct ScrapeSettings {
    /// For static targets and file_sd targets without `__scheme__`.
    pub scheme: Scheme,
    /// `tls_ca_file`; `None`: the system's CA certificates.
    pub tls_ca_file: Option<PathBuf>,
    /// `tls_cert_file` and `tls_key_file`: both or neither.
    pub tls_identity: Option<IdentityFiles>,
    /// `tls_server_name`: the name certificates are checked against instead of the host.
    pub tls_server_name: Option<rustls::pki_types::ServerName<'static>>,
    pub tls_insecure_skip_verify: bool,
    /// `basic_auth_username` (non-empty, without ':') and `basic_auth_password_file`: both
    /// or neither.
    pub basic_auth: Option<BasicAuthFile>,
}

/// `tls_cert_file` and `tls_key_file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `basic_auth_username` and `basic_auth_password_file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasicAuthFile {
    pub username: String,
    pub password_file: PathBuf,
}

/// One `[[targets]]` group: `host:port` addresses and the labels they share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetGroup {
    pub targets: Vec<String>,
    /// Valid Prometheus label names, none starting with `__`, no `instance` (the aggregator
    /// sets `instance` to the target address; see [`target_labels`](super::target_labels)).
    pub labels: BTreeMap<String, String>,
}

/// One `[[file_sd]]` entry: glob patterns of Prometheus file_sd JSON files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSd {
    /// Valid glob patterns (checked with `glob::Pattern`), non-empty list.
    pub files: Vec<String>,
}

/// Which contract a [`ConfigError::Contract`] is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContractRef {
    /// Displayed as `contract "acme-h100-east"`.
    Id(String),
    /// Displayed as `contracts[2]`: used when the id itself is missing, malformed or duplicate.
    Index(usize),
}

impl fmt::Display for ContractRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContractRef::Id(id) => write!(f, "contract {id:?}"),
            ContractRef::Index(i) => write!(f, "contracts[{i}]"),
        }
    }
}

/// Why a config was rejected: the mistakes every config file can have
/// ([`crate::configfile::ConfigError`]: unreadable, syntax, an invalid key), or one in a
/// contract. Display is one line:
///
/// - `aggregator.toml: cannot read config file: No such file or directory (os error 2)`
/// - `aggregator.toml:12:9: invalid type: integer `5`, expected a string` (TOML syntax, types,
///   unknown or missing keys: line and column from the TOML parser)
/// - `aggregator.toml: aggregator.scrape_timeout: 20s must be <= scrape_interval (15s)` (a
///   mistake outside `[[contracts]]`; the key is e.g. `aggregator.scrape_timeout`,
///   `targets[0].targets[1]`, `file_sd[0].files`)
/// - `aggregator.toml: contract "acme-h100-east": ramp[1].gpus: must be >= 0, got -5`
/// - `aggregator.toml: contracts[2]: id: duplicate contract id "acme" (also contracts[0])`
/// - `aggregator.toml: [[teams]] "vision": slurm_account: invalid regex "(vision": unclosed group`
///   (a mistake in one `[[teams]]` entry, unknown keys included; `teams[1]` when the name
///   itself is the problem)
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] crate::configfile::ConfigError),
    /// A mistake in one contract; `field` is e.g. `currency`, `ramp[1].until`.
    #[error("{path}: {contract}: {field}: {message}")]
    Contract {
        path: PathBuf,
        contract: ContractRef,
        field: String,
        message: String,
    },
    /// A mistake in one `[[teams]]` entry; `field` is e.g. `slurm_account`, `name`.
    #[error("{path}: {team}: {field}: {message}")]
    Team {
        path: PathBuf,
        team: TeamRef,
        field: String,
        message: String,
    },
}

/// Reads the file, then [`parse`]s it.
pub fn load(path: &Path) -> Result<AggregatorConfig, ConfigError> {
    parse(path, &crate::configfile::read(path, "config file")?)
}

/// Parses and validates a config; `path` is used in error messages, and relative file
/// paths are resolved against its directory (nothing is read).
pub fn parse(path: &Path, text: &str) -> Result<AggregatorConfig, ConfigError> {
    let raw: RawFile =
        toml::from_str(text).map_err(|e| crate::configfile::toml_error(path, text, &e))?;
    let invalid = |field: String, message: String| {
        ConfigError::from(crate::configfile::ConfigError::invalid(
            path, field, message,
        ))
    };

    // [aggregator]
    let agg = raw.aggregator.unwrap_or_default();
    let duration = |key: &str, value: &Option<String>, default: Duration| match value {
        None => Ok(default),
        Some(s) => crate::configfile::parse_duration(s)
            .map_err(|m| invalid(format!("aggregator.{key}"), m)),
    };
    let scrape_interval = duration(
        "scrape_interval",
        &agg.scrape_interval,
        DEFAULT_SCRAPE_INTERVAL,
    )?;
    let mut warnings = Vec::new();
    let warn = |warnings: &mut Vec<String>, field: &str, message: String| {
        warnings.push(format!("{}: {field}: {message}", path.display()))
    };
    let (lo, hi) = SCRAPE_INTERVAL_RANGE;
    if scrape_interval.is_zero() {
        return Err(invalid(
            "aggregator.scrape_interval".into(),
            "must be > 0".into(),
        ));
    }
    if scrape_interval < lo || scrape_interval > hi {
        return Err(invalid(
            "aggregator.scrape_interval".into(),
            format!(
                "{} is outside 1s..=1h: below a second the agents (sampling every second) \
                 have nothing new, above an hour the ledger's minutes are guesses",
                show(agg.scrape_interval.as_deref(), scrape_interval)
            ),
        ));
    }
    if scrape_interval > Duration::from_secs(300) {
        warn(
            &mut warnings,
            "aggregator.scrape_interval",
            format!(
                "{} is long: a target that goes down is noticed, and its minutes booked, \
                 only this long after",
                show(agg.scrape_interval.as_deref(), scrape_interval)
            ),
        );
    }
    let scrape_timeout = match &agg.scrape_timeout {
        None => DEFAULT_SCRAPE_TIMEOUT.min(scrape_interval),
        Some(_) => duration(
            "scrape_timeout",
            &agg.scrape_timeout,
            DEFAULT_SCRAPE_TIMEOUT,
        )?,
    };
    if scrape_timeout.is_zero() {
        return Err(invalid(
            "aggregator.scrape_timeout".into(),
            "must be > 0".into(),
        ));
    }
    if scrape_timeout < MIN_SCRAPE_TIMEOUT {
        return Err(invalid(
            "aggregator.scrape_timeout".into(),
            format!(
                "{} must be >= 100ms: no scrape completes in less",
                show(agg.scrape_timeout.as_deref(), scrape_timeout)
            ),
        ));
    }
    if scrape_timeout > scrape_interval {
        return Err(invalid(
            "aggregator.scrape_timeout".into(),
            format!(
                "{} must be <= scrape_interval ({})",
                show(agg.scrape_timeout.as_deref(), scrape_timeout),
                show(agg.scrape_interval.as_deref(), scrape_interval)
            ),
        ));
    }
    let grace = duration("grace", &agg.grace, DEFAULT_GRACE)?;
    if grace < scrape_interval + scrape_timeout {
        return Err(invalid(
            "aggregator.grace".into(),
            format!(
                "{} must be >= scrape_interval + scrape_timeout ({}ms): a minute would seal \
                 before the scrape that covers it arrives, and be booked unreported",
                show(agg.grace.as_deref(), grace),
                (scrape_interval + scrape_timeout).as_millis()
            ),
        ));
    }
    if grace > MAX_GRACE {
        return Err(invalid(
            "aggregator.grace".into(),
            format!(
                "{} must be <= 7d: minutes stay open in memory, and the contract metrics lag, \
                 this long",
                show(agg.grace.as_deref(), grace)
            ),
        ));
    }
    if grace > Duration::from_secs(3600) {
        warn(
            &mut warnings,
            "aggregator.grace",
            format!(
                "{} is long: the contract metrics lag by it, and that many minutes are kept \
                 in memory",
                show(agg.grace.as_deref(), grace)
            ),
        );
    }
    let (min_body, max_body) = BODY_LIMIT_RANGE;
    let body_limit_bytes = match agg.body_limit_bytes {
        None => DEFAULT_BODY_LIMIT_BYTES,
        Some(n) => match usize::try_from(n) {
            Ok(n) if n > 0 && (min_body..=max_body).contains(&n) => n,
            _ if n <= 0 => {
                return Err(invalid(
                    "aggregator.body_limit_bytes".into(),
                    format!("must be > 0, got {n}"),
                ))
            }
            _ => {
                return Err(invalid(
                    "aggregator.body_limit_bytes".into(),
                    format!(
                        "{n} is outside {min_body}..={max_body} (1 KiB to 256 MiB; an agent \
                         with 8 GPUs serves about 30 KB)"
                    ),
                ))
            }
        },
    };
    if body_limit_bytes < 64 << 10 {
        warn(
            &mut warnings,
            "aggregator.body_limit_bytes",
            format!(
                "{body_limit_bytes} is small: a host with many GPUs or MIG instances serves more, \
                 and its scrapes would fail as too_large"
            ),
        );
    }

    let scrape = scrape_settings(path, &agg)
        .map_err(|(key, message)| invalid(format!("aggregator.{key}"), message))?;

    // [[targets]]
    let mut seen_targets: HashMap<String, String> = HashMap::new();
    let mut static_targets = Vec::with_capacity(raw.targets.len());
    for (g, group) in raw.targets.into_iter().enumerate() {
        if group.targets.is_empty() {
            return Err(invalid(
                format!("targets[{g}].targets"),
                "must not be empty".into(),
            ));
        }
        for (i, target) in group.targets.iter().enumerate() {
            let field = format!("targets[{g}].targets[{i}]");
            if !crate::configfile::is_host_port(target) {
                return Err(invalid(
                    field,
                    format!("{target:?} is not host:port with a numeric port"),
                ));
            }
            if let Some(first) = seen_targets.get(&target.to_ascii_lowercase()) {
                return Err(invalid(
                    field,
                    format!("duplicate target {target:?} (also {first})"),
                ));
            }
            seen_targets.insert(target.to_ascii_lowercase(), field);
        }
        for name in group.labels.keys() {
            if let Err(m) = check_label_name(name) {
                return Err(invalid(format!("targets[{g}].labels"), m));
            }
        }
        static_targets.push(TargetGroup {
            targets: group.targets,
            labels: group.labels,
        });
    }

    // [[file_sd]]
    let mut file_sd = Vec::with_capacity(raw.file_sd.len());
    for (n, sd) in raw.file_sd.into_iter().enumerate() {
        if sd.files.is_empty() {
            return Err(invalid(
                format!("file_sd[{n}].files"),
                "must not be empty".into(),
            ));
        }
        for (i, pattern) in sd.files.iter().enumerate() {
            let field = format!("file_sd[{n}].files[{i}]");
            if pattern.trim().is_empty() {
                return Err(invalid(field, "must not be empty".into()));
            }
            if let Err(e) = glob::Pattern::new(pattern) {
                return Err(invalid(
                    field,
                    format!("invalid glob pattern {pattern:?}: {}", e.msg),
                ));
            }
        }
        file_sd.push(FileSd { files: sd.files });
    }

    // [[contracts]]
    let mut ids: HashMap<String, usize> = HashMap::new();
    let mut contracts = Vec::with_capacity(raw.contracts.len());
    for (n, rc) in raw.contracts.into_iter().enumerate() {
        let id_error = |message: String| ConfigError::Contract {
            path: path.to_path_buf(),
            contract: ContractRef::Index(n),
            field: "id".into(),
            message,
        };
        if rc.id.is_empty() {
            return Err(id_error("must not be empty".into()));
        }
        if !rc
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        {
            return Err(id_error(format!(
                "{:?} is not a valid contract id (letters, digits, \"_\", \".\" and \"-\" only)",
                rc.id
            )));
        }
        if let Some(first) = ids.get(&rc.id) {
            return Err(id_error(format!(
                "duplicate contract id {:?} (also contracts[{first}])",
                rc.id
            )));
        }
        ids.insert(rc.id.clone(), n);
        let id = rc.id.clone();
        let mut contract_warnings = Vec::new();
        let contract = build_contract(rc, &mut contract_warnings).map_err(|(field, message)| {
            ConfigError::Contract {
                path: path.to_path_buf(),
                contract: ContractRef::Id(id),
                field,
                message,
            }
        })?;
        for (field, message) in contract_warnings {
            warnings.push(format!(
                "{}: {}: {field}: {message}",
                path.display(),
                ContractRef::Id(contract.id.clone())
            ));
        }
        contracts.push(contract);
    }

    // [[teams]]
    let teams = Teams::parse(&raw.teams).map_err(|(team, field, message)| ConfigError::Team {
        path: path.to_path_buf(),
        team,
        field,
        message,
    })?;

    // [storage]
    let storage = storage_settings(path, raw.storage.unwrap_or_default(), grace)
        .map_err(|(key, message)| invalid(format!("storage.{key}"), message))?;

    // A static target may belong to one contract only.
    for (g, group) in static_targets.iter().enumerate() {
        for (i, target) in group.targets.iter().enumerate() {
            let labels = target_labels(target, &group.labels);
            if let Err(m) = assign(&contracts, target, &labels) {
                return Err(invalid(format!("targets[{g}].targets[{i}]"), m));
            }
        }
    }

    Ok(AggregatorConfig {
        scrape_interval,
        scrape_timeout,
        grace,
        body_limit_bytes,
        static_targets,
        file_sd,
        contracts,
        scrape,
        teams,
        storage,
        warnings,
    })
}

/// `[storage]`: checked without reading the password or CA file (paths relative to the
/// config file's directory). Errors are `(key, message)`.
fn storage_settings(
    path: &Path,
    raw: RawStorage,
    grace: Duration,
) -> Result<StorageSettings, (String, String)> {
    let err = |key: &str, message: String| (key.to_string(), message);
    let dir = path.parent().unwrap_or(Path::new(""));
    let file = |key: &str, value: Option<String>| match value.as_deref() {
        None => Ok(None),
        Some("") => Err(err(key, "must not be empty".into())),
        Some(p) => Ok(Some(dir.join(p))),
    };
    let shard = match raw.shard.as_deref() {
        None => ShardSpec::default(),
        Some(s) => s
            .parse()
            .map_err(|e: ShardError| err("shard", e.to_string()))?,
    };
    let Some(url) = raw.postgres else {
        for (key, given) in [
            ("password_file", raw.password_file.is_some()),
            ("tls_ca_file", raw.tls_ca_file.is_some()),
            ("shard_grace", raw.shard_grace.is_some()),
            ("shard", !shard.is_whole()),
        ] {
            if given {
                return Err(err(
                    key,
                    "needs storage.postgres: without a shared book this aggregator keeps its \
                     own ledger of every target it is given"
                        .into(),
                ));
            }
        }
        return Ok(StorageSettings::default());
    };
    check_postgres_url(&url).map_err(|m| err("postgres", m))?;
    let shard_grace = match raw.shard_grace.as_deref() {
        None => DEFAULT_SHARD_GRACE,
        Some(s) => crate::configfile::parse_duration(s).map_err(|m| err("shard_grace", m))?,
    };
    if shard_grace > MAX_GRACE.saturating_sub(grace) {
        return Err(err(
            "shard_grace",
            format!(
                "{} plus grace must be <= 7d: minutes wait this long for a shard",
                show(raw.shard_grace.as_deref(), shard_grace)
            ),
        ));
    }
    Ok(StorageSettings {
        postgres: Some(PostgresSettings {
            url,
            password_file: file("password_file", raw.password_file)?,
            tls_ca_file: file("tls_ca_file", raw.tls_ca_file)?,
            shard_grace,
        }),
        shard,
    })
}

/// A PostgreSQL URL as `[storage] postgres` takes it: `postgres://` or `postgresql://`,
/// a host, and no password (it belongs in `password_file`, not in a config file that is
/// shown and copied).
fn check_postgres_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .ok_or_else(|| format!("{url:?} must start with postgres:// or postgresql://"))?;
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    if let Some((userinfo, _)) = authority.rsplit_once('@') {
        if userinfo.contains(':') {
            return Err(
                "holds a password: put it in storage.password_file (the URL is logged and shown)"
                    .into(),
            );
        }
    }
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.is_empty() {
        return Err(format!("{url:?} names no host"));
    }
    Ok(())
}

/// The scrape scheme, TLS and auth keys of `[aggregator]`: what can be checked without
/// reading the files (paths relative to the config file's directory, as Prometheus does).
/// Errors are `(key, message)`.
fn scrape_settings(path: &Path, agg: &RawAggregator) -> Result<ScrapeSettings, (String, String)> {
    let err = |key: &str, message: String| (key.to_string(), message);
    let dir = path.parent().unwrap_or(Path::new(""));
    let file = |key: &str, value: &Option<String>| -> Result<Option<PathBuf>, (String, String)> {
        match value.as_deref() {
            None => Ok(None),
            Some("") => Err(err(key, "must not be empty".into())),
            Some(p) => Ok(Some(dir.join(p))),
        }
    };
    let scheme = match agg.scrape_scheme.as_deref() {
        None => Scheme::Http,
        Some(s) => Scheme::parse(s).ok_or_else(|| {
            err(
                "scrape_scheme",
                format!("{s:?} must be \"http\" or \"https\""),
            )
        })?,
    };
    let tls_ca_file = file("tls_ca_file", &agg.tls_ca_file)?;
    let tls_identity = match (
        file("tls_cert_file", &agg.tls_cert_file)?,
        file("tls_key_file", &agg.tls_key_file)?,
    ) {
        (None, None) => None,
        (Some(_), None) => return Err(err("tls_key_file", "required with tls_cert_file".into())),
        (None, Some(_)) => return Err(err("tls_cert_file", "required with tls_key_file".into())),
        (Some(cert), Some(key)) => Some(IdentityFiles { cert, key }),
    };
    let tls_server_name = match agg.tls_server_name.as_deref() {
        None => None,
        Some(name) => Some(
            rustls::pki_types::ServerName::try_from(name.to_string()).map_err(|_| {
                err(
                    "tls_server_name",
                    format!("{name:?} is not a DNS name or IP address"),
                )
            })?,
        ),
    };
    let basic_auth = match (
        &agg.basic_auth_username,
        file("basic_auth_password_file", &agg.basic_auth_password_file)?,
    ) {
        (None, None) => None,
        (Some(_), None) => {
            return Err(err(
                "basic_auth_password_file",
                "required with basic_auth_username".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(err(
                "basic_auth_username",
                "required with basic_auth_password_file".into(),
            ))
        }
        (Some(user), Some(password_file)) => {
            if user.is_empty() || user.contains(':') {
                return Err(err(
                    "basic_auth_username",
                    format!("{user:?} must be non-empty and without ':'"),
                ));
            }
            Some(BasicAuthFile {
                username: user.clone(),
                password_file,
            })
        }
    };
    Ok(ScrapeSettings {
        scheme,
        tls_ca_file,
        tls_identity,
        tls_server_name,
        tls_insecure_skip_verify: agg.tls_insecure_skip_verify.unwrap_or(false),
        basic_auth,
    })
}

/// A duration as the user wrote it, or as the default, for messages.
fn show(raw: Option<&str>, value: Duration) -> String {
    match raw {
        Some(s) => s.to_string(),
        None => format!("{}ms (the default)", value.as_millis()),
    }
}

/// Validates one contract whose id is already checked; errors are `(field, message)`, and
/// so are the implausible values pushed to `warnings`.
fn build_contract(
    rc: RawContract,
    warnings: &mut Vec<(String, String)>,
) -> Result<Contract, (String, String)> {
    let err = |field: &str, message: String| (field.to_string(), message);

    if rc.provider.trim().is_empty() {
        return Err(err("provider", "must not be empty".into()));
    }
    let model = match &rc.model {
        None => None,
        Some(m) if m.is_empty() => {
            return Err(err(
                "model",
                "must not be empty (leave it out to count every GPU model)".into(),
            ))
        }
        Some(m) => Some(
            Regex::new(m)
                .map_err(|e| err("model", format!("invalid regex {m:?}: {}", regex_error(&e))))?,
        ),
    };
    if !(rc.price_per_gpu_hour.is_finite() && rc.price_per_gpu_hour >= 0.0) {
        return Err(err(
            "price_per_gpu_hour",
            format!(
                "must be a finite number >= 0, got {}",
                rc.price_per_gpu_hour
            ),
        ));
    }
    if rc.price_per_gpu_hour > MAX_PRICE_PER_GPU_HOUR {
        return Err(err(
            "price_per_gpu_hour",
            format!(
                "{} is more than any GPU-hour costs (at most {MAX_PRICE_PER_GPU_HOUR})",
                if rc.price_per_gpu_hour >= 1e15 {
                    format!("{:e}", rc.price_per_gpu_hour)
                } else {
                    rc.price_per_gpu_hour.to_string()
                }
            ),
        ));
    }
    if !(rc.currency.len() == 3 && rc.currency.bytes().all(|b| b.is_ascii_uppercase())) {
        return Err(err(
            "currency",
            format!(
                "{:?} must be 3 uppercase letters (ISO 4217, e.g. \"USD\")",
                rc.currency
            ),
        ));
    }
    let target_utilization = rc.target_utilization.unwrap_or(0.95);
    if !(target_utilization > 0.0 && target_utilization <= 1.0) {
        return Err(err(
            "target_utilization",
            format!("must be in (0, 1], got {target_utilization}"),
        ));
    }
    let on_demand_price_per_gpu_hour = match rc.on_demand_price_per_gpu_hour {
        None => None,
        Some(p) => {
            let key = "on_demand_price_per_gpu_hour";
            if !(p.is_finite() && p > 0.0) {
                return Err(err(key, format!("must be a finite number > 0, got {p}")));
            }
            if p > MAX_PRICE_PER_GPU_HOUR {
                return Err(err(
                    key,
                    format!(
                        "{} is more than any GPU-hour costs (at most {MAX_PRICE_PER_GPU_HOUR})",
                        if p >= 1e15 {
                            format!("{p:e}")
                        } else {
                            p.to_string()
                        }
                    ),
                ));
            }
            if p <= rc.price_per_gpu_hour {
                warnings.push((
                    key.to_string(),
                    format!(
                        "{p} is not above price_per_gpu_hour ({}): committing never pays, so \
                         the renewal sizing recommends no commitment",
                        rc.price_per_gpu_hour
                    ),
                ));
            }
            Some(p)
        }
    };
    let sla = rc.sla.as_ref().map(build_sla).transpose()?;
    let tz_name = rc.timezone.as_deref().unwrap_or("UTC");
    let (tz, timezone_name) = calendar::time_zone(tz_name).map_err(|m| err("timezone", m))?;
    let anchor_day = rc.billing_anchor_day.unwrap_or(1);
    if !(1..=31).contains(&anchor_day) {
        return Err(err(
            "billing_anchor_day",
            format!("must be between 1 and 31, got {anchor_day}"),
        ));
    }
    let anchor_day = anchor_day as i8;

    let spec =
        |field: &str, raw: &RawTime| calendar::parse_time_spec(&raw.0).map_err(|m| err(field, m));
    let start_spec = spec("start", &rc.start)?;
    let start_ms = calendar::resolve(&tz, start_spec).map_err(|m| err("start", m))?;
    let end_ms = match &rc.end {
        None => None,
        Some(raw) => {
            let end_spec = spec("end", raw)?;
            let end = calendar::resolve_end(&tz, end_spec).map_err(|m| err("end", m))?;
            if end <= start_ms {
                let what = if matches!(end_spec, TimeSpec::Date(_)) {
                    " (an end date is inclusive)"
                } else {
                    ""
                };
                return Err(err(
                    "end",
                    format!("{:?} must be after start {:?}{what}", raw.0, rc.start.0),
                ));
            }
            Some(end)
        }
    };

    let selector = Selector::parse(&rc.selector).map_err(|m| err("selector", m))?;

    if rc.ramp.is_empty() {
        return Err(err(
            "ramp",
            "must not be empty (give at least one step, e.g. { from = \"2026-11-01\", gpus = 8 })"
                .into(),
        ));
    }
    // Resolve and check each step; then default every missing `until`.
    let mut steps: Vec<(i64, Option<i64>, u64)> = Vec::with_capacity(rc.ramp.len());
    for (i, step) in rc.ramp.iter().enumerate() {
        let f = |name: &str| format!("ramp[{i}].{name}");
        let from_spec = calendar::parse_time_spec(&step.from.0).map_err(|m| (f("from"), m))?;
        let from = calendar::resolve(&tz, from_spec).map_err(|m| (f("from"), m))?;
        let until = match &step.until {
            None => None,
            Some(raw) => {
                let s = calendar::parse_time_spec(&raw.0).map_err(|m| (f("until"), m))?;
                Some(calendar::resolve(&tz, s).map_err(|m| (f("until"), m))?)
            }
        };
        let gpus = u64::try_from(step.gpus)
            .map_err(|_| (f("gpus"), format!("must be >= 0, got {}", step.gpus)))?;
        if step.gpus > MAX_COMMITTED_GPUS {
            return Err((
                f("gpus"),
                format!(
                    "{} is more than any fleet has (at most {MAX_COMMITTED_GPUS})",
                    step.gpus
                ),
            ));
        }
        if let (Some(u), Some(raw)) = (until, &step.until) {
            if u <= from {
                return Err((
                    f("until"),
                    format!("{:?} must be after ramp[{i}].from {:?}", raw.0, step.from.0),
                ));
            }
        }
        if i > 0 {
            let prev = &rc.ramp[i - 1];
            let (prev_from, prev_until, _) = steps[i - 1];
            if from <= prev_from {
                return Err((
                    f("from"),
                    format!(
                        "{:?} must be after ramp[{}].from {:?} (list steps in time order)",
                        step.from.0,
                        i - 1,
                        prev.from.0
                    ),
                ));
            }
            if let (Some(pu), Some(raw)) = (prev_until, &prev.until) {
                if pu > from {
                    return Err((
                        format!("ramp[{}].until", i - 1),
                        format!(
                            "{:?} is after ramp[{i}].from {:?}: steps must not overlap",
                            raw.0, step.from.0
                        ),
                    ));
                }
            }
        }
        steps.push((from, until, gpus));
    }
    for i in 0..steps.len() {
        if steps[i].1.is_none() {
            steps[i].1 = steps.get(i + 1).map(|s| s.0).or(end_ms);
        }
    }
    let ramp = calendar::clip_ramp(start_ms, end_ms, &steps);
    let span = match &rc.end {
        Some(end) => format!("{:?}–{:?}", rc.start.0, end.0),
        None => format!("from {:?}", rc.start.0),
    };
    if ramp.is_empty() {
        return Err(err(
            "ramp",
            format!("no step overlaps the contract's span ({span}): it can never commit a GPU"),
        ));
    }
    for (i, &(from, until, _)) in steps.iter().enumerate() {
        let before = until.is_some_and(|u| u <= start_ms);
        let after = end_ms.is_some_and(|e| from >= e);
        if before || after {
            warnings.push((
                format!("ramp[{i}]"),
                format!("lies wholly outside the contract's span ({span}); it never counts"),
            ));
        }
    }

    Ok(Contract {
        id: rc.id,
        provider: rc.provider,
        currency: rc.currency,
        price_per_gpu_hour: rc.price_per_gpu_hour,
        on_demand_price_per_gpu_hour,
        target_utilization,
        sla,
        usage_signal: match rc.usage_signal.unwrap_or(RawUsageSignal::Busy) {
            RawUsageSignal::Busy => UsageSignal::Busy,
            RawUsageSignal::Allocated => UsageSignal::Allocated,
            RawUsageSignal::SmActive => UsageSignal::SmActive,
        },
        timezone_name,
        start_ms,
        end_ms,
        tz,
        anchor_day,
        ramp,
        selector,
        model,
    })
}

/// A ratio of the `sla` table in parts per million: within `lo..=1` (`lo_open`: above
/// 0, else at least 0), with at most 6 decimal places, so that tiers are decided by exact
/// integer comparison ([`crate::statement::sla`]) and the value means what was written.
fn ratio_ppm(field: &str, value: f64, lo_open: bool) -> Result<u32, (String, String)> {
    let range = if lo_open { "(0, 1]" } else { "[0, 1]" };
    let in_range =
        value.is_finite() && value <= 1.0 && if lo_open { value > 0.0 } else { value >= 0.0 };
    if !in_range {
        return Err((
            field.to_string(),
            format!("must be in {range}, got {value}"),
        ));
    }
    let ppm = (value * PPM as f64).round();
    if ppm / PPM as f64 != value {
        return Err((
            field.to_string(),
            format!(
                "{value} has more than 6 decimal places (the SLA is decided in parts per million)"
            ),
        ));
    }
    Ok(ppm as u32)
}

/// Validates a contract's `sla` table; errors are `(field, message)` with the field under
/// `sla.`, e.g. `sla.credits[1].below`.
///
/// Tiers are listed from the mildest to the severest: `below` strictly falling (so each tier
/// is a worse breach than the one before) and `credit` strictly growing with it. The first
/// `below` must not exceed `delivery_target`: a credit while the target is met would
/// contradict it.
fn build_sla(raw: &RawSla) -> Result<Sla, (String, String)> {
    let err = |field: String, message: String| (field, message);
    let delivery_target_ppm = ratio_ppm("sla.delivery_target", raw.delivery_target, true)?;
    if raw.credits.is_empty() {
        return Err(err(
            "sla.credits".into(),
            "must not be empty (e.g. [ { below = 0.99, credit = 0.10 } ]): without a tier \
             there is nothing to claim"
                .into(),
        ));
    }
    let mut credits: Vec<CreditTier> = Vec::with_capacity(raw.credits.len());
    for (i, tier) in raw.credits.iter().enumerate() {
        let f = |name: &str| format!("sla.credits[{i}].{name}");
        let below_ppm = ratio_ppm(&f("below"), tier.below, true)?;
        let credit_ppm = ratio_ppm(&f("credit"), tier.credit, false)?;
        match credits.last() {
            None if below_ppm > delivery_target_ppm => {
                return Err(err(
                    f("below"),
                    format!(
                        "{} must be <= delivery_target {}: a credit would be owed while the \
                         target is met",
                        tier.below, raw.delivery_target
                    ),
                ))
            }
            Some(prev) if below_ppm >= prev.below_ppm => {
                return Err(err(
                    f("below"),
                    format!(
                        "{} must be below sla.credits[{}].below {} (list tiers from the \
                         mildest breach to the severest)",
                        tier.below,
                        i - 1,
                        raw.credits[i - 1].below
                    ),
                ))
            }
            Some(prev) if credit_ppm <= prev.credit_ppm => {
                return Err(err(
                    f("credit"),
                    format!(
                        "{} must be above sla.credits[{}].credit {} (a worse breach earns a \
                         larger credit)",
                        tier.credit,
                        i - 1,
                        raw.credits[i - 1].credit
                    ),
                ))
            }
            _ => {}
        }
        credits.push(CreditTier {
            below_ppm,
            credit_ppm,
        });
    }
    if !(1..=MAX_CLAIM_WINDOW_DAYS).contains(&raw.claim_window_days) {
        return Err(err(
            "sla.claim_window_days".into(),
            format!(
                "must be between 1 and {MAX_CLAIM_WINDOW_DAYS}, got {}",
                raw.claim_window_days
            ),
        ));
    }
    Ok(Sla {
        delivery_target_ppm,
        credits,
        claim_window_days: raw.claim_window_days as u32,
    })
}

/// A label name of a `[[targets]]` group: a valid name ([`crate::configfile::check_label_name`]),
/// and not `instance`, which the aggregator sets.
fn check_label_name(name: &str) -> Result<(), String> {
    use crate::configfile::BadLabelName;
    match crate::configfile::check_label_name(name) {
        Ok(()) => {}
        Err(BadLabelName::Syntax) => {
            return Err(format!(
                "{name:?} is not a valid label name ([a-zA-Z_][a-zA-Z0-9_]*)"
            ))
        }
        Err(BadLabelName::Reserved) => {
            return Err(format!(
                "{name:?}: label names starting with \"__\" are reserved"
            ))
        }
    }
    if name == "instance" {
        return Err(
            "\"instance\" is reserved: the aggregator sets it to the target address".into(),
        );
    }
    Ok(())
}

// ---- raw TOML shapes (every table denies unknown keys; no `flatten`) ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    aggregator: Option<RawAggregator>,
    #[serde(default)]
    targets: Vec<RawTargetGroup>,
    #[serde(default)]
    file_sd: Vec<RawFileSd>,
    #[serde(default)]
    contracts: Vec<RawContract>,
    /// Checked key by key in [`Teams::parse`], so that a mistake (an unknown key too)
    /// names the team.
    #[serde(default)]
    teams: Vec<toml::Table>,
    storage: Option<RawStorage>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    postgres: Option<String>,
    password_file: Option<String>,
    tls_ca_file: Option<String>,
    shard: Option<String>,
    shard_grace: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAggregator {
    scrape_interval: Option<String>,
    scrape_timeout: Option<String>,
    grace: Option<String>,
    body_limit_bytes: Option<i64>,
    scrape_scheme: Option<String>,
    tls_ca_file: Option<String>,
    tls_cert_file: Option<String>,
    tls_key_file: Option<String>,
    tls_server_name: Option<String>,
    tls_insecure_skip_verify: Option<bool>,
    basic_auth_username: Option<String>,
    basic_auth_password_file: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTargetGroup {
    targets: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFileSd {
    files: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawContract {
    id: String,
    provider: String,
    model: Option<String>,
    price_per_gpu_hour: f64,
    on_demand_price_per_gpu_hour: Option<f64>,
    currency: String,
    target_utilization: Option<f64>,
    timezone: Option<String>,
    billing_anchor_day: Option<i64>,
    start: RawTime,
    end: Option<RawTime>,
    usage_signal: Option<RawUsageSignal>,
    selector: String,
    ramp: Vec<RawStep>,
    sla: Option<RawSla>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSla {
    delivery_target: f64,
    credits: Vec<RawCreditTier>,
    claim_window_days: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCreditTier {
    below: f64,
    credit: f64,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawUsageSignal {
    Busy,
    Allocated,
    #[serde(rename = "sm_active")]
    SmActive,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    from: RawTime,
    until: Option<RawTime>,
    /// Signed, so a negative count reaches validation with a clear message.
    gpus: i64,
}

/// A date or timestamp as written: a string, or a bare TOML date / offset date-time
/// (`start = 2026-11-01` works as well as `start = "2026-11-01"`).
struct RawTime(String);

impl<'de> Deserialize<'de> for RawTime {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{Error, Unexpected};
        let expected = &"a date (\"YYYY-MM-DD\") or an RFC 3339 timestamp";
        match toml::Value::deserialize(d)? {
            toml::Value::String(s) => Ok(RawTime(s)),
            toml::Value::Datetime(dt) => Ok(RawTime(dt.to_string())),
            toml::Value::Integer(i) => Err(D::Error::invalid_type(Unexpected::Signed(i), expected)),
            toml::Value::Float(f) => Err(D::Error::invalid_type(Unexpected::Float(f), expected)),
            toml::Value::Boolean(b) => Err(D::Error::invalid_type(Unexpected::Bool(b), expected)),
            toml::Value::Array(_) => Err(D::Error::invalid_type(Unexpected::Seq, expected)),
            toml::Value::Table(_) => Err(D::Error::invalid_type(Unexpected::Map, expected)),
        }
    }
}
