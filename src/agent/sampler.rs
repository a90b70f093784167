//! The sampling loop: NVML → readings → counters, once per interval, on its own
//! thread (NVML calls block). It never exits on a driver or GPU fault: it reports
//! the fault as a metric, logs each state change once, and retries with backoff.
//!
//! A round reads every GPU without holding any lock, takes one instant, then applies
//! all of its updates under the metrics' write lock, so a scrape sees whole rounds.
//! Observed time runs from round instant to round instant; each GPU's sample read
//! carries its own instant, on which its samples are mapped onto the driver's
//! timeline (see [`nvml::SampleRead`]).

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};
use prometheus::Counter;
use tokio::sync::watch;

use crate::clock::{self, AgentClock};

use super::accrue::{DryBufferWatch, GpuAccount, SampleIntegrator};
use super::attribution::GpuOwners;
use super::metrics::{
    AgentMetrics, GaugeKind, GpuInfoLabels, GpuSeries, GpuXidLabels, OwnerLabels,
};
use super::nvml::{self, Caps, Fault, Gpm, GpmMode, Identity, ReadError, SampleRead, Snapshot};
use super::procfs::Owners;
use crate::owner::Owner;

#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    #[error("cannot start the sampling thread: {0}")]
    Spawn(std::io::Error),
    #[error("the sampling thread panicked: {0}")]
    Panicked(String),
    #[error("the sampling thread stopped on its own")]
    Exited,
}

#[derive(Debug, Clone)]
pub struct SamplerConfig {
    pub interval: Duration,
    pub library: Option<PathBuf>,
    /// Where the owners of GPU processes are read from, and how long ended ones stay.
    pub owners: crate::agent::procfs::OwnersConfig,
    /// Pods' names from the kubelet's pod-resources socket, refreshed off this thread.
    pub pods: Option<Arc<crate::agent::kubelet::PodNames>>,
}

impl SamplerConfig {
    /// A gap between readings longer than this is not counted as observed time, and
    /// a sampler whose last round is older than this is not ready.
    pub fn max_gap(&self) -> Duration {
        (self.interval * 5).max(Duration::from_secs(5))
    }
}

/// Shared with the HTTP side: whether rounds are being completed.
pub struct Status {
    clock: AgentClock,
    max_gap: Duration,
    /// A round completed in the current NVML session.
    sampling: AtomicBool,
    last_round_ms: AtomicU64,
}

/// What `/-/ready` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// NVML is down, or no round has completed since it came up.
    NotSampled,
    /// The last round completed this long ago, more than `max_gap`: the sampler is
    /// stuck (a hung NVML call), and its counters have stopped.
    Stalled(Duration),
}

impl Status {
    pub fn new(clock: AgentClock, max_gap: Duration) -> Self {
        Self {
            clock,
            max_gap,
            sampling: AtomicBool::new(false),
            last_round_ms: AtomicU64::new(0),
        }
    }

    pub fn readiness(&self) -> Readiness {
        if !self.sampling.load(Ordering::Acquire) {
            return Readiness::NotSampled;
        }
        let last = self.last_round_ms.load(Ordering::Acquire);
        let since = Duration::from_millis(self.clock.now_ms().saturating_sub(last));
        if since > self.max_gap {
            Readiness::Stalled(since)
        } else {
            Readiness::Ready
        }
    }

    pub fn max_gap(&self) -> Duration {
        self.max_gap
    }

    fn round_done(&self, at_ms: u64) {
        self.last_round_ms.store(at_ms, Ordering::Release);
        self.sampling.store(true, Ordering::Release);
    }

    fn session_ended(&self) {
        self.sampling.store(false, Ordering::Release);
    }
}

/// A thread whose end is reported, a panic included, so that the process can exit
/// instead of serving frozen counters.
pub struct Supervised {
    ended: watch::Receiver<Option<Result<(), String>>>,
}

