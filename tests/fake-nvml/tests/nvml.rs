//! The fake driven through the real nvml-wrapper, checked against the
//! scenario's ground truth.

mod common;

use common::{built_lib, FakeLib};
use nvidia_ml::scenario::{cap, Gpu, Scenario, SAMPLE_TIMESTAMP_BASE_US};
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{Clock, Sampling, TemperatureSensor};
use nvml_wrapper::enums::device::{SampleValue, UsedGpuMemory};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::device::Sample;

fn scenario(gpus: Vec<Gpu>) -> Scenario {
    Scenario {
        gpus,
        ..Scenario::default()
    }
    .with_start_now()
}

fn value(sample: &Sample) -> u64 {
    match sample.value {
        SampleValue::U32(v) => u64::from(v),
        ref other => panic!("unexpected sample value {other:?}"),
    }
}

#[test]
fn identity() {
    let s = scenario(vec![
        Gpu::default(),
        Gpu {
            uuid: "GPU-custom".into(),
            name: "NVIDIA H200".into(),
            pci_bus_id: "00000001:9A:00.0".into(),
            ..Gpu::default()
        },
    ]);
    let fake = FakeLib::new("identity", &s);
    let nvml = fake.init().unwrap();
    assert_eq!(nvml.device_count().unwrap(), 2);
    assert_eq!(nvml.sys_driver_version().unwrap(), "550.54.15");

    let d0 = nvml.device_by_index(0).unwrap();
    assert_eq!(
        d0.uuid().unwrap(),
        "GPU-00000000-0000-0000-0000-000000000000"
    );
    assert_eq!(d0.name().unwrap(), "NVIDIA H100 80GB HBM3");
    assert_eq!(d0.index().unwrap(), 0);
    let pci = d0.pci_info().unwrap();
    assert_eq!(pci.bus_id, "00000000:17:00.0");
    assert_eq!((pci.domain, pci.bus, pci.device), (0, 0x17, 0));
    assert_eq!(pci.pci_device_id, 0x2330_10DE);

    let d1 = nvml.device_by_index(1).unwrap();
    assert_eq!(d1.uuid().unwrap(), "GPU-custom");
    assert_eq!(d1.name().unwrap(), "NVIDIA H200");
    assert_eq!(d1.index().unwrap(), 1);
    let pci = d1.pci_info().unwrap();
    assert_eq!(pci.bus_id, "00000001:9A:00.0");
    assert_eq!((pci.domain, pci.bus), (1, 0x9A));

    assert!(matches!(
        nvml.device_by_index(2),
        Err(NvmlError::InvalidArg)
    ));
}

/// Without a scenario file the fake is two GPUs at a constant 50%.
#[test]
fn default_scenario() {
    if std::env::var_os(nvidia_ml::scenario::ENV_VAR).is_some() {
        eprintln!("skipped: {} is set", nvidia_ml::scenario::ENV_VAR);
        return;
    }
    let fake = FakeLib::unscripted("default", Scenario::default());
    let nvml = fake.init().unwrap();
    assert_eq!(nvml.device_count().unwrap(), 2);
    for gpu in 0..2 {
        let d = nvml.device_by_index(gpu).unwrap();
        assert_eq!(d.utilization_rates().unwrap().gpu, 50);
        assert_eq!(d.uuid().unwrap(), fake.scenario.uuid(gpu as usize));
    }
}

