//! The owners of GPU processes: each PID NVML reports is mapped, through its cgroup and
//! user under `--path.procfs`, to a Slurm job, a Kubernetes pod, a container, a systemd
//! unit or a user ([`crate::owner::Owner`]).
//!
//! Only the PIDs NVML returns are read, and only their `cgroup` and `status` files (of
//! `status`, only the `Uid:` line is used): no command lines, no environment. Besides
//! those, `<rootfs>/etc/passwd` names users and `<slurm-account-dir>/<job id>` gives a
//! Slurm job's account. Nothing here fails a poll: a process that cannot be read (it
//! ended, or the agent cannot see it) is [`OwnerKind::Unknown`], an unknown cgroup layout
//! falls back to the user.
//!
//! The derivation from a cgroup file is pure ([`owner_from_cgroup`]); [`Owners`] does the
//! reading and caches per PID, so a process is read once, when NVML first reports it.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::agent::kubelet::{OnGpu, PodName, PodNames};
use crate::owner::{Owner, OwnerKind};

/// Where owners are read from (the agent's `--path.*` and `--owners.*` flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnersConfig {
    pub procfs: PathBuf,
    pub rootfs: PathBuf,
    pub slurm_account_dir: Option<PathBuf>,
    /// The kubelet's pod-resources socket, for pods' namespace and name (joined by GPU
    /// UUID: [`crate::agent::kubelet`], [`Owners::owner_on`]).
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

/// The longest label value taken from a cgroup path, `/etc/passwd` or an account file
/// (longer ones are cut on a character boundary): owners are labels, and a label's size
/// is the agent's to bound.
pub const MAX_VALUE_CHARS: usize = 128;

/// The most bytes read from a Slurm account file (only its first line is used).
const MAX_ACCOUNT_FILE_BYTES: u64 = 4096;

/// The owner of a process with cgroup file `cgroup_file` (the text of `/proc/PID/cgroup`)
/// and user `user` (its name, or its numeric uid), most specific first:
///
/// 1. a Slurm job: a path component `job_<digits>` (`/slurm/uid_1000/job_123/step_0/task_0`
///    on cgroup v1, `/system.slice/slurmstepd.scope/job_123/step_0/user/task_0` on v2);
///    the id is the job id;
/// 2. a Kubernetes pod: a path through `kubepods` with a pod component, `pod<uid>` (cgroupfs
///    driver) or `kubepods[-<qos>]-pod<uid_with_underscores>.slice` (systemd driver); the
///    id is the pod UID, lower case, with dashes;
/// 3. a container outside Kubernetes: a component of 64 hex digits (`/docker/<id>`,
///    containerd's `/<namespace>/<id>`), `<runtime>-<id>` with a 64-hex-digit id (podman's
///    cgroupfs `/libpod_parent/libpod-<id>`) or a scope `<runtime>-<id>.scope` whose id has
///    at least 32 hex digits (`docker-`, `cri-containerd-`, `libpod-` for podman, `crio-`,
///    `nerdctl-`); the id is the container id's first 12 hex digits;
/// 4. a system service: the deepest `<name>.service` component outside `user.slice` (a
///    user's own services, `user@1000.service` and everything under it, are the user's);
///    the id is the unit name;
/// 5. the user: everything else (a login shell's `session-3.scope`, an unknown layout);
///    the id is `user` (`unknown` if empty).
///
/// Every line is looked at: on a hybrid (v1 + v2) host the `0::` line often shows only
/// where systemd put the process (`/system.slice/slurmd.service`) while the v1
/// controllers show the job. The most specific owner any line gives wins; between lines
/// that give the same kind, the v2 line, then `memory`, `cpu,cpuacct`, `pids`,
/// `name=systemd`, then the rest in file order. Never fails, never panics; every field of
/// the result is free of control characters and at most [`MAX_VALUE_CHARS`] long.
/// `account`, `namespace` and `pod` are left empty (they are not in the cgroup).
pub fn owner_from_cgroup(cgroup_file: &str, user: &str) -> Owner {
    let user = clean(user);
    let user = if user.is_empty() {
        "unknown".to_string()
    } else {
        user
    };
    let mut lines: Vec<(u8, &str)> = cgroup_file
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (hier, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            Some((line_rank(hier, controllers), path))
        })
        .collect();
    lines.sort_by_key(|(rank, _)| *rank);
    let best = lines
        .iter()
        .filter_map(|(_, path)| from_path(path))
        .min_by_key(|(kind, _)| *kind);
    match best {
        Some((kind, id)) => Owner {
            kind,
            qos: if kind == OwnerKind::K8sPod {
                lines
                    .iter()
                    .find_map(|(_, path)| pod_qos(path))
                    .unwrap_or_default()
                    .to_string()
            } else {
                String::new()
            },
            id,
            user,
            ..Owner::default()
        },
        None => Owner {
            kind: OwnerKind::User,
            id: user.clone(),
            user,
            ..Owner::default()
        },
    }
}

