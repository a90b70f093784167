//! Pure per-GPU accounting: turns successive NVML readings into monotonic counters.
//!
//! No I/O, no clocks: every function takes the monotonic time of a reading as a
//! [`Duration`] since an arbitrary origin, so tests can replay any schedule.
//!
//! Rules, in the words of the product:
//! - The interval between two consecutive *healthy* readings of a GPU is *observed*
//!   (delivered) time. A lost reading, an NVML outage or a gap longer than
//!   `max_gap` breaks the chain: the next healthy reading only sets a new baseline,
//!   so nothing unseen is ever claimed as delivered.
//! - *Busy* time is the observed interval times the busy fraction of that interval
//!   (from the driver's sample buffer, else from utilization rates), so
//!   `busy <= observed` always holds.
//! - *Allocated* time is observed time during which at least one compute process ran.
//! - *Energy* follows the driver's millijoule counter; a decrease is a counter reset
//!   (driver reload) and, as Prometheus does for counters, the new value counts from 0.

use std::time::Duration;

/// How busy a GPU was over the interval that ends at a reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Busy {
    /// Fraction in `[0, 1]` derived from the driver's utilization sample buffer.
    Samples(f64),
    /// Fraction in `[0, 1]` from `nvmlDeviceGetUtilizationRates` (the last 1/6–1 s only).
    Rates(f64),
    /// Neither source answered: busy time is not accrued for this interval.
    Unknown,
}

impl Busy {
    fn fraction(self) -> Option<f64> {
        match self {
            Busy::Samples(f) | Busy::Rates(f) => Some(clamp_fraction(f)),
            Busy::Unknown => None,
        }
    }
}

/// One reading of a GPU that answered NVML.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub busy: Busy,
    /// Compute processes running now; `None` when the driver cannot say.
    pub processes: Option<u32>,
    /// The driver's total-energy counter in millijoules; `None` when unsupported.
    pub energy_mj: Option<u64>,
}

/// What the accounting learned from one reading.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Increment {
    pub observed_s: f64,
    pub busy_s: f64,
    pub allocated_s: f64,
    pub energy_j: f64,
}

/// Running counters of one GPU, identified by UUID elsewhere.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuAccount {
    pub observed_s: f64,
    pub busy_s: f64,
    pub allocated_s: f64,
    pub energy_j: f64,
    /// Monotonic time of the last healthy reading in an unbroken chain.
    last_healthy: Option<Duration>,
    /// Last energy counter value seen, kept across breaks: the driver counter keeps
    /// counting while we are not looking, and that energy was really spent.
    energy_baseline_mj: Option<u64>,
}

impl GpuAccount {
    /// Applies a healthy reading taken at `at`. Gaps longer than `max_gap` (a stalled
    /// sampler, a suspended host) are not counted as observed.
    pub fn healthy(&mut self, at: Duration, reading: &Reading, max_gap: Duration) -> Increment {
        let mut inc = Increment::default();
        if let Some(prev) = self.last_healthy {
            let elapsed = at.saturating_sub(prev);
            if elapsed <= max_gap {
                let secs = elapsed.as_secs_f64();
                inc.observed_s = secs;
                if let Some(f) = reading.busy.fraction() {
                    inc.busy_s = f * secs;
                }
                if reading.processes.is_some_and(|n| n > 0) {
                    inc.allocated_s = secs;
                }
            }
        }
        if let Some(now_mj) = reading.energy_mj {
            inc.energy_j = match self.energy_baseline_mj {
                Some(base) if now_mj >= base => (now_mj - base) as f64 / 1000.0,
                // Counter reset: the driver restarted from 0.
                Some(_) => now_mj as f64 / 1000.0,
                None => 0.0,
            };
            self.energy_baseline_mj = Some(now_mj);
        }
        self.last_healthy = Some(at);
        self.observed_s += inc.observed_s;
        self.busy_s += inc.busy_s;
        self.allocated_s += inc.allocated_s;
        self.energy_j += inc.energy_j;
        inc
    }

    /// The GPU did not answer (lost, or NVML down): the interval ending now is not
    /// observed, and the next healthy reading starts a new chain.
    pub fn interrupted(&mut self) {
        self.last_healthy = None;
    }

    /// Whether the next healthy reading will accrue time.
    pub fn is_chained(&self) -> bool {
        self.last_healthy.is_some()
    }
}

