//! A small HTTP/1.1 server shared by both roles: fixed routes, GET/HEAD only,
//! header-read timeout against slow clients, one task per connection, a bound on open
//! connections below the descriptor limit; TLS and basic auth when a web config file asks
//! for them. Routes are async [`Handler`]s; the request limits (header size, method, body
//! size, timeout) are layers around every one of them (see [`layers`]).

pub mod auth;
pub mod conns;
mod deadlines;
use deadlines::Deadlines;
pub use deadlines::KEEPALIVE_IDLE_TIMEOUT;
pub mod layers;
pub mod tls;
pub mod webconfig;

pub use conns::ServerMetrics;
pub use layers::{handler, Answer, Handler, Reply};
pub use webconfig::{WebConfig, WebConfigFile};

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{
    HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket};

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

/// Parses an exporter-style listen address: `:9473` (every interface, IPv6 and IPv4:
/// `[::]:9473`, bound dual-stack by [`bind`]), `127.0.0.1:9473`, `[::1]:9473` or
/// `localhost:9473`.
pub fn parse_listen_address(addr: &str) -> Result<SocketAddr, HttpError> {
    let bad = |reason: &str| HttpError::Address {
        addr: addr.to_string(),
        reason: reason.to_string(),
    };
    let full = if addr.starts_with(':') {
        format!("[::]{addr}")
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

/// How many connections the kernel queues before they are accepted (capped by
/// `net.core.somaxconn`). Every listener asks for it: `TcpListener::bind` asks for 128
/// (mio 1, as Rust's std), and a burst of more new connections than that, arriving
/// faster than they are accepted, has its SYNs dropped, each client then waiting a
/// second or more to retry, a scraper among them.
const BACKLOG: u32 = 1024;

/// Binds `addr`. The first bind in a process also raises its descriptor limit (see
/// [`conns::fd_limit`]), before anything opens many.
///
/// The IPv6 unspecified address (`[::]:PORT`, what `:PORT` means) listens on IPv6 and
/// IPv4 at once, with `IPV6_V6ONLY` off whatever the system default, as a Go exporter's
/// `:PORT` does. Where IPv6 is unavailable (disabled in the kernel) it falls back to
/// `0.0.0.0:PORT`, and says so in the log. Any other address is bound as written.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, HttpError> {
    conns::fd_limit();
    if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
        match listen(addr, true) {
            Ok(listener) => return Ok(listener),
            Err(source) if !ipv6_unavailable(&source) => {
                return Err(HttpError::Bind { addr, source });
            }
            Err(error) => {
                let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port());
                tracing::info!(
                    %error,
                    address = %v4,
                    "IPv6 is unavailable here; listening on IPv4 only"
                );
                return listen(v4, false).map_err(|source| HttpError::Bind { addr: v4, source });
            }
        }
    }
    listen(addr, false).map_err(|source| HttpError::Bind { addr, source })
}

/// `addr` bound as written, listening with [`BACKLOG`]; with `dual_stack` (`[::]:PORT`),
/// `IPV6_V6ONLY` off: IPv4 clients arrive as IPv4-mapped addresses.
fn listen(addr: SocketAddr, dual_stack: bool) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if dual_stack {
        socket2::SockRef::from(&socket).set_only_v6(false)?;
    }
    // As TcpListener::bind does on Unix: a restart need not wait out TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Whether a failed dual-stack bind means "no IPv6 here" (no IPv6 sockets, no IPv6
