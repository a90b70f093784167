//! The books: what the aggregator knows of each contract, and the way a reading takes
//! to the counters. record (a scrape's report) → [`Ledger`] (open minutes) → seal (at
//! the grace) → pending → commit (the store, on the writer thread) → durable: running
//! totals, the period's minutes and the counters move only now.
//!
//! A plain struct, synchronous and CPU-only: no tokio, no HTTP, no metrics, no clock
//! (times are passed in). The composition root (`mod.rs`) holds it behind one lock and
//! does the I/O: the writer thread runs the [`LedgerStore`] and hands the outcome back to
//! [`Books::finish_write`]; the metrics and the status page read the books.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::scrape::{GpuReport, HostReport};
use crate::contract::{Contract, Teams, UsageSignal};
use crate::ledger::host::OwnerCounters;
use crate::ledger::shard::Partial;
use crate::ledger::totals::{figures, Figures, Running, Terms};
use crate::ledger::{
    ClosedMinute, Gap, GpuCounters, LateMinute, Ledger, Outcome, Reading, Sealed, Snapshot,
    TeamAmounts, TeamRow, Totals, Xids, MINUTE_MS,
};

/// Where the ledger is kept durably: what the writer thread needs (commit, flush) and
/// what [`Books::restore`] reads at start. SQLite ([`super::store::Store`]) is one; a
/// shared PostgreSQL book can be another.
pub trait LedgerStore: Send + 'static {
    type Error: std::error::Error + Send + Sync + 'static;

    /// The snapshot of the last commit; `None` for a new ledger.
    fn load(&self, ids: &[String]) -> Result<Option<Snapshot>, Self::Error>;

    /// Sums of a contract's sealed minutes `[from, to)`.
    fn sums(&self, contract: &str, from_minute: i64, to_minute: i64)
        -> Result<Totals, Self::Error>;

    /// A contract's sealed minutes `[from, to)`, in order.
    fn minutes(
        &self,
        contract: &str,
        from_minute: i64,
        to_minute: i64,
    ) -> Result<Vec<(i64, Totals)>, Self::Error>;

    /// A contract's sealed team time `[from, to)`: `(team, allocated, used)` GPU-ms per
    /// team, sorted by team.
    fn team_sums(
        &self,
        contract: &str,
        from_minute: i64,
        to_minute: i64,
    ) -> Result<Vec<TeamRow>, Self::Error>;

    /// [`LedgerStore::team_sums`] over all of a contract's sealed minutes (a store may
    /// keep them as running sums).
    fn team_all_time(&self, contract: &str) -> Result<Vec<TeamRow>, Self::Error> {
        self.team_sums(contract, i64::MIN, i64::MAX)
    }

    /// A contract's delivery gaps overlapping `[from_ms, to_ms)`, open ones included, as of
    /// the last commit (for a statement).
    fn gaps(&self, contract: &str, from_ms: i64, to_ms: i64) -> Result<Vec<Gap>, Self::Error>;

    /// A [`Commit`]: newly sealed minutes, the ledger's snapshot, its pending delivery gaps
    /// (open ones and those closed since the last commit) and its pending late GPU-ms by
    /// minute, atomically and durably (`Ok`: stored). A sealed minute written again with the
    /// same figures is accepted; a gap written again replaces the one with the same start,
    /// target, GPU and cause; late GPU-ms written again by a retry (after an error that hid
    /// a successful commit) replace those of the same commit rather than adding twice.
    fn commit(&mut self, ids: &[String], commit: &Commit) -> Result<(), Self::Error>;

    /// Whether the next commit should carry the hosts' states ([`Commit::hosts`]): a store
    /// that writes host checkpoints only now and then says when one is due, so the rounds
    /// in between copy no host state. The default: every commit carries them.
    fn hosts_due(&self) -> bool {
        true
    }

    /// A contract's late GPU-ms `(minute, delivered, used)` for the minutes `[from, to)`,
    /// one entry per minute that has any, in order.
    fn late_minutes(
        &self,
        contract: &str,
        from_minute: i64,
        to_minute: i64,
    ) -> Result<Vec<(i64, i64, i64)>, Self::Error>;

    /// The delivery gaps a restart takes back ([`Books::restore`]): those still open at the
    /// last commit, and those that ended at or after `closed_from_ms` (`None`: none).
    fn gaps_to_restore(
        &self,
        ids: &[String],
        closed_from_ms: Option<i64>,
    ) -> Result<Vec<Gap>, Self::Error>;

    /// At a clean stop: whatever the store defers (host checkpoints).
    fn flush(&mut self) -> Result<(), Self::Error>;
}

