//! Two read deadlines for one connection, where hyper has one timer for both.
//!
//! hyper's `header_read_timeout` starts when the server is ready for a request, so on a
//! kept-alive connection it is also the idle timeout: 10 s would close every connection
//! between two scrapes 15 s apart, and each scrape would pay for a new TCP connection
//! (at 125,000 agents, half the aggregator's CPU). Here the two are apart:
//!
//! - **idle**: between requests, no byte of the next one yet: [`KEEPALIVE_IDLE_TIMEOUT`],
//!   longer than any usual scrape interval, so scrapers reuse their connections;
//! - **head**: from the first byte of a request until its headers are parsed (the service
//!   is called): [`super::HEADER_READ_TIMEOUT`], so a client that trickles its headers
//!   (slowloris) is still dropped after 10 s;
//! - while a request is answered: no read deadline.
//!
//! The phase comes from the connection's [`Turns`], which the service advances (see
//! [`super::conns::Slot::busy`]); a deadline that passes ends the read with `TimedOut`, and
//! hyper closes the connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// How long a kept-alive connection may wait for its next request. Longer than the
/// aggregator's pool keeps a connection idle ([`crate::aggregator::scrape::POOL_IDLE`]),
/// so the aggregator never reuses one this side is closing; Prometheus keeps idle
/// connections up to 5 minutes, and its intervals are shorter.
pub const KEEPALIVE_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// hyper's own header timer, set past both deadlines here: a backstop only (see
/// [`super::http1_builder`]).
pub(crate) const HYPER_BACKSTOP: Duration = Duration::from_secs(
    KEEPALIVE_IDLE_TIMEOUT.as_secs() + super::HEADER_READ_TIMEOUT.as_secs() + 1,
);

/// A connection's requests: even while waiting for one, odd while one is answered. The
/// service advances it on both edges; the reads compare it with the turn they last saw.
#[derive(Debug, Default)]
pub(crate) struct Turns(AtomicU64);

impl Turns {
    /// A request's headers are parsed and it is being answered.
    pub(crate) fn begin(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }

    /// The answer is ready: the connection waits for the next request.
    pub(crate) fn end(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }

    fn current(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No byte of the next request yet.
    Idle,
    /// Some of a request's headers have arrived.
    Head,
}

/// An I/O stream whose reads time out by phase (see the module documentation).
pub(crate) struct Deadlines<I> {
    io: I,
    turns: Arc<Turns>,
    seen: u64,
    phase: Phase,
    head_timeout: Duration,
    idle_timeout: Duration,
    timer: Pin<Box<Sleep>>,
}

impl<I> Deadlines<I> {
    pub(crate) fn new(io: I, turns: Arc<Turns>) -> Self {
        Self::with_timeouts(
            io,
            turns,
            super::HEADER_READ_TIMEOUT,
            KEEPALIVE_IDLE_TIMEOUT,
        )
    }

    fn with_timeouts(io: I, turns: Arc<Turns>, head: Duration, idle: Duration) -> Self {
        let seen = turns.current();
        Self {
            io,
            turns,
            seen,
            phase: Phase::Idle,
            head_timeout: head,
            idle_timeout: idle,
            timer: Box::pin(tokio::time::sleep(idle)),
        }
    }

    fn enter(&mut self, phase: Phase) {
        self.phase = phase;
        let after = match phase {
            Phase::Idle => self.idle_timeout,
            Phase::Head => self.head_timeout,
        };
        self.timer.set(tokio::time::sleep(after));
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Deadlines<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let turn = this.turns.current();
        let answering = turn % 2 == 1;
        if turn != this.seen {
            this.seen = turn;
            if !answering {
                // An answer is done: the wait for the next request starts now.
                this.enter(Phase::Idle);
            }
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if !answering && this.phase == Phase::Idle && buf.filled().len() > before {
                    this.enter(Phase::Head);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if !answering && this.timer.as_mut().poll(cx).is_ready() => {
                let what = match this.phase {
                    Phase::Idle => "keep-alive idle timeout",
                    Phase::Head => "request headers not received in time",
                };
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)))
            }
            other => other,
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Deadlines<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const HEAD: Duration = Duration::from_secs(10);
    const IDLE: Duration = Duration::from_secs(300);

    fn pair() -> (
        Deadlines<tokio::io::DuplexStream>,
        tokio::io::DuplexStream,
        Arc<Turns>,
    ) {
        let (server, client) = tokio::io::duplex(1024);
        let turns = Arc::new(Turns::default());
        (
            Deadlines::with_timeouts(server, turns.clone(), HEAD, IDLE),
            client,
            turns,
        )
    }

