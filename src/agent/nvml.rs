//! The NVML side of the agent: loading the library, classifying its errors, and
//! reading one GPU. Everything here talks to the driver; the accounting lives in
//! [`super::accrue`].

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use nvml_wrapper::enum_wrappers::device::{Clock, Sampling, TemperatureSensor};
use nvml_wrapper::enums::device::SampleValue;
use nvml_wrapper::enums::gpm::GpmMetricId;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, GpmSample, Nvml};

use super::accrue::{self, Activity, Busy, Reading, SampleIntegrator};
use crate::clock::AgentClock;

/// Loads and initializes NVML. Without a path the dynamic loader looks up
/// `libnvidia-ml.so.1`, so `LD_LIBRARY_PATH` works as users expect.
pub fn open(library: Option<&Path>) -> Result<Nvml, NvmlError> {
    match library {
        Some(path) => Nvml::builder().lib_path(OsStr::new(path)).init(),
        None => Nvml::init(),
    }
}

/// What an NVML error means for the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The library or driver is gone (reload, unload): re-initialize with backoff.
    Driver,
    /// This GPU fell off the bus or needs a reset: stop accruing, re-enumerate later.
    Lost,
    /// The driver or GPU does not offer this capability: stop asking.
    Unsupported,
    /// Anything else: count it and try again next round.
    Transient,
}

pub fn classify(e: &NvmlError) -> Fault {
    match e {
        NvmlError::Uninitialized
        | NvmlError::DriverNotLoaded
        | NvmlError::LibraryNotFound
        | NvmlError::LibloadingError(_)
        | NvmlError::LibRmVersionMismatch => Fault::Driver,
        NvmlError::GpuLost | NvmlError::ResetRequired => Fault::Lost,
        NvmlError::NotSupported
        | NvmlError::FailedToLoadSymbol(_)
        | NvmlError::FunctionNotFound => Fault::Unsupported,
        _ => Fault::Transient,
    }
}

/// A short, stable name for an error, used as a metric label.
pub fn error_label(e: &NvmlError) -> String {
    let s = format!("{e:?}");
    let end = s.find(['(', '{', ' ']).unwrap_or(s.len());
    s[..end].to_string()
}

/// Identity of a GPU, read once per enumeration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uuid: String,
    pub model: String,
    pub pci_bus_id: String,
}

pub fn identify(dev: &Device<'_>) -> Result<Identity, NvmlError> {
    let uuid = dev.uuid()?;
    let model = dev.name().unwrap_or_default();
    let pci_bus_id = dev.pci_info().map(|p| p.bus_id).unwrap_or_default();
    Ok(Identity {
        uuid,
        model,
        pci_bus_id,
    })
}

/// Capabilities found absent on a GPU, so they are asked for once, not every second.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub samples: bool,
    pub rates: bool,
    pub processes: bool,
    pub energy: bool,
    pub memory: bool,
    pub power: bool,
    pub power_limit: bool,
    pub temperature: bool,
    pub clock: bool,
}

impl Default for Caps {
    fn default() -> Self {
        Self {
            samples: true,
            rates: true,
            processes: true,
            energy: true,
            memory: true,
            power: true,
            power_limit: true,
            temperature: true,
            clock: true,
        }
    }
}

impl Caps {
    /// Which source busy time comes from, for the GPU's info series.
    pub fn busy_source(&self) -> &'static str {
        if self.samples {
            "samples"
        } else if self.rates {
            "utilization_rates"
        } else {
            "none"
        }
    }
}

/// What the sample buffer gave in one read.
#[derive(Debug, Clone, Default)]
pub enum SampleRead {
    /// Samples newer than the cursor (none when the buffer ran dry), and the agent's
    /// monotonic time (since [`AgentClock`]'s start) when the call returned: the
    /// instant the integrator maps onto the driver's timeline. Not the round's instant,
    /// which comes after every other GPU was read: a slow read of another GPU would
    /// map this one's frontier past samples this read could not have seen yet.
    New {
        samples: Vec<accrue::Sample>,
        at: Duration,
    },
    /// The call failed this time: the next read picks up where this one would have.
    Missed,
    /// The GPU or driver has no sample buffer.
    #[default]
    Unsupported,
}

