//! The shared book (src/aggregator/shared) against a real PostgreSQL from Debian's package
//! (tests/common/postgres.rs): one server for this file, a database per test.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use commitmeter::aggregator::shared::{
    BookOptions, Contributed, SealedRow, SharedBook, SCHEMA_VERSION,
};
use commitmeter::ledger::shard::{combine, Partial};
use commitmeter::ledger::{Kind, TeamRow, Totals, MINUTE_MS};
use common::postgres::{Postgres, ROLE};

/// Minutes of the tests start here (late 2025).
const M0: i64 = 29_400_000;
const GRACE_MS: i64 = 5 * MINUTE_MS;

/// 8 GPUs committed.
fn committed(_contract: &str, from_ms: i64, to_ms: i64) -> i64 {
    8 * (to_ms - from_ms)
}

fn opts(pg: &Postgres, url: &str, shards: u32, writer: &str) -> BookOptions {
    let mut o = BookOptions::new(url, shards, writer);
    o.password_file = Some(pg.password_file());
    o
}

async fn book(pg: &Postgres, url: &str, shards: u32, writer: &str) -> SharedBook {
    SharedBook::connect(&opts(pg, url, shards, writer))
        .await
        .unwrap_or_else(|e| panic!("{writer}: {e}"))
}

async fn refused(o: &BookOptions) -> String {
    match SharedBook::connect(o).await {
        Ok(b) => panic!("connected: {b:?}"),
        Err(e) => e.to_string(),
    }
}

/// A shard's evidence for a minute, different for each (contract, minute, shard, variant):
/// 4 GPUs known, some not watched, some not delivered, half used, two teams.
fn partial(contract: &str, minute: i64, shard: u32, variant: i64) -> Partial {
    let seed = contract.len() as i64 * 7 + minute % 97 + i64::from(shard) * 13 + variant * 31;
    let expected = 4 * MINUTE_MS;
    let reported = expected - (seed % 3) * 1_000;
    let delivered = reported - (seed % 5) * 2_000;
    let used = delivered / 2 + seed;
    let held = (delivered - used) / 3;
    let teams: Vec<TeamRow> = vec![
        ("alpha".into(), delivered / 2, used / 2),
        (format!("team-{}", seed % 4), delivered / 4, used / 4),
    ];
    Partial {
        delivered,
        used,
        reported,
        expected,
        absent: 0,
        held,
        allocated: teams.iter().map(|t| t.1).sum(),
        watched: true,
        unsized_dark: false,
        capacity_gpus: 4,
        teams,
    }
}

/// What a minute sealed from `present` with `missing` shards' capacity must hold.
fn expected_row(
    contract: &str,
    minute: i64,
    present: &[&Partial],
    missing: Vec<(u32, Option<i64>)>,
) -> SealedRow {
    let missing_ms = missing.iter().map(|(_, g)| g.unwrap() * MINUTE_MS).sum();
    let c = combine(
        committed(contract, minute * MINUTE_MS, (minute + 1) * MINUTE_MS),
        present,
        missing_ms,
    );
    SealedRow {
        contract: contract.to_string(),
        minute,
        totals: c.totals,
        allocated: c.allocated,
        teams: c.teams,
        short: c.short,
        missing,
    }
}

