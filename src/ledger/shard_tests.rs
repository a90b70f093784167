//! One book over shards against an independent truth: the same fleet in one ledger.
//!
//! A generated fleet (as in `held_tests.rs` and `team_tests.rs`: GPUs whose agents
//! integrate observed, used, allocated and allocated-and-used time and their owners' team
//! time in f64 seconds, readings at jittered times 10–20 s apart, dropped scrapes that
//! open `host_unreachable` gaps, agent restarts, GPUs that vanish from the exposition for a
//! while, targets added late, targets of unknown size for a while, targets claimed by two
//! contracts, retired targets, aggregator crashes that lose everything since the last
//! snapshot) is split into `k` = 1..4 shards by [`ShardSpec::owns`] on the target key
//! (Prometheus's `hashmod`). One ledger per shard sees only its targets and closes minutes
//! into [`Partial`]s ([`Ledger::close`]); one ledger sees the whole fleet and seals
//! ([`Ledger::seal`]). The truth is the one ledger: for every minute and contract,
//! [`combine`] of the shards' partials equals its sealed minute exactly (totals, allocated,
//! teams, `short`), and so do the shards' late GPU-ms and per-GPU gaps summed, and the
//! `short` gaps the sealer keeps with [`gaps::short_minute`].
//!
//! A missing shard (its partial dropped, its last capacity passed as missing) leaves the
//! other shards' figures as they are, keeps the identity exact, and puts its capacity (up to
//! the shortfall) in unreported, never in undelivered.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::shard::{combine, Combined, Partial};
use super::*;
use crate::contract::ShardSpec;

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

const TEAMS: [&str; 4] = ["alpha", "beta", "gamma", UNASSIGNED];

/// Committed GPUs of `contract` in `minute`: 0–14, changing minute by minute, so some
/// minutes are short of the fleet (undelivered, unreported) and some below it (overage).
fn committed(seed: u64, contract: usize, from_ms: i64, to_ms: i64) -> i64 {
    let mut r = Rng(seed ^ (contract as u64) << 40 ^ minute_of(from_ms) as u64);
    r.below(15) as i64 * (to_ms - from_ms)
}

#[derive(Debug, Clone, Default)]
struct Gpu {
    observed: f64,
    used: f64,
    allocated: f64,
    allocated_used: f64,
    /// Owner → (allocated, used) seconds, ended.
    owners: BTreeMap<usize, (f64, f64, bool)>,
    /// Absent from the exposition before this step.
    gone_until: usize,
}

#[derive(Debug, Clone)]
struct Host {
    key: String,
    /// One contract; two: a conflict (configured in both, never scraped, dark in each).
    contracts: Vec<usize>,
    gpus: Vec<Gpu>,
    start_ms: i64,
    /// Configured from this step on.
    added: usize,
    /// Left the contract's targets at this step.
    retired: Option<usize>,
    /// Readings before this step carry no GPU series (size unknown).
    sized_from: usize,
}

/// One run: the one ledger's sealed minutes (with `short`), each shard's closed minutes,
/// and the end state to compare.
struct Run {
    seed: u64,
    k: u32,
    sealed: Vec<(Sealed, Option<i64>)>,
    closed: Vec<Vec<ClosedMinute>>,
    single: Ledger,
    shards: Vec<Ledger>,
    /// The `short` gaps the sealer kept from the combined minutes: (open per contract,
    /// closed since the last restart).
    short_open: BTreeMap<usize, Gap>,
    short_closed: Vec<Gap>,
}

fn fleet(rng: &mut Rng, seed: u64, steps: usize) -> Vec<Host> {
    let n = 2 + rng.below(7) as usize;
    (0..n)
        .map(|h| {
            let contracts = if rng.chance(0.02) {
                vec![0, 1]
            } else {
                vec![rng.below(2) as usize]
            };
            Host {
                key: format!("gpu{h}-{}.lab:9400", seed % 9973),
                contracts,
                gpus: vec![Gpu::default(); 1 + rng.below(4) as usize],
                start_ms: 0,
                added: if rng.chance(0.2) {
                    rng.below(steps as u64) as usize
                } else {
                    0
                },
                retired: rng.chance(0.15).then(|| rng.below(steps as u64) as usize),
                sized_from: if rng.chance(0.12) {
                    rng.below(steps as u64 * 3 / 4 + 5) as usize
                } else {
                    0
                },
            }
        })
        .collect()
}