/// Runs `body` on a thread named `name` under `catch_unwind`; a panic is logged and
/// reported by [`Supervised::ended`].
pub fn supervise(
    name: &str,
    body: impl FnOnce() + Send + 'static,
) -> Result<Supervised, SamplerError> {
    let (report, ended) = watch::channel(None);
    let thread = name.to_string();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(body))
                .map_err(|panic| panic_message(panic.as_ref()));
            if let Err(message) = &outcome {
                tracing::error!(%thread, error = %message, "thread panicked; the agent exits so that its service manager restarts it");
            }
            report.send_replace(Some(outcome));
        })
        .map_err(SamplerError::Spawn)?;
    Ok(Supervised { ended })
}

impl Supervised {
    /// Waits for the thread to end: `Ok` if its body returned, else the panic.
    pub async fn ended(&mut self) -> Result<(), SamplerError> {
        let outcome = match self.ended.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone(),
            Err(_) => Some(Err("the thread ended without a report".into())),
        };
        outcome.unwrap_or(Ok(())).map_err(SamplerError::Panicked)
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".into()
    }
}

pub struct Sampler {
    stop: mpsc::Sender<()>,
    thread: Supervised,
}

impl Sampler {
    pub fn spawn(
        cfg: SamplerConfig,
        clock: AgentClock,
        metrics: Arc<AgentMetrics>,
        status: Arc<Status>,
    ) -> Result<Self, SamplerError> {
        let (stop, stopped) = mpsc::channel();
        let thread = supervise("nvml-sampler", move || {
            Loop::new(cfg, clock, metrics, status, stopped).run()
        })?;
        Ok(Self { stop, thread })
    }

    /// Completes when the sampling thread ends; before [`Self::stop`] it only ends by
    /// panicking.
    pub async fn ended(&mut self) -> Result<(), SamplerError> {
        self.thread.ended().await
    }

    /// Stops sampling and waits for the thread, at most `patience`: a thread stuck in
    /// an NVML call is left to the end of the process.
    pub async fn stop(mut self, patience: Duration) -> Result<(), SamplerError> {
        let _ = self.stop.send(());
        match tokio::time::timeout(patience, self.thread.ended()).await {
            Ok(outcome) => outcome,
            Err(_) => {
                tracing::warn!(
                    "the sampling thread did not stop (stuck in an NVML call?); exiting without it"
                );
                Ok(())
            }
        }
    }
}

/// Exponential backoff for re-initializing NVML: 1 s doubling to 60 s.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(60);

    fn new() -> Self {
        Self { next: Self::FIRST }
    }
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
    fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }
}

/// A GPU as known across driver sessions, keyed by UUID.
struct Gpu {
    account: GpuAccount,
    /// Labelled with the index at which the process first saw the UUID.
    series: GpuSeries,
    allocated: Option<Counter>,
    /// Created with `allocated`.
    allocated_busy: Option<Counter>,
    energy: Option<Counter>,
    /// `None` until decided, at the GPU's first answered round in this process; then
    /// the GPM series, or `None` for a GPU without GPM. Never switched afterwards.
    gpm: Option<Option<GpmSeries>>,
    /// The identity and sources `commitmeter_gpu_info` shows now.
    info: Option<(Identity, Sources)>,
    up: bool,
    /// The owners of its processes and their shares ([`super::attribution`]).
    owners: GpuOwners,
    /// The series of each owner in `owners`.
    owner_series: HashMap<Owner, OwnerSeries>,
    /// Owners beyond the bound were sent to the catch-all in the last round.
    overflowing: bool,
}

/// The counters of one owner of a GPU, created at 0 when it is first seen.
struct OwnerSeries {
    allocated: Counter,
    busy: Counter,
    /// GPUs with GPM only; created once that is decided.
    sm_active: Option<Counter>,
    /// Whether `commitmeter_gpu_owner_info` is exported for it now.
    info: bool,
}

/// The GPM counters of a GPU with GPM, created at 0 when that is decided.
struct GpmSeries {
    sm_active: Counter,
    tensor_active: Counter,
    /// Created with the GPU's `allocated`.
    allocated_sm_active: Option<Counter>,
}

/// One index in the current driver session.
struct Slot {
    index: u32,
    identity: Option<Identity>,
    caps: Caps,
    /// Whether GPM is used, as of the last read (see [`nvml::GpmMode`]).
    gpm: GpmMode,
    samples: SampleIntegrator,
    dry: DryBufferWatch,
    lost_logged: bool,
}

