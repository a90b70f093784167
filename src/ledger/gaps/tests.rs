//! Gaps judged against scripted fleets: outages decided first, readings derived from them.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::ledger::{GpuCounters, HostState, Ledger, Reading, Snapshot, MINUTE_MS};

/// How one GPU fails in a script.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// Present in every reading, its observed time stalls during the outage.
    Stalls,
    /// Gone from the readings taken during the outage.
    Vanishes,
}

#[derive(Debug, Clone)]
struct Script {
    /// Scrape interval.
    s: i64,
    rounds: i64,
    /// Per host: GPUs, each with an optional outage `[from, to)` and its mode.
    hosts: Vec<Vec<Option<(i64, i64, Mode)>>>,
    /// Per host: an optional unreachable span `[from, to)` (scrapes fail; the agent runs).
    down: Vec<Option<(i64, i64)>>,
    /// Committed GPUs.
    committed: i64,
}

fn out_ms(outage: Option<(i64, i64, Mode)>, t: i64) -> i64 {
    outage.map_or(0, |(a, b, _)| (b.min(t) - a.min(t)).max(0))
}

fn gpu_name(g: usize) -> String {
    format!("GPU-{g}")
}

struct Run {
    ledger: Ledger,
    gaps: Vec<Gap>,
    /// Per contract minute: undelivered.
    undelivered: BTreeMap<i64, i64>,
    end: i64,
    /// With a [`Kill`]: what the restart found.
    restart: Option<Restarted>,
}

/// How a killed aggregator restarted.
#[derive(Debug, Clone, Copy)]
struct Restarted {
    /// The readings of the last commit before the kill.
    committed_ms: i64,
    /// The readings of the hosts' checkpoint it restored (`committed_ms` if that was the
    /// last commit's; none if the hosts re-baselined).
    restored_hosts_ms: Option<i64>,
    /// The first round after the restart.
    at_ms: i64,
}

/// An aggregator killed (`kill -9`: no flush) in round `round`, after reading its first
/// `read_before` hosts, restarted `down_rounds` rounds later from what the store holds:
/// the last commit's minutes and gaps, and the hosts' checkpoint written every
/// `checkpoint_every` rounds. The store re-baselines hosts whose checkpoint is older than
/// the last commit; `stale` restores that older checkpoint instead (the state up to
/// `checkpoint_every` rounds old, as a store without that rule would).
#[derive(Debug, Clone, Copy)]
struct Kill {
    round: i64,
    read_before: usize,
    down_rounds: i64,
    checkpoint_every: i64,
    stale: bool,
}

/// Runs a script through the ledger: a reading per host every `s` ms from 0, sealing each
/// round with no grace, persisting the gaps every round.
fn run(sc: &Script) -> Run {
    run_with(sc, 0, None)
}

