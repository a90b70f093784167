//! The team book against an independent truth.
//!
//! A generated fleet of GPUs whose agents integrate allocated and busy time exactly (f64
//! seconds), sharing each stretch's allocated time equally among the owners holding the
//! GPU then (as the agent does), with owners that start and end (an ended owner stays
//! frozen in the exposition until a reading with its final value was read, then leaves),
//! owners of several teams and of none (`unassigned`), jittered readings, dropped scrapes,
//! agent restarts (every counter from 0) and aggregator crashes that lose everything since
//! the last snapshot. The truth is the agents' own integral per team over the intervals the
//! ledger accepted, never a ledger rule.

use super::*;
use proptest::prelude::*;

const M: i64 = MINUTE_MS;

/// splitmix64, so a case is its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

/// The teams owners belong to; owner `o` is in `TEAMS[o % 4]` ("unassigned": no rule
/// matched).
const TEAMS: [&str; 4] = ["alpha", "beta", "gamma", UNASSIGNED];

fn team_of(owner: usize) -> &'static str {
    TEAMS[owner % TEAMS.len()]
}

/// One owner's exposed counters on a GPU (seconds), and whether it ended.
#[derive(Debug, Clone, Copy, Default)]
struct OwnerExact {
    allocated: f64,
    used: f64,
    ended: bool,
    /// A reading with its final value was read (and not lost by a crash since).
    read: bool,
}

/// One GPU as its agent integrates it.
#[derive(Debug, Clone, Default)]
struct GpuExact {
    observed: f64,
    used: f64,
    allocated: f64,
    allocated_used: f64,
    /// Owners in the exposition, by owner number.
    owners: BTreeMap<usize, OwnerExact>,
}

impl GpuExact {
    fn counters(&self) -> GpuCounters {
        GpuCounters {
            observed_ms: host::ms_from_seconds(self.observed),
            used_ms: host::ms_from_seconds(self.used),
            allocated_ms: Some(host::ms_from_seconds(self.allocated)),
            allocated_used_ms: Some(host::ms_from_seconds(self.allocated_used)),
        }
    }
}

struct Run {
    sealed: Vec<Sealed>,
    /// Per contract and team: allocated GPU-ms in open minutes and host carries.
    open: Vec<TeamAmounts>,
    /// Per contract: allocated GPU-ms in open minutes and host carries.
    open_allocated: Vec<i64>,
    /// Per contract and team: the agents' allocated seconds × 1000 over accepted intervals.
    truth: Vec<BTreeMap<&'static str, f64>>,
    /// Per contract: the GPUs' allocated increments (ms, as scraped) credited.
    gpu_allocated: Vec<i64>,
    /// Owner-readings accepted (each owner's counter may round by a ms at each end).
    owner_readings: usize,
}

