//! The agent role: NVML → per-GPU counters → `/metrics`.

pub mod accrue;
pub mod config;
pub mod metrics;
pub mod nvml;
pub mod sampler;

use std::sync::Arc;

use hyper::StatusCode;

use crate::cli::AgentArgs;
use crate::http::{self, Handler};
use config::AgentConfig;
use metrics::AgentMetrics;
use sampler::{Sampler, SamplerConfig, Status};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Http(#[from] http::HttpError),
    #[error(transparent)]
    WebConfig(#[from] http::WebConfigError),
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot start the sampling thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Everything the agent needs that can fail because of the user's input, checked
/// before any socket or library is touched.
pub struct Prepared {
    args: AgentArgs,
    config: AgentConfig,
    listen: std::net::SocketAddr,
    web: http::WebConfig,
}

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

/// Runs until `shutdown` completes.
pub async fn run(
    p: Prepared,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let metrics = Arc::new(AgentMetrics::new(&p.config.labels)?);
    let listener = http::bind(p.listen).await?;
    tracing::info!(
        address = %listener.local_addr().unwrap_or(p.listen),
        tls = p.web.is_tls(),
        basic_auth = p.web.has_auth(),
        "serving /metrics"
    );
    let status = Arc::new(Status::default());
    let sampler = Sampler::spawn(
        SamplerConfig {
            interval: p.args.sample_interval,
            library: p.args.nvml_library.clone(),
        },
        metrics.clone(),
        status.clone(),
    )?;
    spawn_reload(metrics.clone(), p.args.config_file.clone());
    http::serve_with(listener, handler(metrics, status), p.web, shutdown).await;
    tracing::info!("shutting down");
    tokio::task::spawn_blocking(move || sampler.stop())
        .await
        .ok();
    Ok(())
}

fn handler(metrics: Arc<AgentMetrics>, status: Arc<Status>) -> Handler {
    Arc::new(move |path: &str| {
        match path {
        "/metrics" => Some(http::metrics(&metrics.registry)),
        "/-/healthy" => Some(http::text(StatusCode::OK, "text/plain", "OK\n")),
        "/-/ready" if status.is_ready() => Some(http::text(StatusCode::OK, "text/plain", "OK\n")),
        "/-/ready" => Some(http::text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "NVML not sampled yet (see commitmeter_nvml_up)\n",
        )),
        "/" => Some(http::text(
            StatusCode::OK,
            "text/html; charset=utf-8",
            "<!doctype html><title>commitmeter agent</title><h1>commitmeter agent</h1><p><a href=\"/metrics\">/metrics</a></p>\n",
        )),
        _ => None,
    }
    })
}
