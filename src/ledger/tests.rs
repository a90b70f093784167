use super::*;
use proptest::prelude::*;

const M: i64 = MINUTE_MS;

fn gpus(list: &[(&str, i64, i64)]) -> BTreeMap<String, GpuCounters> {
    list.iter()
        .map(|&(u, observed_ms, used_ms)| {
            (
                u.to_string(),
                GpuCounters {
                    observed_ms,
                    used_ms,
                    ..Default::default()
                },
            )
        })
        .collect()
}

/// A reading from an agent whose clock agrees with ours, at `t` ms, started at 0.
fn at(t: i64, list: &[(&str, i64, i64)]) -> Reading {
    Reading {
        received_ms: t + 7,
        agent_ms: Some(t),
        agent_start_ms: Some(0),
        sampled_ms: Some(t),
        gpus: gpus(list),
        owners: Default::default(),
    }
}

/// A reading from an exporter that only has the counters (no agent time).
fn bare(t: i64, list: &[(&str, i64, i64)]) -> Reading {
    Reading {
        received_ms: t,
        gpus: gpus(list),
        ..Reading::default()
    }
}

fn each(committed_gpus: i64) -> impl Fn(usize, i64, i64) -> i64 {
    move |_, a, b| committed_gpus * (b - a)
}

#[test]
fn spread_and_apportion_are_exact() {
    assert_eq!(
        spread(30_000, 150_000, 120),
        vec![(0, 30), (1, 60), (2, 30)]
    );
    assert_eq!(spread(0, 60_000, 7), vec![(0, 7)]);
    assert_eq!(spread(-30_000, 30_000, 3), vec![(-1, 2), (0, 1)]);
    assert!(spread(5, 5, 10).is_empty());
    assert_eq!(apportion(5, &[0, 0]), vec![0, 0]);
    // A share of a share never exceeds it.
    assert_eq!(apportion(3, &[1, 1, 1, 1]), vec![1, 1, 1, 0]);
}

#[test]
fn split_books_shortfall_by_evidence() {
    // 100 committed, 96 delivered, 8 GPU-ms known but unseen, 50 used.
    let t = split(100, 96, 50, 8, false);
    assert_eq!(
        (t.idle, t.undelivered, t.unreported, t.overage),
        (46, 0, 4, 0)
    );
    // Delivered beyond the commitment, used beyond it too.
    let t = split(100, 120, 110, 0, false);
    assert_eq!((t.used_within(), t.idle, t.overage), (100, 0, 10));
    // Watched and short: undelivered.
    assert_eq!(split(100, 70, 0, 0, false).undelivered, 30);
    // A target of unknown size was dark: every shortfall is unreported.
    let t = split(100, 70, 0, 0, true);
    assert_eq!((t.undelivered, t.unreported), (0, 30));
    // Nothing committed: everything used is overage.
    assert_eq!(split(0, 10, 10, 0, false).overage, 10);
}

#[test]
fn an_outage_back_fills_when_the_agent_returns() {
    let mut l = Ledger::new(1, 0); // accounts from minute 1
    let host = "h:9473";
    // One GPU, fully delivered, half used; read at 60 s, then unreachable until 360 s.
    l.observe(host, 0, at(60_000, &[("g", 60_000, 30_000)]));
    let out = l.observe(host, 0, at(360_000, &[("g", 360_000, 180_000)]));
    assert!(out.rejected.is_empty(), "{out:?}");
    let sealed = l.seal(360_000 + 5 * M, 5 * M, each(1));
    assert_eq!(sealed.len(), 5);
    for s in sealed {
        let t = s.totals;
        assert_eq!((t.delivered, t.used, t.idle), (M, M / 2, M / 2), "{s:?}");
        assert_eq!((t.unreported, t.undelivered, t.overage), (0, 0, 0));
    }
}

