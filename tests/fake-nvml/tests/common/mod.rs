//! Loads a private copy of the fake library per test.
//!
//! All `Nvml` instances on one copy share its global state, and the
//! scenario env var is per process, so each test copies the built `.so` to a
//! unique path (a separate `dlopen` image) and points it at its scenario
//! through the `fake_nvml_set_scenario_path` hook.

#![allow(dead_code)] // Each test binary uses a different part.

use nvidia_ml::scenario::Scenario;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;
use std::ffi::{c_char, c_uint, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// `target/<profile>/` of this test binary (it lives in `deps/` below it).
fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug"))
}

/// The built `lib<name>.so`: cargo's own output in `deps/` first, since the
/// copy it uplifts to `target/<profile>/` is not restored when deleted.
pub fn built_lib(name: &str) -> PathBuf {
    let file = format!("lib{name}.so");
    let dir = target_dir();
    let in_deps = dir.join("deps").join(&file);
    if in_deps.exists() {
        in_deps
    } else {
        dir.join(file)
    }
}

/// A private copy of a fake library, pointed at one scenario.
pub struct FakeLib {
    /// Keeps the copy loaded (and its state alive) between `Nvml` instances.
    lib: libloading::Library,
    pub so: PathBuf,
    pub scenario: Scenario,
    scenario_path: PathBuf,
}

impl FakeLib {
    /// Loads `libnvidia_ml.so` with `scenario`.
    pub fn new(tag: &str, scenario: &Scenario) -> Self {
        Self::of("nvidia_ml", tag, scenario)
    }

    /// Loads `lib<name>.so` with `scenario`.
    pub fn of(name: &str, tag: &str, scenario: &Scenario) -> Self {
        let mut fake = Self::load(name, tag, scenario.clone());
        let path = scenario.write_temp(tag).expect("write scenario");
        fake.point_at(path);
        fake
    }

    /// Loads `lib<name>.so` with the scenario file at `path` as is.
    pub fn with_file(name: &str, tag: &str, scenario: Scenario, path: PathBuf) -> Self {
        let mut fake = Self::load(name, tag, scenario);
        fake.point_at(path);
        fake
    }

    /// Loads `libnvidia_ml.so` as the environment configures it (no hook
    /// call); `scenario` is only what the test expects.
    pub fn unscripted(tag: &str, scenario: Scenario) -> Self {
        Self::load("nvidia_ml", tag, scenario)
    }

    /// Loads a private copy of `lib<name>.so`.
    fn load(name: &str, tag: &str, scenario: Scenario) -> Self {
        static COPIES: AtomicU32 = AtomicU32::new(0);
        let built = built_lib(name);
        let so = std::env::temp_dir().join(format!(
            "fake-nvml-{tag}-{}-{}.so",
            std::process::id(),
            COPIES.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::copy(&built, &so)
            .unwrap_or_else(|e| panic!("copy {} (build it first): {e}", built.display()));
        let lib = unsafe { libloading::Library::new(&so) }.expect("dlopen fake");
        Self {
            lib,
            so,
            scenario,
            scenario_path: PathBuf::new(),
        }
    }

    /// Makes the copy read its scenario from `path` (which it then owns).
    fn point_at(&mut self, path: PathBuf) {
        let c_path = CString::new(path.to_string_lossy().as_bytes()).expect("path");
        self.scenario_path = path;
        let code = unsafe {
            let hook = self
                .lib
                .get::<unsafe extern "C" fn(*const c_char) -> c_uint>(
                    b"fake_nvml_set_scenario_path\0",
                )
                .expect("hook symbol");
            hook(c_path.as_ptr())
        };
        assert_eq!(code, 0, "fake_nvml_set_scenario_path");
    }

    /// `nvmlInit_v2` through nvml-wrapper.
    pub fn init(&self) -> Result<Nvml, NvmlError> {
        Nvml::builder().lib_path(self.so.as_os_str()).init()
    }

    /// GPM samples allocated on this copy and not freed (a test hook of the fake).
    pub fn gpm_samples_live(&self) -> u32 {
        unsafe {
            let hook = self
                .lib
                .get::<unsafe extern "C" fn() -> c_uint>(b"fake_nvml_gpm_samples_live\0")
                .expect("hook symbol");
            hook()
        }
    }

    /// Sleeps until `t_ms` on the scenario's timeline.
    pub fn sleep_until(&self, t_ms: u64) {
        let now = self.scenario.now_ms();
        if t_ms > now {
            std::thread::sleep(Duration::from_millis(t_ms - now));
        }
    }
}

impl Drop for FakeLib {
    fn drop(&mut self) {
        // The mappings outlive the files; nothing is left in the temp dir.
        let _ = std::fs::remove_file(&self.so);
        if !self.scenario_path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.scenario_path);
        }
    }
}