impl LedgerStore for super::store::Store {
    type Error = super::store::StoreError;

    fn load(&self, ids: &[String]) -> Result<Option<Snapshot>, Self::Error> {
        super::store::Store::load(self, ids)
    }
    fn sums(&self, contract: &str, from: i64, to: i64) -> Result<Totals, Self::Error> {
        super::store::Store::sums(self, contract, from, to)
    }
    fn minutes(
        &self,
        contract: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<(i64, Totals)>, Self::Error> {
        super::store::Store::minutes(self, contract, from, to)
    }
    fn team_sums(&self, contract: &str, from: i64, to: i64) -> Result<Vec<TeamRow>, Self::Error> {
        super::store::Store::team_sums(self, contract, from, to)
    }
    fn team_all_time(&self, contract: &str) -> Result<Vec<TeamRow>, Self::Error> {
        super::store::Store::team_all_time(self, contract)
    }
    fn gaps(&self, contract: &str, from_ms: i64, to_ms: i64) -> Result<Vec<Gap>, Self::Error> {
        super::store::Store::gaps(self, &[contract.to_string()], 0, from_ms, to_ms)
    }
    fn commit(&mut self, ids: &[String], commit: &Commit) -> Result<(), Self::Error> {
        super::store::Store::commit_with(self, ids, commit)
    }
    fn hosts_due(&self) -> bool {
        super::store::Store::hosts_due(self)
    }
    fn late_minutes(
        &self,
        contract: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<(i64, i64, i64)>, Self::Error> {
        super::store::Store::late_minutes(self, contract, from, to)
    }
    fn gaps_to_restore(
        &self,
        ids: &[String],
        closed_from_ms: Option<i64>,
    ) -> Result<Vec<Gap>, Self::Error> {
        super::store::Store::gaps_to_restore(self, ids, closed_from_ms)
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        super::store::Store::flush(self)
    }
}

/// At most this many days of sealed minutes per contract wait in memory for a disk that
/// cannot be written; past that, minutes stay open in the ledger (sealed once the disk
/// is back), so memory grows by a few hundred bytes per contract and minute, no more.
pub const MAX_PENDING_DAYS: usize = 7;

/// What a write hands to the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Commit {
    pub sealed: Vec<Sealed>,
    pub snap: Snapshot,
    /// The ledger's pending delivery gaps ([`Ledger::pending_gaps`]).
    pub gaps: Vec<Gap>,
    /// The late GPU-ms by minute not yet durable ([`Ledger::pending_late`]).
    pub late: Vec<LateMinute>,
    /// Whether `snap.hosts` holds every host's state; `false`: left empty, as no host
    /// checkpoint is due ([`LedgerStore::hosts_due`]).
    pub hosts: bool,
}

/// How a finished write changed the books.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// `minutes` sealed minutes are durable and counted; `recovered`: the writes before
    /// this one had failed.
    Durable { minutes: usize, recovered: bool },
    /// Nothing counted: `pending` sealed minutes wait for the next write.
    Failed { pending: usize },
}

/// The write handed to the store and not finished yet.
#[derive(Debug)]
struct InFlight {
    since: Instant,
    minutes: usize,
    late: Vec<(i64, i64)>,
    through: i64,
    /// Closed gaps up to this mark are durable once the write succeeds.
    gaps_mark: u64,
    /// The late GPU-ms by minute this write adds to the store.
    late_minutes: Vec<LateMinute>,
}

/// The ledger's in-memory side: open minutes, sealed ones waiting for the store, and the
/// durable running totals the counters and the status page show.
pub struct Books {
    contracts: Vec<Contract>,
    grace_ms: i64,
    ledger: Ledger,
    running: Vec<Running>,
    /// Per contract, the durable sealed minutes of its current billing period, oldest
    /// first: the status page is built from these and never reads the database.
    minutes: Vec<Vec<(i64, Totals)>>,
    /// Sealed minutes not yet durable: never exported until written.
    pending: Vec<Sealed>,
    /// Minutes before this one are sealed and durable (the ledger's own `sealed_through`
    /// runs ahead by the pending minutes).
    durable_through: i64,
    /// Per contract, the late GPU-ms (delivered, used) as of the last durable write.
    durable_late: Vec<(i64, i64)>,
    in_flight: Option<InFlight>,
    /// The last write failed and none has succeeded since.
    failing: bool,
    /// Successful writes since start: what the store holds changes only when this does.
    durable_writes: u64,
    /// Per (target, contract), the GPUs of its last reading counted with busy time because
    /// they lack the contract's `sm_active` signal.
    fallback: BTreeMap<(String, usize), usize>,
    /// `[[teams]]`: the team of each owner of a reading, decided when it is recorded (a
    /// reload's new rules apply to the readings recorded from then on).
    team_rules: Teams,
    /// Per contract, the durable team time: all time and the current billing period.
    teams: Vec<TeamBook>,
    /// The next write carries the hosts' states (a host checkpoint is due, the last write
    /// with them failed, or the process is stopping).
    hosts_wanted: bool,
    /// In a book shared with other aggregators: this shard's closed minutes on their way to
    /// the book, and how far its sealed minutes were taken back. `None`: this ledger seals
    /// its own minutes (SQLite alone).
    shared: Option<SharedBooks>,
}