#[test]
fn a_silent_host_is_unreported_and_late_data_is_counted_not_added() {
    let mut l = Ledger::new(1, 0);
    l.observe("h", 0, at(60_000, &[("a", 0, 0), ("b", 0, 0)]));
    l.observe(
        "h",
        0,
        at(120_000, &[("a", 60_000, 60_000), ("b", 60_000, 0)]),
    );
    // Minute 2 passes with no reading; it seals (grace 0) as unreported.
    let sealed = l.seal(180_000, 0, each(2));
    assert_eq!(sealed[0].totals.delivered, 2 * M);
    assert_eq!(sealed[1].totals.unreported, 2 * M);
    assert_eq!(sealed[1].totals.undelivered, 0);
    // The agent returns: the part for the sealed minute is late, the rest is counted.
    l.observe(
        "h",
        0,
        at(240_000, &[("a", 180_000, 180_000), ("b", 180_000, 0)]),
    );
    assert_eq!(l.late()[0], (2 * M, M));
    let sealed = l.seal(240_000, 0, each(2));
    assert_eq!(sealed.len(), 1);
    assert_eq!(sealed[0].totals.delivered, 2 * M);
    assert_eq!(sealed[0].totals.used, M);
    // The late GPU-ms are kept for their minute (2) until the store has them.
    let written = l.pending_late();
    let late = |delivered, used| LateMinute {
        contract: 0,
        minute: 2,
        delivered,
        used,
    };
    assert_eq!(written, [late(2 * M, M)]);
    // More arrives for minute 2 while that write is in flight (a second host, late too):
    // once the write is durable, only the newer part is still pending.
    l.observe("h2", 0, at(120_000, &[("c", 0, 0)]));
    l.observe("h2", 0, at(180_000, &[("c", 60_000, 0)]));
    l.late_persisted(&written);
    assert_eq!(l.pending_late(), [late(M, 0)]);
    assert_eq!(l.late()[0], (3 * M, M), "the all-time sums keep everything");
    l.late_persisted(&l.pending_late());
    assert!(l.pending_late().is_empty());
}

#[test]
fn a_fresh_ledgers_second_reading_is_not_late() {
    let mut l = Ledger::new(1, 50_000);
    l.observe("h", 0, at(50_000, &[("g", 0, 0)]));
    l.start_after(50_100);
    assert_eq!(l.since(), 1);
    // The reading covers 50 s..75 s: the part before the ledger's first minute is
    // before the ledger, not late.
    l.observe("h", 0, at(75_000, &[("g", 25_000, 0)]));
    assert_eq!(l.late()[0], (0, 0));
}

#[test]
fn a_restart_that_climbs_past_the_old_value_loses_only_the_restart_gap() {
    let mut l = Ledger::new(1, 0);
    l.observe("h", 0, at(60_000, &[("g", 60_000, 60_000)]));
    // The agent restarts at 100 s (process start 100 s), samples from 101 s, and by the
    // next reading at 240 s its new counters (139 s) are past the old ones (60 s).
    let r = Reading {
        received_ms: 240_010,
        agent_ms: Some(240_000),
        agent_start_ms: Some(100_000),
        sampled_ms: Some(139_000),
        gpus: gpus(&[("g", 139_000, 139_000)]),
        owners: Default::default(),
    };
    let out = l.observe("h", 0, r);
    assert!(out.restarted && out.rejected.is_empty(), "{out:?}");
    let sealed = l.seal(240_000, 0, each(1));
    let sum = |f: fn(&Totals) -> i64| sealed.iter().map(|s| f(&s.totals)).sum::<i64>();
    // 60..240 s: 139 s delivered and used, the 41 s nobody watched unreported.
    assert_eq!(sum(|t| t.delivered), 139_000);
    assert_eq!(sum(|t| t.used), 139_000);
    assert_eq!(sum(|t| t.unreported), 41_000);
    assert_eq!(sum(|t| t.undelivered), 0);
    // Within the minute of the restart, the unwatched part comes first.
    assert_eq!(sealed[0].totals.unreported, 41_000); // minute 1: 60..120 s
}

#[test]
fn an_exporter_without_a_start_time_restarts_on_a_decrease() {
    let mut l = Ledger::new(1, 0);
    l.observe("h", 0, bare(60_000, &[("g", 1_000_000, 500_000)]));
    let out = l.observe("h", 0, bare(120_000, &[("g", 30_000, 10_000)]));
    assert!(out.restarted);
    let s = l.seal(120_000, 0, each(1));
    assert_eq!(s[0].totals.delivered, 30_000);
    assert_eq!(s[0].totals.used, 10_000);
    // Watched (no sampled counter: the whole interval) and not delivered.
    assert_eq!(s[0].totals.undelivered, 30_000);
}

