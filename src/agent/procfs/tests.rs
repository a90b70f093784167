use super::*;
use proptest::prelude::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn config(slurm_accounts: bool) -> OwnersConfig {
    let f = fixtures();
    OwnersConfig {
        procfs: f.join("procfs"),
        rootfs: f.join("rootfs"),
        slurm_account_dir: slurm_accounts.then(|| f.join("slurm-accounts")),
        ..OwnersConfig::default()
    }
}

fn owner(kind: OwnerKind, id: &str, user: &str, account: &str) -> Owner {
    Owner {
        kind,
        id: id.into(),
        user: user.into(),
        account: account.into(),
        ..Owner::default()
    }
}

/// A pod owner of QoS class `qos` (from its kubepods path).
fn pod(id: &str, user: &str, qos: &str) -> Owner {
    Owner {
        qos: qos.into(),
        ..owner(OwnerKind::K8sPod, id, user, "")
    }
}

/// The table of `tests/fixtures/procfs/README.md`: PID → owner.
fn expected() -> Vec<(u32, Owner)> {
    use OwnerKind::*;
    vec![
        (1001, owner(SlurmJob, "4242", "alice", "physics")),
        (1002, owner(SlurmJob, "4243", "bob", "")),
        (1003, owner(SlurmJob, "4244", "alice", "chem-gpu")),
        (1004, owner(SlurmJob, "4245", "bob", "bio")),
        (
            2001,
            pod("0b7b7c9e-6f3c-4d1e-9a51-2f5c3a6d8e11", "root", "burstable"),
        ),
        (
            2002,
            pod(
                "5e0f3c2a-8b1d-4f6e-a7c9-1d2e3f4a5b6c",
                "alice",
                "guaranteed",
            ),
        ),
        (
            2003,
            pod("c8a2e4f6-1b3d-4e5f-8a9b-0c1d2e3f4a5b", "root", "burstable"),
        ),
        (
            2004,
            pod("1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d", "root", "besteffort"),
        ),
        (
            2005,
            pod(
                "f0e1d2c3-b4a5-4968-8776-655443322110",
                "alice",
                "guaranteed",
            ),
        ),
        (
            2006,
            pod("2c4e6a8b-0d1f-4a3c-9e5b-7d9f1a3c5e70", "root", "besteffort"),
        ),
        (
            2007,
            pod("6d6ddc7f0d5dbbe4c3ac8a1b0b2fa1a9", "root", "burstable"),
        ),
        (3001, owner(Container, "3f4e5b6a7c8d", "alice", "")),
        (3002, owner(Container, "9b1d2c3e4f5a", "root", "")),
        (3003, owner(Container, "e1c0a77d2f9b", "carol", "")),
        (3004, owner(Container, "5d41402abc4b", "root", "")),
        (3005, owner(Container, "7c2f1b3a4d5e", "root", "")),
        (
            4001,
            owner(SystemdUnit, "triton-inference.service", "triton", ""),
        ),
        (
            4002,
            owner(SystemdUnit, "jupyterhub.service", "jupyterhub", ""),
        ),
        (
            4003,
            owner(SystemdUnit, "ollama@gpu0.service", "ollama", ""),
        ),
        (5001, owner(User, "alice", "alice", "")),
        (5002, owner(User, "bob", "bob", "")),
        (5003, owner(User, "carol", "carol", "")),
        (5004, owner(User, "alice", "alice", "")),
        (5005, owner(User, "4242", "4242", "")),
        (5006, owner(User, "alice", "alice", "")),
        (9998, owner(Unknown, "unknown", "", "")),
        (9999, owner(Unknown, "unknown", "", "")),
    ]
}

#[test]
fn every_fixture_process_maps_to_its_owner() {
    let mut owners = Owners::new(config(true));
    for (pid, want) in expected() {
        assert_eq!(owners.owner_of(pid), want, "pid {pid}");
    }
}

