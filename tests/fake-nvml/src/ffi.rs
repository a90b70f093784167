//! The exported NVML entry points.
//!
//! Each one locks the library state, checks initialization, the handle, GPU
//! loss and capability in that order, then answers from the [`Scenario`].
//! Bodies run under `catch_unwind` so a bug here becomes `NVML_ERROR_UNKNOWN`
//! instead of unwinding into C.

// These are C entry points: nvml.h is their contract, not rustdoc.
#![allow(clippy::missing_safety_doc)]

use crate::abi::*;
use crate::scenario::{cap, unix_now_ms, Scenario};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{c_char, c_uint, c_ulonglong, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Device handles are these addresses plus the scenario's GPU number (its NVML
/// index unless a reload reordered them): stable, non-null and easy to validate.
/// Nobody dereferences them.
const DEVICE_BASE: usize = 0x0D3F_0000;
/// Event set handles are this address plus a serial number.
const EVENT_SET_BASE: usize = 0x0E5E_0000;
/// GPM sample handles are this address plus a serial number.
#[cfg(not(feature = "old_driver"))]
const GPM_SAMPLE_BASE: usize = 0x0F9A_0000;
/// Longest sleep in `nvmlEventSetWait_v2` before looking at the timeline again
/// (so a driver reload during a wait is noticed).
const WAIT_SLICE_MS: u64 = 50;

const DRIVER_VERSION: &str = "550.54.15";
const NVML_VERSION: &str = "12.550.54.15";
const PCI_DEVICE_ID: c_uint = 0x2330_10DE;
const PCI_SUBSYSTEM_ID: c_uint = 0x16C1_10DE;

/// What one `nvmlEventSetCreate` set has seen.
struct SetState {
    /// Driver generation the set was created in; stale after a reload.
    generation: usize,
    /// Events before this were lost with an earlier driver instance.
    since_ms: u64,
    /// GPUs registered for XID events.
    registered: BTreeSet<usize>,
    /// Indices into [`Scenario::xid_events`] already delivered.
    delivered: BTreeSet<usize>,
}

/// Process-global library state (one per loaded copy of the library).
struct State {
    /// Loaded at the first `nvmlInit_v2`, with `start_unix_ms` resolved.
    scenario: Option<Scenario>,
    /// Set by [`fake_nvml_set_scenario_path`]; wins over the env var.
    path_override: Option<PathBuf>,
    refcount: u32,
    /// [`Scenario::reloads_begun`] at the last successful init: calls fail
    /// with `UNINITIALIZED` once another reload has begun, until re-init.
    generation: usize,
    sets: BTreeMap<usize, SetState>,
    next_set: usize,
    /// Allocated GPM samples; filled ones hold (scenario GPU, timeline ms, generation).
    gpm_samples: BTreeMap<usize, Option<(usize, u64, usize)>>,
    #[cfg_attr(feature = "old_driver", allow(dead_code))]
    next_gpm_sample: usize,
}

static STATE: Mutex<State> = Mutex::new(State {
    scenario: None,
    path_override: None,
    refcount: 0,
    generation: 0,
    sets: BTreeMap::new(),
    next_set: 1,
    gpm_samples: BTreeMap::new(),
    next_gpm_sample: 1,
});

type Res<T> = Result<T, NvmlReturn>;

fn lock() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs an entry point's body, mapping `Ok` to `SUCCESS` and a panic to
/// `NVML_ERROR_UNKNOWN`; while the scenario says the driver hangs, first blocks.
fn guard(body: impl FnOnce() -> Res<()>) -> NvmlReturn {
    hang_while_scripted();
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => SUCCESS,
        Ok(Err(code)) => code,
        Err(_) => ERROR_UNKNOWN,
    }
}

/// Blocks, without the lock, while the loaded scenario's driver hangs.
fn hang_while_scripted() {
    while lock()
        .scenario
        .as_ref()
        .is_some_and(|s| s.hung_at(s.now_ms()))
    {
        std::thread::sleep(Duration::from_millis(WAIT_SLICE_MS));
    }
}

