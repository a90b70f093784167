//! Scraping one agent: HTTP(S) GET with a timeout and a body size cap, optionally with
//! basic auth, then the few series the ledger needs, parsed with our own exposition parser.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::header::HeaderValue;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector};
use hyper_util::client::legacy::connect::HttpConnector;

use super::connections::{pool_budget, Io, Kept};
use super::parse;
use super::round::SCRAPES_IN_FLIGHT;
use super::targets::Target;
use crate::configfile::ConfigError;
use crate::contract::{Scheme, ScrapeSettings};
use crate::http::tls::{self, TlsError, Trust};
use crate::owner::{self, Owner};

/// What one GPU's series said, in whole milliseconds (each cumulative value rounded once).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuReport {
    pub observed_ms: i64,
    pub busy_ms: Option<i64>,
    pub allocated_ms: Option<i64>,
    /// `commitmeter_gpu_sm_active_seconds_total`: GPUs with GPM only.
    pub sm_active_ms: Option<i64>,
    /// `commitmeter_gpu_allocated_busy_seconds_total`: busy time while a process held it.
    pub allocated_busy_ms: Option<i64>,
    /// `commitmeter_gpu_allocated_sm_active_seconds_total`: GPUs with GPM only.
    pub allocated_sm_active_ms: Option<i64>,
    pub model: Option<String>,
    /// The owners' counters on this GPU (`commitmeter_owner_*_seconds_total`), by
    /// [`Owner::key`]: at most [`MAX_OWNERS_PER_GPU`], those with the smallest keys; the
    /// time of the others is the GPU's unassigned time.
    pub owners: BTreeMap<String, OwnerReport>,
}

/// One owner's series on one GPU, in whole milliseconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OwnerReport {
    pub owner: Owner,
    /// `commitmeter_owner_allocated_seconds_total`.
    pub allocated_ms: Option<i64>,
    /// `commitmeter_owner_busy_seconds_total`.
    pub busy_ms: Option<i64>,
    /// `commitmeter_owner_sm_active_seconds_total`: GPUs with GPM only.
    pub sm_active_ms: Option<i64>,
}

/// More owners than this on one GPU are not kept (a GPU runs a few processes at a time;
/// the agent keeps an ended owner's series for its retention): a scrape with more never
/// fails, the rest of its time is unassigned.
pub const MAX_OWNERS_PER_GPU: usize = 256;

/// What one agent's exposition said: its GPUs and the time its counters belong to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostReport {
    /// `commitmeter_agent_last_round_timestamp_seconds`, ms.
    pub round_ms: Option<i64>,
    /// `process_start_time_seconds`, ms.
    pub start_ms: Option<i64>,
    /// `commitmeter_agent_sampled_seconds_total`, ms.
    pub sampled_ms: Option<i64>,
    /// By GPU UUID; a GPU counts once it has an observed-seconds counter.
    pub gpus: BTreeMap<String, GpuReport>,
    /// `commitmeter_gpu_xid_errors_total`: per GPU UUID (of `gpus`), per XID code, the
    /// count. Evidence for the gap list only: a malformed sample is left out, never fails
    /// the scrape; at most [`MAX_XID_CODES_PER_GPU`] codes per GPU.
    pub xids: BTreeMap<String, BTreeMap<String, u64>>,
}

/// More distinct XID codes than this on one GPU are not kept (the driver has a few hundred).
pub const MAX_XID_CODES_PER_GPU: usize = 64;

/// A counter above this many seconds (about 31,700 years) is not a GPU's.
pub const MAX_COUNTER_SECONDS: f64 = 1e12;
/// A timestamp after this (year 5138) is not a clock's.
pub const MAX_TIMESTAMP_SECONDS: f64 = 1e11;
/// More GPUs than this behind one target is not one host (MIG instances included).
pub const MAX_GPUS_PER_TARGET: usize = 4096;

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
    /// A `Content-Encoding` the aggregator did not ask for (it sends
    /// `Accept-Encoding: identity`); reason `body`.
    #[error("response is {0}-encoded; the aggregator asks for identity")]
    Encoded(String),
    /// hyper's limit on the status line and headers; reason `too_large`.
    #[error("response head (status line and headers) larger than the client accepts")]
    HeadTooLarge,
    #[error("malformed exposition: {0}")]
    Parse(#[from] parse::ParseError),
    #[error("invalid value: {0}")]
    Invalid(String),
    #[error("duplicate series: {0}")]
    Duplicate(String),
    #[error("{0} GPUs, more than one host has ({MAX_GPUS_PER_TARGET} at most)")]
    TooManyGpus(usize),
}

impl ScrapeError {
    /// A short, fixed label for the errors metric.
    pub fn reason(&self) -> &'static str {
        match self {
            ScrapeError::Connect(_) => "connect",
            ScrapeError::Tls(_) => "tls",
            ScrapeError::Timeout(_) => "timeout",
            ScrapeError::Status(_) => "http_status",
            ScrapeError::TooLarge(_) | ScrapeError::HeadTooLarge => "too_large",
            ScrapeError::Body(_) | ScrapeError::Encoded(_) => "body",
            ScrapeError::Parse(_) => "parse",
            ScrapeError::Invalid(_) => "invalid_value",
            ScrapeError::Duplicate(_) => "duplicate_series",
            ScrapeError::TooManyGpus(_) => "too_many_gpus",
        }
    }

    /// Every `reason` label, to drop a removed target's series.
    pub const REASONS: [&'static str; 10] = [
        "connect",
        "tls",
        "timeout",
        "http_status",
        "too_large",
        "body",
        "parse",
        "invalid_value",
        "duplicate_series",
        "too_many_gpus",
    ];
}

