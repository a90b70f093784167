//! File descriptors and connections: the process's descriptor limit (raised once to the
//! hard limit, as Go and Prometheus do), the bound on open connections derived from it,
//! and which connection gives way when the bound is reached (the longest idle).
//!
//! Every accepted connection is a descriptor, and so is every scrape the aggregator has
//! in flight or pooled. Without a bound, 2,000 idle clients exhaust a 1,024 limit and
//! `accept` fails for everyone, a legitimate scraper included. With it, the server keeps
//! at most [`max_connections`] open; at the bound a new connection closes the one idle
//! longest (a connection that is between requests, still sending its headers or in its
//! TLS handshake), and is refused at once only when every open connection is busy.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::Notify;

/// Descriptors kept for everything but connections: standard streams, the runtime's
/// epoll and wakers, the listener, the ledger's SQLite files, NVML's device nodes,
/// file_sd reads.
pub const RESERVED_FDS: u64 = 64;

/// Fewer would make a low limit unusable; a limit this low is warned about at start.
const MIN_CONNECTIONS: usize = 16;

/// Below this the start-up log line is a warning: the shipped units set far more.
const LOW_FD_LIMIT: u64 = 4096;

/// "Unlimited" (RLIM_INFINITY) and absurd hard limits are taken as this many.
const FD_LIMIT_CAP: u64 = 1 << 20;

/// The bound on open connections for a descriptor limit: half of what is left after
/// [`RESERVED_FDS`]. The other half is the aggregator's scrapes (one connection kept per
/// agent), so `LimitNOFILE=262144` serves 131,040 clients and keeps 130,784 agents'
/// connections ([`crate::aggregator`]'s `pool_budget`).
pub fn max_connections(fd_limit: u64) -> usize {
    half_of_the_descriptors(fd_limit).max(MIN_CONNECTIONS)
}

/// Half of the descriptors left after [`RESERVED_FDS`]: the server's share (its
/// connections) and the aggregator's (its scrapes, in flight and kept) are each this.
pub fn half_of_the_descriptors(fd_limit: u64) -> usize {
    let half = fd_limit.saturating_sub(RESERVED_FDS) / 2;
    usize::try_from(half).unwrap_or(usize::MAX)
}

/// The soft `RLIMIT_NOFILE` after raising it to the hard limit, once per process; the
/// first call logs it. A limit that cannot be raised (a seccomp filter, a container) is
/// kept, with a warning.
pub fn fd_limit() -> u64 {
    static LIMIT: OnceLock<u64> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
        let before = getrlimit(Resource::Nofile);
        let cap = |v: Option<u64>| v.unwrap_or(FD_LIMIT_CAP).min(FD_LIMIT_CAP);
        let (soft, hard) = (cap(before.current), cap(before.maximum));
        let limit = if soft < hard {
            let raised = Rlimit {
                current: Some(hard),
                maximum: before.maximum,
            };
            match setrlimit(Resource::Nofile, raised) {
                Ok(()) => hard,
                Err(e) => {
                    tracing::warn!(
                        limit = soft,
                        hard_limit = hard,
                        error = %e,
                        "cannot raise the file descriptor limit to the hard limit"
                    );
                    soft
                }
            }
        } else {
            soft
        };
        let connections = max_connections(limit);
        if limit < LOW_FD_LIMIT {
            tracing::warn!(
                limit,
                raised_from = soft,
                max_connections = connections,
                "file descriptor limit is low: set LimitNOFILE (the shipped units do) or ulimit -n"
            );
        } else {
            tracing::info!(
                limit,
                raised_from = soft,
                max_connections = connections,
                "file descriptor limit"
            );
        }
        limit
    })
}

/// What the server reports about itself; each role registers these in its registry.
#[derive(Clone)]
pub struct ServerMetrics {
    pub(crate) accept_errors: IntCounter,
    pub(crate) connections: IntGauge,
    pub(crate) connections_max: IntGauge,
    pub(crate) shed: IntCounter,
    pub(crate) auth_failures: IntCounterVec,
}

impl ServerMetrics {
    /// Series that go nowhere (the demo's simulated agents).
    pub fn unregistered() -> Self {
        Self::build().expect("static metric definitions are valid")
    }

