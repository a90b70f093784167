//! The sampling loop: NVML → readings → counters, once per interval, on its own
//! thread (NVML calls block). It never exits on a driver or GPU fault: it reports
//! the fault as a metric, logs each state change once, and retries with backoff.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};
use prometheus::Counter;

use super::accrue::GpuAccount;
use super::metrics::{AgentMetrics, GaugeKind, GpuSeries};
use super::nvml::{self, Caps, Fault, Identity, ReadError};

#[derive(Debug, Clone)]
pub struct SamplerConfig {
    pub interval: Duration,
    pub library: Option<PathBuf>,
}

impl SamplerConfig {
    /// A gap between readings longer than this is not counted as observed time.
    fn max_gap(&self) -> Duration {
        (self.interval * 5).max(Duration::from_secs(5))
    }
}

/// Shared with the HTTP side: whether a full round has been sampled.
#[derive(Default)]
pub struct Status {
    ready: AtomicBool,
}

impl Status {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

pub struct Sampler {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Sampler {
    pub fn spawn(
        cfg: SamplerConfig,
        metrics: Arc<AgentMetrics>,
        status: Arc<Status>,
    ) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("nvml-sampler".into())
            .spawn(move || Loop::new(cfg, metrics, status, stopped).run())?;
        Ok(Self { stop, thread })
    }

    /// Stops sampling and waits for the thread (at most one NVML round).
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
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
    series: GpuSeries,
    allocated: Option<Counter>,
    energy: Option<Counter>,
    info: Vec<String>,
    up: bool,
}

/// One index in the current driver session.
struct Slot {
    index: u32,
    uuid: Option<String>,
    caps: Caps,
    cursor: Option<u64>,
    lost_logged: bool,
}

enum End {
    Stop,
    Driver(NvmlError),
}

struct Loop {
    cfg: SamplerConfig,
    metrics: Arc<AgentMetrics>,
    status: Arc<Status>,
    stopped: mpsc::Receiver<()>,
    origin: Instant,
    gpus: HashMap<String, Gpu>,
    last_nvml_error: Option<String>,
}

impl Loop {
    fn new(
        cfg: SamplerConfig,
        metrics: Arc<AgentMetrics>,
        status: Arc<Status>,
        stopped: mpsc::Receiver<()>,
    ) -> Self {
        Self {
            cfg,
            metrics,
            status,
            stopped,
            origin: Instant::now(),
            gpus: HashMap::new(),
            last_nvml_error: None,
        }
    }

    /// Sleeps until `deadline`; true when asked to stop.
    fn sleep_until(&self, deadline: Instant) -> bool {
        let wait = deadline.saturating_duration_since(Instant::now());
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
                    let end = self.session(&lib);
                    self.metrics.nvml_up.set(0);
                    self.status.ready.store(false, Ordering::Relaxed);
                    for gpu in self.gpus.values_mut() {
                        mark_down(&self.metrics, gpu);
                    }
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
            if self.sleep_until(Instant::now() + backoff.step()) {
                return;
            }
        }
    }

