//! The durable ledger: SQLite (WAL, synchronous=FULL). Sealed minutes and the
//! ledger's snapshot are written in one transaction, so after `kill -9` the ledger
//! resumes exactly from its last commit and the agents' counters fill in the rest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};

use crate::ledger::{Checkpoint, GpuCounters, HostState, Open, Sealed, Snapshot, Totals};

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
    #[error("ledger database {path}: corrupt host checkpoint for {target}: {reason}")]
    Corrupt {
        path: PathBuf,
        target: String,
        reason: String,
    },
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
    PRIMARY KEY (contract, minute)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hosts (
    target TEXT PRIMARY KEY, contract TEXT NOT NULL, known_since_ms INTEGER NOT NULL,
    at_ms INTEGER NOT NULL, gpus TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS late (
    contract TEXT PRIMARY KEY, delivered INTEGER NOT NULL, used INTEGER NOT NULL) WITHOUT ROWID;
";

impl Store {
    /// Opens (or creates) `dir/ledger.sqlite3`.
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
        let conn = Connection::open(&path).map_err(sql)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql)?;
        conn.execute_batch(SCHEMA).map_err(sql)?;
        Ok(Self { conn, path })
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// The snapshot of the last commit, for the contracts in `ids` (by position);
    /// `None` for a new database.
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
            .prepare("SELECT contract, minute, delivered, used, reported FROM open_minutes")
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
            .prepare("SELECT target, contract, known_since_ms, at_ms, gpus FROM hosts")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        for row in rows {
            let (target, id, known_since_ms, at_ms, gpus) = row.map_err(|e| self.err(e))?;
            let Some(contract) = index(&id) else { continue };
            let gpus: BTreeMap<String, [f64; 2]> =
                serde_json::from_str(&gpus).map_err(|e| StoreError::Corrupt {
                    path: self.path.clone(),
                    target: target.clone(),
                    reason: e.to_string(),
                })?;
            let gpus = gpus
                .into_iter()
                .map(|(u, [observed, used])| (u, GpuCounters { observed, used }))
                .collect();
            snap.hosts.push((
                target,
                HostState {
                    contract,
                    known_since_ms,
                    last: Checkpoint { at_ms, gpus },
                },
            ));
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
                .prepare_cached("INSERT INTO open_minutes (contract, minute, delivered, used, reported) VALUES (?1, ?2, ?3, ?4, ?5)")
                .map_err(sql)?;
            for (minute, c, o) in &snap.open {
                ins.execute(params![ids[*c], minute, o.delivered, o.used, o.reported])
                    .map_err(sql)?;
            }
            tx.execute("DELETE FROM hosts", []).map_err(sql)?;
            let mut ins = tx
                .prepare_cached("INSERT INTO hosts (target, contract, known_since_ms, at_ms, gpus) VALUES (?1, ?2, ?3, ?4, ?5)")
                .map_err(sql)?;
            for (target, h) in &snap.hosts {
                let gpus: BTreeMap<&str, [f64; 2]> = h
                    .last
                    .gpus
                    .iter()
                    .map(|(u, g)| (u.as_str(), [g.observed, g.used]))
                    .collect();
                let json = serde_json::to_string(&gpus).unwrap_or_else(|_| "{}".into());
                ins.execute(params![
                    target,
                    ids[h.contract],
                    h.known_since_ms,
                    h.last.at_ms,
                    json
                ])
                .map_err(sql)?;
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
    use crate::ledger::{split, Ledger};

    #[test]
    fn a_commit_round_trips_and_sealed_minutes_never_change() {
        let dir = std::env::temp_dir().join(format!("commitmeter-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ids = vec!["a".to_string(), "b".to_string()];
        let mut ledger = Ledger::new(2, 0);
        let g = |o: f64| -> BTreeMap<String, GpuCounters> {
            [(
                "GPU-1".to_string(),
                GpuCounters {
                    observed: o,
                    used: o / 3.0,
                },
            )]
            .into()
        };
        ledger.observe("h:1", 1, 60_000, g(0.0));
        ledger.observe("h:1", 1, 150_000, g(90.0));
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
            split(60_000, 60_000, 0, 20_000)
        );
        assert_eq!(store.minutes("b", 0, 10).unwrap().len(), 1);
        // A sealed minute is written once: writing it again fails the whole commit.
        let mut store = store;
        assert!(store.commit(&ids, &sealed, &ledger.snapshot()).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