    /// Creates the series in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self::build()?;
        registry.register(Box::new(m.accept_errors.clone()))?;
        registry.register(Box::new(m.connections.clone()))?;
        registry.register(Box::new(m.connections_max.clone()))?;
        registry.register(Box::new(m.shed.clone()))?;
        registry.register(Box::new(m.auth_failures.clone()))?;
        Ok(m)
    }

    fn build() -> Result<Self, prometheus::Error> {
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "commitmeter_http_auth_failures_total",
                "Requests refused by basic auth: invalid (401) or throttled (429, the bcrypt queue was full).",
            ),
            &["reason"],
        )?;
        for reason in ["invalid", "throttled"] {
            auth_failures.with_label_values(&[reason]);
        }
        Ok(Self {
            accept_errors: IntCounter::new(
                "commitmeter_http_accept_errors_total",
                "Failed accepts on the listener (out of file descriptors and the like); logged once per episode.",
            )?,
            connections: IntGauge::new(
                "commitmeter_http_connections",
                "Open connections to this server.",
            )?,
            connections_max: IntGauge::new(
                "commitmeter_http_connections_max",
                "The bound on open connections, derived from the file descriptor limit.",
            )?,
            shed: IntCounter::new(
                "commitmeter_http_connections_shed_total",
                "Connections closed (the longest idle first) or refused because the bound was reached.",
            )?,
            auth_failures,
        })
    }
}

/// The open connections, which of them are idle, and in which order they became so.
pub(crate) struct Tracker {
    max: usize,
    metrics: ServerMetrics,
    state: Mutex<State>,
    /// Notified when a shed connection has closed its socket.
    pub(crate) closed: Notify,
}

#[derive(Default)]
struct State {
    next_id: u64,
    /// Stamps for idle order: the lowest is the longest idle.
    next_stamp: u64,
    open: HashMap<u64, Entry>,
    /// Idle connections by stamp.
    idle: BTreeMap<u64, u64>,
    /// Connections shed since the bound was last reached, while it still is.
    shedding: Option<u64>,
    /// Shed connections whose task has not closed its socket yet: they still hold a
    /// descriptor, so they still count against the bound (plus [`closing_slack`]).
    closing: std::collections::HashSet<u64>,
}

/// How far shed connections still closing may take the descriptors in use beyond the
/// bound: a burst of new clients sheds faster than the shed tasks run and close.
fn closing_slack(max: usize) -> usize {
    (max / 4).max(1)
}

struct Entry {
    close: Arc<Notify>,
    /// The stamp while idle; `None` while a request is being answered.
    idle_stamp: Option<u64>,
}

/// A connection's place in the [`Tracker`]; leaving it (drop) frees the place.
pub(crate) struct Slot {
    tracker: Arc<Tracker>,
    id: u64,
    /// Notified when the connection should close as soon as it is idle.
    pub(crate) close: Arc<Notify>,
    /// Advanced as requests begin and end: the reads' deadlines follow it.
    pub(crate) turns: Arc<super::deadlines::Turns>,
}

/// Held while a request is answered: the connection is not idle meanwhile.
pub(crate) struct Busy<'a>(&'a Slot);

impl Tracker {
    pub(crate) fn new(max: usize, metrics: ServerMetrics) -> Arc<Self> {
        metrics.connections_max.set(max as i64);
        metrics.connections.set(0);
        Arc::new(Self {
            max,
            metrics,
            state: Mutex::new(State::default()),
            closed: Notify::new(),
        })
    }

    pub(crate) fn max(&self) -> usize {
        self.max
    }

