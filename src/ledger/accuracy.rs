//! Accuracy of agent → ledger against an independent truth, under real timing.
//!
//! Simulated agents keep their counters with the real agent accrual
//! ([`crate::agent::accrue::GpuAccount`]): rounds about once a second with jitter, round
//! instants in whole ms, a wall clock off by up to ±2 s, restarts with a gap. A simulated
//! aggregator scrapes them every 15 s from a random phase, with jitter, transfer delays and
//! dropped scrapes, converts the exposed seconds as the scraper does, and feeds the real
//! ledger. The truth is the scenario itself: a fleet fully delivered and fully used, or
//! one short of the commitment by exactly `k` GPUs. No ledger rule is used to judge it.
//!
//! `cargo test --release --lib ledger::accuracy -- --nocapture` prints the figures
//! recorded in the README.

use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::agent::accrue::{Activity, Busy, GpuAccount, Reading as AgentReading};

const DAY_MS: i64 = 86_400_000;
const SCRAPE_MS: i64 = 15_000;
const GRACE_MS: i64 = 60_000;
const MAX_GAP: Duration = Duration::from_secs(5);

/// One simulated host: an agent process (restarted now and then) on GPUs that are always
/// present and always busy.
struct SimAgent {
    gpus: usize,
    /// The host's wall clock minus true time.
    offset_ms: i64,
    /// True time the current process started; its first round comes `init_ms` later.
    start_ms: i64,
    init_ms: i64,
    /// True time of the next round.
    next_round_ms: i64,
    /// Counters of one GPU (all GPUs of the host are alike) and of the sampler.
    gpu: GpuAccount,
    sampled: GpuAccount,
    /// Agent time of the last completed round.
    round_ms: Option<i64>,
    /// (true time it dies, how long it stays down, init time of the new process).
    restarts: Vec<(i64, i64, i64)>,
    /// True time of the last round a scrape read: a dying process takes the rounds since
    /// with it.
    read_ms: i64,
    /// True time no reading can account for: from the last round read before a death to
    /// the new process's first round (the restart gap).
    unread_ms: i64,
}

impl SimAgent {
    fn new(gpus: usize, offset_ms: i64, start_ms: i64, restarts: Vec<(i64, i64, i64)>) -> Self {
        Self {
            gpus,
            offset_ms,
            start_ms,
            init_ms: 250,
            next_round_ms: start_ms + 250,
            gpu: GpuAccount::default(),
            sampled: GpuAccount::default(),
            round_ms: None,
            restarts,
            read_ms: start_ms,
            unread_ms: 0,
        }
    }

    /// Runs rounds up to true time `t_ms`; `jitter(i)` gives each round's lateness.
    fn advance(&mut self, t_ms: i64, jitter: &mut impl FnMut() -> i64) {
        let busy = AgentReading {
            busy: Busy::Samples(1.0),
            processes: Some(1),
            energy_mj: None,
            activity: Activity::Unsupported,
        };
        while self.next_round_ms <= t_ms {
            if let Some(&(dies, down, init)) = self.restarts.first() {
                if self.next_round_ms >= dies {
                    // The process dies; a new one starts `down` later with fresh counters.
                    self.restarts.remove(0);
                    self.start_ms = dies + down;
                    self.init_ms = init;
                    self.next_round_ms = self.start_ms + init;
                    self.unread_ms += self.next_round_ms - self.read_ms;
                    self.gpu = GpuAccount::default();
                    self.sampled = GpuAccount::default();
                    self.round_ms = None;
                    continue;
                }
            }
            let at = Duration::from_millis((self.next_round_ms - self.start_ms) as u64);
            self.gpu.healthy(at, &busy, MAX_GAP);
            self.sampled.healthy(at, &busy, MAX_GAP);
            self.round_ms = Some(self.next_round_ms + self.offset_ms);
            self.next_round_ms += 1000 + jitter();
        }
    }

