//! The contract ledger: pure accounting from scraped per-GPU counters to sealed
//! per-minute contract buckets. No I/O, no clocks, no tokio: callers pass times in.
//!
//! All amounts are integer GPU-milliseconds, so the identity
//! `committed = used_within_commitment + idle + undelivered + unreported`
//! holds exactly for every sealed minute and contract.
//!
//! How a scrape becomes minutes:
//! - Between two scrapes of a host, each GPU's counter delta (a decrease is an agent
//!   restart: the new value counts from 0, as Prometheus does) is spread over the
//!   minutes the interval covers, in proportion to time ([`spread`]). An agent that was
//!   unreachable for a while back-fills the minutes it missed: its counters kept counting.
//! - The same interval marks the host's GPUs as *reported* for those minutes. GPUs of
//!   a known host that no scrape covered are *unreported* (from its last GPU count).
//! - A minute seals `grace` after it ends. Sealed minutes never change; a delta that
//!   reaches back into sealed minutes has that part dropped (and counted as late).

pub mod burn;
pub mod totals;

use std::collections::{BTreeMap, HashMap};

pub const MINUTE_MS: i64 = 60_000;

/// Index of the minute containing `t_ms` (floor division, also before 1970).
pub fn minute_of(t_ms: i64) -> i64 {
    t_ms.div_euclid(MINUTE_MS)
}

/// Counter values of one GPU, in seconds, as scraped.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GpuCounters {
    /// `commitmeter_gpu_observed_seconds_total`: delivered time.
    pub observed: f64,
    /// The contract's usage signal (busy or allocated seconds).
    pub used: f64,
}

/// The last scrape of a host: the baseline for the next delta.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Checkpoint {
    pub at_ms: i64,
    pub gpus: BTreeMap<String, GpuCounters>,
}

/// What the ledger remembers about a host between scrapes.
#[derive(Debug, Clone, PartialEq)]
pub struct HostState {
    pub contract: usize,
    /// When the host was first scraped for this contract: from then on, minutes it
    /// does not report count as unreported.
    pub known_since_ms: i64,
    pub last: Checkpoint,
}

/// Running sums of one open minute of one contract.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Open {
    pub delivered: i64,
    pub used: i64,
    /// GPU-ms of capacity covered by scrape intervals (reported).
    pub reported: i64,
}

/// The seven figures of a sealed minute, in GPU-milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub committed: i64,
    pub delivered: i64,
    pub used: i64,
    pub idle: i64,
    pub undelivered: i64,
    pub unreported: i64,
    pub overage: i64,
}

impl Totals {
    /// Used GPU-time that counts against the commitment.
    pub fn used_within(&self) -> i64 {
        self.used - self.overage
    }

    pub fn add(&mut self, o: &Totals) {
        self.committed += o.committed;
        self.delivered += o.delivered;
        self.used += o.used;
        self.idle += o.idle;
        self.undelivered += o.undelivered;
        self.unreported += o.unreported;
        self.overage += o.overage;
    }
}

/// Splits one minute's commitment. Known facts come first: delivered capacity fills
/// the commitment, then unreported capacity, and the rest was not delivered. Usage
/// fills delivered capacity within the commitment; usage beyond it is overage.
pub fn split(committed: i64, delivered: i64, unreported: i64, used: i64) -> Totals {
    let committed = committed.max(0);
    let (delivered, unreported, used) = (delivered.max(0), unreported.max(0), used.max(0));
    let delivered_within = delivered.min(committed);
    let unreported_within = unreported.min(committed - delivered_within);
    let used_within = used.min(delivered_within);
    Totals {
        committed,
        delivered,
        used,
        idle: delivered_within - used_within,
        undelivered: committed - delivered_within - unreported_within,
        unreported: unreported_within,
        overage: used - used_within,
    }
}