/// How agents are reached, with the files the config names read and checked: built when
/// the aggregator is prepared and on each reload, from the config's [`ScrapeSettings`].
#[derive(Debug, Clone, Default)]
pub struct ScrapeClient {
    /// For static targets and file_sd targets without `__scheme__`.
    pub scheme: Scheme,
    pub tls: ScrapeTls,
    pub basic_auth: Option<BasicAuthCredentials>,
}

#[derive(Debug, Clone, Default)]
pub struct ScrapeTls {
    /// CA certificates of `tls_ca_file`; `None`: the system's.
    pub ca: Option<rustls::RootCertStore>,
    /// `tls_cert_file` and `tls_key_file`, checked to belong together.
    pub identity: Option<ClientIdentity>,
    /// `tls_server_name`: the name certificates are checked against instead of the host.
    pub server_name: Option<rustls::pki_types::ServerName<'static>>,
    pub insecure_skip_verify: bool,
}

/// A client certificate chain and its key.
#[derive(Debug)]
pub struct ClientIdentity {
    pub chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub key: rustls::pki_types::PrivateKeyDer<'static>,
}

impl Clone for ClientIdentity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// `basic_auth_username` and the contents of `basic_auth_password_file`.
#[derive(Clone)]
pub struct BasicAuthCredentials {
    pub username: String,
    pub password: String,
}

/// Keeps the password out of logs and panics.
impl fmt::Debug for BasicAuthCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BasicAuthCredentials")
            .field("username", &self.username)
            .field("password", &"<secret>")
            .finish()
    }
}

