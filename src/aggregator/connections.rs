//! Each agent's connection, kept from one round to the next.
//!
//! At 125,000 agents, connecting and closing every 15 s was half the aggregator's CPU (the
//! kernel's TCP connect, send and shutdown). A scrape therefore hands its connection back
//! here once its answer is read, and the agent's next scrape takes it. Only the socket is
//! kept (hyper's buffers are made per scrape, and the last scrape's wakers are let go), so a
//! kept connection costs a descriptor and ~0.4 kB (its map entry, its key, tokio's
//! registration; no RSS the benchmark can tell apart, README "Benchmarks"), where hyper's
//! own pool, holding each connection's buffers, cost ~28 kB apiece. At most
//! [`pool_budget`] are kept (the descriptors are shared with the server and the scrapes in
//! flight); beyond that a connection is closed after its scrape.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::clock;

/// What a scrape connects with: plain TCP or TLS over it.
pub type Io = MaybeHttpsStream<TokioIo<TcpStream>>;

/// How many scrape connections may be kept under a descriptor limit: the scrapes' half of
/// it ([`crate::http::conns::max_connections`] is the server's) less the scrapes in
/// flight, which always get a connection.
pub fn pool_budget(fd_limit: u64, in_flight: usize) -> usize {
    crate::http::conns::half_of_the_descriptors(fd_limit).saturating_sub(in_flight)
}

/// A connection as kept: a plain one as its socket (40 bytes), a TLS one boxed (its
/// session state is over a kilobyte, which the plain ones should not pay for).
enum Stored {
    Plain(TokioIo<TcpStream>),
    Tls(Box<Io>),
}

impl Stored {
    fn new(io: Io) -> Self {
        let stored = match io {
            MaybeHttpsStream::Http(tcp) => Stored::Plain(tcp),
            tls => Stored::Tls(Box::new(tls)),
        };
        forget_wakers(stored.tcp());
        stored
    }

    fn into_io(self) -> Io {
        match self {
            Stored::Plain(tcp) => MaybeHttpsStream::Http(tcp),
            Stored::Tls(io) => *io,
        }
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            Stored::Plain(tcp) => tcp.inner(),
            Stored::Tls(io) => match io.as_ref() {
                MaybeHttpsStream::Http(tcp) => tcp.inner(),
                MaybeHttpsStream::Https(tls) => tls.inner().get_ref().0.inner().inner(),
            },
        }
    }
}

/// The kept connections, by target (scheme and address), each with when it was kept.
pub struct Kept {
    budget: usize,
    max_idle: Duration,
    idle: Mutex<HashMap<Box<str>, (Stored, Instant)>>,
    /// Whether the budget was reached (logged once per crossing, not per connection).
    full: AtomicBool,
}

impl Kept {
    /// At most `budget` connections, each for at most `max_idle` (shorter than agents keep
    /// an idle connection, so none is reused as the agent closes it).
    pub fn new(budget: usize, max_idle: Duration) -> Self {
        Self {
            budget,
            max_idle,
            idle: Mutex::new(HashMap::new()),
            full: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, (Stored, Instant)>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection kept for `target`, unless it has waited too long or the agent has
    /// closed it meanwhile (restarted, or an older agent's 10 s idle timeout).
    pub fn take(&self, target: &str) -> Option<Io> {
        let (kept, since) = self.lock().remove(target)?;
        (clock::elapsed(since) < self.max_idle && still_open(kept.tcp())).then(|| kept.into_io())
    }

    /// Keeps `io` for `target`'s next scrape, if the budget allows.
    pub fn put(&self, target: String, io: Io) {
        let mut idle = self.lock();
        if idle.len() >= self.budget {
            drop(idle);
            if !self.full.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    kept = self.budget,
                    "scrape connections kept at the budget (half the file descriptor limit, \
                     less the scrapes in flight): the other agents' connections close after \
                     each scrape; raise LimitNOFILE"
                );
            }
            return;
        }
        idle.insert(
            target.into_boxed_str(),
            (Stored::new(io), clock::monotonic_now()),
        );
    }

    /// Closes connections kept too long (a target no longer listed, a round slower than
    /// `max_idle`) and returns how many are kept.
    pub fn sweep(&self) -> usize {
        let mut idle = self.lock();
        idle.retain(|_, (_, since)| clock::elapsed(*since) < self.max_idle);
        let kept = idle.len();
        if kept < self.budget * 9 / 10 && self.full.swap(false, Ordering::Relaxed) {
            tracing::info!(kept, "scrape connections kept under the budget again");
        }
        kept
    }
}