/// The readers agree with the sealed minutes: sums over ranges, all time, teams.
async fn check_readers(book: &SharedBook, contract: &str) {
    let rows = book.sealed(contract, i64::MIN, i64::MAX).await.unwrap();
    assert!(!rows.is_empty());
    let minutes = book.minutes(contract, i64::MIN, i64::MAX).await.unwrap();
    assert_eq!(
        minutes,
        rows.iter()
            .map(|r| (r.minute, r.totals))
            .collect::<Vec<_>>()
    );
    let (first, last) = (rows[0].minute, rows[rows.len() - 1].minute);
    for (from, to) in [
        (i64::MIN, i64::MAX),
        (first, last + 1),
        (first + 1, last),
        (first + 3, first + 4),
        (last + 1, last + 10),
    ] {
        let mut want = Totals::default();
        let mut teams: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        for r in rows.iter().filter(|r| r.minute >= from && r.minute < to) {
            want.add(&r.totals);
            for (t, a, u) in &r.teams {
                let s = teams.entry(t.clone()).or_default();
                *s = (s.0 + a, s.1 + u);
            }
        }
        let want_teams: Vec<TeamRow> = teams.into_iter().map(|(t, (a, u))| (t, a, u)).collect();
        assert_eq!(
            book.sums(contract, from, to).await.unwrap(),
            want,
            "[{from}, {to})"
        );
        assert_eq!(
            book.team_sums(contract, from, to).await.unwrap(),
            want_teams,
            "[{from}, {to})"
        );
    }
    let (all, allocated) = book.all_time(contract).await.unwrap();
    assert_eq!(all, book.sums(contract, i64::MIN, i64::MAX).await.unwrap());
    assert_eq!(allocated, rows.iter().map(|r| r.allocated).sum::<i64>());
    assert_eq!(
        book.team_all_time(contract).await.unwrap(),
        book.team_sums(contract, i64::MIN, i64::MAX).await.unwrap()
    );
    assert_eq!(book.sealed_through(contract).await.unwrap(), Some(last + 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_run_once_when_aggregators_start_together_and_again_change_nothing() {
    let pg = Postgres::shared();
    let url = pg.database("migrate_once");
    let starts = (0..4).map(|i| {
        let (pg, url) = (pg.clone(), url.clone());
        tokio::spawn(async move { book(&pg, &url, 2, &format!("agg-{i}")).await })
    });
    let mut books = Vec::new();
    for s in starts {
        books.push(s.await.unwrap());
    }
    let applied = || {
        pg.psql(
            "migrate_once",
            "SELECT string_agg(version::text, ',' ORDER BY version) FROM book_schema",
        )
    };
    let want = (1..=SCHEMA_VERSION)
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(",");
    assert_eq!(applied(), want);
    // Every ledger kind has its column where sealed minutes and their running totals live
    // (a new kind needs a migration that adds them).
    for table in ["sealed_minutes", "contract_totals"] {
        let columns = pg.psql(
            "migrate_once",
            &format!(
                "SELECT string_agg(column_name, ',') FROM information_schema.columns
                 WHERE table_name = '{table}' AND data_type = 'bigint'"
            ),
        );
        let columns: Vec<&str> = columns.split(',').collect();
        for kind in Kind::NAMES {
            assert!(columns.contains(&kind), "{table} lacks {kind}: {columns:?}");
        }
    }
    drop(books);
    let again = book(&pg, &url, 2, "agg-later").await;
    assert_eq!(again.shards(), 2);
    assert_eq!(applied(), want);
    assert_eq!(
        pg.psql(
            "migrate_once",
            "SELECT shards || ' ' || created_by FROM book"
        )
        .split(' ')
        .next(),
        Some("2")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_with_a_newer_schema_is_refused() {
    let pg = Postgres::shared();
    let url = pg.database("newer");
    drop(book(&pg, &url, 1, "old").await);
    pg.psql(
        "newer",
        "INSERT INTO book_schema (version, applied_by) VALUES (99, 'a newer commitmeter')",
    );
    let err = refused(&opts(&pg, &url, 1, "old")).await;
    assert_eq!(
        err,
        format!(
            "shared book: database schema v99 is newer than this commitmeter's v{SCHEMA_VERSION}: upgrade commitmeter"
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_and_a_missing_password_file_are_refused_by_name() {
    let pg = Postgres::shared();
    let url = pg.database("credentials");
    let dir = common::TempDir::new("pg-password");
    let wrong = dir.path("wrong.password");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let mut o = opts(&pg, &url, 1, "agg");
    o.password_file = Some(wrong);
    let err = refused(&o).await;
    assert!(
        err.contains(&format!(
            "PostgreSQL at 127.0.0.1:{}: authentication failed for user \"{ROLE}\"",
            pg.port()
        )),
        "{err}"
    );
    assert!(!err.contains("not-the-password"), "{err}");

    o.password_file = None;
    let err = refused(&o).await;
    assert!(
        err.contains("authentication failed for user \"book\"") && err.contains("password_file"),
        "{err}"
    );

    let missing = dir.path("absent.password");
    o.password_file = Some(missing.clone());
    let err = refused(&o).await;
    assert!(
        err.starts_with(&format!(
            "[storage] postgres password file {}: ",
            missing.display()
        )),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_named_and_worth_retrying() {
    let pg = Postgres::shared();
    // A port nobody listens on: bound, read, released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = opts(
        &pg,
        &format!("postgres://{ROLE}@127.0.0.1:{port}/book"),
        1,
        "agg",
    );
    let err = SharedBook::connect(&o).await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "shared book: cannot reach PostgreSQL at 127.0.0.1:{port}: "
        )),
        "{text}"
    );
    assert!(text.contains("refused"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregator_with_another_shard_count_is_refused() {
    let pg = Postgres::shared();
    let url = pg.database("shard_count");
    let first = book(&pg, &url, 2, "agg-a").await;
    let err = refused(&opts(&pg, &url, 3, "agg-b")).await;
    assert_eq!(
        err,
        "shard = \"i/3\": the shared book has 2 shards (recorded by agg-a); every aggregator of \
         one book must give the same shard count"
    );
    let err = refused(&opts(&pg, &url, 0, "agg-c")).await;
    assert!(err.contains("shard = \"i/0\""), "{err}");
    // The same count is welcome; a shard outside it cannot contribute.
    let same = book(&pg, &url, 2, "agg-d").await;
    let err = same
        .contribute(2, &[("c".into(), M0, partial("c", M0, 2, 0))])
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "shared book: shard 2 is not one of the book's 2 (0 to 1)"
    );
    drop(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_server_checks_its_certificate() {
    let pg = Postgres::shared();
    pg.database("tls");
    let url = pg.url("tls", "sslmode=require");
    let mut o = opts(&pg, &url, 1, "agg-tls");
    o.tls_ca_file = Some(pg.ca_file());
    let b = SharedBook::connect(&o).await.unwrap();
    // The pool keeps its connection: the server says it is encrypted.
    let ssl = pg.psql(
        "tls",
        "SELECT string_agg(s.ssl::text, ',') FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.application_name = 'commitmeter agg-tls'",
    );
    assert_eq!(ssl, "true");
    drop(b);
    // Without the CA (the system's roots): the server's certificate is not trusted.
    o.tls_ca_file = None;
    let err = refused(&o).await;
    assert!(err.contains("certificate"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_write_wins_and_a_retry_changes_nothing() {
    let pg = Postgres::shared();
    let url = pg.database("first_wins");
    let replica_a = book(&pg, &url, 2, "shard0-a").await;
    let replica_b = book(&pg, &url, 2, "shard0-b").await;
    let other = book(&pg, &url, 2, "shard1-a").await;
    let (c, m) = ("gpu-east".to_string(), M0);
    let first = partial(&c, m, 0, 0);
    let second = partial(&c, m, 0, 1);
    assert_ne!(first, second);
    let wrote = |won, already| Contributed {
        won,
        already,
        sealed: 0,
    };
    let row = |p: &Partial| vec![(c.clone(), m, p.clone())];
    assert_eq!(
        replica_a.contribute(0, &row(&first)).await.unwrap(),
        wrote(1, 0)
    );
    // The other replica's different evidence, a retry, and a duplicate within one call.
    assert_eq!(
        replica_b.contribute(0, &row(&second)).await.unwrap(),
        wrote(0, 1)
    );
    assert_eq!(
        replica_a.contribute(0, &row(&first)).await.unwrap(),
        wrote(0, 1)
    );
    let p1 = partial(&c, m, 1, 0);
    let twice = vec![(c.clone(), m, p1.clone()), (c.clone(), m, second.clone())];
    assert_eq!(other.contribute(1, &twice).await.unwrap(), wrote(1, 1));
    // The second team rows were never written.
    assert_eq!(
        pg.psql(
            "first_wins",
            "SELECT count(*) FROM contribution_teams WHERE shard = 0"
        ),
        first.teams.len().to_string()
    );

    let sealed = replica_b
        .seal(std::slice::from_ref(&c), m * MINUTE_MS, GRACE_MS, committed)
        .await
        .unwrap();
    let want = expected_row(&c, m, &[&first, &p1], vec![]);
    assert_eq!(sealed, vec![want.clone()]);
    assert_eq!(
        replica_a.sealed(&c, i64::MIN, i64::MAX).await.unwrap(),
        vec![want]
    );
    check_readers(&replica_a, &c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_sealers_seal_each_minute_once_from_the_first_written_partials() {
    const MINUTES: i64 = 180;
    let pg = Postgres::shared();
    let url = pg.database("race");
    let contracts: Vec<String> = ["c-north", "c-south", "c-west"]
        .iter()
        .map(|c| c.to_string())
        .collect();
    // Shard 0, and two replicas of shard 1 (the same evidence, as replicas see it), write
    // 10 minutes at a time while four sealers on their own connections seal.
    let mut writers = Vec::new();
    for (shard, name) in [(0u32, "w0"), (1, "w1-a"), (1, "w1-b")] {
        let b = book(&pg, &url, 2, name).await;
        let contracts = contracts.clone();
        writers.push(tokio::spawn(async move {
            for start in (M0..M0 + MINUTES).step_by(10) {
                let rows: Vec<(String, i64, Partial)> = (start..start + 10)
                    .flat_map(|m| {
                        contracts
                            .iter()
                            .map(move |c| (c.clone(), m, partial(c, m, shard, 0)))
                    })
                    .collect();
                let got = b.contribute(shard, &rows).await.unwrap();
                assert_eq!(got.sealed, 0, "{got:?}");
                assert_eq!(got.won + got.already, rows.len());
                tokio::task::yield_now().await;
            }
        }));
    }
    let mut sealers = Vec::new();
    for i in 0..4 {
        let b = Arc::new(book(&pg, &url, 2, &format!("sealer-{i}")).await);
        let contracts = contracts.clone();
        sealers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            // The grace never expires here: only minutes both shards wrote are sealed.
            for _ in 0..100_000 {
                mine.extend(
                    b.seal(&contracts, M0 * MINUTE_MS, GRACE_MS, committed)
                        .await
                        .unwrap(),
                );
                let mut done = true;
                for c in &contracts {
                    done &= b.sealed_through(c).await.unwrap() == Some(M0 + MINUTES);
                }
                if done {
                    return mine;
                }
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            panic!("sealer-{i}: the book was never sealed through");
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let mut all: BTreeMap<(String, i64), SealedRow> = BTreeMap::new();
    let mut sealers_that_sealed = 0;
    for s in sealers {
        let mine = s.await.unwrap();
        sealers_that_sealed += usize::from(!mine.is_empty());
        for r in mine {
            let key = (r.contract.clone(), r.minute);
            assert!(all.insert(key.clone(), r).is_none(), "{key:?} sealed twice");
        }
    }
    assert_eq!(all.len(), contracts.len() * MINUTES as usize);
    assert!(sealers_that_sealed >= 1);
    let reader = book(&pg, &url, 2, "reader").await;
    for c in &contracts {
        let stored = reader.sealed(c, i64::MIN, i64::MAX).await.unwrap();
        assert_eq!(stored.len(), MINUTES as usize);
        for r in &stored {
            let want = expected_row(
                c,
                r.minute,
                &[&partial(c, r.minute, 0, 0), &partial(c, r.minute, 1, 0)],
                vec![],
            );
            assert_eq!(r, &want);
            assert_eq!(all[&(c.clone(), r.minute)], want);
        }
        check_readers(&reader, c).await;
    }
    assert_eq!(
        pg.psql("race", "SELECT count(*) FROM sealed_minutes"),
        (contracts.len() * MINUTES as usize).to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_missing_past_its_grace_is_sealed_unreported_and_sealed_minutes_never_change() {
    let pg = Postgres::shared();
    let url = pg.database("grace");
    let s0 = book(&pg, &url, 2, "shard0").await;
    let s1 = book(&pg, &url, 2, "shard1").await;
    let c = "gpu-west".to_string();
    let p = |m: i64, shard: u32| partial(&c, m, shard, 0);
    s0.contribute(
        0,
        &[(c.clone(), M0, p(M0, 0)), (c.clone(), M0 + 1, p(M0 + 1, 0))],
    )
    .await
    .unwrap();
    s0.contribute(0, &[(c.clone(), M0 + 2, p(M0 + 2, 0))])
        .await
        .unwrap();
    // Shard 1 wrote only the first minute, then went away.
    s1.contribute(1, &[(c.clone(), M0, p(M0, 1))])
        .await
        .unwrap();
    let contracts = [c.clone()];
    let end_ms = |m: i64| (m + 1) * MINUTE_MS;

    // Before the grace of M0 + 1 expires: only the complete minute.
    let sealed = s0
        .seal(
            &contracts,
            end_ms(M0 + 1) + GRACE_MS - 1,
            GRACE_MS,
            committed,
        )
        .await
        .unwrap();
    assert_eq!(
        sealed,
        vec![expected_row(&c, M0, &[&p(M0, 0), &p(M0, 1)], vec![])]
    );
    assert_eq!(s1.sealed_through(&c).await.unwrap(), Some(M0 + 1));
    // Waiting, still nothing to seal.
    let sealed = s1
        .seal(
            &contracts,
            end_ms(M0 + 1) + GRACE_MS - 1,
            GRACE_MS,
            committed,
        )
        .await
        .unwrap();
    assert!(sealed.is_empty(), "{sealed:?}");

    // Past the grace of M0 + 2: shard 1's last capacity (4 GPUs) is unreported; shard 0's
    // evidence stands as it is.
    let sealed = s1
        .seal(&contracts, end_ms(M0 + 2) + GRACE_MS, GRACE_MS, committed)
        .await
        .unwrap();
    let want: Vec<SealedRow> = (M0 + 1..=M0 + 2)
        .map(|m| expected_row(&c, m, &[&p(m, 0)], vec![(1, Some(4))]))
        .collect();
    assert_eq!(sealed, want);
    for (r, m) in sealed.iter().zip(M0 + 1..) {
        assert_eq!(r.totals.delivered, p(m, 0).delivered);
        assert_eq!(r.totals.used, p(m, 0).used);
        // Shard 1's four GPUs, at least, were neither watched nor known to be missing.
        let alone = combine(committed(&c, 0, MINUTE_MS), &[&p(m, 0)], 0);
        assert_eq!(
            r.totals.unreported,
            alone.totals.unreported + 4 * MINUTE_MS,
            "{r:?}"
        );
        // ... moved from undelivered, which its absence alone would have claimed.
        assert_eq!(
            r.totals.undelivered + r.totals.unreported,
            alone.totals.undelivered + alone.totals.unreported
        );
    }
    // Minute M0 + 3: nobody wrote it and its grace has not expired.
    assert_eq!(s0.sealed_through(&c).await.unwrap(), Some(M0 + 3));

    // Shard 1 comes back late: the sealed minutes are refused, the open one taken.
    let late = vec![
        (c.clone(), M0 + 1, p(M0 + 1, 1)),
        (c.clone(), M0 + 2, p(M0 + 2, 1)),
        (c.clone(), M0 + 3, p(M0 + 3, 1)),
        (c.clone(), M0 - 5, p(M0 - 5, 1)),
    ];
    assert_eq!(
        s1.contribute(1, &late).await.unwrap(),
        Contributed {
            won: 1,
            already: 0,
            sealed: 3
        }
    );
    let stored = s0.sealed(&c, i64::MIN, i64::MAX).await.unwrap();
    assert_eq!(
        stored[0].minute, M0,
        "minutes before the first contribution: not accounted"
    );
    assert_eq!(&stored[1..], &want[..]);
    // Not even by hand.
    let err = pg.psql_refused("grace", "UPDATE sealed_minutes SET delivered = 0");
    assert!(err.contains("sealed minutes never change"), "{err}");
    assert_eq!(s0.sealed(&c, i64::MIN, i64::MAX).await.unwrap(), stored);
    check_readers(&s0, &c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_shard_racing_the_sealer_is_either_in_the_sealed_minute_or_refused() {
    const MINUTES: i64 = 120;
    let pg = Postgres::shared();
    let url = pg.database("late_race");
    let c = "gpu-late".to_string();
    let s0 = book(&pg, &url, 2, "shard0").await;
    let rows: Vec<(String, i64, Partial)> = (M0..M0 + MINUTES)
        .map(|m| (c.clone(), m, partial(&c, m, 0, 0)))
        .collect();
    s0.contribute(0, &rows).await.unwrap();
    let s1 = book(&pg, &url, 2, "shard1").await;
    s1.contribute(1, &[(c.clone(), M0, partial(&c, M0, 1, 0))])
        .await
        .unwrap();
    // Shard 1 catches up a minute at a time while two sealers, for whom every minute's
    // grace has expired, seal.
    let late = tokio::spawn({
        let c = c.clone();
        async move {
            let mut got = BTreeMap::new();
            for m in M0 + 1..M0 + MINUTES {
                let r = s1
                    .contribute(1, &[(c.clone(), m, partial(&c, m, 1, 0))])
                    .await
                    .unwrap();
                got.insert(m, r);
            }
            got
        }
    });
    let mut sealers = Vec::new();
    for i in 0..2 {
        let b = book(&pg, &url, 2, &format!("sealer-{i}")).await;
        let contracts = vec![c.clone()];
        sealers.push(tokio::spawn(async move {
            loop {
                b.seal(
                    &contracts,
                    (M0 + MINUTES) * MINUTE_MS + GRACE_MS,
                    GRACE_MS,
                    committed,
                )
                .await
                .unwrap();
                if b.sealed_through(&contracts[0]).await.unwrap() == Some(M0 + MINUTES) {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }));
    }
    for s in sealers {
        s.await.unwrap();
    }
    let late = late.await.unwrap();
    let sealed = s0.sealed(&c, i64::MIN, i64::MAX).await.unwrap();
    assert_eq!(sealed.len(), MINUTES as usize);
    for row in &sealed[1..] {
        let m = row.minute;
        let (p0, p1) = (partial(&c, m, 0, 0), partial(&c, m, 1, 0));
        let want = match late[&m] {
            Contributed {
                won: 1,
                already: 0,
                sealed: 0,
            } => expected_row(&c, m, &[&p0, &p1], vec![]),
            Contributed {
                won: 0,
                already: 0,
                sealed: 1,
            } => expected_row(&c, m, &[&p0], vec![(1, Some(4))]),
            other => panic!("minute {m}: {other:?}"),
        };
        assert_eq!(row, &want, "minute {m}: {:?}", late[&m]);
    }
    check_readers(&s0, &c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_never_contributed_leaves_its_minutes_dark_after_the_grace() {
    let pg = Postgres::shared();
    let url = pg.database("never");
    let s0 = book(&pg, &url, 2, "shard0").await;
    let c = "gpu-new".to_string();
    let p0 = partial(&c, M0, 0, 0);
    s0.contribute(0, &[(c.clone(), M0, p0.clone())])
        .await
        .unwrap();
    let sealed = s0
        .seal(
            std::slice::from_ref(&c),
            (M0 + 1) * MINUTE_MS + GRACE_MS,
            GRACE_MS,
            committed,
        )
        .await
        .unwrap();
    assert_eq!(sealed.len(), 1);
    let r = &sealed[0];
    assert_eq!(r.missing, vec![(1, None)]);
    // Shard 1's capacity is unknown: no claim of undelivered capacity either way.
    assert_eq!(r.short, None);
    assert_eq!(r.totals.undelivered, 0, "{r:?}");
    assert_eq!((r.totals.delivered, r.totals.used), (p0.delivered, p0.used));
    assert_eq!(
        r.totals.unreported,
        r.totals.committed - r.totals.delivered.min(r.totals.committed),
        "{r:?}"
    );
    assert_eq!(s0.sealed(&c, M0, M0 + 1).await.unwrap(), sealed);
}