/// The books' side of a shared book ([`Books::into_shared`]): minutes are closed here into
/// this shard's partial sums, split in the book from every shard's, and come back sealed.
#[derive(Debug, Clone, Default, PartialEq)]
struct SharedBooks {
    /// Closed minutes the book has not acknowledged yet, oldest first.
    partials: Vec<ClosedMinute>,
    /// Per contract: the book's sealed minutes before this one are in the running totals.
    through: Vec<i64>,
    /// Per contract: the first minute the book accounts (`None`: not known yet, this
    /// ledger's own start stands in).
    since: Vec<Option<i64>>,
    /// Minutes before this one were not watched whole by this process (it started after
    /// they began: its hosts re-baselined across the restart): their partials wait a while
    /// past the grace so that a replica that watched them writes first.
    watched_from: i64,
}

/// What the shared book holds of a contract at start ([`Books::adopt_shared`]): the running
/// totals are restored from it, not from the local database.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SharedStart {
    /// The first minute the book accounts for the contract, and the first it has not
    /// sealed (`None`: the book knows nothing of the contract yet).
    pub accounted: Option<(i64, i64)>,
    pub all_time: Totals,
    /// Sums over the current billing period's sealed minutes.
    pub in_period: Totals,
    /// Sealed minutes of the last day, in order.
    pub recent: Vec<(i64, Totals)>,
    /// Sealed minutes of the current billing period, in order.
    pub period_minutes: Vec<(i64, Totals)>,
    pub team_all_time: Vec<TeamRow>,
    pub team_period: Vec<TeamRow>,
}

/// A contract's durable team time (GPU-ms), moved with the running totals.
#[derive(Debug, Clone, Default, PartialEq)]
struct TeamBook {
    /// The contract's allocated GPU-ms over all sealed minutes (Σ of `all_time`'s).
    allocated: i64,
    all_time: TeamAmounts,
    /// The billing period `period` holds (its start, ms).
    period_start_ms: i64,
    period: TeamAmounts,
}

impl TeamBook {
    fn from_rows(rows: Vec<TeamRow>) -> TeamAmounts {
        rows.into_iter().map(|(t, a, u)| (t, (a, u))).collect()
    }

    fn record(&mut self, s: &Sealed, period_start_ms: i64) {
        if self.period_start_ms != period_start_ms {
            self.period.clear();
            self.period_start_ms = period_start_ms;
        }
        self.allocated = self.allocated.saturating_add(s.allocated);
        let in_period = s.minute * MINUTE_MS >= period_start_ms;
        for (team, a, u) in &s.teams {
            crate::ledger::teams::add(&mut self.all_time, team, *a, *u);
            if in_period {
                crate::ledger::teams::add(&mut self.period, team, *a, *u);
            }
        }
    }
}

