//! C types and codes of `nvml.h`, as far as the fake needs them.
//!
//! Declared here rather than taken from `nvml-wrapper-sys` so the cdylib does
//! not link libloading; the unit tests check the layouts against the bindings.

use std::ffi::{c_char, c_uint, c_ulonglong, c_void};

/// `nvmlReturn_t`.
pub type NvmlReturn = c_uint;
/// `nvmlDevice_t`: opaque, never dereferenced by callers.
pub type NvmlDevice = *mut c_void;
/// `nvmlEventSet_t`: opaque, never dereferenced by callers.
pub type NvmlEventSet = *mut c_void;

pub const SUCCESS: NvmlReturn = 0;
pub const ERROR_UNINITIALIZED: NvmlReturn = 1;
pub const ERROR_INVALID_ARGUMENT: NvmlReturn = 2;
pub const ERROR_NOT_SUPPORTED: NvmlReturn = 3;
pub const ERROR_ALREADY_INITIALIZED: NvmlReturn = 5;
pub const ERROR_NOT_FOUND: NvmlReturn = 6;
pub const ERROR_INSUFFICIENT_SIZE: NvmlReturn = 7;
pub const ERROR_DRIVER_NOT_LOADED: NvmlReturn = 9;
pub const ERROR_TIMEOUT: NvmlReturn = 10;
pub const ERROR_GPU_IS_LOST: NvmlReturn = 15;
pub const ERROR_ARGUMENT_VERSION_MISMATCH: NvmlReturn = 25;
pub const ERROR_UNKNOWN: NvmlReturn = 999;

/// `NVML_GPU_UTILIZATION_SAMPLES`.
pub const GPU_UTILIZATION_SAMPLES: c_uint = 1;
/// `NVML_VALUE_TYPE_UNSIGNED_INT`.
pub const VALUE_TYPE_UNSIGNED_INT: c_uint = 1;
/// `NVML_TEMPERATURE_GPU`.
pub const TEMPERATURE_GPU: c_uint = 0;
/// `nvmlEventTypeXidCriticalError`.
pub const EVENT_TYPE_XID_CRITICAL_ERROR: c_ulonglong = 0x8;
/// GPU / compute instance id meaning "no MIG instance".
pub const NO_INSTANCE: c_uint = 0xFFFF_FFFF;
/// `NVML_STRUCT_VERSION(Memory, 2)`.
pub const MEMORY_V2_VERSION: c_uint = (std::mem::size_of::<MemoryV2>() | (2 << 24)) as c_uint;

/// `nvmlPciInfo_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PciInfo {
    pub bus_id_legacy: [c_char; 16],
    pub domain: c_uint,
    pub bus: c_uint,
    pub device: c_uint,
    pub pci_device_id: c_uint,
    pub pci_sub_system_id: c_uint,
    pub bus_id: [c_char; 32],
}

/// `nvmlValue_t`, reduced to the members the fake writes (same size and alignment).
#[repr(C)]
#[derive(Clone, Copy)]
pub union Value {
    pub ui_val: c_uint,
    pub ull_val: c_ulonglong,
}

/// `nvmlSample_t`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Sample {
    pub time_stamp: c_ulonglong,
    pub sample_value: Value,
}

/// `nvmlUtilization_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Utilization {
    pub gpu: c_uint,
    pub memory: c_uint,
}

/// `nvmlMemory_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Memory {
    pub total: c_ulonglong,
    pub free: c_ulonglong,
    pub used: c_ulonglong,
}

/// `nvmlMemory_v2_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MemoryV2 {
    pub version: c_uint,
    pub total: c_ulonglong,
    pub reserved: c_ulonglong,
    pub free: c_ulonglong,
    pub used: c_ulonglong,
}

/// `nvmlProcessInfo_t` (the v2 struct, which the `_v3` process query fills).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcessInfo {
    pub pid: c_uint,
    pub used_gpu_memory: c_ulonglong,
    pub gpu_instance_id: c_uint,
    pub compute_instance_id: c_uint,
}

/// `nvmlEventData_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventData {
    pub device: NvmlDevice,
    pub event_type: c_ulonglong,
    pub event_data: c_ulonglong,
    pub gpu_instance_id: c_uint,
    pub compute_instance_id: c_uint,
}

/// `nvmlGpmSample_t`: opaque, never dereferenced by callers.
pub type NvmlGpmSample = *mut c_void;
/// `NVML_GPM_SUPPORT_VERSION`.
pub const GPM_SUPPORT_VERSION: c_uint = 1;
/// `NVML_GPM_METRICS_GET_VERSION`.
pub const GPM_METRICS_GET_VERSION: c_uint = 1;
/// `NVML_GPM_METRIC_MAX`: the length of `nvmlGpmMetricsGet_t::metrics` in the bindings.
pub const GPM_METRIC_MAX: usize = 210;

/// `nvmlGpmSupport_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GpmSupport {
    pub version: c_uint,
    pub is_supported_device: c_uint,
}

/// The `metricInfo` member of `nvmlGpmMetric_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GpmMetricInfo {
    pub short_name: *mut c_char,
    pub long_name: *mut c_char,
    pub unit: *mut c_char,
}

/// `nvmlGpmMetric_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GpmMetric {
    pub metric_id: c_uint,
    pub nvml_return: NvmlReturn,
    pub value: f64,
    pub metric_info: GpmMetricInfo,
}

/// `nvmlGpmMetricsGet_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GpmMetricsGet {
    pub version: c_uint,
    pub num_metrics: c_uint,
    pub sample1: NvmlGpmSample,
    pub sample2: NvmlGpmSample,
    pub metrics: [GpmMetric; GPM_METRIC_MAX],
}
