//! The scripted timeline a test hands to the fake driver, and the ground truth
//! derived from it.
//!
//! The fake library answers every NVML call from these same functions, so what
//! an agent measures through NVML can be compared exactly with what the
//! scenario says happened. All times are milliseconds relative to the
//! scenario's timeline zero ([`Scenario::start_unix_ms`]).

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

/// Environment variable holding the path of the scenario JSON file.
pub const ENV_VAR: &str = "FAKE_NVML_SCENARIO";

/// Offset of sample timestamps (µs). Deliberately not Unix time: a sample
/// timestamp is only a cursor, and agents must not treat it as a clock.
pub const SAMPLE_TIMESTAMP_BASE_US: u64 = 1_000_000_000_000;

/// Marketing name of a GPU whose `name` is left empty.
pub const DEFAULT_GPU_NAME: &str = "NVIDIA H100 80GB HBM3";

/// Capability names accepted in [`Gpu::unsupported`].
pub mod cap {
    pub const SAMPLES: &str = "samples";
    pub const UTILIZATION: &str = "utilization";
    pub const MEMORY: &str = "memory";
    pub const POWER: &str = "power";
    pub const POWER_LIMIT: &str = "power_limit";
    pub const ENERGY: &str = "energy";
    pub const TEMPERATURE: &str = "temperature";
    pub const CLOCK: &str = "clock";
    pub const PROCESSES: &str = "processes";
    pub const PCI: &str = "pci";
    pub const EVENTS: &str = "events";
    /// GPU Performance Monitoring (Hopper and newer): `nvmlGpmQueryDeviceSupport`
    /// says unsupported and `nvmlGpmSampleGet` answers `NOT_SUPPORTED`.
    pub const GPM: &str = "gpm";
    /// Every name above, to validate scenarios.
    pub const ALL: [&str; 12] = [
        SAMPLES,
        UTILIZATION,
        MEMORY,
        POWER,
        POWER_LIMIT,
        ENERGY,
        TEMPERATURE,
        CLOCK,
        PROCESSES,
        PCI,
        EVENTS,
        GPM,
    ];
}

/// Marketing name of a GPU older than Hopper, for [`Gpu::pre_hopper`].
pub const PRE_HOPPER_GPU_NAME: &str = "NVIDIA A100-SXM4-80GB";

/// GPM metric ids the fake computes (`nvmlGpmMetricId_t`).
pub mod gpm_metric {
    /// `NVML_GPM_METRIC_SM_UTIL`: percent of SMs active, averaged over the two samples.
    pub const SM_UTIL: u32 = 2;
    /// `NVML_GPM_METRIC_ANY_TENSOR_UTIL`: percent of time any tensor pipe was active.
    pub const ANY_TENSOR_UTIL: u32 = 5;
}

/// Shortest span between two GPM samples `nvmlGpmMetricsGet` accepts (ms): NVML
/// documents that samples must be at least 100 ms apart; the fake refuses closer ones
/// (`NVML_ERROR_INVALID_ARGUMENT`) so an agent that ignores the rule fails its tests.
pub const GPM_MIN_SPAN_MS: u64 = 100;

/// A whole machine: its driver's life and its GPUs.
///
/// Unknown JSON fields are rejected so that a typo fails loudly (`nvmlInit_v2`
/// then returns `NVML_ERROR_UNKNOWN`) instead of being silently ignored.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    /// Timeline zero in ms since the Unix epoch; `None` = when the fake loads
    /// the scenario.
    pub start_unix_ms: Option<u64>,
    /// Driver utilization sample period (0 is treated as 1).
    pub sample_period_ms: u64,
    /// How long the driver has been sampling before timeline zero, in the state of
    /// zero: a machine whose driver was loaded before the agent starts has a full
    /// sample buffer (0: the driver's first sample ends one period after zero).
    pub sampled_before_ms: u64,
    /// How many recent samples the driver keeps.
    pub ring: usize,
    /// `nvmlInit_v2` answers `NVML_ERROR_DRIVER_NOT_LOADED` before this.
    pub init_fail_until_ms: u64,
    /// Driver reloads, as `[from, to)` windows.
    pub driver_down: Vec<[u64; 2]>,
    /// NVML index order after each reload: entry `k` lists the scenario's GPU numbers
    /// by NVML index once the `k + 1`-th `driver_down` window has begun (a permutation
    /// of them). Missing entries keep the scenario's order. A GPU keeps its UUID, bus
    /// id and script wherever it is enumerated.
    pub reorder_on_reload: Vec<Vec<usize>>,
    /// From then on every NVML call blocks (a hung driver), until `hang_until_ms`
    /// if set.
    pub hang_at_ms: Option<u64>,
    pub hang_until_ms: Option<u64>,
    pub gpus: Vec<Gpu>,
}

impl Default for Scenario {
    /// Two GPUs at a constant 50%, one process each.
    fn default() -> Self {
        Self {
            start_unix_ms: None,
            sample_period_ms: 100,
            sampled_before_ms: 0,
            ring: 120,
            init_fail_until_ms: 0,
            driver_down: Vec::new(),
            reorder_on_reload: Vec::new(),
            hang_at_ms: None,
            hang_until_ms: None,
            gpus: vec![Gpu::default(), Gpu::default()],
        }
    }
}