#[test]
fn readings() {
    let s = scenario(vec![Gpu {
        util: vec![[0, 70]],
        power_mw: 250_000,
        power_limit_mw: 600_000,
        temperature_c: 55,
        sm_clock_mhz: 1755,
        memory_total_bytes: 1000,
        memory_used_bytes: 300,
        ..Gpu::default()
    }]);
    let fake = FakeLib::new("readings", &s);
    let nvml = fake.init().unwrap();
    let d = nvml.device_by_index(0).unwrap();
    let util = d.utilization_rates().unwrap();
    assert_eq!((util.gpu, util.memory), (70, 35));
    assert_eq!(d.power_usage().unwrap(), 250_000);
    assert_eq!(d.enforced_power_limit().unwrap(), 600_000);
    assert_eq!(d.temperature(TemperatureSensor::Gpu).unwrap(), 55);
    assert_eq!(d.clock_info(Clock::SM).unwrap(), 1755);
    assert_eq!(d.clock_info(Clock::Graphics).unwrap(), 1755);
    let mem = d.memory_info().unwrap();
    assert_eq!(
        (mem.total, mem.used, mem.free, mem.reserved),
        (1000, 300, 700, 0)
    );
}

#[test]
fn samples_cursor() {
    let s = Scenario {
        sample_period_ms: 20,
        ring: 1000,
        ..scenario(vec![Gpu {
            util: vec![[0, 30], [200, 90], [400, 10]],
            ..Gpu::default()
        }])
    };
    let fake = FakeLib::new("samples", &s);
    let nvml = fake.init().unwrap();
    let d = nvml.device_by_index(0).unwrap();

    fake.sleep_until(500);
    let first = d.samples(Sampling::GpuUtilization, None).unwrap();
    assert!(first.len() >= 25, "{} samples", first.len());
    let last = first.last().unwrap().timestamp;
    fake.sleep_until(700);
    let second = d.samples(Sampling::GpuUtilization, last).unwrap();
    assert!(!second.is_empty());
    assert!(
        second.iter().all(|x| x.timestamp > last),
        "overlapping reads"
    );

    // Together they are every period since zero, in order, once.
    let all: Vec<&Sample> = first.iter().chain(&second).collect();
    for (k, x) in all.iter().enumerate() {
        assert_eq!(
            x.timestamp,
            SAMPLE_TIMESTAMP_BASE_US + (k as u64 + 1) * 20_000
        );
    }
    assert_eq!(value(all[0]), 30);
    assert_eq!(value(all[10]), 90);
    assert_eq!(value(all[20]), 10);
    let end_ms = (all.last().unwrap().timestamp - SAMPLE_TIMESTAMP_BASE_US) / 1000;
    let measured: u64 = all.iter().map(|x| value(x) * 20).sum();
    let truth = s.busy_seconds(0, 0, end_ms);
    assert!(
        (measured as f64 / 100_000.0 - truth).abs() < 0.020,
        "{measured} vs {truth}"
    );
}

#[test]
fn samples_ring_and_dry() {
    let s = Scenario {
        sample_period_ms: 10,
        ring: 5,
        ..scenario(vec![
            Gpu::at_util(40),
            Gpu {
                samples_dry_when_idle: true,
                ..Gpu::at_util(0)
            },
        ])
    };
    let fake = FakeLib::new("ring", &s);
    let nvml = fake.init().unwrap();
    fake.sleep_until(200);
    let busy = nvml.device_by_index(0).unwrap();
    let kept = busy.samples(Sampling::GpuUtilization, None).unwrap();
    assert_eq!(kept.len(), 5);
    assert!(kept.iter().all(|x| value(x) == 40));
    let idle = nvml.device_by_index(1).unwrap();
    assert!(matches!(
        idle.samples(Sampling::GpuUtilization, None),
        Err(NvmlError::NotFound)
    ));
    assert!(matches!(
        busy.samples(Sampling::Power, None),
        Err(NvmlError::NotSupported)
    ));
}

