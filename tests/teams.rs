//! Real agents on the fake NVML library, their GPU processes in a fixture procfs tree, and a
//! real aggregator with `[[teams]]`: showback judged against the scenario.
//!
//! Two hosts of one contract. Three teams hold GPUs through three kinds of owner — a Slurm
//! account (`vision`), a pattern of Slurm accounts (`llm`, whose job moves from host `a` to
//! host `b` mid-run), a systemd unit (`serving`) — and a user no rule names holds one GPU
//! alone and shares another with `serving` (`unassigned`). The aggregator is SIGKILLed
//! mid-run and restarted. Every team's allocated and used GPU-seconds over the sealed span
//! are compared with the scenario's exact shares (the fake's own integral, not the ledger's
//! rules), and the teams must add up to the contract's allocated time to the GPU-ms.

// Tests read the clock as they please: clippy.toml keeps that to src/clock.rs in the
// product only.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::*;

/// When the moving job leaves host `a` and arrives on host `b`, on each agent's timeline:
/// after the ledger's first minute (which starts at most a minute after the aggregator).
const MOVE_OUT_MS: u64 = 75_000;
const MOVE_IN_MS: u64 = 76_310;

/// A process of the tree: PID, uid, cgroup file, its owner's id and that owner's team.
struct Proc {
    pid: u32,
    uid: u32,
    cgroup: &'static str,
    owner: &'static str,
    team: &'static str,
}

const PROCS: [Proc; 5] = [
    Proc {
        pid: 4001,
        uid: 1001,
        cgroup: "0::/system.slice/slurmstepd.scope/job_4242/step_0/user/task_0\n",
        owner: "slurm 4242",
        team: "vision",
    },
    // The job that moves: one process on each host, same job (and account).
    Proc {
        pid: 4101,
        uid: 1002,
        cgroup: "0::/system.slice/slurmstepd.scope/job_777/step_0/user/task_0\n",
        owner: "slurm 777",
        team: "llm",
    },
    Proc {
        pid: 4102,
        uid: 1002,
        cgroup: "12:devices:/slurm/uid_1002/job_777/step_1/task_0\n\
                 4:memory:/slurm/uid_1002/job_777/step_1/task_0\n\
                 1:name=systemd:/system.slice/slurmd.service\n",
        owner: "slurm 777",
        team: "llm",
    },
    Proc {
        pid: 5001,
        uid: 1003,
        cgroup: "0::/system.slice/inference.service\n",
        owner: "unit inference.service",
        team: "serving",
    },
    Proc {
        pid: 6001,
        uid: 1004,
        cgroup: "0::/user.slice/user-1004.slice/session-7.scope\n",
        owner: "user carol",
        team: "unassigned",
    },
];

const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
                      alice:x:1001:1001::/home/alice:/bin/bash\n\
                      bob:x:1002:1002::/home/bob:/bin/bash\n\
                      svc:x:1003:1003::/srv:/usr/sbin/nologin\n\
                      carol:x:1004:1004::/home/carol:/bin/bash\n";

const TEAMS: &str = "[[teams]]\nname = \"vision\"\nslurm_account = \"vision\"\n\n\
                     [[teams]]\nname = \"llm\"\nslurm_account = \"llm-.*\"\n\n\
                     [[teams]]\nname = \"serving\"\nunit = \"inference\\\\.service\"\n";

/// `<dir>/<pid>/{status,cgroup}`, `<dir>/etc/passwd` and the Slurm prolog's account files.
fn write_tree(dir: &Path) {
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::create_dir_all(dir.join("accounts")).unwrap();
    std::fs::write(dir.join("etc/passwd"), PASSWD).unwrap();
    std::fs::write(dir.join("accounts/4242"), "vision\n").unwrap();
    std::fs::write(dir.join("accounts/777"), "llm-pretrain\n").unwrap();
    for p in &PROCS {
        let d = dir.join(p.pid.to_string());
        std::fs::create_dir_all(&d).unwrap();
        let status = format!(
            "Name:\tpython\nState:\tR (running)\nTgid:\t{0}\nPid:\t{0}\nPPid:\t1\n\
             Uid:\t{1}\t{1}\t{1}\t{1}\nGid:\t{1}\t{1}\t{1}\t{1}\n",
            p.pid, p.uid
        );
        std::fs::write(d.join("status"), status).unwrap();
        std::fs::write(d.join("cgroup"), p.cgroup).unwrap();
    }
}

fn proc_of(pid: u32) -> &'static Proc {
    PROCS.iter().find(|p| p.pid == pid).unwrap()
}

fn gpu(util: u64, pids: Vec<(u64, Vec<u32>)>) -> Gpu {
    Gpu {
        util: vec![[0, util]],
        pids: Some(pids),
        ..Gpu::default()
    }
}

