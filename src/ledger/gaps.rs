//! Delivery gaps: the evidence behind undelivered GPU-seconds, as intervals (never per-minute
//! rows per GPU). Pure: the ledger passes in what each reading showed.
//!
//! A gap is per contract, target and GPU (UUID), or per contract alone for `short`:
//!
//! - **`gpu_lost`**: a GPU of a host's previous reading that is gone from the next one, or
//!   whose observed time grew less than the time the agent watched (beyond rounding: see
//!   [`super::host::Verdict`]). It opens at the reading that starts the first such interval
//!   (the last reading that saw the GPU whole) and closes at the reading that starts the
//!   first interval it delivered in full, or, for a GPU that was gone, at the first reading
//!   that shows it again.
//! - **`host_unreachable`**: the aggregator could not scrape a host it had seen
//!   ([`Gaps::unreachable`], called by the aggregator on a failed scrape). One gap per GPU of
//!   the host's last reading, from that reading to the next successful one. If that next
//!   reading shows the GPU short over the interval, the gap becomes `gpu_lost` and goes on.
//!   A GPU already lost when its host becomes unreachable keeps its one `gpu_lost` gap,
//!   which then runs at least to the host's next reading.
//! - **`short`**: contract-level, minute-bounded: sealed minutes in which the commitment
//!   exceeded the contract's known capacity (the capacity the ledger expected from its hosts,
//!   plus the GPUs that are gone but have an open `gpu_lost` gap, so that a lost GPU is not
//!   counted twice). Not recorded while a target of unknown size is dark (nothing is known
//!   short then). Its `short_gpu_ms` is the GPU-ms by which the commitment exceeded them.
//!   With shards, only the sealer knows the contract's capacity: a ledger closed with
//!   [`super::Ledger::close`] keeps no `short` gap, and the sealer applies
//!   [`short_minute`] to each combined minute instead.
//!
//! Bounds are always readings (or, for `short`, minute boundaries): never guessed. An open gap
//! has no end. Gaps of one GPU never overlap.
//!
//! **Merging rule**: a gap that would open for a GPU no later than the host's reading at which
//! its previous gap closed (so at most one interval between readings, one scrape interval,
//! lies between them) reopens that gap instead: a host flapping up and down every round, or a
//! GPU stalling every other interval, is one gap, not one per flap. Such a gap may then
//! contain an interval the counters show delivered (at most one scrape interval between two
//! failures); its delivered time is counted in the ledger's figures all the same. A reopened
//! gap keeps its first cause unless the GPU is seen short (`gpu_lost`). So rows are bounded
//! by outages separated by more than a scrape interval, never by minutes. Memory holds a
//! GPU's one open gap, the closed gaps not yet persisted ([`Gaps::pending`],
//! [`Gaps::persisted`]) and, until its host's next reading, the gap closed at its last one.
//!
//! **XID codes**: the agent's `commitmeter_gpu_xid_errors_total{xid}` counters, read with
//! each reading. A code's counter grew at a reading when it is higher than at the GPU's last
//! reading; a code the GPU had not shown grew from 0 (the agent exports a code's counter from
//! its first event on), and so did one lower than before (reset by an agent restart), but a
//! GPU's first reading is only a baseline. A code that grew is attached to, in this order:
//!
//! 1. the GPU's gap open after the reading (still open, opened or reopened by it: the gap
//!    of the interval the reading closes);
//! 2. else its gap closed at this reading, or at the host's previous reading.
//!
//! So a code exported with the reading that ends a gap, or one round late (the host's first
//! exposition after it came back, or an agent that exports the XID a round after the GPU
//! fell off), is the gap's. A closed gap that takes a code after it was persisted is pending
//! again ([`Gaps::pending`]): the next commit rewrites its row, with the minutes. Growth at
//! any later reading is no gap's. The counts are kept in memory only: after a restart the
//! first reading of a GPU is a new baseline.
//!
//! **Restart** ([`Gaps::restore`]): the store holds the gaps as of its last commit (rows of
//! one GPU never overlap); the hosts' readings restored with them may be older (a host
//! checkpoint written before the last commit) or gone (re-baselined after `kill -9`).
//!
//! - An open gap comes back open. A GPU with an open `gpu_lost` gap that its host's
//!   restored reading lacks is known-but-lost capacity for `short` from the gap's start (the
//!   first reading without it is not stored: in the minutes not yet sealed at the restart it
//!   can be counted known twice for at most the interval after the start, which understates
//!   `short`, never overstates it); where the host re-baselines, from its first reading if
//!   that lacks the GPU (a restored `host_unreachable` gap of it then becomes `gpu_lost`). A
//!   closed `gpu_lost` gap counts as known from its start to its end in the minutes not
//!   sealed at the restart, whether its GPU was gone or only stalled (not stored): known
//!   twice, if stalled, which again only understates `short`. So one outage is one piece of
//!   evidence: its GPU's gap, never also `short`.
//! - A `gpu_lost` gap whose host was also unreachable at the stop is not stored as such: if
//!   the host's next reading shows the GPU delivered, the gap ends at the host's restored
//!   reading (as a lost GPU's gap does), not at that next one (as an unreachable host's does).
//! - The newest closed gap of a GPU that ends at or after its host's restored reading is taken
//!   back as closed at its end: a gap of that GPU that would open by then reopens it instead
//!   (the merging rule), so no gap ever opens before a stored one of its GPU ends, however old
//!   the restored reading. A host that re-baselines judges nothing before its next reading,
//!   so needs none.

