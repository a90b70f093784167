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
    /// Diurnal load, a crashed job leaving GPUs idle (unallocated), a job holding GPUs it
    /// does not use (allocated idle), a stuck GPU (busy, SMs idle) under a contract that
    /// counts SM activity, hosts between jobs, a host down, lost GPUs, ramp steps.
    Default,
    /// Every GPU busy at 97 % with its SMs at work, everything delivered and reported: no
    /// alert should fire.
    Healthy,
    /// Every GPU held by a job and busy at 10 %: the underuse burn-rate pages should fire.
    Underuse,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SimGpu {
    pub uuid: String,
    pub model: &'static str,
    /// Whether the GPU has GPM (Hopper and newer): only then does its agent export SM and
    /// tensor activity.
    pub gpm: bool,
    pub observed_s: f64,
    pub busy_s: f64,
    pub allocated_s: f64,
    /// Busy seconds while a compute process held the GPU.
    pub allocated_busy_s: f64,
    /// SM activity (share of SMs at work, GPM's SM_UTIL / 100) over observed time; tracked
    /// for every GPU, exported only where `gpm`.
    pub sm_active_s: f64,
    pub tensor_active_s: f64,
    /// SM-active seconds while a compute process held the GPU.
    pub allocated_sm_active_s: f64,
    pub energy_j: f64,
    pub utilization: f64,
    /// Power draw now, in watts.
    pub power_w: f64,
    /// Whether a compute process holds the GPU now.
    pub allocated: bool,
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
    /// The contract's `usage_signal`: `busy`, `allocated` or `sm_active`.
    pub usage_signal: &'static str,
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

/// (provider, cluster, hosts, model). The lab's own A100 hosts are under no contract.
const LAYOUT: [(&str, &str, usize, &str); 4] = [
    ("acme-cloud", "east", 24, "NVIDIA H100 80GB HBM3"),
    ("acme-cloud", "west", 16, "NVIDIA H100 80GB HBM3"),
    ("borealis", "nord", 24, "NVIDIA H200"),
    ("lab", "onprem", 4, "NVIDIA A100-SXM4-80GB"),
];

/// Whether a model has GPM (SM and tensor activity): Hopper and newer.
fn has_gpm(model: &str) -> bool {
    !model.contains("A100")
}

/// What one GPU does at an instant: busy is NVML's "a kernel was running" share, `sm` the
/// share of SMs at work (never above busy), `tensor` the tensor pipes' activity.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Load {
    busy: f64,
    held: bool,
    sm: f64,
    tensor: f64,
}

impl Load {
    const IDLE: Load = Load {
        busy: 0.0,
        held: false,
        sm: 0.0,
        tensor: 0.0,
    };

    /// A job at work: `busy`, with `efficiency` of its busy time's SMs at work.
    fn working(busy: f64, efficiency: f64) -> Self {
        let busy = busy.clamp(0.0, 1.0);
        let sm = busy * efficiency;
        Load {
            busy,
            held: true,
            sm,
            tensor: sm * 0.6,
        }
    }
}

