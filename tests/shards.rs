//! A shared book on a real PostgreSQL (Debian's package, started on loopback by the test):
//! real agents on the fake NVML, two shards of two replicas each, and beside them a single
//! aggregator with its own SQLite ledger over the same fleet, as the reference.
//!
//! - Chaos: one replica of each shard is SIGKILLed at random moments and restarted, and
//!   PostgreSQL itself is stopped (immediately) for less than the grace. Then the book's
//!   sealed minutes are compared with the agents' own counters (the scenario's exact
//!   integrals) and with the SQLite aggregator's minutes over the same span; the identity
//!   holds on every sealed minute; each minute has at most one contribution per shard and
//!   was sealed once; and every replica serves the same contract counters.
//! - A whole shard down longer than its grace: the book seals its minutes without it, its
//!   hosts' last capacity unreported, the other shard's evidence as it was.
//! - Bad input: a shard count other than the book's, wrong credentials, an unreachable
//!   database (retried with backoff; exit 1 only with the flag).

// Tests read the clock as they please: clippy.toml keeps that to src/clock.rs in the
// product only.
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use commitmeter::contract::shard::hashmod;
use common::postgres::Postgres;
use common::prometheus::{api, urlencode, Prometheus};
use common::*;

const SHARDS: u32 = 2;

/// A steady host: three GPUs, two of them in use part of the time.
fn host() -> Scenario {
    let gpu = |util: u64| Gpu {
        util: vec![[0, util]],
        ..Gpu::default()
    };
    Scenario {
        gpus: vec![gpu(90), gpu(35), gpu(0)],
        ..Scenario::default()
    }
}

/// Agents until each shard has at least one (their keys are `127.0.0.1:PORT`, so the
/// split is by chance), at least four.
fn fleet() -> Vec<Agent> {
    let mut agents: Vec<Agent> = Vec::new();
    while agents.len() < 4
        || (0..SHARDS).any(|s| !agents.iter().any(|a| hashmod(&a.addr, SHARDS) == s))
    {
        assert!(agents.len() < 12, "hashmod put 12 agents in one shard");
        agents.push(Agent::start(&host(), AgentOpts::default()));
    }
    for a in &agents {
        a.wait_ready(Duration::from_secs(20));
    }
    agents
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A small xorshift: the chaos' moments, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let seed = std::env::var("SHARDS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| now_ms() as u64 | 1);
        eprintln!("chaos seed {seed} (SHARDS_SEED={seed} repeats it)");
        Rng(seed)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

const AGGREGATOR: &str =
    "[aggregator]\nscrape_interval = \"1s\"\nscrape_timeout = \"1s\"\ngrace = \"8s\"\n\n";

/// The config of an aggregator over `agents`: with `storage` a `[storage]` table (a
/// shard of the book), without it the SQLite reference.
fn config(dir: &Path, name: &str, agents: &[Agent], gpus: u64, storage: Option<String>) -> PathBuf {
    let targets: Vec<String> = agents.iter().map(|a| format!("\"{}\"", a.addr)).collect();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "{AGGREGATOR}[[targets]]\ntargets = [{}]\nlabels = {{ fleet = \"f\" }}\n\n{}\n{}",
            targets.join(", "),
            contract_toml("c", "{fleet=\"f\"}", gpus),
            storage.unwrap_or_default()
        ),
    )
    .unwrap();
    path
}

fn storage(pg: &Postgres, db: &str, shard: u32, shard_grace: &str) -> String {
    format!(
        "[storage]\npostgres = \"{}\"\npassword_file = \"{}\"\nshard = \"{shard}/{SHARDS}\"\nshard_grace = \"{shard_grace}\"\n",
        pg.url(db, "sslmode=disable"),
        pg.password_file().display()
    )
}

