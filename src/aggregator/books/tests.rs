//! The books against hand-computed expectations: a contract of N GPUs commits N × 60 000
//! GPU-ms a minute; a minute no target watched is unreported in full.

use std::collections::BTreeMap;
use std::time::Duration;

use super::*;
use crate::aggregator::scrape::GpuReport;
use crate::ledger::{split, Cause, Kind};

const M: i64 = MINUTE_MS;
/// 2026-10-05T00:00:00Z, inside every test contract.
const T0: i64 = 1_791_158_400_000;
/// The first minute a ledger started at `T0` accounts.
const FIRST: i64 = T0 / M + 1;

/// One contract of `gpus` GPUs from 2026-10-01, UTC, counting only `model` GPUs if given.
fn contracts(gpus: u32, model: Option<&str>) -> Vec<Contract> {
    contracts_in("UTC", gpus, model)
}

/// One contract of `gpus` GPUs from 2026-10-01 in time zone `tz`.
fn contracts_in(tz: &str, gpus: u32, model: Option<&str>) -> Vec<Contract> {
    let model = model.map_or(String::new(), |m| format!("model = {m:?}\n"));
    contracts_with(tz, gpus, &model)
}

/// One contract of `gpus` GPUs from 2026-10-01 in time zone `tz`, with `extra` lines.
fn contracts_with(tz: &str, gpus: u32, extra: &str) -> Vec<Contract> {
    let text = format!(
        r#"
[[contracts]]
id = "c"
provider = "p"
price_per_gpu_hour = 2.0
currency = "USD"
timezone = "{tz}"
start = "2026-10-01"
selector = '{{provider="p"}}'
{extra}ramp = [ {{ from = "2026-10-01", gpus = {gpus} }} ]
"#
    );
    crate::contract::parse(std::path::Path::new("t.toml"), &text)
        .unwrap()
        .contracts
}

/// A store in memory: rows by (contract, minute), the last snapshot, delivery gaps by
/// (contract, start, target, GPU), the store's key, with how often each was written, and a
/// switch that makes every commit fail.
#[derive(Default)]
struct MemStore {
    rows: BTreeMap<(String, i64), Totals>,
    snap: Option<Snapshot>,
    gaps: BTreeMap<GapKey, (Gap, usize)>,
    /// Late GPU-ms by (contract, minute, commit), as the SQLite store keeps them.
    late: BTreeMap<(String, i64, u64), (i64, i64)>,
    /// Sealed team rows by (contract, minute, team): (allocated, used).
    teams: BTreeMap<(String, i64, String), (i64, i64)>,
    commits: u64,
    broken: bool,
}