/// A ledger as the store gives it back after a crash: its last snapshot, and the gaps
/// pending then.
fn restored(saved: &(Snapshot, Vec<Gap>)) -> Ledger {
    let mut l = Ledger::restore(2, saved.0.clone());
    l.restore_gaps(saved.1.clone());
    l
}

fn run(seed: u64, k: u32, crashes: bool) -> Run {
    let mut rng = Rng(seed);
    let steps = 20 + rng.below(80) as usize;
    let mut hosts = fleet(&mut rng, seed, steps);
    let grace = [0, 20_000, M, 30 * M][rng.below(4) as usize];
    let specs: Vec<ShardSpec> = (0..k).map(|index| ShardSpec { index, count: k }).collect();
    let owner: Vec<usize> = hosts
        .iter()
        .map(|h| {
            let owners: Vec<usize> = (0..k as usize).filter(|&i| specs[i].owns(&h.key)).collect();
            assert_eq!(owners.len(), 1, "{}: owned by {owners:?}", h.key);
            assert_eq!(owners[0] as u32, crate::contract::shard::hashmod(&h.key, k));
            owners[0]
        })
        .collect();
    let mut single = Ledger::new(2, -2 * M);
    let mut shards: Vec<Ledger> = (0..k).map(|_| Ledger::new(2, -2 * M)).collect();
    type Saved = (Snapshot, Vec<Gap>);
    let save = |l: &Ledger| (l.snapshot(), l.pending_gaps().0);
    let mut saved: (Saved, Vec<Saved>, BTreeMap<usize, Gap>) = (
        save(&single),
        shards.iter().map(save).collect(),
        BTreeMap::new(),
    );
    let mut sealed: Vec<(Sealed, Option<i64>)> = Vec::new();
    let mut closed: Vec<Vec<ClosedMinute>> = vec![Vec::new(); k as usize];
    let mut short_open: BTreeMap<usize, Gap> = BTreeMap::new();
    let mut short_closed: Vec<Gap> = Vec::new();
    let mut next_owner = 0usize;
    let mut t = 0i64;
    for step in 0..steps {
        let len = 10_000 + rng.below(10_000) as i64;
        t += len;
        for host in hosts.iter_mut() {
            if rng.chance(0.03) {
                host.gpus.iter_mut().for_each(|g| {
                    *g = Gpu {
                        gone_until: g.gone_until,
                        ..Gpu::default()
                    }
                });
                host.start_ms = t - len;
            }
            for g in host.gpus.iter_mut() {
                if g.gone_until <= step && rng.chance(0.03) {
                    g.gone_until = step + 1 + rng.below(6) as usize;
                }
                if g.gone_until > step {
                    continue;
                }
                for o in g.owners.values_mut() {
                    o.2 |= rng.chance(0.15);
                }
                g.owners.retain(|_, o| !(o.2 && rng.chance(0.5)));
                if g.owners.values().filter(|o| !o.2).count() < 3 && rng.chance(0.3) {
                    g.owners.insert(next_owner, (0.0, 0.0, false));
                    next_owner += 1;
                }
                let s = len as f64 / 1000.0 * if rng.chance(0.1) { rng.unit() } else { 1.0 };
                g.observed += s;
                let live: Vec<usize> = g.owners.iter().filter(|o| !o.1 .2).map(|o| *o.0).collect();
                let busy = rng.unit();
                if live.is_empty() {
                    g.used += s * busy * 0.1;
                } else {
                    let a = s * rng.unit();
                    g.allocated += a;
                    g.allocated_used += a * busy;
                    g.used += a * busy;
                    for o in &live {
                        let e = g.owners.get_mut(o).expect("live owner");
                        e.0 += a / live.len() as f64;
                        e.1 += a * busy / live.len() as f64;
                    }
                }
            }
        }
        // The targets now: every ledger is configured with its shard's.
        let current = |h: &Host| h.added <= step && h.retired.is_none_or(|r| step < r);
        let targets: Vec<(usize, (String, Vec<usize>))> = hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| current(h))
            .map(|(i, h)| (owner[i], (h.key.clone(), h.contracts.clone())))
            .collect();
        let retire_until = |_: usize, now: i64| now + 90_000;
        let all: Vec<(String, Vec<usize>)> = targets.iter().map(|x| x.1.clone()).collect();
        single.configure(t, &all, retire_until);
        for (i, l) in shards.iter_mut().enumerate() {
            let mine: Vec<(String, Vec<usize>)> = targets
                .iter()
                .filter(|x| x.0 == i)
                .map(|x| x.1.clone())
                .collect();
            l.configure(t, &mine, retire_until);
        }
        for (h, host) in hosts.iter().enumerate() {
            if !current(host) || host.contracts.len() != 1 {
                continue;
            }
            let c = host.contracts[0];
            if rng.chance(0.25) {
                single.unreachable(&host.key, c);
                shards[owner[h]].unreachable(&host.key, c);
                continue;
            }
            let mut gpus = BTreeMap::new();
            let mut owners = BTreeMap::new();
            if step >= host.sized_from {
                for (g, e) in host.gpus.iter().enumerate() {
                    if e.gone_until > step {
                        continue;
                    }
                    let uuid = format!("GPU-{h}-{g}");
                    for (&o, &(a, u, _)) in &e.owners {
                        owners.insert(
                            (uuid.clone(), format!("job{o}")),
                            OwnerCounters {
                                team: TEAMS[o % TEAMS.len()].to_string(),
                                allocated_ms: host::ms_from_seconds(a),
                                used_ms: host::ms_from_seconds(u),
                            },
                        );
                    }
                    gpus.insert(
                        uuid,
                        GpuCounters {
                            observed_ms: host::ms_from_seconds(e.observed),
                            used_ms: host::ms_from_seconds(e.used),
                            allocated_ms: Some(host::ms_from_seconds(e.allocated)),
                            allocated_used_ms: Some(host::ms_from_seconds(e.allocated_used)),
                        },
                    );
                }
            }
            let reading = Reading {
                received_ms: t + rng.below(500) as i64,
                agent_ms: Some(t),
                agent_start_ms: Some(host.start_ms),
                sampled_ms: Some(t - host.start_ms),
                gpus,
                owners,
            };
            let one = single.observe(&host.key, c, reading.clone());
            let part = shards[owner[h]].observe(&host.key, c, reading);
            assert_eq!(one, part, "a host reads alike in any ledger");
        }
        let now = t;
        let one = single.seal_with_short(now, grace, |c, a, b| committed(seed, c, a, b));
        for (s, short) in &one {
            let (open, done) = gaps::short_minute(
                short_open.remove(&s.contract),
                s.contract,
                s.minute * M,
                *short,
            );
            short_open.extend(open.map(|g| (s.contract, g)));
            short_closed.extend(done);
        }
        sealed.extend(one);
        for (i, l) in shards.iter_mut().enumerate() {
            closed[i].extend(l.close(now, grace));
        }
        if crashes && rng.chance(0.05) {
            // Every aggregator loses what it did since its last commit; the sealer's
            // `short` state is the book's as of then.
            single = restored(&saved.0);
            shards = saved.1.iter().map(restored).collect();
            let through = saved.0 .0.sealed_through;
            sealed.retain(|s| s.0.minute < through);
            closed
                .iter_mut()
                .for_each(|c| c.retain(|m| m.minute < through));
            short_open = saved.2.clone();
            short_closed.clear();
        } else if step % 4 == 3 {
            saved = (
                save(&single),
                shards.iter().map(save).collect(),
                short_open.clone(),
            );
        }
    }
    Run {
        seed,
        k,
        sealed,
        closed,
        single,
        shards,
        short_open,
        short_closed,
    }
}