    /// What a scrape reads, as the scraper converts the exposed seconds. `bare`: an
    /// exporter with the GPU counters only (an agent older than its round time).
    fn reading(&mut self, received_ms: i64, bare: bool) -> Reading {
        if let Some(r) = self.round_ms {
            self.read_ms = r - self.offset_ms;
        }
        let ms = host::ms_from_seconds;
        let gpu = GpuCounters {
            observed_ms: ms(self.gpu.observed_s),
            used_ms: ms(self.gpu.busy_s),
            ..Default::default()
        };
        if bare {
            return Reading {
                received_ms,
                gpus: (0..self.gpus).map(|g| (format!("GPU-{g}"), gpu)).collect(),
                ..Reading::default()
            };
        }
        Reading {
            received_ms,
            agent_ms: self.round_ms,
            agent_start_ms: Some(self.start_ms + self.offset_ms),
            sampled_ms: self.round_ms.map(|_| ms(self.sampled.observed_s)),
            gpus: if self.round_ms.is_some() {
                (0..self.gpus).map(|g| (format!("GPU-{g}"), gpu)).collect()
            } else {
                BTreeMap::new()
            },
            owners: Default::default(),
        }
    }
}

/// A host: GPUs, clock offset (ms), restarts as (share of the run in ‰, down ms, init ms).
type SimHost = (usize, i64, Vec<(u16, i64, i64)>);

#[derive(Debug, Clone)]
struct Timing {
    hosts: Vec<SimHost>,
    phase_ms: i64,
    seed: u64,
}

fn timing() -> impl Strategy<Value = Timing> {
    (
        prop::collection::vec(
            (
                1usize..=8,
                -2_000i64..=2_000,
                prop::collection::vec((1u16..990, 500i64..20_000, 50i64..2_000), 0..3),
            ),
            1..=4,
        ),
        0i64..SCRAPE_MS,
        any::<u64>(),
    )
        .prop_map(|(hosts, phase_ms, seed)| Timing {
            hosts,
            phase_ms,
            seed,
        })
}

/// A small deterministic generator (xorshift), so a failing case replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo + 1) as u64) as i64
    }
}

/// Sums of the sealed minutes, and the restart gaps (GPU-ms), over `days`.
struct Run {
    totals: Totals,
    unread: i64,
    minutes: i64,
}

fn simulate(t: &Timing, days: i64, short_by: i64, bare: bool) -> Run {
    let mut rng = Rng(t.seed | 1);
    // Agents start a little before the aggregator's first scrape, at different times.
    let mut agents: Vec<SimAgent> = t
        .hosts
        .iter()
        .enumerate()
        .map(|(h, (gpus, offset, restarts))| {
            // Restarts spread over the run, at least six minutes apart (no suspicion).
            let mut at: Vec<(i64, i64, i64)> = restarts
                .iter()
                .map(|&(pm, down, init)| (i64::from(pm) * days * DAY_MS / 1000, down, init))
                .collect();
            at.sort();
            at.dedup_by(|b, a| b.0 - a.0 < 360_000);
            SimAgent::new(*gpus, *offset, -5_000 - 700 * h as i64, at)
        })
        .collect();
    let fleet: i64 = agents.iter().map(|a| a.gpus as i64).sum();
    let committed = fleet + short_by;
    let mut ledger = Ledger::new(1, 0);
    let targets: Vec<(String, Vec<usize>)> = (0..agents.len())
        .map(|h| (format!("h{h}"), vec![0]))
        .collect();
    ledger.configure(0, &targets, |_, _| i64::MAX);
    let mut totals = Totals::default();
    let mut minutes = 0;
    let end = days * DAY_MS;
    let mut k = 0;
    loop {
        let sent = t.phase_ms + k * SCRAPE_MS + rng.range(-200, 200);
        if sent > end {
            break;
        }
        for (h, agent) in agents.iter_mut().enumerate() {
            if rng.range(0, 99) < 2 {
                continue; // a dropped scrape (timeout): the next one carries its counters
            }
            let arrives = sent + rng.range(1, 30);
            agent.advance(arrives, &mut || rng.range(-40, 60));
            let received = arrives + rng.range(1, 30);
            let reading = agent.reading(received, bare);
            ledger.observe(&format!("h{h}"), 0, reading);
        }
        let now = sent + 100;
        if k == 0 {
            ledger.start_after(now);
        }
        for s in ledger.seal(now, GRACE_MS, |_, a, b| committed * (b - a)) {
            totals.add(&s.totals);
            minutes += 1;
        }
        k += 1;
    }
    let unread = agents.iter().map(|a| a.unread_ms * a.gpus as i64).sum();
    Run {
        totals,
        unread,
        minutes,
    }
}