impl Fleet {
    /// 68 hosts × 8 GPUs: 64 under contract at two providers, 4 of the lab's own,
    /// starting at `start_ms`.
    pub fn new(story: Story, start_ms: i64) -> Self {
        let mut hosts = Vec::new();
        for (provider, cluster, n, model) in LAYOUT {
            for h in 0..n {
                let name = format!("{provider}-{cluster}-{h:02}");
                let gpus = (0..8)
                    .map(|g| SimGpu {
                        uuid: format!("GPU-{:08x}-{g}", fnv(&name)),
                        model,
                        gpm: has_gpm(model),
                        observed_s: 0.0,
                        busy_s: 0.0,
                        allocated_s: 0.0,
                        allocated_busy_s: 0.0,
                        sm_active_s: 0.0,
                        tensor_active_s: 0.0,
                        allocated_sm_active_s: 0.0,
                        energy_j: 0.0,
                        utilization: 0.0,
                        power_w: 90.0,
                        allocated: false,
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
        // In the default story acme-h100-east counts SM activity as use, so its stuck GPU
        // (busy, SMs idle) is booked idle (allocated); the other stories keep busy, their
        // jobs' SMs at work 70-84 % of their busy time.
        let east_signal = if self.story == Story::Default {
            "sm_active"
        } else {
            "busy"
        };
        vec![
            SimContract {
                id: "acme-h100-east",
                provider: "acme-cloud",
                cluster: "east",
                price_per_gpu_hour: 2.10,
                target: 0.95,
                timezone: "America/New_York",
                usage_signal: east_signal,
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
                usage_signal: "busy",
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
                usage_signal: "busy",
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
                    let l = load(story, h, &host.name, g, elapsed);
                    gpu.utilization = l.busy;
                    gpu.allocated = l.held;
                    gpu.observed_s += dt;
                    gpu.busy_s += l.busy * dt;
                    gpu.sm_active_s += l.sm * dt;
                    gpu.tensor_active_s += l.tensor * dt;
                    if l.held {
                        gpu.allocated_s += dt;
                        gpu.allocated_busy_s += l.busy * dt;
                        gpu.allocated_sm_active_s += l.sm * dt;
                    }
                    gpu.power_w = power(&l);
                    gpu.energy_j += gpu.power_w * dt;
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

/// Power draw: idle floor plus what the SMs' work costs; a kernel spinning on a few SMs
/// (a stuck GPU) draws little although NVML reads it busy.
fn power(l: &Load) -> f64 {
    let work = if l.busy > 0.0 {
        (l.sm / l.busy / 0.8).min(1.0)
    } else {
        0.0
    };
    90.0 + 610.0 * l.busy * (0.15 + 0.85 * work)
}

/// The hosts of a job that holds their GPUs without using them (all along), and the GPU
/// that hangs (15 minutes in), in the default story. Early, so that the alerts' windows
/// hold nothing else even in a short run.
pub const HELD_IDLE_HOSTS: [&str; 2] = ["acme-cloud-east-20", "acme-cloud-east-21"];
pub const STUCK_GPU: (&str, usize) = ("acme-cloud-east-05", 3);
/// Hosts of acme-h100-east between two jobs from 3.5 h to 5 h in the default story: no
/// process holds their GPUs (unallocated idle, once the ramp to 200 GPUs has begun).
pub const BETWEEN_JOBS_HOSTS: [&str; 2] = ["acme-cloud-east-10", "acme-cloud-east-11"];
const BETWEEN_JOBS_MS: std::ops::Range<i64> = 7 * HOUR_MS / 2..5 * HOUR_MS;

/// What one GPU does at `elapsed` ms after the start.
fn load(story: Story, host_index: usize, host: &str, gpu: usize, elapsed: i64) -> Load {
    // Share of busy time with the SMs at work: 70-84 % for training, per GPU.
    let efficiency = 0.70 + ((host_index * 8 + gpu) % 8) as f64 * 0.02;
    match story {
        Story::Healthy => Load::working(0.97, efficiency),
        Story::Underuse => Load::working(0.10, efficiency),
        Story::Default => {
            // Training runs near saturation with a diurnal dip from inference shifts.
            let day = 2.0 * PI * (elapsed as f64 / (24.0 * HOUR_MS as f64));
            let jitter = ((host_index * 8 + gpu) % 7) as f64 * 0.01;
            let base = 0.86 + 0.08 * day.sin() - jitter;
            // A job on four borealis hosts crashes after 1 h and leaves its GPUs idle:
            // no process holds them (unallocated idle, the scheduler's to refill).
            let crashed = host.starts_with("borealis-nord-0")
                && host < "borealis-nord-04"
                && elapsed >= HOUR_MS;
            // A job holds two hosts' GPUs and does not use them (an interactive session
            // left open): a heartbeat kernel, 0.3 % busy.
            let held_idle = HELD_IDLE_HOSTS.contains(&host);
            // One GPU's job hangs 15 minutes in, in a collective: a kernel stays resident
            // (busy 100 %) spinning on one SM in 200 (SM activity 0.5 %).
            let stuck = (host, gpu) == STUCK_GPU && elapsed >= HOUR_MS / 4;
            let between_jobs =
                BETWEEN_JOBS_HOSTS.contains(&host) && BETWEEN_JOBS_MS.contains(&elapsed);
            if crashed || between_jobs {
                Load::IDLE
            } else if held_idle {
                Load {
                    busy: 0.003,
                    held: true,
                    sm: 0.0005,
                    tensor: 0.0,
                }
            } else if stuck {
                Load {
                    busy: 1.0,
                    held: true,
                    sm: 0.005,
                    tensor: 0.0,
                }
            } else {
                Load::working(base, efficiency)
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
        assert_eq!(f.hosts.len(), 68);
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
        // Busy never exceeds observed, anywhere; what happened while held is a part of
        // what happened; SMs at work only while busy, tensor pipes only while SMs are.
        for h in &f.hosts {
            for g in &h.gpus {
                assert!(g.busy_s <= g.observed_s + 1e-9 && g.allocated_s <= g.observed_s + 1e-9);
                assert!(g.allocated_busy_s <= g.busy_s + 1e-9);
                assert!(g.allocated_busy_s <= g.allocated_s + 1e-9);
                assert!(g.sm_active_s <= g.busy_s + 1e-9);
                assert!(g.allocated_sm_active_s <= g.sm_active_s + 1e-9);
                assert!(g.allocated_sm_active_s <= g.allocated_busy_s + 1e-9);
                assert!(g.tensor_active_s <= g.sm_active_s + 1e-9);
            }
        }
    }

    /// A GPU: its host's name and its index.
    type GpuAt = (String, usize);

    /// The GPUs meeting the alerts' conditions over `[from, to]` ms, as the rules in
    /// alerts/commitmeter-alerts.yml compute them from the exported counters: stuck
    /// (CommitmeterGPUStuck: GPM only, held and busy > 90 %, SMs < 5 % of busy) and held
    /// idle (CommitmeterGPUAllocatedIdle: held > 90 %, busy < 5 % of held).
    fn flagged(story: Story, from: i64, to: i64) -> (Vec<GpuAt>, Vec<GpuAt>) {
        let mut f = Fleet::new(story, 0);
        f.advance(from);
        let before = f.hosts.clone();
        f.advance(to);
        let (mut stuck, mut held_idle) = (Vec::new(), Vec::new());
        for (h0, h1) in before.iter().zip(&f.hosts) {
            for (i, (a, b)) in h0.gpus.iter().zip(&h1.gpus).enumerate() {
                let d = |x: fn(&SimGpu) -> f64| x(b) - x(a);
                let observed = d(|g| g.observed_s);
                let held = d(|g| g.allocated_s);
                let held_busy = d(|g| g.allocated_busy_s);
                let held_sm = d(|g| g.allocated_sm_active_s);
                if b.gpm && held_busy > 0.9 * observed && held_sm < 0.05 * held_busy {
                    stuck.push((h1.name.clone(), i));
                }
                if held > 0.9 * observed && held_busy < 0.05 * held {
                    held_idle.push((h1.name.clone(), i));
                }
            }
        }
        (stuck, held_idle)
    }

    #[test]
    fn the_default_story_has_a_stuck_gpu_a_job_holding_idle_gpus_and_pre_hopper_gpus() {
        // Before the hang: nothing stuck.
        let (stuck, _) = flagged(Story::Default, 0, 600_000);
        assert!(stuck.is_empty(), "{stuck:?}");
        // At 6 h: the alerts' windows (10 minutes, 2 hours).
        let (stuck, _) = flagged(Story::Default, 6 * HOUR_MS - 600_000, 6 * HOUR_MS);
        assert_eq!(stuck, vec![(STUCK_GPU.0.to_string(), STUCK_GPU.1)]);
        let (_, held_idle) = flagged(Story::Default, 4 * HOUR_MS, 6 * HOUR_MS);
        let want: Vec<GpuAt> = HELD_IDLE_HOSTS
            .iter()
            .flat_map(|h| (0..8).map(move |g| (h.to_string(), g)))
            .collect();
        assert_eq!(
            held_idle, want,
            "the crashed job's GPUs are not held: unallocated"
        );
        // Pre-Hopper GPUs: no GPM, under no contract, working.
        let f = Fleet::new(Story::Default, 0);
        let a100: Vec<&SimHost> = f.hosts.iter().filter(|h| !h.gpus[0].gpm).collect();
        assert_eq!(a100.len(), 4);
        assert!(a100
            .iter()
            .all(|h| h.gpus.iter().all(|g| g.model.contains("A100"))));
        assert!(f
            .contracts()
            .iter()
            .all(|c| a100.iter().all(|h| h.cluster != c.cluster)));
        assert!(f
            .hosts
            .iter()
            .filter(|h| h.provider != "lab")
            .all(|h| h.gpus[0].gpm));
    }

    #[test]
    fn acme_east_counts_sm_activity_and_two_of_its_hosts_are_between_jobs() {
        let signals = |story| -> Vec<(&str, &str)> {
            let f = Fleet::new(story, 0);
            f.contracts()
                .iter()
                .map(|c| (c.id, c.usage_signal))
                .collect()
        };
        assert_eq!(
            signals(Story::Default),
            [
                ("acme-h100-east", "sm_active"),
                ("acme-h100-west", "busy"),
                ("borealis-h200", "busy")
            ]
        );
        for story in [Story::Healthy, Story::Underuse] {
            assert!(
                signals(story).iter().all(|(_, s)| *s == "busy"),
                "{story:?}"
            );
        }
        // The stuck GPU and the hosts between jobs are acme-h100-east's.
        let f = Fleet::new(Story::Default, 0);
        let east = &f.contracts()[0];
        let host = |n: &str| f.hosts.iter().find(|h| h.name == n).unwrap();
        for name in BETWEEN_JOBS_HOSTS.iter().chain([&STUCK_GPU.0]) {
            let h = host(name);
            assert_eq!((h.provider, h.cluster), (east.provider, east.cluster));
        }
        // Between jobs, from 3.5 h to 5 h: observed, neither held nor busy; held again after.
        let mut f = Fleet::new(Story::Default, 0);
        let spans = [
            (0, 7 * HOUR_MS / 2, true),
            (7 * HOUR_MS / 2, 5 * HOUR_MS, false),
        ];
        for (from, to, held) in spans.into_iter().chain([(5 * HOUR_MS, 6 * HOUR_MS, true)]) {
            f.advance(from);
            let before = f.hosts.clone();
            f.advance(to);
            for (a, b) in before.iter().zip(&f.hosts) {
                if !BETWEEN_JOBS_HOSTS.contains(&a.name.as_str()) {
                    continue;
                }
                for (ga, gb) in a.gpus.iter().zip(&b.gpus) {
                    let observed = gb.observed_s - ga.observed_s;
                    assert!((observed - (to - from) as f64 / 1000.0).abs() < 1e-6);
                    let allocated = gb.allocated_s - ga.allocated_s;
                    let busy = gb.busy_s - ga.busy_s;
                    if held {
                        assert!((allocated - observed).abs() < 1e-6 && busy > 0.5 * observed);
                    } else {
                        assert!(allocated == 0.0 && busy == 0.0, "{} {from}", a.name);
                    }
                }
            }
        }
    }

    #[test]
    fn healthy_and_underuse_have_no_stuck_or_held_idle_gpus() {
        for story in [Story::Healthy, Story::Underuse] {
            for hour in [0, 5, 23] {
                let at = hour * HOUR_MS;
                let (stuck, _) = flagged(story, at, at + 600_000);
                let (_, held_idle) = flagged(story, at, at + 2 * HOUR_MS);
                assert!(
                    stuck.is_empty() && held_idle.is_empty(),
                    "{story:?} at {hour} h: {stuck:?} {held_idle:?}"
                );
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