/// Each shard's partials by (minute, contract); every shard closed exactly the minutes the
/// one ledger sealed, each once.
fn by_minute(r: &Run) -> Vec<BTreeMap<(i64, usize), &Partial>> {
    r.closed
        .iter()
        .map(|c| {
            let map: BTreeMap<(i64, usize), &Partial> = c
                .iter()
                .map(|m| ((m.minute, m.contract), &m.partial))
                .collect();
            assert_eq!(map.len(), c.len(), "a minute closed twice");
            assert_eq!(
                map.len(),
                r.sealed.len(),
                "the minutes closed and sealed differ"
            );
            map
        })
        .collect()
}

fn combined_of(r: &Run, parts: &[BTreeMap<(i64, usize), &Partial>], s: &Sealed) -> Combined {
    let key = (s.minute, s.contract);
    let present: Vec<&Partial> = parts.iter().map(|p| p[&key]).collect();
    let m0 = s.minute * M;
    combine(committed(r.seed, s.contract, m0, m0 + M), &present, 0)
}

/// Per sealed minute: the combined shards' figure minus the one ledger's, for delivered,
/// used, idle, idle_allocated, undelivered, unreported, overage, allocated, short, and
/// Σ of the shards' delivered and used minus the one ledger's.
const FIELDS: [&str; 11] = [
    "delivered",
    "used",
    "idle",
    "idle_allocated",
    "undelivered",
    "unreported",
    "overage",
    "allocated",
    "short",
    "Σ shards' delivered",
    "Σ shards' used",
];