/// The order in which lines are preferred for owners of the same kind (lower first).
fn line_rank(hier: &str, controllers: &str) -> u8 {
    if hier == "0" && controllers.is_empty() {
        return 0;
    }
    let has = |c: &str| controllers.split(',').any(|x| x == c);
    if has("memory") {
        1
    } else if has("cpu") || has("cpuacct") {
        2
    } else if has("pids") {
        3
    } else if has("name=systemd") {
        4
    } else {
        5
    }
}

/// What one cgroup path says about its owner; `None` when it names only a user's session
/// or nothing known.
fn from_path(path: &str) -> Option<(OwnerKind, String)> {
    let comps: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != "." && *c != "..")
        .collect();
    if let Some(job) = comps.iter().find_map(|c| slurm_job(c)) {
        return Some((OwnerKind::SlurmJob, job));
    }
    if let Some(k) = comps.iter().position(|c| c.starts_with("kubepods")) {
        if let Some(uid) = comps[k..].iter().find_map(|c| pod_uid(c)) {
            return Some((OwnerKind::K8sPod, uid));
        }
    }
    if let Some(id) = comps.iter().find_map(|c| container_id(c)) {
        return Some((OwnerKind::Container, id));
    }
    if comps
        .iter()
        .any(|c| *c == "user.slice" || c.starts_with("user@"))
    {
        return None;
    }
    comps
        .iter()
        .rev()
        .find(|c| c.len() > ".service".len() && c.ends_with(".service") && !has_control(c))
        .map(|c| (OwnerKind::SystemdUnit, clean(c)))
}

/// A pod's QoS class from a kubepods path: its `burstable` or `besteffort` level
/// (`/kubepods/burstable/pod…`, `kubepods-besteffort.slice`); a pod directly under
/// `kubepods` is `guaranteed`. `None` for a path outside kubepods or without a pod.
fn pod_qos(path: &str) -> Option<&'static str> {
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let k = comps.iter().position(|c| c.starts_with("kubepods"))?;
    let pod = k + comps[k..].iter().position(|c| pod_uid(c).is_some())?;
    let levels = comps[k..=pod].join("/");
    Some(if levels.contains("besteffort") {
        "besteffort"
    } else if levels.contains("burstable") {
        "burstable"
    } else {
        "guaranteed"
    })
}

/// `job_<digits>` → the job id.
fn slurm_job(c: &str) -> Option<String> {
    let id = c.strip_prefix("job_")?;
    (!id.is_empty() && id.len() <= 20 && id.bytes().all(|b| b.is_ascii_digit()))
        .then(|| id.to_string())
}

/// `pod<uid>` (cgroupfs driver) or `…-pod<uid_with_underscores>.slice` (systemd driver)
/// → the UID, lower case with dashes. Static pods' UIDs are 32 hex digits, others
/// 36-character UUIDs.
fn pod_uid(c: &str) -> Option<String> {
    let c = c.strip_suffix(".slice").unwrap_or(c);
    let uid = match c.strip_prefix("pod") {
        Some(rest) => rest,
        None => &c[c.rfind("-pod")? + "-pod".len()..],
    };
    let hex = uid.bytes().filter(u8::is_ascii_hexdigit).count();
    let ok = (32..=64).contains(&uid.len())
        && uid
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'-' || b == b'_')
        && hex >= 32;
    ok.then(|| uid.replace('_', "-").to_ascii_lowercase())
}

