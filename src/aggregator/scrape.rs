//! Scraping one agent: HTTP(S) GET with a timeout and a body size cap, optionally with
//! basic auth, then the few series the ledger needs, parsed with our own exposition parser.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::header::HeaderValue;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::parse;
use super::targets::Target;
use crate::contract::ScrapeClient;
use crate::http::tls::{self, TlsError, Trust};

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
    #[error("TLS: {0}")]
    Tls(String),
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
            ScrapeError::Tls(_) => "tls",
            ScrapeError::Timeout(_) => "timeout",
            ScrapeError::Status(_) => "http_status",
            ScrapeError::TooLarge(_) => "too_large",
            ScrapeError::Body(_) => "body",
            ScrapeError::Parse(_) => "parse",
        }
    }
}

/// The TLS client config for `scrape`: built at start, since reading the system's CA
/// store (when no `tls_ca_file` is given) is file I/O that can find nothing.
pub fn tls_config(scrape: &ScrapeClient) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let trust = if scrape.tls.insecure_skip_verify {
        Trust::InsecureSkipVerify
    } else if let Some(roots) = &scrape.tls.ca {
        Trust::Roots(roots.clone())
    } else {
        Trust::Native
    };
    let identity = scrape
        .tls
        .identity
        .as_ref()
        .map(|i| (i.chain.clone(), i.key.clone_key()));
    Ok(Arc::new(tls::client_config(trust, identity)?))
}

#[derive(Clone)]
pub struct Scraper {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    timeout: Duration,
    body_limit: usize,
    /// `Basic …` from `basic_auth_username` and its password file.
    authorization: Option<HeaderValue>,
}

impl Scraper {
    /// `tls` is used for `https` targets ([`tls_config`]); `scrape` gives the server name
    /// override and the credentials.
    pub fn new(
        timeout: Duration,
        body_limit: usize,
        tls: Arc<rustls::ClientConfig>,
        scrape: &ScrapeClient,
    ) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeout));
        http.enforce_http(false);
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_or_http();
        let builder = match &scrape.tls.server_name {
            Some(name) => {
                builder.with_server_name_resolver(FixedServerNameResolver::new(name.clone()))
            }
            None => builder,
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(256)
            .pool_idle_timeout(Duration::from_secs(90))
            .build(builder.enable_http1().wrap_connector(http));
        let authorization = scrape.basic_auth.as_ref().and_then(|a| {
            let token = base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", a.username, a.password));
            let mut v = HeaderValue::from_str(&format!("Basic {token}")).ok()?;
            v.set_sensitive(true);
            Some(v)
        });
        Self {
            client,
            timeout,
            body_limit,
            authorization,
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
        let uri: hyper::Uri = format!(
            "{}://{}{}",
            target.scheme.as_str(),
            target.address,
            target.metrics_path
        )
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| ScrapeError::Connect(e.to_string()))?;
        let mut req = hyper::Request::get(uri)
            .header("accept", "text/plain;version=0.0.4")
            .header(
                "user-agent",
                concat!("commitmeter/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(auth) = &self.authorization {
            req = req.header(hyper::header::AUTHORIZATION, auth.clone());
        }
        let req = req
            .body(Empty::new())
            .map_err(|e| ScrapeError::Connect(e.to_string()))?;
        let resp = self.client.request(req).await.map_err(|e| {
            if tls::is_tls_error(&e) {
                ScrapeError::Tls(error_chain(&e))
            } else {
                ScrapeError::Connect(error_chain(&e))
            }
        })?;
        if !resp.status().is_success() {
            return Err(ScrapeError::Status(resp.status().as_u16()));
        }
        let limited = Limited::new(resp.into_body(), self.body_limit);
        match limited.collect().await {
            Ok(c) => Ok(c.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                Err(ScrapeError::TooLarge(self.body_limit))
            }
            Err(e) if tls::is_tls_error(&*e) => Err(ScrapeError::Tls(error_chain(&*e))),
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