fn differences(r: &Run) -> Vec<[i64; 11]> {
    let parts = by_minute(r);
    r.sealed
        .iter()
        .map(|(s, short)| {
            let c = combined_of(r, &parts, s);
            let key = (s.minute, s.contract);
            let sum = |f: fn(&Partial) -> i64| parts.iter().map(|p| f(p[&key])).sum::<i64>();
            let (a, b) = (c.totals, s.totals);
            [
                a.delivered - b.delivered,
                a.used - b.used,
                a.idle - b.idle,
                a.idle_allocated - b.idle_allocated,
                a.undelivered - b.undelivered,
                a.unreported - b.unreported,
                a.overage - b.overage,
                c.allocated - s.allocated,
                c.short.unwrap_or(-1) - short.unwrap_or(-1),
                sum(|p| p.delivered) - b.delivered,
                sum(|p| p.used) - b.used,
            ]
        })
        .collect()
}

/// The sharded book is the one ledger, to the GPU-ms.
fn check_equal(r: &Run) -> Result<usize, String> {
    let parts = by_minute(r);
    for (s, short) in &r.sealed {
        let c = combined_of(r, &parts, s);
        let want = Combined {
            totals: s.totals,
            allocated: s.allocated,
            teams: s.teams.clone(),
            short: *short,
        };
        if c != want {
            return Err(format!(
                "k={} minute {} contract {}: shards {c:?}, one ledger {want:?}",
                r.k, s.minute, s.contract
            ));
        }
        let t = c.totals;
        if t.committed != t.used_within() + t.idle + t.undelivered + t.unreported
            || t.idle != t.idle_unallocated + t.idle_allocated
            || Kind::ALL.iter().any(|&x| t[x] < 0)
        {
            return Err(format!("identity: {c:?}"));
        }
    }
    // Late GPU-ms, per contract and per minute they were for, sum over the shards.
    let mut late = vec![(0i64, 0i64); 2];
    let mut pending: BTreeMap<(usize, i64), (i64, i64)> = BTreeMap::new();
    for l in &r.shards {
        for (c, x) in l.late().iter().enumerate() {
            late[c].0 += x.0;
            late[c].1 += x.1;
        }
        for p in l.pending_late() {
            let e = pending.entry((p.contract, p.minute)).or_default();
            e.0 += p.delivered;
            e.1 += p.used;
        }
    }
    if late != r.single.late() {
        return Err(format!("late: shards {late:?}, one {:?}", r.single.late()));
    }
    let one: BTreeMap<(usize, i64), (i64, i64)> = r
        .single
        .pending_late()
        .iter()
        .map(|p| ((p.contract, p.minute), (p.delivered, p.used)))
        .collect();
    if pending != one {
        return Err(format!("pending late: shards {pending:?}, one {one:?}"));
    }
    // Per-GPU gaps are the hosts' own: the shards' together are the one ledger's. The
    // `short` gaps the sealer kept are the one ledger's; the shards keep none.
    let key = |g: &Gap| {
        (
            g.contract,
            g.target.clone(),
            g.gpu.clone(),
            g.start_ms,
            g.end_ms,
            g.cause,
        )
    };
    let mut theirs: Vec<Gap> = r.shards.iter().flat_map(|l| l.pending_gaps().0).collect();
    if theirs.iter().any(|g| g.cause == Cause::Short) {
        return Err("a shard kept a short gap".into());
    }
    theirs.extend(r.short_closed.iter().cloned());
    theirs.extend(r.short_open.values().cloned());
    let mut ours = r.single.pending_gaps().0;
    theirs.sort_by_key(key);
    ours.sort_by_key(key);
    if theirs != ours {
        return Err(format!("gaps: shards {theirs:?}\none ledger {ours:?}"));
    }
    Ok(r.sealed.len())
}