enum End {
    Stop,
    Driver(NvmlError),
}

/// What one round read, applied at once under the write lock.
#[derive(Default)]
struct Round {
    /// Per slot read this round: its snapshot, or `None` when it did not answer.
    outcomes: Vec<(usize, Option<Snapshot>)>,
    /// XID events: UUID, the index to label an unknown GPU with, code.
    xids: Vec<(String, String, String)>,
    /// Failed NVML calls: call, error label.
    errors: Vec<(&'static str, String)>,
    /// Per slot read with its processes: the owner of each PID, in the order of
    /// `Snapshot::pids` (read from procfs before the round is applied).
    holders: HashMap<usize, Vec<Owner>>,
}

struct Loop {
    cfg: SamplerConfig,
    clock: AgentClock,
    metrics: Arc<AgentMetrics>,
    status: Arc<Status>,
    stopped: mpsc::Receiver<()>,
    gpus: HashMap<String, Gpu>,
    last_nvml_error: Option<String>,
    /// XID lines: a GPU's first at once, then a summary per GPU every 5 minutes at most.
    xid_log: super::xidlog::XidLog,
    /// The owner of each GPU process, from procfs.
    owners: Owners,
}

impl Loop {
    fn new(
        cfg: SamplerConfig,
        clock: AgentClock,
        metrics: Arc<AgentMetrics>,
        status: Arc<Status>,
        stopped: mpsc::Receiver<()>,
    ) -> Self {
        Self {
            owners: match &cfg.pods {
                Some(p) => Owners::new(cfg.owners.clone()).with_pods(p.clone()),
                None => Owners::new(cfg.owners.clone()),
            },
            cfg,
            clock,
            metrics,
            status,
            stopped,
            gpus: HashMap::new(),
            last_nvml_error: None,
            xid_log: Default::default(),
        }
    }

    /// Sleeps until `deadline`; true when asked to stop.
    fn sleep_until(&self, deadline: Instant) -> bool {
        let wait = deadline.saturating_duration_since(clock::monotonic_now());
        !matches!(
            self.stopped.recv_timeout(wait),
            Err(RecvTimeoutError::Timeout)
        )
    }

    fn run(mut self) {
        let mut backoff = Backoff::new();
        loop {
            let error = match nvml::open(self.cfg.library.as_deref()) {
                Ok(lib) => {
                    backoff.reset();
                    self.last_nvml_error = None;
                    self.metrics.nvml_up.set(1);
                    let driver = lib.sys_driver_version().unwrap_or_default();
                    tracing::info!(driver_version = %driver, "NVML initialized");
                    let (end, errors) = self.session(&lib);
                    {
                        let _round = self.metrics.round();
                        self.count_errors(&errors);
                        self.metrics.nvml_up.set(0);
                        for gpu in self.gpus.values_mut() {
                            mark_down(&self.metrics, gpu);
                        }
                    }
                    self.status.session_ended();
                    match end {
                        End::Stop => return,
                        End::Driver(e) => e,
                    }
                }
                Err(e) => e,
            };
            self.metrics.nvml_up.set(0);
            let msg = error.to_string();
            if self.last_nvml_error.as_deref() != Some(msg.as_str()) {
                tracing::error!(error = %msg, "NVML unavailable; retrying with backoff");
                self.metrics.nvml_error("init", &nvml::error_label(&error));
                self.last_nvml_error = Some(msg);
            }
            if self.sleep_until(clock::monotonic_now() + backoff.step()) {
                return;
            }
        }
    }