impl ScrapeClient {
    /// Reads the CA, client certificate and key, and password files `settings` names (of
    /// the config file `config_file`), so an unreadable or malformed one stops the
    /// aggregator before it starts and fails a reload. Errors name the config file and
    /// the key (`aggregator.tls_ca_file`).
    pub fn load(config_file: &Path, settings: &ScrapeSettings) -> Result<Self, ConfigError> {
        let err = |key: &str, message: String| {
            ConfigError::invalid(config_file, format!("aggregator.{key}"), message)
        };
        let ca = match &settings.tls_ca_file {
            None => None,
            Some(p) => Some(tls::root_store(p).map_err(|e| err("tls_ca_file", e.to_string()))?),
        };
        let identity = match &settings.tls_identity {
            None => None,
            Some(files) => {
                let chain = tls::load_certs(&files.cert)
                    .map_err(|e| err("tls_cert_file", e.to_string()))?;
                let key =
                    tls::load_key(&files.key).map_err(|e| err("tls_key_file", e.to_string()))?;
                // A trial client config checks that the key is usable and matches the
                // certificate.
                tls::client_config(
                    Trust::Roots(rustls::RootCertStore::empty()),
                    Some((chain.clone(), key.clone_key())),
                )
                .map_err(|e| err("tls_key_file", format!("{e} (with tls_cert_file)")))?;
                Some(ClientIdentity { chain, key })
            }
        };
        let basic_auth = match &settings.basic_auth {
            None => None,
            Some(auth) => {
                let p = &auth.password_file;
                let text = std::fs::read_to_string(p).map_err(|e| {
                    err(
                        "basic_auth_password_file",
                        format!("cannot read {}: {e}", p.display()),
                    )
                })?;
                // Surrounding whitespace (the file's final newline) is not part of the
                // password.
                let password = text.trim();
                if password.is_empty() {
                    return Err(err(
                        "basic_auth_password_file",
                        format!("{} is empty", p.display()),
                    ));
                }
                Some(BasicAuthCredentials {
                    username: auth.username.clone(),
                    password: password.to_string(),
                })
            }
        };
        Ok(Self {
            scheme: settings.scheme,
            tls: ScrapeTls {
                ca,
                identity,
                server_name: settings.tls_server_name.clone(),
                insecure_skip_verify: settings.tls_insecure_skip_verify,
            },
            basic_auth,
        })
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

/// The bytes of response bodies all scrapes may hold at once, so that many large or
/// slow targets cannot add up to unbounded memory (each is capped by `body_limit_bytes`
/// on its own). The first [`FREE_BODY_BYTES`] of each body are outside the budget: a real
/// agent's exposition (about 15 kB) never waits for it, whatever other targets do.
#[derive(Clone)]
pub struct BodyBudget {
    kib: Arc<tokio::sync::Semaphore>,
    total: usize,
}

/// Per body, bytes that do not count against the [`BodyBudget`].
pub const FREE_BODY_BYTES: usize = 256 * 1024;

impl BodyBudget {
    /// Four bodies at the limit, and at least 64 MiB.
    pub fn for_limit(body_limit: usize) -> Self {
        Self::new(body_limit.saturating_mul(4).max(64 << 20))
    }

    pub fn new(bytes: usize) -> Self {
        let kib = (bytes / 1024).clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        Self {
            kib: Arc::new(tokio::sync::Semaphore::new(kib)),
            total: kib * 1024,
        }
    }

    /// Bytes of the budget in use now.
    pub fn in_use(&self) -> usize {
        self.total - self.kib.available_permits() * 1024
    }
}

#[derive(Clone)]
pub struct Scraper {
    connector: HttpsConnector<HttpConnector>,
    /// The agents' connections between rounds; `None` when the interval is too long for
    /// an agent to keep one ([`keeps_connections`]).
    kept: Option<Arc<Kept>>,
    timeout: Duration,
    body_limit: usize,
    /// `Basic …` from `basic_auth_username` and its password file.
    authorization: Option<HeaderValue>,
    budget: BodyBudget,
}

/// A body held in one buffer (never a second copy), with its share of the budget.
struct Body {
    bytes: Vec<u8>,
    _budget: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// How long a connection waits idle in the pool for the agent's next scrape: a minute
/// less than agents keep an idle connection ([`crate::http::KEEPALIVE_IDLE_TIMEOUT`]), so a
/// scrape never goes out on a connection the agent is closing at that instant.
pub const POOL_IDLE: Duration =
    Duration::from_secs(crate::http::KEEPALIVE_IDLE_TIMEOUT.as_secs() - 60);

/// Whether the scraper keeps each agent's connection for its next scrape: when that comes
/// within [`POOL_IDLE`] (the default 15 s interval does). Each round then reuses the last
/// round's connection instead of connecting and closing again, which at 125,000 agents was
/// half the aggregator's CPU; see [`super::connections`]. At a longer interval, each
/// scrape connects anew and closes its connection when its answer is read.
pub fn keeps_connections(interval: Duration) -> bool {
    interval < POOL_IDLE
}

/// How one request on a connection failed: before any answer (a kept connection the agent
/// had closed may be retried), or after.
enum Exchange {
    BeforeAnswer(ScrapeError),
    Failed(ScrapeError),
}

/// A connection's task, aborted (its socket closed) when the scrape lets go of it.
struct Driver<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Driver<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Bodies up to this size are parsed on the scrape's own task (a few hundred µs at most);
/// larger ones on a blocking thread, so a 16 MiB body never stalls the runtime.
const PARSE_INLINE_BYTES: usize = 256 * 1024;

impl Scraper {
    /// `tls` is used for `https` targets ([`tls_config`]); `scrape` gives the server name
    /// override and the credentials; `interval` is the scrape interval ([`keeps_connections`]).
    pub fn new(
        timeout: Duration,
        interval: Duration,
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
        let connector = builder.enable_http1().wrap_connector(http);
        let kept = keeps_connections(interval).then(|| {
            Arc::new(Kept::new(
                pool_budget(crate::http::conns::fd_limit(), SCRAPES_IN_FLIGHT),
                POOL_IDLE,
            ))
        });
        let authorization = scrape.basic_auth.as_ref().and_then(|a| {
            let token = base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", a.username, a.password));
            let mut v = HeaderValue::from_str(&format!("Basic {token}")).ok()?;
            v.set_sensitive(true);
            Some(v)
        });
        Self {
            connector,
            kept,
            timeout,
            body_limit,
            authorization,
            budget: BodyBudget::for_limit(body_limit),
        }
    }

    /// Shares one budget among scrapers (a SIGHUP replaces the scraper while scrapes of
    /// the old one may still be reading).
    pub fn with_budget(mut self, budget: BodyBudget) -> Self {
        self.budget = budget;
        self
    }

    /// Fetches and parses within the scrape timeout: a body that is slow to arrive or
    /// slow to parse is a timeout, like a slow connection.
    pub async fn scrape(&self, target: &Target) -> Result<HostReport, ScrapeError> {
        tokio::time::timeout(self.timeout, async {
            let body = self.fetch(target).await?;
            if body.bytes.len() <= PARSE_INLINE_BYTES {
                return parse_body(&body.bytes);
            }
            // Parsing is linear; on a blocking thread it stalls neither serving nor the
            // other scrapes. The budget is held until the body is dropped there.
            tokio::task::spawn_blocking(move || parse_body(&body.bytes))
                .await
                .map_err(|e| ScrapeError::Body(format!("parser failed: {e}")))?
        })
        .await
        .map_err(|_| ScrapeError::Timeout(self.timeout))?
    }

    /// Scrape connections kept for the next round, after closing those kept too long: the
    /// round's end calls it.
    pub fn sweep_connections(&self) -> usize {
        self.kept.as_ref().map_or(0, |k| k.sweep())
    }

    async fn fetch(&self, target: &Target) -> Result<Body, ScrapeError> {
        let uri: hyper::Uri = format!(
            "{}://{}{}",
            target.scheme.as_str(),
            target.address,
            target.metrics_path
        )
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| ScrapeError::Connect(e.to_string()))?;
        // Where connections are kept: the pool and this agent's key in it.
        let kept = self.kept.as_deref().map(|kept| {
            let key = format!("{}://{}", target.scheme.as_str(), target.address);
            (kept, key)
        });
        let mut io = kept.as_ref().and_then(|(kept, key)| kept.take(key));
        loop {
            let reused = io.is_some();
            let conn = match io.take() {
                Some(conn) => conn,
                None => self.connect(uri.clone()).await?,
            };
            match self.exchange(conn, self.request(&uri)?).await {
                Ok((body, back)) => {
                    if let (Some((kept, key)), Some(conn)) = (kept, back) {
                        kept.put(key, conn);
                    }
                    return Ok(body);
                }
                // The agent closed the kept connection as the request went out (its idle
                // timeout, a restart): once more on a new one. GET is idempotent.
                Err(Exchange::BeforeAnswer(_)) if reused => {}
                Err(Exchange::BeforeAnswer(e) | Exchange::Failed(e)) => return Err(e),
            }
        }
    }

    async fn connect(&self, uri: hyper::Uri) -> Result<Io, ScrapeError> {
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| tower_service::Service::poll_ready(&mut connector, cx))
            .await
            .map_err(|e| request_error(e.as_ref()))?;
        tower_service::Service::call(&mut connector, uri)
            .await
            .map_err(|e| request_error(e.as_ref()))
    }

    /// The scrape's request, in origin form with a Host header (as a browser sends it).
    fn request(&self, uri: &hyper::Uri) -> Result<hyper::Request<Empty<Bytes>>, ScrapeError> {
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let host = uri.authority().map_or("", |a| a.as_str());
        let mut req = hyper::Request::get(path)
            .header(hyper::header::HOST, host)
            .header("accept", "text/plain;version=0.0.4")
            .header("accept-encoding", "identity")
            .header(
                "user-agent",
                concat!("commitmeter/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(auth) = &self.authorization {
            req = req.header(hyper::header::AUTHORIZATION, auth.clone());
        }
        req.body(Empty::new())
            .map_err(|e| ScrapeError::Connect(e.to_string()))
    }

    /// One request on `conn`: the body, and the connection back when the agent keeps it
    /// open (HTTP/1.1 without `Connection: close`, nothing left unread).
    async fn exchange(
        &self,
        conn: Io,
        req: hyper::Request<Empty<Bytes>>,
    ) -> Result<(Body, Option<Io>), Exchange> {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(conn)
            .await
            .map_err(|e| Exchange::Failed(request_error(&e)))?;
        // The connection is driven on a task of its own; dropping the guard (an error, the
        // scrape's timeout) aborts it and closes the socket.
        let mut driver = Driver(tokio::spawn(connection.without_shutdown()));
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| Exchange::BeforeAnswer(request_error(&e)))?;
        let reusable = resp.version() == hyper::Version::HTTP_11
            && !resp
                .headers()
                .get_all(hyper::header::CONNECTION)
                .iter()
                .any(|v| {
                    String::from_utf8_lossy(v.as_bytes())
                        .split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case("close"))
                });
        let body = self.read(resp).await.map_err(Exchange::Failed)?;
        drop(sender);
        let back = match (&mut driver.0).await {
            Ok(Ok(parts)) if reusable && parts.read_buf.is_empty() => Some(parts.io),
            _ => None,
        };
        Ok((body, back))
    }

