//! The agent's Prometheus series. Names are a public contract: dashboards, alerts
//! and the aggregator's scraper depend on them.

use std::sync::{OnceLock, PoisonError, RwLock, RwLockWriteGuard};

use http_body_util::Full;
use hyper::body::Bytes;
use prometheus::{Counter, Gauge, GaugeVec, IntCounter, IntGauge, Opts, Registry};

use crate::labels::{label_set, Counters, Family, Gauges};

/// Per-GPU gauge families; a child exists only while the GPU answers and the
/// capability is supported, so nothing made-up is ever exported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GaugeKind {
    Utilization,
    MemoryUsed,
    MemoryTotal,
    Power,
    PowerLimit,
    Temperature,
    SmClock,
    Processes,
}

impl GaugeKind {
    pub const ALL: [GaugeKind; 8] = [
        GaugeKind::Utilization,
        GaugeKind::MemoryUsed,
        GaugeKind::MemoryTotal,
        GaugeKind::Power,
        GaugeKind::PowerLimit,
        GaugeKind::Temperature,
        GaugeKind::SmClock,
        GaugeKind::Processes,
    ];

    fn name_help(self) -> (&'static str, &'static str) {
        match self {
            GaugeKind::Utilization => (
                "commitmeter_gpu_utilization_ratio",
                "Share of the last driver sample period in which a kernel ran (0-1).",
            ),
            GaugeKind::MemoryUsed => ("commitmeter_gpu_memory_used_bytes", "GPU memory in use."),
            GaugeKind::MemoryTotal => (
                "commitmeter_gpu_memory_total_bytes",
                "GPU memory installed.",
            ),
            GaugeKind::Power => ("commitmeter_gpu_power_watts", "Power draw."),
            GaugeKind::PowerLimit => ("commitmeter_gpu_power_limit_watts", "Enforced power limit."),
            GaugeKind::Temperature => (
                "commitmeter_gpu_temperature_celsius",
                "GPU die temperature.",
            ),
            GaugeKind::SmClock => ("commitmeter_gpu_sm_clock_hertz", "Current SM clock."),
            GaugeKind::Processes => (
                "commitmeter_gpu_compute_processes",
                "Compute processes running on the GPU.",
            ),
        }
    }
}

label_set! {
    /// The labels of every per-GPU series: `gpu` (the NVML index at which this process
    /// first saw the UUID) and `uuid`.
    pub struct GpuLabels<'a> { gpu: &'a str, uuid: &'a str }
    /// `commitmeter_gpu_xid_errors_total`: a GPU's XID code.
    pub struct GpuXidLabels<'a> { gpu: &'a str, uuid: &'a str, xid: &'a str }
    /// `commitmeter_gpu_info`: a GPU's identity, the source of its busy time and
    /// the source of its SM / tensor activity (`gpm` or `none`).
    pub struct GpuInfoLabels<'a> {
        gpu: &'a str,
        uuid: &'a str,
        model: &'a str,
        pci_bus_id: &'a str,
        busy_source: &'a str,
        activity_source: &'a str,
    }
    /// `commitmeter_nvml_errors_total`: an NVML call and its error.
    pub struct NvmlErrorLabels<'a> { call: &'a str, error: &'a str }
    /// `commitmeter_owner_lookup_errors_total`: where owners' details come from.
    pub struct OwnerLookupErrorLabels<'a> { source: &'a str }
    /// The per-owner series (`crate::owner::series`): the GPU's labels, then
    /// [`crate::owner::OWNER_LABELS`].
    pub struct OwnerLabels<'a> {
        gpu: &'a str,
        uuid: &'a str,
        owner_kind: &'a str,
        owner: &'a str,
        user: &'a str,
        account: &'a str,
        namespace: &'a str,
        pod: &'a str,
        qos: &'a str,
    }
}