/// A container's cgroup component → its id's first 12 hex digits.
fn container_id(c: &str) -> Option<String> {
    let id = if c.len() == 64 {
        c
    } else {
        let (name, min) = match c.strip_suffix(".scope") {
            Some(scope) => (scope, 32),
            None => (c, 64),
        };
        let id = &name[name.rfind('-')? + 1..];
        if id.len() < min {
            return None;
        }
        id
    };
    id.bytes()
        .all(|b| b.is_ascii_hexdigit())
        .then(|| id[..12].to_ascii_lowercase())
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// `s` as a label value: control characters replaced by `?`, cut to [`MAX_VALUE_CHARS`].
pub(crate) fn clean(s: &str) -> String {
    s.chars()
        .take(MAX_VALUE_CHARS)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The real uid (the first field of the `Uid:` line) of a `/proc/PID/status` text.
pub fn real_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The user names of an `/etc/passwd` text by uid (the first line of a uid wins, as in
/// `getpwuid`). Names that are empty or hold control characters are left out (the uid
/// is then shown as a number).
pub fn parse_passwd(text: &str) -> HashMap<u32, String> {
    let mut names = HashMap::new();
    for line in text.lines() {
        let mut f = line.split(':');
        let (Some(name), Some(_pw), Some(uid)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let Ok(uid) = uid.trim().parse::<u32>() else {
            continue;
        };
        if name.is_empty() || name.starts_with('#') || name.starts_with('+') || has_control(name) {
            continue;
        }
        names
            .entry(uid)
            .or_insert_with(|| name.chars().take(MAX_VALUE_CHARS).collect());
    }
    names
}

/// A Slurm account file's account: its first line, trimmed, cleaned and bounded.
pub fn parse_account(text: &str) -> String {
    clean(text.lines().next().unwrap_or("").trim())
}

/// The user names of `<rootfs>/etc/passwd`, re-read when the file's modification time or
/// size changes (looked at at most once per round).
#[derive(Debug, Default)]
struct Passwd {
    names: HashMap<u32, String>,
    /// Modification time and size of the file as last read; `None` when it was missing.
    stamp: Option<(SystemTime, u64)>,
    checked_this_round: bool,
    warned: bool,
}

impl Passwd {
    fn name(&mut self, rootfs: &Path, uid: u32) -> String {
        if !self.checked_this_round {
            self.checked_this_round = true;
            self.refresh(&rootfs.join("etc/passwd"));
        }
        self.names
            .get(&uid)
            .cloned()
            .unwrap_or_else(|| uid.to_string())
    }

    fn refresh(&mut self, path: &Path) {
        let stamp = std::fs::metadata(path)
            .ok()
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
        if stamp.is_some() && stamp == self.stamp {
            return;
        }
        match std::fs::read(path) {
            Ok(bytes) => {
                self.names = parse_passwd(&String::from_utf8_lossy(&bytes));
                self.stamp = stamp;
                if self.warned {
                    self.warned = false;
                    tracing::info!(path = %path.display(), users = self.names.len(), "user names readable again");
                }
            }
            Err(e) => {
                self.names.clear();
                self.stamp = None;
                if !self.warned {
                    self.warned = true;
                    tracing::warn!(path = %path.display(), error = %e, "cannot read user names; owners show numeric uids");
                }
            }
        }
    }
}

/// Maps PIDs to owners, caching each PID's owner while it keeps appearing.
#[derive(Debug)]
pub struct Owners {
    config: OwnersConfig,
    cache: HashMap<u32, Owner>,
    passwd: Passwd,
    /// Slurm accounts by job id (empty: no account file when the job was first seen), so
    /// that every process of a job has the same owner.
    accounts: HashMap<String, String>,
    /// Pods' names from the kubelet, when its socket is read ([`Owners::with_pods`]).
    pods: Option<Arc<PodNames>>,
    /// Per pod UID seen: what is known of its name.
    pod_names: HashMap<String, PodSeen>,
}

/// A pod UID's name as far as the kubelet's maps told.
#[derive(Debug)]
struct PodSeen {
    /// Requests to the kubelet started before the pod was first seen: only a map answering
    /// a later request may name it (an older one may still list the GPU's previous pod).
    first: u64,
    name: Option<PodName>,
}

impl Owners {
    pub fn new(config: OwnersConfig) -> Self {
        Self {
            config,
            cache: HashMap::new(),
            passwd: Passwd::default(),
            accounts: HashMap::new(),
            pods: None,
            pod_names: HashMap::new(),
        }
    }

    /// Names pods from `pods` (kept up to date off the sampling thread by
    /// [`crate::agent::kubelet::refresh_loop`]).
    pub fn with_pods(mut self, pods: Arc<PodNames>) -> Self {
        self.pods = Some(pods);
        self
    }

    /// The owner of `pid`, a process on GPU `uuid`: [`Self::owner_of`], with a pod's
    /// `namespace` and `pod` from the kubelet where exactly one pod lists the GPU in a map
    /// asked for after the pod was first seen. Once named, a pod UID keeps its name while
    /// any of its processes is seen; a GPU several pods list names nobody. Never blocks:
    /// a pod not named yet asks the refresher for a new map, once.
    pub fn owner_on(&mut self, pid: u32, uuid: &str) -> Owner {
        let mut owner = self.owner_of(pid);
        if owner.kind != OwnerKind::K8sPod {
            return owner;
        }
        let Some(pods) = &self.pods else {
            return owner;
        };
        let seen = self.pod_names.entry(owner.id.clone()).or_insert_with(|| {
            pods.want_refresh();
            PodSeen {
                first: pods.started(),
                name: None,
            }
        });
        if seen.name.is_none() {
            if let (seq, OnGpu::Pod(name)) = pods.on_gpu(uuid) {
                if seq > seen.first {
                    seen.name = Some(name);
                }
            }
        }
        if let Some(name) = &seen.name {
            owner.namespace.clone_from(&name.namespace);
            owner.pod.clone_from(&name.pod);
        }
        owner
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
    /// so a reused PID is read afresh, and the accounts of jobs none of them belongs to
    /// (a job seen again later has its account file read again).
    pub fn retain(&mut self, live: &HashSet<u32>) {
        let before = self.cache.len();
        self.cache.retain(|pid, _| live.contains(pid));
        self.passwd.checked_this_round = false;
        // Only a PID's departure can leave a job without processes.
        if self.cache.len() != before && !self.accounts.is_empty() {
            let jobs: HashSet<&str> = self
                .cache
                .values()
                .filter(|o| o.kind == OwnerKind::SlurmJob)
                .map(|o| o.id.as_str())
                .collect();
            self.accounts.retain(|job, _| jobs.contains(job.as_str()));
        }
        if self.cache.len() != before && !self.pod_names.is_empty() {
            let pods: HashSet<&str> = self
                .cache
                .values()
                .filter(|o| o.kind == OwnerKind::K8sPod)
                .map(|o| o.id.as_str())
                .collect();
            self.pod_names.retain(|uid, _| pods.contains(uid.as_str()));
        }
    }

    fn read(&mut self, pid: u32) -> Owner {
        let dir = self.config.procfs.join(pid.to_string());
        let read = |name: &str| {
            std::fs::read(dir.join(name))
                .ok()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
        };
        let (Some(cgroup), Some(uid)) = (read("cgroup"), read("status").and_then(|s| real_uid(&s)))
        else {
            tracing::debug!(
                pid,
                "cannot read the process's cgroup or uid; owner unknown"
            );
            return Owner {
                kind: OwnerKind::Unknown,
                id: "unknown".into(),
                ..Owner::default()
            };
        };
        let user = self.passwd.name(&self.config.rootfs, uid);
        let mut owner = owner_from_cgroup(&cgroup, &user);
        if owner.kind == OwnerKind::SlurmJob {
            owner.account = self.account(&owner.id);
        }
        owner
    }

    /// The account of Slurm job `job` (digits only, so a safe file name), read once per job.
    fn account(&mut self, job: &str) -> String {
        let Some(dir) = &self.config.slurm_account_dir else {
            return String::new();
        };
        if let Some(a) = self.accounts.get(job) {
            return a.clone();
        }
        let mut bytes = Vec::new();
        let account = match std::fs::File::open(dir.join(job))
            .and_then(|f| f.take(MAX_ACCOUNT_FILE_BYTES).read_to_end(&mut bytes))
        {
            Ok(_) => parse_account(&String::from_utf8_lossy(&bytes)),
            Err(_) => String::new(),
        };
        self.accounts.insert(job.to_string(), account.clone());
        account
    }
}

#[cfg(test)]
mod tests;