    /// The answer's body, within the body limit and the shared budget.
    async fn read(
        &self,
        resp: hyper::Response<hyper::body::Incoming>,
    ) -> Result<Body, ScrapeError> {
        if !resp.status().is_success() {
            return Err(ScrapeError::Status(resp.status().as_u16()));
        }
        check_encoding(resp.headers())?;
        let declared = resp
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        if declared.is_some_and(|n| n > self.body_limit) {
            return Err(ScrapeError::TooLarge(self.body_limit));
        }
        let mut body = resp.into_body();
        let mut out = Body {
            bytes: Vec::with_capacity(declared.unwrap_or(0).min(FREE_BODY_BYTES)),
            _budget: None,
        };
        let mut held_kib = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                if tls::is_tls_error(&e) {
                    ScrapeError::Tls(error_chain(&e))
                } else {
                    ScrapeError::Body(error_chain(&e))
                }
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let len = out.bytes.len() + data.len();
            if len > self.body_limit {
                return Err(ScrapeError::TooLarge(self.body_limit));
            }
            if len > out.bytes.capacity() {
                // Grow as Vec would (doubling), or to the declared length, and take that
                // capacity from the budget before allocating it.
                let cap = declared
                    .filter(|&d| d >= len)
                    .unwrap_or(len.max(out.bytes.capacity() * 2))
                    .min(self.body_limit);
                let need_kib = cap.saturating_sub(FREE_BODY_BYTES).div_ceil(1024);
                if need_kib > held_kib {
                    let more = u32::try_from(need_kib - held_kib)
                        .map_err(|_| ScrapeError::TooLarge(self.body_limit))?;
                    let permit = self
                        .budget
                        .kib
                        .clone()
                        .acquire_many_owned(more)
                        .await
                        .map_err(|_| ScrapeError::Body("body budget closed".into()))?;
                    match &mut out._budget {
                        Some(p) => p.merge(permit),
                        None => out._budget = Some(permit),
                    }
                    held_kib = need_kib;
                }
                out.bytes.reserve_exact(cap - out.bytes.len());
            }
            out.bytes.extend_from_slice(&data);
        }
        Ok(out)
    }
}

fn parse_body(bytes: &[u8]) -> Result<HostReport, ScrapeError> {
    let text = std::str::from_utf8(bytes).map_err(|e| utf8_error(bytes, e))?;
    host_report(text)
}

/// Why a request got no response: TLS, a response head over hyper's limit, or else the
/// connection (refused, reset, closed early, not HTTP).
fn request_error(e: &(dyn std::error::Error + 'static)) -> ScrapeError {
    if tls::is_tls_error(e) {
        return ScrapeError::Tls(error_chain(e));
    }
    let mut next = Some(e);
    while let Some(err) = next {
        if err
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse_too_large)
        {
            return ScrapeError::HeadTooLarge;
        }
        next = err.source();
    }
    ScrapeError::Connect(error_chain(e))
}

/// Refuses a body in an encoding other than identity: decoding it is not ours to do, and
/// reading gzip as text would only report "invalid UTF-8".
fn check_encoding(headers: &hyper::HeaderMap) -> Result<(), ScrapeError> {
    for value in headers.get_all(hyper::header::CONTENT_ENCODING) {
        let value = String::from_utf8_lossy(value.as_bytes());
        let encoding = value.trim();
        if !encoding.is_empty() && !encoding.eq_ignore_ascii_case("identity") {
            let mut shown: String = encoding.chars().take(40).collect();
            if shown.len() < encoding.len() {
                shown.push('…');
            }
            return Err(ScrapeError::Encoded(shown));
        }
    }
    Ok(())
}