#[test]
fn lost_gpu() {
    let s = scenario(vec![
        Gpu::default(),
        Gpu {
            lost_at_ms: Some(0),
            ..Gpu::default()
        },
        Gpu {
            lost_at_ms: Some(600),
            ..Gpu::default()
        },
    ]);
    let fake = FakeLib::new("lost", &s);
    let nvml = fake.init().unwrap();
    assert_eq!(nvml.device_count().unwrap(), 3);
    assert!(matches!(nvml.device_by_index(1), Err(NvmlError::GpuLost)));
    let d2 = nvml.device_by_index(2).unwrap();
    assert!(d2.uuid().is_ok());
    fake.sleep_until(650);
    assert!(matches!(d2.uuid(), Err(NvmlError::GpuLost)));
    assert!(matches!(d2.utilization_rates(), Err(NvmlError::GpuLost)));
    assert!(matches!(nvml.device_by_index(2), Err(NvmlError::GpuLost)));
    assert!(nvml.device_by_index(0).unwrap().uuid().is_ok());
    assert!((s.present_seconds(2, 0, 1000) - 0.6).abs() < 1e-9);
}

#[test]
fn processes() {
    let s = scenario(vec![
        Gpu {
            processes: vec![[0, 3]],
            memory_used_bytes: 3000,
            ..Gpu::default()
        },
        Gpu {
            processes: vec![[0, 0]],
            ..Gpu::default()
        },
        // Scripted PIDs replace the count.
        Gpu {
            processes: vec![[0, 7]],
            pids: Some(vec![(0, vec![4242, 77])]),
            ..Gpu::default()
        },
    ]);
    let fake = FakeLib::new("procs", &s);
    let nvml = fake.init().unwrap();
    let d0 = nvml.device_by_index(0).unwrap();
    assert_eq!(d0.running_compute_processes_count().unwrap(), 3);
    let procs = d0.running_compute_processes().unwrap();
    let pids: Vec<u32> = procs.iter().map(|p| p.pid).collect();
    assert_eq!(pids, vec![1000, 1001, 1002]);
    assert!(matches!(
        procs[0].used_gpu_memory,
        UsedGpuMemory::Used(1000)
    ));
    assert_eq!(procs[0].gpu_instance_id, None);
    let d1 = nvml.device_by_index(1).unwrap();
    assert_eq!(d1.running_compute_processes_count().unwrap(), 0);
    assert!(d1.running_compute_processes().unwrap().is_empty());
    let d2 = nvml.device_by_index(2).unwrap();
    assert_eq!(d2.running_compute_processes_count().unwrap(), 2);
    let pids: Vec<u32> = d2
        .running_compute_processes()
        .unwrap()
        .iter()
        .map(|p| p.pid)
        .collect();
    assert_eq!(pids, vec![4242, 77]);
}

#[test]
fn energy() {
    let s = scenario(vec![
        Gpu {
            power_mw: 250_000,
            energy_start_mj: 1_000_000,
            ..Gpu::default()
        },
        Gpu {
            energy_start_mj: 5_000_000,
            energy_reset_at_ms: Some(100),
            ..Gpu::default()
        },
    ]);
    let fake = FakeLib::new("energy", &s);
    let nvml = fake.init().unwrap();
    fake.sleep_until(200);
    for gpu in 0..2 {
        let d = nvml.device_by_index(gpu).unwrap();
        let before = s.energy_counter_mj(gpu as usize, s.now_ms());
        let counter = d.total_energy_consumption().unwrap();
        let after = s.energy_counter_mj(gpu as usize, s.now_ms());
        assert!(
            before <= counter && counter <= after,
            "{before} <= {counter} <= {after}"
        );
    }
    // The reset wrapped the second counter below its start value.
    assert!(s.energy_counter_mj(1, 200) < 5_000_000);
}

