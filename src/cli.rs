//! Command-line arguments, parsed without side effects (no files read, no sockets).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::configfile::parse_duration;

#[derive(Debug, Parser)]
#[command(
    name = "commitmeter",
    version,
    about = "Measures committed GPU capacity: delivered, used, idle, to the GPU-second"
)]
pub struct Cli {
    /// Log level or tracing filter directive (e.g. `info`, `debug`, `commitmeter=debug`).
    #[arg(long = "log.level", default_value = "info", global = true)]
    pub log_level: String,
    /// Log line format, on standard error.
    #[arg(long = "log.format", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Plain `time level message key=value` lines (alias `logfmt`).
    #[value(alias = "logfmt")]
    Text,
    /// One JSON object a line.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Sample this host's GPUs through NVML and serve per-GPU counters on /metrics.
    Agent(AgentArgs),
    /// Scrape agents, keep the contract ledger, serve contract metrics on /metrics.
    Aggregator(AggregatorArgs),
    /// Validate agent or aggregator config files and exit (status 1 on the first mistake).
    CheckConfig(CheckConfigArgs),
    /// The whole pipeline on this machine, no GPU needed: a simulated fleet, the real
    /// aggregator and ledger, on simulated time.
    Demo(DemoArgs),
    /// The statement of a billing period from the ledger: per local day and total, in
    /// GPU-hours and the contract's currency. Reads the ledger without blocking a running
    /// aggregator.
    Statement(StatementArgs),
    /// Operations on a ledger directory (`ledger backup`).
    #[command(subcommand)]
    Ledger(LedgerCommand),
}

#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Write a consistent copy of the ledger to a new file, while it runs or not.
    Backup(BackupArgs),
}

#[derive(Debug, Args, Clone)]
pub struct BackupArgs {
    /// Directory of the ledger (the aggregator's `--storage.path`, or the demo's `--data.dir`).
    #[arg(long = "storage.path", default_value = "commitmeter-data")]
    pub storage_path: PathBuf,
    /// The backup file to create (must not exist). A running aggregator writes it
    /// itself, so it must be a path the service may write (e.g. under --storage.path).
    #[arg(long = "output")]
    pub output: PathBuf,
    /// How long to wait for a running aggregator to write the backup.
    #[arg(long = "timeout", default_value = "2m", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Args, Clone)]
pub struct StatementArgs {
    /// The aggregator's TOML file: its contracts (calendar, ramp, price).
    #[arg(long = "config.file")]
    pub config_file: PathBuf,
    /// Only this contract; default: every contract in the file.
    #[arg(long = "contract")]
    pub contract: Option<String>,
    /// The billing period that starts in this local month (`YYYY-MM`); default: the current one.
    #[arg(long = "period")]
    pub period: Option<String>,
    /// Output format; default: text on a terminal, CSV otherwise (a pipe or a file).
    #[arg(long = "format", value_enum)]
    pub format: Option<StatementFormat>,
    /// Also write the period's delivery gaps (the SLA's evidence: GPU lost, host unreachable,
    /// short) to this file, as CSV (`.csv`) or JSON (`.json`).
    #[arg(long = "evidence")]
    pub evidence: Option<PathBuf>,
    /// Directory of the ledger (the aggregator's `--storage.path`, or the demo's `--data.dir`).
    #[arg(long = "storage.path", default_value = "commitmeter-data")]
    pub storage_path: PathBuf,
    /// How long to wait for a running aggregator to hand over a consistent copy of the ledger.
    #[arg(long = "timeout", default_value = "2m", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatementFormat {
    /// A readable table.
    Text,
    /// One line per local day and contract, then the total.
    Csv,
    /// One object per contract (an array when there are several).
    Json,
    /// FOCUS 1.2 commitment rows (docs/focus.md): per local day, the commitment's purchase and
    /// its used and unused parts, UTC times.
    Focus,
}

impl StatementFormat {
    /// Without `--format`: a readable table for a person at a terminal, CSV for whatever
    /// reads standard output otherwise (a spreadsheet, a reconciliation script).
    pub fn default_for(stdout_is_terminal: bool) -> Self {
        if stdout_is_terminal {
            Self::Text
        } else {
            Self::Csv
        }
    }
}

#[derive(Debug, Args, Clone)]
pub struct DemoArgs {
    /// Address of the aggregator's status page and /metrics.
    #[arg(long = "web.listen-address", default_value = "127.0.0.1:9474")]
    pub listen_address: String,
    /// How much faster than real time simulated time runs.
    #[arg(long = "speed", default_value_t = 60.0, value_parser = parse_speed)]
    pub speed: f64,
    /// Which story the simulated fleet tells.
    #[arg(long = "story", value_enum, default_value_t = crate::demo::sim::Story::Default)]
    pub story: crate::demo::sim::Story,
    /// Keep the ledger here instead of a temporary directory removed on exit.
    #[arg(long = "data.dir")]
    pub data_dir: Option<PathBuf>,
}

fn parse_speed(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.1..=100_000.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "{s}: the speed must be a number between 0.1 and 100000"
        )),
    }
}

