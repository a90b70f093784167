//! One book over several shards: each aggregator's ledger sees only its shard's hosts, so
//! for each contract and minute it contributes a [`Partial`] (sums of its hosts' evidence),
//! and the minute is split once, from the sums over all shards ([`combine`]). Pure: no I/O.
//!
//! A single aggregator is the one-shard case: [`super::Ledger::seal`] closes each minute
//! into one `Partial` per contract and combines it alone, so the SQLite ledger and the
//! shared book split minutes with the same code. A sharded aggregator calls
//! [`super::Ledger::close`] instead, which returns the partials; the sealer combines all
//! shards' partials of a minute and keeps the contract's `short` gap from
//! [`Combined::short`] with [`super::gaps::short_minute`].
//!
//! Every sum is exact, so splitting the fleet changes nothing: for any partition of the
//! hosts into shards, `combine` of the shards' partials equals the one ledger's sealed
//! minute to the GPU-ms, teams and `short` included (`shard_tests.rs`).
//!
//! A shard that contributed nothing for a minute by the time it is sealed (both replicas
//! down longer than the grace) is *missing*: its last known capacity counts as expected and
//! not watched, so the shortfall it may explain is **unreported**, never undelivered, and
//! the other shards' evidence stands as it is.

use super::{split_held, teams, TeamRow, Totals};

/// One shard's evidence for one contract and one minute, in GPU-ms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Partial {
    pub delivered: i64,
    pub used: i64,
    /// Capacity the shard's agents watched.
    pub reported: i64,
    /// Capacity of the shard's known hosts over the minute (watched or not).
    pub expected: i64,
    /// Capacity of GPUs gone with an open delivery gap (counted in the contract's `short`
    /// gap evidence, not twice).
    pub absent: i64,
    /// Delivered GPU-ms held by a compute process and unused (evidence of `idle_allocated`).
    pub held: i64,
    /// Σ of `teams`' allocated, exactly.
    pub allocated: i64,
    /// The shard had a target for the contract over the whole minute.
    pub watched: bool,
    /// A target of the shard of unknown size was dark during the minute: any shortfall of
    /// the contract could be its.
    pub unsized_dark: bool,
    /// GPUs the shard knew for the contract at the minute's end: what a later minute the
    /// shard misses is assumed to hold (as unreported). Its targets by the minute's end and
    /// not retired by then, with the GPUs of their last reading when the minute is closed
    /// (GPUs gone with an open gap are not counted).
    pub capacity_gpus: i64,
    /// `(team, allocated, used)`, rows with time only, sorted by team.
    pub teams: Vec<TeamRow>,
}

impl Partial {
    /// The evidence to pass among the present partials for a missing shard whose capacity
    /// is unknown (it never contributed, or its last partial had a target of unknown size
    /// dark, `unsized_dark`): like a target of unknown size in one ledger, it makes the
    /// contract dark, so everything short of the commitment is unreported. A missing shard
    /// of known capacity is passed as `missing_capacity_ms` instead.
    pub fn unknown() -> Self {
        Partial {
            unsized_dark: true,
            ..Partial::default()
        }
    }
}

/// A sealed minute of one contract from its shards' partials.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Combined {
    pub totals: Totals,
    pub allocated: i64,
    pub teams: Vec<TeamRow>,
    /// The contract's shortfall against its known capacity, for the `short` delivery gap
    /// (`None`: unknown, the contract was dark).
    pub short: Option<i64>,
}

/// Splits one minute's commitment `committed` (GPU-ms) from the `present` shards'
/// partials, counting `missing_capacity_ms` (Σ over missing shards of their last capacity
/// × the minute) as expected and not watched.
///
/// The contract is dark when no present shard watched it for the whole minute and no
/// missing shard is known to hold capacity, or when any present shard had a target of
/// unknown size dark (see [`Partial::unknown`] for a missing shard of unknown capacity).
///
/// The caller's part: each shard appears **once** in `present` (one replica's partial,
/// the first written: the book's first writer wins), and a shard is either present or
/// counted in `missing_capacity_ms`, never both. `combine` cannot tell a shard given twice
/// (a partial carries no shard identity): it would count its evidence twice.
pub fn combine(committed: i64, present: &[&Partial], missing_capacity_ms: i64) -> Combined {
    let mut sum = Partial::default();
    let mut team_sums = teams::TeamAmounts::new();
    for p in present {
        sum.delivered = sum.delivered.saturating_add(p.delivered);
        sum.used = sum.used.saturating_add(p.used);
        sum.reported = sum.reported.saturating_add(p.reported);
        sum.expected = sum.expected.saturating_add(p.expected);
        sum.absent = sum.absent.saturating_add(p.absent);
        sum.held = sum.held.saturating_add(p.held);
        sum.allocated = sum.allocated.saturating_add(p.allocated);
        sum.watched |= p.watched;
        sum.unsized_dark |= p.unsized_dark;
        for (team, a, u) in &p.teams {
            teams::add(&mut team_sums, team, *a, *u);
        }
    }
    let missing = missing_capacity_ms.max(0);
    let expected = sum.expected.saturating_add(missing);
    let dark = (!sum.watched && missing == 0) || sum.unsized_dark;
    let known = expected.saturating_add(sum.absent);
    Combined {
        totals: split_held(
            committed,
            sum.delivered,
            sum.used,
            sum.held,
            expected.saturating_sub(sum.reported),
            dark,
        ),
        allocated: sum.allocated,
        teams: team_sums
            .into_iter()
            .filter(|(_, (a, u))| *a != 0 || *u != 0)
            .map(|(team, (a, u))| (team, a, u))
            .collect(),
        short: (!dark).then(|| committed.saturating_sub(known)),
    }
}