#[test]
fn impossible_readings_are_rejected_and_booked_unreported() {
    let mut l = Ledger::new(1, 0);
    let list = |o1, u1, o2, u2| [("a", o1, u1), ("b", o2, u2)];
    l.observe("h", 0, at(60_000, &list(0, 0, 0, 0)));
    // a: 1e15 ms in a minute; b: busy 50x observed.
    let out = l.observe(
        "h",
        0,
        at(120_000, &list(1_000_000_000_000_000, 0, 60_000, 3_000_000)),
    );
    let mut reasons: Vec<Reject> = out.rejected.iter().map(|r| r.0).collect();
    reasons.sort();
    assert_eq!(
        reasons,
        vec![Reject::ExceedsElapsed, Reject::UsedExceedsDelivered]
    );
    assert!(out.rejected.iter().all(|r| r.1 == M));
    // A running agent's counter going down is not a reset.
    let out = l.observe("h", 0, at(180_000, &list(1_000, 0, 120_000, 3_060_000)));
    assert_eq!(out.rejected, vec![(Reject::CounterDecrease, M)]);
    let sealed = l.seal(180_000, 0, each(2));
    // Minute 1: both rejected; minute 2: b credited, a rejected.
    assert_eq!(sealed[0].totals.delivered, 0);
    assert_eq!(sealed[0].totals.unreported, 2 * M);
    assert_eq!(sealed[1].totals.delivered, M);
    assert_eq!(sealed[1].totals.used, M);
    assert_eq!(sealed[1].totals.unreported, M);
    for s in &sealed {
        assert_eq!(s.totals.undelivered, 0, "{s:?}");
    }
}

#[test]
fn an_agent_that_keeps_restarting_is_suspect() {
    let mut l = Ledger::new(1, 0);
    l.observe("h", 0, at(60_000, &[("g", 60_000, 0)]));
    let restart = |t: i64, start: i64| Reading {
        received_ms: t,
        agent_ms: Some(t),
        agent_start_ms: Some(start),
        sampled_ms: Some(t - start),
        gpus: gpus(&[("g", t - start, 0)]),
        owners: Default::default(),
    };
    assert!(l
        .observe("h", 0, restart(120_000, 70_000))
        .rejected
        .is_empty());
    let out = l.observe("h", 0, restart(180_000, 130_000));
    assert_eq!(out.rejected, vec![(Reject::RepeatedRestart, 50_000)]);
    // Later restarts, once quiet again, count.
    assert!(l
        .observe("h", 0, restart(600_000, 590_000))
        .rejected
        .is_empty());
}

#[test]
fn a_gpu_seen_then_lost_under_watch_is_undelivered() {
    let mut l = Ledger::new(1, 0);
    l.configure(0, &[("h".into(), vec![0])], |_, _| i64::MAX);
    l.observe("h", 0, at(60_000, &[("a", 0, 0), ("b", 0, 0)]));
    // b's counter stops (lost): watched, not delivered.
    l.observe("h", 0, at(120_000, &[("a", 60_000, 0), ("b", 0, 0)]));
    // The agent restarts and no longer enumerates b: still watched and gone.
    let r = Reading {
        received_ms: 180_000,
        agent_ms: Some(180_000),
        agent_start_ms: Some(120_000),
        sampled_ms: Some(60_000),
        gpus: gpus(&[("a", 60_000, 0)]),
        owners: Default::default(),
    };
    l.observe("h", 0, r);
    let sealed = l.seal(180_000, 0, each(2));
    for s in &sealed {
        assert_eq!((s.totals.delivered, s.totals.undelivered), (M, M), "{s:?}");
        assert_eq!(s.totals.unreported, 0);
    }
}

