use super::*;
use proptest::prelude::*;

fn gpus(list: &[(&str, f64, f64)]) -> BTreeMap<String, GpuCounters> {
    list.iter()
        .map(|&(u, observed, used)| (u.to_string(), GpuCounters { observed, used }))
        .collect()
}

const M: i64 = MINUTE_MS;

#[test]
fn a_delta_is_spread_over_the_minutes_it_covers() {
    assert_eq!(
        spread(30_000, 150_000, 120),
        vec![(0, 30), (1, 60), (2, 30)]
    );
    assert_eq!(spread(0, 60_000, 7), vec![(0, 7)]);
    assert_eq!(spread(-30_000, 30_000, 3), vec![(-1, 2), (0, 1)]);
    assert!(spread(5, 5, 10).is_empty());
}

#[test]
fn split_fills_commitment_with_known_facts_first() {
    // 100 committed, 96 delivered, 8 unreported, 50 used.
    let t = split(100, 96, 8, 50);
    assert_eq!(
        (t.idle, t.undelivered, t.unreported, t.overage),
        (46, 0, 4, 0)
    );
    // Delivered beyond the commitment, used beyond it too.
    let t = split(100, 120, 0, 110);
    assert_eq!((t.used_within(), t.idle, t.overage), (100, 0, 10));
    // Nothing reported at all: all unreported, nothing undelivered.
    assert_eq!(split(100, 0, 400, 0).unreported, 100);
    // Nothing committed: everything used is overage.
    assert_eq!(split(0, 10, 0, 10).overage, 10);
}

#[test]
fn an_outage_back_fills_when_the_agent_returns() {
    let mut l = Ledger::new(1, 0); // accounts from minute 1
    let host = "h:9473";
    // One GPU, fully delivered, half used; scraped at 60 s, then unreachable until 360 s.
    l.observe(host, 0, 60_000, gpus(&[("g", 60.0, 30.0)]));
    l.observe(host, 0, 360_000, gpus(&[("g", 360.0, 180.0)]));
    let sealed = l.seal(360_000 + 5 * M, 5 * M, |_, a, b| b - a);
    assert_eq!(sealed.len(), 5);
    for s in sealed {
        assert_eq!(s.totals.delivered, M);
        assert_eq!(s.totals.used, M / 2);
        assert_eq!(s.totals.idle, M / 2);
        assert_eq!(s.totals.unreported, 0);
    }
}

#[test]
fn a_silent_host_is_unreported_and_late_data_is_dropped() {
    let mut l = Ledger::new(1, 0);
    l.observe("h", 0, 60_000, gpus(&[("a", 0.0, 0.0), ("b", 0.0, 0.0)]));
    l.observe(
        "h",
        0,
        120_000,
        gpus(&[("a", 60.0, 60.0), ("b", 60.0, 0.0)]),
    );
    // Minute 2 passes with no scrape; it seals (grace 0) as unreported.
    let sealed = l.seal(180_000, 0, |_, a, b| 2 * (b - a));
    assert_eq!(sealed[0].totals.delivered, 2 * M);
    assert_eq!(sealed[1].totals.unreported, 2 * M);
    assert_eq!(sealed[1].totals.committed, 2 * M);
    // The agent returns: the part for the sealed minute is late, the rest is counted.
    l.observe(
        "h",
        0,
        240_000,
        gpus(&[("a", 180.0, 180.0), ("b", 180.0, 0.0)]),
    );
    assert_eq!(l.late()[0], (2 * M, M));
    let sealed = l.seal(240_000, 0, |_, a, b| 2 * (b - a));
    assert_eq!(sealed.len(), 1);
    assert_eq!(sealed[0].totals.delivered, 2 * M);
    assert_eq!(sealed[0].totals.used, M);
}

#[test]
fn an_agent_restart_counts_from_zero() {
    let mut l = Ledger::new(1, 0);
    l.observe("h", 0, 60_000, gpus(&[("g", 1000.0, 500.0)]));
    l.observe("h", 0, 120_000, gpus(&[("g", 30.0, 10.0)]));
    let s = l.seal(120_000, 0, |_, a, b| b - a);
    assert_eq!(s[0].totals.delivered, 30_000);
    assert_eq!(s[0].totals.used, 10_000);
    assert_eq!(s[0].totals.undelivered, 30_000);
}