/// Everything read from one GPU in one round.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub samples: SampleRead,
    pub utilization: Option<f64>,
    /// Compute processes running now (as NVML lists them); `None` when the driver cannot
    /// say.
    pub processes: Option<u32>,
    /// Their PIDs, each once, sorted; `Some` exactly when `processes` is.
    pub pids: Option<Vec<u32>>,
    pub energy_mj: Option<u64>,
    pub memory_used: Option<u64>,
    pub memory_total: Option<u64>,
    pub power_w: Option<f64>,
    pub power_limit_w: Option<f64>,
    pub temperature_c: Option<f64>,
    pub sm_clock_hz: Option<f64>,
    /// What GPM said this round ([`read_gpm`]).
    pub activity: Activity,
}

impl Snapshot {
    /// The reading for the accounting. Samples go through the GPU's integrator at the
    /// instant they were read (the observed time they count against stays the
    /// round's); a dry buffer is idle time, never the utilization rate (which
    /// describes one period, not the interval, and would count twice what the samples
    /// report later). Without a buffer, the rate stands for the interval.
    pub fn reading(&self, caps: &Caps, integrator: &mut SampleIntegrator) -> Reading {
        let busy = match &self.samples {
            // A buffer found broken this round: the rate from now on.
            SampleRead::New { .. } if !caps.samples => {
                self.utilization.map_or(Busy::Unknown, Busy::Rates)
            }
            SampleRead::New { samples, at } => Busy::Samples(integrator.poll(*at, samples)),
            // The frontier waits: the next read's samples cover this round too.
            SampleRead::Missed => Busy::Samples(0.0),
            SampleRead::Unsupported => self.utilization.map_or(Busy::Unknown, Busy::Rates),
        };
        Reading {
            busy,
            processes: self.processes,
            energy_mj: self.energy_mj,
            activity: self.activity,
        }
    }
}

/// Why a GPU read stopped early.
#[derive(Debug)]
pub enum ReadError {
    Lost(NvmlError),
    Driver(NvmlError),
}