    /// Samples until the driver fails or a stop is asked for.
    fn session(&mut self, lib: &Nvml) -> End {
        let count = match lib.device_count() {
            Ok(n) => n,
            Err(e) => return End::Driver(e),
        };
        let mut slots: Vec<Slot> = (0..count)
            .map(|index| Slot {
                index,
                uuid: None,
                caps: Caps::default(),
                cursor: None,
                lost_logged: false,
            })
            .collect();
        let mut devices: Vec<Option<Device<'_>>> = (0..count).map(|_| None).collect();
        tracing::info!(gpus = count, "enumerated GPUs");
        let mut events = match lib.create_event_set() {
            Ok(set) => Some(set),
            Err(e) => {
                tracing::warn!(error = %e, "XID events unavailable");
                None
            }
        };
        let mut registered = vec![false; count as usize];
        let mut next = Instant::now();
        loop {
            for (slot, dev) in slots.iter_mut().zip(devices.iter_mut()) {
                if dev.is_none() {
                    match lib.device_by_index(slot.index) {
                        Ok(d) => match self.adopt(slot, &d) {
                            Ok(()) => *dev = Some(d),
                            Err(e) if nvml::classify(&e) == Fault::Driver => return End::Driver(e),
                            Err(e) => {
                                self.lost(slot, &e);
                                continue;
                            }
                        },
                        Err(e) if nvml::classify(&e) == Fault::Driver => return End::Driver(e),
                        Err(e) => {
                            self.lost(slot, &e);
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
                match self.poll(slot, d) {
                    Ok(()) => {}
                    Err(ReadError::Driver(e)) => return End::Driver(e),
                    Err(ReadError::Lost(e)) => {
                        self.lost(slot, &e);
                        *dev = None;
                    }
                }
            }
            if let Some(set) = &events {
                if let Err(e) = self.drain_events(set) {
                    return End::Driver(e);
                }
            }
            self.metrics.polls.inc();
            self.status.ready.store(true, Ordering::Relaxed);

            // Fixed-rate schedule; after a stall, resume from now rather than burst.
            next += self.cfg.interval;
            let now = Instant::now();
            if next < now {
                next = now + self.cfg.interval;
            }
            if self.sleep_until(next) {
                return End::Stop;
            }
        }
    }

    /// Binds an index of this session to a GPU known by UUID (new or seen before).
    fn adopt(&mut self, slot: &mut Slot, dev: &Device<'_>) -> Result<(), NvmlError> {
        let id = nvml::identify(dev)?;
        if slot.uuid.as_deref() != Some(id.uuid.as_str()) {
            slot.caps = Caps::default();
            slot.cursor = None;
        }
        slot.uuid = Some(id.uuid.clone());
        slot.lost_logged = false;
        let gpu = self.gpus.entry(id.uuid.clone()).or_insert_with(|| Gpu {
            account: GpuAccount::default(),
            series: self.metrics.gpu(slot.index, &id.uuid),
            allocated: None,
            energy: None,
            info: Vec::new(),
            up: false,
        });
        set_info(&self.metrics, gpu, slot.index, &id, slot.caps.busy_source());
        tracing::info!(gpu = slot.index, uuid = %id.uuid, model = %id.model, "GPU present");
        Ok(())
    }

    fn lost(&mut self, slot: &mut Slot, e: &NvmlError) {
        if let Some(gpu) = slot.uuid.as_ref().and_then(|u| self.gpus.get_mut(u)) {
            mark_down(&self.metrics, gpu);
        }
        if !slot.lost_logged {
            tracing::error!(gpu = slot.index, uuid = slot.uuid.as_deref().unwrap_or(""), error = %e, "GPU not answering; accrual stopped");
            slot.lost_logged = true;
        }
    }

    fn poll(&mut self, slot: &mut Slot, dev: &Device<'_>) -> Result<(), ReadError> {
        let source = slot.caps.busy_source();
        let metrics = &self.metrics;
        let snap = nvml::read(dev, &mut slot.caps, &mut slot.cursor, &mut |call, e| {
            metrics.nvml_error(call, &nvml::error_label(e));
        })?;
        let at = self.origin.elapsed();
        let Some(gpu) = slot.uuid.as_ref().and_then(|u| self.gpus.get_mut(u)) else {
            return Ok(());
        };
        if source != slot.caps.busy_source() {
            let mut labels = gpu.info.clone();
            labels[4] = slot.caps.busy_source().to_string();
            let l: Vec<&str> = labels.iter().map(String::as_str).collect();
            let old: Vec<&str> = gpu.info.iter().map(String::as_str).collect();
            let _ = self.metrics.gpu_info.remove_label_values(&old);
            self.metrics.gpu_info.with_label_values(&l).set(1.0);
            gpu.info = labels;
        }
        if !gpu.up {
            gpu.up = true;
            gpu.series.up.set(1.0);
        }
        let inc = gpu.account.healthy(at, &snap.reading(), self.cfg.max_gap());
        gpu.series.observed.inc_by(inc.observed_s);
        gpu.series.busy.inc_by(inc.busy_s);
        if snap.processes.is_some() {
            let c = gpu.allocated.get_or_insert_with(|| {
                self.metrics
                    .allocated
                    .with_label_values(&gpu.series.label_refs())
            });
            c.inc_by(inc.allocated_s);
        }
        if snap.energy_mj.is_some() {
            let c = gpu.energy.get_or_insert_with(|| {
                self.metrics
                    .energy
                    .with_label_values(&gpu.series.label_refs())
            });
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
        Ok(())
    }

    /// Takes every pending XID event without blocking.
    fn drain_events(&mut self, set: &nvml_wrapper::event::EventSet<'_>) -> Result<(), NvmlError> {
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
                    let index = self
                        .gpus
                        .get(&uuid)
                        .map(|g| g.series.labels[0].clone())
                        .or_else(|| ev.device.index().ok().map(|i| i.to_string()))
                        .unwrap_or_default();
                    tracing::warn!(gpu = %index, uuid = %uuid, xid = %code, "XID error");
                    self.metrics
                        .xid
                        .with_label_values(&[&index, &uuid, &code])
                        .inc();
                }
                Err(NvmlError::Timeout) => return Ok(()),
                Err(e) => match nvml::classify(&e) {
                    Fault::Driver => return Err(e),
                    _ => {
                        self.metrics
                            .nvml_error("event_wait", &nvml::error_label(&e));
                        return Ok(());
                    }
                },
            }
        }
    }
}

fn set_info(metrics: &AgentMetrics, gpu: &mut Gpu, index: u32, id: &Identity, busy_source: &str) {
    let labels = vec![
        index.to_string(),
        id.uuid.clone(),
        id.model.clone(),
        id.pci_bus_id.clone(),
        busy_source.to_string(),
    ];
    if gpu.info != labels {
        if !gpu.info.is_empty() {
            let old: Vec<&str> = gpu.info.iter().map(String::as_str).collect();
            let _ = metrics.gpu_info.remove_label_values(&old);
        }
        let l: Vec<&str> = labels.iter().map(String::as_str).collect();
        metrics.gpu_info.with_label_values(&l).set(1.0);
        gpu.info = labels;
    }
}

fn mark_down(metrics: &AgentMetrics, gpu: &mut Gpu) {
    gpu.account.interrupted();
    gpu.up = false;
    gpu.series.up.set(0.0);
    metrics.clear_gauges(&gpu.series);
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
}