/// [`run`], the agents exporting XIDs `xid_lag` ms late, and the aggregator killed and
/// restarted as `kill` says.
fn run_with(sc: &Script, xid_lag: i64, kill: Option<Kill>) -> Run {
    let mut ledger = Ledger::new(1, 0);
    // As the store keeps them: one row per (contract, start, target, GPU), rewritten.
    let mut rows: BTreeMap<(usize, i64, String, String), Gap> = BTreeMap::new();
    let mut undelivered = BTreeMap::new();
    let mut end = 0;
    // The store: the last commit's round and snapshot, the hosts' last checkpoint and its
    // round.
    let mut committed: Option<(i64, Snapshot)> = None;
    let mut checkpoint: (i64, Vec<(String, usize, HostState)>) = (-1, Vec::new());
    let mut kill = kill;
    let mut restart = None;
    let mut k = 0;
    'rounds: while k <= sc.rounds {
        let t = k * sc.s;
        end = t;
        for h in 0..=sc.hosts.len() {
            if let Some(kl) =
                kill.filter(|kl| kl.round == k && kl.read_before.min(sc.hosts.len()) == h)
            {
                // kill -9: the memory is lost; restart from what the store holds.
                kill = None;
                let (at, mut snap) = committed.clone().expect("a commit before the kill");
                let mut restored_hosts = Some(checkpoint.0 * sc.s);
                if checkpoint.0 != at {
                    if kl.stale {
                        snap.hosts = checkpoint.1.clone();
                    } else {
                        // As `Store::load` does: the hosts re-baseline.
                        restored_hosts = None;
                        for (_, _, hs) in &mut snap.hosts {
                            hs.last = None;
                            hs.sized_since_ms = None;
                            hs.carry = [0, 0];
                        }
                    }
                }
                ledger = Ledger::restore(1, snap);
                // Every stored row: the ledger takes what it needs.
                ledger.restore_gaps(rows.values().cloned());
                k += kl.down_rounds;
                restart = Some(Restarted {
                    committed_ms: at * sc.s,
                    restored_hosts_ms: restored_hosts,
                    at_ms: k * sc.s,
                });
                continue 'rounds;
            }
            let Some(gpus) = sc.hosts.get(h) else {
                break;
            };
            let target = format!("h{h}");
            if sc.down[h].is_some_and(|(a, b)| (a..b).contains(&t)) {
                ledger.unreachable(&target, 0);
                continue;
            }
            let mut list = BTreeMap::new();
            let mut xids = Xids::new();
            for (g, outage) in gpus.iter().enumerate() {
                let gone = matches!(outage, Some((a, b, Mode::Vanishes)) if (*a..*b).contains(&t));
                if gone {
                    continue;
                }
                let lost = out_ms(*outage, t);
                list.insert(
                    gpu_name(g),
                    GpuCounters {
                        observed_ms: t - lost,
                        used_ms: 0,
                        ..Default::default()
                    },
                );
                // One XID 79 per second of outage: grows exactly while it lasts (`xid_lag`
                // later). Its series exists from the first one on, as the agent exports it.
                let n = out_ms(*outage, t - xid_lag) / 1000;
                if n >= 1 {
                    xids.insert(gpu_name(g), BTreeMap::from([("79".to_string(), n as u64)]));
                }
            }
            let r = Reading {
                received_ms: t + 3,
                agent_ms: Some(t),
                agent_start_ms: Some(-1),
                sampled_ms: Some(t),
                gpus: list,
                owners: Default::default(),
            };
            ledger.observe_with_xids(&target, 0, r, &xids);
        }
        if k == 0 {
            ledger.start_after(t);
        }
        for s in ledger.seal(t, 0, |_, a, b| sc.committed * (b - a)) {
            undelivered.insert(s.minute, s.totals.undelivered);
        }
        let (pending, mark) = ledger.pending_gaps();
        for g in pending {
            rows.insert((g.contract, g.start_ms, g.target.clone(), g.gpu.clone()), g);
        }
        ledger.gaps_persisted(mark);
        let snap = ledger.snapshot();
        if k % kill.map_or(1, |kl| kl.checkpoint_every.max(1)) == 0 {
            checkpoint = (k, snap.hosts.clone());
        }
        committed = Some((k, snap));
        k += 1;
    }
    Run {
        ledger,
        gaps: rows.into_values().collect(),
        undelivered,
        end,
        restart,
    }
}

fn gpu_gaps(r: &Run, h: usize, g: usize) -> Vec<&Gap> {
    let (t, u) = (format!("h{h}"), gpu_name(g));
    let mut v: Vec<&Gap> = r
        .gaps
        .iter()
        .filter(|x| x.target == t && x.gpu == u)
        .collect();
    v.sort_by_key(|x| x.start_ms);
    v
}

fn one(outage: Option<(i64, i64, Mode)>, down: Option<(i64, i64)>) -> Script {
    Script {
        s: 15_000,
        rounds: 80,
        hosts: vec![vec![outage, None]],
        down: vec![down],
        committed: 2,
    }
}

#[test]
fn a_stalled_gpu_is_lost_from_the_reading_before_to_the_reading_after() {
    let r = run(&one(Some((100_000, 400_000, Mode::Stalls)), None));
    let g = gpu_gaps(&r, 0, 0);
    assert_eq!(g.len(), 1, "{g:?}");
    // Readings at 90 s and 405 s bound it: the last that saw it whole, the first after.
    assert_eq!((g[0].start_ms, g[0].end_ms), (90_000, Some(405_000)));
    assert_eq!(g[0].cause, Cause::GpuLost);
    assert_eq!(g[0].xids, BTreeSet::from(["79".to_string()]));
    assert!(gpu_gaps(&r, 0, 1).is_empty());
}