type GapKey = (String, i64, String, String);

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct MemError(&'static str);

impl LedgerStore for MemStore {
    type Error = MemError;

    fn load(&self, _ids: &[String]) -> Result<Option<Snapshot>, MemError> {
        Ok(self.snap.clone())
    }

    fn sums(&self, contract: &str, from: i64, to: i64) -> Result<Totals, MemError> {
        let mut sum = Totals::default();
        for t in self.minutes(contract, from, to)? {
            sum.add(&t.1);
        }
        Ok(sum)
    }

    fn minutes(&self, contract: &str, from: i64, to: i64) -> Result<Vec<(i64, Totals)>, MemError> {
        Ok(self
            .rows
            .iter()
            .filter(|((c, m), _)| c == contract && (from..to).contains(m))
            .map(|((_, m), t)| (*m, *t))
            .collect())
    }

    fn team_sums(&self, contract: &str, from: i64, to: i64) -> Result<Vec<TeamRow>, MemError> {
        let mut by_team: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        for ((c, m, team), (a, u)) in &self.teams {
            if c == contract && (from..to).contains(m) {
                let e = by_team.entry(team.clone()).or_default();
                *e = (e.0 + a, e.1 + u);
            }
        }
        Ok(by_team.into_iter().map(|(t, (a, u))| (t, a, u)).collect())
    }

    fn gaps(&self, contract: &str, from: i64, to: i64) -> Result<Vec<Gap>, MemError> {
        Ok(self
            .gaps
            .iter()
            .filter(|(k, (g, _))| k.0 == contract && g.overlap_ms(from, to) > 0)
            .map(|(_, (g, _))| g.clone())
            .collect())
    }

    fn commit(&mut self, ids: &[String], commit: &Commit) -> Result<(), MemError> {
        if self.broken {
            return Err(MemError("disk full"));
        }
        let Commit {
            sealed,
            snap,
            gaps,
            late,
            hosts: _,
        } = commit;
        self.commits += 1;
        for l in late {
            let key = (ids[l.contract].clone(), l.minute, self.commits);
            self.late.insert(key, (l.delivered, l.used));
        }
        for g in gaps {
            let key = (
                ids[g.contract].clone(),
                g.start_ms,
                g.target.clone(),
                g.gpu.clone(),
            );
            let writes = self.gaps.get(&key).map_or(0, |w| w.1);
            self.gaps.insert(key, (g.clone(), writes + 1));
        }
        for s in sealed {
            let key = (ids[s.contract].clone(), s.minute);
            if self.rows.get(&key).is_some_and(|t| *t != s.totals) {
                return Err(MemError("a sealed minute changed"));
            }
            self.rows.insert(key, s.totals);
            for (team, a, u) in &s.teams {
                let key = (ids[s.contract].clone(), s.minute, team.clone());
                self.teams.insert(key, (*a, *u));
            }
        }
        self.snap = Some(snap.clone());
        Ok(())
    }

    fn late_minutes(
        &self,
        contract: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<(i64, i64, i64)>, MemError> {
        let mut by_minute: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
        for ((c, m, _), (d, u)) in &self.late {
            if c == contract && (from..to).contains(m) {
                let e = by_minute.entry(*m).or_default();
                *e = (e.0 + d, e.1 + u);
            }
        }
        Ok(by_minute.into_iter().map(|(m, (d, u))| (m, d, u)).collect())
    }

    fn gaps_to_restore(
        &self,
        ids: &[String],
        closed_from_ms: Option<i64>,
    ) -> Result<Vec<Gap>, MemError> {
        let from = closed_from_ms.unwrap_or(i64::MAX);
        Ok(self
            .gaps
            .iter()
            .filter(|(_, (g, _))| g.end_ms.is_none_or(|e| e >= from))
            .filter_map(|(k, (g, _))| {
                let contract = ids.iter().position(|id| *id == k.0)?;
                Some(Gap {
                    contract,
                    ..g.clone()
                })
            })
            .collect())
    }

    fn flush(&mut self) -> Result<(), MemError> {
        Ok(())
    }
}

impl MemStore {
    /// A store whose every commit fails, until `broken` is cleared.
    fn broken() -> Self {
        Self {
            broken: true,
            ..Self::default()
        }
    }
}

fn open(store: &MemStore, contracts: Vec<Contract>, grace_ms: i64) -> Books {
    let snap = store.load(&[]).unwrap();
    Books::restore(store, contracts, grace_ms, snap, T0).unwrap()
}

/// One write, as the writer thread does it: `None` when one is already in flight.
fn write(books: &mut Books, store: &mut MemStore) -> Option<Finished> {
    let commit = books.start_write(crate::clock::monotonic_now())?;
    let ok = store.commit(&["c".to_string()], &commit).is_ok();
    Some(books.finish_write(ok))
}

/// An agent's report at `t` (started at `T0`) of GPUs (UUID, model, busy ms).
fn report(t: i64, gpus: &[(&str, &str, i64)]) -> HostReport {
    HostReport {
        round_ms: Some(t),
        start_ms: Some(T0),
        sampled_ms: Some(t - T0),
        gpus: gpus
            .iter()
            .map(|(uuid, model, busy)| {
                (
                    uuid.to_string(),
                    GpuReport {
                        observed_ms: t - T0,
                        busy_ms: Some(*busy),
                        allocated_ms: None,
                        model: Some(model.to_string()),
                        ..GpuReport::default()
                    },
                )
            })
            .collect(),
        xids: BTreeMap::new(),
    }
}

/// A minute of `gpus` committed GPUs that nothing watched.
fn dark(minute: i64, gpus: i64) -> Sealed {
    Sealed {
        contract: 0,
        minute,
        totals: Totals {
            committed: gpus * M,
            unreported: gpus * M,
            ..Totals::default()
        },
        ..Sealed::default()
    }
}

#[test]
fn a_minute_seals_once_its_grace_has_passed() {
    let mut books = open(&MemStore::default(), contracts(2, None), 30_000);
    assert_eq!(books.since(), FIRST);
    // Minute FIRST ends at (FIRST + 1) * M; with 30 s of grace it seals 30 s later.
    assert_eq!(books.seal_due((FIRST + 1) * M + 29_999), 0);
    assert_eq!(books.sealed_through(), FIRST);
    assert_eq!(books.seal_due((FIRST + 1) * M + 30_000), 1);
    assert_eq!(books.sealed_through(), FIRST + 1);
    let commit = books.start_write(crate::clock::monotonic_now()).unwrap();
    assert_eq!(commit.sealed, vec![dark(FIRST, 2)]);
    assert_eq!(commit.snap.sealed_through, FIRST + 1);
}

#[test]
fn counters_move_only_after_a_successful_write() {
    let mut store = MemStore::default();
    let mut books = open(&store, contracts(2, None), 0);
    assert_eq!(books.seal_due((FIRST + 3) * M), 3);
    // Sealed, not durable: nothing counted yet.
    assert_eq!(books.running(0).all_time, Totals::default());
    assert_eq!(books.durable_through(), FIRST);
    assert_eq!(books.sealed_through(), FIRST + 3);

    let started = crate::clock::monotonic_now();
    let commit = books.start_write(started).unwrap();
    assert_eq!(commit.sealed.len(), 3);
    assert_eq!(
        books.write_in_flight_for(started + Duration::from_secs(10)),
        Some(Duration::from_secs(10))
    );
    // One write at a time: the next one carries whatever comes meanwhile.
    assert!(books.start_write(started).is_none());
    assert_eq!(books.seal_due((FIRST + 4) * M), 4);
    store.commit(&["c".into()], &commit).unwrap();
    assert_eq!(
        books.finish_write(true),
        Finished::Durable {
            minutes: 3,
            recovered: false
        }
    );
    assert_eq!(books.write_in_flight_for(started), None);
    // 3 minutes × 2 GPUs, all unreported; the minute sealed during the write waits.
    let all = books.running(0).all_time;
    assert_eq!((all.committed, all.unreported), (6 * M, 6 * M));
    assert_eq!(books.running(0).period, all);
    assert_eq!(books.durable_through(), FIRST + 3);
    assert_eq!(books.pending(), 1);
    assert_eq!(
        books.period_minutes(0),
        &[
            (FIRST, dark(FIRST, 2).totals),
            (FIRST + 1, dark(FIRST, 2).totals),
            (FIRST + 2, dark(FIRST, 2).totals)
        ]
    );
    // The next write takes it.
    assert_eq!(
        write(&mut books, &mut store),
        Some(Finished::Durable {
            minutes: 1,
            recovered: false
        })
    );
    assert_eq!(books.durable_through(), FIRST + 4);
    assert_eq!(books.running(0).all_time.committed, 8 * M);
    assert_eq!(store.rows.len(), 4);
}

#[test]
fn a_failed_write_keeps_its_minutes_pending_for_the_next() {
    let mut store = MemStore::broken();
    let mut books = open(&store, contracts(2, None), 0);
    books.seal_due((FIRST + 2) * M);
    assert_eq!(
        write(&mut books, &mut store),
        Some(Finished::Failed { pending: 2 })
    );
    assert!(books.failing());
    assert_eq!(books.running(0).all_time, Totals::default());
    assert_eq!(books.durable_through(), FIRST);
    assert!(store.rows.is_empty());
    // Still failing: the minutes pile up, nothing counts.
    books.seal_due((FIRST + 3) * M);
    assert_eq!(
        write(&mut books, &mut store),
        Some(Finished::Failed { pending: 3 })
    );
    assert_eq!(books.durable_through(), FIRST);

    store.broken = false;
    assert_eq!(
        write(&mut books, &mut store),
        Some(Finished::Durable {
            minutes: 3,
            recovered: true
        })
    );
    assert!(!books.failing());
    assert_eq!(books.pending(), 0);
    assert_eq!(books.durable_through(), FIRST + 3);
    assert_eq!(books.running(0).all_time.committed, 6 * M);
    assert_eq!(
        store.rows.keys().map(|(_, m)| *m).collect::<Vec<_>>(),
        vec![FIRST, FIRST + 1, FIRST + 2]
    );
}

#[test]
fn at_most_seven_days_of_minutes_wait_for_a_broken_store() {
    let mut store = MemStore::broken();
    let mut books = open(&store, contracts(1, None), 0);
    let hour = |k: i64| (FIRST + 60 * k) * M;
    // A week of hourly rounds, every write failing: every minute waits in memory.
    for k in 1..=7 * 24 {
        books.seal_due(hour(k));
        assert!(matches!(
            write(&mut books, &mut store),
            Some(Finished::Failed { .. })
        ));
    }
    assert_eq!(books.pending(), 7 * 1440);
    assert_eq!(books.sealed_through(), FIRST + 7 * 1440);
    // Past the bound, minutes stay open in the ledger instead.
    assert_eq!(books.seal_due(hour(7 * 24 + 1)), 7 * 1440);
    assert_eq!(books.sealed_through(), FIRST + 7 * 1440);
    assert_eq!(books.durable_through(), FIRST);

    // The disk is back: the week is written, and the hour left open seals.
    store.broken = false;
    assert_eq!(
        write(&mut books, &mut store),
        Some(Finished::Durable {
            minutes: 7 * 1440,
            recovered: true
        })
    );
    assert_eq!(books.running(0).all_time.committed, 7 * 1440 * M);
    assert_eq!(books.seal_due(hour(7 * 24 + 1)), 60);
    assert_eq!(books.sealed_through(), FIRST + 7 * 1440 + 60);
}

/// Between host checkpoints a write copies no host state (at 125,000 hosts a copy is
/// ~200 MB each round); the write after the store says one is due, the write after a
/// failed one, and the last write at a clean stop carry every host's.
#[test]
fn host_states_go_with_a_write_only_when_the_store_wants_them() {
    let mut store = MemStore::default();
    let mut books = open(&store, contracts(1, None), 0);
    books.record(
        "h:1",
        0,
        T0 + 10_000,
        &report(T0 + 10_000, &[("GPU-1", "H100", 0)]),
    );
    let hosts_of_next_write = |books: &mut Books, store: &mut MemStore| {
        let commit = books.start_write(crate::clock::monotonic_now()).unwrap();
        let ok = store.commit(&["c".to_string()], &commit).is_ok();
        books.finish_write(ok);
        assert_eq!(commit.hosts, !commit.snap.hosts.is_empty());
        commit.snap.hosts.len()
    };
    // Until the store says otherwise, every write carries them.
    assert_eq!(hosts_of_next_write(&mut books, &mut store), 1);
    assert_eq!(hosts_of_next_write(&mut books, &mut store), 1);
    books.want_hosts(false);
    assert_eq!(hosts_of_next_write(&mut books, &mut store), 0);
    assert_eq!(hosts_of_next_write(&mut books, &mut store), 0);
    // A failed write: the next carries them, whatever was due.
    store.broken = true;
    hosts_of_next_write(&mut books, &mut store);
    store.broken = false;
    assert_eq!(hosts_of_next_write(&mut books, &mut store), 1);
    books.want_hosts(false);
    assert_eq!(hosts_of_next_write(&mut books, &mut store), 0);
    books.want_hosts(true);
    assert_eq!(hosts_of_next_write(&mut books, &mut store), 1);
}

#[test]
fn restore_reads_back_what_was_written() {
    let mut store = MemStore::default();
    let mut books = open(&store, contracts(3, None), 0);
    books.seal_due((FIRST + 5) * M);
    write(&mut books, &mut store);
    // Sealed but never written: lost with the process, sealed again after restore.
    books.seal_due((FIRST + 6) * M);

    let again = open(&store, contracts(3, None), 0);
    assert_eq!(again.since(), FIRST);
    assert_eq!(again.durable_through(), FIRST + 5);
    assert_eq!(again.sealed_through(), FIRST + 5);
    let all = again.running(0).all_time;
    assert_eq!((all.committed, all.unreported), (15 * M, 15 * M));
    assert_eq!(again.running(0).period, all);
    assert_eq!(again.period_minutes(0).len(), 5);
    assert_eq!(again.period_minutes(0), books.period_minutes(0));
    assert_eq!(again.pending(), 0);
}

#[test]
fn record_counts_the_contracts_gpus_only() {
    let mut books = open(&MemStore::default(), contracts(1, Some("H100")), 5 * M);
    let report = |t: i64| {
        report(
            t,
            &[
                ("h100", "NVIDIA H100 80GB HBM3", (t - T0) / 2),
                ("a100", "NVIDIA A100-SXM4-40GB", t - T0),
            ],
        )
    };
    // Read at the start of the first minute and 5 minutes later.
    let (gpus, out) = books.record("h:9473", 0, T0 + M + 7, &report(T0 + M));
    assert_eq!(gpus, 1);
    assert!(out.rejected.is_empty(), "{out:?}");
    let (_, out) = books.record("h:9473", 0, T0 + 6 * M + 7, &report(T0 + 6 * M));
    assert!(out.rejected.is_empty(), "{out:?}");
    // 5 minutes of grace after the last one.
    assert_eq!(books.seal_due(T0 + 11 * M), 5);
    let commit = books.start_write(crate::clock::monotonic_now()).unwrap();
    for s in &commit.sealed {
        // The H100 only: delivered in full, used half; the A100 (fully busy) not at all.
        let t = s.totals;
        assert_eq!(
            (t.committed, t.delivered, t.used, t.idle),
            (M, M, M / 2, M / 2),
            "{s:?}"
        );
        assert_eq!((t.unreported, t.undelivered, t.overage), (0, 0, 0), "{s:?}");
    }
}

#[test]
fn figures_follow_the_durable_minutes() {
    let mut store = MemStore::default();
    let mut books = open(&store, contracts(2, None), 0);
    books.seal_due((FIRST + 30) * M);
    // Before the write: no minute counted.
    assert_eq!(books.figures(0).utilization, None);
    assert_eq!(books.figures(0).cost(Kind::Committed), Some(0.0));
    write(&mut books, &mut store);
    // 30 dark minutes of 2 GPUs: one GPU-hour committed at 2.0 an hour, none used.
    assert_eq!(books.figures(0).utilization, Some(0.0));
    assert_eq!(books.figures(0).cost(Kind::Committed), Some(2.0));
    assert_eq!(books.figures(0).cost(Kind::Used), Some(0.0));
}

/// Sealed minutes crossing a Los Angeles month end roll the month-to-date figures
/// at local midnight (07:00 UTC in November, PDT), not at UTC midnight.
#[test]
fn month_to_date_rolls_at_local_midnight_across_dst() {
    let contracts = contracts_in("America/Los_Angeles", 10, None);
    let c = &contracts[0];
    // 2026-11-01T06:00Z is 23:00 PDT on Oct 31; local midnight is 07:00Z.
    let first = 1_793_512_800_000 / MINUTE_MS; // 2026-11-01T06:00:00Z
    let mut r = Running::new(
        Default::default(),
        c.billing_period(first * MINUTE_MS),
        Default::default(),
        vec![],
    );
    assert_eq!(r.period_end_ms, 1_793_516_400_000); // 2026-11-01T07:00:00Z
    for minute in first..first + 120 {
        let (a, b) = (minute * MINUTE_MS, (minute + 1) * MINUTE_MS);
        let s = Sealed {
            contract: 0,
            minute,
            totals: split(c.committed_gpu_ms(a, b), 600_000, 300_000, 0, false),
            ..Sealed::default()
        };
        r.record(&s, |t| c.billing_period(t));
    }
    // One hour in the new (November) period, two hours all time.
    assert_eq!(r.period_start_ms, 1_793_516_400_000);
    assert_eq!(r.period_end_ms, 1_796_112_000_000); // 2026-12-01T08:00:00Z (PST)
    assert_eq!(r.period.committed, 10 * 3_600_000);
    assert_eq!(r.all_time.committed, 10 * 7_200_000);
    assert_eq!(r.period.used, 60 * 300_000);
}

/// A host that could not be scraped opens a `host_unreachable` gap, closed at its next
/// reading: the gaps reach the store with the minutes, a failed write keeps them pending,
/// a successful one writes a closed gap once (an open one with every write until it
/// closes), and a restart takes the open ones back.
#[test]
fn delivery_gaps_are_written_with_the_minutes_and_a_closed_one_once() {
    let mut store = MemStore::broken();
    let mut books = open(&store, contracts(1, None), 5 * M);
    let h100 = |t: i64| report(t, &[("gpu-1", "NVIDIA H100 80GB HBM3", 0)]);
    books.record("h:9473", 0, T0 + M, &h100(T0 + M));
    books.unreachable("h:9473", 0);
    books.unreachable("h:9473", 0);
    books.record("h:9473", 0, T0 + 3 * M, &h100(T0 + 3 * M));
    let closed = |store: &MemStore| -> Vec<(Gap, usize)> {
        store
            .gaps
            .values()
            .filter(|(g, _)| g.end_ms.is_some())
            .cloned()
            .collect()
    };

    assert_eq!(
        write(&mut books, &mut store),
        Some(Finished::Failed { pending: 0 })
    );
    assert!(store.gaps.is_empty());
    store.broken = false;
    write(&mut books, &mut store);
    let written = closed(&store);
    assert_eq!(written.len(), 1, "{:?}", store.gaps);
    let (gap, writes) = &written[0];
    assert_eq!(
        (gap.cause, gap.target.as_str(), gap.gpu.as_str()),
        (Cause::HostUnreachable, "h:9473", "gpu-1")
    );
    assert_eq!(
        (gap.start_ms, gap.end_ms, *writes),
        (T0 + M, Some(T0 + 3 * M), 1)
    );
    // Persisted: not handed to the store again.
    write(&mut books, &mut store);
    assert_eq!(closed(&store)[0].1, 1);

    // Unreachable again, two readings later: an open gap, written with every commit and
    // taken back at a restart.
    books.record("h:9473", 0, T0 + 4 * M, &h100(T0 + 4 * M));
    books.unreachable("h:9473", 0);
    write(&mut books, &mut store);
    write(&mut books, &mut store);
    let open_gaps = store.gaps_to_restore(&["c".to_string()], None).unwrap();
    assert_eq!(open_gaps.len(), 1, "{:?}", store.gaps);
    assert_eq!(
        (open_gaps[0].start_ms, open_gaps[0].cause),
        (T0 + 4 * M, Cause::HostUnreachable)
    );
    let mut again = open(&store, contracts(1, None), 5 * M);
    let Commit { gaps, .. } = again.start_write(crate::clock::monotonic_now()).unwrap();
    assert_eq!(gaps, open_gaps);
}

/// An agent's report at `t` (started at `T0`) of GPUs (UUID, observed ms), model H100.
fn observed(t: i64, gpus: &[(&str, i64)]) -> HostReport {
    let mut r = report(t, &[]);
    for (uuid, ms) in gpus {
        r.gpus.insert(
            uuid.to_string(),
            GpuReport {
                observed_ms: *ms,
                busy_ms: Some(0),
                allocated_ms: None,
                model: Some("NVIDIA H100 80GB HBM3".to_string()),
                ..GpuReport::default()
            },
        );
    }
    r
}

/// The store's gaps of one GPU (`""`: `short`), by start.
fn gaps_of(store: &MemStore, gpu: &str) -> Vec<Gap> {
    store
        .gaps
        .values()
        .map(|(g, _)| g.clone())
        .filter(|g| g.gpu == gpu)
        .collect()
}

/// A scrape round of host `h:9473` at `t` with report `r`, sealed and written.
fn round(books: &mut Books, store: &mut MemStore, t: i64, r: &HostReport) {
    books.record("h:9473", 0, t, r);
    books.seal_due(t);
    write(books, store);
}

/// As `Store::load` restores hosts whose checkpoint is older than the last commit (a
/// `kill -9` between the hourly host checkpoints): they re-baseline.
fn rebaseline(store: &mut MemStore) {
    for (_, _, h) in &mut store.snap.as_mut().unwrap().hosts {
        h.last = None;
        h.sized_since_ms = None;
        h.carry = [0, 0];
        h.carry_held = 0;
    }
}

/// One outage is one piece of evidence across a restart: a GPU gone before it keeps its
/// restored `gpu_lost` gap and is not also `short` (the contract commits the host's 2 GPUs),
/// whether the restart restores the host's reading (a clean stop) or re-baselines it
/// (`kill -9`); the gap closes when the GPU returns.
#[test]
fn a_gpu_gone_before_a_restart_is_lost_and_not_also_short() {
    for kill in [false, true] {
        let mut store = MemStore::default();
        let mut books = open(&store, contracts(2, None), 0);
        let both = |t: i64| observed(t, &[("gpu-1", t - T0), ("gpu-2", t - T0)]);
        let one = |t: i64| observed(t, &[("gpu-1", t - T0)]);
        let mut t = T0 + 15_000;
        books.record("h:9473", 0, t, &both(t));
        books.start_after(t);
        // gpu-2 is gone from the second reading for 10 minutes; the restart is at 5.
        while t < T0 + 5 * M {
            t += 15_000;
            round(&mut books, &mut store, t, &one(t));
        }
        if kill {
            rebaseline(&mut store);
        }
        let mut books = open(&store, contracts(2, None), 0);
        while t < T0 + 11 * M {
            t += 15_000;
            let r = if t < T0 + 10 * M { one(t) } else { both(t) };
            round(&mut books, &mut store, t, &r);
        }
        assert_eq!(gaps_of(&store, ""), vec![], "kill {kill}: short");
        let lost = gaps_of(&store, "gpu-2");
        assert_eq!(lost.len(), 1, "kill {kill}: {lost:?}");
        assert_eq!(
            (lost[0].cause, lost[0].start_ms, lost[0].end_ms),
            (Cause::GpuLost, T0 + 15_000, Some(T0 + 10 * M)),
            "kill {kill}"
        );
    }
}

/// A restart from a host checkpoint older than the stored gaps (as a store would that
/// restored the hourly checkpoint after a crash instead of re-baselining): the first
/// interval after it spans a stored gap, and the gap it finds reopens that one instead of
/// overlapping it. The rows of a GPU never overlap.
#[test]
fn a_restart_from_an_old_host_checkpoint_never_opens_a_gap_over_a_stored_one() {
    let mut store = MemStore::default();
    let mut books = open(&store, contracts(1, None), 0);
    // gpu-1 stalls from 30 s to 60 s after T0.
    let at = |t: i64| observed(t, &[("gpu-1", t - T0 - (t - T0 - 30_000).clamp(0, 30_000))]);
    let mut t = T0 + 15_000;
    books.record("h:9473", 0, t, &at(t));
    books.start_after(t);
    write(&mut books, &mut store);
    let old = store.snap.clone().unwrap().hosts;
    while t < T0 + 3 * M {
        t += 15_000;
        round(&mut books, &mut store, t, &at(t));
    }
    let stored = gaps_of(&store, "gpu-1");
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(
        (stored[0].start_ms, stored[0].end_ms),
        (T0 + 30_000, Some(T0 + 60_000))
    );

    store.snap.as_mut().unwrap().hosts = old;
    let mut books = open(&store, contracts(1, None), 0);
    for _ in 0..3 {
        t += 15_000;
        round(&mut books, &mut store, t, &at(t));
    }
    // The interval from 15 s on is short (by the stall): its gap is the stored one,
    // reopened, to the first reading after it.
    let gaps = gaps_of(&store, "gpu-1");
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert_eq!(
        (gaps[0].start_ms, gaps[0].end_ms, gaps[0].cause),
        (T0 + 30_000, Some(T0 + 3 * M + 15_000), Cause::GpuLost)
    );
}

/// One contract of 3 GPUs with `usage_signal = signal`.
fn contracts_with_signal(signal: &str) -> Vec<Contract> {
    contracts_with("UTC", 3, &format!("usage_signal = {signal:?}\n"))
}

/// A host at `t` (agent started at `T0`) of three GPUs, each present all the time:
/// - `stuck` (GPM): held by a process, 100 % busy, no SM activity;
/// - `held` (no GPM): held by a process that runs no kernel;
/// - `free` (no GPM): no process, no kernel.
///
/// `split`: whether the agent exports the allocated-busy counters (false: an agent older
/// than the idle split).
fn mixed(t: i64, split: bool) -> HostReport {
    let e = t - T0;
    let gpu = |busy: i64, allocated: i64, sm: Option<i64>| GpuReport {
        observed_ms: e,
        busy_ms: Some(busy),
        allocated_ms: Some(allocated),
        sm_active_ms: sm,
        allocated_busy_ms: split.then_some(busy.min(allocated)),
        allocated_sm_active_ms: sm.filter(|_| split),
        model: Some("NVIDIA H100 80GB HBM3".to_string()),
        ..GpuReport::default()
    };
    let mut r = report(t, &[]);
    r.gpus.insert("stuck".into(), gpu(e, e, Some(0)));
    r.gpus.insert("held".into(), gpu(0, e, None));
    r.gpus.insert("free".into(), gpu(0, 0, None));
    r
}

/// Each usage signal maps the agents' counters to used and held time: per minute of three
/// committed GPUs, (used, idle_unallocated, idle_allocated) in GPU-seconds, and how many
/// GPUs fell back to busy time.
#[test]
fn each_usage_signal_splits_idle_by_what_held_the_gpus() {
    let s = |x: i64| x * 1000;
    for (signal, split, want, fallback) in [
        // busy: the stuck GPU is used; the held one is allocated-idle.
        ("busy", true, (s(60), s(60), s(60)), 0),
        // allocated: what a process holds is used; only the free GPU is idle.
        ("allocated", true, (s(120), s(60), 0), 0),
        // sm_active: the stuck GPU did no work (held, idle); the GPUs without GPM count
        // busy time instead (none) and say so.
        ("sm_active", true, (0, s(60), s(120)), 2),
        // An agent without the allocated-busy counters: held unknown, all idle unallocated.
        ("busy", false, (s(60), s(120), 0), 0),
        ("sm_active", false, (0, s(180), 0), 2),
    ] {
        let mut store = MemStore::default();
        let mut books = open(&store, contracts_with_signal(signal), 0);
        let mut t = T0 + 15_000;
        books.record("h:9473", 0, t, &mixed(t, split));
        books.start_after(t);
        while t < (FIRST + 3) * M {
            t += 15_000;
            round(&mut books, &mut store, t, &mixed(t, split));
        }
        assert_eq!(books.usage_fallback_gpus(0), fallback, "{signal}");
        let rows: Vec<Totals> = store.rows.values().copied().collect();
        assert!(rows.len() >= 2, "{signal}: {rows:?}");
        for r in rows {
            assert_eq!(
                (r.used, r.idle_unallocated, r.idle_allocated),
                want,
                "{signal} split={split}: {r:?}"
            );
            assert_eq!(r.idle, r.idle_unallocated + r.idle_allocated);
            assert_eq!(
                r.committed,
                r.used_within() + r.idle + r.undelivered + r.unreported
            );
        }
    }
}

/// The fallback count is per target: a target that leaves the contract takes its GPUs out
/// of it.
#[test]
fn the_fallback_count_follows_the_targets() {
    let mut store = MemStore::default();
    let mut books = open(&store, contracts_with_signal("sm_active"), 0);
    books.configure(
        T0,
        &[("h:9473".into(), vec![0]), ("g:9473".into(), vec![0])],
    );
    let t = T0 + 15_000;
    books.record("h:9473", 0, t, &mixed(t, true));
    books.record("g:9473", 0, t, &mixed(t, true));
    assert_eq!(books.usage_fallback_gpus(0), 4);
    books.configure(t, &[("h:9473".into(), vec![0])]);
    assert_eq!(books.usage_fallback_gpus(0), 2);
    write(&mut books, &mut store);
}

/// The owners of a contract's GPUs reach the reading with their team and the contract's
/// usage signal on their share: busy; SM-active, or busy on a GPU without GPM (the GPU's
/// own fallback); allocated itself. An owner without an allocated series is left out.
#[test]
fn owners_get_their_team_and_the_contracts_usage_signal() {
    use crate::aggregator::scrape::OwnerReport;
    use crate::owner::{Owner, OwnerKind};
    let teams = crate::contract::parse(
        std::path::Path::new("aggregator.toml"),
        "[[teams]]\nname = \"vision\"\nslurm_account = \"vision\"\n",
    )
    .unwrap()
    .teams;
    let job = |id: &str, account: &str| Owner {
        kind: OwnerKind::SlurmJob,
        id: id.into(),
        user: "bob".into(),
        account: account.into(),
        ..Owner::default()
    };
    let owner = |o: Owner, allocated: Option<i64>| OwnerReport {
        owner: o,
        allocated_ms: allocated,
        busy_ms: Some(300),
        sm_active_ms: Some(100),
    };
    let gpu = |gpm: bool| GpuReport {
        sm_active_ms: gpm.then_some(5_000),
        owners: [
            owner(job("1", "vision"), Some(1_000)),
            owner(job("2", "other"), Some(2_000)),
            owner(job("3", "vision"), None),
        ]
        .into_iter()
        .map(|o| (o.owner.key(), o))
        .collect(),
        ..GpuReport::default()
    };
    for (signal, gpm, used) in [
        (UsageSignal::Busy, true, 300),
        (UsageSignal::SmActive, true, 100),
        (UsageSignal::SmActive, false, 300),
    ] {
        let mut out = BTreeMap::new();
        owner_counters(&teams, signal, "GPU-a", &gpu(gpm), &mut out);
        let got: Vec<(&str, &str, i64, i64)> = out
            .iter()
            .map(|((uuid, _), c)| (uuid.as_str(), c.team.as_str(), c.allocated_ms, c.used_ms))
            .collect();
        assert_eq!(
            got,
            [
                ("GPU-a", "vision", 1_000, used),
                ("GPU-a", "unassigned", 2_000, used)
            ],
            "{signal:?} gpm={gpm}"
        );
    }
    let mut out = BTreeMap::new();
    owner_counters(
        &teams,
        UsageSignal::Allocated,
        "GPU-a",
        &gpu(true),
        &mut out,
    );
    assert!(out.values().all(|c| c.used_ms == c.allocated_ms), "{out:?}");
    assert_eq!(out.keys().next().unwrap().1, job("1", "vision").key());
}

/// The team book through the books: a host without owner series holds its GPUs for team
/// `unassigned`; the month-to-date and all-time team time move only with durable minutes
/// and are restored from the store after a restart, equal to the contract's allocated.
#[test]
fn team_time_is_durable_restored_and_sums_to_the_contracts_allocated() {
    for (signal, used_per_minute) in [("busy", 60_000), ("allocated", 120_000)] {
        let mut store = MemStore::default();
        let mut books = open(&store, contracts_with_signal(signal), 0);
        let mut t = T0 + 15_000;
        books.record("h:9473", 0, t, &mixed(t, true));
        books.start_after(t);
        while t < (FIRST + 3) * M {
            t += 15_000;
            books.record("h:9473", 0, t, &mixed(t, true));
            books.seal_due(t);
            // Sealed, not durable yet: nothing counted.
            let (_, before) = books.team_all_time(0);
            write(&mut books, &mut store);
            let (allocated, after) = books.team_all_time(0);
            assert!(after.len() <= 1 && before.len() <= 1, "{after:?}");
            assert_eq!(after.iter().map(|r| r.1).sum::<i64>(), allocated);
        }
        // Two GPUs held all the time (stuck, held): 120 s a minute, all unassigned.
        let minutes = store.rows.len() as i64;
        assert!(minutes >= 2);
        let want = vec![(
            "unassigned".to_string(),
            minutes * 120_000,
            minutes * used_per_minute,
        )];
        assert_eq!(books.team_period(0), want, "{signal}");
        assert_eq!(books.team_all_time(0), (minutes * 120_000, want.clone()));
        let again = open(&store, contracts_with_signal(signal), 0);
        assert_eq!(again.team_period(0), want);
        assert_eq!(again.team_all_time(0), books.team_all_time(0));
    }
}

/// A replica that started before the book's first seal takes back every sealed minute,
/// also those before its own start, and then resumes after the last one taken back.
#[test]
fn a_shared_book_is_taken_back_from_its_first_minute_whatever_this_process_started() {
    let contracts = contracts(8, None);
    let store = MemStore::default();
    // This process started at minute 105 (its own ledger accounts from 106).
    let start = FIRST + 105;
    let mut books = Books::restore(&store, contracts, 0, None, start * MINUTE_MS)
        .unwrap()
        .into_shared();
    let period = books.running(0).period_start_ms;
    let period = (period, books.running(0).period_end_ms);
    books.adopt_shared(0, period, SharedStart::default());
    assert_eq!(books.absorb_from(0), i64::MIN);
    let sealed = |minute: i64| Sealed {
        contract: 0,
        minute,
        totals: Totals {
            committed: 480_000,
            delivered: 480_000,
            ..Totals::default()
        },
        ..Sealed::default()
    };
    // The book's first minutes are before this process's start.
    assert_eq!(
        books.absorb(0, (start - 5..start - 1).map(sealed).collect()),
        4
    );
    assert_eq!(books.absorb_from(0), start - 1);
    assert_eq!(books.since_of(0), start - 5);
    // Read again, and the next: each counted once.
    assert_eq!(
        books.absorb(0, (start - 3..start + 1).map(sealed).collect()),
        2
    );
    assert_eq!(books.running(0).all_time.delivered, 6 * 480_000);
    assert_eq!(books.absorbed_through(0), start + 1);
    assert_eq!(books.durable_through(), start + 1);
}
