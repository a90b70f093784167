//! A scripted stand-in for `libnvidia-ml.so.1`, loaded by the real
//! `nvml-wrapper` in tests.
//!
//! Built as `libnvidia_ml.so`, it exports the NVML symbols the agent uses and
//! answers them from a JSON [`scenario::Scenario`] named by
//! `FAKE_NVML_SCENARIO` (read at the first `nvmlInit_v2`). As an rlib it gives
//! tests the same scenario types and the ground truth to compare against.
//! With the `old_driver` feature (package `fake-nvml-old`) the symbols newer
//! drivers added are left out.

// A test double, not commitmeter: it reads the wall clock as it likes (the workspace's
// clippy.toml keeps time reads in commitmeter's clock module).
#![allow(clippy::disallowed_methods)]

pub mod abi;
mod ffi;
pub mod scenario;

#[cfg(test)]
mod layout_tests {
    //! The hand-written C types must match nvml-wrapper-sys's bindings.
    use crate::abi::*;
    use nvml_wrapper_sys::bindings as sys;
    use std::mem::{align_of, offset_of, size_of};

    macro_rules! same_layout {
        ($ours:ty, $theirs:ty, $($a:ident = $b:ident),*) => {
            assert_eq!(size_of::<$ours>(), size_of::<$theirs>());
            assert_eq!(align_of::<$ours>(), align_of::<$theirs>());
            $(assert_eq!(offset_of!($ours, $a), offset_of!($theirs, $b));)*
        };
    }

    #[test]
    fn layouts_match_bindings() {
        same_layout!(
            PciInfo,
            sys::nvmlPciInfo_t,
            bus_id_legacy = busIdLegacy,
            domain = domain,
            bus = bus,
            device = device,
            pci_device_id = pciDeviceId,
            pci_sub_system_id = pciSubSystemId,
            bus_id = busId
        );
        same_layout!(Value, sys::nvmlValue_t,);
        same_layout!(
            Sample,
            sys::nvmlSample_t,
            time_stamp = timeStamp,
            sample_value = sampleValue
        );
        same_layout!(
            Utilization,
            sys::nvmlUtilization_t,
            gpu = gpu,
            memory = memory
        );
        same_layout!(
            Memory,
            sys::nvmlMemory_t,
            total = total,
            free = free,
            used = used
        );
        same_layout!(
            MemoryV2,
            sys::nvmlMemory_v2_t,
            version = version,
            total = total,
            reserved = reserved,
            free = free,
            used = used
        );
        same_layout!(
            ProcessInfo,
            sys::nvmlProcessInfo_t,
            pid = pid,
            used_gpu_memory = usedGpuMemory,
            gpu_instance_id = gpuInstanceId,
            compute_instance_id = computeInstanceId
        );
        same_layout!(
            EventData,
            sys::nvmlEventData_t,
            device = device,
            event_type = eventType,
            event_data = eventData,
            gpu_instance_id = gpuInstanceId,
            compute_instance_id = computeInstanceId
        );
        same_layout!(
            GpmSupport,
            sys::nvmlGpmSupport_t,
            version = version,
            is_supported_device = isSupportedDevice
        );
        same_layout!(
            GpmMetricInfo,
            sys::nvmlGpmMetric_t__bindgen_ty_1,
            short_name = shortName,
            long_name = longName,
            unit = unit
        );
        same_layout!(
            GpmMetric,
            sys::nvmlGpmMetric_t,
            metric_id = metricId,
            nvml_return = nvmlReturn,
            value = value,
            metric_info = metricInfo
        );
        same_layout!(
            GpmMetricsGet,
            sys::nvmlGpmMetricsGet_t,
            version = version,
            num_metrics = numMetrics,
            sample1 = sample1,
            sample2 = sample2,
            metrics = metrics
        );
    }

    #[test]
    fn constants_match_bindings() {
        assert_eq!(
            ERROR_GPU_IS_LOST,
            sys::nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST
        );
        assert_eq!(
            ERROR_ARGUMENT_VERSION_MISMATCH,
            sys::nvmlReturn_enum_NVML_ERROR_ARGUMENT_VERSION_MISMATCH
        );
        assert_eq!(ERROR_UNKNOWN, sys::nvmlReturn_enum_NVML_ERROR_UNKNOWN);
        assert_eq!(
            GPU_UTILIZATION_SAMPLES,
            sys::nvmlSamplingType_enum_NVML_GPU_UTILIZATION_SAMPLES
        );
        assert_eq!(
            VALUE_TYPE_UNSIGNED_INT,
            sys::nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_INT
        );
        assert_eq!(
            EVENT_TYPE_XID_CRITICAL_ERROR,
            u64::from(sys::nvmlEventTypeXidCriticalError)
        );
        assert_eq!(GPM_SUPPORT_VERSION, sys::NVML_GPM_SUPPORT_VERSION);
        assert_eq!(GPM_METRICS_GET_VERSION, sys::NVML_GPM_METRICS_GET_VERSION);
        assert_eq!(
            GPM_METRIC_MAX,
            sys::nvmlGpmMetricId_t_NVML_GPM_METRIC_MAX as usize
        );
        assert_eq!(
            crate::scenario::gpm_metric::SM_UTIL,
            sys::nvmlGpmMetricId_t_NVML_GPM_METRIC_SM_UTIL
        );
        assert_eq!(
            crate::scenario::gpm_metric::ANY_TENSOR_UTIL,
            sys::nvmlGpmMetricId_t_NVML_GPM_METRIC_ANY_TENSOR_UTIL
        );
        assert_eq!(
            MEMORY_V2_VERSION as usize,
            size_of::<sys::nvmlMemory_v2_t>() | (2 << 24)
        );
    }
}