/// Host `a`: `vision`'s job; the moving job until it leaves; carol alone.
fn host_a() -> Scenario {
    Scenario {
        gpus: vec![
            gpu(70, vec![(0, vec![4001])]),
            gpu(90, vec![(0, vec![4101]), (MOVE_OUT_MS, vec![])]),
            gpu(20, vec![(0, vec![6001])]),
        ],
        ..Scenario::default()
    }
}

/// Host `b`: `serving` alone, the moving job from its arrival, `serving` sharing a GPU
/// with carol, and a GPU no process holds.
fn host_b() -> Scenario {
    Scenario {
        gpus: vec![
            gpu(50, vec![(0, vec![5001])]),
            gpu(90, vec![(0, vec![]), (MOVE_IN_MS, vec![4102])]),
            gpu(60, vec![(0, vec![5001, 6001])]),
            gpu(0, vec![(0, vec![])]),
        ],
        ..Scenario::default()
    }
}

/// Per team over `[from, to)` of a host's timeline: (allocated, used by busy) GPU-seconds,
/// the scenario's exact shares (each instant's allocated time shared equally among the
/// distinct owners holding the GPU).
fn truth(sc: &Scenario, from: u64, to: u64, out: &mut BTreeMap<&'static str, (f64, f64)>) {
    let owner_of = |pid: u32| proc_of(pid).owner;
    for g in 0..sc.gpus.len() {
        let mut owners: Vec<&Proc> = PROCS.iter().collect();
        owners.dedup_by_key(|p| p.owner);
        for p in owners {
            let t = out.entry(p.team).or_default();
            t.0 += sc.owner_allocated_seconds(g, from, to, owner_of, &p.owner);
            t.1 += sc.owner_busy_seconds(g, from, to, owner_of, &p.owner);
        }
    }
}

/// PID steps inside `[from, to)`: each may be placed up to one sampling round off.
fn steps_within(sc: &Scenario, from: u64, to: u64) -> usize {
    sc.gpus
        .iter()
        .flat_map(|g| g.pids.iter().flatten())
        .filter(|(t, _)| *t > from && *t < to)
        .count()
}