/// Each shard in turn is missing from each minute it has a previous minute for: its
/// partial dropped, its previous minute's capacity passed as missing (or, with a target
/// of unknown size dark then, [`Partial::unknown`] among the present).
fn check_missing(r: &Run) -> Result<usize, String> {
    let parts = by_minute(r);
    let mut checks = 0;
    for (s, _) in &r.sealed {
        let key = (s.minute, s.contract);
        let m0 = s.minute * M;
        let commit = committed(r.seed, s.contract, m0, m0 + M);
        for gone in 0..parts.len() {
            let Some(last) = parts[gone].get(&(s.minute - 1, s.contract)) else {
                continue;
            };
            let p = parts[gone][&key];
            let unknown = Partial::unknown();
            let mut present: Vec<&Partial> = (0..parts.len())
                .filter(|&i| i != gone)
                .map(|i| parts[i][&key])
                .collect();
            let alone = combine(commit, &present, 0);
            let capacity = if last.unsized_dark {
                present.push(&unknown);
                0
            } else {
                last.capacity_gpus * M
            };
            let got = combine(commit, &present, capacity);
            let t = got.totals;
            let (a, full) = (alone.totals, s.totals);
            let fail = |what: &str| {
                Err(format!(
                    "k={} shard {gone} missing, minute {} contract {}: {what}\nmissing {p:?}, last capacity {capacity}\nwith it missing {got:?}\npresent alone {alone:?}\none ledger {s:?}",
                    r.k, s.minute, s.contract
                ))
            };
            if t.committed != t.used_within() + t.idle + t.undelivered + t.unreported
                || t.idle != t.idle_unallocated + t.idle_allocated
                || Kind::ALL.iter().any(|&x| t[x] < 0)
            {
                return fail("identity");
            }
            // The present shards' evidence stands as it is; the missing one adds none.
            let same = |x: &Totals| {
                (
                    x.delivered,
                    x.used,
                    x.idle,
                    x.idle_allocated,
                    x.overage,
                    x.undelivered + x.unreported,
                )
            };
            if same(&t) != same(&a)
                || (got.allocated, &got.teams) != (alone.allocated, &alone.teams)
            {
                return fail("the present shards' figures changed");
            }
            if (t.delivered, t.used) != (full.delivered - p.delivered, full.used - p.used) {
                return fail("delivered/used is not the one ledger's less the missing shard's");
            }
            // Its capacity is unreported, up to the shortfall; or everything short is,
            // when its capacity is unknown.
            let short = t.undelivered + t.unreported;
            if t.unreported < short.min(capacity) || (last.unsized_dark && t.undelivered != 0) {
                return fail("its capacity is not unreported");
            }
            // Never undelivered: no more than the one ledger blames on the provider, but for
            // capacity the shard gained during the minute (not known at its start), or a
            // target of unknown size added in it (no capacity known at all).
            let gained = (p.expected - capacity).max(0);
            let unknown_new = p.unsized_dark && !last.unsized_dark;
            if !unknown_new && t.undelivered > full.undelivered + gained {
                return fail("its capacity went undelivered");
            }
            checks += 1;
        }
    }
    Ok(checks)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// For every minute and contract the shards' partials combined are the one ledger's
    /// sealed minute exactly, with late GPU-ms and gaps alike; a missing shard's capacity is
    /// unreported and leaves the others' figures as they are.
    #[test]
    fn the_shards_combined_are_the_one_ledger(seed in any::<u64>(), k in 1u32..=4, crashes in any::<bool>()) {
        let r = run(seed, k, crashes);
        let n = check_equal(&r);
        prop_assert!(n.is_ok(), "{}", n.unwrap_err());
        let m = check_missing(&r);
        prop_assert!(m.is_ok(), "{}", m.unwrap_err());
    }
}