impl Books {
    /// The books as the store holds them: `snap` is what [`LedgerStore::load`] returned
    /// (`None`: a new ledger, accounting from the minute after `now_ms`).
    pub fn restore<S: LedgerStore + ?Sized>(
        store: &S,
        contracts: Vec<Contract>,
        grace_ms: i64,
        snap: Option<Snapshot>,
        now_ms: i64,
    ) -> Result<Self, S::Error> {
        let mut ledger = match snap {
            Some(snap) => Ledger::restore(contracts.len(), snap),
            None => Ledger::new(contracts.len(), now_ms),
        };
        let ids: Vec<String> = contracts.iter().map(|c| c.id.clone()).collect();
        let closed_from = ledger.restore_gaps_from();
        ledger.restore_gaps(store.gaps_to_restore(&ids, closed_from)?);
        let through = ledger.sealed_through();
        let mut running = Vec::new();
        let mut minutes = Vec::new();
        let mut teams = Vec::new();
        for c in &contracts {
            let period = c.billing_period(through * MINUTE_MS);
            let all_time = store.sums(&c.id, i64::MIN, i64::MAX)?;
            let in_period = store.sums(&c.id, period.0.div_euclid(MINUTE_MS), i64::MAX)?;
            let recent = store.minutes(&c.id, through - 1440, through)?;
            let from = period
                .0
                .max(ledger.since() * MINUTE_MS)
                .div_euclid(MINUTE_MS);
            minutes.push(store.minutes(&c.id, from, through)?);
            running.push(Running::new(all_time, period, in_period, recent));
            // The contract's allocated is its teams' sum, exactly, minute by minute.
            let all_time = TeamBook::from_rows(store.team_all_time(&c.id)?);
            teams.push(TeamBook {
                allocated: all_time.values().map(|v| v.0).sum(),
                all_time,
                period_start_ms: period.0,
                period: TeamBook::from_rows(store.team_sums(
                    &c.id,
                    period.0.div_euclid(MINUTE_MS),
                    i64::MAX,
                )?),
            });
        }
        let durable_late = (0..contracts.len())
            .map(|c| ledger.late().get(c).copied().unwrap_or_default())
            .collect();
        Ok(Self {
            contracts,
            grace_ms,
            durable_through: through,
            ledger,
            running,
            minutes,
            pending: Vec::new(),
            durable_late,
            in_flight: None,
            failing: false,
            durable_writes: 0,
            fallback: BTreeMap::new(),
            teams,
            team_rules: Teams::default(),
            shared: None,
            hosts_wanted: true,
        })
    }

    /// Turns these books into one shard's side of a shared book: from now on due minutes are
    /// closed into partial sums ([`Books::contribution`]) instead of sealed, and the counters
    /// move only with the minutes the book sealed ([`Books::absorb`]). Call
    /// [`Books::adopt_shared`] for each contract next.
    pub fn into_shared(mut self) -> Self {
        let n = self.contracts.len();
        self.shared = Some(SharedBooks {
            partials: Vec::new(),
            through: vec![self.durable_through; n],
            since: vec![None; n],
            watched_from: i64::MAX,
        });
        self
    }

    /// What the book holds of contract `c` at start, read for the billing period
    /// `period` (that of the book's first unsealed minute): the running totals, the
    /// period's minutes and the team time come from the book, not the local database.
    pub fn adopt_shared(&mut self, c: usize, period: (i64, i64), start: SharedStart) {
        let through = start.accounted.map_or(self.durable_through, |a| a.1);
        self.running[c] = Running::new(start.all_time, period, start.in_period, start.recent);
        self.minutes[c] = start.period_minutes;
        self.teams[c] = TeamBook {
            allocated: start.team_all_time.iter().map(|r| r.1).sum(),
            all_time: TeamBook::from_rows(start.team_all_time),
            period_start_ms: period.0,
            period: TeamBook::from_rows(start.team_period),
        };
        if let Some(s) = &mut self.shared {
            s.through[c] = through;
            s.since[c] = start.accounted.map(|a| a.0);
            self.durable_through = s.through.iter().copied().min().unwrap_or(through);
        }
    }

    /// In a shared book: this shard's closed minutes for the book, `(contract id, minute,
    /// partial)`, oldest first, at most `limit`; pass how many the book took to
    /// [`Books::contributed`]. Empty without a shared book.
    ///
    /// A minute this process did not watch whole (it began before the first scrape round
    /// after a start) waits `defer_ms` past its grace: its partial lacks what the hosts did
    /// while the process was down, and the book keeps the first write, so a replica that
    /// watched the minute should write first. Without such a replica it is sent then, still
    /// before the book's `shard_grace` runs out.
    pub fn contribution(
        &self,
        limit: usize,
        now_ms: i64,
        defer_ms: i64,
    ) -> Vec<(String, i64, Partial)> {
        let Some(s) = &self.shared else {
            return Vec::new();
        };
        let due = |minute: i64| {
            minute >= s.watched_from
                || now_ms >= (minute + 1) * MINUTE_MS + self.grace_ms + defer_ms
        };
        s.partials
            .iter()
            .take_while(|m| due(m.minute))
            .take(limit)
            .map(|m| {
                (
                    self.contracts[m.contract].id.clone(),
                    m.minute,
                    m.partial.clone(),
                )
            })
            .collect()
    }