/// address, the option refused), so that IPv4 alone is worth trying. A port that is taken,
/// or not ours to take, would fail the same way on IPv4: that is reported as it is.
fn ipv6_unavailable(e: &std::io::Error) -> bool {
    !matches!(
        e.kind(),
        std::io::ErrorKind::AddrInUse | std::io::ErrorKind::PermissionDenied
    )
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

/// A plain-text refusal with one header that says what to do about it.
fn refusal(
    status: StatusCode,
    body: impl Into<Bytes>,
    header: hyper::header::HeaderName,
    value: &'static str,
) -> Response<Full<Bytes>> {
    let mut r = text(status, "text/plain", body);
    r.headers_mut()
        .insert(header, HeaderValue::from_static(value));
    r
}

/// What a request without valid credentials gets, as from exporter-toolkit.
fn unauthorized() -> Response<Full<Bytes>> {
    refusal(
        StatusCode::UNAUTHORIZED,
        "Unauthorized\n",
        WWW_AUTHENTICATE,
        "Basic",
    )
}

/// What a request gets, at once, when the bcrypt queue is full: the credentials were not
/// checked, so it says neither yes nor no.
fn too_many_requests() -> Response<Full<Bytes>> {
    refusal(
        StatusCode::TOO_MANY_REQUESTS,
        "Too Many Requests: credentials are being checked for other clients; retry\n",
        RETRY_AFTER,
        "1",
    )
}

/// A request still waiting for its credentials to be checked when shutdown begins.
fn shutting_down() -> Response<Full<Bytes>> {
    refusal(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting down\n",
        CONNECTION,
        "close",
    )
}

/// The same limit as for reading request headers: a client that stalls the handshake
/// holds a task and a socket, nothing more, and not for long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A client has this long to send a request's headers, counted from their first byte. An
/// idle kept-alive connection waits longer ([`KEEPALIVE_IDLE_TIMEOUT`]); see [`deadlines`].
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How both servers speak HTTP/1.1 on a connection wrapped in [`Deadlines`].
fn http1_builder() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // The read deadlines are `Deadlines`' (hyper's one timer cannot tell an idle
        // connection from a slow request). The idle deadline starts on hyper's first read
        // of an idle connection, which hyper 1.x makes at once (with `half_close` below);
        // hyper's own timer, set past both deadlines, is a backstop should a later hyper
        // wait for readiness instead. The idle-close test through hyper (deadlines.rs)
        // passes with or without it.
        .header_read_timeout(deadlines::HYPER_BACKSTOP)
        .max_buf_size(64 * 1024)
        // A client that half-closes after its request (shutdown(SHUT_WR)) still gets
        // the answer; without this hyper may close first.
        .half_close(true);
    builder
}

/// How long a connection shed to make room may take to finish writing a response it had
/// started: a client that does not read its answer holds the descriptor no longer.
const SHED_GRACE: Duration = Duration::from_secs(5);

/// Accept failures are retried after 5 ms, doubling to 1 s (as Go's net/http does).
fn accept_backoff(failures: u32) -> Duration {
    let ms = 5u64 << failures.saturating_sub(1).min(8);
    Duration::from_millis(ms.min(1000))
}

/// Errors that concern one connection only (it was reset before it was accepted):
/// nothing to back off from.
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    )
}

/// Plain, open HTTP until `shutdown` completes, reporting nowhere (the demo's agents).
pub async fn serve(listener: TcpListener, handler: Handler, shutdown: impl Future<Output = ()>) {
    serve_with(
        listener,
        handler,
        WebConfig::default(),
        ServerMetrics::unregistered(),
        shutdown,
    )
    .await
}