    /// Samples until the driver fails or a stop is asked for; returns why, with the
    /// failed calls of the unfinished round.
    fn session(&mut self, lib: &Nvml) -> (End, Vec<(&'static str, String)>) {
        let count = match lib.device_count() {
            Ok(n) => n,
            Err(e) => return (End::Driver(e), Vec::new()),
        };
        let mut slots: Vec<Slot> = (0..count)
            .map(|index| Slot {
                index,
                identity: None,
                caps: Caps::default(),
                gpm: GpmMode::Off,
                samples: SampleIntegrator::default(),
                dry: DryBufferWatch::default(),
                lost_logged: false,
            })
            .collect();
        let mut devices: Vec<Option<Device<'_>>> = (0..count).map(|_| None).collect();
        // Each GPU's previous GPM sample: dropped (freed) before `lib` is.
        let mut gpms: Vec<Gpm<'_>> = (0..count).map(|_| Gpm::new(GpmMode::Off)).collect();
        tracing::info!(gpus = count, "enumerated GPUs");
        let mut events = match lib.create_event_set() {
            Ok(set) => Some(set),
            Err(e) => {
                tracing::warn!(error = %e, "XID events unavailable");
                None
            }
        };
        let mut registered = vec![false; count as usize];
        let mut last_round: Option<u64> = None;
        let mut next = clock::monotonic_now();
        loop {
            // NVML first, without any lock: a slow or hung call never blocks a scrape.
            let mut round = Round::default();
            for (i, (slot, dev)) in slots.iter_mut().zip(devices.iter_mut()).enumerate() {
                if dev.is_none() {
                    let found = lib
                        .device_by_index(slot.index)
                        .and_then(|d| nvml::identify(&d).map(|id| (d, id)));
                    match found {
                        Ok((d, id)) => {
                            // Decided once per GPU in this process.
                            let mode = match self.gpus.get(&id.uuid).and_then(|g| g.gpm.as_ref()) {
                                Some(Some(_)) => GpmMode::On,
                                Some(None) => GpmMode::Off,
                                None => nvml::gpm_mode(&d, &mut |call, e| {
                                    round.errors.push((call, nvml::error_label(e)))
                                }),
                            };
                            adopt(slot, id);
                            gpms[i] = Gpm::new(mode);
                            *dev = Some(d);
                        }
                        Err(e) if nvml::classify(&e) == Fault::Driver => {
                            return (End::Driver(e), round.errors)
                        }
                        Err(e) => {
                            lost(slot, &e);
                            gpms[i].forget();
                            round.outcomes.push((i, None));
                            continue;
                        }
                    }
                }
                let Some(d) = dev.as_ref() else { continue };
                if !registered[slot.index as usize] {
                    if let Some(set) = events.take() {
                        events = match d.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
                            Ok(set) => {
                                registered[slot.index as usize] = true;
                                Some(set)
                            }
                            // Registration failure frees the set: make a new one for the others.
                            Err(e) => {
                                tracing::warn!(gpu = slot.index, error = %e, "XID events unavailable for GPU");
                                registered[slot.index as usize] = true;
                                lib.create_event_set().ok()
                            }
                        };
                    }
                }
                let errors = &mut round.errors;
                let mut on_error = |call, e: &NvmlError| errors.push((call, nvml::error_label(e)));
                let gpm = &mut gpms[i];
                let was_failing = gpm.failing;
                let read = nvml::read(
                    d,
                    &mut slot.caps,
                    slot.samples.cursor(),
                    &self.clock,
                    &mut on_error,
                )
                .and_then(|mut snap| {
                    snap.activity = nvml::read_gpm(lib, d, gpm, &self.clock, &mut on_error)?;
                    Ok(snap)
                });
                slot.gpm = gpm.mode;
                if gpm.failing != was_failing {
                    if gpm.failing {
                        tracing::warn!(
                            gpu = slot.index,
                            "GPM sampling failing (see commitmeter_nvml_errors_total); SM and tensor activity are not counted until it recovers"
                        );
                    } else {
                        tracing::info!(gpu = slot.index, "GPM sampling recovered");
                    }
                }
                match read {
                    Ok(snap) => round.outcomes.push((i, Some(snap))),
                    Err(ReadError::Driver(e)) => return (End::Driver(e), round.errors),
                    Err(ReadError::Lost(e)) => {
                        lost(slot, &e);
                        gpms[i].forget();
                        *dev = None;
                        round.outcomes.push((i, None));
                    }
                }
            }
            if let Some(set) = &events {
                if let Err(e) = self.drain_events(set, &mut round) {
                    return (End::Driver(e), round.errors);
                }
            }
            self.read_owners(&slots, &mut round);
            for l in self.xid_log.flush(clock::monotonic_now()) {
                tracing::warn!(
                    uuid = %l.uuid,
                    count = l.held_back,
                    xids = %l.codes,
                    "XID errors since this GPU's last XID line (at most one line per GPU every 5 minutes)"
                );
            }

            // One instant for the whole round, then every update at once.
            let at = self.clock.now_ms();
            {
                let metrics = self.metrics.clone();
                let _round = metrics.round();
                self.apply(&mut slots, round, at, last_round);
            }
            last_round = Some(at);
            self.status.round_done(at);

            // Fixed-rate schedule; after a stall, resume from now rather than burst.
            next += self.cfg.interval;
            let now = clock::monotonic_now();
            if next < now {
                next = now + self.cfg.interval;
            }
            if self.sleep_until(next) {
                return (End::Stop, Vec::new());
            }
        }
    }

