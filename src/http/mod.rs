//! A small HTTP/1.1 server shared by both roles: fixed routes, GET/HEAD only,
//! header-read timeout against slow clients, one task per connection; TLS and basic
//! auth when a web config file asks for them.

pub mod auth;
pub mod tls;
pub mod webconfig;

pub use webconfig::{WebConfig, WebConfigError};

use std::convert::Infallible;
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("--web.listen-address {addr:?}: {reason}")]
    Address { addr: String, reason: String },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A route's answer: built synchronously from in-memory state.
pub type Handler = Arc<dyn Fn(&str) -> Option<Response<Full<Bytes>>> + Send + Sync>;

/// Parses an exporter-style listen address: `:9473` (all IPv4 interfaces),
/// `127.0.0.1:9473`, `[::1]:9473` or `localhost:9473`.
pub fn parse_listen_address(addr: &str) -> Result<SocketAddr, HttpError> {
    let bad = |reason: &str| HttpError::Address {
        addr: addr.to_string(),
        reason: reason.to_string(),
    };
    let full = if addr.starts_with(':') {
        format!("0.0.0.0{addr}")
    } else {
        addr.to_string()
    };
    if let Ok(a) = full.parse::<SocketAddr>() {
        return Ok(a);
    }
    if !full.contains(':') {
        return Err(bad("expected HOST:PORT or :PORT"));
    }
    full.to_socket_addrs()
        .map_err(|e| bad(&e.to_string()))?
        .next()
        .ok_or_else(|| bad("host name resolves to no address"))
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })
}

pub fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// Scrapers and browsers send a few hundred bytes of headers; anything far larger is
/// refused before it reaches a handler.
const MAX_HEADER_BYTES: usize = 16 * 1024;

fn respond(handler: &Handler, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + req.uri().to_string().len();
    if header_bytes > MAX_HEADER_BYTES {
        let mut r = text(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "text/plain",
            "request headers too large\n",
        );
        r.headers_mut()
            .insert("connection", HeaderValue::from_static("close"));
        return r;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n",
        );
        r.headers_mut()
            .insert("allow", HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    handler(req.uri().path())
        .unwrap_or_else(|| text(StatusCode::NOT_FOUND, "text/plain", "not found\n"))
}

/// `/metrics`: a registry in the Prometheus text format (both roles and the demo's
/// simulated agents).
pub fn metrics(registry: &prometheus::Registry) -> Response<Full<Bytes>> {
    use prometheus::Encoder;
    let mut buf = Vec::with_capacity(16 * 1024);
    match prometheus::TextEncoder::new().encode(&registry.gather(), &mut buf) {
        Ok(()) => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            buf,
        ),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode metrics");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{e}\n"),
            )
        }
    }
}

/// What a request without valid credentials gets, as from exporter-toolkit.
fn unauthorized() -> Response<Full<Bytes>> {
    let mut r = text(StatusCode::UNAUTHORIZED, "text/plain", "Unauthorized\n");
    r.headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Basic"));
    r
}

/// The same limit as for reading request headers: a client that stalls the handshake
/// holds a task and a socket, nothing more, and not for long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Plain, open HTTP until `shutdown` completes.
pub async fn serve(listener: TcpListener, handler: Handler, shutdown: impl Future<Output = ()>) {
    serve_with(listener, handler, WebConfig::default(), shutdown).await
}

/// Serves until `shutdown` completes, with the TLS and basic auth of `web`. Every path
/// needs credentials when users are configured, health checks included, as in
/// exporter-toolkit. Connection and handshake errors are logged at debug level: a
/// scraper hanging up, or speaking plain HTTP to the TLS port, is its own problem.
pub async fn serve_with(
    listener: TcpListener,
    handler: Handler,
    web: WebConfig,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    // On shutdown: stop accepting, let requests in flight finish (idle keep-alive
    // connections close at once), and give up on stragglers after DRAIN_TIMEOUT.
    let (drain, draining) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (handler, web, draining) = (handler.clone(), web.clone(), draining.clone());
        connections.spawn(async move {
            let Some(acceptor) = &web.tls else {
                return connection(TokioIo::new(stream), handler, web.auth, peer, draining).await;
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    connection(TokioIo::new(tls), handler, web.auth, peer, draining).await
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
    drop(listener);
    let _ = drain.send(true);
    let open = connections.len();
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.len(),
            "closing connections that did not finish in time"
        );
        connections.abort_all();
    } else if open > 0 {
        tracing::debug!(connections = open, "connections drained");
    }
}

/// How long shutdown waits for requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// One HTTP/1.1 connection, plain or TLS.
async fn connection<I>(
    io: I,
    handler: Handler,
    auth: Option<Arc<auth::BasicAuth>>,
    peer: SocketAddr,
    mut draining: tokio::sync::watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let (handler, auth) = (handler.clone(), auth.clone());
        async move {
            if let Some(auth) = auth {
                if !auth.check(req.headers().get(AUTHORIZATION)).await {
                    return Ok::<_, Infallible>(unauthorized());
                }
            }
            Ok(respond(&handler, &req))
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_buf_size(64 * 1024)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = async { draining.wait_for(|d| *d).await.map(|_| ()) } => {
            // Finish the request in flight, if any, then close.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection closed with error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_in_exporter_style() {
        assert_eq!(
            parse_listen_address(":9473").unwrap(),
            "0.0.0.0:9473".parse().unwrap()
        );
        assert_eq!(
            parse_listen_address("127.0.0.1:1").unwrap(),
            "127.0.0.1:1".parse().unwrap()
        );
        assert_eq!(
            parse_listen_address("[::1]:2").unwrap(),
            "[::1]:2".parse().unwrap()
        );
        assert!(parse_listen_address("localhost:3")
            .unwrap()
            .ip()
            .is_loopback());
        assert!(parse_listen_address("9473").is_err());
        assert!(parse_listen_address(":99999").is_err());
    }
}
