//! The real `commitmeter agent` on the fake NVML library with scripted PIDs (the fake's
//! `pids` key) that exist in a fixture procfs tree (`--path.procfs`, `--path.rootfs`):
//! the owners it exports and their seconds against the scenario's exact shares, two
//! owners splitting a GPU, and an owner that ends leaving the exposition after its final
//! seconds were served (`--owners.retention`).

// Tests read the clock as they please: clippy.toml keeps that to src/clock.rs in the
// product only.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::*;

const INTERVAL_MS: u64 = 200;
const RETENTION_MS: u64 = 2_000;

const INFO: &str = "commitmeter_gpu_owner_info";
const ALLOCATED: &str = "commitmeter_owner_allocated_seconds_total";
const BUSY: &str = "commitmeter_owner_busy_seconds_total";
const SM_ACTIVE: &str = "commitmeter_owner_sm_active_seconds_total";

/// A process of the fixture tree: its PID, uid and cgroup file.
struct Proc {
    pid: u32,
    uid: u32,
    cgroup: &'static str,
}

/// Two Slurm jobs (cgroup v2 as slurmd's cgroup/v2 plugin lays them out, and v1), each
/// with its own user. PID 6001 is on a GPU but not in the tree: it cannot be read.
const PROCS: [Proc; 4] = [
    Proc {
        pid: 4001,
        uid: 1001,
        cgroup: "0::/system.slice/slurmstepd.scope/job_4242/step_0/user/task_0\n",
    },
    Proc {
        pid: 4002,
        uid: 1001,
        cgroup: "0::/system.slice/slurmstepd.scope/job_4242/step_0/user/task_1\n",
    },
    Proc {
        pid: 5001,
        uid: 1002,
        cgroup: "0::/system.slice/slurmstepd.scope/job_5353/step_batch/user/task_0\n",
    },
    Proc {
        pid: 5002,
        uid: 1002,
        cgroup: "12:devices:/slurm/uid_1002/job_5353/step_batch/task_0\n\
                 4:memory:/slurm/uid_1002/job_5353/step_batch/task_0\n\
                 1:name=systemd:/system.slice/slurmd.service\n",
    },
];
const UNREADABLE_PID: u32 = 6001;

const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
                      alice:x:1001:1001:Alice:/home/alice:/bin/bash\n\
                      bob:x:1002:1002:Bob:/home/bob:/bin/bash\n";

/// Writes `<dir>/<pid>/{status,cgroup}` for every fixture process and `<dir>/etc/passwd`.
fn write_tree(dir: &Path) {
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::write(dir.join("etc/passwd"), PASSWD).unwrap();
    for p in &PROCS {
        let d = dir.join(p.pid.to_string());
        std::fs::create_dir_all(&d).unwrap();
        let status = format!(
            "Name:\tpython\nUmask:\t0022\nState:\tR (running)\nTgid:\t{0}\nPid:\t{0}\nPPid:\t1\n\
             Uid:\t{1}\t{1}\t{1}\t{1}\nGid:\t{1}\t{1}\t{1}\t{1}\nThreads:\t4\n",
            p.pid, p.uid
        );
        std::fs::write(d.join("status"), status).unwrap();
        std::fs::write(d.join("cgroup"), p.cgroup).unwrap();
    }
}

/// The labels an owner is exported with: `owner_kind`, `owner`, `user`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Who {
    kind: &'static str,
    id: &'static str,
    user: &'static str,
}

/// The Slurm job from the `…/job_<id>/…` cgroup, the user name from `etc/passwd`.
fn alice() -> Who {
    Who {
        kind: "slurm_job",
        id: "4242",
        user: "alice",
    }
}

/// The Slurm job from the `…/job_<id>/…` cgroup, the user name from `etc/passwd`.
fn bob() -> Who {
    Who {
        kind: "slurm_job",
        id: "5353",
        user: "bob",
    }
}

fn unknown() -> Who {
    Who {
        kind: "unknown",
        id: "unknown",
        user: "",
    }
}

