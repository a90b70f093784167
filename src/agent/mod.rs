//! The agent role: NVML → per-GPU counters → `/metrics`.

pub mod accrue;
pub mod attribution;
pub mod config;
pub mod kubelet;
pub mod metrics;
pub mod nvml;
pub mod procfs;
pub mod sampler;
pub mod xidlog;

use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;

use crate::cli::AgentArgs;
use crate::clock::AgentClock;
use crate::http::{self, Handler};
use config::AgentConfig;
use metrics::AgentMetrics;
use sampler::{Readiness, Sampler, SamplerConfig, SamplerError, Status};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent's config file or the web config.
    #[error(transparent)]
    Config(#[from] crate::configfile::ConfigError),
    #[error(transparent)]
    Http(#[from] http::HttpError),
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Sampler(#[from] SamplerError),
}

/// Everything the agent needs that can fail because of the user's input, checked
/// before any socket or library is touched.
pub struct Prepared {
    args: AgentArgs,
    config: AgentConfig,
    listen: std::net::SocketAddr,
    web: http::WebConfig,
}

/// Reads and checks everything the command line names, as [`crate::aggregator::prepare`]
/// does for the aggregator: the config file (parsed without I/O), the listen address and
/// the web config with the files it names.
pub fn prepare(args: AgentArgs) -> Result<Prepared, AgentError> {
    let config = match &args.config_file {
        Some(path) => AgentConfig::load(path)?,
        None => AgentConfig::default(),
    };
    let listen = http::parse_listen_address(&args.listen_address)?;
    let web = http::WebConfig::from_flag(args.web_config_file.as_deref())?;
    Ok(Prepared {
        args,
        config,
        listen,
        web,
    })
}

/// SIGHUP re-reads the config file: new host labels apply at once; a bad file keeps
/// the running labels, logs why and sets `commitmeter_config_last_reload_successful 0`.
fn spawn_reload(metrics: Arc<AgentMetrics>, config_file: Option<std::path::PathBuf>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP");
            return;
        }
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let Some(path) = &config_file else {
                tracing::info!("SIGHUP: no --config.file, nothing to reload");
                continue;
            };
            let applied = AgentConfig::load(path)
                .map_err(|e| e.to_string())
                .and_then(|c| {
                    metrics
                        .set_host_labels(&c.labels)
                        .map_err(|e| e.to_string())
                });
            match applied {
                Ok(()) => {
                    tracing::info!("config reloaded");
                    metrics.reload_ok.set(1);
                }
                Err(e) => {
                    tracing::error!(error = %e, "config reload failed; keeping the running labels");
                    metrics.reload_ok.set(0);
                }
            }
        }
    });
}

/// How long a stop waits for the sampling thread, which may be stuck in NVML.
const SAMPLER_STOP_PATIENCE: Duration = Duration::from_secs(5);

/// Runs until `shutdown` completes, or fails when the sampling thread dies: counters
/// that no longer move must not be served as if they did, so the process exits
/// non-zero and its service manager restarts it.
pub async fn run(
    p: Prepared,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    // The wall clock is read here, once: round timestamps count on from it.
    let clock = AgentClock::start();
    let metrics = Arc::new(AgentMetrics::new(&p.config.labels)?);
    metrics.register_process_collector(clock.started_unix_ms())?;
    let listener = http::bind(p.listen).await?;
    tracing::info!(
        address = %listener.local_addr().unwrap_or(p.listen),
        tls = p.web.is_tls(),
        basic_auth = p.web.has_auth(),
        "serving /metrics"
    );
    let cfg = SamplerConfig {
        interval: p.args.sample_interval,
        library: p.args.nvml_library.clone(),
        owners: procfs::OwnersConfig {
            procfs: p.args.procfs.clone(),
            rootfs: p.args.rootfs.clone(),
            slurm_account_dir: p.args.slurm_account_dir.clone(),
            kubelet_socket: p.args.kubelet_socket.clone(),
            retention: p.args.owners_retention,
        },
        pods: None,
    };
    let pods = Arc::new(kubelet::PodNames::default());
    let refresher = tokio::spawn(kubelet::refresh_loop(
        cfg.owners.kubelet_socket.clone(),
        pods.clone(),
        kubelet::Cadence::default(),
        metrics.kubelet_errors.clone(),
    ));
    let cfg = SamplerConfig {
        pods: Some(pods),
        ..cfg
    };
    let status = Arc::new(Status::new(clock, cfg.max_gap()));
    let mut sampler = Sampler::spawn(cfg, clock, metrics.clone(), status.clone())?;
    spawn_reload(metrics.clone(), p.args.config_file.clone());
    let watchdog = tokio::spawn(log_stalls(status.clone()));
    let mut died = None;
    let stop = async {
        tokio::select! {
            () = shutdown => {}
            end = sampler.ended() => died = Some(end),
        }
    };
    let served = http::ServerMetrics::register(&metrics.registry)?;
    http::serve_with(listener, handler(metrics, status), p.web, served, stop).await;
    watchdog.abort();
    refresher.abort();
    if let Some(end) = died {
        return Err(end.err().unwrap_or(SamplerError::Exited).into());
    }
    tracing::info!("shutting down");
    sampler.stop(SAMPLER_STOP_PATIENCE).await?;
    Ok(())
}

/// Logs when rounds stop completing (a hung NVML call) and when they resume.
async fn log_stalls(status: Arc<Status>) {
    let mut stalled = false;
    let mut tick = tokio::time::interval(status.max_gap() / 5);
    loop {
        tick.tick().await;
        match status.readiness() {
            Readiness::Stalled(since) if !stalled => {
                stalled = true;
                tracing::error!(
                    since_s = since.as_secs_f64(),
                    "sampling stalled: no round completed; counters are frozen"
                );
            }
            Readiness::Ready if stalled => {
                stalled = false;
                tracing::info!("sampling resumed");
            }
            _ => {}
        }
    }
}

/// Every route answers from memory.
fn handler(metrics: Arc<AgentMetrics>, status: Arc<Status>) -> Handler {
    http::handler(move |path: String| {
        let (metrics, status) = (metrics.clone(), status.clone());
        async move {
            match path.as_str() {
        "/metrics" => Some(metrics.render()),
        "/-/healthy" => Some(http::text(StatusCode::OK, "text/plain", "OK\n")),
        "/-/ready" => Some(match status.readiness() {
            Readiness::Ready => http::text(StatusCode::OK, "text/plain", "OK\n"),
            Readiness::NotSampled => http::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "NVML not sampled yet (see commitmeter_nvml_up)\n",
            ),
            Readiness::Stalled(since) => http::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!(
                    "sampling stalled: no round completed for {:.1} s (more than {} s; see commitmeter_agent_last_round_timestamp_seconds)\n",
                    since.as_secs_f64(),
                    status.max_gap().as_secs_f64()
                ),
            ),
        }),
        "/" => Some(http::text(
            StatusCode::OK,
            "text/html; charset=utf-8",
            "<!doctype html><title>commitmeter agent</title><h1>commitmeter agent</h1><p><a href=\"/metrics\">/metrics</a></p>\n",
        )),
        _ => None,
    }
        }
    })
}