/// A random fleet: hosts with GPUs delivered at some share of wall time and used at
/// some share of that, scraped every 15 s with dropped scrapes (outages), agent
/// restarts, and aggregator crashes that lose everything since the last snapshot.
#[derive(Debug, Clone)]
struct Fleet {
    hosts: Vec<(usize, u32, u8, u8)>, // (contract, gpus, delivered %, used % of delivered)
    steps: Vec<(u16, bool, bool)>, // per 15 s step: bitmask of hosts scraped, restart host 0, crash
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

struct Outcome {
    sealed: Vec<Sealed>,
    /// Σ over everything attributed (sealed + open + late) per contract: delivered, used.
    attributed: Vec<(i64, i64)>,
    /// What the counters increased by across the scrapes the ledger saw.
    truth: Vec<(i64, i64)>,
}

fn run(f: &Fleet, crashes: bool) -> Outcome {
    const STEP: i64 = 15_000;
    let committed = |c: usize, a: i64, b: i64| (c as i64 + 3) * (b - a);
    let mut ledger = Ledger::new(2, 0);
    let mut snapshot = ledger.snapshot();
    let mut sealed = Vec::new();
    // Each host's counters (whole ms as seconds/1000) and what the ledger last saw of them.
    let mut counters: Vec<Vec<(i64, i64)>> =
        f.hosts.iter().map(|h| vec![(0, 0); h.1 as usize]).collect();
    let mut seen: Vec<Option<Vec<(i64, i64)>>> = vec![None; f.hosts.len()];
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
        }
        for (h, &(contract, _, _, _)) in f.hosts.iter().enumerate() {
            if mask & (1 << h) == 0 {
                continue;
            }
            let map = counters[h]
                .iter()
                .enumerate()
                .map(|(g, &(o, u))| {
                    (
                        format!("{h}-{g}"),
                        GpuCounters {
                            observed: o as f64 / 1000.0,
                            used: u as f64 / 1000.0,
                        },
                    )
                })
                .collect();
            if let Some(prev) = &seen[h] {
                for (p, c) in prev.iter().zip(&counters[h]) {
                    let inc = |a: i64, b: i64| if b >= a { b - a } else { b };
                    truth[contract].0 += inc(p.0, c.0);
                    truth[contract].1 += inc(p.1, c.1);
                }
            }
            seen[h] = Some(counters[h].clone());
            ledger.observe(&format!("host{h}"), contract, now, map);
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
                    .find(|(k, _)| *k == format!("host{h}"))
                    .map(|(_, s)| {
                        s.last
                            .gpus
                            .values()
                            .map(|g| {
                                (
                                    (g.observed * 1000.0).round() as i64,
                                    (g.used * 1000.0).round() as i64,
                                )
                            })
                            .collect()
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
    for (&_m, per) in &ledger.open {
        for (c, o) in per.iter().enumerate() {
            attributed[c].0 += o.delivered;
            attributed[c].1 += o.used;
        }
    }
    for (c, late) in ledger.late().iter().enumerate() {
        attributed[c].0 += late.0;
        attributed[c].1 += late.1;
    }
    Outcome {
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
            prop_assert_eq!(t.committed, (s.contract as i64 + 3) * MINUTE_MS);
        }
        // Minutes seal once each, in order, per contract.
        for c in 0..2 {
            let minutes: Vec<i64> = out.sealed.iter().filter(|s| s.contract == c).map(|s| s.minute).collect();
            prop_assert!(minutes.windows(2).all(|w| w[1] == w[0] + 1), "{:?}", minutes);
        }
    }

    /// Every counter increase the ledger saw is attributed exactly once (sealed, open
    /// or late), with or without crashes: nothing lost, nothing counted twice.
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

    #[test]
    fn split_identity(c in 0i64..1_000_000, d in 0i64..2_000_000, u in 0i64..2_000_000, s in 0i64..2_000_000) {
        let t = split(c, d, u, s);
        prop_assert_eq!(t.committed, t.used_within() + t.idle + t.undelivered + t.unreported);
        prop_assert!(t.used_within() <= t.delivered.min(t.committed));
        prop_assert_eq!(t.used, s);
    }
}