    /// The book stored (or already had, or refused as sealed) the first `n` minutes of
    /// [`Books::contribution`]: they are done here.
    pub fn contributed(&mut self, n: usize) {
        if let Some(s) = &mut self.shared {
            s.partials.drain(..n.min(s.partials.len()));
        }
    }

    /// The first minute contract `c` is accounted from: the ledger's, or in a shared book
    /// the book's (once it has sealed one).
    pub fn since_of(&self, c: usize) -> i64 {
        self.shared
            .as_ref()
            .and_then(|s| s.since[c])
            .unwrap_or(self.since())
    }

    /// Contract `c`'s first minute to read back from the book: every minute while none has
    /// been taken back (the book's first sealed minute may precede this process's start),
    /// then [`Books::absorbed_through`].
    pub fn absorb_from(&self, c: usize) -> i64 {
        match &self.shared {
            Some(s) if s.since[c].is_none() => i64::MIN,
            Some(s) => s.through[c],
            None => self.durable_through,
        }
    }

    /// Per contract, the first sealed minute of the book not yet in the running totals.
    pub fn absorbed_through(&self, c: usize) -> i64 {
        self.shared
            .as_ref()
            .map_or(self.durable_through, |s| s.through[c])
    }

    /// Minutes the book sealed for contract `c`, in order from [`Books::absorbed_through`]:
    /// they reach the running totals, the period's minutes and the team time, as a
    /// durable write does with SQLite. A minute already absorbed is skipped, so reading
    /// the same rows twice counts them once. Returns how many were new.
    pub fn absorb(&mut self, c: usize, sealed: Vec<Sealed>) -> usize {
        let Some(through) = self.shared.as_ref().map(|s| s.through[c]) else {
            return 0;
        };
        // Nothing taken back yet: every sealed minute is new, also those before this
        // process's own start (a replica that started before the book's first seal).
        let from = self.absorb_from(c);
        let mut n = 0;
        // Where reading resumes: after the last minute taken back (not this process's own
        // start while nothing has been).
        let mut next = (from != i64::MIN).then_some(through);
        let mut first = None;
        for s in sealed.into_iter().filter(|s| s.minute >= from) {
            next = Some(next.map_or(s.minute + 1, |n| n.max(s.minute + 1)));
            first.get_or_insert(s.minute);
            self.record_durable(&s);
            n += 1;
        }
        if let Some(sh) = &mut self.shared {
            if sh.since[c].is_none() {
                sh.since[c] = first;
            }
            if let Some(next) = next {
                sh.through[c] = next;
                self.durable_through = sh.through.iter().copied().min().unwrap_or(next);
            }
        }
        if n > 0 {
            self.durable_writes += 1;
        }
        n
    }

    /// A durable sealed minute reaches the running totals, the period's minutes and the
    /// team time.
    fn record_durable(&mut self, s: &Sealed) {
        let c = &self.contracts[s.contract];
        let r = &mut self.running[s.contract];
        r.record(s, |t| c.billing_period(t));
        self.teams[s.contract].record(s, r.period_start_ms);
        let minutes = &mut self.minutes[s.contract];
        let start = r.period_start_ms.div_euclid(MINUTE_MS);
        if minutes.first().is_some_and(|(m, _)| *m < start) {
            minutes.retain(|(m, _)| *m >= start);
        }
        if s.minute >= start {
            minutes.push((s.minute, s.totals));
        }
    }

    /// How far an agent's clock may stray before it is re-anchored, in ledger time.
    pub fn with_clock_tolerance(mut self, ms: i64) -> Self {
        self.ledger = self.ledger.with_clock_tolerance(ms);
        self
    }

    /// The `[[teams]]` rules the owners of the readings recorded from now on are mapped by.
    pub fn with_teams(mut self, teams: Teams) -> Self {
        self.team_rules = teams;
        self
    }

    /// New `[[teams]]` rules (SIGHUP): the owners of the readings recorded from now on
    /// are mapped by them; time already attributed keeps its team.
    pub fn set_teams(&mut self, teams: Teams) {
        self.team_rules = teams;
    }

    /// The targets configured now, each with its contracts (see [`Ledger::configure`]).
    pub fn configure(&mut self, now_ms: i64, configured: &[(String, Vec<usize>)]) {
        let contracts = &self.contracts;
        self.ledger
            .configure(now_ms, configured, |c, t| contracts[c].billing_period(t).1);
        self.fallback.retain(|(target, c), _| {
            configured
                .iter()
                .any(|(t, cs)| t == target && cs.contains(c))
        });
    }