#[test]
fn our_own_mistakes_are_unreported_never_undelivered() {
    let mut l = Ledger::new(2, -M);
    // h1 reports 1 GPU for contract 0; "wrong:1" never answers; "both" is selected by
    // both contracts (a conflict, never scraped).
    l.configure(
        0,
        &[
            ("h1".into(), vec![0]),
            ("wrong:1".into(), vec![0]),
            ("both".into(), vec![0, 1]),
        ],
        |_, _| i64::MAX,
    );
    l.observe("h1", 0, at(0, &[("g", 0, 0)]));
    l.observe("h1", 0, at(60_000, &[("g", 60_000, 0)]));
    let sealed = l.seal(60_000, 0, each(3));
    for s in &sealed {
        assert_eq!(s.totals.undelivered, 0, "{s:?}");
    }
    assert_eq!(sealed[0].totals.unreported, 2 * M);
    assert_eq!(sealed[1].totals.unreported, 3 * M);
    // A target answering without GPU series (another exporter) stays dark.
    l.configure(
        0,
        &[("h1".into(), vec![0]), ("other".into(), vec![0])],
        |_, _| i64::MAX,
    );
    l.observe("other", 0, at(60_000, &[]));
    l.observe("h1", 0, at(120_000, &[("g", 120_000, 0)]));
    let sealed = l.seal(120_000, 0, each(3));
    assert_eq!(sealed[0].totals.unreported, 2 * M);
    assert_eq!(sealed[0].totals.undelivered, 0);
    // Contract 1 loses its only (conflicted) target: nothing is monitored, so nothing
    // short of its commitment is evidence either.
    assert_eq!(sealed[1].totals.unreported, 3 * M);
    // Nor before its first target arrives, even for part of a minute.
    let mut fresh = Ledger::new(1, -M);
    fresh.configure(30_000, &[("h".into(), vec![0])], |_, _| i64::MAX);
    fresh.observe("h", 0, at(30_000, &[("g", 30_000, 0)]));
    fresh.observe("h", 0, at(120_000, &[("g", 120_000, 0)]));
    let first = fresh.seal(120_000, 0, each(1));
    assert_eq!(
        (first[0].totals.unreported, first[0].totals.undelivered),
        (30_000, 0)
    );
    assert_eq!(first[1].totals.delivered, M);
    // Once every target reports, a fleet smaller than the commitment is undelivered.
    l.configure(120_000, &[("h1".into(), vec![0])], |_, _| i64::MAX);
    l.observe("h1", 0, at(180_000, &[("g", 180_000, 0)]));
    let sealed = l.seal(180_000, 0, each(3));
    assert_eq!(
        (sealed[0].totals.undelivered, sealed[0].totals.unreported),
        (2 * M, 0)
    );
}

#[test]
fn a_removed_target_stays_expected_until_it_retires() {
    let mut l = Ledger::new(1, -M);
    let targets = |list: &[&str]| -> Vec<(String, Vec<usize>)> {
        list.iter().map(|t| (t.to_string(), vec![0])).collect()
    };
    l.configure(0, &targets(&["a", "b"]), |_, _| 240_000);
    for h in ["a", "b"] {
        l.observe(h, 0, at(0, &[("g", 0, 0)]));
        l.observe(h, 0, at(60_000, &[("g", 60_000, 0)]));
    }
    // b leaves the targets at 60 s: expected (unreported) until 240 s, then forgotten.
    l.configure(60_000, &targets(&["a"]), |_, _| 240_000);
    for t in [120_000, 180_000, 240_000, 300_000] {
        l.observe("a", 0, at(t, &[("g", t, 0)]));
    }
    let sealed = l.seal(300_000, 0, each(2));
    let kinds: Vec<(i64, i64)> = sealed
        .iter()
        .map(|s| (s.totals.unreported / M, s.totals.undelivered / M))
        .collect();
    assert_eq!(kinds, vec![(0, 0), (1, 0), (1, 0), (1, 0), (0, 1)]);
    assert!(l.host("b", 0).is_none());
    // Back before retiring: its counters back-fill what it missed.
    let mut l2 = Ledger::new(1, -M);
    l2.configure(0, &targets(&["b"]), |_, _| i64::MAX);
    l2.observe("b", 0, at(0, &[("g", 0, 0)]));
    l2.configure(30_000, &[], |_, _| i64::MAX);
    l2.configure(90_000, &targets(&["b"]), |_, _| i64::MAX);
    l2.observe("b", 0, at(120_000, &[("g", 120_000, 0)]));
    let sealed = l2.seal(120_000, 0, each(1));
    assert!(sealed.iter().all(|s| s.totals.delivered == M));
}

