//! The durable ledger: SQLite (WAL, synchronous=FULL). Sealed minutes and the
//! ledger's snapshot are written in one transaction, so after `kill -9` the ledger
//! resumes exactly from its last commit and the agents' counters fill in the rest.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};

use crate::ledger::{HostState, Open, Sealed, Snapshot, Totals};

/// The schema this binary writes. Older databases are migrated at open; a newer one is
/// refused rather than misread.
pub const SCHEMA_VERSION: i64 = 2;

/// No stored figure of one minute can exceed this many GPU-ms (about 18 million GPUs of
/// a minute each); a row above it, or a negative one, is corruption.
pub const MAX_MINUTE_GPU_MS: i64 = 1 << 50;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("ledger database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("ledger database {path}: cannot create its directory: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "ledger database {path}: corrupt host state of {target} (contract {contract}): {reason}"
    )]
    Corrupt {
        path: PathBuf,
        target: String,
        contract: String,
        reason: String,
    },
    #[error("ledger database {path}: contract {contract:?}, minute {minute} ({at}): {reason}; refusing to serve figures from an inconsistent ledger (restore a backup, or move the file away to start a new ledger)")]
    Inconsistent {
        path: PathBuf,
        contract: String,
        minute: i64,
        at: String,
        reason: String,
    },
    #[error("ledger database {path}: schema version {found} is newer than this commitmeter understands ({SCHEMA_VERSION}); upgrade commitmeter")]
    Newer { path: PathBuf, found: i64 },
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS minutes (
    contract TEXT NOT NULL, minute INTEGER NOT NULL,
    committed INTEGER NOT NULL, delivered INTEGER NOT NULL, used INTEGER NOT NULL,
    idle INTEGER NOT NULL, undelivered INTEGER NOT NULL, unreported INTEGER NOT NULL,
    overage INTEGER NOT NULL,
    PRIMARY KEY (contract, minute)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS open_minutes (
    contract TEXT NOT NULL, minute INTEGER NOT NULL,
    delivered INTEGER NOT NULL, used INTEGER NOT NULL, reported INTEGER NOT NULL,
    expected INTEGER NOT NULL,
    PRIMARY KEY (contract, minute)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hosts (
    target TEXT NOT NULL, contract TEXT NOT NULL, state TEXT NOT NULL,
    PRIMARY KEY (target, contract)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS late (
    contract TEXT PRIMARY KEY, delivered INTEGER NOT NULL, used INTEGER NOT NULL) WITHOUT ROWID;
";

/// Version 1 (before agent time, expected capacity and per-contract host states): open
/// minutes gain `expected` (0: their known-but-unseen capacity is counted from the hosts'
/// tails only), and each host's checkpoint becomes a JSON host state. A checkpoint holding
/// non-finite counters (written by versions that trusted agents blindly) is dropped with a
/// warning: that host re-baselines at its next reading.
fn migrate_v1(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "ALTER TABLE open_minutes ADD COLUMN expected INTEGER NOT NULL DEFAULT 0;
         ALTER TABLE hosts RENAME TO hosts_v1;
         CREATE TABLE hosts (
             target TEXT NOT NULL, contract TEXT NOT NULL, state TEXT NOT NULL,
             PRIMARY KEY (target, contract)) WITHOUT ROWID;",
    )?;
    let rows: Vec<(String, String, i64, i64, String)> = {
        let mut stmt =
            tx.prepare("SELECT target, contract, known_since_ms, at_ms, gpus FROM hosts_v1")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let mut ins = tx.prepare("INSERT INTO hosts (target, contract, state) VALUES (?1, ?2, ?3)")?;
    for (target, contract, known_since, at, gpus) in rows {
        let parsed: Result<std::collections::BTreeMap<String, [f64; 2]>, _> =
            serde_json::from_str(&gpus);
        let ms = |s: f64| {
            (s.is_finite() && (0.0..1e12).contains(&s)).then(|| (s * 1000.0).round() as i64)
        };
        let last = parsed.ok().and_then(|g| {
            g.into_iter()
                .map(|(u, [o, us])| {
                    Some((
                        u,
                        crate::ledger::GpuCounters {
                            observed_ms: ms(o)?,
                            used_ms: ms(us)?,
                        },
                    ))
                })
                .collect::<Option<_>>()
        });
        let Some(gpus) = last else {
            tracing::warn!(scrape_target = %target, contract = %contract, "ledger migration: dropped a host checkpoint with invalid counters; it re-baselines at its next reading");
            continue;
        };
        let state = HostState {
            added_ms: known_since,
            sized_since_ms: Some(known_since),
            last: Some(crate::ledger::Checkpoint {
                at_ms: at,
                gpus,
                ..Default::default()
            }),
            ..HostState::default()
        };
        let json = serde_json::to_string(&state).expect("host state serializes");
        ins.execute(params![target, contract, json])?;
    }
    tx.execute_batch("DROP TABLE hosts_v1;")
}

impl Store {
    /// Opens (or creates) `dir/ledger.sqlite3`, migrating an older schema.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("ledger.sqlite3");
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: path.clone(),
            source,
        })?;
        let sql = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let mut conn = Connection::open(&path).map_err(sql)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql)?;
        let has_meta: bool = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(sql)?
            > 0;
        let version: Option<i64> = if has_meta {
            conn.query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql)?
        } else {
            None
        };
        let tx = conn.transaction().map_err(sql)?;
        match version {
            Some(v) if v > SCHEMA_VERSION => {
                return Err(StoreError::Newer {
                    path: path.clone(),
                    found: v,
                })
            }
            Some(_) => {}
            None if has_meta => {
                tracing::info!(path = %path.display(), from = 1, to = SCHEMA_VERSION, "migrating the ledger database");
                migrate_v1(&tx).map_err(sql)?;
            }
            None => tx.execute_batch(SCHEMA).map_err(sql)?,
        }
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?1)",
            params![SCHEMA_VERSION],
        )
        .map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok(Self { conn, path })
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Refuses a ledger whose stored minutes cannot be the ledger's own: a negative or
    /// out-of-range figure, or one that breaks the identity.
    fn check(&self) -> Result<(), StoreError> {
        let bad: Option<(String, i64, String)> = self
            .conn
            .query_row(
                "SELECT contract, minute, CASE
                    WHEN min(committed, delivered, used, idle, undelivered, unreported, overage) < 0
                        THEN 'a negative figure'
                    WHEN max(committed, delivered, used, idle, undelivered, unreported, overage) > ?1
                        THEN 'a figure out of range'
                    WHEN overage > used THEN 'overage above used'
                    ELSE 'committed != used - overage + idle + undelivered + unreported' END
                 FROM minutes
                 WHERE min(committed, delivered, used, idle, undelivered, unreported, overage) < 0
                    OR max(committed, delivered, used, idle, undelivered, unreported, overage) > ?1
                    OR overage > used
                    OR committed != used - overage + idle + undelivered + unreported
                 LIMIT 1",
                params![MAX_MINUTE_GPU_MS],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let bad = match bad {
            Some(b) => Some(b),
            None => self
                .conn
                .query_row(
                    "SELECT contract, minute, 'an open minute with a negative or out-of-range sum'
                     FROM open_minutes
                     WHERE min(delivered, used, reported, expected) < 0
                        OR max(delivered, used, reported, expected) > ?1
                     LIMIT 1",
                    params![MAX_MINUTE_GPU_MS],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()
                .map_err(|e| self.err(e))?,
        };
        match bad {
            None => Ok(()),
            Some((contract, minute, reason)) => Err(StoreError::Inconsistent {
                path: self.path.clone(),
                contract,
                minute,
                at: jiff::Timestamp::from_second(minute.saturating_mul(60))
                    .map(|t| t.to_string())
                    .unwrap_or_default(),
                reason,
            }),
        }
    }

    /// The snapshot of the last commit, for the contracts in `ids` (by position);
    /// `None` for a new database. Checks the stored figures first.
    pub fn load(&self, ids: &[String]) -> Result<Option<Snapshot>, StoreError> {
        let sealed_through: Option<i64> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'sealed_through'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let Some(sealed_through) = sealed_through else {
            return Ok(None);
        };
        self.check()?;
        let since: i64 = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'since'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.err(e))?
            .unwrap_or(sealed_through);
        let index = |id: &str| ids.iter().position(|i| i == id);
        let mut snap = Snapshot {
            since,
            sealed_through,
            late: vec![(0, 0); ids.len()],
            ..Snapshot::default()
        };
        let mut stmt = self
            .conn
            .prepare(
                "SELECT contract, minute, delivered, used, reported, expected FROM open_minutes",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get(1)?,
                    Open {
                        delivered: r.get(2)?,
                        used: r.get(3)?,
                        reported: r.get(4)?,
                        expected: r.get(5)?,
                    },
                ))
            })
            .map_err(|e| self.err(e))?;
        for row in rows {
            let (id, minute, open) = row.map_err(|e| self.err(e))?;
            if let Some(c) = index(&id) {
                snap.open.push((minute, c, open));
            }
        }
        let mut stmt = self
            .conn
            .prepare("SELECT target, contract, state FROM hosts ORDER BY target, contract")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        for row in rows {
            let (target, id, state) = row.map_err(|e| self.err(e))?;
            // A contract renamed or removed: its hosts are new targets of whatever
            // contract selects them now (dark until their first reading).
            let Some(contract) = index(&id) else { continue };
            let corrupt = |reason: String| StoreError::Corrupt {
                path: self.path.clone(),
                target: target.clone(),
                contract: id.clone(),
                reason,
            };
            let state: HostState =
                serde_json::from_str(&state).map_err(|e| corrupt(e.to_string()))?;
            let negative = state
                .last
                .as_ref()
                .is_some_and(|l| l.gpus.values().any(|g| g.observed_ms < 0 || g.used_ms < 0))
                || state.carry.iter().any(|&c| c < 0);
            if negative {
                return Err(corrupt("negative counters".into()));
            }
            snap.hosts.push((target, contract, state));
        }
        let mut stmt = self
            .conn
            .prepare("SELECT contract, delivered, used FROM late")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?)))
            .map_err(|e| self.err(e))?;
        for row in rows {
            let (id, d, u) = row.map_err(|e| self.err(e))?;
            if let Some(c) = index(&id) {
                snap.late[c] = (d, u);
            }
        }
        Ok(Some(snap))
    }

    /// Writes newly sealed minutes and the snapshot that follows them, atomically.
    pub fn commit(
        &mut self,
        ids: &[String],
        sealed: &[Sealed],
        snap: &Snapshot,
    ) -> Result<(), StoreError> {
        let path = self.path.clone();
        let sql = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(sql)?;
        {
            let mut ins = tx
                .prepare_cached(
                    "INSERT INTO minutes (contract, minute, committed, delivered, used, idle, undelivered, unreported, overage)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )
                .map_err(sql)?;
            for s in sealed {
                let t = &s.totals;
                ins.execute(params![
                    ids[s.contract],
                    s.minute,
                    t.committed,
                    t.delivered,
                    t.used,
                    t.idle,
                    t.undelivered,
                    t.unreported,
                    t.overage
                ])
                .map_err(sql)?;
            }
            tx.execute("DELETE FROM open_minutes", []).map_err(sql)?;
            let mut ins = tx
                .prepare_cached("INSERT INTO open_minutes (contract, minute, delivered, used, reported, expected) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
                .map_err(sql)?;
            for (minute, c, o) in &snap.open {
                ins.execute(params![
                    ids[*c],
                    minute,
                    o.delivered,
                    o.used,
                    o.reported,
                    o.expected
                ])
                .map_err(sql)?;
            }
            tx.execute("DELETE FROM hosts", []).map_err(sql)?;
            let mut ins = tx
                .prepare_cached("INSERT INTO hosts (target, contract, state) VALUES (?1, ?2, ?3)")
                .map_err(sql)?;
            for (target, c, h) in &snap.hosts {
                let json = serde_json::to_string(h).expect("host state serializes");
                ins.execute(params![target, ids[*c], json]).map_err(sql)?;
            }
            let mut ins = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO late (contract, delivered, used) VALUES (?1, ?2, ?3)",
                )
                .map_err(sql)?;
            for (c, (d, u)) in snap.late.iter().enumerate() {
                ins.execute(params![ids[c], d, u]).map_err(sql)?;
            }
            tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('sealed_through', ?1), ('since', ?2)",
                params![snap.sealed_through, snap.since],
            )
            .map_err(sql)?;
        }
        tx.commit().map_err(sql)
    }

    /// Sums of sealed minutes `[from, to)` of a contract.
    pub fn sums(
        &self,
        contract: &str,
        from_minute: i64,
        to_minute: i64,
    ) -> Result<Totals, StoreError> {
        self.conn
            .query_row(
                "SELECT COALESCE(SUM(committed),0), COALESCE(SUM(delivered),0), COALESCE(SUM(used),0),
                        COALESCE(SUM(idle),0), COALESCE(SUM(undelivered),0), COALESCE(SUM(unreported),0),
                        COALESCE(SUM(overage),0)
                 FROM minutes WHERE contract = ?1 AND minute >= ?2 AND minute < ?3",
                params![contract, from_minute, to_minute],
                row_totals,
            )
            .map_err(|e| self.err(e))
    }

    /// Sealed minutes `[from, to)` of a contract, in order.
    pub fn minutes(
        &self,
        contract: &str,
        from_minute: i64,
        to_minute: i64,
    ) -> Result<Vec<(i64, Totals)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT committed, delivered, used, idle, undelivered, unreported, overage, minute
                 FROM minutes WHERE contract = ?1 AND minute >= ?2 AND minute < ?3 ORDER BY minute",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![contract, from_minute, to_minute], |r| {
                Ok((r.get(7)?, row_totals(r)?))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }
}