use std::collections::{BTreeMap, BTreeSet};

use super::host::Verdict;

/// Why capacity was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cause {
    GpuLost,
    HostUnreachable,
    Short,
}

impl Cause {
    pub const ALL: [Cause; 3] = [Cause::GpuLost, Cause::HostUnreachable, Cause::Short];

    /// The name in the store and in the CSV/JSON exports.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::GpuLost => "gpu_lost",
            Cause::HostUnreachable => "host_unreachable",
            Cause::Short => "short",
        }
    }

    pub fn parse(s: &str) -> Option<Cause> {
        Cause::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// One delivery gap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub contract: usize,
    /// The scrape target; empty for `short`.
    pub target: String,
    /// The GPU's UUID; empty for `short`.
    pub gpu: String,
    pub cause: Cause,
    pub start_ms: i64,
    /// `None` while open.
    pub end_ms: Option<i64>,
    /// `short` only: GPU-ms by which the commitment exceeded the known capacity.
    pub short_gpu_ms: i64,
    /// XID codes seen during the gap.
    pub xids: BTreeSet<String>,
}

impl Gap {
    /// Length of a closed gap.
    pub fn duration_ms(&self) -> Option<i64> {
        self.end_ms.map(|e| e - self.start_ms)
    }

    /// GPU-ms the gap stands for: its duration for one GPU, the shortfall for `short`
    /// (also while open).
    pub fn gpu_ms(&self) -> Option<i64> {
        match self.cause {
            Cause::Short => Some(self.short_gpu_ms),
            _ => self.duration_ms(),
        }
    }

    /// Overlap with `[from_ms, to_ms)`, an open gap running to `to_ms`.
    pub fn overlap_ms(&self, from_ms: i64, to_ms: i64) -> i64 {
        (self.end_ms.unwrap_or(i64::MAX).min(to_ms) - self.start_ms.max(from_ms)).max(0)
    }
}

/// (contract, target, GPU).
type Key = (usize, String, String);

#[derive(Debug, Clone, PartialEq, Eq)]
struct OpenGpu {
    gap: Gap,
    /// Placement time of the first reading without the GPU: from then on the ledger no
    /// longer expects it, so it counts as known for `short` until it returns.
    absent_since: Option<i64>,
    /// Its host could not be scraped since the last reading: the gap runs at least to the
    /// next one.
    unreachable: bool,
}

/// The gaps the ledger keeps: open ones and closed ones not yet persisted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gaps {
    open: BTreeMap<Key, OpenGpu>,
    /// Per contract: the open `short` interval.
    short: BTreeMap<usize, Gap>,
    /// Closed, not yet persisted, in closing order, numbered.
    closed: Vec<(u64, Gap)>,
    next_seq: u64,
    /// Gaps closed at the last reading of their host, with that reading's time: a gap of the
    /// same GPU starting by then reopens them instead (see the module's merging rule).
    recent: BTreeMap<Key, (Gap, i64)>,
    /// Per contract: `[absent_since, returned)` of closed gaps, until sealed past.
    absent: Vec<(usize, i64, i64)>,
    /// Last XID counts per (contract, target, GPU) and code.
    xid_counts: BTreeMap<Key, BTreeMap<String, u64>>,
}

/// XID counters of one reading: per GPU UUID, per code, the counter's value.
pub type Xids = BTreeMap<String, BTreeMap<String, u64>>;

/// What one reading of a host showed, for [`Gaps::read`].
pub struct Seen<'a> {
    pub contract: usize,
    pub target: &'a str,
    /// The previous reading's placement time, when the reading closes an interval.
    pub from_ms: Option<i64>,
    /// This reading's placement time.
    pub at_ms: i64,
    /// Per GPU of the previous reading: what the interval showed.
    pub verdicts: &'a [(String, Verdict)],
    /// The GPUs of this reading.
    pub present: &'a BTreeSet<String>,
    pub xids: &'a Xids,
}