#[test]
fn xid_delivered_once() {
    let s = scenario(vec![
        Gpu {
            xids: vec![[100_000, 48]],
            ..Gpu::default()
        },
        Gpu {
            xids: vec![[150, 79]],
            ..Gpu::default()
        },
    ]);
    let fake = FakeLib::new("xid", &s);
    let nvml = fake.init().unwrap();
    let d0 = nvml.device_by_index(0).unwrap();
    let d1 = nvml.device_by_index(1).unwrap();
    assert_eq!(
        d1.supported_event_types().unwrap(),
        EventTypes::CRITICAL_XID_ERROR
    );
    let set = nvml.create_event_set().unwrap();
    let set = d0
        .register_events(EventTypes::CRITICAL_XID_ERROR, set)
        .unwrap();
    let set = d1
        .register_events(EventTypes::CRITICAL_XID_ERROR, set)
        .unwrap();

    let event = set.wait(3000).unwrap();
    assert!(s.now_ms() >= 150);
    assert_eq!(event.device.uuid().unwrap(), s.uuid(1));
    assert_eq!(event.event_type, EventTypes::CRITICAL_XID_ERROR);
    assert_eq!(event.event_data, Some(XidError::Value(79)));
    assert!(matches!(set.wait(100), Err(NvmlError::Timeout)));
    assert_eq!(s.xid_count(1, 79, 0, s.now_ms()), 1);
}

#[test]
fn driver_reload() {
    let s = Scenario {
        driver_down: vec![[600, 1200]],
        ..scenario(vec![Gpu::default()])
    };
    let fake = FakeLib::new("reload", &s);
    let old = fake.init().unwrap();
    let d = old.device_by_index(0).unwrap();
    assert!(d.uuid().is_ok());
    fake.sleep_until(650);
    assert!(matches!(d.uuid(), Err(NvmlError::Uninitialized)));
    assert!(matches!(old.device_count(), Err(NvmlError::Uninitialized)));
    assert!(matches!(fake.init(), Err(NvmlError::DriverNotLoaded)));
    fake.sleep_until(1250);
    assert!(matches!(d.uuid(), Err(NvmlError::Uninitialized)));
    let fresh = fake.init().unwrap();
    assert_eq!(fresh.device_count().unwrap(), 1);
    assert!(fresh.device_by_index(0).unwrap().uuid().is_ok());
    drop(old);
    assert!(fresh.device_by_index(0).is_ok());
}

#[test]
fn init_fails_until() {
    let s = Scenario {
        init_fail_until_ms: 600,
        ..scenario(vec![Gpu::default()])
    };
    let fake = FakeLib::new("initfail", &s);
    assert!(matches!(fake.init(), Err(NvmlError::DriverNotLoaded)));
    fake.sleep_until(620);
    assert_eq!(fake.init().unwrap().device_count().unwrap(), 1);
}