/// One GPU's script. Empty `uuid` / `pci_bus_id` get per-index defaults
/// (see [`Scenario::uuid`], [`Scenario::pci_bus_id`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Gpu {
    pub uuid: String,
    pub name: String,
    pub pci_bus_id: String,
    /// Step function `[from_ms, percent]`; 0 before the first step.
    pub util: Vec<[u64; 2]>,
    /// Step function `[from_ms, count]` of compute processes; 0 before the first step.
    /// Their PIDs are 1000, 1001, … unless `pids` is set.
    pub processes: Vec<[u64; 2]>,
    /// Step function `[from_ms, [pid, …]]` of the compute processes' PIDs; none before
    /// the first step (the later step on ties). When set it replaces `processes`: the
    /// count is the list's length, and `nvmlDeviceGetComputeRunningProcesses_v3`
    /// returns these PIDs.
    pub pids: Option<Vec<(u64, Vec<u32>)>>,
    /// From then on the GPU answers `NVML_ERROR_GPU_IS_LOST`.
    pub lost_at_ms: Option<u64>,
    /// Capabilities answering `NVML_ERROR_NOT_SUPPORTED`, see [`cap`].
    pub unsupported: Vec<String>,
    /// No samples are produced for periods with zero busy time, like real drivers.
    pub samples_dry_when_idle: bool,
    /// The sample buffer stays empty (`NOT_FOUND`) even while busy: a broken driver.
    pub samples_broken: bool,
    /// Step function `[from_ms, delay_ms]`: a read of the sample buffer begun then
    /// takes this long (a slow GPU or driver), before it looks at the buffer; 0
    /// before the first step.
    pub samples_slow: Vec<[u64; 2]>,
    pub power_mw: u32,
    pub power_limit_mw: u32,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    pub temperature_c: u32,
    pub sm_clock_mhz: u32,
    /// Energy counter at t = 0 (mJ).
    pub energy_start_mj: u64,
    /// The energy counter restarts from 0 at this time.
    pub energy_reset_at_ms: Option<u64>,
    /// `[at_ms, xid_code]` critical XID events.
    pub xids: Vec<[u64; 2]>,
    /// Step function `[from_ms, percent]` of GPM SM activity (`NVML_GPM_METRIC_SM_UTIL`);
    /// 0 before the first step. `None` (the default): SM activity follows `util`, as on
    /// a GPU whose kernels keep every SM busy.
    pub sm_active: Option<Vec<[u64; 2]>>,
    /// Step function `[from_ms, percent]` of GPM tensor-pipe activity
    /// (`NVML_GPM_METRIC_ANY_TENSOR_UTIL`); 0 before the first step, and 0 throughout
    /// when empty (the default).
    pub tensor_active: Vec<[u64; 2]>,
    /// `[from, to)` windows in which `nvmlGpmSampleGet` fails with `NVML_ERROR_UNKNOWN`.
    pub gpm_fail: Vec<[u64; 2]>,
}

impl Default for Gpu {
    fn default() -> Self {
        Self {
            uuid: String::new(),
            name: DEFAULT_GPU_NAME.to_owned(),
            pci_bus_id: String::new(),
            util: vec![[0, 50]],
            processes: vec![[0, 1]],
            pids: None,
            lost_at_ms: None,
            unsupported: Vec::new(),
            samples_dry_when_idle: false,
            samples_broken: false,
            samples_slow: Vec::new(),
            power_mw: 300_000,
            power_limit_mw: 700_000,
            memory_total_bytes: 85_899_345_920,
            memory_used_bytes: 1_073_741_824,
            temperature_c: 40,
            sm_clock_mhz: 1980,
            energy_start_mj: 0,
            energy_reset_at_ms: None,
            xids: Vec::new(),
            sm_active: None,
            tensor_active: Vec::new(),
            gpm_fail: Vec::new(),
        }
    }
}

impl Gpu {
    /// A default GPU running at a constant `percent`.
    pub fn at_util(percent: u64) -> Self {
        Self {
            util: vec![[0, percent]],
            ..Self::default()
        }
    }

    /// A GPU older than Hopper (an A100) at a constant `percent`: no GPM.
    pub fn pre_hopper(percent: u64) -> Self {
        Self {
            name: PRE_HOPPER_GPU_NAME.to_owned(),
            unsupported: vec![cap::GPM.to_owned()],
            ..Self::at_util(percent)
        }
    }

    /// A hung job: a process holds the GPU and a kernel is always resident (utilization
    /// 100 %), but the SMs do nothing (SM activity `sm_percent`, about 0).
    pub fn stuck(sm_percent: u64) -> Self {
        Self {
            util: vec![[0, 100]],
            processes: vec![[0, 1]],
            sm_active: Some(vec![[0, sm_percent]]),
            ..Self::default()
        }
    }

    /// Whether `capability` (one of [`cap`]) answers normally.
    pub fn supports(&self, capability: &str) -> bool {
        !self.unsupported.iter().any(|c| c == capability)
    }
}

/// One utilization sample as the driver would report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DriverSample {
    /// End of the sample's period, ms on the timeline (≤ 0 before it began).
    pub t_ms: i64,
    /// What `nvmlDeviceGetSamples` reports: [`sample_timestamp_us`] of `t_ms`.
    pub timestamp_us: u64,
    /// Average utilization (percent) over `(t_ms - period, t_ms]`.
    pub value: u32,
}

/// A critical XID event the driver can deliver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XidEvent {
    pub at_ms: u64,
    pub gpu: usize,
    pub code: u64,
}

/// Sample timestamp (µs) of a sample ending at `t_ms`.
pub const fn sample_timestamp_us(t_ms: u64) -> u64 {
    SAMPLE_TIMESTAMP_BASE_US + t_ms * 1000
}

/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A stretch of time over which everything about one GPU is constant.
#[derive(Clone, Copy, Debug)]
struct Segment {
    start: u64,
    /// Exclusive; `u64::MAX` for the last one.
    end: u64,
    util: u64,
    procs: u64,
    present: bool,
    /// GPM SM and tensor activity (percent, capped at 100).
    sm: u64,
    tensor: u64,
}

impl Segment {
    /// Utilization that counts as delivered work (none while absent).
    fn busy_pct(&self) -> u64 {
        if self.present {
            self.util
        } else {
            0
        }
    }

    /// GPM SM activity (none while absent).
    fn sm_pct(&self) -> u64 {
        if self.present {
            self.sm
        } else {
            0
        }
    }

    /// GPM tensor-pipe activity (none while absent).
    fn tensor_pct(&self) -> u64 {
        if self.present {
            self.tensor
        } else {
            0
        }
    }

    fn allocated(&self) -> bool {
        self.present && self.procs > 0
    }

    /// `value` while a compute process holds the present GPU, else 0.
    fn while_allocated(&self, value: u64) -> u64 {
        if self.allocated() {
            value
        } else {
            0
        }
    }
}

/// The PID list of a `[from, pids]` step function at `t`: the step with the greatest
/// `from <= t` (the later one on ties), none before any step.
fn pids_step(steps: &[(u64, Vec<u32>)], t: u64) -> &[u32] {
    let mut best: Option<&(u64, Vec<u32>)> = None;
    for s in steps {
        if s.0 <= t && best.is_none_or(|b| s.0 >= b.0) {
            best = Some(s);
        }
    }
    best.map_or(&[], |s| s.1.as_slice())
}

/// Value of a `[from, value]` step function at `t`: the step with the
/// greatest `from <= t` (the later one on ties), 0 before any step.
fn step_at(steps: &[[u64; 2]], t: u64) -> u64 {
    let mut best: Option<[u64; 2]> = None;
    for &s in steps {
        if s[0] <= t && best.is_none_or(|b| s[0] >= b[0]) {
            best = Some(s);
        }
    }
    best.map_or(0, |s| s[1])
}