impl<'a> OwnerLabels<'a> {
    /// The labels of `owner` on `gpu`.
    pub fn of(gpu: &'a GpuSeries, owner: &'a crate::owner::Owner) -> Self {
        let [owner_kind, id, user, account, namespace, pod, qos] = owner.label_values();
        Self {
            gpu: &gpu.gpu,
            uuid: &gpu.uuid,
            owner_kind,
            owner: id,
            user,
            account,
            namespace,
            pod,
            qos,
        }
    }
}

/// A gauge without labels that is absent from the exposition until first set: a
/// value of 0 would be a made-up reading.
pub struct LateGauge {
    vec: GaugeVec,
    child: OnceLock<Gauge>,
}

impl LateGauge {
    fn new(name: &str, help: &str) -> Result<Self, prometheus::Error> {
        Ok(Self {
            vec: GaugeVec::new(Opts::new(name, help), &[])?,
            child: OnceLock::new(),
        })
    }

    pub fn set(&self, value: f64) {
        self.child
            .get_or_init(|| self.vec.with_label_values::<&str>(&[]))
            .set(value);
    }

    /// `None` until first set.
    pub fn get(&self) -> Option<f64> {
        self.child.get().map(Gauge::get)
    }
}

/// Handles to every agent series, registered in one registry.
///
/// The `gpu` label of a GPU is the NVML index at which this process first saw its
/// UUID, on every series of that GPU (info, up, counters, gauges, XIDs), for the life
/// of the process: after a driver reload that enumerates GPUs in another order the
/// series stay joined by `{gpu, uuid}`; the current slot is in `pci_bus_id`.
pub struct AgentMetrics {
    pub registry: Registry,
    /// Write-held while a sampling round applies its updates, read-held while
    /// `/metrics` renders: a scrape sees whole rounds only.
    round: RwLock<()>,
    /// `commitmeter_host_info`; replaced whole when SIGHUP brings new labels.
    host: std::sync::Mutex<IntGauge>,
    pub reload_ok: IntGauge,
    pub nvml_up: IntGauge,
    pub polls: IntCounter,
    /// `commitmeter_agent_last_round_timestamp_seconds`: wall time of the last round
    /// completed with NVML up, on the agent's start-anchored monotonic clock (so it
    /// never goes backwards and two values differ by exactly the time between them).
    /// Absent before the first round.
    pub last_round: LateGauge,
    /// `commitmeter_agent_sampled_seconds_total`: the span over which the agent
    /// watched its GPUs, i.e. the time between consecutive completed rounds of one NVML
    /// session when at most `max_gap` apart (the rule of observed time); a healthy
    /// GPU's observed time grows by exactly as much in the same round.
    pub sampled: Counter,
    pub nvml_errors: Counters<NvmlErrorLabels<'static>>,
    pub gpu_info: Gauges<GpuInfoLabels<'static>>,
    pub gpu_up: Gauges<GpuLabels<'static>>,
    pub observed: Counters<GpuLabels<'static>>,
    pub busy: Counters<GpuLabels<'static>>,
    pub allocated: Counters<GpuLabels<'static>>,
    /// `commitmeter_gpu_allocated_busy_seconds_total`: busy seconds of the rounds in
    /// which a compute process held the GPU (exported wherever allocated is).
    pub allocated_busy: Counters<GpuLabels<'static>>,
    /// `commitmeter_gpu_sm_active_seconds_total`: GPM SM activity over observed time,
    /// for GPUs with GPM only (decided once when the GPU is adopted).
    pub sm_active: Counters<GpuLabels<'static>>,
    /// `commitmeter_gpu_tensor_active_seconds_total`: GPM tensor-pipe activity, same rules.
    pub tensor_active: Counters<GpuLabels<'static>>,
    /// `commitmeter_gpu_allocated_sm_active_seconds_total`: SM-active seconds of the
    /// rounds in which a compute process held the GPU (GPM GPUs only).
    pub allocated_sm_active: Counters<GpuLabels<'static>>,
    pub energy: Counters<GpuLabels<'static>>,
    pub xid: Counters<GpuXidLabels<'static>>,
    /// `commitmeter_gpu_owner_info`: 1 per owner with a process on the GPU in the last
    /// round ([`crate::agent::attribution`] has the rules of the owner series).
    pub owner_info: Gauges<OwnerLabels<'static>>,
    /// `commitmeter_owner_allocated_seconds_total`: the owner's share of the GPU's
    /// allocated seconds.
    pub owner_allocated: Counters<OwnerLabels<'static>>,
    /// `commitmeter_owner_busy_seconds_total`: its share of the allocated busy seconds.
    pub owner_busy: Counters<OwnerLabels<'static>>,
    /// `commitmeter_owner_sm_active_seconds_total`: its share of the allocated SM-active
    /// seconds (GPUs with GPM only).
    pub owner_sm_active: Counters<OwnerLabels<'static>>,
    /// `commitmeter_owner_lookup_errors_total{source="kubelet"}`: failed calls to the
    /// kubelet's pod-resources socket (not counting a missing socket); 0 from the start.
    pub kubelet_errors: Counter,
    gauges: Vec<(GaugeKind, Gauges<GpuLabels<'static>>)>,
}

/// Child handles of one GPU, kept so the sampling loop never looks labels up.
pub struct GpuSeries {
    /// The `gpu` label: the index at which this process first saw the UUID.
    pub gpu: String,
    pub uuid: String,
    pub up: Gauge,
    pub observed: Counter,
    pub busy: Counter,
}

impl GpuSeries {
    /// The GPU's labels.
    pub fn labels(&self) -> GpuLabels<'_> {
        GpuLabels {
            gpu: &self.gpu,
            uuid: &self.uuid,
        }
    }
}