impl Gaps {
    /// Codes whose counters grew since the last reading of this GPU; remembers the counts of
    /// the GPUs `present`. A code a GPU read before had not shown grew from 0 (the agent
    /// exports a code's counter from its first event on); a count lower than the last one was
    /// reset (an agent restart) and grew from 0; a GPU's first counts are a baseline.
    fn xid_growth(
        &mut self,
        contract: usize,
        target: &str,
        xids: &Xids,
        present: &BTreeSet<String>,
    ) -> Xids {
        let mut grown = Xids::new();
        for (gpu, counts) in xids {
            let key = (contract, target.to_string(), gpu.clone());
            let known = self.xid_counts.contains_key(&key);
            let last = self.xid_counts.entry(key).or_default();
            for (code, &n) in counts {
                let before = last.get(code).copied().or(known.then_some(0));
                // Grew; or lower than before: reset (the agent restarted) and counted since.
                if before.is_some_and(|p| n > p || (0 < n && n < p)) {
                    grown
                        .entry(gpu.clone())
                        .or_default()
                        .insert(code.clone(), n);
                }
                last.insert(code.clone(), n);
            }
        }
        for gpu in present {
            self.xid_counts
                .entry((contract, target.to_string(), gpu.clone()))
                .or_default();
        }
        grown
    }

    /// Closes a GPU's open gap at `end_ms`; it may reopen up to `reopen_until`.
    fn close(&mut self, key: &Key, end_ms: i64, reopen_until: Option<i64>) {
        if let Some(mut o) = self.open.remove(key) {
            o.gap.end_ms = Some(end_ms.max(o.gap.start_ms));
            if let Some(b) = o.absent_since {
                self.absent.push((key.0, b, end_ms));
            }
            if let Some(until) = reopen_until {
                self.recent.insert(key.clone(), (o.gap.clone(), until));
            }
            self.closed.push((self.next_seq, o.gap));
            self.next_seq += 1;
        }
    }

    /// The open gap of a GPU, opened at `start_ms` with `cause` if there is none: the gap
    /// it closed at its host's last reading, reopened, when that reading is no earlier.
    fn open_gap(&mut self, k: Key, start_ms: i64, cause: Cause) -> &mut OpenGpu {
        if !self.open.contains_key(&k) {
            let gap = match self.recent.remove(&k) {
                Some((mut g, until)) if start_ms <= until => {
                    self.unpend(&g);
                    g.end_ms = None;
                    g
                }
                _ => Gap {
                    contract: k.0,
                    target: k.1.clone(),
                    gpu: k.2.clone(),
                    cause,
                    start_ms,
                    end_ms: None,
                    short_gpu_ms: 0,
                    xids: BTreeSet::new(),
                },
            };
            self.open.insert(
                k.clone(),
                OpenGpu {
                    gap,
                    absent_since: None,
                    unreachable: false,
                },
            );
        }
        self.open.get_mut(&k).expect("just opened")
    }