#[test]
fn a_vanished_gpu_is_lost_until_a_reading_shows_it_and_is_not_also_short() {
    let r = run(&one(Some((100_000, 400_000, Mode::Vanishes)), None));
    let g = gpu_gaps(&r, 0, 0);
    assert_eq!(g.len(), 1, "{g:?}");
    assert_eq!((g[0].start_ms, g[0].end_ms), (90_000, Some(405_000)));
    assert_eq!(g[0].cause, Cause::GpuLost);
    assert!(
        r.gaps.iter().all(|x| x.cause != Cause::Short),
        "{:?}",
        r.gaps
    );
}

#[test]
fn an_unreachable_host_has_a_gap_per_gpu_between_the_readings_around_it() {
    let r = run(&one(None, Some((100_000, 400_000))));
    for gpu in 0..2 {
        let g = gpu_gaps(&r, 0, gpu);
        assert_eq!(g.len(), 1, "{g:?}");
        assert_eq!((g[0].start_ms, g[0].end_ms), (90_000, Some(405_000)));
        assert_eq!(g[0].cause, Cause::HostUnreachable);
    }
}

#[test]
fn a_gpu_that_stalled_while_its_host_was_unreachable_is_lost() {
    let r = run(&one(
        Some((200_000, 600_000, Mode::Stalls)),
        Some((100_000, 400_000)),
    ));
    let g = gpu_gaps(&r, 0, 0);
    assert_eq!(g.len(), 1, "{g:?}");
    assert_eq!((g[0].start_ms, g[0].end_ms), (90_000, Some(600_000)));
    assert_eq!(g[0].cause, Cause::GpuLost);
    let other = gpu_gaps(&r, 0, 1);
    assert_eq!(other[0].cause, Cause::HostUnreachable);
}

#[test]
fn a_fleet_smaller_than_the_commitment_is_short_by_the_missing_gpus() {
    let mut sc = one(None, None);
    sc.committed = 3;
    let r = run(&sc);
    let short: Vec<&Gap> = r.gaps.iter().filter(|g| g.cause == Cause::Short).collect();
    assert_eq!(short.len(), 1, "{short:?}");
    let sealed_minutes = r.undelivered.len() as i64;
    assert_eq!(short[0].start_ms, r.ledger.since() * MINUTE_MS);
    assert_eq!(short[0].short_gpu_ms, sealed_minutes * MINUTE_MS);
    assert!(short[0].end_ms.is_none(), "still short: open");
    assert_eq!(short[0].target, "");
}

/// A reading of one GPU `g` at `t` with `observed` ms (agent clock, no restart).
fn one_gpu(t: i64, observed: i64) -> Reading {
    Reading {
        received_ms: t,
        agent_ms: Some(t),
        agent_start_ms: Some(-1),
        sampled_ms: Some(t),
        gpus: BTreeMap::from([(
            "g".to_string(),
            GpuCounters {
                observed_ms: observed,
                used_ms: 0,
                ..Default::default()
            },
        )]),
        owners: Default::default(),
    }
}

#[test]
fn a_gpu_stalling_every_other_interval_is_one_gap_and_memory_stays_bounded() {
    let sc = Script {
        s: 10_000,
        rounds: 2000,
        // The GPU stalls on every other interval: hundreds of gaps over the run.
        hosts: vec![vec![None]],
        down: vec![None],
        committed: 1,
    };
    let mut ledger = Ledger::new(1, 0);
    let mut observed = 0;
    let mut rows: BTreeMap<i64, Gap> = BTreeMap::new();
    for k in 0..=sc.rounds {
        let t = k * sc.s;
        if k % 2 == 1 {
            observed += sc.s / 2;
        } else if k > 0 {
            observed += sc.s;
        }
        ledger.observe("h", 0, one_gpu(t, observed));
        ledger.seal(t, 0, |_, a, b| b - a);
        let (pending, mark) = ledger.pending_gaps();
        rows.extend(pending.into_iter().map(|g| (g.start_ms, g)));
        ledger.gaps_persisted(mark);
        assert!(ledger.gaps.held() <= 2, "{}", ledger.gaps.held());
    }
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[&0].start_ms, 0);
}

#[test]
fn a_host_flapping_every_round_is_one_gap_per_gpu() {
    let mut ledger = Ledger::new(1, 0);
    for k in 0..200i64 {
        let t = k * 15_000;
        if k % 2 == 1 && k < 150 {
            ledger.unreachable("h", 0);
            continue;
        }
        ledger.observe("h", 0, one_gpu(t, t));
    }
    let (pending, _) = ledger.pending_gaps();
    let mut rows: BTreeMap<i64, Gap> = BTreeMap::new();
    rows.extend(pending.into_iter().map(|g| (g.start_ms, g)));
    assert_eq!(rows.len(), 1, "{rows:?}");
    // From the reading before the first failure to the reading after the last.
    assert_eq!(
        (rows[&0].start_ms, rows[&0].end_ms),
        (0, Some(150 * 15_000))
    );
    assert_eq!(rows[&0].cause, Cause::HostUnreachable);
}