#[test]
fn every_fixture_pid_is_in_the_table() {
    let mut listed: Vec<u32> = expected().into_iter().map(|(p, _)| p).collect();
    listed.sort_unstable();
    let mut on_disk: Vec<u32> = std::fs::read_dir(fixtures().join("procfs"))
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.parse().ok())
        .collect();
    on_disk.push(9999); // the missing PID
    on_disk.sort_unstable();
    assert_eq!(listed, on_disk);
    let readme = std::fs::read_to_string(fixtures().join("procfs/README.md")).unwrap();
    for (pid, o) in expected() {
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| {pid} |")))
            .unwrap_or_else(|| panic!("README has no row for {pid}"));
        let cells: Vec<&str> = row.split('|').map(|c| c.trim().trim_matches('`')).collect();
        assert_eq!(
            &cells[2..6],
            &[o.kind.as_str(), &o.id, &o.user, &o.account],
            "README row {pid}"
        );
    }
}

#[test]
fn without_an_account_dir_slurm_accounts_are_empty() {
    let mut owners = Owners::new(config(false));
    assert_eq!(
        owners.owner_of(1001),
        owner(OwnerKind::SlurmJob, "4242", "alice", "")
    );
}

#[test]
fn without_passwd_users_are_numeric_uids() {
    let mut owners = Owners::new(OwnersConfig {
        rootfs: PathBuf::from("/nonexistent-rootfs"),
        ..config(true)
    });
    assert_eq!(
        owners.owner_of(5001),
        owner(OwnerKind::User, "1000", "1000", "")
    );
    assert_eq!(owners.owner_of(2001).user, "0");
}

#[test]
fn owners_are_cached_per_pid_until_retain_drops_them() {
    let dir = tempfile::tempdir().unwrap();
    let proc = dir.path().join("proc");
    let write = |cgroup: &str, uid: u32| {
        std::fs::create_dir_all(proc.join("77")).unwrap();
        std::fs::write(proc.join("77/cgroup"), cgroup).unwrap();
        std::fs::write(
            proc.join("77/status"),
            format!("Name:\tx\nUid:\t{uid}\t0\t0\t0\n"),
        )
        .unwrap();
    };
    write("0::/system.slice/a.service\n", 0);
    let mut owners = Owners::new(OwnersConfig {
        procfs: proc.clone(),
        rootfs: dir.path().join("root"),
        ..OwnersConfig::default()
    });
    assert_eq!(owners.owner_of(77).id, "a.service");
    // The PID is reused by another process: the cache answers while the PID stays live…
    write("0::/system.slice/b.service\n", 0);
    owners.retain(&HashSet::from([77]));
    assert_eq!(owners.owner_of(77).id, "a.service");
    // …and it is read afresh once a round did not report it.
    owners.retain(&HashSet::new());
    assert_eq!(owners.owner_of(77).id, "b.service");
}

#[test]
fn passwd_is_reread_when_it_changes_at_most_once_per_round() {
    let dir = tempfile::tempdir().unwrap();
    let (proc, root) = (dir.path().join("proc"), dir.path().join("root"));
    for pid in [1, 2, 3] {
        std::fs::create_dir_all(proc.join(pid.to_string())).unwrap();
        std::fs::write(proc.join(format!("{pid}/cgroup")), "0::/user.slice\n").unwrap();
        std::fs::write(
            proc.join(format!("{pid}/status")),
            "Uid:\t1000\t1000\t1000\t1000\n",
        )
        .unwrap();
    }
    std::fs::create_dir_all(root.join("etc")).unwrap();
    let passwd = root.join("etc/passwd");
    std::fs::write(&passwd, "ann:x:1000:1000::/home/ann:/bin/sh\n").unwrap();
    let mut owners = Owners::new(OwnersConfig {
        procfs: proc,
        rootfs: root,
        ..OwnersConfig::default()
    });
    assert_eq!(owners.owner_of(1).user, "ann");
    // A different size is a change whatever the file system's mtime granularity.
    std::fs::write(&passwd, "annabel:x:1000:1000::/home/ann:/bin/sh\n").unwrap();
    assert_eq!(owners.owner_of(2).user, "ann", "not re-read within a round");
    owners.retain(&HashSet::from([1, 2]));
    assert_eq!(owners.owner_of(3).user, "annabel");
    assert_eq!(owners.owner_of(1).user, "ann", "cached per PID");
}