/// A utilization sample from the driver's ring buffer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Driver timestamp in microseconds: only a cursor and a source of deltas.
    pub timestamp_us: u64,
    /// Percent busy over the sample period ending at `timestamp_us`.
    pub percent: f64,
}

/// Integrates the samples newer than `cursor` into a busy fraction.
///
/// Each sample covers the time since the one before it (the first since `cursor`),
/// so the fraction is the time-weighted mean of the samples. Returns the fraction
/// (`None` when there is nothing to weigh) and the new cursor. Samples at or before
/// the cursor are ignored, so a reading can never be counted twice.
pub fn busy_fraction(cursor: Option<u64>, samples: &[Sample]) -> (Option<f64>, Option<u64>) {
    let mut sorted: Vec<Sample> = samples
        .iter()
        .copied()
        .filter(|s| cursor.is_none_or(|c| s.timestamp_us > c))
        .collect();
    sorted.sort_by_key(|s| s.timestamp_us);
    sorted.dedup_by_key(|s| s.timestamp_us);
    let new_cursor = sorted.last().map(|s| s.timestamp_us).or(cursor);
    let mut prev = cursor;
    let (mut weight, mut busy) = (0u128, 0f64);
    for s in &sorted {
        if let Some(p) = prev {
            let dt = s.timestamp_us - p;
            weight += u128::from(dt);
            busy += dt as f64 * clamp_fraction(s.percent / 100.0);
        }
        prev = Some(s.timestamp_us);
    }
    let fraction = if weight > 0 {
        Some(clamp_fraction(busy / weight as f64))
    } else if cursor.is_none() && !sorted.is_empty() {
        // No cursor yet: weigh the samples equally (only a first reading does this,
        // and a first reading accrues no time anyway).
        Some(clamp_fraction(
            sorted.iter().map(|s| s.percent / 100.0).sum::<f64>() / sorted.len() as f64,
        ))
    } else {
        None
    };
    (fraction, new_cursor)
}