#[derive(Debug, Args, Clone)]
pub struct AggregatorArgs {
    /// TOML file with targets and contracts.
    #[arg(long = "config.file")]
    pub config_file: PathBuf,
    /// Address to serve /metrics on.
    #[arg(long = "web.listen-address", default_value = ":9474")]
    pub listen_address: String,
    /// exporter-toolkit web config (YAML): TLS and basic auth for this listener.
    #[arg(long = "web.config.file")]
    pub web_config_file: Option<PathBuf>,
    /// Directory of the ledger database (created if missing).
    #[arg(long = "storage.path", default_value = "commitmeter-data")]
    pub storage_path: PathBuf,
    #[command(flatten)]
    pub storage: StorageArgs,
    /// With `[storage] postgres`: exit 1 when the shared book cannot be reached at start,
    /// instead of retrying with backoff (up to every 30s) until it answers.
    #[arg(long = "storage.postgres.exit-if-unreachable")]
    pub postgres_exit_if_unreachable: bool,
}

/// How the ledger directory is opened.
#[derive(Debug, Args, Clone)]
pub struct StorageArgs {
    /// Start a new, empty ledger where the old one is lost (missing, empty, foreign, or
    /// its WAL lost): the old files are moved to `replaced-<time>/` in the directory.
    /// Refused where a valid ledger is.
    #[arg(long = "storage.create-new")]
    pub create_new: bool,
    /// Drop minutes sealed after now (a clock that ran ahead, then was corrected);
    /// without it such a ledger is refused at start.
    #[arg(long = "storage.discard-future-minutes")]
    pub discard_future_minutes: bool,
    /// How often the hosts' checkpoints (their last counters) are written; sealed and
    /// open minutes are written every round. `0s`: every round. A crash between two
    /// checkpoints re-baselines every host (README, "What a crash costs").
    #[arg(long = "storage.host-checkpoint-interval", default_value = "1h", value_parser = parse_checkpoint_interval)]
    pub host_checkpoint_interval: Duration,
}

fn parse_checkpoint_interval(s: &str) -> Result<Duration, String> {
    let d = if s == "0" {
        Duration::ZERO
    } else {
        parse_duration(s)?
    };
    if d > Duration::from_secs(86_400) {
        return Err(format!(
            "{s}: the host checkpoint interval must be at most 24h"
        ));
    }
    Ok(d)
}

#[derive(Debug, Args, Clone)]
pub struct CheckConfigArgs {
    /// Config files. Without `--kind`, a `.yml` file is a web config, a TOML file an
    /// aggregator or agent file by its tables, else by its name, else an agent file.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Check every file as this kind instead of guessing.
    #[arg(long = "kind", value_enum)]
    pub kind: Option<crate::check::Kind>,
}

#[derive(Debug, Args, Clone)]
pub struct AgentArgs {
    /// TOML file with host labels (`[labels]`); none by default.
    #[arg(long = "config.file")]
    pub config_file: Option<PathBuf>,
    /// Address to serve /metrics on.
    #[arg(long = "web.listen-address", default_value = ":9473")]
    pub listen_address: String,
    /// exporter-toolkit web config (YAML): TLS and basic auth for this listener.
    #[arg(long = "web.config.file")]
    pub web_config_file: Option<PathBuf>,
    /// How often NVML is sampled (e.g. `1s`, `500ms`).
    #[arg(long = "sample.interval", default_value = "1s", value_parser = parse_interval)]
    pub sample_interval: Duration,
    /// Path of the NVML library; default: the dynamic loader's `libnvidia-ml.so.1`.
    #[arg(long = "nvml.library")]
    pub nvml_library: Option<PathBuf>,
    /// procfs mount point: each GPU process's cgroup and user are read under it (as
    /// node_exporter's flag).
    #[arg(long = "path.procfs", default_value = "/proc")]
    pub procfs: PathBuf,
    /// Root of the host's filesystem: `etc/passwd` under it names the users of GPU
    /// processes (as node_exporter's flag).
    #[arg(long = "path.rootfs", default_value = "/")]
    pub rootfs: PathBuf,
    /// Directory where a Slurm prolog writes `<job id>` files holding the job's account;
    /// none by default (the account is then unknown).
    #[arg(long = "owners.slurm-account-dir")]
    pub slurm_account_dir: Option<PathBuf>,
    /// The kubelet's pod-resources socket, for pods' namespace and name; without it (or
    /// unreadable) a pod is known by its UID alone.
    #[arg(
        long = "owners.kubelet-socket",
        default_value = "/var/lib/kubelet/pod-resources/kubelet.sock"
    )]
    pub kubelet_socket: PathBuf,
    /// How long an owner whose processes ended stays in the exposition after its last
    /// seconds, so that every scraper sees its final counts.
    #[arg(long = "owners.retention", default_value = "15m", value_parser = parse_duration)]
    pub owners_retention: Duration,
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(100) || d > Duration::from_secs(60) {
        return Err(format!(
            "{s}: the sample interval must be between 100ms and 60s"
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn agent_flags_in_exporter_style() {
        let cli = Cli::try_parse_from([
            "commitmeter",
            "agent",
            "--web.listen-address=127.0.0.1:1",
            "--sample.interval=250ms",
            "--nvml.library=/x.so",
            "--web.config.file=/etc/commitmeter/web.yml",
            "--log.format=json",
        ])
        .unwrap();
        assert_eq!(cli.log_format, LogFormat::Json);
        let Command::Agent(a) = cli.command else {
            panic!("not agent")
        };
        assert_eq!(a.listen_address, "127.0.0.1:1");
        assert_eq!(a.sample_interval, Duration::from_millis(250));
        assert_eq!(a.nvml_library, Some(PathBuf::from("/x.so")));
        assert_eq!(
            a.web_config_file,
            Some(PathBuf::from("/etc/commitmeter/web.yml"))
        );
        assert!(Cli::try_parse_from(["commitmeter", "agent", "--sample.interval=10ms"]).is_err());
    }
}