impl AgentMetrics {
    pub fn new(host_labels: &[(String, String)]) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| registry.register(c);

        let build = IntGauge::with_opts(
            Opts::new(
                "commitmeter_build_info",
                "Build of the running commitmeter.",
            )
            .const_label("version", env!("CARGO_PKG_VERSION"))
            .const_label("role", "agent"),
        )?;
        build.set(1);
        reg(Box::new(build))?;

        let host = host_info(host_labels)?;
        reg(Box::new(host.clone()))?;
        let reload_ok = IntGauge::new(
            "commitmeter_config_last_reload_successful",
            "1 if the last read of the config file (at start or on SIGHUP) succeeded.",
        )?;
        reload_ok.set(1);
        reg(Box::new(reload_ok.clone()))?;

        let nvml_up = IntGauge::new(
            "commitmeter_nvml_up",
            "1 while NVML is loaded and initialized.",
        )?;
        reg(Box::new(nvml_up.clone()))?;
        let polls = IntCounter::new(
            "commitmeter_agent_polls_total",
            "Sampling rounds completed with NVML up.",
        )?;
        reg(Box::new(polls.clone()))?;
        let last_round = LateGauge::new(
            "commitmeter_agent_last_round_timestamp_seconds",
            "Wall time of the last sampling round completed with NVML up (agent start plus monotonic time, ms resolution).",
        )?;
        reg(Box::new(last_round.vec.clone()))?;
        let sampled = Counter::new(
            "commitmeter_agent_sampled_seconds_total",
            "Time between consecutive completed sampling rounds of one NVML session, when at most max(5 x interval, 5 s) apart.",
        )?;
        reg(Box::new(sampled.clone()))?;
        let nvml_errors = Family::register(
            &registry,
            "commitmeter_nvml_errors_total",
            "NVML calls that failed, by call and error.",
        )?;
        let gpu_info = Family::register(
            &registry,
            "commitmeter_gpu_info",
            "GPU identity, the source of busy time and the source of SM/tensor activity.",
        )?;
        let gpu_up = Family::register(
            &registry,
            "commitmeter_gpu_up",
            "1 while the GPU answers NVML, 0 once lost.",
        )?;
        let observed = Family::register(
            &registry,
            "commitmeter_gpu_observed_seconds_total",
            "Time the GPU was seen present and healthy (delivered).",
        )?;
        let busy = Family::register(
            &registry,
            "commitmeter_gpu_busy_seconds_total",
            "Integral of GPU utilization over observed time.",
        )?;
        let allocated = Family::register(
            &registry,
            "commitmeter_gpu_allocated_seconds_total",
            "Observed time with at least one compute process.",
        )?;
        let allocated_busy = Family::register(
            &registry,
            "commitmeter_gpu_allocated_busy_seconds_total",
            "Busy time of the rounds in which at least one compute process ran.",
        )?;
        let sm_active = Family::register(
            &registry,
            "commitmeter_gpu_sm_active_seconds_total",
            "Integral of GPM SM activity over observed time (GPUs with GPM only).",
        )?;
        let tensor_active = Family::register(
            &registry,
            "commitmeter_gpu_tensor_active_seconds_total",
            "Integral of GPM tensor-pipe activity over observed time (GPUs with GPM only).",
        )?;
        let allocated_sm_active = Family::register(
            &registry,
            "commitmeter_gpu_allocated_sm_active_seconds_total",
            "SM-active time of the rounds in which at least one compute process ran (GPUs with GPM only).",
        )?;
        let energy = Family::register(
            &registry,
            "commitmeter_gpu_energy_joules_total",
            "Energy from the driver's total-energy counter.",
        )?;
        let xid = Family::register(
            &registry,
            "commitmeter_gpu_xid_errors_total",
            "Critical XID events reported by the driver, by XID code.",
        )?;

