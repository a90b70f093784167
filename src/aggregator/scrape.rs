//! Scraping one agent: HTTP GET with a timeout and a body size cap, then the few
//! series the ledger needs, parsed with our own exposition parser.

use std::collections::BTreeMap;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::parse;
use super::targets::Target;

/// What one GPU's series said.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuReport {
    pub observed: f64,
    pub busy: Option<f64>,
    pub allocated: Option<f64>,
    pub model: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    #[error("reading body: {0}")]
    Body(String),
    #[error("malformed exposition: {0}")]
    Parse(#[from] parse::ParseError),
}

impl ScrapeError {
    /// A short, fixed label for the errors metric.
    pub fn reason(&self) -> &'static str {
        match self {
            ScrapeError::Connect(_) => "connect",
            ScrapeError::Timeout(_) => "timeout",
            ScrapeError::Status(_) => "http_status",
            ScrapeError::TooLarge(_) => "too_large",
            ScrapeError::Body(_) => "body",
            ScrapeError::Parse(_) => "parse",
        }
    }
}

#[derive(Clone)]
pub struct Scraper {
    client: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
    body_limit: usize,
}

impl Scraper {
    pub fn new(timeout: Duration, body_limit: usize) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(256)
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Self {
            client,
            timeout,
            body_limit,
        }
    }

    pub async fn scrape(
        &self,
        target: &Target,
    ) -> Result<BTreeMap<String, GpuReport>, ScrapeError> {
        let body = tokio::time::timeout(self.timeout, self.fetch(target))
            .await
            .map_err(|_| ScrapeError::Timeout(self.timeout))??;
        let text = std::str::from_utf8(&body).map_err(|e| ScrapeError::Body(e.to_string()))?;
        Ok(gpu_reports(text)?)
    }

    async fn fetch(&self, target: &Target) -> Result<Bytes, ScrapeError> {
        let uri: hyper::Uri = format!("http://{}{}", target.address, target.metrics_path)
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| ScrapeError::Connect(e.to_string()))?;
        let req = hyper::Request::get(uri)
            .header("accept", "text/plain;version=0.0.4")
            .header(
                "user-agent",
                concat!("commitmeter/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::new())
            .map_err(|e| ScrapeError::Connect(e.to_string()))?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| ScrapeError::Connect(error_chain(&e)))?;
        if !resp.status().is_success() {
            return Err(ScrapeError::Status(resp.status().as_u16()));
        }
        let limited = Limited::new(resp.into_body(), self.body_limit);
        match limited.collect().await {
            Ok(c) => Ok(c.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                Err(ScrapeError::TooLarge(self.body_limit))
            }
            Err(e) => Err(ScrapeError::Body(e.to_string())),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

const OBSERVED: &str = "commitmeter_gpu_observed_seconds_total";
const BUSY: &str = "commitmeter_gpu_busy_seconds_total";
const ALLOCATED: &str = "commitmeter_gpu_allocated_seconds_total";
const INFO: &str = "commitmeter_gpu_info";

/// The per-GPU accounting series of an agent's exposition, keyed by GPU UUID. A GPU
/// counts once it has an observed-seconds counter.
pub fn gpu_reports(text: &str) -> Result<BTreeMap<String, GpuReport>, parse::ParseError> {
    let mut gpus: BTreeMap<String, GpuReport> = BTreeMap::new();
    let mut models: BTreeMap<String, String> = BTreeMap::new();
    parse::parse(
        text,
        |name| {
            name.starts_with("commitmeter_gpu_")
                && matches!(name, OBSERVED | BUSY | ALLOCATED | INFO)
        },
        |s| {
            let Some(uuid) = s.label("uuid") else { return };
            if s.name == INFO {
                if let Some(model) = s.label("model") {
                    models.insert(uuid.to_string(), model.to_string());
                }
                return;
            }
            let g = gpus.entry(uuid.to_string()).or_default();
            match s.name {
                OBSERVED => g.observed = s.value,
                BUSY => g.busy = Some(s.value),
                ALLOCATED => g.allocated = Some(s.value),
                _ => {}
            }
        },
    )?;
    gpus.retain(|_, g| g.observed.is_finite());
    for (uuid, model) in models {
        if let Some(g) = gpus.get_mut(&uuid) {
            g.model = Some(model);
        }
    }
    Ok(gpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_accounting_series_of_an_agent() {
        let text = r#"# HELP commitmeter_gpu_info GPU identity
# TYPE commitmeter_gpu_info gauge
commitmeter_gpu_info{busy_source="samples",gpu="0",model="NVIDIA H100 80GB HBM3",pci_bus_id="00000000:17:00.0",uuid="GPU-a"} 1
commitmeter_gpu_observed_seconds_total{gpu="0",uuid="GPU-a"} 100.5
commitmeter_gpu_busy_seconds_total{gpu="0",uuid="GPU-a"} 50
commitmeter_gpu_allocated_seconds_total{gpu="0",uuid="GPU-a"} 70
commitmeter_gpu_observed_seconds_total{gpu="1",uuid="GPU-b"} 3
commitmeter_gpu_power_watts{gpu="0",uuid="GPU-a"} 300
"#;
        let g = gpu_reports(text).unwrap();
        assert_eq!(
            g["GPU-a"],
            GpuReport {
                observed: 100.5,
                busy: Some(50.0),
                allocated: Some(70.0),
                model: Some("NVIDIA H100 80GB HBM3".into())
            }
        );
        assert_eq!(g["GPU-b"].busy, None);
        assert!(gpu_reports("commitmeter_gpu_busy_seconds_total{uuid=\"x} 1\n").is_err());
    }
}