/// The owner of a scripted PID.
fn owner_of(pid: u32) -> Who {
    match pid {
        4001 | 4002 => alice(),
        5001 | 5002 => bob(),
        _ => unknown(),
    }
}

/// GPU 0: job 4242 (two processes) all along, job 5353 beside it from 3 s to 9 s;
/// utilization and SM activity step up at 6 s. GPU 1: job 5353 and an unreadable process
/// until 6 s, then the unreadable one alone.
fn scenario() -> Scenario {
    Scenario {
        gpus: vec![
            Gpu {
                util: vec![[0, 40], [6_000, 90]],
                sm_active: Some(vec![[0, 30], [6_000, 70]]),
                pids: Some(vec![
                    (0, vec![4001, 4002]),
                    (3_000, vec![4001, 4002, 5001]),
                    (9_000, vec![4001, 4002]),
                ]),
                ..Gpu::default()
            },
            Gpu {
                util: vec![[0, 50]],
                pids: Some(vec![
                    (0, vec![5002, UNREADABLE_PID]),
                    (6_000, vec![UNREADABLE_PID]),
                ]),
                ..Gpu::default()
            },
        ],
        sampled_before_ms: 10_000,
        ..Scenario::default()
    }
}

/// One scrape: its last round on the scenario's timeline, and the parsed metrics.
struct Scrape {
    at: u64,
    m: Metrics,
}

impl Scrape {
    fn owner(&self, name: &str, gpu: usize, who: &Who) -> Option<f64> {
        let gpu = gpu.to_string();
        self.m.get(
            name,
            &[
                ("gpu", &gpu),
                ("owner_kind", who.kind),
                ("owner", who.id),
                ("user", who.user),
            ],
        )
    }

    /// Every owner series of `name` on `gpu`, by owner (`owner_kind`, `owner`).
    fn owners(&self, name: &str, gpu: usize) -> BTreeMap<(String, String), f64> {
        self.m
            .series(name)
            .iter()
            .filter(|(l, _)| l.get("gpu") == Some(&gpu.to_string()))
            .map(|(l, v)| ((l["owner_kind"].clone(), l["owner"].clone()), *v))
            .collect()
    }
}

/// |measured − truth| ≤ 1 % of truth + `slack` seconds.
fn assert_within(what: &str, measured: f64, truth: f64, slack: f64) {
    let tolerance = 0.01 * truth.abs() + slack;
    assert!(
        (measured - truth).abs() <= tolerance,
        "{what}: measured {measured:.4}, ground truth {truth:.4} (tolerance {tolerance:.4})"
    );
}