impl Scenario {
    /// Parses a scenario and checks the capability names.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let scenario: Self = serde_json::from_str(text).map_err(|e| e.to_string())?;
        for (i, gpu) in scenario.gpus.iter().enumerate() {
            if let Some(bad) = gpu
                .unsupported
                .iter()
                .find(|c| !cap::ALL.contains(&c.as_str()))
            {
                return Err(format!("gpus[{i}].unsupported: unknown capability {bad:?}"));
            }
        }
        for (k, order) in scenario.reorder_on_reload.iter().enumerate() {
            let mut sorted = order.clone();
            sorted.sort_unstable();
            if sorted != (0..scenario.gpus.len()).collect::<Vec<_>>() {
                return Err(format!(
                    "reorder_on_reload[{k}]: {order:?} is not an order of the {} GPUs",
                    scenario.gpus.len()
                ));
            }
        }
        Ok(scenario)
    }

    /// One GPU, idle with a dry sample buffer, then a blip of one 1/6 s sample period
    /// at 100 % (at 3 s), idle again, then 70 % busy for 3 s (from 5 s), then idle:
    /// the first sample after a dry stretch describes one period, not the gap. Steps
    /// sit on multiples of the period, so the samples sum to [`Self::busy_seconds`]
    /// exactly: 0.166 + 0.7 × 2.988 s.
    pub fn dry_then_busy() -> Self {
        const P: u64 = 166;
        Self {
            sample_period_ms: P,
            gpus: vec![Gpu {
                util: vec![
                    [0, 0],
                    [18 * P, 100],
                    [19 * P, 0],
                    [30 * P, 70],
                    [48 * P, 0],
                ],
                processes: vec![[0, 0], [30 * P, 1], [48 * P, 0]],
                samples_dry_when_idle: true,
                ..Gpu::default()
            }],
            ..Self::default()
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Writes the scenario to a fresh file under the temp dir (named after
    /// `tag`, the process id and a counter) and returns its path.
    pub fn write_temp(&self, tag: &str) -> std::io::Result<PathBuf> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "fake-nvml-{tag}-{}-{n}-{}.json",
            std::process::id(),
            unix_now_ms()
        ));
        std::fs::write(&path, self.to_json())?;
        Ok(path)
    }

    /// Sets timeline zero to now, so a test and the fake agree on it.
    pub fn with_start_now(mut self) -> Self {
        self.start_unix_ms = Some(unix_now_ms());
        self
    }

    /// Milliseconds since timeline zero (0 before it, and 0 when
    /// `start_unix_ms` is `None`: only the fake knows when it loaded the file).
    pub fn now_ms(&self) -> u64 {
        self.start_unix_ms
            .map_or(0, |start| unix_now_ms().saturating_sub(start))
    }

    /// The sample period actually used (never 0).
    pub fn period_ms(&self) -> u64 {
        self.sample_period_ms.max(1)
    }

    /// UUID of GPU `gpu`, defaulted from its index when empty.
    pub fn uuid(&self, gpu: usize) -> String {
        match self.gpus.get(gpu) {
            Some(g) if !g.uuid.is_empty() => g.uuid.clone(),
            _ => format!("GPU-00000000-0000-0000-0000-{gpu:012x}"),
        }
    }

    /// PCI bus id of GPU `gpu`, defaulted from its index when empty.
    pub fn pci_bus_id(&self, gpu: usize) -> String {
        match self.gpus.get(gpu) {
            Some(g) if !g.pci_bus_id.is_empty() => g.pci_bus_id.clone(),
            _ => format!("00000000:{:02X}:00.0", gpu + 0x17),
        }
    }

    /// Whether `t` falls in a `driver_down` window.
    pub fn driver_down_at(&self, t_ms: u64) -> bool {
        self.driver_down.iter().any(|w| w[0] <= t_ms && t_ms < w[1])
    }

    /// How many `driver_down` windows have begun by `t` (a driver "generation").
    pub fn reloads_begun(&self, t_ms: u64) -> usize {
        self.driver_down.iter().filter(|w| w[0] <= t_ms).count()
    }

    /// The scenario GPU at NVML index `index` in driver generation `generation`.
    pub fn gpu_at_index(&self, generation: usize, index: usize) -> Option<usize> {
        match generation
            .checked_sub(1)
            .and_then(|k| self.reorder_on_reload.get(k))
        {
            Some(order) => order.get(index).copied(),
            None => (index < self.gpus.len()).then_some(index),
        }
    }

    /// The NVML index of scenario GPU `gpu` in driver generation `generation`.
    pub fn index_of_gpu(&self, generation: usize, gpu: usize) -> Option<usize> {
        (0..self.gpus.len()).find(|&i| self.gpu_at_index(generation, i) == Some(gpu))
    }

    /// Whether NVML calls block at `t` ([`Self::hang_at_ms`]).
    pub fn hung_at(&self, t_ms: u64) -> bool {
        self.hang_at_ms.is_some_and(|from| t_ms >= from)
            && self.hang_until_ms.is_none_or(|until| t_ms < until)
    }

    /// Whether GPU `gpu` has been lost by `t`.
    pub fn lost_at(&self, gpu: usize, t_ms: u64) -> bool {
        self.gpus
            .get(gpu)
            .and_then(|g| g.lost_at_ms)
            .is_some_and(|lost| t_ms >= lost)
    }

    /// Whether GPU `gpu` is usable at `t`: it exists, is not lost and the
    /// driver is up.
    pub fn present_at(&self, gpu: usize, t_ms: u64) -> bool {
        gpu < self.gpus.len() && !self.lost_at(gpu, t_ms) && !self.driver_down_at(t_ms)
    }

    /// Scripted utilization (percent, capped at 100) at `t`, ignoring presence.
    pub fn util_at(&self, gpu: usize, t_ms: u64) -> u32 {
        self.gpus
            .get(gpu)
            .map_or(0, |g| step_at(&g.util, t_ms).min(100) as u32)
    }

    /// How long a read of GPU `gpu`'s sample buffer begun at `t` takes
    /// ([`Gpu::samples_slow`]).
    pub fn samples_delay_ms(&self, gpu: usize, t_ms: u64) -> u64 {
        self.gpus
            .get(gpu)
            .map_or(0, |g| step_at(&g.samples_slow, t_ms))
    }

    /// Scripted number of compute processes at `t`, ignoring presence: the length of
    /// the `pids` list where set, else `processes`.
    pub fn processes_at(&self, gpu: usize, t_ms: u64) -> u64 {
        match self.gpus.get(gpu) {
            Some(Gpu {
                pids: Some(steps), ..
            }) => pids_step(steps, t_ms).len() as u64,
            Some(g) => step_at(&g.processes, t_ms),
            None => 0,
        }
    }

    /// The PIDs of the compute processes at `t`, ignoring presence: the `pids` script
    /// where set, else 1000, 1001, … for the `processes` count.
    pub fn pids_at(&self, gpu: usize, t_ms: u64) -> Vec<u32> {
        match self.gpus.get(gpu) {
            Some(Gpu {
                pids: Some(steps), ..
            }) => pids_step(steps, t_ms).to_vec(),
            Some(g) => {
                let n = step_at(&g.processes, t_ms).min(u64::from(u32::MAX - 1000)) as u32;
                (0..n).map(|k| 1000 + k).collect()
            }
            None => Vec::new(),
        }
    }

    /// The distinct owners of GPU `gpu`'s processes at `t` (ignoring presence), given
    /// each PID's owner.
    pub fn owners_at<K: Ord>(
        &self,
        gpu: usize,
        t_ms: u64,
        owner_of: impl Fn(u32) -> K,
    ) -> std::collections::BTreeSet<K> {
        self.pids_at(gpu, t_ms).into_iter().map(owner_of).collect()
    }

    /// Scripted GPM SM activity (percent, capped at 100) at `t`, ignoring presence:
    /// the `sm_active` script, or `util` without one.
    pub fn sm_active_at(&self, gpu: usize, t_ms: u64) -> u32 {
        self.gpus.get(gpu).map_or(0, |g| match &g.sm_active {
            Some(steps) => step_at(steps, t_ms).min(100) as u32,
            None => step_at(&g.util, t_ms).min(100) as u32,
        })
    }

    /// Scripted GPM tensor-pipe activity (percent, capped at 100) at `t`, ignoring presence.
    pub fn tensor_active_at(&self, gpu: usize, t_ms: u64) -> u32 {
        self.gpus
            .get(gpu)
            .map_or(0, |g| step_at(&g.tensor_active, t_ms).min(100) as u32)
    }

    /// Whether `nvmlGpmSampleGet` on GPU `gpu` fails at `t` ([`Gpu::gpm_fail`]).
    pub fn gpm_fails_at(&self, gpu: usize, t_ms: u64) -> bool {
        self.gpus
            .get(gpu)
            .is_some_and(|g| g.gpm_fail.iter().any(|w| w[0] <= t_ms && t_ms < w[1]))
    }

    /// What `nvmlGpmMetricsGet` reports for two samples of GPU `gpu` taken at `from`
    /// and `to` (`from < to`): the exact averages of the scripted SM and tensor
    /// activity over `[from, to)`, in percent (0 while the GPU was absent).
    pub fn gpm_averages(&self, gpu: usize, from_ms: u64, to_ms: u64) -> (f64, f64) {
        let span = to_ms.saturating_sub(from_ms).max(1) as f64;
        let sm = self.integrate(gpu, from_ms, to_ms, |s| if s.present { s.sm } else { 0 });
        let tensor = self.integrate(
            gpu,
            from_ms,
            to_ms,
            |s| if s.present { s.tensor } else { 0 },
        );
        (sm as f64 / span, tensor as f64 / span)
    }

    /// Piecewise-constant description of GPU `gpu` over `[0, u64::MAX)`.
    fn segments(&self, gpu: usize) -> Vec<Segment> {
        let Some(g) = self.gpus.get(gpu) else {
            return Vec::new();
        };
        let mut cuts: Vec<u64> = vec![0];
        cuts.extend(g.util.iter().map(|s| s[0]));
        cuts.extend(g.processes.iter().map(|s| s[0]));
        cuts.extend(g.pids.iter().flatten().map(|s| s.0));
        cuts.extend(g.sm_active.iter().flatten().map(|s| s[0]));
        cuts.extend(g.tensor_active.iter().map(|s| s[0]));
        cuts.extend(self.driver_down.iter().flatten().copied());
        cuts.extend(g.lost_at_ms);
        cuts.sort_unstable();
        cuts.dedup();
        let ends = cuts.iter().skip(1).copied().chain([u64::MAX]);
        cuts.iter()
            .zip(ends)
            .map(|(&start, end)| Segment {
                start,
                end,
                util: step_at(&g.util, start).min(100),
                procs: self.processes_at(gpu, start),
                present: self.present_at(gpu, start),
                sm: self.sm_active_at(gpu, start).into(),
                tensor: self.tensor_active_at(gpu, start).into(),
            })
            .collect()
    }

    /// ∫ f(segment) dt over `[from, to)`, in (unit of f) × ms.
    fn integrate(&self, gpu: usize, from: u64, to: u64, f: impl Fn(&Segment) -> u64) -> u128 {
        self.segments(gpu)
            .iter()
            .map(|s| {
                let overlap = to.min(s.end).saturating_sub(from.max(s.start));
                u128::from(overlap) * u128::from(f(s))
            })
            .sum()
    }

    /// Delivered work over `[from, to)` in percent × ms (exact).
    pub fn busy_pct_ms(&self, gpu: usize, from_ms: u64, to_ms: u64) -> u128 {
        self.integrate(gpu, from_ms, to_ms, Segment::busy_pct)
    }

    /// ∫ util/100 dt over `[from, to)` while present, in seconds.
    pub fn busy_seconds(&self, gpu: usize, from_ms: u64, to_ms: u64) -> f64 {
        self.pct_seconds(gpu, from_ms, to_ms, Segment::busy_pct)
    }

    /// Present milliseconds in `[from, to)`.
    pub fn present_ms(&self, gpu: usize, from_ms: u64, to_ms: u64) -> u64 {
        self.integrate(gpu, from_ms, to_ms, |s| u64::from(s.present)) as u64
    }

    /// Seconds of `[from, to)` during which the GPU was present.
    pub fn present_seconds(&self, gpu: usize, from_ms: u64, to_ms: u64) -> f64 {
        self.present_ms(gpu, from_ms, to_ms) as f64 / 1000.0
    }

    /// Seconds of `[from, to)` during which the GPU was present and had at
    /// least one compute process.
    pub fn allocated_seconds(&self, gpu: usize, from_ms: u64, to_ms: u64) -> f64 {
        let ms = self.integrate(gpu, from_ms, to_ms, |s| u64::from(s.allocated()));
        ms as f64 / 1000.0
    }

    /// ∫ f(segment) dt / 100 over `[from, to)` for `f` in percent, in seconds.
    fn pct_seconds(
        &self,
        gpu: usize,
        from_ms: u64,
        to_ms: u64,
        f: impl Fn(&Segment) -> u64,
    ) -> f64 {
        self.integrate(gpu, from_ms, to_ms, f) as f64 / 100_000.0
    }

    /// ∫ SM activity/100 dt over `[from, to)` while present, in seconds.
    pub fn sm_active_seconds(&self, gpu: usize, from_ms: u64, to_ms: u64) -> f64 {
        self.pct_seconds(gpu, from_ms, to_ms, Segment::sm_pct)
    }

    /// ∫ tensor-pipe activity/100 dt over `[from, to)` while present, in seconds.
    pub fn tensor_active_seconds(&self, gpu: usize, from_ms: u64, to_ms: u64) -> f64 {
        self.pct_seconds(gpu, from_ms, to_ms, Segment::tensor_pct)
    }

    /// Busy seconds (as [`Self::busy_seconds`]) of the time in `[from, to)` during which
    /// a compute process held the GPU.
    pub fn allocated_busy_seconds(&self, gpu: usize, from_ms: u64, to_ms: u64) -> f64 {
        self.pct_seconds(gpu, from_ms, to_ms, |s| s.while_allocated(s.busy_pct()))
    }

    /// SM-active seconds (as [`Self::sm_active_seconds`]) of the time in `[from, to)`
    /// during which a compute process held the GPU.
    pub fn allocated_sm_active_seconds(&self, gpu: usize, from_ms: u64, to_ms: u64) -> f64 {
        self.pct_seconds(gpu, from_ms, to_ms, |s| s.while_allocated(s.sm_pct()))
    }

    /// ∫ f(segment, its owners' share) dt over `[from, to)` in (unit of f) × ms, where
    /// the share is `owner`'s of the segment's allocated time: 1 / (number of distinct
    /// owners of the GPU's processes) while `owner` is one of them and the GPU is present
    /// with a process, else 0 — the agent's rule for a round, in the limit of short rounds.
    fn owner_integral<K: Ord>(
        &self,
        gpu: usize,
        from: u64,
        to: u64,
        owner_of: impl Fn(u32) -> K,
        owner: &K,
        f: impl Fn(&Segment) -> f64,
    ) -> f64 {
        self.segments(gpu)
            .iter()
            .filter(|s| s.allocated())
            .map(|s| {
                let overlap = to.min(s.end).saturating_sub(from.max(s.start));
                if overlap == 0 {
                    return 0.0;
                }
                let owners = self.owners_at(gpu, s.start, &owner_of);
                if !owners.contains(owner) {
                    return 0.0;
                }
                overlap as f64 * f(s) / owners.len() as f64
            })
            .sum()
    }

    /// Allocated seconds of GPU `gpu` in `[from, to)` attributed to `owner`: shared
    /// equally among the distinct owners (`owner_of` of each PID) holding it at each
    /// instant. Summed over owners, [`Self::allocated_seconds`].
    pub fn owner_allocated_seconds<K: Ord>(
        &self,
        gpu: usize,
        from_ms: u64,
        to_ms: u64,
        owner_of: impl Fn(u32) -> K,
        owner: &K,
    ) -> f64 {
        self.owner_integral(gpu, from_ms, to_ms, owner_of, owner, |_| 1.0) / 1000.0
    }

    /// `owner`'s share (as in [`Self::owner_allocated_seconds`]) of the allocated busy
    /// seconds. Summed over owners, [`Self::allocated_busy_seconds`].
    pub fn owner_busy_seconds<K: Ord>(
        &self,
        gpu: usize,
        from_ms: u64,
        to_ms: u64,
        owner_of: impl Fn(u32) -> K,
        owner: &K,
    ) -> f64 {
        self.owner_integral(gpu, from_ms, to_ms, owner_of, owner, |s| {
            s.busy_pct() as f64
        }) / 100_000.0
    }

    /// `owner`'s share of the allocated SM-active seconds: SM activity weighted by its
    /// share of the allocated time at each instant (the agent shares a GPM window's in
    /// proportion to each owner's allocated time in it). Summed over owners,
    /// [`Self::allocated_sm_active_seconds`].
    pub fn owner_sm_active_seconds<K: Ord>(
        &self,
        gpu: usize,
        from_ms: u64,
        to_ms: u64,
        owner_of: impl Fn(u32) -> K,
        owner: &K,
    ) -> f64 {
        self.owner_integral(gpu, from_ms, to_ms, owner_of, owner, |s| s.sm_pct() as f64) / 100_000.0
    }

    /// Energy drawn over `[from, to)`: constant power × present time, in J.
    pub fn energy_joules(&self, gpu: usize, from_ms: u64, to_ms: u64) -> f64 {
        let Some(g) = self.gpus.get(gpu) else {
            return 0.0;
        };
        f64::from(g.power_mw) * self.present_ms(gpu, from_ms, to_ms) as f64 / 1_000_000.0
    }

    /// The driver's total-energy counter at `t` (mJ): `energy_start_mj` plus
    /// what was drawn since 0, or only what was drawn since the reset once
    /// `energy_reset_at_ms` has passed.
    pub fn energy_counter_mj(&self, gpu: usize, t_ms: u64) -> u64 {
        let Some(g) = self.gpus.get(gpu) else {
            return 0;
        };
        let (base, since) = match g.energy_reset_at_ms {
            Some(reset) if t_ms >= reset => (0, reset),
            _ => (g.energy_start_mj, 0),
        };
        let drawn = u128::from(g.power_mw) * u128::from(self.present_ms(gpu, since, t_ms)) / 1000;
        base.saturating_add(u64::try_from(drawn).unwrap_or(u64::MAX))
    }

    /// Every XID event the driver can deliver (those scripted while the GPU
    /// was present), oldest first.
    pub fn xid_events(&self) -> Vec<XidEvent> {
        let mut events: Vec<XidEvent> = self
            .gpus
            .iter()
            .enumerate()
            .flat_map(|(gpu, g)| {
                g.xids.iter().map(move |x| XidEvent {
                    at_ms: x[0],
                    gpu,
                    code: x[1],
                })
            })
            .filter(|e| self.present_at(e.gpu, e.at_ms))
            .collect();
        events.sort_by_key(|e| (e.at_ms, e.gpu));
        events
    }

    /// Deliverable XID events with `code` on `gpu` in `[from, to)`.
    pub fn xid_count(&self, gpu: usize, code: u64, from_ms: u64, to_ms: u64) -> u64 {
        self.xid_events()
            .iter()
            .filter(|e| e.gpu == gpu && e.code == code && from_ms <= e.at_ms && e.at_ms < to_ms)
            .count() as u64
    }

    /// Latest `s <= before` such that the GPU was busy just before `s`.
    fn last_busy_end(&self, gpu: usize, before: u64) -> Option<u64> {
        self.segments(gpu)
            .iter()
            .filter(|s| s.start < before && s.busy_pct() > 0)
            .map(|s| s.end.min(before))
            .max()
    }

    /// The samples the driver holds at `now` that are newer than
    /// `after_timestamp_us`, oldest first.
    ///
    /// A sample ends at every `t_k = k × period` (k ≥ 1, `t_k <= now`; and
    /// k ≤ 0 back to `sampled_before_ms`, at the utilization of zero) and
    /// averages the busy time (as in [`Self::busy_pct_ms`]) over
    /// `(t_{k-1}, t_k]`, rounded to the nearest percent; so summing
    /// `value × period` gives [`Self::busy_seconds`], exactly when steps sit on
    /// multiples of the period. No sample ends while the driver is down or
    /// after the GPU was lost; none for idle periods when
    /// `samples_dry_when_idle`, none at all when `samples_broken`. Only the
    /// newest `ring` are kept.
    pub fn samples(&self, gpu: usize, now_ms: u64, after_timestamp_us: u64) -> Vec<DriverSample> {
        let Some(g) = self.gpus.get(gpu).filter(|g| !g.samples_broken) else {
            return Vec::new();
        };
        let period = self.period_ms();
        let last = g.lost_at_ms.map_or(now_ms, |lost| lost.min(now_ms));
        let mut k = last / period;
        let mut out = Vec::new();
        while k >= 1 && out.len() < self.ring {
            let t = k * period;
            if sample_timestamp_us(t) <= after_timestamp_us {
                break;
            }
            if let Some(w) = self.driver_down.iter().find(|w| w[0] <= t && t < w[1]) {
                // Jump to the last period ending before the window.
                k = w[0].saturating_sub(1) / period;
                continue;
            }
            let busy = self.busy_pct_ms(gpu, t - period, t);
            if busy == 0 && g.samples_dry_when_idle {
                // Jump to the period holding the end of the last busy stretch.
                match self.last_busy_end(gpu, t - period) {
                    Some(s) => k = s.div_ceil(period),
                    None => break,
                }
                continue;
            }
            let value = (busy + u128::from(period / 2)) / u128::from(period);
            out.push(DriverSample {
                t_ms: t as i64,
                timestamp_us: sample_timestamp_us(t),
                value: value.min(100) as u32,
            });
            k -= 1;
        }
        // Before zero, in the state of zero: ends at 0, −period, … (k ≤ 0).
        let value = self.util_at(gpu, 0);
        if k == 0 && self.present_at(gpu, 0) && !(value == 0 && g.samples_dry_when_idle) {
            let mut back = 0;
            while back < self.sampled_before_ms && out.len() < self.ring {
                let timestamp_us = SAMPLE_TIMESTAMP_BASE_US - back * 1000;
                if timestamp_us <= after_timestamp_us {
                    break;
                }
                out.push(DriverSample {
                    t_ms: -(back as i64),
                    timestamp_us,
                    value,
                });
                back += period;
            }
        }
        out.reverse();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(gpu: Gpu) -> Scenario {
        Scenario {
            gpus: vec![gpu],
            ..Scenario::default()
        }
    }

    #[test]
    fn defaults_and_json_roundtrip() {
        let s = Scenario::default();
        assert_eq!(s.gpus.len(), 2);
        assert_eq!(s.util_at(1, 12_345), 50);
        assert_eq!(s.uuid(0), "GPU-00000000-0000-0000-0000-000000000000");
        assert_eq!(s.uuid(1), "GPU-00000000-0000-0000-0000-000000000001");
        assert_eq!(s.pci_bus_id(1), "00000000:18:00.0");
        let parsed = Scenario::from_json(&s.to_json()).unwrap();
        assert_eq!(parsed, s);
        // Omitted fields take their defaults.
        let sparse = Scenario::from_json(r#"{"gpus":[{"util":[[0,70]]}]}"#).unwrap();
        assert_eq!(sparse.sample_period_ms, 100);
        assert_eq!(sparse.gpus[0].power_mw, 300_000);
        assert_eq!(sparse.util_at(0, 5), 70);
    }

    #[test]
    fn reorder_and_hang() {
        let mut s = Scenario {
            driver_down: vec![[100, 200], [300, 400]],
            reorder_on_reload: vec![vec![2, 0, 1]],
            hang_at_ms: Some(1000),
            hang_until_ms: Some(2000),
            gpus: vec![Gpu::default(), Gpu::default(), Gpu::default()],
            ..Scenario::default()
        };
        assert_eq!(s.gpu_at_index(0, 0), Some(0));
        assert_eq!(s.gpu_at_index(1, 0), Some(2));
        assert_eq!(s.index_of_gpu(1, 2), Some(0));
        assert_eq!(s.index_of_gpu(1, 0), Some(1));
        // No entry for the second reload: the scenario's order again.
        assert_eq!(s.gpu_at_index(2, 0), Some(0));
        assert_eq!(s.gpu_at_index(0, 3), None);
        assert!(!s.hung_at(999) && s.hung_at(1000) && s.hung_at(1999) && !s.hung_at(2000));
        s.hang_until_ms = None;
        assert!(s.hung_at(u64::MAX));
        assert!(Scenario::from_json(&s.to_json()).is_ok());
        s.reorder_on_reload = vec![vec![0, 0, 1]];
        assert!(Scenario::from_json(&s.to_json())
            .unwrap_err()
            .contains("reorder_on_reload[0]"));
    }

    #[test]
    fn a_driver_sampling_before_zero_has_a_ring_at_zero() {
        let mut s = Scenario {
            sampled_before_ms: 1_000,
            ring: 5,
            gpus: vec![Gpu::at_util(40)],
            ..Scenario::default()
        };
        let at_zero: Vec<(i64, u32)> = s
            .samples(0, 50, 0)
            .iter()
            .map(|x| (x.t_ms, x.value))
            .collect();
        assert_eq!(
            at_zero,
            vec![(-400, 40), (-300, 40), (-200, 40), (-100, 40), (0, 40)]
        );
        let later: Vec<i64> = s.samples(0, 250, 0).iter().map(|x| x.t_ms).collect();
        assert_eq!(later, vec![-200, -100, 0, 100, 200]);
        // The cursor applies across zero.
        let newer = s.samples(0, 250, sample_timestamp_us(0));
        assert_eq!(
            newer.iter().map(|x| x.t_ms).collect::<Vec<_>>(),
            vec![100, 200]
        );
        s.gpus[0] = Gpu {
            samples_dry_when_idle: true,
            ..Gpu::at_util(0)
        };
        assert!(s.samples(0, 50, 0).is_empty());
        s.gpus[0] = Gpu {
            samples_broken: true,
            ..Gpu::at_util(90)
        };
        assert!(s.samples(0, 5_000, 0).is_empty());
    }

    #[test]
    fn dry_then_busy_ground_truth() {
        let s = Scenario::dry_then_busy();
        assert!((s.busy_seconds(0, 0, 100_000) - (0.166 + 0.7 * 2.988)).abs() < 1e-9);
        // Dry before the blip, one sample for it, dry until the busy stretch.
        let early: Vec<i64> = s.samples(0, 4_900, 0).iter().map(|x| x.t_ms).collect();
        assert_eq!(early, vec![19 * 166]);
        let all = s.samples(0, 100_000, 0);
        assert_eq!(all.len(), 1 + 18);
        let sum: u64 = all.iter().map(|x| u64::from(x.value) * 166).sum();
        assert_eq!(u128::from(sum), s.busy_pct_ms(0, 0, 100_000));
    }

    #[test]
    fn rejects_typos() {
        assert!(Scenario::from_json(r#"{"gpus":[{"utilization":[[0,70]]}]}"#).is_err());
        assert!(Scenario::from_json(r#"{"gpus":[{"unsupported":["powr"]}]}"#).is_err());
        assert!(Scenario::from_json("not json").is_err());
    }

    #[test]
    fn step_functions() {
        let s = one(Gpu {
            util: vec![[1000, 80], [0, 20], [3000, 0]],
            ..Gpu::default()
        });
        assert_eq!(s.util_at(0, 0), 20);
        assert_eq!(s.util_at(0, 999), 20);
        assert_eq!(s.util_at(0, 1000), 80);
        assert_eq!(s.util_at(0, 5000), 0);
        assert_eq!(s.util_at(7, 0), 0);
        let late = one(Gpu {
            util: vec![[500, 40]],
            ..Gpu::default()
        });
        assert_eq!(late.util_at(0, 499), 0);
    }

    #[test]
    fn busy_present_allocated() {
        let s = Scenario {
            driver_down: vec![[4000, 5000]],
            gpus: vec![Gpu {
                util: vec![[0, 50], [2000, 100]],
                processes: vec![[0, 0], [1000, 2], [3000, 0]],
                lost_at_ms: Some(8000),
                ..Gpu::default()
            }],
            ..Scenario::default()
        };
        // 2 s at 50% + 2 s at 100% (2000..4000) + 3 s at 100% (5000..8000).
        assert!((s.busy_seconds(0, 0, 10_000) - 6.0).abs() < 1e-9);
        assert!((s.present_seconds(0, 0, 10_000) - 7.0).abs() < 1e-9);
        assert!((s.allocated_seconds(0, 0, 10_000) - 2.0).abs() < 1e-9);
        assert!((s.busy_seconds(0, 1500, 2500) - 0.75).abs() < 1e-9);
        assert!((s.energy_joules(0, 0, 10_000) - 2100.0).abs() < 1e-9);
        assert_eq!(s.present_seconds(3, 0, 10_000), 0.0);
        assert!(!s.present_at(0, 4500));
        assert!(s.present_at(0, 5000));
        assert!(!s.present_at(0, 8000));
        assert_eq!(s.reloads_begun(3999), 0);
        assert_eq!(s.reloads_begun(4000), 1);
    }

    #[test]
    fn gpm_activity_and_the_idle_split_ground_truth() {
        let s = Scenario {
            driver_down: vec![[4000, 5000]],
            gpus: vec![
                Gpu {
                    util: vec![[0, 50], [2000, 100]],
                    processes: vec![[0, 0], [1000, 1], [3000, 0]],
                    sm_active: Some(vec![[0, 20], [2500, 60]]),
                    tensor_active: vec![[1000, 10]],
                    ..Gpu::default()
                },
                // No SM script: SM activity follows utilization; no tensor activity.
                Gpu::at_util(40),
                Gpu::stuck(1),
                Gpu::pre_hopper(70),
            ],
            ..Scenario::default()
        };
        // SM: 2.5 s at 20 % + 1.5 s at 60 % (2500..4000) + 1 s at 60 % (5000..6000).
        assert!((s.sm_active_seconds(0, 0, 6000) - (0.5 + 0.9 + 0.6)).abs() < 1e-9);
        // Tensor: 10 % over 1000..4000 and 5000..6000.
        assert!((s.tensor_active_seconds(0, 0, 6000) - 0.4).abs() < 1e-9);
        // Allocated 1000..3000: busy 1 s at 50 % + 1 s at 100 %; SM 1.5 s at 20 % + 0.5 s at 60 %.
        assert!((s.allocated_busy_seconds(0, 0, 6000) - 1.5).abs() < 1e-9);
        assert!((s.allocated_sm_active_seconds(0, 0, 6000) - 0.6).abs() < 1e-9);
        assert!((s.allocated_seconds(0, 0, 6000) - 2.0).abs() < 1e-9);
        assert_eq!(s.sm_active_at(1, 123), 40);
        assert_eq!(s.tensor_active_at(1, 123), 0);
        assert!((s.sm_active_seconds(1, 0, 1000) - 0.4).abs() < 1e-9);
        // GPM averages are exact over [from, to), absent time as 0.
        let (sm, tensor) = s.gpm_averages(0, 2000, 3000);
        assert!((sm - 40.0).abs() < 1e-9 && (tensor - 10.0).abs() < 1e-9);
        let (sm, _) = s.gpm_averages(0, 3500, 5500);
        assert!((sm - 30.0).abs() < 1e-9, "{sm}");
        // A stuck GPU: busy and allocated all the time, its SMs idle.
        assert!((s.busy_seconds(2, 0, 3000) - 3.0).abs() < 1e-9);
        assert!((s.allocated_busy_seconds(2, 0, 3000) - 3.0).abs() < 1e-9);
        assert!((s.sm_active_seconds(2, 0, 3000) - 0.03).abs() < 1e-9);
        assert!(!s.gpus[3].supports(cap::GPM) && s.gpus[0].supports(cap::GPM));
        assert_eq!(s.gpus[3].name, PRE_HOPPER_GPU_NAME);
        let faulty = one(Gpu {
            gpm_fail: vec![[100, 200]],
            ..Gpu::default()
        });
        assert!(!faulty.gpm_fails_at(0, 99) && faulty.gpm_fails_at(0, 100));
        assert!(faulty.gpm_fails_at(0, 199) && !faulty.gpm_fails_at(0, 200));
        assert!(Scenario::from_json(r#"{"gpus":[{"unsupported":["gpm"]}]}"#).is_ok());
        assert_eq!(Scenario::from_json(&s.to_json()).unwrap(), s);
    }

    #[test]
    fn scripted_pids_and_the_owners_shares() {
        let s = one(Gpu {
            util: vec![[0, 50], [2000, 100]],
            pids: Some(vec![
                (1000, vec![7, 8, 9]),
                (0, vec![7]),
                (3000, vec![]),
                (4000, vec![9]),
            ]),
            sm_active: Some(vec![[0, 20]]),
            ..Gpu::default()
        });
        assert_eq!(s.pids_at(0, 999), vec![7]);
        assert_eq!(s.pids_at(0, 1000), vec![7, 8, 9]);
        assert_eq!(s.processes_at(0, 2000), 3);
        assert_eq!(s.processes_at(0, 3500), 0);
        // 7 and 8 are one owner's, 9 another's: `a` alone, then both, then none, then `b`.
        let owner_of = |pid: u32| if pid == 9 { "b" } else { "a" }.to_string();
        let both = |f: &dyn Fn(&str) -> f64| (f("a"), f("b"));
        let (alloc_a, alloc_b) =
            both(&|k| s.owner_allocated_seconds(0, 0, 5000, owner_of, &k.to_string()));
        assert!((alloc_a - 2.0).abs() < 1e-9 && (alloc_b - 2.0).abs() < 1e-9);
        assert!((alloc_a + alloc_b - s.allocated_seconds(0, 0, 5000)).abs() < 1e-9);
        // Busy: a 0.5 + 0.25 + 0.5; b 0.25 + 0.5 + 1.
        let (busy_a, busy_b) =
            both(&|k| s.owner_busy_seconds(0, 0, 5000, owner_of, &k.to_string()));
        assert!((busy_a - 1.25).abs() < 1e-9 && (busy_b - 1.75).abs() < 1e-9);
        assert!((busy_a + busy_b - s.allocated_busy_seconds(0, 0, 5000)).abs() < 1e-9);
        let (sm_a, sm_b) =
            both(&|k| s.owner_sm_active_seconds(0, 0, 5000, owner_of, &k.to_string()));
        assert!((sm_a - 0.4).abs() < 1e-9 && (sm_b - 0.4).abs() < 1e-9);
        assert!((sm_a + sm_b - s.allocated_sm_active_seconds(0, 0, 5000)).abs() < 1e-9);
        // Without a script: the `processes` count, PIDs from 1000.
        let plain = one(Gpu {
            processes: vec![[0, 2]],
            ..Gpu::default()
        });
        assert_eq!(plain.pids_at(0, 5), vec![1000, 1001]);
        assert_eq!(Scenario::from_json(&s.to_json()).unwrap(), s);
        let parsed = Scenario::from_json(r#"{"gpus":[{"pids":[[0,[5,6]],[100,[]]]}]}"#).unwrap();
        assert_eq!(parsed.pids_at(0, 50), vec![5, 6]);
        assert_eq!(parsed.processes_at(0, 100), 0);
    }

    #[test]
    fn energy_counter() {
        let s = one(Gpu {
            power_mw: 200_000,
            energy_start_mj: 5_000,
            energy_reset_at_ms: Some(10_000),
            ..Gpu::default()
        });
        assert_eq!(s.energy_counter_mj(0, 0), 5_000);
        assert_eq!(s.energy_counter_mj(0, 1000), 205_000);
        assert_eq!(s.energy_counter_mj(0, 10_000), 0);
        assert_eq!(s.energy_counter_mj(0, 10_500), 100_000);
        assert!((s.energy_joules(0, 0, 10_500) - 2100.0).abs() < 1e-9);
    }

    #[test]
    fn xids() {
        let s = Scenario {
            driver_down: vec![[100, 200]],
            gpus: vec![
                Gpu {
                    xids: vec![[50, 79], [150, 79], [300, 48], [900, 79]],
                    lost_at_ms: Some(800),
                    ..Gpu::default()
                },
                Gpu {
                    xids: vec![[40, 13]],
                    ..Gpu::default()
                },
            ],
            ..Scenario::default()
        };
        // 150 falls in the driver-down window, 900 after the loss.
        assert_eq!(s.xid_count(0, 79, 0, 1000), 1);
        assert_eq!(s.xid_count(0, 48, 0, 1000), 1);
        assert_eq!(s.xid_count(0, 48, 0, 300), 0);
        let order: Vec<_> = s.xid_events().iter().map(|e| (e.gpu, e.code)).collect();
        assert_eq!(order, vec![(1, 13), (0, 79), (0, 48)]);
    }

    #[test]
    fn samples_sum_to_busy_time() {
        let s = Scenario {
            sample_period_ms: 100,
            ring: 1000,
            gpus: vec![Gpu {
                util: vec![[0, 30], [1000, 90], [1550, 10]],
                ..Gpu::default()
            }],
            ..Scenario::default()
        };
        let samples = s.samples(0, 3050, 0);
        assert_eq!(samples.len(), 30);
        assert_eq!(samples[0].t_ms, 100);
        assert_eq!(samples[0].timestamp_us, SAMPLE_TIMESTAMP_BASE_US + 100_000);
        assert_eq!(samples[0].value, 30);
        assert_eq!(samples[15].value, 50); // (1500, 1600]: half 90, half 10
        let sum: u64 = samples.iter().map(|x| u64::from(x.value) * 100).sum();
        assert_eq!(sum as u128, s.busy_pct_ms(0, 0, 3000));
        // The cursor hides what was already seen.
        let newer = s.samples(0, 3050, samples[27].timestamp_us);
        assert_eq!(newer, samples[28..].to_vec());
        assert!(s.samples(0, 3050, samples[29].timestamp_us).is_empty());
    }

    #[test]
    fn samples_ring_loss_down_and_dry() {
        let mut s = Scenario {
            sample_period_ms: 100,
            ring: 5,
            driver_down: vec![[1000, 1300]],
            gpus: vec![Gpu {
                util: vec![[0, 40], [2000, 0], [5000, 60]],
                lost_at_ms: Some(6000),
                ..Gpu::default()
            }],
            ..Scenario::default()
        };
        let ring: Vec<i64> = s.samples(0, 1450, 0).iter().map(|x| x.t_ms).collect();
        // (1200, 1300] lies in the window but ends as the driver is back.
        assert_eq!(ring, vec![700, 800, 900, 1300, 1400]);
        let lost: Vec<i64> = s.samples(0, 9999, 0).iter().map(|x| x.t_ms).collect();
        assert_eq!(lost, vec![5600, 5700, 5800, 5900, 6000]);
        s.gpus[0].samples_dry_when_idle = true;
        s.ring = 100;
        let dry: Vec<i64> = s.samples(0, 5200, 0).iter().map(|x| x.t_ms).collect();
        let mut expected: Vec<i64> = (1..=9).map(|k| k * 100).collect();
        expected.extend((14..=20).map(|k| k * 100));
        expected.extend([5100, 5200]);
        assert_eq!(dry, expected);
        s.ring = 0;
        assert!(s.samples(0, 5200, 0).is_empty());
    }
}
