//! The simulated fleet behind `commitmeter demo`: hosts of GPUs whose counters are
//! integrated over simulated time. Pure (no I/O, no clocks): the demo feeds it the
//! simulated time, then exports its counters through the agent's real metrics code.

use std::f64::consts::PI;

const HOUR_MS: i64 = 3_600_000;
/// Integration step: fine enough for diurnal curves, cheap for 512 GPUs.
const STEP_MS: i64 = 10_000;

/// Which story the fleet tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Story {
    /// Diurnal load, a crashed job leaving GPUs idle, a host down, lost GPUs, ramp steps.
    Default,
    /// Every GPU busy at 97 %, everything delivered and reported: no alert should fire.
    Healthy,
    /// Every GPU busy at 10 %: the underuse burn-rate pages should fire.
    Underuse,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SimGpu {
    pub uuid: String,
    pub model: &'static str,
    pub observed_s: f64,
    pub busy_s: f64,
    pub allocated_s: f64,
    pub energy_j: f64,
    pub utilization: f64,
    pub up: bool,
    /// XID events so far: (code, count).
    pub xids: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SimHost {
    pub name: String,
    pub provider: &'static str,
    pub cluster: &'static str,
    pub gpus: Vec<SimGpu>,
    /// False while the host's agent cannot be reached.
    pub reachable: bool,
}

/// A contract of the demo, in the aggregator's config words.
#[derive(Debug, Clone, PartialEq)]
pub struct SimContract {
    pub id: &'static str,
    pub provider: &'static str,
    pub cluster: &'static str,
    pub price_per_gpu_hour: f64,
    pub target: f64,
    pub timezone: &'static str,
    /// (hours after the simulation start, committed GPUs).
    pub ramp: Vec<(i64, u64)>,
}

#[derive(Debug, Clone)]
pub struct Fleet {
    pub story: Story,
    pub start_ms: i64,
    pub t_ms: i64,
    pub hosts: Vec<SimHost>,
}

/// (provider, cluster, hosts, model)
const LAYOUT: [(&str, &str, usize, &str); 3] = [
    ("acme-cloud", "east", 24, "NVIDIA H100 80GB HBM3"),
    ("acme-cloud", "west", 16, "NVIDIA H100 80GB HBM3"),
    ("borealis", "nord", 24, "NVIDIA H200"),
];

impl Fleet {
    /// 64 hosts × 8 GPUs over two providers, starting at `start_ms`.
    pub fn new(story: Story, start_ms: i64) -> Self {
        let mut hosts = Vec::new();
        for (provider, cluster, n, model) in LAYOUT {
            for h in 0..n {
                let name = format!("{provider}-{cluster}-{h:02}");
                let gpus = (0..8)
                    .map(|g| SimGpu {
                        uuid: format!("GPU-{:08x}-{g}", fnv(&name)),
                        model,
                        observed_s: 0.0,
                        busy_s: 0.0,
                        allocated_s: 0.0,
                        energy_j: 0.0,
                        utilization: 0.0,
                        up: true,
                        xids: Vec::new(),
                    })
                    .collect();
                hosts.push(SimHost {
                    name,
                    provider,
                    cluster,
                    gpus,
                    reachable: true,
                });
            }
        }
        Self {
            story,
            start_ms,
            t_ms: start_ms,
            hosts,
        }
    }

    /// The contracts that go with the fleet: one per cluster.
    pub fn contracts(&self) -> Vec<SimContract> {
        let healthy = self.story == Story::Healthy;
        vec![
            SimContract {
                id: "acme-h100-east",
                provider: "acme-cloud",
                cluster: "east",
                price_per_gpu_hour: 2.10,
                target: 0.95,
                timezone: "America/New_York",
                // 192 GPUs on the floor; the ramp to 200 outruns delivery.
                ramp: if healthy {
                    vec![(0, 160), (3, 192)]
                } else {
                    vec![(0, 160), (3, 200)]
                },
            },
            SimContract {
                id: "acme-h100-west",
                provider: "acme-cloud",
                cluster: "west",
                price_per_gpu_hour: 2.10,
                target: 0.95,
                timezone: "America/Los_Angeles",
                ramp: vec![(0, 120), (5, 128)],
            },
            SimContract {
                id: "borealis-h200",
                provider: "borealis",
                cluster: "nord",
                price_per_gpu_hour: 3.40,
                // A looser target: the fast underuse page cannot fire for it (shown
                // on the status page); the healthy story keeps every tier reachable.
                target: if healthy { 0.95 } else { 0.90 },
                timezone: "Europe/Berlin",
                ramp: vec![(0, 176), (4, 192)],
            },
        ]
    }

    /// Integrates every GPU's counters up to `to_ms` (simulated time).
    pub fn advance(&mut self, to_ms: i64) {
        while self.t_ms < to_ms {
            let dt_ms = STEP_MS.min(to_ms - self.t_ms);
            let mid = self.t_ms + dt_ms / 2;
            let dt = dt_ms as f64 / 1000.0;
            let elapsed = mid - self.start_ms;
            let story = self.story;
            for (h, host) in self.hosts.iter_mut().enumerate() {
                host.reachable = reachable(story, &host.name, elapsed);
                for (g, gpu) in host.gpus.iter_mut().enumerate() {
                    let present = present(story, &host.name, g, elapsed);
                    if present && !gpu.up {
                        gpu.up = true;
                    }
                    if !present {
                        if gpu.up {
                            gpu.up = false;
                            // A GPU falling off the bus shows as XID 79 first.
                            bump(&mut gpu.xids, 79);
                        }
                        continue;
                    }
                    let u = utilization(story, h, &host.name, g, elapsed);
                    gpu.utilization = u;
                    gpu.observed_s += dt;
                    gpu.busy_s += u * dt;
                    if u > 0.02 {
                        gpu.allocated_s += dt;
                    }
                    gpu.energy_j += (90.0 + 610.0 * u) * dt;
                }
            }
            self.t_ms += dt_ms;
        }
    }
}

fn bump(xids: &mut Vec<(u64, u64)>, code: u64) {
    match xids.iter_mut().find(|(c, _)| *c == code) {
        Some((_, n)) => *n += 1,
        None => xids.push((code, 1)),
    }
}

/// Busy fraction of one GPU at `elapsed` ms after the start.
fn utilization(story: Story, host_index: usize, host: &str, gpu: usize, elapsed: i64) -> f64 {
    match story {
        Story::Healthy => 0.97,
        Story::Underuse => 0.10,
        Story::Default => {
            // Training runs near saturation with a diurnal dip from inference shifts.
            let day = 2.0 * PI * (elapsed as f64 / (24.0 * HOUR_MS as f64));
            let jitter = ((host_index * 8 + gpu) % 7) as f64 * 0.01;
            let base = 0.86 + 0.08 * day.sin() - jitter;
            // A job on four borealis hosts crashes after 1 h and leaves its GPUs idle.
            let crashed = host.starts_with("borealis-nord-0")
                && host < "borealis-nord-04"
                && elapsed >= HOUR_MS;
            if crashed {
                0.0
            } else {
                base.clamp(0.0, 1.0)
            }
        }
    }
}

/// Whether the host's agent answers: acme-cloud-west-03 is down from 1.5 h to 4 h.
fn reachable(story: Story, host: &str, elapsed: i64) -> bool {
    !(story == Story::Default
        && host == "acme-cloud-west-03"
        && (3 * HOUR_MS / 2..4 * HOUR_MS).contains(&elapsed))
}

/// Whether a GPU is on the bus: GPU 5 of acme-cloud-west-07 is lost after 2 h,
/// GPU 2 of borealis-nord-10 after 2.5 h.
fn present(story: Story, host: &str, gpu: usize, elapsed: i64) -> bool {
    let lost = (host == "acme-cloud-west-07" && gpu == 5 && elapsed >= 2 * HOUR_MS)
        || (host == "borealis-nord-10" && gpu == 2 && elapsed >= 5 * HOUR_MS / 2);
    !(story == Story::Default && lost)
}

fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x01000193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_story_has_idle_a_lost_gpu_and_a_host_down() {
        let mut f = Fleet::new(Story::Default, 0);
        assert_eq!(f.hosts.len(), 64);
        f.advance(5 * HOUR_MS);
        let host = |n: &str| f.hosts.iter().find(|h| h.name == n).unwrap();
        let lost = &host("acme-cloud-west-07").gpus[5];
        assert!(!lost.up);
        assert!((lost.observed_s - 7200.0).abs() < 1e-6);
        assert_eq!(lost.xids, vec![(79, 1)]);
        // The crashed job's GPUs were busy for the first hour only.
        let crashed = &host("borealis-nord-01").gpus[0];
        assert!(crashed.busy_s < 3600.0 && crashed.observed_s > 17_000.0);
        assert!(host("acme-cloud-west-03").reachable);
        f.advance(2 * HOUR_MS + 10_000_000);
        assert!(f.hosts.iter().any(|h| !h.reachable) || f.t_ms > 4 * HOUR_MS);
        // Busy never exceeds observed, anywhere.
        for h in &f.hosts {
            for g in &h.gpus {
                assert!(g.busy_s <= g.observed_s + 1e-9 && g.allocated_s <= g.observed_s + 1e-9);
            }
        }
    }

    #[test]
    fn stories_differ_only_in_load_and_faults() {
        let mut healthy = Fleet::new(Story::Healthy, 0);
        healthy.advance(HOUR_MS);
        let g = &healthy.hosts[0].gpus[0];
        assert!((g.busy_s / g.observed_s - 0.97).abs() < 1e-9);
        assert!(healthy
            .hosts
            .iter()
            .all(|h| h.reachable && h.gpus.iter().all(|g| g.up)));
    }
}