#[test]
fn agent_time_places_readings_and_a_far_clock_is_reanchored() {
    let mut l = Ledger::new(1, 0);
    // The agent's clock runs 2 s ahead; its readings arrive 300 ms after its rounds.
    let r = |t: i64| Reading {
        received_ms: t - 2_000 + 300,
        agent_ms: Some(t),
        agent_start_ms: Some(0),
        sampled_ms: Some(t),
        gpus: gpus(&[("g", t, t)]),
        owners: Default::default(),
    };
    l.observe("h", 0, r(62_000));
    for k in 1..=4 {
        let out = l.observe("h", 0, r(62_000 + k * 60_000));
        assert!(!out.reanchored && out.rejected.is_empty());
    }
    let sealed = l.seal(300_000, 0, each(1));
    // Placed on the agent's clock: whole minutes of delivery, nothing short, no overage.
    for s in &sealed[1..] {
        assert_eq!((s.totals.delivered, s.totals.used), (M, M), "{s:?}");
        assert_eq!((s.totals.undelivered, s.totals.overage), (0, 0));
    }
    // An agent an hour off is placed on the aggregator's clock.
    let mut l = Ledger::new(1, 0);
    let far = |t: i64| Reading {
        received_ms: t,
        agent_ms: Some(t + 3_600_000),
        ..at(t, &[("g", t, 0)])
    };
    assert!(l.observe("h", 0, far(60_000)).reanchored);
    let out = l.observe("h", 0, far(120_000));
    assert!(!out.reanchored && out.rejected.is_empty());
    assert_eq!(
        l.host("h", 0).unwrap().last.as_ref().unwrap().at_ms,
        120_000
    );
}

#[test]
fn a_surplus_is_carried_not_turned_into_overage_and_shortfall() {
    // An exporter without agent time: counters lag the receive times by 0..1 s.
    let mut l = Ledger::new(1, -M);
    let mut counter = 0;
    let mut t = 0;
    for (k, lag) in [0, 900, 100, 800, 0, 950, 50, 0].iter().enumerate() {
        t = (k as i64 + 1) * 30_000;
        counter = t - lag;
        l.observe("h", 0, bare(t, &[("g", counter, counter)]));
    }
    let sealed = l.seal(t, 0, each(1));
    let over: i64 = sealed.iter().map(|s| s.totals.overage).sum();
    assert_eq!(over, 0, "{sealed:?}");
    let delivered: i64 = sealed.iter().map(|s| s.totals.delivered).sum();
    let carried = l.host("h", 0).unwrap().carry[0];
    assert_eq!(delivered + carried, counter - 30_000, "nothing lost");
}

/// A random fleet: hosts with GPUs delivered at some share of wall time and used at
/// some share of that, read every 15 s with dropped scrapes (outages), agent
/// restarts, and aggregator crashes that lose everything since the last snapshot.
#[derive(Debug, Clone)]
struct Fleet {
    hosts: Vec<(usize, u32, u8, u8)>, // (contract, gpus, delivered %, used % of delivered)
    steps: Vec<(u16, bool, bool)>,    // per 15 s step: bitmask of hosts read, restart host 0, crash
}

fn fleet() -> impl Strategy<Value = Fleet> {
    (
        prop::collection::vec((0usize..2, 1u32..9, 0u8..=100, 0u8..=100), 1..6),
        prop::collection::vec(
            (
                any::<u16>(),
                prop::bool::weighted(0.05),
                prop::bool::weighted(0.05),
            ),
            1..80,
        ),
    )
        .prop_map(|(hosts, steps)| Fleet { hosts, steps })
}

struct Outcomes {
    sealed: Vec<Sealed>,
    /// Σ over everything attributed (sealed + open + late + carried) per contract.
    attributed: Vec<(i64, i64)>,
    /// What the counters increased by across the readings the ledger saw.
    truth: Vec<(i64, i64)>,
}

