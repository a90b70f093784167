//! The contract ledger: pure accounting from agents' counters to sealed per-minute contract
//! buckets. No I/O, no clocks, no tokio: callers pass times in.
//!
//! All amounts are integer GPU-milliseconds, so the identity
//! `committed = used_within_commitment + idle + undelivered + unreported`
//! holds exactly for every sealed minute and contract, and so does the idle split
//! `idle = idle_unallocated + idle_allocated` (a refinement of a term, not a new term:
//! [`Kind::part_of`]).
//!
//! How readings become minutes:
//! - [`host`] turns each host's readings into intervals of evidence on the agent's own time
//!   scale: expected, watched (reported), delivered and used GPU-ms, physically possible.
//! - Each interval is spread over the minutes it covers in proportion to time ([`apportion`]),
//!   delivered in proportion to reported and used in proportion to delivered, so per host
//!   and minute `used <= delivered <= reported <= expected`. Held GPU-ms (a process held
//!   the GPU, the usage signal says unused) are spread in proportion to delivered − used,
//!   so per host and minute `held <= delivered − used`; a minute seals its idle split from
//!   their sum (see [`split_held`]).
//! - Allocated GPU-ms (a compute process held the GPU) are spread in proportion to
//!   delivered and divided among teams minute by minute ([`teams`]): per contract and minute
//!   Σ teams' allocated == the contract's allocated exactly, and each team's used <= its
//!   allocated. Time no owner explains is team [`UNASSIGNED`].
//! - A minute seals `grace` after it ends ([`Ledger::seal`]): known hosts that did not report
//!   add their GPUs to what was expected, and [`split`] divides the commitment by evidence.
//!   Sealed minutes never change; what arrives later for them is counted as late
//!   (delivered and used only: held GPU-ms for a sealed minute are dropped, as its idle is,
//!   and so are its allocated GPU-ms and their teams, alike, so the minute's teams still
//!   sum to its allocated).
//! - [`gaps`] keeps the evidence behind undelivered capacity as intervals per host and GPU
//!   (GPU lost, host unreachable) and per contract (`short`): the SLA's delivery gaps.
//! - Sealing is two steps: a minute is closed into one [`shard::Partial`] per contract (the
//!   ledger's evidence), then split by [`shard::combine`]. [`Ledger::seal`] does both (one
//!   aggregator, one shard); a sharded aggregator calls [`Ledger::close`] and the shared
//!   book combines all shards' partials.

pub mod alerts;
pub mod burn;
pub mod gaps;
pub mod host;
pub mod kind;
pub mod shard;
pub mod teams;
pub mod totals;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

pub use gaps::{Cause, Gap, Gaps, Xids};
pub use host::{
    Checkpoint, GpuCounters, HostState, Interval, Outcome, OwnerCounters, Reading, Reject, Verdict,
};
pub use kind::{Kind, Totals};
pub use teams::{TeamAmounts, UNASSIGNED};

pub const MINUTE_MS: i64 = 60_000;

/// Index of the minute containing `t_ms` (floor division, also before 1970).
pub fn minute_of(t_ms: i64) -> i64 {
    t_ms.div_euclid(MINUTE_MS)
}

/// Running sums of one open minute of one contract, in GPU-ms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Open {
    pub delivered: i64,
    pub used: i64,
    /// Capacity the agents watched (GPUs that answered or vanished under watch).
    pub reported: i64,
    /// Capacity of known hosts over the intervals placed in this minute.
    pub expected: i64,
    /// Delivered GPU-ms that a compute process held and the usage signal says were not
    /// used (never more than delivered − used per host): the evidence for `idle_allocated`.
    pub held: i64,
    /// GPU-ms a compute process held the contract's GPUs (credited readings with the
    /// allocated counters only): the Σ of the minute's teams' allocated.
    pub allocated: i64,
}