    /// Maps every PID the round read to its owner (procfs, cached per PID), without any
    /// lock, and lets the cache forget the PIDs no GPU reported.
    fn read_owners(&mut self, slots: &[Slot], round: &mut Round) {
        let mut live = HashSet::new();
        for (i, snap) in &round.outcomes {
            if let Some(pids) = snap.as_ref().and_then(|s| s.pids.as_ref()) {
                live.extend(pids.iter().copied());
                let uuid = slots[*i]
                    .identity
                    .as_ref()
                    .map_or("", |id| id.uuid.as_str());
                let owners = pids
                    .iter()
                    .map(|&pid| self.owners.owner_on(pid, uuid))
                    .collect();
                round.holders.insert(*i, owners);
            }
        }
        self.owners.retain(&live);
    }

    /// Applies a round read at `at` (ms on the agent's clock); the caller holds the
    /// write lock.
    fn apply(&mut self, slots: &mut [Slot], round: Round, at: u64, last_round: Option<u64>) {
        let max_gap = self.cfg.max_gap();
        let at_d = Duration::from_millis(at);
        for (i, snap) in round.outcomes {
            let slot = &mut slots[i];
            if let Some(SampleRead::New { samples: new, .. }) = snap.as_ref().map(|s| &s.samples) {
                let rate_busy = snap.as_ref().and_then(|s| s.utilization) > Some(0.0);
                if slot.dry.broken(at_d, !new.is_empty(), rate_busy, max_gap) {
                    tracing::warn!(
                        gpu = slot.index,
                        "the sample buffer stays empty while the utilization rate says busy; counting busy time from the rate"
                    );
                    slot.caps.samples = false;
                }
            }
            let Some(id) = &slot.identity else { continue };
            let gpu = self.gpus.entry(id.uuid.clone()).or_insert_with(|| Gpu {
                account: GpuAccount::default(),
                series: self.metrics.gpu(slot.index, &id.uuid),
                allocated: None,
                allocated_busy: None,
                energy: None,
                gpm: None,
                info: None,
                up: false,
                owners: GpuOwners::default(),
                owner_series: HashMap::new(),
                overflowing: false,
            });
            if gpu.gpm.is_none() && snap.is_some() && slot.gpm != GpmMode::Probe {
                let l = gpu.series.labels();
                gpu.gpm = Some((slot.gpm == GpmMode::On).then(|| GpmSeries {
                    sm_active: self.metrics.sm_active.with(&l),
                    tensor_active: self.metrics.tensor_active.with(&l),
                    allocated_sm_active: None,
                }));
            }
            let sources = Sources {
                busy: slot.caps.busy_source(),
                activity: if matches!(gpu.gpm, Some(Some(_))) {
                    "gpm"
                } else {
                    "none"
                },
            };
            set_info(&self.metrics, gpu, id, sources);
            let Some(snap) = snap else {
                mark_down(&self.metrics, gpu);
                continue;
            };
            if !gpu.up {
                gpu.up = true;
                gpu.series.up.set(1.0);
            }
            let reading = snap.reading(&slot.caps, &mut slot.samples);
            let inc = gpu.account.healthy(at_d, &reading, max_gap);
            gpu.series.observed.inc_by(inc.observed_s);
            gpu.series.busy.inc_by(inc.busy_s);
            if snap.processes.is_some() {
                let l = gpu.series.labels();
                let c = gpu
                    .allocated
                    .get_or_insert_with(|| self.metrics.allocated.with(&l));
                c.inc_by(inc.allocated_s);
                let c = gpu
                    .allocated_busy
                    .get_or_insert_with(|| self.metrics.allocated_busy.with(&l));
                c.inc_by(inc.allocated_busy_s);
                if let Some(Some(g)) = &mut gpu.gpm {
                    let c = g
                        .allocated_sm_active
                        .get_or_insert_with(|| self.metrics.allocated_sm_active.with(&l));
                    c.inc_by(inc.allocated_sm_active_s);
                }
            }
            if let Some(Some(g)) = &gpu.gpm {
                g.sm_active.inc_by(inc.sm_active_s);
                g.tensor_active.inc_by(inc.tensor_active_s);
            }
            let holders = round.holders.get(&i).map_or(&[][..], Vec::as_slice);
            gpu.owners.healthy(at_d, holders, &inc);
            add_owner_shares(&self.metrics, gpu);
            if snap.energy_mj.is_some() {
                let c = gpu
                    .energy
                    .get_or_insert_with(|| self.metrics.energy.with(&gpu.series.labels()));
                c.inc_by(inc.energy_j);
            }
            let m = &self.metrics;
            let s = &gpu.series;
            m.set_gauge(GaugeKind::Utilization, s, snap.utilization);
            m.set_gauge(GaugeKind::MemoryUsed, s, snap.memory_used.map(|b| b as f64));
            m.set_gauge(
                GaugeKind::MemoryTotal,
                s,
                snap.memory_total.map(|b| b as f64),
            );
            m.set_gauge(GaugeKind::Power, s, snap.power_w);
            m.set_gauge(GaugeKind::PowerLimit, s, snap.power_limit_w);
            m.set_gauge(GaugeKind::Temperature, s, snap.temperature_c);
            m.set_gauge(GaugeKind::SmClock, s, snap.sm_clock_hz);
            m.set_gauge(GaugeKind::Processes, s, snap.processes.map(f64::from));
        }
        for gpu in self.gpus.values_mut() {
            expire_owners(&self.metrics, gpu, at_d, self.cfg.owners.retention);
        }
        for (uuid, index, code) in &round.xids {
            // The GPU's own label when known, so the XID joins its other series.
            let gpu = self
                .gpus
                .get(uuid)
                .map_or(index.as_str(), |g| g.series.gpu.as_str());
            self.metrics
                .xid
                .with(&GpuXidLabels {
                    gpu,
                    uuid,
                    xid: code,
                })
                .inc();
        }
        self.count_errors(&round.errors);
        // Same rule and same arithmetic as a GPU's observed time.
        let gap = last_round
            .map(|prev| Duration::from_millis(at.saturating_sub(prev)))
            .filter(|gap| *gap <= max_gap)
            .unwrap_or_default();
        self.metrics.sampled.inc_by(gap.as_secs_f64());
        self.metrics.polls.inc();
        self.metrics.last_round.set(self.clock.wall_seconds(at));
    }