fn clamp_fraction(f: f64) -> f64 {
    if f.is_nan() {
        0.0
    } else {
        f.clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GAP: Duration = Duration::from_secs(5);

    fn reading(busy: f64, processes: u32, energy_mj: u64) -> Reading {
        Reading {
            busy: Busy::Samples(busy),
            processes: Some(processes),
            energy_mj: Some(energy_mj),
        }
    }

    fn s(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn first_reading_sets_a_baseline_only() {
        let mut a = GpuAccount::default();
        assert_eq!(
            a.healthy(s(0), &reading(1.0, 1, 5000), GAP),
            Increment::default()
        );
        let inc = a.healthy(s(1000), &reading(0.5, 1, 7000), GAP);
        assert_eq!(inc.observed_s, 1.0);
        assert_eq!(inc.busy_s, 0.5);
        assert_eq!(inc.allocated_s, 1.0);
        assert_eq!(inc.energy_j, 2.0);
    }

    #[test]
    fn lost_interval_is_not_observed_but_energy_is_kept() {
        let mut a = GpuAccount::default();
        a.healthy(s(0), &reading(1.0, 1, 0), GAP);
        a.healthy(s(1000), &reading(1.0, 1, 1000), GAP);
        a.interrupted();
        let inc = a.healthy(s(3000), &reading(1.0, 0, 4000), GAP);
        assert_eq!(inc.observed_s, 0.0);
        assert_eq!(inc.energy_j, 3.0);
        a.healthy(s(4000), &reading(0.0, 0, 5000), GAP);
        assert_eq!((a.observed_s, a.busy_s, a.allocated_s), (2.0, 1.0, 1.0));
    }

    #[test]
    fn energy_counter_reset_counts_from_zero() {
        let mut a = GpuAccount::default();
        a.healthy(s(0), &reading(0.0, 0, 10_000), GAP);
        let inc = a.healthy(s(1000), &reading(0.0, 0, 300), GAP);
        assert_eq!(inc.energy_j, 0.3);
    }

    #[test]
    fn a_gap_longer_than_max_gap_is_not_observed() {
        let mut a = GpuAccount::default();
        a.healthy(s(0), &reading(1.0, 1, 0), GAP);
        let inc = a.healthy(s(6000), &reading(1.0, 1, 0), GAP);
        assert_eq!(inc.observed_s, 0.0);
        assert_eq!(a.healthy(s(7000), &reading(1.0, 1, 0), GAP).observed_s, 1.0);
    }

    #[test]
    fn unknown_busy_and_processes_accrue_observed_only() {
        let mut a = GpuAccount::default();
        let r = Reading {
            busy: Busy::Unknown,
            processes: None,
            energy_mj: None,
        };
        a.healthy(s(0), &r, GAP);
        let inc = a.healthy(s(1000), &r, GAP);
        assert_eq!(
            inc,
            Increment {
                observed_s: 1.0,
                ..Increment::default()
            }
        );
    }

    #[test]
    fn samples_are_weighted_by_the_time_they_cover() {
        let samples = [
            Sample {
                timestamp_us: 1_100,
                percent: 100.0,
            },
            Sample {
                timestamp_us: 1_400,
                percent: 0.0,
            },
        ];
        // 100 µs at 100 %, then 300 µs at 0 %.
        let (f, c) = busy_fraction(Some(1_000), &samples);
        assert_eq!(f, Some(0.25));
        assert_eq!(c, Some(1_400));
        // Re-reading the same buffer adds nothing and keeps the cursor.
        assert_eq!(busy_fraction(c, &samples), (None, Some(1_400)));
    }

    fn arb_samples() -> impl Strategy<Value = Vec<(u64, u8)>> {
        prop::collection::vec((1u64..1_000_000, 0u8..=100), 0..50)
    }

    proptest! {
        /// However the driver's samples are split across polls, the integrated busy
        /// time (fraction × covered time) is the same: nothing lost, nothing twice.
        #[test]
        fn splitting_polls_never_loses_or_repeats_samples(
            steps in arb_samples(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..5),
        ) {
            let mut t = 10u64;
            let all: Vec<Sample> = steps.iter().map(|&(dt, p)| {
                t += dt;
                Sample { timestamp_us: t, percent: f64::from(p) }
            }).collect();
            let whole: f64 = {
                let (f, _) = busy_fraction(Some(10), &all);
                f.unwrap_or(0.0) * (t - 10) as f64
            };
            let mut ends: Vec<usize> = cuts.iter().map(|i| i.index(all.len() + 1)).collect();
            ends.push(all.len());
            ends.sort();
            let mut cursor = Some(10u64);
            let mut split = 0.0;
            for end in ends {
                // Each poll sees the whole ring up to `end`, old samples included.
                let (f, c) = busy_fraction(cursor, &all[..end]);
                let covered = c.unwrap() - cursor.unwrap();
                split += f.unwrap_or(0.0) * covered as f64;
                cursor = c;
            }
            prop_assert!((whole - split).abs() <= 1e-6 * (1.0 + whole.abs()), "{whole} vs {split}");
        }

        /// For any sequence of readings, breaks and gaps: counters only grow,
        /// busy and allocated never exceed observed, and observed never exceeds
        /// the wall time spanned.
        #[test]
        fn counters_are_monotonic_and_bounded(
            events in prop::collection::vec(
                (0u64..3000, prop::option::of((0.0f64..=1.0, 0u32..3, 0u64..10_000))), 1..100)
        ) {
            let mut a = GpuAccount::default();
            let mut now = 0u64;
            let mut energy = 0u64;
            for (dt, ev) in events {
                now += dt;
                let before = a.clone();
                match ev {
                    Some((busy, procs, de)) => {
                        energy += de;
                        a.healthy(s(now), &reading(busy, procs, energy), GAP);
                    }
                    None => a.interrupted(),
                }
                prop_assert!(a.observed_s >= before.observed_s);
                prop_assert!(a.busy_s >= before.busy_s);
                prop_assert!(a.allocated_s >= before.allocated_s);
                prop_assert!(a.energy_j >= before.energy_j);
                prop_assert!(a.busy_s <= a.observed_s + 1e-9);
                prop_assert!(a.allocated_s <= a.observed_s + 1e-9);
                prop_assert!(a.observed_s <= now as f64 / 1000.0 + 1e-9);
            }
            // A monotonic energy counter is reproduced exactly (first value is the baseline).
            prop_assert!(a.energy_j <= energy as f64 / 1000.0 + 1e-9);
        }
    }
}