/// Writes through a caller's output pointer.
unsafe fn put<T>(ptr: *mut T, value: T) -> Res<()> {
    if ptr.is_null() {
        return Err(ERROR_INVALID_ARGUMENT);
    }
    ptr.write(value);
    Ok(())
}

/// Copies `s` NUL-terminated into a caller's buffer of `len` bytes.
unsafe fn put_str(buf: *mut c_char, len: c_uint, s: &str) -> Res<()> {
    if buf.is_null() {
        return Err(ERROR_INVALID_ARGUMENT);
    }
    if s.len() + 1 > len as usize {
        return Err(ERROR_INSUFFICIENT_SIZE);
    }
    let out = std::slice::from_raw_parts_mut(buf, s.len() + 1);
    fill(out, s);
    Ok(())
}

/// Copies as much of `s` as fits into `dst`, always NUL-terminated.
fn fill(dst: &mut [c_char], s: &str) {
    let n = s.len().min(dst.len().saturating_sub(1));
    for (d, b) in dst.iter_mut().zip(&s.as_bytes()[..n]) {
        *d = *b as c_char;
    }
    if let Some(nul) = dst.get_mut(n) {
        *nul = 0;
    }
}

fn device_handle(index: usize) -> NvmlDevice {
    std::ptr::without_provenance_mut(DEVICE_BASE + index)
}

fn set_handle(id: usize) -> NvmlEventSet {
    std::ptr::without_provenance_mut(EVENT_SET_BASE + id)
}

/// Reads the scenario named by the override or `FAKE_NVML_SCENARIO`.
fn load(path_override: Option<&PathBuf>) -> Res<Scenario> {
    let path = path_override
        .cloned()
        .or_else(|| std::env::var_os(crate::scenario::ENV_VAR).map(PathBuf::from));
    let mut scenario = match path {
        None => Scenario::default(),
        Some(path) => {
            let parsed = std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|text| Scenario::from_json(&text));
            parsed.map_err(|e| {
                eprintln!("fake-nvml: bad scenario {}: {e}", path.display());
                ERROR_UNKNOWN
            })?
        }
    };
    scenario.start_unix_ms.get_or_insert_with(unix_now_ms);
    Ok(scenario)
}

impl State {
    /// The scenario and the current time, if the library may answer calls.
    fn ready(&self) -> Res<(&Scenario, u64)> {
        let scenario = self.scenario.as_ref().ok_or(ERROR_UNINITIALIZED)?;
        let now = scenario.now_ms();
        if self.refcount == 0
            || scenario.driver_down_at(now)
            || scenario.reloads_begun(now) != self.generation
        {
            return Err(ERROR_UNINITIALIZED);
        }
        Ok((scenario, now))
    }

    /// Like [`Self::ready`], plus the scenario's GPU number behind a valid
    /// handle of a GPU that is not lost.
    fn device(&self, device: NvmlDevice) -> Res<(&Scenario, u64, usize)> {
        let (scenario, now) = self.ready()?;
        let index = device
            .addr()
            .checked_sub(DEVICE_BASE)
            .filter(|&i| i < scenario.gpus.len())
            .ok_or(ERROR_INVALID_ARGUMENT)?;
        if scenario.lost_at(index, now) {
            return Err(ERROR_GPU_IS_LOST);
        }
        Ok((scenario, now, index))
    }

    /// Like [`Self::device`], and `capability` must be supported.
    fn capable(&self, device: NvmlDevice, capability: &str) -> Res<(&Scenario, u64, usize)> {
        let (scenario, now, index) = self.device(device)?;
        if !scenario.gpus[index].supports(capability) {
            return Err(ERROR_NOT_SUPPORTED);
        }
        Ok((scenario, now, index))
    }

    /// A live event set of the current driver generation.
    fn set_mut(&mut self, set: NvmlEventSet) -> Res<&mut SetState> {
        let generation = self.generation;
        let id = set.addr().wrapping_sub(EVENT_SET_BASE);
        let state = self.sets.get_mut(&id).ok_or(ERROR_INVALID_ARGUMENT)?;
        if state.generation != generation {
            return Err(ERROR_UNINITIALIZED);
        }
        Ok(state)
    }
}