/// No bias, because no error: over many fleets the signed difference of every figure
/// between the shards combined and the one ledger is 0 in every minute, so its mean is 0
/// exactly. Prints the figures.
#[test]
fn splitting_the_fleet_has_no_bias() {
    let mut n = 0usize;
    let mut sums = [0i64; 11];
    let mut abs = [0i64; 11];
    let (mut committed_ms, mut delivered_ms, mut missing) = (0i64, 0i64, 0usize);
    let mut by_k = [0usize; 5];
    // Contract-minutes dark, short, with undelivered, unreported, overage, idle_allocated,
    // two teams or more, GPUs gone with a gap; runs with late GPU-ms.
    let mut seen = [0usize; 9];
    let mut gaps = 0usize;
    for seed in 0..400u64 {
        let k = 1 + (seed % 4) as u32;
        let r = run(seed.wrapping_mul(0x2545_f491_4f6c_dd1d), k, seed % 3 == 0);
        for d in differences(&r) {
            for i in 0..11 {
                sums[i] += d[i];
                abs[i] += d[i].abs();
            }
            n += 1;
            by_k[k as usize] += 1;
        }
        for (s, short) in &r.sealed {
            committed_ms += s.totals.committed;
            delivered_ms += s.totals.delivered;
            let t = s.totals;
            for (i, on) in [
                short.is_none(),
                short.is_some_and(|x| x > 0),
                t.undelivered > 0,
                t.unreported > 0,
                t.overage > 0,
                t.idle_allocated > 0,
                s.teams.len() > 1,
            ]
            .into_iter()
            .enumerate()
            {
                seen[i] += usize::from(on);
            }
        }
        let parts = by_minute(&r);
        seen[7] += r
            .sealed
            .iter()
            .filter(|(s, _)| parts.iter().any(|p| p[&(s.minute, s.contract)].absent > 0))
            .count();
        seen[8] += usize::from(r.single.late().iter().any(|l| l.0 > 0));
        gaps += r.single.pending_gaps().0.len();
        missing += check_missing(&r).expect("a missing shard");
    }
    for (i, f) in FIELDS.iter().enumerate() {
        eprintln!(
            "{f}: shards − one ledger over {n} contract-minutes: mean {:+.6} GPU-ms, Σ|difference| {} GPU-ms",
            sums[i] as f64 / n as f64,
            abs[i]
        );
    }
    eprintln!(
        "contract-minutes by shard count k=1..4: {:?}; {:.1} GPU-h committed, {:.1} GPU-h delivered; {missing} missing-shard minutes checked",
        &by_k[1..],
        committed_ms as f64 / 3_600_000.0,
        delivered_ms as f64 / 3_600_000.0
    );
    eprintln!(
        "contract-minutes dark {}, short {}, undelivered {}, unreported {}, overage {}, idle_allocated {}, 2+ teams {}, GPUs gone with a gap {}; runs with late GPU-ms {}; gaps pending at the ends {gaps}",
        seen[0], seen[1], seen[2], seen[3], seen[4], seen[5], seen[6], seen[7], seen[8]
    );
    assert!(n > 5_000, "too few minutes compared: {n}");
    assert!(seen.iter().all(|&x| x > 0), "a case never arose: {seen:?}");
    assert_eq!(abs, [0; 11], "shards and the one ledger differ");
}

fn partial(delivered: i64, used: i64, reported: i64, expected: i64) -> Partial {
    Partial {
        delivered,
        used,
        reported,
        expected,
        watched: true,
        capacity_gpus: expected / M,
        ..Partial::default()
    }
}

fn identity(c: &Combined) {
    let t = c.totals;
    assert_eq!(
        t.committed,
        t.used_within() + t.idle + t.undelivered + t.unreported,
        "{c:?}"
    );
    assert_eq!(t.idle, t.idle_unallocated + t.idle_allocated, "{c:?}");
    assert!(Kind::ALL.iter().all(|&k| t[k] >= 0), "{c:?}");
}

/// No shard present and none known to hold capacity: nothing was watched, so the contract
/// is dark: all of the commitment unreported, nothing known short.
#[test]
fn with_no_shard_at_all_the_minute_is_dark() {
    let c = combine(3 * M, &[], 0);
    identity(&c);
    assert_eq!((c.totals.unreported, c.totals.undelivered), (3 * M, 0));
    assert_eq!((c.short, c.allocated, c.teams.len()), (None, 0, 0));
    // A negative missing capacity is none.
    assert_eq!(combine(3 * M, &[], -M), c);
}

/// Every shard missing, their capacity known: that capacity is unreported, and only a
/// commitment beyond it is undelivered (and `short`), as in one ledger whose every host
/// went silent.
#[test]
fn with_every_shard_missing_their_capacity_is_unreported() {
    let c = combine(3 * M, &[], 2 * M);
    identity(&c);
    assert_eq!(
        (
            c.totals.delivered,
            c.totals.unreported,
            c.totals.undelivered
        ),
        (0, 2 * M, M)
    );
    assert_eq!(c.short, Some(M));
    // Capacity beyond the commitment: all of it unreported, nothing short.
    let c = combine(3 * M, &[], 5 * M);
    assert_eq!((c.totals.unreported, c.totals.undelivered), (3 * M, 0));
    assert_eq!(c.short, Some(-2 * M));
}