    fn count_errors(&self, errors: &[(&'static str, String)]) {
        for (call, error) in errors {
            self.metrics.nvml_error(call, error);
        }
    }

    /// Takes every pending XID event without blocking.
    fn drain_events(
        &mut self,
        set: &nvml_wrapper::event::EventSet<'_>,
        round: &mut Round,
    ) -> Result<(), NvmlError> {
        loop {
            match set.wait(0) {
                Ok(ev) => {
                    if !ev.event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
                        continue;
                    }
                    let uuid = ev.device.uuid().unwrap_or_default();
                    let code = match ev.event_data {
                        Some(nvml_wrapper::enums::event::XidError::Value(v)) => v.to_string(),
                        Some(nvml_wrapper::enums::event::XidError::Unknown) | None => {
                            "unknown".into()
                        }
                    };
                    let index = ev.device.index().map(|i| i.to_string()).unwrap_or_default();
                    if self.xid_log.event(&uuid, &code, clock::monotonic_now()) {
                        tracing::warn!(gpu = %index, uuid = %uuid, xid = %code, "XID error");
                    }
                    round.xids.push((uuid, index, code));
                }
                Err(NvmlError::Timeout) => return Ok(()),
                Err(e) => match nvml::classify(&e) {
                    Fault::Driver => return Err(e),
                    _ => {
                        round.errors.push(("event_wait", nvml::error_label(&e)));
                        return Ok(());
                    }
                },
            }
        }
    }
}

/// Binds an index of this session to a GPU (new, or seen before under its UUID).
/// Sample integration starts afresh: what the buffer holds from before is not
/// observed time.
fn adopt(slot: &mut Slot, id: Identity) {
    if slot.identity.as_ref().map(|i| &i.uuid) != Some(&id.uuid) {
        slot.caps = Caps::default();
    }
    slot.samples = SampleIntegrator::default();
    slot.dry = DryBufferWatch::default();
    tracing::info!(gpu = slot.index, uuid = %id.uuid, model = %id.model, "GPU present");
    slot.identity = Some(id);
    slot.lost_logged = false;
}

fn lost(slot: &mut Slot, e: &NvmlError) {
    if !slot.lost_logged {
        let uuid = slot.identity.as_ref().map_or("", |i| i.uuid.as_str());
        tracing::error!(gpu = slot.index, uuid, error = %e, "GPU not answering; accrual stopped");
        slot.lost_logged = true;
    }
}

/// Keeps `commitmeter_gpu_info` in step with the GPU's identity and sources, under
/// the GPU's own `gpu` label.
fn set_info(metrics: &AgentMetrics, gpu: &mut Gpu, id: &Identity, sources: Sources) {
    if gpu
        .info
        .as_ref()
        .is_some_and(|(i, s)| i == id && *s == sources)
    {
        return;
    }
    fn labels<'a>(gpu: &'a str, id: &'a Identity, sources: Sources) -> GpuInfoLabels<'a> {
        GpuInfoLabels {
            gpu,
            uuid: &id.uuid,
            model: &id.model,
            pci_bus_id: &id.pci_bus_id,
            busy_source: sources.busy,
            activity_source: sources.activity,
        }
    }
    if let Some((old, old_sources)) = &gpu.info {
        metrics
            .gpu_info
            .remove(&labels(&gpu.series.gpu, old, *old_sources));
    }
    metrics
        .gpu_info
        .with(&labels(&gpu.series.gpu, id, sources))
        .set(1.0);
    gpu.info = Some((id.clone(), sources));
}

/// The sources `commitmeter_gpu_info` names: of busy time, and of SM/tensor activity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sources {
    busy: &'static str,
    activity: &'static str,
}

fn mark_down(metrics: &AgentMetrics, gpu: &mut Gpu) {
    gpu.account.interrupted();
    gpu.owners.interrupted();
    gpu.up = false;
    gpu.series.up.set(0.0);
    metrics.clear_gauges(&gpu.series);
    for (owner, s) in &mut gpu.owner_series {
        if s.info {
            metrics
                .owner_info
                .remove(&OwnerLabels::of(&gpu.series, owner));
            s.info = false;
        }
    }
}

/// Adds the last round's shares to each owner's counters (created at 0 for a new owner),
/// in the same round as the GPU's own counters.
fn add_owner_shares(metrics: &AgentMetrics, gpu: &mut Gpu) {
    let gpm = matches!(gpu.gpm, Some(Some(_)));
    for o in gpu.owners.owners() {
        let series = match gpu.owner_series.get_mut(&o.owner) {
            Some(s) => s,
            None => {
                let l = OwnerLabels::of(&gpu.series, &o.owner);
                tracing::debug!(gpu = %gpu.series.gpu, owner_kind = %o.owner.kind, owner = %o.owner.id, "new owner of the GPU");
                let s = OwnerSeries {
                    allocated: metrics.owner_allocated.with(&l),
                    busy: metrics.owner_busy.with(&l),
                    sm_active: None,
                    info: false,
                };
                gpu.owner_series.entry(o.owner.clone()).or_insert(s)
            }
        };
        if gpm && series.sm_active.is_none() {
            let l = OwnerLabels::of(&gpu.series, &o.owner);
            series.sm_active = Some(metrics.owner_sm_active.with(&l));
        }
        series.allocated.inc_by(o.last.allocated_s);
        series.busy.inc_by(o.last.busy_s);
        if let Some(c) = &series.sm_active {
            c.inc_by(o.last.sm_active_s);
        }
    }
    let overflow = gpu.owners.overflow();
    if (overflow > 0) != gpu.overflowing {
        gpu.overflowing = overflow > 0;
        if gpu.overflowing {
            tracing::warn!(
                gpu = %gpu.series.gpu,
                owners = overflow + super::attribution::MAX_OWNERS - 1,
                "more owners hold the GPU than are exported per GPU; the rest is counted as owner `unknown`"
            );
        } else {
            tracing::info!(gpu = %gpu.series.gpu, "owners of the GPU within the bound again");
        }
    }
}

/// Removes the series of the owners gone past the retention (or evicted for a newcomer)
/// and keeps `commitmeter_gpu_owner_info` to the owners holding the GPU now.
fn expire_owners(metrics: &AgentMetrics, gpu: &mut Gpu, at: Duration, retention: Duration) {
    gpu.owners.expire(at, retention);
    for owner in gpu.owners.take_removed() {
        if let Some(s) = gpu.owner_series.remove(&owner) {
            let l = OwnerLabels::of(&gpu.series, &owner);
            metrics.owner_allocated.remove(&l);
            metrics.owner_busy.remove(&l);
            if s.sm_active.is_some() {
                metrics.owner_sm_active.remove(&l);
            }
            if s.info {
                metrics.owner_info.remove(&l);
            }
            tracing::debug!(gpu = %gpu.series.gpu, owner_kind = %owner.kind, owner = %owner.id, "owner's series removed after the retention");
        }
    }
    for o in gpu.owners.owners() {
        let Some(s) = gpu.owner_series.get_mut(&o.owner) else {
            continue;
        };
        if s.info != o.holding {
            let l = OwnerLabels::of(&gpu.series, &o.owner);
            if o.holding {
                metrics.owner_info.with(&l).set(1.0);
            } else {
                metrics.owner_info.remove(&l);
            }
            s.info = o.holding;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_minute_and_resets() {
        let mut b = Backoff::new();
        let steps: Vec<u64> = (0..8).map(|_| b.step().as_secs()).collect();
        assert_eq!(steps, [1, 2, 4, 8, 16, 32, 60, 60]);
        b.reset();
        assert_eq!(b.step().as_secs(), 1);
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn a_panicking_thread_ends_in_the_panic_error() {
        let mut thread = supervise("test-panics", || panic!("boom in round 3")).unwrap();
        match block_on(thread.ended()) {
            Err(SamplerError::Panicked(message)) => assert_eq!(message, "boom in round 3"),
            other => panic!("expected the panic, got {other:?}"),
        }
        let mut formatted = supervise("test-panics", || {
            let round = 4;
            panic!("boom in round {round}")
        })
        .unwrap();
        let err = block_on(formatted.ended()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the sampling thread panicked: boom in round 4"
        );
    }

    #[test]
    fn a_thread_that_returns_ends_ok_and_can_be_awaited_again() {
        let mut thread = supervise("test-returns", || {}).unwrap();
        assert!(block_on(thread.ended()).is_ok());
        assert!(block_on(thread.ended()).is_ok());
    }

    #[test]
    fn readiness_goes_stale_after_max_gap() {
        let status = Status::new(AgentClock::start(), Duration::from_millis(50));
        assert_eq!(status.readiness(), Readiness::NotSampled);
        status.round_done(status.clock.now_ms());
        assert_eq!(status.readiness(), Readiness::Ready);
        std::thread::sleep(Duration::from_millis(80));
        assert!(
            matches!(status.readiness(), Readiness::Stalled(d) if d > Duration::from_millis(50))
        );
        status.round_done(status.clock.now_ms());
        assert_eq!(status.readiness(), Readiness::Ready);
        status.session_ended();
        assert_eq!(status.readiness(), Readiness::NotSampled);
    }
}