/// Reads one GPU. `cursor` is the driver timestamp of the newest utilization sample
/// already taken; `clock` stamps the sample read. `on_error` is told about every
/// failed call that is not a missing capability (the caller counts them).
pub fn read(
    dev: &Device<'_>,
    caps: &mut Caps,
    cursor: Option<u64>,
    clock: &AgentClock,
    on_error: &mut dyn FnMut(&'static str, &NvmlError),
) -> Result<Snapshot, ReadError> {
    let mut snap = Snapshot::default();
    // Runs one NVML call, sorting its failure: a lost GPU or dead driver ends the
    // read, a missing capability clears its flag, anything else is counted.
    macro_rules! call {
        ($cap:ident, $name:literal, $e:expr) => {
            if caps.$cap {
                match $e {
                    Ok(v) => Some(v),
                    Err(err) => match classify(&err) {
                        Fault::Lost => return Err(ReadError::Lost(err)),
                        Fault::Driver => return Err(ReadError::Driver(err)),
                        Fault::Unsupported => {
                            caps.$cap = false;
                            None
                        }
                        Fault::Transient => {
                            on_error($name, &err);
                            None
                        }
                    },
                }
            } else {
                None
            }
        };
    }

    let rates = call!(rates, "utilization_rates", dev.utilization_rates());
    snap.utilization = rates.as_ref().map(|u| f64::from(u.gpu.min(100)) / 100.0);

    let samples = call!(
        samples,
        "samples",
        match dev.samples(Sampling::GpuUtilization, cursor) {
            // NVML's "not found" means "no samples newer than the cursor".
            Err(NvmlError::NotFound) => Ok(Vec::new()),
            other => other,
        }
    );
    // Right after the call returned: every sample it gave was published by then. (A
    // stamp taken before the call, delayed by a pause, would raise the mapping's
    // offset for good; one taken late only moves this read's frontier.)
    let read_at = clock.now();
    snap.samples = match samples {
        Some(samples) => SampleRead::New {
            samples: samples
                .iter()
                .map(|s| accrue::Sample {
                    timestamp_us: s.timestamp,
                    percent: sample_percent(&s.value),
                })
                .collect(),
            at: read_at,
        },
        None if caps.samples => SampleRead::Missed,
        None => SampleRead::Unsupported,
    };

    if let Some(list) = call!(
        processes,
        "compute_processes",
        dev.running_compute_processes()
    ) {
        snap.processes = Some(u32::try_from(list.len()).unwrap_or(u32::MAX));
        let mut pids: Vec<u32> = list.iter().map(|p| p.pid).collect();
        pids.sort_unstable();
        pids.dedup();
        snap.pids = Some(pids);
    }
    snap.energy_mj = call!(energy, "total_energy", dev.total_energy_consumption());
    if let Some(m) = call!(memory, "memory_info", dev.memory_info()) {
        snap.memory_used = Some(m.used);
        snap.memory_total = Some(m.total);
    }
    snap.power_w = call!(power, "power_usage", dev.power_usage()).map(|mw| f64::from(mw) / 1000.0);
    snap.power_limit_w = call!(power_limit, "power_limit", dev.enforced_power_limit())
        .map(|mw| f64::from(mw) / 1000.0);
    snap.temperature_c = call!(
        temperature,
        "temperature",
        dev.temperature(TemperatureSensor::Gpu)
    )
    .map(f64::from);
    snap.sm_clock_hz =
        call!(clock, "clock_info", dev.clock_info(Clock::SM)).map(|mhz| f64::from(mhz) * 1e6);
    Ok(snap)
}

/// NVML wants two GPM samples at least 100 ms apart on the driver's clock. The agent
/// stamps its own clock just before each sample call; the driver reads its clock a
/// little later, by a delay that varies from call to call, so a margin keeps two
/// samples stamped this far apart at least 100 ms apart for the driver too.
pub const GPM_MIN_SPACING: Duration = Duration::from_millis(110);

/// Whether GPM is used on a GPU: decided when the agent first adopts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpmMode {
    /// `nvmlGpmQueryDeviceSupport` said yes; the first sample decides: "not supported"
    /// (a MIG-enabled GPU, a driver without the sample symbols) turns GPM off, anything
    /// else turns it on (a failure is counted, and later samples may succeed).
    Probe,
    On,
    Off,
}

/// GPM state of one GPU in one NVML session: the previous sample, freed when replaced,
/// when the GPU is re-adopted or lost, and before the session's `Nvml` goes.
pub struct Gpm<'n> {
    pub mode: GpmMode,
    /// The previous sample and the agent's time just before it was taken.
    prev: Option<(GpmSample<'n>, Duration)>,
    /// The last GPM call failed: logged once per episode by the caller.
    pub failing: bool,
}

impl<'n> Gpm<'n> {
    pub fn new(mode: GpmMode) -> Self {
        Self {
            mode,
            prev: None,
            failing: false,
        }
    }

    /// Drops (and so frees) the previous sample: the next one is a new baseline.
    pub fn forget(&mut self) {
        self.prev = None;
    }
}

/// Asks whether GPM is supported, once, when a GPU is first adopted. An answer other
/// than yes, or a failure, means no GPM for this GPU for the life of the process: a
/// transient failure is reported to `on_error`.
pub fn gpm_mode(dev: &Device<'_>, on_error: &mut dyn FnMut(&'static str, &NvmlError)) -> GpmMode {
    match dev.gpm_support() {
        Ok(true) => GpmMode::Probe,
        Ok(false) => GpmMode::Off,
        Err(e) => {
            if classify(&e) == Fault::Transient {
                on_error("gpm_support", &e);
            }
            GpmMode::Off
        }
    }
}