/// A body that is not UTF-8: gzip (by its magic bytes, sent without `Content-Encoding`)
/// is named as such, anything else reported with the offset of the first bad byte.
fn utf8_error(body: &[u8], e: std::str::Utf8Error) -> ScrapeError {
    if body.starts_with(&[0x1f, 0x8b]) {
        ScrapeError::Encoded("gzip".into())
    } else {
        ScrapeError::Body(format!("not UTF-8: {e}"))
    }
}

/// `e` and its sources joined by ": ", leaving out a source whose message the previous one
/// already contains (many errors print their cause themselves).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut last = s.clone();
    let mut src = e.source();
    while let Some(inner) = src {
        let m = inner.to_string();
        if !last.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        last = m;
        src = inner.source();
    }
    s
}

const OBSERVED: &str = "commitmeter_gpu_observed_seconds_total";
const BUSY: &str = "commitmeter_gpu_busy_seconds_total";
const ALLOCATED: &str = "commitmeter_gpu_allocated_seconds_total";
const SM_ACTIVE: &str = "commitmeter_gpu_sm_active_seconds_total";
const ALLOCATED_BUSY: &str = "commitmeter_gpu_allocated_busy_seconds_total";
const ALLOCATED_SM_ACTIVE: &str = "commitmeter_gpu_allocated_sm_active_seconds_total";
const INFO: &str = "commitmeter_gpu_info";
const ROUND: &str = "commitmeter_agent_last_round_timestamp_seconds";
const SAMPLED: &str = "commitmeter_agent_sampled_seconds_total";
const START: &str = "process_start_time_seconds";
const XID: &str = "commitmeter_gpu_xid_errors_total";
const XID_LABEL: &str = "xid";
const OWNER_ALLOCATED: &str = owner::series::ALLOCATED;
const OWNER_BUSY: &str = owner::series::BUSY;
const OWNER_SM_ACTIVE: &str = owner::series::SM_ACTIVE;
/// The labels the aggregator reads from the agent's per-GPU series, by name (labels are
/// looked up through [`parse::Sample::label`], never by position): a GPU's `uuid`
/// ([`GpuLabels`](crate::agent::metrics::GpuLabels)) and its `model`
/// ([`GpuInfoLabels`](crate::agent::metrics::GpuInfoLabels)).
const UUID_LABEL: &str = "uuid";
const MODEL_LABEL: &str = "model";

/// Seconds to whole ms, if the value can be a counter or clock reading at all.
fn to_ms(name: &str, uuid: &str, value: f64, max: f64) -> Result<i64, ScrapeError> {
    if value.is_finite() && (0.0..=max).contains(&value) {
        Ok(crate::ledger::host::ms_from_seconds(value))
    } else {
        let of = if uuid.is_empty() {
            String::new()
        } else {
            format!(" of GPU {uuid}")
        };
        Err(ScrapeError::Invalid(format!("{name}{of} = {value}")))
    }
}