#[test]
fn malformed_scenario() {
    let path = std::env::temp_dir().join(format!("fake-nvml-bad-{}.json", std::process::id()));
    std::fs::write(&path, r#"{"gpus": [{"utilisation": [[0, 50]]}]}"#).unwrap();
    let fake = FakeLib::with_file("nvidia_ml", "bad", Scenario::default(), path);
    assert!(matches!(fake.init(), Err(NvmlError::Unknown)));
}

#[test]
fn unsupported_capabilities() {
    let s = scenario(vec![Gpu {
        unsupported: vec![cap::POWER.into(), cap::SAMPLES.into(), cap::EVENTS.into()],
        ..Gpu::default()
    }]);
    let fake = FakeLib::new("unsupported", &s);
    let nvml = fake.init().unwrap();
    let d = nvml.device_by_index(0).unwrap();
    assert!(matches!(d.power_usage(), Err(NvmlError::NotSupported)));
    assert!(matches!(
        d.samples(Sampling::GpuUtilization, None),
        Err(NvmlError::NotSupported)
    ));
    assert!(matches!(
        d.supported_event_types(),
        Err(NvmlError::NotSupported)
    ));
    assert!(d.utilization_rates().is_ok());
}

/// Needs `cargo build -p fake-nvml-old`; says so and passes when it is missing.
#[test]
fn old_driver_lacks_new_symbols() {
    if !built_lib("nvidia_ml_old").exists() {
        eprintln!("skipped: libnvidia_ml_old.so not built (cargo build -p fake-nvml-old)");
        return;
    }
    let s = scenario(vec![Gpu::default()]);
    let fake = FakeLib::of("nvidia_ml_old", "old", &s);
    let nvml = fake.init().unwrap();
    let d = nvml.device_by_index(0).unwrap();
    assert_eq!(d.utilization_rates().unwrap().gpu, 50);
    let missing = |r: Result<(), NvmlError>| matches!(r, Err(NvmlError::FailedToLoadSymbol(_)));
    assert!(missing(d.samples(Sampling::GpuUtilization, None).map(drop)));
    assert!(missing(d.total_energy_consumption().map(drop)));
    assert!(missing(d.running_compute_processes_count().map(drop)));
    assert!(missing(d.memory_info().map(drop)));
    // No GPM symbols at all: support cannot even be asked (and no sample exists to drop).
    assert!(missing(d.gpm_support().map(drop)));
    assert!(missing(d.gpm_sample().map(drop)));
}

#[test]
fn reload_can_enumerate_in_another_order() {
    let s = Scenario {
        driver_down: vec![[300, 600]],
        reorder_on_reload: vec![vec![1, 0]],
        ..scenario(vec![Gpu::at_util(20), Gpu::at_util(80)])
    };
    let fake = FakeLib::new("reorder", &s);
    let before = fake.init().unwrap();
    let d0 = before.device_by_index(0).unwrap();
    assert_eq!(d0.uuid().unwrap(), s.uuid(0));
    assert_eq!(d0.index().unwrap(), 0);
    drop(before);
    fake.sleep_until(650);
    let after = fake.init().unwrap();
    let d0 = after.device_by_index(0).unwrap();
    let d1 = after.device_by_index(1).unwrap();
    assert_eq!(d0.uuid().unwrap(), s.uuid(1));
    assert_eq!(d0.index().unwrap(), 0);
    assert_eq!(d0.pci_info().unwrap().bus_id, s.pci_bus_id(1));
    assert_eq!(d0.utilization_rates().unwrap().gpu, 80);
    assert_eq!(d1.uuid().unwrap(), s.uuid(0));
    assert_eq!(d1.index().unwrap(), 1);
    assert_eq!(d1.utilization_rates().unwrap().gpu, 20);
}

#[test]
fn a_hung_driver_blocks_every_call_until_it_recovers() {
    let s = Scenario {
        hang_at_ms: Some(300),
        hang_until_ms: Some(900),
        ..scenario(vec![Gpu::default()])
    };
    let fake = FakeLib::new("hang", &s);
    let nvml = fake.init().unwrap();
    let d = nvml.device_by_index(0).unwrap();
    assert!(d.uuid().is_ok());
    fake.sleep_until(350);
    let rates = d.utilization_rates();
    let back = s.now_ms();
    assert!(back >= 900, "returned at {back} ms, inside the hang");
    assert_eq!(rates.unwrap().gpu, 50);
}

/// Takes a GPM sample of `d`, returning it with the scenario times bracketing the call.
fn gpm_sample_at<'n>(
    s: &Scenario,
    d: &nvml_wrapper::Device<'n>,
) -> (nvml_wrapper::GpmSample<'n>, u64, u64) {
    let before = s.now_ms();
    let sample = d.gpm_sample().expect("gpm sample");
    (sample, before, s.now_ms())
}