/// One round of GPM for a GPU: a new sample unless the previous one is younger than
/// [`GPM_MIN_SPACING`] (then [`Activity::Skipped`], the previous one kept), and the SM
/// and tensor-pipe activity between the two. A failed sample drops the previous one
/// ([`Activity::Failed`]); a failed metrics call keeps the new one as a baseline. Both
/// are reported to `on_error`; a lost GPU or a dead driver ends the read.
pub fn read_gpm<'n>(
    lib: &'n Nvml,
    dev: &Device<'n>,
    gpm: &mut Gpm<'n>,
    clock: &AgentClock,
    on_error: &mut dyn FnMut(&'static str, &NvmlError),
) -> Result<Activity, ReadError> {
    if gpm.mode == GpmMode::Off {
        return Ok(Activity::Unsupported);
    }
    let at = clock.now();
    if gpm
        .prev
        .as_ref()
        .is_some_and(|(_, prev)| at.saturating_sub(*prev) < GPM_MIN_SPACING)
    {
        return Ok(Activity::Skipped);
    }
    let sample = match dev.gpm_sample() {
        Ok(sample) => sample,
        Err(e) => {
            gpm.prev = None;
            return match classify(&e) {
                Fault::Lost => Err(ReadError::Lost(e)),
                Fault::Driver => Err(ReadError::Driver(e)),
                Fault::Unsupported if gpm.mode == GpmMode::Probe => {
                    gpm.mode = GpmMode::Off;
                    Ok(Activity::Unsupported)
                }
                _ => {
                    on_error("gpm_sample", &e);
                    gpm.failing = true;
                    // The driver said GPM is supported and this failure says nothing
                    // against it: decide now, so the GPU's SM series exist from its first
                    // round (at 0) and never appear later beside a running busy counter,
                    // which a contract on `sm_active` would see as a switch of signal.
                    if gpm.mode == GpmMode::Probe {
                        gpm.mode = GpmMode::On;
                    }
                    Ok(Activity::Failed)
                }
            };
        }
    };
    gpm.mode = GpmMode::On;
    let activity = match gpm.prev.take() {
        None => Activity::Baseline,
        Some((prev, _)) => {
            let got = nvml_wrapper::gpm::gpm_metrics_get(
                lib,
                &prev,
                &sample,
                &[GpmMetricId::SmUtil, GpmMetricId::AnyTensorUtil],
            );
            // `prev` is dropped (freed) here, whatever the outcome.
            match got.map(|v| v.into_iter().collect::<Result<Vec<_>, _>>()) {
                Ok(Ok(v)) if v.len() == 2 => {
                    gpm.failing = false;
                    Activity::Metrics {
                        sm: v[0].value / 100.0,
                        tensor: v[1].value / 100.0,
                    }
                }
                Ok(Ok(_)) => {
                    on_error("gpm_metrics", &NvmlError::Unknown);
                    gpm.failing = true;
                    Activity::Baseline
                }
                Err(e) | Ok(Err(e)) => match classify(&e) {
                    Fault::Lost => return Err(ReadError::Lost(e)),
                    Fault::Driver => return Err(ReadError::Driver(e)),
                    _ => {
                        on_error("gpm_metrics", &e);
                        gpm.failing = true;
                        Activity::Baseline
                    }
                },
            }
        }
    };
    gpm.prev = Some((sample, at));
    Ok(activity)
}

fn sample_percent(v: &SampleValue) -> f64 {
    match *v {
        SampleValue::F64(x) => x,
        SampleValue::U32(x) => f64::from(x),
        SampleValue::U64(x) => x as f64,
        SampleValue::I64(x) => x as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_sorted_by_what_the_agent_must_do() {
        assert_eq!(classify(&NvmlError::GpuLost), Fault::Lost);
        assert_eq!(classify(&NvmlError::DriverNotLoaded), Fault::Driver);
        assert_eq!(classify(&NvmlError::Uninitialized), Fault::Driver);
        assert_eq!(classify(&NvmlError::NotSupported), Fault::Unsupported);
        assert_eq!(
            classify(&NvmlError::FailedToLoadSymbol("x".into())),
            Fault::Unsupported
        );
        assert_eq!(classify(&NvmlError::Unknown), Fault::Transient);
        assert_eq!(
            error_label(&NvmlError::FailedToLoadSymbol("x y".into())),
            "FailedToLoadSymbol"
        );
        assert_eq!(error_label(&NvmlError::GpuLost), "GpuLost");
    }
}