/// One present shard with a target of unknown size dark darkens the contract for all
/// shards: any shortfall could be that target's. So does a missing shard of unknown
/// capacity ([`Partial::unknown`]), even next to known missing capacity.
#[test]
fn a_dark_target_in_any_shard_darkens_the_contract() {
    let a = partial(M, 0, M, 2 * M); // one GPU of two reported
    let dark = Partial {
        unsized_dark: true,
        ..partial(M, 0, M, M)
    };
    let c = combine(4 * M, &[&a, &dark], 0);
    identity(&c);
    assert_eq!((c.totals.unreported, c.totals.undelivered), (2 * M, 0));
    assert_eq!(c.short, None);
    let lit = combine(4 * M, &[&a, &partial(M, 0, M, M)], 0);
    assert_eq!((lit.totals.unreported, lit.totals.undelivered), (M, M));
    assert_eq!(lit.short, Some(M));
    let c = combine(4 * M, &[&a, &Partial::unknown()], M);
    assert_eq!(
        (c.totals.unreported, c.totals.undelivered, c.short),
        (3 * M, 0, None)
    );
    // No present shard watched the whole minute: dark, unless a missing one holds capacity.
    let late = Partial {
        watched: false,
        ..partial(M, 0, M, M)
    };
    assert_eq!(combine(2 * M, &[&late], 0).short, None);
    assert_eq!(combine(2 * M, &[&late], M).short, Some(0));
}

/// Overage is the contract's, from the sums: two shards each within the commitment alone
/// are over it together; the split is not the sum of the shards' splits.
#[test]
fn overage_comes_from_the_sums_across_shards() {
    let (a, b) = (partial(2 * M, 2 * M, 2 * M, 2 * M), partial(M, M, M, M));
    assert_eq!(combine(2 * M, &[&a], 0).totals.overage, 0);
    assert_eq!(combine(2 * M, &[&b], 0).totals.overage, 0);
    let c = combine(2 * M, &[&a, &b], 0);
    identity(&c);
    let t = c.totals;
    assert_eq!(
        (t.delivered, t.used, t.used_within(), t.overage, t.idle),
        (3 * M, 3 * M, 2 * M, M, 0)
    );
}

/// Held GPU-ms add across shards and split idle once, allocated first, cut at idle.
#[test]
fn held_time_adds_across_shards_and_is_cut_at_idle() {
    let a = Partial {
        held: 30_000,
        ..partial(M, 0, M, M)
    };
    let b = Partial {
        held: 20_000,
        ..partial(M, 10_000, M, M)
    };
    let c = combine(2 * M, &[&a, &b], 0);
    identity(&c);
    assert_eq!(
        (
            c.totals.idle,
            c.totals.idle_allocated,
            c.totals.idle_unallocated
        ),
        (110_000, 50_000, 60_000)
    );
    // Committed one GPU: idle is 50 s, all of it held.
    let c = combine(M, &[&a, &b], 0);
    identity(&c);
    assert_eq!(
        (
            c.totals.idle,
            c.totals.idle_allocated,
            c.totals.idle_unallocated
        ),
        (50_000, 50_000, 0)
    );
}

/// Teams sum across shards by name, sorted; allocated is their exact sum; rows that come to
/// nothing are dropped.
#[test]
fn teams_are_summed_across_shards() {
    let a = Partial {
        allocated: 13_000 + 5_000,
        teams: vec![
            ("alpha".into(), 10_000, 5_000),
            ("beta".into(), 3_000, 0),
            ("zeta".into(), 5_000, 0),
        ],
        ..partial(M, 5_000, M, M)
    };
    let b = Partial {
        allocated: 3_000 - 5_000,
        teams: vec![
            ("alpha".into(), 1_000, 1_000),
            ("gamma".into(), 2_000, 2_000),
            ("zeta".into(), -5_000, 0),
        ],
        ..partial(M, 3_000, M, M)
    };
    let c = combine(2 * M, &[&a, &b], 0);
    assert_eq!(
        c.teams,
        vec![
            ("alpha".to_string(), 11_000, 6_000),
            ("beta".to_string(), 3_000, 0),
            ("gamma".to_string(), 2_000, 2_000),
        ]
    );
    assert_eq!(c.allocated, c.teams.iter().map(|t| t.1).sum::<i64>());
}

/// The caller's part of the contract (see [`combine`]): a shard appears once. A partial
/// carries no shard identity, so the same shard given twice is counted twice; the book's
/// first-writer-wins row per shard and minute is what keeps a replica's or a retried write
/// out.
#[test]
fn a_shard_given_twice_is_counted_twice() {
    let a = Partial {
        held: 10_000,
        allocated: 20_000,
        teams: vec![("alpha".into(), 20_000, 0)],
        ..partial(M, 0, M, M)
    };
    let once = combine(3 * M, &[&a], 0);
    let twice = combine(3 * M, &[&a, &a], 0);
    assert_eq!((once.totals.delivered, twice.totals.delivered), (M, 2 * M));
    assert_eq!((once.allocated, twice.allocated), (20_000, 40_000));
    assert_eq!((once.short, twice.short), (Some(2 * M), Some(M)));
    assert_ne!(once, twice);
}