fn run(f: &Fleet, crashes: bool) -> Outcomes {
    const STEP: i64 = 15_000;
    let committed = |c: usize, a: i64, b: i64| (c as i64 + 3) * (b - a);
    // Accounts from minute -1 on, before the first reading: every increase counts.
    let mut ledger = Ledger::new(2, -2 * M);
    let mut snapshot = ledger.snapshot();
    let mut sealed = Vec::new();
    let mut counters: Vec<Vec<(i64, i64)>> =
        f.hosts.iter().map(|h| vec![(0, 0); h.1 as usize]).collect();
    let mut start = 0i64; // host 0's process start
                          // Per host: the process start and counters of the last reading the ledger took.
    type Seen = Option<(i64, Vec<(i64, i64)>)>;
    let mut seen: Vec<Seen> = vec![None; f.hosts.len()];
    let mut truth = vec![(0i64, 0i64); 2];
    let mut truth_at_snapshot = truth.clone();
    for (i, &(mask, restart, crash)) in f.steps.iter().enumerate() {
        let now = (i as i64 + 1) * STEP;
        for (h, &(_, _, d, u)) in f.hosts.iter().enumerate() {
            for c in counters[h].iter_mut() {
                let del = STEP * i64::from(d) / 100;
                c.0 += del;
                c.1 += del * i64::from(u) / 100;
            }
        }
        if restart {
            counters[0].iter_mut().for_each(|c| *c = (0, 0));
            start = now;
        }
        for (h, &(contract, _, _, _)) in f.hosts.iter().enumerate() {
            if mask & (1 << h) == 0 {
                continue;
            }
            let agent_start = if h == 0 { start } else { 0 };
            let list: Vec<(String, i64, i64)> = counters[h]
                .iter()
                .enumerate()
                .map(|(g, &(o, u))| (format!("{h}-{g}"), o, u))
                .collect();
            let r = Reading {
                received_ms: now,
                agent_ms: Some(now),
                agent_start_ms: Some(agent_start),
                // Sampled since the process started (a reset GPU was still watched).
                sampled_ms: Some(now - agent_start),
                gpus: list
                    .iter()
                    .map(|(u, o, us)| {
                        (
                            u.clone(),
                            GpuCounters {
                                observed_ms: *o,
                                used_ms: *us,
                                ..Default::default()
                            },
                        )
                    })
                    .collect(),
                owners: Default::default(),
            };
            let out = ledger.observe(&format!("host{h}"), contract, r);
            // Honest counters: only an agent restarting again within minutes is refused
            // (booked unreported), and then all of that host's reading.
            assert!(
                out.rejected.iter().all(|r| r.0 == Reject::RepeatedRestart),
                "{out:?}"
            );
            if let (Some((prev_start, prev)), true) = (&seen[h], out.rejected.is_empty()) {
                let restarted = *prev_start != agent_start;
                for (p, c) in prev.iter().zip(&counters[h]) {
                    let inc = |a: i64, b: i64| if restarted { b } else { b - a };
                    truth[contract].0 += inc(p.0, c.0);
                    truth[contract].1 += inc(p.1, c.1);
                }
            }
            seen[h] = Some((agent_start, counters[h].clone()));
        }
        sealed.extend(ledger.seal(now, 30_000, committed));
        if crashes && crash {
            // Everything since the snapshot is gone, including what was sealed since.
            ledger = Ledger::restore(2, snapshot.clone());
            sealed.retain(|s| s.minute < snapshot.sealed_through);
            truth = truth_at_snapshot.clone();
            for (h, st) in seen.iter_mut().enumerate() {
                *st = snapshot
                    .hosts
                    .iter()
                    .find(|(k, _, _)| *k == format!("host{h}"))
                    .and_then(|(_, _, s)| s.last.as_ref())
                    .map(|last| {
                        (
                            last.agent_start_ms.unwrap_or(0),
                            last.gpus
                                .values()
                                .map(|g| (g.observed_ms, g.used_ms))
                                .collect(),
                        )
                    });
            }
        } else if i % 4 == 3 {
            snapshot = ledger.snapshot();
            truth_at_snapshot = truth.clone();
        }
    }
    let mut attributed = vec![(0i64, 0i64); 2];
    for s in &sealed {
        attributed[s.contract].0 += s.totals.delivered;
        attributed[s.contract].1 += s.totals.used;
    }
    for per in ledger.open.values() {
        for (c, o) in per.iter().enumerate() {
            attributed[c].0 += o.delivered;
            attributed[c].1 += o.used;
        }
    }
    for (c, late) in ledger.late().iter().enumerate() {
        attributed[c].0 += late.0;
        attributed[c].1 += late.1;
    }
    for ((_, c), h) in &ledger.hosts {
        attributed[*c].0 += h.carry[0];
        attributed[*c].1 += h.carry[1];
    }
    Outcomes {
        sealed,
        attributed,
        truth,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// For every sealed minute and contract the identity holds exactly, nothing is
    /// negative, and overage is usage beyond the commitment.
    #[test]
    fn identity_holds_for_every_sealed_minute(f in fleet(), crashes in any::<bool>()) {
        let out = run(&f, crashes);
        for s in &out.sealed {
            let t = s.totals;
            prop_assert_eq!(t.committed, t.used_within() + t.idle + t.undelivered + t.unreported, "{:?}", s);
            prop_assert!(t.idle >= 0 && t.undelivered >= 0 && t.unreported >= 0 && t.overage >= 0 && t.used_within() >= 0);
            prop_assert!(t.used <= t.delivered, "{:?}", s);
            prop_assert_eq!(t.committed, (s.contract as i64 + 3) * MINUTE_MS);
            // No allocated counters in these readings: all idle is unallocated.
            prop_assert_eq!((t.idle_unallocated, t.idle_allocated), (t.idle, 0), "{:?}", s);
        }
        // Minutes seal once each, in order, per contract.
        for c in 0..2 {
            let minutes: Vec<i64> = out.sealed.iter().filter(|s| s.contract == c).map(|s| s.minute).collect();
            prop_assert!(minutes.windows(2).all(|w| w[1] == w[0] + 1), "{:?}", minutes);
        }
    }

    /// Every counter increase the ledger saw is attributed exactly once (sealed, open,
    /// late or carried), with or without crashes: nothing lost, nothing counted twice.
    #[test]
    fn no_double_counting_across_outages_restarts_and_crashes(f in fleet(), crashes in any::<bool>()) {
        let out = run(&f, crashes);
        prop_assert_eq!(&out.attributed, &out.truth);
    }

    #[test]
    fn spread_is_exact_and_proportional(from in -10_000_000i64..10_000_000, len in 1i64..1_000_000, amount in 0i64..10_000_000_000) {
        let parts = spread(from, from + len, amount);
        prop_assert_eq!(parts.iter().map(|p| p.1).sum::<i64>(), amount);
        for w in parts.windows(2) {
            prop_assert_eq!(w[1].0, w[0].0 + 1);
        }
        for &(m, share) in &parts {
            let covered = ((m + 1) * MINUTE_MS).min(from + len) - (m * MINUTE_MS).max(from);
            let exact = amount as f64 * covered as f64 / len as f64;
            prop_assert!((share as f64 - exact).abs() <= 1.0 + exact * 1e-12, "{} vs {}", share, exact);
        }
    }

    /// A share never exceeds its weight when the amount fits: per host and minute,
    /// used <= delivered <= reported.
    #[test]
    fn apportion_never_exceeds_the_weights(weights in prop::collection::vec(0i64..1_000_000, 1..20), cut in 0.0f64..=1.0) {
        let total: i64 = weights.iter().sum();
        let amount = (total as f64 * cut) as i64;
        let parts = apportion(amount, &weights);
        prop_assert_eq!(parts.iter().sum::<i64>(), if total == 0 { 0 } else { amount });
        for (p, w) in parts.iter().zip(&weights) {
            prop_assert!(*p <= *w && *p >= 0, "{:?} of {:?}", parts, weights);
        }
    }

    #[test]
    fn split_identity(c in 0i64..1_000_000, d in 0i64..2_000_000, u in 0i64..2_000_000, h in -10i64..2_000_000, s in 0i64..2_000_000, dark in any::<bool>()) {
        let u = u.min(d);
        let t = split_held(c, d, u, h, s, dark);
        prop_assert_eq!(t.committed, t.used_within() + t.idle + t.undelivered + t.unreported);
        prop_assert_eq!(t.idle, t.idle_unallocated + t.idle_allocated);
        prop_assert!(t.idle_unallocated >= 0 && t.idle_allocated >= 0);
        // Allocated first: idle_unallocated only once held is all counted.
        prop_assert_eq!(t.idle_allocated, h.clamp(0, t.idle));
        prop_assert!(t.used_within() <= t.delivered.min(t.committed));
        prop_assert_eq!(t.used, u);
        prop_assert!(t.undelivered <= (c - d).max(0));
    }
}