    /// GPUs of contract `c` counted with busy time instead of its `sm_active` usage signal
    /// (no GPM), as of each target's last reading: `commitmeter_contract_usage_fallback_gpus`.
    pub fn usage_fallback_gpus(&self, c: usize) -> usize {
        self.fallback
            .iter()
            .filter(|((_, ci), _)| *ci == c)
            .map(|(_, n)| n)
            .sum()
    }

    /// After the first scrape round: a ledger that has sealed nothing starts after it.
    pub fn start_after(&mut self, now_ms: i64) {
        self.ledger.start_after(now_ms);
        if let Some(s) = &mut self.shared {
            s.watched_from = crate::ledger::minute_of(now_ms) + 1;
        }
    }

    /// Books one scrape's report of a target of contract `c`: its GPUs that match the
    /// contract's model, with the contract's usage signal. Returns how many GPUs counted
    /// and what the ledger made of the reading.
    pub fn record(
        &mut self,
        key: &str,
        c: usize,
        received_ms: i64,
        report: &HostReport,
    ) -> (usize, Outcome) {
        let contract = &self.contracts[c];
        let mut fallback = 0;
        let mut owners = BTreeMap::new();
        let gpus: BTreeMap<String, GpuCounters> = report
            .gpus
            .iter()
            .filter(|(_, g)| contract.model_matches(g.model.as_deref().unwrap_or("")))
            .map(|(uuid, g)| {
                let (counters, fell_back) = counters(contract.usage_signal, g);
                fallback += usize::from(fell_back);
                owner_counters(
                    &self.team_rules,
                    contract.usage_signal,
                    uuid,
                    g,
                    &mut owners,
                );
                (uuid.clone(), counters)
            })
            .collect();
        self.fallback.insert((key.to_string(), c), fallback);
        // The XID counters of the contract's GPUs: not those of a GPU of another model. A GPU
        // the reading lacks (lost) keeps its counters: the gap list attaches them only to a
        // gap of a GPU the contract had.
        let xids: Xids = report
            .xids
            .iter()
            .filter(|(uuid, _)| {
                report
                    .gpus
                    .get(*uuid)
                    .is_none_or(|g| contract.model_matches(g.model.as_deref().unwrap_or("")))
            })
            .map(|(uuid, codes)| (uuid.clone(), codes.clone()))
            .collect();
        let n = gpus.len();
        let reading = Reading {
            received_ms,
            agent_ms: report.round_ms,
            agent_start_ms: report.start_ms,
            sampled_ms: report.sampled_ms,
            gpus,
            owners,
        };
        (n, self.ledger.observe_with_xids(key, c, reading, &xids))
    }

    /// A scrape of a target of contract `c` failed: a host seen before opens (or keeps
    /// open) a `host_unreachable` gap per GPU of its last reading.
    pub fn unreachable(&mut self, key: &str, c: usize) {
        self.ledger.unreachable(key, c);
    }

    /// Seals the minutes due at `now_ms` (ended at least the grace ago) into the pending
    /// ones, unless [`MAX_PENDING_DAYS`] of them already wait for the store. Returns how
    /// many are pending.
    pub fn seal_due(&mut self, now_ms: i64) -> usize {
        let cap = MAX_PENDING_DAYS * 1440 * self.contracts.len().max(1);
        if let Some(s) = &mut self.shared {
            // Closed, not sealed: the book splits the minute from every shard's sums.
            if s.partials.len() < cap {
                s.partials.extend(self.ledger.close(now_ms, self.grace_ms));
            }
            return s.partials.len();
        }
        if self.pending.len() >= cap {
            return self.pending.len();
        }
        let contracts = &self.contracts;
        let newly = self.ledger.seal(now_ms, self.grace_ms, |c, a, b| {
            contracts[c].committed_gpu_ms(a, b)
        });
        self.pending.extend(newly);
        self.pending.len()
    }

    /// The pending minutes, the ledger's snapshot and its pending delivery gaps for the
    /// store, unless a write is
    /// still in flight (a slow disk: the next write carries everything). `now` marks when
    /// the write started (see [`Books::write_in_flight_for`]).
    pub fn start_write(&mut self, now: Instant) -> Option<Commit> {
        if self.in_flight.is_some() {
            return None;
        }
        let hosts = self.hosts_wanted;
        let snap = if hosts {
            self.ledger.snapshot()
        } else {
            self.ledger.snapshot_without_hosts()
        };
        let (gaps, gaps_mark) = self.ledger.pending_gaps();
        let late = self.ledger.pending_late();
        self.in_flight = Some(InFlight {
            since: now,
            minutes: self.pending.len(),
            late: snap.late.clone(),
            through: snap.sealed_through,
            gaps_mark,
            late_minutes: late.clone(),
        });
        Some(Commit {
            sealed: self.pending.clone(),
            snap,
            gaps,
            late,
            hosts,
        })
    }