    /// Applies one reading that advanced a host (its first one, or one closing an interval).
    pub fn read(&mut self, s: Seen<'_>) {
        let grown = self.xid_growth(s.contract, s.target, s.xids, s.present);
        let key = |gpu: &str| (s.contract, s.target.to_string(), gpu.to_string());
        let mut judged: BTreeSet<&str> = BTreeSet::new();
        if let Some(from) = s.from_ms {
            for (gpu, v) in s.verdicts {
                judged.insert(gpu);
                let k = key(gpu);
                let gone = !s.present.contains(gpu);
                match v {
                    Verdict::Short => {
                        let o = self.open_gap(k, from, Cause::GpuLost);
                        o.gap.cause = Cause::GpuLost;
                        o.unreachable = false;
                        if gone && o.absent_since.is_none() {
                            o.absent_since = Some(s.at_ms);
                        }
                    }
                    Verdict::Full => {
                        let Some(o) = self.open.get_mut(&k) else {
                            continue;
                        };
                        // Unreachable until this reading; lost until the previous one (the
                        // counters prove the interval delivered).
                        let end = if o.unreachable { s.at_ms } else { from };
                        self.close(&k, end, Some(s.at_ms));
                    }
                    Verdict::Rejected => {
                        if let Some(o) = self.open.get_mut(&k) {
                            o.unreachable = false;
                        }
                    }
                }
            }
        }
        // A GPU seen again (or seen on a host's first reading): its gap ends here.
        for gpu in s.present {
            if judged.contains(gpu.as_str()) {
                continue;
            }
            let k = key(gpu);
            if self.open.contains_key(&k) {
                self.close(&k, s.at_ms, Some(s.at_ms));
            }
        }
        // An open gap of a GPU this reading lacks and did not judge (a gap restored after a
        // restart, its host re-baselining): the GPU is lost, known but no longer expected.
        let host = (s.contract, s.target.to_string(), String::new());
        for (k, o) in self.open.range_mut(host..) {
            if k.0 != s.contract || k.1 != s.target {
                break;
            }
            if !s.present.contains(&k.2) && !judged.contains(k.2.as_str()) {
                o.gap.cause = Cause::GpuLost;
                o.unreachable = false;
                o.absent_since.get_or_insert(s.at_ms);
            }
        }
        // XIDs: to the GPU's open gap, else to its gap closed at this reading or the last.
        for (gpu, codes) in &grown {
            let k = key(gpu);
            if let Some(o) = self.open.get_mut(&k) {
                o.gap.xids.extend(codes.keys().cloned());
            } else if let Some((g, _)) = self.recent.get_mut(&k) {
                let had = g.xids.len();
                g.xids.extend(codes.keys().cloned());
                if g.xids.len() != had {
                    let g = g.clone();
                    self.rewrite_closed(g);
                }
            }
        }
        // Gaps closed before this reading can no longer reopen, nor take XIDs.
        self.recent
            .retain(|k, (_, until)| !(k.0 == s.contract && k.1 == s.target && *until < s.at_ms));
    }

    /// A closed gap changed (late XIDs): pending again, numbered anew in place of a pending
    /// copy (a write in flight may hold that one: the change goes with the next write), or,
    /// if it was persisted, written again (the store replaces the row).
    fn rewrite_closed(&mut self, g: Gap) {
        self.unpend(&g);
        self.closed.push((self.next_seq, g));
        self.next_seq += 1;
    }

    /// Drops the pending closed copy of gap `g` (the same contract, target, GPU and start).
    fn unpend(&mut self, g: &Gap) {
        self.closed.retain(|(_, c)| {
            !(c.start_ms == g.start_ms
                && c.gpu == g.gpu
                && c.target == g.target
                && c.contract == g.contract)
        });
    }