/// The book's sealed figures of contract `c` over minutes `[a, b)`, by kind name.
fn book_sums(pg: &Postgres, db: &str, a: i64, b: i64) -> Vec<(String, i64)> {
    let cols = commitmeter::ledger::Kind::NAMES;
    let sums: Vec<String> = cols.iter().map(|k| format!("sum({k})")).collect();
    let row = pg.psql(
        db,
        &format!(
            "SELECT {} FROM sealed_minutes WHERE contract = 'c' AND minute >= {a} AND minute < {b}",
            sums.join(", ")
        ),
    );
    cols.iter()
        .zip(row.split('|'))
        .map(|(k, v)| (k.to_string(), v.trim().parse().unwrap_or(0)))
        .collect()
}

/// The SQLite reference's sealed figures over minutes `[a, b)`.
fn sqlite_sums(data: &Path, a: i64, b: i64) -> Vec<(String, i64)> {
    let conn = rusqlite::Connection::open_with_flags(
        data.join("ledger.sqlite3"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the reference ledger");
    let cols = commitmeter::ledger::Kind::NAMES;
    let sums: Vec<String> = cols
        .iter()
        .map(|k| format!("COALESCE(sum({k}), 0)"))
        .collect();
    let row: Vec<i64> = conn
        .query_row(
            &format!(
                "SELECT {} FROM minutes WHERE contract = 'c' AND minute >= ?1 AND minute < ?2",
                sums.join(", ")
            ),
            [a, b],
            |r| (0..cols.len()).map(|i| r.get(i)).collect(),
        )
        .expect("reference sums");
    cols.iter().map(|k| k.to_string()).zip(row).collect()
}

/// The agents' truth over unix ms `[a, b)`: (delivered, used) GPU-seconds.
fn truth(agents: &[&Agent], a: i64, b: i64) -> (f64, f64) {
    let (mut delivered, mut used) = (0.0, 0.0);
    for h in agents {
        let start = h.sc.start_unix_ms.unwrap() as i64;
        let (from, to) = ((a - start).max(0) as u64, (b - start).max(0) as u64);
        for g in 0..h.sc.gpus.len() {
            delivered += h.sc.present_seconds(g, from, to);
            used += h.sc.busy_seconds(g, from, to);
        }
    }
    (delivered, used)
}

fn get(sums: &[(String, i64)], kind: &str) -> f64 {
    sums.iter().find(|(k, _)| k == kind).map_or(0, |x| x.1) as f64 / 1000.0
}

/// The first minute the book sealed for `c` and the first it has not.
fn sealed_span(pg: &Postgres, db: &str) -> (i64, i64) {
    let row = pg.psql(
        db,
        "SELECT COALESCE(min(minute), 0), COALESCE(max(minute) + 1, 0) FROM sealed_minutes WHERE contract = 'c'",
    );
    let mut it = row.split('|').map(|v| v.trim().parse::<i64>().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

#[test]
fn two_shards_of_two_replicas_keep_one_exact_book_through_kills_and_a_database_outage() {
    let pg = Postgres::start();
    let db = "chaos";
    pg.database(db);
    let agents = fleet();
    let gpus: u64 = agents.iter().map(|a| a.sc.gpus.len() as u64).sum();
    let dir = TempDir::new("shards");
    // One GPU more than the fleet: the book has undelivered capacity to split.
    let reference_config = config(dir.root(), "reference", &agents, gpus + 1, None);
    let reference_data = dir.path("reference");
    let reference = Aggregator::start(&reference_config, &reference_data);
    let configs: Vec<PathBuf> = (0..SHARDS)
        .map(|s| {
            config(
                dir.root(),
                &format!("shard{s}"),
                &agents,
                gpus + 1,
                Some(storage(&pg, db, s, "10s")),
            )
        })
        .collect();
    let data = |s: u32, r: u32| dir.path(&format!("shard{s}-replica{r}"));
    let mut replicas: Vec<Vec<Aggregator>> = (0..SHARDS)
        .map(|s| {
            (0..2)
                .map(|r| Aggregator::start(&configs[s as usize], &data(s, r)))
                .collect()
        })
        .collect();
    for a in replicas.iter().flatten().chain([&reference]) {
        a.wait_ready(Duration::from_secs(30));
    }
    // A real Prometheus scrapes every replica (a file_sd list kept current as they
    // restart on new ports) with the shipped rules.
    let sd = dir.path("aggregators.json");
    let write_sd = |replicas: &[Vec<Aggregator>]| {
        let targets: Vec<String> = replicas
            .iter()
            .flatten()
            .map(|a| format!("\"{}\"", a.addr))
            .collect();
        let tmp = dir.path("aggregators.json.tmp");
        std::fs::write(&tmp, format!("[{{\"targets\": [{}]}}]", targets.join(", "))).unwrap();
        std::fs::rename(&tmp, &sd).unwrap();
    };
    write_sd(&replicas);
    let rules =
        vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("alerts/commitmeter-recording.yml")];
    let prom = Prometheus::start(
        &format!(
            "  - job_name: commitmeter-aggregator\n    file_sd_configs:\n      - files: [{:?}]\n        refresh_interval: 1s\n",
            sd.display().to_string()
        ),
        &rules,
        &dir,
    );
    // Each replica scrapes its shard's targets only.
    for (s, shard) in replicas.iter().enumerate() {
        let m = shard[0].metrics();
        for a in &agents {
            let mine = hashmod(&a.addr, SHARDS) == s as u32;
            let up = m.get("commitmeter_target_up", &[("target", &a.addr)]);
            assert_eq!(up.is_some(), mine, "shard {s}, target {}", a.addr);
        }
    }

    // Chaos until the book has sealed its first minute f and minute f + 1 has ended: one
    // replica of each shard is killed at random moments (SIGKILL, restart after 2 to 6 s;
    // each restart re-baselines its hosts, so its partials around it are short), and the
    // database goes down once for 5 s (less than the grace), after the book has begun.
    let mut rng = Rng::new();
    let start = Instant::now();
    let mut outage_at: Option<Duration> = None;
    let mut outage_done = false;
    let mut next_kill: Vec<Duration> = (0..SHARDS)
        .map(|_| Duration::from_secs(5 + rng.below(20)))
        .collect();
    let mut kills = 0;
    let mut first_sealed: Option<i64> = None;
    loop {
        if first_sealed.is_none() {
            let (f, t) = sealed_span(&pg, db);
            if t > 0 {
                first_sealed = Some(f);
                outage_at = Some(start.elapsed() + Duration::from_secs(rng.below(30)));
            }
        }
        if first_sealed.is_some_and(|f| now_ms() >= (f + 2) * 60_000 + 3_000) && outage_done {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "the book sealed nothing in 5 minutes:\n{}",
            replicas[0][0].log_text()
        );
        for s in 0..SHARDS as usize {
            if start.elapsed() >= next_kill[s] {
                // Always the same replica: the other one watches every minute whole.
                let r = 0;
                let victim = replicas[s].remove(r);
                victim.kill9();
                kills += 1;
                std::thread::sleep(Duration::from_millis(2000 + rng.below(4000)));
                let back = Aggregator::start(&configs[s], &data(s as u32, r as u32));
                replicas[s].insert(r, back);
                write_sd(&replicas);
                next_kill[s] = start.elapsed() + Duration::from_secs(10 + rng.below(20));
            }
        }
        if !outage_done && outage_at.is_some_and(|at| start.elapsed() >= at) {
            pg.stop();
            std::thread::sleep(Duration::from_secs(5));
            pg.start_again();
            outage_done = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(outage_done && kills >= 4, "kills {kills}");

    // Let the book seal through the chaos: the last minute that ended before it stopped.
    let end_minute = now_ms().div_euclid(60_000);
    let deadline = Instant::now() + Duration::from_secs(90);
    while sealed_span(&pg, db).1 <= end_minute {
        assert!(
            Instant::now() < deadline,
            "the book did not seal minute {end_minute}; shard 0 log:\n{}",
            replicas[0][0].log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (a, _) = sealed_span(&pg, db);
    // The reference accounts from its own first minute: compare where both have minutes.
    let b = end_minute;
    reference.wait(
        Duration::from_secs(60),
        "the reference to seal the span",
        || {
            reference
                .metrics()
                .get("commitmeter_ledger_sealed_through_timestamp_seconds", &[])
                .is_some_and(|t| t as i64 >= b * 60)
        },
    );
    let reference_since = reference
        .metrics()
        .get("commitmeter_ledger_since_timestamp_seconds", &[])
        .unwrap() as i64
        / 60;
    let a = a.max(reference_since);
    assert!(b - a >= 1, "no common sealed minute: book from {a}, to {b}");

    // Identity exact on every sealed minute, the idle split too.
    let broken = pg.psql(
        db,
        "SELECT count(*) FROM sealed_minutes WHERE committed <> (used - overage) + idle + undelivered + unreported \
         OR idle <> idle_unallocated + idle_allocated",
    );
    assert_eq!(broken, "0", "sealed minutes breaking the identity");
    // Nothing counted twice: at most one contribution per shard and minute, and each
    // sealed minute's delivered is the sum of its shards' contributions.
    let counted = pg.psql(
        db,
        "SELECT count(*) FROM sealed_minutes s WHERE s.delivered <> \
         (SELECT COALESCE(sum(delivered), 0) FROM contributions c WHERE c.contract = s.contract AND c.minute = s.minute) \
         OR (SELECT count(*) FROM contributions c WHERE c.contract = s.contract AND c.minute = s.minute) > 2",
    );
    assert_eq!(
        counted, "0",
        "minutes counted otherwise than once per shard"
    );

    let book = book_sums(&pg, db, a, b);
    // The reference holds its database exclusively while it runs: stop it first (its
    // sealed minutes are durable).
    let mut reference = reference;
    terminate(&mut reference.child, Duration::from_secs(15));
    let sqlite = sqlite_sums(&reference_data, a, b);
    let all: Vec<&Agent> = agents.iter().collect();
    let (delivered, used) = truth(&all, a * 60_000, b * 60_000);
    // A driver sample period (100 ms) per GPU at each end of the span, and the scrape
    // rounds' jitter: the same slack as the single-aggregator tests.
    let tol = 2.0 * 0.1 * gpus as f64 + 0.5;
    eprintln!(
        "span {} min, {kills} replica kills, one 5 s database outage\n\
         book:      {book:?}\nreference: {sqlite:?}\ntruth: delivered {delivered:.3}, used {used:.3}",
        b - a
    );
    for (kind, truth) in [("delivered", delivered), ("used", used)] {
        let got = get(&book, kind);
        assert!(
            (got - truth).abs() <= tol,
            "book {kind} {got:.3} vs truth {truth:.3} (tolerance {tol:.2})"
        );
    }
    for kind in [
        "committed",
        "delivered",
        "used",
        "idle",
        "undelivered",
        "unreported",
    ] {
        let (x, y) = (get(&book, kind), get(&sqlite, kind));
        assert!(
            (x - y).abs() <= tol,
            "{kind}: book {x:.3} vs SQLite reference {y:.3} (tolerance {tol:.2})"
        );
    }
    // Every replica serves the book's counters: the same values once they have taken back
    // the same sealed minutes.
    let through = sealed_span(&pg, db).1;
    let mut served = Vec::new();
    for r in replicas.iter().flatten() {
        let m = r.wait_for(
            Duration::from_secs(30),
            "the replica to take back the book",
            |m| {
                m.get("commitmeter_ledger_sealed_through_timestamp_seconds", &[])
                    .is_some_and(|t| t as i64 >= through * 60)
            },
        );
        // Stop comparing a moving target: a later seal moves one replica first.
        let t = m
            .get("commitmeter_ledger_sealed_through_timestamp_seconds", &[])
            .unwrap();
        served.push((
            t,
            m.get(
                "commitmeter_contract_delivered_gpu_seconds_total",
                &[("contract", "c")],
            ),
        ));
    }
    // A statement from any replica is the book's: its period total is the sum of the book's
    // sealed minutes in the period (read around it until no seal falls between the two).
    let period = String::from_utf8(
        Command::new("date")
            .args(["-u", "+%Y-%m"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    for r in replicas.iter().map(|shard| &shard[1]) {
        let mut agreed = false;
        for _ in 0..5 {
            let before = sealed_span(&pg, db);
            let (status, body) = http_get(&r.addr, &format!("/statements/c/{period}.json"));
            assert_eq!(status, 200, "{body}");
            if sealed_span(&pg, db) != before {
                continue;
            }
            let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
            let start = doc["start"]
                .as_str()
                .unwrap()
                .parse::<jiff::Timestamp>()
                .unwrap();
            let first = start.as_second().div_euclid(60);
            let delivered = doc["total"]["kinds"]
                .as_array()
                .unwrap()
                .iter()
                .find(|k| k["kind"] == "delivered")
                .unwrap()["gpu_ms"]
                .as_i64()
                .unwrap();
            let book = book_sums(&pg, db, first, before.1);
            assert_eq!(
                delivered,
                (get(&book, "delivered") * 1000.0).round() as i64,
                "{body}"
            );
            assert_eq!(doc["total"]["identity_holds"], true, "{body}");
            agreed = true;
            break;
        }
        assert!(agreed, "the book kept sealing while the statement was read");
    }
    let newest = served.iter().map(|s| s.0).fold(0.0, f64::max);
    let at_newest: Vec<_> = served
        .iter()
        .filter(|s| s.0 == newest)
        .map(|s| s.1)
        .collect();
    // What Prometheus makes of the four replicas' series: the shipped rules and dashboards
    // take the max per contract, which is the book's figure once; a sum would be four times
    // it. The recording rule has one series per contract, and its ratio is the one the
    // replica that never went down gives alone.
    let query = |q: &str| -> Vec<f64> {
        let v = api(&prom, &format!("/api/v1/query?query={}", urlencode(q)));
        v["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["value"][1].as_str().unwrap().parse::<f64>().unwrap())
            .collect()
    };
    let steady = &replicas[0][1].addr;
    wait_until(
        Duration::from_secs(30),
        || "Prometheus to scrape all four replicas at the same seal".to_string(),
        || {
            let counts =
                query("count by (contract) (commitmeter_contract_delivered_gpu_seconds_total)");
            let max = query("max by (contract) (commitmeter_contract_delivered_gpu_seconds_total)");
            let min = query("min by (contract) (commitmeter_contract_delivered_gpu_seconds_total)");
            (counts == [4.0] && max == min).then_some(())
        },
    );
    let max = query("max by (contract) (commitmeter_contract_delivered_gpu_seconds_total)");
    let sum = query("sum by (contract) (commitmeter_contract_delivered_gpu_seconds_total)");
    assert_eq!(max.len(), 1);
    assert!(
        (sum[0] - 4.0 * max[0]).abs() < 1e-6,
        "sum {sum:?} max {max:?}"
    );
    let ratio = query("contract:commitmeter_idle_ratio:rate5m");
    let alone = query(&format!(
        "increase(commitmeter_contract_idle_gpu_seconds_total{{instance=\"{steady}\"}}[5m]) / \
         increase(commitmeter_contract_committed_gpu_seconds_total{{instance=\"{steady}\"}}[5m])"
    ));
    eprintln!("idle ratio over 5m: the rules over four replicas {ratio:?}, the steady replica alone {alone:?}");
    assert_eq!(
        ratio.len(),
        1,
        "one recorded series per contract: {ratio:?}"
    );
    assert!(
        (ratio[0] - alone[0]).abs() <= 0.02,
        "{ratio:?} vs {alone:?}"
    );
    assert!(
        at_newest.windows(2).all(|w| w[0] == w[1]),
        "replicas at the same seal serve different counters: {served:?}"
    );
}

#[test]
fn a_shard_down_longer_than_its_grace_is_sealed_unreported_and_the_other_is_untouched() {
    let pg = Postgres::start();
    let db = "down";
    pg.database(db);
    let agents = fleet();
    let gpus: u64 = agents.iter().map(|a| a.sc.gpus.len() as u64).sum();
    let dir = TempDir::new("shard-down");
    let configs: Vec<PathBuf> = (0..SHARDS)
        .map(|s| {
            config(
                dir.root(),
                &format!("shard{s}"),
                &agents,
                gpus,
                Some(storage(&pg, db, s, "2s")),
            )
        })
        .collect();
    let shard0 = Aggregator::start(&configs[0], &dir.path("shard0"));
    let shard1 = Aggregator::start(&configs[1], &dir.path("shard1"));
    shard0.wait_ready(Duration::from_secs(30));
    shard1.wait_ready(Duration::from_secs(30));
    // Both shards contribute first, so the book knows shard 1's capacity.
    // The first minute is the one after the first round; it closes `grace` after it ends.
    let deadline = Instant::now() + Duration::from_secs(200);
    while pg.psql(db, "SELECT count(DISTINCT shard) FROM contributions") != "2" {
        assert!(
            Instant::now() < deadline,
            "the shards did not both contribute:\n{}",
            shard0.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Shard 1 goes down (both replicas: it has one here). The next minute is wholly
    // without it; the book seals it once its grace (8 s + 2 s) has passed.
    shard1.kill9();
    let down_from = now_ms().div_euclid(60_000) + 1;
    let down_to = down_from;
    let deadline = Instant::now() + Duration::from_secs(150);
    while sealed_span(&pg, db).1 <= down_to {
        assert!(
            Instant::now() < deadline,
            "minutes without shard 1 not sealed:\n{}",
            shard0.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let shard1_gpus: i64 = agents
        .iter()
        .filter(|a| hashmod(&a.addr, SHARDS) == 1)
        .map(|a| a.sc.gpus.len() as i64)
        .sum();
    for minute in down_from..=down_to {
        let row = pg.psql(
            db,
            &format!(
                "SELECT s.delivered, s.unreported, s.undelivered, \
                 (SELECT count(*) FROM contributions c WHERE c.contract = 'c' AND c.minute = {minute} AND c.shard = 1), \
                 (SELECT delivered FROM contributions c WHERE c.contract = 'c' AND c.minute = {minute} AND c.shard = 0) \
                 FROM sealed_minutes s WHERE s.contract = 'c' AND s.minute = {minute}"
            ),
        );
        let v: Vec<i64> = row.split('|').map(|x| x.trim().parse().unwrap()).collect();
        let (delivered, unreported, undelivered, shard1_rows, shard0_delivered) =
            (v[0], v[1], v[2], v[3], v[4]);
        assert_eq!(
            shard1_rows, 0,
            "minute {minute}: shard 1 contributed while down"
        );
        // The other shard's evidence as it was; shard 1's capacity unreported, never
        // undelivered (the commitment is the fleet: nothing else is short).
        assert_eq!(delivered, shard0_delivered, "minute {minute}");
        assert_eq!(unreported, shard1_gpus * 60_000, "minute {minute}: {row}");
        assert_eq!(undelivered, 0, "minute {minute}: {row}");
        // Shard 0's hosts: their truth.
        let shard0: Vec<&Agent> = agents
            .iter()
            .filter(|a| hashmod(&a.addr, SHARDS) == 0)
            .collect();
        let (truth_delivered, _) = truth(&shard0, minute * 60_000, (minute + 1) * 60_000);
        assert!(
            (delivered as f64 / 1000.0 - truth_delivered).abs() <= 0.2 * gpus as f64 + 0.5,
            "minute {minute}: delivered {delivered} ms vs truth {truth_delivered:.3} s"
        );
    }
    // The shard back after the book sealed without it: its late minutes are refused and
    // counted, nothing changes in the book.
    let before = book_sums(&pg, db, down_from, down_to + 1);
    let back = Aggregator::start(&configs[1], &dir.path("shard1"));
    back.wait_for(
        Duration::from_secs(60),
        "its late minutes refused and counted",
        |m| {
            m.get(
                "commitmeter_book_contributed_minutes_total",
                &[("result", "sealed")],
            )
            .is_some_and(|n| n >= 1.0)
        },
    );
    assert_eq!(book_sums(&pg, db, down_from, down_to + 1), before);
}

/// Starts an aggregator that is expected to exit; its status and stderr.
fn run_to_exit(config: &Path, data: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_commitmeter"))
        .arg("aggregator")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.path={}", data.display()))
        .arg("--web.listen-address=127.0.0.1:0")
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run the aggregator");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_book_refuses_another_shard_count_wrong_credentials_and_says_when_it_cannot_be_reached() {
    let pg = Postgres::start();
    let db = "refusals";
    pg.database(db);
    let dir = TempDir::new("shard-refusals");
    let agent = Agent::start(&host(), AgentOpts::default());
    let agents = [agent];
    // The book gets its shard count from the first aggregator.
    let two = config(
        dir.root(),
        "two",
        &agents,
        3,
        Some(storage(&pg, db, 0, "2s")),
    );
    let first = Aggregator::start(&two, &dir.path("two"));
    first.wait_ready(Duration::from_secs(30));
    // The README's table of a shared book's series is what such an aggregator exports.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme
        .find("### Shared book")
        .expect("a Shared book section")..];
    let table = &section[section.find("| series |").expect("its series table")..];
    let documented: std::collections::BTreeSet<String> = table
        .lines()
        .take_while(|l| l.starts_with('|'))
        .flat_map(|l| {
            l.split('|')
                .nth(1)
                .unwrap_or("")
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|t| t.starts_with("commitmeter_"))
        .flat_map(|t| expand_series(&t))
        .collect();
    let exported: std::collections::BTreeSet<String> = first
        .metrics()
        .samples
        .keys()
        .filter(|k| k.starts_with("commitmeter_book_"))
        .cloned()
        .collect();
    assert_eq!(
        documented, exported,
        "README's shared book series vs exported"
    );
    let three = config(
        dir.root(),
        "three",
        &agents,
        3,
        Some(storage(&pg, db, 0, "2s").replace("/2\"", "/3\"")),
    );
    let (code, err) = run_to_exit(&three, &dir.path("three"), &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("shard") && err.contains("2 shards"), "{err}");

    let wrong = dir.path("wrong.password");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let bad = config(
        dir.root(),
        "bad",
        &agents,
        3,
        Some(storage(&pg, db, 1, "2s").replace(
            &pg.password_file().display().to_string(),
            &wrong.display().to_string(),
        )),
    );
    let (code, err) = run_to_exit(&bad, &dir.path("bad"), &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("authentication failed"), "{err}");

    // Nothing listens on this port: with the flag, exit 1 naming the address.
    let (silent, addr) = silent_port();
    drop(silent);
    let port = addr.rsplit(':').next().unwrap().to_string();
    let unreachable = config(
        dir.root(),
        "unreachable",
        &agents,
        3,
        Some(storage(&pg, db, 1, "2s").replace(&format!(":{}/", pg.port()), &format!(":{port}/"))),
    );
    let (code, err) = run_to_exit(
        &unreachable,
        &dir.path("unreachable"),
        &["--storage.postgres.exit-if-unreachable"],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cannot reach PostgreSQL") && err.contains(&port),
        "{err}"
    );
    // Without it: the aggregator waits, saying so once, and does not exit.
    let mut child = Command::new(env!("CARGO_BIN_EXE_commitmeter"))
        .arg("aggregator")
        .arg(format!("--config.file={}", unreachable.display()))
        .arg(format!("--storage.path={}", dir.path("waiting").display()))
        .arg("--web.listen-address=127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It binds and logs nothing more until the book answers: read its stderr as it comes.
    let log = Log::default();
    let sink = log.clone();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            sink.lock().unwrap().push(line);
        }
    });
    wait_until(
        Duration::from_secs(20),
        || format!("the retry line:\n{}", log_text(&log)),
        || {
            log_text(&log)
                .contains("retrying with backoff")
                .then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        child.try_wait().unwrap().is_none(),
        "exited:\n{}",
        log_text(&log)
    );
    assert_eq!(
        log_count(&log, "cannot reach the shared book"),
        1,
        "{}",
        log_text(&log)
    );
    let _ = child.kill();
    let _ = child.wait();
}