#[test]
fn the_kind_is_derived_from_the_most_specific_line_and_prefers_v2_among_equals() {
    // A hybrid host: systemd's unified line says the service, v1 memory says the job.
    let text = "4:memory:/slurm/uid_5/job_9/step_0\n1:name=systemd:/system.slice/slurmd.service\n0::/system.slice/slurmd.service\n";
    assert_eq!(owner_from_cgroup(text, "u").id, "9");
    let text = "4:memory:/system.slice/a.service\n0::/system.slice/b.service\n";
    assert_eq!(owner_from_cgroup(text, "u").id, "b.service");
    let text = "7:pids:/system.slice/p.service\n5:cpu,cpuacct:/system.slice/c.service\n";
    assert_eq!(owner_from_cgroup(text, "u").id, "c.service");
}

#[test]
fn layouts_that_are_not_owners_fall_back_to_the_user() {
    for text in [
        "",
        "garbage",
        "0::/",
        "0::/user.slice/user-1000.slice/user@1000.service/init.scope\n",
        "0::/init.scope\n",
        "0::/kubepods.slice/kubepods-besteffort.slice\n",
        "0::/kubepods/burstable/podnot-a-uid/abc\n",
        "0::/system.slice/session-3.scope\n",
        "0::/system.slice/run-u123.scope\n",
        "0::/system.slice/.service\n",
        "0::/x/job_/y\n",
        "0::/x/job_12a/y\n",
        "0::/system.slice/docker-0123.scope\n",
    ] {
        assert_eq!(
            owner_from_cgroup(text, "dave"),
            owner(OwnerKind::User, "dave", "dave", ""),
            "{text:?}"
        );
    }
    assert_eq!(owner_from_cgroup("0::/\n", "").id, "unknown");
}

#[test]
fn container_layouts() {
    let id = "5d41402abc4b2a76b9719d911017c592a1b2c3d4e5f60718293a4b5c6d7e8f90";
    for path in [
        format!("/libpod_parent/libpod-{id}"),
        format!("/system.slice/crio-{id}.scope"),
        format!("/system.slice/nerdctl-{id}.scope"),
        format!("/actions_job/{id}"),
        format!("/user.slice/user-1000.slice/user@1000.service/user.slice/docker-{id}.scope"),
    ] {
        let o = owner_from_cgroup(&format!("0::{path}\n"), "u");
        assert_eq!(
            o,
            owner(OwnerKind::Container, "5d41402abc4b", "u", ""),
            "{path}"
        );
    }
    // Not 64 hex digits outside a scope: not a container.
    let o = owner_from_cgroup("0::/lab/exp-5d41402abc4b2a76b9719d911017c592\n", "u");
    assert_eq!(o.kind, OwnerKind::User);
}

#[test]
fn a_jobs_account_is_the_same_for_all_its_processes_and_reread_once_it_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (proc, accounts) = (dir.path().join("proc"), dir.path().join("accounts"));
    std::fs::create_dir_all(&accounts).unwrap();
    for pid in [1, 2, 3] {
        std::fs::create_dir_all(proc.join(pid.to_string())).unwrap();
        std::fs::write(
            proc.join(format!("{pid}/cgroup")),
            "0::/system.slice/slurmstepd.scope/job_7/step_0/user/task_0\n",
        )
        .unwrap();
        std::fs::write(proc.join(format!("{pid}/status")), "Uid:\t0\t0\t0\t0\n").unwrap();
    }
    let mut owners = Owners::new(OwnersConfig {
        procfs: proc,
        rootfs: dir.path().join("root"),
        slurm_account_dir: Some(accounts.clone()),
        ..OwnersConfig::default()
    });
    // Seen before the prolog's file exists: no account, and the job's later processes
    // agree while it still has one on a GPU.
    assert_eq!(owners.owner_of(1).account, "");
    std::fs::write(accounts.join("7"), "ml\n").unwrap();
    owners.retain(&HashSet::from([1]));
    assert_eq!(owners.owner_of(2).account, "");
    // Once none of its processes is left, the next one reads the file.
    owners.retain(&HashSet::new());
    assert_eq!(owners.owner_of(3).account, "ml");
}