    /// Applies the outcome of the write [`Books::start_write`] handed out: on success its
    /// minutes become durable and reach the running totals and its closed gaps are not
    /// written again; on failure both stay pending. Minutes sealed and gaps closed meanwhile
    /// stay pending either way.
    pub fn finish_write(&mut self, written: bool) -> Finished {
        let Some(w) = self.in_flight.take() else {
            debug_assert!(false, "finish_write without a write in flight");
            return Finished::Failed {
                pending: self.pending.len(),
            };
        };
        if !written {
            self.hosts_wanted = true;
            self.failing = true;
            return Finished::Failed {
                pending: self.pending.len(),
            };
        }
        let recovered = std::mem::take(&mut self.failing);
        self.durable_writes += 1;
        self.ledger.gaps_persisted(w.gaps_mark);
        self.ledger.late_persisted(&w.late_minutes);
        let written: Vec<Sealed> = self.pending.drain(..w.minutes).collect();
        for s in &written {
            self.record_durable(s);
        }
        for (c, late) in self.durable_late.iter_mut().enumerate() {
            *late = w.late.get(c).copied().unwrap_or_default();
        }
        // In a shared book the local write holds the shard's state only: its minutes are
        // durable when the book seals them ([`Books::absorb`]).
        if self.shared.is_none() {
            self.durable_through = w.through;
        }
        Finished::Durable {
            minutes: w.minutes,
            recovered,
        }
    }

    /// Whether the next writes carry the hosts' states: `due` as the store says after each
    /// commit ([`LedgerStore::hosts_due`]); `true` at a clean stop. Until told otherwise
    /// (and after a failed write) every write carries them.
    pub fn want_hosts(&mut self, due: bool) {
        self.hosts_wanted = due;
    }

    /// How long the write in flight has been, if one is.
    pub fn write_in_flight_for(&self, now: Instant) -> Option<Duration> {
        self.in_flight
            .as_ref()
            .map(|w| now.saturating_duration_since(w.since))
    }

    /// Successful writes since start: the store's minutes, late GPU-ms and gaps change only
    /// when this does (what a statement built from them may be cached by).
    pub fn durable_writes(&self) -> u64 {
        self.durable_writes
    }

    /// The last write failed and none has succeeded since.
    pub fn failing(&self) -> bool {
        self.failing
    }

    /// Sealed minutes waiting for the store; in a shared book, closed minutes waiting for
    /// the book.
    pub fn pending(&self) -> usize {
        match &self.shared {
            Some(s) => s.partials.len(),
            None => self.pending.len(),
        }
    }

    /// Whether the minutes are sealed by a shared book ([`Books::into_shared`]).
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// The first minute the ledger accounts.
    pub fn since(&self) -> i64 {
        self.ledger.since()
    }

    /// Minutes before this one are sealed and durable.
    pub fn durable_through(&self) -> i64 {
        self.durable_through
    }

    /// Minutes before this one are sealed, durable or pending.
    pub fn sealed_through(&self) -> i64 {
        self.ledger.sealed_through()
    }

    pub fn clock_tolerance_ms(&self) -> i64 {
        self.ledger.clock_tolerance_ms()
    }

    /// The durable totals of contract `c`: all time, the period, the last day.
    pub fn running(&self, c: usize) -> &Running {
        &self.running[c]
    }

    /// The durable sealed minutes of contract `c`'s current period, oldest first.
    pub fn period_minutes(&self, c: usize) -> &[(i64, Totals)] {
        &self.minutes[c]
    }

    /// Contract `c`'s team time over all durable sealed minutes: its allocated GPU-ms and
    /// `(team, allocated, used)` per team, sorted by team (teams no longer configured
    /// included: their history stays in the ledger).
    pub fn team_all_time(&self, c: usize) -> (i64, Vec<TeamRow>) {
        let b = &self.teams[c];
        (b.allocated, rows(&b.all_time))
    }

    /// Contract `c`'s team time of its current billing period so far (durable sealed
    /// minutes): `(team, allocated_ms, used_ms)`, sorted by team, teams with time only.
    pub fn team_period(&self, c: usize) -> Vec<TeamRow> {
        let b = &self.teams[c];
        if b.period_start_ms != self.running[c].period_start_ms {
            return Vec::new();
        }
        rows(&b.period)
    }