fn share(part: i64, of: i64) -> f64 {
    part as f64 / of as f64
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4, ..ProptestConfig::default() })]

    /// A week of a fully delivered, fully used fleet: no phantom undelivered, no phantom
    /// overage; only the restart gaps (from the last round read to the new process's first
    /// round) are unreported, to the millisecond.
    #[test]
    fn a_full_fleet_shows_no_phantom_shortfall_or_overage(t in timing()) {
        let r = simulate(&t, 7, 0, false);
        let c = r.totals.committed;
        prop_assert!(r.minutes >= 7 * 1440 - 10);
        let (undelivered, overage) = (share(r.totals.undelivered, c), share(r.totals.overage, c));
        eprintln!(
            "full fleet, {} GPUs, {} minutes: phantom undelivered {:.7}%, phantom overage {:.7}%, unreported {} GPU-ms, restart gaps {} GPU-ms",
            c / (r.minutes * MINUTE_MS), r.minutes, undelivered * 100.0, overage * 100.0, r.totals.unreported, r.unread
        );
        prop_assert!(undelivered <= 1e-5, "phantom undelivered {}", undelivered);
        prop_assert!(overage <= 1e-5, "phantom overage {}", overage);
        prop_assert_eq!(r.totals.unreported, r.unread);
        prop_assert_eq!(r.totals.delivered, c - r.totals.unreported - r.totals.undelivered);
    }

    /// The same fleet, committed `k` GPUs more than it has: undelivered is exactly `k`
    /// GPUs over every sealed minute.
    #[test]
    fn a_fleet_short_by_k_gpus_is_undelivered_exactly(t in timing(), k in 1i64..=3) {
        let r = simulate(&t, 7, k, false);
        let c = r.totals.committed;
        let want = k * r.minutes * MINUTE_MS;
        let error = share((r.totals.undelivered - want).abs(), c);
        eprintln!(
            "short by {k}: undelivered {} GPU-ms, truth {want}, error {:.7}% of committed",
            r.totals.undelivered, error * 100.0
        );
        prop_assert!(error <= 1e-5, "undelivered {} vs {}", r.totals.undelivered, want);
        prop_assert_eq!(r.totals.overage, 0);
    }

    /// The same week from an exporter without round time, placed on receive times: the
    /// jitter no longer cancels exactly, but carrying each host's surplus keeps it from
    /// turning into phantom overage, and bounds the phantom shortfall.
    #[test]
    fn without_agent_time_the_carry_bounds_the_jitter(t in timing()) {
        let t = Timing { hosts: t.hosts.into_iter().map(|(g, o, _)| (g, o, Vec::new())).collect(), ..t };
        let r = simulate(&t, 7, 0, true);
        let c = r.totals.committed;
        let (undelivered, overage) = (share(r.totals.undelivered, c), share(r.totals.overage, c));
        eprintln!(
            "no agent time, {} GPUs: phantom undelivered {:.7}%, phantom overage {:.7}%",
            c / (r.minutes * MINUTE_MS), undelivered * 100.0, overage * 100.0
        );
        prop_assert_eq!(r.totals.overage, 0);
        prop_assert!(undelivered <= 1e-5, "phantom undelivered {}", undelivered);
    }
}