/// Spreads `amount` over the minutes of `(from_ms, to_ms]` in proportion to the time
/// each covers. Integer parts that sum to `amount` exactly (largest remainder).
pub fn spread(from_ms: i64, to_ms: i64, amount: i64) -> Vec<(i64, i64)> {
    if to_ms <= from_ms {
        return Vec::new();
    }
    let span = i128::from(to_ms - from_ms);
    let mut parts = Vec::new();
    let mut t = from_ms;
    while t < to_ms {
        let m = minute_of(t);
        let end = ((m + 1) * MINUTE_MS).min(to_ms);
        parts.push((m, end - t));
        t = end;
    }
    let mut out: Vec<(i64, i64)> = Vec::with_capacity(parts.len());
    let mut rema: Vec<(i128, usize)> = Vec::with_capacity(parts.len());
    let mut given = 0i64;
    for (i, &(m, len)) in parts.iter().enumerate() {
        let exact = i128::from(amount) * i128::from(len);
        let share = exact.div_euclid(span) as i64;
        rema.push((exact.rem_euclid(span), i));
        given += share;
        out.push((m, share));
    }
    // Hand out what floor division left, largest remainders first (ties: earliest).
    rema.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in rema.iter().take((amount - given) as usize) {
        out[i].1 += 1;
    }
    out
}

fn to_ms(seconds: f64) -> i64 {
    if seconds.is_finite() && seconds > 0.0 {
        (seconds * 1000.0).round() as i64
    } else {
        0
    }
}

/// Increase of a counter between two readings, Prometheus-style: a decrease is a reset.
fn increase(prev: f64, now: f64) -> f64 {
    if now >= prev {
        now - prev
    } else {
        now
    }
}

/// One contract's view of a sealed minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    pub contract: usize,
    pub minute: i64,
    pub totals: Totals,
}

/// The whole ledger's in-memory state. [`Ledger::snapshot`] and
/// [`Ledger::restore`] move it to and from durable storage.
#[derive(Debug, Clone, PartialEq)]
pub struct Ledger {
    contracts: usize,
    /// The first minute this ledger accounts: earlier minutes are absent, not zero.
    since: i64,
    /// Minutes before this one are sealed.
    sealed_through: i64,
    open: BTreeMap<i64, Vec<Open>>,
    hosts: HashMap<String, HostState>,
    /// GPU-ms that arrived for sealed minutes, per contract (delivered, used).
    late: Vec<(i64, i64)>,
}

/// Everything needed to resume after a crash, written atomically with sealed minutes.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    pub since: i64,
    pub sealed_through: i64,
    pub open: Vec<(i64, usize, Open)>,
    pub hosts: Vec<(String, HostState)>,
    /// Per contract: (delivered, used) GPU-ms that arrived for sealed minutes.
    pub late: Vec<(i64, i64)>,
}

impl Ledger {
    /// A new ledger that accounts from the minute after `start_ms` on: earlier minutes
    /// are not accounted at all (absent, rather than counted undelivered).
    pub fn new(contracts: usize, start_ms: i64) -> Self {
        Self {
            contracts,
            since: minute_of(start_ms) + 1,
            sealed_through: minute_of(start_ms) + 1,
            open: BTreeMap::new(),
            hosts: HashMap::new(),
            late: vec![(0, 0); contracts],
        }
    }

    pub fn restore(contracts: usize, snap: Snapshot) -> Self {
        let mut l = Self::new(contracts, 0);
        l.since = snap.since;
        l.sealed_through = snap.sealed_through;
        for (minute, c, open) in snap.open {
            if c < contracts && minute >= l.sealed_through {
                l.open
                    .entry(minute)
                    .or_insert_with(|| vec![Open::default(); contracts])[c] = open;
            }
        }
        l.hosts = snap
            .hosts
            .into_iter()
            .filter(|(_, h)| h.contract < contracts)
            .collect();
        for (c, late) in snap.late.into_iter().enumerate().take(contracts) {
            l.late[c] = late;
        }
        l
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut open = Vec::new();
        for (&minute, per) in &self.open {
            for (c, o) in per.iter().enumerate() {
                if *o != Open::default() {
                    open.push((minute, c, *o));
                }
            }
        }
        let mut hosts: Vec<(String, HostState)> = self
            .hosts
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        hosts.sort_by(|a, b| a.0.cmp(&b.0));
        Snapshot {
            since: self.since,
            sealed_through: self.sealed_through,
            open,
            hosts,
            late: self.late.clone(),
        }
    }

    /// Moves the start of a ledger that has sealed nothing yet to the minute after
    /// `t_ms`: called after the first scrape round, so every host's baseline precedes
    /// the first accounted minute (no artificial undelivered minute at the start).
    pub fn start_after(&mut self, t_ms: i64) {
        if self.sealed_through == self.since && self.open.is_empty() {
            self.since = minute_of(t_ms) + 1;
            self.sealed_through = self.since;
        }
    }