    /// The aggregator could not scrape a host last read at `last_ms` with `gpus`: each GPU
    /// without an open gap gets a `host_unreachable` one from that reading.
    pub fn unreachable<'a>(
        &mut self,
        contract: usize,
        target: &str,
        last_ms: i64,
        gpus: impl IntoIterator<Item = &'a String>,
    ) {
        for gpu in gpus {
            let k = (contract, target.to_string(), gpu.clone());
            self.open_gap(k, last_ms, Cause::HostUnreachable)
                .unreachable = true;
        }
    }

    /// A target left the contract and is no longer expected from `until_ms`: its open gaps
    /// end there.
    pub fn retire(&mut self, contract: usize, target: &str, until_ms: i64) {
        let keys: Vec<Key> = self
            .open
            .keys()
            .filter(|k| k.0 == contract && k.1 == target)
            .cloned()
            .collect();
        for k in keys {
            self.close(&k, until_ms, None);
        }
        self.recent
            .retain(|k, _| !(k.0 == contract && k.1 == target));
        self.xid_counts
            .retain(|k, _| !(k.0 == contract && k.1 == target));
    }

    /// GPU-ms of `[m0, m1)` of GPUs of `contract` that are gone but have an open gap: known,
    /// though the ledger no longer expects them.
    pub fn absent_ms(&self, contract: usize, m0: i64, m1: i64) -> i64 {
        let overlap = |a: i64, b: i64| (b.min(m1) - a.max(m0)).max(0);
        let open: i64 = self
            .open
            .iter()
            .filter(|(k, _)| k.0 == contract)
            .filter_map(|(_, o)| o.absent_since)
            .map(|b| overlap(b, i64::MAX))
            .sum();
        let closed: i64 = self
            .absent
            .iter()
            .filter(|a| a.0 == contract)
            .map(|&(_, b, e)| overlap(b, e))
            .sum();
        open + closed
    }

    /// The sealed minute starting at `m0` of `contract` was short of the commitment by
    /// `short_ms` GPU-ms (0 or less: not short; `None`: unknown, a target of unknown size
    /// was dark): the contract's `short` gap grows, opens or closes ([`short_minute`]).
    pub fn seal_short(&mut self, contract: usize, m0: i64, short_ms: Option<i64>) {
        let (open, closed) = short_minute(self.short.remove(&contract), contract, m0, short_ms);
        if let Some(g) = open {
            self.short.insert(contract, g);
        }
        if let Some(g) = closed {
            self.closed.push((self.next_seq, g));
            self.next_seq += 1;
        }
    }

    /// Every minute before `sealed_ms` is sealed: absent spans that ended by then no longer
    /// count for any contract.
    pub fn minute_sealed(&mut self, sealed_ms: i64) {
        self.absent.retain(|a| a.2 > sealed_ms);
    }

    /// Every open gap and every closed one not yet persisted, and the mark to pass to
    /// [`Gaps::persisted`] once they are written.
    pub fn pending(&self) -> (Vec<Gap>, u64) {
        let mut out: Vec<Gap> = self.closed.iter().map(|c| c.1.clone()).collect();
        out.extend(self.open.values().map(|o| o.gap.clone()));
        out.extend(self.short.values().cloned());
        (out, self.next_seq)
    }

    /// The closed gaps pending at `mark` are durable: forget them.
    pub fn persisted(&mut self, mark: u64) {
        self.closed.retain(|c| c.0 >= mark);
    }

    /// Takes back the gaps durable storage holds, after a restart: every open one, and the
    /// closed ones that a restored host's next reading could meet (see the module's
    /// *Restart* rules; more may be passed, they are ignored). `last(contract, target, gpu)`
    /// is the host's last reading restored with the ledger: its time, and whether it had the
    /// GPU; `None` where the host re-baselines.
    pub fn restore(
        &mut self,
        gaps: impl IntoIterator<Item = Gap>,
        last: impl Fn(usize, &str, &str) -> Option<(i64, bool)>,
    ) {
        let mut latest: BTreeMap<Key, (Gap, i64)> = BTreeMap::new();
        for g in gaps {
            if g.cause == Cause::Short {
                if g.end_ms.is_none() {
                    self.short.insert(g.contract, g);
                }
                continue;
            }
            let host = last(g.contract, &g.target, &g.gpu);
            let k = (g.contract, g.target.clone(), g.gpu.clone());
            match g.end_ms {
                None => {
                    let gone = matches!(host, Some((_, false)));
                    self.open.insert(
                        k,
                        OpenGpu {
                            unreachable: g.cause == Cause::HostUnreachable && !gone,
                            absent_since: gone.then_some(g.start_ms),
                            gap: g,
                        },
                    );
                }
                Some(end) => {
                    if g.cause == Cause::GpuLost {
                        // Known-but-lost until its end, as far as minutes not sealed yet
                        // go (whether it was gone or only stalled is not stored: as if gone).
                        self.absent.push((g.contract, g.start_ms, end));
                    }
                    if host.is_some_and(|(at, _)| at <= end)
                        && latest.get(&k).is_none_or(|l| l.1 < end)
                    {
                        latest.insert(k, (g, end));
                    }
                }
            }
        }
        for (k, r) in latest {
            if !self.open.contains_key(&k) {
                self.recent.insert(k, r);
            }
        }
    }

    /// How many gaps are held in memory (open, closed not yet persisted, closed at their
    /// host's last reading).
    pub fn held(&self) -> usize {
        self.open.len() + self.short.len() + self.closed.len() + self.recent.len()
    }
}

/// The `short` rule for one sealed minute, on its own so that a sealer that keeps the
/// contract's open `short` gap elsewhere (the shared book) applies the same one as
/// [`Gaps::seal_short`]: given the contract's open `short` gap (if any) and the minute
/// starting at `m0` short by `short_ms` (see [`super::shard::Combined::short`]), returns
/// the open gap after it and the gap it closed. Short (> 0): the gap opens at `m0` or
/// grows by `short_ms`; not short, or unknown (`None`): an open gap closes at `m0`.
pub fn short_minute(
    open: Option<Gap>,
    contract: usize,
    m0: i64,
    short_ms: Option<i64>,
) -> (Option<Gap>, Option<Gap>) {
    match short_ms {
        Some(ms) if ms > 0 => {
            let mut g = open.unwrap_or_else(|| Gap {
                contract,
                target: String::new(),
                gpu: String::new(),
                cause: Cause::Short,
                start_ms: m0,
                end_ms: None,
                short_gpu_ms: 0,
                xids: BTreeSet::new(),
            });
            g.short_gpu_ms = g.short_gpu_ms.saturating_add(ms);
            (Some(g), None)
        }
        _ => (
            None,
            open.map(|mut g| {
                g.end_ms = Some(m0);
                g
            }),
        ),
    }
}

#[cfg(test)]
mod tests;