/// The one ledger keeps each contract's `short` from the capacity it knew in the minute,
/// GPUs gone with an open gap included: a GPU back within the minute counts for every
/// contract alike, whichever is sealed first (the absent spans of a minute are dropped
/// only once all its contracts are sealed).
#[test]
fn a_lost_gpu_counts_as_known_for_short_in_every_contract() {
    let reading = |t: i64, gpus: &[&str]| Reading {
        received_ms: t,
        agent_ms: Some(t),
        agent_start_ms: Some(0),
        sampled_ms: Some(t),
        gpus: gpus
            .iter()
            .map(|g| {
                (
                    g.to_string(),
                    GpuCounters {
                        observed_ms: t,
                        used_ms: 0,
                        ..GpuCounters::default()
                    },
                )
            })
            .collect(),
        owners: Default::default(),
    };
    for contract in [0, 1] {
        let mut l = Ledger::new(2, -M);
        // GPU b is gone from 20 s to 40 s: absent, known, counted by its gap.
        l.observe("h", contract, reading(0, &["a", "b"]));
        l.observe("h", contract, reading(20_000, &["a"]));
        l.observe("h", contract, reading(40_000, &["a", "b"]));
        l.observe("h", contract, reading(M, &["a", "b"]));
        let sealed = l.seal_with_short(M, 0, |_, a, b| 3 * (b - a));
        let short: Vec<Option<i64>> = sealed.iter().map(|s| s.1).collect();
        let mut want = vec![None, None];
        // Known: 2 GPUs all minute (b's 20 s gone are known by its gap); committed 3.
        want[contract] = Some(M);
        assert_eq!(short, want, "the host in contract {contract}");
    }
}

/// `close` closes the minutes `seal` would, in order, into partials that split as `seal`
/// does; it keeps no `short` gap (the sealer's); what arrives for a closed minute is late.
#[test]
fn close_closes_what_seal_would_and_later_data_is_late() {
    let reading = |t: i64| Reading {
        received_ms: t,
        agent_ms: Some(t),
        agent_start_ms: Some(0),
        sampled_ms: Some(t),
        gpus: [(
            "g".to_string(),
            GpuCounters {
                observed_ms: t,
                used_ms: t / 2,
                ..GpuCounters::default()
            },
        )]
        .into(),
        owners: Default::default(),
    };
    let mut closing = Ledger::new(1, -M);
    closing.configure(0, &[("h".into(), vec![0])], |_, _| i64::MAX);
    closing.observe("h", 0, reading(0));
    let mut sealing = closing.clone();
    let commit = |_: usize, a: i64, b: i64| 2 * (b - a);
    let sealed = sealing.seal(2 * M + 5_000, 5_000, commit);
    let closed = closing.close(2 * M + 5_000, 5_000);
    assert_eq!(
        closed
            .iter()
            .map(|c| (c.minute, c.contract))
            .collect::<Vec<_>>(),
        vec![(0, 0), (1, 0)]
    );
    assert_eq!(closing.sealed_through(), 2);
    for (c, s) in closed.iter().zip(&sealed) {
        // One GPU known, silent since its reading at 0: expected, not watched.
        let want = Partial {
            expected: M,
            watched: true,
            capacity_gpus: 1,
            ..Partial::default()
        };
        assert_eq!(c.partial, want);
        let got = combine(
            commit(0, c.minute * M, (c.minute + 1) * M),
            &[&c.partial],
            0,
        );
        assert_eq!((got.totals, got.short), (s.totals, Some(M)));
        assert_eq!((got.totals.unreported, got.totals.undelivered), (M, M));
    }
    let short = |l: &Ledger| {
        let gaps = l.pending_gaps().0;
        gaps.iter().filter(|g| g.cause == Cause::Short).count()
    };
    assert_eq!((short(&sealing), short(&closing)), (1, 0));
    // The host's counters for both closed minutes arrive: late, as after `seal`.
    for l in [&mut closing, &mut sealing] {
        l.observe("h", 0, reading(2 * M));
        assert_eq!(l.late(), &[(2 * M, M)]);
    }
}
