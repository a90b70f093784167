//! The process's allocator, chosen by role. The aggregator allocates and frees short-lived
//! buffers for every scrape (at 125,000 agents, ~8,000 a second): with glibc's malloc that
//! was about a sixth of its CPU, and freed memory stayed in per-thread arenas; mimalloc
//! takes less of both. The agent is small and long-lived on every GPU host, where
//! mimalloc's per-thread pages cost it RSS: it keeps the system allocator (figures in the
//! README's Benchmarks).
//!
//! The choice is made once, before the first allocation, and never changes: every block is
//! freed by the allocator that made it without asking which one that was. On glibc Linux a
//! constructor reads the subcommand from `argv` before `main` (and before Rust's runtime
//! allocates); anywhere else, or if something allocates first, it is the system allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, Ordering};

use mimalloc::MiMalloc;

/// Install in the binary: `#[global_allocator] static A: RoleAllocator = RoleAllocator;`.
pub struct RoleAllocator;

const UNDECIDED: u8 = 0;
const SYSTEM: u8 = 1;
const MIMALLOC: u8 = 2;

static CHOICE: AtomicU8 = AtomicU8::new(UNDECIDED);

/// The subcommands that run with mimalloc: the aggregator, and the demo (which is one).
const MIMALLOC_ROLES: [&[u8]; 2] = [b"aggregator", b"demo"];

/// The subcommand in a command line (without the program name): the first argument that is
/// neither an option nor the value of one. Options before the subcommand are the global
/// ones, which all take a value (`--log.level debug` or `--log.level=debug`).
fn subcommand<'a>(args: impl IntoIterator<Item = &'a [u8]>) -> Option<&'a [u8]> {
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg.starts_with(b"-") {
            if !arg.contains(&b'=') {
                args.next();
            }
            continue;
        }
        return Some(arg);
    }
    None
}

/// Whether a command line runs a role that wants mimalloc.
fn wants_mimalloc<'a>(args: impl IntoIterator<Item = &'a [u8]>) -> bool {
    subcommand(args).is_some_and(|s| MIMALLOC_ROLES.contains(&s))
}

/// Which allocator this process uses; the first caller decides (the system allocator unless
/// the constructor chose mimalloc before).
fn choice() -> u8 {
    match CHOICE.load(Ordering::Acquire) {
        UNDECIDED => {
            match CHOICE.compare_exchange(UNDECIDED, SYSTEM, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => SYSTEM,
                Err(decided) => decided,
            }
        }
        decided => decided,
    }
}

/// Runs before `main` (glibc passes `argc`, `argv` and `envp` to `.init_array` functions, as
/// Rust's own runtime relies on) and chooses mimalloc for the aggregator roles, unless an
/// allocation already happened.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[used]
#[unsafe(link_section = ".init_array")]
static CHOOSE_BY_ROLE: extern "C" fn(
    std::os::raw::c_int,
    *const *const std::os::raw::c_char,
    *const *const std::os::raw::c_char,
) = {
    extern "C" fn choose(
        argc: std::os::raw::c_int,
        argv: *const *const std::os::raw::c_char,
        _envp: *const *const std::os::raw::c_char,
    ) {
        if argv.is_null() || argc < 1 {
            return;
        }
        let args = (1..argc as usize).filter_map(|i| {
            // SAFETY: glibc hands the process's argv: `argc` valid C strings.
            let p = unsafe { *argv.add(i) };
            (!p.is_null()).then(|| unsafe { std::ffi::CStr::from_ptr(p) }.to_bytes())
        });
        if wants_mimalloc(args) {
            // Fails, harmlessly, if something allocated already: the choice stands.
            let _ =
                CHOICE.compare_exchange(UNDECIDED, MIMALLOC, Ordering::AcqRel, Ordering::Acquire);
        }
    }
    choose
};

/// Whether this process allocates with mimalloc (logged at start).
pub fn using_mimalloc() -> bool {
    CHOICE.load(Ordering::Acquire) == MIMALLOC
}

// SAFETY: the choice is fixed before the first block is allocated (an allocation of an
// undecided process fixes it), so every block is freed and resized by the allocator that
// allocated it.
unsafe impl GlobalAlloc for RoleAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if choice() == MIMALLOC {
            unsafe { MiMalloc.alloc(layout) }
        } else {
            unsafe { System.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if choice() == MIMALLOC {
            unsafe { MiMalloc.alloc_zeroed(layout) }
        } else {
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if choice() == MIMALLOC {
            unsafe { MiMalloc.dealloc(ptr, layout) }
        } else {
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if choice() == MIMALLOC {
            unsafe { MiMalloc.realloc(ptr, layout, new_size) }
        } else {
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wants(line: &str) -> bool {
        wants_mimalloc(line.split_whitespace().map(str::as_bytes))
    }

    /// The constructor cannot ask clap (it runs before anything may allocate), so it keeps
    /// its own copy of two facts about the command line; this holds them to `Cli`.
    #[test]
    fn the_roles_and_global_options_are_those_of_the_cli() {
        use clap::CommandFactory;
        let cli = crate::cli::Cli::command();
        for role in MIMALLOC_ROLES {
            let name = std::str::from_utf8(role).unwrap();
            assert!(cli.find_subcommand(name).is_some(), "no subcommand {name}");
        }
        let globals: Vec<_> = cli.get_arguments().filter(|a| a.is_global_set()).collect();
        assert!(!globals.is_empty(), "Cli has global options (--log.level)");
        for arg in globals {
            assert!(
                arg.get_action().takes_values(),
                "global option {:?} takes no value: subcommand() would skip the next argument",
                arg.get_id()
            );
        }
    }

    #[test]
    fn the_aggregator_roles_choose_mimalloc_and_the_rest_do_not() {
        assert!(wants("aggregator --config.file a.toml"));
        assert!(wants("demo"));
        assert!(wants("--log.level debug aggregator"));
        assert!(wants("--log.level=debug --log.format json demo"));
        assert!(!wants("agent --config.file aggregator"));
        assert!(!wants("--log.level aggregator agent"));
        assert!(!wants("statement --contract demo"));
        assert!(!wants("ledger backup"));
        assert!(!wants(""));
        assert!(!wants("--help"));
    }
}