#[test]
fn teams_match_the_scenario_sum_to_the_contracts_allocated_and_survive_sigkill() {
    let tree = TempDir::new("procfs");
    write_tree(tree.root());
    let owner_args = || AgentOpts {
        extra_args: vec![
            format!("--path.procfs={}", tree.root().display()),
            format!("--path.rootfs={}", tree.root().display()),
            format!(
                "--owners.slurm-account-dir={}",
                tree.root().join("accounts").display()
            ),
        ],
        ..AgentOpts::default()
    };
    let hosts = [
        Agent::start(&host_a(), owner_args()),
        Agent::start(&host_b(), owner_args()),
    ];
    for a in &hosts {
        a.wait_ready(Duration::from_secs(20));
    }
    let dir = TempDir::new("teams");
    let config = dir.path("aggregator.toml");
    std::fs::write(
        &config,
        format!(
            "[aggregator]\nscrape_interval = \"1s\"\nscrape_timeout = \"1s\"\ngrace = \"2s\"\n\n\
             [[targets]]\ntargets = [\"{}\", \"{}\"]\nlabels = {{ provider = \"p\" }}\n\n\
             [[contracts]]\nid = \"shared\"\nprovider = \"p\"\nprice_per_gpu_hour = 3.6\n\
             currency = \"USD\"\ntarget_utilization = 0.9\nstart = \"2026-01-01\"\n\
             selector = '{{provider=\"p\"}}'\nramp = [ {{ from = \"2026-01-01\", gpus = 7 }} ]\n\n\
             {TEAMS}",
            hosts[0].addr, hosts[1].addr,
        ),
    )
    .unwrap();
    let data = dir.path("data");
    let every_round = ["--storage.host-checkpoint-interval=0s".to_string()];
    let agg = Aggregator::start_with(&config, &data, &every_round);
    agg.wait_ready(Duration::from_secs(20));
    let m = agg.wait_for(Duration::from_secs(20), "both hosts up", |m| {
        hosts
            .iter()
            .all(|a| m.get("commitmeter_target_up", &[("target", &a.addr)]) == Some(1.0))
    });
    let since = m
        .get("commitmeter_ledger_since_timestamp_seconds", &[])
        .unwrap() as i64;
    let team = |m: &Metrics, kind: &str, team: &str| {
        m.get(
            &format!("commitmeter_team_{kind}_gpu_seconds_total"),
            &[("contract", "shared"), ("team", team)],
        )
        .unwrap_or(0.0)
    };

    // Mid-run, with team time sealed: SIGKILL, and a new process on the same ledger.
    let before = agg.wait_for(Duration::from_secs(120), "a sealed minute", |m| {
        m.get("commitmeter_ledger_sealed_through_timestamp_seconds", &[])
            .unwrap() as i64
            >= since + 60
    });
    std::thread::sleep(Duration::from_millis(2_300));
    agg.kill9();
    let agg = Aggregator::start_with(&config, &data, &every_round);
    agg.wait_log(Duration::from_secs(10), "ledger restored");
    let restored = |m: &Metrics| {
        ["vision", "llm", "serving", "unassigned"]
            .iter()
            .flat_map(|name| ["allocated", "used"].map(|kind| (*name, kind)))
            .map(|(name, kind)| (name, kind, team(&before, kind, name), team(m, kind, name)))
            .collect::<Vec<_>>()
    };
    // The new process serves at least what the old one had from its first scrape:
    // nothing went back, nothing went missing.
    let first = agg.metrics();
    for (name, kind, was, now) in restored(&first) {
        assert!(
            now >= was,
            "{name} {kind}: {was} before the crash, {now} after"
        );
    }

    // Two sealed minutes after the move, at least.
    let last_move_unix = hosts
        .iter()
        .map(|h| h.sc.start_unix_ms.unwrap() + MOVE_IN_MS)
        .max()
        .unwrap() as i64;
    let m = agg.wait_for(
        Duration::from_secs(240),
        "minutes sealed after the move",
        |m| {
            let through = m
                .get("commitmeter_ledger_sealed_through_timestamp_seconds", &[])
                .unwrap() as i64;
            through >= since + 120 && through * 1000 >= last_move_unix + 30_000
        },
    );
    let through = m
        .get("commitmeter_ledger_sealed_through_timestamp_seconds", &[])
        .unwrap() as i64;

    let mut truths = BTreeMap::new();
    let mut steps = 0;
    for h in &hosts {
        let start = h.sc.start_unix_ms.unwrap() as i64;
        let (from, to) = (
            (since * 1000 - start).max(0) as u64,
            (through * 1000 - start) as u64,
        );
        assert!(
            from < MOVE_OUT_MS && MOVE_IN_MS < to,
            "the move is inside the sealed span"
        );
        truth(&h.sc, from, to, &mut truths);
        steps += steps_within(&h.sc, from, to);
    }
    // Steady owners are exact to the ms; a PID step costs at most one sampling round
    // (500 ms) at full scale. Busy time also one driver sample period (100 ms) per GPU at
    // the span's edges.
    let gpus = 7.0;
    let allocated_tol = 0.5 * steps as f64 + 0.01;
    let used_tol = allocated_tol + 2.0 * 0.1 * gpus;
    let seconds = through - since;
    for (name, (allocated, used)) in &truths {
        for (kind, truth, tol) in [
            ("allocated", *allocated, allocated_tol),
            ("used", *used, used_tol),
        ] {
            let got = team(&m, kind, name);
            eprintln!(
                "{name} {kind}: ledger {got:.3}, truth {truth:.3}, error {:+.3} GPU-s \
                 (tolerance {tol:.2}) over {seconds} s",
                got - truth
            );
            assert!(
                (got - truth).abs() <= tol,
                "{name} {kind}: ledger {got:.3}, truth {truth:.3}\n{}",
                agg.log_text()
            );
        }
    }
    // Every team with time, and nothing else: no series per job or per user.
    let mut listed: Vec<String> = m
        .series("commitmeter_team_allocated_gpu_seconds_total")
        .iter()
        .map(|(l, _)| l.get("team").unwrap().to_string())
        .collect();
    listed.sort();
    assert_eq!(listed, ["llm", "serving", "unassigned", "vision"]);

    // The teams add up to the contract's allocated time exactly (integer GPU-ms behind
    // both), and that is the scenario's allocated time of the contract's GPUs.
    let sum: f64 = m
        .series("commitmeter_team_allocated_gpu_seconds_total")
        .iter()
        .map(|(_, v)| v)
        .sum();
    let contract = m
        .get(
            "commitmeter_contract_allocated_gpu_seconds_total",
            &[("contract", "shared")],
        )
        .unwrap();
    assert!(
        (sum - contract).abs() < 1e-6,
        "teams {sum} != contract {contract}"
    );
    let truth_allocated: f64 = truths.values().map(|t| t.0).sum();
    assert!(
        (contract - truth_allocated).abs() <= allocated_tol,
        "contract allocated {contract}, truth {truth_allocated}"
    );
    // Month to date: the same sealed minutes, less any before the billing period's start
    // (a run across midnight at a month's end).
    for name in ["vision", "llm", "serving", "unassigned"] {
        let period = m
            .get(
                "commitmeter_team_period_gpu_seconds",
                &[
                    ("contract", "shared"),
                    ("team", name),
                    ("kind", "allocated"),
                ],
            )
            .unwrap_or(0.0);
        assert!(
            period <= team(&m, "allocated", name) + 1e-6,
            "{name}: period {period}"
        );
    }
}