    async fn read_some(io: &mut Deadlines<tokio::io::DuplexStream>) -> io::Result<usize> {
        let mut buf = [0u8; 64];
        io.read(&mut buf).await
    }

    /// A kept-alive connection outlives the 10 s head deadline between requests, and
    /// the idle deadline counts from the end of the last answer.
    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_waits_for_the_idle_timeout_not_the_head_timeout() {
        let (mut server, mut client, turns) = pair();
        // A first request, answered.
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(read_some(&mut server).await.unwrap(), 18);
        turns.begin();
        tokio::time::sleep(Duration::from_secs(60)).await;
        turns.end();
        // 299 s idle: still open; the next request is read.
        let writer = async {
            tokio::time::sleep(IDLE - Duration::from_secs(1)).await;
            client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
            client
        };
        let (read, mut client) = tokio::join!(read_some(&mut server), writer);
        assert_eq!(read.unwrap(), 18);
        turns.begin();
        turns.end();
        // Then nothing for longer than the idle timeout: closed.
        let err = read_some(&mut server).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(err.to_string(), "keep-alive idle timeout");
        client.shutdown().await.unwrap();
    }

    /// Headers that trickle in are cut off 10 s after their first byte, whether the
    /// connection is new or kept alive.
    // The paused clock is tokio's: read it to see when the deadline fired.
    #[allow(clippy::disallowed_methods)]
    #[tokio::test(start_paused = true)]
    async fn a_request_whose_headers_trickle_is_cut_off_at_the_head_timeout() {
        let (mut server, mut client, _turns) = pair();
        tokio::time::sleep(Duration::from_secs(100)).await;
        client.write_all(b"GET / HT").await.unwrap();
        assert_eq!(read_some(&mut server).await.unwrap(), 8);
        let started = tokio::time::Instant::now();
        let trickle = async {
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if client.write_all(b"X").await.is_err() {
                    break;
                }
            }
        };
        let reader = async {
            loop {
                if let Err(e) = read_some(&mut server).await {
                    return (e, started.elapsed());
                }
            }
        };
        let ((err, after), ()) = tokio::join!(reader, trickle);
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(err.to_string(), "request headers not received in time");
        assert_eq!(after, HEAD);
    }

    /// Through hyper as both servers configure it: an answered connection left idle is
    /// closed at the idle timeout, neither before nor never.
    #[allow(clippy::disallowed_methods)] // the paused clock is tokio's
    #[tokio::test(start_paused = true)]
    async fn hyper_closes_an_idle_connection_at_the_idle_timeout() {
        use http_body_util::Full;
        use hyper::body::Bytes;
        let (server_io, mut client) = tokio::io::duplex(4096);
        let turns = Arc::new(Turns::default());
        let answering = turns.clone();
        let service = hyper::service::service_fn(move |_req| {
            let turns = answering.clone();
            async move {
                turns.begin();
                // An answer that takes a while.
                tokio::time::sleep(Duration::from_secs(1)).await;
                turns.end();
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                    Bytes::from_static(b"ok"),
                )))
            }
        });
        let io = hyper_util::rt::TokioIo::new(Deadlines::new(server_io, turns));
        let server = tokio::spawn(super::super::http1_builder().serve_connection(io, service));
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        while !answer.ends_with(b"ok") {
            let mut buf = [0u8; 256];
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before answering");
            answer.extend_from_slice(&buf[..n]);
        }
        let answered = tokio::time::Instant::now();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(IDLE * 2, client.read(&mut buf))
            .await
            .expect("an idle connection never closed")
            .unwrap();
        assert_eq!(n, 0, "closed, nothing sent");
        let idle = answered.elapsed();
        assert!(
            idle >= KEEPALIVE_IDLE_TIMEOUT
                && idle < KEEPALIVE_IDLE_TIMEOUT + Duration::from_secs(1),
            "{idle:?}"
        );
        // hyper ends the connection (an error while idle is a close, not a failure).
        let _ = server.await.unwrap();
    }

    /// While a request is answered (a slow status page, a statement), reads have no
    /// deadline.
    #[tokio::test(start_paused = true)]
    async fn no_deadline_while_a_request_is_answered() {
        let (mut server, mut client, turns) = pair();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        read_some(&mut server).await.unwrap();
        turns.begin();
        let answer = async {
            tokio::time::sleep(IDLE * 2).await;
            turns.end();
            client.write_all(b"GET /").await.unwrap();
            client
        };
        let (read, _client) = tokio::join!(read_some(&mut server), answer);
        assert_eq!(read.unwrap(), 5);
    }
}