fn init() -> NvmlReturn {
    guard(|| {
        let mut st = lock();
        if st.scenario.is_none() {
            st.scenario = Some(load(st.path_override.as_ref())?);
        }
        let scenario = st.scenario.as_ref().ok_or(ERROR_UNKNOWN)?;
        let now = scenario.now_ms();
        if now < scenario.init_fail_until_ms || scenario.driver_down_at(now) {
            return Err(ERROR_DRIVER_NOT_LOADED);
        }
        st.generation = scenario.reloads_begun(now);
        st.refcount += 1;
        Ok(())
    })
}

/// Test hook, not NVML: use the scenario at `path` (NUL-terminated) instead
/// of `FAKE_NVML_SCENARIO`, or go back to it with NULL. Only while no `Nvml`
/// is initialized; the file is read at the next `nvmlInit_v2`.
#[no_mangle]
pub unsafe extern "C" fn fake_nvml_set_scenario_path(path: *const c_char) -> NvmlReturn {
    guard(|| {
        let mut st = lock();
        if st.refcount > 0 {
            return Err(ERROR_ALREADY_INITIALIZED);
        }
        st.path_override = if path.is_null() {
            None
        } else {
            let path = CStr::from_ptr(path)
                .to_str()
                .map_err(|_| ERROR_INVALID_ARGUMENT)?;
            Some(PathBuf::from(path))
        };
        st.scenario = None;
        st.sets.clear();
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlInit_v2() -> NvmlReturn {
    init()
}

/// Flags (no-GPU / no-attach) change nothing here.
#[no_mangle]
pub unsafe extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> NvmlReturn {
    init()
}

/// Always allowed while initialized, even during a reload, so `Drop` works.
#[no_mangle]
pub unsafe extern "C" fn nvmlShutdown() -> NvmlReturn {
    guard(|| {
        let mut st = lock();
        st.refcount = st.refcount.checked_sub(1).ok_or(ERROR_UNINITIALIZED)?;
        if st.refcount == 0 && !st.gpm_samples.is_empty() {
            // Tests of a caller look for this line: every sample must be freed.
            eprintln!(
                "fake-nvml: {} GPM samples not freed at nvmlShutdown",
                st.gpm_samples.len()
            );
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlErrorString(result: NvmlReturn) -> *const c_char {
    let text: &'static CStr = match result {
        SUCCESS => c"Success",
        ERROR_UNINITIALIZED => c"Uninitialized",
        ERROR_INVALID_ARGUMENT => c"Invalid Argument",
        ERROR_NOT_SUPPORTED => c"Not Supported",
        ERROR_ALREADY_INITIALIZED => c"Already Initialized",
        ERROR_NOT_FOUND => c"Not Found",
        ERROR_INSUFFICIENT_SIZE => c"Insufficient Size",
        ERROR_DRIVER_NOT_LOADED => c"Driver Not Loaded",
        ERROR_TIMEOUT => c"Timeout",
        ERROR_GPU_IS_LOST => c"GPU is lost",
        ERROR_ARGUMENT_VERSION_MISMATCH => c"Argument version mismatch",
        _ => c"Unknown Error",
    };
    text.as_ptr()
}

#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    guard(|| {
        lock().ready()?;
        put_str(version, length, DRIVER_VERSION)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetNVMLVersion(
    version: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    guard(|| {
        lock().ready()?;
        put_str(version, length, NVML_VERSION)
    })
}

/// Lost GPUs still count, as on a real machine.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> NvmlReturn {
    guard(|| {
        let st = lock();
        let (scenario, _) = st.ready()?;
        put(count, scenario.gpus.len() as c_uint)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut NvmlDevice,
) -> NvmlReturn {
    guard(|| {
        let st = lock();
        let (scenario, now) = st.ready()?;
        let gpu = scenario
            .gpu_at_index(st.generation, index as usize)
            .ok_or(ERROR_INVALID_ARGUMENT)?;
        if scenario.lost_at(gpu, now) {
            return Err(ERROR_GPU_IS_LOST);
        }
        put(device, device_handle(gpu))
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetIndex(device: NvmlDevice, index: *mut c_uint) -> NvmlReturn {
    guard(|| {
        let st = lock();
        let (scenario, _, gpu) = st.device(device)?;
        let i = scenario
            .index_of_gpu(st.generation, gpu)
            .ok_or(ERROR_INVALID_ARGUMENT)?;
        put(index, i as c_uint)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: NvmlDevice,
    uuid: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    guard(|| {
        let st = lock();
        let (scenario, _, i) = st.device(device)?;
        put_str(uuid, length, &scenario.uuid(i))
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: NvmlDevice,
    name: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    guard(|| {
        let st = lock();
        let (scenario, _, i) = st.device(device)?;
        put_str(name, length, &scenario.gpus[i].name)
    })
}

/// `busIdLegacy` holds only 16 bytes, so it gets the 4-digit-domain form
/// (`0000:17:00.0`), as the real driver does.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(
    device: NvmlDevice,
    pci: *mut PciInfo,
) -> NvmlReturn {
    guard(|| {
        let st = lock();
        let (scenario, _, i) = st.capable(device, cap::PCI)?;
        let bus_id = scenario.pci_bus_id(i);
        let mut parts = bus_id.split([':', '.']);
        let mut hex = || {
            parts
                .next()
                .and_then(|p| c_uint::from_str_radix(p, 16).ok())
                .unwrap_or(0)
        };
        let (domain, bus, dev) = (hex(), hex(), hex());
        let legacy = match bus_id.split_once(':') {
            Some((d, rest)) if d.len() == 8 => format!("{}:{rest}", &d[4..]),
            _ => bus_id.clone(),
        };
        let mut info = PciInfo {
            bus_id_legacy: [0; 16],
            domain,
            bus,
            device: dev,
            pci_device_id: PCI_DEVICE_ID,
            pci_sub_system_id: PCI_SUBSYSTEM_ID,
            bus_id: [0; 32],
        };
        fill(&mut info.bus_id_legacy, &legacy);
        fill(&mut info.bus_id, &bus_id);
        put(pci, info)
    })
}

/// Only GPU utilization samples exist. With `samples` NULL, `*sampleCount`
/// gets the ring capacity (as the real driver does); a read returns the
/// oldest `*sampleCount` samples newer than `lastSeenTimeStamp`, or
/// `NOT_FOUND` when there are none. A read first waits out the GPU's
/// [`Gpu::samples_slow`](crate::scenario::Gpu::samples_slow) delay, without the lock.
#[cfg(not(feature = "old_driver"))]
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetSamples(
    device: NvmlDevice,
    sample_type: c_uint,
    last_seen_time_stamp: c_ulonglong,
    sample_val_type: *mut c_uint,
    sample_count: *mut c_uint,
    samples: *mut Sample,
) -> NvmlReturn {
    guard(|| {
        if !samples.is_null() {
            let delay = lock()
                .capable(device, cap::SAMPLES)
                .map_or(0, |(scenario, now, i)| scenario.samples_delay_ms(i, now));
            if delay > 0 {
                std::thread::sleep(Duration::from_millis(delay));
            }
        }
        let st = lock();
        let (scenario, now, i) = st.capable(device, cap::SAMPLES)?;
        if sample_type != GPU_UTILIZATION_SAMPLES {
            return Err(ERROR_NOT_SUPPORTED);
        }
        if sample_count.is_null() || sample_val_type.is_null() {
            return Err(ERROR_INVALID_ARGUMENT);
        }
        sample_val_type.write(VALUE_TYPE_UNSIGNED_INT);
        if samples.is_null() {
            sample_count.write(scenario.ring.min(c_uint::MAX as usize) as c_uint);
            return Ok(());
        }
        let newer = scenario.samples(i, now, last_seen_time_stamp);
        if newer.is_empty() {
            return Err(ERROR_NOT_FOUND);
        }
        let room = *sample_count as usize;
        if room == 0 {
            sample_count.write(newer.len() as c_uint);
            return Err(ERROR_INSUFFICIENT_SIZE);
        }
        let n = room.min(newer.len());
        for (k, s) in newer[..n].iter().enumerate() {
            // Zero the whole union so a reader of a wider member sees no junk.
            let mut sample_value = Value { ull_val: 0 };
            sample_value.ui_val = s.value;
            samples.add(k).write(Sample {
                time_stamp: s.timestamp_us,
                sample_value,
            });
        }
        sample_count.write(n as c_uint);
        Ok(())
    })
}

/// Memory utilization is reported as half the GPU utilization.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: NvmlDevice,
    utilization: *mut Utilization,
) -> NvmlReturn {
    guard(|| {
        let st = lock();
        let (scenario, now, i) = st.capable(device, cap::UTILIZATION)?;
        let gpu = scenario.util_at(i, now);
        put(
            utilization,
            Utilization {
                gpu,
                memory: gpu / 2,
            },
        )
    })
}

/// Checks the struct version like the real driver (nvml-wrapper sets it).
#[cfg(not(feature = "old_driver"))]
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: NvmlDevice,
    memory: *mut MemoryV2,
) -> NvmlReturn {
    guard(|| {
        let st = lock();
        let (scenario, _, i) = st.capable(device, cap::MEMORY)?;
        if memory.is_null() {
            return Err(ERROR_INVALID_ARGUMENT);
        }
        if (*memory).version != MEMORY_V2_VERSION {
            return Err(ERROR_ARGUMENT_VERSION_MISMATCH);
        }
        let g = &scenario.gpus[i];
        let used = g.memory_used_bytes.min(g.memory_total_bytes);
        put(
            memory,
            MemoryV2 {
                version: MEMORY_V2_VERSION,
                total: g.memory_total_bytes,
                reserved: 0,
                free: g.memory_total_bytes - used,
                used,
            },
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: NvmlDevice,
    memory: *mut Memory,
) -> NvmlReturn {
    guard(|| {
        let st = lock();
        let (scenario, _, i) = st.capable(device, cap::MEMORY)?;
        let g = &scenario.gpus[i];
        let used = g.memory_used_bytes.min(g.memory_total_bytes);
        put(
            memory,
            Memory {
                total: g.memory_total_bytes,
                free: g.memory_total_bytes - used,
                used,
            },
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(
    device: NvmlDevice,
    power: *mut c_uint,
) -> NvmlReturn {
    guard(|| {
        let st = lock();
        let (scenario, _, i) = st.capable(device, cap::POWER)?;
        put(power, scenario.gpus[i].power_mw)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetEnforcedPowerLimit(
    device: NvmlDevice,
    limit: *mut c_uint,
) -> NvmlReturn {
    guard(|| {
        let st = lock();
        let (scenario, _, i) = st.capable(device, cap::POWER_LIMIT)?;
        put(limit, scenario.gpus[i].power_limit_mw)
    })
}

/// In mJ, see [`Scenario::energy_counter_mj`].
#[cfg(not(feature = "old_driver"))]
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTotalEnergyConsumption(
    device: NvmlDevice,
    energy: *mut c_ulonglong,
) -> NvmlReturn {
    guard(|| {
        let st = lock();
        let (scenario, now, i) = st.capable(device, cap::ENERGY)?;
        put(energy, scenario.energy_counter_mj(i, now))
    })
}

/// Only the GPU die sensor exists.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: NvmlDevice,
    sensor_type: c_uint,
    temp: *mut c_uint,
) -> NvmlReturn {
    guard(|| {
        let st = lock();
        let (scenario, _, i) = st.capable(device, cap::TEMPERATURE)?;
        if sensor_type != TEMPERATURE_GPU {
            return Err(ERROR_INVALID_ARGUMENT);
        }
        put(temp, scenario.gpus[i].temperature_c)
    })
}

/// Every clock domain reports `sm_clock_mhz`.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetClockInfo(
    device: NvmlDevice,
    _clock_type: c_uint,
    clock: *mut c_uint,
) -> NvmlReturn {
    guard(|| {
        let st = lock();
        let (scenario, _, i) = st.capable(device, cap::CLOCK)?;
        put(clock, scenario.gpus[i].sm_clock_mhz)
    })
}

/// The size query nvml-wrapper makes (NULL `infos`, `*infoCount` 0) gets
/// `INSUFFICIENT_SIZE` with the count, or `SUCCESS` with 0 when idle. The PIDs are
/// [`Scenario::pids_at`](crate::scenario::Scenario::pids_at)'s.
#[cfg(not(feature = "old_driver"))]
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: NvmlDevice,
    info_count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> NvmlReturn {
    guard(|| {
        let st = lock();
        let (scenario, now, i) = st.capable(device, cap::PROCESSES)?;
        if info_count.is_null() {
            return Err(ERROR_INVALID_ARGUMENT);
        }
        let pids = scenario.pids_at(i, now);
        let count = pids.len().min(c_uint::MAX as usize) as c_uint;
        if infos.is_null() || *info_count < count {
            info_count.write(count);
            return if count > 0 {
                Err(ERROR_INSUFFICIENT_SIZE)
            } else {
                Ok(())
            };
        }
        let per_process = scenario.gpus[i].memory_used_bytes / u64::from(count.max(1));
        for (k, &pid) in pids.iter().take(count as usize).enumerate() {
            infos.add(k).write(ProcessInfo {
                pid,
                used_gpu_memory: per_process,
                gpu_instance_id: NO_INSTANCE,
                compute_instance_id: NO_INSTANCE,
            });
        }
        info_count.write(count);
        Ok(())
    })
}

/// A new set only sees events after the last driver reload.
#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut NvmlEventSet) -> NvmlReturn {
    guard(|| {
        let mut st = lock();
        let (scenario, now) = st.ready()?;
        if set.is_null() {
            return Err(ERROR_INVALID_ARGUMENT);
        }
        let since_ms = scenario
            .driver_down
            .iter()
            .map(|w| w[1])
            .filter(|&end| end <= now)
            .max()
            .unwrap_or(0);
        let id = st.next_set;
        st.next_set += 1;
        let generation = st.generation;
        st.sets.insert(
            id,
            SetState {
                generation,
                since_ms,
                registered: BTreeSet::new(),
                delivered: BTreeSet::new(),
            },
        );
        put(set, set_handle(id))
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetSupportedEventTypes(
    device: NvmlDevice,
    event_types: *mut c_ulonglong,
) -> NvmlReturn {
    guard(|| {
        let st = lock();
        st.capable(device, cap::EVENTS)?;
        put(event_types, EVENT_TYPE_XID_CRITICAL_ERROR)
    })
}

/// Only critical XID events can be registered.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceRegisterEvents(
    device: NvmlDevice,
    event_types: c_ulonglong,
    set: NvmlEventSet,
) -> NvmlReturn {
    guard(|| {
        let mut st = lock();
        let (_, _, i) = st.capable(device, cap::EVENTS)?;
        if event_types == 0 {
            return Err(ERROR_INVALID_ARGUMENT);
        }
        if event_types & !EVENT_TYPE_XID_CRITICAL_ERROR != 0 {
            return Err(ERROR_NOT_SUPPORTED);
        }
        st.set_mut(set)?.registered.insert(i);
        Ok(())
    })
}

/// Delivers each due XID of a registered GPU once per set, oldest first;
/// otherwise sleeps (in slices, without the lock) until one is due or the
/// timeout passes.
#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    set: NvmlEventSet,
    data: *mut EventData,
    timeoutms: c_uint,
) -> NvmlReturn {
    guard(|| {
        if data.is_null() {
            return Err(ERROR_INVALID_ARGUMENT);
        }
        // On the scenario's clock, fixed at the first look.
        let mut deadline_ms = None;
        loop {
            let pause_ms = {
                let mut st = lock();
                let (scenario, now) = st.ready()?;
                let events = scenario.xid_events();
                let deadline = *deadline_ms.get_or_insert(now + u64::from(timeoutms));
                let set = st.set_mut(set)?;
                let pending = events.iter().enumerate().find(|(k, e)| {
                    set.registered.contains(&e.gpu)
                        && e.at_ms >= set.since_ms
                        && !set.delivered.contains(k)
                });
                match pending {
                    Some((k, e)) if e.at_ms <= now => {
                        set.delivered.insert(k);
                        return put(
                            data,
                            EventData {
                                device: device_handle(e.gpu),
                                event_type: EVENT_TYPE_XID_CRITICAL_ERROR,
                                event_data: e.code,
                                gpu_instance_id: NO_INSTANCE,
                                compute_instance_id: NO_INSTANCE,
                            },
                        );
                    }
                    _ if now >= deadline => return Err(ERROR_TIMEOUT),
                    Some((_, e)) => e.at_ms.min(deadline) - now,
                    None => deadline - now,
                }
            };
            std::thread::sleep(Duration::from_millis(pause_ms.clamp(1, WAIT_SLICE_MS)));
        }
    })
}

/// Freeing works even after a reload, so `Drop` of a stale set succeeds.
#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetFree(set: NvmlEventSet) -> NvmlReturn {
    guard(|| {
        let mut st = lock();
        if st.refcount == 0 {
            return Err(ERROR_UNINITIALIZED);
        }
        let id = set.addr().wrapping_sub(EVENT_SET_BASE);
        st.sets
            .remove(&id)
            .map(|_| ())
            .ok_or(ERROR_INVALID_ARGUMENT)
    })
}

/// Test hook, not NVML: how many GPM samples are allocated and not freed.
#[no_mangle]
pub unsafe extern "C" fn fake_nvml_gpm_samples_live() -> c_uint {
    lock().gpm_samples.len() as c_uint
}

#[cfg(not(feature = "old_driver"))]
fn gpm_sample_handle(id: usize) -> NvmlGpmSample {
    std::ptr::without_provenance_mut(GPM_SAMPLE_BASE + id)
}

#[cfg(not(feature = "old_driver"))]
fn gpm_sample_id(sample: NvmlGpmSample) -> usize {
    sample.addr().wrapping_sub(GPM_SAMPLE_BASE)
}

/// Supported unless the GPU's scenario lists [`cap::GPM`] as unsupported: then
/// `isSupportedDevice` is 0, as the real driver answers for a pre-Hopper GPU.
#[cfg(not(feature = "old_driver"))]
#[no_mangle]
pub unsafe extern "C" fn nvmlGpmQueryDeviceSupport(
    device: NvmlDevice,
    support: *mut GpmSupport,
) -> NvmlReturn {
    guard(|| {
        let st = lock();
        let (scenario, _, i) = st.device(device)?;
        if support.is_null() {
            return Err(ERROR_INVALID_ARGUMENT);
        }
        if (*support).version != GPM_SUPPORT_VERSION {
            return Err(ERROR_ARGUMENT_VERSION_MISMATCH);
        }
        put(
            support,
            GpmSupport {
                version: GPM_SUPPORT_VERSION,
                is_supported_device: c_uint::from(scenario.gpus[i].supports(cap::GPM)),
            },
        )
    })
}

#[cfg(not(feature = "old_driver"))]
#[no_mangle]
pub unsafe extern "C" fn nvmlGpmSampleAlloc(sample: *mut NvmlGpmSample) -> NvmlReturn {
    guard(|| {
        let mut st = lock();
        st.ready()?;
        if sample.is_null() {
            return Err(ERROR_INVALID_ARGUMENT);
        }
        let id = st.next_gpm_sample;
        st.next_gpm_sample += 1;
        st.gpm_samples.insert(id, None);
        put(sample, gpm_sample_handle(id))
    })
}

/// Freeing works even after a reload, so `Drop` of a stale sample succeeds.
#[cfg(not(feature = "old_driver"))]
#[no_mangle]
pub unsafe extern "C" fn nvmlGpmSampleFree(sample: NvmlGpmSample) -> NvmlReturn {
    guard(|| {
        let mut st = lock();
        if st.refcount == 0 {
            return Err(ERROR_UNINITIALIZED);
        }
        st.gpm_samples
            .remove(&gpm_sample_id(sample))
            .map(|_| ())
            .ok_or(ERROR_INVALID_ARGUMENT)
    })
}

/// Records the GPU and the time; `NOT_SUPPORTED` without GPM, `UNKNOWN` inside a
/// [`Gpu::gpm_fail`](crate::scenario::Gpu::gpm_fail) window.
#[cfg(not(feature = "old_driver"))]
#[no_mangle]
pub unsafe extern "C" fn nvmlGpmSampleGet(device: NvmlDevice, sample: NvmlGpmSample) -> NvmlReturn {
    guard(|| {
        let mut st = lock();
        let (scenario, now, i) = st.capable(device, cap::GPM)?;
        if scenario.gpm_fails_at(i, now) {
            return Err(ERROR_UNKNOWN);
        }
        let generation = st.generation;
        let slot = st
            .gpm_samples
            .get_mut(&gpm_sample_id(sample))
            .ok_or(ERROR_INVALID_ARGUMENT)?;
        *slot = Some((i, now, generation));
        Ok(())
    })
}

/// SM and tensor activity between two samples of one GPU of this driver generation,
/// taken at least [`GPM_MIN_SPAN_MS`] apart, `sample1` first: the exact averages of
/// the script over `[t1, t2)` ([`Scenario::gpm_averages`]). Any other metric answers
/// `NOT_SUPPORTED` in its own entry.
#[cfg(not(feature = "old_driver"))]
#[no_mangle]
pub unsafe extern "C" fn nvmlGpmMetricsGet(request: *mut GpmMetricsGet) -> NvmlReturn {
    use crate::scenario::{gpm_metric, GPM_MIN_SPAN_MS};
    guard(|| {
        let st = lock();
        let (scenario, _) = st.ready()?;
        if request.is_null() {
            return Err(ERROR_INVALID_ARGUMENT);
        }
        let req = &mut *request;
        if req.version != GPM_METRICS_GET_VERSION {
            return Err(ERROR_ARGUMENT_VERSION_MISMATCH);
        }
        let n = req.num_metrics as usize;
        if n > GPM_METRIC_MAX {
            return Err(ERROR_INVALID_ARGUMENT);
        }
        let taken = |s: NvmlGpmSample| {
            st.gpm_samples
                .get(&gpm_sample_id(s))
                .copied()
                .flatten()
                .filter(|&(_, _, generation)| generation == st.generation)
                .ok_or(ERROR_INVALID_ARGUMENT)
        };
        let (gpu1, t1, _) = taken(req.sample1)?;
        let (gpu2, t2, _) = taken(req.sample2)?;
        if gpu1 != gpu2 || t2 < t1 + GPM_MIN_SPAN_MS {
            return Err(ERROR_INVALID_ARGUMENT);
        }
        let (sm, tensor) = scenario.gpm_averages(gpu1, t1, t2);
        for m in &mut req.metrics[..n] {
            let (value, short, long, unit): (f64, &'static CStr, &'static CStr, &'static CStr) =
                match m.metric_id {
                    gpm_metric::SM_UTIL => (sm, c"SM_UTIL", c"SM utilization", c"%"),
                    gpm_metric::ANY_TENSOR_UTIL => (
                        tensor,
                        c"ANY_TENSOR_UTIL",
                        c"Any tensor pipe utilization",
                        c"%",
                    ),
                    _ => {
                        m.nvml_return = ERROR_NOT_SUPPORTED;
                        continue;
                    }
                };
            m.nvml_return = SUCCESS;
            m.value = value;
            m.metric_info = GpmMetricInfo {
                short_name: short.as_ptr().cast_mut(),
                long_name: long.as_ptr().cast_mut(),
                unit: unit.as_ptr().cast_mut(),
            };
        }
        Ok(())
    })
}
