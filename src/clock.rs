//! The only module that reads time. `clippy.toml` disallows every other read of a
//! clock (`Instant::now`, `Instant::elapsed`, `SystemTime::now`, `jiff::Timestamp::now`,
//! …), so where a time comes from is visible here and nowhere else.
//!
//! Three kinds of time, never mixed:
//!
//! - **Ledger time**: Unix milliseconds from the injected [`Clock`]. Everything the
//!   aggregator accounts, and every timestamp in its exposition
//!   (`…_timestamp_seconds`), is on this clock: the system clock in production
//!   ([`SystemClock`]), a simulated one in the demo (`demo::SimClock`, faster than real
//!   time), so one exposition never shows two clocks. Code that needs "now" for the
//!   books takes a `Clock`, never a function below.
//! - **Agent time**: [`AgentClock`], the wall clock read once at start plus monotonic
//!   time since, for the agent's round timestamps.
//! - **Real elapsed time**: [`monotonic_now`] and [`elapsed`], for what is about real
//!   delays whatever the ledger's clock says: deadlines and timeouts, readiness (a
//!   stuck writer), rate limits on log lines, scrape and backup durations in the log,
//!   the hourly host checkpoints. Never exported as a timestamp.
//!
//! [`wall_now_ms`] and [`wall_now`] read the real wall clock for the few things that are
//! about this machine's calendar rather than the ledger's: the anchors of
//! [`SystemClock`] and [`AgentClock`], the provenance stamps of ledger files (`created`,
//! `replaced-<time>/`), and the month the demo's simulation starts in.
//!
//! Tests and benches read time as they please (`#![allow(clippy::disallowed_methods)]`).

// The reads this module exists to own.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where ledger time comes from: the system clock in production, a simulated one in
/// the demo. The ledger only ever sees these milliseconds.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;

    /// A real duration in this clock's milliseconds (a simulated clock runs faster), for
    /// the tolerances that are about real delays.
    fn scale(&self, real: Duration) -> i64 {
        real.as_millis() as i64
    }
}

/// The production ledger clock: the system's wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        wall_now_ms()
    }
}

/// The agent's clock: the wall clock read once at start, plus monotonic time since.
/// Never re-anchored, so round timestamps never go backwards and two of them differ
/// by exactly the monotonic time between the rounds.
#[derive(Debug, Clone, Copy)]
pub struct AgentClock {
    origin: Instant,
    wall_ms: u64,
}

impl AgentClock {
    pub fn start() -> Self {
        Self {
            origin: monotonic_now(),
            wall_ms: u64::try_from(wall_now_ms()).unwrap_or(0),
        }
    }

    /// The wall clock at the start, in Unix milliseconds.
    pub fn started_unix_ms(&self) -> u64 {
        self.wall_ms
    }

    /// Whole milliseconds of monotonic time since the start.
    pub fn now_ms(&self) -> u64 {
        elapsed(self.origin).as_millis() as u64
    }

    /// Monotonic time since the start, to the clock's precision: the instant of one
    /// GPU's sample read, on the same timeline as [`Self::now_ms`].
    pub fn now(&self) -> Duration {
        elapsed(self.origin)
    }

    /// Unix seconds of the instant `ms` after the start.
    pub fn wall_seconds(&self, ms: u64) -> f64 {
        (self.wall_ms + ms) as f64 / 1000.0
    }
}

/// Monotonic now, for deadlines, timeouts, rate limits and measured durations: real
/// delays, which neither a wall-clock step nor a simulated ledger clock may stretch.
pub fn monotonic_now() -> Instant {
    Instant::now()
}

/// Real time since `since` (an instant from [`monotonic_now`]); zero if `since` is in
/// the future.
pub fn elapsed(since: Instant) -> Duration {
    since.elapsed()
}

/// The system's wall clock in Unix milliseconds (0 before 1970). Ledger code reads it
/// only through [`SystemClock`]; see the module documentation for the other uses.
pub fn wall_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The system's wall clock as a timestamp, for calendar stamps of this machine (ledger
/// file provenance, the demo's starting month); never for the books.
pub fn wall_now() -> jiff::Timestamp {
    jiff::Timestamp::now()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_timestamps_differ_by_monotonic_time_exactly() {
        let clock = AgentClock::start();
        let (a, b) = (clock.now_ms(), clock.now_ms() + 1234);
        let diff = clock.wall_seconds(b) - clock.wall_seconds(a);
        assert!((diff - 1.234).abs() < 1e-6, "{diff}");
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!((clock.wall_seconds(clock.now_ms()) - unix).abs() < 1.0);
    }
}