/// Splits one minute's commitment by evidence.
///
/// Delivered capacity fills the commitment first. What is short of it is **unreported** as
/// far as the aggregator could not see (`unseen`: known capacity not watched), or entirely
/// when a target of unknown size was dark (`dark`): any shortfall could be that target's.
/// Only the rest is **undelivered**: capacity watched and not there, or a fleet smaller than
/// the commitment while every target reports. Usage fills delivered capacity within the
/// commitment; usage beyond it is overage.
///
/// No evidence of held GPUs here: all idle is unallocated (see [`split_held`]).
pub fn split(committed: i64, delivered: i64, used: i64, unseen: i64, dark: bool) -> Totals {
    split_held(committed, delivered, used, 0, unseen, dark)
}

/// [`split`], with `held`: GPU-ms during which a compute process held delivered GPUs that
/// the usage signal says were not used. Idle is split by it, allocated first against the
/// commitment: `idle_allocated = min(held, idle)`, `idle_unallocated = idle −
/// idle_allocated`, so `idle = idle_unallocated + idle_allocated` exactly. When delivered
/// exceeds the commitment, the GPUs that jobs held count against it first.
pub fn split_held(
    committed: i64,
    delivered: i64,
    used: i64,
    held: i64,
    unseen: i64,
    dark: bool,
) -> Totals {
    let committed = committed.max(0);
    let (delivered, used, unseen) = (delivered.max(0), used.max(0), unseen.max(0));
    let delivered_within = delivered.min(committed);
    let short = committed - delivered_within;
    let unreported = if dark { short } else { unseen.min(short) };
    let used_within = used.min(delivered_within);
    let idle = delivered_within - used_within;
    let idle_allocated = held.clamp(0, idle);
    Totals {
        committed,
        delivered,
        used,
        idle,
        undelivered: short - unreported,
        unreported,
        overage: used - used_within,
        idle_unallocated: idle - idle_allocated,
        idle_allocated,
    }
}

/// The pieces of `[from_ms, to_ms)` in each minute: `(minute, ms)`.
pub fn pieces(from_ms: i64, to_ms: i64) -> Vec<(i64, i64)> {
    let mut out = Vec::new();
    let mut t = from_ms;
    while t < to_ms {
        let m = minute_of(t);
        let end = ((m + 1) * MINUTE_MS).min(to_ms);
        out.push((m, end - t));
        t = end;
    }
    out
}

/// Divides `amount` in proportion to `weights`: integer parts that sum to `amount` exactly
/// (largest remainder, ties to the earliest). When `amount <= Σ weights`, no part exceeds
/// its weight, so a share of a share never exceeds the share. All zero weights: all zero.
pub fn apportion(amount: i64, weights: &[i64]) -> Vec<i64> {
    let total: i128 = weights.iter().map(|&w| i128::from(w.max(0))).sum();
    if total == 0 || amount <= 0 {
        return vec![0; weights.len()];
    }
    let mut out = Vec::with_capacity(weights.len());
    let mut rema: Vec<(i128, usize)> = Vec::with_capacity(weights.len());
    let mut given = 0i64;
    for (i, &w) in weights.iter().enumerate() {
        let exact = i128::from(amount) * i128::from(w.max(0));
        let share = (exact / total) as i64;
        if exact % total != 0 {
            rema.push((exact % total, i));
        }
        given += share;
        out.push(share);
    }
    rema.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in rema.iter().take((amount - given) as usize) {
        out[i] += 1;
    }
    out
}

/// Spreads `amount` over the minutes of `[from_ms, to_ms)` in proportion to time.
pub fn spread(from_ms: i64, to_ms: i64, amount: i64) -> Vec<(i64, i64)> {
    let p = pieces(from_ms, to_ms);
    let lens: Vec<i64> = p.iter().map(|x| x.1).collect();
    p.iter()
        .map(|x| x.0)
        .zip(apportion(amount, &lens))
        .collect()
}

/// One contract's view of a sealed minute.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sealed {
    pub contract: usize,
    pub minute: i64,
    pub totals: Totals,
    /// The contract's allocated GPU-ms: Σ of `teams`' allocated, exactly.
    pub allocated: i64,
    /// `(team, allocated, used)` GPU-ms, rows with any time only, sorted by team; used <=
    /// allocated.
    pub teams: Vec<TeamRow>,
}