    pub(crate) fn open(&self) -> usize {
        self.lock().open.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a new connection: at the bound, the longest-idle connection is told
    /// to close and gives up its place; `None` (refuse it) when every one is busy.
    pub(crate) fn admit(self: &Arc<Self>) -> Option<Slot> {
        let mut s = self.lock();
        if s.open.len() + s.closing.len() >= self.max + closing_slack(self.max) {
            // Shed connections have not closed yet (the accept loop waits for them first,
            // see `saturated`): rather than run out of descriptors, refuse this one.
            return None;
        }
        if s.open.len() >= self.max {
            let shed = Self::shed_locked(&mut s);
            self.metrics.shed.inc();
            let episode = s.shedding.get_or_insert(0);
            *episode += 1;
            if *episode == 1 {
                tracing::warn!(
                    max_connections = self.max,
                    "connection limit reached: closing the longest idle connections \
                     (logged once until connections fall below three quarters of the limit)"
                );
            }
            if !shed {
                return None;
            }
        }
        let id = s.next_id;
        s.next_id += 1;
        let stamp = s.next_stamp;
        s.next_stamp += 1;
        let close = Arc::new(Notify::new());
        s.open.insert(
            id,
            Entry {
                close: close.clone(),
                idle_stamp: Some(stamp),
            },
        );
        s.idle.insert(stamp, id);
        self.metrics.connections.set(s.open.len() as i64);
        Some(Slot {
            tracker: self.clone(),
            id,
            close,
            turns: Arc::default(),
        })
    }

    /// Closes the longest-idle connection (out of descriptors: one freed is one more
    /// accept). Whether there was one.
    pub(crate) fn shed_one(&self) -> bool {
        let mut s = self.lock();
        let shed = Self::shed_locked(&mut s);
        if shed {
            self.metrics.shed.inc();
            self.metrics.connections.set(s.open.len() as i64);
        }
        shed
    }

    fn shed_locked(s: &mut State) -> bool {
        let Some((_, id)) = s.idle.pop_first() else {
            return false;
        };
        if let Some(entry) = s.open.remove(&id) {
            // A stored permit: the connection closes even if it is not waiting yet.
            entry.close.notify_one();
            s.closing.insert(id);
        }
        true
    }

    /// Whether shed connections still closing hold every descriptor the bound and its
    /// slack allow: a new connection should wait for [`Tracker::closed`].
    pub(crate) fn saturated(&self) -> bool {
        let s = self.lock();
        !s.closing.is_empty()
            && s.open.len() + s.closing.len() >= self.max + closing_slack(self.max)
    }

    fn leave(&self, id: u64) {
        let mut s = self.lock();
        if s.closing.remove(&id) {
            self.closed.notify_waiters();
        }
        if let Some(entry) = s.open.remove(&id) {
            if let Some(stamp) = entry.idle_stamp {
                s.idle.remove(&stamp);
            }
        }
        self.metrics.connections.set(s.open.len() as i64);
        if s.shedding.is_some() && s.open.len() < self.max * 3 / 4 {
            let shed = s.shedding.take().unwrap_or(0);
            tracing::info!(
                connections = s.open.len(),
                shed,
                "connections below the limit again"
            );
        }
    }
}

impl Slot {
    /// Marks the connection busy until the guard is dropped.
    pub(crate) fn busy(&self) -> Busy<'_> {
        self.turns.begin();
        let mut s = self.tracker.lock();
        if let Some(stamp) = s.open.get_mut(&self.id).and_then(|e| e.idle_stamp.take()) {
            s.idle.remove(&stamp);
        }
        Busy(self)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let slot = self.0;
        slot.turns.end();
        let mut s = slot.tracker.lock();
        let stamp = s.next_stamp;
        if let Some(entry) = s.open.get_mut(&slot.id) {
            if entry.idle_stamp.is_none() {
                entry.idle_stamp = Some(stamp);
                s.next_stamp += 1;
                s.idle.insert(stamp, slot.id);
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.tracker.leave(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_leaves_half_for_scrapes() {
        assert_eq!(max_connections(65536), 32736);
        assert_eq!(max_connections(1024), 480);
        assert_eq!(max_connections(256), 96);
        assert_eq!(max_connections(10), MIN_CONNECTIONS);
        assert!(max_connections(16384) > 2000);
    }

    #[test]
    fn the_longest_idle_goes_first_and_busy_ones_stay() {
        let t = Tracker::new(3, ServerMetrics::unregistered());
        let a = t.admit().unwrap();
        let b = t.admit().unwrap();
        let c = t.admit().unwrap();
        // a answers a request, so b is now the longest idle; c is busy.
        drop(a.busy());
        let _c_busy = c.busy();
        let d = t.admit().unwrap();
        assert_eq!(t.open(), 3);
        assert!(futures_ready(&b.close), "b was idle longest");
        assert!(!futures_ready(&a.close));
        // Until b's task closes its socket, b still holds a descriptor: with the slack
        // (1 here) taken, a newcomer is refused rather than shedding another.
        assert!(t.admit().is_none());
        drop(b);
        // Next: a (idle since its request), then d; c stays while busy.
        let _e = t.admit().unwrap();
        assert!(futures_ready(&a.close));
        drop(a);
        let _f = t.admit().unwrap();
        assert!(futures_ready(&d.close));
        assert!(!futures_ready(&c.close));
        drop(d);
        // c, e and f all answering requests: a newcomer is refused.
        let _e_busy = _e.busy();
        let _f_busy = _f.busy();
        assert!(t.admit().is_none());
        assert_eq!(t.metrics.shed.get(), 4);
        assert_eq!(t.open(), 3);
        drop(_c_busy);
        drop(c);
        assert_eq!(t.open(), 2);
        assert_eq!(t.metrics.connections.get(), 2);
    }

    #[test]
    fn shed_one_frees_an_idle_connection_only() {
        let t = Tracker::new(10, ServerMetrics::unregistered());
        let a = t.admit().unwrap();
        let _busy = a.busy();
        assert!(!t.shed_one());
        let b = t.admit().unwrap();
        assert!(t.shed_one());
        assert!(futures_ready(&b.close));
        assert_eq!(t.open(), 1);
    }

    /// Whether a permit is stored in `n` (consumes it).
    fn futures_ready(n: &Notify) -> bool {
        let fut = n.notified();
        tokio::pin!(fut);
        fut.as_mut().enable()
    }
}