fn row_totals(r: &rusqlite::Row<'_>) -> rusqlite::Result<Totals> {
    Ok(Totals {
        committed: r.get(0)?,
        delivered: r.get(1)?,
        used: r.get(2)?,
        idle: r.get(3)?,
        undelivered: r.get(4)?,
        unreported: r.get(5)?,
        overage: r.get(6)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{split, GpuCounters, Ledger, Reading};

    fn scratch(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("commitmeter-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn reading(t: i64, observed_ms: i64) -> Reading {
        Reading {
            received_ms: t,
            agent_ms: Some(t),
            agent_start_ms: Some(0),
            sampled_ms: Some(t),
            gpus: [(
                "GPU-1".to_string(),
                GpuCounters {
                    observed_ms,
                    used_ms: observed_ms / 3,
                },
            )]
            .into(),
        }
    }

    #[test]
    fn a_commit_round_trips_and_sealed_minutes_never_change() {
        let dir = scratch("roundtrip");
        let ids = vec!["a".to_string(), "b".to_string()];
        let mut ledger = Ledger::new(2, 0);
        ledger.observe("h:1", 1, reading(60_000, 0));
        ledger.observe("h:1", 1, reading(150_000, 90_000));
        let sealed = ledger.seal(150_000, 0, |_, a, b| b - a);
        let mut store = Store::open(&dir).unwrap();
        assert_eq!(store.load(&ids).unwrap(), None);
        store.commit(&ids, &sealed, &ledger.snapshot()).unwrap();
        drop(store);

        let store = Store::open(&dir).unwrap();
        let snap = store.load(&ids).unwrap().unwrap();
        assert_eq!(Ledger::restore(2, snap), ledger);
        assert_eq!(
            store.sums("b", 0, 10).unwrap(),
            split(60_000, 60_000, 20_000, 0, false)
        );
        assert_eq!(store.minutes("b", 0, 10).unwrap().len(), 1);
        // A sealed minute is written once: writing it again fails the whole commit.
        let mut store = store;
        assert!(store.commit(&ids, &sealed, &ledger.snapshot()).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_version_1_database_is_migrated_and_a_newer_one_refused() {
        let dir = scratch("migrate");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ledger.sqlite3");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
                 CREATE TABLE minutes (contract TEXT NOT NULL, minute INTEGER NOT NULL,
                    committed INTEGER NOT NULL, delivered INTEGER NOT NULL, used INTEGER NOT NULL,
                    idle INTEGER NOT NULL, undelivered INTEGER NOT NULL, unreported INTEGER NOT NULL,
                    overage INTEGER NOT NULL, PRIMARY KEY (contract, minute)) WITHOUT ROWID;
                 CREATE TABLE open_minutes (contract TEXT NOT NULL, minute INTEGER NOT NULL,
                    delivered INTEGER NOT NULL, used INTEGER NOT NULL, reported INTEGER NOT NULL,
                    PRIMARY KEY (contract, minute)) WITHOUT ROWID;
                 CREATE TABLE hosts (target TEXT PRIMARY KEY, contract TEXT NOT NULL,
                    known_since_ms INTEGER NOT NULL, at_ms INTEGER NOT NULL, gpus TEXT NOT NULL) WITHOUT ROWID;
                 CREATE TABLE late (contract TEXT PRIMARY KEY, delivered INTEGER NOT NULL,
                    used INTEGER NOT NULL) WITHOUT ROWID;
                 INSERT INTO meta VALUES ('sealed_through', 3), ('since', 1);
                 INSERT INTO minutes VALUES ('a', 1, 60000, 60000, 30000, 30000, 0, 0, 0);
                 INSERT INTO open_minutes VALUES ('a', 3, 1000, 500, 1000);
                 INSERT INTO hosts VALUES ('good:1', 'a', 60000, 170000, '{\"GPU-1\":[170.0,85.5]}');
                 INSERT INTO hosts VALUES ('poisoned:1', 'a', 60000, 170000, '{\"GPU-9\":[null,1.0]}');",
            )
            .unwrap();
        }
        let store = Store::open(&dir).unwrap();
        let snap = store.load(&["a".to_string()]).unwrap().unwrap();
        assert_eq!((snap.since, snap.sealed_through), (1, 3));
        assert_eq!(snap.open[0].2.expected, 0);
        // The poisoned checkpoint is dropped instead of failing every start.
        assert_eq!(snap.hosts.len(), 1);
        let last = snap.hosts[0].2.last.as_ref().unwrap();
        assert_eq!((last.at_ms, last.gpus["GPU-1"].used_ms), (170_000, 85_500));
        drop(store);
        Connection::open(&path)
            .unwrap()
            .execute(
                "UPDATE meta SET value = 99 WHERE key = 'schema_version'",
                [],
            )
            .unwrap();
        let err = Store::open(&dir).err().unwrap().to_string();
        assert!(err.contains("schema version 99 is newer"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_inconsistent_ledger_refuses_to_start_naming_contract_and_minute() {
        let dir = scratch("inconsistent");
        let ids = vec!["acme".to_string()];
        let mut store = Store::open(&dir).unwrap();
        let t = split(60_000, 60_000, 30_000, 0, false);
        let sealed = [crate::ledger::Sealed {
            contract: 0,
            minute: 29_333_333,
            totals: t,
        }];
        store
            .commit(&ids, &sealed, &Ledger::new(1, 0).snapshot())
            .unwrap();
        assert!(store.load(&ids).is_ok());
        store
            .conn
            .execute("UPDATE minutes SET idle = -5", [])
            .unwrap();
        let err = store.load(&ids).unwrap_err().to_string();
        assert!(
            err.contains("contract \"acme\", minute 29333333 (2025-10-09T")
                && err.contains("a negative figure"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_contract_renamed_between_restarts_is_unreported_until_seen_again() {
        let dir = scratch("renamed");
        let mut ledger = Ledger::new(1, 0);
        ledger.configure(0, &[("h:1".into(), vec![0])], |_, _| i64::MAX);
        ledger.observe("h:1", 0, reading(60_000, 0));
        ledger.observe("h:1", 0, reading(120_000, 60_000));
        let sealed = ledger.seal(120_000, 0, |_, a, b| b - a);
        let mut store = Store::open(&dir).unwrap();
        store
            .commit(&["old".to_string()], &sealed, &ledger.snapshot())
            .unwrap();
        // Restarted with the contract renamed: its hosts are new targets of "new", dark
        // until read. The minutes the aggregator did not see are nobody's evidence.
        let snap = store.load(&["new".to_string()]).unwrap().unwrap();
        assert!(snap.hosts.is_empty());
        let mut ledger = Ledger::restore(1, snap);
        ledger.configure(300_000, &[("h:1".into(), vec![0])], |_, _| i64::MAX);
        ledger.observe("h:1", 0, reading(300_000, 240_000));
        ledger.observe("h:1", 0, reading(360_000, 300_000));
        let sealed = ledger.seal(360_000, 0, |_, a, b| b - a);
        let kinds: Vec<(i64, i64, i64)> = sealed
            .iter()
            .map(|s| {
                (
                    s.totals.delivered,
                    s.totals.unreported,
                    s.totals.undelivered,
                )
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                (0, 60_000, 0),
                (0, 60_000, 0),
                (0, 60_000, 0),
                (60_000, 0, 0)
            ]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