#[test]
fn a_cgroup_namespace_relative_path_still_names_its_owner() {
    // An agent in its own cgroup namespace sees others' paths relative to its root.
    let text = "0::/../../kubepods.slice/kubepods-pod0b7b7c9e_6f3c_4d1e_9a51_2f5c3a6d8e11.slice/cri-containerd-ab.scope\n";
    assert_eq!(
        owner_from_cgroup(text, "u"),
        pod("0b7b7c9e-6f3c-4d1e-9a51-2f5c3a6d8e11", "u", "guaranteed")
    );
}

#[test]
fn passwd_and_account_parsing() {
    let names = parse_passwd("# comment\n+::::::\nbad line\nroot:x:0:0::/:/bin/sh\nroot2:x:0:0::/:/bin/sh\n:x:5:5::/:\nx\u{7}y:x:6:6::/:\n");
    assert_eq!(names.get(&0).map(String::as_str), Some("root"));
    assert_eq!(names.get(&5), None);
    assert_eq!(names.get(&6), None);
    assert_eq!(parse_account("  ml-research \nother\n"), "ml-research");
    assert_eq!(parse_account(""), "");
    assert_eq!(parse_account(&"a".repeat(1000)).len(), MAX_VALUE_CHARS);
    assert_eq!(parse_account("a\u{1f}b"), "a?b");
    assert_eq!(real_uid("Name:\tx\nUid:\t1000\t0\t0\t0\n"), Some(1000));
    assert_eq!(real_uid("Name:\tx\n"), None);
}

fn arb_cgroup() -> impl Strategy<Value = String> {
    let comp = prop_oneof![
        Just("kubepods".to_string()),
        Just("kubepods.slice".to_string()),
        Just("user.slice".to_string()),
        Just("system.slice".to_string()),
        "[a-z_@.-]{0,12}(\\.service|\\.scope|\\.slice)?",
        "(job_|pod|docker-|libpod-|kubepods-burstable-pod)[0-9a-f_-]{0,70}(\\.scope|\\.slice)?",
        "[0-9a-f]{64}",
        "\\PC{0,20}",
        ".{0,10}",
    ];
    let path = prop::collection::vec(comp, 0..8).prop_map(|c| format!("/{}", c.join("/")));
    let line = (
        prop_oneof![
            Just("0::".to_string()),
            "[0-9]{1,2}:[a-z,=]{0,20}:",
            ".{0,6}"
        ],
        path,
    )
        .prop_map(|(h, p)| format!("{h}{p}"));
    prop::collection::vec(line, 0..14).prop_map(|l| l.join("\n"))
}

proptest! {
    /// Any cgroup text gives an owner: no panic, a non-empty id, label values free of
    /// control characters (the aggregator's parser refuses them) and bounded.
    #[test]
    fn any_cgroup_text_gives_a_well_formed_owner(text in arb_cgroup(), user in ".{0,200}") {
        let o = owner_from_cgroup(&text, &user);
        prop_assert!(!o.id.is_empty());
        prop_assert_ne!(o.kind, OwnerKind::Unknown);
        for v in o.label_values() {
            prop_assert!(!v.chars().any(char::is_control), "{:?}", v);
            prop_assert!(v.chars().count() <= MAX_VALUE_CHARS);
        }
        if o.kind == OwnerKind::SlurmJob {
            prop_assert!(o.id.bytes().all(|b| b.is_ascii_digit()));
        }
    }
}