fn outage(s: i64, rounds: i64) -> impl Strategy<Value = Option<(i64, i64, Mode)>> {
    let lo = 2 * s;
    let hi = (rounds - 2) * s;
    prop_oneof![
        Just(None),
        (
            lo..hi,
            1_000i64..hi,
            prop_oneof![Just(Mode::Stalls), Just(Mode::Vanishes)]
        )
            .prop_map(move |(a, len, m)| {
                let a = a / 1000 * 1000;
                Some((a, (a + len / 1000 * 1000).min(hi), m))
            }),
    ]
}

fn script() -> impl Strategy<Value = Script> {
    (
        prop_oneof![Just(5_000i64), Just(15_000), Just(60_000), Just(45_000)],
        20i64..90,
    )
        .prop_flat_map(|(s, rounds)| {
            let lo = 2 * s;
            let hi = (rounds - 2) * s;
            let down = prop_oneof![
                Just(None),
                // Scrapes fail from one round to another: unreachable is seen only then.
                (lo..hi, 1_000i64..hi)
                    .prop_map(move |(a, len)| Some((a / s * s, ((a + len) / s * s + s).min(hi)))),
            ];
            (
                Just(s),
                Just(rounds),
                prop::collection::vec(prop::collection::vec(outage(s, rounds), 1..4), 1..3),
                prop::collection::vec(down, 2),
                0i64..8,
            )
        })
        .prop_map(|(s, rounds, hosts, mut down, committed)| {
            down.truncate(hosts.len());
            Script {
                s,
                rounds,
                hosts,
                down,
                committed,
            }
        })
}