        use crate::owner::series;
        let owner_info = Family::register(
            &registry,
            series::INFO,
            "1 for each owner with a compute process on the GPU in the last round.",
        )?;
        let owner_allocated = Family::register(
            &registry,
            series::ALLOCATED,
            "The owner's share of the GPU's allocated seconds (a round's shared equally among the GPU's owners).",
        )?;
        let owner_busy = Family::register(
            &registry,
            series::BUSY,
            "The owner's share of the GPU's allocated busy seconds.",
        )?;
        let owner_sm_active = Family::register(
            &registry,
            series::SM_ACTIVE,
            "The owner's share of the GPU's allocated SM-active seconds, by its allocated time in each GPM window (GPUs with GPM only).",
        )?;
        let lookup_errors: Counters<OwnerLookupErrorLabels<'static>> = Family::register(
            &registry,
            "commitmeter_owner_lookup_errors_total",
            "Failed look-ups of owners' details, by source (kubelet: the pod-resources socket answered badly or not at all; a missing socket is not counted).",
        )?;
        let kubelet_errors = lookup_errors.with(&OwnerLookupErrorLabels { source: "kubelet" });

        let mut gauges = Vec::new();
        for kind in GaugeKind::ALL {
            let (name, help) = kind.name_help();
            gauges.push((kind, Family::register(&registry, name, help)?));
        }

        Ok(Self {
            registry,
            round: RwLock::new(()),
            host: std::sync::Mutex::new(host),
            reload_ok,
            nvml_up,
            polls,
            last_round,
            sampled,
            nvml_errors,
            gpu_info,
            gpu_up,
            observed,
            busy,
            allocated,
            allocated_busy,
            sm_active,
            tensor_active,
            allocated_sm_active,
            energy,
            xid,
            owner_info,
            owner_allocated,
            owner_busy,
            owner_sm_active,
            kubelet_errors,
            gauges,
        })
    }

    /// Registers the `process_*` series (`process_start_time_seconds` tells one agent
    /// process from the next): for the real agent only, not for the demo's simulated
    /// agents that share one process. `started_unix_ms` is when this process read the
    /// wall clock its round timestamps count from.
    pub fn register_process_collector(
        &self,
        started_unix_ms: u64,
    ) -> Result<(), prometheus::Error> {
        let start = Gauge::new(
            START_TIME,
            "Start time of the process since unix epoch in seconds.",
        )?;
        start.set(started_unix_ms as f64 / 1000.0);
        self.registry.register(Box::new(ProcessSeries {
            inner: prometheus::process_collector::ProcessCollector::for_self(),
            start,
        }))
    }

    /// Held while a sampling round applies its updates.
    pub fn round(&self) -> RwLockWriteGuard<'_, ()> {
        // A panic while applying a round ends the agent; until then, keep serving.
        self.round.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The `/metrics` response, never half a round.
    pub fn render(&self) -> hyper::Response<Full<Bytes>> {
        let _round = self.round.read().unwrap_or_else(PoisonError::into_inner);
        crate::http::metrics(&self.registry)
    }

    /// Replaces the host labels (config reload): the old series goes, the new one comes.
    pub fn set_host_labels(&self, labels: &[(String, String)]) -> Result<(), prometheus::Error> {
        let new = host_info(labels)?;
        let mut host = self.host.lock().expect("host lock");
        let _ = self.registry.unregister(Box::new(host.clone()));
        self.registry.register(Box::new(new.clone()))?;
        *host = new;
        Ok(())
    }

    /// Creates (or finds again, after a driver reload) the counters of one GPU.
    /// Counters keyed by UUID survive re-enumeration, so they never go backwards.
    pub fn gpu(&self, index: u32, uuid: &str) -> GpuSeries {
        let gpu = index.to_string();
        let l = GpuLabels { gpu: &gpu, uuid };
        GpuSeries {
            up: self.gpu_up.with(&l),
            observed: self.observed.with(&l),
            busy: self.busy.with(&l),
            uuid: uuid.to_string(),
            gpu,
        }
    }

    pub fn set_gauge(&self, kind: GaugeKind, gpu: &GpuSeries, value: Option<f64>) {
        let Some((_, vec)) = self.gauges.iter().find(|(k, _)| *k == kind) else {
            return;
        };
        let l = gpu.labels();
        match value {
            Some(v) => vec.with(&l).set(v),
            // Absent, or the GPU stopped answering: drop the series rather than
            // leave a stale or made-up value.
            None => {
                vec.remove(&l);
            }
        }
    }

    pub fn clear_gauges(&self, gpu: &GpuSeries) {
        for kind in GaugeKind::ALL {
            self.set_gauge(kind, gpu, None);
        }
    }

    pub fn nvml_error(&self, call: &str, error: &str) {
        self.nvml_errors
            .with(&NvmlErrorLabels { call, error })
            .inc();
    }
}