    /// The late GPU-ms (delivered, used) of contract `c` as of the last durable write.
    pub fn durable_late(&self, c: usize) -> (i64, i64) {
        self.durable_late[c]
    }

    /// Contract `c`'s month-to-date figures from its durable minutes. A ledger started
    /// mid-period accounts the period from its own start.
    pub fn figures(&self, c: usize) -> Figures {
        let r = &self.running[c];
        // In a shared book every replica accounts from the book's start, not its own.
        let (since, through) = match &self.shared {
            Some(s) => (s.since[c].unwrap_or(self.since()), s.through[c]),
            None => (self.since(), self.durable_through),
        };
        figures(
            r,
            &terms(
                &self.contracts[c],
                r,
                since * MINUTE_MS,
                through * MINUTE_MS,
            ),
        )
    }
}

fn rows(t: &TeamAmounts) -> Vec<TeamRow> {
    t.iter()
        .filter(|(_, (a, u))| *a != 0 || *u != 0)
        .map(|(team, &(a, u))| (team.clone(), a, u))
        .collect()
}

/// One GPU's counters for a contract's usage signal: used, and the allocated counters the
/// idle split needs (allocated, and its part the signal counts as used). True when the GPU
/// lacks the `sm_active` signal and is counted with busy time instead. An agent without the
/// allocated counters (older than the idle split) gives `None`: held unknown, its idle
/// counts unallocated.
fn counters(signal: UsageSignal, g: &GpuReport) -> (GpuCounters, bool) {
    let (used, allocated_used, fell_back) = match signal {
        UsageSignal::Busy => (g.busy_ms, g.allocated_busy_ms, false),
        // Allocated is used: all allocated time is allocated-and-used, nothing held.
        UsageSignal::Allocated => (g.allocated_ms, g.allocated_ms, false),
        UsageSignal::SmActive => match g.sm_active_ms {
            Some(sm) => (Some(sm), g.allocated_sm_active_ms, false),
            None => (g.busy_ms, g.allocated_busy_ms, true),
        },
    };
    let c = GpuCounters {
        observed_ms: g.observed_ms,
        used_ms: used.unwrap_or(0),
        // Allocated time alone (for the teams) needs only its own counter; held needs both.
        allocated_ms: g.allocated_ms,
        allocated_used_ms: allocated_used.filter(|_| g.allocated_ms.is_some()),
    };
    (c, fell_back)
}

/// The owners' counters of one GPU for a contract's usage signal, each with its team,
/// into `out` by `(uuid, owner key)`. Used is the owner's share of the signal the GPU's
/// own used counter comes from ([`counters`]): busy; SM-active, or busy where the GPU has
/// no SM-active series (the same fallback); allocated itself under `allocated`. An owner
/// without an allocated series is left out (its time is the GPU's unassigned time).
fn owner_counters(
    teams: &Teams,
    signal: UsageSignal,
    uuid: &str,
    g: &GpuReport,
    out: &mut BTreeMap<(String, String), OwnerCounters>,
) {
    for (key, o) in &g.owners {
        let Some(allocated_ms) = o.allocated_ms else {
            continue;
        };
        let used = match signal {
            UsageSignal::Busy => o.busy_ms,
            UsageSignal::Allocated => Some(allocated_ms),
            UsageSignal::SmActive if g.sm_active_ms.is_some() => o.sm_active_ms,
            UsageSignal::SmActive => o.busy_ms,
        };
        out.insert(
            (uuid.to_string(), key.clone()),
            OwnerCounters {
                team: teams.team_of(&o.owner).to_string(),
                allocated_ms,
                used_ms: used.unwrap_or(0),
            },
        );
    }
}

/// The inputs of a contract's month-to-date figures. A ledger started mid-period
/// accounts the period from its own start.
fn terms(contract: &Contract, r: &Running, since_ms: i64, through_ms: i64) -> Terms {
    let (start, end) = (
        r.period_start_ms.max(since_ms).min(r.period_end_ms),
        r.period_end_ms,
    );
    let from = through_ms.clamp(start, end);
    Terms {
        committed_period: contract.committed_gpu_ms(start, end),
        committed_remaining: contract.committed_gpu_ms(from, end),
        remaining_ms: end - from,
        target_utilization: contract.target_utilization,
        price_per_gpu_hour: contract.price_per_gpu_hour,
    }
}

#[cfg(test)]
mod tests;