/// A team's `(team, allocated, used)` GPU-ms.
pub type TeamRow = (String, i64, i64);

/// A target and the contract it is accounted for.
pub type TargetKey = (String, usize);

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
    /// Per (target, contract).
    hosts: HashMap<TargetKey, HostState>,
    /// GPU-ms that arrived for sealed minutes, per contract (delivered, used).
    late: Vec<(i64, i64)>,
    /// The same late GPU-ms by the minute they were for, not yet durable: a statement
    /// reports a period's late GPU-ms, not the ledger's whole life.
    late_pending: BTreeMap<(usize, i64), (i64, i64)>,
    /// How far an agent's clock may stray, in this ledger's time (see [`host`]).
    clock_tolerance_ms: i64,
    /// Delivery gaps: open, and closed but not yet persisted (see [`gaps`]).
    gaps: Gaps,
    /// The open minutes' team sums, by (minute, contract): Σ allocated == the minute's
    /// [`Open::allocated`].
    open_teams: BTreeMap<(i64, usize), TeamAmounts>,
}

/// GPU-ms (delivered, used) that arrived for contract `contract`'s sealed `minute`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LateMinute {
    pub contract: usize,
    pub minute: i64,
    pub delivered: i64,
    pub used: i64,
}

/// Everything needed to resume after a crash, written atomically with sealed minutes.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    pub since: i64,
    pub sealed_through: i64,
    pub open: Vec<(i64, usize, Open)>,
    /// Sorted by target, then contract.
    pub hosts: Vec<(String, usize, HostState)>,
    /// Per contract: (delivered, used) GPU-ms that arrived for sealed minutes.
    pub late: Vec<(i64, i64)>,
    /// The open minutes' team sums: `(minute, contract, team, allocated, used)`, sorted.
    pub open_teams: Vec<(i64, usize, String, i64, i64)>,
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
            late_pending: BTreeMap::new(),
            clock_tolerance_ms: host::CLOCK_TOLERANCE_MS,
            gaps: Gaps::default(),
            open_teams: BTreeMap::new(),
        }
    }

    /// Sets how far an agent's clock may stray before it is re-anchored, in the ledger's
    /// time: a simulated clock running faster than real time scales it.
    pub fn with_clock_tolerance(mut self, ms: i64) -> Self {
        self.clock_tolerance_ms = ms;
        self
    }

    pub fn clock_tolerance_ms(&self) -> i64 {
        self.clock_tolerance_ms
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
            .filter(|(_, c, _)| *c < contracts)
            .map(|(t, c, h)| ((t, c), h))
            .collect();
        for (c, late) in snap.late.into_iter().enumerate().take(contracts) {
            l.late[c] = late;
        }
        for (minute, c, team, a, u) in snap.open_teams {
            if c < contracts && minute >= l.sealed_through {
                teams::add(l.open_teams.entry((minute, c)).or_default(), &team, a, u);
            }
        }
        l
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut snap = self.snapshot_without_hosts();
        let mut hosts: Vec<(String, usize, HostState)> = self
            .hosts
            .iter()
            .map(|((t, c), h)| (t.clone(), *c, h.clone()))
            .collect();
        hosts.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        snap.hosts = hosts;
        snap
    }

    /// [`Ledger::snapshot`] with `hosts` empty: what a write between two host checkpoints
    /// needs (a copy of 125,000 hosts' states every round costs ~200 MB and their sort).
    pub fn snapshot_without_hosts(&self) -> Snapshot {
        let mut open = Vec::new();
        for (&minute, per) in &self.open {
            for (c, o) in per.iter().enumerate() {
                if *o != Open::default() {
                    open.push((minute, c, *o));
                }
            }
        }
        Snapshot {
            since: self.since,
            sealed_through: self.sealed_through,
            open,
            hosts: Vec::new(),
            late: self.late.clone(),
            open_teams: self
                .open_teams
                .iter()
                .flat_map(|(&(minute, c), per)| {
                    per.iter()
                        .map(move |(team, &(a, u))| (minute, c, team.clone(), a, u))
                })
                .collect(),
        }
    }

    /// Moves the start of a ledger that has sealed nothing yet to the minute after `t_ms`
    /// and after every host's first reading: called after the first scrape round, so every
    /// host's baseline precedes the first accounted minute.
    pub fn start_after(&mut self, t_ms: i64) {
        if self.sealed_through == self.since && self.open.is_empty() {
            let first = self
                .hosts
                .values()
                .filter_map(|h| h.sized_since_ms)
                .fold(t_ms, i64::max);
            self.since = minute_of(first) + 1;
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

    pub fn host(&self, target: &str, contract: usize) -> Option<&HostState> {
        self.hosts.get(&(target.to_string(), contract))
    }

    /// The targets configured now, each with the contracts that select it: one contract
    /// (scraped for it), or several (a conflict: never scraped, dark in each). A new
    /// target is dark until its first reading with GPU series sizes it. A known target
    /// that left a contract is retired: its GPUs stay expected (unreported) until
    /// `retire_until(contract, now_ms)`; one that never reported is simply dropped.
    pub fn configure(
        &mut self,
        now_ms: i64,
        targets: &[(String, Vec<usize>)],
        retire_until: impl Fn(usize, i64) -> i64,
    ) {
        let mut wanted: HashSet<TargetKey> = HashSet::new();
        for (target, contracts) in targets {
            for &c in contracts.iter().filter(|&&c| c < self.contracts) {
                wanted.insert((target.clone(), c));
            }
        }
        self.hosts.retain(|key, h| {
            if wanted.contains(key) {
                h.retired_until_ms = None;
                return true;
            }
            if h.last.is_none() {
                return false;
            }
            if h.retired_until_ms.is_none() {
                h.retired_until_ms = Some(retire_until(key.1, now_ms).max(now_ms));
            }
            true
        });
        for key in wanted {
            self.hosts
                .entry(key)
                .or_insert_with(|| HostState::new(now_ms));
        }
    }

    /// Records a successful scrape of `target` for `contract`. Returns what was rejected
    /// and noticed, for the operator; the ledger itself keeps only the evidence.
    pub fn observe(&mut self, target: &str, contract: usize, reading: Reading) -> Outcome {
        self.observe_with_xids(target, contract, reading, &Xids::new())
    }

    /// [`Ledger::observe`], with the reading's XID counters (per GPU UUID, per code: the
    /// value of `commitmeter_gpu_xid_errors_total`), which the gap list attaches to the
    /// gaps they happened in.
    pub fn observe_with_xids(
        &mut self,
        target: &str,
        contract: usize,
        reading: Reading,
        xids: &Xids,
    ) -> Outcome {
        if contract >= self.contracts {
            return Outcome::default();
        }
        let received = reading.received_ms;
        let host = self
            .hosts
            .entry((target.to_string(), contract))
            .or_insert_with(|| HostState::new(received));
        host.retired_until_ms = None;
        let before = host.last.as_ref().map(|l| l.at_ms);
        let out = host.read(reading, self.clock_tolerance_ms);
        if let Some(last) = host.last.as_ref().filter(|l| Some(l.at_ms) != before) {
            let present: BTreeSet<String> = last.gpus.keys().cloned().collect();
            self.gaps.read(gaps::Seen {
                contract,
                target,
                from_ms: out.interval.map(|iv| iv.from_ms),
                at_ms: last.at_ms,
                verdicts: &out.gpus,
                present: &present,
                xids,
            });
        }
        if let Some(iv) = out.interval {
            self.attribute(contract, &iv, &out.teams);
        }
        out
    }

    /// Records a failed scrape of `target` for `contract` (the aggregator calls it for
    /// every target whose scrape failed): a host that had been seen opens a
    /// `host_unreachable` gap per GPU of its last reading, from that reading on.
    pub fn unreachable(&mut self, target: &str, contract: usize) {
        let Some(h) = self.hosts.get(&(target.to_string(), contract)) else {
            return;
        };
        if let (Some(last), None) = (&h.last, h.retired_until_ms) {
            self.gaps
                .unreachable(contract, target, last.at_ms, last.gpus.keys());
        }
    }

    /// Every open delivery gap and every closed one not yet persisted, with the mark to
    /// pass to [`Ledger::gaps_persisted`] once the store has written them (in the same
    /// transaction as the sealed minutes).
    pub fn pending_gaps(&self) -> (Vec<Gap>, u64) {
        self.gaps.pending()
    }

    /// The late GPU-ms not yet durable, by contract and the minute they were for (at most
    /// one entry per contract and minute), for the store to add to its per-minute record.
    pub fn pending_late(&self) -> Vec<LateMinute> {
        self.late_pending
            .iter()
            .map(|(&(contract, minute), &(delivered, used))| LateMinute {
                contract,
                minute,
                delivered,
                used,
            })
            .collect()
    }

    /// The late GPU-ms `written` (from [`Ledger::pending_late`]) are durable: what arrived
    /// for the same minutes meanwhile stays pending.
    pub fn late_persisted(&mut self, written: &[LateMinute]) {
        for w in written {
            if let Some(p) = self.late_pending.get_mut(&(w.contract, w.minute)) {
                p.0 = p.0.saturating_sub(w.delivered);
                p.1 = p.1.saturating_sub(w.used);
                if *p == (0, 0) {
                    self.late_pending.remove(&(w.contract, w.minute));
                }
            }
        }
    }

    /// The closed gaps up to `mark` (from [`Ledger::pending_gaps`]) are durable.
    pub fn gaps_persisted(&mut self, mark: u64) {
        self.gaps.persisted(mark);
    }

    /// Takes back the gaps the store holds (after a restart, with [`Ledger::restore`]): the
    /// open ones, and the closed ones ending at or after [`Ledger::restore_gaps_from`] (more
    /// are ignored). See [`gaps`], *Restart*.
    pub fn restore_gaps(&mut self, gaps: impl IntoIterator<Item = Gap>) {
        let hosts = &self.hosts;
        self.gaps.restore(gaps, |contract, target, gpu| {
            let last = hosts.get(&(target.to_string(), contract))?.last.as_ref()?;
            Some((last.at_ms, last.gpus.contains_key(gpu)))
        });
    }

    /// The earliest end of a closed gap that [`Ledger::restore_gaps`] needs: the earliest
    /// last reading of a restored host, at which a new gap may open, or the first minute
    /// not sealed, if earlier (a lost GPU is known capacity there). `None`: no host has a
    /// reading (every host re-baselines, their contracts dark until read), so only the
    /// open gaps are needed.
    pub fn restore_gaps_from(&self) -> Option<i64> {
        self.hosts
            .values()
            .filter_map(|h| h.last.as_ref().map(|l| l.at_ms))
            .min()
            .map(|t| t.min(self.sealed_through.saturating_mul(MINUTE_MS)))
    }

    fn attribute(&mut self, contract: usize, iv: &Interval, teams: &TeamAmounts) {
        for (minute, len) in pieces(iv.from_ms, iv.to_ms) {
            if let Some(o) = self.open_mut(contract, minute) {
                o.expected = o
                    .expected
                    .saturating_add(iv.expected_gpus.saturating_mul(len));
            }
        }
        let watched = pieces(iv.watched_from_ms, iv.to_ms);
        let lens: Vec<i64> = watched.iter().map(|p| p.1).collect();
        let reported = apportion(iv.reported, &lens);
        let delivered = apportion(iv.delivered, &reported);
        let used = apportion(iv.used, &delivered);
        // Held like used: within each minute's delivered − used (`held <= delivered − used`
        // for the interval, so no part exceeds its weight).
        let unused: Vec<i64> = delivered.iter().zip(&used).map(|(d, u)| d - u).collect();
        let held = apportion(iv.held, &unused);
        // Allocated within each minute's delivered (per GPU it is at most its credited
        // delivered; only the host's surplus carry can leave the interval's delivered
        // below it, then in proportion to time), and its teams minute by minute.
        let alloc_weights = if iv.allocated <= delivered.iter().sum::<i64>() {
            &delivered
        } else {
            &lens
        };
        let allocated = apportion(iv.allocated, alloc_weights);
        let team_rows = teams::spread(teams, &allocated);
        for (i, &(minute, _)) in watched.iter().enumerate() {
            if minute < self.since {
                continue;
            }
            if minute < self.sealed_through {
                // Late: delivered and used are counted as such; held, allocated and team
                // time for a sealed minute are dropped (alike, so it still sums exactly).
                if delivered[i] != 0 || used[i] != 0 {
                    for late in [
                        &mut self.late[contract],
                        self.late_pending.entry((contract, minute)).or_default(),
                    ] {
                        late.0 = late.0.saturating_add(delivered[i]);
                        late.1 = late.1.saturating_add(used[i]);
                    }
                }
                continue;
            }
            if let Some(o) = self.open_mut(contract, minute) {
                o.reported = o.reported.saturating_add(reported[i]);
                o.delivered = o.delivered.saturating_add(delivered[i]);
                o.used = o.used.saturating_add(used[i]);
                o.held = o.held.saturating_add(held[i]);
                o.allocated = o.allocated.saturating_add(allocated[i]);
                if !team_rows[i].is_empty() {
                    let per = self.open_teams.entry((minute, contract)).or_default();
                    for (team, &(a, u)) in &team_rows[i] {
                        teams::add(per, team, a, u);
                    }
                }
            }
        }
    }

    /// The open minute's sums, or `None` for a minute before the ledger or already sealed.
    fn open_mut(&mut self, contract: usize, minute: i64) -> Option<&mut Open> {
        if minute < self.sealed_through {
            return None;
        }
        let n = self.contracts;
        Some(
            &mut self
                .open
                .entry(minute)
                .or_insert_with(|| vec![Open::default(); n])[contract],
        )
    }

    /// Seals every minute that ended at least `grace_ms` before `now_ms`.
    /// `committed(contract, from_ms, to_ms)` gives committed GPU-ms.
    ///
    /// Each minute is closed into one [`shard::Partial`] per contract (as by
    /// [`Ledger::close`]) and split by [`shard::combine`] alone: a single aggregator is the
    /// one-shard book.
    /// The contract's `short` delivery gap is kept here, from [`shard::Combined::short`].
    pub fn seal(
        &mut self,
        now_ms: i64,
        grace_ms: i64,
        committed: impl Fn(usize, i64, i64) -> i64,
    ) -> Vec<Sealed> {
        self.seal_with_short(now_ms, grace_ms, committed)
            .into_iter()
            .map(|(s, _)| s)
            .collect()
    }

    /// [`Ledger::seal`], with each sealed minute's `short` (which the tests compare).
    fn seal_with_short(
        &mut self,
        now_ms: i64,
        grace_ms: i64,
        committed: impl Fn(usize, i64, i64) -> i64,
    ) -> Vec<(Sealed, Option<i64>)> {
        let through = minute_of(now_ms.saturating_sub(grace_ms.max(0)));
        let mut out = Vec::new();
        while self.sealed_through < through {
            let minute = self.sealed_through;
            let (m0, m1) = (minute * MINUTE_MS, (minute + 1) * MINUTE_MS);
            for (c, partial) in self.close_minute(minute).into_iter().enumerate() {
                let combined = shard::combine(committed(c, m0, m1), &[&partial], 0);
                self.gaps.seal_short(c, m0, combined.short);
                out.push((
                    Sealed {
                        contract: c,
                        minute,
                        totals: combined.totals,
                        allocated: combined.allocated,
                        teams: combined.teams,
                    },
                    combined.short,
                ));
            }
            self.minute_closed();
        }
        out
    }

    /// Closes every minute that ended at least `grace_ms` before `now_ms` (the minutes
    /// [`Ledger::seal`] would seal) into this ledger's evidence for each contract, a
    /// [`shard::Partial`], instead of splitting it: the entry point of a sharded
    /// aggregator, whose partials the shared book combines with the other shards'
    /// ([`shard::combine`]). Minutes in order, contracts in order within a minute.
    ///
    /// As with `seal`, the minutes are closed here for good: [`Ledger::sealed_through`]
    /// advances, and what arrives later for them is late ([`Ledger::late`]).
    ///
    /// Delivery gaps: the per-GPU gaps (`gpu_lost`, `host_unreachable`) of this ledger's
    /// hosts are kept here as always ([`Ledger::pending_gaps`]). The contract's `short` gap
    /// is not: it needs the contract's capacity over all shards, which only the sealer has.
    /// A ledger closed with `close` records no `short` gap; the sealer keeps it from each
    /// minute's [`shard::Combined::short`] with [`gaps::short_minute`], the rule `seal`
    /// applies. A ledger is either sealed or closed, not both.
    pub fn close(&mut self, now_ms: i64, grace_ms: i64) -> Vec<ClosedMinute> {
        let through = minute_of(now_ms.saturating_sub(grace_ms.max(0)));
        let mut out = Vec::new();
        while self.sealed_through < through {
            let minute = self.sealed_through;
            for (contract, partial) in self.close_minute(minute).into_iter().enumerate() {
                out.push(ClosedMinute {
                    contract,
                    minute,
                    partial,
                });
            }
            self.minute_closed();
        }
        out
    }

    /// The first minute not sealed is closed: the next one is, and retired hosts whose
    /// known GPUs are no longer expected leave.
    fn minute_closed(&mut self) {
        self.sealed_through += 1;
        let sealed_ms = self.sealed_through * MINUTE_MS;
        self.gaps.minute_sealed(sealed_ms);
        let gaps = &mut self.gaps;
        self.hosts.retain(|(t, c), h| match h.retired_until_ms {
            Some(until) if until <= sealed_ms => {
                gaps.retire(*c, t, until);
                false
            }
            _ => true,
        });
    }

    /// The evidence of the first minute not sealed, `minute`, per contract; takes its open
    /// sums and teams.
    fn close_minute(&mut self, minute: i64) -> Vec<shard::Partial> {
        let (m0, m1) = (minute * MINUTE_MS, (minute + 1) * MINUTE_MS);
        let per = self
            .open
            .remove(&minute)
            .unwrap_or_else(|| vec![Open::default(); self.contracts]);
        let mut out: Vec<shard::Partial> = per
            .iter()
            .map(|o| shard::Partial {
                delivered: o.delivered,
                used: o.used,
                reported: o.reported,
                expected: o.expected,
                held: o.held,
                allocated: o.allocated,
                ..shard::Partial::default()
            })
            .collect();
        let overlap = |a: i64, b: i64| (b.min(m1) - a.max(m0)).max(0);
        for ((_, c), h) in &self.hosts {
            let p = &mut out[*c];
            // A contract with a target for the whole minute was monitored then.
            p.watched |= h.added_ms <= m0;
            if let Some(last) = &h.last {
                // Known GPUs from the last reading on, until retired: expected, not
                // watched.
                let until = h.retired_until_ms.unwrap_or(i64::MAX);
                let tail = overlap(last.at_ms, until);
                p.expected = p.expected.saturating_add(h.gpus().saturating_mul(tail));
                if h.added_ms <= m1 && until > m1 {
                    p.capacity_gpus = p.capacity_gpus.saturating_add(h.gpus());
                }
            }
            if overlap(h.added_ms, h.sized_since_ms.unwrap_or(i64::MAX)) > 0 {
                p.unsized_dark = true;
            }
        }
        for (c, p) in out.iter_mut().enumerate() {
            // GPUs gone with an open gap: known capacity for `short`, counted there.
            p.absent = self.gaps.absent_ms(c, m0, m1);
            p.teams = self
                .open_teams
                .remove(&(minute, c))
                .unwrap_or_default()
                .into_iter()
                .filter(|(_, (a, u))| *a != 0 || *u != 0)
                .map(|(team, (a, u))| (team, a, u))
                .collect();
        }
        out
    }
}

/// One contract's evidence for one minute closed by [`Ledger::close`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClosedMinute {
    pub contract: usize,
    pub minute: i64,
    pub partial: shard::Partial,
}

#[cfg(test)]
mod accuracy;
#[cfg(test)]
mod held_tests;
#[cfg(test)]
mod shard_tests;
#[cfg(test)]
mod team_tests;
#[cfg(test)]
mod tests;
