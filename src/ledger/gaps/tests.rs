//! Gaps judged against scripted fleets: outages decided first, readings derived from them.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::ledger::{GpuCounters, Ledger, Reading, MINUTE_MS};

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
}

/// Runs a script through the ledger: a reading per host every `s` ms from 0, sealing each
/// round with no grace, persisting the gaps every round.
fn run(sc: &Script) -> Run {
    let mut ledger = Ledger::new(1, 0);
    // As the store keeps them: one row per (contract, start, target, GPU), rewritten.
    let mut rows: BTreeMap<(usize, i64, String, String), Gap> = BTreeMap::new();
    let mut undelivered = BTreeMap::new();
    let mut end = 0;
    for k in 0..=sc.rounds {
        let t = k * sc.s;
        end = t;
        for (h, gpus) in sc.hosts.iter().enumerate() {
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
                    },
                );
                // One XID 79 per second of outage: grows exactly while it lasts. Its series
                // exists from the first one on, as the agent exports it.
                if lost >= 1000 {
                    xids.insert(
                        gpu_name(g),
                        BTreeMap::from([("79".to_string(), (lost / 1000) as u64)]),
                    );
                }
            }
            let r = Reading {
                received_ms: t + 3,
                agent_ms: Some(t),
                agent_start_ms: Some(-1),
                sampled_ms: Some(t),
                gpus: list,
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
    }
    Run {
        ledger,
        gaps: rows.into_values().collect(),
        undelivered,
        end,
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
            },
        )]),
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Per GPU: gaps never overlap, cover every scripted outage ms, and exceed the outages
    /// by at most one scrape interval at each end of each (outages within three intervals
    /// of each other counted as one, by the merging rule).
    #[test]
    fn gaps_match_the_scripted_outages(sc in script()) {
        let r = run(&sc);
        for (h, gpus) in sc.hosts.iter().enumerate() {
            for (g, o) in gpus.iter().enumerate() {
                let gaps = gpu_gaps(&r, h, g);
                let spans: Vec<(i64, i64)> =
                    gaps.iter().map(|x| (x.start_ms, x.end_ms.unwrap_or(r.end))).collect();
                for w in spans.windows(2) {
                    prop_assert!(w[0].1 <= w[1].0, "overlap {:?}", gaps);
                }
                let scripted = union(
                    o.iter().map(|x| (x.0, x.1)).chain(sc.down[h]).collect(),
                );
                // Outages closer than three scrape intervals may be one gap (each end may
                // move by one interval, and one interval between readings is merged).
                let merged = union(scripted.iter().map(|x| (x.0, x.1 + 3 * sc.s)).collect());
                let merged: Vec<(i64, i64)> =
                    merged.iter().map(|x| (x.0, x.1 - 3 * sc.s)).collect();
                let covered = union(spans.clone());
                for &(a, b) in &scripted {
                    prop_assert!(
                        covered.iter().any(|c| c.0 <= a && b <= c.1),
                        "outage {:?} not within gaps {:?}", (a, b), gaps
                    );
                }
                let total: i64 = spans.iter().map(|x| x.1 - x.0).sum();
                let truth: i64 = scripted.iter().map(|x| x.1 - x.0).sum();
                let merged_len: i64 = merged.iter().map(|x| x.1 - x.0).sum();
                prop_assert!(total >= truth);
                prop_assert!(
                    total <= merged_len + 2 * sc.s * merged.len() as i64,
                    "gaps {total} ms for outages {truth} ms ({scripted:?}): {gaps:?}"
                );
            }
        }
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
}

/// The agent exports an XID code's counter from its first event on: a code a known GPU had
/// never shown is growth from 0 (one XID during an outage is evidence), while the first
/// reading of a GPU is only a baseline (after a restart, old counts are not news).
#[test]
fn a_first_xid_of_a_known_gpu_is_growth_and_a_new_gpus_counts_a_baseline() {
    let mut ledger = Ledger::new(1, 0);
    let read = |ledger: &mut Ledger, t: i64, xids: &[(&str, u64)]| {
        let r = Reading {
            received_ms: t + 3,
            agent_ms: Some(t),
            agent_start_ms: Some(-1),
            sampled_ms: Some(t),
            gpus: BTreeMap::from([(
                gpu_name(0),
                GpuCounters {
                    observed_ms: t,
                    used_ms: 0,
                },
            )]),
        };
        let codes: BTreeMap<String, u64> = xids.iter().map(|(c, n)| (c.to_string(), *n)).collect();
        let xids = if codes.is_empty() {
            Xids::new()
        } else {
            Xids::from([(gpu_name(0), codes)])
        };
        ledger.observe_with_xids("h0", 0, r, &xids);
    };
    // h0's first reading already counts XID 48 (before this aggregator): a baseline.
    read(&mut ledger, 0, &[("48", 2)]);
    read(&mut ledger, 15_000, &[("48", 2)]);
    ledger.unreachable("h0", 0);
    // Back with a first XID 79: the gap's.
    read(&mut ledger, 45_000, &[("48", 2), ("79", 1)]);
    let (gaps, _) = ledger.pending_gaps();
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert_eq!(gaps[0].cause, Cause::HostUnreachable);
    assert_eq!((gaps[0].start_ms, gaps[0].end_ms), (15_000, Some(45_000)));
    assert_eq!(gaps[0].xids, BTreeSet::from(["79".to_string()]));
}