/// The accounting series of an agent's exposition. Anything that cannot be a real
/// agent's (a non-finite, negative or absurd value, the same series twice, more GPUs than
/// a host has) fails the whole scrape with a reason: the target is then unreported, and
/// nothing it said reaches the ledger.
pub fn host_report(text: &str) -> Result<HostReport, ScrapeError> {
    let mut report = HostReport::default();
    let mut models: BTreeMap<String, String> = BTreeMap::new();
    let mut seen: std::collections::HashSet<(&'static str, String)> = Default::default();
    // Per GPU UUID, its owners (bounded: see `owner_sample`); per (series, GPU, owner),
    // seen once.
    let mut owners: BTreeMap<String, BTreeMap<String, OwnerReport>> = BTreeMap::new();
    let mut owners_seen: std::collections::HashSet<(&'static str, String, String)> =
        Default::default();
    let mut failed: Option<ScrapeError> = None;
    parse::parse(
        text,
        |name| {
            (name.starts_with("commitmeter_") || name == START)
                && matches!(
                    name,
                    OBSERVED
                        | BUSY
                        | ALLOCATED
                        | SM_ACTIVE
                        | ALLOCATED_BUSY
                        | ALLOCATED_SM_ACTIVE
                        | INFO
                        | ROUND
                        | SAMPLED
                        | START
                        | XID
                        | OWNER_ALLOCATED
                        | OWNER_BUSY
                        | OWNER_SM_ACTIVE
                )
        },
        |s| {
            if failed.is_some() {
                return;
            }
            if s.name == XID {
                let (Some(uuid), Some(code)) = (s.label(UUID_LABEL), s.label(XID_LABEL)) else {
                    return;
                };
                let ok = s.value.is_finite() && (0.0..MAX_COUNTER_SECONDS).contains(&s.value);
                let codes = report.xids.entry(uuid.to_string()).or_default();
                if ok && code.len() <= 16 && codes.len() < MAX_XID_CODES_PER_GPU {
                    codes.insert(code.to_string(), s.value as u64);
                }
                return;
            }
            if let Some(name) = [OWNER_ALLOCATED, OWNER_BUSY, OWNER_SM_ACTIVE]
                .into_iter()
                .find(|n| *n == s.name)
            {
                if let Err(e) = owner_sample(name, &s, &mut owners, &mut owners_seen) {
                    failed = Some(e);
                }
                return;
            }
            let name: &'static str = match s.name {
                OBSERVED => OBSERVED,
                BUSY => BUSY,
                ALLOCATED => ALLOCATED,
                SM_ACTIVE => SM_ACTIVE,
                ALLOCATED_BUSY => ALLOCATED_BUSY,
                ALLOCATED_SM_ACTIVE => ALLOCATED_SM_ACTIVE,
                INFO => INFO,
                ROUND => ROUND,
                SAMPLED => SAMPLED,
                _ => START,
            };
            let uuid = s.label(UUID_LABEL).unwrap_or("");
            if !seen.insert((name, uuid.to_string())) {
                let of = if uuid.is_empty() {
                    String::new()
                } else {
                    format!("{{uuid={uuid:?}}}")
                };
                failed = Some(ScrapeError::Duplicate(format!("{name}{of}")));
                return;
            }
            let result = match name {
                ROUND => to_ms(name, "", s.value, MAX_TIMESTAMP_SECONDS)
                    .map(|v| report.round_ms = Some(v)),
                START => to_ms(name, "", s.value, MAX_TIMESTAMP_SECONDS)
                    .map(|v| report.start_ms = Some(v)),
                SAMPLED => to_ms(name, "", s.value, MAX_COUNTER_SECONDS)
                    .map(|v| report.sampled_ms = Some(v)),
                _ if uuid.is_empty() => Ok(()),
                INFO => {
                    if let Some(model) = s.label(MODEL_LABEL) {
                        models.insert(uuid.to_string(), model.to_string());
                    }
                    Ok(())
                }
                _ => to_ms(name, uuid, s.value, MAX_COUNTER_SECONDS).map(|v| {
                    let g = report.gpus.entry(uuid.to_string()).or_default();
                    match name {
                        OBSERVED => g.observed_ms = v,
                        BUSY => g.busy_ms = Some(v),
                        ALLOCATED => g.allocated_ms = Some(v),
                        SM_ACTIVE => g.sm_active_ms = Some(v),
                        ALLOCATED_BUSY => g.allocated_busy_ms = Some(v),
                        _ => g.allocated_sm_active_ms = Some(v),
                    }
                }),
            };
            if let Err(e) = result {
                failed = Some(e);
            }
        },
    )?;
    if let Some(e) = failed {
        return Err(e);
    }
    report
        .gpus
        .retain(|uuid, _| seen.contains(&(OBSERVED, uuid.clone())));
    let gpus = &report.gpus;
    report
        .xids
        .retain(|uuid, codes| gpus.contains_key(uuid) && !codes.is_empty());
    if report.gpus.len() > MAX_GPUS_PER_TARGET {
        return Err(ScrapeError::TooManyGpus(report.gpus.len()));
    }
    for (uuid, model) in models {
        if let Some(g) = report.gpus.get_mut(&uuid) {
            g.model = Some(model);
        }
    }
    for (uuid, o) in owners {
        if let Some(g) = report.gpus.get_mut(&uuid) {
            g.owners = o;
        }
    }
    Ok(report)
}

/// One sample of an owner series (`name`): its value checked as any counter's (a
/// non-finite, negative or absurd one fails the scrape), a series seen twice is a
/// duplicate; then kept under its GPU and owner. A GPU keeps the [`MAX_OWNERS_PER_GPU`]
/// owners with the smallest keys: an owner pushed out is never taken back (as many
/// smaller keys stay), so a kept owner has all its series, and memory stays bounded
/// whatever the exposition holds. Owner series of more GPUs than a host has are ignored.
fn owner_sample(
    name: &'static str,
    s: &parse::Sample<'_>,
    owners: &mut BTreeMap<String, BTreeMap<String, OwnerReport>>,
    seen: &mut std::collections::HashSet<(&'static str, String, String)>,
) -> Result<(), ScrapeError> {
    let uuid = s.label(UUID_LABEL).unwrap_or("");
    let o = Owner::from_labels(|n| s.label(n));
    let key = o.key();
    if !seen.insert((name, uuid.to_string(), key.clone())) {
        return Err(ScrapeError::Duplicate(format!(
            "{name}{{uuid={uuid:?},owner={:?}}}",
            o.id
        )));
    }
    let v = to_ms(name, uuid, s.value, MAX_COUNTER_SECONDS)?;
    if uuid.is_empty() || (!owners.contains_key(uuid) && owners.len() >= MAX_GPUS_PER_TARGET) {
        return Ok(());
    }
    let of_gpu = owners.entry(uuid.to_string()).or_default();
    let r = of_gpu.entry(key).or_insert_with(|| OwnerReport {
        owner: o,
        ..OwnerReport::default()
    });
    match name {
        OWNER_ALLOCATED => r.allocated_ms = Some(v),
        OWNER_BUSY => r.busy_ms = Some(v),
        _ => r.sm_active_ms = Some(v),
    }
    if of_gpu.len() > MAX_OWNERS_PER_GPU {
        of_gpu.pop_last();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pooled connection is kept only when the next scrape can reuse it, before the
    /// agent closes it.
    #[test]
    fn an_idle_connection_is_pooled_only_when_the_next_scrape_comes_before_it_is_dropped() {
        assert_eq!(POOL_IDLE, Duration::from_secs(240));
        assert!(POOL_IDLE < crate::http::KEEPALIVE_IDLE_TIMEOUT);
        assert!(keeps_connections(Duration::from_secs(1)));
        assert!(keeps_connections(Duration::from_secs(15)));
        assert!(keeps_connections(Duration::from_secs(239)));
        assert!(!keeps_connections(POOL_IDLE));
        assert!(!keeps_connections(Duration::from_secs(300)));
    }

    #[test]
    fn the_labels_read_are_the_agents() {
        use crate::agent::metrics::{GpuInfoLabels, GpuLabels};
        use crate::labels::LabelSet;
        assert!(GpuLabels::NAMES.contains(&UUID_LABEL));
        assert!(GpuInfoLabels::NAMES.contains(&UUID_LABEL));
        assert!(GpuInfoLabels::NAMES.contains(&MODEL_LABEL));
    }

    #[test]
    fn reads_the_accounting_series_of_an_agent() {
        let text = r#"# HELP commitmeter_gpu_info GPU identity
# TYPE commitmeter_gpu_info gauge
commitmeter_gpu_info{busy_source="samples",gpu="0",model="NVIDIA H100 80GB HBM3",pci_bus_id="00000000:17:00.0",uuid="GPU-a"} 1
commitmeter_gpu_observed_seconds_total{gpu="0",uuid="GPU-a"} 100.5
commitmeter_gpu_busy_seconds_total{gpu="0",uuid="GPU-a"} 50.0004
commitmeter_gpu_allocated_seconds_total{gpu="0",uuid="GPU-a"} 70
commitmeter_gpu_sm_active_seconds_total{gpu="0",uuid="GPU-a"} 20.25
commitmeter_gpu_allocated_busy_seconds_total{gpu="0",uuid="GPU-a"} 45
commitmeter_gpu_allocated_sm_active_seconds_total{gpu="0",uuid="GPU-a"} 18
commitmeter_gpu_allocated_busy_seconds_total{gpu="1",uuid="GPU-b"} 1
commitmeter_gpu_observed_seconds_total{gpu="1",uuid="GPU-b"} 3
commitmeter_gpu_power_watts{gpu="0",uuid="GPU-a"} 300
commitmeter_gpu_xid_errors_total{gpu="0",uuid="GPU-a",xid="79"} 2
commitmeter_gpu_xid_errors_total{gpu="0",uuid="GPU-a",xid="48"} NaN
commitmeter_gpu_xid_errors_total{gpu="9",uuid="GPU-z",xid="79"} 1
commitmeter_agent_last_round_timestamp_seconds 1764547200.123
commitmeter_agent_sampled_seconds_total 100.5
process_start_time_seconds 1764547000.01
"#;
        let r = host_report(text).unwrap();
        assert_eq!(
            r.gpus["GPU-a"],
            GpuReport {
                observed_ms: 100_500,
                busy_ms: Some(50_000),
                allocated_ms: Some(70_000),
                sm_active_ms: Some(20_250),
                allocated_busy_ms: Some(45_000),
                allocated_sm_active_ms: Some(18_000),
                model: Some("NVIDIA H100 80GB HBM3".into()),
                owners: BTreeMap::new(),
            }
        );
        // A GPU without GPM has no SM-active series: none, never a made-up 0.
        assert_eq!(
            (r.gpus["GPU-b"].busy_ms, r.gpus["GPU-b"].sm_active_ms),
            (None, None)
        );
        assert_eq!(r.gpus["GPU-b"].allocated_busy_ms, Some(1_000));
        // XID counts of known GPUs; a malformed one is left out, not fatal.
        assert_eq!(
            r.xids,
            BTreeMap::from([("GPU-a".to_string(), BTreeMap::from([("79".to_string(), 2)]))])
        );
        assert_eq!(
            (r.round_ms, r.sampled_ms, r.start_ms),
            (
                Some(1_764_547_200_123),
                Some(100_500),
                Some(1_764_547_000_010)
            )
        );
        assert!(host_report("commitmeter_gpu_busy_seconds_total{uuid=\"x} 1\n").is_err());
    }

    #[test]
    fn reads_each_gpus_owners_bounded_and_checked_like_the_other_counters() {
        use crate::owner::OwnerKind;
        let line = |name: &str, uuid: &str, job: &str, v: &str| {
            format!(
                "{name}{{gpu=\"0\",uuid=\"{uuid}\",owner_kind=\"slurm_job\",owner=\"{job}\",\
                 user=\"bob\",account=\"vision\",namespace=\"\",pod=\"\"}} {v}\n"
            )
        };
        let gpu = |uuid: &str| format!("{OBSERVED}{{gpu=\"0\",uuid=\"{uuid}\"}} 100\n");
        let text = gpu("GPU-a")
            + &line(OWNER_ALLOCATED, "GPU-a", "42", "60.0004")
            + &line(OWNER_BUSY, "GPU-a", "42", "30")
            + &line(OWNER_SM_ACTIVE, "GPU-a", "42", "12.5")
            + &line(OWNER_ALLOCATED, "GPU-a", "43", "1")
            // Owners of a GPU without an observed counter are not a GPU's.
            + &line(OWNER_ALLOCATED, "GPU-z", "42", "1")
            + "commitmeter_gpu_owner_info{gpu=\"0\",uuid=\"GPU-a\",owner=\"42\"} 1\n";
        let r = host_report(&text).unwrap();
        assert_eq!(r.gpus.len(), 1);
        let owners: Vec<&OwnerReport> = r.gpus["GPU-a"].owners.values().collect();
        assert_eq!(owners.len(), 2);
        let o = owners.iter().find(|o| o.owner.id == "42").unwrap();
        assert_eq!(
            (
                o.owner.kind,
                o.owner.user.as_str(),
                o.owner.account.as_str()
            ),
            (OwnerKind::SlurmJob, "bob", "vision")
        );
        assert_eq!(
            (o.allocated_ms, o.busy_ms, o.sm_active_ms),
            (Some(60_000), Some(30_000), Some(12_500))
        );
        assert_eq!(r.gpus["GPU-a"].owners[&o.owner.key()], **o);
        // Invalid values fail the scrape as any counter's do; a duplicate series too.
        let reason = |text: &str| host_report(text).unwrap_err().reason();
        for v in ["NaN", "-1", "+Inf", "1e17"] {
            for name in [OWNER_ALLOCATED, OWNER_BUSY, OWNER_SM_ACTIVE] {
                assert_eq!(
                    reason(&(gpu("GPU-a") + &line(name, "GPU-a", "42", v))),
                    "invalid_value",
                    "{name} {v}"
                );
            }
        }
        let twice = gpu("GPU-a")
            + &line(OWNER_BUSY, "GPU-a", "42", "1")
            + &line(OWNER_BUSY, "GPU-a", "42", "2");
        assert_eq!(reason(&twice), "duplicate_series");
        // Many owners never fail the scrape: the smallest keys are kept, each whole.
        let mut many = gpu("GPU-a");
        for i in 0..MAX_OWNERS_PER_GPU + 50 {
            many += &line(OWNER_ALLOCATED, "GPU-a", &format!("j{i:04}"), "1");
        }
        for i in (0..MAX_OWNERS_PER_GPU + 50).rev() {
            many += &line(OWNER_BUSY, "GPU-a", &format!("j{i:04}"), "1");
        }
        let r = host_report(&many).unwrap();
        let kept = &r.gpus["GPU-a"].owners;
        assert_eq!(kept.len(), MAX_OWNERS_PER_GPU);
        assert!(kept
            .values()
            .all(|o| o.allocated_ms.is_some() && o.busy_ms.is_some()));
        let ids: Vec<&str> = kept.values().map(|o| o.owner.id.as_str()).collect();
        assert_eq!(ids.first(), Some(&"j0000"));
        assert_eq!(
            ids.last(),
            Some(&format!("j{:04}", MAX_OWNERS_PER_GPU - 1).as_str())
        );
    }

    #[test]
    fn encoded_bodies_and_repeated_causes() {
        let mut h = hyper::HeaderMap::new();
        assert!(check_encoding(&h).is_ok());
        h.insert("content-encoding", HeaderValue::from_static("identity"));
        assert!(check_encoding(&h).is_ok());
        h.insert("content-encoding", HeaderValue::from_static("gzip"));
        let e = check_encoding(&h).unwrap_err();
        assert_eq!(e.reason(), "body");
        assert_eq!(
            e.to_string(),
            "response is gzip-encoded; the aggregator asks for identity"
        );
        // gzip sent without a header is named by its magic bytes, not "invalid UTF-8".
        let gz = vec![0x1f, 0x8b, 0x08, 0x00, 0xff, 0xfe];
        let e = utf8_error(&gz, std::str::from_utf8(&gz).unwrap_err());
        assert_eq!(e.reason(), "body");
        assert!(e.to_string().contains("gzip-encoded"), "{e}");
        let bad = b"m 1\n\xff".to_vec();
        let e = utf8_error(&bad, std::str::from_utf8(&bad).unwrap_err());
        assert!(e.to_string().starts_with("reading body: not UTF-8"), "{e}");
        assert!(ScrapeError::REASONS.contains(&ScrapeError::HeadTooLarge.reason()));

        // A source whose message its parent already printed is not printed again.
        #[derive(Debug, thiserror::Error)]
        #[error("outer: {0}")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("disk on fire"));
        assert_eq!(error_chain(&e), "outer: disk on fire");
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Plain(#[source] std::io::Error);
        let e = Plain(std::io::Error::other("disk on fire"));
        assert_eq!(error_chain(&e), "outer: disk on fire");
    }

    #[test]
    fn hostile_expositions_fail_the_scrape_with_a_reason() {
        let reason = |text: &str| host_report(text).unwrap_err().reason();
        let g = |name: &str, v: &str| format!("{name}{{gpu=\"0\",uuid=\"GPU-a\"}} {v}\n");
        for v in ["NaN", "+Inf", "-Inf", "-1", "1e300", "1e17"] {
            assert_eq!(reason(&g(OBSERVED, v)), "invalid_value", "{v}");
            for name in [
                BUSY,
                ALLOCATED,
                SM_ACTIVE,
                ALLOCATED_BUSY,
                ALLOCATED_SM_ACTIVE,
            ] {
                assert_eq!(reason(&g(name, v)), "invalid_value", "{name} {v}");
            }
        }
        for name in [SM_ACTIVE, ALLOCATED_BUSY, ALLOCATED_SM_ACTIVE] {
            assert_eq!(reason(&(g(name, "1") + &g(name, "2"))), "duplicate_series");
        }
        assert_eq!(reason(&format!("{ROUND} NaN\n")), "invalid_value");
        let twice = g(OBSERVED, "1") + &g(OBSERVED, "100");
        assert_eq!(reason(&twice), "duplicate_series");
        assert_eq!(
            reason(&format!("{ROUND} 1\n{ROUND} 2\n")),
            "duplicate_series"
        );
        let many: String = (0..=MAX_GPUS_PER_TARGET)
            .map(|i| format!("{OBSERVED}{{uuid=\"GPU-{i}\"}} 1\n"))
            .collect();
        assert_eq!(reason(&many), "too_many_gpus");
        // A series without a counter does not make a GPU.
        let r = host_report(&g(BUSY, "5")).unwrap();
        assert!(r.gpus.is_empty());
    }
}