/// Lets go of the wakers of the scrape that last used this socket. Tokio keeps a socket's
/// last reader's waker until the socket is next readable, and a waker keeps its task's
/// memory (there, hyper's whole connection future) after the task has ended: until this, a
/// kept connection cost ~4 kB of RSS, 0.5 GB at 125,000 agents. Polling readiness with a
/// no-op waker puts that in its place (a ready socket holds no waker).
fn forget_wakers(tcp: &TcpStream) {
    let mut cx = Context::from_waker(Waker::noop());
    let _ = tcp.poll_read_ready(&mut cx);
    let _ = tcp.poll_write_ready(&mut cx);
}

/// Whether a kept connection is still open: nothing to read yet. An agent that closed it
/// has sent FIN (a read of 0 bytes); bytes nobody asked for (a TLS alert, garbage) make
/// it unusable too. Tokio's cached readiness answers without a system call while nothing
/// has arrived.
fn still_open(tcp: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(tcp.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scrapes' half of the descriptors, less the scrapes in flight; never negative.
    #[test]
    fn the_pool_keeps_the_scrapes_half_less_those_in_flight() {
        // The shipped unit's limit: 131,040 for scrapes, 256 in flight.
        assert_eq!(pool_budget(262_144, 256), 130_784);
        assert_eq!(pool_budget(65_536, 256), 32_480);
        assert_eq!(pool_budget(1024, 256), 224);
        assert_eq!(pool_budget(256, 256), 0);
        assert_eq!(pool_budget(0, 256), 0);
    }

    async fn connected_pair() -> (Io, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (
            MaybeHttpsStream::Http(TokioIo::new(client.unwrap())),
            server.unwrap().0,
        )
    }

    /// A connection is kept without the waker of the task that last read it (a waker holds
    /// its task's memory; hyper's connection task leaves one registered on the socket).
    #[tokio::test]
    async fn a_kept_connection_lets_go_of_its_last_readers_waker() {
        struct Task;
        impl std::task::Wake for Task {
            fn wake(self: std::sync::Arc<Self>) {}
        }
        let (io, _agent) = connected_pair().await;
        let task = std::sync::Arc::new(Task);
        let waker = Waker::from(task.clone());
        let MaybeHttpsStream::Http(tcp) = &io else {
            unreachable!()
        };
        // As a scrape's connection task leaves it: waiting for the next bytes.
        assert!(tcp
            .inner()
            .poll_read_ready(&mut Context::from_waker(&waker))
            .is_pending());
        drop(waker);
        assert_eq!(
            std::sync::Arc::strong_count(&task),
            2,
            "the socket holds it"
        );
        let kept = Kept::new(1, Duration::from_secs(240));
        kept.put("http://a".into(), io);
        assert_eq!(
            std::sync::Arc::strong_count(&task),
            1,
            "the kept socket still holds the last reader's waker"
        );
        assert!(kept.take("http://a").is_some());
    }

    /// A kept connection is handed out once, only while open, within the budget.
    #[tokio::test]
    async fn a_connection_is_reused_only_while_the_agent_keeps_it_open() {
        let kept = Kept::new(2, Duration::from_secs(240));
        let (io, agent) = connected_pair().await;
        kept.put("http://a".into(), io);
        assert_eq!(kept.sweep(), 1);
        assert!(kept.take("http://a").is_some());
        assert!(kept.take("http://a").is_none(), "handed out twice");
        // The agent closes it while it is kept: not handed out.
        let (io, agent_b) = connected_pair().await;
        kept.put("http://b".into(), io);
        drop(agent_b);
        // Loopback delivers the FIN at once; the runtime sees it when it next waits.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            kept.take("http://b").is_none(),
            "reused after the agent closed it"
        );
        drop(agent);
    }

    /// Over budget, a connection is not kept.
    #[tokio::test]
    async fn no_more_than_the_budget_is_kept() {
        let kept = Kept::new(1, Duration::from_secs(240));
        let (a, _agent_a) = connected_pair().await;
        let (b, _agent_b) = connected_pair().await;
        kept.put("http://a".into(), a);
        kept.put("http://b".into(), b);
        assert_eq!(kept.sweep(), 1);
        assert!(kept.take("http://b").is_none());
        assert!(kept.take("http://a").is_some());
    }

    /// A connection kept longer than `max_idle` is closed by the sweep, never reused.
    #[tokio::test]
    async fn a_connection_kept_too_long_is_closed() {
        let kept = Kept::new(4, Duration::ZERO);
        let (io, _agent) = connected_pair().await;
        kept.put("http://a".into(), io);
        assert!(kept.take("http://a").is_none());
        let (io, _agent) = connected_pair().await;
        kept.put("http://a".into(), io);
        assert_eq!(kept.sweep(), 0);
    }
}