fn run(seed: u64, crashes: bool) -> Run {
    let mut rng = Rng(seed);
    let hosts: Vec<(usize, usize)> = (0..1 + rng.below(4))
        .map(|_| (rng.below(2) as usize, 1 + rng.below(3) as usize))
        .collect();
    let steps = 20 + rng.below(80) as usize;
    let committed = |_: usize, a: i64, b: i64| 100 * (b - a);
    let grace = 30 * M;
    let mut ledger = Ledger::new(2, -2 * M);
    let mut snapshot = ledger.snapshot();
    let mut gpus: Vec<Vec<GpuExact>> = hosts
        .iter()
        .map(|h| vec![GpuExact::default(); h.1])
        .collect();
    let mut starts = vec![0i64; hosts.len()];
    let mut next_owner = 0usize;
    type Seen = Option<(i64, Vec<GpuExact>)>;
    let mut seen: Vec<Seen> = vec![None; hosts.len()];
    let mut truth: Vec<BTreeMap<&'static str, f64>> = vec![BTreeMap::new(); 2];
    let mut gpu_allocated = vec![0i64; 2];
    let mut owner_readings = 0usize;
    let mut at_snapshot = (
        truth.clone(),
        gpu_allocated.clone(),
        owner_readings,
        seen.clone(),
    );
    let mut sealed = Vec::new();
    let mut t = 0i64;
    for step in 0..steps {
        let len = 10_000 + rng.below(10_000) as i64;
        t += len;
        for (h, host) in gpus.iter_mut().enumerate() {
            if rng.chance(0.03) {
                host.iter_mut().for_each(|g| *g = GpuExact::default());
                starts[h] = t - len;
            }
            for g in host.iter_mut() {
                // Owners end and start.
                for o in g.owners.values_mut() {
                    if !o.ended && rng.chance(0.15) {
                        o.ended = true;
                    }
                }
                let live = g.owners.values().filter(|o| !o.ended).count();
                if live < 3 && rng.chance(0.3) {
                    g.owners.insert(next_owner, OwnerExact::default());
                    next_owner += 1;
                }
                let live: Vec<usize> = g
                    .owners
                    .iter()
                    .filter(|(_, o)| !o.ended)
                    .map(|(k, _)| *k)
                    .collect();
                let s = len as f64 / 1000.0;
                let busy = rng.unit();
                g.observed += s;
                if !live.is_empty() {
                    let share = rng.unit();
                    let a = s * share;
                    g.allocated += a;
                    g.allocated_used += a * busy;
                    g.used += a * busy;
                    for k in &live {
                        let o = g.owners.get_mut(k).expect("live owner");
                        o.allocated += a / live.len() as f64;
                        o.used += a * busy / live.len() as f64;
                    }
                }
            }
        }
        for (h, &(contract, _)) in hosts.iter().enumerate() {
            if rng.chance(0.3) {
                continue;
            }
            let mut owners = BTreeMap::new();
            for (g, e) in gpus[h].iter().enumerate() {
                for (&k, o) in &e.owners {
                    owners.insert(
                        (format!("{h}-{g}"), format!("owner{k}")),
                        OwnerCounters {
                            team: team_of(k).to_string(),
                            allocated_ms: host::ms_from_seconds(o.allocated),
                            used_ms: host::ms_from_seconds(o.used),
                        },
                    );
                }
            }
            let r = Reading {
                received_ms: t + rng.below(500) as i64,
                agent_ms: Some(t),
                agent_start_ms: Some(starts[h]),
                sampled_ms: Some(t - starts[h]),
                gpus: gpus[h]
                    .iter()
                    .enumerate()
                    .map(|(g, e)| (format!("{h}-{g}"), e.counters()))
                    .collect(),
                owners,
            };
            let out = ledger.observe(&format!("host{h}"), contract, r);
            let refused = out.rejected.iter().any(|r| r.0 == Reject::RepeatedRestart);
            if let (Some((start, prev)), false) = (&seen[h], refused) {
                let restarted = *start != starts[h];
                for (p, c) in prev.iter().zip(&gpus[h]) {
                    for (k, o) in &c.owners {
                        let before = match p.owners.get(k) {
                            Some(po) if !restarted => po.allocated,
                            _ => 0.0,
                        };
                        *truth[contract].entry(team_of(*k)).or_default() +=
                            (o.allocated - before) * 1000.0;
                        owner_readings += 1;
                    }
                    let (a, pa) = (c.counters().allocated_ms, p.counters().allocated_ms);
                    gpu_allocated[contract] +=
                        a.unwrap_or(0) - if restarted { 0 } else { pa.unwrap_or(0) };
                }
            }
            seen[h] = Some((starts[h], gpus[h].clone()));
            for g in gpus[h].iter_mut() {
                g.owners.values_mut().for_each(|o| o.read |= o.ended);
            }
        }
        sealed.extend(ledger.seal(t, grace, committed));
        if crashes && rng.chance(0.05) {
            ledger = Ledger::restore(2, snapshot.clone());
            sealed.retain(|s| s.minute < snapshot.sealed_through);
            (truth, gpu_allocated, owner_readings, seen) = at_snapshot.clone();
            // What was read since the snapshot is lost: ended owners stay until read again.
            for o in gpus
                .iter_mut()
                .flatten()
                .flat_map(|g| g.owners.values_mut())
            {
                o.read = false;
            }
        } else if step % 4 == 3 {
            // The agent drops an ended owner once its final value was read (and, here,
            // kept: the store writes the host checkpoints with the minutes).
            for g in gpus.iter_mut().flatten() {
                g.owners.retain(|_, o| !o.read);
            }
            snapshot = ledger.snapshot();
            at_snapshot = (
                truth.clone(),
                gpu_allocated.clone(),
                owner_readings,
                seen.clone(),
            );
        }
    }
    let mut open = vec![TeamAmounts::new(); 2];
    let mut open_allocated = vec![0i64; 2];
    for per in ledger.open.values() {
        for (c, o) in per.iter().enumerate() {
            open_allocated[c] += o.allocated;
        }
    }
    for (&(_, c), per) in &ledger.open_teams {
        for (team, &(a, u)) in per {
            teams::add(&mut open[c], team, a, u);
        }
    }
    for ((_, c), h) in &ledger.hosts {
        for (team, &owed) in &h.carry_teams {
            // Owed to the team, to be paid from unassigned time.
            teams::add(&mut open[*c], team, owed, 0);
            teams::add(&mut open[*c], UNASSIGNED, -owed, 0);
        }
    }
    Run {
        sealed,
        open,
        open_allocated,
        truth,
        gpu_allocated,
        owner_readings,
    }
}