/// Serves until `shutdown` completes, with the TLS and basic auth of `web`. Every path
/// needs credentials when users are configured, health checks included, as in
/// exporter-toolkit. Connection and handshake errors are logged at debug level: a
/// scraper hanging up, or speaking plain HTTP to the TLS port, is its own problem.
///
/// At most [`conns::max_connections`] connections are open (see [`conns`]); a failing
/// `accept` (out of descriptors) closes the longest-idle connection, backs off and is
/// logged once until accepts succeed again.
pub async fn serve_with(
    listener: TcpListener,
    handler: Handler,
    web: WebConfig,
    metrics: ServerMetrics,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let service = layers::stack(handler);
    let fd_limit = conns::fd_limit();
    let tracker = conns::Tracker::new(conns::max_connections(fd_limit), metrics.clone());
    // On shutdown: stop accepting, let requests in flight finish (idle keep-alive
    // connections close at once), and give up on stragglers after DRAIN_TIMEOUT.
    let (drain, draining) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    // Since when, and how often, accept has been failing.
    let mut failing: Option<(std::time::Instant, u32)> = None;
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) if is_per_connection(&e) => {
                tracing::debug!(error = %e, "connection lost before accept");
                continue;
            }
            Err(e) => {
                metrics.accept_errors.inc();
                let (_, failures) = failing.get_or_insert_with(|| {
                    tracing::warn!(
                        error = %e,
                        connections = tracker.open(),
                        max_connections = tracker.max(),
                        fd_limit,
                        "cannot accept connections; retrying with backoff \
                         (logged once until accepts succeed again)"
                    );
                    (crate::clock::monotonic_now(), 0)
                });
                *failures += 1;
                // Out of descriptors: one idle connection closed is one more accepted.
                tracker.shed_one();
                let delay = accept_backoff(*failures);
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        if let Some((since, failures)) = failing.take() {
            tracing::info!(
                failures,
                seconds = crate::clock::elapsed(since).as_secs_f64(),
                "accepting connections again"
            );
        }
        // Connections shed for earlier newcomers may not have closed their sockets yet:
        // wait a little for them rather than refuse a client or run out of descriptors.
        let wait_until = crate::clock::monotonic_now() + Duration::from_secs(1);
        loop {
            let closed = tracker.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if !tracker.saturated() {
                break;
            }
            let left = wait_until.saturating_duration_since(crate::clock::monotonic_now());
            if left.is_zero() || tokio::time::timeout(left, closed).await.is_err() {
                break;
            }
        }
        let at_bound = tracker.open() >= tracker.max();
        let Some(slot) = tracker.admit() else {
            // Every open connection is answering a request: refuse this one at once.
            drop(stream);
            continue;
        };
        let conn = Conn {
            service: service.clone(),
            auth: web.auth.clone(),
            metrics: metrics.clone(),
            slot: Arc::new(slot),
            peer,
            draining: draining.clone(),
        };
        let tls = web.tls.clone();
        connections.spawn(async move {
            let Some(acceptor) = tls else {
                return conn.serve(stream).await;
            };
            let mut draining = conn.draining.clone();
            let handshake = tokio::select! {
                r = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)) => r,
                _ = conn.slot.close.notified() => return,
                _ = draining.wait_for(|d| *d) => return,
            };
            match handshake {
                Ok(Ok(tls)) => conn.serve(tls).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
        if at_bound {
            // Let the shed connection's task close its socket before the next accept, so
            // a flood of new connections cannot outrun the descriptors being freed.
            tokio::task::yield_now().await;
        }
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

/// One accepted connection and what serving it needs.
struct Conn {
    /// The routes inside their layers.
    service: layers::Service,
    auth: Option<Arc<auth::BasicAuth>>,
    metrics: ServerMetrics,
    slot: Arc<conns::Slot>,
    peer: SocketAddr,
    draining: tokio::sync::watch::Receiver<bool>,
}

impl Conn {
    /// Serves HTTP/1.1 on `stream`, plain or TLS, with its read [`Deadlines`], until the
    /// client leaves, the connection is shed (see [`conns`]) or shutdown.
    async fn serve<S>(self, stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Conn {
            service,
            auth,
            metrics,
            slot,
            peer,
            mut draining,
        } = self;
        let io = TokioIo::new(Deadlines::new(stream, slot.turns.clone()));
        let close = slot.close.clone();
        let stop = draining.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let (service, auth, metrics, slot) =
                (service.clone(), auth.clone(), metrics.clone(), slot.clone());
            let mut stop = stop.clone();
            async move {
                let _busy = slot.busy();
                if let Some(auth) = auth {
                    let verdict = tokio::select! {
                        v = auth.check(req.headers().get(AUTHORIZATION)) => v,
                        // A check still queued or hashing never holds up shutdown.
                        _ = stop.wait_for(|d| *d) => return Ok(shutting_down()),
                    };
                    match verdict {
                        auth::Verdict::Allowed => {}
                        auth::Verdict::Denied => {
                            metrics.auth_failures.with_label_values(&["invalid"]).inc();
                            return Ok(unauthorized());
                        }
                        auth::Verdict::Busy => {
                            metrics
                                .auth_failures
                                .with_label_values(&["throttled"])
                                .inc();
                            return Ok(too_many_requests());
                        }
                    }
                }
                // The body is never read (GET and HEAD only): the layers see the head.
                let (head, _body) = req.into_parts();
                Ok::<_, Infallible>(service(Request::from_parts(head, ())).await)
            }
        });
        let conn = http1_builder().serve_connection(io, service);
        tokio::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = async { draining.wait_for(|d| *d).await.map(|_| ()) } => {
                // Finish the request in flight, if any, then close.
                conn.as_mut().graceful_shutdown();
                conn.await
            }
            _ = close.notified() => {
                // Shed to make room: idle, so this closes at once, unless a response is
                // still being written.
                conn.as_mut().graceful_shutdown();
                match tokio::time::timeout(SHED_GRACE, conn).await {
                    Ok(r) => r,
                    Err(_) => return,
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "connection closed with error");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_in_exporter_style() {
        assert_eq!(
            parse_listen_address(":9473").unwrap(),
            "[::]:9473".parse().unwrap()
        );
        // Explicit addresses keep their meaning.
        assert_eq!(
            parse_listen_address("0.0.0.0:9473").unwrap(),
            "0.0.0.0:9473".parse().unwrap()
        );
        assert_eq!(
            parse_listen_address("[::]:9473").unwrap(),
            "[::]:9473".parse().unwrap()
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

    #[test]
    fn only_a_missing_ipv6_falls_back_to_ipv4() {
        use std::io::{Error, ErrorKind};
        // EAFNOSUPPORT (97 on Linux): the kernel was booted with ipv6.disable=1.
        assert!(ipv6_unavailable(&Error::from_raw_os_error(97)));
        assert!(ipv6_unavailable(&Error::from(ErrorKind::AddrNotAvailable)));
        assert!(!ipv6_unavailable(&Error::from(ErrorKind::AddrInUse)));
        assert!(!ipv6_unavailable(&Error::from(ErrorKind::PermissionDenied)));
    }

    /// The layers are around the server's routes, not only in `layers::stack`'s tests.
    #[tokio::test]
    async fn a_listener_queues_a_burst_of_connections_beyond_128() {
        // Nothing accepts: the kernel completes each handshake into the backlog. With
        // TcpListener::bind's 128 the 130th SYN would be dropped and its client wait a
        // second to retry.
        let listener = bind(parse_listen_address("127.0.0.1:0").unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let clients = tokio::task::spawn_blocking(move || {
            (0..600)
                .map(|i| {
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                        .unwrap_or_else(|e| panic!("connection {i}: {e}"))
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
        assert_eq!(clients.len(), 600);
    }

    #[tokio::test]
    async fn the_server_applies_the_layers_to_every_route() {
        let listener = bind(parse_listen_address("127.0.0.1:0").unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let routes = handler(|path: String| async move {
            (path == "/").then(|| text(StatusCode::OK, "text/plain", "home\n"))
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, routes, async {
            let _ = stopped.await;
        }));
        let ask = |raw: String| async move {
            tokio::task::spawn_blocking(move || {
                use std::io::{Read, Write};
                let mut c = std::net::TcpStream::connect(addr).unwrap();
                c.write_all(raw.as_bytes()).unwrap();
                let mut answer = String::new();
                c.read_to_string(&mut answer).unwrap();
                answer
            })
            .await
            .unwrap()
        };
        let close = "Connection: close\r\n";
        let ok = ask(format!("GET / HTTP/1.1\r\nHost: x\r\n{close}\r\n")).await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        let missing = ask(format!("GET /x HTTP/1.1\r\nHost: x\r\n{close}\r\n")).await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = ask(format!("POST / HTTP/1.1\r\nHost: x\r\n{close}\r\n")).await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        // Announces a large body and sends none: refused without waiting for it.
        let big = ask(format!(
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            layers::MAX_BODY_BYTES + 1
        ))
        .await;
        assert!(big.starts_with("HTTP/1.1 413"), "{big}");
        let _ = stop.send(());
        server.await.unwrap();
    }

    /// Whether this machine has an IPv6 loopback to test against.
    fn ipv6_loopback() -> bool {
        std::net::TcpListener::bind("[::1]:0").is_ok()
    }

    #[tokio::test]
    async fn all_interfaces_answer_on_ipv4_and_ipv6() {
        let listener = bind(parse_listen_address(":0").unwrap()).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut reach = vec![SocketAddr::from((Ipv4Addr::LOCALHOST, port))];
        if ipv6_loopback() {
            assert!(listener.local_addr().unwrap().is_ipv6());
            reach.push(SocketAddr::from((Ipv6Addr::LOCALHOST, port)));
        } else {
            eprintln!("no IPv6 loopback on this machine: checking IPv4 only");
        }
        for to in reach {
            let (client, accepted) =
                tokio::join!(tokio::net::TcpStream::connect(to), listener.accept());
            client.unwrap_or_else(|e| panic!("connect to {to}: {e}"));
            accepted.unwrap();
        }
    }

    #[tokio::test]
    async fn explicit_addresses_bind_only_what_they_say() {
        let v4 = bind(parse_listen_address("127.0.0.1:0").unwrap())
            .await
            .unwrap();
        assert!(v4.local_addr().unwrap().is_ipv4());
        if !ipv6_loopback() {
            eprintln!("no IPv6 loopback on this machine: skipping [::1]");
            return;
        }
        let v6 = bind(parse_listen_address("[::1]:0").unwrap())
            .await
            .unwrap();
        assert_eq!(v6.local_addr().unwrap().ip(), Ipv6Addr::LOCALHOST);
    }
}