    /// The first minute this ledger accounts.
    pub fn since(&self) -> i64 {
        self.since
    }

    /// The first minute not yet sealed.
    pub fn sealed_through(&self) -> i64 {
        self.sealed_through
    }

    /// GPU-ms (delivered, used) that arrived too late for their minutes, per contract.
    pub fn late(&self) -> &[(i64, i64)] {
        &self.late
    }

    pub fn host(&self, target: &str) -> Option<&HostState> {
        self.hosts.get(target)
    }

    /// Records a successful scrape of `target`, whose GPUs (already filtered to the
    /// contract's model) had these counters at `at_ms`.
    pub fn observe(
        &mut self,
        target: &str,
        contract: usize,
        at_ms: i64,
        gpus: BTreeMap<String, GpuCounters>,
    ) {
        if contract >= self.contracts {
            return;
        }
        let now = Checkpoint { at_ms, gpus };
        let state = match self.hosts.get_mut(target) {
            Some(s) if s.contract == contract => s,
            _ => {
                // First sight, or the host moved to another contract: a baseline only.
                self.hosts.insert(
                    target.to_string(),
                    HostState {
                        contract,
                        known_since_ms: at_ms,
                        last: now,
                    },
                );
                return;
            }
        };
        if at_ms <= state.last.at_ms {
            return;
        }
        let (mut delivered, mut used) = (0.0, 0.0);
        for (uuid, c) in &now.gpus {
            // A GPU not in the baseline (new series) only sets its own baseline.
            if let Some(p) = state.last.gpus.get(uuid) {
                delivered += increase(p.observed, c.observed);
                used += increase(p.used, c.used);
            }
        }
        let from = state.last.at_ms;
        let gpus = now.gpus.len() as i64;
        state.last = now;
        let (delivered, used) = (to_ms(delivered), to_ms(used));
        let reported = gpus * (at_ms - from);
        self.attribute(contract, from, at_ms, delivered, used, reported);
    }

    fn attribute(
        &mut self,
        contract: usize,
        from: i64,
        to: i64,
        delivered: i64,
        used: i64,
        reported: i64,
    ) {
        let d = spread(from, to, delivered);
        let u = spread(from, to, used);
        let r = spread(from, to, reported);
        for i in 0..d.len() {
            let minute = d[i].0;
            if minute < self.sealed_through {
                self.late[contract].0 += d[i].1;
                self.late[contract].1 += u[i].1;
                continue;
            }
            let n = self.contracts;
            let o = &mut self
                .open
                .entry(minute)
                .or_insert_with(|| vec![Open::default(); n])[contract];
            o.delivered += d[i].1;
            o.used += u[i].1;
            o.reported += r[i].1;
        }
    }

    /// Forgets a host that is no longer a target: its GPUs stop counting as unreported.
    pub fn remove_host(&mut self, target: &str) {
        self.hosts.remove(target);
    }

    /// Seals every minute that ended at least `grace_ms` before `now_ms`.
    /// `committed(contract, from_ms, to_ms)` gives committed GPU-ms.
    pub fn seal(
        &mut self,
        now_ms: i64,
        grace_ms: i64,
        committed: impl Fn(usize, i64, i64) -> i64,
    ) -> Vec<Sealed> {
        let through = minute_of(now_ms - grace_ms.max(0)); // minutes < through have ended + grace
        let mut out = Vec::new();
        while self.sealed_through < through {
            let minute = self.sealed_through;
            let (m0, m1) = (minute * MINUTE_MS, (minute + 1) * MINUTE_MS);
            let per = self
                .open
                .remove(&minute)
                .unwrap_or_else(|| vec![Open::default(); self.contracts]);
            let mut expected = vec![0i64; self.contracts];
            for h in self.hosts.values() {
                let overlap = (m1 - h.known_since_ms.max(m0)).clamp(0, MINUTE_MS);
                expected[h.contract] += h.last.gpus.len() as i64 * overlap;
            }
            for (c, o) in per.iter().enumerate() {
                let unreported = (expected[c] - o.reported).max(0);
                out.push(Sealed {
                    contract: c,
                    minute,
                    totals: split(committed(c, m0, m1), o.delivered, unreported, o.used),
                });
            }
            self.sealed_through += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests;