fn host_info(labels: &[(String, String)]) -> Result<IntGauge, prometheus::Error> {
    let mut opts = Opts::new(
        "commitmeter_host_info",
        "Labels of this host from the agent's config file.",
    );
    for (k, v) in labels {
        opts = opts.const_label(k.clone(), v.clone());
    }
    let g = IntGauge::with_opts(opts)?;
    g.set(1);
    Ok(g)
}

const START_TIME: &str = "process_start_time_seconds";

/// The process collector's series, with `process_start_time_seconds` to the millisecond:
/// the collector's has whole seconds, so an agent that restarts within the second it
/// started would look like the same process, and its restart could go unnoticed.
struct ProcessSeries {
    inner: prometheus::process_collector::ProcessCollector,
    start: Gauge,
}

impl prometheus::core::Collector for ProcessSeries {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        let mut d: Vec<_> = self
            .inner
            .desc()
            .into_iter()
            .filter(|d| d.fq_name != START_TIME)
            .collect();
        d.extend(self.start.desc());
        d
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut m: Vec<_> = self
            .inner
            .collect()
            .into_iter()
            .filter(|f| f.name() != START_TIME)
            .collect();
        m.extend(self.start.collect());
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::LabelSet;

    #[test]
    fn owner_labels_are_the_gpus_then_the_owners() {
        assert_eq!(&OwnerLabels::NAMES[..2], GpuLabels::NAMES);
        assert_eq!(&OwnerLabels::NAMES[2..], crate::owner::OWNER_LABELS);
    }
}