#[test]
fn owners_split_their_gpus_as_the_scenario_says_and_an_ended_owner_leaves_after_its_final_seconds()
{
    let tree = TempDir::new("procfs");
    write_tree(tree.root());
    let agent = Agent::start(
        &scenario(),
        AgentOpts {
            interval: "200ms",
            extra_args: vec![
                format!("--path.procfs={}", tree.root().display()),
                format!("--path.rootfs={}", tree.root().display()),
                format!("--owners.retention={RETENTION_MS}ms"),
            ],
            ..AgentOpts::default()
        },
    );
    let sc = &agent.sc;
    let ready = timeline_ms(sc, agent.wait_ready(Duration::from_secs(20)));
    assert!(
        ready < 2_500,
        "ready at {ready} ms: the scenario needs rounds before its first step"
    );
    // Scrape every 100 ms to the end of the script, and beyond the last owner's retention.
    let mut scrapes = Vec::new();
    while sc.now_ms() < 9_000 + RETENTION_MS + 2_000 {
        let m = agent.metrics();
        let at = last_round_ms(sc, &m);
        scrapes.push(Scrape { at, m });
        std::thread::sleep(Duration::from_millis(100));
    }
    let first = &scrapes[0];
    let last = scrapes.last().unwrap();
    let (t1, t2) = (first.at, last.at);
    eprintln!("{} scrapes, rounds {t1}..{t2} ms", scrapes.len());
    assert!(t1 < 3_000 - INTERVAL_MS && t2 > 12_000, "rounds {t1}..{t2}");

    // Every scrape: per GPU the owners' counters (the last value served of those already
    // gone included) add up to the GPU's allocated, allocated busy and allocated
    // SM-active counters.
    for gpu in 0..2 {
        for (owner_name, gpu_name) in [
            (ALLOCATED, "commitmeter_gpu_allocated_seconds_total"),
            (BUSY, "commitmeter_gpu_allocated_busy_seconds_total"),
            (
                SM_ACTIVE,
                "commitmeter_gpu_allocated_sm_active_seconds_total",
            ),
        ] {
            let mut seen: BTreeMap<(String, String), f64> = BTreeMap::new();
            for s in &scrapes {
                seen.extend(s.owners(owner_name, gpu));
                let sum: f64 = seen.values().sum();
                let whole = s.m.gpu(gpu_name, gpu).unwrap();
                assert!(
                    (sum - whole).abs() <= 1e-6 * (1.0 + whole),
                    "gpu {gpu} at {} ms: Σ owners' {owner_name} {sum} vs {gpu_name} {whole}",
                    s.at
                );
            }
        }
    }

    // Each owner's seconds from the first scrape on against the scenario's exact share;
    // a step of the PIDs may move one round's share either way.
    let interval_s = INTERVAL_MS as f64 / 1000.0;
    let final_value = |name: &str, gpu: usize, who: &Who| {
        scrapes
            .iter()
            .rev()
            .find_map(|s| s.owner(name, gpu, who))
            .unwrap_or_else(|| panic!("{name} of {who:?} on gpu {gpu} never served"))
    };
    for (gpu, who, steps) in [
        (0, alice(), 2.0),
        (0, bob(), 2.0),
        (1, bob(), 1.0),
        (1, unknown(), 1.0),
    ] {
        let key = who.clone();
        let of = |pid| owner_of(pid);
        for (name, truth) in [
            (ALLOCATED, sc.owner_allocated_seconds(gpu, t1, t2, of, &key)),
            (BUSY, sc.owner_busy_seconds(gpu, t1, t2, of, &key)),
            (SM_ACTIVE, sc.owner_sm_active_seconds(gpu, t1, t2, of, &key)),
        ] {
            let start = first.owner(name, gpu, &who).unwrap_or(0.0);
            let measured = final_value(name, gpu, &who) - start;
            eprintln!("gpu {gpu} {who:?} {name}: {measured:.4} s vs {truth:.4} s");
            assert_within(
                &format!("gpu {gpu} {who:?} {name}"),
                measured,
                truth,
                steps * interval_s,
            );
        }
    }

    // Two owners on a GPU split it: between two scrapes well inside 3–9 s on GPU 0 (and
    // before 6 s on GPU 1), the two get exactly the same seconds.
    let inside = |from: u64, to: u64| {
        let within: Vec<&Scrape> = scrapes
            .iter()
            .filter(|s| s.at >= from + INTERVAL_MS && s.at + INTERVAL_MS <= to)
            .collect();
        assert!(within.len() >= 2, "no two scrapes within {from}..{to}");
        (within[0], *within.last().unwrap())
    };
    for (gpu, pair, from, to) in [
        (0, [alice(), bob()], 3_000, 9_000),
        (1, [bob(), unknown()], 0, 6_000),
    ] {
        let (a, b) = inside(from.max(t1), to);
        for name in [ALLOCATED, BUSY, SM_ACTIVE] {
            let d = |who: &Who| b.owner(name, gpu, who).unwrap() - a.owner(name, gpu, who).unwrap();
            let (x, y) = (d(&pair[0]), d(&pair[1]));
            assert!(
                x > 0.0 && (x - y).abs() < 1e-9,
                "gpu {gpu} {name}: {x} vs {y}"
            );
            let whole =
                b.m.gpu("commitmeter_gpu_allocated_seconds_total", gpu)
                    .unwrap()
                    - a.m
                        .gpu("commitmeter_gpu_allocated_seconds_total", gpu)
                        .unwrap();
            if name == ALLOCATED {
                assert!(
                    (x + y - whole).abs() < 1e-9,
                    "gpu {gpu}: {x} + {y} vs {whole}"
                );
            }
        }
    }

    // Who holds what, as the info series says: job 5353 on both GPUs until 6 s, on GPU 0
    // only until 9 s; the unreadable process as owner `unknown` on GPU 1.
    let info = |s: &Scrape, gpu, who: &Who| s.owner(INFO, gpu, who);
    let at = |t: u64| {
        scrapes
            .iter()
            .find(|s| s.at >= t)
            .unwrap_or_else(|| panic!("no scrape at {t} ms"))
    };
    let s = at(4_500);
    for (gpu, who) in [(0, alice()), (0, bob()), (1, bob()), (1, unknown())] {
        assert_eq!(
            info(s, gpu, &who),
            Some(1.0),
            "gpu {gpu} {who:?} at {} ms",
            s.at
        );
    }
    let s = at(7_000);
    assert_eq!(info(s, 1, &bob()), None, "at {} ms", s.at);
    assert_eq!(info(s, 0, &bob()), Some(1.0), "at {} ms", s.at);
    assert_eq!(s.owners(INFO, 1).len(), 1, "{:?}", s.owners(INFO, 1));
    assert_eq!(
        last.owners(INFO, 0).into_keys().collect::<Vec<_>>(),
        vec![(alice().kind.to_string(), alice().id.to_string())]
    );
    // The owner labels beyond the user: no Slurm account was given, no pod.
    let labels = &last
        .m
        .series(INFO)
        .iter()
        .find(|(l, _)| l["owner"] == alice().id)
        .unwrap()
        .0;
    let names: Vec<&str> = labels.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "account",
            "gpu",
            "namespace",
            "owner",
            "owner_kind",
            "pod",
            "qos",
            "user",
            "uuid"
        ]
    );
    assert_eq!(labels["uuid"], sc.uuid(0));

    // Job 5353 ended on GPU 1 at 6 s: its info goes at once, its counters stay frozen at
    // their final value for the retention, and are served so, then they go.
    for (gpu, end) in [(1, 6_000), (0, 9_000)] {
        let who = bob();
        let gone_info: Vec<&Scrape> = scrapes
            .iter()
            .filter(|s| s.at > end + INTERVAL_MS && info(s, gpu, &who).is_none())
            .collect();
        assert!(
            !gone_info.is_empty(),
            "gpu {gpu}: info of {who:?} never went"
        );
        let frozen: Vec<f64> = scrapes
            .iter()
            .filter(|s| s.at > end + INTERVAL_MS)
            .filter_map(|s| s.owner(ALLOCATED, gpu, &who))
            .collect();
        assert!(
            frozen.len() >= 3,
            "gpu {gpu}: the final value of {who:?} was served {} times",
            frozen.len()
        );
        assert!(frozen.iter().all(|v| *v == frozen[0]), "{frozen:?}");
        let removed = scrapes
            .iter()
            .find(|s| s.at > end && s.owner(ALLOCATED, gpu, &who).is_none())
            .unwrap_or_else(|| panic!("gpu {gpu}: {who:?} never removed"));
        assert!(
            removed.at + INTERVAL_MS >= end + RETENTION_MS
                && removed.at <= end + RETENTION_MS + 1_000,
            "gpu {gpu}: {who:?} removed at {} ms, its processes ended at {end} ms",
            removed.at
        );
        for name in [BUSY, SM_ACTIVE] {
            assert_eq!(removed.owner(name, gpu, &who), None, "{name}");
        }
        // Gone for good.
        assert!(scrapes
            .iter()
            .filter(|s| s.at >= removed.at)
            .all(|s| s.owner(ALLOCATED, gpu, &who).is_none()));
    }
    assert_eq!(agent.log_count("panicked"), 0, "{}", agent.log_text());
}