/// Sorted, merged `[a, b)` spans.
fn union(mut v: Vec<(i64, i64)>) -> Vec<(i64, i64)> {
    v.retain(|x| x.0 < x.1);
    v.sort();
    let mut out: Vec<(i64, i64)> = Vec::new();
    for (a, b) in v {
        match out.last_mut() {
            Some(l) if a <= l.1 => l.1 = l.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// The first reading of host `h` at or after `t` that shows its GPU `g`.
fn first_seen(sc: &Script, h: usize, g: usize, t: i64) -> i64 {
    let mut at = (t + sc.s - 1).div_euclid(sc.s) * sc.s;
    while sc.down[h].is_some_and(|(a, b)| (a..b).contains(&at))
        || matches!(sc.hosts[h][g], Some((a, b, Mode::Vanishes)) if (a..b).contains(&at))
    {
        at += sc.s;
    }
    at
}

/// Per GPU: gaps never overlap, cover every scripted outage ms, and exceed the outages by
/// at most one scrape interval at each end of each (outages within three intervals of each
/// other counted as one, by the merging rule).
///
/// Across a restart: an outage that no reading judged (between the last commit and the
/// first reading that shows the GPU after a restart that re-baselined its host) need not be covered (its
/// minutes are unreported, not undelivered), nor one from a stale checkpoint's reading on
/// (it knows an older fleet), nor a host down only while the aggregator was; and gaps may exceed the outages by the span
/// the restart left unjudged or judged as one interval (from the restored hosts'
/// checkpoint to their first reading after it).
fn check_gaps(sc: &Script, r: &Run) -> Result<(), TestCaseError> {
    for (h, gpus) in sc.hosts.iter().enumerate() {
        for (g, o) in gpus.iter().enumerate() {
            let back = r.restart.map(|x| first_seen(sc, h, g, x.at_ms));
            // Unjudged, and coarsely judged, spans.
            let (unjudged, slack) = match (r.restart, back) {
                (Some(x), Some(back)) => match x.restored_hosts_ms {
                    None => (Some((x.committed_ms, back)), back - x.committed_ms + sc.s),
                    // A stale checkpoint knows an older fleet: what it does not know it cannot
                    // judge.
                    Some(from) if from < x.committed_ms => (Some((from, back)), back - from + sc.s),
                    Some(from) => (None, back - from + sc.s),
                },
                _ => (None, 0),
            };
            let gaps = gpu_gaps(r, h, g);
            let spans: Vec<(i64, i64)> = gaps
                .iter()
                .map(|x| (x.start_ms, x.end_ms.unwrap_or(r.end)))
                .collect();
            for w in spans.windows(2) {
                prop_assert!(w[0].1 <= w[1].0, "overlap {:?} ({:?})", gaps, r.restart);
            }
            // Scrapes fail only while the aggregator runs: a host down only while it was
            // not running is never seen down. And a `gpu_lost` gap whose host was also down
            // at the restart is not stored as such: restored with the host's reading, it ends
            // there if the next one shows the GPU delivered (see the module's *Restart*).
            let down = sc.down[h].filter(|&(a, b)| {
                r.restart.is_none_or(|x| {
                    (a <= x.committed_ms || x.at_ms < b)
                        && !(x.restored_hosts_ms.is_some()
                            && a <= x.committed_ms
                            && x.committed_ms < b)
                })
            });
            let scripted = union(o.iter().map(|x| (x.0, x.1)).chain(down).collect());
            let all = union(o.iter().map(|x| (x.0, x.1)).chain(sc.down[h]).collect());
            // Outages closer than three scrape intervals may be one gap (each end may move
            // by one interval, and one interval between readings is merged).
            let merged = union(all.iter().map(|x| (x.0, x.1 + 3 * sc.s)).collect());
            let merged: Vec<(i64, i64)> = merged.iter().map(|x| (x.0, x.1 - 3 * sc.s)).collect();
            let covered = union(spans.clone());
            for &(a, b) in &scripted {
                if unjudged.is_some_and(|(u0, u1)| a <= u1 && u0 <= b) {
                    continue;
                }
                prop_assert!(
                    covered.iter().any(|c| c.0 <= a && b <= c.1),
                    "outage {:?} not within gaps {:?} ({:?})",
                    (a, b),
                    gaps,
                    r.restart
                );
            }
            let total: i64 = spans.iter().map(|x| x.1 - x.0).sum();
            let truth: i64 = scripted.iter().map(|x| x.1 - x.0).sum();
            let merged_len: i64 = merged.iter().map(|x| x.1 - x.0).sum();
            if unjudged.is_none() {
                prop_assert!(total >= truth);
            }
            prop_assert!(
                total <= merged_len + 2 * sc.s * merged.len() as i64 + slack,
                "gaps {total} ms for outages {truth} ms ({scripted:?}): {gaps:?} ({:?})",
                r.restart
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Per GPU: gaps never overlap, cover every scripted outage ms, and exceed the outages
    /// by at most one scrape interval at each end of each (outages within three intervals
    /// of each other counted as one, by the merging rule).
    #[test]
    fn gaps_match_the_scripted_outages(sc in script()) {
        check_gaps(&sc, &run(&sc))?;
    }

    /// Every undelivered ms the ledger books lies in a GPU's gap or in a `short` interval,
    /// whose shortfall is the scripted one (committed GPUs beyond the fleet).
    #[test]
    fn undelivered_lies_within_gaps(sc in script()) {
        let r = run(&sc);
        let fleet: i64 = sc.hosts.iter().map(|h| h.len() as i64).sum();
        let short_per_minute = (sc.committed - fleet).max(0) * MINUTE_MS;
        let minutes = r.undelivered.len() as i64;
        let shorts: Vec<&Gap> = r.gaps.iter().filter(|g| g.cause == Cause::Short).collect();
        let short_total: i64 = shorts.iter().map(|g| g.short_gpu_ms).sum();
        prop_assert_eq!(short_total, short_per_minute * minutes);
        let intervals = sc.hosts.len() as i64 * 2;
        for (&m, &undelivered) in &r.undelivered {
            let (m0, m1) = (m * MINUTE_MS, (m + 1) * MINUTE_MS);
            let in_gaps: i64 = r
                .gaps
                .iter()
                .filter(|g| g.cause != Cause::Short)
                .map(|g| g.overlap_ms(m0, m1))
                .sum();
            let in_short = shorts.iter().any(|g| g.overlap_ms(m0, m1) == MINUTE_MS);
            prop_assert_eq!(in_short, short_per_minute > 0);
            // Apportioning rounds to the ms: at most one per interval placed in the minute.
            prop_assert!(
                undelivered <= in_gaps + short_per_minute + intervals * 2,
                "minute {m}: undelivered {undelivered}, gaps {in_gaps}, short {short_per_minute}"
            );
        }
    }

    /// Across a `kill -9` and a restart from the store (hosts re-baselined, their checkpoint
    /// of the last commit, or, `stale`, one up to `checkpoint_every` rounds older): gaps per
    /// GPU still never overlap and cover every outage a reading judged. And one outage is one
    /// piece of evidence: a fleet that covers the commitment is never `short` (but where a
    /// GPU vanished while no reading judged, so that the ledger does not know it; or from a
    /// stale checkpoint, which knows an older fleet).
    #[test]
    fn gaps_survive_a_kill_and_a_restart(
        sc in script(),
        at in 0.0..1.0f64,
        read_before in 0usize..4,
        down_rounds in 0i64..4,
        checkpoint_every in 1i64..30,
        stale: bool,
    ) {
        let kill = Kill {
            round: 1 + ((sc.rounds - 3) as f64 * at) as i64,
            read_before,
            down_rounds,
            checkpoint_every,
            stale,
        };
        let r = run_with(&sc, 0, Some(kill));
        let x = r.restart.expect("killed");
        check_gaps(&sc, &r)?;
        let fleet: i64 = sc.hosts.iter().map(|h| h.len() as i64).sum();
        let unseen = sc.hosts.iter().enumerate().any(|(h, gpus)| {
            gpus.iter().enumerate().any(|(g, o)| {
                o.is_some_and(|(a, b, m)| {
                    m == Mode::Vanishes && a <= first_seen(&sc, h, g, x.at_ms) && x.committed_ms <= b
                })
            })
        });
        let older = x.restored_hosts_ms.is_some_and(|t| t < x.committed_ms);
        if sc.committed <= fleet && !unseen && !older {
            let short: Vec<&Gap> = r.gaps.iter().filter(|g| g.cause == Cause::Short).collect();
            prop_assert!(short.is_empty(), "{short:?} ({x:?})");
        }
    }

    /// XID codes exported with the outage or a round after attach to the gap of that
    /// outage, and to no gap more than two scrape intervals from every outage of the GPU.
    #[test]
    fn xids_attach_to_the_gap_of_their_outage(sc in script(), late: bool) {
        let r = run_with(&sc, if late { sc.s } else { 0 }, None);
        for (h, gpus) in sc.hosts.iter().enumerate() {
            for (g, o) in gpus.iter().enumerate() {
                let gaps = gpu_gaps(&r, h, g);
                let end = |x: &Gap| x.end_ms.unwrap_or(r.end);
                if let Some((a, b, _)) = *o {
                    if b - a >= 1000 {
                        prop_assert!(
                            gaps.iter().any(|x| x.start_ms < b && a < end(x) && x.xids.contains("79")),
                            "outage {:?}: {:?}", o, gaps
                        );
                    }
                }
                for x in gaps.iter().filter(|x| !x.xids.is_empty()) {
                    prop_assert!(
                        o.is_some_and(|(a, b, _)| x.start_ms - 2 * sc.s <= b && a <= end(x) + 2 * sc.s),
                        "{x:?} far from outage {o:?}"
                    );
                }
            }
        }
    }
}

/// The agent exports an XID code's counter from its first event on: a code a known GPU had
/// never shown is growth from 0 (one XID during an outage is evidence), while the first
/// reading of a GPU is only a baseline (after a restart, old counts are not news).
#[test]
fn a_first_xid_of_a_known_gpu_is_growth_and_a_new_gpus_counts_a_baseline() {
    let mut ledger = Ledger::new(1, 0);
    let read = |ledger: &mut Ledger, t: i64, xids: &[(&str, u64)]| read_g(ledger, t, -1, t, xids);
    // h's first reading already counts XID 48 (before this aggregator): a baseline.
    read(&mut ledger, 0, &[("48", 2)]);
    read(&mut ledger, 15_000, &[("48", 2)]);
    ledger.unreachable("h", 0);
    // Back with a first XID 79: the gap's.
    read(&mut ledger, 45_000, &[("48", 2), ("79", 1)]);
    let (gaps, _) = ledger.pending_gaps();
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert_eq!(gaps[0].cause, Cause::HostUnreachable);
    assert_eq!((gaps[0].start_ms, gaps[0].end_ms), (15_000, Some(45_000)));
    assert_eq!(gaps[0].xids, BTreeSet::from(["79".to_string()]));
}

/// One reading of host `h`'s GPU `g` at `t` (agent started at `agent_start`, sampled since
/// then `t - agent_start`) with `observed` ms and its XID counters.
fn read_g(ledger: &mut Ledger, t: i64, agent_start: i64, observed: i64, xids: &[(&str, u64)]) {
    let r = Reading {
        received_ms: t + 3,
        agent_ms: Some(t),
        agent_start_ms: Some(agent_start),
        sampled_ms: Some(t - agent_start.max(0)),
        gpus: BTreeMap::from([(
            "g".to_string(),
            GpuCounters {
                observed_ms: observed,
                used_ms: 0,
                ..Default::default()
            },
        )]),
        owners: Default::default(),
    };
    let codes: BTreeMap<String, u64> = xids.iter().map(|(c, n)| (c.to_string(), *n)).collect();
    let xids = if codes.is_empty() {
        Xids::new()
    } else {
        Xids::from([("g".to_string(), codes)])
    };
    ledger.observe_with_xids("h", 0, r, &xids);
}

fn codes(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|c| c.to_string()).collect()
}

/// The closed gaps pending, by start.
fn closed_pending(ledger: &Ledger) -> Vec<Gap> {
    let mut v: Vec<Gap> = ledger
        .pending_gaps()
        .0
        .into_iter()
        .filter(|g| g.end_ms.is_some())
        .collect();
    v.sort_by_key(|g| g.start_ms);
    v
}

/// Host `h` read at 0 s and 15 s, unreachable at 30 s, back at 45 s: its GPU's
/// `host_unreachable` gap `[15 s, 45 s]`, closed.
fn down_and_back() -> Ledger {
    let mut ledger = Ledger::new(1, 0);
    read_g(&mut ledger, 0, -1, 0, &[]);
    read_g(&mut ledger, 15_000, -1, 15_000, &[]);
    ledger.unreachable("h", 0);
    read_g(&mut ledger, 45_000, -1, 45_000, &[]);
    ledger
}

/// An XID whose counter grew at the reading that closed a gap, or at the host's next
/// reading, is the gap's: the agent may export it a round after the GPU fell off, or with
/// the first exposition after the host came back. One that grew later is not.
#[test]
fn a_late_xid_attaches_to_the_gap_that_just_closed() {
    // Lost over (15 s, 30 s], delivered over (30 s, 45 s]: the gap ends at 30 s, closed
    // by the reading at 45 s, which shows XID 79.
    let mut ledger = Ledger::new(1, 0);
    read_g(&mut ledger, 0, -1, 0, &[]);
    read_g(&mut ledger, 15_000, -1, 15_000, &[]);
    read_g(&mut ledger, 30_000, -1, 20_000, &[]);
    read_g(&mut ledger, 45_000, -1, 35_000, &[("79", 1)]);
    let g = closed_pending(&ledger);
    assert_eq!(g.len(), 1, "{g:?}");
    assert_eq!((g[0].start_ms, g[0].end_ms), (15_000, Some(30_000)));
    assert_eq!(g[0].xids, codes(&["79"]));

    // Unreachable from 15 s, back at 45 s; XID 79 at 60 s (a round later), persisted in
    // between: handed to the store again, with the code. XID 48 at 75 s is not the gap's.
    let mut ledger = down_and_back();
    let (written, mark) = ledger.pending_gaps();
    assert_eq!(written.len(), 1);
    assert!(written[0].xids.is_empty());
    ledger.gaps_persisted(mark);
    assert!(ledger.pending_gaps().0.is_empty());
    read_g(&mut ledger, 60_000, -1, 60_000, &[("79", 1)]);
    let g = closed_pending(&ledger);
    assert_eq!(g.len(), 1, "{g:?}");
    assert_eq!(
        (g[0].start_ms, g[0].end_ms, g[0].cause),
        (15_000, Some(45_000), Cause::HostUnreachable)
    );
    assert_eq!(g[0].xids, codes(&["79"]));
    let (_, mark) = ledger.pending_gaps();
    ledger.gaps_persisted(mark);
    read_g(&mut ledger, 75_000, -1, 75_000, &[("79", 1), ("48", 1)]);
    assert_eq!(ledger.pending_gaps().0, vec![]);

    // The same, the closed gap in a write still in flight when XID 79 comes: that write
    // succeeding does not drop the change, which goes with the next one.
    let mut ledger = down_and_back();
    let (in_flight, mark) = ledger.pending_gaps();
    assert!(in_flight[0].xids.is_empty());
    read_g(&mut ledger, 60_000, -1, 60_000, &[("79", 1)]);
    ledger.gaps_persisted(mark);
    let g = closed_pending(&ledger);
    assert_eq!(g.len(), 1, "{g:?}");
    assert_eq!(g[0].xids, codes(&["79"]));
}

/// A host that rebooted comes back with its agent's counters reset: an XID counter lower
/// than before grew from 0 (Prometheus's rule for a counter reset).
#[test]
fn an_xid_counter_reset_by_an_agent_restart_is_growth() {
    let mut ledger = Ledger::new(1, 0);
    read_g(&mut ledger, 0, -1, 0, &[("79", 3)]);
    read_g(&mut ledger, 15_000, -1, 15_000, &[("79", 3)]);
    ledger.unreachable("h", 0);
    // The agent restarted at 40 s and counted one XID 79 since.
    read_g(&mut ledger, 45_000, 40_000, 5_000, &[("79", 1)]);
    let g = closed_pending(&ledger);
    assert_eq!(g.len(), 1, "{g:?}");
    assert_eq!((g[0].start_ms, g[0].end_ms), (15_000, Some(45_000)));
    assert_eq!(g[0].xids, codes(&["79"]));
}

/// A GPU gone before a restart is one piece of evidence after it: its restored `gpu_lost`
/// gap, never also `short` (the commitment is the fleet's 2 GPUs). Whether the restart
/// restores the host's last reading (a clean stop) or the host re-baselines (`kill -9`
/// between host checkpoints); and the gap still ends when the GPU returns.
#[test]
fn a_gpu_gone_before_a_restart_is_lost_and_not_also_short_after_it() {
    for rebaseline in [false, true] {
        let sc = one(Some((100_000, 2_000_000, Mode::Vanishes)), None);
        let reading = |t: i64| {
            let gone = (100_000..2_000_000).contains(&t);
            let mut gpus = BTreeMap::new();
            gpus.insert(
                gpu_name(1),
                GpuCounters {
                    observed_ms: t,
                    used_ms: 0,
                    ..Default::default()
                },
            );
            if !gone {
                gpus.insert(
                    gpu_name(0),
                    GpuCounters {
                        observed_ms: t - out_ms(sc.hosts[0][0], t),
                        used_ms: 0,
                        ..Default::default()
                    },
                );
            }
            Reading {
                received_ms: t + 3,
                agent_ms: Some(t),
                agent_start_ms: Some(-1),
                sampled_ms: Some(t),
                gpus,
                owners: Default::default(),
            }
        };
        let mut ledger = Ledger::new(1, 0);
        let mut rows: BTreeMap<(i64, String), Gap> = BTreeMap::new();
        let commit = |ledger: &mut Ledger, rows: &mut BTreeMap<(i64, String), Gap>, t: i64| {
            ledger.seal(t, 0, |_, a, b| 2 * (b - a));
            let (pending, mark) = ledger.pending_gaps();
            for g in pending {
                rows.insert((g.start_ms, g.gpu.clone()), g);
            }
            ledger.gaps_persisted(mark);
        };
        for k in 0..=40 {
            let t = k * 15_000;
            ledger.observe("h0", 0, reading(t));
            if k == 0 {
                ledger.start_after(t);
            }
            commit(&mut ledger, &mut rows, t);
        }
        let mut snap = ledger.snapshot();
        if rebaseline {
            for (_, _, h) in &mut snap.hosts {
                h.last = None;
                h.sized_since_ms = None;
            }
        }
        let mut ledger = Ledger::restore(1, snap);
        ledger.restore_gaps(rows.values().cloned());
        for k in 41..=160 {
            let t = k * 15_000;
            ledger.observe("h0", 0, reading(t));
            commit(&mut ledger, &mut rows, t);
        }
        let gaps: Vec<&Gap> = rows.values().collect();
        assert!(
            gaps.iter().all(|g| g.cause != Cause::Short),
            "rebaseline {rebaseline}: {gaps:?}"
        );
        assert_eq!(gaps.len(), 1, "rebaseline {rebaseline}: {gaps:?}");
        assert_eq!(
            (gaps[0].start_ms, gaps[0].end_ms, gaps[0].cause),
            (90_000, Some(2_010_000), Cause::GpuLost),
            "rebaseline {rebaseline}"
        );
    }
}