#[test]
fn gpm_metrics_are_the_exact_average_between_two_samples() {
    use nvml_wrapper::enums::gpm::GpmMetricId;
    use nvml_wrapper::gpm::gpm_metrics_get;
    let s = scenario(vec![
        Gpu {
            sm_active: Some(vec![[0, 30], [500, 90]]),
            tensor_active: vec![[0, 10], [500, 40]],
            gpm_fail: vec![[900, 1100]],
            ..Gpu::default()
        },
        Gpu::pre_hopper(60),
        // Without an SM script, SM activity follows utilization; tensor stays 0.
        Gpu::at_util(70),
    ]);
    let fake = FakeLib::new("gpm", &s);
    let nvml = fake.init().unwrap();
    let d = nvml.device_by_index(0).unwrap();
    let old = nvml.device_by_index(1).unwrap();
    let plain = nvml.device_by_index(2).unwrap();
    assert!(d.gpm_support().unwrap());
    assert!(!old.gpm_support().unwrap());
    assert!(matches!(old.gpm_sample(), Err(NvmlError::NotSupported)));
    assert_eq!(fake.gpm_samples_live(), 0, "a failed get frees its sample");

    let (first, a1, b1) = gpm_sample_at(&s, &d);
    let (plain1, _, _) = gpm_sample_at(&s, &plain);
    fake.sleep_until(b1 + 150);
    // Closer than 100 ms on the fake's clock is refused... but 150 ms is fine.
    let (close, _, _) = gpm_sample_at(&s, &d);
    fake.sleep_until(700);
    let (second, a2, b2) = gpm_sample_at(&s, &d);
    let (plain2, _, _) = gpm_sample_at(&s, &plain);
    let ids = [
        GpmMetricId::SmUtil,
        GpmMetricId::AnyTensorUtil,
        GpmMetricId::DramBwUtil,
    ];
    let got = gpm_metrics_get(&nvml, &first, &second, &ids).unwrap();
    // The value is the script's average over [t1, t2) for some t1 in [a1, b1] and t2
    // in [a2, b2]: monotonic in each, so it lies between the corners' averages.
    let within = |value: f64, sm: bool| {
        let corners = [(a1, a2), (a1, b2), (b1, a2), (b1, b2)].map(|(t1, t2)| {
            if sm {
                s.gpm_averages(0, t1, t2).0
            } else {
                s.gpm_averages(0, t1, t2).1
            }
        });
        let lo = corners.iter().copied().fold(f64::MAX, f64::min);
        let hi = corners.iter().copied().fold(f64::MIN, f64::max);
        assert!(
            lo - 1e-9 <= value && value <= hi + 1e-9,
            "{value} outside [{lo}, {hi}]"
        );
    };
    let sm = got[0].as_ref().unwrap();
    assert_eq!(sm.metric_id, GpmMetricId::SmUtil);
    assert_eq!(sm.metric_info.unit, "%");
    within(sm.value, true);
    within(got[1].as_ref().unwrap().value, false);
    assert!(30.0 < sm.value && sm.value < 90.0, "{}", sm.value);
    assert!(matches!(got[2], Err(NvmlError::NotSupported)));
    let plain_got = gpm_metrics_get(&nvml, &plain1, &plain2, &ids[..2]).unwrap();
    assert!((plain_got[0].as_ref().unwrap().value - 70.0).abs() < 1e-9);
    assert_eq!(plain_got[1].as_ref().unwrap().value, 0.0);

    // Refused: reversed, too close, or samples of two GPUs.
    let refused = |r: Result<Vec<_>, NvmlError>| matches!(r, Err(NvmlError::InvalidArg));
    assert!(refused(gpm_metrics_get(&nvml, &second, &first, &ids[..1])));
    let (third, _, _) = gpm_sample_at(&s, &d);
    assert!(refused(gpm_metrics_get(&nvml, &second, &third, &ids[..1])));
    assert!(refused(gpm_metrics_get(&nvml, &first, &plain2, &ids[..1])));
    assert!(gpm_metrics_get(&nvml, &first, &close, &ids[..1]).is_ok());

    // A scripted failure window.
    fake.sleep_until(950);
    assert!(matches!(d.gpm_sample(), Err(NvmlError::Unknown)));
    fake.sleep_until(1100);
    let (after, _, _) = gpm_sample_at(&s, &d);
    assert_eq!(fake.gpm_samples_live(), 7);
    // Freed explicitly or on drop, every sample goes.
    after.free().unwrap();
    drop((first, second, third, close, plain1, plain2));
    assert_eq!(fake.gpm_samples_live(), 0);
}
