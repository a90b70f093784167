//! Who holds a GPU: the owner of a compute process, as the agent derives it from the
//! process's cgroup and user, exports it, and the aggregator maps it to a team.
//!
//! One owner of the concept for both roles: the agent writes these label names and values
//! (`commitmeter_gpu_owner_info`, `commitmeter_owner_*_seconds_total`), the aggregator reads
//! them back with the same names, and `[[teams]]` rules match on the same fields.

use std::fmt;

/// What kind of thing holds the GPU, most specific first: a process in a Slurm job's
/// cgroup is the job's, whatever its user.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OwnerKind {
    /// A Slurm job (`…/job_<id>/…`); `owner` is the job id.
    SlurmJob,
    /// A Kubernetes pod (`kubepods…pod<uid>…`); `owner` is the pod UID, and `namespace`
    /// and `pod` are filled in where the kubelet's pod-resources socket names the pod
    /// holding the GPU.
    K8sPod,
    /// A container outside Kubernetes (docker, containerd, podman scopes); `owner` is the
    /// container id's first 12 hex digits.
    Container,
    /// A systemd unit other than a user session (`….service`); `owner` is the unit name.
    SystemdUnit,
    /// Anything else with a known user (a login shell, an unknown layout); `owner` is the
    /// user name.
    User,
    /// The process could not be read (it ended, or the agent cannot see it).
    #[default]
    Unknown,
}

impl OwnerKind {
    pub const ALL: [OwnerKind; 6] = [
        OwnerKind::SlurmJob,
        OwnerKind::K8sPod,
        OwnerKind::Container,
        OwnerKind::SystemdUnit,
        OwnerKind::User,
        OwnerKind::Unknown,
    ];

    /// The `owner_kind` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            OwnerKind::SlurmJob => "slurm_job",
            OwnerKind::K8sPod => "k8s_pod",
            OwnerKind::Container => "container",
            OwnerKind::SystemdUnit => "systemd_unit",
            OwnerKind::User => "user",
            OwnerKind::Unknown => "unknown",
        }
    }

    /// The kind of an `owner_kind` label value; `None` for a value this build does not
    /// know (a newer agent), which the aggregator treats as [`OwnerKind::Unknown`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for OwnerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An owner as exported: every field is a label. Empty strings are unknown values (a
/// Slurm account nobody wrote down, a pod whose namespace the kubelet did not say).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Owner {
    pub kind: OwnerKind,
    /// The owner's id within its kind (see [`OwnerKind`]).
    pub id: String,
    /// The process's user name (numeric uid when the name cannot be resolved).
    pub user: String,
    /// Slurm account, where it can be read without running Slurm's commands.
    pub account: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Kubernetes pod name.
    pub pod: String,
    /// Kubernetes QoS class from the kubepods path: `guaranteed`, `burstable` or
    /// `besteffort` (what the kubelet evicts first under pressure).
    pub qos: String,
}

/// The owner label names, in the order of [`Owner::label_values`]. Series that carry an
/// owner have the GPU's `gpu` and `uuid` first, then these.
pub const OWNER_LABELS: [&str; 7] = [
    "owner_kind",
    "owner",
    "user",
    "account",
    "namespace",
    "pod",
    "qos",
];

impl Owner {
    /// The values of [`OWNER_LABELS`], in order.
    pub fn label_values(&self) -> [&str; 7] {
        [
            self.kind.as_str(),
            &self.id,
            &self.user,
            &self.account,
            &self.namespace,
            &self.pod,
            &self.qos,
        ]
    }

    /// The owner's identity on a GPU, for diffing its counters between readings: every
    /// label, joined by a separator no label value contains (the parser refuses control
    /// characters in label values).
    pub fn key(&self) -> String {
        self.label_values().join("\u{1f}")
    }

    /// The owner of these label values (by name, any order); missing labels are empty,
    /// an unknown `owner_kind` is [`OwnerKind::Unknown`].
    pub fn from_labels<'a>(mut get: impl FnMut(&str) -> Option<&'a str>) -> Self {
        let mut v = OWNER_LABELS.map(|n| get(n).unwrap_or_default().to_string());
        Owner {
            kind: OwnerKind::parse(&v[0]).unwrap_or_default(),
            id: std::mem::take(&mut v[1]),
            user: std::mem::take(&mut v[2]),
            account: std::mem::take(&mut v[3]),
            namespace: std::mem::take(&mut v[4]),
            pod: std::mem::take(&mut v[5]),
            qos: std::mem::take(&mut v[6]),
        }
    }
}

/// Series the agent exports per GPU and owner (labels `gpu`, `uuid`, then [`OWNER_LABELS`]).
pub mod series {
    /// 1 for each owner holding the GPU as of the last round.
    pub const INFO: &str = "commitmeter_gpu_owner_info";
    /// Allocated seconds of the GPU attributed to the owner (shared equally among the
    /// owners holding it in a round), so they sum over owners to the GPU's allocated.
    pub const ALLOCATED: &str = "commitmeter_owner_allocated_seconds_total";
    /// The owner's share of the GPU's allocated busy seconds.
    pub const BUSY: &str = "commitmeter_owner_busy_seconds_total";
    /// The owner's share of the GPU's allocated SM-active seconds (GPUs with GPM only).
    pub const SM_ACTIVE: &str = "commitmeter_owner_sm_active_seconds_total";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip() {
        let o = Owner {
            kind: OwnerKind::K8sPod,
            id: "ml/train-0".into(),
            user: "1000".into(),
            account: String::new(),
            namespace: "ml".into(),
            pod: "train-0".into(),
            qos: "burstable".into(),
        };
        let pairs: Vec<(&str, &str)> = OWNER_LABELS.into_iter().zip(o.label_values()).collect();
        let back = Owner::from_labels(|n| pairs.iter().find(|p| p.0 == n).map(|p| p.1));
        assert_eq!(back, o);
        for k in OwnerKind::ALL {
            assert_eq!(OwnerKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(OwnerKind::parse("other"), None);
    }
}