/// Per contract and team: the ledger's allocated (sealed, open) minus the truth, GPU-ms.
fn errors(r: &Run) -> Vec<(usize, &'static str, f64)> {
    let mut out = Vec::new();
    for c in 0..2 {
        let mut got = r.open[c].clone();
        for s in r.sealed.iter().filter(|s| s.contract == c) {
            for (team, a, u) in &s.teams {
                teams::add(&mut got, team, *a, *u);
            }
        }
        for team in TEAMS {
            let ledger = got.get(team).map_or(0, |v| v.0) as f64;
            let truth = r.truth[c].get(team).copied().unwrap_or(0.0);
            out.push((c, team, ledger - truth));
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Every sealed minute: Σ teams' allocated == the contract's allocated exactly, used <=
    /// allocated per team, no zero rows; over the run the contract's allocated is the Σ of the
    /// GPUs' allocated increments credited, exactly; and each team's allocated is the
    /// agents' truth to the rounding of the owners' counters.
    #[test]
    fn team_time_sums_exactly_and_matches_the_agents_truth(seed in any::<u64>(), crashes in any::<bool>()) {
        let r = run(seed, crashes);
        let mut allocated = r.open_allocated.clone();
        for s in &r.sealed {
            let sum: i64 = s.teams.iter().map(|t| t.1).sum();
            prop_assert_eq!(sum, s.allocated, "{:?}", s);
            prop_assert!(s.teams.iter().all(|t| 0 <= t.2 && t.2 <= t.1 && (t.1, t.2) != (0, 0)), "{:?}", s);
            prop_assert!(s.allocated <= s.totals.delivered, "{:?}", s);
            allocated[s.contract] += s.allocated;
        }
        prop_assert_eq!(&allocated, &r.gpu_allocated);
        let bound = 2.0 * r.owner_readings as f64 + 2.0;
        for (c, team, e) in errors(&r) {
            prop_assert!(e.abs() <= bound, "contract {} team {}: ledger − truth = {} ms over {} owner readings", c, team, e, r.owner_readings);
        }
    }
}

/// The rounding of the owners' counters does not lean either way: over many fleets each
/// team's signed error averages to zero within its statistical spread. Prints the figures.
#[test]
fn team_time_has_no_bias() {
    let mut by_team: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut truth = 0.0f64;
    for seed in 0..1000u64 {
        let r = run(seed.wrapping_mul(0x2545_f491_4f6c_dd1d), seed % 2 == 0);
        truth += r.truth.iter().flat_map(|t| t.values()).sum::<f64>();
        for (_, team, e) in errors(&r) {
            by_team.entry(team).or_default().push(e);
        }
    }
    let mut biased = Vec::new();
    for (team, e) in by_team {
        let n = e.len() as f64;
        let mean = e.iter().sum::<f64>() / n;
        let sd = (e.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        let stderr = sd / n.sqrt();
        eprintln!(
            "team {team}: allocated − truth over {} contract-runs ({:.1} GPU-h allocated in all): mean {mean:+.4} ms (standard error {stderr:.4}), sd {sd:.3} ms",
            e.len(),
            truth / 3_600_000.0,
        );
        if mean.abs() > 4.0 * stderr.max(1e-9) {
            biased.push(team);
        }
    }
    assert!(biased.is_empty(), "biased: {biased:?}");
}

fn owner(team: &str, allocated_ms: i64, used_ms: i64) -> OwnerCounters {
    OwnerCounters {
        team: team.into(),
        allocated_ms,
        used_ms,
    }
}

fn reading(t: i64, start: i64, alloc: Option<i64>, owners: &[(&str, OwnerCounters)]) -> Reading {
    Reading {
        received_ms: t,
        agent_ms: Some(t),
        agent_start_ms: Some(start),
        sampled_ms: Some(t - start),
        gpus: [(
            "g".to_string(),
            GpuCounters {
                observed_ms: t - start,
                used_ms: 0,
                allocated_ms: alloc,
                allocated_used_ms: alloc.map(|_| 0),
            },
        )]
        .into(),
        owners: owners
            .iter()
            .map(|(k, o)| (("g".to_string(), k.to_string()), o.clone()))
            .collect(),
    }
}

/// An owner new since the checkpoint counts its whole value, one absent now ended (Δ 0),
/// a checkpoint from before owners scales them into the GPU's allocated, a GPU without the
/// allocated counters has no allocated time, and after an agent restart owners count from 0.
#[test]
fn owners_come_go_and_restart_as_the_gpus_counters_do() {
    let mut l = Ledger::new(1, -M);
    // Minute 0: no allocated counters: nothing, whatever the owners say.
    l.observe("h", 0, reading(0, 0, None, &[]));
    l.observe("h", 0, reading(M, 0, None, &[("j1", owner("a", 9_000, 0))]));
    // Minute 1: counters appear (baseline without them): still nothing.
    l.observe(
        "h",
        0,
        reading(2 * M, 0, Some(40_000), &[("j1", owner("a", 40_000, 0))]),
    );
    // Minute 2: j1 +10 s, j2 new with 20 s; 35 s allocated: 5 s unassigned.
    let o = [("j1", owner("a", 50_000, 0)), ("j2", owner("b", 20_000, 0))];
    l.observe("h", 0, reading(3 * M, 0, Some(75_000), &o));
    // Minute 3: j1 ended (absent), j2 +30 s, the GPU +30 s.
    l.observe(
        "h",
        0,
        reading(4 * M, 0, Some(105_000), &[("j2", owner("b", 50_000, 0))]),
    );
    // Minute 4: the agent restarted at 4M: counters and owners from 0.
    l.observe(
        "h",
        0,
        reading(5 * M, 4 * M, Some(12_000), &[("j2", owner("b", 12_000, 0))]),
    );
    let sealed = l.seal(5 * M, 0, |_, a, b| b - a);
    let got: Vec<(i64, Vec<TeamRow>)> = sealed
        .iter()
        .map(|s| (s.allocated, s.teams.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (0, vec![]),
            (0, vec![]),
            (
                35_000,
                vec![
                    ("a".into(), 10_000, 0),
                    ("b".into(), 20_000, 0),
                    (UNASSIGNED.into(), 5_000, 0)
                ]
            ),
            (30_000, vec![("b".into(), 30_000, 0)]),
            (12_000, vec![("b".into(), 12_000, 0)]),
        ]
    );
}

/// A sealed minute takes no late allocated time: the team rows and the contract's
/// allocated of late readings are dropped alike, so the sealed minute still sums exactly.
#[test]
fn late_team_time_for_a_sealed_minute_is_dropped_with_its_allocated() {
    let mut l = Ledger::new(1, -M);
    l.observe("h", 0, reading(0, 0, Some(0), &[]));
    let sealed = l.seal(2 * M, 0, |_, a, b| b - a);
    assert_eq!(sealed.len(), 2);
    l.observe(
        "h",
        0,
        reading(3 * M, 0, Some(3 * M), &[("j", owner("a", 3 * M, 0))]),
    );
    let sealed = l.seal(3 * M, 0, |_, a, b| b - a);
    assert_eq!(sealed.len(), 1);
    assert_eq!(
        (sealed[0].allocated, sealed[0].teams.clone()),
        (M, vec![("a".into(), M, 0)])
    );
    assert_eq!(l.late(), &[(2 * M, 0)]);
}
